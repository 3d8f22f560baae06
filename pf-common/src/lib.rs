//! Types shared by pf's eBPF programs and its userspace: map keys and values, counter indices,
//! limits, and the checksum arithmetic the data plane applies to every rewritten packet.
//!
//! Every map type is `#[repr(C)]`, holds addresses and ports in network byte order exactly as
//! they appear on the wire, and has no implicit padding: the bytemuck `Pod` derive refuses to
//! compile a type with padding, and the size assertions below pin the layouts that userspace and
//! the kernel programs must agree on.
#![no_std]

pub mod checksum;
pub mod counters;
pub mod limits;

use bytemuck::{Pod, Zeroable};

/// IANA protocol numbers that pf forwards.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// ICMP: pf rewrites the errors (destination unreachable, time exceeded, parameter problem)
/// that are about a forwarded flow.
pub const IPPROTO_ICMP: u8 = 1;

/// One side of a forward: an IPv4 address, a port and a protocol, as the packet carries them.
///
/// In `FORWARD_NAT` it is the public endpoint (a packet's destination); in `REVERSE_NAT` it is the
/// tunnel endpoint (a reply's source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct EndpointKey {
    /// IPv4 address, network byte order.
    pub addr: [u8; 4],
    /// TCP or UDP port, network byte order.
    pub port: [u8; 2],
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Always zero: the kernel hashes all eight key bytes.
    pub _pad: u8,
}

impl EndpointKey {
    #[inline(always)]
    pub const fn new(addr: [u8; 4], port: [u8; 2], proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            _pad: 0,
        }
    }
}

/// What an endpoint is rewritten to, plus this entry's traffic counters.
///
/// Both NAT maps are plain hashes: one value per entry whatever the CPU count, so memory and
/// insert cost do not grow with the server. The programs add to `packets` and `bytes` with
/// atomic adds (a flow stays on one CPU, so two CPUs meet on one entry only when one port
/// carries many flows at once); the counters are exact.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct NatEntry {
    /// IPv4 address written into the packet, network byte order.
    pub addr: [u8; 4],
    /// Port written into the packet, network byte order.
    pub port: [u8; 2],
    /// The port-triggering gate this entry waits on (an index of `TRIGGER_GATES`, host
    /// order), or 0 for none: an entry with a gate forwards only while the gate is open, and
    /// is otherwise handled as no entry at all. Written by userspace only.
    pub gate: u16,
    /// The reservation's limits (an index of `LIMITS`, host order), or 0 for none: a packet
    /// over a limit, or from a source the limits refuse, is dropped at ingress. Set on forward
    /// entries only; written by userspace only.
    pub limit: u16,
    pub _pad: [u8; 6],
    /// Packets rewritten through this entry.
    pub packets: u64,
    /// IPv4 bytes (the IP total length) of those packets.
    pub bytes: u64,
}

impl NatEntry {
    pub const fn new(addr: [u8; 4], port: [u8; 2]) -> Self {
        Self {
            addr,
            port,
            gate: 0,
            limit: 0,
            _pad: [0; 6],
            packets: 0,
            bytes: 0,
        }
    }
}

/// A port-triggering gate (`TRIGGER_GATES`, indexed by `NatEntry::gate`): the NAT entries of
/// a trigger rule's open range forward while `now < expires_ns` (`bpf_ktime_get_ns`, the
/// monotonic clock). The trigger program opens it when the rule's client sends to a trigger
/// port, and every packet through an open gate (either direction, or another trigger packet)
/// pushes the expiry to `now + timeout_ns`: the idle timeout. Nothing closes it but time, so
/// closing never waits for userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TriggerGate {
    /// When the opening lapses, in `bpf_ktime_get_ns` nanoseconds; 0 never opened.
    pub expires_ns: u64,
    /// The rule's idle timeout in nanoseconds; 0 means the slot holds no rule, and nothing
    /// opens it.
    pub timeout_ns: u64,
}

