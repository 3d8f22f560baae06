//! Indices of the global per-CPU counters in the `COUNTERS` array.
//!
//! Both programs classify every packet into exactly one outcome and count it, so the counters of a
//! direction always add up to the packets that direction saw.

/// Why a packet was left alone (or that it was rewritten). The same classification serves both
/// directions; `INGRESS_BASE` and `EGRESS_BASE` place each direction's block in the array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A TCP/UDP packet, or a fragment of a datagram, that matched a reservation and was
    /// rewritten.
    Rewritten = 0,
    /// An ICMP error about a forwarded flow, rewritten (RFC 5508): outer address, and the
    /// embedded packet's address and port.
    IcmpErrorRewritten = 1,
    /// IPv4 TCP/UDP, or an ICMP error about TCP/UDP, that matched no reservation: passed
    /// untouched.
    NoReservation = 2,
    /// Not IPv4 (ARP, IPv6, LLDP, ...): passed untouched.
    NotIpv4 = 3,
    /// More than one VLAN tag (QinQ): pf parses one tag only, so passed untouched.
    VlanStacked = 4,
    /// IPv4 carrying neither TCP, UDP nor an ICMP error about TCP/UDP (ICMP echo, GRE, ESP,
    /// ...): passed untouched.
    OtherProtocol = 5,
    /// A fragment pf cannot place: a later fragment of a datagram whose first fragment pf did
    /// not rewrite (or has not seen yet), or a fragmented ICMP message. Passed untouched.
    Fragment = 6,
    /// A header is cut short by the end of the frame or by the IP total length.
    Truncated = 7,
    /// IPv4 header that cannot be right (also inside an ICMP error): version not 4, IHL below 5,
    /// or a total length below the header length.
    BadIpHeader = 8,
    /// The rewrite itself failed (a kernel helper returned an error): passed as it was.
    RewriteFailed = 9,
    /// Egress only: an IPv4 packet pf did not rewrite whose source is in `TUNNEL_NETWORKS`
    /// (a reply on a connection whose reservation is gone, or any unmasqueraded tunnel
    /// address): dropped, so no tunnel address leaves the public interface.
    TunnelSourceDropped = 10,
    /// Ingress only: a packet to a reservation with limits that one of them refused (its
    /// source, or a rate): dropped (`XDP_DROP`), and counted per reservation and reason in
    /// `LIMIT_DROPS`.
    LimitDropped = 11,
}

/// Outcomes per direction.
pub const OUTCOMES: u32 = 12;
/// First counter of the XDP ingress program.
pub const INGRESS_BASE: u32 = 0;
/// First counter of the TC egress program.
pub const EGRESS_BASE: u32 = OUTCOMES;
/// What a fast path did with a packet. Two blocks use it: the ingress fast path
/// (`pf_ingress_fast`, `pf attach --fast-path`), where each packet the ingress program rewrote
/// moves exactly one of these besides its outcome; and the reply fast path (`pf_reply_fast`,
/// `pf attach --tunnel-side`), where every packet moves exactly one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastPath {
    /// The FIB had a route and a neighbour, and the egress device is in the program's device
    /// map: TTL decremented, Ethernet addresses set (and, for a reply, the source rewritten),
    /// sent with XDP_REDIRECT.
    Redirected = 0,
    /// `BPF_FIB_LKUP_RET_NO_NEIGH`: passed; the kernel resolves the neighbour and forwards.
    NoNeighbour = 1,
    /// `BPF_FIB_LKUP_RET_FRAG_NEEDED`: passed; the kernel fragments or answers
    /// fragmentation-needed.
    FragNeeded = 2,
    /// TTL 1 or 0: passed; the kernel answers time-exceeded.
    TtlExpired = 3,
    /// Any other FIB answer (a local address, blackhole, unreachable, prohibit, forwarding
    /// disabled, a lightweight tunnel): passed for the kernel to deal with.
    NotForwarded = 4,
    /// The route leaves by a device that is not in the program's device map: passed. At
    /// ingress, `REDIRECT_DEVICES` (an L3 device such as WireGuard or tun cannot take XDP
    /// frames); for a reply, `PUBLIC_DEVICES` (only public interfaces attached with
    /// `--fast-path` that can take XDP frames).
    NoRedirectDevice = 5,
    /// The frame carries a VLAN tag: passed, the kernel forwards it.
    VlanTagged = 6,
    /// Reply fast path only: not a whole TCP/UDP packet from a reservation's target (anything
    /// else the client sends, fragments, malformed packets): passed untouched. Never counted at
    /// ingress, whose outcome counters classify such packets.
    NotAReply = 7,
}

