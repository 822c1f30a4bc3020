//! The state of topics in memory, with the Postgres backend's semantics: one log per topic
//! in commit order, a cursor per subscription, batches leased under one token, and held
//! messages (retried, released, taken back from an expired batch, dead) one by one.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use postbox_core::topic::{Settlement, SubscriptionInfo};
use postbox_core::{DeadLetter, Delivery, Envelope, Error, Headers, MessageId, Result};
use uuid::Uuid;

use crate::clock::plus;

/// One message of a topic's log.
#[derive(Debug, Clone)]
pub(crate) struct LogRow {
    pub(crate) id: MessageId,
    pub(crate) topic: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: Option<Headers>,
    pub(crate) correlation_id: Uuid,
    pub(crate) created_at: DateTime<Utc>,
}

/// A topic's committed messages: `rows[i]` is at position `base + i`. Positions no
/// subscription needs any more are dropped from the front.
#[derive(Debug, Default)]
pub(crate) struct Log {
    pub(crate) base: usize,
    pub(crate) rows: VecDeque<LogRow>,
}

impl Log {
    pub(crate) fn end(&self) -> usize {
        self.base + self.rows.len()
    }
}

/// A batch handed out by one receive.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) rows: Vec<LogRow>,
    pub(crate) settled: BTreeSet<MessageId>,
    pub(crate) leased_at: DateTime<Utc>,
    pub(crate) ttl: Duration,
    pub(crate) expires_at: DateTime<Utc>,
}

/// A message of one subscription with a row of its own (`T_held`).
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub(crate) row: LogRow,
    pub(crate) attempts: i32,
    pub(crate) deliveries: i32,
    /// When due; while leased, when the lease expires.
    pub(crate) next_attempt_at: DateTime<Utc>,
    pub(crate) first_attempt_at: Option<DateTime<Utc>>,
    pub(crate) last_error: Option<String>,
    pub(crate) lease: Option<Uuid>,
    pub(crate) ttl: Duration,
    pub(crate) dead: Option<(DateTime<Utc>, String)>,
}

impl Held {
    /// What a subscription's dead-letter listing shows of this message, if it is dead.
    pub(crate) fn dead_letter(&self) -> Option<DeadLetter> {
        let (at, reason) = self.dead.clone()?;
        let mut e = Envelope::new(
            self.row.id,
            self.row.topic.clone(),
            self.row.payload.clone(),
        );
        e.headers = self.row.headers.clone();
        e.correlation_id = self.row.correlation_id;
        e.attempts = self.attempts;
        e.deliveries = self.deliveries;
        e.last_error = self.last_error.clone();
        Some(DeadLetter::new(e, reason, at))
    }

