//! The fast path's FIB outcomes, each produced for real: `pf_ingress_fast` runs with
//! BPF_PROG_TEST_RUN inside the server namespace of the test topology, with pub0 as the
//! ingress interface, so `bpf_fib_lookup` consults that namespace's routes and neighbours.
//! Fixture table as elsewhere: {description, packet in, action, packet out, counters}.

use aya::maps::{MapData, xdp::DevMapHash};
use pf::spec::Reservation;
use pf_common::{counters::Outcome, map_names};

use super::common::{LoadedPf, hex, moved, require_root, run_once};
use crate::{
    packet::Pkt,
    topology::{PUBLIC_IFACE, Topology},
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const PUBLIC: [u8; 4] = [198, 51, 100, 1];
const REMOTE: [u8; 4] = [203, 0, 113, 7];
/// The next hop's address the server's neighbour table holds for each target.
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x22];
const PMTU_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x44];

/// Public port, target, and what the server's FIB does with the target.
const RESERVATIONS: [(u16, [u8; 4]); 5] = [
    (8080, [10, 8, 0, 2]),  // tun0, neighbour known: redirected
    (8081, [10, 8, 0, 3]),  // tun0, no neighbour
    (8082, [10, 8, 0, 64]), // tun0, a 1,280-byte route
    (8083, [10, 66, 0, 1]), // a blackhole route
    (8084, [10, 9, 1, 2]),  // tun1, which is not in REDIRECT_DEVICES
];

struct Case {
    description: &'static str,
    packet_in: Vec<u8>,
    action: u32,
    packet_out: Vec<u8>,
    /// The ingress outcome and the fast-path outcome (if any) that must move by one.
    outcome: Outcome,
    fast: Option<&'static str>,
}

fn mac(s: &str) -> [u8; 6] {
    let b: Vec<u8> = s
        .trim()
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap())
        .collect();
    b.try_into().unwrap()
}

/// `p` rewritten to `target:80` as the kernel would forward it: TTL down by one, Ethernet
/// addresses of the next hop.
fn forwarded(p: &Pkt, target: [u8; 4], src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut f = Pkt {
        ttl: p.ttl - 1,
        ..p.with_dst(target, 80)
    }
    .frame();
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f
}

