//! Per-packet cost of pf's loaded programs, measured with BPF_PROG_TEST_RUN beside a no-op XDP
//! program in the same run, at growing numbers of reservations. Run by `cargo xtask bench`.
//!
//! `repeat` re-runs one buffer, which a hit rewrites on its first run. So the hit cases use an
//! identity reservation (a public endpoint forwarded to itself): every run does the full lookup,
//! rewrite and checksum update and still hits, and the bench checks that the `rewritten` counter
//! moved by exactly the number of runs.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use aya::programs::{TestRun, TestRunOptions};
use pf::{
    bpffs::PinDir,
    dataplane::Programs,
    spec::{PortRange, Protocols, PublicSpec, Reservation, TargetSpec},
    state::State,
};
use pf_common::counters::Outcome;
use pf_tests::{
    ScratchDir,
    packet::{ETH_P_ARP, Pkt},
};
use serde_json::{Value, json};

/// Where the identity reservations live (TEST-NET-2; the bench sends nothing anywhere).
const HIT_ADDR: [u8; 4] = [198, 51, 100, 1];
const REMOTE: [u8; 4] = [203, 0, 113, 7];

struct Profile {
    name: &'static str,
    sizes: &'static [u32],
    repeat: u32,
    repetitions: usize,
}

const FULL: Profile = Profile {
    name: "full",
    sizes: &[1, 1_000, 100_000, 1_000_000],
    repeat: 1_000_000,
    repetitions: 5,
};
const QUICK: Profile = Profile {
    name: "quick",
    sizes: &[1, 1_000, 100_000],
    repeat: 1_000_000,
    repetitions: 3,
};
const SMOKE: Profile = Profile {
    name: "smoke",
    sizes: &[1, 1_000],
    repeat: 10_000,
    repetitions: 3,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    Noop,
    Ingress,
    NoopTc,
    Egress,
}

/// One measured case: the program, the packet it runs on, and the counter that must move once
/// per run (proof the packet took the path the case names).
struct Case<'a> {
    name: &'static str,
    program: Which,
    packet: &'a [u8],
    must_count: Option<Outcome>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn reservation(
    public: Ipv4Addr,
    port: u16,
    protocols: Protocols,
    target: Ipv4Addr,
    target_port: u16,
) -> Reservation {
    let public = PublicSpec {
        addr: public,
        ports: PortRange {
            first: port,
            last: port,
        },
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

/// The i-th filler reservation: distinct public endpoints (198.18.0.0/15, the benchmarking
/// range) and distinct targets, so each adds one entry to each NAT map.
fn filler(i: u32) -> Reservation {
    let public = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i / 60_000);
    let target = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + i);
    reservation(
        public,
        1024 + (i % 60_000) as u16,
        Protocols::Tcp,
        target,
        80,
    )
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
    if let Err(e) = run(&profile, &out_dir) {
        eprintln!("bench: error: {e}");
        std::process::exit(1);
    }
}

