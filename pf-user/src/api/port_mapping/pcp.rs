//! PCP (RFC 6887), version 2, on the wire: requests parsed and checked, answers written. No
//! I/O. pf serves MAP and ANNOUNCE; PEER and any other opcode are answered UNSUPP_OPCODE.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const VERSION: u8 = 2;
/// The shortest request (the common header) and the longest message (RFC 6887 section 7).
pub const MIN_LEN: usize = 24;
pub const MAX_LEN: usize = 1100;
const HEADER_LEN: usize = 24;
/// MAP's opcode-specific data: nonce, protocol, reserved, internal port, suggested external
/// port, suggested external address.
const MAP_LEN: usize = 36;

pub const OP_ANNOUNCE: u8 = 0;
pub const OP_MAP: u8 = 1;
const RESPONSE_BIT: u8 = 0x80;

const OPTION_THIRD_PARTY: u8 = 1;
const OPTION_PREFER_FAILURE: u8 = 2;
const OPTION_FILTER: u8 = 3;
/// Options from 128 up are optional to process: pf skips them.
const OPTIONAL_FROM: u8 = 128;

/// How long a client is told an error holds (RFC 6887 section 7.4): a short one (the quota,
/// resources, the network) may clear soon; a long one (a malformed or refused request) will
/// not clear by asking again.
pub const SHORT_ERROR_LIFETIME: u32 = 30;
pub const LONG_ERROR_LIFETIME: u32 = 1800;

/// Result codes (RFC 6887 section 7.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ResultCode {
    Success = 0,
    UnsuppVersion = 1,
    NotAuthorized = 2,
    MalformedRequest = 3,
    UnsuppOpcode = 4,
    UnsuppOption = 5,
    MalformedOption = 6,
    NetworkFailure = 7,
    NoResources = 8,
    UnsuppProtocol = 9,
    UserExQuota = 10,
    CannotProvideExternal = 11,
    AddressMismatch = 12,
    ExcessiveRemotePeers = 13,
}

impl ResultCode {
    /// The lifetime an answer with this result carries (for success, the mapping's own).
    pub fn error_lifetime(self) -> u32 {
        match self {
            ResultCode::NetworkFailure | ResultCode::NoResources | ResultCode::UserExQuota => {
                SHORT_ERROR_LIFETIME
            }
            _ => LONG_ERROR_LIFETIME,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ResultCode::Success => "SUCCESS",
            ResultCode::UnsuppVersion => "UNSUPP_VERSION",
            ResultCode::NotAuthorized => "NOT_AUTHORIZED",
            ResultCode::MalformedRequest => "MALFORMED_REQUEST",
            ResultCode::UnsuppOpcode => "UNSUPP_OPCODE",
            ResultCode::UnsuppOption => "UNSUPP_OPTION",
            ResultCode::MalformedOption => "MALFORMED_OPTION",
            ResultCode::NetworkFailure => "NETWORK_FAILURE",
            ResultCode::NoResources => "NO_RESOURCES",
            ResultCode::UnsuppProtocol => "UNSUPP_PROTOCOL",
            ResultCode::UserExQuota => "USER_EX_QUOTA",
            ResultCode::CannotProvideExternal => "CANNOT_PROVIDE_EXTERNAL",
            ResultCode::AddressMismatch => "ADDRESS_MISMATCH",
            ResultCode::ExcessiveRemotePeers => "EXCESSIVE_REMOTE_PEERS",
        }
    }
}

/// A MAP request's opcode-specific data, and the options pf acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRequest {
    /// The mapping belongs to this nonce: a renewal or deletion must carry it.
    pub nonce: [u8; 12],
    /// The IP protocol number (6 TCP, 17 UDP; 0 would be every protocol).
    pub protocol: u8,
    /// 0 with lifetime 0: every mapping of this nonce and protocol.
    pub internal_port: u16,
    pub suggested_external_port: u16,
    pub suggested_external_addr: Ipv6Addr,
    /// PREFER_FAILURE: the suggested endpoint or nothing.
    pub prefer_failure: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Announce,
    Map(MapRequest),
}

