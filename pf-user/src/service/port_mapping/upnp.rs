//! UPnP IGD for tunnel clients: HTTP on `[port_mapping] upnp_port` of the listen addresses,
//! the root description, the service description, and WANIPConnection's SOAP actions. A
//! connection from outside `policy.target_networks` is closed unanswered (and counted). The
//! requester's own address is the only internal client it may map to, and the entries it can
//! read are its own (other customers' tunnel addresses stay private).

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Response, StatusCode,
    body::{Bytes, Incoming},
    service::service_fn,
};

use super::{Refused, Shared};
use crate::{
    api::{
        port_mapping::upnp::{self, Action, Fault, NewMapping, Transport},
        types::ReservationView,
    },
    domain::spec::{Protocols, PublicSpec},
    service::{
        engine::{MapAnswer, MapRequest, Request, mapping::NO_SUCH_MAPPING},
        store::{ListFilter, MappingProtocol},
    },
};

/// Connections open at once, over all clients, and per client: one client cannot hold every
/// slot (a device needs one or two).
const MAX_CONNECTIONS: usize = 64;
const MAX_CONNECTIONS_PER_CLIENT: usize = 4;
/// A body must arrive within this.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection of the UPnP listener shares.
pub(super) struct Upnp {
    shared: Arc<Shared>,
    /// Open connections by client.
    open: Mutex<HashMap<Ipv4Addr, usize>>,
    started: Instant,
    uuid: String,
}

/// A connection's place in [`Upnp::open`], given back when it ends.
struct Opened(Arc<Upnp>, Ipv4Addr);

impl Drop for Opened {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().expect("not poisoned");
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

impl Upnp {
    /// Takes a connection slot of `client`'s, if it has one left.
    fn open(self: &Arc<Self>, client: Ipv4Addr) -> Option<Opened> {
        let mut open = self.open.lock().expect("not poisoned");
        let n = open.entry(client).or_default();
        if *n >= MAX_CONNECTIONS_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(Opened(self.clone(), client))
    }
}

impl Upnp {
    pub fn new(shared: Arc<Shared>) -> Self {
        let uuid = device_uuid(shared.epoch_ms);
        Self {
            open: Mutex::new(HashMap::new()),
            shared,
            started: Instant::now(),
            uuid,
        }
    }
}

/// The device's UUID: stable for the store's life (from the mapping epoch), so a device that
/// cached the description finds it again.
pub(super) fn device_uuid(e: u64) -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        e >> 32,
        (e >> 16) & 0xffff,
        e & 0xfff,
        (e >> 12) & 0xfff,
        e & 0xffff_ffff_ffff
    )
}

/// Accepts connections on one listen address until the runtime stops.
pub(super) async fn serve(listener: tokio::net::TcpListener, upnp: Arc<Upnp>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let SocketAddr::V4(peer) = peer else { continue };
        let client = *peer.ip();
        if !upnp.shared.admits(client) {
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            upnp.shared.counts.dropped("busy");
            continue;
        };
        let Some(opened) = upnp.open(client) else {
            upnp.shared.counts.dropped("too_many_connections");
            continue;
        };
        let Ok(SocketAddr::V4(local)) = stream.local_addr() else {
            continue;
        };
        let upnp = upnp.clone();
        tokio::spawn(async move {
            let _slot = (slot, opened);
            let service = service_fn(move |req: hyper::Request<Incoming>| {
                let upnp = upnp.clone();
                async move { Ok::<_, Infallible>(respond(&upnp, req, client, &local.to_string()).await) }
            });
            crate::service::http::serve_connection(stream, service).await;
        });
    }
}

fn xml(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/xml; charset=\"utf-8\"")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn refused(status: StatusCode, why: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(why.as_bytes())))
        .expect("valid response")
}

