//! The audit log: one JSON line per change asked of the service, or made by it (expiry):
//! time, who asked (uid and pid from the socket's peer credentials), action, result and the
//! reservation. Never any traffic content.
//!
//! Auditing fails closed: before every change the service asks [`Audit::ready`], which makes
//! sure the room for its line is allocated on disk already (`fallocate` beyond the end of the
//! file, so the append after the change cannot meet a full disk), and refuses the change if
//! it cannot. A line is written whole or not at all: a short write is cut off again.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde_json::{Value, json};

/// Who asked: the peer of the API connection, or the service itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
}

impl Caller {
    /// The service acting on its own (expiry).
    pub const SERVICE: Caller = Caller {
        uid: None,
        pid: None,
    };
}

/// Room kept allocated past the end of the log. A line is a few hundred bytes, and at most
/// a few KiB: a request's texts are cut to 256 characters, a record's note is at most 1,024,
/// and a release by owner writes one line per release. 1 MiB holds hundreds of the largest.
const HEADROOM: i64 = 1024 * 1024;

pub struct Audit {
    path: PathBuf,
    file: File,
}

fn open_file(path: &Path) -> io::Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

impl Audit {
    /// Opens `path` for appending (mode 0640 under the service's umask: 0600), creating it and
    /// its directory.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            file: open_file(path)?,
        })
    }

    /// Opens the log's path again (after logrotate moved the file away): SIGHUP.
    pub fn reopen(&mut self) -> io::Result<()> {
        self.file = open_file(&self.path)?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the next line can be written: the file takes writes and the room for it is
    /// allocated. A change is made only after this succeeds.
    pub fn ready(&mut self) -> io::Result<()> {
        let len = self.file.metadata()?.len() as i64;
        // SAFETY: fallocate on an fd we own; KEEP_SIZE allocates without changing the length.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                len,
                HEADROOM,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
        // A filesystem without fallocate: the free space must hold the headroom, and a
        // write of nothing still finds an immutable or read-only file.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid fd and out-pointer.
        if unsafe { libc::fstatvfs(self.file.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if (st.f_bavail as i64).saturating_mul(st.f_frsize as i64) < HEADROOM {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }

    /// Appends one line, whole or not at all. An error says the line is not in the log.
    pub fn write(
        &mut self,
        caller: Caller,
        action: &str,
        result: &str,
        reservation: &Value,
        error: Option<&str>,
    ) -> io::Result<()> {
        let mut line = json!({
            "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "uid": caller.uid,
            "pid": caller.pid,
            "actor": if caller == Caller::SERVICE { "pf serve" } else { "api" },
            "action": action,
            "result": result,
            "reservation": reservation,
        });
        if let Some(error) = error {
            line["error"] = json!(error);
        }
        let mut text = line.to_string();
        text.push('\n');
        let before = self.file.metadata()?.len();
        // One write(2) per line on an O_APPEND file: lines never interleave. The service is
        // the log's one writer, so a short write is this line's, and is cut off again.
        match self.file.write(text.as_bytes()) {
            Ok(n) if n == text.len() => Ok(()),
            Ok(_) => {
                let _ = self.file.set_len(before);
                Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "short write (the line was removed again)",
                ))
            }
            Err(e) => {
                let _ = self.file.set_len(before);
                Err(e)
            }
        }
    }
}
