//! NAT-PMP and PCP served by `pf serve` to tunnel clients, with real clients: Debian's
//! `natpmpc` for NAT-PMP, and for PCP (Debian has no client) a minimal one written here from
//! RFC 6887, independent of pf's own codec. Every mapping is then used by real traffic from
//! the internet host.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::Value;

use crate::kit::{
    netns::Netns,
    topology::{CLIENT_IP, GATEWAY_TUNNEL_IP, INTERNET_IP, PUBLIC_IFACE, PUBLIC_IP, Topology},
    traffic::{Servers, udp_round_trip},
};

use super::common::{TempPinDir, pf_list, pf_ok, require_root};

/// A second tunnel client, on a link of its own: `tun1` 10.8.1.1 on the server, `eth0`
/// 10.8.1.2 in a namespace of its own.
const SECOND_GATEWAY_IP: &str = "10.8.1.1";
const SECOND_CLIENT_IP: &str = "10.8.1.2";

fn second_client(topo: &Topology, prefix: &str) -> Netns {
    let ns = Netns::new(&format!("{prefix}-client2")).unwrap();
    crate::kit::netns::veth(
        (&topo.server, "tun1", &format!("{SECOND_GATEWAY_IP}/24")),
        (&ns, "eth0", &format!("{SECOND_CLIENT_IP}/24")),
    )
    .unwrap();
    ns.run(&["ip", "route", "add", "default", "via", SECOND_GATEWAY_IP])
        .unwrap();
    ns
}

/// The server's config: pf on pub0, NAT-PMP and PCP on both tunnel links, a quota of 3
/// ports per client, lifetimes from 60 s.
fn config(rate: u32) -> String {
    format!(
        r#"
[[interfaces]]
name = "{PUBLIC_IFACE}"

[port_mapping]
listen = ["{GATEWAY_TUNNEL_IP}", "{SECOND_GATEWAY_IP}"]
min_lifetime = "60s"
requests_per_second = {rate}
upnp_port = 5000

[policy]
public_ips = ["{PUBLIC_IP}"]
target_networks = ["10.8.0.0/16"]
port_pool = ["40000-40999"]
forbidden_ports = [22]
ports_per_owner = 3
forbid_listening_ports = false
"#
    )
}

/// `natpmpc -g GATEWAY ARGS...` in `ns`: (success, output).
fn natpmpc(ns: &Netns, gateway: &str, args: &[&str]) -> (bool, String) {
    let mut words = vec!["timeout", "20", "natpmpc", "-g", gateway];
    words.extend_from_slice(args);
    let out = ns.cmd(&words).output().expect("running natpmpc");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && !text.contains("FAILED"), text)
}

