//! `pf trace`: each program reports its decision about a packet to userspace through a ring
//! buffer, while `TRACE_CONFIG` says so. Off, a packet pays one array read (`filter`); on, two
//! more parses of its headers (before and after the program) and one ring-buffer write.

use aya_ebpf::{
    macros::map,
    maps::{Array, RingBuf},
};
use pf_common::{
    IPPROTO_TCP, IPPROTO_UDP, TraceConfig, TraceEndpoints, TraceEvent, limits::TRACE_RING_BYTES,
};

use crate::parse::{self, IP_OFFSET_MASK, wire};

/// Whether to report, and for which port (written by `pf trace`).
#[map]
pub static TRACE_CONFIG: Array<TraceConfig> = Array::pinned(1, 0);

/// The reports, read by `pf trace`. A report that finds it full is dropped.
#[map]
pub static TRACE_EVENTS: RingBuf = RingBuf::pinned(TRACE_RING_BYTES, 0);

/// What a program keeps between its start and its decision for `pf trace`. Every field is
/// initialised whether tracing is on or not: an `Option` of it let LLVM keep an undefined
/// register across the program, which the verifier (6.18's too) rejects on reading it.
#[derive(Clone, Copy, Default)]
pub struct Before {
    pub on: bool,
    /// The port to report (zero: every packet).
    pub port: [u8; 2],
    pub proto: u8,
    pub endpoints: TraceEndpoints,
}

/// Whether tracing is on, and for which port: one array read, what every packet pays when off.
#[inline(always)]
pub fn switch() -> Before {
    match TRACE_CONFIG.get(0) {
        Some(c) if c.enabled != 0 => Before {
            on: true,
            port: c.port,
            ..Before::default()
        },
        _ => Before::default(),
    }
}

/// The protocol and endpoints of the packet between `start` and `end` (`frame_len` bytes in
/// all), as far as it has them.
#[inline(always)]
pub fn endpoints(start: usize, end: usize, frame_len: usize) -> (u8, TraceEndpoints) {
    let mut e = TraceEndpoints::default();
    let Ok(ip) = parse::parse_ipv4(start, end, frame_len) else {
        return (0, e);
    };
    // SAFETY: `ip.ip` was bounds-checked by parse_ipv4.
    unsafe {
        e.src_addr = wire::get4(&raw const (*ip.ip).src_addr);
        e.dst_addr = wire::get4(&raw const (*ip.ip).dst_addr);
    }
    if (ip.proto == IPPROTO_TCP || ip.proto == IPPROTO_UDP)
        && ip.frags & IP_OFFSET_MASK == 0
        && let Ok(ports) = parse::parse_ports(start, end, &ip)
    {
        // SAFETY: bounds-checked by parse_ports.
        unsafe {
            e.src_port = wire::get2(&raw const (*ports.ports)[0]);
            e.dst_port = wire::get2(&raw const (*ports.ports)[1]);
        }
    }
    (ip.proto, e)
}

/// Reports one decision, if a port of the packet before or after it is the traced one (or
/// every port is).
#[inline(always)]
pub fn report(traced: &Before, hook: u8, outcome: u8, fast: u8, after: TraceEndpoints) {
    let (port, before) = (traced.port, traced.endpoints);
    if port != [0, 0]
        && before.src_port != port
        && before.dst_port != port
        && after.src_port != port
        && after.dst_port != port
    {
        return;
    }
    let event = TraceEvent {
        hook,
        outcome,
        fast,
        proto: traced.proto,
        before,
        after,
    };
    let _ = TRACE_EVENTS.output::<TraceEvent>(&event, 0);
}
