//! The service's time.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How far the system clock may move from the service's own (see [`Clock`]) before a step is
/// reported.
const CLOCK_STEP_TOLERANCE_MS: u64 = 2_000;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The service's time: the system clock read once at start, then advanced by the monotonic
/// clock. Lifetimes run on elapsed time, so a step of the system clock (a bad NTP answer, an
/// admin's `date -s`) neither expires reservations early nor keeps them late; a step is
/// logged. A restart adopts the system clock again (and what fell due meanwhile expires, into
/// the restorable history).
pub struct Clock {
    start_ms: u64,
    start: Instant,
    /// The system clock's offset last reported, so a step is logged once.
    reported_offset_ms: i64,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Self {
            start_ms: now_ms(),
            start: Instant::now(),
            reported_offset_ms: 0,
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.start_ms
            .saturating_add(self.start.elapsed().as_millis() as u64)
    }

    /// Moves the service's time forward, as if `ms` had passed (host tests of expiry).
    #[cfg(test)]
    pub fn advance(&mut self, ms: u64) {
        self.start_ms += ms;
        self.reported_offset_ms -= ms as i64;
    }

    /// How far the system clock is ahead of the service's (negative: behind).
    pub fn offset_ms(&self) -> i64 {
        now_ms() as i64 - self.now_ms() as i64
    }

    /// Logs a step of the system clock away from the service's time, once per step.
    pub(crate) fn notice_steps(&mut self) {
        let offset = self.offset_ms();
        if offset.abs_diff(self.reported_offset_ms) > CLOCK_STEP_TOLERANCE_MS {
            tracing::warn!(
                "the system clock stepped {} by {}; lifetimes keep running on elapsed time, so nothing expires early or late (the system clock is now {} from pf's; a restart adopts it)",
                if offset > self.reported_offset_ms {
                    "forward"
                } else {
                    "back"
                },
                humantime::format_duration(Duration::from_secs(
                    (offset.abs_diff(self.reported_offset_ms) + 500) / 1000
                )),
                humantime::format_duration(Duration::from_secs(
                    (offset.unsigned_abs() + 500) / 1000
                )),
            );
            self.reported_offset_ms = offset;
        }
    }
}
