//! Transactions of the fake: publishes wait in the transaction until it commits.

use std::fmt;
use std::ops::{Deref, DerefMut};

use chrono::{DateTime, Utc};

use crate::broker::FakeBroker;
use crate::state::Row;
use crate::topic_state::LogRow;

/// What the fake publishes on (its [`Publish::Conn`](postbox_core::Publish::Conn)): the
/// messages of one open transaction.
///
/// Like Postgres, every message of a transaction is stamped with the transaction's start time
/// (`now()` is the transaction's timestamp) and gets its id when published, so a rollback
/// leaves a gap in the ids.
pub struct FakeConn {
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) pending: Vec<Row>,
    /// Messages published to topics, in publish order.
    pub(crate) pending_topic: Vec<LogRow>,
    /// Identifies the transaction's idempotency-key reservations.
    pub(crate) tx_id: u64,
    /// Dropped when the transaction ends: wakes publishers waiting for its keys.
    pub(crate) key_guard: Option<tokio::sync::watch::Sender<()>>,
}

/// Transaction ids of the fake, for key reservations.
static NEXT_TX: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl fmt::Debug for FakeConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeConn")
            .field("started_at", &self.started_at)
            .field("pending", &self.pending.len())
            .field("pending_topic", &self.pending_topic.len())
            .finish()
    }
}

/// An open transaction of a [`FakeBroker`]. Commit it with
/// [`Publish::commit`](postbox_core::Publish::commit); dropping it rolls back.
pub struct FakeTransaction {
    broker: FakeBroker,
    conn: FakeConn,
}

impl FakeTransaction {
    pub(crate) fn new(broker: FakeBroker, started_at: DateTime<Utc>) -> Self {
        FakeTransaction {
            broker,
            conn: FakeConn {
                started_at,
                pending: Vec::new(),
                pending_topic: Vec::new(),
                tx_id: NEXT_TX.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                key_guard: None,
            },
        }
    }

    pub(crate) fn commit(mut self) {
        let rows = std::mem::take(&mut self.conn.pending);
        let topic_rows = std::mem::take(&mut self.conn.pending_topic);
        self.broker.commit_rows(rows, topic_rows, self.conn.tx_id);
    }
}

impl Deref for FakeTransaction {
    type Target = FakeConn;

    fn deref(&self) -> &FakeConn {
        &self.conn
    }
}

impl DerefMut for FakeTransaction {
    fn deref_mut(&mut self) -> &mut FakeConn {
        &mut self.conn
    }
}

impl Drop for FakeTransaction {
    fn drop(&mut self) {
        let discarded = self.conn.pending.len() + self.conn.pending_topic.len();
        if discarded > 0 {
            self.broker.discard_rows(discarded);
        }
        // Committed reservations became keys already; what is left is rolled back. The guard
        // drops after this, waking whoever waits for these keys.
        self.broker.release_keys(self.conn.tx_id);
    }
}

impl fmt::Debug for FakeTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeTransaction")
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}
