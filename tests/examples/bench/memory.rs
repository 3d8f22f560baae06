//! Kernel memory per reserved port, from the kernel's own accounting: the `memlock` line of each
//! map's `/proc/<pid>/fdinfo` entry (`htab_map_mem_usage` for a hash: its buckets, its locks,
//! and each element as allocated). Linux 6.4 and later; before, that line is an estimate from
//! the map's sizes alone, and the section says it cannot measure.
//!
//! pf's NAT maps and records are measured empty and holding N single-port, single-protocol reservations (the
//! worst case per port: each brings its own record). Baseline, in the same run: a per-CPU hash
//! of the same key and value sizes holding N entries, the layout pf's NAT maps had before
//! (one value per possible CPU), made here with `BPF_MAP_CREATE` so this build of pf does not
//! need it. "all MB" is every map of pf, empty: what pf costs before its first reservation.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::maps::MapData;
use pf::{kernel::bpffs::PinDir, kernel::state::State};
use pf_common::{EndpointKey, NatEntry, limits::MAX_FORWARDS, map_names};
use pf_tests::kit::ScratchDir;
use serde_json::{Value, json};

use crate::{Profile, per_packet::filler};

/// The maps a reservation's memory is in: both NAT maps and the records.
const MEASURED: [&str; 3] = [
    map_names::FORWARD_NAT,
    map_names::REVERSE_NAT,
    map_names::RESERVATIONS,
];

/// The `memlock` bytes the kernel accounts to the map behind `fd`.
fn memlock(fd: i32) -> Result<u64, String> {
    let path = format!("/proc/self/fdinfo/{fd}");
    let info = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("{path} has no memlock line"))
}

fn pinned_memlock(dir: &Path, name: &str) -> Result<u64, String> {
    let map = MapData::from_pin(dir.join(name)).map_err(|e| format!("opening {name}: {e}"))?;
    memlock(map.fd().as_fd().as_raw_fd())
}

/// Possible CPUs: what a per-CPU map allocates for.
fn possible_cpus() -> Result<usize, String> {
    aya::util::nr_cpus().map_err(|(what, e)| format!("{what}: {e}"))
}

/// `union bpf_attr` for BPF_MAP_CREATE (its first five fields) and for element updates.
#[repr(C)]
#[derive(Default)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_F_NO_PREALLOC: u32 = 1;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for `cmd`; its pointers (if any) are
    // valid for the sizes the map was created with.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as u32) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The memlock of a per-CPU hash shaped like the old NAT maps, empty and with `n` entries.
fn per_cpu_baseline(n: u32) -> Result<(u64, u64), String> {
    let mut create = CreateAttr {
        map_type: BPF_MAP_TYPE_PERCPU_HASH,
        key_size: size_of::<EndpointKey>() as u32,
        value_size: size_of::<NatEntry>() as u32,
        max_entries: MAX_FORWARDS,
        map_flags: BPF_F_NO_PREALLOC,
    };
    let fd =
        bpf(BPF_MAP_CREATE, &mut create).map_err(|e| format!("creating a per-CPU hash: {e}"))?;
    // SAFETY: the kernel just returned this descriptor, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let empty = memlock(fd.as_raw_fd())?;
    let values = vec![NatEntry::new([0; 4], [0; 2]); possible_cpus()?];
    for i in 0..n {
        let key = EndpointKey::new(i.to_be_bytes(), [0, 80], pf_common::IPPROTO_TCP);
        let mut update = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: &key as *const EndpointKey as u64,
            value: values.as_ptr() as u64,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut update)
            .map_err(|e| format!("filling the per-CPU hash (entry {i}): {e}"))?;
    }
    Ok((empty, memlock(fd.as_raw_fd())?))
}

