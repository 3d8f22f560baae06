//! The maps both programs share, all pinned by name under pf's bpffs directory so every attached
//! interface and every later `pf` command sees one state. Layouts: pf-common and ARCHITECTURE.md.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use pf_common::{
    EndpointKey, FragmentKey, FragmentValue, NatEntry, ReservationKey, ReservationValue,
    TunnelNetworks,
    counters::COUNTER_SLOTS,
    limits::{MAX_FORWARDS, MAX_REDIRECT_DEVICES, MAX_RESERVATIONS, MAX_TRACKED_DATAGRAMS},
};

/// Ingress: (public address, public port, protocol) -> tunnel address and port.
#[map]
pub static FORWARD_NAT: PerCpuHashMap<EndpointKey, NatEntry> =
    PerCpuHashMap::pinned(MAX_FORWARDS, BPF_F_NO_PREALLOC);

/// Egress: (tunnel address, tunnel port, protocol) -> public address and port.
#[map]
pub static REVERSE_NAT: PerCpuHashMap<EndpointKey, NatEntry> =
    PerCpuHashMap::pinned(MAX_FORWARDS, BPF_F_NO_PREALLOC);

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

/// Whether `addr` (network byte order) is in a tunnel network.
#[inline(always)]
pub fn is_tunnel_source(addr: [u8; 4]) -> bool {
    TUNNEL_NETWORKS.get(0).is_some_and(|t| t.contains(addr))
}

/// Global outcome counters, indexed by `pf_common::counters`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, and programs do not migrate CPUs while they run.
        unsafe { *counter += 1 };
    }
}
