//! "Is my port open?", answered link by link (`GET /v1/reservations/{id}/check`, `pf check`).
//! A customer whose port an outside site calls closed cannot tell why; pf knows each link a
//! packet crosses and says which one broke, in the order the packet meets them:
//!
//! 1. `reservation`: one covers the endpoint, enabled, not expired; for a trigger rule,
//!    `trigger`: its gate is open (else the client has not triggered it lately);
//! 2. `maps`: the kernel maps hold the entries the store says they should;
//! 3. `attached`: pf is attached, live, to the interface that holds the public IP;
//! 4. `program`: that interface's loaded ingress program rewrites a test packet to the target
//!    (BPF_PROG_TEST_RUN: the real code path, nothing sent; the packet counts once in the
//!    reservation's traffic and in `rewritten`);
//! 5. `target`: the target answers, a TCP connect from the server (through the tunnel), or
//!    for UDP a probe whose silence is inconclusive, never "closed";
//! 6. `traffic`: what the reservation's entries counted (information, not a judgement);
//!    `limits`, for a reservation with limits: them, and what they dropped, by reason (a
//!    test packet they refuse makes `program` fail, saying so).
//!
//! Probes go only to the reservation's own target, one each, bounded by [`PROBE_TIMEOUT`].
//! Answered beside the engine (on a blocking thread): a probe waits, a change must not.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use crate::{
    api::types::{CheckLink, CheckView},
    domain::spec::{Protocols, PublicSpec},
    kernel::{
        attach::{self, Role},
        bpffs::PinDir,
        bpfinfo,
        host::LocalAddresses,
        state::State,
        trigger_hook,
    },
    service::{
        engine::ApiError,
        store::{Record, Store, Trigger},
    },
};

/// How long a probe of the target waits.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The test packet's source: TEST-NET-1, an address no real peer has.
const TEST_SOURCE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const TEST_SOURCE_PORT: u16 = 40_000;
/// XDP's verdicts a rewritten packet may leave with: pass to the kernel, or (fast path)
/// redirect.
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

/// What a check asks: the reservation, which of its ports and protocols (its first, TCP
/// before UDP, unless given), and for UDP the probe's payload.
#[derive(Debug)]
pub struct CheckRequest {
    pub id: u64,
    pub port: Option<u16>,
    pub protocol: Option<Protocols>,
    pub udp_probe: Vec<u8>,
}

struct Links(Vec<CheckLink>);

impl Links {
    fn push(&mut self, link: &str, state: &str, detail: String) {
        self.0.push(CheckLink {
            link: link.into(),
            state: state.into(),
            detail,
        });
    }
    fn ok(&mut self, link: &str, detail: String) {
        self.push(link, "ok", detail);
    }
    fn failed(&mut self, link: &str, detail: String) {
        self.push(link, "failed", detail);
    }
}

