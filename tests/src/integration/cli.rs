//! The `pf` command's contract for bad input: one `error:` line on stderr naming the problem,
//! a non-zero exit, and no change to pf's state.

use std::process::Command;

use serde_json::json;

use crate::{
    kit::ScratchDir,
    kit::netns::Netns,
    kit::serve::{Service, TEST_POLICY},
};

use super::common::{
    TempPinDir, kernel_version, pf, pf_in_ns, pf_list, pf_ok, pf_words, require_root,
};

/// Asserts `pf ARGS` fails with exactly one stderr line that starts `error:` and contains
/// `needle`, printing nothing on stdout.
fn assert_refused(output: std::process::Output, args: &[&str], needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "pf {args:?} succeeded");
    assert!(
        output.stdout.is_empty(),
        "pf {args:?} printed on stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "pf {args:?}: want one stderr line, got {stderr:?}"
    );
    assert!(lines[0].starts_with("error: "), "pf {args:?}: {stderr:?}");
    assert!(
        lines[0].contains(needle),
        "pf {args:?}: {stderr:?} does not mention {needle:?}"
    );
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    require_root();
    let dir = TempPinDir::new();
    let _service = dir.serve();
    pf_ok(
        &dir,
        &["reserve", "198.51.100.1:8080/tcp", "--to", "10.8.0.2:80"],
    );
    pf_ok(
        &dir,
        &["reserve", "198.51.100.1:7000-7009/both", "--to", "10.8.0.3"],
    );
    let before = pf_list(&dir);
    let stats_before = pf_ok(&dir, &["stats"]);

    let cases: &[(&[&str], &str, i32)] = &[
        (
            &["reserve", "198.51.100.1:0/tcp", "--to", "10.8.0.2"],
            "port 0",
            2,
        ),
        (
            &["reserve", "198.51.100.1:65536/tcp", "--to", "10.8.0.2"],
            "'65536' is not a number from 1 to 65535",
            2,
        ),
        (
            &["reserve", "198.51.100.1:9000-8000/tcp", "--to", "10.8.0.2"],
            "9000-8000 is reversed",
            2,
        ),
        (
            &["reserve", "198.51.100.1:1000-9000/udp", "--to", "10.8.0.2"],
            "the largest range is 4096 ports",
            2,
        ),
        (
            &["reserve", "198.51.100.1:80/sctp", "--to", "10.8.0.2"],
            "unknown protocol 'sctp'",
            2,
        ),
        (
            &["reserve", "198.51.100.300:80/tcp", "--to", "10.8.0.2"],
            "'198.51.100.300' is not an IPv4 address",
            2,
        ),
        (
            &["reserve", "198.51.100.1:80/tcp", "--to", "10.8.0"],
            "'10.8.0' is not an IPv4 address",
            2,
        ),
        (
            &["reserve", "198.51.100.1:80/tcp", "--to", "224.0.0.1"],
            "multicast",
            2,
        ),
        (
            &[
                "reserve",
                "198.51.100.1:65530-65535/tcp",
                "--to",
                "10.8.0.2:65534",
            ],
            "would run past 65535",
            2,
        ),
        (
            &["reserve", "198.51.100.1:80/tcp"],
            "required arguments were not provided: --to <TARGET_IP[:PORT]>",
            2,
        ),
        // Conflicts name the existing reservation.
        (
            &["reserve", "198.51.100.1:8080/both", "--to", "10.8.0.5"],
            "198.51.100.1:8080/both overlaps reservation 1 (198.51.100.1:8080/tcp -> 10.8.0.2:80, owner admin)",
            1,
        ),
        (
            &["reserve", "198.51.100.1:7005/udp", "--to", "10.8.0.5"],
            "198.51.100.1:7005/udp overlaps reservation 2 (198.51.100.1:7000-7009/both -> 10.8.0.3:7000-7009",
            1,
        ),
        // A range whose middle conflicts is refused whole.
        (
            &["reserve", "198.51.100.1:8078-8082/tcp", "--to", "10.8.0.7"],
            "198.51.100.1:8078-8082/tcp overlaps reservation 1",
            1,
        ),
        (
            &["reserve", "198.51.100.1:9090/tcp", "--to", "10.8.0.2:80"],
            "target 10.8.0.2:80/tcp is already the target of reservation 1",
            1,
        ),
        (
            &["release", "198.51.100.1:8081/tcp"],
            "no reservation 198.51.100.1:8081/tcp",
            1,
        ),
        (
            &["release", "198.51.100.1:8080/udp"],
            "no reservation 198.51.100.1:8080/udp",
            1,
        ),
        (
            &["release", "198.51.100.1:7000-7004/both"],
            "release that whole, as `pf release 2`",
            1,
        ),
        (
            &["attach", "no-such-if0"],
            "unknown interface 'no-such-if0'",
            1,
        ),
        (
            &["detach", "no-such-if0"],
            "unknown interface 'no-such-if0'",
            1,
        ),
        (&["detach", "lo"], "pf is not attached to lo", 1),
        (
            &["attach", "lo", "--mode", "turbo"],
            "unknown mode 'turbo'",
            2,
        ),
        (
            &["attach", "lo", "--tunnel-side"],
            "lo is not an Ethernet-like interface",
            1,
        ),
        (
            &["attach", "lo", "--fast-path", "--tunnel-side"],
            "'--fast-path' cannot be used with '--tunnel-side'",
            2,
        ),
        (&["frobnicate"], "frobnicate", 2),
        // The service's own checks: policy, lifetimes, ids.
        (
            &["reserve", "198.51.100.1:8090/tcp", "--to", "192.168.1.2"],
            "refused by policy.target_networks: target 192.168.1.2 is outside the tunnel networks (10.8.0.0/16)",
            1,
        ),
        (
            &["reserve", "203.0.113.9:8090/tcp", "--to", "10.8.0.2"],
            "refused by policy.public_ips: 203.0.113.9 is not one of",
            1,
        ),
        (
            &[
                "reserve",
                "198.51.100.1:8090/tcp",
                "--to",
                "10.8.0.2",
                "--ttl",
                "3x",
            ],
            "'3x' is not a lifetime",
            2,
        ),
        (
            &["release", "99"],
            "no reservation with id 99 (see `pf list`)",
            1,
        ),
        (
            &["renew", "99", "--ttl", "1h"],
            "no reservation with id 99",
            1,
        ),
        (&["renew", "1"], "reservation 1 has no lifetime to renew", 2),
        (
            &["disable", "99"],
            "no reservation with id 99 (see `pf list`)",
            1,
        ),
        (
            &["restore", "99"],
            "no expired reservation with id 99 (see `pf list --expired`)",
            1,
        ),
        (&["release"], "required arguments were not provided", 2),
        (
            &["release", "1", "--owner", "admin"],
            "cannot be used with '--owner <OWNER>'",
            2,
        ),
    ];
    for (args, needle, code) in cases {
        let out = pf(&dir, args);
        assert_eq!(out.status.code(), Some(*code), "exit code of pf {args:?}");
        assert_refused(out, args, needle);
        assert_eq!(
            pf_list(&dir),
            before,
            "pf {args:?} changed the reservations"
        );
    }
    assert_eq!(
        pf_ok(&dir, &["stats"]),
        stats_before,
        "refused commands changed the maps"
    );
    // Nothing of the refused range was left behind: its free ports can still be reserved.
    pf_ok(
        &dir,
        &["reserve", "198.51.100.1:8078-8079/tcp", "--to", "10.8.0.7"],
    );
    pf_ok(
        &dir,
        &[
            "reserve",
            "198.51.100.1:8081-8082/tcp",
            "--to",
            "10.8.0.7:8081",
        ],
    );
    assert_eq!(pf_list(&dir).as_array().unwrap().len(), 4);
}