async fn respond(
    upnp: &Upnp,
    req: hyper::Request<Incoming>,
    client: Ipv4Addr,
    local: &str,
) -> Response<Full<Bytes>> {
    // A web page the client's browser opened may have rebound its own name to this address
    // (DNS rebinding): the browser then sends the page's name as Host. Devices name the
    // address itself, as the description's URLs do.
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let local_ip = local.split(':').next().unwrap_or_default();
    if host != local && host != local_ip {
        upnp.shared.counts.dropped("foreign_host_header");
        return refused(StatusCode::BAD_REQUEST, "the Host must be this address\n");
    }
    if !upnp.shared.allow(client) {
        upnp.shared.counts.rate_limited("upnp");
        return match req.uri().path() {
            upnp::CONTROL_PATH | upnp::LINK_CONTROL_PATH => {
                upnp.shared
                    .counts
                    .answered("upnp", Fault::ActionFailed.name());
                xml(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    upnp::fault(Fault::ActionFailed),
                )
            }
            _ => refused(StatusCode::TOO_MANY_REQUESTS, "too many requests\n"),
        };
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, upnp::ROOT_DESCRIPTION_PATH) => xml(
            StatusCode::OK,
            upnp::root_description(&format!("http://{local}"), &upnp.uuid),
        ),
        (&Method::GET, upnp::SCPD_PATH) => xml(StatusCode::OK, upnp::service_description()),
        (&Method::GET, upnp::LINK_SCPD_PATH) => {
            xml(StatusCode::OK, upnp::link_service_description())
        }
        (&Method::POST, upnp::CONTROL_PATH | upnp::LINK_CONTROL_PATH) => {
            let header = req
                .headers()
                .get("soapaction")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let outcome = control(upnp, req, &header, client).await;
            let counts = &upnp.shared.counts;
            match outcome {
                Ok(body) => {
                    counts.answered("upnp", "success");
                    xml(StatusCode::OK, body)
                }
                Err(fault) => {
                    counts.answered("upnp", fault.name());
                    xml(StatusCode::INTERNAL_SERVER_ERROR, upnp::fault(fault))
                }
            }
        }
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"not found\n")))
            .expect("valid response"),
    }
}

async fn control(
    upnp: &Upnp,
    req: hyper::Request<Incoming>,
    header: &str,
    client: Ipv4Addr,
) -> Result<String, Fault> {
    let (service, name) = upnp::soap_action(header)?;
    let body = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), upnp::MAX_BODY).collect(),
    )
    .await
    .map_err(|_| Fault::InvalidArgs)?
    .map_err(|_| Fault::InvalidArgs)?
    .to_bytes();
    let action = upnp::parse(name, &body)?;
    let args = act(upnp, &action, client).await?;
    Ok(upnp::answer(service, action.name(), &args))
}

fn protocol(t: Transport) -> Protocols {
    match t {
        Transport::Tcp => Protocols::Tcp,
        Transport::Udp => Protocols::Udp,
    }
}

/// A refusal in UPnP's terms.
fn fault_of(e: &crate::service::engine::ApiError) -> Fault {
    if e.rule == Some(NO_SUCH_MAPPING) {
        return Fault::NoSuchEntryInArray;
    }
    match Refused::of(e) {
        Refused::Quota | Refused::NoResources => Fault::NoPortMapsAvailable,
        Refused::SuggestionTaken => Fault::ConflictInMappingEntry,
        Refused::Unavailable => Fault::ActionFailed,
        Refused::NotAuthorized => Fault::ActionNotAuthorized,
    }
}

async fn ask(upnp: &Upnp, request: Request) -> Result<serde_json::Value, Fault> {
    match upnp.shared.ask(request).await {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(fault_of(&e)),
        None => Err(Fault::ActionFailed),
    }
}

async fn map(upnp: &Upnp, m: &NewMapping, client: Ipv4Addr, exact: bool) -> Result<u16, Fault> {
    if !m.remote_host.is_empty() {
        return Err(Fault::RemoteHostOnlySupportsWildcard);
    }
    if m.external_port == 0 && exact {
        return Err(Fault::WildCardNotPermittedInExtPort);
    }
    if m.internal_port == 0 {
        return Err(Fault::InvalidArgs);
    }
    if m.internal_client != client {
        return Err(Fault::ActionNotAuthorized);
    }
    let lifetime = match m.lease_duration {
        // Version 1's "permanent": the longest lifetime pf grants (renewed by asking again).
        0 => u32::MAX,
        n => n,
    };
    let answer = ask(
        upnp,
        Request::Map(MapRequest {
            suggested_port: m.external_port,
            prefer_failure: exact,
            description: Some(m.description.clone()),
            ..MapRequest::new(
                MappingProtocol::Upnp,
                client,
                protocol(m.protocol),
                m.internal_port,
                lifetime,
            )
        }),
    )
    .await?;
    let answer: MapAnswer = serde_json::from_value(answer).map_err(|_| Fault::ActionFailed)?;
    Ok(answer.external_port)
}

/// One entry of the requester's: (external port, protocol, internal port, description,
/// enabled, seconds left).
struct Entry {
    external_port: u16,
    protocol: Transport,
    internal_port: u16,
    description: String,
    enabled: bool,
    lease: u64,
}

