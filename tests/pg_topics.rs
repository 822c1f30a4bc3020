//! Topics on real Postgres: what only a database shows (transactions committing out of id
//! order, a subscription created while a publish is in flight, an open transaction that
//! must not widen the scan). The semantics shared with the fake are in the conformance suite.

mod support;

use std::collections::BTreeSet;

use anyhow::Result;
use postbox::prelude::*;
use postbox::topic::{Published, Receive, Settlement, Subscribed, Unsubscribe};
use postbox::{Message, MessageId, PgBackend, Topics};

async fn publish(backend: &PgBackend, topic: &str, n: usize) -> Result<Vec<MessageId>> {
    let mut tx = backend.begin().await?;
    let ids = backend
        .publish_to_topics(
            &mut tx,
            (0..n).map(|i| Message::new(topic, i.to_string())).collect(),
        )
        .await?;
    backend.commit(tx).await?;
    Ok(ids.into_iter().map(Published::id).collect())
}

/// Receives everything the subscription has now, acking each batch; returns the ids in
/// order of receipt.
async fn drain(backend: &PgBackend, subscription: &str) -> Result<Vec<MessageId>> {
    let mut seen = Vec::new();
    loop {
        let got = backend.receive(&Receive::new(subscription, 7)).await?;
        if got.is_empty() {
            return Ok(seen);
        }
        let leases: Vec<_> = got.iter().map(|d| d.lease()).collect();
        assert_eq!(
            backend.settle(&leases, Settlement::Ack).await?.len(),
            got.len()
        );
        seen.extend(got.iter().map(|d| d.id));
    }
}

#[tokio::test]
async fn transactions_committing_out_of_id_order_are_each_received_once_postgres() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    assert_eq!(backend.subscribe("t", "s").await?, Subscribed::New);
    assert_eq!(backend.subscribe("t", "s").await?, Subscribed::Existing);

    // `early` takes its ids (and its transaction id) first but commits last.
    let mut early = backend.begin().await?;
    let early_ids = backend
        .publish_to_topics(&mut early, vec![Message::new("t", "early")])
        .await?
        .into_iter()
        .map(Published::id)
        .collect::<Vec<_>>();
    let later = publish(&backend, "t", 20).await?;
    let first = drain(&backend, "s").await?;
    assert_eq!(first, later, "the committed messages, in publish order");
    backend.commit(early).await?;
    let second = drain(&backend, "s").await?;
    assert_eq!(
        second, early_ids,
        "the late commit is received, not skipped"
    );
    assert!(drain(&backend, "s").await?.is_empty());
    let info = backend.subscriptions(Some("t")).await?;
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].backlog, 0);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_publish_in_flight_while_a_subscription_is_created_is_received_by_it_postgres()
-> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let before = publish(&backend, "t", 3).await?;
    let mut in_flight = backend.begin().await?;
    let flying = backend
        .publish_to_topics(&mut in_flight, vec![Message::new("t", "flying")])
        .await?
        .into_iter()
        .map(Published::id)
        .collect::<Vec<_>>();
    backend.subscribe("t", "late").await?;
    let after = publish(&backend, "t", 2).await?;
    backend.commit(in_flight).await?;
    let got: BTreeSet<MessageId> = drain(&backend, "late").await?.into_iter().collect();
    let want: BTreeSet<MessageId> = flying.iter().chain(&after).copied().collect();
    assert_eq!(
        got, want,
        "committed after creation: yes; before ({before:?}): no"
    );
    assert!(backend.unsubscribe("late", Unsubscribe::IfDrained).await?);
    assert!(!backend.unsubscribe("late", Unsubscribe::Discard).await?);
    db.close().await?;
    Ok(())
}

/// Heap bytes of the topic log's partitions, by slot.
async fn log_bytes(db: &postbox::testkit::PgFixture) -> Result<Vec<i64>> {
    Ok(postbox::sqlx::query_scalar(
        "SELECT ARRAY[pg_relation_size('postbox_log_p0'), pg_relation_size('postbox_log_p1'), \
         pg_relation_size('postbox_log_p2')]",
    )
    .fetch_one(db.pool())
    .await?)
}

/// A backend that rotates the log at every call (no size or age threshold), by hand.
fn rotating(db: &postbox::testkit::PgFixture) -> PgBackend {
    db.backend().rotation(
        postbox::pg::Rotation::new()
            .automatic(false)
            .rotate_bytes(0)
            .max_age(std::time::Duration::ZERO),
    )
}

