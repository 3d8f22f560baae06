//! The service's one writer: every reservation change runs here, one at a time, against the
//! store (the truth) and then the kernel maps (its cache). Serial on purpose: conflict, quota
//! and automatic-port checks see every earlier change, so no port is handed out twice.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant, UNIX_EPOCH},
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

use super::{
    clock::Clock,
    dataplane::{DataPlane, Maps},
    policy::{Policy, parse_ttl},
    store::{Extras, ListFilter, NewRecord, Record, Store, StoreError},
};
use crate::{
    api::types::{
        AttachmentView, ChangeRequest, ErrorBody, ForwardView, ReleasedByOwner, ReservationTraffic,
        ReservationView, ReserveRequest, StatsView, lifetime_text,
    },
    domain::spec::{
        PortRange, Protocols, PublicSpec, Reservation, SpecError, TargetSpec, parse_public_request,
    },
    kernel::{
        PfError,
        host::{Listening, LocalAddresses},
        state::Traffic,
    },
};

use super::{
    audit::{Audit, Caller},
    config::PortMappingConfig,
    metrics::ServiceMetrics,
};
pub use mapping::{MapAnswer, MapRequest};

/// Longest owner id and note the service stores.
pub const MAX_OWNER_LEN: usize = 128;
pub const MAX_NOTE_LEN: usize = 1024;

/// How long after a failed expiry it is tried again.
const EXPIRY_RETRY_MS: u64 = 1000;

/// Reconcile logs this many drifts one by one, then a count.
const DRIFT_LOG_LIMIT: usize = 20;
/// How many automatic ports a reserve picks before it gives up, when other agents of the
/// fleet keep taking the one it picked first.
const AUTOMATIC_PORT_TRIES: u32 = 5;

/// Longest text of a request an audit line records.
const SUBJECT_TEXT_MAX: usize = 256;

/// The status lists this many policy violations (by id), and counts them all.
const STATUS_VIOLATIONS: usize = 100;

/// How long expired reservations stay restorable.
pub const HISTORY_KEEP: Duration = Duration::from_secs(7 * 86_400);

/// What kind of failure a request met. The engine says what went wrong; `http.rs` alone
/// knows which status code says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The request cannot be right: malformed, an unknown field, a bad value.
    BadRequest,
    /// A policy rule refused it (the error names the rule).
    Refused,
    NotFound,
    /// The method does not apply to the path.
    NotAllowed,
    /// The body did not arrive in time.
    BodyTimeout,
    /// Another reservation is in the way.
    Conflict,
    /// The body is larger than the API takes.
    TooLarge,
    /// The store or the maps failed.
    Internal,
    /// The service cannot take changes now (audit log, read-only store, replaced maps,
    /// stopping).
    Unavailable,
}

/// An API failure: its kind and a one-line message naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// What kind of failure: the HTTP layer turns it into a status code.
    pub kind: Failure,
    pub message: String,
    /// The policy rule that refused the request, if one did.
    pub rule: Option<&'static str>,
    /// Part of the change was made before the failure (the message says which): audited as
    /// `partial`, not `refused`.
    pub partial: bool,
    /// The reservation in the way of a conflict.
    pub conflict_id: Option<u64>,
}

