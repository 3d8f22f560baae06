//! The HTTP/JSON API on the Unix socket (`curl --unix-socket /run/pf/pf.sock http://pf/v1/...`):
//!
//! | method and path                        | does                                         |
//! |----------------------------------------|----------------------------------------------|
//! | `GET /v1/openapi.json`                 | this table, as OpenAPI 3.0 (`api/openapi.json`)|
//! | `GET /v1/status`                       | version, count, next expiry, interfaces      |
//! | `GET /v1/stats`                        | each reservation's traffic since it was made |
//! | `GET /healthz`                         | 200 ok, or 503 naming what keeps pf from work|
//! | `GET /v1/reservations[?owner=X]`       | list (all, or one owner's)                   |
//! | `POST /v1/reservations`                | reserve (`ReserveRequest`), 201              |
//! | `GET /v1/reservations/{id}`            | one reservation                              |
//! | `DELETE /v1/reservations/{id}`         | release                                      |
//! | `PATCH /v1/reservations/{id}`          | change in place (`ChangeRequest`)            |
//! | `DELETE /v1/reservations?owner=X`      | release all of one owner                     |
//! | `POST /v1/reservations/{id}/renew`     | renew (`{"ttl": "30d"}`, or the same again)  |
//! | `POST /v1/reservations/{id}/enable`    | forward again                                |
//! | `POST /v1/reservations/{id}/disable`   | stop forwarding, keep the ports              |
//! | `GET /v1/expired[?owner=X]`            | the expired history (restorable for 7 days)  |
//! | `POST /v1/expired/{id}/restore`        | restore (`{"ttl": "30d"}`, or the same again)|
//! | `GET /v1/who?public=IP:PORT/PROTO&at=T`| who held the endpoint at T (default now)     |
//! | `POST /v1/owners/{owner}/disable`      | disable all of an owner's (`{"reason": ...}`)|
//! | `GET /v1/drains`, `POST /v1/drains`    | scheduled drains; schedule one (`DrainRequest`)|
//! | `DELETE /v1/drains/{id}`               | cancel a pending drain                       |
//!
//! Every error is a 4xx/5xx with `{"error": "...", "code": "...", "rule"?: "policy....",
//! "conflict_id"?: N}` (`ErrorBody`): `rule` for a policy refusal, `conflict_id` for a conflict.
//!
//! Connections are bounded: each must send a request's headers within [`HEADER_TIMEOUT`] of
//! opening or of its last answer, and its body within [`BODY_TIMEOUT`]; at most
//! [`max_connections`] are open, and a new one beyond that closes the longest-idle one (so
//! idle clients cannot hold the API). Accept errors (out of files) back off, with one log
//! line per condition.

use std::{
    collections::HashMap,
    convert::Infallible,
    os::unix::net::UnixListener as StdListener,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Response, StatusCode,
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::UnixListener;

use crate::api::types::{RenewRequest, RestoreRequest, TunnelOwnerRequest, lifetime_text};

use super::{
    Job,
    audit::Caller,
    engine::{ApiError, Failure, Request},
    reads::Reads,
    store::ListFilter,
};

/// Largest request body: a reservation is a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;
/// How long a connection may take to send a request's headers (also: how long an idle
/// keep-alive connection stays open).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take to send its body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections open at once, whatever the file limit allows.
const MAX_CONNECTIONS: usize = 1024;
/// Files kept for everything but connections (store, maps, logs, the runtime).
const RESERVED_FILES: u64 = 64;
/// Longest wait after an accept error before trying again.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The connection cap: [`MAX_CONNECTIONS`], or fewer if the file limit is lower.
pub fn max_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    (soft.saturating_sub(RESERVED_FILES) as usize).clamp(1, MAX_CONNECTIONS)
}

/// Open connections, so that one beyond the cap can close the longest-idle one.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: HashMap<u64, Connection>,
}

struct Connection {
    /// When it last became idle (opened, or answered).
    idle_since: Arc<Mutex<Instant>>,
    /// Inside a request (headers read, answer not yet written): never evicted then.
    busy: Arc<AtomicBool>,
    abort: tokio::task::AbortHandle,
}

/// Removes a connection from the registry when its task ends (or is aborted).
struct Registered {
    connections: Arc<Mutex<Connections>>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut c) = self.connections.lock() {
            c.open.remove(&self.id);
        }
    }
}

