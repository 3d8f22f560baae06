//! Differential testing: the loaded programs (BPF_PROG_TEST_RUN) against the reference model
//! (`crate::model`) on generated and mutated frames: the verdict, every output byte, and the one
//! counter that moves must agree. With a fixed seed by default (at least 20,000 frames per
//! program); `cargo xtask fuzz` sets PF_FUZZ_SEED and PF_FUZZ_PACKETS for long random runs. A
//! mismatch prints the seed, the frame's index and the frame in hex, so it can be replayed and
//! turned into a fixture.
//!
//! Trigger gates: one reservation waits on a gate the rig opens (with the trigger program) and
//! is in the model's tables like any other; one waits on a gate left closed, and is in the
//! kernel's maps but not in the model's, which is how the model states a closed gate
//! (`crate::model`, step 12). The trigger program has its own differential test
//! ([`trigger_agrees_with_the_model`]).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddrV4,
    time::Duration,
};

use aya::maps::MapData;
use pf::{
    domain::{
        limits::{Limits, SourceList},
        net::Ipv4Net,
        spec::{PortRange, Protocols, Reservation},
    },
    kernel::{
        limit::LimitRule,
        trigger::{Openings, TriggerRule},
    },
};
use pf_common::{
    FragmentKey, FragmentValue, IPPROTO_TCP, IPPROTO_UDP, checksum,
    counters::{Outcome, Trigger},
    map_names,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::common::{LoadedPf, counters_moved, hex, moved, reservations, run_once, run_program};
use crate::{
    kit::packet::{ETH_P_ARP, ETH_P_IPV6, Pkt},
    model::{self, Direction, Model, NatKey, NatTable, TriggerTable},
};

const RESERVATIONS: [(&str, &str); 4] = [
    ("198.51.100.1:8080/tcp", "10.8.0.2:80"),
    ("198.51.100.1:5353/udp", "10.8.0.2:53"),
    ("198.51.100.1:8810-8815/both", "10.8.0.3:9810"),
    ("198.51.100.7:443/both", "10.8.0.9:8443"),
];
/// Reservations with a source list (public, target, limit slot, allow-list or deny-list, its
/// networks); the generator sends from inside and outside them ([`LISTED_SOURCES`]).
const LISTED: [(&str, &str, u16, bool, &[&str]); 2] = [
    (
        "198.51.100.1:9000-9001/both",
        "10.8.0.4:9000",
        1,
        true,
        &["203.0.113.0/25", "192.0.2.7/32"],
    ),
    (
        "198.51.100.7:9100/udp",
        "10.8.0.4:9100",
        2,
        false,
        &["203.0.113.0/26"],
    ),
];
/// Sources on both sides of [`LISTED`]'s networks.
const LISTED_SOURCES: [[u8; 4]; 6] = [
    [203, 0, 113, 1],
    [203, 0, 113, 100],
    [203, 0, 113, 200],
    [192, 0, 2, 7],
    [192, 0, 2, 8],
    [198, 51, 100, 99],
];

/// Reservations behind trigger gates (public, target, gate, the gate's trigger: client and UDP
/// port). The rig opens [`OPEN_GATE`] and leaves [`CLOSED_GATE`] closed.
const GATED: [(&str, &str, u16, [u8; 4], u16); 2] = [
    (
        "198.51.100.7:6000-6001/both",
        "10.8.0.3:7000",
        OPEN_GATE,
        [10, 8, 0, 3],
        9000,
    ),
    (
        "198.51.100.7:6100/both",
        "10.8.0.9:7100",
        CLOSED_GATE,
        [10, 8, 0, 9],
        9100,
    ),
];
const OPEN_GATE: u16 = 1;
const CLOSED_GATE: u16 = 2;
/// Long, so no gate lapses during a run (traffic through the open one keeps it open besides).
const IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// `TUNNEL_NETWORKS` in the kernel and the model: covers two targets (10.8.0.2 and .3), not
/// the third (10.8.0.9), so egress misses are both dropped and passed.
const TUNNEL_NETWORK: &str = "10.8.0.0/30";
const DEFAULT_SEED: u64 = 0x5eed_0f0f;
const DEFAULT_PACKETS: u64 = 20_000;
/// Frames between clearings of the fragment table (kernel and model alike).
const FORGET_EVERY: u64 = 2_000;

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

/// A random endpoint: usually one a key of `table` names (so lookups hit), sometimes a near
/// miss (right address, wrong port or protocol), sometimes anything.
fn endpoint<V>(rng: &mut StdRng, table: &HashMap<NatKey, V>) -> ([u8; 4], u16, Option<u8>) {
    // Sorted: a HashMap's order differs from run to run, and a seed must replay.
    let mut keys: Vec<_> = table.keys().collect();
    keys.sort_unstable();
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

/// Random Ethernet/IPv4 dressing shared by every generated frame: VLAN tag, IP options, TTL,
/// payload, UDP without checksum, trailing padding.
fn dress(rng: &mut StdRng, p: &mut Pkt) {
    if rng.random_bool(0.2) {
        p.vlans = vec![rng.random_range(1..4095)];
    }
    if rng.random_bool(0.2) {
        let words = rng.random_range(1..=10);
        p.ip_options = (0..words * 4).map(|_| rng.random()).collect();
    }
    p.ttl = rng.random();
    p.id = rng.random_range(0..4); // few identifications, so datagrams collide now and then
    let len = rng.random_range(0..300);
    p.payload = (0..len).map(|_| rng.random()).collect();
    p.udp_no_checksum = rng.random_bool(0.1);
    if rng.random_bool(0.2) {
        p.trailer = (0..rng.random_range(1..20)).map(|_| rng.random()).collect();
    }
}

/// A TCP or UDP packet (sometimes ICMP echo) to (ingress) or from (egress) a random endpoint.
fn transport(rng: &mut StdRng, direction: Direction, nat: &NatTable) -> Pkt {
    let (addr, port, proto) = endpoint(rng, nat);
    let proto = proto.unwrap_or(match rng.random_range(0..5) {
        0..=1 => IPPROTO_TCP,
        2..=3 => IPPROTO_UDP,
        _ => crate::kit::packet::IPPROTO_ICMP,
    });
    let other_addr = if rng.random_bool(0.4) {
        LISTED_SOURCES[rng.random_range(0..LISTED_SOURCES.len())]
    } else {
        rng.random::<[u8; 4]>()
    };
    let other_port = rng.random::<u16>();
    let mut p = match direction {
        Direction::Ingress => Pkt::tcp(other_addr, other_port, addr, port),
        Direction::Egress => Pkt::tcp(addr, port, other_addr, other_port),
    };
    p.proto = proto;
    dress(rng, &mut p);
    // None, DF, the reserved bit, or (rarely) a first or later fragment of its own.
    p.frag = [0, 0x4000, 0x8000, 0x2000, 0x2000 | 7, 12][rng.random_range(0..6)];
    if p.frag & 0x1fff != 0 {
        p.raw_l4 = Some(
            (0..rng.random_range(8..100))
                .map(|_| rng.random())
                .collect(),
        );
    }
    p
}

/// An ICMP error about a packet of a forwarded flow going the other way: at ingress one pf's
/// egress sent (its source a public endpoint), at egress one pf's ingress delivered (its
/// destination a tunnel endpoint). Quoted whole or cut anywhere; sent to or from the quoted
/// endpoint, mostly.
fn icmp_error(rng: &mut StdRng, direction: Direction, nat: &NatTable) -> Pkt {
    let quoted = transport(
        rng,
        match direction {
            Direction::Ingress => Direction::Egress,
            Direction::Egress => Direction::Ingress,
        },
        nat,
    );
    let bytes = quoted.ipv4();
    let cut = match rng.random_range(0..4) {
        0 => rng.random_range(0..=bytes.len()),
        1 => (20 + quoted.ip_options.len() + 8).min(bytes.len()), // RFC 792's minimum
        _ => bytes.len(),
    };
    let (icmp_type, code) = [
        (3, 3),
        (3, 4),
        (3, 1),
        (11, 0),
        (12, 0),
        (5, 1),
        (0, 0),
        (8, 0),
    ][rng.random_range(0..8)];
    let endpoint = match direction {
        Direction::Ingress => quoted.src,
        Direction::Egress => quoted.dst,
    };
    let other: [u8; 4] = rng.random();
    let near = if rng.random_bool(0.8) {
        endpoint
    } else {
        rng.random()
    };
    let mut p = match direction {
        Direction::Ingress => Pkt::icmp_error(other, near, icmp_type, code, &bytes[..cut]),
        Direction::Egress => Pkt::icmp_error(near, other, icmp_type, code, &bytes[..cut]),
    };
    if rng.random_bool(0.2) {
        p.vlans = vec![rng.random_range(1..4095)];
    }
    if rng.random_bool(0.1) {
        p.ip_options = vec![0x01; 4 * rng.random_range(1..=10)];
    }
    if rng.random_bool(0.05) {
        p.frag = [0x2000, 0x2000 | 7, 12][rng.random_range(0..3)];
    }
    p
}

/// A valid frame: TCP, UDP, ICMP echo or an ICMP error over IPv4, with random addresses,
/// ports, options, VLAN tag, TTL, flags, payload and padding; hitting `nat` more often than not.
fn generated(rng: &mut StdRng, direction: Direction, nat: &NatTable) -> Vec<u8> {
    if rng.random_bool(0.25) {
        icmp_error(rng, direction, nat).frame()
    } else {
        transport(rng, direction, nat).frame()
    }
}

/// A fragmented TCP or UDP datagram: two or three fragments, in order or not, each as it would
/// arrive.
fn fragment_train(rng: &mut StdRng, direction: Direction, nat: &NatTable) -> Vec<Vec<u8>> {
    let mut p = transport(rng, direction, nat);
    if p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP {
        p.proto = IPPROTO_UDP;
    }
    p.frag = 0;
    p.raw_l4 = None;
    p.payload = (0..rng.random_range(16..400))
        .map(|_| rng.random())
        .collect();
    let whole = Pkt {
        raw_l4: None,
        ..p.clone()
    };
    let l4_len = whole.ipv4().len() - 20 - whole.ip_options.len();
    // Split points at multiples of 8, the first possibly inside the TCP/UDP header.
    let mut cuts: Vec<usize> = (0..rng.random_range(1..=2))
        .map(|_| 8 * rng.random_range(1..=(l4_len - 1) / 8))
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let [first, rest] = whole.fragments(cuts[0]);
    let mut frames = vec![first.frame()];
    let rest_bytes = rest.raw_l4.clone().unwrap();
    let mut at = cuts[0];
    for &cut in cuts[1..].iter().chain(std::iter::once(&l4_len)) {
        let piece = rest_bytes[at - cuts[0]..cut - cuts[0]].to_vec();
        let more = if cut < l4_len { 0x2000 } else { 0 };
        frames.push(
            Pkt {
                frag: more | (at / 8) as u16,
                raw_l4: Some(piece),
                ..rest.clone()
            }
            .frame(),
        );
        at = cut;
    }
    if rng.random_bool(0.2) {
        frames.swap(0, 1); // a later fragment overtakes the first
    }
    frames
}

/// A generated frame, broken in one of the ways a forwarder meets on the Internet.
fn mutated(rng: &mut StdRng, direction: Direction, nat: &NatTable) -> Vec<u8> {
    let f = generated(rng, direction, nat);
    mutate(rng, f)
}

/// `f` broken in one of the ways a forwarder meets on the Internet.
fn mutate(rng: &mut StdRng, mut f: Vec<u8>) -> Vec<u8> {
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

/// Whether `data` (a whole header or message with its checksum inside) sums to zero.
fn verifies(data: &[u8], initial: u32) -> bool {
    checksum::checksum(data, initial) == 0
}

/// The checksums a rewritten frame carries, each as it verified or not: the IPv4 header's; for
/// a whole TCP/UDP packet the TCP/UDP one (a fragment's covers the whole datagram and cannot
/// be checked alone); for an ICMP error the ICMP one, the quoted IPv4 header's, and the quoted
/// TCP/UDP one if the whole quoted packet is there.
fn checksum_states(frame: &[u8]) -> Vec<(&'static str, bool)> {
    let l3 = if frame[12..14] == [0x08, 0x00] {
        14
    } else {
        18
    };
    let ihl = usize::from(frame[l3] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]));
    let proto = frame[l3 + 9];
    let fragment = u16::from_be_bytes([frame[l3 + 6], frame[l3 + 7]]) & 0x3fff != 0;
    let mut states = vec![("IPv4 header", verifies(&frame[l3..l3 + ihl], 0))];
    let l4_ok = |ip: &[u8], l4: &[u8]| {
        let proto = ip[9];
        if proto == IPPROTO_UDP && l4[6..8] == [0, 0] {
            return true;
        }
        let src: [u8; 4] = ip[12..16].try_into().unwrap();
        let dst: [u8; 4] = ip[16..20].try_into().unwrap();
        verifies(
            l4,
            checksum::pseudo_header_sum(src, dst, proto, l4.len() as u16),
        )
    };
    let l4 = &frame[l3 + ihl..l3 + total];
    if proto == crate::kit::packet::IPPROTO_ICMP {
        states.push(("ICMP", verifies(l4, 0)));
        let quoted = &l4[8..];
        let quoted_ihl = usize::from(quoted[0] & 0x0f) * 4;
        if quoted.len() >= quoted_ihl {
            states.push(("quoted IPv4 header", verifies(&quoted[..quoted_ihl], 0)));
        }
        let quoted_total = usize::from(u16::from_be_bytes([quoted[2], quoted[3]]));
        if quoted_total == quoted.len() && quoted_total >= quoted_ihl {
            states.push(("quoted TCP/UDP", l4_ok(quoted, &quoted[quoted_ihl..])));
        }
    } else if !fragment {
        states.push(("TCP/UDP", l4_ok(&frame[l3..], l4)));
    }
    states
}

/// A rewritten frame's checksums: each must verify whenever it did before the rewrite (a wrong
/// one stays wrong, by design).
fn checksums_hold(before: &[u8], after: &[u8]) -> bool {
    checksum_states(before)
        .iter()
        .zip(checksum_states(after))
        .all(|(&(_, was), (_, is))| !was || is)
}

/// Loads both trigger programs (the verifier must accept each); only the Ethernet one can be
/// run, as BPF_PROG_TEST_RUN hands a TC program an Ethernet frame.
fn load_triggers(pf: &mut LoadedPf) {
    for ethernet in [true, false] {
        pf.programs
            .load_trigger(ethernet)
            .unwrap_or_else(|e| panic!("loading the trigger program (ethernet: {ethernet}): {e}"));
    }
}

/// Whether trigger gate `gate` is open now.
fn gate_open(pf: &LoadedPf, gate: u16) -> bool {
    pf.state.trigger_gate(gate).unwrap().open_for.is_some()
}

/// The loaded programs, their maps filled with `RESERVATIONS` and [`GATED`], and the model
/// beside them (without the reservation behind the closed gate).
struct Rig {
    pf: LoadedPf,
    model: Model,
    /// The NAT tables of the reservation behind the closed gate: forward, reverse.
    closed: (NatTable, NatTable),
    fragments: aya::maps::HashMap<MapData, FragmentKey, FragmentValue>,
}

impl Rig {
    fn new() -> Self {
        let mut reservations = reservations(&RESERVATIONS);
        let mut pf = LoadedPf::new(&reservations);
        let mut closed = Vec::new();
        for (public, target, gate, client, port) in GATED {
            let r = super::common::reservations(&[(public, target)]).remove(0);
            pf.state
                .reserve_tagged(&r, pf::kernel::state::EntryTags::gated(gate))
                .unwrap();
            pf.state
                .arm_trigger(&TriggerRule {
                    gate,
                    client: client.into(),
                    protocols: Protocols::Udp,
                    ports: PortRange::single(port),
                    idle_timeout: IDLE_TIMEOUT,
                })
                .unwrap();
            if gate == OPEN_GATE {
                reservations.push(r);
            } else {
                closed.push(r);
            }
        }
        let mut sources = std::collections::HashMap::new();
        for (public, target, slot, allow, networks) in LISTED {
            let r = super::common::reservations(&[(public, target)]).remove(0);
            let nets: Vec<Ipv4Net> = networks.iter().map(|n| n.parse().unwrap()).collect();
            let list = if allow {
                SourceList::Allow(nets.clone())
            } else {
                SourceList::Deny(nets.clone())
            };
            let rule = LimitRule {
                slot,
                limits: Limits {
                    sources: Some(list),
                    ..Limits::default()
                },
            };
            pf.reserve_limited(&r, &rule);
            let model_list: model::SourceList = (
                allow,
                nets.iter()
                    .map(|n| (n.addr.octets(), n.mask().to_be_bytes()))
                    .collect(),
            );
            for key in tables(std::slice::from_ref(&r)).0.into_keys() {
                sources.insert(key, model_list.clone());
            }
            reservations.push(r);
        }
        load_triggers(&mut pf);
        let (client, port) = (GATED[0].3, GATED[0].4);
        run_once(
            pf.programs.trigger(true),
            &Pkt::udp(client, 40000, [203, 0, 113, 7], port).frame(),
            None,
        )
        .unwrap();
        assert!(gate_open(&pf, OPEN_GATE) && !gate_open(&pf, CLOSED_GATE));
        let (forward, reverse) = tables(&reservations);
        let fragments = pf.map(map_names::FRAGMENTS);
        let net: Ipv4Net = TUNNEL_NETWORK.parse().unwrap();
        pf.state.set_tunnel_networks(&[net]).unwrap();
        let mut model = Model::new(forward, reverse);
        model.tunnel_networks = vec![(net.addr.octets(), net.mask().to_be_bytes())];
        model.sources = sources;
        Self {
            pf,
            model,
            closed: tables(&closed),
            fragments,
        }
    }

    /// The closed gate's NAT table for `direction`.
    fn closed(&self, direction: Direction) -> &NatTable {
        match direction {
            Direction::Ingress => &self.closed.0,
            Direction::Egress => &self.closed.1,
        }
    }

    /// The endpoints frames are generated for: every NAT entry of `direction`, the closed
    /// gate's too.
    fn nat(&self, direction: Direction) -> NatTable {
        let mut nat = match direction {
            Direction::Ingress => self.model.forward.clone(),
            Direction::Egress => self.model.reverse.clone(),
        };
        nat.extend(self.closed(direction).clone());
        nat
    }

    /// Empties the kernel's fragment table and the model's alike.
    fn forget_fragments(&mut self) {
        let keys: Vec<_> = self.fragments.keys().map(|k| k.unwrap()).collect();
        for k in keys {
            self.fragments.remove(&k).unwrap();
        }
        self.model.forget_fragments();
    }

    /// Runs `frame` through the loaded program and the model; the outcome if they agree on
    /// verdict, counter and every byte, and a rewritten frame's checksums hold, and
    /// `gate_closed` moved exactly when the frame was looked up by a key behind the closed gate;
    /// what differs if not. (The outcome is "gate_closed" for a frame that met the gate.)
    fn check(&mut self, direction: Direction, frame: &[u8]) -> Result<&'static str, String> {
        let ingress = direction == Direction::Ingress;
        let want = self.model.expected(direction, frame);
        let before = self.pf.state.counters().unwrap();
        let (verdict, out) = run_program(&self.pf.programs, ingress, frame)
            .map_err(|e| format!("BPF_PROG_TEST_RUN: {e}"))?;
        let after = self.pf.state.counters().unwrap();
        let got = (verdict, counters_moved(&before, &after, ingress));
        let wanted = (want.verdict, vec![(want.outcome.name(), 1)]);
        if got != wanted {
            return Err(format!("verdict and counter {got:?}, want {wanted:?}"));
        }
        let met_gate = model::nat_key(direction, frame)
            .is_some_and(|key| self.closed(direction).contains_key(&key));
        let gate_closed = after.gate_closed - before.gate_closed;
        if gate_closed != u64::from(met_gate) {
            return Err(format!(
                "gate_closed moved {gate_closed}, want {}",
                u64::from(met_gate)
            ));
        }
        if out != want.frame {
            return Err(format!(
                "output bytes\n  got  {}\n  want {}",
                hex(&out),
                hex(&want.frame)
            ));
        }
        let rewritten = matches!(
            want.outcome,
            Outcome::Rewritten | Outcome::IcmpErrorRewritten
        );
        if rewritten && !checksums_hold(frame, &out) {
            return Err("a rewritten frame's checksums do not hold".into());
        }
        Ok(if met_gate {
            "gate_closed"
        } else {
            want.outcome.name()
        })
    }
}

