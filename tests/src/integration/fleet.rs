//! `pf serve` on the fleet's store: a real PostgreSQL server (Debian's), started by the test
//! on a data directory of its own and reached over its Unix socket from the server's network
//! namespace. What is reserved forwards real traffic; with the database stopped, forwarding
//! goes on and changes are refused as "unavailable", changing nothing; started again, the
//! service takes changes again without a restart, and a restart rebuilds the maps from it.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use pf::{domain::spec::PublicSpec, kernel::state::State, testing::postgres::TempPostgres};
use serde_json::Value;

use super::common::{TempPinDir, pf, pf_list, pf_ok, pf_words, require_root};
use crate::kit::{
    netns::{Netns, veth},
    serve::{Service, TEST_POLICY},
    topology::{PUBLIC_IFACE, PUBLIC_IP, Topology},
    traffic::Servers,
};

/// A policy for `pf serve` with its store on `url`: keys before the first table belong to
/// `[service]`.
fn on_store(url: &str, policy: &str) -> String {
    format!(
        "store = \"{url}\"\nagent = \"solo\"\n[[interfaces]]\nname = \"{PUBLIC_IFACE}\"\n{policy}"
    )
}

fn maps_hold(dir: &TempPinDir) -> Vec<String> {
    let state = State::open_for_read(&dir.dir).unwrap().expect("pf's maps");
    let mut specs: Vec<String> = state
        .list()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    specs.sort();
    specs
}

/// Waits (at most `within`) until `f` holds; whether it did.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One agent on a store at `url`, in `topo`'s server: web servers on the client's ports 80
/// and 81, and a reservation of 8080 to port 80 that forwards curl.
struct OneAgent {
    dir: TempPinDir,
    service: Service,
    page: String,
    _servers: Servers,
}

/// The second reservation the one-agent tests try while the store is away and again after.
const SECOND: [&str; 4] = ["reserve", "198.51.100.1:8081/tcp", "--to", "10.8.0.2:81"];

impl OneAgent {
    fn start(topo: &Topology, url: &str) -> Self {
        let dir = TempPinDir::new();
        let service = dir.serve_with(Some(&topo.server), &on_store(url, TEST_POLICY));
        let mut servers = Servers::new();
        servers.http(&topo.client, 80);
        servers.http(&topo.client, 81);
        pf_ok(
            &dir,
            &["reserve", "198.51.100.1:8080/tcp", "--to", "10.8.0.2:80"],
        );
        let page = format!("http://{PUBLIC_IP}:8080/");
        topo.inet.wait_for_http(&page).unwrap();
        Self {
            dir,
            service,
            page,
            _servers: servers,
        }
    }

    /// With the store out of reach: the second reservation is refused as unavailable and
    /// changes nothing in the maps, and the first goes on forwarding.
    fn refused_while_away(&self, topo: &Topology) {
        let before = maps_hold(&self.dir);
        let refused = pf(&self.dir, &SECOND);
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "a change without its store");
        assert!(
            said.contains("unavailable"),
            "the refusal says the store is unavailable: {said}"
        );
        assert_eq!(maps_hold(&self.dir), before, "nothing changed in the maps");
        assert!(
            topo.inet.curl(&self.page).unwrap().contains("port 80"),
            "forwarding goes on without the store"
        );
    }

    /// The store back: the second reservation is taken (within `within`) and forwards, with
    /// no restart.
    fn taken_again(&self, topo: &Topology, within: Duration) {
        assert!(
            eventually(within, || pf(&self.dir, &SECOND).status.success()),
            "changes are taken again once the store is back: {}",
            self.service.log()
        );
        topo.inet
            .wait_for_http(&format!("http://{PUBLIC_IP}:8081/"))
            .unwrap();
    }
}

