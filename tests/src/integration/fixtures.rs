//! Katran-style fixture tables: {description, packet in, expected action, expected packet out,
//! expected counter}, each run through the real loaded XDP and TC programs with
//! BPF_PROG_TEST_RUN, with the maps filled by pf's own library.

use pf::kernel::state::Stats;
use pf_common::counters::Outcome;

use super::common::{LoadedPf, counters_moved, hex, reservations, run_program};
use crate::kit::packet::{ETH_P_ARP, ETH_P_IPV6, Pkt};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const PUBLIC: [u8; 4] = [198, 51, 100, 1];
const OTHER_PUBLIC: [u8; 4] = [198, 51, 100, 9];
const REMOTE: [u8; 4] = [203, 0, 113, 7];
const CLIENT: [u8; 4] = [10, 8, 0, 2];
const RANGE_CLIENT: [u8; 4] = [10, 8, 0, 3];
/// A router on the Internet that sends ICMP errors.
const ROUTER: [u8; 4] = [192, 0, 2, 1];

/// The reservations every fixture runs against.
const RESERVATIONS: [(&str, &str); 3] = [
    ("198.51.100.1:8080/tcp", "10.8.0.2:80"),
    ("198.51.100.1:5353/udp", "10.8.0.2:53"),
    ("198.51.100.1:8810-8815/both", "10.8.0.3:9810"),
];

struct Fixture {
    description: String,
    packet_in: Vec<u8>,
    action: u32,
    packet_out: Vec<u8>,
    outcome: Outcome,
}

fn rewritten(description: &str, action: u32, packet_in: &Pkt, packet_out: &Pkt) -> Fixture {
    Fixture {
        description: description.to_string(),
        packet_in: packet_in.frame(),
        action,
        packet_out: packet_out.frame(),
        outcome: Outcome::Rewritten,
    }
}

/// An ICMP error about a forwarded flow, translated.
fn icmp_rewritten(description: &str, action: u32, packet_in: &Pkt, packet_out: &Pkt) -> Fixture {
    Fixture {
        outcome: Outcome::IcmpErrorRewritten,
        ..rewritten(description, action, packet_in, packet_out)
    }
}

/// A packet the program must pass byte for byte, counted as `outcome`.
fn untouched(description: &str, action: u32, frame: Vec<u8>, outcome: Outcome) -> Fixture {
    Fixture {
        description: description.to_string(),
        packet_out: frame.clone(),
        packet_in: frame,
        action,
        outcome,
    }
}

