//! Port triggering's maps. A rule is armed in two parts: its gate (`TRIGGER_GATES[gate]`, the
//! idle timeout; closed until the trigger program opens it) and its trigger ports
//! (`TRIGGER_PORTS`: client, port and protocol to the gate). Its open range is an ordinary
//! reservation whose NAT entries carry the gate ([`State::reserve_gated`]). The trigger program
//! reports each opening on `TRIGGER_EVENTS` ([`Openings`]); closing is the gate's expiry
//! passing, which the programs check on every packet and userspace reads with
//! [`State::trigger_gate`].

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use aya::maps::{IterableMap, MapData, MapError, RingBuf};
use pf_common::{EndpointKey, MAP_SHAPES, TriggerGate, TriggerOpened, limits, map_names};

use super::{
    PfError,
    bpffs::PinDir,
    limit::LimitRule,
    state::{EntryTags, State, open_map},
};

/// What guards a reservation's entries besides its ports: a trigger rule's gate, limits.
#[derive(Clone, Copy, Debug, Default)]
pub struct Guards<'a> {
    pub trigger: Option<&'a TriggerRule>,
    pub limit: Option<&'a LimitRule>,
}
use crate::domain::spec::{PortRange, Protocols};

/// What the kernel needs of a trigger rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TriggerRule {
    /// Its slot in `TRIGGER_GATES` (1 to 65,535), which its open range's NAT entries carry.
    pub gate: u16,
    /// The tunnel client whose packets trigger it.
    pub client: Ipv4Addr,
    pub protocols: Protocols,
    /// Destination ports of the client's outbound packets that open the gate.
    pub ports: PortRange,
    /// How long the gate stays open after the last packet through it.
    pub idle_timeout: Duration,
}

impl TriggerRule {
    /// The idle timeout in nanoseconds, as the gate holds it: 1 ns to a day.
    fn timeout_ns(&self) -> Result<u64, PfError> {
        u64::try_from(self.idle_timeout.as_nanos())
            .ok()
            .filter(|t| (1..=limits::MAX_TRIGGER_IDLE_NS).contains(t))
            .ok_or(PfError::TriggerGate {
                gate: self.gate.into(),
                problem: "given an idle timeout outside 1 ns to 24 h",
            })
    }

    fn keys(&self) -> impl Iterator<Item = EndpointKey> + '_ {
        self.protocols
            .ip_protocols()
            .iter()
            .flat_map(move |&proto| {
                (self.ports.first..=self.ports.last).map(move |port| {
                    EndpointKey::new(self.client.octets(), port.to_be_bytes(), proto)
                })
            })
    }
}

/// A gate as the kernel has it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateState {
    /// The slot holds a rule (a timeout is set).
    pub armed: bool,
    /// Time left before it closes, if it is open now.
    pub open_for: Option<Duration>,
    /// When the last opening lapsed or will lapse, in `bpf_ktime_get_ns` nanoseconds (0: it
    /// never opened).
    pub expires_ns: u64,
}

/// The kernel's monotonic clock, which the gates keep (`bpf_ktime_get_ns`, or where the kernel
/// has it the coarse `bpf_ktime_get_coarse_ns`, the same clock as of the last tick, a few
/// milliseconds behind): CLOCK_MONOTONIC, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn map_error(map: &'static str) -> impl Fn(MapError) -> PfError {
    move |source| PfError::Map { map, source }
}

fn check_gate(gate: u16) -> Result<u32, PfError> {
    if gate == 0 || u32::from(gate) >= limits::MAX_TRIGGER_GATES {
        return Err(PfError::TriggerGate {
            gate: gate.into(),
            problem: "outside 1-65535",
        });
    }
    Ok(gate.into())
}

impl State {
    /// Arms a trigger rule: its gate first (closed, with the rule's timeout), then its trigger
    /// ports, after checking that none is taken and the gate is free; undone on a failure.
    pub fn arm_trigger(&mut self, rule: &TriggerRule) -> Result<(), PfError> {
        self.check_arm(rule)?;
        self.write_arm(rule)
    }

