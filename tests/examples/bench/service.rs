//! The reservation service (`pf serve`):
//!
//! 1. Applying N reservations to store and maps: inserting them into a fresh SQLite store (one
//!    transaction), then the reconcile `pf serve` runs on start, which writes them all to empty
//!    maps. Baseline, in the same run: the batched map writes alone (`State::reserve_all`).
//! 2. A reboot: `pf serve` started on the largest store with empty maps, until its API answers,
//!    then `pf stats --json` over every reservation.
//! 3. Reserve-call latency through the API, one connection per call as the CLI makes them,
//!    against the real `pf serve` process holding the largest store of step 1. Baseline: the
//!    same round trip for `GET /v1/status`, which touches neither store nor maps.

use std::{path::Path, time::Instant};

use pf::{
    api::client::Client,
    kernel::bpffs::PinDir,
    kernel::state::State,
    service::config::Config,
    service::store::{NewRecord, SqliteStore, Store},
    service::{
        audit::Audit,
        dataplane::KernelDataPlane,
        engine::{Engine, ReconcileGuard},
    },
};
use pf_tests::{kit::ScratchDir, kit::serve::Service};
use serde_json::{Value, json};

use crate::{Profile, median, per_packet::filler};

/// The public address the latency calls reserve on (the filler uses 198.18.0.0/15).
const LATENCY_IP: &str = "203.0.113.1";

/// The policy the service runs on: every filler's public IP (198.18.0.0 to 198.18.0.16 for up
/// to a million) and the latency calls', so that the store it starts on breaks no rule.
fn policy() -> String {
    let fillers: Vec<String> = (0..=16).map(|i| format!("\"198.18.0.{i}\"")).collect();
    format!(
        "[policy]\npublic_ips = [\"{LATENCY_IP}\", {}]\ntarget_networks = [\"10.0.0.0/8\"]\nport_pool = [\"1-65535\"]\nports_per_owner = 1000000\nmax_range_ports = 4096\nforbid_listening_ports = false\n",
        fillers.join(", ")
    )
}

struct Applied {
    store_seconds: f64,
    reconcile_seconds: f64,
    maps_only_seconds: f64,
}

fn pins(tag: &str) -> ScratchDir {
    ScratchDir::claim(format!(
        "/sys/fs/bpf/pf-bench-svc-{tag}-{}",
        std::process::id()
    ))
}

/// Store and maps from nothing, left in place (the last run's serve the latency calls).
fn apply(size: u32, files: &Path, pin_dir: &Path) -> Result<Applied, String> {
    let reservations: Vec<_> = (0..size).map(filler).collect();
    let records: Vec<NewRecord> = reservations
        .iter()
        .enumerate()
        .map(|(i, r)| NewRecord {
            owner: format!("bench-{}", i % 1000),
            reservation: *r,
            created_ms: 0,
            ttl_ms: None,
            expires_ms: None,
            enabled: true,
            note: String::new(),
        })
        .collect();
    let _ = std::fs::remove_dir_all(files);
    std::fs::create_dir_all(files).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut store = SqliteStore::open(&files.join("pf.db")).map_err(|e| e.to_string())?;
    store.insert_all(&records).map_err(|e| e.to_string())?;
    let store_seconds = start.elapsed().as_secs_f64();

    let config = Config::parse(&policy())?;
    let audit = Audit::open(&files.join("audit.jsonl")).map_err(|e| e.to_string())?;
    let dir = PinDir::new(pin_dir);
    // The maps exist before pf serve starts (its first start, or `pf attach`, made them): only
    // the reconcile is timed, as only the batched writes are in the baseline.
    drop(State::open_for_write(&dir).map_err(|e| e.to_string())?);
    let start = Instant::now();
    let mut engine = Engine::new(
        Box::new(store),
        Box::new(KernelDataPlane::new(dir)),
        config.policy,
        audit,
    )
    .map_err(|e| e.to_string())?;
    let report = engine
        .reconcile(ReconcileGuard {
            force: false,
            store_was_new: false,
            removal_limit: 1.0,
        })
        .map_err(|e| e.message)?;
    let reconcile_seconds = start.elapsed().as_secs_f64();
    if report.reservations != size as usize || report.loaded != size as usize {
        return Err(format!("reconcile applied {report:?}, not {size}"));
    }

    let baseline = pins("maps");
    let baseline_dir = PinDir::new(baseline.path());
    let mut state = State::open_for_write(&baseline_dir).map_err(|e| e.to_string())?;
    let start = Instant::now();
    state
        .reserve_all(&reservations)
        .map_err(|e| e.to_string())?;
    let maps_only_seconds = start.elapsed().as_secs_f64();
    Ok(Applied {
        store_seconds,
        reconcile_seconds,
        maps_only_seconds,
    })
}

/// A `pf serve` config: its socket and audit log in `own`, the store `files/pf.db`, the maps
/// under `pins`.
fn service_config(own: &Path, files: &Path, pins: &Path) -> String {
    format!(
        "[service]\nsocket = \"{0}/pf.sock\"\ndatabase = \"{1}/pf.db\"\naudit_log = \"{0}/audit.jsonl\"\nbpffs = \"{2}\"\n{3}",
        own.display(),
        files.display(),
        pins.display(),
        policy()
    )
}

