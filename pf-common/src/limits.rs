//! Every size limit of pf, in one place (Katran keeps its limits the same way).

/// Entries in each NAT map (`FORWARD_NAT`, `REVERSE_NAT`): one per public port and protocol.
/// Sized for 1M forwarded ports, e.g. 16 public IPs with every port reserved for both protocols.
/// The maps are created with `BPF_F_NO_PREALLOC`, so an empty map costs nothing.
pub const MAX_FORWARDS: u32 = 1 << 20;

/// Reservation records: at most one per forwarded port.
pub const MAX_RESERVATIONS: u32 = MAX_FORWARDS;

/// The widest range one reservation may cover. A range is added entry by entry, all or nothing;
/// the bound keeps one command's work (and a typo's damage) small.
pub const MAX_RANGE_PORTS: u32 = 4096;

/// Fragmented datagrams tracked at once, both directions together (an LRU map: the oldest is
/// forgotten first). An entry is needed only while a datagram's fragments are in flight,
/// milliseconds, so this covers a heavy fragment load; the map is preallocated (about 1 MB).
pub const MAX_TRACKED_DATAGRAMS: u32 = 16_384;

/// Devices the fast paths may redirect to (`REDIRECT_DEVICES` and `PUBLIC_DEVICES`, keyed by
/// ifindex).
pub const MAX_REDIRECT_DEVICES: u32 = 256;

/// Tunnel networks the egress program keeps from leaving the public interface as an
/// unrewritten source (`TUNNEL_NETWORKS`).
pub const MAX_TUNNEL_NETWORKS: usize = 16;

/// Bytes of `TRACE_EVENTS`, the ring buffer `pf trace` reads (a power of two, a multiple of the
/// page size): about 14,500 events of 28 bytes (with the ring's 8-byte headers). Events that find it
/// full are dropped; a trace is for a person watching a few flows, not for a flood.
pub const TRACE_RING_BYTES: u32 = 1 << 19;

/// Port-triggering gates (`TRIGGER_GATES`, an array indexed by `NatEntry::gate`, a `u16`):
/// slot 0 means "no gate", so 65,535 trigger rules. Preallocated: 1 MB.
pub const MAX_TRIGGER_GATES: u32 = 1 << 16;

/// Trigger ports (`TRIGGER_PORTS`: one entry per client, protocol and port of a rule's trigger
/// range).
pub const MAX_TRIGGER_PORTS: u32 = 1 << 16;

/// An open gate's expiry is pushed forward by a packet only when this much of its idle
/// timeout has passed since the last push, so a busy flow writes the shared gate at most once
/// a second instead of on every packet (and on every CPU). A gate may so close up to this much
/// before a full timeout of idleness.
pub const TRIGGER_REFRESH_NS: u64 = 1_000_000_000;

/// Bytes of `TRIGGER_EVENTS`, the ring of openings `pf serve` reads: about 1,300 events of
/// 40 bytes (with the ring's headers). An opening that finds it full still opens the gate; the
/// event is lost and counted (`trigger_events_lost`), and the service finds the gate open when it
/// next looks.
pub const TRIGGER_RING_BYTES: u32 = 1 << 16;

/// The longest idle timeout a trigger rule may have: a day. Bounded so `now + timeout` in the
/// programs can never wrap.
pub const MAX_TRIGGER_IDLE_NS: u64 = 86_400 * 1_000_000_000;

/// Reservations with limits (`LIMITS` and `LIMIT_DROPS`, indexed by `NatEntry::limit`; slot 0
/// means "no limits"): 16,383. `LIMITS` is 80 bytes a slot (1.3 MB); `LIMIT_DROPS` is per
/// CPU, 32 bytes a slot (512 KB per CPU).
pub const MAX_LIMITS: u32 = 1 << 14;

/// Source networks of all reservations' allow- and deny-lists together (`LIMIT_SOURCES`, an
/// LPM trie, allocated as used).
pub const MAX_LIMIT_SOURCES: u32 = 1 << 16;

/// Source networks one reservation's list may have.
pub const MAX_SOURCES_PER_LIMIT: usize = 256;

/// The burst a rate limit lets through from a full bucket, as time at its rate: 100 ms (so a
/// limit of 1,000 packets/s passes a burst of 101 packets). Under a flood longer than a second
/// the burst is within 10% of what a limit admits.
pub const LIMIT_BURST_NS: u64 = 100_000_000;
