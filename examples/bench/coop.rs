//! `coop`: cooperative members splitting one queue; events per second for N members, with
//! duplicate and loss counts.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use postbox::runtime::SubscriberEvent;
use postbox::{Delivery, HandlerError, Member, Message, Subscriber, SubscriberOptions};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::Ctx;
use crate::stats::{compare, median, median_of, rate, round, spread};
use postbox::prelude::*;

/// Member counts measured.
pub(crate) const MEMBERS: [usize; 4] = [1, 2, 4, 8];

/// The fetch cap and pool of the capped series, sized for the 2-core machine the figures in
/// BENCHMARKS.md come from: as many fetch statements and as many outcome writes at once as it
/// has cores, so at most 2 × cores statements run (see `PgBackend::max_concurrent_fetches`).
const FETCH_CAP: usize = 2;
const POOL: u32 = 2;

/// One measured configuration.
struct Series {
    work: Duration,
    /// `None`: uncapped fetches with a 16-connection pool (the settings before the cap).
    fetch_cap: Option<usize>,
}

/// One subscriber per member, each with one worker for the 1 ms handler (a member handles
/// its events one at a time, so linear scaling is N × 1/handler time). Each handler's capped
/// and uncapped series are measured in turns, and each turn goes round the member counts
/// (capped 1, 2, 4, 8, uncapped 1, 2, 4, 8, capped 1, ...), so a drift of the machine's speed
/// during the run touches every figure alike.
pub(crate) async fn coop(ctx: &Ctx) -> anyhow::Result<Value> {
    let n = ctx.size(20_000);
    let db = postbox::testkit::postgres().await?;
    let mut out = Vec::new();
    for work in [Duration::ZERO, Duration::from_millis(1)] {
        let mut group = Vec::new();
        for fetch_cap in [Some(FETCH_CAP), None] {
            let pool = postbox::sqlx::postgres::PgPoolOptions::new()
                .max_connections(if fetch_cap.is_some() { POOL } else { 16 })
                .connect(db.url())
                .await?;
            let mut backend = postbox::PgBackend::new(pool);
            if let Some(cap) = fetch_cap.and_then(NonZeroUsize::new) {
                backend = backend.max_concurrent_fetches(cap);
            }
            group.push((Series { work, fetch_cap }, backend));
        }
        // No-op runs last 0.2 s, so the VM's noise (±15 % run to run) would swamp a 5 %
        // difference between N = 4 and N = 8 in a median of 3: they have their own count.
        let reps = if work.is_zero() && !ctx.smoke {
            ctx.coop_reps
        } else {
            ctx.reps
        };
        let mut runs: Vec<Vec<Vec<Run>>> = group
            .iter()
            .map(|_| MEMBERS.iter().map(|_| Vec::new()).collect())
            .collect();
        for rep in 0..reps {
            for (s, (series, backend)) in group.iter().enumerate() {
                for (i, members) in MEMBERS.into_iter().enumerate() {
                    ctx.progress(format!(
                        "coop: {members} member(s), {}ms handler, fetch cap {:?}, repetition {}",
                        work.as_millis(),
                        series.fetch_cap,
                        rep + 1
                    ));
                    runs[s][i].push(run(backend, n, members, work).await?);
                }
            }
        }
        for ((series, backend), runs) in group.into_iter().zip(runs) {
            let rates: Vec<Vec<f64>> = runs
                .iter()
                .map(|runs| runs.iter().map(|r| rate(n, r.elapsed)).collect())
                .collect();
            for ((members, runs), rates) in MEMBERS.into_iter().zip(&runs).zip(&rates) {
                out.push(summary(&series, members, n, runs, rates));
            }
            // The no-op target: N = 8 against N = 4 and against the best N below 8.
            if let Some(last) = out.last_mut().filter(|_| work.is_zero()) {
                let at = |m: usize| &rates[MEMBERS.iter().position(|x| *x == m).unwrap_or(0)];
                let peak = MEMBERS[..MEMBERS.len() - 1]
                    .iter()
                    .copied()
                    .max_by(|x, y| median_of(at(*x)).total_cmp(&median_of(at(*y))))
                    .unwrap_or(4);
                last["vs_n4"] = compare(at(4), at(8));
                last["vs_best_below_8"] =
                    json!({ "members": peak, "comparison": compare(at(peak), at(8)) });
            }
            backend.pool().close().await;
        }
    }
    db.close().await?;
    Ok(json!({
        "workload": "coop",
        "events": n,
        "settings": format!("one Subscriber per member (subconsumer mode), started and idle before the events are committed in one transaction; timed from that commit to the last ack; repetitions interleaved across series and N. \
                     Capped series: PgBackend::max_concurrent_fetches({FETCH_CAP}) and a pool of {POOL} (fetch_cap in each result); uncapped series (fetch_cap null): a pool of 16. \
                     no-op: 32 workers, prefetch 480, ack_delay 2 ms, --coop-reps repetitions; 1 ms: 1 worker, prefetch 32, ack_delay 10 ms, handler = 1 ms thread sleep on the blocking pool"),
        "results": out,
    }))
}

