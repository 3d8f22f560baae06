//! Per-packet cost of pf's loaded programs, measured with BPF_PROG_TEST_RUN beside a no-op
//! program of the same hook in the same run, at growing numbers of reservations.
//!
//! `repeat` re-runs one buffer, which a hit rewrites on its first run. So the hit cases use an
//! identity reservation (a public endpoint forwarded to itself): every run does the full lookup,
//! rewrite and checksum update and still hits, and the bench checks that the `rewritten` counter
//! moved by exactly the number of runs.

use std::net::Ipv4Addr;

use aya::{
    Ebpf, EbpfLoader,
    maps::HashMap,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use pf::{
    domain::{
        limits::{Limits, MAX_RATE, SourceList},
        net::Ipv4Net,
        spec::{PortRange, Protocols, Reservation},
    },
    kernel::bpffs::PinDir,
    kernel::limit::LimitRule,
    kernel::object::Programs,
    kernel::state::{EntryTags, State},
    kernel::trigger::{Guards, TriggerRule},
};
use pf_common::counters::{Outcome, Trigger};
use pf_tests::{
    kit::ScratchDir,
    kit::packet::{ETH_P_ARP, Pkt},
};
use serde_json::{Value, json};

use crate::{Profile, bench_object, load_xdp, median, reservation};

/// Where the identity reservations live (TEST-NET-2; the bench sends nothing anywhere).
const HIT_ADDR: [u8; 4] = [198, 51, 100, 1];
const REMOTE: [u8; 4] = [203, 0, 113, 7];
/// A public address with no reservation, whose packets use reserved port numbers.
const OTHER_ADDR: [u8; 4] = [198, 51, 100, 2];
/// WireGuard's usual listen port; no reservation in the bench uses it.
const WIREGUARD_PORT: u16 = 51820;

/// The counter a case must move once per run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Count {
    Outcome(Outcome),
    Trigger(Trigger),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    Noop,
    /// One hash lookup and nothing else (the bench object's `pf_bench_lookup`).
    LookupOnly,
    Ingress,
    NoopTc,
    Egress,
    /// The trigger program (TC ingress on the tunnel side), Ethernet frames.
    Trigger,
}

/// One measured case: the program, the packet it runs on, and the counter that must move once
/// per run (proof the packet took the path the case names).
struct Case<'a> {
    name: &'static str,
    program: Which,
    packet: &'a [u8],
    must_count: Option<Count>,
    /// `TUNNEL_NETWORKS` while the case runs (egress checks unrewritten sources against it).
    tunnel_networks: &'a [Ipv4Net],
    /// `pf trace` on for this port while the case runs (a port the packet does not use: the
    /// cost of tracing without the ring writes); off for `None`.
    trace_port: Option<u16>,
    /// Runs the packet once before each repetition, unmeasured: spends what a rate limit let
    /// back in meanwhile, so every measured run takes the over-limit path.
    spend_first: bool,
}

/// Four tunnel networks, more than a VPN server usually has: a source outside all of them is
/// compared with each, the leak guard's most expensive pass.
fn four_networks() -> Vec<Ipv4Net> {
    [
        "10.8.0.0/16",
        "10.9.0.0/16",
        "100.64.0.0/10",
        "172.16.0.0/12",
    ]
    .iter()
    .map(|n| n.parse().unwrap())
    .collect()
}

