//! The fast paths' FIB outcomes, each produced for real: `pf_ingress_fast` (from pub0) and
//! `pf_reply_fast` (from tun0) run with BPF_PROG_TEST_RUN inside the server namespace of the
//! test topology, so `bpf_fib_lookup` consults that namespace's routes and neighbours.
//! Fixture table as elsewhere: {description, packet in, action, packet out, counters}.

use aya::maps::{MapData, xdp::DevMapHash};
use pf::{
    domain::spec::Reservation,
    kernel::object::{FAST_INGRESS_PROGRAM, REPLY_PROGRAM},
};
use pf_common::{counters::Outcome, map_names};

use super::common::{LoadedPf, hex, moved, require_root, run_once};
use crate::{
    kit::packet::Pkt,
    kit::topology::{PUBLIC_IFACE, Topology},
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const PUBLIC: [u8; 4] = [198, 51, 100, 1];
const REMOTE: [u8; 4] = [203, 0, 113, 7];
/// The next hop's address the server's neighbour table holds for each target.
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x22];
const PMTU_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x44];
/// The internet-side gateway's address, through which the server reaches REMOTE.
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x55];
const CLIENT: [u8; 4] = [10, 8, 0, 2];

/// Public port, target, and what the server's FIB does with the target.
const RESERVATIONS: [(u16, [u8; 4]); 5] = [
    (8080, [10, 8, 0, 2]),  // tun0, neighbour known: redirected
    (8081, [10, 8, 0, 3]),  // tun0, no neighbour
    (8082, [10, 8, 0, 64]), // tun0, a 1,280-byte route
    (8083, [10, 66, 0, 1]), // a blackhole route
    (8084, [10, 9, 1, 2]),  // tun1, which is not in REDIRECT_DEVICES
];

/// Which program a case runs, from which interface.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Program {
    /// `pf_ingress_fast`, receiving on pub0.
    Ingress,
    /// `pf_reply_fast`, receiving on tun0.
    Reply,
}

struct Case {
    description: &'static str,
    program: Program,
    packet_in: Vec<u8>,
    action: u32,
    packet_out: Vec<u8>,
    /// Every counter that must move, each by exactly one, as (block, name) with the block named
    /// as in `pf stats --json`.
    counters: Vec<(&'static str, &'static str)>,
}

/// An ingress case: the ingress outcome, and the fast-path outcome if the packet was rewritten.
fn ingress(
    description: &'static str,
    packet_in: Vec<u8>,
    action: u32,
    packet_out: Vec<u8>,
    outcome: Outcome,
    fast: Option<&'static str>,
) -> Case {
    let mut counters = vec![("ingress", outcome.name())];
    counters.extend(fast.map(|name| ("fast_path", name)));
    Case {
        description,
        program: Program::Ingress,
        packet_in,
        action,
        packet_out,
        counters,
    }
}

/// A reply case: every packet moves one reply fast-path counter, and nothing else.
fn reply(
    description: &'static str,
    packet_in: Vec<u8>,
    action: u32,
    packet_out: Vec<u8>,
    outcome: &'static str,
) -> Case {
    Case {
        description,
        program: Program::Reply,
        packet_in,
        action,
        packet_out,
        counters: vec![("reply_fast_path", outcome)],
    }
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
    routed(&p.with_dst(target, 80), src_mac, dst_mac)
}

