//! pf under a real VPN server's netfilter rules: the shipped `dist/pf.nft` (FORWARD policy
//! drop, the clients' masquerade) with `pf serve` keeping its set of reserved targets. Proved
//! over veth and over real WireGuard:
//! - forwarded TCP is admitted, and a neighbour on the public network that routes the tunnel
//!   addresses through the server cannot reach an unreserved port of a client;
//! - a client that speaks first from its forwarded UDP port (as torrent DHT does) reaches its
//!   peer as PUBLIC_IP:port and gets the peer's replies back; with the plain masquerade rule
//!   alone it does not (conntrack remaps the reply), which is why the ruleset exempts the set;
//! - the clients' other traffic is masqueraded as before; a release takes the target out of
//!   the set.

use std::{net::UdpSocket, time::Duration};

use crate::kit::{
    ScratchDir,
    netns::Netns,
    serve::{Service, TEST_POLICY},
    topology::{CLIENT_IP, INTERNET_IP, PUBLIC_IFACE, PUBLIC_IP, Topology},
    traffic::Servers,
    wireguard::{SERVER_WG, WireguardTopology},
};

use super::common::{TempPinDir, pf_bin, pf_ok, require_root, reserve_to_client};

/// dist/pf.nft for this topology's interfaces.
fn ruleset(tunnel: &str) -> String {
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/pf.nft"),
    )
    .expect("reading dist/pf.nft");
    shipped
        .replace(
            "define PUBLIC = \"eth0\"",
            &format!("define PUBLIC = \"{PUBLIC_IFACE}\""),
        )
        .replace(
            "define TUNNEL = \"wg0\"",
            &format!("define TUNNEL = \"{tunnel}\""),
        )
}

