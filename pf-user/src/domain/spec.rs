//! What an admin types: `PUBLIC_IP:PORT[-PORT]/tcp|udp|both` and `TARGET_IP[:PORT]`, parsed and
//! checked before anything touches the kernel.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use pf_common::{
    IPPROTO_TCP, IPPROTO_UDP, PROTO_MASK_TCP, PROTO_MASK_UDP, limits::MAX_RANGE_PORTS,
};

/// A reservation argument that cannot be right. Each message names the offending text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("'{0}' is not of the form IP:PORT[-PORT]/tcp|udp|both")]
    PublicSyntax(String),
    #[error("'{0}' is not of the form IP[:PORT]")]
    TargetSyntax(String),
    #[error("'{0}' is not an IPv4 address")]
    BadAddress(String),
    #[error("{addr} cannot be used: {why}")]
    UnusableAddress { addr: Ipv4Addr, why: &'static str },
    #[error("port '{0}' is not a number from 1 to 65535")]
    BadPort(String),
    #[error("port 0 is not a port pf can forward (ports are 1-65535)")]
    PortZero,
    #[error("unknown protocol '{0}' (expected tcp, udp or both)")]
    UnknownProtocol(String),
    #[error("range {first}-{last} is reversed (write the lower port first)")]
    ReversedRange { first: u16, last: u16 },
    #[error("range {first}-{last} covers {len} ports; the largest range is {max} ports")]
    RangeTooLarge {
        first: u16,
        last: u16,
        len: u32,
        max: u32,
    },
    #[error("{0}")]
    BadTtl(String),
    #[error("target ports {first}-{last} would run past 65535")]
    TargetOverflow { first: u16, last: u32 },
    #[error("'{0}' is not of the form PORT[-PORT]/tcp|udp|both")]
    TriggerSyntax(String),
}

/// Which protocols a reservation forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocols {
    Tcp,
    Udp,
    Both,
}

impl Protocols {
    pub const fn mask(self) -> u8 {
        match self {
            Protocols::Tcp => PROTO_MASK_TCP,
            Protocols::Udp => PROTO_MASK_UDP,
            Protocols::Both => PROTO_MASK_TCP | PROTO_MASK_UDP,
        }
    }

    pub const fn from_mask(mask: u8) -> Option<Self> {
        match mask {
            PROTO_MASK_TCP => Some(Protocols::Tcp),
            PROTO_MASK_UDP => Some(Protocols::Udp),
            m if m == PROTO_MASK_TCP | PROTO_MASK_UDP => Some(Protocols::Both),
            _ => None,
        }
    }

    /// The IP protocol numbers covered.
    pub fn ip_protocols(self) -> &'static [u8] {
        match self {
            Protocols::Tcp => &[IPPROTO_TCP],
            Protocols::Udp => &[IPPROTO_UDP],
            Protocols::Both => &[IPPROTO_TCP, IPPROTO_UDP],
        }
    }

    pub const fn overlaps(self, other: Protocols) -> bool {
        self.mask() & other.mask() != 0
    }
}

impl fmt::Display for Protocols {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocols::Tcp => "tcp",
            Protocols::Udp => "udp",
            Protocols::Both => "both",
        })
    }
}

impl FromStr for Protocols {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "tcp" => Ok(Protocols::Tcp),
            "udp" => Ok(Protocols::Udp),
            "both" => Ok(Protocols::Both),
            other => Err(SpecError::UnknownProtocol(other.to_string())),
        }
    }
}

