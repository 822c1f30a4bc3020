//! The reference model's topics: per topic a log of committed labels, per subscription a
//! cursor into it, the batches it handed out and the messages it holds one by one (retried,
//! released, taken back from an expired batch, dead), following `core/src/topic.rs`.

use std::collections::{BTreeMap, BTreeSet};

use super::schedule::ScheduleConfig;
use super::trace::{Dead, Label, OutcomeKind, Row, Seen, SubState};

/// A receive's batch of log messages, leased under one token.
#[derive(Debug)]
struct Batch {
    labels: Vec<Label>,
    settled: BTreeSet<Label>,
    expires_ms: i64,
}

/// A message of one subscription with a row of its own.
#[derive(Debug, Clone)]
struct Held {
    attempts: i32,
    deliveries: i32,
    /// When due; while leased, when the lease expires.
    next_ms: i64,
    lease: Option<usize>,
    dead: bool,
}

impl Held {
    /// A message leaving its batch: delivered once, due `now_ms`.
    fn from_batch(now_ms: i64) -> Self {
        Held {
            attempts: 0,
            deliveries: 1,
            next_ms: now_ms,
            lease: None,
            dead: false,
        }
    }
}

#[derive(Debug, Default)]
struct Sub {
    cursor: usize,
    batches: BTreeMap<usize, Batch>,
    held: BTreeMap<Label, Held>,
    /// When the last receive that wrote a batch looked for expired ones.
    checked_ms: Option<i64>,
}

impl Sub {
    fn backlog(&self, log: &[Label]) -> i64 {
        let fresh = log.len().saturating_sub(self.cursor);
        let batched: usize = self
            .batches
            .values()
            .map(|b| b.labels.len() - b.settled.len())
            .sum();
        let held = self.held.values().filter(|h| !h.dead).count();
        i64::try_from(fresh + batched + held).unwrap_or(i64::MAX)
    }

    /// Batches whose lease expired: their unsettled messages become held, due now.
    fn take_back_expired(&mut self, now_ms: i64) {
        let expired: Vec<usize> = self
            .batches
            .iter()
            .filter(|(_, b)| b.expires_ms < now_ms)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            let Some(batch) = self.batches.remove(&token) else {
                continue;
            };
            for label in batch.labels {
                if !batch.settled.contains(&label) && !self.held.contains_key(&label) {
                    self.held.insert(label, Held::from_batch(now_ms));
                }
            }
        }
    }
}

/// The topics and subscriptions of a [`Model`](super::Model).
#[derive(Debug, Default)]
pub(super) struct TopicModel {
    logs: BTreeMap<u8, Vec<Label>>,
    subs: BTreeMap<u8, Sub>,
    /// Committed idempotency keys per topic, and the message holding each.
    keys: BTreeMap<(u8, u8), Label>,
    next_token: usize,
    /// Every topic lease handed out: (subscription, label, token).
    leases: Vec<(u8, Label, usize)>,
    /// Per topic receive that delivered anything: its subscription and lease indices.
    batches: Vec<(u8, Vec<usize>)>,
}

impl TopicModel {
    pub(super) fn subscribe(&mut self, config: &ScheduleConfig, sub: u8) -> Seen {
        let sub = config.sub_index(sub);
        let new = !self.subs.contains_key(&sub);
        if new {
            let cursor = self.log(config.topic_of(sub)).len();
            self.subs.insert(
                sub,
                Sub {
                    cursor,
                    ..Sub::default()
                },
            );
        }
        Seen::Subscribed { sub, new }
    }

    pub(super) fn unsubscribe(&mut self, config: &ScheduleConfig, sub: u8, discard: bool) -> Seen {
        let sub = config.sub_index(sub);
        let result = match self.subs.get(&sub) {
            None => Ok(false),
            Some(s) => {
                let backlog = s.backlog(self.log(config.topic_of(sub)));
                if !discard && backlog > 0 {
                    Err(backlog)
                } else {
                    self.subs.remove(&sub);
                    Ok(true)
                }
            }
        };
        Seen::Unsubscribed {
            sub,
            discard,
            result,
        }
    }

