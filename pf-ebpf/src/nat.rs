//! The rewrites: destination NAT at XDP ingress, source NAT at TC egress, each for whole
//! packets, for fragments (through the fragment table) and for ICMP errors about forwarded flows
//! (RFC 5508).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use pf_common::{
    EndpointKey, FRAGMENT_EGRESS, FRAGMENT_INGRESS, FragmentKey, FragmentValue, IPPROTO_TCP,
    IPPROTO_UDP, NatEntry, checksum, counters::Outcome,
};

use crate::{
    limit,
    maps::{self, FRAGMENTS},
    parse::{
        IP_MF, IP_OFFSET_MASK, IcmpError, Ipv4, MAX_HEADERS_LEN, MAX_ICMP_ERROR_LEN, Ports,
        is_icmp, is_tcp_udp, parse_icmp_error, parse_ipv4, parse_ports, ptr_at, wire,
    },
};

/// Whether the packet is a later fragment (non-zero offset): no TCP/UDP header.
#[inline(always)]
fn is_later_fragment(ip: &Ipv4) -> bool {
    ip.frags & IP_OFFSET_MASK != 0
}

/// Whether the packet is any fragment: the first (MF, offset 0) or a later one.
#[inline(always)]
fn is_fragment(ip: &Ipv4) -> bool {
    ip.frags & (IP_MF | IP_OFFSET_MASK) != 0
}

/// The fragment-table key of the datagram `ip` belongs to, as its fragments arrive.
///
/// SAFETY: `ip.ip` must have been bounds-checked by the parser.
#[inline(always)]
unsafe fn fragment_key(ip: &Ipv4, direction: u8) -> FragmentKey {
    unsafe {
        FragmentKey {
            src: (*ip.ip).src_addr,
            dst: (*ip.ip).dst_addr,
            id: (*ip.ip).id,
            proto: ip.proto,
            direction,
        }
    }
}

/// Records that a first fragment was rewritten through `nat_key`, so the datagram's later
/// fragments follow it. A failed insert only means they pass untouched, counted as fragments.
#[inline(always)]
fn track_datagram(key: &FragmentKey, nat_key: EndpointKey) {
    let _ = FRAGMENTS.insert(key, &FragmentValue { nat_key }, 0);
}

/// The NAT key a later fragment's datagram was rewritten through, if its first fragment was.
#[inline(always)]
fn tracked_key(key: &FragmentKey) -> Option<EndpointKey> {
    // SAFETY: a map value, copied out at once.
    Some(unsafe { FRAGMENTS.get(key) }?.nat_key)
}

/// The three checksums every ICMP error translation updates, before or after it. The embedded
/// TCP/UDP checksum, which a short quote lacks, is updated apart ([`inner_l4_after`]), inside
/// the one branch that finds it: kernels before 6.6 cannot follow a second branch on the same
/// condition (its operands spilled to the stack lose their bounds in the 6.1 verifier), and
/// reject the program.
struct IcmpChecks {
    outer_ip: u16,
    icmp: u16,
    inner_ip: u16,
}

/// The checksums after the embedded address and port change from `old_*` to `new_*` (and the
/// outer address too when `outer_changes`). RFC 1624 updates, in the order `tests/src/model.rs`
/// states: the embedded IPv4 checksum for the embedded address, the ICMP checksum for every
/// embedded word that changed (address, embedded IPv4 checksum, port; the embedded TCP/UDP
/// checksum last, by the caller, with [`inner_l4_after`]), and the outer IPv4 checksum for the
/// outer address.
#[inline(always)]
fn icmp_checks(
    old: &IcmpChecks,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    old_port: [u8; 2],
    new_port: [u8; 2],
    outer_changes: bool,
) -> IcmpChecks {
    let inner_ip = checksum::update_addr(old.inner_ip, old_addr, new_addr);
    let mut icmp = checksum::update_addr(old.icmp, old_addr, new_addr);
    icmp = checksum::update_word(icmp, old.inner_ip, inner_ip);
    icmp = checksum::update_word(
        icmp,
        u16::from_be_bytes(old_port),
        u16::from_be_bytes(new_port),
    );
    let outer_ip = if outer_changes {
        checksum::update_addr(old.outer_ip, old_addr, new_addr)
    } else {
        old.outer_ip
    };
    IcmpChecks {
        outer_ip,
        icmp,
        inner_ip,
    }
}

