//! Reads beside the engine. Lists, single reservations, the expired history and the status
//! are answered on the API's side, from reader connections of their own on the store (WAL lets
//! them read the last commit while the engine writes) and from what the engine last
//! published. A list of 20,000 reservations then holds up no change or expiry, and polling the
//! status never waits behind a change. The engine answers the same requests the same way
//! (host tests, and the functions here are the ones it uses).

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use super::{
    engine::{
        ApiError, Request, expired_json, record_view, rfc3339, traffic_rows, trigger::trigger_view,
    },
    metrics::{self, ServiceMetrics},
    store::{ListFilter, Record, Store, StoreLocation},
};
use crate::{
    api::types::{AttachmentView, HolderView, LimitsView, WhoView},
    domain::spec::PublicSpec,
    kernel::{
        attach::{self, Attachment},
        bpffs::PinDir,
        limit::{DropCounters, Drops},
        state::State,
        trigger::{GateState, Gates},
    },
};

/// Reader connections kept open between requests.
const POOL: usize = 4;

/// `GET /v1/status`: the engine's published part, the store's count, the interfaces as the
/// kernel has them, and the port-mapping server's counts as they are now (it counts without
/// the engine, whose part may be a second old).
pub fn status_json(
    mut published: Value,
    reservations: u64,
    attached: &[Attachment],
    metrics: &ServiceMetrics,
) -> Value {
    published["reservations"] = json!(reservations);
    if !published["port_mapping"].is_null() {
        published["port_mapping"] = metrics.port_mapping.json();
    }
    published["attached"] = json!(
        attached
            .iter()
            .map(AttachmentView::from)
            .collect::<Vec<_>>()
    );
    published
}

/// Reads a trigger gate as the kernel has it (`None`: it could not be read).
pub type GateReader<'a> = &'a dyn Fn(u16) -> Option<GateState>;

/// What the kernel says of the records a list shows: their trigger gates and their limits'
/// drops (`None`: not read).
#[derive(Clone, Copy)]
pub struct KernelReader<'a> {
    pub gate: GateReader<'a>,
    pub drops: &'a dyn Fn(u16) -> Option<Drops>,
}

/// Records as the API shows them, each trigger rule's with its gate as `gate` reads it.
pub fn records_json(
    store: &dyn Store,
    records: &[Record],
    kernel: KernelReader<'_>,
    now_ms: u64,
) -> Result<Vec<Value>, ApiError> {
    let (triggers, limits) = if records.is_empty() {
        Default::default()
    } else {
        (store.triggers()?, store.all_limits()?)
    };
    Ok(records
        .iter()
        .map(|r| {
            let mut view = record_view(r);
            view.trigger = triggers.get(&r.id).map(|t| {
                trigger_view(
                    t,
                    r.enabled.then(|| (kernel.gate)(t.gate)).flatten(),
                    now_ms,
                )
            });
            view.limits = limits.get(&r.id).map(|l| {
                LimitsView::new(
                    &l.limits,
                    r.enabled.then(|| (kernel.drops)(l.slot)).flatten(),
                )
            });
            serde_json::to_value(view).expect("plain struct")
        })
        .collect())
}

/// A list of the records `filter` asks for.
pub fn list_json(
    store: &dyn Store,
    filter: &ListFilter,
    kernel: KernelReader<'_>,
    now_ms: u64,
) -> Result<Value, ApiError> {
    Ok(Value::Array(records_json(
        store,
        &store.list_filtered(filter)?,
        kernel,
        now_ms,
    )?))
}

/// `GET /v1/who`: who held `public` (one port, one protocol) at `at_ms`, from the store's
/// records of reservations and past holders.
pub fn who_json(store: &dyn Store, public: &PublicSpec, at_ms: u64) -> Result<Value, ApiError> {
    let holders = store.who(public.addr, public.ports.first, public.protocols, at_ms)?;
    let view = WhoView {
        public: public.to_string(),
        at: rfc3339(at_ms),
        holders: holders
            .into_iter()
            .map(|h| HolderView {
                id: h.id,
                owner: h.owner,
                public: h.public.to_string(),
                from: rfc3339(h.from_ms),
                until: h.until_ms.map(rfc3339),
                ended: h.ended,
            })
            .collect(),
    };
    Ok(serde_json::to_value(view).expect("plain struct"))
}

/// The kernel's gates and drop counters, read without pf's lock (a list never waits for a
/// change), where the maps exist.
pub struct KernelReads {
    gates: Option<Gates>,
    drops: Option<DropCounters>,
}

