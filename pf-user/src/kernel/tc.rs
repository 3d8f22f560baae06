//! The egress hook on kernels without TCX (before 6.6): a `cls_bpf` filter in direct-action
//! mode on the interface's `clsact` qdisc, attached over rtnetlink. Unlike a TCX link, such a
//! filter is no BPF object: it cannot be pinned, and it stays attached after pf exits for as
//! long as the qdisc (and the interface) exists. pf pins the *program* instead and finds its
//! filter again by the program's id, which the kernel never gives to another program while
//! the pin holds it: so pf removes exactly its own filter, and nothing of anyone else's.

use std::io;

use super::netlink::{NLM_F_DUMP, Socket, attributes};

const RTM_GETTFILTER: u16 = 46;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)`: the clsact qdisc's egress hook.
const CLSACT_EGRESS: u32 = 0xffff_fff3;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`: its ingress hook (the trigger program's).
const CLSACT_INGRESS: u32 = 0xffff_fff2;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_ID: u16 = 11;

/// A filter on one of an interface's clsact hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClsactFilter {
    /// The filter's priority (lower runs first).
    pub priority: u16,
    /// Its handle within the priority (0 for the priority's own entry).
    pub handle: u32,
    /// The program it runs, for an eBPF filter.
    pub prog_id: Option<u32>,
}

/// The priority pf's filter takes on a hook holding `filters`: after all of them, as a TCX
/// link is appended after the links already there (the kernel's own choice would put it
/// first). 49152 on an empty hook, as the kernel would choose.
pub fn last_priority(filters: &[ClsactFilter]) -> Option<u16> {
    match filters.iter().map(|f| f.priority).max() {
        None => Some(0xc000),
        Some(max) => max.checked_add(1),
    }
}

/// The filters on `ifindex`'s clsact egress hook. None when the interface has no clsact qdisc
/// (ENOENT/EINVAL from the kernel mean just that).
pub fn egress_filters(ifindex: u32) -> io::Result<Vec<ClsactFilter>> {
    filters(ifindex, CLSACT_EGRESS)
}

/// The filters on `ifindex`'s clsact ingress hook, as [`egress_filters`].
pub fn ingress_filters(ifindex: u32) -> io::Result<Vec<ClsactFilter>> {
    filters(ifindex, CLSACT_INGRESS)
}

fn filters(ifindex: u32, hook: u32) -> io::Result<Vec<ClsactFilter>> {
    let mut socket = Socket::open(libc::NETLINK_ROUTE)?;
    // struct tcmsg: family, 3 bytes of padding, ifindex, handle, parent, info.
    let mut tcmsg = Vec::with_capacity(20);
    tcmsg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    tcmsg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    tcmsg.extend_from_slice(&0u32.to_ne_bytes());
    tcmsg.extend_from_slice(&hook.to_ne_bytes());
    tcmsg.extend_from_slice(&0u32.to_ne_bytes());
    let answers = match socket.request(RTM_GETTFILTER, NLM_F_DUMP, &tcmsg) {
        Ok(answers) => answers,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => Vec::new(),
        Err(e) => return Err(e),
    };
    Ok(answers.iter().filter_map(|a| parse_filter(a)).collect())
}

/// One RTM_NEWTFILTER answer, with its program's id if it is an eBPF filter.
fn parse_filter(answer: &[u8]) -> Option<ClsactFilter> {
    let tcmsg = answer.get(..20)?;
    let handle = u32::from_ne_bytes(tcmsg[8..12].try_into().unwrap());
    // tcm_info: the priority in the upper 16 bits, the protocol in the lower.
    let info = u32::from_ne_bytes(tcmsg[16..20].try_into().unwrap());
    let mut kind_is_bpf = false;
    let mut prog_id = None;
    for (kind, value) in attributes(&answer[20..]) {
        match kind {
            TCA_KIND => kind_is_bpf = value.strip_suffix(b"\0").unwrap_or(value) == b"bpf",
            TCA_OPTIONS => {
                prog_id = attributes(value)
                    .find(|(k, v)| *k == TCA_BPF_ID && v.len() == 4)
                    .map(|(_, v)| u32::from_ne_bytes(v.try_into().unwrap()));
            }
            _ => {}
        }
    }
    Some(ClsactFilter {
        priority: (info >> 16) as u16,
        handle,
        prog_id: prog_id.filter(|_| kind_is_bpf),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::netlink::attribute;

    fn answer(priority: u16, handle: u32, kind: &[u8], options: Vec<u8>) -> Vec<u8> {
        let mut a = vec![0u8; 20];
        a[8..12].copy_from_slice(&handle.to_ne_bytes());
        a[16..20].copy_from_slice(&((u32::from(priority) << 16) | 0x0300).to_ne_bytes());
        a.extend(attribute(TCA_KIND, kind));
        if !options.is_empty() {
            a.extend(attribute(TCA_OPTIONS, &options));
        }
        a
    }

    #[test]
    fn a_bpf_filter_is_read_with_its_priority_handle_and_program() {
        let options = [
            attribute(7, b"pf_egress\0"),
            attribute(TCA_BPF_ID, &42u32.to_ne_bytes()),
        ]
        .concat();
        assert_eq!(
            parse_filter(&answer(49152, 1, b"bpf\0", options)),
            Some(ClsactFilter {
                priority: 49152,
                handle: 1,
                prog_id: Some(42)
            })
        );
    }

    #[test]
    fn other_filters_and_placeholders_have_no_program() {
        let id = attribute(TCA_BPF_ID, &42u32.to_ne_bytes());
        let program = |a: &[u8]| parse_filter(a).map(|f| f.prog_id);
        assert_eq!(program(&answer(1, 1, b"u32\0", id.clone())), Some(None));
        assert_eq!(program(&answer(1, 0, b"bpf\0", Vec::new())), Some(None));
        assert_eq!(parse_filter(&[0u8; 10]), None);
    }

    #[test]
    fn pf_goes_after_every_filter_there() {
        let at = |priority| ClsactFilter {
            priority,
            handle: 1,
            prog_id: None,
        };
        assert_eq!(last_priority(&[]), Some(49152));
        assert_eq!(last_priority(&[at(1), at(2)]), Some(3));
        assert_eq!(last_priority(&[at(50000), at(1)]), Some(50001));
        assert_eq!(last_priority(&[at(u16::MAX)]), None);
    }
}
