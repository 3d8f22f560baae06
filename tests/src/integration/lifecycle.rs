//! `pf serve` as systemd runs it: readiness and reload told over a real `NOTIFY_SOCKET`,
//! SIGHUP re-reading the config (a bad one refused, a narrowed policy enforced as it says),
//! log lines with the journal's priorities, `--check-config`, and a config the service cannot
//! run on ending with EX_CONFIG (which the unit does not restart) and what to do.

use std::{
    os::unix::{fs::MetadataExt, net::UnixDatagram},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use pf::{api::client::Client, kernel::state::State};
use serde_json::{Value, json};

use crate::{
    kit::ScratchDir,
    kit::serve::{Service, TEST_POLICY, config_text},
    kit::topology::{CLIENT_IP, PUBLIC_IFACE, Topology},
};

use super::common::{TempPinDir, kernel_version, pf_bin, pf_in_ns, require_root};

/// What `pf serve` exits with when its config cannot run (sysexits' EX_CONFIG).
const EX_CONFIG: i32 = 78;

/// The next message on systemd's notify socket, as the test plays systemd.
fn next_notice(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("pf serve told systemd nothing within the timeout");
    // One state per line, each ending in a newline.
    String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
}

fn sighup(service: &Service) {
    // SAFETY: kill(2) on the service's pid.
    assert_eq!(
        unsafe { libc::kill(service.pid().unwrap() as i32, libc::SIGHUP) },
        0
    );
}

/// Waits (bounded) until the service's log holds `text`.
fn wait_for_log(service: &Service, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !service.log().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} in the log: {}",
            service.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn call(
    service: &Service,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, String> {
    Client::new(&service.socket())
        .call(method, path, body)
        .map_err(|e| e.to_string())
}

fn in_maps(dir: &TempPinDir) -> Vec<String> {
    let state = State::open_for_read(&dir.dir).unwrap().expect("pf's maps");
    let mut all: Vec<String> = state
        .list()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    all.sort();
    all
}

/// The service's config with `policy` after its `[service]` section.
fn rewrite_config(service: &Service, dir: &TempPinDir, policy: &str) {
    let text = config_text(
        service.socket().parent().unwrap(),
        dir.path(),
        &service.database(),
        &service.audit_log(),
        policy,
    );
    std::fs::write(service.config(), text).unwrap();
}

#[test]
fn sighup_reloads_the_policy_refuses_a_bad_config_and_tells_systemd() {
    require_root();
    let dir = TempPinDir::new();
    let systemd =
        ScratchDir::claim(std::env::temp_dir().join(format!("pf-notify-{}", std::process::id())));
    std::fs::create_dir_all(systemd.path()).unwrap();
    let notify_path = systemd.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();

    let files = ScratchDir::claim(dir.socket().parent().unwrap());
    let mut service = Service::prepare(&pf_bin(), files, dir.path(), None, TEST_POLICY).unwrap();
    // stderr is "the journal" when JOURNAL_STREAM names its device and inode, as systemd
    // sets it: the log file the service writes to plays the journal's stream.
    let log = service.socket().parent().unwrap().join("serve.log");
    std::fs::write(&log, "").unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    service
        .env
        .push(("NOTIFY_SOCKET".into(), notify_path.display().to_string()));
    service.env.push((
        "JOURNAL_STREAM".into(),
        format!("{}:{}", meta.dev(), meta.ino()),
    ));
    service.spawn().unwrap();
    assert_eq!(next_notice(&notify), "READY=1");
    assert!(
        service.log().contains("<6>listening on"),
        "no journal priority on the log lines: {}",
        service.log()
    );

    let reserve = |public: &str, to: &str| -> u64 {
        call(
            &service,
            "POST",
            "/v1/reservations",
            Some(&json!({ "owner": "acct-1", "public": public, "to": to, "ttl": "1h" })),
        )
        .unwrap()["id"]
            .as_u64()
            .unwrap()
    };
    reserve("198.51.100.1:30001/tcp", "10.8.0.2:80");
    let outside = reserve("198.51.100.1:40001/tcp", "10.8.0.2:81");
    assert!(
        service.log().contains("<6>reserve ok by uid 0"),
        "a change is logged at info: {}",
        service.log()
    );

    // A config that does not parse: refused, the running one stays, systemd hears of both.
    std::fs::write(service.config(), "[policy]\nport_pool = [").unwrap();
    sighup(&service);
    assert!(next_notice(&notify).starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert_eq!(next_notice(&notify), "READY=1");
    wait_for_log(&service, "<3>reload refused, the running config stays");
    assert_eq!(in_maps(&dir).len(), 2);

    // A narrowed pool that reports only: both keep forwarding, the one outside is a
    // violation, and it cannot be renewed.
    let narrowed = TEST_POLICY.replace(
        r#"port_pool = ["1-65535"]"#,
        r#"port_pool = ["30000-30999"]"#,
    );
    assert_ne!(narrowed, TEST_POLICY);
    rewrite_config(&service, &dir, &narrowed);
    sighup(&service);
    assert!(next_notice(&notify).starts_with("RELOADING=1"));
    assert_eq!(next_notice(&notify), "READY=1");
    wait_for_log(&service, "reloaded the policy: 1 reservations break it");
    assert!(
        service.log().contains(&format!(
            "<4>reservation {outside} (198.51.100.1:40001/tcp -> 10.8.0.2:81, owner acct-1) breaks the policy: refused by policy.port_pool"
        )),
        "{}",
        service.log()
    );
    assert_eq!(in_maps(&dir).len(), 2);
    let status = call(&service, "GET", "/v1/status", None).unwrap();
    assert_eq!(
        status["policy_violations"],
        json!([{
            "id": outside,
            "owner": "acct-1",
            "public": "198.51.100.1:40001/tcp",
            "enabled": true,
            "rule": "policy.port_pool",
            "detail": "port 40001 is outside the port pool (30000-30999)",
        }]),
        "{status}"
    );
    let renew = call(
        &service,
        "POST",
        &format!("/v1/reservations/{outside}/renew"),
        Some(&json!({})),
    );
    assert!(
        renew
            .as_ref()
            .is_err_and(|e| e.contains("policy.port_pool")),
        "{renew:?}"
    );

    // The same pool, enforced: the violator stops forwarding (its ports kept), audited.
    rewrite_config(
        &service,
        &dir,
        &format!("{narrowed}on_violation = \"disable\"\n"),
    );
    sighup(&service);
    assert!(next_notice(&notify).starts_with("RELOADING=1"));
    assert_eq!(next_notice(&notify), "READY=1");
    wait_for_log(&service, "1 disabled for it");
    assert_eq!(
        in_maps(&dir),
        vec!["198.51.100.1:30001/tcp -> 10.8.0.2:80".to_string()]
    );
    let listed = call(
        &service,
        "GET",
        &format!("/v1/reservations/{outside}"),
        None,
    )
    .unwrap();
    assert_eq!(listed["enabled"], false, "{listed}");
    let audit = std::fs::read_to_string(service.audit_log()).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("\"action\":\"disable\"")
            && l.contains(&format!("\"id\":{outside},"))
            && l.contains("policy.port_pool")),
        "{audit}"
    );

    service.stop();
    assert_eq!(next_notice(&notify), "STOPPING=1");
}

/// `pf serve --config PATH --check-config`: (exit code, stdout, stderr).
fn check_config(path: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(pf_bin())
        .args(["serve", "--check-config", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_and_a_config_the_service_cannot_run_on() {
    require_root();
    let dir = TempPinDir::new();
    let checked = ScratchDir::claim(
        std::env::temp_dir().join(format!("pf-check-config-{}", std::process::id())),
    );
    std::fs::create_dir_all(checked.path()).unwrap();
    let path = checked.path().join("pf.toml");
    let good = config_text(
        checked.path(),
        dir.path(),
        &checked.path().join("pf.db"),
        &checked.path().join("audit.jsonl"),
        TEST_POLICY,
    );
    std::fs::write(&path, &good).unwrap();
    let (code, stdout, stderr) = check_config(&path);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, format!("{}: valid\n", path.display()));
    // Nothing was started or made.
    assert!(!checked.path().join("pf.db").exists());
    assert!(!checked.path().join("pf.sock").exists());

    std::fs::write(
        &path,
        good.replace("[policy]", "[policy]\nport_poll = [\"1-2\"]"),
    )
    .unwrap();
    let (code, _, stderr) = check_config(&path);
    assert_eq!(code, Some(EX_CONFIG), "{stderr}");
    assert!(
        stderr.contains("port_poll"),
        "the error names the key: {stderr}"
    );

    std::fs::write(
        &path,
        good.replace(
            "[service]\n",
            "[service]\nsocket_group = \"no-such-group-pf\"\n",
        ),
    )
    .unwrap();
    let (code, _, stderr) = check_config(&path);
    assert_eq!(code, Some(EX_CONFIG), "{stderr}");
    assert!(stderr.contains("no-such-group-pf"), "{stderr}");

    // The interface attached by hand in one role, the config asking for another: the start
    // is refused with what to do, and EX_CONFIG so that systemd does not loop on it.
    let topo = Topology::new(&format!("pf{}cfg", std::process::id())).unwrap();
    let out = pf_in_ns(&topo.server, &dir, &["attach", PUBLIC_IFACE]);
    assert!(out.status.success(), "{out:?}");
    let mut service = Service::prepare(
        &pf_bin(),
        ScratchDir::claim(dir.socket().parent().unwrap()),
        dir.path(),
        Some(topo.server.path()),
        &format!("[[interfaces]]\nname = \"{PUBLIC_IFACE}\"\nrole = \"fast-path\"\n{TEST_POLICY}"),
    )
    .unwrap();
    let (status, log) = service.run_to_exit().unwrap();
    assert_eq!(status.code(), Some(EX_CONFIG), "{log}");
    assert!(
        log.contains("pub0 is attached as 'public' but the config says 'public, fast path'")
            && log.contains("pf detach pub0"),
        "{log}"
    );
    let out = pf_in_ns(&topo.server, &dir, &["detach", PUBLIC_IFACE]);
    assert!(out.status.success(), "{out:?}");
}

/// `pf stats --json` in the server's namespace.
fn stats_in(topo: &Topology, dir: &TempPinDir) -> Value {
    let out = pf_in_ns(&topo.server, dir, &["stats", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits (bounded) until `check` holds of the stats.
fn wait_for_stats(topo: &Topology, dir: &TempPinDir, what: &str, check: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stats_in(topo, dir);
        if check(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {s}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The topology (named after `tag`) with the client serving each `(port, page)` over HTTP on
/// its tunnel address; the pages' directory goes with the returned guard.
fn serving(tag: &str, pages: &[(u16, &str)]) -> (Topology, ScratchDir) {
    let topo = Topology::new(&format!("pf{}{tag}", std::process::id())).unwrap();
    let www = ScratchDir::claim(
        std::env::temp_dir().join(format!("pf-www-{tag}-{}", std::process::id())),
    );
    for (port, page) in pages {
        let dir = www.path().join(port.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("index.html"), page).unwrap();
        topo.client
            .serve_directory(CLIENT_IP, *port, dir.to_str().unwrap())
            .unwrap();
    }
    (topo, www)
}

/// The public URL of the reservation [`forwarding`] makes.
const URL: &str = "http://198.51.100.1:8080/";

/// `pf serve` in the topology's server namespace on pub0 in `role`, with 198.51.100.1:8080/tcp
/// reserved for `owner` towards the client's port 80: the service and the reservation's id.
fn forwarding(dir: &TempPinDir, topo: &Topology, role: &str, owner: &str) -> (Service, u64) {
    let service = dir.serve_with(
        Some(&topo.server),
        &format!("[[interfaces]]\nname = \"{PUBLIC_IFACE}\"\nrole = \"{role}\"\n{TEST_POLICY}"),
    );
    let made = call(
        &service,
        "POST",
        "/v1/reservations",
        Some(&json!({ "owner": owner, "public": "198.51.100.1:8080/tcp", "to": "10.8.0.2:80" })),
    )
    .unwrap();
    let id = made["id"].as_u64().unwrap();
    (service, id)
}

#[test]
fn the_service_follows_its_interfaces_as_they_go_and_come_back() {
    require_root();
    let dir = TempPinDir::new();
    let (topo, _www) = serving("lnk", &[(80, "followed\n")]);
    let (service, _) = forwarding(&dir, &topo, "fast-path", "acct-1");
    let url = URL;
    assert_eq!(topo.inet.curl(url).unwrap(), "followed\n");

    // The public interface deleted: reported. Made again: attached again, with no restart,
    // and forwarding resumes.
    topo.server
        .run(&["ip", "link", "del", PUBLIC_IFACE])
        .unwrap();
    wait_for_log(&service, "pub0 is gone (ifindex ");
    topo.link_public().unwrap();
    wait_for_log(&service, "pub0 is back: attached again");
    wait_for_stats(&topo, &dir, "pub0 attached again", |s| {
        s["attached"] == json!(["pub0"])
    });
    assert_eq!(topo.inet.curl(url).unwrap(), "followed\n");

    // A device that starts taking redirected frames (a veth whose peer turns GRO on) joins
    // the fast path's device map without `pf refresh`; deleted, it leaves it.
    if kernel_version() >= (6, 3) {
        let in_redirect = |s: &Value| {
            s["fast_path_devices"]["redirect"]
                .as_array()
                .is_some_and(|d| d.iter().any(|n| n == "pfx"))
        };
        assert!(!in_redirect(&stats_in(&topo, &dir)));
        topo.server
            .run(&[
                "ip", "link", "add", "pfx", "type", "veth", "peer", "name", "pfy",
            ])
            .unwrap();
        for dev in ["pfx", "pfy"] {
            topo.server.run(&["ip", "link", "set", dev, "up"]).unwrap();
        }
        topo.server
            .run(&["ethtool", "-K", "pfy", "gro", "on"])
            .unwrap();
        wait_for_stats(&topo, &dir, "pfx in the redirect devices", in_redirect);
        topo.server.run(&["ip", "link", "del", "pfx"]).unwrap();
        wait_for_stats(&topo, &dir, "pfx out of the redirect devices", |s| {
            !in_redirect(s)
        });
    }
}

#[test]
fn stats_name_each_reservation_and_its_traffic_outlives_a_disable() {
    require_root();
    let dir = TempPinDir::new();
    let (topo, _www) = serving("sta", &[(80, "counted\n")]);
    let (service, id) = forwarding(&dir, &topo, "public", "acct-7");
    let url = URL;
    let row = |topo: &Topology| -> Value {
        let s = stats_in(topo, &dir);
        s["reservations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("reservation {id} not in {s}"))
    };
    for _ in 0..3 {
        assert_eq!(topo.inet.curl(url).unwrap(), "counted\n");
    }
    let first = row(&topo);
    assert_eq!(
        (&first["owner"], &first["enabled"], &first["spec"]),
        (
            &json!("acct-7"),
            &json!(true),
            &json!("198.51.100.1:8080/tcp -> 10.8.0.2:80")
        ),
        "{first}"
    );
    let before = first["traffic"]["in_packets"].as_u64().unwrap();
    assert!(
        before >= 3 * 5,
        "three TCP exchanges counted {before} packets in: {first}"
    );
    // Disabled: out of the maps, its counts kept; enabled again, they go on from there.
    call(
        &service,
        "POST",
        &format!("/v1/reservations/{id}/disable"),
        None,
    )
    .unwrap();
    let disabled = row(&topo);
    assert_eq!(disabled["enabled"], false, "{disabled}");
    assert_eq!(disabled["traffic"], first["traffic"], "{disabled}");
    call(
        &service,
        "POST",
        &format!("/v1/reservations/{id}/enable"),
        None,
    )
    .unwrap();
    assert_eq!(topo.inet.curl(url).unwrap(), "counted\n");
    let after = row(&topo)["traffic"]["in_packets"].as_u64().unwrap();
    assert!(after > before, "{after} packets in after {before}");
    // The text table names id and owner.
    let out = pf_in_ns(&topo.server, &dir, &["stats"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with(&format!("{id} acct-7"))
                && l.contains("198.51.100.1:8080/tcp -> 10.8.0.2:80")),
        "{text}"
    );
    // A release answers with, and audits, the totals.
    let released = call(&service, "DELETE", &format!("/v1/reservations/{id}"), None).unwrap();
    assert_eq!(released["traffic"]["in_packets"], after, "{released}");
    let audit = std::fs::read_to_string(service.audit_log()).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("\"action\":\"release\"")
            && l.contains(&format!("\"in_packets\":{after}"))),
        "{audit}"
    );
}

/// The value of the series `name{labels}` in a scrape, if it is there.
fn series(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn prometheus_metrics_and_healthz() {
    require_root();
    let dir = TempPinDir::new();
    let (topo, _www) = serving("met", &[(80, "scraped\n")]);
    // Served inside the server's namespace, on its loopback: the scrape never leaves it.
    let policy = TEST_POLICY.replace(r#"port_pool = ["1-65535"]"#, r#"port_pool = ["8000-8999"]"#);
    let service = dir.serve_with(
        Some(&topo.server),
        &format!(
            "[[interfaces]]\nname = \"{PUBLIC_IFACE}\"\n[metrics]\nlisten = \"127.0.0.1:9477\"\nper_reservation_limit = 2\n{policy}"
        ),
    );
    let scrape = || -> String {
        let out = topo
            .server
            .run(&[
                "curl",
                "--silent",
                "--fail",
                "--max-time",
                "10",
                "http://127.0.0.1:9477/metrics",
            ])
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let reserve = |public: &str, to: &str| {
        call(
            &service,
            "POST",
            "/v1/reservations",
            Some(&json!({ "owner": "acct-9", "public": public, "to": to })),
        )
    };
    let id = reserve("198.51.100.1:8080/tcp", "10.8.0.2:80").unwrap()["id"]
        .as_u64()
        .unwrap();
    assert!(reserve("198.51.100.1:9090/tcp", "10.8.0.2:81").is_err());
    for _ in 0..2 {
        assert_eq!(
            topo.inet.curl("http://198.51.100.1:8080/").unwrap(),
            "scraped\n"
        );
    }
    let text = scrape();
    let reservation_in =
        format!("pf_reservation_packets_total{{id=\"{id}\",owner=\"acct-9\",direction=\"in\"}}");
    let packets_in = series(&text, &reservation_in).unwrap_or_else(|| panic!("{text}"));
    assert!(packets_in >= 10.0, "{text}");
    assert_eq!(
        series(&text, "pf_owner_packets{owner=\"acct-9\",direction=\"in\"}"),
        Some(packets_in),
        "{text}"
    );
    assert!(
        series(&text, "pf_ingress_packets_total{outcome=\"rewritten\"}").unwrap() >= packets_in
    );
    assert_eq!(
        series(&text, "pf_reservations{state=\"enabled\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        series(&text, "pf_refusals_total{reason=\"policy.port_pool\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        series(
            &text,
            "pf_interfaces{interface=\"pub0\",role=\"public\",live=\"true\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        series(&text, "pf_change_duration_seconds_count").unwrap() >= 2.0,
        "{text}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    // Past the limit, the per-reservation series go and the per-owner ones stay.
    reserve("198.51.100.1:8081/tcp", "10.8.0.2:82").unwrap();
    reserve("198.51.100.1:8082/tcp", "10.8.0.2:83").unwrap();
    let text = scrape();
    assert_eq!(series(&text, &reservation_in), None, "{text}");
    assert_eq!(
        series(&text, "pf_per_reservation_series_omitted"),
        Some(1.0),
        "{text}"
    );
    assert!(
        series(&text, "pf_owner_packets{owner=\"acct-9\",direction=\"in\"}").unwrap() >= packets_in
    );
    // Only GET /metrics.
    let out = topo
        .server
        .run(&[
            "curl",
            "--silent",
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_code}",
            "http://127.0.0.1:9477/",
        ])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");

    // /healthz on the API: ok, then 503 naming the interface once pub0 is gone.
    assert_eq!(
        call(&service, "GET", "/healthz", None).unwrap(),
        json!({ "status": "ok" })
    );
    topo.server
        .run(&["ip", "link", "del", PUBLIC_IFACE])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match call(&service, "GET", "/healthz", None) {
            Err(e) if e.contains("pub0 is not attached") => break,
            other => assert!(Instant::now() < deadline, "{other:?}"),
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_change_in_place_moves_the_target_with_real_traffic() {
    require_root();
    let dir = TempPinDir::new();
    let (topo, _www) = serving("chg", &[(80, "old target\n"), (81, "new target\n")]);
    let (service, id) = forwarding(&dir, &topo, "public", "acct-1");
    let id = id.to_string();
    let url = URL;
    assert_eq!(topo.inet.curl(url).unwrap(), "old target\n");
    let out = pf_in_ns(
        &topo.server,
        &dir,
        &[
            "change",
            &id,
            "--to",
            "10.8.0.2:81",
            "--note",
            "moved to 81",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&format!(
            "changed {id}: 198.51.100.1:8080/tcp -> 10.8.0.2:81 (owner acct-1"
        )),
        "{out:?}"
    );
    assert_eq!(topo.inet.curl(url).unwrap(), "new target\n");
    let maps = in_maps(&dir);
    assert_eq!(
        maps,
        vec!["198.51.100.1:8080/tcp -> 10.8.0.2:81".to_string()]
    );
    let audit = std::fs::read_to_string(service.audit_log()).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("\"action\":\"change\"")
            && l.contains("\"result\":\"ok\"")
            && l.contains("10.8.0.2:81")),
        "{audit}"
    );
}

/// `curl -X METHOD` on the service's socket: (status, body).
fn curl_status(service: &Service, method: &str, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["--silent", "--max-time", "10", "--unix-socket"])
        .arg(service.socket())
        .args(["-X", method, "--write-out", "\n%{http_code}"])
        .arg(format!("http://pf{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[test]
fn the_api_serves_what_its_openapi_description_lists() {
    require_root();
    let dir = TempPinDir::new();
    let service = dir.serve();
    let (status, doc) = curl_status(&service, "GET", "/v1/openapi.json");
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    for (method, template) in pf::service::ROUTES {
        assert!(
            doc["paths"][template][method.to_lowercase()].is_object(),
            "{method} {template} is not described"
        );
        let path = template
            .replace("{id}", "1")
            .replace("{address}", "10.8.0.2");
        let (status, body) = curl_status(&service, method, &path);
        // Served: whatever the answer (a missing body, no id 1), it is not "no such path" or
        // "method not allowed".
        assert!(
            status != 405 && !body.contains("no such API path"),
            "{method} {path}: {status} {body}"
        );
        // A method not described is refused with 405.
        let undescribed = ["PUT", "PATCH", "POST"]
            .into_iter()
            .find(|m| !doc["paths"][template][m.to_lowercase()].is_object())
            .unwrap();
        let (status, _) = curl_status(&service, undescribed, &path);
        assert_eq!(status, 405, "{undescribed} {path}");
    }
    let (status, body) = curl_status(&service, "GET", "/v1/nothing");
    assert_eq!(status, 404);
    assert!(body.contains("no such API path"), "{body}");
}

#[test]
fn lists_filter_and_page_and_are_read_beside_the_engine() {
    require_root();
    let dir = TempPinDir::new();
    let service = dir.serve();
    let mut ids = Vec::new();
    for (i, (owner, to, ttl)) in [
        ("acct-1", "10.8.0.2", Some("1h")),
        ("acct-1", "10.8.0.3", None),
        ("acct-2", "10.8.0.2", Some("30d")),
        ("acct-2", "10.8.0.4", Some("2h")),
    ]
    .into_iter()
    .enumerate()
    {
        let port = 9000 + i as u16 * 10;
        let mut body = json!({ "owner": owner, "public": format!("198.51.100.1:{port}-{}/tcp", port + 2), "to": to });
        if let Some(ttl) = ttl {
            body["ttl"] = json!(ttl);
        }
        ids.push(
            call(&service, "POST", "/v1/reservations", Some(&body)).unwrap()["id"]
                .as_u64()
                .unwrap(),
        );
    }
    let listed = |query: &str| -> Vec<u64> {
        call(&service, "GET", &format!("/v1/reservations{query}"), None)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(listed(""), ids);
    assert_eq!(listed("?owner=acct-2"), ids[2..]);
    assert_eq!(listed("?public_port=9011"), [ids[1]]);
    assert_eq!(listed("?target=10.8.0.2"), [ids[0], ids[2]]);
    let soon = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() + Duration::from_secs(3 * 3600),
    );
    assert_eq!(
        listed(&format!("?expiring_before={soon}")),
        [ids[0], ids[3]]
    );
    assert_eq!(listed("?owner=acct-1&target=10.8.0.3"), [ids[1]]);
    // Pages by id: each after the last of the one before.
    assert_eq!(listed("?limit=3"), ids[..3]);
    assert_eq!(listed(&format!("?limit=3&after={}", ids[2])), ids[3..]);
    // The CLI asks the same.
    let out = pf_in_ns_host(&dir, &["list", "--target", "10.8.0.2", "--json"]);
    let rows: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2, "{rows}");
    for (query, needle) in [
        ("?public_port=0", "public_port: '0' is not a port"),
        ("?target=x", "target: 'x' is not an IPv4 address"),
        ("?limit=0", "limit: '0' is not a count"),
        (
            "?expiring_before=soon",
            "expiring_before: 'soon' is not a time",
        ),
        ("?colour=red", "unknown query parameter 'colour'"),
    ] {
        let e = call(&service, "GET", &format!("/v1/reservations{query}"), None).unwrap_err();
        assert!(e.contains(needle), "{query}: {e}");
    }

    // Reads do not wait for the engine: stopped (SIGSTOP on its whole process would stop
    // the reads too), so hold it with a change that waits on the store's write lock instead.
    let db = service.database();
    let mut holder = Command::new("sqlite3")
        .arg(&db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sqlite3 (Debian package sqlite3)");
    use std::io::Write;
    let stdin = holder.stdin.as_mut().unwrap();
    stdin.write_all(b"BEGIN IMMEDIATE; SELECT 1;\n").unwrap();
    stdin.flush().unwrap();
    thread::sleep(Duration::from_millis(300));
    let socket = service.socket();
    let blocked = thread::spawn(move || {
        Client::new(&socket).call(
            "POST",
            "/v1/reservations",
            Some(
                &json!({ "owner": "acct-3", "public": "198.51.100.1:9900/tcp", "to": "10.8.0.9" }),
            ),
        )
    });
    thread::sleep(Duration::from_millis(300));
    // The change waits on the lock (up to the store's 5 s busy timeout); the reads are
    // answered while it still waits.
    assert_eq!(listed("").len(), 4);
    let status = call(&service, "GET", "/v1/status", None).unwrap();
    assert_eq!(status["reservations"], 4, "{status}");
    assert!(
        !blocked.is_finished(),
        "the change did not wait on the lock, or the reads waited for it"
    );
    let _ = holder.stdin.take().map(|mut s| s.write_all(b"ROLLBACK;\n"));
    let _ = holder.wait();
    blocked.join().unwrap().unwrap();
}

/// `pf ARGS` with `dir`'s socket, on the host: stdout (it must succeed).
fn pf_in_ns_host(dir: &TempPinDir, args: &[&str]) -> String {
    super::common::pf_ok(dir, args)
}

/// `pf trace ARGS --json` in the server's namespace, running while `during` runs: its lines.
fn traced(topo: &Topology, dir: &TempPinDir, args: &[&str], during: impl FnOnce()) -> Vec<Value> {
    let mut words = super::common::pf_words(dir, &["trace", "--json"]);
    words.extend(args.iter().map(|a| a.to_string()));
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let child = topo
        .server
        .nsenter(&words)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The switch goes on within a few milliseconds of the start.
    thread::sleep(Duration::from_millis(500));
    during();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn pf_trace_shows_each_decision_live_and_switches_off_after() {
    require_root();
    let dir = TempPinDir::new();
    let (topo, _www) = serving("trc", &[(80, "traced\n")]);
    let (_service, _) = forwarding(&dir, &topo, "public", "acct-1");
    // Filtered on the public port: the request's packets in, rewritten towards the client, and
    // the replies out, rewritten back; nothing of other ports.
    let lines = traced(&topo, &dir, &["198.51.100.1:8080", "--for", "2s"], || {
        assert_eq!(topo.inet.curl(URL).unwrap(), "traced\n");
        let _ = topo.inet.curl("http://198.51.100.1:9999/");
    });
    let has = |hook: &str, outcome: &str, field: &str, endpoint: &str| {
        lines.iter().any(|l| {
            l["hook"] == hook
                && l["outcome"] == outcome
                && l[field].as_str().is_some_and(|e| e.starts_with(endpoint))
        })
    };
    assert!(
        has("ingress", "rewritten", "destination", "198.51.100.1:8080"),
        "{lines:?}"
    );
    assert!(
        has(
            "ingress",
            "rewritten",
            "rewritten_destination",
            "10.8.0.2:80"
        ),
        "{lines:?}"
    );
    assert!(
        has("egress", "rewritten", "source", "10.8.0.2:80"),
        "{lines:?}"
    );
    assert!(
        has(
            "egress",
            "rewritten",
            "rewritten_source",
            "198.51.100.1:8080"
        ),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| l["protocol"] == "tcp"), "{lines:?}");
    assert!(!has(
        "ingress",
        "no_reservation",
        "destination",
        "198.51.100.1:9999"
    ));
    // Unfiltered, a miss shows as what it is. The first trace switched tracing off as it ended,
    // or this one would be refused.
    let lines = traced(&topo, &dir, &["--for", "2s"], || {
        let _ = topo.inet.curl("http://198.51.100.1:9999/");
    });
    assert!(
        lines.iter().any(|l| l["hook"] == "ingress"
            && l["outcome"] == "no_reservation"
            && l["destination"] == "198.51.100.1:9999"),
        "{lines:?}"
    );
    // A trace that was killed leaves it on: the next is refused until `pf trace --off`.
    let words = super::common::pf_words(&dir, &["trace", "--for", "30s"]);
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let mut child = topo
        .server
        .nsenter(&words)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    let out = pf_in_ns(&topo.server, &dir, &["trace", "--for", "1s"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pf trace --off"),
        "{out:?}"
    );
    let out = pf_in_ns(&topo.server, &dir, &["trace", "--off"]);
    assert!(out.status.success(), "{out:?}");
    let out = pf_in_ns(&topo.server, &dir, &["trace", "--for", "1s"]);
    assert!(out.status.success(), "{out:?}");
}
