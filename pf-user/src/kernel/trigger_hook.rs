//! Attaching the trigger program (port triggering, [`super::trigger`]) to a tunnel-side
//! interface's TC ingress, where the clients' packets arrive: `pf_trigger` for Ethernet frames
//! (a veth, a tap), `pf_trigger_l3` for devices without a link layer (WireGuard, tun). TC
//! works on all of them, XDP natively on none of the layer-3 ones.
//!
//! As for the egress hook ([`super::attach`]): a TCX link on 6.6 and newer, pinned as
//! `triggers/IFACE/tcx`; before that (Debian 12's 6.1) a `cls_bpf` filter on the clsact
//! qdisc's ingress hook, after every filter there, whose program is pinned as
//! `triggers/IFACE/netlink_ns<INODE>` and by whose id pf finds its filter again. The trigger
//! program never changes or drops a packet and answers "next" (`TC_ACT_UNSPEC`), so the
//! programs and filters after it see every packet as they would without it.

use std::io;

use aya::programs::{
    TcAttachType,
    links::{Link, PinnedLink},
    tc::SchedClassifierLink,
};

use super::{
    PfError,
    attach::{
        Health, TcAttach, attach_filter, attach_tcx, check_pins_consistent, kernel_version,
        netns_inode, resolve_tc, uses_pinned_maps,
    },
    bpffs::PinDir,
    bpfinfo, netdev,
    object::{Programs, chain},
    tc,
};

/// The pin of the trigger program's TCX link.
const TCX_PIN: &str = "tcx";
/// The pin of the trigger program where its hook is a netlink filter: this prefix and the
/// inode of the filter's network namespace.
const NETLINK_PIN: &str = "netlink_ns";

/// An interface with pf's trigger program, and what the kernel says of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TriggerAttachment {
    pub iface: String,
    pub health: Health,
    /// `Tcx` or `Netlink`, as its pins record (`Auto`: none found).
    pub hook: TcAttach,
}

fn netlink_pin(dir: &PinDir, iface: &str) -> Option<(std::path::PathBuf, u64)> {
    std::fs::read_dir(dir.trigger_links(iface))
        .ok()?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let inode = name.strip_prefix(NETLINK_PIN)?.parse().ok()?;
            Some((e.path(), inode))
        })
}

/// Attaches the trigger program to `iface`'s ingress; returns how (TCX or a netlink filter).
pub fn attach_trigger(dir: &PinDir, iface: &str, tc: TcAttach) -> Result<TcAttach, PfError> {
    if netdev::ifindex(iface).is_none() {
        return Err(PfError::UnknownInterface(iface.to_string()));
    }
    let tc = resolve_tc(tc, kernel_version()?)?;
    let ethernet = netdev::is_ethernet(iface)?;
    dir.prepare()?;
    let _lock = dir.lock(true)?;
    let pins = dir.trigger_links(iface);
    if pins.exists() {
        match check(dir, iface) {
            Health::Live | Health::Unknown(_) => {
                return Err(PfError::TriggerAlreadyAttached(iface.to_string()));
            }
            // Dead (the interface re-created, the maps replaced): replaced.
            Health::Dead(_) => remove(dir, iface)?,
        }
    }
    check_pins_consistent(dir)?;
    let mut programs = Programs::load(dir)?;
    programs.load_trigger(ethernet)?;
    std::fs::create_dir_all(&pins)
        .map_err(|e| PfError::io(format!("creating {}", pins.display()), e))?;
    let attached = attach_program(&mut programs, dir, iface, ethernet, tc).map_err(|detail| {
        let _ = std::fs::remove_dir(&pins);
        PfError::Attach {
            what: "the trigger program",
            iface: iface.to_string(),
            detail,
        }
    });
    attached.map(|()| tc)
}

fn attach_program(
    programs: &mut Programs,
    dir: &PinDir,
    iface: &str,
    ethernet: bool,
    tc: TcAttach,
) -> Result<(), String> {
    let program = programs.trigger_mut(ethernet);
    if tc == TcAttach::Netlink {
        let link = attach_filter(program, iface, TcAttachType::Ingress)?;
        let pin = netns_inode()
            .map(|inode| {
                dir.trigger_links(iface)
                    .join(format!("{NETLINK_PIN}{inode}"))
            })
            .map_err(|e| format!("reading this network namespace: {e}"))?;
        return match program.pin(pin) {
            // The filter stays when the link is forgotten; `remove` finds it by the pinned
            // program's id.
            Ok(()) => {
                std::mem::forget(link);
                Ok(())
            }
            Err(e) => {
                let _ = link.detach();
                Err(format!("pinning: {}", chain(&e)))
            }
        };
    }
    // Dropped unpinned on an error, which detaches it.
    attach_tcx(program, iface, TcAttachType::Ingress)?
        .pin(dir.trigger_links(iface).join(TCX_PIN))
        .map(drop)
        .map_err(|e| format!("pinning: {}", chain(&e)))
}

/// Detaches the trigger program from `iface` (an interface that is gone has its pins cleared).
pub fn detach_trigger(dir: &PinDir, iface: &str) -> Result<(), PfError> {
    if !dir.trigger_links(iface).exists() {
        return Err(PfError::TriggerNotAttached(iface.to_string()));
    }
    let _lock = dir.lock(true)?;
    remove(dir, iface)
}

