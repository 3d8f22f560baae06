//! Host tests of the engine: the in-memory store and the fake data plane, no BPF.

use super::*;
use crate::kernel::trigger::Opening;
use crate::service::{
    audit::Audit, config::Config, dataplane::fake::FakeDataPlane, store::SqliteStore,
};

const CALLER: Caller = Caller {
    uid: Some(0),
    pid: Some(1),
};

/// An engine on an in-memory store and a fake data plane (kept, to look inside), with a
/// small pool and quota; its audit log in a scratch directory.
fn engine() -> (Engine, FakeDataPlane, std::path::PathBuf) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("pf-engine-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = Config::parse(
        r#"
[policy]
public_ips = ["198.51.100.1"]
target_networks = ["10.200.0.0/16"]
port_pool = ["30000-30009"]
forbid_listening_ports = false
ports_per_owner = 3
"#,
    )
    .unwrap();
    let fake = FakeDataPlane::default();
    let engine = Engine::new(
        Box::new(SqliteStore::in_memory().unwrap()),
        Box::new(fake.clone()),
        config.policy,
        Audit::open(&dir.join("audit.jsonl")).unwrap(),
    )
    .unwrap();
    (engine, fake, dir)
}

fn reserve(
    e: &mut Engine,
    owner: &str,
    public: &str,
    to: &str,
    ttl: Option<&str>,
) -> Result<Value, ApiError> {
    e.handle(
        Request::Reserve(ReserveRequest {
            owner: owner.into(),
            public: public.into(),
            to: to.into(),
            ttl: ttl.map(Into::into),
            ttl_seconds: None,
            note: None,
            trigger: None,
            limits: None,
        }),
        CALLER,
    )
}

/// Reserves `public` for acct-1 towards 10.200.0.2; its id.
fn reserved(e: &mut Engine, public: &str, ttl: Option<&str>) -> u64 {
    reserve(e, "acct-1", public, "10.200.0.2", ttl).unwrap()["id"]
        .as_u64()
        .unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect()
}

#[test]
fn reserve_checks_conflicts_quota_and_hands_out_distinct_free_ports() {
    let (mut e, fake, _dir) = engine();
    reserve(
        &mut e,
        "acct-1",
        "198.51.100.1:30000/tcp",
        "10.200.0.2",
        None,
    )
    .unwrap();
    assert_eq!(
        fake.held(),
        vec!["198.51.100.1:30000/tcp -> 10.200.0.2:30000"]
    );
    let conflict = reserve(
        &mut e,
        "acct-2",
        "198.51.100.1:30000/both",
        "10.200.0.3",
        None,
    )
    .unwrap_err();
    assert_eq!(conflict.kind, Failure::Conflict, "{}", conflict.message);
    let a = reserve(&mut e, "acct-1", "198.51.100.1/tcp", "10.200.0.4", None).unwrap();
    let b = reserve(&mut e, "acct-1", "198.51.100.1/tcp", "10.200.0.5", None).unwrap();
    let ports = [
        a["first_port"].as_u64().unwrap(),
        b["first_port"].as_u64().unwrap(),
    ];
    assert!(
        ports.iter().all(|p| (30001..=30009).contains(p)) && ports[0] != ports[1],
        "{ports:?}"
    );
    let quota = reserve(&mut e, "acct-1", "198.51.100.1/tcp", "10.200.0.6", None).unwrap_err();
    assert_eq!(quota.rule, Some("policy.ports_per_owner"));
    let outside =
        reserve(&mut e, "acct-2", "198.51.100.1:30001/udp", "10.9.0.2", None).unwrap_err();
    assert_eq!(outside.rule, Some("policy.target_networks"));
    // The refusals changed nothing.
    assert_eq!(fake.held().len(), 3);
    assert_eq!(
        ids(&e
            .handle(Request::List(ListFilter::default()), CALLER)
            .unwrap())
        .len(),
        3
    );
}

