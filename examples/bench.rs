//! Benchmarks that print JSON, comparing alternatives within one run.
//!
//! Run with: `cargo run --release --example bench -- [WORKLOAD...] [--json FILE] [--rounds N]`
//!
//! Workloads (all by default):
//! - `wakeup`: per round, a subscriber idle for 2 s, then one message published and
//!   committed; commit-to-handler latency in ms, with LISTEN and with polling only (default
//!   intervals, 1 s backing off to 10 s). `--rounds` rounds with LISTEN, at most 10 without.
//! - `drain`: 20,000 messages published beforehand, one subscriber with a no-op handler,
//!   messages per second; default settings, tuned settings, and per-row versus batched acks.
//! - `coop`: 20,000 events shared by N = 1, 2, 4, 8 cooperative members (one worker each),
//!   with a no-op and with a 1 ms handler; events per second, duplicates and losses.
//! - `journal`: 20 streams of 100 events each, written by `BatchedJournalWriter` and by
//!   `record_event` per row; events per second and commits per stream.
//! - `fake`: `FakeBroker` publish (batches of 1,000) + fetch 1,000 + `ack_batch`, 1,000,000
//!   messages, messages per second (publish, fetch and ack each count once per message).
//! - `fixture`: a fresh test database cloned from the migrated template
//!   (`testkit::postgres()`), against creating an empty database and running the migrations
//!   in it; milliseconds per database, `--rounds` of each (default 50).
//!
//! Uses the testkit's server (`POSTBOX_TEST_DATABASE_URL`, Docker, or the local binaries).

use std::time::{Duration, Instant};

use anyhow::Context;
use postbox::sqlx::postgres::PgPoolOptions;
use postbox::sqlx::{self, AssertSqlSafe, Connection, PgConnection};
use postbox::{
    Backend, Delivery, HandlerError, Message, PgBackend, Subscriber, SubscriberEvent,
    SubscriberOptions,
};
use serde_json::{Value, json};

struct Args {
    workloads: Vec<String>,
    json: Option<String>,
    rounds: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        workloads: Vec::new(),
        json: None,
        rounds: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => args.json = Some(it.next().context("--json needs a file")?),
            "--rounds" => args.rounds = it.next().context("--rounds needs a number")?.parse()?,
            "-h" | "--help" => {
                println!(
                    "usage: bench [wakeup] [drain] [fixture] [fake] [--json FILE] [--rounds N]"
                );
                std::process::exit(0);
            }
            w if !w.starts_with('-') => args.workloads.push(w.to_owned()),
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    if args.workloads.is_empty() {
        args.workloads = ["wakeup", "drain", "fixture", "fake"]
            .map(String::from)
            .to_vec();
    }
    Ok(args)
}

/// Min, p50, p95 and max of `samples`, in milliseconds.
fn summary(samples: &mut [Duration]) -> Value {
    samples.sort();
    let ms = |d: Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        ms(samples[i])
    };
    json!({
        "n": samples.len(),
        "min": ms(samples[0]),
        "p50": at(0.5),
        "p95": at(0.95),
        "max": ms(samples[samples.len() - 1]),
    })
}

async fn fixture(rounds: usize) -> anyhow::Result<Value> {
    // Warm-up: starts the server and builds the template, which is not what we measure.
    let first = postbox::testkit::postgres().await?;
    let admin_url = first
        .url()
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/postgres"));
    let admin_url = admin_url.context("fixture url has no database")?;

    let mut template = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        let db = postbox::testkit::postgres().await?;
        template.push(start.elapsed());
        db.close().await?;
    }

    let mut migrate = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let name = format!("postbox_bench_{}_{i}", std::process::id());
        let start = Instant::now();
        let mut admin = PgConnection::connect(&admin_url).await?;
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await?;
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .connect(&format!(
                "{}/{name}",
                admin_url.trim_end_matches("/postgres")
            ))
            .await?;
        PgBackend::new(pool.clone()).migrate().await?;
        migrate.push(start.elapsed());
        pool.close().await;
        sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
    }

    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'server_version')",
    )
    .fetch_all(first.pool())
    .await?;
    let template = summary(&mut template);
    let migrate = summary(&mut migrate);
    let ratio = migrate["p50"].as_f64().unwrap_or(0.0) / template["p50"].as_f64().unwrap_or(1.0);
    first.close().await?;
    Ok(json!({
        "workload": "fixture",
        "provider": postbox::testkit::postgres::current_provider().map(|p| p.to_string()),
        "postgres": settings
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect::<serde_json::Map<_, _>>(),
        "fresh_fixture_from_template_ms": template,
        "create_empty_db_and_migrate_ms": migrate,
        "p50_ratio_migrate_over_template": (ratio * 100.0).round() / 100.0,
    }))
}

