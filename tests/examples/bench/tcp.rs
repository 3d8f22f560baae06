//! TCP throughput: one iperf3 stream from the internet host to the tunnel client, through pf,
//! through nftables DNAT, and by plain forwarding to the client's own address, on the same
//! topology as the forwarding runs (checksum offload off on every veth, so no TSO/GSO).

use std::{thread, time::Duration};

use pf_tests::kit::topology::{CLIENT_IP, PUBLIC_IP};
use serde_json::{Value, json};

use crate::{
    Profile,
    forwarding::{self, Config, PUBLIC_PORT, TCP_TARGET_PORT},
    median,
};

fn measure(config: Config, profile: &Profile) -> Result<Value, String> {
    let setup = forwarding::setup(config)?;
    let t = &setup.topology;
    let port = TCP_TARGET_PORT.to_string();
    t.client
        .spawn(&["iperf3", "--server", "--bind", CLIENT_IP, "--port", &port])
        .map_err(|e| format!("starting iperf3 --server: {e}"))?;
    // Bounded wait for the server to listen.
    let listening = (0..50).any(|_| {
        let out = t
            .client
            .run(&["ss", "-Hltn", &format!("sport = :{TCP_TARGET_PORT}")])
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        if !out {
            thread::sleep(Duration::from_millis(100));
        }
        out
    });
    if !listening {
        return Err("iperf3 --server did not start listening within 5 s".into());
    }
    let (dest, dest_port) = match config {
        Config::Plain => (CLIENT_IP, TCP_TARGET_PORT),
        _ => (PUBLIC_IP, PUBLIC_PORT),
    };
    let dest_port = dest_port.to_string();
    let seconds = profile.tcp_seconds.to_string();
    let mut runs = Vec::new();
    for _ in 0..profile.repetitions {
        let out = t
            .inet
            .run(&[
                "iperf3", "--client", dest, "--port", &dest_port, "--time", &seconds, "--json",
            ])
            .map_err(|e| format!("iperf3 through {}: {e}", config.name()))?;
        let report: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("iperf3 --json output: {e}"))?;
        let bps = report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .ok_or("iperf3 reported no received throughput")?;
        runs.push(bps);
    }
    let m = median(&runs);
    println!("{:<28} {:>12.2}", config.name(), m / 1e9);
    Ok(json!({
        "configuration": config.name(),
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
    println!("{:<28} {:>12}", "configuration", "Gbit/s");
    [
        Config::Plain,
        Config::Nftables,
        Config::Pf,
        Config::PfFastPath,
    ]
    .into_iter()
    .map(|config| measure(config, profile))
    .collect()
}

/// The TCP table with each figure's ratio to nftables DNAT.
pub fn summary(results: &[Value]) {
    println!("TCP summary (Gbit/s, median)");
    let nft = results
        .iter()
        .find(|r| r["configuration"] == Config::Nftables.name())
        .and_then(|r| r["median_bits_per_second"].as_f64())
        .unwrap_or(f64::NAN);
    for r in results {
        let bps = r["median_bits_per_second"].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<28} {:>10.2} {:>13.2}x vs nftables",
            r["configuration"].as_str().unwrap_or("?"),
            bps / 1e9,
            bps / nft
        );
    }
}
