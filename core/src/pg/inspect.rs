//! Reading stored and dead-lettered messages, for tests and operators.

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::PgBackend;
use crate::envelope::Envelope;
use crate::error::Result;
use crate::inspect::{DeadLetter, MessageState, StoredMessage};

// $1 queue (NULL: all), $2 pinned now
pub(crate) const MESSAGES: &str = r#"
SELECT id, queue, payload, headers, correlation_id, attempts, deliveries, created_at,
       next_attempt_at, last_error, acquired_by,
       CASE WHEN acquired_token IS NOT NULL THEN 'leased'
            WHEN next_attempt_at > coalesce($2::timestamptz, now()) THEN 'scheduled'
            ELSE 'ready' END AS state
FROM {table}
WHERE $1::text IS NULL OR queue = $1
ORDER BY id"#;

// $1 queue (NULL: all)
pub(crate) const DEAD_LETTERS: &str = r#"
SELECT id, queue, payload, headers, correlation_id, attempts, deliveries, last_error, reason,
       dead_at
FROM {dead}
WHERE $1::text IS NULL OR queue = $1
ORDER BY id"#;

// $1 pinned now
const NOW: &str = "SELECT coalesce($1::timestamptz, now())";

/// Decodes the `headers` column (a JSON object, or NULL).
pub(crate) fn headers(row: &PgRow) -> Result<Option<crate::Headers>, sqlx::Error> {
    Ok(
        match row.try_get::<Option<serde_json::Value>, _>("headers")? {
            Some(serde_json::Value::Object(map)) => Some(map),
            _ => None,
        },
    )
}

impl PgBackend {
    /// The clock statements read: the database's `now()`, or the pinned time (see
    /// `set_now`, feature `test-util`).
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only; drop the call and make it again.
    pub async fn database_now(&self) -> Result<DateTime<Utc>> {
        let mut session = self.shared().session().await?;
        let now = sqlx::query_scalar(NOW)
            .persistent(self.shared().persistent())
            .bind(self.shared().now())
            .fetch_one(&mut *session)
            .await?;
        session.done().await?;
        Ok(now)
    }

    pub(crate) async fn list_messages(&self, queue: Option<&str>) -> Result<Vec<StoredMessage>> {
        let mut session = self.shared().session().await?;
        let messages = self.messages_on(&mut session, queue).await?;
        session.done().await?;
        Ok(messages)
    }

    /// The messages of `queue` (or of all queues), in id order, as `conn` sees them: on an
    /// open transaction, that includes what it published and has not committed yet, which is
    /// what a test asserts before deciding to commit.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database), which on a transaction aborts it.
    ///
    /// # Cancel safety
    ///
    /// One read-only statement: dropping the future leaves `conn` as it was (a transaction
    /// stays usable once the statement's result is drained by its next use).
    pub async fn messages_in(
        &self,
        conn: &mut sqlx::PgConnection,
        queue: Option<&str>,
    ) -> Result<Vec<StoredMessage>> {
        self.messages_on(conn, queue).await
    }

    async fn messages_on(
        &self,
        conn: &mut sqlx::PgConnection,
        queue: Option<&str>,
    ) -> Result<Vec<StoredMessage>> {
        let rows = sqlx::query(self.shared().sql.messages.clone())
            .persistent(self.shared().persistent())
            .bind(queue)
            .bind(self.shared().now())
            .fetch_all(&mut *conn)
            .await?;
        rows.iter()
            .map(|row| {
                let state = match row.try_get::<String, _>("state")?.as_str() {
                    "leased" => MessageState::Leased,
                    "scheduled" => MessageState::Scheduled,
                    _ => MessageState::Ready,
                };
                Ok(StoredMessage {
                    envelope: envelope(row, "queue")?,
                    created_at: row.try_get("created_at")?,
                    next_attempt_at: row.try_get("next_attempt_at")?,
                    acquired_by: row.try_get("acquired_by")?,
                    state,
                })
            })
            .collect()
    }

    pub(crate) async fn list_dead_letters(&self, queue: Option<&str>) -> Result<Vec<DeadLetter>> {
        let mut session = self.shared().session().await?;
        let rows = sqlx::query(self.shared().sql.dead_letters.clone())
            .persistent(self.shared().persistent())
            .bind(queue)
            .fetch_all(&mut *session)
            .await?;
        session.done().await?;
        Ok(rows.iter().map(dead_letter).collect::<Result<_, _>>()?)
    }
}

/// Decodes the columns every row type shares; the queue from `queue_column` (`queue`, or
/// `topic` for a subscription's rows).
pub(crate) fn envelope(row: &PgRow, queue_column: &str) -> Result<Envelope, sqlx::Error> {
    Ok(Envelope {
        id: row.try_get("id")?,
        queue: row.try_get(queue_column)?,
        payload: row.try_get("payload")?,
        headers: headers(row)?,
        correlation_id: row.try_get("correlation_id")?,
        attempts: row.try_get("attempts")?,
        deliveries: row.try_get("deliveries")?,
        last_error: row.try_get("last_error")?,
    })
}

/// Decodes one dead-letter row (of `T_dead`, or a subscription's, its topic as `queue`).
pub(crate) fn dead_letter(row: &PgRow) -> Result<DeadLetter, sqlx::Error> {
    Ok(DeadLetter {
        envelope: envelope(row, "queue")?,
        reason: row.try_get("reason")?,
        dead_at: row.try_get("dead_at")?,
    })
}