impl Failure {
    /// The error body's `code`.
    pub fn code(self) -> &'static str {
        match self {
            Failure::BadRequest => "bad_request",
            Failure::Refused => "refused",
            Failure::NotFound => "not_found",
            Failure::NotAllowed => "method_not_allowed",
            Failure::BodyTimeout => "body_timeout",
            Failure::Conflict => "conflict",
            Failure::TooLarge => "too_large",
            Failure::Internal => "internal",
            Failure::Unavailable => "unavailable",
        }
    }
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            kind: Failure::BadRequest,
            message: message.into(),
            rule: None,
            partial: false,
            conflict_id: None,
        }
    }
    pub fn not_found(id: u64) -> Self {
        Self {
            kind: Failure::NotFound,
            message: format!("no reservation with id {id}"),
            rule: None,
            partial: false,
            conflict_id: None,
        }
    }
    fn conflict(message: impl Into<String>) -> Self {
        Self {
            kind: Failure::Conflict,
            message: message.into(),
            rule: None,
            partial: false,
            conflict_id: None,
        }
    }
    /// A conflict with the reservation `id`.
    fn conflict_with(id: u64, message: impl Into<String>) -> Self {
        Self {
            conflict_id: Some(id),
            ..Self::conflict(message)
        }
    }
    fn internal(message: impl Into<String>) -> Self {
        Self {
            kind: Failure::Internal,
            message: message.into(),
            rule: None,
            partial: false,
            conflict_id: None,
        }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            kind: Failure::Unavailable,
            message: message.into(),
            rule: None,
            partial: false,
            conflict_id: None,
        }
    }
    pub fn to_json(&self) -> Value {
        serde_json::to_value(ErrorBody {
            error: self.message.clone(),
            code: self.kind.code().to_string(),
            rule: self.rule.map(str::to_string),
            conflict_id: self.conflict_id,
        })
        .expect("plain struct")
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        Self::bad_request(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    /// A store that cannot be reached is the service unavailable (503: try again), not a
    /// fault of pf's (500); ports another agent took first are a conflict.
    fn from(e: StoreError) -> Self {
        if let StoreError::Taken { by, .. } = &e {
            return Self::conflict_with(*by, e.to_string());
        }
        if e.is_unavailable() {
            Self::unavailable(e.to_string())
        } else {
            Self::internal(e.to_string())
        }
    }
}

impl From<crate::service::policy::Refusal> for ApiError {
    fn from(r: crate::service::policy::Refusal) -> Self {
        Self {
            kind: Failure::Refused,
            message: r.to_string(),
            rule: Some(r.rule),
            partial: false,
            conflict_id: None,
        }
    }
}

impl From<PfError> for ApiError {
    fn from(e: PfError) -> Self {
        match e {
            PfError::Conflict { .. } | PfError::AmbiguousTarget { .. } | PfError::Orphan { .. } => {
                Self::conflict(e.to_string())
            }
            PfError::MapsReplaced(_) => Self::unavailable(e.to_string()),
            other => Self::internal(other.to_string()),
        }
    }
}

/// What the API (or a device's port-mapping request) asks of the engine.
#[derive(Debug)]
pub enum Request {
    Reserve(ReserveRequest),
    /// A mapping a tunnel client asked for with NAT-PMP, PCP or UPnP IGD.
    Map(MapRequest),
    /// Who owns a tunnel address's mappings (`None`: the config decides again).
    SetTunnelOwner {
        address: Ipv4Addr,
        owner: Option<String>,
    },
    /// The owners the API gave tunnel addresses.
    TunnelOwners,
    /// "Is my port open?", link by link (answered beside the engine: it probes).
    Check(super::check::CheckRequest),
    /// Who held `public` (one port, one protocol) at `at_ms`.
    Who {
        public: PublicSpec,
        at_ms: u64,
    },
    Get(u64),
    List(ListFilter),
    Release(u64),
    ReleaseOwner(String),
    /// Schedules a drain (winding down).
    Drain(crate::api::types::DrainRequest),
    /// The drains, pending and done.
    Drains,
    /// Cancels a pending drain.
    CancelDrain(u64),
    /// Disables every enabled reservation of `owner`, with a reason for the audit.
    DisableOwner {
        owner: String,
        reason: String,
    },
    Renew {
        id: u64,
        ttl: Option<String>,
    },
    SetEnabled {
        id: u64,
        enabled: bool,
    },
    /// Owner, note or target changed in place.
    Change {
        id: u64,
        change: ChangeRequest,
    },
    /// The expired history.
    Expired {
        owner: Option<String>,
    },
    Restore {
        id: u64,
        ttl: Option<String>,
    },
    Status,
    /// Each reservation with its traffic since it was made.
    Stats,
    /// Whether the service can do its job: take changes, and forward on every interface.
    Health,
    /// A change request the API could not even read (bad JSON, an unknown field, too large):
    /// refused, and audited like any refusal.
    Malformed {
        action: &'static str,
        subject: Value,
        error: ApiError,
    },
    /// SIGHUP: open the audit log's path again (logrotate moved the file), and take the
    /// re-read config's policy if it was valid (`None`: it was not, and the old one stays).
    Reload {
        policy: Option<Box<Policy>>,
    },
    /// The fleet's shared store announced a change: the tick after it follows the store
    /// now, not at the next second. Never from the API.
    Wake,
}

impl Request {
    /// The audit log's name for a change; `None` for a read.
    fn action(&self) -> Option<&'static str> {
        Some(match self {
            Request::Reserve(_) => "reserve",
            Request::Map(m) if m.lifetime_s == 0 => "unmap",
            Request::Map(_) => "map",
            Request::SetTunnelOwner { owner: Some(_), .. } => "set-tunnel-owner",
            Request::SetTunnelOwner { owner: None, .. } => "unset-tunnel-owner",
            Request::Release(_) => "release",
            Request::ReleaseOwner(_) => "release-owner",
            Request::DisableOwner { .. } => "disable-owner",
            Request::Drain(_) => "schedule-drain",
            Request::CancelDrain(_) => "cancel-drain",
            Request::Renew { .. } => "renew",
            Request::SetEnabled { enabled: true, .. } => "enable",
            Request::SetEnabled { enabled: false, .. } => "disable",
            Request::Restore { .. } => "restore",
            Request::Change { .. } => "change",
            Request::Malformed { action, .. } => action,
            Request::Get(_)
            | Request::List(_)
            | Request::Expired { .. }
            | Request::Status
            | Request::TunnelOwners
            | Request::Check(_)
            | Request::Who { .. }
            | Request::Drains
            | Request::Stats
            | Request::Health
            | Request::Wake
            | Request::Reload { .. } => return None,
        })
    }

    /// What a refusal's audit line records of the request (each text cut to a bounded
    /// length: a line must fit the room the audit log keeps).
    fn subject(&self) -> Value {
        fn cut(s: &str) -> String {
            match s.char_indices().nth(SUBJECT_TEXT_MAX) {
                Some((at, _)) => format!("{}...", &s[..at]),
                None => s.to_string(),
            }
        }
        match self {
            Request::Reserve(r) => json!({
                "owner": cut(&r.owner),
                "public": cut(&r.public),
                "to": cut(&r.to),
                "ttl": r.ttl.as_deref().map(cut),
                "ttl_seconds": r.ttl_seconds,
            }),
            Request::Map(m) => json!({
                "via": m.via.as_str(),
                "client": m.client.to_string(),
                "protocol": m.protocol.to_string(),
                "internal_port": m.internal_port,
                "suggested_port": m.suggested_port,
                "lifetime": m.lifetime_s,
            }),
            Request::SetTunnelOwner { address, owner } => json!({
                "address": address.to_string(),
                "owner": owner.as_deref().map(cut),
            }),
            Request::Release(id)
            | Request::Renew { id, .. }
            | Request::SetEnabled { id, .. }
            | Request::Restore { id, .. } => json!({ "id": id }),
            Request::ReleaseOwner(owner) => json!({ "owner": cut(owner) }),
            Request::DisableOwner { owner, reason } => {
                json!({ "owner": cut(owner), "reason": cut(reason) })
            }
            Request::Drain(d) => json!({
                "at": cut(&d.at),
                "owner": d.owner.as_deref().map(cut),
                "release": d.release,
            }),
            Request::CancelDrain(id) => json!({ "drain": id }),
            Request::Change { id, change } => json!({
                "id": id,
                "to": change.to.as_deref().map(cut),
                "owner": change.owner.as_deref().map(cut),
                "note": change.note.as_deref().map(cut),
            }),
            Request::Malformed { subject, .. } => subject.clone(),
            _ => Value::Null,
        }
    }
}

/// The last instant RFC 3339 (four-digit years) can write: 9999-12-31T23:59:59.999Z.
const LATEST_RFC3339_MS: u64 = 253_402_300_799_999;

