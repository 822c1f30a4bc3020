//! The reference model: plain Rust that predicts what every step of a schedule returns and
//! what is stored after it, following SPEC sections 4 and 6 literally.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::exec::Exec;
use super::schedule::{Op, ScheduleConfig};
use super::topic_model::TopicModel;
use super::trace::{
    Dead, Label, Live, LiveState, OutcomeKind, Row, Seen, Snapshot, count_of, take_labels,
};

#[derive(Debug, Clone)]
struct Held {
    token: usize,
    at_ms: i64,
    by: Option<u8>,
}

#[derive(Debug, Clone)]
struct Msg {
    queue: u8,
    next_ms: i64,
    attempts: i32,
    deliveries: i32,
    held: Option<Held>,
}

/// The model's state. Time is milliseconds since the schedule started.
#[derive(Debug)]
pub struct Model {
    config: ScheduleConfig,
    now_ms: i64,
    next_label: Label,
    next_token: usize,
    msgs: BTreeMap<Label, Msg>,
    dead: BTreeMap<Label, Dead>,
    /// Registered members and their `last_active`.
    members: BTreeMap<u8, i64>,
    crashed: Vec<u8>,
    /// Every lease handed out: (label, token).
    leases: Vec<(Label, usize)>,
    /// Lease indices of every non-empty batch.
    batches: Vec<Vec<usize>>,
    topics: TopicModel,
}

impl Model {
    /// An empty store at time 0.
    pub fn new(config: ScheduleConfig) -> Self {
        Model {
            config,
            now_ms: 0,
            next_label: 0,
            next_token: 0,
            msgs: BTreeMap::new(),
            dead: BTreeMap::new(),
            members: BTreeMap::new(),
            crashed: Vec::new(),
            leases: Vec::new(),
            batches: Vec::new(),
            topics: TopicModel::default(),
        }
    }

    fn queue_index(&self, name: &str) -> u8 {
        name.trim_start_matches('q').parse().unwrap_or(0)
    }

    /// Picks up to `limit` rows of `queues` that are ready or `stale`, in
    /// `(next_attempt_at, id)` order; buries the exhausted ones and leases the rest.
    fn take(
        &mut self,
        queues: &[u8],
        limit: u8,
        by: Option<u8>,
        stale: impl Fn(&Held) -> bool,
    ) -> Seen {
        let now = self.now_ms;
        let mut eligible: Vec<(i64, Label)> = self
            .msgs
            .iter()
            .filter(|(_, m)| queues.contains(&m.queue))
            .filter(|(_, m)| match &m.held {
                None => m.next_ms <= now,
                Some(h) => stale(h),
            })
            .map(|(l, m)| (m.next_ms, *l))
            .collect();
        eligible.sort();
        eligible.truncate(usize::from(limit));
        let token = self.next_token;
        self.next_token += 1;
        let max = i32::try_from(self.config.max_deliveries).unwrap_or(i32::MAX);
        let mut rows = Vec::new();
        for (_, label) in eligible {
            let Some(m) = self.msgs.get_mut(&label) else {
                continue;
            };
            if m.deliveries >= max {
                let (attempts, deliveries) = (m.attempts, m.deliveries);
                self.bury(label, attempts, deliveries);
                continue;
            }
            m.deliveries += 1;
            m.held = Some(Held {
                token,
                at_ms: now,
                by,
            });
            rows.push(Row {
                label,
                queue: format!("q{}", m.queue),
                attempts: m.attempts,
                deliveries: m.deliveries,
                next_ms: m.next_ms,
                lease: 0,
            });
        }
        rows.sort_by_key(|r| (r.next_ms, r.label));
        for row in &mut rows {
            row.lease = self.leases.len();
            self.leases.push((row.label, token));
        }
        let batch = (!rows.is_empty()).then(|| {
            self.batches.push(rows.iter().map(|r| r.lease).collect());
            self.batches.len() - 1
        });
        Seen::Delivered { by, batch, rows }
    }

    /// Moves `label` to the dead-letter table with these counts.
    fn bury(&mut self, label: Label, attempts: i32, deliveries: i32) {
        self.msgs.remove(&label);
        self.dead.insert(
            label,
            Dead {
                label,
                attempts,
                deliveries,
            },
        );
    }

