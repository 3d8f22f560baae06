//! The reference model: what pf's two NAT programs must do to any frame, given the NAT maps'
//! contents, and what its trigger program must do, given the trigger ports and the open gates.
//! It is the specification, written for clarity rather than speed, and the differential tests
//! (`tests/src/integration/differential.rs`, `cargo xtask fuzz`) hold the loaded programs to it
//! byte for byte.
//!
//! Both directions parse alike (the policy ARCHITECTURE.md states):
//! 1. Ethernet (14 bytes), then at most one VLAN tag (0x8100 or 0x88a8; a second is
//!    `VlanStacked`). Anything but IPv4 is `NotIpv4`.
//! 2. The 20-byte IPv4 header must be in the frame (`Truncated`). Version not 4 or IHL below 5
//!    is `BadIpHeader`, as is a total length shorter than the header. A total length reaching
//!    past the frame is `Truncated` (trailing padding is fine).
//! 3. The protocol decides the rest: TCP and UDP go to 4, ICMP to 7; anything else is
//!    `OtherProtocol`.
//!
//! TCP and UDP:
//! 4. A later fragment (non-zero offset) has no ports: see 6. Otherwise the TCP (20 bytes) or
//!    UDP (8 bytes) header must fit in the total length and in the frame (`Truncated`).
//! 5. Ingress looks up (destination address, destination port, protocol) in FORWARD_NAT, egress
//!    (source address, source port, protocol) in REVERSE_NAT. A miss is `NoReservation`. A hit
//!    rewrites that address and port. The IPv4 checksum and the TCP/UDP checksum are updated
//!    incrementally, RFC 1624 eqn. 3 (`HC' = ~(~HC + ~m + m')`), so a checksum that was wrong
//!    stays exactly as wrong. A UDP checksum of 0 (none) stays 0, and an updated UDP checksum of
//!    0 is written 0xffff. The outcome is `Rewritten`, and if the packet is a first fragment
//!    (MF set) its datagram (source, destination, identification, protocol, direction; as it
//!    arrived) is recorded with the NAT key it matched, replacing any earlier record.
//! 6. A later fragment whose datagram is recorded, and whose NAT key is still in the map, gets
//!    that entry's address (destination at ingress, source at egress) and an updated IPv4
//!    checksum: `Rewritten`. Any other later fragment is `Fragment`.
//!
//! ICMP:
//! 7. Any fragment (MF or an offset) is `Fragment`. The 8-byte ICMP header must fit in the total
//!    length (`Truncated`). Types other than 3, 11 and 12 (destination unreachable, time
//!    exceeded, parameter problem) are `OtherProtocol`.
//! 8. The embedded IPv4 header: its first 20 bytes must fit in what the total length leaves
//!    after the ICMP header (`Truncated`); version not 4 or IHL below 5 is `BadIpHeader`; a
//!    protocol other than TCP or UDP is `OtherProtocol`; a non-zero fragment offset is
//!    `Fragment`; the embedded header (IHL) and 8 bytes after it must fit (`Truncated`).
//! 9. Ingress: the outer destination must equal the embedded source, and (embedded source,
//!    embedded source port, protocol) must be in FORWARD_NAT; egress: (embedded destination,
//!    embedded destination port, protocol) in REVERSE_NAT. Otherwise `NoReservation`.
//! 10. A hit rewrites the embedded address and port (source at ingress, destination at egress)
//!    and the outer address: the destination at ingress, the source at egress only when it
//!    equals the embedded destination (the tunnel endpoint sent the error itself). RFC 1624
//!    updates, in this order: the embedded IPv4 checksum (address), the embedded TCP/UDP
//!    checksum if the quote holds it (address and port, with the UDP zero rule), the ICMP
//!    checksum for each changed embedded word (address, embedded IPv4 checksum, port, embedded
//!    TCP/UDP checksum), the outer IPv4 checksum (address, if it changed). The outcome is
//!    `IcmpErrorRewritten`.
//!
//! Egress only:
//! 11. A frame whose IPv4 header parsed (step 2), other than a rewritten TCP/UDP packet
//!    (`Rewritten`), that would leave with a source in one of `TUNNEL_NETWORKS` (for an ICMP
//!    error, the outer source after step 10) is dropped (`TC_ACT_SHOT`, the frame as it was
//!    by then) and counted `TunnelSourceDropped` instead of its outcome. Frames whose IPv4
//!    header does not parse are not looked at.
//!
//! Every frame not rewritten leaves byte for byte as it came. The verdict is XDP_PASS at
//! ingress and TC_ACT_OK at egress, but for step 11 (and a rewrite that fails half way, which no
//! frame can cause in BPF_PROG_TEST_RUN).
//!
//! Trigger gates:
//! 12. A NAT entry may wait on a port-triggering gate (`NatEntry::gate`). Behind an open gate it
//!    is an ordinary entry. Behind a closed gate (never opened, lapsed, or its rule disarmed) it
//!    is as no entry at all: every lookup of steps 5, 6 and 9 misses it, with the outcome a miss
//!    has there (and, at egress, step 11 after it); such a lookup also moves `gate_closed`,
//!    beside the outcome. So the model's NAT tables hold only the entries that may forward now:
//!    a reservation behind a closed gate is simply left out of them ([`nat_key`] says which
//!    key a frame is looked up by, for a test that counts `gate_closed`).
//!
//! The trigger program (TC ingress on a tunnel-side interface; [`trigger`]):
//! 13. Steps 1 and 2, then TCP or UDP (step 3) that is not a later fragment, with its header
//!    whole as step 4 says (a first fragment is fine). Anything else, whatever those steps
//!    would call it, is `NotTcpUdp`.
//! 14. (source address, destination port, protocol) is looked up in TRIGGER_PORTS, which holds
//!    the trigger ports of the armed rules. A miss is `NoTrigger`.
//! 15. A hit whose gate is open is `Refreshed` (its idle timeout starts again). A hit whose gate
//!    is closed is `Opened`: the gate opens, and stays open while packets pass through it (or
//!    further trigger packets arrive) within the rule's idle timeout; the opening is reported
//!    on TRIGGER_EVENTS with the packet's gate, source and destination.
//!
//! Source lists (a reservation's limits):
//! 16. A forward entry may carry a source list (an allow-list: only its networks; a deny-list:
//!    all but them). At ingress, a hit of step 5 or 6 whose source the list refuses is dropped:
//!    verdict XDP_DROP, the frame as it came, outcome `LimitDropped`; a first fragment so
//!    dropped records no datagram. ICMP errors (step 9) are not checked. (Rates are limits
//!    too, but they depend on time; the fixtures test them.)
//!
//! The trigger program's verdict is always TC_ACT_UNSPEC (TCX's "next"), and every frame leaves it byte for byte
//! as it came.

