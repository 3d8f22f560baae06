//! A real PostgreSQL server of a test's own: Debian's `postgresql` binaries, a data directory
//! made for it with `initdb`, listening on a free loopback port and a socket in that
//! directory. Stopped (by pid) and removed on drop; if the test process dies first, the
//! server is told to stop by the kernel (its parent-death signal), and the next start removes
//! what was left.

use std::{
    net::{Ipv4Addr, TcpListener},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// How long a new server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Where servers' directories go: `PREFIX<pid>-<n>`.
const PREFIX: &str = "pf-test-postgres-";

/// Why no server could be started.
#[derive(Debug, thiserror::Error)]
#[error("starting a test PostgreSQL server: {0}")]
pub struct StartError(String);

/// A running server; the superuser is `pf`, trusted on its socket and TCP address.
pub struct TempPostgres {
    dir: PathBuf,
    port: u16,
    /// `None` once stopped.
    server: Option<Child>,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    /// The address it listens on for TCP: loopback, or an address of `netns`.
    listen: Ipv4Addr,
    /// The network namespace it runs in (a `/run/netns` file, held open), if not the test's.
    netns: Option<std::fs::File>,
}

/// The newest installed PostgreSQL's binaries (Debian: /usr/lib/postgresql/VERSION/bin).
fn bin_dir() -> Result<PathBuf, StartError> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            StartError(format!(
                "no PostgreSQL server is installed (/usr/lib/postgresql: {e}); `cargo xtask test` installs Debian's postgresql"
            ))
        })?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| StartError("no PostgreSQL server binaries under /usr/lib/postgresql".into()))
}

/// The server refuses to run as root: as root, it runs as Debian's `postgres` user.
fn server_user() -> Result<Option<(u32, u32)>, StartError> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| StartError(format!("reading /etc/passwd: {e}")))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"postgres") && f.len() > 3)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .map(Some)
        .ok_or_else(|| {
            StartError(
                "running as root, and there is no `postgres` user to run the server as".into(),
            )
        })
}

/// Removes the directories of servers whose test process is gone.
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn free_port() -> Result<u16, StartError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| StartError(format!("finding a free port: {e}")))
}

impl TempPostgres {
    /// Makes a data directory and starts a server on it, on loopback in the test's own
    /// network namespace.
    pub fn start() -> Result<Self, StartError> {
        Self::start_with(None, Ipv4Addr::LOCALHOST)
    }

    /// A server inside network namespace `netns` (its `/run/netns` path), listening on
    /// `listen`, an address of that namespace's: reached over TCP only from namespaces
    /// routed to it, so a test can cut the way (its socket file still reaches it from here).
    pub fn start_in(netns: &str, listen: Ipv4Addr) -> Result<Self, StartError> {
        let file = std::fs::File::open(netns)
            .map_err(|e| StartError(format!("opening the network namespace {netns}: {e}")))?;
        Self::start_with(Some(file), listen)
    }

