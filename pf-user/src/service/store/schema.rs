//! The store's tables, written once for both backends (PostgreSQL's DDL is derived).

/// The schema this pf writes; `PRAGMA user_version` records it in the file. Version 2 added
/// the expired history, version 3 the carried-over traffic, version 4 the port mappings and
/// the settings, version 5 the trigger rules, version 6 the past holders of each range (new
/// tables only: an older file is brought up to date by creating what it lacks), version 7
/// the scheduled drains, version 8 the reservations' limits.
pub(super) const SCHEMA_VERSION: i64 = 8;

pub(super) const SCHEMA: &str = "
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

pub(super) const COLUMNS: &str = "id, owner, public_ip, first_port, last_port, protocols, target_ip, \
                       target_first_port, created_ms, ttl_ms, expires_ms, enabled, note";
