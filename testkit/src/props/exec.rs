//! Running a schedule: on the model or on any backend, with the same final drain.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use postbox_core::coop::{CoopReceive, Unregister};
use postbox_core::topic::{Published, Receive, Settlement, Subscribed, Unsubscribe};
use postbox_core::{
    Backend, Error, FetchParams, Lease, Member, Message, MessageId, MessageState, RetryParams,
    Topics,
};

use super::GROUP;
use super::schedule::{Op, Schedule, ScheduleConfig};
use super::trace::{
    Dead, Label, Live, LiveState, OutcomeKind, Row, Seen, Snapshot, Step, SubState, Trace,
    count_of, take_labels,
};
use crate::TimeControl;

/// Something a schedule runs on: the [`Model`](super::Model) or a [`BackendExec`].
#[async_trait]
pub trait Exec: Send {
    /// Runs one operation and reports what it returned.
    ///
    /// # Errors
    ///
    /// An unexpected error from the backend, described.
    async fn apply(&mut self, op: &Op) -> Result<Seen, String>;

    /// Everything stored now.
    ///
    /// # Errors
    ///
    /// An error reading the backend, described.
    async fn snapshot(&mut self) -> Result<Snapshot, String>;
}

/// Drain rounds before a run gives up (each leases up to 50 rows; a drained schedule needs
/// far fewer).
const MAX_DRAIN_ROUNDS: usize = 200;

/// Runs `schedule` on `exec`, then drains: advances past every lease, dead interval and
/// delay, fetches everything and acks it, and receives and acks every subscription's
/// messages, until the outbox table is empty and no subscription has a backlog.
///
/// # Errors
///
/// A backend error, or a drain that does not finish.
pub async fn run(exec: &mut dyn Exec, schedule: &Schedule) -> Result<Trace, String> {
    let mut trace = Trace::default();
    for op in &schedule.ops {
        let seen = exec.apply(op).await?;
        let after = exec.snapshot().await?;
        trace.steps.push(Step {
            op: format!("{op:?}"),
            seen,
            after,
        });
    }
    let advance = Op::Advance {
        secs: u16::try_from(schedule.config.drain_step_s()).unwrap_or(u16::MAX),
    };
    let fetch = Op::Fetch {
        queues: 0,
        limit: 50,
    };
    for _ in 0..MAX_DRAIN_ROUNDS {
        let subs: Vec<u8> = match trace.steps.last() {
            Some(s) if s.after.live.is_empty() && s.after.subs.iter().all(|s| s.backlog == 0) => {
                return Ok(trace);
            }
            Some(s) => s.after.subs.iter().map(|s| s.sub).collect(),
            None => Vec::new(),
        };
        let receives = subs
            .into_iter()
            .map(|sub| Op::TopicReceive { sub, limit: 50 });
        for op in [advance.clone(), fetch.clone()].into_iter().chain(receives) {
            let seen = exec.apply(&op).await?;
            let ack = match &seen {
                Seen::Delivered {
                    batch: Some(batch), ..
                } => Some(Op::AckBatch {
                    batch: u16::try_from(*batch).map_err(|_| "too many batches".to_owned())?,
                }),
                Seen::Received {
                    batch: Some(batch), ..
                } => Some(Op::TopicAckBatch {
                    batch: u16::try_from(*batch).map_err(|_| "too many batches".to_owned())?,
                }),
                _ => None,
            };
            let after = exec.snapshot().await?;
            trace.steps.push(Step {
                op: format!("drain: {op:?}"),
                seen,
                after,
            });
            if let Some(op) = ack {
                let seen = exec.apply(&op).await?;
                let after = exec.snapshot().await?;
                trace.steps.push(Step {
                    op: format!("drain: {op:?}"),
                    seen,
                    after,
                });
            }
        }
    }
    Err(format!(
        "the drain did not empty the outbox table and every subscription in {MAX_DRAIN_ROUNDS} rounds"
    ))
}

/// Runs schedules on a real backend: labels travel as payloads, the backend's clock is
/// pinned and moved only by `Advance` steps (Postgres: the `test-util` clock every statement
/// reads, so no test waits for real time to pass).
pub struct BackendExec<B: Backend + TimeControl + Topics> {
    backend: B,
    config: ScheduleConfig,
    start: DateTime<Utc>,
    next_label: Label,
    leases: Vec<(Label, Lease)>,
    batches: Vec<Vec<usize>>,
    crashed: HashSet<u8>,
    labels: HashMap<MessageId, Label>,
    /// Topic leases: (subscription, label, lease).
    topic_leases: Vec<(u8, Label, Lease)>,
    /// Per topic receive that delivered anything: its subscription and lease indices.
    topic_batches: Vec<(u8, Vec<usize>)>,
    /// Committed topic messages (ids are a sequence of their own).
    topic_labels: HashMap<MessageId, Label>,
}

