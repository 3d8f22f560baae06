//! What pf asks of a SQL database, small enough that SQLite and PostgreSQL both give it: run a
//! statement, read its rows, and bracket a change in a transaction. Every query of the store
//! is written once, against [`Conn`], in the SQL both speak (`?N` parameters, which the
//! PostgreSQL side turns into `$N`), so the two backends cannot drift apart.

use super::StoreError;

/// One SQL value as pf stores them: integers (ports, times, flags), text (addresses, owners)
/// and bytes (a PCP nonce).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

/// Times and counts past `i64::MAX` (never met in practice) are stored as `i64::MAX`.
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

macro_rules! int_value {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::Int(i64::from(v))
            }
        }
    )*};
}
int_value!(u8, u16, u32, i32, bool);

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Blob(v)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// A statement's parameters: `params![a, b]` is `[Value::from(a), Value::from(b)]`.
macro_rules! params {
    ($($v:expr),* $(,)?) => { [$($crate::service::store::sql::Value::from($v)),*] };
}
pub(crate) use params;

/// A column read back into a Rust value; the error says what was found instead.
pub trait FromValue: Sized {
    fn from_value(v: Value) -> Result<Self, String>;
}

impl FromValue for i64 {
    fn from_value(v: Value) -> Result<Self, String> {
        match v {
            Value::Int(i) => Ok(i),
            other => Err(format!("an integer, found {other:?}")),
        }
    }
}

macro_rules! narrow_int {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: Value) -> Result<Self, String> {
                let i = i64::from_value(v)?;
                <$t>::try_from(i).map_err(|_| format!("{i} out of range for {}", stringify!($t)))
            }
        }
    )*};
}
narrow_int!(u8, u16);

impl FromValue for bool {
    fn from_value(v: Value) -> Result<Self, String> {
        Ok(i64::from_value(v)? != 0)
    }
}

impl FromValue for String {
    fn from_value(v: Value) -> Result<Self, String> {
        match v {
            Value::Text(s) => Ok(s),
            other => Err(format!("text, found {other:?}")),
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: Value) -> Result<Self, String> {
        match v {
            Value::Blob(b) => Ok(b),
            other => Err(format!("bytes, found {other:?}")),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: Value) -> Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// A row read back into a Rust value (a tuple of its columns, in order).
pub trait FromRow: Sized {
    fn from_row(row: Vec<Value>) -> Result<Self, String>;
}

macro_rules! tuple_row {
    ($($t:ident),+) => {
        impl<$($t: FromValue),+> FromRow for ($($t,)+) {
            fn from_row(row: Vec<Value>) -> Result<Self, String> {
                let n = row.len();
                let mut columns = row.into_iter().enumerate();
                let tuple = ($({
                    let (i, v) = columns
                        .next()
                        .ok_or_else(|| format!("{n} columns, fewer than asked for"))?;
                    $t::from_value(v).map_err(|e| format!("column {i}: expected {e}"))?
                },)+);
                Ok(tuple)
            }
        }
    };
}
tuple_row!(A);
tuple_row!(A, B);
tuple_row!(A, B, C);
tuple_row!(A, B, C, D);
tuple_row!(A, B, C, D, E);
tuple_row!(A, B, C, D, E, F);
tuple_row!(A, B, C, D, E, F, G);
tuple_row!(A, B, C, D, E, F, G, H);

/// A connection to the database: what [`super::SqlStore`] runs its statements on. Methods
/// take `&self` so that reads need no exclusive borrow (a connection is used by one thread at
/// a time; each backend keeps its own statement cache).
pub trait Conn: Send {
    /// Runs `statement`; how many rows it changed.
    fn execute(
        &self,
        what: &'static str,
        statement: &str,
        params: &[Value],
    ) -> Result<u64, StoreError>;
    /// Every row `statement` returns, each as its columns' values.
    fn rows(
        &self,
        what: &'static str,
        statement: &str,
        params: &[Value],
    ) -> Result<Vec<Vec<Value>>, StoreError>;
    /// Starts a transaction for a change. `reserving`: one that checks public ports and then
    /// takes them, which must not interleave with another such change anywhere (on
    /// PostgreSQL, another agent's).
    fn begin(&self, reserving: bool) -> Result<(), StoreError>;
    fn commit(&self) -> Result<(), StoreError>;
    /// Undoes the transaction; after an error, so its own failure is only logged.
    fn rollback(&self);
    /// Whether the database is shared by a fleet (it has the change counter and the agents).
    fn shared(&self) -> bool {
        false
    }
    /// Whether the database can be reached (a file always can).
    fn reachable(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
