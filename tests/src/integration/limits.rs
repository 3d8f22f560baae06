//! Limits on what reaches a reservation (issue 20's data-plane half). The fixtures run real
//! packets through the loaded XDP program with BPF_PROG_TEST_RUN: each kind of limit drops
//! what it refuses, counts it with the reservation and the reason, and leaves every other
//! reservation alone. The flood runs through `pf serve` on veth namespaces: a limited
//! reservation delivers its rate (within 10%) while an unlimited one beside it delivers all
//! it is sent, a SYN flood leaves an established connection working, and an allow-list
//! admits one source and drops another.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use pf::{
    domain::limits::{Limits, SourceList},
    kernel::limit::LimitRule,
};
use pf_common::{LimitDrop, counters::Outcome};
use serde_json::Value;

use super::common::{
    LoadedPf, TempPinDir, counters_moved, pf_in, pf_ok, require_root, reservations, run_program,
};
use crate::{
    fixtures::{CLIENT, PUBLIC, REMOTE, ROUTER, XDP_PASS},
    kit::{
        packet::Pkt,
        serve::TEST_POLICY,
        topology::{CLIENT_IP, INTERNET_IP, PUBLIC_IFACE, Topology},
        traffic::Servers,
    },
};

const XDP_DROP: u32 = 1;

fn limited(pf: &mut LoadedPf, public: &str, target: &str, slot: u16, limits: Limits) {
    let r = reservations(&[(public, target)])[0];
    pf.reserve_limited(&r, &LimitRule { slot, limits });
}

/// Runs `frame` `times` times through XDP ingress: how many passed (rewritten), how many
/// were dropped, and how long it took. Every run must be one or the other.
fn flood(pf: &LoadedPf, frame: &[u8], times: usize) -> (usize, usize, Duration) {
    let start = Instant::now();
    let (mut passed, mut dropped) = (0, 0);
    for _ in 0..times {
        let before = pf.state.counters().unwrap();
        let (action, out) = run_program(&pf.programs, true, frame).unwrap();
        let moved = counters_moved(&before, &pf.state.counters().unwrap(), true);
        match action {
            XDP_PASS => {
                assert_eq!(moved, [(Outcome::Rewritten.name(), 1)]);
                assert_ne!(out, frame, "passed but not rewritten");
                passed += 1;
            }
            XDP_DROP => {
                assert_eq!(moved, [(Outcome::LimitDropped.name(), 1)]);
                dropped += 1;
            }
            other => panic!("XDP action {other}"),
        }
    }
    (passed, dropped, start.elapsed())
}

fn drops(pf: &LoadedPf, slot: u16, reason: LimitDrop) -> u64 {
    pf.state.limit_drops(slot).unwrap()[reason as usize]
}

/// The most a rate lets through in `elapsed` from a full bucket: its 100 ms burst plus one,
/// the rate over the time, and one more for the clock's tick.
fn most(rate_per_s: f64, elapsed: Duration) -> usize {
    (rate_per_s * (0.1 + elapsed.as_secs_f64() + 0.02)).ceil() as usize + 2
}

