//! Attaching pf's programs to an interface, and what the kernel says of an attachment.
//!
//! `pf attach IFACE` loads the programs (their maps are the pinned ones, shared by every
//! interface), attaches XDP to the interface's ingress and the TC program to its egress, and
//! pins both under `<pin dir>/links/IFACE/`: a pinned link stays attached after `pf` exits, and
//! `pf detach IFACE` unpins it, which detaches it. The XDP link's pin name says which program it
//! runs ([`Role`]), so `pf stats` and `pf detach` know without asking the kernel.
//!
//! The egress hook is a TCX link where the kernel has TCX (6.6), pinned as `tc`; before that a
//! `cls_bpf` filter on the clsact qdisc ([`super::tc`]), which is no BPF object: its program is
//! pinned as `tc_netlink_ns<INODE>` instead (the filter's network namespace), and the filter
//! found again by that program's id.
//!
//! Every attach, detach and `pf refresh` also refills the fast paths' device maps from what the
//! kernel says at that moment ([`refresh_devices`]).

use std::{error::Error, fmt, io, str::FromStr};

use aya::{
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, XdpMode,
        links::{FdLink, Link, LinkError, PinnedLink},
        tc::{self as aya_tc, NlOptions, SchedClassifierLink, TcAttachOptions},
    },
    util::KernelVersion,
};

use super::{
    bpffs::PinDir,
    bpfinfo,
    error::PfError,
    netdev,
    object::{FAST_INGRESS_PROGRAM, INGRESS_PROGRAM, Programs, REPLY_PROGRAM, chain},
    state::State,
    tc,
};

/// Loads what `role` attaches.
fn load_for(dir: &PinDir, role: Role) -> Result<Programs, PfError> {
    let mut programs = Programs::load(dir)?;
    match role {
        Role::Public => {}
        Role::PublicFastPath | Role::TunnelSide => programs.load_xdp(role.xdp_program())?,
    }
    Ok(programs)
}

/// The pin of the egress TCX link.
const TC_LINK: &str = "tc";
/// The pin of the egress program, where its hook is a netlink filter (no link to pin), is
/// this prefix and the inode of the network namespace the filter is in: netlink answers only
/// for the caller's namespace, and an interface of the same name elsewhere is another one.
const TC_NETLINK_PROGRAM: &str = "tc_netlink_ns";

/// The calling thread's network namespace, by inode.
pub(super) fn netns_inode() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
}

/// `iface`'s egress program pin, where its hook is a netlink filter, and the namespace it
/// records.
fn netlink_pin(dir: &PinDir, iface: &str) -> Option<(std::path::PathBuf, u64)> {
    std::fs::read_dir(dir.iface_links(iface))
        .ok()?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let inode = name.strip_prefix(TC_NETLINK_PROGRAM)?.parse().ok()?;
            Some((e.path(), inode))
        })
}

/// The oldest kernel pf runs on, and why: the newest of the features it cannot do without.
/// - 5.9: XDP attached by a BPF link (pinned, so it outlives pf; its ifindex readable).
/// - 5.6: batched hash map updates (a range or a restart's reconcile in one call).
/// - 5.4: device hash maps (the fast paths' redirect targets).
/// - 5.10: the first long-term kernel with all of the above.
///
/// Optional, with a fallback below them: TCX (6.6; else a netlink `cls_bpf` filter) and the
/// `netdev` generic-netlink family (6.3; else the fast path's devices are named by the admin).
pub const MIN_KERNEL: (u8, u8) = (5, 10);
/// TCX, for the egress program, came in 6.6.
const TCX_KERNEL: (u8, u8) = (6, 6);

/// How to attach the TC egress program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcAttach {
    /// TCX where the kernel has it (6.6 and newer), else netlink.
    #[default]
    Auto,
    /// A TCX link (6.6 and newer).
    Tcx,
    /// A `cls_bpf` filter in direct-action mode on the clsact qdisc, over netlink: what tools
    /// that list `tc filter show` see, and the only way before 6.6.
    Netlink,
}

impl FromStr for TcAttach {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(TcAttach::Auto),
            "tcx" => Ok(TcAttach::Tcx),
            "netlink" => Ok(TcAttach::Netlink),
            other => Err(format!(
                "unknown TC attach method '{other}' (expected auto, tcx or netlink)"
            )),
        }
    }
}

impl fmt::Display for TcAttach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcAttach::Auto => "auto",
            TcAttach::Tcx => "tcx",
            TcAttach::Netlink => "netlink",
        })
    }
}