async fn publish_batches(backend: &PgBackend, queue: &str, n: usize) -> anyhow::Result<()> {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut tx = backend.begin().await?;
        backend
            .publish_batch(
                &mut tx,
                chunk
                    .iter()
                    .map(|i| Message::new(queue, i.to_string()))
                    .collect(),
            )
            .await?;
        backend.commit(tx).await?;
    }
    Ok(())
}

/// Commit-to-handler latency of an idle subscriber.
async fn wakeup(rounds: usize) -> anyhow::Result<Value> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let mut out = serde_json::Map::new();
    let variants = [
        ("listen", SubscriberOptions::new(["wake"]), rounds),
        (
            "polling_only",
            SubscriberOptions::new(["wake"]).listen(false),
            rounds.min(10),
        ),
    ];
    for (name, options, rounds) in variants {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let handler = move |_d: Delivery| {
            let _ = tx.send(Instant::now());
            std::future::ready(Ok::<(), HandlerError>(()))
        };
        let settings = format!("{options:?}");
        let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();
        let mut events = sub.events();
        let mut samples = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            // Idle long enough for polling to back off, as a quiet production queue would.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let mut tx = backend.begin().await?;
            backend.publish(&mut tx, Message::new("wake", "x")).await?;
            backend.commit(tx).await?;
            let committed = Instant::now();
            let handled = rx.recv().await.context("handler gone")?;
            samples.push(handled.saturating_duration_since(committed));
            // Let the ack land before the next round.
            loop {
                if let SubscriberEvent::Handled { .. } = events.recv().await? {
                    break;
                }
            }
        }
        sub.shutdown().await?;
        let mut s = summary(&mut samples);
        s["settings"] = Value::String(settings);
        out.insert(name.into(), s);
    }
    db.close().await?;
    Ok(json!({ "workload": "wakeup", "commit_to_handler_ms": out }))
}

/// Messages per second drained by one subscriber with a no-op handler.
async fn drain() -> anyhow::Result<Value> {
    const N: usize = 20_000;
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let variants = [
        ("default_settings", SubscriberOptions::new(["drain"])),
        (
            "tuned_batched_acks",
            SubscriberOptions::new(["drain"])
                .max_workers(64)
                .prefetch(448),
        ),
        (
            "tuned_per_row_acks",
            SubscriberOptions::new(["drain"])
                .max_workers(64)
                .prefetch(448)
                .batch_acks(false),
        ),
    ];
    let mut out = serde_json::Map::new();
    for (name, options) in variants {
        let mut rates = Vec::new();
        let mut stats = None;
        for _ in 0..3 {
            publish_batches(&backend, "drain", N).await?;
            let handler = |_d: Delivery| std::future::ready(Ok::<(), HandlerError>(()));
            let start = Instant::now();
            let sub = Subscriber::new(backend.clone(), options.clone(), handler)?.spawn();
            while sub.stats().acked < N as u64 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let elapsed = start.elapsed();
            stats = Some(sub.shutdown().await?.stats);
            rates.push(N as f64 / elapsed.as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);
        let stats = stats.context("ran")?;
        out.insert(
            name.into(),
            json!({
                "msgs_per_s": { "median": rates[1].round(), "min": rates[0].round(), "max": rates[2].round() },
                "ack_statements_last_run": stats.ack_statements,
                "fetches_last_run": stats.fetches,
                "settings": format!("{options:?}"),
            }),
        );
    }
    db.close().await?;
    Ok(json!({ "workload": "drain", "messages": N, "repetitions": 3, "results": out }))
}

/// Cooperative members splitting one queue.
async fn coop() -> anyhow::Result<Value> {
    const N: usize = 20_000;
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let mut out = Vec::new();
    for work in [Duration::ZERO, Duration::from_millis(1)] {
        for members in [1usize, 2, 4, 8] {
            publish_batches(&backend, "coop", N).await?;
            let published: Vec<i64> = backend
                .messages(Some("coop"))
                .await?
                .iter()
                .map(|m| m.id)
                .collect();
            let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::with_capacity(N)));
            let start = Instant::now();
            let mut subs = Vec::new();
            for m in 0..members {
                let seen = std::sync::Arc::clone(&seen);
                let handler = move |d: Delivery| {
                    let seen = std::sync::Arc::clone(&seen);
                    async move {
                        if !work.is_zero() {
                            // 1 ms of blocking work (tokio's timer would round a 1 ms sleep
                            // up to ~2 ms).
                            let _ =
                                tokio::task::spawn_blocking(move || std::thread::sleep(work)).await;
                        }
                        seen.lock().push(d.id);
                        Ok::<(), HandlerError>(())
                    }
                };
                let options = SubscriberOptions::new(["coop"])
                    .subconsumer(postbox::Member::new("bench", format!("m{m}"))?)
                    .max_workers(if work.is_zero() { 16 } else { 1 })
                    .ack_delay(Duration::from_millis(2))
                    .prefetch(if work.is_zero() { 112 } else { 4 })
                    .min_fetch_interval(Duration::from_millis(10))
                    .max_fetch_interval(Duration::from_millis(100));
                subs.push(Subscriber::new(backend.clone(), options, handler)?.spawn());
            }
            while subs.iter().map(|s| s.stats().acked).sum::<u64>() < N as u64 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let elapsed = start.elapsed();
            for sub in subs {
                sub.shutdown().await?;
            }
            let handled = seen.lock().clone();
            let distinct: std::collections::HashSet<i64> = handled.iter().copied().collect();
            let lost = published.iter().filter(|id| !distinct.contains(id)).count();
            out.push(json!({
                "handler_ms": work.as_secs_f64() * 1e3,
                "members": members,
                "events_per_s": (N as f64 / elapsed.as_secs_f64()).round(),
                "duplicates": handled.len() - distinct.len(),
                "lost": lost,
            }));
            eprintln!("bench: coop {members} member(s), {work:?} handler done");
        }
    }
    db.close().await?;
    Ok(json!({
        "workload": "coop",
        "events": N,
        "settings": "one Subscriber per member (subconsumer mode), ack_delay 2 ms; no-op: 16 workers, prefetch 112; 1 ms (blocking sleep): 1 worker, prefetch 4",
        "results": out,
    }))
}

