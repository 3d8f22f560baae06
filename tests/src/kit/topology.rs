//! The three hosts of a VPN server doing port forwarding, each in its own network namespace:
//!
//! ```text
//!  internet host            server (pf on pub0, forwarding on)          tunnel client
//!  inet0 198.51.100.2/24 -- pub0 198.51.100.1/24 | tun0 10.8.0.1/24 -- eth0 10.8.0.2/24
//! ```
//!
//! The internet host knows only its own /24: a reply reaches it only if pf rewrote the reply's
//! source back to the public address. The client's default route is the server, as a VPN's
//! would be. Checksum offload is off on every veth, so packets carry full checksums as on a
//! wire and every receiver verifies them.

use std::io;

use crate::kit::netns::{Netns, offload_off, sh};

pub const PUBLIC_IP: &str = "198.51.100.1";
pub const INTERNET_IP: &str = "198.51.100.2";
pub const GATEWAY_TUNNEL_IP: &str = "10.8.0.1";
pub const CLIENT_IP: &str = "10.8.0.2";
/// The server's public interface, where pf attaches.
pub const PUBLIC_IFACE: &str = "pub0";

pub struct Topology {
    pub inet: Netns,
    pub server: Netns,
    pub client: Netns,
}

impl Topology {
    /// Builds the topology with namespaces named `<prefix>-inet`, `-server`, `-client`.
    pub fn new(prefix: &str) -> io::Result<Self> {
        let t = Self {
            inet: Netns::new(&format!("{prefix}-inet"))?,
            server: Netns::new(&format!("{prefix}-server"))?,
            client: Netns::new(&format!("{prefix}-client"))?,
        };
        let (server, client) = (t.server.name(), t.client.name());
        t.link_public()?;
        sh(&[
            "ip", "link", "add", "tun0", "netns", server, "type", "veth", "peer", "name", "eth0",
            "netns", client,
        ])?;

        t.server.run(&[
            "ip",
            "addr",
            "add",
            &format!("{GATEWAY_TUNNEL_IP}/24"),
            "dev",
            "tun0",
        ])?;
        t.server.run(&["ip", "link", "set", "tun0", "up"])?;
        offload_off(&t.server, "tun0")?;
        t.server.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;

        t.client.run(&[
            "ip",
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "eth0",
        ])?;
        t.client.run(&["ip", "link", "set", "eth0", "up"])?;
        offload_off(&t.client, "eth0")?;
        t.client
            .run(&["ip", "route", "add", "default", "via", GATEWAY_TUNNEL_IP])?;
        Ok(t)
    }

    /// The internet host's link to the server's public interface, addressed and up: made by
    /// `new`, and again by a test that deleted it (a public NIC re-created).
    pub fn link_public(&self) -> io::Result<()> {
        sh(&[
            "ip",
            "link",
            "add",
            "inet0",
            "netns",
            self.inet.name(),
            "type",
            "veth",
            "peer",
            "name",
            PUBLIC_IFACE,
            "netns",
            self.server.name(),
        ])?;
        for (ns, iface, addr) in [
            (&self.inet, "inet0", INTERNET_IP),
            (&self.server, PUBLIC_IFACE, PUBLIC_IP),
        ] {
            ns.run(&["ip", "addr", "add", &format!("{addr}/24"), "dev", iface])?;
            ns.run(&["ip", "link", "set", iface, "up"])?;
            offload_off(ns, iface)?;
        }
        Ok(())
    }
}
