//! The service's one writer: every reservation change runs here, one at a time, against the
//! store (the truth) and then the kernel maps (its cache). Serial on purpose: conflict, quota
//! and automatic-port checks see every earlier change, so no port is handed out twice.

use std::{
    net::Ipv4Addr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    bpffs::PinDir,
    error::PfError,
    policy::{Listening, Policy, parse_ttl},
    spec::{
        PortRange, Protocols, PublicSpec, Reservation, SpecError, TargetSpec, parse_public_request,
    },
    state::State,
    store::{NewRecord, Record, Store, StoreError},
};

use super::audit::{Audit, Caller};

/// Longest owner id and note the service stores.
pub const MAX_OWNER_LEN: usize = 128;
pub const MAX_NOTE_LEN: usize = 1024;

/// How long after a failed expiry it is tried again.
const EXPIRY_RETRY_MS: u64 = 1000;

/// Reconcile logs this many drifts one by one, then a count.
const DRIFT_LOG_LIMIT: usize = 20;

/// An API failure: its HTTP status and a one-line message naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// The policy rule that refused the request, if one did.
    pub rule: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            rule: None,
        }
    }
    fn not_found(id: u64) -> Self {
        Self {
            status: 404,
            message: format!("no reservation with id {id} (see `pf list`)"),
            rule: None,
        }
    }
    fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: 409,
            message: message.into(),
            rule: None,
        }
    }
    fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
            rule: None,
        }
    }
    pub fn to_json(&self) -> Value {
        match self.rule {
            Some(rule) => json!({ "error": self.message, "rule": rule }),
            None => json!({ "error": self.message }),
        }
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

impl From<crate::policy::Refusal> for ApiError {
    fn from(r: crate::policy::Refusal) -> Self {
        Self {
            status: 403,
            message: r.to_string(),
            rule: Some(r.rule),
        }
    }
}

impl From<PfError> for ApiError {
    fn from(e: PfError) -> Self {
        match e {
            PfError::Conflict { .. } | PfError::AmbiguousTarget { .. } | PfError::Orphan { .. } => {
                Self::conflict(e.to_string())
            }
            other => Self::internal(other.to_string()),
        }
    }
}

/// `POST /v1/reservations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    /// The provider's account id.
    pub owner: String,
    /// `IP:PORT[-PORT]/PROTO`, or `IP/PROTO` for a free port from the pool.
    pub public: String,
    /// `TARGET_IP[:PORT]`.
    pub to: String,
    /// A lifetime such as `30d`; the policy's default_ttl when absent.
    #[serde(default)]
    pub ttl: Option<String>,
    #[serde(default)]
    pub note: Option<String>,
}

/// `POST /v1/reservations/{id}/renew`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    #[serde(default)]
    pub ttl: Option<String>,
}