impl KernelReads {
    pub fn open(dir: &PinDir) -> Self {
        Self {
            gates: Gates::open(dir).ok().flatten(),
            drops: DropCounters::open(dir).ok().flatten(),
        }
    }

    /// Runs `f` with a reader of these.
    pub fn read<R>(&self, f: impl FnOnce(KernelReader<'_>) -> R) -> R {
        let gate = |g: u16| self.gates.as_ref().and_then(|x| x.get(g).ok());
        let drops = |slot: u16| self.drops.as_ref().and_then(|x| x.get(slot).ok());
        f(KernelReader {
            gate: &gate,
            drops: &drops,
        })
    }
}

pub struct Reads {
    store: StoreLocation,
    dir: PinDir,
    pool: Mutex<Vec<Box<dyn Store>>>,
    /// The engine's part of the status, as it last published it.
    pub published: Arc<Mutex<Value>>,
    /// The engine's own counters (refusals, expiries, change durations), shared.
    service_metrics: ServiceMetrics,
}

impl Reads {
    pub fn new(
        store: StoreLocation,
        dir: PinDir,
        published: Arc<Mutex<Value>>,
        service_metrics: ServiceMetrics,
    ) -> Self {
        Self {
            store,
            dir,
            pool: Mutex::new(Vec::new()),
            published,
            service_metrics,
        }
    }

    /// One scrape's exposition text (see [`metrics`]), composed here, off the engine: from a
    /// reader on the store, the maps opened for reading, and what the engine published. A
    /// scrape holds up no change, however many reservations it lists.
    pub fn metrics(&self, per_reservation_limit: usize) -> Result<String, ApiError> {
        let state = State::open_for_read(&self.dir).ok().flatten();
        let counters = state.as_ref().and_then(|s| s.counters().ok());
        let live = state
            .as_ref()
            .and_then(|s| s.traffic_all().ok())
            .unwrap_or_default();
        let drops = state
            .as_ref()
            .and_then(|s| s.limit_drops_all().ok())
            .unwrap_or_default();
        drop(state);
        let reservations = self.with_reader(|store| traffic_rows(store, live, &drops))?;
        let published = self.published.lock().expect("not poisoned").clone();
        let interfaces: Vec<AttachmentView> = attach::inspect(&self.dir)
            .iter()
            .map(AttachmentView::from)
            .collect();
        Ok(metrics::encode_text(
            &metrics::Snapshot {
                counters: counters.as_ref(),
                reservations: &reservations,
                violations: published["policy_violation_count"].as_u64().unwrap_or(0) as usize,
                drifts: published["last_reconcile"]["drifts"]
                    .as_u64()
                    .map(|d| d as usize),
                store_read_only: !published["store_read_only"].is_null(),
                interfaces: &interfaces,
                per_reservation_limit,
            },
            &self.service_metrics,
        ))
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let pooled = self.pool.lock().expect("not poisoned").pop();
        let reader = match pooled {
            Some(reader) => reader,
            None => self.store.open_reader()?,
        };
        let result = f(reader.as_ref());
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
            Request::Get(_)
                | Request::List(_)
                | Request::Expired { .. }
                | Request::Status
                | Request::Check(_)
                | Request::Who { .. }
        )
    }

    /// Answers a read (blocking: run it off the API's event loop).
    pub fn answer(&self, request: Request) -> Result<Value, ApiError> {
        match request {
            Request::Get(id) => self.with_reader(|store| {
                let record = store.get(id)?.ok_or_else(|| ApiError::not_found(id))?;
                let now = super::clock::now_ms();
                KernelReads::open(&self.dir)
                    .read(|kernel| Ok(records_json(store, &[record], kernel, now)?.remove(0)))
            }),
            Request::List(filter) => self.with_reader(|store| {
                let now = super::clock::now_ms();
                KernelReads::open(&self.dir).read(|kernel| list_json(store, &filter, kernel, now))
            }),
            Request::Expired { owner } => {
                self.with_reader(|store| expired_json(store, owner.as_deref()))
            }
            Request::Status => {
                let published = self.published.lock().expect("not poisoned").clone();
                let count = self.with_reader(|store| Ok(store.count()?))?;
                Ok(status_json(
                    published,
                    count,
                    &attach::inspect(&self.dir),
                    &self.service_metrics,
                ))
            }
            Request::Who { public, at_ms } => {
                self.with_reader(|store| who_json(store, &public, at_ms))
            }
            Request::Check(ask) => self.with_reader(|store| {
                let view = super::check::check(store, &self.dir, &ask, super::clock::now_ms())?;
                Ok(serde_json::to_value(view).expect("plain struct"))
            }),
            other => unreachable!("{other:?} is the engine's"),
        }
    }
}
