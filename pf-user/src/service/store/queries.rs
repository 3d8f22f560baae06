//! Every query of the store, once, for both backends: [`SqlStore`] over a [`Conn`].

use std::{collections::HashMap, net::Ipv4Addr};

use pf_common::limits::MAX_RANGE_PORTS;

use super::{
    Drain, Extras, Holder, ListFilter, Mapping, MappingProtocol, NewDrain, NewRecord, Record,
    SlotLimits, Store, StoreError, Trigger,
    schema::COLUMNS,
    sql::{Conn, FromRow, FromValue, Value, params},
};
use crate::{
    domain::{
        limits::{Limits, SourceList},
        spec::{FLEET, PortRange, Protocols, PublicSpec, Reservation, TriggerPorts},
    },
    kernel::state::Traffic,
    service::fleet::Agent,
};

/// The SQL that records reservation ?1's present holding as past, ending at ?2 as ?3.
const RECORD_HOLDER: &str = "INSERT INTO holders (id, owner, public_ip, first_port, last_port, \
     protocols, from_ms, until_ms, ended) \
     SELECT r.id, r.owner, r.public_ip, r.first_port, r.last_port, r.protocols, \
     COALESCE((SELECT since_ms FROM held_since h WHERE h.id = r.id), r.created_ms), \
     CAST(?2 AS BIGINT), CAST(?3 AS TEXT) FROM reservations r WHERE r.id = ?1";

/// Records ?1's holding as beginning at ?2 (an owner change, a restore).
const HELD_SINCE: &str = "INSERT INTO held_since (id, since_ms) VALUES (?1, ?2) \
     ON CONFLICT (id) DO UPDATE SET since_ms = excluded.since_ms";

/// A reservation store on a SQL database: [`super::SqliteStore`] or
/// [`super::PostgresStore`].
pub struct SqlStore<C> {
    pub(super) conn: C,
    /// Set when the store takes no changes, with why (a full disk, a reader).
    pub(super) read_only: Option<String>,
}

impl<C: Conn> SqlStore<C> {
    pub(super) fn new(conn: C, read_only: Option<String>) -> Self {
        Self { conn, read_only }
    }

    /// Runs `f` in one transaction: committed if it succeeds, undone if it fails.
    fn transaction<T>(
        &self,
        reserving: bool,
        f: impl FnOnce(&C) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.conn.begin(reserving)?;
        match f(&self.conn) {
            Ok(value) => {
                self.conn.commit()?;
                Ok(value)
            }
            Err(e) => {
                self.conn.rollback();
                Err(e)
            }
        }
    }

    /// Every row `statement` selects, as `R` (a tuple of its columns).
    fn select<R: FromRow>(
        &self,
        what: &'static str,
        statement: &str,
        params: &[Value],
    ) -> Result<Vec<R>, StoreError> {
        select(&self.conn, what, statement, params)
    }

    fn update(
        &self,
        what: &'static str,
        statement: &str,
        params: &[Value],
    ) -> Result<bool, StoreError> {
        Ok(self.conn.execute(what, statement, params)? > 0)
    }

    fn query(
        &self,
        what: &'static str,
        where_clause: &str,
        params: &[Value],
    ) -> Result<Vec<Record>, StoreError> {
        let rows: Vec<RawRow> = self.select(
            what,
            &format!("SELECT {COLUMNS} FROM reservations {where_clause}"),
            params,
        )?;
        rows.into_iter().map(RawRow::into_record).collect()
    }

    /// The first record `where_clause` finds for `addr` (?1), a first port in the index
    /// range a record overlapping `ports` can start in (?2 to ?3), the range's other end (?4),
    /// the protocols (?5) and then `extra`.
    fn first_overlap(
        &self,
        what: &'static str,
        where_clause: &str,
        addr: Ipv4Addr,
        ports: PortRange,
        protocols: Protocols,
        extra: Option<Value>,
    ) -> Result<Option<Record>, StoreError> {
        let mut params = params![
            addr.to_string(),
            lowest_overlapping_first(ports),
            ports.last,
            ports.first,
            protocols.mask()
        ]
        .to_vec();
        params.extend(extra);
        Ok(self.query(what, where_clause, &params)?.pop())
    }

