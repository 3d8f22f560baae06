//! What the kernel says about network devices that `if_nametoindex` cannot: whether a device can
//! take XDP frames redirected to it (the `netdev` generic-netlink family, the source of
//! `ynl --family netdev --dump dev-get`), and whether it is Ethernet-like.
//!
//! Both answers are for the calling thread's network namespace, as pf's other commands are.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::kernel::error::PfError;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
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
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const ARPHRD_ETHER: u16 = 1;

fn netlink_error(what: &str, e: io::Error) -> PfError {
    PfError::io(format!("asking the kernel's netdev family {what}"), e)
}

/// One generic-netlink socket, used for one request at a time.
struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl GenlSocket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor, owned from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: a valid option value of the right size. A kernel that never answers must not
        // hang pf.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Self { fd, seq: 0 })
    }

    /// Sends one request and returns the payloads (after the generic-netlink header) of every
    /// answer, until the dump's end or the single answer.
    fn request(
        &mut self,
        family: u16,
        flags: u16,
        cmd: u8,
        attrs: &[u8],
    ) -> io::Result<Vec<Vec<u8>>> {
        self.seq += 1;
        let len = NLMSG_HDRLEN + GENL_HDRLEN + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&family.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&[cmd, 1, 0, 0]);
        msg.extend_from_slice(attrs);
        // SAFETY: a valid buffer of `msg.len()` bytes; to the kernel (address zeroed = pid 0).
        let sent = unsafe {
            let mut to: libc::sockaddr_nl = std::mem::zeroed();
            to.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }

        let mut answers = Vec::new();
        let mut buf = vec![0u8; 65536];
        // A dump ends with NLMSG_DONE; a plain request with its one answer. Bounded, since a
        // namespace has at most a few thousand devices and each datagram holds many.
        for _ in 0..10_000 {
            // SAFETY: a valid buffer of `buf.len()` bytes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= NLMSG_HDRLEN {
                let msg_len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                let msg_type = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
                let msg_flags = u16::from_ne_bytes(rest[6..8].try_into().unwrap());
                let msg_seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
                if msg_len < NLMSG_HDRLEN || msg_len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a malformed netlink message",
                    ));
                }
                let body = &rest[NLMSG_HDRLEN..msg_len];
                rest = &rest[align4(msg_len).min(rest.len())..];
                if msg_seq != self.seq {
                    continue;
                }
                // A dump that changed while it ran may be incomplete; a partial device list
                // would remove devices from the maps. Refuse it rather than act on it.
                if msg_flags & NLM_F_DUMP_INTR != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::Interrupted,
                        "the device list changed during the dump; try again",
                    ));
                }
                // NLMSG_ERROR carries an errno (0: an acknowledgement); NLMSG_DONE may too.
                let errno = || {
                    body.get(0..4)
                        .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                        .unwrap_or(0)
                };
                match msg_type {
                    NLMSG_DONE | NLMSG_ERROR => {
                        let errno = errno();
                        if errno < 0 {
                            return Err(io::Error::from_raw_os_error(-errno));
                        }
                        return Ok(answers);
                    }
                    _ if body.len() >= GENL_HDRLEN => {
                        answers.push(body[GENL_HDRLEN..].to_vec());
                        if flags & NLM_F_DUMP == 0 {
                            return Ok(answers);
                        }
                    }
                    _ => {}
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a netlink dump that does not end",
        ))
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes in `payload`, as (type, value).
fn attributes(mut payload: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if payload.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([payload[0], payload[1]]) as usize;
        let kind = u16::from_ne_bytes([payload[2], payload[3]]) & 0x3fff;
        if len < 4 || len > payload.len() {
            return None;
        }
        let value = &payload[4..len];
        payload = &payload[align4(len).min(payload.len())..];
        Some((kind, value))
    })
}

fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(align4(4 + value.len()));
    a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(value);
    a.resize(align4(a.len()), 0);
    a
}

/// Every device of the namespace with its XDP features (`NETDEV_XDP_ACT_*` bits), by ifindex.
pub fn xdp_features() -> Result<Vec<(u32, u64)>, PfError> {
    let mut socket = GenlSocket::open().map_err(|e| netlink_error("(opening a socket)", e))?;
    let family = socket
        .request(
            GENL_ID_CTRL,
            0,
            CTRL_CMD_GETFAMILY,
            &attribute(CTRL_ATTR_FAMILY_NAME, b"netdev\0"),
        )
        .map_err(|e| netlink_error("(resolving the family)", e))?
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
    let answers = socket
        .request(family, NLM_F_DUMP, NETDEV_CMD_DEV_GET, &[])
        .map_err(|e| netlink_error("for its devices", e))?;
    Ok(answers
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
        .collect())
}

/// The devices XDP_REDIRECT may send frames to now (`NETDEV_XDP_ACT_NDO_XMIT`), by ifindex.
pub fn redirect_targets() -> Result<Vec<u32>, PfError> {
    Ok(xdp_features()?
        .into_iter()
        .filter(|(_, features)| features & NETDEV_XDP_ACT_NDO_XMIT != 0)
        .map(|(ifindex, _)| ifindex)
        .collect())
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