/// The i-th filler reservation: distinct public endpoints (198.18.0.0/15, the benchmarking
/// range) and distinct targets, so each adds one entry to each NAT map.
pub fn filler(i: u32) -> Reservation {
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

const XDP_PASS: u32 = 2;
const TC_ACT_SHOT: u32 = 2;

/// The baselines, from the bench object (pf's own object has no bench programs): a program
/// of each hook that only passes, and the lookup-only program, its map holding the key it
/// will read from `packet` (the same 8 bytes, at the same offset, that pf's key is built
/// from).
fn load_baselines(packet: &[u8]) -> Result<Ebpf, String> {
    let mut ebpf = EbpfLoader::new()
        .load(bench_object()?)
        .map_err(|e| format!("loading the bench object: {e}"))?;
    load_xdp(&mut ebpf, "pf_bench_lookup")?;
    load_xdp(&mut ebpf, "pf_bench_pass")?;
    let tc: &mut SchedClassifier = ebpf
        .program_mut("pf_bench_pass_tc")
        .ok_or("no program pf_bench_pass_tc")?
        .try_into()
        .map_err(|e| format!("pf_bench_pass_tc: {e}"))?;
    tc.load()
        .map_err(|e| format!("loading pf_bench_pass_tc: {e}"))?;
    let mut map: HashMap<_, [u8; 8], [u8; 24]> = HashMap::try_from(
        ebpf.map_mut("LOOKUP_ONLY")
            .ok_or("the bench object has no LOOKUP_ONLY")?,
    )
    .map_err(|e| e.to_string())?;
    let key: [u8; 8] = packet[30..38].try_into().unwrap();
    map.insert(key, [0u8; 24], 0).map_err(|e| e.to_string())?;
    Ok(ebpf)
}

/// Runs every case at every size of the profile, then the two-CPU contention cases; returns one
/// JSON object per (size, case), and one per contention case.
pub fn run(profile: &Profile) -> Result<(Vec<Value>, Vec<Value>), String> {
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
    // Port triggering: the identity reservation's twin behind an open gate (1) and one behind
    // a closed gate (2); the rule's client is its target, so a packet from the hit address to
    // the trigger port opens gate 1 (done once below) and refreshes it after.
    let gated_open = reservation(hit, 8081, Protocols::Tcp, hit, 8081);
    let gated_closed = reservation(hit, 8082, Protocols::Tcp, hit, 8082);
    for (r, gate, trigger_port) in [(&gated_open, 1, 6000), (&gated_closed, 2, 6001)] {
        state
            .reserve_tagged(r, EntryTags::gated(gate))
            .map_err(err)?;
        state
            .arm_trigger(&TriggerRule {
                gate,
                client: hit,
                protocols: Protocols::Udp,
                ports: PortRange::single(trigger_port),
                idle_timeout: std::time::Duration::from_secs(3600),
            })
            .map_err(err)?;
    }
    // Limits: the identity reservation's twin with every limit set (rates far above what
    // the bench sends, and an allow-list that holds the sender), and one over its rate, whose
    // every packet after the first is dropped: the cost of a flood.
    let limited = reservation(hit, 8083, Protocols::Tcp, hit, 8083);
    let over_limit = reservation(hit, 8084, Protocols::Tcp, hit, 8084);
    let allow = SourceList::Allow(vec![Ipv4Net {
        addr: REMOTE.into(),
        prefix: 32,
    }]);
    let generous = Limits {
        packets_per_second: Some(MAX_RATE),
        bits_per_second: Some(MAX_RATE),
        syns_per_second: Some(MAX_RATE),
        sources: Some(allow),
    };
    let strict = Limits {
        packets_per_second: Some(1),
        ..Limits::default()
    };
    for (r, slot, limits) in [(&limited, 1, generous), (&over_limit, 2, strict)] {
        let rule = LimitRule { slot, limits };
        state
            .reserve_guarded(
                r,
                Guards {
                    trigger: None,
                    limit: Some(&rule),
                },
            )
            .map_err(err)?;
    }
    let mut programs = Programs::load(&dir).map_err(err)?;
    programs.load_trigger(true).map_err(err)?;
    let limited_hit = Pkt::tcp(REMOTE, 40000, HIT_ADDR, 8083).frame();
    let over_limit_hit = Pkt::tcp(REMOTE, 40000, HIT_ADDR, 8084).frame();
    let trigger_packet = Pkt::udp(HIT_ADDR, 40000, REMOTE, 6000).frame();
    programs
        .trigger(true)
        .test_run(TestRunOptions {
            data_in: Some(&trigger_packet),
            ..Default::default()
        })
        .map_err(|e| format!("opening the bench's gate: {e}"))?;
    if state.trigger_gate(1).map_err(err)?.open_for.is_none() {
        return Err("the trigger packet did not open the bench's gate".into());
    }
    let gated_hit = Pkt::tcp(REMOTE, 40000, HIT_ADDR, 8081).frame();
    let gated_shut = Pkt::tcp(REMOTE, 40000, HIT_ADDR, 8082).frame();
    // A tunnel client's ordinary packet (web traffic): what the trigger program sees nearly
    // always.
    let client_traffic = Pkt::tcp(HIT_ADDR, 40000, REMOTE, 443).frame();
    let mut trace = pf::kernel::trace::Trace::open(&dir)
        .map_err(err)?
        .ok_or("pf's trace maps are missing")?;

    let tcp_hit = Pkt::tcp(REMOTE, 40000, HIT_ADDR, 8080).frame();
    let udp_hit = Pkt::udp(REMOTE, 40000, HIT_ADDR, 5353).frame();
    // Ingress misses: a port some reservation uses, on another address (the port count lets it
    // through to the hash lookup), and WireGuard's own UDP to its listen port, which no
    // reservation uses (the count stops it before the lookup): nearly every packet a VPN
    // server's public NIC carries.
    let miss = Pkt::tcp(REMOTE, 40000, OTHER_ADDR, 8080).frame();
    let wireguard_in = Pkt::udp(REMOTE, 40000, HIT_ADDR, WIREGUARD_PORT).frame();
    let not_ipv4 = Pkt {
        ether_type: ETH_P_ARP,
        ..Pkt::tcp(REMOTE, 1, HIT_ADDR, 1)
    }
    .frame();
    let egress_hit = Pkt::tcp(HIT_ADDR, 8080, REMOTE, 40000).frame();
    // Egress misses: the server's own or masqueraded traffic (the public address, no
    // reservation), and a tunnel client's reply whose reservation is gone.
    let egress_miss = Pkt::tcp(HIT_ADDR, 55000, REMOTE, 443).frame();
    let egress_miss_port_in_use = Pkt::tcp(OTHER_ADDR, 8080, REMOTE, 40000).frame();
    let wireguard_out = Pkt::udp(HIT_ADDR, WIREGUARD_PORT, REMOTE, 40000).frame();
    // From a tunnel network (the last of the four) but outside 10.0.0.0/12, where the fillers'
    // targets are (a million of them reach 10.15.x.x), so it is never a reservation's target.
    let egress_leak = Pkt::tcp([172, 16, 0, 2], 80, REMOTE, 40000).frame();
    let networks = four_networks();
    let baselines = load_baselines(&tcp_hit)?;
    let xdp_baseline = |name: &str| -> Result<&Xdp, String> {
        baselines
            .program(name)
            .ok_or_else(|| format!("no program {name}"))?
            .try_into()
            .map_err(|e| format!("{name}: {e}"))
    };
    let lookup_only = xdp_baseline("pf_bench_lookup")?;
    let noop = xdp_baseline("pf_bench_pass")?;
    let noop_tc: &SchedClassifier = baselines
        .program("pf_bench_pass_tc")
        .ok_or("no program pf_bench_pass_tc")?
        .try_into()
        .map_err(|e| format!("pf_bench_pass_tc: {e}"))?;

    let cases = [
        Case {
            name: "no-op XDP (baseline)",
            program: Which::Noop,
            packet: &tcp_hit,
            must_count: None,
            tunnel_networks: &[],
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "hash lookup only",
            program: Which::LookupOnly,
            packet: &tcp_hit,
            must_count: None,
            tunnel_networks: &[],
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "ingress hit TCP",
            program: Which::Ingress,
            packet: &tcp_hit,
            must_count: Some(Count::Outcome(Outcome::Rewritten)),
            tunnel_networks: &[],
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "ingress hit TCP, tracing another port",
            program: Which::Ingress,
            packet: &tcp_hit,
            must_count: Some(Count::Outcome(Outcome::Rewritten)),
            tunnel_networks: &[],
            trace_port: Some(9),
            spend_first: false,
        },
        Case {
            name: "ingress hit UDP",
            program: Which::Ingress,
            packet: &udp_hit,
            must_count: Some(Count::Outcome(Outcome::Rewritten)),
            tunnel_networks: &[],
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "ingress hit TCP, limits",
            program: Which::Ingress,
            packet: &limited_hit,
            must_count: Some(Count::Outcome(Outcome::Rewritten)),
            tunnel_networks: &[],
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "ingress, over limit (drop)",
            program: Which::Ingress,
            packet: &over_limit_hit,
            must_count: Some(Count::Outcome(Outcome::LimitDropped)),
            tunnel_networks: &[],
            trace_port: None,
            spend_first: true,
        },
        Case {
            name: "ingress hit TCP, open gate",
            program: Which::Ingress,
            packet: &gated_hit,
            must_count: Some(Count::Outcome(Outcome::Rewritten)),
            tunnel_networks: &[],
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "ingress, closed gate",
            program: Which::Ingress,
            packet: &gated_shut,
            must_count: Some(Count::Outcome(Outcome::NoReservation)),
            tunnel_networks: &[],
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "ingress miss, port in use",
            program: Which::Ingress,
            packet: &miss,
            must_count: Some(Count::Outcome(Outcome::NoReservation)),
            tunnel_networks: &[],
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "ingress miss, WireGuard",
            program: Which::Ingress,
            packet: &wireguard_in,
            must_count: Some(Count::Outcome(Outcome::NoReservation)),
            tunnel_networks: &[],
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "ingress non-IPv4",
            program: Which::Ingress,
            packet: &not_ipv4,
            must_count: Some(Count::Outcome(Outcome::NotIpv4)),
            tunnel_networks: &[],
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "no-op TC (baseline)",
            program: Which::NoopTc,
            packet: &egress_hit,
            must_count: None,
            tunnel_networks: &[],
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "egress hit TCP",
            program: Which::Egress,
            packet: &egress_hit,
            must_count: Some(Count::Outcome(Outcome::Rewritten)),
            tunnel_networks: &networks,
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "egress miss, no guard",
            program: Which::Egress,
            packet: &egress_miss,
            must_count: Some(Count::Outcome(Outcome::NoReservation)),
            tunnel_networks: &[],
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "egress miss, port in use",
            program: Which::Egress,
            packet: &egress_miss_port_in_use,
            must_count: Some(Count::Outcome(Outcome::NoReservation)),
            tunnel_networks: &[],
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "egress miss, WireGuard",
            program: Which::Egress,
            packet: &wireguard_out,
            must_count: Some(Count::Outcome(Outcome::NoReservation)),
            tunnel_networks: &networks,
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "egress miss, 4 networks",
            program: Which::Egress,
            packet: &egress_miss,
            must_count: Some(Count::Outcome(Outcome::NoReservation)),
            tunnel_networks: &networks,
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "trigger: client traffic",
            program: Which::Trigger,
            packet: &client_traffic,
            must_count: Some(Count::Trigger(Trigger::NoTrigger)),
            tunnel_networks: &[],
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "trigger: refresh open gate",
            program: Which::Trigger,
            packet: &trigger_packet,
            must_count: Some(Count::Trigger(Trigger::Refreshed)),
            tunnel_networks: &[],
            trace_port: None,
            spend_first: false,
        },
        Case {
            name: "egress leak dropped",
            program: Which::Egress,
            packet: &egress_leak,
            must_count: Some(Count::Outcome(Outcome::TunnelSourceDropped)),
            tunnel_networks: &networks,
            trace_port: None,
            spend_first: false,
        },
    ];

    // First, while the maps hold only the identity reservations: the number of entries does
    // not change contention, and `stats` (which the check reads) stays cheap.
    let contention = contention(profile, &mut state, &programs)?;
    let mut results = Vec::new();
    let mut filled = 2u32;
    println!(
        "pf per-packet cost, BPF_PROG_TEST_RUN repeat={}, median of {} ({} profile)",
        profile.repeat, profile.repetitions, profile.name
    );
    println!(
        "{:>13}  {:<26} {:>10} {:>22}",
        "reservations", "case", "ns/packet", "vs no-op of its hook"
    );
    for &size in profile.sizes {
        if filled < size {
            let more: Vec<Reservation> = (filled..size).map(filler).collect();
            state
                .reserve_all(&more)
                .map_err(|e| format!("filling to {size} reservations: {e}"))?;
            filled = size;
        }
        let mut noop_median = f64::NAN;
        for Case {
            name,
            program,
            packet,
            must_count,
            tunnel_networks,
            trace_port,
            spend_first,
        } in &cases
        {
            state.set_tunnel_networks(tunnel_networks).map_err(err)?;
            match trace_port {
                Some(port) => trace.on(Some(*port)).map_err(err)?,
                None => trace.off().map_err(err)?,
            }
            let mut runs = Vec::new();
            for _ in 0..profile.repetitions {
                if *spend_first {
                    // Whatever the limit let back in since the last run.
                    programs
                        .ingress()
                        .test_run(TestRunOptions {
                            data_in: Some(packet),
                            ..Default::default()
                        })
                        .map_err(|e| format!("{name}: BPF_PROG_TEST_RUN: {e}"))?;
                }
                let before = state.counters().map_err(err)?;
                let opts = TestRunOptions {
                    data_in: Some(packet),
                    repeat: profile.repeat,
                    ..Default::default()
                };
                let result = match program {
                    Which::Noop => noop.test_run(opts),
                    Which::LookupOnly => lookup_only.test_run(opts),
                    Which::NoopTc => noop_tc.test_run(opts),
                    Which::Ingress => programs.ingress().test_run(opts),
                    Which::Egress => programs.egress().test_run(opts),
                    Which::Trigger => programs.trigger(true).test_run(opts),
                }
                .map_err(|e| format!("{name}: BPF_PROG_TEST_RUN: {e}"))?;
                let dropped = *must_count == Some(Count::Outcome(Outcome::TunnelSourceDropped));
                if *program == Which::Egress && (result.return_value == TC_ACT_SHOT) != dropped {
                    return Err(format!("{name}: verdict {}", result.return_value));
                }
                if *program == Which::LookupOnly && result.return_value != XDP_PASS {
                    return Err(format!("{name}: the lookup missed"));
                }
                if let Some(count) = *must_count {
                    let after = state.counters().map_err(err)?;
                    let (counter, moved) = match count {
                        Count::Outcome(o) if *program == Which::Ingress => {
                            (o.name(), after.ingress(o) - before.ingress(o))
                        }
                        Count::Outcome(o) => (o.name(), after.egress(o) - before.egress(o)),
                        Count::Trigger(t) => (
                            t.name(),
                            after.trigger[t as usize].1 - before.trigger[t as usize].1,
                        ),
                    };
                    if moved != u64::from(profile.repeat) {
                        return Err(format!(
                            "{name}: counter {counter} moved {moved}, not {}: the case did not take its path every run",
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
            println!("{size:>13}  {name:<26} {m:>10.1} {ratio:>21.2}x");
            results.push(json!({ "reservations": size, "case": name, "runs_ns": runs, "median_ns": m, "ratio_to_noop_of_its_hook": ratio }));
        }
    }

    Ok((results, contention))
}

/// The CPUs this process may run on (a cpuset or a container may allow fewer than the machine
/// has), lowest first.
fn allowed_cpus() -> Result<Vec<usize>, String> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set for the kernel to fill.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(format!(
                "reading the CPU affinity: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect())
    }
}

/// Pins the calling thread to one CPU.
fn pin_to_cpu(cpu: usize) -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "pinning to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// The ingress hit on two CPUs at once, with the NAT entry's counters shared by both (one port,
/// flows on two CPUs: the worst case of the atomic adds), beside each CPU on its own entry and
/// one CPU alone. The shared entry's packet counter must move by exactly both CPUs' runs.
fn contention(
    profile: &Profile,
    state: &mut State,
    programs: &Programs,
) -> Result<Vec<Value>, String> {
    let cpus = allowed_cpus()?;
    if cpus.len() < 2 {
        println!("contention: skipped, this process may run on one CPU only");
        return Ok(Vec::new());
    }
    let err = |e: pf::PfError| e.to_string();
    let hit = Ipv4Addr::from(HIT_ADDR);
    let second = reservation(hit, 8443, Protocols::Tcp, hit, 8443);
    state.reserve(&second).map_err(err)?;
    let first_packet = Pkt::tcp(REMOTE, 40000, HIT_ADDR, 8080).frame();
    let second_packet = Pkt::tcp(REMOTE, 40000, HIT_ADDR, 8443).frame();
    let in_packets = |state: &State, port: u16| -> Result<u64, String> {
        let stats = state.stats().map_err(err)?;
        Ok(stats
            .reservations
            .iter()
            .find(|(r, _)| r.public.addr == hit && r.public.ports.first == port)
            .map_or(0, |(_, t)| t.in_packets))
    };
    println!();
    println!(
        "contention: ingress hit TCP on 2 CPUs at once (BPF_PROG_TEST_RUN repeat={}, median of {})",
        profile.repeat, profile.repetitions
    );
    println!("{:<34} {:>14} {:>14}", "case", "ns/packet", "vs one CPU");
    let mut results = Vec::new();
    let mut alone = f64::NAN;
    for (name, packets) in [
        ("one CPU alone", vec![&first_packet[..]]),
        (
            "two CPUs, one shared entry",
            vec![&first_packet[..], &first_packet[..]],
        ),
        (
            "two CPUs, an entry each",
            vec![&first_packet[..], &second_packet[..]],
        ),
    ] {
        let mut runs = Vec::new();
        for _ in 0..profile.repetitions {
            let before = in_packets(state, 8080)?;
            let per_cpu = ingress_on_cpus(programs, &cpus, &packets, profile.repeat)?;
            let moved = in_packets(state, 8080)? - before;
            let want = u64::from(profile.repeat)
                * packets.iter().filter(|p| **p == &first_packet[..]).count() as u64;
            if moved != want {
                return Err(format!(
                    "contention, {name}: the entry counted {moved} packets, not {want}: counts were lost"
                ));
            }
            runs.push(per_cpu.iter().sum::<f64>() / per_cpu.len() as f64);
        }
        let m = median(&runs);
        if alone.is_nan() {
            alone = m;
        }
        println!("{name:<34} {m:>14.1} {:>13.2}x", m / alone);
        results.push(json!({ "contention": name, "runs_ns": runs, "median_ns": m, "ratio_to_one_cpu": m / alone }));
    }
    state.release(&second.public).map_err(err)?;
    results.push(limit_across_cpus(profile, state, programs, &cpus)?);
    Ok(results)
}

/// Runs the ingress program at the same moment on one CPU per packet (`cpus` in order), each
/// `repeat` times: each CPU's mean ns a packet, as the kernel measured it.
fn ingress_on_cpus(
    programs: &Programs,
    cpus: &[usize],
    packets: &[&[u8]],
    repeat: u32,
) -> Result<Vec<f64>, String> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = packets
            .iter()
            .zip(cpus)
            .map(|(packet, &cpu)| {
                scope.spawn(move || -> Result<f64, String> {
                    pin_to_cpu(cpu)?;
                    let opts = TestRunOptions {
                        data_in: Some(packet),
                        repeat,
                        ..Default::default()
                    };
                    let result = programs
                        .ingress()
                        .test_run(opts)
                        .map_err(|e| format!("BPF_PROG_TEST_RUN: {e}"))?;
                    Ok(result.duration.as_nanos() as f64)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "a bench thread panicked".to_string())?
            })
            .collect()
    })
}

/// A packet-rate limit shared by two CPUs flooding it at once: what it admitted against what
/// its rate and burst allow over the time the CPUs ran (the kernel's own measure of each run,
/// whole nanoseconds per packet, so within about 1%). The bucket is one word both CPUs read
/// and add to (`pf-ebpf/src/limit.rs`); this measures the error that leaves. With the coarse
/// clock, what a limit admits grows by a tick's worth at a time (4 ms at HZ=250: 4,000 packets
/// here).
fn limit_across_cpus(
    profile: &Profile,
    state: &mut State,
    programs: &Programs,
    cpus: &[usize],
) -> Result<Value, String> {
    const RATE: u64 = 1_000_000;
    let err = |e: pf::PfError| e.to_string();
    let hit = Ipv4Addr::from(HIT_ADDR);
    let limited = reservation(hit, 8085, Protocols::Tcp, hit, 8085);
    let rule = LimitRule {
        slot: 3,
        limits: Limits {
            packets_per_second: Some(RATE),
            ..Limits::default()
        },
    };
    state
        .reserve_guarded(
            &limited,
            Guards {
                trigger: None,
                limit: Some(&rule),
            },
        )
        .map_err(err)?;
    let packet = Pkt::tcp(REMOTE, 40000, HIT_ADDR, 8085).frame();
    // Runs on each CPU: far more than the burst (100,000 packets), whatever the profile, so
    // the rate is what the run measures. What the limit admits moves a clock tick's worth at
    // a time (4,000 packets at HZ=250) and the window is whole nanoseconds a packet times the
    // runs, so this resolves the error to about 1.5%.
    let runs = profile.repeat.max(1_000_000) * 3;
    let mut errors = Vec::new();
    for _ in 0..profile.repetitions {
        // A full bucket at the start of every run.
        state.arm_limit(&rule).map_err(err)?;
        let before = state.counters().map_err(err)?;
        let per_packet_ns = ingress_on_cpus(programs, &cpus[..2], &[&packet, &packet], runs)?;
        let after = state.counters().map_err(err)?;
        let admitted = after.ingress(Outcome::Rewritten) - before.ingress(Outcome::Rewritten);
        let window_ns = per_packet_ns.iter().copied().fold(0.0, f64::max) * f64::from(runs);
        let burst = RATE as f64 * pf_common::limits::LIMIT_BURST_NS as f64 / 1e9 + 1.0;
        let expected = burst + RATE as f64 * window_ns / 1e9;
        println!(
            "  limit run: admitted {admitted} in {:.1} ms on 2 CPUs, its rate and burst allow {expected:.0}",
            window_ns / 1e6
        );
        errors.push((admitted as f64 - expected) / expected);
    }
    state.release(&limited.public).map_err(err)?;
    let m = median(&errors);
    println!(
        "{:<34} {:>13.1}%   (1,000,000 packets/s shared by 2 CPUs flooding it)",
        "limit admitted vs its rate",
        m * 100.0
    );
    if m.abs() > 0.10 {
        return Err(format!(
            "the limit admitted {:.1}% off its rate across 2 CPUs: more than 10%",
            m * 100.0
        ));
    }
    Ok(
        json!({ "contention": "limit admitted vs its rate, 2 CPUs", "errors": errors, "median_error": m }),
    )
}
