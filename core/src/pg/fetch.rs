//! The lease-based fetch: one statement that picks, locks and leases rows.
//!
//! Two branches, each shaped for its partial index and run per queue (a LATERAL join over the
//! queue list, so every branch is an ordered index scan with a LIMIT, whatever the number of
//! queues):
//!
//! - **ready** rows (`acquired_token IS NULL AND next_attempt_at <= now`) read
//!   `T_pending_idx (queue, next_attempt_at, id)` in order;
//! - **expired** leases (`acquired_at < now - lease_ttl`) read `T_lease_idx (queue, acquired_at)`
//!   and sort the (normally few) matches, so that the union's first `limit` rows are exactly
//!   the first `limit` eligible rows in `(next_attempt_at, id)` order.
//!
//! The table is partitioned into generations (see `rotate.rs`); each branch reads every
//! generation with its own ordered scan of that partition's index piece, and the lease finds
//! the picked rows by `id = ANY (...)`, so that one generic plan suits every size a generation
//! goes through.
//!
//! Both lock with `FOR UPDATE SKIP LOCKED`, so concurrent fetchers never block on or share a
//! row. The union is cut to `limit` in `(next_attempt_at, id)` order and leased under one fresh
//! token. Rows already leased `max_deliveries` times move to the dead-letter table in the same
//! statement instead. All times come from the database clock.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::Inner;
use crate::cancel::Cancellation;
use crate::error::Result;
use crate::fetch::FetchParams;
use crate::message::Delivery;

/// The ready branch shared by the fetch and the cooperative receive: per queue, the first
/// `limit` unleased rows that are due, locked. Uses $1 queues, $2 limit, $7 pinned now.
///
/// Each generation is read by its own ordered scan with its own LIMIT, named by partition,
/// rather than through the partitioned table: a cached plan of the parent chooses per
/// partition between merging ordered index scans and sorting everything, by the partition's
/// size when it was planned, and a partition that looked empty then is full later (see
/// `docs/design/storage.md`, *Plans*). A single table's ordered LIMIT keeps its index scan.
/// The scan is written once and repeated per partition at render time (`{each_generation}`,
/// `statements.rs`). Up to `limit` rows per generation are locked; those not picked are
/// unlocked, unchanged, when the statement ends.
macro_rules! ready_branch {
    () => {
        r#"ready AS (
    SELECT r.id, r.gen, r.next_attempt_at, r.deliveries
    FROM unnest($1::text[]) AS q(name)
    CROSS JOIN LATERAL (
{each_generation}
        SELECT * FROM (SELECT id, gen, next_attempt_at, deliveries
         FROM {part}
         WHERE queue = q.name
           AND acquired_token IS NULL
           AND next_attempt_at <= coalesce($7::timestamptz, now())
         ORDER BY queue, next_attempt_at, id
         LIMIT $2
         FOR UPDATE SKIP LOCKED) AS g{slot}
{end_each_generation}
    ) AS r
)"#
    };
}

/// The end shared by the fetch and the cooperative receive: lease the `picked` rows under one
/// token, or move those already delivered `max_deliveries` times to the dead-letter table.
///
/// The rows are found by `id = ANY (ARRAY(...))`, an index probe per id in each partition,
/// rather than by a join with `picked`: a cached generic plan cannot know how many rows
/// `picked` holds and may hash-join it with a sequential scan of every partition, which costs
/// a whole generation per fetch. The picked rows are locked, so their `deliveries` are the
/// values `picked` read.
/// Uses $4 token, $5 acquired_by, $6 max deliveries (NULL: none), $7 pinned now.
macro_rules! lease_or_bury {
    () => {
        r#"leased AS (
    UPDATE {table} AS t
    SET acquired_token   = $4,
        acquired_at      = coalesce($7::timestamptz, now()),
        acquired_by      = $5,
        deliveries       = t.deliveries + 1,
        first_attempt_at = coalesce(t.first_attempt_at, coalesce($7::timestamptz, now())),
        last_attempt_at  = coalesce($7::timestamptz, now())
    WHERE t.id = ANY (ARRAY(SELECT id FROM picked))
      AND t.deliveries < coalesce($6::integer, 2147483647)
    RETURNING t.id, t.queue, t.payload, t.headers, t.correlation_id, t.attempts, t.deliveries,
              t.created_at, t.next_attempt_at, t.first_attempt_at, t.acquired_at,
              t.acquired_token, t.acquired_by, t.last_error
),
exhausted AS (
    DELETE FROM {table} AS t
    WHERE t.id = ANY (ARRAY(SELECT id FROM picked))
      AND t.deliveries >= coalesce($6::integer, 2147483647)
    RETURNING t.*
),
buried AS (
    INSERT INTO {dead} (id, queue, payload, headers, correlation_id, attempts, deliveries,
                        created_at, next_attempt_at, first_attempt_at, last_attempt_at,
                        acquired_by, last_error, dead_at, reason)
    SELECT id, queue, payload, headers, correlation_id, attempts, deliveries,
           created_at, next_attempt_at, first_attempt_at, last_attempt_at,
           acquired_by, last_error, coalesce($7::timestamptz, now()),
           'max_deliveries exceeded: leased ' || deliveries || ' times without an outcome'
    FROM exhausted
)
SELECT * FROM leased ORDER BY next_attempt_at, id"#
    };
}

