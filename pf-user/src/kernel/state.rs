//! pf's state: the pinned maps, and the reservations kept in them.
//!
//! The NAT maps hold one entry per (port, protocol); the `RESERVATIONS` map holds the records
//! the admin made, so a range stays one reservation. Changes are made under an exclusive lock on
//! the pin directory, validated in full before the first map write, and rolled back if a write
//! fails, so a reservation is added or removed all or nothing.

use std::{fs::File, net::Ipv4Addr, os::fd::AsFd};

use aya::maps::xdp::XdpMapError;
use aya::maps::{
    Array, DevMapHash, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, MapType, PerCpuArray,
};
use pf_common::{
    EndpointKey, MAP_SHAPES, MapKind, MapShape, NatEntry, PORT_USE_SLOTS, ReservationKey,
    ReservationValue, TunnelNetwork, TunnelNetworks,
    counters::{
        EGRESS_BASE, EGRESS_BY_HELPERS, FAST_PATH_BASE, FastPath, GATE_CLOSED, INGRESS_BASE,
        Outcome, REPLY_FAST_PATH_BASE, TRIGGER_BASE, TRIGGER_EVENTS_LOST, Trigger,
    },
    limits::MAX_TUNNEL_NETWORKS,
    map_names,
};
use serde::Serialize;

use super::{batch, bpffs::PinDir, error::PfError, object};
use crate::domain::{
    net::Ipv4Net,
    spec::{PortRange, Protocols, PublicSpec, Reservation},
};

/// Batched writes take no BPF_NOEXIST (the kernel accepts only BPF_F_LOCK there): they may
/// replace. `reserve_all` has checked, under pf's exclusive lock, that no key it writes exists,
/// and every writer of these maps takes that lock, so nothing is replaced.
const BATCH_ELEM_FLAGS: u64 = 0;

fn one_protocol(proto: u8) -> Protocols {
    if proto == pf_common::IPPROTO_TCP {
        Protocols::Tcp
    } else {
        Protocols::Udp
    }
}

/// What a failed `reserve_all` wrote, to delete again.
#[derive(Default)]
struct Rollback {
    forward: Vec<EndpointKey>,
    reverse: Vec<EndpointKey>,
    records: Vec<ReservationKey>,
}

impl Rollback {
    /// The records first (`pf list` stops showing them), then forward entries before reverse
    /// ones, as `release` does. Returns whether every NAT entry written is gone: one left
    /// behind must keep its port counted.
    fn undo(self, state: &mut State) -> bool {
        for key in &self.records {
            let _ = state.reservations.remove(key);
        }
        let gone = |result: Result<(), MapError>| result.map_or_else(|e| not_found(&e), |()| true);
        let mut all_gone = true;
        for key in &self.forward {
            all_gone &= gone(state.forward.remove(key));
        }
        for key in &self.reverse {
            all_gone &= gone(state.reverse.remove(key));
        }
        all_gone
    }
}

/// Writes `keys` and their `values` to one map in batches, reporting each written run of keys
/// to `written`.
fn write_batch<K: bytemuck::Pod, V: bytemuck::Pod>(
    map: &MapData,
    name: &'static str,
    keys: &[K],
    values: &[V],
    written: impl FnMut(&[K]),
) -> Result<(), PfError> {
    batch::update_all(map.fd().as_fd(), keys, values, BATCH_ELEM_FLAGS, written).map_err(
        |(done, source)| PfError::MapBatch {
            map: name,
            done,
            count: keys.len(),
            source,
        },
    )
}

fn proto_name(proto: u8) -> &'static str {
    if proto == pf_common::IPPROTO_TCP {
        "tcp"
    } else {
        "udp"
    }
}

fn endpoint(addr: Ipv4Addr, port: u16, proto: u8) -> EndpointKey {
    EndpointKey::new(addr.octets(), port.to_be_bytes(), proto)
}

/// One (port, protocol) of a reservation: its key in each NAT map, and the ports they carry.
struct NatPair {
    proto: u8,
    public_port: u16,
    target_port: u16,
    /// `FORWARD_NAT`'s key: the public endpoint.
    forward: EndpointKey,
    /// `REVERSE_NAT`'s key: the target endpoint.
    reverse: EndpointKey,
}

impl NatPair {
    /// Its slots in `PORTS_IN_USE`: (forward, reverse).
    fn port_use_slots(&self) -> (u32, u32) {
        (
            pf_common::port_use_slot(false, self.proto, self.forward.port),
            pf_common::port_use_slot(true, self.proto, self.reverse.port),
        )
    }
}

/// Changes to `PORTS_IN_USE` counts, by slot.
type PortUseDeltas = std::collections::BTreeMap<u32, i64>;

/// Adds `by` to the counts of every port of `r`, in both directions.
fn count_ports(deltas: &mut PortUseDeltas, r: &Reservation, by: i64) {
    for pair in nat_pairs(r) {
        let (forward_slot, reverse_slot) = pair.port_use_slots();
        *deltas.entry(forward_slot).or_default() += by;
        *deltas.entry(reverse_slot).or_default() += by;
    }
}

/// Every (port, protocol) of `r`, protocol by protocol and port by port: the order in which
/// pf writes, removes and reads them.
fn nat_pairs(r: &Reservation) -> impl Iterator<Item = NatPair> + '_ {
    r.public
        .protocols
        .ip_protocols()
        .iter()
        .flat_map(move |&proto| {
            r.port_pairs()
                .map(move |(public_port, target_port)| NatPair {
                    proto,
                    public_port,
                    target_port,
                    forward: endpoint(r.public.addr, public_port, proto),
                    reverse: endpoint(r.target_addr, target_port, proto),
                })
        })
}

