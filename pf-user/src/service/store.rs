//! The reservation store: the source of truth for what pf forwards. The kernel maps are its
//! cache, rebuilt from it by `pf serve` on every start.
//!
//! [`Store`] is small on purpose, so that a server-backed store (PostgreSQL, shared by a fleet
//! of VPN servers) can take [`SqliteStore`]'s place. Every method is one transaction: a range is
//! stored whole or not at all.

use std::{collections::HashMap, net::Ipv4Addr, path::Path};

use pf_common::limits::MAX_RANGE_PORTS;
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::{
    domain::{
        limits::{Limits, SourceList},
        spec::{PortRange, Protocols, PublicSpec, Reservation, TriggerPorts},
    },
    kernel::state::Traffic,
};

/// One reservation as the product knows it: its id, and what [`NewRecord`] says (its fields
/// read through, as `record.owner`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub id: u64,
    pub data: NewRecord,
}

impl std::ops::Deref for Record {
    type Target = NewRecord;
    fn deref(&self) -> &NewRecord {
        &self.data
    }
}

/// A reservation before the store has given it an id: who owns it, what it forwards, for how
/// long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRecord {
    /// The provider's account id: an opaque string.
    pub owner: String,
    pub reservation: Reservation,
    /// Unix time in milliseconds.
    pub created_ms: u64,
    /// The lifetime asked for, which `renew` applies again; `None` lasts until released.
    pub ttl_ms: Option<u64>,
    /// Unix time in milliseconds after which the reservation is removed.
    pub expires_ms: Option<u64>,
    /// A disabled reservation keeps its ports but forwards nothing.
    pub enabled: bool,
    pub note: String,
}

/// The protocol a customer's device asked for a reservation with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MappingProtocol {
    NatPmp,
    Pcp,
    Upnp,
}

impl MappingProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            MappingProtocol::NatPmp => "natpmp",
            MappingProtocol::Pcp => "pcp",
            MappingProtocol::Upnp => "upnp",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::NatPmp, Self::Pcp, Self::Upnp]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// A drain to schedule: at `at_ms`, every reservation (or `owner`'s) is disabled, or
/// released (`release`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewDrain {
    pub at_ms: u64,
    pub owner: Option<String>,
    pub release: bool,
    pub created_ms: u64,
}

/// A scheduled drain, and when it was done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drain {
    pub id: u64,
    pub drain: NewDrain,
    pub done_ms: Option<u64>,
}

/// Who held a public range from when until when (`until_ms` none: holds it now).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The reservation's id.
    pub id: u64,
    pub owner: String,
    pub public: PublicSpec,
    pub from_ms: u64,
    pub until_ms: Option<u64>,
    /// How the holding ended: `released`, `expired` or `owner-changed`.
    pub ended: Option<String>,
}

/// The SQL that records reservation ?1's present holding as past, ending at ?2 as ?3.
const RECORD_HOLDER: &str = "INSERT INTO holders (id, owner, public_ip, first_port, last_port, \
     protocols, from_ms, until_ms, ended) \
     SELECT r.id, r.owner, r.public_ip, r.first_port, r.last_port, r.protocols, \
     COALESCE((SELECT since_ms FROM held_since h WHERE h.id = r.id), r.created_ms), ?2, ?3 \
     FROM reservations r WHERE r.id = ?1";

/// A trigger rule: the reservation's ports forward only while its gate is open, which the
/// client opens by sending to its trigger ports (port triggering, `kernel::trigger`). Stored
/// beside the reservation, by its id; kept with its expired record, so a restore makes the
/// rule again, never a reservation that is always open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trigger {
    /// Its slot in the kernel's gate array (1-65535); one per live rule.
    pub gate: u16,
    /// The destination ports and protocols of the client's packets that open it.
    pub on: TriggerPorts,
    /// How long it stays open after the last packet through it.
    pub idle_timeout_ms: u64,
}

/// A reservation's limits (`kernel::limit`), stored beside it by its id with its slot in the
/// kernel's limit array; kept with its expired record, so a restore limits it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotLimits {
    /// Its slot in the kernel's `LIMITS` (1-16383); one per live reservation with limits.
    pub slot: u16,
    pub limits: Limits,
}

/// What a new reservation is stored with, in the same transaction.
#[derive(Clone, Copy, Debug, Default)]
pub struct Extras<'a> {
    /// A device's port mapping (NAT-PMP, PCP, UPnP IGD).
    pub mapping: Option<&'a Mapping>,
    /// A trigger rule: its entries wait on the rule's gate.
    pub trigger: Option<&'a Trigger>,
    pub limits: Option<&'a SlotLimits>,
}

/// What a port-mapping protocol needs beyond the reservation to find it again: who asked,
/// through which protocol, for which internal port (0: NAT-PMP's "the external port"), and
/// PCP's nonce, which the mapping belongs to. Stored beside the reservation, by its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub via: MappingProtocol,
    pub client: Ipv4Addr,
    /// One protocol, TCP or UDP.
    pub protocol: Protocols,
    pub internal_port: u16,
    pub nonce: Option<[u8; 12]>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reservation store: {what}: {source}")]
    Sqlite {
        what: &'static str,
        source: rusqlite::Error,
    },
    #[error(
        "reservation store {path} has schema version {found}; this pf knows versions up to {known} (it was written by a newer pf)"
    )]
    NewerSchema {
        path: String,
        found: i64,
        known: i64,
    },
    #[error(
        "reservation store {path} has schema version {found}: a read-only start needs a store this pf has written before"
    )]
    ReadOnlySchema { path: String, found: i64 },
    #[error("reservation store: row {id} is not a valid reservation ({detail})")]
    BadRow { id: i64, detail: String },
}

fn sql(what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { what, source }
}

/// What every reservation store can do. Conflicts and policy are checked by the caller (the
/// service runs one operation at a time); the store answers the questions they need.
pub trait Store: Send {
    fn insert(&mut self, new: &NewRecord) -> Result<Record, StoreError>;
    /// Inserts all of `new` in one transaction (bulk loads and benchmarks).
    fn insert_all(&mut self, new: &[NewRecord]) -> Result<Vec<Record>, StoreError>;
    fn get(&self, id: u64) -> Result<Option<Record>, StoreError>;
    /// Every record, or one owner's, by id.
    fn list(&self, owner: Option<&str>) -> Result<Vec<Record>, StoreError>;
    /// The records `filter` asks for, by id.
    fn list_filtered(&self, filter: &ListFilter) -> Result<Vec<Record>, StoreError>;
    /// Removes a record; false if there was none.
    fn delete(&mut self, id: u64) -> Result<bool, StoreError>;
    fn set_enabled(&mut self, id: u64, enabled: bool) -> Result<bool, StoreError>;
    /// Changes a record in place: its owner, note and target (the public side stays).
    /// A new owner's holding begins at `at_ms`, and the old one's is recorded as past.
    fn change(
        &mut self,
        id: u64,
        owner: &str,
        reservation: &Reservation,
        note: &str,
        at_ms: u64,
    ) -> Result<bool, StoreError>;
    fn set_lifetime(
        &mut self,
        id: u64,
        ttl_ms: Option<u64>,
        expires_ms: Option<u64>,
    ) -> Result<bool, StoreError>;
    /// A record whose public side shares a port and protocol with `addr:ports/protocols`.
    fn public_overlap(
        &self,
        addr: Ipv4Addr,
        ports: PortRange,
        protocols: Protocols,
    ) -> Result<Option<Record>, StoreError>;
    /// A record whose target side shares a port and protocol with `addr:ports/protocols`,
    /// other than record `except` (one whose target is changing).
    fn target_overlap(
        &self,
        addr: Ipv4Addr,
        ports: PortRange,
        protocols: Protocols,
        except: Option<u64>,
    ) -> Result<Option<Record>, StoreError>;
    /// The public ranges taken on `addr` for any of `protocols`.
    fn used_public_ports(
        &self,
        addr: Ipv4Addr,
        protocols: Protocols,
    ) -> Result<Vec<PortRange>, StoreError>;
    /// Public ports an owner holds, enabled or not.
    fn owner_ports(&self, owner: &str) -> Result<u64, StoreError>;
    /// How many records there are.
    fn count(&self) -> Result<u64, StoreError>;
    /// Records whose expiry is at or before `now_ms`.
    fn expired(&self, now_ms: u64) -> Result<Vec<Record>, StoreError>;
    /// The earliest expiry of any record.
    fn next_expiry(&self) -> Result<Option<u64>, StoreError>;
    /// Moves a record to the expired history (one transaction), where it stays restorable
    /// until purged; false if there was no such record.
    fn expire(&mut self, id: u64, at_ms: u64) -> Result<bool, StoreError>;
    /// The expired history, or one owner's, newest first, with when each expired.
    fn history(&self, owner: Option<&str>) -> Result<Vec<(Record, u64)>, StoreError>;
    /// Moves an expired record back, under its old id, with a new lifetime; the record as
    /// restored, or `None` if the history has no such id.
    fn restore(
        &mut self,
        id: u64,
        ttl_ms: Option<u64>,
        expires_ms: Option<u64>,
        at_ms: u64,
    ) -> Result<Option<Record>, StoreError>;
    /// Forgets history that expired before `before_ms`; how many records went.
    fn purge_history(&mut self, before_ms: u64) -> Result<u64, StoreError>;
    /// Adds to the traffic a reservation counted in maps it has left (a disable, an expiry),
    /// so that its totals go on from there.
    fn add_traffic(&mut self, id: u64, traffic: Traffic) -> Result<(), StoreError>;
    /// The traffic carried over from maps a reservation has left.
    fn traffic(&self, id: u64) -> Result<Traffic, StoreError>;
    /// Every reservation's carried-over traffic, by id (none for those with nothing).
    fn all_traffic(&self) -> Result<HashMap<u64, Traffic>, StoreError>;
    /// Why the store takes no changes, if it does not (opened read-only).
    fn read_only(&self) -> Option<&str>;

