//! The service's one writer: every reservation change runs here, one at a time, against the
//! store (the truth) and then the kernel maps (its cache). Serial on purpose: conflict, quota
//! and automatic-port checks see every earlier change, so no port is handed out twice.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

use super::{
    dataplane::{DataPlane, Maps},
    policy::{Listening, LocalAddresses, Policy, parse_ttl},
    store::{NewRecord, Record, Store, StoreError},
};
use crate::{
    api::types::{ErrorBody, ForwardView, ReleasedByOwner, ReservationView, ReserveRequest},
    domain::spec::{
        PortRange, Protocols, PublicSpec, Reservation, SpecError, TargetSpec, parse_public_request,
    },
    kernel::PfError,
};

use super::audit::{Audit, Caller};

/// Longest owner id and note the service stores.
pub const MAX_OWNER_LEN: usize = 128;
pub const MAX_NOTE_LEN: usize = 1024;

/// How long after a failed expiry it is tried again.
const EXPIRY_RETRY_MS: u64 = 1000;

/// Reconcile logs this many drifts one by one, then a count.
const DRIFT_LOG_LIMIT: usize = 20;

/// Longest text of a request an audit line records.
const SUBJECT_TEXT_MAX: usize = 256;

/// How long expired reservations stay restorable.
pub const HISTORY_KEEP: Duration = Duration::from_secs(7 * 86_400);

