//! The kernel's network interfaces as they come, change and go: rtnetlink's link group, which
//! `pf serve` follows to attach to a configured interface again when it is re-created and to
//! keep the fast paths' device maps current.

use std::{io, time::Duration};

use super::netlink::{Socket, attributes};

/// rtnetlink's multicast group of link events (`RTMGRP_LINK`).
const RTMGRP_LINK: u32 = 1;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const IFLA_IFNAME: u16 = 3;
/// `struct ifinfomsg`: family, pad, type (u16), index (i32), flags, change (u32).
const IFINFOMSG_LEN: usize = 16;

/// What happened to an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// It was created or changed (flags, addresses, XDP programs, a peer, ...).
    Changed { index: u32, name: String },
    /// It was deleted (or moved to another namespace).
    Gone { index: u32, name: String },
    /// The kernel dropped events (the socket's buffer was full): everything may have
    /// changed.
    Missed,
}

/// A subscription to link events.
pub struct LinkWatch {
    socket: Socket,
}

impl LinkWatch {
    /// Subscribes; [`LinkWatch::wait`] waits at most `timeout`.
    pub fn open(timeout: Duration) -> io::Result<Self> {
        Ok(Self {
            socket: Socket::subscribe(libc::NETLINK_ROUTE, RTMGRP_LINK, timeout)?,
        })
    }

    /// The events of the next datagram; none when the timeout passed first.
    pub fn wait(&mut self) -> io::Result<Vec<LinkEvent>> {
        match self.socket.receive() {
            Ok(messages) => Ok(messages
                .iter()
                .filter_map(|(kind, body)| parse(*kind, body))
                .collect()),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(vec![LinkEvent::Missed]),
            Err(e) => Err(e),
        }
    }
}

/// One link message as an event; `None` for other messages and malformed ones.
fn parse(kind: u16, body: &[u8]) -> Option<LinkEvent> {
    if !matches!(kind, RTM_NEWLINK | RTM_DELLINK) || body.len() < IFINFOMSG_LEN {
        return None;
    }
    let index = u32::from_ne_bytes(body[4..8].try_into().ok()?);
    let name = attributes(&body[IFINFOMSG_LEN..])
        .find(|(k, _)| *k == IFLA_IFNAME)
        .map(|(_, v)| {
            String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(v)).into_owned()
        })?;
    Some(if kind == RTM_NEWLINK {
        LinkEvent::Changed { index, name }
    } else {
        LinkEvent::Gone { index, name }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::netlink::attribute;

    fn message(index: u32, name: &[u8]) -> Vec<u8> {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        body.extend(attribute(IFLA_IFNAME, name));
        body
    }

    #[test]
    fn link_messages_become_events_and_others_nothing() {
        assert_eq!(
            parse(RTM_NEWLINK, &message(7, b"pub0\0")),
            Some(LinkEvent::Changed {
                index: 7,
                name: "pub0".into()
            })
        );
        assert_eq!(
            parse(RTM_DELLINK, &message(7, b"pub0\0")),
            Some(LinkEvent::Gone {
                index: 7,
                name: "pub0".into()
            })
        );
        // Another message type, a short body, no name: nothing.
        assert_eq!(parse(20, &message(7, b"pub0\0")), None);
        assert_eq!(parse(RTM_NEWLINK, &[0u8; 8]), None);
        assert_eq!(parse(RTM_NEWLINK, &[0u8; IFINFOMSG_LEN]), None);
    }
}
