//! With the `bench` feature, builds the benchmark's own eBPF programs (tests/bench-ebpf) for
//! bpfel-unknown-none into OUT_DIR, where the bench example embeds them. Without it (the test
//! library xtask uses, the privileged tests) nothing is built, so no eBPF toolchain is needed.
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let object = PathBuf::from(env::var("OUT_DIR")?).join("pf-bench");
    if env::var_os("CARGO_FEATURE_BENCH").is_some() {
        let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("bench-ebpf");
        aya_build::build_ebpf(
            [aya_build::Package {
                name: "pf-bench-ebpf",
                root_dir: dir.to_str().expect("UTF-8 path"),
                ..Default::default()
            }],
            aya_build::Toolchain::default(),
        )?;
    }
    // AYA_BUILD_SKIP=1 or no `bench` feature: an empty object, which the bench refuses.
    if !object.exists() {
        fs::write(&object, [])?;
    }
    Ok(())
}
