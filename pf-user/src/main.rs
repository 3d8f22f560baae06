//! The `pf` command. Library errors are typed (`pf::PfError`); here, at the edge, every failure
//! becomes one `error: ...` line on stderr and a non-zero exit code.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use pf::{
    api::client::{Client, ClientError, encode},
    domain::spec::{PublicSpec, Reservation, SpecError, TargetSpec, parse_public_request},
    kernel::{
        attach::{self as dataplane, AttachMode, Attachment, FastPathDevices, Health, Role},
        bpffs::{DEFAULT_PIN_DIR, PinDir},
        privilege,
        state::{Counters, State, Stats, Traffic},
    },
    service::{
        self,
        policy::{Config, DEFAULT_CONFIG, DEFAULT_SOCKET, parse_ttl},
    },
};
use serde_json::{Value, json};

/// Prints a line on stdout. A closed pipe (`pf list | head`) ends pf quietly with success, as
/// it ends `cat`; any other failure to write is an error.
macro_rules! out {
    ($($arg:tt)*) => { write_out(format_args!($($arg)*)) };
}

fn write_out(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Port forwarding in the kernel's fastest hook: XDP rewrites packets to a reserved public
/// IP:port towards a tunnel client; TC egress rewrites the replies back.
#[derive(Parser)]
#[command(name = "pf", version)]
struct Cli {
    /// Directory on a BPF filesystem where pf pins its maps and links.
    #[arg(long, global = true, env = "PF_BPFFS", default_value = DEFAULT_PIN_DIR, value_name = "DIR")]
    bpffs: PathBuf,
    /// The socket of `pf serve`, which reserve, release, list, renew, enable and disable use.
    #[arg(long, global = true, env = "PF_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach pf's XDP (ingress) and TC (egress) programs to a public interface.
    Attach {
        iface: String,
        /// XDP mode: auto (native, falling back to skb), native, or skb.
        #[arg(long, default_value = "auto", value_name = "auto|native|skb")]
        mode: AttachMode,
        /// Forwarded packets leave by XDP_REDIRECT where the route and the egress device allow
        /// it. They then bypass the server's forwarding path: netfilter (FORWARD and
        /// POSTROUTING rules, conntrack), qdiscs and tcpdump on the way out. Off by default.
        #[arg(long, conflicts_with = "tunnel_side")]
        fast_path: bool,
        /// IFACE is an Ethernet-like tunnel-side interface (veth, tap, VXLAN): attach only the
        /// reply fast path, which sends replies from forwarded ports straight out a public
        /// interface attached with --fast-path, bypassing netfilter as that does.
        #[arg(long)]
        tunnel_side: bool,
    },
    /// Re-read which devices can take redirected frames (after adding or changing interfaces).
    Refresh,
    /// Remove pf's programs from an interface.
    Detach { iface: String },
    /// Run the reservation service: attach, reconcile the maps with the store, serve the API.
    Serve {
        #[arg(long, env = "PF_CONFIG", default_value = DEFAULT_CONFIG, value_name = "PATH")]
        config: PathBuf,
        /// Reconcile even if that removes reservations the store does not know from the maps
        /// when the store is new or empty, or more than service.reconcile_removal_limit of
        /// them: for a store that really was lost.
        #[arg(long)]
        force_reconcile: bool,
    },
    /// Forward PUBLIC_IP:PORT[-PORT]/tcp|udp|both to a tunnel address (PUBLIC_IP/tcp|udp|both:
    /// a free port from the pool, printed).
    Reserve {
        #[arg(value_name = "PUBLIC_IP[:PORT[-PORT]]/tcp|udp|both")]
        public: String,
        /// Target address; with a port, the range is shifted to start there.
        #[arg(long = "to", value_name = "TARGET_IP[:PORT]")]
        to: TargetSpec,
        /// The account the reservation belongs to.
        #[arg(long, default_value = "admin")]
        owner: String,
        /// Lifetime, e.g. 30d, 12h, 90s; without it the policy's default_ttl (or none).
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        #[arg(long)]
        note: Option<String>,
    },
    /// Remove a reservation, by id or named exactly as it was made; or all of one owner's.
    Release {
        #[arg(
            value_name = "ID|PUBLIC_IP:PORT[-PORT]/tcp|udp|both",
            required_unless_present = "owner",
            conflicts_with = "owner"
        )]
        reservation: Option<String>,
        #[arg(long)]
        owner: Option<String>,
    },
    /// Extend a reservation's lifetime from now (by --ttl, or by the lifetime it had).
    Renew {
        id: u64,
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// Forward a disabled reservation again.
    Enable { id: u64 },
    /// Stop forwarding a reservation but keep its ports.
    Disable { id: u64 },
    /// List reservations, one per line (--expired: those expired in the last 7 days).
    List {
        #[arg(long)]
        owner: Option<String>,
        #[arg(long)]
        json: bool,
        /// The expired history instead, newest first: what `pf restore` can bring back.
        #[arg(long)]
        expired: bool,
    },
    /// Bring back an expired reservation under its id (if its ports are still free).
    Restore {
        id: u64,
        /// A new lifetime; without it, the lifetime it had.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// Show global counters and per-reservation traffic.
    Stats {
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
            eprintln!("error: {e}");
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

/// Commands the service answers: checked here first, so a typo is refused without a round
/// trip, then sent.
fn run_client(client: &Client, command: &Command) -> anyhow::Result<bool> {
    match command {
        Command::Reserve {
            public,
            to,
            owner,
            ttl,
            note,
        } => {
            let (addr, ports, protocols) = parse_public_request(public)?;
            if let Some(ports) = ports {
                Reservation::new(
                    PublicSpec {
                        addr,
                        ports,
                        protocols,
                    },
                    *to,
                )?;
            }
            if let Some(ttl) = ttl {
                parse_ttl(ttl).map_err(SpecError::BadTtl)?;
            }
            let body = json!({ "owner": owner, "public": public, "to": to.to_string(), "ttl": ttl, "note": note });
            let r = client.call("POST", "/v1/reservations", Some(&body))?;
            out!("reserved {}", describe(&r));
        }
        Command::Release { reservation, owner } => {
            let released = match (reservation, owner) {
                (_, Some(owner)) => client.call(
                    "DELETE",
                    &format!("/v1/reservations?owner={}", encode(owner)),
                    None,
                )?,
                (Some(which), None) => {
                    let id = match which.parse::<u64>() {
                        Ok(id) => id,
                        Err(_) => find_by_spec(client, &which.parse()?)?,
                    };
                    Value::Array(vec![client.call(
                        "DELETE",
                        &format!("/v1/reservations/{id}"),
                        None,
                    )?])
                }
                (None, None) => unreachable!("clap requires one"),
            };
            // One reservation, or an owner's: {"owner": ..., "released": [...]}.
            let released = released
                .get("released")
                .unwrap_or(&released)
                .as_array()
                .cloned()
                .unwrap_or_default();
            if released.is_empty() {
                out!("nothing to release");
            }
            for r in &released {
                out!("released {}", describe(r));
            }
        }
        Command::Renew { id, ttl } => {
            if let Some(ttl) = ttl {
                parse_ttl(ttl).map_err(SpecError::BadTtl)?;
            }
            let r = client.call(
                "POST",
                &format!("/v1/reservations/{id}/renew"),
                Some(&json!({ "ttl": ttl })),
            )?;
            out!("renewed {}", describe(&r));
        }
        Command::Enable { id } | Command::Disable { id } => {
            let action = if matches!(command, Command::Enable { .. }) {
                "enable"
            } else {
                "disable"
            };
            let r = client.call("POST", &format!("/v1/reservations/{id}/{action}"), None)?;
            out!("{action}d {}", describe(&r));
        }
        Command::Restore { id, ttl } => {
            if let Some(ttl) = ttl {
                parse_ttl(ttl).map_err(SpecError::BadTtl)?;
            }
            let r = client.call(
                "POST",
                &format!("/v1/expired/{id}/restore"),
                Some(&json!({ "ttl": ttl })),
            )?;
            out!("restored {}", describe(&r));
        }
        Command::List {
            owner,
            json,
            expired,
        } => {
            let collection = if *expired { "expired" } else { "reservations" };
            let path = match owner {
                Some(owner) => format!("/v1/{collection}?owner={}", encode(owner)),
                None => format!("/v1/{collection}"),
            };
            let list = client.call("GET", &path, None)?;
            if *json {
                out!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let rows = list.as_array().cloned().unwrap_or_default();
                if rows.is_empty() {
                    out!("no reservations");
                }
                for r in &rows {
                    out!("{}", describe(r));
                }
            }
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// One line for a reservation as the API returns it.
fn describe(r: &Value) -> String {
    let mut line = format!(
        "{}: {} (owner {}",
        r["id"],
        r["spec"].as_str().unwrap_or("?"),
        r["owner"].as_str().unwrap_or("?")
    );
    if let Some(expires) = r["expires"].as_str() {
        line += &format!(", expires {expires}");
    }
    if r["enabled"] == json!(false) {
        line += ", disabled";
    }
    if let Some(expired) = r["expired"].as_str() {
        line += &format!(", expired {expired}");
    }
    if let Some(note) = r["note"].as_str().filter(|n| !n.is_empty()) {
        line += &format!(", note {note:?}");
    }
    line + ")"
}

/// The id of the reservation made exactly as `spec`; an error naming the overlapping one if
/// `spec` is only part of it.
fn find_by_spec(client: &Client, spec: &PublicSpec) -> anyhow::Result<u64> {
    let list = client.call("GET", "/v1/reservations", None)?;
    let rows = list.as_array().cloned().unwrap_or_default();
    let wanted = spec.to_string();
    if let Some(r) = rows.iter().find(|r| r["public"] == json!(wanted)) {
        return Ok(r["id"].as_u64().unwrap_or_default());
    }
    let overlapping = rows.iter().find(|r| {
        r["public"]
            .as_str()
            .and_then(|p| p.parse::<PublicSpec>().ok())
            .is_some_and(|p| p.overlaps(spec))
    });
    let hint = match overlapping {
        Some(r) => format!(
            "; it overlaps {}: release that whole, as `pf release {}`",
            describe(r),
            r["id"]
        ),
        None => " (see `pf list`)".to_string(),
    };
    anyhow::bail!("no reservation {wanted}{hint}")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Reservation commands talk to the service: the socket's permissions decide who may.
    if run_client(&Client::new(&cli.socket), &cli.command)? {
        return Ok(());
    }
    privilege::require_privileges()?;
    let dir = PinDir::new(&cli.bpffs);
    match cli.command {
        Command::Serve {
            config,
            force_reconcile,
        } => {
            let config = Config::load(&config)?;
            service::run(config, service::StartOptions { force_reconcile })?;
        }
        Command::Attach {
            iface,
            mode,
            fast_path,
            tunnel_side,
        } => {
            let role = match (fast_path, tunnel_side) {
                (_, true) => Role::TunnelSide,
                (true, false) => Role::PublicFastPath,
                (false, false) => Role::Public,
            };
            let attached = dataplane::attach(&dir, &iface, mode, role)?;
            if let Some(reason) = &attached.replaced {
                out!("replaced a dead attachment on {iface} ({reason})");
            }
            let used = attached.xdp_mode;
            match role {
                Role::Public => {
                    out!("attached pf to {iface} (XDP in {used} mode on ingress, TC on egress)")
                }
                Role::PublicFastPath => out!(
                    "attached pf to {iface} with the fast path (XDP in {used} mode on ingress, TC on egress): forwarded packets that can be redirected bypass the kernel's forwarding path and netfilter"
                ),
                Role::TunnelSide => out!(
                    "attached pf's reply fast path to {iface} (XDP in {used} mode): replies that can be redirected out a fast-path public interface bypass the kernel's forwarding path and netfilter"
                ),
            }
            if role != Role::Public {
                print_devices(&attached.devices);
            }
        }
        Command::Refresh => print_devices(&dataplane::refresh_devices(&dir)?),
        Command::Detach { iface } => {
            dataplane::detach(&dir, &iface)?;
            out!("detached pf from {iface}");
        }
        Command::Reserve { .. }
        | Command::Release { .. }
        | Command::Renew { .. }
        | Command::Enable { .. }
        | Command::Disable { .. }
        | Command::Restore { .. }
        | Command::List { .. } => unreachable!("answered by the service"),
        Command::Stats { json } => {
            let (stats, devices) = match State::open_for_read(&dir)? {
                Some(state) => (Some(state.stats()?), FastPathDevices::read(&state)?),
                None => (None, FastPathDevices::default()),
            };
            let attached = dataplane::inspect(&dir);
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&stats_json(stats.as_ref(), &attached, &devices))?
                );
            } else {
                print_stats(stats.as_ref(), &attached, &devices);
            }
        }
    }
    Ok(())
}

fn print_devices(devices: &FastPathDevices) {
    let list = |names: &[String]| {
        if names.is_empty() {
            "(none)".to_string()
        } else {
            names.join(", ")
        }
    };
    out!(
        "fast path: forwarded packets may be redirected to {}; replies to {}",
        list(&devices.redirect),
        list(&devices.public)
    );
}

fn stats_json(stats: Option<&Stats>, attached: &[Attachment], devices: &FastPathDevices) -> Value {
    let counters = |c: &[(&str, u64)]| -> Value {
        c.iter()
            .map(|(name, v)| ((*name).to_string(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let empty = Stats {
        counters: Counters {
            ingress: Vec::new(),
            egress: Vec::new(),
            fast_path: Vec::new(),
            reply_fast_path: Vec::new(),
        },
        reservations: Vec::new(),
        tunnel_networks: Vec::new(),
    };
    let s = stats.unwrap_or(&empty);
    let reservations: Vec<Value> = s
        .reservations
        .iter()
        .map(|(r, t)| {
            let mut v = r.to_json();
            v["traffic"] = serde_json::to_value(t).expect("plain struct");
            v
        })
        .collect();
    json!({
        // Only what the kernel confirms is attached; "dead" names the rest, with why.
        "attached": attached
            .iter()
            .filter(|a| a.health.is_live())
            .map(|a| &a.iface)
            .collect::<Vec<_>>(),
        "dead": attached
            .iter()
            .filter_map(|a| match &a.health {
                Health::Dead(why) => Some((a.iface.clone(), json!(why))),
                Health::Live | Health::Unknown(_) => None,
            })
            .collect::<serde_json::Map<_, _>>(),
        "roles": attached
            .iter()
            .map(|a| (a.iface.clone(), json!(a.role.describe())))
            .collect::<serde_json::Map<_, _>>(),
        "fast_path_devices": {
            "redirect": devices.redirect,
            "public": devices.public,
        },
        "ingress": counters(&s.counters.ingress),
        "egress": counters(&s.counters.egress),
        "fast_path": counters(&s.counters.fast_path),
        "reply_fast_path": counters(&s.counters.reply_fast_path),
        "tunnel_networks": s
            .tunnel_networks
            .iter()
            .map(|(addr, prefix)| format!("{addr}/{prefix}"))
            .collect::<Vec<_>>(),
        "reservations": reservations,
    })
}

fn print_stats(stats: Option<&Stats>, attached: &[Attachment], devices: &FastPathDevices) {
    if attached.is_empty() {
        out!("attached: (none)");
    } else {
        let list: Vec<String> = attached
            .iter()
            .map(|a| match &a.health {
                Health::Live => format!("{} ({})", a.iface, a.role.describe()),
                Health::Unknown(why) => {
                    format!("{} ({}, state unknown: {why})", a.iface, a.role.describe())
                }
                Health::Dead(why) => format!(
                    "{} ({}, DEAD: {why}; `pf attach` or a pf serve restart replaces it)",
                    a.iface,
                    a.role.describe()
                ),
            })
            .collect();
        out!("attached: {}", list.join(", "));
    }
    let Some(stats) = stats else {
        out!("no state yet (nothing reserved or attached)");
        return;
    };
    let line = |c: &[(&str, u64)]| {
        c.iter()
            .map(|(n, v)| format!("{n} {v}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    out!("ingress (XDP): {}", line(&stats.counters.ingress));
    out!("egress  (TC):  {}", line(&stats.counters.egress));
    if !stats.tunnel_networks.is_empty() {
        let nets: Vec<String> = stats
            .tunnel_networks
            .iter()
            .map(|(addr, prefix)| format!("{addr}/{prefix}"))
            .collect();
        out!(
            "egress drops unrewritten packets from the tunnel networks {}",
            nets.join(", ")
        );
    }
    if attached.iter().any(|a| a.role != Role::Public) {
        out!("fast path:     {}", line(&stats.counters.fast_path));
        out!("reply fast:    {}", line(&stats.counters.reply_fast_path));
        print_devices(devices);
    }
    if stats.reservations.is_empty() {
        out!("no reservations");
        return;
    }
    out!(
        "{:<52} {:>10} {:>12} {:>10} {:>12}",
        "RESERVATION",
        "IN PKTS",
        "IN BYTES",
        "OUT PKTS",
        "OUT BYTES"
    );
    for (
        r,
        Traffic {
            in_packets,
            in_bytes,
            out_packets,
            out_bytes,
        },
    ) in &stats.reservations
    {
        out!(
            "{:<52} {in_packets:>10} {in_bytes:>12} {out_packets:>10} {out_bytes:>12}",
            r.to_string()
        );
    }
}