/// The public port natpmpc reports mapped ("Mapped public port N protocol ...").
fn mapped_port(output: &str) -> u16 {
    output
        .split("Mapped public port ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("natpmpc mapped nothing:\n{output}"))
}

fn status(dir: &TempPinDir) -> Value {
    serde_json::from_str(&pf_ok(dir, &["status", "--json"])).unwrap()
}

fn fetch(inet: &Netns, port: u16) -> Result<String, String> {
    inet.curl(&format!("http://{PUBLIC_IP}:{port}/"))
}

#[test]
fn natpmpc_maps_keeps_the_port_across_renewals_and_restarts_and_deletes() {
    require_root();
    let prefix = format!("pf{}np", std::process::id());
    let dir = TempPinDir::new();
    let topo = Topology::new(&prefix).unwrap();
    let client2 = second_client(&topo, &prefix);
    let mut service = dir.serve_with(Some(&topo.server), &config(20));

    // The public address.
    let (ok, out) = natpmpc(&topo.client, GATEWAY_TUNNEL_IP, &[]);
    assert!(
        ok && out.contains(&format!("Public IP address : {PUBLIC_IP}")),
        "{out}"
    );

    // ProtonVPN's loop: `natpmpc -a 1 0 udp 60` and tcp, one port for both.
    let (ok, udp) = natpmpc(
        &topo.client,
        GATEWAY_TUNNEL_IP,
        &["-a", "1", "0", "udp", "60"],
    );
    assert!(ok, "{udp}");
    let port = mapped_port(&udp);
    assert!((40000..=40999).contains(&port), "{udp}");
    let (ok, tcp) = natpmpc(
        &topo.client,
        GATEWAY_TUNNEL_IP,
        &["-a", "1", "0", "tcp", "60"],
    );
    assert!(ok, "{tcp}");
    assert_eq!(mapped_port(&tcp), port, "TCP gets the UDP mapping's port");
    assert!(tcp.contains("liftime 60"), "{tcp}");

    // Traffic from the internet host reaches the client's listeners on that port.
    let mut servers = Servers::new();
    servers.http(&topo.client, port);
    servers.udp_echo(&topo.client, port);
    let page = fetch(&topo.inet, port).expect("TCP through the mapping");
    assert!(page.contains(&format!("from {INTERNET_IP}")), "{page}");
    assert_eq!(udp_round_trip(&topo.inet, PUBLIC_IP, port, "hi"), "pong:hi");

    // Renewals keep the port, and so does a restart of pf serve.
    for _ in 0..3 {
        let (ok, again) = natpmpc(
            &topo.client,
            GATEWAY_TUNNEL_IP,
            &["-a", "1", "0", "udp", "60"],
        );
        assert!(ok, "{again}");
        assert_eq!(mapped_port(&again), port);
    }
    // The epoch natpmpc prints ("epoch = N") runs on across the restart: the mapping state
    // was kept, so clients must not think the gateway lost it.
    let epoch = |out: &str| -> u32 {
        out.split("epoch = ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no epoch in:\n{out}"))
    };
    std::thread::sleep(Duration::from_millis(1100));
    let before = epoch(&natpmpc(&topo.client, GATEWAY_TUNNEL_IP, &[]).1);
    assert!(before >= 1, "{before}");
    service.stop();
    service.spawn().unwrap();
    let (ok, after) = natpmpc(
        &topo.client,
        GATEWAY_TUNNEL_IP,
        &["-a", "1", "0", "tcp", "60"],
    );
    assert!(ok, "{after}");
    assert_eq!(mapped_port(&after), port, "the port survives a restart");
    assert!(epoch(&after) >= before, "the epoch went back: {after}");
    let mappings = pf_list(&dir);
    assert_eq!(mappings.as_array().unwrap().len(), 2, "{mappings}");
    assert_eq!(mappings[0]["owner"], format!("tunnel:{CLIENT_IP}"));

    // A second client asking for the first one's port gets another, and deleting its own
    // mappings (all UDP, all TCP) leaves the first one's forwarding.
    let p = port.to_string();
    let (ok, other) = natpmpc(&client2, SECOND_GATEWAY_IP, &["-a", &p, &p, "tcp", "60"]);
    assert!(ok, "{other}");
    assert_ne!(mapped_port(&other), port);
    for proto in ["udp", "tcp"] {
        let (ok, out) = natpmpc(&client2, SECOND_GATEWAY_IP, &["-a", "0", "0", proto, "0"]);
        assert!(ok, "{out}");
    }
    assert!(
        fetch(&topo.inet, port).is_ok(),
        "the first client's mapping stays"
    );
    assert_eq!(pf_list(&dir).as_array().unwrap().len(), 2);

    // The quota: 3 ports for this client; the third mapping is made, the fourth refused.
    let (ok, third) = natpmpc(
        &topo.client,
        GATEWAY_TUNNEL_IP,
        &["-a", "0", "7000", "tcp", "60"],
    );
    assert!(ok, "{third}");
    // 7000 is outside the pool: a port from the pool instead.
    assert!((40000..=40999).contains(&mapped_port(&third)), "{third}");
    let (ok, fourth) = natpmpc(
        &topo.client,
        GATEWAY_TUNNEL_IP,
        &["-a", "0", "7001", "tcp", "60"],
    );
    assert!(
        !ok && fourth.contains("out of resources"),
        "the quota must refuse a fourth port:\n{fourth}"
    );

    // Lifetime 0 removes the UDP mapping (internal port 0: all of the client's UDP ones),
    // and UDP forwarding stops while TCP goes on.
    let (ok, out) = natpmpc(
        &topo.client,
        GATEWAY_TUNNEL_IP,
        &["-a", "0", "0", "udp", "0"],
    );
    assert!(ok, "{out}");
    assert_eq!(udp_round_trip(&topo.inet, PUBLIC_IP, port, "hi"), "");
    assert!(fetch(&topo.inet, port).is_ok());

    // Every answer and refusal was counted.
    let status = status(&dir);
    let counts = &status["service"]["port_mapping"];
    assert!(
        counts["answered"]["natpmp"]["success"].as_u64().unwrap() >= 10,
        "{counts}"
    );
    assert_eq!(
        counts["answered"]["natpmp"]["out_of_resources"], 1,
        "{counts}"
    );
    let human = pf_ok(&dir, &["status"]);
    assert!(human.contains("port mapping: answered natpmp: "), "{human}");
    let audit = std::fs::read_to_string(service.audit_log()).unwrap();
    assert!(audit.contains("\"action\":\"map\"") && audit.contains("\"action\":\"unmap\""));
    drop(servers);
}

/// A PCP client written from RFC 6887 for these tests, apart from pf's codec: requests laid
/// out byte by byte, answers read by offset.
struct PcpClient {
    socket: UdpSocket,
    gateway: (Ipv4Addr, u16),
}

/// A PCP answer's fields (RFC 6887 sections 7.2 and 11.2).
#[derive(Debug)]
struct PcpAnswer {
    bytes: Vec<u8>,
}

impl PcpAnswer {
    fn version(&self) -> u8 {
        self.bytes[0]
    }
    fn opcode(&self) -> u8 {
        self.bytes[1]
    }
    fn result(&self) -> u8 {
        self.bytes[3]
    }
    fn lifetime(&self) -> u32 {
        u32::from_be_bytes(self.bytes[4..8].try_into().unwrap())
    }
    fn nonce(&self) -> &[u8] {
        &self.bytes[24..36]
    }
    fn external_port(&self) -> u16 {
        u16::from_be_bytes([self.bytes[42], self.bytes[43]])
    }
    fn external_addr(&self) -> Ipv4Addr {
        let a = &self.bytes[44..60];
        assert_eq!(&a[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        Ipv4Addr::new(a[12], a[13], a[14], a[15])
    }
}

const PCP_MAP: u8 = 1;
const PCP_ANNOUNCE: u8 = 0;
/// Result codes, RFC 6887 section 7.4.
const SUCCESS: u8 = 0;
const UNSUPP_VERSION: u8 = 1;
const NOT_AUTHORIZED: u8 = 2;
const MALFORMED_REQUEST: u8 = 3;
const UNSUPP_OPCODE: u8 = 4;
const NO_RESOURCES: u8 = 8;
const CANNOT_PROVIDE_EXTERNAL: u8 = 11;
const ADDRESS_MISMATCH: u8 = 12;

fn mapped(addr: Ipv4Addr) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12..].copy_from_slice(&addr.octets());
    a
}

