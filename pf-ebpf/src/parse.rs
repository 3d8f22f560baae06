//! Bounded header parsing shared by both programs (the xdp-tools header-cursor style).
//!
//! Policy, the same in both directions:
//! - Ethernet, then at most one VLAN tag (802.1Q or 802.1ad); a second tag is `VlanStacked`.
//! - IPv4 only. IHL is honoured, so options are allowed and skipped. IHL below 5, or a total
//!   length shorter than the header, is `BadIpHeader`; a total length longer than the frame is
//!   `Truncated` (Ethernet padding after a shorter total length is fine).
//! - TCP and UDP only. Fragments (MF set or a non-zero offset) are not touched: only the first
//!   fragment carries ports, so rewriting it alone would split a datagram across two addresses.
//! - The TCP (20 bytes) or UDP (8 bytes) header must lie inside both the frame and the IP total
//!   length, or the packet is `Truncated`.

use core::mem::size_of;

use network_types::{eth::EthHdr, ip::Ipv4Hdr, vlan::VlanHdr};
use pf_common::{IPPROTO_TCP, IPPROTO_UDP, counters::Outcome};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
/// MF flag and fragment offset bits of the IPv4 `frags` field.
const IP_MF_OFFSET_MASK: u16 = 0x3fff;
const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
const TCP_CHECK_OFFSET: usize = 16;
const UDP_CHECK_OFFSET: usize = 6;

/// Deepest header a packet pf rewrites can need: Ethernet, one VLAN tag, the largest IPv4
/// header, and a TCP header.
pub const MAX_HEADERS_LEN: usize = EthHdr::LEN + VlanHdr::LEN + 60 + TCP_HDR_LEN;

/// Where the headers of an IPv4 TCP/UDP packet lie. The pointers are checked against the end of
/// the packet data for the whole header they point into.
pub struct Headers {
    pub ip: *mut Ipv4Hdr,
    /// The first four bytes of the TCP/UDP header: source port, destination port.
    pub ports: *mut [[u8; 2]; 2],
    /// The TCP or UDP checksum field.
    pub l4_check: *mut [u8; 2],
    pub proto: u8,
    /// IPv4 total length, host order.
    pub ip_len: u16,
}

/// A pointer to a `T` at `offset` from `start`, if the whole `T` lies before `end`.
#[inline(always)]
fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Result<*mut T, Outcome> {
    if start + offset + size_of::<T>() > end {
        return Err(Outcome::Truncated);
    }
    Ok((start + offset) as *mut T)
}

/// Parses the packet between `start` and `end` (the directly readable data). `frame_len` is the
/// length of the whole frame, which for an skb may extend past `end`.
#[inline(always)]
pub fn parse(start: usize, end: usize, frame_len: usize) -> Result<Headers, Outcome> {
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

    let ip: *mut Ipv4Hdr = ptr_at(start, end, l3_off)?;
    let vihl = unsafe { (*ip).vihl };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Outcome::BadIpHeader);
    }
    let ip_len = u16::from_be_bytes(unsafe { (*ip).tot_len });
    if (ip_len as usize) < ihl {
        return Err(Outcome::BadIpHeader);
    }
    if l3_off + ip_len as usize > frame_len {
        return Err(Outcome::Truncated);
    }
    let proto = unsafe { (*ip).proto };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Outcome::NotTcpUdp);
    }
    if u16::from_be_bytes(unsafe { (*ip).frags }) & IP_MF_OFFSET_MASK != 0 {
        return Err(Outcome::Fragment);
    }

    let l4_off = l3_off + ihl;
    let (l4_len, check_off) = if proto == IPPROTO_TCP {
        (TCP_HDR_LEN, TCP_CHECK_OFFSET)
    } else {
        (UDP_HDR_LEN, UDP_CHECK_OFFSET)
    };
    if ihl + l4_len > ip_len as usize {
        return Err(Outcome::Truncated);
    }
    if start + l4_off + l4_len > end {
        return Err(Outcome::Truncated);
    }
    // The two fields pf rewrites, each bounds-checked where the verifier can see it.
    let ports: *mut [[u8; 2]; 2] = ptr_at(start, end, l4_off)?;
    let l4_check: *mut [u8; 2] = ptr_at(start, end, l4_off + check_off)?;
    Ok(Headers {
        ip,
        ports,
        l4_check,
        proto,
        ip_len,
    })
}