fn patched(frame: Vec<u8>, patch: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = frame;
    patch(&mut f);
    f
}

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
    let h = Harness::new();
    let tcp = Pkt::tcp(REMOTE, 40000, PUBLIC, 8080);
    let udp = Pkt::udp(REMOTE, 40001, PUBLIC, 5353);
    let hit_frame = tcp.frame();
    let mut f = vec![
        rewritten(
            "TCP to a reserved port",
            XDP_PASS,
            &tcp,
            &tcp.with_dst(CLIENT, 80),
        ),
        rewritten(
            "UDP to a reserved port",
            XDP_PASS,
            &udp,
            &udp.with_dst(CLIENT, 53),
        ),
        {
            let zero = Pkt {
                udp_no_checksum: true,
                ..udp.clone()
            };
            rewritten(
                "UDP with checksum 0 keeps 0",
                XDP_PASS,
                &zero,
                &zero.with_dst(CLIENT, 53),
            )
        },
        {
            let odd = Pkt {
                payload: vec![0xff; 7],
                ..udp.clone()
            };
            rewritten(
                "UDP with an odd-length payload",
                XDP_PASS,
                &odd,
                &odd.with_dst(CLIENT, 53),
            )
        },
        {
            let tagged = Pkt {
                vlans: vec![100],
                ..tcp.clone()
            };
            rewritten(
                "one 802.1Q tag",
                XDP_PASS,
                &tagged,
                &tagged.with_dst(CLIENT, 80),
            )
        },
        {
            let opts = Pkt {
                ip_options: vec![0x94, 0x04, 0, 0, 0x01, 0x01, 0x01, 0x00],
                ..tcp.clone()
            };
            rewritten(
                "IPv4 options (router alert, NOPs, EOL): IHL honoured",
                XDP_PASS,
                &opts,
                &opts.with_dst(CLIENT, 80),
            )
        },
        {
            let max_opts = Pkt {
                ip_options: vec![0x01; 40],
                ..tcp.clone()
            };
            rewritten(
                "largest IPv4 header (IHL 15)",
                XDP_PASS,
                &max_opts,
                &max_opts.with_dst(CLIENT, 80),
            )
        },
        {
            let padded = Pkt {
                trailer: vec![0; 6],
                payload: Vec::new(),
                ..tcp.clone()
            };
            rewritten(
                "Ethernet padding after the IP packet is left alone",
                XDP_PASS,
                &padded,
                &padded.with_dst(CLIENT, 80),
            )
        },
        {
            let ttl1 = Pkt {
                ttl: 1,
                ..tcp.clone()
            };
            rewritten(
                "TTL 1 is rewritten; the kernel's forwarding then answers time-exceeded",
                XDP_PASS,
                &ttl1,
                &ttl1.with_dst(CLIENT, 80),
            )
        },
        {
            let p = Pkt::tcp(REMOTE, 1, PUBLIC, 8810);
            rewritten(
                "range, first port, TCP: remapped to 9810",
                XDP_PASS,
                &p,
                &p.with_dst(RANGE_CLIENT, 9810),
            )
        },
        {
            let p = Pkt::udp(REMOTE, 65535, PUBLIC, 8815);
            rewritten(
                "range, last port, UDP: remapped to 9815",
                XDP_PASS,
                &p,
                &p.with_dst(RANGE_CLIENT, 9815),
            )
        },
        untouched(
            "range, one below",
            XDP_PASS,
            Pkt::tcp(REMOTE, 1, PUBLIC, 8809).frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "range, one above",
            XDP_PASS,
            Pkt::udp(REMOTE, 1, PUBLIC, 8816).frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "TCP to an unreserved port",
            XDP_PASS,
            Pkt::tcp(REMOTE, 40000, PUBLIC, 8081).frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "UDP to a TCP-only reservation",
            XDP_PASS,
            Pkt::udp(REMOTE, 40000, PUBLIC, 8080).frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "reserved port on another address",
            XDP_PASS,
            Pkt::tcp(REMOTE, 40000, OTHER_PUBLIC, 8080).frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "reply-shaped packet (source is the reserved port)",
            XDP_PASS,
            Pkt::tcp(PUBLIC, 8080, REMOTE, 40000).frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "ICMP echo to the public address",
            XDP_PASS,
            Pkt::icmp_echo(REMOTE, PUBLIC).frame(),
            Outcome::OtherProtocol,
        ),
        untouched(
            "IPv6",
            XDP_PASS,
            Pkt {
                ether_type: ETH_P_IPV6,
                ..tcp.clone()
            }
            .frame(),
            Outcome::NotIpv4,
        ),
        untouched(
            "ARP",
            XDP_PASS,
            Pkt {
                ether_type: ETH_P_ARP,
                ..tcp.clone()
            }
            .frame(),
            Outcome::NotIpv4,
        ),
        untouched(
            "two VLAN tags (QinQ)",
            XDP_PASS,
            Pkt {
                vlans: vec![100, 200],
                ..tcp.clone()
            }
            .frame(),
            Outcome::VlanStacked,
        ),
        {
            let first = Pkt {
                frag: 0x2000,
                ..tcp.clone()
            };
            rewritten(
                "first fragment (MF, offset 0) carrying the TCP header",
                XDP_PASS,
                &first,
                &first.with_dst(CLIENT, 80),
            )
        },
        untouched(
            "middle fragment (MF, offset 185)",
            XDP_PASS,
            Pkt {
                frag: 0x2000 | 185,
                ..udp.clone()
            }
            .frame(),
            Outcome::Fragment,
        ),
        untouched(
            "last fragment (offset 370)",
            XDP_PASS,
            Pkt {
                frag: 370,
                ..udp.clone()
            }
            .frame(),
            Outcome::Fragment,
        ),
        untouched(
            "IHL 4",
            XDP_PASS,
            patched(hit_frame.clone(), |f| f[14] = 0x44),
            Outcome::BadIpHeader,
        ),
        untouched(
            "IHL 0",
            XDP_PASS,
            patched(hit_frame.clone(), |f| f[14] = 0x40),
            Outcome::BadIpHeader,
        ),
        untouched(
            "version 6 in an IPv4 frame",
            XDP_PASS,
            patched(hit_frame.clone(), |f| f[14] = 0x65),
            Outcome::BadIpHeader,
        ),
        untouched(
            "total length below the header length",
            XDP_PASS,
            patched(hit_frame.clone(), |f| {
                f[16..18].copy_from_slice(&19u16.to_be_bytes())
            }),
            Outcome::BadIpHeader,
        ),
        untouched(
            "total length ends inside the TCP header",
            XDP_PASS,
            patched(hit_frame.clone(), |f| {
                f[16..18].copy_from_slice(&30u16.to_be_bytes())
            }),
            Outcome::Truncated,
        ),
        untouched(
            "total length longer than the frame",
            XDP_PASS,
            patched(hit_frame.clone(), |f| {
                f[16..18].copy_from_slice(&1500u16.to_be_bytes())
            }),
            Outcome::Truncated,
        ),
        untouched(
            "IHL 15 beyond the total length",
            XDP_PASS,
            patched(
                Pkt {
                    payload: Vec::new(),
                    ..tcp.clone()
                }
                .frame(),
                |f| f[14] = 0x4f,
            ),
            Outcome::BadIpHeader,
        ),
        untouched(
            "VLAN frame cut inside the tag",
            XDP_PASS,
            Pkt {
                vlans: vec![7],
                ..tcp.clone()
            }
            .frame()[..16]
                .to_vec(),
            Outcome::Truncated,
        ),
    ];
    // Truncated at several offsets: inside the IPv4 header, at its end, inside the TCP header,
    // inside the payload. Every one must pass untouched.
    for cut in [14, 20, 33, 34, 40, 53, hit_frame.len() - 1] {
        f.push(untouched(
            &format!("TCP hit frame cut to {cut} bytes"),
            XDP_PASS,
            hit_frame[..cut].to_vec(),
            Outcome::Truncated,
        ));
    }
    f.extend(fragment_fixtures(
        XDP_PASS,
        &Pkt::udp(REMOTE, 40001, PUBLIC, 5353),
        &Pkt::udp(REMOTE, 40001, PUBLIC, 5353).with_dst(CLIENT, 53),
        &Pkt::udp(REMOTE, 40001, PUBLIC, 5354),
    ));
    f.extend(ingress_icmp_fixtures());
    h.check(true, &f);
}

