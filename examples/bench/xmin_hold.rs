//! `xmin_hold`: a constant offered load drained by one default subscriber while another
//! session pins the xmin horizon, as an operator's long report or a forgotten `BEGIN` would.
//!
//! Each run once on a queue and once on a topic subscription (`"storage"`).
//! Phases: clean, holder open, after the holder ended. Two holder kinds: a `REPEATABLE READ`
//! snapshot (`BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1`) and a write transaction left
//! open (it has a transaction id; it writes to a table of its own). Every 5 s the series
//! records consumed/s, the backlog (published minus acked), dead tuples and total size of the
//! outbox relations, and the fetch statement's mean time in the window (from
//! `pg_stat_statements` when the server preloads it, else `null`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use postbox::sqlx::{self, Connection, PgConnection, PgPool};
use postbox::{Delivery, HandlerError, Message, PgBackend, Subscriber, SubscriberOptions, Topics};
use serde_json::{Value, json};

use crate::Ctx;
use crate::stats::round;

/// Phase lengths and load, from the command line (`--clean-s`, `--hold-s`, `--after-s`,
/// `--rate`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HoldSettings {
    pub(crate) clean_s: u64,
    pub(crate) hold_s: u64,
    pub(crate) after_s: u64,
    pub(crate) rate: u64,
    /// Run on a queue, on a topic subscription, or both (`--storage queue|topic|both`).
    pub(crate) queue: bool,
    pub(crate) topic: bool,
}

impl Default for HoldSettings {
    fn default() -> Self {
        HoldSettings {
            clean_s: 120,
            hold_s: 300,
            after_s: 120,
            rate: 2_000,
            queue: true,
            topic: true,
        }
    }
}

const SAMPLE: Duration = Duration::from_secs(5);
const PER_COMMIT: u64 = 10;

/// Runs both holder kinds in turn, each on a fresh database.
pub(crate) async fn xmin_hold(ctx: &Ctx, settings: HoldSettings) -> anyhow::Result<Value> {
    let settings = if ctx.smoke {
        HoldSettings {
            clean_s: 5,
            hold_s: 5,
            after_s: 5,
            rate: 200,
            ..settings
        }
    } else {
        settings
    };
    let mut runs = Vec::new();
    let storages = [(false, settings.queue), (true, settings.topic)];
    for topic in storages.into_iter().filter(|(_, on)| *on).map(|(t, _)| t) {
        for holder in ["snapshot", "write"] {
            ctx.progress(format!("xmin_hold: holder {holder}"));
            runs.push(one_run(ctx, settings, holder, topic).await?);
        }
    }
    Ok(json!({
        "workload": "xmin_hold",
        "offered_per_s": settings.rate,
        "per_commit": PER_COMMIT,
        "phases_s": { "clean": settings.clean_s, "hold": settings.hold_s, "after": settings.after_s },
        "sample_s": SAMPLE.as_secs(),
        "results": runs,
    }))
}

/// One sample of the series.
#[derive(Debug, Clone, Copy)]
struct Sample {
    t: f64,
    phase: &'static str,
    consumed_per_s: f64,
    backlog: i64,
    dead_tuples: i64,
    bytes: i64,
    fetch_ms: Option<f64>,
}