    /// Stores a reservation a device asked for and its mapping, in one transaction.
    /// Stores a reservation with what comes with it (a port mapping, a trigger rule, limits),
    /// in one transaction.
    fn insert_with(&mut self, new: &NewRecord, extras: Extras<'_>) -> Result<Record, StoreError>;
    /// The mapping `client` holds for (`protocol`, `internal_port`), with its reservation's id.
    fn mapping(
        &self,
        client: Ipv4Addr,
        protocol: Protocols,
        internal_port: u16,
    ) -> Result<Option<(u64, Mapping)>, StoreError>;
    /// Every mapping `client` holds, with its reservation's id.
    fn client_mappings(&self, client: Ipv4Addr) -> Result<Vec<(u64, Mapping)>, StoreError>;
    /// Makes reservation `id` a plain one: no device's mapping any more.
    fn forget_mapping(&mut self, id: u64) -> Result<bool, StoreError>;
    /// Gives mapping `id` to `nonce` (PCP taking over a mapping NAT-PMP made).
    fn set_mapping_nonce(&mut self, id: u64, nonce: [u8; 12]) -> Result<bool, StoreError>;
    /// When the mapping state began (Unix ms): set once, when the store is made, so NAT-PMP's
    /// and PCP's epoch runs on across restarts and starts again only with a new store.
    fn mapping_epoch_ms(&mut self, now_ms: u64) -> Result<u64, StoreError>;
    /// The owner the API gave `address`'s mappings, if it gave one.
    fn tunnel_owner(&self, address: Ipv4Addr) -> Result<Option<String>, StoreError>;
    /// Gives `address`'s mappings to `owner` (`None`: back to the config's say).
    fn set_tunnel_owner(
        &mut self,
        address: Ipv4Addr,
        owner: Option<&str>,
    ) -> Result<(), StoreError>;
    /// Every owner the API gave, by address.
    fn tunnel_owners(&self) -> Result<Vec<(Ipv4Addr, String)>, StoreError>;

    /// Ends reservation `id`'s holding at `at_ms` (`released`): its past holder is recorded,
    /// then it is deleted as [`Store::delete`] does; false if there was none.
    fn end(&mut self, id: u64, at_ms: u64) -> Result<bool, StoreError>;
    /// Who held `addr:port/protocol` at `at_ms`: the live reservation covering it (if its
    /// holding had begun) and the past holders whose holding spanned it.
    fn who(
        &self,
        addr: Ipv4Addr,
        port: u16,
        protocol: Protocols,
        at_ms: u64,
    ) -> Result<Vec<Holder>, StoreError>;
    /// Past holders of any of `ports`/`protocols` on `addr` whose holding ended at or after
    /// `since_ms`.
    fn recent_holders(
        &self,
        addr: Ipv4Addr,
        ports: PortRange,
        protocols: Protocols,
        since_ms: u64,
    ) -> Result<Vec<Holder>, StoreError>;
    /// Forgets past holders whose holding ended before `before_ms`; how many.
    fn purge_holders(&mut self, before_ms: u64) -> Result<u64, StoreError>;

    /// Schedules a drain; its id.
    fn add_drain(&mut self, drain: &NewDrain) -> Result<u64, StoreError>;
    /// Every drain, by id (done ones with when).
    fn drains(&self) -> Result<Vec<Drain>, StoreError>;
    /// Cancels a drain not done yet; false if there is no such pending drain.
    fn cancel_drain(&mut self, id: u64) -> Result<bool, StoreError>;
    /// Marks a drain done at `at_ms`.
    fn drain_done(&mut self, id: u64, at_ms: u64) -> Result<bool, StoreError>;

    /// The trigger rule of reservation (or expired record) `id`, if it has one.
    fn trigger(&self, id: u64) -> Result<Option<Trigger>, StoreError>;
    /// The trigger rules of the live reservations, by id.
    fn triggers(&self) -> Result<HashMap<u64, Trigger>, StoreError>;
    /// Gives `id`'s trigger rule another gate (a restore, whose old gate may be taken).
    fn set_trigger_gate(&mut self, id: u64, gate: u16) -> Result<bool, StoreError>;

    /// The limits of reservation (or expired record) `id`, if it has any.
    fn limits(&self, id: u64) -> Result<Option<SlotLimits>, StoreError>;
    /// The limits of the live reservations, by id.
    fn all_limits(&self) -> Result<HashMap<u64, SlotLimits>, StoreError>;
    /// Gives `id`'s limits another slot (a restore, whose old slot may be taken).
    fn set_limit_slot(&mut self, id: u64, slot: u16) -> Result<bool, StoreError>;
}

/// The schema this pf writes; `PRAGMA user_version` records it in the file. Version 2 added
/// the expired history, version 3 the carried-over traffic, version 4 the port mappings and
/// the settings, version 5 the trigger rules, version 6 the past holders of each range (new
/// tables only: an older file is brought up to date by creating what it lacks), version 7
/// the scheduled drains, version 8 the reservations' limits.
const SCHEMA_VERSION: i64 = 8;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS reservations (
    id                INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: a stale id finds nothing
    owner             TEXT    NOT NULL,
    public_ip         TEXT    NOT NULL,
    first_port        INTEGER NOT NULL CHECK (first_port BETWEEN 1 AND 65535),
    last_port         INTEGER NOT NULL CHECK (last_port BETWEEN first_port AND 65535),
    protocols         INTEGER NOT NULL CHECK (protocols IN (1, 2, 3)), -- 1 tcp, 2 udp, 3 both
    target_ip         TEXT    NOT NULL,
    target_first_port INTEGER NOT NULL CHECK (target_first_port BETWEEN 1 AND 65535),
    created_ms        INTEGER NOT NULL,
    ttl_ms            INTEGER,
    expires_ms        INTEGER,
    enabled           INTEGER NOT NULL CHECK (enabled IN (0, 1)),
    note              TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_public ON reservations (public_ip, first_port);
CREATE INDEX IF NOT EXISTS reservations_target ON reservations (target_ip, target_first_port);
CREATE INDEX IF NOT EXISTS reservations_owner ON reservations (owner);
CREATE INDEX IF NOT EXISTS reservations_expiry ON reservations (expires_ms)
    WHERE expires_ms IS NOT NULL;
-- Expired reservations, kept restorable for a while: a clock stepped forward, or a lifetime
-- set by mistake, must not lose a customer's port for good.
CREATE TABLE IF NOT EXISTS expired (
    id                INTEGER PRIMARY KEY,
    owner             TEXT    NOT NULL,
    public_ip         TEXT    NOT NULL,
    first_port        INTEGER NOT NULL,
    last_port         INTEGER NOT NULL,
    protocols         INTEGER NOT NULL,
    target_ip         TEXT    NOT NULL,
    target_first_port INTEGER NOT NULL,
    created_ms        INTEGER NOT NULL,
    ttl_ms            INTEGER,
    expires_ms        INTEGER,
    enabled           INTEGER NOT NULL,
    note              TEXT    NOT NULL,
    expired_ms        INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS expired_owner ON expired (owner);
CREATE INDEX IF NOT EXISTS expired_at ON expired (expired_ms);
-- Traffic a reservation counted in the kernel maps before its entries left them (a disable,
-- an expiry): its totals go on from there when it forwards again. By id, for a reservation or
-- its expired record; gone with them.
CREATE TABLE IF NOT EXISTS traffic (
    id          INTEGER PRIMARY KEY,
    in_packets  INTEGER NOT NULL,
    in_bytes    INTEGER NOT NULL,
    out_packets INTEGER NOT NULL,
    out_bytes   INTEGER NOT NULL
);
-- Reservations a customer's device asked for (NAT-PMP, PCP, UPnP IGD): what the protocol
-- needs to find one again. By the reservation's id; gone with it.
CREATE TABLE IF NOT EXISTS port_mappings (
    id            INTEGER PRIMARY KEY,
    via           TEXT    NOT NULL CHECK (via IN ('natpmp', 'pcp', 'upnp')),
    client_ip     TEXT    NOT NULL,
    protocols     INTEGER NOT NULL CHECK (protocols IN (1, 2)),
    internal_port INTEGER NOT NULL CHECK (internal_port BETWEEN 0 AND 65535),
    nonce         BLOB    CHECK (nonce IS NULL OR length(nonce) = 12)
);
CREATE UNIQUE INDEX IF NOT EXISTS port_mappings_client
    ON port_mappings (client_ip, protocols, internal_port);
-- Who owns a tunnel address's mappings, as the provider's account system said through the
-- API (ahead of [port_mapping] owners in the config).
CREATE TABLE IF NOT EXISTS tunnel_owners (
    address TEXT PRIMARY KEY,
    owner   TEXT NOT NULL
);
-- Trigger rules: reservations that forward only while their client keeps them open by
-- sending to their trigger ports. By the reservation's id (or its expired record's); gone
-- with them. The gate is unique among live reservations (the engine allocates it).
CREATE TABLE IF NOT EXISTS triggers (
    id              INTEGER PRIMARY KEY,
    gate            INTEGER NOT NULL CHECK (gate BETWEEN 1 AND 65535),
    protocols       INTEGER NOT NULL CHECK (protocols IN (1, 2, 3)),
    first_port      INTEGER NOT NULL CHECK (first_port BETWEEN 1 AND 65535),
    last_port       INTEGER NOT NULL CHECK (last_port BETWEEN first_port AND 65535),
    idle_timeout_ms INTEGER NOT NULL CHECK (idle_timeout_ms > 0)
);
-- Limits on what reaches a reservation, enforced in XDP: rates (NULL: none) and a source
-- list. By the reservation's id (or its expired record's); gone with them. The slot is unique
-- among live reservations (the engine allocates it).
CREATE TABLE IF NOT EXISTS limits (
    id                 INTEGER PRIMARY KEY,
    slot               INTEGER NOT NULL CHECK (slot BETWEEN 1 AND 16383),
    packets_per_second INTEGER CHECK (packets_per_second > 0),
    bits_per_second    INTEGER CHECK (bits_per_second > 0),
    syns_per_second    INTEGER CHECK (syns_per_second > 0),
    source_list        TEXT CHECK (source_list IN ('allow', 'deny')),
    -- The list's networks, comma-separated (NULL without a list).
    networks           TEXT
);
-- Who held a public range, and when: a row each time a holding ended (a release, an expiry,
-- an owner change), kept for policy.history_retention, for an abuse desk's question (who had this
-- port then? `pf who`) and the quarantine of released ports. Owners and ranges only: no
-- target, no traffic.
CREATE TABLE IF NOT EXISTS holders (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         INTEGER NOT NULL,
    owner      TEXT    NOT NULL,
    public_ip  TEXT    NOT NULL,
    first_port INTEGER NOT NULL,
    last_port  INTEGER NOT NULL,
    protocols  INTEGER NOT NULL,
    from_ms    INTEGER NOT NULL,
    until_ms   INTEGER NOT NULL,
    ended      TEXT    NOT NULL CHECK (ended IN ('released', 'expired', 'owner-changed'))
);
CREATE INDEX IF NOT EXISTS holders_public ON holders (public_ip, first_port);
CREATE INDEX IF NOT EXISTS holders_until ON holders (until_ms);
-- When a reservation's present owner began to hold it, where that was not its creation (an
-- owner change, a restore). By the reservation's id; gone with it.
CREATE TABLE IF NOT EXISTS held_since (
    id       INTEGER PRIMARY KEY,
    since_ms INTEGER NOT NULL
);
-- Scheduled drains (`pf drain`): at a time, every reservation (or one owner's) is disabled or
-- released, audited. Kept once done, with when.
CREATE TABLE IF NOT EXISTS drains (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms      INTEGER NOT NULL,
    owner      TEXT,
    action     TEXT    NOT NULL CHECK (action IN ('disable', 'release')),
    created_ms INTEGER NOT NULL,
    done_ms    INTEGER
);
-- The service's own values (the port mappings' epoch).
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

