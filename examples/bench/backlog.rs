//! `backlog`: 1,000,000 messages published first, then drained by one default subscriber; the
//! relations' size before, right after the drain, and once rotation had a few seconds, and
//! how many times autovacuum ran on them meanwhile. Once on a queue (the top-level figures)
//! and once on a topic subscription (`"topic"`).

use std::time::{Duration, Instant};

use postbox::sqlx::{self, PgPool};
use postbox::{Delivery, HandlerError, Subscriber, SubscriberOptions, Topics};
use serde_json::{Value, json};

use crate::Ctx;
use crate::publish::{batches, topic_batches};
use crate::server::table_bytes;
use crate::stats::{rate, round};

/// How long the workload watches the size after the drain: longer than an idle
/// subscriber's longest wait between polls (`max_fetch_interval`, 10 s by default), since its
/// polls are what start rotations.
const SETTLE: Duration = Duration::from_secs(15);

pub(crate) async fn backlog(ctx: &Ctx) -> anyhow::Result<Value> {
    let mut queue = one_run(ctx, false).await?;
    let topic = one_run(ctx, true).await?;
    if let Value::Object(fields) = &mut queue {
        fields.insert("topic".into(), topic);
    }
    Ok(queue)
}

async fn one_run(ctx: &Ctx, topic: bool) -> anyhow::Result<Value> {
    let n = ctx.size(1_000_000);
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let storage = if topic { "topic" } else { "queue" };
    ctx.progress(format!("backlog: publishing {n} to a {storage}"));
    let options = if topic {
        backend.subscribe("backlog", "s").await?;
        topic_batches(&backend, "backlog", n, 1_000).await?;
        SubscriberOptions::new(["backlog"]).subscription("s")
    } else {
        batches(&backend, "backlog", n, 1_000).await?;
        SubscriberOptions::new(["backlog"])
    };
    let before = table_bytes(db.pool()).await?;
    let vacuums_before = autovacuums(db.pool()).await?;
    ctx.progress(format!("backlog: draining {n}"));
    let handler = |_d: Delivery| std::future::ready(Ok::<(), HandlerError>(()));
    let start = Instant::now();
    let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();
    let mut peak = before;
    let mut next_sample = Instant::now();
    while sub.stats().acked < n as u64 {
        anyhow::ensure!(
            sub.is_running(),
            "subscriber stopped: {:?}",
            sub.last_error()
        );
        if Instant::now() >= next_sample {
            peak = peak.max(table_bytes(db.pool()).await?);
            next_sample += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained = start.elapsed();
    let right_after = table_bytes(db.pool()).await?;
    // Keep the subscriber idle-polling, as a service would: its fetches start rotations.
    let settle_start = Instant::now();
    let mut settled = right_after;
    let mut reclaimed_after_s = None;
    while settle_start.elapsed() < SETTLE {
        tokio::time::sleep(Duration::from_millis(250)).await;
        settled = table_bytes(db.pool()).await?;
        if reclaimed_after_s.is_none() && settled < before / 100 {
            reclaimed_after_s = Some(round(settle_start.elapsed().as_secs_f64(), 2));
        }
    }
    sub.shutdown().await?;
    let vacuums = autovacuums(db.pool()).await? - vacuums_before;
    db.close().await?;
    Ok(json!({
        "workload": "backlog",
        "storage": storage,
        "messages": n,
        "drain_msgs_per_s": round(rate(n, drained), 0),
        "bytes_before_drain": before,
        "bytes_peak": peak,
        "bytes_right_after_drain": right_after,
        "bytes_after_settle": settled,
        "settle_s": SETTLE.as_secs(),
        "reclaimed_below_1pct_after_s": reclaimed_after_s,
        "autovacuum_runs_during": vacuums,
    }))
}

/// Autovacuum runs so far on the outbox table, the topic tables and their partitions.
async fn autovacuums(pool: &PgPool) -> anyhow::Result<i64> {
    let n: Option<i64> = sqlx::query_scalar(
        "SELECT sum(autovacuum_count)::bigint FROM pg_stat_user_tables \
         WHERE relname LIKE 'postbox%'",
    )
    .fetch_one(pool)
    .await?;
    Ok(n.unwrap_or(0))
}
