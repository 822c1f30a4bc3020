//! [`FakeBroker`]: the in-memory backend.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use postbox_core::coop::{CoopReceive, MemberInfo, Registration, Unregister};
use postbox_core::engine::Engine;
use postbox_core::journal::{JournalEvent, JournalLive, LiveEvents};
use postbox_core::{
    Consume, Coop, DeadLetter, Delivery, FetchParams, Inspect, JournalStore, Lease, Member,
    MessageId, Result, RetryParams, Store, StoredMessage, TableName, validate_reason,
};
use uuid::Uuid;

use crate::clock::{Clock, plus};
use crate::faults::{self, Fault};
use crate::state::{FakeCounters, Row, State};

/// An in-memory [`Backend`](postbox_core::Backend) with the semantics of the Postgres one.
///
/// Same eligibility (ready, or leased longer ago than the TTL), same `(next_attempt_at, id)`
/// order, one token per fetched batch, outcomes fenced by id and token, retry accounting,
/// dead letters, `max_deliveries`; publishes are visible only once their transaction commits.
/// Cheap to clone: clones share the same messages.
///
/// | capability | |
/// |---|---|
/// | engine (LISTEN, persistent connections) | none: [`engine`](Consume::engine) returns `None`, so subscribers poll and open nothing |
/// | transactions | [`begin`](postbox_core::Publish::begin) / [`commit`](postbox_core::Publish::commit) / [`rollback`](postbox_core::Publish::rollback); dropping rolls back |
/// | time control | tokio's clock (pause it with `start_paused`), plus [`advance`](Self::advance) |
/// | fault injection | [`fail_next_fetches`](Self::fail_next_fetches), [`fail_next_outcomes`](Self::fail_next_outcomes), [`fail_next_publishes`](Self::fail_next_publishes) |
/// | inspection | [`snapshot`](Self::snapshot), [`dead`](Self::dead), [`counters`](Self::counters) |
///
/// ```
/// use postbox_core::prelude::*;
/// use postbox_core::{FetchParams, Message};
/// use postbox_fake::FakeBroker;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> postbox_core::Result<()> {
/// let broker = FakeBroker::new();
/// let mut tx = broker.begin().await?;
/// broker.publish(&mut tx, Message::new("emails", "hi")).await?;
/// assert!(broker.fetch(&FetchParams::new(["emails"], 10)).await?.is_empty(), "not committed");
/// broker.commit(tx).await?;
///
/// let got = broker.fetch(&FetchParams::new(["emails"], 10)).await?;
/// assert!(broker.ack(got[0].lease()).await?);
/// assert!(!broker.ack(got[0].lease()).await?, "a second ack finds nothing");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct FakeBroker {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) live: tokio::sync::broadcast::Sender<JournalEvent>,
    pub(crate) table: TableName,
    pub(crate) clock: Clock,
    pub(crate) state: Mutex<State>,
    /// How long each fetch and cooperative receive takes (`set_fetch_latency`).
    pub(crate) fetch_latency: Mutex<Duration>,
    /// What the journal's live channel carries (`journal_live`).
    pub(crate) journal_live: Mutex<JournalLive>,
}

impl Default for FakeBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeBroker {
    /// An empty broker for the default table name (`postbox`).
    pub fn new() -> Self {
        Self::with_table(TableName::default())
    }

    /// An empty broker reporting `table` as its table name.
    pub fn with_table(table: TableName) -> Self {
        FakeBroker {
            shared: Arc::new(Shared {
                live: tokio::sync::broadcast::channel(4096).0,
                table,
                clock: Clock::new(),
                state: Mutex::new(State::default()),
                fetch_latency: Mutex::new(Duration::ZERO),
                journal_live: Mutex::new(JournalLive::default()),
            }),
        }
    }

    /// The fake's current time: tokio's clock plus every [`advance`](Self::advance).
    pub fn now(&self) -> DateTime<Utc> {
        self.shared.clock.now()
    }