/// An opening, as the trigger program reports it to `pf serve` (`TRIGGER_EVENTS`): which gate,
/// when, the expiry it replaced (when the previous opening lapsed), and the packet that opened
/// it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TriggerOpened {
    /// `bpf_ktime_get_ns` at the trigger packet.
    pub at_ns: u64,
    /// The gate's expiry before (0: never opened before).
    pub previous_expires_ns: u64,
    /// The gate (`NatEntry::gate`).
    pub gate: u32,
    /// The trigger packet's source and destination, network byte order.
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 7],
}

/// One rate of a reservation's limits, kept as GCRA (the generic cell rate algorithm, a token
/// bucket written as one "theoretical arrival time"): a packet that arrives at `now` conforms
/// when `tat_ns <= now + burst_ns`, and a conforming packet moves `tat_ns` on by its cost
/// (from `now`, if `tat_ns` had fallen behind it). One shared word per rate, whatever the CPU
/// count: see `pf-ebpf/src/limit.rs` for how CPUs share it and the error that allows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RateLimit {
    /// The theoretical arrival time, in the programs' clock's nanoseconds. Written by the
    /// programs (userspace writes 0: a full bucket).
    pub tat_ns: u64,
    /// Nanoseconds one unit (a packet, a byte, a SYN) costs, times 2^16
    /// (`LIMIT_COST_SHIFT`); 0 means no limit of this kind.
    pub cost: u64,
    /// How far ahead of now `tat_ns` may run: the burst a full bucket lets through, in time.
    pub burst_ns: u64,
}

/// Fixed-point shift of `RateLimit::cost`: 2^16 steps per nanosecond keeps 100 Gbit/s (0.08
/// ns a byte) within 0.02% while a day's worth of 1 bit/s cost stays far inside `u64`.
pub const LIMIT_COST_SHIFT: u32 = 16;

/// `Limit::sources`: whether the reservation's source networks in `LIMIT_SOURCES` are the only
/// ones let in, the ones kept out, or not consulted.
pub mod source_list {
    pub const NONE: u32 = 0;
    pub const ALLOW: u32 = 1;
    pub const DENY: u32 = 2;
}

/// A reservation's limits (`LIMITS`, indexed by `NatEntry::limit`): inbound packets per
/// second, inbound bits per second (counted as IP total length), new TCP connections (SYN
/// without ACK) per second, and a source list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Limit {
    pub packets: RateLimit,
    /// Cost per byte of IP total length.
    pub bytes: RateLimit,
    pub syns: RateLimit,
    /// `source_list::NONE`, `ALLOW` or `DENY`.
    pub sources: u32,
    pub _pad: u32,
}

/// Why a limit dropped a packet: the index into `LimitDrops::by_reason`. Checked in this
/// order, and a packet is charged to no rate unless it passes all.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitDrop {
    /// Its source is not on the allow-list, or is on the deny-list.
    Source = 0,
    /// A TCP SYN over the new-connection rate.
    Syn = 1,
    /// Over the packet rate.
    Packets = 2,
    /// Over the bit rate.
    Bits = 3,
}

pub const LIMIT_DROP_REASONS: usize = 4;

impl LimitDrop {
    pub const ALL: [LimitDrop; LIMIT_DROP_REASONS] = [
        LimitDrop::Source,
        LimitDrop::Syn,
        LimitDrop::Packets,
        LimitDrop::Bits,
    ];

    /// The name the CLI, the API and the metrics use.
    pub const fn name(self) -> &'static str {
        match self {
            LimitDrop::Source => "source",
            LimitDrop::Syn => "syn_rate",
            LimitDrop::Packets => "packet_rate",
            LimitDrop::Bits => "bit_rate",
        }
    }
}

/// A reservation's drops, per CPU (`LIMIT_DROPS`, indexed as `LIMITS`): a flood is counted
/// without CPUs contending on one line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LimitDrops {
    pub by_reason: [u64; LIMIT_DROP_REASONS],
}

