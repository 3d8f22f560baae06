//! `cargo xtask bench`: pf's speed beside its baselines, all measured in one run.
//!
//! 1. Per-packet cost of the loaded programs (BPF_PROG_TEST_RUN) beside no-op programs, at 1 to
//!    1,000,000 reservations (`per_packet`).
//! 2. Control plane: the time to apply 1,000 and 100,000 reservations, batched and one at a
//!    time (`control`).
//! 3. Kernel memory per reserved port, from the kernel's accounting (`memory`).
//! 4. The reservation service: applying 1,000 and 100,000 reservations to store and maps, and
//!    reserve-call latency through the API (`service`).
//! 5. Forwarding: 64-byte UDP frames delivered per second through three namespaces for pf,
//!    nftables DNAT, plain forwarding and the arrival ceiling, with 1 and 1,024 flows
//!    (`forwarding`).
//! 6. TCP throughput with iperf3 through pf, nftables DNAT and plain forwarding (`tcp`).
//! 7. The tax on traffic pf does not forward: iperf3 through a WireGuard tunnel whose UDP
//!    crosses pf's interface, with pf attached and not (`tax`).
//!
//! Every repetition goes into one JSON file under the output directory, with the commit, kernel,
//! CPU model and core count; a PNG plot beside it (`plot`); a table with ratios on stdout.

mod control;
mod fleet;
mod forwarding;
mod iperf;
mod memory;
mod per_packet;
mod pktgen;
mod plot;
mod port_mapping;
mod service;
mod tax;
mod tcp;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use pf::domain::spec::{PortRange, Protocols, PublicSpec, Reservation, TargetSpec};
use serde_json::{Value, json};

const SECTIONS: [&str; 9] = [
    "per-packet",
    "control",
    "memory",
    "service",
    "fleet",
    "port-mapping",
    "forwarding",
    "tcp",
    "tax",
];

pub struct Profile {
    name: &'static str,
    /// Repetitions of every measurement (medians are over these).
    repetitions: usize,
    /// Per-packet: reservation counts, and BPF_PROG_TEST_RUN's repeat.
    sizes: &'static [u32],
    repeat: u32,
    /// Control plane: reservation counts.
    control_sizes: &'static [u32],
    /// Forwarding: seconds the generator sends per repetition, and the flow counts.
    forward_seconds: f64,
    flows: &'static [u32],
    /// TCP: seconds per iperf3 run.
    tcp_seconds: u32,
}

const FULL: Profile = Profile {
    name: "full",
    repetitions: 5,
    sizes: &[1, 1_000, 100_000, 1_000_000],
    repeat: 1_000_000,
    control_sizes: &[1_000, 100_000],
    forward_seconds: 2.0,
    flows: &[1, 1_024],
    tcp_seconds: 5,
};
const QUICK: Profile = Profile {
    name: "quick",
    repetitions: 3,
    sizes: &[1, 1_000, 100_000],
    repeat: 1_000_000,
    control_sizes: &[1_000, 100_000],
    forward_seconds: 0.5,
    flows: &[1, 1_024],
    tcp_seconds: 1,
};
/// Seconds in all: proves the harness still works (`cargo xtask test` runs it).
const SMOKE: Profile = Profile {
    name: "smoke",
    repetitions: 3,
    sizes: &[1, 1_000],
    repeat: 10_000,
    control_sizes: &[1_000],
    forward_seconds: 0.05,
    flows: &[1, 1_024],
    tcp_seconds: 1,
};

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn reservation(
    public: Ipv4Addr,
    port: u16,
    protocols: Protocols,
    target: Ipv4Addr,
    target_port: u16,
) -> Reservation {
    let public = PublicSpec {
        addr: public,
        ports: PortRange::single(port),
        protocols,
    };
    Reservation::new(
        public,
        TargetSpec {
            addr: target,
            port: Some(target_port),
        },
    )
    .expect("valid reservation")
}

/// The bench's own eBPF object (tests/bench-ebpf), built by the tests crate's build.rs.
static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pf-bench"));

/// The bench's own eBPF object, refused if the build left it empty.
pub fn bench_object() -> Result<&'static [u8], String> {
    if BENCH_OBJECT.is_empty() {
        return Err("the bench eBPF object is empty (built with AYA_BUILD_SKIP?)".into());
    }
    Ok(BENCH_OBJECT)
}

/// Finds the XDP program `name` in a bench object and loads it into the kernel (verifies it).
pub fn load_xdp<'a>(
    ebpf: &'a mut aya::Ebpf,
    name: &str,
) -> Result<&'a mut aya::programs::Xdp, String> {
    let xdp: &mut aya::programs::Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("no program {name}"))?
        .try_into()
        .map_err(|e| format!("{name}: {e}"))?;
    xdp.load().map_err(|e| format!("loading {name}: {e}"))?;
    Ok(xdp)
}