/// A valid request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub lifetime: u32,
    /// What the client says its address is (IPv4-mapped for IPv4): it must be the packet's
    /// source, or the answer is ADDRESS_MISMATCH.
    pub client_addr: Ipv6Addr,
    pub operation: Operation,
}

impl Request {
    /// The client's address, if it is IPv4 (IPv4-mapped, `::ffff:a.b.c.d`).
    pub fn client_v4(&self) -> Option<Ipv4Addr> {
        self.client_addr.to_ipv4_mapped()
    }
}

/// What a PCP datagram is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Request(Request),
    /// Answered with this error at once.
    Error(ErrorAnswer),
    /// Not answered, and counted: why.
    Ignored(&'static str),
}

/// An error found while parsing, with what its answer echoes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorAnswer {
    pub result: ResultCode,
    pub opcode: u8,
    /// The request's bytes after its header, echoed (RFC 6887 section 8.3), cut to a
    /// multiple of 4 within the 1,100-byte limit.
    pub echo: Vec<u8>,
}

fn be16(d: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([d[at], d[at + 1]])
}

fn addr(d: &[u8], at: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&d[at..at + 16]);
    Ipv6Addr::from(a)
}

impl ErrorAnswer {
    /// The error `result` for request `d` (opcode from its second byte), echoing what follows
    /// its header.
    pub fn for_request(d: &[u8], result: ResultCode) -> Self {
        let end = d.len().min(MAX_LEN);
        let body = d.get(HEADER_LEN..end).unwrap_or_default();
        Self {
            result,
            opcode: d.get(1).map_or(0, |op| op & !RESPONSE_BIT),
            echo: body[..body.len() / 4 * 4].to_vec(),
        }
    }
}

/// Parses a datagram whose first byte is not NAT-PMP's version 0.
pub fn parse(d: &[u8]) -> Parsed {
    if d.len() < 2 {
        return Parsed::Ignored("shorter than 2 bytes");
    }
    if d[1] & RESPONSE_BIT != 0 {
        return Parsed::Ignored("a response, not a request");
    }
    let opcode = d[1] & !RESPONSE_BIT;
    let error = |result| Parsed::Error(ErrorAnswer::for_request(d, result));
    if d[0] != VERSION {
        return error(ResultCode::UnsuppVersion);
    }
    if d.len() < MIN_LEN || d.len() > MAX_LEN || !d.len().is_multiple_of(4) {
        return error(ResultCode::MalformedRequest);
    }
    let lifetime = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
    let client_addr = addr(d, 8);
    let (operation, options_at) = match opcode {
        OP_ANNOUNCE => (Operation::Announce, HEADER_LEN),
        OP_MAP => {
            if d.len() < HEADER_LEN + MAP_LEN {
                return error(ResultCode::MalformedRequest);
            }
            let m = &d[HEADER_LEN..];
            let mut nonce = [0u8; 12];
            nonce.copy_from_slice(&m[..12]);
            (
                Operation::Map(MapRequest {
                    nonce,
                    protocol: m[12],
                    internal_port: be16(m, 16),
                    suggested_external_port: be16(m, 18),
                    suggested_external_addr: addr(m, 20),
                    prefer_failure: false,
                }),
                HEADER_LEN + MAP_LEN,
            )
        }
        _ => return error(ResultCode::UnsuppOpcode),
    };
    let mut operation = operation;
    let mut at = options_at;
    let mut seen_prefer_failure = false;
    while at < d.len() {
        if d.len() - at < 4 {
            return error(ResultCode::MalformedOption);
        }
        let code = d[at];
        let len = usize::from(be16(d, at + 2));
        let padded = len.div_ceil(4) * 4;
        if d.len() - at - 4 < padded {
            return error(ResultCode::MalformedOption);
        }
        match (code, &mut operation) {
            (OPTION_PREFER_FAILURE, Operation::Map(m)) => {
                if len != 0 || seen_prefer_failure {
                    return error(ResultCode::MalformedOption);
                }
                seen_prefer_failure = true;
                m.prefer_failure = true;
            }
            // Mappings for another host: a tunnel client maps only to itself.
            (OPTION_THIRD_PARTY, Operation::Map(_)) => return error(ResultCode::NotAuthorized),
            // pf does not filter by remote peer; a client that needs it must not get a
            // mapping open to everyone.
            (OPTION_FILTER, Operation::Map(_)) => return error(ResultCode::UnsuppOption),
            (c, _) if c >= OPTIONAL_FROM => {}
            // An option not valid for the opcode, or unknown and mandatory.
            _ => return error(ResultCode::UnsuppOption),
        }
        at += 4 + padded;
    }
    Parsed::Request(Request {
        lifetime,
        client_addr,
        operation,
    })
}

