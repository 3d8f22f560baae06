//! What the kernel says of the server itself, read fresh each time it is asked: its own
//! IPv4 addresses (getifaddrs) and the ports it listens on (`/proc/net`), in the network
//! namespace the process runs in.

use std::{collections::HashSet, net::Ipv4Addr};

use crate::domain::{net::Ipv4Net, spec::Protocols};

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
    pub fn with(addresses: &[(&str, &str, u8)]) -> Self {
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
impl Listening {
    /// A socket table with one socket (policy tests).
    pub fn with_socket(protocol: Protocols, addr: Ipv4Addr, port: u16) -> Self {
        Self {
            sockets: HashSet::from([(protocol, addr, port)]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