    /// Refuses a rule whose gate is taken or whose trigger ports another rule has, changing
    /// nothing.
    fn check_arm(&self, rule: &TriggerRule) -> Result<(), PfError> {
        let gate = check_gate(rule.gate)?;
        rule.timeout_ns()?;
        if self.trigger_gate(rule.gate)?.armed {
            return Err(PfError::TriggerGate {
                gate,
                problem: "taken by another rule",
            });
        }
        for key in rule.keys() {
            match self.trigger_ports.get(&key, 0) {
                Ok(other) => {
                    return Err(PfError::TriggerConflict {
                        client: rule.client.to_string(),
                        trigger: format!(
                            "port {}/{}",
                            u16::from_be_bytes(key.port),
                            if key.proto == pf_common::IPPROTO_TCP {
                                "tcp"
                            } else {
                                "udp"
                            }
                        ),
                        gate: other,
                    });
                }
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_error(map_names::TRIGGER_PORTS)(e)),
            }
        }
        Ok(())
    }

    /// Arms a rule [`State::check_arm`] admitted; undone whole on a failure.
    fn write_arm(&mut self, rule: &TriggerRule) -> Result<(), PfError> {
        let gate = check_gate(rule.gate)?;
        let timeout_ns = rule.timeout_ns()?;
        self.set_closed_gate(gate, timeout_ns)?;
        let mut written = Vec::new();
        for key in rule.keys() {
            if let Err(e) = self.trigger_ports.insert(key, gate, 0) {
                for key in &written {
                    let _ = self.trigger_ports.remove(key);
                }
                let _ = self.set_closed_gate(gate, 0);
                return Err(map_error(map_names::TRIGGER_PORTS)(e));
            }
            written.push(key);
        }
        Ok(())
    }

    /// Disarms a trigger rule: its trigger ports first (nothing opens it any more), then its
    /// gate, which closes it at once (an entry still carrying the gate forwards nothing).
    /// Ports already gone are fine.
    pub fn disarm_trigger(&mut self, rule: &TriggerRule) -> Result<(), PfError> {
        let gate = check_gate(rule.gate)?;
        for key in rule.keys() {
            match self.trigger_ports.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_error(map_names::TRIGGER_PORTS)(e)),
            }
        }
        self.set_closed_gate(gate, 0)
    }

    /// Sets gate slot `gate` closed with idle timeout `timeout_ns` (0: it holds no rule).
    fn set_closed_gate(&mut self, gate: u32, timeout_ns: u64) -> Result<(), PfError> {
        self.trigger_gates
            .set(
                gate,
                TriggerGate {
                    expires_ns: 0,
                    timeout_ns,
                },
                0,
            )
            .map_err(map_error(map_names::TRIGGER_GATES))
    }

    /// Adds `r` with its guards, all or nothing: its limits armed first (its first packet
    /// meets them), then its entries, then its trigger rule (its gate closed until triggered).
    pub fn reserve_guarded(
        &mut self,
        r: &crate::domain::spec::Reservation,
        guards: Guards<'_>,
    ) -> Result<(), PfError> {
        // Checked before the range is written: undoing the range disarms its gate and its
        // limit slot, which must never be another reservation's.
        if let Some(rule) = guards.trigger {
            self.check_arm(rule)?;
        }
        if let Some(rule) = guards.limit {
            self.check_limit(rule)?;
            self.arm_limit(rule)?;
        }
        let tags = EntryTags {
            gate: guards.trigger.map_or(0, |t| t.gate),
            limit: guards.limit.map_or(0, |l| l.slot),
        };
        if let Err(e) = self.reserve_tagged(r, tags) {
            if let Some(rule) = guards.limit {
                let _ = self.disarm_limit(rule.slot);
            }
            return Err(e);
        }
        if let Some(rule) = guards.trigger
            && let Err(e) = self.write_arm(rule)
        {
            let _ = self.release_exact(r);
            return Err(e);
        }
        Ok(())
    }

    /// Makes the trigger maps hold exactly `rules` and returns each difference it repaired.
    /// A rule already armed as it should be keeps its gate's state: an opening survives a
    /// restart of `pf serve`.
    pub fn sync_triggers(&mut self, rules: &[TriggerRule]) -> Result<Vec<String>, PfError> {
        let mut want = std::collections::HashMap::new();
        let mut gates = std::collections::HashMap::new();
        for rule in rules {
            gates.insert(check_gate(rule.gate)?, rule.timeout_ns()?);
            for key in rule.keys() {
                want.insert(key, u32::from(rule.gate));
            }
        }
        let mut drifts = Vec::new();
        let have: Vec<(EndpointKey, u32)> = self
            .trigger_ports
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_error(map_names::TRIGGER_PORTS))?;
        let describe = |key: &EndpointKey| {
            format!(
                "trigger {}:{}/{}",
                Ipv4Addr::from(key.addr),
                u16::from_be_bytes(key.port),
                if key.proto == pf_common::IPPROTO_TCP {
                    "tcp"
                } else {
                    "udp"
                }
            )
        };
        for (key, gate) in &have {
            if want.get(key) != Some(gate) {
                match self.trigger_ports.remove(key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_error(map_names::TRIGGER_PORTS)(e)),
                }
                drifts.push(format!(
                    "removed {} (gate {gate}): no rule has it",
                    describe(key)
                ));
            }
        }
        // The whole gate array in one batched read (a few syscalls, not 65,535).
        let slots: Vec<(u32, TriggerGate)> =
            super::state::dump(self.trigger_gates.map(), map_names::TRIGGER_GATES)?;
        for (gate, slot) in slots {
            if gate == 0 {
                continue;
            }
            let timeout_ns = gates.get(&gate).copied().unwrap_or(0);
            if slot.timeout_ns != timeout_ns {
                // A rule that was not armed, or armed otherwise: closed until triggered.
                self.set_closed_gate(gate, timeout_ns)?;
                drifts.push(if timeout_ns == 0 {
                    format!("cleared trigger gate {gate}: no rule has it")
                } else {
                    format!("armed trigger gate {gate}")
                });
            }
        }
        let had: std::collections::HashMap<EndpointKey, u32> = have.into_iter().collect();
        for (key, gate) in &want {
            if had.get(key) != Some(gate) {
                self.trigger_ports
                    .insert(*key, *gate, 0)
                    .map_err(map_error(map_names::TRIGGER_PORTS))?;
                drifts.push(format!("added {} (gate {gate})", describe(key)));
            }
        }
        Ok(drifts)
    }

    /// Disarms whatever rule has `gate`: its trigger ports (found by a scan of the small
    /// `TRIGGER_PORTS`), then the gate itself. Run when a gated reservation is released.
    pub(super) fn disarm_gate(&mut self, gate: u16) -> Result<(), PfError> {
        let gate = check_gate(gate)?;
        let keys: Vec<EndpointKey> = self
            .trigger_ports
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(_, g)| *g == gate)
            .map(|(key, _)| key)
            .collect();
        for key in keys {
            match self.trigger_ports.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_error(map_names::TRIGGER_PORTS)(e)),
            }
        }
        self.set_closed_gate(gate, 0)
    }

    /// A gate as the kernel has it now.
    pub fn trigger_gate(&self, gate: u16) -> Result<GateState, PfError> {
        let slot = self
            .trigger_gates
            .get(&check_gate(gate)?, 0)
            .map_err(map_error(map_names::TRIGGER_GATES))?;
        Ok(gate_state(&slot))
    }
}

