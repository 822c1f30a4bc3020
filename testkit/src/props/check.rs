//! The invariants of SPEC section 10, checked on what a run observed, independently of the
//! model: they hold for any correct backend whatever the schedule.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::schedule::ScheduleConfig;
use super::topic_check::TopicChecker;
use super::trace::{Label, OutcomeKind, Seen, Snapshot, Trace};

#[derive(Debug, Clone, Copy)]
struct Holder {
    lease: usize,
    at_ms: i64,
    by: Option<u8>,
}

#[derive(Default)]
struct Checker {
    now_ms: i64,
    /// The current lease of each leased message.
    holders: HashMap<Label, Holder>,
    /// Leases that lost their message to a takeover, or were settled.
    finished: HashSet<usize>,
    /// Members' `last_active`, as observed.
    active: HashMap<u8, i64>,
    attempts: HashMap<Label, i32>,
    deliveries: HashMap<Label, i32>,
    committed: BTreeSet<Label>,
    rolled_back: BTreeSet<Label>,
    acked: BTreeSet<Label>,
    topics: TopicChecker,
}

/// Checks every invariant on `trace` (which must end with the drain [`run`](super::run)
/// appends):
///
/// 1. no message is handed to a second holder while its current lease is live (not expired
///    for a plain fetch, holder not silent past the dead interval for a takeover);
/// 2. a write through a lost or settled lease never takes effect;
/// 3. rolled-back publishes are never delivered or stored;
/// 4. every fetch or receive returns rows in `(next_attempt_at, id)` order;
/// 5. `attempts` and `deliveries` count the retries, requeues, leases and releases seen;
/// 6. after the drain, every committed message was acked or dead-lettered, exactly one of
///    the two, and nothing else is stored;
/// 7. topics: a subscription receives exactly the messages committed to its topic while it
///    existed (no rolled-back publish, no duplicate of an idempotency key), never hands a
///    message to a second holder while a lease is live or again once settled, settles only
///    through the current lease, and after the drain acked or dead-lettered each of its
///    messages exactly once.
///
/// # Errors
///
/// The first violation, naming the step.
pub fn check(config: &ScheduleConfig, trace: &Trace) -> Result<(), String> {
    let mut c = Checker::default();
    for (i, step) in trace.steps.iter().enumerate() {
        c.step(config, &step.seen)
            .and_then(|()| c.topics.step(config, &step.seen, c.now_ms))
            .and_then(|()| c.topics.after(&step.after))
            .map_err(|e| format!("step {i} ({}): {e}", step.op))?;
        c.forget_gone(&step.after);
        for live in &step.after.live {
            if !c.committed.contains(&live.label) {
                return Err(format!(
                    "step {i} ({}): message #{} is stored but was never committed",
                    step.op, live.label
                ));
            }
        }
    }
    let last = trace.steps.last().map(|s| &s.after);
    let live = last.map_or(0, |s| s.live.len());
    if live > 0 {
        return Err(format!("{live} message(s) still stored after the drain"));
    }
    let dead: BTreeSet<Label> = last
        .map(|s| s.dead.iter().map(|d| d.label).collect())
        .unwrap_or_default();
    if let Some(both) = dead.intersection(&c.acked).next() {
        return Err(format!("message #{both} was acked and dead-lettered"));
    }
    if let Some(last) = last {
        c.topics.finish(last)?;
    }
    let settled: BTreeSet<Label> = dead.union(&c.acked).copied().collect();
    if settled != c.committed {
        let lost: Vec<_> = c.committed.difference(&settled).collect();
        let extra: Vec<_> = settled.difference(&c.committed).collect();
        return Err(format!(
            "committed messages lost: {lost:?}; settled but never committed: {extra:?}"
        ));
    }
    Ok(())
}