fn output(words: &[&str]) -> String {
    Command::new(words[0])
        .args(&words[1..])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Whether this run is inside `cargo xtask vm`'s emulated machine.
pub fn emulated() -> bool {
    std::env::var_os("PF_BENCH_EMULATED").is_some()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let profile = if args.iter().any(|a| a == "--smoke") {
        SMOKE
    } else if args.iter().any(|a| a == "--quick") {
        QUICK
    } else {
        FULL
    };
    let out_dir = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("bench/results"));
    // `--only SECTION` (per-packet, control, service, forwarding, tcp): one section, for profiling.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    // `--generator pktgen|live-frames`: the forwarding section's generator (default: pktgen
    // where the kernel has it).
    let generator = match args
        .iter()
        .position(|a| a == "--generator")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
    {
        None => None,
        Some("pktgen") => Some(forwarding::GeneratorKind::Pktgen),
        Some("live-frames") => Some(forwarding::GeneratorKind::LiveFrames),
        Some(other) => {
            eprintln!("bench: error: unknown generator '{other}' (pktgen or live-frames)");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&profile, &out_dir, only.as_deref(), generator) {
        eprintln!("bench: error: {e}");
        std::process::exit(1);
    }
}

fn run(
    profile: &Profile,
    out_dir: &Path,
    only: Option<&str>,
    generator: Option<forwarding::GeneratorKind>,
) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("the benchmark loads BPF programs and makes namespaces: run it as root".into());
    }
    let started = Instant::now();
    println!(
        "pf benchmark, {} profile: medians of {} repetitions",
        profile.name, profile.repetitions
    );
    if let Some(section) = only.filter(|s| !SECTIONS.contains(s)) {
        return Err(format!(
            "unknown section '{section}' (one of {})",
            SECTIONS.join(", ")
        ));
    }
    let wanted = |section: &str| only.is_none_or(|o| o == section);
    let mut per_packet = Vec::new();
    let mut contention = Vec::new();
    let mut control = Vec::new();
    let mut memory = Vec::new();
    let mut service = Value::Null;
    let mut fleet = Value::Null;
    let mut port_mapping = Value::Null;
    let mut forwarding = Vec::new();
    let mut tcp = Vec::new();
    let mut tax = Value::Null;
    if wanted("per-packet") {
        (per_packet, contention) = per_packet::run(profile)?;
    }
    if wanted("control") {
        control = control::run(profile)?;
    }
    if wanted("memory") {
        memory = memory::run(profile)?;
    }
    if wanted("service") {
        service = service::run(profile)?;
    }
    if wanted("fleet") {
        fleet = fleet::run(profile)?;
    }
    if wanted("port-mapping") {
        port_mapping = port_mapping::run(profile)?;
    }
    if wanted("forwarding") {
        forwarding = forwarding::run(profile, generator)?;
    }
    if wanted("tcp") {
        tcp = tcp::run(profile)?;
    }
    if wanted("tax") {
        tax = tax::run(profile)?;
    }
    println!();
    forwarding::summary(&forwarding);
    tcp::summary(&tcp);

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let report: Value = json!({
        "benchmark": "pf: per-packet cost, control plane, forwarding and TCP throughput",
        "profile": profile.name,
        "unix_time": now,
        "seconds": started.elapsed().as_secs_f64(),
        "commit": output(&["git", "rev-parse", "HEAD"]),
        "kernel": output(&["uname", "-r"]),
        "cpu_model": cpu_model(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        // Set by `cargo xtask vm`: the run was in QEMU's software emulation, where rates mean
        // nothing and only ratios within the run are worth reading.
        "emulated": emulated(),
        "repetitions": profile.repetitions,
        "per_packet": { "repeat": profile.repeat, "results": per_packet, "contention": contention },
        "control_plane": control,
        "memory": memory,
        "service": service,
        "fleet": fleet,
        "port_mapping": port_mapping,
        "forwarding": forwarding,
        "tcp": tcp,
        "tax": tax,
    });
    std::fs::create_dir_all(out_dir).map_err(|e| format!("creating {}: {e}", out_dir.display()))?;
    let stem = out_dir.join(format!("bench-{}-{now}", profile.name));
    let json_path = stem.with_extension("json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report).unwrap())
        .map_err(|e| format!("writing {}: {e}", json_path.display()))?;
    let png_path = stem.with_extension("png");
    plot::draw(&report, &png_path)?;
    println!("wrote {} and {}", json_path.display(), png_path.display());
    println!(
        "benchmark took {:.0} s",
        started.elapsed().as_secs_f64().ceil()
    );
    Ok(())
}
