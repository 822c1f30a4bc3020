//! A cap on the fetch statements that run at once, shared by a backend and its clones.
//!
//! Every subscriber keeps its own fetch connection (SPEC: persistent, outside the pool), so
//! nothing else bounds how many fetch statements a process sends at once: eight subscribers
//! send eight. On a small server that is more than its cores can run, and concurrent
//! `SKIP LOCKED` scans of the same index head then cost more per row, not less (they walk and
//! lock each other's freshly leased rows, and contend for the same pages). The limit makes the
//! excess wait in the process, in FIFO order, instead of in the database.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::table::TableName;

/// Permits for fetch statements, and how many fetches wait for one.
#[derive(Debug)]
pub(crate) struct FetchLimit {
    permits: Arc<Semaphore>,
    max: usize,
    waiting: AtomicUsize,
    /// `postbox_fetch_permit_waiters` of the outbox table.
    #[cfg(feature = "metrics")]
    waiters: metrics::Gauge,
}

impl FetchLimit {
    pub(crate) fn new(max: usize, table: &TableName) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = table;
        FetchLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
            waiting: AtomicUsize::new(0),
            #[cfg(feature = "metrics")]
            waiters: metrics::gauge!(crate::metrics::FETCH_PERMIT_WAITERS, "table" => table.to_string()),
        }
    }

    /// Waits for a permit; the statement runs while the returned permit lives.
    pub(crate) async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        let _waiting = Waiting::enter(self);
        // The semaphore is never closed, so acquiring only fails if it were; run unlimited then.
        Arc::clone(&self.permits).acquire_owned().await.ok()
    }

    /// The cap.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Fetches waiting for a permit now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// Counts one waiter for as long as it lives, so a cancelled wait is uncounted too.
struct Waiting<'a>(&'a FetchLimit);

impl<'a> Waiting<'a> {
    fn enter(limit: &'a FetchLimit) -> Self {
        limit.waiting.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        limit.waiters.increment(1.0);
        Waiting(limit)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.0.waiters.decrement(1.0);
    }
}