/// The regression corpus: frames that once told the programs and the model apart, or that sit
/// on a boundary worth keeping, one per line as `ingress|egress <hex>`. Run in file order, so
/// a later fragment may rely on a first fragment on an earlier line.
const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/frames.txt");

fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Appends a frame that told the program and the model apart to the corpus, so it stays a
/// test once fixed.
fn keep_in_corpus(direction: Direction, frame: &[u8], origin: &str, problem: &str) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(CORPUS)
        .expect("opening the corpus");
    let first_line = problem.lines().next().unwrap_or_default();
    writeln!(
        f,
        "# {origin}: {first_line}\n{} {}",
        format!("{direction:?}").to_lowercase(),
        hex(frame)
    )
    .expect("writing the corpus");
}

fn run_direction(direction: Direction, seed: u64, packets: u64) {
    let mut rig = Rig::new();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut outcomes = std::collections::BTreeMap::<&str, u64>::new();
    let mut compared = 0u64;
    let mut index = 0u64;
    let mut queue = std::collections::VecDeque::new();
    let mut next_forget = 0;
    while compared < packets {
        if queue.is_empty() {
            // The kernel's LRU table may forget a datagram early once it fills; keep it far
            // from full, and the model in step.
            if index >= next_forget {
                next_forget = index + FORGET_EVERY;
                rig.forget_fragments();
            }
            let nat = rig.nat(direction);
            match rng.random_range(0..20) {
                0..=1 => queue.extend(fragment_train(&mut rng, direction, &nat)),
                2..=10 => queue.push_back(generated(&mut rng, direction, &nat)),
                _ => queue.push_back(mutated(&mut rng, direction, &nat)),
            }
        }
        let frame = queue.pop_front().unwrap();
        index += 1;
        assert!(index < packets * 2, "too many frames the kernel refuses");
        if kernel_refuses(direction, &frame) {
            continue;
        }
        match rig.check(direction, &frame) {
            Ok(outcome) => *outcomes.entry(outcome).or_default() += 1,
            Err(problem) => {
                let origin = format!("found by seed {seed:x}, frame {index}");
                keep_in_corpus(direction, &frame, &origin, &problem);
                panic!(
                    "{direction:?} {origin}: {problem}\n  frame {}\n(added to {CORPUS})",
                    hex(&frame)
                );
            }
        }
        compared += 1;
    }
    // The generator must exercise every kind of rewrite, not only the refusals.
    let count = |name| outcomes.get(name).copied().unwrap_or(0);
    assert!(
        count("rewritten") * 10 > compared && count("icmp_error_rewritten") * 100 > compared,
        "too few rewrites: {outcomes:?}"
    );
    // Frames met the closed gate, and left both gates as they were.
    assert!(
        count("gate_closed") * 200 > compared,
        "too few frames met the closed gate: {outcomes:?}"
    );
    assert!(
        gate_open(&rig.pf, OPEN_GATE) && !gate_open(&rig.pf, CLOSED_GATE),
        "the gates changed during the run"
    );
    // At ingress, source lists both drop and pass.
    if direction == Direction::Ingress {
        assert!(
            count("limit_dropped") * 100 > compared,
            "too few frames a source list dropped: {outcomes:?}"
        );
    }
    // At egress, misses from a tunnel network are dropped and others passed: both are seen.
    if direction == Direction::Egress {
        assert!(
            count("tunnel_source_dropped") * 100 > compared
                && count("no_reservation") * 100 > compared,
            "the tunnel-source guard is not exercised both ways: {outcomes:?}"
        );
    }
    println!("{direction:?}: {compared} frames agree with the model: {outcomes:?}");
}