impl Checker {
    fn step(&mut self, config: &ScheduleConfig, seen: &Seen) -> Result<(), String> {
        match seen {
            Seen::Published { labels, committed } => {
                let set = if *committed {
                    &mut self.committed
                } else {
                    &mut self.rolled_back
                };
                set.extend(labels.iter().copied());
            }
            Seen::Delivered { by, rows, .. } => {
                if let Some(member) = by {
                    self.active.insert(*member, self.now_ms);
                }
                let keys: Vec<(i64, Label)> = rows.iter().map(|r| (r.next_ms, r.label)).collect();
                if !keys.is_sorted() {
                    return Err(format!("rows not in (next_attempt_at, id) order: {keys:?}"));
                }
                for row in rows {
                    if self.rolled_back.contains(&row.label) {
                        return Err(format!("rolled-back message #{} delivered", row.label));
                    }
                    if let Some(prev) = self.holders.get(&row.label).copied() {
                        self.stale(config, prev, *by).map_err(|why| {
                            format!(
                                "message #{} handed out as lease #{} while lease #{} is live ({why})",
                                row.label, row.lease, prev.lease
                            )
                        })?;
                        self.finished.insert(prev.lease);
                    }
                    let deliveries = self.deliveries.entry(row.label).or_insert(0);
                    *deliveries += 1;
                    let attempts = self.attempts.get(&row.label).copied().unwrap_or(0);
                    if (row.attempts, row.deliveries) != (attempts, *deliveries) {
                        return Err(format!(
                            "message #{} delivered with attempts {} deliveries {}; expected {} and {}",
                            row.label, row.attempts, row.deliveries, attempts, deliveries
                        ));
                    }
                    self.holders.insert(
                        row.label,
                        Holder {
                            lease: row.lease,
                            at_ms: self.now_ms,
                            by: *by,
                        },
                    );
                }
            }
            Seen::Outcome {
                kind,
                lease,
                label,
                done,
            } => {
                let current = self.holders.get(label).is_some_and(|h| h.lease == *lease);
                if *done && (!current || self.finished.contains(lease)) {
                    return Err(format!(
                        "{kind:?} through lost lease #{lease} of message #{label} took effect"
                    ));
                }
                if *done {
                    self.settle(*kind, *lease, *label);
                }
            }
            Seen::AckedBatch { labels, .. } => {
                for label in labels {
                    let Some(holder) = self.holders.get(label).copied() else {
                        return Err(format!("ack_batch acked #{label}, which nobody holds"));
                    };
                    self.settle(OutcomeKind::Ack, holder.lease, *label);
                }
            }
            Seen::Touched { member, done } => {
                if *done {
                    self.active.insert(*member, self.now_ms);
                }
            }
            Seen::Unregistered {
                member,
                requeue,
                result,
            } => {
                let held: Vec<(Label, Holder)> = self
                    .holders
                    .iter()
                    .filter(|(_, h)| h.by == Some(*member))
                    .map(|(l, h)| (*l, *h))
                    .collect();
                match result {
                    Err(n) if *n != held.len() as i64 => {
                        return Err(format!(
                            "unregister refused for {n} held rows; m{member} holds {}",
                            held.len()
                        ));
                    }
                    Ok(true) if !requeue && !held.is_empty() => {
                        return Err(format!(
                            "unregister (fail) succeeded while m{member} holds {} rows",
                            held.len()
                        ));
                    }
                    Ok(true) => {
                        for (label, holder) in held {
                            self.holders.remove(&label);
                            self.finished.insert(holder.lease);
                            *self.attempts.entry(label).or_insert(0) += 1;
                        }
                        self.active.remove(member);
                    }
                    _ => {}
                }
            }
            Seen::Advanced { secs } => self.now_ms += i64::from(*secs) * 1000,
            // Topics: `TopicChecker`.
            Seen::Crashed { .. }
            | Seen::Skipped
            | Seen::Subscribed { .. }
            | Seen::Unsubscribed { .. }
            | Seen::TopicPublished { .. }
            | Seen::Received { .. }
            | Seen::TopicSettled { .. }
            | Seen::TopicAckedBatch { .. } => {}
        }
        Ok(())
    }

    /// Why `prev` may be taken over by a fetch (`by: None`) or member `by`'s receive.
    fn stale(&self, config: &ScheduleConfig, prev: Holder, by: Option<u8>) -> Result<(), String> {
        if self.finished.contains(&prev.lease) {
            return Ok(());
        }
        match by {
            None => {
                let age = self.now_ms - prev.at_ms;
                if age > i64::from(config.lease_ttl_s) * 1000 {
                    Ok(())
                } else {
                    Err(format!("leased {age} ms ago, ttl {} s", config.lease_ttl_s))
                }
            }
            Some(me) => {
                let Some(holder) = prev.by.filter(|h| *h != me) else {
                    return Err("not held by another member".into());
                };
                let silent = self.active.get(&holder).map(|at| self.now_ms - at);
                match silent {
                    Some(s) if s > i64::from(config.dead_interval_s) * 1000 => Ok(()),
                    _ => Err(format!(
                        "holder m{holder} silent for {silent:?} ms, dead interval {} s",
                        config.dead_interval_s
                    )),
                }
            }
        }
    }

