//! `pf serve` on the fleet's store: a real PostgreSQL server (Debian's), started by the test
//! on a data directory of its own and reached over its Unix socket from the server's network
//! namespace. What is reserved forwards real traffic; with the database stopped, forwarding
//! goes on and changes are refused as "unavailable", changing nothing; started again, the
//! service takes changes again without a restart, and a restart rebuilds the maps from it.

use std::time::{Duration, Instant};

use pf::{kernel::state::State, testing::postgres::TempPostgres};

use super::common::{TempPinDir, pf, pf_list, pf_ok, require_root};
use crate::kit::{
    serve::TEST_POLICY,
    topology::{PUBLIC_IFACE, PUBLIC_IP, Topology},
    traffic::Servers,
};

/// A policy for `pf serve` with its store on `url`: keys before the first table belong to
/// `[service]`.
fn on_store(url: &str, policy: &str) -> String {
    format!("store = \"{url}\"\nagent = \"solo\"\n[[interfaces]]\nname = \"{PUBLIC_IFACE}\"\n{policy}")
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

#[test]
fn a_store_on_postgresql_forwards_and_outlives_the_database_going_away() {
    require_root();
    let mut db = TempPostgres::start().expect("a PostgreSQL server for the test");
    db.database("fleet").unwrap();
    let url = db.socket_url("fleet");
    let dir = TempPinDir::new();
    let topo = Topology::new(&format!("pf{}pg", std::process::id())).unwrap();
    let mut service = dir.serve_with(Some(&topo.server), &on_store(&url, TEST_POLICY));
    assert!(
        service
            .log()
            .contains("the reservation store is PostgreSQL"),
        "{}",
        service.log()
    );
    let mut servers = Servers::new();
    servers.http(&topo.client, 80);
    servers.http(&topo.client, 81);

    pf_ok(
        &dir,
        &["reserve", "198.51.100.1:8080/tcp", "--to", "10.8.0.2:80"],
    );
    let page = format!("http://{PUBLIC_IP}:8080/");
    topo.inet.wait_for_http(&page).unwrap();

    // The database goes away: forwarding goes on, a change is refused as unavailable and
    // changes nothing, in the store or the maps.
    db.stop();
    let before = maps_hold(&dir);
    let refused = pf(
        &dir,
        &["reserve", "198.51.100.1:8081/tcp", "--to", "10.8.0.2:81"],
    );
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a change without its store");
    assert!(
        said.contains("unavailable"),
        "the refusal says the store is unavailable: {said}"
    );
    assert_eq!(maps_hold(&dir), before);
    assert!(
        topo.inet.curl(&page).unwrap().contains("port 80"),
        "forwarding goes on without the database"
    );
    // Said once, not at every tick of the seconds it is down.
    std::thread::sleep(Duration::from_millis(2500));
    let said_down = |log: &str| log.matches("changes are refused until it is back").count();
    assert_eq!(said_down(&service.log()), 1, "{}", service.log());

    // Back: the service takes changes again (a new connection), with no restart.
    db.run().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || pf(
            &dir,
            &["reserve", "198.51.100.1:8081/tcp", "--to", "10.8.0.2:81"]
        )
        .status
        .success()),
        "changes are taken again once the database is back: {}",
        service.log()
    );
    topo.inet
        .wait_for_http(&format!("http://{PUBLIC_IP}:8081/"))
        .unwrap();
    assert!(
        eventually(Duration::from_secs(3), || service
            .log()
            .contains("the reservation store is reachable again")),
        "{}",
        service.log()
    );

    // A restart rebuilds the maps from the database, and the store lists both.
    service.stop();
    service.spawn().unwrap();
    let listed: Vec<String> = pf_list(&dir)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["spec"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(maps_hold(&dir).len(), 2);
    assert!(topo.inet.curl(&page).unwrap().contains("port 80"));
}