/// The data of a `LIMIT_SOURCES` key (an LPM trie): the limit slot, big-endian so the slot's
/// 32 bits are the prefix every entry of it shares, then the source network. A network
/// `a.b.c.d/n` of slot `s` is stored with prefix length `32 + n`; a packet is looked up with
/// 64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SourceNet {
    pub slot: [u8; 4],
    pub addr: [u8; 4],
}

/// Protocol set of a reservation, as a bit mask.
pub const PROTO_MASK_TCP: u8 = 1;
pub const PROTO_MASK_UDP: u8 = 2;

/// Key of a reservation record: where its public range starts and which protocols it covers.
///
/// Two reservations never overlap, so the first port and the protocol set identify one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ReservationKey {
    /// Public IPv4 address, network byte order.
    pub public_addr: [u8; 4],
    /// First public port of the range, network byte order.
    pub first_port: [u8; 2],
    /// `PROTO_MASK_TCP`, `PROTO_MASK_UDP` or both.
    pub protocols: u8,
    pub _pad: u8,
}

/// A reservation record: the rest of what `pf reserve` was asked. Only userspace reads these; the
/// programs work from the per-port entries in the NAT maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ReservationValue {
    /// Tunnel IPv4 address, network byte order.
    pub target_addr: [u8; 4],
    /// Last public port of the range (equal to the first for a single port), network byte order.
    pub last_port: [u8; 2],
    /// Target port of the first public port; the range maps one to one from here.
    pub target_first_port: [u8; 2],
}

/// One tunnel network: an address and its mask, network byte order, compared as
/// `source & mask == addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TunnelNetwork {
    pub addr: [u8; 4],
    pub mask: [u8; 4],
}

/// The one value of `TUNNEL_NETWORKS`: the networks whose addresses must never leave the public
/// interface as the source of a packet pf did not rewrite (a reply on a connection whose
/// reservation is gone would otherwise leak the client's tunnel address). A handful at most,
/// scanned in order: cheaper than an LPM trie for what every unrewritten egress packet pays.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TunnelNetworks {
    /// How many of `networks` are in use; 0 turns the guard off.
    pub count: u32,
    pub networks: [TunnelNetwork; limits::MAX_TUNNEL_NETWORKS],
}

impl TunnelNetworks {
    /// Whether `addr` (network byte order) is in one of the networks.
    #[inline(always)]
    pub fn contains(&self, addr: [u8; 4]) -> bool {
        let addr = u32::from_ne_bytes(addr);
        let mut i = 0;
        while i < limits::MAX_TUNNEL_NETWORKS {
            if i as u32 >= self.count {
                return false;
            }
            let net = &self.networks[i];
            if addr & u32::from_ne_bytes(net.mask) == u32::from_ne_bytes(net.addr) {
                return true;
            }
            i += 1;
        }
        false
    }
}

const _: () = assert!(core::mem::size_of::<EndpointKey>() == 8);
const _: () =
    assert!(core::mem::size_of::<TunnelNetworks>() == 4 + 8 * limits::MAX_TUNNEL_NETWORKS);
const _: () = assert!(core::mem::size_of::<NatEntry>() == 32);
const _: () = assert!(core::mem::size_of::<ReservationKey>() == 8);
const _: () = assert!(core::mem::size_of::<ReservationValue>() == 8);
const _: () = assert!(core::mem::size_of::<TraceConfig>() == 8);
const _: () = assert!(core::mem::size_of::<TraceEvent>() == 28);
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 12);
const _: () = assert!(core::mem::size_of::<FragmentValue>() == 8);
const _: () = assert!(core::mem::size_of::<TriggerGate>() == 16);
const _: () = assert!(core::mem::size_of::<TriggerOpened>() == 40);
const _: () = assert!(core::mem::size_of::<Limit>() == 80);
const _: () = assert!(core::mem::size_of::<LimitDrops>() == 32);
const _: () = assert!(core::mem::size_of::<SourceNet>() == 8);

