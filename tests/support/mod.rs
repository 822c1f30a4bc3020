//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod no_engine;

use std::time::Duration;

use postbox::prelude::*;
use postbox::sqlx::{self, PgPool};

/// The one deadline for waiting on an observable condition (longer under CI).
pub fn wait() -> Duration {
    if std::env::var_os("CI").is_some() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(20)
    }
}

/// Counts rows of `table` (a name the test chose) matching `condition`.
pub async fn count(pool: &PgPool, table: &str, condition: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{table}\" WHERE {condition}"
    )))
    .fetch_one(pool)
    .await
    .expect("count query")
}

/// Runs a statement the test wrote.
pub async fn exec(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The database clock.
pub async fn db_now(pool: &PgPool) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .expect("now()")
}

/// Waits for the first event matching `pred`, failing after [`wait()`] with what was seen.
pub async fn until(
    events: &mut tokio::sync::broadcast::Receiver<postbox::runtime::SubscriberEvent>,
    what: &str,
    pred: impl Fn(&postbox::runtime::SubscriberEvent) -> bool,
) -> postbox::runtime::SubscriberEvent {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + wait();
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(event)) if pred(&event) => return event,
            Ok(Ok(event)) => seen.push(format!("{event:?}")),
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(n))) => {
                seen.push(format!("(lagged {n})"))
            }
            Ok(Err(e)) => panic!("waiting for {what}: event channel closed ({e}); saw {seen:?}"),
            Err(_) => panic!("waiting for {what}: timed out; saw {seen:?}"),
        }
    }
}

/// Waits until `probe` holds, failing after [`wait()`] with `what`.
pub async fn eventually<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + wait();
    while !probe().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A cooperative receive stuck in the database: the test holds the member's registry row
/// locked (the receive stamps that row, so it waits), and the receive holds its fetch permit
/// meanwhile. Commit the returned transaction to let it finish.
pub struct StuckReceive {
    pub lock: sqlx::Transaction<'static, sqlx::Postgres>,
    pub task: tokio::task::JoinHandle<postbox::Result<Vec<postbox::Delivery>>>,
}

/// Starts a [`StuckReceive`] of member `g/stuck` on `queue`, taking up to `limit` rows.
pub async fn stuck_receive(
    pool: &PgPool,
    backend: &postbox::PgBackend,
    queue: &str,
    limit: u32,
) -> StuckReceive {
    let stuck = postbox::Member::new("g", "stuck").expect("member name");
    backend
        .coop_register(&stuck, &[queue.to_owned()])
        .await
        .expect("register");
    let mut lock = pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM postbox_members WHERE grp = 'g' AND member = 'stuck' FOR UPDATE")
        .execute(&mut *lock)
        .await
        .expect("lock the member row");
    let receive = postbox::coop::CoopReceive::new(stuck, [queue], limit);
    let backend = backend.clone();
    let task = tokio::spawn(async move { backend.coop_receive(&receive).await });
    StuckReceive { lock, task }
}

/// Receives `n` items from `rx`, failing after [`wait()`].
pub async fn recv_n<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>, n: usize) -> Vec<T> {
    let deadline = tokio::time::Instant::now() + wait();
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(item)) => got.push(item),
            Ok(None) => panic!("channel closed after {} of {n}", got.len()),
            Err(_) => panic!("timed out after {} of {n}", got.len()),
        }
    }
    got
}

/// Publishes `n` messages with payloads "0".."n-1" on `queue`, committed, in one batch.
pub async fn publish_n<B: postbox::Publish + ?Sized>(
    backend: &B,
    queue: &str,
    n: usize,
) -> Vec<i64> {
    let mut tx = backend.begin().await.expect("begin");
    let ids = backend
        .publish_batch(
            &mut tx,
            (0..n)
                .map(|i| postbox::Message::new(queue, i.to_string()))
                .collect(),
        )
        .await
        .expect("publish");
    backend.commit(tx).await.expect("commit");
    ids
}

/// Pids of this database's connections with `application_name` = `app`.
pub async fn pids_of(pool: &PgPool, app: &str) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
    )
    .bind(app)
    .fetch_all(pool)
    .await
    .expect("pg_stat_activity")
}

/// Terminates this database's connections with `application_name` = `app`; returns how many.
pub async fn kill(pool: &PgPool, app: &str) -> usize {
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = $1",
    )
    .bind(app)
    .fetch_all(pool)
    .await
    .expect("pg_terminate_backend");
    killed.into_iter().filter(|k| *k).count()
}

/// A login role of this test's own (a random name, password `pw`; roles are shared by every
/// database of the server) and a pool of `max` connections to the fixture's database as it.
/// `setup` runs as the fixture's superuser right after the role is created, with `{role}`
/// standing for its name. Drop it with [`drop_role`].
pub async fn login_role(
    db: &postbox::testkit::PgFixture,
    setup: &str,
    max: u32,
) -> anyhow::Result<(String, PgPool)> {
    let role = format!("r_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'pw'; {}",
        setup.replace("{role}", &role)
    )))
    .execute(db.pool())
    .await?;
    let options: sqlx::postgres::PgConnectOptions = db.url().parse()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .connect_with(options.username(&role).password("pw"))
        .await?;
    Ok((role, pool))
}

/// Closes `pool` and drops `role` with what it owns and was granted in the fixture's database.
pub async fn drop_role(
    db: &postbox::testkit::PgFixture,
    role: &str,
    pool: PgPool,
) -> anyhow::Result<()> {
    pool.close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP OWNED BY {role}; DROP ROLE {role}"
    )))
    .execute(db.pool())
    .await?;
    Ok(())
}
