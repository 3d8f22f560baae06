//! Reservations held against the policy in force: at start, and when a reload (SIGHUP) brings
//! a new policy. A policy that narrows (a smaller port pool, a new forbidden port, a lower
//! quota) does not make what was granted before disappear by itself: each reservation it
//! would refuse today is a violation, reported (log, `GET /v1/status`, `pf status`), refused
//! renewal and re-enabling, and disabled only where `policy.on_violation = "disable"` says so.
//! A target that is the server itself (made before the rule existed, or before the server
//! took that address) is disabled whatever that says: it would expose the server.

use std::collections::HashMap;

/// A review logs this many violations one by one, then a count.
const LOGGED_VIOLATIONS: usize = 20;

use serde::Serialize;
use serde_json::json;

use super::{ApiError, Engine, local_addresses, record_json};
use crate::service::{
    audit::Caller,
    policy::{OnViolation, Policy, Refusal, TARGET_NOT_SERVER},
    store::Record,
};

/// A reservation the policy in force would refuse, with the first rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub id: u64,
    pub owner: String,
    pub public: String,
    pub enabled: bool,
    pub rule: &'static str,
    pub detail: String,
}

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Reservations the new policy would refuse.
    pub violations: usize,
    /// Of those, how many this reload disabled (`policy.on_violation = "disable"`).
    pub disabled: usize,
}

impl Engine {
    /// Each reservation the policy in force would refuse, in id order: the policy's checks
    /// (public IP, target, range, ports, the server's listening sockets), the lifetime left
    /// against `max_ttl`, and the owner's quota (counted in id order, so the newest
    /// reservations are the ones past it).
    fn find_violations(&self) -> Result<Vec<(Record, Refusal)>, ApiError> {
        // By id (the store lists so): the quota falls on the newest. The quota counts the
        // owner's ports on every server; the other checks are for this server's own.
        let records = self.store.list(None)?;
        let listening = self.listening();
        let local = local_addresses()?;
        let now = self.now_ms();
        let mut held: HashMap<String, u64> = HashMap::new();
        let mut found = Vec::new();
        for record in records {
            let ports = held.entry(record.owner.clone()).or_default();
            *ports += u64::from(record.reservation.public.ports.len());
            let Some(record) = self.localized(record) else {
                continue;
            };
            // The server itself first: that one is disabled whatever else it breaks.
            let verdict = self
                .policy
                .check_target(&record.reservation, &local)
                .and_then(|()| self.policy.check(&record.reservation, &listening, &local))
                .and_then(|()| self.policy.check_remaining(record.expires_ms, now))
                .and_then(|()| quota(&self.policy, &record.owner, *ports));
            if let Err(refusal) = verdict {
                found.push((record, refusal));
            }
        }
        Ok(found)
    }

    /// Re-checks every reservation against the policy in force and keeps the answer for
    /// status. The first violations are logged one by one, then a count (a policy that
    /// narrowed may leave thousands). Returns how many there are.
    pub fn review(&mut self) -> Result<usize, ApiError> {
        let found = self.find_violations()?;
        for (record, refusal) in found.iter().take(LOGGED_VIOLATIONS) {
            tracing::warn!(
                "reservation {} ({}, owner {}) breaks the policy: {refusal}{}",
                record.id,
                record.reservation,
                record.owner,
                match (record.enabled, self.policy.on_violation) {
                    (false, _) => " (disabled)",
                    _ if refusal.rule == TARGET_NOT_SERVER => "",
                    (true, OnViolation::Report) => {
                        " (it keeps forwarding, but cannot be renewed or enabled again; policy.on_violation = \"disable\" would disable it)"
                    }
                    (true, OnViolation::Disable) => "",
                }
            );
        }
        if found.len() > LOGGED_VIOLATIONS {
            tracing::warn!(
                "... and {} more reservations break the policy (GET /v1/status counts them; pf status lists the first)",
                found.len() - LOGGED_VIOLATIONS
            );
        }
        self.violations = found
            .into_iter()
            .map(|(r, refusal)| {
                (
                    r.id,
                    Violation {
                        id: r.id,
                        owner: r.owner.clone(),
                        public: r.reservation.public.to_string(),
                        enabled: r.enabled,
                        rule: refusal.rule,
                        detail: refusal.detail,
                    },
                )
            })
            .collect();
        Ok(self.violations.len())
    }

