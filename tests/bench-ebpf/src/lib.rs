// The programs live in the `pf-bench` binary (src/main.rs); this empty library only lets cargo
// treat the crate as a dependency of the tests crate's build script (the aya-template pattern).
#![no_std]
