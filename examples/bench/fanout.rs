//! `fanout`: one topic with 1, 4 and 16 subscriptions. Publish msg/s and WAL bytes per
//! published message (a message is stored once, whatever the number of subscriptions), then
//! each subscription's drain rate with a bare receive-and-settle loop, drained one after the
//! other: the first drains while every other one lags a full backlog behind, the last alone.

use std::time::Instant;

use postbox::Topics;
use serde_json::{Value, json};

use crate::Ctx;
use crate::drain::receive_loop;
use crate::publish::{median_of, topic_batches};
use crate::server::Wal;
use crate::stats::{rate, round, spread};

pub(crate) async fn fanout(ctx: &Ctx) -> anyhow::Result<Value> {
    const PER_TX: usize = 1_000;
    let n = ctx.size(20_000);
    let mut out = serde_json::Map::new();
    for subscriptions in [1_usize, 4, 16] {
        let db = postbox::testkit::postgres().await?;
        let backend = db.backend();
        let names: Vec<String> = (0..subscriptions).map(|i| format!("s{i}")).collect();
        for name in &names {
            backend.subscribe("fan", name).await?;
        }
        let mut publish_rates = Vec::new();
        let mut wal = Vec::new();
        let mut drain_rates = Vec::new();
        for rep in 0..ctx.reps {
            ctx.progress(format!("fanout {subscriptions}: repetition {}", rep + 1));
            let before = Wal::now(db.pool()).await?;
            let start = Instant::now();
            topic_batches(&backend, "fan", n, PER_TX).await?;
            publish_rates.push(rate(n, start.elapsed()));
            wal.push(before.bytes_since(db.pool()).await? / n as f64);
            let mut per_sub = Vec::new();
            for name in &names {
                let start = Instant::now();
                let drained = receive_loop(&backend, name).await?;
                anyhow::ensure!(drained == n, "{name} drained {drained} of {n}");
                per_sub.push(rate(n, start.elapsed()));
            }
            drain_rates.push(per_sub);
            backend.rotate_topics().await?;
        }
        let first: Vec<f64> = drain_rates.iter().map(|r| r[0]).collect();
        let last: Vec<f64> = drain_rates
            .iter()
            .filter_map(|r| r.last().copied())
            .collect();
        out.insert(
            subscriptions.to_string(),
            json!({
                "publish_msgs_per_s": spread(publish_rates),
                "wal_bytes_per_published_msg": round(median_of(wal), 1),
                "drain_msgs_per_s_first_subscription": spread(first),
                "drain_msgs_per_s_last_subscription": spread(last),
            }),
        );
        db.close().await?;
    }
    Ok(json!({
        "workload": "fanout",
        "messages": n,
        "settings": format!("publish_to_topics of {PER_TX} per transaction; drain: receive 1,000, settle Ack, one subscription at a time"),
        "results": out,
    }))
}