#[test]
fn egress_fixtures() {
    let h = Harness::new();
    let tcp = Pkt::tcp(CLIENT, 80, REMOTE, 40000);
    let udp = Pkt::udp(CLIENT, 53, REMOTE, 40001);
    let reply_frame = tcp.frame();
    let mut f = vec![
        rewritten(
            "TCP reply from a reservation's target",
            TC_ACT_OK,
            &tcp,
            &tcp.with_src(PUBLIC, 8080),
        ),
        rewritten("UDP reply", TC_ACT_OK, &udp, &udp.with_src(PUBLIC, 5353)),
        {
            let zero = Pkt {
                udp_no_checksum: true,
                ..udp.clone()
            };
            rewritten(
                "UDP reply with checksum 0 keeps 0",
                TC_ACT_OK,
                &zero,
                &zero.with_src(PUBLIC, 5353),
            )
        },
        {
            let tagged = Pkt {
                vlans: vec![100],
                ..tcp.clone()
            };
            rewritten(
                "reply with one 802.1Q tag in the frame",
                TC_ACT_OK,
                &tagged,
                &tagged.with_src(PUBLIC, 8080),
            )
        },
        {
            let opts = Pkt {
                ip_options: vec![0x01; 12],
                ..tcp.clone()
            };
            rewritten(
                "reply with IPv4 options",
                TC_ACT_OK,
                &opts,
                &opts.with_src(PUBLIC, 8080),
            )
        },
        {
            let p = Pkt::tcp(RANGE_CLIENT, 9810, REMOTE, 1);
            rewritten(
                "range reply, first port, TCP",
                TC_ACT_OK,
                &p,
                &p.with_src(PUBLIC, 8810),
            )
        },
        {
            let p = Pkt::udp(RANGE_CLIENT, 9815, REMOTE, 1);
            rewritten(
                "range reply, last port, UDP",
                TC_ACT_OK,
                &p,
                &p.with_src(PUBLIC, 8815),
            )
        },
        untouched(
            "from the target address, another port",
            TC_ACT_OK,
            Pkt::tcp(CLIENT, 81, REMOTE, 40000).frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "UDP from a TCP-only target",
            TC_ACT_OK,
            Pkt::udp(CLIENT, 80, REMOTE, 40000).frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "from another tunnel address",
            TC_ACT_OK,
            Pkt::tcp([10, 8, 0, 9], 80, REMOTE, 40000).frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "the server's own traffic",
            TC_ACT_OK,
            Pkt::tcp(PUBLIC, 22, REMOTE, 40000).frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "ICMP from the client",
            TC_ACT_OK,
            Pkt::icmp_echo(CLIENT, REMOTE).frame(),
            Outcome::OtherProtocol,
        ),
        untouched(
            "IPv6",
            TC_ACT_OK,
            Pkt {
                ether_type: ETH_P_IPV6,
                ..tcp.clone()
            }
            .frame(),
            Outcome::NotIpv4,
        ),
        untouched(
            "ARP",
            TC_ACT_OK,
            Pkt {
                ether_type: ETH_P_ARP,
                ..tcp.clone()
            }
            .frame(),
            Outcome::NotIpv4,
        ),
        untouched(
            "two VLAN tags",
            TC_ACT_OK,
            Pkt {
                vlans: vec![1, 2],
                ..tcp.clone()
            }
            .frame(),
            Outcome::VlanStacked,
        ),
        untouched(
            "later fragment of a datagram whose first fragment was not seen",
            TC_ACT_OK,
            Pkt {
                frag: 185,
                ..udp.clone()
            }
            .frame(),
            Outcome::Fragment,
        ),
        untouched(
            "IHL 4",
            TC_ACT_OK,
            patched(reply_frame.clone(), |f| f[14] = 0x44),
            Outcome::BadIpHeader,
        ),
        untouched(
            "total length longer than the frame",
            TC_ACT_OK,
            patched(reply_frame.clone(), |f| {
                f[16..18].copy_from_slice(&1500u16.to_be_bytes())
            }),
            Outcome::Truncated,
        ),
    ];
    f.extend(fragment_fixtures(
        TC_ACT_OK,
        &Pkt::udp(CLIENT, 53, REMOTE, 40001),
        &Pkt::udp(CLIENT, 53, REMOTE, 40001).with_src(PUBLIC, 5353),
        &Pkt::udp(CLIENT, 54, REMOTE, 40001),
    ));
    f.extend(egress_icmp_fixtures());
    // BPF_PROG_TEST_RUN refuses an skb whose IPv4 header is incomplete (EINVAL), as the stack
    // never hands one to egress; so truncations here start at the end of the IPv4 header.
    for cut in [34, 40, 53] {
        f.push(untouched(
            &format!("reply cut to {cut} bytes"),
            TC_ACT_OK,
            reply_frame[..cut].to_vec(),
            Outcome::Truncated,
        ));
    }
    h.check(false, &f);
}

