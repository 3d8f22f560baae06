//! Installs what a fresh machine lacks (see ../shared/TOOLCHAIN.md). Each step checks first, so
//! a second run does nothing.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run;

/// Debian packages: tools the tests, demo and benchmark use, and the LLVM that bpf-linker links against.
const PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "tcpdump",
    "curl",
    "netcat-openbsd",
    "iputils-ping",
    "iperf3",
    "nftables",
    "bpftool",
    "python3",
    // prlimit and setpriv (the service's file-limit and socket-group tests).
    "util-linux",
    // libfaketime: a clock stepped under the running service.
    "faketime",
    // chattr: an immutable audit log.
    "e2fsprogs",
    // sqlite3: a test holds the store's write lock to show reads do not wait for it.
    "sqlite3",
    // systemd-analyze, which checks the shipped unit (dist/pf.service).
    "systemd",
    // The port-mapping clients customers' devices run: NAT-PMP (`natpmpc`) and UPnP IGD
    // (`upnpc`).
    "natpmpc",
    "miniupnpc",
    // A real PostgreSQL server for the fleet store's tests (each test starts its own on a
    // temporary data directory).
    "postgresql",
    // WireGuard in userspace (this kernel has no module) and `wg` to configure it.
    "wireguard-go",
    "wireguard-tools",
    // `cargo xtask vm`: QEMU, busybox for the initramfs, depmod and modprobe for the guest
    // kernel's modules.
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    // The benchmark plot's font.
    "fonts-dejavu-core",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn package_installed(name: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", name]))
        .is_some_and(|s| s.contains("install ok installed"))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn install_missing() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!("missing Debian packages {missing:?}; run as root to install them");
        }
        eprintln!("xtask: installing {missing:?}");
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the nightly toolchain is missing (the eBPF programs build with it)")?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        // Plain `cargo install bpf-linker` wants LLVM 23 and finds no libLLVM here.
        run(crate::cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
            ])
            .args(["--features", "llvm-22", "--locked", "--force"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    Ok(())
}

/// Makes sure everything is installed.
pub fn ensure() -> Result<()> {
    install_missing().context("setup")?;
    eprintln!("xtask: setup complete");
    Ok(())
}
