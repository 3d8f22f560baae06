//! The store's tests: one suite, run on both backends (an SQLite file, and a database on a
//! real PostgreSQL server started for the test process), and SQLite's own.

use std::net::Ipv4Addr;

use super::{sql::Conn, *};
use crate::testing::postgres::shared;

/// A store to test: opened (again) on the same data each time.
trait Backend<C: Conn> {
    fn open(&self) -> SqlStore<C>;
}

struct SqliteFile {
    dir: std::path::PathBuf,
}

impl SqliteFile {
    fn new(tag: &str) -> Self {
        let (dir, _) = scratch(tag);
        Self { dir }
    }
}

impl Backend<sqlite::SqliteConn> for SqliteFile {
    fn open(&self) -> SqliteStore {
        SqliteStore::open(&self.dir.join("pf.db")).unwrap()
    }
}

impl Drop for SqliteFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct PostgresDatabase(PostgresLocation);

impl PostgresDatabase {
    /// A new database on the test process's server; `None` (the test is skipped, saying so)
    /// only where no PostgreSQL is installed and this is not CI, which must run it.
    fn new(name: &str) -> Option<Self> {
        let made = shared().and_then(|server| server.database(name));
        match made {
            Ok(url) => Some(Self(PostgresLocation::parse(&url, None).unwrap())),
            Err(e) if std::env::var("CI").as_deref() != Ok("true") && !installed() => {
                eprintln!("SKIPPED {name} on PostgreSQL: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn installed() -> bool {
    std::path::Path::new("/usr/lib/postgresql").exists()
}

impl Backend<postgresql::PgConn> for PostgresDatabase {
    fn open(&self) -> PostgresStore {
        PostgresStore::open(&self.0).unwrap()
    }
}

/// Each test, on both backends.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[test]
            fn $test() {
                super::$test(&super::SqliteFile::new(stringify!($test)));
            })*
        }
        mod on_postgres {
            $(#[test]
            fn $test() {
                if let Some(db) = super::PostgresDatabase::new(stringify!($test)) {
                    super::$test(&db);
                }
            })*
        }
    };
}

on_both_backends!(
    records_round_trip_and_ids_are_never_reused,
    overlaps_ports_quota_and_expiry,
    expired_records_stay_restorable_until_purged,
    who_held_a_port_and_when,
    a_bad_row_is_reported_not_trusted,
);

fn new(owner: &str, public: &str, to: &str) -> NewRecord {
    NewRecord {
        owner: owner.into(),
        reservation: Reservation::new(public.parse().unwrap(), to.parse().unwrap()).unwrap(),
        created_ms: 1_000,
        ttl_ms: None,
        expires_ms: None,
        enabled: true,
        note: String::new(),
    }
}

fn range(first: u16, last: u16) -> PortRange {
    PortRange { first, last }
}

/// A fresh directory for a store file: (the directory, the file's path).
fn scratch(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("pf-store-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pf.db");
    (dir, path)
}

fn records_round_trip_and_ids_are_never_reused<C: Conn>(backend: &impl Backend<C>) {
    let mut store = backend.open();
    let mut a = new("acct-1", "198.51.100.1:8810-8815/both", "10.8.0.2:9810");
    a.ttl_ms = Some(60_000);
    a.expires_ms = Some(61_000);
    a.note = "seedbox".into();
    let a = store.insert(&a).unwrap();
    let b = store
        .insert(&new("acct-2", "198.51.100.1:80/tcp", "10.8.0.3"))
        .unwrap();
    assert!(store.delete(b.id).unwrap());
    assert!(!store.delete(b.id).unwrap());
    drop(store);
    // Reopened: what was committed is there, and a new id is past the deleted one.
    let mut store = backend.open();
    assert_eq!(store.list(None).unwrap(), vec![a.clone()]);
    assert_eq!(store.get(a.id).unwrap(), Some(a.clone()));
    let c = store
        .insert(&new("acct-2", "198.51.100.1:81/tcp", "10.8.0.3"))
        .unwrap();
    assert!(c.id > b.id);
    assert_eq!(store.list(Some("acct-2")).unwrap(), vec![c]);
}