    /// The violations found by the last review, by id, less the reservations gone since.
    pub fn violations(&self) -> impl Iterator<Item = &Violation> {
        self.violations.values()
    }

    /// A reservation is gone (released, expired) or changed so that it passes: it is no
    /// violation any more.
    pub fn forget_violation(&mut self, id: u64) {
        self.violations.remove(&id);
    }

    /// Reviews every reservation (see [`Engine::review`]) and disables in the store, each
    /// audited, the enabled ones that target the server itself and, where
    /// `policy.on_violation = "disable"`, every other violator. With a read-only store they
    /// stay, with a warning; with an audit log that cannot be written, nothing is disabled and
    /// the error says why. The caller brings the maps in line (a reconcile).
    pub fn enforce(&mut self) -> Result<ReloadReport, ApiError> {
        let violations = self.review()?;
        let disable_all = self.policy.on_violation == OnViolation::Disable;
        let due: Vec<Violation> = self
            .violations
            .values()
            .filter(|v| v.enabled && (disable_all || v.rule == TARGET_NOT_SERVER))
            .cloned()
            .collect();
        let mut disabled = 0;
        if due.is_empty() {
            return Ok(ReloadReport {
                violations,
                disabled,
            });
        }
        if self.store.read_only().is_some() {
            for v in &due {
                tracing::warn!(
                    "reservation {} ({}) breaks {}: {} (the store is read-only, so it stays)",
                    v.id,
                    v.public,
                    v.rule,
                    v.detail
                );
            }
            return Ok(ReloadReport {
                violations,
                disabled,
            });
        }
        if let Err(e) = self.audit.ready() {
            return Err(ApiError::unavailable(format!(
                "{} reservations must be disabled (they target the server itself, or break the policy and policy.on_violation = \"disable\"), but the audit log {} cannot be written ({e})",
                due.len(),
                self.audit.path().display()
            )));
        }
        for v in due {
            let Ok(record) = self.get(v.id) else {
                continue;
            };
            let why = format!("refused by {}: {}", v.rule, v.detail);
            // As an API disable does it: the counters read and carried, the store first,
            // then the maps, where they hold it (at a boot they are empty; a map failure sets
            // a repair, which the next tick's reconcile makes).
            let mut state = self.open_state()?;
            self.disable_in_store(state.as_ref(), &record)?;
            let tags = self.entry_tags(record.id).unwrap_or_default();
            if state
                .is_complete_tagged(&record.reservation, tags)
                .unwrap_or(true)
                && let Err(e) = self.unmap_after_store(state.as_mut(), &record, "disabled")
            {
                tracing::error!("{}", e.message);
            }
            if let Some(kept) = self.violations.get_mut(&v.id) {
                kept.enabled = false;
            }
            disabled += 1;
            tracing::warn!(
                "disabled reservation {} ({}, owner {}): {why}",
                record.id,
                record.reservation,
                record.owner
            );
            let mut done = record_json(&record);
            done["enabled"] = json!(false);
            self.audit(Caller::SERVICE, "disable", "ok", &done, Some(&why));
        }
        Ok(ReloadReport {
            violations,
            disabled,
        })
    }

    /// A reload's new policy: takes it, enforces it on every reservation as it says, and
    /// brings the maps in line (the egress leak guard's networks included).
    pub fn reload(&mut self, mut policy: Policy) -> Result<ReloadReport, ApiError> {
        // In a fleet: the other agents' IPs stay, and this server's scope is its new
        // public IPs, recorded at the next tick.
        policy.fleet_ips = std::mem::take(&mut self.policy.fleet_ips);
        policy.in_fleet = self.policy.in_fleet;
        if let Some(fleet) = self.fleet.as_mut() {
            let mut scope = (*fleet.scope).clone();
            scope.own = policy.public_ips.iter().copied().collect();
            fleet.scope = std::sync::Arc::new(scope);
            fleet.registered_ms = 0;
        }
        self.policy = policy;
        let report = self.enforce()?;
        self.reconcile(super::ReconcileGuard::REPAIR)?;
        self.refresh_next_expiry();
        Ok(report)
    }
}

fn quota(policy: &Policy, owner: &str, held: u64) -> Result<(), Refusal> {
    if held > policy.ports_per_owner {
        return Err(Refusal {
            rule: "policy.ports_per_owner",
            detail: format!(
                "owner {owner} holds {held} ports with this reservation, more than the limit of {}",
                policy.ports_per_owner
            ),
        });
    }
    Ok(())
}