/// The ICMP checksum with the embedded TCP/UDP checksum's change added last (as the model
/// does), and the value to write through `e.inner_l4_check`: the updated checksum, or, where the
/// quote holds none, the two bytes there unchanged. Reads without branching on whether the
/// checksum is there (see [`IcmpError::inner_l4_check`]).
///
/// SAFETY: `e.inner_l4_check` must have been bounds-checked by the parser and still be valid.
#[inline(always)]
unsafe fn with_inner_l4(
    c: &IcmpChecks,
    e: &IcmpError,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    old_port: [u8; 2],
    new_port: [u8; 2],
) -> (u16, u16) {
    let old_l4 = u16::from_be_bytes(unsafe { *e.inner_l4_check });
    if e.has_inner_l4_check {
        let new_l4 = inner_l4_after(
            old_l4,
            e.inner_proto,
            old_addr,
            new_addr,
            old_port,
            new_port,
        );
        (checksum::update_word(c.icmp, old_l4, new_l4), new_l4)
    } else {
        (c.icmp, old_l4)
    }
}

/// The embedded TCP/UDP checksum `check` after the embedded address and port change.
#[inline(always)]
fn inner_l4_after(
    check: u16,
    proto: u8,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    old_port: [u8; 2],
    new_port: [u8; 2],
) -> u16 {
    if proto == IPPROTO_UDP {
        checksum::update_udp_addr_port(check, old_addr, new_addr, old_port, new_port)
    } else {
        checksum::update_addr_port(check, old_addr, new_addr, old_port, new_port)
    }
}

/// Reads the checksums an ICMP error translation updates.
///
/// SAFETY: every pointer in `ip` and `e` must have been bounds-checked by the parser.
#[inline(always)]
unsafe fn icmp_old_checks(ip: &Ipv4, e: &IcmpError) -> IcmpChecks {
    unsafe {
        IcmpChecks {
            outer_ip: u16::from_be_bytes((*ip.ip).check),
            icmp: u16::from_be_bytes(*e.icmp_check),
            inner_ip: u16::from_be_bytes((*e.inner_ip).check),
        }
    }
}

/// `parse_ipv4` for an XDP frame, whose directly readable data is the whole frame. The frame's
/// length is `end - start`, but LLVM must not know it: from the IPv4 total length checks it
/// would prove later pointer checks redundant and drop them, and the verifier, which cannot
/// follow that proof, would reject the program. A volatile read hides the equality for the cost
/// of one stack access.
#[inline(always)]
fn parse_xdp_ipv4(start: usize, end: usize) -> Result<Ipv4, Outcome> {
    let frame_len = end - start;
    // SAFETY: reads a local.
    let frame_len = unsafe { core::ptr::read_volatile(&frame_len) };
    parse_ipv4(start, end, frame_len)
}

/// Ingress: a packet to a reserved public endpoint gets the tunnel endpoint as its destination.
/// Checksums are updated incrementally (RFC 1624): XDP sees frames as they came off the wire,
/// with complete checksums.
#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> Outcome {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip = match parse_xdp_ipv4(start, end) {
        Ok(ip) => ip,
        Err(outcome) => return outcome,
    };
    if is_tcp_udp(ip.proto) {
        if is_later_fragment(&ip) {
            ingress_later_fragment(&ip)
        } else {
            ingress_tcp_udp(start, end, &ip)
        }
    } else if is_icmp(ip.proto) {
        if is_fragment(&ip) {
            // An ICMP error fits in 576 bytes (RFC 1812); a fragmented one is not worth parsing.
            return Outcome::Fragment;
        }
        ingress_icmp_error(start, end, &ip)
    } else {
        Outcome::OtherProtocol
    }
}

#[inline(always)]
fn ingress_tcp_udp(start: usize, end: usize, ip: &Ipv4) -> Outcome {
    let h = match parse_ports(start, end, ip) {
        Ok(h) => h,
        Err(outcome) => return outcome,
    };
    // SAFETY: the parser bounds-checked every pointer in `ip` and `h` against `end`.
    unsafe {
        let old_addr = wire::get4(&raw const (*ip.ip).dst_addr);
        let old_port = wire::get2(&raw const (*h.ports)[1]);
        if !maps::port_in_use(false, ip.proto, old_port) {
            return Outcome::NoReservation;
        }
        let key = EndpointKey::new(old_addr, old_port, ip.proto);
        let admit = |entry| {
            let src = wire::get4(&raw const (*ip.ip).src_addr);
            limit::admits(entry, src, ip.ip_len, is_syn(start, end, ip))
        };
        let entry = match maps::forward_entry_admitted(&key, admit) {
            Ok(entry) => entry,
            Err(outcome) => return outcome,
        };
        if ip.frags & IP_MF != 0 {
            // A first fragment: the key is taken before the destination changes.
            track_datagram(&fragment_key(ip, FRAGMENT_INGRESS), key);
        }
        rewrite_xdp(ip, &h, Endpoint::Destination, entry);
    }
    Outcome::Rewritten
}

