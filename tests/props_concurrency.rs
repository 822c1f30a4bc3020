//! The concurrency property: real subscribers (each a cooperative member on its own runtime,
//! with its own pool, like a separate process) consume one queue on Postgres while handlers
//! take random time and random members crash. A crash drops the member's runtime at once:
//! handlers in flight vanish, leases stay, heartbeats stop, connections close.
//!
//! Asserted: nothing lost (every message handled to completion and acked, none dead), and a
//! message delivered twice only after its earlier holder crashed (a fenced takeover: the
//! holder's lease was taken under a fresh token after its dead interval), never to two live
//! members at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use postbox::prelude::*;
use postbox::sqlx::postgres::PgPoolOptions;
use postbox::{Delivery, HandlerError, Member, Message, PgBackend, Subscriber, SubscriberOptions};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Plan {
    members: usize,
    messages: usize,
    /// Handler delay per member, in ms (each handler picks below it).
    max_delay_ms: Vec<u64>,
    /// Member `i` crashes after starting this many handlers (member 0 never crashes).
    crash_after: Vec<Option<usize>>,
    /// Seeds the handlers' delays.
    seed: u64,
}

fn plans() -> impl Strategy<Value = Plan> {
    (2usize..=4, 150usize..=400).prop_flat_map(|(members, messages)| {
        (
            prop::collection::vec(0u64..=4, members),
            prop::collection::vec(prop::option::weighted(0.5, 1usize..=60), members),
            any::<u64>(),
        )
            .prop_map(move |(max_delay_ms, mut crash_after, seed)| {
                crash_after[0] = None;
                Plan {
                    members,
                    messages,
                    max_delay_ms,
                    crash_after,
                    seed,
                }
            })
    })
}

#[derive(Debug, Clone, Copy)]
struct Handed {
    id: i64,
    member: usize,
    token: uuid::Uuid,
    at: Instant,
}

#[derive(Default)]
struct Log {
    started: Vec<Handed>,
    finished: Vec<Handed>,
    crashed: HashMap<usize, Instant>,
}

const DEAD_INTERVAL: Duration = Duration::from_millis(600);

/// Runs member `index` on its own runtime until it is told to crash or to stop.
fn spawn_member(
    url: String,
    index: usize,
    plan: &Plan,
    log: Arc<Mutex<Log>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::thread::JoinHandle<Result<(), String>> {
    let max_delay = plan.max_delay_ms[index];
    let crash_after = plan.crash_after[index];
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(
        plan.seed ^ index as u64,
    )));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let (crash_tx, mut crash_rx) = tokio::sync::watch::channel(false);
        let result = rt.block_on(async {
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .connect(&url)
                .await
                .map_err(|e| e.to_string())?;
            let backend = PgBackend::new(pool);
            let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let handler_log = Arc::clone(&log);
            let handler = move |d: Delivery| {
                let log = Arc::clone(&handler_log);
                let delay = rng.lock().u64(0..=max_delay);
                let n = started.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                if crash_after.is_some_and(|c| n >= c) {
                    let _ = crash_tx.send(true);
                }
                async move {
                    let handed = Handed {
                        id: d.id,
                        member: index,
                        token: d.token,
                        at: Instant::now(),
                    };
                    log.lock().started.push(handed);
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    log.lock().finished.push(Handed {
                        at: Instant::now(),
                        ..handed
                    });
                    Ok::<(), HandlerError>(())
                }
            };
            let options = SubscriberOptions::new(["work"])
                .subconsumer(Member::new("props", format!("m{index}")).map_err(|e| e.to_string())?)
                .dead_interval(DEAD_INTERVAL)
                .max_workers(4)
                .prefetch(8)
                .min_fetch_interval(Duration::from_millis(20))
                .max_fetch_interval(Duration::from_millis(100));
            let sub = Subscriber::new(backend, options, handler)
                .map_err(|e| e.to_string())?
                .spawn();
            let mut stop = stop;
            tokio::select! {
                _ = crash_rx.wait_for(|c| *c) => Ok(None),
                _ = stop.wait_for(|s| *s) => {
                    postbox::testkit::within("shutdown", sub.shutdown())
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(Some(()))
                }
            }
        });
        match result {
            // Crash: drop everything in flight, as a killed process would.
            Ok(None) => {
                rt.shutdown_background();
                log.lock().crashed.insert(index, Instant::now());
                Ok(())
            }
            Ok(Some(())) => Ok(()),
            Err(e) => Err(e),
        }
    })
}

