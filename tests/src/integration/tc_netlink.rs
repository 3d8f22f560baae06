//! The egress program as a netlink `cls_bpf` filter on the clsact qdisc: the only way on
//! kernels before TCX (6.6, so Debian 12's 6.1), and `--tc-attach netlink` / `tc_attach =
//! "netlink"` on any kernel, which is how this host proves it. Such a filter is no BPF link: it
//! outlives pf by itself, so pf must find it again (stats, detach, the service's adoption),
//! remove exactly its own filter, and leave everyone else's.

use crate::kit::{
    netns::Netns,
    topology::{PUBLIC_IFACE, Topology},
    traffic::Servers,
};

use super::common::{
    TempPinDir, assert_forwards_tcp_and_udp, counter, pf, pf_in, pf_in_ns, pf_stats, require_root,
    reserve_to_client,
};
use crate::kit::serve::TEST_POLICY;

/// `tc filter show dev pub0 egress`, as text.
fn egress_filters(ns: &Netns) -> String {
    let out = ns
        .run(&["tc", "filter", "show", "dev", PUBLIC_IFACE, "egress"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many of pf's egress filters are on pub0 (`tc` names a filter by its program's name).
fn pf_filters(ns: &Netns) -> usize {
    egress_filters(ns)
        .lines()
        .filter(|l| l.contains("pf_egress"))
        .count()
}

#[test]
fn egress_by_netlink_filter() {
    require_root();
    let dir = TempPinDir::new();
    let topo =
        Topology::new(&format!("pf{}tcnl", std::process::id())).expect("building the topology");
    let mut servers = Servers::new();
    servers.http(&topo.client, 80);
    servers.udp_echo(&topo.client, 5300);
    // Someone else's filters on the same hook, before pf's, that match nothing (so
    // classification goes on to pf's): a u32 filter, and a classic-BPF filter (kind "bpf" like
    // pf's, but with no program id) that returns 0. (This kernel has no TC actions.)
    let tc = |rest: &str| {
        let mut words = vec!["tc"];
        words.extend(rest.split(' '));
        topo.server.run(&words).unwrap();
    };
    tc(&format!("qdisc add dev {PUBLIC_IFACE} clsact"));
    tc(&format!(
        "filter add dev {PUBLIC_IFACE} egress prio 1 u32 match u32 0xdeadbeef 0xffffffff at 0 classid 1:1"
    ));
    let mut cbpf = vec![
        "tc",
        "filter",
        "add",
        "dev",
        PUBLIC_IFACE,
        "egress",
        "prio",
        "2",
    ];
    cbpf.extend(["bpf", "bytecode", "1,6 0 0 0", "classid", "1:2"]);
    topo.server.run(&cbpf).unwrap();
    let foreign = egress_filters(&topo.server);
    assert!(
        foreign.contains("u32") && foreign.contains("bytecode"),
        "{foreign}"
    );

    // The service attaches pub0 by netlink, as the config says.
    let policy = format!(
        "[[interfaces]]\nname = \"{PUBLIC_IFACE}\"\ntc_attach = \"netlink\"\n{TEST_POLICY}"
    );
    let mut service = dir.serve_with(Some(&topo.server), &policy);
    assert!(
        service.log().contains("TC by a netlink filter"),
        "{}",
        service.log()
    );
    assert_eq!(
        pf_filters(&topo.server),
        1,
        "{}\n{}",
        egress_filters(&topo.server),
        service.log()
    );
    let stats = pf_stats(&dir);
    assert_eq!(
        stats["attached"],
        serde_json::json!([PUBLIC_IFACE]),
        "{stats}"
    );
    assert_eq!(stats["egress_hooks"][PUBLIC_IFACE], "netlink", "{stats}");
    reserve_to_client(&dir, &[("8080/tcp", 80), ("5353/udp", 5300)]);
    assert_forwards_tcp_and_udp(&topo.inet, "forwarding with the egress filter");
    assert!(counter(&pf_stats(&dir), "egress", "rewritten") > 0);

    // A restart adopts the filter: found by its pinned program, not attached twice.
    service.stop();
    service.spawn().unwrap();
    assert!(
        service.log().contains(&format!("adopted {PUBLIC_IFACE}")),
        "{}",
        service.log()
    );
    assert_eq!(
        pf_filters(&topo.server),
        1,
        "{}",
        egress_filters(&topo.server)
    );
    assert_forwards_tcp_and_udp(&topo.inet, "forwarding after the restart");

    // A second attach is refused, by this pin directory and by another.
    let again = pf_in_ns(
        &topo.server,
        &dir,
        &["attach", PUBLIC_IFACE, "--tc-attach", "netlink"],
    );
    assert!(!again.status.success());
    let other = TempPinDir::new();
    let theirs = pf_in_ns(
        &topo.server,
        &other,
        &["attach", PUBLIC_IFACE, "--tc-attach", "netlink"],
    );
    let stderr = String::from_utf8_lossy(&theirs.stderr);
    assert!(
        !theirs.status.success() && stderr.contains(PUBLIC_IFACE),
        "another pf on the same interface: {stderr}"
    );
    assert_eq!(
        pf_filters(&topo.server),
        1,
        "{}",
        egress_filters(&topo.server)
    );

    // pf's filter deleted behind its back: reported dead, and the service's restart attaches
    // it again.
    let listing = egress_filters(&topo.server);
    let pf_line = listing
        .lines()
        .find(|l| l.contains("pf_egress"))
        .expect("pf's filter in the listing");
    let field = |name: &str| {
        let words: Vec<&str> = pf_line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == name).unwrap();
        words[at + 1].to_string()
    };
    let (prio, handle) = (field("pref"), field("handle"));
    topo.server
        .run(&[
            "tc",
            "filter",
            "del",
            "dev",
            PUBLIC_IFACE,
            "egress",
            "prio",
            &prio,
            "handle",
            &handle,
            "bpf",
        ])
        .unwrap();
    // Asked in the server's namespace: netlink answers for the caller's namespace only (from
    // the host's, where pub0 is not, the XDP link alone vouches for the interface).
    let stats: serde_json::Value =
        serde_json::from_str(&pf_in(&topo.server, &dir, &["stats", "--json"])).unwrap();
    let dead = stats["dead"][PUBLIC_IFACE]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(dead.contains("TC filter is gone"), "{stats}");
    service.stop();
    service.spawn().unwrap();
    assert!(
        service.log().contains("attached again"),
        "{}",
        service.log()
    );
    assert_eq!(
        pf_filters(&topo.server),
        1,
        "{}",
        egress_filters(&topo.server)
    );
    assert_forwards_tcp_and_udp(&topo.inet, "forwarding after the re-attach");

    // Detach removes pf's filter and nothing else: the others and the qdisc stay. From the
    // host's namespace, where netlink cannot reach the filter, it is refused and changes
    // nothing (unpinning alone would leave the filter running).
    service.stop();
    let elsewhere = pf(&dir, &["detach", PUBLIC_IFACE]);
    let stderr = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(
        !elsewhere.status.success() && stderr.contains("not in this network namespace"),
        "{stderr}"
    );
    assert_eq!(pf_filters(&topo.server), 1);
    assert_eq!(
        pf_stats(&dir)["attached"],
        serde_json::json!([PUBLIC_IFACE])
    );
    pf_in(&topo.server, &dir, &["detach", PUBLIC_IFACE]);
    let left = egress_filters(&topo.server);
    assert_eq!(pf_filters(&topo.server), 0, "{left}");
    assert!(left.contains("u32") && left.contains("bytecode"), "{left}");
    let qdiscs = topo
        .server
        .run(&["tc", "qdisc", "show", "dev", PUBLIC_IFACE])
        .unwrap();
    assert!(String::from_utf8_lossy(&qdiscs.stdout).contains("clsact"));
    assert_eq!(pf_stats(&dir)["attached"], serde_json::json!([]));
}
