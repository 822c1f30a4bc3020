//! Reliability under faults, against real Postgres (testkit fixtures; scenario 4 on a private
//! local cluster it restarts). Each scenario pushes at least 2,000 messages (or journal
//! events) through at least two subscribers, members or writers and asserts exact counts:
//! nothing lost, duplicates only where a fence proves them (a stale outcome refused, counted
//! in `Stats::lease_lost`), the runtime still healthy at the end.
//!
//! Each scenario prints one row of the table in the reliability issue's closing note
//! (`cargo test --test faults -- --nocapture`).

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use postbox::prelude::*;
use postbox::runtime::{Stats, SubscriberEvent, SubscriberHandle};
use postbox::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use postbox::sqlx::{self, PgPool};
use postbox::testkit::LocalServer;
use postbox::testkit::{TimeControl, within};
use postbox::{
    Delivery, Error, FetchParams, HandlerError, Message, PgBackend, RetryPolicy, Subscriber,
    SubscriberOptions, TableName,
};

const N: usize = 2_000;
const DEADLINE: Duration = Duration::from_secs(90);

/// What the handlers saw.
#[derive(Default)]
struct Tally {
    started: Mutex<Vec<i64>>,
    finished: Mutex<Vec<i64>>,
    in_flight: Mutex<HashSet<i64>>,
    /// A message started while another handler still ran it (two live holders).
    overlaps: AtomicU64,
}