/// The running kernel, refused below [`MIN_KERNEL`] with what it lacks.
pub(super) fn kernel_version() -> Result<KernelVersion, PfError> {
    let kernel = KernelVersion::current()
        .map_err(|e| PfError::Load(format!("reading the kernel version: {e}")))?;
    if kernel < KernelVersion::new(MIN_KERNEL.0, MIN_KERNEL.1, 0) {
        return Err(PfError::KernelTooOld(kernel.to_string()));
    }
    Ok(kernel)
}

/// `tc` made definite for `kernel`.
pub(super) fn resolve_tc(tc: TcAttach, kernel: KernelVersion) -> Result<TcAttach, PfError> {
    let has_tcx = kernel >= KernelVersion::new(TCX_KERNEL.0, TCX_KERNEL.1, 0);
    match tc {
        TcAttach::Auto if has_tcx => Ok(TcAttach::Tcx),
        TcAttach::Auto => Ok(TcAttach::Netlink),
        TcAttach::Tcx if !has_tcx => Err(PfError::NoTcx(kernel.to_string())),
        definite => Ok(definite),
    }
}

/// How to attach the XDP program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode if the driver supports it, else generic (skb) mode.
    #[default]
    Auto,
    /// Native mode only: fail if the driver has no XDP support.
    Native,
    /// Generic mode: works on any device, at the cost of an skb per packet.
    Skb,
}

impl FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AttachMode::Auto),
            "native" => Ok(AttachMode::Native),
            "skb" => Ok(AttachMode::Skb),
            other => Err(format!(
                "unknown mode '{other}' (expected auto, native or skb)"
            )),
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Auto => "auto",
            AttachMode::Native => "native",
            AttachMode::Skb => "skb",
        })
    }
}

/// What pf does on an interface it is attached to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// A public interface: XDP rewrites and passes to the kernel, TC egress rewrites replies.
    #[default]
    Public,
    /// A public interface with the ingress fast path (`--fast-path`): rewritten packets leave by
    /// XDP_REDIRECT where they can, bypassing the kernel's forwarding path and netfilter; TC
    /// egress as with [`Role::Public`].
    PublicFastPath,
    /// An Ethernet-like tunnel-side interface (`--tunnel-side`): the reply fast path only.
    TunnelSide,
}

impl Role {
    const ALL: [Role; 3] = [Role::Public, Role::PublicFastPath, Role::TunnelSide];

    fn xdp_program(self) -> &'static str {
        match self {
            Role::Public => INGRESS_PROGRAM,
            Role::PublicFastPath => FAST_INGRESS_PROGRAM,
            Role::TunnelSide => REPLY_PROGRAM,
        }
    }

    /// The pin name of the XDP link, which records the role.
    fn xdp_link(self) -> &'static str {
        match self {
            Role::Public => "xdp",
            Role::PublicFastPath => "xdp_fast",
            Role::TunnelSide => "xdp_reply",
        }
    }

    /// Whether the role has the TC egress program too.
    fn has_egress(self) -> bool {
        self != Role::TunnelSide
    }

    /// How `pf stats` names it.
    pub fn describe(self) -> &'static str {
        match self {
            Role::Public => "public",
            Role::PublicFastPath => "public, fast path",
            Role::TunnelSide => "tunnel side, reply fast path",
        }
    }
}

fn interface_exists(iface: &str) -> bool {
    netdev::ifindex(iface).is_some()
}

pub(super) fn os_error(e: &(dyn Error + 'static)) -> Option<i32> {
    let mut source: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return io.raw_os_error();
        }
        source = err.source();
    }
    None
}

/// Fails unless every map is pinned or none is (a half-made state must not be extended).
pub(super) fn check_pins_consistent(dir: &PinDir) -> Result<(), PfError> {
    let pinned = pf_common::map_names::ALL
        .iter()
        .filter(|n| dir.map(n).exists())
        .count();
    if pinned != 0 && pinned != pf_common::map_names::ALL.len() {
        return Err(PfError::PartialState(dir.root().to_path_buf()));
    }
    Ok(())
}

/// What `attach` did.
#[derive(Clone, Debug)]
pub struct Attached {
    /// The XDP mode used: "native" or "skb".
    pub xdp_mode: &'static str,
    /// How the egress program was attached (`Tcx` or `Netlink`; `Auto` for a role without it).
    pub tc: TcAttach,
    /// Why pins found on the interface were dead and replaced, if there were any.
    pub replaced: Option<String>,
    /// The fast paths' device maps afterwards.
    pub devices: FastPathDevices,
}