    pub(super) fn publish(
        &mut self,
        config: &ScheduleConfig,
        topic: u8,
        labels: Vec<Label>,
        keys: &[Option<u8>],
        commit: bool,
    ) -> Seen {
        let topic = topic % config.topics.max(1);
        let mut taken: BTreeMap<u8, Label> = BTreeMap::new();
        let mut resolved = Vec::with_capacity(labels.len());
        for (&label, key) in labels.iter().zip(keys) {
            let holder = key.and_then(|k| {
                self.keys
                    .get(&(topic, k))
                    .or_else(|| taken.get(&k))
                    .copied()
            });
            match (holder, key) {
                (Some(first), _) => resolved.push(first),
                (None, Some(k)) => {
                    taken.insert(*k, label);
                    resolved.push(label);
                }
                (None, None) => resolved.push(label),
            }
        }
        if commit {
            for (k, label) in taken {
                self.keys.insert((topic, k), label);
            }
            let log = self.logs.entry(topic).or_default();
            log.extend(
                labels
                    .iter()
                    .zip(&resolved)
                    .filter(|(l, r)| l == r)
                    .map(|(l, _)| *l),
            );
        }
        Seen::TopicPublished {
            topic,
            labels,
            resolved,
            committed: commit,
        }
    }

    pub(super) fn receive(
        &mut self,
        config: &ScheduleConfig,
        sub: u8,
        limit: u8,
        now_ms: i64,
    ) -> Seen {
        let sub = config.sub_index(sub);
        let topic = config.topic_of(sub);
        let log = self.logs.get(&topic).cloned().unwrap_or_default();
        let Some(s) = self.subs.get_mut(&sub) else {
            return Seen::Received {
                sub,
                batch: None,
                rows: Vec::new(),
                known: false,
            };
        };
        let token = self.next_token;
        self.next_token += 1;
        let ttl_ms = i64::from(config.lease_ttl_s) * 1000;
        let max = i32::try_from(config.max_deliveries).unwrap_or(i32::MAX);
        let check_ms =
            i64::try_from(postbox_core::topic::EXPIRED_BATCH_CHECK.as_millis()).unwrap_or(0);
        let checked = match s.checked_ms {
            Some(at) if at + check_ms > now_ms => Some(at),
            _ => {
                s.take_back_expired(now_ms);
                Some(now_ms)
            }
        };
        for h in s.held.values_mut() {
            if !h.dead && h.next_ms <= now_ms && h.deliveries >= max {
                h.dead = true;
                h.lease = None;
            }
        }
        let mut due: Vec<(i64, Label)> = s
            .held
            .iter()
            .filter(|(_, h)| !h.dead && h.next_ms <= now_ms)
            .map(|(l, h)| (h.next_ms, *l))
            .collect();
        due.sort_unstable();
        due.truncate(usize::from(limit));
        let row = |label: Label, attempts: i32, deliveries: i32| Row {
            label,
            queue: config.topic(topic),
            attempts,
            deliveries,
            next_ms: now_ms,
            lease: 0,
        };
        let mut rows = Vec::new();
        for (_, label) in due {
            if let Some(h) = s.held.get_mut(&label) {
                h.lease = Some(token);
                h.next_ms = now_ms + ttl_ms;
                h.deliveries += 1;
                rows.push(row(label, h.attempts, h.deliveries));
            }
        }
        let fresh: Vec<Label> = log
            .iter()
            .skip(s.cursor)
            .take(usize::from(limit) - rows.len())
            .copied()
            .collect();
        if !fresh.is_empty() {
            s.cursor += fresh.len();
            s.checked_ms = checked;
            rows.extend(fresh.iter().map(|l| row(*l, 0, 1)));
            s.batches.insert(
                token,
                Batch {
                    labels: fresh,
                    settled: BTreeSet::new(),
                    expires_ms: now_ms + ttl_ms,
                },
            );
        }
        for r in &mut rows {
            r.lease = self.leases.len();
            self.leases.push((sub, r.label, token));
        }
        let batch = (!rows.is_empty()).then(|| {
            self.batches
                .push((sub, rows.iter().map(|r| r.lease).collect()));
            self.batches.len() - 1
        });
        Seen::Received {
            sub,
            batch,
            rows,
            known: true,
        }
    }

