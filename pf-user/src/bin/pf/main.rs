//! The `pf` command: its arguments (clap) and one dispatch. Library errors are typed
//! (`pf::PfError`, the client's `ClientError`); here, at the edge, every failure becomes one
//! `error: ...` line on stderr and a non-zero exit code. What it prints is `render`'s.

mod log;
mod render;

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use pf::{
    api::{
        client::{Client, ClientError},
        top::{self, TopBy},
        types::{
            ChangeRequest, DrainRequest, LimitsRequest, ListQuery, RateValue, RenewRequest,
            ReservationView, ReserveRequest, RestoreRequest, TriggerRequest,
        },
    },
    domain::{
        limits::Rate,
        spec::{
            PublicSpec, Reservation, SpecError, TargetSpec, TriggerPorts, parse_public_request,
        },
    },
    kernel::{
        attach::{self, AttachMode, DeviceChoice, FastPathDevices, Role, TcAttach},
        bpffs::{DEFAULT_PIN_DIR, PinDir},
        privilege,
        state::State,
        trigger_hook,
    },
    service::{
        self, ServeError,
        config::{Config, ConfigError, DEFAULT_CONFIG, DEFAULT_SOCKET, ServiceConfig},
        policy::parse_ttl,
    },
};
use render::{describe, out};

