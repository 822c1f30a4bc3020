//! Cooperative subconsumers on Postgres.
//!
//! `COOP_RECEIVE` is the fetch statement with two changes: it upserts the receiving member's
//! own registry row (its heartbeat, rewritten only once it is older than
//! [`CoopReceive::get_heartbeat_refresh`]; no shared row is written), and its second branch takes
//! rows held by *dead* siblings (silent longer than the dead interval) instead of rows whose
//! lease merely aged: a live member's rows are never taken. Both branches lock with
//! `FOR UPDATE SKIP LOCKED`; nothing stays locked after the statement.

use sqlx::{Connection, PgConnection, Row};
use uuid::Uuid;

use super::fetch::{delivery, lease_or_bury, ready_branch};
use super::{Inner, PgBackend};
use crate::coop::{CoopReceive, Member, MemberInfo, Registration, Unregister};
use crate::error::{Error, Result};
use crate::message::Delivery;

// $1 queues, $2 limit, $3 dead interval in ms (NULL: never take over), $4 new token,
// $5 member key (`group/name`), $6 max deliveries, $7 pinned now, $8 group, $9 member name,
// $10 heartbeat refresh in ms
pub(crate) const COOP_RECEIVE: &str = concat!(
    r#"
WITH me AS (
    INSERT INTO {members} AS m (grp, member, queues, registered_at, last_active)
    VALUES ($8, $9, $1, coalesce($7::timestamptz, now()), coalesce($7::timestamptz, now()))
    ON CONFLICT (grp, member) DO UPDATE SET last_active = excluded.last_active
    WHERE m.last_active <= excluded.last_active - $10::float8 * interval '1 millisecond'
    RETURNING 1
),
dead AS (
    SELECT grp || '/' || member AS holder
    FROM {members}
    WHERE grp = $8 AND member <> $9
      AND $3::float8 IS NOT NULL
      AND last_active < coalesce($7::timestamptz, now()) - $3::float8 * interval '1 millisecond'
),
"#,
    ready_branch!(),
    r#",
stale AS (
    SELECT s.id, s.gen, s.next_attempt_at, s.deliveries
    FROM {table} AS s
    WHERE s.acquired_by IN (SELECT holder FROM dead)
      AND s.acquired_token IS NOT NULL
      AND s.queue = ANY($1::text[])
    ORDER BY s.next_attempt_at, s.id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
),
picked AS (
    SELECT id, gen, deliveries
    FROM (SELECT * FROM ready UNION ALL SELECT * FROM stale) AS c
    ORDER BY next_attempt_at, id
    LIMIT $2
),
"#,
    lease_or_bury!()
);

// $1 group, $2 member, $3 queues, $4 pinned now
pub(crate) const COOP_REGISTER: &str = r#"
INSERT INTO {members} (grp, member, queues, registered_at, last_active)
VALUES ($1, $2, $3, coalesce($4::timestamptz, now()), coalesce($4::timestamptz, now()))
ON CONFLICT (grp, member) DO NOTHING
RETURNING 1"#;

// $1 group, $2 member, $3 pinned now
pub(crate) const COOP_TOUCH: &str = r#"
UPDATE {members} SET last_active = coalesce($3::timestamptz, now())
WHERE grp = $1 AND member = $2"#;

// $1 group, $2 member
pub(crate) const LOCK_MEMBER: &str =
    "SELECT 1 FROM {members} WHERE grp = $1 AND member = $2 FOR UPDATE";

// $1 member key
pub(crate) const HELD: &str =
    "SELECT count(*) FROM {table} WHERE acquired_by = $1 AND acquired_token IS NOT NULL";

// $1 member key, $2 max attempts, $3 pinned now
pub(crate) const REQUEUE_EXHAUSTED: &str = r#"
WITH moved AS (
    DELETE FROM {table}
    WHERE acquired_by = $1 AND acquired_token IS NOT NULL AND attempts + 1 >= $2
    RETURNING *
)
INSERT INTO {dead} (id, queue, payload, headers, correlation_id, attempts, deliveries,
                    created_at, next_attempt_at, first_attempt_at, last_attempt_at,
                    acquired_by, last_error, dead_at, reason)
SELECT id, queue, payload, headers, correlation_id, attempts + 1, deliveries,
       created_at, next_attempt_at, first_attempt_at, last_attempt_at,
       acquired_by, last_error, coalesce($3::timestamptz, now()),
       'member unregistered; retries exhausted after ' || (attempts + 1) || ' attempts'
FROM moved"#;

// $1 member key, $2 pinned now
pub(crate) const REQUEUE: &str = r#"
UPDATE {table}
SET attempts        = attempts + 1,
    next_attempt_at = coalesce($2::timestamptz, now()),
    acquired_token  = NULL,
    acquired_at     = NULL,
    acquired_by     = NULL,
    last_error      = 'member unregistered'
