//! Which interface a datagram came in on. The source address says who asks, and a neighbour
//! on the public side could forge one from the tunnel networks (where the kernel's reverse
//! path filter is loose or off), with no answer needed to make a NAT-PMP mapping. So a
//! datagram is taken only from an interface that holds one of the listen addresses: the
//! tunnel side. `IP_PKTINFO`, set on the socket, gives each datagram's ingress interface.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::RawFd,
    time::{Duration, Instant},
};

use crate::kernel::host::LocalAddresses;

/// Receives one datagram: its length, source, and ingress interface index (0 if the kernel
/// did not say).
pub fn recv(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddrV4, u32)> {
    // SAFETY: all-zero is a valid sockaddr_in and msghdr.
    let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for one in_pktinfo message, aligned as cmsg headers need.
    let mut control = [0u64; 8];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at live buffers of the sizes it states.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut ifindex = 0;
    // SAFETY: the CMSG macros walk the control buffer recvmsg filled, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                ifindex = info.ipi_ifindex as u32;
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let source = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr)),
        u16::from_be(from.sin_port),
    );
    Ok((n as usize, source, ifindex))
}

/// The interfaces that hold a listen address, as last read; read again (at most once a
/// second) when a datagram comes from another, since tunnels come and go.
pub struct TunnelSide {
    listen: Vec<Ipv4Addr>,
    interfaces: HashSet<u32>,
    read_at: Option<Instant>,
}

impl TunnelSide {
    pub fn new(listen: &[Ipv4Addr]) -> Self {
        Self {
            listen: listen.to_vec(),
            interfaces: HashSet::new(),
            read_at: None,
        }
    }

    /// Whether interface `ifindex` holds a listen address.
    pub fn holds(&mut self, ifindex: u32) -> bool {
        if self.interfaces.contains(&ifindex) {
            return true;
        }
        if self
            .read_at
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return false;
        }
        self.read_at = Some(Instant::now());
        self.interfaces = interfaces_holding(&self.listen);
        self.interfaces.contains(&ifindex)
    }
}

/// The indexes of the interfaces that hold any of `addrs` now.
fn interfaces_holding(addrs: &[Ipv4Addr]) -> HashSet<u32> {
    let Ok(local) = LocalAddresses::read() else {
        return HashSet::new();
    };
    addrs
        .iter()
        .filter_map(|a| local.owner_of(*a))
        .filter_map(|iface| std::ffi::CString::new(iface).ok())
        // SAFETY: if_nametoindex reads a NUL-terminated name.
        .map(|name| unsafe { libc::if_nametoindex(name.as_ptr()) })
        .filter(|index| *index != 0)
        .collect()
}
