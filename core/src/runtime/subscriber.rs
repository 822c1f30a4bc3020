//! The public face of the runtime: [`Subscriber`] and its [`SubscriberHandle`].

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::events::{Counters, ShutdownReport, Stats, SubscriberEvent};
use super::handler::Handler;
use super::options::SubscriberOptions;
use super::shared::Shared;
use super::supervisor::Supervisor;
use crate::consume::Consume;
use crate::coop::Coop;
use crate::error::{Error, Result};
use crate::topic::Topics;

/// How many events a slow [`events`](SubscriberHandle::events) receiver may lag behind before
/// it misses some (it then gets `RecvError::Lagged`).
const EVENT_CAPACITY: usize = 4096;

/// A consumer of one or more queues: fetches, runs a [`Handler`] per message on up to
/// `max_workers` tasks, and records each outcome.
///
/// Generic over the [`Backend`](crate::Backend). With an [engine](crate::Consume::engine) (Postgres), it keeps one
/// dedicated fetch connection and one dedicated LISTEN connection, both outside your pool, and
/// a notification for one of its queues wakes it at once. Without one (the in-memory fake), it
/// polls and opens nothing.
///
/// # Delivery contract
///
/// At least once, with idempotent handlers: a message is acked only after its handler returned
/// `Ok`, and a message whose outcome was never recorded (crash, lost connection, abandoned at
/// shutdown) is delivered again once its lease expires. Outcomes are fenced: after a lost
/// lease, this subscriber's ack changes nothing (counted in [`Stats::lease_lost`]).
///
/// # Pool sizing
///
/// Each running subscriber holds **two connections outside the pool** (fetch and LISTEN; only
/// the fetch one without LISTEN) and uses the pool for outcome writes: one statement at a
/// time per subscriber, plus lease renewals. Count the two dedicated connections per
/// subscriber against the server's `max_connections`.
///
/// Size for the server, not per subscriber: a database runs about as many statements at once
/// as it has cores, and beyond that concurrent queue statements cost more per row (they lock
/// and skip each other's rows and fight over the same pages). With many subscribers in one
/// process (cooperative members, say) against a small server, cap the fetches with
/// [`PgBackend::max_concurrent_fetches`](crate::PgBackend::max_concurrent_fetches) and size
/// the pool so that the two together stay near 2 × the server's cores (on 2 cores: 2
/// fetches and a pool of 2). The excess then waits in the process, where it costs nothing,
/// and a subscriber waiting for a fetch permit goes on writing its outcomes and starting
/// handlers. Measured in `BENCHMARKS.md` (coop): eight no-op members on 2 cores fell 11-12 %
/// below four without this, and 1-5 % (within the run-to-run noise) with it.
///
/// # Example
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), postbox_core::Error> {
/// use postbox_core::{Delivery, HandlerError, PgBackend, Subscriber, SubscriberOptions};
///
/// let handle = Subscriber::new(
///     PgBackend::new(pool),
///     SubscriberOptions::new(["emails"]).max_workers(8),
///     |delivery: Delivery| async move {
///         println!("sending {:?}", delivery.payload);
///         Ok::<(), HandlerError>(())
///     },
/// )?
/// .spawn();
/// // ... later, e.g. on SIGTERM:
/// let report = handle.shutdown().await?;
/// println!("{report:?}");
/// # Ok(()) }
/// ```
pub struct Subscriber<B: Consume + Coop + Topics> {
    backend: Arc<B>,
    options: SubscriberOptions,
    handler: Arc<dyn Handler>,
}

impl<B: Consume + Coop + Topics> Subscriber<B> {
    /// A subscriber of `backend` running `handler`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] or [`Error::InvalidQueue`] when the options do not add up
    /// (no queue, zero workers, a minimum interval above the maximum, ...).
    pub fn new(backend: B, options: SubscriberOptions, handler: impl Handler) -> Result<Self> {
        options.validate()?;
        Ok(Subscriber {
            backend: Arc::new(backend),
            options,
            handler: Arc::new(handler),
        })
    }

    /// Starts the subscriber on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn(self) -> SubscriberHandle {
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            events: broadcast::channel(EVENT_CAPACITY).0,
            running: AtomicBool::new(true),
            last_error: parking_lot::Mutex::new(None),
        });
        let supervisor = Supervisor::new(
            self.backend,
            self.options,
            self.handler,
            Arc::clone(&shared),
            stop_rx,
        );
        // Receivers created before the task starts see every event, `Started` included.
        let first_events = shared.events.subscribe();
        let task = tokio::spawn(supervisor.run());
        SubscriberHandle {
            stop: stop_tx,
            task: Some(task),
            shared,
            first_events: parking_lot::Mutex::new(Some(first_events)),
        }
    }
}