/// Every frame of the regression corpus agrees with the model.
#[test]
fn corpus_agrees_with_the_model() {
    let mut rig = Rig::new();
    let corpus = std::fs::read_to_string(CORPUS).expect("reading the corpus");
    let mut checked = 0;
    for (n, line) in corpus.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (direction, frame) = line.split_once(' ').expect("`direction hex`");
        let direction = match direction {
            "ingress" => Direction::Ingress,
            "egress" => Direction::Egress,
            other => panic!("{CORPUS}:{}: unknown direction {other}", n + 1),
        };
        let frame = from_hex(frame.trim());
        if let Err(problem) = rig.check(direction, &frame) {
            panic!("{CORPUS}:{}: {problem}", n + 1);
        }
        checked += 1;
    }
    assert!(checked > 0, "the corpus is empty");
    println!("{checked} corpus frames agree with the model");
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

/// The trigger rules of [`trigger_agrees_with_the_model`]: (gate, client, protocols, first and
/// last trigger port).
const TRIGGER_RULES: [(u16, [u8; 4], Protocols, u16, u16); 4] = [
    (1, [10, 8, 0, 2], Protocols::Udp, 6970, 6979),
    (2, [10, 8, 0, 2], Protocols::Tcp, 6667, 6667),
    (3, [10, 8, 0, 3], Protocols::Both, 5060, 5061),
    (4, [10, 8, 0, 9], Protocols::Both, 27015, 27015),
];
/// Frames between closings of every gate (disarmed and armed again, the model's open gates
/// forgotten), so that openings keep coming.
const CLOSE_EVERY: u64 = 200;