pub(crate) use {lease_or_bury, ready_branch};

// $1 queues, $2 limit, $3 lease ttl in ms, $4 new token, $5 acquired_by,
// $6 max deliveries (NULL: none), $7 pinned now (NULL: the database clock)
pub(crate) const FETCH: &str = concat!(
    "\nWITH ",
    ready_branch!(),
    r#",
expired AS (
    SELECT e.id, e.gen, e.next_attempt_at, e.deliveries
    FROM unnest($1::text[]) AS q(name)
    CROSS JOIN LATERAL (
{each_generation}
        SELECT * FROM (SELECT id, gen, next_attempt_at, deliveries
         FROM {part}
         WHERE queue = q.name
           AND acquired_token IS NOT NULL
           AND acquired_at < coalesce($7::timestamptz, now()) - $3::float8 * interval '1 millisecond'
         ORDER BY next_attempt_at, id
         LIMIT $2
         FOR UPDATE SKIP LOCKED) AS g{slot}
{end_each_generation}
    ) AS e
),
picked AS (
    SELECT id, gen, deliveries
    FROM (SELECT * FROM ready UNION ALL SELECT * FROM expired) AS c
    ORDER BY next_attempt_at, id
    LIMIT $2
),
"#,
    lease_or_bury!()
);

/// Binds the fetch parameters to `sql` (the fetch statement, or its EXPLAIN).
fn bind_fetch<'q>(
    sql: sqlx::SqlStr,
    params: &'q FetchParams,
    token: Uuid,
    now: Option<chrono::DateTime<chrono::Utc>>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql)
        .bind(params.get_queues())
        .bind(i64::from(params.get_limit()))
        .bind(params.get_lease_ttl().as_secs_f64() * 1000.0)
        .bind(token)
        .bind(params.get_acquired_by())
        .bind(
            params
                .get_max_deliveries()
                .map(|n| i32::try_from(n).unwrap_or(i32::MAX)),
        )
        .bind(now)
}

impl Inner {
    /// Runs the fetch statement on `conn` (a pool connection, or the runtime's persistent
    /// fetch connection).
    pub(crate) async fn fetch_on(
        &self,
        conn: &mut PgConnection,
        params: &FetchParams,
    ) -> Result<Vec<Delivery>> {
        params.validate()?;
        let token = Uuid::new_v4();
        let rows = bind_fetch(self.sql.fetch.clone(), params, token, self.now())
            .persistent(self.persistent())
            .fetch_all(conn)
            .await?;
        let deliveries = rows.iter().map(delivery).collect::<Result<Vec<_>, _>>()?;
        self.rotator.tick();
        if !deliveries.is_empty() {
            tracing::debug!(target: "postbox", table = %self.table, rows = deliveries.len(), batch = %token, "postbox.fetch");
        }
        Ok(deliveries)
    }
}

impl super::PgBackend {
    /// The query plan Postgres would use for this fetch (`EXPLAIN`, nothing is executed), to
    /// check that both branches use their partial index.
    ///
    /// **Feature:** `test-util`.
    ///
    /// # Errors
    ///
    /// As [`Consume::fetch`](crate::Consume::fetch).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only; drop the call and make it again.
    #[cfg(feature = "test-util")]
    pub async fn explain_fetch(&self, params: &FetchParams) -> Result<String> {
        use sqlx::SqlSafeStr;

        params.validate()?;
        let inner = &self.engine.inner;
        let explain =
            sqlx::AssertSqlSafe(format!("EXPLAIN {}", inner.sql.fetch.as_str())).into_sql_str();
        let mut session = inner.session().await?;
        let lines: Vec<String> = bind_fetch(explain, params, Uuid::new_v4(), inner.now())
            .persistent(false)
            .fetch_all(&mut *session)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<_, _>>()?;
        session.done().await?;
        Ok(lines.join("\n"))
    }
}

/// Decodes one leased row.
pub(crate) fn delivery(row: &PgRow) -> Result<Delivery, sqlx::Error> {
    Ok(Delivery {
        envelope: super::inspect::envelope(row, "queue")?,
        created_at: row.try_get("created_at")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        first_attempt_at: row.try_get("first_attempt_at")?,
        acquired_at: row.try_get("acquired_at")?,
        token: row.try_get("acquired_token")?,
        acquired_by: row.try_get("acquired_by")?,
        cancel: Cancellation::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::statements::render;
    use crate::table::TableName;

    #[test]
    fn fetch_sql_snapshot_custom_table() {
        let table = TableName::new("orders_outbox").expect("valid");
        insta::assert_snapshot!(render(FETCH, &table));
    }
}
