//! `pf serve`'s configuration (TOML, default `/etc/pf/pf.toml`): where the service keeps its
//! files, which interfaces it attaches to, and the policy every reservation must pass. Each
//! refusal names the rule (`policy.<key>`) that refused it.

use std::{
    collections::HashSet,
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use pf_common::limits::MAX_RANGE_PORTS;
use serde::Deserialize;

use crate::{
    domain::spec::{PortRange, Protocols, Reservation},
    kernel::{
        attach::{AttachMode, Role},
        bpffs::DEFAULT_PIN_DIR,
    },
};

pub const DEFAULT_CONFIG: &str = "/etc/pf/pf.toml";
pub const DEFAULT_SOCKET: &str = "/run/pf/pf.sock";
pub const DEFAULT_DATABASE: &str = "/var/lib/pf/pf.db";
pub const DEFAULT_AUDIT_LOG: &str = "/var/log/pf/audit.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

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

/// An IPv4 network, `10.8.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    /// The network address and the broadcast address, for networks that have them (a /31
    /// or /32 has neither: every address is a host's).
    pub fn reserved_addresses(self) -> Option<(Ipv4Addr, Ipv4Addr)> {
        (self.prefix < 31).then(|| {
            let net = u32::from(self.addr) & self.mask();
            (Ipv4Addr::from(net), Ipv4Addr::from(net | !self.mask()))
        })
    }

    fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    pub fn contains(self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl FromStr for Ipv4Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not an IPv4 network such as 10.8.0.0/16");
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let net = Self { addr, prefix };
        if u32::from(addr) & !net.mask() != 0 {
            return Err(format!(
                "'{s}' has host bits set (did you mean {}/{prefix}?)",
                Ipv4Addr::from(u32::from(addr) & net.mask())
            ));
        }
        Ok(net)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A port or a range in the config: `22` or `"20000-59999"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum PortItem {
    Port(u32),
    Range(String),
}

fn port_ranges(key: &str, items: &[PortItem]) -> Result<Vec<PortRange>, String> {
    items
        .iter()
        .map(|item| {
            let bad =
                |what: &str| format!("{key}: {what} is not a port or a range such as 20000-59999");
            match item {
                PortItem::Port(p) => u16::try_from(*p)
                    .ok()
                    .filter(|p| *p != 0)
                    .map(PortRange::single)
                    .ok_or_else(|| bad(&p.to_string())),
                PortItem::Range(s) => {
                    let (first, last) = s.split_once('-').unwrap_or((s, s));
                    let first: u16 = first.trim().parse().map_err(|_| bad(s))?;
                    let last: u16 = last.trim().parse().map_err(|_| bad(s))?;
                    if first == 0 || last < first {
                        return Err(bad(s));
                    }
                    Ok(PortRange { first, last })
                }
            }
        })
        .collect()
}

fn duration(key: &str, s: &Option<String>) -> Result<Option<Duration>, String> {
    s.as_deref()
        .map(|s| parse_ttl(s).map_err(|e| format!("{key}: {e}")))
        .transpose()
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    service: RawService,
    #[serde(default)]
    interfaces: Vec<RawInterface>,
    policy: RawPolicy,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    database: Option<PathBuf>,
    audit_log: Option<PathBuf>,
    bpffs: Option<PathBuf>,
    reconcile_removal_limit: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    name: String,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    public_ips: Vec<Ipv4Addr>,
    target_networks: Vec<String>,
    #[serde(default)]
    port_pool: Option<Vec<PortItem>>,
    #[serde(default)]
    forbidden_ports: Vec<PortItem>,
    #[serde(default)]
    forbid_listening_ports: Option<bool>,
    #[serde(default)]
    ports_per_owner: Option<u64>,
    #[serde(default)]
    max_range_ports: Option<u32>,
    #[serde(default)]
    default_ttl: Option<String>,
    #[serde(default)]
    max_ttl: Option<String>,
    #[serde(default)]
    drop_tunnel_source_leaks: Option<bool>,
}

/// An interface `pf serve` attaches to on start (or adopts, when already attached).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub name: String,
    pub role: Role,
    pub mode: AttachMode,
}

/// The service's files.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub socket: PathBuf,
    /// The group given the socket (mode 0660): its members may use the API.
    pub socket_group: Option<String>,
    pub database: PathBuf,
    pub audit_log: PathBuf,
    pub bpffs: PathBuf,
    /// The largest share of the maps' reservations (0 to 1) that a start's reconcile removes
    /// without `--force-reconcile` (beyond a handful, which is ordinary drift).
    pub reconcile_removal_limit: f64,
}

/// Default `service.reconcile_removal_limit`.
pub const DEFAULT_RECONCILE_REMOVAL_LIMIT: f64 = 0.25;

#[derive(Clone, Debug)]
pub struct Config {
    pub service: ServiceConfig,
    pub interfaces: Vec<InterfaceConfig>,
    pub policy: Policy,
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
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // toml's message spans lines (a snippet of the file); one line is enough here.
            e.message().to_string()
                + &e.span()
                    .map(|s| {
                        let line = text[..s.start].lines().count().max(1);
                        format!(" (line {line})")
                    })
                    .unwrap_or_default()
        })?;
        let p = raw.policy;
        if p.public_ips.is_empty() {
            return Err("policy.public_ips is empty: name the public IPs pf may forward".into());
        }
        if p.target_networks.is_empty() {
            return Err(
                "policy.target_networks is empty: name the tunnel networks targets must be in (e.g. 10.8.0.0/16)"
                    .into(),
            );
        }
        let target_networks = p
            .target_networks
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|e| format!("policy.target_networks: {e}"))
            })
            .collect::<Result<Vec<Ipv4Net>, _>>()?;
        let port_pool = match &p.port_pool {
            Some(items) => port_ranges("policy.port_pool", items)?,
            None => vec![DEFAULT_PORT_POOL],
        };
        let max_range_ports = p.max_range_ports.unwrap_or(DEFAULT_MAX_RANGE_PORTS);
        if max_range_ports == 0 || max_range_ports > MAX_RANGE_PORTS {
            return Err(format!(
                "policy.max_range_ports must be from 1 to {MAX_RANGE_PORTS}"
            ));
        }
        let policy = Policy {
            public_ips: p.public_ips,
            target_networks,
            port_pool,
            forbidden_ports: port_ranges("policy.forbidden_ports", &p.forbidden_ports)?,
            forbid_listening_ports: p.forbid_listening_ports.unwrap_or(true),
            ports_per_owner: p.ports_per_owner.unwrap_or(DEFAULT_PORTS_PER_OWNER),
            max_range_ports,
            default_ttl: duration("policy.default_ttl", &p.default_ttl)?,
            max_ttl: duration("policy.max_ttl", &p.max_ttl)?,
            drop_tunnel_source_leaks: p.drop_tunnel_source_leaks.unwrap_or(true),
        };
        if policy.drop_tunnel_source_leaks
            && policy.target_networks.len() > pf_common::limits::MAX_TUNNEL_NETWORKS
        {
            return Err(format!(
                "policy.target_networks has {} networks; the data plane's leak guard holds {} (merge them, or set policy.drop_tunnel_source_leaks = false)",
                policy.target_networks.len(),
                pf_common::limits::MAX_TUNNEL_NETWORKS
            ));
        }
        if let (Some(d), Some(m)) = (policy.default_ttl, policy.max_ttl)
            && d > m
        {
            return Err("policy.default_ttl is longer than policy.max_ttl".into());
        }
        let interfaces = raw
            .interfaces
            .into_iter()
            .map(|i| {
                let role = match i.role.as_deref().unwrap_or("public") {
                    "public" => Role::Public,
                    "fast-path" => Role::PublicFastPath,
                    "tunnel-side" => Role::TunnelSide,
                    other => {
                        return Err(format!(
                            "interfaces: role '{other}' of {} is not public, fast-path or tunnel-side",
                            i.name
                        ));
                    }
                };
                let mode = i
                    .mode
                    .as_deref()
                    .unwrap_or("auto")
                    .parse()
                    .map_err(|e| format!("interfaces: {}: {e}", i.name))?;
                Ok(InterfaceConfig {
                    name: i.name,
                    role,
                    mode,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let s = raw.service;
        let reconcile_removal_limit = s
            .reconcile_removal_limit
            .unwrap_or(DEFAULT_RECONCILE_REMOVAL_LIMIT);
        if !(0.0..=1.0).contains(&reconcile_removal_limit) {
            return Err(
                "service.reconcile_removal_limit must be a share from 0.0 to 1.0 (0.25 is a quarter)"
                    .into(),
            );
        }
        Ok(Config {
            service: ServiceConfig {
                socket: s.socket.unwrap_or_else(|| DEFAULT_SOCKET.into()),
                socket_group: s.socket_group,
                database: s.database.unwrap_or_else(|| DEFAULT_DATABASE.into()),
                audit_log: s.audit_log.unwrap_or_else(|| DEFAULT_AUDIT_LOG.into()),
                bpffs: s.bpffs.unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
                reconcile_removal_limit,
            },
            interfaces,
            policy,
        })
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
        if !self.public_ips.contains(&public.addr) {
            return Err(refuse(
                "policy.public_ips",
                format!(
                    "{} is not one of this server's forwarded public IPs ({})",
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

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The server's own IPv4 addresses in this network namespace, each with its interface and
/// prefix, read from the kernel (getifaddrs).
#[derive(Debug, Default)]
pub struct LocalAddresses {
    /// (interface, address, prefix length).
    addresses: Vec<(String, Ipv4Addr, u8)>,
}

impl LocalAddresses {
    pub fn read() -> std::io::Result<Self> {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills `head` with a list freed below.
        if unsafe { libc::getifaddrs(&mut head) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut addresses = Vec::new();
        let mut cursor = head;
        while !cursor.is_null() {
            // SAFETY: a node of the list getifaddrs returned, not freed yet.
            let node = unsafe { &*cursor };
            cursor = node.ifa_next;
            if node.ifa_addr.is_null()
                // SAFETY: non-null sockaddr.
                || i32::from(unsafe { (*node.ifa_addr).sa_family }) != libc::AF_INET
            {
                continue;
            }
            // SAFETY: an AF_INET sockaddr is a sockaddr_in; the netmask of an AF_INET entry is
            // one too (or null).
            let (addr, mask) = unsafe {
                let addr = (*node.ifa_addr.cast::<libc::sockaddr_in>()).sin_addr.s_addr;
                let mask = if node.ifa_netmask.is_null() {
                    u32::MAX.to_be()
                } else {
                    (*node.ifa_netmask.cast::<libc::sockaddr_in>())
                        .sin_addr
                        .s_addr
                };
                (addr, mask)
            };
            // SAFETY: ifa_name is a NUL-terminated string.
            let name = unsafe { std::ffi::CStr::from_ptr(node.ifa_name) }
                .to_string_lossy()
                .into_owned();
            addresses.push((
                name,
                Ipv4Addr::from(u32::from_be(addr)),
                u32::from_be(mask).count_ones() as u8,
            ));
        }
        // SAFETY: the list from getifaddrs, freed once.
        unsafe { libc::freeifaddrs(head) };
        Ok(Self { addresses })
    }

    /// The interface that holds `addr`, if the server does.
    pub fn owner_of(&self, addr: Ipv4Addr) -> Option<&str> {
        self.addresses
            .iter()
            .find(|(_, a, _)| *a == addr)
            .map(|(iface, _, _)| iface.as_str())
    }

    /// The server's own subnets, each with its interface.
    pub fn subnets(&self) -> impl Iterator<Item = (Ipv4Net, &str)> {
        self.addresses.iter().map(|(iface, addr, prefix)| {
            let net = Ipv4Net {
                addr: *addr,
                prefix: *prefix,
            };
            (
                Ipv4Net {
                    addr: Ipv4Addr::from(u32::from(*addr) & net.mask()),
                    prefix: *prefix,
                },
                iface.as_str(),
            )
        })
    }

    #[cfg(test)]
    fn with(addresses: &[(&str, &str, u8)]) -> Self {
        Self {
            addresses: addresses
                .iter()
                .map(|(i, a, p)| (i.to_string(), a.parse().unwrap(), *p))
                .collect(),
        }
    }
}

/// The ports the server itself has open in this network namespace, from /proc/net: TCP sockets
/// in LISTEN and unconnected UDP sockets, on the wildcard address or a specific one.
#[derive(Debug, Default)]
pub struct Listening {
    /// (protocol, address, port); the wildcard is 0.0.0.0.
    sockets: HashSet<(Protocols, Ipv4Addr, u16)>,
}

const TCP_LISTEN: &str = "0A";

impl Listening {
    pub fn read() -> Self {
        let mut sockets = HashSet::new();
        for (file, proto, v6) in [
            ("/proc/net/tcp", Protocols::Tcp, false),
            ("/proc/net/udp", Protocols::Udp, false),
            ("/proc/net/tcp6", Protocols::Tcp, true),
            ("/proc/net/udp6", Protocols::Udp, true),
        ] {
            let Ok(text) = std::fs::read_to_string(file) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let [_, local, remote, state, ..] = fields[..] else {
                    continue;
                };
                let listening = match proto {
                    Protocols::Tcp => state == TCP_LISTEN,
                    _ => remote.ends_with(":0000"),
                };
                if let (true, Some((addr, port))) = (listening, parse_proc_addr(local, v6)) {
                    sockets.insert((proto, addr, port));
                }
            }
        }
        Self { sockets }
    }

    /// The protocol of a socket the server has open on `addr:port` (or the wildcard).
    pub fn find(&self, addr: Ipv4Addr, port: u16, protocols: Protocols) -> Option<Protocols> {
        [Protocols::Tcp, Protocols::Udp]
            .into_iter()
            .filter(|p| protocols.overlaps(*p))
            .find(|p| {
                self.sockets.contains(&(*p, addr, port))
                    || self.sockets.contains(&(*p, Ipv4Addr::UNSPECIFIED, port))
            })
    }
}

/// `0100007F:0016` (IPv4, the address as the kernel's native-endian word) or its 32-digit IPv6
/// form; an IPv6 socket counts when bound to `::` (it takes IPv4 too) or a v4-mapped address.
fn parse_proc_addr(s: &str, v6: bool) -> Option<(Ipv4Addr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(|w| w.to_ne_bytes());
    if !v6 {
        return Some((Ipv4Addr::from(word(addr)?), port));
    }
    if addr.len() != 32 {
        return None;
    }
    let words: Vec<[u8; 4]> = (0..4)
        .map(|i| word(&addr[i * 8..i * 8 + 8]))
        .collect::<Option<_>>()?;
    if words.iter().all(|w| *w == [0; 4]) {
        return Some((Ipv4Addr::UNSPECIFIED, port));
    }
    if words[0] == [0; 4] && words[1] == [0; 4] && words[2] == [0, 0, 0xff, 0xff] {
        return Some((Ipv4Addr::from(words[3]), port));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[policy]
public_ips = ["198.51.100.1"]
target_networks = ["10.8.0.0/16"]
"#;

    fn reservation(public: &str, to: &str) -> Reservation {
        Reservation::new(public.parse().unwrap(), to.parse().unwrap()).unwrap()
    }

    #[test]
    fn defaults_are_safe() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.service.socket, Path::new(DEFAULT_SOCKET));
        assert_eq!(c.service.database, Path::new(DEFAULT_DATABASE));
        assert_eq!(c.policy.port_pool, vec![DEFAULT_PORT_POOL]);
        assert!(c.policy.forbid_listening_ports);
        assert_eq!(c.policy.ports_per_owner, DEFAULT_PORTS_PER_OWNER);
        assert!(c.interfaces.is_empty());
    }

    #[test]
    fn the_example_config_parses() {
        let c = Config::parse(include_str!("../../../dist/pf.toml")).unwrap();
        assert_eq!(c.interfaces.len(), 1);
        assert_eq!(c.policy.forbidden_ports.len(), 2);
        assert_eq!(c.policy.default_ttl, Some(Duration::from_secs(30 * 86400)));
    }

    #[test]
    fn config_errors_name_the_key() {
        for (text, needle) in [
            (
                "[policy]\npublic_ips = []\ntarget_networks = [\"10.8.0.0/16\"]",
                "policy.public_ips is empty",
            ),
            (
                "[policy]\npublic_ips = [\"198.51.100.1\"]\ntarget_networks = []",
                "policy.target_networks is empty",
            ),
            (
                "[policy]\npublic_ips = [\"198.51.100.1\"]\ntarget_networks = [\"10.8.0.1/16\"]",
                "host bits set (did you mean 10.8.0.0/16?)",
            ),
            (
                "[policy]\npublic_ips = [\"198.51.100.1\"]\ntarget_networks = [\"10.8.0.0/16\"]\nport_pool = [\"9000-8000\"]",
                "policy.port_pool: 9000-8000",
            ),
            (
                "[policy]\npublic_ips = [\"198.51.100.1\"]\ntarget_networks = [\"10.8.0.0/16\"]\nsurprise = 1",
                "unknown field `surprise`",
            ),
            (
                "[policy]\npublic_ips = [\"198.51.100.1\"]\ntarget_networks = [\"10.8.0.0/16\"]\ndefault_ttl = \"soon\"",
                "policy.default_ttl: 'soon'",
            ),
            (
                "[policy]\npublic_ips = [\"198.51.100.1\"]\ntarget_networks = [\"10.8.0.0/16\"]\n[[interfaces]]\nname = \"eth0\"\nrole = \"inside\"",
                "role 'inside' of eth0",
            ),
            ("[service]\nsocket = 3\n", "line 2"),
        ] {
            let err = Config::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn every_refusal_names_its_rule() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.policy.forbidden_ports = vec![PortRange::single(2222)];
        c.policy.max_range_ports = 4;
        let mut listening = Listening::default();
        listening
            .sockets
            .insert((Protocols::Udp, Ipv4Addr::UNSPECIFIED, 51820));
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

    #[test]
    fn proc_net_addresses() {
        // 127.0.0.1:22 as the kernel prints it on this (little- or big-endian) machine.
        let word = u32::from_ne_bytes([127, 0, 0, 1]);
        let local = format!("{word:08X}:0016");
        assert_eq!(
            parse_proc_addr(&local, false),
            Some((Ipv4Addr::LOCALHOST, 22))
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000000000000:1F90", true),
            Some((Ipv4Addr::UNSPECIFIED, 8080))
        );
        let mapped = format!(
            "0000000000000000{:08X}{word:08X}:0050",
            u32::from_ne_bytes([0, 0, 0xff, 0xff])
        );
        assert_eq!(
            parse_proc_addr(&mapped, true),
            Some((Ipv4Addr::LOCALHOST, 80))
        );
    }
}