    /// Moves the fake's clock forward by `by`, without touching tokio's clock: leases expire
    /// and delayed or retried messages become eligible as if that much time had passed.
    pub fn advance(&self, by: Duration) {
        self.shared.clock.advance(by);
    }

    /// Makes every fetch and cooperative receive take `latency` (on tokio's clock, so paused
    /// time skips it) before it reads the queue, like a round trip to a database: the
    /// runtime's handlers run on meanwhile. Defaults to zero.
    pub fn set_fetch_latency(&self, latency: Duration) {
        *self.shared.fetch_latency.lock() = latency;
    }

    async fn fetch_round_trip(&self) {
        let latency = *self.shared.fetch_latency.lock();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }

    /// Makes the next `n` fetches fail with `fault`.
    pub fn fail_next_fetches(&self, n: u32, fault: Fault) {
        self.shared.state.lock().faults.fetch = (n > 0).then_some((n, fault));
    }

    /// Makes the next `n` outcome writes (ack, ack_batch, retry, dead_letter, renew_lease,
    /// release) fail with `fault`. A failed write changes nothing.
    pub fn fail_next_outcomes(&self, n: u32, fault: Fault) {
        self.shared.state.lock().faults.outcome = (n > 0).then_some((n, fault));
    }

    /// Makes the next `n` publishes (single or batch) fail with `fault`.
    pub fn fail_next_publishes(&self, n: u32, fault: Fault) {
        self.shared.state.lock().faults.publish = (n > 0).then_some((n, fault));
    }

    /// The stored messages of `queue` (or of every queue), in id order, with their state now.
    pub fn snapshot(&self, queue: Option<&str>) -> Vec<StoredMessage> {
        let now = self.now();
        let state = self.shared.state.lock();
        let mut rows: Vec<StoredMessage> = state
            .rows
            .values()
            .filter(|r| queue.is_none_or(|q| r.queue == q))
            .map(|r| r.stored(now))
            .collect();
        rows.sort_by_key(|m| m.id);
        rows
    }

    /// The dead letters of `queue` (or of every queue), in id order.
    pub fn dead(&self, queue: Option<&str>) -> Vec<DeadLetter> {
        self.shared
            .state
            .lock()
            .dead
            .values()
            .map(|d| &d.letter)
            .filter(|d| queue.is_none_or(|q| d.queue == q))
            .cloned()
            .collect()
    }

    /// Counters since creation.
    pub fn counters(&self) -> FakeCounters {
        self.shared.state.lock().counters
    }

    fn outcome_fault(&self) -> Result<()> {
        match faults::take(&mut self.shared.state.lock().faults.outcome) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    pub(crate) fn commit_rows(
        &self,
        rows: Vec<Row>,
        topic_rows: Vec<crate::topic_state::LogRow>,
        tx_id: u64,
    ) {
        let mut state = self.shared.state.lock();
        state.counters.published += (rows.len() + topic_rows.len()) as u64;
        for row in rows {
            state.insert(row);
        }
        state.topics.commit(topic_rows, tx_id);
    }

    /// Drops the idempotency-key reservations transaction `tx_id` still holds (it rolled
    /// back).
    pub(crate) fn release_keys(&self, tx_id: u64) {
        self.shared.state.lock().topics.release_keys(tx_id);
    }

    pub(crate) fn discard_rows(&self, n: usize) {
        self.shared.state.lock().counters.rolled_back += n as u64;
    }
}

/// Leases `picked` (already sorted and cut to the limit) under one fresh token, or
/// dead-letters those delivered `max_deliveries` times: the common end of fetch and
/// cooperative receive.
pub(crate) fn lease_picked(
    state: &mut State,
    picked: Vec<(DateTime<Utc>, MessageId)>,
    now: DateTime<Utc>,
    holder: Option<&str>,
    max_deliveries: Option<u32>,
) -> Vec<Delivery> {
    let token = Uuid::new_v4();
    let max = max_deliveries.map(|n| i32::try_from(n).unwrap_or(i32::MAX));
    let mut out = Vec::with_capacity(picked.len());
    for (_, id) in picked {
        let exhausted = state
            .rows
            .get(&id)
            .is_some_and(|r| max.is_some_and(|m| r.deliveries >= m));
        if exhausted {
            if let Some(row) = state.remove(id) {
                let reason = format!(
                    "max_deliveries exceeded: leased {} times without an outcome",
                    row.deliveries
                );
                state.dead.insert(id, row.dead(reason, now));
                state.counters.dead_lettered += 1;
            }
            continue;
        }
        let holder = holder.map(str::to_owned);
        state.update(id, |row| {
            row.lease = Some((token, now));
            row.acquired_by = holder;
            row.deliveries += 1;
            row.first_attempt_at.get_or_insert(now);
            row.last_attempt_at = Some(now);
        });
        if let Some(delivery) = state.rows.get(&id).and_then(Row::delivery) {
            out.push(delivery);
        }
    }
    state.counters.fetched += out.len() as u64;
    out
}

impl fmt::Debug for FakeBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.state.lock();
        f.debug_struct("FakeBroker")
            .field("table", &self.shared.table)
            .field("messages", &state.rows.len())
            .field("dead", &state.dead.len())
            .finish_non_exhaustive()
    }
}

