//! pf's eBPF programs. See ARCHITECTURE.md for the packet's path through them.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no atomic read-modify-write types in `core`, but LLVM lowers
// the intrinsic to BPF's atomic add.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod fast;
mod maps;
mod nat;
mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use pf_common::counters::{
    EGRESS_BASE, FAST_PATH_BASE, FastPath, INGRESS_BASE, Outcome, REPLY_FAST_PATH_BASE,
};

/// XDP on the public NIC. Always `XDP_PASS`: a rewritten packet goes on into the kernel, which
/// routes it to the tunnel (and decrements its TTL); everything else goes on untouched. Either way
/// one counter says what happened.
#[xdp]
pub fn pf_ingress(ctx: XdpContext) -> u32 {
    let outcome = nat::ingress(&ctx);
    maps::count(INGRESS_BASE + outcome as u32);
    xdp_action::XDP_PASS
}

/// XDP on the public NIC with the fast path (`pf attach --fast-path`): the same rewrite, then a
/// rewritten packet leaves by XDP_REDIRECT when the FIB and `REDIRECT_DEVICES` allow it
/// (bypassing the kernel's forwarding path, netfilter included), else XDP_PASS as above.
#[xdp]
pub fn pf_ingress_fast(ctx: XdpContext) -> u32 {
    let outcome = nat::ingress(&ctx);
    maps::count(INGRESS_BASE + outcome as u32);
    if outcome != Outcome::Rewritten && outcome != Outcome::IcmpErrorRewritten {
        return xdp_action::XDP_PASS;
    }
    let (fast, action) = match fast::route(&ctx, &maps::REDIRECT_DEVICES) {
        Ok(hop) => (FastPath::Redirected, fast::finish(hop)),
        Err(fast) => (fast, xdp_action::XDP_PASS),
    };
    maps::count(FAST_PATH_BASE + fast as u32);
    action
}

/// XDP on an Ethernet-like tunnel-side interface (`pf attach IFACE --tunnel-side`): a reply from
/// a reservation's target leaves straight out a public interface attached with `--fast-path`,
/// its source rewritten to the public endpoint, when the FIB and `PUBLIC_DEVICES` allow it.
/// Otherwise, and for everything else, XDP_PASS with nothing written: the kernel routes the
/// packet and TC egress on the public interface rewrites it, as without this program. A
/// redirected frame never passes TC egress, so no reply is rewritten twice.
#[xdp]
pub fn pf_reply_fast(ctx: XdpContext) -> u32 {
    let (fast, action) = match nat::reply(&ctx) {
        None => (FastPath::NotAReply, xdp_action::XDP_PASS),
        Some(reply) => match fast::route(&ctx, &maps::PUBLIC_DEVICES) {
            Ok(hop) => {
                nat::rewrite_reply(&reply);
                (FastPath::Redirected, fast::finish(hop))
            }
            Err(fast) => (fast, xdp_action::XDP_PASS),
        },
    };
    maps::count(REPLY_FAST_PATH_BASE + fast as u32);
    action
}

/// TC egress on the public NIC, after routing and netfilter. `TC_ACT_OK` lets the packet leave
/// (rewritten or untouched); `TC_ACT_SHOT` drops it: a packet whose rewrite failed half way,
/// or one that would leave unrewritten with a tunnel address as its source.
#[classifier]
pub fn pf_egress(ctx: TcContext) -> i32 {
    let verdict = nat::egress(&ctx);
    maps::count(EGRESS_BASE + verdict.outcome as u32);
    if verdict.drop { TC_ACT_SHOT } else { TC_ACT_OK }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
