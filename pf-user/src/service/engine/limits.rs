//! Limits in the engine. A reservation's limits (`domain::limits`) are the policy's for its
//! owner, lowered where the request asks; they are fixed when it is made and stored beside
//! it with a slot of the kernel's limit array, which its forward entries carry. The kernel
//! enforces them per packet (`kernel::limit`); the engine only places them.

use std::collections::{HashMap, HashSet};

use super::{ApiError, Engine};
use crate::service::policy::Refusal;
use crate::{
    api::types::LimitsRequest,
    kernel::{limit::LimitRule, state::EntryTags, trigger::Guards},
    service::{dataplane::Maps, store::SlotLimits},
};

impl Engine {
    /// The limits a new reservation of `owner` gets, with a free slot; `None` if it gets
    /// none.
    pub(super) fn new_limits(
        &self,
        owner: &str,
        asked: Option<&LimitsRequest>,
    ) -> Result<Option<SlotLimits>, ApiError> {
        let asked = match asked {
            Some(req) => req.parse().map_err(ApiError::bad_request)?,
            None => Default::default(),
        };
        let limits = self.policy.limits_for(owner, &asked)?;
        if limits.is_empty() {
            return Ok(None);
        }
        let live = self.store.all_limits()?;
        // The kernel's trie holds every list's networks: refused here, by name, rather than
        // by the map.
        let networks = |l: &crate::domain::limits::Limits| {
            l.sources.as_ref().map_or(0, |s| s.networks().len())
        };
        let held: usize = live.values().map(|l| networks(&l.limits)).sum();
        let max = pf_common::limits::MAX_LIMIT_SOURCES as usize;
        if held + networks(&limits) > max {
            return Err(ApiError::unavailable(format!(
                "the kernel's source lists are full ({held} of {max} networks held): no room for {} more",
                networks(&limits)
            )));
        }
        Ok(Some(SlotLimits {
            slot: free_slot(&live)?,
            limits,
        }))
    }

    /// Refuses to give reservation `id` to `owner` unless its limits are exactly what a
    /// reservation of `owner` asking for them would get: limits are fixed when a reservation is
    /// made, and an owner change must neither lift the new owner's limits nor add any.
    pub(super) fn check_limits_follow(&self, id: u64, owner: &str) -> Result<(), ApiError> {
        let current = self.store.limits(id)?.map(|l| l.limits).unwrap_or_default();
        let refused = |detail: String| {
            ApiError::from(Refusal {
                rule: "policy.limits",
                detail,
            })
        };
        match self.policy.limits_for(owner, &current) {
            Ok(theirs) if theirs == current => Ok(()),
            Ok(theirs) => Err(refused(format!(
                "reservation {id}'s limits ({current}) are not owner {owner}'s ({theirs}): release it and reserve it anew for {owner}"
            ))),
            Err(e) => Err(refused(format!(
                "reservation {id}'s limits ({current}) are above owner {owner}'s: {}",
                e.detail
            ))),
        }
    }

    /// Gives a slot of its own to each live reservation whose limits share one with another's
    /// (a crash between a restore and its new slot can leave that): the lowest id keeps it.
    /// Run before a reconcile reads the slots.
    pub(super) fn separate_limit_slots(&mut self) -> Result<Vec<String>, ApiError> {
        let mut live: Vec<(u64, SlotLimits)> = self.store.all_limits()?.into_iter().collect();
        live.sort_by_key(|(id, _)| *id);
        let mut seen = HashSet::new();
        let mut moved = Vec::new();
        for (id, l) in &live {
            if seen.insert(l.slot) {
                continue;
            }
            let all = self.store.all_limits()?;
            let slot = free_slot(&all)?;
            self.store.set_limit_slot(*id, slot)?;
            seen.insert(slot);
            moved.push(format!(
                "gave reservation {id} limit slot {slot}: slot {} was another's too",
                l.slot
            ));
        }
        Ok(moved)
    }

    /// What reservation `id`'s entries carry: its trigger rule's gate and its limit slot.
    pub(super) fn entry_tags(&self, id: u64) -> Result<EntryTags, ApiError> {
        Ok(EntryTags {
            gate: self.store.trigger(id)?.map_or(0, |t| t.gate),
            limit: self.store.limits(id)?.map_or(0, |l| l.slot),
        })
    }

    /// Writes reservation `id` (as `r`) into the maps: with its limits and behind its
    /// trigger rule's gate, armed, where it has them.
    pub(super) fn map_in(
        &mut self,
        state: &mut dyn Maps,
        id: u64,
        r: &crate::domain::spec::Reservation,
    ) -> Result<(), ApiError> {
        let trigger = self
            .store
            .trigger(id)?
            .map(|t| super::trigger::kernel_rule(r, &t));
        let limit = self.store.limits(id)?.map(kernel_limit);
        state
            .reserve_guarded(
                r,
                Guards {
                    trigger: trigger.as_ref(),
                    limit: limit.as_ref(),
                },
            )
            .map_err(ApiError::from)
    }

    /// Gives restored reservation `id`'s limits, if it has any, a slot free now.
    pub(super) fn reslot(&mut self, id: u64) -> Result<(), ApiError> {
        if self.store.limits(id)?.is_none() {
            return Ok(());
        }
        let mut live = self.store.all_limits()?;
        live.remove(&id);
        let slot = free_slot(&live)?;
        self.store.set_limit_slot(id, slot)?;
        Ok(())
    }
}

/// The kernel's form of a reservation's stored limits.
pub(super) fn kernel_limit(l: SlotLimits) -> LimitRule {
    LimitRule {
        slot: l.slot,
        limits: l.limits,
    }
}

/// The lowest slot no live reservation's limits have.
fn free_slot(live: &HashMap<u64, SlotLimits>) -> Result<u16, ApiError> {
    let used: HashSet<u16> = live.values().map(|l| l.slot).collect();
    let max = pf_common::limits::MAX_LIMITS;
    (1..max as u16).find(|s| !used.contains(s)).ok_or_else(|| {
        ApiError::unavailable(format!(
            "every limit slot ({}) is in use: no more reservations with limits",
            max - 1
        ))
    })
}
