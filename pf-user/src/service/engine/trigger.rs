//! Trigger rules in the engine. A trigger rule is a reservation whose ports forward only while
//! its gate is open (`kernel::trigger`): the store keeps the rule beside the reservation, the
//! policy holds its range like any other (quota, conflicts, pool), and the maps get its
//! entries behind the gate. The kernel opens and closes it; the engine learns of openings from
//! the trigger program's ring and of closings by reading the gate at every tick, and audits
//! both.

use std::{collections::HashMap, time::Duration};

use serde_json::json;

use super::{ApiError, Engine, rfc3339};
use crate::{
    api::types::{TriggerRequest, TriggerView},
    domain::spec::{Reservation, TriggerPorts},
    kernel::trigger::{GateState, TriggerRule, monotonic_ns},
    service::{audit::Caller, dataplane::Maps, policy::Refusal, store::Trigger},
};

/// The idle timeout of a rule made without one: 2 minutes, as DD-WRT's `ipt_TRIGGER`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest: a day (the kernel's bound, `MAX_TRIGGER_IDLE_NS`).
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(86_400);

/// The kernel's rule for reservation `r`'s trigger: its client is the reservation's target.
pub fn kernel_rule(r: &Reservation, t: &Trigger) -> TriggerRule {
    TriggerRule {
        gate: t.gate,
        client: r.target_addr,
        protocols: t.on.protocols,
        ports: t.on.ports,
        idle_timeout: Duration::from_millis(t.idle_timeout_ms),
    }
}

/// A rule as the API shows it, with its gate as the kernel has it (`None`: not read, or the
/// reservation is disabled).
pub fn trigger_view(t: &Trigger, gate: Option<GateState>, now_ms: u64) -> TriggerView {
    let (state, open_until) = match gate {
        Some(GateState {
            open_for: Some(left),
            ..
        }) => (
            "open",
            Some(rfc3339(now_ms.saturating_add(left.as_millis() as u64))),
        ),
        Some(GateState { armed: true, .. }) => ("armed", None),
        _ => ("off", None),
    };
    TriggerView {
        on: t.on.to_string(),
        idle_timeout_ms: t.idle_timeout_ms,
        state: state.into(),
        open_until,
    }
}

impl Engine {
    /// Checks a request's trigger rule for reservation `r` and gives it a free gate.
    pub(super) fn new_trigger(
        &self,
        req: &TriggerRequest,
        r: &Reservation,
    ) -> Result<Trigger, ApiError> {
        let on: TriggerPorts = req.on.parse()?;
        if on.ports.len() > self.policy.max_range_ports {
            return Err(Refusal {
                rule: "policy.max_range_ports",
                detail: format!(
                    "trigger ports {} are {} ports; the largest range is {}",
                    on.ports,
                    on.ports.len(),
                    self.policy.max_range_ports
                ),
            }
            .into());
        }
        let idle = match &req.idle_timeout {
            None => DEFAULT_IDLE_TIMEOUT,
            Some(text) => humantime::parse_duration(text).map_err(|e| {
                ApiError::bad_request(format!(
                    "trigger idle_timeout '{text}' is not a duration such as 2m or 90s ({e})"
                ))
            })?,
        };
        if !(Duration::from_secs(1)..=MAX_IDLE_TIMEOUT).contains(&idle) {
            return Err(ApiError::bad_request(format!(
                "trigger idle_timeout {} is outside 1s to 24h",
                humantime::format_duration(idle)
            )));
        }
        let live = self.store.triggers()?;
        self.check_trigger_clash(&live, r.target_addr, &on, None)?;
        // Each trigger port and protocol of a rule is an entry of the kernel's TRIGGER_PORTS.
        let entries =
            |t: &TriggerPorts| u64::from(t.ports.len()) * t.protocols.ip_protocols().len() as u64;
        let held: u64 = live.values().map(|t| entries(&t.on)).sum();
        if held + entries(&on) > u64::from(pf_common::limits::MAX_TRIGGER_PORTS) {
            return Err(ApiError::unavailable(format!(
                "the kernel's trigger ports are full ({held} of {} held): no room for {} more",
                pf_common::limits::MAX_TRIGGER_PORTS,
                entries(&on)
            )));
        }
        Ok(Trigger {
            gate: self.free_gate(&live)?,
            on,
            idle_timeout_ms: idle.as_millis() as u64,
        })
    }