    fn start_with(netns: Option<std::fs::File>, listen: Ipv4Addr) -> Result<Self, StartError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_leftovers();
        let bin = bin_dir()?;
        let user = server_user()?;
        let dir = std::env::temp_dir().join(format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| StartError(format!("{}: {e}", dir.display())))?;
        let mut server = Self {
            dir,
            port: 0,
            server: None,
            bin,
            user,
            listen,
            netns,
        };
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&server.dir, Some(uid), Some(gid)).map_err(|e| {
                StartError(format!("giving {} to postgres: {e}", server.dir.display()))
            })?;
        }
        let out = server
            .command("initdb")
            .args([
                "-D",
                "data",
                "-U",
                "pf",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .output()
            .map_err(|e| StartError(format!("running initdb: {e}")))?;
        if !out.status.success() {
            return Err(StartError(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        // Trusted from any address it can be reached from: only the test's own namespaces
        // reach a server in one of them, and loopback is the test process's.
        let hba = server.dir.join("data/pg_hba.conf");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&hba)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"host all all 0.0.0.0/0 trust\n"))
            .map_err(|e| StartError(format!("{}: {e}", hba.display())))?;
        server.run()?;
        Ok(server)
    }

    /// A command of the server's, run in its directory, as its user.
    fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(name));
        cmd.current_dir(&self.dir).env("LC_ALL", "C.UTF-8");
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid).env("HOME", &self.dir);
        }
        cmd
    }

    /// Starts the server (again, after [`stop`](Self::stop)) and waits until it answers. A
    /// restart keeps its port when it can, as a real database's address stays.
    pub fn run(&mut self) -> Result<(), StartError> {
        if self.server.is_some() {
            return Ok(());
        }
        let mut last = String::new();
        for _ in 0..3 {
            if self.port == 0 || !last.is_empty() {
                self.port = free_port()?;
            }
            let log = std::fs::File::create(self.dir.join("server.log"))
                .map_err(|e| StartError(format!("server.log: {e}")))?;
            if let Some((uid, gid)) = self.user {
                let _ = std::os::unix::fs::chown(self.dir.join("server.log"), Some(uid), Some(gid));
            }
            // As its user, but switched to it below, after entering the namespace (which needs
            // root's privilege).
            let mut cmd = Command::new(self.bin.join("postgres"));
            cmd.current_dir(&self.dir)
                .env("LC_ALL", "C.UTF-8")
                .env("HOME", &self.dir);
            cmd.args(["-D", "data", "-p", &self.port.to_string(), "-k"])
                .arg(&self.dir)
                .arg("-c")
                .arg(format!("listen_addresses={}", self.listen))
                .args(["-c", "fsync=off"])
                .args([
                    "-c",
                    "max_connections=200",
                    "-c",
                    "log_min_messages=warning",
                ])
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| StartError(e.to_string()))?)
                .stderr(log);
            let netns = self.netns.as_ref().map(|f| f.as_raw_fd());
            let user = self.user;
            // SAFETY: only async-signal-safe calls (setns, setgroups, setgid, setuid, prctl)
            // between fork and exec. The parent-death signal is set after the uid change
            // (which clears it): if the test process dies, the server gets a fast shutdown.
            unsafe {
                cmd.pre_exec(move || {
                    let fail = || Err(std::io::Error::last_os_error());
                    if let Some(fd) = netns
                        && libc::setns(fd, libc::CLONE_NEWNET) != 0
                    {
                        return fail();
                    }
                    if let Some((uid, gid)) = user
                        && (libc::setgroups(0, std::ptr::null()) != 0
                            || libc::setgid(gid) != 0
                            || libc::setuid(uid) != 0)
                    {
                        return fail();
                    }
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
                    Ok(())
                });
            }
            let child = cmd
                .spawn()
                .map_err(|e| StartError(format!("running postgres: {e}")))?;
            self.server = Some(child);
            match self.wait_ready() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = e;
                    self.stop();
                }
            }
        }
        Err(StartError(last))
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .server
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                return Err(format!("postgres exited ({status}): {}", log.trim()));
            }
            if postgres::Config::new()
                .host_path(&self.dir)
                .port(self.port)
                .user("pf")
                .dbname("postgres")
                .connect_timeout(Duration::from_secs(1))
                .connect(postgres::NoTls)
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("postgres did not answer within {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (a fast shutdown, then a kill after 10 s), keeping its data.
    pub fn stop(&mut self) {
        let Some(mut child) = self.server.take() else {
            return;
        };
        // SAFETY: signalling our own child by its pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Makes database `name` and gives its URL (user `pf`, no password).
    pub fn database(&self, name: &str) -> Result<String, StartError> {
        let mut client = postgres::Config::new()
            .host_path(&self.dir)
            .port(self.port)
            .user("pf")
            .dbname("postgres")
            .connect(postgres::NoTls)
            .map_err(|e| StartError(format!("connecting: {e}")))?;
        // One at a time: CREATE DATABASE copies template1, which must have no other user.
        static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = CREATING.lock().unwrap_or_else(|e| e.into_inner());
        for statement in [
            format!("DROP DATABASE IF EXISTS \"{name}\""),
            format!("CREATE DATABASE \"{name}\""),
        ] {
            client.batch_execute(&statement).map_err(|e| {
                let why = e
                    .as_db_error()
                    .map_or(e.to_string(), |d| d.message().to_string());
                StartError(format!("{statement}: {why}"))
            })?;
        }
        Ok(self.url(name))
    }

    /// `database`'s URL over TCP (loopback in the test process's network namespace, or the
    /// address given [`start_in`](Self::start_in)).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://pf@{}:{}/{database}", self.listen, self.port)
    }

    /// `database`'s URL over the server's Unix socket, which a `pf serve` in any network
    /// namespace reaches (a socket is a file).
    pub fn socket_url(&self, database: &str) -> String {
        let dir = self.dir.display().to_string().replace('/', "%2F");
        format!("postgres://pf@{dir}:{}/{database}", self.port)
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One server for a whole test process (the store's tests), started on first use. Started
/// from a thread that lives as long as the process, so its parent-death signal comes only when
/// the process ends.
pub fn shared() -> Result<&'static TempPostgres, StartError> {
    static SHARED: std::sync::OnceLock<Result<TempPostgres, String>> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(TempPostgres::start().map_err(|e| e.to_string()));
                loop {
                    std::thread::park();
                }
            });
            rx.recv().unwrap_or_else(|e| Err(e.to_string()))
        })
        .as_ref()
        .map_err(|e| StartError(e.clone()))
}
