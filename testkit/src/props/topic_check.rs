//! The invariants of topics, checked on what a run observed, independently of the model:
//! per subscription, what it must receive, no second holder while a lease is live, fenced
//! settlements, and after the drain every message settled exactly once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::schedule::ScheduleConfig;
use super::trace::{Label, OutcomeKind, Seen, Snapshot};

#[derive(Debug, Clone, Copy)]
struct Holder {
    lease: usize,
    at_ms: i64,
}

#[derive(Debug, Default)]
struct Sub {
    /// Messages committed to its topic while it existed: what it must receive.
    expected: BTreeSet<Label>,
    holders: HashMap<Label, Holder>,
    acked: BTreeSet<Label>,
    dead: BTreeSet<Label>,
}

#[derive(Debug, Default)]
pub(super) struct TopicChecker {
    subs: BTreeMap<u8, Sub>,
    /// Topic leases that were settled or replaced by a later delivery.
    finished: HashSet<usize>,
    /// Labels written to each topic (committed, not duplicates).
    written: HashMap<Label, u8>,
    /// Per topic batch: its lease indices.
    batches: HashMap<usize, BTreeSet<usize>>,
}

impl TopicChecker {
    pub(super) fn step(
        &mut self,
        config: &ScheduleConfig,
        seen: &Seen,
        now_ms: i64,
    ) -> Result<(), String> {
        match seen {
            Seen::Subscribed { sub, new } => {
                let exists = self.subs.contains_key(sub);
                if *new == exists {
                    return Err(format!(
                        "subscribe s{sub} said new: {new}, but it existed: {exists}"
                    ));
                }
                self.subs.entry(*sub).or_default();
            }
            Seen::Unsubscribed { sub, result, .. } => {
                let exists = self.subs.contains_key(sub);
                match result {
                    Ok(existed) if *existed != exists => {
                        return Err(format!(
                            "unsubscribe s{sub} said it existed: {existed}, but it did: {exists}"
                        ));
                    }
                    Err(_) if !exists => {
                        return Err(format!("unsubscribe s{sub} refused, but it did not exist"));
                    }
                    Ok(_) => {
                        if let Some(gone) = self.subs.remove(sub) {
                            self.finished.extend(gone.holders.values().map(|h| h.lease));
                        }
                    }
                    Err(_) => {}
                }
            }
            Seen::TopicPublished {
                topic,
                labels,
                resolved,
                committed,
            } => {
                for (label, first) in labels.iter().zip(resolved) {
                    if first != label
                        && self.written.get(first) != Some(topic)
                        && !labels.contains(first)
                    {
                        return Err(format!(
                            "#{label} resolved to #{first}, which is no message of t{topic}"
                        ));
                    }
                    if !committed || first != label {
                        continue;
                    }
                    self.written.insert(*label, *topic);
                    for (sub, s) in &mut self.subs {
                        if config.topic_of(*sub) == *topic {
                            s.expected.insert(*label);
                        }
                    }
                }
            }
            Seen::Received {
                sub,
                batch,
                rows,
                known,
            } => {
                if *known != self.subs.contains_key(sub) {
                    return Err(format!("receive from s{sub}: known {known}"));
                }
                let ttl_ms = i64::from(config.lease_ttl_s) * 1000;
                let Some(s) = self.subs.get_mut(sub) else {
                    return Ok(());
                };
                for row in rows {
                    if !s.expected.contains(&row.label) {
                        return Err(format!(
                            "s{sub} received #{}, which was not committed to its topic while it existed (rolled back, a duplicate, or another topic's)",
                            row.label
                        ));
                    }
                    if s.acked.contains(&row.label) || s.dead.contains(&row.label) {
                        return Err(format!(
                            "s{sub} received #{} again after it was acked or dead-lettered",
                            row.label
                        ));
                    }
                    if let Some(prev) = s.holders.get(&row.label)
                        && !self.finished.contains(&prev.lease)
                    {
                        let age = now_ms - prev.at_ms;
                        if age < ttl_ms {
                            return Err(format!(
                                "s{sub} handed #{} out as topic lease #{} while lease #{} is live (leased {age} ms ago, ttl {} s)",
                                row.label, row.lease, prev.lease, config.lease_ttl_s
                            ));
                        }
                        self.finished.insert(prev.lease);
                    }
                    s.holders.insert(
                        row.label,
                        Holder {
                            lease: row.lease,
                            at_ms: now_ms,
                        },
                    );
                }
                if let Some(b) = batch {
                    self.batches
                        .insert(*b, rows.iter().map(|r| r.lease).collect());
                }
            }
            Seen::TopicSettled {
                sub,
                kind,
                lease,
                label,
                done,
            } => {
                if !done {
                    return Ok(());
                }
                let current = self.subs.get(sub).and_then(|s| s.holders.get(label));
                if current.is_none_or(|h| h.lease != *lease) || self.finished.contains(lease) {
                    return Err(format!(
                        "{kind:?} through lost topic lease #{lease} of #{label} (s{sub}) took effect"
                    ));
                }
                self.settle(*sub, *kind, *lease, *label, now_ms);
            }
            Seen::TopicAckedBatch { sub, batch, labels } => {
                let leases = self.batches.get(batch).cloned().unwrap_or_default();
                for label in labels {
                    let holder = self.subs.get(sub).and_then(|s| s.holders.get(label));
                    let Some(h) = holder.copied().filter(|h| leases.contains(&h.lease)) else {
                        return Err(format!(
                            "ack of topic batch #{batch} acked #{label}, which it does not hold"
                        ));
                    };
                    if self.finished.contains(&h.lease) {
                        return Err(format!(
                            "ack of topic batch #{batch} acked #{label} through settled lease #{}",
                            h.lease
                        ));
                    }
                    self.settle(*sub, OutcomeKind::Ack, h.lease, *label, now_ms);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn settle(&mut self, sub: u8, kind: OutcomeKind, lease: usize, label: Label, now_ms: i64) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        match kind {
            OutcomeKind::Renew => {
                if let Some(h) = s.holders.get_mut(&label) {
                    h.at_ms = now_ms;
                }
                return;
            }
            OutcomeKind::Ack => {
                s.acked.insert(label);
            }
            OutcomeKind::Retry | OutcomeKind::DeadLetter | OutcomeKind::Release => {}
        }
        s.holders.remove(&label);
        self.finished.insert(lease);
    }

    /// A message dead-lettered by a receive (at `max_deliveries`) has no holder any more.
    pub(super) fn after(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        let stored: BTreeSet<u8> = snapshot.subs.iter().map(|s| s.sub).collect();
        let known: BTreeSet<u8> = self.subs.keys().copied().collect();
        if stored != known {
            return Err(format!(
                "subscriptions stored: {stored:?}; subscribed and not dropped: {known:?}"
            ));
        }
        for state in &snapshot.subs {
            let Some(s) = self.subs.get_mut(&state.sub) else {
                continue;
            };
            for dead in &state.dead {
                if !s.expected.contains(&dead.label) {
                    return Err(format!(
                        "s{} dead-lettered #{}, which it was never to receive",
                        state.sub, dead.label
                    ));
                }
                s.dead.insert(dead.label);
                if let Some(h) = s.holders.remove(&dead.label) {
                    self.finished.insert(h.lease);
                }
            }
        }
        Ok(())
    }

    /// After the drain: every subscription acked or dead-lettered each of its messages,
    /// exactly one of the two, and has no backlog.
    pub(super) fn finish(&self, last: &Snapshot) -> Result<(), String> {
        for state in &last.subs {
            let Some(s) = self.subs.get(&state.sub) else {
                continue;
            };
            if state.backlog != 0 {
                return Err(format!(
                    "s{} has a backlog of {} after the drain",
                    state.sub, state.backlog
                ));
            }
            let dead: BTreeSet<Label> = state.dead.iter().map(|d| d.label).collect();
            if let Some(both) = dead.intersection(&s.acked).next() {
                return Err(format!(
                    "s{}: #{both} was acked and dead-lettered",
                    state.sub
                ));
            }
            let settled: BTreeSet<Label> = dead.union(&s.acked).copied().collect();
            if settled != s.expected {
                let lost: Vec<_> = s.expected.difference(&settled).collect();
                let extra: Vec<_> = settled.difference(&s.expected).collect();
                return Err(format!(
                    "s{}: messages lost: {lost:?}; settled but never its own: {extra:?}",
                    state.sub
                ));
            }
        }
        Ok(())
    }
}
