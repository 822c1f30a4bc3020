//! What a running subscriber reports: events to wait on, counters to read, and what its
//! shutdown did.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::message::MessageId;
use crate::outcome::Outcome;

/// Something that happened in a subscriber, in order. Receive them with
/// [`SubscriberHandle::events`](crate::runtime::SubscriberHandle::events): tests wait on them instead of
/// sleeping, and they make a cheap metrics hook.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscriberEvent {
    /// The loop started.
    Started,
    /// The fetch session (re)connected.
    FetchConnected {
        /// The server's id of the session (on Postgres, `pg_backend_pid()` of the fetch
        /// connection).
        session_id: i64,
    },
    /// A fetch leased `n` messages (`n > 0`).
    Fetched {
        /// How many.
        n: usize,
    },
    /// A fetch found nothing; the loop waits for a notification or the next poll.
    Idle,
    /// A message's outcome was recorded.
    Handled {
        /// The message.
        id: MessageId,
        /// What happened to it.
        outcome: Outcome,
    },
    /// Leases of running or waiting messages were renewed.
    LeasesRenewed {
        /// How many.
        n: usize,
    },
    /// The LISTEN connection is up and listening (first connect and every reconnect); the
    /// loop is woken to fetch at once.
    ListenerConnected,
    /// LISTEN is unavailable or its connection was lost; the loop polls meanwhile.
    ListenerLost {
        /// Why.
        error: String,
    },
    /// LISTEN works again after a loss (follows [`ListenerConnected`](Self::ListenerConnected)).
    ListenerRestored,
    /// A database error; the loop closes its connections and waits this long.
    BackoffStarted {
        /// The wait.
        delay: Duration,
        /// The error.
        error: String,
    },
    /// Shutdown gave unstarted messages back.
    Released {
        /// How many.
        n: usize,
    },
    /// Shutdown asked the handlers still running to stop
    /// ([`Delivery::cancelled`](crate::Delivery::cancelled) resolved for them),
    /// [`shutdown_grace`](crate::SubscriberOptions::shutdown_grace) before its timeout.
    HandlersCancelled {
        /// How many were running.
        n: usize,
    },
    /// The loop stopped.
    Stopped,
}

/// Counters of a subscriber, read with [`SubscriberHandle::stats`](crate::runtime::SubscriberHandle::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Messages leased by fetches.
    pub fetched: u64,
    /// Fetch statements run (including empty ones).
    pub fetches: u64,
    /// Messages acked.
    pub acked: u64,
    /// Ack statements run (one per message, or one per group with batched acks).
    pub ack_statements: u64,
    /// Messages scheduled for retry.
    pub retried: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Outcomes that found their lease lost.
    pub lease_lost: u64,
    /// Unstarted messages released at shutdown.
    pub released: u64,
    /// Handlers that panicked.
    pub panics: u64,
    /// Database errors seen by the loop.
    pub errors: u64,
}

/// The live counters behind [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) fetched: AtomicU64,
    pub(crate) fetches: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) ack_statements: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) lease_lost: AtomicU64,
    pub(crate) released: AtomicU64,
    pub(crate) panics: AtomicU64,
    pub(crate) errors: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            fetched: get(&self.fetched),
            fetches: get(&self.fetches),
            acked: get(&self.acked),
            ack_statements: get(&self.ack_statements),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            lease_lost: get(&self.lease_lost),
            released: get(&self.released),
            panics: get(&self.panics),
            errors: get(&self.errors),
        }
    }
}

/// What a shutdown did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Fetched messages that had not started, given back at once.
    pub released: usize,
    /// Handlers still running when they were asked to stop
    /// ([`shutdown_grace`](crate::SubscriberOptions::shutdown_grace) before the timeout).
    pub cancelled: usize,
    /// Handlers still running at the shutdown timeout; their messages stay leased and are
    /// delivered again after `lease_ttl`.
    pub abandoned: usize,
    /// The final counters.
    pub stats: Stats,
}
