//! Publishing on the caller's connection: one INSERT plus `pg_notify` in the same statement.
//!
//! Rows go to the current generation, the partition named by `T_gen` (read without a lock:
//! rotation may move on while a publish is in flight, which only means the row lands in the
//! previous generation, whose truncation then waits for this transaction; see `rotate.rs`).
//!
//! The notification carries only the queue name (NOTIFY payloads must stay under 8000 bytes)
//! and is sent once per distinct queue per call: every notifying commit takes a global lock,
//! so fewer notifications mean cheaper commits.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::PgBackend;
use crate::error::Result;
use crate::message::{Availability, Message, MessageId};

// $1 channel, $2 queue, $3 payload, $4 headers, $5 correlation_id, $6 not_before,
// $7 delay in ms, $8 pinned now (NULL: the database clock)
pub(crate) const PUBLISH: &str = r#"
WITH ins AS (
    INSERT INTO {table} (gen, queue, payload, headers, correlation_id, created_at,
                         next_attempt_at)
    VALUES ((SELECT (last_value % {generations})::smallint FROM {gen_seq}),
            $2, $3, $4, $5, coalesce($8::timestamptz, now()),
            coalesce($6::timestamptz,
                     coalesce($8::timestamptz, now()) + $7::float8 * interval '1 millisecond'))
    RETURNING id
)
SELECT ins.id FROM ins CROSS JOIN pg_notify($1, $2)"#;

// $1 channel, $2 queues, $3 payloads, $4 headers, $5 correlation ids, $6 not_before,
// $7 delays in ms, $8 pinned now, $9 distinct queues to notify
pub(crate) const PUBLISH_BATCH: &str = r#"
WITH ins AS (
    INSERT INTO {table} (gen, queue, payload, headers, correlation_id, created_at,
                         next_attempt_at)
    SELECT (SELECT (last_value % {generations})::smallint FROM {gen_seq}), m.queue, m.payload, m.headers, m.correlation_id, coalesce($8::timestamptz, now()),
           coalesce(m.not_before,
                    coalesce($8::timestamptz, now()) + m.delay_ms * interval '1 millisecond')
    FROM unnest($2::text[], $3::bytea[], $4::jsonb[], $5::uuid[], $6::timestamptz[], $7::float8[])
         WITH ORDINALITY AS m(queue, payload, headers, correlation_id, not_before, delay_ms, ord)
    ORDER BY m.ord
    RETURNING id
),
notified AS (
    SELECT count(*) AS n FROM unnest($9::text[]) AS q(name), pg_notify($1, q.name)
)
SELECT ins.id FROM ins CROSS JOIN notified ORDER BY ins.id"#;

/// A message split into the columns it is bound as.
struct Row {
    headers: Option<serde_json::Value>,
    correlation_id: Uuid,
    not_before: Option<DateTime<Utc>>,
    delay_ms: f64,
}

fn columns(message: &Message) -> Row {
    let (not_before, delay_ms) = match message.available {
        Availability::Now => (None, 0.0),
        Availability::After(d) => (None, d.as_secs_f64() * 1000.0),
        Availability::At(at) => (Some(at), 0.0),
    };
    Row {
        headers: message.headers.clone().map(serde_json::Value::Object),
        correlation_id: message.correlation_id.unwrap_or_else(Uuid::new_v4),
        not_before,
        delay_ms,
    }
}

impl PgBackend {
    /// Publishes one message on `conn` — your open transaction — and returns its id.
    ///
    /// Runs one statement: the INSERT and `pg_notify('postbox_<table>', queue)`. Neither is
    /// visible to anyone until your transaction commits; a rollback discards both.
    ///
    /// ```no_run
    /// # async fn f(pool: sqlx::PgPool, backend: postbox_core::PgBackend) -> Result<(), postbox_core::Error> {
    /// use postbox_core::Message;
    ///
    /// let mut tx = pool.begin().await?;
    /// // ... your own writes on &mut *tx ...
    /// let id = backend.publish(&mut tx, Message::new("emails", "hello")).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidQueue`](crate::Error::InvalidQueue) before anything is sent,
    /// [`Error::Database`](crate::Error::Database) if the statement fails (your transaction is
    /// then aborted, as with any failed statement).
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe for the transaction: dropped while its statement runs, the message may
    /// or may not be in it (a batch is one statement: all of it or none). Roll the transaction
    /// back rather than commit it.
    pub async fn publish(
        &self,
        conn: &mut PgConnection,
        mut message: Message,
    ) -> Result<MessageId> {
        message.validate_for_queue()?;
        crate::trace::inject_current(&mut message);
        let row = columns(&message);
        let id = sqlx::query_scalar(self.shared().sql.publish.clone())
            .persistent(self.shared().persistent())
            .bind(self.shared().table.channel())
            .bind(&message.queue)
            .bind(&message.payload)
            .bind(row.headers)
            .bind(row.correlation_id)
            .bind(row.not_before)
            .bind(row.delay_ms)
            .bind(self.shared().now())
            .fetch_one(conn)
            .await?;
        tracing::debug!(target: "postbox", table = %self.shared().table, queue = %message.queue, message_id = id, "postbox.publish");
        crate::metrics::published([message.queue.as_str()]);
        Ok(id)
    }

    /// Publishes `messages` with one multi-row INSERT (UNNEST of arrays) and one notification
    /// per distinct queue; returns the ids in input order. An empty batch sends nothing.
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish); one invalid queue name rejects the whole batch before
    /// anything is sent.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe for the transaction: dropped while its statement runs, the message may
    /// or may not be in it (a batch is one statement: all of it or none). Roll the transaction
    /// back rather than commit it.
    pub async fn publish_batch(
        &self,
        conn: &mut PgConnection,
        messages: Vec<Message>,
    ) -> Result<Vec<MessageId>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        messages.iter().try_for_each(Message::validate_for_queue)?;
        let n = messages.len();
        let mut queues = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut headers: Vec<Option<serde_json::Value>> = Vec::with_capacity(n);
        let mut correlation_ids = Vec::with_capacity(n);
        let mut not_before: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
        let mut delays = Vec::with_capacity(n);
        for mut message in messages {
            crate::trace::inject_current(&mut message);
            let row = columns(&message);
            headers.push(row.headers);
            correlation_ids.push(row.correlation_id);
            not_before.push(row.not_before);
            delays.push(row.delay_ms);
            queues.push(message.queue);
            payloads.push(message.payload);
        }
        let distinct: Vec<&str> = queues
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let ids: Vec<MessageId> = sqlx::query_scalar(self.shared().sql.publish_batch.clone())
            .persistent(self.shared().persistent())
            .bind(self.shared().table.channel())
            .bind(&queues)
            .bind(&payloads)
            .bind(&headers)
            .bind(&correlation_ids)
            .bind(&not_before)
            .bind(&delays)
            .bind(self.shared().now())
            .bind(&distinct)
            .fetch_all(conn)
            .await?;
        tracing::debug!(target: "postbox", table = %self.shared().table, rows = ids.len(), queues = distinct.len(), "postbox.publish");
        crate::metrics::published(queues.iter().map(String::as_str));
        Ok(ids)
    }
}