impl<B: Backend + TimeControl + Topics> BackendExec<B> {
    /// Pins `backend`'s clock and starts a run on it. The backend should be empty (a fresh
    /// fixture database, or a new `FakeBroker` on a paused tokio runtime: the fake's clock
    /// otherwise moves with real time between steps).
    ///
    /// # Errors
    ///
    /// A backend error reading or pinning its clock.
    pub async fn new(backend: B, config: ScheduleConfig) -> Result<Self, String> {
        backend.advance(Duration::ZERO).await.map_err(describe)?;
        let start = backend.now().await.map_err(describe)?;
        Ok(BackendExec {
            backend,
            config,
            start,
            next_label: 0,
            leases: Vec::new(),
            batches: Vec::new(),
            crashed: HashSet::new(),
            labels: HashMap::new(),
            topic_leases: Vec::new(),
            topic_batches: Vec::new(),
            topic_labels: HashMap::new(),
        })
    }

    fn ms(&self, at: DateTime<Utc>) -> i64 {
        (at - self.start).num_milliseconds()
    }

    fn member(&self, index: u8) -> Result<Member, String> {
        Member::new(GROUP, format!("m{index}")).map_err(describe)
    }

    fn label_of(&self, id: MessageId, payload: &[u8]) -> Result<Label, String> {
        if let Some(label) = self.labels.get(&id) {
            return Ok(*label);
        }
        payload_label(payload).ok_or_else(|| format!("message {id} has no label payload"))
    }

    fn delivered(
        &mut self,
        by: Option<u8>,
        deliveries: Vec<postbox_core::Delivery>,
    ) -> Result<Seen, String> {
        let mut rows = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            let label = self.label_of(d.id, &d.payload)?;
            rows.push(Row {
                label,
                queue: d.queue.clone(),
                attempts: d.attempts,
                deliveries: d.deliveries,
                next_ms: self.ms(d.next_attempt_at),
                lease: self.leases.len(),
            });
            self.leases.push((label, d.lease()));
        }
        let batch = (!rows.is_empty()).then(|| {
            self.batches.push(rows.iter().map(|r| r.lease).collect());
            self.batches.len() - 1
        });
        Ok(Seen::Delivered { by, batch, rows })
    }

    async fn outcome(
        &mut self,
        kind: OutcomeKind,
        index: u16,
        delay_s: u8,
    ) -> Result<Seen, String> {
        if self.leases.is_empty() {
            return Ok(Seen::Skipped);
        }
        let lease = usize::from(index) % self.leases.len();
        let (label, l) = self.leases[lease];
        let b = &self.backend;
        let done = match kind {
            OutcomeKind::Ack => b.ack(l).await,
            OutcomeKind::Retry => {
                b.retry(
                    l,
                    RetryParams::new(Duration::from_secs(u64::from(delay_s))).error("schedule"),
                )
                .await
            }
            OutcomeKind::DeadLetter => b.dead_letter(l, "schedule").await,
            OutcomeKind::Release => b.release(l).await,
            OutcomeKind::Renew => b.renew_lease(l).await,
        }
        .map_err(describe)?;
        Ok(Seen::Outcome {
            kind,
            lease,
            label,
            done,
        })
    }
}