impl<B: Consume + Coop + Topics> fmt::Debug for Subscriber<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Controls a running [`Subscriber`].
///
/// Dropping the handle asks the subscriber to shut down (gracefully, in the background); call
/// [`shutdown`](Self::shutdown) to wait for it.
pub struct SubscriberHandle {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<ShutdownReport>>,
    shared: Arc<Shared>,
    first_events: parking_lot::Mutex<Option<broadcast::Receiver<SubscriberEvent>>>,
}

impl SubscriberHandle {
    /// Stops fetching, gives back fetched messages that have not started, waits for running
    /// handlers up to the shutdown timeout (asking them to stop
    /// [`shutdown_grace`](crate::SubscriberOptions::shutdown_grace) before it) and records
    /// their outcomes, then closes the subscriber's connections. No unprocessed message is
    /// deleted.
    ///
    /// # Errors
    ///
    /// [`Error::Runtime`] if the subscriber task panicked.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: dropping the future drops the handle, which asks the subscriber to shut
    /// down in the background without waiting for it.
    pub async fn shutdown(mut self) -> Result<ShutdownReport> {
        let _ = self.stop.send(true);
        match self.task.take() {
            Some(task) => task
                .await
                .map_err(|e| Error::Runtime(format!("subscriber task failed: {e}"))),
            None => Err(Error::Runtime("subscriber already shut down".into())),
        }
    }

    /// Runs until `signal` resolves, then [shuts down](Self::shutdown); returns at once
    /// with the report if the subscriber stops by itself first (its backend closed).
    ///
    /// `signal` is any future: [`shutdown_signal`](crate::runtime::shutdown_signal) for `SIGTERM` and
    /// Ctrl-C, a `tokio_util` `CancellationToken`'s `cancelled_owned()` to stop several
    /// subscribers together, a channel. Its output is ignored.
    ///
    /// ```no_run
    /// # async fn run(a: postbox_core::runtime::SubscriberHandle, b: postbox_core::runtime::SubscriberHandle) -> Result<(), postbox_core::Error> {
    /// use tokio_util::sync::CancellationToken;
    ///
    /// let stop = CancellationToken::new();
    /// let both = tokio::join!(
    ///     a.shutdown_on(stop.clone().cancelled_owned()),
    ///     b.shutdown_on(stop.clone().cancelled_owned()),
    /// );
    /// # let _ = both; Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`shutdown`](Self::shutdown).
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: dropping the future before it resolves drops the handle, which asks
    /// the subscriber to shut down in the background without waiting for it.
    pub async fn shutdown_on<F: Future>(mut self, signal: F) -> Result<ShutdownReport> {
        let Some(mut task) = self.task.take() else {
            return Err(Error::Runtime("subscriber already shut down".into()));
        };
        let done = tokio::select! {
            done = &mut task => done,
            _ = signal => {
                let _ = self.stop.send(true);
                task.await
            }
        };
        done.map_err(|e| Error::Runtime(format!("subscriber task failed: {e}")))
    }

    /// Whether the subscriber loop is running (false once it stopped, for a shutdown or
    /// because its backend was closed).
    pub fn is_running(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// The last error the loop saw, if any (it keeps running through errors).
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// A receiver of the subscriber's events. The first call gets every event since
    /// [`spawn`](Subscriber::spawn), later calls the events from now on.
    pub fn events(&self) -> broadcast::Receiver<SubscriberEvent> {
        self.first_events
            .lock()
            .take()
            .unwrap_or_else(|| self.shared.events.subscribe())
    }
}

impl Drop for SubscriberHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl fmt::Debug for SubscriberHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriberHandle")
            .field("running", &self.is_running())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