/// A test frame to `public`:`port` over `protocol` (Ethernet, IPv4, a TCP SYN or an empty
/// UDP datagram), with a whole IPv4 checksum.
fn test_frame(public: Ipv4Addr, port: u16, protocol: Protocols) -> Vec<u8> {
    let tcp = protocol == Protocols::Tcp;
    let l4_len = if tcp { 20 } else { 8 };
    let mut f = vec![0u8; 14 + 20 + l4_len];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = if tcp { 6 } else { 17 };
    ip[12..16].copy_from_slice(&TEST_SOURCE.octets());
    ip[16..20].copy_from_slice(&public.octets());
    let sum = pf_common::checksum::checksum(ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let l4 = &mut f[34..];
    l4[0..2].copy_from_slice(&TEST_SOURCE_PORT.to_be_bytes());
    l4[2..4].copy_from_slice(&port.to_be_bytes());
    if tcp {
        l4[12] = 5 << 4; // data offset
        l4[13] = 0x02; // SYN
    } else {
        l4[4..6].copy_from_slice(&8u16.to_be_bytes());
    }
    f
}

/// Checks reservation `ask.id`'s endpoint, link by link.
pub fn check(
    store: &dyn Store,
    dir: &PinDir,
    ask: &CheckRequest,
    now_ms: u64,
) -> Result<CheckView, ApiError> {
    let record = store
        .get(ask.id)?
        .ok_or_else(|| ApiError::not_found(ask.id))?;
    let r = record.reservation;
    let port = ask.port.unwrap_or(r.public.ports.first);
    if !(r.public.ports.first..=r.public.ports.last).contains(&port) {
        return Err(ApiError::bad_request(format!(
            "port {port} is not in reservation {} ({})",
            ask.id, r.public
        )));
    }
    let protocol = match (ask.protocol, r.public.protocols) {
        (None, Protocols::Both) => Protocols::Tcp,
        (None, p) => p,
        (Some(Protocols::Both), _) => {
            return Err(ApiError::bad_request("check one protocol: tcp or udp"));
        }
        (Some(p), have) if have.overlaps(p) => p,
        (Some(p), _) => {
            return Err(ApiError::bad_request(format!(
                "reservation {} ({}) does not forward {p}",
                ask.id, r.public
            )));
        }
    };
    let target_port = r.target_first_port + (port - r.public.ports.first);
    let target = SocketAddrV4::new(r.target_addr, target_port);
    let endpoint = PublicSpec {
        addr: r.public.addr,
        ports: crate::domain::spec::PortRange::single(port),
        protocols: protocol,
    };
    let mut links = Links(Vec::new());
    reservation_link(&mut links, &record, now_ms);
    let state = State::open_for_read(dir).ok().flatten();
    let trigger = store.trigger(record.id)?;
    if let Some(t) = &trigger
        && record.enabled
    {
        trigger_link(&mut links, dir, state.as_ref(), t);
    }
    let tags = crate::kernel::state::EntryTags {
        gate: trigger.map_or(0, |t| t.gate),
        limit: store.limits(record.id)?.map_or(0, |l| l.slot),
    };
    maps_link(&mut links, state.as_ref(), &record, tags);
    let iface = attached_link(&mut links, dir, r.public.addr);
    program_link(&mut links, dir, iface.as_deref(), &endpoint, target);
    target_link(&mut links, target, protocol, &ask.udp_probe);
    match state.as_ref().map(|s| s.traffic(&r)) {
        Some(Ok(t)) => links.push(
            "traffic",
            "info",
            format!(
                "in {} packets ({} bytes), out {} packets ({} bytes) while in the maps",
                t.in_packets, t.in_bytes, t.out_packets, t.out_bytes
            ),
        ),
        _ => links.push("traffic", "info", "not readable from the maps".into()),
    }
    if let Some(l) = store.limits(record.id)? {
        let drops = crate::kernel::limit::DropCounters::open(dir)
            .ok()
            .flatten()
            .and_then(|d| d.get(l.slot).ok());
        let dropped = match drops {
            Some(d) if d.iter().any(|n| *n != 0) => pf_common::LimitDrop::ALL
                .iter()
                .filter(|r| d[**r as usize] != 0)
                .map(|r| format!("{} {}", r.name(), d[*r as usize]))
                .collect::<Vec<_>>()
                .join(", "),
            Some(_) => "nothing".into(),
            None => "not readable from the maps".into(),
        };
        links.push(
            "limits",
            "info",
            format!("{}; dropped: {dropped}", l.limits),
        );
    }
    let first = |state: &str| {
        links
            .0
            .iter()
            .find(|l| l.state == state)
            .map(|l| l.link.clone())
    };
    let (verdict, because) = match (first("failed"), first("inconclusive")) {
        (Some(link), _) => ("closed", Some(link)),
        (None, Some(link)) => ("inconclusive", Some(link)),
        (None, None) => ("open", None),
    };
    Ok(CheckView {
        public: endpoint.to_string(),
        verdict: verdict.into(),
        because,
        links: links.0,
    })
}

fn reservation_link(links: &mut Links, record: &Record, now_ms: u64) {
    let what = format!("reservation {} (owner {})", record.id, record.owner);
    if !record.enabled {
        links.failed("reservation", format!("{what} is disabled"));
    } else if record.expires_ms.is_some_and(|at| at <= now_ms) {
        links.failed("reservation", format!("{what} has expired"));
    } else {
        let until = match record.expires_ms {
            Some(at) => format!(
                "until {}",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_millis(at)
                )
            ),
            None => "with no expiry".into(),
        };
        links.ok("reservation", format!("{what} is enabled, {until}"));
    }
}

