//! Port triggering with real traffic: the trigger program on the server's tunnel-side ingress
//! (`pf attach IFACE --trigger`), a rule armed and its open range reserved behind the rule's
//! gate through pf's library, the internet host connecting, the client triggering. Over a veth
//! tunnel (`pf_trigger`, Ethernet frames) and over WireGuard (`pf_trigger_l3`, no link layer).

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use pf::{
    domain::{
        net::Ipv4Net,
        spec::{PortRange, Protocols},
    },
    kernel::{
        state::State,
        trigger::{Opening, Openings, TriggerRule},
    },
};

use crate::kit::{
    netns::Netns,
    topology::{CLIENT_IP, INTERNET_IP, PUBLIC_IFACE, PUBLIC_IP, Topology},
    traffic::Servers,
    wireguard::{SERVER_WG, WireguardTopology},
};

use super::common::{
    TempPinDir, counter, pf, pf_in, pf_list, pf_ok, pf_stats, require_root, reservations,
};

/// The rule's open range on the public address: TCP and UDP 8080, to the client's 8080.
const OPEN_PORT: u16 = 8080;
/// Where the client's outbound UDP opens it (the internet host need not answer).
const TRIGGER_PORT: u16 = 6000;
const GATE: u16 = 1;
/// Short, so the test sees it lapse; the gate may close up to a second early
/// (`TRIGGER_REFRESH_NS`), never late.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

fn rule() -> TriggerRule {
    TriggerRule {
        gate: GATE,
        client: CLIENT_IP.parse().unwrap(),
        protocols: Protocols::Udp,
        ports: PortRange::single(TRIGGER_PORT),
        idle_timeout: IDLE_TIMEOUT,
    }
}

/// One UDP datagram from `source` (an address of the client's) to the trigger port.
fn send_trigger(client: &Netns, source: &str) {
    let source: Ipv4Addr = source.parse().unwrap();
    client
        .within(move || {
            let socket = UdpSocket::bind((source, 0))?;
            socket.send_to(
                b"trigger",
                SocketAddrV4::new(INTERNET_IP.parse().unwrap(), TRIGGER_PORT),
            )
        })
        .unwrap()
        .expect("sending the trigger datagram");
}

/// Whether the internet host reaches the client's TCP and UDP servers through the public
/// endpoint: both, or neither (anything else fails the test).
fn reachable(inet: &Netns, when: &str) -> bool {
    let tcp = inet.curl(&format!("http://{PUBLIC_IP}:{OPEN_PORT}/"));
    // A datagram answered within a second (nc would wait two more after its answer).
    let udp = udp_ping(inet);
    match (&tcp, udp) {
        (Ok(body), true) => {
            assert_eq!(
                body,
                &format!("port {OPEN_PORT} from {INTERNET_IP}"),
                "{when}"
            );
            true
        }
        (Err(_), false) => false,
        _ => panic!("{when}: TCP {tcp:?} and UDP (answered: {udp}) disagree"),
    }
}

/// The openings reported within a second (a tunnel may deliver the trigger packet later than
/// the send returns: wireguard-go encrypts and decrypts in userspace).
fn openings_within_a_second(openings: &mut Openings) -> Vec<Opening> {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut found = openings.drain();
    while found.is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        found = openings.drain();
    }
    found
}

