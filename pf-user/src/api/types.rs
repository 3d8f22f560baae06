//! The API's wire types: one schema for `pf serve`, which reads the requests and writes the
//! answers, and for its clients, which write the requests and read the answers (Katran keeps
//! one schema for server and client the same way).

use serde::{Deserialize, Serialize};

use crate::{
    domain::{limits::Limits, spec::Reservation},
    kernel::{
        attach::{Attachment, Health},
        state::Traffic,
    },
};

/// An interface pf is attached to, as `GET /v1/status` and `pf status --json` show it: live,
/// or the problem the kernel shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentView {
    pub interface: String,
    pub role: String,
    pub live: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl From<&Attachment> for AttachmentView {
    fn from(a: &Attachment) -> Self {
        Self {
            interface: a.iface.clone(),
            role: a.role.describe().to_string(),
            live: a.health.is_live(),
            problem: match &a.health {
                Health::Dead(why) | Health::Unknown(why) => Some(why.clone()),
                Health::Live => None,
            },
        }
    }
}

/// `POST /v1/reservations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    /// The provider's account id.
    pub owner: String,
    /// `IP:PORT[-PORT]/PROTO`, or `IP/PROTO` for a free port from the pool.
    pub public: String,
    /// `TARGET_IP[:PORT]`.
    pub to: String,
    /// A lifetime such as `30d`; the policy's default_ttl when absent.
    #[serde(default)]
    pub ttl: Option<String>,
    /// The lifetime in seconds, instead of `ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub note: Option<String>,
    /// Makes it a trigger rule: its ports forward only while the target's own outbound
    /// packets to the trigger ports keep it open (port triggering).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<TriggerRequest>,
    /// Limits on what reaches it, within the policy's (which apply when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsRequest>,
}

/// The limits of `POST /v1/reservations`, and of the config's `[policy.limits]` tables. Rates
/// are numbers or text with a scale (`"10M"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets_per_second: Option<RateValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits_per_second: Option<RateValue>,
    /// New TCP connections (SYNs) per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syns_per_second: Option<RateValue>,
    /// Sources let in (networks or addresses); nothing else is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// Sources kept out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<Vec<String>>,
}

/// A rate in a request: a number, or text such as `"10M"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RateValue {
    Number(u64),
    Text(String),
}

impl RateValue {
    fn text(r: &Option<RateValue>) -> Option<String> {
        r.as_ref().map(|r| match r {
            RateValue::Number(n) => n.to_string(),
            RateValue::Text(t) => t.clone(),
        })
    }
}

impl LimitsRequest {
    /// The limits asked for, each error naming its field.
    pub fn parse(&self) -> Result<Limits, String> {
        self.parse_at("limits")
    }

    /// The limits, each error named by `at` (the field, or the config table, they were
    /// written in) and the key: the config's `[policy.limits]` tables are written as this
    /// request is.
    pub fn parse_at(&self, at: &str) -> Result<Limits, String> {
        Limits::parse(
            at,
            [
                RateValue::text(&self.packets_per_second),
                RateValue::text(&self.bits_per_second),
                RateValue::text(&self.syns_per_second),
            ],
            self.allow.as_deref(),
            self.deny.as_deref(),
        )
    }
}

/// A reservation's limits as the API shows them, with what they dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsView {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets_per_second: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits_per_second: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syns_per_second: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<Vec<String>>,
    /// Packets dropped since its limits were last armed (made, enabled, retargeted,
    /// restored), by reason: `source`, `syn_rate`, `packet_rate`, `bit_rate`. Absent while
    /// disabled or when the kernel's counters could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<std::collections::BTreeMap<String, u64>>,
}

impl LimitsView {
    pub fn new(l: &Limits, drops: Option<[u64; pf_common::LIMIT_DROP_REASONS]>) -> Self {
        let nets = |allow: bool| {
            l.sources
                .as_ref()
                .filter(|s| s.is_allow() == allow)
                .map(|s| s.networks().iter().map(ToString::to_string).collect())
        };
        LimitsView {
            packets_per_second: l.packets_per_second,
            bits_per_second: l.bits_per_second,
            syns_per_second: l.syns_per_second,
            allow: nets(true),
            deny: nets(false),
            dropped: drops.as_ref().map(drops_by_reason),
        }
    }
}

/// The trigger rule of `POST /v1/reservations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerRequest {
    /// `PORT[-PORT]/PROTO`: the destination ports of the target's outbound packets that open
    /// the reservation's ports.
    pub on: String,
    /// How long it stays open after the last packet through it, such as `2m` (default 2m).
    #[serde(default)]
    pub idle_timeout: Option<String>,
}

/// A trigger rule, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerView {
    /// `PORT[-PORT]/PROTO`.
    pub on: String,
    pub idle_timeout_ms: u64,
    /// `armed` (waiting for a trigger packet), `open`, or `off` (the reservation is disabled,
    /// or the kernel's state could not be read).
    pub state: String,
    /// While open: when it closes unless traffic keeps it open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_until: Option<String>,
}

