//! A fleet of servers on one store: which reservations are this server's to forward.
//!
//! With a shared (PostgreSQL) store, every agent (`pf serve`) sees every server's
//! reservations. An agent forwards those on its own public IPs; the rest are other servers'.
//! [`Scope`] says which is which, and [`ScopedMaps`] puts that at the one door the engine
//! uses to reach the maps: a change to another server's reservation is made in the store and
//! leaves this server's maps alone (its own agent applies it when it follows the store).

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

use crate::{
    domain::{
        net::Ipv4Net,
        spec::{PublicSpec, Reservation},
    },
    kernel::{
        PfError,
        limit::{Drops, LimitRule},
        state::{Counters, EntryTags, Traffic},
        trigger::{GateState, Guards, TriggerRule},
    },
    service::dataplane::Maps,
};

/// This agent's place in the fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// The agent's name (`service.agent`), unique in the fleet.
    pub agent: String,
    /// The public IPs this server forwards (its `policy.public_ips`).
    pub own: BTreeSet<Ipv4Addr>,
}

impl Scope {
    /// Whether this server forwards `r`.
    pub fn is_local(&self, r: &Reservation) -> bool {
        self.own.contains(&r.public.addr)
    }
}

/// An agent of the fleet as the store records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    pub name: String,
    pub public_ips: Vec<Ipv4Addr>,
    /// When it last said it was there (Unix ms).
    pub seen_ms: u64,
}

/// The maps, seen through a [`Scope`]: changes to reservations that are not this server's do
/// nothing here (the store has them; their own server forwards them).
pub struct ScopedMaps {
    pub inner: Box<dyn Maps>,
    pub scope: Arc<Scope>,
}

impl ScopedMaps {
    fn local(&self, r: &Reservation) -> bool {
        self.scope.is_local(r)
    }
}

impl Maps for ScopedMaps {
    fn list(&self) -> Result<Vec<Reservation>, PfError> {
        self.inner.list()
    }
    fn reserve_all(&mut self, rs: &[Reservation]) -> Result<(), PfError> {
        let local: Vec<Reservation> = rs.iter().filter(|r| self.local(r)).copied().collect();
        self.inner.reserve_all(&local)
    }
    fn release(&mut self, spec: &PublicSpec) -> Result<Reservation, PfError> {
        self.inner.release(spec)
    }
    fn release_exact(&mut self, r: &Reservation) -> Result<Reservation, PfError> {
        if self.local(r) {
            self.inner.release_exact(r)
        } else {
            Ok(*r)
        }
    }
    fn is_complete(&self, r: &Reservation) -> Result<bool, PfError> {
        if self.local(r) {
            self.inner.is_complete(r)
        } else {
            Ok(true)
        }
    }
    fn prune(&mut self, keep: &[Reservation]) -> Result<Vec<String>, PfError> {
        self.inner.prune(keep)
    }
    fn tunnel_networks(&self) -> Result<Vec<Ipv4Net>, PfError> {
        self.inner.tunnel_networks()
    }
    fn set_tunnel_networks(&mut self, networks: &[Ipv4Net]) -> Result<(), PfError> {
        self.inner.set_tunnel_networks(networks)
    }
    fn traffic(&self, r: &Reservation) -> Result<Traffic, PfError> {
        if self.local(r) {
            self.inner.traffic(r)
        } else {
            Ok(Traffic::default())
        }
    }
    fn traffic_all(&self) -> Result<Vec<(Reservation, Traffic)>, PfError> {
        self.inner.traffic_all()
    }
    fn counters(&self) -> Result<Counters, PfError> {
        self.inner.counters()
    }
    fn reserve_guarded(&mut self, r: &Reservation, guards: Guards<'_>) -> Result<(), PfError> {
        if self.local(r) {
            self.inner.reserve_guarded(r, guards)
        } else {
            Ok(())
        }
    }
    fn reserve_tagged(&mut self, r: &Reservation, tags: EntryTags) -> Result<(), PfError> {
        if self.local(r) {
            self.inner.reserve_tagged(r, tags)
        } else {
            Ok(())
        }
    }
    fn is_complete_tagged(&self, r: &Reservation, tags: EntryTags) -> Result<bool, PfError> {
        if self.local(r) {
            self.inner.is_complete_tagged(r, tags)
        } else {
            Ok(true)
        }
    }
    fn sync_triggers(&mut self, rules: &[TriggerRule]) -> Result<Vec<String>, PfError> {
        self.inner.sync_triggers(rules)
    }
    fn sync_limits(&mut self, rules: &[LimitRule]) -> Result<Vec<String>, PfError> {
        self.inner.sync_limits(rules)
    }
    fn limit_drops(&self, slot: u16) -> Result<Drops, PfError> {
        self.inner.limit_drops(slot)
    }
    fn limit_drops_all(&self) -> Result<std::collections::HashMap<u16, Drops>, PfError> {
        self.inner.limit_drops_all()
    }
    fn trigger_gate(&self, gate: u16) -> Result<GateState, PfError> {
        self.inner.trigger_gate(gate)
    }
}