#[test]
fn a_store_on_postgresql_forwards_and_outlives_the_database_going_away() {
    require_root();
    let mut db = TempPostgres::start().expect("a PostgreSQL server for the test");
    db.database("fleet").unwrap();
    let url = db.socket_url("fleet");
    let topo = Topology::new(&format!("pf{}pg", std::process::id())).unwrap();
    let mut agent = OneAgent::start(&topo, &url);
    let log = agent.service.log();
    assert!(log.contains("the reservation store is PostgreSQL"), "{log}");

    // The database goes away: forwarding goes on, a change is refused as unavailable and
    // changes nothing, in the store or the maps.
    db.stop();
    agent.refused_while_away(&topo);
    // Said once, not at every tick of the seconds it is down.
    std::thread::sleep(Duration::from_millis(2500));
    let said_down = |log: &str| log.matches("changes are refused until it is back").count();
    assert_eq!(
        said_down(&agent.service.log()),
        1,
        "{}",
        agent.service.log()
    );

    // Back: the service takes changes again (a new connection), with no restart.
    db.run().unwrap();
    agent.taken_again(&topo, Duration::from_secs(10));
    assert!(
        eventually(Duration::from_secs(3), || agent
            .service
            .log()
            .contains("the reservation store is reachable again")),
        "{}",
        agent.service.log()
    );

    // A restart rebuilds the maps from the database, and the store lists both.
    agent.service.stop();
    agent.service.spawn().unwrap();
    let listed: Vec<String> = pf_list(&agent.dir)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["spec"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(maps_hold(&agent.dir).len(), 2);
    assert!(topo.inet.curl(&agent.page).unwrap().contains("port 80"));
}

/// One server of a fleet: its namespace (public interface `pub0` on `198.18.K.1/24`, linked
/// to the internet host's `upK` on `.2`), its tunnel client (`10.8.0.2`, the same tunnel
/// address on every server, as a VPN gives a device), its pin directory and its agent.
struct FleetServer {
    public: String,
    server: Netns,
    _client: Netns,
    dir: TempPinDir,
    service: Option<Service>,
    _servers: Servers,
}

impl FleetServer {
    fn new(prefix: &str, k: u8, inet: &Netns) -> Self {
        let server = Netns::new(&format!("{prefix}{k}s")).unwrap();
        let client = Netns::new(&format!("{prefix}{k}c")).unwrap();
        let public = format!("198.18.{k}.1");
        veth(
            (inet, &format!("up{k}"), &format!("198.18.{k}.2/24")),
            (&server, PUBLIC_IFACE, &format!("{public}/24")),
        )
        .unwrap();
        veth(
            (&server, "tun0", "10.8.0.1/24"),
            (&client, "eth0", "10.8.0.2/24"),
        )
        .unwrap();
        server
            .run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .unwrap();
        client
            .run(&["ip", "route", "add", "default", "via", "10.8.0.1"])
            .unwrap();
        let mut servers = Servers::new();
        for port in [80, 81, 82] {
            servers.http(&client, port);
        }
        Self {
            public,
            server,
            _client: client,
            dir: TempPinDir::new(),
            service: None,
            _servers: servers,
        }
    }

    /// Starts (or restarts) this server's agent on the fleet's store.
    fn serve(&mut self, name: &str, url: &str, pool: &str) {
        let policy = format!(
            "store = \"{url}\"\nagent = \"{name}\"\n[[interfaces]]\nname = \"{PUBLIC_IFACE}\"\n\
             [policy]\npublic_ips = [\"{}\"]\ntarget_networks = [\"10.8.0.0/16\"]\n\
             port_pool = [\"{pool}\"]\nports_per_owner = 1000000\nforbid_listening_ports = false\n",
            self.public
        );
        match self.service.as_mut() {
            Some(service) => service.spawn().unwrap(),
            None => self.service = Some(self.dir.serve_with(Some(&self.server), &policy)),
        }
    }

    fn log(&self) -> String {
        self.service.as_ref().map(Service::log).unwrap_or_default()
    }
}

/// The public ports of every reservation this server's maps hold, sorted.
fn ports_in_maps(s: &FleetServer) -> Vec<u16> {
    let state = State::open_for_read(&s.dir.dir)
        .unwrap()
        .expect("pf's maps");
    let mut ports: Vec<u16> = state
        .list()
        .unwrap()
        .iter()
        .flat_map(|r| r.public.ports.ports())
        .collect();
    ports.sort();
    ports
}

/// Whether every server's maps come to hold exactly `want` (sorted) within `within`.
fn converge(fleet: &[FleetServer], want: &[u16], within: Duration) -> bool {
    eventually(within, || fleet.iter().all(|s| ports_in_maps(s) == want))
}

#[test]
fn three_agents_on_one_database_converge_and_never_share_a_port() {
    require_root();
    let mut db = TempPostgres::start().expect("a PostgreSQL server for the test");
    db.database("fleet").unwrap();
    let url = db.socket_url("fleet");
    let prefix = format!("pf{}f", std::process::id());
    let inet = Netns::new(&format!("{prefix}i")).unwrap();
    let mut fleet: Vec<FleetServer> = (0..3)
        .map(|k| FleetServer::new(&prefix, k, &inet))
        .collect();
    let pool = "8080-8081\", \"20000-20079";
    for (k, s) in fleet.iter_mut().enumerate() {
        s.serve(&format!("agent-{k}"), &url, pool);
    }
    assert!(
        fleet[2].log().contains("of a fleet of 3"),
        "{}",
        fleet[2].log()
    );
    let page = |s: &FleetServer, port: u16| format!("http://{}:{port}/", s.public);

    // A fleet-wide reservation made through agent 0 forwards on all three servers, each on
    // its own public IP, within a second (each agent follows the store's notification).
    let made: Value = serde_json::from_str(&pf_ok(
        &fleet[0].dir,
        &["reserve", "fleet:8080/tcp", "--to", "10.8.0.2:80", "--json"],
    ))
    .unwrap();
    assert_eq!(made["spec"], "fleet:8080/tcp -> 10.8.0.2:80", "{made}");
    let id = made["id"].as_u64().unwrap().to_string();
    assert!(
        converge(&fleet, &[8080], Duration::from_secs(1)),
        "every server forwards it within 1 s: {:?}",
        fleet.iter().map(ports_in_maps).collect::<Vec<_>>()
    );
    for (k, s) in fleet.iter().enumerate() {
        let answer = inet.curl(&page(s, 8080)).unwrap();
        assert_eq!(answer, format!("port 80 from 198.18.{k}.2"), "server {k}");
    }
    // A reservation on one server's IP is that server's alone: made through agent 2 for
    // server 1, it forwards there and nowhere else.
    pf_ok(
        &fleet[2].dir,
        &[
            "reserve",
            &format!("{}:8081/tcp", fleet[1].public),
            "--to",
            "10.8.0.2:81",
        ],
    );
    assert!(eventually(Duration::from_secs(1), || ports_in_maps(
        &fleet[1]
    ) == [8080, 8081]));
    assert_eq!(ports_in_maps(&fleet[0]), [8080]);
    assert_eq!(ports_in_maps(&fleet[2]), [8080]);
    assert!(
        inet.curl(&page(&fleet[1], 8081))
            .unwrap()
            .contains("port 81")
    );

    // Released through agent 2: gone from every server within a second.
    pf_ok(&fleet[2].dir, &["release", &id]);
    assert!(eventually(Duration::from_secs(1), || fleet
        .iter()
        .all(|s| !ports_in_maps(s).contains(&8080))));
    assert!(inet.curl(&page(&fleet[0], 8080)).is_err());
    pf_ok(&fleet[0].dir, &["release", "--owner", "admin"]);
    assert!(converge(&fleet, &[], Duration::from_secs(2)));

    // 50 automatic fleet-wide ports at once, from 80, spread over the three agents: no two
    // the same, and every server forwards all 50.
    let handles: Vec<_> = (0..50u16)
        .map(|i| {
            let words = pf_words(
                &fleet[usize::from(i % 3)].dir,
                &[
                    "reserve",
                    "fleet/tcp",
                    "--to",
                    &format!("10.8.0.2:{}", 1000 + i),
                    "--json",
                ],
            );
            std::thread::spawn(move || {
                let out = std::process::Command::new(&words[0])
                    .args(&words[1..])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let made: Value = serde_json::from_slice(&out.stdout).unwrap();
                made["spec"].as_str().unwrap().to_string()
            })
        })
        .collect();
    let mut ports: Vec<u16> = handles
        .into_iter()
        .map(|h| {
            let spec = h.join().unwrap();
            let public = spec.split(" -> ").next().unwrap();
            public.parse::<PublicSpec>().unwrap().ports.first
        })
        .collect();
    ports.sort();
    let distinct: BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), 50, "automatic ports collided: {ports:?}");
    assert!(
        ports
            .iter()
            .all(|p| (20000..20080).contains(p) || (8080..=8081).contains(p))
    );
    // Two ports the 50 left free, for the changes that follow.
    let mut free = (20000..20080u16).filter(|p| !ports.contains(p));
    let mut next_free = || free.next().unwrap();
    let (web, later, last) = (next_free(), next_free(), next_free());
    // One more, towards the client's web server, to see forwarding while the database is
    // away.
    pf_ok(
        &fleet[0].dir,
        &[
            "reserve",
            &format!("fleet:{web}/tcp"),
            "--to",
            "10.8.0.2:80",
        ],
    );
    ports.push(web);
    ports.sort();
    assert!(converge(&fleet, &ports, Duration::from_secs(1)));
    assert!(
        converge(&fleet, &ports, Duration::from_secs(3)),
        "every server forwards the 50"
    );

    // The database goes away: every server keeps forwarding, a change is refused cleanly;
    // back, the change is taken and every server follows.
    db.stop();
    for s in &fleet {
        assert!(inet.curl(&page(s, web)).is_ok(), "{}", s.public);
    }
    let later_spec = format!("fleet:{later}/tcp");
    let refused = pf(
        &fleet[1].dir,
        &["reserve", &later_spec, "--to", "10.8.0.2:81"],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unavailable"));
    db.run().unwrap();
    assert!(eventually(Duration::from_secs(10), || pf(
        &fleet[1].dir,
        &["reserve", &later_spec, "--to", "10.8.0.2:81"]
    )
    .status
    .success()));
    let mut want = ports.clone();
    want.push(later);
    want.sort();
    assert!(
        converge(&fleet, &want, Duration::from_secs(5)),
        "converged after the database came back: {:?}",
        fleet.iter().map(ports_in_maps).collect::<Vec<_>>()
    );

    // Agent 1 killed: changes go on through the others; restarted, it converges and reports
    // the drift it repaired.
    fleet[1].service.as_mut().unwrap().kill();
    let listed = pf_list(&fleet[0].dir);
    let gone: Vec<String> = listed.as_array().unwrap()[..10]
        .iter()
        .map(|r| r["id"].as_u64().unwrap().to_string())
        .collect();
    for id in &gone {
        pf_ok(&fleet[0].dir, &["release", id]);
    }
    pf_ok(
        &fleet[2].dir,
        &[
            "reserve",
            &format!("fleet:{last}/tcp"),
            "--to",
            "10.8.0.2:82",
        ],
    );
    let want: Vec<u16> = pf_list(&fleet[0].dir)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let spec = r["spec"].as_str().unwrap();
            spec.split(" -> ")
                .next()
                .unwrap()
                .parse::<PublicSpec>()
                .unwrap()
                .ports
                .first
        })
        .collect::<BTreeSet<u16>>()
        .into_iter()
        .collect();
    assert_eq!(want.len(), 52 - 10 + 1);
    assert!(converge(&fleet[..1], &want, Duration::from_secs(2)));
    assert_ne!(ports_in_maps(&fleet[1]), want, "agent 1 was down");
    fleet[1].serve("agent-1", &url, pool);
    assert_eq!(ports_in_maps(&fleet[1]), want, "converged at its start");
    let log = fleet[1].log();
    assert_eq!(
        log.matches("drift: removed").count(),
        10,
        "the restart reports each reservation it removed: {log}"
    );
    assert!(
        log.contains(&format!("drift: added 198.18.1.1:{last}/tcp")),
        "the restart reports the one it added: {log}"
    );
    assert!(
        inet.curl(&page(&fleet[1], last))
            .unwrap()
            .contains("port 82")
    );
}