/// Journal streams: the batched writer against one `record_event` per event.
async fn journal() -> anyhow::Result<Value> {
    const STREAMS: usize = 20;
    const EVENTS: i64 = 100;
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let payload = |seq: i64| {
        let mut map = serde_json::Map::new();
        map.insert("token".into(), format!("t{seq} ").into());
        map
    };
    let mut out = serde_json::Map::new();
    for round in 0..3 {
        let start = Instant::now();
        let mut commits = 0;
        for s in 0..STREAMS {
            let writer = postbox::BatchedJournalWriter::new(
                backend.clone(),
                format!("batched-{round}-{s}"),
                postbox::WriterOptions::default(),
            );
            for seq in 1..=EVENTS {
                let kind = if seq == EVENTS { "done" } else { "delta" };
                writer.record(seq, kind, payload(seq)).await?;
            }
            commits += writer.close().await?.commits;
        }
        let batched = (STREAMS as f64 * EVENTS as f64) / start.elapsed().as_secs_f64();

        let start = Instant::now();
        for s in 0..STREAMS {
            for seq in 1..=EVENTS {
                let kind = if seq == EVENTS { "done" } else { "delta" };
                postbox::record_event(
                    &backend,
                    &format!("per-row-{round}-{s}"),
                    seq,
                    kind,
                    payload(seq),
                )
                .await?;
            }
        }
        let per_row = (STREAMS as f64 * EVENTS as f64) / start.elapsed().as_secs_f64();
        out.insert(
            format!("round_{round}"),
            json!({
                "batched_events_per_s": batched.round(),
                "batched_commits_per_stream": commits as f64 / STREAMS as f64,
                "per_row_events_per_s": per_row.round(),
                "per_row_commits_per_stream": EVENTS,
                "speedup": (batched / per_row * 10.0).round() / 10.0,
            }),
        );
    }
    db.close().await?;
    Ok(json!({
        "workload": "journal",
        "streams": STREAMS,
        "events_per_stream": EVENTS,
        "settings": "WriterOptions::default(): 16 events or 100 ms; events recorded back to back",
        "rounds": out,
    }))
}

/// FakeBroker round trips: publish a batch, fetch it, ack it.
async fn fake() -> anyhow::Result<Value> {
    const N: usize = 1_000_000;
    const BATCH: usize = 1_000;
    let mut rates = Vec::new();
    for _ in 0..3 {
        let broker = postbox::fake::FakeBroker::new();
        let params = postbox::FetchParams::new(["bench"], BATCH as u32);
        let start = Instant::now();
        for _ in 0..N / BATCH {
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
        rates.push(N as f64 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    Ok(json!({
        "workload": "fake",
        "messages": N,
        "batch": BATCH,
        "msgs_per_s": { "median": rates[1].round(), "min": rates[0].round(), "max": rates[2].round() },
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mut results = Vec::new();
    for workload in &args.workloads {
        eprintln!("bench: running {workload}...");
        results.push(match workload.as_str() {
            "fixture" => fixture(args.rounds).await?,
            "wakeup" => wakeup(args.rounds).await?,
            "drain" => drain().await?,
            "fake" => fake().await?,
            "coop" => coop().await?,
            "journal" => journal().await?,
            other => {
                anyhow::bail!(
                    "unknown workload {other}; known: wakeup, drain, coop, journal, fixture, fake"
                )
            }
        });
    }
    let doc = json!({
        "machine": {
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "os": std::env::consts::OS,
        },
        "results": results,
    });
    let text = serde_json::to_string_pretty(&doc)?;
    match &args.json {
        Some(path) => std::fs::write(path, &text)?,
        None => println!("{text}"),
    }
    Ok(())
}