/// Whether a packet is a TCP SYN without ACK: a new connection, as the SYN rate counts them.
#[inline(always)]
fn is_syn(start: usize, end: usize, ip: &Ipv4) -> bool {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    if ip.proto != IPPROTO_TCP {
        return false;
    }
    // Data offset and flags: bytes 12 and 13 of the TCP header, inside what the parser checked.
    match ptr_at::<[u8; 2]>(start, end, ip.l4_off + 12) {
        // SAFETY: bounds-checked by ptr_at.
        Ok(p) => (unsafe { (*p)[1] } & (SYN | ACK)) == SYN,
        Err(_) => false,
    }
}

/// Which endpoint of a packet a rewrite replaces.
#[derive(Clone, Copy)]
enum Endpoint {
    Source,
    Destination,
}

/// Replaces one endpoint of a whole TCP/UDP packet in an XDP frame with `entry`'s address and
/// port, and counts the packet with the entry. Checksums are updated incrementally (RFC 1624):
/// XDP sees frames as they came off the wire, with complete checksums.
///
/// SAFETY: every pointer in `ip` and `h` must have been bounds-checked by the parser, and
/// `entry` must be a NAT map value from a lookup in this run.
#[inline(always)]
unsafe fn rewrite_xdp(ip: &Ipv4, h: &Ports, endpoint: Endpoint, entry: *mut NatEntry) {
    unsafe {
        let (addr, port) = match endpoint {
            Endpoint::Source => (&raw mut (*ip.ip).src_addr, &raw mut (*h.ports)[0]),
            Endpoint::Destination => (&raw mut (*ip.ip).dst_addr, &raw mut (*h.ports)[1]),
        };
        let (old_addr, old_port) = (wire::get4(addr), wire::get2(port));
        let (new_addr, new_port) = ((*entry).addr, (*entry).port);
        // Counted here or after the writes: no difference was measurable (the bench's
        // per-packet section).
        maps::count_nat(entry, ip.ip_len);

        let ip_check_field = &raw mut (*ip.ip).check;
        let ip_check = u16::from_be_bytes(wire::get2(ip_check_field));
        let ip_check = checksum::update_addr(ip_check, old_addr, new_addr);
        wire::set2(ip_check_field, ip_check.to_be_bytes());
        wire::set4(addr, new_addr);

        let l4_check = u16::from_be_bytes(wire::get2(h.l4_check));
        let l4_check = if ip.proto == IPPROTO_UDP {
            checksum::update_udp_addr_port(l4_check, old_addr, new_addr, old_port, new_port)
        } else {
            checksum::update_addr_port(l4_check, old_addr, new_addr, old_port, new_port)
        };
        wire::set2(h.l4_check, l4_check.to_be_bytes());
        wire::set2(port, new_port);
    }
}

/// A reply the reply fast path may send out itself: a whole TCP/UDP packet from a reservation's
/// target, found but not yet rewritten.
pub struct Reply {
    ip: Ipv4,
    ports: Ports,
    entry: *mut NatEntry,
}

/// Reply fast path, step one: whether the frame is a reply pf forwards (an unfragmented TCP/UDP
/// packet whose source is in `REVERSE_NAT`). Nothing is written: if the packet cannot be
/// redirected, it must reach the kernel as it came, because with the public address as its
/// source it would be dropped there as a martian, and TC egress rewrites it after routing.
/// Fragments and ICMP errors always take that way.
#[inline(always)]
pub fn reply(ctx: &XdpContext) -> Option<Reply> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip = parse_xdp_ipv4(start, end).ok()?;
    if !is_tcp_udp(ip.proto) || is_fragment(&ip) {
        return None;
    }
    let ports = parse_ports(start, end, &ip).ok()?;
    // SAFETY: the parser bounds-checked both pointers.
    let (addr, port) = unsafe {
        (
            wire::get4(&raw const (*ip.ip).src_addr),
            wire::get2(&raw const (*ports.ports)[0]),
        )
    };
    if !maps::port_in_use(true, ip.proto, port) {
        return None;
    }
    let key = EndpointKey::new(addr, port, ip.proto);
    let entry = maps::reverse_entry::<true>(&key)?;
    Some(Reply { ip, ports, entry })
}

