//! A fleet on one PostgreSQL store (a real server this section starts on a temporary data
//! directory):
//!
//! 1. A cold agent: N reservations already in the store, empty maps; the engine opened on the
//!    store and its start's reconcile timed, from PostgreSQL and, in the same run, from SQLite
//!    (the baseline: the embedded store the same N come from).
//! 2. Convergence: three `pf serve` agents on one database (their maps only: no interface is
//!    needed to follow the store); a fleet-wide reserve or release through agent 0's API, and
//!    the time until the maps of agents 1 and 2 both show it (read every 0.2 ms). Baseline: the
//!    same call's own latency through agent 0's API, which returns once agent 0's own maps
//!    hold it.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as AyaHashMap, Map, MapData};
use pf::{
    api::client::Client,
    kernel::{bpffs::PinDir, state::State},
    service::{
        audit::Audit,
        config::Config,
        dataplane::KernelDataPlane,
        engine::{Engine, ReconcileGuard},
        store::{NewRecord, PostgresLocation, PostgresStore, SqliteStore, Store},
    },
    testing::postgres::TempPostgres,
};
use pf_common::{ReservationKey, ReservationValue, map_names};
use pf_tests::kit::{ScratchDir, serve::Service};
use serde_json::{Value, json};

use crate::{Profile, median, per_packet::filler, service::percentile};

/// The policy every agent runs: the filler's public IPs (198.18.0.0 to .16) on agent 0, one
/// address of 203.0.113.0/24 each on the others.
fn policy(agent: usize) -> String {
    let ips: Vec<String> = if agent == 0 {
        (0..=16).map(|i| format!("\"198.18.0.{i}\"")).collect()
    } else {
        vec![format!("\"203.0.113.{agent}\"")]
    };
    format!(
        "[policy]\npublic_ips = [{}]\ntarget_networks = [\"10.0.0.0/8\"]\nport_pool = [\"1024-65535\"]\nports_per_owner = 1000000\nmax_range_ports = 4096\nforbid_listening_ports = false\n",
        ips.join(", ")
    )
}

fn pins(tag: &str) -> ScratchDir {
    ScratchDir::claim(format!(
        "/sys/fs/bpf/pf-bench-fleet-{tag}-{}",
        std::process::id()
    ))
}

/// Seconds from an engine opened on `store` (holding `size` reservations) to the end of its
/// start's reconcile into empty maps.
fn cold_start(store: Box<dyn Store>, size: u32, fleet: bool, files: &Path) -> Result<f64, String> {
    let pin_dir = pins("cold");
    let dir = PinDir::new(pin_dir.path());
    drop(State::open_for_write(&dir).map_err(|e| e.to_string())?);
    let config = Config::parse(&policy(0))?;
    let audit = Audit::open(&files.join("audit.jsonl")).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut engine = Engine::new(
        store,
        Box::new(KernelDataPlane::new(dir)),
        config.policy,
        audit,
    )
    .map_err(|e| e.to_string())?;
    if fleet {
        engine.join_fleet("cold".into()).map_err(|e| e.message)?;
    }
    let report = engine
        .reconcile(ReconcileGuard::REPAIR)
        .map_err(|e| e.message)?;
    let seconds = start.elapsed().as_secs_f64();
    if report.loaded != size as usize {
        return Err(format!("the cold start loaded {report:?}, not {size}"));
    }
    Ok(seconds)
}

fn records(size: u32) -> Vec<NewRecord> {
    (0..size)
        .map(|i| NewRecord {
            owner: format!("bench-{}", i % 1000),
            reservation: filler(i),
            created_ms: 0,
            ttl_ms: None,
            expires_ms: None,
            enabled: true,
            note: String::new(),
        })
        .collect()
}

