//! The policy every reservation must pass. Each refusal names the rule (`policy.<key>`) that
//! refused it.

use std::{fmt, net::Ipv4Addr, time::Duration};

use crate::{
    domain::{
        limits::Limits,
        net::Ipv4Net,
        spec::{PortRange, Protocols, Reservation},
    },
    kernel::host::{Listening, LocalAddresses},
};

/// A reservation the policy refuses, with the rule that refused it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("refused by {rule}: {detail}")]
pub struct Refusal {
    pub rule: &'static str,
    pub detail: String,
}

fn refuse(rule: &'static str, detail: impl Into<String>) -> Refusal {
    Refusal {
        rule,
        detail: detail.into(),
    }
}

/// The longest lifetime pf takes: far beyond any product's, and far inside what its clock and
/// its dates can hold.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 366 * 86_400);

/// A lifetime as people write it: `90s`, `30m`, `12h`, `30d`, `1w` (humantime's syntax).
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a lifetime such as 30d, 12h or 90s ({e})"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("'{s}' is shorter than one second"));
    }
    if d > MAX_TTL {
        return Err(format!("'{s}' is longer than 100 years"));
    }
    Ok(d)
}

/// Default ports per owner: AirVPN's allowance per customer.
pub const DEFAULT_PORTS_PER_OWNER: u64 = 20;
/// Default widest range one reservation may take.
pub const DEFAULT_MAX_RANGE_PORTS: u32 = 16;
/// Default pool: the unprivileged ports.
pub const DEFAULT_PORT_POOL: PortRange = PortRange {
    first: 1024,
    last: 65535,
};

/// The rules every reservation must pass.
#[derive(Clone, Debug)]
pub struct Policy {
    pub public_ips: Vec<Ipv4Addr>,
    /// In a fleet on a shared store: the other agents' public IPs, which a change made
    /// through this agent may name too (their own agents forward them). Not from the config.
    pub fleet_ips: Vec<Ipv4Addr>,
    /// Whether this server is an agent of a fleet on a shared store, where fleet-wide
    /// reservations (`fleet:PORT/PROTO`) can be made. Not from the config.
    pub in_fleet: bool,
    pub target_networks: Vec<Ipv4Net>,
    pub port_pool: Vec<PortRange>,
    pub forbidden_ports: Vec<PortRange>,
    pub forbid_listening_ports: bool,
    pub ports_per_owner: u64,
    pub max_range_ports: u32,
    pub default_ttl: Option<Duration>,
    pub max_ttl: Option<Duration>,
    /// Egress drops any packet it did not rewrite whose source is in a target network: a
    /// reply on a connection whose reservation is gone would otherwise leave with the
    /// client's tunnel address. Off only where tunnel addresses are public and leave the
    /// server unmasqueraded.
    pub drop_tunnel_source_leaks: bool,
    /// What a start or a reload does with a reservation this policy would refuse.
    pub on_violation: OnViolation,
    /// How long a released or expired range stays out of other owners' reach (and out of
    /// their automatic ports): their peers (torrent swarms, game clients) would otherwise
    /// reach the next customer's device. None: no quarantine.
    pub quarantine: Option<Duration>,
    /// How long the past holders of each range are kept (`pf who`), then forgotten.
    pub history_retention: Duration,
    /// New reservations (and port mappings, and restores) are taken; false while the feature
    /// winds down (existing ones are kept).
    pub accept_new: bool,
    /// Renewals are taken (`pf renew`, a device's mapping renewals); false lets existing
    /// reservations run out.
    pub accept_renewals: bool,
    /// The limits every reservation gets (`[policy.limits]`), and the most it may ask for:
    /// a reservation may ask for lower rates, never higher or none.
    pub limits: Limits,
    /// Owners whose limits are others (`[policy.owner_limits.OWNER]`), in place of
    /// `limits`.
    pub owner_limits: std::collections::HashMap<String, Limits>,
}

/// `policy.history_retention` when unset: 90 days.
pub const DEFAULT_HISTORY_RETENTION: Duration = Duration::from_secs(90 * 86_400);

/// `policy.on_violation`: what happens to reservations granted before the policy narrowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnViolation {
    /// Logged and shown in status; renewal and re-enabling are refused; it keeps forwarding.
    #[default]
    Report,
    /// As `Report`, and disabled (audited): it stops forwarding but keeps its ports.
    Disable,
}

