//! What the `pf` command prints: one line per reservation, the stats table, and their JSON.
//! Output goes through [`out!`], so a closed pipe ends pf quietly.

use pf::{
    api::types::{AttachmentView, ForwardView, ReservationView, StatsView},
    kernel::{
        attach::{Attached, Attachment, FastPathDevices, Health, Role, TcAttach},
        state::{Counters, Stats, Traffic},
        trigger_hook::TriggerAttachment,
    },
};
use pf_common::counters::Outcome;
use serde::Serialize;
use serde_json::{Value, json};

/// Prints a line on stdout. A closed pipe (`pf list | head`) ends pf quietly with success, as
/// it ends `cat`; any other failure to write is an error.
macro_rules! out {
    ($($arg:tt)*) => { $crate::render::write_out(format_args!($($arg)*)) };
}

pub fn write_out(args: std::fmt::Arguments) {
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

pub(crate) use out;

/// One line for a reservation as the API returns it.
pub fn describe(r: &ReservationView) -> String {
    let mut line = format!("{}: {} (owner {}", r.id, r.forward.spec, r.owner);
    if let Some(expires) = &r.expires {
        line += &format!(", expires {expires}");
    }
    if !r.enabled {
        line += ", disabled";
    }
    if let Some(t) = &r.trigger {
        line += &format!(
            ", trigger on {} idle {}: {}",
            t.on,
            humantime::format_duration(std::time::Duration::from_millis(t.idle_timeout_ms)),
            t.state
        );
        if let Some(until) = &t.open_until {
            line += &format!(" until {until}");
        }
    }
    if let Some(l) = &r.limits {
        line += &format!(", limits {}", describe_limits(l));
    }
    if let Some(expired) = &r.expired {
        line += &format!(", expired {expired}");
    }
    if !r.note.is_empty() {
        line += &format!(", note {:?}", r.note);
    }
    line + ")"
}

/// A reservation's limits and what they dropped, as `describe` shows them.
fn describe_limits(l: &pf::api::types::LimitsView) -> String {
    use pf::domain::limits::Rate;
    let mut parts = Vec::new();
    if let Some(p) = l.packets_per_second {
        parts.push(format!("{} pps", Rate(p)));
    }
    if let Some(b) = l.bits_per_second {
        parts.push(format!("{} bps", Rate(b)));
    }
    if let Some(s) = l.syns_per_second {
        parts.push(format!("{} syn/s", Rate(s)));
    }
    if let Some(nets) = &l.allow {
        parts.push(format!("allow {}", nets.join(",")));
    }
    if let Some(nets) = &l.deny {
        parts.push(format!("deny {}", nets.join(",")));
    }
    let mut text = parts.join(" ");
    if let Some(dropped) = &l.dropped {
        let nonzero: Vec<String> = dropped
            .iter()
            .filter(|(_, n)| **n != 0)
            .map(|(why, n)| format!("{why} {n}"))
            .collect();
        if !nonzero.is_empty() {
            text += &format!("; dropped {}", nonzero.join(" "));
        }
    }
    text
}

/// The reservations, one line each, or as the API's JSON.
pub fn print_list(rows: &[ReservationView], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        out!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        out!("no reservations");
    }
    for r in rows {
        out!("{}", describe(r));
    }
    Ok(())
}

pub fn print_devices(devices: &FastPathDevices) {
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
    if devices.named {
        out!(
            "fast path: this kernel cannot say which devices take redirected frames (the netdev family came in Linux 6.3), so these are the devices named with --redirect-devices (or fast_path.redirect_devices); a device that cannot take them drops what is sent to it"
        );
    }
}

/// A reservation's line in `pf stats`: what it forwards and its traffic, with its id, owner
/// and state when the service told them (its traffic then counts since it was made, across
/// disables and restarts; from the maps alone, since it last entered them).
#[derive(Serialize)]
pub struct StatsRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    enabled: Option<bool>,
    #[serde(flatten)]
    forward: ForwardView,
    traffic: Traffic,
}

