//! Rotation of the topic log: its generations (`T_log_p0..2`) fill in turn, and one that no
//! subscription needs any more is reclaimed with `TRUNCATE`. The batches subscriptions hand
//! out (`T_batches_p0..2`) are written to the generation the log is in, and a generation of
//! them is truncated once all of its batches are settled.
//!
//! Nothing is ever copied out of the log: a subscription's exceptions live in `T_held`, so
//! a generation is reclaimable exactly when every subscription of every topic in it has
//! passed all of its rows, and no unsettled batch refers to one. The check runs under the
//! generation's `ACCESS EXCLUSIVE` lock, waited for at most [`Rotation::lock_wait`] (an
//! uncommitted publish into it holds a lock, so its rows cannot be lost), and under a
//! `SHARE` lock on `T_subs` and `T_batches`, so that no subscription is created, and no cursor
//! moves, between the check and the `TRUNCATE`. A rotation of the log is skipped while another
//! process rotates it (advisory lock), like the outbox's.
//!
//! A subscription's cursor is its newest batch. Before a generation of batches is truncated,
//! the cursor of each subscription whose newest batch is there is carried into its row of
//! `T_subs`, under an `EXCLUSIVE` lock on `T_subs` that waits for receives in progress and
//! holds new ones back for the few milliseconds the step takes.

use std::time::{Duration, Instant};

use sqlx::{Acquire, PgConnection, Row, SqlStr};

use super::{PartitionSql, RotationReport, Rotator, TRY_LOCK, slot_of};
use crate::error::Result;
use crate::pg::statements::{render, sql};
use crate::table::{GENERATIONS, TableName};

// The log's generation counter, then per partition the heap size of the log and of the
// batches.
const STATE: &str = r#"
SELECT (SELECT last_value FROM {log_gen}) AS gen,
       ARRAY[pg_relation_size('{log_p0}'), pg_relation_size('{log_p1}'),
             pg_relation_size('{log_p2}')] AS bytes,
       ARRAY[pg_relation_size('{batches_p0}'), pg_relation_size('{batches_p1}'),
             pg_relation_size('{batches_p2}')] AS batch_bytes"#;

// $1 new counter value
const ADVANCE: &str = "SELECT setval('{log_gen}', $1, true)";

// $1 retention in ms
const FORGET_KEYS: &str =
    "DELETE FROM {keys} WHERE created_at < now() - $1::float8 * interval '1 millisecond'";

const LOCK_SUBSCRIPTIONS: &str = "LOCK TABLE {subs}, {batches} IN SHARE MODE";

const LOCK_SUBSCRIPTIONS_EXCLUSIVE: &str = "LOCK TABLE {subs} IN EXCLUSIVE MODE";

/// Whether any subscription still needs a row of `{part}`: a row its cursor (its newest
/// batch, else its row) has not passed (not visible in `lo`, and not at or before the
/// position in `(lo, hi]`), or an unsettled message of one of its batches. Read as rows after
/// the position (an index range from it) and rows of transactions in flight at `lo` or `hi`
/// (index probes), never as a scan of the rows already passed: a lagging subscription in a
/// large generation made the old form read it all under the `SHARE` lock receives wait on.
const NEEDED: &str = r#"
SELECT EXISTS (
    SELECT 1 FROM {subs} AS x
    CROSS JOIN LATERAL (
        (SELECT b.lo, b.hi, b.pos_xid, b.pos_id
         FROM {batches} AS b WHERE b.sub = x.name ORDER BY b.seq DESC LIMIT 1)
        UNION ALL
        (SELECT x.lo, x.hi, x.pos_xid, x.pos_id)
        LIMIT 1
    ) AS c
    WHERE EXISTS (
        -- After the position: one index range, stopping at the first row not in `lo`.
        SELECT 1 FROM {part} AS l
        WHERE l.topic = x.topic
          AND (l.xid, l.id) > (c.pos_xid, c.pos_id)
          AND NOT pg_visible_in_snapshot(l.xid, c.lo)
    ) OR EXISTS (
        -- At or before it, a row is unpassed only if its transaction was in flight at `hi`
        -- (the position is visible in `hi`): one index probe per such transaction.
        SELECT 1
        FROM (SELECT pg_snapshot_xip(c.lo) AS xid UNION ALL SELECT pg_snapshot_xip(c.hi)) AS t
        JOIN {part} AS l ON l.topic = x.topic AND l.xid = t.xid
        WHERE NOT pg_visible_in_snapshot(l.xid, c.lo)
          AND NOT (pg_visible_in_snapshot(l.xid, c.hi)
                   AND (l.xid, l.id) <= (c.pos_xid, c.pos_id))
    )
) OR EXISTS (
    SELECT 1
    FROM {batches} AS b
    CROSS JOIN LATERAL unnest(b.ids, b.xids) AS u(id, xid)
    JOIN {part} AS l ON l.topic = b.topic AND l.xid = u.xid AND l.id = u.id
    WHERE NOT b.done AND NOT (u.id = ANY (b.settled))
)"#;