/// Reply fast path, step two, once the redirect is certain: the source becomes the public
/// endpoint, exactly once (a redirected frame never meets TC egress).
#[inline(always)]
pub fn rewrite_reply(reply: &Reply) {
    // SAFETY: `reply` holds parser-checked packet pointers (no helper since has changed the
    // packet) and a map value from this run's lookup.
    unsafe { rewrite_xdp(&reply.ip, &reply.ports, Endpoint::Source, reply.entry) }
}

/// A later fragment carries no ports: it follows its datagram's first fragment, if that was
/// rewritten. Only the destination address (and the IPv4 checksum) changes; the TCP/UDP
/// checksum, in the first fragment, covers the whole datagram and was updated there.
#[inline(always)]
fn ingress_later_fragment(ip: &Ipv4) -> Outcome {
    // SAFETY: the parser bounds-checked `ip.ip`.
    unsafe {
        let Some(nat_key) = tracked_key(&fragment_key(ip, FRAGMENT_INGRESS)) else {
            return Outcome::Fragment;
        };
        let admit = |entry| limit::admits(entry, (*ip.ip).src_addr, ip.ip_len, false);
        let entry = match maps::forward_entry_admitted(&nat_key, admit) {
            Ok(entry) => entry,
            // The reservation went (or its gate closed) since the first fragment.
            Err(Outcome::NoReservation) => return Outcome::Fragment,
            Err(outcome) => return outcome,
        };
        let new_addr = (*entry).addr;
        let old_addr = (*ip.ip).dst_addr;
        let ip_check = u16::from_be_bytes((*ip.ip).check);
        (*ip.ip).check = checksum::update_addr(ip_check, old_addr, new_addr).to_be_bytes();
        (*ip.ip).dst_addr = new_addr;
        maps::count_nat(entry, ip.ip_len);
    }
    Outcome::Rewritten
}

/// An ICMP error from the Internet about a packet pf's egress sent from a public endpoint (so
/// the embedded source is that endpoint, and the error is addressed to it) goes on to the tunnel
/// endpoint, looking as if that endpoint's own packet had caused it.
#[inline(always)]
fn ingress_icmp_error(start: usize, end: usize, ip: &Ipv4) -> Outcome {
    let e = match parse_icmp_error(start, end, ip) {
        Ok(e) => e,
        Err(outcome) => return outcome,
    };
    // SAFETY: the parser bounds-checked every pointer in `ip` and `e` against `end`.
    unsafe {
        let old_addr = (*e.inner_ip).src_addr;
        let old_port = (*e.inner_ports)[0];
        if (*ip.ip).dst_addr != old_addr {
            return Outcome::NoReservation;
        }
        let key = EndpointKey::new(old_addr, old_port, e.inner_proto);
        let Some(entry) = maps::forward_entry::<false>(&key) else {
            return Outcome::NoReservation;
        };
        let (new_addr, new_port) = ((*entry).addr, (*entry).port);
        let c = icmp_checks(
            &icmp_old_checks(ip, &e),
            old_addr,
            new_addr,
            old_port,
            new_port,
            true,
        );
        let (icmp, new_l4) = with_inner_l4(&c, &e, old_addr, new_addr, old_port, new_port);
        // Without a quoted checksum this writes the embedded destination port back as it was
        // (ingress changes only the source port).
        *e.inner_l4_check = new_l4.to_be_bytes();
        (*ip.ip).dst_addr = new_addr;
        (*ip.ip).check = c.outer_ip.to_be_bytes();
        *e.icmp_check = icmp.to_be_bytes();
        (*e.inner_ip).src_addr = new_addr;
        (*e.inner_ip).check = c.inner_ip.to_be_bytes();
        (*e.inner_ports)[0] = new_port;
    }
    Outcome::IcmpErrorRewritten
}

/// What `egress` decided: the outcome to count, and whether the packet must be dropped because a
/// rewrite stopped half way (a half-rewritten packet must never leave).
pub struct EgressVerdict {
    pub outcome: Outcome,
    pub drop: bool,
}

impl From<Outcome> for EgressVerdict {
    #[inline(always)]
    fn from(outcome: Outcome) -> Self {
        Self {
            outcome,
            drop: false,
        }
    }
}

/// A rewrite that failed after its first write: the packet must not leave half rewritten.
const HALF_REWRITTEN: EgressVerdict = EgressVerdict {
    outcome: Outcome::RewriteFailed,
    drop: true,
};

/// Makes the first `want` bytes of the frame (or all of it, if shorter) directly readable.
/// Headers of a forwarded or local packet are normally in the linear part already. A pull
/// invalidates earlier packet pointers, so take data/data_end afterwards.
#[inline(always)]
fn pull(ctx: &TcContext, frame_len: usize, want: usize) -> bool {
    let want = if frame_len < want { frame_len } else { want };
    ctx.data_end() - ctx.data() >= want || ctx.pull_data(want as u32).is_ok()
}