async fn one_run(
    ctx: &Ctx,
    settings: HoldSettings,
    holder: &str,
    topic: bool,
) -> anyhow::Result<Value> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    if topic {
        backend.subscribe("hold", "svc").await?;
    }
    let pool = db.pool().clone();
    let statements = sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&pool)
        .await
        .is_ok()
        && sqlx::raw_sql("SELECT pg_stat_statements_reset()")
            .execute(&pool)
            .await
            .is_ok();
    let published = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(publish_loop(
        backend.clone(),
        settings.rate,
        Arc::clone(&published),
        stopped,
        topic,
    ));
    let handler = |_d: Delivery| std::future::ready(Ok::<(), HandlerError>(()));
    let options = if topic {
        SubscriberOptions::new(["hold"]).subscription("svc")
    } else {
        SubscriberOptions::new(["hold"])
    };
    let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();

    let total = settings.clean_s + settings.hold_s + settings.after_s;
    let started = Instant::now();
    let mut holder_conn: Option<PgConnection> = None;
    let mut samples = Vec::new();
    let mut last = (0u64, fetch_totals(&pool, statements, topic).await?);
    let mut next = SAMPLE;
    while started.elapsed().as_secs() < total {
        let elapsed = started.elapsed();
        if holder_conn.is_none()
            && elapsed.as_secs() >= settings.clean_s
            && elapsed.as_secs() < settings.clean_s + settings.hold_s
        {
            holder_conn = Some(open_holder(db.url(), holder).await?);
        }
        if elapsed.as_secs() >= settings.clean_s + settings.hold_s
            && let Some(mut conn) = holder_conn.take()
        {
            sqlx::raw_sql("COMMIT").execute(&mut conn).await?;
            conn.close().await?;
        }
        if elapsed < next {
            tokio::time::sleep((next - elapsed).min(Duration::from_millis(100))).await;
            continue;
        }
        anyhow::ensure!(
            sub.is_running(),
            "subscriber stopped: {:?}",
            sub.last_error()
        );
        let acked = sub.stats().acked;
        let totals = fetch_totals(&pool, statements, topic).await?;
        let (dead_tuples, bytes) = relation_stats(&pool, topic).await?;
        let secs = elapsed.as_secs();
        let phase = if secs <= settings.clean_s {
            "clean"
        } else if secs <= settings.clean_s + settings.hold_s {
            "hold"
        } else {
            "after"
        };
        samples.push(Sample {
            t: round(elapsed.as_secs_f64(), 1),
            phase,
            consumed_per_s: (acked - last.0) as f64 / SAMPLE.as_secs_f64(),
            backlog: published.load(Ordering::Relaxed) as i64 - acked as i64,
            dead_tuples,
            bytes,
            fetch_ms: match (last.1, totals) {
                (Some((c0, t0)), Some((c1, t1))) if c1 > c0 => {
                    Some(round((t1 - t0) / (c1 - c0) as f64, 3))
                }
                _ => None,
            },
        });
        ctx.progress(format!(
            "xmin_hold {holder}: {phase} t={secs}s backlog {}",
            samples.last().map_or(0, |s| s.backlog)
        ));
        last = (acked, totals);
        next += SAMPLE;
    }
    stop.send_replace(true);
    let published_total = publisher.await??;
    let report = sub.shutdown().await?;
    db.close().await?;
    Ok(summary(
        if topic { "topic" } else { "queue" },
        holder,
        settings,
        &samples,
        published_total,
        report.stats.acked,
    ))
}

/// Publishes `rate` messages per second in transactions of [`PER_COMMIT`] until stopped.
async fn publish_loop(
    backend: PgBackend,
    rate: u64,
    published: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    topic: bool,
) -> anyhow::Result<u64> {
    let commits_per_s = (rate / PER_COMMIT).max(1);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / commits_per_s as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(published.load(Ordering::Relaxed)),
            _ = tick.tick() => {}
        }
        let mut tx = backend.pool().begin().await?;
        let batch = (0..PER_COMMIT)
            .map(|i| Message::new("hold", format!("m{i}")))
            .collect();
        if topic {
            backend.publish_to_topics(&mut tx, batch).await?;
        } else {
            backend.publish_batch(&mut tx, batch).await?;
        }
        tx.commit().await?;
        published.fetch_add(PER_COMMIT, Ordering::Relaxed);
    }
}

/// Opens the horizon holder on its own connection.
async fn open_holder(url: &str, kind: &str) -> anyhow::Result<PgConnection> {
    let mut conn = PgConnection::connect(url).await?;
    match kind {
        "snapshot" => {
            sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
                .execute(&mut conn)
                .await?;
        }
        _ => {
            sqlx::raw_sql(
                "CREATE TABLE IF NOT EXISTS bench_holder (x int); \
                 BEGIN; INSERT INTO bench_holder VALUES (1)",
            )
            .execute(&mut conn)
            .await?;
        }
    }
    Ok(conn)
}

/// Calls and total ms of the fetch statement (the receive, for a topic) so far, when
/// `pg_stat_statements` is there.
async fn fetch_totals(
    pool: &PgPool,
    available: bool,
    topic: bool,
) -> anyhow::Result<Option<(i64, f64)>> {
    if !available {
        return Ok(None);
    }
    let row: (Option<i64>, Option<f64>) = sqlx::query_as(
        "SELECT sum(calls)::bigint, sum(total_exec_time) FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND toplevel \
           AND ((NOT $1 AND query LIKE '%expired AS (%' AND query LIKE '%leased AS (%') \
                OR ($1 AND query LIKE '%postbox_receive\"(%'))",
    )
    .bind(topic)
    .fetch_one(pool)
    .await?;
    Ok(Some((row.0.unwrap_or(0), row.1.unwrap_or(0.0))))
}