/// `pf ARGS` as the unprivileged uid 65534: the kernel clears its capabilities, and the
/// service's socket (0660, root's) is closed to it.
fn pf_unprivileged(dir: &TempPinDir, args: &[&str]) -> std::process::Output {
    let words = pf_words(dir, args);
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(&words)
        .output()
        .expect("running setpriv")
}

#[test]
fn without_privileges_pf_refuses_and_changes_nothing() {
    require_root();
    let dir = TempPinDir::new();
    let service = dir.serve();
    pf_ok(
        &dir,
        &["reserve", "198.51.100.1:8080/tcp", "--to", "10.8.0.2:80"],
    );
    let before = pf_list(&dir);
    let audit_before = std::fs::read_to_string(service.audit_log()).unwrap();
    // The service's commands: the socket refuses the caller.
    for args in [
        &["list"][..],
        &["reserve", "198.51.100.1:9000/udp", "--to", "10.8.0.2"],
        &["release", "1"],
        &["release", "--owner", "admin"],
        &["disable", "1"],
    ] {
        assert_refused(pf_unprivileged(&dir, args), args, "permission denied on");
    }
    // The kernel's commands: no capabilities.
    for args in [
        &["stats"][..],
        &["attach", "lo"],
        &["detach", "lo"],
        &["refresh"],
    ] {
        assert_refused(pf_unprivileged(&dir, args), args, "pf needs root");
    }
    assert_eq!(pf_list(&dir), before);
    assert_eq!(
        std::fs::read_to_string(service.audit_log()).unwrap(),
        audit_before,
        "a refused connection reached the service"
    );
}

