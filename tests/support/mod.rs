//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::time::Duration;

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