use std::collections::{HashMap, HashSet};

use pf_common::{
    IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, checksum,
    counters::{Outcome, Trigger},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
/// TC_ACT_UNSPEC (-1): the trigger program's verdict, "next" to TCX and to a cls_bpf chain.
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;

/// A key of a NAT map or of TRIGGER_PORTS: (address, port, protocol), as the packet carries
/// them.
pub type NatKey = ([u8; 4], [u8; 2], u8);

/// One NAT map: (address, port, protocol) to (address, port), as the packet carries them.
pub type NatTable = HashMap<NatKey, ([u8; 4], [u8; 2])>;

/// A source list (step 16): whether it is an allow-list, and its networks as (address, mask),
/// network byte order.
pub type SourceList = (bool, Vec<([u8; 4], [u8; 4])>);

/// TRIGGER_PORTS (step 14): (client address, trigger port, protocol) to the gate it opens.
pub type TriggerTable = HashMap<NatKey, u32>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// XDP on the public NIC: destination NAT through FORWARD_NAT.
    Ingress,
    /// TC egress on the public NIC: source NAT through REVERSE_NAT.
    Egress,
}

/// What a program must do with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub verdict: u32,
    pub frame: Vec<u8>,
    pub outcome: Outcome,
}

/// A fragmented datagram, as its fragments arrive: (source, destination, identification,
/// protocol, direction).
type DatagramKey = ([u8; 4], [u8; 4], [u8; 2], u8, Direction);

/// The model's state: both NAT maps, and the fragment table the programs fill as they go.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub forward: NatTable,
    pub reverse: NatTable,
    /// `TUNNEL_NETWORKS`: (network address, mask), network byte order.
    pub tunnel_networks: Vec<([u8; 4], [u8; 4])>,
    /// The forward keys whose entries carry a source list (step 16), and the list.
    pub sources: HashMap<NatKey, SourceList>,
    /// Datagram to the NAT key its first fragment matched.
    fragments: HashMap<DatagramKey, ([u8; 4], [u8; 2], u8)>,
}

