//! SSDP for tunnel clients: M-SEARCHes to 239.255.255.250:1900 arriving on the tunnel-side
//! interfaces (those of the listen addresses, where the device carries multicast: veth, tap,
//! not WireGuard) are answered with the root description's URL. The socket is bound to the
//! group address, so unicast to the server's other addresses (the public one) never reaches
//! it, and a search from outside `policy.target_networks` is dropped and counted.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::Arc,
};

use super::{Shared, socket};
use crate::api::port_mapping::{ssdp, upnp};

/// Binds the group's port and joins the group on each listen address's interface. An address
/// whose interface cannot join (not up yet, or no multicast: WireGuard) is named in the
/// warning returned; the others are served.
pub(super) fn bind(listen: &[Ipv4Addr]) -> std::io::Result<(UdpSocket, Vec<String>)> {
    let fd = socket::ipv4(libc::SOCK_DGRAM)?;
    // Another SSDP responder on the server (a media server) may share the port.
    socket::set_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    // Only the groups this socket joined (Linux otherwise delivers every group any socket of
    // the host joined on any interface).
    socket::set_option(&fd, libc::IPPROTO_IP, libc::IP_MULTICAST_ALL, 0)?;
    // Bound to the group itself: only datagrams sent to the group reach it.
    socket::bind(&fd, ssdp::GROUP, ssdp::PORT)?;
    let socket = UdpSocket::from(fd);
    let mut unjoined = Vec::new();
    for addr in listen {
        if let Err(e) = socket.join_multicast_v4(&ssdp::GROUP, addr) {
            unjoined.push(format!("{addr} ({e})"));
        }
    }
    Ok((socket, unjoined))
}

/// The server's address towards `client` (the routing table's choice), if it is one of the
/// listen addresses: where the answer says the description is.
fn local_towards(client: Ipv4Addr, listen: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    let probe = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    probe.connect((client, ssdp::PORT)).ok()?;
    match probe.local_addr().ok()? {
        SocketAddr::V4(a) if listen.contains(a.ip()) => Some(*a.ip()),
        _ => None,
    }
}

/// Answers searches until the runtime stops.
pub(super) async fn serve(socket: UdpSocket, shared: Arc<Shared>, port: u16, uuid: String) {
    let Ok(socket) = tokio::net::UdpSocket::from_std(socket) else {
        return;
    };
    let Ok(answers) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .and_then(tokio::net::UdpSocket::from_std)
    else {
        return;
    };
    let mut buf = vec![0u8; 2048];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok((len, SocketAddr::V4(from))) => (len, from),
            Ok(_) => continue,
            Err(e) => {
                super::receive_failed("SSDP", e).await;
                continue;
            }
        };
        let client = *from.ip();
        if !shared.admits(client) {
            continue;
        }
        let Some(st) = ssdp::search_target(&buf[..len]) else {
            shared.counts.dropped("not_a_search");
            continue;
        };
        if !shared.allow(client) {
            shared.counts.dropped("rate_limited");
            continue;
        }
        let Some(local) = local_towards(client, &shared.config.listen) else {
            shared.counts.dropped("no_listen_address_towards_client");
            continue;
        };
        let location = format!("http://{local}:{port}{}", upnp::ROOT_DESCRIPTION_PATH);
        let answer = ssdp::answer(st, &location, &uuid);
        if answers.send_to(answer.as_bytes(), from).await.is_ok() {
            shared.counts.answered("ssdp", "search");
        }
    }
}
