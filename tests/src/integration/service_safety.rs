//! The holes a red-team pass found in `pf serve`, each closed and kept closed with the real
//! service, the real kernel and real faults: a reservation aimed at the server itself, two
//! services on one pin directory, pins that outlived what they pinned, idle connections, an
//! audit log or a store on a full disk, a store gone missing, a clock stepped forward,
//! SIGHUP, malformed requests and look-alike owners, a closed pipe, and the socket's group.

use std::{
    io::Read,
    os::{fd::FromRawFd, unix::fs::PermissionsExt, unix::net::UnixStream},
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use pf::{
    api::client::Client,
    domain::spec::Reservation,
    kernel::state::State,
    service::store::{NewRecord, SqliteStore, Store},
};
use pf_common::map_names;
use serde_json::{Value, json};

use crate::{
    kit::ScratchDir,
    kit::serve::{Service, TEST_POLICY, config_text},
    kit::topology::{CLIENT_IP, PUBLIC_IFACE, Topology},
};

use super::common::{TempPinDir, pf, pf_bin, pf_in_ns, pf_list, pf_ok, require_root};

/// The service files of `dir`'s own `pf serve`, whose socket the `pf` runs of the tests use.
fn files_of(dir: &TempPinDir) -> ScratchDir {
    ScratchDir::claim(dir.socket().parent().unwrap())
}

fn with_interface(policy: &str) -> String {
    format!("[[interfaces]]\nname = \"{PUBLIC_IFACE}\"\n{policy}")
}

/// A reserve call through the API: (HTTP status, body).
fn reserve(service: &Service, owner: &str, public: &str, to: &str) -> Result<Value, String> {
    Client::new(&service.socket())
        .call(
            "POST",
            "/v1/reservations",
            Some(&json!({ "owner": owner, "public": public, "to": to })),
        )
        .map_err(|e| e.to_string())
}

/// The reservations in the kernel maps, as text.
fn in_maps(dir: &TempPinDir) -> Vec<String> {
    let state = State::open_for_read(&dir.dir).unwrap().expect("pf's maps");
    state
        .list()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// A record as a store written before this service (or by hand) would hold it.
fn record(
    owner: &str,
    public: &str,
    to: &str,
    expires_ms: Option<u64>,
    enabled: bool,
) -> NewRecord {
    NewRecord {
        owner: owner.into(),
        reservation: Reservation::new(public.parse().unwrap(), to.parse().unwrap()).unwrap(),
        created_ms: 0,
        ttl_ms: expires_ms,
        expires_ms,
        enabled,
        note: String::new(),
    }
}

/// A small tmpfs mounted for one test (a disk that can be filled), unmounted on drop.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn new(name: &str, size: &str) -> Self {
        let path = std::env::temp_dir().join(format!("pf-disk-{}-{name}", std::process::id()));
        let _ = Command::new("umount")
            .arg(&path)
            .stderr(Stdio::null())
            .status();
        std::fs::create_dir_all(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs at {}", path.display());
        Self { path }
    }

    /// Writes a filler file until the disk is full.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.path.join("filler")).unwrap();
        let block = vec![0u8; 4096];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
    }

    fn remount(&self, mode: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "remounting {} {mode}",
            self.path.display()
        );
    }

    fn free(&self) {
        std::fs::remove_file(self.path.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

#[test]
fn a_reservation_never_targets_the_server_itself() {
    require_root();
    let dir = TempPinDir::new();
    let topo = Topology::new(&format!("pf{}self", std::process::id())).unwrap();
    // The server's tunnel address is 10.8.0.1/24; the tunnel networks are 10.8.0.0/16.
    let mut service = dir.serve_with(Some(&topo.server), &with_interface(TEST_POLICY));
    for (to, needle) in [
        (
            "10.8.0.1:7777",
            "10.8.0.1 is an address of this server (tun0)",
        ),
        ("198.51.100.1:7777", "is outside the tunnel networks"),
        (
            "10.8.0.255",
            "10.8.0.255 is the broadcast address of 10.8.0.0/24 (subnet of tun0)",
        ),
        ("10.8.0.0", "10.8.0.0 is the network address of 10.8.0.0/16"),
        (
            "10.8.255.255",
            "10.8.255.255 is the broadcast address of 10.8.0.0/16",
        ),
    ] {
        let e = reserve(&service, "acct-1", "198.51.100.1:30001/both", to).unwrap_err();
        assert!(e.contains(needle), "{to}: {e}");
    }
    assert_eq!(pf_list(&dir), json!([]));
    assert!(in_maps(&dir).is_empty());
    reserve(&service, "acct-1", "198.51.100.1:30001/tcp", "10.8.0.2:80").unwrap();
    // An address the server takes while the service runs is refused at once: the addresses
    // are read at each reservation, not once.
    topo.server
        .run(&["ip", "addr", "add", "10.8.0.50/24", "dev", "tun0"])
        .unwrap();
    let e = reserve(&service, "acct-1", "198.51.100.1:30003/tcp", "10.8.0.50").unwrap_err();
    assert!(
        e.contains("10.8.0.50 is an address of this server (tun0)"),
        "{e}"
    );

    // A reservation made before the rule (written into the store behind the service's back)
    // is disabled at the next start, reported and audited, and kept out of the maps.
    service.stop();
    let mut store = SqliteStore::open(&service.database()).unwrap();
    let old = store
        .insert(&record(
            "acct-2",
            "198.51.100.1:30002/udp",
            "10.8.0.1:53",
            None,
            true,
        ))
        .unwrap();
    drop(store);
    // And forwarding in the maps, as it was before the rule.
    State::open_for_write(&dir.dir)
        .unwrap()
        .reserve(&old.reservation)
        .unwrap();
    assert_eq!(in_maps(&dir).len(), 2);
    service.spawn().unwrap();
    let log = service.log();
    assert!(
        log.contains(&format!(
            "disabled reservation {} (198.51.100.1:30002/udp -> 10.8.0.1:53, owner acct-2): refused by policy.target_not_server",
            old.id
        )),
        "{log}"
    );
    let list = pf_list(&dir);
    let disabled = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == json!(old.id))
        .unwrap();
    assert_eq!(disabled["enabled"], json!(false));
    assert_eq!(in_maps(&dir), vec!["198.51.100.1:30001/tcp -> 10.8.0.2:80"]);
    let audit = std::fs::read_to_string(service.audit_log()).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains(r#""action":"disable""#) && l.contains("target_not_server")),
        "{audit}"
    );
    // And it cannot be enabled again.
    let out = pf(&dir, &["enable", &old.id.to_string()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("policy.target_not_server"),
        "{out:?}"
    );
}

#[test]
fn a_second_service_cannot_take_the_first_ones_pins_or_interface() {
    require_root();
    let dir = TempPinDir::new();
    let topo = Topology::new(&format!("pf{}two", std::process::id())).unwrap();
    let service = dir.serve_with(Some(&topo.server), &with_interface(TEST_POLICY));
    reserve(&service, "acct-1", "198.51.100.1:8080/tcp", "10.8.0.2:80").unwrap();
    let www =
        ScratchDir::claim(std::env::temp_dir().join(format!("pf-www-{}", std::process::id())));
    std::fs::create_dir_all(www.path()).unwrap();
    std::fs::write(www.path().join("index.html"), "hello through pf\n").unwrap();
    topo.client
        .serve_directory(CLIENT_IP, 80, www.path().to_str().unwrap())
        .unwrap();
    let url = "http://198.51.100.1:8080/";
    assert_eq!(topo.inet.curl(url).unwrap(), "hello through pf\n");

    // A second service, with its own socket and store, on `pins` in the server's namespace:
    // it must refuse to start. What it printed.
    let refused_start = |name: &str, pins: &std::path::Path| -> String {
        let files = ScratchDir::claim(
            std::env::temp_dir().join(format!("pf-{name}-{}", std::process::id())),
        );
        let mut other = Service::prepare(
            &pf_bin(),
            files,
            pins,
            Some(topo.server.path()),
            &with_interface(TEST_POLICY),
        )
        .unwrap();
        let (status, log) = other.run_to_exit().unwrap();
        assert!(!status.success(), "{log}");
        log
    };
    // Another config that differs only in its socket and store: same pin directory.
    let log = refused_start("second", dir.path());
    assert!(
        log.contains(&format!(
            "another pf serve is running with {}",
            dir.path().display()
        )),
        "{log}"
    );
    // Another pin directory, the same interface: the kernel's one XDP program per device.
    let other_pins = TempPinDir::new();
    let log = refused_start("third", other_pins.path());
    assert!(log.contains("pub0 already has an XDP program"), "{log}");
    // The first service's forwarding and records are untouched.
    assert_eq!(topo.inet.curl(url).unwrap(), "hello through pf\n");
    assert_eq!(pf_list(&dir).as_array().unwrap().len(), 1);
    assert_eq!(in_maps(&dir).len(), 1);
}

#[test]
fn attachment_state_comes_from_the_kernel_not_the_pins() {
    require_root();
    let dir = TempPinDir::new();
    let topo = Topology::new(&format!("pf{}pin", std::process::id())).unwrap();
    let www =
        ScratchDir::claim(std::env::temp_dir().join(format!("pf-www-{}", std::process::id())));
    std::fs::create_dir_all(www.path()).unwrap();
    std::fs::write(www.path().join("index.html"), "pinned\n").unwrap();
    topo.client
        .serve_directory(CLIENT_IP, 80, www.path().to_str().unwrap())
        .unwrap();
    let url = "http://198.51.100.1:8080/";
    let mut service = dir.serve_with(Some(&topo.server), &with_interface(TEST_POLICY));
    reserve(&service, "acct-1", "198.51.100.1:8080/tcp", "10.8.0.2:80").unwrap();
    assert_eq!(topo.inet.curl(url).unwrap(), "pinned\n");
    service.stop();

    // 1. The XDP link's pin removed: the program is detached, the TC pin remains.
    std::fs::remove_file(dir.dir.link(PUBLIC_IFACE, "xdp")).unwrap();
    assert!(topo.inet.curl(url).is_err(), "forwards with no XDP program");
    let stats = |topo: &Topology| -> Value {
        let out = pf_in_ns(&topo.server, &dir, &["stats", "--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let s = stats(&topo);
    assert_eq!(s["attached"], json!([]), "{s}");
    assert!(
        s["dead"]["pub0"]
            .as_str()
            .unwrap()
            .contains("its XDP link is not pinned"),
        "{s}"
    );
    // `pf attach` replaces a dead attachment (it used to say "already attached").
    let out = pf_in_ns(&topo.server, &dir, &["attach", PUBLIC_IFACE]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("replaced a dead attachment on pub0"),
        "{out:?}"
    );
    assert_eq!(stats(&topo)["attached"], json!(["pub0"]));
    let out = pf_in_ns(&topo.server, &dir, &["detach", PUBLIC_IFACE]);
    assert!(out.status.success(), "{out:?}");

    // 2. The interface deleted and made again: its pinned links survive, detached.
    service.spawn().unwrap();
    assert!(service.log().contains("attached pub0"), "{}", service.log());
    service.stop();
    topo.server
        .run(&["ip", "link", "del", PUBLIC_IFACE])
        .unwrap();
    topo.link_public().unwrap();
    let s = stats(&topo);
    assert!(
        s["dead"]["pub0"]
            .as_str()
            .unwrap()
            .contains("the kernel detached its XDP program"),
        "{s}"
    );
    service.spawn().unwrap();
    let log = service.log();
    assert!(
        log.contains("pub0: the pinned attachment was dead (the kernel detached its XDP program"),
        "{log}"
    );
    assert_eq!(topo.inet.curl(url).unwrap(), "pinned\n");
    service.stop();

    // 3. Every map pin removed, the links kept: the programs still read the old maps.
    for name in map_names::ALL {
        std::fs::remove_file(dir.dir.map(name)).unwrap();
    }
    assert!(
        stats(&topo)["dead"]["pub0"]
            .as_str()
            .unwrap()
            .contains("is not pinned (the pins were removed)")
    );
    service.spawn().unwrap();
    assert!(
        service
            .log()
            .contains("(the pins were removed)); attached again"),
        "{}",
        service.log()
    );
    assert_eq!(topo.inet.curl(url).unwrap(), "pinned\n");
    // A release now really stops forwarding.
    let id = pf_list(&dir)[0]["id"].as_u64().unwrap();
    pf_ok(&dir, &["release", &id.to_string()]);
    assert!(topo.inet.curl(url).is_err(), "a released port forwards");
    reserve(&service, "acct-1", "198.51.100.1:8080/tcp", "10.8.0.2:80").unwrap();
    assert_eq!(topo.inet.curl(url).unwrap(), "pinned\n");

    // 4. The map pins removed while the service runs, or replaced by new maps: it refuses
    // changes (nothing stored, nothing released) instead of writing maps no program reads.
    for name in map_names::ALL {
        std::fs::remove_file(dir.dir.map(name)).unwrap();
    }
    let e = reserve(&service, "acct-1", "198.51.100.1:8081/tcp", "10.8.0.2:81").unwrap_err();
    assert!(
        e.contains("were removed or replaced after pf serve started"),
        "{e}"
    );
    drop(State::open_for_write(&dir.dir).unwrap()); // new, empty maps pinned in their place
    let e = reserve(&service, "acct-1", "198.51.100.1:8081/tcp", "10.8.0.2:81").unwrap_err();
    assert!(e.contains("were removed or replaced"), "{e}");
    let id = pf_list(&dir)[0]["id"].as_u64().unwrap();
    let out = pf(&dir, &["release", &id.to_string()]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("were removed or replaced"),
        "{out:?}"
    );
    assert_eq!(
        pf_list(&dir).as_array().unwrap().len(),
        1,
        "a refused change reached the store"
    );
    assert_eq!(
        topo.inet.curl(url).unwrap(),
        "pinned\n",
        "the port stopped forwarding"
    );
    // A restart attaches again onto the pinned maps and reloads them: forwarding as stored.
    service.stop();
    service.spawn().unwrap();
    assert_eq!(topo.inet.curl(url).unwrap(), "pinned\n");
}

/// This process's file limit, raised so the test can hold many connections.
fn raise_file_limit(to: u64) {
    let limit = libc::rlimit {
        rlim_cur: to,
        rlim_max: to,
    };
    // SAFETY: a valid rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
}

/// Sets a running process's file limit (`soft:hard`) with prlimit.
fn set_file_limit(pid: u32, limit: &str) {
    let status = Command::new("prlimit")
        .args([format!("--pid={pid}"), format!("--nofile={limit}")])
        .status()
        .unwrap();
    assert!(status.success(), "prlimit --nofile={limit}");
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the command name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn idle_connections_cannot_take_the_api_down() {
    require_root();
    raise_file_limit(8192);
    let dir = TempPinDir::new();
    let mut service =
        Service::prepare(&pf_bin(), files_of(&dir), dir.path(), None, TEST_POLICY).unwrap();
    // 256 files: at most 192 connections (64 are kept for the rest).
    service.wrapper = ["prlimit", "--nofile=256:256", "--"]
        .map(String::from)
        .to_vec();
    service.spawn().unwrap();
    let pid = service.pid().unwrap();
    let socket = service.socket();
    // 1,100 idle connections that never send a byte.
    let mut idle = Vec::new();
    for _ in 0..1100 {
        match UnixStream::connect(&socket) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connecting: {e}"),
        }
    }
    thread::sleep(Duration::from_millis(300));
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    reserve(&service, "acct-1", "198.51.100.1:8080/tcp", "10.8.0.2:80").unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "a reserve took {took:?} behind idle connections"
    );
    thread::sleep(Duration::from_secs(2));
    let cpu = cpu_seconds(pid) - cpu_before;
    assert!(
        cpu < 0.5,
        "pf serve used {cpu:.2} s of CPU in ~2 s with idle connections"
    );
    drop(idle);
    // One line per condition, not one per connection.
    let log = service.log();
    let lines = log.lines().filter(|l| l.contains("connections")).count();
    assert!(
        (1..=4).contains(&lines),
        "{lines} lines about connections: {log}"
    );

    // Idle connections below the cap are closed after the header timeout (10 s).
    let mut quiet: Vec<UnixStream> = (0..10)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    for s in &quiet {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    }
    let started = Instant::now();
    for s in &mut quiet {
        let mut buf = [0u8; 1];
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "an idle connection got data");
    }
    let waited = started.elapsed();
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(13)).contains(&waited),
        "idle connections closed after {waited:?}"
    );
    drop(quiet);

    // Out of files (the limit lowered under the running service): accept backs off, says so
    // once, and the API answers again once files are free.
    set_file_limit(pid, "40:256");
    let mut held = Vec::new();
    for _ in 0..100 {
        if let Ok(s) = UnixStream::connect(&socket) {
            held.push(s);
        }
    }
    thread::sleep(Duration::from_secs(1));
    let cpu_before = cpu_seconds(pid);
    thread::sleep(Duration::from_secs(2));
    let cpu = cpu_seconds(pid) - cpu_before;
    assert!(cpu < 0.5, "pf serve spun {cpu:.2} s of CPU out of files");
    drop(held);
    set_file_limit(pid, "256:256");
    let deadline = Instant::now() + Duration::from_secs(15);
    while reserve(&service, "acct-1", "198.51.100.1:8081/tcp", "10.8.0.2:81").is_err() {
        assert!(
            Instant::now() < deadline,
            "the API did not come back: {}",
            service.log()
        );
        thread::sleep(Duration::from_millis(200));
    }
    let log = service.log();
    let trouble = log
        .lines()
        .filter(|l| l.contains("accepting connections fails"))
        .count();
    assert!(
        (1..=3).contains(&trouble),
        "{trouble} accept-error lines: {log}"
    );
    assert!(log.len() < 64 * 1024, "the log grew to {} bytes", log.len());
}

#[test]
fn a_change_that_cannot_be_audited_is_refused() {
    require_root();
    let dir = TempPinDir::new();
    let disk = SmallDisk::new("audit", "8m");
    let files = files_of(&dir);
    let audit_log = disk.path.join("audit.jsonl");
    let text = config_text(
        files.path(),
        dir.path(),
        &files.path().join("pf.db"),
        &audit_log,
        TEST_POLICY,
    );
    let service = Service::start_with_config(&pf_bin(), files, &text).unwrap();
    reserve(&service, "acct-1", "198.51.100.1:8080/tcp", "10.8.0.2:80").unwrap();
    let before = pf_list(&dir);

    // A full disk: refused before anything changes.
    disk.fill();
    let e = reserve(&service, "acct-1", "198.51.100.1:8081/tcp", "10.8.0.2:81").unwrap_err();
    assert!(
        e.contains("cannot be written") && e.contains("makes no change it cannot audit"),
        "{e}"
    );
    let id = before[0]["id"].as_u64().unwrap();
    let out = pf(&dir, &["release", &id.to_string()]);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(pf_list(&dir), before, "a refused change changed the store");
    assert_eq!(in_maps(&dir).len(), 1);
    disk.free();

    // An immutable log: the same.
    assert!(
        Command::new("chattr")
            .arg("+i")
            .arg(&audit_log)
            .status()
            .unwrap()
            .success()
    );
    let e = reserve(&service, "acct-1", "198.51.100.1:8082/tcp", "10.8.0.2:82").unwrap_err();
    assert!(e.contains("cannot be written"), "{e}");
    assert_eq!(pf_list(&dir), before);
    assert!(
        Command::new("chattr")
            .arg("-i")
            .arg(&audit_log)
            .status()
            .unwrap()
            .success()
    );

    // Writable again: changes go through, and every line of the log is whole JSON.
    reserve(&service, "acct-1", "198.51.100.1:8083/tcp", "10.8.0.2:83").unwrap();
    let audit = std::fs::read_to_string(&audit_log).unwrap();
    assert!(audit.ends_with('\n'), "the log ends in half a line");
    for line in audit.lines() {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    }
    assert!(audit.contains(r#""result":"ok""#) && audit.contains("198.51.100.1:8083"));
}

#[test]
fn a_missing_or_empty_store_does_not_wipe_live_forwarding() {
    require_root();
    let dir = TempPinDir::new();
    let mut service = dir.serve();
    for port in 8080..8083 {
        reserve(
            &service,
            "acct-1",
            &format!("198.51.100.1:{port}/tcp"),
            &format!("10.8.0.2:{port}"),
        )
        .unwrap();
    }
    service.stop();
    let db = service.database();
    let moved = db.with_extension("db.moved");
    std::fs::rename(&db, &moved).unwrap();
    let refused = |service: &mut Service| {
        let (status, log) = service.run_to_exit().unwrap();
        assert!(!status.success(), "{log}");
        assert!(log.contains("--force-reconcile"), "{log}");
        assert_eq!(in_maps(&dir).len(), 3, "the maps lost reservations");
    };
    // A missing file (a typo in the path): refused, and no store is made.
    refused(&mut service);
    assert!(!db.exists(), "a refused start created the store");
    // A zero-length file.
    std::fs::write(&db, b"").unwrap();
    refused(&mut service);
    // The right store again: starts, nothing lost.
    std::fs::rename(&moved, &db).unwrap();
    service.spawn().unwrap();
    assert_eq!(pf_list(&dir).as_array().unwrap().len(), 3);
    service.stop();

    // The maps hold many the store does not know (more than 10 and a quarter): refused.
    {
        let mut state = State::open_for_write(&dir.dir).unwrap();
        let strangers: Vec<Reservation> = (0..12u16)
            .map(|i| {
                Reservation::new(
                    format!("198.51.100.1:{}/udp", 9000 + i).parse().unwrap(),
                    format!("10.8.1.{}", i + 1).parse().unwrap(),
                )
                .unwrap()
            })
            .collect();
        state.reserve_all(&strangers).unwrap();
    }
    // The store also has a record that fell due, for a port one of the strangers holds with
    // another target: a refused start must not expire it, nor remove the stranger.
    let mut store = SqliteStore::open(&db).unwrap();
    let due = store
        .insert(&record(
            "acct-2",
            "198.51.100.1:9000/udp",
            "10.8.2.1",
            Some(1000),
            false,
        ))
        .unwrap();
    drop(store);
    let audit_before = std::fs::read_to_string(service.audit_log()).unwrap();
    let (status, log) = service.run_to_exit().unwrap();
    assert!(!status.success());
    assert!(
        log.contains("hold 12 of 15 reservations that the store does not know"),
        "{log}"
    );
    assert_eq!(in_maps(&dir).len(), 15);
    assert!(in_maps(&dir).contains(&"198.51.100.1:9000/udp -> 10.8.1.1:9000".to_string()));
    let store = SqliteStore::open(&db).unwrap();
    assert!(
        store.get(due.id).unwrap().is_some(),
        "a refused start expired a record"
    );
    assert!(store.history(None).unwrap().is_empty());
    drop(store);
    assert_eq!(
        std::fs::read_to_string(service.audit_log()).unwrap(),
        audit_before
    );
    // The admin says so: the strangers go, and the due record expires.
    service.args = vec!["--force-reconcile".into()];
    service.spawn().unwrap();
    assert_eq!(in_maps(&dir).len(), 3);
    assert!(
        service
            .log()
            .contains(&format!("expired reservation {}", due.id)),
        "{}",
        service.log()
    );
}

#[test]
fn a_clock_step_expires_nothing_early_and_expiry_can_be_undone() {
    require_root();
    let dir = TempPinDir::new();
    let mut service =
        Service::prepare(&pf_bin(), files_of(&dir), dir.path(), None, TEST_POLICY).unwrap();
    // libfaketime moves the service's system clock (not its monotonic one) when this file
    // changes.
    let offset = std::env::temp_dir().join(format!("pf-clock-offset-{}", std::process::id()));
    std::fs::write(&offset, "+0\n").unwrap();
    service.env = vec![
        (
            "LD_PRELOAD".into(),
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1".into(),
        ),
        (
            "FAKETIME_TIMESTAMP_FILE".into(),
            offset.display().to_string(),
        ),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    service.spawn().unwrap();
    let call = |method: &str, path: &str, body: Option<Value>| {
        Client::new(&service.socket()).call(method, path, body.as_ref())
    };
    for (port, ttl) in [(8080, "1h"), (8081, "1d"), (8082, "2s")] {
        call(
            "POST",
            "/v1/reservations",
            Some(json!({ "owner": "acct-1", "public": format!("198.51.100.1:{port}/tcp"), "to": format!("10.8.0.2:{port}"), "ttl": ttl })),
        )
        .unwrap();
    }
    // Two days forward.
    std::fs::write(&offset, "+2d\n").unwrap();
    thread::sleep(Duration::from_millis(3500));
    let log = service.log();
    assert!(
        log.contains("the system clock stepped forward by 2days"),
        "{log}"
    );
    let ports_left = || -> Vec<u64> {
        pf_list(&dir)
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["first_port"].as_u64().unwrap())
            .collect()
    };
    // The 1 h and 1 d reservations stay; the 2 s one expired on its own time.
    assert_eq!(ports_left(), vec![8080, 8081], "{log}");
    assert_eq!(in_maps(&dir).len(), 2);
    // Expired is not gone: the history has it, and it comes back under its id.
    let expired = pf_ok(&dir, &["list", "--expired"]);
    assert!(
        expired.contains("198.51.100.1:8082/tcp") && expired.contains("expired"),
        "{expired}"
    );
    let id = serde_json::from_str::<Value>(&pf_ok(&dir, &["list", "--expired", "--json"])).unwrap()
        [0]["id"]
        .as_u64()
        .unwrap();
    let out = pf_ok(&dir, &["restore", &id.to_string(), "--ttl", "1h"]);
    assert!(
        out.contains(&format!("restored {id}: 198.51.100.1:8082/tcp")),
        "{out}"
    );
    assert_eq!(in_maps(&dir).len(), 3);
    assert_eq!(
        pf_ok(&dir, &["list", "--expired"]).trim(),
        "no reservations"
    );
    let audit = std::fs::read_to_string(service.audit_log()).unwrap();
    assert!(audit.contains(r#""action":"expire""#) && audit.contains(r#""action":"restore""#));
    // A step back (to a day before the start) keeps no lifetime longer than asked.
    call(
        "POST",
        "/v1/reservations",
        Some(json!({ "owner": "acct-1", "public": "198.51.100.1:8083/tcp", "to": "10.8.0.2:8083", "ttl": "2s" })),
    )
    .unwrap();
    std::fs::write(&offset, "-1d\n").unwrap();
    thread::sleep(Duration::from_millis(3500));
    let log = service.log();
    assert!(
        log.contains("the system clock stepped back by 3days"),
        "{log}"
    );
    assert_eq!(ports_left(), vec![8080, 8081, 8082], "{log}");
    let _ = std::fs::remove_file(&offset);
}

#[test]
fn a_store_on_a_full_disk_changes_nothing_and_still_starts() {
    require_root();
    let dir = TempPinDir::new();
    let disk = SmallDisk::new("store", "4m");
    let files = files_of(&dir);
    let text = config_text(
        files.path(),
        dir.path(),
        &disk.path.join("pf.db"),
        &files.path().join("audit.jsonl"),
        TEST_POLICY,
    );
    let mut service = Service::start_with_config(&pf_bin(), files, &text).unwrap();
    reserve(&service, "acct-1", "198.51.100.1:8080/tcp", "10.8.0.2:80").unwrap();
    let before = pf_list(&dir);
    disk.fill();
    // The store cannot record the release: nothing changes, in the store or the maps, and
    // the error says so.
    let id = before[0]["id"].as_u64().unwrap();
    let out = pf(&dir, &["release", &id.to_string()]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reservation store"), "{err}");
    assert_eq!(pf_list(&dir), before);
    assert_eq!(in_maps(&dir).len(), 1);
    // A restart on the full disk starts (it writes nothing to start), still forwarding;
    // reads work, and a change fails naming the store, changing nothing.
    service.stop();
    service.spawn().unwrap();
    assert_eq!(pf_list(&dir), before);
    assert_eq!(in_maps(&dir).len(), 1);
    let e = reserve(&service, "acct-1", "198.51.100.1:8081/tcp", "10.8.0.2:81").unwrap_err();
    assert!(e.contains("reservation store"), "{e}");
    assert_eq!(pf_list(&dir), before);
    assert_eq!(in_maps(&dir).len(), 1);
    // A store that cannot be opened for writing at all (its filesystem read-only): the
    // service starts read-only, keeps forwarding, and refuses changes saying why.
    service.stop();
    disk.remount("ro");
    service.spawn().unwrap();
    assert!(service.log().contains("is read-only"), "{}", service.log());
    assert_eq!(pf_list(&dir), before);
    assert_eq!(in_maps(&dir).len(), 1);
    let e = reserve(&service, "acct-1", "198.51.100.1:8081/tcp", "10.8.0.2:81").unwrap_err();
    assert!(e.contains("the reservation store is read-only"), "{e}");
    service.stop();
    disk.remount("rw");
    // Room again, a restart: the release goes through.
    disk.free();
    service.stop();
    service.spawn().unwrap();
    pf_ok(&dir, &["release", &id.to_string()]);
    assert!(in_maps(&dir).is_empty());
}

#[test]
fn sighup_reopens_the_audit_log_and_keeps_serving() {
    require_root();
    let dir = TempPinDir::new();
    let service = dir.serve();
    reserve(&service, "acct-1", "198.51.100.1:8080/tcp", "10.8.0.2:80").unwrap();
    let rotated = service.audit_log().with_extension("jsonl.1");
    std::fs::rename(service.audit_log(), &rotated).unwrap();
    // SAFETY: kill(2) on the service's pid.
    assert_eq!(
        unsafe { libc::kill(service.pid().unwrap() as i32, libc::SIGHUP) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !service.log().contains("reopened the audit log") {
        assert!(Instant::now() < deadline, "{}", service.log());
        thread::sleep(Duration::from_millis(20));
    }
    reserve(&service, "acct-1", "198.51.100.1:8081/tcp", "10.8.0.2:81").unwrap();
    let new = std::fs::read_to_string(service.audit_log()).unwrap();
    assert!(
        new.contains("198.51.100.1:8081") && !new.contains("198.51.100.1:8080"),
        "{new}"
    );
    assert!(
        std::fs::read_to_string(&rotated)
            .unwrap()
            .contains("198.51.100.1:8080")
    );
}

#[test]
fn malformed_requests_and_look_alike_owners_are_refused_and_audited() {
    require_root();
    let dir = TempPinDir::new();
    let service = dir.serve();
    let socket = service.socket();
    let curl = |method: &str, path: &str, body: &str| -> u16 {
        let out = Command::new("curl")
            .args(["--silent", "--max-time", "10", "--unix-socket"])
            .arg(&socket)
            .args(["-X", method, "-o", "/dev/null", "-w", "%{http_code}"])
            .args([
                "-H",
                "content-type: application/json",
                "--data-binary",
                body,
            ])
            .arg(format!("http://pf{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).parse().unwrap()
    };
    for (body, status) in [
        (r#"{"owner":"a","public":"#.to_string(), 400),
        (r#"{"owner":"a","public":"198.51.100.1:8090/tcp","to":"10.8.0.2","port":1}"#.into(), 400),
        (format!(r#"{{"note":"{}"}}"#, "x".repeat(70_000)), 413),
        (r#"{"owner":"acct\u202e7","public":"198.51.100.1:8091/tcp","to":"10.8.0.2"}"#.into(), 400),
        (r#"{"owner":"acct-7","public":"198.51.100.1:8092/tcp","to":"10.8.0.2","note":"a\u200bb"}"#.into(), 400),
    ] {
        assert_eq!(curl("POST", "/v1/reservations", &body), status, "{body:.80}");
    }
    assert_eq!(pf_list(&dir), json!([]));
    let audit = std::fs::read_to_string(service.audit_log()).unwrap();
    for needle in [
        "EOF while parsing",
        "unknown field `port`",
        "larger than 65536 bytes",
        "U+202E",
        "U+200B",
    ] {
        assert!(
            audit
                .lines()
                .any(|l| l.contains(r#""result":"refused""#) && l.contains(needle)),
            "{needle} not audited: {audit}"
        );
    }
    // Releasing by owner records the owner asked for, on each release.
    reserve(&service, "acct-9", "198.51.100.1:8093/tcp", "10.8.0.2:93").unwrap();
    let out = pf_ok(&dir, &["release", "--owner", "acct-9"]);
    assert!(out.contains("released"), "{out}");
    let audit = std::fs::read_to_string(service.audit_log()).unwrap();
    assert!(
        audit.lines().any(|l| l.contains(r#""action":"release""#) && l.contains(r#""owner_asked":"acct-9""#)),
        "{audit}"
    );
    assert!(
        audit.lines().any(|l| l.contains(r#""action":"release-owner""#) && l.contains(r#""owner":"acct-9""#)),
        "{audit}"
    );
}

#[test]
fn a_closed_pipe_ends_pf_quietly() {
    require_root();
    let dir = TempPinDir::new();
    let service = dir.serve();
    reserve(&service, "acct-1", "198.51.100.1:8080/tcp", "10.8.0.2:80").unwrap();
    for args in [&["list"][..], &["stats"][..]] {
        // A pipe whose reader is gone before pf writes: `pf list | head -0`.
        let mut fds = [0i32; 2];
        // SAFETY: a valid array for pipe(2)'s two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: closing the read end we own.
        unsafe { libc::close(fds[0]) };
        // SAFETY: the write end is ours, handed to the child's stdout.
        let stdout = unsafe { Stdio::from_raw_fd(fds[1]) };
        let words = super::common::pf_words(&dir, args);
        let mut child = Command::new(&words[0])
            .args(&words[1..])
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "pf {args:?} | (closed): {status}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn the_socket_group_reaches_a_socket_in_new_directories() {
    require_root();
    let dir = TempPinDir::new();
    let files =
        ScratchDir::claim(std::env::temp_dir().join(format!("pf-group-{}", std::process::id())));
    std::fs::create_dir_all(files.path()).unwrap();
    // The socket two directories below ones that do not exist yet.
    let socket = files.path().join("run/pf/pf.sock");
    let text = format!(
        "[service]\nsocket = \"{}\"\nsocket_group = \"nogroup\"\ndatabase = \"{}\"\naudit_log = \"{}\"\nbpffs = \"{}\"\n{TEST_POLICY}",
        socket.display(),
        files.path().join("pf.db").display(),
        files.path().join("audit.jsonl").display(),
        dir.path().display()
    );
    // Started by hand: the harness waits on files/pf.sock, and this socket is elsewhere.
    let service = Service::prepare_with_config(&pf_bin(), files, None, &text).unwrap();
    let child = Command::new(pf_bin())
        .args(["serve", "--config"])
        .arg(service.config())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "pf serve did not open {}",
            socket.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
    for d in [
        socket.parent().unwrap(),
        socket.parent().unwrap().parent().unwrap(),
    ] {
        let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "{} is {mode:o}", d.display());
    }
    // A member of the group (and nothing else) reaches the API.
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "curl",
            "--silent",
            "--max-time",
            "10",
            "--unix-socket",
        ])
        .arg(&socket)
        .args([
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://pf/v1/status",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
}

/// Packets on `ns`'s `iface` from `source`, captured with tcpdump while `during` runs.
fn captured_from(
    ns: &crate::kit::netns::Netns,
    iface: &str,
    source: &str,
    during: impl FnOnce(),
) -> usize {
    let mut tcpdump = ns
        .cmd(&[
            "tcpdump", "-i", iface, "-nn", "-l", "-U", "src", "host", source,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // tcpdump says "listening on" on stderr once it captures.
    let mut stderr = tcpdump.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&seen).contains("listening on") {
        assert!(Instant::now() < deadline, "tcpdump did not start");
        if stderr.read(&mut byte).unwrap() == 0 {
            panic!("tcpdump exited: {}", String::from_utf8_lossy(&seen));
        }
        seen.push(byte[0]);
    }
    during();
    thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(tcpdump.id() as i32, libc::SIGINT) };
    let mut out = String::new();
    tcpdump
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = tcpdump.wait();
    out.lines().filter(|l| !l.trim().is_empty()).count()
}

#[test]
fn a_released_reservation_leaks_no_tunnel_address() {
    require_root();
    let dir = TempPinDir::new();
    let topo = Topology::new(&format!("pf{}leak", std::process::id())).unwrap();
    let run = |policy: &str, port: u16| -> usize {
        let service = dir.serve_with(Some(&topo.server), &with_interface(policy));
        let listener = topo
            .client
            .within(move || std::net::TcpListener::bind((CLIENT_IP, port)))
            .unwrap()
            .unwrap();
        reserve(
            &service,
            "acct-1",
            &format!("198.51.100.1:{port}/tcp"),
            &format!("10.8.0.2:{port}"),
        )
        .unwrap();
        // A connection through the reservation, both ways.
        let mut inet_side = topo
            .inet
            .within(move || {
                let s = std::net::TcpStream::connect(("198.51.100.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s
            })
            .unwrap();
        let (mut client_side, _) = listener.accept().unwrap();
        std::io::Write::write_all(&mut inet_side, b"hello").unwrap();
        let mut buf = [0u8; 5];
        client_side.read_exact(&mut buf).unwrap();
        std::io::Write::write_all(&mut client_side, b"world").unwrap();
        inet_side.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"world");
        // Released while the connection lives; the client keeps answering on it.
        let id = pf_list(&dir)[0]["id"].as_u64().unwrap();
        pf_ok(&dir, &["release", &id.to_string()]);
        let leaked = captured_from(&topo.inet, "inet0", CLIENT_IP, || {
            for _ in 0..5 {
                let _ = std::io::Write::write_all(&mut client_side, b"still here");
                thread::sleep(Duration::from_millis(100));
            }
        });
        drop(service);
        leaked
    };
    // The guard on (the default): nothing from the tunnel address reaches the internet host,
    // and the drops are counted.
    assert_eq!(run(TEST_POLICY, 8080), 0, "a tunnel address leaked");
    let out = pf_in_ns(&topo.server, &dir, &["stats", "--json"]);
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        stats["egress"]["tunnel_source_dropped"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert_eq!(stats["tunnel_networks"], json!(["10.8.0.0/16"]));
    // The guard off: the same sequence leaks, so the capture above would have seen it.
    let off = format!("{TEST_POLICY}drop_tunnel_source_leaks = false\n");
    assert!(run(&off, 8081) > 0, "the capture cannot see a leak");
}
