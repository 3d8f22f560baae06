//! Limits on what reaches a reservation, as an admin or a customer writes them: inbound
//! packets and bits per second, new TCP connections per second, and a source allow- or
//! deny-list. The kernel enforces them per packet (`kernel::limit`); the policy says which a
//! reservation gets and how high they may go.

use std::{fmt, str::FromStr};

use super::net::Ipv4Net;

/// The most source networks one list may hold (the kernel's bound).
pub const MAX_SOURCES: usize = pf_common::limits::MAX_SOURCES_PER_LIMIT;

/// A reservation's limits; each `None` is no limit of that kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub packets_per_second: Option<u64>,
    pub bits_per_second: Option<u64>,
    /// TCP SYNs without ACK (new inbound connections) per second.
    pub syns_per_second: Option<u64>,
    pub sources: Option<SourceList>,
}

/// Sources a reservation lets in (`Allow`: only these) or keeps out (`Deny`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceList {
    Allow(Vec<Ipv4Net>),
    Deny(Vec<Ipv4Net>),
}

impl SourceList {
    pub fn networks(&self) -> &[Ipv4Net] {
        match self {
            SourceList::Allow(n) | SourceList::Deny(n) => n,
        }
    }

    pub fn is_allow(&self) -> bool {
        matches!(self, SourceList::Allow(_))
    }

