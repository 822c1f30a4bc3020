//! Rotation: publishes fill one generation (partition) at a time, and drained generations are
//! reclaimed with `TRUNCATE`, which needs no VACUUM and works under any snapshot.
//!
//! A rotation is a few short transactions, each under the table's advisory lock so that
//! rotators in several processes take turns:
//!
//! 1. For each generation other than the current one that holds data and whose live-row
//!    estimate is at most [`Rotation::max_moved`]: take its `ACCESS EXCLUSIVE` lock, waiting
//!    at most [`Rotation::lock_wait`] (`lock_timeout`). A transaction that still writes to it
//!    (an uncommitted publish that read the generation before it changed, an ack, a fetch)
//!    holds a lock, so the attempt times out and nothing it holds can be lost; the attempt is
//!    repeated a few times, then left for a later turn. The wait is bounded rather than
//!    `NOWAIT`: a busy subscriber's fetch holds a lock on every partition while it runs, so
//!    under load the lock is never free at the instant a `NOWAIT` asks, reclaims keep
//!    missing, dead rows pile up where fetches read, fetches slow down and hold their locks
//!    longer still. Waiting in the lock queue gets the lock as soon as the running fetch
//!    ends; the price is that statements arriving meanwhile queue behind the request, for at
//!    most `lock_wait` each attempt. With the lock held no one else can touch its rows, so the
//!    rows still there (scheduled, retried, leased or not yet fetched) are copied into the
//!    current generation with every column, their lease token included, and the partition is
//!    truncated, in the same transaction.
//! 2. If the generation after the current one is empty and the current one has reached
//!    [`Rotation::rotate_bytes`] (or holds anything and is older than [`Rotation::max_age`]),
//!    `T_gen` moves on and new publishes go there.
//!
//! Statements waiting for the lock plan (and lock) before they take their snapshot, so a fenced
//! outcome queued behind a rotation finds the moved row in its new partition. The fetch and
//! the cooperative receive start a rotation in the background (on a pool connection) at most
//! once per [`Rotation::check_interval`]; [`PgBackend::rotate`] runs one now.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::{Acquire, PgConnection, PgPool, Row, SqlStr};

use super::PgBackend;
use super::statements::{render, sql};
use crate::error::Result;
use crate::table::{GENERATIONS, TableName};

mod log;

/// When generations rotate and how much a reclaim may copy. Set with
/// [`PgBackend::rotation`]; the defaults suit a queue of a few thousand messages per second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    automatic: bool,
    check_interval: Duration,
    rotate_bytes: u64,
    max_age: Duration,
    max_moved: u32,
    lock_wait: Duration,
    key_retention: Duration,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            automatic: true,
            check_interval: Duration::from_millis(500),
            rotate_bytes: 512 << 10,
            max_age: Duration::from_secs(10),
            max_moved: 2_000,
            lock_wait: Duration::from_millis(20),
            key_retention: Duration::from_secs(24 * 3600),
        }
    }
}

impl Rotation {
    /// The defaults: automatic, checked every second, a new generation at 1 MiB of heap or
    /// after 10 s, at most 2,000 rows copied out of a generation to reclaim it, 20 ms of
    /// waiting for a generation's lock per attempt.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether fetches start rotations in the background. With `false`, call
    /// [`PgBackend::rotate`] yourself (from a timer, say), or space is never reclaimed.
    /// Defaults to `true`.
    #[must_use]
    pub fn automatic(mut self, automatic: bool) -> Self {
        self.automatic = automatic;
        self
    }

    /// How often a fetch may start a rotation. Defaults to 1 s.
    #[must_use]
    pub fn check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// The heap size at which the current generation is closed for publishes. Smaller
    /// generations are reclaimed sooner, which bounds what a fetch reads while an old snapshot
    /// keeps dead rows alive; each rotation costs a `TRUNCATE`. Defaults to 1 MiB.
    #[must_use]
    pub fn rotate_bytes(mut self, bytes: u64) -> Self {
        self.rotate_bytes = bytes;
        self
    }