#[test]
fn limits_drop_what_they_refuse_and_count_why() {
    let mut pf = LoadedPf::new(&[]);
    let net = |s: &str| s.parse().unwrap();
    limited(
        &mut pf,
        "198.51.100.1:7000/udp",
        "10.8.0.2:7000",
        1,
        Limits {
            sources: Some(SourceList::Allow(vec![net("203.0.113.0/28")])),
            ..Limits::default()
        },
    );
    limited(
        &mut pf,
        "198.51.100.1:7001/udp",
        "10.8.0.2:7001",
        2,
        Limits {
            sources: Some(SourceList::Deny(vec![net("203.0.113.7/32")])),
            ..Limits::default()
        },
    );
    limited(
        &mut pf,
        "198.51.100.1:7002/udp",
        "10.8.0.2:7002",
        3,
        Limits {
            packets_per_second: Some(1000),
            ..Limits::default()
        },
    );
    limited(
        &mut pf,
        "198.51.100.1:8080/tcp",
        "10.8.0.2:80",
        4,
        Limits {
            syns_per_second: Some(10),
            ..Limits::default()
        },
    );
    limited(
        &mut pf,
        "198.51.100.1:7003/udp",
        "10.8.0.2:7003",
        5,
        Limits {
            // 100 kB/s: the burst is 10 kB, about ten 1,028-byte packets.
            bits_per_second: Some(800_000),
            ..Limits::default()
        },
    );
    pf.state
        .reserve_all(&reservations(&[("198.51.100.1:7004/udp", "10.8.0.2:7004")]))
        .unwrap();

    // Sources: the allow-list admits its network only; the deny-list drops its address only.
    let from = |src: [u8; 4], port: u16| Pkt::udp(src, 40000, PUBLIC, port).frame();
    assert_eq!(flood(&pf, &from(REMOTE, 7000), 3).0, 3);
    assert_eq!(flood(&pf, &from(ROUTER, 7000), 2).1, 2);
    assert_eq!(drops(&pf, 1, LimitDrop::Source), 2);
    assert_eq!(flood(&pf, &from(REMOTE, 7001), 2).1, 2);
    assert_eq!(flood(&pf, &from(ROUTER, 7001), 3).0, 3);
    assert_eq!(drops(&pf, 2, LimitDrop::Source), 2);

    // Packet rate: a full bucket's burst, then the rate.
    let (passed, dropped, took) = flood(&pf, &from(REMOTE, 7002), 400);
    assert!(
        (101..=most(1000.0, took)).contains(&passed),
        "{passed} passed in {took:?}"
    );
    assert_eq!(drops(&pf, 3, LimitDrop::Packets), dropped as u64);

    // SYN rate: new connections only; the connection's other packets are not counted.
    let syn = Pkt {
        tcp_flags: 0x02,
        ..Pkt::tcp(REMOTE, 40000, PUBLIC, 8080)
    }
    .frame();
    let (passed, dropped, took) = flood(&pf, &syn, 60);
    assert!(
        (2..=most(10.0, took)).contains(&passed),
        "{passed} SYNs passed in {took:?}"
    );
    assert_eq!(drops(&pf, 4, LimitDrop::Syn), dropped as u64);
    let ack = Pkt::tcp(REMOTE, 40000, PUBLIC, 8080).frame();
    assert_eq!(flood(&pf, &ack, 50).0, 50, "ACKs of an open connection");

    // Bit rate, by the IP total length.
    let big = Pkt {
        payload: vec![7; 1000],
        ..Pkt::udp(REMOTE, 40000, PUBLIC, 7003)
    }
    .frame();
    let (passed, dropped, took) = flood(&pf, &big, 100);
    let bytes_per_s = 100_000.0 / 1028.0;
    assert!(
        (9..=most(bytes_per_s, took)).contains(&passed),
        "{passed} passed in {took:?}"
    );
    assert_eq!(drops(&pf, 5, LimitDrop::Bits), dropped as u64);

    // A reservation without limits is never dropped.
    assert_eq!(flood(&pf, &from(REMOTE, 7004), 400).0, 400);

    // Released, a reservation's limits go: its slot cleared, its list gone.
    let spec = "198.51.100.1:7000/udp".parse().unwrap();
    pf.state.release(&spec).unwrap();
    let limits: aya::maps::Array<_, pf_common::Limit> = pf.map(pf_common::map_names::LIMITS);
    assert_eq!(limits.get(&1, 0).unwrap(), pf_common::Limit::default());
    let sources: aya::maps::LpmTrie<_, pf_common::SourceNet, u8> =
        pf.map(pf_common::map_names::LIMIT_SOURCES);
    let slots: Vec<[u8; 4]> = sources.keys().map(|k| k.unwrap().data().slot).collect();
    assert_eq!(slots, vec![[0, 0, 0, 2]], "only slot 2's list is left");
    let _ = CLIENT;
}

/// A TCP socket whose connect to the public address's `port` is under way: its SYN sent, not
/// waited for. Closed (dropped), it sends nothing more.
fn half_open(port: u16) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor this function owns from its creation.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return None;
        }
        let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([198, 51, 100, 1]),
            },
            sin_zero: [0; 8],
        };
        libc::connect(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        Some(owned)
    }
}

/// A reservation's drops, by reason, from `pf list --json`.
fn listed_drops(dir: &TempPinDir, public: &str) -> Value {
    let list: Value = serde_json::from_str(&pf_ok(dir, &["list", "--json"])).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|r| r["public"] == public)
        .unwrap_or_else(|| panic!("{public} not in {list}"))["limits"]["dropped"]
        .clone()
}

