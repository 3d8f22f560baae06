//! `pf serve`'s configuration (TOML, default `/etc/pf/pf.toml`): where the service keeps its
//! files, which interfaces it attaches to, and the policy (see [`super::policy`]) every
//! reservation must pass. Errors name the key.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use pf_common::limits::MAX_RANGE_PORTS;
use serde::Deserialize;

use super::policy::{
    DEFAULT_MAX_RANGE_PORTS, DEFAULT_PORT_POOL, DEFAULT_PORTS_PER_OWNER, Policy, parse_ttl,
};
use super::store::{PostgresLocation, StoreLocation};
use crate::{
    api::types::LimitsRequest,
    domain::{net::Ipv4Net, spec::PortRange},
    kernel::{
        attach::{AttachMode, DeviceChoice, Role, TcAttach},
        bpffs::DEFAULT_PIN_DIR,
        nftset::NftSet,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    service: RawService,
    #[serde(default)]
    interfaces: Vec<RawInterface>,
    #[serde(default)]
    fast_path: RawFastPath,
    #[serde(default)]
    netfilter: RawNetfilter,
    #[serde(default)]
    metrics: RawMetrics,
    port_mapping: Option<RawPortMapping>,
    #[serde(default)]
    triggers: RawTriggers,
    policy: RawPolicy,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTriggers {
    #[serde(default)]
    interfaces: Vec<String>,
    tc_attach: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPortMapping {
    listen: Vec<Ipv4Addr>,
    public_ip: Option<Ipv4Addr>,
    min_lifetime: Option<String>,
    max_lifetime: Option<String>,
    requests_per_second: Option<u32>,
    upnp_port: Option<u16>,
    ssdp: Option<bool>,
    #[serde(default)]
    owners: Vec<RawTunnelOwner>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnelOwner {
    network: String,
    owner: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
    per_reservation_limit: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetfilter {
    set: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFastPath {
    redirect_devices: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    database: Option<PathBuf>,
    store: Option<String>,
    store_password_file: Option<PathBuf>,
    agent: Option<String>,
    audit_log: Option<PathBuf>,
    bpffs: Option<PathBuf>,
    reconcile_removal_limit: Option<f64>,
}

/// An interface's `mode` or `tc_attach`: "auto" when unset; an error names the interface.
fn interface_key<T: std::str::FromStr<Err = String>>(
    iface: &str,
    value: &Option<String>,
) -> Result<T, String> {
    value
        .as_deref()
        .unwrap_or("auto")
        .parse()
        .map_err(|e| format!("interfaces: {iface}: {e}"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    name: String,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    tc_attach: Option<String>,
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
    #[serde(default)]
    on_violation: Option<String>,
    #[serde(default)]
    quarantine: Option<String>,
    #[serde(default)]
    history_retention: Option<String>,
    #[serde(default)]
    accept_new: Option<bool>,
    #[serde(default)]
    accept_renewals: Option<bool>,
    #[serde(default)]
    limits: Option<LimitsRequest>,
    #[serde(default)]
    owner_limits: std::collections::BTreeMap<String, LimitsRequest>,
}

/// An interface `pf serve` attaches to on start (or adopts, when already attached).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub name: String,
    pub role: Role,
    pub mode: AttachMode,
    /// How the egress program is attached: TCX where the kernel has it, else netlink.
    pub tc: TcAttach,
}

/// The service's files.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceConfig {
    pub socket: PathBuf,
    /// The group given the socket (mode 0660): its members may use the API.
    pub socket_group: Option<String>,
    /// The SQLite store's file (and, beside it, its lock); unused with a PostgreSQL store.
    pub database: PathBuf,
    /// Where the reservations are kept: `database`, or `service.store`'s PostgreSQL.
    pub store: StoreLocation,
    /// This server's name in a fleet on a shared store (`service.agent`; default: the host
    /// name).
    pub agent: String,
    pub audit_log: PathBuf,
    pub bpffs: PathBuf,
    /// The largest share of the maps' reservations (0 to 1) that a start's reconcile removes
    /// without `--force-reconcile` (beyond a handful, which is ordinary drift).
    pub reconcile_removal_limit: f64,
}

/// The environment variable that may hold a PostgreSQL store's password (instead of
/// `service.store_password_file`).
pub const STORE_PASSWORD_ENV: &str = "PF_STORE_PASSWORD";

/// `service.store`: unset, the SQLite file `database`; a `postgres://` URL, that database, its
/// password from `service.store_password_file` or the environment (never from the URL, nor a
/// command line, where others could read it).
fn store_location(
    url: Option<&str>,
    password_file: Option<&Path>,
    database: &Path,
) -> Result<StoreLocation, String> {
    let Some(url) = url else {
        if password_file.is_some() {
            return Err(
                "service.store_password_file is set, but service.store is not a PostgreSQL URL"
                    .into(),
            );
        }
        return Ok(StoreLocation::Sqlite(database.to_path_buf()));
    };
    let password = match password_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| {
                    format!(
                        "service.store_password_file: reading {}: {e}",
                        path.display()
                    )
                })?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        ),
        None => std::env::var(STORE_PASSWORD_ENV).ok(),
    };
    PostgresLocation::parse(url, password.as_deref())
        .map(|db| StoreLocation::Postgres(Box::new(db)))
        .map_err(|e| format!("service.store: {e}"))
}

/// `service.agent`, or the host's name: letters, digits, '.', '-' and '_', 1 to 64 of them.
/// The host's name is only checked where it is used, in a fleet (`fleet`): a server on a store
/// of its own may have any (a VM's is "(none)").
fn agent_name(agent: Option<String>, fleet: bool) -> Result<String, String> {
    let given = agent.is_some();
    let name = match agent {
        Some(name) => name,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
    };
    let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    let valid = !name.is_empty() && name.len() <= 64 && name.chars().all(fine);
    if !valid && !given && !fleet {
        return Ok(String::new());
    }
    if !valid {
        return Err(format!(
            "service.agent: '{name}' is not a name for this server (1 to 64 letters, digits, '.', '-' or '_')"
        ));
    }
    Ok(name)
}

/// Default `service.reconcile_removal_limit`.
pub const DEFAULT_RECONCILE_REMOVAL_LIMIT: f64 = 0.25;

#[derive(Clone, Debug)]
pub struct Config {
    pub service: ServiceConfig,
    pub interfaces: Vec<InterfaceConfig>,
    /// Which devices the fast paths may redirect to: the kernel's word, or (before Linux 6.3,
    /// which cannot say) `fast_path.redirect_devices`.
    pub fast_path_devices: DeviceChoice,
    /// `netfilter.set`: the nftables sets (NAME_tcp, NAME_udp) kept holding every reservation's
    /// target endpoints.
    pub netfilter_set: Option<NftSet>,
    /// `[metrics]`: the Prometheus listener, if any.
    pub metrics: MetricsConfig,
    /// `[port_mapping]`: NAT-PMP and PCP for tunnel clients, if configured.
    pub port_mapping: Option<PortMappingConfig>,
    /// `[triggers] interfaces`: the tunnel-side interfaces the trigger program is attached to
    /// (their TC ingress), and how.
    pub trigger_interfaces: Vec<String>,
    pub trigger_tc: TcAttach,
    pub policy: Policy,
}

/// `[metrics]`: where Prometheus scrapes `pf serve` (off unless `listen` is set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// `listen = "127.0.0.1:9477"`: the TCP address `/metrics` is served on.
    pub listen: Option<std::net::SocketAddr>,
    /// Above this many reservations, the per-reservation series are left out (the per-owner
    /// and global ones stay): each reservation is four series, and a scrape must stay small.
    pub per_reservation_limit: usize,
}

/// `[port_mapping]`: NAT-PMP and PCP served to tunnel clients (off unless the section is
/// there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMappingConfig {
    /// The server's tunnel-side addresses that answer on UDP 5351 (never a public IP).
    pub listen: Vec<Ipv4Addr>,
    /// The public IP mappings are made on, and NAT-PMP's external address.
    pub public_ip: Ipv4Addr,
    /// Lifetimes asked for are clamped to this range (and to `policy.max_ttl`).
    pub min_lifetime: Duration,
    pub max_lifetime: Duration,
    /// What one client may ask per second (a bucket of twice this many, refilled at this
    /// rate); past it the client is answered "out of resources".
    pub requests_per_second: u32,
    /// UPnP IGD's HTTP port on the listen addresses (off unless set).
    pub upnp_port: Option<u16>,
    /// With UPnP: answer SSDP searches on the listen addresses' interfaces (default true).
    pub ssdp: bool,
    /// Tunnel networks and the owner their clients' mappings count against; the most
    /// specific network wins, and an address in none is owner `tunnel:<ip>`.
    pub owners: Vec<(Ipv4Net, String)>,
}

impl PortMappingConfig {
    /// The owner of `client`'s mappings by the config.
    pub fn owner_of(&self, client: Ipv4Addr) -> String {
        self.owners
            .iter()
            .filter(|(net, _)| net.contains(client))
            .max_by_key(|(net, _)| net.prefix)
            .map_or_else(|| format!("tunnel:{client}"), |(_, owner)| owner.clone())
    }
}

/// PCP's clamp of requested lifetimes, as miniupnpd has it: 2 minutes to 24 hours.
pub const DEFAULT_MIN_MAPPING_LIFETIME: Duration = Duration::from_secs(120);
pub const DEFAULT_MAX_MAPPING_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Default `port_mapping.requests_per_second`: a client renewing two mappings every minute
/// asks a few times a minute; retries come at 250 ms and slower.
pub const DEFAULT_MAPPING_REQUESTS_PER_SECOND: u32 = 10;

fn port_mapping(raw: RawPortMapping, policy: &Policy) -> Result<PortMappingConfig, String> {
    if raw.listen.is_empty() {
        return Err(
            "port_mapping.listen is empty: name the server's tunnel-side addresses (e.g. 10.8.0.1)"
                .into(),
        );
    }
    for addr in &raw.listen {
        if policy.public_ips.contains(addr) {
            return Err(format!(
                "port_mapping.listen: {addr} is a public IP (policy.public_ips); NAT-PMP and PCP are answered on tunnel-side addresses only"
            ));
        }
        if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
            return Err(format!(
                "port_mapping.listen: {addr} is not one address of the server; name its tunnel-side addresses"
            ));
        }
    }
    let public_ip = raw.public_ip.unwrap_or(policy.public_ips[0]);
    if !policy.public_ips.contains(&public_ip) {
        return Err(format!(
            "port_mapping.public_ip: {public_ip} is not one of policy.public_ips"
        ));
    }
    let min_lifetime = duration("port_mapping.min_lifetime", &raw.min_lifetime)?
        .unwrap_or(DEFAULT_MIN_MAPPING_LIFETIME);
    let max_lifetime = duration("port_mapping.max_lifetime", &raw.max_lifetime)?
        .unwrap_or(DEFAULT_MAX_MAPPING_LIFETIME);
    if min_lifetime < Duration::from_secs(1) || min_lifetime > max_lifetime {
        return Err(
            "port_mapping.min_lifetime must be at least 1s and at most port_mapping.max_lifetime"
                .into(),
        );
    }
    let requests_per_second = raw
        .requests_per_second
        .unwrap_or(DEFAULT_MAPPING_REQUESTS_PER_SECOND);
    if requests_per_second == 0 {
        return Err("port_mapping.requests_per_second must be at least 1".into());
    }
    let owners = raw
        .owners
        .into_iter()
        .map(|o| {
            let net: Ipv4Net = o
                .network
                .parse()
                .map_err(|e| format!("port_mapping.owners: {e}"))?;
            // The API's rule for owners, so a config cannot name one the API would refuse.
            crate::service::engine::check_owner(&o.owner).map_err(|e| {
                format!(
                    "port_mapping.owners: owner '{}' of {net}: {}",
                    o.owner, e.message
                )
            })?;
            Ok((net, o.owner))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(PortMappingConfig {
        listen: raw.listen,
        public_ip,
        min_lifetime,
        max_lifetime,
        requests_per_second,
        upnp_port: match raw.upnp_port {
            Some(0) => return Err("port_mapping.upnp_port must be a port from 1 to 65535".into()),
            port => port,
        },
        ssdp: raw.ssdp.unwrap_or(true),
        owners,
    })
}

/// Default `metrics.per_reservation_limit`.
pub const DEFAULT_PER_RESERVATION_LIMIT: usize = 10_000;

impl Config {
    /// The sections of `new` that differ from `self` and that a reload cannot apply (only
    /// `[policy]` is reloaded): each takes effect at the next start.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.service != new.service {
            changed.push("[service]");
        }
        if self.interfaces != new.interfaces {
            changed.push("[[interfaces]]");
        }
        if self.fast_path_devices != new.fast_path_devices {
            changed.push("[fast_path]");
        }
        if self.netfilter_set != new.netfilter_set {
            changed.push("[netfilter]");
        }
        if self.metrics != new.metrics {
            changed.push("[metrics]");
        }
        if self.port_mapping != new.port_mapping {
            changed.push("[port_mapping]");
        }
        changed
    }

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
            fleet_ips: Vec::new(),
            in_fleet: false,
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
            on_violation: p
                .on_violation
                .as_deref()
                .map(str::parse)
                .transpose()?
                .unwrap_or_default(),
            quarantine: duration("policy.quarantine", &p.quarantine)?,
            history_retention: duration("policy.history_retention", &p.history_retention)?
                .unwrap_or(crate::service::policy::DEFAULT_HISTORY_RETENTION),
            accept_new: p.accept_new.unwrap_or(true),
            accept_renewals: p.accept_renewals.unwrap_or(true),
            limits: p
                .limits
                .as_ref()
                .map(|l| l.parse_at("policy.limits"))
                .transpose()?
                .unwrap_or_default(),
            owner_limits: p
                .owner_limits
                .iter()
                .map(|(owner, l)| {
                    let at = format!("policy.owner_limits.{owner}");
                    crate::service::engine::check_owner(owner)
                        .map_err(|e| format!("{at}: {}", e.message))?;
                    Ok((owner.clone(), l.parse_at(&at)?))
                })
                .collect::<Result<_, String>>()?,
        };
        // With the leak guard on, egress drops what leaves from a target network: one that
        // holds a public IP (or everything, /0) would cut the server off.
        if policy.drop_tunnel_source_leaks
            && let Some((net, why)) = policy.target_networks.iter().find_map(|n| {
                if n.prefix == 0 {
                    Some((n, "every address".to_string()))
                } else {
                    policy
                        .public_ips
                        .iter()
                        .find(|ip| n.contains(**ip))
                        .map(|ip| (n, format!("the public IP {ip}")))
                }
            })
        {
            return Err(format!(
                "policy.target_networks: {net} holds {why}, and egress would drop the server's own traffic from it (policy.drop_tunnel_source_leaks); name the tunnel networks only"
            ));
        }
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
        // The quarantine reads the past holders: they must be kept at least as long.
        if policy
            .quarantine
            .is_some_and(|q| q > policy.history_retention)
        {
            return Err("policy.quarantine is longer than policy.history_retention".into());
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
                let mode = interface_key(&i.name, &i.mode)?;
                let tc = interface_key(&i.name, &i.tc_attach)?;
                Ok(InterfaceConfig {
                    name: i.name,
                    role,
                    mode,
                    tc,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let s = raw.service;
        let database: PathBuf = s.database.unwrap_or_else(|| DEFAULT_DATABASE.into());
        let store = store_location(
            s.store.as_deref(),
            s.store_password_file.as_deref(),
            &database,
        )?;
        let agent = agent_name(s.agent, matches!(store, StoreLocation::Postgres(_)))?;
        let reconcile_removal_limit = s
            .reconcile_removal_limit
            .unwrap_or(DEFAULT_RECONCILE_REMOVAL_LIMIT);
        if !(0.0..=1.0).contains(&reconcile_removal_limit) {
            return Err(
                "service.reconcile_removal_limit must be a share from 0.0 to 1.0 (0.25 is a quarter)"
                    .into(),
            );
        }
        let port_mapping = raw
            .port_mapping
            .map(|m| port_mapping(m, &policy))
            .transpose()?;
        Ok(Config {
            port_mapping,
            trigger_tc: interface_key("triggers", &raw.triggers.tc_attach)?,
            trigger_interfaces: raw.triggers.interfaces,
            service: ServiceConfig {
                socket: s.socket.unwrap_or_else(|| DEFAULT_SOCKET.into()),
                socket_group: s.socket_group,
                database,
                store,
                agent,
                audit_log: s.audit_log.unwrap_or_else(|| DEFAULT_AUDIT_LOG.into()),
                bpffs: s.bpffs.unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
                reconcile_removal_limit,
            },
            interfaces,
            netfilter_set: raw
                .netfilter
                .set
                .map(|s| s.parse().map_err(|e| format!("netfilter.set: {e}")))
                .transpose()?,
            fast_path_devices: match raw.fast_path.redirect_devices {
                Some(names) => DeviceChoice::Named(names),
                None => DeviceChoice::Kernel,
            },
            metrics: MetricsConfig {
                listen: raw
                    .metrics
                    .listen
                    .map(|a| {
                        a.parse().map_err(|_| {
                            format!(
                                "metrics.listen: '{a}' is not an address and port such as 127.0.0.1:9477"
                            )
                        })
                    })
                    .transpose()?,
                per_reservation_limit: raw
                    .metrics
                    .per_reservation_limit
                    .unwrap_or(DEFAULT_PER_RESERVATION_LIMIT),
            },
            policy,
        })
    }
}

/// The smallest config there is: the two required keys (host tests).
#[cfg(test)]
pub const MINIMAL: &str = r#"
[policy]
public_ips = ["198.51.100.1"]
target_networks = ["10.8.0.0/16"]
"#;

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The README's "Using pf" examples are what a new admin types first: the example config
    /// must admit every one of them.
    #[test]
    fn the_example_config_admits_the_readmes_examples() {
        use crate::{
            domain::spec::{PublicSpec, Reservation, TargetSpec, parse_public_request},
            kernel::host::{Listening, LocalAddresses},
        };
        let c = Config::parse(include_str!("../../../dist/pf.toml")).unwrap();
        let readme = include_str!("../../../README.md");
        let mut checked = 0;
        let mut held = std::collections::HashMap::<String, u64>::new();
        for line in readme.lines().filter(|l| l.starts_with("pf reserve ")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let (addr, ports, protocols) = parse_public_request(words[2]).unwrap();
            let to: TargetSpec = words[words.iter().position(|w| *w == "--to").unwrap() + 1]
                .parse()
                .unwrap();
            let ports = ports.unwrap_or(PortRange::single(20000));
            let r = Reservation::new(
                PublicSpec {
                    addr,
                    ports,
                    protocols,
                },
                to,
            )
            .unwrap();
            c.policy
                .check(&r, &Listening::default(), &LocalAddresses::default())
                .unwrap_or_else(|e| panic!("{line}: {e}"));
            let owner = words[words.iter().position(|w| *w == "--owner").unwrap() + 1];
            let owner_ports = held.entry(owner.to_string()).or_default();
            *owner_ports += u64::from(ports.len());
            assert!(
                *owner_ports <= c.policy.ports_per_owner,
                "{line}: over the quota"
            );
            checked += 1;
        }
        assert_eq!(checked, 6, "the README's reserve examples moved");
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
                "[policy]\npublic_ips = [\"198.51.100.1\"]\ntarget_networks = [\"10.8.0.0/16\"]\nquarantine = \"100d\"",
                "policy.quarantine is longer than policy.history_retention",
            ),
            (
                "[policy]\npublic_ips = [\"198.51.100.1\"]\ntarget_networks = [\"10.8.0.0/16\"]\nhistory_retention = \"never\"",
                "policy.history_retention: 'never'",
            ),
            (
                "[policy]\npublic_ips = [\"198.51.100.1\"]\ntarget_networks = [\"10.8.0.0/16\"]\n[[interfaces]]\nname = \"eth0\"\nrole = \"inside\"",
                "role 'inside' of eth0",
            ),
            ("[service]\nsocket = 3\n", "line 2"),
            (
                "[netfilter]\nset = \"pf forwarded\"\n[policy]\npublic_ips = [\"198.51.100.1\"]\ntarget_networks = [\"10.8.0.0/16\"]",
                "netfilter.set: 'pf forwarded' is not an nftables set",
            ),
            (
                "[policy]\npublic_ips = [\"198.51.100.1\"]\ntarget_networks = [\"10.8.0.0/16\"]\n[[interfaces]]\nname = \"eth0\"\ntc_attach = \"maybe\"",
                "eth0: unknown TC attach method 'maybe'",
            ),
            (
                "[policy]\npublic_ips = [\"10.8.0.1\"]\ntarget_networks = [\"10.8.0.0/16\"]",
                "10.8.0.0/16 holds the public IP 10.8.0.1",
            ),
            (
                "[policy]\npublic_ips = [\"198.51.100.1\"]\ntarget_networks = [\"0.0.0.0/0\"]",
                "0.0.0.0/0 holds every address",
            ),
        ] {
            let err = Config::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    /// The example config with its commented-out section `header` (`# [name]`) uncommented.
    fn dist_with_section(header: &str) -> String {
        let dist = include_str!("../../../dist/pf.toml");
        let mut in_section = false;
        dist.lines()
            .map(|l| {
                if l == header {
                    in_section = true;
                } else if !l.starts_with('#') {
                    in_section = false;
                }
                match l.strip_prefix("# ") {
                    Some(rest) if in_section && !rest.starts_with('#') => rest,
                    _ => l,
                }
            })
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// The example config's limits, uncommented, parse; a bad one is refused naming its key.
    #[test]
    fn the_limits_section_parses_and_its_errors_name_the_key() {
        use crate::domain::limits::SourceList;
        let c = Config::parse(&dist_with_section("# [policy.limits]")).unwrap();
        let l = &c.policy.limits;
        assert_eq!(
            (l.packets_per_second, l.bits_per_second, l.syns_per_second),
            (Some(20_000), Some(200_000_000), Some(200))
        );
        assert_eq!(
            l.sources,
            Some(SourceList::Deny(vec!["192.0.2.0/24".parse().unwrap()]))
        );
        let premium = &c.policy.owner_limits["acct-premium"];
        assert_eq!(premium.bits_per_second, Some(1_000_000_000));
        assert_eq!(premium.packets_per_second, None);
        let policy =
            "[policy]\npublic_ips = [\"203.0.113.10\"]\ntarget_networks = [\"10.8.0.0/16\"]\n";
        for (table, needle) in [
            (
                "[policy.limits]\nbits_per_second = 100",
                "policy.limits.bits_per_second 100 is below the lowest",
            ),
            (
                "[policy.limits]\npackets_per_second = \"lots\"",
                "policy.limits.packets_per_second: 'lots' is not a rate",
            ),
            (
                "[policy.limits]\nallow = [\"10.0.0.0/8\"]\ndeny = [\"10.1.0.0/16\"]",
                "policy.limits: both allow and deny",
            ),
            (
                "[policy.owner_limits.acct-1]\ndeny = [\"10.0.0.1/8\"]",
                "policy.owner_limits.acct-1.deny",
            ),
            ("[policy.limits]\npps = 5", "pps"),
        ] {
            let e = Config::parse(&format!("{policy}{table}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{table}: {e}");
        }
    }

    /// The example config's [triggers] section, uncommented, parses; a bad hook is refused
    /// naming the section.
    #[test]
    fn the_triggers_section_parses() {
        let c = Config::parse(&dist_with_section("# [triggers]")).unwrap();
        assert_eq!(c.trigger_interfaces, vec!["wg0".to_string()]);
        assert_eq!(c.trigger_tc, TcAttach::Auto);
        let policy =
            "[policy]\npublic_ips = [\"203.0.113.10\"]\ntarget_networks = [\"10.8.0.0/16\"]\n";
        let bad = format!("[triggers]\ninterfaces = [\"wg0\"]\ntc_attach = \"xdp\"\n{policy}");
        let e = Config::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("triggers") && e.contains("xdp"), "{e}");
        let unknown = format!("[triggers]\ninterface = [\"wg0\"]\n{policy}");
        assert!(Config::parse(&unknown).is_err());
    }

    /// The example config's [port_mapping] section, uncommented, parses; the rules that keep
    /// the server safe are refused naming their key.
    #[test]
    fn the_port_mapping_section_parses_and_its_errors_name_the_key() {
        let text = dist_with_section("# [port_mapping]");
        let c = Config::parse(&text).unwrap();
        let m = c.port_mapping.expect("the section is there");
        assert_eq!(m.listen, vec![Ipv4Addr::new(10, 8, 0, 1)]);
        assert_eq!(
            (m.upnp_port, m.ssdp, m.requests_per_second),
            (Some(5000), true, 10)
        );
        assert_eq!(m.owner_of(Ipv4Addr::new(10, 8, 0, 9)), "team-a");
        assert_eq!(m.owner_of(Ipv4Addr::new(10, 8, 1, 9)), "tunnel:10.8.1.9");
        let policy =
            "[policy]\npublic_ips = [\"203.0.113.10\"]\ntarget_networks = [\"10.8.0.0/16\"]\n";
        for (section, needle) in [
            (
                "listen = [\"203.0.113.10\"]",
                "port_mapping.listen: 203.0.113.10 is a public IP",
            ),
            ("listen = []", "port_mapping.listen is empty"),
            (
                "listen = [\"10.8.0.1\"]\npublic_ip = \"198.51.100.1\"",
                "port_mapping.public_ip",
            ),
            (
                "listen = [\"10.8.0.1\"]\nmin_lifetime = \"2h\"\nmax_lifetime = \"1h\"",
                "port_mapping.min_lifetime",
            ),
            (
                "listen = [\"10.8.0.1\"]\nrequests_per_second = 0",
                "port_mapping.requests_per_second",
            ),
            (
                "listen = [\"10.8.0.1\"]\nowners = [{ network = \"10.8.0.0/24\", owner = \"a b\" }]",
                "port_mapping.owners",
            ),
            (
                "listen = [\"10.8.0.1\"]\nupnp_port = 0",
                "port_mapping.upnp_port",
            ),
        ] {
            let text = format!("[port_mapping]\n{section}\n{policy}");
            let err = Config::parse(&text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    /// `service.store`: a PostgreSQL URL takes the store there, its password from a file
    /// (never from the URL); the errors name the key.
    #[test]
    fn a_postgresql_store_takes_its_password_from_a_file_never_the_url() {
        let dir = std::env::temp_dir().join(format!("pf-config-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("password");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let with = |service: &str| format!("[service]\n{service}\n{MINIMAL}");
        let c = Config::parse(&with(&format!(
            "store = \"postgres://pf@db.example:5432/pf\"\nstore_password_file = \"{}\"",
            secret.display()
        )))
        .unwrap();
        match &c.service.store {
            StoreLocation::Postgres(db) => {
                assert_eq!(db.url(), "postgres://pf@db.example:5432/pf");
                assert!(!format!("{:?}", c.service).contains("s3cret"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Config::parse(MINIMAL).unwrap().service.store,
            StoreLocation::Sqlite(DEFAULT_DATABASE.into())
        );
        for (service, needle) in [
            (
                "store = \"postgres://pf:s3cret@db/pf\"".to_string(),
                "service.store: reservation store postgres://pf:***@db/pf: the URL holds a password",
            ),
            (
                "store = \"sqlite:///var/lib/pf/pf.db\"".into(),
                "service.store: reservation store sqlite:///var/lib/pf/pf.db: a PostgreSQL store is a postgres:// URL",
            ),
            (
                format!("store_password_file = \"{}\"", secret.display()),
                "service.store_password_file is set, but service.store is not",
            ),
            (
                "store = \"postgres://pf@db/pf\"\nstore_password_file = \"/nonexistent/pw\"".into(),
                "service.store_password_file: reading /nonexistent/pw",
            ),
            (
                "agent = \"vpn ams 1\"".into(),
                "service.agent: 'vpn ams 1' is not a name for this server",
            ),
        ] {
            let err = Config::parse(&with(&service)).unwrap_err();
            assert!(err.contains(needle), "{service}: {err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
