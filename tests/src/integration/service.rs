//! `pf serve` under faults, with real processes and the real kernel: restarts (graceful and
//! SIGKILL) under a forwarded TCP stream and in the middle of a burst of API calls, 50 clients
//! at once, expiry, drift, and bad input over the API itself.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Barrier, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{HashMap, MapData};
use pf::{api::client::Client, kernel::state::State};
use pf_common::{EndpointKey, NatEntry, ReservationKey, ReservationValue, map_names};
use serde_json::{Value, json};

use crate::{
    kit::netns::Netns,
    kit::serve::TEST_POLICY,
    kit::topology::{CLIENT_IP, PUBLIC_IFACE, PUBLIC_IP, Topology},
};

use super::common::{TempPinDir, pf_list, pf_ok, require_root};

/// Entries in one of the NAT maps.
fn nat_entries(dir: &TempPinDir, name: &str) -> usize {
    dir.map::<HashMap<MapData, EndpointKey, NatEntry>>(name)
        .keys()
        .count()
}

/// The store (through the API) and the kernel maps hold exactly the same reservations: the
/// enabled records are the maps' records, and the NAT maps hold each of their ports and
/// protocols once, nothing more (so no range is half there). Returns the store's list.
fn assert_store_and_maps_agree(dir: &TempPinDir) -> Vec<Value> {
    let store = pf_list(dir).as_array().unwrap().clone();
    let want: BTreeSet<String> = store
        .iter()
        .filter(|r| r["enabled"] == json!(true))
        .map(|r| r["spec"].as_str().unwrap().to_string())
        .collect();
    let state = State::open_for_read(&dir.dir).unwrap().expect("pf's maps");
    let maps = state.list().unwrap();
    drop(state);
    let have: BTreeSet<String> = maps.iter().map(ToString::to_string).collect();
    assert_eq!(have, want, "the maps and the store disagree");
    let entries: usize = maps
        .iter()
        .map(|r| r.public.ports.len() as usize * r.public.protocols.ip_protocols().len())
        .sum();
    assert_eq!(nat_entries(dir, map_names::FORWARD_NAT), entries);
    assert_eq!(nat_entries(dir, map_names::REVERSE_NAT), entries);
    store
}

/// Runs `f` on a new thread inside `ns`'s network namespace (the test goes on meanwhile).
fn spawn_in<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let file = std::fs::File::open(ns.path()).unwrap();
    thread::spawn(move || {
        // SAFETY: a valid namespace fd; setns affects only this thread.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        f()
    })
}