/// With the tunnel network 10.8.0.0/24 in `TUNNEL_NETWORKS`, egress drops what it did not
/// rewrite from a tunnel address (a reply whose reservation is gone), and nothing else.
#[test]
fn egress_tunnel_source_fixtures() {
    let mut h = Harness::new();
    h.0.state
        .set_tunnel_networks(&["10.8.0.0/24".parse().unwrap()])
        .unwrap();
    let tcp = Pkt::tcp(CLIENT, 80, REMOTE, 40000);
    let dropped = |description: &str, frame: Vec<u8>| {
        untouched(
            description,
            TC_ACT_SHOT,
            frame,
            Outcome::TunnelSourceDropped,
        )
    };
    let f = vec![
        rewritten(
            "a reply of a reservation is still rewritten",
            TC_ACT_OK,
            &tcp,
            &tcp.with_src(PUBLIC, 8080),
        ),
        dropped(
            "TCP from a tunnel address, no reservation (one released while the connection lived)",
            Pkt::tcp(CLIENT, 81, REMOTE, 40000).frame(),
        ),
        dropped(
            "UDP from another tunnel client",
            Pkt::udp([10, 8, 0, 77], 5000, REMOTE, 40001).frame(),
        ),
        dropped(
            "ICMP echo from a tunnel address, not masqueraded",
            Pkt::icmp_echo(CLIENT, REMOTE).frame(),
        ),
        {
            // Another tunnel address reports an error about a forwarded flow: the quote is
            // rewritten, the outer source is not the target's, so it would leak.
            let quoted = Pkt::udp(REMOTE, 40001, CLIENT, 53);
            let quoted_out = quoted.with_dst(PUBLIC, 5353);
            Fixture {
                description: "ICMP error about a forwarded flow from another tunnel address".into(),
                packet_in: Pkt::icmp_error([10, 8, 0, 77], REMOTE, 3, 1, &quoted.ipv4()).frame(),
                action: TC_ACT_SHOT,
                packet_out: Pkt::icmp_error([10, 8, 0, 77], REMOTE, 3, 1, &quoted_out.ipv4())
                    .frame(),
                outcome: Outcome::TunnelSourceDropped,
            }
        },
        icmp_rewritten(
            "the same error from the target itself leaves from the public address",
            TC_ACT_OK,
            &Pkt::icmp_error(
                CLIENT,
                REMOTE,
                3,
                3,
                &Pkt::udp(REMOTE, 40001, CLIENT, 53).ipv4(),
            ),
            &Pkt::icmp_error(
                PUBLIC,
                REMOTE,
                3,
                3,
                &Pkt::udp(REMOTE, 40001, CLIENT, 53)
                    .with_dst(PUBLIC, 5353)
                    .ipv4(),
            ),
        ),
        dropped(
            "a later fragment from a tunnel address pf cannot place",
            Pkt {
                frag: 185,
                ..Pkt::udp(CLIENT, 53, REMOTE, 40001)
            }
            .frame(),
        ),
        dropped(
            "a TCP header cut short inside a whole IPv4 packet, from a tunnel address",
            patched(tcp.frame()[..40].to_vec(), |f| {
                f[16..18].copy_from_slice(&26u16.to_be_bytes())
            }),
        ),
        untouched(
            "masqueraded traffic (the public address) passes",
            TC_ACT_OK,
            Pkt::tcp(PUBLIC, 55000, REMOTE, 443).frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "just outside the network passes",
            TC_ACT_OK,
            Pkt::tcp([10, 8, 1, 2], 80, REMOTE, 40000).frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "a bad IPv4 header is not read for its source",
            TC_ACT_OK,
            patched(tcp.frame(), |f| f[14] = 0x44),
            Outcome::BadIpHeader,
        ),
        untouched(
            "ARP passes",
            TC_ACT_OK,
            Pkt {
                ether_type: ETH_P_ARP,
                ..tcp.clone()
            }
            .frame(),
            Outcome::NotIpv4,
        ),
    ];
    h.check(false, &f);
    // Emptied, the guard drops nothing.
    h.0.state.set_tunnel_networks(&[]).unwrap();
    h.check(
        false,
        &[untouched(
            "with no tunnel networks, an unreserved reply passes",
            TC_ACT_OK,
            Pkt::tcp(CLIENT, 81, REMOTE, 40000).frame(),
            Outcome::NoReservation,
        )],
    );
}

