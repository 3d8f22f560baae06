//! Winding down, as IVPN did in 2023: `policy.accept_new = false` stops new reservations (and
//! `accept_renewals = false` lets the existing ones run out), and a drain scheduled for a date
//! disables or releases everything (or one owner's) then. A drain is kept in the store, so a
//! restart keeps it; the engine carries it out at the first tick at or after its time, audits
//! each reservation it touches and a summary, and marks it done.

use serde_json::{Value, json};

use super::{ApiError, Engine, record_view, rfc3339};
use crate::{
    api::types::{DrainRequest, DrainView},
    service::{
        audit::Caller,
        store::{Drain, NewDrain},
    },
};

fn drain_view(d: &Drain) -> DrainView {
    DrainView {
        id: d.id,
        at: rfc3339(d.drain.at_ms),
        owner: d.drain.owner.clone(),
        action: if d.drain.release {
            "release"
        } else {
            "disable"
        }
        .into(),
        created: rfc3339(d.drain.created_ms),
        done: d.done_ms.map(rfc3339),
    }
}

impl Engine {
    /// Schedules a drain.
    pub(super) fn schedule_drain(&mut self, req: DrainRequest) -> Result<Value, ApiError> {
        let at = humantime::parse_rfc3339_weak(&req.at).map_err(|e| {
            ApiError::bad_request(format!(
                "at: '{}' is not a time such as 2026-12-31T00:00:00Z ({e})",
                req.at
            ))
        })?;
        let at_ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| ApiError::bad_request("at: before 1970"))?
            .as_millis() as u64;
        if let Some(owner) = &req.owner {
            super::check_owner(owner)?;
        }
        let new = NewDrain {
            at_ms,
            owner: req.owner,
            release: req.release,
            created_ms: self.now_ms(),
        };
        let id = self.store.add_drain(&new)?;
        Ok(serde_json::to_value(drain_view(&Drain {
            id,
            drain: new,
            done_ms: None,
        }))
        .expect("plain struct"))
    }

    /// Every drain, pending and done.
    pub(super) fn drains_json(&self) -> Result<Value, ApiError> {
        Ok(Value::Array(
            self.store
                .drains()?
                .iter()
                .map(|d| serde_json::to_value(drain_view(d)).expect("plain struct"))
                .collect(),
        ))
    }

    /// Cancels a pending drain.
    pub(super) fn cancel_drain(&mut self, id: u64) -> Result<Value, ApiError> {
        if !self.store.cancel_drain(id)? {
            return Err(ApiError {
                message: format!("no pending drain with id {id}"),
                ..ApiError::not_found(id)
            });
        }
        Ok(json!({ "cancelled": id }))
    }

    /// The pending drains, for the status.
    pub(super) fn pending_drains(&self) -> Vec<DrainView> {
        self.store
            .drains()
            .map(|all| {
                all.iter()
                    .filter(|d| d.done_ms.is_none())
                    .map(drain_view)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// At every tick: carries out each drain whose time has come (unless changes are refused
    /// now: it waits for the next tick).
    pub fn run_due_drains(&mut self) {
        let now = self.now_ms();
        let due: Vec<Drain> = match self.store.drains() {
            Ok(all) => all
                .into_iter()
                .filter(|d| d.done_ms.is_none() && d.drain.at_ms <= now)
                .collect(),
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        };
        for d in due {
            if let Some(refusal) = self.refuse_changes() {
                tracing::warn!("drain {} waits: {}", d.id, refusal.message);
                return;
            }
            let records = match self.store.list(d.drain.owner.as_deref()) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("drain {}: {e}", d.id);
                    return;
                }
            };
            let action = if d.drain.release {
                "release"
            } else {
                "disable"
            };
            let mut touched = Vec::new();
            let mut failed = 0;
            for r in records {
                let done = if d.drain.release {
                    self.release(r.id)
                } else if r.enabled {
                    self.set_enabled(r.id, false).map(|r| record_view(&r))
                } else {
                    continue;
                };
                match done {
                    Ok(view) => {
                        self.audit(
                            Caller::SERVICE,
                            action,
                            "ok",
                            &json!({ "drain": d.id, "reservation": view }),
                            None,
                        );
                        touched.push(r.id);
                    }
                    Err(e) => {
                        failed += 1;
                        tracing::error!("drain {}: reservation {}: {}", d.id, r.id, e.message);
                    }
                }
            }
            if failed > 0 {
                // Tried again at the next tick, for what is left.
                continue;
            }
            tracing::info!(
                "drain {}: {action}d {} reservations{}",
                d.id,
                touched.len(),
                d.drain
                    .owner
                    .as_ref()
                    .map(|o| format!(" of {o}"))
                    .unwrap_or_default()
            );
            self.audit(
                Caller::SERVICE,
                "drain",
                "ok",
                &json!({ "drain": drain_view(&d), "ids": touched }),
                None,
            );
            if let Err(e) = self.store.drain_done(d.id, now) {
                tracing::error!("drain {}: {e}", d.id);
            }
        }
    }
}
