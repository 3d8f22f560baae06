//! Limits on what reaches a reservation (`pf reserve --max-pps/--max-bps/--max-syn/--allow/
//! --deny`): a source list and three rates, checked at XDP ingress on the forward entries of a
//! reservation that has them (`NatEntry::limit`). A packet they refuse is dropped there,
//! before the kernel spends anything on it, and counted per reservation and reason.
//!
//! Each rate is one GCRA word (`RateLimit::tat_ns`) shared by every CPU, kept without a lock:
//! a packet reads it, and only a packet that conforms to every rate adds its cost, with an
//! atomic add. Adds are never lost, so over any stretch of a flood the admitted cost is exactly
//! the rate times the time plus the burst. Two CPUs that read the word at the same instant may
//! both pass where one would have: the burst can be exceeded by up to (CPUs - 1) packets, and
//! is paid back before the next packet passes. One write is not atomic: a bucket that has
//! been idle (its word behind now) is restarted with a store, which may overwrite an add made
//! in the same instant on another CPU; that loses at most (CPUs - 1) packets' cost, once per
//! idle-to-busy change, never under a continuing flood.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
};
use pf_common::{
    LIMIT_COST_SHIFT, Limit, LimitDrop, LimitDrops, NatEntry, RateLimit, SourceNet,
    limits::{MAX_LIMIT_SOURCES, MAX_LIMITS},
    source_list,
};

use crate::clock::now_ns;

/// The limits, by `NatEntry::limit` (slot 0 unused). The arrival times are written by the
/// programs, everything else by userspace.
#[map]
pub static LIMITS: Array<Limit> = Array::pinned(MAX_LIMITS, 0);

/// Drops by reservation (as `LIMITS`) and reason, per CPU.
#[map]
pub static LIMIT_DROPS: PerCpuArray<LimitDrops> = PerCpuArray::pinned(MAX_LIMITS, 0);

/// Every limit's source networks (see `SourceNet`). Written by userspace.
#[map]
pub static LIMIT_SOURCES: LpmTrie<SourceNet, u8> =
    LpmTrie::pinned(MAX_LIMIT_SOURCES, BPF_F_NO_PREALLOC);

/// The cost of `units` at `r`'s rate, in nanoseconds.
#[inline(always)]
fn cost(r: &RateLimit, units: u64) -> u64 {
    (r.cost * units) >> LIMIT_COST_SHIFT
}

/// Whether `r` (a rate, or none) lets a packet through at `now`: its arrival time is no
/// further ahead than its burst.
///
/// SAFETY: `r` must point into a value of `LIMITS`.
#[inline(always)]
unsafe fn conforms(r: *const RateLimit, now: u64) -> bool {
    unsafe {
        (*r).cost == 0 || core::ptr::read_volatile(&raw const (*r).tat_ns) <= now + (*r).burst_ns
    }
}

/// Charges a conforming packet's `units` to `r`.
///
/// SAFETY: `r` must point into a value of `LIMITS`.
#[inline(always)]
unsafe fn charge(r: *mut RateLimit, units: u64, now: u64) {
    use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};
    unsafe {
        if (*r).cost == 0 {
            return;
        }
        let cost = cost(&*r, units);
        if core::ptr::read_volatile(&raw const (*r).tat_ns) < now {
            // Idle: the bucket is full, and starts again from now.
            core::ptr::write_volatile(&raw mut (*r).tat_ns, now + cost);
        } else {
            atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*r).tat_ns, cost);
        }
    }
}

/// Why `limit` refuses a packet from `src` of `ip_len` bytes (`syn`: a TCP SYN without ACK),
/// if it does; otherwise charges it to every rate.
///
/// SAFETY: `limit` must be a value of `LIMITS`.
#[inline(always)]
unsafe fn refuses(
    limit: *mut Limit,
    slot: u16,
    src: [u8; 4],
    ip_len: u16,
    syn: bool,
) -> Option<LimitDrop> {
    unsafe {
        let list = (*limit).sources;
        if list != source_list::NONE {
            let key = Key::new(
                64,
                SourceNet {
                    slot: (slot as u32).to_be_bytes(),
                    addr: src,
                },
            );
            let listed = LIMIT_SOURCES.get(&key).is_some();
            if listed != (list == source_list::ALLOW) {
                return Some(LimitDrop::Source);
            }
        }
        let now = now_ns();
        let syns = &raw mut (*limit).syns;
        let packets = &raw mut (*limit).packets;
        let bytes = &raw mut (*limit).bytes;
        if syn && !conforms(syns, now) {
            return Some(LimitDrop::Syn);
        }
        if !conforms(packets, now) {
            return Some(LimitDrop::Packets);
        }
        if !conforms(bytes, now) {
            return Some(LimitDrop::Bits);
        }
        if syn {
            charge(syns, 1, now);
        }
        charge(packets, 1, now);
        charge(bytes, ip_len as u64, now);
        None
    }
}

/// Whether a packet through `entry` from `src` goes on: it has no limits, or passes them. A
/// refused one is counted with its reservation and reason.
///
/// SAFETY: `entry` must be a value of `FORWARD_NAT` from a lookup in this run.
#[inline(always)]
pub unsafe fn admits(entry: *const NatEntry, src: [u8; 4], ip_len: u16, syn: bool) -> bool {
    let slot = unsafe { (*entry).limit };
    if slot == 0 {
        return true;
    }
    let Some(limit) = LIMITS.get_ptr_mut(slot as u32) else {
        return true;
    };
    // SAFETY: a value of LIMITS.
    let Some(reason) = (unsafe { refuses(limit, slot, src, ip_len, syn) }) else {
        return true;
    };
    if let Some(drops) = LIMIT_DROPS.get_ptr_mut(slot as u32) {
        // SAFETY: a per-CPU slot, and programs do not migrate CPUs while they run. `get_mut`,
        // not indexing: no panic branch for the verifier.
        if let Some(n) = unsafe { (*drops).by_reason.get_mut(reason as usize) } {
            *n += 1;
        }
    }
    false
}
