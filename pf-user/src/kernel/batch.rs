//! BPF_MAP_UPDATE_BATCH and BPF_MAP_LOOKUP_BATCH (Linux 5.6), which aya 0.14 does not wrap: many
//! elements written or read with one syscall instead of one or two each. pf needs Linux 5.10
//! anyway (see `attach::MIN_KERNEL`), so there is no fallback.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    thread,
    time::Duration,
};

use bytemuck::Pod;

/// Elements per syscall: bounds what one call copies (a NAT entry's key and value are 32 bytes).
const CHUNK: usize = 65_536;
/// How often a write that makes no progress against ENOMEM is retried, 1 ms apart.
///
/// Maps made with BPF_F_NO_PREALLOC take each new element from the kernel's bpf_mem_alloc
/// caches, which are refilled asynchronously (irq_work). A long burst of inserts can drain them
/// and get ENOMEM although memory is plentiful (seen here filling 1,000,000 entries when the NAT
/// maps were per-CPU hashes); a moment later the refill has run and the write succeeds.
const ENOMEM_RETRIES: u32 = 200;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
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

/// Writes every (key, value) pair in chunks, retrying transient ENOMEM, and reports each written
/// run of keys to `written` (so the caller can undo them). `values` holds one value per key
/// (pf writes no per-CPU map in batches). On failure returns the error and how many keys were
/// written in all.
pub(crate) fn update_all<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    elem_flags: u64,
    mut written: impl FnMut(&[K]),
) -> Result<(), (usize, io::Error)> {
    debug_assert_eq!(values.len(), keys.len());
    let mut offset = 0;
    let mut stalls = 0;
    while offset < keys.len() {
        let end = (offset + CHUNK).min(keys.len());
        let chunk = &keys[offset..end];
        let chunk_values = &values[offset..end];
        let result = update(
            map,
            bytemuck::cast_slice(chunk),
            bytemuck::cast_slice(chunk_values),
            chunk.len() as u32,
            elem_flags,
        );
        let done = match &result {
            Ok(()) => chunk.len(),
            Err((done, _)) => (*done as usize).min(chunk.len()),
        };
        written(&chunk[..done]);
        offset += done;
        if let Err((_, error)) = result {
            stalls = if done > 0 { 0 } else { stalls + 1 };
            if error.raw_os_error() == Some(libc::ENOMEM) && stalls <= ENOMEM_RETRIES {
                thread::sleep(Duration::from_millis(1));
                continue;
            }
            return Err((offset, error));
        }
    }
    Ok(())
}

/// Writes `count` elements whose keys and values lie back to back in `keys` and `values`, with
/// `elem_flags` applied to every element (the kernel takes only BPF_F_LOCK there: a batch
/// write replaces existing elements). On failure, returns how many
/// elements, from the first, were written before the one that failed.
fn update(
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
    // SAFETY: the pointers cover `count` keys and values (the caller sized them).
    unsafe { batch_call(BPF_MAP_UPDATE_BATCH, &mut attr) }.map_err(|e| (attr.count, e))
}

/// One batched map command. The kernel writes back `attr.count` (elements done) and, for a
/// lookup, the position to go on from.
///
/// SAFETY: `attr`'s pointers must cover `attr.count` keys and values of the map's sizes, and
/// its batch tokens (if set) 16 bytes each.
unsafe fn batch_call(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid bpf_attr prefix (the kernel treats the missing tail as zero).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Every (key, value) of a map that holds one value per key (not a per-CPU map), read in chunks
/// of `CHUNK` elements. A hash map's elements are read bucket by bucket, so one that changes
/// meanwhile may be read or not, never half; pf reads under its lock on the pin directory, so
/// only the programs' counters change.
pub(crate) fn lookup_all<K: Pod, V: Pod>(map: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    lookup_chunks::<K, V>(map, 1, |key, values| out.push((key, values[0])))?;
    Ok(out)
}

/// Every key of a per-CPU map with its value on each of `cpus` possible CPUs, read in chunks
/// as [`lookup_all`]. `V`'s size must be a multiple of 8: the kernel lays each CPU's value out
/// 8-byte aligned.
pub(crate) fn lookup_all_per_cpu<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    cpus: usize,
) -> io::Result<Vec<(K, Vec<V>)>> {
    assert!(
        size_of::<V>().is_multiple_of(8),
        "per-CPU values are 8-byte aligned"
    );
    let mut out = Vec::new();
    lookup_chunks::<K, V>(map, cpus, |key, values| out.push((key, values.to_vec())))?;
    Ok(out)
}

/// Reads every element in chunks, handing each key and its `per_key` values to `each`.
fn lookup_chunks<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    per_key: usize,
    mut each: impl FnMut(K, &[V]),
) -> io::Result<()> {
    let mut keys = vec![K::zeroed(); CHUNK];
    let mut values = vec![V::zeroed(); CHUNK * per_key];
    // The position to go on from: a bucket number for a hash map, a key for an array; 16 bytes
    // hold either for every map pf reads this way.
    let mut token = [0u8; 16];
    let mut next = [0u8; 16];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `keys` holds `count` keys of the map's key size and `values` `count` times
        // `per_key` values of its value size (the caller's types), the tokens 16 bytes each.
        let error = unsafe { batch_call(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        let read = (attr.count as usize).min(CHUNK);
        for (key, values) in keys[..read].iter().zip(values.chunks(per_key)) {
            each(*key, values);
        }
        match error {
            // The end of the map.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(e) => return Err(e),
            None => {}
        }
        token = next;
        first = false;
    }
}
