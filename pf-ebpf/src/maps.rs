//! The maps both programs share, all pinned by name under pf's bpffs directory so every attached
//! interface and every later `pf` command sees one state. Layouts: pf-common and ARCHITECTURE.md.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use pf_common::{
    EndpointKey, FragmentKey, FragmentValue, NatEntry, PORT_USE_SLOTS, ReservationKey,
    ReservationValue, TunnelNetworks,
    counters::{COUNTER_SLOTS, Outcome},
    limits::{MAX_FORWARDS, MAX_REDIRECT_DEVICES, MAX_RESERVATIONS, MAX_TRACKED_DATAGRAMS},
};

/// Ingress: (public address, public port, protocol) -> tunnel address and port. A plain hash,
/// not a per-CPU one: an entry costs the same on 2 CPUs as on 128 (see `NatEntry`).
#[map]
pub static FORWARD_NAT: HashMap<EndpointKey, NatEntry> =
    HashMap::pinned(MAX_FORWARDS, BPF_F_NO_PREALLOC);

/// Egress: (tunnel address, tunnel port, protocol) -> public address and port.
#[map]
pub static REVERSE_NAT: HashMap<EndpointKey, NatEntry> =
    HashMap::pinned(MAX_FORWARDS, BPF_F_NO_PREALLOC);

/// The reservation records behind the NAT entries. Read only by userspace; declared here so it is
/// created and pinned with the others.
#[map]
pub static RESERVATIONS: HashMap<ReservationKey, ReservationValue> =
    HashMap::pinned(MAX_RESERVATIONS, BPF_F_NO_PREALLOC);

/// Fragmented datagrams whose first fragment was rewritten, both directions: the later
/// fragments carry no ports and find their NAT entry here. LRU, so stale entries age out; shared
/// across CPUs, since a datagram's fragments may arrive on different ones.
#[map]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> =
    LruHashMap::pinned(MAX_TRACKED_DATAGRAMS, 0);

/// The devices the ingress fast path may redirect to, keyed by ifindex: only devices that can
/// take XDP frames (`ndo_xdp_xmit`). Filled by userspace.
#[map]
pub static REDIRECT_DEVICES: DevMapHash = DevMapHash::pinned(MAX_REDIRECT_DEVICES, 0);

/// The devices the reply fast path may redirect to: the public interfaces attached with
/// `--fast-path` that can take XDP frames. A reply routed anywhere else is left to the kernel.
#[map]
pub static PUBLIC_DEVICES: DevMapHash = DevMapHash::pinned(MAX_REDIRECT_DEVICES, 0);

/// The tunnel networks whose addresses egress never lets out unrewritten (one value; filled by
/// `pf serve` from its policy, empty otherwise).
#[map]
pub static TUNNEL_NETWORKS: Array<TunnelNetworks> = Array::pinned(1, 0);

/// How many NAT entries use each port, per direction and protocol (`pf_common::port_use_slot`).
/// Checked before the hash lookup: a packet to or from a port no entry uses (WireGuard's own
/// UDP, SSH, anything on a VPN server that is not forwarded) is a miss for the price of an array
/// read, instead of a hash lookup. Written only by userspace, counts up before an entry is
/// added and down after it is removed, so a count is never below its entries.
#[map]
pub static PORTS_IN_USE: Array<u32> = Array::pinned(PORT_USE_SLOTS, 0);

/// Whether any NAT entry of this direction uses `port` (network byte order) with `proto`.
#[inline(always)]
pub fn port_in_use(reverse: bool, proto: u8, port: [u8; 2]) -> bool {
    PORTS_IN_USE
        .get(pf_common::port_use_slot(reverse, proto, port))
        .is_some_and(|n| *n != 0)
}

/// Whether `addr` (network byte order) is in a tunnel network.
#[inline(always)]
pub fn is_tunnel_source(addr: [u8; 4]) -> bool {
    TUNNEL_NETWORKS.get(0).is_some_and(|t| t.contains(addr))
}

/// Global outcome counters, indexed by `pf_common::counters`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

/// The `FORWARD_NAT` entry for `key`, if it exists and may forward now (no trigger gate, or
/// an open one: `trigger::passes`). A packet of the flow (`REFRESH`) keeps an open gate open;
/// an ICMP error about it passes but does not.
#[inline(always)]
pub fn forward_entry<const REFRESH: bool>(key: &EndpointKey) -> Option<*mut NatEntry> {
    let entry = FORWARD_NAT.get_ptr_mut(key)?;
    // SAFETY: a value of FORWARD_NAT from this lookup.
    unsafe { crate::trigger::passes::<REFRESH>(entry) }.then_some(entry)
}

/// The `FORWARD_NAT` entry an inbound packet of the flow to `key` goes through, as
/// [`forward_entry::<true>`], with the entry's limits (`admit`) deciding before the packet
/// keeps an open gate open: a flood the limits drop must not hold a trigger rule's ports
/// open. An entry without limits costs what [`forward_entry`] does.
///
/// SAFETY: `admit` is handed a value of `FORWARD_NAT` from this lookup.
#[inline(always)]
pub unsafe fn forward_entry_admitted(
    key: &EndpointKey,
    admit: impl FnOnce(*const NatEntry) -> bool,
) -> Result<*mut NatEntry, Outcome> {
    use crate::trigger::passes;
    let entry = FORWARD_NAT.get_ptr_mut(key).ok_or(Outcome::NoReservation)?;
    // SAFETY (each use of `entry`): a value of FORWARD_NAT from this lookup.
    unsafe {
        if (*entry).limit == 0 {
            return if passes::<true>(entry) {
                Ok(entry)
            } else {
                Err(Outcome::NoReservation)
            };
        }
        if !passes::<false>(entry) {
            return Err(Outcome::NoReservation);
        }
        if !admit(entry) {
            return Err(Outcome::LimitDropped);
        }
        if (*entry).gate != 0 {
            passes::<true>(entry);
        }
    }
    Ok(entry)
}

/// The `REVERSE_NAT` entry for `key`, as [`forward_entry`].
#[inline(always)]
pub fn reverse_entry<const REFRESH: bool>(key: &EndpointKey) -> Option<*mut NatEntry> {
    let entry = REVERSE_NAT.get_ptr_mut(key)?;
    // SAFETY: a value of REVERSE_NAT from this lookup.
    unsafe { crate::trigger::passes::<REFRESH>(entry) }.then_some(entry)
}

/// Adds one packet of `ip_len` bytes to a NAT entry's counters. The entry is shared by every
/// CPU, so the adds are atomic; their results are unused, which compiles to BPF's plain atomic
/// add (`lock add` on x86), which every kernel pf supports has.
///
/// SAFETY: `entry` must be a value of `FORWARD_NAT` or `REVERSE_NAT` from a lookup in this run.
#[inline(always)]
pub unsafe fn count_nat(entry: *mut NatEntry, ip_len: u16) {
    use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};
    unsafe {
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*entry).packets, 1);
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*entry).bytes, ip_len as u64);
    }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, and programs do not migrate CPUs while they run.
        unsafe { *counter += 1 };
    }
}