/// Which program tracks a fragmented datagram, in `FragmentKey::direction`.
pub const FRAGMENT_INGRESS: u8 = 0;
pub const FRAGMENT_EGRESS: u8 = 1;

/// A fragmented datagram in flight, as its fragments carry it before any rewrite: RFC 791
/// identifies a datagram by (source, destination, protocol, identification). Only the first
/// fragment carries ports, so when it is rewritten its program records the datagram here, and the
/// later fragments find their NAT entry through it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragmentKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// IPv4 identification, network byte order.
    pub id: [u8; 2],
    pub proto: u8,
    /// `FRAGMENT_INGRESS` or `FRAGMENT_EGRESS`: both programs share one map.
    pub direction: u8,
}

/// The NAT map key the datagram's first fragment matched (in `FORWARD_NAT` for ingress, in
/// `REVERSE_NAT` for egress). Later fragments look the entry up again, so they are counted with
/// the reservation and stop being rewritten the moment it is released.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragmentValue {
    pub nat_key: EndpointKey,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is #[repr(C)], Pod (so every bit pattern is valid) and has no padding.
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::NatEntry {}
    unsafe impl aya::Pod for super::ReservationKey {}
    unsafe impl aya::Pod for super::ReservationValue {}
    unsafe impl aya::Pod for super::FragmentKey {}
    unsafe impl aya::Pod for super::FragmentValue {}
    unsafe impl aya::Pod for super::TunnelNetworks {}
    unsafe impl aya::Pod for super::TraceConfig {}
    unsafe impl aya::Pod for super::TriggerGate {}
    unsafe impl aya::Pod for super::TriggerOpened {}
    unsafe impl aya::Pod for super::Limit {}
    unsafe impl aya::Pod for super::LimitDrops {}
    unsafe impl aya::Pod for super::SourceNet {}
}

/// Which block of `PORTS_IN_USE` a (direction, protocol) counts in: forward (public) ports
/// first, then reverse (target) ports, TCP before UDP in each.
pub const PORT_USE_FORWARD_TCP: u32 = 0;
pub const PORT_USE_FORWARD_UDP: u32 = 1;
pub const PORT_USE_REVERSE_TCP: u32 = 2;
pub const PORT_USE_REVERSE_UDP: u32 = 3;
/// Slots of `PORTS_IN_USE`: one per port in each of the four blocks.
pub const PORT_USE_SLOTS: u32 = 4 * 65_536;

/// The `PORTS_IN_USE` slot of a port (network byte order) of `proto` in one direction: the
/// forward block counts public ports (`FORWARD_NAT` keys), the reverse block target ports
/// (`REVERSE_NAT` keys).
#[inline(always)]
pub fn port_use_slot(reverse: bool, proto: u8, port: [u8; 2]) -> u32 {
    let block = match (reverse, proto == IPPROTO_UDP) {
        (false, false) => PORT_USE_FORWARD_TCP,
        (false, true) => PORT_USE_FORWARD_UDP,
        (true, false) => PORT_USE_REVERSE_TCP,
        (true, true) => PORT_USE_REVERSE_UDP,
    };
    block * 65_536 + u16::from_be_bytes(port) as u32
}

/// `TRACE_CONFIG`: whether the programs report their decisions to `pf trace`, and for which
/// port. Checked once per packet, after the decision is made.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceConfig {
    /// Nonzero: report.
    pub enabled: u32,
    /// Report only packets with this port as source or destination (network byte order);
    /// zero: every packet.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// Which program reported a `TraceEvent`.
pub mod trace_hook {
    pub const INGRESS: u8 = 0;
    pub const EGRESS: u8 = 1;
    pub const REPLY_FAST_PATH: u8 = 2;
}

