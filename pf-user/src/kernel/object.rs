//! pf's eBPF object: embedded at build time, parsed with its maps pinned under the pin
//! directory, and its programs loaded (verified) on demand. Attaching them is
//! [`super::attach`]'s business.

use std::error::Error;

use aya::{
    Ebpf, EbpfLoader,
    programs::{Program, ProgramError, SchedClassifier, Xdp},
};

use super::{bpffs::PinDir, error::PfError};

pub const INGRESS_PROGRAM: &str = "pf_ingress";
pub const EGRESS_PROGRAM: &str = "pf_egress";
/// The ingress program with the XDP_REDIRECT fast path (`pf attach --fast-path`).
pub const FAST_INGRESS_PROGRAM: &str = "pf_ingress_fast";
/// The reply fast path, for a tunnel-side interface (`pf attach --tunnel-side`).
pub const REPLY_PROGRAM: &str = "pf_reply_fast";
/// Port triggering on a tunnel-side interface's TC ingress (`pf attach --trigger`): for
/// Ethernet frames, and for devices without a link layer (WireGuard, tun).
pub const TRIGGER_PROGRAM: &str = "pf_trigger";
pub const TRIGGER_L3_PROGRAM: &str = "pf_trigger_l3";

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pf-ebpf"));

/// An error and its sources on one line.
pub(crate) fn chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Parses pf's eBPF object, creating and pinning its maps under `dir` (or opening them if they
/// are pinned already). The programs are not loaded into the kernel yet.
pub fn load_object(dir: &PinDir) -> Result<Ebpf, PfError> {
    if OBJECT.is_empty() {
        return Err(PfError::NoEmbeddedObject);
    }
    // The gates' clock: the coarse read where the kernel has it (5.11), else the precise one.
    let coarse_clock = u8::from(
        aya::util::KernelVersion::current()
            .is_ok_and(|k| k >= aya::util::KernelVersion::new(5, 11, 0)),
    );
    EbpfLoader::new()
        .default_map_pin_directory(dir.root())
        .override_global("PF_COARSE_CLOCK", &coarse_clock, true)
        .load(OBJECT)
        .map_err(|e| {
            let detail = chain(&e);
            match e {
                aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                    if io_error.raw_os_error() == Some(libc::ENOSYS) =>
                {
                    PfError::NoBpfSupport(detail)
                }
                _ => PfError::Load(detail),
            }
        })
}

/// Both programs loaded into the kernel (verified), with the pinned maps; not attached.
pub struct Programs {
    ebpf: Ebpf,
}

impl Programs {
    pub fn load(dir: &PinDir) -> Result<Self, PfError> {
        let mut ebpf = load_object(dir)?;
        typed_mut::<Xdp>(&mut ebpf, INGRESS_PROGRAM)?
            .load()
            .map_err(load_error)?;
        typed_mut::<SchedClassifier>(&mut ebpf, EGRESS_PROGRAM)?
            .load()
            .map_err(load_error)?;
        Ok(Self { ebpf })
    }

    pub fn ingress(&self) -> &Xdp {
        typed(&self.ebpf, INGRESS_PROGRAM)
    }

    pub fn egress(&self) -> &SchedClassifier {
        typed(&self.ebpf, EGRESS_PROGRAM)
    }

    /// Loads one of the object's other XDP programs, [`FAST_INGRESS_PROGRAM`] or
    /// [`REPLY_PROGRAM`]; then [`Programs::fast_ingress`] or [`Programs::reply`] gives it.
    pub fn load_xdp(&mut self, name: &str) -> Result<(), PfError> {
        typed_mut::<Xdp>(&mut self.ebpf, name)?
            .load()
            .map_err(load_error)
    }

    /// Loads the trigger program for frames with an Ethernet header (`ethernet`) or without a
    /// link layer; then [`Programs::trigger`] gives it.
    pub fn load_trigger(&mut self, ethernet: bool) -> Result<(), PfError> {
        typed_mut::<SchedClassifier>(&mut self.ebpf, trigger_program(ethernet))?
            .load()
            .map_err(load_error)
    }

    /// The trigger program for `ethernet` frames or not; usable once it was loaded.
    pub fn trigger(&self, ethernet: bool) -> &SchedClassifier {
        typed(&self.ebpf, trigger_program(ethernet))
    }

