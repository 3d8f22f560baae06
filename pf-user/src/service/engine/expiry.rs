//! The engine's own work between requests: repairs, expiry into the restorable history, the
//! history's purge, and noticing clock steps.

use std::time::{Duration, Instant};

use super::{
    ApiError, EXPIRY_RETRY_MS, Engine, HISTORY_KEEP, ReconcileGuard, duration_ms, record_view,
    say_once,
};
use crate::{api::types::ReservationView, service::audit::Caller};

impl Engine {
    /// One tick of the engine's own work: repairs, expiry, history purge, clock steps.
    pub fn tick(&mut self) {
        self.clock.notice_steps();
        // A store that cannot be reached (PostgreSQL down or cut off) is said once, not every
        // second, and waited for: the maps go on forwarding what they hold.
        if let Err(e) = self.store.reachable() {
            say_once(&mut self.store_down, e.to_string(), |m| {
                format!(
                    "{m}; forwarding goes on as the maps are, and changes are refused until it is back"
                )
            });
            return;
        }
        if self.store_down.take().is_some() {
            tracing::info!("the reservation store is reachable again");
        }
        self.follow_fleet();
        if self.repair {
            match self.reconcile(ReconcileGuard::REPAIR) {
                Ok(_) => {
                    self.repair = false;
                    self.repair_failing = None;
                    tracing::info!("repaired the maps: they agree with the store again");
                }
                Err(e) => say_once(&mut self.repair_failing, e.message, |m| {
                    format!("repairing the maps fails, retrying every second: {m}")
                }),
            }
        }
        self.expire_due();
        self.run_due_drains();
        self.watch_triggers();
        if self.store.read_only().is_none()
            && self
                .purged
                .is_none_or(|t| t.elapsed() > Duration::from_secs(3600))
        {
            let before = self.now_ms().saturating_sub(duration_ms(HISTORY_KEEP));
            match self.store.purge_history(before) {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    "forgot {n} reservations that expired more than {} ago",
                    humantime::format_duration(HISTORY_KEEP)
                ),
                Err(e) => tracing::error!("{e}"),
            }
            let retention = self.policy.history_retention;
            let before = self.now_ms().saturating_sub(duration_ms(retention));
            match self.store.purge_holders(before) {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    "forgot {n} past holders whose holding ended more than {} ago (policy.history_retention)",
                    humantime::format_duration(retention)
                ),
                Err(e) => tracing::error!("{e}"),
            }
            self.purged = Some(Instant::now());
        }
    }

    /// Moves every reservation whose expiry has passed into the restorable history, and out
    /// of the maps; each is audited, so nothing expires unless the audit log takes it, and
    /// nothing is touched unless the maps are the programs' own.
    pub fn expire_due(&mut self) {
        let now = self.now_ms();
        if self.next_expiry.is_none_or(|t| t > now) {
            return;
        }
        let retry = |engine: &mut Engine| {
            // Not at once: the due record is still there, and retrying in a loop would spin.
            let retry = now.saturating_add(EXPIRY_RETRY_MS);
            engine.next_expiry = Some(engine.next_expiry.map_or(retry, |t| t.max(retry)));
        };
        let blocked = match self.refuse_changes() {
            Some(refusal) => Err(refusal),
            None => self.open_state().map_err(ApiError::from),
        };
        let mut state = match blocked {
            Ok(state) => {
                if self.expiry_blocked.take().is_some() {
                    tracing::info!("expiry goes on again");
                }
                state
            }
            Err(refusal) => {
                say_once(&mut self.expiry_blocked, refusal.message, |m| {
                    format!("expiry waits, retrying every {EXPIRY_RETRY_MS} ms: {m}")
                });
                retry(self);
                return;
            }
        };
        let due = match self.store.expired(now) {
            Ok(due) => due,
            Err(e) => {
                tracing::error!("{e}");
                retry(self);
                return;
            }
        };
        let mut failed = false;
        for record in due {
            // Kept with its expired record: a restore goes on counting from there, and the
            // audit line has its totals.
            let live = super::live_traffic(state.as_ref(), &record);
            match self.store.expire(record.id, now) {
                Ok(true) => {}
                // Another agent of the fleet expired it first: its line is in that agent's
                // audit log, and this server's maps follow the store.
                Ok(false) => continue,
                Err(e) => {
                    failed = true;
                    tracing::warn!(
                        "could not expire reservation {}: {e} (trying again in {EXPIRY_RETRY_MS} ms)",
                        record.id
                    );
                    continue;
                }
            }
            self.forget_violation(record.id);
            self.carry_traffic(record.id, live);
            let done = serde_json::to_value(ReservationView {
                traffic: self.store.traffic(record.id).ok(),
                ..record_view(&record)
            })
            .expect("plain struct");
            let unmapped = self.unmap_after_store(state.as_mut(), &record, "expired");
            tracing::info!(
                "expired reservation {} ({}, owner {}); restorable for {} (`pf restore {}`)",
                record.id,
                record.reservation,
                record.owner,
                humantime::format_duration(HISTORY_KEEP),
                record.id
            );
            match unmapped {
                Ok(()) => {
                    self.metrics.expired();
                    self.audit(Caller::SERVICE, "expire", "ok", &done, None)
                }
                Err(e) => {
                    tracing::error!("{}", e.message);
                    self.audit(
                        Caller::SERVICE,
                        "expire",
                        "partial",
                        &done,
                        Some(&e.message),
                    );
                }
            }
        }
        drop(state);
        self.refresh_next_expiry();
        if failed {
            retry(self);
        }
    }
}