impl Attached {
    /// How the egress program was attached, in words; None for a role without it.
    pub fn egress_hook(&self) -> Option<&'static str> {
        match self.tc {
            TcAttach::Auto => None,
            TcAttach::Tcx => Some("TCX"),
            TcAttach::Netlink => Some("a netlink filter"),
        }
    }
}

/// The devices in the fast paths' device maps, by name (or `#ifindex` for one that is gone).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FastPathDevices {
    /// `REDIRECT_DEVICES`: where the ingress fast path may send packets.
    pub redirect: Vec<String>,
    /// `PUBLIC_DEVICES`: where the reply fast path may send replies.
    pub public: Vec<String>,
    /// The kernel cannot say which devices take XDP frames (before 6.3): the admin named them.
    pub named: bool,
}

impl FastPathDevices {
    /// What the maps of an open `state` hold.
    pub fn read(state: &State) -> Result<Self, PfError> {
        let (redirect, public) = state.fast_path_devices()?;
        Ok(Self::from_ifindexes(&redirect, &public))
    }

    fn from_ifindexes(redirect: &[u32], public: &[u32]) -> Self {
        let names = |ifindexes: &[u32]| {
            ifindexes
                .iter()
                .map(|&i| netdev::ifname(i).unwrap_or_else(|| format!("#{i}")))
                .collect()
        };
        Self {
            redirect: names(redirect),
            public: names(public),
            named: false,
        }
    }
}

/// Which devices the fast paths may redirect to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// What the kernel says (the `netdev` family, Linux 6.3 and newer). On a kernel without it,
    /// the devices named before are kept (those that still exist).
    #[default]
    Kernel,
    /// Named by the admin, for a kernel that cannot say (before 6.3); refused on one that can.
    Named(Vec<String>),
}

/// How to attach.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttachOptions {
    pub mode: AttachMode,
    pub role: Role,
    pub tc: TcAttach,
    pub devices: DeviceChoice,
}

