//! The test kit: what tests, the benchmark and the demo build their worlds with: network
//! namespaces and commands run in them, the three-host topology (over veth, or with a real
//! WireGuard tunnel), a packet builder, a
//! `pf serve` of a test's own, and scratch directories that are removed even on failure.

pub mod netns;
pub mod packet;
pub mod serve;
pub mod topology;
pub mod traffic;
pub mod wireguard;

use std::path::{Path, PathBuf};

/// A directory that belongs to one test, demo or benchmark run: anything left at its path by a
/// crashed earlier run is removed on creation, and the directory with all it holds (pinned maps
/// and links included, which detaches the links) is removed on drop, also on failure.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Claims `path`, clearing what an earlier run left there. Creates nothing: the owner does.
    pub fn claim(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let _ = std::fs::remove_dir_all(&path);
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
