//! Builds the eBPF programs (pf-ebpf) for bpfel-unknown-none and leaves the object in OUT_DIR,
//! where src/lib.rs embeds it (the aya-template pattern).
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let root = env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = PathBuf::from(&root).join("../pf-ebpf");
    let ebpf_dir = ebpf_dir.to_str().expect("UTF-8 path");
    // The benchmark's object only when pf-user's `bench` feature asks for it.
    let features: &[&str] = if env::var_os("CARGO_FEATURE_BENCH").is_some() {
        &["bench"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "pf-ebpf",
            root_dir: ebpf_dir,
            features,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    // With AYA_BUILD_SKIP=1 no object is built (nor the bench object without the feature);
    // leave empty ones so the crate still compiles (for clippy or docs), and the loader
    // refuses an empty one with a clear error at run time.
    for name in ["pf-ebpf", "pf-bench"] {
        let object = PathBuf::from(env::var("OUT_DIR")?).join(name);
        if !object.exists() {
            fs::write(&object, [])?;
        }
    }
    Ok(())
}