/// An inclusive port range; a single port has `first == last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    pub fn new(first: u16, last: u16) -> Result<Self, SpecError> {
        if first == 0 || last == 0 {
            return Err(SpecError::PortZero);
        }
        if last < first {
            return Err(SpecError::ReversedRange { first, last });
        }
        let len = u32::from(last - first) + 1;
        if len > MAX_RANGE_PORTS {
            return Err(SpecError::RangeTooLarge {
                first,
                last,
                len,
                max: MAX_RANGE_PORTS,
            });
        }
        Ok(Self { first, last })
    }

    pub fn len(self) -> u32 {
        u32::from(self.last - self.first) + 1
    }

    pub fn is_empty(self) -> bool {
        false
    }

    pub fn ports(self) -> impl Iterator<Item = u16> {
        self.first..=self.last
    }

    pub fn overlaps(self, other: PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

fn parse_port(s: &str) -> Result<u16, SpecError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SpecError::BadPort(s.to_string()));
    }
    match s.parse::<u32>() {
        Ok(0) => Err(SpecError::PortZero),
        Ok(p) if p <= 65535 => Ok(p as u16),
        _ => Err(SpecError::BadPort(s.to_string())),
    }
}

fn parse_addr(s: &str) -> Result<Ipv4Addr, SpecError> {
    let addr: Ipv4Addr = s
        .parse()
        .map_err(|_| SpecError::BadAddress(s.to_string()))?;
    let why = if addr.is_unspecified() {
        "it is the unspecified address"
    } else if addr.is_broadcast() {
        "it is the broadcast address"
    } else if addr.is_multicast() {
        "it is a multicast address"
    } else if addr.is_loopback() {
        "it is a loopback address, which never crosses a NIC"
    } else {
        return Ok(addr);
    };
    Err(SpecError::UnusableAddress { addr, why })
}

/// The public address of a fleet-wide reservation (`fleet:PORT/PROTO`): the same port on
/// every server of a fleet on a shared store, each forwarding it on its own public IP. Stored
/// as the unspecified address, which no real reservation can have.
pub const FLEET: Ipv4Addr = Ipv4Addr::UNSPECIFIED;
/// How a fleet-wide reservation's address is written.
pub const FLEET_WORD: &str = "fleet";

/// A public address: an IP a NIC can carry, or `fleet` ([`FLEET`]).
fn parse_public_addr(s: &str) -> Result<Ipv4Addr, SpecError> {
    if s == FLEET_WORD {
        return Ok(FLEET);
    }
    parse_addr(s)
}

/// The public side of a reservation: `IP:PORT[-PORT]/tcp|udp|both`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicSpec {
    pub addr: Ipv4Addr,
    pub ports: PortRange,
    pub protocols: Protocols,
}

impl FromStr for PublicSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let syntax = || SpecError::PublicSyntax(s.to_string());
        let (endpoint, proto) = s.split_once('/').ok_or_else(syntax)?;
        let (addr, ports) = endpoint.rsplit_once(':').ok_or_else(syntax)?;
        let addr = parse_public_addr(addr)?;
        let ports = match ports.split_once('-') {
            Some((first, last)) => PortRange::new(parse_port(first)?, parse_port(last)?)?,
            None => {
                let port = parse_port(ports)?;
                PortRange::new(port, port)?
            }
        };
        Ok(Self {
            addr,
            ports,
            protocols: proto.parse()?,
        })
    }
}

/// The public side of a reservation request: `IP:PORT[-PORT]/PROTO`, or `IP/PROTO` for a port
/// the service picks from its pool (`None`).
pub fn parse_public_request(
    s: &str,
) -> Result<(Ipv4Addr, Option<PortRange>, Protocols), SpecError> {
    if let Some((addr, proto)) = s.split_once('/')
        && !addr.contains(':')
    {
        return Ok((parse_public_addr(addr)?, None, proto.parse()?));
    }
    let spec: PublicSpec = s.parse()?;
    Ok((spec.addr, Some(spec.ports), spec.protocols))
}

impl PublicSpec {
    /// Whether the two share an address, a port and a protocol.
    pub fn overlaps(&self, other: &PublicSpec) -> bool {
        self.addr == other.addr
            && self.protocols.overlaps(other.protocols)
            && self.ports.overlaps(other.ports)
    }
}

impl PublicSpec {
    /// Whether this is a fleet-wide reservation's (`fleet:PORT/PROTO`).
    pub fn is_fleet(&self) -> bool {
        self.addr == FLEET
    }
}