/// The fast paths' redirect targets by ifindex, as `choice` and the kernel decide; `current`
/// is what `REDIRECT_DEVICES` holds now. `Ok(None)` from `netdev::redirect_targets` means the
/// kernel has no netdev family: then the admin's names rule, and pf never guesses.
fn redirect_devices(
    kernel: Option<Vec<u32>>,
    choice: &DeviceChoice,
    current: &[u32],
) -> Result<(Vec<u32>, bool), PfError> {
    match (kernel, choice) {
        (Some(capable), DeviceChoice::Kernel) => Ok((capable, false)),
        (Some(_), DeviceChoice::Named(_)) => Err(PfError::DevicesFromKernel),
        (None, DeviceChoice::Named(names)) => names
            .iter()
            .map(|n| {
                let ifindex =
                    netdev::ifindex(n).ok_or_else(|| PfError::UnknownInterface(n.clone()))?;
                // A layer-3 device (WireGuard, tun) can never take an XDP frame.
                if !netdev::is_ethernet(n)? {
                    return Err(PfError::CannotTakeRedirects(n.clone()));
                }
                Ok(ifindex)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|named| (named, true)),
        (None, DeviceChoice::Kernel) => Ok((
            current
                .iter()
                .copied()
                .filter(|&i| netdev::ifname(i).is_some())
                .collect(),
            true,
        )),
    }
}

/// Attaches pf to `iface` as `options` say.
pub fn attach(dir: &PinDir, iface: &str, options: &AttachOptions) -> Result<Attached, PfError> {
    let AttachOptions {
        mode,
        role,
        tc,
        ref devices,
    } = *options;
    if !interface_exists(iface) {
        return Err(PfError::UnknownInterface(iface.to_string()));
    }
    if role == Role::TunnelSide && !netdev::is_ethernet(iface)? {
        return Err(PfError::NotEthernet(iface.to_string()));
    }
    let tc = if role.has_egress() {
        resolve_tc(tc, kernel_version()?)?
    } else {
        kernel_version()?;
        TcAttach::Auto
    };
    // The device maps are refilled after attaching (attaching XDP can make a NIC a redirect
    // target); asking once before catches a kernel that cannot answer, or names that are not
    // wanted, while nothing changed.
    redirect_devices(netdev::redirect_targets()?, devices, &[])?;
    dir.prepare()?;
    let lock = dir.lock(true)?;
    // Pins are what pf left, not proof that anything is attached: the kernel decides. A dead
    // attachment (its device removed, its link unpinned, its programs reading maps that are
    // no longer pinned) is replaced.
    let mut replaced = None;
    if link_pins(dir, iface).iter().any(|p| p.exists()) {
        match check_attachment(dir, iface, role_of(dir, iface)) {
            Health::Live | Health::Unknown(_) => {
                return Err(PfError::AlreadyAttached(iface.to_string()));
            }
            Health::Dead(reason) => {
                remove_links(dir, iface)?;
                replaced = Some(reason);
            }
        }
    }
    check_pins_consistent(dir)?;
    let mut programs = load_for(dir, role)?;
    let iface_dir = dir.iface_links(iface);
    std::fs::create_dir_all(&iface_dir)
        .map_err(|e| PfError::io(format!("creating {}", iface_dir.display()), e))?;
    let xdp_mode = match attach_programs(&mut programs, dir, iface, mode, role, tc) {
        Ok(used) => used,
        Err(e) => {
            let _ = std::fs::remove_dir(&iface_dir);
            return Err(e);
        }
    };
    // The programs are attached and pinned; the maps exist (loading the object pinned them).
    drop(programs);
    match refresh_locked(dir, &lock, devices) {
        Ok(devices) => Ok(Attached {
            xdp_mode,
            tc,
            replaced,
            devices,
        }),
        Err(e) => {
            // An attach that cannot fill the device maps changes nothing: its links go again,
            // under the lock still held.
            match remove_links(dir, iface) {
                Ok(()) => Err(e),
                Err(undo) => Err(PfError::Attach {
                    what: "the fast paths' device maps",
                    iface: iface.to_string(),
                    detail: format!("{e}; removing the links again failed too: {undo}"),
                }),
            }
        }
    }
}

fn attach_programs(
    programs: &mut Programs,
    dir: &PinDir,
    iface: &str,
    mode: AttachMode,
    role: Role,
    tc: TcAttach,
) -> Result<&'static str, PfError> {
    let xdp_pin = dir.link(iface, role.xdp_link());
    let attempts: &[(XdpMode, &'static str)] = match mode {
        AttachMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "skb")],
        AttachMode::Native => &[(XdpMode::Driver, "native")],
        AttachMode::Skb => &[(XdpMode::Skb, "skb")],
    };
    let mut used = None;
    let mut last_error = String::new();
    for &(xdp_mode, name) in attempts {
        match programs.xdp_mut(role.xdp_program()).attach(iface, xdp_mode) {
            Ok(id) => {
                used = Some((id, name));
                break;
            }
            Err(e) if matches!(os_error(&e), Some(libc::EBUSY | libc::EEXIST)) => {
                return Err(PfError::XdpBusy {
                    iface: iface.to_string(),
                });
            }
            Err(e) => last_error = format!("{name} mode: {}", chain(&e)),
        }
    }
    let Some((xdp_id, used_mode)) = used else {
        return Err(PfError::Attach {
            what: "the XDP program",
            iface: iface.to_string(),
            detail: last_error,
        });
    };
    let attach_err = |what: &'static str| {
        move |detail: String| PfError::Attach {
            what,
            iface: iface.to_string(),
            detail,
        }
    };
    let xdp_link: FdLink = programs
        .xdp_mut(role.xdp_program())
        .take_link(xdp_id)
        .map_err(|e| chain(&e))
        .and_then(|l| l.try_into().map_err(|e: LinkError| chain(&e)))
        .map_err(attach_err("the XDP program"))?;

    // Until everything is pinned, dropping the links (on any error below) detaches them again.
    let egress = if role.has_egress() {
        Some(attach_egress(programs, iface, tc).map_err(attach_err("the TC egress program"))?)
    } else {
        None
    };

    let pinned_xdp = xdp_link
        .pin(&xdp_pin)
        .map_err(|e| chain(&e))
        .map_err(attach_err("the XDP link (pinning)"))?;
    let pinned = match egress {
        None => Ok(()),
        Some(Egress::Tcx(link)) => link
            .pin(dir.link(iface, TC_LINK))
            .map(drop)
            .map_err(|e| chain(&e)),
        Some(Egress::Netlink(link)) => {
            let pin = netns_inode()
                .map(|inode| dir.link(iface, &format!("{TC_NETLINK_PROGRAM}{inode}")))
                .map_err(|e| format!("reading this network namespace: {e}"));
            match pin.and_then(|pin| programs.egress_mut().pin(pin).map_err(|e| chain(&e))) {
                // The filter stays when the link is forgotten: nothing detaches it but
                // `remove_links`, which finds it by the pinned program's id.
                Ok(()) => {
                    std::mem::forget(link);
                    Ok(())
                }
                Err(e) => {
                    let _ = link.detach();
                    Err(e)
                }
            }
        }
    };
    if let Err(e) = pinned {
        let _ = pinned_xdp.unpin();
        return Err(attach_err("the TC egress program (pinning)")(e));
    }
    Ok(used_mode)
}

