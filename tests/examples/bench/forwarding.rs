//! Forwarding throughput through the three-namespace topology (tests/src/topology.rs): 64-byte
//! UDP frames from the internet host to a reserved public port, counted at the tunnel client only
//! if they arrive with the rewritten destination.
//!
//! The generator is the kernel's pktgen where the kernel has it ([`crate::pktgen`]; Debian's
//! kernels do), and otherwise `pf_bench_gen` run with BPF_PROG_TEST_RUN in live-frames mode on
//! inet0 (this host's kernel has no pktgen; see ../shared/TOOLCHAIN.md): each frame leaves by
//! XDP_TX into the server's pub0. Either runs on the last CPU (the live-frames thread pinned
//! there, pktgen's thread bound to it), and everything the frame causes (pub0's XDP and
//! receive, routing, netfilter, tun0's transmit, the client's receive) runs in softirq on that
//! same CPU, so a figure is what one core delivers, generator cost included.
//!
//! Configurations, each on a topology of its own:
//! - `ceiling`: pub0 drops the frames in XDP (`pf_bench_sink`): arrival rate, no forwarding.
//! - `plain`: frames addressed to the client itself, forwarded by the kernel without NAT.
//! - `nftables`: prerouting DNAT to the client, with conntrack (which also un-NATs replies):
//!   what an admin would otherwise use.
//! - `pf`: pf attached to pub0 in native mode, one reservation.
//! - `pf fast path`: the same with `--fast-path`: each frame leaves pub0's XDP by XDP_REDIRECT
//!   into tun0 (the sink on eth0 makes tun0 able to take XDP frames).
//! - `redirect only`: frames addressed to the client, redirected from pub0 to tun0 by
//!   `pf_bench_redirect`, which does nothing else (no parsing, NAT, FIB lookup or MAC rewrite):
//!   the floor under the fast path on the same two veth hops.
//!
//! Every configuration without pf has `pf_bench_pass` (XDP_PASS, or `pf_bench_redirect` for
//! redirect only) on pub0, so all receive through native XDP alike; the client's eth0 has
//! `pf_bench_sink` expecting 10.8.0.2:80.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{DevMap, PerCpuArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use pf::{
    domain::spec::Protocols,
    kernel::attach::{self, AttachMode, AttachOptions, DeviceChoice, Role},
    kernel::bpffs::PinDir,
    kernel::state::State,
};
use pf_common::counters::FastPath;
use pf_tests::{
    kit::ScratchDir,
    kit::netns::Netns,
    kit::packet::Pkt,
    kit::topology::{CLIENT_IP, INTERNET_IP, PUBLIC_IFACE, PUBLIC_IP, Topology},
};
use serde_json::{Value, json};

use crate::{Profile, bench_object, load_xdp, median, reservation};

pub const PUBLIC_PORT: u16 = 8080;
pub const TARGET_PORT: u16 = 80;
/// Where TCP to the public port is forwarded: iperf3's port on the client.
pub const TCP_TARGET_PORT: u16 = 5201;
const FIRST_SRC_PORT: u16 = 10_000;
/// A 64-byte frame on the wire: 60 bytes plus the 4-byte FCS veth does not carry.
const FRAME_LEN: usize = 60;
const HEADERS_LEN: usize = 42;
/// Frames per BPF_PROG_TEST_RUN call, and per batch inside it.
const FRAMES_PER_CALL: u32 = 1 << 16;
const BATCH: u32 = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Config {
    Ceiling,
    Plain,
    Nftables,
    Pf,
    PfFastPath,
    RedirectOnly,
}

impl Config {
    pub const ALL: [Config; 6] = [
        Config::Ceiling,
        Config::Plain,
        Config::Nftables,
        Config::Pf,
        Config::RedirectOnly,
        Config::PfFastPath,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Config::Ceiling => "ceiling (XDP drop at pub0)",
            Config::Plain => "plain forwarding (no NAT)",
            Config::Nftables => "nftables DNAT",
            Config::Pf => "pf (XDP_PASS)",
            Config::PfFastPath => "pf fast path (XDP_REDIRECT)",
            Config::RedirectOnly => "redirect only (no NAT/FIB)",
        }
    }

    /// Where the generator addresses its frames.
    fn destination(self) -> (Ipv4Addr, u16) {
        match self {
            Config::Plain | Config::RedirectOnly => (CLIENT_IP.parse().unwrap(), TARGET_PORT),
            _ => (PUBLIC_IP.parse().unwrap(), PUBLIC_PORT),
        }
    }
}

