//! The data plane as the engine sees it: maps to open for one change, and attachments to
//! report. [`KernelDataPlane`] is the real one (pf's pinned maps, under pf's lock); the fake
//! beside it ([`fake`]) lets the engine's operations run in fast host tests without BPF, as
//! Katran's control plane runs with its `testing` flag.

use crate::{
    domain::{
        net::Ipv4Net,
        spec::{PublicSpec, Reservation},
    },
    kernel::{
        PfError,
        attach::{self, Attachment},
        bpffs::PinDir,
        limit::{Drops, LimitRule},
        nftset::NftSet,
        state::{Counters, EntryTags, State, Traffic},
        trigger::{GateState, Guards, Opening, Openings, TriggerRule},
    },
};

/// pf's maps, opened for one change (the kernel's hold pf's lock until dropped).
pub trait Maps {
    /// Every reservation, sorted.
    fn list(&self) -> Result<Vec<Reservation>, PfError>;
    /// Adds reservations all or nothing.
    fn reserve_all(&mut self, rs: &[Reservation]) -> Result<(), PfError>;
    fn reserve(&mut self, r: &Reservation) -> Result<(), PfError> {
        self.reserve_all(std::slice::from_ref(r))
    }
    /// Removes the reservation made exactly as `spec`.
    fn release(&mut self, spec: &PublicSpec) -> Result<Reservation, PfError>;
    /// Removes `r` if the maps hold exactly it, target included.
    fn release_exact(&mut self, r: &Reservation) -> Result<Reservation, PfError>;
    /// Whether every entry of `r` is there and right.
    fn is_complete(&self, r: &Reservation) -> Result<bool, PfError>;
    /// Removes entries none of `keep` accounts for; each as text.
    fn prune(&mut self, keep: &[Reservation]) -> Result<Vec<String>, PfError>;
    fn tunnel_networks(&self) -> Result<Vec<Ipv4Net>, PfError>;
    fn set_tunnel_networks(&mut self, networks: &[Ipv4Net]) -> Result<(), PfError>;
    /// The traffic counted on `r`'s entries now in the maps.
    fn traffic(&self, r: &Reservation) -> Result<Traffic, PfError>;
    /// Every reservation in the maps with its traffic.
    fn traffic_all(&self) -> Result<Vec<(Reservation, Traffic)>, PfError>;
    /// The programs' global outcome counters.
    fn counters(&self) -> Result<Counters, PfError>;
    /// Adds `r` with its limits and behind its trigger rule's gate, arming both, all or
    /// nothing.
    fn reserve_guarded(&mut self, r: &Reservation, guards: Guards<'_>) -> Result<(), PfError>;
    /// Adds `r` with entries carrying `tags`, leaving the rules to [`Maps::sync_triggers`] and
    /// [`Maps::sync_limits`].
    fn reserve_tagged(&mut self, r: &Reservation, tags: EntryTags) -> Result<(), PfError>;
    /// [`Maps::is_complete`], with every entry carrying `tags`.
    fn is_complete_tagged(&self, r: &Reservation, tags: EntryTags) -> Result<bool, PfError>;
    /// Makes the trigger maps hold exactly `rules`; each difference repaired, as text.
    fn sync_triggers(&mut self, rules: &[TriggerRule]) -> Result<Vec<String>, PfError>;
    /// Makes the limit maps hold exactly `rules`; each difference repaired, as text.
    fn sync_limits(&mut self, rules: &[LimitRule]) -> Result<Vec<String>, PfError>;
    /// What limit slot `slot` dropped, by reason.
    fn limit_drops(&self, slot: u16) -> Result<Drops, PfError>;
    /// What every slot that dropped anything dropped, by reason (one batched read).
    fn limit_drops_all(&self) -> Result<std::collections::HashMap<u16, Drops>, PfError>;
    /// A gate as the kernel has it now.
    fn trigger_gate(&self, gate: u16) -> Result<GateState, PfError>;
}

impl Maps for State {
    fn list(&self) -> Result<Vec<Reservation>, PfError> {
        State::list(self)
    }
    fn reserve_all(&mut self, rs: &[Reservation]) -> Result<(), PfError> {
        State::reserve_all(self, rs)
    }
    fn release(&mut self, spec: &PublicSpec) -> Result<Reservation, PfError> {
        State::release(self, spec)
    }
    fn release_exact(&mut self, r: &Reservation) -> Result<Reservation, PfError> {
        State::release_exact(self, r)
    }
    fn is_complete(&self, r: &Reservation) -> Result<bool, PfError> {
        State::is_complete(self, r)
    }
    fn prune(&mut self, keep: &[Reservation]) -> Result<Vec<String>, PfError> {
        State::prune(self, keep)
    }
    fn tunnel_networks(&self) -> Result<Vec<Ipv4Net>, PfError> {
        State::tunnel_networks(self)
    }
    fn set_tunnel_networks(&mut self, networks: &[Ipv4Net]) -> Result<(), PfError> {
        State::set_tunnel_networks(self, networks)
    }
    fn traffic(&self, r: &Reservation) -> Result<Traffic, PfError> {
        State::traffic(self, r)
    }
    fn traffic_all(&self) -> Result<Vec<(Reservation, Traffic)>, PfError> {
        State::traffic_all(self)
    }
    fn counters(&self) -> Result<Counters, PfError> {
        State::counters(self)
    }
    fn reserve_guarded(&mut self, r: &Reservation, guards: Guards<'_>) -> Result<(), PfError> {
        State::reserve_guarded(self, r, guards)
    }
    fn reserve_tagged(&mut self, r: &Reservation, tags: EntryTags) -> Result<(), PfError> {
        State::reserve_tagged(self, r, tags)
    }
    fn is_complete_tagged(&self, r: &Reservation, tags: EntryTags) -> Result<bool, PfError> {
        State::is_complete_tagged(self, r, tags)
    }
    fn sync_triggers(&mut self, rules: &[TriggerRule]) -> Result<Vec<String>, PfError> {
        State::sync_triggers(self, rules)
    }
    fn sync_limits(&mut self, rules: &[LimitRule]) -> Result<Vec<String>, PfError> {
        State::sync_limits(self, rules)
    }
    fn limit_drops(&self, slot: u16) -> Result<Drops, PfError> {
        State::limit_drops(self, slot)
    }
    fn limit_drops_all(&self) -> Result<std::collections::HashMap<u16, Drops>, PfError> {
        State::limit_drops_all(self)
    }
    fn trigger_gate(&self, gate: u16) -> Result<GateState, PfError> {
        State::trigger_gate(self, gate)
    }
}

/// What the engine needs of the data plane.
pub trait DataPlane: Send {
    /// The maps, for one change.
    fn open(&mut self) -> Result<Box<dyn Maps>, PfError>;
    /// The attachments, as the kernel has them (for `/v1/status`).
    fn attachments(&self) -> Vec<Attachment>;
    /// The trigger gates opened since the last call, as the trigger program reported them.
    fn openings(&mut self) -> Vec<Opening>;
}

/// pf's pinned maps. The first open (the start) makes them if they are missing and records
/// their kernel ids: the maps the attached programs read. Every later open refuses
/// ([`PfError::MapsReplaced`]) if the pinned maps are gone or others, rather than writing
/// maps no program reads.
pub struct KernelDataPlane {
    dir: PinDir,
    map_ids: Option<[u32; pf_common::map_names::COUNT]>,
    /// The nftables set kept equal to the maps' reservations, if the config names one.
    netfilter: Option<NftSet>,
    /// The ring of trigger openings, opened once the maps exist.
    openings: Option<Openings>,
}

impl KernelDataPlane {
    pub fn new(dir: PinDir) -> Self {
        Self {
            dir,
            map_ids: None,
            netfilter: None,
            openings: None,
        }
    }