    /// The age after which a current generation holding anything is closed, whatever its
    /// size. Defaults to 10 s.
    #[must_use]
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }

    /// The most rows a reclaim copies out of a generation (messages scheduled for later,
    /// retried, leased or not yet fetched); a generation with more waits until it drains.
    /// Defaults to 2,000.
    #[must_use]
    pub fn max_moved(mut self, rows: u32) -> Self {
        self.max_moved = rows;
        self
    }

    /// How long one attempt to reclaim a generation waits for its `ACCESS EXCLUSIVE` lock
    /// (`lock_timeout`) before giving up; each reclaim makes a few attempts. Statements that
    /// arrive at the partition while the request waits queue behind it, so this is also the
    /// longest a rotation can delay a fetch or a publish per attempt. Zero means `NOWAIT`.
    /// Values are rounded to whole milliseconds. Defaults to 20 ms.
    #[must_use]
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// How long a topic remembers an [idempotency key](crate::Message::idempotency_key)
    /// after the message that carried it was published: a key older than this is free again
    /// (a publish takes it over), and the log's rotation deletes such keys (a `DELETE` on
    /// `T_keys`, cleaned by autovacuum: keyed publishes are the only statements that read
    /// it). Defaults to 24 hours, as on the fake.
    #[must_use]
    pub fn key_retention(mut self, retention: Duration) -> Self {
        self.key_retention = retention;
        self
    }
}

/// What one rotation did ([`PgBackend::rotate`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RotationReport {
    /// Another session was rotating this table; nothing was done.
    pub skipped: bool,
    /// The generation publishes go to after this rotation.
    pub current: usize,
    /// Whether the current generation moved on.
    pub advanced: bool,
    /// Generations truncated.
    pub truncated: Vec<usize>,
    /// Rows copied out of truncated generations into the current one.
    pub moved: u64,
    /// Generations left alone because a transaction held a lock on them.
    pub busy: Vec<usize>,
    /// Topics only ([`PgBackend::rotate_topics`]): generations of subscriptions' batches
    /// truncated (every batch in them was settled).
    pub batches_truncated: Vec<usize>,
}

// $1 lock key text
const TRY_LOCK: &str = "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))";

// The generation counter, then per partition its heap size and live-row estimate.
const STATE: &str = r#"
SELECT (SELECT last_value FROM {gen_seq}) AS gen,
       ARRAY[pg_relation_size('{p0}'), pg_relation_size('{p1}'), pg_relation_size('{p2}')]
           AS bytes,
       ARRAY(SELECT coalesce(s.n_live_tup, 0)
             FROM unnest(ARRAY['{p0}'::regclass, '{p1}'::regclass, '{p2}'::regclass])
                  WITH ORDINALITY AS p(rel, ord)
             LEFT JOIN pg_stat_user_tables s ON s.relid = p.rel
             ORDER BY p.ord) AS live"#;

const LOCK: &str = "LOCK TABLE {part} IN ACCESS EXCLUSIVE MODE";
const LOCK_NOWAIT: &str = "LOCK TABLE {part} IN ACCESS EXCLUSIVE MODE NOWAIT";

// $1 lock_timeout, for the rest of the transaction
const LOCK_TIMEOUT: &str = "SELECT set_config('lock_timeout', $1, true)";

// $1 at most this many + 1
const COUNT: &str = "SELECT count(*) FROM (SELECT 1 FROM {part} LIMIT $1 + 1) AS l";

// $1 current generation
const MOVE: &str = r#"
INSERT INTO {table} (id, gen, queue, payload, headers, correlation_id, attempts, deliveries,
                     created_at, next_attempt_at, first_attempt_at, last_attempt_at,
                     acquired_at, acquired_token, acquired_by, last_error)
SELECT id, $1, queue, payload, headers, correlation_id, attempts, deliveries,
       created_at, next_attempt_at, first_attempt_at, last_attempt_at,
       acquired_at, acquired_token, acquired_by, last_error
FROM {part}"#;

const TRUNCATE: &str = "TRUNCATE {part}";

// $1 new counter value
const ADVANCE: &str = "SELECT setval('{gen_seq}', $1, true)";

/// Rendered statements of one partition.
#[derive(Debug)]
struct PartitionSql {
    lock: SqlStr,
    lock_nowait: SqlStr,
    count: SqlStr,
    truncate: SqlStr,
}

/// Rotation state shared by a backend and its clones.
#[derive(Debug)]
pub(crate) struct Rotator {
    pool: PgPool,
    table: TableName,
    options: parking_lot::RwLock<Rotation>,
    state: SqlStr,
    advance: SqlStr,
    partitions: Vec<PartitionSql>,
    /// Per partition, the statement copying its rows into the current generation.
    moves: Vec<SqlStr>,
    /// The topic log's generations (see [`log`]).
    log: log::LogSql,
    running: AtomicBool,
    /// Shared with the backend: whether statements are prepared.
    persistent: Arc<AtomicBool>,
    last_check: parking_lot::Mutex<Instant>,
    last_advance: parking_lot::Mutex<Instant>,
}

