//! `pf check`: "is my port open?", answered link by link by the real service, with the real
//! programs and a real target, each link broken for real in turn.

use std::{net::UdpSocket, process::Output};

use aya::maps::{HashMap, MapData};
use pf_common::{EndpointKey, NatEntry, map_names};
use serde_json::Value;

use crate::kit::{
    serve::TEST_POLICY,
    topology::{CLIENT_IP, PUBLIC_IFACE, Topology},
    traffic::Servers,
};

use super::common::{TempPinDir, pf, pf_in, pf_ok, require_root};

/// `pf check ENDPOINT [ARGS] --json`: its exit status and its JSON.
fn check(dir: &TempPinDir, endpoint: &str, args: &[&str]) -> (i32, Value) {
    let mut words = vec!["check", endpoint, "--json"];
    words.extend_from_slice(args);
    let out: Output = pf(dir, &words);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pf check {endpoint}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

/// The state of one link of a check.
fn link<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["link"] == name)
        .unwrap_or_else(|| panic!("no {name} link: {v}"))
}

#[test]
fn pf_check_names_the_first_broken_link() {
    require_root();
    let dir = TempPinDir::new();
    let topo = Topology::new(&format!("pf{}ck", std::process::id())).unwrap();
    // No [[interfaces]]: the test attaches by hand, after checking the unattached case.
    let _service = dir.serve_with(Some(&topo.server), TEST_POLICY);
    let mut servers = Servers::new();
    servers.http(&topo.client, 80);
    servers.udp_echo(&topo.client, 5301);
    // A UDP service that answers nothing.
    let silent = topo
        .client
        .within(|| UdpSocket::bind((CLIENT_IP, 5300)))
        .unwrap()
        .unwrap();

    // A port nobody reserved.
    let (code, v) = check(&dir, "198.51.100.1:9999/tcp", &[]);
    assert_eq!(
        (code, &v["verdict"], &v["because"]),
        (4, &"closed".into(), &"reservation".into()),
        "{v}"
    );

    // Reserved, but pf is attached nowhere.
    pf_ok(
        &dir,
        &["reserve", "198.51.100.1:8080/tcp", "--to", "10.8.0.2:80"],
    );
    let (code, v) = check(&dir, "198.51.100.1:8080/tcp", &[]);
    assert_eq!((code, &v["because"]), (4, &"attached".into()), "{v}");
    assert_eq!(link(&v, "reservation")["state"], "ok", "{v}");
    assert_eq!(link(&v, "maps")["state"], "ok", "{v}");

    // Attached: open, every link ok, the program's rewrite seen.
    pf_in(&topo.server, &dir, &["attach", PUBLIC_IFACE]);
    let (code, v) = check(&dir, "198.51.100.1:8080/tcp", &[]);
    assert_eq!((code, &v["verdict"]), (0, &"open".into()), "{v}");
    for name in ["reservation", "maps", "attached", "program", "target"] {
        assert_eq!(link(&v, name)["state"], "ok", "{name}: {v}");
    }
    assert!(
        link(&v, "program")["detail"]
            .as_str()
            .unwrap()
            .contains("10.8.0.2:80"),
        "{v}"
    );
    let human = pf_ok(&dir, &["check", "198.51.100.1:8080/tcp"]);
    assert!(human.lines().last() == Some("open"), "{human}");

    // Nothing listening on the target: closed at the target.
    pf_ok(
        &dir,
        &["reserve", "198.51.100.1:8081/tcp", "--to", "10.8.0.2:81"],
    );
    let (code, v) = check(&dir, "198.51.100.1:8081/tcp", &[]);
    assert_eq!((code, &v["because"]), (4, &"target".into()), "{v}");
    assert!(
        link(&v, "target")["detail"]
            .as_str()
            .unwrap()
            .contains("nothing listens"),
        "{v}"
    );

    // Disabled: closed at the reservation.
    let id = "1";
    pf_ok(&dir, &["disable", id]);
    let (code, v) = check(&dir, "198.51.100.1:8080/tcp", &[]);
    assert_eq!((code, &v["because"]), (4, &"reservation".into()), "{v}");
    pf_ok(&dir, &["enable", id]);

    // The maps drifted (an entry removed by hand): closed at the maps.
    let mut forward: HashMap<MapData, EndpointKey, NatEntry> = dir.map(map_names::FORWARD_NAT);
    forward
        .remove(&EndpointKey::new(
            [198, 51, 100, 1],
            8080u16.to_be_bytes(),
            pf_common::IPPROTO_TCP,
        ))
        .unwrap();
    let (code, v) = check(&dir, "198.51.100.1:8080/tcp", &[]);
    assert_eq!((code, &v["because"]), (4, &"maps".into()), "{v}");

    // UDP: a target that answers nothing is inconclusive, never closed; one that answers the
    // probe is open.
    pf_ok(
        &dir,
        &[
            "reserve",
            "198.51.100.1:5300-5301/udp",
            "--to",
            "10.8.0.2:5300",
        ],
    );
    let (code, v) = check(&dir, "198.51.100.1:5300/udp", &[]);
    assert_eq!(
        (code, &v["verdict"], &v["because"]),
        (5, &"inconclusive".into(), &"target".into()),
        "{v}"
    );
    let (code, v) = check(&dir, "198.51.100.1:5301/udp", &["--udp-probe", "hello"]);
    assert_eq!((code, &v["verdict"]), (0, &"open".into()), "{v}");
    assert!(
        link(&v, "traffic")["detail"]
            .as_str()
            .unwrap()
            .starts_with("in "),
        "{v}"
    );
    drop(silent);
    drop(servers);
}