fn be16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

fn addr(frame: &[u8], at: usize) -> [u8; 4] {
    frame[at..at + 4].try_into().unwrap()
}

fn port(frame: &[u8], at: usize) -> [u8; 2] {
    frame[at..at + 2].try_into().unwrap()
}

fn put(frame: &mut [u8], at: usize, bytes: &[u8]) {
    frame[at..at + bytes.len()].copy_from_slice(bytes);
}

/// An IPv4 packet that passed steps 1 and 2.
struct Ip {
    /// Offset of the IPv4 header in the frame.
    at: usize,
    header_len: usize,
    total_len: usize,
    proto: u8,
    frags: u16,
}

fn header_len(version_ihl: u8) -> Result<usize, Outcome> {
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 {
        return Err(Outcome::BadIpHeader);
    }
    Ok(header_len)
}

/// Steps 1 and 2.
fn parse_ip(frame: &[u8]) -> Result<Ip, Outcome> {
    const VLAN_TPIDS: [u16; 2] = [0x8100, 0x88a8];
    if frame.len() < 14 {
        return Err(Outcome::Truncated);
    }
    let mut ether_type = be16(frame, 12);
    let mut at = 14;
    if VLAN_TPIDS.contains(&ether_type) {
        if frame.len() < 18 {
            return Err(Outcome::Truncated);
        }
        ether_type = be16(frame, 16);
        at = 18;
        if VLAN_TPIDS.contains(&ether_type) {
            return Err(Outcome::VlanStacked);
        }
    }
    if ether_type != 0x0800 {
        return Err(Outcome::NotIpv4);
    }
    if frame.len() < at + 20 {
        return Err(Outcome::Truncated);
    }
    let header_len = header_len(frame[at])?;
    let total_len = usize::from(be16(frame, at + 2));
    if total_len < header_len {
        return Err(Outcome::BadIpHeader);
    }
    if at + total_len > frame.len() {
        return Err(Outcome::Truncated);
    }
    Ok(Ip {
        at,
        header_len,
        total_len,
        proto: frame[at + 9],
        frags: be16(frame, at + 6),
    })
}

/// Step 4's check for a whole TCP/UDP packet or first fragment: its header fits in the total
/// length and in the frame.
fn l4_header_fits(frame: &[u8], ip: &Ip) -> bool {
    let l4_header_len = if ip.proto == IPPROTO_TCP { 20 } else { 8 };
    ip.header_len + l4_header_len <= ip.total_len
        && ip.at + ip.header_len + l4_header_len <= frame.len()
}

/// Where an ICMP error's fields lie (step 8).
struct IcmpError {
    icmp: usize,
    inner: usize,
    inner_l4: usize,
    inner_proto: u8,
    /// The embedded TCP/UDP checksum's offset, if the quote holds it.
    inner_check: Option<usize>,
}

fn parse_icmp_error(frame: &[u8], ip: &Ip) -> Result<IcmpError, Outcome> {
    let icmp = ip.at + ip.header_len;
    let mut room = ip.total_len - ip.header_len;
    if room < 8 {
        return Err(Outcome::Truncated);
    }
    if ![3, 11, 12].contains(&frame[icmp]) {
        return Err(Outcome::OtherProtocol);
    }
    room -= 8;
    let inner = icmp + 8;
    if room < 20 {
        return Err(Outcome::Truncated);
    }
    let inner_header_len = header_len(frame[inner])?;
    let inner_proto = frame[inner + 9];
    if inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP {
        return Err(Outcome::OtherProtocol);
    }
    if be16(frame, inner + 6) & 0x1fff != 0 {
        return Err(Outcome::Fragment);
    }
    if room < inner_header_len + 8 {
        return Err(Outcome::Truncated);
    }
    room -= inner_header_len;
    let check_offset = if inner_proto == IPPROTO_TCP { 16 } else { 6 };
    Ok(IcmpError {
        icmp,
        inner,
        inner_l4: inner + inner_header_len,
        inner_proto,
        inner_check: (room >= check_offset + 2).then_some(inner + inner_header_len + check_offset),
    })
}