impl Tally {
    fn start(&self, id: i64) {
        self.started.lock().push(id);
        if !self.in_flight.lock().insert(id) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn finish(&self, id: i64) {
        self.in_flight.lock().remove(&id);
        self.finished.lock().push(id);
    }

    fn finished_count(&self) -> usize {
        self.finished.lock().len()
    }

    /// Published messages no handler finished.
    fn lost(&self, published: &[i64]) -> usize {
        let finished: HashSet<i64> = self.finished.lock().iter().copied().collect();
        published.iter().filter(|id| !finished.contains(id)).count()
    }

    /// Waits until handlers have finished `n` messages, failing with `what` and the
    /// subscribers' state after `within`.
    async fn wait_finished(
        &self,
        n: usize,
        within: Duration,
        subs: &[SubscriberHandle],
        what: &str,
    ) {
        let deadline = Instant::now() + within;
        while self.finished_count() < n {
            assert!(
                Instant::now() < deadline,
                "{what}: {} of {n} handled after {within:?}; subscribers: {:?}",
                self.finished_count(),
                subs.iter()
                    .map(|s| (s.is_running(), s.last_error(), s.stats()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A handler that records, optionally waits `work`, and succeeds.
fn recording(
    tally: &Arc<Tally>,
    work: Duration,
) -> impl Fn(Delivery) -> std::pin::Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>
+ Send
+ Sync
+ 'static {
    let tally = Arc::clone(tally);
    move |d: Delivery| {
        let tally = Arc::clone(&tally);
        Box::pin(async move {
            tally.start(d.id);
            if !work.is_zero() {
                tokio::time::sleep(work).await;
            }
            tally.finish(d.id);
            Ok(())
        })
    }
}

async fn publish(backend: &PgBackend, queue: &str, n: usize) -> Vec<i64> {
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut tx = backend.begin().await.expect("begin");
        ids.extend(
            backend
                .publish_batch(
                    &mut tx,
                    chunk
                        .iter()
                        .map(|i| Message::new(queue, i.to_string()))
                        .collect(),
                )
                .await
                .expect("publish"),
        );
        backend.commit(tx).await.expect("commit");
    }
    ids
}

/// A pool that the kill helpers never kill (its application name is excluded).
async fn killer_pool(url: &str) -> PgPool {
    let options = PgConnectOptions::from_str(url)
        .expect("url")
        .application_name("faults.killer");
    PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .expect("killer pool")
}

/// Terminates this database's client connections: those with application name `app`, or
/// every one but the killer's own. Returns how many were terminated.
async fn kill(killer: &PgPool, app: Option<&str>) -> usize {
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
           AND backend_type = 'client backend' AND application_name <> 'faults.killer' \
           AND ($1::text IS NULL OR application_name = $1)",
    )
    .bind(app)
    .fetch_all(killer)
    .await
    .expect("pg_terminate_backend");
    killed.into_iter().filter(|k| *k).count()
}

/// Waits until the outbox table holds no message of `queue` (everything acked or dead).
async fn wait_drained(backend: &PgBackend, queue: &str, subs: &[SubscriberHandle]) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match backend.messages(Some(queue)).await {
            Ok(left) if left.is_empty() => return,
            Ok(left) => assert!(
                Instant::now() < deadline,
                "{} messages left after {DEADLINE:?}; subscribers: {:?}",
                left.len(),
                subs.iter()
                    .map(|s| (s.is_running(), s.last_error(), s.stats()))
                    .collect::<Vec<_>>()
            ),
            // The inspection connection itself may have been killed: try again.
            Err(_) => assert!(Instant::now() < deadline, "inspection keeps failing"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts of one scenario, checked and printed as a table row.
struct Verdict {
    lost: usize,
    duplicates: usize,
    fenced: u64,
}

/// Checks every subscriber is still running, then shuts them down; returns their final stats.
async fn stop_all(scenario: &str, subs: Vec<SubscriberHandle>) -> Vec<Stats> {
    for sub in &subs {
        assert!(
            sub.is_running(),
            "{scenario}: a subscriber stopped: {:?}",
            sub.last_error()
        );
    }
    let mut stats = Vec::new();
    for sub in subs {
        stats.push(
            within("shutdown", sub.shutdown())
                .await
                .expect("shutdown")
                .stats,
        );
    }
    stats
}

/// Nothing lost, every duplicate handler run matched by a refused (fenced) outcome, no two
/// live holders at once, every subscriber still running; then shuts them down.
async fn verify(
    scenario: &str,
    faults: &str,
    published: &[i64],
    tally: &Tally,
    subs: Vec<SubscriberHandle>,
) -> Verdict {
    let stats = stop_all(scenario, subs).await;
    let started = tally.started.lock().len();
    let distinct: HashSet<i64> = tally.started.lock().iter().copied().collect();
    let verdict = Verdict {
        lost: tally.lost(published),
        duplicates: started - distinct.len(),
        fenced: stats.iter().map(|s: &Stats| s.lease_lost).sum(),
    };
    eprintln!(
        "| {scenario} | {} | {faults} | {} | {} (fenced: {}) |",
        published.len(),
        verdict.lost,
        verdict.duplicates,
        verdict.fenced
    );
    assert_eq!(verdict.lost, 0, "{scenario}: messages lost");
    assert!(
        verdict.duplicates as u64 <= verdict.fenced,
        "{scenario}: {} duplicate handler runs but only {} fenced outcomes",
        verdict.duplicates,
        verdict.fenced
    );
    assert_eq!(
        tally.overlaps.load(Ordering::SeqCst),
        0,
        "{scenario}: a message ran in two handlers at once"
    );
    verdict
}

fn options(queue: &str) -> SubscriberOptions {
    SubscriberOptions::new([queue])
        .max_workers(4)
        .prefetch(8)
        .error_backoff(Duration::from_millis(20), Duration::from_millis(500))
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
}

/// `n` subscribers on `backend`, each with `options` and the handler `handler()` makes.
fn spawn_subscribers<H: postbox::Handler>(
    n: usize,
    backend: &PgBackend,
    options: &SubscriberOptions,
    handler: impl Fn() -> H,
) -> Vec<SubscriberHandle> {
    (0..n)
        .map(|_| {
            Subscriber::new(backend.clone(), options.clone(), handler())
                .expect("subscriber")
                .spawn()
        })
        .collect()
}

/// 1. The fetch connection killed again and again during a drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_connection_killed_repeatedly() {
    fetch_connections_killed("kill-fetch", 2, None, "1 fetch connection killed").await;
}

/// 1b. The same with three subscribers sharing one fetch permit
/// (`max_concurrent_fetches(1)`): a fetch killed while holding the permit must give it back,
/// or the other two would wait forever and the drain would stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_connection_killed_under_a_fetch_cap() {
    let cap = std::num::NonZeroUsize::MIN;
    fetch_connections_killed("kill-capped", 3, Some(cap), "1b killed, fetch cap 1").await;
}

async fn fetch_connections_killed(
    queue: &str,
    subscribers: usize,
    cap: Option<std::num::NonZeroUsize>,
    scenario: &str,
) {
    let db = postbox::testkit::postgres().await.expect("db");
    let mut backend = db.backend();
    if let Some(cap) = cap {
        backend = backend.max_concurrent_fetches(cap);
    }
    let killer = killer_pool(db.url()).await;
    let ids = publish(&backend, queue, N).await;
    let tally = Arc::new(Tally::default());
    let opts = options(queue).lease_ttl(Duration::from_secs(2));
    let subs = spawn_subscribers(subscribers, &backend, &opts, || {
        recording(&tally, Duration::from_micros(200))
    });
    let mut kills = 0;
    let deadline = Instant::now() + DEADLINE;
    while tally.finished_count() < N && kills < 20 {
        assert!(
            Instant::now() < deadline,
            "{scenario}: stalled after {kills} kills with {} of {N} handled; {} fetches waiting for a permit",
            tally.finished_count(),
            backend.fetches_waiting()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
        kills += kill(&killer, Some("postbox.fetch")).await;
    }
    assert!(
        kills >= 5,
        "only {kills} fetch connections were killed: the drain was too quick"
    );
    wait_drained(&backend, queue, &subs).await;
    verify(scenario, &format!("{kills} kills"), &ids, &tally, subs).await;
    assert!(backend.dead_letters(None).await.expect("dead").is_empty());
    assert_eq!(
        backend.fetches_waiting(),
        0,
        "no fetch left waiting for a permit"
    );
    db.close().await.expect("close");
}

/// 2. The LISTEN connection killed; wake-ups resume; what was published meanwhile arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_connection_killed() {
    let db = postbox::testkit::postgres().await.expect("db");
    let backend = db.backend();
    let killer = killer_pool(db.url()).await;
    let tally = Arc::new(Tally::default());
    // Polling every 60 s: deliveries within the deadline come from wake-ups (or the fetch
    // the runtime makes when its listener reconnects), not from polling.
    let opts = SubscriberOptions::new(["kill-listen"])
        .min_fetch_interval(Duration::from_secs(60))
        .max_fetch_interval(Duration::from_secs(60))
        .wake_up_retry_interval(Duration::from_millis(100))
        .wake_up_check_interval(Duration::from_millis(200));
    let subs = spawn_subscribers(2, &backend, &opts, || recording(&tally, Duration::ZERO));
    let mut events: Vec<_> = subs.iter().map(|s| s.events()).collect();
    for ev in &mut events {
        postbox::testkit::wait_for_event(ev, "listening", |e| {
            matches!(e, SubscriberEvent::ListenerConnected)
        })
        .await;
    }
    let mut ids = Vec::new();
    let mut kills = 0;
    for round in 0..20 {
        if round % 4 == 1 {
            kills += kill(&killer, Some("postbox.listen")).await;
        }
        // Published right after the kill: must still be delivered.
        ids.extend(publish(&backend, "kill-listen", N / 20).await);
        let what = format!("round {round}: wake-ups did not resume");
        tally
            .wait_finished(ids.len(), Duration::from_secs(30), &subs, &what)
            .await;
    }
    assert!(kills >= 5, "only {kills} listener connections were killed");
    let restored = events
        .iter_mut()
        .map(|ev| {
            std::iter::from_fn(|| ev.try_recv().ok())
                .filter(|e| {
                    matches!(
                        e,
                        SubscriberEvent::ListenerRestored | SubscriberEvent::ListenerConnected
                    )
                })
                .count()
        })
        .sum::<usize>();
    assert!(
        restored >= kills,
        "{restored} listener reconnections for {kills} kills"
    );
    wait_drained(&backend, "kill-listen", &subs).await;
    verify(
        "2 LISTEN connection killed",
        &format!("{kills} kills"),
        &ids,
        &tally,
        subs,
    )
    .await;
    db.close().await.expect("close");
}

/// 3a. Outcome writes fail: the handler's own connections are killed between its end and the
/// ack. The runtime retries the write; a message redelivered meanwhile is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcome_write_fails_in_the_runtime() {
    let db = postbox::testkit::postgres().await.expect("db");
    let backend = db.backend();
    let killer = killer_pool(db.url()).await;
    let ids = publish(&backend, "kill-ack", N).await;
    let tally = Arc::new(Tally::default());
    let kills = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (tally, killer, kills) = (Arc::clone(&tally), killer.clone(), Arc::clone(&kills));
        move |d: Delivery| {
            let (tally, killer, kills) = (Arc::clone(&tally), killer.clone(), Arc::clone(&kills));
            async move {
                tally.start(d.id);
                if d.payload.ends_with(b"00") && d.deliveries == 1 {
                    // Between this handler and its ack: every connection of the subscribers
                    // (fetch, listen, the pool that writes outcomes) goes away.
                    kills.fetch_add(kill(&killer, None).await, Ordering::SeqCst);
                }
                tally.finish(d.id);
                Ok::<(), HandlerError>(())
            }
        }
    };
    let opts = options("kill-ack").lease_ttl(Duration::from_secs(2));
    let subs = spawn_subscribers(2, &backend, &opts, || handler.clone());
    wait_drained(&backend, "kill-ack", &subs).await;
    let kills = kills.load(Ordering::SeqCst);
    assert!(kills >= 20, "only {kills} connections killed");
    verify(
        "3a outcome write fails (runtime)",
        &format!("{kills} connections killed before acks"),
        &ids,
        &tally,
        subs,
    )
    .await;
    assert!(backend.dead_letters(None).await.expect("dead").is_empty());
    db.close().await.expect("close");
}

/// 3b. The same at the API level, deterministic: a consumer's `ack_batch` fails because its
/// database is unreachable and the consumer gives up (crashes); after the lease expires the rows
/// are delivered again, handled a second time, and acked exactly once.
#[tokio::test]
async fn outcome_write_fails_then_redelivered_after_expiry() {
    let db = postbox::testkit::postgres().await.expect("db");
    let backend = db.backend();
    let ids = publish(&backend, "lost-ack", N).await;
    backend.advance(Duration::ZERO).await.expect("pin clock");
    let params = FetchParams::new(["lost-ack"], 500).lease_ttl(Duration::from_secs(30));
    let mut handled = Vec::new();
    let mut failed_acks = 0;
    for batch in 0.. {
        let got = backend.fetch(&params).await.expect("fetch");
        if got.is_empty() {
            break;
        }
        handled.extend(got.iter().map(|d| d.id));
        let leases: Vec<_> = got.iter().map(Delivery::lease).collect();
        if batch == 1 {
            // This consumer's ack write fails and it gives up. Its pool points at a port
            // nothing listens on: the write fails for certain. (A pool whose one connection
            // was killed is not certain to fail: sqlx may notice the closed connection and
            // open a new one before the ack, as it did once in CI.)
            let one = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy("postgres://postgres@127.0.0.1:1/postgres")
                .expect("lazy pool");
            let doomed = PgBackend::new(one);
            doomed.set_now(Some(backend.database_now().await.expect("now")));
            assert!(
                doomed.ack_batch(&leases).await.is_err(),
                "the ack must fail"
            );
            failed_acks += leases.len();
            continue;
        }
        assert_eq!(
            backend.ack_batch(&leases).await.expect("ack").len(),
            leases.len()
        );
        if batch == 2 {
            // Past the lost batch's lease.
            backend
                .advance(Duration::from_secs(31))
                .await
                .expect("advance");
        }
    }
    let distinct: HashSet<i64> = handled.iter().copied().collect();
    assert_eq!(distinct.len(), N, "every message handled");
    assert_eq!(
        handled.len(),
        N + failed_acks,
        "the failed batch handled twice"
    );
    assert!(
        backend.messages(None).await.expect("messages").is_empty(),
        "acked once, all"
    );
    assert!(backend.dead_letters(None).await.expect("dead").is_empty());
    eprintln!(
        "| 3b outcome write fails (API, crash after) | {} | 1 ack_batch failed ({failed_acks} rows) | 0 | {failed_acks} (redelivered after expiry, acked once) |",
        ids.len()
    );
    db.close().await.expect("close");
}

/// 4. The whole server restarted (fast shutdown, start) mid-drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarted_mid_drain() {
    let server = tokio::task::spawn_blocking(LocalServer::start)
        .await
        .expect("join")
        .expect("a private local cluster (needs the Postgres binaries)");
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&server.url("postgres"))
        .await
        .expect("admin");
    sqlx::query("CREATE DATABASE faults")
        .execute(&admin)
        .await
        .expect("create");
    admin.close().await;
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&server.url("faults"))
        .await
        .expect("pool");
    let backend = PgBackend::new(pool);
    backend.migrate().await.expect("migrate");
    let ids = publish(&backend, "restart", N).await;
    let tally = Arc::new(Tally::default());
    let opts = options("restart");
    let subs = spawn_subscribers(2, &backend, &opts, || {
        recording(&tally, Duration::from_millis(1))
    });
    tally
        .wait_finished(N / 4, DEADLINE, &subs, "no progress before the restart")
        .await;
    let before = tally.finished_count();
    let restarted = Instant::now();
    tokio::task::spawn_blocking({
        let server = server.clone();
        move || server.restart()
    })
    .await
    .expect("join")
    .expect("restart");
    let took = restarted.elapsed();
    assert!(before < N, "the drain ended before the restart");
    wait_drained(&backend, "restart", &subs).await;
    verify(
        "4 server restarted mid-drain",
        &format!(
            "1 restart after {before} handled ({} ms down)",
            took.as_millis()
        ),
        &ids,
        &tally,
        subs,
    )
    .await;
    assert!(backend.dead_letters(None).await.expect("dead").is_empty());
    backend.pool().close().await;
    drop(server);
}