/// Loads the bench object with the sink's expected endpoint, and attaches `program` in native
/// mode to `iface` inside `ns`. The program stays attached while the returned `Ebpf` lives (and
/// at most as long as the namespace).
pub fn attach_bench_program(
    ns: &Netns,
    iface: &str,
    program: &'static str,
    sink: (Ipv4Addr, u16),
) -> Result<Ebpf, String> {
    let addr = sink.0.octets();
    let port = sink.1.to_be_bytes();
    let ebpf = EbpfLoader::new()
        .override_global("SINK_ADDR", &addr, true)
        .override_global("SINK_PORT", &port, true)
        .load(bench_object()?)
        .map_err(|e| format!("loading the bench object: {e}"))?;
    let iface = iface.to_string();
    ns.within(move || -> Result<Ebpf, String> {
        let mut ebpf = ebpf;
        load_xdp(&mut ebpf, program)?
            .attach(&iface, XdpMode::Driver)
            .map_err(|e| format!("attaching {program} to {iface}: {e}"))?;
        Ok(ebpf)
    })
    .map_err(|e| e.to_string())?
}

/// Frames counted by a sink: those to its expected endpoint.
fn sink_count(sink: &Ebpf) -> Result<u64, String> {
    let counts: PerCpuArray<_, u64> = PerCpuArray::try_from(
        sink.map("SINK_COUNTS")
            .ok_or("the bench object has no SINK_COUNTS")?,
    )
    .map_err(|e| e.to_string())?;
    let values = counts.get(&0, 0).map_err(|e| e.to_string())?;
    Ok(values.iter().sum())
}

fn mac(ns: &Netns, iface: &str) -> Result<[u8; 6], String> {
    let out = ns
        .run(&["ip", "-j", "link", "show", "dev", iface])
        .map_err(|e| e.to_string())?;
    let links: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let text = links[0]["address"]
        .as_str()
        .ok_or_else(|| format!("no MAC address for {iface}"))?;
    let mut mac = [0u8; 6];
    for (byte, hex) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(hex, 16).map_err(|e| format!("MAC {text}: {e}"))?;
    }
    Ok(mac)
}

/// Which generator sends the frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeneratorKind {
    /// The kernel's pktgen.
    Pktgen,
    /// `pf_bench_gen` in live-frames mode.
    LiveFrames,
}

impl GeneratorKind {
    pub fn name(self) -> &'static str {
        match self {
            GeneratorKind::Pktgen => "pktgen",
            GeneratorKind::LiveFrames => "live-frames",
        }
    }
}

/// A generator set up for one (configuration, flows) measurement.
enum Generator {
    LiveFrames(LiveFrames),
    Pktgen(crate::pktgen::Pktgen),
}

impl Generator {
    fn new(
        kind: GeneratorKind,
        topology: &Topology,
        dest: (Ipv4Addr, u16),
        flows: u32,
    ) -> Result<Self, String> {
        match kind {
            GeneratorKind::LiveFrames => {
                LiveFrames::new(topology, dest, flows).map(Generator::LiveFrames)
            }
            GeneratorKind::Pktgen => {
                let src: Ipv4Addr = INTERNET_IP.parse().unwrap();
                let dst_mac = mac(&topology.server, PUBLIC_IFACE)?;
                topology
                    .inet
                    .within(move || {
                        crate::pktgen::Pktgen::configure(
                            "inet0",
                            src,
                            dest,
                            dst_mac,
                            FIRST_SRC_PORT,
                            flows,
                        )
                    })
                    .map_err(|e| e.to_string())?
                    .map(Generator::Pktgen)
            }
        }
    }

