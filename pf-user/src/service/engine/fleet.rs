//! The engine as one agent of a fleet on a shared store: joining (its name and public IPs
//! recorded, another live agent's IPs refused), and following what other agents change (the
//! store's change counter compared at every tick, a notification making the tick come now).

use std::{sync::Arc, time::Duration};

use super::{ApiError, Engine, reconcile::ReconcileGuard};
use crate::service::{
    fleet::{Agent, Scope},
    store::Record,
};

/// An agent not seen for this long no longer holds its public IPs against a new one.
pub const AGENT_STALE: Duration = Duration::from_secs(60);
/// How often an agent says it is there (and reads which IPs the fleet's others have).
const AGENT_HEARTBEAT: Duration = Duration::from_secs(10);
/// How often an agent reconciles in full, whatever the counter says, reporting drift as a
/// server on its own store does (maps changed under it, a change the counter missed).
const FULL_RECONCILE: Duration = Duration::from_secs(300);

/// This agent's fleet state inside the engine.
pub(super) struct FleetState {
    pub scope: Arc<Scope>,
    /// The store's change counter as this agent last followed it.
    pub followed: Option<i64>,
    /// When this agent last recorded itself (engine ms).
    pub registered_ms: u64,
    /// When this agent last reconciled in full (engine ms).
    pub reconciled_ms: u64,
}

impl Engine {
    /// Joins the fleet on the shared store as `agent`, forwarding this server's
    /// `policy.public_ips`. Refused if another agent seen within [`AGENT_STALE`] claims one of
    /// them (two servers forwarding one IP would each think the other's reservations its own).
    pub fn join_fleet(&mut self, agent: String) -> Result<(), ApiError> {
        let scope = Scope {
            agent,
            own: self.policy.public_ips.iter().copied().collect(),
        };
        let now = self.now_ms();
        let stale_before = now.saturating_sub(AGENT_STALE.as_millis() as u64);
        let agents = self.store.register_agent(&Agent {
            name: scope.agent.clone(),
            public_ips: scope.own.iter().copied().collect(),
            seen_ms: now,
        })?;
        if let Some((other, ip)) = agents
            .iter()
            .filter(|a| a.name != scope.agent && a.seen_ms >= stale_before)
            .find_map(|a| {
                a.public_ips
                    .iter()
                    .find(|ip| scope.own.contains(ip))
                    .map(|ip| (a, ip))
            })
        {
            return Err(ApiError::unavailable(format!(
                "public IP {ip} is agent {}'s (seen {} s ago), and this agent {} claims it too: give each server's pf serve its own policy.public_ips and service.agent",
                other.name,
                now.saturating_sub(other.seen_ms) / 1000,
                scope.agent
            )));
        }
        self.take_fleet_ips(&agents, &scope.agent);
        self.policy.in_fleet = true;
        tracing::info!(
            "agent {} of a fleet of {}: forwarding the reservations on {}",
            scope.agent,
            agents.len(),
            scope
                .own
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.fleet = Some(FleetState {
            scope: Arc::new(scope),
            followed: self.store.fleet_version()?,
            registered_ms: now,
            reconciled_ms: now,
        });
        Ok(())
    }

    /// The fleet's other agents' public IPs, which a change made here may name.
    fn take_fleet_ips(&mut self, agents: &[Agent], me: &str) {
        self.policy.fleet_ips = agents
            .iter()
            .filter(|a| a.name != me)
            .flat_map(|a| a.public_ips.iter().copied())
            .collect();
    }

    /// `record` as this server forwards it (a fleet-wide one on this server's public IP);
    /// `None` for another server's. Every record is this server's without a fleet.
    pub(super) fn localized(&self, record: Record) -> Option<Record> {
        let Some(fleet) = &self.fleet else {
            return Some(record);
        };
        let reservation = fleet.scope.localize(&record.reservation)?;
        Some(Record {
            id: record.id,
            data: crate::service::store::NewRecord {
                reservation,
                ..record.data
            },
        })
    }

    /// Every record this server forwards, as it forwards them (see [`Engine::localized`]):
    /// another server's reservations are its own agent's to forward.
    pub(super) fn local_records(&self) -> Result<Vec<Record>, ApiError> {
        Ok(self
            .store
            .list(None)?
            .into_iter()
            .filter_map(|r| self.localized(r))
            .collect())
    }

    /// At a tick: says this agent is there now and then, and follows the store if another
    /// agent (or anyone) changed it since the last time.
    pub(super) fn follow_fleet(&mut self) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let now = self.now_ms();
        if now.saturating_sub(fleet.registered_ms) >= AGENT_HEARTBEAT.as_millis() as u64 {
            let me = Agent {
                name: fleet.scope.agent.clone(),
                public_ips: fleet.scope.own.iter().copied().collect(),
                seen_ms: now,
            };
            match self.store.register_agent(&me) {
                Ok(agents) => {
                    self.take_fleet_ips(&agents, &me.name);
                    if let Some(f) = self.fleet.as_mut() {
                        f.registered_ms = now;
                    }
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
        if self.fleet.as_ref().is_some_and(|f| {
            now.saturating_sub(f.reconciled_ms) >= FULL_RECONCILE.as_millis() as u64
        }) {
            if let Some(f) = self.fleet.as_mut() {
                f.reconciled_ms = now;
            }
            if let Err(e) = self.reconcile(ReconcileGuard::REPAIR) {
                tracing::warn!("the periodic reconcile: {}", e.message);
            }
        }
        let version = match self.store.fleet_version() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("{e}");
                return;
            }
        };
        if self.fleet.as_ref().is_some_and(|f| f.followed == version) {
            return;
        }
        match self.follow() {
            Ok(applied) => {
                if let Some(f) = self.fleet.as_mut() {
                    f.followed = version;
                }
                if applied > 0 {
                    self.refresh_next_expiry();
                }
            }
            Err(e) => tracing::warn!("following the fleet's store: {}", e.message),
        }
    }

    /// Makes the maps hold this server's enabled reservations as the store has them now:
    /// what other agents changed, applied. How many differences there were.
    fn follow(&mut self) -> Result<usize, ApiError> {
        let report = self.reconcile_as(ReconcileGuard::REPAIR, true)?;
        Ok(report.drifts)
    }
}