const COLUMNS: &str = "id, owner, public_ip, first_port, last_port, protocols, target_ip, \
                       target_first_port, created_ms, ttl_ms, expires_ms, enabled, note";

/// Which reservations a list asks for, and which page of them (by id: those after `after`,
/// at most `limit`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub owner: Option<String>,
    /// Reservations whose public range holds this port.
    pub public_port: Option<u16>,
    /// Reservations towards this target address.
    pub target: Option<Ipv4Addr>,
    /// Reservations that expire at or before this time (Unix ms).
    pub expiring_before_ms: Option<u64>,
    pub after: Option<u64>,
    pub limit: Option<u64>,
}

/// The embedded store: one SQLite file in WAL mode, synchronous=FULL, so a reservation the
/// service reported as made survives a crash or a power cut.
pub struct SqliteStore {
    conn: Connection,
    /// Set when the file could only be opened read-only, with why.
    read_only: Option<String>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(sql("opening the database"))?;
        Self::init(conn, &path.display().to_string())
    }

    /// Opens an existing store for reading only: the service can still start, reconcile and
    /// answer reads when the store's disk is full. `why` says why it is read-only.
    pub fn open_read_only(path: &Path, why: String) -> Result<Self, StoreError> {
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
            | rusqlite::OpenFlags::SQLITE_OPEN_URI;
        let version = |conn: &Connection| {
            conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))
        };
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let wal_empty = std::fs::metadata(&wal).map_or(true, |m| m.len() == 0);
        let opened = Connection::open_with_flags(path, flags)
            .and_then(|conn| version(&conn).map(|v| (conn, v)));
        let (conn, found) = match opened {
            Ok(opened) => opened,
            // A read-only open needs the WAL index (-shm), which a full disk may not let
            // SQLite make. With no WAL content to miss, the file alone is the store.
            Err(_) if wal_empty => {
                let uri = format!("file:{}?immutable=1", path.display());
                Connection::open_with_flags(uri, flags)
                    .and_then(|conn| version(&conn).map(|v| (conn, v)))
                    .map_err(sql("opening the database read-only"))?
            }
            Err(e) => return Err(sql("opening the database read-only")(e)),
        };
        if found != SCHEMA_VERSION {
            return Err(StoreError::ReadOnlySchema {
                path: path.display().to_string(),
                found,
            });
        }
        Ok(Self {
            conn,
            read_only: Some(why),
        })
    }

    /// Whether an open failed for want of room or of write access (a full disk, a quota, a
    /// read-only mount), where reading may still work.
    pub fn cannot_write(e: &StoreError) -> bool {
        matches!(
            e,
            StoreError::Sqlite {
                source: rusqlite::Error::SqliteFailure(f, _),
                ..
            } if matches!(
                f.code,
                rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::CannotOpen
                    | rusqlite::ErrorCode::ReadOnly
            )
        )
    }

    /// A second connection on the service's store, for reads beside the engine's writes: WAL
    /// lets readers see the last commit without waiting for a writer.
    pub fn open_reader(path: &Path) -> Result<Self, StoreError> {
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
            | rusqlite::OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags)
            .map_err(sql("opening the database for reading"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql("setting the busy timeout"))?;
        Ok(Self {
            conn,
            read_only: Some("a reader".into()),
        })
    }

    /// A store in memory, for tests of the store itself.
    pub fn in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory().map_err(sql("opening the database"))?;
        Self::init(conn, ":memory:")
    }

    fn init(conn: Connection, path: &str) -> Result<Self, StoreError> {
        // Another process holding a write lock (a backup, sqlite3) is waited for, briefly.
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql("setting the busy timeout"))?;
        // SQLite falls back to reading only when the file cannot be written (a read-only
        // filesystem): then the store takes no changes, and says so.
        if conn
            .is_readonly(rusqlite::MAIN_DB)
            .map_err(sql("checking for write access"))?
        {
            let found: i64 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(sql("reading the schema version"))?;
            if found != SCHEMA_VERSION {
                return Err(StoreError::ReadOnlySchema {
                    path: path.to_string(),
                    found,
                });
            }
            return Ok(Self {
                conn,
                read_only: Some("the file or its filesystem cannot be written".into()),
            });
        }
        // Only what is not so already is written: a start must not need disk space.
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .map_err(sql("reading the journal mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(sql("switching to WAL mode"))?;
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql("setting synchronous=FULL"))?;
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql("reading the schema version"))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path: path.to_string(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        if found < SCHEMA_VERSION {
            conn.execute_batch(SCHEMA)
                .map_err(sql("creating the schema"))?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(sql("writing the schema version"))?;
        }
        Ok(Self {
            conn,
            read_only: None,
        })
    }

    /// Whether the file holds no reservations table yet (new, or zero bytes).
    pub fn is_new(path: &Path) -> bool {
        std::fs::metadata(path).map_or(true, |m| m.len() == 0)
    }

    fn insert_one(conn: &Connection, new: &NewRecord) -> Result<Record, StoreError> {
        let r = &new.reservation;
        conn.prepare_cached(
            "INSERT INTO reservations (owner, public_ip, first_port, last_port, protocols, \
             target_ip, target_first_port, created_ms, ttl_ms, expires_ms, enabled, note) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                new.owner,
                r.public.addr.to_string(),
                r.public.ports.first,
                r.public.ports.last,
                r.public.protocols.mask(),
                r.target_addr.to_string(),
                r.target_first_port,
                new.created_ms as i64,
                new.ttl_ms.map(|t| t as i64),
                new.expires_ms.map(|t| t as i64),
                new.enabled,
                new.note,
            ])
        })
        .map_err(sql("inserting a reservation"))?;
        Ok(Record {
            id: conn.last_insert_rowid() as u64,
            data: new.clone(),
        })
    }

    fn query(
        &self,
        what: &'static str,
        where_clause: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<Record>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM reservations {where_clause}"
            ))
            .map_err(sql(what))?;
        let rows = stmt
            .query_map(params, raw_row)
            .map_err(sql(what))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql(what))?;
        rows.into_iter().map(RawRow::into_record).collect()
    }

    /// The first record `where_clause` finds for `addr` (?1), a first port in the index
    /// range a record overlapping `ports` can start in (?2 to ?3), the range's other end (?4)
    /// and the protocols (?5).
    fn first_overlap(
        &self,
        what: &'static str,
        where_clause: &str,
        addr: Ipv4Addr,
        ports: PortRange,
        protocols: Protocols,
        except: Option<u64>,
    ) -> Result<Option<Record>, StoreError> {
        Ok(self
            .query(
                what,
                where_clause,
                params![
                    addr.to_string(),
                    lowest_overlapping_first(ports),
                    ports.last,
                    ports.first,
                    protocols.mask(),
                    except.map(|id| id as i64)
                ],
            )?
            .pop())
    }

    /// The traffic table's rows, all or one id's.
    fn all_traffic_where(&self, id: Option<u64>) -> Result<HashMap<u64, Traffic>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT id, in_packets, in_bytes, out_packets, out_bytes FROM traffic \
                 WHERE ?1 IS NULL OR id = ?1",
            )
            .map_err(sql("reading traffic"))?;
        let rows = statement
            .query_map([id.map(|i| i as i64)], |row| {
                let n = |i: usize| row.get::<_, i64>(i).map(|v| v.max(0) as u64);
                Ok((
                    n(0)?,
                    Traffic {
                        in_packets: n(1)?,
                        in_bytes: n(2)?,
                        out_packets: n(3)?,
                        out_bytes: n(4)?,
                    },
                ))
            })
            .map_err(sql("reading traffic"))?;
        rows.collect::<Result<HashMap<_, _>, _>>()
            .map_err(sql("reading traffic"))
    }

    fn update(
        &mut self,
        what: &'static str,
        statement: &str,
        params: impl rusqlite::Params,
    ) -> Result<bool, StoreError> {
        let changed = self
            .conn
            .prepare_cached(statement)
            .and_then(|mut s| s.execute(params))
            .map_err(sql(what))?;
        Ok(changed > 0)
    }
}