async fn run(plan: Plan) -> Result<(), String> {
    let db = postbox::testkit::postgres()
        .await
        .map_err(|e| e.to_string())?;
    let backend = db.backend();
    let mut tx = backend.begin().await.map_err(|e| e.to_string())?;
    let ids = backend
        .publish_batch(
            &mut tx,
            (0..plan.messages)
                .map(|i| Message::new("work", i.to_string()))
                .collect(),
        )
        .await
        .map_err(|e| e.to_string())?;
    backend.commit(tx).await.map_err(|e| e.to_string())?;

    let log = Arc::new(Mutex::new(Log::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let threads: Vec<_> = (0..plan.members)
        .map(|i| {
            spawn_member(
                db.url().to_owned(),
                i,
                &plan,
                Arc::clone(&log),
                stop_rx.clone(),
            )
        })
        .collect();

    // Wait for the observable end: the outbox table empty (every message acked or dead).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = backend
            .messages(Some("work"))
            .await
            .map_err(|e| e.to_string())?;
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let _ = stop_tx.send(true);
            return Err(format!("{} messages left after 60 s: {left:?}", left.len()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    for t in threads {
        t.join()
            .map_err(|_| "member thread panicked".to_owned())??;
    }
    let dead = backend
        .dead_letters(None)
        .await
        .map_err(|e| e.to_string())?;
    db.close().await.map_err(|e| e.to_string())?;

    let log = log.lock();
    if !dead.is_empty() {
        return Err(format!("{} messages dead-lettered", dead.len()));
    }
    let finished: std::collections::HashSet<i64> = log.finished.iter().map(|h| h.id).collect();
    let lost: Vec<_> = ids.iter().filter(|id| !finished.contains(id)).collect();
    if !lost.is_empty() {
        return Err(format!("lost (never handled to completion): {lost:?}"));
    }
    // Every earlier delivery of a message handed out again belongs to a member that had
    // crashed before the later delivery started, under a different token.
    let mut by_id: HashMap<i64, Vec<Handed>> = HashMap::new();
    for h in &log.started {
        by_id.entry(h.id).or_default().push(*h);
    }
    let mut fenced = 0;
    for (id, mut handed) in by_id {
        handed.sort_by_key(|h| h.at);
        for pair in handed.windows(2) {
            let (earlier, later) = (pair[0], pair[1]);
            let crashed = log.crashed.get(&earlier.member);
            if crashed.is_none_or(|at| *at > later.at) || earlier.token == later.token {
                return Err(format!(
                    "message {id} delivered to m{} and again to m{} while m{} was alive",
                    earlier.member, later.member, earlier.member
                ));
            }
            fenced += 1;
        }
    }
    eprintln!(
        "concurrency: {} members, {} messages, crashed {:?}, fenced redeliveries {fenced}",
        plan.members,
        plan.messages,
        log.crashed.keys().collect::<Vec<_>>()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("POSTBOX_PROP_CASES").ok().and_then(|v| v.parse().ok()).map_or(6, |n: u32| n.min(16)),
        max_shrink_iters: 16,
        ..ProptestConfig::default()
    })]
    #[test]
    fn members_with_crashes_lose_nothing_and_never_share_a_live_lease(plan in plans()) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run(plan)).map_err(TestCaseError::fail)?;
    }
}
