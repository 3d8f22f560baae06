//! What the kernel says about pf's pinned links and the programs behind them: which device a
//! link is attached to (ifindex 0 once the kernel detached it, as when its device was
//! removed) and which maps a program uses. pf's attachment state comes from these answers,
//! never from the pins alone: a pin can outlive what it pinned.
//!
//! aya 0.14's `LinkInfo` does not expose the XDP and TCX links' ifindex, so the link query is
//! the raw `BPF_OBJ_GET_INFO_BY_FD`.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `struct bpf_link_info`'s head: type, id, prog_id, then (8-aligned, at offset 16) a union
/// whose XDP and TCX members both start with the ifindex.
const LINK_TYPE_OFFSET: usize = 0;
const LINK_PROG_ID_OFFSET: usize = 8;
const LINK_IFINDEX_OFFSET: usize = 16;
/// Larger than any kernel's `bpf_link_info`: the kernel copies what it has and checks that
/// the tail it does not know is zero.
const LINK_INFO_LEN: usize = 256;

/// `BPF_LINK_TYPE_XDP` and `BPF_LINK_TYPE_TCX`.
pub const LINK_TYPE_XDP: u32 = 6;
pub const LINK_TYPE_TCX: u32 = 11;

/// A pinned link as the kernel sees it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub link_type: u32,
    pub prog_id: u32,
    /// The device it is attached to; 0 when the kernel has detached it.
    pub ifindex: u32,
}

fn read_u32(buf: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(buf[offset..offset + 4].try_into().expect("4 bytes"))
}

fn bpf(cmd: libc::c_long, attr: *mut u8, size: usize) -> io::Result<libc::c_long> {
    // SAFETY: every caller passes a pointer to a bpf_attr prefix of `size` bytes for `cmd`,
    // whose pointers (if any) point to live buffers of the lengths it gives.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Opens the object pinned at `pin` (BPF_OBJ_GET).
fn open_pin(pin: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // union bpf_attr's obj member: pathname (a pointer as u64), bpf_fd, file_flags.
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(
        BPF_OBJ_GET,
        (&mut attr as *mut ObjAttr).cast(),
        size_of::<ObjAttr>(),
    )?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_OBJ_GET_INFO_BY_FD: the kernel's info struct for the object `fd`, into `info` (which
/// may carry pointers and counts the kernel fills in, as a program's map ids).
fn object_info(fd: i32, info: &mut [u8]) -> io::Result<()> {
    // union bpf_attr's info member: bpf_fd, info_len, info (a pointer as u64).
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: fd as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        (&mut attr as *mut InfoAttr).cast(),
        size_of::<InfoAttr>(),
    )
    .map(drop)
}

/// The state of the link pinned at `pin`.
pub fn link_state(pin: &Path) -> io::Result<LinkState> {
    let link = open_pin(pin)?;
    let mut info = [0u8; LINK_INFO_LEN];
    object_info(link.as_raw_fd(), &mut info)?;
    Ok(LinkState {
        link_type: read_u32(&info, LINK_TYPE_OFFSET),
        prog_id: read_u32(&info, LINK_PROG_ID_OFFSET),
        ifindex: read_u32(&info, LINK_IFINDEX_OFFSET),
    })
}

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
/// `struct bpf_prog_info`: nr_map_ids at offset 52, the map_ids pointer at 56.
const PROG_NR_MAP_IDS_OFFSET: usize = 52;
const PROG_MAP_IDS_OFFSET: usize = 56;
const PROG_INFO_LEN: usize = 256;

/// A descriptor of the loaded program `prog_id` (BPF_PROG_GET_FD_BY_ID); `None` if no such
/// program is loaded.
fn program_fd(prog_id: u32) -> io::Result<Option<OwnedFd>> {
    // union bpf_attr's get-by-id member: the id, next_id, open_flags.
    #[repr(C)]
    struct IdAttr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = IdAttr {
        id: prog_id,
        next_id: 0,
        open_flags: 0,
    };
    match bpf(
        BPF_PROG_GET_FD_BY_ID,
        (&mut attr as *mut IdAttr).cast(),
        size_of::<IdAttr>(),
    ) {
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The ids of the maps program `prog_id` uses; `None` if no such program is loaded. Asked of
/// that one program by id, so programs others load and unload meanwhile change nothing.
pub fn program_map_ids(prog_id: u32) -> io::Result<Option<Vec<u32>>> {
    let Some(prog) = program_fd(prog_id)? else {
        return Ok(None);
    };
    let query = |info: &mut [u8; PROG_INFO_LEN]| object_info(prog.as_raw_fd(), info);
    // First how many, then the ids into a buffer of that size.
    let mut info = [0u8; PROG_INFO_LEN];
    query(&mut info)?;
    let count = read_u32(&info, PROG_NR_MAP_IDS_OFFSET) as usize;
    let mut ids = vec![0u32; count];
    let mut info = [0u8; PROG_INFO_LEN];
    info[PROG_NR_MAP_IDS_OFFSET..PROG_NR_MAP_IDS_OFFSET + 4]
        .copy_from_slice(&(count as u32).to_ne_bytes());
    info[PROG_MAP_IDS_OFFSET..PROG_MAP_IDS_OFFSET + 8]
        .copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    query(&mut info)?;
    ids.truncate((read_u32(&info, PROG_NR_MAP_IDS_OFFSET) as usize).min(count));
    Ok(Some(ids))
}

/// `struct bpf_prog_info`'s id, after its type.
const PROG_ID_OFFSET: usize = 4;

/// The id of the program pinned at `pin` (pf pins its egress program where the egress hook is
/// a netlink filter, which cannot be pinned itself).
pub fn pinned_program_id(pin: &Path) -> io::Result<u32> {
    let prog = open_pin(pin)?;
    let mut info = [0u8; PROG_INFO_LEN];
    object_info(prog.as_raw_fd(), &mut info)?;
    Ok(read_u32(&info, PROG_ID_OFFSET))
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Runs `frame` once through the loaded program `prog_id` with BPF_PROG_TEST_RUN: its verdict
/// and the frame as it left. `None` if no such program is loaded. The real program, its real
/// maps: what it counts (its outcome counters, a reservation's traffic) counts this frame too.
pub fn test_run(prog_id: u32, frame: &[u8]) -> io::Result<Option<(u32, Vec<u8>)>> {
    let Some(prog) = program_fd(prog_id)? else {
        return Ok(None);
    };
    // union bpf_attr's test member, up to the fields pf uses (the kernel zero-checks none past
    // the size given).
    #[repr(C)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
    }
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestAttr {
        prog_fd: prog.as_raw_fd() as u32,
        retval: 0,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        duration: 0,
    };
    bpf(
        BPF_PROG_TEST_RUN,
        (&mut attr as *mut TestAttr).cast(),
        size_of::<TestAttr>(),
    )?;
    out.truncate((attr.data_size_out as usize).min(out.len()));
    Ok(Some((attr.retval, out)))
}
