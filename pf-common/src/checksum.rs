//! Internet checksum arithmetic (RFC 1071) and its incremental update (RFC 1624).
//!
//! Values are 16-bit words as read big-endian from the packet. The eBPF ingress program calls the
//! `update_*` functions on every rewritten packet; the full-sum functions exist so tests (and
//! anything else that wants the truth) can recompute a checksum from scratch.

/// Folds a 32-bit one's complement accumulator into 16 bits (end-around carry).
#[inline(always)]
pub const fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[inline(always)]
const fn hi(addr: [u8; 4]) -> u32 {
    u16::from_be_bytes([addr[0], addr[1]]) as u32
}

#[inline(always)]
const fn lo(addr: [u8; 4]) -> u32 {
    u16::from_be_bytes([addr[2], addr[3]]) as u32
}

/// RFC 1624 eqn. 3, `HC' = ~(~HC + ~m + m')`, for an IPv4 address change: the IPv4 header
/// checksum after the source or destination address changed from `old` to `new`.
#[inline(always)]
pub const fn update_addr(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let sum = (!check) as u32 + (!hi(old) & 0xffff) + (!lo(old) & 0xffff) + hi(new) + lo(new);
    !fold(sum)
}

/// RFC 1624 eqn. 3 for one 16-bit word of the covered data changing from `old` to `new`.
#[inline(always)]
pub const fn update_word(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    !fold(sum)
}

/// RFC 1624 eqn. 3 for a TCP checksum after an address (part of the pseudo-header) and a port
/// changed together.
#[inline(always)]
pub const fn update_addr_port(
    check: u16,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    old_port: [u8; 2],
    new_port: [u8; 2],
) -> u16 {
    let sum = (!check) as u32
        + (!hi(old_addr) & 0xffff)
        + (!lo(old_addr) & 0xffff)
        + hi(new_addr)
        + lo(new_addr)
        + (!u16::from_be_bytes(old_port) as u32)
        + u16::from_be_bytes(new_port) as u32;
    !fold(sum)
}

/// The UDP form of [`update_addr_port`]: a checksum of 0 means "none" (RFC 768) and stays 0, and a
/// computed 0 is sent as 0xffff, as the sender would have.
#[inline(always)]
pub const fn update_udp_addr_port(
    check: u16,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    old_port: [u8; 2],
    new_port: [u8; 2],
) -> u16 {
    if check == 0 {
        return 0;
    }
    match update_addr_port(check, old_addr, new_addr, old_port, new_port) {
        0 => 0xffff,
        c => c,
    }
}