/// A trigger rule's gate: open (the client's own packets keep it so), or why not.
fn trigger_link(links: &mut Links, dir: &PinDir, state: Option<&State>, t: &Trigger) {
    // Whether any tunnel interface has the trigger program, live.
    let listening = trigger_hook::trigger_attachments(dir)
        .iter()
        .any(|a| a.health.is_live());
    let idle = humantime::format_duration(Duration::from_millis(t.idle_timeout_ms));
    match state.map(|s| s.trigger_gate(t.gate)) {
        Some(Ok(g)) if g.open_for.is_some() => links.ok(
            "trigger",
            format!(
                "open, for {} more unless traffic keeps it open (opened by the client's packets to {})",
                humantime::format_duration(Duration::from_secs(
                    g.open_for.unwrap_or_default().as_secs()
                )),
                t.on
            ),
        ),
        Some(Ok(g)) if g.armed && !listening => links.failed(
            "trigger",
            format!(
                "armed, not open, and no tunnel interface has the trigger program, so nothing can open it: pf attach IFACE --trigger, or [triggers] interfaces = [\"IFACE\"] (the client's packets to {} come in there)",
                t.on
            ),
        ),
        Some(Ok(g)) if g.armed => links.failed(
            "trigger",
            format!(
                "armed, not open: the client has not sent to {} (or had no traffic through the ports) within the idle timeout of {idle}",
                t.on
            ),
        ),
        Some(Ok(_)) => links.failed(
            "trigger",
            "the rule is not armed in the kernel maps (drift: pf serve's reconcile repairs it; restart it)".into(),
        ),
        Some(Err(e)) => links.failed("trigger", format!("reading its gate: {e}")),
        None => links.failed("trigger", "pf's maps are not pinned".into()),
    }
}

fn maps_link(
    links: &mut Links,
    state: Option<&State>,
    record: &Record,
    tags: crate::kernel::state::EntryTags,
) {
    let r = &record.reservation;
    let Some(state) = state else {
        links.failed(
            "maps",
            "pf's maps are not pinned: pf serve has not started on this pin directory".into(),
        );
        return;
    };
    match (record.enabled, state.holds_tagged(r, tags).unwrap_or(false)) {
        (true, true) => links.ok("maps", format!("the kernel maps hold {r}")),
        (true, false) => links.failed(
            "maps",
            format!(
                "the kernel maps lack entries of {r} (drift: pf serve's reconcile repairs it; restart it)"
            ),
        ),
        (false, _) => links.failed("maps", "a disabled reservation has no entries".into()),
    }
}

/// The interface holding `public`, if pf is attached to it, live, on the public side.
fn attached_link(links: &mut Links, dir: &PinDir, public: Ipv4Addr) -> Option<String> {
    let local = match LocalAddresses::read() {
        Ok(local) => local,
        Err(e) => {
            links.failed("attached", format!("reading the server's addresses: {e}"));
            return None;
        }
    };
    let Some(iface) = local.owner_of(public).map(str::to_string) else {
        links.failed(
            "attached",
            format!("no interface of this server holds {public}"),
        );
        return None;
    };
    let attachment = attach::inspect(dir).into_iter().find(|a| a.iface == iface);
    match attachment {
        Some(a) if a.health.is_live() && a.role != Role::TunnelSide => {
            links.ok(
                "attached",
                format!(
                    "pf is attached to {iface} ({}), which holds {public}",
                    a.role.describe()
                ),
            );
            Some(iface)
        }
        Some(a) => {
            links.failed(
                "attached",
                format!(
                    "pf's attachment to {iface}, which holds {public}, is not live ({}); pf attach {iface} attaches it again",
                    crate::api::types::AttachmentView::from(&a)
                        .problem
                        .unwrap_or_default()
                ),
            );
            None
        }
        None => {
            links.failed(
                "attached",
                format!("pf is not attached to {iface}, which holds {public} (pf attach {iface})"),
            );
            None
        }
    }
}