    /// A list from its networks as text, checked: at least one, at most [`MAX_SOURCES`].
    pub fn parse(allow: bool, networks: &[String]) -> Result<Self, String> {
        let which = if allow { "allow" } else { "deny" };
        if networks.is_empty() {
            return Err(format!("the {which}-list is empty"));
        }
        if networks.len() > MAX_SOURCES {
            return Err(format!(
                "the {which}-list has {} networks; at most {MAX_SOURCES}",
                networks.len()
            ));
        }
        let nets = networks
            .iter()
            .map(|n| {
                // A bare address is its /32.
                let text = if n.contains('/') {
                    n.clone()
                } else {
                    format!("{n}/32")
                };
                text.parse::<Ipv4Net>()
                    .map_err(|e| format!("{which}-list: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(if allow {
            SourceList::Allow(nets)
        } else {
            SourceList::Deny(nets)
        })
    }
}

/// The lowest bit rate pf takes: 8,000 bits (1 kB) a second. Below it a 64 KiB packet's cost
/// would overflow the kernel's arithmetic, and no service runs on less.
pub const MIN_BIT_RATE: u64 = 8_000;

impl Limits {
    /// Limits as a config table or an API request writes them: each rate as text (`"5000"`,
    /// `"10M"`), at most one of the lists. Each error names `at` (the table or field) and the
    /// key.
    pub fn parse(
        at: &str,
        [packets, bits, syns]: [Option<String>; 3],
        allow: Option<&[String]>,
        deny: Option<&[String]>,
    ) -> Result<Limits, String> {
        let rate = |key: &str, text: Option<String>| -> Result<Option<u64>, String> {
            text.map(|t| t.parse::<Rate>().map(|r| r.0))
                .transpose()
                .map_err(|e| format!("{at}.{key}: {e}"))
        };
        let sources = match (allow, deny) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "{at}: both allow and deny are set; a reservation has one list"
                ));
            }
            (Some(nets), None) => {
                Some(SourceList::parse(true, nets).map_err(|e| format!("{at}.allow: {e}"))?)
            }
            (None, Some(nets)) => {
                Some(SourceList::parse(false, nets).map_err(|e| format!("{at}.deny: {e}"))?)
            }
            (None, None) => None,
        };
        let limits = Limits {
            packets_per_second: rate("packets_per_second", packets)?,
            bits_per_second: rate("bits_per_second", bits)?,
            syns_per_second: rate("syns_per_second", syns)?,
            sources,
        };
        limits.check().map_err(|e| format!("{at}.{e}"))?;
        Ok(limits)
    }

    /// Refuses what the kernel cannot enforce: a bit rate under [`MIN_BIT_RATE`].
    pub fn check(&self) -> Result<(), String> {
        match self.bits_per_second {
            Some(b) if b < MIN_BIT_RATE => Err(format!(
                "bits_per_second {b} is below the lowest, {MIN_BIT_RATE} (1 kB/s)"
            )),
            _ => Ok(()),
        }
    }

    /// Whether there is no limit at all (the reservation needs no slot in the kernel).
    pub fn is_empty(&self) -> bool {
        self.packets_per_second.is_none()
            && self.bits_per_second.is_none()
            && self.syns_per_second.is_none()
            && self.sources.is_none()
    }

    /// Each of `self`'s values where it has one, else `defaults`'s.
    pub fn or(&self, defaults: &Limits) -> Limits {
        Limits {
            packets_per_second: self.packets_per_second.or(defaults.packets_per_second),
            bits_per_second: self.bits_per_second.or(defaults.bits_per_second),
            syns_per_second: self.syns_per_second.or(defaults.syns_per_second),
            sources: self.sources.clone().or_else(|| defaults.sources.clone()),
        }
    }

    /// The rates above `ceiling`'s, each as (name, asked, ceiling).
    pub fn above(&self, ceiling: &Limits) -> Vec<(&'static str, u64, u64)> {
        let pairs = [
            (
                "packets_per_second",
                self.packets_per_second,
                ceiling.packets_per_second,
            ),
            (
                "bits_per_second",
                self.bits_per_second,
                ceiling.bits_per_second,
            ),
            (
                "syns_per_second",
                self.syns_per_second,
                ceiling.syns_per_second,
            ),
        ];
        pairs
            .into_iter()
            .filter_map(|(name, asked, max)| match (asked, max) {
                (Some(a), Some(m)) if a > m => Some((name, a, m)),
                _ => None,
            })
            .collect()
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(p) = self.packets_per_second {
            parts.push(format!("{p} pps"));
        }
        if let Some(b) = self.bits_per_second {
            parts.push(format!("{} bps", Rate(b)));
        }
        if let Some(s) = self.syns_per_second {
            parts.push(format!("{s} syn/s"));
        }
        if let Some(list) = &self.sources {
            let nets: Vec<String> = list.networks().iter().map(ToString::to_string).collect();
            parts.push(format!(
                "{} {}",
                if list.is_allow() { "allow" } else { "deny" },
                nets.join(",")
            ));
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// The lowest and highest rate pf takes, per second: a limit of 0 would be a block (use a deny
/// list), and above 10^12 (a terabit) the kernel's arithmetic loses precision.
pub const MIN_RATE: u64 = 1;
pub const MAX_RATE: u64 = 1_000_000_000_000;

/// A rate as people write it: `5000`, `500k`, `10M`, `1G` (powers of 1000), with an optional
/// `bit`, `bps` or `/s` after it for bit rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate(pub u64);

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a rate such as 5000, 500k, 10M or 1G");
        let t = s.trim();
        let t = ["bit/s", "bits", "bit", "bps", "/s", "pps"]
            .iter()
            .find_map(|unit| t.strip_suffix(unit))
            .unwrap_or(t);
        let (digits, scale) = match t.char_indices().last() {
            Some((i, 'k' | 'K')) => (&t[..i], 1_000),
            Some((i, 'M')) => (&t[..i], 1_000_000),
            Some((i, 'G')) => (&t[..i], 1_000_000_000),
            Some((i, 'T')) => (&t[..i], 1_000_000_000_000),
            _ => (t, 1),
        };
        let n: u64 = digits.trim().parse().map_err(|_| bad())?;
        let rate = n.checked_mul(scale).ok_or_else(bad)?;
        if !(MIN_RATE..=MAX_RATE).contains(&rate) {
            return Err(format!(
                "'{s}' is outside {MIN_RATE} to {MAX_RATE} per second (to refuse all traffic, use a deny-list)"
            ));
        }
        Ok(Rate(rate))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (scale, suffix) in [(1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")] {
            if n >= scale && n.is_multiple_of(scale) {
                return write!(f, "{}{suffix}", n / scale);
            }
        }
        write!(f, "{n}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_their_scale_and_unit() {
        for (text, want) in [
            ("5000", 5000),
            ("500k", 500_000),
            ("10M", 10_000_000),
            ("10Mbit", 10_000_000),
            ("1G", 1_000_000_000),
            ("2kpps", 2000),
            (" 7 ", 7),
        ] {
            assert_eq!(text.parse::<Rate>(), Ok(Rate(want)), "{text}");
        }
        for bad in [
            "",
            "0",
            "-1",
            "1.5M",
            "10X",
            "M",
            "2000T",
            "99999999999999999999",
        ] {
            let e = bad.parse::<Rate>().unwrap_err();
            assert!(e.contains(&format!("'{bad}'")), "{bad}: {e}");
        }
        assert_eq!(Rate(10_000_000).to_string(), "10M");
        assert_eq!(Rate(1500).to_string(), "1500");
    }

    #[test]
    fn source_lists_take_networks_and_bare_addresses() {
        let list =
            SourceList::parse(true, &["198.51.100.7".into(), "203.0.113.0/24".into()]).unwrap();
        assert!(list.is_allow());
        assert_eq!(list.networks()[0].to_string(), "198.51.100.7/32");
        assert!(SourceList::parse(false, &[]).unwrap_err().contains("empty"));
        let e = SourceList::parse(false, &["10.0.0.1/8".into()]).unwrap_err();
        assert!(e.contains("host bits"), "{e}");
        let many: Vec<String> = (0..=MAX_SOURCES)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        assert!(
            SourceList::parse(true, &many)
                .unwrap_err()
                .contains("at most")
        );
    }

    #[test]
    fn defaults_fill_gaps_and_ceilings_name_what_is_over() {
        let asked = Limits {
            packets_per_second: Some(500),
            bits_per_second: Some(2_000_000_000),
            ..Limits::default()
        };
        let policy = Limits {
            packets_per_second: Some(1000),
            bits_per_second: Some(1_000_000_000),
            syns_per_second: Some(50),
            sources: None,
        };
        let got = asked.or(&policy);
        assert_eq!(got.packets_per_second, Some(500));
        assert_eq!(got.syns_per_second, Some(50));
        assert_eq!(
            asked.above(&policy),
            vec![("bits_per_second", 2_000_000_000, 1_000_000_000)]
        );
        assert!(Limits::default().is_empty());
        assert_eq!(got.to_string(), "500 pps, 2G bps, 50 syn/s");
    }
}