/// 5. Handlers panic on some messages: retried per policy, dead-lettered at exhaustion; the
/// others are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_panics() {
    // The intentional panics below would print a message and backtrace each: keep quiet
    // about those, report any other.
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info.payload_as_str().unwrap_or_default();
        if !message.starts_with("always fails") && !message.starts_with("fails once") {
            default(info);
        }
    }));
    let db = postbox::testkit::postgres().await.expect("db");
    let backend = db.backend();
    let ids = publish(&backend, "panics", N).await;
    let tally = Arc::new(Tally::default());
    let handler = {
        let tally = Arc::clone(&tally);
        move |d: Delivery| {
            let tally = Arc::clone(&tally);
            async move {
                tally.start(d.id);
                let n: usize = std::str::from_utf8(&d.payload)
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0);
                tally.finish(d.id);
                if n.is_multiple_of(100) {
                    panic!("always fails: {n}");
                }
                if n % 100 == 1 && d.attempts == 0 {
                    panic!("fails once: {n}");
                }
                Ok::<(), HandlerError>(())
            }
        }
    };
    let opts =
        options("panics").retry_policy(RetryPolicy::constant(Duration::ZERO).max_attempts(3));
    let subs = spawn_subscribers(2, &backend, &opts, || handler.clone());
    wait_drained(&backend, "panics", &subs).await;
    let panics: u64 = subs.iter().map(|s| s.stats().panics).sum();
    let dead = backend.dead_letters(Some("panics")).await.expect("dead");
    let always = N / 100;
    assert_eq!(
        dead.len(),
        always,
        "the always-failing messages, dead-lettered"
    );
    assert!(
        dead.iter().all(|d| d.attempts == 3),
        "after 3 attempts: {dead:?}"
    );
    assert_eq!(
        panics,
        (always * 3 + always) as u64,
        "3 panics each + 1 for the fail-once ones"
    );
    // Every message was handled; the dead ones are the only ones not acked.
    let started = tally.started.lock().len();
    assert_eq!(
        started,
        N + always * 2 + always,
        "runs: 1 each, +2 for always, +1 for once"
    );
    stop_all("5 handler panics", subs).await;
    assert_eq!(tally.lost(&ids), 0);
    eprintln!(
        "| 5 handler panics | {N} | {panics} panics ({always} always, {always} once) | 0 | 0 ({always} dead-lettered after 3 attempts) |"
    );
    db.close().await.expect("close");
}