#[tokio::test]
async fn the_log_gives_its_space_back_once_every_subscription_has_passed_it_postgres() -> Result<()>
{
    let db = postbox::testkit::postgres().await?;
    let backend = rotating(&db);
    backend.subscribe("t", "fast").await?;
    backend.subscribe("t", "slow").await?;
    let published = publish(&backend, "t", 500).await?;
    assert!(backend.rotate_topics().await?.advanced, "publishes move on");
    assert_eq!(drain(&backend, "fast").await?, published);

    // `slow` has not received anything: its generation stays.
    for _ in 0..3 {
        let report = backend.rotate_topics().await?;
        assert!(report.truncated.is_empty(), "{report:?}");
    }
    assert!(log_bytes(&db).await?.iter().any(|b| *b > 0));

    // `slow` receives everything but settles nothing yet: its batch still refers to the rows.
    let held = backend.receive(&Receive::new("slow", 1_000)).await?;
    assert_eq!(held.len(), 500);
    let report = backend.rotate_topics().await?;
    assert!(
        report.truncated.is_empty(),
        "an unsettled batch keeps it: {report:?}"
    );

    // Settled: the generation is truncated and the log is empty on disk.
    let leases: Vec<_> = held.iter().map(|d| d.lease()).collect();
    assert_eq!(backend.settle(&leases, Settlement::Ack).await?.len(), 500);
    let mut truncated = 0;
    for _ in 0..3 {
        truncated += backend.rotate_topics().await?.truncated.len();
    }
    assert!(truncated > 0);
    assert_eq!(log_bytes(&db).await?, vec![0, 0, 0]);
    assert!(drain(&backend, "slow").await?.is_empty());
    assert!(drain(&backend, "fast").await?.is_empty());
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn an_uncommitted_publish_into_an_old_generation_survives_its_rotation_postgres() -> Result<()>
{
    let db = postbox::testkit::postgres().await?;
    let backend = rotating(&db);
    backend.subscribe("t", "s").await?;
    // The publish reads the current generation, then the log moves on before it commits.
    let mut in_flight = backend.begin().await?;
    let late = backend
        .publish_to_topics(&mut in_flight, vec![Message::new("t", "late")])
        .await?
        .into_iter()
        .map(Published::id)
        .collect::<Vec<_>>();
    let first = publish(&backend, "t", 3).await?;
    assert!(backend.rotate_topics().await?.advanced);
    assert_eq!(drain(&backend, "s").await?, first);
    for _ in 0..3 {
        let report = backend.rotate_topics().await?;
        assert!(
            report.truncated.is_empty(),
            "the writer holds a lock: {report:?}"
        );
    }
    backend.commit(in_flight).await?;
    // Committed now, and not received yet: still needed.
    let report = backend.rotate_topics().await?;
    assert!(report.truncated.is_empty(), "{report:?}");
    assert_eq!(drain(&backend, "s").await?, late);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_topic_nobody_subscribes_is_reclaimed_at_once_postgres() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = rotating(&db);
    publish(&backend, "nobody", 200).await?;
    assert!(backend.rotate_topics().await?.advanced);
    let mut truncated = 0;
    for _ in 0..3 {
        truncated += backend.rotate_topics().await?.truncated.len();
    }
    assert!(truncated > 0);
    assert_eq!(log_bytes(&db).await?, vec![0, 0, 0]);
    db.close().await?;
    Ok(())
}

/// Schema v8 rebuilds the batches table: batches received under v7 (one acked, one partly
/// settled, one left to expire) and the subscription's cursor survive the upgrade; nothing
/// is delivered twice or lost, and the old tokens stay fenced.
#[tokio::test]
async fn batches_received_under_v7_settle_after_the_v8_upgrade_postgres() -> Result<()> {
    use postbox::testkit::TimeControl;
    use std::time::Duration;

    let db = postbox::testkit::postgres().await?;
    let table = postbox::TableName::new("v7_outbox")?;
    let backend = PgBackend::with_table(db.pool().clone(), table)
        .rotation(postbox::pg::Rotation::new().automatic(false));
    assert_eq!(backend.migrate_to(7).await?, (1..=7).collect::<Vec<_>>());
    backend.advance(Duration::ZERO).await?;
    backend.subscribe("t", "s").await?;
    let published = publish(&backend, "t", 10).await?;
    let receive = |ttl: u64| {
        let backend = backend.clone();
        async move {
            let got = backend
                .receive(&Receive::new("s", 3).lease_ttl(Duration::from_secs(ttl)))
                .await?;
            Ok::<_, anyhow::Error>(got.iter().map(|d| d.lease()).collect::<Vec<_>>())
        }
    };
    let acked = receive(60).await?;
    assert_eq!(backend.settle(&acked, Settlement::Ack).await?.len(), 3);
    let partial = receive(60).await?;
    assert_eq!(
        backend.settle(&partial[..1], Settlement::Ack).await?.len(),
        1
    );
    let expiring = receive(5).await?;

    assert_eq!(
        backend.migrate().await?,
        (8..=postbox::pg::SCHEMA_VERSION).collect::<Vec<_>>()
    );
    backend.validate_schema().await?;

    assert!(
        backend.settle(&acked, Settlement::Ack).await?.is_empty(),
        "an acked batch stays settled"
    );
    assert_eq!(
        backend.settle(&partial, Settlement::Ack).await?.len(),
        2,
        "the rest of a partly settled batch settles once"
    );
    let info = backend.subscriptions(Some("t")).await?;
    assert_eq!(
        info[0].backlog, 4,
        "one unreceived, three in the expiring batch"
    );
    backend.advance(Duration::from_secs(6)).await?;
    let mut rest = Vec::new();
    loop {
        let got = backend.receive(&Receive::new("s", 10)).await?;
        if got.is_empty() {
            break;
        }
        let leases: Vec<_> = got.iter().map(|d| d.lease()).collect();
        backend.settle(&leases, Settlement::Ack).await?;
        rest.extend(got.iter().map(|d| d.id));
    }
    rest.sort_unstable();
    assert_eq!(
        rest,
        published[6..].to_vec(),
        "the expired batch and the unreceived one"
    );
    assert!(
        backend.settle(&expiring, Settlement::Ack).await?.is_empty(),
        "the expired batch's late holder is fenced"
    );
    assert_eq!(backend.subscriptions(Some("t")).await?[0].backlog, 0);
    db.close().await?;
    Ok(())
}

/// Heap bytes of the batches' partitions, by slot.
async fn batch_bytes(db: &postbox::testkit::PgFixture) -> Result<Vec<i64>> {
    Ok(postbox::sqlx::query_scalar(
        "SELECT ARRAY[pg_relation_size('postbox_batches_p0'), \
         pg_relation_size('postbox_batches_p1'), pg_relation_size('postbox_batches_p2')]",
    )
    .fetch_one(db.pool())
    .await?)
}

/// A generation of batches is truncated once every batch in it is settled; a subscription
/// whose newest batch was there keeps its place (its cursor is carried into its row), so it
/// receives nothing twice and misses nothing.
#[tokio::test]
async fn the_batches_give_their_space_back_and_an_idle_cursor_survives_postgres() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = rotating(&db);
    backend.subscribe("t", "idle").await?;
    backend.subscribe("t", "busy").await?;
    let first = publish(&backend, "t", 20).await?;
    assert_eq!(drain(&backend, "idle").await?, first);
    let unsettled = backend.receive(&Receive::new("busy", 5)).await?;
    assert_eq!(unsettled.len(), 5);
    let slot = batch_bytes(&db).await?.iter().position(|b| *b > 0);
    let slot = slot.expect("the batches went to one generation");

    for _ in 0..3 {
        let report = backend.rotate_topics().await?;
        assert!(
            !report.batches_truncated.contains(&slot),
            "an unsettled batch keeps its generation: {report:?}"
        );
    }
    assert!(batch_bytes(&db).await?[slot] > 0);

    let leases: Vec<_> = unsettled.iter().map(|d| d.lease()).collect();
    assert_eq!(backend.settle(&leases, Settlement::Ack).await?.len(), 5);
    assert_eq!(drain(&backend, "busy").await?, first[5..].to_vec());
    let mut truncated = Vec::new();
    for _ in 0..3 {
        truncated.extend(backend.rotate_topics().await?.batches_truncated);
    }
    assert!(truncated.contains(&slot), "{truncated:?}");
    assert_eq!(batch_bytes(&db).await?[slot], 0);

    // `idle`'s newest batch was in the truncated generation: its cursor lives in its row.
    let carried: i64 =
        postbox::sqlx::query_scalar("SELECT pos_id FROM postbox_subs WHERE name = 'idle'")
            .fetch_one(db.pool())
            .await?;
    assert_eq!(carried, *first.last().expect("published"));
    let later = publish(&backend, "t", 3).await?;
    assert_eq!(drain(&backend, "idle").await?, later);
    assert_eq!(drain(&backend, "busy").await?, later);
    for s in ["idle", "busy"] {
        assert!(backend.unsubscribe(s, Unsubscribe::IfDrained).await?);
    }
    db.close().await?;
    Ok(())
}

