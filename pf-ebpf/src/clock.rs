//! The programs' clock: the gates' idle timeouts and the limits' rates both read it.

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};

/// Set to 1 by userspace when it loads the object on a kernel with `bpf_ktime_get_coarse_ns`
/// (5.11). A read-only global: its value is known to the verifier, which therefore never walks
/// the branch a 5.10 kernel could not verify.
#[unsafe(no_mangle)]
static PF_COARSE_CLOCK: u8 = 0;

/// The monotonic clock, as the gates and the limits keep it. The coarse read (the last tick's
/// time: a few milliseconds behind, far finer than an idle timeout of seconds, and within a
/// limit's 100 ms burst) costs a load where the precise one reads the clock source: about
/// 30 ns a packet less in the per-packet bench.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: reads a global; the helpers have no preconditions.
    unsafe {
        if core::ptr::read_volatile(&PF_COARSE_CLOCK) != 0 {
            bpf_ktime_get_coarse_ns()
        } else {
            bpf_ktime_get_ns()
        }
    }
}
