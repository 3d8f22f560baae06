//! The port-mapping server: NAT-PMP (RFC 6886) and PCP (RFC 6887) on UDP 5351 of the
//! tunnel-side addresses `[port_mapping] listen` names, and nowhere else. A tunnel client's
//! source address says who asks (on WireGuard a peer's inner address is bound to its key);
//! datagrams from outside `policy.target_networks` are dropped and counted. Each mapping is a
//! reservation, made by the engine like any other ([`super::engine::mapping`]).
//!
//! Runs as tasks on the API's runtime. Parsing, the rate limit and the answers to what needs
//! no change (the external address, errors) are done here; a mapping is a job for the engine,
//! awaited in a task of its own, so a slow change holds up no other client's datagram.

mod answer;
mod ingress;
mod rate;
mod socket;
mod ssdp;
mod upnp;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::OwnedFd,
    sync::{Arc, mpsc},
    time::Instant,
};

use tokio::net::UdpSocket;

pub use answer::Refused;

use super::{
    Job,
    audit::Caller,
    config::PortMappingConfig,
    engine::{MapAnswer, MapRequest, Request},
    metrics::MappingCounts,
    store::MappingProtocol,
};
use crate::{
    api::port_mapping::{self as wire, Datagram, SERVER_PORT, natpmp, pcp},
    domain::{net::Ipv4Net, spec::Protocols},
};

/// Mapping jobs awaiting the engine at once, over all clients; past it a datagram is dropped
/// (and counted), as a full socket buffer would drop it.
const MAX_IN_FLIGHT: usize = 1024;

/// Opens a socket of `kind` (`SOCK_DGRAM`, `SOCK_STREAM`) on `addr`:`port` with
/// `IP_FREEBIND`, so the service can start before the tunnel device (and its address) is up;
/// it answers once the address exists.
fn bind(addr: Ipv4Addr, port: u16, kind: libc::c_int) -> std::io::Result<OwnedFd> {
    let fd = socket::ipv4(kind)?;
    socket::set_option(&fd, libc::IPPROTO_IP, libc::IP_FREEBIND, 1)?;
    if kind == libc::SOCK_STREAM {
        // A restart must not wait out TIME_WAIT connections of the last run.
        socket::set_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    } else {
        // Each datagram's ingress interface (see `ingress`).
        socket::set_option(&fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
    }
    socket::bind(&fd, addr, port)?;
    if kind == libc::SOCK_STREAM {
        socket::listen(&fd)?;
    }
    Ok(fd)
}

/// What the server shares between its sockets and tasks.
struct Shared {
    config: PortMappingConfig,
    /// `policy.target_networks`, as the last reload left them.
    target_networks: TunnelNetworks,
    /// When the mapping state began (Unix ms): NAT-PMP's and PCP's epoch counts from it.
    epoch_ms: u64,
    jobs: mpsc::Sender<Job>,
    counts: MappingCounts,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Each client's request budget, one for every socket and protocol (a client does not
    /// get more by using another listen address or protocol).
    buckets: std::sync::Mutex<rate::Buckets>,
}

/// `policy.target_networks`, shared with the reload that may change them.
pub type TunnelNetworks = Arc<std::sync::RwLock<Vec<Ipv4Net>>>;

/// A socket's receive failed (out of memory, say): logged, and the loop pauses rather than
/// spin.
async fn receive_failed(what: &str, e: std::io::Error) {
    tracing::warn!("port-mapping server: {what}: receiving: {e}");
    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
}

impl Shared {
    /// Whether `client` is in the tunnel networks: only those are answered; any other is
    /// counted as dropped.
    fn admits(&self, client: Ipv4Addr) -> bool {
        let inside = self
            .target_networks
            .read()
            .expect("not poisoned")
            .iter()
            .any(|n| n.contains(client));
        if !inside {
            self.counts.dropped("outside_target_networks");
        }
        inside
    }

    /// Whether `client` may ask now (taking a token if so).
    fn allow(&self, client: Ipv4Addr) -> bool {
        self.buckets
            .lock()
            .expect("not poisoned")
            .allow(client, Instant::now())
    }

    fn epoch(&self) -> u32 {
        let now = super::clock::now_ms();
        u32::try_from(now.saturating_sub(self.epoch_ms) / 1000).unwrap_or(u32::MAX)
    }

    /// Asks the engine; `None` if it has stopped.
    async fn ask(
        &self,
        request: Request,
    ) -> Option<Result<serde_json::Value, super::engine::ApiError>> {
        let (reply, answered) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job {
                request,
                caller: Caller::SERVICE,
                reply,
            })
            .ok()?;
        answered.await.ok()
    }
}

