//! The live side of a journal stream.

use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use super::JournalEvent;

/// What the live channel delivers.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum LiveEvent {
    /// An event, whole.
    Event(JournalEvent),
    /// An event too large for a notification: read it from the journal by seq.
    Pointer {
        /// Its seq.
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
    },
}

impl LiveEvents {
    /// Live events forwarded by `task` into `rx` (the Postgres listener's shape).
    pub fn from_channel(rx: mpsc::Receiver<LiveEvent>, task: JoinHandle<()>) -> Self {
        LiveEvents {
            source: Source::Channel { rx, task },
        }
    }

    /// The events of `stream` from an in-process broadcast of every stream (the fake's shape).
    pub fn from_broadcast(
        rx: broadcast::Receiver<JournalEvent>,
        stream: impl Into<String>,
    ) -> Self {
        LiveEvents {
            source: Source::Broadcast {
                rx,
                stream: stream.into(),
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
            Source::Broadcast { rx, stream } => loop {
                match rx.recv().await {
                    Ok(event) if event.stream == *stream => return Some(LiveEvent::Event(event)),
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