#[test]
fn a_version_2_store_gains_the_traffic_table_and_keeps_its_records() {
    let (dir, path) = scratch("v2");
    let mut store = SqliteStore::open(&path).unwrap();
    let a = store
        .insert(&new("acct-1", "198.51.100.1:80/tcp", "10.8.0.3"))
        .unwrap();
    // What the previous pf wrote: no traffic table, version 2.
    store.conn.0.execute_batch("DROP TABLE traffic").unwrap();
    store.conn.0.pragma_update(None, "user_version", 2).unwrap();
    drop(store);
    let mut store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.list(None).unwrap(), vec![a.clone()]);
    let t = Traffic {
        in_packets: 3,
        in_bytes: 300,
        out_packets: 2,
        out_bytes: 200,
    };
    store.add_traffic(a.id, t).unwrap();
    store.add_traffic(a.id, t).unwrap();
    assert_eq!(store.traffic(a.id).unwrap(), t + t);
    assert!(store.delete(a.id).unwrap());
    assert_eq!(store.traffic(a.id).unwrap(), Traffic::default());
    let _ = std::fs::remove_dir_all(&dir);
}

fn overlaps_ports_quota_and_expiry<C: Conn>(backend: &impl Backend<C>) {
    let mut store = backend.open();
    let mut a = new("acct-1", "198.51.100.1:8810-8815/tcp", "10.8.0.2:9810");
    a.expires_ms = Some(5_000);
    let a = store.insert(&a).unwrap();
    let pub_ip: Ipv4Addr = "198.51.100.1".parse().unwrap();
    let target: Ipv4Addr = "10.8.0.2".parse().unwrap();
    // Public side: the range's edges overlap, next to it does not, nor udp.
    for (ports, protocols, hit) in [
        (range(8815, 8820), Protocols::Tcp, true),
        (range(8800, 8810), Protocols::Both, true),
        (range(8816, 8816), Protocols::Tcp, false),
        (range(8809, 8809), Protocols::Tcp, false),
        (range(8812, 8812), Protocols::Udp, false),
    ] {
        let found = store.public_overlap(pub_ip, ports, protocols).unwrap();
        assert_eq!(found.is_some(), hit, "{ports} {protocols}");
    }
    assert!(
        store
            .public_overlap(
                "198.51.100.2".parse().unwrap(),
                range(8810, 8810),
                Protocols::Tcp
            )
            .unwrap()
            .is_none()
    );
    // Target side covers 9810-9815.
    for (ports, hit) in [
        (range(9815, 9815), true),
        (range(9700, 9810), true),
        (range(9816, 9900), false),
    ] {
        let found = store
            .target_overlap(target, ports, Protocols::Tcp, None)
            .unwrap();
        assert_eq!(found.map(|r| r.id), hit.then_some(a.id), "{ports}");
    }
    store
        .insert(&new("acct-1", "198.51.100.1:7000/both", "10.8.0.2"))
        .unwrap();
    assert_eq!(store.owner_ports("acct-1").unwrap(), 7);
    assert_eq!(store.owner_ports("nobody").unwrap(), 0);
    assert_eq!(store.count().unwrap(), 2);
    assert_eq!(
        store.used_public_ports(pub_ip, Protocols::Udp).unwrap(),
        vec![range(7000, 7000)]
    );
    assert_eq!(store.next_expiry().unwrap(), Some(5_000));
    assert!(store.expired(4_999).unwrap().is_empty());
    assert_eq!(store.expired(5_000).unwrap(), vec![a.clone()]);
    assert!(store.set_lifetime(a.id, Some(1), Some(9_000)).unwrap());
    assert!(store.expired(5_000).unwrap().is_empty());
    assert!(store.set_enabled(a.id, false).unwrap());
    assert!(!store.get(a.id).unwrap().unwrap().enabled);
}