    /// Keeps `set` holding the target endpoints of every reservation in the maps.
    pub fn with_netfilter_set(mut self, set: Option<NftSet>) -> Self {
        self.netfilter = set;
        self
    }

    fn wrap(&self, state: State) -> Box<dyn Maps> {
        match &self.netfilter {
            Some(set) => Box::new(WithNetfilterSet {
                maps: state,
                set: set.clone(),
            }),
            None => Box::new(state),
        }
    }
}

impl DataPlane for KernelDataPlane {
    fn open(&mut self) -> Result<Box<dyn Maps>, PfError> {
        let Some(want) = self.map_ids else {
            let state = State::open_for_write(&self.dir)?;
            self.map_ids = Some(state.map_ids());
            return Ok(self.wrap(state));
        };
        let state = State::open_existing_for_write(&self.dir)?;
        if state.map_ids() != want {
            return Err(PfError::MapsReplaced(self.dir.root().to_path_buf()));
        }
        Ok(self.wrap(state))
    }

    fn attachments(&self) -> Vec<Attachment> {
        attach::inspect(&self.dir)
    }

    fn openings(&mut self) -> Vec<Opening> {
        if self.openings.is_none() && self.map_ids.is_some() {
            match Openings::open(&self.dir) {
                Ok(ring) => self.openings = Some(ring),
                Err(e) => tracing::warn!("reading trigger openings: {e}"),
            }
        }
        self.openings
            .as_mut()
            .map(Openings::drain)
            .unwrap_or_default()
    }
}

/// The maps, with the nftables set of reserved targets following them: added after the maps
/// (a set that fails undoes the maps' write, so the change is refused whole), removed after
/// them (a set that fails then is logged and left to the next start's reconcile: the port has
/// stopped forwarding, which matters first), and made exact by the reconcile's prune.
struct WithNetfilterSet {
    maps: State,
    set: NftSet,
}

impl WithNetfilterSet {
    fn forget(&self, r: &Reservation) {
        if let Err(e) = self.set.delete(std::slice::from_ref(r)) {
            tracing::warn!(
                "{r} no longer forwards, but its target stays in the nftables set until the next start (so the ruleset still admits traffic to it, and a new reservation of an overlapping target range is refused): {e}"
            );
        }
    }
}

impl Maps for WithNetfilterSet {
    fn list(&self) -> Result<Vec<Reservation>, PfError> {
        self.maps.list()
    }
    fn reserve_all(&mut self, rs: &[Reservation]) -> Result<(), PfError> {
        self.maps.reserve_all(rs)?;
        if let Err(e) = self.set.add(rs) {
            for r in rs {
                let _ = self.maps.release_exact(r);
            }
            return Err(e);
        }
        Ok(())
    }
    fn release(&mut self, spec: &PublicSpec) -> Result<Reservation, PfError> {
        let r = self.maps.release(spec)?;
        self.forget(&r);
        Ok(r)
    }
    fn release_exact(&mut self, r: &Reservation) -> Result<Reservation, PfError> {
        let r = self.maps.release_exact(r)?;
        self.forget(&r);
        Ok(r)
    }
    fn is_complete(&self, r: &Reservation) -> Result<bool, PfError> {
        self.maps.is_complete(r)
    }
    fn prune(&mut self, keep: &[Reservation]) -> Result<Vec<String>, PfError> {
        let removed = self.maps.prune(keep)?;
        self.set.replace(keep)?;
        Ok(removed)
    }
    fn tunnel_networks(&self) -> Result<Vec<Ipv4Net>, PfError> {
        self.maps.tunnel_networks()
    }
    fn set_tunnel_networks(&mut self, networks: &[Ipv4Net]) -> Result<(), PfError> {
        self.maps.set_tunnel_networks(networks)
    }
    fn traffic(&self, r: &Reservation) -> Result<Traffic, PfError> {
        self.maps.traffic(r)
    }
    fn traffic_all(&self) -> Result<Vec<(Reservation, Traffic)>, PfError> {
        self.maps.traffic_all()
    }
    fn counters(&self) -> Result<Counters, PfError> {
        self.maps.counters()
    }
    fn reserve_guarded(&mut self, r: &Reservation, guards: Guards<'_>) -> Result<(), PfError> {
        self.maps.reserve_guarded(r, guards)?;
        if let Err(e) = self.set.add(std::slice::from_ref(r)) {
            // Releasing it disarms its rule and its limits too.
            let _ = self.maps.release_exact(r);
            return Err(e);
        }
        Ok(())
    }
    fn reserve_tagged(&mut self, r: &Reservation, tags: EntryTags) -> Result<(), PfError> {
        self.maps.reserve_tagged(r, tags)?;
        if let Err(e) = self.set.add(std::slice::from_ref(r)) {
            let _ = self.maps.release_exact(r);
            return Err(e);
        }
        Ok(())
    }
    fn is_complete_tagged(&self, r: &Reservation, tags: EntryTags) -> Result<bool, PfError> {
        self.maps.is_complete_tagged(r, tags)
    }
    fn sync_triggers(&mut self, rules: &[TriggerRule]) -> Result<Vec<String>, PfError> {
        self.maps.sync_triggers(rules)
    }
    fn sync_limits(&mut self, rules: &[LimitRule]) -> Result<Vec<String>, PfError> {
        self.maps.sync_limits(rules)
    }
    fn limit_drops(&self, slot: u16) -> Result<Drops, PfError> {
        self.maps.limit_drops(slot)
    }
    fn limit_drops_all(&self) -> Result<std::collections::HashMap<u16, Drops>, PfError> {
        self.maps.limit_drops_all()
    }
    fn trigger_gate(&self, gate: u16) -> Result<GateState, PfError> {
        self.maps.trigger_gate(gate)
    }
}

/// A data plane in memory, for host tests of the engine: the same all-or-nothing and
/// conflict rules as the kernel's maps, and a switch that makes the next map write fail.
#[cfg(test)]
pub mod fake {
    use std::{
        collections::BTreeMap,
        net::Ipv4Addr,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use super::{DataPlane, Maps};
    use crate::{
        domain::{
            net::Ipv4Net,
            spec::{PublicSpec, Reservation},
        },
        kernel::{
            PfError,
            attach::Attachment,
            limit::{Drops, LimitRule},
            state::{Counters, EntryTags, Traffic},
            trigger::{GateState, Guards, Opening, TriggerRule},
        },
    };

    #[derive(Default)]
    pub struct Contents {
        /// Keyed by public address, first port and protocols, as `RESERVATIONS` is.
        pub reservations: BTreeMap<(Ipv4Addr, u16, u8), Reservation>,
        pub tunnel_networks: Vec<Ipv4Net>,
        /// What each reservation's entries counted, as the programs would.
        pub traffic: BTreeMap<(Ipv4Addr, u16, u8), Traffic>,
        /// The next write fails with this message.
        pub fail_next_write: Option<String>,
        /// Armed trigger rules by gate, armed limits by slot, and what each reservation's
        /// entries carry.
        pub triggers: BTreeMap<u16, TriggerRule>,
        pub limits: BTreeMap<u16, LimitRule>,
        pub tags: BTreeMap<(Ipv4Addr, u16, u8), EntryTags>,
        /// Drops a test says a limit slot counted, as the programs would.
        pub drops: BTreeMap<u16, Drops>,
        /// Gates open now (a test opens them as a trigger packet would), and the openings
        /// not yet read.
        pub open: std::collections::BTreeSet<u16>,
        pub openings: Vec<Opening>,
    }

    /// Cloned handles share one set of maps: the test keeps one to look inside.
    #[derive(Clone, Default)]
    pub struct FakeDataPlane(pub Arc<Mutex<Contents>>);

    struct FakeMaps(Arc<Mutex<Contents>>);

    fn key(r: &Reservation) -> (Ipv4Addr, u16, u8) {
        (
            r.public.addr,
            r.public.ports.first,
            r.public.protocols.mask(),
        )
    }

    fn failure(message: String) -> PfError {
        PfError::Io {
            what: "the fake maps".into(),
            source: std::io::Error::other(message),
        }
    }

    impl FakeMaps {
        fn write(&self) -> Result<std::sync::MutexGuard<'_, Contents>, PfError> {
            let mut c = self.0.lock().unwrap();
            match c.fail_next_write.take() {
                Some(message) => Err(failure(message)),
                None => Ok(c),
            }
        }
    }