impl Store for FakeBroker {
    fn table(&self) -> &TableName {
        &self.shared.table
    }
}

#[async_trait]
impl Consume for FakeBroker {
    fn engine(&self) -> Option<&dyn Engine> {
        None
    }

    async fn fetch(&self, params: &FetchParams) -> Result<Vec<Delivery>> {
        params.validate()?;
        self.fetch_round_trip().await;
        let now = self.now();
        let mut state = self.shared.state.lock();
        if let Some(error) = faults::take(&mut state.faults.fetch) {
            return Err(error);
        }
        let limit = params.get_limit() as usize;
        let expired_before = now
            - chrono::Duration::from_std(params.get_lease_ttl()).unwrap_or(chrono::Duration::MAX);
        // Candidates: per queue, the first `limit` ready rows and every expired lease.
        let mut picked: Vec<(DateTime<Utc>, MessageId)> = Vec::new();
        for queue in params.get_queues() {
            if let Some(set) = state.unleased.get(queue) {
                picked.extend(set.iter().take_while(|(at, _)| *at <= now).take(limit));
            }
            if let Some(set) = state.leased.get(queue) {
                picked.extend(
                    set.iter()
                        .take_while(|(at, _)| *at < expired_before)
                        .filter_map(|(_, id)| state.rows.get(id))
                        .map(|r| (r.next_attempt_at, r.id)),
                );
            }
        }
        picked.sort_unstable();
        picked.dedup();
        picked.truncate(limit);

        Ok(lease_picked(
            &mut state,
            picked,
            now,
            params.get_acquired_by(),
            params.get_max_deliveries(),
        ))
    }

    async fn ack(&self, lease: Lease) -> Result<bool> {
        self.outcome_fault()?;
        let mut state = self.shared.state.lock();
        if !state.held(lease.id, lease.token) {
            return Ok(false);
        }
        state.remove(lease.id);
        state.counters.acked += 1;
        Ok(true)
    }

