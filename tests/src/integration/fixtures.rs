//! The runner of the fixture tables (`src/fixtures/`): every row through the real loaded XDP
//! and TC programs with BPF_PROG_TEST_RUN, with the maps filled by pf's own library; the
//! action, the packet out, the one counter that moved and the reservation's traffic are checked.
//! The trigger program's table has a runner of its own ([`trigger_fixtures`]), which checks the
//! gates and the openings reported besides.

use std::{collections::BTreeSet, time::Duration};

use pf::kernel::{
    state::{Counters, Stats},
    trigger::{Openings, TriggerRule},
};
use pf_common::counters::{Outcome, Trigger};

use super::common::{LoadedPf, counters_moved, hex, moved, reservations, run_once, run_program};
use crate::{
    fixtures::{
        self, CLOSED_GATE, Fixture, GATED_RESERVATIONS, OPEN_GATE, RESERVATIONS, leak_guard,
        trigger,
    },
    kit::packet::Pkt,
};

struct Harness(LoadedPf);

impl Harness {
    /// [`RESERVATIONS`], and [`GATED_RESERVATIONS`] behind their gates: [`OPEN_GATE`] opened
    /// by its trigger packet through the loaded trigger program, [`CLOSED_GATE`] left closed.
    fn new() -> Self {
        let mut pf = LoadedPf::new(&reservations(&RESERVATIONS));
        for (public, target, gate) in GATED_RESERVATIONS {
            let r = &reservations(&[(public, target)])[0];
            pf.state
                .reserve_tagged(r, pf::kernel::state::EntryTags::gated(gate))
                .expect("reserving behind a gate");
        }
        for rule in fixtures::gate_rules() {
            pf.state.arm_trigger(&rule).expect("arming a trigger rule");
        }
        load_triggers(&mut pf);
        let before = pf.state.counters().unwrap();
        let (action, _) = run_once(
            pf.programs.trigger(true),
            &fixtures::opening_packet().frame(),
            None,
        )
        .expect("BPF_PROG_TEST_RUN on the trigger program");
        assert_eq!(action, fixtures::TC_ACT_UNSPEC);
        assert_eq!(
            moved(&before.trigger, &pf.state.counters().unwrap().trigger),
            [(Trigger::Opened.name(), 1)],
            "the opening packet"
        );
        let h = Self(pf);
        h.assert_gates();
        h
    }

