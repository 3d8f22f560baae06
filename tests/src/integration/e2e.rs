//! End to end: real traffic between three network namespaces, through pf attached to the
//! server's public veth, with real tools on both ends (curl and nc on the internet host, a
//! Python HTTP server and socket servers on the tunnel client).

use std::{collections::BTreeSet, io::ErrorKind, net::UdpSocket, process::Command, time::Duration};

use crate::kit::{
    topology::{CLIENT_IP, INTERNET_IP, PUBLIC_IFACE, PUBLIC_IP, Topology},
    traffic::{Servers, udp_answer, udp_round_trip, upload_to_public, web_root},
};
use serde_json::Value;

use super::common::{
    TempPinDir, assert_forwards_tcp_and_udp, assert_port_unreachable_from_public, counter,
    kernel_version, pf_in, pf_list, pf_ok, pf_stats, require_root, reserve_to_client, traffic,
};

/// How many egress filters on pub0 in `ns` run the program `name`, as `tc` lists them (a
/// filter's line names its program).
fn egress_filters_running(ns: &crate::kit::netns::Netns, name: &str) -> usize {
    let out = ns
        .run(&["tc", "filter", "show", "dev", PUBLIC_IFACE, "egress"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(name))
        .count()
}

/// IDs of the BPF links (XDP or TCX) whose program is one of pf's.
fn pf_link_ids() -> BTreeSet<u64> {
    let out = Command::new("bpftool")
        .args(["link", "show", "--json"])
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "bpftool link show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let links: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .expect("running bpftool");
    let progs: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let pf_progs: BTreeSet<u64> = progs
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            matches!(
                p["name"].as_str(),
                Some("pf_ingress" | "pf_ingress_fast" | "pf_reply_fast" | "pf_egress")
            )
        })
        .filter_map(|p| p["id"].as_u64())
        .collect();
    links
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| {
            l["prog_id"]
                .as_u64()
                .is_some_and(|id| pf_progs.contains(&id))
        })
        .filter_map(|l| l["id"].as_u64())
        .collect()
}

/// Which way forwarded packets take through the server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    /// `pf attach`: XDP_PASS, the kernel forwards.
    Kernel,
    /// `pf attach --fast-path` on pub0 and `--tunnel-side` on tun0, with GRO on the far ends so
    /// both veths can take redirected frames: both directions leave by XDP_REDIRECT.
    Fast,
    /// The same attach, but neither far end has GRO or XDP, so no device can take redirected
    /// frames: every packet must fall back to the kernel, and still arrive.
    FastFallback,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Kernel => "k",
            Path::Fast => "f",
            Path::FastFallback => "b",
        }
    }
}

