//! Helpers every privileged test uses.

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    maps::{Map, MapData, MapError},
    programs::{ProgramError, TestRun, TestRunOptions, TestRunResult},
};
use pf::{
    domain::spec::Reservation,
    kernel::bpffs::PinDir,
    kernel::object::Programs,
    kernel::state::{Counters, State},
};

use serde_json::Value;

use crate::{
    kit::ScratchDir,
    kit::netns::Netns,
    kit::serve::{Service, TEST_POLICY},
};

/// Fails the test unless it runs as root: these tests load BPF programs and make namespaces.
/// A privileged test never skips, so a run without privileges cannot pass by doing nothing.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "pf's privileged tests need root: run them with `sudo cargo xtask test`"
    );
}

/// The `pf` binary under test; `cargo xtask test` builds it and sets PF_BIN.
pub fn pf_bin() -> PathBuf {
    let path = std::env::var_os("PF_BIN")
        .map(PathBuf::from)
        .expect("PF_BIN is not set: run the privileged tests through `cargo xtask test`");
    assert!(path.is_file(), "PF_BIN={} is not a file", path.display());
    path
}

/// A pin directory of this test's own under /sys/fs/bpf, removed (with every map and link
/// pinned in it, which detaches the links) when dropped; and where its `pf serve` keeps its
/// files and socket.
pub struct TempPinDir {
    pub dir: PinDir,
    service_files: PathBuf,
    _scratch: ScratchDir,
}

impl TempPinDir {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("pf-test-{}-{n}", std::process::id());
        let scratch = ScratchDir::claim(format!("/sys/fs/bpf/{name}"));
        Self {
            dir: PinDir::new(scratch.path()),
            service_files: std::env::temp_dir().join(name),
            _scratch: scratch,
        }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.root()
    }

    /// One of pf's pinned maps in this directory, opened with aya's typed view `T`.
    pub fn map<T: TryFrom<Map, Error = MapError>>(&self, name: &str) -> T {
        MapData::from_pin(self.dir.map(name))
            .and_then(Map::from_map_data)
            .and_then(T::try_from)
            .unwrap_or_else(|e| panic!("opening {name}: {e}"))
    }

    /// The socket every `pf` run through `pf_words` uses.
    pub fn socket(&self) -> PathBuf {
        self.service_files.join("pf.sock")
    }

    /// Starts `pf serve` on this pin directory with the test policy, in the host's network
    /// namespace.
    pub fn serve(&self) -> Service {
        self.serve_with(None, TEST_POLICY)
    }

    /// Starts `pf serve` with `policy`, in `netns` if given.
    pub fn serve_with(&self, netns: Option<&Netns>, policy: &str) -> Service {
        Service::start(
            &pf_bin(),
            ScratchDir::claim(&self.service_files),
            self.path(),
            netns.map(Netns::path),
            policy,
        )
        .expect("starting pf serve")
    }
}

/// `pf --bpffs DIR ARGS...` as a command (to run on the host or, through `Netns::nsenter`, in a
/// namespace).
pub fn pf_words(dir: &TempPinDir, args: &[&str]) -> Vec<String> {
    let mut words = vec![
        pf_bin().display().to_string(),
        "--bpffs".into(),
        dir.path().display().to_string(),
        "--socket".into(),
        dir.socket().display().to_string(),
    ];
    words.extend(args.iter().map(|s| s.to_string()));
    words
}

pub fn pf(dir: &TempPinDir, args: &[&str]) -> Output {
    let words = pf_words(dir, args);
    Command::new(&words[0])
        .args(&words[1..])
        .output()
        .expect("running pf")
}

/// `pf` run inside a namespace's network stack (`nsenter --net`, so it still shares the host's
/// bpffs): for attach and detach, which name the namespace's interfaces.
pub fn pf_in_ns(ns: &Netns, dir: &TempPinDir, args: &[&str]) -> Output {
    let words = pf_words(dir, args);
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    ns.nsenter(&words).output().expect("running pf")
}

