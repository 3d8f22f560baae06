//! Bounded header parsing shared by both programs (the xdp-tools header-cursor style).
//!
//! Policy, the same in both directions (`tests/src/model.rs` states it in full):
//! - Ethernet, then at most one VLAN tag (802.1Q or 802.1ad); a second tag is `VlanStacked`.
//! - IPv4 only. IHL is honoured, so options are allowed and skipped. Version not 4, IHL below 5,
//!   or a total length shorter than the header is `BadIpHeader`; a total length longer than the
//!   frame is `Truncated` (Ethernet padding after a shorter total length is fine).
//! - TCP, UDP, and ICMP errors (destination unreachable, time exceeded, parameter problem) whose
//!   embedded packet is TCP or UDP. Anything else is `OtherProtocol`.
//! - A TCP (20 bytes) or UDP (8 bytes) header must lie inside both the frame and the IP total
//!   length, or the packet is `Truncated`. A later fragment (non-zero offset) has no such header;
//!   the caller places it through the fragment table.
//! - An ICMP error must quote at least the embedded IPv4 header and 8 bytes after it (RFC 792),
//!   all inside the total length, or it is `Truncated`.

use core::mem::size_of;

use network_types::{eth::EthHdr, ip::Ipv4Hdr, vlan::VlanHdr};
use pf_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, counters::Outcome};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
/// The MF flag of the IPv4 `frags` field.
pub const IP_MF: u16 = 0x2000;
/// The fragment offset bits of the IPv4 `frags` field.
pub const IP_OFFSET_MASK: u16 = 0x1fff;
const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
const TCP_CHECK_OFFSET: usize = 16;
const UDP_CHECK_OFFSET: usize = 6;
const ICMP_HDR_LEN: usize = 8;
const ICMP_CHECK_OFFSET: usize = 2;
/// The ICMP error types RFC 5508 has a NAT translate: each quotes the packet it is about.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// The most an ICMP error is read for: the embedded IPv4 header and its first 8 bytes after it.
const QUOTED_PORTS_LEN: usize = 8;
const MAX_IPV4_HDR_LEN: usize = 60;

/// Deepest header a TCP/UDP packet pf rewrites can need: Ethernet, one VLAN tag, the largest
/// IPv4 header, and a TCP header.
pub const MAX_HEADERS_LEN: usize = EthHdr::LEN + VlanHdr::LEN + MAX_IPV4_HDR_LEN + TCP_HDR_LEN;

/// Deepest byte an ICMP error translation reads: the outer headers, ICMP's, the largest
/// embedded IPv4 header and the embedded TCP checksum.
pub const MAX_ICMP_ERROR_LEN: usize = EthHdr::LEN
    + VlanHdr::LEN
    + MAX_IPV4_HDR_LEN
    + ICMP_HDR_LEN
    + MAX_IPV4_HDR_LEN
    + TCP_CHECK_OFFSET
    + 2;

/// An IPv4 packet whose header passed the checks every packet gets.
pub struct Ipv4 {
    pub ip: *mut Ipv4Hdr,
    /// Offset of the layer-4 header from the start of the packet.
    pub l4_off: usize,
    /// IPv4 header length in bytes.
    pub ihl: usize,
    /// IPv4 total length, host order.
    pub ip_len: u16,
    pub proto: u8,
    /// The flags and fragment offset field, host order.
    pub frags: u16,
}

/// The two fields of a TCP/UDP header that pf rewrites, each bounds-checked.
pub struct Ports {
    /// Source port, destination port.
    pub ports: *mut [[u8; 2]; 2],
    /// The TCP or UDP checksum field.
    pub l4_check: *mut [u8; 2],
}

/// An ICMP error about a TCP/UDP packet, with the fields a translation reads or writes.
pub struct IcmpError {
    pub icmp_check: *mut [u8; 2],
    pub inner_ip: *mut Ipv4Hdr,
    /// The embedded packet's source and destination ports.
    pub inner_ports: *mut [[u8; 2]; 2],
    /// The embedded TCP/UDP checksum when the error quotes it (`has_inner_l4_check`: UDP's
    /// always is, within the 8 bytes; TCP's is 16 bytes in, which RFC 792 does not promise);
    /// else the embedded destination port, so that the pointer is always valid. Users read and write
    /// through it unconditionally and choose the *values* by the flag: a branch on whether it
    /// exists, taken twice, is what kernels before 6.6 cannot verify (LLVM re-derives the
    /// condition from lengths the 6.1 verifier has lost track of), and they reject the program.
    pub inner_l4_check: *mut [u8; 2],
    pub has_inner_l4_check: bool,
    pub inner_proto: u8,
}