/// Whether a batch of `{part}` is not settled yet.
const UNSETTLED: &str = "SELECT EXISTS (SELECT 1 FROM {part} WHERE NOT done)";

/// Carries the cursor of each subscription whose newest batch is in `{part}` into its row.
const CARRY: &str = r#"
UPDATE {subs} AS x
SET lo = c.lo, hi = c.hi, pos_xid = c.pos_xid, pos_id = c.pos_id, checked_at = c.checked_at
FROM (SELECT DISTINCT ON (p.sub) p.sub, p.seq, p.lo, p.hi, p.pos_xid, p.pos_id, p.checked_at
      FROM {part} AS p
      ORDER BY p.sub, p.seq DESC) AS c
WHERE x.name = c.sub
  AND NOT EXISTS (SELECT 1 FROM {batches} AS b WHERE b.sub = c.sub AND b.seq > c.seq)"#;

/// Rendered statements and state of the log's rotation.
#[derive(Debug)]
pub(super) struct LogSql {
    state: SqlStr,
    advance: SqlStr,
    lock_subscriptions: SqlStr,
    lock_subscriptions_nowait: SqlStr,
    lock_subscriptions_exclusive: SqlStr,
    lock_subscriptions_exclusive_nowait: SqlStr,
    lock_key: String,
    forget_keys: SqlStr,
    partitions: Vec<PartitionSql>,
    needed: Vec<SqlStr>,
    /// The batches' generations, and per generation the unsettled check and the carry.
    batch_partitions: Vec<PartitionSql>,
    unsettled: Vec<SqlStr>,
    carry: Vec<SqlStr>,
    last_advance: parking_lot::Mutex<Instant>,
}

impl LogSql {
    pub(super) fn new(table: &TableName) -> Self {
        let per_part = |template: &str, slot: usize| {
            let quoted = table.qualified(&table.log_partition(slot));
            sql(&render(template, table).replace("{part}", &quoted), table)
        };
        let per_batch_part = |template: &str, slot: usize| {
            let quoted = table.qualified(&table.batch_partition(slot));
            sql(&render(template, table).replace("{part}", &quoted), table)
        };
        LogSql {
            state: sql(STATE, table),
            advance: sql(ADVANCE, table),
            lock_subscriptions: sql(LOCK_SUBSCRIPTIONS, table),
            lock_subscriptions_nowait: sql(&format!("{LOCK_SUBSCRIPTIONS} NOWAIT"), table),
            lock_subscriptions_exclusive: sql(LOCK_SUBSCRIPTIONS_EXCLUSIVE, table),
            lock_subscriptions_exclusive_nowait: sql(
                &format!("{LOCK_SUBSCRIPTIONS_EXCLUSIVE} NOWAIT"),
                table,
            ),
            lock_key: format!("postbox:rotate-log:{table}"),
            forget_keys: sql(FORGET_KEYS, table),
            partitions: (0..GENERATIONS)
                .map(|slot| PartitionSql {
                    lock: per_part(super::LOCK, slot),
                    lock_nowait: per_part(super::LOCK_NOWAIT, slot),
                    count: per_part(super::COUNT, slot),
                    truncate: per_part(super::TRUNCATE, slot),
                })
                .collect(),
            needed: (0..GENERATIONS)
                .map(|slot| per_part(NEEDED, slot))
                .collect(),
            batch_partitions: (0..GENERATIONS)
                .map(|slot| PartitionSql {
                    lock: per_batch_part(super::LOCK, slot),
                    lock_nowait: per_batch_part(super::LOCK_NOWAIT, slot),
                    count: per_batch_part(super::COUNT, slot),
                    truncate: per_batch_part(super::TRUNCATE, slot),
                })
                .collect(),
            unsettled: (0..GENERATIONS)
                .map(|slot| per_batch_part(UNSETTLED, slot))
                .collect(),
            carry: (0..GENERATIONS)
                .map(|slot| per_batch_part(CARRY, slot))
                .collect(),
            last_advance: parking_lot::Mutex::new(Instant::now()),
        }
    }
}

