//! pf's eBPF programs. See ARCHITECTURE.md for the packet's path through them.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no atomic read-modify-write types in `core`, but LLVM lowers
// the intrinsic to BPF's atomic add.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod clock;
mod fast;
mod limit;
mod maps;
mod nat;
mod parse;
mod trace;
mod trigger;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use pf_common::{
    TRACE_NO_FAST_PATH, TraceEndpoints,
    counters::{
        EGRESS_BASE, FAST_PATH_BASE, FastPath, INGRESS_BASE, Outcome, REPLY_FAST_PATH_BASE,
        TRIGGER_BASE,
    },
    trace_hook,
};

/// An XDP packet's protocol and endpoints, for `pf trace`.
#[inline(always)]
fn xdp_endpoints(ctx: &XdpContext) -> (u8, TraceEndpoints) {
    let (start, end) = (ctx.data(), ctx.data_end());
    // Hidden from LLVM as `nat`'s XDP parse hides it: an `end - start` it could see through
    // would let it drop bounds checks the verifier needs.
    let frame_len = end - start;
    // SAFETY: reads a local.
    let frame_len = unsafe { core::ptr::read_volatile(&frame_len) };
    trace::endpoints(start, end, frame_len)
}

/// What `pf trace` needs before a program decides: whether it is on, and then the packet as
/// it came (one array read when off).
#[inline(always)]
fn trace_before(ctx: &XdpContext) -> trace::Before {
    let mut before = trace::switch();
    if before.on {
        (before.proto, before.endpoints) = xdp_endpoints(ctx);
    }
    before
}

/// Reports an XDP program's decision to `pf trace`, if `trace_before` found it on.
#[inline(always)]
fn trace_xdp(ctx: &XdpContext, traced: &trace::Before, hook: u8, outcome: u8, fast: u8) {
    if traced.on {
        let (_, after) = xdp_endpoints(ctx);
        trace::report(traced, hook, outcome, fast, after);
    }
}

/// The XDP action for a packet the ingress program did not redirect: `XDP_DROP` for one a
/// reservation's limits refused, `XDP_PASS` for everything else (a rewritten packet goes on
/// into the kernel, which routes it to the tunnel and decrements its TTL; anything else goes
/// on untouched).
#[inline(always)]
fn pass_or_drop(outcome: Outcome) -> u32 {
    if outcome == Outcome::LimitDropped {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// XDP on the public NIC. `XDP_PASS`, or `XDP_DROP` for a packet over a reservation's limits
/// (`pass_or_drop`); either way one counter says what happened.
#[xdp]
pub fn pf_ingress(ctx: XdpContext) -> u32 {
    let tracing = trace_before(&ctx);
    let outcome = nat::ingress(&ctx);
    maps::count(INGRESS_BASE + outcome as u32);
    trace_xdp(
        &ctx,
        &tracing,
        trace_hook::INGRESS,
        outcome as u8,
        TRACE_NO_FAST_PATH,
    );
    pass_or_drop(outcome)
}

/// XDP on the public NIC with the fast path (`pf attach --fast-path`): the same rewrite, then a
/// rewritten packet leaves by XDP_REDIRECT when the FIB and `REDIRECT_DEVICES` allow it
/// (bypassing the kernel's forwarding path, netfilter included), else XDP_PASS as above.
#[xdp]
pub fn pf_ingress_fast(ctx: XdpContext) -> u32 {
    let tracing = trace_before(&ctx);
    let outcome = nat::ingress(&ctx);
    maps::count(INGRESS_BASE + outcome as u32);
    if outcome != Outcome::Rewritten && outcome != Outcome::IcmpErrorRewritten {
        trace_xdp(
            &ctx,
            &tracing,
            trace_hook::INGRESS,
            outcome as u8,
            TRACE_NO_FAST_PATH,
        );
        return pass_or_drop(outcome);
    }
    let (fast, action) = match fast::route(&ctx, &maps::REDIRECT_DEVICES) {
        Ok(hop) => (FastPath::Redirected, fast::finish(hop)),
        Err(fast) => (fast, xdp_action::XDP_PASS),
    };
    maps::count(FAST_PATH_BASE + fast as u32);
    trace_xdp(
        &ctx,
        &tracing,
        trace_hook::INGRESS,
        outcome as u8,
        fast as u8,
    );
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
    let tracing = trace_before(&ctx);
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
    trace_xdp(
        &ctx,
        &tracing,
        trace_hook::REPLY_FAST_PATH,
        fast as u8,
        fast as u8,
    );
    action
}

/// TC egress on the public NIC, after routing and netfilter. `TC_ACT_OK` lets the packet leave
/// (rewritten or untouched); `TC_ACT_SHOT` drops it: a packet whose rewrite failed half way,
/// or one that would leave unrewritten with a tunnel address as its source.
#[classifier]
pub fn pf_egress(ctx: TcContext) -> i32 {
    let mut tracing = trace::switch();
    if tracing.on {
        (tracing.proto, tracing.endpoints) =
            trace::endpoints(ctx.data(), ctx.data_end(), ctx.len() as usize);
    }
    let verdict = nat::egress(&ctx);
    maps::count(EGRESS_BASE + verdict.outcome as u32);
    if tracing.on {
        // The data pointers are read again: the rewrite may have pulled the headers.
        let (_, after) = trace::endpoints(ctx.data(), ctx.data_end(), ctx.len() as usize);
        trace::report(
            &tracing,
            trace_hook::EGRESS,
            verdict.outcome as u8,
            TRACE_NO_FAST_PATH,
            after,
        );
    }
    if verdict.drop { TC_ACT_SHOT } else { TC_ACT_OK }
}

/// TC ingress on an Ethernet-like tunnel-side interface (a veth, a tap): port triggering
/// (`trigger.rs`). Always `TC_ACT_UNSPEC`, TCX's "next": the packet goes on as it came,
/// whatever it opened, and the programs or filters after pf's still see it (`TC_ACT_OK` would
/// end the hook's chain there).
#[classifier]
pub fn pf_trigger(ctx: TcContext) -> i32 {
    let outcome = trigger::trigger::<true>(&ctx);
    maps::count(TRIGGER_BASE + outcome as u32);
    TC_ACT_UNSPEC
}

/// TC ingress on a tunnel-side interface without a link layer (WireGuard, tun), whose packets
/// start with the IPv4 header: as [`pf_trigger`].
#[classifier]
pub fn pf_trigger_l3(ctx: TcContext) -> i32 {
    let outcome = trigger::trigger::<false>(&ctx);
    maps::count(TRIGGER_BASE + outcome as u32);
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
