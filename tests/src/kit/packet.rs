//! Builds test frames field by field, with every checksum computed from scratch, so an expected
//! output is an independent statement of what the programs must produce.

pub use pf_common::IPPROTO_ICMP;
use pf_common::{IPPROTO_TCP, IPPROTO_UDP, checksum};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;

#[derive(Clone, Debug)]
pub struct Pkt {
    /// VLAN IDs, outermost first, each with TPID 0x8100.
    pub vlans: Vec<u16>,
    pub ether_type: u16,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// IPv4 options; the length must be a multiple of 4 (at most 40).
    pub ip_options: Vec<u8>,
    /// The IPv4 identification.
    pub id: u16,
    /// The IPv4 flags and fragment offset field.
    pub frag: u16,
    pub ttl: u8,
    pub payload: Vec<u8>,
    /// Send UDP with checksum 0 ("none").
    pub udp_no_checksum: bool,
    /// Bytes after the IP packet (Ethernet padding).
    pub trailer: Vec<u8>,
    /// ICMP's type, code, checksum (computed) and rest-of-header; the payload follows.
    pub icmp_header: [u8; 8],
    /// Bytes to carry after the IPv4 header instead of a built TCP/UDP/ICMP header and payload:
    /// a later fragment's.
    pub raw_l4: Option<Vec<u8>>,
    /// TCP flags (PSH, ACK unless a test says otherwise; SYN is 0x02).
    pub tcp_flags: u8,
}

impl Pkt {
    fn new(proto: u8, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Self {
        Self {
            vlans: Vec::new(),
            ether_type: ETH_P_IPV4,
            src,
            dst,
            proto,
            sport,
            dport,
            ip_options: Vec::new(),
            id: 0xbeef,
            frag: 0x4000, // DF
            ttl: 64,
            payload: b"pf test payload".to_vec(),
            udp_no_checksum: false,
            trailer: Vec::new(),
            icmp_header: [8, 0, 0, 0, 0, 1, 0, 1], // echo request, id 1, seq 1
            raw_l4: None,
            tcp_flags: 0x18,
        }
    }

    pub fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Self {
        Self::new(IPPROTO_TCP, src, sport, dst, dport)
    }

    pub fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Self {
        Self::new(IPPROTO_UDP, src, sport, dst, dport)
    }

    pub fn icmp_echo(src: [u8; 4], dst: [u8; 4]) -> Self {
        Self::new(IPPROTO_ICMP, src, 0, dst, 0)
    }

    /// An ICMP error of `icmp_type`/`code` from `src` to `dst`, quoting `quoted` (an IPv4
    /// packet, whole or cut short).
    pub fn icmp_error(src: [u8; 4], dst: [u8; 4], icmp_type: u8, code: u8, quoted: &[u8]) -> Self {
        let mut p = Self::new(IPPROTO_ICMP, src, 0, dst, 0);
        p.icmp_header = [icmp_type, code, 0, 0, 0, 0, 0, 0];
        if (icmp_type, code) == (3, 4) {
            p.icmp_header[6..8].copy_from_slice(&1280u16.to_be_bytes()); // next-hop MTU
        }
        p.frag = 0;
        p.payload = quoted.to_vec();
        p
    }

    /// The packet as two fragments, split `first_len` bytes (a multiple of 8) into what follows
    /// the IPv4 header: the first (MF set, with the TCP/UDP header) and the last.
    pub fn fragments(&self, first_len: usize) -> [Pkt; 2] {
        assert_eq!(first_len % 8, 0, "fragment offsets count 8-byte units");
        let l4 = self.l4();
        assert!(first_len < l4.len());
        let first = Pkt {
            frag: 0x2000,
            raw_l4: Some(l4[..first_len].to_vec()),
            ..self.clone()
        };
        let last = Pkt {
            frag: (first_len / 8) as u16,
            raw_l4: Some(l4[first_len..].to_vec()),
            ..self.clone()
        };
        [first, last]
    }

    /// The same packet with its destination rewritten.
    pub fn with_dst(&self, dst: [u8; 4], dport: u16) -> Self {
        Self {
            dst,
            dport,
            ..self.clone()
        }
    }

    /// The same packet with its source rewritten.
    pub fn with_src(&self, src: [u8; 4], sport: u16) -> Self {
        Self {
            src,
            sport,
            ..self.clone()
        }
    }

    fn l4(&self) -> Vec<u8> {
        if let Some(raw) = &self.raw_l4 {
            return raw.clone();
        }
        let mut l4 = match self.proto {
            IPPROTO_TCP => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&self.dport.to_be_bytes());
                h[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // seq
                h[12] = 5 << 4; // data offset
                h[13] = self.tcp_flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h
            }
            IPPROTO_UDP => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&self.dport.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                h
            }
            _ => self.icmp_header.to_vec(),
        };
        l4.extend_from_slice(&self.payload);
        let (at, pseudo) = match self.proto {
            IPPROTO_TCP => (16, true),
            IPPROTO_UDP => (6, true),
            _ => (2, false),
        };
        if self.proto == IPPROTO_UDP && self.udp_no_checksum {
            return l4;
        }
        let initial = if pseudo {
            checksum::pseudo_header_sum(self.src, self.dst, self.proto, l4.len() as u16)
        } else {
            0
        };
        let mut c = checksum::checksum(&l4, initial);
        if self.proto == IPPROTO_UDP && c == 0 {
            c = 0xffff;
        }
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        l4
    }

    /// The IPv4 packet (no Ethernet header).
    pub fn ipv4(&self) -> Vec<u8> {
        assert_eq!(
            self.ip_options.len() % 4,
            0,
            "IP options must fill 32-bit words"
        );
        let l4 = self.l4();
        let ihl = 20 + self.ip_options.len();
        let mut ip = vec![0u8; ihl];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&self.id.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = self.ttl;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&self.src);
        ip[16..20].copy_from_slice(&self.dst);
        ip[20..].copy_from_slice(&self.ip_options);
        let c = checksum::checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&l4);
        ip
    }

    /// The whole Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
        for vid in &self.vlans {
            f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&self.ether_type.to_be_bytes());
        if self.ether_type == ETH_P_IPV4 {
            f.extend_from_slice(&self.ipv4());
        } else {
            f.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 17, 64]); // looks like IPv6, or ARP's bytes
            f.extend_from_slice(&[0u8; 40]);
        }
        f.extend_from_slice(&self.trailer);
        f
    }
}