impl Rotator {
    fn persistent(&self) -> bool {
        self.persistent.load(Ordering::Relaxed)
    }

    pub(crate) fn new(pool: PgPool, table: &TableName, persistent: Arc<AtomicBool>) -> Self {
        let per_part = |template: &str, slot: usize| {
            let quoted = table.qualified(&table.partition(slot));
            sql(&render(template, table).replace("{part}", &quoted), table)
        };
        Rotator {
            pool,
            persistent,
            table: table.clone(),
            options: parking_lot::RwLock::new(Rotation::default()),
            state: sql(STATE, table),
            advance: sql(ADVANCE, table),
            partitions: (0..GENERATIONS)
                .map(|slot| PartitionSql {
                    lock: per_part(LOCK, slot),
                    lock_nowait: per_part(LOCK_NOWAIT, slot),
                    count: per_part(COUNT, slot),
                    truncate: per_part(TRUNCATE, slot),
                })
                .collect(),
            moves: (0..GENERATIONS).map(|slot| per_part(MOVE, slot)).collect(),
            log: log::LogSql::new(table),
            running: AtomicBool::new(false),
            last_check: parking_lot::Mutex::new(Instant::now()),
            last_advance: parking_lot::Mutex::new(Instant::now()),
        }
    }

    pub(crate) fn set_options(&self, options: Rotation) {
        *self.options.write() = options;
    }

    /// How long a topic remembers an idempotency key ([`Rotation::key_retention`]).
    pub(crate) fn key_retention(&self) -> Duration {
        self.options.read().key_retention
    }

