//! The subscriber's loop: one task per subscriber owns all of this state, so nothing here
//! needs a lock.
//!
//! The loop itself (this file) only decides what to do next; each job is a part of its own:
//!
//! - [`fetch_gate`]: when a fetch is due (polling and error backoff) and the fetch permit;
//! - [`fetch`]: what a fetch runs on (the engine's session, the backend's pool, a
//!   subscription or a cooperative group) and what its rows become;
//! - [`pending`] and [`outcomes`]: handler outcomes queued, batched and written;
//! - [`leases`] and [`renewal`]: the leases held, their renewal, the cooperative heartbeat;
//! - [`shutdown`]: unstarted rows given back, running handlers waited for, outcomes flushed.

mod fetch;
mod fetch_gate;
mod leases;
mod outcomes;
mod pending;
mod renewal;
mod shutdown;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;

use self::fetch_gate::FetchGate;
use self::leases::Leases;
use self::pending::PendingOutcomes;
use super::events::ShutdownReport;
use super::events::SubscriberEvent;
use super::handler::Handler;
use super::metrics::SubscriberMetrics;
use super::options::SubscriberOptions;
use super::shared::Shared;
use super::wake_ups::WakeUpTask;
use super::window::PrefetchWindow;
use super::workers::Workers;
use crate::consume::Consume;
use crate::coop::Coop;
use crate::engine::FetchSession;
use crate::topic::Topics;

pub(crate) struct Supervisor<B: Consume + Coop + Topics> {
    backend: Arc<B>,
    options: SubscriberOptions,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    stopping: bool,
    /// Wake-ups from the LISTEN task (a permit is kept, so none is lost).
    wake: Arc<Notify>,
    /// Asks the LISTEN task to reconnect after a database error.
    reset_listener: Arc<Notify>,
    /// The persistent fetch session (engine only).
    session: Option<Box<dyn FetchSession>>,
    gate: FetchGate,
    workers: Workers,
    /// How many fetched messages may wait for a worker now.
    window: PrefetchWindow,
    leases: Leases,
    pending: PendingOutcomes,
}

impl<B: Consume + Coop + Topics> Supervisor<B> {
    pub(crate) fn new(
        backend: Arc<B>,
        options: SubscriberOptions,
        handler: Arc<dyn Handler>,
        shared: Arc<Shared>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Supervisor {
            gate: FetchGate::new(&options),
            workers: Workers::new(
                handler,
                options.max_workers,
                SubscriberMetrics::new(&options.queues, options.subscription.as_deref()),
            ),
            window: PrefetchWindow::new(options.prefetch, options.prefetch_ceiling()),
            pending: PendingOutcomes::new(options.ack_delay),
            leases: Leases::default(),
            backend,
            options,
            shared,
            stop,
            stopping: false,
            wake: Arc::new(Notify::new()),
            reset_listener: Arc::new(Notify::new()),
            session: None,
        }
    }

    pub(crate) async fn run(mut self) -> ShutdownReport {
        let span = tracing::info_span!("postbox.subscriber", table = %self.backend.table(), queues = ?self.options.queues);
        async move {
            self.shared.emit(SubscriberEvent::Started);
            let (stop_listener, listener_stopped) = watch::channel(false);
            let listener = self.spawn_listener(listener_stopped);
            self.fetch_loop().await;
            self.gate.leave_queue();
            let report = self.shut_down().await;
            // The loop may end without a shutdown request (backend closed): stop the
            // listener explicitly.
            let _ = stop_listener.send(true);
            if let Some(task) = listener {
                let _ = task.await;
            }
            self.shared.running.store(false, std::sync::atomic::Ordering::SeqCst);
            self.shared.emit(SubscriberEvent::Stopped);
            tracing::info!(target: "postbox", released = report.released, abandoned = report.abandoned, "postbox.subscriber: stopped");
            report
        }
        .instrument(span)
        .await
    }

    fn spawn_listener(&self, stop: watch::Receiver<bool>) -> Option<tokio::task::JoinHandle<()>> {
        if !self.options.wake_ups {
            return None;
        }
        self.backend.engine()?;
        let task = WakeUpTask {
            backend: Arc::clone(&self.backend),
            queues: self.options.queues.iter().cloned().collect::<HashSet<_>>(),
            wake: Arc::clone(&self.wake),
            reset: Arc::clone(&self.reset_listener),
            stop,
            shared: Arc::clone(&self.shared),
            retry_interval: self.options.wake_up_retry_interval,
            check_interval: self.options.wake_up_check_interval,
        };
        let span = tracing::info_span!("postbox.listen");
        Some(tokio::spawn(task.run().instrument(span)))
    }

    async fn fetch_loop(&mut self) {
        let renew_every = self.options.lease_ttl / 3;
        let mut renew = tokio::time::interval((renew_every / 2).max(Duration::from_millis(10)));
        renew.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut touch = tokio::time::interval(self.options.touch_every());
        touch.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if self.stopping || *self.stop.borrow() {
                return;
            }
            if self.backend.is_closed() {
                *self.shared.last_error.lock() = Some("backend closed".into());
                tracing::warn!(target: "postbox", "postbox.subscriber: backend closed, stopping");
                return;
            }
            // Handlers reaped outside the select below (during a fetch or an ack write, or
            // just now) must have their outcomes recorded and their slots refilled here:
            // nothing else would wake the loop for them.
            self.record_finished();
            self.workers.dispatch();
            self.flush_outcomes(false).await;
            let capacity = self.capacity();
            let wants = self.wants_fetch(capacity);
            let due = wants && self.gate.is_due(Instant::now());
            if !due {
                self.gate.leave_queue();
            }
            if due && self.gate.may_fetch(self.backend.engine()) {
                self.fetch(capacity).await;
                self.workers.dispatch();
                continue;
            }
            if self.workers.has_finished() {
                continue;
            }
            let next_fetch = self.gate.next_fetch();
            let queued = self.gate.is_queued();
            let acks_deadline = self.pending.acks_deadline();
            tokio::select! {
                biased;
                changed = self.stop.changed() => {
                    if changed.is_err() {
                        self.stopping = true;
                    }
                }
                _ = renew.tick() => self.renew(renew_every).await,
                _ = touch.tick(), if self.options.subconsumer.is_some() => self.touch().await,
                Some(()) = self.workers.join_next(), if !self.workers.is_idle() => {
                    self.record_finished();
                    self.workers.dispatch();
                }
                _ = self.wake.notified() => self.gate.woken(),
                () = self.gate.granted(), if queued => {}
                _ = tokio::time::sleep_until(next_fetch), if wants && !queued => {}
                _ = sleep_until_opt(acks_deadline), if acks_deadline.is_some() => {}
            }
        }
    }

    /// Free room for fetched messages: running plus waiting stays within `max_workers` plus
    /// the current prefetch window.
    fn capacity(&self) -> usize {
        (self.options.max_workers + self.window.current())
            .saturating_sub(self.workers.running.len() + self.workers.waiting.len())
    }

    /// Whether to fetch now that `capacity` rows fit: always when a worker is idle; while all
    /// are busy, only once the prefetch buffer is half empty, so a busy subscriber refills in
    /// batches instead of fetching one row per completed handler.
    fn wants_fetch(&self, capacity: usize) -> bool {
        capacity > 0
            && (self.workers.running.len() < self.options.max_workers
                || self.workers.waiting.len() * 2 <= self.window.current())
    }
}

/// Sleeps until `at`, or forever without one (the branch is disabled then anyway).
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