impl Connections {
    /// Closes the connection idle the longest; false if every one is inside a request.
    fn evict_idlest(&mut self) -> bool {
        let idlest = self
            .open
            .iter()
            .filter(|(_, c)| !c.busy.load(Ordering::Relaxed))
            .min_by_key(|(_, c)| *c.idle_since.lock().expect("not poisoned"))
            .map(|(id, _)| *id);
        match idlest.and_then(|id| self.open.remove(&id)) {
            Some(c) => {
                c.abort.abort();
                true
            }
            None => false,
        }
    }
}

/// How often a condition that comes and goes is logged at most.
const CONDITION_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Logs a condition when it starts and when it ends, at most once a minute however often it
/// comes and goes (out of files, a full connection table), with how often it happened.
#[derive(Default)]
struct Condition {
    active: bool,
    last_logged: Option<Instant>,
    /// Times it began since the last line.
    unlogged: u64,
}

impl Condition {
    fn set(&mut self, what: impl FnOnce() -> String) {
        if self.active {
            return;
        }
        self.active = true;
        if self
            .last_logged
            .is_some_and(|t| t.elapsed() < CONDITION_LOG_INTERVAL)
        {
            self.unlogged += 1;
            return;
        }
        let again = match self.unlogged {
            0 => String::new(),
            n => format!(" ({n} more times in the last minute)"),
        };
        tracing::warn!("{}{again}", what());
        self.last_logged = Some(Instant::now());
        self.unlogged = 0;
    }

    fn clear(&mut self, ended: &str) {
        if !self.active {
            return;
        }
        self.active = false;
        if self.unlogged == 0
            && self
                .last_logged
                .is_some_and(|t| t.elapsed() >= Duration::from_secs(1))
        {
            tracing::info!("{ended}");
        }
    }
}

/// One HTTP/1.1 connection until it ends: headers must arrive within HEADER_TIMEOUT.
pub(super) async fn serve_connection<S, I>(stream: I, service: S)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// At most this many `/metrics` connections at once (Prometheus keeps one per target).
const METRICS_CONNECTIONS: usize = 16;

/// The Prometheus listener (`[metrics] listen`): `GET /metrics` only.
pub(super) struct MetricsListener {
    pub listener: std::net::TcpListener,
    pub per_reservation_limit: usize,
}

/// Serves `/metrics`, composed beside the engine ([`Reads::metrics`]) on a blocking thread.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    reads: Arc<Reads>,
    per_reservation_limit: usize,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: a scraper retries
        };
        let reads = reads.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req: hyper::Request<Incoming>| {
                let reads = reads.clone();
                async move {
                    let response = if req.method() != Method::GET {
                        json_response(
                            StatusCode::METHOD_NOT_ALLOWED,
                            &serde_json::json!({"error": "GET only", "code": "method_not_allowed"}),
                        )
                    } else if req.uri().path() != "/metrics" {
                        json_response(
                            StatusCode::NOT_FOUND,
                            &serde_json::json!({"error": "the metrics are at /metrics", "code": "not_found"}),
                        )
                    } else {
                        let scraped = tokio::task::spawn_blocking(move || {
                            reads.metrics(per_reservation_limit)
                        })
                        .await
                        .unwrap_or_else(|e| {
                            Err(ApiError::unavailable(format!("the scrape failed: {e}")))
                        });
                        match scraped {
                            Ok(text) => Response::builder()
                                .status(StatusCode::OK)
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(text)))
                                .expect("valid response"),
                            Err(e) => json_response(status_of(e.kind), &e.to_json()),
                        }
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            serve_connection(stream, service).await;
        });
    }
}

