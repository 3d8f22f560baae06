//! Differential testing: the loaded programs (BPF_PROG_TEST_RUN) against the reference model
//! (`crate::model`) on generated and mutated frames: the verdict, every output byte, and the one
//! counter that moves must agree. With a fixed seed by default (at least 20,000 frames per
//! program); `cargo xtask fuzz` sets PF_FUZZ_SEED and PF_FUZZ_PACKETS for long random runs. A
//! mismatch prints the seed, the frame's index and the frame in hex, so it can be replayed and
//! turned into a fixture.

use pf::{dataplane::Programs, spec::Reservation, state::State};
use pf_common::{IPPROTO_TCP, IPPROTO_UDP, checksum, counters::Outcome};
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::common::{TempPinDir, counters_moved, hex, require_root, run_program};
use crate::{
    model::{self, Direction, NatTable},
    packet::{ETH_P_ARP, ETH_P_IPV6, Pkt},
};

const RESERVATIONS: [(&str, &str); 4] = [
    ("198.51.100.1:8080/tcp", "10.8.0.2:80"),
    ("198.51.100.1:5353/udp", "10.8.0.2:53"),
    ("198.51.100.1:8810-8815/both", "10.8.0.3:9810"),
    ("198.51.100.7:443/both", "10.8.0.9:8443"),
];
const DEFAULT_SEED: u64 = 0x5eed_0f0f;
const DEFAULT_PACKETS: u64 = 20_000;

fn tables(reservations: &[Reservation]) -> (NatTable, NatTable) {
    let mut forward = NatTable::new();
    let mut reverse = NatTable::new();
    for r in reservations {
        for &proto in r.public.protocols.ip_protocols() {
            for (public_port, target_port) in r.port_pairs() {
                let public = (r.public.addr.octets(), public_port.to_be_bytes());
                let target = (r.target_addr.octets(), target_port.to_be_bytes());
                forward.insert((public.0, public.1, proto), target);
                reverse.insert((target.0, target.1, proto), public);
            }
        }
    }
    (forward, reverse)
}

/// A random endpoint: usually one a reservation names (so lookups hit), sometimes a near miss
/// (right address, wrong port or protocol), sometimes anything.
fn endpoint(rng: &mut StdRng, nat: &NatTable) -> ([u8; 4], u16, Option<u8>) {
    let keys: Vec<_> = nat.keys().collect();
    match rng.random_range(0..10) {
        0..=5 => {
            let (addr, port, proto) = *keys[rng.random_range(0..keys.len())];
            (addr, u16::from_be_bytes(port), Some(proto))
        }
        6..=7 => {
            let (addr, _, _) = *keys[rng.random_range(0..keys.len())];
            (addr, rng.random(), None)
        }
        _ => (rng.random(), rng.random(), None),
    }
}

/// A valid frame: TCP, UDP or ICMP over IPv4 with random addresses, ports, options, VLAN tag,
/// TTL, flags, payload and padding; hitting `nat` more often than not.
fn generated(rng: &mut StdRng, direction: Direction, nat: &NatTable) -> Vec<u8> {
    let (addr, port, proto) = endpoint(rng, nat);
    let proto = proto.unwrap_or(match rng.random_range(0..5) {
        0..=1 => IPPROTO_TCP,
        2..=3 => IPPROTO_UDP,
        _ => crate::packet::IPPROTO_ICMP,
    });
    let (other_addr, other_port) = (rng.random::<[u8; 4]>(), rng.random::<u16>());
    let mut p = match direction {
        Direction::Ingress => Pkt::tcp(other_addr, other_port, addr, port),
        Direction::Egress => Pkt::tcp(addr, port, other_addr, other_port),
    };
    p.proto = proto;
    if rng.random_bool(0.2) {
        p.vlans = vec![rng.random_range(1..4095)];
    }
    if rng.random_bool(0.2) {
        let words = rng.random_range(1..=10);
        p.ip_options = (0..words * 4).map(|_| rng.random()).collect();
    }
    p.ttl = rng.random();
    p.frag = [0, 0x4000, 0x8000][rng.random_range(0..3)]; // none, DF, the reserved bit
    let len = rng.random_range(0..300);
    p.payload = (0..len).map(|_| rng.random()).collect();
    p.udp_no_checksum = rng.random_bool(0.1);
    if rng.random_bool(0.2) {
        p.trailer = (0..rng.random_range(1..20)).map(|_| rng.random()).collect();
    }
    p.frame()
}

