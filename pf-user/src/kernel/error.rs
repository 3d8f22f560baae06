//! pf's library errors. Each message is one line that names what is wrong and, where it helps,
//! what to do about it.

use std::{io, path::PathBuf};

use crate::domain::spec::{Reservation, SpecError};

#[derive(Debug, thiserror::Error)]
pub enum PfError {
    #[error(transparent)]
    Spec(#[from] SpecError),

    #[error(
        "pf needs root (CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN) to load programs and open its maps"
    )]
    NotRoot,

    #[error("this kernel has no BPF support: {0}")]
    NoBpfSupport(String),

    #[error("{path} is not on a BPF filesystem (mount one with `mount -t bpf bpf {path}`)")]
    NotBpffs { path: PathBuf },

    #[error("could not mount bpffs at {path}: {source}")]
    MountBpffs { path: PathBuf, source: io::Error },

    #[error(
        "this pf binary has no embedded eBPF object (it was built with AYA_BUILD_SKIP=1); rebuild without it"
    )]
    NoEmbeddedObject,

    #[error(
        "pinned map {path} does not have the layout this pf expects ({detail}); it was made by another pf version: detach every interface and remove {dir} to start afresh"
    )]
    MapLayout {
        path: PathBuf,
        dir: PathBuf,
        detail: String,
    },

    #[error(
        "pf's state at {0} is incomplete (some maps are pinned, others missing: a crash while it was made, or maps of another pf version, which may have fewer); detach every interface and remove the directory to start afresh"
    )]
    PartialState(PathBuf),

    #[error(
        "pf's pinned maps in {0} were removed or replaced after pf serve started, so the attached programs may not read what pf writes; restart pf serve (it attaches again and reloads the maps from the store)"
    )]
    MapsReplaced(PathBuf),

    #[error("{count} tunnel networks are more than the data plane holds ({max})")]
    TooManyTunnelNetworks { count: usize, max: usize },

    #[error("{public} overlaps the existing reservation {existing}")]
    Conflict {
        public: String,
        existing: Reservation,
    },

    #[error(
        "target {target} is already the target of {existing}; replies from it could not be mapped back to one public port"
    )]
    AmbiguousTarget {
        target: String,
        existing: Reservation,
    },

    #[error(
        "{public}/{proto} is in the forwarding map but no reservation record covers it (inconsistent state)"
    )]
    Orphan { public: String, proto: &'static str },

    #[error(
        "{client} already triggers with {trigger} (gate {gate}); one rule per trigger port and client"
    )]
    TriggerConflict {
        client: String,
        trigger: String,
        gate: u32,
    },

    #[error("trigger gate {gate} is {problem}")]
    TriggerGate { gate: u32, problem: &'static str },

    #[error("limit slot {slot} is {problem}")]
    LimitSlot { slot: u32, problem: &'static str },

    #[error("no reservation {spec}{hint}")]
    NoSuchReservation { spec: String, hint: String },

    #[error("unknown interface '{0}'")]
    UnknownInterface(String),

    #[error("pf is already attached to {0} (run `pf detach {0}` first)")]
    AlreadyAttached(String),

    #[error("pf is not attached to {0}")]
    NotAttached(String),

    #[error(
        "pf's trigger program is already attached to {0} (run `pf detach {0} --trigger` first)"
    )]
    TriggerAlreadyAttached(String),

    #[error("pf's trigger program is not attached to {0}")]
    TriggerNotAttached(String),

    #[error(
        "{0} is not an Ethernet-like interface: --tunnel-side needs Ethernet frames (veth, tap, VXLAN); replies from a layer-3 tunnel such as WireGuard or tun are rewritten by the TC egress program on the public interface, with no attach needed on the tunnel side"
    )]
    NotEthernet(String),

    #[error(
        "{iface} already has an XDP program that this pin directory did not attach (another tool's, or another pf's with another pin directory: one pf per interface); remove it first (ip link set dev {iface} xdp off)"
    )]
    XdpBusy { iface: String },

    #[error("could not attach {what} to {iface}: {detail}")]
    Attach {
        what: &'static str,
        iface: String,
        detail: String,
    },

    #[error(
        "pf needs Linux 5.10 or newer (XDP attached by BPF link: 5.9; batched map updates: 5.6; device hash maps: 5.4); this kernel is {0}"
    )]
    KernelTooOld(String),

    #[error(
        "TCX came in Linux 6.6 and this kernel is {0}: attach the egress program with --tc-attach netlink (or auto)"
    )]
    NoTcx(String),

    #[error(
        "{0} is not in this network namespace, but pf's TC filter on it is: run pf detach in {0}'s namespace"
    )]
    OtherNamespace(String),

    #[error(
        "this kernel says which devices can take redirected frames (its netdev family); --redirect-devices is for kernels before Linux 6.3, which cannot"
    )]
    DevicesFromKernel,

    #[error(
        "{0} is not an Ethernet-like interface, so it cannot take redirected frames (WireGuard and tun never can)"
    )]
    CannotTakeRedirects(String),

    #[error("nftables set {set}: {detail}")]
    Netfilter { set: String, detail: String },

    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },

    #[error("map {map}: batch write of {count} entries failed after {done}: {source}")]
    MapBatch {
        map: &'static str,
        done: usize,
        count: usize,
        source: io::Error,
    },

    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },

    #[error("loading pf's eBPF object: {0}")]
    Load(String),
}

impl PfError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        PfError::Io {
            what: what.into(),
            source,
        }
    }
}
