//! An nftables set that holds every forwarding reservation's target endpoints (address,
//! protocol, port or port range), kept by `pf serve`, so the server's ruleset can tell pf's
//! traffic apart (the shipped `dist/pf.nft`):
//!
//! - in FORWARD, admit inbound packets to a reserved target (pf rewrote their destination in
//!   XDP) and nothing else to the tunnel: a neighbour on the public network that routes to the
//!   tunnel addresses stays out;
//! - in POSTROUTING, do not masquerade a packet *from* a reserved target endpoint: pf's egress
//!   gives it the public address and port, so a client that speaks first from its forwarded
//!   port (torrent DHT and uTP do) keeps one conntrack entry, and its peer's replies come back
//!   unchanged.
//!
//! It is two sets, `NAME_tcp` and `NAME_udp`, of type `ipv4_addr . inet_service` with `flags
//! interval` (a range is one element): Linux 6.12 refuses a lookup in an interval set of three
//! concatenated fields (address . protocol . port), which 6.1 and 6.18 take. pf only changes
//! their elements, with the `nft` command; the admin's ruleset declares them.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use crate::domain::spec::{Protocols, Reservation};

use super::error::PfError;

/// The sets, named as nft names a set: `FAMILY TABLE NAME` (e.g. `ip pf forwarded`), for the
/// two sets `NAME_tcp` and `NAME_udp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftSet {
    family: String,
    table: String,
    set: String,
}

impl std::str::FromStr for NftSet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let name_ok = |w: &str| {
            !w.is_empty()
                && w.len() <= 64
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        match words[..] {
            [family @ ("ip" | "inet"), table, set] if name_ok(table) && name_ok(set) => Ok(Self {
                family: family.to_string(),
                table: table.to_string(),
                set: set.to_string(),
            }),
            _ => Err(format!(
                "'{s}' is not an nftables set as FAMILY TABLE SET (family ip or inet; names of letters, digits, _ and -), e.g. \"ip pf forwarded\""
            )),
        }
    }
}

impl std::fmt::Display for NftSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.family, self.table, self.set)
    }
}

/// The sets' elements for `r`: one per protocol, (protocol, `ADDR . PORT[-PORT]`), the
/// target's.
pub fn elements(r: &Reservation) -> Vec<(&'static str, String)> {
    let ports = r.target_ports();
    let (first, last) = (ports.first, ports.last);
    let ports = if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    };
    let protocols: &[&str] = match r.public.protocols {
        Protocols::Tcp => &["tcp"],
        Protocols::Udp => &["udp"],
        Protocols::Both => &["tcp", "udp"],
    };
    protocols
        .iter()
        .map(|p| (*p, format!("{} . {ports}", r.target_addr)))
        .collect()
}

/// The protocols, one set each.
const PROTOCOLS: [&str; 2] = ["tcp", "udp"];

impl NftSet {
    /// Runs an nft script as one transaction: all of it applies, or none.
    fn apply(&self, script: &str) -> Result<(), PfError> {
        let failed = |detail: String| PfError::Netfilter {
            set: self.to_string(),
            detail,
        };
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("running nft: {e}")))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(script.as_bytes())
            .map_err(|e| failed(format!("writing to nft: {e}")))?;
        let out = child
            .wait_with_output()
            .map_err(|e| failed(format!("waiting for nft: {e}")))?;
        if !out.status.success() {
            return Err(failed(
                String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .replace('\n', "; "),
            ));
        }
        Ok(())
    }

    /// The set of `proto`'s targets, as nft names it.
    fn of(&self, proto: &str) -> String {
        format!("{} {} {}_{proto}", self.family, self.table, self.set)
    }

    fn command(&self, verb: &str, rs: &[Reservation]) -> String {
        let all: Vec<(&str, String)> = rs.iter().flat_map(elements).collect();
        let mut script = String::new();
        for proto in PROTOCOLS {
            let these: Vec<&str> = all
                .iter()
                .filter(|(p, _)| *p == proto)
                .map(|(_, e)| e.as_str())
                .collect();
            if !these.is_empty() {
                script.push_str(&format!(
                    "{verb} element {} {{ {} }}\n",
                    self.of(proto),
                    these.join(", ")
                ));
            }
        }
        script
    }

    /// Fails unless both sets exist (the ruleset declares them).
    pub fn check(&self) -> Result<(), PfError> {
        for proto in PROTOCOLS {
            let set = format!("{}_{proto}", self.set);
            let out = Command::new("nft")
                .args(["list", "set", &self.family, &self.table, &set])
                .output()
                .map_err(|e| PfError::Netfilter {
                    set: self.to_string(),
                    detail: format!("running nft: {e}"),
                })?;
            if !out.status.success() {
                return Err(PfError::Netfilter {
                    set: self.to_string(),
                    detail: format!(
                        "no set {} ({}): load a ruleset that declares it, as dist/pf.nft does",
                        self.of(proto),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
        }
        Ok(())
    }

    pub fn add(&self, rs: &[Reservation]) -> Result<(), PfError> {
        let script = self.command("add", rs);
        if script.is_empty() {
            return Ok(());
        }
        self.apply(&script)
    }

    pub fn delete(&self, rs: &[Reservation]) -> Result<(), PfError> {
        let script = self.command("delete", rs);
        if script.is_empty() {
            return Ok(());
        }
        self.apply(&script)
    }

    /// Makes the sets hold exactly `rs`, in one transaction.
    pub fn replace(&self, rs: &[Reservation]) -> Result<(), PfError> {
        let flush: String = PROTOCOLS
            .iter()
            .map(|p| format!("flush set {}\n", self.of(p)))
            .collect();
        self.apply(&format!("{flush}{}", self.command("add", rs)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_name_the_target_per_protocol() {
        let r = |public: &str, target: &str| {
            Reservation::new(public.parse().unwrap(), target.parse().unwrap()).unwrap()
        };
        let owned = |v: Vec<(&str, String)>| -> Vec<(String, String)> {
            v.into_iter().map(|(p, e)| (p.to_string(), e)).collect()
        };
        assert_eq!(
            owned(elements(&r("198.51.100.1:8080/tcp", "10.8.0.2:80"))),
            [("tcp".to_string(), "10.8.0.2 . 80".to_string())]
        );
        assert_eq!(
            owned(elements(&r("198.51.100.1:8810-8815/both", "10.8.0.3:9810"))),
            [
                ("tcp".to_string(), "10.8.0.3 . 9810-9815".to_string()),
                ("udp".to_string(), "10.8.0.3 . 9810-9815".to_string())
            ]
        );
        let sets: NftSet = "ip pf forwarded".parse().unwrap();
        assert_eq!(
            sets.command("add", &[r("198.51.100.1:8810-8815/both", "10.8.0.3:9810")]),
            "add element ip pf forwarded_tcp { 10.8.0.3 . 9810-9815 }\nadd element ip pf forwarded_udp { 10.8.0.3 . 9810-9815 }\n"
        );
    }

    #[test]
    fn set_names_are_checked() {
        assert_eq!(
            "ip pf forwarded".parse::<NftSet>().unwrap().to_string(),
            "ip pf forwarded"
        );
        for bad in [
            "pf forwarded",
            "ip6 pf forwarded",
            "ip pf for;warded",
            "ip pf",
        ] {
            assert!(bad.parse::<NftSet>().is_err(), "{bad}");
        }
    }
}