    impl Maps for FakeMaps {
        fn list(&self) -> Result<Vec<Reservation>, PfError> {
            let mut all: Vec<Reservation> = self
                .0
                .lock()
                .unwrap()
                .reservations
                .values()
                .copied()
                .collect();
            all.sort();
            Ok(all)
        }

        fn reserve_all(&mut self, rs: &[Reservation]) -> Result<(), PfError> {
            let mut c = self.write()?;
            let mut all: Vec<Reservation> = c.reservations.values().copied().collect();
            for r in rs {
                if let Some(existing) = all.iter().find(|e| e.public.overlaps(&r.public)) {
                    return Err(PfError::Conflict {
                        public: r.public.to_string(),
                        existing: *existing,
                    });
                }
                if let Some(existing) = all.iter().find(|e| {
                    e.target_addr == r.target_addr
                        && e.public.protocols.overlaps(r.public.protocols)
                        && e.target_ports().overlaps(r.target_ports())
                }) {
                    return Err(PfError::AmbiguousTarget {
                        target: r.target_addr.to_string(),
                        existing: *existing,
                    });
                }
                all.push(*r);
            }
            for r in rs {
                c.reservations.insert(key(r), *r);
            }
            Ok(())
        }

        fn release(&mut self, spec: &PublicSpec) -> Result<Reservation, PfError> {
            let mut c = self.write()?;
            let k = (spec.addr, spec.ports.first, spec.protocols.mask());
            match c.reservations.get(&k) {
                Some(r) if r.public == *spec => {
                    c.traffic.remove(&k);
                    // Releasing a gated reservation disarms its rule, as the kernel's does.
                    if let Some(tags) = c.tags.remove(&k) {
                        c.triggers.remove(&tags.gate);
                        c.limits.remove(&tags.limit);
                    }
                    Ok(c.reservations.remove(&k).unwrap())
                }
                _ => Err(PfError::NoSuchReservation {
                    spec: spec.to_string(),
                    hint: String::new(),
                }),
            }
        }