impl fmt::Display for PublicSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_fleet() {
            write!(f, "{FLEET_WORD}:{}/{}", self.ports, self.protocols)
        } else {
            write!(f, "{}:{}/{}", self.addr, self.ports, self.protocols)
        }
    }
}

/// A trigger rule's trigger ports: the destination ports and protocols of a client's outbound
/// packets that open the rule, `PORT[-PORT]/tcp|udp|both`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TriggerPorts {
    pub ports: PortRange,
    pub protocols: Protocols,
}

impl FromStr for TriggerPorts {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let (ports, proto) = s
            .split_once('/')
            .ok_or_else(|| SpecError::TriggerSyntax(s.to_string()))?;
        if ports.contains(':') {
            return Err(SpecError::TriggerSyntax(s.to_string()));
        }
        let ports = match ports.split_once('-') {
            Some((first, last)) => PortRange::new(parse_port(first)?, parse_port(last)?)?,
            None => PortRange::single(parse_port(ports)?),
        };
        Ok(Self {
            ports,
            protocols: proto.parse()?,
        })
    }
}

impl fmt::Display for TriggerPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ports, self.protocols)
    }
}

/// The tunnel side: `IP[:PORT]`. Without a port the public port is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    pub addr: Ipv4Addr,
    pub port: Option<u16>,
}

impl FromStr for TargetSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        if s.matches(':').count() > 1 {
            return Err(SpecError::BadAddress(s.to_string())); // IPv6: pf forwards IPv4 only
        }
        match s.split_once(':') {
            Some((addr, port)) => {
                if port.contains(['-', ':']) {
                    return Err(SpecError::TargetSyntax(s.to_string()));
                }
                Ok(Self {
                    addr: parse_addr(addr)?,
                    port: Some(parse_port(port)?),
                })
            }
            None => Ok(Self {
                addr: parse_addr(s)?,
                port: None,
            }),
        }
    }
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// A complete, valid reservation: public range, protocols, and where it lands. The target range
/// has the public range's length: `8810-8815 --to X:9810` maps 8810->9810 ... 8815->9815.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reservation {
    pub public: PublicSpec,
    pub target_addr: Ipv4Addr,
    pub target_first_port: u16,
}

impl Reservation {
    pub fn new(public: PublicSpec, target: TargetSpec) -> Result<Self, SpecError> {
        let target_first_port = target.port.unwrap_or(public.ports.first);
        let target_last = u32::from(target_first_port) + public.ports.len() - 1;
        if target_last > 65535 {
            return Err(SpecError::TargetOverflow {
                first: target_first_port,
                last: target_last,
            });
        }
        Ok(Self {
            public,
            target_addr: target.addr,
            target_first_port,
        })
    }

    pub fn target_ports(&self) -> PortRange {
        PortRange {
            first: self.target_first_port,
            last: self.target_first_port + (self.public.ports.last - self.public.ports.first),
        }
    }

    /// Every (public port, target port) pair.
    pub fn port_pairs(&self) -> impl Iterator<Item = (u16, u16)> + '_ {
        self.public.ports.ports().zip(self.target_ports().ports())
    }
}

