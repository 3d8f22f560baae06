//! Reads beside the engine. Lists, single reservations, the expired history and the status
//! are answered on the API's side, from reader connections of their own on the store (WAL lets
//! them read the last commit while the engine writes) and from what the engine last
//! published. A list of 20,000 reservations then holds up no change or expiry, and polling the
//! status never waits behind a change. The engine answers the same requests the same way
//! (host tests, and the functions here are the ones it uses).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};

use super::{
    engine::{ApiError, Request, expired_json, record_json},
    store::{ListFilter, SqliteStore, Store},
};
use crate::{
    api::types::AttachmentView,
    kernel::{attach, bpffs::PinDir},
};

/// Reader connections kept open between requests.
const POOL: usize = 4;

/// A list of the records `filter` asks for.
pub fn list_json(store: &dyn Store, filter: &ListFilter) -> Result<Value, ApiError> {
    Ok(Value::Array(
        store
            .list_filtered(filter)?
            .iter()
            .map(record_json)
            .collect(),
    ))
}

pub struct Reads {
    database: PathBuf,
    dir: PinDir,
    pool: Mutex<Vec<SqliteStore>>,
    /// The engine's part of the status, as it last published it.
    pub published: Arc<Mutex<Value>>,
}

impl Reads {
    pub fn new(database: PathBuf, dir: PinDir, published: Arc<Mutex<Value>>) -> Self {
        Self {
            database,
            dir,
            pool: Mutex::new(Vec::new()),
            published,
        }
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&SqliteStore) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let pooled = self.pool.lock().expect("not poisoned").pop();
        let reader = match pooled {
            Some(reader) => reader,
            None => SqliteStore::open_reader(&self.database)?,
        };
        let result = f(&reader);
        let mut pool = self.pool.lock().expect("not poisoned");
        if pool.len() < POOL {
            pool.push(reader);
        }
        result
    }

    /// Whether `request` is one this side answers.
    pub fn answers(request: &Request) -> bool {
        matches!(
            request,
            Request::Get(_) | Request::List(_) | Request::Expired { .. } | Request::Status
        )
    }

    /// Answers a read (blocking: run it off the API's event loop).
    pub fn answer(&self, request: Request) -> Result<Value, ApiError> {
        match request {
            Request::Get(id) => self.with_reader(|store| {
                store
                    .get(id)?
                    .map(|r| record_json(&r))
                    .ok_or_else(|| ApiError::not_found(id))
            }),
            Request::List(filter) => self.with_reader(|store| list_json(store, &filter)),
            Request::Expired { owner } => {
                self.with_reader(|store| expired_json(store, owner.as_deref()))
            }
            Request::Status => {
                let mut status = self.published.lock().expect("not poisoned").clone();
                status["reservations"] = json!(self.with_reader(|store| Ok(store.count()?))?);
                status["attached"] = json!(
                    attach::inspect(&self.dir)
                        .iter()
                        .map(AttachmentView::from)
                        .collect::<Vec<_>>()
                );
                Ok(status)
            }
            other => unreachable!("{other:?} is the engine's"),
        }
    }
}
