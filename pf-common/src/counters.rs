//! Indices of the global per-CPU counters in the `COUNTERS` array.
//!
//! Both programs classify every packet into exactly one outcome and count it, so the counters of a
//! direction always add up to the packets that direction saw.

/// Why a packet was left alone (or that it was rewritten). The same classification serves both
/// directions; `INGRESS_BASE` and `EGRESS_BASE` place each direction's block in the array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Matched a reservation and was rewritten.
    Rewritten = 0,
    /// IPv4 TCP/UDP that matched no reservation: passed untouched.
    NoReservation = 1,
    /// Not IPv4 (ARP, IPv6, LLDP, ...): passed untouched.
    NotIpv4 = 2,
    /// More than one VLAN tag (QinQ): pf parses one tag only, so passed untouched.
    VlanStacked = 3,
    /// IPv4 but neither TCP nor UDP (ICMP, GRE, ESP, ...): passed untouched.
    NotTcpUdp = 4,
    /// An IPv4 fragment (MF set or offset non-zero): passed untouched. See ARCHITECTURE.md.
    Fragment = 5,
    /// A header is cut short by the end of the frame or by the IP total length.
    Truncated = 6,
    /// IPv4 header that cannot be right: IHL below 5 or total length below the header length.
    BadIpHeader = 7,
    /// The rewrite itself failed (a kernel helper returned an error): passed as it was.
    RewriteFailed = 8,
}

/// Outcomes per direction.
pub const OUTCOMES: u32 = 9;
/// First counter of the XDP ingress program.
pub const INGRESS_BASE: u32 = 0;
/// First counter of the TC egress program.
pub const EGRESS_BASE: u32 = OUTCOMES;
/// Entries in the `COUNTERS` per-CPU array.
pub const COUNTER_SLOTS: u32 = 2 * OUTCOMES;

impl Outcome {
    pub const ALL: [Outcome; OUTCOMES as usize] = [
        Outcome::Rewritten,
        Outcome::NoReservation,
        Outcome::NotIpv4,
        Outcome::VlanStacked,
        Outcome::NotTcpUdp,
        Outcome::Fragment,
        Outcome::Truncated,
        Outcome::BadIpHeader,
        Outcome::RewriteFailed,
    ];

    /// The name `pf stats` prints.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Rewritten => "rewritten",
            Outcome::NoReservation => "no_reservation",
            Outcome::NotIpv4 => "not_ipv4",
            Outcome::VlanStacked => "vlan_stacked",
            Outcome::NotTcpUdp => "not_tcp_udp",
            Outcome::Fragment => "fragment",
            Outcome::Truncated => "truncated",
            Outcome::BadIpHeader => "bad_ip_header",
            Outcome::RewriteFailed => "rewrite_failed",
        }
    }
}