    /// Starts a background rotation if one is due and none is running. Called after fetches.
    pub(crate) fn tick(self: &Arc<Self>) {
        let options = self.options.read().clone();
        if !options.automatic {
            return;
        }
        {
            let mut last = self.last_check.lock();
            if last.elapsed() < options.check_interval {
                return;
            }
            *last = Instant::now();
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        runtime.spawn(async move {
            let result = async {
                let mut conn = this.pool.acquire().await?;
                this.rotate_on(&mut conn).await?;
                this.rotate_log_on(&mut conn).await
            }
            .await;
            this.running.store(false, Ordering::Release);
            if let Err(error) = result {
                tracing::debug!(target: "postbox", table = %this.table, %error, "postbox.rotate: failed; will try again");
            }
        });
    }

    /// One rotation on `conn`: one short transaction per reclaimed generation, then one to
    /// move publishes on. Each takes the table's advisory lock, so concurrent rotators (other
    /// processes) take turns.
    pub(crate) async fn rotate_on(&self, conn: &mut PgConnection) -> Result<RotationReport> {
        let options = self.options.read().clone();
        let mut report = RotationReport::default();
        let state = if self.persistent() {
            self.state(conn).await?
        } else {
            // Behind a transaction pooler, a statement outside a transaction may be bound on
            // another server session than it was parsed on (see `session`).
            let mut tx = conn.begin().await?;
            let state = self.state(&mut tx).await?;
            tx.commit().await?;
            state
        };
        let current = slot_of(state.generation);
        report.current = current;
        let mut empty = [false; GENERATIONS];
        for step in 1..GENERATIONS {
            let slot = (current + step) % GENERATIONS;
            if state.bytes[slot] == 0 {
                empty[slot] = true;
                continue;
            }
            if state.live[slot] > i64::from(options.max_moved) {
                continue;
            }
            match self.reclaim(conn, slot, &options).await? {
                Reclaim::Done { moved } => {
                    report.truncated.push(slot);
                    report.moved += moved;
                    empty[slot] = true;
                }
                Reclaim::Busy => report.busy.push(slot),
                Reclaim::NotDrained => {}
                Reclaim::Raced => {
                    report.skipped = true;
                    return Ok(report);
                }
            }
        }
        let next = (current + 1) % GENERATIONS;
        let size = u64::try_from(state.bytes[current]).unwrap_or_default();
        let old = self.last_advance.lock().elapsed() >= options.max_age;
        if empty[next] && (size >= options.rotate_bytes || (size > 0 && old)) {
            let mut tx = conn.begin().await?;
            if !self.try_lock(&mut tx).await? {
                tx.rollback().await?;
                report.skipped = true;
                return Ok(report);
            }
            let now = self.state(&mut tx).await?;
            // Move on only from the generation this rotation started from, to an empty one,
            // truncated now even if it is empty already: a TRUNCATE marks its statistics
            // unknown (`reltuples = -1`), so plans made while it fills do not take it for an
            // empty table, and it invalidates the plans made while it was one.
            if now.generation == state.generation
                && now.bytes[next] == 0
                && self
                    .truncate_empty(&mut tx, &self.partitions[next], options.lock_wait)
                    .await?
            {
                sqlx::query(self.advance.clone())
                    .persistent(self.persistent())
                    .bind(state.generation + 1)
                    .execute(&mut *tx)
                    .await?;
                report.advanced = true;
                report.current = next;
            }
            tx.commit().await?;
        }
        if report.advanced {
            *self.last_advance.lock() = Instant::now();
        }
        if report.advanced || !report.truncated.is_empty() || !report.busy.is_empty() {
            tracing::debug!(target: "postbox", table = %self.table, current = report.current, truncated = ?report.truncated, moved = report.moved, busy = ?report.busy, "postbox.rotate");
        }
        Ok(report)
    }

    /// Truncates the empty generation `slot` if its lock is free now; whether it did.
    async fn truncate_empty(
        &self,
        conn: &mut PgConnection,
        part: &PartitionSql,
        wait: Duration,
    ) -> Result<bool> {
        let mut sub = conn.begin().await?;
        if !self.lock_partition(&mut sub, part, wait).await? {
            sub.rollback().await?;
            return Ok(false);
        }
        let rows: i64 = sqlx::query_scalar(part.count.clone())
            .persistent(self.persistent())
            .bind(0_i64)
            .fetch_one(&mut *sub)
            .await?;
        if rows > 0 {
            sub.rollback().await?;
            return Ok(false);
        }
        sqlx::query(part.truncate.clone())
            .persistent(self.persistent())
            .execute(&mut *sub)
            .await?;
        sub.commit().await?;
        Ok(true)
    }

    /// Sets `lock_timeout` to `wait` (at least 1 ms) for the rest of the transaction.
    async fn set_lock_timeout(&self, conn: &mut PgConnection, wait: Duration) -> Result<()> {
        let ms = wait.as_millis().max(1);
        sqlx::query(LOCK_TIMEOUT)
            .persistent(self.persistent())
            .bind(format!("{ms}ms"))
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Takes partition `slot`'s `ACCESS EXCLUSIVE` lock, waiting at most `wait` (`NOWAIT` if
    /// zero); `false` when another transaction held a lock on it all that time (`55P03`). The
    /// caller rolls back on `false`. Sets `lock_timeout` for the rest of the transaction.
    async fn lock_partition(
        &self,
        conn: &mut PgConnection,
        part: &PartitionSql,
        wait: Duration,
    ) -> Result<bool> {
        let lock = if wait.is_zero() {
            part.lock_nowait.clone()
        } else {
            self.set_lock_timeout(&mut *conn, wait).await?;
            part.lock.clone()
        };
        match sqlx::query(lock)
            .persistent(self.persistent())
            .execute(conn)
            .await
        {
            Ok(_) => Ok(true),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The generation counter and each partition's size and live-row estimate.
    async fn state(&self, conn: &mut PgConnection) -> Result<State> {
        let row = sqlx::query(self.state.clone())
            .persistent(self.persistent())
            .fetch_one(conn)
            .await?;
        Ok(State {
            generation: row.try_get("gen")?,
            bytes: row.try_get("bytes")?,
            live: row.try_get("live")?,
        })
    }

    async fn try_lock(&self, conn: &mut PgConnection) -> Result<bool> {
        Ok(sqlx::query_scalar(TRY_LOCK)
            .persistent(self.persistent())
            .bind(format!("postbox:rotate:{}", self.table))
            .fetch_one(conn)
            .await?)
    }

    /// Reclaims generation `slot`: under its `ACCESS EXCLUSIVE` lock (waited for at most
    /// `lock_wait` per attempt, a few attempts), copies the rows left into the current
    /// generation and truncates it, in one transaction.
    async fn reclaim(
        &self,
        conn: &mut PgConnection,
        slot: usize,
        options: &Rotation,
    ) -> Result<Reclaim> {
        let part = &self.partitions[slot];
        for attempt in 0..LOCK_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(LOCK_RETRY).await;
            }
            let mut tx = conn.begin().await?;
            if !self.try_lock(&mut tx).await? {
                tx.rollback().await?;
                return Ok(Reclaim::Raced);
            }
            if !self
                .lock_partition(&mut tx, part, options.lock_wait)
                .await?
            {
                tx.rollback().await?;
                continue;
            }
            // Under the advisory lock the counter cannot move; read it again, since another
            // rotator may have moved it since this rotation started.
            let current = slot_of(self.state(&mut tx).await?.generation);
            if current == slot {
                tx.rollback().await?;
                return Ok(Reclaim::Raced);
            }
            let max_moved = i64::from(options.max_moved);
            let rows: i64 = sqlx::query_scalar(part.count.clone())
                .persistent(self.persistent())
                .bind(max_moved)
                .fetch_one(&mut *tx)
                .await?;
            if rows > max_moved {
                tx.rollback().await?;
                return Ok(Reclaim::NotDrained);
            }
            let moved = if rows > 0 {
                sqlx::query(self.moves[slot].clone())
                    .persistent(self.persistent())
                    .bind(i16::try_from(current).unwrap_or_default())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
            } else {
                0
            };
            sqlx::query(part.truncate.clone())
                .persistent(self.persistent())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(Reclaim::Done { moved });
        }
        Ok(Reclaim::Busy)
    }
}

/// How many times a reclaim asks for a generation's lock, and how long it pauses in between
/// (letting the statements that queued behind a timed-out request run).
const LOCK_ATTEMPTS: usize = 5;
const LOCK_RETRY: Duration = Duration::from_millis(5);

/// What [`Rotator::state`] reads.
#[derive(Debug, Clone)]
struct State {
    generation: i64,
    bytes: Vec<i64>,
    live: Vec<i64>,
}

/// How one reclaim ended.
enum Reclaim {
    Done {
        moved: u64,
    },
    /// Every attempt found the lock held.
    Busy,
    /// More rows left than [`Rotation::max_moved`].
    NotDrained,
    /// Another rotator holds the advisory lock, or moved the generation on.
    Raced,
}

/// The partition a generation counter value writes to.
fn slot_of(generation: i64) -> usize {
    usize::try_from(generation.rem_euclid(GENERATIONS as i64)).unwrap_or_default()
}

impl PgBackend {
    /// Sets when generations rotate, for this backend and every clone of it (see
    /// [`Rotation`]).
    pub fn rotation(self, rotation: Rotation) -> Self {
        self.shared().rotator.set_options(rotation);
        self
    }

    /// Runs one rotation now: reclaims the drained generations that no transaction holds and
    /// moves publishes on to a new one when the current one is full or old. Fetches do this
    /// in the background (see [`Rotation::automatic`]); call it yourself to reclaim space at
    /// a moment of your choosing, or when rotation is manual.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database); nothing is changed then.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a rotation is a few short transactions, each complete on its own; a dropped
    /// call stops between two of them and the next `rotate` carries on from there.
    pub async fn rotate(&self) -> Result<RotationReport> {
        let mut conn = self.shared().pool.acquire().await?;
        self.shared().rotator.rotate_on(&mut conn).await
    }

    /// Runs one rotation of the topic log now: truncates each generation of `T_log` that
    /// every subscription has passed (and no unsettled batch refers to), and moves publishes
    /// on to a new generation when the current one is full or old, with the same
    /// [`Rotation`] settings as the outbox. Receives do this in the background; nothing is
    /// copied, so a subscription that lags keeps its generations until it catches up.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database); nothing is changed then.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a rotation is a few short transactions, each complete on its own; a dropped
    /// call stops between two of them and the next `rotate_topics` carries on from there.
    pub async fn rotate_topics(&self) -> Result<RotationReport> {
        let mut conn = self.shared().pool.acquire().await?;
        self.shared().rotator.rotate_log_on(&mut conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_counter_maps_to_slots_in_turn() {
        assert_eq!(
            (0..7).map(slot_of).collect::<Vec<_>>(),
            [0, 1, 2, 0, 1, 2, 0]
        );
    }

    #[tokio::test]
    async fn statements_name_each_partition() {
        let rotator = Rotator::new(
            sqlx::postgres::PgPoolOptions::new()
                .connect_lazy("postgres://localhost/x")
                .expect("lazy pool"),
            &TableName::new("jobs").expect("valid"),
            Arc::new(AtomicBool::new(true)),
        );
        assert_eq!(
            rotator.partitions[2].truncate.as_str(),
            r#"TRUNCATE "jobs_p2""#
        );
        assert!(!rotator.state.as_str().contains('{'));
    }
}
