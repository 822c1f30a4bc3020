//! Shutdown: unstarted rows given back, running handlers waited for (and asked to stop),
//! outcomes flushed, the fetch session closed.

use std::time::Duration;

use tokio::time::Instant;

use super::super::events::ShutdownReport;
use super::super::events::{Counters, SubscriberEvent};
use super::super::metrics::Counted;
use super::Supervisor;
use crate::consume::Consume;
use crate::coop::Coop;
use crate::topic::{Settlement, Topics};

/// A wait longer than any process lives, for timeouts too large to add to an `Instant`.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl<B: Consume + Coop + Topics> Supervisor<B> {
    /// Gives back unstarted messages, waits for running handlers up to the timeout, records
    /// their outcomes, closes the fetch connection.
    pub(super) async fn shut_down(&mut self) -> ShutdownReport {
        self.record_finished();
        let released = self.release_unstarted().await;
        let started = Instant::now();
        let deadline = started
            .checked_add(self.options.shutdown_timeout)
            .unwrap_or_else(|| started + FOREVER);
        // The signal goes out `shutdown_grace` before the deadline, at once if that is past.
        let signal_at = deadline
            .checked_sub(self.options.shutdown_grace)
            .map_or(started, |at| at.max(started));
        let mut cancelled = None;
        while !self.workers.is_idle() {
            tokio::select! {
                biased;
                Some(()) = self.workers.join_next() => {
                    self.record_finished();
                    self.flush_outcomes(true).await;
                }
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tokio::time::sleep_until(signal_at), if cancelled.is_none() => {
                    let n = self.workers.signal_stop();
                    tracing::info!(target: "postbox", running = n, "postbox.subscriber: asking running handlers to stop");
                    self.shared.emit(SubscriberEvent::HandlersCancelled { n });
                    cancelled = Some(n);
                }
            }
        }
        let abandoned = self.workers.busy();
        if abandoned > 0 {
            tracing::warn!(target: "postbox", abandoned, "postbox.subscriber: handlers still running at the shutdown timeout; their messages stay leased");
        }
        self.workers.abort_all();
        while self.workers.join_next().await.is_some() {}
        self.record_finished();
        self.flush_outcomes(true).await;
        if let Some(session) = self.session.take() {
            session.close().await;
        }
        ShutdownReport {
            released,
            cancelled: cancelled.unwrap_or(0),
            abandoned,
            stats: self.shared.counters.snapshot(),
        }
    }

    /// Releases the fetched messages no handler started; returns how many were released.
    /// One that cannot be released (a database error) stays leased and is delivered again
    /// once its lease expires.
    async fn release_unstarted(&mut self) -> usize {
        let mut released = 0;
        for delivery in std::mem::take(&mut self.workers.waiting) {
            self.leases.remove(delivery.id);
            match Self::settle_one(
                &self.backend,
                &self.options,
                delivery.lease(),
                Settlement::Release,
            )
            .await
            {
                Ok(true) => {
                    released += 1;
                    self.workers
                        .metrics
                        .queue(&delivery.queue)
                        .count(Counted::Released);
                }
                Ok(false) => {}
                Err(error) => self.shared.record_error(&error),
            }
        }
        Counters::add(&self.shared.counters.released, released as u64);
        self.shared.emit(SubscriberEvent::Released { n: released });
        released
    }
}
