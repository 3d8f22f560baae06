//! iperf3 as the TCP and tax sections run it: a server in one namespace, one stream from
//! another, its received throughput read from `--json`.

use std::{thread, time::Duration};

use pf_tests::kit::netns::Netns;
use serde_json::Value;

/// Starts `iperf3 --server` on `addr:port` in `ns` and waits (at most 5 s) until it listens.
pub fn start_server(ns: &Netns, addr: &str, port: u16) -> Result<(), String> {
    let port_arg = port.to_string();
    ns.spawn(&["iperf3", "--server", "--bind", addr, "--port", &port_arg])
        .map_err(|e| format!("starting iperf3 --server: {e}"))?;
    let listening = (0..50).any(|_| {
        let up = ns
            .run(&["ss", "-Hltn", &format!("sport = :{port}")])
            .is_ok_and(|o| !o.stdout.is_empty());
        if !up {
            thread::sleep(Duration::from_millis(100));
        }
        up
    });
    if !listening {
        return Err("iperf3 --server did not start listening within 5 s".into());
    }
    Ok(())
}

/// One iperf3 stream from `ns` to `addr:port` for `seconds`: the bits per second received.
pub fn stream(ns: &Netns, addr: &str, port: u16, seconds: u32) -> Result<f64, String> {
    let (port, seconds) = (port.to_string(), seconds.to_string());
    let out = ns
        .run(&[
            "iperf3", "--client", addr, "--port", &port, "--time", &seconds, "--json",
        ])
        .map_err(|e| format!("iperf3 to {addr}:{port}: {e}"))?;
    let report: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("iperf3 --json output: {e}"))?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| "iperf3 reported no received throughput".to_string())
}
