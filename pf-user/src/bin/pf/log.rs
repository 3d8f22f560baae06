//! How `pf serve` logs: the library's tracing events, one line each on stderr.
//!
//! Under systemd, with stderr connected to the journal (`JOURNAL_STREAM` names stderr's
//! device and inode), a line starts with its syslog priority (`<3>` error, `<4>` warning,
//! `<6>` info, `<7>` debug and trace), which journald takes as the entry's level and strips:
//! `journalctl -u pf -p warning` then shows the warnings and errors. Elsewhere a line starts
//! with the time and `pf serve:`, and a level word unless it is info.
//!
//! What is logged: `RUST_LOG` (tracing's filter syntax, e.g. `RUST_LOG=debug` or
//! `RUST_LOG=pf=debug`) if set, else info and above, or debug with `-v`, trace with `-vv`.

use std::{fmt, os::fd::AsRawFd, time::SystemTime};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    EnvFilter,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// One log line's shape.
struct Line {
    journal: bool,
}

/// sd-daemon(3)'s priority prefixes.
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

fn word(level: Level) -> Option<&'static str> {
    match level {
        Level::ERROR => Some("error"),
        Level::WARN => Some("warning"),
        Level::INFO => None,
        Level::DEBUG => Some("debug"),
        Level::TRACE => Some("trace"),
    }
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = *event.metadata().level();
        if self.journal {
            // journald adds the time and the unit; the prefix becomes the entry's priority.
            write!(w, "<{}>", priority(level))?;
        } else {
            write!(
                w,
                "{} pf serve: ",
                humantime::format_rfc3339_millis(SystemTime::now())
            )?;
            if let Some(word) = word(level) {
                write!(w, "{word}: ")?;
            }
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// Whether stderr is the journal's stream (systemd.exec(5), `JOURNAL_STREAM`).
fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat on stderr's fd into a zeroed stat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(std::io::stderr().as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    st.st_dev == dev && st.st_ino == ino
}

/// Installs the logger for `pf serve`. `verbose`: how many `-v`.
pub fn init(verbose: u8) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::try_new(&spec)
            .map_err(|e| format!("RUST_LOG={spec:?} is not a log filter: {e}"))?,
        _ => EnvFilter::new(match verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(Line {
            journal: stderr_is_journal(),
        })
        .try_init()
        .map_err(|e| e.to_string())
}

/// Whether the logger is installed (`pf serve`): its errors then go through it.
pub fn active() -> bool {
    tracing::dispatcher::has_been_set()
}