/// 6. Shutdown while working with prefetched rows: they are released, a second subscriber
/// picks them up, nothing is deleted unprocessed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_prefetched_rows() {
    let db = postbox::testkit::postgres().await.expect("db");
    let backend = db.backend();
    let ids = publish(&backend, "shutdown", N).await;
    let tally = Arc::new(Tally::default());
    let first = Subscriber::new(
        backend.clone(),
        SubscriberOptions::new(["shutdown"])
            .max_workers(4)
            .prefetch(200),
        recording(&tally, Duration::from_millis(2)),
    )
    .expect("subscriber")
    .spawn();
    tally
        .wait_finished(200, DEADLINE, std::slice::from_ref(&first), "no progress")
        .await;
    let report = within("shutdown", first.shutdown())
        .await
        .expect("shutdown");
    assert!(report.released > 0, "prefetched rows released: {report:?}");
    assert_eq!(report.abandoned, 0);
    let handled_by_first = tally.finished_count();
    let stored = backend.messages(Some("shutdown")).await.expect("messages");
    assert_eq!(
        stored.len(),
        N - handled_by_first,
        "only handled rows left the table"
    );
    let second = Subscriber::new(
        backend.clone(),
        options("shutdown"),
        recording(&tally, Duration::ZERO),
    )
    .expect("subscriber")
    .spawn();
    wait_drained(&backend, "shutdown", std::slice::from_ref(&second)).await;
    verify(
        "6 shutdown with prefetched rows",
        &format!(
            "shutdown after {handled_by_first} handled, {} released",
            report.released
        ),
        &ids,
        &tally,
        vec![second],
    )
    .await;
    db.close().await.expect("close");
}