/// Rotation running without pause while two receivers share a subscription (each keeping
/// its last batches unsettled for a while) and a publisher keeps writing, until rotation has
/// truncated generations of the log and of the batches several times under the receivers'
/// feet: every batch settles whole, and every message is received exactly once.
#[tokio::test]
async fn rotation_racing_receivers_loses_and_repeats_nothing_postgres() -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let db = postbox::testkit::postgres().await?;
    // Two receivers send statements back to back, so a truncation's 20 ms lock wait (the
    // default) mostly times out on a loaded machine (CI's Docker run truncated 2 generations
    // of each in 100,000 messages). A longer wait lets the rotation through; the receivers
    // queue behind it, which is the race this test is about.
    let backend = db.backend().rotation(
        postbox::pg::Rotation::new()
            .automatic(false)
            .rotate_bytes(0)
            .max_age(std::time::Duration::ZERO)
            .lock_wait(std::time::Duration::from_millis(500)),
    );
    backend.subscribe("t", "s").await?;
    let done = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicUsize::new(0));
    let (log_truncated, batches_truncated) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let rotator = {
        let (backend, done) = (backend.clone(), done.clone());
        let (log, batches) = (log_truncated.clone(), batches_truncated.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let report = backend.rotate_topics().await?;
                log.fetch_add(report.truncated.len(), Ordering::Relaxed);
                batches.fetch_add(report.batches_truncated.len(), Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    let receivers: Vec<_> = (0..2)
        .map(|_| {
            let (backend, done, received) = (backend.clone(), done.clone(), received.clone());
            tokio::spawn(async move {
                // Each receiver keeps its last four batches unsettled, so rotation meets
                // unsettled batches in generations it would like to truncate.
                let mut seen = Vec::new();
                let mut in_hand = std::collections::VecDeque::new();
                loop {
                    let got = backend.receive(&Receive::new("s", 25)).await?;
                    if got.is_empty() && (in_hand.is_empty() || !done.load(Ordering::Relaxed)) {
                        if done.load(Ordering::Relaxed) {
                            return Ok::<_, anyhow::Error>(seen);
                        }
                        tokio::task::yield_now().await;
                        if in_hand.is_empty() {
                            continue;
                        }
                    }
                    if !got.is_empty() {
                        seen.extend(got.iter().map(|d| d.id));
                        in_hand.push_back(got.iter().map(|d| d.lease()).collect::<Vec<_>>());
                    }
                    if in_hand.len() > 4 || got.is_empty() {
                        let Some(leases) = in_hand.pop_front() else {
                            continue;
                        };
                        assert_eq!(
                            backend.settle(&leases, Settlement::Ack).await?.len(),
                            leases.len(),
                            "a batch received is settled whole"
                        );
                        received.fetch_add(leases.len(), Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let mut published = Vec::new();
    // Two truncations of each kind: every one of them races the receivers. (Three were asked
    // for before; CI's Docker run, the slowest, twice stopped at two of each in 100,000
    // messages.)
    let enough = || {
        log_truncated.load(Ordering::Relaxed) >= 2 && batches_truncated.load(Ordering::Relaxed) >= 2
    };
    while !enough() {
        assert!(
            published.len() < 100_000,
            "rotation truncated {} log and {} batch generations in 100,000 messages",
            log_truncated.load(Ordering::Relaxed),
            batches_truncated.load(Ordering::Relaxed)
        );
        // The receivers stay within 200 messages of the publisher, so generations get
        // passed (a subscription that lags keeps them, by design).
        let behind = published.len();
        postbox::testkit::until_within(
            "the receivers to catch up",
            std::time::Duration::from_secs(60),
            || received.load(Ordering::Relaxed) + 200 >= behind,
        )
        .await;
        published.extend(publish(&backend, "t", 50).await?);
    }
    postbox::testkit::until_within(
        "the receivers to ack every message",
        std::time::Duration::from_secs(60),
        || received.load(Ordering::Relaxed) >= published.len(),
    )
    .await;
    done.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for r in receivers {
        seen.extend(r.await??);
    }
    rotator.await??;
    seen.sort_unstable();
    published.sort_unstable();
    assert_eq!(seen.len(), published.len(), "received as many as published");
    assert_eq!(seen, published, "each message received once");
    db.close().await?;
    Ok(())
}

/// The topic functions are declared `enable_seqscan = off` (their cached plans never read a
/// generation by sequential scan) and `jit = off`: the receive reads the log's generation
/// counter, a sequence, whose only plan is a sequential scan; priced at 10^10 with sequential
/// scans off it crossed `jit_above_cost` and was compiled at every call (~100 ms per receive
/// in the `xmin_hold` bench before this was set).
#[tokio::test]
async fn topic_functions_run_without_sequential_scans_or_jit_postgres() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let configs: Vec<(String, Vec<String>)> = postbox::sqlx::query_as(
        "SELECT proname::text, proconfig FROM pg_proc \
         WHERE proname IN ('postbox_receive', 'postbox_settle') ORDER BY proname",
    )
    .fetch_all(db.pool())
    .await?;
    assert_eq!(configs.len(), 2, "{configs:?}");
    for (name, config) in configs {
        for setting in ["enable_seqscan=off", "jit=off"] {
            assert!(config.iter().any(|c| c == setting), "{name}: {config:?}");
        }
    }
    db.close().await?;
    Ok(())
}