fn expired_records_stay_restorable_until_purged<C: Conn>(backend: &impl Backend<C>) {
    let mut store = backend.open();
    let mut a = new("acct-1", "198.51.100.1:8810/tcp", "10.8.0.2");
    a.ttl_ms = Some(1_000);
    a.expires_ms = Some(2_000);
    let a = store.insert(&a).unwrap();
    assert!(store.expire(a.id, 2_001).unwrap());
    assert!(!store.expire(a.id, 2_002).unwrap(), "expired twice");
    assert_eq!(store.get(a.id).unwrap(), None);
    assert_eq!(store.count().unwrap(), 0);
    assert_eq!(store.history(None).unwrap(), vec![(a.clone(), 2_001)]);
    assert_eq!(store.history(Some("acct-2")).unwrap(), vec![]);
    // Restored under its id, with the new lifetime.
    let back = store
        .restore(a.id, Some(5_000), Some(9_000), 4_000)
        .unwrap()
        .unwrap();
    assert_eq!((back.id, back.expires_ms), (a.id, Some(9_000)));
    assert!(store.history(None).unwrap().is_empty());
    assert_eq!(store.restore(a.id, None, None, 4_000).unwrap(), None);
    store.expire(a.id, 3_000).unwrap();
    assert_eq!(store.purge_history(3_000).unwrap(), 0);
    assert_eq!(store.purge_history(3_001).unwrap(), 1);
    assert!(store.history(None).unwrap().is_empty());
}

fn who_held_a_port_and_when<C: Conn>(backend: &impl Backend<C>) {
    let mut store = backend.open();
    let addr = Ipv4Addr::new(198, 51, 100, 1);
    let who = |store: &SqlStore<C>, port: u16, at: u64| -> Vec<(String, Option<u64>)> {
        store
            .who(addr, port, Protocols::Tcp, at)
            .unwrap()
            .into_iter()
            .map(|h| (h.owner, h.until_ms))
            .collect()
    };
    let mut a = new("acct-1", "198.51.100.1:8810-8812/tcp", "10.8.0.2");
    a.created_ms = 1_000;
    let a = store.insert(&a).unwrap();
    assert_eq!(who(&store, 8811, 999), vec![], "before it was made");
    assert_eq!(who(&store, 8811, 1_000), vec![("acct-1".into(), None)]);
    // Given to another owner at 2,000: each held it for their own time.
    store
        .change(a.id, "acct-2", &a.reservation, "", 2_000)
        .unwrap();
    assert_eq!(
        who(&store, 8812, 1_500),
        vec![("acct-1".into(), Some(2_000))]
    );
    assert_eq!(who(&store, 8812, 2_000), vec![("acct-2".into(), None)]);
    // A change that keeps the owner records nothing.
    store
        .change(a.id, "acct-2", &a.reservation, "note", 2_500)
        .unwrap();
    assert_eq!(who(&store, 8812, 2_400), vec![("acct-2".into(), None)]);
    // Expired at 3,000, restored at 4,000: nobody in between.
    store.expire(a.id, 3_000).unwrap();
    assert_eq!(who(&store, 8810, 3_500), vec![]);
    store.restore(a.id, None, None, 4_000).unwrap();
    assert_eq!(who(&store, 8810, 3_500), vec![]);
    assert_eq!(who(&store, 8810, 4_000), vec![("acct-2".into(), None)]);
    // Released at 5,000; other ports, protocols and addresses were never held.
    assert!(store.end(a.id, 5_000).unwrap());
    assert_eq!(
        who(&store, 8810, 4_500),
        vec![("acct-2".into(), Some(5_000))]
    );
    assert_eq!(who(&store, 8810, 5_000), vec![]);
    assert_eq!(who(&store, 8813, 4_500), vec![]);
    assert!(
        store
            .who(addr, 8810, Protocols::Udp, 4_500)
            .unwrap()
            .is_empty()
    );
    let owners = |since| -> Vec<String> {
        store
            .recent_holders(addr, PortRange::single(8811), Protocols::Both, since)
            .unwrap()
            .into_iter()
            .map(|h| h.owner)
            .collect()
    };
    assert_eq!(owners(2_999), vec!["acct-2", "acct-2"]);
    assert_eq!(owners(4_999), vec!["acct-2"]);
    assert_eq!(owners(5_001), Vec::<String>::new());
    assert_eq!(store.purge_holders(3_001).unwrap(), 2);
    assert_eq!(who(&store, 8812, 1_500), vec![], "purged");
    assert_eq!(store.purge_holders(u64::MAX >> 1).unwrap(), 1);
}

