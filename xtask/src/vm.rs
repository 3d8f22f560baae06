//! `cargo xtask vm`: pf's privileged tests inside a QEMU VM running a distribution's own kernel
//! (Debian 12's Linux 6.1), where VPN servers really run.
//!
//! - The kernel is Debian's package, fetched with `apt-get download` and unpacked (modules
//!   included, `depmod` run on them) under `target/vm/KERNEL/`, once.
//! - The VM boots it with a small initramfs (busybox and the modules 9p needs) whose init mounts
//!   this machine's `/` read-only over virtio-9p and switches to it: the guest runs the tools,
//!   the `pf` binary and the test binary built here, with tmpfs on /tmp and /run, bpffs, and the
//!   guest kernel's modules loaded from the unpacked package (also for the kernel's own
//!   requests, through `/proc/sys/kernel/modprobe`).
//! - QEMU runs in software emulation (TCG): `/dev/kvm` on these machines is a nested PVM that
//!   hangs stock kernels (see TOOLCHAIN.md). Timings in the VM mean nothing; correctness does.
//! - The guest prints the tests' output on its serial console, then `pf-vm: exit N`; no line,
//!   or N other than 0, fails the run.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{build_pf, cargo, root, run, test_result_counts};

/// A kernel the VM can boot.
pub struct Kernel {
    /// Its name on the command line (`--kernel`).
    pub name: &'static str,
    /// The Debian package that depends on the versioned image package.
    meta_package: &'static str,
    /// The versioned image package's name starts with this.
    image_prefix: &'static str,
}

pub const KERNELS: &[Kernel] = &[
    // Debian 12's own kernel: what `cargo xtask test` runs.
    Kernel {
        name: "debian-6.1",
        meta_package: "linux-image-amd64",
        image_prefix: "linux-image-6.1.",
    },
    // Debian 12's newer kernel (bookworm carries it too): `cargo xtask vm --kernel debian-6.12`.
    Kernel {
        name: "debian-6.12",
        meta_package: "linux-image-6.12-amd64",
        image_prefix: "linux-image-6.12.",
    },
];

/// The privileged tests the VM runs: the fixture tables and the differential tests (the programs
/// as this kernel's verifier and JIT made them, byte for byte against the model), forwarding
/// (TCP, UDP, a range, release, detach) with the service, ICMP errors and fragments, WireGuard
/// with the kernel's own module, the egress hook as a netlink filter (the only one before 6.6)
/// with the service's restart and adoption, the shipped nftables ruleset over the kernel's
/// WireGuard, port mapping (natpmpc and upnpc) over it, and the options that depend on the
/// kernel.
pub const VM_TESTS: &[&str] = &[
    "integration::netfilter::netfilter_ruleset_over_wireguard",
    "integration::fixtures::ingress_fixtures",
    "integration::fixtures::egress_fixtures",
    "integration::fixtures::egress_tunnel_source_fixtures",
    "integration::differential::corpus_agrees_with_the_model",
    "integration::differential::ingress_agrees_with_the_model",
    "integration::differential::egress_agrees_with_the_model",
    "integration::cli::kernel_dependent_attach_options",
    "integration::e2e::forwarding_native_xdp",
    "integration::e2e::icmp_errors_and_fragments",
    "integration::tc_netlink::egress_by_netlink_filter",
    "integration::wireguard::wireguard_default_mode",
    "integration::trigger::trigger_over_wireguard",
    "integration::fixtures::trigger_fixtures",
    "integration::limits::limits_drop_what_they_refuse_and_count_why",
];

/// The longest a VM run may take before it is killed and fails.
const VM_TIMEOUT: Duration = Duration::from_secs(25 * 60);

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The unpacked kernel: its `vmlinuz`, its modules' root (for `modprobe -d`) and version.
struct Unpacked {
    vmlinuz: PathBuf,
    root: PathBuf,
    version: String,
}