#[test]
fn pin_directory_must_be_on_bpffs() {
    require_root();
    let scratch = ScratchDir::claim(
        std::env::temp_dir().join(format!("pf-not-bpffs-{}", std::process::id())),
    );
    let not_bpffs = scratch.path();
    std::fs::create_dir_all(not_bpffs).unwrap();
    // pf serve refuses to start on it ...
    let started = Service::start(
        &super::common::pf_bin(),
        ScratchDir::claim(
            std::env::temp_dir().join(format!("pf-not-bpffs-svc-{}", std::process::id())),
        ),
        not_bpffs,
        None,
        TEST_POLICY,
    );
    let err = started
        .err()
        .expect("pf serve started on a directory that is not bpffs");
    assert!(
        err.to_string().contains("is not on a BPF filesystem"),
        "{err}"
    );
    // ... and so does attach.
    let out = Command::new(super::common::pf_bin())
        .args(["--bpffs", not_bpffs.to_str().unwrap(), "attach", "lo"])
        .output()
        .unwrap();
    assert_refused(out, &["attach"], "is not on a BPF filesystem");
    let entries = std::fs::read_dir(not_bpffs).unwrap().count();
    assert_eq!(entries, 0, "pf wrote into a directory that is not bpffs");
}

#[test]
fn list_and_stats_on_a_fresh_directory_create_nothing() {
    require_root();
    let dir = TempPinDir::new();
    // Without the service, its commands say so in one line.
    for args in [
        &["list"][..],
        &["reserve", "198.51.100.1:80/tcp", "--to", "10.8.0.2"],
    ] {
        assert_refused(pf(&dir, args), args, "pf serve is not running");
    }
    assert!(pf_ok(&dir, &["stats"]).contains("no state yet"));
    assert!(
        !dir.path().exists(),
        "a read-only command created {}",
        dir.path().display()
    );
}

