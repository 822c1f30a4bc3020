//! Transactions of the fake: publishes wait in the transaction until it commits.

use std::fmt;
use std::ops::{Deref, DerefMut};

use chrono::{DateTime, Utc};

use crate::broker::FakeBroker;
use crate::state::Row;

/// What the fake publishes on (its [`Backend::Conn`](postbox_core::Backend::Conn)): the
/// messages of one open transaction.
///
/// Like Postgres, every message of a transaction is stamped with the transaction's start time
/// (`now()` is the transaction's timestamp) and gets its id when published, so a rollback
/// leaves a gap in the ids.
pub struct FakeConn {
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) pending: Vec<Row>,
}

impl fmt::Debug for FakeConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeConn")
            .field("started_at", &self.started_at)
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// An open transaction of a [`FakeBroker`]. Commit it with
/// [`Backend::commit`](postbox_core::Backend::commit); dropping it rolls back.
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
            },
        }
    }

    pub(crate) fn commit(mut self) {
        let rows = std::mem::take(&mut self.conn.pending);
        self.broker.commit_rows(rows);
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
        if !self.conn.pending.is_empty() {
            self.broker.discard_rows(self.conn.pending.len());
        }
    }
}

impl fmt::Debug for FakeTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeTransaction")
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}