/// Egress: a reply from a tunnel endpoint that is the target of a reservation gets the public
/// endpoint as its source. Unlike XDP, an skb here may carry CHECKSUM_PARTIAL (only the
/// pseudo-header sum in the field) or CHECKSUM_COMPLETE: a whole TCP/UDP packet whose checksum
/// is whole in it is rewritten with one store, any other through the skb helpers, which handle
/// every checksum state (`egress_tcp_udp`).
#[inline(always)]
pub fn egress(ctx: &TcContext) -> EgressVerdict {
    let frame_len = ctx.len() as usize;
    if !pull(ctx, frame_len, MAX_HEADERS_LEN) {
        return Outcome::Truncated.into();
    }
    let ip = match parse_ipv4(ctx.data(), ctx.data_end(), frame_len) {
        Ok(ip) => ip,
        Err(outcome) => return outcome.into(),
    };
    // Read before any helper call, which may move the packet.
    // SAFETY: parse_ipv4 checked that the whole header is in the frame.
    let source = unsafe { wire::get4(&raw const (*ip.ip).src_addr) };
    let source_offset = ip.ip as usize - ctx.data() + IPV4_SRC_OFFSET;
    let verdict = if is_tcp_udp(ip.proto) {
        if is_later_fragment(&ip) {
            egress_later_fragment(ctx, &ip)
        } else {
            egress_tcp_udp(ctx, &ip)
        }
    } else if is_icmp(ip.proto) {
        if is_fragment(&ip) {
            Outcome::Fragment.into()
        } else if !pull(ctx, frame_len, MAX_ICMP_ERROR_LEN) {
            // An ICMP error is read deeper than other packets; parse again after the pull.
            Outcome::Truncated.into()
        } else {
            let (start, end) = (ctx.data(), ctx.data_end());
            match parse_ipv4(start, end, frame_len) {
                Ok(ip) => egress_icmp_error(ctx, start, end, &ip),
                Err(outcome) => outcome.into(),
            }
        }
    } else {
        Outcome::OtherProtocol.into()
    };
    guard_tunnel_source(ctx, verdict, source, source_offset)
}

/// Where the checksum and the source address sit in an IPv4 header.
const IPV4_CHECK_OFFSET: usize = 10;
const IPV4_SRC_OFFSET: usize = 12;

/// A packet leaving the public interface with a tunnel address as its source is a leak (a
/// reply on a connection whose reservation was released, disabled or expired; any tunnel
/// traffic that escaped masquerading; an ICMP error about a forwarded flow sent by another
/// tunnel address, whose outer source pf leaves as it is): dropped and counted, never sent. A
/// rewritten TCP/UDP packet leaves from the public endpoint, so it is not looked at; a rewrite
/// that failed before its first write keeps its own outcome, and is dropped all the same.
#[inline(always)]
fn guard_tunnel_source(
    ctx: &TcContext,
    verdict: EgressVerdict,
    source: [u8; 4],
    source_offset: usize,
) -> EgressVerdict {
    if verdict.drop || verdict.outcome == Outcome::Rewritten {
        return verdict;
    }
    let leaving = if verdict.outcome == Outcome::IcmpErrorRewritten {
        // Its outer source was rewritten only if the tunnel endpoint sent it: read what leaves.
        match ctx.load::<[u8; 4]>(source_offset) {
            Ok(addr) => addr,
            Err(_) => return verdict,
        }
    } else {
        source
    };
    if !maps::is_tunnel_source(leaving) {
        return verdict;
    }
    EgressVerdict {
        outcome: if verdict.outcome == Outcome::RewriteFailed {
            Outcome::RewriteFailed
        } else {
            Outcome::TunnelSourceDropped
        },
        drop: true,
    }
}

