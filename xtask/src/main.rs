//! pf's developer commands:
//! - `cargo xtask setup`: installs what a fresh machine lacks (idempotent).
//! - `cargo xtask demo`: real forwarding between three network namespaces (the README's first
//!   command).
//! - `cargo xtask test`: formatting, lints, unit tests and the privileged tests (the README's
//!   second command, and what CI runs).
//! - `cargo xtask fuzz`: the differential tests with a random seed and many more frames.
//! - `cargo xtask bench`: the benchmark.
//! - `cargo xtask vm`: the privileged tests that matter most on Debian 12's own kernel (6.1),
//!   in a QEMU VM.
//! - `cargo xtask deb`: pf as a Debian package.

mod deb;
mod demo;
mod setup;
mod vm;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks: Debian packages, rust-src, bpf-linker.
    Setup,
    /// Build pf and show it forwarding real traffic between network namespaces.
    Demo,
    /// Run every check: fmt, clippy, unit tests, privileged tests (here and in a Debian 6.1 VM),
    /// the benchmark's smoke run.
    Test,
    /// Differential fuzzing: the loaded programs against the reference model on random frames
    /// (a random seed, printed, so any mismatch can be replayed with --seed).
    Fuzz {
        /// Frames per program.
        #[arg(long, default_value_t = 1_000_000)]
        packets: u64,
        /// Replay this seed (hex) instead of a random one.
        #[arg(long)]
        seed: Option<String>,
    },
    /// Measure pf beside nftables DNAT, plain forwarding and the kernel's ceiling: per-packet
    /// cost, control plane, forwarding pps, TCP throughput (JSON and PNG in bench/results/).
    Bench {
        /// Shorter runs and up to 100,000 reservations: under two minutes.
        #[arg(long)]
        quick: bool,
        /// A few seconds: checks the harness works; results go under target/.
        #[arg(long, conflicts_with = "quick")]
        smoke: bool,
    },
    /// Build pf's Debian package (target/deb/pf_VERSION_ARCH.deb): the binary, the unit, the
    /// example config, the nftables ruleset, logrotate, man pages and completions.
    Deb,
    /// Run privileged tests in a QEMU VM on a distribution's kernel (software emulation).
    Vm {
        /// The kernel: debian-6.1 (Debian 12's), or debian-6.12 (bookworm's newer one).
        #[arg(long, default_value = "debian-6.1")]
        kernel: String,
        /// Tests to run (exact names, e.g. integration::e2e::forwarding_native_xdp); the VM
        /// subset when none are given; `none` for none (only the benchmark).
        tests: Vec<String>,
        /// Then run the benchmark's forwarding section with the kernel's pktgen (emulated:
        /// ratios only) and its memory section.
        #[arg(long)]
        bench: bool,
        /// Then run this benchmark section only (repeatable), e.g. `memory` with `--cpus 64`.
        #[arg(long, conflicts_with = "bench")]
        bench_only: Vec<String>,
        /// Virtual CPUs (the memory section's per-CPU baseline grows with them).
        #[arg(long, default_value_t = 2)]
        cpus: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::ensure(),
        Task::Demo => setup::ensure().and_then(|()| demo::run()),
        Task::Test => setup::ensure().and_then(|()| test()),
        Task::Fuzz { packets, seed } => setup::ensure().and_then(|()| fuzz(packets, seed)),
        Task::Bench { quick, smoke } => setup::ensure().and_then(|()| bench(quick, smoke)),
        Task::Deb => setup::ensure().and_then(|()| {
            let pf = build_pf_release()?;
            let deb = deb::build(&pf, &target_dir().join("deb"))?;
            println!("xtask: built {}", deb.display());
            Ok(())
        }),
        Task::Vm {
            kernel,
            tests,
            bench,
            bench_only,
            cpus,
        } => setup::ensure().and_then(|()| {
            let sections = if bench {
                vm::BENCH_SECTIONS.iter().map(|s| s.to_string()).collect()
            } else {
                bench_only
            };
            vm::run_vm(&kernel, &tests, &sections, cpus).map(drop)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command from the workspace root, echoing it; fails if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds the `pf` binary and returns its path.
pub fn build_pf() -> Result<PathBuf> {
    build_pf_profile(false)
}

/// `pf` built with optimisations, for the benchmark.
fn build_pf_release() -> Result<PathBuf> {
    build_pf_profile(true)
}

fn build_pf_profile(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "pf-user", "--bin", "pf"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(target_dir()
        .join(if release { "release" } else { "debug" })
        .join("pf"))
}

/// Cargo's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// (passed, failed) from a libtest "test result:" line.
pub fn test_result_counts(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split("; ")
            .find_map(|part| {
                part.trim_start_matches("ok. ")
                    .trim_start_matches("FAILED. ")
                    .strip_suffix(word)
            })
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some((count(" passed"), count(" failed")))
}

/// Runs a `cargo test` command, echoing its output, and adds its "test result" lines to
/// `tally` (passed, failed).
fn run_tests(cmd: &mut Command, tally: &mut (u64, u64)) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd
        .current_dir(root())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some((passed, failed)) = test_result_counts(&line) {
            tally.0 += passed;
            tally.1 += failed;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn test() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "pf-ebpf",
        "--exclude",
        "pf-bench-ebpf",
        "--all-targets",
        // The bench example too (it needs the bench's eBPF object).
        "--features",
        "pf-tests/bench",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut tally = (0, 0);
    // Unit tests: pf-common (checksum math), pf-user (argument parsing and validation).
    run_tests(
        cargo().args(["test", "--package", "pf-common", "--package", "pf-user"]),
        &mut tally,
    )?;
    // Privileged tests: one binary, one test at a time (they share the kernel), as root. The
    // package test installs the package built here from the same binary.
    let pf = build_pf()?;
    let deb = deb::build(&pf, &target_dir().join("deb-test"))?;
    run_tests(
        cargo()
            .args([
                "test",
                "--package",
                "pf-tests",
                "--lib",
                "--",
                "--test-threads=1",
            ])
            .env("PF_BIN", &pf)
            .env("PF_DEB", &deb),
        &mut tally,
    )?;
    // The same tests that matter most, on Debian 12's own kernel (6.1) in a VM.
    let sections: Vec<String> = vm::BENCH_SECTIONS.iter().map(|s| s.to_string()).collect();
    tally.0 += vm::run_vm(vm::KERNELS[0].name, &[], &sections, 2)?;
    bench(false, true)?;
    ensure!(tally.0 > 0, "no test ran");
    println!("xtask: {} passed, {} failed", tally.0, tally.1);
    Ok(())
}

/// Runs the differential tests (tests/src/integration/differential.rs) with a random or given seed.
fn fuzz(packets: u64, seed: Option<String>) -> Result<()> {
    let seed = match seed {
        Some(s) => s.trim_start_matches("0x").to_string(),
        None => {
            let mut bytes = [0u8; 8];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
                .context("reading /dev/urandom")?;
            format!("{:x}", u64::from_ne_bytes(bytes))
        }
    };
    eprintln!(
        "xtask: fuzzing with seed {seed}, {packets} frames per program (replay: cargo xtask fuzz --seed {seed} --packets {packets})"
    );
    let pf = build_pf()?;
    run(cargo()
        .args([
            "test",
            "--release",
            "--package",
            "pf-tests",
            "--lib",
            "differential",
            "--",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("PF_BIN", &pf)
        .env("PF_FUZZ_SEED", &seed)
        .env("PF_FUZZ_PACKETS", packets.to_string()))
    .with_context(|| format!("fuzzing with seed {seed} found a mismatch (replay: cargo xtask fuzz --seed {seed} --packets {packets})"))
}

/// Runs the benchmark (tests/examples/bench/), built with optimisations, as root.
fn bench(quick: bool, smoke: bool) -> Result<()> {
    let (profile, out) = match (quick, smoke) {
        (_, true) => ("--smoke", target_dir().join("bench-smoke")),
        (true, _) => ("--quick", root().join("bench").join("results")),
        _ => ("--full", root().join("bench").join("results")),
    };
    let out = out.to_str().context("UTF-8 path")?.to_string();
    // The service section runs the real `pf serve`, optimised as the other figures are.
    let pf = build_pf_release()?;
    run(cargo()
        .env("PF_BIN", &pf)
        .arg("run")
        .args(BENCH_EXAMPLE)
        .args(["--", profile, "--out", &out]))
}

/// Cargo's arguments that name the bench example, optimised, with its eBPF object.
pub const BENCH_EXAMPLE: [&str; 7] = [
    "--release",
    "--package",
    "pf-tests",
    "--features",
    "bench",
    "--example",
    "bench",
];
