//! [`snapshot_and_tail`]: replay, then follow live, with no gap and no duplicate.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use super::JournalStore;
use super::{JournalEvent, LiveEvent, LiveEvents};
use crate::error::Result;

/// Settings of [`snapshot_and_tail`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailOptions {
    terminal: HashSet<String>,
    page: u32,
    gap_wait: Duration,
}

impl Default for TailOptions {
    fn default() -> Self {
        TailOptions {
            terminal: ["done", "error"].map(String::from).into(),
            page: 500,
            gap_wait: Duration::from_secs(2),
        }
    }
}

impl TailOptions {
    /// Event types that end the tail (after being yielded). Defaults to `done` and `error`.
    #[must_use]
    pub fn terminal<T: Into<String>>(mut self, types: impl IntoIterator<Item = T>) -> Self {
        self.terminal = types.into_iter().map(Into::into).collect();
        self
    }

    /// How long a missing seq may stay missing (not live, not in the journal) before the tail
    /// moves past it, e.g. an event whose durable write failed. Defaults to 2 s.
    #[must_use]
    pub fn gap_wait(mut self, wait: Duration) -> Self {
        self.gap_wait = wait;
        self
    }
}

/// A reader of one stream: the committed events after a seq, then the live ones. See
/// [`snapshot_and_tail`].
pub struct JournalTail<B: JournalStore> {
    backend: B,
    stream: String,
    options: TailOptions,
    live: Option<LiveEvents>,
    last: i64,
    ready: VecDeque<JournalEvent>,
    /// Live events received ahead of a missing seq.
    ahead: BTreeMap<i64, JournalEvent>,
    read_journal: bool,
    gap_since: Option<Instant>,
    done: bool,
}

/// Subscribes to `stream`'s live channel **first**, then replays the committed events with
/// `seq > after_seq`, then yields live events with a seq greater than the last one yielded.
/// Every event is yielded once, in seq order; a terminal event type ends the tail.
///
/// A reader that fell behind the live channel (or saw a gap) re-reads the journal instead of
/// losing events; a seq that stays missing longer than [`TailOptions::gap_wait`] is skipped.
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) if the live subscription fails.
///
/// # Cancel safety
///
/// Cancel safe: a dropped call leaves no subscription behind.
pub async fn snapshot_and_tail<B: JournalStore>(
    backend: B,
    stream: impl Into<String>,
    after_seq: i64,
    options: TailOptions,
) -> Result<JournalTail<B>> {
    let stream = stream.into();
    let live = backend.journal_subscribe(&stream).await?;
    Ok(JournalTail {
        backend,
        stream,
        options,
        live: Some(live),
        last: after_seq,
        ready: VecDeque::new(),
        ahead: BTreeMap::new(),
        read_journal: true,
        gap_since: None,
        done: false,
    })
}

impl<B: JournalStore> JournalTail<B> {
    /// The tail as a [`Stream`](futures_util::Stream) of events, for `StreamExt` combinators
    /// or an SSE response body.
    pub fn into_stream(self) -> impl futures_util::Stream<Item = Result<JournalEvent>> {
        futures_util::stream::unfold(self, |mut tail| async move {
            tail.next().await.map(|item| (item, tail))
        })
    }

    /// The seq of the last event yielded (or the `after_seq` it started from).
    pub fn last_seq(&self) -> i64 {
        self.last
    }

    /// The next event; `None` after a terminal event, or when the live channel closed and the
    /// journal has nothing more.
    ///
    /// # Errors
    ///
    /// A database error reading the journal (the tail can be polled again).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the tail changes only when an event is in hand, so a dropped call loses
    /// nothing; the next call continues from the last event returned.
    pub async fn next(&mut self) -> Option<Result<JournalEvent>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(event) = self.ready.pop_front() {
                if event.seq <= self.last {
                    continue;
                }
                self.last = event.seq;
                self.gap_since = None;
                self.ahead.retain(|seq, _| *seq > self.last);
                if self.options.terminal.contains(&event.event_type) {
                    self.done = true;
                    self.live = None;
                }
                return Some(Ok(event));
            }
            if self.read_journal {
                match self
                    .backend
                    .journal_read_after(&self.stream, self.last, self.options.page)
                    .await
                {
                    Ok(events) if !events.is_empty() => {
                        self.ready.extend(events);
                        continue;
                    }
                    Ok(_) => self.read_journal = false,
                    Err(e) => return Some(Err(e)),
                }
            }
            // Live phase: the next seq may already be waiting.
            if let Some(event) = self.ahead.remove(&(self.last + 1)) {
                self.ready.push_back(event);
                continue;
            }
            if !self.ahead.is_empty() {
                let since = *self.gap_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.options.gap_wait {
                    // Give up on the missing seq(s): move to the next one we have.
                    if let Some((&seq, _)) = self.ahead.iter().next() {
                        tracing::warn!(target: "postbox", stream = %self.stream, from = self.last + 1, to = seq - 1, "postbox.journal: skipping seqs that never arrived");
                        if let Some(event) = self.ahead.remove(&seq) {
                            self.ready.push_back(event);
                        }
                    }
                    continue;
                }
            }
            let live = self.live.as_mut()?;
            let received = if self.ahead.is_empty() {
                Ok(live.recv().await)
            } else {
                // A gap: poll the journal while waiting for more live events.
                tokio::time::timeout(Duration::from_millis(50), live.recv()).await
            };
            match received {
                Err(_) => self.read_journal = true,
                Ok(None) => {
                    // Live channel gone: whatever the journal has, then the end.
                    self.live = None;
                    self.read_journal = true;
                    if self.ready.is_empty() {
                        match self
                            .backend
                            .journal_read_after(&self.stream, self.last, self.options.page)
                            .await
                        {
                            Ok(events) if !events.is_empty() => self.ready.extend(events),
                            Ok(_) => return None,
                            Err(e) => return Some(Err(e)),
                        }
                    }
                }
                Ok(Some(LiveEvent::Event(event))) => {
                    if event.seq == self.last + 1 {
                        self.ready.push_back(event);
                    } else if event.seq > self.last {
                        self.ahead.insert(event.seq, event);
                        self.read_journal = true;
                    }
                }
                Ok(Some(LiveEvent::Stored { seq })) => {
                    // Committed before it was announced: one read, no waiting. A forged
                    // announcement finds nothing new and costs just that read.
                    if seq > self.last {
                        self.read_journal = true;
                    }
                }
                Ok(Some(LiveEvent::Pointer { seq })) => {
                    if seq > self.last {
                        // Too large to notify: read it (and anything before it) from the journal.
                        self.read_journal = true;
                        self.poll_until_committed(seq).await;
                    }
                }
                Ok(Some(LiveEvent::Lagged)) => self.read_journal = true,
            }
        }
    }

    /// Waits (polling the journal) until `seq` is committed or the gap wait passes.
    async fn poll_until_committed(&mut self, seq: i64) {
        let start = Instant::now();
        while start.elapsed() < self.options.gap_wait {
            match self
                .backend
                .journal_read_after(&self.stream, seq - 1, 1)
                .await
            {
                Ok(events) if events.first().is_some_and(|e| e.seq == seq) => return,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

impl<B: JournalStore> std::fmt::Debug for JournalTail<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalTail")
            .field("stream", &self.stream)
            .field("last", &self.last)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}
