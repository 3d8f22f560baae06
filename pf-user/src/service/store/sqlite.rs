//! The embedded store: one SQLite file in WAL mode, synchronous=FULL, so a reservation the
//! service reported as made survives a crash or a power cut.

use std::path::Path;

use rusqlite::{
    Connection,
    types::{ToSqlOutput, ValueRef},
};

use super::{
    SqlStore, StoreError,
    schema::{SCHEMA, SCHEMA_VERSION},
    sql::{Conn, Value},
};

/// The store on one SQLite file.
pub type SqliteStore = SqlStore<SqliteConn>;

/// A connection to the store's file.
pub struct SqliteConn(pub(super) Connection);

fn sql(what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { what, source }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        // No column of pf's holds a real; one hand-written there is read as its integer part.
        ValueRef::Real(f) => Value::Int(f as i64),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

impl Conn for SqliteConn {
    fn execute(
        &self,
        what: &'static str,
        statement: &str,
        params: &[Value],
    ) -> Result<u64, StoreError> {
        self.0
            .prepare_cached(statement)
            .and_then(|mut s| s.execute(rusqlite::params_from_iter(params)))
            .map(|n| n as u64)
            .map_err(sql(what))
    }

    fn rows(
        &self,
        what: &'static str,
        statement: &str,
        params: &[Value],
    ) -> Result<Vec<Vec<Value>>, StoreError> {
        let mut stmt = self.0.prepare_cached(statement).map_err(sql(what))?;
        let columns = stmt.column_count();
        stmt.query_map(rusqlite::params_from_iter(params), |row| {
            (0..columns)
                .map(|i| row.get_ref(i).map(value))
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .and_then(|rows| rows.collect())
        .map_err(sql(what))
    }

    fn begin(&self, _reserving: bool) -> Result<(), StoreError> {
        // IMMEDIATE: the write lock is taken now, so a change never fails half way for want
        // of it (one writer, the engine; another process holding it is waited for).
        self.0
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(sql("starting a transaction"))
    }

    fn commit(&self) -> Result<(), StoreError> {
        self.0.execute_batch("COMMIT").map_err(sql("committing"))
    }

    fn rollback(&self) {
        if let Err(e) = self.0.execute_batch("ROLLBACK") {
            tracing::warn!("reservation store: undoing a failed change: {e}");
        }
    }
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
        Ok(Self::new(SqliteConn(conn), Some(why)))
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
        Ok(Self::new(SqliteConn(conn), Some("a reader".into())))
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
            return Ok(Self::new(
                SqliteConn(conn),
                Some("the file or its filesystem cannot be written".into()),
            ));
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
        Ok(Self::new(SqliteConn(conn), None))
    }

    /// Whether the file holds no reservations table yet (new, or zero bytes).
    pub fn is_new(path: &Path) -> bool {
        std::fs::metadata(path).map_or(true, |m| m.len() == 0)
    }
}