/// A frame as the kernel would forward it: TTL down by one, the next hop's Ethernet addresses.
fn routed(p: &Pkt, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut f = Pkt {
        ttl: p.ttl - 1,
        ..p.clone()
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
    crate::kit::netns::sh(&[
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
        // The way to the Internet for replies: REMOTE through a known gateway, and a network
        // through a gateway whose neighbour entry does not exist yet.
        "ip neigh replace 198.51.100.254 lladdr 02:00:00:00:00:55 dev pub0 nud permanent",
        "ip route add 203.0.113.0/24 via 198.51.100.254",
        "ip route add 192.0.2.0/24 via 198.51.100.253",
    ] {
        topo.server
            .run(&cmd.split(' ').collect::<Vec<_>>())
            .unwrap();
    }
    topo.client
        .run(&["ip", "link", "set", "eth1", "up"])
        .unwrap();
    let server_mac = |iface: &str| {
        mac(&String::from_utf8_lossy(
            &topo
                .server
                .run(&["cat", &format!("/sys/class/net/{iface}/address")])
                .unwrap()
                .stdout,
        ))
    };
    let (tun0_mac, pub0_mac) = (server_mac("tun0"), server_mac(PUBLIC_IFACE));
    let ifindex = |name: &'static str| {
        topo.server
            .within(move || pf::kernel::netdev::ifindex(name))
            .unwrap()
            .unwrap_or_else(|| panic!("no {name} in the server namespace"))
    };
    let (pub0, tun0) = (ifindex(PUBLIC_IFACE), ifindex("tun0"));

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
    let mut public_devices: DevMapHash<MapData> = pf.map(map_names::PUBLIC_DEVICES);
    public_devices
        .insert(pub0, pub0, None, 0)
        .expect("adding pub0");
    // The programs move into the namespace's thread for each run; the pins stay until the end.
    let LoadedPf {
        state,
        mut programs,
        dir: _pins,
    } = pf;
    for program in [FAST_INGRESS_PROGRAM, REPLY_PROGRAM] {
        programs
            .load_xdp(program)
            .unwrap_or_else(|e| panic!("loading {program} (the verifier must accept it): {e}"));
    }

    let tcp = |port| Pkt::tcp(REMOTE, 40000, PUBLIC, port);
    let pass_rewritten = |p: &Pkt, target| p.with_dst(target, 80).frame();
    let big = Pkt {
        payload: vec![0x42; 1400],
        ..tcp(8082)
    };
    let reply_tcp = |to| Pkt::tcp(CLIENT, 80, to, 40000);
    let [reply_first_fragment, _] = Pkt {
        payload: vec![0x17; 64],
        ..reply_tcp(REMOTE)
    }
    .fragments(32);
    let cases = vec![
        ingress(
            "route and neighbour known, tun0 in REDIRECT_DEVICES: redirected",
            tcp(8080).frame(),
            XDP_REDIRECT,
            forwarded(&tcp(8080), [10, 8, 0, 2], tun0_mac, CLIENT_MAC),
            Outcome::Rewritten,
            Some("redirected"),
        ),
        ingress(
            "a small packet over the 1,280-byte route: redirected",
            tcp(8082).frame(),
            XDP_REDIRECT,
            forwarded(&tcp(8082), [10, 8, 0, 64], tun0_mac, PMTU_MAC),
            Outcome::Rewritten,
            Some("redirected"),
        ),
        ingress(
            "no neighbour for the target yet: passed, rewritten only",
            tcp(8081).frame(),
            XDP_PASS,
            pass_rewritten(&tcp(8081), [10, 8, 0, 3]),
            Outcome::Rewritten,
            Some("no_neighbour"),
        ),
        ingress(
            "1,454 bytes over the 1,280-byte route: fragmentation needed, passed",
            big.frame(),
            XDP_PASS,
            pass_rewritten(&big, [10, 8, 0, 64]),
            Outcome::Rewritten,
            Some("frag_needed"),
        ),
        ingress(
            "TTL 1: passed for the kernel to answer time-exceeded",
            Pkt {
                ttl: 1,
                ..tcp(8080)
            }
            .frame(),
            XDP_PASS,
            pass_rewritten(
                &Pkt {
                    ttl: 1,
                    ..tcp(8080)
                },
                [10, 8, 0, 2],
            ),
            Outcome::Rewritten,
            Some("ttl_expired"),
        ),
        ingress(
            "a blackhole route: passed",
            tcp(8083).frame(),
            XDP_PASS,
            pass_rewritten(&tcp(8083), [10, 66, 0, 1]),
            Outcome::Rewritten,
            Some("not_forwarded"),
        ),
        ingress(
            "the route leaves by tun1, not in REDIRECT_DEVICES: passed",
            tcp(8084).frame(),
            XDP_PASS,
            pass_rewritten(&tcp(8084), [10, 9, 1, 2]),
            Outcome::Rewritten,
            Some("no_redirect_device"),
        ),
        ingress(
            "a VLAN-tagged frame: passed",
            Pkt {
                vlans: vec![7],
                ..tcp(8080)
            }
            .frame(),
            XDP_PASS,
            pass_rewritten(
                &Pkt {
                    vlans: vec![7],
                    ..tcp(8080)
                },
                [10, 8, 0, 2],
            ),
            Outcome::Rewritten,
            Some("vlan_tagged"),
        ),
        ingress(
            "no reservation: passed untouched, no fast-path counter",
            tcp(9999).frame(),
            XDP_PASS,
            tcp(9999).frame(),
            Outcome::NoReservation,
            None,
        ),
        reply(
            "a reply from the target, route and neighbour known, pub0 in PUBLIC_DEVICES: \
             rewritten to the public endpoint and redirected",
            reply_tcp(REMOTE).frame(),
            XDP_REDIRECT,
            routed(
                &reply_tcp(REMOTE).with_src(PUBLIC, 8080),
                pub0_mac,
                GATEWAY_MAC,
            ),
            "redirected",
        ),
        reply(
            "a reply with TTL 1: passed untouched (TC egress rewrites it)",
            Pkt {
                ttl: 1,
                ..reply_tcp(REMOTE)
            }
            .frame(),
            XDP_PASS,
            Pkt {
                ttl: 1,
                ..reply_tcp(REMOTE)
            }
            .frame(),
            "ttl_expired",
        ),
        reply(
            "a reply whose gateway has no neighbour entry yet: passed untouched",
            reply_tcp([192, 0, 2, 9]).frame(),
            XDP_PASS,
            reply_tcp([192, 0, 2, 9]).frame(),
            "no_neighbour",
        ),
        reply(
            "a reply routed out tun1, not in PUBLIC_DEVICES: passed untouched",
            reply_tcp([10, 9, 1, 2]).frame(),
            XDP_PASS,
            reply_tcp([10, 9, 1, 2]).frame(),
            "no_redirect_device",
        ),
        reply(
            "a reply with no route at all: passed untouched",
            reply_tcp([100, 64, 0, 1]).frame(),
            XDP_PASS,
            reply_tcp([100, 64, 0, 1]).frame(),
            "not_forwarded",
        ),
        reply(
            "the client's own traffic from a port no reservation targets: passed untouched",
            Pkt::tcp(CLIENT, 81, REMOTE, 40000).frame(),
            XDP_PASS,
            Pkt::tcp(CLIENT, 81, REMOTE, 40000).frame(),
            "not_a_reply",
        ),
        reply(
            "the first fragment of a reply: passed untouched, fragments take the kernel's way",
            reply_first_fragment.frame(),
            XDP_PASS,
            reply_first_fragment.frame(),
            "not_a_reply",
        ),
    ];

    let mut failures = Vec::new();
    for case in &cases {
        let before = state.counters().unwrap();
        let frame = case.packet_in.clone();
        let (program, ingress_ifindex) = (
            case.program,
            if case.program == Program::Ingress {
                pub0
            } else {
                tun0
            },
        );
        let (back, result) = topo
            .server
            .within(move || {
                // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
                // egress_ifindex. The ifindex is resolved in this thread's namespace.
                let ctx: Vec<u8> = [0, frame.len() as u32, 0, ingress_ifindex, 0, 0]
                    .iter()
                    .flat_map(|v: &u32| v.to_ne_bytes())
                    .collect();
                let program = match program {
                    Program::Ingress => programs.fast_ingress(),
                    Program::Reply => programs.reply(),
                };
                let result = run_once(program, &frame, Some(&ctx)).map_err(|e| e.to_string());
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
        let mut counters: Vec<(&str, &str, u64)> = [
            ("ingress", &before.ingress, &after.ingress),
            ("egress", &before.egress, &after.egress),
            ("fast_path", &before.fast_path, &after.fast_path),
            (
                "reply_fast_path",
                &before.reply_fast_path,
                &after.reply_fast_path,
            ),
        ]
        .into_iter()
        .flat_map(|(block, b, a)| {
            moved(b, a)
                .into_iter()
                .map(move |(name, by)| (block, name, by))
        })
        .collect();
        counters.sort_unstable();
        let mut expected: Vec<(&str, &str, u64)> = case
            .counters
            .iter()
            .map(|&(block, name)| (block, name, 1))
            .collect();
        expected.sort_unstable();
        if counters != expected {
            problems.push(format!(
                "counters moved {counters:?}, expected {expected:?}"
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
