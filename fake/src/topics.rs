//! [`Topics`] on the fake: the calls, over the state in [`crate::topic_state`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use postbox_core::topic::{
    EXPIRED_BATCH_CHECK, Published, Receive, Settlement, Subscribed, SubscriptionInfo, Unsubscribe,
    validate_topic_message,
};
use postbox_core::{
    DeadLetter, Delivery, Error, Lease, Message, MessageId, Result, Topics, validate_queue,
};
use uuid::Uuid;

use crate::broker::FakeBroker;
use crate::clock::plus;
use crate::faults;
use crate::tx::FakeConn;

use crate::topic_state::{Batch, Held, Key, KeyCheck, Log, LogRow, Sub, delivery};

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
