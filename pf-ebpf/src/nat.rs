//! The two rewrites: destination NAT at XDP ingress, source NAT at TC egress.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use pf_common::{EndpointKey, IPPROTO_UDP, checksum, counters::Outcome};

use crate::{
    maps::{FORWARD_NAT, REVERSE_NAT},
    parse::{MAX_HEADERS_LEN, parse},
};

/// Ingress: a packet to a reserved public endpoint gets the tunnel endpoint as its destination.
/// The IPv4 and TCP/UDP checksums are updated incrementally (RFC 1624): XDP sees frames as they
/// came off the wire, with complete checksums.
#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> Outcome {
    let (start, end) = (ctx.data(), ctx.data_end());
    let h = match parse(start, end, end - start) {
        Ok(h) => h,
        Err(outcome) => return outcome,
    };
    // SAFETY: parse bounds-checked every pointer in `h` against `end`.
    unsafe {
        let old_addr = (*h.ip).dst_addr;
        let old_port = (*h.ports)[1];
        let key = EndpointKey::new(old_addr, old_port, h.proto);
        let Some(entry) = FORWARD_NAT.get_ptr_mut(&key) else {
            return Outcome::NoReservation;
        };
        let entry = &mut *entry;
        let (new_addr, new_port) = (entry.addr, entry.port);

        let ip_check = u16::from_be_bytes((*h.ip).check);
        (*h.ip).check = checksum::update_addr(ip_check, old_addr, new_addr).to_be_bytes();
        (*h.ip).dst_addr = new_addr;

        let l4_check = u16::from_be_bytes(*h.l4_check);
        let l4_check = if h.proto == IPPROTO_UDP {
            checksum::update_udp_addr_port(l4_check, old_addr, new_addr, old_port, new_port)
        } else {
            checksum::update_addr_port(l4_check, old_addr, new_addr, old_port, new_port)
        };
        *h.l4_check = l4_check.to_be_bytes();
        (*h.ports)[1] = new_port;

        entry.packets += 1;
        entry.bytes += h.ip_len as u64;
    }
    Outcome::Rewritten
}

/// What `egress` decided: the outcome to count, and whether the packet must be dropped because a
/// rewrite stopped half way (a half-rewritten packet must never leave).
pub struct EgressVerdict {
    pub outcome: Outcome,
    pub drop: bool,
}

impl From<Outcome> for EgressVerdict {
    #[inline(always)]
    fn from(outcome: Outcome) -> Self {
        Self {
            outcome,
            drop: false,
        }
    }
}

/// Egress: a reply from a tunnel endpoint that is the target of a reservation gets the public
/// endpoint as its source. The skb helpers update the checksums: unlike XDP, an skb here may carry
/// CHECKSUM_PARTIAL (only the pseudo-header sum in the field), which they handle.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> EgressVerdict {
    let frame_len = ctx.len() as usize;
    let want = if frame_len < MAX_HEADERS_LEN {
        frame_len
    } else {
        MAX_HEADERS_LEN
    };
    // Headers of a forwarded or local packet are normally in the linear part; pull them there if
    // not (this also invalidates earlier packet pointers, so take data/data_end afterwards).
    if ctx.data_end() - ctx.data() < want && ctx.pull_data(want as u32).is_err() {
        return Outcome::Truncated.into();
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let h = match parse(start, end, frame_len) {
        Ok(h) => h,
        Err(outcome) => return outcome.into(),
    };
    // SAFETY: parse bounds-checked every pointer in `h` against `end`; they are only read, and
    // only before the first helper call below invalidates them.
    let (old_addr, old_port, addr_off, port_off, check_off) = unsafe {
        (
            (*h.ip).src_addr,
            (*h.ports)[0],
            h.ip as usize - start + 12,
            h.ports as usize - start,
            h.l4_check as usize - start,
        )
    };
    let ip_check_off = addr_off - 2;
    let key = EndpointKey::new(old_addr, old_port, h.proto);
    let Some(entry) = REVERSE_NAT.get_ptr_mut(&key) else {
        return Outcome::NoReservation.into();
    };
    // SAFETY: a per-CPU map value, valid for the rest of the program.
    let entry = unsafe { &mut *entry };
    let (new_addr, new_port) = (entry.addr, entry.port);
    let l4_flags = if h.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let (old_a, new_a) = (
        u32::from_ne_bytes(old_addr) as u64,
        u32::from_ne_bytes(new_addr) as u64,
    );
    let (old_p, new_p) = (
        u16::from_ne_bytes(old_port) as u64,
        u16::from_ne_bytes(new_port) as u64,
    );

    // The first helper touches the deepest byte pf writes, so it makes the whole range writable;
    // if it fails, nothing has changed yet and the packet can pass as it was.
    if ctx
        .l4_csum_replace(
            check_off,
            old_a,
            new_a,
            l4_flags | BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .is_err()
    {
        return Outcome::RewriteFailed.into();
    }
    let rest_ok = ctx
        .l4_csum_replace(check_off, old_p, new_p, l4_flags | 2)
        .is_ok()
        && ctx.l3_csum_replace(ip_check_off, old_a, new_a, 4).is_ok()
        && ctx.store(addr_off, &new_addr, 0).is_ok()
        && ctx.store(port_off, &new_port, 0).is_ok();
    if !rest_ok {
        return EgressVerdict {
            outcome: Outcome::RewriteFailed,
            drop: true,
        };
    }
    entry.packets += 1;
    entry.bytes += h.ip_len as u64;
    Outcome::Rewritten.into()
}