    /// The message `lease` still holds, if its token is current.
    fn holding(&mut self, lease: usize) -> Option<&mut Msg> {
        let (label, token) = self.leases[lease];
        self.msgs
            .get_mut(&label)
            .filter(|m| m.held.as_ref().is_some_and(|h| h.token == token))
    }

    fn outcome(&mut self, kind: OutcomeKind, index: u16, delay_s: u8) -> Seen {
        if self.leases.is_empty() {
            return Seen::Skipped;
        }
        let lease = usize::from(index) % self.leases.len();
        let label = self.leases[lease].0;
        let now = self.now_ms;
        let Some(m) = self.holding(lease) else {
            return Seen::Outcome {
                kind,
                lease,
                label,
                done: false,
            };
        };
        match kind {
            OutcomeKind::Ack => {
                self.msgs.remove(&label);
            }
            OutcomeKind::Retry => {
                m.attempts += 1;
                m.next_ms = now + i64::from(delay_s) * 1000;
                m.held = None;
            }
            OutcomeKind::DeadLetter => {
                let (attempts, deliveries) = (m.attempts + 1, m.deliveries);
                self.bury(label, attempts, deliveries);
            }
            OutcomeKind::Release => {
                m.held = None;
                m.deliveries = (m.deliveries - 1).max(0);
            }
            OutcomeKind::Renew => {
                if let Some(h) = m.held.as_mut() {
                    h.at_ms = now;
                }
            }
        }
        Seen::Outcome {
            kind,
            lease,
            label,
            done: true,
        }
    }

    fn unregister(&mut self, member: u8, requeue: bool) -> Seen {
        let result = if !self.members.contains_key(&member) {
            Ok(false)
        } else {
            let held: Vec<Label> = self
                .msgs
                .iter()
                .filter(|(_, m)| m.held.as_ref().is_some_and(|h| h.by == Some(member)))
                .map(|(l, _)| *l)
                .collect();
            if !requeue && !held.is_empty() {
                Err(held.len() as i64)
            } else {
                let max =
                    i32::try_from(self.config.requeue_max_attempts.max(1)).unwrap_or(i32::MAX);
                for label in held {
                    let Some(m) = self.msgs.get_mut(&label) else {
                        continue;
                    };
                    if m.attempts + 1 >= max {
                        let (attempts, deliveries) = (m.attempts + 1, m.deliveries);
                        self.bury(label, attempts, deliveries);
                    } else {
                        m.attempts += 1;
                        m.next_ms = self.now_ms;
                        m.held = None;
                    }
                }
                self.members.remove(&member);
                Ok(true)
            }
        };
        Seen::Unregistered {
            member,
            requeue,
            result,
        }
    }
}