/// Fast-path outcomes.
pub const FAST_PATH_OUTCOMES: u32 = 8;
/// First counter of the ingress fast path.
pub const FAST_PATH_BASE: u32 = 2 * OUTCOMES;
/// First counter of the reply fast path.
pub const REPLY_FAST_PATH_BASE: u32 = FAST_PATH_BASE + FAST_PATH_OUTCOMES;
/// Egress's whole TCP/UDP rewrites done with the skb helpers, counted besides `rewritten`:
/// those whose checksum was not whole in the packet (`CHECKSUM_PARTIAL` from a sender with
/// checksum offload or a GRO'd packet, or `CHECKSUM_COMPLETE`), whose IPv4 header had options,
/// or whose headers were not all in the skb's linear data. Every other rewrite took one
/// store.
pub const EGRESS_BY_HELPERS: u32 = 2 * OUTCOMES + 2 * FAST_PATH_OUTCOMES;
/// What the trigger program (TC ingress on a tunnel-side interface) did with a packet: every
/// packet moves exactly one of these. It never changes or drops a packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// A trigger packet whose gate was closed: the gate is open now, and reported.
    Opened = 0,
    /// A trigger packet whose gate was open: its idle timeout starts again.
    Refreshed = 1,
    /// A whole TCP/UDP packet (or first fragment) to no trigger port of its source.
    NoTrigger = 2,
    /// Anything else (not IPv4, not TCP or UDP, a later fragment, a malformed or truncated
    /// header): passed without a lookup.
    NotTcpUdp = 3,
}

/// Trigger outcomes.
pub const TRIGGER_OUTCOMES: u32 = 4;
/// First counter of the trigger program.
pub const TRIGGER_BASE: u32 = EGRESS_BY_HELPERS + 1;
/// Packets that matched a NAT entry whose trigger gate was closed, either direction: handled as
/// no entry (their outcome says what that meant), and counted here besides.
pub const GATE_CLOSED: u32 = TRIGGER_BASE + TRIGGER_OUTCOMES;
/// Openings whose report found `TRIGGER_EVENTS` full (the gate opened all the same).
pub const TRIGGER_EVENTS_LOST: u32 = GATE_CLOSED + 1;
/// Entries in the `COUNTERS` per-CPU array.
pub const COUNTER_SLOTS: u32 = TRIGGER_EVENTS_LOST + 1;

impl Trigger {
    pub const ALL: [Trigger; TRIGGER_OUTCOMES as usize] = [
        Trigger::Opened,
        Trigger::Refreshed,
        Trigger::NoTrigger,
        Trigger::NotTcpUdp,
    ];

    /// The name `pf stats` prints.
    pub const fn name(self) -> &'static str {
        match self {
            Trigger::Opened => "opened",
            Trigger::Refreshed => "refreshed",
            Trigger::NoTrigger => "no_trigger",
            Trigger::NotTcpUdp => "not_tcp_udp",
        }
    }
}

impl FastPath {
    pub const ALL: [FastPath; FAST_PATH_OUTCOMES as usize] = [
        FastPath::Redirected,
        FastPath::NoNeighbour,
        FastPath::FragNeeded,
        FastPath::TtlExpired,
        FastPath::NotForwarded,
        FastPath::NoRedirectDevice,
        FastPath::VlanTagged,
        FastPath::NotAReply,
    ];

    /// The name `pf stats` prints.
    pub const fn name(self) -> &'static str {
        match self {
            FastPath::Redirected => "redirected",
            FastPath::NoNeighbour => "no_neighbour",
            FastPath::FragNeeded => "frag_needed",
            FastPath::TtlExpired => "ttl_expired",
            FastPath::NotForwarded => "not_forwarded",
            FastPath::NoRedirectDevice => "no_redirect_device",
            FastPath::VlanTagged => "vlan_tagged",
            FastPath::NotAReply => "not_a_reply",
        }
    }
}

impl Outcome {
    pub const ALL: [Outcome; OUTCOMES as usize] = [
        Outcome::Rewritten,
        Outcome::IcmpErrorRewritten,
        Outcome::NoReservation,
        Outcome::NotIpv4,
        Outcome::VlanStacked,
        Outcome::OtherProtocol,
        Outcome::Fragment,
        Outcome::Truncated,
        Outcome::BadIpHeader,
        Outcome::RewriteFailed,
        Outcome::TunnelSourceDropped,
        Outcome::LimitDropped,
    ];

    /// Whether the program of a direction (ingress: `true`) can have this outcome: `TunnelSourceDropped` is
    /// egress's alone, `LimitDropped` ingress's.
    pub const fn seen_at(self, ingress: bool) -> bool {
        match self {
            Outcome::TunnelSourceDropped => !ingress,
            Outcome::LimitDropped => ingress,
            _ => true,
        }
    }

    /// The name `pf stats` prints.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Rewritten => "rewritten",
            Outcome::IcmpErrorRewritten => "icmp_error_rewritten",
            Outcome::NoReservation => "no_reservation",
            Outcome::NotIpv4 => "not_ipv4",
            Outcome::VlanStacked => "vlan_stacked",
            Outcome::OtherProtocol => "other_protocol",
            Outcome::Fragment => "fragment",
            Outcome::Truncated => "truncated",
            Outcome::BadIpHeader => "bad_ip_header",
            Outcome::RewriteFailed => "rewrite_failed",
            Outcome::TunnelSourceDropped => "tunnel_source_dropped",
            Outcome::LimitDropped => "limit_dropped",
        }
    }
}