/// `pf serve` started on the store `apply` left (the largest size) with a fresh pin directory,
/// as after a reboot: seconds until its API answers, and seconds `pf stats --json` then takes
/// over every reservation. One pair per repetition.
fn reboot(profile: &Profile, pf_bin: &Path, files: &Path) -> Result<(Vec<f64>, Vec<f64>), String> {
    let (mut starts, mut stats) = (Vec::new(), Vec::new());
    for run in 0..profile.repetitions {
        let pin_dir = pins(&format!("reboot{run}"));
        let service_files = ScratchDir::claim(files.join(format!("reboot{run}")));
        std::fs::create_dir_all(service_files.path()).map_err(|e| e.to_string())?;
        let config = service_config(service_files.path(), files, pin_dir.path());
        let start = Instant::now();
        let mut service = Service::start_with_config(pf_bin, service_files, &config)
            .map_err(|e| format!("pf serve on the store: {e}"))?;
        starts.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        let out = std::process::Command::new(pf_bin)
            .arg("--bpffs")
            .arg(pin_dir.path())
            .args(["stats", "--json"])
            .output()
            .map_err(|e| format!("pf stats: {e}"))?;
        stats.push(start.elapsed().as_secs_f64());
        service.stop();
        if !out.status.success() {
            return Err(format!(
                "pf stats failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let report: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("pf stats --json output: {e}"))?;
        // Every reservation the maps hold (pf serve disables one whose target is an address of
        // this machine, which a filler target in 10.0.0.0/8 can be).
        let listed = report["reservations"].as_array().map_or(0, Vec::len);
        let held = State::open_for_read(&PinDir::new(pin_dir.path()))
            .map_err(|e| e.to_string())?
            .ok_or("pf serve left no maps")?
            .list()
            .map_err(|e| e.to_string())?
            .len();
        let stored = profile.control_sizes.last().copied().unwrap_or(0) as usize;
        if listed != held || held + 10 < stored {
            return Err(format!(
                "after the start pf stats lists {listed} reservations, the maps hold {held}, the store {stored}"
            ));
        }
    }
    Ok((starts, stats))
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Milliseconds per call, sorted.
pub fn latencies(
    calls: u32,
    mut call: impl FnMut(u32) -> Result<(), String>,
) -> Result<Vec<f64>, String> {
    let mut out = Vec::with_capacity(calls as usize);
    for i in 0..calls {
        let start = Instant::now();
        call(i)?;
        out.push(start.elapsed().as_secs_f64() * 1e3);
    }
    out.sort_by(|a, b| a.total_cmp(b));
    Ok(out)
}

pub fn run(profile: &Profile) -> Result<Value, String> {
    let pf_bin = std::env::var_os("PF_BIN")
        .ok_or("PF_BIN is not set: run the benchmark through `cargo xtask bench`")?;
    println!();
    println!("reservation service: applying N reservations to store and maps (pf serve's start)");
    println!(
        "{:>13} {:>10} {:>13} {:>10} {:>15} {:>13}",
        "reservations", "store ms", "reconcile ms", "total ms", "maps only ms", "vs maps only"
    );
    let files = std::env::temp_dir().join(format!("pf-bench-svc-{}", std::process::id()));
    let files_guard = ScratchDir::claim(&files);
    let mut applied = Vec::new();
    let mut last_pins = None;
    for &size in profile.control_sizes {
        let mut runs = Vec::new();
        for _ in 0..profile.repetitions {
            let pin_dir = pins("store");
            runs.push(apply(size, &files, pin_dir.path())?);
            last_pins = Some(pin_dir);
        }
        let m = |f: fn(&Applied) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let (store, reconcile, maps) = (
            m(|a| a.store_seconds),
            m(|a| a.reconcile_seconds),
            m(|a| a.maps_only_seconds),
        );
        let total = m(|a| a.store_seconds + a.reconcile_seconds);
        println!(
            "{size:>13} {:>10.1} {:>13.1} {:>10.1} {:>15.1} {:>12.1}x",
            store * 1e3,
            reconcile * 1e3,
            total * 1e3,
            maps * 1e3,
            total / maps
        );
        applied.push(json!({
            "reservations": size,
            "store_seconds": runs.iter().map(|a| a.store_seconds).collect::<Vec<_>>(),
            "reconcile_seconds": runs.iter().map(|a| a.reconcile_seconds).collect::<Vec<_>>(),
            "maps_only_seconds": runs.iter().map(|a| a.maps_only_seconds).collect::<Vec<_>>(),
            "median_total_seconds": total,
            "median_maps_only_seconds": maps,
            "total_over_maps_only": total / maps,
        }));
    }

    let (start_runs, stats_runs) = reboot(profile, Path::new(&pf_bin), &files)?;
    let largest = profile.control_sizes.last().copied().unwrap_or(0);
    let (start_m, stats_m) = (median(&start_runs), median(&stats_runs));
    println!();
    println!("pf serve after a reboot: {largest} reservations in the store, empty maps");
    println!("{:<34} {:>10}", "step", "ms");
    println!(
        "{:<34} {:>10.1}",
        "start, until the API answers",
        start_m * 1e3
    );
    println!(
        "{:<34} {:>10.1}",
        "pf stats --json, all of them",
        stats_m * 1e3
    );

    // The latency run: pf serve on the largest store and its maps, already in agreement.
    let pin_dir = last_pins.ok_or("no control sizes in this profile")?;
    let service_files = ScratchDir::claim(files.join("service"));
    std::fs::create_dir_all(service_files.path()).map_err(|e| e.to_string())?;
    let config = service_config(service_files.path(), &files, pin_dir.path());
    let mut service = Service::start_with_config(Path::new(&pf_bin), service_files, &config)
        .map_err(|e| e.to_string())?;
    let client = Client::new(&service.socket());
    let calls = (profile.repetitions as u32 * 100).max(100);
    let status = latencies(calls, |_| {
        client
            .call("GET", "/v1/status", None)
            .map(drop)
            .map_err(|e| e.to_string())
    })?;
    let post = |body: serde_json::Value| {
        client
            .call("POST", "/v1/reservations", Some(&body))
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let reserve = latencies(calls, |i| {
        post(json!({
            "owner": "latency",
            "public": format!("{LATENCY_IP}:{}/tcp", 1024 + i),
            "to": format!("10.200.{}.{}:80", i / 250, i % 250 + 1),
        }))
    })?;
    let auto = latencies(calls, |i| {
        post(json!({
            "owner": "latency",
            "public": format!("{LATENCY_IP}/udp"),
            "to": format!("10.201.{}.{}", i / 250, i % 250 + 1),
        }))
    })?;
    // The same calls while two clients poll the whole list: reads are answered beside the
    // engine, so neither the status nor a change should wait behind them. The calls alternate,
    // 5 ms apart, until the pollers have read the list POLLS times (or a minute passed), so
    // that they overlap the polls whatever a poll costs.
    const POLLS: u64 = 6;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let polled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let socket = service.socket();
    let pollers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, polled, socket) = (stop.clone(), polled.clone(), socket.clone());
            std::thread::spawn(move || {
                let client = Client::new(&socket);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if client.call("GET", "/v1/reservations", None).is_err() {
                        break;
                    }
                    polled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    let (mut polled_status, mut polled_reserve) = (Vec::new(), Vec::new());
    let window = Instant::now();
    let mut measured: Result<(), String> = Ok(());
    for i in 0..2000u32 {
        if polled.load(std::sync::atomic::Ordering::Relaxed) >= POLLS
            || window.elapsed() > std::time::Duration::from_secs(60)
        {
            break;
        }
        let start = Instant::now();
        if let Err(e) = client.call("GET", "/v1/status", None) {
            measured = Err(e.to_string());
            break;
        }
        polled_status.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        if let Err(e) = post(json!({
            "owner": "latency",
            "public": format!("{LATENCY_IP}:{}/tcp", 1024 + calls + i),
            "to": format!("10.202.{}.{}:80", i / 250, i % 250 + 1),
        })) {
            measured = Err(e);
            break;
        }
        polled_reserve.push(start.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in pollers {
        let _ = p.join();
    }
    measured?;
    let polls = polled.load(std::sync::atomic::Ordering::Relaxed);
    polled_status.sort_by(|a, b| a.total_cmp(b));
    polled_reserve.sort_by(|a, b| a.total_cmp(b));
    let polled_calls = polled_status.len();
    if polled_calls == 0 {
        return Err("no call was measured while the list was polled".into());
    }
    service.stop();
    println!();
    println!(
        "reserve-call latency through the API ({calls} sequential calls, {polled_calls} while polled; {largest} reservations held)"
    );
    println!(
        "{:<28} {:>9} {:>9} {:>14}",
        "call", "p50 ms", "p99 ms", "p50 vs status"
    );
    let base = percentile(&status, 0.5);
    let mut latency = Vec::new();
    for (name, v) in [
        ("GET /v1/status (baseline)", &status),
        ("reserve, given port", &reserve),
        ("reserve, automatic port", &auto),
        ("status, 2 clients polling", &polled_status),
        ("reserve, 2 clients polling", &polled_reserve),
    ] {
        let (p50, p99) = (percentile(v, 0.5), percentile(v, 0.99));
        println!("{name:<28} {p50:>9.2} {p99:>9.2} {:>13.1}x", p50 / base);
        latency.push(json!({
            "call": name,
            "calls": v.len(),
            "p50_ms": p50,
            "p99_ms": p99,
            "p50_over_status": p50 / base,
        }));
    }
    println!("(the two polling clients read the whole list {polls} times meanwhile)");
    drop(files_guard);
    Ok(json!({
        "reboot": {
            "reservations": largest,
            "start_seconds": start_runs,
            "median_start_seconds": start_m,
            "stats_seconds": stats_runs,
            "median_stats_seconds": stats_m,
        },
        "apply": applied,
        "latency": {
            "reservations_held": largest,
            "results": latency,
            "full_lists_polled_meanwhile": polls,
        },
    }))
}