/// The reservations towards the requester, one entry per protocol (a range by its first
/// port), in the order they were made.
async fn entries(upnp: &Upnp, client: Ipv4Addr) -> Result<Vec<Entry>, Fault> {
    let list = ask(
        upnp,
        Request::List(ListFilter {
            target: Some(client),
            ..ListFilter::default()
        }),
    )
    .await?;
    let views: Vec<ReservationView> =
        serde_json::from_value(list).map_err(|_| Fault::ActionFailed)?;
    let now = std::time::SystemTime::now();
    let mut out = Vec::new();
    for v in views {
        let Ok(public) = v.public.parse::<PublicSpec>() else {
            continue;
        };
        let lease = v
            .expires
            .as_deref()
            .and_then(|e| humantime::parse_rfc3339(e).ok())
            .map_or(0, |at| {
                at.duration_since(now).map_or(1, |d| d.as_secs().max(1))
            });
        let internal_port = v.forward.target_first_port;
        for p in [Transport::Tcp, Transport::Udp] {
            if public.protocols.overlaps(protocol(p)) {
                out.push(Entry {
                    external_port: public.ports.first,
                    protocol: p,
                    internal_port,
                    description: v.note.clone(),
                    enabled: v.enabled,
                    lease,
                });
            }
        }
    }
    Ok(out)
}

fn entry_args(e: &Entry, client: Ipv4Addr) -> Vec<(&'static str, String)> {
    vec![
        ("NewInternalPort", e.internal_port.to_string()),
        ("NewInternalClient", client.to_string()),
        ("NewEnabled", u8::from(e.enabled).to_string()),
        ("NewPortMappingDescription", e.description.clone()),
        ("NewLeaseDuration", e.lease.to_string()),
    ]
}

async fn act(
    upnp: &Upnp,
    action: &Action,
    client: Ipv4Addr,
) -> Result<Vec<(&'static str, String)>, Fault> {
    Ok(match action {
        Action::GetExternalIPAddress => vec![(
            "NewExternalIPAddress",
            upnp.shared.config.public_ip.to_string(),
        )],
        Action::GetStatusInfo => vec![
            ("NewConnectionStatus", "Connected".into()),
            ("NewLastConnectionError", "ERROR_NONE".into()),
            ("NewUptime", upnp.started.elapsed().as_secs().to_string()),
        ],
        // The link's speed is the server's business: 0 is "not known".
        Action::GetCommonLinkProperties => vec![
            ("NewWANAccessType", "Ethernet".into()),
            ("NewLayer1UpstreamMaxBitRate", "0".into()),
            ("NewLayer1DownstreamMaxBitRate", "0".into()),
            ("NewPhysicalLinkStatus", "Up".into()),
        ],
        Action::GetConnectionTypeInfo => vec![
            ("NewConnectionType", "IP_Routed".into()),
            ("NewPossibleConnectionTypes", "IP_Routed".into()),
        ],
        Action::AddPortMapping(m) => {
            map(upnp, m, client, true).await?;
            Vec::new()
        }
        Action::AddAnyPortMapping(m) => {
            let port = map(upnp, m, client, false).await?;
            vec![("NewReservedPort", port.to_string())]
        }
        Action::DeletePortMapping {
            external_port,
            protocol: p,
        } => {
            ask(
                upnp,
                Request::Map(MapRequest {
                    delete_external: Some(*external_port),
                    ..MapRequest::new(MappingProtocol::Upnp, client, protocol(*p), 0, 0)
                }),
            )
            .await?;
            Vec::new()
        }
        Action::GetSpecificPortMappingEntry {
            external_port,
            protocol: p,
        } => {
            let all = entries(upnp, client).await?;
            let e = all
                .iter()
                .find(|e| e.external_port == *external_port && e.protocol == *p)
                .ok_or(Fault::NoSuchEntryInArray)?;
            entry_args(e, client)
        }
        Action::GetGenericPortMappingEntry { index } => {
            let all = entries(upnp, client).await?;
            let e = all
                .get(*index as usize)
                .ok_or(Fault::SpecifiedArrayIndexInvalid)?;
            let mut args = vec![
                ("NewRemoteHost", String::new()),
                ("NewExternalPort", e.external_port.to_string()),
                ("NewProtocol", e.protocol.as_str().to_string()),
            ];
            args.extend(entry_args(e, client));
            args
        }
    })
}
