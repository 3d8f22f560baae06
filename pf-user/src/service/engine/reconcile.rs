//! The start and the reconcile: making the maps hold exactly the store's enabled
//! reservations, guarded against a store that is the wrong one.

use super::{ApiError, DRIFT_LOG_LIMIT, Engine};
use crate::{domain::spec::Reservation, kernel::state::EntryTags, service::dataplane::Maps};

/// What a start's reconcile may do without the admin's say-so.
#[derive(Debug, Clone, Copy)]
pub struct ReconcileGuard {
    /// `pf serve --force-reconcile`: the admin accepts whatever the reconcile removes.
    pub force: bool,
    /// The store file was missing or empty before this start.
    pub store_was_new: bool,
    /// The largest share of the maps' reservations a reconcile removes unasked.
    pub removal_limit: f64,
}

impl ReconcileGuard {
    /// No limits: repairs of the service's own failed writes.
    pub const REPAIR: ReconcileGuard = ReconcileGuard {
        force: true,
        store_was_new: false,
        removal_limit: 1.0,
    };
}

/// Removals a guarded reconcile makes without asking, whatever the share: a few strays are
/// ordinary drift.
const UNGUARDED_REMOVALS: usize = 10;

impl Engine {
    /// The start, in an order that changes nothing before it knows the store is the right
    /// one: the reconcile guard is checked first, then what fell due while the service was
    /// down expires, every reservation is held against the policy (those that target the
    /// server itself are disabled, see [`Engine::enforce`]), and the maps are reconciled.
    /// Returns the reconcile's report and how many were disabled.
    pub fn start(&mut self, guard: ReconcileGuard) -> Result<(ReconcileReport, usize), ApiError> {
        {
            let state = self.open_state()?;
            self.check_guard(state.as_ref(), guard)?;
        }
        self.expire_due();
        let disabled = self.enforce()?.disabled;
        let report = self.reconcile(ReconcileGuard::REPAIR)?;
        let state = self.open_state()?;
        self.adopt_open_gates(state.as_ref())?;
        Ok((report, disabled))
    }

    /// Refuses a reconcile that would remove what a new store or a large share implies was
    /// lost, not meant (see [`ReconcileGuard`]).
    fn check_guard(&self, state: &dyn Maps, guard: ReconcileGuard) -> Result<(), ApiError> {
        if guard.force {
            return Ok(());
        }
        let actual = state.list()?;
        let records = self.local_records()?;
        let stored: std::collections::HashSet<&Reservation> =
            records.iter().map(|r| &r.reservation).collect();
        let unknown = actual.iter().filter(|r| !stored.contains(r)).count();
        if unknown == 0 {
            return Ok(());
        }
        if guard.store_was_new {
            return Err(ApiError::unavailable(format!(
                "the reservation store is new or empty, but the kernel maps hold {unknown} reservations it does not know: starting would stop forwarding them all. If the store's path is wrong, fix service.database; if the store really was lost and those reservations should go, start once with `pf serve --force-reconcile`"
            )));
        }
        let share = unknown as f64 / actual.len() as f64;
        if unknown > UNGUARDED_REMOVALS && share > guard.removal_limit {
            return Err(ApiError::unavailable(format!(
                "the kernel maps hold {unknown} of {} reservations that the store does not know ({:.0}%, more than service.reconcile_removal_limit = {:.0}%): starting would stop forwarding them. If the store is the wrong one, fix service.database; if they should go, start once with `pf serve --force-reconcile`",
                actual.len(),
                share * 100.0,
                guard.removal_limit * 100.0
            )));
        }
        Ok(())
    }

    /// Makes the maps hold exactly the store's enabled reservations: removes what the store
    /// does not have, adds what is missing, and logs each difference. `guard` refuses (before
    /// any change) a reconcile that would remove what a new store or a large share implies
    /// was lost, not meant.
    pub fn reconcile(&mut self, guard: ReconcileGuard) -> Result<ReconcileReport, ApiError> {
        self.reconcile_as(guard, false)
    }

