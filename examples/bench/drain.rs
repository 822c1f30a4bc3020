//! `drain`: messages per second one subscriber with a no-op handler drains from a full queue,
//! and from a topic subscription's backlog; and the same by a bare fetch (receive) and
//! settle loop, the storage's own speed.

use std::time::{Duration, Instant};

use postbox::topic::{Receive, Settlement};
use postbox::{
    Delivery, FetchParams, HandlerError, PgBackend, Subscriber, SubscriberOptions, Topics,
};
use serde_json::{Value, json};

use crate::Ctx;
use crate::publish::{batches, median_of, topic_batches};
use crate::server::{Wal, table_bytes};
use crate::stats::{rate, round, spread};
use postbox::prelude::*;

/// Drains `n` pre-published messages with default settings, with the tuned settings the
/// storage issue measured (batched acks), with the same but one ack statement per message,
/// the same two subscriber settings on a topic subscription, fetches of `BIG_BATCH` on both,
/// then the bare loops.
pub(crate) async fn drain(ctx: &Ctx) -> anyhow::Result<Value> {
    let n = ctx.size(20_000);
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let tuned = SubscriberOptions::new(["drain"])
        .max_workers(64)
        .prefetch(448);
    // Few, large fetches: the best setting for a topic subscription, whose receive costs
    // little per message once the batch is large (docs/design/storage.md, schema v9).
    let big = SubscriberOptions::new(["drain"])
        .max_workers(64)
        .prefetch(BIG_BATCH)
        .max_prefetch(BIG_BATCH);
    let variants = [
        ("default_settings", SubscriberOptions::new(["drain"])),
        ("tuned_batched_acks", tuned.clone()),
        ("tuned_per_row_acks", tuned.clone().batch_acks(false)),
        (
            "topic_default_settings",
            SubscriberOptions::new(["drain"]).subscription("bench"),
        ),
        ("topic_tuned", tuned.clone().subscription("bench")),
        ("big_batches", big.clone()),
        ("topic_big_batches", big.subscription("bench")),
    ];
    let mut out = serde_json::Map::new();
    for (name, options) in variants {
        if !ctx.wants(name) {
            continue;
        }
        let topic = name.starts_with("topic");
        let mut rates = Vec::new();
        let mut wal = Vec::new();
        let mut stats = None;
        let mut bytes_after = 0;
        for rep in 0..ctx.reps {
            ctx.progress(format!("drain {name}: repetition {}", rep + 1));
            crate::server::vacuum(db.pool()).await?;
            if topic {
                backend.subscribe("drain", "bench").await?;
                topic_batches(&backend, "drain", n, 1_000).await?;
            } else {
                batches(&backend, "drain", n, 1_000).await?;
            }
            let handler = |_d: Delivery| std::future::ready(Ok::<(), HandlerError>(()));
            let before = Wal::now(db.pool()).await?;
            let start = Instant::now();
            let sub = Subscriber::new(backend.clone(), options.clone(), handler)?.spawn();
            while sub.stats().acked < n as u64 {
                anyhow::ensure!(
                    sub.is_running(),
                    "subscriber stopped: {:?}",
                    sub.last_error()
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let elapsed = start.elapsed();
            stats = Some(sub.shutdown().await?.stats);
            rates.push(rate(n, elapsed));
            wal.push(before.bytes_since(db.pool()).await? / n as f64);
            bytes_after = table_bytes(db.pool()).await?;
        }
        let stats = stats.unwrap_or_default();
        out.insert(
            name.into(),
            json!({
                "msgs_per_s": spread(rates),
                "wal_bytes_per_msg": round(median_of(wal), 1),
                "table_bytes_after_last_drain": bytes_after,
                "ack_statements_last_run": stats.ack_statements,
                "fetches_last_run": stats.fetches,
                "settings": format!("{options:?}"),
            }),
        );
    }
    for (name, topic) in [
        ("loop_fetch_ack_batch", false),
        ("loop_topic_receive_settle", true),
    ] {
        if !ctx.wants(name) {
            continue;
        }
        let mut rates = Vec::new();
        let mut wal = Vec::new();
        let mut bytes_after = 0;
        for rep in 0..ctx.reps {
            ctx.progress(format!("drain {name}: repetition {}", rep + 1));
            crate::server::vacuum(db.pool()).await?;
            if topic {
                backend.subscribe("drain", "bench").await?;
                topic_batches(&backend, "drain", n, 1_000).await?;
            } else {
                batches(&backend, "drain", n, 1_000).await?;
            }
            let before = Wal::now(db.pool()).await?;
            let start = Instant::now();
            let drained = if topic {
                receive_loop(&backend, "bench").await?
            } else {
                fetch_loop(&backend, "drain").await?
            };
            let elapsed = start.elapsed();
            anyhow::ensure!(drained == n, "{name} drained {drained} of {n}");
            rates.push(rate(n, elapsed));
            wal.push(before.bytes_since(db.pool()).await? / n as f64);
            bytes_after = table_bytes(db.pool()).await?;
        }
        out.insert(
            name.into(),
            json!({
                "msgs_per_s": spread(rates),
                "wal_bytes_per_msg": round(median_of(wal), 1),
                "table_bytes_after_last_drain": bytes_after,
                "settings": format!("one loop: {} {LOOP_BATCH}, then one settling statement", if topic { "receive" } else { "fetch" }),
            }),
        );
    }
    db.close().await?;
    Ok(json!({ "workload": "drain", "messages": n, "results": out }))
}

/// The prefetch buffer of the `big_batches` variants.
const BIG_BATCH: usize = 4_000;

/// Messages per fetch or receive in the loop variants.
const LOOP_BATCH: u32 = 1_000;

/// Fetches `LOOP_BATCH` at a time and acks each batch in one statement, until empty.
async fn fetch_loop(backend: &PgBackend, queue: &str) -> anyhow::Result<usize> {
    let mut drained = 0;
    loop {
        let got = backend
            .fetch(&FetchParams::new([queue], LOOP_BATCH))
            .await?;
        if got.is_empty() {
            return Ok(drained);
        }
        let leases: Vec<_> = got.iter().map(Delivery::lease).collect();
        drained += backend.ack_batch(&leases).await?.len();
    }
}

/// Receives `LOOP_BATCH` at a time and acks each batch in one statement, until empty.
pub(crate) async fn receive_loop(backend: &PgBackend, subscription: &str) -> anyhow::Result<usize> {
    let mut drained = 0;
    loop {
        let got = backend
            .receive(&Receive::new(subscription, LOOP_BATCH))
            .await?;
        if got.is_empty() {
            return Ok(drained);
        }
        let leases: Vec<_> = got.iter().map(Delivery::lease).collect();
        drained += backend.settle(&leases, Settlement::Ack).await?.len();
    }
}
