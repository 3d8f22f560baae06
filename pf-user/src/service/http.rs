//! The HTTP/JSON API on the Unix socket (`curl --unix-socket /run/pf/pf.sock http://pf/v1/...`):
//!
//! | method and path                        | does                                         |
//! |----------------------------------------|----------------------------------------------|
//! | `GET /v1/status`                       | version, count, next expiry, interfaces      |
//! | `GET /v1/reservations[?owner=X]`       | list (all, or one owner's)                   |
//! | `POST /v1/reservations`                | reserve (`ReserveRequest`), 201              |
//! | `GET /v1/reservations/{id}`            | one reservation                              |
//! | `DELETE /v1/reservations/{id}`         | release                                      |
//! | `DELETE /v1/reservations?owner=X`      | release all of one owner                     |
//! | `POST /v1/reservations/{id}/renew`     | renew (`{"ttl": "30d"}`, or the same again)  |
//! | `POST /v1/reservations/{id}/enable`    | forward again                                |
//! | `POST /v1/reservations/{id}/disable`   | stop forwarding, keep the ports              |
//!
//! Every error is a 4xx/5xx with `{"error": "...", "rule": "policy...."}` (rule only for a
//! policy refusal).

use std::{convert::Infallible, os::unix::net::UnixListener as StdListener, sync::mpsc};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Response, StatusCode,
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::UnixListener;

use super::{
    Job,
    audit::Caller,
    engine::{ApiError, RenewRequest, Request},
};

/// Largest request body: a reservation is a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;

pub async fn serve(listener: StdListener, jobs: mpsc::Sender<Job>) -> std::io::Result<()> {
    let listener = UnixListener::from_std(listener)?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    eprintln!("pf serve: accepting a connection: {e}");
                    continue;
                }
            },
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
        let jobs = jobs.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let jobs = jobs.clone();
                async move { Ok::<_, Infallible>(respond(req, caller, jobs).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn json_response(status: u16, body: &Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec_pretty(body).expect("JSON values serialise");
    text.push(b'\n');
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("a valid response")
}

async fn respond(
    req: hyper::Request<Incoming>,
    caller: Caller,
    jobs: mpsc::Sender<Job>,
) -> Response<Full<Bytes>> {
    let mut created = false;
    let result = match route(req).await {
        Ok(request) => {
            created = matches!(request, Request::Reserve(_));
            ask(request, caller, &jobs).await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(body) => json_response(if created { 201 } else { 200 }, &body),
        Err(e) => json_response(e.status, &e.to_json()),
    }
}

async fn ask(
    request: Request,
    caller: Caller,
    jobs: &mpsc::Sender<Job>,
) -> Result<Value, ApiError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let stopped = || ApiError {
        status: 503,
        message: "pf serve is stopping".into(),
        rule: None,
    };
    jobs.send(Job {
        request,
        caller,
        reply,
    })
    .map_err(|_| stopped())?;
    answer.await.map_err(|_| stopped())?
}

/// The value of `key` in a query string, percent-decoded.
fn query_param(query: Option<&str>, key: &str) -> Result<Option<String>, ApiError> {
    let Some(query) = query else { return Ok(None) };
    let mut found = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != key {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter '{k}' (only '{key}' is known)"
            )));
        }
        if found.is_some() {
            return Err(ApiError::bad_request(format!("'{key}' is given twice")));
        }
        found = Some(percent_decode(v)?);
    }
    Ok(found)
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
    Ok(Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError {
                    status: 413,
                    message: format!("request body is larger than {MAX_BODY} bytes"),
                    rule: None,
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
        status: 405,
        message: format!("{method} is not allowed on {path}"),
        rule: None,
    };
    match segments[..] {
        ["v1", "status"] if method == Method::GET => Ok(Request::Status),
        ["v1", "status"] => Err(not_allowed()),
        ["v1", "reservations"] => match method {
            Method::GET => Ok(Request::List {
                owner: query_param(query.as_deref(), "owner")?,
            }),
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
                    Ok(Request::Renew { id, ttl: renew.ttl })
                }
                "enable" => Ok(Request::SetEnabled { id, enabled: true }),
                "disable" => Ok(Request::SetEnabled { id, enabled: false }),
                other => Err(ApiError {
                    status: 404,
                    message: format!("unknown action '{other}' (renew, enable or disable)"),
                    rule: None,
                }),
            }
        }
        ["v1", "reservations", _, _] => Err(not_allowed()),
        _ => Err(ApiError {
            status: 404,
            message: format!("no such API path {path} (see `pf serve --help`)"),
            rule: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
