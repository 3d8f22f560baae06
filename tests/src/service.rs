//! A `pf serve` owned by a test or the demo: its config, store, audit log and socket in a
//! scratch directory of its own, the process stopped (SIGTERM, then SIGKILL) on drop.

use std::{
    io,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::ScratchDir;

/// How long a starting service may take to open its socket (it reconciles first).
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a SIGTERM may take before SIGKILL follows.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The policy tests use unless they need their own: the topology's public IP and tunnel
/// network, every port, no quota to speak of, no listening-port rule (the host's own sockets
/// are not the test's business; a test of that rule sets its own policy).
pub const TEST_POLICY: &str = r#"
[policy]
public_ips = ["198.51.100.1"]
target_networks = ["10.8.0.0/16"]
port_pool = ["1-65535"]
ports_per_owner = 1000000
max_range_ports = 4096
forbid_listening_ports = false
"#;

pub struct Service {
    pf_bin: PathBuf,
    /// The network namespace `pf serve` runs in (its /run/netns path), if not the host's.
    netns: Option<String>,
    files: ScratchDir,
    child: Option<Child>,
}

impl Service {
    /// Writes a config with `bpffs` and `policy` (TOML: `[policy]` and any `[[interfaces]]`)
    /// into `files`, and starts `pf serve` on it.
    pub fn start(
        pf_bin: &Path,
        files: ScratchDir,
        bpffs: &Path,
        netns: Option<String>,
        policy: &str,
    ) -> io::Result<Self> {
        let dir = files.path();
        let config = format!(
            "[service]\nsocket = \"{}\"\ndatabase = \"{}\"\naudit_log = \"{}\"\nbpffs = \"{}\"\n{policy}",
            dir.join("pf.sock").display(),
            dir.join("pf.db").display(),
            dir.join("audit.jsonl").display(),
            bpffs.display(),
        );
        Self::start_in(pf_bin, files, netns, &config)
    }

    /// Starts `pf serve` on a whole config of the caller's, whose socket must be
    /// `files/pf.sock`.
    pub fn start_with_config(pf_bin: &Path, files: ScratchDir, config: &str) -> io::Result<Self> {
        Self::start_in(pf_bin, files, None, config)
    }

    fn start_in(
        pf_bin: &Path,
        files: ScratchDir,
        netns: Option<String>,
        config: &str,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(files.path())?;
        std::fs::write(files.path().join("pf.toml"), config)?;
        let mut service = Self {
            pf_bin: pf_bin.to_path_buf(),
            netns,
            files,
            child: None,
        };
        service.spawn()?;
        Ok(service)
    }

    pub fn socket(&self) -> PathBuf {
        self.files.path().join("pf.sock")
    }

    pub fn config(&self) -> PathBuf {
        self.files.path().join("pf.toml")
    }

    pub fn database(&self) -> PathBuf {
        self.files.path().join("pf.db")
    }

    pub fn audit_log(&self) -> PathBuf {
        self.files.path().join("audit.jsonl")
    }

    /// What the service printed so far (all its runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.files.path().join("serve.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The command that starts the service: `nsenter --net` keeps the host's bpffs.
    fn command(&self) -> Command {
        let mut c = match &self.netns {
            Some(path) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={path}")).arg(&self.pf_bin);
                c
            }
            None => Command::new(&self.pf_bin),
        };
        c.arg("serve").arg("--config").arg(self.config());
        c
    }

    /// Starts the service and waits until its socket answers.
    pub fn spawn(&mut self) -> io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.files.path().join("serve.log"))?;
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        let socket = self.socket();
        // The socket file may be left by an earlier run that was killed: a connection proves
        // the new one is listening.
        while UnixStream::connect(&socket).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(io::Error::other(format!(
                    "pf serve exited with {status}: {}",
                    self.log()
                )));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(io::Error::other(format!(
                    "pf serve did not open {} within {START_TIMEOUT:?}: {}",
                    socket.display(),
                    self.log()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGTERM and wait for the exit (SIGKILL after STOP_TIMEOUT); the exit status, if it ran.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: the service gets no chance to tidy up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}