/// A generated frame, broken in one of the ways a forwarder meets on the Internet.
fn mutated(rng: &mut StdRng, direction: Direction, nat: &NatTable) -> Vec<u8> {
    let mut f = generated(rng, direction, nat);
    let l3 = if u16::from_be_bytes([f[12], f[13]]) == 0x8100 {
        18
    } else {
        14
    };
    match rng.random_range(0..10) {
        0 => f.truncate(rng.random_range(0..f.len())),
        1 => {
            for _ in 0..rng.random_range(1..4) {
                let bit = rng.random_range(0..f.len() * 8);
                f[bit / 8] ^= 1 << (bit % 8);
            }
        }
        2 => f[l3] = (f[l3] & 0xf0) | rng.random_range(0..16), // IHL anything
        3 => {
            let total: u16 = match rng.random_range(0..3) {
                0 => rng.random(),
                1 => rng.random_range(0..40),
                _ => (f.len() - l3) as u16 + rng.random_range(1..8),
            };
            f[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
        }
        4 => {
            // First (MF), middle (MF and an offset) or last (an offset) fragment.
            let frag: u16 = [0x2000, 0x2000 | 185, 370][rng.random_range(0..3)];
            f[l3 + 6..l3 + 8].copy_from_slice(&frag.to_be_bytes());
        }
        5 => {
            // QinQ: an outer 802.1ad tag in front of whatever is there.
            let tag = [0x88, 0xa8, 0, rng.random_range(1..255)];
            f.splice(12..12, tag);
        }
        6 => {
            let ether_type = [ETH_P_IPV6, ETH_P_ARP, rng.random()][rng.random_range(0..3)];
            f[12..14].copy_from_slice(&ether_type.to_be_bytes());
        }
        7 => {
            let len = rng.random_range(0..120);
            f = (0..len).map(|_| rng.random()).collect();
        }
        8 => f[l3] = (rng.random_range(0..16) << 4) | (f[l3] & 0x0f), // version anything
        _ => {
            // An 802.1ad tag instead of 802.1Q, or a tag inserted when there was none.
            if l3 == 18 {
                f[12..14].copy_from_slice(&[0x88, 0xa8]);
            } else {
                f.splice(12..12, [0x81, 0x00, 0, 7]);
            }
        }
    }
    f
}

/// BPF_PROG_TEST_RUN refuses some frames before the program runs (EINVAL): any frame shorter
/// than an Ethernet header, and for an skb program an IPv4 or IPv6 ethertype with less than a
/// whole IP header behind it. No driver or stack hands such a frame to these hooks, so there is
/// nothing to compare; any other refusal is a failure.
fn kernel_refuses(direction: Direction, frame: &[u8]) -> bool {
    if frame.len() < 14 {
        return true;
    }
    direction == Direction::Egress
        && match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0800 => frame.len() < 14 + 20,
            ETH_P_IPV6 => frame.len() < 14 + 40,
            _ => false,
        }
}