fn forwarding_scenario(mode: &str, path: Path) {
    require_root();
    let dir = TempPinDir::new();
    // Reservations go through the service, which keeps them in its store.
    let _service = dir.serve();
    let topo = Topology::new(&format!("pf{}{mode}{}", std::process::id(), path.name()))
        .expect("building the topology");
    if path == Path::Fast {
        topo.client
            .run(&["ethtool", "-K", "eth0", "gro", "on"])
            .unwrap();
        topo.inet
            .run(&["ethtool", "-K", "inet0", "gro", "on"])
            .unwrap();
    }
    let client_page = format!("tunnel client page {}", std::process::id());
    let server_page = format!("the server's own page {}", std::process::id());
    let client_root = web_root(&format!("{mode}-client"), &client_page);
    let server_root = web_root(&format!("{mode}-server"), &server_page);
    let client_dir = client_root.path().display().to_string();
    let server_dir = server_root.path().display().to_string();
    topo.client
        .serve_directory(CLIENT_IP, 80, &client_dir)
        .expect("client web server");
    topo.server
        .serve_directory(PUBLIC_IP, 8081, &server_dir)
        .expect("server's own web server");
    let mut servers = Servers::new();
    for port in 9810..=9812 {
        servers.http(&topo.client, port);
    }
    servers.udp_echo(&topo.client, 5300);

    // Before pf: the reserved port is just a closed port on the server.
    assert!(
        topo.inet
            .curl(&format!("http://{PUBLIC_IP}:8080/"))
            .is_err()
    );

    let links_before = pf_link_ids();
    let mut attach = vec!["attach", PUBLIC_IFACE, "--mode", mode];
    if path != Path::Kernel {
        attach.push("--fast-path");
    }
    let attached = pf_in(&topo.server, &dir, &attach);
    assert!(attached.contains(&format!("{mode} mode")), "{attached}");
    if path != Path::Kernel {
        let attached = pf_in(
            &topo.server,
            &dir,
            &["attach", "tun0", "--tunnel-side", "--mode", mode],
        );
        let devices = match path {
            Path::Fast => "redirected to pub0, tun0; replies to pub0",
            _ => "redirected to (none); replies to (none)",
        };
        assert!(
            attached.contains(devices),
            "want '{devices}' in: {attached}"
        );
    }
    let our_links: BTreeSet<u64> = pf_link_ids().difference(&links_before).copied().collect();
    // The egress program is a TCX link from 6.6, a netlink filter (no link) before.
    let tcx = kernel_version() >= (6, 6);
    let want_links = usize::from(tcx) + if path == Path::Kernel { 1 } else { 2 };
    assert_eq!(
        our_links.len(),
        want_links,
        "one XDP link on pub0, its egress TCX link (from 6.6), and one XDP link on tun0 with the \
         fast path: {our_links:?}"
    );
    if !tcx {
        assert_eq!(egress_filters_running(&topo.server, "pf_egress"), 1);
    }
    reserve_to_client(
        &dir,
        &[
            ("8080/tcp", 80),
            ("5353/udp", 5300),
            ("8810-8812/tcp", 9810),
        ],
    );

    // TCP: curl on the internet host reaches the client's web server through the public port.
    assert_eq!(
        topo.inet
            .curl(&format!("http://{PUBLIC_IP}:8080/"))
            .unwrap(),
        client_page
    );
    // UDP: a request and its reply, the reply coming back from the public address and port
    // (nc is connected to it, so it would not accept a reply from anywhere else).
    assert_eq!(
        udp_round_trip(&topo.inet, PUBLIC_IP, 5353, "ping"),
        "pong:ping"
    );
    // A range: each public port reaches its own shifted target, and the client sees the
    // internet host's real address.
    for (public, target) in (8810..=8812).zip(9810..=9812) {
        let body = topo
            .inet
            .curl(&format!("http://{PUBLIC_IP}:{public}/"))
            .unwrap();
        assert_eq!(body, format!("port {target} from {INTERNET_IP}"));
    }
    // The server's own, unreserved port is served by the server itself.
    assert_eq!(
        topo.inet
            .curl(&format!("http://{PUBLIC_IP}:8081/"))
            .unwrap(),
        server_page
    );

    let stats = pf_stats(&dir);
    assert!(counter(&stats, "ingress", "rewritten") > 0, "{stats}");
    let fast = |name| counter(&stats, "fast_path", name);
    let reply = |name| counter(&stats, "reply_fast_path", name);
    match path {
        Path::Kernel => {
            assert_eq!(stats["attached"], serde_json::json!([PUBLIC_IFACE]));
            assert!(counter(&stats, "egress", "rewritten") > 0, "{stats}");
            assert_eq!(fast("redirected") + reply("redirected"), 0, "{stats}");
        }
        Path::Fast => {
            assert_eq!(stats["attached"], serde_json::json!([PUBLIC_IFACE, "tun0"]));
            assert_eq!(stats["roles"]["tun0"], "tunnel side, reply fast path");
            // Both directions took the fast path; the first packets of a flow may have gone
            // the kernel's way while the neighbours were resolved.
            assert!(fast("redirected") > 0, "{stats}");
            assert!(reply("redirected") > 0, "{stats}");
            assert_eq!(fast("no_redirect_device") + reply("no_redirect_device"), 0);
        }
        Path::FastFallback => {
            // Nothing could be redirected, yet everything above arrived: the kernel forwarded
            // each packet after pf's rewrite, and TC egress rewrote every reply.
            assert_eq!(fast("redirected") + reply("redirected"), 0, "{stats}");
            assert!(fast("no_redirect_device") > 0, "{stats}");
            assert!(reply("no_redirect_device") > 0, "{stats}");
            assert!(counter(&stats, "egress", "rewritten") > 0, "{stats}");
        }
    }
    assert!(
        counter(&stats, "ingress", "no_reservation") > 0,
        "the 8081 traffic: {stats}"
    );
    assert_eq!(
        counter(&stats, "ingress", "rewrite_failed") + counter(&stats, "egress", "rewrite_failed"),
        0
    );
    for spec in [
        "198.51.100.1:8080/tcp",
        "198.51.100.1:5353/udp",
        "198.51.100.1:8810-8812/tcp",
    ] {
        let t = traffic(&stats, spec);
        for field in ["in_packets", "in_bytes", "out_packets", "out_bytes"] {
            assert!(t[field].as_u64().unwrap() > 0, "{spec} {field}: {stats}");
        }
    }

    // Release: the port stops forwarding; the others keep working.
    pf_ok(&dir, &["release", &format!("{PUBLIC_IP}:8080/tcp")]);
    assert_eq!(pf_list(&dir).as_array().unwrap().len(), 2);
    assert!(
        topo.inet
            .curl(&format!("http://{PUBLIC_IP}:8080/"))
            .is_err(),
        "released port still forwards"
    );
    assert!(topo.inet.curl(&format!("http://{PUBLIC_IP}:8810/")).is_ok());

    // Detach: no pf program remains on the interfaces, and the server's traffic is unaffected.
    let ifaces: &[&str] = if path == Path::Kernel {
        &[PUBLIC_IFACE]
    } else {
        &[PUBLIC_IFACE, "tun0"]
    };
    for iface in ifaces {
        pf_in(&topo.server, &dir, &["detach", iface]);
        let link = topo
            .server
            .run(&["ip", "-d", "link", "show", iface])
            .unwrap();
        let link = String::from_utf8_lossy(&link.stdout);
        assert!(
            !link.contains("xdp"),
            "an XDP program is still attached to {iface}: {link}"
        );
    }
    let left: Vec<u64> = pf_link_ids().intersection(&our_links).copied().collect();
    assert!(left.is_empty(), "links {left:?} survived detach");
    assert_eq!(egress_filters_running(&topo.server, "pf_egress"), 0);
    assert_eq!(pf_stats(&dir)["attached"], serde_json::json!([]));
    assert_eq!(
        topo.inet
            .curl(&format!("http://{PUBLIC_IP}:8081/"))
            .unwrap(),
        server_page
    );
    assert!(
        topo.inet
            .curl(&format!("http://{PUBLIC_IP}:8810/"))
            .is_err(),
        "forwarding without pf attached"
    );
}