/// An answer: the 24-byte header, then `body`.
fn answer(
    version: u8,
    opcode: u8,
    result: ResultCode,
    lifetime: u32,
    epoch: u32,
    body: &[u8],
) -> Vec<u8> {
    let mut a = vec![0u8; HEADER_LEN];
    a[0] = version;
    a[1] = opcode | RESPONSE_BIT;
    a[3] = result as u8;
    a[4..8].copy_from_slice(&lifetime.to_be_bytes());
    a[8..12].copy_from_slice(&epoch.to_be_bytes());
    a.extend_from_slice(body);
    a
}

/// The answer to an error: version 2 (for UNSUPP_VERSION, the version pf speaks), the
/// error's lifetime, and the request's bytes echoed.
pub fn error_answer(e: &ErrorAnswer, epoch: u32) -> Vec<u8> {
    answer(
        VERSION,
        e.opcode,
        e.result,
        e.result.error_lifetime(),
        epoch,
        &e.echo,
    )
}

/// The answer to ANNOUNCE.
pub fn announce_answer(epoch: u32) -> Vec<u8> {
    answer(VERSION, OP_ANNOUNCE, ResultCode::Success, 0, epoch, &[])
}

/// The answer to MAP: the request's nonce, protocol and internal port, with the assigned
/// external port and address (IPv4-mapped). An error carries the error's lifetime and, in
/// place of an assignment, the suggestion as asked (RFC 6887 section 11.4).
pub fn map_answer(
    m: &MapRequest,
    result: ResultCode,
    lifetime: u32,
    epoch: u32,
    external_port: u16,
    external_addr: Ipv6Addr,
) -> Vec<u8> {
    let (external_port, external_addr) = match result {
        ResultCode::Success => (external_port, external_addr),
        _ => (m.suggested_external_port, m.suggested_external_addr),
    };
    let mut body = Vec::with_capacity(MAP_LEN);
    body.extend_from_slice(&m.nonce);
    body.push(m.protocol);
    body.extend_from_slice(&[0; 3]);
    body.extend_from_slice(&m.internal_port.to_be_bytes());
    body.extend_from_slice(&external_port.to_be_bytes());
    body.extend_from_slice(&external_addr.octets());
    let lifetime = match result {
        ResultCode::Success => lifetime,
        error => error.error_lifetime(),
    };
    answer(VERSION, OP_MAP, result, lifetime, epoch, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_request(client: Ipv4Addr, lifetime: u32, options: &[u8]) -> Vec<u8> {
        let mut d = vec![VERSION, OP_MAP, 0, 0];
        d.extend_from_slice(&lifetime.to_be_bytes());
        d.extend_from_slice(&client.to_ipv6_mapped().octets());
        d.extend_from_slice(&[7; 12]);
        d.extend_from_slice(&[17, 0, 0, 0]);
        d.extend_from_slice(&6881u16.to_be_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d.extend_from_slice(&Ipv6Addr::UNSPECIFIED.octets());
        d.extend_from_slice(options);
        d
    }

    #[test]
    fn a_map_request_parses_with_its_options() {
        let client = Ipv4Addr::new(10, 8, 0, 2);
        let Parsed::Request(r) = parse(&map_request(client, 3600, &[2, 0, 0, 0])) else {
            panic!("not a request");
        };
        assert_eq!(r.lifetime, 3600);
        assert_eq!(r.client_v4(), Some(client));
        let Operation::Map(m) = r.operation else {
            panic!("not MAP")
        };
        assert_eq!((m.protocol, m.internal_port), (17, 6881));
        assert!(m.prefer_failure);
    }

    #[test]
    fn bad_requests_get_the_rfc_s_errors() {
        let client = Ipv4Addr::new(10, 8, 0, 2);
        let result = |d: &[u8]| match parse(d) {
            Parsed::Error(e) => Some(e.result),
            _ => None,
        };
        let mut short = map_request(client, 60, &[]);
        short.truncate(56);
        assert_eq!(result(&short), Some(ResultCode::MalformedRequest));
        assert_eq!(
            result(&[2, 1, 0, 0, 0, 0]),
            Some(ResultCode::MalformedRequest)
        );
        let mut odd = map_request(client, 60, &[]);
        odd.push(0);
        assert_eq!(result(&odd), Some(ResultCode::MalformedRequest));
        assert_eq!(result(&vec![2u8; 1104]), Some(ResultCode::MalformedRequest));
        let mut v1 = map_request(client, 60, &[]);
        v1[0] = 1;
        assert_eq!(result(&v1), Some(ResultCode::UnsuppVersion));
        let mut peer = map_request(client, 60, &[]);
        peer[1] = 2;
        assert_eq!(result(&peer), Some(ResultCode::UnsuppOpcode));
        assert_eq!(
            result(&map_request(client, 60, &[1, 0, 0, 16])),
            Some(ResultCode::MalformedOption)
        );
        assert_eq!(
            result(&map_request(client, 60, &[2, 0, 0, 0, 2, 0, 0, 0])),
            Some(ResultCode::MalformedOption)
        );
        assert_eq!(
            result(&map_request(client, 60, &[3, 0, 0, 0])),
            Some(ResultCode::UnsuppOption)
        );
        assert_eq!(
            result(&map_request(client, 60, &[200, 0, 0, 0])),
            None,
            "an optional option is skipped"
        );
        let mut answer = map_request(client, 60, &[]);
        answer[1] |= 0x80;
        assert!(matches!(parse(&answer), Parsed::Ignored(_)));
    }

    #[test]
    fn answers_carry_the_nonce_and_the_error_lifetimes() {
        let client = Ipv4Addr::new(10, 8, 0, 2);
        let Parsed::Request(Request {
            operation: Operation::Map(m),
            ..
        }) = parse(&map_request(client, 60, &[]))
        else {
            panic!()
        };
        let ext = Ipv4Addr::new(203, 0, 113, 10).to_ipv6_mapped();
        let a = map_answer(&m, ResultCode::Success, 120, 5, 40000, ext);
        assert_eq!(a.len(), 60);
        assert_eq!(&a[..4], &[2, 0x81, 0, 0]);
        assert_eq!(&a[4..8], &120u32.to_be_bytes());
        assert_eq!(&a[24..36], &[7; 12]);
        assert_eq!(&a[42..44], &40000u16.to_be_bytes());
        let quota = map_answer(&m, ResultCode::UserExQuota, 120, 5, 0, ext);
        assert_eq!(&quota[4..8], &SHORT_ERROR_LIFETIME.to_be_bytes());
        let refused = map_answer(&m, ResultCode::NotAuthorized, 120, 5, 0, ext);
        assert_eq!(&refused[4..8], &LONG_ERROR_LIFETIME.to_be_bytes());
    }
}