/// The server's sockets, bound before the service reports itself ready.
pub struct Server {
    sockets: Vec<(Ipv4Addr, std::net::UdpSocket)>,
    /// UPnP IGD's HTTP listeners, if `upnp_port` is set.
    upnp: Vec<(Ipv4Addr, std::net::TcpListener)>,
    /// SSDP's socket, with UPnP unless `ssdp = false`.
    ssdp: Option<std::net::UdpSocket>,
    shared: Arc<Shared>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "binding the port-mapping server to {addr}:{port} (port_mapping.listen, upnp_port): {source}"
)]
pub struct BindError {
    addr: Ipv4Addr,
    port: u16,
    source: std::io::Error,
}

impl Server {
    pub fn bind(
        config: &PortMappingConfig,
        target_networks: TunnelNetworks,
        epoch_ms: u64,
        jobs: mpsc::Sender<Job>,
        counts: MappingCounts,
    ) -> Result<Self, BindError> {
        let bind_at = |addr: Ipv4Addr, port: u16, kind| {
            bind(addr, port, kind).map_err(|source| BindError { addr, port, source })
        };
        let sockets = config
            .listen
            .iter()
            .map(|&addr| {
                bind_at(addr, SERVER_PORT, libc::SOCK_DGRAM)
                    .map(|fd| (addr, std::net::UdpSocket::from(fd)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let upnp = match config.upnp_port {
            Some(port) => config
                .listen
                .iter()
                .map(|&addr| {
                    bind_at(addr, port, libc::SOCK_STREAM)
                        .map(|fd| (addr, std::net::TcpListener::from(fd)))
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let ssdp = match config.upnp_port {
            Some(_) if config.ssdp => {
                let (socket, unjoined) =
                    ssdp::bind(&config.listen).map_err(|source| BindError {
                        addr: wire::ssdp::GROUP,
                        port: wire::ssdp::PORT,
                        source,
                    })?;
                if !unjoined.is_empty() {
                    tracing::warn!(
                        "SSDP: cannot join {} on {}: devices there find UPnP only by its URL (a tunnel without multicast, as WireGuard, never carries SSDP)",
                        wire::ssdp::GROUP,
                        unjoined.join(", ")
                    );
                }
                Some(socket)
            }
            _ => None,
        };
        Ok(Self {
            sockets,
            upnp,
            ssdp,
            shared: Arc::new(Shared {
                config: config.clone(),
                target_networks,
                epoch_ms,
                jobs,
                counts,
                in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
                buckets: std::sync::Mutex::new(rate::Buckets::new(config.requests_per_second)),
            }),
        })
    }

    /// Serves every socket until the runtime stops. Call within the runtime.
    pub fn spawn(self) -> std::io::Result<()> {
        for (addr, socket) in self.sockets {
            let socket = Arc::new(UdpSocket::from_std(socket)?);
            tracing::info!("answering NAT-PMP and PCP on {addr}:{SERVER_PORT}");
            tokio::spawn(serve_socket(socket, self.shared.clone()));
        }
        if let (Some(socket), Some(port)) = (self.ssdp, self.shared.config.upnp_port) {
            tracing::info!(
                "answering SSDP searches on {}:{}",
                wire::ssdp::GROUP,
                wire::ssdp::PORT
            );
            let uuid = upnp::device_uuid(self.shared.epoch_ms);
            tokio::spawn(ssdp::serve(socket, self.shared.clone(), port, uuid));
        }
        if !self.upnp.is_empty() {
            let shared = Arc::new(upnp::Upnp::new(self.shared.clone()));
            for (addr, listener) in self.upnp {
                let port = listener.local_addr()?.port();
                let listener = tokio::net::TcpListener::from_std(listener)?;
                tracing::info!(
                    "answering UPnP IGD on http://{addr}:{port}{}",
                    wire::upnp::ROOT_DESCRIPTION_PATH
                );
                tokio::spawn(upnp::serve(listener, shared.clone()));
            }
        }
        Ok(())
    }
}

async fn serve_socket(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    // One byte more than PCP's largest message, so a longer one is seen as too long.
    let mut buf = vec![0u8; pcp::MAX_LEN + 1];
    let mut tunnel_side = ingress::TunnelSide::new(&shared.config.listen);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&*socket);
    loop {
        let received = socket
            .async_io(tokio::io::Interest::READABLE, || {
                ingress::recv(fd, &mut buf)
            })
            .await;
        let (len, from, ifindex) = match received {
            Ok(got) => got,
            Err(e) => {
                receive_failed("NAT-PMP and PCP", e).await;
                continue;
            }
        };
        let client = *from.ip();
        if !shared.admits(client) {
            continue;
        }
        if !tunnel_side.holds(ifindex) {
            // A tunnel address arriving from elsewhere (the public side) is forged.
            shared.counts.dropped("not_from_the_tunnel_side");
            continue;
        }
        let limited = !shared.allow(client);
        if let Some(reply) = handle(&buf[..len], from, limited, &socket, &shared) {
            send(&socket, from, &reply).await;
        }
    }
}

async fn send(socket: &UdpSocket, to: SocketAddrV4, reply: &[u8]) {
    if let Err(e) = socket.send_to(reply, SocketAddr::V4(to)).await {
        tracing::debug!("port-mapping server: answering {to}: {e}");
    }
}

/// What a datagram gets: an answer now, or none (dropped, or answered later by a task that
/// awaits the engine).
fn handle(
    d: &[u8],
    from: SocketAddrV4,
    limited: bool,
    socket: &Arc<UdpSocket>,
    shared: &Arc<Shared>,
) -> Option<Vec<u8>> {
    let client = *from.ip();
    let epoch = shared.epoch();
    let counts = &shared.counts;
    match wire::parse(d) {
        Datagram::NatPmp(natpmp::Parsed::Ignored(why))
        | Datagram::Pcp(pcp::Parsed::Ignored(why)) => {
            tracing::debug!("port-mapping server: ignored a datagram from {from}: {why}");
            counts.dropped("malformed");
            None
        }
        Datagram::NatPmp(natpmp::Parsed::UnsupportedOpcode(op)) => {
            counts.answered("natpmp", "unsupported_opcode");
            Some(natpmp::unsupported_opcode_answer(op, epoch))
        }
        Datagram::NatPmp(natpmp::Parsed::Request(request)) => {
            let refused_now = limited.then_some(natpmp::ResultCode::OutOfResources);
            if limited {
                counts.rate_limited("natpmp");
            }
            match request {
                natpmp::Request::ExternalAddress => {
                    let result = refused_now.unwrap_or(natpmp::ResultCode::Success);
                    counts.answered("natpmp", answer::natpmp_name(result));
                    Some(natpmp::external_address_answer(
                        result,
                        epoch,
                        shared.config.public_ip,
                    ))
                }
                natpmp::Request::Map {
                    transport,
                    internal_port,
                    suggested_external_port,
                    lifetime,
                } => {
                    let refuse = |result| {
                        counts.answered("natpmp", answer::natpmp_name(result));
                        Some(natpmp::map_answer(
                            transport,
                            result,
                            epoch,
                            internal_port,
                            0,
                            0,
                        ))
                    };
                    if let Some(result) = refused_now {
                        return refuse(result);
                    }
                    let protocol = match transport {
                        natpmp::Transport::Tcp => Protocols::Tcp,
                        natpmp::Transport::Udp => Protocols::Udp,
                    };
                    let map = MapRequest {
                        suggested_port: suggested_external_port,
                        ..MapRequest::new(
                            MappingProtocol::NatPmp,
                            client,
                            protocol,
                            internal_port,
                            lifetime,
                        )
                    };
                    let shared2 = shared.clone();
                    let taken = ask_engine(map, from, socket, shared, move |answered| {
                        let result = match &answered {
                            Ok(_) => natpmp::ResultCode::Success,
                            Err(refused) => refused.natpmp(),
                        };
                        shared2
                            .counts
                            .answered("natpmp", answer::natpmp_name(result));
                        let (port, life) = answered
                            .map(|a| (a.external_port, a.lifetime_s))
                            .unwrap_or((0, 0));
                        natpmp::map_answer(
                            transport,
                            result,
                            shared2.epoch(),
                            internal_port,
                            port,
                            life,
                        )
                    });
                    if taken {
                        None
                    } else {
                        refuse(natpmp::ResultCode::OutOfResources)
                    }
                }
            }
        }
        Datagram::Pcp(pcp::Parsed::Error(e)) => {
            counts.answered("pcp", e.result.name());
            Some(pcp::error_answer(&e, epoch))
        }
        Datagram::Pcp(pcp::Parsed::Request(request)) => {
            pcp_request(request, d, from, limited, socket, shared)
        }
    }
}

fn pcp_request(
    request: pcp::Request,
    d: &[u8],
    from: SocketAddrV4,
    limited: bool,
    socket: &Arc<UdpSocket>,
    shared: &Arc<Shared>,
) -> Option<Vec<u8>> {
    let client = *from.ip();
    let epoch = shared.epoch();
    let counts = &shared.counts;
    let error = |result: pcp::ResultCode| {
        counts.answered("pcp", result.name());
        Some(pcp::error_answer(
            &pcp::ErrorAnswer::for_request(d, result),
            epoch,
        ))
    };
    let m = match request.operation {
        pcp::Operation::Announce if request.client_v4() != Some(client) => {
            return error(pcp::ResultCode::AddressMismatch);
        }
        pcp::Operation::Announce if limited => {
            counts.rate_limited("pcp");
            return error(pcp::ResultCode::NoResources);
        }
        pcp::Operation::Announce => {
            counts.answered("pcp", pcp::ResultCode::Success.name());
            return Some(pcp::announce_answer(epoch));
        }
        pcp::Operation::Map(m) => m,
    };
    let public = shared.config.public_ip.to_ipv6_mapped();
    let refuse = |result: pcp::ResultCode| {
        counts.answered("pcp", result.name());
        Some(pcp::map_answer(&m, result, 0, epoch, 0, public))
    };
    if request.client_v4() != Some(client) {
        return refuse(pcp::ResultCode::AddressMismatch);
    }
    if limited {
        counts.rate_limited("pcp");
        return refuse(pcp::ResultCode::NoResources);
    }
    let protocol = match m.protocol {
        6 => Protocols::Tcp,
        17 => Protocols::Udp,
        _ => return refuse(pcp::ResultCode::UnsuppProtocol),
    };
    if m.internal_port == 0 && request.lifetime != 0 {
        // "All ports" of the client: pf forwards ports one by one, within the policy.
        return refuse(pcp::ResultCode::NotAuthorized);
    }
    let suggested_addr = m
        .suggested_external_addr
        .to_ipv4_mapped()
        .filter(|a| !a.is_unspecified());
    let map = MapRequest {
        suggested_port: m.suggested_external_port,
        suggested_addr,
        nonce: Some(m.nonce),
        prefer_failure: m.prefer_failure,
        ..MapRequest::new(
            MappingProtocol::Pcp,
            client,
            protocol,
            m.internal_port,
            request.lifetime,
        )
    };
    let shared2 = shared.clone();
    let taken = ask_engine(map, from, socket, shared, move |answered| {
        let (result, lifetime, port, addr) = match answered {
            Ok(a) => (
                pcp::ResultCode::Success,
                a.lifetime_s,
                a.external_port,
                a.public_ip,
            ),
            Err(refused) => (refused.pcp(), 0, 0, shared2.config.public_ip),
        };
        shared2.counts.answered("pcp", result.name());
        pcp::map_answer(
            &m,
            result,
            lifetime,
            shared2.epoch(),
            port,
            addr.to_ipv6_mapped(),
        )
    });
    if taken {
        None
    } else {
        refuse(pcp::ResultCode::NoResources)
    }
}

/// Hands `map` to the engine and answers from a task of its own once it is done, with what
/// `answer` writes. False when too many jobs are in flight: the caller answers "out of
/// resources" at once.
fn ask_engine(
    map: MapRequest,
    to: SocketAddrV4,
    socket: &Arc<UdpSocket>,
    shared: &Arc<Shared>,
    answer: impl FnOnce(Result<MapAnswer, Refused>) -> Vec<u8> + Send + 'static,
) -> bool {
    let Ok(permit) = shared.in_flight.clone().try_acquire_owned() else {
        return false;
    };
    let socket = socket.clone();
    let shared = shared.clone();
    tokio::spawn(async move {
        // If the engine has stopped, the answer is "network failure".
        let result = match shared.ask(Request::Map(map)).await {
            Some(Ok(value)) => {
                serde_json::from_value::<MapAnswer>(value).map_err(|_| Refused::Unavailable)
            }
            Some(Err(e)) => Err(Refused::of(&e)),
            None => Err(Refused::Unavailable),
        };
        send(&socket, to, &answer(result)).await;
        drop(permit);
    });
    true
}