    /// A message of a batch leased at `leased_at` for `ttl` that leaves it for a row of its
    /// own: delivered once, due `now`.
    pub(crate) fn from_batch(
        row: LogRow,
        leased_at: DateTime<Utc>,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Self {
        Held {
            row,
            attempts: 0,
            deliveries: 1,
            next_attempt_at: now,
            first_attempt_at: Some(leased_at),
            last_error: None,
            lease: None,
            ttl,
            dead: None,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Sub {
    pub(crate) topic: String,
    pub(crate) created_at: DateTime<Utc>,
    /// The position of the next message of the topic's log to hand out.
    pub(crate) cursor: usize,
    pub(crate) batches: HashMap<Uuid, Batch>,
    pub(crate) held: BTreeMap<MessageId, Held>,
    /// When the last receive that handed out new messages looked for expired batches (as on
    /// Postgres, where that time is stored with the batch).
    pub(crate) checked_at: Option<DateTime<Utc>>,
}

/// An idempotency key of a topic: held by an open transaction, or committed.
#[derive(Debug)]
pub(crate) enum Key {
    /// Published by the open transaction `tx`; `ended` changes when it ends.
    Reserved {
        id: MessageId,
        tx: u64,
        ended: tokio::sync::watch::Receiver<()>,
    },
    /// Published by a committed transaction at `at`.
    Committed { id: MessageId, at: DateTime<Utc> },
}

/// How long a committed key is remembered by default, as `Rotation::key_retention`.
const KEY_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Every topic and subscription of one broker.
#[derive(Debug)]
pub(crate) struct TopicState {
    pub(crate) next_id: MessageId,
    pub(crate) logs: HashMap<String, Log>,
    pub(crate) subs: BTreeMap<String, Sub>,
    pub(crate) keys: HashMap<(String, String), Key>,
    pub(crate) key_retention: Duration,
}

impl Default for TopicState {
    fn default() -> Self {
        TopicState {
            next_id: 0,
            logs: HashMap::new(),
            subs: BTreeMap::new(),
            keys: HashMap::new(),
            key_retention: KEY_RETENTION,
        }
    }
}

/// What publishing a keyed message finds.
pub(crate) enum KeyCheck {
    Free,
    Duplicate(MessageId),
    /// Another open transaction holds the key: wait for it to end.
    Wait(tokio::sync::watch::Receiver<()>),
}

impl TopicState {
    /// Requeues (due `now`, history cleared) or deletes the dead letters of `subscription`
    /// that `filter` selects; their ids, in id order.
    pub(crate) fn redrive_dead(
        &mut self,
        subscription: &str,
        filter: &postbox_core::DeadFilter,
        now: DateTime<Utc>,
        requeue: bool,
    ) -> Vec<MessageId> {
        let Some(sub) = self.subs.get_mut(subscription) else {
            return Vec::new();
        };
        let ids: Vec<MessageId> = sub
            .held
            .values()
            .filter(|h| h.dead_letter().is_some_and(|d| filter.matches(&d, now)))
            .map(|h| h.row.id)
            .collect();
        for id in &ids {
            if !requeue {
                sub.held.remove(id);
            } else if let Some(h) = sub.held.get_mut(id) {
                h.dead = None;
                h.attempts = 0;
                h.deliveries = 0;
                h.next_attempt_at = now;
                h.first_attempt_at = None;
                h.last_error = None;
                h.lease = None;
            }
        }
        ids
    }

    /// Appends committed messages to their topics' logs, in commit order, and turns the
    /// transaction's key reservations into keys.
    pub(crate) fn commit(&mut self, rows: Vec<LogRow>, tx_id: u64) {
        let mut stamped = HashMap::new();
        for row in rows {
            stamped.insert(row.id, row.created_at);
            self.logs
                .entry(row.topic.clone())
                .or_default()
                .rows
                .push_back(row);
        }
        for key in self.keys.values_mut() {
            if let Key::Reserved { id, tx, .. } = key
                && *tx == tx_id
            {
                let at = stamped.get(id).copied().unwrap_or_else(Utc::now);
                *key = Key::Committed { id: *id, at };
            }
        }
        self.trim();
    }

    /// Forgets the reservations of a transaction that rolled back.
    pub(crate) fn release_keys(&mut self, tx_id: u64) {
        self.keys
            .retain(|_, k| !matches!(k, Key::Reserved { tx, .. } if *tx == tx_id));
    }

    pub(crate) fn check_key(
        &self,
        topic: &str,
        key: &str,
        tx_id: u64,
        now: DateTime<Utc>,
    ) -> KeyCheck {
        match self.keys.get(&(topic.to_owned(), key.to_owned())) {
            Some(Key::Committed { id, at }) if plus(*at, self.key_retention) > now => {
                KeyCheck::Duplicate(*id)
            }
            Some(Key::Reserved { id, tx, .. }) if *tx == tx_id => KeyCheck::Duplicate(*id),
            Some(Key::Reserved { ended, .. }) => KeyCheck::Wait(ended.clone()),
            _ => KeyCheck::Free,
        }
    }

    /// Drops log rows every subscription of their topic has passed (all of them, for a topic
    /// nobody subscribes): what rotation's `TRUNCATE` does on Postgres.
    pub(crate) fn trim(&mut self) {
        for (topic, log) in &mut self.logs {
            let needed = self
                .subs
                .values()
                .filter(|s| &s.topic == topic)
                .map(|s| s.cursor)
                .min()
                .unwrap_or_else(|| log.end());
            while log.base < needed && log.rows.pop_front().is_some() {
                log.base += 1;
            }
        }
    }

    pub(crate) fn sub(&mut self, name: &str) -> Result<&mut Sub> {
        self.subs
            .get_mut(name)
            .ok_or_else(|| Error::UnknownSubscription {
                subscription: name.to_owned(),
            })
    }

    pub(crate) fn info(&self, name: &str, sub: &Sub) -> SubscriptionInfo {
        let mut oldest: Option<DateTime<Utc>> = None;
        let mut backlog = 0_i64;
        let mut note = |row: &LogRow| {
            backlog += 1;
            oldest = Some(oldest.map_or(row.created_at, |o| o.min(row.created_at)));
        };
        if let Some(log) = self.logs.get(&sub.topic) {
            log.rows
                .iter()
                .skip(sub.cursor.saturating_sub(log.base))
                .for_each(&mut note);
        }
        for batch in sub.batches.values() {
            batch
                .rows
                .iter()
                .filter(|r| !batch.settled.contains(&r.id))
                .for_each(&mut note);
        }
        sub.held
            .values()
            .filter(|h| h.dead.is_none())
            .for_each(|h| note(&h.row));
        let mut info = SubscriptionInfo::new(name.to_owned(), sub.topic.clone(), sub.created_at);
        info.backlog = backlog;
        info.oldest_unprocessed = oldest;
        info.dead_letters = sub.held.values().filter(|h| h.dead.is_some()).count() as i64;
        info
    }
}

pub(crate) fn delivery(
    row: &LogRow,
    token: Uuid,
    now: DateTime<Utc>,
    holder: Option<&str>,
    counts: (i32, i32),
    first: DateTime<Utc>,
    last_error: Option<String>,
) -> Delivery {
    Delivery::builder(row.topic.clone(), row.payload.clone())
        .id(row.id)
        .headers(row.headers.clone())
        .correlation_id(row.correlation_id)
        .attempts(counts.0)
        .deliveries(counts.1)
        .created_at(row.created_at)
        .next_attempt_at(now)
        .first_attempt_at(first)
        .acquired_at(now)
        .token(token)
        .acquired_by(holder.map(str::to_owned))
        .last_error(last_error)
        .build()
}

impl Sub {
    /// Batches whose lease expired: their unsettled messages become held, due now.
    pub(crate) fn take_back_expired(&mut self, now: DateTime<Utc>) {
        let expired: Vec<Uuid> = self
            .batches
            .iter()
            .filter(|(_, b)| b.expires_at < now)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            let Some(batch) = self.batches.remove(&token) else {
                continue;
            };
            for row in batch.rows {
                if batch.settled.contains(&row.id) || self.held.contains_key(&row.id) {
                    continue;
                }
                self.held.insert(
                    row.id,
                    Held::from_batch(row, batch.leased_at, batch.ttl, now),
                );
            }
        }
    }

    /// Applies `settlement` to the held messages of `ids` leased under `token`.
    pub(crate) fn settle_held(
        &mut self,
        ids: &[MessageId],
        token: Uuid,
        settlement: &Settlement,
        now: DateTime<Utc>,
    ) -> Vec<MessageId> {
        let mut done = Vec::new();
        for id in ids {
            if done.contains(id) || self.held.get(id).is_none_or(|h| h.lease != Some(token)) {
                continue;
            }
            done.push(*id);
            if matches!(settlement, Settlement::Ack) {
                self.held.remove(id);
                continue;
            }
            let Some(h) = self.held.get_mut(id) else {
                continue;
            };
            match settlement {
                Settlement::Retry(params) => {
                    h.attempts += 1;
                    h.next_attempt_at = plus(now, params.get_delay());
                    h.last_error = params.get_error().map(str::to_owned);
                    h.lease = None;
                }
                Settlement::DeadLetter(reason) => {
                    h.attempts += 1;
                    h.dead = Some((now, reason.clone()));
                    h.lease = None;
                }
                Settlement::Release => {
                    h.next_attempt_at = now;
                    h.deliveries = (h.deliveries - 1).max(0);
                    h.lease = None;
                }
                Settlement::Renew => h.next_attempt_at = plus(now, h.ttl),
                _ => {}
            }
        }
        done
    }

    /// Applies `settlement` to the unsettled messages of `ids` in the batch `token`.
    pub(crate) fn settle_batch(
        &mut self,
        ids: &[MessageId],
        token: Uuid,
        settlement: &Settlement,
        now: DateTime<Utc>,
    ) -> Vec<MessageId> {
        let Some(batch) = self.batches.get_mut(&token) else {
            return Vec::new();
        };
        let wanted: BTreeSet<MessageId> = ids.iter().copied().collect();
        let mine: Vec<LogRow> = batch
            .rows
            .iter()
            .filter(|r| wanted.contains(&r.id) && !batch.settled.contains(&r.id))
            .cloned()
            .collect();
        if mine.is_empty() {
            return Vec::new();
        }
        if matches!(settlement, Settlement::Renew) {
            batch.expires_at = plus(now, batch.ttl);
            return mine.iter().map(|r| r.id).collect();
        }
        batch.settled.extend(mine.iter().map(|r| r.id));
        let (leased_at, ttl) = (batch.leased_at, batch.ttl);
        if batch.settled.len() >= batch.rows.len() {
            self.batches.remove(&token);
        }
        let mut done = Vec::with_capacity(mine.len());
        for row in mine {
            done.push(row.id);
            let mut held = Held::from_batch(row, leased_at, ttl, now);
            held.attempts = 1;
            match settlement {
                Settlement::Retry(params) => {
                    held.next_attempt_at = plus(now, params.get_delay());
                    held.last_error = params.get_error().map(str::to_owned);
                }
                Settlement::DeadLetter(reason) => held.dead = Some((now, reason.clone())),
                Settlement::Release => {
                    held.attempts = 0;
                    held.deliveries = 0;
                }
                _ => continue,
            }
            self.held.insert(held.row.id, held);
        }
        done
    }
}