/// 16-bit packet access. A field typed `[u8; N]` has alignment 1, and LLVM's BPF backend splits
/// every access it cannot prove aligned into single bytes (an address costs four loads and six
/// shifts and ors). Every field pf reads or writes sits at an even offset in the frame (Ethernet
/// 14, a VLAN tag 4, IPv4 headers and options multiples of 4), so 16-bit accesses are exact
/// there; and the verifier allows packet access at any alignment where the CPU does
/// (`CONFIG_HAVE_EFFICIENT_UNALIGNED_ACCESS`: x86-64, arm64), so even an odd frame start would
/// only be slower, never wrong.
pub mod wire {
    /// SAFETY (all four): `p` must have been bounds-checked by the parser.
    #[inline(always)]
    pub unsafe fn get2(p: *const [u8; 2]) -> [u8; 2] {
        unsafe { (p as *const u16).read().to_ne_bytes() }
    }

    #[inline(always)]
    pub unsafe fn set2(p: *mut [u8; 2], v: [u8; 2]) {
        unsafe { (p as *mut u16).write(u16::from_ne_bytes(v)) }
    }

    #[inline(always)]
    pub unsafe fn get4(p: *const [u8; 4]) -> [u8; 4] {
        let p = p as *const [u8; 2];
        let (hi, lo) = unsafe { (get2(p), get2(p.add(1))) };
        [hi[0], hi[1], lo[0], lo[1]]
    }

    #[inline(always)]
    pub unsafe fn set4(p: *mut [u8; 4], v: [u8; 4]) {
        let p = p as *mut [u8; 2];
        unsafe {
            set2(p, [v[0], v[1]]);
            set2(p.add(1), [v[2], v[3]]);
        }
    }
}

/// A pointer to a `T` at `offset` from `start`, if the whole `T` lies before `end`.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Result<*mut T, Outcome> {
    if start + offset + size_of::<T>() > end {
        return Err(Outcome::Truncated);
    }
    Ok((start + offset) as *mut T)
}

/// The IPv4 header length from the version/IHL byte, if the version is 4 and IHL at least 5.
#[inline(always)]
fn header_len(vihl: u8) -> Result<usize, Outcome> {
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Outcome::BadIpHeader);
    }
    Ok(ihl)
}

/// Parses Ethernet, an optional VLAN tag and the IPv4 header of the packet between `start` and
/// `end` (the directly readable data). `frame_len` is the length of the whole frame, which for
/// an skb may extend past `end`.
#[inline(always)]
pub fn parse_ipv4(start: usize, end: usize, frame_len: usize) -> Result<Ipv4, Outcome> {
    let eth: *mut EthHdr = ptr_at(start, end, 0)?;
    // SAFETY (all reads below): each pointer was bounds-checked by ptr_at.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3_off = EthHdr::LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: *mut VlanHdr = ptr_at(start, end, l3_off)?;
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        l3_off += VlanHdr::LEN;
        if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
            return Err(Outcome::VlanStacked);
        }
    }
    if ether_type != ETH_P_IPV4 {
        return Err(Outcome::NotIpv4);
    }
    parse_ipv4_header(start, end, frame_len, l3_off)
}

/// Parses the IPv4 header at the start of a packet from a device without a link layer
/// (WireGuard, tun), where an skb starts with its network header. Another version (IPv6) is
/// `BadIpHeader`.
#[inline(always)]
pub fn parse_ipv4_l3(start: usize, end: usize, frame_len: usize) -> Result<Ipv4, Outcome> {
    parse_ipv4_header(start, end, frame_len, 0)
}

/// The IPv4 header at `l3_off`.
#[inline(always)]
fn parse_ipv4_header(
    start: usize,
    end: usize,
    frame_len: usize,
    l3_off: usize,
) -> Result<Ipv4, Outcome> {
    let ip: *mut Ipv4Hdr = ptr_at(start, end, l3_off)?;
    let ihl = header_len(unsafe { (*ip).vihl })?;
    let ip_len = u16::from_be_bytes(unsafe { wire::get2(&raw const (*ip).tot_len) });
    if (ip_len as usize) < ihl {
        return Err(Outcome::BadIpHeader);
    }
    if l3_off + ip_len as usize > frame_len {
        return Err(Outcome::Truncated);
    }
    Ok(Ipv4 {
        ip,
        l4_off: l3_off + ihl,
        ihl,
        ip_len,
        proto: unsafe { (*ip).proto },
        frags: u16::from_be_bytes(unsafe { wire::get2(&raw const (*ip).frags) }),
    })
}

