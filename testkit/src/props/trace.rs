//! What running a schedule shows: one observation and one state snapshot per step, in terms
//! every backend shares (message labels, lease and batch indices, milliseconds since start).

use std::fmt;

/// A message's label: its publish order in the schedule (0, 1, ...), carried as its payload.
pub type Label = u32;

/// The next `count` labels from `next`, which moves past them: the model and every executor
/// number published messages the same way, so their traces compare label for label.
pub(crate) fn take_labels(next: &mut Label, count: u8) -> Vec<Label> {
    let labels = (0..u32::from(count)).map(|i| *next + i).collect();
    *next += u32::from(count);
    labels
}

/// How many messages a topic publish of `keys` writes (one per entry).
pub(crate) fn count_of(keys: &[Option<u8>]) -> u8 {
    u8::try_from(keys.len()).unwrap_or(u8::MAX)
}

/// Which fenced write an [`Seen::Outcome`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    /// `ack`.
    Ack,
    /// `retry`.
    Retry,
    /// `dead_letter`.
    DeadLetter,
    /// `release`.
    Release,
    /// `renew_lease`.
    Renew,
}

/// One delivered row, as a fetch or receive returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The message.
    pub label: Label,
    /// Its queue.
    pub queue: String,
    /// Retries recorded before this delivery.
    pub attempts: i32,
    /// Leases so far, this one included.
    pub deliveries: i32,
    /// `next_attempt_at`, in ms since the schedule started.
    pub next_ms: i64,
    /// The index of this lease, in hand-out order.
    pub lease: usize,
}

/// What one step returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A publish transaction: its labels, and whether it committed.
    Published {
        /// Labels, in publish order.
        labels: Vec<Label>,
        /// Committed (`true`) or rolled back.
        committed: bool,
    },
    /// A fetch (`by: None`) or a member's receive.
    Delivered {
        /// The receiving member, for a cooperative receive.
        by: Option<u8>,
        /// The batch index, when anything was delivered.
        batch: Option<usize>,
        /// The rows, in the order returned.
        rows: Vec<Row>,
    },
    /// A fenced write on one lease.
    Outcome {
        /// Which write.
        kind: OutcomeKind,
        /// The lease used.
        lease: usize,
        /// Its message.
        label: Label,
        /// Whether it took effect.
        done: bool,
    },
    /// `ack_batch` of one batch: the labels acked, sorted.
    AckedBatch {
        /// The batch.
        batch: usize,
        /// Labels acked.
        labels: Vec<Label>,
    },
    /// A member's heartbeat: whether it was registered.
    Touched {
        /// The member.
        member: u8,
        /// Whether it was registered.
        done: bool,
    },
    /// A member's unregistration: `Ok(removed)` or `Err(rows held)` for a refused `Fail`.
    Unregistered {
        /// The member.
        member: u8,
        /// Whether it requeued.
        requeue: bool,
        /// The result.
        result: Result<bool, i64>,
    },
    /// A member crashed.
    Crashed {
        /// The member.
        member: u8,
    },
    /// Time passed.
    Advanced {
        /// Seconds.
        secs: u32,
    },
    /// Nothing to act on (no lease or batch yet, or a crashed member).
    Skipped,
    /// `subscribe`: whether it created the subscription.
    Subscribed {
        /// The subscription.
        sub: u8,
        /// `Subscribed::New` (`true`) or `Existing`.
        new: bool,
    },
    /// `unsubscribe`: `Ok(existed)`, or `Err(backlog)` for a refused `IfDrained`.
    Unsubscribed {
        /// The subscription.
        sub: u8,
        /// Whether it discarded what was pending.
        discard: bool,
        /// The result.
        result: Result<bool, i64>,
    },
    /// A publish transaction to a topic.
    TopicPublished {
        /// The topic.
        topic: u8,
        /// Labels, in publish order.
        labels: Vec<Label>,
        /// For each message, the label of the message it resolved to: its own, or the one
        /// already holding its idempotency key.
        resolved: Vec<Label>,
        /// Committed (`true`) or rolled back.
        committed: bool,
    },
    /// A receive from a subscription.
    Received {
        /// The subscription.
        sub: u8,
        /// The topic-batch index, when anything was delivered.
        batch: Option<usize>,
        /// The rows, in the order returned (`lease` indexes the topic leases).
        rows: Vec<Row>,
        /// `false` when the subscription did not exist (`UnknownSubscription`).
        known: bool,
    },
    /// `settle` of one topic lease.
    TopicSettled {
        /// The subscription that handed the lease out.
        sub: u8,
        /// Which settlement.
        kind: OutcomeKind,
        /// The topic lease used.
        lease: usize,
        /// Its message.
        label: Label,
        /// Whether it took effect.
        done: bool,
    },
    /// `settle(Ack)` of every lease of one topic receive: the labels acked, sorted.
    TopicAckedBatch {
        /// The subscription that handed the batch out.
        sub: u8,
        /// The topic batch.
        batch: usize,
        /// Labels acked.
        labels: Vec<Label>,
    },
}

