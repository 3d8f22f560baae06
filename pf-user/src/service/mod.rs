//! `pf serve`: the long-running reservation service.
//!
//! On start it takes the service lock, attaches to the configured interfaces (adopting those
//! already attached), removes what expired while it was down, and reconciles the kernel maps
//! with the store. Then it serves the HTTP/JSON API on a Unix socket and expires reservations
//! as they fall due. One engine thread makes every change (see [`engine`]); the API's tokio
//! runtime only parses requests and hands them over.

pub mod audit;
pub mod check;
pub mod clock;
pub mod config;
pub mod dataplane;
pub mod engine;
mod http;
pub use http::ROUTES;
pub mod fleet;
mod links;
pub mod metrics;
pub mod policy;
mod port_mapping;
mod reads;
pub mod store;

use std::{
    fs::File,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use crate::kernel::{PfError, attach, bpffs::PinDir, trigger_hook};
use config::{Config, ConfigError};
use store::{PostgresStore, SqliteStore, Store, StoreError, StoreLocation};

use audit::{Audit, Caller};
use engine::{ApiError, Engine, ReconcileGuard, Request};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Pf(#[from] PfError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("another pf serve is running with {0} (its lock is held)")]
    AlreadyRunning(PathBuf),
    #[error("unknown group '{0}' (service.socket_group)")]
    UnknownGroup(String),
    #[error(
        "{iface} is attached as '{found}' but the config says '{want}': run `pf detach {iface}` or change the config"
    )]
    RoleMismatch {
        iface: String,
        found: &'static str,
        want: &'static str,
    },
    #[error("reconciling the maps with the store: {0}")]
    Reconcile(String),
    #[error(transparent)]
    PortMapping(#[from] port_mapping::BindError),
}

/// How `pf serve` was asked to start, beyond its config.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    /// `--force-reconcile`: apply a reconcile that removes what the store does not know even
    /// when the store is new or empty, or the removals pass `service.reconcile_removal_limit`.
    pub force_reconcile: bool,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// One request for the engine thread, with where its answer goes.
struct Job {
    request: Request,
    caller: Caller,
    reply: tokio::sync::oneshot::Sender<Result<Value, ApiError>>,
}

/// The engine waits at most this long between expiry checks, so a clock step is noticed.
const EXPIRY_POLL: Duration = Duration::from_secs(1);

/// Holds `path` locked for the life of the service: a second `pf serve` on the same socket or
/// store refuses to start instead of fighting over the maps. Mode 0600: nobody else can open
/// it, so nobody else can take the lock away.
fn lock_file(path: &Path, what: &Path) -> Result<File, ServeError> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        // On a read-only filesystem (a store that can only be read) an existing lock file
        // still locks: flock needs no write access.
        .or_else(|e| match e.raw_os_error() {
            Some(libc::EROFS) => File::open(path),
            _ => Err(e),
        })
        .map_err(io(format!("opening {}", path.display())))?;
    // SAFETY: flock on an fd we own.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        return Err(ServeError::AlreadyRunning(what.to_path_buf()));
    }
    Ok(file)
}

/// Creates the missing directories above `path`, each with `mode` (the service's umask would
/// make them 0700, and a socket's group could not reach a socket below one).
fn create_parent(path: &Path, mode: u32) -> Result<(), ServeError> {
    let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    let missing: Vec<&Path> = parent.ancestors().take_while(|p| !p.exists()).collect();
    for dir in missing.into_iter().rev() {
        match std::fs::create_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(io(format!("creating {}", dir.display()))(e));
            }
            _ => {}
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(io(format!("setting the mode of {}", dir.display())))?;
    }
    Ok(())
}