/// 7. A slow consumer past its lease TTL without renewal: another takes the rows over; the
/// slow one's outcomes are refused and change nothing.
#[tokio::test]
async fn slow_consumer_past_its_lease_is_fenced() {
    let db = postbox::testkit::postgres().await.expect("db");
    let backend = db.backend();
    let ids = publish(&backend, "slow", N).await;
    backend.advance(Duration::ZERO).await.expect("pin clock");
    let params = FetchParams::new(["slow"], N as u32).lease_ttl(Duration::from_secs(5));
    let slow = backend.fetch(&params).await.expect("slow fetch");
    assert_eq!(slow.len(), N);
    backend
        .advance(Duration::from_secs(6))
        .await
        .expect("advance");
    let fast = backend.fetch(&params).await.expect("takeover fetch");
    assert_eq!(fast.len(), N, "every expired lease taken over");
    assert!(fast.iter().all(|d| d.deliveries == 2));
    let slow_leases: Vec<_> = slow.iter().map(Delivery::lease).collect();
    assert!(
        backend
            .ack_batch(&slow_leases)
            .await
            .expect("ack")
            .is_empty(),
        "stale acks refused"
    );
    assert!(
        !backend
            .retry(slow_leases[0], postbox::RetryParams::new(Duration::ZERO))
            .await
            .expect("retry")
    );
    assert!(
        !backend
            .dead_letter(slow_leases[1], "late")
            .await
            .expect("dead")
    );
    assert!(backend.dead_letters(None).await.expect("dead").is_empty());
    let fast_leases: Vec<_> = fast.iter().map(Delivery::lease).collect();
    assert_eq!(backend.ack_batch(&fast_leases).await.expect("ack").len(), N);
    assert!(backend.messages(None).await.expect("messages").is_empty());
    eprintln!(
        "| 7 slow consumer past lease_ttl | {} | lease expired, {N} rows taken over | 0 | {N} (all {N} stale acks + retry + dead-letter refused) |",
        ids.len()
    );
    db.close().await.expect("close");
}

