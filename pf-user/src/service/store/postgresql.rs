//! The fleet's store: one PostgreSQL database that every `pf serve` of a provider shares.
//!
//! The same queries as SQLite's ([`super::queries`]), on `postgres`'s blocking client: the
//! engine is a plain thread, and each API reader has its own connection. A lost connection is
//! made again on the next use; until then every call fails as [`StoreError::Unavailable`], so
//! a change is refused with a clear error while the kernel maps go on forwarding.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    error::Error,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use postgres::{Client, NoTls, Statement, fallible_iterator::FallibleIterator};
use postgres_types::{IsNull, ToSql, Type, to_sql_checked};

use super::{
    SqlStore, StoreError,
    schema::{SCHEMA, SCHEMA_VERSION},
    sql::{Conn, Value},
};

/// The store on a PostgreSQL database.
pub type PostgresStore = SqlStore<PgConn>;

/// The advisory lock every change that takes public ports holds until it commits, on every
/// agent: a port is checked free and taken with no other agent's change in between.
const RESERVING_LOCK: i64 = 0x7066_0001;
/// The advisory lock held while the schema is made or brought up to date.
const SCHEMA_LOCK: i64 = 0x7066_0002;
/// How long a connection may take to be made, and a packet to be acknowledged, before the
/// database counts as unreachable (a partition must not hang a change for TCP's minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed connection, how long until the next try: doubling from the first to the
/// last, so a server that is down is not hammered and one that is back is found within seconds.
const RECONNECT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(250), Duration::from_secs(4));
/// How long one statement may run before the database cancels it.
const STATEMENT_TIMEOUT: &str = "10s";

/// Where the database is: a `postgres://` URL (shown in messages and logs, so it must not hold
/// the password) and the password, from a file or the environment.
#[derive(Clone)]
pub struct PostgresLocation {
    url: String,
    config: postgres::Config,
}

/// Two locations are the same database when their URLs are (the password aside).
impl PartialEq for PostgresLocation {
    fn eq(&self, other: &Self) -> bool {
        self.url == other.url
    }
}

