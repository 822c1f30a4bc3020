//! `dispatch`: what `async_trait` costs per call against a native `async fn` in a trait, to
//! decide how postbox's traits are written (issue 19). The same trivial method three ways:
//! `#[async_trait]` (a boxed future per call) called through a generic, the same through
//! `dyn`, and native `async fn` (Rust 1.75+) through a generic. Beside them, one
//! `FakeBroker::fetch` of one message, the cheapest real call postbox makes through its traits.

use std::future::Future;
use std::hint::black_box;
use std::time::Instant;

use async_trait::async_trait;
use postbox::{FetchParams, Message};
use serde_json::{Value, json};

use crate::Ctx;
use crate::stats::spread;
use postbox::prelude::*;

#[async_trait]
trait Boxed: Send + Sync {
    async fn get(&self, x: u64) -> u64;
}

trait Native: Send + Sync {
    fn get(&self, x: u64) -> impl Future<Output = u64> + Send;
}

struct Plus(u64);

#[async_trait]
impl Boxed for Plus {
    async fn get(&self, x: u64) -> u64 {
        x.wrapping_add(self.0)
    }
}

impl Native for Plus {
    async fn get(&self, x: u64) -> u64 {
        x.wrapping_add(self.0)
    }
}

async fn boxed_generic<T: Boxed>(t: &T, n: u64) -> u64 {
    let mut acc = 0;
    for i in 0..n {
        acc = black_box(t).get(black_box(acc ^ i)).await;
    }
    acc
}

async fn boxed_dyn(t: &dyn Boxed, n: u64) -> u64 {
    let mut acc = 0;
    for i in 0..n {
        acc = black_box(t).get(black_box(acc ^ i)).await;
    }
    acc
}

async fn native_generic<T: Native>(t: &T, n: u64) -> u64 {
    let mut acc = 0;
    for i in 0..n {
        acc = black_box(t).get(black_box(acc ^ i)).await;
    }
    acc
}

/// Nanoseconds per call of `f` over `n` calls.
async fn ns_per_call<F: Future<Output = u64>>(n: u64, f: F) -> f64 {
    let start = Instant::now();
    black_box(f.await);
    start.elapsed().as_nanos() as f64 / n as f64
}

pub(crate) async fn dispatch(ctx: &Ctx) -> anyhow::Result<Value> {
    let n = ctx.size(20_000_000) as u64;
    let t = Plus(1);
    let (mut boxed, mut dynamic, mut native, mut fetch) = (vec![], vec![], vec![], vec![]);
    for rep in 0..ctx.reps {
        ctx.progress(format!("dispatch: repetition {}", rep + 1));
        boxed.push(ns_per_call(n, boxed_generic(&t, n)).await);
        dynamic.push(ns_per_call(n, boxed_dyn(&t, n)).await);
        native.push(ns_per_call(n, native_generic(&t, n)).await);

        let broker = postbox::fake::FakeBroker::new();
        let params = FetchParams::new(["bench"], 1);
        let calls = (n / 1_000).max(1);
        let mut tx = broker.begin().await?;
        broker
            .publish_batch(
                &mut tx,
                (0..calls).map(|_| Message::new("bench", "x")).collect(),
            )
            .await?;
        broker.commit(tx).await?;
        let start = Instant::now();
        for _ in 0..calls {
            anyhow::ensure!(broker.fetch(&params).await?.len() == 1, "fetched none");
        }
        fetch.push(start.elapsed().as_nanos() as f64 / calls as f64);
    }
    Ok(json!({
        "workload": "dispatch",
        "calls": n,
        "ns_per_call": {
            "async_trait_generic": spread(boxed),
            "async_trait_dyn": spread(dynamic),
            "native_async_fn_generic": spread(native),
            "fake_fetch_of_one": spread(fetch),
        },
    }))
}