/// The egress hook, attached and not yet pinned.
enum Egress {
    Tcx(FdLink),
    Netlink(SchedClassifierLink),
}

fn attach_egress(programs: &mut Programs, iface: &str, tc: TcAttach) -> Result<Egress, String> {
    let egress = programs.egress_mut();
    if tc == TcAttach::Netlink {
        return attach_filter(egress, iface, TcAttachType::Egress).map(Egress::Netlink);
    }
    attach_tcx(egress, iface, TcAttachType::Egress).map(Egress::Tcx)
}

/// Attaches `program` to `iface`'s clsact `hook` as a netlink `cls_bpf` filter, after every
/// filter already there (as a TCX link is appended last); its link, not pinned.
pub(super) fn attach_filter(
    program: &mut SchedClassifier,
    iface: &str,
    hook: TcAttachType,
) -> Result<SchedClassifierLink, String> {
    // clsact holds the ingress and egress filter hooks; another tool may have added it.
    if let Err(e) = aya_tc::qdisc_add_clsact(iface)
        && os_error(&e) != Some(libc::EEXIST)
    {
        return Err(format!("adding the clsact qdisc: {}", chain(&e)));
    }
    let ifindex = netdev::ifindex(iface).ok_or_else(|| format!("{iface} is gone"))?;
    let (filters, name) = match hook {
        TcAttachType::Ingress => (tc::ingress_filters(ifindex), "ingress"),
        _ => (tc::egress_filters(ifindex), "egress"),
    };
    let filters = filters.map_err(|e| format!("listing the {name} filters on {iface}: {e}"))?;
    let priority = tc::last_priority(&filters)
        .ok_or_else(|| format!("{iface}'s {name} hook has a filter at the last priority"))?;
    let id = program
        .attach_with_options(
            iface,
            hook,
            TcAttachOptions::Netlink(NlOptions {
                priority,
                ..NlOptions::default()
            }),
        )
        .map_err(|e| chain(&e))?;
    program.take_link(id).map_err(|e| chain(&e))
}

/// Attaches `program` to `iface`'s `hook` as a TCX link, after the links already there; not
/// pinned (dropped, it detaches).
pub(super) fn attach_tcx(
    program: &mut SchedClassifier,
    iface: &str,
    hook: TcAttachType,
) -> Result<FdLink, String> {
    let id = program
        .attach_with_options(iface, hook, TcAttachOptions::TcxOrder(LinkOrder::default()))
        .map_err(|e| chain(&e))?;
    program
        .take_link(id)
        .map_err(|e| chain(&e))
        .and_then(|l| l.try_into().map_err(|e: LinkError| chain(&e)))
}

/// The role pf is attached to `iface` in, read from its XDP link's pin name.
fn role_of(dir: &PinDir, iface: &str) -> Option<Role> {
    Role::ALL
        .into_iter()
        .find(|r| dir.link(iface, r.xdp_link()).exists())
}

/// Refills the fast paths' device maps from what the kernel says now: `REDIRECT_DEVICES` gets
/// every device of the namespace that can take XDP frames (`NETDEV_XDP_ACT_NDO_XMIT`), and
/// `PUBLIC_DEVICES` those of them pf is attached to with `--fast-path`. A device that cannot
/// take frames (WireGuard, tun, a veth whose peer has neither XDP nor GRO) is left out, and
/// packets routed to it take the kernel's path. Run by every attach and detach, and by
/// `pf refresh` after interfaces change.
///
/// Before Linux 6.3 the kernel cannot say which devices take XDP frames: then `REDIRECT_DEVICES`
/// holds the devices the admin names (`choice`), or keeps those named before.
pub fn refresh_devices(dir: &PinDir, choice: &DeviceChoice) -> Result<FastPathDevices, PfError> {
    if !dir.exists() || !dir.map(pf_common::map_names::REDIRECT_DEVICES).exists() {
        // Nothing to fill yet; names that will be refused later are refused now.
        redirect_devices(netdev::redirect_targets()?, choice, &[])?;
        return Ok(FastPathDevices::default());
    }
    let lock = dir.lock(true)?;
    refresh_locked(dir, &lock, choice)
}