pub fn rfc3339(ms: u64) -> String {
    // A hand-edited row could hold any number; humantime panics past year 9999.
    let ms = ms.min(LATEST_RFC3339_MS);
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A record as the API shows it.
pub fn record_view(r: &Record) -> ReservationView {
    ReservationView {
        id: r.id,
        owner: r.owner.clone(),
        public: r.reservation.public.to_string(),
        forward: ForwardView::from(&r.reservation),
        created: rfc3339(r.created_ms),
        ttl_seconds: r.ttl_ms.map(|t| t / 1000),
        expires: r.expires_ms.map(rfc3339),
        enabled: r.enabled,
        note: r.note.clone(),
        expired: None,
        traffic: None,
        trigger: None,
        limits: None,
    }
}

/// A change to each of an owner's reservations that stopped at reservation `failed` with `e`:
/// `done` (what went, counted), the ids of `went`, then the error.
fn stopped_part_way(done: &str, went: &[ReservationView], failed: u64, e: ApiError) -> ApiError {
    let ids: Vec<String> = went.iter().map(|r| r.id.to_string()).collect();
    let ids = if ids.is_empty() {
        "none".to_string()
    } else {
        ids.join(", ")
    };
    ApiError {
        message: format!("{done} ({ids}), then reservation {failed}: {}", e.message),
        ..e
    }
}

/// A record as the API's JSON.
pub fn record_json(r: &Record) -> Value {
    serde_json::to_value(record_view(r)).expect("plain struct")
}

/// Each reservation in `store` with its traffic since it was made: what the store carried over
/// from maps it left, plus what its entries count now (`live`, from the maps).
pub fn traffic_rows(
    store: &dyn Store,
    live: Vec<(Reservation, Traffic)>,
    drops: &std::collections::HashMap<u16, crate::kernel::limit::Drops>,
) -> Result<Vec<ReservationTraffic>, ApiError> {
    let carried = store.all_traffic()?;
    let limits = store.all_limits()?;
    let live: std::collections::HashMap<Reservation, Traffic> = live.into_iter().collect();
    Ok(store
        .list(None)?
        .iter()
        .map(|r| ReservationTraffic {
            id: r.id,
            owner: r.owner.clone(),
            enabled: r.enabled,
            forward: ForwardView::from(&r.reservation),
            traffic: carried.get(&r.id).copied().unwrap_or_default()
                + if r.enabled {
                    live.get(&r.reservation).copied().unwrap_or_default()
                } else {
                    Traffic::default()
                },
            dropped: limits.get(&r.id).filter(|_| r.enabled).map(|l| {
                crate::api::types::drops_by_reason(&drops.get(&l.slot).copied().unwrap_or_default())
            }),
        })
        .collect())
}

/// The expired history (or one owner's) as the API's JSON, each with when it expired.
pub fn expired_json(store: &dyn Store, owner: Option<&str>) -> Result<Value, ApiError> {
    Ok(Value::Array(
        store
            .history(owner)?
            .iter()
            .map(|(r, at)| {
                serde_json::to_value(ReservationView {
                    expired: Some(rfc3339(*at)),
                    ..record_view(r)
                })
                .expect("plain struct")
            })
            .collect(),
    ))
}

/// Whether `c` changes how text reads without showing itself: Unicode's format characters
/// (bidirectional overrides and isolates, zero-width spaces and joiners, the BOM, soft
/// hyphens, tags) and the line and paragraph separators.
fn is_invisible(c: char) -> bool {
    matches!(
        c as u32,
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x2028..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// An owner is an account id: visible ASCII only, so two owners that print alike are alike
/// (no look-alike letters from other scripts, no invisible characters, no spaces).
pub(crate) fn check_owner(owner: &str) -> Result<(), ApiError> {
    if owner.is_empty() {
        return Err(ApiError::bad_request("owner is empty: give the account id"));
    }
    if owner.len() > MAX_OWNER_LEN {
        return Err(ApiError::bad_request(format!(
            "owner is longer than {MAX_OWNER_LEN} characters"
        )));
    }
    if let Some(c) = owner.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(ApiError::bad_request(format!(
            "owner contains {c:?} (U+{:04X}): an owner is an account id of visible ASCII characters (letters, digits, punctuation; no spaces)",
            c as u32
        )));
    }
    Ok(())
}

/// A note is free text on one line: any script, but nothing that hides or reorders text.
fn check_note(note: &str) -> Result<(), ApiError> {
    if note.chars().count() > MAX_NOTE_LEN {
        return Err(ApiError::bad_request(format!(
            "note is longer than {MAX_NOTE_LEN} characters"
        )));
    }
    if let Some(c) = note.chars().find(|&c| c.is_control() || is_invisible(c)) {
        return Err(ApiError::bad_request(format!(
            "note contains the invisible or control character U+{:04X}",
            c as u32
        )));
    }
    Ok(())
}

/// What `record`'s entries now in the maps have counted (nothing if it is disabled); a read
/// that fails is logged and counts nothing, since the change it precedes must not wait on it.
fn live_traffic(state: &dyn Maps, record: &Record) -> Traffic {
    if !record.enabled {
        return Traffic::default();
    }
    state.traffic(&record.reservation).unwrap_or_else(|e| {
        tracing::warn!(
            "reading reservation {}'s traffic from the maps: {e}; its totals lack what they held",
            record.id
        );
        Traffic::default()
    })
}

/// One log line for an audited change: who, what, the outcome and the reservation, briefly
/// (the audit line has it whole).
fn log_change(caller: Caller, action: &str, result: &str, v: &Value, error: Option<&str>) {
    let who = format!(
        "uid {} (pid {})",
        caller.uid.map_or("?".into(), |u| u.to_string()),
        caller.pid.map_or("?".into(), |p| p.to_string())
    );
    let what = match (v.get("id"), v.get("spec"), v.get("owner")) {
        (Some(id), Some(Value::String(spec)), Some(Value::String(owner))) => {
            format!("reservation {id} ({spec}, owner {owner})")
        }
        _ if v.is_null() => String::new(),
        _ => v.to_string(),
    };
    let why = error.map(|e| format!(": {e}")).unwrap_or_default();
    match result {
        "partial" => tracing::warn!("{action} {result} by {who}: {what}{why}"),
        _ => tracing::info!("{action} {result} by {who}: {what}{why}"),
    }
}

/// Logs a condition's `message` unless it is the one `last` holds: a failure that persists
/// is said once, and again only when it changes.
fn say_once(last: &mut Option<String>, message: String, line: impl FnOnce(&str) -> String) {
    if last.as_deref() != Some(message.as_str()) {
        tracing::warn!("{}", line(&message));
        *last = Some(message);
    }
}

/// The lifetime a renew or restore asks for: the one given, or the one the record had.
fn asked_lifetime(ttl: Option<String>, record: &Record) -> Result<Option<Duration>, ApiError> {
    Ok(ttl
        .as_deref()
        .map(parse_ttl)
        .transpose()
        .map_err(ApiError::bad_request)?
        .or(record.ttl_ms.map(Duration::from_millis)))
}

fn duration_ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX / 2)) as u64
}

pub struct Engine {
    store: Box<dyn Store>,
    dataplane: Box<dyn DataPlane>,
    policy: Policy,
    audit: Audit,
    clock: Clock,
    /// The earliest expiry in the store, re-read after every change.
    next_expiry: Option<u64>,
    /// Picks automatic ports: seeded from the kernel, so the ports handed out are not
    /// guessable from the order of requests.
    rng: StdRng,
    /// A change reached the store but not the maps: reconcile at the next tick.
    repair: bool,
    /// When the expired history was last purged.
    purged: Option<Instant>,
    /// Why expiry waits, once logged (logged again only when it changes).
    expiry_blocked: Option<String>,
    /// Why the last repair failed, once logged.
    repair_failing: Option<String>,
    /// Why the store could not be reached at the last tick, said once until it is back.
    store_down: Option<String>,
    /// This agent's place in a fleet on a shared store, if it is one.
    fleet: Option<fleet::FleetState>,
    /// Reservations the policy in force would refuse, as the last review found them.
    violations: std::collections::BTreeMap<u64, Violation>,
    /// When the last reconcile ran (Unix ms) and how many drifts it repaired.
    last_reconcile: Option<(u64, usize)>,
    /// What the engine counts for `/metrics` as it goes (shared with the scrapes).
    pub metrics: ServiceMetrics,
    /// `[port_mapping]`, if devices may ask for mappings.
    port_mapping: Option<PortMappingConfig>,
    /// Trigger gates known to be open, and whose (reservation id): watched for closing.
    open_gates: std::collections::BTreeMap<u16, u64>,
}

fn kernel_seed() -> u64 {
    let mut seed = [0u8; 8];
    // SAFETY: getrandom writes at most `seed.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if n != seed.len() as isize {
        // Only before the kernel's pool is initialised; the time is good enough to spread ports.
        return super::clock::now_ms() ^ u64::from(std::process::id()) << 32;
    }
    u64::from_ne_bytes(seed)
}

fn local_addresses() -> Result<LocalAddresses, ApiError> {
    LocalAddresses::read()
        .map_err(|e| ApiError::internal(format!("reading the server's own addresses: {e}")))
}

impl Engine {
    pub fn new(
        store: Box<dyn Store>,
        dataplane: Box<dyn DataPlane>,
        policy: Policy,
        audit: Audit,
    ) -> Result<Self, StoreError> {
        let next_expiry = store.next_expiry()?;
        Ok(Self {
            store,
            dataplane,
            policy,
            audit,
            clock: Clock::new(),
            next_expiry,
            rng: StdRng::seed_from_u64(kernel_seed()),
            repair: false,
            purged: None,
            expiry_blocked: None,
            repair_failing: None,
            store_down: None,
            fleet: None,
            violations: std::collections::BTreeMap::new(),
            last_reconcile: None,
            metrics: ServiceMetrics::default(),
            port_mapping: None,
            open_gates: std::collections::BTreeMap::new(),
        })
    }

