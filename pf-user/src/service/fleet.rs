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
    /// `r` as this server forwards it: a reservation on one of its public IPs as it is, a
    /// fleet-wide one on its first public IP; `None` for another server's.
    pub fn localize(&self, r: &Reservation) -> Option<Reservation> {
        if r.public.is_fleet() {
            let mut local = *r;
            local.public.addr = *self.own.first()?;
            return Some(local);
        }
        self.own.contains(&r.public.addr).then_some(*r)
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
    fn local(&self, r: &Reservation) -> Option<Reservation> {
        self.scope.localize(r)
    }
}

impl Maps for ScopedMaps {
    fn list(&self) -> Result<Vec<Reservation>, PfError> {
        self.inner.list()
    }
    fn reserve_all(&mut self, rs: &[Reservation]) -> Result<(), PfError> {
        let local: Vec<Reservation> = rs.iter().filter_map(|r| self.local(r)).collect();
        self.inner.reserve_all(&local)
    }
    fn release(&mut self, spec: &PublicSpec) -> Result<Reservation, PfError> {
        self.inner.release(spec)
    }
    fn release_exact(&mut self, r: &Reservation) -> Result<Reservation, PfError> {
        match self.local(r) {
            Some(r) => self.inner.release_exact(&r),
            None => Ok(*r),
        }
    }
    fn is_complete(&self, r: &Reservation) -> Result<bool, PfError> {
        match self.local(r) {
            Some(r) => self.inner.is_complete(&r),
            None => Ok(true),
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
        match self.local(r) {
            Some(r) => self.inner.traffic(&r),
            None => Ok(Traffic::default()),
        }
    }
    fn traffic_all(&self) -> Result<Vec<(Reservation, Traffic)>, PfError> {
        self.inner.traffic_all()
    }
    fn counters(&self) -> Result<Counters, PfError> {
        self.inner.counters()
    }
    fn reserve_guarded(&mut self, r: &Reservation, guards: Guards<'_>) -> Result<(), PfError> {
        match self.local(r) {
            Some(r) => self.inner.reserve_guarded(&r, guards),
            None => Ok(()),
        }
    }
    fn reserve_tagged(&mut self, r: &Reservation, tags: EntryTags) -> Result<(), PfError> {
        match self.local(r) {
            Some(r) => self.inner.reserve_tagged(&r, tags),
            None => Ok(()),
        }
    }
    fn is_complete_tagged(&self, r: &Reservation, tags: EntryTags) -> Result<bool, PfError> {
        match self.local(r) {
            Some(r) => self.inner.is_complete_tagged(&r, tags),
            None => Ok(true),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_wide_reservation_is_forwarded_on_each_servers_own_ip() {
        let scope = Scope {
            agent: "a".into(),
            own: [Ipv4Addr::new(198, 18, 1, 1), Ipv4Addr::new(198, 18, 1, 9)].into(),
        };
        let r = |public: &str| {
            Reservation::new(public.parse().unwrap(), "10.8.0.2".parse().unwrap()).unwrap()
        };
        let fleet = r("fleet:8080/tcp");
        assert_eq!(fleet.public.to_string(), "fleet:8080/tcp");
        assert_eq!(scope.localize(&fleet), Some(r("198.18.1.1:8080/tcp")));
        assert_eq!(
            scope.localize(&r("198.18.1.9:80/udp")),
            Some(r("198.18.1.9:80/udp"))
        );
        assert_eq!(
            scope.localize(&r("198.18.2.1:80/udp")),
            None,
            "another server's"
        );
        // The unspecified address itself is never a public side; only the word is.
        assert!("0.0.0.0:8080/tcp".parse::<PublicSpec>().is_err());
    }
}
