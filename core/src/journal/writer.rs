//! [`BatchedJournalWriter`]: durable in batches, live when stored (or at once, opted in).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::JournalStore;
use super::{EventPayload, JournalEvent};
use crate::error::{Error, Result};

/// Settings of a [`BatchedJournalWriter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    max_batch: usize,
    max_delay: Duration,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            max_batch: 16,
            max_delay: Duration::from_millis(100),
        }
    }
}

impl WriterOptions {
    /// Flush when this many events are buffered (at least 1). Defaults to 16.
    #[must_use]
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// Flush when this long has passed since the last flush, also when no further event
    /// arrives (a background timer checks). Defaults to 100 ms.
    #[must_use]
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay.max(Duration::from_millis(1));
        self
    }
}

/// Counters of a [`BatchedJournalWriter`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriterStats {
    /// Events accepted by `record`.
    pub recorded: u64,
    /// Events written durably.
    pub written: u64,
    /// Transactions committed (one per batch, one per row in the fallback).
    pub commits: u64,
    /// Events whose seq was taken and that were written at `latest + 1` instead (which ones:
    /// [`BatchedJournalWriter::rewrites`]).
    pub rewritten: u64,
    /// Events that could not be written (logged with stream and seq).
    pub dropped: u64,
    /// Live publishes that failed (the durable write still happened).
    pub live_failures: u64,
}

/// An event whose seq was taken when it was flushed, and the seq it was written at instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewrite {
    /// The seq given to [`BatchedJournalWriter::record`].
    pub from: i64,
    /// The seq it was written at (`latest_seq + 1` when it was flushed).
    pub to: i64,
}

/// How many [`Rewrite`]s a writer keeps (the oldest go first); [`WriterStats::rewritten`]
/// counts them all.
pub const MAX_REWRITES_KEPT: usize = 1024;

struct State {
    buffer: Vec<JournalEvent>,
    last_flush: Instant,
    closed: bool,
    stats: WriterStats,
    rewrites: std::collections::VecDeque<Rewrite>,
}

struct Inner<B: JournalStore> {
    backend: B,
    stream: String,
    options: WriterOptions,
    state: Mutex<State>,
    live_failures: AtomicU64,
}

/// Writes one journal stream: each event is published and buffered; the buffer is written in
/// one multi-row insert when it holds `max_batch` events, when `max_delay` has passed since the
/// last flush (a background timer flushes quiet streams), and on [`close`](Self::close).
///
/// When readers see an event depends on the backend's [`JournalLive`](crate::journal::JournalLive): by
/// default once its flush has stored it (the flush announces it; readers read it from the
/// table), so within `max_delay`; with `JournalLive::Payloads` (opt-in: the channel is open to
/// every role that can connect) at once, before it is stored.
///
/// `record` checks the event first ([`JournalEvent::validate`]): one Postgres cannot store is
/// refused at once and never published live. A flush that fails (a taken seq, or any other
/// error) falls back to one insert per row, so one bad row never drops the others, and writes
/// each colliding event at `latest_seq + 1` ([`rewrites`](Self::rewrites) says which). A row
/// that still cannot be written is counted in [`WriterStats::dropped`] and logged with stream
/// and seq; the buffer is cleared either way (bounded memory) and the writer keeps working.
/// Nothing here panics into your code.
///
/// ```no_run
/// # async fn stream(backend: postbox_core::PgBackend) -> postbox_core::Result<()> {
/// use postbox_core::journal::{BatchedJournalWriter, WriterOptions};
///
/// let writer = BatchedJournalWriter::new(backend, "answer-42", WriterOptions::default());
/// for (seq, token) in [(1, "Hel"), (2, "lo")] {
///     let mut payload = serde_json::Map::new();
///     payload.insert("text".into(), token.into());
///     writer.record(seq, "delta", payload).await?; // durable and live within 100 ms
/// }
/// writer.record(3, "done", serde_json::Map::new()).await?;
/// let stats = writer.close().await?; // everything durable
/// assert_eq!(stats.written, 3);
/// # Ok(()) }
/// ```
pub struct BatchedJournalWriter<B: JournalStore> {
    inner: Arc<Inner<B>>,
    timer: JoinHandle<()>,
    /// Events for the live channel, sent in order by the notifier task without making
    /// `record` wait for a round trip; a backlog goes out in one statement.
    live: parking_lot::Mutex<Option<mpsc::UnboundedSender<JournalEvent>>>,
    notifier: parking_lot::Mutex<Option<JoinHandle<()>>>,
}

