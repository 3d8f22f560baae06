//! A reservation's limits in the kernel (`pf-ebpf/src/limit.rs`): its slot of `LIMITS` (the
//! rates, as GCRA costs), its networks in `LIMIT_SOURCES`, and its drops in `LIMIT_DROPS`.
//! The forward entries of a reservation with limits carry the slot ([`EntryTags::limit`]);
//! the service gives each such reservation a slot of its own.

use std::collections::{HashMap, HashSet};

use aya::maps::{IterableMap, MapError, lpm_trie::Key};
use pf_common::{
    LIMIT_COST_SHIFT, LIMIT_DROP_REASONS, Limit, LimitDrops, RateLimit, SourceNet, limits,
    map_names, source_list,
};

use super::{
    PfError,
    bpffs::PinDir,
    state::{State, open_map},
};
use crate::domain::{
    limits::{Limits, SourceList},
    net::Ipv4Net,
};

/// What the kernel needs of a reservation's limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitRule {
    /// Its slot in `LIMITS` (1 to `MAX_LIMITS - 1`), which its forward entries carry.
    pub slot: u16,
    pub limits: Limits,
}

/// A reservation's drops by reason, in `LimitDrop` order, summed over the CPUs.
pub type Drops = [u64; LIMIT_DROP_REASONS];

fn map_error(map: &'static str) -> impl Fn(MapError) -> PfError {
    move |source| PfError::Map { map, source }
}

fn check_slot(slot: u16) -> Result<u32, PfError> {
    if slot == 0 || u32::from(slot) >= limits::MAX_LIMITS {
        return Err(PfError::LimitSlot {
            slot: slot.into(),
            problem: "outside the limit slots (1 to 16,383)",
        });
    }
    Ok(slot.into())
}

/// A rate of `per_second` events, each `units` of what the rate counts (1 packet or SYN, 8
/// bits a byte), as the kernel's GCRA cost per unit.
fn rate(per_second: Option<u64>, units_per_event: u64) -> RateLimit {
    let Some(per_second) = per_second.filter(|r| *r > 0) else {
        return RateLimit::default();
    };
    let cost = ((1_000_000_000u128 << LIMIT_COST_SHIFT) * u128::from(units_per_event))
        / u128::from(per_second);
    RateLimit {
        tat_ns: 0,
        cost: u64::try_from(cost).unwrap_or(u64::MAX).max(1),
        burst_ns: limits::LIMIT_BURST_NS,
    }
}

/// The kernel's form of `limits` (arrival times zero: full buckets).
pub fn kernel_limit(l: &Limits) -> Limit {
    Limit {
        packets: rate(l.packets_per_second, 1),
        bytes: rate(l.bits_per_second, 8),
        syns: rate(l.syns_per_second, 1),
        sources: match &l.sources {
            None => source_list::NONE,
            Some(SourceList::Allow(_)) => source_list::ALLOW,
            Some(SourceList::Deny(_)) => source_list::DENY,
        },
        _pad: 0,
    }
}

/// Whether two limits are the same apart from the arrival times the programs write.
fn same_config(a: &Limit, b: &Limit) -> bool {
    let strip = |l: &Limit| {
        let mut l = *l;
        l.packets.tat_ns = 0;
        l.bytes.tat_ns = 0;
        l.syns.tat_ns = 0;
        l
    };
    strip(a) == strip(b)
}

/// A `LIMIT_SOURCES` entry: a network of a slot's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Source {
    slot: u16,
    net: Ipv4Net,
}

impl Source {
    /// Its key: the slot's 32 bits, then the network's prefix.
    fn key(self) -> Key<SourceNet> {
        let addr = u32::from(self.net.addr) & self.net.mask();
        Key::new(
            32 + u32::from(self.net.prefix),
            SourceNet {
                slot: u32::from(self.slot).to_be_bytes(),
                addr: addr.to_be_bytes(),
            },
        )
    }

