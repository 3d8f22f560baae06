//! The kernel's own packet generator (`pktgen`, `/proc/net/pktgen`) as the forwarding bench's
//! source of frames, where the kernel has it (Debian's kernels do, as a module; this host's does
//! not, and the bench falls back to its live-frames generator, saying so).
//!
//! pktgen is per network namespace: the internet host's namespace gets its own
//! `/proc/net/pktgen` (read here through `/proc/thread-self/net`, as `/proc/net` follows the
//! process's first thread, not the thread that entered the namespace), whose thread for the
//! last CPU (`kpktgend_N`, bound to CPU N) sends from inet0. A run is started by writing `start` to `pgctrl`, which blocks until the run stops, so
//! the bench starts it on a thread of its own, lets it send for the asked time, and writes
//! `stop`. `clone_skb 0` (a fresh skb per frame) is what veth needs.

use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use pf_tests::kit::netns::Netns;

/// Whether the kernel has pktgen (loading its module if it is one), as seen from `ns`.
pub fn available(ns: &Netns) -> bool {
    let _ = ns.cmd(&["modprobe", "pktgen"]).output();
    ns.within(|| PathBuf::from("/proc/thread-self/net/pktgen/pgctrl").exists())
        .unwrap_or(false)
}

/// Writes one command; pktgen drops a command's last byte (meant to be its newline).
fn write(path: &str, line: &str) -> Result<(), String> {
    fs::write(path, format!("{line}\n"))
        .map_err(|e| format!("pktgen: writing '{line}' to {path}: {e}"))
}

/// A pktgen set up on `iface` of the namespace it was made in.
pub struct Pktgen {
    iface: String,
    /// The file of the pktgen thread that sends (`kpktgend_N`).
    thread_file: String,
}

impl Pktgen {
    /// Sets pktgen's thread for the last CPU to send 60-byte UDP frames from `src` to
    /// `dest` (through `dst_mac`), with source ports `first_src_port` onwards over `flows`.
    /// Must run on a thread inside the sending namespace.
    pub fn configure(
        iface: &str,
        src: Ipv4Addr,
        dest: (Ipv4Addr, u16),
        dst_mac: [u8; 6],
        first_src_port: u16,
        flows: u32,
    ) -> Result<Self, String> {
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        let thread_file = format!("/proc/thread-self/net/pktgen/kpktgend_{}", cpus - 1);
        write(&thread_file, "rem_device_all")?;
        write(&thread_file, &format!("add_device {iface}"))?;
        let dev = format!("/proc/thread-self/net/pktgen/{iface}");
        let mac = dst_mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let last_src_port = u32::from(first_src_port) + flows - 1;
        for line in [
            "count 0".to_string(),
            "clone_skb 0".to_string(),
            "delay 0".to_string(),
            // pkt_size leaves out the 4-byte FCS: a 64-byte frame on the wire.
            "pkt_size 60".to_string(),
            format!("dst {}", dest.0),
            format!("dst_mac {mac}"),
            format!("src_min {src}"),
            format!("src_max {src}"),
            format!("udp_dst_min {}", dest.1),
            format!("udp_dst_max {}", dest.1),
            format!("udp_src_min {first_src_port}"),
            format!("udp_src_max {last_src_port}"),
        ] {
            write(&dev, &line)?;
        }
        Ok(Self {
            iface: iface.to_string(),
            thread_file,
        })
    }

    /// Frames sent so far in the current or last run (`pkts-sofar` in the device's file).
    fn sent(&self) -> Result<u64, String> {
        let path = format!("/proc/thread-self/net/pktgen/{}", self.iface);
        let text = fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        text.split_whitespace()
            .skip_while(|w| *w != "pkts-sofar:")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("no pkts-sofar in {path}: {text}"))
    }

    /// Sends for `seconds`; returns the frames sent and the time it took. Must run on a thread
    /// inside the sending namespace.
    pub fn send(&self, ns_path: &str, seconds: f64) -> Result<(u64, Duration), String> {
        let ns_path = ns_path.to_string();
        // `start` blocks until the run stops, so it runs on a thread in the same namespace.
        let runner = thread::spawn(move || -> Result<(), String> {
            let file = fs::File::open(&ns_path).map_err(|e| e.to_string())?;
            // SAFETY: a valid namespace fd; setns affects only this thread.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) }
                != 0
            {
                return Err(std::io::Error::last_os_error().to_string());
            }
            write("/proc/thread-self/net/pktgen/pgctrl", "start")
        });
        // Timed from when the thread says it runs: a `stop` before the run began would be lost,
        // and with `count 0` the run would never end.
        let running = format!("Running: {}", self.iface);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = fs::read_to_string(&self.thread_file).unwrap_or_default();
            if state.contains(&running) {
                break;
            }
            if runner.is_finished() || Instant::now() > deadline {
                write("/proc/thread-self/net/pktgen/pgctrl", "stop")?;
                let _ = runner.join();
                return Err(format!("pktgen never started sending: {state}"));
            }
            thread::sleep(Duration::from_millis(1));
        }
        let start = Instant::now();
        thread::sleep(Duration::from_secs_f64(seconds));
        write("/proc/thread-self/net/pktgen/pgctrl", "stop")?;
        // Timed to the stop: `start` returns only when pktgen's own wait loop (100 ms steps)
        // notices, which would add up to 100 ms to every run.
        let elapsed = start.elapsed();
        runner
            .join()
            .map_err(|_| "the pktgen thread panicked".to_string())??;
        Ok((self.sent()?, elapsed))
    }
}
