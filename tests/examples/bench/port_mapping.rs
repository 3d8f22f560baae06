//! The port-mapping server (NAT-PMP through `pf serve`): a tunnel client in a namespace of
//! its own asks the server's tunnel address for mappings, one request at a time as a device
//! does. New mappings (each a reservation: store, maps, audit) and renewals (the expiry only),
//! p50/p99 and the rate one client reaches; baselines in the same run: the API's reserve call
//! on the same service, with a given port (the closest to a mapping: one candidate port) and
//! an automatic one.

use std::{
    net::{Ipv4Addr, UdpSocket},
    path::Path,
    time::Duration,
};

use pf::api::client::Client;
use pf_tests::kit::{
    ScratchDir,
    netns::{Netns, veth},
    serve::Service,
};
use serde_json::{Value, json};

use crate::{
    Profile,
    service::{latencies, percentile},
};

const GATEWAY: &str = "10.8.0.1";
const CLIENT: &str = "10.8.0.2";

/// A NAT-PMP mapping request (RFC 6886): TCP, internal port, no suggestion, lifetime.
fn request(internal: u16, lifetime: u32) -> [u8; 12] {
    let mut d = [0u8; 12];
    d[1] = 2;
    d[4..6].copy_from_slice(&internal.to_be_bytes());
    d[8..12].copy_from_slice(&lifetime.to_be_bytes());
    d
}

pub fn run(profile: &Profile) -> Result<Value, String> {
    let pf_bin = std::env::var_os("PF_BIN")
        .ok_or("PF_BIN is not set: run the benchmark through `cargo xtask bench`")?;
    let tag = std::process::id();
    let server = Netns::new(&format!("pfb{tag}pm-server")).map_err(|e| e.to_string())?;
    let client = Netns::new(&format!("pfb{tag}pm-client")).map_err(|e| e.to_string())?;
    veth(
        (&server, "tun0", &format!("{GATEWAY}/16")),
        (&client, "eth0", &format!("{CLIENT}/16")),
    )
    .map_err(|e| e.to_string())?;
    let pins = ScratchDir::claim(format!("/sys/fs/bpf/pf-bench-pm-{tag}"));
    let files = ScratchDir::claim(std::env::temp_dir().join(format!("pf-bench-pm-{tag}")));
    let policy = format!(
        "[port_mapping]\nlisten = [\"{GATEWAY}\"]\nrequests_per_second = 1000000\n[policy]\npublic_ips = [\"203.0.113.1\"]\ntarget_networks = [\"10.8.0.0/16\"]\nport_pool = [\"1024-65535\"]\nports_per_owner = 1000000\nforbid_listening_ports = false\n"
    );
    let mut service = Service::start(
        Path::new(&pf_bin),
        files,
        pins.path(),
        Some(server.path()),
        &policy,
    )
    .map_err(|e| format!("pf serve: {e}"))?;
    let socket = client
        .within(|| UdpSocket::bind((CLIENT.parse::<Ipv4Addr>().unwrap(), 0)))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let calls = (profile.repetitions as u32 * 100).max(100);
    let ask = |internal: u16| -> Result<(), String> {
        socket
            .send_to(&request(internal, 3600), (GATEWAY, 5351))
            .map_err(|e| e.to_string())?;
        let mut answer = [0u8; 16];
        let (n, _) = socket
            .recv_from(&mut answer)
            .map_err(|e| format!("no answer to a NAT-PMP request: {e}"))?;
        if n != 16 || answer[1] != 130 || answer[2..4] != [0, 0] {
            return Err(format!("NAT-PMP refused: {:02x?}", &answer[..n]));
        }
        Ok(())
    };
    let new = latencies(calls, |i| ask(20_000 + i as u16))?;
    let renew = latencies(calls, |i| ask(20_000 + i as u16))?;
    let api = Client::new(&service.socket());
    let given = latencies(calls, |i| {
        api.call(
            "POST",
            "/v1/reservations",
            Some(&json!({
                "owner": "bench",
                "public": format!("203.0.113.1:{}/tcp", 40_000 + i),
                "to": format!("10.8.{}.{}:80", 100 + i / 250, i % 250 + 1),
            })),
        )
        .map(drop)
        .map_err(|e| e.to_string())
    })?;
    let reserve = latencies(calls, |i| {
        api.call(
            "POST",
            "/v1/reservations",
            Some(&json!({
                "owner": "bench",
                "public": "203.0.113.1/udp",
                "to": format!("10.8.{}.{}", 1 + i / 250, i % 250 + 1),
            })),
        )
        .map(drop)
        .map_err(|e| e.to_string())
    })?;
    service.stop();
    drop(pins);

    println!();
    println!(
        "port mapping: NAT-PMP requests through pf serve ({calls} sequential requests from one tunnel client)"
    );
    println!(
        "{:<34} {:>9} {:>9} {:>11} {:>16}",
        "request", "p50 ms", "p99 ms", "per second", "p50 vs given"
    );
    let base = percentile(&given, 0.5);
    let mut results = Vec::new();
    for (name, v) in [
        ("API reserve, given port", &given),
        ("API reserve, automatic port", &reserve),
        ("NAT-PMP map, new mapping", &new),
        ("NAT-PMP map, renewal", &renew),
    ] {
        let (p50, p99) = (percentile(v, 0.5), percentile(v, 0.99));
        let rate = v.len() as f64 / (v.iter().sum::<f64>() / 1e3);
        println!(
            "{name:<34} {p50:>9.2} {p99:>9.2} {rate:>11.0} {:>15.2}x",
            p50 / base
        );
        results.push(json!({
            "request": name,
            "calls": v.len(),
            "p50_ms": p50,
            "p99_ms": p99,
            "per_second": rate,
            "p50_over_reserve_given_port": p50 / base,
        }));
    }
    Ok(json!({ "results": results }))
}