        fn release_exact(&mut self, r: &Reservation) -> Result<Reservation, PfError> {
            let held = self.0.lock().unwrap().reservations.get(&key(r)).copied();
            match held {
                Some(held) if held == *r => self.release(&r.public),
                other => Err(PfError::NoSuchReservation {
                    spec: r.to_string(),
                    hint: other
                        .map(|o| format!("; the maps hold {o} there"))
                        .unwrap_or_default(),
                }),
            }
        }

        fn is_complete(&self, _r: &Reservation) -> Result<bool, PfError> {
            Ok(true)
        }

        fn prune(&mut self, _keep: &[Reservation]) -> Result<Vec<String>, PfError> {
            Ok(Vec::new())
        }

        fn tunnel_networks(&self) -> Result<Vec<Ipv4Net>, PfError> {
            Ok(self.0.lock().unwrap().tunnel_networks.clone())
        }

        fn set_tunnel_networks(&mut self, networks: &[Ipv4Net]) -> Result<(), PfError> {
            self.write()?.tunnel_networks = networks.to_vec();
            Ok(())
        }

        fn traffic(&self, r: &Reservation) -> Result<Traffic, PfError> {
            let c = self.0.lock().unwrap();
            Ok(match c.reservations.get(&key(r)) {
                Some(held) if held == r => c.traffic.get(&key(r)).copied().unwrap_or_default(),
                _ => Traffic::default(),
            })
        }