pub(super) async fn serve(
    listener: StdListener,
    jobs: mpsc::Sender<Job>,
    reads: Arc<Reads>,
    mut reloader: super::Reloader,
    metrics: Option<MetricsListener>,
) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let listener = UnixListener::from_std(listener)?;
    if let Some(m) = metrics {
        m.listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(m.listener)?;
        tokio::spawn(serve_metrics(
            listener,
            reads.clone(),
            m.per_reservation_limit,
        ));
    }
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    // Ready only now: a reload systemd sends once it hears this must find SIGHUP handled
    // (its default action would end the service).
    super::tell_systemd(&[sd_notify::NotifyState::Ready]);
    let cap = max_connections();
    let connections = Arc::new(Mutex::new(Connections::default()));
    let (mut accept_trouble, mut full) = (Condition::default(), Condition::default());
    let mut backoff = Duration::ZERO;
    loop {
        if !backoff.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = terminate.recv() => return Ok(()),
                _ = interrupt.recv() => return Ok(()),
            }
        }
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff = Duration::ZERO;
                    accept_trouble.clear("accepting connections again");
                    stream
                }
                Err(e) => {
                    // Out of files or memory: retrying at once would spin. Back off, and say
                    // so once, not once per attempt.
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), ACCEPT_BACKOFF_MAX);
                    accept_trouble.set(|| format!(
                        "accepting connections fails ({e}); retrying with back-off up to {ACCEPT_BACKOFF_MAX:?}"
                    ));
                    continue;
                }
            },
            _ = hangup.recv() => {
                // The engine takes it between requests; systemd hears "reloading" until then.
                super::tell_systemd(&[
                    sd_notify::NotifyState::Reloading,
                    sd_notify::NotifyState::monotonic_usec_now()?,
                ]);
                let (reply, answer) = tokio::sync::oneshot::channel();
                let _ = jobs.send(Job {
                    request: reloader.request(),
                    caller: Caller::SERVICE,
                    reply,
                });
                tokio::spawn(async move {
                    if let Ok(Err(e)) = answer.await {
                        tracing::error!("reload: {}", e.message);
                    }
                    super::tell_systemd(&[sd_notify::NotifyState::Ready]);
                });
                continue;
            }
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        };
        let caller = match stream.peer_cred() {
            Ok(cred) => Caller {
                uid: Some(cred.uid()),
                pid: cred.pid(),
            },
            Err(_) => Caller::SERVICE,
        };
        let evicted = {
            let mut registry = connections.lock().expect("not poisoned");
            let mut evicted = false;
            if registry.open.len() >= cap {
                if registry.evict_idlest() {
                    evicted = true;
                    full.set(|| format!(
                    "{cap} API connections are open (the most this service keeps); closing the longest-idle one for each new one"
                ));
                } else {
                    // Every connection is inside a request: this one waits for none of them.
                    full.set(|| format!(
                    "{cap} API connections are open and all busy; refusing new ones until one ends"
                ));
                    drop(stream);
                    continue;
                }
            } else if registry.open.len() < cap / 2 {
                full.clear("API connections are below the cap again");
            }
            let id = registry.next_id;
            registry.next_id += 1;
            let idle_since = Arc::new(Mutex::new(Instant::now()));
            let busy = Arc::new(AtomicBool::new(false));
            let guard = Registered {
                connections: connections.clone(),
                id,
            };
            let (jobs, reads) = (jobs.clone(), reads.clone());
            let (conn_idle, conn_busy) = (idle_since.clone(), busy.clone());
            let task = tokio::spawn(async move {
                let _guard = guard;
                let service = service_fn(move |req| {
                    let (jobs, reads, idle_since, busy) = (
                        jobs.clone(),
                        reads.clone(),
                        conn_idle.clone(),
                        conn_busy.clone(),
                    );
                    async move {
                        busy.store(true, Ordering::Relaxed);
                        let response = respond(req, caller, jobs, reads).await;
                        *idle_since.lock().expect("not poisoned") = Instant::now();
                        busy.store(false, Ordering::Relaxed);
                        Ok::<_, Infallible>(response)
                    }
                });
                serve_connection(stream, service).await;
            });
            registry.open.insert(
                id,
                Connection {
                    idle_since,
                    busy,
                    abort: task.abort_handle(),
                },
            );
            evicted
        };
        if evicted {
            // Let the runtime drop the aborted connection (and close its file) before the
            // next accept: a burst of connections must not outrun the evictions.
            tokio::task::yield_now().await;
        }
    }
}