    /// Sends for `seconds` from inet0; returns the frames sent and the time it took.
    fn send(self, inet: &Netns, seconds: f64) -> Result<(Self, u64, Duration), String> {
        match self {
            Generator::LiveFrames(g) => {
                let (g, sent, took) = g.send(inet, seconds)?;
                Ok((Generator::LiveFrames(g), sent, took))
            }
            Generator::Pktgen(g) => {
                let ns_path = inet.path();
                let (g, sent, took) = inet
                    .within(move || -> Result<_, String> {
                        let (sent, took) = g.send(&ns_path, seconds)?;
                        Ok((g, sent, took))
                    })
                    .map_err(|e| e.to_string())??;
                Ok((Generator::Pktgen(g), sent, took))
            }
        }
    }
}

/// `pf_bench_gen`, loaded with the frame's headers and flow count.
struct LiveFrames {
    ebpf: Ebpf,
    frame: Vec<u8>,
}

impl LiveFrames {
    fn new(topology: &Topology, dest: (Ipv4Addr, u16), flows: u32) -> Result<Self, String> {
        let src: Ipv4Addr = INTERNET_IP.parse().unwrap();
        let mut pkt = Pkt::udp(src.octets(), FIRST_SRC_PORT, dest.0.octets(), dest.1);
        pkt.payload = vec![0; FRAME_LEN - HEADERS_LEN];
        pkt.udp_no_checksum = true;
        let mut frame = pkt.frame();
        assert_eq!(frame.len(), FRAME_LEN);
        frame[0..6].copy_from_slice(&mac(&topology.server, PUBLIC_IFACE)?);
        frame[6..12].copy_from_slice(&mac(&topology.inet, "inet0")?);
        let headers: [u8; HEADERS_LEN] = frame[..HEADERS_LEN].try_into().unwrap();
        let mut ebpf = EbpfLoader::new()
            .override_global("GEN_HEADERS", &headers, true)
            .override_global("GEN_FLOWS", &flows, true)
            .override_global("GEN_FIRST_SRC_PORT", &FIRST_SRC_PORT, true)
            .load(bench_object()?)
            .map_err(|e| format!("loading the generator: {e}"))?;
        load_xdp(&mut ebpf, "pf_bench_gen")?;
        Ok(Self { ebpf, frame })
    }

    /// Sends for `seconds` from inet0, on one pinned CPU; returns the frames sent and the time
    /// it took.
    fn send(self, inet: &Netns, seconds: f64) -> Result<(Self, u64, Duration), String> {
        inet.within(move || -> Result<(Self, u64, Duration), String> {
            pin_to_last_cpu()?;
            let ifindex = pf::kernel::netdev::ifindex("inet0")
                .ok_or("no inet0 in the internet host's namespace")?;
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
            // egress_ifindex. In live-frames mode XDP_TX leaves by ingress_ifindex.
            let ctx: Vec<u8> = [0, FRAME_LEN as u32, 0, ifindex, 0, 0]
                .iter()
                .flat_map(|v: &u32| v.to_ne_bytes())
                .collect();
            let xdp: &Xdp = self
                .ebpf
                .program("pf_bench_gen")
                .ok_or("no program pf_bench_gen")?
                .try_into()
                .map_err(|e| format!("pf_bench_gen: {e}"))?;
            let start = Instant::now();
            let deadline = Duration::from_secs_f64(seconds);
            let mut sent = 0u64;
            while start.elapsed() < deadline {
                xdp.test_run(TestRunOptions {
                    data_in: Some(&self.frame),
                    ctx_in: Some(&ctx),
                    repeat: FRAMES_PER_CALL,
                    attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                    ..Default::default()
                })
                .map_err(|e| format!("live-frames BPF_PROG_TEST_RUN: {e}"))?;
                sent += u64::from(FRAMES_PER_CALL);
            }
            let elapsed = start.elapsed();
            Ok((self, sent, elapsed))
        })
        .map_err(|e| e.to_string())?
    }
}

