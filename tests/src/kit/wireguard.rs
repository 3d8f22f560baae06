//! A VPN server as providers run it: the tunnel is real WireGuard, and its encrypted UDP crosses
//! the server's public NIC, where pf is attached.
//!
//! ```text
//!  tunnel client                 internet host (routes)             server (pf on pub0)
//!  ul0 203.0.113.2/24 ------- wan0 203.0.113.1/24
//!                             inet0 198.51.100.2/24 ------------- pub0 198.51.100.1/24
//!  pfwgc 10.8.0.2/32  ~~~~~~~~~~~~~~~ WireGuard over UDP 51820 ~~~~~~ pfwgs 10.8.0.1/24
//! ```
//!
//! The client's peer is the server at 198.51.100.1:51820 with `AllowedIPs = 0.0.0.0/0` (all its
//! traffic goes through the tunnel, save the route to that endpoint over its underlay); the
//! server's peer is the client with `AllowedIPs = 10.8.0.2/32`. The server's default route is the
//! internet host, as a real server's is its upstream router. The internet host knows neither
//! 10.8.0.0/24 nor any route to it: a reply reaches it only if pf rewrote its source.
//!
//! WireGuard is the kernel's module where the kernel has one (`ip link add ... type wireguard`),
//! and `wireguard-go` on a TUN device otherwise; both run with real keys from `wg genkey`. The
//! interface names are pf-specific (`pfwgs`, `pfwgc`) because wireguard-go's control socket,
//! `/var/run/wireguard/NAME.sock`, is one path for every namespace.

use std::{
    io,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::kit::{
    netns::{Netns, run, sh, veth},
    topology::{CLIENT_IP, GATEWAY_TUNNEL_IP, INTERNET_IP, PUBLIC_IFACE, PUBLIC_IP},
};

/// The server's WireGuard interface (a provider's `wg0`).
pub const SERVER_WG: &str = "pfwgs";
/// The tunnel client's WireGuard interface.
pub const CLIENT_WG: &str = "pfwgc";
/// The server's WireGuard UDP port, on its public address.
pub const LISTEN_PORT: u16 = 51820;
/// WireGuard's default MTU: 1500 less the outer IPv4, UDP and WireGuard headers (60 + 20).
pub const WG_MTU: u32 = 1420;
/// The internet host's address on the client's underlay.
pub const UNDERLAY_GATEWAY_IP: &str = "203.0.113.1";
/// The tunnel client's underlay address: the source of its WireGuard UDP.
pub const UNDERLAY_CLIENT_IP: &str = "203.0.113.2";

/// Which WireGuard the topology runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implementation {
    /// The kernel's module.
    Kernel,
    /// `wireguard-go` on a TUN device.
    Userspace,
}

pub struct WireguardTopology {
    pub inet: Netns,
    pub server: Netns,
    pub client: Netns,
    pub implementation: Implementation,
}