/// A fragmented datagram through either program, in order: its first fragment is rewritten and
/// recorded, its later fragment follows; a later fragment of an unseen datagram, and the
/// fragments of a datagram that matches no reservation, pass untouched. Run in this order, as
/// the fragment table carries state from one fixture to the next.
fn fragment_fixtures(
    action: u32,
    datagram: &Pkt,
    rewritten_datagram: &Pkt,
    unreserved: &Pkt,
) -> Vec<Fixture> {
    let datagram = Pkt {
        id: 0x1001,
        payload: (0..40).collect(),
        ..datagram.clone()
    };
    let rewritten_datagram = Pkt {
        id: 0x1001,
        payload: (0..40).collect(),
        ..rewritten_datagram.clone()
    };
    let [first, last] = datagram.fragments(24);
    let [first_out, last_out] = rewritten_datagram.fragments(24);
    let unseen = Pkt {
        id: 0x1002,
        ..last.clone()
    };
    let [other_first, other_last] = Pkt {
        id: 0x1003,
        ..unreserved.clone()
    }
    .fragments(8);
    vec![
        rewritten(
            "first fragment of a UDP datagram: rewritten (the checksum covers the whole datagram)",
            action,
            &first,
            &first_out,
        ),
        rewritten(
            "later fragment of that datagram: the address follows the first fragment",
            action,
            &last,
            &last_out,
        ),
        untouched(
            "later fragment of a datagram whose first fragment was not seen",
            action,
            unseen.frame(),
            Outcome::Fragment,
        ),
        untouched(
            "first fragment of an unreserved datagram",
            action,
            other_first.frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "later fragment of the unreserved datagram",
            action,
            other_last.frame(),
            Outcome::Fragment,
        ),
    ]
}

