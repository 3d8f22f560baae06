//! The forwarding benchmark's own programs (`cargo xtask bench`), built into a separate object
//! that pf itself never loads:
//!
//! - `pf_bench_gen`, a traffic generator run with BPF_PROG_TEST_RUN in live-frames mode
//!   (BPF_F_TEST_XDP_LIVE_FRAMES) on the internet host's veth: each run writes a UDP frame's
//!   headers and returns `XDP_TX`, which sends the frame out of that veth to the server.
//!   The kernel recycles live frames without resetting their bytes (and the server's XDP program
//!   rewrites them in place), so the headers are written on every run, not once.
//! - `pf_bench_sink`, on the receiving veth: counts and drops the frames addressed to the one
//!   endpoint it is told to expect, and passes everything else (ARP above all) to the kernel.
//! - `pf_bench_lookup`, one hash lookup keyed by 8 bytes of the packet (XDP_PASS on a
//!   hit):
//!   the floor under pf's ingress hit (which does that lookup plus parsing and the rewrite), for
//!   the per-packet comparison.
//! - `pf_bench_pass`, XDP_PASS only: stands in for pf on the server's public veth in the
//!   configurations without pf, so every configuration receives through native XDP alike.
//! - `pf_bench_redirect`: redirects every frame to the one device in `BENCH_REDIRECT`, with no
//!   parsing, NAT or FIB lookup: the least an XDP forwarder can do on the same path, the floor
//!   under pf's fast path.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_OK, xdp_action},
    macros::{classifier, map, xdp},
    maps::{DevMap, HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};

/// Ethernet + IPv4 (no options) + UDP: the part of the frame the generator writes.
const HEADERS_LEN: usize = 14 + 20 + 8;
const UDP_SRC_PORT_OFFSET: usize = 14 + 20;
const UDP_DST_PORT_OFFSET: usize = UDP_SRC_PORT_OFFSET + 2;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const IPPROTO_UDP: u8 = 17;

// Set by the loader (aya's `set_global`) before load; read with `read_volatile` so the compiler
// does not fold the zero initialisers into the code.
/// The frame's headers, checksums included; the UDP checksum is 0 (none, legal in IPv4), so the
/// source port can change without a checksum update.
#[unsafe(no_mangle)]
static GEN_HEADERS: [u8; HEADERS_LEN] = [0; HEADERS_LEN];
/// How many flows: the source port runs through `GEN_FIRST_SRC_PORT..+GEN_FLOWS`.
#[unsafe(no_mangle)]
static GEN_FLOWS: u32 = 1;
#[unsafe(no_mangle)]
static GEN_FIRST_SRC_PORT: u16 = 0;
/// The destination the sink counts: IPv4 address and UDP port, network byte order.
#[unsafe(no_mangle)]
static SINK_ADDR: [u8; 4] = [0; 4];
#[unsafe(no_mangle)]
static SINK_PORT: [u8; 2] = [0; 2];

/// The generator's per-CPU sequence number (slot 0), which picks each frame's flow.
#[map]
static GEN_SEQUENCE: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: frames to the expected endpoint (dropped); slot 1: everything else (passed).
#[map]
static SINK_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

#[xdp]
pub fn pf_bench_gen(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + HEADERS_LEN > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let frame = start as *mut u8;
    for i in 0..HEADERS_LEN {
        // SAFETY: bounds checked above.
        unsafe { *frame.add(i) = read_volatile(&GEN_HEADERS[i]) };
    }
    let flows = unsafe { read_volatile(&GEN_FLOWS) };
    if flows > 1 {
        let Some(sequence) = GEN_SEQUENCE.get_ptr_mut(0) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: a per-CPU slot; a program does not migrate while it runs.
        let n = unsafe {
            *sequence = (*sequence).wrapping_add(1);
            *sequence
        };
        let port = unsafe { read_volatile(&GEN_FIRST_SRC_PORT) }.wrapping_add((n % flows) as u16);
        let [hi, lo] = port.to_be_bytes();
        unsafe {
            *frame.add(UDP_SRC_PORT_OFFSET) = hi;
            *frame.add(UDP_SRC_PORT_OFFSET + 1) = lo;
        }
    }
    // In live-frames mode XDP_TX transmits the frame on the device named by the run's
    // ingress_ifindex.
    xdp_action::XDP_TX
}

#[xdp]
pub fn pf_bench_sink(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let expected = start + HEADERS_LEN <= ctx.data_end() && {
        let frame = start as *const u8;
        // SAFETY: bounds checked just above.
        unsafe {
            [*frame.add(12), *frame.add(13)] == ETH_P_IP
                && *frame.add(14) == 0x45
                && *frame.add(14 + 9) == IPPROTO_UDP
                && [
                    *frame.add(30),
                    *frame.add(31),
                    *frame.add(32),
                    *frame.add(33),
                ] == read_volatile(&SINK_ADDR)
                && [
                    *frame.add(UDP_DST_PORT_OFFSET),
                    *frame.add(UDP_DST_PORT_OFFSET + 1),
                ] == read_volatile(&SINK_PORT)
        }
    };
    let slot = if expected { 0 } else { 1 };
    if let Some(count) = SINK_COUNTS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot.
        unsafe { *count += 1 };
    }
    if expected {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// Same key and value sizes, type and flags as pf's FORWARD_NAT.
#[map]
static LOOKUP_ONLY: HashMap<[u8; 8], [u8; 24]> =
    HashMap::with_max_entries(1 << 20, BPF_F_NO_PREALLOC);

/// Where the key is read: the IPv4 destination address and the L4 destination port (with the
/// two bytes after them), as pf's key holds address, port and protocol.
const LOOKUP_KEY_OFFSET: usize = 30;

#[xdp]
pub fn pf_bench_lookup(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + LOOKUP_KEY_OFFSET + 8 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: bounds checked above; an unaligned read of plain bytes.
    let key: [u8; 8] =
        unsafe { core::ptr::read_unaligned((start + LOOKUP_KEY_OFFSET) as *const [u8; 8]) };
    // SAFETY: the value is only tested for presence. A miss drops, so the bench can tell from
    // the verdict that the packet hit (the buffer never changes, so every run does the same).
    if unsafe { LOOKUP_ONLY.get(&key) }.is_some() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// Do nothing but pass: the per-packet baselines of each hook (and the forwarding bench's
/// XDP_PASS stand-in).
#[xdp]
pub fn pf_bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn pf_bench_pass_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Slot 0: the device `pf_bench_redirect` sends every frame to (set by the bench).
#[map]
static BENCH_REDIRECT: DevMap = DevMap::with_max_entries(1, 0);

/// A failed redirect drops (the map's fallback action): the kernel would deliver the frame to
/// the client anyway, and the figure must be the redirect's or nothing.
#[xdp]
pub fn pf_bench_redirect(_ctx: XdpContext) -> u32 {
    BENCH_REDIRECT
        .redirect(0, xdp_action::XDP_DROP as u64)
        .unwrap_or(xdp_action::XDP_DROP)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
