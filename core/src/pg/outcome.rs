//! Fenced outcomes: every statement matches `id AND acquired_token`, so a holder whose lease
//! was lost (expired and taken by another fetch) changes nothing, and learns it from the row
//! count.
//!
//! The batch ack runs as an unnamed statement (`persistent(false)`), so it is planned for the
//! generations' sizes at the time it runs. A prepared statement on a pool connection switches
//! to a generic plan after five runs, and a generic plan made while a generation was empty (a
//! `VACUUM` of a drained generation records it as empty) finds its rows by a sequential scan
//! of that generation ever after: measured, up to 346 ms for a 500-row ack mid-drain. Planning
//! it costs about 0.3 ms, spread over hundreds of rows. The single-row outcomes would cost 2.8
//! times as much planned on every call (`drain`, per-row acks: 2,754 against 7,620 msg/s), so
//! they call functions (schema version 5) declared `SET enable_seqscan = off`: their plans are
//! cached per session like a prepared statement's, but made without sequential scans, so a
//! plan made while a generation was empty still finds its row by the primary key (see
//! `docs/design/storage.md`, *Plans*).

use uuid::Uuid;

use super::PgBackend;
use crate::consume::RetryParams;
use crate::error::Result;
use crate::message::{Lease, MessageId};

// $1 id, $2 token. The single-row outcomes call the functions of schema version 5 (see
// `schema.rs`), which hold the fenced statements and plan them without sequential scans.
pub(crate) const ACK: &str = "SELECT {ack_fn}($1, $2)";

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
pub(crate) const RETRY: &str = "SELECT {retry_fn}($1, $2, $3, $4, $5)";

// $1 id, $2 token, $3 reason, $4 pinned now
pub(crate) const DEAD_LETTER: &str = "SELECT {bury_fn}($1, $2, $3, $4)";

// $1 id, $2 token, $3 pinned now
pub(crate) const RENEW: &str = "SELECT {renew_fn}($1, $2, $3)";

// $1 id, $2 token
pub(crate) const RELEASE: &str = "SELECT {release_fn}($1, $2)";

impl PgBackend {
    pub(crate) async fn ack_one(&self, lease: Lease) -> Result<bool> {
        let mut session = self.shared().session().await?;
        let done = sqlx::query_scalar::<_, bool>(self.shared().sql.ack.clone())
            .persistent(self.shared().persistent())
            .bind(lease.id)
            .bind(lease.token)
            .fetch_one(&mut *session)
            .await?;
        session.done().await?;
        self.trace_outcome("ack", lease, done);
        Ok(done)
    }

    pub(crate) async fn ack_many(&self, leases: &[Lease]) -> Result<Vec<MessageId>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, tokens): (Vec<MessageId>, Vec<Uuid>) =
            leases.iter().map(|l| (l.id, l.token)).unzip();
        let mut session = self.shared().session().await?;
        let acked: Vec<MessageId> = sqlx::query_scalar(self.shared().sql.ack_batch.clone())
            .persistent(false)
            .bind(&ids)
            .bind(&tokens)
            .fetch_all(&mut *session)
            .await?;
        session.done().await?;
        tracing::debug!(target: "postbox", table = %self.shared().table, rows = acked.len(), lost = leases.len() - acked.len(), "postbox.outcome: ack_batch");
        Ok(acked)
    }

    pub(crate) async fn retry_one(&self, lease: Lease, params: RetryParams) -> Result<bool> {
        params.validate()?;
        let mut session = self.shared().session().await?;
        let done = sqlx::query_scalar::<_, bool>(self.shared().sql.retry.clone())
            .persistent(self.shared().persistent())
            .bind(lease.id)
            .bind(lease.token)
            .bind(params.get_delay().as_secs_f64() * 1000.0)
            .bind(params.get_error())
            .bind(self.shared().now())
            .fetch_one(&mut *session)
            .await?;
        session.done().await?;
        self.trace_outcome("retry", lease, done);
        Ok(done)
    }

    pub(crate) async fn dead_letter_one(&self, lease: Lease, reason: &str) -> Result<bool> {
        crate::consume::validate_reason(reason)?;
        let mut session = self.shared().session().await?;
        let done = sqlx::query_scalar::<_, bool>(self.shared().sql.dead_letter.clone())
            .persistent(self.shared().persistent())
            .bind(lease.id)
            .bind(lease.token)
            .bind(reason)
            .bind(self.shared().now())
            .fetch_one(&mut *session)
            .await?;
        session.done().await?;
        self.trace_outcome("dead_letter", lease, done);
        Ok(done)
    }

    pub(crate) async fn renew_one(&self, lease: Lease) -> Result<bool> {
        let mut session = self.shared().session().await?;
        let done = sqlx::query_scalar::<_, bool>(self.shared().sql.renew.clone())
            .persistent(self.shared().persistent())
            .bind(lease.id)
            .bind(lease.token)
            .bind(self.shared().now())
            .fetch_one(&mut *session)
            .await?;
        session.done().await?;
        Ok(done)
    }

    pub(crate) async fn release_one(&self, lease: Lease) -> Result<bool> {
        let mut session = self.shared().session().await?;
        let done = sqlx::query_scalar::<_, bool>(self.shared().sql.release.clone())
            .persistent(self.shared().persistent())
            .bind(lease.id)
            .bind(lease.token)
            .fetch_one(&mut *session)
            .await?;
        session.done().await?;
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