/// A frame a tunnel client might send: TCP or UDP (sometimes ICMP, now and then an ICMP error
/// quoting such a packet) from a trigger rule's client to one of its trigger ports more often
/// than not, else a near miss or anything; with the dressing and fragment flags of the NAT
/// frames.
fn trigger_frame(rng: &mut StdRng, ports: &TriggerTable) -> Vec<u8> {
    let (client, port, proto) = endpoint(rng, ports);
    let proto = proto.unwrap_or(match rng.random_range(0..5) {
        0..=1 => IPPROTO_TCP,
        2..=3 => IPPROTO_UDP,
        _ => crate::kit::packet::IPPROTO_ICMP,
    });
    let mut p = Pkt::tcp(client, rng.random(), rng.random(), port);
    p.proto = proto;
    dress(rng, &mut p);
    p.frag = [0, 0x4000, 0x8000, 0x2000, 0x2000 | 7, 12][rng.random_range(0..6)];
    if p.frag & 0x1fff != 0 {
        p.raw_l4 = Some(
            (0..rng.random_range(8..100))
                .map(|_| rng.random())
                .collect(),
        );
    }
    if rng.random_bool(0.05) {
        return Pkt::icmp_error(client, rng.random(), 3, 3, &p.ipv4()).frame();
    }
    p.frame()
}