/// The JSON entry of one (series, N): `rates` are the events/s of its `runs`.
fn summary(series: &Series, members: usize, n: usize, runs: &[Run], rates: &[f64]) -> Value {
    let each: Vec<f64> = rates.iter().map(|r| round(*r, 0)).collect();
    let busy_ns: u64 = runs.iter().map(|r| r.busy_ns).sum();
    let handler_mean_ms = busy_ns as f64 / (n * runs.len()) as f64 / 1e6;
    let events_per_s = spread(rates.to_vec());
    let work = series.work;
    let ideal = (!work.is_zero()).then(|| members as f64 * 1e3 / handler_mean_ms);
    json!({
        "handler_ms": work.as_secs_f64() * 1e3,
        "fetch_cap": series.fetch_cap,
        "members": members,
        "events_per_s": events_per_s,
        "events_per_s_each_run": each,
        "handler_measured_mean_ms": round(handler_mean_ms, 4),
        "ideal_events_per_s": ideal.map(|x| round(x, 0)),
        "efficiency_vs_measured_handler": ideal.map(|x| round(median(&events_per_s) / x, 3)),
        "efficiency_vs_nominal_1ms": (!work.is_zero()).then(|| round(median(&events_per_s) / (members as f64 * 1e3), 3)),
        "duplicates": runs.iter().map(|r| r.duplicates).sum::<usize>(),
        "lost": runs.iter().map(|r| r.lost).sum::<usize>(),
    })
}

struct Run {
    elapsed: Duration,
    duplicates: usize,
    lost: usize,
    busy_ns: u64,
}

async fn run(
    backend: &postbox::PgBackend,
    n: usize,
    members: usize,
    work: Duration,
) -> anyhow::Result<Run> {
    // Every run starts from the same table state, not from the dead rows of the last one.
    crate::server::vacuum(backend.pool()).await?;
    let seen = Arc::new(parking_lot::Mutex::new(Vec::with_capacity(n)));
    let busy = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::new();
    let mut ready = Vec::new();
    for m in 0..members {
        let (seen, busy) = (Arc::clone(&seen), Arc::clone(&busy));
        let handler = move |d: Delivery| {
            let (seen, busy) = (Arc::clone(&seen), Arc::clone(&busy));
            async move {
                if !work.is_zero() {
                    let took = tokio::task::spawn_blocking(move || block_for(work))
                        .await
                        .unwrap_or_default();
                    busy.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
                }
                seen.lock().push(d.id);
                Ok::<(), HandlerError>(())
            }
        };
        let options = if work.is_zero() {
            SubscriberOptions::new(["coop"])
                .max_workers(32)
                .prefetch(480)
                .ack_delay(Duration::from_millis(2))
        } else {
            SubscriberOptions::new(["coop"])
                .max_workers(1)
                .prefetch(32)
                .ack_delay(Duration::from_millis(10))
        };
        let options = options
            .subconsumer(Member::new("bench", format!("m{m}"))?)
            .min_fetch_interval(Duration::from_millis(10))
            .max_fetch_interval(Duration::from_millis(100));
        let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();
        ready.push(sub.events());
        subs.push(sub);
    }
    // Members start (connect, register, LISTEN) before the clock does: connection set-up is
    // a one-time cost, 2 connections per member, not part of consumption throughput.
    for events in &mut ready {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match events.recv().await {
                    Ok(SubscriberEvent::Idle) => return Ok(()),
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => anyhow::bail!("a member stopped before it was ready"),
                }
            }
        })
        .await
        .context("a member was not ready within 30 s")??;
    }
    // Then the whole backlog appears at once, in one commit that wakes every member.
    let mut tx = backend.begin().await?;
    let mut published = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        let messages = chunk
            .iter()
            .map(|i| Message::new("coop", i.to_string()))
            .collect();
        published.extend(backend.publish_batch(&mut tx, messages).await?);
    }
    let start = Instant::now();
    backend.commit(tx).await?;
    while subs.iter().map(|s| s.stats().acked).sum::<u64>() < n as u64 {
        anyhow::ensure!(
            subs.iter().all(|s| s.is_running()),
            "a member stopped: {:?}",
            subs.iter().find_map(|s| s.last_error())
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed();
    for sub in subs {
        sub.shutdown().await?;
    }
    let handled = seen.lock().clone();
    let distinct: HashSet<i64> = handled.iter().copied().collect();
    Ok(Run {
        elapsed,
        duplicates: handled.len() - distinct.len(),
        lost: published.iter().filter(|id| !distinct.contains(id)).count(),
        busy_ns: busy.load(Ordering::Relaxed),
    })
}

/// A handler's blocking work: sleeps `work` on the calling (blocking-pool) thread and
/// returns how long it really took.
///
/// tokio's timer has a 1 ms resolution, so `tokio::time::sleep(1 ms)` lasts 1-2 ms; a thread
/// sleep with the kernel's timer slack lowered to 1 µs lasts 1.00-1.06 ms.
fn block_for(work: Duration) -> Duration {
    thread_local!(static SLACK_SET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    SLACK_SET.with(|set| {
        if !set.get() {
            // SAFETY: PR_SET_TIMERSLACK only changes the calling thread's timer slack.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64) };
            set.set(true);
        }
    });
    let start = Instant::now();
    std::thread::sleep(work);
    start.elapsed()
}