/// RFC 1624 update of a TCP/UDP checksum for an address and port change (step 5's rules).
fn l4_check(proto: u8, check: u16, addrs: ([u8; 4], [u8; 4]), ports: ([u8; 2], [u8; 2])) -> u16 {
    if proto == IPPROTO_UDP {
        checksum::update_udp_addr_port(check, addrs.0, addrs.1, ports.0, ports.1)
    } else {
        checksum::update_addr_port(check, addrs.0, addrs.1, ports.0, ports.1)
    }
}

impl Model {
    pub fn new(forward: NatTable, reverse: NatTable) -> Self {
        Self {
            forward,
            reverse,
            tunnel_networks: Vec::new(),
            sources: HashMap::new(),
            fragments: HashMap::new(),
        }
    }

    /// Whether step 16 drops a frame from `source` that hit forward key `key`.
    fn refused(&self, direction: Direction, key: &NatKey, source: [u8; 4]) -> bool {
        let in_net =
            |(net, mask): &([u8; 4], [u8; 4])| (0..4).all(|i| source[i] & mask[i] == net[i]);
        match self.sources.get(key) {
            Some((allow, nets)) if direction == Direction::Ingress => {
                nets.iter().any(in_net) != *allow
            }
            _ => false,
        }
    }

    fn is_tunnel_source(&self, source: [u8; 4]) -> bool {
        self.tunnel_networks
            .iter()
            .any(|(net, mask)| (0..4).all(|i| source[i] & mask[i] == net[i]))
    }

    /// Forgets every fragmented datagram, as clearing the kernel's fragment table does.
    pub fn forget_fragments(&mut self) {
        self.fragments.clear();
    }

    fn nat(&self, direction: Direction) -> &NatTable {
        match direction {
            Direction::Ingress => &self.forward,
            Direction::Egress => &self.reverse,
        }
    }

    /// What the program for `direction` must do with `frame`; records a first fragment's
    /// datagram as the program does.
    pub fn expected(&mut self, direction: Direction, frame: &[u8]) -> Expected {
        let verdict = match direction {
            Direction::Ingress => XDP_PASS,
            Direction::Egress => TC_ACT_OK,
        };
        let (outcome, out) = match self.rewrite(direction, frame) {
            Ok((outcome, out)) => (outcome, out),
            Err(outcome) => (outcome, frame.to_vec()),
        };
        if outcome == Outcome::LimitDropped {
            return Expected {
                verdict: XDP_DROP,
                frame: out,
                outcome,
            };
        }
        // The source the frame would leave with: an ICMP error's after step 10.
        let leaving = parse_ip(frame).ok().map(|ip| match outcome {
            Outcome::IcmpErrorRewritten => addr(&out, ip.at + 12),
            _ => addr(frame, ip.at + 12),
        });
        if direction == Direction::Egress
            && outcome != Outcome::Rewritten
            && leaving.is_some_and(|s| self.is_tunnel_source(s))
        {
            return Expected {
                verdict: TC_ACT_SHOT,
                frame: out,
                outcome: Outcome::TunnelSourceDropped,
            };
        }
        Expected {
            verdict,
            frame: out,
            outcome,
        }
    }

    fn rewrite(
        &mut self,
        direction: Direction,
        frame: &[u8],
    ) -> Result<(Outcome, Vec<u8>), Outcome> {
        let ip = parse_ip(frame)?;
        match ip.proto {
            IPPROTO_TCP | IPPROTO_UDP if ip.frags & 0x1fff != 0 => {
                self.later_fragment(direction, frame, &ip)
            }
            IPPROTO_TCP | IPPROTO_UDP => self.tcp_udp(direction, frame, &ip),
            IPPROTO_ICMP if ip.frags & 0x3fff != 0 => Err(Outcome::Fragment),
            IPPROTO_ICMP => self.icmp_error(direction, frame, &ip),
            _ => Err(Outcome::OtherProtocol),
        }
    }

    /// Where the address a direction rewrites lies: the destination at ingress, the source at
    /// egress.
    fn rewritten_addr(direction: Direction, ip: usize) -> usize {
        match direction {
            Direction::Ingress => ip + 16,
            Direction::Egress => ip + 12,
        }
    }