/// Where pf's filter is: found by the pinned program's id among `iface`'s ingress filters.
enum FilterLookup {
    Found(tc::ClsactFilter),
    Gone,
    /// In another network namespace than the caller's, or its interface is gone.
    NotHere,
}

fn own_filter(pin: &std::path::Path, netns: u64, iface: &str) -> io::Result<FilterLookup> {
    let prog_id = bpfinfo::pinned_program_id(pin)?;
    if netns_inode()? != netns {
        return Ok(FilterLookup::NotHere);
    }
    let Some(ifindex) = netdev::ifindex(iface) else {
        return Ok(FilterLookup::NotHere);
    };
    Ok(tc::ingress_filters(ifindex)?
        .into_iter()
        .find(|f| f.prog_id == Some(prog_id))
        .map_or(FilterLookup::Gone, FilterLookup::Found))
}

/// Removes `iface`'s trigger attachment (the caller holds the exclusive lock): its filter and
/// program pin, or its TCX link, then the directory.
fn remove(dir: &PinDir, iface: &str) -> Result<(), PfError> {
    let pins = dir.trigger_links(iface);
    if let Some((pin, netns)) = netlink_pin(dir, iface) {
        let lookup = own_filter(&pin, netns, iface)
            .map_err(|e| PfError::io(format!("finding pf's trigger filter on {iface}"), e))?;
        match lookup {
            FilterLookup::Found(f) => SchedClassifierLink::attached(
                iface,
                TcAttachType::Ingress,
                f.priority,
                f.handle.into(),
                None,
            )
            .map_err(|e| PfError::io(format!("naming pf's trigger filter on {iface}"), e))?
            .detach()
            .map_err(|e| PfError::Attach {
                what: "the trigger program (removing its filter)",
                iface: iface.to_string(),
                detail: chain(&e),
            })?,
            FilterLookup::Gone => {}
            FilterLookup::NotHere if netdev::ifindex(iface).is_some() => {
                return Err(PfError::OtherNamespace(iface.to_string()));
            }
            FilterLookup::NotHere => {}
        }
        std::fs::remove_file(&pin)
            .map_err(|e| PfError::io(format!("removing {}", pin.display()), e))?;
    }
    let tcx = pins.join(TCX_PIN);
    if tcx.exists() {
        match PinnedLink::from_pin(&tcx) {
            Ok(link) => drop(
                link.unpin()
                    .map_err(|e| PfError::io(format!("removing {}", tcx.display()), e))?,
            ),
            Err(_) => std::fs::remove_file(&tcx)
                .map_err(|e| PfError::io(format!("removing {}", tcx.display()), e))?,
        }
    }
    std::fs::remove_dir(&pins).map_err(|e| PfError::io(format!("removing {}", pins.display()), e))
}

/// Asks the kernel whether `iface`'s trigger program is attached to it and uses the pinned
/// maps.
fn check(dir: &PinDir, iface: &str) -> Health {
    let prog_id = if let Some((pin, netns)) = netlink_pin(dir, iface) {
        match own_filter(&pin, netns, iface) {
            Ok(FilterLookup::Found(_) | FilterLookup::NotHere) => {}
            Ok(FilterLookup::Gone) => {
                return Health::Dead(format!(
                    "its TC filter is gone from {iface} (the interface was re-created, or its clsact qdisc removed)"
                ));
            }
            Err(e) => return Health::Unknown(format!("listing {iface}'s TC filters: {e}")),
        }
        match bpfinfo::pinned_program_id(&pin) {
            Ok(id) => id,
            Err(e) => return Health::Dead(format!("its program pin cannot be read: {e}")),
        }
    } else {
        let pin = dir.trigger_links(iface).join(TCX_PIN);
        let link = match bpfinfo::link_state(&pin) {
            Ok(link) => link,
            Err(e) => return Health::Dead(format!("its TCX link pin cannot be read: {e}")),
        };
        if link.ifindex == 0 {
            return Health::Dead(
                "the kernel detached its program (the interface was removed)".into(),
            );
        }
        if netdev::ifindex(iface).is_some_and(|now| now != link.ifindex) {
            return Health::Dead(format!(
                "its link is on ifindex {} but {iface} is another one now (the interface was re-created)",
                link.ifindex
            ));
        }
        link.prog_id
    };
    match uses_pinned_maps(dir, prog_id, "trigger") {
        Ok(()) => Health::Live,
        Err(health) => health,
    }
}

/// Every interface with pf's trigger program in `dir`, each checked with the kernel.
pub fn trigger_attachments(dir: &PinDir) -> Vec<TriggerAttachment> {
    dir.triggered_interfaces()
        .into_iter()
        .map(|iface| TriggerAttachment {
            health: check(dir, &iface),
            hook: if netlink_pin(dir, &iface).is_some() {
                TcAttach::Netlink
            } else if dir.trigger_links(&iface).join(TCX_PIN).exists() {
                TcAttach::Tcx
            } else {
                TcAttach::Auto
            },
            iface,
        })
        .collect()
}
