//! `publish_batch` and `publish_single`: messages per second into the outbox, and the WAL each
//! message costs.

use std::time::Instant;

use postbox::{Message, PgBackend, Topics};
use serde_json::{Value, json};

use crate::Ctx;
use crate::server::Wal;
use crate::stats::{rate, round, spread};
use postbox::prelude::*;

/// Publishes `n` messages to `queue`, `per_tx` per transaction (one `publish_batch` each).
pub(crate) async fn batches(
    backend: &PgBackend,
    queue: &str,
    n: usize,
    per_tx: usize,
) -> anyhow::Result<()> {
    let mut sent = 0;
    while sent < n {
        let size = per_tx.min(n - sent);
        let mut tx = backend.begin().await?;
        backend
            .publish_batch(
                &mut tx,
                (sent..sent + size)
                    .map(|i| Message::new(queue, i.to_string()))
                    .collect(),
            )
            .await?;
        backend.commit(tx).await?;
        sent += size;
    }
    Ok(())
}

/// Publishes `n` messages to `topic` in transactions of `per_tx`.
pub(crate) async fn topic_batches(
    backend: &PgBackend,
    topic: &str,
    n: usize,
    per_tx: usize,
) -> anyhow::Result<()> {
    let mut left = n;
    while left > 0 {
        let k = left.min(per_tx);
        let mut tx = backend.begin().await?;
        backend
            .publish_to_topics(
                &mut tx,
                (0..k).map(|i| Message::new(topic, i.to_string())).collect(),
            )
            .await?;
        backend.commit(tx).await?;
        left -= k;
    }
    Ok(())
}

/// `publish_batch`: `n` messages, 1,000 per transaction.
pub(crate) async fn publish_batch(ctx: &Ctx) -> anyhow::Result<Value> {
    const PER_TX: usize = 1_000;
    let n = ctx.size(20_000);
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let mut rates = Vec::new();
    let mut wal = Vec::new();
    for rep in 0..ctx.reps {
        ctx.progress(format!("publish_batch: repetition {}", rep + 1));
        let before = Wal::now(db.pool()).await?;
        let start = Instant::now();
        batches(&backend, "bench", n, PER_TX).await?;
        rates.push(rate(n, start.elapsed()));
        wal.push(before.bytes_since(db.pool()).await? / n as f64);
    }
    db.close().await?;
    Ok(json!({
        "workload": "publish_batch",
        "messages": n,
        "settings": format!("publish_batch of {PER_TX} messages per transaction, payload ~5 bytes"),
        "msgs_per_s": spread(rates),
        "wal_bytes_per_msg": round(median_of(wal), 1),
    }))
}

/// `publish_single`: `n` messages, one transaction and commit each.
pub(crate) async fn publish_single(ctx: &Ctx) -> anyhow::Result<Value> {
    let n = ctx.size(2_000);
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let mut rates = Vec::new();
    let mut wal = Vec::new();
    for rep in 0..ctx.reps {
        ctx.progress(format!("publish_single: repetition {}", rep + 1));
        let before = Wal::now(db.pool()).await?;
        let start = Instant::now();
        for i in 0..n {
            let mut tx = backend.begin().await?;
            backend
                .publish(&mut tx, Message::new("bench", i.to_string()))
                .await?;
            backend.commit(tx).await?;
        }
        rates.push(rate(n, start.elapsed()));
        wal.push(before.bytes_since(db.pool()).await? / n as f64);
    }
    db.close().await?;
    Ok(json!({
        "workload": "publish_single",
        "messages": n,
        "settings": "one publish per transaction (BEGIN, INSERT + pg_notify, COMMIT), sequential",
        "msgs_per_s": spread(rates),
        "wal_bytes_per_msg": round(median_of(wal), 1),
    }))
}

/// The median of a few values (0 when empty).
pub(crate) fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}