/// A request header: version 2, opcode, lifetime, the client's address (IPv4-mapped).
fn pcp_header(opcode: u8, lifetime: u32, client: Ipv4Addr) -> Vec<u8> {
    let mut d = vec![2, opcode, 0, 0];
    d.extend_from_slice(&lifetime.to_be_bytes());
    d.extend_from_slice(&mapped(client));
    d
}

/// A MAP request: nonce, protocol, internal port, suggested external port (and address
/// 0.0.0.0), options.
fn pcp_map(
    client: Ipv4Addr,
    lifetime: u32,
    nonce: [u8; 12],
    protocol: u8,
    internal: u16,
    suggested: u16,
    options: &[u8],
) -> Vec<u8> {
    let mut d = pcp_header(PCP_MAP, lifetime, client);
    d.extend_from_slice(&nonce);
    d.extend_from_slice(&[protocol, 0, 0, 0]);
    d.extend_from_slice(&internal.to_be_bytes());
    d.extend_from_slice(&suggested.to_be_bytes());
    d.extend_from_slice(&mapped(Ipv4Addr::UNSPECIFIED));
    d.extend_from_slice(options);
    d
}

impl PcpClient {
    fn new(ns: &Netns, local: &str, gateway: &str) -> Self {
        let local: Ipv4Addr = local.parse().unwrap();
        let socket = ns
            .within(move || UdpSocket::bind((local, 0)))
            .unwrap()
            .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        Self {
            socket,
            gateway: (gateway.parse().unwrap(), 5351),
        }
    }

    fn send(&self, d: &[u8]) {
        self.socket.send_to(d, self.gateway).unwrap();
    }

    /// The next answer, if one comes within the read timeout.
    fn recv(&self) -> Option<PcpAnswer> {
        let mut buf = [0u8; 1200];
        match self.socket.recv_from(&mut buf) {
            Ok((n, _)) => Some(PcpAnswer {
                bytes: buf[..n].to_vec(),
            }),
            Err(_) => None,
        }
    }

    fn ask(&self, d: &[u8]) -> PcpAnswer {
        self.send(d);
        self.recv().expect("pf serve answers")
    }
}

/// What pf must answer a datagram the fuzz makes, worked out from RFC 6886 and 6887 here:
/// `None` is silence, `Some((version, opcode byte, result))` an answer.
fn expected(d: &[u8], client: Ipv4Addr) -> Option<(u8, u8, u16)> {
    if d.first() == Some(&0) {
        // NAT-PMP: the fuzz makes no valid request of it.
        if d.len() < 2 || d[1] >= 128 || (matches!(d[1], 1 | 2) && d.len() < 12) {
            return None;
        }
        assert!(
            !matches!(d[1], 0..=2),
            "the fuzz makes no valid NAT-PMP request"
        );
        return Some((0, d[1] + 128, 5));
    }
    if d.len() < 2 || d[1] & 0x80 != 0 {
        return None;
    }
    let answer = |result: u8| Some((2, d[1] | 0x80, u16::from(result)));
    if d[0] != 2 {
        return answer(UNSUPP_VERSION);
    }
    if d.len() < 24 || d.len() > 1100 || !d.len().is_multiple_of(4) {
        return answer(MALFORMED_REQUEST);
    }
    match d[1] {
        PCP_MAP if d.len() < 60 => answer(MALFORMED_REQUEST),
        PCP_ANNOUNCE if d.len() == 24 && d[8..24] != mapped(client) => answer(ADDRESS_MISMATCH),
        PCP_MAP | PCP_ANNOUNCE => panic!("the fuzz makes no valid PCP request"),
        _ => answer(UNSUPP_OPCODE),
    }
}

/// A datagram none of whose outcomes is a mapping: random bytes, or a valid request broken
/// in one of the ways the RFCs name (version, opcode, length, a response's bit, the client's
/// address).
fn fuzz_datagram(rng: &mut StdRng, client: Ipv4Addr) -> Vec<u8> {
    let valid_map = pcp_map(client, 120, rng.random(), 17, 41000, 0, &[]);
    let mut d = match rng.random_range(0..7) {
        // Random bytes of any length, any version byte but PCP's.
        0 => {
            let len = rng.random_range(0..1200);
            let mut d: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if let Some(v) = d.first_mut() {
                *v = [1, 3, 255, rng.random_range(3..=255)][rng.random_range(0..4)];
            }
            d
        }
        // NAT-PMP: an unknown opcode, a mapping cut short, a response.
        1 => {
            let mut d = vec![0, rng.random_range(3..128)];
            d.extend((0..rng.random_range(0..20)).map(|_| rng.random::<u8>()));
            d
        }
        2 => {
            let mut d = vec![0, rng.random_range(1..=2)];
            d.extend((0..rng.random_range(0..10)).map(|_| rng.random::<u8>()));
            d
        }
        // PCP MAP cut to any length under its 60 bytes, or past 60 by a non-multiple of 4.
        3 => {
            let mut d = valid_map.clone();
            d.truncate(rng.random_range(0..60));
            d
        }
        4 => {
            let mut d = valid_map.clone();
            d.extend((0..rng.random_range(1..4)).map(|_| rng.random::<u8>()));
            d
        }
        // PCP with an opcode pf does not serve, a response's bit, or another version.
        5 => {
            let mut d = valid_map.clone();
            match rng.random_range(0..3) {
                0 => d[1] = rng.random_range(2..128),
                1 => d[1] |= 0x80,
                _ => d[0] = [1, 3, 4, 255][rng.random_range(0..4)],
            }
            d
        }
        // ANNOUNCE naming another client.
        _ => pcp_header(
            PCP_ANNOUNCE,
            0,
            Ipv4Addr::new(10, 8, rng.random(), rng.random()),
        ),
    };
    if d.len() == 24 && d[1] == PCP_ANNOUNCE && d[8..24] == mapped(client) {
        d[23] ^= 1; // still another client
    }
    d
}