/// FNV-1a over a byte stream.
fn fnv(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash ^= u64::from(b);
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn policy_with_interface(policy: &str) -> String {
    format!("[[interfaces]]\nname = \"{PUBLIC_IFACE}\"\n{policy}")
}

#[test]
fn restarts_keep_a_forwarded_stream_and_store_and_maps_agree() {
    require_root();
    let dir = TempPinDir::new();
    let topo = Topology::new(&format!("pf{}rs", std::process::id())).unwrap();
    let mut service = dir.serve_with(Some(&topo.server), &policy_with_interface(TEST_POLICY));
    assert!(service.log().contains("attached pub0"), "{}", service.log());

    // The tunnel client's sink: reads the stream to its end, answers with length and hash.
    let listener = topo
        .client
        .within(|| TcpListener::bind((CLIENT_IP, 80)))
        .unwrap()
        .unwrap();
    let sink = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (mut total, mut hash, mut buf) = (0u64, FNV_START, vec![0u8; 65536]);
        while let Ok(n @ 1..) = conn.read(&mut buf) {
            total += n as u64;
            fnv(&mut hash, &buf[..n]);
        }
        let _ = write!(conn, "{total} {hash:016x}");
    });
    pf_ok(
        &dir,
        &["reserve", "198.51.100.1:8080/tcp", "--to", "10.8.0.2:80"],
    );
    pf_ok(
        &dir,
        &[
            "reserve",
            "198.51.100.1:9000-9003/both",
            "--to",
            "10.8.0.3",
            "--ttl",
            "1h",
        ],
    );
    let id = pf_list(&dir)[1]["id"].as_u64().unwrap();
    pf_ok(&dir, &["disable", &id.to_string()]);

    // The internet host streams to the public port until told the restarts are over.
    let sent = Arc::new(AtomicU64::new(0));
    let restarts_done = Arc::new(AtomicBool::new(false));
    let (sent_in, done_in) = (sent.clone(), restarts_done.clone());
    let sender = spawn_in(&topo.inet, move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut conn = TcpStream::connect((PUBLIC_IP, 8080)).unwrap();
        conn.set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let (mut hash, mut seed) = (FNV_START, 0x9e37_79b9_7f4a_7c15u64);
        let mut chunk = vec![0u8; 16384];
        // Enough after the restarts that the stream visibly goes on past them.
        let mut tail_chunks = 64;
        while tail_chunks > 0 && Instant::now() < deadline {
            for b in chunk.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            conn.write_all(&chunk).unwrap();
            fnv(&mut hash, &chunk);
            sent_in.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if done_in.load(Ordering::Relaxed) {
                tail_chunks -= 1;
            }
            thread::sleep(Duration::from_millis(2));
        }
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        (
            answer,
            format!("{} {hash:016x}", sent_in.load(Ordering::Relaxed)),
        )
    });
    let wait_for_progress = |from: u64| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while sent.load(Ordering::Relaxed) < from + 256 * 1024 {
            assert!(Instant::now() < deadline, "the stream stalled");
            thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for_progress(0);
    // Graceful: SIGTERM, and a start that adopts the attachment.
    let status = service.stop().expect("pf serve was running");
    assert!(status.success(), "pf serve on SIGTERM: {status}");
    wait_for_progress(sent.load(Ordering::Relaxed));
    service.spawn().unwrap();
    assert!(service.log().contains("adopted pub0"), "{}", service.log());
    wait_for_progress(sent.load(Ordering::Relaxed));
    // SIGKILL: no chance to tidy up.
    service.kill();
    wait_for_progress(sent.load(Ordering::Relaxed));
    service.spawn().unwrap();
    restarts_done.store(true, Ordering::Relaxed);
    let (answer, expected) = sender.join().unwrap();
    sink.join().unwrap();
    assert_eq!(
        answer, expected,
        "the sink's (length, hash) against the sender's"
    );
    assert!(sent.load(Ordering::Relaxed) > 1024 * 1024);

    let store = assert_store_and_maps_agree(&dir);
    assert_eq!(store.len(), 2);
    assert_eq!(store[1]["enabled"], json!(false));
    assert!(
        !service.log().contains("drift:"),
        "restarts found drift: {}",
        service.log()
    );
}

/// One reserve call per thread in a loop; each success is recorded with its id.
fn burst_client(
    client: Client,
    thread_index: u32,
    successes: Arc<Mutex<BTreeMap<u64, String>>>,
    stop: Arc<AtomicBool>,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in 0..200u32 {
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            return;
        }
        // 64-port ranges for both protocols: 128 entries in each NAT map per reservation.
        let first = 1024 + (thread_index * 200 + n) * 64;
        let Ok(first) = u16::try_from(first) else {
            return;
        };
        let Some(last) = first.checked_add(63) else {
            return;
        };
        let body = json!({
            "owner": format!("acct-{thread_index}"),
            "public": format!("{PUBLIC_IP}:{first}-{last}/both"),
            "to": format!("10.8.{thread_index}.2"),
        });
        match client.call("POST", "/v1/reservations", Some(&body)) {
            Ok(r) => {
                successes.lock().unwrap().insert(
                    r["id"].as_u64().unwrap(),
                    r["spec"].as_str().unwrap().into(),
                );
            }
            // The service died under the call: its outcome is unknown, and either is allowed.
            Err(_) => return,
        }
    }
}