/// ICMP errors from the Internet about packets pf's egress sent from a public endpoint.
fn ingress_icmp_fixtures() -> Vec<Fixture> {
    let tcp = Pkt::tcp(PUBLIC, 8080, REMOTE, 40000);
    let tcp_out = tcp.with_src(CLIENT, 80);
    let udp = Pkt::udp(PUBLIC, 5353, REMOTE, 40001);
    let udp_out = udp.with_src(CLIENT, 53);
    let error = |quoted: &[u8]| Pkt::icmp_error(ROUTER, PUBLIC, 3, 4, quoted);
    let error_out = |quoted: &[u8]| Pkt::icmp_error(ROUTER, CLIENT, 3, 4, quoted);
    vec![
        icmp_rewritten(
            "fragmentation needed about a forwarded TCP flow, whole packet quoted",
            XDP_PASS,
            &error(&tcp.ipv4()),
            &error_out(&tcp_out.ipv4()),
        ),
        icmp_rewritten(
            "RFC 792's minimum quote: IPv4 header and 8 bytes (no TCP checksum to update)",
            XDP_PASS,
            &error(&tcp.ipv4()[..28]),
            &error_out(&tcp_out.ipv4()[..28]),
        ),
        icmp_rewritten(
            "time exceeded about a forwarded UDP flow",
            XDP_PASS,
            &Pkt::icmp_error(ROUTER, PUBLIC, 11, 0, &udp.ipv4()),
            &Pkt::icmp_error(ROUTER, CLIENT, 11, 0, &udp_out.ipv4()),
        ),
        {
            let zero = Pkt {
                udp_no_checksum: true,
                ..udp.clone()
            };
            let zero_out = Pkt {
                udp_no_checksum: true,
                ..udp_out.clone()
            };
            icmp_rewritten(
                "parameter problem about UDP without a checksum: the quoted 0 stays 0",
                XDP_PASS,
                &Pkt::icmp_error(ROUTER, PUBLIC, 12, 0, &zero.ipv4()),
                &Pkt::icmp_error(ROUTER, CLIENT, 12, 0, &zero_out.ipv4()),
            )
        },
        {
            let opts = Pkt {
                ip_options: vec![0x01; 8],
                ..tcp.clone()
            };
            let opts_out = Pkt {
                ip_options: vec![0x01; 8],
                ..tcp_out.clone()
            };
            let outer = |p: &Pkt, dst| Pkt {
                vlans: vec![7],
                ip_options: vec![0x01; 4],
                ..Pkt::icmp_error(ROUTER, dst, 3, 4, &p.ipv4())
            };
            icmp_rewritten(
                "VLAN tag, outer and quoted IPv4 options",
                XDP_PASS,
                &outer(&opts, PUBLIC),
                &outer(&opts_out, CLIENT),
            )
        },
        untouched(
            "error about the server's own, unreserved port",
            XDP_PASS,
            error(&Pkt::tcp(PUBLIC, 8081, REMOTE, 40000).ipv4()).frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "error sent to another address than the quoted source",
            XDP_PASS,
            Pkt::icmp_error(ROUTER, OTHER_PUBLIC, 3, 4, &tcp.ipv4()).frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "error quoting an ICMP echo",
            XDP_PASS,
            error(&Pkt::icmp_echo(PUBLIC, REMOTE).ipv4()).frame(),
            Outcome::OtherProtocol,
        ),
        untouched(
            "redirect (not an error pf translates)",
            XDP_PASS,
            Pkt::icmp_error(ROUTER, PUBLIC, 5, 1, &tcp.ipv4()).frame(),
            Outcome::OtherProtocol,
        ),
        untouched(
            "quote cut inside the ports",
            XDP_PASS,
            error(&tcp.ipv4()[..23]).frame(),
            Outcome::Truncated,
        ),
        untouched(
            "quote cut inside the quoted IPv4 header",
            XDP_PASS,
            error(&tcp.ipv4()[..19]).frame(),
            Outcome::Truncated,
        ),
        untouched(
            "quoted IHL 4",
            XDP_PASS,
            error(&patched(tcp.ipv4(), |q| q[0] = 0x44)).frame(),
            Outcome::BadIpHeader,
        ),
        untouched(
            "quote of a later fragment (no ports)",
            XDP_PASS,
            error(
                &Pkt {
                    frag: 0x2000 | 3,
                    ..tcp.clone()
                }
                .ipv4(),
            )
            .frame(),
            Outcome::Fragment,
        ),
        untouched(
            "a fragmented ICMP error",
            XDP_PASS,
            Pkt {
                frag: 0x2000,
                ..error(&tcp.ipv4())
            }
            .frame(),
            Outcome::Fragment,
        ),
    ]
}