/// Dead tuples and total bytes (heap, indexes, TOAST) of the outbox table and its partitions,
/// or for a topic of the log, its partitions, and the subscription tables.
async fn relation_stats(pool: &PgPool, topic: bool) -> anyhow::Result<(i64, i64)> {
    let row: (Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT sum(coalesce(s.n_dead_tup, 0))::bigint, \
                sum(pg_total_relation_size(t.relid))::bigint \
         FROM (SELECT relid FROM pg_partition_tree('postbox') WHERE NOT $1 \
               UNION SELECT 'postbox'::regclass WHERE NOT $1 \
               UNION SELECT relid FROM pg_partition_tree('postbox_log') WHERE $1 \
               UNION SELECT relid FROM pg_partition_tree('postbox_batches') WHERE $1 \
               UNION SELECT r::regclass FROM unnest(ARRAY['postbox_subs', 'postbox_held']) AS r \
                     WHERE $1) AS t \
         LEFT JOIN pg_stat_user_tables s ON s.relid = t.relid",
    )
    .bind(topic)
    .fetch_one(pool)
    .await?;
    Ok((row.0.unwrap_or(0), row.1.unwrap_or(0)))
}

fn summary(
    storage: &str,
    holder: &str,
    settings: HoldSettings,
    samples: &[Sample],
    published: u64,
    acked: u64,
) -> Value {
    let in_phase = |p: &'static str| samples.iter().filter(move |s| s.phase == p);
    let mean =
        |v: Vec<f64>| (!v.is_empty()).then(|| round(v.iter().sum::<f64>() / v.len() as f64, 3));
    let per_window = 6; // 30 s windows of 5 s samples
    let hold: Vec<&Sample> = in_phase("hold").collect();
    let windows: Vec<f64> = hold
        .chunks(per_window)
        .filter(|c| c.len() == per_window)
        .map(|c| {
            round(
                c.iter().map(|s| s.consumed_per_s).sum::<f64>()
                    / c.len() as f64
                    / settings.rate as f64,
                4,
            )
        })
        .collect();
    fn last_n<'a>(v: &[&'a Sample], n: usize) -> Vec<&'a Sample> {
        v[v.len().saturating_sub(n)..].to_vec()
    }
    let clean: Vec<&Sample> = in_phase("clean").collect();
    let after: Vec<&Sample> = in_phase("after").collect();
    let clean_fetch = mean(
        last_n(&clean, 6)
            .iter()
            .filter_map(|s| s.fetch_ms)
            .collect(),
    );
    let hold_fetch = mean(
        last_n(&hold, 12)
            .iter()
            .filter_map(|s| s.fetch_ms)
            .collect(),
    );
    let after_fetch = mean(
        after
            .iter()
            .skip(6)
            .take(6)
            .filter_map(|s| s.fetch_ms)
            .collect(),
    );
    let clean_bytes = clean.last().map_or(0, |s| s.bytes);
    let hold_end = hold.last().copied();
    json!({
        "storage": storage,
        "holder": holder,
        "published": published,
        "acked": acked,
        "consumed_ratio_per_30s_window_of_hold": windows,
        "min_window_ratio": windows.iter().copied().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x)))),
        "backlog_end_of_hold": hold_end.map(|s| s.backlog),
        "max_dead_tuples": samples.iter().map(|s| s.dead_tuples).max(),
        "bytes_clean_steady": clean_bytes,
        "bytes_end_of_hold": hold_end.map(|s| s.bytes),
        "size_ratio_end_of_hold": hold_end.map(|s| round(s.bytes as f64 / clean_bytes.max(1) as f64, 2)),
        "fetch_ms_clean_last_30s": clean_fetch,
        "fetch_ms_hold_last_60s": hold_fetch,
        "fetch_ms_after_30_to_60s": after_fetch,
        "series": samples.iter().map(|s| json!({
            "t": s.t, "phase": s.phase, "consumed_per_s": s.consumed_per_s, "backlog": s.backlog,
            "dead_tuples": s.dead_tuples, "bytes": s.bytes, "fetch_ms": s.fetch_ms,
        })).collect::<Vec<_>>(),
    })
}