#[inline(always)]
fn egress_tcp_udp(ctx: &TcContext, ip: &Ipv4) -> EgressVerdict {
    let start = ctx.data();
    let h = match parse_ports(start, ctx.data_end(), ip) {
        Ok(h) => h,
        Err(outcome) => return outcome.into(),
    };
    // SAFETY: the parser bounds-checked every pointer; they are only read, and only before the
    // first helper call below invalidates them.
    let (old_addr, old_port, fragment) = unsafe {
        (
            wire::get4(&raw const (*ip.ip).src_addr),
            wire::get2(&raw const (*h.ports)[0]),
            fragment_key(ip, FRAGMENT_EGRESS),
        )
    };
    let at = EgressOffsets {
        ip: ip.ip as usize - start,
        port: h.ports as usize - start,
        l4_check: h.l4_check as usize - start,
    };
    if !maps::port_in_use(true, ip.proto, old_port) {
        return Outcome::NoReservation.into();
    }
    let key = EndpointKey::new(old_addr, old_port, ip.proto);
    let Some(entry) = maps::reverse_entry::<true>(&key) else {
        return Outcome::NoReservation.into();
    };
    // SAFETY: a map value, valid for the rest of the program.
    let (new_addr, new_port) = unsafe { ((*entry).addr, (*entry).port) };
    let change = Change {
        old_addr,
        new_addr,
        old_port,
        new_port,
    };
    let written = if ip.ihl == IPV4_HDR_LEN && checksum_in_packet(ctx) {
        if ip.proto == IPPROTO_UDP {
            rewrite_in_one_store::<{ UDP_STORE_LEN / 2 }>(
                ctx,
                &at,
                UDP_CHECK_IN_STORE,
                true,
                &change,
            )
        } else {
            rewrite_in_one_store::<{ TCP_STORE_LEN / 2 }>(
                ctx,
                &at,
                TCP_CHECK_IN_STORE,
                false,
                &change,
            )
        }
    } else {
        None
    };
    let written = match written {
        Some(done) => done,
        None => rewrite_with_helpers(ctx, &at, ip.proto, &change)
            .inspect(|()| maps::count(pf_common::counters::EGRESS_BY_HELPERS)),
    };
    if let Err(verdict) = written {
        return verdict;
    }
    if ip.frags & IP_MF != 0 {
        track_datagram(&fragment, key);
    }
    // SAFETY: this run's lookup.
    unsafe { maps::count_nat(entry, ip.ip_len) };
    Outcome::Rewritten.into()
}

/// Where the fields an egress rewrite writes are, from the start of the packet.
struct EgressOffsets {
    ip: usize,
    port: usize,
    l4_check: usize,
}

/// A source rewrite: the address and port before and after.
struct Change {
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    old_port: [u8; 2],
    new_port: [u8; 2],
}

const IPV4_HDR_LEN: usize = 20;
/// The region one store rewrites, from the IPv4 checksum to the end of the TCP or UDP checksum,
/// for an IPv4 header without options: the checksum and addresses (10 bytes), then the TCP
/// header up to its checksum's end (18) or the whole UDP header (8).
const TCP_STORE_LEN: usize = 10 + 18;
const UDP_STORE_LEN: usize = 10 + 8;
/// Where, in that region, the source address, the source port and the TCP/UDP checksum sit.
const SRC_IN_STORE: usize = IPV4_SRC_OFFSET - IPV4_CHECK_OFFSET;
const PORT_IN_STORE: usize = IPV4_HDR_LEN - IPV4_CHECK_OFFSET;
const TCP_CHECK_IN_STORE: usize = PORT_IN_STORE + 16;
const UDP_CHECK_IN_STORE: usize = PORT_IN_STORE + 6;

/// Whether the skb's TCP/UDP checksum is whole in the packet, so an incremental update of the
/// field (RFC 1624, as XDP does) is right: `CHECKSUM_UNNECESSARY` (verified on receipt: a
/// WireGuard tunnel's packets, a NIC's with receive offload) or `CHECKSUM_NONE` (computed in
/// software, or never verified). Not for `CHECKSUM_PARTIAL` (the field holds only the
/// pseudo-header sum, for the NIC to finish) or `CHECKSUM_COMPLETE` (`skb->csum` must follow
/// the change): those take the helpers, which know the skb's state.
///
/// No program can read `ip_summed`; `bpf_csum_level` tells it apart. `QUERY` answers for
/// `CHECKSUM_UNNECESSARY` only. Otherwise `INC` turns only `CHECKSUM_NONE` into
/// `CHECKSUM_UNNECESSARY` (level 0), which a second `QUERY` sees, and `RESET` turns it back,
/// leaving the skb as it came.
#[inline(always)]
fn checksum_in_packet(ctx: &TcContext) -> bool {
    use aya_ebpf::{
        bindings::{BPF_CSUM_LEVEL_INC, BPF_CSUM_LEVEL_QUERY, BPF_CSUM_LEVEL_RESET},
        helpers::bpf_csum_level,
    };
    let skb = ctx.skb.skb;
    // SAFETY: the program's own skb; bpf_csum_level changes no packet data.
    unsafe {
        if bpf_csum_level(skb, BPF_CSUM_LEVEL_QUERY as u64) >= 0 {
            return true;
        }
        bpf_csum_level(skb, BPF_CSUM_LEVEL_INC as u64);
        if bpf_csum_level(skb, BPF_CSUM_LEVEL_QUERY as u64) < 0 {
            return false;
        }
        bpf_csum_level(skb, BPF_CSUM_LEVEL_RESET as u64);
    }
    true
}