impl fmt::Display for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {}:{}",
            self.public,
            self.target_addr,
            self.target_ports()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public(s: &str) -> Result<PublicSpec, SpecError> {
        s.parse()
    }

    #[test]
    fn parses_single_port_and_range() {
        let p = public("198.51.100.1:8080/tcp").unwrap();
        assert_eq!(p.addr, Ipv4Addr::new(198, 51, 100, 1));
        assert_eq!(
            p.ports,
            PortRange {
                first: 8080,
                last: 8080
            }
        );
        assert_eq!(p.protocols, Protocols::Tcp);
        let p = public("198.51.100.1:8810-8815/both").unwrap();
        assert_eq!(p.ports.len(), 6);
        assert_eq!(p.to_string(), "198.51.100.1:8810-8815/both");
    }

    #[test]
    fn rejects_bad_public_specs_naming_the_problem() {
        let cases: &[(&str, SpecError)] = &[
            ("198.51.100.1:0/tcp", SpecError::PortZero),
            ("198.51.100.1:65536/tcp", SpecError::BadPort("65536".into())),
            ("198.51.100.1:80x/tcp", SpecError::BadPort("80x".into())),
            ("198.51.100.1:-5/tcp", SpecError::BadPort("".into())),
            (
                "198.51.100.1:8815-8810/udp",
                SpecError::ReversedRange {
                    first: 8815,
                    last: 8810,
                },
            ),
            (
                "198.51.100.1:1000-9000/udp",
                SpecError::RangeTooLarge {
                    first: 1000,
                    last: 9000,
                    len: 8001,
                    max: 4096,
                },
            ),
            (
                "198.51.100.1:80/sctp",
                SpecError::UnknownProtocol("sctp".into()),
            ),
            (
                "198.51.100.1:80",
                SpecError::PublicSyntax("198.51.100.1:80".into()),
            ),
            (
                "198.51.100:80/tcp",
                SpecError::BadAddress("198.51.100".into()),
            ),
            (
                "198.51.100.300:80/tcp",
                SpecError::BadAddress("198.51.100.300".into()),
            ),
            ("[::1]:80/tcp", SpecError::BadAddress("[::1]".into())),
            (
                "0.0.0.0:80/tcp",
                SpecError::UnusableAddress {
                    addr: Ipv4Addr::UNSPECIFIED,
                    why: "it is the unspecified address",
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(public(input).as_ref(), Err(want), "{input}");
        }
        // The largest allowed range is accepted.
        assert_eq!(
            public("198.51.100.1:1000-5095/tcp").unwrap().ports.len(),
            MAX_RANGE_PORTS
        );
    }

    #[test]
    fn target_keeps_or_shifts_ports() {
        let p = public("198.51.100.1:8810-8815/tcp").unwrap();
        let keep = Reservation::new(p, "10.8.0.2".parse().unwrap()).unwrap();
        assert_eq!(
            keep.target_ports(),
            PortRange {
                first: 8810,
                last: 8815
            }
        );
        let shifted = Reservation::new(p, "10.8.0.2:9810".parse().unwrap()).unwrap();
        let pairs: Vec<_> = shifted.port_pairs().collect();
        assert_eq!(pairs.first(), Some(&(8810, 9810)));
        assert_eq!(pairs.last(), Some(&(8815, 9815)));
        assert_eq!(pairs.len(), 6);
        assert_eq!(
            shifted.to_string(),
            "198.51.100.1:8810-8815/tcp -> 10.8.0.2:9810-9815"
        );
    }

    #[test]
    fn target_errors() {
        let p = public("198.51.100.1:8810-8815/tcp").unwrap();
        let t: TargetSpec = "10.8.0.2:65533".parse().unwrap();
        assert_eq!(
            Reservation::new(p, t),
            Err(SpecError::TargetOverflow {
                first: 65533,
                last: 65538
            })
        );
        assert_eq!("10.8.0.2:0".parse::<TargetSpec>(), Err(SpecError::PortZero));
        assert_eq!(
            "10.8.0.2:80-90".parse::<TargetSpec>(),
            Err(SpecError::TargetSyntax("10.8.0.2:80-90".into()))
        );
        assert_eq!(
            "10.8.0".parse::<TargetSpec>(),
            Err(SpecError::BadAddress("10.8.0".into()))
        );
    }

    #[test]
    fn protocol_overlap() {
        assert!(Protocols::Both.overlaps(Protocols::Tcp));
        assert!(!Protocols::Udp.overlaps(Protocols::Tcp));
        for p in [Protocols::Tcp, Protocols::Udp, Protocols::Both] {
            assert_eq!(Protocols::from_mask(p.mask()), Some(p));
        }
    }
}
