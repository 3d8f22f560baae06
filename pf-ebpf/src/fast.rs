//! The fast paths: a packet leaves by XDP_REDIRECT, as xdp-forward and Cilium do it, when the
//! kernel's FIB knows the way and the egress device is in the program's device map. Every other
//! case falls back to XDP_PASS, and the kernel forwards the packet as in the default mode.
//!
//! - Ingress (`pf attach IFACE --fast-path`): a packet the ingress program rewrote goes to the
//!   tunnel-side device, through `REDIRECT_DEVICES` (every device that can take XDP frames).
//! - Replies (`pf attach IFACE --tunnel-side`): a reply from a reservation's target goes out a
//!   public interface, through `PUBLIC_DEVICES` (the `--fast-path` public interfaces that can
//!   take XDP frames), rewritten only once the redirect is certain.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::bpf_fib_lookup,
    maps::DevMapHash,
    programs::XdpContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use pf_common::{checksum, counters::FastPath};

const AF_INET: u8 = 2;
const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();

/// The next hop of a packet whose redirect is already set up: the Ethernet addresses to write.
pub struct NextHop {
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    smac: [u8; 6],
    dmac: [u8; 6],
}

/// FIB lookup parameters, 8-byte aligned so they can be zeroed a word at a time.
#[repr(C, align(8))]
struct Fib(FibParams);

/// Zeroes FIB lookup parameters in place. `core::mem::zeroed()`, or zeroing a copy, compiles to
/// a call of a `memset` subprogram, measured at a quarter of the fast-path program's own time
/// (perf during `cargo xtask bench`); volatile 8-byte stores in place cannot become that call.
#[inline(always)]
fn zero_fib(fib: &mut core::mem::MaybeUninit<Fib>) -> &mut FibParams {
    const WORDS: usize = size_of::<Fib>() / 8;
    let words = fib.as_mut_ptr() as *mut u64;
    for i in 0..WORDS {
        // SAFETY: `i` < WORDS, inside the struct, which is 8-byte aligned.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte was written; all zeroes is a valid value of this plain C struct.
    unsafe { &mut fib.assume_init_mut().0 }
}

/// Asks the FIB where the packet goes and, if it leaves by a device in `devices`, sets up the
/// redirect (`bpf_redirect_map`). After `Ok`, the program must call [`finish`] and return
/// XDP_REDIRECT; after `Err`, nothing was written and the outcome says why the packet passes.
#[inline(always)]
pub fn route(ctx: &XdpContext, devices: &DevMapHash) -> Result<NextHop, FastPath> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + EthHdr::LEN + Ipv4Hdr::LEN > end {
        return Err(FastPath::NotForwarded); // cannot happen after the callers' parsing
    }
    let eth = start as *mut EthHdr;
    let ip = (start + EthHdr::LEN) as *mut Ipv4Hdr;
    // SAFETY: both headers were bounds-checked above.
    unsafe {
        // A tagged frame would leave with its tag; the kernel knows what to do with it.
        if (*eth).ether_type != ETH_P_IPV4_BE {
            return Err(FastPath::VlanTagged);
        }
        // The kernel must answer time-exceeded, so it must see the packet.
        if (*ip).ttl <= 1 {
            return Err(FastPath::TtlExpired);
        }

        let mut fib = core::mem::MaybeUninit::uninit();
        let fib = zero_fib(&mut fib);
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
        let rc = bpf_fib_lookup(ctx.ctx as *mut _, fib, size_of::<FibParams>() as i32, 0);
        match rc as u32 {
            BPF_FIB_LKUP_RET_SUCCESS => {}
            // The kernel fills the route's ifindex before it looks for the neighbour: a device
            // that could never take the redirect is counted as that, not as a neighbour to wait
            // for (a WireGuard or TUN tunnel's first packets).
            BPF_FIB_LKUP_RET_NO_NEIGH if devices.get_ifindex(fib.ifindex).is_none() => {
                return Err(FastPath::NoRedirectDevice);
            }
            BPF_FIB_LKUP_RET_NO_NEIGH => return Err(FastPath::NoNeighbour),
            BPF_FIB_LKUP_RET_FRAG_NEEDED => return Err(FastPath::FragNeeded),
            _ => return Err(FastPath::NotForwarded),
        }
        // The map lookup happens here, once: XDP_REDIRECT if the device is in the map (the
        // redirect then holds it until the program returns), else the flags' low bits,
        // XDP_PASS. Nothing was written yet, so a miss passes the packet as it came.
        if devices
            .redirect(fib.ifindex, xdp_action::XDP_PASS as u64)
            .is_err()
        {
            return Err(FastPath::NoRedirectDevice);
        }
        Ok(NextHop {
            eth,
            ip,
            smac: fib.smac,
            dmac: fib.dmac,
        })
    }
}

/// Forwards as the kernel would: TTL down by one (the checksum word holding TTL and protocol
/// changes by 0x0100), and the next hop's Ethernet addresses. Returns XDP_REDIRECT.
#[inline(always)]
pub fn finish(hop: NextHop) -> u32 {
    // SAFETY: `route` bounds-checked both headers, and no helper has changed the packet since.
    unsafe {
        let ip = hop.ip;
        let old_word = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
        (*ip).ttl -= 1;
        let new_word = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
        let check = u16::from_be_bytes((*ip).check);
        (*ip).check = checksum::update_word(check, old_word, new_word).to_be_bytes();
        (*hop.eth).dst_addr = hop.dmac;
        (*hop.eth).src_addr = hop.smac;
    }
    xdp_action::XDP_REDIRECT
}