impl std::str::FromStr for OnViolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "report" => Ok(Self::Report),
            "disable" => Ok(Self::Disable),
            other => Err(format!(
                "policy.on_violation: '{other}' is not report or disable"
            )),
        }
    }
}

fn in_ranges(ranges: &[PortRange], port: u16) -> bool {
    ranges.iter().any(|r| r.first <= port && port <= r.last)
}

/// The rule that keeps every reservation off the server itself. Always on: a reservation
/// that reached the gateway's own tunnel address would expose its services (DNS resolvers,
/// admin interfaces) to the internet.
pub const TARGET_NOT_SERVER: &str = "policy.target_not_server";

impl Policy {
    /// The limits reservation of `owner` gets when it asks for `asked`: each rate it asks
    /// for, if no higher than its owner's (or the policy's); each it does not, its owner's.
    /// A source list of its own is taken unless the owner's limits have one.
    pub fn limits_for(&self, owner: &str, asked: &Limits) -> Result<Limits, Refusal> {
        let (rule, defaults) = match self.owner_limits.get(owner) {
            Some(l) => ("policy.owner_limits", l),
            None => ("policy.limits", &self.limits),
        };
        if let Some((name, want, max)) = asked.above(defaults).first() {
            return Err(refuse(
                rule,
                format!("{name} {want} is above the {max} allowed for owner {owner}"),
            ));
        }
        if asked.sources.is_some()
            && let Some(list) = &defaults.sources
            && asked.sources.as_ref() != Some(list)
        {
            return Err(refuse(
                rule,
                format!(
                    "owner {owner}'s reservations have the policy's {}-list; a list of their own is not taken",
                    if list.is_allow() { "allow" } else { "deny" }
                ),
            ));
        }
        Ok(asked.or(defaults))
    }

    /// Refuses a new reservation while the policy takes none (`accept_new = false`).
    pub fn check_new(&self) -> Result<(), Refusal> {
        if self.accept_new {
            return Ok(());
        }
        Err(refuse(
            "policy.accept_new",
            "this server takes no new reservations (port forwarding is winding down)",
        ))
    }

    /// Refuses a renewal while the policy takes none (`accept_renewals = false`).
    pub fn check_renewal(&self) -> Result<(), Refusal> {
        if self.accept_renewals {
            return Ok(());
        }
        Err(refuse(
            "policy.accept_renewals",
            "this server renews no reservation (port forwarding is winding down: it runs out at its expiry)",
        ))
    }