fn a_bad_row_is_reported_not_trusted<C: Conn>(backend: &impl Backend<C>) {
    let store = backend.open();
    store
        .conn
        .execute(
            "planting a bad row",
            "INSERT INTO reservations (owner, public_ip, first_port, last_port, protocols, \
             target_ip, target_first_port, created_ms, enabled, note) \
             VALUES ('x', '198.51.100', 80, 80, 1, '10.8.0.2', 80, 0, 1, '')",
            &[],
        )
        .unwrap();
    let err = store.list(None).unwrap_err().to_string();
    assert!(err.contains("address '198.51.100'"), "{err}");
}

/// On a shared store, a fleet-wide record (`fleet:PORT`) holds its port on every server's
/// address, a request for fleet-wide ports meets every record, and the transaction that
/// stores a record checks again (under the fleet's lock) and refuses ports taken meanwhile.
#[test]
fn on_a_shared_store_a_fleet_wide_port_is_taken_everywhere() {
    let Some(db) = PostgresDatabase::new("fleet_wide_ports") else {
        return;
    };
    let mut store = db.open();
    let a = Ipv4Addr::new(198, 18, 0, 1);
    let b = Ipv4Addr::new(198, 18, 1, 1);
    let fleet = store
        .insert(&new("acct-1", "fleet:8080/tcp", "10.8.0.2:80"))
        .unwrap();
    for addr in [a, b] {
        let found = store
            .public_overlap(addr, range(8080, 8080), Protocols::Tcp)
            .unwrap();
        assert_eq!(found.map(|r| r.id), Some(fleet.id), "{addr}");
        assert_eq!(
            store.used_public_ports(addr, Protocols::Tcp).unwrap(),
            vec![range(8080, 8080)]
        );
    }
    let on_b = store
        .insert(&new("acct-2", "198.18.1.1:9000/tcp", "10.8.0.3:80"))
        .unwrap();
    assert!(
        store
            .public_overlap(a, range(9000, 9000), Protocols::Tcp)
            .unwrap()
            .is_none(),
        "a server's own port is its own"
    );
    let found = store
        .public_overlap(
            crate::domain::spec::FLEET,
            range(9000, 9000),
            Protocols::Tcp,
        )
        .unwrap();
    assert_eq!(found.map(|r| r.id), Some(on_b.id));
    // Stored anyway, the check in the transaction refuses it and stores nothing.
    for (spec, by) in [
        ("198.18.0.1:8080/tcp", fleet.id),
        ("fleet:9000/both", on_b.id),
    ] {
        match store.insert(&new("acct-3", spec, "10.8.0.4:80")) {
            Err(StoreError::Taken { by: got, .. }) => assert_eq!(got, by, "{spec}"),
            other => panic!("{spec}: {other:?}"),
        }
    }
    assert_eq!(store.count().unwrap(), 2);
    assert!(store.fleet_version().unwrap().unwrap() >= 2);
}

/// A store of one server's own has no fleet: no change counter, no agents.
#[test]
fn a_store_of_ones_own_has_no_fleet() {
    let mut store = SqliteStore::in_memory().unwrap();
    assert_eq!(store.fleet_version().unwrap(), None);
    let me = crate::service::fleet::Agent {
        name: "solo".into(),
        public_ips: vec![Ipv4Addr::new(198, 51, 100, 1)],
        seen_ms: 1,
    };
    assert!(store.register_agent(&me).unwrap().is_empty());
}