    /// Rows no longer stored (dead-lettered by a fetch at `max_deliveries` or by a requeue
    /// at its attempt limit) have no holder any more.
    fn forget_gone(&mut self, after: &Snapshot) {
        let stored: HashSet<Label> = after.live.iter().map(|l| l.label).collect();
        let gone: Vec<(Label, usize)> = self
            .holders
            .iter()
            .filter(|(l, _)| !stored.contains(l))
            .map(|(l, h)| (*l, h.lease))
            .collect();
        for (label, lease) in gone {
            self.holders.remove(&label);
            self.finished.insert(lease);
        }
    }

    fn settle(&mut self, kind: OutcomeKind, lease: usize, label: Label) {
        match kind {
            OutcomeKind::Renew => {
                if let Some(h) = self.holders.get_mut(&label) {
                    h.at_ms = self.now_ms;
                }
                return;
            }
            OutcomeKind::Ack => {
                self.acked.insert(label);
            }
            OutcomeKind::Retry => *self.attempts.entry(label).or_insert(0) += 1,
            OutcomeKind::Release => {
                let d = self.deliveries.entry(label).or_insert(0);
                *d = (*d - 1).max(0);
            }
            OutcomeKind::DeadLetter => {}
        }
        self.holders.remove(&label);
        self.finished.insert(lease);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::props::trace::{Row, Step};

    fn step(seen: Seen, live: &[Label]) -> Step {
        Step {
            op: "test".into(),
            seen,
            after: Snapshot {
                live: live
                    .iter()
                    .map(|l| crate::props::Live {
                        label: *l,
                        queue: "q0".into(),
                        attempts: 0,
                        deliveries: 1,
                        next_ms: 0,
                        state: crate::props::LiveState::Leased,
                        holder: None,
                    })
                    .collect(),
                dead: Vec::new(),
                subs: Vec::new(),
            },
        }
    }

    fn delivered(label: Label, lease: usize, deliveries: i32) -> Seen {
        Seen::Delivered {
            by: None,
            batch: Some(lease),
            rows: vec![Row {
                label,
                queue: "q0".into(),
                attempts: 0,
                deliveries,
                next_ms: 0,
                lease,
            }],
        }
    }

    fn published(labels: Vec<Label>, committed: bool) -> Seen {
        Seen::Published { labels, committed }
    }

    fn ack(lease: usize, label: Label, done: bool) -> Seen {
        Seen::Outcome {
            kind: OutcomeKind::Ack,
            lease,
            label,
            done,
        }
    }

    fn check_steps(steps: Vec<Step>) -> Result<(), String> {
        check(&ScheduleConfig::default(), &Trace { steps })
    }

    #[test]
    fn a_clean_trace_passes() {
        check_steps(vec![
            step(published(vec![0], true), &[0]),
            step(delivered(0, 0, 1), &[0]),
            step(ack(0, 0, true), &[]),
        ])
        .expect("clean");
    }

    #[test]
    fn a_second_holder_while_the_lease_is_live_fails() {
        let err = check_steps(vec![
            step(published(vec![0], true), &[0]),
            step(delivered(0, 0, 1), &[0]),
            step(delivered(0, 1, 2), &[0]),
        ])
        .expect_err("duplicate");
        assert!(err.contains("while lease #0 is live"), "{err}");
    }

    #[test]
    fn a_stale_ack_that_takes_effect_fails() {
        let err = check_steps(vec![
            step(published(vec![0], true), &[0]),
            step(delivered(0, 0, 1), &[0]),
            step(Seen::Advanced { secs: 11 }, &[0]),
            step(delivered(0, 1, 2), &[0]),
            step(ack(0, 0, true), &[]),
        ])
        .expect_err("stale ack");
        assert!(err.contains("through lost lease #0"), "{err}");
    }

    #[test]
    fn a_lost_or_undrained_message_fails() {
        let err = check_steps(vec![step(published(vec![0], true), &[])]).expect_err("lost");
        assert!(err.contains("lost: [0]"), "{err}");
        let err = check_steps(vec![step(published(vec![0], true), &[0])]).expect_err("left");
        assert!(err.contains("still stored"), "{err}");
    }

    #[test]
    fn a_rolled_back_delivery_fails() {
        let err = check_steps(vec![
            step(published(vec![0], false), &[]),
            step(delivered(0, 0, 1), &[]),
        ])
        .expect_err("rolled back");
        assert!(err.contains("rolled-back message #0"), "{err}");
    }

    #[test]
    fn wrong_counts_fail() {
        let err = check_steps(vec![
            step(published(vec![0], true), &[0]),
            step(delivered(0, 0, 2), &[0]),
        ])
        .expect_err("counts");
        assert!(err.contains("expected 0 and 1"), "{err}");
    }
}