/// Runs pf and insists it succeeds; returns stdout.
pub fn pf_ok(dir: &TempPinDir, args: &[&str]) -> String {
    let out = pf(dir, args);
    assert!(
        out.status.success(),
        "pf {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `pf list --json` parsed.
pub fn pf_list(dir: &TempPinDir) -> serde_json::Value {
    serde_json::from_str(&pf_ok(dir, &["list", "--json"])).expect("pf list --json prints JSON")
}

/// `pf stats --json` parsed.
pub fn pf_stats(dir: &TempPinDir) -> serde_json::Value {
    serde_json::from_str(&pf_ok(dir, &["stats", "--json"])).expect("pf stats --json prints JSON")
}

/// A frame in hex, for failure messages (and to paste into a fixture).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `frame` once through `program` with BPF_PROG_TEST_RUN, with `ctx` as its context if
/// given (an `xdp_md` naming the ingress interface, say): the verdict and the frame as it left.
pub fn run_once(
    program: &impl for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
    frame: &[u8],
    ctx: Option<&[u8]>,
) -> Result<(u32, Vec<u8>), ProgramError> {
    let mut out = vec![0u8; frame.len() + 512];
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: ctx,
        ..Default::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// Runs `frame` once through the loaded ingress (XDP) or egress (TC) program.
pub fn run_program(
    programs: &Programs,
    ingress: bool,
    frame: &[u8],
) -> Result<(u32, Vec<u8>), ProgramError> {
    if ingress {
        run_once(programs.ingress(), frame, None)
    } else {
        run_once(programs.egress(), frame, None)
    }
}

/// The counters of one block that moved from `before` to `after`, with how far.
pub fn moved(
    before: &[(&'static str, u64)],
    after: &[(&'static str, u64)],
) -> Vec<(&'static str, u64)> {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| a.1 != b.1)
        .map(|(b, a)| (b.0, a.1 - b.1))
        .collect()
}

/// The outcome counters of one direction that moved from `before` to `after`, with how far.
pub fn counters_moved(
    before: &Counters,
    after: &Counters,
    ingress: bool,
) -> Vec<(&'static str, u64)> {
    if ingress {
        moved(&before.ingress, &after.ingress)
    } else {
        moved(&before.egress, &after.egress)
    }
}

/// pf's maps in a fresh pin directory, filled with `reservations` through pf's own library,
/// and its programs loaded against them (so the verifier accepted them).
pub struct LoadedPf {
    pub state: State,
    pub programs: Programs,
    /// Last, so the pins go after the maps and programs holding them are closed.
    pub dir: TempPinDir,
}

impl LoadedPf {
    pub fn new(reservations: &[Reservation]) -> Self {
        require_root();
        let dir = TempPinDir::new();
        let mut state = State::open_for_write(&dir.dir).expect("creating pf's maps");
        state.reserve_all(reservations).expect("reserving");
        let programs = Programs::load(&dir.dir)
            .expect("loading pf's programs (the verifier must accept them)");
        Self {
            state,
            programs,
            dir,
        }
    }

    /// One of pf's pinned maps, opened with aya's typed view `T`.
    pub fn map<T: TryFrom<Map, Error = MapError>>(&self, name: &str) -> T {
        self.dir.map(name)
    }

    /// Reserves `r` with `rule`'s limits, armed before its entries.
    pub fn reserve_limited(&mut self, r: &Reservation, rule: &pf::kernel::limit::LimitRule) {
        let guards = pf::kernel::trigger::Guards {
            trigger: None,
            limit: Some(rule),
        };
        self.state
            .reserve_guarded(r, guards)
            .expect("reserving with limits");
    }
}

/// Reservations written as the CLI takes them: (public, target).
pub fn reservations(specs: &[(&str, &str)]) -> Vec<Reservation> {
    specs
        .iter()
        .map(|(p, t)| Reservation::new(p.parse().unwrap(), t.parse().unwrap()).unwrap())
        .collect()
}

/// pf run inside the server's network namespace (for attach and detach, which name its
/// interfaces), sharing the host's bpffs.
pub fn pf_in(ns: &Netns, dir: &TempPinDir, args: &[&str]) -> String {
    let out = pf_in_ns(ns, dir, args);
    assert!(
        out.status.success(),
        "pf {args:?} in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One counter of `pf stats --json` (`direction`: ingress, egress, fast_path, reply_fast_path).
pub fn counter(stats: &Value, direction: &str, name: &str) -> u64 {
    stats[direction][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {direction}.{name} in {stats}"))
}

/// The traffic counters of the reservation whose spec starts with `spec_prefix`.
pub fn traffic<'a>(stats: &'a Value, spec_prefix: &str) -> &'a Value {
    stats["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["spec"].as_str().unwrap().starts_with(spec_prefix))
        .map(|r| &r["traffic"])
        .unwrap_or_else(|| panic!("no reservation {spec_prefix} in {stats}"))
}

/// The running kernel's (major, minor).
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

/// Reserves each `(PORT/PROTO on the public IP, target port on the client)` through the
/// service.
pub fn reserve_to_client(dir: &TempPinDir, reservations: &[(&str, u16)]) {
    use crate::kit::topology::{CLIENT_IP, PUBLIC_IP};
    for (public, target) in reservations {
        pf_ok(
            dir,
            &[
                "reserve",
                &format!("{PUBLIC_IP}:{public}"),
                "--to",
                &format!("{CLIENT_IP}:{target}"),
            ],
        );
    }
}

/// A datagram from the internet host to `PUBLIC_IP:public_port`, whose target has no listener:
/// the client's port unreachable must come back through pf as the internet host would expect
/// it, from the public address and about the public port (so its connected socket gets
/// ECONNREFUSED).
pub fn assert_port_unreachable_from_public(inet: &Netns, public_port: u16) {
    use std::{io::ErrorKind, time::Duration};

    use crate::kit::{
        topology::{INTERNET_IP, PUBLIC_IP},
        traffic::{IcmpCapture, error_fields, ip, udp_answer},
    };
    let capture = IcmpCapture::open(inet);
    assert_eq!(
        udp_answer(inet, ("0.0.0.0", 40700), (PUBLIC_IP, public_port)),
        Err(ErrorKind::ConnectionRefused),
        "the internet host's socket"
    );
    let error = capture
        .error_where(Duration::from_secs(3), |p| error_fields(p).1 == 3)
        .expect("a port unreachable at the internet host");
    assert_eq!(
        error_fields(&error),
        (
            ip(PUBLIC_IP),
            3,
            3,
            ip(INTERNET_IP),
            40700,
            ip(PUBLIC_IP),
            public_port
        ),
        "the error as the internet host received it: from the public address, about the public port"
    );
}

/// TCP to `PUBLIC_IP:8080` reaches the client's port 80 with the internet host's own address,
/// and a UDP datagram to `PUBLIC_IP:5353` gets its echo: the two reservations most tests make.
pub fn assert_forwards_tcp_and_udp(inet: &Netns, context: &str) {
    use crate::kit::{
        topology::{INTERNET_IP, PUBLIC_IP},
        traffic::udp_round_trip,
    };
    assert_eq!(
        inet.curl(&format!("http://{PUBLIC_IP}:8080/")),
        Ok(format!("port 80 from {INTERNET_IP}")),
        "TCP, {context}"
    );
    assert_eq!(
        udp_round_trip(inet, PUBLIC_IP, 5353, "ping"),
        "pong:ping",
        "UDP, {context}"
    );
}