/// A request's lifetime as text: `ttl` (`"30d"`) or `ttl_seconds` (an integer), not both.
pub fn lifetime_text(
    ttl: Option<String>,
    ttl_seconds: Option<u64>,
) -> Result<Option<String>, String> {
    match (ttl, ttl_seconds) {
        (Some(_), Some(_)) => Err("give ttl or ttl_seconds, not both".into()),
        (_, Some(0)) => Err("ttl_seconds must be at least 1".into()),
        (_, Some(secs)) => Ok(Some(format!("{secs}s"))),
        (ttl, None) => Ok(ttl),
    }
}

/// Percent-encodes a query value.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET /v1/reservations`'s filters and page, as a client asks (each optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub owner: Option<String>,
    /// Reservations whose public range holds this port.
    pub public_port: Option<u16>,
    /// Reservations towards this target address.
    pub target: Option<std::net::Ipv4Addr>,
    /// Reservations that expire before this time (RFC 3339).
    pub expiring_before: Option<String>,
    /// Those with an id above this (the last id of the previous page).
    pub after: Option<u64>,
    /// At most this many.
    pub limit: Option<u64>,
}

impl ListQuery {
    /// The query string, percent-encoded, with its `?` (empty if nothing is asked).
    pub fn query(&self) -> String {
        let pairs: Vec<String> = [
            ("owner", self.owner.clone()),
            ("public_port", self.public_port.map(|p| p.to_string())),
            ("target", self.target.map(|t| t.to_string())),
            ("expiring_before", self.expiring_before.clone()),
            ("after", self.after.map(|a| a.to_string())),
            ("limit", self.limit.map(|l| l.to_string())),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", percent_encode(&v))))
        .collect();
        if pairs.is_empty() {
            String::new()
        } else {
            format!("?{}", pairs.join("&"))
        }
    }
}

/// `PATCH /v1/reservations/{id}`: what to change in place (each optional; the public side
/// never changes, so the port cannot be lost to someone else in between).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeRequest {
    /// A new target, `TARGET_IP[:PORT]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// A new owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// A new note (empty clears it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// `POST /v1/reservations/{id}/renew`: a new lifetime, or (none) the one it had.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    #[serde(default)]
    pub ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// `PUT /v1/tunnel-owners/{address}`: the account a tunnel address's mappings (NAT-PMP, PCP,
/// UPnP) belong to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelOwnerRequest {
    pub owner: String,
}

/// A tunnel address and the owner of its mappings, as `GET /v1/tunnel-owners` lists them and
/// `PUT`/`DELETE /v1/tunnel-owners/{address}` answer (with the mappings a change released).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelOwnerView {
    pub address: String,
    pub owner: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<Vec<u64>>,
}

/// `GET /v1/reservations/{id}/check`: "is my port open?", link by link, in the order a packet
/// meets them, ending in one verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckView {
    /// The endpoint checked: `IP:PORT/PROTO`.
    pub public: String,
    pub links: Vec<CheckLink>,
    /// `open`, `closed` or `inconclusive`.
    pub verdict: String,
    /// For `closed`, the first link that failed; for `inconclusive`, the one that could not
    /// tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub because: Option<String>,
}

/// `GET /v1/who?public=IP:PORT/PROTO&at=TIME`: who held a public endpoint at a time, from the
/// reservation records alone (pf keeps no flow or traffic logs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoView {
    /// The endpoint asked about: `IP:PORT/PROTO`.
    pub public: String,
    /// The time asked about (RFC 3339).
    pub at: String,
    /// Who held it then: none, one, or (at the instant of a hand-over) both.
    pub holders: Vec<HolderView>,
}

/// One holding of a public range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderView {
    /// The reservation's id.
    pub id: u64,
    pub owner: String,
    /// The reservation's public range: `IP:PORT[-PORT]/PROTO`.
    pub public: String,
    pub from: String,
    /// When the holding ended; absent while it goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// How it ended: `released`, `expired` or `owner-changed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
}

/// One link of a check: `reservation`, `maps`, `attached`, `program`, `target`, `traffic`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckLink {
    pub link: String,
    /// `ok`, `failed`, `inconclusive`, or `info` (traffic: it says, it does not judge).
    pub state: String,
    pub detail: String,
}

/// `POST /v1/expired/{id}/restore`: a new lifetime, or (none) the one it had.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    #[serde(default)]
    pub ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// What a reservation forwards, as the API and `pf stats --json` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardView {
    pub public_ip: String,
    pub first_port: u16,
    pub last_port: u16,
    /// `tcp`, `udp` or `both`.
    pub protocol: String,
    pub target_ip: String,
    pub target_first_port: u16,
    pub target_last_port: u16,
    /// The whole forward in one line: `198.51.100.1:8080/tcp -> 10.8.0.2:80`.
    pub spec: String,
}

