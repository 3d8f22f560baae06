//! `pf serve` following its interfaces while it runs (rtnetlink's link events, see
//! [`crate::kernel::links`]): a configured interface that goes is reported, and attached to
//! again when it comes back (re-created, or moved back into the namespace), the trigger
//! program's tunnel-side interfaces too; the fast paths'
//! device maps are refilled after any device changes, so no `pf refresh` is needed under the
//! service. Each event on a configured interface is logged.
//!
//! It runs on a thread of its own: attaching and refreshing touch pins and the device maps,
//! never the reservations, which stay the engine's alone.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use super::{Config, ServeError, attach_configured, attach_trigger_configured, io};
use crate::kernel::{
    attach::{self, Health, Role},
    bpffs::PinDir,
    links::{LinkEvent, LinkWatch},
};

/// How often the follower looks at its stop flag while no event comes.
const POLL: Duration = Duration::from_millis(250);
/// How long it waits before subscribing again after the socket failed.
const RETRY: Duration = Duration::from_secs(1);

/// The running follower; [`Follower::stop`] ends it.
pub(super) struct Follower {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Follower {
    /// Subscribes to link events (before the first look, so nothing between is missed) and
    /// starts following.
    pub(super) fn start(dir: PinDir, config: Config) -> Result<Self, ServeError> {
        let watch = LinkWatch::open(POLL).map_err(io("subscribing to link events"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("pf-links".into())
            .spawn(move || follow(watch, &dir, &config, &stopping))
            .map_err(io("starting the link follower"))?;
        Ok(Self { stop, thread })
    }

    pub(super) fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

fn follow(mut watch: LinkWatch, dir: &PinDir, config: &Config, stop: &AtomicBool) {
    // Whatever changed between the start's attach and the subscription.
    reattach(dir, config);
    reattach_triggers(dir, config);
    refresh(dir, config);
    while !stop.load(Ordering::Relaxed) {
        let events = match watch.wait() {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(
                    "following interfaces: {e}; subscribing again in {RETRY:?} (until then, a re-created interface waits for a restart)"
                );
                std::thread::sleep(RETRY);
                match LinkWatch::open(POLL) {
                    Ok(w) => {
                        watch = w;
                        vec![LinkEvent::Missed]
                    }
                    Err(_) => continue,
                }
            }
        };
        if events.is_empty() {
            continue;
        }
        let configured = |name: &str| {
            config.interfaces.iter().any(|i| i.name == name)
                || config.trigger_interfaces.iter().any(|i| i == name)
        };
        let mut look = false;
        for event in &events {
            match event {
                LinkEvent::Changed { name, .. } => look |= configured(name),
                LinkEvent::Gone { index, name } if configured(name) => tracing::warn!(
                    "{name} is gone (ifindex {index}): nothing is forwarded on it; pf serve attaches to it again when it comes back"
                ),
                LinkEvent::Gone { .. } => {}
                LinkEvent::Missed => {
                    tracing::warn!("the kernel dropped link events; looking at every interface");
                    look = true;
                }
            }
        }
        if look {
            reattach(dir, config);
            reattach_triggers(dir, config);
        }
        refresh(dir, config);
    }
}

/// Attaches again to each configured interface that exists but whose attachment the kernel
/// no longer has (re-created interfaces lose their programs).
fn reattach(dir: &PinDir, config: &Config) {
    let found = attach::inspect(dir);
    for want in &config.interfaces {
        let current = found.iter().find(|a| a.iface == want.name);
        match current {
            Some(a) if a.health.is_live() && a.role == want.role => continue,
            Some(a) if a.health.is_live() => {
                tracing::warn!(
                    "{} is attached as '{}' but the config says '{}'; left as it is (`pf detach {}` and a restart of pf serve attach it as configured)",
                    want.name,
                    a.role.describe(),
                    want.role.describe(),
                    want.name
                );
                continue;
            }
            Some(a) if matches!(a.health, Health::Unknown(_)) => continue,
            _ => {}
        }
        if !interface_exists(&want.name) {
            continue;
        }
        match attach_configured(dir, want, config) {
            Ok(()) => tracing::info!("{} is back: attached again", want.name),
            Err(e) => tracing::error!("{} is back, but attaching to it failed: {e}", want.name),
        }
    }
}

/// Attaches the trigger program again to each configured tunnel-side interface that exists
/// but lost it (WireGuard's `wg-quick down` and `up` make the interface anew).
fn reattach_triggers(dir: &PinDir, config: &Config) {
    for iface in config
        .trigger_interfaces
        .iter()
        .filter(|i| interface_exists(i))
    {
        if let Err(e) = attach_trigger_configured(dir, iface, config) {
            tracing::error!("{iface} is back, but attaching the trigger program failed: {e}");
        }
    }
}

/// Refills the fast paths' device maps, where a configured interface uses a fast path.
fn refresh(dir: &PinDir, config: &Config) {
    if config.interfaces.iter().all(|i| i.role == Role::Public) {
        return;
    }
    match attach::refresh_devices(dir, &config.fast_path_devices) {
        Ok(devices) => tracing::debug!(
            "fast-path devices: redirect to {:?}, replies to {:?}",
            devices.redirect,
            devices.public
        ),
        Err(e) => tracing::warn!("refreshing the fast paths' devices: {e}"),
    }
}

fn interface_exists(name: &str) -> bool {
    std::ffi::CString::new(name)
        // SAFETY: if_nametoindex reads a NUL-terminated name.
        .map(|c| unsafe { libc::if_nametoindex(c.as_ptr()) } != 0)
        .unwrap_or(false)
}