    fn from_key(key: &Key<SourceNet>) -> Self {
        let data = key.data();
        Source {
            slot: u32::from_be_bytes(data.slot) as u16,
            net: Ipv4Net {
                addr: data.addr.into(),
                prefix: key.prefix_len().saturating_sub(32).min(32) as u8,
            },
        }
    }
}

impl LimitRule {
    fn sources(&self) -> impl Iterator<Item = Source> + '_ {
        self.limits
            .sources
            .iter()
            .flat_map(|list| list.networks().iter())
            .map(|net| Source {
                slot: self.slot,
                net: *net,
            })
    }
}

impl State {
    /// Every `LIMIT_SOURCES` key, by slot. A scan of the trie: it holds only lists.
    fn sources_by_slot(&self) -> Result<HashMap<u16, Vec<Source>>, PfError> {
        let mut by_slot: HashMap<u16, Vec<Source>> = HashMap::new();
        for key in self.limit_sources.keys() {
            let source = Source::from_key(&key.map_err(map_error(map_names::LIMIT_SOURCES))?);
            by_slot.entry(source.slot).or_default().push(source);
        }
        Ok(by_slot)
    }

    fn add_source(&mut self, source: Source) -> Result<(), PfError> {
        self.limit_sources
            .insert(&source.key(), 1, 0)
            .map_err(map_error(map_names::LIMIT_SOURCES))
    }