#[test]
fn pcp_maps_by_nonce_answers_the_rfc_s_errors_and_survives_fuzzing() {
    require_root();
    let prefix = format!("pf{}pc", std::process::id());
    let dir = TempPinDir::new();
    let topo = Topology::new(&prefix).unwrap();
    let client2 = second_client(&topo, &prefix);
    let _service = dir.serve_with(Some(&topo.server), &config(50));
    let client: Ipv4Addr = CLIENT_IP.parse().unwrap();
    let pcp = PcpClient::new(&topo.client, CLIENT_IP, GATEWAY_TUNNEL_IP);

    let announce = pcp.ask(&pcp_header(PCP_ANNOUNCE, 0, client));
    assert_eq!(
        (announce.version(), announce.opcode(), announce.result()),
        (2, 0x80, SUCCESS)
    );

    // MAP UDP 40500: external = internal when free, on the public IP, clamped lifetime.
    let nonce = [0x42; 12];
    let map = pcp.ask(&pcp_map(client, 3600, nonce, 17, 40500, 0, &[]));
    assert_eq!((map.opcode(), map.result()), (0x81, SUCCESS), "{map:?}");
    assert_eq!(map.nonce(), &nonce);
    assert_eq!(map.external_port(), 40500);
    assert_eq!(map.external_addr(), PUBLIC_IP.parse::<Ipv4Addr>().unwrap());
    assert_eq!(map.lifetime(), 3600);
    let mut servers = Servers::new();
    servers.udp_echo(&topo.client, 40500);
    assert_eq!(
        udp_round_trip(&topo.inet, PUBLIC_IP, 40500, "hi"),
        "pong:hi"
    );

    // Renewal with its nonce keeps it; another nonce may neither renew nor delete it.
    let renewed = pcp.ask(&pcp_map(client, 7200, nonce, 17, 40500, 0, &[]));
    assert_eq!(
        (renewed.result(), renewed.external_port()),
        (SUCCESS, 40500)
    );
    for lifetime in [3600, 0] {
        let other = pcp.ask(&pcp_map(client, lifetime, [7; 12], 17, 40500, 0, &[]));
        assert_eq!(other.result(), NOT_AUTHORIZED);
        assert_eq!(other.lifetime(), 1800, "a long-lifetime error");
    }
    // PREFER_FAILURE with a taken suggestion; errors that may clear have short lifetimes.
    let taken = pcp.ask(&pcp_map(
        client,
        3600,
        [8; 12],
        17,
        40600,
        40500,
        &[2, 0, 0, 0],
    ));
    assert_eq!(taken.result(), CANNOT_PROVIDE_EXTERNAL);
    // The client's address field must be the packet's source.
    let other_client = Ipv4Addr::new(10, 8, 0, 9);
    let mismatch = pcp.ask(&pcp_map(other_client, 3600, [9; 12], 17, 40700, 0, &[]));
    assert_eq!(mismatch.result(), ADDRESS_MISMATCH);
    // Bad length, unknown opcode, another version.
    let mut odd = pcp_map(client, 60, [1; 12], 17, 40701, 0, &[]);
    odd.push(0);
    assert_eq!(pcp.ask(&odd).result(), MALFORMED_REQUEST);
    let mut peer = pcp_map(client, 60, [1; 12], 17, 40701, 0, &[]);
    peer[1] = 5;
    let unknown = pcp.ask(&peer);
    assert_eq!((unknown.opcode(), unknown.result()), (0x85, UNSUPP_OPCODE));
    let mut v1 = pcp_map(client, 60, [1; 12], 17, 40701, 0, &[]);
    v1[0] = 1;
    let version = pcp.ask(&v1);
    assert_eq!((version.version(), version.result()), (2, UNSUPP_VERSION));
    assert_eq!(
        pf_list(&dir).as_array().unwrap().len(),
        1,
        "no error made a mapping"
    );

    // Delete with its nonce: forwarding stops.
    let deleted = pcp.ask(&pcp_map(client, 0, nonce, 17, 40500, 0, &[]));
    assert_eq!((deleted.result(), deleted.lifetime()), (SUCCESS, 0));
    assert_eq!(udp_round_trip(&topo.inet, PUBLIC_IP, 40500, "hi"), "");
    assert_eq!(pf_list(&dir).as_array().unwrap().len(), 0);

    // Nobody outside the tunnel networks is answered, on a tunnel-side address (routed to
    // it) or the public one (nothing listens there).
    topo.inet
        .run(&["ip", "route", "add", "10.8.0.0/16", "via", PUBLIC_IP])
        .unwrap();
    let inet_ip: Ipv4Addr = INTERNET_IP.parse().unwrap();
    for gateway in [GATEWAY_TUNNEL_IP, PUBLIC_IP] {
        let outsider = PcpClient::new(&topo.inet, INTERNET_IP, gateway);
        outsider.send(&pcp_header(PCP_ANNOUNCE, 0, inet_ip));
        assert!(
            outsider.recv().is_none(),
            "{gateway} answered the internet host"
        );
    }

    // A neighbour on the public side forging a tunnel client's address (the server's reverse
    // path filter off, as the attack needs) maps nothing: the datagram did not come from the
    // tunnel side.
    for key in ["all", "pub0"] {
        topo.server
            .run(&["sysctl", "-qw", &format!("net.ipv4.conf.{key}.rp_filter=0")])
            .unwrap();
    }
    topo.inet
        .run(&["ip", "addr", "add", "10.8.0.5/32", "dev", "inet0"])
        .unwrap();
    let forger = topo
        .inet
        .within(|| UdpSocket::bind(("10.8.0.5", 0)))
        .unwrap()
        .unwrap();
    // NAT-PMP: map TCP 22 of 10.8.0.5 for an hour.
    let forged = [0u8, 2, 0, 0, 0, 22, 0, 22, 0, 0, 0x0e, 0x10];
    forger.send_to(&forged, (GATEWAY_TUNNEL_IP, 5351)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        pf_list(&dir).as_array().unwrap().len(),
        0,
        "a forged request mapped"
    );
    let counts = status(&dir)["service"]["port_mapping"].clone();
    assert_eq!(counts["dropped"]["not_from_the_tunnel_side"], 1, "{counts}");

    // Generated and mutated datagrams: each gets exactly the answer (or the silence) the
    // RFCs give it, no mapping is made, and pf serve goes on answering.
    let mut rng = StdRng::seed_from_u64(0x6887);
    pcp.socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (mut answered, mut silent) = (0u64, 0u64);
    for i in 0..3000 {
        let d = fuzz_datagram(&mut rng, client);
        let want = expected(&d, client);
        pcp.send(&d);
        if let Some((version, opcode, result)) = want {
            let got = pcp
                .recv()
                .unwrap_or_else(|| panic!("no answer to #{i} {d:02x?}"));
            let result_got = if version == 0 {
                u16::from_be_bytes([got.bytes[2], got.bytes[3]])
            } else {
                u16::from(got.result())
            };
            assert_eq!(
                (got.version(), got.opcode(), result_got),
                (version, opcode, result),
                "datagram #{i} {d:02x?}"
            );
            answered += 1;
        } else {
            silent += 1;
        }
    }
    // Every datagram took a token of the client's rate: wait for the bucket to refill.
    std::thread::sleep(Duration::from_millis(2500));
    let last = pcp.ask(&pcp_header(PCP_ANNOUNCE, 0, client));
    assert_eq!(
        (last.opcode(), last.result()),
        (0x80, SUCCESS),
        "no stray answers"
    );
    assert_eq!(
        pf_list(&dir).as_array().unwrap().len(),
        0,
        "the fuzz made no mapping"
    );
    let counts = status(&dir)["service"]["port_mapping"].clone();
    assert!(
        answered > 1000 && silent > 300,
        "{answered} answered, {silent} silent"
    );
    assert_eq!(counts["dropped"]["malformed"], silent, "{counts}");
    assert_eq!(counts["dropped"]["outside_target_networks"], 1, "{counts}");

    // A client looping too fast is answered NO_RESOURCES; another is not slowed.
    pcp.socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let results: Vec<u8> = (0..300)
        .filter_map(|_| {
            pcp.send(&pcp_header(PCP_ANNOUNCE, 0, client));
            pcp.recv().map(|a| a.result())
        })
        .collect();
    assert!(results.contains(&NO_RESOURCES), "{results:?}");
    let limited = results.iter().filter(|r| **r == NO_RESOURCES).count();
    let counts = status(&dir)["service"]["port_mapping"].clone();
    assert_eq!(counts["rate_limited"]["pcp"], limited, "{counts}");
    let other = PcpClient::new(&client2, SECOND_CLIENT_IP, SECOND_GATEWAY_IP);
    let fine = other.ask(&pcp_header(
        PCP_ANNOUNCE,
        0,
        SECOND_CLIENT_IP.parse().unwrap(),
    ));
    assert_eq!(fine.result(), SUCCESS);
    drop(servers);
}

