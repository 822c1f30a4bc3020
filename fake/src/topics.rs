//! Topics in memory, with the Postgres backend's semantics: one log per topic in commit
//! order, a cursor per subscription, batches leased under one token, and held messages
//! (retried, released, taken back from an expired batch, dead) one by one.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use postbox_core::{
    DeadLetter, Delivery, EXPIRED_BATCH_CHECK, Envelope, Error, Headers, Lease, Message, MessageId,
    Published, Receive, Result, Settlement, Subscribed, SubscriptionInfo, Topics, Unsubscribe,
    validate_queue, validate_topic_message,
};
use uuid::Uuid;

use crate::broker::FakeBroker;
use crate::clock::plus;
use crate::faults;
use crate::tx::FakeConn;

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
struct Log {
    base: usize,
    rows: VecDeque<LogRow>,
}

impl Log {
    fn end(&self) -> usize {
        self.base + self.rows.len()
    }
}

/// A batch handed out by one receive.
#[derive(Debug)]
struct Batch {
    rows: Vec<LogRow>,
    settled: BTreeSet<MessageId>,
    leased_at: DateTime<Utc>,
    ttl: Duration,
    expires_at: DateTime<Utc>,
}

/// A message of one subscription with a row of its own (`T_held`).
#[derive(Debug, Clone)]
struct Held {
    row: LogRow,
    attempts: i32,
    deliveries: i32,
    /// When due; while leased, when the lease expires.
    next_attempt_at: DateTime<Utc>,
    first_attempt_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    lease: Option<Uuid>,
    ttl: Duration,
    dead: Option<(DateTime<Utc>, String)>,
}