WHERE acquired_by = $1 AND acquired_token IS NOT NULL"#;

// $1 group, $2 member
pub(crate) const DELETE_MEMBER: &str = "DELETE FROM {members} WHERE grp = $1 AND member = $2";

// $1 group
pub(crate) const MEMBERS: &str = r#"
SELECT m.member, m.queues, m.registered_at, m.last_active,
       (SELECT count(*) FROM {table} t
        WHERE t.acquired_by = m.grp || '/' || m.member AND t.acquired_token IS NOT NULL) AS held
FROM {members} m
WHERE m.grp = $1
ORDER BY m.member"#;

impl Inner {
    /// Runs the cooperative receive on `conn`.
    pub(crate) async fn coop_receive_on(
        &self,
        conn: &mut PgConnection,
        params: &CoopReceive,
    ) -> Result<Vec<Delivery>> {
        params.validate()?;
        let member = params.get_member();
        let rows = sqlx::query(self.sql.coop_receive.clone())
            .persistent(self.persistent())
            .bind(params.get_queues())
            .bind(i64::from(params.get_max_messages()))
            .bind(params.get_dead_interval().map(|d| d.as_secs_f64() * 1000.0))
            .bind(Uuid::new_v4())
            .bind(member.key())
            .bind(
                params
                    .get_max_deliveries()
                    .map(|n| i32::try_from(n).unwrap_or(i32::MAX)),
            )
            .bind(self.now())
            .bind(member.group())
            .bind(member.name())
            .bind(params.get_heartbeat_refresh().as_secs_f64() * 1000.0)
            .fetch_all(conn)
            .await?;
        self.rotator.tick();
        Ok(rows.iter().map(delivery).collect::<Result<_, _>>()?)
    }
}

impl PgBackend {
    pub(crate) async fn coop_register_one(
        &self,
        member: &Member,
        queues: &[String],
    ) -> Result<Registration> {
        let mut session = self.shared().session().await?;
        let inserted = sqlx::query(self.shared().sql.coop_register.clone())
            .persistent(self.shared().persistent())
            .bind(member.group())
            .bind(member.name())
            .bind(queues)
            .bind(self.shared().now())
            .fetch_optional(&mut *session)
            .await?;
        session.done().await?;
        if inserted.is_some() {
            return Ok(Registration::New);
        }
        self.coop_touch_one(member).await?;
        Ok(Registration::Existing)
    }

    pub(crate) async fn coop_touch_one(&self, member: &Member) -> Result<bool> {
        let mut session = self.shared().session().await?;
        let touched = sqlx::query(self.shared().sql.coop_touch.clone())
            .persistent(self.shared().persistent())
            .bind(member.group())
            .bind(member.name())
            .bind(self.shared().now())
            .execute(&mut *session)
            .await?
            .rows_affected();
        session.done().await?;
        Ok(touched == 1)
    }

    pub(crate) async fn coop_unregister_one(
        &self,
        member: &Member,
        handling: Unregister,
    ) -> Result<bool> {
        let sql = &self.shared().sql;
        let mut conn = self.shared().pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let exists = sqlx::query(sql.coop_lock_member.clone())
            .persistent(self.shared().persistent())
            .bind(member.group())
            .bind(member.name())
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !exists {
            return Ok(false);
        }
        let held: i64 = sqlx::query_scalar(sql.coop_held.clone())
            .persistent(false)
            .bind(member.key())
            .fetch_one(&mut *tx)
            .await?;
        match handling {
            Unregister::Fail if held > 0 => {
                return Err(Error::MemberHoldsMessages {
                    member: member.key(),
                    held,
                });
            }
            Unregister::Fail => {}
            Unregister::Requeue { max_attempts } => {
                let max = i32::try_from(max_attempts.max(1)).unwrap_or(i32::MAX);
                sqlx::query(sql.coop_requeue_exhausted.clone())
                    .persistent(false)
                    .bind(member.key())
                    .bind(max)
                    .bind(self.shared().now())
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(sql.coop_requeue.clone())
                    .persistent(false)
                    .bind(member.key())
                    .bind(self.shared().now())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query(sql.coop_delete_member.clone())
            .persistent(self.shared().persistent())
            .bind(member.group())
            .bind(member.name())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(crate) async fn coop_members_of(&self, group: &str) -> Result<Vec<MemberInfo>> {
        let mut session = self.shared().session().await?;
        let rows = sqlx::query(self.shared().sql.coop_members.clone())
            .persistent(self.shared().persistent())
            .bind(group)
            .fetch_all(&mut *session)
            .await?;
        session.done().await?;
        rows.iter()
            .map(|r| {
                Ok(MemberInfo::new(
                    r.try_get("member")?,
                    r.try_get("queues")?,
                    r.try_get("registered_at")?,
                    r.try_get("last_active")?,
                    r.try_get("held")?,
                ))
            })
            .collect()
    }
}