/// A NAT map, as userspace opens it.
type NatMap = HashMap<MapData, EndpointKey, NatEntry>;

/// A NAT entry; `None` if the key is not in the map.
fn lookup(
    map: &NatMap,
    name: &'static str,
    key: &EndpointKey,
) -> Result<Option<NatEntry>, PfError> {
    match map.get(key, 0) {
        Ok(values) => Ok(Some(values)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(PfError::Map { map: name, source }),
    }
}

/// Open handles on pf's maps, with pf's lock on the pin directory held.
pub struct State {
    forward: NatMap,
    reverse: NatMap,
    reservations: HashMap<MapData, ReservationKey, ReservationValue>,
    counters: PerCpuArray<MapData, u64>,
    redirect_devices: DevMapHash<MapData>,
    public_devices: DevMapHash<MapData>,
    tunnel_networks: Array<MapData, TunnelNetworks>,
    /// The kernel's ids of the maps opened, in `map_names::ALL` order: which maps these are,
    /// whatever is pinned by now.
    ids: [u32; map_names::COUNT],
    ports_in_use: Array<MapData, u32>,
    /// Port triggering's maps (`super::trigger`).
    pub(super) trigger_ports: HashMap<MapData, EndpointKey, u32>,
    pub(super) trigger_gates: Array<MapData, pf_common::TriggerGate>,
    /// Limits' maps (`super::limit`).
    pub(super) limits: Array<MapData, pf_common::Limit>,
    pub(super) limit_drops: PerCpuArray<MapData, pf_common::LimitDrops>,
    pub(super) limit_sources: LpmTrie<MapData, pf_common::SourceNet, u8>,
    _lock: File,
}

/// What a reservation's NAT entries carry besides their rewrite: the trigger gate they wait
/// on and the limits their inbound packets pass (slots; 0 is none). Reply entries carry the
/// gate only: limits are for what comes in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EntryTags {
    pub gate: u16,
    pub limit: u16,
}

impl EntryTags {
    /// Entries behind trigger gate `gate`, without limits.
    pub fn gated(gate: u16) -> Self {
        Self { gate, limit: 0 }
    }
}

/// Traffic through one reservation, summed over its ports, protocols and CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Traffic {
    pub in_packets: u64,
    pub in_bytes: u64,
    pub out_packets: u64,
    pub out_bytes: u64,
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, other: Traffic) {
        self.in_packets += other.in_packets;
        self.in_bytes += other.in_bytes;
        self.out_packets += other.out_packets;
        self.out_bytes += other.out_bytes;
    }
}

impl std::ops::Add for Traffic {
    type Output = Traffic;
    fn add(mut self, other: Traffic) -> Traffic {
        self += other;
        self
    }
}