/// Port forwarding in the kernel's fastest hook: XDP rewrites packets to a reserved public
/// IP:port towards a tunnel client; TC egress rewrites the replies back.
#[derive(Parser)]
#[command(name = "pf", version)]
struct Cli {
    /// pf serve's config (default /etc/pf/pf.toml). The other commands take the service's
    /// socket and pin directory from it (service.socket, service.bpffs) when it exists,
    /// unless --socket or --bpffs say otherwise.
    #[arg(long, global = true, env = "PF_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Directory on a BPF filesystem where pf pins its maps and links, for attach, detach,
    /// refresh and stats [default: the config's service.bpffs, else /sys/fs/bpf/pf].
    #[arg(long, env = "PF_BPFFS", value_name = "DIR")]
    bpffs: Option<PathBuf>,
    /// The socket of `pf serve`, for the reservation commands [default: the config's
    /// service.socket, else /run/pf/pf.sock].
    #[arg(long, env = "PF_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum TunnelOwnerCommand {
    /// Give ADDRESS's mappings (NAT-PMP, PCP, UPnP) to OWNER: the quota is OWNER's, and
    /// mappings it holds under another owner are released.
    #[command(after_help = "Example:\n  pf tunnel-owner set 10.8.0.2 acct-42")]
    Set {
        address: std::net::Ipv4Addr,
        owner: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget the owner given to ADDRESS: the config's [port_mapping] owners (or
    /// tunnel:ADDRESS) decide again.
    #[command(after_help = "Example:\n  pf tunnel-owner unset 10.8.0.2")]
    Unset {
        address: std::net::Ipv4Addr,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The owners given to tunnel addresses.
    List {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum Generate {
    /// Man pages (pf.1 and one per command, pf-serve.1 ...) into DIR.
    Man { dir: PathBuf },
    /// The completion script of SHELL on stdout.
    Completions { shell: clap_complete::Shell },
}

/// `--redirect-devices`, or the kernel's word without it.
fn device_choice(names: Option<Vec<String>>) -> DeviceChoice {
    names.map_or(DeviceChoice::Kernel, DeviceChoice::Named)
}

#[derive(Subcommand)]
enum Command {
    /// Attach pf's XDP (ingress) and TC (egress) programs to a public interface.
    #[command(
        after_help = "Examples:\n  pf attach eth0\n  pf attach eth0 --fast-path\n  pf attach tap0 --tunnel-side\n  pf attach eth0 --mode skb --tc-attach netlink"
    )]
    Attach {
        /// The interface: the public NIC, or (--tunnel-side) an Ethernet-like tunnel device.
        iface: String,
        /// XDP mode: auto (native, falling back to skb), native, or skb.
        #[arg(long, default_value = "auto", value_name = "auto|native|skb")]
        mode: AttachMode,
        /// Forwarded packets leave by XDP_REDIRECT where the route and the egress device allow
        /// it. They then bypass the server's forwarding path: netfilter (FORWARD and
        /// POSTROUTING rules, conntrack), qdiscs and tcpdump on the way out. Off by default.
        #[arg(long, conflicts_with_all = ["tunnel_side", "trigger"])]
        fast_path: bool,
        /// IFACE is an Ethernet-like tunnel-side interface (veth, tap, VXLAN): attach only the
        /// reply fast path, which sends replies from forwarded ports straight out a public
        /// interface attached with --fast-path, bypassing netfilter as that does.
        #[arg(long, conflicts_with = "trigger")]
        tunnel_side: bool,
        /// IFACE is a tunnel-side interface (WireGuard, tun, veth, tap): attach only the port
        /// trigger program, on its TC ingress, where a client's packet to a trigger port opens
        /// its rule's ports. Never changes or drops a packet.
        #[arg(long)]
        trigger: bool,
        /// How the TC program attaches (egress; ingress with --trigger): auto (TCX on Linux 6.6 and newer, else a
        /// cls_bpf filter on the clsact qdisc), tcx, or netlink (that filter, on any kernel).
        #[arg(long, default_value = "auto", value_name = "auto|tcx|netlink")]
        tc_attach: TcAttach,
        /// The devices the fast paths may redirect to, for a kernel that cannot say which
        /// devices take XDP frames (before Linux 6.3); refused on one that can.
        #[arg(long, value_delimiter = ',', value_name = "IFACE,...")]
        redirect_devices: Option<Vec<String>>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read which devices can take redirected frames (after adding or changing interfaces).
    #[command(
        after_help = "Examples:\n  pf refresh\n  pf refresh --redirect-devices eth0,tap0   (before Linux 6.3)"
    )]
    Refresh {
        /// Before Linux 6.3 (which cannot say): the devices the fast paths may redirect to.
        #[arg(long, value_delimiter = ',', value_name = "IFACE,...")]
        redirect_devices: Option<Vec<String>>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove pf's programs from an interface.
    #[command(after_help = "Example:\n  pf detach eth0")]
    Detach {
        /// The interface pf is attached to (or was, if it is gone: its pins are cleared).
        iface: String,
        /// Remove the port trigger program (`pf attach IFACE --trigger`).
        #[arg(long)]
        trigger: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The service and the data plane at a glance: whether pf serve runs, its reservations,
    /// the last reconcile's drift, policy violations, and the interfaces as the kernel has
    /// them. Exits 3 when pf serve is not running.
    #[command(after_help = "Examples:\n  pf status\n  pf status --json")]
    Status {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the reservation service: attach, reconcile the maps with the store, serve the API.
    #[command(
        after_help = "Examples:\n  pf serve --config /etc/pf/pf.toml\n  pf serve --check-config --config /etc/pf/pf.toml\n  RUST_LOG=debug pf serve"
    )]
    Serve {
        /// Reconcile even if that removes reservations the store does not know from the maps
        /// when the store is new or empty, or more than service.reconcile_removal_limit of
        /// them: for a store that really was lost.
        #[arg(long)]
        force_reconcile: bool,
        /// Check the config as a start would, print whether it is valid, and exit: for
        /// after an edit, before `systemctl reload pf`.
        #[arg(long, conflicts_with = "force_reconcile")]
        check_config: bool,
        /// Log more: -v debug, -vv trace (RUST_LOG, if set, decides instead).
        #[arg(short, long, action = clap::ArgAction::Count)]
        verbose: u8,
    },
    /// Forward PUBLIC_IP:PORT[-PORT]/tcp|udp|both to a tunnel address (PUBLIC_IP/tcp|udp|both:
    /// a free port from the pool, printed).
    #[command(
        after_help = "Examples:\n  pf reserve 203.0.113.10:8080/tcp --to 10.8.0.2:80 --owner acct-7\n  pf reserve 203.0.113.10:8810-8815/both --to 10.8.0.3 --owner acct-7\n  pf reserve 203.0.113.10/tcp --to 10.8.0.4 --owner acct-9 --ttl 30d"
    )]
    Reserve {
        #[command(flatten)]
        new: NewReservation,
    },
    /// Forward ports that open only while the target itself keeps them open (port
    /// triggering): its outbound packets to the trigger ports open the public ports, and they
    /// close after the idle timeout without traffic. Held, counted and released like any
    /// reservation (`pf list` shows it armed or open).
    #[command(after_help = "Examples:
  pf trigger 203.0.113.10:6112/both --to 10.8.0.2 --on 6112/udp --owner acct-7
  pf trigger 203.0.113.10:27015-27020/udp --to 10.8.0.3 --on 27015/tcp --idle 5m --owner acct-9")]
    Trigger {
        #[command(flatten)]
        new: NewReservation,
        /// The trigger: destination ports and protocols of the tunnel client's (the
        /// target's) outbound packets.
        #[arg(long, value_name = "PORT[-PORT]/tcp|udp|both")]
        on: TriggerPorts,
        /// How long the ports stay open after the last packet through them (1s to 24h).
        #[arg(long, value_name = "DURATION", default_value = "2m")]
        idle: String,
    },
    /// Remove a reservation, by id or named exactly as it was made; or all of one owner's.
    #[command(
        after_help = "Examples:\n  pf release 3\n  pf release 203.0.113.10:8080/tcp\n  pf release --owner acct-7"
    )]
    Release {
        /// The reservation: its id, or its public side exactly as it was made.
        #[arg(
            value_name = "ID|PUBLIC_IP:PORT[-PORT]/tcp|udp|both",
            required_unless_present = "owner",
            conflicts_with = "owner"
        )]
        reservation: Option<String>,
        /// Release every reservation of this owner (an account closed).
        #[arg(long)]
        owner: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Extend a reservation's lifetime from now (by --ttl, or by the lifetime it had).
    #[command(after_help = "Examples:\n  pf renew 3\n  pf renew 3 --ttl 30d")]
    Renew {
        /// The reservation's id (`pf list` shows it).
        id: u64,
        /// The new lifetime from now, e.g. 30d; without it, the lifetime it had.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a reservation in place: its target, owner or note. Its public port stays
    /// reserved throughout (a release then a reserve could lose it to someone else).
    #[command(group(
        clap::ArgGroup::new("what").required(true).multiple(true).args(["to", "owner", "note"])
    ))]
    #[command(
        after_help = "Examples:\n  pf change 3 --to 10.8.0.3:81\n  pf change 3 --owner acct-8 --note \"moved to the new account\""
    )]
    Change {
        /// The reservation's id (`pf list` shows it).
        id: u64,
        /// A new target, TARGET_IP[:PORT].
        #[arg(long = "to", value_name = "TARGET_IP[:PORT]")]
        to: Option<TargetSpec>,
        /// A new owner.
        #[arg(long)]
        owner: Option<String>,
        /// A new note ("" clears it).
        #[arg(long)]
        note: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forward a disabled reservation again.
    Enable {
        /// The reservation's id (`pf list` shows it).
        id: u64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop forwarding a reservation but keep its ports; or every reservation of an owner (a
    /// complaint), with a reason the audit log keeps.
    #[command(
        after_help = "Examples:\n  pf disable 12\n  pf disable --owner acct-7 --reason 'abuse report 2026-1142'"
    )]
    Disable {
        /// The reservation's id (`pf list` shows it).
        #[arg(required_unless_present = "owner", conflicts_with = "owner")]
        id: Option<u64>,
        /// Every enabled reservation of this owner.
        #[arg(long, requires = "reason")]
        owner: Option<String>,
        /// Why (with --owner): kept in each audit line.
        #[arg(long, requires = "owner")]
        reason: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List reservations, one per line (--expired: those expired in the last 7 days).
    #[command(
        after_help = "Examples:\n  pf list --owner acct-7\n  pf list --port 8080 --json\n  pf list --expiring-before 2026-12-31T00:00:00Z\n  pf list --limit 100 --after 400\n  pf list --expired"
    )]
    List {
        /// Only this owner's.
        #[arg(long)]
        owner: Option<String>,
        /// Only those whose public range holds this port.
        #[arg(long, value_name = "PORT", conflicts_with = "expired")]
        port: Option<u16>,
        /// Only those towards this target address.
        #[arg(long, value_name = "TARGET_IP", conflicts_with = "expired")]
        target: Option<std::net::Ipv4Addr>,
        /// Only those that expire before this time (RFC 3339, e.g. 2026-12-31T00:00:00Z).
        #[arg(long, value_name = "TIME", conflicts_with = "expired")]
        expiring_before: Option<String>,
        /// A page: those with an id above this (the last id of the previous page).
        #[arg(long, value_name = "ID", conflicts_with = "expired")]
        after: Option<u64>,
        /// A page: at most this many.
        #[arg(long, value_name = "N", conflicts_with = "expired")]
        limit: Option<u64>,
        /// Print the reservations as the API's JSON.
        #[arg(long)]
        json: bool,
        /// The expired history instead, newest first: what `pf restore` can bring back.
        #[arg(long)]
        expired: bool,
    },
    /// Bring back an expired reservation under its id (if its ports are still free).
    #[command(
        after_help = "Examples:\n  pf list --expired\n  pf restore 3\n  pf restore 3 --ttl 30d"
    )]
    Restore {
        /// The expired reservation's id (`pf list --expired` shows it).
        id: u64,
        /// A new lifetime; without it, the lifetime it had.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Watch the data plane's decisions live: each packet the programs see, what they did with
    /// it (rewritten, or passed and why) and the fast path's outcome, with its addresses and
    /// ports as they are after the program. Off, it costs a packet one array read.
    #[command(
        after_help = "Examples:\n  pf trace\n  pf trace 203.0.113.10:8080 --for 30s\n  pf trace 8080 --json\n  pf trace --off"
    )]
    Trace {
        /// Only packets to or from this port, or this address and port (a reservation's
        /// public or target side).
        #[arg(value_name = "[IP:]PORT", conflicts_with = "off")]
        filter: Option<String>,
        /// How long to watch (Ctrl-C stops it sooner).
        #[arg(long = "for", value_name = "DURATION", default_value = "10s")]
        duration: String,
        /// Switch tracing off and exit: for after a trace that was killed left it on.
        #[arg(long)]
        off: bool,
        /// One JSON object per decision.
        #[arg(long)]
        json: bool,
    },
    /// Is a forwarded port open? Each link a packet crosses (the reservation, the kernel maps,
    /// the attachment, the loaded program on a test packet, the target itself, its traffic),
    /// then one verdict. Exits 0 open, 4 closed, 5 inconclusive.
    #[command(
        after_help = "Examples:\n  pf check 203.0.113.10:8080/tcp\n  pf check 203.0.113.10:27015/udp --udp-probe 'hello'\n  pf check 203.0.113.10:8080/tcp --json"
    )]
    Check {
        /// The public endpoint: IP:PORT/tcp or IP:PORT/udp.
        public: String,
        /// For UDP: what to send the target (a service may answer only what it understands;
        /// no answer is inconclusive, never closed).
        #[arg(long, value_name = "TEXT")]
        udp_probe: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Winding down: at a time, disable (or --release) every reservation, or one owner's;
    /// audited, kept across restarts. With policy.accept_new = false no new ones come.
    #[command(
        after_help = "Examples:\n  pf drain --at 2026-12-31T00:00:00Z\n  pf drain --at 2027-01-31T00:00:00Z --release\n  pf drain --at 2026-12-01T12:00:00Z --owner acct-7\n  pf drain --list\n  pf drain --cancel 2"
    )]
    Drain {
        /// When (RFC 3339).
        #[arg(long, value_name = "TIME", required_unless_present_any = ["list", "cancel"], conflicts_with_all = ["list", "cancel"])]
        at: Option<String>,
        /// Only this owner's reservations.
        #[arg(long, requires = "at")]
        owner: Option<String>,
        /// Release them (their ports go back to the pool) rather than disable them.
        #[arg(long, requires = "at")]
        release: bool,
        /// The drains scheduled, pending and done.
        #[arg(long, conflicts_with = "cancel")]
        list: bool,
        /// Cancel a pending drain, by id.
        #[arg(long, value_name = "ID")]
        cancel: Option<u64>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Who held a public endpoint at a time (an abuse desk's question), from reservation
    /// records alone: pf keeps no flow or traffic logs. Past holders are kept for
    /// policy.history_retention (default 90 days).
    #[command(
        after_help = "Examples:\n  pf who 203.0.113.10:8080/tcp --at 2026-11-02T14:03:00Z\n  pf who 203.0.113.10:51413/udp"
    )]
    Who {
        /// The public endpoint: IP:PORT/tcp or IP:PORT/udp.
        public: String,
        /// The time, RFC 3339 (2026-11-02T14:03:00Z); now if not given.
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Who owns a tunnel address's port mappings (NAT-PMP, PCP, UPnP IGD), as the provider's
    /// account system says.
    #[command(
        after_help = "Examples:\n  pf tunnel-owner set 10.8.0.2 acct-42\n  pf tunnel-owner list\n  pf tunnel-owner unset 10.8.0.2"
    )]
    TunnelOwner {
        #[command(subcommand)]
        what: TunnelOwnerCommand,
    },
    /// Write pf's man pages or a shell's completions (for packagers: `cargo xtask deb`).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
    /// Show global counters and per-reservation traffic.
    #[command(after_help = "Examples:\n  pf stats\n  pf stats --json")]
    Stats {
        /// Print everything as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The reservations with the most packets, bytes or drops (by their limits) over an
    /// interval: two readings of the service's counters, `--interval` apart.
    #[command(after_help = "Examples:\n  pf top\n  pf top --by drops --interval 10s -n 20")]
    Top {
        /// How long to watch (100ms to 1h).
        #[arg(long, value_name = "DURATION", default_value = "2s")]
        interval: String,
        /// What to rank by: packets, bytes or drops.
        #[arg(long, value_name = "packets|bytes|drops", default_value = "packets")]
        by: TopBy,
        /// How many to show.
        #[arg(short = 'n', long, default_value_t = 10)]
        count: usize,
        /// Print the rows as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's message spans lines: fold its first paragraph (the problem, and e.g. the
            // missing argument's name) into the one line pf prints.
            let rendered = e.render().to_string();
            let problem: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let problem = problem.join(" ");
            let problem = problem.strip_prefix("error: ").unwrap_or(&problem);
            eprintln!("error: {problem} (see `pf --help`)");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if log::active() {
                // pf serve: the journal takes it as an error.
                tracing::error!("{e}");
            } else {
                eprintln!("error: {e}");
            }
            // A config pf serve cannot run on: restarting cannot help until the admin acts,
            // and the unit's RestartPreventExitStatus stops systemd looping on it.
            if is_config_error(&e) {
                return ExitCode::from(EX_CONFIG);
            }
            // A bad argument exits 2 whether clap or pf's own validation caught it.
            let bad_request = matches!(
                e.downcast_ref::<ClientError>(),
                Some(ClientError::Api { status: 400, .. })
            );
            if e.downcast_ref::<SpecError>().is_some() || bad_request {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// One of the service's paths: the flag (or its variable) if given, else the config's (see
/// `pick`), else `default`. A config named by `--config` or `PF_CONFIG` must load; the default
/// one is read only if it exists, and only when the flag is not given.
fn service_path(
    cli: &Cli,
    flag: &Option<PathBuf>,
    pick: fn(ServiceConfig) -> PathBuf,
    default: &str,
) -> anyhow::Result<PathBuf> {
    if let Some(path) = flag {
        return Ok(path.clone());
    }
    let config = match &cli.config {
        Some(path) => Some(Config::load(path)?),
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            Some(Config::load(std::path::Path::new(DEFAULT_CONFIG))?)
        }
        None => None,
    };
    Ok(config.map_or_else(|| PathBuf::from(default), |c| pick(c.service)))
}

/// Man pages and completions from the command's own definition, so they cannot drift from it.
fn generate(what: &Generate) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    match what {
        Generate::Man { dir } => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(cmd, dir)?;
        }
        Generate::Completions { shell } => {
            clap_complete::generate(*shell, &mut cmd, "pf", &mut std::io::stdout());
        }
    }
    Ok(())
}

