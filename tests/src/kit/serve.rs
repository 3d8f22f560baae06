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

use crate::kit::ScratchDir;

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

/// A config whose socket is `files/pf.sock`, with the store, audit log and pin directory
/// where the caller says, and `policy` (TOML: `[policy]` and any `[[interfaces]]`) after.
pub fn config_text(
    files: &Path,
    bpffs: &Path,
    database: &Path,
    audit_log: &Path,
    policy: &str,
) -> String {
    format!(
        "[service]\nsocket = \"{}\"\ndatabase = \"{}\"\naudit_log = \"{}\"\nbpffs = \"{}\"\n{policy}",
        files.join("pf.sock").display(),
        database.display(),
        audit_log.display(),
        bpffs.display(),
    )
}

pub struct Service {
    pf_bin: PathBuf,
    /// The network namespace `pf serve` runs in (its /run/netns path), if not the host's.
    netns: Option<String>,
    files: ScratchDir,
    child: Option<Child>,
    /// A command `pf serve` runs under (`prlimit --nofile=...`), for the next spawn.
    pub wrapper: Vec<String>,
    /// Arguments after `serve --config PATH` (`--force-reconcile`), for the next spawn.
    pub args: Vec<String>,
    /// Environment for the next spawn (libfaketime's).
    pub env: Vec<(String, String)>,
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
        let mut service = Self::prepare(pf_bin, files, bpffs, netns, policy)?;
        service.spawn()?;
        Ok(service)
    }

    /// Starts `pf serve` on a whole config of the caller's, whose socket must be
    /// `files/pf.sock`.
    pub fn start_with_config(pf_bin: &Path, files: ScratchDir, config: &str) -> io::Result<Self> {
        Self::start_in(pf_bin, files, None, config)
    }

    /// Writes the config like [`Service::start`] but starts nothing: set `wrapper`, `args`
    /// or `env` first, then [`Service::spawn`].
    pub fn prepare(
        pf_bin: &Path,
        files: ScratchDir,
        bpffs: &Path,
        netns: Option<String>,
        policy: &str,
    ) -> io::Result<Self> {
        let dir = files.path();
        let config = config_text(
            dir,
            bpffs,
            &dir.join("pf.db"),
            &dir.join("audit.jsonl"),
            policy,
        );
        Self::prepare_with_config(pf_bin, files, netns, &config)
    }

    /// Like [`Service::prepare`], with a whole config of the caller's (socket `files/pf.sock`).
    pub fn prepare_with_config(
        pf_bin: &Path,
        files: ScratchDir,
        netns: Option<String>,
        config: &str,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(files.path())?;
        std::fs::write(files.path().join("pf.toml"), config)?;
        Ok(Self {
            pf_bin: pf_bin.to_path_buf(),
            netns,
            files,
            child: None,
            wrapper: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
        })
    }

    fn start_in(
        pf_bin: &Path,
        files: ScratchDir,
        netns: Option<String>,
        config: &str,
    ) -> io::Result<Self> {
        let mut service = Self::prepare_with_config(pf_bin, files, netns, config)?;
        service.spawn()?;
        Ok(service)
    }

    /// Runs `pf serve` to its exit, expecting it to refuse to start: its status and what it
    /// printed (this run only).
    pub fn run_to_exit(&mut self) -> io::Result<(std::process::ExitStatus, String)> {
        let before = self.log().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.files.path().join("serve.log"))?;
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, self.log()[before..].to_string()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::other(format!(
                    "pf serve did not exit within {START_TIMEOUT:?}: {}",
                    self.log()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
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
        let mut words: Vec<String> = Vec::new();
        if let Some(path) = &self.netns {
            words.extend(["nsenter".to_string(), format!("--net={path}")]);
        }
        words.extend(self.wrapper.iter().cloned());
        words.push(self.pf_bin.display().to_string());
        let mut c = Command::new(&words[0]);
        c.args(&words[1..])
            .arg("serve")
            .arg("--config")
            .arg(self.config())
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
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