fn pin_to_last_cpu() -> Result<(), String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it; 0 means this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpus - 1, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "pinning the generator: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// What one configuration needs kept alive while it runs.
pub struct Setup {
    pub topology: Topology,
    /// Counts delivered frames: on eth0 (forwarding) or pub0 (ceiling).
    sink: Ebpf,
    /// pub0's program in the configurations without pf.
    _pass: Option<Ebpf>,
    /// pf's pin directory, in the configurations with pf.
    pf_dir: Option<ScratchDir>,
}

impl Setup {
    /// Detaches the no-op XDP stand-in from pub0 (the configurations without pf), so the
    /// kernel receives as it does with no XDP program at all.
    pub fn detach_stand_in(&mut self) {
        self._pass = None;
    }
}

fn nft_dnat_rules() -> String {
    format!(
        "table ip pfbench {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {PUBLIC_IP} udp dport {PUBLIC_PORT} dnat to {CLIENT_IP}:{TARGET_PORT}
    ip daddr {PUBLIC_IP} tcp dport {PUBLIC_PORT} dnat to {CLIENT_IP}:{TCP_TARGET_PORT}
  }}
}}
"
    )
}

/// Builds the topology for `config`: the forwarding configuration on the server, the sink, and
/// for the TCP runs a route from the internet host to the client network (plain only) and
/// DNAT/reservations for TCP to `TCP_TARGET_PORT`.
pub fn setup(config: Config) -> Result<Setup, String> {
    let topology = Topology::new("pfbench").map_err(|e| format!("topology: {e}"))?;
    let public: Ipv4Addr = PUBLIC_IP.parse().unwrap();
    let client: Ipv4Addr = CLIENT_IP.parse().unwrap();
    let mut pass = if matches!(config, Config::Plain | Config::Nftables) {
        Some(attach_bench_program(
            &topology.server,
            PUBLIC_IFACE,
            "pf_bench_pass",
            (public, 0),
        )?)
    } else {
        None
    };
    let mut pf_dir = None;
    if config == Config::Plain {
        topology
            .inet
            .run(&["ip", "route", "add", "10.8.0.0/24", "via", PUBLIC_IP])
            .map_err(|e| e.to_string())?;
    }
    if config == Config::Nftables {
        let rules = std::env::temp_dir().join(format!("pfbench-{}.nft", std::process::id()));
        std::fs::write(&rules, nft_dnat_rules()).map_err(|e| e.to_string())?;
        let loaded = topology.server.run(&["nft", "-f", rules.to_str().unwrap()]);
        let _ = std::fs::remove_file(&rules);
        loaded.map_err(|e| format!("loading the nftables rules: {e}"))?;
    }
    let sink = if config == Config::Ceiling {
        attach_bench_program(
            &topology.server,
            PUBLIC_IFACE,
            "pf_bench_sink",
            (public, PUBLIC_PORT),
        )?
    } else {
        attach_bench_program(
            &topology.client,
            "eth0",
            "pf_bench_sink",
            (client, TARGET_PORT),
        )?
    };
    if config == Config::RedirectOnly {
        let program = attach_bench_program(
            &topology.server,
            PUBLIC_IFACE,
            "pf_bench_redirect",
            (public, 0),
        )?;
        // In the server's namespace: the kernel resolves a DEVMAP entry's ifindex in the
        // namespace of the process that writes it.
        let program = topology
            .server
            .within(move || -> Result<Ebpf, String> {
                let mut program = program;
                let tun0 =
                    pf::kernel::netdev::ifindex("tun0").ok_or("no tun0 in the server namespace")?;
                let mut devices: DevMap<_> = program
                    .map_mut("BENCH_REDIRECT")
                    .ok_or("the bench object has no BENCH_REDIRECT")?
                    .try_into()
                    .map_err(|e| format!("BENCH_REDIRECT: {e}"))?;
                devices
                    .set(0, tun0, None, 0)
                    .map_err(|e| format!("BENCH_REDIRECT: {e}"))?;
                Ok(program)
            })
            .map_err(|e| e.to_string())??;
        pass = Some(program);
    }
    // After the sink: an XDP program on eth0 is what lets tun0 take redirected frames, and
    // attach fills the fast path's device map from what the devices can do at that moment.
    if let Some(role) = match config {
        Config::Pf => Some(Role::Public),
        Config::PfFastPath => Some(Role::PublicFastPath),
        _ => None,
    } {
        let scratch = ScratchDir::claim(format!("/sys/fs/bpf/pf-bench-fwd-{}", std::process::id()));
        let dir = PinDir::new(scratch.path());
        let mut state = State::open_for_write(&dir).map_err(|e| e.to_string())?;
        for (protocols, target_port) in [
            (Protocols::Udp, TARGET_PORT),
            (Protocols::Tcp, TCP_TARGET_PORT),
        ] {
            state
                .reserve(&reservation(
                    public,
                    PUBLIC_PORT,
                    protocols,
                    client,
                    target_port,
                ))
                .map_err(|e| e.to_string())?;
        }
        drop(state);
        let dir_path: PathBuf = scratch.path().to_path_buf();
        topology
            .server
            .within(move || {
                // A kernel before 6.3 cannot say which devices take redirected frames: the
                // bench names the two that can here (tun0, whose peer has the sink's XDP, and
                // pub0), as an admin would.
                let devices = match pf::kernel::netdev::redirect_targets() {
                    Ok(None) => DeviceChoice::Named(vec!["tun0".into(), PUBLIC_IFACE.into()]),
                    _ => DeviceChoice::Kernel,
                };
                attach::attach(
                    &PinDir::new(dir_path),
                    PUBLIC_IFACE,
                    &AttachOptions {
                        mode: AttachMode::Native,
                        role,
                        devices,
                        ..AttachOptions::default()
                    },
                )
            })
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("pf attach: {e}"))?;
        pf_dir = Some(scratch);
    }
    Ok(Setup {
        topology,
        sink,
        _pass: pass,
        pf_dir,
    })
}