impl std::fmt::Debug for PostgresLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl PostgresLocation {
    /// `url` is `postgres://USER@HOST:PORT/DATABASE` (or `postgresql://`); a password in it is
    /// refused, since the URL is shown wherever the store is named.
    pub fn parse(url: &str, password: Option<&str>) -> Result<Self, StoreError> {
        let bad = |detail: String| StoreError::Config {
            location: redact(url),
            detail,
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(bad("a PostgreSQL store is a postgres:// URL".into()));
        }
        let mut config: postgres::Config = url.parse().map_err(|e| bad(format!("{e}")))?;
        if config.get_password().is_some() {
            return Err(bad(
                "the URL holds a password: give it in service.store_password_file or the \
                 PF_STORE_PASSWORD environment variable instead"
                    .into(),
            ));
        }
        if config.get_hosts().is_empty() {
            return Err(bad("the URL names no host".into()));
        }
        if config.get_dbname().is_none() {
            return Err(bad("the URL names no database".into()));
        }
        if let Some(password) = password {
            config.password(password);
        }
        // Statements are prepared once per connection, often while a table is small or still
        // filling (a bulk load in one transaction): a plan cached then would scan the whole
        // table for ever after. Planned at each run, they use the indexes. The URL's own
        // options come after, so an admin can still set either.
        let options = format!(
            "-c statement_timeout={STATEMENT_TIMEOUT} -c plan_cache_mode=force_custom_plan {}",
            config.get_options().unwrap_or("")
        );
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_user_timeout(TCP_USER_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .application_name("pf serve")
            .options(options.trim_end());
        Ok(Self {
            url: url.to_string(),
            config,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn connect(&self, what: &'static str) -> Result<Client, StoreError> {
        self.config
            .connect(NoTls)
            .map_err(|e| StoreError::Unavailable {
                what,
                detail: format!("connecting to {}: {}", self.url, error_text(&e)),
            })
    }
}

/// `url` with anything between `://` and `@` past a colon taken out (for messages about a URL
/// that was refused for holding a password).
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// An error's text with its cause (`postgres::Error`'s own text is often just "db error").
fn error_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => match e.source() {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// `statement` with SQLite's `?N` parameters written as PostgreSQL's `$N`.
fn dollar_params(statement: &str) -> String {
    let mut out = String::with_capacity(statement.len());
    let mut chars = statement.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// What only a shared store has: the change counter every agent follows (moved, and a
/// `pf_changes` notification sent, by a trigger on each statement that changes reservations,
/// trigger rules or limits, whoever runs it), and the agents.
const FLEET_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS pf_version (version BIGINT NOT NULL);
INSERT INTO pf_version (version) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM pf_version);
-- Once per transaction: a bulk load's 100,000 statements move the counter once (updating one
-- row again and again in one transaction costs ever more). The new value is seen with the
-- transaction's changes, at its commit, and so is the notification.
CREATE OR REPLACE FUNCTION pf_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('pf.changed_in', true) IS DISTINCT FROM txid_current()::text THEN
        UPDATE pf_version SET version = version + 1;
        PERFORM pg_notify('pf_changes', '');
        PERFORM set_config('pf.changed_in', txid_current()::text, true);
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS pf_changed ON reservations;
CREATE TRIGGER pf_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON reservations
    FOR EACH STATEMENT EXECUTE FUNCTION pf_changed();
DROP TRIGGER IF EXISTS pf_changed ON triggers;
CREATE TRIGGER pf_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON triggers
    FOR EACH STATEMENT EXECUTE FUNCTION pf_changed();
DROP TRIGGER IF EXISTS pf_changed ON limits;
CREATE TRIGGER pf_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON limits
    FOR EACH STATEMENT EXECUTE FUNCTION pf_changed();
-- A fleet-wide request's overlap check looks at every address's ports.
CREATE INDEX IF NOT EXISTS reservations_ports ON reservations (first_port);
-- The fleet's agents (pf serve on each server): name, public IPs, when last seen.
CREATE TABLE IF NOT EXISTS agents (
    name       TEXT   PRIMARY KEY,
    public_ips TEXT   NOT NULL,
    seen_ms    BIGINT NOT NULL
);
";

/// The notification channel a change is announced on (a hint: the counter is the truth).
const CHANGES_CHANNEL: &str = "pf_changes";

/// Listens for the fleet's change notifications on a connection of its own and calls `wake`
/// for each (and after each reconnect, since notifications sent meanwhile are lost), until
/// `wake` returns false. Notifications are only a hint to look now: the agent compares the
/// change counter at every tick anyway, so a lost one delays a change by a second at most.
pub fn watch_changes(
    location: PostgresLocation,
    mut wake: impl FnMut() -> bool + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("pf-store-watch".into())
        .spawn(move || {
            let mut backoff = RECONNECT_BACKOFF.0;
            loop {
                let listening = location
                    .connect("listening for the fleet's changes")
                    .and_then(|mut client| {
                        client
                            .batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))
                            .map_err(|e| StoreError::Unavailable {
                                what: "listening for the fleet's changes",
                                detail: error_text(&e),
                            })?;
                        Ok(client)
                    });
                let mut client = match listening {
                    Ok(client) => client,
                    Err(_) => {
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(RECONNECT_BACKOFF.1);
                        continue;
                    }
                };
                backoff = RECONNECT_BACKOFF.0;
                if !wake() {
                    return;
                }
                loop {
                    let heard = client
                        .notifications()
                        .timeout_iter(Duration::from_secs(1))
                        .next();
                    match heard {
                        Ok(Some(_)) => {
                            if !wake() {
                                return;
                            }
                        }
                        // Quiet for a second: still wanted?
                        Ok(None) if client.is_closed() => break,
                        Ok(None) => {}
                        Err(_) => break,
                    }
                }
            }
        })
}

/// SQLite's schema in PostgreSQL's types: ids from an identity column, integers 64-bit,
/// bytes as BYTEA.
pub(super) fn postgres_schema() -> String {
    SCHEMA
        .replace(
            "INTEGER PRIMARY KEY AUTOINCREMENT",
            "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        )
        .replace("INTEGER", "BIGINT")
        .replace("BLOB", "BYTEA")
}

/// A parameter in the type PostgreSQL inferred for it: integers fit any integer column
/// (checked), or a boolean.
impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                _ => Err(format!("an integer given for a {ty} parameter").into()),
            },
            Value::Text(s) => s.as_str().to_sql(ty, out),
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn value(row: &postgres::Row, i: usize) -> Result<Value, String> {
    let ty = row.columns()[i].type_();
    let got = |r: Result<Option<Value>, postgres::Error>| {
        r.map(|v| v.unwrap_or(Value::Null))
            .map_err(|e| e.to_string())
    };
    match *ty {
        Type::INT8 => got(row.try_get::<_, Option<i64>>(i).map(|v| v.map(Value::Int))),
        Type::INT4 => got(row
            .try_get::<_, Option<i32>>(i)
            .map(|v| v.map(|v| Value::Int(v.into())))),
        Type::INT2 => got(row
            .try_get::<_, Option<i16>>(i)
            .map(|v| v.map(|v| Value::Int(v.into())))),
        Type::BOOL => got(row
            .try_get::<_, Option<bool>>(i)
            .map(|v| v.map(|v| Value::Int(v.into())))),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => got(row
            .try_get::<_, Option<String>>(i)
            .map(|v| v.map(Value::Text))),
        Type::BYTEA => got(row
            .try_get::<_, Option<Vec<u8>>>(i)
            .map(|v| v.map(Value::Blob))),
        _ => Err(format!("column {i} has type {ty}, which pf does not store")),
    }
}

/// A connection to the database, made again after it was lost.
pub struct PgConn {
    location: PostgresLocation,
    /// `None` once the connection was lost: the next call makes another.
    client: RefCell<Option<Client>>,
    /// Statements prepared on the present connection, by their SQLite-style text.
    statements: RefCell<HashMap<String, Statement>>,
    /// After a failed connection: no new try before this, and the back-off after it.
    retry: Cell<Option<(Instant, Duration)>>,
    /// Why the last connection failed, given again until the next try.
    last_failure: RefCell<String>,
}

impl PgConn {
    fn new(location: PostgresLocation, client: Client) -> Self {
        Self {
            location,
            client: RefCell::new(Some(client)),
            statements: RefCell::new(HashMap::new()),
            retry: Cell::new(None),
            last_failure: RefCell::new(String::new()),
        }
    }

    /// A connection made again after the last was lost, unless the back-off says wait.
    fn reconnect(&self, what: &'static str) -> Result<Client, StoreError> {
        if let Some((not_before, _)) = self.retry.get()
            && Instant::now() < not_before
        {
            return Err(StoreError::Unavailable {
                what,
                detail: self.last_failure.borrow().clone(),
            });
        }
        match self.location.connect(what) {
            Ok(client) => {
                self.retry.set(None);
                Ok(client)
            }
            Err(e) => {
                let backoff = self.retry.get().map_or(RECONNECT_BACKOFF.0, |(_, b)| {
                    (b * 2).min(RECONNECT_BACKOFF.1)
                });
                self.retry.set(Some((Instant::now() + backoff, backoff)));
                if let StoreError::Unavailable { detail, .. } = &e {
                    *self.last_failure.borrow_mut() = detail.clone();
                }
                Err(e)
            }
        }
    }

    /// Runs `f` on the connection (made again if it was lost). An error that left the
    /// connection closed makes the store unavailable, and the connection is dropped so that
    /// the next call tries again.
    fn with_client<T>(
        &self,
        what: &'static str,
        f: impl FnOnce(&mut Client, &mut HashMap<String, Statement>) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut slot = self.client.borrow_mut();
        let mut statements = self.statements.borrow_mut();
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = None;
            statements.clear();
            *slot = Some(self.reconnect(what)?);
        }
        let client = slot.as_mut().expect("connected above");
        let result = f(client, &mut statements);
        let closed = client.is_closed();
        result.map_err(|e| {
            let io = e.source().is_some_and(|c| c.is::<std::io::Error>());
            if closed || e.is_closed() || io {
                // No answer from the database (a dropped connection, a timeout): the
                // connection is not trusted again.
                *slot = None;
                statements.clear();
                StoreError::Unavailable {
                    what,
                    detail: format!("{}: {}", self.location.url, error_text(&e)),
                }
            } else {
                StoreError::Postgres { what, source: e }
            }
        })
    }

    fn prepared(
        client: &mut Client,
        statements: &mut HashMap<String, Statement>,
        statement: &str,
    ) -> Result<Statement, postgres::Error> {
        if let Some(prepared) = statements.get(statement) {
            return Ok(prepared.clone());
        }
        let prepared = client.prepare(&dollar_params(statement))?;
        statements.insert(statement.to_string(), prepared.clone());
        Ok(prepared)
    }
}

fn refs(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

impl Conn for PgConn {
    fn execute(
        &self,
        what: &'static str,
        statement: &str,
        params: &[Value],
    ) -> Result<u64, StoreError> {
        self.with_client(what, |client, statements| {
            let prepared = Self::prepared(client, statements, statement)?;
            client.execute(&prepared, &refs(params))
        })
    }

    fn rows(
        &self,
        what: &'static str,
        statement: &str,
        params: &[Value],
    ) -> Result<Vec<Vec<Value>>, StoreError> {
        let rows = self.with_client(what, |client, statements| {
            let prepared = Self::prepared(client, statements, statement)?;
            client.query(&prepared, &refs(params))
        })?;
        rows.iter()
            .map(|row| {
                (0..row.len())
                    .map(|i| value(row, i))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|detail| StoreError::Column { what, detail })
            })
            .collect()
    }

    fn begin(&self, reserving: bool) -> Result<(), StoreError> {
        self.with_client("starting a transaction", |client, _| {
            client.batch_execute("BEGIN")?;
            if reserving {
                client.execute("SELECT pg_advisory_xact_lock($1)", &[&RESERVING_LOCK])?;
            }
            Ok(())
        })
    }

    fn commit(&self) -> Result<(), StoreError> {
        self.with_client("committing", |client, _| client.batch_execute("COMMIT"))
    }

    fn shared(&self) -> bool {
        true
    }

    fn reachable(&self) -> Result<(), StoreError> {
        self.with_client("reaching the database", |_, _| Ok(()))
    }

    fn rollback(&self) {
        let mut slot = self.client.borrow_mut();
        if let Some(client) = slot.as_mut().filter(|c| !c.is_closed())
            && let Err(e) = client.batch_execute("ROLLBACK")
        {
            tracing::warn!("reservation store: undoing a failed change: {e}");
            *slot = None;
        }
    }
}

impl PostgresStore {
    /// Connects to the database and makes or brings up to date pf's tables in it (under a
    /// lock, so agents starting together do it once).
    pub fn open(location: &PostgresLocation) -> Result<Self, StoreError> {
        let mut client = location.connect("opening the store")?;
        let what = "creating the schema";
        let failed = |e: postgres::Error| StoreError::Postgres { what, source: e };
        let mut tx = client.transaction().map_err(failed)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .map_err(failed)?;
        let found = schema_version(&mut tx).map_err(failed)?;
        if let Some(found) = found.filter(|v| *v > SCHEMA_VERSION) {
            return Err(StoreError::NewerSchema {
                path: location.url.clone(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        if found != Some(SCHEMA_VERSION) {
            tx.batch_execute(&postgres_schema()).map_err(failed)?;
            tx.batch_execute(FLEET_SCHEMA).map_err(failed)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS pf_schema (version BIGINT NOT NULL); \
                 DELETE FROM pf_schema;",
            )
            .map_err(failed)?;
            tx.execute(
                "INSERT INTO pf_schema (version) VALUES ($1)",
                &[&SCHEMA_VERSION],
            )
            .map_err(failed)?;
        }
        tx.commit().map_err(failed)?;
        Ok(Self::new(PgConn::new(location.clone(), client), None))
    }

    /// A second connection, for reads beside the engine's changes.
    pub fn open_reader(location: &PostgresLocation) -> Result<Self, StoreError> {
        let client = location.connect("opening the store for reading")?;
        Ok(Self::new(
            PgConn::new(location.clone(), client),
            Some("a reader".into()),
        ))
    }

    /// Whether the database holds no pf tables yet.
    pub fn is_new(location: &PostgresLocation) -> Result<bool, StoreError> {
        let mut client = location.connect("opening the store")?;
        schema_version(&mut client)
            .map(|v| v.is_none())
            .map_err(|e| StoreError::Postgres {
                what: "reading the schema version",
                source: e,
            })
    }
}

/// The schema version the database records, if it has pf's tables.
fn schema_version(
    client: &mut impl postgres::GenericClient,
) -> Result<Option<i64>, postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('pf_schema') IS NOT NULL", &[])?
        .get(0);
    if !exists {
        return Ok(None);
    }
    Ok(client
        .query_opt("SELECT version FROM pf_schema", &[])?
        .map(|r| r.get(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_and_types_are_written_as_postgres_expects() {
        assert_eq!(
            dollar_params("WHERE a = ?1 AND b IN (?2, ?10) AND c = '?'"),
            "WHERE a = $1 AND b IN ($2, $10) AND c = '?'"
        );
        let schema = postgres_schema();
        assert!(!schema.contains("INTEGER"), "{schema}");
        assert!(!schema.contains("AUTOINCREMENT"));
        assert!(!schema.contains("BLOB"));
        assert!(schema.contains("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"));
    }

    #[test]
    fn a_location_names_its_database_and_never_holds_a_password() {
        let ok =
            PostgresLocation::parse("postgres://pf@127.0.0.1:5432/pf", Some("s3cret")).unwrap();
        assert_eq!(ok.url(), "postgres://pf@127.0.0.1:5432/pf");
        assert!(!format!("{ok:?}").contains("s3cret"));
        for (url, why) in [
            ("postgres://pf:s3cret@db/pf", "holds a password"),
            ("mysql://pf@db/pf", "postgres:// URL"),
            ("postgres://pf@db", "no database"),
            ("postgres://pf@db:notaport/pf", "invalid"),
        ] {
            let err = PostgresLocation::parse(url, None).unwrap_err().to_string();
            assert!(err.contains(why), "{url}: {err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }
}
