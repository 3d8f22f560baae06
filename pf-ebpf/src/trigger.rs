//! Port triggering in the kernel. A trigger rule's NAT entries carry a gate (`NatEntry::gate`,
//! an index of `TRIGGER_GATES`); they forward only while the gate is open, and a packet that
//! meets a closed one is handled as if no entry existed. The trigger program, on a tunnel-side
//! interface's TC ingress, opens the gate when the rule's client sends to one of its trigger
//! ports (`TRIGGER_PORTS`), and reports the opening to `pf serve` (`TRIGGER_EVENTS`). Every
//! packet through an open gate, in either direction, and every further trigger packet, keeps it
//! open for the rule's idle timeout; after that it closes by itself, per packet, without
//! userspace.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, RingBuf},
    programs::TcContext,
};
use pf_common::{
    EndpointKey, TriggerGate, TriggerOpened,
    counters::{GATE_CLOSED, TRIGGER_EVENTS_LOST, Trigger},
    limits::{MAX_TRIGGER_GATES, MAX_TRIGGER_PORTS, TRIGGER_REFRESH_NS, TRIGGER_RING_BYTES},
};

use crate::{
    clock::now_ns,
    maps,
    parse::{
        IP_OFFSET_MASK, MAX_HEADERS_LEN, is_tcp_udp, parse_ipv4, parse_ipv4_l3, parse_ports, wire,
    },
};

/// (client address, trigger port, protocol) -> the gate it opens. Written by userspace.
#[map]
pub static TRIGGER_PORTS: HashMap<EndpointKey, u32> = HashMap::pinned(MAX_TRIGGER_PORTS, 0);

/// The gates, by `NatEntry::gate` (slot 0 unused). The expiry is written by the programs, the
/// timeout by userspace.
#[map]
pub static TRIGGER_GATES: Array<TriggerGate> = Array::pinned(MAX_TRIGGER_GATES, 0);

/// Openings, read by `pf serve`.
#[map]
pub static TRIGGER_EVENTS: RingBuf = RingBuf::pinned(TRIGGER_RING_BYTES, 0);

/// Whether a NAT entry may forward: it has no gate, or its gate is open, in which case the
/// packet keeps it open (pushing the expiry at most once per `TRIGGER_REFRESH_NS`).
///
/// SAFETY: `entry` must be a value of `FORWARD_NAT` or `REVERSE_NAT` from a lookup in this run.
#[inline(always)]
pub unsafe fn passes<const REFRESH: bool>(entry: *const pf_common::NatEntry) -> bool {
    let gate = unsafe { (*entry).gate };
    if gate == 0 {
        return true;
    }
    let Some(slot) = TRIGGER_GATES.get_ptr_mut(gate as u32) else {
        maps::count(GATE_CLOSED);
        return false;
    };
    // SAFETY: `slot` is a value of TRIGGER_GATES; aligned 8-byte loads and stores are atomic,
    // and concurrent pushes write nearly the same value, so no lock is needed.
    let open = unsafe { keep_open::<REFRESH>(slot, now_ns()) };
    if !open {
        maps::count(GATE_CLOSED);
    }
    open
}

/// If the gate is open at `now`, pushes its expiry when due (for a packet that `REFRESH`es)
/// and says so.
///
/// SAFETY: `slot` must be a value of `TRIGGER_GATES`.
#[inline(always)]
unsafe fn keep_open<const REFRESH: bool>(slot: *mut TriggerGate, now: u64) -> bool {
    unsafe {
        let expires = core::ptr::read_volatile(&raw const (*slot).expires_ns);
        let timeout = core::ptr::read_volatile(&raw const (*slot).timeout_ns);
        if timeout == 0 || now >= expires {
            return false;
        }
        // `expires - timeout` is when it was last pushed.
        if REFRESH && now + timeout >= expires + TRIGGER_REFRESH_NS {
            core::ptr::write_volatile(&raw mut (*slot).expires_ns, now + timeout);
        }
        true
    }
}

/// The trigger program's work on one packet from a tunnel client: `ETHERNET` says whether
/// frames on this interface start with an Ethernet header (a veth or tap) or with the IPv4
/// header (WireGuard, tun: no link layer).
#[inline(always)]
pub fn trigger<const ETHERNET: bool>(ctx: &TcContext) -> Trigger {
    let frame_len = ctx.len() as usize;
    let want = if frame_len < MAX_HEADERS_LEN {
        frame_len
    } else {
        MAX_HEADERS_LEN
    };
    if ctx.data_end() - ctx.data() < want && ctx.pull_data(want as u32).is_err() {
        return Trigger::NotTcpUdp;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let parsed = if ETHERNET {
        parse_ipv4(start, end, frame_len)
    } else {
        parse_ipv4_l3(start, end, frame_len)
    };
    let Ok(ip) = parsed else {
        return Trigger::NotTcpUdp;
    };
    if !is_tcp_udp(ip.proto) || ip.frags & IP_OFFSET_MASK != 0 {
        return Trigger::NotTcpUdp;
    }
    let Ok(ports) = parse_ports(start, end, &ip) else {
        return Trigger::NotTcpUdp;
    };
    // SAFETY: the parser bounds-checked both pointers.
    let (src_addr, dst_addr, [src_port, dst_port]) = unsafe {
        (
            wire::get4(&raw const (*ip.ip).src_addr),
            wire::get4(&raw const (*ip.ip).dst_addr),
            [
                wire::get2(&raw const (*ports.ports)[0]),
                wire::get2(&raw const (*ports.ports)[1]),
            ],
        )
    };
    // SAFETY: a map value, copied out at once.
    let Some(gate) =
        (unsafe { TRIGGER_PORTS.get(&EndpointKey::new(src_addr, dst_port, ip.proto)) }).copied()
    else {
        return Trigger::NoTrigger;
    };
    let Some(slot) = TRIGGER_GATES.get_ptr_mut(gate) else {
        return Trigger::NoTrigger;
    };
    let now = now_ns();
    // SAFETY: `slot` is a value of TRIGGER_GATES (see `passes`).
    unsafe {
        if keep_open::<true>(slot, now) {
            return Trigger::Refreshed;
        }
        let timeout = core::ptr::read_volatile(&raw const (*slot).timeout_ns);
        if timeout == 0 {
            // The rule is being removed.
            return Trigger::NoTrigger;
        }
        let previous = core::ptr::read_volatile(&raw const (*slot).expires_ns);
        core::ptr::write_volatile(&raw mut (*slot).expires_ns, now + timeout);
        let event = TriggerOpened {
            at_ns: now,
            previous_expires_ns: previous,
            gate,
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto: ip.proto,
            _pad: [0; 7],
        };
        if TRIGGER_EVENTS.output::<TriggerOpened>(&event, 0).is_err() {
            maps::count(TRIGGER_EVENTS_LOST);
        }
    }
    Trigger::Opened
}