/// The one place that knows which status code says which failure.
fn status_of(kind: Failure) -> StatusCode {
    match kind {
        Failure::BadRequest => StatusCode::BAD_REQUEST,
        Failure::Refused => StatusCode::FORBIDDEN,
        Failure::NotFound => StatusCode::NOT_FOUND,
        Failure::NotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        Failure::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        Failure::Conflict => StatusCode::CONFLICT,
        Failure::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Failure::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        Failure::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec_pretty(body).expect("JSON values serialise");
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("a valid response")
}

/// The audit log's name for a change request, by method and path, for a request that could
/// not be read at all; `None` for a read.
fn change_action(method: &Method, segments: &[&str]) -> Option<&'static str> {
    Some(match (method, segments) {
        (&Method::POST, ["v1", "reservations"]) => "reserve",
        (&Method::DELETE, ["v1", "reservations"]) => "release-owner",
        (&Method::DELETE, ["v1", "reservations", _]) => "release",
        (&Method::PATCH, ["v1", "reservations", _]) => "change",
        (&Method::POST, ["v1", "reservations", _, "renew"]) => "renew",
        (&Method::POST, ["v1", "reservations", _, "enable"]) => "enable",
        (&Method::POST, ["v1", "reservations", _, "disable"]) => "disable",
        (&Method::POST, ["v1", "expired", _, "restore"]) => "restore",
        (&Method::PUT, ["v1", "tunnel-owners", _]) => "set-tunnel-owner",
        (&Method::DELETE, ["v1", "tunnel-owners", _]) => "unset-tunnel-owner",
        (&Method::POST, ["v1", "owners", _, "disable"]) => "disable-owner",
        (&Method::POST, ["v1", "drains"]) => "schedule-drain",
        (&Method::DELETE, ["v1", "drains", _]) => "cancel-drain",
        (&Method::GET | &Method::HEAD, _) => return None,
        _ => "unknown",
    })
}

/// One public endpoint, `IP:PORT/tcp|udp`, as `GET /v1/who` takes it.
fn who_endpoint(text: &str) -> Result<crate::domain::spec::PublicSpec, ApiError> {
    let spec: crate::domain::spec::PublicSpec = text.parse().map_err(ApiError::from)?;
    if spec.ports.len() != 1 || spec.protocols == crate::domain::spec::Protocols::Both {
        return Err(ApiError::bad_request(format!(
            "public: '{text}' must name one port and one protocol (IP:PORT/tcp or /udp)"
        )));
    }
    Ok(spec)
}

/// Every route the API serves, as (method, path template): the OpenAPI description lists
/// exactly these (a host test checks), and an integration test asks the real service for each.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/status"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/reservations"),
    ("POST", "/v1/reservations"),
    ("DELETE", "/v1/reservations"),
    ("GET", "/v1/reservations/{id}"),
    ("PATCH", "/v1/reservations/{id}"),
    ("DELETE", "/v1/reservations/{id}"),
    ("POST", "/v1/reservations/{id}/renew"),
    ("POST", "/v1/reservations/{id}/enable"),
    ("POST", "/v1/reservations/{id}/disable"),
    ("GET", "/v1/reservations/{id}/check"),
    ("GET", "/v1/who"),
    ("POST", "/v1/owners/{owner}/disable"),
    ("GET", "/v1/drains"),
    ("POST", "/v1/drains"),
    ("DELETE", "/v1/drains/{id}"),
    ("GET", "/v1/expired"),
    ("POST", "/v1/expired/{id}/restore"),
    ("GET", "/v1/tunnel-owners"),
    ("PUT", "/v1/tunnel-owners/{address}"),
    ("DELETE", "/v1/tunnel-owners/{address}"),
];

async fn respond(
    req: hyper::Request<Incoming>,
    caller: Caller,
    jobs: mpsc::Sender<Job>,
    reads: Arc<Reads>,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if path == "/v1/openapi.json" {
        return match method {
            Method::GET => Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(
                    crate::api::OPENAPI.as_bytes(),
                )))
                .expect("valid response"),
            _ => json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &ApiError {
                    kind: Failure::NotAllowed,
                    message: format!("{method} is not allowed on {path}"),
                    rule: None,
                    partial: false,
                    conflict_id: None,
                }
                .to_json(),
            ),
        };
    }
    let mut created = false;
    let result = match route(req).await {
        Ok(request) if Reads::answers(&request) => {
            // Beside the engine, on a blocking thread: a long read holds up no change.
            tokio::task::spawn_blocking(move || reads.answer(request))
                .await
                .unwrap_or_else(|e| Err(ApiError::unavailable(format!("the read failed: {e}"))))
        }
        Ok(request) => {
            created = matches!(request, Request::Reserve(_));
            ask(request, caller, &jobs).await
        }
        Err(error) => {
            let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
            match change_action(&method, &segments) {
                // A change that could not be read is still a change asked for: audited.
                Some(action) => {
                    let request = Request::Malformed {
                        action,
                        subject: serde_json::json!({ "method": method.as_str(), "path": path }),
                        error,
                    };
                    ask(request, caller, &jobs).await
                }
                None => Err(error),
            }
        }
    };
    match result {
        Ok(body) => json_response(
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            &body,
        ),
        Err(e) => json_response(status_of(e.kind), &e.to_json()),
    }
}