/// One's complement sum of `data` (odd length padded with a zero byte), added to `initial`.
/// Not for the eBPF side: it loops over the whole slice.
pub fn sum(data: &[u8], initial: u32) -> u32 {
    let mut acc = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u16::from_be_bytes([w[0], w[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u64) << 8;
    }
    while acc > 0xffff_ffff {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    acc as u32
}

/// The RFC 1071 checksum of `data` with `initial` already summed in (e.g. a pseudo-header).
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    !fold(sum(data, initial))
}

/// Sum of the TCP/UDP pseudo-header for IPv4 (RFC 793 / RFC 768).
pub fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u32 {
    hi(src) + lo(src) + hi(dst) + lo(dst) + proto as u32 + l4_len as u32
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::{IPPROTO_TCP, IPPROTO_UDP};

    /// RFC 1624 section 4's worked example of eqn. 3 (one 16-bit field).
    #[test]
    fn rfc1624_example() {
        // HC = 0xDD2F, m = 0x5555, m' = 0x3285 gives HC' = 0x0000.
        let sum = (!0xDD2Fu16) as u32 + (!0x5555u16) as u32 + 0x3285;
        assert_eq!(!fold(sum), 0x0000);
        assert_eq!(update_word(0xDD2F, 0x5555, 0x3285), 0x0000);
        // The same through update_addr: the other word of the address does not change.
        assert_eq!(
            update_addr(0xDD2F, [0x55, 0x55, 1, 2], [0x32, 0x85, 1, 2]),
            0x0000
        );
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(
            update_udp_addr_port(0, [1, 2, 3, 4], [5, 6, 7, 8], [0, 80], [0, 81]),
            0
        );
    }

    /// A random IPv4 packet with valid checksums: header (with options), then TCP or UDP.
    struct Packet {
        bytes: Vec<u8>,
        ihl: usize,
        proto: u8,
    }

    fn random_packet(rng: &mut StdRng) -> Packet {
        let ihl = 4 * rng.random_range(5..=15usize);
        let proto = if rng.random_bool(0.5) {
            IPPROTO_TCP
        } else {
            IPPROTO_UDP
        };
        let l4_hdr = if proto == IPPROTO_TCP { 20 } else { 8 };
        let payload = rng.random_range(0..200usize);
        let total = ihl + l4_hdr + payload;
        let mut b: Vec<u8> = (0..total).map(|_| rng.random()).collect();
        b[0] = 0x40 | (ihl / 4) as u8;
        b[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        b[6] &= 0x40; // DF may be set; never MF or an offset
        b[7] = 0;
        b[9] = proto;
        b[10..12].fill(0);
        let ip_check = checksum(&b[..ihl], 0);
        b[10..12].copy_from_slice(&ip_check.to_be_bytes());
        let l4_len = (total - ihl) as u16;
        let check_at = ihl + if proto == IPPROTO_TCP { 16 } else { 6 };
        if proto == IPPROTO_UDP {
            b[ihl + 4..ihl + 6].copy_from_slice(&l4_len.to_be_bytes());
        }
        b[check_at..check_at + 2].fill(0);
        let src = b[12..16].try_into().unwrap();
        let dst = b[16..20].try_into().unwrap();
        let mut c = checksum(&b[ihl..], pseudo_header_sum(src, dst, proto, l4_len));
        if proto == IPPROTO_UDP {
            if rng.random_ratio(1, 10) {
                c = 0; // sender chose no checksum
            } else if c == 0 {
                c = 0xffff;
            }
        }
        b[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
        Packet {
            bytes: b,
            ihl,
            proto,
        }
    }

    fn l4_check_at(p: &Packet) -> usize {
        p.ihl + if p.proto == IPPROTO_TCP { 16 } else { 6 }
    }

    fn full_l4_checksum(p: &Packet) -> u16 {
        let mut b = p.bytes.clone();
        let at = l4_check_at(p);
        b[at..at + 2].fill(0);
        let src = b[12..16].try_into().unwrap();
        let dst = b[16..20].try_into().unwrap();
        let l4_len = (b.len() - p.ihl) as u16;
        let c = checksum(&b[p.ihl..], pseudo_header_sum(src, dst, p.proto, l4_len));
        if p.proto == IPPROTO_UDP && c == 0 {
            0xffff
        } else {
            c
        }
    }

    /// The incremental update of a destination (address, port) rewrite, as the ingress program does
    /// it, must give exactly the checksums a from-scratch recomputation gives, on many random
    /// packets and rewrites. Rewrites of the source (egress) are the same arithmetic.
    #[test]
    fn incremental_matches_full_recomputation() {
        let mut rng = StdRng::seed_from_u64(0x5046_2d63_7375_6d00);
        for _ in 0..20_000 {
            let mut p = random_packet(&mut rng);
            let udp_no_checksum = p.proto == IPPROTO_UDP && {
                let at = l4_check_at(&p);
                p.bytes[at..at + 2] == [0, 0]
            };
            // Rewrite destination (ingress) or source (egress) at random.
            let (addr_at, port_at) = if rng.random_bool(0.5) {
                (16, p.ihl + 2)
            } else {
                (12, p.ihl)
            };
            let new_addr: [u8; 4] = rng.random();
            let new_port: [u8; 2] = rng.random();
            let old_addr: [u8; 4] = p.bytes[addr_at..addr_at + 4].try_into().unwrap();
            let old_port: [u8; 2] = p.bytes[port_at..port_at + 2].try_into().unwrap();

            let ip_check = u16::from_be_bytes([p.bytes[10], p.bytes[11]]);
            let at = l4_check_at(&p);
            let l4_check = u16::from_be_bytes([p.bytes[at], p.bytes[at + 1]]);
            let new_ip_check = update_addr(ip_check, old_addr, new_addr);
            let new_l4_check = if p.proto == IPPROTO_TCP {
                update_addr_port(l4_check, old_addr, new_addr, old_port, new_port)
            } else {
                update_udp_addr_port(l4_check, old_addr, new_addr, old_port, new_port)
            };
            p.bytes[addr_at..addr_at + 4].copy_from_slice(&new_addr);
            p.bytes[port_at..port_at + 2].copy_from_slice(&new_port);
            p.bytes[10..12].copy_from_slice(&new_ip_check.to_be_bytes());
            p.bytes[at..at + 2].copy_from_slice(&new_l4_check.to_be_bytes());

            // IPv4 header: the incremental value is the recomputed one, and it verifies.
            let mut hdr = p.bytes[..p.ihl].to_vec();
            hdr[10..12].fill(0);
            assert_eq!(new_ip_check, checksum(&hdr, 0), "IPv4 header checksum");
            assert_eq!(fold(sum(&p.bytes[..p.ihl], 0)), 0xffff);

            if udp_no_checksum {
                assert_eq!(new_l4_check, 0, "UDP without checksum keeps 0");
            } else {
                assert_eq!(new_l4_check, full_l4_checksum(&p), "L4 checksum");
            }
        }
    }
}