/// A changed frame's checksums: the IPv4 header's must verify, and the TCP/UDP one must verify
/// whenever it did before the rewrite (a wrong one stays wrong, by design).
fn checksums_hold(before: &[u8], after: &[u8]) -> bool {
    let l3 = if after[12..14] == [0x08, 0x00] {
        14
    } else {
        18
    };
    let ihl = usize::from(after[l3] & 0x0f) * 4;
    let ip_ok = |f: &[u8]| checksum::checksum(&f[l3..l3 + ihl], 0) == 0;
    let l4_ok = |f: &[u8]| {
        let total = usize::from(u16::from_be_bytes([f[l3 + 2], f[l3 + 3]]));
        let proto = f[l3 + 9];
        let l4 = &f[l3 + ihl..l3 + total];
        if proto == IPPROTO_UDP && l4[6..8] == [0, 0] {
            return true;
        }
        let src: [u8; 4] = f[l3 + 12..l3 + 16].try_into().unwrap();
        let dst: [u8; 4] = f[l3 + 16..l3 + 20].try_into().unwrap();
        let pseudo = checksum::pseudo_header_sum(src, dst, proto, l4.len() as u16);
        checksum::checksum(l4, pseudo) == 0
    };
    (!ip_ok(before) || ip_ok(after)) && (!l4_ok(before) || l4_ok(after))
}

fn run_direction(direction: Direction, seed: u64, packets: u64) {
    require_root();
    let dir = TempPinDir::new();
    let mut state = State::open_for_write(&dir.dir).expect("creating pf's maps");
    let reservations: Vec<Reservation> = RESERVATIONS
        .iter()
        .map(|(p, t)| Reservation::new(p.parse().unwrap(), t.parse().unwrap()).unwrap())
        .collect();
    state.reserve_all(&reservations).expect("reserving");
    let programs = Programs::load(&dir.dir).expect("loading pf's programs");
    let (forward, reverse) = tables(&reservations);
    let nat = match direction {
        Direction::Ingress => &forward,
        Direction::Egress => &reverse,
    };

    let mut rng = StdRng::seed_from_u64(seed);
    let mut compared = 0u64;
    let mut rewritten = 0u64;
    let mut index = 0u64;
    while compared < packets {
        index += 1;
        assert!(index < packets * 2, "too many frames the kernel refuses");
        let frame = if rng.random_bool(0.5) {
            generated(&mut rng, direction, nat)
        } else {
            mutated(&mut rng, direction, nat)
        };
        if kernel_refuses(direction, &frame) {
            continue;
        }
        let want = model::expected(direction, &frame, nat);
        let before = state.counters().unwrap();
        let context = || {
            format!(
                "{direction:?} seed {seed:#x} frame {index}: {}",
                hex(&frame)
            )
        };
        let (verdict, out) = run_program(&programs, direction == Direction::Ingress, &frame)
            .unwrap_or_else(|e| panic!("{}: BPF_PROG_TEST_RUN: {e}", context()));
        let after = state.counters().unwrap();
        assert_eq!(
            (
                verdict,
                counters_moved(&before, &after, direction == Direction::Ingress)
            ),
            (want.verdict, vec![(want.outcome.name(), 1)]),
            "{}: verdict and counter",
            context()
        );
        assert_eq!(
            hex(&out),
            hex(&want.frame),
            "{}: output bytes (got, want)",
            context()
        );
        if want.outcome == Outcome::Rewritten {
            rewritten += 1;
            assert!(
                checksums_hold(&frame, &out),
                "{}: a rewritten frame's checksums",
                context()
            );
        }
        compared += 1;
    }
    // The generator must exercise the rewrite, not only the refusals.
    assert!(
        rewritten * 10 > compared,
        "only {rewritten} of {compared} frames were rewritten"
    );
    println!("{direction:?}: {compared} frames agree with the model ({rewritten} rewritten)");
}

fn seed_and_count() -> (u64, u64) {
    let seed = std::env::var("PF_FUZZ_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(DEFAULT_SEED);
    let packets = std::env::var("PF_FUZZ_PACKETS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_PACKETS);
    (seed, packets)
}

#[test]
fn ingress_agrees_with_the_model() {
    let (seed, packets) = seed_and_count();
    run_direction(Direction::Ingress, seed, packets);
}

#[test]
fn egress_agrees_with_the_model() {
    let (seed, packets) = seed_and_count();
    run_direction(Direction::Egress, seed, packets);
}