    /// Refuses a target that is the server itself: one of its addresses (read from the
    /// kernel by the caller, at each reservation), or a network or broadcast address of one
    /// of its subnets or of a target network (delivered to the server's own sockets).
    pub fn check_target(&self, r: &Reservation, local: &LocalAddresses) -> Result<(), Refusal> {
        let target = r.target_addr;
        if let Some(iface) = local.owner_of(target) {
            return Err(refuse(
                TARGET_NOT_SERVER,
                format!("{target} is an address of this server ({iface})"),
            ));
        }
        for (net, whose) in self
            .target_networks
            .iter()
            .map(|n| (*n, "target network".to_string()))
            .chain(
                local
                    .subnets()
                    .map(|(net, iface)| (net, format!("subnet of {iface}"))),
            )
        {
            if let Some((network, broadcast)) = net.reserved_addresses() {
                if target == network {
                    return Err(refuse(
                        TARGET_NOT_SERVER,
                        format!("{target} is the network address of {net} ({whose})"),
                    ));
                }
                if target == broadcast {
                    return Err(refuse(
                        TARGET_NOT_SERVER,
                        format!(
                            "{target} is the broadcast address of {net} ({whose}), which the server itself receives"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks everything about `r` that does not depend on other reservations: the public IP,
    /// the target network and that the target is not the server, the range's size and each
    /// port against the pool, the forbidden ports and the server's own listening sockets.
    pub fn check(
        &self,
        r: &Reservation,
        listening: &Listening,
        local: &LocalAddresses,
    ) -> Result<(), Refusal> {
        let public = r.public;
        if public.is_fleet() {
            if !self.in_fleet {
                return Err(refuse(
                    "policy.public_ips",
                    "a fleet-wide reservation needs a fleet: a store shared by every server (service.store on PostgreSQL)".to_string(),
                ));
            }
        } else if !self.public_ips.contains(&public.addr) && !self.fleet_ips.contains(&public.addr)
        {
            let fleet = if self.fleet_ips.is_empty() {
                String::new()
            } else {
                format!(
                    ", nor of the fleet's other servers ({})",
                    join(&self.fleet_ips)
                )
            };
            return Err(refuse(
                "policy.public_ips",
                format!(
                    "{} is not one of this server's forwarded public IPs ({}){fleet}",
                    public.addr,
                    join(&self.public_ips)
                ),
            ));
        }
        if !self
            .target_networks
            .iter()
            .any(|n| n.contains(r.target_addr))
        {
            return Err(refuse(
                "policy.target_networks",
                format!(
                    "target {} is outside the tunnel networks ({})",
                    r.target_addr,
                    join(&self.target_networks)
                ),
            ));
        }
        self.check_target(r, local)?;
        if public.ports.len() > self.max_range_ports {
            return Err(refuse(
                "policy.max_range_ports",
                format!(
                    "{} covers {} ports; the largest range allowed is {}",
                    public.ports,
                    public.ports.len(),
                    self.max_range_ports
                ),
            ));
        }
        for port in public.ports.ports() {
            self.check_port(public.addr, port, public.protocols, listening)?;
        }
        Ok(())
    }

    fn check_port(
        &self,
        addr: Ipv4Addr,
        port: u16,
        protocols: Protocols,
        listening: &Listening,
    ) -> Result<(), Refusal> {
        if in_ranges(&self.forbidden_ports, port) {
            return Err(refuse(
                "policy.forbidden_ports",
                format!("port {port} is never forwarded"),
            ));
        }
        if !in_ranges(&self.port_pool, port) {
            return Err(refuse(
                "policy.port_pool",
                format!(
                    "port {port} is outside the port pool ({})",
                    join(&self.port_pool)
                ),
            ));
        }
        if self.forbid_listening_ports
            && let Some(proto) = listening.find(addr, port, protocols)
        {
            return Err(refuse(
                "policy.forbid_listening_ports",
                format!("the server itself listens on {addr}:{port}/{proto}"),
            ));
        }
        Ok(())
    }

    /// Whether `port` could be handed out automatically on `addr` (pool, forbidden, listening).
    pub fn allows_port(
        &self,
        addr: Ipv4Addr,
        port: u16,
        protocols: Protocols,
        listening: &Listening,
    ) -> bool {
        self.check_port(addr, port, protocols, listening).is_ok()
    }

    /// The expiry a reservation asks for, checked against `max_ttl` and filled from
    /// `default_ttl`.
    pub fn lifetime(&self, ttl: Option<Duration>) -> Result<Option<Duration>, Refusal> {
        let ttl = ttl.or(self.default_ttl);
        match (ttl, self.max_ttl) {
            (None, Some(max)) => Err(refuse(
                "policy.max_ttl",
                format!(
                    "a lifetime is required (at most {})",
                    humantime::format_duration(max)
                ),
            )),
            (Some(t), Some(max)) if t > max => Err(refuse(
                "policy.max_ttl",
                format!(
                    "lifetime {} is longer than {}",
                    humantime::format_duration(t),
                    humantime::format_duration(max)
                ),
            )),
            _ => Ok(ttl),
        }
    }
}

impl Policy {
    /// Refuses a reservation whose remaining lifetime passes `max_ttl` (or that is permanent
    /// where a lifetime is required): granted under an older policy.
    pub fn check_remaining(&self, expires_ms: Option<u64>, now_ms: u64) -> Result<(), Refusal> {
        let Some(max) = self.max_ttl else {
            return Ok(());
        };
        let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        match expires_ms {
            None => Err(refuse(
                "policy.max_ttl",
                format!(
                    "it is permanent, and lifetimes are at most {}",
                    humantime::format_duration(max)
                ),
            )),
            Some(at) if at.saturating_sub(now_ms) > max_ms => Err(refuse(
                "policy.max_ttl",
                format!(
                    "it runs {} more, and lifetimes are at most {}",
                    humantime::format_duration(std::time::Duration::from_secs(
                        at.saturating_sub(now_ms) / 1000
                    )),
                    humantime::format_duration(max)
                ),
            )),
            Some(_) => Ok(()),
        }
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::config::{Config, MINIMAL};

    fn reservation(public: &str, to: &str) -> Reservation {
        Reservation::new(public.parse().unwrap(), to.parse().unwrap()).unwrap()
    }

    #[test]
    fn every_refusal_names_its_rule() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.policy.forbidden_ports = vec![PortRange::single(2222)];
        c.policy.max_range_ports = 4;
        let listening = Listening::with_socket(Protocols::Udp, Ipv4Addr::UNSPECIFIED, 51820);
        let p = &c.policy;
        for (public, to, rule) in [
            ("198.51.100.2:8080/tcp", "10.8.0.2", "policy.public_ips"),
            (
                "198.51.100.1:8080/tcp",
                "10.9.0.2",
                "policy.target_networks",
            ),
            (
                "198.51.100.1:8080-8084/tcp",
                "10.8.0.2",
                "policy.max_range_ports",
            ),
            (
                "198.51.100.1:2220-2223/tcp",
                "10.8.0.2",
                "policy.forbidden_ports",
            ),
            ("198.51.100.1:80/tcp", "10.8.0.2", "policy.port_pool"),
            (
                "198.51.100.1:51820/both",
                "10.8.0.2",
                "policy.forbid_listening_ports",
            ),
        ] {
            let err = p
                .check(
                    &reservation(public, to),
                    &listening,
                    &LocalAddresses::default(),
                )
                .unwrap_err();
            assert_eq!(err.rule, rule, "{public}: {err}");
        }
        // The same port over TCP only is not the UDP listener's.
        p.check(
            &reservation("198.51.100.1:51820/tcp", "10.8.0.2"),
            &listening,
            &LocalAddresses::default(),
        )
        .unwrap();
    }

    #[test]
    fn a_target_is_never_the_server_itself() {
        let c = Config::parse(MINIMAL).unwrap(); // target_networks 10.8.0.0/16
        let local = LocalAddresses::with(&[
            ("tun0", "10.8.0.1", 24),
            ("eth0", "198.51.100.1", 24),
            ("lo", "127.0.0.1", 8),
        ]);
        for (to, needle) in [
            ("10.8.0.1", "10.8.0.1 is an address of this server (tun0)"),
            (
                "10.8.0.255",
                "broadcast address of 10.8.0.0/24 (subnet of tun0)",
            ),
            (
                "10.8.0.0",
                "network address of 10.8.0.0/16 (target network)",
            ),
            (
                "10.8.255.255",
                "broadcast address of 10.8.0.0/16 (target network)",
            ),
        ] {
            let err = c
                .policy
                .check(
                    &reservation("198.51.100.1:8080/tcp", to),
                    &Listening::default(),
                    &local,
                )
                .unwrap_err();
            assert_eq!(err.rule, TARGET_NOT_SERVER, "{to}: {err}");
            assert!(err.detail.contains(needle), "{to}: {err}");
        }
        for to in ["10.8.0.2", "10.8.0.254", "10.8.1.0", "10.8.1.255"] {
            c.policy
                .check(
                    &reservation("198.51.100.1:8080/tcp", to),
                    &Listening::default(),
                    &local,
                )
                .unwrap_or_else(|e| panic!("{to}: {e}"));
        }
        // A /31 or /32 target network has no network or broadcast address to refuse.
        let net: Ipv4Net = "10.9.0.0/31".parse().unwrap();
        assert_eq!(net.reserved_addresses(), None);
        // The real kernel: this host's loopback address is found.
        let here = LocalAddresses::read().unwrap();
        assert_eq!(here.owner_of(Ipv4Addr::LOCALHOST), Some("lo"));
    }

    #[test]
    fn lifetimes() {
        let mut c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.policy.lifetime(None), Ok(None));
        c.policy.max_ttl = Some(Duration::from_secs(3600));
        assert_eq!(c.policy.lifetime(None).unwrap_err().rule, "policy.max_ttl");
        assert!(c.policy.lifetime(Some(Duration::from_secs(7200))).is_err());
        c.policy.default_ttl = Some(Duration::from_secs(60));
        assert_eq!(c.policy.lifetime(None), Ok(Some(Duration::from_secs(60))));
        assert_eq!(parse_ttl("30d").unwrap(), Duration::from_secs(30 * 86400));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("100y").is_ok());
        assert!(
            parse_ttl("10000y")
                .unwrap_err()
                .contains("longer than 100 years")
        );
    }
}