/// The agent cut off from its database by a partition (packets to and from the database's
/// namespace silently dropped, as a broken path drops them): forwarding goes on untouched,
/// a change is refused as unavailable once the connection times out, and when the path is
/// back the agent connects again and takes changes, with nothing it forwarded lost.
#[test]
fn a_partition_from_the_database_never_stops_forwarding() {
    require_root();
    let topo = Topology::new(&format!("pf{}pp", std::process::id())).unwrap();
    let db_ns = Netns::new(&format!("pf{}pd", std::process::id())).unwrap();
    veth(
        (&db_ns, "db0", "10.99.0.1/24"),
        (&topo.server, "dbl", "10.99.0.2/24"),
    )
    .unwrap();
    let db = TempPostgres::start_in(&db_ns.path(), "10.99.0.1".parse().unwrap())
        .expect("a PostgreSQL server in its own namespace");
    db.database("fleet").unwrap();
    let url = db.url("fleet");
    assert!(url.contains("@10.99.0.1:"), "{url}");
    let agent = OneAgent::start(&topo, &url);

    // The cut: the server's packets to the database and the database's to it are dropped.
    let cut = |words: &[&str]| topo.server.run(words).unwrap();
    cut(&["nft", "add", "table", "inet", "pfcut"]);
    for (chain, hook, dir_word) in [("out", "output", "daddr"), ("in", "input", "saddr")] {
        cut(&[
            "nft",
            &format!("add chain inet pfcut {chain} {{ type filter hook {hook} priority 0; }}"),
        ]);
        cut(&[
            "nft",
            &format!("add rule inet pfcut {chain} ip {dir_word} 10.99.0.1 drop"),
        ]);
    }
    assert!(topo.inet.curl(&agent.page).unwrap().contains("port 80"));
    agent.refused_while_away(&topo);

    // Healed: the agent connects again and takes the change; what it forwarded stayed.
    cut(&["nft", "delete", "table", "inet", "pfcut"]);
    agent.taken_again(&topo, Duration::from_secs(30));
    assert!(topo.inet.curl(&agent.page).unwrap().contains("port 80"));
    assert_eq!(maps_hold(&agent.dir).len(), 2);
}
