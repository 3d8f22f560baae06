//! `pf top`: the reservations with the most traffic or drops over an interval, from two
//! readings of `GET /v1/stats` (each one batched read of the kernel's counters, whatever the
//! number of reservations).

use std::{collections::HashMap, time::Duration};

use serde::Serialize;

use super::types::{ReservationTraffic, StatsView};

/// What `pf top` ranks by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopBy {
    /// Packets, both directions.
    Packets,
    /// Bytes, both directions.
    Bytes,
    /// Packets the reservation's limits dropped.
    Drops,
}

/// One reservation's rates over the interval.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopRow {
    pub id: u64,
    pub owner: String,
    /// `198.51.100.1:8080/tcp -> 10.8.0.2:80`.
    pub spec: String,
    pub packets_per_second: f64,
    pub bytes_per_second: f64,
    pub drops_per_second: f64,
}

impl std::str::FromStr for TopBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "packets" => Ok(TopBy::Packets),
            "bytes" => Ok(TopBy::Bytes),
            "drops" => Ok(TopBy::Drops),
            other => Err(format!("'{other}' is not packets, bytes or drops")),
        }
    }
}

fn totals(r: &ReservationTraffic) -> (u64, u64, u64) {
    let t = &r.traffic;
    let drops = r.dropped.as_ref().map_or(0, |d| d.values().sum());
    (
        t.in_packets + t.out_packets,
        t.in_bytes + t.out_bytes,
        drops,
    )
}

/// The `count` reservations that moved most by `by` between `before` and `after`, read
/// `interval` apart, as rates. A reservation in only one reading (made or gone meanwhile),
/// or whose counters went back (its limits armed again), is left out; so is one that moved
/// nothing by `by`.
pub fn top(
    before: &StatsView,
    after: &StatsView,
    interval: Duration,
    by: TopBy,
    count: usize,
) -> Vec<TopRow> {
    let seconds = interval.as_secs_f64().max(f64::MIN_POSITIVE);
    let earlier: HashMap<u64, (u64, u64, u64)> = before
        .reservations
        .iter()
        .map(|r| (r.id, totals(r)))
        .collect();
    let mut rows: Vec<TopRow> = after
        .reservations
        .iter()
        .filter_map(|r| {
            let (p0, b0, d0) = earlier.get(&r.id)?;
            let (p1, b1, d1) = totals(r);
            Some(TopRow {
                id: r.id,
                owner: r.owner.clone(),
                spec: r.forward.spec.clone(),
                packets_per_second: p1.checked_sub(*p0)? as f64 / seconds,
                bytes_per_second: b1.checked_sub(*b0)? as f64 / seconds,
                drops_per_second: d1.checked_sub(*d0)? as f64 / seconds,
            })
        })
        .collect();
    let key = |r: &TopRow| match by {
        TopBy::Packets => r.packets_per_second,
        TopBy::Bytes => r.bytes_per_second,
        TopBy::Drops => r.drops_per_second,
    };
    rows.retain(|r| key(r) > 0.0);
    rows.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.id.cmp(&b.id)));
    rows.truncate(count);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::types::{ForwardView, drops_by_reason},
        domain::spec::Reservation,
        kernel::state::Traffic,
    };

    fn row(id: u64, packets: u64, bytes: u64, drops: Option<u64>) -> ReservationTraffic {
        let r = Reservation::new(
            format!("198.51.100.1:{}/udp", 7000 + id).parse().unwrap(),
            "10.8.0.2".parse().unwrap(),
        )
        .unwrap();
        ReservationTraffic {
            id,
            owner: format!("acct-{id}"),
            enabled: true,
            forward: ForwardView::from(&r),
            traffic: Traffic {
                in_packets: packets,
                in_bytes: bytes,
                out_packets: 0,
                out_bytes: 0,
            },
            dropped: drops.map(|d| drops_by_reason(&[0, 0, d, 0])),
        }
    }

    #[test]
    fn ranks_by_what_moved_over_the_interval() {
        let before = StatsView {
            reservations: vec![
                row(1, 100, 10_000, Some(0)),
                row(2, 0, 0, None),
                row(3, 5, 5, None),
            ],
        };
        let after = StatsView {
            reservations: vec![
                row(1, 300, 20_000, Some(50)),
                row(2, 1000, 1000, None),
                row(3, 5, 5, None),
                row(4, 9999, 9999, None),
            ],
        };
        let two = Duration::from_secs(2);
        let by_packets = top(&before, &after, two, TopBy::Packets, 10);
        assert_eq!(by_packets.iter().map(|r| r.id).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(by_packets[0].packets_per_second, 500.0);
        let by_bytes = top(&before, &after, two, TopBy::Bytes, 1);
        assert_eq!(by_bytes.iter().map(|r| r.id).collect::<Vec<_>>(), [1]);
        let by_drops = top(&before, &after, two, TopBy::Drops, 10);
        assert_eq!(by_drops.len(), 1);
        assert_eq!((by_drops[0].id, by_drops[0].drops_per_second), (1, 25.0));
        // Counters that went back (limits armed again) are left out, not negative.
        let reset = StatsView {
            reservations: vec![row(1, 300, 20_000, Some(0))],
        };
        assert!(top(&after, &reset, two, TopBy::Drops, 10).is_empty());
    }
}
