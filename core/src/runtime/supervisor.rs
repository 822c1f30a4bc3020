//! The fetch loop: fetch, dispatch to workers, record outcomes, renew leases, back off,
//! shut down. One task per subscriber owns all of this state, so nothing here needs a lock.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, watch};
use tokio::task::JoinError;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;

use super::escalation::Escalation;
use super::events::{Counters, SubscriberEvent};
use super::handler::Handler;
use super::listener::ListenTask;
use super::metrics::{Counted, QueueMetrics, SubscriberMetrics};
use super::options::SubscriberOptions;
use super::subscriber::{Shared, ShutdownReport};
use super::window::PrefetchWindow;
use super::workers::{Finished, Workers};
use crate::consume::Consume;
use crate::coop::Coop;
use crate::coop::CoopReceive;
use crate::engine::{FetchSession, PermitWait};
use crate::error::{Error, Result};
use crate::fetch::FetchParams;
use crate::message::{Delivery, Lease, MessageId};
use crate::outcome::Outcome;
use crate::retry::HandlerError;
use crate::topic::{Receive, Settlement, Topics};

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
    /// Our place in the queue for a fetch permit when the backend caps concurrent fetches
    /// (`PgBackend::max_concurrent_fetches`). Kept across loop turns, so the loop goes on
    /// writing outcomes and starting handlers while it waits.
    permit_wait: Option<PermitWait>,
    /// The permit for the next fetch, once granted.
    permit: Option<OwnedSemaphorePermit>,
    workers: Workers,
    /// How many fetched messages may wait for a worker now.
    window: PrefetchWindow,
    /// Every message this subscriber holds a lease on.
    held: HashMap<MessageId, Held>,
    pending_acks: Vec<Lease>,
    /// When the oldest pending ack was queued (for `ack_delay`).
    acks_since: Option<Instant>,
    pending_failures: Vec<(Delivery, HandlerError)>,
    idle: Escalation,
    errors: Escalation,
    next_fetch: Instant,
    backoff_until: Instant,
}

impl<B: Consume + Coop + Topics> Supervisor<B> {
    pub(crate) fn new(
        backend: Arc<B>,
        options: SubscriberOptions,
        handler: Arc<dyn Handler>,
        shared: Arc<Shared>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let now = Instant::now();
        Supervisor {
            idle: Escalation::new(options.min_fetch_interval, options.max_fetch_interval),
            errors: Escalation::new(options.error_backoff_min, options.error_backoff_max),
            workers: Workers::new(
                handler,
                options.max_workers,
                SubscriberMetrics::new(&options.queues, options.subscription.as_deref()),
            ),
            window: PrefetchWindow::new(options.prefetch, options.prefetch_ceiling()),
            backend,
            options,
            shared,
            stop,
            stopping: false,
            wake: Arc::new(Notify::new()),
            reset_listener: Arc::new(Notify::new()),
            session: None,
            permit_wait: None,
            permit: None,
            held: HashMap::new(),
            pending_acks: Vec::new(),
            acks_since: None,
            pending_failures: Vec::new(),
            next_fetch: now,
            backoff_until: now,
        }
    }