impl<B: Backend + TimeControl + Topics> BackendExec<B> {
    async fn publish_topic(
        &mut self,
        topic: u8,
        keys: &[Option<u8>],
        commit: bool,
    ) -> Result<Seen, String> {
        let topic = topic % self.config.topics.max(1);
        let labels = take_labels(&mut self.next_label, count_of(keys));
        let messages = labels
            .iter()
            .zip(keys)
            .map(|(l, key)| {
                let m = Message::new(self.config.topic(topic), l.to_string());
                match key {
                    Some(k) => m.idempotency_key(format!("k{k}")),
                    None => m,
                }
            })
            .collect();
        let mut tx = self.backend.begin().await.map_err(describe)?;
        let published = self
            .backend
            .publish_to_topics(&mut tx, messages)
            .await
            .map_err(describe)?;
        let mut mine = HashMap::new();
        let mut resolved = Vec::with_capacity(labels.len());
        for (label, p) in labels.iter().zip(published) {
            match p {
                Published::New(id) => {
                    mine.insert(id, *label);
                    resolved.push(*label);
                }
                Published::Duplicate(id) => {
                    let first = mine
                        .get(&id)
                        .or_else(|| self.topic_labels.get(&id))
                        .ok_or_else(|| format!("publish returned Duplicate of unknown id {id}"))?;
                    resolved.push(*first);
                }
            }
        }
        if commit {
            self.backend.commit(tx).await.map_err(describe)?;
            self.topic_labels.extend(mine);
        } else {
            self.backend.rollback(tx).await.map_err(describe)?;
        }
        Ok(Seen::TopicPublished {
            topic,
            labels,
            resolved,
            committed: commit,
        })
    }

    async fn topic_receive(&mut self, sub: u8, limit: u8) -> Result<Seen, String> {
        let sub = self.config.sub_index(sub);
        let params = Receive::new(self.config.subscription(sub), u32::from(limit))
            .lease_ttl(Duration::from_secs(u64::from(self.config.lease_ttl_s)))
            .max_deliveries(self.config.max_deliveries);
        let got = match self.backend.receive(&params).await {
            Ok(got) => got,
            Err(Error::UnknownSubscription { .. }) => {
                return Ok(Seen::Received {
                    sub,
                    batch: None,
                    rows: Vec::new(),
                    known: false,
                });
            }
            Err(other) => return Err(describe(other)),
        };
        let mut rows = Vec::with_capacity(got.len());
        for d in got {
            let label = topic_label(&d.payload)?;
            rows.push(Row {
                label,
                queue: d.queue.clone(),
                attempts: d.attempts,
                deliveries: d.deliveries,
                next_ms: self.ms(d.next_attempt_at),
                lease: self.topic_leases.len(),
            });
            self.topic_leases.push((sub, label, d.lease()));
        }
        let batch = (!rows.is_empty()).then(|| {
            self.topic_batches
                .push((sub, rows.iter().map(|r| r.lease).collect()));
            self.topic_batches.len() - 1
        });
        Ok(Seen::Received {
            sub,
            batch,
            rows,
            known: true,
        })
    }

    async fn topic_settle(
        &mut self,
        index: u16,
        kind: OutcomeKind,
        delay_s: u8,
    ) -> Result<Seen, String> {
        if self.topic_leases.is_empty() {
            return Ok(Seen::Skipped);
        }
        let lease = usize::from(index) % self.topic_leases.len();
        let (sub, label, l) = self.topic_leases[lease];
        let settlement = match kind {
            OutcomeKind::Ack => Settlement::Ack,
            OutcomeKind::Retry => Settlement::Retry(
                RetryParams::new(Duration::from_secs(u64::from(delay_s))).error("schedule"),
            ),
            OutcomeKind::DeadLetter => Settlement::DeadLetter("schedule".into()),
            OutcomeKind::Release => Settlement::Release,
            OutcomeKind::Renew => Settlement::Renew,
        };
        let done = self
            .backend
            .settle(&[l], settlement)
            .await
            .map_err(describe)?;
        Ok(Seen::TopicSettled {
            sub,
            kind,
            lease,
            label,
            done: !done.is_empty(),
        })
    }

    async fn topic_ack_batch(&mut self, index: u16) -> Result<Seen, String> {
        if self.topic_batches.is_empty() {
            return Ok(Seen::Skipped);
        }
        let batch = usize::from(index) % self.topic_batches.len();
        let (sub, leases) = &self.topic_batches[batch];
        let leases: Vec<(Label, Lease)> = leases
            .iter()
            .map(|i| (self.topic_leases[*i].1, self.topic_leases[*i].2))
            .collect();
        let only: Vec<Lease> = leases.iter().map(|(_, l)| *l).collect();
        let acked = self
            .backend
            .settle(&only, Settlement::Ack)
            .await
            .map_err(describe)?;
        let mut labels = Vec::with_capacity(acked.len());
        for id in acked {
            let label = leases
                .iter()
                .find(|(_, l)| l.id == id)
                .map(|(label, _)| *label)
                .ok_or_else(|| format!("settle returned unknown id {id}"))?;
            labels.push(label);
        }
        labels.sort_unstable();
        Ok(Seen::TopicAckedBatch {
            sub: *sub,
            batch,
            labels,
        })
    }