        fn traffic_all(&self) -> Result<Vec<(Reservation, Traffic)>, PfError> {
            let c = self.0.lock().unwrap();
            Ok(c.reservations
                .iter()
                .map(|(k, r)| (*r, c.traffic.get(k).copied().unwrap_or_default()))
                .collect())
        }

        fn counters(&self) -> Result<Counters, PfError> {
            Ok(Counters {
                ingress: vec![("rewritten", 0)],
                egress: vec![("rewritten", 0)],
                ..Counters::default()
            })
        }

        fn reserve_guarded(&mut self, r: &Reservation, guards: Guards<'_>) -> Result<(), PfError> {
            self.reserve_all(std::slice::from_ref(r))?;
            let mut c = self.0.lock().unwrap();
            let mut tags = EntryTags::default();
            if let Some(rule) = guards.trigger {
                tags.gate = rule.gate;
                c.triggers.insert(rule.gate, *rule);
            }
            if let Some(rule) = guards.limit {
                tags.limit = rule.slot;
                c.limits.insert(rule.slot, rule.clone());
            }
            c.tags.insert(key(r), tags);
            Ok(())
        }

        fn reserve_tagged(&mut self, r: &Reservation, tags: EntryTags) -> Result<(), PfError> {
            self.reserve_all(std::slice::from_ref(r))?;
            self.0.lock().unwrap().tags.insert(key(r), tags);
            Ok(())
        }