    pub(crate) async fn run(mut self) -> ShutdownReport {
        let span = tracing::info_span!("postbox.subscriber", table = %self.backend.table(), queues = ?self.options.queues);
        async move {
            self.shared.emit(SubscriberEvent::Started);
            let (stop_listener, listener_stopped) = watch::channel(false);
            let listener = self.spawn_listener(listener_stopped);
            self.fetch_loop().await;
            self.leave_permit_queue();
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
        if !self.options.listen {
            return None;
        }
        self.backend.engine()?;
        let task = ListenTask {
            backend: Arc::clone(&self.backend),
            queues: self.options.queues.iter().cloned().collect::<HashSet<_>>(),
            wake: Arc::clone(&self.wake),
            reset: Arc::clone(&self.reset_listener),
            stop,
            shared: Arc::clone(&self.shared),
            retry_interval: self.options.listen_retry_interval,
            check_interval: self.options.listener_check_interval,
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
            let due = wants && Instant::now() >= self.next_fetch;
            if !due {
                self.leave_permit_queue();
            }
            if due && self.may_fetch() {
                self.fetch(capacity).await;
                self.workers.dispatch();
                continue;
            }
            if self.workers.has_finished() {
                continue;
            }
            let next_fetch = self.next_fetch;
            let acks_deadline = self.acks_deadline();
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
                _ = self.wake.notified() => {
                    self.idle.reset();
                    self.next_fetch = self.backoff_until.max(Instant::now());
                }
                permit = wait_for(&mut self.permit_wait), if self.permit_wait.is_some() => {
                    self.permit_wait = None;
                    self.permit = permit;
                }
                _ = tokio::time::sleep_until(next_fetch), if wants && self.permit_wait.is_none() => {}
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

    /// Gives up a fetch permit or a place in its queue. A permit is only held while a fetch
    /// is due: an idle, busy or stopping loop must not keep other subscribers waiting.
    fn leave_permit_queue(&mut self) {
        self.permit = None;
        self.permit_wait = None;
    }

    /// Whether a fetch may be sent now: always without a cap on concurrent fetches; with
    /// one, once this loop holds a permit. Joins the queue for one on the first call.
    fn may_fetch(&mut self) -> bool {
        if self.permit.is_some() {
            return true;
        }
        if self.permit_wait.is_none() {
            match self
                .backend
                .engine()
                .and_then(|engine| engine.permit_wait())
            {
                Some(wait) => self.permit_wait = Some(wait),
                None => return true,
            }
        }
        // Granted at once when nobody queues ahead; otherwise the select waits for it.
        match self
            .permit_wait
            .as_mut()
            .and_then(|wait| wait.now_or_never())
        {
            Some(permit) => {
                self.permit_wait = None;
                self.permit = permit;
                // `None` only if the permits were closed, which never happens: fetch uncapped.
                true
            }
            None => false,
        }
    }

    async fn fetch(&mut self, capacity: usize) {
        // Held through the statement, released when this returns.
        let _permit = self.permit.take();
        let mut params = FetchParams::new(
            self.options.queues.iter().cloned(),
            u32::try_from(capacity).unwrap_or(u32::MAX),
        )
        .lease_ttl(self.options.lease_ttl);
        if let Some(n) = self.options.max_deliveries {
            params = params.max_deliveries(n);
        }
        let started = std::time::Instant::now();
        // Handlers that end during the round trip are replaced at once (see `Workers::drive`).
        let fetching = Self::fetch_once(
            &self.backend,
            &self.options,
            &mut self.session,
            &self.shared,
            &params,
        );
        let result = self.workers.drive(fetching).await;
        self.workers.metrics.fetch_took(started.elapsed());
        Counters::add(&self.shared.counters.fetches, 1);
        match result {
            Ok(deliveries) => {
                self.errors.reset();
                let n = deliveries.len();
                let now = Instant::now();
                // Handlers ran on during the round trip: if they used up the buffer and a
                // worker is idle, the fetch was the bottleneck.
                let starved = self.workers.waiting.is_empty()
                    && self.workers.running.len() < self.options.max_workers;
                self.window.after_fetch(capacity, n, starved);
                if n == 0 {
                    self.shared.emit(SubscriberEvent::Idle);
                    self.next_fetch = now + self.idle.next();
                    return;
                }
                tracing::debug!(target: "postbox", rows = n, elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "postbox.fetch");
                Counters::add(&self.shared.counters.fetched, n as u64);
                self.shared.emit(SubscriberEvent::Fetched { n });
                self.idle.reset();
                // A full batch suggests more are ready: fetch again as soon as there is room.
                // A partial one drained the queue: wait for a notification or the next poll.
                self.next_fetch = if n == capacity {
                    now
                } else {
                    now + self.idle.next()
                };
                for d in deliveries {
                    let metrics = self.workers.metrics.queue(&d.queue).clone();
                    metrics.fetched();
                    self.held.insert(
                        d.id,
                        Held {
                            lease: d.lease(),
                            renewed: now,
                            metrics,
                        },
                    );
                    self.workers.waiting.push_back(d);
                }
            }
            Err(error) => self.database_error(&error),
        }
    }

    async fn fetch_once(
        backend: &B,
        options: &SubscriberOptions,
        session_slot: &mut Option<Box<dyn FetchSession>>,
        shared: &Shared,
        params: &FetchParams,
    ) -> Result<Vec<Delivery>> {
        let coop = options.subconsumer.clone().map(|member| {
            let mut receive = CoopReceive::new(
                member,
                params.get_queues().iter().cloned(),
                params.get_limit(),
            );
            if let Some(d) = options.dead_interval {
                receive = receive.dead_interval(d);
            }
            if let Some(n) = params.get_max_deliveries() {
                receive = receive.max_deliveries(n);
            }
            receive
        });
        if let Some(subscription) = &options.subscription {
            // Receives run on the pool: the statement is short and locks the subscription.
            let mut receive = Receive::new(subscription.clone(), params.get_limit())
                .lease_ttl(params.get_lease_ttl());
            if let Some(n) = params.get_max_deliveries() {
                receive = receive.max_deliveries(n);
            }
            if let Some(holder) = params.get_acquired_by() {
                receive = receive.holder(holder);
            }
            return backend.receive(&receive).await;
        }
        let Some(engine) = backend.engine() else {
            return match &coop {
                Some(receive) => backend.coop_receive(receive).await,
                None => backend.fetch(params).await,
            };
        };
        if session_slot.is_none() {
            let session = engine.open_session().await?;
            let session_id = session.id();
            tracing::debug!(target: "postbox", session_id, "postbox.fetch: connected");
            shared.emit(SubscriberEvent::FetchConnected { session_id });
            *session_slot = Some(session);
        }
        // The loop already holds the permit, if fetches are capped (`may_fetch`).
        match (session_slot.as_mut(), &coop) {
            (Some(session), Some(receive)) => session.coop_receive(receive).await,
            (Some(session), None) => session.fetch(params).await,
            (None, _) => Err(Error::Runtime("fetch session missing".into())),
        }
    }

    /// Drops the fetch session, has the wake-up source reopened, and backs off.
    fn database_error(&mut self, error: &Error) {
        self.shared.record_error(error);
        self.session = None;
        self.reset_listener.notify_one();
        let delay = self.errors.next();
        let now = Instant::now();
        self.backoff_until = now + delay;
        self.next_fetch = self.backoff_until;
        tracing::warn!(target: "postbox", %error, delay_ms = delay.as_millis() as u64, "postbox.subscriber: database error, backing off");
        self.shared.emit(SubscriberEvent::BackoffStarted {
            delay,
            error: error.to_string(),
        });
    }

    /// Records the outcomes of every handler that has finished.
    fn record_finished(&mut self) {
        self.workers.reap_ready();
        for (delivery, finished) in self.workers.take_finished() {
            self.take_done(delivery, finished);
        }
    }

    fn take_done(&mut self, delivery: Delivery, finished: Finished) {
        match finished {
            Ok(Ok(())) => {
                self.acks_since.get_or_insert_with(Instant::now);
                self.pending_acks.push(delivery.lease());
            }
            Ok(Err(error)) => self.pending_failures.push((delivery, error)),
            Err(join) if join.is_panic() => {
                Counters::add(&self.shared.counters.panics, 1);
                let message = panic_message(join);
                tracing::warn!(target: "postbox", message_id = delivery.id, %message, "postbox.handle: handler panicked");
                let error = HandlerError::retry(format!("handler panicked: {message}"));
                self.pending_failures.push((delivery, error));
            }
            Err(_) => {
                // Cancelled (abandoned at shutdown): the lease stays and expires.
                self.held.remove(&delivery.id);
            }
        }
    }

    /// Writes the outcomes collected so far. On a database error they stay pending and are
    /// retried at the next turn; if that never succeeds, their leases expire and the messages
    /// are delivered again (at least once).
    async fn flush_outcomes(&mut self, force: bool) {
        if self.acks_due(force) {
            self.acks_since = None;
            let leases = std::mem::take(&mut self.pending_acks);
            if let Err((error, unwritten)) = self.write_acks(leases).await {
                self.shared.record_error(&error);
                self.pending_acks = unwritten;
                self.acks_since = Some(Instant::now());
            }
        }
        while let Some((delivery, error)) = self.pending_failures.pop() {
            let failed = if self.options.subscription.is_some() {
                self.backend
                    .fail_received(&delivery, &error, &self.options.retry_policy)
                    .await
            } else {
                self.backend
                    .fail(&delivery, &error, &self.options.retry_policy)
                    .await
            };
            match failed {
                Ok(outcome) => {
                    self.held.remove(&delivery.id);
                    let metrics = self.workers.metrics.queue(&delivery.queue);
                    let (counter, counted) = match &outcome {
                        Outcome::Retried { .. } => {
                            (&self.shared.counters.retried, Counted::Retried)
                        }
                        Outcome::DeadLettered { .. } => {
                            (&self.shared.counters.dead_lettered, Counted::DeadLettered)
                        }
                        Outcome::LeaseLost => {
                            (&self.shared.counters.lease_lost, Counted::LeaseLost)
                        }
                        // Not from `fail`, which never acks; counted as what it says.
                        Outcome::Acked => (&self.shared.counters.acked, Counted::Acked),
                    };
                    Counters::add(counter, 1);
                    metrics.count(counted);
                    tracing::debug!(target: "postbox", message_id = delivery.id, ?outcome, "postbox.outcome");
                    self.shared.emit(SubscriberEvent::Handled {
                        id: delivery.id,
                        outcome,
                    });
                }
                Err(db) => {
                    self.shared.record_error(&db);
                    self.pending_failures.push((delivery, error));
                    return;
                }
            }
        }
    }

    /// Whether the pending acks should be written now: there are some, and the delay is zero,
    /// or has passed, or 64 are waiting, or `force` (shutdown).
    fn acks_due(&self, force: bool) -> bool {
        !self.pending_acks.is_empty()
            && (force
                || self.options.ack_delay.is_zero()
                || self.pending_acks.len() >= 64
                || self
                    .acks_since
                    .is_some_and(|t| t.elapsed() >= self.options.ack_delay))
    }

    /// When pending acks become due by time, if they are waiting for `ack_delay`.
    fn acks_deadline(&self) -> Option<Instant> {
        if self.pending_acks.is_empty() || self.options.ack_delay.is_zero() {
            return None;
        }
        self.acks_since.map(|t| t + self.options.ack_delay)
    }

    /// Acks `leases`, in one statement or one per message. On error, returns the leases not
    /// yet written.
    async fn write_acks(
        &mut self,
        leases: Vec<Lease>,
    ) -> std::result::Result<(), (Error, Vec<Lease>)> {
        let acked: HashSet<MessageId> = if self.options.batch_acks {
            Counters::add(&self.shared.counters.ack_statements, 1);
            // Handlers that end during the round trip are replaced at once.
            let (backend, subscription) = (&self.backend, self.options.subscription.is_some());
            let acking = async {
                if subscription {
                    backend.settle(&leases, Settlement::Ack).await
                } else {
                    backend.ack_batch(&leases).await
                }
            };
            match self.workers.drive(acking).await {
                Ok(ids) => ids.into_iter().collect(),
                Err(e) => return Err((e, leases)),
            }
        } else {
            let mut acked = HashSet::new();
            for (i, lease) in leases.iter().enumerate() {
                Counters::add(&self.shared.counters.ack_statements, 1);
                match Self::settle_one(&self.backend, &self.options, *lease, Settlement::Ack).await
                {
                    Ok(true) => {
                        acked.insert(lease.id);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        self.settled_acks(&leases[..i], &acked);
                        return Err((e, leases[i..].to_vec()));
                    }
                }
            }
            acked
        };
        self.settled_acks(&leases, &acked);
        Ok(())
    }

    fn settled_acks(&mut self, leases: &[Lease], acked: &HashSet<MessageId>) {
        for lease in leases {
            let metrics = self.held.remove(&lease.id).map(|held| held.metrics);
            let (outcome, counted) = if acked.contains(&lease.id) {
                Counters::add(&self.shared.counters.acked, 1);
                (Outcome::Acked, Counted::Acked)
            } else {
                Counters::add(&self.shared.counters.lease_lost, 1);
                (Outcome::LeaseLost, Counted::LeaseLost)
            };
            if let Some(metrics) = metrics {
                metrics.count(counted);
            }
            self.shared.emit(SubscriberEvent::Handled {
                id: lease.id,
                outcome,
            });
        }
    }

    /// Renews leases older than `every`. A lease found lost is dropped from the waiting
    /// queue (never started); a running handler finishes and its outcome reports the loss.
    async fn renew(&mut self, every: Duration) {
        let now = Instant::now();
        let due: Vec<Lease> = self
            .held
            .values()
            .filter(|held| now.duration_since(held.renewed) >= every)
            .map(|held| held.lease)
            .collect();
        let mut renewed = 0;
        for lease in due {
            match Self::settle_one(&self.backend, &self.options, lease, Settlement::Renew).await {
                Ok(true) => {
                    renewed += 1;
                    if let Some(held) = self.held.get_mut(&lease.id) {
                        held.renewed = now;
                    }
                }
                Ok(false) => {
                    Counters::add(&self.shared.counters.lease_lost, 1);
                    if let Some(held) = self.held.remove(&lease.id) {
                        held.metrics.count(Counted::LeaseLost);
                    }
                    self.workers.waiting.retain(|d| d.id != lease.id);
                    tracing::warn!(target: "postbox", message_id = lease.id, "postbox.subscriber: lease lost before renewal");
                }
                Err(error) => {
                    self.shared.record_error(&error);
                    return;
                }
            }
        }
        if renewed > 0 {
            self.shared
                .emit(SubscriberEvent::LeasesRenewed { n: renewed });
        }
    }

    /// Applies `settlement` (ack, renew or release) to one lease, fetched or received;
    /// whether it took effect.
    async fn settle_one(
        backend: &B,
        options: &SubscriberOptions,
        lease: Lease,
        settlement: Settlement,
    ) -> Result<bool> {
        if options.subscription.is_some() {
            return Ok(!backend.settle(&[lease], settlement).await?.is_empty());
        }
        match settlement {
            Settlement::Renew => backend.renew_lease(lease).await,
            Settlement::Release => backend.release(lease).await,
            _ => backend.ack(lease).await,
        }
    }

    /// The cooperative heartbeat: keeps this member alive while its handlers run.
    async fn touch(&mut self) {
        let Some(member) = &self.options.subconsumer else {
            return;
        };
        match self.backend.coop_touch(member).await {
            Ok(_) => {}
            Err(error) => self.shared.record_error(&error),
        }
    }

    /// Gives back unstarted messages, waits for running handlers up to the timeout, records
    /// their outcomes, closes the fetch connection.
    async fn shut_down(&mut self) -> ShutdownReport {
        self.record_finished();
        let mut released = 0;
        for delivery in std::mem::take(&mut self.workers.waiting) {
            self.held.remove(&delivery.id);
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
                // Still leased: delivered again after the lease expires.
                Err(error) => self.shared.record_error(&error),
            }
        }
        Counters::add(&self.shared.counters.released, released as u64);
        self.shared.emit(SubscriberEvent::Released { n: released });

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
}

/// A lease this subscriber holds.
struct Held {
    lease: Lease,
    /// When it was taken or last renewed.
    renewed: Instant,
    /// The handles its outcome is counted on.
    metrics: QueueMetrics,
}

/// A wait longer than any process lives, for timeouts too large to add to an `Instant`.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Sleeps until `at`, or forever without one (the branch is disabled then anyway).
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn panic_message(join: JoinError) -> String {
    match join.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into()),
        Err(e) => e.to_string(),
    }
}

/// Waits for the permit `wait` holds a place for (the select's guard ensures there is one).
async fn wait_for(wait: &mut Option<PermitWait>) -> Option<OwnedSemaphorePermit> {
    match wait {
        Some(wait) => wait.await,
        None => std::future::pending().await,
    }
}
