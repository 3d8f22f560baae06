//! What pf costs the traffic it does not forward, end to end: one iperf3 TCP stream through a
//! WireGuard tunnel (`kit::wireguard`), from the tunnel client to the server's own tunnel
//! address, so every packet crosses the server's public veth as WireGuard UDP (data one way,
//! acknowledgements the other), which pf must pass untouched. Three configurations, in turn in
//! one run: nothing attached; a no-op XDP program attached the way pf's is (native mode), which
//! on a veth is not free (the veth then runs XDP on every frame in its own NAPI poll, copying
//! frames that lack the headroom, where a NIC's driver would run it before any skb exists); and
//! pf (one reservation on the public address, so its maps are not empty). pf's own tax is pf
//! against the no-op program; the no-op against nothing is veth's. The counters prove pf saw
//! the tunnel's packets and left them alone.

use std::path::PathBuf;

use pf::{
    domain::spec::Protocols,
    kernel::{
        attach::{self, AttachMode, AttachOptions},
        bpffs::PinDir,
        state::State,
    },
};
use pf_common::counters::Outcome;
use pf_tests::kit::{
    ScratchDir,
    topology::{CLIENT_IP, GATEWAY_TUNNEL_IP, PUBLIC_IFACE, PUBLIC_IP},
    wireguard::{Implementation, WireguardTopology},
};
use serde_json::{Value, json};

use crate::{Profile, forwarding::attach_bench_program, iperf, median, reservation};

const IPERF_PORT: u16 = 5201;

fn attach_pf(t: &WireguardTopology, dir: PathBuf) -> Result<(), String> {
    t.server
        .within(move || {
            attach::attach(
                &PinDir::new(dir),
                PUBLIC_IFACE,
                &AttachOptions {
                    mode: AttachMode::Native,
                    ..AttachOptions::default()
                },
            )
        })
        .map_err(|e| e.to_string())?
        .map(drop)
        .map_err(|e| format!("pf attach: {e}"))
}

fn detach_pf(t: &WireguardTopology, dir: PathBuf) -> Result<(), String> {
    t.server
        .within(move || attach::detach(&PinDir::new(dir), PUBLIC_IFACE))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("pf detach: {e}"))
}

/// Bits per second of one iperf3 stream from the client to the server's tunnel address.
fn iperf(t: &WireguardTopology, seconds: u32) -> Result<f64, String> {
    iperf::stream(&t.client, GATEWAY_TUNNEL_IP, IPERF_PORT, seconds)
        .map_err(|e| format!("through the tunnel: {e}"))
}

pub fn run(profile: &Profile) -> Result<Value, String> {
    let t = WireguardTopology::new(&format!("pfbtax{}", std::process::id()))
        .map_err(|e| format!("the WireGuard topology: {e}"))?;
    let implementation = match t.implementation {
        Implementation::Kernel => "the kernel's WireGuard",
        Implementation::Userspace => "wireguard-go (no kernel module here)",
    };
    iperf::start_server(&t.server, GATEWAY_TUNNEL_IP, IPERF_PORT)?;

    let scratch = ScratchDir::claim(format!("/sys/fs/bpf/pf-bench-tax-{}", std::process::id()));
    let dir = PinDir::new(scratch.path());
    let mut state = State::open_for_write(&dir).map_err(|e| e.to_string())?;
    state
        .reserve(&reservation(
            PUBLIC_IP.parse().unwrap(),
            8080,
            Protocols::Tcp,
            CLIENT_IP.parse().unwrap(),
            8080,
        ))
        .map_err(|e| e.to_string())?;
    drop(state);

    println!();
    println!(
        "the tax on traffic pf does not forward: one iperf3 stream through {implementation}, {} s per run",
        profile.tcp_seconds
    );
    let (mut without, mut noop, mut with) = (Vec::new(), Vec::new(), Vec::new());
    let mut passed = 0;
    for _ in 0..profile.repetitions {
        without.push(iperf(&t, profile.tcp_seconds)?);
        let program = attach_bench_program(
            &t.server,
            PUBLIC_IFACE,
            "pf_bench_pass",
            (PUBLIC_IP.parse().unwrap(), 0),
        )?;
        noop.push(iperf(&t, profile.tcp_seconds)?);
        drop(program);
        attach_pf(&t, scratch.path().to_path_buf())?;
        let before = State::open_for_read(&dir)
            .map_err(|e| e.to_string())?
            .ok_or("pf's maps are gone")?
            .counters()
            .map_err(|e| e.to_string())?;
        with.push(iperf(&t, profile.tcp_seconds)?);
        let after = State::open_for_read(&dir)
            .map_err(|e| e.to_string())?
            .ok_or("pf's maps are gone")?
            .counters()
            .map_err(|e| e.to_string())?;
        detach_pf(&t, scratch.path().to_path_buf())?;
        let seen = after.ingress(Outcome::NoReservation) - before.ingress(Outcome::NoReservation);
        let rewritten = after.ingress(Outcome::Rewritten) - before.ingress(Outcome::Rewritten)
            + after.egress(Outcome::Rewritten)
            - before.egress(Outcome::Rewritten);
        if seen == 0 || rewritten != 0 {
            return Err(format!(
                "pf did not see the tunnel's packets as misses ({seen} no_reservation, {rewritten} rewritten)"
            ));
        }
        passed += seen;
    }
    let (m_without, m_noop, m_with) = (median(&without), median(&noop), median(&with));
    println!(
        "{:<30} {:>10} {:>16} {:>14}",
        "configuration", "Gbit/s", "vs nothing", "vs no-op XDP"
    );
    println!(
        "{:<30} {:>10.2} {:>15.3}x",
        "nothing attached",
        m_without / 1e9,
        1.0
    );
    println!(
        "{:<30} {:>10.2} {:>15.3}x {:>13.3}x",
        "no-op XDP program (native)",
        m_noop / 1e9,
        m_noop / m_without,
        1.0
    );
    println!(
        "{:<30} {:>10.2} {:>15.3}x {:>13.3}x   ({passed} tunnel packets pf counted as misses, none rewritten)",
        "pf attached (native)",
        m_with / 1e9,
        m_with / m_without,
        m_with / m_noop
    );
    Ok(json!({
        "wireguard": implementation,
        "runs_bits_per_second_without_pf": without,
        "runs_bits_per_second_noop_xdp": noop,
        "runs_bits_per_second_with_pf": with,
        "median_without": m_without,
        "median_noop_xdp": m_noop,
        "median_with": m_with,
        "with_over_without": m_with / m_without,
        "with_over_noop_xdp": m_with / m_noop,
        "tunnel_packets_passed": passed,
    }))
}