/// The log's generation counter and each partition's heap size, the log's and the
/// batches'.
struct LogState {
    generation: i64,
    bytes: Vec<i64>,
    batch_bytes: Vec<i64>,
}

impl Rotator {
    async fn log_state(&self, conn: &mut PgConnection) -> Result<LogState> {
        let row = sqlx::query(self.log.state.clone())
            .persistent(self.persistent())
            .fetch_one(conn)
            .await?;
        Ok(LogState {
            generation: row.try_get("gen")?,
            bytes: row.try_get("bytes")?,
            batch_bytes: row.try_get("batch_bytes")?,
        })
    }

    async fn log_try_lock(&self, conn: &mut PgConnection) -> Result<bool> {
        Ok(sqlx::query_scalar(TRY_LOCK)
            .persistent(self.persistent())
            .bind(&self.log.lock_key)
            .fetch_one(conn)
            .await?)
    }

    /// One rotation of the topic log on `conn`: reclaims each non-current generation no
    /// subscription needs, then moves publishes on when the current one is full or old and
    /// the next one is empty. One short transaction per step.
    pub(crate) async fn rotate_log_on(&self, conn: &mut PgConnection) -> Result<RotationReport> {
        let options = self.options.read().clone();
        let mut report = RotationReport::default();
        let state = {
            let mut tx = conn.begin().await?;
            let state = self.log_state(&mut tx).await?;
            tx.commit().await?;
            state
        };
        let current = slot_of(state.generation);
        report.current = current;
        let mut empty = [false; GENERATIONS];
        let mut batches_empty = [false; GENERATIONS];
        for step in 1..GENERATIONS {
            let slot = (current + step) % GENERATIONS;
            batches_empty[slot] = state.batch_bytes[slot] == 0
                || match self.truncate_batches(conn, slot, options.lock_wait).await? {
                    Some(true) => {
                        report.batches_truncated.push(slot);
                        true
                    }
                    Some(false) => false,
                    None => {
                        report.skipped = true;
                        return Ok(report);
                    }
                };
            if state.bytes[slot] == 0 {
                empty[slot] = true;
                continue;
            }
            let mut tx = conn.begin().await?;
            if !self.log_try_lock(&mut tx).await? {
                tx.rollback().await?;
                report.skipped = true;
                return Ok(report);
            }
            let part = &self.log.partitions[slot];
            if !self
                .lock_partition(&mut tx, part, options.lock_wait)
                .await?
                || !self.lock_subscriptions(&mut tx, options.lock_wait).await?
            {
                tx.rollback().await?;
                report.busy.push(slot);
                continue;
            }
            // Under the advisory lock the counter cannot move; it may have since the start.
            if slot_of(self.log_state(&mut tx).await?.generation) == slot {
                tx.rollback().await?;
                report.skipped = true;
                return Ok(report);
            }
            let needed: bool = sqlx::query_scalar(self.log.needed[slot].clone())
                .persistent(self.persistent())
                .fetch_one(&mut *tx)
                .await?;
            if needed {
                tx.rollback().await?;
                continue;
            }
            sqlx::query(part.truncate.clone())
                .persistent(self.persistent())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            report.truncated.push(slot);
            empty[slot] = true;
        }
        let next = (current + 1) % GENERATIONS;
        let size = u64::try_from(state.bytes[current]).unwrap_or_default();
        let old = self.log.last_advance.lock().elapsed() >= options.max_age;
        if empty[next] && batches_empty[next] && (size >= options.rotate_bytes || (size > 0 && old))
        {
            let mut tx = conn.begin().await?;
            if !self.log_try_lock(&mut tx).await? {
                tx.rollback().await?;
                report.skipped = true;
                return Ok(report);
            }
            let now = self.log_state(&mut tx).await?;
            if now.generation == state.generation
                && now.bytes[next] == 0
                && now.batch_bytes[next] == 0
                && self
                    .truncate_empty(&mut tx, &self.log.partitions[next], options.lock_wait)
                    .await?
                && self
                    .truncate_empty(&mut tx, &self.log.batch_partitions[next], options.lock_wait)
                    .await?
            {
                sqlx::query(self.log.advance.clone())
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
            *self.log.last_advance.lock() = Instant::now();
        }
        // Idempotency keys past their retention: an index range on `created_at`.
        let mut tx = conn.begin().await?;
        let forgotten = sqlx::query(self.log.forget_keys.clone())
            .persistent(self.persistent())
            .bind(options.key_retention.as_secs_f64() * 1000.0)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        if forgotten > 0 {
            tracing::debug!(target: "postbox", table = %self.table, forgotten, "postbox.rotate: idempotency keys forgotten");
        }
        if report.advanced
            || !report.truncated.is_empty()
            || !report.busy.is_empty()
            || !report.batches_truncated.is_empty()
        {
            tracing::debug!(target: "postbox", table = %self.table, current = report.current, truncated = ?report.truncated, batches_truncated = ?report.batches_truncated, busy = ?report.busy, "postbox.rotate: topic log");
        }
        Ok(report)
    }

    /// Truncates the batches' generation `slot` if every batch in it is settled, first
    /// carrying the cursors it holds into `T_subs`. `Some(truncated)`; `None` when another
    /// process is rotating the log. Not truncated when a receive or settle kept a lock for
    /// longer than `wait`, or a batch is unsettled: a later rotation tries again.
    async fn truncate_batches(
        &self,
        conn: &mut PgConnection,
        slot: usize,
        wait: Duration,
    ) -> Result<Option<bool>> {
        let mut tx = conn.begin().await?;
        if !self.log_try_lock(&mut tx).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        // `T_subs` first, as receives take it: they lock a subscription's row, then read
        // the batches.
        let exclusive = if wait.is_zero() {
            self.log.lock_subscriptions_exclusive_nowait.clone()
        } else {
            self.set_lock_timeout(&mut tx, wait).await?;
            self.log.lock_subscriptions_exclusive.clone()
        };
        let part = &self.log.batch_partitions[slot];
        if !self.lock_statement(&mut tx, exclusive).await?
            || !self.lock_partition(&mut tx, part, wait).await?
        {
            tx.rollback().await?;
            return Ok(Some(false));
        }
        // Under the advisory lock the counter cannot move; it may have since the start.
        if slot_of(self.log_state(&mut tx).await?.generation) == slot {
            tx.rollback().await?;
            return Ok(Some(false));
        }
        let unsettled: bool = sqlx::query_scalar(self.log.unsettled[slot].clone())
            .persistent(self.persistent())
            .fetch_one(&mut *tx)
            .await?;
        if unsettled {
            tx.rollback().await?;
            return Ok(Some(false));
        }
        sqlx::query(self.log.carry[slot].clone())
            .persistent(self.persistent())
            .execute(&mut *tx)
            .await?;
        sqlx::query(part.truncate.clone())
            .persistent(self.persistent())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(true))
    }

    /// Takes the `SHARE` lock on `T_subs`, waiting at most `wait` (`lock_timeout`, already
    /// set for the transaction by the partition's lock when `wait` is not zero).
    async fn lock_subscriptions(&self, conn: &mut PgConnection, wait: Duration) -> Result<bool> {
        let lock = if wait.is_zero() {
            self.log.lock_subscriptions_nowait.clone()
        } else {
            self.log.lock_subscriptions.clone()
        };
        self.lock_statement(conn, lock).await
    }

    /// Runs a `LOCK TABLE` statement; `false` when it timed out or found the lock taken.
    async fn lock_statement(&self, conn: &mut PgConnection, lock: SqlStr) -> Result<bool> {
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
}