/// A row as SQLite holds it, checked into a [`Record`] separately so that a hand-edited bad row
/// is reported, not trusted.
struct RawRow {
    id: i64,
    owner: String,
    public_ip: String,
    first_port: i64,
    last_port: i64,
    protocols: i64,
    target_ip: String,
    target_first_port: i64,
    created_ms: i64,
    ttl_ms: Option<i64>,
    expires_ms: Option<i64>,
    enabled: bool,
    note: String,
}

fn raw_row(row: &Row<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        id: row.get(0)?,
        owner: row.get(1)?,
        public_ip: row.get(2)?,
        first_port: row.get(3)?,
        last_port: row.get(4)?,
        protocols: row.get(5)?,
        target_ip: row.get(6)?,
        target_first_port: row.get(7)?,
        created_ms: row.get(8)?,
        ttl_ms: row.get(9)?,
        expires_ms: row.get(10)?,
        enabled: row.get(11)?,
        note: row.get(12)?,
    })
}

impl RawRow {
    fn into_record(self) -> Result<Record, StoreError> {
        let id = self.id;
        let bad = |detail: String| StoreError::BadRow { id, detail };
        let port = |v: i64| u16::try_from(v).map_err(|_| bad(format!("port {v}")));
        let addr = |s: &str| {
            s.parse::<Ipv4Addr>()
                .map_err(|_| bad(format!("address '{s}'")))
        };
        let ports = PortRange::new(port(self.first_port)?, port(self.last_port)?)
            .map_err(|e| bad(e.to_string()))?;
        let protocols = u8::try_from(self.protocols)
            .ok()
            .and_then(Protocols::from_mask)
            .ok_or_else(|| bad(format!("protocols {}", self.protocols)))?;
        let public = PublicSpec {
            addr: addr(&self.public_ip)?,
            ports,
            protocols,
        };
        let target = crate::domain::spec::TargetSpec {
            addr: addr(&self.target_ip)?,
            port: Some(port(self.target_first_port)?),
        };
        let reservation = Reservation::new(public, target).map_err(|e| bad(e.to_string()))?;
        Ok(Record {
            id: id as u64,
            data: NewRecord {
                owner: self.owner,
                reservation,
                created_ms: self.created_ms as u64,
                ttl_ms: self.ttl_ms.map(|t| t as u64),
                expires_ms: self.expires_ms.map(|t| t as u64),
                enabled: self.enabled,
                note: self.note,
            },
        })
    }
}

/// The lowest first port a record overlapping `ports` can have: no range is wider than
/// MAX_RANGE_PORTS, so the index scan is bounded.
fn lowest_overlapping_first(ports: PortRange) -> i64 {
    (i64::from(ports.first) - i64::from(MAX_RANGE_PORTS) + 1).max(1)
}

impl Store for SqliteStore {
    fn insert(&mut self, new: &NewRecord) -> Result<Record, StoreError> {
        Self::insert_one(&self.conn, new)
    }

    fn insert_all(&mut self, new: &[NewRecord]) -> Result<Vec<Record>, StoreError> {
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        let records = new
            .iter()
            .map(|n| Self::insert_one(&tx, n))
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit().map_err(sql("committing"))?;
        Ok(records)
    }

