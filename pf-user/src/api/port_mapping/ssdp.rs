//! SSDP discovery (UPnP Device Architecture 1.1, section 1.3): an M-SEARCH parsed, and the
//! unicast answer that points a device at the root description. No I/O.

/// The multicast group and port M-SEARCHes are sent to.
pub const GROUP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(239, 255, 255, 250);
pub const PORT: u16 = 1900;

/// The search targets pf answers: its own device and service types, and the generic ones.
const TARGETS: [&str; 6] = [
    "ssdp:all",
    "upnp:rootdevice",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:device:WANDevice:1",
    "urn:schemas-upnp-org:device:WANConnectionDevice:1",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
];

/// The search target of an M-SEARCH pf answers (`None`: not an M-SEARCH, not a discovery, or
/// a target pf is not).
pub fn search_target(d: &[u8]) -> Option<&'static str> {
    let text = std::str::from_utf8(d).ok()?;
    let mut lines = text.split("\r\n");
    if lines.next()?.trim() != "M-SEARCH * HTTP/1.1" {
        return None;
    }
    let (mut st, mut discover) = (None, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        match name.trim().to_ascii_uppercase().as_str() {
            "ST" => st = Some(value.trim()),
            "MAN" => discover = value.trim() == "\"ssdp:discover\"",
            _ => {}
        }
    }
    if !discover {
        return None;
    }
    let st = st?;
    TARGETS.into_iter().find(|t| *t == st)
}

/// The answer to a search for `st`: where the root description is. `ssdp:all` is answered
/// as a search for the root device.
pub fn answer(st: &str, location: &str, uuid: &str) -> String {
    let st = if st == "ssdp:all" { TARGETS[2] } else { st };
    format!(
        "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: {st}\r\nUSN: uuid:{uuid}-1::{st}\r\nEXT:\r\nSERVER: Linux UPnP/1.1 pf/{}\r\nLOCATION: {location}\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn miniupnpc_s_search_is_answered_and_others_are_not() {
        let search = "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nMAN: \"ssdp:discover\"\r\nMX: 2\r\n\r\n";
        assert_eq!(
            search_target(search.as_bytes()),
            Some("urn:schemas-upnp-org:device:InternetGatewayDevice:1")
        );
        assert_eq!(
            search_target(search.replace("ssdp:discover", "x").as_bytes()),
            None
        );
        assert_eq!(
            search_target(search.replace("InternetGateway", "Media").as_bytes()),
            None
        );
        assert_eq!(search_target(b"NOTIFY * HTTP/1.1\r\n\r\n"), None);
        let a = answer("ssdp:all", "http://10.8.0.1:5000/rootDesc.xml", "u");
        assert!(a.contains("\r\nLOCATION: http://10.8.0.1:5000/rootDesc.xml\r\n"));
        assert!(a.contains("ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1"));
    }

    #[test]
    fn random_and_mutated_searches_never_panic() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(1900);
        let search = b"M-SEARCH * HTTP/1.1\r\nST: ssdp:all\r\nMAN: \"ssdp:discover\"\r\n\r\n";
        for _ in 0..20_000 {
            let mut d = search.to_vec();
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..d.len());
                match rng.random_range(0..3) {
                    0 => d[at] = rng.random(),
                    1 => d.truncate(at),
                    _ => d.insert(at, [b':', b'\r', b'\n', 0xff][rng.random_range(0..4)]),
                }
                if d.is_empty() {
                    d.push(rng.random());
                }
            }
            let _ = search_target(&d);
        }
    }
}