    /// The gated reservations' gates are as [`Harness::new`] left them: no row closed the open
    /// one, and none opened the closed one by meeting it.
    fn assert_gates(&self) {
        let open = |gate| {
            self.0
                .state
                .trigger_gate(gate)
                .expect("reading a gate")
                .open_for
                .is_some()
        };
        assert!(open(OPEN_GATE), "gate {OPEN_GATE} closed");
        assert!(!open(CLOSED_GATE), "gate {CLOSED_GATE} opened");
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
            let gate_closed = after.counters.gate_closed - before.counters.gate_closed;
            if gate_closed != u64::from(f.gate_closed) {
                problems.push(format!(
                    "gate_closed moved {gate_closed}, expected {}",
                    u64::from(f.gate_closed)
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
        self.assert_gates();
    }
}

/// Loads both trigger programs: the verifier must accept each. Only the Ethernet one can be
/// run, as BPF_PROG_TEST_RUN hands a TC program an Ethernet frame.
fn load_triggers(pf: &mut LoadedPf) {
    for ethernet in [true, false] {
        pf.programs
            .load_trigger(ethernet)
            .unwrap_or_else(|e| panic!("loading the trigger program (ethernet: {ethernet}): {e}"));
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

/// Every counter outside the trigger block that moved, by name.
fn other_counters_moved(before: &Counters, after: &Counters) -> Vec<(&'static str, u64)> {
    let mut m = moved(&before.ingress, &after.ingress);
    m.extend(moved(&before.egress, &after.egress));
    for (name, b, a) in [
        ("gate_closed", before.gate_closed, after.gate_closed),
        (
            "trigger_events_lost",
            before.trigger_events_lost,
            after.trigger_events_lost,
        ),
    ] {
        if a != b {
            m.push((name, a - b));
        }
    }
    m
}

/// The trigger program's table (`fixtures::trigger`) through `pf_trigger`, with its rules armed
/// by pf's library: the action, the bytes out (always the bytes in), the one trigger counter
/// that moved, the openings reported (one per `Opened` row, with its gate, source and
/// destination; none for any other row), and after every row which gates are open.
#[test]
fn trigger_fixtures() {
    let mut pf = LoadedPf::new(&[]);
    load_triggers(&mut pf);
    let mut openings = Openings::open(&pf.dir.dir).expect("opening TRIGGER_EVENTS");
    let rules = trigger::rules();
    for rule in &rules {
        pf.state.arm_trigger(rule).expect("arming a trigger rule");
    }
    let disarmed = trigger::disarmed_rule();
    pf.state.arm_trigger(&disarmed).unwrap();
    pf.state.disarm_trigger(&disarmed).unwrap();
    let gates: Vec<u16> = rules.iter().chain([&disarmed]).map(|r| r.gate).collect();
    let table = trigger::table();
    let mut open = BTreeSet::new();
    let mut failures = Vec::new();
    for f in &table {
        let before = pf.state.counters().unwrap();
        let (action, out) = run_once(pf.programs.trigger(true), &f.packet_in, None)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {}: {e:?}", hex(&f.packet_in)));
        let after = pf.state.counters().unwrap();
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
        let trigger_moved = moved(&before.trigger, &after.trigger);
        if trigger_moved != [(f.outcome.name(), 1)] {
            problems.push(format!(
                "trigger counters moved {trigger_moved:?}, expected [({:?}, 1)]",
                f.outcome.name()
            ));
        }
        let others = other_counters_moved(&before, &after);
        if !others.is_empty() {
            problems.push(format!("other counters moved: {others:?}"));
        }
        let reported: Vec<_> = openings
            .drain()
            .into_iter()
            .map(|o| trigger::Opens {
                gate: o.gate,
                source: o.source,
                destination: o.destination,
            })
            .collect();
        if reported != f.opens.into_iter().collect::<Vec<_>>() {
            problems.push(format!(
                "openings reported {reported:?}, expected {:?}",
                f.opens
            ));
        }
        if let Some(o) = f.opens {
            open.insert(o.gate);
        }
        let now_open: BTreeSet<u16> = gates
            .iter()
            .copied()
            .filter(|&g| pf.state.trigger_gate(g).unwrap().open_for.is_some())
            .collect();
        if now_open != open {
            problems.push(format!(
                "gates open afterwards {now_open:?}, expected {open:?}"
            ));
        }
        if !problems.is_empty() {
            failures.push(format!("{}:\n  {}", f.description, problems.join("\n  ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} trigger fixtures failed:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );
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

/// A gate lapses by itself once nothing passed it for its idle timeout, and traffic through it
/// (either direction) keeps it open past its first expiry. Lapsed, what waits on it is as no
/// reservation, a later fragment whose first fragment went through while it was open included,
/// until a trigger packet opens it again (reporting when the last opening lapsed); disarming
/// closes it at once.
#[test]
fn gates_close_when_idle() {
    use pf::{
        domain::spec::{PortRange, Protocols},
        kernel::trigger::monotonic_ns,
    };

    use crate::fixtures::{CLIENT, PUBLIC, REMOTE};

    let mut pf = LoadedPf::new(&[]);
    let r = &reservations(&[("198.51.100.1:7000/udp", "10.8.0.2:7070")])[0];
    pf.state
        .reserve_tagged(r, pf::kernel::state::EntryTags::gated(1))
        .unwrap();
    let rule = TriggerRule {
        gate: 1,
        client: CLIENT.into(),
        protocols: Protocols::Udp,
        ports: PortRange::single(9000),
        // Long enough for the steps below to run well inside it on a busy machine.
        idle_timeout: Duration::from_secs(3),
    };
    pf.state.arm_trigger(&rule).unwrap();
    load_triggers(&mut pf);
    let mut openings = Openings::open(&pf.dir.dir).unwrap();
    let trigger_packet = Pkt::udp(CLIENT, 40000, REMOTE, 9000).frame();
    let inbound = Pkt::udp(REMOTE, 40001, PUBLIC, 7000).frame();
    let reply = Pkt::udp(CLIENT, 7070, REMOTE, 40001).frame();
    let [first, last] = Pkt {
        id: 0x4001,
        payload: (0..40).collect(),
        ..Pkt::udp(REMOTE, 40001, PUBLIC, 7000)
    }
    .fragments(24)
    .map(|p| p.frame());
    // What a frame moved: the program's outcome counters, and gate_closed.
    let run = |pf: &LoadedPf, program: Option<bool>, frame: &[u8]| {
        let before = pf.state.counters().unwrap();
        let (action, out) = match program {
            Some(ingress) => run_program(&pf.programs, ingress, frame),
            None => run_once(pf.programs.trigger(true), frame, None),
        }
        .unwrap();
        let after = pf.state.counters().unwrap();
        let mut m = match program {
            Some(ingress) => counters_moved(&before, &after, ingress),
            None => moved(&before.trigger, &after.trigger),
        };
        if after.gate_closed != before.gate_closed {
            m.push(("gate_closed", after.gate_closed - before.gate_closed));
        }
        (action, out.len(), m)
    };
    let gate = |pf: &LoadedPf| pf.state.trigger_gate(1).unwrap();
    let wait_past = |ns: u64| {
        let until = ns + 100_000_000;
        let now = monotonic_ns();
        if until > now {
            std::thread::sleep(Duration::from_nanos(until - now));
        }
    };
    let (ingress, egress, trigger) = (Some(true), Some(false), None);
    let rewritten = vec![(Outcome::Rewritten.name(), 1)];

    assert_eq!(run(&pf, trigger, &trigger_packet).2, [("opened", 1)]);
    let opened = openings.drain();
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(opened[0].previous_expires_ns, 0, "never opened before");
    let first_expiry = gate(&pf).expires_ns;
    assert_eq!(run(&pf, ingress, &first).2, rewritten, "first fragment");

    // Past TRIGGER_REFRESH_NS since the opening, a reply pushes the expiry...
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(run(&pf, egress, &reply).2, rewritten, "reply");
    assert!(
        gate(&pf).expires_ns > first_expiry,
        "the reply kept the gate open"
    );
    // ... so past the first expiry the gate still forwards.
    wait_past(first_expiry);
    assert_eq!(
        run(&pf, ingress, &inbound).2,
        rewritten,
        "past the first expiry"
    );

    // Idle for its timeout, it closes: as no reservation in both directions.
    let last_expiry = gate(&pf).expires_ns;
    wait_past(last_expiry);
    let lapsed = gate(&pf);
    assert!(lapsed.armed && lapsed.open_for.is_none(), "{lapsed:?}");
    let missed = |outcome: Outcome| vec![(outcome.name(), 1), ("gate_closed", 1)];
    assert_eq!(
        run(&pf, ingress, &inbound).2,
        missed(Outcome::NoReservation)
    );
    assert_eq!(run(&pf, egress, &reply).2, missed(Outcome::NoReservation));
    assert_eq!(
        run(&pf, ingress, &last).2,
        missed(Outcome::Fragment),
        "a later fragment whose first went through the gate while it was open"
    );

    // A trigger packet opens it again, reporting when the last opening lapsed.
    assert_eq!(run(&pf, trigger, &trigger_packet).2, [("opened", 1)]);
    let opened = openings.drain();
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(opened[0].previous_expires_ns, last_expiry);
    assert_eq!(run(&pf, ingress, &inbound).2, rewritten, "opened again");

    // Disarmed, it is closed at once, and nothing opens it.
    pf.state.disarm_trigger(&rule).unwrap();
    assert_eq!(
        run(&pf, ingress, &inbound).2,
        missed(Outcome::NoReservation)
    );
    assert_eq!(run(&pf, trigger, &trigger_packet).2, [("no_trigger", 1)]);
    assert!(openings.drain().is_empty());
}