/// The refresh, under the exclusive lock the caller holds (`lock` is a handle on it; the lock
/// stays held as long as the caller's own handle does).
fn refresh_locked(
    dir: &PinDir,
    lock: &std::fs::File,
    choice: &DeviceChoice,
) -> Result<FastPathDevices, PfError> {
    let kernel = netdev::redirect_targets()?;
    let lock = lock
        .try_clone()
        .map_err(|e| PfError::io("duplicating the pin directory's lock", e))?;
    let mut state = State::open_maps(dir, lock)?;
    let (current, _) = state.fast_path_devices()?;
    let (redirect, named) = redirect_devices(kernel, choice, &current)?;
    let public: Vec<u32> = inspect(dir)
        .into_iter()
        .filter(|a| a.role == Role::PublicFastPath && a.health.is_live())
        .filter_map(|a| netdev::ifindex(&a.iface))
        .filter(|i| redirect.contains(i))
        .collect();
    state.set_fast_path_devices(&redirect, &public)?;
    Ok(FastPathDevices {
        named,
        ..FastPathDevices::read(&state)?
    })
}

/// Detaches pf from `iface` by unpinning its links. Works for an interface that has gone too
/// (its pins are cleared).
pub fn detach(dir: &PinDir, iface: &str) -> Result<(), PfError> {
    if !dir.exists() || !link_pins(dir, iface).iter().any(|p| p.exists()) {
        return Err(if interface_exists(iface) {
            PfError::NotAttached(iface.to_string())
        } else {
            PfError::UnknownInterface(iface.to_string())
        });
    }
    let lock = dir.lock(true)?;
    // Asked before anything is removed, so a kernel that cannot answer changes nothing.
    redirect_devices(netdev::redirect_targets()?, &DeviceChoice::Kernel, &[])?;
    remove_links(dir, iface)?;
    // A detached public interface leaves PUBLIC_DEVICES; with maps only half made (an attach
    // that failed early), there is nothing to refresh.
    if pf_common::map_names::ALL
        .iter()
        .all(|n| dir.map(n).exists())
    {
        refresh_locked(dir, &lock, &DeviceChoice::Kernel)?;
    }
    Ok(())
}

/// Every pin `iface` may have (links, and the egress program where its hook is a filter).
fn link_pins(dir: &PinDir, iface: &str) -> Vec<std::path::PathBuf> {
    Role::ALL
        .iter()
        .map(|r| dir.link(iface, r.xdp_link()))
        .chain([dir.link(iface, TC_LINK)])
        .chain(netlink_pin(dir, iface).map(|(pin, _)| pin))
        .collect()
}

/// Where pf's egress filter on an interface is, as this network namespace sees it.
enum EgressFilterLookup {
    Found(tc::ClsactFilter),
    /// The interface is here, the filter is not.
    Gone,
    /// The filter is in another network namespace than the caller's (netlink, unlike a BPF
    /// link, answers only for the caller's), or its interface is gone.
    NotHere,
}

/// Looks for `iface`'s egress filter running the program pinned at `pin`, in the namespace
/// `netns` (an inode) the pin records.
fn own_egress_filter(
    pin: &std::path::Path,
    netns: u64,
    iface: &str,
) -> io::Result<EgressFilterLookup> {
    let prog_id = bpfinfo::pinned_program_id(pin)?;
    if netns_inode()? != netns {
        return Ok(EgressFilterLookup::NotHere);
    }
    let Some(ifindex) = netdev::ifindex(iface) else {
        return Ok(EgressFilterLookup::NotHere);
    };
    Ok(tc::egress_filters(ifindex)?
        .into_iter()
        .find(|f| f.prog_id == Some(prog_id))
        .map_or(EgressFilterLookup::Gone, EgressFilterLookup::Found))
}