/// The TCP or UDP header at `l4_off`, which must lie inside both the packet data and the `room`
/// bytes the IP total length leaves for it.
#[inline(always)]
fn parse_ports_at(
    start: usize,
    end: usize,
    l4_off: usize,
    room: usize,
    proto: u8,
) -> Result<Ports, Outcome> {
    let (l4_len, check_off) = if proto == IPPROTO_TCP {
        (TCP_HDR_LEN, TCP_CHECK_OFFSET)
    } else {
        (UDP_HDR_LEN, UDP_CHECK_OFFSET)
    };
    if l4_len > room || start + l4_off + l4_len > end {
        return Err(Outcome::Truncated);
    }
    // The two fields pf rewrites, each bounds-checked where the verifier can see it.
    Ok(Ports {
        ports: ptr_at(start, end, l4_off)?,
        l4_check: ptr_at(start, end, l4_off + check_off)?,
    })
}

/// The TCP/UDP header of an unfragmented packet or a first fragment.
#[inline(always)]
pub fn parse_ports(start: usize, end: usize, ip: &Ipv4) -> Result<Ports, Outcome> {
    parse_ports_at(start, end, ip.l4_off, ip.ip_len as usize - ip.ihl, ip.proto)
}

/// An ICMP error (outer packet already parsed, not a fragment) and the TCP/UDP packet it quotes.
#[inline(always)]
pub fn parse_icmp_error(start: usize, end: usize, ip: &Ipv4) -> Result<IcmpError, Outcome> {
    // Bytes the total length leaves after the outer IPv4 header.
    let room = ip.ip_len as usize - ip.ihl;
    if ICMP_HDR_LEN > room {
        return Err(Outcome::Truncated);
    }
    // Type, code and checksum in one bounds check. (A one-byte check would be folded by LLVM
    // into a form the verifier does not credit with the byte.)
    let icmp: *mut [u8; 4] = ptr_at(start, end, ip.l4_off)?;
    // SAFETY (all reads below): each pointer was bounds-checked by ptr_at.
    let icmp_type = unsafe { (*icmp)[0] };
    if icmp_type != ICMP_DEST_UNREACH
        && icmp_type != ICMP_TIME_EXCEEDED
        && icmp_type != ICMP_PARAMETER_PROBLEM
    {
        return Err(Outcome::OtherProtocol);
    }
    let icmp_check = (icmp as usize + ICMP_CHECK_OFFSET) as *mut [u8; 2];

    let inner_off = ip.l4_off + ICMP_HDR_LEN;
    let room = room - ICMP_HDR_LEN;
    if Ipv4Hdr::LEN > room {
        return Err(Outcome::Truncated);
    }
    let inner_ip: *mut Ipv4Hdr = ptr_at(start, end, inner_off)?;
    let inner_ihl = header_len(unsafe { (*inner_ip).vihl })?;
    let inner_proto = unsafe { (*inner_ip).proto };
    if inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP {
        return Err(Outcome::OtherProtocol);
    }
    // A later fragment quotes no ports; a first fragment does.
    if u16::from_be_bytes(unsafe { (*inner_ip).frags }) & IP_OFFSET_MASK != 0 {
        return Err(Outcome::Fragment);
    }
    if inner_ihl + QUOTED_PORTS_LEN > room {
        return Err(Outcome::Truncated);
    }
    let room = room - inner_ihl;
    let inner_l4_off = inner_off + inner_ihl;
    let inner_ports: *mut [[u8; 2]; 2] = ptr_at(start, end, inner_l4_off)?;
    let check_off = if inner_proto == IPPROTO_TCP {
        TCP_CHECK_OFFSET
    } else {
        UDP_CHECK_OFFSET
    };
    let has_inner_l4_check = check_off + 2 <= room;
    // The fallback is the embedded destination port: ingress never changes it, and egress
    // writes it anyway, so writing it back unchanged first keeps egress's deepest-first order.
    let inner_l4_check = if has_inner_l4_check {
        ptr_at(start, end, inner_l4_off + check_off)?
    } else {
        // SAFETY: within the ports just bounds-checked (taken from that pointer, so the
        // verifier sees the same checked range).
        unsafe { &raw mut (*inner_ports)[1] }
    };
    Ok(IcmpError {
        icmp_check,
        inner_ip,
        inner_ports,
        inner_l4_check,
        has_inner_l4_check,
        inner_proto,
    })
}

/// Whether `proto` is one pf parses past the IPv4 header.
#[inline(always)]
pub fn is_tcp_udp(proto: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP
}

/// Whether `proto` is ICMP.
#[inline(always)]
pub fn is_icmp(proto: u8) -> bool {
    proto == IPPROTO_ICMP
}