fn program_link(
    links: &mut Links,
    dir: &PinDir,
    iface: Option<&str>,
    endpoint: &PublicSpec,
    target: SocketAddrV4,
) {
    let Some(iface) = iface else {
        links.failed("program", "no attached program to run".into());
        return;
    };
    let Some(prog_id) = attach::ingress_program_id(dir, iface) else {
        links.failed(
            "program",
            format!("{iface} has no ingress program pf attached"),
        );
        return;
    };
    let frame = test_frame(endpoint.addr, endpoint.ports.first, endpoint.protocols);
    match bpfinfo::test_run(prog_id, &frame) {
        Ok(Some((verdict, out))) => {
            let rewritten = out.len() >= 38
                && out[30..34] == target.ip().octets()
                && out[36..38] == target.port().to_be_bytes();
            if rewritten && matches!(verdict, XDP_PASS | XDP_REDIRECT) {
                links.ok(
                    "program",
                    format!(
                        "{iface}'s ingress program (id {prog_id}) rewrites a test packet to {endpoint} towards {target}"
                    ),
                );
            } else if verdict == XDP_DROP {
                links.failed(
                    "program",
                    format!(
                        "{iface}'s ingress program (id {prog_id}) dropped a test packet from {TEST_SOURCE} to {endpoint}: the reservation's limits refuse it (its source list, or a rate it is over now; see `limits`)"
                    ),
                );
            } else {
                links.failed(
                    "program",
                    format!(
                        "{iface}'s ingress program (id {prog_id}) left a test packet to {endpoint} unrewritten (verdict {verdict})"
                    ),
                );
            }
        }
        Ok(None) => links.failed(
            "program",
            format!("{iface}'s ingress program (id {prog_id}) is no longer loaded"),
        ),
        Err(e) => links.failed("program", format!("running a test packet: {e}")),
    }
}

fn target_link(links: &mut Links, target: SocketAddrV4, protocol: Protocols, probe: &[u8]) {
    if protocol == Protocols::Tcp {
        match TcpStream::connect_timeout(&target.into(), PROBE_TIMEOUT) {
            Ok(_) => links.ok("target", format!("{target} accepted a TCP connection")),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => links.failed(
                "target",
                format!("{target} refused a TCP connection: nothing listens on that port"),
            ),
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => links
                .failed(
                    "target",
                    format!(
                        "{target} did not answer a TCP connection within {} s: the device is offline, or its firewall drops it",
                        PROBE_TIMEOUT.as_secs()
                    ),
                ),
            Err(e) => links.failed("target", format!("connecting to {target}: {e}")),
        }
        return;
    }
    let answered = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| {
        s.set_read_timeout(Some(PROBE_TIMEOUT))?;
        s.connect(target)?;
        s.send(probe)?;
        let mut buf = [0u8; 1500];
        s.recv(&mut buf)
    });
    match answered {
        Ok(n) => links.ok("target", format!("{target} answered the UDP probe ({n} bytes)")),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => links.failed(
            "target",
            format!("{target} answered the UDP probe with port unreachable: nothing listens on that port"),
        ),
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => links.push(
            "target",
            "inconclusive",
            format!(
                "{target} sent nothing back within {} s: a UDP service may answer nothing to a probe it does not understand (give one it does)",
                PROBE_TIMEOUT.as_secs()
            ),
        ),
        Err(e) => links.failed("target", format!("probing {target}: {e}")),
    }
}