/// The global outcome counters of both programs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// XDP ingress outcomes, by name, in `Outcome` order.
    pub ingress: Vec<(&'static str, u64)>,
    /// TC egress outcomes, by name, in `Outcome` order.
    pub egress: Vec<(&'static str, u64)>,
    /// Fast-path outcomes of rewritten packets, by name, in `FastPath` order (all zero unless
    /// an interface is attached with `--fast-path`).
    pub fast_path: Vec<(&'static str, u64)>,
    /// Reply fast-path outcomes, by name, in `FastPath` order (all zero unless an interface is
    /// attached with `--tunnel-side`).
    pub reply_fast_path: Vec<(&'static str, u64)>,
    /// Egress rewrites done with the skb helpers (part of egress's `rewritten`): a checksum not
    /// whole in the packet, IPv4 options, or headers outside the skb's linear data.
    pub egress_by_helpers: u64,
    /// The trigger program's outcomes, by name, in `Trigger` order (all zero unless a
    /// tunnel-side interface has it).
    pub trigger: Vec<(&'static str, u64)>,
    /// Packets that met a closed trigger gate (either direction), handled as no entry.
    pub gate_closed: u64,
    /// Openings whose report found the ring full.
    pub trigger_events_lost: u64,
}

impl Counters {
    pub fn ingress(&self, outcome: Outcome) -> u64 {
        self.ingress[outcome as usize].1
    }
    pub fn egress(&self, outcome: Outcome) -> u64 {
        self.egress[outcome as usize].1
    }
}

/// Everything `pf stats` shows.
#[derive(Clone, Debug)]
pub struct Stats {
    pub counters: Counters,
    pub reservations: Vec<(Reservation, Traffic)>,
    /// `TUNNEL_NETWORKS`: sources egress never lets out unrewritten.
    pub tunnel_networks: Vec<Ipv4Net>,
}

/// The aya map type of a shape's kind.
fn map_type(kind: MapKind) -> MapType {
    match kind {
        MapKind::Hash => MapType::Hash,
        MapKind::Array => MapType::Array,
        MapKind::PerCpuArray => MapType::PerCpuArray,
        MapKind::LruHash => MapType::LruHash,
        MapKind::DevMapHash => MapType::DevMapHash,
        MapKind::RingBuf => MapType::RingBuf,
        MapKind::LpmTrie => MapType::LpmTrie,
    }
}

/// Opens a pinned map and checks it has the layout this build of pf was compiled for: a map
/// left by another version must not be read or written with the wrong sizes.
pub(crate) fn open_map(dir: &PinDir, layout: &MapShape) -> Result<(Map, u32), PfError> {
    let path = dir.map(layout.name);
    let map_err = |source| PfError::Map {
        map: layout.name,
        source,
    };
    let data = MapData::from_pin(&path).map_err(map_err)?;
    let info = data.info().map_err(map_err)?;
    let found_type = info.map_type().map_err(map_err)?;
    let found = (
        found_type,
        info.key_size(),
        info.value_size(),
        info.max_entries(),
    );
    let want = (
        map_type(layout.kind),
        layout.key_size,
        layout.value_size,
        layout.max_entries,
    );
    if found != want {
        return Err(PfError::MapLayout {
            path,
            dir: dir.root().to_path_buf(),
            detail: format!(
                "found {found:?}, want {want:?} as (type, key size, value size, max entries)"
            ),
        });
    }
    let id = info.id();
    Ok((Map::from_map_data(data).map_err(map_err)?, id))
}

impl State {
    /// Opens pf's state for changes, creating the pin directory (mounting bpffs if needed) and
    /// the maps if this is the first use.
    pub fn open_for_write(dir: &PinDir) -> Result<Self, PfError> {
        dir.prepare()?;
        let lock = dir.lock(true)?;
        let pinned = map_names::ALL
            .iter()
            .filter(|n| dir.map(n).exists())
            .count();
        if pinned == 0 {
            // Loading the object creates and pins every map; the programs are not loaded.
            drop(object::load_object(dir)?);
        } else if pinned < map_names::ALL.len() {
            return Err(PfError::PartialState(dir.root().to_path_buf()));
        }
        Self::open_maps(dir, lock)
    }

    /// Opens pf's maps for changes, which must be pinned already: for `pf serve` after its
    /// start, where maps made anew would be maps no attached program reads.
    pub fn open_existing_for_write(dir: &PinDir) -> Result<Self, PfError> {
        let lock = dir.lock(true)?;
        if !map_names::ALL.iter().all(|n| dir.map(n).exists()) {
            return Err(PfError::MapsReplaced(dir.root().to_path_buf()));
        }
        Self::open_maps(dir, lock)
    }

    /// The kernel's ids of the open maps, in `map_names::ALL` order.
    pub fn map_ids(&self) -> [u32; map_names::COUNT] {
        self.ids
    }

    /// Opens pf's state for reading; `None` when pf has never been used with this directory.
    pub fn open_for_read(dir: &PinDir) -> Result<Option<Self>, PfError> {
        if !dir.exists() || !dir.map(map_names::RESERVATIONS).exists() {
            return Ok(None);
        }
        let lock = dir.lock(false)?;
        Self::open_maps(dir, lock).map(Some)
    }

    /// Opens pf's maps (all of them pinned already) under a lock the caller took.
    pub(crate) fn open_maps(dir: &PinDir, lock: File) -> Result<Self, PfError> {
        // The fragment table and the trace maps are opened only to check their layouts (`pf
        // trace` opens the trace maps itself, see `kernel::trace`).
        let [
            forward,
            reverse,
            reservations,
            counters,
            fragments,
            redirect_devices,
            public_devices,
            tunnel_networks,
            ports_in_use,
            trace_config,
            trace_events,
            trigger_ports,
            trigger_gates,
            trigger_events,
            limits,
            limit_drops,
            limit_sources,
        ] = MAP_SHAPES.each_ref().map(|l| open_map(dir, l));
        let mut ids = [0u32; map_names::COUNT];
        let mut id_of = |index: usize, opened: Result<(Map, u32), PfError>| {
            opened.map(|(map, id)| {
                ids[index] = id;
                map
            })
        };
        let (forward, reverse, reservations, counters, fragments) = (
            id_of(0, forward),
            id_of(1, reverse),
            id_of(2, reservations),
            id_of(3, counters),
            id_of(4, fragments),
        );
        let (redirect_devices, public_devices, tunnel_networks, ports_in_use) = (
            id_of(5, redirect_devices),
            id_of(6, public_devices),
            id_of(7, tunnel_networks),
            id_of(8, ports_in_use),
        );
        let (trace_config, trace_events) = (id_of(9, trace_config), id_of(10, trace_events));
        let (trigger_ports, trigger_gates, trigger_events) = (
            id_of(11, trigger_ports),
            id_of(12, trigger_gates),
            id_of(13, trigger_events),
        );
        let (limits, limit_drops, limit_sources) = (
            id_of(14, limits),
            id_of(15, limit_drops),
            id_of(16, limit_sources),
        );
        fragments?;
        trace_config?;
        trace_events?;
        trigger_events?;
        let typed = |name: &'static str| move |source: MapError| PfError::Map { map: name, source };
        Ok(Self {
            forward: forward?.try_into().map_err(typed(map_names::FORWARD_NAT))?,
            reverse: reverse?.try_into().map_err(typed(map_names::REVERSE_NAT))?,
            reservations: reservations?
                .try_into()
                .map_err(typed(map_names::RESERVATIONS))?,
            counters: counters?.try_into().map_err(typed(map_names::COUNTERS))?,
            redirect_devices: redirect_devices?
                .try_into()
                .map_err(typed(map_names::REDIRECT_DEVICES))?,
            public_devices: public_devices?
                .try_into()
                .map_err(typed(map_names::PUBLIC_DEVICES))?,
            tunnel_networks: tunnel_networks?
                .try_into()
                .map_err(typed(map_names::TUNNEL_NETWORKS))?,
            ports_in_use: ports_in_use?
                .try_into()
                .map_err(typed(map_names::PORTS_IN_USE))?,
            trigger_ports: trigger_ports?
                .try_into()
                .map_err(typed(map_names::TRIGGER_PORTS))?,
            trigger_gates: trigger_gates?
                .try_into()
                .map_err(typed(map_names::TRIGGER_GATES))?,
            limits: limits?.try_into().map_err(typed(map_names::LIMITS))?,
            limit_drops: limit_drops?
                .try_into()
                .map_err(typed(map_names::LIMIT_DROPS))?,
            limit_sources: limit_sources?
                .try_into()
                .map_err(typed(map_names::LIMIT_SOURCES))?,
            ids,
            _lock: lock,
        })
    }

    /// Every reservation, sorted by public address, port and protocol.
    pub fn list(&self) -> Result<Vec<Reservation>, PfError> {
        let records: Vec<(ReservationKey, ReservationValue)> =
            dump(self.reservations.map(), map_names::RESERVATIONS)?;
        let mut out: Vec<Reservation> = records
            .iter()
            .filter_map(|(key, value)| record_to_reservation(key, value))
            .collect();
        out.sort();
        Ok(out)
    }

    /// The reservation whose public side covers `addr:port/proto`, if any. A scan: only used to
    /// name the owner of a conflict.
    fn find_public(&self, spec: &PublicSpec) -> Result<Option<Reservation>, PfError> {
        Ok(self.list()?.into_iter().find(|r| r.public.overlaps(spec)))
    }

    /// The reservation whose target side covers `addr:port/proto`, if any (a scan, as above).
    fn find_target(
        &self,
        addr: Ipv4Addr,
        port: u16,
        protocols: Protocols,
    ) -> Result<Option<Reservation>, PfError> {
        let ports = PortRange {
            first: port,
            last: port,
        };
        Ok(self.list()?.into_iter().find(|r| {
            r.target_addr == addr
                && r.public.protocols.overlaps(protocols)
                && r.target_ports().overlaps(ports)
        }))
    }

    /// Adds a reservation: checks every port of it against both NAT maps first, then writes the
    /// reverse entries, the forward entries and the record, undoing what it wrote on any failure.
    pub fn reserve(&mut self, r: &Reservation) -> Result<(), PfError> {
        self.reserve_all(std::slice::from_ref(r))
    }

    /// Adds many reservations all or nothing, with batched map writes (a few syscalls per
    /// 65,536 entries instead of one per entry). Each is checked against the maps and against
    /// the ones before it in `rs`; the first conflict refuses the whole batch and changes nothing.
    pub fn reserve_all(&mut self, rs: &[Reservation]) -> Result<(), PfError> {
        self.reserve_batch(rs, EntryTags::default())
    }

    /// Adds a reservation whose entries carry `tags`: they forward only while trigger gate
    /// `tags.gate` is open (`super::trigger`), and their inbound packets pass limit slot
    /// `tags.limit` (`super::limit`); otherwise as [`State::reserve`]. The gate's rule and
    /// the limit are armed apart.
    pub fn reserve_tagged(&mut self, r: &Reservation, tags: EntryTags) -> Result<(), PfError> {
        self.reserve_batch(std::slice::from_ref(r), tags)
    }

    fn reserve_batch(&mut self, rs: &[Reservation], tags: EntryTags) -> Result<(), PfError> {
        let EntryTags { gate, limit } = tags;
        let (mut forward_keys, mut forward_values) = (Vec::new(), Vec::new());
        let (mut reverse_keys, mut reverse_values) = (Vec::new(), Vec::new());
        // Entries claimed earlier in this batch, and by which reservation.
        let mut claimed_public = std::collections::HashMap::new();
        let mut claimed_target = std::collections::HashMap::new();
        let mut port_use = PortUseDeltas::new();
        for (index, r) in rs.iter().enumerate() {
            count_ports(&mut port_use, r, 1);
            for NatPair {
                proto,
                public_port,
                target_port,
                forward: fkey,
                reverse: rkey,
            } in nat_pairs(r)
            {
                // Named only in an error: formatting them for every port would cost more
                // than the map writes.
                let public = || format!("{}:{public_port}/{}", r.public.addr, proto_name(proto));
                let target = || format!("{}:{target_port}/{}", r.target_addr, proto_name(proto));
                if let Some(&earlier) = claimed_public.get(&fkey) {
                    let existing: Reservation = rs[earlier];
                    let public = public();
                    return Err(PfError::Conflict { public, existing });
                }
                if lookup(&self.forward, map_names::FORWARD_NAT, &fkey)?.is_some() {
                    let spec = PublicSpec {
                        addr: r.public.addr,
                        ports: PortRange::single(public_port),
                        protocols: one_protocol(proto),
                    };
                    return Err(match self.find_public(&spec)? {
                        Some(existing) => PfError::Conflict {
                            public: public(),
                            existing,
                        },
                        None => PfError::Orphan {
                            public: public(),
                            proto: proto_name(proto),
                        },
                    });
                }
                if let Some(&earlier) = claimed_target.get(&rkey) {
                    let existing: Reservation = rs[earlier];
                    let target = target();
                    return Err(PfError::AmbiguousTarget { target, existing });
                }
                if lookup(&self.reverse, map_names::REVERSE_NAT, &rkey)?.is_some() {
                    return Err(
                        match self.find_target(r.target_addr, target_port, one_protocol(proto))? {
                            Some(existing) => PfError::AmbiguousTarget {
                                target: target(),
                                existing,
                            },
                            None => PfError::Orphan {
                                public: target(),
                                proto: proto_name(proto),
                            },
                        },
                    );
                }
                claimed_public.insert(fkey, index);
                claimed_target.insert(rkey, index);
                let to_target = NatEntry {
                    gate,
                    limit,
                    ..NatEntry::new(r.target_addr.octets(), target_port.to_be_bytes())
                };
                let to_public = NatEntry {
                    gate,
                    ..NatEntry::new(r.public.addr.octets(), public_port.to_be_bytes())
                };
                forward_keys.push(fkey);
                forward_values.push(to_target);
                reverse_keys.push(rkey);
                reverse_values.push(to_public);
            }
        }
        let (record_keys, record_values): (Vec<_>, Vec<_>) =
            rs.iter().map(reservation_to_record).unzip();

        // The port counts first: a count above its entries only costs a hash lookup, a count
        // below them would hide an entry from the programs. Reverse entries next: a forward
        // entry without its reverse would let replies leave with the tunnel address. The
        // records last, so `pf list` never shows a reservation that does not forward yet.
        let counts_before = self.add_port_use(&port_use)?;
        let mut rollback = Rollback::default();
        let result = write_batch(
            self.reverse.map(),
            map_names::REVERSE_NAT,
            &reverse_keys,
            &reverse_values,
            |keys| rollback.reverse.extend_from_slice(keys),
        )
        .and_then(|()| {
            write_batch(
                self.forward.map(),
                map_names::FORWARD_NAT,
                &forward_keys,
                &forward_values,
                |keys| rollback.forward.extend_from_slice(keys),
            )
        })
        .and_then(|()| {
            write_batch(
                self.reservations.map(),
                map_names::RESERVATIONS,
                &record_keys,
                &record_values,
                |keys| rollback.records.extend_from_slice(keys),
            )
        });
        // The counts go back only if every entry did: a count above its entries costs a
        // lookup, one below them would hide an entry.
        if result.is_err() && rollback.undo(self) {
            self.set_port_use(&counts_before);
        }
        result
    }

    /// Adds `deltas` to the `PORTS_IN_USE` counts (never below zero) and returns the slots'
    /// previous counts, to put back if what follows fails. On failure nothing has changed.
    fn add_port_use(&mut self, deltas: &PortUseDeltas) -> Result<Vec<(u32, u32)>, PfError> {
        // A few slots are read one by one; many (a batch at a start, a wide range) with the
        // whole array in a few batched reads.
        const READ_ALL_ABOVE: usize = 1024;
        let current: Option<Vec<u32>> = if deltas.len() > READ_ALL_ABOVE {
            let mut all = vec![0u32; PORT_USE_SLOTS as usize];
            for (slot, count) in dump::<u32, u32>(self.ports_in_use.map(), map_names::PORTS_IN_USE)?
            {
                if let Some(c) = all.get_mut(slot as usize) {
                    *c = count;
                }
            }
            Some(all)
        } else {
            None
        };
        let mut before = Vec::with_capacity(deltas.len());
        let (mut slots, mut after) = (Vec::new(), Vec::new());
        for (&slot, &delta) in deltas {
            let old = match &current {
                Some(all) => all[slot as usize],
                None => self
                    .ports_in_use
                    .get(&slot, 0)
                    .map_err(|source| PfError::Map {
                        map: map_names::PORTS_IN_USE,
                        source,
                    })?,
            };
            before.push((slot, old));
            slots.push(slot);
            after.push((i64::from(old) + delta).clamp(0, i64::from(u32::MAX)) as u32);
        }
        let mut written = 0;
        let result = write_batch(
            self.ports_in_use.map(),
            map_names::PORTS_IN_USE,
            &slots,
            &after,
            |run| written += run.len(),
        );
        if result.is_err() {
            // The chunks written before the failure go back.
            self.set_port_use(&before[..written]);
        }
        result.map(|()| before)
    }

    /// Puts back counts `add_port_use` returned. Best effort: it runs only after another
    /// failure, which is the error to report, and a count left too high only costs lookups
    /// (`prune`, in `pf serve`'s next reconcile, counts again).
    fn set_port_use(&mut self, counts: &[(u32, u32)]) {
        let (slots, values): (Vec<u32>, Vec<u32>) = counts.iter().copied().unzip();
        let _ = write_batch(
            self.ports_in_use.map(),
            map_names::PORTS_IN_USE,
            &slots,
            &values,
            |_| {},
        );
    }

    /// Removes `r` if the maps hold exactly it (its target too): a store that is not the one
    /// the maps were written from must never remove another reservation on the same ports.
    pub fn release_exact(&mut self, r: &Reservation) -> Result<Reservation, PfError> {
        match self.record_at(r) {
            Some(held) if held == *r => self.release(&r.public),
            Some(other) => Err(PfError::NoSuchReservation {
                spec: r.to_string(),
                hint: format!("; the maps hold {other} there"),
            }),
            None => Err(PfError::NoSuchReservation {
                spec: r.to_string(),
                hint: String::new(),
            }),
        }
    }

    /// Removes the reservation made exactly as `spec` (same address, range and protocols) and
    /// returns it.
    pub fn release(&mut self, spec: &PublicSpec) -> Result<Reservation, PfError> {
        let key = ReservationKey {
            public_addr: spec.addr.octets(),
            first_port: spec.ports.first.to_be_bytes(),
            protocols: spec.protocols.mask(),
            _pad: 0,
        };
        let found = self
            .reservations
            .get(&key, 0)
            .ok()
            .and_then(|v| record_to_reservation(&key, &v));
        let Some(r) = found.filter(|r| r.public == *spec) else {
            // What the maps hold there, if anything; the caller says what to do about it.
            let hint = match self.find_public(spec)? {
                Some(other) => format!("; it overlaps {other}, which is removed only whole"),
                None => String::new(),
            };
            return Err(PfError::NoSuchReservation {
                spec: spec.to_string(),
                hint,
            });
        };
        // A trigger rule's range goes with its rule: the gate is closed and disarmed first,
        // which stops its forwarding at once.
        // From the first entry still there: a crash may have left the range half written.
        let (mut gate, mut limit) = (0, 0);
        for pair in nat_pairs(&r) {
            if let Some(e) = lookup(&self.forward, map_names::FORWARD_NAT, &pair.forward)? {
                (gate, limit) = (e.gate, e.limit);
                break;
            }
        }
        if gate != 0 {
            self.disarm_gate(gate)?;
        }
        // Forward entries first, so no new inbound packet is rewritten while the replies' entries
        // still exist; the record last, so a failure leaves the reservation visible in `pf list`.
        for pair in nat_pairs(&r) {
            remove_entry(&mut self.forward, map_names::FORWARD_NAT, &pair.forward)?;
        }
        for pair in nat_pairs(&r) {
            remove_entry(&mut self.reverse, map_names::REVERSE_NAT, &pair.reverse)?;
        }
        // Its limits go once no entry carries them.
        if limit != 0 {
            self.disarm_limit(limit)?;
        }
        match self.reservations.remove(&key) {
            Err(e) if !not_found(&e) => {
                return Err(PfError::Map {
                    map: map_names::RESERVATIONS,
                    source: e,
                });
            }
            _ => {}
        }
        // The counts last, once the record is gone, so a release that fails before and is
        // tried again never counts a port down twice. A failure here leaves counts too high,
        // which costs only lookups until the next recount; the release itself is done.
        let mut port_use = PortUseDeltas::new();
        count_ports(&mut port_use, &r, -1);
        let _ = self.add_port_use(&port_use);
        Ok(r)
    }

    /// The record the maps hold under `r`'s public side (address, first port, protocols), if
    /// any: one lookup.
    fn record_at(&self, r: &Reservation) -> Option<Reservation> {
        let (key, _) = reservation_to_record(r);
        self.reservations
            .get(&key, 0)
            .ok()
            .and_then(|v| record_to_reservation(&key, &v))
    }

    /// Whether the maps hold exactly `r`: its record, and every NAT entry whole.
    pub fn holds(&self, r: &Reservation) -> Result<bool, PfError> {
        self.holds_tagged(r, EntryTags::default())
    }

    /// [`State::holds`], with every entry carrying `tags`.
    pub fn holds_tagged(&self, r: &Reservation, tags: EntryTags) -> Result<bool, PfError> {
        Ok(self.record_at(r) == Some(*r) && self.is_complete_tagged(r, tags)?)
    }

    /// Whether every NAT entry of `r` is in the maps with the address and port it must have.
    /// A crash part-way through a write or a removal can leave a record whose entries are not
    /// all there.
    pub fn is_complete(&self, r: &Reservation) -> Result<bool, PfError> {
        self.is_complete_tagged(r, EntryTags::default())
    }

    /// [`State::is_complete`], with every entry carrying `tags` (reply entries: the gate).
    pub fn is_complete_tagged(&self, r: &Reservation, tags: EntryTags) -> Result<bool, PfError> {
        let holds = |map: &NatMap,
                     name: &'static str,
                     key: &EndpointKey,
                     addr: Ipv4Addr,
                     port: u16,
                     limit: u16|
         -> Result<bool, PfError> {
            Ok(lookup(map, name, key)?.is_some_and(|e| {
                e.addr == addr.octets()
                    && e.port == port.to_be_bytes()
                    && e.gate == tags.gate
                    && e.limit == limit
            }))
        };
        for pair in nat_pairs(r) {
            let forward = holds(
                &self.forward,
                map_names::FORWARD_NAT,
                &pair.forward,
                r.target_addr,
                pair.target_port,
                tags.limit,
            )?;
            let reverse = holds(
                &self.reverse,
                map_names::REVERSE_NAT,
                &pair.reverse,
                r.public.addr,
                pair.public_port,
                0,
            )?;
            if !(forward && reverse) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Removes every NAT entry that none of `keep` accounts for (left by a crash, or written
    /// by hand) and returns each as `address:port/protocol (map)`. Reservation records are not
    /// touched: release those first.
    pub fn prune(&mut self, keep: &[Reservation]) -> Result<Vec<String>, PfError> {
        let mut forward_keep = std::collections::HashSet::new();
        let mut reverse_keep = std::collections::HashSet::new();
        for pair in keep.iter().flat_map(nat_pairs) {
            forward_keep.insert(pair.forward);
            reverse_keep.insert(pair.reverse);
        }
        let mut removed = Vec::new();
        // Every count is taken again from the entries that stay: whatever a crash or a hand
        // left in `PORTS_IN_USE`, it agrees with the maps afterwards.
        let mut counts = vec![0u32; PORT_USE_SLOTS as usize];
        for (map, name, keep, reverse) in [
            (
                &mut self.forward,
                map_names::FORWARD_NAT,
                &forward_keep,
                false,
            ),
            (
                &mut self.reverse,
                map_names::REVERSE_NAT,
                &reverse_keep,
                true,
            ),
        ] {
            let (kept, stale): (Vec<EndpointKey>, Vec<EndpointKey>) = map
                .keys()
                .collect::<Result<Vec<EndpointKey>, _>>()
                .map_err(|source| PfError::Map { map: name, source })?
                .into_iter()
                .partition(|k| keep.contains(k));
            for key in kept {
                let slot = pf_common::port_use_slot(reverse, key.proto, key.port);
                counts[slot as usize] = counts[slot as usize].saturating_add(1);
            }
            for key in stale {
                remove_entry(map, name, &key)?;
                removed.push(format!(
                    "{}:{}/{} ({name})",
                    Ipv4Addr::from(key.addr),
                    u16::from_be_bytes(key.port),
                    proto_name(key.proto)
                ));
            }
        }
        let slots: Vec<u32> = (0..PORT_USE_SLOTS).collect();
        write_batch(
            self.ports_in_use.map(),
            map_names::PORTS_IN_USE,
            &slots,
            &counts,
            |_| {},
        )?;
        Ok(removed)
    }

    /// The global outcome counters, summed over CPUs: (ingress, egress), in `Outcome` order.
    /// Cheap: one lookup per counter.
    pub fn counters(&self) -> Result<Counters, PfError> {
        let counter = |slot: u32| -> Result<u64, PfError> {
            let values = self.counters.get(&slot, 0).map_err(|source| PfError::Map {
                map: map_names::COUNTERS,
                source,
            })?;
            Ok(values.iter().sum())
        };
        let mut ingress = Vec::new();
        let mut egress = Vec::new();
        for outcome in Outcome::ALL {
            ingress.push((outcome.name(), counter(INGRESS_BASE + outcome as u32)?));
            egress.push((outcome.name(), counter(EGRESS_BASE + outcome as u32)?));
        }
        let fast_path_block = |base: u32| {
            FastPath::ALL
                .iter()
                .map(|&f| Ok((f.name(), counter(base + f as u32)?)))
                .collect::<Result<Vec<_>, PfError>>()
        };
        Ok(Counters {
            ingress,
            egress,
            fast_path: fast_path_block(FAST_PATH_BASE)?,
            reply_fast_path: fast_path_block(REPLY_FAST_PATH_BASE)?,
            egress_by_helpers: counter(EGRESS_BY_HELPERS)?,
            trigger: Trigger::ALL
                .iter()
                .map(|&t| Ok((t.name(), counter(TRIGGER_BASE + t as u32)?)))
                .collect::<Result<Vec<_>, PfError>>()?,
            gate_closed: counter(GATE_CLOSED)?,
            trigger_events_lost: counter(TRIGGER_EVENTS_LOST)?,
        })
    }

    /// The fast paths' device maps, by ifindex: (`REDIRECT_DEVICES`, `PUBLIC_DEVICES`).
    pub fn fast_path_devices(&self) -> Result<(Vec<u32>, Vec<u32>), PfError> {
        let keys = |map: &DevMapHash<MapData>, name: &'static str| {
            let mut keys = map
                .keys()
                .collect::<Result<Vec<u32>, _>>()
                .map_err(|source| PfError::Map { map: name, source })?;
            keys.sort_unstable();
            Ok::<_, PfError>(keys)
        };
        Ok((
            keys(&self.redirect_devices, map_names::REDIRECT_DEVICES)?,
            keys(&self.public_devices, map_names::PUBLIC_DEVICES)?,
        ))
    }

    /// Makes the fast paths' device maps hold exactly `redirect` and `public` (ifindexes):
    /// additions first, then removals, so a device that stays is never missing in between.
    pub(crate) fn set_fast_path_devices(
        &mut self,
        redirect: &[u32],
        public: &[u32],
    ) -> Result<(), PfError> {
        let (old_redirect, old_public) = self.fast_path_devices()?;
        for (map, name, old, new) in [
            (
                &mut self.redirect_devices,
                map_names::REDIRECT_DEVICES,
                old_redirect,
                redirect,
            ),
            (
                &mut self.public_devices,
                map_names::PUBLIC_DEVICES,
                old_public,
                public,
            ),
        ] {
            let map_err = |source: MapError| PfError::Map { map: name, source };
            for &ifindex in new.iter().filter(|i| !old.contains(i)) {
                map.insert(ifindex, ifindex, None, 0).map_err(|e| match e {
                    XdpMapError::MapError(source) => map_err(source),
                    // Only with a program attached to the entry, which pf never asks for.
                    other => PfError::io(
                        format!("map {name}: adding device {ifindex}"),
                        std::io::Error::other(other.to_string()),
                    ),
                })?;
            }
            for ifindex in old.iter().filter(|i| !new.contains(i)) {
                match map.remove(*ifindex) {
                    Err(e) if !not_found(&e) => return Err(map_err(e)),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The tunnel networks egress keeps from leaving unrewritten.
    pub fn tunnel_networks(&self) -> Result<Vec<Ipv4Net>, PfError> {
        let value = self
            .tunnel_networks
            .get(&0, 0)
            .map_err(|source| PfError::Map {
                map: map_names::TUNNEL_NETWORKS,
                source,
            })?;
        Ok(value
            .networks
            .iter()
            .take(value.count as usize)
            .map(|n| Ipv4Net {
                addr: Ipv4Addr::from(n.addr),
                prefix: u32::from_be_bytes(n.mask).count_ones() as u8,
            })
            .collect())
    }

    /// Makes egress drop unrewritten packets from `networks`, or, empty, nothing. One write:
    /// the programs see the old set or the new, never a mix.
    pub fn set_tunnel_networks(&mut self, networks: &[Ipv4Net]) -> Result<(), PfError> {
        if networks.len() > MAX_TUNNEL_NETWORKS {
            return Err(PfError::TooManyTunnelNetworks {
                count: networks.len(),
                max: MAX_TUNNEL_NETWORKS,
            });
        }
        let mut value = TunnelNetworks {
            count: networks.len() as u32,
            networks: [TunnelNetwork::default(); MAX_TUNNEL_NETWORKS],
        };
        for (slot, net) in value.networks.iter_mut().zip(networks) {
            *slot = TunnelNetwork {
                addr: (u32::from(net.addr) & net.mask()).to_be_bytes(),
                mask: net.mask().to_be_bytes(),
            };
        }
        self.tunnel_networks
            .set(0, value, 0)
            .map_err(|source| PfError::Map {
                map: map_names::TUNNEL_NETWORKS,
                source,
            })
    }

    /// The global counters and every reservation's traffic: both NAT maps are read whole, in a
    /// few batched syscalls, and summed per reservation.
    pub fn stats(&self) -> Result<Stats, PfError> {
        Ok(Stats {
            counters: self.counters()?,
            reservations: self.traffic_all()?,
            tunnel_networks: self.tunnel_networks()?,
        })
    }

    /// The traffic of one reservation's entries now in the maps (looked up one by one: a
    /// release or disable reads it just before the entries go).
    pub fn traffic(&self, r: &Reservation) -> Result<Traffic, PfError> {
        let mut t = Traffic::default();
        for pair in nat_pairs(r) {
            if let Some(e) = lookup(&self.forward, map_names::FORWARD_NAT, &pair.forward)? {
                t.in_packets += e.packets;
                t.in_bytes += e.bytes;
            }
            if let Some(e) = lookup(&self.reverse, map_names::REVERSE_NAT, &pair.reverse)? {
                t.out_packets += e.packets;
                t.out_bytes += e.bytes;
            }
        }
        Ok(t)
    }

    /// Every reservation in the maps with its traffic (the maps read in batches).
    pub fn traffic_all(&self) -> Result<Vec<(Reservation, Traffic)>, PfError> {
        let forward: std::collections::HashMap<EndpointKey, NatEntry> =
            dump(self.forward.map(), map_names::FORWARD_NAT)?
                .into_iter()
                .collect();
        let reverse: std::collections::HashMap<EndpointKey, NatEntry> =
            dump(self.reverse.map(), map_names::REVERSE_NAT)?
                .into_iter()
                .collect();
        let mut reservations = Vec::new();
        for r in self.list()? {
            let mut t = Traffic::default();
            for pair in nat_pairs(&r) {
                if let Some(e) = forward.get(&pair.forward) {
                    t.in_packets += e.packets;
                    t.in_bytes += e.bytes;
                }
                if let Some(e) = reverse.get(&pair.reverse) {
                    t.out_packets += e.packets;
                    t.out_bytes += e.bytes;
                }
            }
            reservations.push((r, t));
        }
        Ok(reservations)
    }
}

/// Every element of a map that holds one value per key, read with batched lookups.
pub(super) fn dump<K: bytemuck::Pod, V: bytemuck::Pod>(
    map: &MapData,
    name: &'static str,
) -> Result<Vec<(K, V)>, PfError> {
    batch::lookup_all(map.fd().as_fd())
        .map_err(|source| PfError::io(format!("reading map {name} (BPF_MAP_LOOKUP_BATCH)"), source))
}

/// Whether a map operation failed only because the key was not there. aya reports a lookup's
/// miss as `KeyNotFound`, but a delete's as the syscall's ENOENT.
fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Removes a NAT entry; one already gone is fine (a removal may finish what a crash began).
fn remove_entry(map: &mut NatMap, name: &'static str, key: &EndpointKey) -> Result<(), PfError> {
    match map.remove(key) {
        Err(e) if !not_found(&e) => Err(PfError::Map {
            map: name,
            source: e,
        }),
        _ => Ok(()),
    }
}

fn reservation_to_record(r: &Reservation) -> (ReservationKey, ReservationValue) {
    (
        ReservationKey {
            public_addr: r.public.addr.octets(),
            first_port: r.public.ports.first.to_be_bytes(),
            protocols: r.public.protocols.mask(),
            _pad: 0,
        },
        ReservationValue {
            target_addr: r.target_addr.octets(),
            last_port: r.public.ports.last.to_be_bytes(),
            target_first_port: r.target_first_port.to_be_bytes(),
        },
    )
}

fn record_to_reservation(key: &ReservationKey, value: &ReservationValue) -> Option<Reservation> {
    Some(Reservation {
        public: PublicSpec {
            addr: Ipv4Addr::from(key.public_addr),
            ports: PortRange {
                first: u16::from_be_bytes(key.first_port),
                last: u16::from_be_bytes(value.last_port),
            },
            protocols: Protocols::from_mask(key.protocols)?,
        },
        target_addr: Ipv4Addr::from(value.target_addr),
        target_first_port: u16::from_be_bytes(value.target_first_port),
    })
}