/// How far the system clock may move from the service's own (see [`Clock`]) before a step is
/// reported.
const CLOCK_STEP_TOLERANCE_MS: u64 = 2_000;

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
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            kind: Failure::BadRequest,
            message: message.into(),
            rule: None,
            partial: false,
        }
    }
    fn not_found(id: u64) -> Self {
        Self {
            kind: Failure::NotFound,
            message: format!("no reservation with id {id} (see `pf list`)"),
            rule: None,
            partial: false,
        }
    }
    fn conflict(message: impl Into<String>) -> Self {
        Self {
            kind: Failure::Conflict,
            message: message.into(),
            rule: None,
            partial: false,
        }
    }
    fn internal(message: impl Into<String>) -> Self {
        Self {
            kind: Failure::Internal,
            message: message.into(),
            rule: None,
            partial: false,
        }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            kind: Failure::Unavailable,
            message: message.into(),
            rule: None,
            partial: false,
        }
    }
    pub fn to_json(&self) -> Value {
        serde_json::to_value(ErrorBody {
            error: self.message.clone(),
            rule: self.rule.map(str::to_string),
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
    fn from(e: StoreError) -> Self {
        Self::internal(e.to_string())
    }
}

impl From<crate::service::policy::Refusal> for ApiError {
    fn from(r: crate::service::policy::Refusal) -> Self {
        Self {
            kind: Failure::Refused,
            message: r.to_string(),
            rule: Some(r.rule),
            partial: false,
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

/// What the API asks of the engine.
#[derive(Debug)]
pub enum Request {
    Reserve(ReserveRequest),
    Get(u64),
    List {
        owner: Option<String>,
    },
    Release(u64),
    ReleaseOwner(String),
    Renew {
        id: u64,
        ttl: Option<String>,
    },
    SetEnabled {
        id: u64,
        enabled: bool,
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
    /// A change request the API could not even read (bad JSON, an unknown field, too large):
    /// refused, and audited like any refusal.
    Malformed {
        action: &'static str,
        subject: Value,
        error: ApiError,
    },
    /// SIGHUP: open the audit log's path again (logrotate moved the file).
    ReopenAudit,
}

impl Request {
    /// The audit log's name for a change; `None` for a read.
    fn action(&self) -> Option<&'static str> {
        Some(match self {
            Request::Reserve(_) => "reserve",
            Request::Release(_) => "release",
            Request::ReleaseOwner(_) => "release-owner",
            Request::Renew { .. } => "renew",
            Request::SetEnabled { enabled: true, .. } => "enable",
            Request::SetEnabled { enabled: false, .. } => "disable",
            Request::Restore { .. } => "restore",
            Request::Malformed { action, .. } => action,
            Request::Get(_)
            | Request::List { .. }
            | Request::Expired { .. }
            | Request::Status
            | Request::ReopenAudit => return None,
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
            }),
            Request::Release(id)
            | Request::Renew { id, .. }
            | Request::SetEnabled { id, .. }
            | Request::Restore { id, .. } => json!({ "id": id }),
            Request::ReleaseOwner(owner) => json!({ "owner": cut(owner) }),
            Request::Malformed { subject, .. } => subject.clone(),
            _ => Value::Null,
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The service's time: the system clock read once at start, then advanced by the monotonic
/// clock. Lifetimes run on elapsed time, so a step of the system clock (a bad NTP answer, an
/// admin's `date -s`) neither expires reservations early nor keeps them late; a step is
/// logged. A restart adopts the system clock again (and what fell due meanwhile expires, into
/// the restorable history).
pub struct Clock {
    start_ms: u64,
    start: Instant,
    /// The system clock's offset last reported, so a step is logged once.
    reported_offset_ms: i64,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Self {
            start_ms: now_ms(),
            start: Instant::now(),
            reported_offset_ms: 0,
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.start_ms
            .saturating_add(self.start.elapsed().as_millis() as u64)
    }

    /// Moves the service's time forward, as if `ms` had passed (host tests of expiry).
    #[cfg(test)]
    pub fn advance(&mut self, ms: u64) {
        self.start_ms += ms;
        self.reported_offset_ms -= ms as i64;
    }

    /// How far the system clock is ahead of the service's (negative: behind).
    pub fn offset_ms(&self) -> i64 {
        now_ms() as i64 - self.now_ms() as i64
    }

    /// Logs a step of the system clock away from the service's time, once per step.
    fn notice_steps(&mut self) {
        let offset = self.offset_ms();
        if offset.abs_diff(self.reported_offset_ms) > CLOCK_STEP_TOLERANCE_MS {
            eprintln!(
                "pf serve: warning: the system clock stepped {} by {}; lifetimes keep running on elapsed time, so nothing expires early or late (the system clock is now {} from pf's; a restart adopts it)",
                if offset > self.reported_offset_ms {
                    "forward"
                } else {
                    "back"
                },
                humantime::format_duration(Duration::from_secs(
                    (offset.abs_diff(self.reported_offset_ms) + 500) / 1000
                )),
                humantime::format_duration(Duration::from_secs(
                    (offset.unsigned_abs() + 500) / 1000
                )),
            );
            self.reported_offset_ms = offset;
        }
    }
}

/// The last instant RFC 3339 (four-digit years) can write: 9999-12-31T23:59:59.999Z.
const LATEST_RFC3339_MS: u64 = 253_402_300_799_999;

fn rfc3339(ms: u64) -> String {
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
    }
}

/// A record as the API's JSON.
pub fn record_json(r: &Record) -> Value {
    serde_json::to_value(record_view(r)).expect("plain struct")
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
fn check_owner(owner: &str) -> Result<(), ApiError> {
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

/// Logs a condition's `message` unless it is the one `last` holds: a failure that persists
/// is said once, and again only when it changes.
fn say_once(last: &mut Option<String>, message: String, line: impl FnOnce(&str) -> String) {
    if last.as_deref() != Some(message.as_str()) {
        eprintln!("pf serve: {}", line(&message));
        *last = Some(message);
    }
}

fn duration_ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX / 2)) as u64
}

/// What a start's reconcile may do without the admin's say-so.
#[derive(Debug, Clone, Copy)]
pub struct ReconcileGuard {
    /// `pf serve --force-reconcile`: the admin accepts whatever the reconcile removes.
    pub force: bool,
    /// The store file was missing or empty before this start.
    pub store_was_new: bool,
    /// The largest share of the maps' reservations a reconcile removes unasked.
    pub removal_limit: f64,
}

impl ReconcileGuard {
    /// No limits: repairs of the service's own failed writes.
    pub const REPAIR: ReconcileGuard = ReconcileGuard {
        force: true,
        store_was_new: false,
        removal_limit: 1.0,
    };
}

/// Removals a guarded reconcile makes without asking, whatever the share: a few strays are
/// ordinary drift.
const UNGUARDED_REMOVALS: usize = 10;

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
}

fn kernel_seed() -> u64 {
    let mut seed = [0u8; 8];
    // SAFETY: getrandom writes at most `seed.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if n != seed.len() as isize {
        // Only before the kernel's pool is initialised; the time is good enough to spread ports.
        return now_ms() ^ u64::from(std::process::id()) << 32;
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
        })
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
            Err(e) => eprintln!("pf serve: {e}"),
        }
    }

    /// pf's maps, for a change (see [`DataPlane::open`]).
    fn open_state(&mut self) -> Result<Box<dyn Maps>, PfError> {
        self.dataplane.open()
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

    fn audit(&mut self, caller: Caller, action: &str, result: &str, v: &Value, e: Option<&str>) {
        if let Err(err) = self.audit.write(caller, action, result, v, e) {
            eprintln!(
                "pf serve: error: the audit log {} lost a line ({action} {result}): {err}",
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
            self.audit(caller, action, "refused", &subject, Some(&error.message));
            return Err(error);
        }
        if let Some(refusal) = self.refuse_changes() {
            // Recorded if the log takes it (a read-only store, say); the change is refused
            // whether it does or not.
            let _ = self
                .audit
                .write(caller, action, "refused", &subject, Some(&refusal.message));
            return Err(refusal);
        }
        let result = self.change(request, caller);
        match &result {
            // A release by owner wrote a line per release and its summary as it went.
            Ok(_) if matches!(action, "release-owner") => {}
            Ok(done) => self.audit(caller, action, "ok", done, None),
            Err(e) if e.partial => {
                self.audit(caller, action, "partial", &subject, Some(&e.message))
            }
            Err(e) => self.audit(caller, action, "refused", &subject, Some(&e.message)),
        }
        self.refresh_next_expiry();
        result
    }

    fn read(&mut self, request: Request) -> Result<Value, ApiError> {
        match request {
            Request::Get(id) => Ok(record_json(&self.get(id)?)),
            Request::List { owner } => Ok(Value::Array(
                self.store
                    .list(owner.as_deref())?
                    .iter()
                    .map(record_json)
                    .collect(),
            )),
            Request::Expired { owner } => Ok(Value::Array(
                self.store
                    .history(owner.as_deref())?
                    .iter()
                    .map(|(r, at)| {
                        serde_json::to_value(ReservationView {
                            expired: Some(rfc3339(*at)),
                            ..record_view(r)
                        })
                        .expect("plain struct")
                    })
                    .collect(),
            )),
            Request::Status => Ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "reservations": self.store.count()?,
                "next_expiry": self.next_expiry.map(rfc3339),
                "store_read_only": self.store.read_only(),
                "clock_offset_seconds": self.clock.offset_ms() / 1000,
                "attached": self.dataplane.attachments()
                    .iter()
                    .map(|a| {
                        let mut v = json!({
                            "interface": a.iface,
                            "role": a.role.describe(),
                            "live": a.health.is_live(),
                        });
                        if let crate::kernel::attach::Health::Dead(why)
                        | crate::kernel::attach::Health::Unknown(why) = &a.health
                        {
                            v["problem"] = json!(why);
                        }
                        v
                    })
                    .collect::<Vec<_>>(),
            })),
            Request::ReopenAudit => match self.audit.reopen() {
                Ok(()) => {
                    eprintln!(
                        "pf serve: reopened the audit log {}",
                        self.audit.path().display()
                    );
                    Ok(Value::Null)
                }
                Err(e) => {
                    eprintln!(
                        "pf serve: error: reopening the audit log {}: {e} (still writing the old file)",
                        self.audit.path().display()
                    );
                    Err(ApiError::internal(e.to_string()))
                }
            },
            _ => unreachable!("changes go through Engine::change"),
        }
    }

    fn change(&mut self, request: Request, caller: Caller) -> Result<Value, ApiError> {
        match request {
            Request::Reserve(r) => self.reserve(r).map(|r| record_json(&r)),
            Request::Release(id) => self.release(id).map(|r| record_json(&r)),
            Request::ReleaseOwner(owner) => self.release_owner(&owner, caller),
            Request::Renew { id, ttl } => self.renew(id, ttl).map(|r| record_json(&r)),
            Request::SetEnabled { id, enabled } => {
                self.set_enabled(id, enabled).map(|r| record_json(&r))
            }
            Request::Restore { id, ttl } => self.restore(id, ttl).map(|r| record_json(&r)),
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
                Ok(r) => {
                    let done = record_view(&r);
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
                    let ids: Vec<String> = released
                        .iter()
                        .map(|r: &ReservationView| r.id.to_string())
                        .collect();
                    return Err(ApiError {
                        message: format!(
                            "released {} of {total} reservations of {owner} ({}), then reservation {}: {}",
                            ids.len(),
                            if ids.is_empty() {
                                "none".to_string()
                            } else {
                                ids.join(", ")
                            },
                            r.id,
                            e.message
                        ),
                        ..e
                    });
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

    fn get(&self, id: u64) -> Result<Record, ApiError> {
        self.store.get(id)?.ok_or_else(|| ApiError::not_found(id))
    }

    /// The checks every new or restored reservation passes: the policy (with the server's
    /// listening ports and addresses as the kernel has them now), conflicts on both sides,
    /// and the owner's quota.
    fn admit(&self, owner: &str, reservation: &Reservation) -> Result<(), ApiError> {
        let listening = if self.policy.forbid_listening_ports {
            Listening::read()
        } else {
            Listening::default()
        };
        self.policy
            .check(reservation, &listening, &local_addresses()?)?;
        let public = reservation.public;
        if let Some(existing) =
            self.store
                .public_overlap(public.addr, public.ports, public.protocols)?
        {
            return Err(ApiError::conflict(format!(
                "{public} overlaps reservation {} ({}, owner {})",
                existing.id, existing.reservation, existing.owner
            )));
        }
        if let Some(existing) = self.store.target_overlap(
            reservation.target_addr,
            reservation.target_ports(),
            public.protocols,
        )? {
            return Err(ApiError::conflict(format!(
                "target {}:{}/{} is already the target of reservation {} ({}, owner {}); replies from it could not be mapped back to one public port",
                reservation.target_addr,
                reservation.target_ports(),
                public.protocols,
                existing.id,
                existing.reservation,
                existing.owner
            )));
        }
        let held = self.store.owner_ports(owner)?;
        let asked = u64::from(public.ports.len());
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
        let owner = req.owner.as_str();
        check_owner(owner)?;
        let note = req.note.unwrap_or_default();
        check_note(&note)?;
        let ttl = req
            .ttl
            .as_deref()
            .map(parse_ttl)
            .transpose()
            .map_err(ApiError::bad_request)?;
        let ttl = self.policy.lifetime(ttl)?;
        let (addr, ports, protocols) = parse_public_request(&req.public)?;
        let target: TargetSpec = req.to.parse()?;
        let reservation = match ports {
            Some(ports) => Reservation::new(
                PublicSpec {
                    addr,
                    ports,
                    protocols,
                },
                target,
            )?,
            None => self.free_port(addr, protocols, target)?,
        };
        self.admit(owner, &reservation)?;
        let now = self.now_ms();
        let ttl_ms = ttl.map(duration_ms);
        let new = NewRecord {
            owner: owner.to_string(),
            reservation,
            created_ms: now,
            ttl_ms,
            expires_ms: ttl_ms.map(|t| now.saturating_add(t)),
            enabled: true,
            note,
        };
        // The store first: once committed, the reservation exists, and a crash before the maps
        // are written is repaired by the next start's reconcile. If the maps refuse it, the
        // record goes again.
        let mut state = self.open_state()?;
        let record = self.store.insert(&new)?;
        if let Err(e) = state.reserve(&reservation) {
            let e = ApiError::from(e);
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
        addr: Ipv4Addr,
        protocols: Protocols,
        target: TargetSpec,
    ) -> Result<Reservation, ApiError> {
        let listening = if self.policy.forbid_listening_ports {
            Listening::read()
        } else {
            Listening::default()
        };
        let mut taken = vec![false; 65536];
        for r in self.store.used_public_ports(addr, protocols)? {
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
            .filter(|&p| self.policy.allows_port(addr, p, protocols, &listening))
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
                .target_overlap(r.target_addr, r.target_ports(), protocols)?
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
    fn release(&mut self, id: u64) -> Result<Record, ApiError> {
        let record = self.get(id)?;
        let mut state = self.open_state()?;
        self.store.delete(id)?;
        self.unmap_after_store(state.as_mut(), &record, "released")?;
        Ok(record)
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
                eprintln!(
                    "pf serve: drift: reservation {} ({}) was missing from the maps{hint}",
                    record.id, record.reservation
                );
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn renew(&mut self, id: u64, ttl: Option<String>) -> Result<Record, ApiError> {
        let record = self.get(id)?;
        let asked = ttl
            .as_deref()
            .map(parse_ttl)
            .transpose()
            .map_err(ApiError::bad_request)?
            .or(record.ttl_ms.map(Duration::from_millis));
        // A permanent reservation stays so unless a lifetime is given: renew never starts an
        // expiry nobody asked for (not even the policy's default_ttl).
        let Some(asked) = asked else {
            return Err(ApiError::bad_request(format!(
                "reservation {id} has no lifetime to renew: give a ttl"
            )));
        };
        let ttl = self.policy.lifetime(Some(asked))?.unwrap_or(asked);
        let ttl_ms = duration_ms(ttl);
        let expires = self.now_ms().saturating_add(ttl_ms);
        self.store.set_lifetime(id, Some(ttl_ms), Some(expires))?;
        self.get(id)
    }

    fn set_enabled(&mut self, id: u64, enabled: bool) -> Result<Record, ApiError> {
        let record = self.get(id)?;
        if record.enabled == enabled {
            return Ok(record);
        }
        let mut state = self.open_state()?;
        if enabled {
            // The server's addresses may have changed since it was made.
            self.policy
                .check_target(&record.reservation, &local_addresses()?)?;
            self.store.set_enabled(id, true)?;
            if let Err(e) = state.reserve(&record.reservation) {
                let e = ApiError::from(e);
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
            self.store.set_enabled(id, false)?;
            self.unmap_after_store(state.as_mut(), &record, "disabled")?;
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
                message: format!("no expired reservation with id {id} (see `pf list --expired`)"),
                rule: None,
                partial: false,
            });
        };
        let asked = ttl
            .as_deref()
            .map(parse_ttl)
            .transpose()
            .map_err(ApiError::bad_request)?
            .or(record.ttl_ms.map(Duration::from_millis));
        let ttl = self.policy.lifetime(asked)?;
        self.admit(&record.owner, &record.reservation)?;
        let mut state = self.open_state()?;
        let ttl_ms = ttl.map(duration_ms);
        let expires = ttl_ms.map(|t| self.now_ms().saturating_add(t));
        let restored = self
            .store
            .restore(id, ttl_ms, expires)?
            .ok_or_else(|| ApiError::internal(format!("expired reservation {id} vanished")))?;
        if restored.enabled
            && let Err(e) = state.reserve(&restored.reservation)
        {
            let e = ApiError::from(e);
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

    /// One tick of the engine's own work: repairs, expiry, history purge, clock steps.
    pub fn tick(&mut self) {
        self.clock.notice_steps();
        if self.repair {
            match self.reconcile(ReconcileGuard::REPAIR) {
                Ok(_) => {
                    self.repair = false;
                    self.repair_failing = None;
                    eprintln!("pf serve: repaired the maps: they agree with the store again");
                }
                Err(e) => say_once(&mut self.repair_failing, e.message, |m| {
                    format!("repairing the maps fails, retrying every second: {m}")
                }),
            }
        }
        self.expire_due();
        if self.store.read_only().is_none()
            && self
                .purged
                .is_none_or(|t| t.elapsed() > Duration::from_secs(3600))
        {
            let before = self.now_ms().saturating_sub(duration_ms(HISTORY_KEEP));
            match self.store.purge_history(before) {
                Ok(0) => {}
                Ok(n) => eprintln!(
                    "pf serve: forgot {n} reservations that expired more than {} ago",
                    humantime::format_duration(HISTORY_KEEP)
                ),
                Err(e) => eprintln!("pf serve: {e}"),
            }
            self.purged = Some(Instant::now());
        }
    }

    /// Moves every reservation whose expiry has passed into the restorable history, and out
    /// of the maps; each is audited, so nothing expires unless the audit log takes it, and
    /// nothing is touched unless the maps are the programs' own.
    pub fn expire_due(&mut self) {
        let now = self.now_ms();
        if self.next_expiry.is_none_or(|t| t > now) {
            return;
        }
        let retry = |engine: &mut Engine| {
            // Not at once: the due record is still there, and retrying in a loop would spin.
            let retry = now.saturating_add(EXPIRY_RETRY_MS);
            engine.next_expiry = Some(engine.next_expiry.map_or(retry, |t| t.max(retry)));
        };
        let blocked = match self.refuse_changes() {
            Some(refusal) => Err(refusal),
            None => self.open_state().map_err(ApiError::from),
        };
        let mut state = match blocked {
            Ok(state) => {
                if self.expiry_blocked.take().is_some() {
                    eprintln!("pf serve: expiry goes on again");
                }
                state
            }
            Err(refusal) => {
                say_once(&mut self.expiry_blocked, refusal.message, |m| {
                    format!("expiry waits, retrying every {EXPIRY_RETRY_MS} ms: {m}")
                });
                retry(self);
                return;
            }
        };
        let due = match self.store.expired(now) {
            Ok(due) => due,
            Err(e) => {
                eprintln!("pf serve: {e}");
                retry(self);
                return;
            }
        };
        let mut failed = false;
        for record in due {
            if let Err(e) = self.store.expire(record.id, now) {
                failed = true;
                eprintln!(
                    "pf serve: could not expire reservation {}: {e} (trying again in {EXPIRY_RETRY_MS} ms)",
                    record.id
                );
                continue;
            }
            let unmapped = self.unmap_after_store(state.as_mut(), &record, "expired");
            eprintln!(
                "pf serve: expired reservation {} ({}, owner {}); restorable for {} (`pf restore {}`)",
                record.id,
                record.reservation,
                record.owner,
                humantime::format_duration(HISTORY_KEEP),
                record.id
            );
            match unmapped {
                Ok(()) => self.audit(Caller::SERVICE, "expire", "ok", &record_json(&record), None),
                Err(e) => {
                    eprintln!("pf serve: {}", e.message);
                    self.audit(
                        Caller::SERVICE,
                        "expire",
                        "partial",
                        &record_json(&record),
                        Some(&e.message),
                    );
                }
            }
        }
        drop(state);
        self.refresh_next_expiry();
        if failed {
            retry(self);
        }
    }

    /// Disables each enabled reservation whose target is the server itself (made before the
    /// rule existed, or before the server took that address): reported, audited, and kept
    /// out of the maps. Returns how many.
    pub fn disable_server_targets(&mut self) -> Result<usize, ApiError> {
        let local = local_addresses()?;
        let offending = self
            .store
            .list(None)?
            .into_iter()
            .filter(|r| r.enabled && self.policy.check_target(&r.reservation, &local).is_err())
            .count();
        if offending > 0
            && self.store.read_only().is_none()
            && let Err(e) = self.audit.ready()
        {
            return Err(ApiError::unavailable(format!(
                "{offending} reservations target the server itself and must be disabled, but the audit log {} cannot be written ({e})",
                self.audit.path().display()
            )));
        }
        let mut disabled = 0;
        for record in self.store.list(None)?.into_iter().filter(|r| r.enabled) {
            let Err(refusal) = self.policy.check_target(&record.reservation, &local) else {
                continue;
            };
            if self.store.read_only().is_some() {
                eprintln!(
                    "pf serve: warning: reservation {} ({}) breaks {}: {} (the store is read-only, so it stays)",
                    record.id, record.reservation, refusal.rule, refusal.detail
                );
                continue;
            }
            self.store.set_enabled(record.id, false)?;
            disabled += 1;
            eprintln!(
                "pf serve: disabled reservation {} ({}, owner {}): {refusal}",
                record.id, record.reservation, record.owner
            );
            let mut done = record_json(&record);
            done["enabled"] = json!(false);
            self.audit(
                Caller::SERVICE,
                "disable",
                "ok",
                &done,
                Some(&refusal.to_string()),
            );
        }
        Ok(disabled)
    }

    /// The start, in an order that changes nothing before it knows the store is the right
    /// one: the reconcile guard is checked first, then what fell due while the service was
    /// down expires, reservations that target the server are disabled, and the maps are
    /// reconciled. Returns the reconcile's report and how many were disabled.
    pub fn start(&mut self, guard: ReconcileGuard) -> Result<(ReconcileReport, usize), ApiError> {
        {
            let state = self.open_state()?;
            self.check_guard(state.as_ref(), guard)?;
        }
        self.expire_due();
        let disabled = self.disable_server_targets()?;
        let report = self.reconcile(ReconcileGuard::REPAIR)?;
        Ok((report, disabled))
    }

    /// Refuses a reconcile that would remove what a new store or a large share implies was
    /// lost, not meant (see [`ReconcileGuard`]).
    fn check_guard(&self, state: &dyn Maps, guard: ReconcileGuard) -> Result<(), ApiError> {
        if guard.force {
            return Ok(());
        }
        let actual = state.list()?;
        let records = self.store.list(None)?;
        let stored: std::collections::HashSet<&Reservation> =
            records.iter().map(|r| &r.reservation).collect();
        let unknown = actual.iter().filter(|r| !stored.contains(r)).count();
        if unknown == 0 {
            return Ok(());
        }
        if guard.store_was_new {
            return Err(ApiError::unavailable(format!(
                "the reservation store is new or empty, but the kernel maps hold {unknown} reservations it does not know: starting would stop forwarding them all. If the store's path is wrong, fix service.database; if the store really was lost and those reservations should go, start once with `pf serve --force-reconcile`"
            )));
        }
        let share = unknown as f64 / actual.len() as f64;
        if unknown > UNGUARDED_REMOVALS && share > guard.removal_limit {
            return Err(ApiError::unavailable(format!(
                "the kernel maps hold {unknown} of {} reservations that the store does not know ({:.0}%, more than service.reconcile_removal_limit = {:.0}%): starting would stop forwarding them. If the store is the wrong one, fix service.database; if they should go, start once with `pf serve --force-reconcile`",
                actual.len(),
                share * 100.0,
                guard.removal_limit * 100.0
            )));
        }
        Ok(())
    }

    /// Makes the maps hold exactly the store's enabled reservations: removes what the store
    /// does not have, adds what is missing, and logs each difference. `guard` refuses (before
    /// any change) a reconcile that would remove what a new store or a large share implies
    /// was lost, not meant.
    pub fn reconcile(&mut self, guard: ReconcileGuard) -> Result<ReconcileReport, ApiError> {
        let records = self.store.list(None)?;
        let desired: Vec<Reservation> = records
            .iter()
            .filter(|r| r.enabled)
            .map(|r| r.reservation)
            .collect();
        let mut state = self.open_state()?;
        let actual = state.list()?;
        let want: std::collections::HashSet<&Reservation> = desired.iter().collect();
        let have: std::collections::HashSet<&Reservation> = actual.iter().collect();
        self.check_guard(state.as_ref(), guard)?;
        let mut drifts = Vec::new();
        // Records the store does not have go, with their entries.
        for r in actual.iter().filter(|r| !want.contains(r)) {
            state.release(&r.public)?;
            drifts.push(format!("removed {r}: in the maps, not in the store"));
        }
        // Records whose entries are not all there (a crash in the middle of a write or a
        // removal) are written again, whole.
        let mut intact = Vec::new();
        let mut absent = Vec::new();
        let mut rewrite = Vec::new();
        for r in desired.iter() {
            if !have.contains(r) {
                absent.push(*r);
            } else if state.is_complete(r)? {
                intact.push(*r);
            } else {
                state.release(&r.public)?;
                drifts.push(format!(
                    "rewrote {r}: some of its entries were missing or wrong"
                ));
                rewrite.push(*r);
            }
        }
        // Entries no intact reservation accounts for: orphans, and what a half-written
        // reservation left, which is about to be written whole.
        for entry in state.prune(&intact)? {
            drifts.push(format!(
                "removed {entry}: an entry no reservation accounts for"
            ));
        }
        let missing: Vec<Reservation> = absent.iter().chain(&rewrite).copied().collect();
        state.reserve_all(&missing)?;
        let guarded: Vec<(Ipv4Addr, u8)> = if self.policy.drop_tunnel_source_leaks {
            self.policy
                .target_networks
                .iter()
                .map(|n| (n.addr, n.prefix))
                .collect()
        } else {
            Vec::new()
        };
        if state.tunnel_networks()? != guarded {
            state.set_tunnel_networks(&guarded)?;
            eprintln!(
                "pf serve: egress drops unrewritten packets from the tunnel networks: {}",
                if guarded.is_empty() {
                    "none (policy.drop_tunnel_source_leaks = false)".to_string()
                } else {
                    guarded
                        .iter()
                        .map(|(a, p)| format!("{a}/{p}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
        // Empty maps are a fresh boot (or a first start), not drift: one line says so.
        let fresh = actual.is_empty() && drifts.is_empty();
        if fresh {
            if !absent.is_empty() {
                eprintln!(
                    "pf serve: the maps were empty: loaded {} reservations from the store",
                    absent.len()
                );
            }
        } else {
            for r in &absent {
                drifts.push(format!("added {r}: in the store, not in the maps"));
            }
        }
        for d in drifts.iter().take(DRIFT_LOG_LIMIT) {
            eprintln!("pf serve: drift: {d}");
        }
        if drifts.len() > DRIFT_LOG_LIMIT {
            eprintln!(
                "pf serve: drift: ... and {} more",
                drifts.len() - DRIFT_LOG_LIMIT
            );
        }
        Ok(ReconcileReport {
            reservations: desired.len(),
            loaded: if fresh { absent.len() } else { 0 },
            drifts: drifts.len(),
        })
    }
}

/// What a reconcile did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Enabled reservations in the store (and now in the maps).
    pub reservations: usize,
    /// Reservations written to maps that were empty (a boot): not drift.
    pub loaded: usize,
    /// Differences found and repaired.
    pub drifts: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{
        audit::Audit, dataplane::fake::FakeDataPlane, policy::Config, store::SqliteStore,
    };

    const CALLER: Caller = Caller {
        uid: Some(0),
        pid: Some(1),
    };

    /// An engine on an in-memory store and a fake data plane (kept, to look inside), with a
    /// small pool and quota; its audit log in a scratch directory.
    fn engine() -> (Engine, FakeDataPlane, std::path::PathBuf) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pf-engine-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = Config::parse(
            r#"
[policy]
public_ips = ["198.51.100.1"]
target_networks = ["10.200.0.0/16"]
port_pool = ["30000-30009"]
forbid_listening_ports = false
ports_per_owner = 3
"#,
        )
        .unwrap();
        let fake = FakeDataPlane::default();
        let engine = Engine::new(
            Box::new(SqliteStore::in_memory().unwrap()),
            Box::new(fake.clone()),
            config.policy,
            Audit::open(&dir.join("audit.jsonl")).unwrap(),
        )
        .unwrap();
        (engine, fake, dir)
    }

    fn reserve(
        e: &mut Engine,
        owner: &str,
        public: &str,
        to: &str,
        ttl: Option<&str>,
    ) -> Result<Value, ApiError> {
        e.handle(
            Request::Reserve(ReserveRequest {
                owner: owner.into(),
                public: public.into(),
                to: to.into(),
                ttl: ttl.map(Into::into),
                note: None,
            }),
            CALLER,
        )
    }

    /// Reserves `public` for acct-1 towards 10.200.0.2; its id.
    fn reserved(e: &mut Engine, public: &str, ttl: Option<&str>) -> u64 {
        reserve(e, "acct-1", public, "10.200.0.2", ttl).unwrap()["id"]
            .as_u64()
            .unwrap()
    }

    fn ids(v: &Value) -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn reserve_checks_conflicts_quota_and_hands_out_distinct_free_ports() {
        let (mut e, fake, _dir) = engine();
        reserve(
            &mut e,
            "acct-1",
            "198.51.100.1:30000/tcp",
            "10.200.0.2",
            None,
        )
        .unwrap();
        assert_eq!(
            fake.held(),
            vec!["198.51.100.1:30000/tcp -> 10.200.0.2:30000"]
        );
        let conflict = reserve(
            &mut e,
            "acct-2",
            "198.51.100.1:30000/both",
            "10.200.0.3",
            None,
        )
        .unwrap_err();
        assert_eq!(conflict.kind, Failure::Conflict, "{}", conflict.message);
        let a = reserve(&mut e, "acct-1", "198.51.100.1/tcp", "10.200.0.4", None).unwrap();
        let b = reserve(&mut e, "acct-1", "198.51.100.1/tcp", "10.200.0.5", None).unwrap();
        let ports = [
            a["first_port"].as_u64().unwrap(),
            b["first_port"].as_u64().unwrap(),
        ];
        assert!(
            ports.iter().all(|p| (30001..=30009).contains(p)) && ports[0] != ports[1],
            "{ports:?}"
        );
        let quota = reserve(&mut e, "acct-1", "198.51.100.1/tcp", "10.200.0.6", None).unwrap_err();
        assert_eq!(quota.rule, Some("policy.ports_per_owner"));
        let outside =
            reserve(&mut e, "acct-2", "198.51.100.1:30001/udp", "10.9.0.2", None).unwrap_err();
        assert_eq!(outside.rule, Some("policy.target_networks"));
        // The refusals changed nothing.
        assert_eq!(fake.held().len(), 3);
        assert_eq!(
            ids(&e.handle(Request::List { owner: None }, CALLER).unwrap()).len(),
            3
        );
    }

    #[test]
    fn a_map_write_that_fails_leaves_nothing_stored() {
        let (mut e, fake, dir) = engine();
        fake.0.lock().unwrap().fail_next_write = Some("no memory".into());
        let err = reserve(
            &mut e,
            "acct-1",
            "198.51.100.1:30000/tcp",
            "10.200.0.2",
            None,
        )
        .unwrap_err();
        assert_eq!(err.kind, Failure::Internal);
        assert!(err.message.contains("no memory") && !err.partial, "{err:?}");
        assert_eq!(
            e.handle(Request::List { owner: None }, CALLER).unwrap(),
            json!([])
        );
        assert!(fake.held().is_empty());
        let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
        assert!(audit.contains(r#""result":"refused""#), "{audit}");
    }

    #[test]
    fn disable_enable_and_release_keep_store_and_maps_together() {
        let (mut e, fake, _dir) = engine();
        let id = reserved(&mut e, "198.51.100.1:30000-30001/both", None);
        let done = e
            .handle(Request::SetEnabled { id, enabled: false }, CALLER)
            .unwrap();
        assert_eq!(done["enabled"], json!(false));
        assert!(fake.held().is_empty());
        e.handle(Request::SetEnabled { id, enabled: true }, CALLER)
            .unwrap();
        assert_eq!(fake.held().len(), 1);
        e.handle(Request::Release(id), CALLER).unwrap();
        assert!(fake.held().is_empty());
        assert_eq!(
            e.handle(Request::Release(id), CALLER).unwrap_err().kind,
            Failure::NotFound
        );
    }

    #[test]
    fn a_release_the_maps_refuse_is_partial_and_repaired() {
        let (mut e, fake, dir) = engine();
        let id = reserved(&mut e, "198.51.100.1:30000/tcp", None);
        fake.0.lock().unwrap().fail_next_write = Some("busy".into());
        let err = e.handle(Request::Release(id), CALLER).unwrap_err();
        assert!(
            err.partial && err.message.contains("released in the store"),
            "{err:?}"
        );
        assert_eq!(fake.held().len(), 1, "the fake refused the removal");
        let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
        assert!(audit.contains(r#""result":"partial""#), "{audit}");
        // The next tick reconciles: the maps follow the store.
        e.tick();
        assert!(fake.held().is_empty());
    }

    #[test]
    fn expiry_moves_to_the_history_and_restore_brings_back() {
        let (mut e, fake, _dir) = engine();
        let id = reserved(&mut e, "198.51.100.1:30000/tcp", Some("10s"));
        e.clock.advance(9_000);
        e.tick();
        assert_eq!(fake.held().len(), 1, "expired early");
        e.clock.advance(2_000);
        e.tick();
        assert!(fake.held().is_empty());
        assert_eq!(
            e.handle(Request::List { owner: None }, CALLER).unwrap(),
            json!([])
        );
        let history = e.handle(Request::Expired { owner: None }, CALLER).unwrap();
        assert_eq!(ids(&history), vec![id]);
        let back = e
            .handle(
                Request::Restore {
                    id,
                    ttl: Some("1h".into()),
                },
                CALLER,
            )
            .unwrap();
        assert_eq!(back["id"], json!(id));
        assert_eq!(fake.held().len(), 1);
    }

    #[test]
    fn a_start_refuses_to_empty_the_maps_from_a_new_store() {
        let (mut e, fake, _dir) = engine();
        let stranger = Reservation::new(
            "198.51.100.1:30005/udp".parse().unwrap(),
            "10.200.0.9".parse().unwrap(),
        )
        .unwrap();
        e.dataplane.open().unwrap().reserve(&stranger).unwrap();
        let guard = ReconcileGuard {
            force: false,
            store_was_new: true,
            removal_limit: 0.25,
        };
        let err = e.start(guard).unwrap_err();
        assert_eq!(err.kind, Failure::Unavailable);
        assert!(err.message.contains("--force-reconcile"), "{}", err.message);
        assert_eq!(fake.held().len(), 1, "a refused start changed the maps");
        let (report, _) = e
            .start(ReconcileGuard {
                force: true,
                ..guard
            })
            .unwrap();
        assert_eq!(report.drifts, 1);
        assert!(fake.held().is_empty());
        // The leak guard is set from the policy's target networks.
        assert_eq!(
            fake.0.lock().unwrap().tunnel_networks,
            vec![("10.200.0.0".parse().unwrap(), 16)]
        );
    }

    #[test]
    fn owners_are_visible_ascii_and_notes_hide_nothing() {
        for ok in ["acct-7", "user@example.com", "tunnel:10.8.0.2", "a/b+c=d"] {
            check_owner(ok).unwrap_or_else(|e| panic!("{ok}: {}", e.message));
        }
        for (bad, needle) in [
            ("", "owner is empty"),
            ("acct 7", "' '"),
            ("acct\u{202e}7", "U+202E"),
            ("acct\u{200b}7", "U+200B"),
            ("\u{0430}cct-7", "U+0430"), // Cyrillic a
            ("acct\t7", "U+0009"),
        ] {
            let e = check_owner(bad).unwrap_err();
            assert_eq!(e.kind, Failure::BadRequest);
            assert!(e.message.contains(needle), "{bad:?}: {}", e.message);
        }
        assert!(check_owner(&"x".repeat(MAX_OWNER_LEN + 1)).is_err());
        check_note("Plex auf dem NAS – 日本語 ok").unwrap();
        for bad in [
            "a\u{202e}b",
            "a\u{2066}b",
            "a\u{feff}b",
            "a\nb",
            "a\u{2028}b",
        ] {
            let e = check_note(bad).unwrap_err();
            assert!(e.message.contains("U+"), "{bad:?}: {}", e.message);
        }
    }
}
