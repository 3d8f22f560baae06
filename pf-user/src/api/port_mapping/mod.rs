//! The port-mapping protocols customers' devices speak to their gateway, on the wire: NAT-PMP
//! and PCP (one UDP port, told apart by the version byte). Parsers and writers only, no I/O;
//! `pf serve` answers them ([`crate::service::port_mapping`]).
//!
//! Every parser takes any byte string: it returns a request, an error to answer, or a reason
//! to stay silent, and never panics (held by the fuzz tests below and the service's tests).

pub mod natpmp;
pub mod pcp;
pub mod ssdp;
pub mod upnp;

/// The UDP port NAT-PMP and PCP servers listen on.
pub const SERVER_PORT: u16 = 5351;

/// A datagram to [`SERVER_PORT`], by the protocol its first byte names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datagram {
    NatPmp(natpmp::Parsed),
    Pcp(pcp::Parsed),
}

/// Sorts a datagram by its version byte (0 is NAT-PMP, anything else PCP's to judge) and
/// parses it.
pub fn parse(d: &[u8]) -> Datagram {
    match d.first() {
        Some(&natpmp::VERSION) => Datagram::NatPmp(natpmp::parse(d)),
        _ => Datagram::Pcp(pcp::parse(d)),
    }
}

#[cfg(test)]
mod fuzz {
    //! Thousands of generated and mutated datagrams through both parsers (fixed seed): no
    //! panic, and every answer the writers make from them is well formed.
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn seeds() -> Vec<Vec<u8>> {
        let mut map = vec![2u8, 1, 0, 0, 0, 0, 0, 60];
        map.extend_from_slice(
            &std::net::Ipv4Addr::new(10, 8, 0, 2)
                .to_ipv6_mapped()
                .octets(),
        );
        map.extend_from_slice(&[9; 12]);
        map.extend_from_slice(&[6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        map.extend_from_slice(&[0; 16]);
        let mut with_options = map.clone();
        with_options.extend_from_slice(&[2, 0, 0, 0, 130, 0, 0, 4, 1, 2, 3, 4]);
        let mut announce = map[..24].to_vec();
        announce[1] = 0;
        vec![
            vec![0, 0],
            vec![0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 60],
            vec![0, 2, 0, 0, 0x1f, 0x90, 0x1f, 0x90, 0, 0, 0x0e, 0x10],
            map,
            with_options,
            announce,
        ]
    }

    fn check(d: &[u8]) {
        match parse(d) {
            Datagram::NatPmp(natpmp::Parsed::Request(natpmp::Request::Map {
                transport,
                internal_port,
                ..
            })) => {
                assert!(d.len() >= 12);
                let a = natpmp::map_answer(
                    transport,
                    natpmp::ResultCode::Success,
                    0,
                    internal_port,
                    1,
                    1,
                );
                assert_eq!(a.len(), 16);
            }
            Datagram::Pcp(pcp::Parsed::Error(e)) => {
                let a = pcp::error_answer(&e, 0);
                assert!(a.len() <= pcp::MAX_LEN && a.len().is_multiple_of(4));
            }
            Datagram::Pcp(pcp::Parsed::Request(r)) => {
                assert!(d.len() >= pcp::MIN_LEN && d.len() <= pcp::MAX_LEN);
                assert!(d.len().is_multiple_of(4));
                if let pcp::Operation::Map(m) = r.operation {
                    let a = pcp::map_answer(
                        &m,
                        pcp::ResultCode::Success,
                        r.lifetime,
                        0,
                        1,
                        std::net::Ipv6Addr::UNSPECIFIED,
                    );
                    assert_eq!(a.len(), 60);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn random_and_mutated_datagrams_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x5351);
        let seeds = seeds();
        for _ in 0..20_000 {
            let d: Vec<u8> = if rng.random_bool(0.3) {
                let len = rng.random_range(0..1200);
                let mut d: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                if let Some(first) = d.first_mut() {
                    *first = [0, 1, 2, 3][rng.random_range(0..4)];
                }
                d
            } else {
                let mut d = seeds[rng.random_range(0..seeds.len())].clone();
                for _ in 0..rng.random_range(1..6) {
                    match rng.random_range(0..4) {
                        0 if !d.is_empty() => {
                            let at = rng.random_range(0..d.len());
                            d[at] ^= 1 << rng.random_range(0..8);
                        }
                        1 => d.truncate(rng.random_range(0..=d.len())),
                        2 => d.extend((0..rng.random_range(0..64)).map(|_| rng.random::<u8>())),
                        _ if !d.is_empty() => {
                            let at = rng.random_range(0..d.len());
                            d[at] = rng.random();
                        }
                        _ => {}
                    }
                }
                d
            };
            check(&d);
        }
    }
}