/// One UDP round trip from the internet host to the open port, answered within a second: a
/// light keep-alive (nc waits two seconds after its last datagram).
fn udp_ping(inet: &Netns) -> bool {
    inet.within(|| {
        let socket = UdpSocket::bind(("0.0.0.0", 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        socket.send_to(b"keep", (PUBLIC_IP, OPEN_PORT))?;
        let mut buf = [0u8; 64];
        let (n, _) = socket.recv_from(&mut buf)?;
        Ok::<bool, std::io::Error>(&buf[..n] == b"pong:keep")
    })
    .unwrap()
    .unwrap_or(false)
}

fn gate_open(dir: &TempPinDir) -> bool {
    let state = State::open_for_read(&dir.dir).unwrap().expect("pf's maps");
    state.trigger_gate(GATE).unwrap().open_for.is_some()
}

fn gate_closed_count(dir: &TempPinDir) -> u64 {
    pf_stats(dir)["trigger_gate_closed"].as_u64().unwrap()
}

/// Arms the rule and reserves its open range behind its gate, with the leak guard on as
/// `pf serve` sets it.
fn arm(dir: &TempPinDir) {
    let mut state = State::open_for_write(&dir.dir).unwrap();
    state
        .set_tunnel_networks(&["10.8.0.0/24".parse::<Ipv4Net>().unwrap()])
        .unwrap();
    let open = reservations(&[(
        &format!("{PUBLIC_IP}:{OPEN_PORT}/both") as &str,
        &format!("{CLIENT_IP}:{OPEN_PORT}") as &str,
    )]);
    state
        .reserve_tagged(&open[0], pf::kernel::state::EntryTags::gated(GATE))
        .unwrap();
    state.arm_trigger(&rule()).unwrap();
}

/// The whole life of a trigger over one topology: closed until the client's trigger packet,
/// open for TCP and UDP after it, held open by traffic past its idle timeout, closed by
/// idleness (and counted), opened again by the next trigger, closed at once by disarming.
fn trigger_life(dir: &TempPinDir, inet: &Netns, client: &Netns) {
    let mut servers = Servers::new();
    servers.http(client, OPEN_PORT);
    servers.udp_echo(client, OPEN_PORT);
    arm(dir);
    let mut openings = Openings::open(&dir.dir).unwrap();

    let closed_before = gate_closed_count(dir);
    assert!(!reachable(inet, "before any trigger"));
    assert!(!gate_open(dir));
    assert!(
        gate_closed_count(dir) > closed_before,
        "the packets that met the closed gate are counted"
    );
    assert!(openings.drain().is_empty());

    let opened_at = Instant::now();
    send_trigger(client, CLIENT_IP);
    let opened = openings_within_a_second(&mut openings);
    assert_eq!(opened.len(), 1, "{opened:?}");
    let o = opened[0];
    assert_eq!((o.gate, o.protocol), (GATE, Protocols::Udp));
    assert_eq!(*o.source.ip(), CLIENT_IP.parse::<Ipv4Addr>().unwrap());
    assert_eq!(
        o.destination,
        SocketAddrV4::new(INTERNET_IP.parse().unwrap(), TRIGGER_PORT)
    );
    assert_eq!(o.previous_expires_ns, 0, "never opened before");
    assert!(gate_open(dir));
    assert!(reachable(inet, "after the trigger"));

    // Traffic alone (no further trigger) keeps it open well past its idle timeout: a
    // datagram every 300 ms or so, far inside the timeout even on an emulated CPU.
    while opened_at.elapsed() < IDLE_TIMEOUT * 2 {
        assert!(
            udp_ping(inet),
            "closed {:?} after opening despite traffic",
            opened_at.elapsed()
        );
        thread::sleep(Duration::from_millis(300));
    }
    assert!(reachable(inet, "after traffic held it open"));
    let stats = pf_stats(dir);
    assert_eq!(counter(&stats, "trigger", "opened"), 1, "{stats}");

    // Idle: closed once the timeout has passed, by the kernel alone.
    thread::sleep(IDLE_TIMEOUT + Duration::from_millis(500));
    assert!(!gate_open(dir));
    assert!(!reachable(inet, "after the idle timeout"));

    // The next trigger opens it again, and says when the last opening lapsed.
    send_trigger(client, CLIENT_IP);
    let opened = openings_within_a_second(&mut openings);
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert!(opened[0].previous_expires_ns != 0 && opened[0].previous_expires_ns < opened[0].at_ns);
    assert!(reachable(inet, "after the second trigger"));

    // Disarmed: closed at once, and a trigger opens nothing any more.
    let mut state = State::open_for_write(&dir.dir).unwrap();
    state.disarm_trigger(&rule()).unwrap();
    drop(state);
    assert!(!reachable(inet, "after disarming"));
    send_trigger(client, CLIENT_IP);
    assert!(openings_within_a_second(&mut openings).is_empty());
    assert!(!reachable(inet, "after a trigger of a disarmed rule"));
    let stats = pf_stats(dir);
    assert!(counter(&stats, "trigger", "no_trigger") >= 1, "{stats}");
}

/// Over a veth tunnel (Ethernet frames: `pf_trigger`, as a netlink filter); another client's
/// trigger packet opens nothing for this client's rule.
#[test]
fn trigger_opens_and_idleness_closes() {
    require_root();
    let dir = TempPinDir::new();
    let topo = Topology::new(&format!("pftr{}", std::process::id())).unwrap();
    // A second client on the same tunnel link.
    topo.client
        .run(&["ip", "addr", "add", "10.8.0.3/24", "dev", "eth0"])
        .unwrap();
    pf_in(&topo.server, &dir, &["attach", PUBLIC_IFACE]);
    // As a netlink filter, as on Debian 12's 6.1 (the service's test takes TCX here).
    let out = pf_in(
        &topo.server,
        &dir,
        &["attach", "tun0", "--trigger", "--tc-attach", "netlink"],
    );
    assert!(out.contains("port trigger program"), "{out}");
    let stats = pf_stats(&dir);
    assert_eq!(stats["triggers"]["tun0"]["tc"], "netlink", "{stats}");

    // Another client's packet to the trigger port is no trigger of this rule.
    arm(&dir);
    let mut openings = Openings::open(&dir.dir).unwrap();
    send_trigger(&topo.client, "10.8.0.3");
    assert!(openings_within_a_second(&mut openings).is_empty());
    assert!(!gate_open(&dir));
    assert!(!reachable(&topo.inet, "after another client's trigger"));
    let mut state = State::open_for_write(&dir.dir).unwrap();
    state.disarm_trigger(&rule()).unwrap();
    state
        .release_exact(
            &reservations(&[(
                &format!("{PUBLIC_IP}:{OPEN_PORT}/both") as &str,
                &format!("{CLIENT_IP}:{OPEN_PORT}") as &str,
            )])[0],
        )
        .unwrap();
    drop(state);

    trigger_life(&dir, &topo.inet, &topo.client);

    pf_in(&topo.server, &dir, &["detach", "tun0", "--trigger"]);
    assert!(pf_stats(&dir)["triggers"].as_object().unwrap().is_empty());
}

/// Over real WireGuard (`pf_trigger_l3`: packets without a link layer), here by wireguard-go
/// on TUN and in the VM by Debian 6.1's own module, where TC has no TCX and the program is a
/// netlink filter.
#[test]
fn trigger_over_wireguard() {
    require_root();
    let dir = TempPinDir::new();
    let topo = WireguardTopology::new(&format!("pftw{}", std::process::id()))
        .expect("building the WireGuard topology");
    pf_in(&topo.server, &dir, &["attach", PUBLIC_IFACE]);
    pf_in(&topo.server, &dir, &["attach", SERVER_WG, "--trigger"]);
    trigger_life(&dir, &topo.inet, &topo.client);
}

/// The server's config for a trigger rule made through `pf serve`: pf on pub0, the trigger
/// program on tun0, a quota of 4 ports.
fn service_config() -> String {
    format!(
        r#"
[[interfaces]]
name = "{PUBLIC_IFACE}"

[triggers]
interfaces = ["tun0"]

[policy]
public_ips = ["{PUBLIC_IP}"]
target_networks = ["10.8.0.0/16"]
port_pool = ["8000-8999", "40000-41999"]
ports_per_owner = 4
max_range_ports = 16
forbid_listening_ports = false
"#
    )
}

fn audit_actions(service: &crate::kit::serve::Service, action: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(service.audit_log())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["action"] == action)
        .collect()
}

fn gate_open_in_list(dir: &TempPinDir, id: u64) -> bool {
    pf_list(dir)
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == id && r["trigger"]["state"] == "open")
}

