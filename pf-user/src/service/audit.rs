//! The audit log: one JSON line per change asked of the service, or made by it (expiry):
//! time, who asked (uid and pid from the socket's peer credentials), action, result and the
//! reservation. Never any traffic content.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::Path,
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

pub struct Audit {
    file: File,
}

impl Audit {
    /// Opens `path` for appending (mode 0640 under the service's umask: 0600), creating it and
    /// its directory.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)?;
        Ok(Self { file })
    }

    /// Appends one line. A failed write is reported on stderr: the change it records is done
    /// already, and refusing it now would not undo it.
    pub fn write(
        &mut self,
        caller: Caller,
        action: &str,
        result: &str,
        reservation: &Value,
        error: Option<&str>,
    ) {
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
        // One write(2) per line on an O_APPEND file: lines never interleave.
        if let Err(e) = self.file.write_all(text.as_bytes()) {
            eprintln!("pf serve: writing the audit log: {e}");
        }
    }
}