/// `fast` of a `TraceEvent` that did not try a fast path.
pub const TRACE_NO_FAST_PATH: u8 = 0xff;

/// A packet's IPv4 addresses and TCP/UDP ports, as a `TraceEvent` carries them (zero where the
/// packet has none: not IPv4, a later fragment, not TCP or UDP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceEndpoints {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
}

/// One decision, as `pf trace` shows it: the program, its outcome (`counters::Outcome`, or for
/// the reply fast path `counters::FastPath`), the fast path's outcome if it tried one, and the
/// packet's protocol and endpoints before and after the program (they differ where it
/// rewrote them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceEvent {
    pub hook: u8,
    pub outcome: u8,
    pub fast: u8,
    pub proto: u8,
    pub before: TraceEndpoints,
    pub after: TraceEndpoints,
}

/// The kinds of BPF map pf declares (their `bpf_map_type` numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MapKind {
    Hash = 1,
    Array = 2,
    PerCpuArray = 6,
    LruHash = 9,
    LpmTrie = 11,
    DevMapHash = 25,
    RingBuf = 27,
}

/// One map's shape: what the kernel is told when pf-ebpf declares it, and what userspace
/// checks a pinned map against before it reads or writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// `struct bpf_devmap_val`: the ifindex and a program fd/id.
pub const DEVMAP_VALUE_SIZE: u32 = 8;

/// Every map of pf, once: pf-ebpf's declarations are checked against this table (a host test
/// parses the built object), userspace's layout check reads it, and ARCHITECTURE.md's map
/// table is checked against it. In `map_names::ALL` order.
pub const MAP_SHAPES: [MapShape; map_names::COUNT] = {
    use core::mem::size_of;
    use counters::COUNTER_SLOTS;
    use limits::*;
    [
        MapShape {
            name: map_names::FORWARD_NAT,
            kind: MapKind::Hash,
            key_size: size_of::<EndpointKey>() as u32,
            value_size: size_of::<NatEntry>() as u32,
            max_entries: MAX_FORWARDS,
        },
        MapShape {
            name: map_names::REVERSE_NAT,
            kind: MapKind::Hash,
            key_size: size_of::<EndpointKey>() as u32,
            value_size: size_of::<NatEntry>() as u32,
            max_entries: MAX_FORWARDS,
        },
        MapShape {
            name: map_names::RESERVATIONS,
            kind: MapKind::Hash,
            key_size: size_of::<ReservationKey>() as u32,
            value_size: size_of::<ReservationValue>() as u32,
            max_entries: MAX_RESERVATIONS,
        },
        MapShape {
            name: map_names::COUNTERS,
            kind: MapKind::PerCpuArray,
            key_size: 4,
            value_size: 8,
            max_entries: COUNTER_SLOTS,
        },
        MapShape {
            name: map_names::FRAGMENTS,
            kind: MapKind::LruHash,
            key_size: size_of::<FragmentKey>() as u32,
            value_size: size_of::<FragmentValue>() as u32,
            max_entries: MAX_TRACKED_DATAGRAMS,
        },
        MapShape {
            name: map_names::REDIRECT_DEVICES,
            kind: MapKind::DevMapHash,
            key_size: 4,
            value_size: DEVMAP_VALUE_SIZE,
            max_entries: MAX_REDIRECT_DEVICES,
        },
        MapShape {
            name: map_names::PUBLIC_DEVICES,
            kind: MapKind::DevMapHash,
            key_size: 4,
            value_size: DEVMAP_VALUE_SIZE,
            max_entries: MAX_REDIRECT_DEVICES,
        },
        MapShape {
            name: map_names::TUNNEL_NETWORKS,
            kind: MapKind::Array,
            key_size: 4,
            value_size: size_of::<TunnelNetworks>() as u32,
            max_entries: 1,
        },
        MapShape {
            name: map_names::PORTS_IN_USE,
            kind: MapKind::Array,
            key_size: 4,
            value_size: 4,
            max_entries: PORT_USE_SLOTS,
        },
        MapShape {
            name: map_names::TRACE_CONFIG,
            kind: MapKind::Array,
            key_size: 4,
            value_size: size_of::<TraceConfig>() as u32,
            max_entries: 1,
        },
        MapShape {
            name: map_names::TRACE_EVENTS,
            kind: MapKind::RingBuf,
            key_size: 0,
            value_size: 0,
            max_entries: TRACE_RING_BYTES,
        },
        MapShape {
            name: map_names::TRIGGER_PORTS,
            kind: MapKind::Hash,
            key_size: size_of::<EndpointKey>() as u32,
            value_size: 4,
            max_entries: MAX_TRIGGER_PORTS,
        },
        MapShape {
            name: map_names::TRIGGER_GATES,
            kind: MapKind::Array,
            key_size: 4,
            value_size: size_of::<TriggerGate>() as u32,
            max_entries: MAX_TRIGGER_GATES,
        },
        MapShape {
            name: map_names::TRIGGER_EVENTS,
            kind: MapKind::RingBuf,
            key_size: 0,
            value_size: 0,
            max_entries: TRIGGER_RING_BYTES,
        },
        MapShape {
            name: map_names::LIMITS,
            kind: MapKind::Array,
            key_size: 4,
            value_size: size_of::<Limit>() as u32,
            max_entries: MAX_LIMITS,
        },
        MapShape {
            name: map_names::LIMIT_DROPS,
            kind: MapKind::PerCpuArray,
            key_size: 4,
            value_size: size_of::<LimitDrops>() as u32,
            max_entries: MAX_LIMITS,
        },
        MapShape {
            name: map_names::LIMIT_SOURCES,
            kind: MapKind::LpmTrie,
            key_size: 4 + size_of::<SourceNet>() as u32,
            value_size: 1,
            max_entries: MAX_LIMIT_SOURCES,
        },
    ]
};

