//! `fake`: FakeBroker round trips (publish a batch, fetch it, ack it).

use std::time::Instant;

use postbox::{Delivery, FetchParams, Message};
use serde_json::{Value, json};

use crate::Ctx;
use crate::stats::{rate, spread};
use postbox::prelude::*;

/// `n` messages in batches of 1,000; publish, fetch and ack each count once per message.
pub(crate) async fn fake(ctx: &Ctx) -> anyhow::Result<Value> {
    const BATCH: usize = 1_000;
    let n = ctx.size(1_000_000);
    let mut rates = Vec::new();
    for rep in 0..ctx.reps {
        ctx.progress(format!("fake: repetition {}", rep + 1));
        let broker = postbox::fake::FakeBroker::new();
        let params = FetchParams::new(["bench"], BATCH as u32);
        let start = Instant::now();
        for _ in 0..n.div_ceil(BATCH) {
            let mut tx = broker.begin().await?;
            broker
                .publish_batch(
                    &mut tx,
                    (0..BATCH).map(|_| Message::new("bench", "x")).collect(),
                )
                .await?;
            broker.commit(tx).await?;
            let leases: Vec<_> = broker
                .fetch(&params)
                .await?
                .iter()
                .map(Delivery::lease)
                .collect();
            anyhow::ensure!(
                broker.ack_batch(&leases).await?.len() == BATCH,
                "acked fewer"
            );
        }
        rates.push(rate(n.div_ceil(BATCH) * BATCH, start.elapsed()));
    }
    Ok(json!({
        "workload": "fake",
        "messages": n,
        "batch": BATCH,
        "msgs_per_s": spread(rates),
    }))
}