/// Waits (at most 5 s) for `pf list` to show reservation `id`'s trigger in `state`.
fn wait_for_state(dir: &TempPinDir, id: u64, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let list = pf_list(dir);
        let row = list
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no reservation {id} in {list}"));
        if row["trigger"]["state"] == state || Instant::now() > deadline {
            assert_eq!(row["trigger"]["state"], state, "{row}");
            return row;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A trigger rule as a product: made with `pf trigger`, held by the policy like any
/// reservation (its range counts against the quota and nobody else can take it), listed as
/// armed or open with until-when, its openings and closings audited with the packet that
/// opened it, kept across a restart of `pf serve` (an open gate stays open), refused when it
/// clashes with another rule of the same client or is malformed, and gone when released.
#[test]
fn trigger_rule_through_pf_serve() {
    require_root();
    let dir = TempPinDir::new();
    let topo = Topology::new(&format!("pfts{}", std::process::id())).unwrap();
    let mut servers = Servers::new();
    servers.http(&topo.client, OPEN_PORT);
    servers.udp_echo(&topo.client, OPEN_PORT);
    let mut service = dir.serve_with(Some(&topo.server), &service_config());
    assert!(pf_stats(&dir)["triggers"]["tun0"]["tc"].is_string());

    let out = pf_ok(
        &dir,
        &[
            "trigger",
            &format!("{PUBLIC_IP}:{OPEN_PORT}/both"),
            "--to",
            CLIENT_IP,
            "--on",
            &format!("{TRIGGER_PORT}/udp"),
            "--idle",
            "3s",
            "--owner",
            "acct-7",
            "--json",
        ],
    );
    let made: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = made["id"].as_u64().unwrap();
    assert_eq!(
        made["trigger"]["on"],
        format!("{TRIGGER_PORT}/udp"),
        "{made}"
    );
    assert_eq!(made["trigger"]["idle_timeout_ms"], 3000, "{made}");
    assert_eq!(made["trigger"]["state"], "armed", "{made}");
    assert!(!reachable(&topo.inet, "armed, before any trigger"));
    // `pf check` names the link: the rule is armed, not open.
    let checked = pf(
        &dir,
        &["check", &format!("{PUBLIC_IP}:{OPEN_PORT}/tcp"), "--json"],
    );
    let view: serde_json::Value = serde_json::from_slice(&checked.stdout).unwrap();
    assert_eq!(checked.status.code(), Some(4), "{view}");
    assert_eq!(view["because"], "trigger", "{view}");

    // The range is held: nobody else can reserve it, and it counts against the quota.
    let taken = pf(
        &dir,
        &[
            "reserve",
            &format!("{PUBLIC_IP}:{OPEN_PORT}/tcp"),
            "--to",
            "10.8.0.9",
            "--owner",
            "acct-8",
        ],
    );
    assert!(!taken.status.success());
    assert!(
        String::from_utf8_lossy(&taken.stderr).contains("overlaps"),
        "{taken:?}"
    );
    let over_quota = pf(
        &dir,
        &[
            "reserve",
            &format!("{PUBLIC_IP}:41000-41003/tcp"),
            "--to",
            CLIENT_IP,
            "--owner",
            "acct-7",
        ],
    );
    assert!(
        String::from_utf8_lossy(&over_quota.stderr).contains("policy.ports_per_owner"),
        "{over_quota:?}"
    );
    // A second rule of the same client on the same trigger port, and malformed rules, are
    // refused and change nothing.
    for (args, why) in [
        (vec!["--on", "6000/udp"], "already triggers"),
        (vec!["--on", "6000:1/udp"], "PORT[-PORT]"),
        (vec!["--on", "6000/icmp"], "unknown protocol"),
        (vec!["--on", "6000/udp", "--idle", "0s"], "1s to 24h"),
        (vec!["--on", "6000-7000/udp"], "policy.max_range_ports"),
    ] {
        let mut words = vec!["trigger", "198.51.100.1:40001/udp", "--to", CLIENT_IP];
        words.extend(args);
        let out = pf(&dir, &words);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(why),
            "{words:?}: {stderr}"
        );
    }
    assert_eq!(pf_list(&dir).as_array().unwrap().len(), 1);

    // The client's packet opens it: listed open until a time, audited with the packet.
    send_trigger(&topo.client, CLIENT_IP);
    let row = wait_for_state(&dir, id, "open");
    assert!(row["trigger"]["open_until"].is_string(), "{row}");
    assert!(reachable(&topo.inet, "after the trigger"));
    let checked = pf(
        &dir,
        &["check", &format!("{PUBLIC_IP}:{OPEN_PORT}/tcp"), "--json"],
    );
    let view: serde_json::Value = serde_json::from_slice(&checked.stdout).unwrap();
    assert_eq!(checked.status.code(), Some(0), "{view}");
    assert_eq!(view["verdict"], "open", "{view}");
    let deadline = Instant::now() + Duration::from_secs(3);
    while audit_actions(&service, "trigger-open").is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let opened = audit_actions(&service, "trigger-open");
    assert_eq!(opened.len(), 1, "{opened:?}");
    let subject = &opened[0];
    assert_eq!(subject["reservation"]["id"], id, "{subject}");
    assert_eq!(
        subject["reservation"]["by"]["destination"],
        format!("{INTERNET_IP}:{TRIGGER_PORT}"),
        "{subject}"
    );

    // A restart keeps the rule, and the opening: the gate is the kernel's.
    service.stop();
    service.spawn().unwrap();
    assert_eq!(
        wait_for_state(&dir, id, "open")["trigger"]["on"],
        "6000/udp"
    );
    assert!(reachable(&topo.inet, "after a restart of pf serve"));

    // Idle: closed by the kernel, seen and audited by the service.
    thread::sleep(IDLE_TIMEOUT + Duration::from_millis(500));
    assert!(!reachable(&topo.inet, "after the idle timeout"));
    wait_for_state(&dir, id, "armed");
    let deadline = Instant::now() + Duration::from_secs(3);
    while audit_actions(&service, "trigger-close").is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(audit_actions(&service, "trigger-close").len(), 1);

    // The tunnel interface made anew (as `wg-quick down` and `up` do) loses its programs: pf
    // serve sees the link come back and attaches the trigger program again.
    topo.server.run(&["ip", "link", "del", "tun0"]).unwrap();
    crate::kit::netns::veth(
        (&topo.server, "tun0", "10.8.0.1/24"),
        (&topo.client, "eth0", &format!("{CLIENT_IP}/24")),
    )
    .unwrap();
    topo.client
        .run(&["ip", "route", "add", "default", "via", "10.8.0.1"])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        send_trigger(&topo.client, CLIENT_IP);
        thread::sleep(Duration::from_millis(200));
        if gate_open_in_list(&dir, id) || Instant::now() > deadline {
            break;
        }
    }
    wait_for_state(&dir, id, "open");
    assert!(reachable(
        &topo.inet,
        "after the tunnel interface came back"
    ));

    // Released: the rule goes with its range; a trigger opens nothing.
    pf_ok(&dir, &["release", &id.to_string()]);
    send_trigger(&topo.client, CLIENT_IP);
    thread::sleep(Duration::from_millis(300));
    assert!(!reachable(&topo.inet, "after the release"));
    let stats = pf_stats(&dir);
    assert!(counter(&stats, "trigger", "no_trigger") >= 1, "{stats}");
    drop(service);
}