    /// Applies `kind` through topic lease `lease`; whether it took effect.
    fn settle_one(
        &mut self,
        config: &ScheduleConfig,
        lease: usize,
        kind: OutcomeKind,
        delay_s: u8,
        now_ms: i64,
    ) -> bool {
        let (sub, label, token) = self.leases[lease];
        let Some(s) = self.subs.get_mut(&sub) else {
            return false;
        };
        let ttl_ms = i64::from(config.lease_ttl_s) * 1000;
        let delay_ms = i64::from(delay_s) * 1000;
        if let Some(h) = s.held.get_mut(&label).filter(|h| h.lease == Some(token)) {
            match kind {
                OutcomeKind::Ack => {
                    s.held.remove(&label);
                }
                OutcomeKind::Retry => {
                    h.attempts += 1;
                    h.next_ms = now_ms + delay_ms;
                    h.lease = None;
                }
                OutcomeKind::DeadLetter => {
                    h.attempts += 1;
                    h.dead = true;
                    h.lease = None;
                }
                OutcomeKind::Release => {
                    h.next_ms = now_ms;
                    h.deliveries = (h.deliveries - 1).max(0);
                    h.lease = None;
                }
                OutcomeKind::Renew => h.next_ms = now_ms + ttl_ms,
            }
            return true;
        }
        let Some(batch) = s.batches.get_mut(&token) else {
            return false;
        };
        if !batch.labels.contains(&label) || batch.settled.contains(&label) {
            return false;
        }
        if kind == OutcomeKind::Renew {
            batch.expires_ms = now_ms + ttl_ms;
            return true;
        }
        batch.settled.insert(label);
        if batch.settled.len() >= batch.labels.len() {
            s.batches.remove(&token);
        }
        let mut held = Held::from_batch(now_ms);
        held.attempts = 1;
        match kind {
            OutcomeKind::Ack | OutcomeKind::Renew => return true,
            OutcomeKind::Retry => held.next_ms = now_ms + delay_ms,
            OutcomeKind::DeadLetter => held.dead = true,
            OutcomeKind::Release => {
                held.attempts = 0;
                held.deliveries = 0;
            }
        }
        s.held.insert(label, held);
        true
    }

    pub(super) fn settle(
        &mut self,
        config: &ScheduleConfig,
        index: u16,
        kind: OutcomeKind,
        delay_s: u8,
        now_ms: i64,
    ) -> Seen {
        if self.leases.is_empty() {
            return Seen::Skipped;
        }
        let lease = usize::from(index) % self.leases.len();
        let (sub, label, _) = self.leases[lease];
        let done = self.settle_one(config, lease, kind, delay_s, now_ms);
        Seen::TopicSettled {
            sub,
            kind,
            lease,
            label,
            done,
        }
    }

    pub(super) fn ack_batch(&mut self, config: &ScheduleConfig, index: u16, now_ms: i64) -> Seen {
        if self.batches.is_empty() {
            return Seen::Skipped;
        }
        let batch = usize::from(index) % self.batches.len();
        let (sub, leases) = self.batches[batch].clone();
        let mut labels = Vec::new();
        for lease in leases {
            if self.settle_one(config, lease, OutcomeKind::Ack, 0, now_ms) {
                labels.push(self.leases[lease].1);
            }
        }
        labels.sort_unstable();
        Seen::TopicAckedBatch { sub, batch, labels }
    }

    /// The subscriptions that exist, by index.
    pub(super) fn snapshot(&self, config: &ScheduleConfig) -> Vec<SubState> {
        self.subs
            .iter()
            .map(|(&sub, s)| SubState {
                sub,
                backlog: s.backlog(self.log(config.topic_of(sub))),
                dead: s
                    .held
                    .iter()
                    .filter(|(_, h)| h.dead)
                    .map(|(&label, h)| Dead {
                        label,
                        attempts: h.attempts,
                        deliveries: h.deliveries,
                    })
                    .collect(),
            })
            .collect()
    }

    fn log(&self, topic: u8) -> &[Label] {
        self.logs.get(&topic).map_or(&[], Vec::as_slice)
    }
}