    /// Lets tunnel clients ask for mappings (NAT-PMP, PCP, UPnP IGD) under `config`.
    pub fn set_port_mapping(&mut self, config: Option<PortMappingConfig>) {
        self.port_mapping = config;
    }

    /// When the mapping state began (Unix ms; see [`Store::mapping_epoch_ms`]).
    pub fn mapping_epoch_ms(&mut self) -> Result<u64, StoreError> {
        let now = self.now_ms();
        self.store.mapping_epoch_ms(now)
    }

    /// Now, on the service's clock (see [`Clock`]).
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    pub fn next_expiry(&self) -> Option<u64> {
        self.next_expiry
    }

    fn refresh_next_expiry(&mut self) {
        match self.store.next_expiry() {
            Ok(next) => self.next_expiry = next,
            Err(e) => tracing::error!("{e}"),
        }
    }

    /// pf's maps, for a change (see [`DataPlane::open`]); in a fleet, seen through this
    /// server's scope, so a change to another server's reservation leaves them alone.
    fn open_state(&mut self) -> Result<Box<dyn Maps>, PfError> {
        let maps = self.dataplane.open()?;
        Ok(match &self.fleet {
            Some(fleet) => Box::new(crate::service::fleet::ScopedMaps {
                inner: maps,
                scope: fleet.scope.clone(),
            }),
            None => maps,
        })
    }

    /// Why changes are refused now, if they are.
    fn refuse_changes(&mut self) -> Option<ApiError> {
        if let Some(why) = self.store.read_only() {
            return Some(ApiError::unavailable(format!(
                "the reservation store is read-only ({why}): pf serve makes no change until it is restarted with room on the store's disk"
            )));
        }
        if let Err(e) = self.audit.ready() {
            return Some(ApiError::unavailable(format!(
                "the audit log {} cannot be written ({e}): pf serve makes no change it cannot audit",
                self.audit.path().display()
            )));
        }
        None
    }

    /// Writes a change's audit line, and logs an API caller's: every change and refusal
    /// reaches the log (journald) as well as the audit file. The service's own changes
    /// (expiry, disabling at start) log lines of their own, with what to do about them.
    fn audit(&mut self, caller: Caller, action: &str, result: &str, v: &Value, e: Option<&str>) {
        // A device's mapping comes through the service itself (its caller is the tunnel
        // client the line names): logged like an API change.
        if caller != Caller::SERVICE || matches!(action, "map" | "unmap") {
            log_change(caller, action, result, v, e);
        }
        if let Err(err) = self.audit.write(caller, action, result, v, e) {
            tracing::error!(
                "the audit log {} lost a line ({action} {result}): {err}",
                self.audit.path().display()
            );
        }
    }

    /// Handles one API request; a change is made only if it can be audited, and is audited.
    pub fn handle(&mut self, request: Request, caller: Caller) -> Result<Value, ApiError> {
        let Some(action) = request.action() else {
            return self.read(request);
        };
        let subject = request.subject();
        if let Request::Malformed { error, .. } = request {
            self.metrics.refused(error.kind.code());
            self.audit(caller, action, "refused", &subject, Some(&error.message));
            return Err(error);
        }
        if let Some(refusal) = self.refuse_changes() {
            // Recorded if the log takes it (a read-only store, say); the change is refused
            // whether it does or not.
            self.metrics.refused(refusal.kind.code());
            log_change(caller, action, "refused", &subject, Some(&refusal.message));
            let _ = self
                .audit
                .write(caller, action, "refused", &subject, Some(&refusal.message));
            return Err(refusal);
        }
        let started = Instant::now();
        let result = self.change(request, caller);
        self.metrics.change_took(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.metrics.refused(e.rule.unwrap_or(e.kind.code()));
        }
        match &result {
            // A release or disable by owner wrote a line per reservation and its summary as
            // it went.
            Ok(_) if matches!(action, "release-owner" | "disable-owner") => {}
            // A device renews its mappings every minute or so: a renewal moves an expiry and
            // nothing else, and is logged at debug level rather than audited.
            Ok(done) if action == "map" && done["renewed"] == true => {
                tracing::debug!("renewed mapping {}: {subject}", done["id"]);
            }
            // A deletion of nothing changed nothing.
            Ok(done) if action == "unmap" && done["deleted"] == json!([]) => {}
            // What the device asked (protocol, client, ports) and what it got.
            Ok(done) if matches!(action, "map" | "unmap") => self.audit(
                caller,
                action,
                "ok",
                &json!({ "asked": subject, "done": done }),
                None,
            ),
            Ok(done) => self.audit(caller, action, "ok", done, None),
            Err(e) if e.partial => {
                self.audit(caller, action, "partial", &subject, Some(&e.message))
            }
            // A device repeats a refused request every minute or so: counted (metrics, and
            // the port-mapping server's answers), logged at debug, not audited.
            Err(e) if matches!(action, "map" | "unmap") => {
                tracing::debug!("{action} refused: {subject}: {}", e.message);
            }
            Err(e) => self.audit(caller, action, "refused", &subject, Some(&e.message)),
        }
        self.refresh_next_expiry();
        result
    }

    fn read(&mut self, request: Request) -> Result<Value, ApiError> {
        match request {
            Request::Wake => Ok(Value::Null),
            Request::Get(id) => {
                let record = self.get(id)?;
                Ok(self.records_json(&[record])?.remove(0))
            }
            Request::List(filter) => {
                let records = self.store.list_filtered(&filter)?;
                Ok(Value::Array(self.records_json(&records)?))
            }
            Request::Expired { owner } => expired_json(self.store.as_ref(), owner.as_deref()),
            Request::TunnelOwners => Ok(json!(
                self.store
                    .tunnel_owners()?
                    .into_iter()
                    .map(
                        |(address, owner)| json!({ "address": address.to_string(), "owner": owner })
                    )
                    .collect::<Vec<_>>()
            )),
            Request::Status => Ok(super::reads::status_json(
                self.published_status(),
                self.store.count()?,
                &self.dataplane.attachments(),
                &self.metrics,
            )),
            Request::Stats => {
                let state = self.open_state()?;
                let live = state.traffic_all()?;
                let drops = state.limit_drops_all()?;
                drop(state);
                Ok(serde_json::to_value(StatsView {
                    reservations: traffic_rows(self.store.as_ref(), live, &drops)?,
                })
                .expect("plain struct"))
            }
            Request::Health => {
                let mut problems: Vec<String> = self
                    .dataplane
                    .attachments()
                    .iter()
                    .filter(|a| !a.health.is_live())
                    .map(|a| {
                        format!(
                            "{} is not attached ({})",
                            a.iface,
                            AttachmentView::from(a).problem.unwrap_or_default()
                        )
                    })
                    .collect();
                if let Some(refusal) = self.refuse_changes() {
                    problems.insert(0, refusal.message);
                }
                if problems.is_empty() {
                    Ok(json!({ "status": "ok" }))
                } else {
                    Err(ApiError::unavailable(problems.join("; ")))
                }
            }
            Request::Reload { policy } => {
                match self.audit.reopen() {
                    Ok(()) => {
                        tracing::info!("reopened the audit log {}", self.audit.path().display())
                    }
                    Err(e) => tracing::error!(
                        "reopening the audit log {}: {e} (still writing the old file)",
                        self.audit.path().display()
                    ),
                }
                let Some(policy) = policy else {
                    return Ok(Value::Null);
                };
                let report = self.reload(*policy)?;
                tracing::info!(
                    "reloaded the policy: {} reservations break it{}",
                    report.violations,
                    match report.disabled {
                        0 => String::new(),
                        n => format!(", {n} disabled for it (policy.on_violation = \"disable\")"),
                    }
                );
                Ok(json!({ "violations": report.violations, "disabled": report.disabled }))
            }
            Request::Who { public, at_ms } => {
                super::reads::who_json(self.store.as_ref(), &public, at_ms)
            }
            Request::Drains => self.drains_json(),
            Request::Check(_) => Err(ApiError::unavailable(
                "a check is answered beside the engine, which does not wait on probes",
            )),
            _ => unreachable!("changes go through Engine::change"),
        }
    }

