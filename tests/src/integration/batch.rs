//! `State::reserve_all`, the batched write that `cargo xtask bench` times and the service will
//! use to load its store: many reservations land whole, and a batch with one bad reservation
//! changes nothing. Checked with real packets through the loaded ingress program.

use std::net::Ipv4Addr;

use pf::{
    PfError,
    domain::spec::{PortRange, Protocols, PublicSpec, Reservation, TargetSpec},
    kernel::object::Programs,
    kernel::state::State,
};
use pf_common::counters::Outcome;

use super::common::{TempPinDir, counters_moved, require_root, run_program};
use crate::kit::packet::Pkt;

const REMOTE: [u8; 4] = [203, 0, 113, 7];

fn reservation(public: Ipv4Addr, ports: (u16, u16), target: Ipv4Addr, port: u16) -> Reservation {
    Reservation::new(
        PublicSpec {
            addr: public,
            ports: PortRange::new(ports.0, ports.1).unwrap(),
            protocols: Protocols::Both,
        },
        TargetSpec {
            addr: target,
            port: Some(port),
        },
    )
    .unwrap()
}

/// The i-th of many distinct single-port reservations.
fn nth(i: u32) -> Reservation {
    let public = Ipv4Addr::new(198, 51, 100, 1 + (i / 50_000) as u8);
    let target = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 8, 0, 0)) + i);
    let port = 1024 + (i % 50_000) as u16;
    reservation(public, (port, port), target, 80)
}

/// Runs one UDP packet to `public:port` through the ingress program and says what happened:
/// the counters that moved, and the destination the packet left with.
fn probe(
    programs: &Programs,
    state: &State,
    public: Ipv4Addr,
    port: u16,
) -> (Vec<(&'static str, u64)>, Vec<u8>) {
    let frame = Pkt::udp(REMOTE, 40000, public.octets(), port).frame();
    let before = state.counters().unwrap();
    let (_, out) = run_program(programs, true, &frame).expect("BPF_PROG_TEST_RUN");
    let after = state.counters().unwrap();
    // Destination address and port of the frame as it left (Ethernet 14 + IPv4 20 + UDP).
    let mut dest = out[30..34].to_vec();
    dest.extend_from_slice(&out[36..38]);
    (counters_moved(&before, &after, true), dest)
}

#[test]
fn batched_reservations_land_whole_or_not_at_all() {
    require_root();
    let dir = TempPinDir::new();
    let mut state = State::open_for_write(&dir.dir).expect("creating pf's maps");
    let programs = Programs::load(&dir.dir).expect("loading pf's programs");

    // 70,000 reservations, more than one batch of 65,536 entries per map.
    let many: Vec<Reservation> = (0..70_000).map(nth).collect();
    state
        .reserve_all(&many)
        .expect("a batch of 70,000 distinct reservations");
    assert_eq!(state.list().unwrap().len(), 70_000);
    for i in [0, 65_535, 65_536, 69_999] {
        let r = nth(i);
        let (moved, dest) = probe(&programs, &state, r.public.addr, r.public.ports.first);
        let mut want = r.target_addr.octets().to_vec();
        want.extend_from_slice(&80u16.to_be_bytes());
        assert_eq!(
            (moved, dest),
            (vec![(Outcome::Rewritten.name(), 1)], want),
            "reservation {i} forwards"
        );
    }

    let fresh = Ipv4Addr::new(198, 51, 100, 200);
    let client = Ipv4Addr::new(10, 200, 0, 2);
    let refused: [(&str, Vec<Reservation>, &str); 3] = [
        (
            "the last one overlaps an existing reservation",
            vec![reservation(fresh, (100, 104), client, 100), nth(12_345)],
            "overlaps the existing reservation 198.51.100.1:13369/both -> 10.8.48.57:80",
        ),
        (
            "two in the batch overlap each other",
            vec![
                reservation(fresh, (100, 104), client, 100),
                reservation(fresh, (104, 110), client, 200),
            ],
            "198.51.100.200:104/tcp overlaps the existing reservation 198.51.100.200:100-104/both -> 10.200.0.2:100-104",
        ),
        (
            "two in the batch share a target",
            vec![
                reservation(fresh, (100, 104), client, 100),
                reservation(fresh, (200, 200), client, 102),
            ],
            "target 10.200.0.2:102/tcp is already the target of 198.51.100.200:100-104/both -> 10.200.0.2:100-104",
        ),
    ];
    for (why, batch, message) in refused {
        let err: PfError = state.reserve_all(&batch).expect_err(why);
        assert!(
            err.to_string().contains(message),
            "{why}: the error names the conflict: got '{err}', want '{message}'"
        );
        assert_eq!(state.list().unwrap().len(), 70_000, "{why}: nothing added");
        for port in [100, 104, 200] {
            let (moved, _) = probe(&programs, &state, fresh, port);
            assert_eq!(
                moved,
                [(Outcome::NoReservation.name(), 1)],
                "{why}: {fresh}:{port} does not forward"
            );
        }
    }
}