/// Milliseconds until every agent's `RESERVATIONS` map (`maps`) holds (`present`) or lacks
/// a reservation on `port`, read every 0.2 ms for at most 5 s. The pinned maps are read as
/// bpftool reads them, without pf's lock, so that looking never holds up the agent's write.
fn until_maps(
    maps: &[AyaHashMap<MapData, ReservationKey, ReservationValue>],
    port: u16,
    present: bool,
    from: Instant,
) -> Result<f64, String> {
    loop {
        let all = maps.iter().all(|map| {
            let has = map
                .keys()
                .filter_map(Result::ok)
                .any(|k| u16::from_be_bytes(k.first_port) == port);
            has == present
        });
        if all {
            return Ok(from.elapsed().as_secs_f64() * 1e3);
        }
        if from.elapsed() > Duration::from_secs(5) {
            return Err(format!(
                "the agents' maps did not follow within 5 s (port {port})"
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

pub fn run(profile: &Profile) -> Result<Value, String> {
    let pf_bin = std::env::var_os("PF_BIN")
        .ok_or("PF_BIN is not set: run the benchmark through `cargo xtask bench`")?;
    let db = TempPostgres::start().map_err(|e| e.to_string())?;
    let files = ScratchDir::claim(
        std::env::temp_dir().join(format!("pf-bench-fleet-{}", std::process::id())),
    );
    std::fs::create_dir_all(files.path()).map_err(|e| e.to_string())?;

    println!();
    println!("a fleet's store: a cold agent loading N reservations into empty maps");
    println!(
        "{:>13} {:>14} {:>17} {:>14}",
        "reservations", "SQLite ms", "PostgreSQL ms", "vs SQLite"
    );
    let mut cold = Vec::new();
    for &size in profile.control_sizes {
        let batch = records(size);
        let (mut sqlite_runs, mut pg_runs) = (Vec::new(), Vec::new());
        for run in 0..profile.repetitions {
            let path = files.path().join(format!("cold-{size}-{run}.db"));
            let mut store = SqliteStore::open(&path).map_err(|e| e.to_string())?;
            store.insert_all(&batch).map_err(|e| e.to_string())?;
            sqlite_runs.push(cold_start(Box::new(store), size, false, files.path())?);
            let url = db
                .database(&format!("cold_{size}_{run}"))
                .map_err(|e| e.to_string())?;
            let location = PostgresLocation::parse(&url, None).map_err(|e| e.to_string())?;
            let mut store = PostgresStore::open(&location).map_err(|e| e.to_string())?;
            store.insert_all(&batch).map_err(|e| e.to_string())?;
            pg_runs.push(cold_start(Box::new(store), size, true, files.path())?);
        }
        let (sqlite, pg) = (median(&sqlite_runs), median(&pg_runs));
        println!(
            "{size:>13} {:>14.1} {:>17.1} {:>13.2}x",
            sqlite * 1e3,
            pg * 1e3,
            pg / sqlite
        );
        cold.push(json!({
            "reservations": size,
            "sqlite_seconds": sqlite_runs,
            "postgres_seconds": pg_runs,
            "postgres_over_sqlite": pg / sqlite,
        }));
    }

    // Three agents on one database, maps only.
    let url = db.url("agents");
    db.database("agents").map_err(|e| e.to_string())?;
    let mut agents = Vec::new();
    let mut agent_pins = Vec::new();
    for k in 0..3 {
        let pin_dir = pins(&format!("agent{k}"));
        let own = ScratchDir::claim(files.path().join(format!("agent{k}")));
        std::fs::create_dir_all(own.path()).map_err(|e| e.to_string())?;
        let config = format!(
            "[service]\nsocket = \"{0}/pf.sock\"\nstore = \"{url}\"\nagent = \"bench-{k}\"\naudit_log = \"{0}/audit.jsonl\"\nbpffs = \"{1}\"\n{2}",
            own.path().display(),
            pin_dir.path().display(),
            policy(k)
        );
        agents.push(
            Service::start_with_config(Path::new(&pf_bin), own, &config)
                .map_err(|e| format!("agent {k}: {e}"))?,
        );
        agent_pins.push(pin_dir);
    }
    let followers: Vec<AyaHashMap<MapData, ReservationKey, ReservationValue>> = agent_pins[1..]
        .iter()
        .map(|p| {
            MapData::from_pin(PinDir::new(p.path()).map(map_names::RESERVATIONS))
                .map_err(|e| e.to_string())
                .and_then(|m| AyaHashMap::try_from(Map::HashMap(m)).map_err(|e| e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let client = Client::new(&agents[0].socket());
    let changes = (profile.repetitions as u16 * 20).max(20);
    let (mut call_ms, mut follow_ms) = (Vec::new(), Vec::new());
    for i in 0..changes {
        let port = 2000 + i;
        let start = Instant::now();
        let made = client
            .call(
                "POST",
                "/v1/reservations",
                Some(&json!({
                    "owner": "bench",
                    "public": format!("fleet:{port}/tcp"),
                    "to": format!("10.9.0.{}:80", i % 250 + 1),
                })),
            )
            .map_err(|e| e.to_string())?;
        call_ms.push(start.elapsed().as_secs_f64() * 1e3);
        let logs = || {
            agents
                .iter()
                .map(Service::log)
                .collect::<Vec<_>>()
                .join("\n")
        };
        follow_ms.push(
            until_maps(&followers, port, true, start)
                .map_err(|e| format!("{e}; the agents' logs:\n{}", logs()))?,
        );
        let id = made["id"].as_u64().ok_or("no id in the answer")?;
        let start = Instant::now();
        client
            .call("DELETE", &format!("/v1/reservations/{id}"), None)
            .map_err(|e| e.to_string())?;
        call_ms.push(start.elapsed().as_secs_f64() * 1e3);
        follow_ms.push(
            until_maps(&followers, port, false, start)
                .map_err(|e| format!("{e}; the agents' logs:\n{}", logs()))?,
        );
    }
    for agent in &mut agents {
        agent.stop();
    }
    call_ms.sort_by(|a, b| a.total_cmp(b));
    follow_ms.sort_by(|a, b| a.total_cmp(b));
    println!();
    println!(
        "a fleet of 3 agents on one database: {} changes through agent 0",
        call_ms.len()
    );
    println!("{:<44} {:>8} {:>8}", "", "p50 ms", "p99 ms");
    println!(
        "{:<44} {:>8.2} {:>8.2}",
        "the call on agent 0 (its own maps updated)",
        percentile(&call_ms, 0.5),
        percentile(&call_ms, 0.99)
    );
    println!(
        "{:<44} {:>8.2} {:>8.2}",
        "until agents 1 and 2's maps follow",
        percentile(&follow_ms, 0.5),
        percentile(&follow_ms, 0.99)
    );
    Ok(json!({
        "cold_start": cold,
        "convergence": {
            "agents": 3,
            "changes": call_ms.len(),
            "call_ms": call_ms,
            "follow_ms": follow_ms,
            "call_p50_ms": percentile(&call_ms, 0.5),
            "call_p99_ms": percentile(&call_ms, 0.99),
            "follow_p50_ms": percentile(&follow_ms, 0.5),
            "follow_p99_ms": percentile(&follow_ms, 0.99),
        },
    }))
}