async fn ask(
    request: Request,
    caller: Caller,
    jobs: &mpsc::Sender<Job>,
) -> Result<Value, ApiError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let stopped = || ApiError {
        kind: Failure::Unavailable,
        message: "pf serve is stopping".into(),
        rule: None,
        partial: false,
        conflict_id: None,
    };
    jobs.send(Job {
        request,
        caller,
        reply,
    })
    .map_err(|_| stopped())?;
    answer.await.map_err(|_| stopped())?
}

/// A query string's parameters, percent-decoded, in order: each must be one of `known`, and
/// none given twice.
fn query_params(
    query: Option<&str>,
    known: &[&'static str],
) -> Result<Vec<(&'static str, String)>, ApiError> {
    let mut found: Vec<(&'static str, String)> = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(&key) = known.iter().find(|known| **known == k) else {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter '{k}' (known: {})",
                known.join(", ")
            )));
        };
        if found.iter().any(|(seen, _)| *seen == key) {
            return Err(ApiError::bad_request(format!("'{k}' is given twice")));
        }
        found.push((key, percent_decode(v)?));
    }
    Ok(found)
}

/// A list's filters and page from its query: `owner`, `public_port`, `target` (an IPv4
/// address), `expiring_before` (RFC 3339), `after` (an id) and `limit`.
fn list_filter(query: Option<&str>) -> Result<ListFilter, ApiError> {
    let mut filter = ListFilter::default();
    for (k, v) in query_params(
        query,
        &[
            "owner",
            "public_port",
            "target",
            "expiring_before",
            "after",
            "limit",
        ],
    )? {
        let bad = |what: &str| ApiError::bad_request(format!("{k}: '{v}' is not {what}"));
        match k {
            "owner" => filter.owner = Some(v.clone()),
            "public_port" => {
                filter.public_port = Some(
                    v.parse()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| bad("a port"))?,
                )
            }
            "target" => filter.target = Some(v.parse().map_err(|_| bad("an IPv4 address"))?),
            "expiring_before" => {
                let at = humantime::parse_rfc3339_weak(&v)
                    .map_err(|_| bad("a time such as 2026-12-01T00:00:00Z"))?;
                filter.expiring_before_ms = Some(
                    at.duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                );
            }
            "after" => filter.after = Some(v.parse().map_err(|_| bad("a reservation id"))?),
            _ => {
                filter.limit = Some(
                    v.parse()
                        .ok()
                        .filter(|l| *l > 0)
                        .ok_or_else(|| bad("a count of at least 1"))?,
                )
            }
        }
    }
    Ok(filter)
}

/// The value of `key` in a query string that may hold only it, percent-decoded.
fn query_param(query: Option<&str>, key: &'static str) -> Result<Option<String>, ApiError> {
    Ok(query_params(query, &[key])?.pop().map(|(_, v)| v))
}

fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bad = || ApiError::bad_request(format!("'{s}' is not a valid percent-encoded value"));
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

async fn read_body(req: hyper::Request<Incoming>) -> Result<Bytes, ApiError> {
    let collected = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    .map_err(|_| ApiError {
        kind: Failure::BodyTimeout,
        message: format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
        rule: None,
        partial: false,
        conflict_id: None,
    })?;
    Ok(collected
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError {
                    kind: Failure::TooLarge,
                    message: format!("request body is larger than {MAX_BODY} bytes"),
                    rule: None,
                    partial: false,
                    conflict_id: None,
                }
            } else {
                ApiError::bad_request(format!("reading the request body: {e}"))
            }
        })?
        .to_bytes())
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