    /// Where the port a direction rewrites lies.
    fn rewritten_port(direction: Direction, l4: usize) -> usize {
        match direction {
            Direction::Ingress => l4 + 2,
            Direction::Egress => l4,
        }
    }

    fn datagram(direction: Direction, frame: &[u8], ip: &Ip) -> DatagramKey {
        (
            addr(frame, ip.at + 12),
            addr(frame, ip.at + 16),
            port(frame, ip.at + 4),
            ip.proto,
            direction,
        )
    }

    fn tcp_udp(
        &mut self,
        direction: Direction,
        frame: &[u8],
        ip: &Ip,
    ) -> Result<(Outcome, Vec<u8>), Outcome> {
        let l4 = ip.at + ip.header_len;
        if !l4_header_fits(frame, ip) {
            return Err(Outcome::Truncated);
        }
        let addr_at = Self::rewritten_addr(direction, ip.at);
        let port_at = Self::rewritten_port(direction, l4);
        let key = (addr(frame, addr_at), port(frame, port_at), ip.proto);
        let &(new_addr, new_port) = self
            .nat(direction)
            .get(&key)
            .ok_or(Outcome::NoReservation)?;
        if self.refused(direction, &key, addr(frame, ip.at + 12)) {
            return Err(Outcome::LimitDropped);
        }
        if ip.frags & 0x2000 != 0 {
            self.fragments
                .insert(Self::datagram(direction, frame, ip), key);
        }

        let mut out = frame.to_vec();
        put(&mut out, addr_at, &new_addr);
        put(&mut out, port_at, &new_port);
        let ip_check = checksum::update_addr(be16(frame, ip.at + 10), key.0, new_addr);
        put(&mut out, ip.at + 10, &ip_check.to_be_bytes());
        let check_at = l4 + if ip.proto == IPPROTO_TCP { 16 } else { 6 };
        let check = l4_check(
            ip.proto,
            be16(frame, check_at),
            (key.0, new_addr),
            (key.1, new_port),
        );
        put(&mut out, check_at, &check.to_be_bytes());
        Ok((Outcome::Rewritten, out))
    }

    fn later_fragment(
        &mut self,
        direction: Direction,
        frame: &[u8],
        ip: &Ip,
    ) -> Result<(Outcome, Vec<u8>), Outcome> {
        let nat_key = self
            .fragments
            .get(&Self::datagram(direction, frame, ip))
            .ok_or(Outcome::Fragment)?;
        let &(new_addr, _) = self.nat(direction).get(nat_key).ok_or(Outcome::Fragment)?;
        if self.refused(direction, nat_key, addr(frame, ip.at + 12)) {
            return Err(Outcome::LimitDropped);
        }
        let addr_at = Self::rewritten_addr(direction, ip.at);
        let mut out = frame.to_vec();
        put(&mut out, addr_at, &new_addr);
        let ip_check =
            checksum::update_addr(be16(frame, ip.at + 10), addr(frame, addr_at), new_addr);
        put(&mut out, ip.at + 10, &ip_check.to_be_bytes());
        Ok((Outcome::Rewritten, out))
    }

    fn icmp_error(
        &mut self,
        direction: Direction,
        frame: &[u8],
        ip: &Ip,
    ) -> Result<(Outcome, Vec<u8>), Outcome> {
        let e = parse_icmp_error(frame, ip)?;
        let (inner_addr_at, inner_port_at, outer_addr_at) = icmp_error_fields(direction, ip, &e);
        let old_addr = addr(frame, inner_addr_at);
        let old_port = port(frame, inner_port_at);
        let outer_matches = addr(frame, outer_addr_at) == old_addr;
        if direction == Direction::Ingress && !outer_matches {
            return Err(Outcome::NoReservation);
        }
        let &(new_addr, new_port) = self
            .nat(direction)
            .get(&(old_addr, old_port, e.inner_proto))
            .ok_or(Outcome::NoReservation)?;

        let mut out = frame.to_vec();
        put(&mut out, inner_addr_at, &new_addr);
        put(&mut out, inner_port_at, &new_port);
        let old_inner_ip_check = be16(frame, e.inner + 10);
        let inner_ip_check = checksum::update_addr(old_inner_ip_check, old_addr, new_addr);
        put(&mut out, e.inner + 10, &inner_ip_check.to_be_bytes());
        let inner_check = e.inner_check.map(|at| {
            let old = be16(frame, at);
            let new = l4_check(
                e.inner_proto,
                old,
                (old_addr, new_addr),
                (old_port, new_port),
            );
            put(&mut out, at, &new.to_be_bytes());
            (old, new)
        });
        let mut icmp_check = checksum::update_addr(be16(frame, e.icmp + 2), old_addr, new_addr);
        icmp_check = checksum::update_word(icmp_check, old_inner_ip_check, inner_ip_check);
        icmp_check = checksum::update_word(
            icmp_check,
            u16::from_be_bytes(old_port),
            u16::from_be_bytes(new_port),
        );
        if let Some((old, new)) = inner_check {
            icmp_check = checksum::update_word(icmp_check, old, new);
        }
        put(&mut out, e.icmp + 2, &icmp_check.to_be_bytes());
        if outer_matches {
            put(&mut out, outer_addr_at, &new_addr);
            let ip_check = checksum::update_addr(be16(frame, ip.at + 10), old_addr, new_addr);
            put(&mut out, ip.at + 10, &ip_check.to_be_bytes());
        }
        Ok((Outcome::IcmpErrorRewritten, out))
    }
}