    fn change(&mut self, request: Request, caller: Caller) -> Result<Value, ApiError> {
        match request {
            Request::Reserve(r) => self.reserve(r).and_then(|r| self.view(r)),
            Request::Map(m) => self
                .map(m)
                .map(|a| serde_json::to_value(a).expect("plain struct")),
            Request::SetTunnelOwner { address, owner } => self.set_tunnel_owner(address, owner),
            Request::Release(id) => self
                .release(id)
                .map(|r| serde_json::to_value(r).expect("plain struct")),
            Request::ReleaseOwner(owner) => self.release_owner(&owner, caller),
            Request::DisableOwner { owner, reason } => self.disable_owner(&owner, &reason, caller),
            Request::Drain(d) => self.schedule_drain(d),
            Request::CancelDrain(id) => self.cancel_drain(id),
            // Answered as a list shows them: with their trigger rules and limits.
            Request::Renew { id, ttl } => self.renew(id, ttl).and_then(|r| self.view(r)),
            Request::SetEnabled { id, enabled } => {
                self.set_enabled(id, enabled).and_then(|r| self.view(r))
            }
            Request::Restore { id, ttl } => self.restore(id, ttl).and_then(|r| self.view(r)),
            Request::Change { id, change } => {
                self.change_in_place(id, change).and_then(|r| self.view(r))
            }
            _ => unreachable!("reads go through Engine::read"),
        }
    }

    /// Releases every reservation of `owner`, each its own change, audited as it lands (with
    /// the owner asked for): a failure part-way says which went before it.
    fn release_owner(&mut self, owner: &str, caller: Caller) -> Result<Value, ApiError> {
        let records = self.store.list(Some(owner))?;
        let total = records.len();
        let mut released = Vec::new();
        for r in records {
            match self.release(r.id) {
                Ok(done) => {
                    self.audit(
                        caller,
                        "release",
                        "ok",
                        &json!({ "owner_asked": owner, "reservation": done }),
                        None,
                    );
                    released.push(done);
                }
                Err(e) => {
                    let done = format!(
                        "released {} of {total} reservations of {owner}",
                        released.len()
                    );
                    return Err(stopped_part_way(&done, &released, r.id, e));
                }
            }
        }
        // The summary line names what went by id (each has its own line, with the record).
        let ids: Vec<u64> = released.iter().map(|r| r.id).collect();
        self.audit(
            caller,
            "release-owner",
            "ok",
            &json!({ "owner": owner, "released_ids": ids }),
            None,
        );
        Ok(serde_json::to_value(ReleasedByOwner {
            owner: owner.to_string(),
            released,
        })
        .expect("plain struct"))
    }

    /// Disables every enabled reservation of `owner` (a complaint about it): one audit line
    /// per reservation with the reason, then a summary. Its ports stay held, so nobody else
    /// gets them meanwhile; `pf enable` undoes it one by one.
    fn disable_owner(
        &mut self,
        owner: &str,
        reason: &str,
        caller: Caller,
    ) -> Result<Value, ApiError> {
        check_owner(owner)?;
        if reason.trim().is_empty() {
            return Err(ApiError::bad_request(
                "give a reason: the audit log keeps it with each reservation disabled",
            ));
        }
        check_note(reason)?;
        let mut disabled = Vec::new();
        for r in self
            .store
            .list(Some(owner))?
            .into_iter()
            .filter(|r| r.enabled)
        {
            match self.set_enabled(r.id, false) {
                Ok(done) => {
                    let view = record_view(&done);
                    self.audit(
                        caller,
                        "disable",
                        "ok",
                        &json!({ "owner_asked": owner, "reason": reason, "reservation": view }),
                        None,
                    );
                    disabled.push(view);
                }
                Err(e) => {
                    let done = format!("disabled {} reservations of {owner}", disabled.len());
                    return Err(stopped_part_way(&done, &disabled, r.id, e));
                }
            }
        }
        let ids: Vec<u64> = disabled.iter().map(|r| r.id).collect();
        self.audit(
            caller,
            "disable-owner",
            "ok",
            &json!({ "owner": owner, "reason": reason, "disabled_ids": ids }),
            None,
        );
        Ok(serde_json::to_value(crate::api::types::DisabledByOwner {
            owner: owner.to_string(),
            reason: reason.to_string(),
            disabled,
        })
        .expect("plain struct"))
    }