    async fn ack_batch(&self, leases: &[Lease]) -> Result<Vec<MessageId>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        self.outcome_fault()?;
        let mut state = self.shared.state.lock();
        let mut acked = Vec::new();
        for lease in leases {
            if state.held(lease.id, lease.token) {
                state.remove(lease.id);
                acked.push(lease.id);
            }
        }
        state.counters.acked += acked.len() as u64;
        Ok(acked)
    }

    async fn retry(&self, lease: Lease, params: RetryParams) -> Result<bool> {
        params.validate()?;
        self.outcome_fault()?;
        let now = self.now();
        let mut state = self.shared.state.lock();
        if !state.held(lease.id, lease.token) {
            return Ok(false);
        }
        let error = params.get_error().map(str::to_owned);
        state.update(lease.id, |row| {
            row.attempts += 1;
            row.next_attempt_at = plus(now, params.get_delay());
            row.lease = None;
            row.acquired_by = None;
            row.last_error = error;
        });
        state.counters.retried += 1;
        Ok(true)
    }

    async fn dead_letter(&self, lease: Lease, reason: &str) -> Result<bool> {
        validate_reason(reason)?;
        self.outcome_fault()?;
        let now = self.now();
        let mut state = self.shared.state.lock();
        if !state.held(lease.id, lease.token) {
            return Ok(false);
        }
        if let Some(mut row) = state.remove(lease.id) {
            row.attempts += 1;
            state
                .dead
                .insert(lease.id, row.dead(reason.to_owned(), now));
            state.counters.dead_lettered += 1;
        }
        Ok(true)
    }

    async fn renew_lease(&self, lease: Lease) -> Result<bool> {
        self.outcome_fault()?;
        let now = self.now();
        let mut state = self.shared.state.lock();
        if !state.held(lease.id, lease.token) {
            return Ok(false);
        }
        state.update(lease.id, |row| row.lease = Some((lease.token, now)));
        Ok(true)
    }

    async fn release(&self, lease: Lease) -> Result<bool> {
        self.outcome_fault()?;
        let mut state = self.shared.state.lock();
        if !state.held(lease.id, lease.token) {
            return Ok(false);
        }
        state.update(lease.id, |row| {
            row.lease = None;
            row.acquired_by = None;
            row.deliveries = (row.deliveries - 1).max(0);
        });
        state.counters.released += 1;
        Ok(true)
    }
}

#[async_trait]
impl Inspect for FakeBroker {
    async fn messages(&self, queue: Option<&str>) -> Result<Vec<StoredMessage>> {
        Ok(self.snapshot(queue))
    }

    async fn dead_letters(&self, queue: Option<&str>) -> Result<Vec<DeadLetter>> {
        Ok(self.dead(queue))
    }
}

#[async_trait]
impl Coop for FakeBroker {
    async fn coop_register(&self, member: &Member, queues: &[String]) -> Result<Registration> {
        Ok(self.coop_register_now(member, queues))
    }

    async fn coop_receive(&self, params: &CoopReceive) -> Result<Vec<Delivery>> {
        self.fetch_round_trip().await;
        self.coop_receive_now(params)
    }

    async fn coop_touch(&self, member: &Member) -> Result<bool> {
        Ok(self.coop_touch_now(member))
    }

    async fn coop_unregister(&self, member: &Member, handling: Unregister) -> Result<bool> {
        self.coop_unregister_now(member, handling)
    }

    async fn coop_members(&self, group: &str) -> Result<Vec<MemberInfo>> {
        Ok(self.coop_members_now(group))
    }
}

#[async_trait]
impl JournalStore for FakeBroker {
    async fn journal_append(&self, events: &[JournalEvent]) -> Result<()> {
        events.iter().try_for_each(JournalEvent::validate)?;
        self.journal_append_now(events)
    }

    async fn journal_latest_seq(&self, stream: &str) -> Result<Option<i64>> {
        JournalEvent::validate_stream(stream)?;
        Ok(self.journal_latest_now(stream))
    }

    async fn journal_read_after(
        &self,
        stream: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<JournalEvent>> {
        JournalEvent::validate_stream(stream)?;
        Ok(self.journal_read_now(stream, after, limit))
    }

    async fn journal_publish(&self, event: &JournalEvent) -> Result<()> {
        event.validate()?;
        self.journal_publish_now(event);
        Ok(())
    }

    async fn journal_subscribe(&self, stream: &str) -> Result<LiveEvents> {
        JournalEvent::validate_stream(stream)?;
        Ok(self.journal_subscribe_now(stream))
    }
}