/// `upnpc -u URL ARGS...` in `ns`: (success, output).
fn upnpc(ns: &Netns, gateway: &str, args: &[&str]) -> (bool, String) {
    let url = format!("http://{gateway}:5000/rootDesc.xml");
    let mut words = vec!["timeout", "20", "upnpc", "-u", &url];
    words.extend_from_slice(args);
    let out = ns.cmd(&words).output().expect("running upnpc");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn upnpc_adds_lists_and_deletes_mappings_that_forward() {
    require_root();
    let prefix = format!("pf{}up", std::process::id());
    let dir = TempPinDir::new();
    let topo = Topology::new(&prefix).unwrap();
    let client2 = second_client(&topo, &prefix);
    let _service = dir.serve_with(Some(&topo.server), &config(20));

    // The external address, from the root description the URL names (no SSDP).
    let (ok, out) = upnpc(&topo.client, GATEWAY_TUNNEL_IP, &["-s"]);
    assert!(
        ok && out.contains(&format!("ExternalIPAddress = {PUBLIC_IP}")),
        "{out}"
    );
    // And by discovery: upnpc's M-SEARCH to 239.255.255.250:1900 crosses the veth (which
    // carries multicast) and is answered with the root description's URL. (-i: miniupnpc
    // calls an IGD whose external address is in a documentation range, as the test's is,
    // "not connected"; a real server's public IP is not.)
    let out = topo
        .client
        .cmd(&["timeout", "20", "upnpc", "-i", "-m", "eth0", "-s"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains(&format!(
            "desc: http://{GATEWAY_TUNNEL_IP}:5000/rootDesc.xml"
        )) && out.contains(&format!("ExternalIPAddress = {PUBLIC_IP}")),
        "{out}"
    );

    // Add: the exact external port, towards the client's own address; then traffic.
    let (ok, out) = upnpc(
        &topo.client,
        GATEWAY_TUNNEL_IP,
        &[
            "-e",
            "my web server",
            "-a",
            CLIENT_IP,
            "8080",
            "40080",
            "TCP",
            "3600",
        ],
    );
    assert!(
        ok && out.contains(&format!(
            "external {PUBLIC_IP}:40080 TCP is redirected to internal {CLIENT_IP}:8080"
        )),
        "{out}"
    );
    let mut servers = Servers::new();
    servers.http(&topo.client, 8080);
    let page = fetch(&topo.inet, 40080).expect("TCP through the UPnP mapping");
    assert!(page.contains("port 8080"), "{page}");

    // List: the entry, with its description.
    let (ok, list) = upnpc(&topo.client, GATEWAY_TUNNEL_IP, &["-l"]);
    assert!(
        ok && list.contains("40080->10.8.0.2:8080") && list.contains("my web server"),
        "{list}"
    );

    // Another client can neither take that port, nor map to someone else's address, nor
    // see or delete the first client's entry.
    let (_, taken) = upnpc(
        &client2,
        SECOND_GATEWAY_IP,
        &["-a", SECOND_CLIENT_IP, "8080", "40080", "TCP"],
    );
    assert!(taken.contains("718"), "{taken}");
    let (_, other) = upnpc(
        &client2,
        SECOND_GATEWAY_IP,
        &["-a", CLIENT_IP, "9090", "40090", "TCP"],
    );
    assert!(other.contains("606"), "{other}");
    let (_, list2) = upnpc(&client2, SECOND_GATEWAY_IP, &["-l"]);
    assert!(!list2.contains("40080"), "{list2}");
    let (_, deleted) = upnpc(&client2, SECOND_GATEWAY_IP, &["-d", "40080", "TCP"]);
    assert!(deleted.contains("714"), "{deleted}");
    assert!(fetch(&topo.inet, 40080).is_ok());

    // AddAnyPortMapping (IGD 2's, `upnpc -n`): the suggestion is taken, so another port.
    let (ok, any) = upnpc(
        &topo.client,
        GATEWAY_TUNNEL_IP,
        &["-n", CLIENT_IP, "9000", "40080", "TCP", "600"],
    );
    assert!(
        ok && any.contains(&format!("TCP is redirected to internal {CLIENT_IP}:9000")),
        "{any}"
    );
    let reserved: u16 = any
        .split(&format!("external {PUBLIC_IP}:"))
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{any}"));
    assert!(
        (40000..=40999).contains(&reserved) && reserved != 40080,
        "{any}"
    );

    // Delete: forwarding stops, and the store has nothing left.
    let (ok, out) = upnpc(&topo.client, GATEWAY_TUNNEL_IP, &["-d", "40080", "TCP"]);
    assert!(ok && out.contains("returned : 0"), "{out}");
    let (ok, out) = upnpc(
        &topo.client,
        GATEWAY_TUNNEL_IP,
        &["-d", &reserved.to_string(), "TCP"],
    );
    assert!(ok && out.contains("returned : 0"), "{out}");
    assert!(fetch(&topo.inet, 40080).is_err());
    assert_eq!(pf_list(&dir).as_array().unwrap().len(), 0);
    let counts = status(&dir)["service"]["port_mapping"].clone();
    assert!(
        counts["answered"]["upnp"]["success"].as_u64().unwrap() >= 5,
        "{counts}"
    );
    drop(servers);
}

#[test]
fn the_provider_names_a_tunnel_address_s_owner_and_a_new_owner_inherits_no_mapping() {
    require_root();
    let prefix = format!("pf{}to", std::process::id());
    let dir = TempPinDir::new();
    let topo = Topology::new(&prefix).unwrap();
    let _service = dir.serve_with(Some(&topo.server), &config(20));
    let map = |args: &[&str]| {
        let (ok, out) = natpmpc(&topo.client, GATEWAY_TUNNEL_IP, args);
        assert!(ok, "{out}");
        mapped_port(&out)
    };

    // The account system names the address's owner: the mapping is that owner's.
    let set = pf_ok(
        &dir,
        &["tunnel-owner", "set", CLIENT_IP, "acct-42", "--json"],
    );
    let set: Value = serde_json::from_str(&set).unwrap();
    assert_eq!(
        (
            set["owner"].as_str(),
            set["released"].as_array().map(Vec::len)
        ),
        (Some("acct-42"), Some(0))
    );
    let port = map(&["-a", "0", "40400", "tcp", "600"]);
    assert_eq!(pf_list(&dir)[0]["owner"], "acct-42");
    let listed: Value =
        serde_json::from_str(&pf_ok(&dir, &["tunnel-owner", "list", "--json"])).unwrap();
    assert_eq!(
        listed,
        serde_json::json!([{ "address": CLIENT_IP, "owner": "acct-42" }])
    );

    // The address goes to another customer: the old one's mapping is released, not handed
    // over, and forwarding stops.
    let mut servers = Servers::new();
    servers.http(&topo.client, 40400);
    assert!(fetch(&topo.inet, port).is_ok());
    let moved: Value = serde_json::from_str(&pf_ok(
        &dir,
        &["tunnel-owner", "set", CLIENT_IP, "acct-7", "--json"],
    ))
    .unwrap();
    assert_eq!(moved["released"].as_array().unwrap().len(), 1, "{moved}");
    assert!(fetch(&topo.inet, port).is_err());
    assert_eq!(pf_list(&dir).as_array().unwrap().len(), 0);

    // Unset: the config decides again (no owners there: tunnel:ADDRESS).
    let unset = pf_ok(&dir, &["tunnel-owner", "unset", CLIENT_IP]);
    assert!(
        unset.contains(&format!("belong to tunnel:{CLIENT_IP}")),
        "{unset}"
    );
    // An address outside the tunnel networks, or not an address, is refused.
    let out = crate::integration::common::pf(&dir, &["tunnel-owner", "set", "192.0.2.1", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside the tunnel networks"));
    drop(servers);
}

/// ProtonVPN's product on a real WireGuard server: the client loops `natpmpc -a 1 0 udp 60`
/// and `tcp` to the gateway's tunnel address through the tunnel, and the internet host reaches
/// its listeners on the port it got; UPnP works the same way over the tunnel.
#[test]
fn natpmpc_and_upnpc_over_wireguard() {
    require_root();
    let prefix = format!("pf{}pw", std::process::id());
    let dir = TempPinDir::new();
    let topo = crate::kit::wireguard::WireguardTopology::new(&prefix)
        .expect("building the WireGuard topology");
    let config = config(20).replace(&format!(", \"{SECOND_GATEWAY_IP}\""), "");
    let _service = dir.serve_with(Some(&topo.server), &config);

    let mut ports = Vec::new();
    for round in 0..2 {
        for proto in ["udp", "tcp"] {
            let (ok, out) = natpmpc(
                &topo.client,
                GATEWAY_TUNNEL_IP,
                &["-a", "1", "0", proto, "60"],
            );
            assert!(ok, "round {round} {proto}: {out}");
            ports.push(mapped_port(&out));
        }
    }
    let port = ports[0];
    assert!(
        ports.iter().all(|p| *p == port),
        "one port for both, every round: {ports:?}"
    );
    let mut servers = Servers::new();
    servers.http(&topo.client, port);
    servers.udp_echo(&topo.client, port);
    let page = fetch(&topo.inet, port).expect("TCP through the mapping and the tunnel");
    assert!(page.contains(&format!("from {INTERNET_IP}")), "{page}");
    assert_eq!(udp_round_trip(&topo.inet, PUBLIC_IP, port, "wg"), "pong:wg");

    let (ok, out) = upnpc(
        &topo.client,
        GATEWAY_TUNNEL_IP,
        &["-a", CLIENT_IP, "8080", "40080", "TCP", "600"],
    );
    assert!(ok && out.contains("is redirected to internal"), "{out}");
    servers.http(&topo.client, 8080);
    assert!(fetch(&topo.inet, 40080).unwrap().contains("port 8080"));
    drop(servers);
}

/// A SOAP request as miniupnpc writes it, to `pf serve`'s UPnP port: (HTTP status, body).
fn soap(ns: &Netns, action_header: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut request = format!(
        "POST /ctl/IPConn HTTP/1.1\r\nHost: {GATEWAY_TUNNEL_IP}:5000\r\nConnection: close\r\nContent-Type: text/xml; charset=\"utf-8\"\r\nSOAPAction: \"{action_header}\"\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let mut stream = ns
        .within(|| std::net::TcpStream::connect((GATEWAY_TUNNEL_IP, 5000)))
        .unwrap()
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(&request).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

const IGD: &str = "urn:schemas-upnp-org:service:WANIPConnection:1";

fn add_port_mapping_body(client: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Body><u:AddPortMapping xmlns:u=\"{IGD}\"><NewRemoteHost></NewRemoteHost><NewExternalPort>40500</NewExternalPort><NewProtocol>TCP</NewProtocol><NewInternalPort>8080</NewInternalPort><NewInternalClient>{client}</NewInternalClient><NewEnabled>1</NewEnabled><NewPortMappingDescription>fuzz</NewPortMappingDescription><NewLeaseDuration>3600</NewLeaseDuration></u:AddPortMapping></s:Body></s:Envelope>\r\n"
    )
}

/// UPnP's SOAP and SSDP given generated and mutated input over their sockets: each SOAP
/// request gets the fault UPnP gives it (401 for an action pf does not know, 402 for bad
/// arguments), each broken search silence, nothing is mapped, and both go on serving.
#[test]
fn upnp_and_ssdp_answer_generated_and_mutated_input_as_upnp_says() {
    require_root();
    let prefix = format!("pf{}uf", std::process::id());
    let dir = TempPinDir::new();
    let topo = Topology::new(&prefix).unwrap();
    let _client2 = second_client(&topo, &prefix);
    let _service = dir.serve_with(Some(&topo.server), &config(100_000));
    let mut rng = StdRng::seed_from_u64(0x1900);
    let valid = add_port_mapping_body(CLIENT_IP);
    let lease_close = valid.find("</NewLeaseDuration>").unwrap();
    let required = [
        "NewExternalPort",
        "NewProtocol",
        "NewInternalPort",
        "NewInternalClient",
        "NewLeaseDuration",
    ];
    let fault_code = |answer: &str| -> Option<u16> {
        answer
            .split("<errorCode>")
            .nth(1)?
            .split('<')
            .next()?
            .parse()
            .ok()
    };
    for i in 0..400 {
        let (header, body, want): (String, Vec<u8>, u16) = match rng.random_range(0..6) {
            0 => (
                format!(
                    "urn:schemas-upnp-org:service:Other:{}#AddPortMapping",
                    rng.random::<u8>()
                ),
                valid.clone().into_bytes(),
                401,
            ),
            1 => (
                format!(
                    "{IGD}#{}",
                    ["Reboot", "SetConnectionType", "ForceTermination", "x"]
                        [rng.random_range(0..4)]
                ),
                valid.clone().into_bytes(),
                401,
            ),
            2 => {
                let name = required[rng.random_range(0..required.len())];
                let open = valid.find(&format!("<{name}>")).unwrap();
                let close = valid.find(&format!("</{name}>")).unwrap() + name.len() + 3;
                let mut body = valid.clone();
                body.replace_range(open..close, "");
                (format!("{IGD}#AddPortMapping"), body.into_bytes(), 402)
            }
            3 => {
                let bad = ["65536", "-1", "x", "", "8080x"][rng.random_range(0..5)];
                (
                    format!("{IGD}#AddPortMapping"),
                    valid.replace(">40500<", &format!(">{bad}<")).into_bytes(),
                    402,
                )
            }
            4 => {
                let mut body = valid.clone().into_bytes();
                body.truncate(rng.random_range(0..lease_close));
                (format!("{IGD}#AddPortMapping"), body, 402)
            }
            _ => {
                let len = rng.random_range(0..600);
                let mut body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                if rng.random_bool(0.5) {
                    body.push(0xff); // not UTF-8
                }
                (format!("{IGD}#AddPortMapping"), body, 402)
            }
        };
        let (status, answer) = soap(&topo.client, &header, &body);
        assert_eq!(
            (status, fault_code(&answer)),
            (500, Some(want)),
            "request #{i} ({header}): {answer}"
        );
    }
    assert_eq!(
        pf_list(&dir).as_array().unwrap().len(),
        0,
        "the fuzz mapped nothing"
    );
    // Still serving, and the same body unbroken maps.
    let (code, answer) = soap(
        &topo.client,
        &format!("{IGD}#AddPortMapping"),
        valid.as_bytes(),
    );
    assert_eq!(code, 200, "{answer}");
    assert_eq!(pf_list(&dir).as_array().unwrap().len(), 1);
    let counts = status(&dir)["service"]["port_mapping"].clone();
    assert_eq!(counts["answered"]["upnp"]["success"], 1, "{counts}");

    // SSDP: searches broken in any way are not answered; a whole one is, once.
    let socket = topo
        .client
        .within(|| UdpSocket::bind((CLIENT_IP, 0)))
        .unwrap()
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let search = "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n";
    let mut sent = 0;
    for _ in 0..300 {
        let d: Vec<u8> = match rng.random_range(0..3) {
            0 => (0..rng.random_range(1..300))
                .map(|_| rng.random())
                .collect(),
            1 => search.replace("ssdp:discover", "ssdp:alive").into_bytes(),
            _ => search
                .replace("InternetGatewayDevice", "MediaServer")
                .into_bytes(),
        };
        socket.send_to(&d, ("239.255.255.250", 1900)).unwrap();
        sent += 1;
        // Paced, so that none is lost in the server's socket queue rather than judged.
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut buf = [0u8; 2048];
    assert!(
        socket.recv_from(&mut buf).is_err(),
        "a broken search was answered"
    );
    socket
        .send_to(search.as_bytes(), ("239.255.255.250", 1900))
        .unwrap();
    let (n, _) = socket
        .recv_from(&mut buf)
        .expect("a whole search is answered");
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(
        answer.contains(&format!(
            "LOCATION: http://{GATEWAY_TUNNEL_IP}:5000/rootDesc.xml"
        )),
        "{answer}"
    );
    let counts = status(&dir)["service"]["port_mapping"].clone();
    assert_eq!(counts["dropped"]["not_a_search"], sent, "{counts}");
    assert_eq!(counts["answered"]["ssdp"]["search"], 1, "{counts}");
}
