//! TCP throughput: one iperf3 stream from the internet host to the tunnel client, through pf,
//! through nftables DNAT, and by plain forwarding to the client's own address, on the same
//! topology as the forwarding runs. Checksum offload is off on every veth, so the senders put
//! whole checksums in MTU-sized segments (no TSO/GSO), as a sender behind a wire would.
//!
//! Twice: with GRO off on every veth (veth's default), and with GRO on (a real NIC's default),
//! where the receiving veths merge the segments and the kernel forwards 64 KB at a time.
//! nftables and plain forwarding run, like pf, with an XDP program on pub0 (a no-op), because
//! native XDP on a veth is not free: the veth then runs XDP on every frame in its own NAPI poll
//! and copies each skb that lacks XDP's 256 bytes of headroom, which a NIC driver, running XDP
//! on its own buffers before any skb exists, never does. nftables is measured without it too:
//! the gap between the two is veth's, not pf's.

use pf_tests::kit::topology::{CLIENT_IP, PUBLIC_IFACE, PUBLIC_IP};
use serde_json::{Value, json};

use crate::{
    Profile,
    forwarding::{self, Config, PUBLIC_PORT, TCP_TARGET_PORT},
    iperf, median,
};

/// Every veth of the topology, by namespace: GRO is set on all of them.
fn set_gro(setup: &forwarding::Setup, on: bool) -> Result<(), String> {
    let t = &setup.topology;
    let state = if on { "on" } else { "off" };
    for (ns, iface) in [
        (&t.inet, "inet0"),
        (&t.server, PUBLIC_IFACE),
        (&t.server, "tun0"),
        (&t.client, "eth0"),
    ] {
        ns.run(&["ethtool", "-K", iface, "gro", state])
            .map_err(|e| format!("ethtool -K {iface} gro {state}: {e}"))?;
    }
    Ok(())
}

/// One measured configuration: the topology's, with or without the no-op XDP program that the
/// configurations without pf have on pub0.
#[derive(Clone, Copy)]
struct Run {
    config: Config,
    gro: bool,
    /// nftables with no XDP program on pub0 at all.
    bare: bool,
}

impl Run {
    fn name(self) -> String {
        if self.bare {
            format!("{}, no XDP program", self.config.name())
        } else {
            self.config.name().to_string()
        }
    }
}

fn measure(run: Run, profile: &Profile) -> Result<Value, String> {
    let mut setup = forwarding::setup(run.config)?;
    if run.bare {
        setup.detach_stand_in();
    }
    set_gro(&setup, run.gro)?;
    let t = &setup.topology;
    iperf::start_server(&t.client, CLIENT_IP, TCP_TARGET_PORT)?;
    let (dest, dest_port) = match run.config {
        Config::Plain => (CLIENT_IP, TCP_TARGET_PORT),
        _ => (PUBLIC_IP, PUBLIC_PORT),
    };
    let runs = (0..profile.repetitions)
        .map(|_| {
            iperf::stream(&t.inet, dest, dest_port, profile.tcp_seconds)
                .map_err(|e| format!("{}: {e}", run.name()))
        })
        .collect::<Result<Vec<f64>, String>>()?;
    let m = median(&runs);
    println!(
        "{:<44} {:>4} {:>12.2}",
        run.name(),
        if run.gro { "on" } else { "off" },
        m / 1e9
    );
    Ok(json!({
        "configuration": run.name(),
        "gro": run.gro,
        "runs_bits_per_second": runs,
        "median_bits_per_second": m,
    }))
}

pub fn run(profile: &Profile) -> Result<Vec<Value>, String> {
    println!();
    println!(
        "TCP: one iperf3 stream, {} s per repetition",
        profile.tcp_seconds
    );
    println!("{:<44} {:>4} {:>12}", "configuration", "GRO", "Gbit/s");
    let mut results = Vec::new();
    for gro in [false, true] {
        for (config, bare) in [
            (Config::Plain, false),
            (Config::Nftables, true),
            (Config::Nftables, false),
            (Config::Pf, false),
            (Config::PfFastPath, false),
        ] {
            results.push(measure(Run { config, gro, bare }, profile)?);
        }
    }
    Ok(results)
}

/// The TCP table with each figure's ratio to nftables DNAT (with the same XDP stand-in, at the
/// same GRO setting).
pub fn summary(results: &[Value]) {
    println!("TCP summary (Gbit/s, median)");
    for gro in [false, true] {
        let nft = results
            .iter()
            .find(|r| r["configuration"] == Config::Nftables.name() && r["gro"] == gro)
            .and_then(|r| r["median_bits_per_second"].as_f64())
            .unwrap_or(f64::NAN);
        for r in results.iter().filter(|r| r["gro"] == gro) {
            let bps = r["median_bits_per_second"].as_f64().unwrap_or(f64::NAN);
            println!(
                "{:<44} GRO {:<3} {:>10.2} {:>13.2}x vs nftables",
                r["configuration"].as_str().unwrap_or("?"),
                if gro { "on" } else { "off" },
                bps / 1e9,
                bps / nft
            );
        }
    }
}
