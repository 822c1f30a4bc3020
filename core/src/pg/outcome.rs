//! Fenced outcomes: every statement matches `id AND acquired_token`, so a holder whose lease
//! was lost (expired and taken by another fetch) changes nothing, and learns it from the row
//! count.
//!
//! The batch ack runs as an unnamed statement (`persistent(false)`), so it is planned for the
//! generations' sizes at the time it runs. A prepared statement on a pool connection switches
//! to a generic plan after five runs, and a generic plan made while a generation was empty (a
//! `VACUUM` of a drained generation records it as empty) finds its rows by a sequential scan
//! of that generation ever after: measured, up to 346 ms for a 500-row ack mid-drain. Planning
//! it costs about 0.3 ms, spread over hundreds of rows. The single-row outcomes stay prepared:
//! planned on every call they cost 2.8 times as much (`drain`, per-row acks: 2,754 against
//! 7,620 msg/s), so they keep the hazard (3.1 ms instead of 0.07 ms for one ack in a
//! 20,000-row generation planned while empty) until the generation is next truncated,
//! vacuumed or analyzed (see `docs/design/storage.md`, *Plans*).

use uuid::Uuid;

use super::PgBackend;
use crate::backend::RetryParams;
use crate::error::Result;
use crate::message::{Lease, MessageId};

// $1 id, $2 token
pub(crate) const ACK: &str = "DELETE FROM {table} WHERE id = $1 AND acquired_token = $2";

// $1 ids, $2 tokens (pairwise). Planned so that no plan, custom or generic, depends on how many
// ids there are:
// - the rows are found by `id = ANY (ARRAY(SELECT ...))`, an index probe per id in each
//   partition that holds rows. A join with the unnest may become a hash join over a sequential
//   scan of every partition; a custom plan of `id = ANY ($1)` sees the array's length and for a
//   few hundred ids (the batches a draining subscriber acks) scans each partition (measured:
//   4.8 ms against 1.5 ms for 490 ids in a 20,000-row generation);
// - the lease is checked per row against an id -> token map built once (an InitPlan), not by
//   a join with the pairs: a generic plan estimates the unnest at 10 rows and runs a nested
//   loop that re-reads the whole id array for every id (57 ms for 528 ids, measured).
// The token check is in the DELETE's own WHERE, so a row re-leased by a concurrent fetch is
// re-checked against its new token and left alone.
pub(crate) const ACK_BATCH: &str = r#"
DELETE FROM {table} AS t
WHERE t.id = ANY (ARRAY(SELECT unnest($1::bigint[])))
  AND t.acquired_token::text
      = (SELECT jsonb_object($1::bigint[]::text[], $2::uuid[]::text[])) ->> t.id::text
RETURNING t.id"#;

// $1 id, $2 token, $3 delay in ms, $4 error, $5 pinned now
pub(crate) const RETRY: &str = r#"
UPDATE {table}
SET attempts        = attempts + 1,
    next_attempt_at = coalesce($5::timestamptz, now()) + $3::float8 * interval '1 millisecond',
    acquired_token  = NULL,
    acquired_at     = NULL,
    acquired_by     = NULL,
    last_error      = $4
WHERE id = $1 AND acquired_token = $2"#;

// $1 id, $2 token, $3 reason, $4 pinned now
pub(crate) const DEAD_LETTER: &str = r#"
WITH moved AS (
    DELETE FROM {table}
    WHERE id = $1 AND acquired_token = $2
    RETURNING *
)
INSERT INTO {dead} (id, queue, payload, headers, correlation_id, attempts, deliveries,
                    created_at, next_attempt_at, first_attempt_at, last_attempt_at,
                    acquired_by, last_error, dead_at, reason)
SELECT id, queue, payload, headers, correlation_id, attempts + 1, deliveries,
       created_at, next_attempt_at, first_attempt_at, last_attempt_at,
       acquired_by, last_error, coalesce($4::timestamptz, now()), $3