/// Where step 9 reads an ICMP error's embedded address and port, and the outer address it
/// compares and step 10 rewrites. The embedded packet went the other way: at ingress it is one
/// egress sent (embedded source = public endpoint), at egress one ingress delivered (embedded
/// destination = tunnel endpoint).
fn icmp_error_fields(direction: Direction, ip: &Ip, e: &IcmpError) -> (usize, usize, usize) {
    match direction {
        Direction::Ingress => (e.inner + 12, e.inner_l4, ip.at + 16),
        Direction::Egress => (e.inner + 16, e.inner_l4 + 2, ip.at + 12),
    }
}

/// The NAT key the program for `direction` looks `frame` up by, if the frame gets that far
/// (steps 5 and 9): a whole TCP/UDP packet or first fragment, or an ICMP error that passed
/// step 8 (at ingress, one addressed to the quoted source). A later fragment (step 6) is
/// looked up by the key its first fragment was rewritten through, so never by one behind a
/// gate that was closed all along.
pub fn nat_key(direction: Direction, frame: &[u8]) -> Option<NatKey> {
    let ip = parse_ip(frame).ok()?;
    let (addr_at, port_at) = match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP if ip.frags & 0x1fff == 0 && l4_header_fits(frame, &ip) => {
            let l4 = ip.at + ip.header_len;
            (
                Model::rewritten_addr(direction, ip.at),
                Model::rewritten_port(direction, l4),
            )
        }
        IPPROTO_ICMP if ip.frags & 0x3fff == 0 => {
            let e = parse_icmp_error(frame, &ip).ok()?;
            let (addr_at, port_at, outer_at) = icmp_error_fields(direction, &ip, &e);
            if direction == Direction::Ingress && addr(frame, outer_at) != addr(frame, addr_at) {
                return None;
            }
            return Some((addr(frame, addr_at), port(frame, port_at), e.inner_proto));
        }
        _ => return None,
    };
    Some((addr(frame, addr_at), port(frame, port_at), ip.proto))
}

/// What the trigger program must do with `frame` (steps 13 to 15), given TRIGGER_PORTS and the
/// gates open now: the outcome, and the gate the frame opens. (The frame always leaves as it
/// came, with TC_ACT_UNSPEC.)
pub fn trigger(frame: &[u8], ports: &TriggerTable, open: &HashSet<u32>) -> (Trigger, Option<u32>) {
    let Ok(ip) = parse_ip(frame) else {
        return (Trigger::NotTcpUdp, None);
    };
    if !matches!(ip.proto, IPPROTO_TCP | IPPROTO_UDP)
        || ip.frags & 0x1fff != 0
        || !l4_header_fits(frame, &ip)
    {
        return (Trigger::NotTcpUdp, None);
    }
    let l4 = ip.at + ip.header_len;
    let key = (addr(frame, ip.at + 12), port(frame, l4 + 2), ip.proto);
    match ports.get(&key) {
        None => (Trigger::NoTrigger, None),
        Some(gate) if open.contains(gate) => (Trigger::Refreshed, None),
        Some(&gate) => (Trigger::Opened, Some(gate)),
    }
}
