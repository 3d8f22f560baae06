// The programs live in the `pf-ebpf` binary (src/main.rs); this empty library only lets cargo
// treat the crate as a dependency of pf-user's build script (the aya-template pattern).
#![no_std]
