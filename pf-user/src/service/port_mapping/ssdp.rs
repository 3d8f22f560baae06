//! SSDP for tunnel clients: M-SEARCHes to 239.255.255.250:1900 arriving on the tunnel-side
//! interfaces (those of the listen addresses, where the device carries multicast: veth, tap,
//! not WireGuard) are answered with the root description's URL. The socket is bound to the
//! group address, so unicast to the server's other addresses (the public one) never reaches
//! it, and a search from outside `policy.target_networks` is dropped and counted.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::Arc,
};

use super::Shared;
use crate::api::port_mapping::{ssdp, upnp};

/// Binds the group's port and joins the group on each listen address's interface. An address
/// whose interface cannot join (not up yet, or no multicast: WireGuard) is named in the
/// warning returned; the others are served.
pub(super) fn bind(listen: &[Ipv4Addr]) -> std::io::Result<(UdpSocket, Vec<String>)> {
    let socket = bind_reusable()?;
    socket.set_nonblocking(true)?;
    // Only the groups this socket joined (Linux otherwise delivers every group any socket of
    // the host joined on any interface).
    let zero: libc::c_int = 0;
    // SAFETY: setsockopt with a c_int of the right size on a socket we own.
    if unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MULTICAST_ALL,
            (&zero as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    let mut unjoined = Vec::new();
    for addr in listen {
        if let Err(e) = socket.join_multicast_v4(&ssdp::GROUP, addr) {
            unjoined.push(format!("{addr} ({e})"));
        }
    }
    Ok((socket, unjoined))
}

/// A UDP socket bound to the SSDP group and port (so only datagrams to the group reach it),
/// with SO_REUSEADDR: another SSDP responder on the server (a media server) may share it.
fn bind_reusable() -> std::io::Result<UdpSocket> {
    // SAFETY: as in `bind`.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: ssdp::PORT.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ssdp::GROUP).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: setsockopt with a c_int; bind with a sockaddr_in of its own size.
    unsafe {
        if libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
            || libc::bind(
                fd.as_raw_fd(),
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(UdpSocket::from(fd))
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
                tracing::debug!("SSDP: receiving: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let client = *from.ip();
        if !shared.is_client(client) {
            shared.counts.dropped("outside_target_networks");
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