/// A fresh private key and its public key.
fn keypair() -> io::Result<(String, String)> {
    let private = String::from_utf8_lossy(&sh(&["wg", "genkey"])?.stdout)
        .trim()
        .to_string();
    let mut pubkey = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    io::Write::write_all(pubkey.stdin.as_mut().unwrap(), private.as_bytes())?;
    let out = pubkey.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other("wg pubkey failed"));
    }
    Ok((
        private,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

/// Whether this kernel can make a WireGuard interface (its module is built in or loadable).
fn kernel_has_wireguard(ns: &Netns) -> bool {
    let made = ns
        .cmd(&["ip", "link", "add", "pfwgprobe", "type", "wireguard"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if made {
        let _ = ns.run(&["ip", "link", "del", "pfwgprobe"]);
    }
    made
}

impl WireguardTopology {
    /// Builds the topology with namespaces named `<prefix>-inet`, `-server`, `-client`, and
    /// waits (at most 15 s) until the tunnel carries a ping both ways.
    pub fn new(prefix: &str) -> io::Result<Self> {
        let mut t = Self {
            inet: Netns::new(&format!("{prefix}-inet"))?,
            server: Netns::new(&format!("{prefix}-server"))?,
            client: Netns::new(&format!("{prefix}-client"))?,
            implementation: Implementation::Userspace,
        };
        veth(
            (&t.inet, "inet0", &format!("{INTERNET_IP}/24")),
            (&t.server, PUBLIC_IFACE, &format!("{PUBLIC_IP}/24")),
        )?;
        veth(
            (&t.inet, "wan0", &format!("{UNDERLAY_GATEWAY_IP}/24")),
            (&t.client, "ul0", &format!("{UNDERLAY_CLIENT_IP}/24")),
        )?;
        t.inet.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        t.server.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        t.server
            .run(&["ip", "route", "add", "default", "via", INTERNET_IP])?;
        t.client.run(&[
            "ip",
            "route",
            "add",
            &format!("{PUBLIC_IP}/32"),
            "via",
            UNDERLAY_GATEWAY_IP,
        ])?;

        t.implementation = if kernel_has_wireguard(&t.server) {
            Implementation::Kernel
        } else {
            Implementation::Userspace
        };
        let (server_private, server_public) = keypair()?;
        let (client_private, client_public) = keypair()?;
        t.start_interface(&t.server, SERVER_WG)?;
        t.start_interface(&t.client, CLIENT_WG)?;
        t.configure(
            &t.server,
            SERVER_WG,
            &server_private,
            &[
                "listen-port",
                &LISTEN_PORT.to_string(),
                "peer",
                &client_public,
                "allowed-ips",
                &format!("{CLIENT_IP}/32"),
            ],
        )?;
        t.configure(
            &t.client,
            CLIENT_WG,
            &client_private,
            &[
                "peer",
                &server_public,
                "endpoint",
                &format!("{PUBLIC_IP}:{LISTEN_PORT}"),
                "allowed-ips",
                "0.0.0.0/0",
            ],
        )?;
        for (ns, iface, addr) in [
            (&t.server, SERVER_WG, format!("{GATEWAY_TUNNEL_IP}/24")),
            (&t.client, CLIENT_WG, format!("{CLIENT_IP}/32")),
        ] {
            ns.run(&["ip", "addr", "add", &addr, "dev", iface])?;
            ns.run(&["ip", "link", "set", iface, "mtu", &WG_MTU.to_string(), "up"])?;
        }
        t.client
            .run(&["ip", "route", "add", "default", "dev", CLIENT_WG])?;
        t.wait_for_handshake()?;
        Ok(t)
    }

    /// Creates the WireGuard interface `name` in `ns`.
    fn start_interface(&self, ns: &Netns, name: &str) -> io::Result<()> {
        match self.implementation {
            Implementation::Kernel => ns
                .run(&["ip", "link", "add", name, "type", "wireguard"])
                .map(drop),
            Implementation::Userspace => {
                // A socket left by a wireguard-go killed in an earlier run would stop this one.
                let socket = format!("/var/run/wireguard/{name}.sock");
                let _ = std::fs::remove_file(&socket);
                // `-f`: in the foreground, so the namespace owns the process and kills it on
                // drop; the environment variable is wireguard-go's consent to run where a
                // kernel module could exist.
                ns.spawn(&[
                    "env",
                    "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1",
                    "wireguard-go",
                    "-f",
                    name,
                ])?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while !Path::new(&socket).exists() {
                    if Instant::now() > deadline {
                        return Err(io::Error::other(format!(
                            "wireguard-go {name} made no control socket at {socket} in 10 s"
                        )));
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                Ok(())
            }
        }
    }

    /// `wg set IFACE private-key FILE ARGS...`, the key passed through a file as `wg` requires.
    fn configure(&self, ns: &Netns, iface: &str, private: &str, args: &[&str]) -> io::Result<()> {
        let key_file =
            std::env::temp_dir().join(format!("pf-wg-{}-{iface}.key", std::process::id()));
        std::fs::write(&key_file, private)?;
        let key_path = key_file.display().to_string();
        let mut words = vec!["wg", "set", iface, "private-key", &key_path];
        words.extend_from_slice(args);
        let result = ns.run(&words);
        let _ = std::fs::remove_file(&key_file);
        result.map(drop)
    }

    /// Pings the server's tunnel address from the client until it answers (the first packet
    /// starts the handshake, after which the server knows the client's endpoint).
    fn wait_for_handshake(&self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let answered = self
                .client
                .cmd(&["ping", "-c", "1", "-W", "1", GATEWAY_TUNNEL_IP])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if answered {
                return Ok(());
            }
            if Instant::now() > deadline {
                let show = run(&mut self.server.cmd(&["wg", "show", SERVER_WG]))
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_else(|e| e.to_string());
                return Err(io::Error::other(format!(
                    "the WireGuard tunnel carried no ping in 15 s ({:?}); server: {show}",
                    self.implementation
                )));
            }
        }
    }
}

impl Drop for WireguardTopology {
    /// The namespaces then kill wireguard-go (SIGKILL, which leaves its socket behind) and take
    /// the kernel's interfaces with them.
    fn drop(&mut self) {
        if self.implementation == Implementation::Userspace {
            for name in [SERVER_WG, CLIENT_WG] {
                let _ = std::fs::remove_file(format!("/var/run/wireguard/{name}.sock"));
            }
        }
    }
}
