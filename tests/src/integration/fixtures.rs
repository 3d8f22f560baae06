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