    /// The engine's part of `GET /v1/status` (the reservation count and the interfaces are
    /// read where the status is answered): published after every job and tick, so that the
    /// status never waits behind a change.
    pub fn published_status(&mut self) -> Value {
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            // Winding down: whether new reservations and renewals are taken, and the drains
            // still to come.
            "accept_new": self.policy.accept_new,
            "accept_renewals": self.policy.accept_renewals,
            "drains": self.pending_drains(),
            "next_expiry": self.next_expiry.map(rfc3339),
            "store_read_only": self.store.read_only(),
            "clock_offset_seconds": self.clock.offset_ms() / 1000,
            // The first ones, by id: a policy that narrowed may leave thousands.
            "policy_violations": self.violations().take(STATUS_VIOLATIONS).collect::<Vec<_>>(),
            "policy_violation_count": self.violations.len(),
            "last_reconcile": self.last_reconcile.map(|(at, drifts)| json!({
                "at": rfc3339(at),
                "drifts": drifts,
            })),
            // Whether the port-mapping server runs: its counts are read when the status is
            // answered (`reads::status_json`), not at every publish.
            "port_mapping": self.port_mapping.as_ref().map(|_| json!({})),
        })
    }

    /// One record as the API shows it.
    fn view(&mut self, r: Record) -> Result<Value, ApiError> {
        Ok(self.records_json(&[r])?.remove(0))
    }

    /// Records as the API shows them, trigger rules with their gates as the maps have them.
    fn records_json(&mut self, records: &[Record]) -> Result<Vec<Value>, ApiError> {
        let state = self.open_state().ok();
        let gate = |g: u16| state.as_ref().and_then(|s| s.trigger_gate(g).ok());
        let drops = |slot: u16| state.as_ref().and_then(|s| s.limit_drops(slot).ok());
        let now = self.now_ms();
        let kernel = super::reads::KernelReader {
            gate: &gate,
            drops: &drops,
        };
        super::reads::records_json(self.store.as_ref(), records, kernel, now)
    }

    fn get(&self, id: u64) -> Result<Record, ApiError> {
        self.store.get(id)?.ok_or_else(|| ApiError::not_found(id))
    }

    /// The server's listening sockets as the kernel has them now, if the policy asks.
    fn listening(&self) -> Listening {
        if self.policy.forbid_listening_ports {
            Listening::read()
        } else {
            Listening::default()
        }
    }

    /// The checks every new or restored reservation passes: the policy (with the server's
    /// listening ports, read by the caller, and its addresses as the kernel has them now),
    /// conflicts on both sides, and the owner's quota.
    fn admit(
        &self,
        owner: &str,
        reservation: &Reservation,
        listening: &Listening,
    ) -> Result<(), ApiError> {
        self.admit_with(owner, reservation, listening, &local_addresses()?)
    }

    /// [`Engine::admit`] with the server's addresses as the caller read them.
    fn admit_with(
        &self,
        owner: &str,
        reservation: &Reservation,
        listening: &Listening,
        local: &LocalAddresses,
    ) -> Result<(), ApiError> {
        self.policy.check(reservation, listening, local)?;
        let public = reservation.public;
        if let Some(existing) =
            self.store
                .public_overlap(public.addr, public.ports, public.protocols)?
        {
            return Err(ApiError::conflict_with(
                existing.id,
                format!(
                    "{public} overlaps reservation {} ({}, owner {})",
                    existing.id, existing.reservation, existing.owner
                ),
            ));
        }
        if let Some(existing) = self.store.target_overlap(
            reservation.target_addr,
            reservation.target_ports(),
            public.protocols,
            None,
        )? {
            return Err(ApiError::conflict_with(
                existing.id,
                format!(
                    "target {}:{}/{} is already the target of reservation {} ({}, owner {}); replies from it could not be mapped back to one public port",
                    reservation.target_addr,
                    reservation.target_ports(),
                    public.protocols,
                    existing.id,
                    existing.reservation,
                    existing.owner
                ),
            ));
        }
        if let Some(until) = self.quarantined_until(owner, &public)? {
            return Err(crate::service::policy::Refusal {
                rule: "policy.quarantine",
                detail: format!(
                    "{public} was released by another owner and is quarantined until {}",
                    rfc3339(until)
                ),
            }
            .into());
        }
        self.check_quota(owner, u64::from(public.ports.len()))
    }

    /// Until when `public` is out of `owner`'s reach: another owner's holding of any of its
    /// ports ended within `policy.quarantine` (the same owner may take its own ports back).
    fn quarantined_until(&self, owner: &str, public: &PublicSpec) -> Result<Option<u64>, ApiError> {
        let Some(q) = self.policy.quarantine else {
            return Ok(None);
        };
        let since = self.now_ms().saturating_sub(duration_ms(q));
        Ok(self
            .store
            .recent_holders(public.addr, public.ports, public.protocols, since)?
            .iter()
            .filter(|h| h.owner != owner)
            .filter_map(|h| h.until_ms)
            .max()
            .map(|until| until.saturating_add(duration_ms(q))))
    }

    /// The ranges on `addr` quarantined for `owner` now (see [`Engine::quarantined_until`]).
    fn quarantined_ports(
        &self,
        owner: &str,
        addr: Ipv4Addr,
        protocols: Protocols,
    ) -> Result<Vec<PortRange>, ApiError> {
        let Some(q) = self.policy.quarantine else {
            return Ok(Vec::new());
        };
        let since = self.now_ms().saturating_sub(duration_ms(q));
        let everywhere = PortRange {
            first: 1,
            last: u16::MAX,
        };
        Ok(self
            .store
            .recent_holders(addr, everywhere, protocols, since)?
            .into_iter()
            .filter(|h| h.owner != owner)
            .map(|h| h.public.ports)
            .collect())
    }

    /// Adds what `id`'s map entries counted (`live`, read just before they went) to the
    /// store's carried traffic; a failure is logged, as the change it follows is made.
    fn carry_traffic(&mut self, id: u64, live: Traffic) {
        if let Err(e) = self.store.add_traffic(id, live) {
            tracing::warn!("reservation {id}'s traffic so far is lost from its totals: {e}");
        }
    }

    /// The store's part of disabling `record`: what its entries counted is read from `state`
    /// and carried, so its totals go on from there when it is enabled again. The caller takes
    /// the entries out of the maps.
    fn disable_in_store(&mut self, state: &dyn Maps, record: &Record) -> Result<(), ApiError> {
        let live = live_traffic(state, record);
        self.store.set_enabled(record.id, false)?;
        self.carry_traffic(record.id, live);
        Ok(())
    }

    /// Refuses a change to reservation `id` while the last review holds a violation of it,
    /// other than those of the rules in `cured_by_this` (which the change answers).
    fn refuse_violation(&self, id: u64, cured_by_this: &[&str]) -> Result<(), ApiError> {
        match self.violations.get(&id) {
            Some(v) if !cured_by_this.contains(&v.rule) => {
                Err(ApiError::from(crate::service::policy::Refusal {
                    rule: v.rule,
                    detail: v.detail.clone(),
                }))
            }
            _ => Ok(()),
        }
    }

    /// Refuses `asked` more public ports for `owner` past `policy.ports_per_owner`.
    fn check_quota(&self, owner: &str, asked: u64) -> Result<(), ApiError> {
        let held = self.store.owner_ports(owner)?;
        if held + asked > self.policy.ports_per_owner {
            return Err(ApiError::from(crate::service::policy::Refusal {
                rule: "policy.ports_per_owner",
                detail: format!(
                    "owner {owner} holds {held} ports; {asked} more would pass the limit of {}",
                    self.policy.ports_per_owner
                ),
            }));
        }
        Ok(())
    }

    fn reserve(&mut self, req: ReserveRequest) -> Result<Record, ApiError> {
        self.policy.check_new()?;
        let owner = req.owner.as_str();
        check_owner(owner)?;
        let note = req.note.unwrap_or_default();
        check_note(&note)?;
        let ttl = lifetime_text(req.ttl, req.ttl_seconds)
            .map_err(ApiError::bad_request)?
            .as_deref()
            .map(parse_ttl)
            .transpose()
            .map_err(ApiError::bad_request)?;
        let ttl = self.policy.lifetime(ttl)?;
        let (addr, ports, protocols) = parse_public_request(&req.public)?;
        let target: TargetSpec = req.to.parse()?;
        // A port the service picks may be taken by another agent of the fleet between the
        // pick and the store's transaction, which checks again under the fleet's lock: then
        // another is picked, a few times.
        let mut picks_left = AUTOMATIC_PORT_TRIES;
        loop {
            // Read once: the automatic port and the policy check see the same sockets.
            let listening = self.listening();
            let reservation = match ports {
                Some(ports) => Reservation::new(
                    PublicSpec {
                        addr,
                        ports,
                        protocols,
                    },
                    target,
                )?,
                None => self.free_port(owner, addr, protocols, target, &listening)?,
            };
            self.admit(owner, &reservation, &listening)?;
            let trigger = req
                .trigger
                .as_ref()
                .map(|t| self.new_trigger(t, &reservation))
                .transpose()?;
            let limits = self.new_limits(owner, req.limits.as_ref())?;
            let now = self.now_ms();
            let ttl_ms = ttl.map(duration_ms);
            let new = NewRecord {
                owner: owner.to_string(),
                reservation,
                created_ms: now,
                ttl_ms,
                expires_ms: ttl_ms.map(|t| now.saturating_add(t)),
                enabled: true,
                note: note.clone(),
            };
            let extras = Extras {
                trigger: trigger.as_ref(),
                limits: limits.as_ref(),
                ..Extras::default()
            };
            // Past admit, a conflict is the store's own check finding the port taken.
            match self.commit_new(&new, extras) {
                Err(e) if e.kind == Failure::Conflict && ports.is_none() && picks_left > 1 => {
                    picks_left -= 1
                }
                done => return done,
            }
        }
    }

    /// Stores a new reservation (with its port mapping, if a device asked for it) and writes
    /// it into the maps. The store first: once committed, the reservation exists, and a crash
    /// before the maps are written is repaired by the next start's reconcile. If the maps
    /// refuse it, the record goes again.
    fn commit_new(&mut self, new: &NewRecord, extras: Extras<'_>) -> Result<Record, ApiError> {
        let reservation = new.reservation;
        let mut state = self.open_state()?;
        let record = self.store.insert_with(new, extras)?;
        let mapped = self.map_in(state.as_mut(), record.id, &reservation);
        if let Err(e) = mapped {
            return Err(match self.store.delete(record.id) {
                Ok(_) => e,
                // The record stays, and a start would forward it: say so, not "refused".
                Err(undo) => ApiError {
                    message: format!(
                        "{}; and removing reservation {} from the store again failed ({undo}): it stays there, disabled in nothing, and the next start forwards it unless it is released",
                        e.message, record.id
                    ),
                    partial: true,
                    ..e
                },
            });
        }
        Ok(record)
    }

    /// A random free port of the pool on `addr`, whose target port (the same port, unless the
    /// target names one) is free too.
    fn free_port(
        &mut self,
        owner: &str,
        addr: Ipv4Addr,
        protocols: Protocols,
        target: TargetSpec,
        listening: &Listening,
    ) -> Result<Reservation, ApiError> {
        let mut taken = vec![false; 65536];
        let quarantined = self.quarantined_ports(owner, addr, protocols)?;
        for r in self
            .store
            .used_public_ports(addr, protocols)?
            .into_iter()
            .chain(quarantined)
        {
            for p in r.ports() {
                taken[usize::from(p)] = true;
            }
        }
        let candidates: Vec<u16> = self
            .policy
            .port_pool
            .iter()
            .flat_map(|r| r.ports())
            .filter(|&p| !taken[usize::from(p)])
            .filter(|&p| self.policy.allows_port(addr, p, protocols, listening))
            .collect();
        if candidates.is_empty() {
            return Err(crate::service::policy::Refusal {
                rule: "policy.port_pool",
                detail: format!("no free port left in the pool on {addr}/{protocols}"),
            }
            .into());
        }
        // Start at a random candidate and take the first whose target side is free too.
        let start = self.rng.random_range(0..candidates.len());
        for &port in candidates[start..].iter().chain(&candidates[..start]) {
            let r = Reservation::new(
                PublicSpec {
                    addr,
                    ports: PortRange::single(port),
                    protocols,
                },
                target,
            )?;
            if self
                .store
                .target_overlap(r.target_addr, r.target_ports(), protocols, None)?
                .is_none()
            {
                return Ok(r);
            }
            if target.port.is_some() {
                break; // the fixed target port is taken whatever the public port
            }
        }
        Err(ApiError::conflict(format!(
            "target {}{} is already the target of another reservation for {protocols}",
            target.addr,
            target.port.map(|p| format!(":{p}")).unwrap_or_default()
        )))
    }

    /// Removes a reservation: the maps are opened (and checked to be the programs' maps)
    /// first, then the store lets go (the truth: a failure there changes nothing and says so),
    /// then the maps. If the maps fail after the store let go, the error says so and the
    /// engine reconciles at its next tick until the maps agree.
    fn release(&mut self, id: u64) -> Result<ReservationView, ApiError> {
        let record = self.get(id)?;
        let mut state = self.open_state()?;
        let total = self.store.traffic(id)? + live_traffic(state.as_ref(), &record);
        let now = self.now_ms();
        self.store.end(id, now)?;
        self.forget_violation(id);
        self.unmap_after_store(state.as_mut(), &record, "released")?;
        Ok(ReservationView {
            traffic: Some(total),
            ..record_view(&record)
        })
    }

    /// Takes `record` out of the maps after the store has; a failure schedules a repair.
    fn unmap_after_store(
        &mut self,
        state: &mut dyn Maps,
        record: &Record,
        done: &str,
    ) -> Result<(), ApiError> {
        if !record.enabled {
            return Ok(());
        }
        Self::unmap(state, record).map_err(|e| {
            self.repair = true;
            ApiError {
                message: format!(
                    "reservation {} is {done} in the store, but removing it from the kernel maps failed ({}); pf serve retries every second until the maps agree",
                    record.id, e.message
                ),
                partial: true,
                ..ApiError::internal("")
            }
        })
    }

    fn unmap(state: &mut dyn Maps, record: &Record) -> Result<(), ApiError> {
        match state.release_exact(&record.reservation) {
            Ok(_) => Ok(()),
            Err(PfError::NoSuchReservation { hint, .. }) => {
                tracing::warn!(
                    "drift: reservation {} ({}) was missing from the maps{hint}",
                    record.id,
                    record.reservation
                );
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn renew(&mut self, id: u64, ttl: Option<String>) -> Result<Record, ApiError> {
        let record = self.get(id)?;
        self.policy.check_renewal()?;
        let asked = asked_lifetime(ttl, &record)?;
        // A permanent reservation stays so unless a lifetime is given: renew never starts an
        // expiry nobody asked for (not even the policy's default_ttl).
        let Some(asked) = asked else {
            return Err(ApiError::bad_request(format!(
                "reservation {id} has no lifetime to renew: give a ttl"
            )));
        };
        let ttl = self.policy.lifetime(Some(asked))?.unwrap_or(asked);
        // A lifetime past max_ttl is what a renewal within it cures; any other violation the
        // review found (the quota) is not extended.
        self.refuse_violation(id, &["policy.max_ttl"])?;
        // Granted under an older policy that this one refuses: not extended.
        self.policy
            .check(&record.reservation, &self.listening(), &local_addresses()?)?;
        self.extend(id, duration_ms(ttl))?;
        self.get(id)
    }

    /// Sets `id`'s expiry to now plus `ttl_ms` (its lifetime from then on). Within max_ttl
    /// now: a lifetime granted under an older policy is cured.
    fn extend(&mut self, id: u64, ttl_ms: u64) -> Result<(), ApiError> {
        let expires = self.now_ms().saturating_add(ttl_ms);
        self.store.set_lifetime(id, Some(ttl_ms), Some(expires))?;
        if self
            .violations
            .get(&id)
            .is_some_and(|v| v.rule == "policy.max_ttl")
        {
            self.forget_violation(id);
        }
        Ok(())
    }

    fn set_enabled(&mut self, id: u64, enabled: bool) -> Result<Record, ApiError> {
        let record = self.get(id)?;
        if record.enabled == enabled {
            return Ok(record);
        }
        let mut state = self.open_state()?;
        if enabled {
            // The policy may have narrowed, and the server's addresses changed, since it was
            // made; and a violation the review found (its quota, its lifetime) stands.
            self.policy
                .check(&record.reservation, &self.listening(), &local_addresses()?)?;
            self.refuse_violation(id, &[])?;
            self.store.set_enabled(id, true)?;
            if let Err(e) = self.map_in(state.as_mut(), id, &record.reservation) {
                return Err(match self.store.set_enabled(id, false) {
                    Ok(_) => e,
                    Err(undo) => ApiError {
                        message: format!(
                            "{}; and disabling reservation {id} in the store again failed ({undo}): the store says enabled, and the next start forwards it unless it is disabled",
                            e.message
                        ),
                        partial: true,
                        ..e
                    },
                });
            }
        } else {
            self.disable_in_store(state.as_ref(), &record)?;
            self.unmap_after_store(state.as_mut(), &record, "disabled")?;
        }
        self.get(id)
    }

    /// Changes a reservation in place: its owner, note or target. The public side stays, so
    /// nobody can take the port in between (as they could between a release and a reserve).
    /// A new target passes the policy and the target-conflict check against every other
    /// reservation, a new owner the quota. An enabled reservation's entries are replaced in
    /// the maps (its traffic so far carried over); if the new ones are refused, the store and
    /// the old entries are put back.
    fn change_in_place(&mut self, id: u64, change: ChangeRequest) -> Result<Record, ApiError> {
        let record = self.get(id)?;
        if change == ChangeRequest::default() {
            return Err(ApiError::bad_request(
                "nothing to change: give to, owner or note",
            ));
        }
        let owner = change.owner.unwrap_or_else(|| record.owner.clone());
        check_owner(&owner)?;
        let note = change.note.unwrap_or_else(|| record.note.clone());
        check_note(&note)?;
        let reservation = match &change.to {
            Some(to) => Reservation::new(record.reservation.public, to.parse::<TargetSpec>()?)?,
            None => record.reservation,
        };
        let retarget = reservation != record.reservation;
        if retarget {
            self.policy
                .check(&reservation, &self.listening(), &local_addresses()?)?;
            // A trigger rule's client is its target: the new one may already trigger on its
            // ports (another rule of that address).
            if let Some(t) = self.store.trigger(id)?
                && reservation.target_addr != record.reservation.target_addr
            {
                let live = self.store.triggers()?;
                self.check_trigger_clash(&live, reservation.target_addr, &t.on, Some(id))?;
            }
            if let Some(existing) = self.store.target_overlap(
                reservation.target_addr,
                reservation.target_ports(),
                reservation.public.protocols,
                Some(id),
            )? {
                return Err(ApiError::conflict_with(
                    existing.id,
                    format!(
                        "target {}:{}/{} is already the target of reservation {} ({}, owner {})",
                        reservation.target_addr,
                        reservation.target_ports(),
                        reservation.public.protocols,
                        existing.id,
                        existing.reservation,
                        existing.owner
                    ),
                ));
            }
        }
        if owner != record.owner {
            self.check_quota(&owner, u64::from(record.reservation.public.ports.len()))?;
            self.check_limits_follow(id, &owner)?;
        }
        let mut state = if retarget && record.enabled {
            Some(self.open_state()?)
        } else {
            None
        };
        let live = state
            .as_deref()
            .map(|s| live_traffic(s, &record))
            .unwrap_or_default();
        let now = self.now_ms();
        self.store.change(id, &owner, &reservation, &note, now)?;
        // A device's mapping moved elsewhere by the provider is the provider's from now on:
        // the device that asked for it may no longer renew or delete it.
        if retarget {
            self.store.forget_mapping(id)?;
        }
        if let Some(state) = state.as_deref_mut() {
            let replaced =
                Self::unmap(state, &record).and_then(|()| self.map_in(state, id, &reservation));
            if let Err(e) = replaced {
                // The old entries come back with fresh counters: what they held stays counted.
                self.carry_traffic(id, live);
                let undo =
                    self.store
                        .change(id, &record.owner, &record.reservation, &record.note, now);
                let tags = self.entry_tags(id).unwrap_or_default();
                let back = if state
                    .is_complete_tagged(&record.reservation, tags)
                    .unwrap_or(false)
                {
                    Ok(())
                } else {
                    self.map_in(state, id, &record.reservation)
                };
                return Err(match (undo, back) {
                    (Ok(_), Ok(())) => e,
                    (undo, back) => {
                        self.repair = true;
                        ApiError {
                            message: format!(
                                "{}; and putting reservation {id} back failed (store: {}, maps: {}); pf serve reconciles the maps with the store every second",
                                e.message,
                                undo.map(|_| "ok".to_string())
                                    .unwrap_or_else(|u| u.to_string()),
                                back.map(|()| "ok".to_string())
                                    .unwrap_or_else(|b| b.message),
                            ),
                            partial: true,
                            ..e
                        }
                    }
                });
            }
            self.carry_traffic(id, live);
        }
        // A violation the change cured: a new target passed the policy's checks, a new owner
        // the quota. The lifetime is a renewal's to cure.
        let cured = self.violations.get(&id).is_some_and(|v| match v.rule {
            "policy.max_ttl" => false,
            "policy.ports_per_owner" => owner != record.owner,
            _ => retarget,
        });
        if cured {
            self.forget_violation(id);
        }
        self.get(id)
    }

    /// Brings an expired reservation back under its id, if it passes today's checks.
    fn restore(&mut self, id: u64, ttl: Option<String>) -> Result<Record, ApiError> {
        let Some((record, _)) = self
            .store
            .history(None)?
            .into_iter()
            .find(|(r, _)| r.id == id)
        else {
            return Err(ApiError {
                kind: Failure::NotFound,
                message: format!("no expired reservation with id {id}"),
                rule: None,
                partial: false,
                conflict_id: None,
            });
        };
        self.policy.check_new()?;
        let asked = asked_lifetime(ttl, &record)?;
        let ttl = self.policy.lifetime(asked)?;
        self.admit(&record.owner, &record.reservation, &self.listening())?;
        let mut state = self.open_state()?;
        let ttl_ms = ttl.map(duration_ms);
        let expires = ttl_ms.map(|t| self.now_ms().saturating_add(t));
        let restored = self
            .store
            .restore(id, ttl_ms, expires, self.now_ms())?
            .ok_or_else(|| ApiError::internal(format!("expired reservation {id} vanished")))?;
        // A trigger rule comes back as one (its old gate may have gone to another rule).
        let mapped = self
            .regate(id)
            .and_then(|()| self.reslot(id))
            .and_then(|()| {
                if restored.enabled {
                    self.map_in(state.as_mut(), id, &restored.reservation)
                } else {
                    Ok(())
                }
            });
        if let Err(e) = mapped {
            return Err(match self.store.expire(id, self.now_ms()) {
                Ok(_) => e,
                Err(undo) => ApiError {
                    message: format!(
                        "{}; and moving reservation {id} back to the expired history failed ({undo}): the store holds it, and the next start forwards it unless it is released",
                        e.message
                    ),
                    partial: true,
                    ..e
                },
            });
        }
        Ok(restored)
    }
}

mod drain;
mod expiry;
mod fleet;
pub mod limits;
pub mod mapping;
mod reconcile;
mod review;
#[cfg(test)]
mod tests;
pub mod trigger;

pub use reconcile::{ReconcileGuard, ReconcileReport};
pub use review::{ReloadReport, Violation};
