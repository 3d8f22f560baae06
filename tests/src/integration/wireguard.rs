//! pf on a VPN server whose tunnel is real WireGuard (`kit::wireguard`): the kernel's module
//! where it exists, `wireguard-go` on TUN otherwise. The encrypted UDP of the tunnel itself
//! crosses pub0 both ways, where pf must leave it alone.

use std::{io::ErrorKind, net::UdpSocket, time::Duration};

use crate::kit::{
    topology::{CLIENT_IP, GATEWAY_TUNNEL_IP, INTERNET_IP, PUBLIC_IFACE, PUBLIC_IP},
    traffic::{Servers, udp_answer, upload_to_public},
    wireguard::{CLIENT_WG, Implementation, SERVER_WG, WireguardTopology},
};

use super::common::{
    TempPinDir, assert_forwards_tcp_and_udp, assert_port_unreachable_from_public, counter, pf_in,
    pf_in_ns, pf_ok, pf_stats, require_root, reserve_to_client, traffic,
};

fn topology(name: &str) -> WireguardTopology {
    let topo = WireguardTopology::new(&format!("pf{}{name}", std::process::id()))
        .expect("building the WireGuard topology");
    eprintln!("WireGuard: {:?}", topo.implementation);
    topo
}

/// A ping through the tunnel, client to server: the tunnel still works.
fn tunnel_carries_ping(topo: &WireguardTopology) -> bool {
    topo.client
        .cmd(&["ping", "-c", "1", "-W", "2", GATEWAY_TUNNEL_IP])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// pf's default mode on the public NIC of a WireGuard server: TCP, UDP, a range, ICMP errors
/// both ways, path MTU discovery into the 1,420-byte tunnel, fragments, release; and the
/// tunnel's own UDP passes pf untouched (the tunnel keeps working, which it could not if a byte
/// of its authenticated packets changed) and is counted as not reserved, both ways.
#[test]
fn wireguard_default_mode() {
    require_root();
    let dir = TempPinDir::new();
    let _service = dir.serve();
    let topo = topology("wg");
    let mut servers = Servers::new();
    servers.http(&topo.client, 80);
    for port in 9810..=9812 {
        servers.http(&topo.client, port);
    }
    servers.tcp_sink(&topo.client, 90);
    servers.udp_echo(&topo.client, 5300);

    pf_in(&topo.server, &dir, &["attach", PUBLIC_IFACE]);
    // Nothing but the tunnel crosses pub0 during this ping (ICMP inside WireGuard's UDP, to
    // and from port 51820): each direction counts it as not reserved, and it arrives, which it
    // could not if pf had changed a byte of the authenticated packets.
    let before = pf_stats(&dir);
    assert!(tunnel_carries_ping(&topo), "the tunnel with pf attached");
    let after = pf_stats(&dir);
    for direction in ["ingress", "egress"] {
        let moved = |name| counter(&after, direction, name) - counter(&before, direction, name);
        assert!(
            moved("no_reservation") >= 1,
            "{direction}: WireGuard's UDP counted as not reserved: {after}"
        );
        assert_eq!(moved("rewritten"), 0, "{direction}: {after}");
    }
    reserve_to_client(
        &dir,
        &[
            ("8080/tcp", 80),
            ("8090/tcp", 90),
            ("5353/udp", 5300),
            ("7000/udp", 7000),
            ("8810-8812/tcp", 9810),
        ],
    );

    // TCP, UDP and a range, each reaching the client through the tunnel with the internet
    // host's own address, and answered from the public endpoint.
    assert_forwards_tcp_and_udp(&topo.inet, "through the tunnel");
    for (public, target) in (8810..=8812).zip(9810..=9812) {
        assert_eq!(
            topo.inet
                .curl(&format!("http://{PUBLIC_IP}:{public}/"))
                .unwrap(),
            format!("port {target} from {INTERNET_IP}")
        );
    }

    // The client's port unreachable, through the tunnel and pf, at the internet host.
    assert_port_unreachable_from_public(&topo.inet, 7000);
    // The internet host's port unreachable, at the client's socket on its forwarded port.
    assert_eq!(
        udp_answer(&topo.client, (CLIENT_IP, 7000), (INTERNET_IP, 40999)),
        Err(ErrorKind::ConnectionRefused),
        "the tunnel client's socket"
    );

    // Path MTU discovery into the tunnel: the target is a device behind the customer's router
    // that advertises a 1,460-byte MSS (the router does not clamp it), so the internet host
    // sends 1,500-byte packets, which the server's 1,420-byte wg0 cannot carry. Its
    // fragmentation-needed, about the rewritten packet, must reach the sender about
    // PUBLIC_IP:8090, or the upload stalls.
    topo.client
        .run(&[
            "ip", "route", "replace", "default", "dev", CLIENT_WG, "advmss", "1460",
        ])
        .unwrap();
    let egress_icmp_before = counter(&pf_stats(&dir), "egress", "icmp_error_rewritten");
    assert_eq!(
        upload_to_public(&topo.inet, 8090, 4 << 20, Duration::from_secs(30)).ok(),
        Some((4usize << 20).to_string()),
        "a 4 MB upload into a 1,420-byte WireGuard tunnel"
    );
    assert!(
        counter(&pf_stats(&dir), "egress", "icmp_error_rewritten") > egress_icmp_before,
        "the server's fragmentation-needed went out through pf's translation"
    );

    // A 4,000-byte datagram: fragmented by the internet host at 1,500 bytes, again by the
    // server into the tunnel, and its echo by the client at 1,420; every fragment follows its
    // first through pf.
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
        .unwrap()
        .expect("the echo of a 4,000-byte datagram");
    let mut want = b"pong:".to_vec();
    want.extend_from_slice(&payload);
    assert!(echo == want, "the echo's {} bytes", echo.len());

    let stats = pf_stats(&dir);
    for direction in ["ingress", "egress"] {
        assert!(counter(&stats, direction, "rewritten") > 0, "{stats}");
        assert!(
            counter(&stats, direction, "icmp_error_rewritten") > 0,
            "{stats}"
        );
        assert_eq!(counter(&stats, direction, "rewrite_failed"), 0, "{stats}");
        assert_eq!(
            counter(&stats, direction, "fragment"),
            0,
            "{direction}: no fragment left behind: {stats}"
        );
    }
    assert_eq!(counter(&stats, "egress", "tunnel_source_dropped"), 0);
    for spec in ["198.51.100.1:8080/tcp", "198.51.100.1:5353/udp"] {
        let t = traffic(&stats, spec);
        for field in ["in_packets", "out_packets"] {
            assert!(t[field].as_u64().unwrap() > 0, "{spec} {field}: {stats}");
        }
    }

    // Release: that port stops forwarding; the others and the tunnel keep working.
    pf_ok(&dir, &["release", &format!("{PUBLIC_IP}:8080/tcp")]);
    assert!(
        topo.inet
            .curl(&format!("http://{PUBLIC_IP}:8080/"))
            .is_err(),
        "a released port still forwards"
    );
    assert!(topo.inet.curl(&format!("http://{PUBLIC_IP}:8810/")).is_ok());
    assert!(tunnel_carries_ping(&topo), "the tunnel after a release");
}

/// `--fast-path` on the public NIC of a WireGuard server: a WireGuard (or TUN) device cannot
/// take XDP frames, so every forwarded packet falls back to XDP_PASS, counted
/// `no_redirect_device`, and arrives. `--tunnel-side` is refused on the WireGuard device and on
/// a plain TUN device, naming why.
#[test]
fn wireguard_fast_path_falls_back() {
    require_root();
    let dir = TempPinDir::new();
    let _service = dir.serve();
    let topo = topology("wgf");
    let mut servers = Servers::new();
    servers.http(&topo.client, 80);
    servers.udp_echo(&topo.client, 5300);

    let attached = pf_in(&topo.server, &dir, &["attach", PUBLIC_IFACE, "--fast-path"]);
    // Not the WireGuard device (nor pub0, whose far end has neither GRO nor XDP).
    assert!(
        attached.contains("redirected to (none)"),
        "no device takes redirects: {attached}"
    );
    topo.server
        .run(&["ip", "tuntap", "add", "pftun0", "mode", "tun"])
        .unwrap();
    for device in [SERVER_WG, "pftun0"] {
        let out = pf_in_ns(&topo.server, &dir, &["attach", device, "--tunnel-side"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("is not an Ethernet-like interface"),
            "--tunnel-side on {device} ({:?}): {stderr}",
            topo.implementation
        );
    }
    reserve_to_client(&dir, &[("8080/tcp", 80), ("5353/udp", 5300)]);

    assert_forwards_tcp_and_udp(&topo.inet, "through the tunnel");
    let stats = pf_stats(&dir);
    let fast = |name| counter(&stats, "fast_path", name);
    assert_eq!(fast("redirected"), 0, "{stats}");
    // Each rewritten packet moved one fast-path counter: all of them the fallback.
    assert_eq!(
        fast("no_redirect_device"),
        counter(&stats, "ingress", "rewritten"),
        "{stats}"
    );
    assert!(fast("no_redirect_device") > 0, "{stats}");
    assert!(counter(&stats, "egress", "rewritten") > 0, "{stats}");
    assert!(tunnel_carries_ping(&topo), "the tunnel with the fast path");
    if topo.implementation == Implementation::Userspace {
        eprintln!("{SERVER_WG} is wireguard-go's TUN device here; the kernel's runs in the VM");
    }
}