    /// [`Engine::reconcile`]; `following`: to apply what the fleet's other agents changed in
    /// the shared store, which is news, not drift (logged as followed, not counted).
    pub(super) fn reconcile_as(
        &mut self,
        guard: ReconcileGuard,
        following: bool,
    ) -> Result<ReconcileReport, ApiError> {
        // Slots are the store's to give: two reservations sharing one are separated first.
        let separated = self.separate_limit_slots()?;
        let records = self.local_records()?;
        let desired: Vec<Reservation> = records
            .iter()
            .filter(|r| r.enabled)
            .map(|r| r.reservation)
            .collect();
        // What each reservation's entries carry: its trigger rule's gate, its limit slot.
        let triggers = self.store.triggers()?;
        let limits = self.store.all_limits()?;
        let tags: std::collections::HashMap<Reservation, EntryTags> = records
            .iter()
            .map(|r| {
                let tags = EntryTags {
                    gate: triggers.get(&r.id).map_or(0, |t| t.gate),
                    limit: limits.get(&r.id).map_or(0, |l| l.slot),
                };
                (r.reservation, tags)
            })
            .collect();
        let tags_of = |r: &Reservation| tags.get(r).copied().unwrap_or_default();
        // The kernel's trigger rules and limits: those of the enabled reservations.
        let enabled = || records.iter().filter(|r| r.enabled);
        let rules: Vec<_> = enabled()
            .filter_map(|r| {
                Some(super::trigger::kernel_rule(
                    &r.reservation,
                    triggers.get(&r.id)?,
                ))
            })
            .collect();
        let limit_rules: Vec<_> = enabled()
            .filter_map(|r| Some(super::limits::kernel_limit(limits.get(&r.id)?.clone())))
            .collect();
        let mut state = self.open_state()?;
        let actual = state.list()?;
        let want: std::collections::HashSet<&Reservation> = desired.iter().collect();
        let have: std::collections::HashSet<&Reservation> = actual.iter().collect();
        self.check_guard(state.as_ref(), guard)?;
        let mut drifts = separated;
        // Records the store does not have go, with their entries.
        for r in actual.iter().filter(|r| !want.contains(r)) {
            state.release(&r.public)?;
            drifts.push(format!("removed {r}: in the maps, not in the store"));
        }
        // Records whose entries are not all there (a crash in the middle of a write or a
        // removal) are written again, whole.
        let mut intact = Vec::new();
        let mut absent = Vec::new();
        let mut rewrite = Vec::new();
        for r in desired.iter() {
            if !have.contains(r) {
                absent.push(*r);
            } else if state.is_complete_tagged(r, tags_of(r))? {
                intact.push(*r);
            } else {
                state.release(&r.public)?;
                drifts.push(format!(
                    "rewrote {r}: some of its entries were missing or wrong"
                ));
                rewrite.push(*r);
            }
        }
        // Entries no intact reservation accounts for: orphans, and what a half-written
        // reservation left, which is about to be written whole.
        for entry in state.prune(&intact)? {
            drifts.push(format!(
                "removed {entry}: an entry no reservation accounts for"
            ));
        }
        let (tagged, missing): (Vec<Reservation>, Vec<Reservation>) = absent
            .iter()
            .chain(&rewrite)
            .copied()
            .partition(|r| tags_of(r) != EntryTags::default());
        // Limits before the entries that carry them, so their first packet meets them.
        let mut trigger_drifts = state.sync_limits(&limit_rules)?;
        state.reserve_all(&missing)?;
        for r in &tagged {
            state.reserve_tagged(r, tags_of(r))?;
        }
        // The trigger rules last, their ranges in place: a rule armed as it should be keeps
        // its gate open or closed as it was.
        trigger_drifts.extend(state.sync_triggers(&rules)?);
        let guarded = if self.policy.drop_tunnel_source_leaks {
            self.policy.target_networks.clone()
        } else {
            Vec::new()
        };
        if state.tunnel_networks()? != guarded {
            state.set_tunnel_networks(&guarded)?;
            tracing::info!(
                "egress drops unrewritten packets from the tunnel networks: {}",
                if guarded.is_empty() {
                    "none (policy.drop_tunnel_source_leaks = false)".to_string()
                } else {
                    guarded
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
        // Empty maps are a fresh boot (or a first start), not drift: one line says so.
        let fresh = actual.is_empty() && drifts.is_empty();
        if !fresh {
            drifts.extend(trigger_drifts);
        }
        if fresh {
            if !absent.is_empty() {
                tracing::info!(
                    "the maps were empty: loaded {} reservations from the store",
                    absent.len()
                );
            }
        } else {
            for r in &absent {
                drifts.push(format!("added {r}: in the store, not in the maps"));
            }
        }
        if following {
            for d in drifts.iter().take(DRIFT_LOG_LIMIT) {
                tracing::info!("followed the fleet's store: {d}");
            }
            if drifts.len() > DRIFT_LOG_LIMIT {
                tracing::info!(
                    "followed the fleet's store: ... and {} more",
                    drifts.len() - DRIFT_LOG_LIMIT
                );
            }
            return Ok(ReconcileReport {
                reservations: desired.len(),
                loaded: 0,
                drifts: drifts.len(),
            });
        }
        for d in drifts.iter().take(DRIFT_LOG_LIMIT) {
            tracing::warn!("drift: {d}");
        }
        if drifts.len() > DRIFT_LOG_LIMIT {
            tracing::warn!("drift: ... and {} more", drifts.len() - DRIFT_LOG_LIMIT);
        }
        self.last_reconcile = Some((self.now_ms(), drifts.len()));
        Ok(ReconcileReport {
            reservations: desired.len(),
            loaded: if fresh { absent.len() } else { 0 },
            drifts: drifts.len(),
        })
    }
}

/// What a reconcile did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Enabled reservations in the store (and now in the maps).
    pub reservations: usize,
    /// Reservations written to maps that were empty (a boot): not drift.
    pub loaded: usize,
    /// Differences found and repaired.
    pub drifts: usize,
}