/// Deletes pf's own egress filter on `iface` (found by the program pinned at `pin`), then the
/// pin. A filter already gone leaves just the pin to remove; one on an interface in another
/// namespace is refused (removing the pin alone would leave the filter running there). Run
/// before the XDP link is unpinned: that link says whether the interface still exists.
///
/// The filter is named by (priority, handle) after the dump that found it by program id;
/// another tool could in principle replace it in between, which this cannot see.
fn remove_egress_filter(
    dir: &PinDir,
    pin: &std::path::Path,
    netns: u64,
    iface: &str,
) -> Result<(), PfError> {
    let lookup = own_egress_filter(pin, netns, iface)
        .map_err(|e| PfError::io(format!("finding pf's TC filter on {iface}"), e))?;
    match lookup {
        EgressFilterLookup::Found(f) => SchedClassifierLink::attached(
            iface,
            TcAttachType::Egress,
            f.priority,
            f.handle.into(),
            None,
        )
        .map_err(|e| PfError::io(format!("naming pf's TC filter on {iface}"), e))?
        .detach()
        .map_err(|e| PfError::Attach {
            what: "the TC egress program (removing its filter)",
            iface: iface.to_string(),
            detail: chain(&e),
        })?,
        EgressFilterLookup::Gone => {}
        EgressFilterLookup::NotHere => {
            let lives_elsewhere = Role::ALL.iter().any(|r| {
                bpfinfo::link_state(&dir.link(iface, r.xdp_link())).is_ok_and(|l| l.ifindex != 0)
            });
            if lives_elsewhere {
                return Err(PfError::OtherNamespace(iface.to_string()));
            }
        }
    }
    std::fs::remove_file(pin).map_err(|e| PfError::io(format!("removing {}", pin.display()), e))
}

/// Unpins `iface`'s links, which detaches them, and removes its link directory. The caller
/// holds the exclusive lock.
fn remove_links(dir: &PinDir, iface: &str) -> Result<(), PfError> {
    if let Some((pin, netns)) = netlink_pin(dir, iface) {
        remove_egress_filter(dir, &pin, netns, iface)?;
    }
    for pin in link_pins(dir, iface).iter().filter(|p| p.exists()) {
        match PinnedLink::from_pin(pin) {
            // Unpinning drops the last reference once this FdLink is dropped: the link detaches.
            Ok(link) => drop(
                link.unpin()
                    .map_err(|e| PfError::io(format!("removing {}", pin.display()), e))?,
            ),
            Err(_) => std::fs::remove_file(pin)
                .map_err(|e| PfError::io(format!("removing {}", pin.display()), e))?,
        }
    }
    let iface_dir = dir.iface_links(iface);
    std::fs::remove_dir(&iface_dir)
        .map_err(|e| PfError::io(format!("removing {}", iface_dir.display()), e))
}

/// Interfaces pf has pins for in `dir`, each with its role (an interface whose pins are
/// incomplete, from an attach that was interrupted, counts as public). Pins only: see
/// [`inspect`] for what the kernel says.
pub fn attachments(dir: &PinDir) -> Vec<(String, Role)> {
    dir.linked_interfaces()
        .into_iter()
        .map(|iface| {
            let role = role_of(dir, &iface).unwrap_or(Role::Public);
            (iface, role)
        })
        .collect()
}

/// Whether an attachment pf pinned is really there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Every link is attached to the interface, and its program uses the pinned maps.
    Live,
    /// Why it is not: pf forwards nothing through it. `pf attach` and `pf serve` replace it.
    Dead(String),
    /// The kernel could not say (a query failed): taken as live, never replaced on a guess.
    Unknown(String),
}

impl Health {
    /// Live, or not known to be dead.
    pub fn is_live(&self) -> bool {
        !matches!(self, Health::Dead(_))
    }
}

/// An interface pf has pins for, and what the kernel says of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub iface: String,
    pub role: Role,
    pub health: Health,
    /// How its egress program is attached, as its pins record: `Tcx`, `Netlink`, or `Auto` for
    /// none (a tunnel-side interface, or a pin missing).
    pub egress: TcAttach,
}

/// The id of the XDP program pf has attached to `iface` (as its pinned link says), if any.
pub fn ingress_program_id(dir: &PinDir, iface: &str) -> Option<u32> {
    let role = role_of(dir, iface)?;
    bpfinfo::link_state(&dir.link(iface, role.xdp_link()))
        .ok()
        .filter(|l| l.ifindex != 0)
        .map(|l| l.prog_id)
}

/// Every interface pf has pins for in `dir`, each checked with the kernel.
pub fn inspect(dir: &PinDir) -> Vec<Attachment> {
    dir.linked_interfaces()
        .into_iter()
        .map(|iface| {
            let found = role_of(dir, &iface);
            let health = check_attachment(dir, &iface, found);
            let egress = if netlink_pin(dir, &iface).is_some() {
                TcAttach::Netlink
            } else if dir.link(&iface, TC_LINK).exists() {
                TcAttach::Tcx
            } else {
                TcAttach::Auto
            };
            Attachment {
                role: found.unwrap_or(Role::Public),
                health,
                egress,
                iface,
            }
        })
        .collect()
}

