//! Cooperative subconsumers in memory, mirroring `postbox_core`'s `pg/coop.rs`.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use postbox_core::coop::{CoopReceive, MemberInfo, Registration, Unregister};
use postbox_core::{Delivery, Error, Member, MessageId, Result};

use crate::broker::{FakeBroker, lease_picked};
use crate::faults;
use crate::state::{MemberRow, State};

impl FakeBroker {
    pub(crate) fn coop_register_now(&self, member: &Member, queues: &[String]) -> Registration {
        let now = self.now();
        let mut state = self.shared.state.lock();
        let key = (member.group().to_owned(), member.name().to_owned());
        match state.members.get_mut(&key) {
            Some(row) => {
                row.last_active = now;
                Registration::Existing
            }
            None => {
                state.members.insert(
                    key,
                    MemberRow {
                        queues: queues.to_vec(),
                        registered_at: now,
                        last_active: now,
                    },
                );
                Registration::New
            }
        }
    }

    pub(crate) fn coop_receive_now(&self, params: &CoopReceive) -> Result<Vec<Delivery>> {
        params.validate()?;
        let now = self.now();
        let mut state = self.shared.state.lock();
        if let Some(error) = faults::take(&mut state.faults.fetch) {
            return Err(error);
        }
        let member = params.get_member();
        let me = (member.group().to_owned(), member.name().to_owned());
        let entry = state.members.entry(me).or_insert_with(|| MemberRow {
            queues: params.get_queues().to_vec(),
            registered_at: now,
            last_active: now,
        });
        let refresh = chrono::Duration::from_std(params.get_heartbeat_refresh())
            .unwrap_or(chrono::Duration::MAX);
        if entry.last_active <= now - refresh {
            entry.last_active = now;
        }

        let dead: HashSet<String> = match params.get_dead_interval() {
            Some(interval) => {
                let before =
                    now - chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::MAX);
                state
                    .members
                    .iter()
                    .filter(|((g, n), m)| {
                        g == member.group() && n != member.name() && m.last_active < before
                    })
                    .map(|((g, n), _)| format!("{g}/{n}"))
                    .collect()
            }
            None => HashSet::new(),
        };
        let limit = params.get_max_messages() as usize;
        let picked = candidates(&state, params.get_queues(), &dead, now, limit);
        Ok(lease_picked(
            &mut state,
            picked,
            now,
            Some(&member.key()),
            params.get_max_deliveries(),
        ))
    }

    pub(crate) fn coop_touch_now(&self, member: &Member) -> bool {
        let now = self.now();
        let mut state = self.shared.state.lock();
        let key = (member.group().to_owned(), member.name().to_owned());
        match state.members.get_mut(&key) {
            Some(row) => {
                row.last_active = now;
                true
            }
            None => false,
        }
    }

    pub(crate) fn coop_unregister_now(
        &self,
        member: &Member,
        handling: Unregister,
    ) -> Result<bool> {
        let now = self.now();
        let mut state = self.shared.state.lock();
        let key = (member.group().to_owned(), member.name().to_owned());
        if !state.members.contains_key(&key) {
            return Ok(false);
        }
        let holder = member.key();
        let held: Vec<MessageId> = state
            .rows
            .values()
            .filter(|r| r.lease.is_some() && r.acquired_by.as_deref() == Some(holder.as_str()))
            .map(|r| r.id)
            .collect();
        match handling {
            Unregister::Fail if !held.is_empty() => {
                return Err(Error::MemberHoldsMessages {
                    member: holder,
                    held: held.len() as i64,
                });
            }
            Unregister::Fail => {}
            Unregister::Requeue { max_attempts } => {
                let max = i32::try_from(max_attempts.max(1)).unwrap_or(i32::MAX);
                for id in held {
                    requeue(&mut state, id, max, now);
                }
            }
        }
        state.members.remove(&key);
        Ok(true)
    }

    pub(crate) fn coop_members_now(&self, group: &str) -> Vec<MemberInfo> {
        let state = self.shared.state.lock();
        state
            .members
            .iter()
            .filter(|((g, _), _)| g == group)
            .map(|((g, n), m)| {
                let holder = format!("{g}/{n}");
                let held = state
                    .rows
                    .values()
                    .filter(|r| {
                        r.lease.is_some() && r.acquired_by.as_deref() == Some(holder.as_str())
                    })
                    .count();
                MemberInfo::new(
                    n.clone(),
                    m.queues.clone(),
                    m.registered_at,
                    m.last_active,
                    held as i64,
                )
            })
            .collect()
    }
}

/// Ready rows of `queues` and rows held by `dead` members, in fetch order, cut to `limit`.
fn candidates(
    state: &State,
    queues: &[String],
    dead: &HashSet<String>,
    now: DateTime<Utc>,
    limit: usize,
) -> Vec<(DateTime<Utc>, MessageId)> {
    let mut picked: Vec<(DateTime<Utc>, MessageId)> = Vec::new();
    for queue in queues {
        if let Some(set) = state.unleased.get(queue) {
            picked.extend(set.iter().take_while(|(at, _)| *at <= now).take(limit));
        }
        if !dead.is_empty()
            && let Some(set) = state.leased.get(queue)
        {
            picked.extend(
                set.iter()
                    .filter_map(|(_, id)| state.rows.get(id))
                    .filter(|r| r.acquired_by.as_ref().is_some_and(|h| dead.contains(h)))
                    .map(|r| (r.next_attempt_at, r.id)),
            );
        }
    }
    picked.sort_unstable();
    picked.dedup();
    picked.truncate(limit);
    picked
}

/// Gives a held row back for another attempt, or dead-letters it at `max` attempts.
fn requeue(state: &mut State, id: MessageId, max: i32, now: DateTime<Utc>) {
    let Some(attempts) = state.rows.get(&id).map(|r| r.attempts + 1) else {
        return;
    };
    if attempts >= max {
        if let Some(mut row) = state.remove(id) {
            row.attempts = attempts;
            let reason =
                format!("member unregistered; retries exhausted after {attempts} attempts");
            state.dead.insert(id, row.dead(reason, now));
            state.counters.dead_lettered += 1;
        }
    } else {
        state.update(id, |row| {
            row.attempts = attempts;
            row.next_attempt_at = now;
            row.lease = None;
            row.acquired_by = None;
            row.last_error = Some("member unregistered".into());
        });
    }
}
