//! pf's eBPF programs. See ARCHITECTURE.md for the packet's path through them.
#![no_std]
#![no_main]

mod maps;
mod nat;
mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use pf_common::counters::{EGRESS_BASE, INGRESS_BASE};

/// XDP on the public NIC. Always `XDP_PASS`: a rewritten packet goes on into the kernel, which
/// routes it to the tunnel (and decrements its TTL); everything else goes on untouched. Either way
/// one counter says what happened.
#[xdp]
pub fn pf_ingress(ctx: XdpContext) -> u32 {
    let outcome = nat::ingress(&ctx);
    maps::count(INGRESS_BASE + outcome as u32);
    xdp_action::XDP_PASS
}

/// TC egress on the public NIC, after routing and netfilter. `TC_ACT_OK` lets the packet leave
/// (rewritten or untouched); `TC_ACT_SHOT` only for a packet whose rewrite failed half way.
#[classifier]
pub fn pf_egress(ctx: TcContext) -> i32 {
    let verdict = nat::egress(&ctx);
    maps::count(EGRESS_BASE + verdict.outcome as u32);
    if verdict.drop { TC_ACT_SHOT } else { TC_ACT_OK }
}

/// Do nothing but pass: the baselines `cargo xtask bench` measures pf's programs against, in
/// the same run. Never attached.
#[xdp]
pub fn pf_bench_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn pf_bench_noop_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