/// The rows of `pf stats`: the service's when it answered, else the maps'.
pub fn stats_rows(stats: Option<&Stats>, service: Option<StatsView>) -> Vec<StatsRow> {
    match service {
        Some(view) => view
            .reservations
            .into_iter()
            .map(|r| StatsRow {
                id: Some(r.id),
                owner: Some(r.owner),
                enabled: Some(r.enabled),
                forward: r.forward,
                traffic: r.traffic,
            })
            .collect(),
        None => stats.map_or_else(Vec::new, |s| {
            s.reservations
                .iter()
                .map(|(r, traffic)| StatsRow {
                    id: None,
                    owner: None,
                    enabled: None,
                    forward: ForwardView::from(r),
                    traffic: *traffic,
                })
                .collect()
        }),
    }
}

/// `pf stats --json`, serialized straight from pf's types (no JSON tree is built for the
/// reservations, which can be a million).
#[derive(Serialize)]
pub struct StatsReport<'a> {
    #[serde(flatten)]
    header: serde_json::Map<String, Value>,
    reservations: &'a [StatsRow],
}

pub fn stats_json<'a>(
    stats: Option<&Stats>,
    attached: &[Attachment],
    triggers: &[TriggerAttachment],
    devices: &FastPathDevices,
    rows: &'a [StatsRow],
) -> StatsReport<'a> {
    let counters = |c: &[(&str, u64)]| -> Value {
        c.iter()
            .map(|(name, v)| ((*name).to_string(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let no_counters = Counters::default();
    let (c, tunnel_networks) = match stats {
        Some(s) => (&s.counters, s.tunnel_networks.as_slice()),
        None => (&no_counters, &[][..]),
    };
    let header = json!({
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
        // How each interface's egress program is attached: "tcx" or "netlink".
        "egress_hooks": attached
            .iter()
            .filter(|a| a.egress != TcAttach::Auto)
            .map(|a| (a.iface.clone(), json!(a.egress.to_string())))
            .collect::<serde_json::Map<_, _>>(),
        // Interfaces with the port trigger program: how it is attached, or why it is dead.
        "triggers": triggers
            .iter()
            .map(|t| {
                let state = match &t.health {
                    Health::Dead(why) => json!({ "dead": why }),
                    Health::Live | Health::Unknown(_) => json!({ "tc": t.hook.to_string() }),
                };
                (t.iface.clone(), state)
            })
            .collect::<serde_json::Map<_, _>>(),
        "fast_path_devices": {
            "redirect": devices.redirect,
            "public": devices.public,
        },
        "ingress": counters(&c.ingress),
        "egress": counters(&c.egress),
        "fast_path": counters(&c.fast_path),
        "reply_fast_path": counters(&c.reply_fast_path),
        // Part of egress.rewritten: rewrites by the skb helpers (a checksum not whole in the
        // packet, IPv4 options, headers outside the linear data).
        "egress_rewritten_by_helpers": c.egress_by_helpers,
        // Port triggering: the trigger program's outcomes, packets that met a closed gate
        // (either direction; their outcome says no_reservation or what it was), and openings
        // whose report was lost.
        "trigger": counters(&c.trigger),
        "trigger_gate_closed": c.gate_closed,
        "trigger_events_lost": c.trigger_events_lost,
        "tunnel_networks": tunnel_networks
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
    });
    let Value::Object(header) = header else {
        unreachable!("json! of an object literal");
    };
    StatsReport {
        header,
        reservations: rows,
    }
}

/// The interfaces pf is attached to, as the kernel has them, on one line.
pub fn print_attachments(attached: &[Attachment]) {
    if attached.is_empty() {
        out!("attached: (none)");
    } else {
        let list: Vec<String> = attached
            .iter()
            .map(|a| match &a.health {
                Health::Live if a.egress != TcAttach::Auto => {
                    format!("{} ({}, TC by {})", a.iface, a.role.describe(), a.egress)
                }
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
}

/// The interfaces as JSON, as `GET /v1/status` shows them.
pub fn attachments_json(attached: &[Attachment]) -> Vec<AttachmentView> {
    attached.iter().map(AttachmentView::from).collect()
}

/// A change's result: `VERB ID: ...` or the record as the API's JSON.
pub fn print_record(verb: &str, r: &ReservationView, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        out!("{}", serde_json::to_string_pretty(r)?);
    } else {
        out!("{verb} {}", describe(r));
    }
    Ok(())
}

/// `pf drain --list`: one line per drain, pending or done.
pub fn print_drains(drains: &[pf::api::types::DrainView], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        out!("{}", serde_json::to_string_pretty(drains)?);
        return Ok(());
    }
    if drains.is_empty() {
        out!("no drains scheduled");
    }
    for d in drains {
        let whose = match &d.owner {
            Some(owner) => format!("{owner}'s reservations"),
            None => "every reservation".into(),
        };
        let state = match &d.done {
            Some(done) => format!("done {done}"),
            None => "pending".into(),
        };
        out!("drain {} at {}: {} {whose} ({state})", d.id, d.at, d.action);
    }
    Ok(())
}

/// `pf who`: who held the endpoint then, one line each, or nobody.
pub fn print_who(v: &pf::api::types::WhoView, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        out!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    if v.holders.is_empty() {
        out!("{} at {}: nobody held it", v.public, v.at);
    }
    for h in &v.holders {
        let until = match (&h.until, &h.ended) {
            (Some(until), Some(how)) => format!("until {until} ({how})"),
            (Some(until), None) => format!("until {until}"),
            _ => "and still does".to_string(),
        };
        out!(
            "{} at {}: owner {} (reservation {}, {}), from {} {until}",
            v.public,
            v.at,
            h.owner,
            h.id,
            h.public,
            h.from
        );
    }
    Ok(())
}

/// `pf check`: a line per link, then the verdict.
pub fn print_check(v: &pf::api::types::CheckView, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        out!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    out!("checking {}", v.public);
    for l in &v.links {
        out!("  {:<12} {:<12} {}", l.state, l.link, l.detail);
    }
    match &v.because {
        Some(link) => out!("{}: {link}", v.verdict),
        None => out!("{}", v.verdict),
    }
    Ok(())
}

/// What `pf tunnel-owner set` or `unset` did.
pub fn print_tunnel_owner(
    o: &pf::api::types::TunnelOwnerView,
    as_json: bool,
) -> anyhow::Result<()> {
    if as_json {
        out!("{}", serde_json::to_string_pretty(o)?);
        return Ok(());
    }
    out!("{}'s mappings belong to {}", o.address, o.owner);
    if let Some(released) = o.released.as_ref().filter(|r| !r.is_empty()) {
        let ids: Vec<String> = released.iter().map(u64::to_string).collect();
        out!(
            "released {} (held under another owner): {}",
            if ids.len() == 1 {
                "mapping"
            } else {
                "mappings"
            },
            ids.join(", ")
        );
    }
    Ok(())
}

/// The fast paths' devices as JSON.
pub fn devices_json(devices: &FastPathDevices) -> Value {
    json!({
        "redirect_devices": devices.redirect,
        "public_devices": devices.public,
        "named_by_admin": devices.named,
    })
}

/// What `pf attach` did, as JSON.
pub fn attached_json(iface: &str, role: Role, attached: &Attached) -> Value {
    json!({
        "interface": iface,
        "role": role.describe(),
        "xdp_mode": attached.xdp_mode,
        "egress_hook": attached.egress_hook(),
        "replaced": attached.replaced,
        "fast_path_devices": (role != Role::Public).then(|| devices_json(&attached.devices)),
    })
}

/// `pf status` from the service's `GET /v1/status`.
pub fn print_status(s: &Value) {
    let text = |v: &Value| {
        v.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string())
    };
    out!("pf serve: running (version {})", text(&s["version"]));
    let next = match &s["next_expiry"] {
        Value::Null => String::new(),
        at => format!(", next expiry {}", text(at)),
    };
    out!("reservations: {}{next}", s["reservations"]);
    match &s["store_read_only"] {
        Value::Null => out!("store: writable"),
        why => out!("store: READ-ONLY ({}): changes are refused", text(why)),
    }
    if s["accept_new"] == false || s["accept_renewals"] == false {
        out!(
            "winding down: new reservations {}, renewals {}",
            if s["accept_new"] == false {
                "refused"
            } else {
                "taken"
            },
            if s["accept_renewals"] == false {
                "refused"
            } else {
                "taken"
            }
        );
    }
    for d in s["drains"].as_array().into_iter().flatten() {
        out!(
            "drain {} at {}: {} {}",
            d["id"],
            text(&d["at"]),
            text(&d["action"]),
            match d["owner"].as_str() {
                Some(owner) => format!("{owner}'s reservations"),
                None => "every reservation".into(),
            }
        );
    }
    match s["clock_offset_seconds"].as_i64() {
        Some(0) | None => {}
        Some(offset) => out!(
            "clock: the system clock is {offset} s from the service's (lifetimes run on the service's; a restart adopts the system clock)"
        ),
    }
    match &s["last_reconcile"] {
        Value::Null => {}
        r => out!(
            "last reconcile: {}, {} drifts repaired",
            text(&r["at"]),
            r["drifts"]
        ),
    }
    let interfaces: Vec<String> = s["attached"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| match &i["problem"] {
                    Value::Null => format!("{} ({})", text(&i["interface"]), text(&i["role"])),
                    why => format!(
                        "{} ({}, {}: {})",
                        text(&i["interface"]),
                        text(&i["role"]),
                        if i["live"] == true {
                            "state unknown"
                        } else {
                            "DEAD"
                        },
                        text(why)
                    ),
                })
                .collect()
        })
        .unwrap_or_default();
    if interfaces.is_empty() {
        out!("attached: (none)");
    } else {
        out!("attached: {}", interfaces.join(", "));
    }
    if let Some(mapping) = s["port_mapping"].as_object() {
        let counts = |v: &Value| -> String {
            let parts: Vec<String> = v
                .as_object()
                .map(|o| o.iter().map(|(k, n)| format!("{k} {n}")).collect())
                .unwrap_or_default();
            if parts.is_empty() {
                "none".into()
            } else {
                parts.join(", ")
            }
        };
        let answered: Vec<String> = mapping
            .get("answered")
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .map(|(protocol, v)| format!("{protocol}: {}", counts(v)))
                    .collect()
            })
            .unwrap_or_default();
        out!(
            "port mapping: answered {}; dropped {}; rate-limited {}",
            if answered.is_empty() {
                "nothing yet".into()
            } else {
                answered.join("; ")
            },
            counts(&mapping["dropped"]),
            counts(&mapping["rate_limited"])
        );
    }
    let violations = s["policy_violations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let count = s["policy_violation_count"]
        .as_u64()
        .unwrap_or(violations.len() as u64);
    if count == 0 {
        out!("policy violations: none");
    } else {
        let listed = if count > violations.len() as u64 {
            format!(" (the first {} by id)", violations.len())
        } else {
            String::new()
        };
        out!("policy violations: {count}{listed}");
        for v in &violations {
            out!(
                "  {}: {} (owner {}{}): refused by {}: {}",
                v["id"],
                text(&v["public"]),
                text(&v["owner"]),
                if v["enabled"] == true {
                    ""
                } else {
                    ", disabled"
                },
                text(&v["rule"]),
                text(&v["detail"])
            );
        }
    }
}

