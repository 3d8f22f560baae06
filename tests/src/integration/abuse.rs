//! Answering an abuse desk, and keeping a released port from the next customer (issue 20's
//! service half), through the real `pf serve` and the `pf` command: `pf who` names the owner
//! that held an endpoint at a time from the reservation records alone, across a restart;
//! a quarantined port is refused to other owners by name of the rule and handed back to its
//! own.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::common::{TempPinDir, pf, pf_ok, require_root};

fn policy() -> &'static str {
    r#"
[policy]
public_ips = ["198.51.100.1"]
target_networks = ["10.8.0.0/16"]
port_pool = ["7000-7001"]
forbid_listening_ports = false
quarantine = "1h"
"#
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn who(dir: &TempPinDir, at: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(&pf_ok(
        dir,
        &["who", "198.51.100.1:7000/tcp", "--at", at, "--json"],
    ))
    .unwrap();
    v["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["owner"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn who_held_a_port_and_a_released_port_waits_in_quarantine() {
    require_root();
    let dir = TempPinDir::new();
    let mut service = dir.serve_with(None, policy());
    let before = now();
    std::thread::sleep(Duration::from_millis(20));
    // acct-7's reservation of the port, made at the start and again after its release.
    let reserve_for_acct_7 = || {
        pf_ok(
            &dir,
            &[
                "reserve",
                "198.51.100.1:7000/tcp",
                "--to",
                "10.8.0.2",
                "--owner",
                "acct-7",
            ],
        )
    };
    reserve_for_acct_7();
    std::thread::sleep(Duration::from_millis(20));
    let held = now();
    std::thread::sleep(Duration::from_millis(20));
    pf_ok(&dir, &["release", "198.51.100.1:7000/tcp"]);
    std::thread::sleep(Duration::from_millis(20));
    let after = now();

    assert!(who(&dir, &before).is_empty());
    assert_eq!(who(&dir, &held), vec!["acct-7"]);
    assert!(who(&dir, &after).is_empty());
    let text = pf_ok(&dir, &["who", "198.51.100.1:7000/tcp", "--at", &held]);
    assert!(
        text.contains("owner acct-7") && text.contains("(released)"),
        "{text}"
    );

    // Another owner cannot have it, by hand or from the pool (whose other port it gets);
    // the owner who released it can.
    let refused = pf(
        &dir,
        &[
            "reserve",
            "198.51.100.1:7000/tcp",
            "--to",
            "10.8.0.3",
            "--owner",
            "acct-8",
        ],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("policy.quarantine"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("acct-7"),
        "the refusal names no owner: {stderr}"
    );
    let auto: Value = serde_json::from_str(&pf_ok(
        &dir,
        &[
            "reserve",
            "198.51.100.1/tcp",
            "--to",
            "10.8.0.3",
            "--owner",
            "acct-8",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(auto["first_port"], 7001, "{auto}");
    reserve_for_acct_7();

    // The records outlive a restart; bad questions are refused.
    service.stop();
    service.spawn().unwrap();
    assert_eq!(who(&dir, &held), vec!["acct-7"]);
    assert_eq!(who(&dir, &now()), vec!["acct-7"]);
    for (args, why) in [
        (
            vec!["who", "198.51.100.1:7000/both"],
            "one port and one protocol",
        ),
        (
            vec!["who", "198.51.100.1:7000-7001/tcp"],
            "one port and one protocol",
        ),
        (
            vec!["who", "198.51.100.1:7000/tcp", "--at", "yesterday"],
            "not a time",
        ),
    ] {
        let out = pf(&dir, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(why),
            "{args:?}: {stderr}"
        );
    }
}

/// A complaint about an owner: every one of its enabled reservations disabled in one call,
/// each audited with the reason; its ports stay held (nobody else takes them meanwhile);
/// without a reason, refused.
#[test]
fn an_owner_s_reservations_are_disabled_at_once_with_the_reason() {
    require_root();
    let dir = TempPinDir::new();
    let service = dir.serve();
    for (port, owner) in [(7100, "acct-9"), (7101, "acct-9"), (7102, "acct-10")] {
        pf_ok(
            &dir,
            &[
                "reserve",
                &format!("198.51.100.1:{port}/tcp"),
                "--to",
                &format!("10.8.1.{}", port - 7099),
                "--owner",
                owner,
            ],
        );
    }
    let missing = pf(&dir, &["disable", "--owner", "acct-9"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("--reason"),
        "{missing:?}"
    );
    let done: Value = serde_json::from_str(&pf_ok(
        &dir,
        &[
            "disable",
            "--owner",
            "acct-9",
            "--reason",
            "abuse report 1142",
            "--json",
        ],
    ))
    .unwrap();
    let disabled = done["disabled"].as_array().unwrap();
    assert_eq!(disabled.len(), 2, "{done}");
    assert!(disabled.iter().all(|r| r["enabled"] == false), "{done}");
    let list: Value = serde_json::from_str(&pf_ok(&dir, &["list", "--json"])).unwrap();
    let enabled: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["enabled"] == true)
        .map(|r| r["owner"].as_str().unwrap())
        .collect();
    assert_eq!(enabled, vec!["acct-10"]);
    // The ports stay held.
    let taken = pf(
        &dir,
        &[
            "reserve",
            "198.51.100.1:7100/tcp",
            "--to",
            "10.8.1.9",
            "--owner",
            "acct-11",
        ],
    );
    assert!(!taken.status.success());
    let audit = std::fs::read_to_string(service.audit_log()).unwrap();
    let lines: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &Value| l["action"] == "disable" || l["action"] == "disable-owner")
        .collect();
    assert_eq!(lines.len(), 3, "{audit}");
    assert!(
        lines
            .iter()
            .all(|l| l["reservation"]["reason"] == "abuse report 1142"),
        "{audit}"
    );
    // Again: nothing left to disable.
    let again = pf_ok(
        &dir,
        &[
            "disable",
            "--owner",
            "acct-9",
            "--reason",
            "abuse report 1142",
        ],
    );
    assert!(again.contains("nothing disabled"), "{again}");
}

/// Winding down through the real service: a drain scheduled a few seconds ahead is shown by
/// `pf status` and `pf drain --list`, survives a restart of `pf serve`, disables what it names
/// at its time (audited), and a cancelled one does nothing.
#[test]
fn a_scheduled_drain_survives_a_restart_and_runs_at_its_time() {
    require_root();
    let dir = TempPinDir::new();
    let mut service = dir.serve();
    for (port, owner) in [(7200, "acct-1"), (7201, "acct-2")] {
        pf_ok(
            &dir,
            &[
                "reserve",
                &format!("198.51.100.1:{port}/tcp"),
                "--to",
                &format!("10.8.2.{}", port - 7199),
                "--owner",
                owner,
            ],
        );
    }
    let at =
        humantime::format_rfc3339_millis(SystemTime::now() + Duration::from_secs(4)).to_string();
    let drain: Value = serde_json::from_str(&pf_ok(
        &dir,
        &["drain", "--at", &at, "--owner", "acct-1", "--json"],
    ))
    .unwrap();
    assert_eq!(drain["action"], "disable", "{drain}");
    let cancelled: Value =
        serde_json::from_str(&pf_ok(&dir, &["drain", "--at", &at, "--release", "--json"])).unwrap();
    pf_ok(&dir, &["drain", "--cancel", &cancelled["id"].to_string()]);
    let status = pf_ok(&dir, &["status"]);
    assert!(
        status.contains("drain") && status.contains("acct-1's reservations"),
        "{status}"
    );
    let bad = pf(&dir, &["drain", "--at", "next week"]);
    assert!(!bad.status.success());

    service.stop();
    service.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let enabled = |dir: &TempPinDir| -> Vec<String> {
        let list: Value = serde_json::from_str(&pf_ok(dir, &["list", "--json"])).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["enabled"] == true)
            .map(|r| r["owner"].as_str().unwrap().to_string())
            .collect()
    };
    while enabled(&dir).len() == 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        enabled(&dir),
        vec!["acct-2"],
        "the drain ran after the restart"
    );
    assert_eq!(pf_list_len(&dir), 2, "disabled, not released");
    let list = pf_ok(&dir, &["drain", "--list"]);
    assert!(list.contains("done"), "{list}");
    let audit = std::fs::read_to_string(service.audit_log()).unwrap();
    assert!(audit.contains("\"action\":\"drain\""), "{audit}");
}

fn pf_list_len(dir: &TempPinDir) -> usize {
    serde_json::from_str::<Value>(&pf_ok(dir, &["list", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .len()
}
