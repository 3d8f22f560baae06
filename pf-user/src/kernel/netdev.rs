//! What the kernel says about network devices that `if_nametoindex` cannot: whether a device can
//! take XDP frames redirected to it (the `netdev` generic-netlink family, the source of
//! `ynl --family netdev --dump dev-get`), and whether it is Ethernet-like.
//!
//! Both answers are for the calling thread's network namespace, as pf's other commands are.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::kernel::{
    error::PfError,
    netlink::{NLM_F_DUMP, Socket, attribute, attributes},
};

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// include/uapi/linux/netdev.h
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// The device implements `ndo_xdp_xmit`: XDP_REDIRECT may send frames to it. A veth sets it
/// only while its peer can receive them (an XDP program or GRO on the peer); otherwise the
/// frames would be dropped.
pub const NETDEV_XDP_ACT_NDO_XMIT: u64 = 1 << 2;
const GENL_HDRLEN: usize = 4;
const ARPHRD_ETHER: u16 = 1;

fn netlink_error(what: &str, e: io::Error) -> PfError {
    PfError::io(format!("asking the kernel's netdev family {what}"), e)
}

/// A generic-netlink request (`cmd`, version 1, then `attrs`) and the payloads after the
/// generic-netlink header of its answers.
fn genl_request(
    socket: &mut Socket,
    family: u16,
    flags: u16,
    cmd: u8,
    attrs: &[u8],
) -> io::Result<Vec<Vec<u8>>> {
    let mut body = vec![cmd, 1, 0, 0];
    body.extend_from_slice(attrs);
    Ok(socket
        .request(family, flags, &body)?
        .into_iter()
        .filter(|answer| answer.len() >= GENL_HDRLEN)
        .map(|answer| answer[GENL_HDRLEN..].to_vec())
        .collect())
}

/// Every device of the namespace with its XDP features (`NETDEV_XDP_ACT_*` bits), by ifindex;
/// `None` on a kernel without the `netdev` family (before Linux 6.3), which cannot say.
pub fn xdp_features() -> Result<Option<Vec<(u32, u64)>>, PfError> {
    let mut socket =
        Socket::open(libc::NETLINK_GENERIC).map_err(|e| netlink_error("(opening a socket)", e))?;
    let family = match genl_request(
        &mut socket,
        GENL_ID_CTRL,
        0,
        CTRL_CMD_GETFAMILY,
        &attribute(CTRL_ATTR_FAMILY_NAME, b"netdev\0"),
    ) {
        Ok(answers) => answers,
        // No such family: a kernel before 6.3, which cannot say.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(netlink_error("(resolving the family)", e)),
    };
    let family = family
        .iter()
        .flat_map(|answer| attributes(answer))
        .find(|(kind, value)| *kind == CTRL_ATTR_FAMILY_ID && value.len() == 2)
        .map(|(_, value)| u16::from_ne_bytes([value[0], value[1]]))
        .ok_or_else(|| {
            netlink_error(
                "(resolving the family)",
                io::Error::new(io::ErrorKind::InvalidData, "no family id in the answer"),
            )
        })?;
    let answers = genl_request(&mut socket, family, NLM_F_DUMP, NETDEV_CMD_DEV_GET, &[])
        .map_err(|e| netlink_error("for its devices", e))?;
    Ok(Some(
        answers
            .iter()
            .filter_map(|answer| {
                let (mut ifindex, mut features) = (None, 0);
                for (kind, value) in attributes(answer) {
                    match (kind, value.len()) {
                        (NETDEV_A_DEV_IFINDEX, 4) => {
                            ifindex = Some(u32::from_ne_bytes(value.try_into().unwrap()))
                        }
                        (NETDEV_A_DEV_XDP_FEATURES, 8) => {
                            features = u64::from_ne_bytes(value.try_into().unwrap())
                        }
                        _ => {}
                    }
                }
                Some((ifindex?, features))
            })
            .collect(),
    ))
}

/// The devices XDP_REDIRECT may send frames to now (`NETDEV_XDP_ACT_NDO_XMIT`), by ifindex;
/// `None` where the kernel cannot say (no `netdev` family: before Linux 6.3).
pub fn redirect_targets() -> Result<Option<Vec<u32>>, PfError> {
    Ok(xdp_features()?.map(|devices| {
        devices
            .into_iter()
            .filter(|(_, features)| features & NETDEV_XDP_ACT_NDO_XMIT != 0)
            .map(|(ifindex, _)| ifindex)
            .collect()
    }))
}

/// The ifindex of `iface` in this namespace, if it exists.
pub fn ifindex(iface: &str) -> Option<u32> {
    let name = CString::new(iface).ok()?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The name of interface `ifindex` in this namespace, if it exists.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: a buffer of IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `name`.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Whether `iface` carries Ethernet frames (ARPHRD_ETHER: a NIC, veth, tap, VXLAN), as XDP
/// programs that parse an Ethernet header need. WireGuard and tun are layer 3 (no header).
pub fn is_ethernet(iface: &str) -> Result<bool, PfError> {
    let io_err = |e| PfError::io(format!("reading the hardware type of {iface}"), e);
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed ifreq with the name copied in (NUL-terminated, within IFNAMSIZ); the
    // ioctl fills ifr_hwaddr.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req
            .ifr_name
            .iter_mut()
            .zip(iface.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        if libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) < 0 {
            return Err(io_err(io::Error::last_os_error()));
        }
        Ok(req.ifr_ifru.ifru_hwaddr.sa_family == ARPHRD_ETHER)
    }
}
