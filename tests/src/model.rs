//! The reference model: what pf's two programs must do to any frame, given the NAT maps'
//! contents. It is the specification, written for clarity rather than speed, and the
//! differential tests (`tests/src/tests/differential.rs`, `cargo xtask fuzz`) hold the loaded
//! programs to it byte for byte.
//!
//! Both directions parse alike (the policy ARCHITECTURE.md states):
//! 1. Ethernet (14 bytes), then at most one VLAN tag (0x8100 or 0x88a8; a second is
//!    `VlanStacked`). Anything but IPv4 is `NotIpv4`.
//! 2. The 20-byte IPv4 header must be in the frame (`Truncated`). Version not 4 or IHL below 5
//!    is `BadIpHeader`, as is a total length shorter than the header. A total length reaching
//!    past the frame is `Truncated` (trailing padding is fine).
//! 3. Not TCP or UDP is `NotTcpUdp`; MF set or a fragment offset is `Fragment`.
//! 4. The TCP (20 bytes) or UDP (8 bytes) header must fit in the total length and in the frame
//!    (`Truncated`).
//! 5. Ingress looks up (destination address, destination port, protocol) in FORWARD_NAT, egress
//!    (source address, source port, protocol) in REVERSE_NAT. A miss is `NoReservation`.
//! 6. A hit rewrites that address and port. The IPv4 checksum and the TCP/UDP checksum are
//!    updated incrementally, RFC 1624 eqn. 3 (`HC' = ~(~HC + ~m + m')`), so a checksum that was
//!    wrong stays exactly as wrong. A UDP checksum of 0 (none) stays 0, and an updated UDP
//!    checksum of 0 is written 0xffff. The outcome is `Rewritten`.
//!
//! Every frame not rewritten leaves byte for byte as it came. The verdict is always XDP_PASS at
//! ingress and TC_ACT_OK at egress (TC_ACT_SHOT only for a rewrite that fails half way, which no
//! frame can cause in BPF_PROG_TEST_RUN).

use std::collections::HashMap;

use pf_common::{IPPROTO_TCP, IPPROTO_UDP, checksum, counters::Outcome};

pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;

/// One NAT map: (address, port, protocol) to (address, port), as the packet carries them.
pub type NatTable = HashMap<([u8; 4], [u8; 2], u8), ([u8; 4], [u8; 2])>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// Where the fields a rewrite touches lie in a frame that parsed.
struct Parsed {
    ip: usize,
    l4: usize,
    proto: u8,
}

fn be16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

fn parse(frame: &[u8]) -> Result<Parsed, Outcome> {
    const VLAN_TPIDS: [u16; 2] = [0x8100, 0x88a8];
    if frame.len() < 14 {
        return Err(Outcome::Truncated);
    }
    let mut ether_type = be16(frame, 12);
    let mut ip = 14;
    if VLAN_TPIDS.contains(&ether_type) {
        if frame.len() < 18 {
            return Err(Outcome::Truncated);
        }
        ether_type = be16(frame, 16);
        ip = 18;
        if VLAN_TPIDS.contains(&ether_type) {
            return Err(Outcome::VlanStacked);
        }
    }
    if ether_type != 0x0800 {
        return Err(Outcome::NotIpv4);
    }
    if frame.len() < ip + 20 {
        return Err(Outcome::Truncated);
    }
    let version = frame[ip] >> 4;
    let header_len = usize::from(frame[ip] & 0x0f) * 4;
    if version != 4 || header_len < 20 {
        return Err(Outcome::BadIpHeader);
    }
    let total_len = usize::from(be16(frame, ip + 2));
    if total_len < header_len {
        return Err(Outcome::BadIpHeader);
    }
    if ip + total_len > frame.len() {
        return Err(Outcome::Truncated);
    }
    let proto = frame[ip + 9];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Outcome::NotTcpUdp);
    }
    if be16(frame, ip + 6) & 0x3fff != 0 {
        return Err(Outcome::Fragment);
    }
    let l4_header_len = if proto == IPPROTO_TCP { 20 } else { 8 };
    let l4 = ip + header_len;
    if header_len + l4_header_len > total_len || l4 + l4_header_len > frame.len() {
        return Err(Outcome::Truncated);
    }
    Ok(Parsed { ip, l4, proto })
}

/// What the program for `direction` must do with `frame`, given its NAT map.
pub fn expected(direction: Direction, frame: &[u8], nat: &NatTable) -> Expected {
    let verdict = match direction {
        Direction::Ingress => XDP_PASS,
        Direction::Egress => TC_ACT_OK,
    };
    let untouched = |outcome| Expected {
        verdict,
        frame: frame.to_vec(),
        outcome,
    };
    let p = match parse(frame) {
        Ok(p) => p,
        Err(outcome) => return untouched(outcome),
    };
    // Ingress rewrites the destination, egress the source.
    let (addr_at, port_at) = match direction {
        Direction::Ingress => (p.ip + 16, p.l4 + 2),
        Direction::Egress => (p.ip + 12, p.l4),
    };
    let old_addr: [u8; 4] = frame[addr_at..addr_at + 4].try_into().unwrap();
    let old_port: [u8; 2] = frame[port_at..port_at + 2].try_into().unwrap();
    let Some(&(new_addr, new_port)) = nat.get(&(old_addr, old_port, p.proto)) else {
        return untouched(Outcome::NoReservation);
    };

    let mut out = frame.to_vec();
    out[addr_at..addr_at + 4].copy_from_slice(&new_addr);
    out[port_at..port_at + 2].copy_from_slice(&new_port);
    let ip_check = be16(frame, p.ip + 10);
    out[p.ip + 10..p.ip + 12]
        .copy_from_slice(&checksum::update_addr(ip_check, old_addr, new_addr).to_be_bytes());
    let check_at = p.l4 + if p.proto == IPPROTO_TCP { 16 } else { 6 };
    let l4_check = be16(frame, check_at);
    let new_check = if p.proto == IPPROTO_UDP {
        checksum::update_udp_addr_port(l4_check, old_addr, new_addr, old_port, new_port)
    } else {
        checksum::update_addr_port(l4_check, old_addr, new_addr, old_port, new_port)
    };
    out[check_at..check_at + 2].copy_from_slice(&new_check.to_be_bytes());
    Expected {
        verdict,
        frame: out,
        outcome: Outcome::Rewritten,
    }
}
