//! BPF_MAP_UPDATE_BATCH (Linux 5.6), which aya 0.14 does not wrap: many elements written with
//! one syscall instead of one each. pf needs Linux 6.6 anyway (TCX), so there is no fallback.

use std::{io, os::fd::AsRawFd, os::fd::BorrowedFd};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of the kernel's `union bpf_attr`. The kernel accepts a shorter attr than
/// its own and treats the missing tail as zero.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `count` elements whose keys and values lie back to back in `keys` and `values` (for a
/// per-CPU map, each value is one slot per possible CPU, each rounded up to 8 bytes), with
/// `elem_flags` applied to every element (the kernel takes only BPF_F_LOCK there: a batch
/// write replaces existing elements). On failure, returns how many
/// elements, from the first, were written before the one that failed.
pub(crate) fn update(
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: u32,
    elem_flags: u64,
) -> Result<(), (u32, io::Error)> {
    if count == 0 {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.as_raw_fd() as u32,
        elem_flags,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid bpf_attr prefix whose pointers cover `count` keys and values
    // (the caller sized them); the kernel writes back only `attr.count`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err((attr.count, io::Error::last_os_error()));
    }
    Ok(())
}
