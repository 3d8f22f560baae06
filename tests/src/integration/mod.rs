//! pf's privileged tests. Each one needs root and the kernel's BPF support, and fails (never
//! skips) without them.

mod abuse;
mod batch;
mod check;
mod cli;
mod common;
mod differential;
mod e2e;
mod fast_path;
mod fixtures;
mod fleet;
mod lifecycle;
mod limits;
mod netfilter;
mod package;
mod port_mapping;
mod service;
mod service_safety;
mod tc_netlink;
mod trigger;
mod wireguard;