/// Sends UDP datagrams from `socket` to each of `ports` at `rate` per port and second for
/// `length`, and returns how many went to each.
fn paced_udp(socket: &UdpSocket, ports: &[u16], rate: u32, length: Duration) -> Vec<u64> {
    let mut sent = vec![0u64; ports.len()];
    let start = Instant::now();
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    while start.elapsed() < length {
        let due = start + tick * ((start.elapsed().as_millis() / 10) as u32 + 1);
        for _ in 0..per_tick {
            for (i, port) in ports.iter().enumerate() {
                let to = SocketAddrV4::new("198.51.100.1".parse().unwrap(), *port);
                if socket.send_to(b"flood", to).is_ok() {
                    sent[i] += 1;
                }
            }
        }
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    sent
}

/// Counts datagrams arriving on `socket` until `quiet` passes without one.
fn count_udp(socket: UdpSocket, quiet: Duration) -> std::thread::JoinHandle<u64> {
    socket.set_read_timeout(Some(quiet)).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut n = 0;
        // Bounded: the flood lasts seconds; a minute's worth at its rate is the most.
        while n < 5_000_000 && socket.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    })
}

#[test]
fn limits_hold_under_a_flood_and_spare_everything_else() {
    require_root();
    let dir = TempPinDir::new();
    let topo = Topology::new(&format!("pf{}lim", std::process::id())).unwrap();
    let _service = dir.serve_with(Some(&topo.server), TEST_POLICY);
    pf_in(&topo.server, &dir, &["attach", PUBLIC_IFACE]);
    let reserve = |public: &str, to: &str, extra: &[&str]| {
        let mut args = vec!["reserve", public, "--to", to, "--owner", "acct-1"];
        args.extend_from_slice(extra);
        pf_ok(&dir, &args);
    };
    reserve("198.51.100.1:7000/udp", "10.8.0.2", &["--max-pps", "1000"]);
    reserve("198.51.100.1:7001/udp", "10.8.0.2", &[]);
    reserve(
        "198.51.100.1:7002/udp",
        "10.8.0.2",
        &["--allow", INTERNET_IP],
    );
    reserve("198.51.100.1:8080/tcp", "10.8.0.2:80", &["--max-syn", "20"]);

    // A bounded flood (3 s, 10,000 datagrams a second to each port) at the limited
    // reservation and the unlimited one beside it.
    let bind = |port: u16| {
        topo.client
            .within(move || UdpSocket::bind((CLIENT_IP, port)))
            .unwrap()
            .unwrap()
    };
    let (limited_rx, open_rx) = (bind(7000), bind(7001));
    let limited_count = count_udp(limited_rx, Duration::from_secs(1));
    let open_count = count_udp(open_rx, Duration::from_secs(1));
    let sender = topo
        .inet
        .within(|| UdpSocket::bind((INTERNET_IP, 0)))
        .unwrap()
        .unwrap();
    let length = Duration::from_secs(3);
    let started = Instant::now();
    // `pf top` watches one second in the middle of the flood, by drops and by packets.
    let (sent, tops) = std::thread::scope(|scope| {
        let watch = |by: &'static str| {
            let dir = &dir;
            scope.spawn(move || {
                std::thread::sleep(Duration::from_millis(700));
                let text = pf_ok(dir, &["top", "--by", by, "--interval", "1s", "--json"]);
                serde_json::from_str::<Value>(&text).unwrap()
            })
        };
        let tops = [watch("drops"), watch("packets")];
        let sent = paced_udp(&sender, &[7000, 7001], 10_000, length);
        (sent, tops.map(|t| t.join().unwrap()))
    });
    let took = started.elapsed();
    let (limited_got, open_got) = (limited_count.join().unwrap(), open_count.join().unwrap());
    // The limit admits its burst (101) and 1,000 a second; within 10%.
    let expected = 101.0 + 1000.0 * took.as_secs_f64();
    let error = (limited_got as f64 - expected) / expected;
    eprintln!(
        "flood: limited {limited_got} of {} in {took:?} ({:+.1}% off {expected:.0}); unlimited {open_got} of {}",
        sent[0],
        error * 100.0,
        sent[1]
    );
    assert!(
        error.abs() <= 0.10,
        "the limited reservation got {limited_got} of {} in {took:?}: {:.1}% off {expected:.0}",
        sent[0],
        error * 100.0
    );
    assert!(
        open_got as f64 >= 0.95 * sent[1] as f64,
        "the unlimited reservation got {open_got} of {}",
        sent[1]
    );
    // pf top: the limited reservation drops most (about 9,000 a second), the unlimited one
    // moves most packets (about 10,000 a second), each rate within a third of the flood's.
    let [by_drops, by_packets] = &tops;
    let near = |got: &Value, want: f64| (got.as_f64().unwrap() - want).abs() <= want / 3.0;
    assert_eq!(
        by_drops[0]["spec"], "198.51.100.1:7000/udp -> 10.8.0.2:7000",
        "{by_drops}"
    );
    assert!(near(&by_drops[0]["drops_per_second"], 9000.0), "{by_drops}");
    assert!(
        near(&by_drops[0]["packets_per_second"], 1000.0),
        "{by_drops}"
    );
    assert_eq!(
        by_drops.as_array().unwrap().len(),
        1,
        "only it dropped: {by_drops}"
    );
    assert_eq!(
        by_packets[0]["spec"], "198.51.100.1:7001/udp -> 10.8.0.2:7001",
        "{by_packets}"
    );
    assert!(
        near(&by_packets[0]["packets_per_second"], 10_000.0),
        "{by_packets}"
    );
    let dropped = &listed_drops(&dir, "198.51.100.1:7000/udp");
    assert_eq!(
        dropped["packet_rate"].as_u64().unwrap() + limited_got,
        sent[0],
        "every datagram delivered or counted as dropped: {dropped}"
    );

    // A SYN flood on a limited TCP reservation: an established connection keeps working.
    let mut servers = Servers::new();
    servers.tcp(&topo.client, 80, |mut conn, _| {
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 64];
        while let Ok(n @ 1..) = conn.read(&mut buf) {
            if conn.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let mut established = topo
        .inet
        .within(|| TcpStream::connect(("198.51.100.1", 8080)))
        .unwrap()
        .expect("connecting before the flood");
    established
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let echo = |conn: &mut TcpStream, text: &[u8]| {
        conn.write_all(text).unwrap();
        let mut got = vec![0u8; text.len()];
        conn.read_exact(&mut got).unwrap();
        assert_eq!(got, text);
    };
    echo(&mut established, b"before");
    // 1,000 half-open connections at once: each sends one SYN now (and is closed before
    // its first retransmission).
    let syns = topo
        .inet
        .within(|| {
            (0..1000)
                .filter_map(|_| half_open(8080))
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert!(syns.len() >= 900, "{} half-open connections", syns.len());
    echo(&mut established, b"during the flood");
    std::thread::sleep(Duration::from_millis(300));
    drop(syns);
    echo(&mut established, b"after");
    let dropped = listed_drops(&dir, "198.51.100.1:8080/tcp");
    assert!(
        dropped["syn_rate"].as_u64().unwrap() >= 900,
        "most SYNs dropped: {dropped}"
    );

    // The allow-list: the internet host's address is let in, a second address of it is not.
    let mut servers_udp = Servers::new();
    servers_udp.udp_echo(&topo.client, 7002);
    topo.inet
        .run(&["ip", "addr", "add", "198.51.100.3/24", "dev", "inet0"])
        .unwrap();
    let ask = |src: &'static str| {
        topo.inet
            .within(move || {
                let s = UdpSocket::bind((src, 0)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                s.send_to(b"hi", ("198.51.100.1", 7002)).unwrap();
                let mut buf = [0u8; 64];
                s.recv(&mut buf).map(|n| buf[..n].to_vec()).ok()
            })
            .unwrap()
    };
    assert_eq!(ask(INTERNET_IP).as_deref(), Some(&b"pong:hi"[..]));
    assert_eq!(ask("198.51.100.3"), None, "a source off the allow-list");
    let dropped = listed_drops(&dir, "198.51.100.1:7002/udp");
    assert_eq!(dropped["source"], 1, "{dropped}");
    // pf check: the test packet (from 192.0.2.1) is off the allow-list, and says so; the
    // limits link shows the list and the drop.
    let out = super::common::pf(&dir, &["check", "198.51.100.1:7002/udp", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&v["verdict"], &v["because"]),
        (&"closed".into(), &"program".into()),
        "{v}"
    );
    let link = |name: &str| {
        v["links"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["link"] == name)
            .unwrap_or_else(|| panic!("no {name} link: {v}"))["detail"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(link("program").contains("limits refuse it"), "{v}");
    assert!(link("limits").contains("allow 198.51.100.2/32"), "{v}");
    let human = pf_ok(&dir, &["list"]);
    // The check's test packet was dropped, and counted, too.
    assert!(
        human.contains("allow 198.51.100.2/32; dropped source 2"),
        "{human}"
    );
}