/// The kernel names a map by at most 15 characters of its name.
const BPF_OBJ_NAME_MAX: usize = 15;

/// Asks the kernel whether `iface`'s pinned links are attached to it, and whether their
/// programs use the maps pinned in `dir` (a program keeps the maps it was loaded with; if
/// those pins were removed and the maps made anew, reservations written there are never
/// read).
fn check_attachment(dir: &PinDir, iface: &str, role: Option<Role>) -> Health {
    let Some(role) = role else {
        return Health::Dead("its XDP link is not pinned".into());
    };
    let current = netdev::ifindex(iface);
    // (pin, hook, link type; the namespace of a netlink filter's program pin)
    let mut hooks = vec![(
        dir.link(iface, role.xdp_link()),
        "XDP",
        bpfinfo::LINK_TYPE_XDP,
        None,
    )];
    if role.has_egress() {
        match netlink_pin(dir, iface) {
            Some((pin, netns)) => hooks.push((pin, "TC", 0, Some(netns))),
            None => hooks.push((dir.link(iface, TC_LINK), "TC", bpfinfo::LINK_TYPE_TCX, None)),
        }
    }
    for (pin, hook, link_type, netns) in hooks {
        if !pin.exists() {
            return Health::Dead(format!("its {hook} link is not pinned"));
        }
        let prog_id = if let Some(netns) = netns {
            match own_egress_filter(&pin, netns, iface) {
                Ok(EgressFilterLookup::Found(_)) => {}
                Ok(EgressFilterLookup::Gone) => {
                    return Health::Dead(format!(
                        "its TC filter is gone from {iface} (the interface was re-created, or its clsact qdisc removed)"
                    ));
                }
                // In another namespace: the XDP link, checked first, says it is there.
                Ok(EgressFilterLookup::NotHere) => {}
                Err(e) => return Health::Unknown(format!("listing {iface}'s TC filters: {e}")),
            }
            match bpfinfo::pinned_program_id(&pin) {
                Ok(id) => id,
                Err(e) => return Health::Dead(format!("its TC program pin cannot be read: {e}")),
            }
        } else {
            let link = match bpfinfo::link_state(&pin) {
                Ok(link) => link,
                Err(e) => {
                    return Health::Dead(format!("its {hook} link pin cannot be read: {e}"));
                }
            };
            if link.link_type != link_type {
                return Health::Dead(format!("{} is not a {hook} link", pin.display()));
            }
            if link.ifindex == 0 {
                return Health::Dead(format!(
                    "the kernel detached its {hook} program (the interface was removed)"
                ));
            }
            if let Some(now) = current
                && now != link.ifindex
            {
                return Health::Dead(format!(
                    "its {hook} link is on ifindex {} but {iface} is ifindex {now} now (the interface was re-created)",
                    link.ifindex
                ));
            }
            link.prog_id
        };
        if let Err(health) = uses_pinned_maps(dir, prog_id, hook) {
            return health;
        }
    }
    Health::Live
}

/// Whether program `prog_id` (attached at `hook`) is loaded and uses the maps pinned in `dir`
/// now; else why not.
pub(super) fn uses_pinned_maps(dir: &PinDir, prog_id: u32, hook: &str) -> Result<(), Health> {
    let used = match bpfinfo::program_map_ids(prog_id) {
        Ok(Some(ids)) => ids,
        Ok(None) => return Err(Health::Dead(format!("its {hook} program is not loaded"))),
        Err(e) => {
            return Err(Health::Unknown(format!(
                "reading its {hook} program's maps: {e}"
            )));
        }
    };
    for id in used {
        let Some(name) = aya::maps::MapInfo::from_id(id)
            .ok()
            .and_then(|info| info.name_as_str().map(str::to_string))
        else {
            continue;
        };
        let Some(pf_name) = pf_common::map_names::ALL
            .iter()
            .find(|n| n[..n.len().min(BPF_OBJ_NAME_MAX)] == name)
        else {
            continue; // not one of pf's pinned maps (.rodata and the like)
        };
        let pinned = aya::maps::MapData::from_pin(dir.map(pf_name))
            .ok()
            .and_then(|m| m.info().ok())
            .map(|info| info.id());
        if pinned != Some(id) {
            return Err(Health::Dead(format!(
                "its {hook} program uses map {pf_name} id {id}, but {} {}",
                dir.map(pf_name).display(),
                match pinned {
                    Some(other) => format!("is map id {other} (the pins were replaced)"),
                    None => "is not pinned (the pins were removed)".into(),
                }
            )));
        }
    }
    Ok(())
}