impl<B: JournalStore> BatchedJournalWriter<B> {
    /// A writer for `stream`, with its flush timer spawned on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn new(backend: B, stream: impl Into<String>, options: WriterOptions) -> Self {
        let inner = Arc::new(Inner {
            backend,
            stream: stream.into(),
            options,
            state: Mutex::new(State {
                buffer: Vec::with_capacity(options.max_batch),
                last_flush: Instant::now(),
                closed: false,
                stats: WriterStats::default(),
                rewrites: std::collections::VecDeque::new(),
            }),
            live_failures: AtomicU64::new(0),
        });
        let timer = tokio::spawn(flush_timer(Arc::downgrade(&inner)));
        let (live, events) = mpsc::unbounded_channel();
        let notifier = tokio::spawn(notify_live(Arc::clone(&inner), events));
        BatchedJournalWriter {
            inner,
            timer,
            live: parking_lot::Mutex::new(Some(live)),
            notifier: parking_lot::Mutex::new(Some(notifier)),
        }
    }

    /// The stream this writer writes.
    pub fn stream(&self) -> &str {
        &self.inner.stream
    }

    /// Publishes the event (live at once only under `JournalLive::Payloads`) and buffers it
    /// for the durable write, whose commit announces it by default.
    ///
    /// # Errors
    ///
    /// [`Error::WriterClosed`] after [`close`](Self::close); [`Error::InvalidArgument`] for an
    /// event [`JournalEvent::validate`] refuses (it is neither published nor buffered). Flush
    /// failures are not errors here: see [`WriterStats::dropped`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe once the event is buffered: a flush it starts runs on a task of its own,
    /// so dropping the call (a caller's timeout) never loses the batch the flush took. Dropped
    /// before the writer's lock was taken, the event is not recorded.
    pub async fn record(&self, seq: i64, event_type: &str, payload: EventPayload) -> Result<()> {
        let event = JournalEvent::new(self.inner.stream.clone(), seq, event_type, payload);
        event.validate()?;
        let mut state = self.inner.state.lock().await;
        if state.closed {
            return Err(Error::WriterClosed {
                stream: self.inner.stream.clone(),
            });
        }
        if let Some(live) = self.live.lock().as_ref() {
            let _ = live.send(event.clone());
        }
        state.stats.recorded += 1;
        state.buffer.push(event);
        let due = state.buffer.len() >= self.inner.options.max_batch
            || state.last_flush.elapsed() >= self.inner.options.max_delay;
        drop(state);
        if due {
            self.inner.flush_detached(Due::Always).await;
        }
        Ok(())
    }

    /// Flushes if `max_delay` has passed since the last flush (the timer does this too).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the flush runs on a task of its own and completes without the caller.
    pub async fn tick(&self) {
        self.inner.flush_detached(Due::AfterMaxDelay).await;
    }

    /// Flushes now.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the flush runs on a task of its own and completes without the caller.
    pub async fn flush(&self) {
        self.inner.flush_detached(Due::Always).await;
    }

    /// Flushes and closes; idempotent. Once it returns, every recorded event is durable (or
    /// counted as dropped) and has been published or announced live.
    ///
    /// # Errors
    ///
    /// None today; the `Result` leaves room for close-time failures.
    ///
    /// # Cancel safety
    ///
    /// The writer is closed as soon as the call starts, and its last flush completes without
    /// the caller; a dropped call only skips waiting for the live notifier.
    pub async fn close(&self) -> Result<WriterStats> {
        let mut state = self.inner.state.lock().await;
        if !state.closed {
            state.closed = true;
            drop(state);
            self.inner.flush_detached(Due::Always).await;
            state = self.inner.state.lock().await;
            self.timer.abort();
            // Let the notifier send what is queued, then end.
            self.live.lock().take();
            let notifier = self.notifier.lock().take();
            if let Some(notifier) = notifier {
                let _ = notifier.await;
            }
        }
        Ok(self.inner.with_live_failures(state.stats))
    }

    /// The events written at another seq than the one recorded because theirs was taken, in
    /// the order they were written (the last [`MAX_REWRITES_KEPT`]).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads the writer's state.
    pub async fn rewrites(&self) -> Vec<Rewrite> {
        self.inner
            .state
            .lock()
            .await
            .rewrites
            .iter()
            .copied()
            .collect()
    }

    /// The counters so far.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads the writer's state.
    pub async fn stats(&self) -> WriterStats {
        let stats = self.inner.state.lock().await.stats;
        self.inner.with_live_failures(stats)
    }
}

impl<B: JournalStore> Drop for BatchedJournalWriter<B> {
    fn drop(&mut self) {
        self.timer.abort();
        // The notifier ends by itself once the sender is gone and its queue is sent.
        self.live.lock().take();
        if let Ok(state) = self.inner.state.try_lock()
            && !state.closed
            && !state.buffer.is_empty()
        {
            tracing::warn!(target: "postbox", stream = %self.inner.stream, unflushed = state.buffer.len(), "postbox.journal: writer dropped without close(); its buffered events are lost");
        }
    }
}

