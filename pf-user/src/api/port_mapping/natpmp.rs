//! NAT-PMP (RFC 6886) on the wire: requests parsed, answers written. No I/O.
//!
//! Every datagram on UDP 5351 whose first byte is 0 is NAT-PMP (PCP, [`super::pcp`], is
//! version 2 on the same port). A request is 2 bytes (the external address) or 12 (a
//! mapping); bytes past those are ignored, as libnatpmp's own server does.

use std::net::Ipv4Addr;

/// NAT-PMP's version number, the first byte of every message.
pub const VERSION: u8 = 0;
/// A response's opcode is its request's plus this.
pub const RESPONSE_BIT: u8 = 128;

pub const OP_EXTERNAL_ADDRESS: u8 = 0;
pub const OP_MAP_UDP: u8 = 1;
pub const OP_MAP_TCP: u8 = 2;

/// Result codes (RFC 6886 section 3.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ResultCode {
    Success = 0,
    UnsupportedVersion = 1,
    /// Not authorised or refused (the mapping is not this client's to make or change).
    NotAuthorized = 2,
    /// The gateway cannot do its job now (the store or the audit log cannot take changes).
    NetworkFailure = 3,
    /// Out of resources: the owner's quota, an empty pool, or a client asking too fast.
    OutOfResources = 4,
    UnsupportedOpcode = 5,
}

/// The transport a mapping is for: opcode 1 is UDP, 2 is TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn opcode(self) -> u8 {
        match self {
            Transport::Udp => OP_MAP_UDP,
            Transport::Tcp => OP_MAP_TCP,
        }
    }
}

/// A request pf answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Opcode 0: the gateway's public address.
    ExternalAddress,
    /// Opcodes 1 and 2. Lifetime 0 deletes; internal port 0 with lifetime 0 deletes every
    /// mapping of the client for the transport. pf reads internal port 0 with a lifetime as
    /// ProtonVPN's gateway does: "a port of your choosing, forwarded to the same port here".
    Map {
        transport: Transport,
        internal_port: u16,
        suggested_external_port: u16,
        lifetime: u32,
    },
}

/// What a NAT-PMP datagram is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    Request(Request),
    /// A request pf does not know: answered with [`ResultCode::UnsupportedOpcode`].
    UnsupportedOpcode(u8),
    /// Not answered, and counted: why.
    Ignored(&'static str),
}

fn be16(d: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([d[at], d[at + 1]])
}

fn be32(d: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]])
}

/// Parses a datagram whose first byte is [`VERSION`].
pub fn parse(d: &[u8]) -> Parsed {
    if d.len() < 2 {
        return Parsed::Ignored("shorter than a NAT-PMP header");
    }
    if d[0] != VERSION {
        return Parsed::Ignored("not NAT-PMP's version");
    }
    let opcode = d[1];
    if opcode >= RESPONSE_BIT {
        // Another gateway's answer, or a reflection: answering it could loop.
        return Parsed::Ignored("a response, not a request");
    }
    let transport = match opcode {
        OP_EXTERNAL_ADDRESS => return Parsed::Request(Request::ExternalAddress),
        OP_MAP_UDP => Transport::Udp,
        OP_MAP_TCP => Transport::Tcp,
        other => return Parsed::UnsupportedOpcode(other),
    };
    if d.len() < 12 {
        return Parsed::Ignored("a mapping request shorter than 12 bytes");
    }
    Parsed::Request(Request::Map {
        transport,
        internal_port: be16(d, 4),
        suggested_external_port: be16(d, 6),
        lifetime: be32(d, 8),
    })
}

/// The 8 bytes every answer starts with: version, opcode + 128, result, seconds since the
/// mapping state began.
fn header(opcode: u8, result: ResultCode, epoch: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[1] = opcode.wrapping_add(RESPONSE_BIT);
    h[2..4].copy_from_slice(&(result as u16).to_be_bytes());
    h[4..8].copy_from_slice(&epoch.to_be_bytes());
    h
}

/// The answer to opcode 0 (12 bytes).
pub fn external_address_answer(result: ResultCode, epoch: u32, addr: Ipv4Addr) -> Vec<u8> {
    let mut a = header(OP_EXTERNAL_ADDRESS, result, epoch).to_vec();
    a.extend_from_slice(&addr.octets());
    a
}

/// The answer to a mapping request (16 bytes). A refusal carries external port and lifetime
/// 0, as does a deletion.
pub fn map_answer(
    transport: Transport,
    result: ResultCode,
    epoch: u32,
    internal_port: u16,
    external_port: u16,
    lifetime: u32,
) -> Vec<u8> {
    let mut a = header(transport.opcode(), result, epoch).to_vec();
    a.extend_from_slice(&internal_port.to_be_bytes());
    a.extend_from_slice(&external_port.to_be_bytes());
    a.extend_from_slice(&lifetime.to_be_bytes());
    a
}

/// The answer to an opcode pf does not know (8 bytes: the header alone).
pub fn unsupported_opcode_answer(opcode: u8, epoch: u32) -> Vec<u8> {
    header(opcode, ResultCode::UnsupportedOpcode, epoch).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_as_rfc_6886_lays_them_out() {
        assert_eq!(parse(&[0, 0]), Parsed::Request(Request::ExternalAddress));
        // natpmpc -a 1 0 udp 60: public port 1, private port 0.
        let map = [0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 60];
        assert_eq!(
            parse(&map),
            Parsed::Request(Request::Map {
                transport: Transport::Udp,
                internal_port: 0,
                suggested_external_port: 1,
                lifetime: 60,
            })
        );
        assert_eq!(parse(&[0, 9, 0, 0]), Parsed::UnsupportedOpcode(9));
        assert!(matches!(parse(&[0, 128, 0, 0]), Parsed::Ignored(_)));
        assert!(matches!(parse(&[0, 2, 0, 0, 1, 2]), Parsed::Ignored(_)));
        assert!(matches!(parse(&[0]), Parsed::Ignored(_)));
    }

    #[test]
    fn answers_are_laid_out_as_rfc_6886_says() {
        let a = map_answer(Transport::Tcp, ResultCode::Success, 7, 8080, 40000, 120);
        assert_eq!(
            a,
            [
                0, 130, 0, 0, 0, 0, 0, 7, 0x1f, 0x90, 0x9c, 0x40, 0, 0, 0, 120
            ]
        );
        let e = external_address_answer(ResultCode::Success, 1, Ipv4Addr::new(203, 0, 113, 10));
        assert_eq!(e, [0, 128, 0, 0, 0, 0, 0, 1, 203, 0, 113, 10]);
        assert_eq!(unsupported_opcode_answer(9, 0), [0, 137, 0, 5, 0, 0, 0, 0]);
    }
}
