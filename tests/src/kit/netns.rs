//! A network namespace owned by a test: created on `new`, deleted on drop with every process
//! the test started inside it.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

/// Runs `cmd` and returns its output; an error names the command and what it printed.
pub fn run(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(out)
}

/// `run` for a command line given as words.
pub fn sh(words: &[&str]) -> io::Result<Output> {
    run(Command::new(words[0]).args(&words[1..]))
}

pub struct Netns {
    name: String,
    children: Mutex<Vec<Child>>,
}

impl Netns {
    pub fn new(name: &str) -> io::Result<Self> {
        // A namespace left by a crashed earlier run of the same name would make `add` fail.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        sh(&["ip", "netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
            children: Mutex::new(Vec::new()),
        };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A command run inside the namespace with `ip netns exec` (which also gives it a fresh
    /// /sys: fine for tools, not for anything that needs the host's /sys/fs/bpf).
    pub fn cmd(&self, words: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(words);
        c
    }

    /// A command run with only the network namespace entered (`nsenter --net`), keeping the
    /// host's mounts, so a `pf` run this way sees the same pinned state.
    pub fn nsenter(&self, words: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path())).args(words);
        c
    }

    /// Runs a command inside the namespace; it must succeed.
    pub fn run(&self, words: &[&str]) -> io::Result<Output> {
        run(&mut self.cmd(words))
    }

    /// Starts a long-running command inside the namespace; it is killed when the namespace is
    /// dropped.
    pub fn spawn(&self, words: &[&str]) -> io::Result<()> {
        let child = self
            .cmd(words)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.children.lock().unwrap().push(child);
        Ok(())
    }

    /// `curl URL` from inside the namespace: the body of a 2xx answer, or what went wrong.
    pub fn curl(&self, url: &str) -> Result<String, String> {
        let out = self
            .cmd(&[
                "curl",
                "--silent",
                "--show-error",
                "--fail",
                "--max-time",
                "5",
                url,
            ])
            .output()
            .map_err(|e| format!("running curl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "curl {url}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Waits, at most 15 s, until `url` answers from inside the namespace.
    pub fn wait_for_http(&self, url: &str) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.curl(url) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(io::Error::other(format!("no answer: {e}")));
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Serves `dir` over HTTP on `addr:port` with Python's http.server until the namespace is
    /// dropped, and waits until it answers.
    pub fn serve_directory(&self, addr: &str, port: u16, dir: &str) -> io::Result<()> {
        let port_text = port.to_string();
        self.spawn(&[
            "python3",
            "-m",
            "http.server",
            &port_text,
            "--bind",
            addr,
            "--directory",
            dir,
        ])?;
        self.wait_for_http(&format!("http://{addr}:{port}/"))
    }

    /// Runs `f` on a thread that has entered this namespace (sockets it opens belong here).
    pub fn within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let file = File::open(self.path())?;
        thread::spawn(move || {
            // SAFETY: a valid namespace fd; setns affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for mut child in self.children.lock().unwrap().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Turns off checksum offload on `iface`, so its packets carry whole checksums as on a wire
/// and every receiver verifies them.
pub fn offload_off(ns: &Netns, iface: &str) -> io::Result<()> {
    ns.run(&["ethtool", "-K", iface, "tx", "off", "rx", "off"])
        .map(drop)
}

/// A veth pair between two namespaces, each end (namespace, name, address with its prefix,
/// `10.8.1.1/24`) addressed and up, offloads off.
pub fn veth(a: (&Netns, &str, &str), b: (&Netns, &str, &str)) -> io::Result<()> {
    sh(&[
        "ip",
        "link",
        "add",
        a.1,
        "netns",
        a.0.name(),
        "type",
        "veth",
        "peer",
        "name",
        b.1,
        "netns",
        b.0.name(),
    ])?;
    for (ns, iface, addr) in [a, b] {
        ns.run(&["ip", "addr", "add", addr, "dev", iface])?;
        ns.run(&["ip", "link", "set", iface, "up"])?;
        offload_off(ns, iface)?;
    }
    Ok(())
}