FROM moved"#;

// $1 id, $2 token, $3 pinned now
pub(crate) const RENEW: &str = r#"
UPDATE {table} SET acquired_at = coalesce($3::timestamptz, now())
WHERE id = $1 AND acquired_token = $2"#;

// $1 id, $2 token
pub(crate) const RELEASE: &str = r#"
UPDATE {table}
SET acquired_token = NULL,
    acquired_at    = NULL,
    acquired_by    = NULL,
    deliveries     = greatest(deliveries - 1, 0)
WHERE id = $1 AND acquired_token = $2"#;

impl PgBackend {
    pub(crate) async fn ack_one(&self, lease: Lease) -> Result<bool> {
        let done = sqlx::query(self.shared().sql.ack.clone())
            .bind(lease.id)
            .bind(lease.token)
            .execute(&self.shared().pool)
            .await?
            .rows_affected()
            == 1;
        self.trace_outcome("ack", lease, done);
        Ok(done)
    }

    pub(crate) async fn ack_many(&self, leases: &[Lease]) -> Result<Vec<MessageId>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, tokens): (Vec<MessageId>, Vec<Uuid>) =
            leases.iter().map(|l| (l.id, l.token)).unzip();
        let acked: Vec<MessageId> = sqlx::query_scalar(self.shared().sql.ack_batch.clone())
            .persistent(false)
            .bind(&ids)
            .bind(&tokens)
            .fetch_all(&self.shared().pool)
            .await?;
        tracing::debug!(target: "postbox", table = %self.shared().table, rows = acked.len(), lost = leases.len() - acked.len(), "postbox.outcome: ack_batch");
        Ok(acked)
    }

    pub(crate) async fn retry_one(&self, lease: Lease, params: RetryParams) -> Result<bool> {
        params.validate()?;
        let done = sqlx::query(self.shared().sql.retry.clone())
            .bind(lease.id)
            .bind(lease.token)
            .bind(params.delay().as_secs_f64() * 1000.0)
            .bind(params.error_message())
            .bind(self.shared().now())
            .execute(&self.shared().pool)
            .await?
            .rows_affected()
            == 1;
        self.trace_outcome("retry", lease, done);
        Ok(done)
    }

    pub(crate) async fn dead_letter_one(&self, lease: Lease, reason: &str) -> Result<bool> {
        crate::backend::validate_reason(reason)?;
        let done = sqlx::query(self.shared().sql.dead_letter.clone())
            .bind(lease.id)
            .bind(lease.token)
            .bind(reason)
            .bind(self.shared().now())
            .execute(&self.shared().pool)
            .await?
            .rows_affected()
            == 1;
        self.trace_outcome("dead_letter", lease, done);
        Ok(done)
    }

    pub(crate) async fn renew_one(&self, lease: Lease) -> Result<bool> {
        Ok(sqlx::query(self.shared().sql.renew.clone())
            .bind(lease.id)
            .bind(lease.token)
            .bind(self.shared().now())
            .execute(&self.shared().pool)
            .await?
            .rows_affected()
            == 1)
    }

    pub(crate) async fn release_one(&self, lease: Lease) -> Result<bool> {
        let done = sqlx::query(self.shared().sql.release.clone())
            .bind(lease.id)
            .bind(lease.token)
            .execute(&self.shared().pool)
            .await?
            .rows_affected()
            == 1;
        self.trace_outcome("release", lease, done);
        Ok(done)
    }

    fn trace_outcome(&self, outcome: &'static str, lease: Lease, done: bool) {
        if done {
            tracing::debug!(target: "postbox", table = %self.shared().table, message_id = lease.id, batch = %lease.token, outcome, "postbox.outcome");
        } else {
            tracing::debug!(target: "postbox", table = %self.shared().table, message_id = lease.id, batch = %lease.token, outcome, "postbox.outcome: lease lost, nothing changed");
        }
    }
}
