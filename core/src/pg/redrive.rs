//! Dead letters requeued or purged by a [`DeadFilter`](crate::DeadFilter): a queue's (rows
//! of `T_dead`) and a subscription's (dead rows of `T_held`).
//!
//! Each call is one statement: its `DELETE` or `UPDATE ... RETURNING` takes the selected rows'
//! locks, so a concurrent call waits for it and then skips what it took, and a queue's
//! requeue inserts what it deleted in the same statement (nothing in between to lose).

use async_trait::async_trait;

use super::PgBackend;
use crate::error::Result;
use crate::message::MessageId;
use crate::redrive::{DeadFilter, Redrive};
use crate::validate_queue;

/// The filter's conditions on `d`, whose queue (or topic) column is `$queue`: $1 ids, $2 queue,
/// $3 reason text, $4 age in ms, $5 pinned now; a NULL condition holds for every row.
macro_rules! selected {
    ($queue:literal) => {
        concat!(
            r#"($1::bigint[] IS NULL OR d.id = ANY ($1::bigint[]))
      AND ($2::text IS NULL OR d."#,
            $queue,
            r#" = $2::text)
      AND ($3::text IS NULL OR strpos(d.reason, $3::text) > 0)
      AND ($4::float8 IS NULL
           OR d.dead_at <= coalesce($5::timestamptz, now()) - $4::float8 * interval '1 millisecond')"#
        )
    };
}

// The filter (see `selected!`), then $6 channel. The requeued row keeps its id (the dead
// letter's), is written to the current generation, and wakes its queue's subscribers.
pub(crate) const REQUEUE_DEAD: &str = concat!(
    r#"
WITH gone AS (
    DELETE FROM {dead} AS d
    WHERE "#,
    selected!("queue"),
    r#"
    RETURNING d.id, d.queue, d.payload, d.headers, d.correlation_id, d.created_at
),
ins AS (
    INSERT INTO {table} (gen, id, queue, payload, headers, correlation_id, created_at,
                         next_attempt_at)
    SELECT (SELECT (last_value % {generations})::smallint FROM {gen_seq}), g.id, g.queue,
           g.payload, g.headers, g.correlation_id, g.created_at, coalesce($5::timestamptz, now())
    FROM gone AS g
    RETURNING id, queue
),
notified AS (
    SELECT count(*) AS n FROM (SELECT DISTINCT queue FROM ins) AS q, pg_notify($6, q.queue)
)
SELECT ins.id FROM ins CROSS JOIN notified ORDER BY ins.id"#
);

// The filter (see `selected!`).
pub(crate) const PURGE_DEAD: &str = concat!(
    r#"
WITH gone AS (
    DELETE FROM {dead} AS d
    WHERE "#,
    selected!("queue"),
    r#"
    RETURNING d.id
)
SELECT gone.id FROM gone ORDER BY gone.id"#
);

// The filter (see `selected!`, on the topic), $6 subscription, $7 channel. The held row is
// due at once with its history cleared, and its topic's receivers are woken.
pub(crate) const REQUEUE_SUBSCRIPTION_DEAD: &str = concat!(
    r#"
WITH back AS (
    UPDATE {held} AS d
    SET dead_at          = NULL,
        reason           = NULL,
        attempts         = 0,
        deliveries       = 0,
        next_attempt_at  = coalesce($5::timestamptz, now()),
        first_attempt_at = NULL,
        last_error       = NULL,
        acquired_token   = NULL,
        acquired_at      = NULL,
        acquired_by      = NULL
    WHERE d.sub = $6::text AND d.dead_at IS NOT NULL
      AND "#,
    selected!("topic"),
    r#"
    RETURNING d.id, d.topic
),
notified AS (
    SELECT count(*) AS n FROM (SELECT DISTINCT topic FROM back) AS t, pg_notify($7, t.topic)
)
SELECT back.id FROM back CROSS JOIN notified ORDER BY back.id"#
);

// The filter (see `selected!`, on the topic), $6 subscription.
pub(crate) const PURGE_SUBSCRIPTION_DEAD: &str = concat!(
    r#"
WITH gone AS (
    DELETE FROM {held} AS d
    WHERE d.sub = $6::text AND d.dead_at IS NOT NULL
      AND "#,
    selected!("topic"),
    r#"
    RETURNING d.id
)
SELECT gone.id FROM gone ORDER BY gone.id"#
);

/// What a redrive acts on.
#[derive(Clone, Copy)]
enum Target<'a> {
    Queues,
    Subscription(&'a str),
}

impl PgBackend {
    async fn redrive(
        &self,
        target: Target<'_>,
        requeue: bool,
        filter: &DeadFilter,
    ) -> Result<Vec<MessageId>> {
        filter.validate()?;
        if let Target::Subscription(name) = target {
            validate_queue(name)?;
        }
        let shared = self.shared();
        let sql = &shared.sql;
        let statement = match (target, requeue) {
            (Target::Queues, true) => sql.requeue_dead.clone(),
            (Target::Queues, false) => sql.purge_dead.clone(),
            (Target::Subscription(_), true) => sql.requeue_subscription_dead.clone(),
            (Target::Subscription(_), false) => sql.purge_subscription_dead.clone(),
        };
        let mut query = sqlx::query_scalar(statement)
            .persistent(shared.persistent())
            .bind(filter.get_ids())
            .bind(filter.get_queue())
            .bind(filter.get_reason_contains())
            .bind(
                filter
                    .get_older_than()
                    .map(|age| age.as_secs_f64() * 1_000.0),
            )
            .bind(shared.now());
        if let Target::Subscription(name) = target {
            query = query.bind(name);
        }
        if requeue {
            query = query.bind(shared.table.channel());
        }
        let mut session = shared.session().await?;
        let ids = query.fetch_all(&mut *session).await?;
        session.done().await?;
        Ok(ids)
    }
}

#[async_trait]
impl Redrive for PgBackend {
    async fn requeue_dead(&self, filter: &DeadFilter) -> Result<Vec<MessageId>> {
        self.redrive(Target::Queues, true, filter).await
    }

    async fn purge_dead(&self, filter: &DeadFilter) -> Result<Vec<MessageId>> {
        self.redrive(Target::Queues, false, filter).await
    }

    async fn requeue_subscription_dead(
        &self,
        subscription: &str,
        filter: &DeadFilter,
    ) -> Result<Vec<MessageId>> {
        self.redrive(Target::Subscription(subscription), true, filter)
            .await
    }

    async fn purge_subscription_dead(
        &self,
        subscription: &str,
        filter: &DeadFilter,
    ) -> Result<Vec<MessageId>> {
        self.redrive(Target::Subscription(subscription), false, filter)
            .await
    }
}