fn parse_id(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("'{s}' is not a reservation id")))
}

async fn route(req: hyper::Request<Incoming>) -> Result<Request, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let not_allowed = || ApiError {
        kind: Failure::NotAllowed,
        message: format!("{method} is not allowed on {path}"),
        rule: None,
        partial: false,
        conflict_id: None,
    };
    match segments[..] {
        ["v1", "status"] if method == Method::GET => Ok(Request::Status),
        ["v1", "status"] => Err(not_allowed()),
        ["healthz"] if method == Method::GET => Ok(Request::Health),
        ["healthz"] => Err(not_allowed()),
        ["v1", "stats"] if method == Method::GET => Ok(Request::Stats),
        ["v1", "stats"] => Err(not_allowed()),
        ["v1", "reservations"] => match method {
            Method::GET => Ok(Request::List(list_filter(query.as_deref())?)),
            Method::POST => Ok(Request::Reserve(parse_json(&read_body(req).await?)?)),
            Method::DELETE => match query_param(query.as_deref(), "owner")? {
                Some(owner) => Ok(Request::ReleaseOwner(owner)),
                None => Err(ApiError::bad_request(
                    "DELETE /v1/reservations needs ?owner=X (release one reservation by its id)",
                )),
            },
            _ => Err(not_allowed()),
        },
        ["v1", "reservations", id] => match method {
            Method::GET => Ok(Request::Get(parse_id(id)?)),
            Method::DELETE => Ok(Request::Release(parse_id(id)?)),
            Method::PATCH => {
                let id = parse_id(id)?;
                Ok(Request::Change {
                    id,
                    change: parse_json(&read_body(req).await?)?,
                })
            }
            _ => Err(not_allowed()),
        },
        ["v1", "reservations", id, action] if method == Method::POST => {
            let id = parse_id(id)?;
            match action {
                "renew" => {
                    let bytes = read_body(req).await?;
                    let renew: RenewRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
                        RenewRequest::default()
                    } else {
                        parse_json(&bytes)?
                    };
                    Ok(Request::Renew {
                        id,
                        ttl: lifetime_text(renew.ttl, renew.ttl_seconds)
                            .map_err(ApiError::bad_request)?,
                    })
                }
                "enable" => Ok(Request::SetEnabled { id, enabled: true }),
                "disable" => Ok(Request::SetEnabled { id, enabled: false }),
                other => Err(ApiError {
                    kind: Failure::NotFound,
                    message: format!("unknown action '{other}' (renew, enable or disable)"),
                    rule: None,
                    partial: false,
                    conflict_id: None,
                }),
            }
        }
        ["v1", "reservations", id, "check"] if method == Method::GET => {
            let id = parse_id(id)?;
            let mut ask = super::check::CheckRequest {
                id,
                port: None,
                protocol: None,
                udp_probe: Vec::new(),
            };
            for (k, v) in query_params(query.as_deref(), &["port", "protocol", "udp_probe"])? {
                let bad = |what: &str| ApiError::bad_request(format!("{k}: '{v}' is not {what}"));
                match k {
                    "port" => {
                        ask.port = Some(
                            v.parse()
                                .ok()
                                .filter(|p| *p != 0)
                                .ok_or_else(|| bad("a port"))?,
                        )
                    }
                    "protocol" => {
                        ask.protocol = Some(match v.as_str() {
                            "tcp" => crate::domain::spec::Protocols::Tcp,
                            "udp" => crate::domain::spec::Protocols::Udp,
                            _ => return Err(bad("tcp or udp")),
                        })
                    }
                    _ => {
                        if v.len() > 1024 {
                            return Err(bad("a probe of at most 1024 bytes"));
                        }
                        ask.udp_probe = v.into_bytes();
                    }
                }
            }
            Ok(Request::Check(ask))
        }
        ["v1", "reservations", _, _] => Err(not_allowed()),
        ["v1", "drains"] => match method {
            Method::GET => Ok(Request::Drains),
            Method::POST => Ok(Request::Drain(parse_json(&read_body(req).await?)?)),
            _ => Err(not_allowed()),
        },
        ["v1", "drains", id] if method == Method::DELETE => Ok(Request::CancelDrain(parse_id(id)?)),
        ["v1", "drains", _] => Err(not_allowed()),
        ["v1", "owners", owner, "disable"] if method == Method::POST => {
            let body: crate::api::types::DisableOwnerRequest = parse_json(&read_body(req).await?)?;
            Ok(Request::DisableOwner {
                owner: percent_decode(owner)?,
                reason: body.reason,
            })
        }
        ["v1", "owners", _, "disable"] => Err(not_allowed()),
        ["v1", "who"] if method == Method::GET => {
            let (mut public, mut at_ms) = (None, None);
            for (k, v) in query_params(query.as_deref(), &["public", "at"])? {
                if k == "public" {
                    public = Some(who_endpoint(&v)?);
                } else {
                    let at = humantime::parse_rfc3339_weak(&v).map_err(|e| {
                        ApiError::bad_request(format!(
                            "at: '{v}' is not a time such as 2026-11-30T12:00:00Z ({e})"
                        ))
                    })?;
                    at_ms = Some(
                        at.duration_since(std::time::UNIX_EPOCH)
                            .map_err(|_| ApiError::bad_request("at: before 1970"))?
                            .as_millis() as u64,
                    );
                }
            }
            let public =
                public.ok_or_else(|| ApiError::bad_request("give public=IP:PORT/tcp|udp"))?;
            Ok(Request::Who {
                public,
                at_ms: at_ms.unwrap_or_else(super::clock::now_ms),
            })
        }
        ["v1", "who"] => Err(not_allowed()),
        ["v1", "expired"] if method == Method::GET => Ok(Request::Expired {
            owner: query_param(query.as_deref(), "owner")?,
        }),
        ["v1", "expired"] => Err(not_allowed()),
        ["v1", "expired", id, "restore"] if method == Method::POST => {
            let id = parse_id(id)?;
            let bytes = read_body(req).await?;
            let restore: RestoreRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
                RestoreRequest::default()
            } else {
                parse_json(&bytes)?
            };
            Ok(Request::Restore {
                id,
                ttl: lifetime_text(restore.ttl, restore.ttl_seconds)
                    .map_err(ApiError::bad_request)?,
            })
        }
        ["v1", "expired", _, "restore"] => Err(not_allowed()),
        ["v1", "tunnel-owners"] if method == Method::GET => Ok(Request::TunnelOwners),
        ["v1", "tunnel-owners"] => Err(not_allowed()),
        ["v1", "tunnel-owners", address] => {
            let address = address.parse().map_err(|_| {
                ApiError::bad_request(format!("'{address}' is not an IPv4 address"))
            })?;
            match method {
                Method::PUT => {
                    let body: TunnelOwnerRequest = parse_json(&read_body(req).await?)?;
                    Ok(Request::SetTunnelOwner {
                        address,
                        owner: Some(body.owner),
                    })
                }
                Method::DELETE => Ok(Request::SetTunnelOwner {
                    address,
                    owner: None,
                }),
                _ => Err(not_allowed()),
            }
        }
        _ => Err(ApiError {
            kind: Failure::NotFound,
            message: format!("no such API path {path} (the API: GET /v1/openapi.json)"),
            rule: None,
            partial: false,
            conflict_id: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The OpenAPI description lists exactly the routes served, each method and path.
    #[test]
    fn the_openapi_description_lists_every_route_and_no_other() {
        let doc: Value = serde_json::from_str(crate::api::OPENAPI).unwrap();
        let mut described: Vec<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| *k != "parameters")
                    .map(|m| (m.to_uppercase(), path.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        described.sort();
        served.sort();
        assert_eq!(described, served);
        // Every $ref points at something the document has.
        let text = crate::api::OPENAPI;
        for reference in text.split("\"$ref\": \"#/").skip(1) {
            let path = reference.split('"').next().unwrap();
            let mut node = &doc;
            for part in path.split('/') {
                node = &node[part];
            }
            assert!(!node.is_null(), "dangling $ref #/{path}");
        }
    }

    #[test]
    fn query_parameters() {
        assert_eq!(query_param(None, "owner"), Ok(None));
        assert_eq!(
            query_param(Some("owner=acct%2F7+x"), "owner"),
            Ok(Some("acct/7 x".into()))
        );
        assert!(query_param(Some("user=1"), "owner").is_err());
        assert!(query_param(Some("owner=%zz"), "owner").is_err());
    }
}
