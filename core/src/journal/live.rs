//! The live side of a journal stream.

use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use super::JournalEvent;

/// What a journal's live channel carries, chosen per backend
/// (`PgBackend::journal_live`, `FakeBroker::journal_live`).
///
/// On Postgres the live channel is `NOTIFY`, and `NOTIFY` has no privileges: any role that can
/// connect to the database can `LISTEN` on a channel and `NOTIFY` anything on it. So by default
/// the channel carries no authority and no content ([`Stored`](Self::Stored)): readers take
/// from it only "stream S has events up to seq N" and read the events themselves from the
/// journal table, which has privileges. A forged announcement costs a reader one read and
/// yields nothing; a role that may not read the table learns stream ids and seqs, never
/// payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum JournalLive {
    /// Events go live once stored: the transaction that writes them announces them when it
    /// commits ([`LiveEvent::Stored`]), so a reader sees an event when it is durable (with the
    /// [`BatchedJournalWriter`](super::BatchedJournalWriter), within its `max_delay`) and
    /// never an event that was not stored.
    /// [`journal_publish`](crate::JournalStore::journal_publish) sends nothing. The default.
    #[default]
    Stored,
    /// Opt-in, for databases whose every role is trusted: each event travels whole over the
    /// live channel when it is published, before it is stored ([`LiveEvent::Event`]), which
    /// takes the batch delay out of a streamed answer. Anyone who can connect can read these
    /// payloads and inject events that readers will yield.
    Payloads,
}

/// What the live channel delivers.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum LiveEvent {
    /// An event, whole ([`JournalLive::Payloads`] only).
    Event(JournalEvent),
    /// An event published whole but too large for a notification ([`JournalLive::Payloads`]
    /// only): read it from the journal by seq once it is stored.
    Pointer {
        /// Its seq.
        seq: i64,
    },
    /// Events up to `seq` were stored: read them from the journal ([`JournalLive::Stored`]).
    /// Carries no event, so it can announce but never inject one.
    Stored {
        /// The highest seq the storing transaction wrote to this stream.
        seq: i64,
    },
    /// Some events may have been missed (the reader fell behind, or the channel reconnected):
    /// re-read from the journal.
    Lagged,
}

/// A subscription to one stream's live events; dropping it unsubscribes.
pub struct LiveEvents {
    source: Source,
}

enum Source {
    Channel {
        rx: mpsc::Receiver<LiveEvent>,
        task: JoinHandle<()>,
    },
    Broadcast {
        rx: broadcast::Receiver<JournalEvent>,
        stream: String,
        live: JournalLive,
    },
}

impl LiveEvents {
    /// Live events forwarded by `task` into `rx` (the Postgres listener's shape).
    pub fn from_channel(rx: mpsc::Receiver<LiveEvent>, task: JoinHandle<()>) -> Self {
        LiveEvents {
            source: Source::Channel { rx, task },
        }
    }

    /// The events of `stream` from an in-process broadcast of every stream (the fake's
    /// shape): yielded whole under [`JournalLive::Payloads`], as [`LiveEvent::Stored`]
    /// announcements under [`JournalLive::Stored`].
    pub fn from_broadcast(
        rx: broadcast::Receiver<JournalEvent>,
        stream: impl Into<String>,
        live: JournalLive,
    ) -> Self {
        LiveEvents {
            source: Source::Broadcast {
                rx,
                stream: stream.into(),
                live,
            },
        }
    }

    /// The next live event; `None` once the channel is closed for good.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call loses nothing.
    pub async fn recv(&mut self) -> Option<LiveEvent> {
        match &mut self.source {
            Source::Channel { rx, .. } => rx.recv().await,
            Source::Broadcast { rx, stream, live } => loop {
                match rx.recv().await {
                    Ok(event) if event.stream == *stream => {
                        return Some(match live {
                            JournalLive::Payloads => LiveEvent::Event(event),
                            JournalLive::Stored => LiveEvent::Stored { seq: event.seq },
                        });
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return Some(LiveEvent::Lagged),
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            },
        }
    }
}

impl Drop for LiveEvents {
    fn drop(&mut self) {
        if let Source::Channel { task, .. } = &self.source {
            task.abort();
        }
    }
}

impl std::fmt::Debug for LiveEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveEvents").finish_non_exhaustive()
    }
}