/// Fetches and unpacks `kernel` under `dir`, once.
fn unpack(kernel: &Kernel, dir: &Path) -> Result<Unpacked> {
    let root = dir.join("root");
    if !root.join("boot").is_dir() {
        let depends = output(Command::new("apt-cache").args(["depends", kernel.meta_package]))?;
        let package = depends
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with(kernel.image_prefix))
            .with_context(|| {
                format!(
                    "{} depends on no {}* package: {depends}",
                    kernel.meta_package, kernel.image_prefix
                )
            })?
            .to_string();
        fs::create_dir_all(dir)?;
        // Not `run`, which runs from the workspace root: the .deb lands in the current directory.
        output(
            Command::new("apt-get")
                .args(["download", &package])
                .current_dir(dir),
        )?;
        let deb = fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&package))
            })
            .with_context(|| format!("apt-get download left no {package}*.deb in {dir:?}"))?;
        let partial = dir.join("root.partial");
        let _ = fs::remove_dir_all(&partial);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        fs::remove_file(&deb)?;
        fs::rename(&partial, &root)?;
    }
    let boot = root.join("boot");
    let vmlinuz = fs::read_dir(&boot)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {boot:?}"))?;
    let version = vmlinuz
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    let modules = root.join("lib/modules").join(&version);
    if !modules.join("modules.dep").exists() {
        run(Command::new("depmod").arg("-b").arg(&root).arg(&version))?;
    }
    Ok(Unpacked {
        vmlinuz,
        root,
        version,
    })
}

/// `names` and every module they depend on, each after its dependencies (from modules.dep).
fn load_order(modules: &Path, names: &[&str]) -> Result<Vec<PathBuf>> {
    let dep = fs::read_to_string(modules.join("modules.dep"))?;
    let deps = |path: &str| -> Vec<String> {
        dep.lines()
            .find_map(|l| l.strip_prefix(&format!("{path}:")))
            .map(|rest| rest.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    };
    let path_of = |name: &str| -> Result<String> {
        dep.lines()
            .filter_map(|l| l.split(':').next())
            .find(|p| p.ends_with(&format!("/{name}.ko")) || p.ends_with(&format!("/{name}.ko.xz")))
            .map(str::to_string)
            .with_context(|| format!("module {name} is not in {modules:?}"))
    };
    fn visit(
        path: String,
        deps: &dyn Fn(&str) -> Vec<String>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(path.clone()) {
            return;
        }
        for d in deps(&path) {
            visit(d, deps, seen, order);
        }
        order.push(path);
    }
    // A module built into this kernel (modules.builtin) needs no loading.
    let builtin = fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let is_builtin = |name: &str| builtin.lines().any(|l| l.ends_with(&format!("/{name}.ko")));
    let (mut seen, mut order) = (BTreeSet::new(), Vec::new());
    for name in names.iter().filter(|n| !is_builtin(n)) {
        visit(path_of(name)?, &deps, &mut seen, &mut order);
    }
    Ok(order.into_iter().map(|p| modules.join(p)).collect())
}

/// The initramfs: busybox, the 9p modules in load order, and an init that mounts this machine's
/// `/` and switches to the stage-2 script named on the kernel's command line.
fn initramfs(kernel: &Unpacked, dir: &Path) -> Result<PathBuf> {
    let tree = dir.join("initramfs");
    let _ = fs::remove_dir_all(&tree);
    for sub in ["bin", "modules", "proc", "dev", "newroot"] {
        fs::create_dir_all(tree.join(sub))?;
    }
    fs::copy("/bin/busybox", tree.join("bin/busybox")).context("busybox (busybox-static)")?;
    let modules = kernel.root.join("lib/modules").join(&kernel.version);
    for (i, module) in load_order(&modules, &["virtio_pci", "9pnet_virtio", "9p"])?
        .iter()
        .enumerate()
    {
        let name = module.file_name().unwrap().to_string_lossy().into_owned();
        // busybox's insmod takes plain modules; newer kernels ship them xz-compressed.
        match name.strip_suffix(".xz") {
            Some(plain) => {
                let bytes = Command::new("xz")
                    .arg("-dc")
                    .arg(module)
                    .output()
                    .context("xz (xz-utils)")?;
                ensure!(bytes.status.success(), "xz -dc {module:?} failed");
                fs::write(
                    tree.join("modules").join(format!("{i:02}-{plain}")),
                    bytes.stdout,
                )?;
            }
            None => {
                fs::copy(module, tree.join("modules").join(format!("{i:02}-{name}")))?;
            }
        }
    }
    let init = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
for m in /modules/*.ko; do /bin/busybox insmod "$m" || echo "pf-vm: insmod $m failed"; done
stage2=$(/bin/busybox sed -n 's/.*pf\.stage2=\([^ ]*\).*/\1/p' /proc/cmdline)
/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /newroot || echo "pf-vm: exit 97"
/bin/busybox umount /proc
/bin/busybox umount /dev
exec /bin/busybox switch_root /newroot /bin/sh "$stage2"
"#;
    fs::write(tree.join("init"), init)?;
    run(Command::new("chmod").arg("0755").arg(tree.join("init")))?;
    let image = dir.join("initramfs.gz");
    output(
        Command::new("sh")
            .arg("-c")
            .arg("find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 > \"$0\"")
            .arg(&image)
            .current_dir(&tree),
    )?;
    Ok(image)
}

/// The pf-tests library's test binary, built here (the VM runs it from this machine's disk).
fn test_binary() -> Result<PathBuf> {
    let out = output(cargo().current_dir(root()).args([
        "test",
        "--package",
        "pf-tests",
        "--lib",
        "--no-run",
        "--message-format=json",
    ]))?;
    out.lines()
        .filter(|l| l.contains("\"executable\":\"") && l.contains("\"test\":true"))
        .find_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = l[start..].find('"')?;
            Some(PathBuf::from(&l[start..start + end]))
        })
        .context("cargo built no pf-tests test binary")
}