/// Set by SIGINT or SIGTERM during `pf trace`, which then switches tracing off and ends.
static TRACE_STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn stop_trace(_: libc::c_int) {
    TRACE_STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// `pf trace`: switches the programs' reports on, prints them as they come for `duration`
/// (bounded; Ctrl-C ends it sooner), and switches them off again whatever happens.
fn trace(
    dir: &PinDir,
    filter: Option<&str>,
    duration: &str,
    off: bool,
    json: bool,
) -> anyhow::Result<()> {
    let Some(mut trace) = pf::kernel::trace::Trace::open(dir)? else {
        anyhow::bail!(
            "pf has no maps in {} yet: attach it first (`pf attach`, or pf serve)",
            dir.root().display()
        );
    };
    if off {
        trace.off()?;
        out!("tracing is off");
        return Ok(());
    }
    let duration = parse_ttl(duration).map_err(SpecError::BadTtl)?;
    let (address, port) = match filter {
        None => (None, None),
        Some(text) => {
            let (addr, port) = match text.rsplit_once(':') {
                Some((addr, port)) => (
                    Some(addr.parse::<std::net::Ipv4Addr>().map_err(|_| {
                        anyhow::anyhow!("'{addr}' is not an IPv4 address (pf trace [IP:]PORT)")
                    })?),
                    port,
                ),
                None => (None, text),
            };
            let port: u16 =
                port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
                    anyhow::anyhow!("'{port}' is not a port (pf trace [IP:]PORT)")
                })?;
            (addr, Some(port))
        }
    };
    if trace.is_on()? {
        anyhow::bail!(
            "a trace is running already (or one was killed and left tracing on: `pf trace --off`)"
        );
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, stop_trace as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, stop_trace as *const () as libc::sighandler_t);
    }
    trace.on(port)?;
    let started = std::time::Instant::now();
    let mut shown = 0u64;
    let mut show = |lines: Vec<pf::kernel::trace::TraceLine>| -> anyhow::Result<()> {
        for line in lines {
            if let Some(addr) = address {
                let addr = addr.to_string();
                let on_addr = |endpoint: &Option<String>| {
                    endpoint
                        .as_deref()
                        .is_some_and(|e| e.split(':').next() == Some(addr.as_str()))
                };
                let endpoints = [
                    Some(line.source.clone()),
                    Some(line.destination.clone()),
                    line.rewritten_source.clone(),
                    line.rewritten_destination.clone(),
                ];
                if !endpoints.iter().any(on_addr) {
                    continue;
                }
            }
            shown += 1;
            if json {
                out!("{}", serde_json::to_string(&line)?);
            } else {
                let rewritten = match (&line.rewritten_source, &line.rewritten_destination) {
                    (None, None) => String::new(),
                    (source, destination) => format!(
                        ", now {} -> {}",
                        source.as_ref().unwrap_or(&line.source),
                        destination.as_ref().unwrap_or(&line.destination)
                    ),
                };
                out!(
                    "{:>8.3}s {:<15} {} -> {} {} {}{rewritten}{}",
                    started.elapsed().as_secs_f64(),
                    line.hook,
                    line.source,
                    line.destination,
                    line.protocol,
                    line.outcome,
                    line.fast_path
                        .map(|f| format!(" (fast path: {f})"))
                        .unwrap_or_default()
                );
            }
        }
        Ok(())
    };
    let watched = (|| -> anyhow::Result<()> {
        while started.elapsed() < duration && !TRACE_STOP.load(std::sync::atomic::Ordering::Relaxed)
        {
            show(trace.drain())?;
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(())
    })();
    // Off whatever happened, then what came before the switch went off.
    let switched_off = trace.off();
    let last = trace.drain();
    watched?;
    show(last)?;
    switched_off?;
    if !json {
        out!(
            "{shown} decisions in {:.1} s; tracing is off",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The exit status of `pf status` when pf serve is not running (LSB's "program is not
/// running", as `systemctl status` uses it).
const NOT_RUNNING: u8 = 3;

/// `pf status`: the service's own view when it runs; otherwise that it does not, and (with
/// the privileges to look) the interfaces pf is attached to as the kernel has them.
fn status(client: &Client, dir: &PinDir, json: bool) -> anyhow::Result<()> {
    match client.status() {
        Ok(status) => {
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "running": true,
                        "service": status,
                    }))?
                );
            } else {
                render::print_status(&status);
            }
            Ok(())
        }
        Err(ClientError::NotRunning(socket)) => {
            let attached = privilege::require_privileges()
                .ok()
                .map(|()| attach::inspect(dir));
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "running": false,
                        "socket": socket,
                        "attached": attached.as_deref().map(render::attachments_json),
                    }))?
                );
            } else {
                out!(
                    "pf serve: not running (nothing listens on {})",
                    socket.display()
                );
                match &attached {
                    Some(attached) => render::print_attachments(attached),
                    None => out!("interfaces: (root can see them)"),
                }
            }
            std::process::exit(NOT_RUNNING.into());
        }
        Err(e) => Err(e.into()),
    }
}