/// ICMP errors about packets that reached a tunnel endpoint through pf, on their way out.
fn egress_icmp_fixtures() -> Vec<Fixture> {
    let udp = Pkt::udp(REMOTE, 40001, CLIENT, 53);
    let udp_out = udp.with_dst(PUBLIC, 5353);
    let tcp = Pkt::tcp(REMOTE, 40000, CLIENT, 80);
    let tcp_out = tcp.with_dst(PUBLIC, 8080);
    vec![
        icmp_rewritten(
            "port unreachable from the tunnel endpoint: outer source and quoted destination",
            TC_ACT_OK,
            &Pkt::icmp_error(CLIENT, REMOTE, 3, 3, &udp.ipv4()),
            &Pkt::icmp_error(PUBLIC, REMOTE, 3, 3, &udp_out.ipv4()),
        ),
        icmp_rewritten(
            "fragmentation needed from the server itself: its outer source is kept",
            TC_ACT_OK,
            &Pkt::icmp_error(PUBLIC, REMOTE, 3, 4, &tcp.ipv4()),
            &Pkt::icmp_error(PUBLIC, REMOTE, 3, 4, &tcp_out.ipv4()),
        ),
        icmp_rewritten(
            "RFC 792's minimum quote from the tunnel endpoint",
            TC_ACT_OK,
            &Pkt::icmp_error(CLIENT, REMOTE, 3, 3, &tcp.ipv4()[..28]),
            &Pkt::icmp_error(PUBLIC, REMOTE, 3, 3, &tcp_out.ipv4()[..28]),
        ),
        untouched(
            "error about an unreserved flow",
            TC_ACT_OK,
            Pkt::icmp_error(
                CLIENT,
                REMOTE,
                3,
                3,
                &Pkt::udp(REMOTE, 1, CLIENT, 54).ipv4(),
            )
            .frame(),
            Outcome::NoReservation,
        ),
        untouched(
            "echo request from the tunnel endpoint",
            TC_ACT_OK,
            Pkt::icmp_echo(CLIENT, REMOTE).frame(),
            Outcome::OtherProtocol,
        ),
    ]
}
