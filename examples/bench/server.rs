//! What the Postgres server reports: its settings, WAL written, table sizes.

use postbox::sqlx::{self, PgPool};
use serde_json::{Map, Value};

/// The settings that decide what the figures mean (durability above all).
pub(crate) async fn settings(pool: &PgPool) -> anyhow::Result<Value> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, setting FROM pg_settings \
         WHERE name IN ('server_version', 'fsync', 'synchronous_commit', 'full_page_writes', \
                        'shared_buffers', 'wal_level', 'max_connections') \
         ORDER BY name",
    )
    .fetch_all(pool)
    .await?;
    Ok(Value::Object(
        rows.into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect::<Map<_, _>>(),
    ))
}

/// A point in the server's WAL stream; [`Wal::bytes_since`] measures what was written after it.
///
/// The WAL position is server-wide: run nothing else on the server while measuring.
pub(crate) struct Wal(String);

impl Wal {
    /// The current WAL insert position.
    pub(crate) async fn now(pool: &PgPool) -> anyhow::Result<Self> {
        let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
            .fetch_one(pool)
            .await?;
        Ok(Self(lsn))
    }

    /// WAL bytes written since this point.
    pub(crate) async fn bytes_since(&self, pool: &PgPool) -> anyhow::Result<f64> {
        let bytes: f64 = sqlx::query_scalar(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::pg_lsn)::float8",
        )
        .bind(&self.0)
        .fetch_one(pool)
        .await?;
        Ok(bytes)
    }
}

/// Heap plus index bytes of the outbox table `postbox` and its partitions (bloat left by
/// deleted rows shows here until autovacuum or a rotation reclaims it).
pub(crate) async fn table_bytes(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT sum(pg_total_relation_size(relid))::bigint FROM \
         (SELECT relid FROM pg_partition_tree('postbox') UNION SELECT 'postbox'::regclass \
          UNION SELECT relid FROM pg_partition_tree('postbox_log') \
          UNION SELECT relid FROM pg_partition_tree('postbox_batches') \
          UNION SELECT t::regclass FROM unnest(ARRAY['postbox_subs', 'postbox_held']) AS t) AS t",
    )
    .fetch_one(pool)
    .await?)
}

/// Vacuums the outbox table, so each measured run starts without the dead rows (and the
/// autovacuum work) the previous run left.
pub(crate) async fn vacuum(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "VACUUM (ANALYZE) postbox, postbox_log, postbox_subs, postbox_batches, postbox_held",
    )
    .execute(pool)
    .await?;
    Ok(())
}
