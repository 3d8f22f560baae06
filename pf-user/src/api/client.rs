//! The CLI's side of the API: one blocking HTTP/1.1 request per command over the Unix socket
//! (`Connection: close`, so the response ends where the stream does).

use std::{
    io::{self, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::types::{
    ChangeRequest, CheckView, DisableOwnerRequest, DisabledByOwner, DrainRequest, DrainView,
    ErrorBody, ListQuery, ReleasedByOwner, RenewRequest, ReservationView, ReserveRequest,
    RestoreRequest, StatsView, TunnelOwnerRequest, TunnelOwnerView, WhoView, percent_encode,
};

/// How long the CLI waits for the service to answer.
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "pf serve is not running (nothing listens on {0}); start it with `systemctl start pf` or `pf serve --config /etc/pf/pf.toml`"
    )]
    NotRunning(PathBuf),
    #[error(
        "permission denied on {0}: the API is for root and the socket's group (service.socket_group in pf.toml)"
    )]
    PermissionDenied(PathBuf),
    #[error("talking to pf serve on {socket}: {source}")]
    Io { socket: PathBuf, source: io::Error },
    #[error("pf serve answered with something that is not HTTP/JSON: {0}")]
    BadResponse(String),
    /// The service refused: its status and message.
    #[error("{message}")]
    Api { status: u16, message: String },
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends one request; a 2xx answer's JSON body, or the service's error.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let io_err = |source| ClientError::Io {
            socket: self.socket.clone(),
            source,
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(self.socket.clone())
            }
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(self.socket.clone()),
            _ => io_err(e),
        })?;
        stream.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
        stream.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: pf\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).map_err(io_err)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).map_err(io_err)?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| ClientError::BadResponse(text.chars().take(80).collect()))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::BadResponse(head.lines().next().unwrap_or("").into()))?;
        let value: Value = serde_json::from_str(body)
            .map_err(|e| ClientError::BadResponse(format!("status {status}, body: {e}")))?;
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            let message = serde_json::from_value::<ErrorBody>(value)
                .map(|e| e.error)
                .unwrap_or_else(|_| "(no message)".to_string());
            Err(ClientError::Api { status, message })
        }
    }

    /// A call whose answer is one of the API's types.
    fn typed<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| ClientError::BadResponse(e.to_string()))?;
        let value = self.call(method, path, body.as_ref())?;
        serde_json::from_value(value)
            .map_err(|e| ClientError::BadResponse(format!("{method} {path}: {e}")))
    }

    /// `GET /v1/stats`: each reservation with its traffic since it was made.
    pub fn stats(&self) -> Result<StatsView, ClientError> {
        self.typed("GET", "/v1/stats", None::<&()>)
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<Value, ClientError> {
        self.call("GET", "/v1/status", None)
    }

    pub fn reserve(&self, request: &ReserveRequest) -> Result<ReservationView, ClientError> {
        self.typed("POST", "/v1/reservations", Some(request))
    }

    /// Every reservation, or one owner's.
    /// The reservations a query asks for.
    pub fn list_query(&self, query: &ListQuery) -> Result<Vec<ReservationView>, ClientError> {
        self.typed(
            "GET",
            &format!("/v1/reservations{}", query.query()),
            None::<&()>,
        )
    }

    /// The expired history, or one owner's.
    pub fn expired(&self, owner: Option<&str>) -> Result<Vec<ReservationView>, ClientError> {
        self.typed("GET", &with_owner("/v1/expired", owner), None::<&()>)
    }

    pub fn release(&self, id: u64) -> Result<ReservationView, ClientError> {
        self.typed("DELETE", &format!("/v1/reservations/{id}"), None::<&()>)
    }

    pub fn release_owner(&self, owner: &str) -> Result<ReleasedByOwner, ClientError> {
        self.typed(
            "DELETE",
            &with_owner("/v1/reservations", Some(owner)),
            None::<&()>,
        )
    }

    /// `POST /v1/drains`.
    pub fn schedule_drain(&self, request: &DrainRequest) -> Result<DrainView, ClientError> {
        self.typed("POST", "/v1/drains", Some(request))
    }

    /// `GET /v1/drains`.
    pub fn drains(&self) -> Result<Vec<DrainView>, ClientError> {
        self.typed("GET", "/v1/drains", None::<&()>)
    }

    /// `DELETE /v1/drains/{id}`.
    pub fn cancel_drain(&self, id: u64) -> Result<Value, ClientError> {
        self.typed("DELETE", &format!("/v1/drains/{id}"), None::<&()>)
    }

    /// `POST /v1/owners/{owner}/disable`.
    pub fn disable_owner(&self, owner: &str, reason: &str) -> Result<DisabledByOwner, ClientError> {
        self.typed(
            "POST",
            &format!("/v1/owners/{}/disable", percent_encode(owner)),
            Some(&DisableOwnerRequest {
                reason: reason.to_string(),
            }),
        )
    }

    pub fn renew(&self, id: u64, request: &RenewRequest) -> Result<ReservationView, ClientError> {
        self.typed(
            "POST",
            &format!("/v1/reservations/{id}/renew"),
            Some(request),
        )
    }

    pub fn change(&self, id: u64, request: &ChangeRequest) -> Result<ReservationView, ClientError> {
        self.typed("PATCH", &format!("/v1/reservations/{id}"), Some(request))
    }

    pub fn set_enabled(&self, id: u64, enabled: bool) -> Result<ReservationView, ClientError> {
        let action = if enabled { "enable" } else { "disable" };
        self.typed(
            "POST",
            &format!("/v1/reservations/{id}/{action}"),
            None::<&()>,
        )
    }

    pub fn restore(
        &self,
        id: u64,
        request: &RestoreRequest,
    ) -> Result<ReservationView, ClientError> {
        self.typed("POST", &format!("/v1/expired/{id}/restore"), Some(request))
    }

    /// `GET /v1/reservations/{id}/check`: is the port open, link by link.
    pub fn check(
        &self,
        id: u64,
        port: u16,
        protocol: &str,
        udp_probe: Option<&str>,
    ) -> Result<CheckView, ClientError> {
        let mut path = format!("/v1/reservations/{id}/check?port={port}&protocol={protocol}");
        if let Some(probe) = udp_probe {
            path += &format!("&udp_probe={}", percent_encode(probe));
        }
        self.typed("GET", &path, None::<&()>)
    }

    /// `GET /v1/who`: who held `public` (`IP:PORT/PROTO`) at `at` (RFC 3339; now if none).
    pub fn who(&self, public: &str, at: Option<&str>) -> Result<WhoView, ClientError> {
        let mut path = format!("/v1/who?public={}", percent_encode(public));
        if let Some(at) = at {
            path += &format!("&at={}", percent_encode(at));
        }
        self.typed("GET", &path, None::<&()>)
    }

    /// `GET /v1/tunnel-owners`.
    pub fn tunnel_owners(&self) -> Result<Vec<TunnelOwnerView>, ClientError> {
        self.typed("GET", "/v1/tunnel-owners", None::<&()>)
    }

    /// `PUT /v1/tunnel-owners/{address}` with an owner, `DELETE` without.
    pub fn set_tunnel_owner(
        &self,
        address: std::net::Ipv4Addr,
        owner: Option<&str>,
    ) -> Result<TunnelOwnerView, ClientError> {
        let path = format!("/v1/tunnel-owners/{address}");
        match owner {
            Some(owner) => self.typed(
                "PUT",
                &path,
                Some(&TunnelOwnerRequest {
                    owner: owner.to_string(),
                }),
            ),
            None => self.typed("DELETE", &path, None::<&()>),
        }
    }
}

fn with_owner(path: &str, owner: Option<&str>) -> String {
    match owner {
        Some(owner) => format!("{path}?owner={}", percent_encode(owner)),
        None => path.to_string(),
    }
}
