//! The fake's tables: rows with the same columns as Postgres, and the two "indexes" the fetch
//! reads (unleased rows by `(next_attempt_at, id)`, leased rows by `acquired_at`), kept in step
//! by the few methods that change a row's lease.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use postbox_core::{
    DeadLetter, Delivery, Envelope, Headers, MessageId, MessageState, StoredMessage,
};
use uuid::Uuid;

use crate::faults::Faults;

/// One message row, as in the outbox table.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) id: MessageId,
    pub(crate) queue: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: Option<Headers>,
    pub(crate) correlation_id: Uuid,
    pub(crate) attempts: i32,
    pub(crate) deliveries: i32,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) next_attempt_at: DateTime<Utc>,
    pub(crate) first_attempt_at: Option<DateTime<Utc>>,
    pub(crate) last_attempt_at: Option<DateTime<Utc>>,
    pub(crate) lease: Option<(Uuid, DateTime<Utc>)>,
    pub(crate) acquired_by: Option<String>,
    pub(crate) last_error: Option<String>,
}

impl Row {
    pub(crate) fn delivery(&self) -> Option<Delivery> {
        let (token, acquired_at) = self.lease?;
        let delivery = Delivery::builder(self.queue.clone(), self.payload.clone())
            .id(self.id)
            .headers(self.headers.clone())
            .correlation_id(self.correlation_id)
            .attempts(self.attempts)
            .deliveries(self.deliveries)
            .created_at(self.created_at)
            .next_attempt_at(self.next_attempt_at)
            .first_attempt_at(self.first_attempt_at.unwrap_or(acquired_at))
            .acquired_at(acquired_at)
            .token(token)
            .acquired_by(self.acquired_by.clone())
            .last_error(self.last_error.clone())
            .build();
        Some(delivery)
    }

    pub(crate) fn stored(&self, now: DateTime<Utc>) -> StoredMessage {
        let state = if self.lease.is_some() {
            MessageState::Leased
        } else if self.next_attempt_at > now {
            MessageState::Scheduled
        } else {
            MessageState::Ready
        };
        let mut m = StoredMessage::new(self.envelope(), state);
        m.created_at = self.created_at;
        m.next_attempt_at = self.next_attempt_at;
        m.acquired_by = self.acquired_by.clone();
        m
    }

    /// What every row type shows of this message.
    fn envelope(&self) -> Envelope {
        let mut e = Envelope::new(self.id, self.queue.clone(), self.payload.clone());
        e.headers = self.headers.clone();
        e.correlation_id = self.correlation_id;
        e.attempts = self.attempts;
        e.deliveries = self.deliveries;
        e.last_error = self.last_error.clone();
        e
    }

    /// The dead-letter row for this message.
    pub(crate) fn dead(self, reason: String, at: DateTime<Utc>) -> DeadRow {
        DeadRow {
            letter: DeadLetter::new(self.envelope(), reason, at),
            created_at: self.created_at,
        }
    }
}

/// One row of the dead-letter table: what [`DeadLetter`] shows, and the publish time a
/// requeue gives back to the message (as `T_dead.created_at` does).
#[derive(Debug, Clone)]
pub(crate) struct DeadRow {
    pub(crate) letter: DeadLetter,
    pub(crate) created_at: DateTime<Utc>,
}

impl DeadRow {
    /// The message this dead letter becomes when requeued at `now`: ready, its history
    /// cleared.
    pub(crate) fn requeued(self, now: DateTime<Utc>) -> Row {
        let d = self.letter.envelope;
        Row {
            id: d.id,
            queue: d.queue,
            payload: d.payload,
            headers: d.headers,
            correlation_id: d.correlation_id,
            attempts: 0,
            deliveries: 0,
            created_at: self.created_at,
            next_attempt_at: now,
            first_attempt_at: None,
            last_attempt_at: None,
            lease: None,
            acquired_by: None,
            last_error: None,
        }
    }
}

/// Counters of the fake, read with [`FakeBroker::counters`](crate::FakeBroker::counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FakeCounters {
    /// Messages committed.
    pub published: u64,
    /// Messages discarded by a rollback.
    pub rolled_back: u64,
    /// Messages leased by fetches.
    pub fetched: u64,
    /// Messages acked.
    pub acked: u64,
    /// Messages scheduled for retry.
    pub retried: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Leases given back.
    pub released: u64,
}

/// A registered cooperative member.
#[derive(Debug, Clone)]
pub(crate) struct MemberRow {
    pub(crate) queues: Vec<String>,
    pub(crate) registered_at: DateTime<Utc>,
    pub(crate) last_active: DateTime<Utc>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    /// Cooperative members by (group, name).
    pub(crate) members: BTreeMap<(String, String), MemberRow>,
    pub(crate) next_id: MessageId,
    pub(crate) rows: HashMap<MessageId, Row>,
    /// Unleased rows per queue, in fetch order.
    pub(crate) unleased: HashMap<String, BTreeSet<(DateTime<Utc>, MessageId)>>,
    /// Leased rows per queue, by lease time.
    pub(crate) leased: HashMap<String, BTreeSet<(DateTime<Utc>, MessageId)>>,
    pub(crate) dead: BTreeMap<MessageId, DeadRow>,
    /// Journal events by (stream, seq).
    pub(crate) journal: BTreeMap<(String, i64), postbox_core::journal::JournalEvent>,
    pub(crate) faults: Faults,
    pub(crate) counters: FakeCounters,
    /// Topics, their logs and subscriptions.
    pub(crate) topics: crate::topic_state::TopicState,
}

impl State {
    pub(crate) fn allocate_id(&mut self) -> MessageId {
        self.next_id += 1;
        self.next_id
    }

    /// Adds a committed, unleased row.
    pub(crate) fn insert(&mut self, row: Row) {
        self.unleased
            .entry(row.queue.clone())
            .or_default()
            .insert((row.next_attempt_at, row.id));
        self.rows.insert(row.id, row);
    }

    /// Removes a row from the table and the indexes.
    pub(crate) fn remove(&mut self, id: MessageId) -> Option<Row> {
        let row = self.rows.remove(&id)?;
        self.unindex(&row);
        Some(row)
    }

    fn unindex(&mut self, row: &Row) {
        match row.lease {
            Some((_, at)) => {
                if let Some(set) = self.leased.get_mut(&row.queue) {
                    set.remove(&(at, row.id));
                }
            }
            None => {
                if let Some(set) = self.unleased.get_mut(&row.queue) {
                    set.remove(&(row.next_attempt_at, row.id));
                }
            }
        }
    }

    fn index(&mut self, id: MessageId) {
        let Some(row) = self.rows.get(&id) else {
            return;
        };
        let (queue, key, leased) = match row.lease {
            Some((_, at)) => (row.queue.clone(), (at, id), true),
            None => (row.queue.clone(), (row.next_attempt_at, id), false),
        };
        let map = if leased {
            &mut self.leased
        } else {
            &mut self.unleased
        };
        map.entry(queue).or_default().insert(key);
    }

    /// Changes a row through `change`, keeping the indexes in step.
    pub(crate) fn update(&mut self, id: MessageId, change: impl FnOnce(&mut Row)) {
        let Some(row) = self.rows.get(&id).cloned() else {
            return;
        };
        self.unindex(&row);
        if let Some(row) = self.rows.get_mut(&id) {
            change(row);
        }
        self.index(id);
    }

    /// The row with `id` if `token` is its current lease.
    pub(crate) fn held(&self, id: MessageId, token: Uuid) -> bool {
        self.rows
            .get(&id)
            .and_then(|r| r.lease)
            .is_some_and(|(t, _)| t == token)
    }
}