#[async_trait]
impl Exec for Model {
    async fn apply(&mut self, op: &Op) -> Result<Seen, String> {
        let config = self.config.clone();
        let now = self.now_ms;
        Ok(match *op {
            Op::Subscribe { sub } => self.topics.subscribe(&config, sub),
            Op::Unsubscribe { sub, discard } => self.topics.unsubscribe(&config, sub, discard),
            Op::PublishTopic {
                topic,
                ref keys,
                commit,
            } => {
                let labels = take_labels(&mut self.next_label, count_of(keys));
                self.topics.publish(&config, topic, labels, keys, commit)
            }
            Op::TopicReceive { sub, limit } => self.topics.receive(&config, sub, limit, now),
            Op::TopicSettle {
                lease,
                kind,
                delay_s,
            } => self.topics.settle(&config, lease, kind, delay_s, now),
            Op::TopicAckBatch { batch } => self.topics.ack_batch(&config, batch, now),
            Op::Publish {
                queue,
                count,
                delay_s,
                commit,
            } => {
                let labels = take_labels(&mut self.next_label, count);
                if commit {
                    for &label in &labels {
                        self.msgs.insert(
                            label,
                            Msg {
                                queue: queue % config.queues.max(1),
                                next_ms: self.now_ms + i64::from(delay_s) * 1000,
                                attempts: 0,
                                deliveries: 0,
                                held: None,
                            },
                        );
                    }
                }
                Seen::Published {
                    labels,
                    committed: commit,
                }
            }
            Op::Fetch { queues, limit } => {
                let queues: Vec<u8> = config
                    .queues_of(queues)
                    .iter()
                    .map(|q| self.queue_index(q))
                    .collect();
                let cutoff = self.now_ms - i64::from(config.lease_ttl_s) * 1000;
                self.take(&queues, limit, None, |h| h.at_ms < cutoff)
            }
            Op::Receive { member, limit } => {
                let member = member % config.members.max(1);
                if self.crashed.contains(&member) {
                    return Ok(Seen::Skipped);
                }
                // A receive refreshes a heartbeat older than `CoopReceive::heartbeat_refresh`.
                let refresh_ms = (i64::from(config.dead_interval_s) * 250).min(
                    i64::try_from(postbox_core::coop::HEARTBEAT_REFRESH.as_millis())
                        .unwrap_or(i64::MAX),
                );
                let now_ms = self.now_ms;
                let at = self.members.entry(member).or_insert(now_ms);
                if *at <= now_ms - refresh_ms {
                    *at = now_ms;
                }
                let cutoff = self.now_ms - i64::from(config.dead_interval_s) * 1000;
                let dead: Vec<u8> = self
                    .members
                    .iter()
                    .filter(|(m, at)| **m != member && **at < cutoff)
                    .map(|(m, _)| *m)
                    .collect();
                let queues: Vec<u8> = (0..config.queues.max(1)).collect();
                self.take(&queues, limit, Some(member), |h| {
                    h.by.is_some_and(|b| dead.contains(&b))
                })
            }
            Op::Ack { lease } => self.outcome(OutcomeKind::Ack, lease, 0),
            Op::Retry { lease, delay_s } => self.outcome(OutcomeKind::Retry, lease, delay_s),
            Op::DeadLetter { lease } => self.outcome(OutcomeKind::DeadLetter, lease, 0),
            Op::Release { lease } => self.outcome(OutcomeKind::Release, lease, 0),
            Op::Renew { lease } => self.outcome(OutcomeKind::Renew, lease, 0),
            Op::AckBatch { batch } => {
                if self.batches.is_empty() {
                    return Ok(Seen::Skipped);
                }
                let batch = usize::from(batch) % self.batches.len();
                let mut labels = Vec::new();
                for lease in self.batches[batch].clone() {
                    if self.holding(lease).is_some() {
                        let label = self.leases[lease].0;
                        self.msgs.remove(&label);
                        labels.push(label);
                    }
                }
                labels.sort_unstable();
                Seen::AckedBatch { batch, labels }
            }
            Op::Touch { member } => {
                let member = member % config.members.max(1);
                if self.crashed.contains(&member) {
                    return Ok(Seen::Skipped);
                }
                let done = match self.members.get_mut(&member) {
                    Some(at) => {
                        *at = self.now_ms;
                        true
                    }
                    None => false,
                };
                Seen::Touched { member, done }
            }
            Op::Crash { member } => {
                let member = member % config.members.max(1);
                if !self.crashed.contains(&member) {
                    self.crashed.push(member);
                }
                Seen::Crashed { member }
            }
            Op::Unregister { member, requeue } => {
                let member = member % config.members.max(1);
                if self.crashed.contains(&member) {
                    return Ok(Seen::Skipped);
                }
                self.unregister(member, requeue)
            }
            Op::Advance { secs } => {
                self.now_ms += i64::from(secs) * 1000;
                Seen::Advanced {
                    secs: u32::from(secs),
                }
            }
        })
    }

    async fn snapshot(&mut self) -> Result<Snapshot, String> {
        let now = self.now_ms;
        Ok(Snapshot {
            live: self
                .msgs
                .iter()
                .map(|(label, m)| Live {
                    label: *label,
                    queue: format!("q{}", m.queue),
                    attempts: m.attempts,
                    deliveries: m.deliveries,
                    next_ms: m.next_ms,
                    state: match &m.held {
                        Some(_) => LiveState::Leased,
                        None if m.next_ms <= now => LiveState::Ready,
                        None => LiveState::Scheduled,
                    },
                    holder: m
                        .held
                        .as_ref()
                        .and_then(|h| h.by)
                        .map(|b| format!("{}/m{b}", super::GROUP)),
                })
                .collect(),
            dead: self.dead.values().cloned().collect(),
            subs: self.topics.snapshot(&self.config),
        })
    }
}