    fn remove_source(&mut self, source: Source) -> Result<(), PfError> {
        match self.limit_sources.remove(&source.key()) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_error(map_names::LIMIT_SOURCES)(e)),
        }
    }

    /// Checks `rule` before anything is written: its slot, and its list's size.
    pub(super) fn check_limit(&self, rule: &LimitRule) -> Result<(), PfError> {
        check_slot(rule.slot)?;
        let n = rule
            .limits
            .sources
            .as_ref()
            .map_or(0, |l| l.networks().len());
        if n > limits::MAX_SOURCES_PER_LIMIT {
            return Err(PfError::LimitSlot {
                slot: rule.slot.into(),
                problem: "given more source networks than a list may hold (256)",
            });
        }
        Ok(())
    }

    /// Writes `rule` into its slot: the list first, then the rates and the list's mode, so
    /// entries that carry the slot never see a mode without its networks. Buckets start full
    /// and drops at zero. On failure the slot is cleared again (best effort: the error is the
    /// one to report, and a reconcile makes the maps exact).
    pub fn arm_limit(&mut self, rule: &LimitRule) -> Result<(), PfError> {
        self.check_limit(rule)?;
        let result = self.write_limit(rule);
        if result.is_err() {
            let _ = self.disarm_limit(rule.slot);
        }
        result
    }

    fn write_limit(&mut self, rule: &LimitRule) -> Result<(), PfError> {
        let slot = u32::from(rule.slot);
        let want: HashSet<Source> = rule.sources().collect();
        // Only a slot that has (or had) a list is looked for in the trie: a scan of it costs
        // a syscall per network of every list.
        let had_list = self.limit_at(rule.slot)?.sources != source_list::NONE;
        if had_list {
            let have = self
                .sources_by_slot()?
                .remove(&rule.slot)
                .unwrap_or_default();
            for source in have.into_iter().filter(|s| !want.contains(s)) {
                self.remove_source(source)?;
            }
        }
        for source in want {
            self.add_source(source)?;
        }
        self.limits
            .set(slot, kernel_limit(&rule.limits), 0)
            .map_err(map_error(map_names::LIMITS))?;
        self.zero_drops(rule.slot)
    }

    /// What slot `slot` holds now.
    fn limit_at(&self, slot: u16) -> Result<Limit, PfError> {
        self.limits
            .get(&check_slot(slot)?, 0)
            .map_err(map_error(map_names::LIMITS))
    }

    fn zero_drops(&mut self, slot: u16) -> Result<(), PfError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| PfError::io(what.to_string(), e))?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![LimitDrops::default(); cpus])
            .map_err(|e| PfError::io("zeroing a limit's drops", e))?;
        self.limit_drops
            .set(u32::from(slot), zeros, 0)
            .map_err(map_error(map_names::LIMIT_DROPS))
    }

    /// Clears slot `slot`: its rates, its list, its drops. Run when a limited reservation is
    /// released, once its entries are gone.
    pub(super) fn disarm_limit(&mut self, slot: u16) -> Result<(), PfError> {
        let index = check_slot(slot)?;
        let had_list = self.limit_at(slot)?.sources != source_list::NONE;
        self.limits
            .set(index, Limit::default(), 0)
            .map_err(map_error(map_names::LIMITS))?;
        if had_list {
            for source in self.sources_by_slot()?.remove(&slot).unwrap_or_default() {
                self.remove_source(source)?;
            }
        }
        self.zero_drops(slot)
    }

    /// Makes `LIMITS` and `LIMIT_SOURCES` hold exactly `rules` and returns each difference
    /// it repaired: the networks a list lacks first, then the slots, then the networks no
    /// list has, so no entry ever meets a mode without its networks. A slot already holding
    /// its rule keeps its buckets and drops as they are; one changed starts with zero drops.
    pub fn sync_limits(&mut self, rules: &[LimitRule]) -> Result<Vec<String>, PfError> {
        let mut want: HashMap<u32, Limit> = HashMap::new();
        let mut want_sources: HashSet<Source> = HashSet::new();
        for rule in rules {
            self.check_limit(rule)?;
            if want
                .insert(rule.slot.into(), kernel_limit(&rule.limits))
                .is_some()
            {
                return Err(PfError::LimitSlot {
                    slot: rule.slot.into(),
                    problem: "given to two reservations",
                });
            }
            want_sources.extend(rule.sources());
        }
        let mut drifts = Vec::new();
        let have_sources: HashSet<Source> =
            self.sources_by_slot()?.into_values().flatten().collect();
        for &source in want_sources.difference(&have_sources) {
            self.add_source(source)?;
            drifts.push(format!(
                "added source {} of limit slot {}",
                source.net, source.slot
            ));
        }
        let have: Vec<(u32, Limit)> = super::state::dump(self.limits.map(), map_names::LIMITS)?;
        for (slot, limit) in have {
            if slot == 0 {
                continue;
            }
            let wanted = want.remove(&slot).unwrap_or_default();
            if !same_config(&limit, &wanted) {
                self.limits
                    .set(slot, wanted, 0)
                    .map_err(map_error(map_names::LIMITS))?;
                self.zero_drops(slot as u16)?;
                drifts.push(if wanted == Limit::default() {
                    format!("cleared limit slot {slot}: no reservation has it")
                } else {
                    format!("set limit slot {slot}")
                });
            }
        }
        for &source in have_sources.difference(&want_sources) {
            self.remove_source(source)?;
            drifts.push(format!(
                "removed source {} of limit slot {}: no list has it",
                source.net, source.slot
            ));
        }
        Ok(drifts)
    }

    /// The drops of every slot that dropped anything, summed over the CPUs: one batched read
    /// of the whole per-CPU array (a few syscalls, whatever the number of reservations).
    pub fn limit_drops_all(&self) -> Result<HashMap<u16, Drops>, PfError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| PfError::io(what.to_string(), e))?;
        let all = super::batch::lookup_all_per_cpu::<u32, LimitDrops>(
            std::os::fd::AsFd::as_fd(self.limit_drops.map().fd()),
            cpus,
        )
        .map_err(|e| {
            PfError::io(
                format!(
                    "reading map {} (BPF_MAP_LOOKUP_BATCH)",
                    map_names::LIMIT_DROPS
                ),
                e,
            )
        })?;
        Ok(all
            .into_iter()
            .filter(|(slot, _)| *slot != 0)
            .map(|(slot, per_cpu)| {
                let mut sum = [0u64; LIMIT_DROP_REASONS];
                for cpu in &per_cpu {
                    for (s, v) in sum.iter_mut().zip(cpu.by_reason) {
                        *s += v;
                    }
                }
                (slot as u16, sum)
            })
            .filter(|(_, sum)| sum.iter().any(|n| *n != 0))
            .collect())
    }

    /// The drops of limit slot `slot`, summed over the CPUs.
    pub fn limit_drops(&self, slot: u16) -> Result<Drops, PfError> {
        self.limit_drops
            .get(&check_slot(slot)?, 0)
            .map(|v| sum_drops(&v))
            .map_err(map_error(map_names::LIMIT_DROPS))
    }
}