#[test]
fn forwarding_native_xdp() {
    forwarding_scenario("native", Path::Kernel);
}

#[test]
fn forwarding_generic_xdp() {
    forwarding_scenario("skb", Path::Kernel);
}

#[test]
fn forwarding_fast_path() {
    forwarding_scenario("native", Path::Fast);
}

#[test]
fn forwarding_fast_path_falls_back_when_no_device_takes_redirects() {
    forwarding_scenario("native", Path::FastFallback);
}

/// ICMP errors and fragments through pf, with real traffic:
/// - a UDP packet to a reserved port whose target has no listener: the tunnel client's port
///   unreachable reaches the internet host as from PUBLIC_IP:port (so its connected socket gets
///   ECONNREFUSED);
/// - the reverse: the tunnel client's UDP socket, sending from its forwarded port to a closed
///   port on the internet host, gets that host's port unreachable through pf;
/// - path MTU discovery: with a 1280-byte MTU on the server's route into the tunnel, a 4 MB
///   forwarded TCP upload completes because the server's fragmentation-needed error reaches the
///   sender about PUBLIC_IP:port;
/// - a 4,000-byte UDP datagram over 1,500-byte links arrives whole, and so does its 4,005-byte
///   echo: every fragment follows its first through pf, both ways.
#[test]
fn icmp_errors_and_fragments() {
    require_root();
    let dir = TempPinDir::new();
    let _service = dir.serve();
    let topo =
        Topology::new(&format!("pf{}icmp", std::process::id())).expect("building the topology");
    let mut servers = Servers::new();
    servers.tcp_sink(&topo.client, 80);
    servers.udp_echo(&topo.client, 5300);
    pf_in(&topo.server, &dir, &["attach", PUBLIC_IFACE]);
    reserve_to_client(
        &dir,
        &[("8080/tcp", 80), ("5353/udp", 5300), ("7000/udp", 7000)],
    );
    let icmp_counts = || {
        let stats = pf_stats(&dir);
        (
            counter(&stats, "ingress", "icmp_error_rewritten"),
            counter(&stats, "egress", "icmp_error_rewritten"),
        )
    };

    // 1. Port unreachable from the tunnel client, seen on the internet host.
    assert_port_unreachable_from_public(&topo.inet, 7000);
    let (_, egress_icmp) = icmp_counts();
    assert!(
        egress_icmp >= 1,
        "egress icmp_error_rewritten: {egress_icmp}"
    );

    // 2. Port unreachable from the internet host, seen by the tunnel client's socket on its
    //    forwarded port.
    assert_eq!(
        udp_answer(&topo.client, (CLIENT_IP, 7000), (INTERNET_IP, 40999)),
        Err(ErrorKind::ConnectionRefused),
        "the tunnel client's socket"
    );
    let (ingress_icmp, _) = icmp_counts();
    assert!(
        ingress_icmp >= 1,
        "ingress icmp_error_rewritten: {ingress_icmp}"
    );

    // 3. Path MTU discovery through pf. The client's interface keeps 1,500 bytes, so it
    //    advertises a 1,460-byte MSS; only the server's route into the tunnel is smaller.
    topo.server
        .run(&[
            "ip",
            "route",
            "replace",
            "10.8.0.0/24",
            "dev",
            "tun0",
            "mtu",
            "1280",
        ])
        .unwrap();
    let (_, egress_before) = icmp_counts();
    let upload: usize = 4 << 20;
    let reply = upload_to_public(&topo.inet, 8080, upload, Duration::from_secs(20));
    assert_eq!(
        reply.as_ref().map(String::as_str).ok(),
        Some(upload.to_string().as_str()),
        "a 4 MB upload through a 1,280-byte tunnel route: {reply:?}"
    );
    let (_, egress_after) = icmp_counts();
    assert!(
        egress_after > egress_before,
        "the server's fragmentation-needed went out through pf's translation"
    );

    // 4. A 4,000-byte UDP datagram over 1,500-byte links, and its echo.
    let before = pf_stats(&dir);
    let payload: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    let sent = payload.clone();
    let echo = topo
        .inet
        .within(move || -> std::io::Result<Vec<u8>> {
            let socket = UdpSocket::bind(("0.0.0.0", 0))?;
            socket.connect((PUBLIC_IP, 5353))?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            socket.send(&sent)?;
            let mut buf = vec![0u8; 65536];
            let n = socket.recv(&mut buf)?;
            Ok(buf[..n].to_vec())
        })
        .unwrap();
    let mut want = b"pong:".to_vec();
    want.extend_from_slice(&payload);
    assert_eq!(
        echo.as_ref().map(Vec::len).map_err(|e| e.kind()),
        Ok(want.len()),
        "the echo of a 4,000-byte datagram"
    );
    assert!(echo.unwrap() == want, "the echo's bytes");
    let after = pf_stats(&dir);
    for direction in ["ingress", "egress"] {
        let moved =
            counter(&after, direction, "rewritten") - counter(&before, direction, "rewritten");
        assert!(
            moved >= 3,
            "{direction}: {moved} rewritten, want every fragment (3)"
        );
        assert_eq!(
            counter(&after, direction, "fragment"),
            counter(&before, direction, "fragment"),
            "{direction}: no fragment left behind"
        );
    }
}