#[test]
fn a_map_write_that_fails_leaves_nothing_stored() {
    let (mut e, fake, dir) = engine();
    fake.0.lock().unwrap().fail_next_write = Some("no memory".into());
    let err = reserve(
        &mut e,
        "acct-1",
        "198.51.100.1:30000/tcp",
        "10.200.0.2",
        None,
    )
    .unwrap_err();
    assert_eq!(err.kind, Failure::Internal);
    assert!(err.message.contains("no memory") && !err.partial, "{err:?}");
    assert_eq!(
        e.handle(Request::List(ListFilter::default()), CALLER)
            .unwrap(),
        json!([])
    );
    assert!(fake.held().is_empty());
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert!(audit.contains(r#""result":"refused""#), "{audit}");
}

#[test]
fn disable_enable_and_release_keep_store_and_maps_together() {
    let (mut e, fake, _dir) = engine();
    let id = reserved(&mut e, "198.51.100.1:30000-30001/both", None);
    let done = e
        .handle(Request::SetEnabled { id, enabled: false }, CALLER)
        .unwrap();
    assert_eq!(done["enabled"], json!(false));
    assert!(fake.held().is_empty());
    e.handle(Request::SetEnabled { id, enabled: true }, CALLER)
        .unwrap();
    assert_eq!(fake.held().len(), 1);
    e.handle(Request::Release(id), CALLER).unwrap();
    assert!(fake.held().is_empty());
    assert_eq!(
        e.handle(Request::Release(id), CALLER).unwrap_err().kind,
        Failure::NotFound
    );
}

#[test]
fn a_release_the_maps_refuse_is_partial_and_repaired() {
    let (mut e, fake, dir) = engine();
    let id = reserved(&mut e, "198.51.100.1:30000/tcp", None);
    fake.0.lock().unwrap().fail_next_write = Some("busy".into());
    let err = e.handle(Request::Release(id), CALLER).unwrap_err();
    assert!(
        err.partial && err.message.contains("released in the store"),
        "{err:?}"
    );
    assert_eq!(fake.held().len(), 1, "the fake refused the removal");
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert!(audit.contains(r#""result":"partial""#), "{audit}");
    // The next tick reconciles: the maps follow the store.
    e.tick();
    assert!(fake.held().is_empty());
}

#[test]
fn expiry_moves_to_the_history_and_restore_brings_back() {
    let (mut e, fake, _dir) = engine();
    let id = reserved(&mut e, "198.51.100.1:30000/tcp", Some("10s"));
    e.clock.advance(9_000);
    e.tick();
    assert_eq!(fake.held().len(), 1, "expired early");
    e.clock.advance(2_000);
    e.tick();
    assert!(fake.held().is_empty());
    assert_eq!(
        e.handle(Request::List(ListFilter::default()), CALLER)
            .unwrap(),
        json!([])
    );
    let history = e.handle(Request::Expired { owner: None }, CALLER).unwrap();
    assert_eq!(ids(&history), vec![id]);
    let back = e
        .handle(
            Request::Restore {
                id,
                ttl: Some("1h".into()),
            },
            CALLER,
        )
        .unwrap();
    assert_eq!(back["id"], json!(id));
    assert_eq!(fake.held().len(), 1);
}

#[test]
fn a_start_refuses_to_empty_the_maps_from_a_new_store() {
    let (mut e, fake, _dir) = engine();
    let stranger = Reservation::new(
        "198.51.100.1:30005/udp".parse().unwrap(),
        "10.200.0.9".parse().unwrap(),
    )
    .unwrap();
    e.dataplane.open().unwrap().reserve(&stranger).unwrap();
    let guard = ReconcileGuard {
        force: false,
        store_was_new: true,
        removal_limit: 0.25,
    };
    let err = e.start(guard).unwrap_err();
    assert_eq!(err.kind, Failure::Unavailable);
    assert!(err.message.contains("--force-reconcile"), "{}", err.message);
    assert_eq!(fake.held().len(), 1, "a refused start changed the maps");
    let (report, _) = e
        .start(ReconcileGuard {
            force: true,
            ..guard
        })
        .unwrap();
    assert_eq!(report.drifts, 1);
    assert!(fake.held().is_empty());
    // The leak guard is set from the policy's target networks.
    assert_eq!(
        fake.0.lock().unwrap().tunnel_networks,
        vec!["10.200.0.0/16".parse().unwrap()]
    );
}

#[test]
fn owners_are_visible_ascii_and_notes_hide_nothing() {
    for ok in ["acct-7", "user@example.com", "tunnel:10.8.0.2", "a/b+c=d"] {
        check_owner(ok).unwrap_or_else(|e| panic!("{ok}: {}", e.message));
    }
    for (bad, needle) in [
        ("", "owner is empty"),
        ("acct 7", "' '"),
        ("acct\u{202e}7", "U+202E"),
        ("acct\u{200b}7", "U+200B"),
        ("\u{0430}cct-7", "U+0430"), // Cyrillic a
        ("acct\t7", "U+0009"),
    ] {
        let e = check_owner(bad).unwrap_err();
        assert_eq!(e.kind, Failure::BadRequest);
        assert!(e.message.contains(needle), "{bad:?}: {}", e.message);
    }
    assert!(check_owner(&"x".repeat(MAX_OWNER_LEN + 1)).is_err());
    check_note("Plex auf dem NAS – 日本語 ok").unwrap();
    for bad in [
        "a\u{202e}b",
        "a\u{2066}b",
        "a\u{feff}b",
        "a\nb",
        "a\u{2028}b",
    ] {
        let e = check_note(bad).unwrap_err();
        assert!(e.message.contains("U+"), "{bad:?}: {}", e.message);
    }
}

/// The engine's policy with `policy` (TOML under `[policy]`) instead.
fn policy(text: &str) -> Policy {
    Config::parse(&format!("[policy]\n{text}")).unwrap().policy
}

const NARROWED: &str = r#"
public_ips = ["198.51.100.1"]
target_networks = ["10.200.0.0/16"]
port_pool = ["30000-30004"]
forbid_listening_ports = false
ports_per_owner = 3
"#;

#[test]
fn a_reload_reports_what_the_new_policy_refuses_and_refuses_renewing_it() {
    let (mut e, fake, _dir) = engine();
    let inside = reserved(&mut e, "198.51.100.1:30001/tcp", Some("1h"));
    let outside = reserved(&mut e, "198.51.100.1:30008/tcp", Some("1h"));
    let report = e.reload(policy(NARROWED)).unwrap();
    assert_eq!(
        report,
        ReloadReport {
            violations: 1,
            disabled: 0
        }
    );
    let status = e.handle(Request::Status, CALLER).unwrap();
    let violations = status["policy_violations"].as_array().unwrap();
    assert_eq!(violations.len(), 1, "{status}");
    assert_eq!(violations[0]["id"], outside);
    assert_eq!(violations[0]["rule"], "policy.port_pool");
    // Reported only: it still forwards, but is not renewed or enabled again.
    assert_eq!(fake.held().len(), 2);
    let renew = e.handle(
        Request::Renew {
            id: outside,
            ttl: None,
        },
        CALLER,
    );
    assert_eq!(renew.unwrap_err().rule, Some("policy.port_pool"));
    e.handle(
        Request::SetEnabled {
            id: outside,
            enabled: false,
        },
        CALLER,
    )
    .unwrap();
    let enable = e.handle(
        Request::SetEnabled {
            id: outside,
            enabled: true,
        },
        CALLER,
    );
    assert_eq!(enable.unwrap_err().rule, Some("policy.port_pool"));
    e.handle(
        Request::Renew {
            id: inside,
            ttl: None,
        },
        CALLER,
    )
    .unwrap();
    // Released, it is no violation any more.
    e.handle(Request::Release(outside), CALLER).unwrap();
    let status = e.handle(Request::Status, CALLER).unwrap();
    assert_eq!(status["policy_violations"], json!([]), "{status}");
}

#[test]
fn a_reload_that_says_disable_disables_and_audits_each_violator() {
    let (mut e, fake, dir) = engine();
    let kept = reserved(&mut e, "198.51.100.1:30001/tcp", Some("1h"));
    let pool = reserved(&mut e, "198.51.100.1:30008/tcp", Some("1h"));
    let lifetime = reserved(&mut e, "198.51.100.1:30002/udp", None);
    let report = e
        .reload(policy(&format!(
            "{NARROWED}\nmax_ttl = \"2h\"\non_violation = \"disable\""
        )))
        .unwrap();
    assert_eq!(
        report,
        ReloadReport {
            violations: 2,
            disabled: 2
        }
    );
    assert_eq!(
        fake.held(),
        vec!["198.51.100.1:30001/tcp -> 10.200.0.2:30001".to_string()],
        "only {kept} still forwards"
    );
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    for (id, rule) in [(pool, "policy.port_pool"), (lifetime, "policy.max_ttl")] {
        assert!(
            audit.lines().any(|l| l.contains("\"disable\"")
                && l.contains(&format!("\"id\":{id},"))
                && l.contains(rule)),
            "{audit}"
        );
    }
}

#[test]
fn a_lower_quota_marks_the_newest_reservations_past_it() {
    let (mut e, _fake, _dir) = engine();
    let first = reserved(&mut e, "198.51.100.1:30001/tcp", None);
    let second = reserved(&mut e, "198.51.100.1:30002/tcp", None);
    let third = reserved(&mut e, "198.51.100.1:30003/tcp", None);
    let report = e
        .reload(policy(
            &NARROWED.replace("ports_per_owner = 3", "ports_per_owner = 1"),
        ))
        .unwrap();
    assert_eq!(report.violations, 2);
    let ids: Vec<u64> = e.violations().map(|v| v.id).collect();
    assert_eq!(ids, vec![second, third], "{first} is within the quota");
    assert!(e.violations().all(|v| v.rule == "policy.ports_per_owner"));
}

fn traffic(packets: u64) -> Traffic {
    Traffic {
        in_packets: packets,
        in_bytes: packets * 100,
        out_packets: packets / 2,
        out_bytes: packets * 50,
    }
}

/// Counts `t` on reservation `id`'s entries, as the programs would.
fn count(e: &mut Engine, fake: &FakeDataPlane, id: u64, t: Traffic) {
    let record = e.get(id).unwrap();
    fake.count(&record.reservation, t);
}

fn stats_of(e: &mut Engine, id: u64) -> Value {
    let stats = e.handle(Request::Stats, CALLER).unwrap();
    stats["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("{id} not in {stats}"))
}

#[test]
fn traffic_survives_disable_enable_and_expiry_and_a_release_reports_its_totals() {
    let (mut e, fake, dir) = engine();
    let id = reserved(&mut e, "198.51.100.1:30000/tcp", Some("10s"));
    count(&mut e, &fake, id, traffic(10));
    assert_eq!(stats_of(&mut e, id)["traffic"], json!(traffic(10)));
    // Disabled: its entries leave the maps, and their counts go on in the store.
    e.handle(Request::SetEnabled { id, enabled: false }, CALLER)
        .unwrap();
    let disabled = stats_of(&mut e, id);
    assert_eq!(disabled["enabled"], false);
    assert_eq!(disabled["traffic"], json!(traffic(10)));
    e.handle(Request::SetEnabled { id, enabled: true }, CALLER)
        .unwrap();
    count(&mut e, &fake, id, traffic(4));
    assert_eq!(stats_of(&mut e, id)["traffic"], json!(traffic(14)));
    // Expired: the audit line has its totals; restored, it counts on from them.
    e.clock.advance(11_000);
    e.tick();
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    let expired = audit
        .lines()
        .find(|l| l.contains("\"action\":\"expire\""))
        .unwrap_or_else(|| panic!("{audit}"));
    let expired: Value = serde_json::from_str(expired).unwrap();
    assert_eq!(
        expired["reservation"]["traffic"],
        json!(traffic(14)),
        "{expired}"
    );
    e.handle(Request::Restore { id, ttl: None }, CALLER)
        .unwrap();
    count(&mut e, &fake, id, traffic(2));
    let released = e.handle(Request::Release(id), CALLER).unwrap();
    assert_eq!(released["traffic"], json!(traffic(16)), "{released}");
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    let release: Value = serde_json::from_str(
        audit
            .lines()
            .find(|l| l.contains("\"action\":\"release\""))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(release["reservation"]["traffic"], json!(traffic(16)));
    // Gone with it: a later reservation under another id starts from nothing.
    let next = reserved(&mut e, "198.51.100.1:30000/tcp", None);
    assert_eq!(stats_of(&mut e, next)["traffic"], json!(Traffic::default()));
}

fn change(
    e: &mut Engine,
    id: u64,
    to: Option<&str>,
    owner: Option<&str>,
    note: Option<&str>,
) -> Result<Value, ApiError> {
    e.handle(
        Request::Change {
            id,
            change: ChangeRequest {
                to: to.map(Into::into),
                owner: owner.map(Into::into),
                note: note.map(Into::into),
            },
        },
        CALLER,
    )
}

#[test]
fn a_change_in_place_keeps_the_port_and_checks_what_a_reserve_would() {
    let (mut e, fake, _dir) = engine();
    let id = reserved(&mut e, "198.51.100.1:30000/tcp", None);
    let other = reserve(
        &mut e,
        "acct-2",
        "198.51.100.1:30001/tcp",
        "10.200.0.9",
        None,
    )
    .unwrap()["id"]
        .as_u64()
        .unwrap();
    count(&mut e, &fake, id, traffic(5));
    // A new target: the maps hold the new one only, the traffic goes on.
    let changed = change(&mut e, id, Some("10.200.0.3:8080"), None, Some("moved")).unwrap();
    assert_eq!(changed["spec"], "198.51.100.1:30000/tcp -> 10.200.0.3:8080");
    assert_eq!(changed["note"], "moved");
    assert_eq!(
        fake.held(),
        vec![
            "198.51.100.1:30000/tcp -> 10.200.0.3:8080".to_string(),
            "198.51.100.1:30001/tcp -> 10.200.0.9:30001".to_string(),
        ]
    );
    assert_eq!(stats_of(&mut e, id)["traffic"], json!(traffic(5)));
    // Refused as a reserve would be, changing nothing.
    let conflict = change(&mut e, id, Some("10.200.0.9:30001"), None, None).unwrap_err();
    assert_eq!(
        (conflict.kind, conflict.conflict_id),
        (Failure::Conflict, Some(other))
    );
    let outside = change(&mut e, id, Some("192.168.1.5"), None, None).unwrap_err();
    assert_eq!(outside.rule, Some("policy.target_networks"));
    // The quota (3 ports) is the new owner's: acct-2 holds 1.
    for port in [30002, 30003] {
        reserve(
            &mut e,
            "acct-2",
            &format!("198.51.100.1:{port}/udp"),
            &format!("10.200.0.{}", port - 29990),
            None,
        )
        .unwrap();
    }
    let quota = change(&mut e, id, None, Some("acct-2"), None).unwrap_err();
    assert_eq!(quota.rule, Some("policy.ports_per_owner"));
    assert_eq!(
        change(&mut e, id, None, None, None).unwrap_err().kind,
        Failure::BadRequest
    );
    assert_eq!(
        change(&mut e, 999, None, None, Some("x")).unwrap_err().kind,
        Failure::NotFound
    );
    let now = e.handle(Request::Get(id), CALLER).unwrap();
    assert_eq!(
        (&now["owner"], &now["spec"]),
        (
            &json!("acct-1"),
            &json!("198.51.100.1:30000/tcp -> 10.200.0.3:8080")
        )
    );
    // Its own old target range is no conflict with itself.
    change(&mut e, id, Some("10.200.0.3:8081"), Some("acct-3"), None).unwrap();
    assert_eq!(
        e.handle(Request::Get(id), CALLER).unwrap()["owner"],
        "acct-3"
    );
}

#[test]
fn a_change_the_maps_refuse_puts_everything_back() {
    let (mut e, fake, _dir) = engine();
    let id = reserved(&mut e, "198.51.100.1:30000/tcp", None);
    fake.0.lock().unwrap().fail_next_write = Some("no room".into());
    let refused = change(&mut e, id, Some("10.200.0.3"), None, None).unwrap_err();
    assert!(refused.message.contains("no room"), "{}", refused.message);
    assert!(!refused.partial);
    assert_eq!(
        e.handle(Request::Get(id), CALLER).unwrap()["spec"],
        "198.51.100.1:30000/tcp -> 10.200.0.2:30000"
    );
    assert_eq!(
        fake.held(),
        vec!["198.51.100.1:30000/tcp -> 10.200.0.2:30000".to_string()]
    );
}

#[test]
fn violations_are_cured_by_what_answers_them_and_counted_past_the_status_list() {
    let (mut e, _fake, _dir) = engine();
    let outside = reserved(&mut e, "198.51.100.1:30008/tcp", Some("1h"));
    let long = reserved(&mut e, "198.51.100.1:30001/tcp", Some("90d"));
    e.reload(policy(&format!("{NARROWED}\nmax_ttl = \"30d\"")))
        .unwrap();
    let rules: Vec<(u64, &str)> = e.violations().map(|v| (v.id, v.rule)).collect();
    assert_eq!(
        rules,
        vec![(outside, "policy.port_pool"), (long, "policy.max_ttl")]
    );
    // A note changes nothing of the port; a renewal within max_ttl cures the lifetime.
    change(&mut e, outside, None, None, Some("still outside")).unwrap();
    e.handle(
        Request::Renew {
            id: long,
            ttl: Some("1d".into()),
        },
        CALLER,
    )
    .unwrap();
    let status = e.handle(Request::Status, CALLER).unwrap();
    assert_eq!(status["policy_violation_count"], 1, "{status}");
    assert_eq!(status["policy_violations"][0]["id"], outside, "{status}");
    // Its public side cannot change in place; a release ends it.
    e.handle(Request::Release(outside), CALLER).unwrap();
    let status = e.handle(Request::Status, CALLER).unwrap();
    assert_eq!(status["policy_violation_count"], 0, "{status}");
}

#[test]
fn a_reload_disable_keeps_the_traffic_and_its_violators_stay_disabled() {
    let (mut e, fake, _dir) = engine();
    let _first = reserved(&mut e, "198.51.100.1:30001/tcp", None);
    let second = reserved(&mut e, "198.51.100.1:30002/tcp", Some("1h"));
    count(&mut e, &fake, second, traffic(7));
    let report = e
        .reload(policy(&format!(
            "{}\non_violation = \"disable\"",
            NARROWED.replace("ports_per_owner = 3", "ports_per_owner = 1")
        )))
        .unwrap();
    assert_eq!(report.disabled, 1);
    // Its counts were carried, not lost with its entries, and no drift was repaired.
    let row = stats_of(&mut e, second);
    assert_eq!(
        (&row["enabled"], &row["traffic"]),
        (&json!(false), &json!(traffic(7)))
    );
    let status = e.handle(Request::Status, CALLER).unwrap();
    assert_eq!(status["last_reconcile"]["drifts"], 0, "{status}");
    // Neither enabled nor renewed while over the quota.
    let enable = e
        .handle(
            Request::SetEnabled {
                id: second,
                enabled: true,
            },
            CALLER,
        )
        .unwrap_err();
    assert_eq!(enable.rule, Some("policy.ports_per_owner"));
    let renew = e
        .handle(
            Request::Renew {
                id: second,
                ttl: None,
            },
            CALLER,
        )
        .unwrap_err();
    assert_eq!(renew.rule, Some("policy.ports_per_owner"));
}

/// Mappings devices ask for (NAT-PMP, PCP), on the same fakes.
mod mapping {
    use super::*;
    use crate::service::{
        engine::mapping::{NOT_A_CLIENT, NOT_YOURS},
        store::MappingProtocol,
    };

    fn engine() -> (Engine, FakeDataPlane, std::path::PathBuf) {
        let (mut e, fake, dir) = super::engine();
        let config = Config::parse(
            r#"
[port_mapping]
listen = ["10.200.0.1"]
[policy]
public_ips = ["198.51.100.1"]
target_networks = ["10.200.0.0/16"]
"#,
        )
        .unwrap();
        e.set_port_mapping(config.port_mapping);
        (e, fake, dir)
    }

    fn ask(
        via: MappingProtocol,
        client: [u8; 4],
        protocol: Protocols,
        internal: u16,
    ) -> MapRequest {
        MapRequest::new(via, Ipv4Addr::from(client), protocol, internal, 60)
    }

    fn map(e: &mut Engine, req: MapRequest) -> Result<MapAnswer, ApiError> {
        e.handle(Request::Map(req), Caller::SERVICE)
            .map(|v| serde_json::from_value(v).unwrap())
    }

    const A: [u8; 4] = [10, 200, 0, 2];
    const B: [u8; 4] = [10, 200, 0, 3];

    #[test]
    fn protonvpn_s_loop_keeps_one_port_for_both_protocols_and_renewals_touch_no_map() {
        let (mut e, fake, _dir) = engine();
        let udp = map(&mut e, ask(MappingProtocol::NatPmp, A, Protocols::Udp, 0)).unwrap();
        assert!((30000..=30009).contains(&udp.external_port));
        assert_eq!(udp.lifetime_s, 120, "60 s is clamped to min_lifetime");
        let tcp = map(&mut e, ask(MappingProtocol::NatPmp, A, Protocols::Tcp, 0)).unwrap();
        assert_eq!(tcp.external_port, udp.external_port);
        let port = udp.external_port;
        assert_eq!(
            fake.held(),
            [
                format!("198.51.100.1:{port}/tcp -> 10.200.0.2:{port}"),
                format!("198.51.100.1:{port}/udp -> 10.200.0.2:{port}"),
            ]
        );
        // A renewal that wrote the maps would fail here.
        fake.0.lock().unwrap().fail_next_write = Some("a renewal must not write".into());
        let again = map(&mut e, ask(MappingProtocol::NatPmp, A, Protocols::Udp, 0)).unwrap();
        assert_eq!((again.external_port, again.renewed), (port, true));
        fake.0.lock().unwrap().fail_next_write = None;
    }

    #[test]
    fn the_internal_port_or_the_suggestion_is_kept_when_free_and_others_get_another() {
        let (mut e, _fake, _dir) = engine();
        let same = map(
            &mut e,
            ask(MappingProtocol::NatPmp, A, Protocols::Tcp, 30005),
        )
        .unwrap();
        assert_eq!(same.external_port, 30005);
        let mut suggested = ask(MappingProtocol::NatPmp, A, Protocols::Tcp, 8080);
        suggested.suggested_port = 30007;
        assert_eq!(map(&mut e, suggested).unwrap().external_port, 30007);
        // B asks for A's port: B gets another, and A's stays A's.
        let mut take = ask(MappingProtocol::NatPmp, B, Protocols::Tcp, 30005);
        take.suggested_port = 30005;
        let b = map(&mut e, take).unwrap();
        assert_ne!(b.external_port, 30005);
        // B deleting its 30005 (its own mapping), then all its TCP mappings, leaves A's
        // alone.
        let mut delete = ask(MappingProtocol::NatPmp, B, Protocols::Tcp, 30005);
        delete.lifetime_s = 0;
        assert_eq!(
            map(&mut e, delete.clone()).unwrap().deleted,
            vec![b.id.unwrap()]
        );
        delete.internal_port = 0;
        assert_eq!(map(&mut e, delete).unwrap().deleted, Vec::<u64>::new());
        let a_again = map(
            &mut e,
            ask(MappingProtocol::NatPmp, A, Protocols::Tcp, 30005),
        )
        .unwrap();
        assert_eq!((a_again.external_port, a_again.renewed), (30005, true));
    }

    #[test]
    fn quota_nonces_and_strangers_are_refused_with_their_rule() {
        let (mut e, fake, _dir) = engine();
        // ports_per_owner = 3, and each client is its own owner (tunnel:IP).
        for port in [40001, 40002, 40003] {
            map(
                &mut e,
                ask(MappingProtocol::NatPmp, A, Protocols::Udp, port),
            )
            .unwrap();
        }
        let over = map(
            &mut e,
            ask(MappingProtocol::NatPmp, A, Protocols::Udp, 40004),
        )
        .unwrap_err();
        assert_eq!(over.rule, Some("policy.ports_per_owner"));
        assert!(
            map(
                &mut e,
                ask(MappingProtocol::NatPmp, B, Protocols::Udp, 40004)
            )
            .is_ok()
        );

        let mut pcp = ask(MappingProtocol::Pcp, B, Protocols::Tcp, 5000);
        pcp.nonce = Some([1; 12]);
        let made = map(&mut e, pcp.clone()).unwrap();
        let mut other_nonce = pcp.clone();
        other_nonce.nonce = Some([2; 12]);
        assert_eq!(
            map(&mut e, other_nonce.clone()).unwrap_err().rule,
            Some(NOT_YOURS)
        );
        other_nonce.lifetime_s = 0;
        assert_eq!(map(&mut e, other_nonce).unwrap_err().rule, Some(NOT_YOURS));
        let natpmp = ask(MappingProtocol::NatPmp, B, Protocols::Tcp, 5000);
        assert_eq!(map(&mut e, natpmp).unwrap_err().rule, Some(NOT_YOURS));
        pcp.lifetime_s = 0;
        assert_eq!(map(&mut e, pcp).unwrap().deleted, vec![made.id.unwrap()]);
        assert!(!fake.held().iter().any(|r| r.contains(":5000")));

        let stranger = ask(
            MappingProtocol::NatPmp,
            [192, 0, 2, 7],
            Protocols::Tcp,
            5000,
        );
        assert_eq!(map(&mut e, stranger).unwrap_err().rule, Some(NOT_A_CLIENT));
    }

    #[test]
    fn a_description_becomes_the_note_only_if_the_api_would_take_it() {
        let (mut e, _fake, _dir) = engine();
        let mut named = ask(MappingProtocol::Upnp, A, Protocols::Tcp, 30001);
        named.description = Some("my web server".into());
        let id = map(&mut e, named).unwrap().id.unwrap();
        assert_eq!(e.get(id).unwrap().note, "my web server");
        let mut spoof = ask(MappingProtocol::Upnp, A, Protocols::Tcp, 30002);
        spoof.description = Some("admin\u{202e}nimda".into());
        let id = map(&mut e, spoof).unwrap().id.unwrap();
        assert_eq!(e.get(id).unwrap().note, "upnp mapping for 10.200.0.2");
    }
}

/// Reserves `public` as a trigger rule of 10.200.0.2 on `on`; the answer.
fn trigger(e: &mut Engine, public: &str, on: &str, idle: Option<&str>) -> Result<Value, ApiError> {
    trigger_to(e, public, "10.200.0.2", on, idle)
}

/// Reserves `public` as a trigger rule of `to` on `on`; the answer.
fn trigger_to(
    e: &mut Engine,
    public: &str,
    to: &str,
    on: &str,
    idle: Option<&str>,
) -> Result<Value, ApiError> {
    e.handle(
        Request::Reserve(ReserveRequest {
            owner: "acct-1".into(),
            public: public.into(),
            to: to.into(),
            ttl: Some("10s".into()),
            ttl_seconds: None,
            note: None,
            trigger: Some(crate::api::types::TriggerRequest {
                on: on.into(),
                idle_timeout: idle.map(Into::into),
            }),
            limits: None,
        }),
        CALLER,
    )
}

/// The gates the fake maps have armed, and the gate each reservation's entries wait on.
fn gates(fake: &FakeDataPlane) -> (Vec<u16>, Vec<u16>) {
    let c = fake.0.lock().unwrap();
    (
        c.triggers.keys().copied().collect(),
        c.tags.values().map(|t| t.gate).collect(),
    )
}

#[test]
fn a_trigger_rule_is_a_reservation_behind_its_own_gate_in_every_change() {
    let (mut e, fake, dir) = engine();
    let made = trigger(&mut e, "198.51.100.1:30000/both", "6000/udp", Some("30s")).unwrap();
    let id = made["id"].as_u64().unwrap();
    assert_eq!(made["trigger"]["on"], "6000/udp");
    assert_eq!(made["trigger"]["idle_timeout_ms"], 30_000);
    assert_eq!(made["trigger"]["state"], "armed");
    assert_eq!(gates(&fake), (vec![1], vec![1]));
    let rule = fake.0.lock().unwrap().triggers[&1];
    assert_eq!(rule.client, "10.200.0.2".parse::<Ipv4Addr>().unwrap());
    assert_eq!(rule.idle_timeout, Duration::from_secs(30));

    // Refused, changing nothing: the same client's trigger port again, a bad rule, and one
    // wider than max_range_ports.
    for (on, idle, why) in [
        ("6000/udp", None, Failure::Conflict),
        ("6000-6001/both", None, Failure::Conflict),
        ("6000/udp:", None, Failure::BadRequest),
        ("6001/udp", Some("0s"), Failure::BadRequest),
        ("6001/udp", Some("2d"), Failure::BadRequest),
        ("6001/udp", Some("soon"), Failure::BadRequest),
    ] {
        let refused = trigger(&mut e, "198.51.100.1:30001/tcp", on, idle).unwrap_err();
        assert_eq!(refused.kind, why, "{on} {idle:?}: {}", refused.message);
    }
    let wide = trigger(&mut e, "198.51.100.1:30001/tcp", "6001-6100/udp", None).unwrap_err();
    assert_eq!(wide.rule, Some("policy.max_range_ports"));
    assert_eq!(fake.held().len(), 1);
    // Another client's rule on the same trigger port is its own, with the next gate.
    let other = e
        .handle(
            Request::Reserve(ReserveRequest {
                owner: "acct-2".into(),
                public: "198.51.100.1:30002/udp".into(),
                to: "10.200.0.3".into(),
                ttl: None,
                ttl_seconds: None,
                note: None,
                trigger: Some(crate::api::types::TriggerRequest {
                    on: "6000/udp".into(),
                    idle_timeout: None,
                }),
                limits: None,
            }),
            CALLER,
        )
        .unwrap();
    assert_eq!(other["trigger"]["idle_timeout_ms"], 120_000, "the default");
    assert_eq!(gates(&fake).0, vec![1, 2]);
    let other = other["id"].as_u64().unwrap();
    e.handle(Request::Release(other), CALLER).unwrap();
    assert_eq!(gates(&fake), (vec![1], vec![1]));

    // Disabled: out of the maps, rule and all; enabled: behind its gate again.
    e.handle(Request::SetEnabled { id, enabled: false }, CALLER)
        .unwrap();
    assert_eq!(gates(&fake), (vec![], vec![]));
    let listed = e.handle(Request::Get(id), CALLER).unwrap();
    assert_eq!(listed["trigger"]["state"], "off", "{listed}");
    e.handle(Request::SetEnabled { id, enabled: true }, CALLER)
        .unwrap();
    assert_eq!(gates(&fake), (vec![1], vec![1]));

    // The kernel opened it: the engine audits the opening with its packet, then the closing.
    fake.0.lock().unwrap().open.insert(1);
    fake.0.lock().unwrap().openings.push(Opening {
        gate: 1,
        at_ns: crate::kernel::trigger::monotonic_ns(),
        previous_expires_ns: 0,
        protocol: Protocols::Udp,
        source: "10.200.0.2:5555".parse().unwrap(),
        destination: "203.0.113.9:6000".parse().unwrap(),
    });
    e.tick();
    assert_eq!(
        e.handle(Request::Get(id), CALLER).unwrap()["trigger"]["state"],
        "open"
    );
    fake.0.lock().unwrap().open.clear();
    e.tick();
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    let actions: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["action"].as_str().unwrap().starts_with("trigger-"))
        .collect();
    assert_eq!(actions.len(), 2, "{audit}");
    assert_eq!(actions[0]["action"], "trigger-open");
    assert_eq!(actions[0]["reservation"]["by"]["source"], "10.200.0.2:5555");
    assert_eq!(actions[1]["action"], "trigger-close");

    // Expired and restored: a trigger rule again, never a reservation that is always open.
    e.clock.advance(11_000);
    e.tick();
    assert_eq!(gates(&fake), (vec![], vec![]));
    let back = e
        .handle(
            Request::Restore {
                id,
                ttl: Some("1h".into()),
            },
            CALLER,
        )
        .unwrap();
    assert_eq!(back["id"], json!(id));
    assert_eq!(gates(&fake), (vec![1], vec![1]));
    let got = e.handle(Request::Get(id), CALLER).unwrap();
    assert_eq!(got["trigger"]["on"], "6000/udp", "{got}");

    // A reconcile rearms a rule the maps lost, and leaves a whole one as it is.
    fake.0.lock().unwrap().triggers.clear();
    let report = e.reconcile(ReconcileGuard::REPAIR).unwrap();
    assert_eq!(report.drifts, 1);
    assert_eq!(gates(&fake), (vec![1], vec![1]));
    assert_eq!(e.reconcile(ReconcileGuard::REPAIR).unwrap().drifts, 0);
}

/// An opening as the trigger program reports it: gate `gate`, opened by `source`.
fn opening(gate: u16, source: &str) -> Opening {
    Opening {
        gate,
        at_ns: crate::kernel::trigger::monotonic_ns(),
        previous_expires_ns: 0,
        protocol: Protocols::Udp,
        source: source.parse().unwrap(),
        destination: "203.0.113.9:6000".parse().unwrap(),
    }
}

fn trigger_audit(dir: &std::path::Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["action"].as_str().unwrap().starts_with("trigger-"))
        .map(|l| {
            (
                l["action"].as_str().unwrap().to_string(),
                l["reservation"]["id"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_gate_is_not_handed_on_while_watched_and_reports_are_the_rule_s_own() {
    let (mut e, fake, dir) = engine();
    let id = |v: Value| v["id"].as_u64().unwrap();
    let a = id(trigger(&mut e, "198.51.100.1:30000/tcp", "6000/udp", None).unwrap());
    fake.0.lock().unwrap().open.insert(1);
    fake.0
        .lock()
        .unwrap()
        .openings
        .push(opening(1, "10.200.0.2:5555"));
    e.tick();
    assert_eq!(trigger_audit(&dir), vec![("trigger-open".to_string(), a)]);

    // Released while open: the next rule gets another gate, so no report of the old rule's
    // can be taken for it, and the old rule's closing is audited as its own.
    e.handle(Request::Release(a), CALLER).unwrap();
    let b = id(trigger(&mut e, "198.51.100.1:30001/tcp", "6000/udp", None).unwrap());
    assert_eq!(gates(&fake).0, vec![2]);
    e.tick();
    assert_eq!(
        trigger_audit(&dir),
        vec![
            ("trigger-open".to_string(), a),
            ("trigger-close".to_string(), a)
        ]
    );
    // A report on b's gate whose source is not b's client is not b's.
    fake.0
        .lock()
        .unwrap()
        .openings
        .push(opening(2, "10.200.0.9:5555"));
    e.tick();
    assert_eq!(trigger_audit(&dir).len(), 2);
    // The gate is free again once its closing is audited.
    let c = trigger_to(
        &mut e,
        "198.51.100.1:30002/tcp",
        "10.200.0.3",
        "6000/udp",
        None,
    )
    .unwrap();
    assert_eq!(gates(&fake).0, vec![1, 2], "{c}");

    // Retargeting b onto a client that already triggers on 6000/udp is refused, and changes
    // nothing; onto one that does not, the rule follows (closed until its new client asks).
    let clash = change(&mut e, b, Some("10.200.0.3"), None, None).unwrap_err();
    assert_eq!(clash.kind, Failure::Conflict, "{}", clash.message);
    change(&mut e, b, Some("10.200.0.4"), None, None).unwrap();
    let rules = fake.0.lock().unwrap().triggers.clone();
    assert_eq!(rules[&2].client, "10.200.0.4".parse::<Ipv4Addr>().unwrap());
    assert_eq!(gates(&fake).0, vec![1, 2]);
}

#[test]
fn a_released_port_is_quarantined_from_other_owners_and_who_names_its_holder() {
    let (mut e, _fake, _dir) = engine();
    e.policy.quarantine = Some(Duration::from_secs(3600));
    let a = reserve(
        &mut e,
        "acct-1",
        "198.51.100.1:30000/tcp",
        "10.200.0.2",
        None,
    )
    .unwrap();
    let a = a["id"].as_u64().unwrap();
    // Read after the reservation was made: the engine's clock runs on.
    let t0 = e.now_ms();
    e.clock.advance(60_000);
    e.handle(Request::Release(a), CALLER).unwrap();
    let released = e.now_ms();

    // Another owner: refused by name of the rule, until when; the same owner takes it back.
    let refused = reserve(
        &mut e,
        "acct-2",
        "198.51.100.1:30000/both",
        "10.200.0.3",
        None,
    )
    .unwrap_err();
    assert_eq!(
        refused.rule,
        Some("policy.quarantine"),
        "{}",
        refused.message
    );
    assert!(
        !refused.message.contains("acct-1"),
        "names no owner: {}",
        refused.message
    );
    let back = reserve(
        &mut e,
        "acct-1",
        "198.51.100.1:30000/tcp",
        "10.200.0.2",
        None,
    )
    .unwrap();
    e.clock.advance(1_000);
    e.handle(Request::Release(back["id"].as_u64().unwrap()), CALLER)
        .unwrap();
    // Automatic ports pass it by: nine other owners get the pool's nine other ports, and the
    // tenth finds none.
    for n in 0..9 {
        let got = reserve(
            &mut e,
            &format!("acct-{}", n + 10),
            "198.51.100.1/tcp",
            &format!("10.200.1.{}", n + 1),
            None,
        )
        .unwrap();
        assert_ne!(got["first_port"], 30000, "{got}");
    }
    let none = reserve(&mut e, "acct-30", "198.51.100.1/tcp", "10.200.2.1", None).unwrap_err();
    assert_eq!(none.rule, Some("policy.port_pool"), "{}", none.message);
    // After the quarantine, anyone.
    e.clock.advance(3_600_001);
    reserve(
        &mut e,
        "acct-2",
        "198.51.100.1:30000/tcp",
        "10.200.0.3",
        None,
    )
    .unwrap();

    // Who held it: acct-1 while reserved, nobody between its release and acct-2's
    // reservation, acct-2 now.
    let who = |e: &mut Engine, at_ms: u64| -> Vec<String> {
        let v = e
            .handle(
                Request::Who {
                    public: "198.51.100.1:30000/tcp".parse().unwrap(),
                    at_ms,
                },
                CALLER,
            )
            .unwrap();
        v["holders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["owner"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(who(&mut e, t0), vec!["acct-1"]);
    assert_eq!(
        who(&mut e, released + 500),
        vec!["acct-1"],
        "taken back by acct-1"
    );
    assert!(who(&mut e, released + 600_000).is_empty());
    let now = e.now_ms();
    assert_eq!(who(&mut e, now), vec!["acct-2"]);
    assert!(who(&mut e, t0 - 60_000).is_empty());
}

#[test]
fn winding_down_refuses_new_then_renewals_and_a_drain_runs_at_its_time() {
    let (mut e, fake, dir) = engine();
    let a = reserved(&mut e, "198.51.100.1:30000/tcp", Some("1h"));
    let b = reserve(
        &mut e,
        "acct-2",
        "198.51.100.1:30001/tcp",
        "10.200.0.3",
        Some("1h"),
    )
    .unwrap()["id"]
        .as_u64()
        .unwrap();
    e.policy.accept_new = false;
    let refused = reserve(
        &mut e,
        "acct-1",
        "198.51.100.1:30002/tcp",
        "10.200.0.4",
        None,
    )
    .unwrap_err();
    assert_eq!(
        refused.rule,
        Some("policy.accept_new"),
        "{}",
        refused.message
    );
    // Existing ones are kept and renewed, until renewals stop too.
    e.handle(Request::Renew { id: a, ttl: None }, CALLER)
        .unwrap();
    e.policy.accept_renewals = false;
    let renewal = e
        .handle(Request::Renew { id: a, ttl: None }, CALLER)
        .unwrap_err();
    assert_eq!(renewal.rule, Some("policy.accept_renewals"));

    // A drain of acct-1's in ten seconds: nothing before, acct-1's disabled at its time.
    let at =
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(e.now_ms() + 10_000))
            .to_string();
    let drain = e
        .handle(
            Request::Drain(crate::api::types::DrainRequest {
                at,
                owner: Some("acct-1".into()),
                release: false,
            }),
            CALLER,
        )
        .unwrap();
    assert_eq!(drain["action"], "disable");
    e.tick();
    assert_eq!(fake.held().len(), 2);
    assert_eq!(e.published_status()["drains"].as_array().unwrap().len(), 1);
    e.clock.advance(10_001);
    e.tick();
    assert_eq!(
        fake.held(),
        vec!["198.51.100.1:30001/tcp -> 10.200.0.3:30001"]
    );
    let drains = e.handle(Request::Drains, CALLER).unwrap();
    assert!(drains[0]["done"].is_string(), "{drains}");
    assert!(
        e.published_status()["drains"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // A release drain of everything; a cancelled one never runs.
    let later = |ms: u64| {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    };
    let cancelled = e
        .handle(
            Request::Drain(crate::api::types::DrainRequest {
                at: later(e.now_ms() + 1_000),
                owner: None,
                release: false,
            }),
            CALLER,
        )
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    e.handle(Request::CancelDrain(cancelled), CALLER).unwrap();
    assert_eq!(
        e.handle(Request::CancelDrain(cancelled), CALLER)
            .unwrap_err()
            .kind,
        Failure::NotFound
    );
    e.handle(
        Request::Drain(crate::api::types::DrainRequest {
            at: later(e.now_ms() + 2_000),
            owner: None,
            release: true,
        }),
        CALLER,
    )
    .unwrap();
    e.clock.advance(2_001);
    e.tick();
    assert!(fake.held().is_empty());
    assert_eq!(
        e.handle(Request::List(ListFilter::default()), CALLER)
            .unwrap(),
        json!([])
    );
    let bad = e
        .handle(
            Request::Drain(crate::api::types::DrainRequest {
                at: "tomorrow".into(),
                owner: None,
                release: false,
            }),
            CALLER,
        )
        .unwrap_err();
    assert_eq!(bad.kind, Failure::BadRequest);
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    let drained: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["actor"] == "pf serve" && l["reservation"]["drain"].is_u64())
        .collect();
    let actions: Vec<&str> = drained
        .iter()
        .map(|l| l["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["disable", "release", "release"], "{audit}");
    let _ = b;
}

/// Limits: the policy's for every reservation, lower where the request asks, an owner's in
/// place of the policy's; higher refused naming the rule; each with a slot of its own, armed
/// with the reservation and gone with it.
#[test]
fn a_reservation_gets_its_owners_limits_and_may_only_lower_them() {
    let (mut e, fake, _dir) = engine();
    e.reload(policy(
        r#"
public_ips = ["198.51.100.1"]
target_networks = ["10.200.0.0/16"]
port_pool = ["30000-30009"]
forbid_listening_ports = false
[policy.limits]
packets_per_second = 1000
bits_per_second = "10M"
[policy.owner_limits.acct-2]
"#,
    ))
    .unwrap();
    use crate::api::types::{LimitsRequest, RateValue};
    let ask = |e: &mut Engine, owner: &str, public: &str, limits: Option<LimitsRequest>| {
        e.handle(
            Request::Reserve(ReserveRequest {
                owner: owner.into(),
                public: public.into(),
                to: "10.200.0.2".into(),
                ttl: None,
                ttl_seconds: None,
                note: None,
                trigger: None,
                limits,
            }),
            CALLER,
        )
    };
    let plain = ask(&mut e, "acct-1", "198.51.100.1:30000/tcp", None).unwrap();
    assert_eq!(plain["limits"]["packets_per_second"], 1000, "{plain}");
    assert_eq!(plain["limits"]["bits_per_second"], 10_000_000);
    let lower = LimitsRequest {
        packets_per_second: Some(RateValue::Text("500".into())),
        allow: Some(vec!["192.0.2.7".into()]),
        ..LimitsRequest::default()
    };
    let lowered = ask(&mut e, "acct-1", "198.51.100.1:30001/tcp", Some(lower)).unwrap();
    assert_eq!(lowered["limits"]["packets_per_second"], 500);
    assert_eq!(lowered["limits"]["allow"][0], "192.0.2.7/32");
    let higher = LimitsRequest {
        bits_per_second: Some(RateValue::Text("1G".into())),
        ..LimitsRequest::default()
    };
    let refused = ask(
        &mut e,
        "acct-1",
        "198.51.100.1:30002/tcp",
        Some(higher.clone()),
    )
    .unwrap_err();
    assert_eq!(refused.rule, Some("policy.limits"), "{}", refused.message);
    assert!(
        refused.message.contains("bits_per_second"),
        "{}",
        refused.message
    );
    let bad = LimitsRequest {
        syns_per_second: Some(RateValue::Text("fast".into())),
        ..LimitsRequest::default()
    };
    let refused = ask(&mut e, "acct-1", "198.51.100.1:30002/tcp", Some(bad)).unwrap_err();
    assert_eq!(refused.kind, Failure::BadRequest, "{}", refused.message);
    // acct-2's limits are its own: none, and so no ceiling either.
    let free = ask(&mut e, "acct-2", "198.51.100.1:30003/tcp", Some(higher)).unwrap();
    assert_eq!(free["limits"]["bits_per_second"], 1_000_000_000);
    let none = ask(&mut e, "acct-2", "198.51.100.1:30004/tcp", None).unwrap();
    assert!(none.get("limits").is_none(), "{none}");
    assert_eq!(fake.held().len(), 4);
    {
        let c = fake.0.lock().unwrap();
        assert_eq!(c.limits.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    }
    // An owner change keeps the limits when the new owner's policy would give them (acct-2
    // has no ceiling, so stricter limits stand), and is refused, naming the rule, when it
    // would lift or add any.
    let id = plain["id"].as_u64().unwrap();
    let free_id = free["id"].as_u64().unwrap();
    let moved = change(&mut e, id, None, Some("acct-2"), None).unwrap();
    assert_eq!(moved["limits"]["packets_per_second"], 1000, "{moved}");
    let refused = change(&mut e, free_id, None, Some("acct-1"), None).unwrap_err();
    assert_eq!(refused.rule, Some("policy.limits"), "{}", refused.message);
    assert!(
        refused.message.contains("above owner acct-1's"),
        "{}",
        refused.message
    );
    let none_id = none["id"].as_u64().unwrap();
    let refused = change(&mut e, none_id, None, Some("acct-1"), None).unwrap_err();
    assert!(
        refused.message.contains("are not owner acct-1's"),
        "{}",
        refused.message
    );
    e.handle(Request::Release(id), CALLER).unwrap();
    {
        let c = fake.0.lock().unwrap();
        assert_eq!(c.limits.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
    }
    // Two reservations left sharing a slot (a crash between a restore and its new slot) are
    // separated by the next reconcile, the lower id keeping it.
    let lowered_id = lowered["id"].as_u64().unwrap();
    e.store.set_limit_slot(free_id, 2).unwrap();
    e.reconcile(ReconcileGuard {
        force: true,
        store_was_new: false,
        removal_limit: 1.0,
    })
    .unwrap();
    let slots = e.store.all_limits().unwrap();
    assert_eq!(slots[&lowered_id].slot, 2);
    assert_eq!(slots[&free_id].slot, 1);
    let c = fake.0.lock().unwrap();
    assert_eq!(c.limits.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
}