/// Names of the maps, as declared in pf-ebpf and pinned under pf's bpffs directory.
pub mod map_names {
    pub const FORWARD_NAT: &str = "FORWARD_NAT";
    pub const REVERSE_NAT: &str = "REVERSE_NAT";
    pub const RESERVATIONS: &str = "RESERVATIONS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const REDIRECT_DEVICES: &str = "REDIRECT_DEVICES";
    pub const PUBLIC_DEVICES: &str = "PUBLIC_DEVICES";
    pub const TUNNEL_NETWORKS: &str = "TUNNEL_NETWORKS";
    pub const PORTS_IN_USE: &str = "PORTS_IN_USE";
    pub const TRACE_CONFIG: &str = "TRACE_CONFIG";
    pub const TRACE_EVENTS: &str = "TRACE_EVENTS";
    pub const TRIGGER_PORTS: &str = "TRIGGER_PORTS";
    pub const TRIGGER_GATES: &str = "TRIGGER_GATES";
    pub const TRIGGER_EVENTS: &str = "TRIGGER_EVENTS";
    pub const LIMITS: &str = "LIMITS";
    pub const LIMIT_DROPS: &str = "LIMIT_DROPS";
    pub const LIMIT_SOURCES: &str = "LIMIT_SOURCES";
    /// How many maps pf has.
    pub const COUNT: usize = 17;
    pub const ALL: [&str; COUNT] = [
        FORWARD_NAT,
        REVERSE_NAT,
        RESERVATIONS,
        COUNTERS,
        FRAGMENTS,
        REDIRECT_DEVICES,
        PUBLIC_DEVICES,
        TUNNEL_NETWORKS,
        PORTS_IN_USE,
        TRACE_CONFIG,
        TRACE_EVENTS,
        TRIGGER_PORTS,
        TRIGGER_GATES,
        TRIGGER_EVENTS,
        LIMITS,
        LIMIT_DROPS,
        LIMIT_SOURCES,
    ];
}