/// Egress on replies whose checksum the NIC was to finish (`CHECKSUM_PARTIAL`) and on replies
/// whose checksum is whole: the tunnel client sends with checksum offload off, then on. Off,
/// every reply takes egress's one store; on, every reply leaves the client with only the
/// pseudo-header sum in its checksum field, crosses the server so, and must take the skb
/// helpers (counted). pub0 has no offload, so the kernel finishes those checksums in software
/// before the internet host, which checks every checksum, sees them: a rewrite that handled
/// the partial sum as a whole one would lose every reply.
#[test]
fn egress_rewrites_partial_and_whole_checksums() {
    require_root();
    let dir = TempPinDir::new();
    let _service = dir.serve();
    let topo =
        Topology::new(&format!("pf{}csum", std::process::id())).expect("building the topology");
    let mut servers = Servers::new();
    servers.http(&topo.client, 80);
    servers.udp_echo(&topo.client, 5300);
    pf_in(&topo.server, &dir, &["attach", PUBLIC_IFACE]);
    reserve_to_client(&dir, &[("8080/tcp", 80), ("5353/udp", 5300)]);
    for (offload, partial) in [("off", false), ("on", true)] {
        topo.client
            .run(&["ethtool", "-K", "eth0", "tx", offload])
            .unwrap();
        let before = pf_stats(&dir);
        assert_forwards_tcp_and_udp(&topo.inet, &format!("client checksum offload {offload}"));
        let after = pf_stats(&dir);
        let rewritten =
            counter(&after, "egress", "rewritten") - counter(&before, "egress", "rewritten");
        let helpers = |s: &Value| s["egress_rewritten_by_helpers"].as_u64().unwrap();
        let by_helpers = helpers(&after) - helpers(&before);
        assert!(rewritten > 0, "offload {offload}: {after}");
        let message = format!(
            "offload {offload}: {rewritten} replies rewritten, {by_helpers} by the helpers"
        );
        if partial {
            // The client's own sockets send partial sums; a reply the kernel builds by itself
            // (a TIME_WAIT socket's ACK to a late FIN, a RST) carries a whole one even with
            // offload on. A slow run meets one now and then (seen once in CI: 8 of 9).
            assert!(
                by_helpers > 0 && by_helpers + 2 >= rewritten && by_helpers <= rewritten,
                "{message}"
            );
        } else {
            assert_eq!(by_helpers, 0, "{message}");
        }
    }
}