    fn get(&self, id: u64) -> Result<Option<Record>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM reservations WHERE id = ?1"))
            .map_err(sql("reading a reservation"))?;
        let row = stmt
            .query_row([id as i64], raw_row)
            .optional()
            .map_err(sql("reading a reservation"))?;
        row.map(RawRow::into_record).transpose()
    }

    fn list_filtered(&self, filter: &ListFilter) -> Result<Vec<Record>, StoreError> {
        self.query(
            "listing reservations",
            "WHERE (?1 IS NULL OR owner = ?1) \
             AND (?2 IS NULL OR (first_port <= ?2 AND last_port >= ?2)) \
             AND (?3 IS NULL OR target_ip = ?3) \
             AND (?4 IS NULL OR (expires_ms IS NOT NULL AND expires_ms <= ?4)) \
             AND id > ?5 ORDER BY id LIMIT ?6",
            params![
                filter.owner,
                filter.public_port,
                filter.target.map(|t| t.to_string()),
                filter
                    .expiring_before_ms
                    .map(|t| t.min(i64::MAX as u64) as i64),
                filter.after.unwrap_or(0).min(i64::MAX as u64) as i64,
                filter.limit.map_or(-1, |l| l.min(i64::MAX as u64) as i64)
            ],
        )
    }

    fn list(&self, owner: Option<&str>) -> Result<Vec<Record>, StoreError> {
        match owner {
            Some(owner) => self.query(
                "listing reservations",
                "WHERE owner = ?1 ORDER BY id",
                [owner],
            ),
            None => self.query("listing reservations", "ORDER BY id", []),
        }
    }

    fn delete(&mut self, id: u64) -> Result<bool, StoreError> {
        self.delete_recording(id, None)
    }

    fn set_enabled(&mut self, id: u64, enabled: bool) -> Result<bool, StoreError> {
        self.update(
            "enabling or disabling a reservation",
            "UPDATE reservations SET enabled = ?2 WHERE id = ?1",
            params![id as i64, enabled],
        )
    }

    fn change(
        &mut self,
        id: u64,
        owner: &str,
        reservation: &Reservation,
        note: &str,
        at_ms: u64,
    ) -> Result<bool, StoreError> {
        let what = "changing a reservation";
        let tx = self.conn.transaction().map_err(sql(what))?;
        let new_owner: bool = tx
            .query_row(
                "SELECT owner != ?2 FROM reservations WHERE id = ?1",
                params![id as i64, owner],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql(what))?
            .unwrap_or(false);
        if new_owner {
            tx.execute(
                RECORD_HOLDER,
                params![id as i64, at_ms as i64, "owner-changed"],
            )
            .and_then(|_| {
                tx.execute(
                    "INSERT INTO held_since (id, since_ms) VALUES (?1, ?2) \
                         ON CONFLICT (id) DO UPDATE SET since_ms = excluded.since_ms",
                    params![id as i64, at_ms as i64],
                )
            })
            .map_err(sql(what))?;
        }
        let n = tx
            .execute(
                "UPDATE reservations SET owner = ?2, target_ip = ?3, target_first_port = ?4, \
                 note = ?5 WHERE id = ?1",
                params![
                    id as i64,
                    owner,
                    reservation.target_addr.to_string(),
                    reservation.target_first_port,
                    note
                ],
            )
            .map_err(sql(what))?;
        tx.commit().map_err(sql("committing a change"))?;
        Ok(n > 0)
    }

    fn set_lifetime(
        &mut self,
        id: u64,
        ttl_ms: Option<u64>,
        expires_ms: Option<u64>,
    ) -> Result<bool, StoreError> {
        self.update(
            "renewing a reservation",
            "UPDATE reservations SET ttl_ms = ?2, expires_ms = ?3 WHERE id = ?1",
            params![
                id as i64,
                ttl_ms.map(|t| t as i64),
                expires_ms.map(|t| t as i64)
            ],
        )
    }

    fn public_overlap(
        &self,
        addr: Ipv4Addr,
        ports: PortRange,
        protocols: Protocols,
    ) -> Result<Option<Record>, StoreError> {
        self.first_overlap(
            "checking public ports",
            "WHERE public_ip = ?1 AND first_port BETWEEN ?2 AND ?3 AND last_port >= ?4 \
             AND (protocols & ?5) != 0 AND ?6 IS NULL ORDER BY first_port LIMIT 1",
            addr,
            ports,
            protocols,
            None,
        )
    }

    fn target_overlap(
        &self,
        addr: Ipv4Addr,
        ports: PortRange,
        protocols: Protocols,
        except: Option<u64>,
    ) -> Result<Option<Record>, StoreError> {
        self.first_overlap(
            "checking target ports",
            "WHERE target_ip = ?1 AND target_first_port BETWEEN ?2 AND ?3 \
             AND target_first_port + (last_port - first_port) >= ?4 \
             AND (protocols & ?5) != 0 AND (?6 IS NULL OR id != ?6) \
             ORDER BY target_first_port LIMIT 1",
            addr,
            ports,
            protocols,
            except,
        )
    }

    fn used_public_ports(
        &self,
        addr: Ipv4Addr,
        protocols: Protocols,
    ) -> Result<Vec<PortRange>, StoreError> {
        let what = "reading used ports";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT first_port, last_port FROM reservations \
                 WHERE public_ip = ?1 AND (protocols & ?2) != 0",
            )
            .map_err(sql(what))?;
        let rows = stmt
            .query_map(params![addr.to_string(), protocols.mask()], |r| {
                Ok((r.get::<_, u16>(0)?, r.get::<_, u16>(1)?))
            })
            .map_err(sql(what))?;
        rows.map(|r| {
            r.map(|(first, last)| PortRange { first, last })
                .map_err(sql(what))
        })
        .collect()
    }

    fn owner_ports(&self, owner: &str) -> Result<u64, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT COALESCE(SUM(last_port - first_port + 1), 0) FROM reservations \
                 WHERE owner = ?1",
            )
            .and_then(|mut s| s.query_row([owner], |r| r.get::<_, i64>(0)))
            .map(|n| n as u64)
            .map_err(sql("counting an owner's ports"))
    }

    fn count(&self) -> Result<u64, StoreError> {
        self.conn
            .prepare_cached("SELECT COUNT(*) FROM reservations")
            .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
            .map(|n| n as u64)
            .map_err(sql("counting reservations"))
    }

    fn expired(&self, now_ms: u64) -> Result<Vec<Record>, StoreError> {
        self.query(
            "finding expired reservations",
            "WHERE expires_ms IS NOT NULL AND expires_ms <= ?1 ORDER BY expires_ms",
            [now_ms as i64],
        )
    }

    fn next_expiry(&self) -> Result<Option<u64>, StoreError> {
        self.conn
            .prepare_cached("SELECT MIN(expires_ms) FROM reservations WHERE expires_ms IS NOT NULL")
            .and_then(|mut s| s.query_row([], |r| r.get::<_, Option<i64>>(0)))
            .map(|t| t.map(|t| t as u64))
            .map_err(sql("finding the next expiry"))
    }

    fn expire(&mut self, id: u64, at_ms: u64) -> Result<bool, StoreError> {
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        let moved = tx
            .execute(
                &format!(
                    "INSERT INTO expired ({COLUMNS}, expired_ms) \
                     SELECT {COLUMNS}, ?2 FROM reservations WHERE id = ?1"
                ),
                params![id as i64, at_ms as i64],
            )
            .map_err(sql("keeping an expired reservation"))?;
        tx.execute(RECORD_HOLDER, params![id as i64, at_ms as i64, "expired"])
            .and_then(|_| tx.execute("DELETE FROM reservations WHERE id = ?1", [id as i64]))
            .and_then(|_| tx.execute("DELETE FROM port_mappings WHERE id = ?1", [id as i64]))
            .and_then(|_| tx.execute("DELETE FROM held_since WHERE id = ?1", [id as i64]))
            .map_err(sql("deleting an expired reservation"))?;
        tx.commit().map_err(sql("committing"))?;
        Ok(moved > 0)
    }

    fn history(&self, owner: Option<&str>) -> Result<Vec<(Record, u64)>, StoreError> {
        let what = "reading the expired history";
        let statement = format!(
            "SELECT {COLUMNS}, expired_ms FROM expired {} ORDER BY expired_ms DESC, id DESC",
            if owner.is_some() {
                "WHERE owner = ?1"
            } else {
                ""
            }
        );
        let mut stmt = self.conn.prepare_cached(&statement).map_err(sql(what))?;
        let map = |r: &Row<'_>| Ok((raw_row(r)?, r.get::<_, i64>(13)?));
        let rows = match owner {
            Some(owner) => stmt.query_map([owner], map),
            None => stmt.query_map([], map),
        }
        .map_err(sql(what))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql(what))?;
        rows.into_iter()
            .map(|(raw, at)| Ok((raw.into_record()?, at as u64)))
            .collect()
    }

    fn restore(
        &mut self,
        id: u64,
        ttl_ms: Option<u64>,
        expires_ms: Option<u64>,
        at_ms: u64,
    ) -> Result<Option<Record>, StoreError> {
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        let moved = tx
            .execute(
                &format!(
                    "INSERT INTO reservations ({COLUMNS}) \
                     SELECT {COLUMNS} FROM expired WHERE id = ?1"
                ),
                [id as i64],
            )
            .map_err(sql("restoring an expired reservation"))?;
        if moved == 0 {
            return Ok(None);
        }
        tx.execute(
            "UPDATE reservations SET ttl_ms = ?2, expires_ms = ?3 WHERE id = ?1",
            params![
                id as i64,
                ttl_ms.map(|t| t as i64),
                expires_ms.map(|t| t as i64)
            ],
        )
        .map_err(sql("restoring an expired reservation"))?;
        tx.execute("DELETE FROM expired WHERE id = ?1", [id as i64])
            .and_then(|_| {
                tx.execute(
                    "INSERT INTO held_since (id, since_ms) VALUES (?1, ?2) \
                     ON CONFLICT (id) DO UPDATE SET since_ms = excluded.since_ms",
                    params![id as i64, at_ms as i64],
                )
            })
            .map_err(sql("restoring an expired reservation"))?;
        tx.commit().map_err(sql("committing"))?;
        self.get(id)
    }

    fn purge_history(&mut self, before_ms: u64) -> Result<u64, StoreError> {
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        let purged = tx
            .execute(
                "DELETE FROM expired WHERE expired_ms < ?1",
                [before_ms as i64],
            )
            .and_then(|n| {
                tx.execute(
                    "DELETE FROM traffic WHERE id NOT IN \
                     (SELECT id FROM reservations UNION SELECT id FROM expired)",
                    [],
                )?;
                tx.execute(
                    "DELETE FROM triggers WHERE id NOT IN \
                     (SELECT id FROM reservations UNION SELECT id FROM expired)",
                    [],
                )?;
                tx.execute(
                    "DELETE FROM limits WHERE id NOT IN \
                     (SELECT id FROM reservations UNION SELECT id FROM expired)",
                    [],
                )
                .map(|_| n as u64)
            })
            .map_err(sql("purging the expired history"))?;
        tx.commit().map_err(sql("committing the purge"))?;
        Ok(purged)
    }

    fn add_traffic(&mut self, id: u64, t: Traffic) -> Result<(), StoreError> {
        if t == Traffic::default() {
            return Ok(());
        }
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.update(
            "recording a reservation's traffic",
            "INSERT INTO traffic (id, in_packets, in_bytes, out_packets, out_bytes) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO UPDATE SET \
             in_packets = in_packets + ?2, in_bytes = in_bytes + ?3, \
             out_packets = out_packets + ?4, out_bytes = out_bytes + ?5",
            params![
                id as i64,
                n(t.in_packets),
                n(t.in_bytes),
                n(t.out_packets),
                n(t.out_bytes)
            ],
        )
        .map(drop)
    }

    fn traffic(&self, id: u64) -> Result<Traffic, StoreError> {
        Ok(self
            .all_traffic_where(Some(id))?
            .remove(&id)
            .unwrap_or_default())
    }

    fn all_traffic(&self) -> Result<HashMap<u64, Traffic>, StoreError> {
        self.all_traffic_where(None)
    }

    fn read_only(&self) -> Option<&str> {
        self.read_only.as_deref()
    }

    fn insert_with(&mut self, new: &NewRecord, extras: Extras<'_>) -> Result<Record, StoreError> {
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        let record = Self::insert_one(&tx, new)?;
        let id = record.id as i64;
        if let Some(mapping) = extras.mapping {
            tx.execute(
                "INSERT INTO port_mappings (id, via, client_ip, protocols, internal_port, nonce) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    id,
                    mapping.via.as_str(),
                    mapping.client.to_string(),
                    mapping.protocol.mask(),
                    mapping.internal_port,
                    mapping.nonce.map(|n| n.to_vec()),
                ],
            )
            .map_err(sql("inserting a port mapping"))?;
        }
        if let Some(trigger) = extras.trigger {
            tx.execute(
                "INSERT INTO triggers (id, gate, protocols, first_port, last_port, idle_timeout_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    id,
                    trigger.gate,
                    trigger.on.protocols.mask(),
                    trigger.on.ports.first,
                    trigger.on.ports.last,
                    trigger.idle_timeout_ms as i64,
                ],
            )
            .map_err(sql("inserting a trigger rule"))?;
        }
        if let Some(l) = extras.limits {
            let rate = |r: Option<u64>| r.map(|v| v.min(i64::MAX as u64) as i64);
            let (list, networks) = match &l.limits.sources {
                None => (None, None),
                Some(list) => (
                    Some(if list.is_allow() { "allow" } else { "deny" }),
                    Some(
                        list.networks()
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                ),
            };
            tx.execute(
                "INSERT INTO limits (id, slot, packets_per_second, bits_per_second, \
                 syns_per_second, source_list, networks) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    id,
                    l.slot,
                    rate(l.limits.packets_per_second),
                    rate(l.limits.bits_per_second),
                    rate(l.limits.syns_per_second),
                    list,
                    networks,
                ],
            )
            .map_err(sql("inserting a reservation's limits"))?;
        }
        tx.commit().map_err(sql("committing"))?;
        Ok(record)
    }

    fn mapping(
        &self,
        client: Ipv4Addr,
        protocol: Protocols,
        internal_port: u16,
    ) -> Result<Option<(u64, Mapping)>, StoreError> {
        Ok(self
            .mappings_where(
                "WHERE client_ip = ?1 AND protocols = ?2 AND internal_port = ?3",
                params![client.to_string(), protocol.mask(), internal_port],
            )?
            .pop())
    }

    fn client_mappings(&self, client: Ipv4Addr) -> Result<Vec<(u64, Mapping)>, StoreError> {
        self.mappings_where(
            "WHERE client_ip = ?1 ORDER BY id",
            params![client.to_string()],
        )
    }

    fn forget_mapping(&mut self, id: u64) -> Result<bool, StoreError> {
        self.update(
            "forgetting a port mapping",
            "DELETE FROM port_mappings WHERE id = ?1",
            params![id as i64],
        )
    }

    fn set_mapping_nonce(&mut self, id: u64, nonce: [u8; 12]) -> Result<bool, StoreError> {
        self.update(
            "giving a port mapping its nonce",
            "UPDATE port_mappings SET nonce = ?2 WHERE id = ?1",
            params![id as i64, nonce.to_vec()],
        )
    }

    fn end(&mut self, id: u64, at_ms: u64) -> Result<bool, StoreError> {
        self.delete_recording(id, Some(at_ms))
    }

    fn who(
        &self,
        addr: Ipv4Addr,
        port: u16,
        protocol: Protocols,
        at_ms: u64,
    ) -> Result<Vec<Holder>, StoreError> {
        let ports = PortRange::single(port);
        let mut found = self.holders_where(
            "WHERE public_ip = ?1 AND first_port BETWEEN ?2 AND ?3 AND last_port >= ?4 \
             AND (protocols & ?5) != 0 AND from_ms <= ?6 AND until_ms > ?6",
            addr,
            ports,
            protocol,
            at_ms,
        )?;
        if let Some(r) = self.public_overlap(addr, ports, protocol)? {
            let since: Option<i64> = self
                .conn
                .query_row(
                    "SELECT since_ms FROM held_since WHERE id = ?1",
                    [r.id as i64],
                    |row| row.get(0),
                )
                .optional()
                .map_err(sql("reading when a holding began"))?;
            let from_ms = since.map_or(r.created_ms, |s| s as u64);
            if from_ms <= at_ms {
                found.push(Holder {
                    id: r.id,
                    owner: r.owner.clone(),
                    public: r.reservation.public,
                    from_ms,
                    until_ms: None,
                    ended: None,
                });
            }
        }
        Ok(found)
    }

    fn recent_holders(
        &self,
        addr: Ipv4Addr,
        ports: PortRange,
        protocols: Protocols,
        since_ms: u64,
    ) -> Result<Vec<Holder>, StoreError> {
        self.holders_where(
            "WHERE public_ip = ?1 AND first_port BETWEEN ?2 AND ?3 AND last_port >= ?4 \
             AND (protocols & ?5) != 0 AND until_ms >= ?6",
            addr,
            ports,
            protocols,
            since_ms,
        )
    }

    fn purge_holders(&mut self, before_ms: u64) -> Result<u64, StoreError> {
        self.conn
            .execute(
                "DELETE FROM holders WHERE until_ms < ?1",
                [before_ms as i64],
            )
            .map(|n| n as u64)
            .map_err(sql("purging past holders"))
    }

    fn add_drain(&mut self, drain: &NewDrain) -> Result<u64, StoreError> {
        self.conn
            .execute(
                "INSERT INTO drains (at_ms, owner, action, created_ms) VALUES (?1, ?2, ?3, ?4)",
                params![
                    drain.at_ms as i64,
                    drain.owner,
                    if drain.release { "release" } else { "disable" },
                    drain.created_ms as i64
                ],
            )
            .map_err(sql("scheduling a drain"))?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    fn drains(&self) -> Result<Vec<Drain>, StoreError> {
        let what = "reading the drains";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, at_ms, owner, action, created_ms, done_ms FROM drains ORDER BY id",
            )
            .map_err(sql(what))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Drain {
                    id: r.get::<_, i64>(0)? as u64,
                    drain: NewDrain {
                        at_ms: r.get::<_, i64>(1)?.max(0) as u64,
                        owner: r.get(2)?,
                        release: r.get::<_, String>(3)? == "release",
                        created_ms: r.get::<_, i64>(4)?.max(0) as u64,
                    },
                    done_ms: r.get::<_, Option<i64>>(5)?.map(|t| t.max(0) as u64),
                })
            })
            .map_err(sql(what))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql(what))?;
        Ok(rows)
    }

    fn cancel_drain(&mut self, id: u64) -> Result<bool, StoreError> {
        self.update(
            "cancelling a drain",
            "DELETE FROM drains WHERE id = ?1 AND done_ms IS NULL",
            params![id as i64],
        )
    }

    fn drain_done(&mut self, id: u64, at_ms: u64) -> Result<bool, StoreError> {
        self.update(
            "marking a drain done",
            "UPDATE drains SET done_ms = ?2 WHERE id = ?1",
            params![id as i64, at_ms as i64],
        )
    }

    fn trigger(&self, id: u64) -> Result<Option<Trigger>, StoreError> {
        Ok(self
            .triggers_where("WHERE id = ?1", params![id as i64])?
            .remove(&id))
    }

    fn triggers(&self) -> Result<HashMap<u64, Trigger>, StoreError> {
        self.triggers_where("WHERE id IN (SELECT id FROM reservations)", [])
    }

    fn set_trigger_gate(&mut self, id: u64, gate: u16) -> Result<bool, StoreError> {
        self.update(
            "giving a trigger rule its gate",
            "UPDATE triggers SET gate = ?2 WHERE id = ?1",
            params![id as i64, gate],
        )
    }

    fn limits(&self, id: u64) -> Result<Option<SlotLimits>, StoreError> {
        Ok(self
            .limits_where("WHERE id = ?1", params![id as i64])?
            .remove(&id))
    }

    fn all_limits(&self) -> Result<HashMap<u64, SlotLimits>, StoreError> {
        self.limits_where("WHERE id IN (SELECT id FROM reservations)", [])
    }

    fn set_limit_slot(&mut self, id: u64, slot: u16) -> Result<bool, StoreError> {
        self.update(
            "giving a reservation's limits their slot",
            "UPDATE limits SET slot = ?2 WHERE id = ?1",
            params![id as i64, slot],
        )
    }

    fn tunnel_owner(&self, address: Ipv4Addr) -> Result<Option<String>, StoreError> {
        Ok(self
            .tunnel_owners_where(Some(address))?
            .pop()
            .map(|(_, o)| o))
    }

    fn set_tunnel_owner(
        &mut self,
        address: Ipv4Addr,
        owner: Option<&str>,
    ) -> Result<(), StoreError> {
        match owner {
            Some(owner) => self.update(
                "setting a tunnel owner",
                "INSERT INTO tunnel_owners (address, owner) VALUES (?1, ?2) \
                 ON CONFLICT (address) DO UPDATE SET owner = ?2",
                params![address.to_string(), owner],
            ),
            None => self.update(
                "removing a tunnel owner",
                "DELETE FROM tunnel_owners WHERE address = ?1",
                params![address.to_string()],
            ),
        }
        .map(drop)
    }

    fn tunnel_owners(&self) -> Result<Vec<(Ipv4Addr, String)>, StoreError> {
        self.tunnel_owners_where(None)
    }

    fn mapping_epoch_ms(&mut self, now_ms: u64) -> Result<u64, StoreError> {
        let read = |conn: &Connection| {
            conn.query_row(
                "SELECT value FROM settings WHERE key = 'mapping_epoch_ms'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()
        };
        if let Some(at) = read(&self.conn).map_err(sql("reading the mapping epoch"))? {
            return Ok(at as u64);
        }
        if self.read_only.is_some() {
            return Ok(now_ms);
        }
        self.conn
            .execute(
                "INSERT OR IGNORE INTO settings (key, value) VALUES ('mapping_epoch_ms', ?1)",
                [now_ms as i64],
            )
            .map_err(sql("recording the mapping epoch"))?;
        Ok(read(&self.conn)
            .map_err(sql("reading the mapping epoch"))?
            .map_or(now_ms, |at| at as u64))
    }
}