fn run(profile: &Profile, out_dir: &std::path::Path) -> Result<(), String> {
    let scratch = ScratchDir::claim(format!("/sys/fs/bpf/pf-bench-{}", std::process::id()));
    let dir = PinDir::new(scratch.path());
    let err = |e: pf::PfError| e.to_string();
    let mut state = State::open_for_write(&dir).map_err(err)?;
    let hit = Ipv4Addr::from(HIT_ADDR);
    // The identity reservations the hit cases run through (they count toward the total).
    state
        .reserve(&reservation(hit, 8080, Protocols::Tcp, hit, 8080))
        .map_err(err)?;
    state
        .reserve(&reservation(hit, 5353, Protocols::Udp, hit, 5353))
        .map_err(err)?;
    let mut programs = Programs::load(&dir).map_err(err)?;
    programs.load_noop_baselines().map_err(err)?;

    let tcp_hit = Pkt::tcp(REMOTE, 40000, HIT_ADDR, 8080).frame();
    let udp_hit = Pkt::udp(REMOTE, 40000, HIT_ADDR, 5353).frame();
    let miss = Pkt::tcp(REMOTE, 40000, HIT_ADDR, 8081).frame();
    let not_ipv4 = Pkt {
        ether_type: ETH_P_ARP,
        ..Pkt::tcp(REMOTE, 1, HIT_ADDR, 1)
    }
    .frame();
    let egress_hit = Pkt::tcp(HIT_ADDR, 8080, REMOTE, 40000).frame();

    let cases = [
        Case {
            name: "no-op XDP (baseline)",
            program: Which::Noop,
            packet: &tcp_hit,
            must_count: None,
        },
        Case {
            name: "ingress hit TCP",
            program: Which::Ingress,
            packet: &tcp_hit,
            must_count: Some(Outcome::Rewritten),
        },
        Case {
            name: "ingress hit UDP",
            program: Which::Ingress,
            packet: &udp_hit,
            must_count: Some(Outcome::Rewritten),
        },
        Case {
            name: "ingress miss",
            program: Which::Ingress,
            packet: &miss,
            must_count: Some(Outcome::NoReservation),
        },
        Case {
            name: "ingress non-IPv4",
            program: Which::Ingress,
            packet: &not_ipv4,
            must_count: Some(Outcome::NotIpv4),
        },
        Case {
            name: "no-op TC (baseline)",
            program: Which::NoopTc,
            packet: &egress_hit,
            must_count: None,
        },
        Case {
            name: "egress hit TCP",
            program: Which::Egress,
            packet: &egress_hit,
            must_count: Some(Outcome::Rewritten),
        },
    ];

    let mut results = Vec::new();
    let mut filled = 2u32;
    println!(
        "pf per-packet cost, BPF_PROG_TEST_RUN repeat={}, median of {} ({} profile)",
        profile.repeat, profile.repetitions, profile.name
    );
    println!(
        "{:>13}  {:<22} {:>10} {:>22}",
        "reservations", "case", "ns/packet", "vs no-op of its hook"
    );
    for &size in profile.sizes {
        while filled < size {
            state
                .reserve(&filler(filled))
                .map_err(|e| format!("adding reservation {} of {size}: {e}", filled + 1))?;
            filled += 1;
        }
        let mut noop_median = f64::NAN;
        for Case {
            name,
            program,
            packet,
            must_count,
        } in &cases
        {
            let mut runs = Vec::new();
            for _ in 0..profile.repetitions {
                let before = state.counters().map_err(err)?;
                let opts = TestRunOptions {
                    data_in: Some(packet),
                    repeat: profile.repeat,
                    ..Default::default()
                };
                let result = match program {
                    Which::Noop => programs.noop().test_run(opts),
                    Which::NoopTc => programs.noop_tc().test_run(opts),
                    Which::Ingress => programs.ingress().test_run(opts),
                    Which::Egress => programs.egress().test_run(opts),
                }
                .map_err(|e| format!("{name}: BPF_PROG_TEST_RUN: {e}"))?;
                if let Some(outcome) = *must_count {
                    let after = state.counters().map_err(err)?;
                    let moved = if *program == Which::Ingress {
                        after.ingress(outcome) - before.ingress(outcome)
                    } else {
                        after.egress(outcome) - before.egress(outcome)
                    };
                    if moved != u64::from(profile.repeat) {
                        return Err(format!(
                            "{name}: counter {} moved {moved}, not {}: the case did not take its path every run",
                            outcome.name(),
                            profile.repeat
                        ));
                    }
                }
                runs.push(result.duration.as_nanos() as f64);
            }
            let m = median(&runs);
            // Each case is compared with the no-op program of its own hook, listed just before it.
            if matches!(program, Which::Noop | Which::NoopTc) {
                noop_median = m;
            }
            let ratio = m / noop_median;
            println!("{size:>13}  {name:<22} {m:>10.1} {ratio:>21.2}x");
            results.push(json!({ "reservations": size, "case": name, "runs_ns": runs, "median_ns": m, "ratio_to_noop_of_its_hook": ratio }));
        }
    }

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let report: Value = json!({
        "benchmark": "per-packet cost (BPF_PROG_TEST_RUN)",
        "profile": profile.name,
        "unix_time": now,
        "commit": output(&["git", "rev-parse", "HEAD"]),
        "kernel": output(&["uname", "-r"]),
        "cpu_model": cpu_model(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "repeat": profile.repeat,
        "repetitions": profile.repetitions,
        "results": results,
    });
    std::fs::create_dir_all(out_dir).map_err(|e| format!("creating {}: {e}", out_dir.display()))?;
    let path = out_dir.join(format!("per-packet-{}-{now}.json", profile.name));
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap())
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