/// `pf check`'s exit status for a closed port, and for an inconclusive one.
const CHECK_CLOSED: u8 = 4;
const CHECK_INCONCLUSIVE: u8 = 5;

/// `pf check IP:PORT/PROTO`: finds the reservation covering it (none is the first link
/// failing), asks the service to check it, prints each link and the verdict, and exits with
/// the verdict's status.
fn check(client: &Client, public: &str, udp_probe: Option<&str>, json: bool) -> anyhow::Result<()> {
    let spec: PublicSpec = public.parse()?;
    if spec.ports.first != spec.ports.last || spec.protocols == pf::domain::spec::Protocols::Both {
        anyhow::bail!("check one port and one protocol: IP:PORT/tcp or IP:PORT/udp");
    }
    let port = spec.ports.first;
    let covering = client
        .list_query(&ListQuery {
            public_port: Some(port),
            ..ListQuery::default()
        })?
        .into_iter()
        .find(|r| {
            r.public
                .parse::<PublicSpec>()
                .is_ok_and(|p| p.addr == spec.addr && p.protocols.overlaps(spec.protocols))
        });
    let view = match covering {
        Some(r) => client.check(r.id, port, &spec.protocols.to_string(), udp_probe)?,
        None => pf::api::types::CheckView {
            public: spec.to_string(),
            links: vec![pf::api::types::CheckLink {
                link: "reservation".into(),
                state: "failed".into(),
                detail: format!("no reservation covers {spec}"),
            }],
            verdict: "closed".into(),
            because: Some("reservation".into()),
        },
    };
    render::print_check(&view, json)?;
    match view.verdict.as_str() {
        "open" => Ok(()),
        "inconclusive" => std::process::exit(CHECK_INCONCLUSIVE.into()),
        _ => std::process::exit(CHECK_CLOSED.into()),
    }
}