fn load_rules(ns: &Netns, rules: &str) {
    let mut child = ns
        .cmd(&["nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), rules.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft -f: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The elements of pf's set for `proto` (tcp or udp), as nft lists them.
fn set_elements(ns: &Netns, proto: &str) -> String {
    let out = ns
        .run(&[
            "nft",
            "list",
            "set",
            "ip",
            "pf",
            &format!("forwarded_{proto}"),
        ])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The shipped FORWARD chain's rules again (after a test changed them), from dist/pf.nft.
fn forward_chain(tunnel: &str) -> String {
    let rules = ruleset(tunnel);
    let defines: String = rules
        .lines()
        .filter(|l| l.starts_with("define "))
        .map(|l| format!("{l}\n"))
        .collect();
    let start = rules.find("    chain forward {").expect("a forward chain");
    let body = &rules[start..];
    let end = body.find("\n    }\n").expect("the chain's end");
    let rules: String = body[..end]
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("type "))
        .map(|l| format!("add rule ip pf forward {l}\n"))
        .collect();
    format!("{defines}{rules}")
}

/// A UDP peer on the internet host at `port` that answers each datagram with the address it
/// came from, as it saw it; stops after `datagrams` of them, or 10 s without one. Returns the
/// addresses it answered.
fn address_echo(
    inet: &Netns,
    port: u16,
    datagrams: usize,
) -> std::thread::JoinHandle<Vec<std::net::SocketAddr>> {
    let socket = inet
        .within(move || UdpSocket::bind((INTERNET_IP, port)))
        .unwrap()
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let mut answered = Vec::new();
        for _ in 0..datagrams {
            let Ok((_, peer)) = socket.recv_from(&mut buf) else {
                break;
            };
            let _ = socket.send_to(peer.to_string().as_bytes(), peer);
            answered.push(peer);
        }
        answered
    })
}

/// From the client's `local_port`, one datagram to the internet host's `peer_port` on a
/// connected socket: the answer (the address the peer saw), or why there was none.
fn speak_first(client: &Netns, local_port: u16, peer_port: u16) -> Result<String, String> {
    client
        .within(move || {
            let socket = UdpSocket::bind((CLIENT_IP, local_port)).map_err(|e| e.to_string())?;
            socket
                .connect((INTERNET_IP, peer_port))
                .map_err(|e| e.to_string())?;
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            socket.send(b"find_node").map_err(|e| e.to_string())?;
            let mut buf = [0u8; 512];
            let n = socket.recv(&mut buf).map_err(|e| e.to_string())?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .unwrap()
}

fn scenario(inet: &Netns, server: &Netns, client: &Netns, tunnel: &str) {
    let dir = TempPinDir::new();
    // The leak guard off: otherwise pf's egress would drop the client's answer to a
    // neighbour that got in, and the FORWARD chain's part could not be told apart.
    let policy = format!(
        "[[interfaces]]\nname = \"{PUBLIC_IFACE}\"\n[netfilter]\nset = \"ip pf forwarded\"\n{TEST_POLICY}drop_tunnel_source_leaks = false\n"
    );
    // Before the ruleset is loaded, the set does not exist: the service refuses to start, and
    // says what to load.
    let files = ScratchDir::claim(
        std::env::temp_dir().join(format!("pf-nf-refused-{}", std::process::id())),
    );
    let mut refused =
        Service::prepare(&pf_bin(), files, dir.path(), Some(server.path()), &policy).unwrap();
    let (status, log) = refused.run_to_exit().unwrap();
    assert!(
        !status.success()
            && log.contains("no set ip pf forwarded_tcp")
            && log.contains("dist/pf.nft"),
        "{log}"
    );
    drop(refused);
    load_rules(server, &ruleset(tunnel));
    let _service = dir.serve_with(Some(server), &policy);
    let mut servers = Servers::new();
    servers.http(client, 80);
    servers.http(client, 2222);
    reserve_to_client(
        &dir,
        &[("8080/tcp", 80), ("9000/udp", 9000), ("9001/udp", 9001)],
    );
    for (proto, want) in [
        ("tcp", "10.8.0.2 . 80"),
        ("udp", "10.8.0.2 . 9000"),
        ("udp", "10.8.0.2 . 9001"),
    ] {
        let elements = set_elements(server, proto);
        assert!(elements.contains(want), "{want} in {elements}");
    }
    assert!(!set_elements(server, "tcp").contains("9000"));

    // Forwarded TCP is admitted by the FORWARD chain's set rule.
    assert_eq!(
        inet.curl(&format!("http://{PUBLIC_IP}:8080/")).unwrap(),
        format!("port 80 from {INTERNET_IP}")
    );
    // A neighbour on the public network routing the tunnel through the server: the client's
    // unreserved port stays closed to it.
    inet.run(&["ip", "route", "add", "10.8.0.0/24", "via", PUBLIC_IP])
        .unwrap();
    assert!(
        inet.curl(&format!("http://{CLIENT_IP}:2222/")).is_err(),
        "a neighbour reached an unreserved port of a client"
    );
    // The obvious rule instead of the set's lets it in: the check above can see a hole.
    server
        .run(&[
            "nft",
            "insert",
            "rule",
            "ip",
            "pf",
            "forward",
            "iifname",
            PUBLIC_IFACE,
            "oifname",
            tunnel,
            "accept",
        ])
        .unwrap();
    assert_eq!(
        inet.curl(&format!("http://{CLIENT_IP}:2222/")),
        Ok(format!("port 2222 from {INTERNET_IP}")),
        "with the obvious FORWARD rule, the neighbour gets in"
    );
    server
        .run(&["nft", "flush", "chain", "ip", "pf", "forward"])
        .unwrap();
    load_rules(server, &forward_chain(tunnel));

    // The client speaks first from its forwarded port: the peer sees the public endpoint, and
    // its answer comes back to the client's socket.
    let peer = address_echo(inet, 7777, 2);
    assert_eq!(
        speak_first(client, 9000, 7777),
        Ok(format!("{PUBLIC_IP}:9000"))
    );
    // Traffic from any other port is masqueraded as before.
    let seen = speak_first(client, 5555, 7777).expect("masqueraded traffic gets its answer");
    assert!(seen.starts_with(&format!("{PUBLIC_IP}:")), "{seen}");
    assert_eq!(peer.join().unwrap().len(), 2);

    // With the plain masquerade rule alone, the same first datagram from a forwarded port is
    // masqueraded, the peer's reply (rewritten by pf before conntrack sees it) clashes with
    // that entry, and conntrack remaps it: the client's connected socket never gets it.
    server
        .run(&["nft", "flush", "chain", "ip", "pf", "postrouting"])
        .unwrap();
    server
        .run(&[
            "nft",
            "add",
            "rule",
            "ip",
            "pf",
            "postrouting",
            "oifname",
            PUBLIC_IFACE,
            "ip",
            "saddr",
            "10.8.0.0/24",
            "masquerade",
        ])
        .unwrap();
    let peer = address_echo(inet, 7778, 1);
    assert!(
        speak_first(client, 9001, 7778).is_err(),
        "without the set's exemption the reply should not come back"
    );
    let answered = peer.join().unwrap();
    assert_eq!(
        answered.len(),
        1,
        "the peer got the datagram and answered it: {answered:?}"
    );

    // A release takes the target out of the set.
    pf_ok(&dir, &["release", &format!("{PUBLIC_IP}:9000/udp")]);
    assert!(!set_elements(server, "udp").contains("10.8.0.2 . 9000"));
}

#[test]
fn netfilter_ruleset_over_veth() {
    require_root();
    let topo =
        Topology::new(&format!("pf{}nf", std::process::id())).expect("building the topology");
    scenario(&topo.inet, &topo.server, &topo.client, "tun0");
}

#[test]
fn netfilter_ruleset_over_wireguard() {
    require_root();
    let topo = WireguardTopology::new(&format!("pf{}nfwg", std::process::id()))
        .expect("building the WireGuard topology");
    scenario(&topo.inet, &topo.server, &topo.client, SERVER_WG);
}