/// The bench example, built with optimisations (the forwarding section runs in the VM with the
/// kernel's pktgen).
fn bench_binary() -> Result<PathBuf> {
    run(cargo().arg("build").args(crate::BENCH_EXAMPLE))?;
    Ok(root().join("target/release/examples/bench"))
}

/// The benchmark sections `cargo xtask vm --bench` (and so `cargo xtask test`) runs in the
/// guest: forwarding with the kernel's pktgen, and the kernel's memory accounting.
pub const BENCH_SECTIONS: [&str; 2] = ["forwarding", "memory"];

/// The script the guest runs once it has switched to this machine's `/`: the tests, then the
/// benchmark's `sections` (smoke profile, labelled as emulated; forwarding with pktgen).
fn stage2(
    kernel: &Unpacked,
    pf: &Path,
    tests: &Path,
    filters: &[&str],
    bench: Option<(&Path, &[String])>,
) -> String {
    let bench = bench.map_or(String::new(), |(b, sections)| {
        let runs: String = sections
            .iter()
            .map(|section| {
                let generator = if section == "forwarding" {
                    " --generator pktgen"
                } else {
                    ""
                };
                format!(
                    "    PF_BENCH_EMULATED=1 timeout 300 {} --smoke --only {section}{generator} --out /tmp/bench || bench_status=$?\n",
                    b.display()
                )
            })
            .collect();
        format!(
            "if [ $status = 0 ]; then\n    bench_status=0\n{runs}    echo \"pf-vm: bench exit $bench_status\"\nfi\n"
        )
    });
    let modules_root = kernel.root.display();
    let filters: Vec<String> = filters.iter().map(|f| format!("'{f}'")).collect();
    format!(
        r#"set -u
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
# The workspace may be under /tmp (a fresh clone), which a tmpfs is about to cover: keep it
# reachable at its own path.
mkdir /run/workspace
mount --bind {root} /run/workspace
mount -t tmpfs tmp /tmp
case {root} in
    /tmp/*) mkdir -p {root} && mount --bind /run/workspace {root} ;;
esac
mount -t bpf bpf /sys/fs/bpf
mkdir -p /run/netns /run/lock
ip link set lo up
# The kernel asks for modules through this; the guest's are in the unpacked package.
printf '#!/bin/sh\nexec /usr/sbin/modprobe -d {modules_root} "$@"\n' > /run/modprobe
chmod 0755 /run/modprobe
echo /run/modprobe > /proc/sys/kernel/modprobe
for m in veth tun wireguard sch_ingress cls_bpf pktgen nf_tables nft_chain_nat nf_nat; do
    /run/modprobe "$m" || echo "pf-vm: modprobe $m failed"
done
echo "pf-vm: kernel $(uname -r), $(nproc) CPUs"
cd {root}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp CI=true
export PF_BIN={pf} RUST_BACKTRACE=1
{run_tests}
{bench}echo "pf-vm: exit $status"
echo o > /proc/sysrq-trigger
sleep 30
"#,
        root = root().display(),
        pf = pf.display(),
        run_tests = if filters.is_empty() {
            "status=0".to_string()
        } else {
            format!(
                "timeout 1080 {} --exact --test-threads=1 --color never {}\nstatus=$?",
                tests.display(),
                filters.join(" ")
            )
        },
    )
}

/// Boots `kernel` with `cpus` virtual CPUs and runs `filters` (the VM subset when empty), then
/// the benchmark's `bench_sections`; fails unless every test passed (and the bench ran).
/// Returns how many tests passed.
pub fn run_vm(
    kernel_name: &str,
    filters: &[String],
    bench_sections: &[String],
    cpus: u32,
) -> Result<u64> {
    let bench = !bench_sections.is_empty();
    let kernel = KERNELS
        .iter()
        .find(|k| k.name == kernel_name)
        .with_context(|| {
            let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
            format!("no kernel {kernel_name:?} (have {names:?})")
        })?;
    let dir = root().join("target/vm").join(kernel.name);
    let started = Instant::now();
    let unpacked = unpack(kernel, &dir)?;
    let initramfs = initramfs(&unpacked, &dir)?;
    let pf = build_pf()?;
    let tests = test_binary()?;
    let bench_bin = if bench { Some(bench_binary()?) } else { None };
    // `none`: no tests, only the benchmark (at 64 vCPUs under TCG a test takes minutes).
    let filters: Vec<&str> = if filters.is_empty() {
        VM_TESTS.to_vec()
    } else if filters == ["none"] {
        Vec::new()
    } else {
        filters.iter().map(String::as_str).collect()
    };
    let script = dir.join("stage2.sh");
    fs::write(
        &script,
        stage2(
            &unpacked,
            &pf,
            &tests,
            &filters,
            bench_bin.as_deref().map(|b| (b, bench_sections)),
        ),
    )?;
    eprintln!(
        "xtask: booting Debian's {} under QEMU (TCG) for {} tests",
        unpacked.version,
        filters.len()
    );
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        &cpus.to_string(),
        "-m",
        "2048",
    ])
    .args(["-nographic", "-no-reboot", "-nic", "none"])
    .arg("-kernel")
    .arg(&unpacked.vmlinuz)
    .arg("-initrd")
    .arg(&initramfs)
    .arg("-append")
    .arg(format!(
        "console=ttyS0 panic=-1 loglevel=3 pf.stage2={}",
        script.display()
    ))
    .args([
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    eprintln!("xtask: running {qemu:?}");
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let (lines_tx, lines_rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + VM_TIMEOUT;
    let mut exit = None;
    let mut bench_exit = None;
    let (mut passed, mut failed) = (0u64, 0u64);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => {
                println!("vm| {line}");
                if let Some(code) = line.trim().strip_prefix("pf-vm: exit ") {
                    exit = code.trim().parse::<i32>().ok();
                }
                if let Some(code) = line.trim().strip_prefix("pf-vm: bench exit ") {
                    bench_exit = code.trim().parse::<i32>().ok();
                }
                if let Some((p, f)) = test_result_counts(&line) {
                    passed += p;
                    failed += f;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the VM ran longer than {VM_TIMEOUT:?} and was killed");
            }
        }
    }
    let status = child.wait()?;
    let took = started.elapsed().as_secs();
    if bench && exit == Some(0) && bench_exit != Some(0) {
        bail!(
            "vm {}: the benchmark ({}) failed ({bench_exit:?}); see the console above",
            kernel.name,
            bench_sections.join(", "),
        );
    }
    match exit {
        // Every named test ran: `--exact` skips a name that matches nothing, silently.
        Some(0) if passed == filters.len() as u64 && failed == 0 => {
            eprintln!(
                "xtask: vm {}: {passed} passed on {} in {took} s (qemu {status})",
                kernel.name, unpacked.version
            );
            Ok(passed)
        }
        Some(code) => bail!(
            "vm {}: tests exited {code} ({passed} passed, {failed} failed) on {}",
            kernel.name,
            unpacked.version
        ),
        None => bail!(
            "vm {}: the guest never reported its tests' exit (qemu {status}); see the console above",
            kernel.name
        ),
    }
}