    async fn subscriptions(&self) -> Result<Vec<SubState>, String> {
        let mut subs = Vec::new();
        for info in self.backend.subscriptions(None).await.map_err(describe)? {
            let sub = info
                .name
                .strip_prefix('s')
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("unexpected subscription {}", info.name))?;
            let mut dead = Vec::new();
            for d in self
                .backend
                .subscription_dead_letters(&info.name)
                .await
                .map_err(describe)?
            {
                dead.push(Dead {
                    label: topic_label(&d.payload)?,
                    attempts: d.attempts,
                    deliveries: d.deliveries,
                });
            }
            dead.sort_by_key(|d| d.label);
            subs.push(SubState {
                sub,
                backlog: info.backlog,
                dead,
            });
        }
        subs.sort_by_key(|s| s.sub);
        Ok(subs)
    }
}

/// The label a schedule's message carries as its payload.
fn payload_label(payload: &[u8]) -> Option<Label> {
    std::str::from_utf8(payload).ok()?.parse().ok()
}

fn topic_label(payload: &[u8]) -> Result<Label, String> {
    payload_label(payload).ok_or_else(|| "a topic message has no label payload".to_owned())
}

fn describe(error: Error) -> String {
    format!("backend error: {error}")
}

#[async_trait]
impl<B: Backend + TimeControl + Topics> Exec for BackendExec<B> {
    async fn apply(&mut self, op: &Op) -> Result<Seen, String> {
        let config = self.config.clone();
        match *op {
            Op::Subscribe { sub } => {
                let sub = config.sub_index(sub);
                let got = self
                    .backend
                    .subscribe(
                        &config.topic(config.topic_of(sub)),
                        &config.subscription(sub),
                    )
                    .await
                    .map_err(describe)?;
                Ok(Seen::Subscribed {
                    sub,
                    new: got == Subscribed::New,
                })
            }
            Op::Unsubscribe { sub, discard } => {
                let sub = config.sub_index(sub);
                let pending = if discard {
                    Unsubscribe::Discard
                } else {
                    Unsubscribe::IfDrained
                };
                let result = match self
                    .backend
                    .unsubscribe(&config.subscription(sub), pending)
                    .await
                {
                    Ok(existed) => Ok(existed),
                    Err(Error::SubscriptionNotDrained { backlog, .. }) => Err(backlog),
                    Err(other) => return Err(describe(other)),
                };
                Ok(Seen::Unsubscribed {
                    sub,
                    discard,
                    result,
                })
            }
            Op::PublishTopic {
                topic,
                ref keys,
                commit,
            } => self.publish_topic(topic, keys, commit).await,
            Op::TopicReceive { sub, limit } => self.topic_receive(sub, limit).await,
            Op::TopicSettle {
                lease,
                kind,
                delay_s,
            } => self.topic_settle(lease, kind, delay_s).await,
            Op::TopicAckBatch { batch } => self.topic_ack_batch(batch).await,
            Op::Publish {
                queue,
                count,
                delay_s,
                commit,
            } => {
                let labels = take_labels(&mut self.next_label, count);
                let messages = labels
                    .iter()
                    .map(|l| {
                        Message::new(config.queue(queue), l.to_string())
                            .delay(Duration::from_secs(u64::from(delay_s)))
                    })
                    .collect();
                let mut tx = self.backend.begin().await.map_err(describe)?;
                let ids = self
                    .backend
                    .publish_batch(&mut tx, messages)
                    .await
                    .map_err(describe)?;
                if commit {
                    self.backend.commit(tx).await.map_err(describe)?;
                    self.labels
                        .extend(ids.into_iter().zip(labels.iter().copied()));
                } else {
                    self.backend.rollback(tx).await.map_err(describe)?;
                }
                Ok(Seen::Published {
                    labels,
                    committed: commit,
                })
            }
            Op::Fetch { queues, limit } => {
                let params = FetchParams::new(config.queues_of(queues), u32::from(limit))
                    .lease_ttl(Duration::from_secs(u64::from(config.lease_ttl_s)))
                    .max_deliveries(config.max_deliveries);
                let got = self.backend.fetch(&params).await.map_err(describe)?;
                self.delivered(None, got)
            }
            Op::Receive { member, limit } => {
                let member = member % config.members.max(1);
                if self.crashed.contains(&member) {
                    return Ok(Seen::Skipped);
                }
                let params =
                    CoopReceive::new(self.member(member)?, config.all_queues(), u32::from(limit))
                        .dead_interval(Duration::from_secs(u64::from(config.dead_interval_s)))
                        .max_deliveries(config.max_deliveries);
                let got = self.backend.coop_receive(&params).await.map_err(describe)?;
                self.delivered(Some(member), got)
            }
            Op::Ack { lease } => self.outcome(OutcomeKind::Ack, lease, 0).await,
            Op::Retry { lease, delay_s } => self.outcome(OutcomeKind::Retry, lease, delay_s).await,
            Op::DeadLetter { lease } => self.outcome(OutcomeKind::DeadLetter, lease, 0).await,
            Op::Release { lease } => self.outcome(OutcomeKind::Release, lease, 0).await,
            Op::Renew { lease } => self.outcome(OutcomeKind::Renew, lease, 0).await,
            Op::AckBatch { batch } => {
                if self.batches.is_empty() {
                    return Ok(Seen::Skipped);
                }
                let batch = usize::from(batch) % self.batches.len();
                let leases: Vec<Lease> = self.batches[batch]
                    .iter()
                    .map(|i| self.leases[*i].1)
                    .collect();
                let acked = self.backend.ack_batch(&leases).await.map_err(describe)?;
                let mut labels = Vec::with_capacity(acked.len());
                for id in acked {
                    let label = self
                        .leases
                        .iter()
                        .find(|(_, l)| l.id == id)
                        .map(|(label, _)| *label)
                        .ok_or_else(|| format!("ack_batch returned unknown id {id}"))?;
                    labels.push(label);
                }
                labels.sort_unstable();
                Ok(Seen::AckedBatch { batch, labels })
            }
            Op::Touch { member } => {
                let member = member % config.members.max(1);
                if self.crashed.contains(&member) {
                    return Ok(Seen::Skipped);
                }
                let done = self
                    .backend
                    .coop_touch(&self.member(member)?)
                    .await
                    .map_err(describe)?;
                Ok(Seen::Touched { member, done })
            }
            Op::Crash { member } => {
                let member = member % config.members.max(1);
                self.crashed.insert(member);
                Ok(Seen::Crashed { member })
            }
            Op::Unregister { member, requeue } => {
                let member = member % config.members.max(1);
                if self.crashed.contains(&member) {
                    return Ok(Seen::Skipped);
                }
                let handling = if requeue {
                    Unregister::Requeue {
                        max_attempts: config.requeue_max_attempts,
                    }
                } else {
                    Unregister::Fail
                };
                let result = match self
                    .backend
                    .coop_unregister(&self.member(member)?, handling)
                    .await
                {
                    Ok(removed) => Ok(removed),
                    Err(Error::MemberHoldsMessages { held, .. }) => Err(held),
                    Err(other) => return Err(describe(other)),
                };
                Ok(Seen::Unregistered {
                    member,
                    requeue,
                    result,
                })
            }
            Op::Advance { secs } => {
                self.backend
                    .advance(Duration::from_secs(u64::from(secs)))
                    .await
                    .map_err(describe)?;
                Ok(Seen::Advanced {
                    secs: u32::from(secs),
                })
            }
        }
    }

    async fn snapshot(&mut self) -> Result<Snapshot, String> {
        let stored = self.backend.messages(None).await.map_err(describe)?;
        let mut live = Vec::with_capacity(stored.len());
        for m in stored {
            live.push(Live {
                label: self.label_of(m.id, &m.payload)?,
                queue: m.queue.clone(),
                attempts: m.attempts,
                deliveries: m.deliveries,
                next_ms: self.ms(m.next_attempt_at),
                state: match m.state {
                    MessageState::Ready => LiveState::Ready,
                    MessageState::Scheduled => LiveState::Scheduled,
                    _ => LiveState::Leased,
                },
                holder: m.acquired_by.clone(),
            });
        }
        live.sort_by_key(|l| l.label);
        let mut dead = Vec::new();
        for d in self.backend.dead_letters(None).await.map_err(describe)? {
            dead.push(Dead {
                label: self.label_of(d.id, &d.payload)?,
                attempts: d.attempts,
                deliveries: d.deliveries,
            });
        }
        dead.sort_by_key(|d| d.label);
        let subs = self.subscriptions().await?;
        Ok(Snapshot { live, dead, subs })
    }
}