#[test]
fn attach_is_exclusive_per_interface() {
    require_root();
    let ns = Netns::new(&format!("pf{}-attach", std::process::id())).unwrap();
    ns.run(&[
        "ip", "link", "add", "name", "pfa", "type", "veth", "peer", "name", "pfb",
    ])
    .unwrap();
    ns.run(&["ip", "link", "set", "pfa", "up"]).unwrap();
    ns.run(&["ip", "link", "set", "pfb", "up"]).unwrap();
    let (first, second) = (TempPinDir::new(), TempPinDir::new());
    let run_in = |dir: &TempPinDir, args: &[&str]| pf_in_ns(&ns, dir, args);
    assert!(run_in(&first, &["attach", "pfa"]).status.success());
    for args in [
        &["attach", "pfa"][..],
        &["attach", "pfa", "--fast-path"],
        &["attach", "pfa", "--tunnel-side"],
    ] {
        assert_refused(run_in(&first, args), args, "pf is already attached to pfa");
    }
    // Another pf instance (another pin directory) cannot take the interface over.
    assert_refused(
        run_in(&second, &["attach", "pfa"]),
        &["attach", "pfa"],
        "already has an XDP program that this pin directory did not attach",
    );
    assert!(!second.dir.link("pfa", "xdp").exists());
    // Interface names with a dot (as VLAN devices have) work: bpffs forbids '.' in pin names.
    ns.run(&[
        "ip", "link", "add", "name", "pfc.100", "type", "veth", "peer", "name", "pfd",
    ])
    .unwrap();
    ns.run(&["ip", "link", "set", "pfc.100", "up"]).unwrap();
    assert!(run_in(&first, &["attach", "pfc.100"]).status.success());
    let attached = pf_ok(&first, &["stats", "--json"]);
    let attached: serde_json::Value = serde_json::from_str(&attached).unwrap();
    assert_eq!(attached["attached"], serde_json::json!(["pfa", "pfc.100"]));
    for iface in ["pfa", "pfc.100"] {
        assert!(run_in(&first, &["detach", iface]).status.success());
    }
    let link = ns.run(&["ip", "-d", "link", "show"]).unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("xdp"));
}