/// An opened frame's source and destination, as the opening reports them.
fn trigger_endpoints(frame: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    let l3 = if matches!(frame[12..14], [0x81, 0x00] | [0x88, 0xa8]) {
        18
    } else {
        14
    };
    let l4 = l3 + usize::from(frame[l3] & 0x0f) * 4;
    let at = |addr: usize, port: usize| {
        SocketAddrV4::new(
            <[u8; 4]>::try_from(&frame[addr..addr + 4]).unwrap().into(),
            u16::from_be_bytes([frame[port], frame[port + 1]]),
        )
    };
    (at(l3 + 12, l4), at(l3 + 16, l4 + 2))
}

/// The trigger program (`pf_trigger`) against the model (steps 13 to 15) on generated and
/// mutated frames from tunnel clients, with [`TRIGGER_RULES`] armed: the verdict (always
/// TC_ACT_UNSPEC), every byte (always as it came), the one trigger counter that moves (and no
/// other), and the opening reported. A gate a frame opens stays open (the timeout is long), so
/// the model tracks it: the first trigger packet to a closed gate is `opened`, the next ones
/// `refreshed`, until the gates are closed again every [`CLOSE_EVERY`] frames.
#[test]
fn trigger_agrees_with_the_model() {
    let (seed, packets) = seed_and_count();
    let mut pf = LoadedPf::new(&[]);
    load_triggers(&mut pf);
    let mut openings = Openings::open(&pf.dir.dir).unwrap();
    let rules: Vec<TriggerRule> = TRIGGER_RULES
        .iter()
        .map(|&(gate, client, protocols, first, last)| TriggerRule {
            gate,
            client: client.into(),
            protocols,
            ports: PortRange::new(first, last).unwrap(),
            idle_timeout: IDLE_TIMEOUT,
        })
        .collect();
    let mut ports = TriggerTable::new();
    for r in &rules {
        pf.state.arm_trigger(r).unwrap();
        for &proto in r.protocols.ip_protocols() {
            for port in r.ports.first..=r.ports.last {
                ports.insert(
                    (r.client.octets(), port.to_be_bytes(), proto),
                    r.gate.into(),
                );
            }
        }
    }
    let mut open = HashSet::new();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut outcomes = std::collections::BTreeMap::<&str, u64>::new();
    let (mut compared, mut index) = (0u64, 0u64);
    while compared < packets {
        if index % CLOSE_EVERY == 0 {
            for r in &rules {
                pf.state.disarm_trigger(r).unwrap();
                pf.state.arm_trigger(r).unwrap();
            }
            open.clear();
        }
        let frame = trigger_frame(&mut rng, &ports);
        let frame = if rng.random_bool(0.4) {
            mutate(&mut rng, frame)
        } else {
            frame
        };
        index += 1;
        assert!(index < packets * 2, "too many frames the kernel refuses");
        if kernel_refuses(Direction::Egress, &frame) {
            continue;
        }
        let (want, opens) = model::trigger(&frame, &ports, &open);
        let before = pf.state.counters().unwrap();
        let (verdict, out) = run_once(pf.programs.trigger(true), &frame, None)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {}: {e}", hex(&frame)));
        let after = pf.state.counters().unwrap();
        let mut problems = Vec::new();
        if verdict != model::TC_ACT_UNSPEC || out != frame {
            problems.push(format!("verdict {verdict}, out {}", hex(&out)));
        }
        let got = moved(&before.trigger, &after.trigger);
        if got != [(want.name(), 1)] {
            problems.push(format!("trigger counters {got:?}, want {}", want.name()));
        }
        let others = [
            counters_moved(&before, &after, true),
            counters_moved(&before, &after, false),
        ]
        .concat();
        if !others.is_empty() || after.gate_closed != before.gate_closed {
            problems.push(format!("other counters moved: {others:?}"));
        }
        let reported: Vec<_> = openings
            .drain()
            .into_iter()
            .map(|o| (u32::from(o.gate), o.source, o.destination))
            .collect();
        let expected: Vec<_> = opens
            .map(|gate| {
                let (source, destination) = trigger_endpoints(&frame);
                (gate, source, destination)
            })
            .into_iter()
            .collect();
        if reported != expected {
            problems.push(format!("openings {reported:?}, want {expected:?}"));
        }
        if let Some(gate) = opens {
            open.insert(gate);
            if !gate_open(&pf, gate as u16) {
                problems.push(format!("gate {gate} is not open"));
            }
        }
        assert!(
            problems.is_empty(),
            "trigger, seed {seed:x}, frame {index}: {}\n  frame {}",
            problems.join("; "),
            hex(&frame)
        );
        *outcomes.entry(want.name()).or_default() += 1;
        compared += 1;
    }
    // Every outcome is exercised, openings many times over.
    let count = |t: Trigger| outcomes.get(t.name()).copied().unwrap_or(0);
    assert!(
        count(Trigger::Opened) * 500 > compared
            && Trigger::ALL.iter().all(|&t| count(t) * 100 > compared),
        "an outcome is too rare: {outcomes:?}"
    );
    println!("trigger: {compared} frames agree with the model: {outcomes:?}");
}
