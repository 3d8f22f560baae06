//! End to end: real traffic between three network namespaces, through pf attached to the
//! server's public veth, with real tools on both ends (curl and nc on the internet host, a
//! Python HTTP server and socket servers on the tunnel client).

use std::{
    collections::BTreeSet,
    io::{ErrorKind, Read, Write},
    net::{TcpListener, UdpSocket},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{
    ScratchDir,
    netns::Netns,
    topology::{CLIENT_IP, INTERNET_IP, PUBLIC_IFACE, PUBLIC_IP, Topology},
};
use serde_json::Value;

use super::common::{TempPinDir, pf_in_ns, pf_list, pf_ok, pf_stats, require_root};

/// Upper bound for any server a test starts: it stops by itself even if the test hangs.
const SERVER_LIFETIME: Duration = Duration::from_secs(120);

/// Socket servers running in a namespace; stopped and joined on drop.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    fn new() -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    /// An HTTP responder on `port` whose body names the port and the peer's address, so a test
    /// can see which target a connection reached and that its source address was kept.
    fn http(&mut self, ns: &Netns, port: u16) {
        let listener = ns
            .within(move || TcpListener::bind(("0.0.0.0", port)))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = self.stop.clone();
        self.threads.push(thread::spawn(move || {
            let deadline = Instant::now() + SERVER_LIFETIME;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        conn.set_nonblocking(false).unwrap();
                        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut request = [0u8; 1024];
                        let _ = conn.read(&mut request);
                        let body = format!("port {port} from {}", peer.ip());
                        let _ = write!(
                            conn,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => break,
                }
            }
        }));
    }

    /// A UDP server on `port` that answers each datagram with "pong:" and the datagram.
    fn udp_echo(&mut self, ns: &Netns, port: u16) {
        let socket = ns
            .within(move || UdpSocket::bind(("0.0.0.0", port)))
            .unwrap()
            .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let stop = self.stop.clone();
        self.threads.push(thread::spawn(move || {
            let deadline = Instant::now() + SERVER_LIFETIME;
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    let mut reply = b"pong:".to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = socket.send_to(&reply, peer);
                }
            }
        }));
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A directory holding one page, removed on drop.
fn web_root(name: &str, body: &str) -> ScratchDir {
    let dir = ScratchDir::claim(
        std::env::temp_dir().join(format!("pf-e2e-{}-{name}", std::process::id())),
    );
    std::fs::create_dir_all(dir.path()).unwrap();
    std::fs::write(dir.path().join("index.html"), body).unwrap();
    dir
}

/// One UDP request/reply through `nc`, as a customer's peer would send it.
fn udp_round_trip(ns: &Netns, host: &str, port: u16, message: &str) -> String {
    let mut child = ns
        .cmd(&["nc", "-u", "-w", "2", host, &port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running nc");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(message.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("nc output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// pf run inside the server's network namespace (for attach and detach, which name its
/// interfaces), sharing the host's bpffs.
fn pf_in(ns: &Netns, dir: &TempPinDir, args: &[&str]) -> String {
    let out = pf_in_ns(ns, dir, args);
    assert!(
        out.status.success(),
        "pf {args:?} in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
        .filter(|p| matches!(p["name"].as_str(), Some("pf_ingress" | "pf_egress")))
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

fn counter(stats: &Value, direction: &str, name: &str) -> u64 {
    stats[direction][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {direction}.{name} in {stats}"))
}

fn traffic<'a>(stats: &'a Value, spec_prefix: &str) -> &'a Value {
    stats["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["spec"].as_str().unwrap().starts_with(spec_prefix))
        .map(|r| &r["traffic"])
        .unwrap_or_else(|| panic!("no reservation {spec_prefix} in {stats}"))
}

fn forwarding_scenario(mode: &str) {
    require_root();
    let dir = TempPinDir::new();
    let topo =
        Topology::new(&format!("pf{}{mode}", std::process::id())).expect("building the topology");
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
    let attached = pf_in(
        &topo.server,
        &dir,
        &["attach", PUBLIC_IFACE, "--mode", mode],
    );
    assert!(attached.contains(&format!("{mode} mode")), "{attached}");
    let our_links: BTreeSet<u64> = pf_link_ids().difference(&links_before).copied().collect();
    assert_eq!(
        our_links.len(),
        2,
        "attach makes one XDP and one TCX link: {our_links:?}"
    );
    pf_ok(
        &dir,
        &[
            "reserve",
            &format!("{PUBLIC_IP}:8080/tcp"),
            "--to",
            &format!("{CLIENT_IP}:80"),
        ],
    );
    pf_ok(
        &dir,
        &[
            "reserve",
            &format!("{PUBLIC_IP}:5353/udp"),
            "--to",
            &format!("{CLIENT_IP}:5300"),
        ],
    );
    pf_ok(
        &dir,
        &[
            "reserve",
            &format!("{PUBLIC_IP}:8810-8812/tcp"),
            "--to",
            &format!("{CLIENT_IP}:9810"),
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
    assert_eq!(stats["attached"], serde_json::json!([PUBLIC_IFACE]));
    assert!(counter(&stats, "ingress", "rewritten") > 0, "{stats}");
    assert!(counter(&stats, "egress", "rewritten") > 0, "{stats}");
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

    // Detach: no pf program remains on the interface, and the server's traffic is unaffected.
    pf_in(&topo.server, &dir, &["detach", PUBLIC_IFACE]);
    let link = topo
        .server
        .run(&["ip", "-d", "link", "show", PUBLIC_IFACE])
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        !link.contains("xdp"),
        "an XDP program is still attached: {link}"
    );
    let left: Vec<u64> = pf_link_ids().intersection(&our_links).copied().collect();
    assert!(left.is_empty(), "links {left:?} survived detach");
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
    forwarding_scenario("native");
}

#[test]
fn forwarding_generic_xdp() {
    forwarding_scenario("skb");
}