impl<B: JournalStore> std::fmt::Debug for BatchedJournalWriter<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchedJournalWriter")
            .field("stream", &self.inner.stream)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// Flushes quiet streams: wakes every quarter of `max_delay` and flushes a buffer whose last
/// flush is older than `max_delay`. Ends when the writer is closed or dropped.
async fn flush_timer<B: JournalStore>(inner: Weak<Inner<B>>) {
    let period = match inner.upgrade() {
        Some(i) => (i.options.max_delay / 4).max(Duration::from_millis(1)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        let due = {
            let state = inner.state.lock().await;
            if state.closed {
                return;
            }
            !state.buffer.is_empty() && state.last_flush.elapsed() >= inner.options.max_delay
        };
        if due {
            // Detached: aborting this timer (on close or drop) never cuts a flush short.
            inner.flush_detached(Due::AfterMaxDelay).await;
        }
    }
}

/// Sends live events in order; whatever queued up while a statement ran goes out together.
async fn notify_live<B: JournalStore>(
    inner: Arc<Inner<B>>,
    mut events: mpsc::UnboundedReceiver<JournalEvent>,
) {
    let mut batch = Vec::new();
    while let Some(first) = events.recv().await {
        batch.push(first);
        while batch.len() < 256 {
            match events.try_recv() {
                Ok(event) => batch.push(event),
                Err(_) => break,
            }
        }
        if let Err(e) = inner.backend.journal_publish_batch(&batch).await {
            inner
                .live_failures
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            tracing::warn!(target: "postbox", stream = %inner.stream, events = batch.len(), error = %e, "postbox.journal: live publish failed");
        }
        batch.clear();
    }
}

/// When a detached flush writes.
#[derive(Debug, Clone, Copy)]
enum Due {
    Always,
    AfterMaxDelay,
}

impl<B: JournalStore> Inner<B> {
    /// Flushes on a task of its own, which the caller awaits. The flush takes the buffer
    /// before it writes, so running it inside the caller's future would lose that batch
    /// (uncounted) when the caller is cancelled mid-write; on its own task the write always
    /// completes and is counted.
    async fn flush_detached(self: &Arc<Self>, due: Due) {
        let inner = Arc::clone(self);
        let task = tokio::spawn(async move {
            let mut state = inner.state.lock().await;
            let run = match due {
                Due::Always => true,
                Due::AfterMaxDelay => state.last_flush.elapsed() >= inner.options.max_delay,
            };
            if run {
                inner.flush(&mut state).await;
            }
        });
        if let Err(e) = task.await {
            tracing::error!(target: "postbox", stream = %self.stream, error = %e, "postbox.journal: flush task failed");
        }
    }

    fn with_live_failures(&self, mut stats: WriterStats) -> WriterStats {
        stats.live_failures = self.live_failures.load(Ordering::Relaxed);
        stats
    }

    async fn flush(&self, state: &mut State) {
        state.last_flush = Instant::now();
        let batch = std::mem::take(&mut state.buffer);
        if batch.is_empty() {
            return;
        }
        match self.backend.journal_append(&batch).await {
            Ok(()) => {
                state.stats.commits += 1;
                state.stats.written += batch.len() as u64;
                tracing::debug!(target: "postbox", stream = %self.stream, rows = batch.len(), "postbox.flush");
            }
            Err(error) => {
                if !matches!(error, Error::SeqConflict { .. }) {
                    tracing::warn!(target: "postbox", stream = %self.stream, rows = batch.len(), %error, "postbox.journal: batch flush failed; writing row by row");
                }
                self.flush_per_row(state, batch).await;
            }
        }
    }

    /// Inserts row by row; colliding events go last, at `latest + 1`.
    async fn flush_per_row(&self, state: &mut State, batch: Vec<JournalEvent>) {
        let mut collided = Vec::new();
        for event in batch {
            match self
                .backend
                .journal_append(std::slice::from_ref(&event))
                .await
            {
                Ok(()) => {
                    state.stats.commits += 1;
                    state.stats.written += 1;
                }
                Err(Error::SeqConflict { .. }) => collided.push(event),
                Err(error) => {
                    tracing::warn!(target: "postbox", stream = %event.stream, seq = event.seq, %error, "postbox.journal: event dropped");
                    state.stats.dropped += 1;
                }
            }
        }
        for mut event in collided {
            let from = event.seq;
            match super::append_one_with_retry(&self.backend, &mut event).await {
                Ok(to) => {
                    state.stats.commits += 1;
                    state.stats.written += 1;
                    state.stats.rewritten += 1;
                    if state.rewrites.len() == MAX_REWRITES_KEPT {
                        state.rewrites.pop_front();
                    }
                    state.rewrites.push_back(Rewrite { from, to });
                }
                Err(error) => {
                    tracing::warn!(target: "postbox", stream = %event.stream, seq = event.seq, %error, "postbox.journal: event dropped");
                    state.stats.dropped += 1;
                }
            }
        }
    }
}