/// The egress rewrite of a packet whose checksums are whole in it (see
/// [`checksum_in_packet`]) and whose IPv4 header has no options: the bytes from the IPv4
/// checksum to the end of the TCP/UDP checksum (`W` 16-bit words) are read, rewritten as XDP rewrites them, and
/// written back with one `bpf_skb_store_bytes`, which makes them writable first (so a cloned
/// skb is copied only when pf rewrites it, and a failure leaves the packet as it was). `None`
/// when the region is not directly readable: the helpers do it then.
#[inline(always)]
fn rewrite_in_one_store<const W: usize>(
    ctx: &TcContext,
    at: &EgressOffsets,
    check_at: usize,
    udp: bool,
    c: &Change,
) -> Option<Result<(), EgressVerdict>> {
    let region: *mut [[u8; 2]; W] =
        ptr_at(ctx.data(), ctx.data_end(), at.ip + IPV4_CHECK_OFFSET).ok()?;
    let mut buf = [[0u8; 2]; W];
    let mut i = 0;
    while i < W {
        // SAFETY: bounds-checked just above.
        buf[i] = unsafe { wire::get2(&raw const (*region)[i]) };
        i += 1;
    }
    let get = |b: &[[u8; 2]; W], at: usize| u16::from_be_bytes(b[at / 2]);
    let ip_check = checksum::update_addr(get(&buf, 0), c.old_addr, c.new_addr);
    let l4_check = get(&buf, check_at);
    let l4_check = if udp {
        checksum::update_udp_addr_port(l4_check, c.old_addr, c.new_addr, c.old_port, c.new_port)
    } else {
        checksum::update_addr_port(l4_check, c.old_addr, c.new_addr, c.old_port, c.new_port)
    };
    buf[0] = ip_check.to_be_bytes();
    buf[SRC_IN_STORE / 2] = [c.new_addr[0], c.new_addr[1]];
    buf[SRC_IN_STORE / 2 + 1] = [c.new_addr[2], c.new_addr[3]];
    buf[PORT_IN_STORE / 2] = c.new_port;
    buf[check_at / 2] = l4_check.to_be_bytes();
    Some(
        ctx.store(at.ip + IPV4_CHECK_OFFSET, &buf, 0)
            .map_err(|_| Outcome::RewriteFailed.into()),
    )
}