/// 8. Journal writers while the database refuses connections for a while: failed flushes are
/// counted as dropped, the streams continue, and readers see exactly what was committed, in
/// order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_writer_with_the_database_unreachable() {
    let db = postbox::testkit::postgres().await.expect("db");
    let killer = killer_pool(
        &db.url()
            .replace(&format!("/{}", db.database()), "/postgres"),
    )
    .await;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(500))
        .connect(db.url())
        .await
        .expect("pool");
    let backend = PgBackend::new(pool);
    let options = postbox::journal::WriterOptions::default()
        .max_batch(16)
        .max_delay(Duration::from_millis(20));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            postbox::journal::BatchedJournalWriter::new(
                backend.clone(),
                format!("stream-{w}"),
                options,
            )
        })
        .collect();
    let per_writer = N as i64 / 2;
    let name = db.database().to_owned();
    for seq in 1..=per_writer {
        if seq == per_writer / 3 {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"
            )))
            .execute(&killer)
            .await
            .expect("refuse connections");
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&name)
            .execute(&killer)
            .await
            .expect("kill");
        }
        if seq == per_writer / 2 {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"
            )))
            .execute(&killer)
            .await
            .expect("allow connections");
        }
        for w in &writers {
            let mut payload = serde_json::Map::new();
            payload.insert("seq".into(), seq.into());
            w.record(seq, "delta", payload)
                .await
                .expect("record never fails on I/O");
        }
    }
    let mut dropped = 0;
    let mut written = 0;
    for w in &writers {
        let stats = w.close().await.expect("close");
        assert_eq!(stats.recorded, per_writer as u64);
        assert_eq!(stats.written + stats.dropped, stats.recorded, "{stats:?}");
        dropped += stats.dropped;
        written += stats.written;
    }
    assert!(dropped > 0, "the outage dropped nothing: it did not happen");
    assert!(written > 0);
    let reader = db.backend();
    let mut stored = 0;
    for w in 0..2 {
        let events = reader
            .journal_read_after(&format!("stream-{w}"), 0, 10_000)
            .await
            .expect("read");
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        assert!(
            seqs.windows(2).all(|p| p[0] < p[1]),
            "in order, once: {seqs:?}"
        );
        assert_eq!(
            seqs.last().copied(),
            Some(per_writer),
            "the stream continued after the outage"
        );
        stored += seqs.len() as u64;
    }
    assert_eq!(stored, written, "readers see exactly what was written");
    eprintln!(
        "| 8 journal, database unreachable | {N} events | connections refused for {} events per writer | 0 of the committed | 0 ({dropped} dropped while down, counted) |",
        per_writer / 2 - per_writer / 3
    );
    backend.pool().close().await;
    db.close().await.expect("close");
}