/// Raises the soft file limit to the hard one (systemd starts services at 1024 soft): each
/// API connection is a file, and the connection cap follows the limit.
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Opens the store. An SQLite file on a full disk opens read-only (the service starts,
/// reconciles and answers reads, and refuses changes until restarted with room).
fn open_store(location: &StoreLocation) -> Result<Box<dyn Store>, ServeError> {
    let path = match location {
        StoreLocation::Postgres(db) => {
            let store = PostgresStore::open(db)?;
            tracing::info!("the reservation store is PostgreSQL at {}", db.url());
            return Ok(Box::new(store));
        }
        StoreLocation::Sqlite(path) => path,
    };
    match SqliteStore::open(path) {
        Ok(store) => {
            if let Some(why) = store.read_only() {
                tracing::warn!(
                    "the reservation store {} is read-only ({why}); changes are refused until pf serve restarts with it writable",
                    path.display()
                );
            }
            Ok(Box::new(store))
        }
        Err(e) if SqliteStore::cannot_write(&e) && path.exists() => {
            let why = format!("opening it for writing failed: {e}");
            let store = SqliteStore::open_read_only(path, why.clone())?;
            tracing::warn!(
                "the reservation store {} is read-only ({why}); changes are refused until pf serve restarts with room on its disk",
                path.display()
            );
            Ok(Box::new(store))
        }
        Err(e) => Err(e.into()),
    }
}

fn group_id(name: &str) -> Result<u32, ServeError> {
    let c = std::ffi::CString::new(name).map_err(|_| ServeError::UnknownGroup(name.into()))?;
    // SAFETY: getgrnam reads a NUL-terminated name; the result is used before any other call.
    let group = unsafe { libc::getgrnam(c.as_ptr()) };
    if group.is_null() {
        return Err(ServeError::UnknownGroup(name.into()));
    }
    // SAFETY: non-null, points to a struct group.
    Ok(unsafe { (*group).gr_gid })
}

/// Attaches to one configured interface (replacing dead pins), and logs it.
fn attach_configured(
    dir: &PinDir,
    want: &config::InterfaceConfig,
    config: &Config,
) -> Result<(), PfError> {
    let options = attach::AttachOptions {
        mode: want.mode,
        role: want.role,
        tc: want.tc,
        devices: config.fast_path_devices.clone(),
    };
    let done = attach::attach(dir, &want.name, &options)?;
    if let Some(reason) = &done.replaced {
        tracing::warn!(
            "{}: the pinned attachment was dead ({reason}); attached again",
            want.name
        );
    }
    tracing::info!(
        "attached {} ({}, XDP in {} mode{})",
        want.name,
        want.role.describe(),
        done.xdp_mode,
        done.egress_hook()
            .map(|hook| format!(", TC by {hook}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// Attaches the trigger program to `iface` unless it is there, live: a dead attachment (the
/// interface re-created, as `wg-quick down` and `up` do) is replaced. Whether it attached.
fn attach_trigger_configured(dir: &PinDir, iface: &str, config: &Config) -> Result<bool, PfError> {
    let found = trigger_hook::trigger_attachments(dir)
        .into_iter()
        .find(|t| t.iface == iface);
    if found.as_ref().is_some_and(|t| t.health.is_live()) {
        return Ok(false);
    }
    if found.is_some() {
        trigger_hook::detach_trigger(dir, iface)?;
    }
    let hook = trigger_hook::attach_trigger(dir, iface, config.trigger_tc)?;
    tracing::info!("attached the trigger program to {iface} (TC ingress by {hook})");
    Ok(true)
}

/// Attaches to each configured interface, or adopts it when pf is attached already in the same
/// role (a restart: the data plane stayed pinned and kept forwarding). Whether it is attached
/// is the kernel's answer, not the pins': a dead attachment is attached again.
fn attach_interfaces(dir: &PinDir, config: &Config) -> Result<(), ServeError> {
    let found = attach::inspect(dir);
    for want in &config.interfaces {
        match found.iter().find(|a| a.iface == want.name) {
            Some(a) if a.health.is_live() && a.role == want.role => {
                tracing::info!("adopted {} ({})", want.name, a.role.describe());
            }
            Some(a) if a.health.is_live() => {
                return Err(ServeError::RoleMismatch {
                    iface: want.name.clone(),
                    found: a.role.describe(),
                    want: want.role.describe(),
                });
            }
            _ => attach_configured(dir, want, config)?,
        }
    }
    // The trigger program on the tunnel side. A tunnel interface may come up after pf serve
    // (wg-quick's unit ordered after it): the link follower attaches it when it appears.
    for iface in &config.trigger_interfaces {
        match attach_trigger_configured(dir, iface, config) {
            Ok(true) => {}
            Ok(false) => tracing::info!("adopted the trigger program on {iface}"),
            Err(PfError::UnknownInterface(_)) => tracing::warn!(
                "{iface} does not exist yet: trigger rules open nothing from it until it appears, when pf serve attaches the trigger program"
            ),
            Err(e) => return Err(e.into()),
        }
    }
    // A dead attachment outside the config (a `pf attach` by hand) may still run programs
    // that read maps no longer pinned, forwarding what the service releases: it goes.
    for a in &found {
        if let attach::Health::Dead(reason) = &a.health
            && !config.interfaces.iter().any(|i| i.name == a.iface)
        {
            attach::detach(dir, &a.iface)?;
            tracing::warn!(
                "detached {}, which is not in the config: its attachment was dead ({reason}); `pf attach {}` attaches it again",
                a.iface,
                a.iface
            );
        }
    }
    // Devices the config names apply to adopted interfaces too (and are refused, with the
    // start, on a kernel that says which devices take redirected frames).
    if let attach::DeviceChoice::Named(names) = &config.fast_path_devices {
        let devices = attach::refresh_devices(dir, &config.fast_path_devices)?;
        tracing::info!(
            "the fast paths may redirect to the devices fast_path.redirect_devices names ({}): this kernel cannot say which can",
            names.join(", ")
        );
        drop(devices);
    }
    Ok(())
}

/// Tells systemd (Type=notify) how the service stands, if systemd asked (`NOTIFY_SOCKET`).
fn tell_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::warn!("telling systemd {state:?} failed: {e}");
    }
}

/// What SIGHUP does besides reopening the audit log: re-reads the config file. A config that
/// does not load is refused whole, and the running one stays; of one that loads, the policy
/// takes effect (see [`engine::Engine::reload`]) and every other section changed is named as
/// waiting for a restart.
struct Reloader {
    path: PathBuf,
    running: Config,
    /// The port-mapping server's copy of `policy.target_networks`, which a reload updates.
    mapping_clients: port_mapping::TunnelNetworks,
}

impl Reloader {
    fn request(&mut self) -> Request {
        tracing::info!("reloading {}", self.path.display());
        match Config::load(&self.path) {
            Err(e) => {
                tracing::error!("reload refused, the running config stays: {e}");
                Request::Reload { policy: None }
            }
            Ok(new) => {
                for section in self.running.restart_only_changes(&new) {
                    tracing::warn!(
                        "reload: {section} changed in {}; only [policy] is reloaded, so it takes effect at the next start",
                        self.path.display()
                    );
                }
                self.running.policy = new.policy.clone();
                *self.mapping_clients.write().expect("not poisoned") =
                    new.policy.target_networks.clone();
                Request::Reload {
                    policy: Some(Box::new(new.policy)),
                }
            }
        }
    }
}

/// Checks a config as `pf serve` would start on it, without starting: the file parses, every
/// key is known and valid, the socket group exists, and a netfilter set it names is declared.
pub fn check_config(config: &Config) -> Result<(), ServeError> {
    if let Some(group) = &config.service.socket_group {
        group_id(group)?;
    }
    if let Some(set) = &config.netfilter_set {
        set.check()?;
    }
    Ok(())
}

/// Runs the service until SIGTERM or SIGINT. The data plane stays pinned when it stops.
/// `config_path`: where `config` was read from, read again on SIGHUP.
pub fn run(config: Config, config_path: &Path, options: StartOptions) -> Result<(), ServeError> {
    // Everything the service creates is its own (the store holds owners and notes): the socket
    // is opened up to 0660 explicitly below, after bind, and no earlier.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    raise_file_limit();
    let service = &config.service;
    create_parent(&service.socket, 0o755)?;
    let _socket_lock = lock_file(&service.socket.with_extension("lock"), &service.socket)?;
    // One pf serve per SQLite file. A PostgreSQL store is shared by design: every agent of
    // the fleet uses it.
    let _database_lock = match &service.store {
        StoreLocation::Sqlite(path) => {
            create_parent(path, 0o750)?;
            let mut database_lock = path.clone().into_os_string();
            database_lock.push(".lock");
            Some(lock_file(Path::new(&database_lock), path)?)
        }
        StoreLocation::Postgres(_) => None,
    };

    let dir = PinDir::new(&service.bpffs);
    dir.prepare()?;
    let Some(_pins_lock) = dir.service_lock()? else {
        return Err(ServeError::AlreadyRunning(service.bpffs.clone()));
    };
    attach_interfaces(&dir, &config)?;

    if let Some(group) = &service.socket_group {
        group_id(group)?;
    }
    let store_was_new = service.store.is_new()?;
    if store_was_new && !options.force_reconcile {
        // Refused here, before the store file is made, if the maps hold reservations.
        if let Some(state) = crate::kernel::state::State::open_for_read(&dir)? {
            let held = state.list()?.len();
            if held > 0 {
                return Err(ServeError::Reconcile(format!(
                    "the reservation store {} is missing or empty, but the kernel maps hold {held} reservations: starting would stop forwarding them all. If the path is wrong, fix service.database (or service.store); if the store really was lost and those reservations should go, start once with `pf serve --force-reconcile`",
                    service.store
                )));
            }
        }
    }
    let store = open_store(&service.store)?;
    let audit = Audit::open(&service.audit_log).map_err(io(format!(
        "opening the audit log {}",
        service.audit_log.display()
    )))?;
    // A set the ruleset does not declare refuses the start, before anything changes.
    if let Some(set) = &config.netfilter_set {
        set.check()?;
    }
    let follower_dir = PinDir::new(&service.bpffs);
    let mapping_clients: port_mapping::TunnelNetworks = Arc::new(std::sync::RwLock::new(
        config.policy.target_networks.clone(),
    ));
    let reloader = Reloader {
        path: config_path.to_path_buf(),
        running: config.clone(),
        mapping_clients: mapping_clients.clone(),
    };
    let mut engine = Engine::new(
        store,
        Box::new(
            dataplane::KernelDataPlane::new(dir).with_netfilter_set(config.netfilter_set.clone()),
        ),
        config.policy.clone(),
        audit,
    )?;
    engine.set_port_mapping(config.port_mapping.clone());
    if let StoreLocation::Postgres(_) = &service.store {
        engine
            .join_fleet(service.agent.clone())
            .map_err(|e| ServeError::Reconcile(e.message))?;
    }
    let started = std::time::Instant::now();
    let (report, disabled) = engine
        .start(ReconcileGuard {
            force: options.force_reconcile,
            store_was_new,
            removal_limit: service.reconcile_removal_limit,
        })
        .map_err(|e| ServeError::Reconcile(e.message))?;
    if disabled > 0 {
        tracing::warn!(
            "{disabled} reservations were disabled: they target the server itself, or break the policy and policy.on_violation = \"disable\" (see above)"
        );
    }
    tracing::info!(
        "{} reservations in the maps ({} loaded into empty maps), {} drifts repaired ({} ms)",
        report.reservations,
        report.loaded,
        report.drifts,
        started.elapsed().as_millis()
    );

    let published = Arc::new(Mutex::new(engine.published_status()));
    let reads = Arc::new(reads::Reads::new(
        service.store.clone(),
        PinDir::new(&service.bpffs),
        published.clone(),
        engine.metrics.clone(),
    ));
    // NAT-PMP's and PCP's epoch: from the store, so it runs on across restarts.
    let mapping_epoch_ms = match &config.port_mapping {
        Some(_) => Some(engine.mapping_epoch_ms()?),
        None => None,
    };
    let mapping_counts = engine.metrics.port_mapping.clone();
    let (jobs, queue) = mpsc::channel::<Job>();
    // A fleet's store announces each change: the engine follows it at once, not at its next
    // tick. The watcher's way to the engine is taken away when the service stops (so it does
    // not keep the engine's queue open), and the watcher ends with it.
    let wake = Arc::new(Mutex::new(Some(jobs.clone())));
    if let StoreLocation::Postgres(db) = &service.store {
        let wake = wake.clone();
        store::watch_changes((**db).clone(), move || {
            let (reply, _) = tokio::sync::oneshot::channel();
            wake.lock()
                .expect("not poisoned")
                .as_ref()
                .is_some_and(|jobs| {
                    jobs.send(Job {
                        request: Request::Wake,
                        caller: Caller::SERVICE,
                        reply,
                    })
                    .is_ok()
                })
        })
        .map_err(io("starting the store's change watcher"))?;
    }
    let engine_thread = std::thread::Builder::new()
        .name("pf-engine".into())
        .spawn(move || {
            // The one writer must not die quietly, leaving an API that answers 503 for ever:
            // the process ends, and its supervisor restarts it (the start reconciles).
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_engine(engine, queue, &published)
            }))
            .is_err()
            {
                tracing::error!("the engine failed; exiting so that a restart reconciles");
                std::process::exit(70);
            }
        })
        .map_err(io("starting the engine thread"))?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("starting the tokio runtime"))?;
    let metrics = match config.metrics.listen {
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .map_err(io(format!("binding metrics.listen {addr}")))?;
            tracing::info!("serving Prometheus metrics on http://{addr}/metrics");
            Some(http::MetricsListener {
                listener,
                per_reservation_limit: config.metrics.per_reservation_limit,
            })
        }
        None => None,
    };
    if let (Some(mapping), Some(epoch_ms)) = (&config.port_mapping, mapping_epoch_ms) {
        let server = port_mapping::Server::bind(
            mapping,
            mapping_clients.clone(),
            epoch_ms,
            jobs.clone(),
            mapping_counts,
        )?;
        let _in_runtime = runtime.enter();
        server
            .spawn()
            .map_err(io("starting the port-mapping server"))?;
    }
    // The API's socket last: a client that can connect finds every other listener bound (the
    // port-mapping server's, the metrics'). A socket left by a service that died is in the
    // way; the lock says none is running.
    let _ = std::fs::remove_file(&service.socket);
    let listener = std::os::unix::net::UnixListener::bind(&service.socket)
        .map_err(io(format!("binding {}", service.socket.display())))?;
    std::fs::set_permissions(&service.socket, std::fs::Permissions::from_mode(0o660)).map_err(
        io(format!("setting the mode of {}", service.socket.display())),
    )?;
    if let Some(group) = &service.socket_group {
        std::os::unix::fs::chown(&service.socket, None, Some(group_id(group)?)).map_err(io(
            format!("giving {} to group {group}", service.socket.display()),
        ))?;
    }
    listener
        .set_nonblocking(true)
        .map_err(io("making the socket non-blocking"))?;
    let follower = links::Follower::start(follower_dir, config.clone())?;
    tracing::info!("listening on {}", service.socket.display());
    let served = runtime.block_on(http::serve(listener, jobs, reads, reloader, metrics));
    wake.lock().expect("not poisoned").take();
    tell_systemd(&[sd_notify::NotifyState::Stopping]);
    // Dropping the runtime drops every connection and with them the last job senders: the
    // engine finishes the job it is on and any queued, then stops.
    drop(runtime);
    let _ = engine_thread.join();
    follower.stop();
    let _ = std::fs::remove_file(&service.socket);
    tracing::info!("stopped; the data plane stays attached and keeps forwarding");
    served.map_err(io("serving the API"))
}

fn run_engine(mut engine: Engine, queue: mpsc::Receiver<Job>, published: &Mutex<Value>) {
    loop {
        let wait = engine
            .next_expiry()
            .map(|t| Duration::from_millis(t.saturating_sub(engine.now_ms())))
            .unwrap_or(EXPIRY_POLL)
            .min(EXPIRY_POLL);
        match queue.recv_timeout(wait) {
            Ok(job) => {
                let answer = engine.handle(job.request, job.caller);
                let _ = job.reply.send(answer);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        engine.tick();
        *published.lock().expect("not poisoned") = engine.published_status();
    }
}
