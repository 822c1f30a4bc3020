//! Running a schedule: on the model or on any backend, with the same final drain.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use postbox_core::{
    CoopReceive, Error, FetchParams, Lease, Member, Message, MessageId, MessageState, RetryParams,
    Unregister,
};

use super::GROUP;
use super::schedule::{Op, Schedule, ScheduleConfig};
use super::trace::{
    Dead, Label, Live, LiveState, OutcomeKind, Row, Seen, Snapshot, Step, Trace, take_labels,
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
/// delay, fetches everything and acks it, until the outbox table is empty.
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
        if trace.steps.last().is_some_and(|s| s.after.live.is_empty()) {
            return Ok(trace);
        }
        for op in [advance.clone(), fetch.clone()] {
            let seen = exec.apply(&op).await?;
            let batch = match &seen {
                Seen::Delivered { batch, .. } => *batch,
                _ => None,
            };
            let after = exec.snapshot().await?;
            trace.steps.push(Step {
                op: format!("drain: {op:?}"),
                seen,
                after,
            });
            if let Some(batch) = batch {
                let op = Op::AckBatch {
                    batch: u16::try_from(batch).map_err(|_| "too many batches".to_owned())?,
                };
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
        "the drain did not empty the outbox table in {MAX_DRAIN_ROUNDS} rounds"
    ))
}

/// Runs schedules on a real backend: labels travel as payloads, the backend's clock is
/// pinned and moved only by `Advance` steps (Postgres: the `test-util` clock every statement
/// reads, so no test waits for real time to pass).
pub struct BackendExec<B: TimeControl> {
    backend: B,
    config: ScheduleConfig,
    start: DateTime<Utc>,
    next_label: Label,
    leases: Vec<(Label, Lease)>,
    batches: Vec<Vec<usize>>,
    crashed: HashSet<u8>,
    labels: HashMap<MessageId, Label>,
}

impl<B: TimeControl> BackendExec<B> {
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
        std::str::from_utf8(payload)
            .ok()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("message {id} has no label payload"))
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

fn describe(error: Error) -> String {
    format!("backend error: {error}")
}

#[async_trait]
impl<B: TimeControl> Exec for BackendExec<B> {
    async fn apply(&mut self, op: &Op) -> Result<Seen, String> {
        let config = self.config.clone();
        match *op {
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
        Ok(Snapshot { live, dead })
    }
}