/// 9. Bad input is refused with a clear error and writes nothing; odd but valid input works.
#[tokio::test]
async fn bad_input_is_refused_and_writes_nothing() {
    for bad in ["orders\"; DROP TABLE x; --", "a;b", "Orders", "", "1abc"] {
        let err = TableName::new(bad).expect_err(bad);
        assert!(err.to_string().contains("table name"), "{bad}: {err}");
    }
    let long = "t".repeat(64);
    assert!(
        matches!(TableName::new(&long), Err(Error::IdentifierTooLong { .. })),
        "63-byte limit"
    );
    let db = postbox::testkit::postgres().await.expect("db");
    let backend = db.backend();

    let mut tx = backend.begin().await.expect("begin");
    backend
        .publish(&mut tx, Message::new("ok", "kept"))
        .await
        .expect("publish");
    for queue in [String::new(), "q".repeat(10_000)] {
        let err = backend
            .publish_batch(
                &mut tx,
                vec![
                    Message::new("ok", "batch"),
                    Message::new(queue.clone(), "x"),
                ],
            )
            .await
            .expect_err("bad queue");
        assert!(matches!(err, Error::InvalidQueue { .. }), "{err}");
        let err = backend
            .publish(&mut tx, Message::new(queue, "x"))
            .await
            .expect_err("bad queue");
        assert!(matches!(err, Error::InvalidQueue { .. }), "{err}");
    }
    backend.commit(tx).await.expect("commit");
    let stored = backend.messages(None).await.expect("messages");
    assert_eq!(
        stored.len(),
        1,
        "nothing of a refused batch was written: {stored:?}"
    );

    let empty = Message::new("sizes", Vec::<u8>::new());
    let big: Vec<u8> = (0..10 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut tx = backend.begin().await.expect("begin");
    backend.publish(&mut tx, empty).await.expect("0 bytes");
    backend
        .publish(&mut tx, Message::new("sizes", big.clone()))
        .await
        .expect("10 MB");
    backend.commit(tx).await.expect("commit");
    let got = backend
        .fetch(&FetchParams::new(["sizes"], 10))
        .await
        .expect("fetch");
    assert_eq!(got.len(), 2);
    assert!(got[0].payload.is_empty());
    assert_eq!(got[1].payload, big, "10 MB round trip");
    let leases: Vec<_> = got.iter().map(Delivery::lease).collect();
    assert_eq!(backend.ack_batch(&leases).await.expect("ack").len(), 2);

    // Headers are a JSON object by type (`Headers` is a map): a non-object cannot be built.
    let err =
        postbox::journal::JournalEvent::from_value("s", 1, "delta", serde_json::json!([1, 2]))
            .expect_err("not an object");
    assert!(
        err.to_string()
            .contains("must be a JSON object, got an array"),
        "{err}"
    );
    for (stream, kind) in [("", "delta"), ("s", "")] {
        let err = postbox::journal::record_event(&backend, stream, 1, kind, serde_json::Map::new())
            .await
            .expect_err("bad journal input");
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }
    assert_eq!(
        backend.journal_latest_seq("s").await.expect("seq"),
        None,
        "nothing written"
    );
    eprintln!(
        "| 9 bad input | - | 5 bad table names, a 64-byte one, 2 bad queues (single + batch), 0 B and 10 MB payloads, 3 bad journal inputs | 0 | 0 (nothing partially written) |"
    );
    db.close().await.expect("close");
}

/// 10. Load: 20 publishing tasks × 1,000 messages while 4 subscribers drain and connections
/// are killed at random.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_with_random_connection_kills() {
    let db = postbox::testkit::postgres().await.expect("db");
    let backend = db.backend();
    let killer = killer_pool(db.url()).await;
    let tally = Arc::new(Tally::default());
    let subs = spawn_subscribers(4, &backend, &options("load").prefetch(32), || {
        recording(&tally, Duration::ZERO)
    });
    let publishers: Vec<_> = (0..20)
        .map(|p| {
            let backend = backend.clone();
            tokio::spawn(async move {
                let mut ids = Vec::with_capacity(1_000);
                for chunk in 0..10 {
                    // A publish transaction whose connection is killed fails as a whole; retry it.
                    loop {
                        let attempt = async {
                            let mut tx = backend.begin().await?;
                            let got = backend
                                .publish_batch(
                                    &mut tx,
                                    (0..100)
                                        .map(|i| Message::new("load", format!("{p}-{chunk}-{i}")))
                                        .collect(),
                                )
                                .await?;
                            backend.commit(tx).await?;
                            Ok::<_, Error>(got)
                        };
                        match attempt.await {
                            Ok(got) => {
                                ids.extend(got);
                                break;
                            }
                            Err(e) if e.is_transient() => continue,
                            Err(e) => panic!("publish: {e}"),
                        }
                    }
                }
                ids
            })
        })
        .collect();
    let kills = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let chaos = {
        let (killer, kills, stop) = (killer.clone(), Arc::clone(&kills), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(10);
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(rng.u64(20..80))).await;
                let app = ["postbox.fetch", "postbox.listen"][rng.usize(0..2)];
                kills.fetch_add(kill(&killer, Some(app)).await, Ordering::SeqCst);
            }
        })
    };
    let mut ids = Vec::new();
    for p in publishers {
        ids.extend(p.await.expect("publisher"));
    }
    assert_eq!(ids.len(), 20_000);
    tally
        .wait_finished(ids.len(), DEADLINE, &subs, "drain stalled")
        .await;
    stop.store(true, Ordering::SeqCst);
    chaos.await.expect("chaos");
    wait_drained(&backend, "load", &subs).await;
    let kills = kills.load(Ordering::SeqCst);
    assert!(kills >= 5, "only {kills} kills");
    let distinct: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), 20_000, "ids unique");
    verify(
        "10 load: 20 publishers, 4 subscribers",
        &format!("{kills} random kills"),
        &ids,
        &tally,
        subs,
    )
    .await;
    db.close().await.expect("close");
}

