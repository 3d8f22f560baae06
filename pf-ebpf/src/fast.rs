//! The fast path (`pf attach --fast-path`): a packet the ingress program rewrote leaves by
//! XDP_REDIRECT, as xdp-forward and Cilium do it, when the kernel's FIB knows the way and the
//! egress device can take XDP frames; every other case falls back to XDP_PASS untouched beyond
//! the rewrite, and the kernel forwards it as in the default mode.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use pf_common::{checksum, counters::FastPath};

use crate::maps::REDIRECT_DEVICES;

const AF_INET: u8 = 2;
const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();

/// Forwards a rewritten packet itself if it can: the fast-path outcome and the XDP action.
#[inline(always)]
pub fn forward(ctx: &XdpContext) -> (FastPath, u32) {
    let pass = |outcome| (outcome, xdp_action::XDP_PASS);
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + EthHdr::LEN + Ipv4Hdr::LEN > end {
        return pass(FastPath::NotForwarded); // cannot happen after a rewrite
    }
    let eth = start as *mut EthHdr;
    let ip = (start + EthHdr::LEN) as *mut Ipv4Hdr;
    // SAFETY: both headers were bounds-checked above.
    let out_ifindex = unsafe {
        // A tagged frame would leave with its tag; the kernel knows what to do with it.
        if (*eth).ether_type != ETH_P_IPV4_BE {
            return pass(FastPath::VlanTagged);
        }
        // The kernel must answer time-exceeded, so it must see the packet.
        if (*ip).ttl <= 1 {
            return pass(FastPath::TtlExpired);
        }

        // SAFETY: a plain C struct, all zeroes valid.
        let mut fib: FibParams = core::mem::zeroed();
        fib.family = AF_INET;
        fib.l4_protocol = (*ip).proto;
        fib.__bindgen_anon_1.tot_len = u16::from_be_bytes((*ip).tot_len);
        fib.__bindgen_anon_2.tos = (*ip).tos;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst_addr);
        fib.ifindex = (*ctx.ctx).ingress_ifindex;
        // Flags 0: the main FIB with policy rules, and a neighbour lookup. Return codes
        // (include/uapi/linux/bpf.h): SUCCESS fills ifindex, smac and dmac; NO_NEIGH means a
        // route but no resolved neighbour yet; FRAG_NEEDED means tot_len exceeds the egress
        // MTU; BLACKHOLE, UNREACHABLE, PROHIBIT, NOT_FWDED (local or no route),
        // FWD_DISABLED and UNSUPP_LWT are all the kernel's business.
        let rc = bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut fib,
            size_of::<FibParams>() as i32,
            0,
        );
        match rc as u32 {
            BPF_FIB_LKUP_RET_SUCCESS => {}
            BPF_FIB_LKUP_RET_NO_NEIGH => return pass(FastPath::NoNeighbour),
            BPF_FIB_LKUP_RET_FRAG_NEEDED => return pass(FastPath::FragNeeded),
            _ => return pass(FastPath::NotForwarded),
        }
        if REDIRECT_DEVICES.get_ifindex(fib.ifindex).is_none() {
            return pass(FastPath::NoRedirectDevice);
        }

        // Forward as the kernel would: TTL down by one (the checksum word holding TTL and
        // protocol changes by 0x0100), and the next hop's Ethernet addresses.
        let old_word = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
        (*ip).ttl -= 1;
        let new_word = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
        let check = u16::from_be_bytes((*ip).check);
        (*ip).check = checksum::update_word(check, old_word, new_word).to_be_bytes();
        (*eth).dst_addr = fib.dmac;
        (*eth).src_addr = fib.smac;
        fib.ifindex
    };
    // The low bits of the flags are the action if the device left the map since the lookup
    // above: XDP_PASS, so the kernel forwards the packet after all.
    match REDIRECT_DEVICES.redirect(out_ifindex, xdp_action::XDP_PASS as u64) {
        Ok(action) => (FastPath::Redirected, action),
        Err(action) => (FastPath::NoRedirectDevice, action),
    }
}
