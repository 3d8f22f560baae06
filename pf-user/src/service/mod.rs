//! `pf serve`: the long-running reservation service.
//!
//! On start it takes the service lock, attaches to the configured interfaces (adopting those
//! already attached), removes what expired while it was down, and reconciles the kernel maps
//! with the store. Then it serves the HTTP/JSON API on a Unix socket and expires reservations
//! as they fall due. One engine thread makes every change (see [`engine`]); the API's tokio
//! runtime only parses requests and hands them over.

pub mod audit;
pub mod engine;
mod http;

use std::{
    fs::File,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use crate::{
    bpffs::PinDir,
    dataplane,
    error::PfError,
    policy::{Config, ConfigError},
    store::{SqliteStore, StoreError},
};

use audit::{Audit, Caller};
use engine::{ApiError, Engine, Request};
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

fn create_parent(path: &Path, mode: u32) -> Result<(), ServeError> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(mode))
            .map_err(io(format!("setting the mode of {}", parent.display())))?;
    }
    Ok(())
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

/// Attaches to each configured interface, or adopts it when pf is attached already in the same
/// role (a restart: the data plane stayed pinned and kept forwarding).
fn attach_interfaces(dir: &PinDir, config: &Config) -> Result<(), ServeError> {
    let attached = dataplane::attachments(dir);
    for want in &config.interfaces {
        match attached.iter().find(|(iface, _)| *iface == want.name) {
            Some((_, role)) if *role == want.role => {
                eprintln!("pf serve: adopted {} ({})", want.name, role.describe());
            }
            Some((_, role)) => {
                return Err(ServeError::RoleMismatch {
                    iface: want.name.clone(),
                    found: role.describe(),
                    want: want.role.describe(),
                });
            }
            None => {
                let done = dataplane::attach(dir, &want.name, want.mode, want.role)?;
                eprintln!(
                    "pf serve: attached {} ({}, XDP in {} mode)",
                    want.name,
                    want.role.describe(),
                    done.xdp_mode
                );
            }
        }
    }
    Ok(())
}

/// Runs the service until SIGTERM or SIGINT. The data plane stays pinned when it stops.
pub fn run(config: Config) -> Result<(), ServeError> {
    // Everything the service creates is its own (the store holds owners and notes): the socket
    // is opened up to 0660 explicitly below, after bind, and no earlier.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    let service = &config.service;
    create_parent(&service.socket, 0o755)?;
    create_parent(&service.database, 0o750)?;
    let _socket_lock = lock_file(&service.socket.with_extension("lock"), &service.socket)?;
    let mut database_lock = service.database.clone().into_os_string();
    database_lock.push(".lock");
    let _database_lock = lock_file(Path::new(&database_lock), &service.database)?;

    let dir = PinDir::new(&service.bpffs);
    dir.prepare()?;
    attach_interfaces(&dir, &config)?;

    let store = SqliteStore::open(&service.database)?;
    let audit = Audit::open(&service.audit_log).map_err(io(format!(
        "opening the audit log {}",
        service.audit_log.display()
    )))?;
    let mut engine = Engine::new(Box::new(store), dir, config.policy.clone(), audit)?;
    engine.expire_due();
    let started = std::time::Instant::now();
    let report = engine
        .reconcile()
        .map_err(|e| ServeError::Reconcile(e.message))?;
    eprintln!(
        "pf serve: {} reservations in the maps ({} loaded into empty maps), {} drifts repaired ({} ms)",
        report.reservations,
        report.loaded,
        report.drifts,
        started.elapsed().as_millis()
    );

    // A socket left by a service that died is in the way; the lock says none is running.
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

    let (jobs, queue) = mpsc::channel::<Job>();
    let engine_thread = std::thread::Builder::new()
        .name("pf-engine".into())
        .spawn(move || {
            // The one writer must not die quietly, leaving an API that answers 503 for ever:
            // the process ends, and its supervisor restarts it (the start reconciles).
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_engine(engine, queue)))
                .is_err()
            {
                eprintln!("pf serve: the engine failed; exiting so that a restart reconciles");
                std::process::exit(70);
            }
        })
        .map_err(io("starting the engine thread"))?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("starting the tokio runtime"))?;
    eprintln!("pf serve: listening on {}", service.socket.display());
    let served = runtime.block_on(http::serve(listener, jobs));
    // Dropping the runtime drops every connection and with them the last job senders: the
    // engine finishes the job it is on and any queued, then stops.
    drop(runtime);
    let _ = engine_thread.join();
    let _ = std::fs::remove_file(&service.socket);
    eprintln!("pf serve: stopped; the data plane stays attached and keeps forwarding");
    served.map_err(io("serving the API"))
}

fn run_engine(mut engine: Engine, queue: mpsc::Receiver<Job>) {
    loop {
        let wait = engine
            .next_expiry()
            .map(|t| Duration::from_millis(t.saturating_sub(engine::now_ms())))
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
        engine.expire_due();
    }
}