/// pf's `fast_path.redirected` counter, for the fast-path configuration.
fn fast_path_redirected(setup: &Setup, config: Config) -> Result<Option<u64>, String> {
    let (Config::PfFastPath, Some(dir)) = (config, &setup.pf_dir) else {
        return Ok(None);
    };
    let state = State::open_for_read(&PinDir::new(dir.path()))
        .map_err(|e| e.to_string())?
        .ok_or("pf's maps are gone")?;
    let counters = state.counters().map_err(|e| e.to_string())?;
    Ok(Some(counters.fast_path[FastPath::Redirected as usize].1))
}

/// One (configuration, flows) measurement: every repetition.
fn measure(
    setup: &Setup,
    config: Config,
    flows: u32,
    profile: &Profile,
    kind: GeneratorKind,
) -> Result<Value, String> {
    let mut generator = Generator::new(kind, &setup.topology, config.destination(), flows)?;
    // Warm-up: resolves the client's neighbour entry and fills conntrack, not measured.
    let (g, _, _) = generator.send(&setup.topology.inet, profile.forward_seconds.min(0.2))?;
    generator = g;
    let mut runs = Vec::new();
    for _ in 0..profile.repetitions {
        let before = sink_count(&setup.sink)?;
        let redirected_before = fast_path_redirected(setup, config)?;
        let (g, sent, elapsed) = generator.send(&setup.topology.inet, profile.forward_seconds)?;
        generator = g;
        // Frames still queued in a softirq when the generator returned are counted too.
        std::thread::sleep(Duration::from_millis(20));
        let delivered = sink_count(&setup.sink)? - before;
        // The kernel would deliver these frames too: the fast path's figure counts only if pf
        // redirected (at least) every frame that arrived.
        if let (Some(b), Some(a)) = (redirected_before, fast_path_redirected(setup, config)?)
            && a - b < delivered
        {
            return Err(format!(
                "{}: {delivered} frames delivered but only {} redirected",
                config.name(),
                a - b
            ));
        }
        let seconds = elapsed.as_secs_f64();
        runs.push(json!({
            "sent": sent,
            "delivered": delivered,
            "seconds": seconds,
            "sent_pps": sent as f64 / seconds,
            "delivered_pps": delivered as f64 / seconds,
        }));
    }
    let pps: Vec<f64> = runs
        .iter()
        .map(|r| r["delivered_pps"].as_f64().unwrap())
        .collect();
    let sent: Vec<f64> = runs
        .iter()
        .map(|r| r["sent_pps"].as_f64().unwrap())
        .collect();
    let m = median(&pps);
    if m <= 0.0 {
        return Err(format!(
            "{} with {flows} flows delivered nothing: the path is broken",
            config.name()
        ));
    }
    println!(
        "{:<28} {flows:>6} {:>12.3} {:>12.3}",
        config.name(),
        median(&sent) / 1e6,
        m / 1e6
    );
    Ok(json!({
        "configuration": config.name(),
        "flows": flows,
        "generator": kind.name(),
        "runs": runs,
        "median_delivered_pps": m,
    }))
}