#[test]
fn sigkill_in_a_burst_leaves_no_half_reservation_and_loses_no_success() {
    require_root();
    let dir = TempPinDir::new();
    let mut service = dir.serve();
    let successes = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (client, successes, stop) = (
                Client::new(&service.socket()),
                successes.clone(),
                stop.clone(),
            );
            thread::spawn(move || burst_client(client, i, successes, stop))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while successes.lock().unwrap().len() < 40 {
        assert!(
            Instant::now() < deadline,
            "the burst made too few reservations"
        );
        thread::sleep(Duration::from_millis(5));
    }
    service.kill();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let succeeded = successes.lock().unwrap().clone();
    service.spawn().unwrap();
    let store = assert_store_and_maps_agree(&dir);
    let stored: BTreeMap<u64, String> = store
        .iter()
        .map(|r| {
            (
                r["id"].as_u64().unwrap(),
                r["spec"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (id, spec) in &succeeded {
        assert_eq!(
            stored.get(id),
            Some(spec),
            "reservation {id} returned success but is gone"
        );
    }
    // At most the calls in flight when the service died may have landed unreported.
    assert!(
        stored.len() <= succeeded.len() + 4,
        "{} stored, {} succeeded",
        stored.len(),
        succeeded.len()
    );
}

#[test]
fn fifty_clients_get_distinct_automatic_ports_and_the_quota_holds() {
    require_root();
    let dir = TempPinDir::new();
    let policy = TEST_POLICY
        .replace("port_pool = [\"1-65535\"]", "port_pool = [\"30000-30099\"]")
        .replace("ports_per_owner = 1000000", "ports_per_owner = 3");
    let service = dir.serve_with(None, &policy);
    let barrier = Arc::new(Barrier::new(50));
    let threads: Vec<_> = (0..50u32)
        .map(|i| {
            let (client, barrier) = (Client::new(&service.socket()), barrier.clone());
            thread::spawn(move || {
                let body = json!({
                    "owner": format!("acct-{}", i % 10),
                    "public": format!("{PUBLIC_IP}/tcp"),
                    "to": format!("10.8.1.{}", i + 1),
                });
                barrier.wait();
                client.call("POST", "/v1/reservations", Some(&body))
            })
        })
        .collect();
    let mut ports = Vec::new();
    let mut per_owner: BTreeMap<String, usize> = BTreeMap::new();
    let mut refused = 0;
    for t in threads {
        match t.join().unwrap() {
            Ok(r) => {
                ports.push(r["first_port"].as_u64().unwrap());
                *per_owner
                    .entry(r["owner"].as_str().unwrap().into())
                    .or_default() += 1;
            }
            Err(e) => {
                assert!(e.to_string().contains("policy.ports_per_owner"), "{e}");
                refused += 1;
            }
        }
    }
    // Ten owners, five callers each, three ports each: 30 made, 20 refused.
    assert_eq!(ports.len(), 30);
    assert_eq!(refused, 20);
    assert!(per_owner.values().all(|&n| n == 3), "{per_owner:?}");
    let distinct: BTreeSet<_> = ports.iter().collect();
    assert_eq!(
        distinct.len(),
        ports.len(),
        "a port was handed out twice: {ports:?}"
    );
    assert!(
        ports.iter().all(|p| (30000..=30099).contains(p)),
        "{ports:?}"
    );
    assert_eq!(assert_store_and_maps_agree(&dir).len(), 30);
}

fn unix_ms(rfc3339: &str) -> u64 {
    humantime::parse_rfc3339(rfc3339)
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn a_reservation_stops_forwarding_within_a_second_of_expiry() {
    require_root();
    let dir = TempPinDir::new();
    let topo = Topology::new(&format!("pf{}ex", std::process::id())).unwrap();
    let _service = dir.serve_with(Some(&topo.server), &policy_with_interface(TEST_POLICY));
    // A UDP echo on the tunnel client.
    let echo = topo
        .client
        .within(|| UdpSocket::bind((CLIENT_IP, 5300)))
        .unwrap()
        .unwrap();
    echo.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let echo_stop = Arc::new(AtomicBool::new(false));
    let stop = echo_stop.clone();
    let echo = thread::spawn(move || {
        let mut buf = [0u8; 1500];
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok((n, peer)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], peer);
            }
        }
    });
    let out = pf_ok(
        &dir,
        &[
            "reserve",
            "198.51.100.1:5353/udp",
            "--to",
            "10.8.0.2:5300",
            "--ttl",
            "2s",
        ],
    );
    assert!(out.contains("expires"), "{out}");
    let expires = unix_ms(pf_list(&dir)[0]["expires"].as_str().unwrap());
    // The internet host's socket, connected to the public port.
    let peer = topo
        .inet
        .within(|| {
            let s = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
            s.connect((PUBLIC_IP, 5353)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            s
        })
        .unwrap();
    let round_trip = |peer: &UdpSocket| {
        let _ = peer.send(b"ping");
        let mut buf = [0u8; 16];
        peer.recv(&mut buf).is_ok()
    };
    assert!(
        round_trip(&peer),
        "the reservation does not forward before it expires"
    );
    // Poll the maps until the entry is gone.
    let removed_at = loop {
        let state = State::open_for_read(&dir.dir).unwrap().unwrap();
        let gone = state.list().unwrap().is_empty();
        drop(state);
        if gone {
            break now_ms();
        }
        assert!(
            now_ms() < expires + 5_000,
            "still in the maps 5 s after expiry"
        );
        thread::sleep(Duration::from_millis(20));
    };
    assert!(
        removed_at >= expires,
        "removed {} ms early",
        expires - removed_at
    );
    assert!(
        removed_at <= expires + 1_000,
        "removed {} ms after expiry",
        removed_at - expires
    );
    assert!(!round_trip(&peer), "an expired reservation still forwards");
    assert_eq!(pf_list(&dir), json!([]));
    echo_stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
}

#[test]
fn a_restart_repairs_drift_between_store_and_maps() {
    require_root();
    let dir = TempPinDir::new();
    let mut service = dir.serve();
    for (public, to) in [
        ("198.51.100.1:8080/tcp", "10.8.0.2:80"),
        ("198.51.100.1:7000-7003/udp", "10.8.0.3"),
        ("198.51.100.1:6000/tcp", "10.8.0.6"),
    ] {
        pf_ok(&dir, &["reserve", public, "--to", to]);
    }
    service.stop();
    // Behind the store's back: one reservation gone from the maps, one added that the store
    // never had, and an orphan NAT entry; and what a crash half-way through a write or a
    // removal leaves: a record with one entry missing, and entries whose record is missing.
    {
        let mut state = State::open_for_write(&dir.dir).unwrap();
        state
            .release(&"198.51.100.1:8080/tcp".parse().unwrap())
            .unwrap();
        let stranger = super::common::reservations(&[("198.51.100.1:9999/tcp", "10.8.0.9")]);
        state.reserve_all(&stranger).unwrap();
    }
    let mut records: aya::maps::HashMap<MapData, ReservationKey, ReservationValue> =
        dir.map(map_names::RESERVATIONS);
    let record_of_6000 = records
        .keys()
        .map(Result::unwrap)
        .find(|k| k.first_port == 6000u16.to_be_bytes())
        .unwrap();
    records.remove(&record_of_6000).unwrap();
    drop(records);
    let mut forward: HashMap<MapData, EndpointKey, NatEntry> = dir.map(map_names::FORWARD_NAT);
    let udp_7001 = EndpointKey::new(
        [198, 51, 100, 1],
        7001u16.to_be_bytes(),
        pf_common::IPPROTO_UDP,
    );
    forward.remove(&udp_7001).unwrap();
    let orphan = EndpointKey::new(
        [198, 51, 100, 1],
        5555u16.to_be_bytes(),
        pf_common::IPPROTO_TCP,
    );
    let value = NatEntry::new([10, 8, 0, 5], 5555u16.to_be_bytes());
    forward.insert(orphan, value, 0).unwrap();
    drop(forward);
    service.spawn().unwrap();
    let log = service.log();
    for drift in [
        "drift: removed 198.51.100.1:9999/tcp -> 10.8.0.9:9999: in the maps, not in the store",
        "drift: rewrote 198.51.100.1:7000-7003/udp -> 10.8.0.3:7000-7003: some of its entries were missing or wrong",
        "drift: removed 198.51.100.1:5555/tcp (FORWARD_NAT): an entry no reservation accounts for",
        "drift: removed 198.51.100.1:6000/tcp (FORWARD_NAT): an entry no reservation accounts for",
        "drift: removed 10.8.0.6:6000/tcp (REVERSE_NAT): an entry no reservation accounts for",
        "drift: added 198.51.100.1:8080/tcp -> 10.8.0.2:80: in the store, not in the maps",
        "drift: added 198.51.100.1:6000/tcp -> 10.8.0.6:6000: in the store, not in the maps",
        "7 drifts repaired",
    ] {
        assert!(log.contains(drift), "want {drift:?} in: {log}");
    }
    assert_eq!(assert_store_and_maps_agree(&dir).len(), 3);
    // Every entry carries the right address and port again (counts alone would not show it).
    let state = State::open_for_read(&dir.dir).unwrap().unwrap();
    for r in state.list().unwrap() {
        assert!(state.is_complete(&r).unwrap(), "{r}");
    }
}

/// `curl --unix-socket`: (HTTP status, JSON body).
fn curl(socket: &PathBuf, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--max-time", "10", "--unix-socket"])
        .arg(socket)
        .args(["-X", method, "-w", "\n%{http_code}"]);
    if let Some(body) = body {
        cmd.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ]);
    }
    let out = cmd
        .arg(format!("http://pf{path}"))
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, status) = text.rsplit_once('\n').expect("curl printed the status");
    (
        status.parse().unwrap(),
        serde_json::from_str(json).unwrap_or(Value::Null),
    )
}

