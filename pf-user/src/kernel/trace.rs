//! `pf trace`: switching the programs' reports on and off (`TRACE_CONFIG`) and reading them
//! (`TRACE_EVENTS`, a ring buffer). One trace at a time: a second finds the switch on and is
//! refused; a trace that was killed leaves it on, and `Trace::off` clears it.

use std::net::Ipv4Addr;

use aya::maps::{Array, MapData, RingBuf};
use pf_common::{
    MAP_SHAPES, TRACE_NO_FAST_PATH, TraceConfig, TraceEvent,
    counters::{FastPath, Outcome},
    map_names, trace_hook,
};

use super::{PfError, bpffs::PinDir, state::open_map};

/// The switch and the ring of reports, open.
pub struct Trace {
    config: Array<MapData, TraceConfig>,
    events: RingBuf<MapData>,
}

/// One report, in words.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TraceLine {
    /// `ingress`, `egress` or `reply fast path`.
    pub hook: &'static str,
    /// The program's outcome (`rewritten`, `no_reservation`, ...).
    pub outcome: &'static str,
    /// The fast path's outcome, where one was tried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fast_path: Option<&'static str>,
    pub protocol: String,
    /// The packet as it came.
    pub source: String,
    pub destination: String,
    /// What the program rewrote them to, where it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewritten_source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewritten_destination: Option<String>,
}

impl TraceLine {
    fn from_event(e: &TraceEvent) -> Self {
        let outcome_name = |code: u8| -> &'static str {
            Outcome::ALL
                .get(code as usize)
                .map_or("unknown", |o| o.name())
        };
        let fast_name = |code: u8| -> &'static str {
            FastPath::ALL
                .get(code as usize)
                .map_or("unknown", |f| f.name())
        };
        let endpoint = |addr: [u8; 4], port: [u8; 2]| match u16::from_be_bytes(port) {
            0 => Ipv4Addr::from(addr).to_string(),
            p => format!("{}:{p}", Ipv4Addr::from(addr)),
        };
        let (hook, outcome) = match e.hook {
            trace_hook::EGRESS => ("egress", outcome_name(e.outcome)),
            trace_hook::REPLY_FAST_PATH => ("reply fast path", fast_name(e.outcome)),
            _ => ("ingress", outcome_name(e.outcome)),
        };
        Self {
            hook,
            outcome,
            fast_path: (e.hook == trace_hook::INGRESS && e.fast != TRACE_NO_FAST_PATH)
                .then(|| fast_name(e.fast)),
            protocol: match e.proto {
                pf_common::IPPROTO_TCP => "tcp".into(),
                pf_common::IPPROTO_UDP => "udp".into(),
                pf_common::IPPROTO_ICMP => "icmp".into(),
                0 => "-".into(),
                other => other.to_string(),
            },
            source: endpoint(e.before.src_addr, e.before.src_port),
            destination: endpoint(e.before.dst_addr, e.before.dst_port),
            rewritten_source: ((e.after.src_addr, e.after.src_port)
                != (e.before.src_addr, e.before.src_port))
                .then(|| endpoint(e.after.src_addr, e.after.src_port)),
            rewritten_destination: ((e.after.dst_addr, e.after.dst_port)
                != (e.before.dst_addr, e.before.dst_port))
                .then(|| endpoint(e.after.dst_addr, e.after.dst_port)),
        }
    }
}

fn shape(name: &str) -> &'static pf_common::MapShape {
    MAP_SHAPES
        .iter()
        .find(|s| s.name == name)
        .expect("every map has a shape")
}

impl Trace {
    /// Opens the pinned switch and ring (their layouts checked), or `None` if pf has no maps
    /// in `dir` yet.
    pub fn open(dir: &PinDir) -> Result<Option<Self>, PfError> {
        if !dir.map(map_names::TRACE_EVENTS).exists() {
            return Ok(None);
        }
        let typed = |name: &'static str| {
            move |source: aya::maps::MapError| PfError::Map { map: name, source }
        };
        let (config, _) = open_map(dir, shape(map_names::TRACE_CONFIG))?;
        let (events, _) = open_map(dir, shape(map_names::TRACE_EVENTS))?;
        Ok(Some(Self {
            config: config.try_into().map_err(typed(map_names::TRACE_CONFIG))?,
            events: events.try_into().map_err(typed(map_names::TRACE_EVENTS))?,
        }))
    }

    /// Whether the programs are reporting now.
    pub fn is_on(&self) -> Result<bool, PfError> {
        Ok(self.current()?.enabled != 0)
    }

    fn current(&self) -> Result<TraceConfig, PfError> {
        self.config.get(&0, 0).map_err(|source| PfError::Map {
            map: map_names::TRACE_CONFIG,
            source,
        })
    }

    fn set(&mut self, config: TraceConfig) -> Result<(), PfError> {
        self.config
            .set(0, config, 0)
            .map_err(|source| PfError::Map {
                map: map_names::TRACE_CONFIG,
                source,
            })
    }

    /// Switches the reports on, for every packet or those to or from `port`. Reports left in
    /// the ring from an earlier trace are dropped first.
    pub fn on(&mut self, port: Option<u16>) -> Result<(), PfError> {
        while self.events.next().is_some() {}
        self.set(TraceConfig {
            enabled: 1,
            port: port.unwrap_or(0).to_be_bytes(),
            _pad: [0; 2],
        })
    }

    /// Switches the reports off.
    pub fn off(&mut self) -> Result<(), PfError> {
        self.set(TraceConfig::default())
    }

    /// The reports waiting in the ring, in order.
    pub fn drain(&mut self) -> Vec<TraceLine> {
        let mut lines = Vec::new();
        while let Some(item) = self.events.next() {
            if let Ok(event) = bytemuck::try_from_bytes::<TraceEvent>(&item) {
                lines.push(TraceLine::from_event(event));
            }
        }
        lines
    }
}