/// An id the service does not know, with where to look: the API's message names no command.
fn hint<T>(result: Result<T, ClientError>, command: &str) -> anyhow::Result<T> {
    result.map_err(|e| match e {
        ClientError::Api {
            status: 404,
            message,
        } => anyhow::anyhow!("{message} (see `{command}`)"),
        e => e.into(),
    })
}

/// sysexits(3)'s EX_CONFIG: the exit status of a `pf serve` refused by its config.
const EX_CONFIG: u8 = 78;

fn is_config_error(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ConfigError>().is_some()
        || matches!(
            e.downcast_ref::<ServeError>(),
            Some(
                ServeError::Config(_)
                    | ServeError::RoleMismatch { .. }
                    | ServeError::UnknownGroup(_)
            )
        )
}

/// What `pf reserve` and `pf trigger` both take.
#[derive(clap::Args, Debug)]
struct NewReservation {
    /// The public side: an address of policy.public_ips (or, in a fleet on a shared store,
    /// another server's, or `fleet` for the same port on every server), a port or range (none:
    /// a free port from the pool), and the protocols.
    #[arg(value_name = "PUBLIC_IP[:PORT[-PORT]]/tcp|udp|both")]
    public: String,
    /// Target address; with a port, the range is shifted to start there. For `pf trigger`,
    /// the tunnel client whose own packets trigger it.
    #[arg(long = "to", value_name = "TARGET_IP[:PORT]")]
    to: TargetSpec,
    /// The account the reservation belongs to.
    #[arg(long, default_value = "admin")]
    owner: String,
    /// Lifetime, e.g. 30d, 12h, 90s; without it the policy's default_ttl (or none).
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    /// Free text kept with the reservation (no control or invisible characters).
    #[arg(long)]
    note: Option<String>,
    /// Inbound packets per second it takes (5000, 20k); more are dropped in XDP. At most
    /// the policy's (policy.limits), which applies without it.
    #[arg(long, value_name = "RATE")]
    max_pps: Option<Rate>,
    /// Inbound bits per second it takes (10M, 1G), as --max-pps.
    #[arg(long, value_name = "RATE")]
    max_bps: Option<Rate>,
    /// New inbound TCP connections (SYNs) per second it takes, as --max-pps.
    #[arg(long, value_name = "RATE")]
    max_syn: Option<Rate>,
    /// The only sources let in: networks or addresses, comma-separated or repeated.
    #[arg(
        long,
        value_name = "CIDR",
        value_delimiter = ',',
        conflicts_with = "deny"
    )]
    allow: Vec<String>,
    /// Sources kept out, as --allow.
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    deny: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