#[test]
fn the_shipped_systemd_unit_verifies() {
    require_root();
    let scratch =
        ScratchDir::claim(std::env::temp_dir().join(format!("pf-unit-{}", std::process::id())));
    std::fs::create_dir_all(scratch.path()).unwrap();
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/pf.service"),
    )
    .unwrap();
    // The unit names the installed binary; verify it against the one under test.
    let pf = super::common::pf_bin();
    let unit = unit.replace("/usr/local/bin/pf", pf.to_str().unwrap());
    assert!(unit.contains(&format!("ExecStart={} serve --config", pf.display())));
    let path = scratch.path().join("pf.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("running systemd-analyze (Debian package systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    // Hardened: systemd's own score of the unit's confinement (0 best, 10 worst; the unit
    // before hardening scored 7.3).
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .expect("running systemd-analyze security");
    let report = String::from_utf8_lossy(&out.stdout);
    let score: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for pf.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {report}"));
    assert!(
        score <= 3.0,
        "the unit's exposure level is {score}: {report}"
    );
}

#[test]
fn the_commands_find_the_service_through_its_config() {
    require_root();
    let dir = TempPinDir::new();
    let service = dir.serve();
    let config = service.config();
    let config = config.to_str().unwrap();
    let pf_bare = || {
        let mut c = Command::new(super::common::pf_bin());
        c.env_remove("PF_SOCKET")
            .env_remove("PF_BPFFS")
            .env_remove("PF_CONFIG");
        c
    };
    // No --socket: the config's service.socket; no --bpffs: its service.bpffs.
    let out = pf_bare()
        .args([
            "--config",
            config,
            "reserve",
            "198.51.100.1:8080/tcp",
            "--to",
            "10.8.0.2:80",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = pf_bare()
        .env("PF_CONFIG", config)
        .args(["list", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let out = pf_bare()
        .args(["stats", "--json", "--config", config])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        stats["reservations"].as_array().unwrap().len(),
        1,
        "{stats}"
    );
    // A config that was named must load.
    let args = ["--config", "/nonexistent/pf.toml", "list"];
    assert_refused(
        pf_bare().args(args).output().unwrap(),
        &args,
        "/nonexistent/pf.toml",
    );
    // pf serve is not offered --socket, and refuses PF_SOCKET rather than ignore it.
    let args = ["serve", "--socket", "/tmp/x.sock"];
    let out = pf_bare().args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_refused(out, &args, "--socket");
    let args = ["serve", "--config", config];
    let out = pf_bare()
        .env("PF_SOCKET", "/tmp/x.sock")
        .args(args)
        .output()
        .unwrap();
    assert_refused(
        out,
        &args,
        "takes its socket and pin directory from its config",
    );
    assert_eq!(pf_list(&dir).as_array().unwrap().len(), 1);
}

/// The devices `pf attach` or `pf refresh` says forwarded packets may be redirected to, sorted.
fn redirect_targets(output: &str) -> Vec<String> {
    let list = output
        .split("redirected to ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_default();
    let mut names: Vec<String> = list.split(", ").map(str::to_string).collect();
    names.sort();
    names
}

/// Options that depend on the kernel: each refused clearly where the kernel cannot do it,
/// accepted where it can, and a refusal changes nothing.
#[test]
fn kernel_dependent_attach_options() {
    require_root();
    let ns = Netns::new(&format!("pf{}-kopt", std::process::id())).unwrap();
    ns.run(&[
        "ip", "link", "add", "name", "pfa", "type", "veth", "peer", "name", "pfb",
    ])
    .unwrap();
    ns.run(&["ip", "link", "set", "pfa", "up"]).unwrap();
    ns.run(&["ip", "link", "set", "pfb", "up"]).unwrap();
    ns.run(&["ip", "tuntap", "add", "pftun", "mode", "tun"])
        .unwrap();
    let dir = TempPinDir::new();
    let run_in = |args: &[&str]| pf_in_ns(&ns, &dir, args);
    let kernel = kernel_version();

    // Naming the fast path's devices: only where the kernel cannot say (before 6.3).
    let named = [
        "attach",
        "pfa",
        "--fast-path",
        "--redirect-devices",
        "pfa,pfb",
    ];
    if kernel >= (6, 3) {
        assert_refused(
            run_in(&named),
            &named,
            "--redirect-devices is for kernels before Linux 6.3",
        );
        assert!(!dir.dir.link("pfa", "xdp_fast").exists());
    } else {
        let tun = [
            "attach",
            "pfa",
            "--fast-path",
            "--redirect-devices",
            "pfb,pftun",
        ];
        assert_refused(
            run_in(&tun),
            &tun,
            "pftun is not an Ethernet-like interface",
        );
        assert!(!dir.dir.link("pfa", "xdp_fast").exists());
        let out = run_in(&named);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(redirect_targets(&stdout), ["pfa", "pfb"], "{stdout}");
        assert!(stdout.contains("cannot say"), "{stdout}");
        // A refresh without names keeps the named devices.
        let out = run_in(&["refresh"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(redirect_targets(&stdout), ["pfa", "pfb"], "{stdout}");
        assert!(run_in(&["detach", "pfa"]).status.success());
    }

    // TCX only from 6.6.
    let tcx = ["attach", "pfa", "--tc-attach", "tcx"];
    if kernel >= (6, 6) {
        assert!(run_in(&tcx).status.success());
        assert!(dir.dir.link("pfa", "tc").exists());
        assert!(run_in(&["detach", "pfa"]).status.success());
    } else {
        assert_refused(run_in(&tcx), &tcx, "TCX came in Linux 6.6");
        assert!(!dir.dir.link("pfa", "xdp").exists());
    }
    // Netlink on every kernel: the filter's program is pinned with the namespace, and detach
    // removes it.
    assert!(
        run_in(&["attach", "pfa", "--tc-attach", "netlink"])
            .status
            .success()
    );
    let pins: Vec<String> = std::fs::read_dir(dir.dir.iface_links("pfa"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        pins.iter().any(|p| p.starts_with("tc_netlink_ns")),
        "{pins:?}"
    );
    assert!(run_in(&["detach", "pfa"]).status.success());
    let filters = ns
        .run(&["tc", "filter", "show", "dev", "pfa", "egress"])
        .unwrap();
    assert!(!String::from_utf8_lossy(&filters.stdout).contains("pf_egress"));
    let bad = ["attach", "pfa", "--tc-attach", "sometimes"];
    let out = run_in(&bad);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected auto, tcx or netlink"));
}

/// `pf ARGS` in `dir`'s set-up, stdout parsed as JSON (it must succeed).
fn pf_json(dir: &TempPinDir, args: &[&str]) -> serde_json::Value {
    let out = pf_ok(dir, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("pf {args:?}: {e}: {out}"))
}

#[test]
fn status_and_json_from_every_command_that_prints() {
    require_root();
    let dir = TempPinDir::new();
    // No service: says so, exits 3 (as `systemctl status` does), and shows the kernel's view.
    let out = pf(&dir, &["status"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("pf serve: not running (nothing listens on ")
            && text.contains("attached: (none)"),
        "{text}"
    );
    let out = pf(&dir, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&s["running"], &s["attached"]),
        (&json!(false), &json!([])),
        "{s}"
    );

    let _service = dir.serve();
    let r = pf_json(
        &dir,
        &[
            "reserve",
            "198.51.100.1:8080/tcp",
            "--to",
            "10.8.0.2:80",
            "--ttl",
            "1h",
            "--json",
        ],
    );
    let id = r["id"].as_u64().unwrap().to_string();
    assert_eq!(r["spec"], "198.51.100.1:8080/tcp -> 10.8.0.2:80", "{r}");
    assert_eq!(
        pf_json(&dir, &["renew", &id, "--json"])["ttl_seconds"],
        3600
    );
    assert_eq!(pf_json(&dir, &["disable", &id, "--json"])["enabled"], false);
    assert_eq!(pf_json(&dir, &["enable", &id, "--json"])["enabled"], true);

    let text = pf_ok(&dir, &["status"]);
    for line in [
        "pf serve: running (version ",
        "reservations: 1, next expiry ",
        "store: writable",
        "last reconcile: ",
        "policy violations: none",
    ] {
        assert!(text.contains(line), "{line:?} not in {text}");
    }
    let s = pf_json(&dir, &["status", "--json"]);
    assert_eq!(s["running"], true, "{s}");
    assert_eq!(s["service"]["reservations"], 1, "{s}");
    assert_eq!(s["service"]["last_reconcile"]["drifts"], 0, "{s}");

    let released = pf_json(&dir, &["release", &id, "--json"]);
    assert_eq!(released.as_array().map(Vec::len), Some(1), "{released}");
    assert_eq!(
        pf_json(&dir, &["release", "--owner", "nobody", "--json"]),
        json!([])
    );

    // The kernel commands: attach, refresh and detach in JSON.
    let ns = Netns::new(&format!("pf{}-json", std::process::id())).unwrap();
    ns.run(&[
        "ip", "link", "add", "name", "pfj", "type", "veth", "peer", "name", "pfk",
    ])
    .unwrap();
    ns.run(&["ip", "link", "set", "pfj", "up"]).unwrap();
    let json_in = |args: &[&str]| -> serde_json::Value {
        let out = pf_in_ns(&ns, &dir, args);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let a = json_in(&["attach", "pfj", "--json"]);
    assert_eq!(
        (&a["interface"], &a["role"]),
        (&json!("pfj"), &json!("public")),
        "{a}"
    );
    assert!(a["xdp_mode"] == "native" || a["xdp_mode"] == "skb", "{a}");
    if kernel_version() >= (6, 3) {
        assert!(json_in(&["refresh", "--json"])["redirect_devices"].is_array());
    }
    assert_eq!(
        json_in(&["detach", "pfj", "--json"]),
        json!({ "detached": "pfj" })
    );
}
