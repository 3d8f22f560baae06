//! Prometheus metrics of `pf serve`, served on the TCP address `[metrics] listen` names (off
//! unless set) at `/metrics`, in the exposition format of the Prometheus project's own Rust
//! client. Names follow its conventions: the `pf_` prefix, base units (bytes, seconds), and
//! `_total` on counters.
//!
//! | metric | labels | what |
//! | --- | --- | --- |
//! | `pf_ingress_packets_total`, `pf_egress_packets_total` | `outcome` | the programs' outcome counters (`rewritten`, `no_reservation`, each reason to pass) |
//! | `pf_fast_path_packets_total`, `pf_reply_fast_path_packets_total` | `outcome` | the fast paths' outcomes |
//! | `pf_trigger_packets_total` | `outcome` | the port-trigger program's outcomes (`opened`, `refreshed`, `no_trigger`, `not_tcp_udp`) |
//! | `pf_reservation_packets_total`, `pf_reservation_bytes_total` | `id`, `owner`, `direction` | each reservation's traffic since it was made (left out above `per_reservation_limit`) |
//! | `pf_reservation_dropped_packets_total` | `id`, `owner`, `reason` | packets a reservation's limits dropped (`source`, `syn_rate`, `packet_rate`, `bit_rate`), for each reservation with limits (left out with the others) |
//! | `pf_owner_packets`, `pf_owner_bytes` | `owner`, `direction` | the same summed over the owner's reservations held now (gauges: a release lowers them) |
//! | `pf_reservations` | `state` (`enabled`, `disabled`) | reservations in the store |
//! | `pf_policy_violations` | | reservations the policy in force would refuse |
//! | `pf_reconcile_drifts` | | differences the last reconcile repaired |
//! | `pf_interfaces` | `interface`, `role`, `live` | configured and attached interfaces (1 each) |
//! | `pf_store_read_only` | | 1 when the store takes no changes |
//! | `pf_expiries_total` | | reservations expired by this process |
//! | `pf_trigger_openings_total`, `pf_trigger_closings_total` | | trigger rules opened by their client's packets and closed by idleness, as this process saw them |
//! | `pf_refusals_total` | `reason` | refused changes, by policy rule or error code |
//! | `pf_change_duration_seconds` | | how long each change took in the engine (store, maps, audit) |
//! | `pf_per_reservation_series_omitted` | | 1 when there were more reservations than the limit |
//! | `pf_port_mapping_answers_total` | `protocol`, `result` | NAT-PMP and PCP requests answered, by result |
//! | `pf_port_mapping_dropped_total` | `reason` | datagrams to the port-mapping server left unanswered, by reason |
//! | `pf_port_mapping_rate_limited_total` | `protocol` | requests answered "out of resources" because the client asked too fast (also in the answers) |
//!
//! Cardinality: the global series are fixed; per owner, four series per owner; per
//! reservation, four per reservation, up to `metrics.per_reservation_limit` (default 10,000)
//! reservations, beyond which they are all left out (the per-owner ones stay).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    api::types::{AttachmentView, ReservationTraffic},
    kernel::state::Counters,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReservationLabels {
    id: String,
    owner: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    id: String,
    owner: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OwnerLabels {
    owner: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InterfaceLabels {
    interface: String,
    role: String,
    live: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    reason: String,
}

/// What the engine counts as it goes (the rest is read at each scrape).
#[derive(Clone)]
pub struct ServiceMetrics {
    refusals: Family<ReasonLabels, Counter>,
    expiries: Counter,
    trigger_openings: Counter,
    trigger_closings: Counter,
    change_seconds: Histogram,
    /// The port-mapping server's answers and drops.
    pub port_mapping: MappingCounts,
}

/// What the port-mapping server answered (by protocol and result) and left unanswered (by
/// reason): kept as plain counts, so that the status can show them as well as `/metrics`.
#[derive(Clone, Default)]
pub struct MappingCounts(Arc<Mutex<BTreeMap<(&'static str, &'static str), u64>>>);

/// The names [`MappingCounts`] files drops and rate-limited requests under.
const DROPPED: &str = "dropped";
const RATE_LIMITED: &str = "rate_limited";

impl MappingCounts {
    pub fn answered(&self, protocol: &'static str, result: &'static str) {
        *self
            .0
            .lock()
            .expect("not poisoned")
            .entry((protocol, result))
            .or_default() += 1;
    }

    pub fn dropped(&self, reason: &'static str) {
        self.answered(DROPPED, reason);
    }

    /// A request of `protocol` refused because its client asked too fast (its answer is
    /// counted too).
    pub fn rate_limited(&self, protocol: &'static str) {
        self.answered(RATE_LIMITED, protocol);
    }

    /// `{"answered": {PROTOCOL: {RESULT: n}}, "dropped": {REASON: n}, "rate_limited":
    /// {PROTOCOL: n}}`.
    pub fn json(&self) -> serde_json::Value {
        let mut answered = serde_json::Map::new();
        let mut dropped = serde_json::Map::new();
        let mut limited = serde_json::Map::new();
        for (&(protocol, result), &n) in self.0.lock().expect("not poisoned").iter() {
            if protocol == DROPPED {
                dropped.insert(result.into(), n.into());
            } else if protocol == RATE_LIMITED {
                limited.insert(result.into(), n.into());
            } else {
                answered
                    .entry(protocol)
                    .or_insert_with(|| serde_json::json!({}))[result] = n.into();
            }
        }
        serde_json::json!({ "answered": answered, "dropped": dropped, "rate_limited": limited })
    }

    fn register(&self, registry: &mut Registry) {
        let answers = Family::<MappingLabels, Counter>::default();
        let dropped = Family::<ReasonLabels, Counter>::default();
        let limited = Family::<ProtocolLabels, Counter>::default();
        for (&(protocol, result), &n) in self.0.lock().expect("not poisoned").iter() {
            if protocol == DROPPED {
                dropped
                    .get_or_create(&ReasonLabels {
                        reason: result.to_string(),
                    })
                    .inc_by(n);
            } else if protocol == RATE_LIMITED {
                limited
                    .get_or_create(&ProtocolLabels { protocol: result })
                    .inc_by(n);
            } else {
                answers
                    .get_or_create(&MappingLabels { protocol, result })
                    .inc_by(n);
            }
        }
        registry.register(
            "port_mapping_answers",
            "NAT-PMP and PCP requests answered, by result",
            answers,
        );
        registry.register(
            "port_mapping_dropped",
            "Datagrams to the port-mapping server left unanswered, by reason",
            dropped,
        );
        registry.register(
            "port_mapping_rate_limited",
            "Requests refused because the client asked too fast",
            limited,
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MappingLabels {
    protocol: &'static str,
    result: &'static str,
}

impl Default for ServiceMetrics {
    fn default() -> Self {
        Self {
            refusals: Family::default(),
            expiries: Counter::default(),
            trigger_openings: Counter::default(),
            trigger_closings: Counter::default(),
            // 100 µs to ~3 s: a change is a store transaction (fsync), map writes and an
            // audit line.
            change_seconds: Histogram::new([
                0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0,
            ]),
            port_mapping: MappingCounts::default(),
        }
    }
}

impl ServiceMetrics {
    /// A change refused, by the rule that refused it or the error's code.
    pub fn refused(&self, reason: &str) {
        self.refusals
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn expired(&self) {
        self.expiries.inc();
    }

    pub fn trigger_opened(&self) {
        self.trigger_openings.inc();
    }

    pub fn trigger_closed(&self) {
        self.trigger_closings.inc();
    }

    pub fn change_took(&self, seconds: f64) {
        self.change_seconds.observe(seconds);
    }
}

/// A label value as the exposition format needs it. prometheus-client writes label values as
/// they are, and an owner (any visible ASCII) or an interface name may hold `"` or `\`, which
/// would break every scrape, or forge labels.
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Everything a scrape shows that is read at the time of the scrape.
pub struct Snapshot<'a> {
    /// `None` when the maps could not be read (the scrape still shows the rest).
    pub counters: Option<&'a Counters>,
    pub reservations: &'a [ReservationTraffic],
    pub violations: usize,
    pub drifts: Option<usize>,
    pub store_read_only: bool,
    pub interfaces: &'a [AttachmentView],
    pub per_reservation_limit: usize,
}

fn outcomes(registry: &mut Registry, name: &str, help: &str, values: &[(&str, u64)]) {
    let family = Family::<OutcomeLabels, Counter>::default();
    for (outcome, v) in values {
        family
            .get_or_create(&OutcomeLabels {
                outcome: (*outcome).to_string(),
            })
            .inc_by(*v);
    }
    registry.register(name, help, family);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    registry.register(name, help, g);
}

/// The exposition text of one scrape.
pub fn encode_text(s: &Snapshot, service: &ServiceMetrics) -> String {
    let mut registry = Registry::with_prefix("pf");
    if let Some(c) = s.counters {
        outcomes(
            &mut registry,
            "ingress_packets",
            "XDP ingress outcomes",
            &c.ingress,
        );
        outcomes(
            &mut registry,
            "egress_packets",
            "TC egress outcomes",
            &c.egress,
        );
        outcomes(
            &mut registry,
            "fast_path_packets",
            "Fast-path outcomes of rewritten packets",
            &c.fast_path,
        );
        outcomes(
            &mut registry,
            "reply_fast_path_packets",
            "Reply fast-path outcomes",
            &c.reply_fast_path,
        );
        outcomes(
            &mut registry,
            "trigger_packets",
            "Port-trigger program outcomes",
            &c.trigger,
        );
    }
    let omitted = s.reservations.len() > s.per_reservation_limit;
    let (packets, bytes) = (
        Family::<ReservationLabels, Counter>::default(),
        Family::<ReservationLabels, Counter>::default(),
    );
    let dropped = Family::<DropLabels, Counter>::default();
    let mut owners: HashMap<(&str, &'static str), (u64, u64)> = HashMap::new();
    let (mut enabled, mut disabled) = (0, 0);
    for r in s.reservations {
        if r.enabled {
            enabled += 1;
        } else {
            disabled += 1;
        }
        if !omitted && let Some(by_reason) = &r.dropped {
            for (reason, n) in by_reason {
                let labels = DropLabels {
                    id: r.id.to_string(),
                    owner: label(&r.owner),
                    reason: reason.clone(),
                };
                dropped.get_or_create(&labels).inc_by(*n);
            }
        }
        let t = &r.traffic;
        for (direction, p, b) in [
            ("in", t.in_packets, t.in_bytes),
            ("out", t.out_packets, t.out_bytes),
        ] {
            let owner = owners.entry((r.owner.as_str(), direction)).or_default();
            owner.0 += p;
            owner.1 += b;
            if !omitted {
                let labels = ReservationLabels {
                    id: r.id.to_string(),
                    owner: label(&r.owner),
                    direction,
                };
                packets.get_or_create(&labels).inc_by(p);
                bytes.get_or_create(&labels).inc_by(b);
            }
        }
    }
    registry.register(
        "reservation_packets",
        "Packets through each reservation since it was made",
        packets,
    );
    registry.register(
        "reservation_bytes",
        "Bytes through each reservation since it was made",
        bytes,
    );
    registry.register(
        "reservation_dropped_packets",
        "Packets each reservation's limits dropped, by reason",
        dropped,
    );
    // Gauges, not counters: a sum over the reservations held now drops when one goes.
    let (owner_packets, owner_bytes) = (
        Family::<OwnerLabels, Gauge>::default(),
        Family::<OwnerLabels, Gauge>::default(),
    );
    let gauge_value = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for ((owner, direction), (p, b)) in owners {
        let labels = OwnerLabels {
            owner: label(owner),
            direction,
        };
        owner_packets.get_or_create(&labels).set(gauge_value(p));
        owner_bytes.get_or_create(&labels).set(gauge_value(b));
    }
    registry.register(
        "owner_packets",
        "Packets through each owner's reservations held now, since each was made",
        owner_packets,
    );
    registry.register(
        "owner_bytes",
        "Bytes through each owner's reservations held now, since each was made",
        owner_bytes,
    );
    let states = Family::<StateLabels, Gauge>::default();
    states
        .get_or_create(&StateLabels { state: "enabled" })
        .set(enabled);
    states
        .get_or_create(&StateLabels { state: "disabled" })
        .set(disabled);
    registry.register("reservations", "Reservations in the store", states);
    gauge(
        &mut registry,
        "per_reservation_series_omitted",
        "1 when per-reservation series were left out (metrics.per_reservation_limit)",
        i64::from(omitted),
    );
    gauge(
        &mut registry,
        "policy_violations",
        "Reservations the policy in force would refuse",
        s.violations as i64,
    );
    if let Some(drifts) = s.drifts {
        gauge(
            &mut registry,
            "reconcile_drifts",
            "Differences between store and maps the last reconcile repaired",
            drifts as i64,
        );
    }
    gauge(
        &mut registry,
        "store_read_only",
        "1 when the reservation store takes no changes",
        i64::from(s.store_read_only),
    );
    let interfaces = Family::<InterfaceLabels, Gauge>::default();
    for i in s.interfaces {
        interfaces
            .get_or_create(&InterfaceLabels {
                interface: label(&i.interface),
                role: i.role.clone(),
                live: if i.live { "true" } else { "false" },
            })
            .set(1);
    }
    registry.register(
        "interfaces",
        "Interfaces pf is attached to, as the kernel has them",
        interfaces,
    );
    registry.register(
        "expiries",
        "Reservations expired by this pf serve",
        service.expiries.clone(),
    );
    registry.register(
        "trigger_openings",
        "Trigger rules opened by their client's packets, as this pf serve saw them",
        service.trigger_openings.clone(),
    );
    registry.register(
        "trigger_closings",
        "Trigger rules closed by idleness (or by their rule going), as this pf serve saw them",
        service.trigger_closings.clone(),
    );
    registry.register(
        "refusals",
        "Changes refused, by policy rule or error code",
        service.refusals.clone(),
    );
    registry.register(
        "change_duration_seconds",
        "Time the engine took for each change",
        service.change_seconds.clone(),
    );
    service.port_mapping.register(&mut registry);
    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String cannot fail");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An owner with quotes and backslashes stays one label value in the exposition text.
    #[test]
    fn label_values_are_escaped() {
        let traffic = crate::kernel::state::Traffic {
            in_packets: 1,
            ..Default::default()
        };
        let r = crate::domain::spec::Reservation::new(
            "198.51.100.1:8080/tcp".parse().unwrap(),
            "10.8.0.2".parse().unwrap(),
        )
        .unwrap();
        let rows = [ReservationTraffic {
            id: 1,
            owner: r#"x",direction="out\"#.into(),
            enabled: true,
            forward: crate::api::types::ForwardView::from(&r),
            traffic,
            dropped: Some(crate::api::types::drops_by_reason(&[0, 0, 7, 0])),
        }];
        let text = encode_text(
            &Snapshot {
                counters: None,
                reservations: &rows,
                violations: 0,
                drifts: None,
                store_read_only: false,
                interfaces: &[],
                per_reservation_limit: 10,
            },
            &ServiceMetrics::default(),
        );
        assert!(
            text.contains(
                r#"pf_reservation_packets_total{id="1",owner="x\",direction=\"out\\",direction="in"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"pf_reservation_dropped_packets_total{id="1",owner="x\",direction=\"out\\",reason="packet_rate"} 7"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"pf_owner_packets{owner="x\",direction=\"out\\",direction="in"} 1"#),
            "{text}"
        );
    }
}