/// 11. Generations rotating as fast as they can while a `REPEATABLE READ` snapshot pins the
/// xmin horizon, a publisher keeps publishing and fetch connections are killed: every
/// truncation that succeeds copies what is left (leased rows with their tokens), none loses
/// a row, and every duplicate is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_a_held_horizon_with_kills() {
    let db = postbox::testkit::postgres().await.expect("db");
    // Rotations run from the test's own loop rather than in the background, so that every
    // truncation is counted.
    let backend = db.backend().rotation(
        postbox::pg::Rotation::new()
            .automatic(false)
            .rotate_bytes(8 * 1024)
            .max_age(Duration::from_millis(50))
            .max_moved(100_000),
    );
    let killer = killer_pool(db.url()).await;
    let mut holder = killer.acquire().await.expect("holder connection");
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .execute(&mut *holder)
        .await
        .expect("hold the horizon");
    let tally = Arc::new(Tally::default());
    let opts = options("rot").lease_ttl(Duration::from_secs(2));
    let subs = spawn_subscribers(2, &backend, &opts, || {
        recording(&tally, Duration::from_micros(200))
    });
    let stop = Arc::new(AtomicBool::new(false));
    let rotator = {
        let (backend, stop) = (backend.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let (mut truncated, mut moved) = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                // Errors (a killed pool connection) are retried on the next turn.
                if let Ok(report) = backend.rotate().await {
                    truncated += report.truncated.len();
                    moved += report.moved;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (truncated, moved)
        })
    };
    let mut ids = Vec::new();
    let mut kills = 0;
    for _ in 0..10 {
        ids.extend(publish(&backend, "rot", N / 10).await);
        kills += kill(&killer, Some("postbox.fetch")).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let deadline = Instant::now() + DEADLINE;
    while tally.finished_count() < N {
        assert!(
            Instant::now() < deadline,
            "stalled with {} of {N} handled",
            tally.finished_count()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_drained(&backend, "rot", &subs).await;
    stop.store(true, Ordering::SeqCst);
    let (truncated, moved) = rotator.await.expect("rotator");
    assert!(kills >= 3, "only {kills} fetch connections killed");
    assert!(truncated >= 3, "only {truncated} generations truncated");
    verify(
        "11 rotation under a held horizon",
        &format!("{kills} kills, {truncated} truncations ({moved} rows moved)"),
        &ids,
        &tally,
        subs,
    )
    .await;
    sqlx::raw_sql("COMMIT")
        .execute(&mut *holder)
        .await
        .expect("release the horizon");
    drop(holder);
    db.close().await.expect("close");
}