        fn is_complete_tagged(&self, r: &Reservation, tags: EntryTags) -> Result<bool, PfError> {
            let c = self.0.lock().unwrap();
            Ok(c.tags.get(&key(r)).copied().unwrap_or_default() == tags)
        }

        fn sync_limits(&mut self, rules: &[LimitRule]) -> Result<Vec<String>, PfError> {
            let mut c = self.write()?;
            let want: BTreeMap<u16, LimitRule> =
                rules.iter().map(|r| (r.slot, r.clone())).collect();
            let drifts = if c.limits == want {
                Vec::new()
            } else {
                vec!["limits".to_string()]
            };
            c.limits = want;
            Ok(drifts)
        }

        fn limit_drops(&self, slot: u16) -> Result<Drops, PfError> {
            Ok(self
                .0
                .lock()
                .unwrap()
                .drops
                .get(&slot)
                .copied()
                .unwrap_or_default())
        }

        fn limit_drops_all(&self) -> Result<std::collections::HashMap<u16, Drops>, PfError> {
            Ok(self.0.lock().unwrap().drops.clone().into_iter().collect())
        }

        fn sync_triggers(&mut self, rules: &[TriggerRule]) -> Result<Vec<String>, PfError> {
            let mut c = self.write()?;
            let want: BTreeMap<u16, TriggerRule> = rules.iter().map(|r| (r.gate, *r)).collect();
            let drifts = if c.triggers == want {
                Vec::new()
            } else {
                vec!["trigger rules".to_string()]
            };
            c.triggers = want;
            Ok(drifts)
        }

        fn trigger_gate(&self, gate: u16) -> Result<GateState, PfError> {
            let c = self.0.lock().unwrap();
            let armed = c.triggers.contains_key(&gate);
            Ok(GateState {
                armed,
                open_for: (armed && c.open.contains(&gate)).then(|| Duration::from_secs(60)),
                expires_ns: 0,
            })
        }
    }

    impl DataPlane for FakeDataPlane {
        fn open(&mut self) -> Result<Box<dyn Maps>, PfError> {
            Ok(Box::new(FakeMaps(self.0.clone())))
        }

        fn attachments(&self) -> Vec<Attachment> {
            Vec::new()
        }

        fn openings(&mut self) -> Vec<Opening> {
            std::mem::take(&mut self.0.lock().unwrap().openings)
        }
    }

    impl FakeDataPlane {
        /// Counts traffic on `r`'s entries, as the programs would while it is in the maps.
        pub fn count(&self, r: &Reservation, t: Traffic) {
            let mut c = self.0.lock().unwrap();
            if c.reservations.contains_key(&key(r)) {
                *c.traffic.entry(key(r)).or_default() += t;
            }
        }

        /// The reservations in the maps, as text, sorted.
        pub fn held(&self) -> Vec<String> {
            let mut all: Vec<String> = self
                .0
                .lock()
                .unwrap()
                .reservations
                .values()
                .map(ToString::to_string)
                .collect();
            all.sort();
            all
        }
    }
}