/// Runs every configuration with the generator `wanted` (pktgen where the kernel has it, when
/// not given).
pub fn run(profile: &Profile, wanted: Option<GeneratorKind>) -> Result<Vec<Value>, String> {
    let kind = match wanted {
        Some(kind) => kind,
        None => {
            let probe = Netns::new(&format!("pfb{}-probe", std::process::id()))
                .map_err(|e| format!("a namespace to look for pktgen in: {e}"))?;
            if crate::pktgen::available(&probe) {
                GeneratorKind::Pktgen
            } else {
                GeneratorKind::LiveFrames
            }
        }
    };
    if kind == GeneratorKind::Pktgen {
        let probe = Netns::new(&format!("pfb{}-probe", std::process::id()))
            .map_err(|e| format!("a namespace to look for pktgen in: {e}"))?;
        if !crate::pktgen::available(&probe) {
            return Err("--generator pktgen: this kernel has no pktgen (/proc/net/pktgen)".into());
        }
    }
    println!();
    println!(
        "forwarding: 64-byte UDP, one core (generator included), {} s per repetition, generator: {}",
        profile.forward_seconds,
        match kind {
            GeneratorKind::Pktgen => "the kernel's pktgen",
            GeneratorKind::LiveFrames =>
                "pf_bench_gen in live-frames mode (this kernel has no pktgen)",
        }
    );
    println!(
        "{:<28} {:>6} {:>12} {:>12}",
        "configuration", "flows", "sent Mpps", "delivered Mpps"
    );
    let mut results = Vec::new();
    for config in Config::ALL {
        let setup = setup(config)?;
        for &flows in profile.flows {
            results.push(measure(&setup, config, flows, profile, kind)?);
        }
    }
    Ok(results)
}

fn find(results: &[Value], config: Config, flows: u32) -> Option<f64> {
    results
        .iter()
        .find(|r| r["configuration"] == config.name() && r["flows"] == flows)
        .and_then(|r| r["median_delivered_pps"].as_f64())
}

/// The forwarding table with each figure's ratio to nftables DNAT and to the ceiling.
pub fn summary(results: &[Value]) {
    println!("forwarding summary (delivered Mpps, median)");
    if crate::emulated() {
        println!(
            "EMULATED (cargo xtask vm: QEMU software emulation): the rates mean nothing; this run proves the path works"
        );
    }
    println!(
        "{:<28} {:>6} {:>10} {:>14} {:>14}",
        "configuration", "flows", "Mpps", "vs nftables", "vs ceiling"
    );
    let mut flows: Vec<u32> = results
        .iter()
        .filter_map(|r| r["flows"].as_u64().map(|f| f as u32))
        .collect();
    flows.sort_unstable();
    flows.dedup();
    for f in flows {
        for config in Config::ALL {
            let Some(pps) = find(results, config, f) else {
                continue;
            };
            let nft = find(results, Config::Nftables, f).unwrap_or(f64::NAN);
            let ceiling = find(results, Config::Ceiling, f).unwrap_or(f64::NAN);
            println!(
                "{:<28} {f:>6} {:>10.3} {:>13.2}x {:>13.2}x",
                config.name(),
                pps / 1e6,
                pps / nft,
                pps / ceiling
            );
        }
    }
}