/// Sums one slot's per-CPU drops.
fn sum_drops(values: &aya::maps::PerCpuValues<LimitDrops>) -> Drops {
    let mut sum = [0u64; LIMIT_DROP_REASONS];
    for cpu in values.iter() {
        for (s, v) in sum.iter_mut().zip(cpu.by_reason) {
            *s += v;
        }
    }
    sum
}

/// The drop counters, read without pf's lock (the API's lists never wait for a change).
pub struct DropCounters {
    map: aya::maps::PerCpuArray<aya::maps::MapData, LimitDrops>,
}

impl DropCounters {
    /// Opens the pinned `LIMIT_DROPS` (its layout checked), or `None` if pf has no maps in
    /// `dir`.
    pub fn open(dir: &PinDir) -> Result<Option<Self>, PfError> {
        if !dir.map(map_names::LIMIT_DROPS).exists() {
            return Ok(None);
        }
        let shape = pf_common::MAP_SHAPES
            .iter()
            .find(|s| s.name == map_names::LIMIT_DROPS)
            .expect("every map has a shape");
        let (map, _) = open_map(dir, shape)?;
        Ok(Some(Self {
            map: map.try_into().map_err(map_error(map_names::LIMIT_DROPS))?,
        }))
    }

    /// Slot `slot`'s drops, summed over the CPUs.
    pub fn get(&self, slot: u16) -> Result<Drops, PfError> {
        self.map
            .get(&check_slot(slot)?, 0)
            .map(|v| sum_drops(&v))
            .map_err(map_error(map_names::LIMIT_DROPS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_become_gcra_costs() {
        let l = kernel_limit(&Limits {
            packets_per_second: Some(1000),
            bits_per_second: Some(8_000_000),
            syns_per_second: None,
            sources: Some(SourceList::Deny(vec!["10.0.0.0/8".parse().unwrap()])),
        });
        // 1 ms a packet; 1 us a byte at a megabyte a second.
        assert_eq!(l.packets.cost >> LIMIT_COST_SHIFT, 1_000_000);
        assert_eq!(l.bytes.cost >> LIMIT_COST_SHIFT, 1_000);
        assert_eq!(l.syns, RateLimit::default());
        assert_eq!(l.sources, source_list::DENY);
        // 100 Gbit/s: 0.08 ns a byte, kept to 0.02%.
        let fast = rate(Some(100_000_000_000), 8).cost as f64 / f64::from(1u32 << LIMIT_COST_SHIFT);
        assert!((fast - 0.08).abs() / 0.08 < 0.0002, "{fast}");
        // The lowest bit rate for a 64 KiB packet still fits.
        let slowest = rate(Some(crate::domain::limits::MIN_BIT_RATE), 8);
        assert!(slowest.cost.checked_mul(65_535).is_some());
    }

    #[test]
    fn source_keys_put_the_slot_before_the_network() {
        let source = Source {
            slot: 3,
            net: "203.0.113.0/24".parse().unwrap(),
        };
        let key = source.key();
        assert_eq!(key.prefix_len(), 56);
        assert_eq!(key.data().slot, [0, 0, 0, 3]);
        assert_eq!(key.data().addr, [203, 0, 113, 0]);
        assert_eq!(Source::from_key(&key), source);
    }
}