    pub(crate) fn trigger_mut(&mut self, ethernet: bool) -> &mut SchedClassifier {
        typed_mut(&mut self.ebpf, trigger_program(ethernet)).expect("loaded by the caller")
    }

    /// The fast-path ingress program; usable once it was loaded.
    pub fn fast_ingress(&self) -> &Xdp {
        typed(&self.ebpf, FAST_INGRESS_PROGRAM)
    }

    /// The reply fast-path program; usable once it was loaded.
    pub fn reply(&self) -> &Xdp {
        typed(&self.ebpf, REPLY_PROGRAM)
    }

    /// XDP program `name`, loaded already (by [`Programs::load`] or [`Programs::load_xdp`]).
    pub(crate) fn xdp_mut(&mut self, name: &str) -> &mut Xdp {
        typed_mut(&mut self.ebpf, name).expect("loaded by the caller")
    }

    pub(crate) fn egress_mut(&mut self) -> &mut SchedClassifier {
        typed_mut(&mut self.ebpf, EGRESS_PROGRAM).expect("checked by Programs::load")
    }
}

/// The trigger program's name for frames with an Ethernet header or without a link layer.
pub fn trigger_program(ethernet: bool) -> &'static str {
    if ethernet {
        TRIGGER_PROGRAM
    } else {
        TRIGGER_L3_PROGRAM
    }
}

fn load_error(e: ProgramError) -> PfError {
    PfError::Load(chain(&e))
}

/// Program `name` of pf's object as its type `T` (Xdp, SchedClassifier).
fn typed_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, PfError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| PfError::Load(format!("program {name} missing from the object")))?;
    program.try_into().map_err(load_error)
}

/// Program `name` as its type; pf's own object always has it, so a miss is a bug.
fn typed<'a, T>(ebpf: &'a Ebpf, name: &str) -> &'a T
where
    &'a T: TryFrom<&'a Program, Error = ProgramError>,
{
    ebpf.program(name)
        .and_then(|p| p.try_into().ok())
        .unwrap_or_else(|| panic!("pf's object has no program {name} of the expected type"))
}

#[cfg(test)]
mod tests {
    use pf_common::{MAP_SHAPES, map_names};

    use super::OBJECT;

    /// pf-ebpf declares every map as `MAP_SHAPES` says, and ARCHITECTURE.md's map table
    /// names each with its maximum entries: one declaration, checked where it is repeated.
    #[test]
    fn the_object_and_the_docs_match_the_map_table() {
        assert!(
            !OBJECT.is_empty(),
            "built with AYA_BUILD_SKIP: no object to check"
        );
        let object = aya_obj::Object::parse(OBJECT).expect("parsing pf's eBPF object");
        let docs = include_str!("../../../ARCHITECTURE.md");
        // `.rodata` holds the programs' read-only globals (the gates' clock switch), set at each
        // load and never pinned.
        let pinned = object.maps.keys().filter(|n| !n.starts_with('.')).count();
        assert_eq!(pinned, MAP_SHAPES.len(), "{:?}", object.maps.keys());
        for (shape, name) in MAP_SHAPES.iter().zip(map_names::ALL) {
            assert_eq!(
                shape.name, name,
                "MAP_SHAPES is not in map_names::ALL order"
            );
            let map = object
                .maps
                .get(shape.name)
                .unwrap_or_else(|| panic!("the object has no map {}", shape.name));
            assert_eq!(
                (
                    map.map_type(),
                    map.key_size(),
                    map.value_size(),
                    map.max_entries()
                ),
                (
                    shape.kind as u32,
                    shape.key_size,
                    shape.value_size,
                    shape.max_entries
                ),
                "{}: (type, key, value, max entries) in the object vs MAP_SHAPES",
                shape.name
            );
            let digits = shape.max_entries.to_string();
            let mut max = digits.clone();
            for at in (1..digits.len())
                .rev()
                .filter(|i| (digits.len() - i) % 3 == 0)
            {
                max.insert(at, ',');
            }
            let row = docs
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", shape.name)))
                .unwrap_or_else(|| panic!("ARCHITECTURE.md's map table lacks {}", shape.name));
            assert!(row.trim_end().ends_with(&format!("| {max} |")), "{row}");
        }
    }
}