pub fn run(profile: &Profile) -> Result<Vec<Value>, String> {
    let cpus = possible_cpus()?;
    println!();
    println!("kernel memory per reserved port (memlock from fdinfo, {cpus} possible CPUs)");
    println!(
        "{:>13} {:>9} {:>12} {:>11} {:>15} {:>20} {:>16} {:>14}",
        "reservations",
        "all MB",
        "pf empty MB",
        "pf full MB",
        "pf B/port/dir",
        "at 1M, fixed incl.",
        "per-CPU B/entry",
        "per-CPU vs pf"
    );
    let mut results = Vec::new();
    for &n in profile.control_sizes {
        let scratch = ScratchDir::claim(format!("/sys/fs/bpf/pf-bench-mem-{}", std::process::id()));
        let dir = PinDir::new(scratch.path());
        let mut state = State::open_for_write(&dir).map_err(|e| e.to_string())?;
        let measure = || -> Result<Vec<u64>, String> {
            MEASURED
                .iter()
                .map(|m| pinned_memlock(scratch.path(), m))
                .collect()
        };
        let empty = measure()?;
        // Every map of pf, empty: what pf costs before its first reservation.
        let all_empty: u64 = map_names::ALL
            .iter()
            .map(|m| pinned_memlock(scratch.path(), m))
            .sum::<Result<u64, String>>()?;
        let reservations: Vec<_> = (0..n).map(filler).collect();
        state
            .reserve_all(&reservations)
            .map_err(|e| format!("reserving {n}: {e}"))?;
        let full = measure()?;
        drop(state);
        let grown: u64 = full
            .iter()
            .zip(&empty)
            .map(|(f, e)| f.saturating_sub(*e))
            .sum();
        if grown == 0 {
            // Before Linux 6.4 fdinfo's memlock is `bpf_map_memory_footprint`, a figure made
            // from the map's sizes alone, whatever it holds: nothing to measure here.
            println!(
                "{n:>13}  this kernel's memlock does not follow what a map holds (before 6.4): not measured"
            );
            results.push(json!({
                "reservations": n,
                "possible_cpus": cpus,
                "accounted": false,
            }));
            continue;
        }
        // Each reservation is one port of one protocol, forwarded in two directions.
        let per_port_per_direction = grown as f64 / f64::from(n) / 2.0;
        // Everything included at the sized maximum: the empty maps' buckets and locks shared
        // over every port of a full map.
        let fixed_share = empty.iter().sum::<u64>() as f64 / f64::from(MAX_FORWARDS) / 2.0;
        let at_capacity = per_port_per_direction + fixed_share;
        let (pc_empty, pc_full) = per_cpu_baseline(n)?;
        let per_cpu_entry = (pc_full - pc_empty) as f64 / f64::from(n);
        // One NAT entry per direction in the per-CPU layout, plus the same record share.
        let record_share = (full[2] - empty[2]) as f64 / f64::from(n) / 2.0;
        let per_cpu_per_direction = per_cpu_entry + record_share;
        let mb = |v: &[u64]| v.iter().sum::<u64>() as f64 / 1e6;
        println!(
            "{n:>13} {:>9.1} {:>12.1} {:>11.1} {:>15.1} {:>20.1} {:>16.1} {:>13.2}x",
            all_empty as f64 / 1e6,
            mb(&empty),
            mb(&full),
            per_port_per_direction,
            at_capacity,
            per_cpu_entry,
            per_cpu_per_direction / per_port_per_direction
        );
        results.push(json!({
            "reservations": n,
            "possible_cpus": cpus,
            "accounted": true,
            "maps": MEASURED,
            "empty_memlock_bytes": empty,
            "all_maps_empty_memlock_bytes": all_empty,
            "full_memlock_bytes": full,
            "bytes_per_port_per_direction": per_port_per_direction,
            "bytes_per_port_per_direction_at_capacity": at_capacity,
            "per_cpu_hash_bytes_per_entry": per_cpu_entry,
            "per_cpu_hash_empty_bytes": pc_empty,
            "per_cpu_layout_bytes_per_port_per_direction": per_cpu_per_direction,
        }));
    }
    Ok(results)
}