impl From<&Reservation> for ForwardView {
    fn from(r: &Reservation) -> Self {
        let target = r.target_ports();
        Self {
            public_ip: r.public.addr.to_string(),
            first_port: r.public.ports.first,
            last_port: r.public.ports.last,
            protocol: r.public.protocols.to_string(),
            target_ip: r.target_addr.to_string(),
            target_first_port: target.first,
            target_last_port: target.last,
            spec: r.to_string(),
        }
    }
}

/// A reservation record as the API shows it (times in RFC 3339, UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationView {
    pub id: u64,
    pub owner: String,
    /// `IP:PORT[-PORT]/PROTO`, as it was made (what `pf release` takes).
    pub public: String,
    #[serde(flatten)]
    pub forward: ForwardView,
    pub created: String,
    pub ttl_seconds: Option<u64>,
    pub expires: Option<String>,
    pub enabled: bool,
    pub note: String,
    /// When it expired: in the expired history only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired: Option<String>,
    /// Its traffic from start to end: in the answer to a release only (and the audit lines of
    /// a release or an expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<Traffic>,
    /// A trigger rule's: what opens it, and whether it is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<TriggerView>,
    /// Its limits, if it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsView>,
}

/// `GET /v1/stats`: each reservation with its traffic since it was made: across disables,
/// expiries, changes and restarts of `pf serve`, but not a reboot, which empties the maps (what
/// they counted since the last of those is lost with them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsView {
    pub reservations: Vec<ReservationTraffic>,
}

/// One reservation's line in `GET /v1/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationTraffic {
    pub id: u64,
    pub owner: String,
    pub enabled: bool,
    #[serde(flatten)]
    pub forward: ForwardView,
    pub traffic: Traffic,
    /// Packets its limits dropped, by reason (only a reservation with limits, while enabled):
    /// since its limits were last armed (made, enabled, retargeted, restored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<std::collections::BTreeMap<String, u64>>,
}

/// Drops by reason as the API names them.
pub fn drops_by_reason(
    d: &[u64; pf_common::LIMIT_DROP_REASONS],
) -> std::collections::BTreeMap<String, u64> {
    pf_common::LimitDrop::ALL
        .iter()
        .map(|r| (r.name().to_string(), d[*r as usize]))
        .collect()
}

/// `DELETE /v1/reservations?owner=X`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasedByOwner {
    pub owner: String,
    pub released: Vec<ReservationView>,
}

/// `POST /v1/drains`: winding down. At `at` (RFC 3339), every reservation (or `owner`'s) is
/// disabled, or with `release` released; audited, and kept across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default)]
    pub release: bool,
}

/// A scheduled drain, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainView {
    pub id: u64,
    pub at: String,
    /// Only this owner's reservations; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// `disable` or `release`.
    pub action: String,
    pub created: String,
    /// When it was carried out; absent while pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<String>,
}

/// `POST /v1/owners/{owner}/disable`: every reservation of an owner stops forwarding (a
/// complaint), with the reason the audit log keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisableOwnerRequest {
    pub reason: String,
}

/// The answer to `POST /v1/owners/{owner}/disable`: the reservations it disabled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisabledByOwner {
    pub owner: String,
    pub reason: String,
    pub disabled: Vec<ReservationView>,
}

/// Every error's body: what is wrong (one line, for people), what kind of failure (`code`, for
/// programs: `bad_request`, `refused`, `not_found`, `method_not_allowed`, `body_timeout`,
/// `conflict`, `too_large`, `internal`, `unavailable`), the policy rule that refused, if one
/// did, and the reservation in the way, if one is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict_id: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_reads_back_as_written() {
        let r = Reservation::new(
            "198.51.100.1:8810-8815/both".parse().unwrap(),
            "10.8.0.3:9810".parse().unwrap(),
        )
        .unwrap();
        let view = ReservationView {
            id: 7,
            owner: "acct-7".into(),
            public: r.public.to_string(),
            forward: ForwardView::from(&r),
            created: "2026-11-29T00:00:00.000Z".into(),
            ttl_seconds: Some(60),
            expires: None,
            enabled: true,
            note: String::new(),
            expired: None,
            traffic: None,
            trigger: Some(TriggerView {
                on: "6000/udp".into(),
                idle_timeout_ms: 120_000,
                state: "armed".into(),
                open_until: None,
            }),
            limits: None,
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["target_last_port"], 9815);
        assert_eq!(json["protocol"], "both");
        assert_eq!(
            json["spec"],
            "198.51.100.1:8810-8815/both -> 10.8.0.3:9810-9815"
        );
        assert!(json.get("expired").is_none());
        assert_eq!(
            serde_json::from_value::<ReservationView>(json).unwrap(),
            view
        );
        // A request with a field the server does not know is refused, not ignored.
        assert!(
            serde_json::from_str::<ReserveRequest>(
                r#"{"owner":"a","public":"x","to":"y","port":1}"#
            )
            .is_err()
        );
    }
}