    /// Which public addresses a public-side query for `addr` (?1) meets. In a shared store a
    /// fleet-wide record (`0.0.0.0`) holds its ports on every server's address, and a
    /// fleet-wide request meets every record; a store of one server's own has neither. Each
    /// form is an index scan: (public_ip, first_port) for an address, first_port for the
    /// fleet.
    fn public_addr_where(&self, addr: Ipv4Addr) -> &'static str {
        if !self.conn.shared() {
            "public_ip = ?1"
        } else if addr == FLEET {
            // ?1 is still named, so that its type is known.
            "CAST(?1 AS TEXT) IS NOT NULL"
        } else {
            "public_ip IN (?1, '0.0.0.0')"
        }
    }

    /// A record in the way of `new`'s public side, checked inside the transaction that
    /// stores it (which holds the fleet's lock).
    fn check_free(&self, new: &Reservation) -> Result<(), StoreError> {
        let public = new.public;
        match self.public_overlap(public.addr, public.ports, public.protocols)? {
            Some(existing) => Err(StoreError::Taken {
                public,
                by: existing.id,
                held: existing.reservation,
            }),
            None => Ok(()),
        }
    }

    /// The traffic table's rows, all or one id's.
    fn all_traffic_where(&self, id: Option<u64>) -> Result<HashMap<u64, Traffic>, StoreError> {
        let rows: Vec<(i64, i64, i64, i64, i64)> = self.select(
            "reading traffic",
            "SELECT id, in_packets, in_bytes, out_packets, out_bytes FROM traffic \
             WHERE CAST(?1 AS BIGINT) IS NULL OR id = ?1",
            &params![id],
        )?;
        let n = |v: i64| v.max(0) as u64;
        Ok(rows
            .into_iter()
            .map(|(id, ip, ib, op, ob)| {
                (
                    n(id),
                    Traffic {
                        in_packets: n(ip),
                        in_bytes: n(ib),
                        out_packets: n(op),
                        out_bytes: n(ob),
                    },
                )
            })
            .collect())
    }

    fn tunnel_owners_where(
        &self,
        address: Option<Ipv4Addr>,
    ) -> Result<Vec<(Ipv4Addr, String)>, StoreError> {
        let rows: Vec<(String, String)> = self.select(
            "reading tunnel owners",
            "SELECT address, owner FROM tunnel_owners \
             WHERE CAST(?1 AS TEXT) IS NULL OR address = ?1 ORDER BY address",
            &params![address.map(|a| a.to_string())],
        )?;
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
            &params![
                addr.to_string(),
                lowest_overlapping_first(ports),
                ports.last,
                ports.first,
                protocols.mask(),
                at_ms
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
        self.transaction(false, |conn| {
            if let Some(at_ms) = ended_at_ms {
                conn.execute(
                    "recording a past holder",
                    RECORD_HOLDER,
                    &params![id, at_ms, "released"],
                )?;
            }
            let what = "deleting a reservation";
            let deleted =
                conn.execute(what, "DELETE FROM reservations WHERE id = ?1", &params![id])?;
            for table in [
                "traffic",
                "port_mappings",
                "triggers",
                "limits",
                "held_since",
            ] {
                conn.execute(
                    what,
                    &format!("DELETE FROM {table} WHERE id = ?1"),
                    &params![id],
                )?;
            }
            Ok(deleted > 0)
        })
    }

    fn limits_where(
        &self,
        where_clause: &str,
        params: &[Value],
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
        params: &[Value],
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
        params: &[Value],
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

    /// The one value a query of one row and column gives (a count, a sum, a setting).
    fn scalar<T: FromValue>(
        &self,
        what: &'static str,
        statement: &str,
        params: &[Value],
    ) -> Result<Option<T>, StoreError> {
        Ok(self
            .select::<(T,)>(what, statement, params)?
            .pop()
            .map(|(v,)| v))
    }
}

/// Every row `statement` selects on `conn`, as `R`.
fn select<C: Conn, R: FromRow>(
    conn: &C,
    what: &'static str,
    statement: &str,
    params: &[Value],
) -> Result<Vec<R>, StoreError> {
    conn.rows(what, statement, params)?
        .into_iter()
        .map(|row| R::from_row(row).map_err(|detail| StoreError::Column { what, detail }))
        .collect()
}

/// Inserts `new`, returning it with its id.
fn insert_one<C: Conn>(conn: &C, new: &NewRecord) -> Result<Record, StoreError> {
    let r = &new.reservation;
    let ids: Vec<(i64,)> = select(
        conn,
        "inserting a reservation",
        "INSERT INTO reservations (owner, public_ip, first_port, last_port, protocols, \
         target_ip, target_first_port, created_ms, ttl_ms, expires_ms, enabled, note) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) RETURNING id",
        &params![
            &new.owner,
            r.public.addr.to_string(),
            r.public.ports.first,
            r.public.ports.last,
            r.public.protocols.mask(),
            r.target_addr.to_string(),
            r.target_first_port,
            new.created_ms,
            new.ttl_ms,
            new.expires_ms,
            new.enabled,
            &new.note,
        ],
    )?;
    let (id,) = ids.into_iter().next().ok_or(StoreError::Column {
        what: "inserting a reservation",
        detail: "no id returned".into(),
    })?;
    Ok(Record {
        id: id as u64,
        data: new.clone(),
    })
}

/// A row of [`COLUMNS`] as the database holds it, checked into a [`Record`] separately so
/// that a hand-edited bad row is reported, not trusted.
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

impl FromRow for RawRow {
    fn from_row(row: Vec<Value>) -> Result<Self, String> {
        let mut c = row.into_iter();
        let mut next = || {
            c.next()
                .ok_or_else(|| "fewer columns than a reservation's".to_string())
        };
        Ok(RawRow {
            id: FromValue::from_value(next()?)?,
            owner: FromValue::from_value(next()?)?,
            public_ip: FromValue::from_value(next()?)?,
            first_port: FromValue::from_value(next()?)?,
            last_port: FromValue::from_value(next()?)?,
            protocols: FromValue::from_value(next()?)?,
            target_ip: FromValue::from_value(next()?)?,
            target_first_port: FromValue::from_value(next()?)?,
            created_ms: FromValue::from_value(next()?)?,
            ttl_ms: FromValue::from_value(next()?)?,
            expires_ms: FromValue::from_value(next()?)?,
            enabled: FromValue::from_value(next()?)?,
            note: FromValue::from_value(next()?)?,
        })
    }
}

/// A reservation row followed by one more column (when it expired).
struct RawRowAnd<T>(RawRow, T);

impl<T: FromValue> FromRow for RawRowAnd<T> {
    fn from_row(mut row: Vec<Value>) -> Result<Self, String> {
        let last = row.pop().ok_or("no columns")?;
        Ok(RawRowAnd(RawRow::from_row(row)?, T::from_value(last)?))
    }
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

impl<C: Conn> Store for SqlStore<C> {
    fn insert(&mut self, new: &NewRecord) -> Result<Record, StoreError> {
        self.insert_with(new, Extras::default())
    }

    fn insert_all(&mut self, new: &[NewRecord]) -> Result<Vec<Record>, StoreError> {
        // A bulk load, checked by its caller: no overlap query per record.
        self.transaction(true, |conn| {
            new.iter().map(|n| insert_one(conn, n)).collect()
        })
    }

    fn get(&self, id: u64) -> Result<Option<Record>, StoreError> {
        Ok(self
            .query("reading a reservation", "WHERE id = ?1", &params![id])?
            .pop())
    }

    fn list_filtered(&self, filter: &ListFilter) -> Result<Vec<Record>, StoreError> {
        self.query(
            "listing reservations",
            "WHERE (CAST(?1 AS TEXT) IS NULL OR owner = ?1) \
             AND (CAST(?2 AS BIGINT) IS NULL OR (first_port <= ?2 AND last_port >= ?2)) \
             AND (CAST(?3 AS TEXT) IS NULL OR target_ip = ?3) \
             AND (CAST(?4 AS BIGINT) IS NULL OR (expires_ms IS NOT NULL AND expires_ms <= ?4)) \
             AND id > ?5 ORDER BY id LIMIT ?6",
            &params![
                filter.owner.as_deref(),
                filter.public_port,
                filter.target.map(|t| t.to_string()),
                filter.expiring_before_ms,
                filter.after.unwrap_or(0),
                filter.limit.unwrap_or(u64::MAX)
            ],
        )
    }

    fn list(&self, owner: Option<&str>) -> Result<Vec<Record>, StoreError> {
        match owner {
            Some(owner) => self.query(
                "listing reservations",
                "WHERE owner = ?1 ORDER BY id",
                &params![owner],
            ),
            None => self.query("listing reservations", "ORDER BY id", &[]),
        }
    }

    fn delete(&mut self, id: u64) -> Result<bool, StoreError> {
        self.delete_recording(id, None)
    }

    fn set_enabled(&mut self, id: u64, enabled: bool) -> Result<bool, StoreError> {
        self.update(
            "enabling or disabling a reservation",
            "UPDATE reservations SET enabled = ?2 WHERE id = ?1",
            &params![id, enabled],
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
        self.transaction(false, |conn| {
            let held_by: Option<(String,)> = select(
                conn,
                what,
                "SELECT owner FROM reservations WHERE id = ?1",
                &params![id],
            )?
            .pop();
            if held_by.is_some_and(|(held_by,)| held_by != owner) {
                conn.execute(what, RECORD_HOLDER, &params![id, at_ms, "owner-changed"])?;
                conn.execute(what, HELD_SINCE, &params![id, at_ms])?;
            }
            let n = conn.execute(
                what,
                "UPDATE reservations SET owner = ?2, target_ip = ?3, target_first_port = ?4, \
                 note = ?5 WHERE id = ?1",
                &params![
                    id,
                    owner,
                    reservation.target_addr.to_string(),
                    reservation.target_first_port,
                    note
                ],
            )?;
            Ok(n > 0)
        })
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
            &params![id, ttl_ms, expires_ms],
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
            &format!(
                "WHERE {} AND first_port BETWEEN ?2 AND ?3 AND last_port >= ?4 \
                 AND (protocols & ?5) != 0 ORDER BY first_port LIMIT 1",
                self.public_addr_where(addr)
            ),
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
             AND (protocols & ?5) != 0 AND (CAST(?6 AS BIGINT) IS NULL OR id != ?6) \
             ORDER BY target_first_port LIMIT 1",
            addr,
            ports,
            protocols,
            Some(except.into()),
        )
    }

    fn used_public_ports(
        &self,
        addr: Ipv4Addr,
        protocols: Protocols,
    ) -> Result<Vec<PortRange>, StoreError> {
        let rows: Vec<(u16, u16)> = self.select(
            "reading used ports",
            &format!(
                "SELECT first_port, last_port FROM reservations \
                 WHERE {} AND (protocols & ?2) != 0",
                self.public_addr_where(addr)
            ),
            &params![addr.to_string(), protocols.mask()],
        )?;
        Ok(rows
            .into_iter()
            .map(|(first, last)| PortRange { first, last })
            .collect())
    }

    fn owner_ports(&self, owner: &str) -> Result<u64, StoreError> {
        // PostgreSQL's SUM of integers is a NUMERIC: cast back.
        let n: Option<i64> = self.scalar(
            "counting an owner's ports",
            "SELECT CAST(COALESCE(SUM(last_port - first_port + 1), 0) AS BIGINT) \
             FROM reservations WHERE owner = ?1",
            &params![owner],
        )?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    fn count(&self) -> Result<u64, StoreError> {
        let n: Option<i64> = self.scalar(
            "counting reservations",
            "SELECT COUNT(*) FROM reservations",
            &[],
        )?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    fn expired(&self, now_ms: u64) -> Result<Vec<Record>, StoreError> {
        self.query(
            "finding expired reservations",
            "WHERE expires_ms IS NOT NULL AND expires_ms <= ?1 ORDER BY expires_ms",
            &params![now_ms],
        )
    }

    fn next_expiry(&self) -> Result<Option<u64>, StoreError> {
        let at: Option<Option<i64>> = self.scalar(
            "finding the next expiry",
            "SELECT MIN(expires_ms) FROM reservations WHERE expires_ms IS NOT NULL",
            &[],
        )?;
        Ok(at.flatten().map(|t| t.max(0) as u64))
    }

    fn expire(&mut self, id: u64, at_ms: u64) -> Result<bool, StoreError> {
        // Under the fleet's lock: agents expiring the same fleet-wide record at once move it
        // once (the second finds nothing left to move).
        self.transaction(true, |conn| {
            let moved = conn.execute(
                "keeping an expired reservation",
                &format!(
                    "INSERT INTO expired ({COLUMNS}, expired_ms) \
                     SELECT {COLUMNS}, CAST(?2 AS BIGINT) FROM reservations WHERE id = ?1"
                ),
                &params![id, at_ms],
            )?;
            let what = "deleting an expired reservation";
            conn.execute(what, RECORD_HOLDER, &params![id, at_ms, "expired"])?;
            for table in ["reservations", "port_mappings", "held_since"] {
                conn.execute(
                    what,
                    &format!("DELETE FROM {table} WHERE id = ?1"),
                    &params![id],
                )?;
            }
            Ok(moved > 0)
        })
    }

    fn history(&self, owner: Option<&str>) -> Result<Vec<(Record, u64)>, StoreError> {
        let rows: Vec<RawRowAnd<i64>> = self.select(
            "reading the expired history",
            &format!(
                "SELECT {COLUMNS}, expired_ms FROM expired \
                 WHERE CAST(?1 AS TEXT) IS NULL OR owner = ?1 \
                 ORDER BY expired_ms DESC, id DESC"
            ),
            &params![owner],
        )?;
        rows.into_iter()
            .map(|RawRowAnd(raw, at)| Ok((raw.into_record()?, at.max(0) as u64)))
            .collect()
    }

    fn restore(
        &mut self,
        id: u64,
        ttl_ms: Option<u64>,
        expires_ms: Option<u64>,
        at_ms: u64,
    ) -> Result<Option<Record>, StoreError> {
        let what = "restoring an expired reservation";
        let moved = self.transaction(true, |conn| {
            let expired: Vec<RawRowAnd<i64>> = select(
                conn,
                what,
                &format!("SELECT {COLUMNS}, expired_ms FROM expired WHERE id = ?1"),
                &params![id],
            )?;
            let Some(RawRowAnd(raw, _)) = expired.into_iter().next() else {
                return Ok(false);
            };
            self.check_free(&raw.into_record()?.reservation)?;
            conn.execute(
                what,
                &format!(
                    "INSERT INTO reservations ({COLUMNS}) \
                     SELECT {COLUMNS} FROM expired WHERE id = ?1"
                ),
                &params![id],
            )?;
            conn.execute(
                what,
                "UPDATE reservations SET ttl_ms = ?2, expires_ms = ?3 WHERE id = ?1",
                &params![id, ttl_ms, expires_ms],
            )?;
            conn.execute(what, "DELETE FROM expired WHERE id = ?1", &params![id])?;
            conn.execute(what, HELD_SINCE, &params![id, at_ms])?;
            Ok(true)
        })?;
        if moved { self.get(id) } else { Ok(None) }
    }

    fn purge_history(&mut self, before_ms: u64) -> Result<u64, StoreError> {
        let what = "purging the expired history";
        self.transaction(false, |conn| {
            let purged = conn.execute(
                what,
                "DELETE FROM expired WHERE expired_ms < ?1",
                &params![before_ms],
            )?;
            for table in ["traffic", "triggers", "limits"] {
                conn.execute(
                    what,
                    &format!(
                        "DELETE FROM {table} WHERE id NOT IN \
                         (SELECT id FROM reservations UNION SELECT id FROM expired)"
                    ),
                    &[],
                )?;
            }
            Ok(purged)
        })
    }

    fn add_traffic(&mut self, id: u64, t: Traffic) -> Result<(), StoreError> {
        if t == Traffic::default() {
            return Ok(());
        }
        self.update(
            "recording a reservation's traffic",
            "INSERT INTO traffic (id, in_packets, in_bytes, out_packets, out_bytes) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO UPDATE SET \
             in_packets = traffic.in_packets + excluded.in_packets, \
             in_bytes = traffic.in_bytes + excluded.in_bytes, \
             out_packets = traffic.out_packets + excluded.out_packets, \
             out_bytes = traffic.out_bytes + excluded.out_bytes",
            &params![id, t.in_packets, t.in_bytes, t.out_packets, t.out_bytes],
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

    fn reachable(&self) -> Result<(), StoreError> {
        self.conn.reachable()
    }

    fn insert_with(&mut self, new: &NewRecord, extras: Extras<'_>) -> Result<Record, StoreError> {
        self.transaction(true, |conn| {
            self.check_free(&new.reservation)?;
            let record = insert_one(conn, new)?;
            let id = record.id;
            if let Some(mapping) = extras.mapping {
                conn.execute(
                    "inserting a port mapping",
                    "INSERT INTO port_mappings (id, via, client_ip, protocols, internal_port, \
                     nonce) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    &params![
                        id,
                        mapping.via.as_str(),
                        mapping.client.to_string(),
                        mapping.protocol.mask(),
                        mapping.internal_port,
                        mapping.nonce.map(|n| n.to_vec()),
                    ],
                )?;
            }
            if let Some(trigger) = extras.trigger {
                conn.execute(
                    "inserting a trigger rule",
                    "INSERT INTO triggers (id, gate, protocols, first_port, last_port, \
                     idle_timeout_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    &params![
                        id,
                        trigger.gate,
                        trigger.on.protocols.mask(),
                        trigger.on.ports.first,
                        trigger.on.ports.last,
                        trigger.idle_timeout_ms,
                    ],
                )?;
            }
            if let Some(l) = extras.limits {
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
                conn.execute(
                    "inserting a reservation's limits",
                    "INSERT INTO limits (id, slot, packets_per_second, bits_per_second, \
                     syns_per_second, source_list, networks) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    &params![
                        id,
                        l.slot,
                        l.limits.packets_per_second,
                        l.limits.bits_per_second,
                        l.limits.syns_per_second,
                        list,
                        networks,
                    ],
                )?;
            }
            Ok(record)
        })
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
                &params![client.to_string(), protocol.mask(), internal_port],
            )?
            .pop())
    }

    fn client_mappings(&self, client: Ipv4Addr) -> Result<Vec<(u64, Mapping)>, StoreError> {
        self.mappings_where(
            "WHERE client_ip = ?1 ORDER BY id",
            &params![client.to_string()],
        )
    }

    fn forget_mapping(&mut self, id: u64) -> Result<bool, StoreError> {
        self.update(
            "forgetting a port mapping",
            "DELETE FROM port_mappings WHERE id = ?1",
            &params![id],
        )
    }

    fn set_mapping_nonce(&mut self, id: u64, nonce: [u8; 12]) -> Result<bool, StoreError> {
        self.update(
            "giving a port mapping its nonce",
            "UPDATE port_mappings SET nonce = ?2 WHERE id = ?1",
            &params![id, nonce.to_vec()],
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
            let since: Option<i64> = self.scalar(
                "reading when a holding began",
                "SELECT since_ms FROM held_since WHERE id = ?1",
                &params![r.id],
            )?;
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
        self.conn.execute(
            "purging past holders",
            "DELETE FROM holders WHERE until_ms < ?1",
            &params![before_ms],
        )
    }

    fn add_drain(&mut self, drain: &NewDrain) -> Result<u64, StoreError> {
        let id: Option<i64> = self.scalar(
            "scheduling a drain",
            "INSERT INTO drains (at_ms, owner, action, created_ms) VALUES (?1, ?2, ?3, ?4) \
             RETURNING id",
            &params![
                drain.at_ms,
                drain.owner.as_deref(),
                if drain.release { "release" } else { "disable" },
                drain.created_ms
            ],
        )?;
        Ok(id.unwrap_or(0) as u64)
    }

    fn drains(&self) -> Result<Vec<Drain>, StoreError> {
        type Row = (i64, i64, Option<String>, String, i64, Option<i64>);
        let rows: Vec<Row> = self.select(
            "reading the drains",
            "SELECT id, at_ms, owner, action, created_ms, done_ms FROM drains ORDER BY id",
            &[],
        )?;
        Ok(rows
            .into_iter()
            .map(|(id, at, owner, action, created, done)| Drain {
                id: id as u64,
                drain: NewDrain {
                    at_ms: at.max(0) as u64,
                    owner,
                    release: action == "release",
                    created_ms: created.max(0) as u64,
                },
                done_ms: done.map(|t| t.max(0) as u64),
            })
            .collect())
    }

    fn cancel_drain(&mut self, id: u64) -> Result<bool, StoreError> {
        self.update(
            "cancelling a drain",
            "DELETE FROM drains WHERE id = ?1 AND done_ms IS NULL",
            &params![id],
        )
    }

    fn drain_done(&mut self, id: u64, at_ms: u64) -> Result<bool, StoreError> {
        self.update(
            "marking a drain done",
            "UPDATE drains SET done_ms = ?2 WHERE id = ?1",
            &params![id, at_ms],
        )
    }

    fn trigger(&self, id: u64) -> Result<Option<Trigger>, StoreError> {
        Ok(self
            .triggers_where("WHERE id = ?1", &params![id])?
            .remove(&id))
    }

    fn triggers(&self) -> Result<HashMap<u64, Trigger>, StoreError> {
        self.triggers_where("WHERE id IN (SELECT id FROM reservations)", &[])
    }

    fn set_trigger_gate(&mut self, id: u64, gate: u16) -> Result<bool, StoreError> {
        self.update(
            "giving a trigger rule its gate",
            "UPDATE triggers SET gate = ?2 WHERE id = ?1",
            &params![id, gate],
        )
    }

    fn limits(&self, id: u64) -> Result<Option<SlotLimits>, StoreError> {
        Ok(self
            .limits_where("WHERE id = ?1", &params![id])?
            .remove(&id))
    }

    fn all_limits(&self) -> Result<HashMap<u64, SlotLimits>, StoreError> {
        self.limits_where("WHERE id IN (SELECT id FROM reservations)", &[])
    }

    fn set_limit_slot(&mut self, id: u64, slot: u16) -> Result<bool, StoreError> {
        self.update(
            "giving a reservation's limits their slot",
            "UPDATE limits SET slot = ?2 WHERE id = ?1",
            &params![id, slot],
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
                 ON CONFLICT (address) DO UPDATE SET owner = excluded.owner",
                &params![address.to_string(), owner],
            ),
            None => self.update(
                "removing a tunnel owner",
                "DELETE FROM tunnel_owners WHERE address = ?1",
                &params![address.to_string()],
            ),
        }
        .map(drop)
    }

    fn tunnel_owners(&self) -> Result<Vec<(Ipv4Addr, String)>, StoreError> {
        self.tunnel_owners_where(None)
    }

    fn mapping_epoch_ms(&mut self, now_ms: u64) -> Result<u64, StoreError> {
        const READ: &str = "SELECT value FROM settings WHERE key = 'mapping_epoch_ms'";
        if let Some(at) = self.scalar::<i64>("reading the mapping epoch", READ, &[])? {
            return Ok(at as u64);
        }
        if self.read_only.is_some() {
            return Ok(now_ms);
        }
        self.conn.execute(
            "recording the mapping epoch",
            "INSERT INTO settings (key, value) VALUES ('mapping_epoch_ms', ?1) \
             ON CONFLICT (key) DO NOTHING",
            &params![now_ms],
        )?;
        Ok(self
            .scalar::<i64>("reading the mapping epoch", READ, &[])?
            .map_or(now_ms, |at| at as u64))
    }

    fn fleet_version(&self) -> Result<Option<i64>, StoreError> {
        if !self.conn.shared() {
            return Ok(None);
        }
        self.scalar(
            "reading the fleet's change counter",
            "SELECT version FROM pf_version",
            &[],
        )
    }

    fn register_agent(&mut self, agent: &Agent) -> Result<Vec<Agent>, StoreError> {
        if !self.conn.shared() {
            return Ok(Vec::new());
        }
        let ips = agent
            .public_ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        self.conn.execute(
            "recording this agent",
            "INSERT INTO agents (name, public_ips, seen_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (name) DO UPDATE SET public_ips = excluded.public_ips, \
             seen_ms = excluded.seen_ms",
            &params![&agent.name, ips, agent.seen_ms],
        )?;
        let rows: Vec<(String, String, i64)> = self.select(
            "reading the fleet's agents",
            "SELECT name, public_ips, seen_ms FROM agents ORDER BY name",
            &[],
        )?;
        rows.into_iter()
            .map(|(name, ips, seen)| {
                let public_ips = ips
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|ip| {
                        ip.parse().map_err(|_| StoreError::BadRow {
                            id: 0,
                            detail: format!("agent {name}'s public IP '{ip}'"),
                        })
                    })
                    .collect::<Result<_, _>>()?;
                Ok(Agent {
                    name,
                    public_ips,
                    seen_ms: seen.max(0) as u64,
                })
            })
            .collect()
    }
}
