//! A minimal netlink client: one request at a time, its answers (a dump's or a single one)
//! returned as payloads. Used for generic netlink (the `netdev` family, [`super::netdev`]) and
//! rtnetlink (TC filters, [`super::tc`]), where aya has no public query.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

pub const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;

/// One netlink socket of one protocol (`NETLINK_GENERIC`, `NETLINK_ROUTE`).
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open(protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
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

    /// Sends a message of `msg_type` with `flags` (NLM_F_REQUEST is added) and `body` (the
    /// family's header, then attributes), and returns the body of every answer: all of a dump
    /// (`NLM_F_DUMP`) until its end, else the one answer. An acknowledged request with no
    /// answer (`NLM_F_ACK`) returns none. A kernel error is returned as its errno.
    pub fn request(&mut self, msg_type: u16, flags: u16, body: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        self.seq += 1;
        let len = NLMSG_HDRLEN + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&msg_type.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
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
        // A dump ends with NLMSG_DONE; a plain request with its one answer or an error message
        // (errno 0: an acknowledgement). Bounded: each datagram holds many answers.
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
            for Message {
                msg_type,
                flags: msg_flags,
                seq: msg_seq,
                body: answer,
            } in split(&buf[..n as usize])?
            {
                if msg_seq != self.seq {
                    continue;
                }
                // A dump that changed while it ran may be incomplete, and acting on a partial
                // list (of devices, of filters) would be wrong. Refuse it.
                if msg_flags & NLM_F_DUMP_INTR != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::Interrupted,
                        "the kernel's list changed during the dump; try again",
                    ));
                }
                match msg_type {
                    NLMSG_DONE | NLMSG_ERROR => {
                        let errno = answer
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                            .unwrap_or(0);
                        if errno < 0 {
                            return Err(io::Error::from_raw_os_error(-errno));
                        }
                        return Ok(answers);
                    }
                    _ => {
                        answers.push(answer.to_vec());
                        if flags & (NLM_F_DUMP | NLM_F_ACK) == 0 {
                            return Ok(answers);
                        }
                    }
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a netlink dump that does not end",
        ))
    }
}

impl Socket {
    /// A socket that receives the kernel's multicast `groups` of `protocol` (e.g. rtnetlink's
    /// `RTMGRP_LINK`), waiting at most `timeout` in [`Socket::receive`].
    pub fn subscribe(protocol: libc::c_int, groups: u32, timeout: Duration) -> io::Result<Self> {
        let socket = Self::open(protocol)?;
        // SAFETY: bind(2) with a zeroed sockaddr_nl naming the groups (pid 0: the kernel
        // assigns one).
        let bound = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            addr.nl_groups = groups;
            libc::bind(
                socket.fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        let timeout = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: a valid option value of the right size.
        unsafe {
            libc::setsockopt(
                socket.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        Ok(socket)
    }

    /// The next datagram's messages, as (type, body); none when the timeout passed first.
    /// `ENOBUFS` means the kernel dropped messages because the socket's buffer was full: the
    /// caller has missed events and must look at the whole state again.
    pub fn receive(&mut self) -> io::Result<Vec<(u16, Vec<u8>)>> {
        let mut buf = vec![0u8; 65536];
        // SAFETY: a valid buffer of `buf.len()` bytes.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(Vec::new()),
                _ => Err(e),
            };
        }
        Ok(split(&buf[..n as usize])?
            .into_iter()
            .map(|m| (m.msg_type, m.body.to_vec()))
            .collect())
    }
}

/// One netlink message: its header's fields and its body.
struct Message<'a> {
    msg_type: u16,
    flags: u16,
    seq: u32,
    body: &'a [u8],
}

/// The messages of one datagram; an error for one whose length runs past it.
fn split(mut rest: &[u8]) -> io::Result<Vec<Message<'_>>> {
    let mut messages = Vec::new();
    while rest.len() >= NLMSG_HDRLEN {
        let msg_len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
        if msg_len < NLMSG_HDRLEN || msg_len > rest.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a malformed netlink message",
            ));
        }
        messages.push(Message {
            msg_type: u16::from_ne_bytes(rest[4..6].try_into().unwrap()),
            flags: u16::from_ne_bytes(rest[6..8].try_into().unwrap()),
            seq: u32::from_ne_bytes(rest[8..12].try_into().unwrap()),
            body: &rest[NLMSG_HDRLEN..msg_len],
        });
        rest = &rest[align4(msg_len).min(rest.len())..];
    }
    Ok(messages)
}

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes in `payload`, as (type, value).
pub fn attributes(mut payload: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
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

/// One attribute, padded to four bytes.
pub fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(align4(4 + value.len()));
    a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(value);
    a.resize(align4(a.len()), 0);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_and_stop_at_a_bad_length() {
        let mut payload = attribute(1, b"bpf\0");
        payload.extend(attribute(11, &7u32.to_ne_bytes()));
        let got: Vec<(u16, Vec<u8>)> = attributes(&payload).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(
            got,
            [(1, b"bpf\0".to_vec()), (11, 7u32.to_ne_bytes().to_vec())]
        );
        // A length past the end ends the walk instead of reading beyond it.
        payload.extend_from_slice(&[200, 0, 2, 0]);
        assert_eq!(attributes(&payload).count(), 2);
    }
}