#[test]
fn fast_path_fib_outcomes() {
    require_root();
    let topo = Topology::new(&format!("pf{}fast", std::process::id())).expect("topology");
    let (server, client) = (topo.server.name(), topo.client.name());
    crate::netns::sh(&[
        "ip", "link", "add", "tun1", "netns", server, "type", "veth", "peer", "name", "eth1",
        "netns", client,
    ])
    .unwrap();
    for cmd in [
        "ip addr add 10.9.1.1/24 dev tun1",
        "ip link set tun1 up",
        "ip neigh replace 10.8.0.2 lladdr 02:00:00:00:00:22 dev tun0 nud permanent",
        "ip neigh replace 10.9.1.2 lladdr 02:00:00:00:00:33 dev tun1 nud permanent",
        // Locked: bpf_fib_lookup takes a route MTU only when locked (or with
        // net.ipv4.ip_forward_use_pmtu), else the device MTU; the kernel's forwarding
        // honours it either way.
        "ip route add 10.8.0.64/32 dev tun0 mtu lock 1280",
        "ip neigh replace 10.8.0.64 lladdr 02:00:00:00:00:44 dev tun0 nud permanent",
        "ip route add blackhole 10.66.0.0/24",
    ] {
        topo.server
            .run(&cmd.split(' ').collect::<Vec<_>>())
            .unwrap();
    }
    topo.client
        .run(&["ip", "link", "set", "eth1", "up"])
        .unwrap();
    let tun0_mac = mac(&String::from_utf8_lossy(
        &topo
            .server
            .run(&["cat", "/sys/class/net/tun0/address"])
            .unwrap()
            .stdout,
    ));
    let ifindex = |name: &'static str| {
        topo.server
            .within(move || {
                let name = std::ffi::CString::new(name).unwrap();
                // SAFETY: a valid C string.
                unsafe { libc::if_nametoindex(name.as_ptr()) }
            })
            .unwrap()
    };
    let (pub0, tun0) = (ifindex(PUBLIC_IFACE), ifindex("tun0"));
    assert!(pub0 != 0 && tun0 != 0, "interfaces in the server namespace");

    let reservations: Vec<Reservation> = RESERVATIONS
        .iter()
        .map(|(port, target)| {
            let target = std::net::Ipv4Addr::from(*target);
            Reservation::new(
                format!("198.51.100.1:{port}/tcp").parse().unwrap(),
                format!("{target}:80").parse().unwrap(),
            )
            .unwrap()
        })
        .collect();
    let pf = LoadedPf::new(&reservations);
    let mut devices: DevMapHash<MapData> = pf.map(map_names::REDIRECT_DEVICES);
    devices.insert(tun0, tun0, None, 0).expect("adding tun0");
    // The programs move into the namespace's thread for each run; the pins stay until the end.
    let LoadedPf {
        state,
        mut programs,
        dir: _pins,
    } = pf;
    programs
        .load_fast_ingress()
        .expect("loading the fast-path program (the verifier must accept it)");

    let tcp = |port| Pkt::tcp(REMOTE, 40000, PUBLIC, port);
    let pass_rewritten = |p: &Pkt, target| p.with_dst(target, 80).frame();
    let big = Pkt {
        payload: vec![0x42; 1400],
        ..tcp(8082)
    };
    let cases = vec![
        Case {
            description: "route and neighbour known, tun0 in REDIRECT_DEVICES: redirected",
            packet_in: tcp(8080).frame(),
            action: XDP_REDIRECT,
            packet_out: forwarded(&tcp(8080), [10, 8, 0, 2], tun0_mac, CLIENT_MAC),
            outcome: Outcome::Rewritten,
            fast: Some("redirected"),
        },
        Case {
            description: "a small packet over the 1,280-byte route: redirected",
            packet_in: tcp(8082).frame(),
            action: XDP_REDIRECT,
            packet_out: forwarded(&tcp(8082), [10, 8, 0, 64], tun0_mac, PMTU_MAC),
            outcome: Outcome::Rewritten,
            fast: Some("redirected"),
        },
        Case {
            description: "no neighbour for the target yet: passed, rewritten only",
            packet_in: tcp(8081).frame(),
            action: XDP_PASS,
            packet_out: pass_rewritten(&tcp(8081), [10, 8, 0, 3]),
            outcome: Outcome::Rewritten,
            fast: Some("no_neighbour"),
        },
        Case {
            description: "1,454 bytes over the 1,280-byte route: fragmentation needed, passed",
            packet_in: big.frame(),
            action: XDP_PASS,
            packet_out: pass_rewritten(&big, [10, 8, 0, 64]),
            outcome: Outcome::Rewritten,
            fast: Some("frag_needed"),
        },
        Case {
            description: "TTL 1: passed for the kernel to answer time-exceeded",
            packet_in: Pkt {
                ttl: 1,
                ..tcp(8080)
            }
            .frame(),
            action: XDP_PASS,
            packet_out: pass_rewritten(
                &Pkt {
                    ttl: 1,
                    ..tcp(8080)
                },
                [10, 8, 0, 2],
            ),
            outcome: Outcome::Rewritten,
            fast: Some("ttl_expired"),
        },
        Case {
            description: "a blackhole route: passed",
            packet_in: tcp(8083).frame(),
            action: XDP_PASS,
            packet_out: pass_rewritten(&tcp(8083), [10, 66, 0, 1]),
            outcome: Outcome::Rewritten,
            fast: Some("not_forwarded"),
        },
        Case {
            description: "the route leaves by tun1, not in REDIRECT_DEVICES: passed",
            packet_in: tcp(8084).frame(),
            action: XDP_PASS,
            packet_out: pass_rewritten(&tcp(8084), [10, 9, 1, 2]),
            outcome: Outcome::Rewritten,
            fast: Some("no_redirect_device"),
        },
        Case {
            description: "a VLAN-tagged frame: passed",
            packet_in: Pkt {
                vlans: vec![7],
                ..tcp(8080)
            }
            .frame(),
            action: XDP_PASS,
            packet_out: pass_rewritten(
                &Pkt {
                    vlans: vec![7],
                    ..tcp(8080)
                },
                [10, 8, 0, 2],
            ),
            outcome: Outcome::Rewritten,
            fast: Some("vlan_tagged"),
        },
        Case {
            description: "no reservation: passed untouched, no fast-path counter",
            packet_in: tcp(9999).frame(),
            action: XDP_PASS,
            packet_out: tcp(9999).frame(),
            outcome: Outcome::NoReservation,
            fast: None,
        },
    ];

    let mut failures = Vec::new();
    for case in &cases {
        let before = state.counters().unwrap();
        let frame = case.packet_in.clone();
        let (back, result) = topo
            .server
            .within(move || {
                // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
                // egress_ifindex. The ifindex is resolved in this thread's namespace.
                let ctx: Vec<u8> = [0, frame.len() as u32, 0, pub0, 0, 0]
                    .iter()
                    .flat_map(|v: &u32| v.to_ne_bytes())
                    .collect();
                let result = run_once(programs.fast_ingress(), &frame, Some(&ctx))
                    .map_err(|e| e.to_string());
                (programs, result)
            })
            .unwrap();
        programs = back;
        let (action, out) = result.unwrap_or_else(|e| panic!("{}: {e}", case.description));
        let after = state.counters().unwrap();
        let mut problems = Vec::new();
        if action != case.action {
            problems.push(format!("action {action}, expected {}", case.action));
        }
        if out != case.packet_out {
            problems.push(format!(
                "packet out\n    got      {}\n    expected {}",
                hex(&out),
                hex(&case.packet_out)
            ));
        }
        let ingress = moved(&before.ingress, &after.ingress);
        if ingress != [(case.outcome.name(), 1)] {
            problems.push(format!(
                "ingress counters {ingress:?}, expected {:?}",
                case.outcome.name()
            ));
        }
        let fast = moved(&before.fast_path, &after.fast_path);
        if fast
            != case
                .fast
                .map(|name| (name, 1))
                .into_iter()
                .collect::<Vec<_>>()
        {
            problems.push(format!(
                "fast-path counters {fast:?}, expected {:?}",
                case.fast
            ));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}:\n  {}",
                case.description,
                problems.join("\n  ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
