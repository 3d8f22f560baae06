//! pf's directory on the BPF filesystem, where maps and links are pinned.

use std::{
    ffi::CString,
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
};

use crate::kernel::error::PfError;

/// Default pin directory; `--bpffs` and `PF_BPFFS` override it.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/pf";
/// Where the kernel offers bpffs to be mounted (exists when the kernel has BPF syscall support).
const BPFFS_MOUNT_POINT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A pin directory: maps directly inside, links under `links/`.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The directory holding `iface`'s link pins. bpffs refuses names with a '.', which interface
    /// names may contain (`eth0.100`), so '.' is written `%2E` (and '%' itself `%25`).
    pub fn iface_links(&self, iface: &str) -> PathBuf {
        self.links().join(encode_iface(iface))
    }

    /// The pin of `iface`'s link for `hook` ("xdp" or "tc").
    pub fn link(&self, iface: &str, hook: &str) -> PathBuf {
        self.iface_links(iface).join(hook)
    }

    /// Where the trigger program's pins are, one directory per interface: apart from
    /// `links/`, since an interface may have both (an Ethernet tunnel side with the reply fast
    /// path) or only this one (a WireGuard interface).
    pub fn triggers(&self) -> PathBuf {
        self.root.join("triggers")
    }

    /// `iface`'s trigger pin directory.
    pub fn trigger_links(&self, iface: &str) -> PathBuf {
        self.triggers().join(encode_iface(iface))
    }

    /// Interfaces with a trigger pin directory, decoded.
    pub fn triggered_interfaces(&self) -> Vec<String> {
        interfaces_in(&self.triggers())
    }

    /// Interfaces with a link directory, decoded.
    pub fn linked_interfaces(&self) -> Vec<String> {
        interfaces_in(&self.links())
    }

    pub fn exists(&self) -> bool {
        self.root.is_dir()
    }

    /// Makes sure the directory exists on a bpffs, mounting bpffs at /sys/fs/bpf if that is where
    /// it belongs and nothing is mounted there yet (a fresh machine).
    pub fn prepare(&self) -> Result<(), PfError> {
        let mut existing = self.root.as_path();
        while !existing.exists() {
            existing = existing.parent().unwrap_or(Path::new("/"));
        }
        let on_bpffs = is_bpffs(existing)
            .map_err(|e| PfError::io(format!("statfs {}", existing.display()), e))?;
        if !on_bpffs {
            let mount_point = Path::new(BPFFS_MOUNT_POINT);
            if !self.root.starts_with(mount_point) {
                return Err(PfError::NotBpffs {
                    path: existing.to_path_buf(),
                });
            }
            if !mount_point.is_dir() {
                return Err(PfError::NoBpfSupport(format!(
                    "{BPFFS_MOUNT_POINT} does not exist"
                )));
            }
            mount_bpffs(mount_point)?;
        }
        fs::create_dir_all(self.links())
            .map_err(|e| PfError::io(format!("creating {}", self.links().display()), e))
    }

    /// Takes the service lock of this directory, held by one `pf serve` for its whole life: a
    /// second service on the same pins would "repair" the first one's reservations away. A
    /// directory (bpffs holds no plain files) that only `pf serve` locks, so the commands'
    /// own short locks on the root are not in its way. `None` if another process holds it.
    pub fn service_lock(&self) -> Result<Option<File>, PfError> {
        let path = self.root.join("service");
        match fs::create_dir(&path) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(PfError::io(format!("creating {}", path.display()), e));
            }
            _ => {}
        }
        let dir =
            File::open(&path).map_err(|e| PfError::io(format!("opening {}", path.display()), e))?;
        // SAFETY: a valid open file descriptor.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(None);
            }
            return Err(PfError::io(format!("locking {}", path.display()), e));
        }
        Ok(Some(dir))
    }

    /// Takes pf's lock on this directory: exclusive for changes, shared for reads, so two `pf`
    /// commands never interleave their map updates. Held until the returned file is dropped.
    pub fn lock(&self, exclusive: bool) -> Result<File, PfError> {
        let dir = File::open(&self.root)
            .map_err(|e| PfError::io(format!("opening {}", self.root.display()), e))?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: a valid open file descriptor.
        if unsafe { libc::flock(dir.as_raw_fd(), op) } != 0 {
            return Err(PfError::io(
                format!("locking {}", self.root.display()),
                io::Error::last_os_error(),
            ));
        }
        Ok(dir)
    }
}

fn mount_bpffs(at: &Path) -> Result<(), PfError> {
    let target = CString::new(at.as_os_str().as_bytes()).expect("no NUL in mount point");
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(PfError::MountBpffs {
            path: at.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// bpffs refuses dots in names: an interface name is written with `%2E` (and `%` as `%25`).
fn encode_iface(iface: &str) -> String {
    iface.replace('%', "%25").replace('.', "%2E")
}

/// The interfaces named by the entries of `dir`, decoded and sorted.
fn interfaces_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .map(|n| n.replace("%2E", ".").replace("%25", "%"))
        .collect();
    names.sort();
    names
}