impl NewReservation {
    /// The limits asked for, if any.
    fn limits(&self) -> anyhow::Result<Option<LimitsRequest>> {
        let rate = |r: Option<Rate>| r.map(|r| RateValue::Number(r.0));
        let list = |nets: &[String]| (!nets.is_empty()).then(|| nets.to_vec());
        let req = LimitsRequest {
            packets_per_second: rate(self.max_pps),
            bits_per_second: rate(self.max_bps),
            syns_per_second: rate(self.max_syn),
            allow: list(&self.allow),
            deny: list(&self.deny),
        };
        if req == LimitsRequest::default() {
            return Ok(None);
        }
        // The lists checked here, without a round trip.
        req.parse().map_err(|e| anyhow::anyhow!(e))?;
        Ok(Some(req))
    }
}

/// `pf reserve` and `pf trigger`: checked here first (no round trip for a typo), then asked.
fn reserve(
    client: &Client,
    new: NewReservation,
    trigger: Option<TriggerRequest>,
) -> anyhow::Result<ReservationView> {
    let limits = new.limits()?;
    let NewReservation {
        public,
        to,
        owner,
        ttl,
        note,
        ..
    } = new;
    let (addr, ports, protocols) = parse_public_request(&public)?;
    if let Some(ports) = ports {
        Reservation::new(
            PublicSpec {
                addr,
                ports,
                protocols,
            },
            to,
        )?;
    }
    check_ttl(&ttl)?;
    Ok(client.reserve(&ReserveRequest {
        owner,
        public,
        to: to.to_string(),
        ttl,
        ttl_seconds: None,
        note,
        trigger,
        limits,
    })?)
}

/// Fails early, without a round trip, on a lifetime the service would refuse.
fn check_ttl(ttl: &Option<String>) -> Result<(), SpecError> {
    match ttl {
        Some(ttl) => parse_ttl(ttl).map(drop).map_err(SpecError::BadTtl),
        None => Ok(()),
    }
}

/// The id of the reservation made exactly as `spec`; an error naming the overlapping one if
/// `spec` is only part of it.
fn find_by_spec(client: &Client, spec: &PublicSpec) -> anyhow::Result<u64> {
    let rows = client.list_query(&ListQuery::default())?;
    let wanted = spec.to_string();
    if let Some(r) = rows.iter().find(|r| r.public == wanted) {
        return Ok(r.id);
    }
    let overlapping = rows.iter().find(|r| {
        r.public
            .parse::<PublicSpec>()
            .is_ok_and(|p| p.overlaps(spec))
    });
    let hint = match overlapping {
        Some(r) => format!(
            "; it overlaps {}: release that whole, as `pf release {}`",
            describe(r),
            r.id
        ),
        None => " (see `pf list`)".to_string(),
    };
    anyhow::bail!("no reservation {wanted}{hint}")
}

