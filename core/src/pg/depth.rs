//! Queue depths on Postgres: one function call that counts from the partial indexes.
//!
//! Counting a queue's ready messages has to visit each of them, but it need not read the
//! rows' payloads nor sort anything: the ready and scheduled counts come from `T_pending_idx`
//! (its predicate is exactly "not leased"), the leased count from `T_lease_idx`, the dead
//! count from `T_dead_idx`, each grouped by queue in index order. The statements run inside
//! a function declared `SET enable_seqscan = off`, like the outcome functions, so a plan made
//! while a generation looked empty cannot turn into a sequential scan of a full one
//! (`tests/pg_depth.rs` checks that no table is scanned sequentially).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::PgBackend;
use crate::depth::{Depth, QueueDepth};
use crate::error::Result;

/// The migration: the dead letters' index, and the function.
pub(crate) const V10: &str = r#"
CREATE INDEX IF NOT EXISTS {dead_idx} ON {dead} (queue, dead_at);

CREATE FUNCTION {depths_fn}(p_queue text, p_now timestamptz)
RETURNS TABLE (queue text, ready bigint, scheduled bigint, leased bigint, dead bigint,
               oldest_ready_at timestamptz)
LANGUAGE sql STABLE SET enable_seqscan = off SET jit = off AS $postbox$
WITH clock AS (
    SELECT coalesce(p_now, now()) AS t
),
pending AS (
    SELECT x.queue AS queue,
           count(*) FILTER (WHERE x.next_attempt_at <= c.t) AS ready,
           count(*) FILTER (WHERE x.next_attempt_at > c.t) AS scheduled,
           min(x.next_attempt_at) AS first_due
    FROM {table} AS x CROSS JOIN clock AS c
    WHERE x.acquired_token IS NULL AND (p_queue IS NULL OR x.queue = p_queue)
    GROUP BY x.queue
),
leased AS (
    SELECT x.queue AS queue, count(*) AS n
    FROM {table} AS x
    WHERE x.acquired_token IS NOT NULL AND (p_queue IS NULL OR x.queue = p_queue)
    GROUP BY x.queue
),
buried AS (
    SELECT d.queue AS queue, count(*) AS n
    FROM {dead} AS d
    WHERE p_queue IS NULL OR d.queue = p_queue
    GROUP BY d.queue
),
queues AS (
    SELECT p.queue FROM pending AS p
    UNION SELECT l.queue FROM leased AS l
    UNION SELECT b.queue FROM buried AS b
)
SELECT q.queue,
       coalesce(p.ready, 0),
       coalesce(p.scheduled, 0),
       coalesce(l.n, 0),
       coalesce(b.n, 0),
       CASE WHEN p.ready > 0 THEN p.first_due END
FROM queues AS q
LEFT JOIN pending AS p ON p.queue = q.queue
LEFT JOIN leased AS l ON l.queue = q.queue
LEFT JOIN buried AS b ON b.queue = q.queue
ORDER BY q.queue
$postbox$;
"#;

// $1 queue (NULL: every queue), $2 pinned now. The clock the function counted by comes back
// with each row (`now()` is the statement's transaction time, as inside the function), so
// the lag needs no second round trip to read it.
pub(crate) const DEPTHS: &str =
    "SELECT d.*, coalesce($2, now()) AS counted_at FROM {depths_fn}($1, $2) AS d";

#[async_trait]
impl Depth for PgBackend {
    async fn queue_depths(&self, queue: Option<&str>) -> Result<Vec<QueueDepth>> {
        if let Some(queue) = queue {
            crate::validate_queue(queue)?;
        }
        let shared = self.shared();
        let mut session = shared.session().await?;
        let rows = sqlx::query(shared.sql.depths.clone())
            .persistent(shared.persistent())
            .bind(queue)
            .bind(shared.now())
            .fetch_all(&mut *session)
            .await?;
        session.done().await?;
        rows.iter()
            .map(|row| {
                let oldest: Option<DateTime<Utc>> = row.try_get("oldest_ready_at")?;
                let now: DateTime<Utc> = row.try_get("counted_at")?;
                Ok(QueueDepth {
                    queue: row.try_get("queue")?,
                    ready: row.try_get("ready")?,
                    scheduled: row.try_get("scheduled")?,
                    leased: row.try_get("leased")?,
                    dead: row.try_get("dead")?,
                    oldest_ready: oldest.map(|at| age(now, at)),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }
}

/// How long before `now` the instant `at` was (zero if after it).
pub(crate) fn age(now: DateTime<Utc>, at: DateTime<Utc>) -> std::time::Duration {
    (now - at).to_std().unwrap_or_default()
}
