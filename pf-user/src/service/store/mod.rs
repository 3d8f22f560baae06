//! The reservation store: the source of truth for what pf forwards. The kernel maps are its
//! cache, rebuilt from it by `pf serve` on every start.
//!
//! [`Store`] has two backends: [`SqliteStore`], one file of this server's own (the default),
//! and [`PostgresStore`], one database that a fleet of VPN servers shares. Both run the same
//! queries ([`queries`]), written once against a small [`sql::Conn`]. Every method is one
//! transaction: a range is stored whole or not at all.

use std::{collections::HashMap, net::Ipv4Addr};

use crate::{
    domain::{
        limits::Limits,
        spec::{PortRange, Protocols, PublicSpec, Reservation, TriggerPorts},
    },
    kernel::state::Traffic,
    service::fleet::Agent,
};

mod postgresql;
mod queries;
mod schema;
pub(crate) mod sql;
mod sqlite;
#[cfg(test)]
mod tests;

pub use postgresql::{PostgresLocation, PostgresStore, watch_changes};
pub use queries::SqlStore;
pub use sqlite::SqliteStore;

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
    #[error("reservation store: {what}: {detail}")]
    Column { what: &'static str, detail: String },
    #[error("reservation store: {what}: {source}")]
    Postgres {
        what: &'static str,
        source: ::postgres::Error,
    },
    /// The database cannot be reached: changes are refused until it can (the data plane
    /// keeps forwarding what it has).
    #[error("the reservation store is unavailable ({what}): {detail}")]
    Unavailable { what: &'static str, detail: String },
    #[error("reservation store {location}: {detail}")]
    Config { location: String, detail: String },
    /// Checked again inside the store's transaction, under the fleet's lock: another change
    /// (another agent's) took these ports first.
    #[error("{public} overlaps reservation {by} ({held}), made meanwhile")]
    Taken {
        public: PublicSpec,
        by: u64,
        held: Reservation,
    },
}

impl StoreError {
    /// Whether the store could not be reached at all (as opposed to refusing what was asked).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

/// Where the reservations are kept: an SQLite file of this server's own (the default), or the
/// PostgreSQL database a fleet of servers shares.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreLocation {
    Sqlite(std::path::PathBuf),
    Postgres(Box<PostgresLocation>),
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => write!(f, "{}", path.display()),
            StoreLocation::Postgres(db) => f.write_str(db.url()),
        }
    }
}

impl StoreLocation {
    /// A connection for reads beside the engine's changes (the API's readers).
    pub fn open_reader(&self) -> Result<Box<dyn Store>, StoreError> {
        Ok(match self {
            StoreLocation::Sqlite(path) => Box::new(SqliteStore::open_reader(path)?),
            StoreLocation::Postgres(db) => Box::new(PostgresStore::open_reader(db)?),
        })
    }

    /// Whether the store holds nothing of pf's yet (a new file, a database without pf's
    /// tables).
    pub fn is_new(&self) -> Result<bool, StoreError> {
        match self {
            StoreLocation::Sqlite(path) => Ok(SqliteStore::is_new(path)),
            StoreLocation::Postgres(db) => PostgresStore::is_new(db),
        }
    }
}

/// What every reservation store can do. Conflicts and policy are checked by the caller (the
/// service runs one operation at a time); the store answers the questions they need.
pub trait Store: Send {
    fn insert(&mut self, new: &NewRecord) -> Result<Record, StoreError>;
    /// Inserts all of `new` in one transaction (bulk loads and benchmarks), unchecked: the
    /// caller has made sure they overlap nothing.
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
    /// Whether the store can be reached now: a database server's connection is made again
    /// if it was lost (at most once per back-off period, so a dead server is not hammered).
    fn reachable(&self) -> Result<(), StoreError>;

    /// Stores a reservation with what comes with it (a port mapping, a trigger rule, limits),
    /// in one transaction, which checks its public side is still free (`StoreError::Taken`).
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

    /// A shared store's change counter: it moves with every change to a reservation, its
    /// trigger rule or its limits, by any agent (or by hand); `None` for a store of this
    /// server's own, which only this service changes.
    fn fleet_version(&self) -> Result<Option<i64>, StoreError>;
    /// Records `agent` (by name) as present now with its public IPs; every agent the store
    /// knows, this one included. Nothing for a store of this server's own.
    fn register_agent(&mut self, agent: &Agent) -> Result<Vec<Agent>, StoreError>;
}

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