/// The gates alone, open for reading without pf's lock: a read of a gate need not wait for
/// a change in progress (the API's lists are answered beside the engine).
pub struct Gates {
    gates: aya::maps::Array<MapData, TriggerGate>,
}

impl Gates {
    /// Opens the pinned gate array (its layout checked), or `None` if pf has no maps in `dir`.
    pub fn open(dir: &PinDir) -> Result<Option<Self>, PfError> {
        if !dir.map(map_names::TRIGGER_GATES).exists() {
            return Ok(None);
        }
        let (map, _) = open_map(dir, shape(map_names::TRIGGER_GATES))?;
        Ok(Some(Self {
            gates: map
                .try_into()
                .map_err(map_error(map_names::TRIGGER_GATES))?,
        }))
    }

    /// A gate as the kernel has it now.
    pub fn get(&self, gate: u16) -> Result<GateState, PfError> {
        let slot = self
            .gates
            .get(&check_gate(gate)?, 0)
            .map_err(map_error(map_names::TRIGGER_GATES))?;
        Ok(gate_state(&slot))
    }
}

fn shape(name: &str) -> &'static pf_common::MapShape {
    MAP_SHAPES
        .iter()
        .find(|s| s.name == name)
        .expect("every map has a shape")
}

/// A gate's slot as its state now.
fn gate_state(slot: &TriggerGate) -> GateState {
    let now = monotonic_ns();
    GateState {
        armed: slot.timeout_ns != 0,
        open_for: (slot.timeout_ns != 0 && now < slot.expires_ns)
            .then(|| Duration::from_nanos(slot.expires_ns - now)),
        expires_ns: slot.expires_ns,
    }
}

/// One opening, as the trigger program reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opening {
    pub gate: u16,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at the trigger packet.
    pub at_ns: u64,
    /// When the opening before lapsed (0: the gate never opened before).
    pub previous_expires_ns: u64,
    pub protocol: Protocols,
    /// The trigger packet's source (the client) and destination.
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
}

impl Opening {
    fn from_event(e: &TriggerOpened) -> Option<Self> {
        Some(Self {
            gate: u16::try_from(e.gate).ok()?,
            at_ns: e.at_ns,
            previous_expires_ns: e.previous_expires_ns,
            protocol: match e.proto {
                pf_common::IPPROTO_TCP => Protocols::Tcp,
                pf_common::IPPROTO_UDP => Protocols::Udp,
                _ => return None,
            },
            source: SocketAddrV4::new(e.src_addr.into(), u16::from_be_bytes(e.src_port)),
            destination: SocketAddrV4::new(e.dst_addr.into(), u16::from_be_bytes(e.dst_port)),
        })
    }
}

/// The ring of openings, open for reading (one reader: `pf serve`).
pub struct Openings {
    events: RingBuf<MapData>,
}

impl Openings {
    /// Opens the pinned ring (its layout checked).
    pub fn open(dir: &PinDir) -> Result<Self, PfError> {
        let (map, _) = open_map(dir, shape(map_names::TRIGGER_EVENTS))?;
        Ok(Self {
            events: map
                .try_into()
                .map_err(map_error(map_names::TRIGGER_EVENTS))?,
        })
    }

    /// The openings waiting in the ring, in order.
    pub fn drain(&mut self) -> Vec<Opening> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if let Some(opening) = bytemuck::try_from_bytes::<TriggerOpened>(&item)
                .ok()
                .and_then(Opening::from_event)
            {
                out.push(opening);
            }
        }
        out
    }
}