#[test]
fn bad_api_input_gets_a_4xx_naming_the_problem_and_changes_nothing() {
    require_root();
    let dir = TempPinDir::new();
    // The service runs in a namespace where the server itself listens on 2222/tcp.
    let ns = Netns::new(&format!("pf{}api", std::process::id())).unwrap();
    let _listener = ns
        .within(|| TcpListener::bind(("0.0.0.0", 2222)))
        .unwrap()
        .unwrap();
    let policy = r#"
[policy]
public_ips = ["198.51.100.1"]
target_networks = ["10.8.0.0/16"]
port_pool = ["2000-2999", "8000-8999"]
forbidden_ports = [2022]
ports_per_owner = 4
max_range_ports = 4
"#;
    let service = dir.serve_with(Some(&ns), policy);
    let socket = service.socket();
    let (status, made) = curl(
        &socket,
        "POST",
        "/v1/reservations",
        Some(r#"{"owner":"acct-1","public":"198.51.100.1:8080-8082/tcp","to":"10.8.0.2"}"#),
    );
    assert_eq!(status, 201, "{made}");
    let before = pf_list(&dir);
    let audit_lines = || {
        std::fs::read_to_string(service.audit_log())
            .unwrap()
            .lines()
            .count()
    };
    let audit_before = audit_lines();

    let reserve = |public: &str, to: &str, owner: &str| {
        format!(r#"{{"owner":"{owner}","public":"{public}","to":"{to}"}}"#)
    };
    let cases: Vec<(&str, String, String, u16, &str)> = vec![
        (
            "POST",
            "/v1/reservations".into(),
            r#"{"owner":"a","public":"#.into(),
            400,
            "EOF while parsing",
        ),
        (
            "POST",
            "/v1/reservations".into(),
            r#"{"owner":"a","public":"198.51.100.1:8090/tcp","to":"10.8.0.2","port":1}"#.into(),
            400,
            "unknown field `port`",
        ),
        (
            "POST",
            "/v1/reservations".into(),
            reserve("198.51.100.1:65536/tcp", "10.8.0.2", "a"),
            400,
            "'65536' is not a number from 1 to 65535",
        ),
        (
            "POST",
            "/v1/reservations".into(),
            reserve("198.51.100.1:8090/tcp", "192.168.0.2", "a"),
            403,
            "refused by policy.target_networks",
        ),
        (
            "POST",
            "/v1/reservations".into(),
            reserve("198.51.100.1:2022/tcp", "10.8.0.2", "a"),
            403,
            "refused by policy.forbidden_ports",
        ),
        (
            "POST",
            "/v1/reservations".into(),
            reserve("198.51.100.1:2222/both", "10.8.0.2", "a"),
            403,
            "refused by policy.forbid_listening_ports: the server itself listens on 198.51.100.1:2222/tcp",
        ),
        (
            "POST",
            "/v1/reservations".into(),
            reserve("198.51.100.1:80/tcp", "10.8.0.2", "a"),
            403,
            "refused by policy.port_pool",
        ),
        (
            "POST",
            "/v1/reservations".into(),
            reserve("198.51.100.1:8100-8101/tcp", "10.8.0.4", "acct-1"),
            403,
            "refused by policy.ports_per_owner: owner acct-1 holds 3 ports",
        ),
        (
            "POST",
            "/v1/reservations".into(),
            reserve("198.51.100.1:8081/udp", "10.8.0.5", "b"),
            201,
            "",
        ),
        (
            "POST",
            "/v1/reservations".into(),
            reserve("198.51.100.1:8082/tcp", "10.8.0.5", "b"),
            409,
            "overlaps reservation 1",
        ),
        (
            "POST",
            "/v1/reservations".into(),
            reserve("198.51.100.1:8200-8209/tcp", "10.8.0.5", "b"),
            403,
            "refused by policy.max_range_ports: 8200-8209 covers 10 ports",
        ),
        (
            "DELETE",
            "/v1/reservations/77".into(),
            String::new(),
            404,
            "no reservation with id 77",
        ),
        (
            "POST",
            "/v1/reservations/77/renew".into(),
            r#"{"ttl":"1h"}"#.into(),
            404,
            "no reservation with id 77",
        ),
        (
            "POST",
            "/v1/reservations/1/renew".into(),
            r#"{"ttl":"soon"}"#.into(),
            400,
            "'soon' is not a lifetime",
        ),
        (
            "POST",
            "/v1/reservations/1/renew".into(),
            r#"{"ttl":"1h","ttl_seconds":60}"#.into(),
            400,
            "give ttl or ttl_seconds, not both",
        ),
        (
            "POST",
            "/v1/reservations/1/renew".into(),
            r#"{"ttl_seconds":0}"#.into(),
            400,
            "ttl_seconds must be at least 1",
        ),
        (
            "DELETE",
            "/v1/reservations".into(),
            String::new(),
            400,
            "needs ?owner=X",
        ),
        (
            "GET",
            "/v1/reservations?user=x".into(),
            String::new(),
            400,
            "unknown query parameter 'user'",
        ),
        (
            "PUT",
            "/v1/reservations/1".into(),
            String::new(),
            405,
            "PUT is not allowed",
        ),
        (
            "POST",
            "/v1/reservations".into(),
            format!(r#"{{"note":"{}"}}"#, "x".repeat(70_000)),
            413,
            "larger than 65536 bytes",
        ),
    ];
    let mut made_ids = Vec::new();
    for (method, path, body, want_status, needle) in &cases {
        let body = (!body.is_empty()).then_some(body.as_str());
        let (status, answer) = curl(&socket, method, path, body);
        assert_eq!(status, *want_status, "{method} {path} {body:?}: {answer}");
        if *want_status == 201 {
            made_ids.push(answer["id"].as_u64().unwrap());
            continue;
        }
        let message = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{answer}"));
        assert!(
            message.contains(needle),
            "{method} {path}: {message:?} lacks {needle:?}"
        );
        if message.starts_with("refused by ") {
            assert!(
                message.contains(answer["rule"].as_str().unwrap()),
                "{answer}"
            );
        }
        // For programs: a code for each status, the reservation in the way of a conflict,
        // and no command line to type in a message.
        let code = match want_status {
            400 => "bad_request",
            403 => "refused",
            404 => "not_found",
            405 => "method_not_allowed",
            409 => "conflict",
            413 => "too_large",
            other => panic!("no code for {other}"),
        };
        assert_eq!(answer["code"], code, "{answer}");
        if *want_status == 409 {
            assert_eq!(answer["conflict_id"], 1, "{answer}");
        }
        assert!(!message.contains("`pf "), "{message}");
    }
    // One success in the table (b's udp port), to show the refusals were not refusing all.
    assert_eq!(made_ids.len(), 1);
    let (status, _) = curl(
        &socket,
        "DELETE",
        &format!("/v1/reservations/{}", made_ids[0]),
        None,
    );
    assert_eq!(status, 200);
    // A lifetime in seconds, as programs like to give it.
    let (status, answer) = curl(
        &socket,
        "POST",
        "/v1/reservations",
        Some(r#"{"owner":"b","public":"198.51.100.1:8083/udp","to":"10.8.0.5","ttl_seconds":90}"#),
    );
    assert_eq!(
        (status, &answer["ttl_seconds"]),
        (201, &json!(90)),
        "{answer}"
    );
    let (status, _) = curl(
        &socket,
        "DELETE",
        &format!("/v1/reservations/{}", answer["id"]),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(pf_list(&dir), before, "a refused request changed the store");
    assert_store_and_maps_agree(&dir);
    // Every refused change was audited, with the caller's uid.
    let audit = std::fs::read_to_string(service.audit_log()).unwrap();
    let refused = audit
        .lines()
        .skip(audit_before)
        .filter(|l| l.contains(r#""result":"refused""#) && l.contains(r#""uid":0"#))
        .count();
    assert!(refused >= 10, "{refused} refusals audited: {audit}");
    assert!(audit_lines() > audit_before);
}