/// State of a message still in the outbox table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveState {
    /// Eligible now.
    Ready,
    /// Waiting for `next_attempt_at`.
    Scheduled,
    /// Leased.
    Leased,
}

/// A message still in the outbox table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// The message.
    pub label: Label,
    /// Its queue.
    pub queue: String,
    /// Retries recorded.
    pub attempts: i32,
    /// Leases so far.
    pub deliveries: i32,
    /// `next_attempt_at`, ms since start.
    pub next_ms: i64,
    /// Its state now.
    pub state: LiveState,
    /// The member holding it (`group/name`), if a member does.
    pub holder: Option<String>,
}

/// A dead-lettered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dead {
    /// The message.
    pub label: Label,
    /// Attempts recorded.
    pub attempts: i32,
    /// Leases.
    pub deliveries: i32,
}

/// A subscription as `subscriptions` and `subscription_dead_letters` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubState {
    /// The subscription's index.
    pub sub: u8,
    /// Messages neither acked nor dead-lettered.
    pub backlog: i64,
    /// Its dead letters, sorted by label.
    pub dead: Vec<Dead>,
}

/// Everything stored after a step, sorted by label (subscriptions by index).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Messages in the outbox table.
    pub live: Vec<Live>,
    /// Messages in the dead-letter table.
    pub dead: Vec<Dead>,
    /// The subscriptions that exist.
    pub subs: Vec<SubState>,
}

/// One step: the operation, what it returned, and the state after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The operation, as the schedule prints it (drain steps are prefixed `drain:`).
    pub op: String,
    /// What it returned.
    pub seen: Seen,
    /// The state after it.
    pub after: Snapshot,
}

/// Every step of a run, the final drain included.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// The steps, in order.
    pub steps: Vec<Step>,
}

impl Trace {
    /// `Ok` when `other` matches step for step; otherwise the first difference, with the
    /// steps before it, readable in a test failure.
    ///
    /// # Errors
    ///
    /// A description of the first step where the traces differ.
    pub fn compare(&self, other: &Trace, names: (&str, &str)) -> Result<(), String> {
        for (i, (a, b)) in self.steps.iter().zip(&other.steps).enumerate() {
            if a == b {
                continue;
            }
            let mut out = format!("traces differ at step {i} ({}):\n", a.op);
            if a.seen != b.seen {
                out += &format!(
                    "  {} returned {:?}\n  {} returned {:?}\n",
                    names.0, a.seen, names.1, b.seen
                );
            } else {
                out += &format!(
                    "  state after it, {}:\n{}  state after it, {}:\n{}",
                    names.0, a.after, names.1, b.after
                );
            }
            return Err(out);
        }
        if self.steps.len() != other.steps.len() {
            return Err(format!(
                "{} ran {} steps, {} ran {}",
                names.0,
                self.steps.len(),
                names.1,
                other.steps.len()
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.live {
            writeln!(
                f,
                "    live #{} {} attempts {} deliveries {} next {}ms {:?}{}",
                l.label,
                l.queue,
                l.attempts,
                l.deliveries,
                l.next_ms,
                l.state,
                l.holder
                    .as_deref()
                    .map(|h| format!(" held by {h}"))
                    .unwrap_or_default()
            )?;
        }
        for d in &self.dead {
            writeln!(
                f,
                "    dead #{} attempts {} deliveries {}",
                d.label, d.attempts, d.deliveries
            )?;
        }
        for s in &self.subs {
            writeln!(f, "    subscription s{} backlog {}", s.sub, s.backlog)?;
            for d in &s.dead {
                writeln!(
                    f,
                    "      dead #{} attempts {} deliveries {}",
                    d.label, d.attempts, d.deliveries
                )?;
            }
        }
        Ok(())
    }
}