/// The egress rewrite with the skb helpers, for any checksum state: `bpf_l4_csum_replace`
/// knows `CHECKSUM_PARTIAL` (it changes the pseudo-header sum, and not for the port) and
/// `CHECKSUM_COMPLETE` (it keeps `skb->csum` right).
#[inline(always)]
fn rewrite_with_helpers(
    ctx: &TcContext,
    at: &EgressOffsets,
    proto: u8,
    c: &Change,
) -> Result<(), EgressVerdict> {
    let l4_flags = if proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let (old_a, new_a) = (
        u32::from_ne_bytes(c.old_addr) as u64,
        u32::from_ne_bytes(c.new_addr) as u64,
    );
    let (old_p, new_p) = (
        u16::from_ne_bytes(c.old_port) as u64,
        u16::from_ne_bytes(c.new_port) as u64,
    );
    // The first helper touches the deepest byte pf writes, so it makes the whole range writable;
    // if it fails, nothing has changed yet and the packet can pass as it was.
    if ctx
        .l4_csum_replace(
            at.l4_check,
            old_a,
            new_a,
            l4_flags | BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .is_err()
    {
        return Err(Outcome::RewriteFailed.into());
    }
    let rest_ok = ctx
        .l4_csum_replace(at.l4_check, old_p, new_p, l4_flags | 2)
        .is_ok()
        && ctx
            .l3_csum_replace(at.ip + IPV4_CHECK_OFFSET, old_a, new_a, 4)
            .is_ok()
        && ctx.store(at.ip + IPV4_SRC_OFFSET, &c.new_addr, 0).is_ok()
        && ctx.store(at.port, &c.new_port, 0).is_ok();
    if rest_ok { Ok(()) } else { Err(HALF_REWRITTEN) }
}

/// The egress side of `ingress_later_fragment`: the source address follows the first fragment's.
#[inline(always)]
fn egress_later_fragment(ctx: &TcContext, ip: &Ipv4) -> EgressVerdict {
    let start = ctx.data();
    // SAFETY: the parser bounds-checked `ip.ip`; read before any helper call.
    let (key, old_addr, ip_check, addr_off) = unsafe {
        (
            fragment_key(ip, FRAGMENT_EGRESS),
            (*ip.ip).src_addr,
            u16::from_be_bytes((*ip.ip).check),
            ip.ip as usize - start + 12,
        )
    };
    let Some(entry) = tracked_key(&key).and_then(|k| maps::reverse_entry::<true>(&k)) else {
        return Outcome::Fragment.into();
    };
    // SAFETY: a map value, valid for the rest of the program.
    let new_addr = unsafe { (*entry).addr };
    let check = checksum::update_addr(ip_check, old_addr, new_addr).to_be_bytes();
    if ctx.store(addr_off - 2, &check, 0).is_err() {
        return Outcome::RewriteFailed.into();
    }
    if ctx.store(addr_off, &new_addr, 0).is_err() {
        return HALF_REWRITTEN;
    }
    // SAFETY: this run's lookup.
    unsafe { maps::count_nat(entry, ip.ip_len) };
    Outcome::Rewritten.into()
}

/// An ICMP error about a packet that reached a tunnel endpoint through pf (so the embedded
/// destination is that endpoint) leaves about the public endpoint instead: the embedded
/// destination becomes the public address and port. The outer source becomes the public address
/// too when the tunnel endpoint sent the error itself; an error the server (or a hop inside the
/// tunnel) sent keeps its own source. The fields are written with `bpf_skb_store_bytes`, the
/// checksums computed here: ICMP is never CHECKSUM_PARTIAL, and every change is balanced by a
/// checksum change in the same packet, so a CHECKSUM_COMPLETE sum stays right.
#[inline(always)]
fn egress_icmp_error(ctx: &TcContext, start: usize, end: usize, ip: &Ipv4) -> EgressVerdict {
    let e = match parse_icmp_error(start, end, ip) {
        Ok(e) => e,
        Err(outcome) => return outcome.into(),
    };
    // SAFETY: the parser bounds-checked every pointer; they are only read, and only before the
    // first helper call below invalidates them.
    let (old_addr, old_port, outer_src, old) = unsafe {
        (
            (*e.inner_ip).dst_addr,
            (*e.inner_ports)[1],
            (*ip.ip).src_addr,
            icmp_old_checks(ip, &e),
        )
    };
    let key = EndpointKey::new(old_addr, old_port, e.inner_proto);
    let Some(entry) = maps::reverse_entry::<false>(&key) else {
        return Outcome::NoReservation.into();
    };
    // SAFETY: a map value.
    let (new_addr, new_port) = unsafe { ((*entry).addr, (*entry).port) };
    let outer_changes = outer_src == old_addr;
    let c = icmp_checks(&old, old_addr, new_addr, old_port, new_port, outer_changes);
    let offset = |p: usize| p - start;
    let outer_ip = offset(ip.ip as usize);
    let inner_ip = offset(e.inner_ip as usize);
    let inner_ports = offset(e.inner_ports as usize);
    let icmp_check = offset(e.icmp_check as usize);

    // Deepest first: if the first store fails, nothing has changed yet. Without a quoted
    // checksum, the first store writes the embedded destination port back as it was, and the
    // next gives it its new value.
    // SAFETY: the parser bounds-checked the pointer; no helper has changed the packet yet.
    let (icmp, new_l4) = unsafe { with_inner_l4(&c, &e, old_addr, new_addr, old_port, new_port) };
    let first = ctx.store(offset(e.inner_l4_check as usize), &new_l4.to_be_bytes(), 0);
    if first.is_err() {
        return Outcome::RewriteFailed.into();
    }
    let rest_ok = ctx.store(inner_ports + 2, &new_port, 0).is_ok()
        && ctx.store(inner_ip + 16, &new_addr, 0).is_ok()
        && ctx
            .store(inner_ip + 10, &c.inner_ip.to_be_bytes(), 0)
            .is_ok()
        && ctx.store(icmp_check, &icmp.to_be_bytes(), 0).is_ok()
        && (!outer_changes
            || (ctx.store(outer_ip + 12, &new_addr, 0).is_ok()
                && ctx
                    .store(outer_ip + 10, &c.outer_ip.to_be_bytes(), 0)
                    .is_ok()));
    if !rest_ok {
        return HALF_REWRITTEN;
    }
    Outcome::IcmpErrorRewritten.into()
}