    /// Refuses a rule of `client` on `on` when another live rule of the same client (other
    /// than reservation `except`) has one of those trigger ports: the kernel keys a trigger by
    /// client, port and protocol, so it could open only one of them.
    pub(super) fn check_trigger_clash(
        &self,
        live: &HashMap<u64, Trigger>,
        client: std::net::Ipv4Addr,
        on: &TriggerPorts,
        except: Option<u64>,
    ) -> Result<(), ApiError> {
        for (id, other) in live {
            if Some(*id) == except
                || !other.on.protocols.overlaps(on.protocols)
                || !other.on.ports.overlaps(on.ports)
            {
                continue;
            }
            let Some(record) = self.store.get(*id)? else {
                continue;
            };
            if record.reservation.target_addr == client {
                return Err(ApiError::conflict_with(
                    *id,
                    format!(
                        "{client} already triggers reservation {id} on {}: one rule per trigger port of a client",
                        other.on
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The lowest gate no live rule has and the watch is not still following: a gate that
    /// was open when its rule went is not handed out before its closing is audited, so the
    /// trigger program's reports are never taken for another rule's.
    fn free_gate(&self, live: &HashMap<u64, Trigger>) -> Result<u16, ApiError> {
        let used: std::collections::HashSet<u16> = live
            .values()
            .map(|t| t.gate)
            .chain(self.open_gates.keys().copied())
            .collect();
        (1..=u16::MAX)
            .find(|g| !used.contains(g))
            .ok_or_else(|| ApiError::unavailable("every trigger gate (65,535) is in use"))
    }

    /// Gives restored reservation `id`'s trigger rule, if it has one, a gate free now.
    pub(super) fn regate(&mut self, id: u64) -> Result<(), ApiError> {
        if self.store.trigger(id)?.is_none() {
            return Ok(());
        }
        let mut live = self.store.triggers()?;
        live.remove(&id);
        let gate = self.free_gate(&live)?;
        self.store.set_trigger_gate(id, gate)?;
        Ok(())
    }

    /// The engine's watch over the gates, at every tick: each opening the trigger program
    /// reported is audited (with the packet that opened it), and each open gate found closed
    /// is audited as closed. Nothing here decides anything; the kernel has.
    pub fn watch_triggers(&mut self) {
        let openings = self.dataplane.openings();
        if openings.is_empty() && self.open_gates.is_empty() {
            return;
        }
        let triggers = match self.store.triggers() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        };
        let by_gate: HashMap<u16, u64> = triggers.iter().map(|(id, t)| (t.gate, *id)).collect();
        // Each rule's client: a report whose source is not the rule's client is a stale one,
        // of a rule that had the gate before.
        let clients: HashMap<u64, std::net::Ipv4Addr> = openings
            .iter()
            .filter_map(|o| by_gate.get(&o.gate))
            .filter_map(|&id| Some((id, self.store.get(id).ok()??.reservation.target_addr)))
            .collect();
        let now_ns = monotonic_ns();
        let wall = self.now_ms();
        // When a monotonic instant was, on the wall clock.
        let at = |ns: u64| wall.saturating_sub(now_ns.saturating_sub(ns) / 1_000_000);
        for o in openings {
            let Some(&id) = by_gate.get(&o.gate) else {
                continue; // a rule released since
            };
            if clients.get(&id) != Some(o.source.ip()) {
                continue;
            }
            match self.open_gates.remove(&o.gate) {
                // Reopened before this tick saw it close: its closing first.
                Some(was) if was == id && o.previous_expires_ns != 0 => {
                    self.audit_closed(was, o.gate, at(o.previous_expires_ns));
                }
                // The gate's rule before this one: closed when it went.
                Some(was) if was != id => self.audit_closed(was, o.gate, wall),
                _ => {}
            }
            self.open_gates.insert(o.gate, id);
            let line = json!({
                "id": id,
                "gate": o.gate,
                "at": rfc3339(at(o.at_ns)),
                "by": {
                    "protocol": o.protocol.to_string(),
                    "source": o.source.to_string(),
                    "destination": o.destination.to_string(),
                },
            });
            tracing::info!(
                "trigger: reservation {id} opened by {} {} -> {}",
                o.protocol,
                o.source,
                o.destination
            );
            self.metrics.trigger_opened();
            self.audit(Caller::SERVICE, "trigger-open", "ok", &line, None);
        }
        if self.open_gates.is_empty() {
            return;
        }
        let state = match self.dataplane.open() {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!("reading the trigger gates: {e}");
                return;
            }
        };
        let mut closed = Vec::new();
        for (&gate, &id) in &self.open_gates {
            match state.trigger_gate(gate) {
                Ok(g) if g.open_for.is_some() && by_gate.get(&gate) == Some(&id) => {}
                Ok(g) => closed.push((gate, id, g.expires_ns)),
                Err(e) => tracing::warn!("reading trigger gate {gate}: {e}"),
            }
        }
        drop(state);
        for (gate, id, expires_ns) in closed {
            self.open_gates.remove(&gate);
            let when = if expires_ns == 0 {
                wall
            } else {
                at(expires_ns)
            };
            self.audit_closed(id, gate, when);
        }
    }

    fn audit_closed(&mut self, id: u64, gate: u16, at_ms: u64) {
        tracing::info!("trigger: reservation {id} closed (idle, or its rule went)");
        self.metrics.trigger_closed();
        let line = json!({ "id": id, "gate": gate, "at": rfc3339(at_ms) });
        self.audit(Caller::SERVICE, "trigger-close", "ok", &line, None);
    }

    /// At a start: the gates already open (an opening survives a restart of `pf serve`),
    /// watched from now on without an audit line of their own.
    pub(super) fn adopt_open_gates(&mut self, state: &dyn Maps) -> Result<(), ApiError> {
        for (id, t) in self.store.triggers()? {
            if state.trigger_gate(t.gate)?.open_for.is_some() {
                self.open_gates.insert(t.gate, id);
            }
        }
        Ok(())
    }
}