impl Held {
    /// What a subscription's dead-letter listing shows of this message, if it is dead.
    fn dead_letter(&self) -> Option<DeadLetter> {
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
    fn from_batch(
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
struct Sub {
    topic: String,
    created_at: DateTime<Utc>,
    /// The position of the next message of the topic's log to hand out.
    cursor: usize,
    batches: HashMap<Uuid, Batch>,
    held: BTreeMap<MessageId, Held>,
    /// When the last receive that handed out new messages looked for expired batches (as on
    /// Postgres, where that time is stored with the batch).
    checked_at: Option<DateTime<Utc>>,
}

/// An idempotency key of a topic: held by an open transaction, or committed.
#[derive(Debug)]
enum Key {
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
    next_id: MessageId,
    logs: HashMap<String, Log>,
    subs: BTreeMap<String, Sub>,
    keys: HashMap<(String, String), Key>,
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
enum KeyCheck {
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

    fn check_key(&self, topic: &str, key: &str, tx_id: u64, now: DateTime<Utc>) -> KeyCheck {
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
    fn trim(&mut self) {
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

    fn sub(&mut self, name: &str) -> Result<&mut Sub> {
        self.subs
            .get_mut(name)
            .ok_or_else(|| Error::UnknownSubscription {
                subscription: name.to_owned(),
            })
    }

    fn info(&self, name: &str, sub: &Sub) -> SubscriptionInfo {
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

fn delivery(
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
    fn take_back_expired(&mut self, now: DateTime<Utc>) {
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
    fn settle_held(
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
    fn settle_batch(
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

#[async_trait]
impl Topics for FakeBroker {
    async fn subscribe(&self, topic: &str, subscription: &str) -> Result<Subscribed> {
        validate_queue(topic)?;
        validate_queue(subscription)?;
        let now = self.now();
        let mut state = self.shared.state.lock();
        let topics = &mut state.topics;
        if let Some(existing) = topics.subs.get(subscription) {
            return if existing.topic == topic {
                Ok(Subscribed::Existing)
            } else {
                Err(Error::SubscriptionTopic {
                    subscription: subscription.to_owned(),
                    topic: topic.to_owned(),
                    existing: existing.topic.clone(),
                })
            };
        }
        let cursor = topics.logs.get(topic).map_or(0, Log::end);
        topics.subs.insert(
            subscription.to_owned(),
            Sub {
                topic: topic.to_owned(),
                created_at: now,
                cursor,
                batches: HashMap::new(),
                held: BTreeMap::new(),
                checked_at: None,
            },
        );
        Ok(Subscribed::New)
    }

    async fn unsubscribe(&self, subscription: &str, pending: Unsubscribe) -> Result<bool> {
        let mut state = self.shared.state.lock();
        let topics = &mut state.topics;
        let Some(sub) = topics.subs.get(subscription) else {
            return Ok(false);
        };
        if pending == Unsubscribe::IfDrained {
            let backlog = topics.info(subscription, sub).backlog;
            if backlog > 0 {
                return Err(Error::SubscriptionNotDrained {
                    subscription: subscription.to_owned(),
                    backlog,
                });
            }
        }
        topics.subs.remove(subscription);
        topics.trim();
        Ok(true)
    }

    async fn subscriptions(&self, topic: Option<&str>) -> Result<Vec<SubscriptionInfo>> {
        let state = self.shared.state.lock();
        let topics = &state.topics;
        Ok(topics
            .subs
            .iter()
            .filter(|(_, s)| topic.is_none_or(|t| s.topic == t))
            .map(|(name, s)| topics.info(name, s))
            .collect())
    }

    async fn publish_to_topics(
        &self,
        conn: &mut FakeConn,
        messages: Vec<Message>,
    ) -> Result<Vec<Published>> {
        messages.iter().try_for_each(validate_topic_message)?;
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.now();
        if let Some(error) = faults::take(&mut self.shared.state.lock().faults.publish) {
            return Err(error);
        }
        // As a unique index does: wait while another open transaction holds one of the keys.
        loop {
            let wait = {
                let state = self.shared.state.lock();
                messages.iter().find_map(|m| {
                    let key = m.get_idempotency_key()?;
                    match state.topics.check_key(m.get_queue(), key, conn.tx_id, now) {
                        KeyCheck::Wait(ended) => Some(ended),
                        _ => None,
                    }
                })
            };
            match wait {
                // `changed` fails once the holder's guard drops: that is the signal.
                Some(mut ended) => while ended.changed().await.is_ok() {},
                None => break,
            }
        }
        let mut state = self.shared.state.lock();
        let mut published = Vec::with_capacity(messages.len());
        for mut m in messages {
            postbox_core::trace::inject_current(&mut m);
            if let Some(key) = m.get_idempotency_key()
                && let KeyCheck::Duplicate(id) =
                    state.topics.check_key(m.get_queue(), key, conn.tx_id, now)
            {
                published.push(Published::Duplicate(id));
                continue;
            }
            state.topics.next_id += 1;
            let id = state.topics.next_id;
            if let Some(key) = m.get_idempotency_key() {
                let guard = conn
                    .key_guard
                    .get_or_insert_with(|| tokio::sync::watch::channel(()).0);
                let ended = guard.subscribe();
                state.topics.keys.insert(
                    (m.get_queue().to_owned(), key.to_owned()),
                    Key::Reserved {
                        id,
                        tx: conn.tx_id,
                        ended,
                    },
                );
            }
            published.push(Published::New(id));
            postbox_core::metrics::published([m.get_queue()]);
            conn.pending_topic.push(LogRow {
                id,
                topic: m.get_queue().to_owned(),
                payload: m.get_payload().to_vec(),
                headers: m.get_headers().cloned(),
                correlation_id: m.get_correlation_id().unwrap_or_else(Uuid::new_v4),
                created_at: conn.started_at,
            });
        }
        Ok(published)
    }

    async fn receive(&self, params: &Receive) -> Result<Vec<Delivery>> {
        params.validate()?;
        let latency = *self.shared.fetch_latency.lock();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let now = self.now();
        let token = Uuid::new_v4();
        let holder = params.get_holder();
        let max_deliveries = params
            .get_max_deliveries()
            .map(|n| i32::try_from(n).unwrap_or(i32::MAX));
        let mut state = self.shared.state.lock();
        if let Some(error) = faults::take(&mut state.faults.fetch) {
            return Err(error);
        }
        let topics = &mut state.topics;
        let sub = topics.sub(params.get_subscription())?;
        // Expired batches are looked for once per `EXPIRED_BATCH_CHECK`.
        let checked = match sub.checked_at {
            Some(at) if plus(at, EXPIRED_BATCH_CHECK) > now => Some(at),
            _ => {
                sub.take_back_expired(now);
                Some(now)
            }
        };
        if let Some(max) = max_deliveries {
            for h in sub.held.values_mut() {
                if h.dead.is_none() && h.next_attempt_at <= now && h.deliveries >= max {
                    let reason = format!(
                        "max_deliveries exceeded: leased {} times without an outcome",
                        h.deliveries
                    );
                    h.dead = Some((now, reason));
                    h.lease = None;
                }
            }
        }
        let limit = params.get_limit() as usize;
        let mut due: Vec<(DateTime<Utc>, MessageId)> = sub
            .held
            .values()
            .filter(|h| h.dead.is_none() && h.next_attempt_at <= now)
            .map(|h| (h.next_attempt_at, h.row.id))
            .collect();
        due.sort();
        due.truncate(limit);
        let mut out = Vec::with_capacity(limit);
        for (_, id) in due {
            if let Some(h) = sub.held.get_mut(&id) {
                h.lease = Some(token);
                h.ttl = params.get_lease_ttl();
                h.next_attempt_at = plus(now, params.get_lease_ttl());
                h.deliveries += 1;
                let first = *h.first_attempt_at.get_or_insert(now);
                out.push(delivery(
                    &h.row,
                    token,
                    now,
                    holder,
                    (h.attempts, h.deliveries),
                    first,
                    h.last_error.clone(),
                ));
            }
        }
        let left = limit - out.len();
        if left > 0 {
            let topic = sub.topic.clone();
            let cursor = sub.cursor;
            let fresh: Vec<LogRow> = topics.logs.get(&topic).map_or_else(Vec::new, |log| {
                log.rows
                    .iter()
                    .skip(cursor.saturating_sub(log.base))
                    .take(left)
                    .cloned()
                    .collect()
            });
            if !fresh.is_empty() {
                let sub = topics.sub(params.get_subscription())?;
                sub.cursor = cursor + fresh.len();
                sub.checked_at = checked;
                out.extend(
                    fresh
                        .iter()
                        .map(|row| delivery(row, token, now, holder, (0, 1), now, None)),
                );
                sub.batches.insert(
                    token,
                    Batch {
                        rows: fresh,
                        settled: BTreeSet::new(),
                        leased_at: now,
                        ttl: params.get_lease_ttl(),
                        expires_at: plus(now, params.get_lease_ttl()),
                    },
                );
                topics.trim();
            }
        }
        Ok(out)
    }

    async fn settle(&self, leases: &[Lease], settlement: Settlement) -> Result<Vec<MessageId>> {
        settlement.validate()?;
        let now = self.now();
        let mut state = self.shared.state.lock();
        if let Some(error) = faults::take(&mut state.faults.outcome) {
            return Err(error);
        }
        let mut by_token: BTreeMap<Uuid, Vec<MessageId>> = BTreeMap::new();
        for lease in leases {
            by_token.entry(lease.token).or_default().push(lease.id);
        }
        let mut done = Vec::new();
        for (token, ids) in by_token {
            for sub in state.topics.subs.values_mut() {
                done.extend(sub.settle_held(&ids, token, &settlement, now));
                done.extend(sub.settle_batch(&ids, token, &settlement, now));
            }
        }
        Ok(done)
    }

    async fn subscription_dead_letters(&self, subscription: &str) -> Result<Vec<DeadLetter>> {
        let state = self.shared.state.lock();
        let Some(sub) = state.topics.subs.get(subscription) else {
            return Ok(Vec::new());
        };
        let mut dead: Vec<DeadLetter> = sub.held.values().filter_map(Held::dead_letter).collect();
        dead.sort_by_key(|d| (d.dead_at, d.id));
        Ok(dead)
    }
}
