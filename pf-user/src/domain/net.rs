//! IPv4 networks, as configs and the kernel name them: `10.8.0.0/16`.

use std::{fmt, net::Ipv4Addr, str::FromStr};

/// An IPv4 network, `10.8.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

    pub fn mask(self) -> u32 {
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