impl SqliteStore {
    fn tunnel_owners_where(
        &self,
        address: Option<Ipv4Addr>,
    ) -> Result<Vec<(Ipv4Addr, String)>, StoreError> {
        let what = "reading tunnel owners";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT address, owner FROM tunnel_owners WHERE ?1 IS NULL OR address = ?1 \
                 ORDER BY address",
            )
            .map_err(sql(what))?;
        let rows = stmt
            .query_map([address.map(|a| a.to_string())], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(sql(what))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql(what))?;
        rows.into_iter()
            .map(|(address, owner)| {
                let parsed = address.parse().map_err(|_| StoreError::BadRow {
                    id: 0,
                    detail: format!("tunnel owner address '{address}'"),
                })?;
                Ok((parsed, owner))
            })
            .collect()
    }

    /// Past holders `where_clause` finds for `addr` (?1), a first port in the index range a
    /// row overlapping `ports` can start in (?2 to ?3), the range's other end (?4), the
    /// protocols (?5) and a time (?6).
    /// Every row `statement` selects, as the tuple `R` of its columns (checked by the caller).
    fn select<R>(
        &self,
        what: &'static str,
        statement: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<R>, StoreError>
    where
        R: for<'a> TryFrom<&'a Row<'a>, Error = rusqlite::Error>,
    {
        let mut stmt = self.conn.prepare_cached(statement).map_err(sql(what))?;
        stmt.query_map(params, |r| R::try_from(r))
            .map_err(sql(what))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql(what))
    }

    fn holders_where(
        &self,
        where_clause: &str,
        addr: Ipv4Addr,
        ports: PortRange,
        protocols: Protocols,
        at_ms: u64,
    ) -> Result<Vec<Holder>, StoreError> {
        type Row = (i64, String, i64, i64, u8, i64, i64, String);
        let rows: Vec<Row> = self.select(
            "reading past holders",
            &format!(
                "SELECT id, owner, first_port, last_port, protocols, from_ms, until_ms, ended \
                 FROM holders {where_clause} ORDER BY until_ms"
            ),
            params![
                addr.to_string(),
                lowest_overlapping_first(ports),
                ports.last,
                ports.first,
                protocols.mask(),
                at_ms as i64
            ],
        )?;
        rows.into_iter()
            .map(|(id, owner, first, last, mask, from, until, ended)| {
                let bad = |detail: String| StoreError::BadRow { id, detail };
                let port = |v: i64| u16::try_from(v).map_err(|_| bad(format!("port {v}")));
                Ok(Holder {
                    id: id as u64,
                    owner,
                    public: PublicSpec {
                        addr,
                        ports: PortRange::new(port(first)?, port(last)?)
                            .map_err(|e| bad(e.to_string()))?,
                        protocols: Protocols::from_mask(mask)
                            .ok_or_else(|| bad(format!("protocols {mask}")))?,
                    },
                    from_ms: from.max(0) as u64,
                    until_ms: Some(until.max(0) as u64),
                    ended: Some(ended),
                })
            })
            .collect()
    }

    /// Deletes reservation `id` and what goes with it, in one transaction; with
    /// `Some(at_ms)`, its holding is first recorded as past (`released` then).
    fn delete_recording(&mut self, id: u64, ended_at_ms: Option<u64>) -> Result<bool, StoreError> {
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        if let Some(at_ms) = ended_at_ms {
            tx.execute(RECORD_HOLDER, params![id as i64, at_ms as i64, "released"])
                .map_err(sql("recording a past holder"))?;
        }
        let deleted = tx
            .execute("DELETE FROM reservations WHERE id = ?1", [id as i64])
            .and_then(|n| {
                tx.execute("DELETE FROM traffic WHERE id = ?1", [id as i64])?;
                tx.execute("DELETE FROM port_mappings WHERE id = ?1", [id as i64])?;
                tx.execute("DELETE FROM triggers WHERE id = ?1", [id as i64])?;
                tx.execute("DELETE FROM limits WHERE id = ?1", [id as i64])?;
                tx.execute("DELETE FROM held_since WHERE id = ?1", [id as i64])?;
                Ok(n)
            })
            .map_err(sql("deleting a reservation"))?;
        tx.commit().map_err(sql("committing a deletion"))?;
        Ok(deleted > 0)
    }

    fn limits_where(
        &self,
        where_clause: &str,
        params: impl rusqlite::Params,
    ) -> Result<HashMap<u64, SlotLimits>, StoreError> {
        type Row = (
            i64,
            i64,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = self.select(
            "reading reservations' limits",
            &format!(
                "SELECT id, slot, packets_per_second, bits_per_second, syns_per_second, \
                 source_list, networks FROM limits {where_clause}"
            ),
            params,
        )?;
        rows.into_iter()
            .map(|(id, slot, pps, bps, sps, list, networks)| {
                let bad = |detail: String| StoreError::BadRow { id, detail };
                let rate = |v: Option<i64>| -> Result<Option<u64>, StoreError> {
                    v.map(|v| u64::try_from(v).map_err(|_| bad(format!("limit rate {v}"))))
                        .transpose()
                };
                let sources = match list.as_deref() {
                    None => None,
                    Some(kind) => {
                        let nets: Vec<String> = networks
                            .as_deref()
                            .unwrap_or("")
                            .split(',')
                            .map(str::to_string)
                            .collect();
                        Some(SourceList::parse(kind == "allow", &nets).map_err(bad)?)
                    }
                };
                Ok((
                    id as u64,
                    SlotLimits {
                        slot: u16::try_from(slot)
                            .ok()
                            .filter(|s| *s != 0)
                            .ok_or_else(|| bad(format!("limit slot {slot}")))?,
                        limits: Limits {
                            packets_per_second: rate(pps)?,
                            bits_per_second: rate(bps)?,
                            syns_per_second: rate(sps)?,
                            sources,
                        },
                    },
                ))
            })
            .collect()
    }

    fn triggers_where(
        &self,
        where_clause: &str,
        params: impl rusqlite::Params,
    ) -> Result<HashMap<u64, Trigger>, StoreError> {
        type Row = (i64, i64, u8, i64, i64, i64);
        let rows: Vec<Row> = self.select(
            "reading trigger rules",
            &format!(
                "SELECT id, gate, protocols, first_port, last_port, idle_timeout_ms FROM triggers \
                 {where_clause}"
            ),
            params,
        )?;
        rows.into_iter()
            .map(|(id, gate, mask, first, last, idle)| {
                let bad = |detail: String| StoreError::BadRow { id, detail };
                let port = |v: i64| u16::try_from(v).map_err(|_| bad(format!("trigger port {v}")));
                Ok((
                    id as u64,
                    Trigger {
                        gate: u16::try_from(gate)
                            .ok()
                            .filter(|g| *g != 0)
                            .ok_or_else(|| bad(format!("trigger gate {gate}")))?,
                        on: TriggerPorts {
                            ports: PortRange::new(port(first)?, port(last)?)
                                .map_err(|e| bad(e.to_string()))?,
                            protocols: Protocols::from_mask(mask)
                                .ok_or_else(|| bad(format!("trigger protocols {mask}")))?,
                        },
                        idle_timeout_ms: u64::try_from(idle)
                            .ok()
                            .filter(|t| *t > 0)
                            .ok_or_else(|| bad(format!("trigger idle timeout {idle}")))?,
                    },
                ))
            })
            .collect()
    }

    fn mappings_where(
        &self,
        where_clause: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<(u64, Mapping)>, StoreError> {
        type Row = (i64, String, String, u8, u16, Option<Vec<u8>>);
        let rows: Vec<Row> = self.select(
            "reading port mappings",
            &format!(
                "SELECT id, via, client_ip, protocols, internal_port, nonce FROM port_mappings \
                 {where_clause}"
            ),
            params,
        )?;
        rows.into_iter()
            .map(|(id, via, client, mask, internal_port, nonce)| {
                let bad = |detail: String| StoreError::BadRow { id, detail };
                Ok((
                    id as u64,
                    Mapping {
                        via: MappingProtocol::parse(&via)
                            .ok_or_else(|| bad(format!("port mapping via '{via}'")))?,
                        client: client
                            .parse()
                            .map_err(|_| bad(format!("port mapping client '{client}'")))?,
                        protocol: Protocols::from_mask(mask)
                            .filter(|p| *p != Protocols::Both)
                            .ok_or_else(|| bad(format!("port mapping protocols {mask}")))?,
                        internal_port,
                        nonce: nonce
                            .map(|n| <[u8; 12]>::try_from(n.as_slice()))
                            .transpose()
                            .map_err(|_| bad("port mapping nonce".into()))?,
                    },
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(owner: &str, public: &str, to: &str) -> NewRecord {
        NewRecord {
            owner: owner.into(),
            reservation: Reservation::new(public.parse().unwrap(), to.parse().unwrap()).unwrap(),
            created_ms: 1_000,
            ttl_ms: None,
            expires_ms: None,
            enabled: true,
            note: String::new(),
        }
    }

    fn range(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    /// A fresh directory for a store file: (the directory, the file's path).
    fn scratch(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("pf-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pf.db");
        (dir, path)
    }

    #[test]
    fn records_round_trip_and_ids_are_never_reused() {
        let (dir, path) = scratch("test");
        let mut store = SqliteStore::open(&path).unwrap();
        let mut a = new("acct-1", "198.51.100.1:8810-8815/both", "10.8.0.2:9810");
        a.ttl_ms = Some(60_000);
        a.expires_ms = Some(61_000);
        a.note = "seedbox".into();
        let a = store.insert(&a).unwrap();
        let b = store
            .insert(&new("acct-2", "198.51.100.1:80/tcp", "10.8.0.3"))
            .unwrap();
        assert!(store.delete(b.id).unwrap());
        assert!(!store.delete(b.id).unwrap());
        drop(store);
        // Reopened: what was committed is there, and a new id is past the deleted one.
        let mut store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.list(None).unwrap(), vec![a.clone()]);
        assert_eq!(store.get(a.id).unwrap(), Some(a.clone()));
        let c = store
            .insert(&new("acct-2", "198.51.100.1:81/tcp", "10.8.0.3"))
            .unwrap();
        assert!(c.id > b.id);
        assert_eq!(store.list(Some("acct-2")).unwrap(), vec![c]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_version_2_store_gains_the_traffic_table_and_keeps_its_records() {
        let (dir, path) = scratch("v2");
        let mut store = SqliteStore::open(&path).unwrap();
        let a = store
            .insert(&new("acct-1", "198.51.100.1:80/tcp", "10.8.0.3"))
            .unwrap();
        // What the previous pf wrote: no traffic table, version 2.
        store.conn.execute_batch("DROP TABLE traffic").unwrap();
        store.conn.pragma_update(None, "user_version", 2).unwrap();
        drop(store);
        let mut store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.list(None).unwrap(), vec![a.clone()]);
        let t = Traffic {
            in_packets: 3,
            in_bytes: 300,
            out_packets: 2,
            out_bytes: 200,
        };
        store.add_traffic(a.id, t).unwrap();
        store.add_traffic(a.id, t).unwrap();
        assert_eq!(store.traffic(a.id).unwrap(), t + t);
        assert!(store.delete(a.id).unwrap());
        assert_eq!(store.traffic(a.id).unwrap(), Traffic::default());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn overlaps_ports_quota_and_expiry() {
        let mut store = SqliteStore::in_memory().unwrap();
        let mut a = new("acct-1", "198.51.100.1:8810-8815/tcp", "10.8.0.2:9810");
        a.expires_ms = Some(5_000);
        let a = store.insert(&a).unwrap();
        let pub_ip: Ipv4Addr = "198.51.100.1".parse().unwrap();
        let target: Ipv4Addr = "10.8.0.2".parse().unwrap();
        // Public side: the range's edges overlap, next to it does not, nor udp.
        for (ports, protocols, hit) in [
            (range(8815, 8820), Protocols::Tcp, true),
            (range(8800, 8810), Protocols::Both, true),
            (range(8816, 8816), Protocols::Tcp, false),
            (range(8809, 8809), Protocols::Tcp, false),
            (range(8812, 8812), Protocols::Udp, false),
        ] {
            let found = store.public_overlap(pub_ip, ports, protocols).unwrap();
            assert_eq!(found.is_some(), hit, "{ports} {protocols}");
        }
        assert!(
            store
                .public_overlap(
                    "198.51.100.2".parse().unwrap(),
                    range(8810, 8810),
                    Protocols::Tcp
                )
                .unwrap()
                .is_none()
        );
        // Target side covers 9810-9815.
        for (ports, hit) in [
            (range(9815, 9815), true),
            (range(9700, 9810), true),
            (range(9816, 9900), false),
        ] {
            let found = store
                .target_overlap(target, ports, Protocols::Tcp, None)
                .unwrap();
            assert_eq!(found.map(|r| r.id), hit.then_some(a.id), "{ports}");
        }
        store
            .insert(&new("acct-1", "198.51.100.1:7000/both", "10.8.0.2"))
            .unwrap();
        assert_eq!(store.owner_ports("acct-1").unwrap(), 7);
        assert_eq!(store.owner_ports("nobody").unwrap(), 0);
        assert_eq!(store.count().unwrap(), 2);
        assert_eq!(
            store.used_public_ports(pub_ip, Protocols::Udp).unwrap(),
            vec![range(7000, 7000)]
        );
        assert_eq!(store.next_expiry().unwrap(), Some(5_000));
        assert!(store.expired(4_999).unwrap().is_empty());
        assert_eq!(store.expired(5_000).unwrap(), vec![a.clone()]);
        assert!(store.set_lifetime(a.id, Some(1), Some(9_000)).unwrap());
        assert!(store.expired(5_000).unwrap().is_empty());
        assert!(store.set_enabled(a.id, false).unwrap());
        assert!(!store.get(a.id).unwrap().unwrap().enabled);
    }

    #[test]
    fn expired_records_stay_restorable_until_purged() {
        let mut store = SqliteStore::in_memory().unwrap();
        let mut a = new("acct-1", "198.51.100.1:8810/tcp", "10.8.0.2");
        a.ttl_ms = Some(1_000);
        a.expires_ms = Some(2_000);
        let a = store.insert(&a).unwrap();
        assert!(store.expire(a.id, 2_001).unwrap());
        assert!(!store.expire(a.id, 2_002).unwrap(), "expired twice");
        assert_eq!(store.get(a.id).unwrap(), None);
        assert_eq!(store.count().unwrap(), 0);
        assert_eq!(store.history(None).unwrap(), vec![(a.clone(), 2_001)]);
        assert_eq!(store.history(Some("acct-2")).unwrap(), vec![]);
        // Restored under its id, with the new lifetime.
        let back = store
            .restore(a.id, Some(5_000), Some(9_000), 4_000)
            .unwrap()
            .unwrap();
        assert_eq!((back.id, back.expires_ms), (a.id, Some(9_000)));
        assert!(store.history(None).unwrap().is_empty());
        assert_eq!(store.restore(a.id, None, None, 4_000).unwrap(), None);
        store.expire(a.id, 3_000).unwrap();
        assert_eq!(store.purge_history(3_000).unwrap(), 0);
        assert_eq!(store.purge_history(3_001).unwrap(), 1);
        assert!(store.history(None).unwrap().is_empty());
    }

    #[test]
    fn who_held_a_port_and_when() {
        let mut store = SqliteStore::in_memory().unwrap();
        let addr = Ipv4Addr::new(198, 51, 100, 1);
        let who = |store: &SqliteStore, port: u16, at: u64| -> Vec<(String, Option<u64>)> {
            store
                .who(addr, port, Protocols::Tcp, at)
                .unwrap()
                .into_iter()
                .map(|h| (h.owner, h.until_ms))
                .collect()
        };
        let mut a = new("acct-1", "198.51.100.1:8810-8812/tcp", "10.8.0.2");
        a.created_ms = 1_000;
        let a = store.insert(&a).unwrap();
        assert_eq!(who(&store, 8811, 999), vec![], "before it was made");
        assert_eq!(who(&store, 8811, 1_000), vec![("acct-1".into(), None)]);
        // Given to another owner at 2,000: each held it for their own time.
        store
            .change(a.id, "acct-2", &a.reservation, "", 2_000)
            .unwrap();
        assert_eq!(
            who(&store, 8812, 1_500),
            vec![("acct-1".into(), Some(2_000))]
        );
        assert_eq!(who(&store, 8812, 2_000), vec![("acct-2".into(), None)]);
        // A change that keeps the owner records nothing.
        store
            .change(a.id, "acct-2", &a.reservation, "note", 2_500)
            .unwrap();
        assert_eq!(who(&store, 8812, 2_400), vec![("acct-2".into(), None)]);
        // Expired at 3,000, restored at 4,000: nobody in between.
        store.expire(a.id, 3_000).unwrap();
        assert_eq!(who(&store, 8810, 3_500), vec![]);
        store.restore(a.id, None, None, 4_000).unwrap();
        assert_eq!(who(&store, 8810, 3_500), vec![]);
        assert_eq!(who(&store, 8810, 4_000), vec![("acct-2".into(), None)]);
        // Released at 5,000; other ports, protocols and addresses were never held.
        assert!(store.end(a.id, 5_000).unwrap());
        assert_eq!(
            who(&store, 8810, 4_500),
            vec![("acct-2".into(), Some(5_000))]
        );
        assert_eq!(who(&store, 8810, 5_000), vec![]);
        assert_eq!(who(&store, 8813, 4_500), vec![]);
        assert!(
            store
                .who(addr, 8810, Protocols::Udp, 4_500)
                .unwrap()
                .is_empty()
        );
        let owners = |since| -> Vec<String> {
            store
                .recent_holders(addr, PortRange::single(8811), Protocols::Both, since)
                .unwrap()
                .into_iter()
                .map(|h| h.owner)
                .collect()
        };
        assert_eq!(owners(2_999), vec!["acct-2", "acct-2"]);
        assert_eq!(owners(4_999), vec!["acct-2"]);
        assert_eq!(owners(5_001), Vec::<String>::new());
        assert_eq!(store.purge_holders(3_001).unwrap(), 2);
        assert_eq!(who(&store, 8812, 1_500), vec![], "purged");
        assert_eq!(store.purge_holders(u64::MAX >> 1).unwrap(), 1);
    }

    #[test]
    fn a_bad_row_is_reported_not_trusted() {
        let store = SqliteStore::in_memory().unwrap();
        store
            .conn
            .execute(
                "INSERT INTO reservations (owner, public_ip, first_port, last_port, protocols, \
                 target_ip, target_first_port, created_ms, enabled, note) \
                 VALUES ('x', '198.51.100', 80, 80, 1, '10.8.0.2', 80, 0, 1, '')",
                [],
            )
            .unwrap();
        let err = store.list(None).unwrap_err().to_string();
        assert!(err.contains("address '198.51.100'"), "{err}");
    }
}
