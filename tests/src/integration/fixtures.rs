//! The runner of the fixture tables (`src/fixtures/`): every row through the real loaded XDP
//! and TC programs with BPF_PROG_TEST_RUN, with the maps filled by pf's own library; the
//! action, the packet out, the one counter that moved and the reservation's traffic are checked.

use pf::kernel::state::Stats;
use pf_common::counters::Outcome;

use super::common::{LoadedPf, counters_moved, hex, reservations, run_program};
use crate::fixtures::{self, Fixture, RESERVATIONS, leak_guard};

struct Harness(LoadedPf);

impl Harness {
    fn new() -> Self {
        Self(LoadedPf::new(&reservations(&RESERVATIONS)))
    }

    fn stats(&self) -> Stats {
        self.0.state.stats().expect("reading stats")
    }

    fn run(&self, ingress: bool, data: &[u8]) -> (u32, Vec<u8>) {
        run_program(&self.0.programs, ingress, data)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {}: {e:?}", hex(data)))
    }

    /// Runs every fixture; all mismatches are collected and reported together.
    fn check(&self, ingress: bool, fixtures: &[Fixture]) {
        let mut failures = Vec::new();
        for f in fixtures {
            let before = self.stats();
            let (action, out) = self.run(ingress, &f.packet_in);
            let after = self.stats();
            let moved = counters_moved(&before.counters, &after.counters, ingress);
            let mut problems = Vec::new();
            if action != f.action {
                problems.push(format!("action {action}, expected {}", f.action));
            }
            if out != f.packet_out {
                problems.push(format!(
                    "packet out differs\n    got      {}\n    expected {}",
                    hex(&out),
                    hex(&f.packet_out)
                ));
            }
            if moved != [(f.outcome.name(), 1)] {
                problems.push(format!(
                    "counters moved {moved:?}, expected [({:?}, 1)]",
                    f.outcome.name()
                ));
            }
            if f.outcome == Outcome::Rewritten {
                let traffic = |s: &Stats| {
                    s.reservations.iter().fold((0, 0), |(p, b), (_, t)| {
                        if ingress {
                            (p + t.in_packets, b + t.in_bytes)
                        } else {
                            (p + t.out_packets, b + t.out_bytes)
                        }
                    })
                };
                let (p0, b0) = traffic(&before);
                let (p1, b1) = traffic(&after);
                let ip_len = ip_total_length(&f.packet_in);
                if (p1 - p0, b1 - b0) != (1, ip_len) {
                    problems.push(format!(
                        "reservation traffic moved ({}, {}), expected (1, {ip_len})",
                        p1 - p0,
                        b1 - b0
                    ));
                }
            }
            if !problems.is_empty() {
                failures.push(format!("{}:\n  {}", f.description, problems.join("\n  ")));
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} fixtures failed:\n{}",
            failures.len(),
            fixtures.len(),
            failures.join("\n")
        );
    }
}

/// The IPv4 total length of a frame with at most one VLAN tag.
fn ip_total_length(frame: &[u8]) -> u64 {
    let l3 = if frame[12..14] == [0x81, 0x00] {
        18
    } else {
        14
    };
    u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]) as u64
}

#[test]
fn ingress_fixtures() {
    Harness::new().check(true, &fixtures::ingress::table());
}

#[test]
fn egress_fixtures() {
    Harness::new().check(false, &fixtures::egress::table());
}

#[test]
fn egress_tunnel_source_fixtures() {
    let mut h = Harness::new();
    h.0.state
        .set_tunnel_networks(&[leak_guard::TUNNEL_NETWORK.parse().unwrap()])
        .unwrap();
    h.check(false, &leak_guard::table());
    // Emptied, the guard drops nothing.
    h.0.state.set_tunnel_networks(&[]).unwrap();
    h.check(false, &leak_guard::without_networks_table());
}

/// `PORTS_IN_USE` follows every reservation: two reservations share a public port (on two
/// addresses) and a target port (on two clients), so releasing one must leave the other's
/// counts up; counts of zero hide the entries from the program of each direction (which is why
/// pf counts up before it writes), and `prune` (pf serve's reconcile) puts them right.
#[test]
fn port_counts_follow_every_reservation() {
    use aya::maps::{Array, MapData};
    use pf_common::{map_names, port_use_slot};

    let both = reservations(&[
        ("198.51.100.1:8080/tcp", "10.8.0.2:8080"),
        ("198.51.100.3:8080/tcp", "10.8.0.3:8080"),
    ]);
    let mut h = Harness(LoadedPf::new(&both));
    let to_second =
        crate::kit::packet::Pkt::tcp([203, 0, 113, 7], 40000, [198, 51, 100, 3], 8080).frame();
    let from_second =
        crate::kit::packet::Pkt::tcp([10, 8, 0, 3], 8080, [203, 0, 113, 7], 40000).frame();
    let to_first =
        crate::kit::packet::Pkt::tcp([203, 0, 113, 7], 40000, [198, 51, 100, 1], 8080).frame();
    let outcome = |h: &Harness, ingress: bool, frame: &[u8]| {
        let before = h.stats();
        h.run(ingress, frame);
        counters_moved(&before.counters, &h.stats().counters, ingress)
    };
    let rewritten = vec![(Outcome::Rewritten.name(), 1)];
    let missed = vec![(Outcome::NoReservation.name(), 1)];
    let counts = |h: &Harness| -> (u32, u32) {
        let map: Array<MapData, u32> = h.0.map(map_names::PORTS_IN_USE);
        let forward = port_use_slot(false, pf_common::IPPROTO_TCP, 8080u16.to_be_bytes());
        let reverse = port_use_slot(true, pf_common::IPPROTO_TCP, 8080u16.to_be_bytes());
        (map.get(&forward, 0).unwrap(), map.get(&reverse, 0).unwrap())
    };
    assert_eq!(counts(&h), (2, 2));

    h.0.state.release(&both[0].public).unwrap();
    assert_eq!(counts(&h), (1, 1));
    assert_eq!(outcome(&h, true, &to_second), rewritten);
    assert_eq!(outcome(&h, false, &from_second), rewritten);
    assert_eq!(outcome(&h, true, &to_first), missed);

    // Counts of zero under live entries: neither program sees them any more...
    let mut map: Array<MapData, u32> = h.0.map(map_names::PORTS_IN_USE);
    for reverse in [false, true] {
        let slot = port_use_slot(reverse, pf_common::IPPROTO_TCP, 8080u16.to_be_bytes());
        map.set(slot, 0, 0).unwrap();
    }
    assert_eq!(outcome(&h, true, &to_second), missed);
    assert_eq!(outcome(&h, false, &from_second), missed);
    // ... until prune, as pf serve's reconcile runs it, counts again from the maps.
    assert!(h.0.state.prune(&both[1..]).unwrap().is_empty());
    assert_eq!(counts(&h), (1, 1));
    assert_eq!(outcome(&h, true, &to_second), rewritten);
    assert_eq!(outcome(&h, false, &from_second), rewritten);

    h.0.state.release(&both[1].public).unwrap();
    assert_eq!(counts(&h), (0, 0));
    assert_eq!(outcome(&h, true, &to_second), missed);
}