/// The one dispatch. Reservation commands talk to the service (the socket's permissions
/// decide who may, and their arguments are checked here first, so a typo is refused without
/// a round trip); the others need the privileges to touch the kernel.
fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Generate { what } = &cli.command {
        return generate(what);
    }
    if let Command::Serve {
        force_reconcile,
        check_config,
        verbose,
    } = cli.command
    {
        if cli.socket.is_some() || cli.bpffs.is_some() {
            anyhow::bail!(
                "pf serve takes its socket and pin directory from its config (service.socket, service.bpffs), not from --socket, --bpffs, PF_SOCKET or PF_BPFFS"
            );
        }
        let config = cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
        log::init(verbose).map_err(anyhow::Error::msg)?;
        let loaded = Config::load(&config)?;
        if check_config {
            service::check_config(&loaded)?;
            out!("{}: valid", config.display());
            return Ok(());
        }
        privilege::require_privileges()?;
        service::run(loaded, &config, service::StartOptions { force_reconcile })?;
        return Ok(());
    }
    // Each command resolves only the path it uses (`pf stats --bpffs DIR` reads no config);
    // the other stays empty and unused.
    let kernel_command = matches!(
        cli.command,
        Command::Attach { .. }
            | Command::Refresh { .. }
            | Command::Detach { .. }
            | Command::Stats { .. }
            | Command::Status { .. }
            | Command::Trace { .. }
    );
    // status and stats use both: the service's view, and the kernel's.
    let needs_client =
        !kernel_command || matches!(cli.command, Command::Status { .. } | Command::Stats { .. });
    let client = Client::new(&if !needs_client {
        PathBuf::new()
    } else {
        service_path(&cli, &cli.socket, |s| s.socket, DEFAULT_SOCKET)?
    });
    let dir = PinDir::new(&if kernel_command {
        service_path(&cli, &cli.bpffs, |s| s.bpffs, DEFAULT_PIN_DIR)?
    } else {
        PathBuf::new()
    });
    match cli.command {
        Command::Reserve { new } => {
            let json = new.json;
            let r = reserve(&client, new, None)?;
            render::print_record("reserved", &r, json)?;
        }
        Command::Trigger { new, on, idle } => {
            humantime::parse_duration(&idle).map_err(|e| {
                anyhow::anyhow!("--idle '{idle}' is not a duration such as 2m ({e})")
            })?;
            let trigger = TriggerRequest {
                on: on.to_string(),
                idle_timeout: Some(idle),
            };
            let json = new.json;
            let r = reserve(&client, new, Some(trigger))?;
            render::print_record("armed", &r, json)?;
        }
        Command::Release {
            reservation,
            owner,
            json,
        } => {
            let released = match (reservation, owner) {
                (_, Some(owner)) => client.release_owner(&owner)?.released,
                (Some(which), None) => {
                    let id = match which.parse::<u64>() {
                        Ok(id) => id,
                        Err(_) => find_by_spec(&client, &which.parse()?)?,
                    };
                    vec![hint(client.release(id), "pf list")?]
                }
                (None, None) => {
                    anyhow::bail!("name a reservation or --owner (see `pf release --help`)")
                }
            };
            if json {
                out!("{}", serde_json::to_string_pretty(&released)?);
            } else if released.is_empty() {
                out!("nothing to release");
            }
            for r in released.iter().filter(|_| !json) {
                out!("released {}", describe(r));
            }
        }
        Command::Renew { id, ttl, json } => {
            check_ttl(&ttl)?;
            let r = hint(
                client.renew(
                    id,
                    &RenewRequest {
                        ttl,
                        ttl_seconds: None,
                    },
                ),
                "pf list",
            )?;
            render::print_record("renewed", &r, json)?;
        }
        Command::Change {
            id,
            to,
            owner,
            note,
            json,
        } => {
            let r = hint(
                client.change(
                    id,
                    &ChangeRequest {
                        to: to.map(|t| t.to_string()),
                        owner,
                        note,
                    },
                ),
                "pf list",
            )?;
            render::print_record("changed", &r, json)?;
        }
        Command::Enable { id, json } => render::print_record(
            "enabled",
            &hint(client.set_enabled(id, true), "pf list")?,
            json,
        )?,
        Command::Check {
            public,
            udp_probe,
            json,
        } => return check(&client, &public, udp_probe.as_deref(), json),
        Command::Drain {
            at,
            owner,
            release,
            list,
            cancel,
            json,
        } => {
            if list {
                render::print_drains(&client.drains()?, json)?;
            } else if let Some(id) = cancel {
                let done = client.cancel_drain(id)?;
                if json {
                    out!("{done}");
                } else {
                    out!("cancelled drain {id}");
                }
            } else if let Some(at) = at {
                humantime::parse_rfc3339_weak(&at).map_err(|e| {
                    anyhow::anyhow!("--at '{at}' is not a time such as 2026-12-31T00:00:00Z ({e})")
                })?;
                let d = client.schedule_drain(&DrainRequest { at, owner, release })?;
                if json {
                    out!("{}", serde_json::to_string_pretty(&d)?);
                } else {
                    render::print_drains(std::slice::from_ref(&d), false)?;
                }
            }
        }
        Command::Who { public, at, json } => {
            if let Some(at) = &at {
                humantime::parse_rfc3339_weak(at).map_err(|e| {
                    anyhow::anyhow!("--at '{at}' is not a time such as 2026-11-30T12:00:00Z ({e})")
                })?;
            }
            render::print_who(&client.who(&public, at.as_deref())?, json)?;
        }
        Command::TunnelOwner { what } => match what {
            TunnelOwnerCommand::Set {
                address,
                owner,
                json,
            } => {
                render::print_tunnel_owner(&client.set_tunnel_owner(address, Some(&owner))?, json)?
            }
            TunnelOwnerCommand::Unset { address, json } => {
                render::print_tunnel_owner(&client.set_tunnel_owner(address, None)?, json)?
            }
            TunnelOwnerCommand::List { json } => {
                let owners = client.tunnel_owners()?;
                if json {
                    out!("{}", serde_json::to_string_pretty(&owners)?);
                } else if owners.is_empty() {
                    out!(
                        "no owners given: the config's [port_mapping] owners, else tunnel:ADDRESS"
                    );
                } else {
                    for o in owners {
                        out!("{:<16} {}", o.address, o.owner);
                    }
                }
            }
        },
        Command::Disable {
            id,
            owner,
            reason,
            json,
        } => match (id, owner, reason) {
            (Some(id), _, _) => render::print_record(
                "disabled",
                &hint(client.set_enabled(id, false), "pf list")?,
                json,
            )?,
            (None, Some(owner), Some(reason)) => {
                let done = client.disable_owner(&owner, &reason)?;
                if json {
                    out!("{}", serde_json::to_string_pretty(&done)?);
                } else if done.disabled.is_empty() {
                    out!("{owner} has no enabled reservation: nothing disabled");
                }
                for r in done.disabled.iter().filter(|_| !json) {
                    out!("disabled {}", describe(r));
                }
            }
            _ => anyhow::bail!("name a reservation, or --owner with --reason"),
        },
        Command::Restore { id, ttl, json } => {
            check_ttl(&ttl)?;
            let r = hint(
                client.restore(
                    id,
                    &RestoreRequest {
                        ttl,
                        ttl_seconds: None,
                    },
                ),
                "pf list --expired",
            )?;
            render::print_record("restored", &r, json)?;
        }
        Command::List {
            owner,
            port,
            target,
            expiring_before,
            after,
            limit,
            json,
            expired,
        } => {
            let rows = if expired {
                client.expired(owner.as_deref())?
            } else {
                client.list_query(&ListQuery {
                    owner,
                    public_port: port,
                    target,
                    expiring_before,
                    after,
                    limit,
                })?
            };
            render::print_list(&rows, json)?;
        }
        Command::Serve { .. } | Command::Generate { .. } => unreachable!("handled above"),
        Command::Attach {
            iface,
            mode,
            fast_path,
            tunnel_side,
            tc_attach,
            redirect_devices,
            trigger,
            json,
        } => {
            privilege::require_privileges()?;
            if trigger {
                let hook = trigger_hook::attach_trigger(&dir, &iface, tc_attach)?;
                let hook = if hook == TcAttach::Tcx {
                    "TCX"
                } else {
                    "a netlink filter"
                };
                if json {
                    out!(
                        "{}",
                        serde_json::json!({ "attached": iface, "role": "trigger", "tc": hook })
                    );
                } else {
                    out!("attached pf's port trigger program to {iface} (TC ingress by {hook})");
                }
                return Ok(());
            }
            let role = match (fast_path, tunnel_side) {
                (_, true) => Role::TunnelSide,
                (true, false) => Role::PublicFastPath,
                (false, false) => Role::Public,
            };
            let options = attach::AttachOptions {
                mode,
                role,
                tc: tc_attach,
                devices: device_choice(redirect_devices),
            };
            let attached = attach::attach(&dir, &iface, &options)?;
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&render::attached_json(&iface, role, &attached))?
                );
                return Ok(());
            }
            if let Some(reason) = &attached.replaced {
                out!("replaced a dead attachment on {iface} ({reason})");
            }
            let used = attached.xdp_mode;
            let tc = attached.egress_hook().unwrap_or("nothing");
            match role {
                Role::Public => {
                    out!(
                        "attached pf to {iface} (XDP in {used} mode on ingress, TC on egress by {tc})"
                    )
                }
                Role::PublicFastPath => out!(
                    "attached pf to {iface} with the fast path (XDP in {used} mode on ingress, TC on egress by {tc}): forwarded packets that can be redirected bypass the kernel's forwarding path and netfilter"
                ),
                Role::TunnelSide => out!(
                    "attached pf's reply fast path to {iface} (XDP in {used} mode): replies that can be redirected out a fast-path public interface bypass the kernel's forwarding path and netfilter"
                ),
            }
            if role != Role::Public {
                render::print_devices(&attached.devices);
            }
        }
        Command::Refresh {
            redirect_devices,
            json,
        } => {
            privilege::require_privileges()?;
            let devices = attach::refresh_devices(&dir, &device_choice(redirect_devices))?;
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&render::devices_json(&devices))?
                );
            } else {
                render::print_devices(&devices);
            }
        }
        Command::Status { json } => return status(&client, &dir, json),
        Command::Trace {
            filter,
            duration,
            off,
            json,
        } => {
            privilege::require_privileges()?;
            return trace(&dir, filter.as_deref(), &duration, off, json);
        }
        Command::Detach {
            iface,
            trigger,
            json,
        } => {
            privilege::require_privileges()?;
            if trigger {
                trigger_hook::detach_trigger(&dir, &iface)?;
            } else {
                attach::detach(&dir, &iface)?;
            }
            let what = if trigger {
                "pf's trigger program"
            } else {
                "pf"
            };
            if json && trigger {
                out!(
                    "{}",
                    serde_json::json!({ "detached": iface, "role": "trigger" })
                );
            } else if json {
                out!("{}", serde_json::json!({ "detached": iface }));
            } else {
                out!("detached {what} from {iface}");
            }
        }
        Command::Top {
            interval,
            by,
            count,
            json,
        } => {
            let wait = humantime::parse_duration(&interval)
                .ok()
                .filter(|d| (Duration::from_millis(100)..=Duration::from_secs(3600)).contains(d))
                .ok_or_else(|| {
                    anyhow::anyhow!("--interval '{interval}' is not a duration from 100ms to 1h")
                })?;
            let before = client.stats()?;
            let started = Instant::now();
            std::thread::sleep(wait);
            let after = client.stats()?;
            let rows = top::top(&before, &after, started.elapsed(), by, count);
            render::print_top(&rows, by, wait, json)?;
        }
        Command::Stats { json } => {
            privilege::require_privileges()?;
            let (stats, devices) = match State::open_for_read(&dir)? {
                Some(state) => (Some(state.stats()?), FastPathDevices::read(&state)?),
                None => (None, FastPathDevices::default()),
            };
            let attached = attach::inspect(&dir);
            let triggers = trigger_hook::trigger_attachments(&dir);
            // The service knows each reservation's id, owner, state and traffic since it was
            // made; without it, the maps say what they hold.
            let rows = render::stats_rows(stats.as_ref(), client.stats().ok());
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&render::stats_json(
                        stats.as_ref(),
                        &attached,
                        &triggers,
                        &devices,
                        &rows
                    ))?
                );
            } else {
                render::print_stats(stats.as_ref(), &attached, &triggers, &devices, &rows);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument and option of every command says what it is, and every command that
    /// changes or prints something shows an example.
    #[test]
    fn every_argument_has_help_and_commands_have_examples() {
        let cli = Cli::command();
        for cmd in cli.get_subcommands().filter(|c| !c.is_hide_set()) {
            for arg in cmd.get_arguments() {
                assert!(
                    arg.get_help().is_some() || arg.get_id() == "help",
                    "pf {} {}: no help text",
                    cmd.get_name(),
                    arg.get_id()
                );
            }
            if !matches!(
                cmd.get_name(),
                "refresh" | "status" | "stats" | "enable" | "disable"
            ) {
                let examples = cmd
                    .get_after_help()
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                assert!(
                    examples.contains(&format!("pf {}", cmd.get_name())),
                    "pf {}: no example",
                    cmd.get_name()
                );
            }
        }
        cli.debug_assert();
    }
}