pub fn print_stats(
    stats: Option<&Stats>,
    attached: &[Attachment],
    triggers: &[TriggerAttachment],
    devices: &FastPathDevices,
    rows: &[StatsRow],
) {
    print_attachments(attached);
    for t in triggers {
        match &t.health {
            Health::Dead(why) => out!("{}: port trigger program dead ({why})", t.iface),
            Health::Live | Health::Unknown(_) => {
                out!(
                    "{}: port trigger program (TC ingress by {})",
                    t.iface,
                    t.hook
                )
            }
        }
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
    // Each direction's outcomes, without those only the other program has (not shown as a
    // count of 0).
    let seen = |counts: &[(&'static str, u64)], ingress: bool| -> Vec<(&'static str, u64)> {
        counts
            .iter()
            .zip(Outcome::ALL)
            .filter(|(_, o)| o.seen_at(ingress))
            .map(|(c, _)| *c)
            .collect()
    };
    let (ingress, egress) = (
        seen(&stats.counters.ingress, true),
        seen(&stats.counters.egress, false),
    );
    out!("ingress (XDP): {}", line(&ingress));
    out!(
        "egress  (TC):  {}  (rewritten by the skb helpers: {})",
        line(&egress),
        stats.counters.egress_by_helpers
    );
    if !stats.tunnel_networks.is_empty() {
        let nets: Vec<String> = stats
            .tunnel_networks
            .iter()
            .map(ToString::to_string)
            .collect();
        out!(
            "egress drops unrewritten packets from the tunnel networks {}",
            nets.join(", ")
        );
    }
    if stats.counters.trigger.iter().any(|(_, n)| *n != 0) || stats.counters.gate_closed != 0 {
        out!(
            "trigger:       {}  (met a closed gate: {}, reports lost: {})",
            line(&stats.counters.trigger),
            stats.counters.gate_closed,
            stats.counters.trigger_events_lost
        );
    }
    if attached.iter().any(|a| a.role != Role::Public) {
        out!("fast path:     {}", line(&stats.counters.fast_path));
        out!("reply fast:    {}", line(&stats.counters.reply_fast_path));
        print_devices(devices);
    }
    if rows.is_empty() {
        out!("no reservations");
        return;
    }
    // One write for the whole table, not one per line: it can have a million.
    use std::fmt::Write;
    let service = rows.first().is_some_and(|r| r.id.is_some());
    let mut table = if service {
        format!(
            "{:>6} {:<16} {:<52} {:>10} {:>12} {:>10} {:>12}",
            "ID", "OWNER", "RESERVATION", "IN PKTS", "IN BYTES", "OUT PKTS", "OUT BYTES"
        )
    } else {
        out!(
            "(pf serve is not answering: the maps' reservations, counted since they entered them)"
        );
        format!(
            "{:<52} {:>10} {:>12} {:>10} {:>12}",
            "RESERVATION", "IN PKTS", "IN BYTES", "OUT PKTS", "OUT BYTES"
        )
    };
    for row in rows {
        let Traffic {
            in_packets,
            in_bytes,
            out_packets,
            out_bytes,
        } = row.traffic;
        let spec = if row.enabled == Some(false) {
            format!("{} (disabled)", row.forward.spec)
        } else {
            row.forward.spec.clone()
        };
        if let (Some(id), Some(owner)) = (row.id, &row.owner) {
            let _ = write!(table, "\n{id:>6} {owner:<16} ");
        } else {
            table.push('\n');
        }
        let _ = write!(
            table,
            "{spec:<52} {in_packets:>10} {in_bytes:>12} {out_packets:>10} {out_bytes:>12}"
        );
    }
    out!("{table}");
}

/// `pf top`'s rows: a table, or JSON.
pub fn print_top(
    rows: &[pf::api::top::TopRow],
    by: pf::api::top::TopBy,
    interval: std::time::Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    if as_json {
        out!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        out!(
            "no reservation moved any {} in {}",
            format!("{by:?}").to_lowercase(),
            humantime::format_duration(interval)
        );
        return Ok(());
    }
    out!(
        "{:>6}  {:>12}  {:>14}  {:>10}  {:<16}  forward",
        "id",
        "packets/s",
        "bytes/s",
        "drops/s",
        "owner"
    );
    for r in rows {
        out!(
            "{:>6}  {:>12.0}  {:>14.0}  {:>10.0}  {:<16}  {}",
            r.id,
            r.packets_per_second,
            r.bytes_per_second,
            r.drops_per_second,
            r.owner,
            r.spec
        );
    }
    Ok(())
}