/// What the API asks of the engine.
#[derive(Debug)]
pub enum Request {
    Reserve(ReserveRequest),
    Get(u64),
    List { owner: Option<String> },
    Release(u64),
    ReleaseOwner(String),
    Renew { id: u64, ttl: Option<String> },
    SetEnabled { id: u64, enabled: bool },
    Status,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The last instant RFC 3339 (four-digit years) can write: 9999-12-31T23:59:59.999Z.
const LATEST_RFC3339_MS: u64 = 253_402_300_799_999;

fn rfc3339(ms: u64) -> String {
    // A hand-edited row could hold any number; humantime panics past year 9999.
    let ms = ms.min(LATEST_RFC3339_MS);
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A record as the API shows it.
pub fn record_json(r: &Record) -> Value {
    let mut v = r.reservation.to_json();
    v["id"] = json!(r.id);
    v["owner"] = json!(r.owner);
    v["public"] = json!(r.reservation.public.to_string());
    v["created"] = json!(rfc3339(r.created_ms));
    v["ttl_seconds"] = json!(r.ttl_ms.map(|t| t / 1000));
    v["expires"] = json!(r.expires_ms.map(rfc3339));
    v["enabled"] = json!(r.enabled);
    v["note"] = json!(r.note);
    v
}

fn check_text(field: &str, s: &str, max: usize) -> Result<(), ApiError> {
    if s.chars().count() > max {
        return Err(ApiError::bad_request(format!(
            "{field} is longer than {max} characters"
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

fn duration_ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX / 2)) as u64
}

pub struct Engine {
    store: Box<dyn Store>,
    dir: PinDir,
    policy: Policy,
    audit: Audit,
    /// The earliest expiry in the store, re-read after every change.
    next_expiry: Option<u64>,
    /// Picks automatic ports: seeded from the kernel, so the ports handed out are not
    /// guessable from the order of requests.
    rng: StdRng,
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

impl Engine {
    pub fn new(
        store: Box<dyn Store>,
        dir: PinDir,
        policy: Policy,
        audit: Audit,
    ) -> Result<Self, StoreError> {
        let next_expiry = store.next_expiry()?;
        Ok(Self {
            store,
            dir,
            policy,
            audit,
            next_expiry,
            rng: StdRng::seed_from_u64(kernel_seed()),
        })
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

    /// Handles one API request and writes its audit line.
    pub fn handle(&mut self, request: Request, caller: Caller) -> Result<Value, ApiError> {
        let action = match &request {
            Request::Reserve(_) => Some("reserve"),
            Request::Release(_) => Some("release"),
            Request::ReleaseOwner(_) => Some("release-owner"),
            Request::Renew { .. } => Some("renew"),
            Request::SetEnabled { enabled: true, .. } => Some("enable"),
            Request::SetEnabled { enabled: false, .. } => Some("disable"),
            Request::Get(_) | Request::List { .. } | Request::Status => None,
        };
        let subject = match &request {
            Request::Reserve(r) => {
                json!({ "owner": r.owner, "public": r.public, "to": r.to, "ttl": r.ttl })
            }
            Request::Release(id) | Request::Renew { id, .. } | Request::SetEnabled { id, .. } => {
                json!({ "id": id })
            }
            Request::ReleaseOwner(owner) => json!({ "owner": owner }),
            _ => Value::Null,
        };
        let result = self.dispatch(request, caller);
        if let Some(action) = action {
            match &result {
                Ok(done) => self.audit.write(caller, action, "ok", done, None),
                Err(e) => self
                    .audit
                    .write(caller, action, "refused", &subject, Some(&e.message)),
            }
            self.refresh_next_expiry();
        }
        result
    }

    fn dispatch(&mut self, request: Request, caller: Caller) -> Result<Value, ApiError> {
        match request {
            Request::Reserve(r) => self.reserve(r).map(|r| record_json(&r)),
            Request::Get(id) => Ok(record_json(&self.get(id)?)),
            Request::List { owner } => Ok(Value::Array(
                self.store
                    .list(owner.as_deref())?
                    .iter()
                    .map(record_json)
                    .collect(),
            )),
            Request::Release(id) => self.release(id).map(|r| record_json(&r)),
            Request::ReleaseOwner(owner) => {
                // Each release is its own change, audited as it lands: a failure part-way says
                // which went before it.
                let records = self.store.list(Some(&owner))?;
                let total = records.len();
                let mut released = Vec::new();
                for r in records {
                    match self.release(r.id) {
                        Ok(r) => {
                            let done = record_json(&r);
                            self.audit.write(caller, "release", "ok", &done, None);
                            released.push(done);
                        }
                        Err(e) => {
                            let ids: Vec<String> =
                                released.iter().map(|r| r["id"].to_string()).collect();
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
                Ok(Value::Array(released))
            }
            Request::Renew { id, ttl } => self.renew(id, ttl).map(|r| record_json(&r)),
            Request::SetEnabled { id, enabled } => {
                self.set_enabled(id, enabled).map(|r| record_json(&r))
            }
            Request::Status => Ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "reservations": self.store.count()?,
                "next_expiry": self.next_expiry.map(rfc3339),
                "attached": crate::dataplane::attachments(&self.dir)
                    .iter()
                    .map(|(iface, role)| json!({ "interface": iface, "role": role.describe() }))
                    .collect::<Vec<_>>(),
            })),
        }
    }

    fn get(&self, id: u64) -> Result<Record, ApiError> {
        self.store.get(id)?.ok_or_else(|| ApiError::not_found(id))
    }

    fn reserve(&mut self, req: ReserveRequest) -> Result<Record, ApiError> {
        let owner = req.owner.as_str();
        if owner.trim().is_empty() {
            return Err(ApiError::bad_request("owner is empty: give the account id"));
        }
        check_text("owner", owner, MAX_OWNER_LEN)?;
        let note = req.note.unwrap_or_default();
        check_text("note", &note, MAX_NOTE_LEN)?;
        let ttl = req
            .ttl
            .as_deref()
            .map(parse_ttl)
            .transpose()
            .map_err(ApiError::bad_request)?;
        let ttl = self.policy.lifetime(ttl)?;
        let (addr, ports, protocols) = parse_public_request(&req.public)?;
        let target: TargetSpec = req.to.parse()?;
        let listening = if self.policy.forbid_listening_ports {
            Listening::read()
        } else {
            Listening::default()
        };
        let reservation = match ports {
            Some(ports) => Reservation::new(
                PublicSpec {
                    addr,
                    ports,
                    protocols,
                },
                target,
            )?,
            None => self.free_port(addr, protocols, target, &listening)?,
        };
        self.policy.check(&reservation, &listening)?;
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
            return Err(ApiError::from(crate::policy::Refusal {
                rule: "policy.ports_per_owner",
                detail: format!(
                    "owner {owner} holds {held} ports; {asked} more would pass the limit of {}",
                    self.policy.ports_per_owner
                ),
            }));
        }
        let now = now_ms();
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
        let record = self.store.insert(&new)?;
        if let Err(e) = State::open_for_write(&self.dir).and_then(|mut s| s.reserve(&reservation)) {
            if let Err(undo) = self.store.delete(record.id) {
                eprintln!(
                    "pf serve: reservation {} is in the store but not the maps ({undo}); the next start reconciles it",
                    record.id
                );
            }
            return Err(e.into());
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
        listening: &Listening,
    ) -> Result<Reservation, ApiError> {
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
            .filter(|&p| self.policy.allows_port(addr, p, protocols, listening))
            .collect();
        if candidates.is_empty() {
            return Err(crate::policy::Refusal {
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

    /// Removes a reservation: the maps first, so a failure leaves it in the store, where the
    /// next reconcile finds it.
    fn release(&mut self, id: u64) -> Result<Record, ApiError> {
        let record = self.get(id)?;
        if record.enabled {
            self.unmap(&record)?;
        }
        self.store.delete(id)?;
        Ok(record)
    }

    fn unmap(&mut self, record: &Record) -> Result<(), ApiError> {
        let mut state = State::open_for_write(&self.dir)?;
        match state.release(&record.reservation.public) {
            Ok(_) => Ok(()),
            Err(PfError::NoSuchReservation { .. }) => {
                eprintln!(
                    "pf serve: drift: reservation {} ({}) was missing from the maps",
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
        let expires = now_ms().saturating_add(ttl_ms);
        self.store.set_lifetime(id, Some(ttl_ms), Some(expires))?;
        self.get(id)
    }

    fn set_enabled(&mut self, id: u64, enabled: bool) -> Result<Record, ApiError> {
        let record = self.get(id)?;
        if record.enabled == enabled {
            return Ok(record);
        }
        if enabled {
            self.store.set_enabled(id, true)?;
            if let Err(e) =
                State::open_for_write(&self.dir).and_then(|mut s| s.reserve(&record.reservation))
            {
                self.store.set_enabled(id, false)?;
                return Err(e.into());
            }
        } else {
            self.unmap(&record)?;
            self.store.set_enabled(id, false)?;
        }
        self.get(id)
    }

    /// Removes every reservation whose expiry has passed, from the maps and then the store.
    pub fn expire_due(&mut self) {
        let now = now_ms();
        if self.next_expiry.is_none_or(|t| t > now) {
            return;
        }
        let due = match self.store.expired(now) {
            Ok(due) => due,
            Err(e) => {
                eprintln!("pf serve: {e}");
                return;
            }
        };
        let mut failed = false;
        for record in due {
            match self.release(record.id) {
                Ok(r) => self
                    .audit
                    .write(Caller::SERVICE, "expire", "ok", &record_json(&r), None),
                Err(e) => {
                    failed = true;
                    eprintln!(
                        "pf serve: could not expire reservation {}: {} (trying again in {EXPIRY_RETRY_MS} ms)",
                        record.id, e.message
                    );
                }
            }
        }
        self.refresh_next_expiry();
        if failed {
            // Not at once: the due record is still there, and retrying in a loop would spin.
            let retry = now.saturating_add(EXPIRY_RETRY_MS);
            self.next_expiry = Some(self.next_expiry.map_or(retry, |t| t.max(retry)));
        }
    }

    /// Makes the maps hold exactly the store's enabled reservations: removes what the store
    /// does not have, adds what is missing, and logs each difference.
    pub fn reconcile(&mut self) -> Result<ReconcileReport, ApiError> {
        let desired: Vec<Reservation> = self
            .store
            .list(None)?
            .into_iter()
            .filter(|r| r.enabled)
            .map(|r| r.reservation)
            .collect();
        let mut state = State::open_for_write(&self.dir)?;
        let actual = state.list()?;
        let want: std::collections::HashSet<&Reservation> = desired.iter().collect();
        let have: std::collections::HashSet<&Reservation> = actual.iter().collect();
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
