//! The fake's clock: tokio's clock plus a manual offset.
//!
//! Reading tokio's clock means `#[tokio::test(start_paused = true)]` with
//! `tokio::time::advance` moves the fake's time (lease expiry, retry delays) deterministically.
//! [`FakeBroker::advance`](crate::FakeBroker::advance) moves it without touching tokio, which
//! also works in tests that cannot pause time.

use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct Clock {
    wall: DateTime<Utc>,
    start: Instant,
    offset: Mutex<Duration>,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Clock {
            wall: Utc::now(),
            start: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        }
    }

    /// Now, at microsecond precision like Postgres' `timestamptz`.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        let elapsed = Instant::now().saturating_duration_since(self.start) + *self.offset.lock();
        micros(self.wall + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX))
    }

    pub(crate) fn advance(&self, by: Duration) {
        *self.offset.lock() += by;
    }
}

/// Truncates to microseconds.
pub(crate) fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// `t + d`, at microsecond precision, saturating at the latest instant chrono holds (callers
/// have refused delays above `MAX_DELAY` already; this only keeps a clock from panicking).
pub(crate) fn plus(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    let d = chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    micros(t.checked_add_signed(d).unwrap_or(DateTime::<Utc>::MAX_UTC))
}
