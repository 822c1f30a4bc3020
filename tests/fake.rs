//! What only the fake offers: fault injection, paused time, counters; and the runtime on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use postbox::fake::{FakeBroker, Fault};
use postbox::prelude::*;
use postbox::runtime::SubscriberEvent;
use postbox::testkit::{until_within, wait_for_event_within, within};
use postbox::{
    Delivery, Error, FetchParams, HandlerError, Message, MessageState, Outcome, Subscriber,
    SubscriberOptions,
};

/// Virtual time to wait for an event under paused time (the clock jumps over idle waits).
const HOUR: Duration = Duration::from_secs(3600);

async fn publish(b: &FakeBroker, n: usize) -> Vec<i64> {
    let mut tx = b.begin().await.expect("begin");
    let ids = b
        .publish_batch(
            &mut tx,
            (0..n).map(|i| Message::new("q", i.to_string())).collect(),
        )
        .await
        .expect("publish");
    b.commit(tx).await.expect("commit");
    ids
}

#[tokio::test]
async fn injected_faults_fail_exactly_the_next_n_calls_and_change_nothing() {
    let b = FakeBroker::new();
    b.fail_next_publishes(1, Fault::Message("disk full".into()));
    let mut tx = b.begin().await.expect("begin");
    let err = b
        .publish(&mut tx, Message::new("q", "x"))
        .await
        .expect_err("injected");
    assert!(
        matches!(&err, Error::Injected(m) if m == "disk full"),
        "{err}"
    );
    b.publish(&mut tx, Message::new("q", "x"))
        .await
        .expect("second publish works");
    b.commit(tx).await.expect("commit");

    b.fail_next_fetches(2, Fault::ConnectionLost);
    for _ in 0..2 {
        let err = b
            .fetch(&FetchParams::new(["q"], 1))
            .await
            .expect_err("injected");
        assert!(err.is_transient(), "a lost connection is transient: {err}");
    }
    let d = b
        .fetch(&FetchParams::new(["q"], 1))
        .await
        .expect("fetch")
        .remove(0);

    b.fail_next_outcomes(1, Fault::ConnectionLost);
    assert!(b.ack(d.lease()).await.is_err());
    assert_eq!(b.snapshot(None).len(), 1, "a failed ack deletes nothing");
    assert!(b.ack(d.lease()).await.expect("ack"));
    let c = b.counters();
    assert_eq!((c.published, c.fetched, c.acked), (1, 1, 1));
}

/// Zero injected faults means none, of every kind, and a later zero clears a pending fault;
/// journal writes fail like the others.
#[tokio::test]
async fn zero_faults_inject_nothing_and_clear_pending_ones() {
    let b = FakeBroker::new();
    let journal = |seq: i64| {
        vec![postbox::journal::JournalEvent::new(
            "s",
            seq,
            "delta",
            serde_json::Map::new(),
        )]
    };
    b.fail_next_publishes(0, Fault::ConnectionLost);
    b.fail_next_fetches(0, Fault::ConnectionLost);
    b.fail_next_outcomes(0, Fault::ConnectionLost);
    b.fail_next_journal_writes(0, Fault::ConnectionLost);
    publish(&b, 2).await;
    let ds = b.fetch(&FetchParams::new(["q"], 2)).await.expect("fetch");
    assert!(b.ack(ds[0].lease()).await.expect("ack"));
    b.journal_append(&journal(1)).await.expect("append");

    b.fail_next_journal_writes(2, Fault::Message("journal down".into()));
    for seq in [2, 3] {
        let err = b.journal_append(&journal(seq)).await.expect_err("injected");
        assert!(
            matches!(&err, Error::Injected(m) if m == "journal down"),
            "{err}"
        );
    }
    b.journal_append(&journal(4))
        .await
        .expect("the third works");

    let inject = |kind: u8, n: u32| match kind {
        0 => b.fail_next_publishes(n, Fault::ConnectionLost),
        1 => b.fail_next_fetches(n, Fault::ConnectionLost),
        2 => b.fail_next_outcomes(n, Fault::ConnectionLost),
        _ => b.fail_next_journal_writes(n, Fault::ConnectionLost),
    };
    for kind in 0..4 {
        inject(kind, 5);
        inject(kind, 0);
    }
    publish(&b, 1).await;
    assert_eq!(
        b.fetch(&FetchParams::new(["q"], 1))
            .await
            .expect("fetch")
            .len(),
        1
    );
    assert!(b.ack(ds[1].lease()).await.expect("ack"));
    b.journal_append(&journal(5)).await.expect("append");
    let stored: Vec<i64> = b
        .journal_read_after("s", 0, 10)
        .await
        .expect("read")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(stored, [1, 4, 5]);
}

/// A transaction's `Debug` shows how many messages it holds unpublished, not their payloads.
#[tokio::test]
async fn a_transaction_debug_shows_its_pending_count() {
    let b = FakeBroker::new();
    let mut tx = b.begin().await.expect("begin");
    b.publish(&mut tx, Message::new("q", "secret payload"))
        .await
        .expect("publish");
    let shown = format!("{tx:?}");
    assert!(
        shown.starts_with("FakeTransaction { conn: FakeConn { started_at: "),
        "{shown}"
    );
    assert!(shown.contains("pending: 1"), "{shown}");
    assert!(!shown.contains("secret"), "{shown}");
    b.rollback(tx).await.expect("rollback");
}

/// Every counter counts its own outcome.
#[tokio::test]
async fn counters_count_each_outcome() {
    let b = FakeBroker::new();
    publish(&b, 4).await;
    let ds = b.fetch(&FetchParams::new(["q"], 4)).await.expect("fetch");
    assert!(b.ack(ds[0].lease()).await.expect("ack"));
    assert!(
        b.retry(
            ds[1].lease(),
            postbox::RetryParams::new(Duration::from_secs(60))
        )
        .await
        .expect("retry")
    );
    assert!(b.dead_letter(ds[2].lease(), "bad").await.expect("dead"));
    assert!(b.release(ds[3].lease()).await.expect("release"));
    let c = b.counters();
    assert_eq!(
        (
            c.published,
            c.fetched,
            c.acked,
            c.retried,
            c.dead_lettered,
            c.released
        ),
        (4, 4, 1, 1, 1, 1)
    );
}

/// Both paths that dead-letter without a `dead_letter` call count: a row leased
/// `max_deliveries` times, and a member's held row whose requeue exhausts its attempts.
#[tokio::test]
async fn counters_count_dead_letters_by_max_deliveries_and_by_an_exhausted_requeue() {
    use postbox::Member;
    use postbox::coop::{CoopReceive, Unregister};

    let b = FakeBroker::new();
    publish(&b, 2).await;
    let params = FetchParams::new(["q"], 1).max_deliveries(1);
    let first = b.fetch(&params).await.expect("fetch");
    assert_eq!(first.len(), 1);
    b.advance(Duration::from_secs(3600));
    // The expired row was leased once already: the next fetch picks it first and buries it
    // (it counts against that fetch's limit); the one after leases the other row.
    assert!(b.fetch(&params).await.expect("fetch").is_empty());
    assert_eq!(b.counters().dead_lettered, 1);
    let second = b.fetch(&params).await.expect("fetch");
    assert_eq!(second.len(), 1);
    assert_ne!(second[0].id, first[0].id);
    assert!(b.ack(second[0].lease()).await.expect("ack"));

    publish(&b, 1).await;
    let member = Member::new("g", "m").expect("valid");
    b.coop_register(&member, &["q".to_owned()])
        .await
        .expect("register");
    let held = b
        .coop_receive(&CoopReceive::new(member.clone(), ["q"], 10))
        .await
        .expect("receive");
    assert_eq!(held.len(), 1);
    assert!(
        b.coop_unregister(&member, Unregister::Requeue { max_attempts: 1 })
            .await
            .expect("unregister")
    );
    assert_eq!(b.dead(Some("q")).len(), 2);
    assert_eq!(
        b.counters().dead_lettered,
        2,
        "the exhausted requeue counts"
    );
}

/// The broker's Debug shows its table and counts, never payloads.
#[tokio::test]
async fn a_broker_debug_shows_its_table_and_counts() {
    let b = FakeBroker::new();
    let mut tx = b.begin().await.expect("begin");
    b.publish(&mut tx, Message::new("q", "secret payload"))
        .await
        .expect("publish");
    b.commit(tx).await.expect("commit");
    let shown = format!("{b:?}");
    assert_eq!(
        shown,
        r#"FakeBroker { table: "postbox", messages: 1, dead: 0, .. }"#
    );
}

/// A broker for another table reports that table and works like the default one.
#[tokio::test]
async fn a_broker_for_another_table_names_it() {
    let table = postbox::TableName::new("orders_outbox").expect("valid");
    let b = FakeBroker::with_table(table.clone());
    assert_eq!(b.table(), &table);
    assert_ne!(FakeBroker::new().table(), &table);
    publish(&b, 1).await;
    assert_eq!(
        b.fetch(&FetchParams::new(["q"], 1))
            .await
            .expect("fetch")
            .len(),
        1
    );
}

#[tokio::test]
async fn rollbacks_are_counted_and_leave_gaps_in_ids() {
    let b = FakeBroker::new();
    let mut tx = b.begin().await.expect("begin");
    let rolled = b
        .publish(&mut tx, Message::new("q", "x"))
        .await
        .expect("publish");
    b.rollback(tx).await.expect("rollback");
    let kept = publish(&b, 1).await;
    assert!(
        kept[0] > rolled,
        "ids are taken at publish time, as with a sequence"
    );
    assert_eq!(b.counters().rolled_back, 1);
}

#[tokio::test(start_paused = true)]
async fn paused_time_drives_lease_expiry_without_waiting() {
    let b = FakeBroker::new();
    publish(&b, 1).await;
    let first = b.fetch(&FetchParams::new(["q"], 1)).await.expect("fetch");
    tokio::time::advance(Duration::from_secs(29)).await;
    assert!(
        b.fetch(&FetchParams::new(["q"], 1))
            .await
            .expect("fetch")
            .is_empty()
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    let again = b.fetch(&FetchParams::new(["q"], 1)).await.expect("fetch");
    assert_eq!(again[0].id, first[0].id);
}

#[tokio::test(start_paused = true)]
async fn the_runtime_on_the_fake_polls_through_retry_delays_in_paused_time() {
    let b = FakeBroker::new();
    let ids = publish(&b, 3).await;
    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    // Every message fails once with a one-minute delay, then succeeds.
    let handler = move |d: Delivery| {
        counter.fetch_add(1, Ordering::SeqCst);
        std::future::ready(if d.attempts == 0 {
            Err(HandlerError::retry_after(
                Duration::from_secs(60),
                "not yet",
            ))
        } else {
            Ok(())
        })
    };
    let sub = Subscriber::new(b.clone(), SubscriberOptions::new(["q"]), handler)
        .expect("options")
        .spawn();
    let mut events = sub.events();
    let started = tokio::time::Instant::now();
    for _ in 0..3 {
        wait_for_event_within(&mut events, "ack", HOUR, |e| {
            matches!(
                e,
                SubscriberEvent::Handled {
                    outcome: Outcome::Acked,
                    ..
                }
            )
        })
        .await;
    }
    // The clock jumped over the minute (and the 1-10 s idle polling) without real waiting.
    assert!(started.elapsed() >= Duration::from_secs(60));
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    let stats = within("shutdown", sub.shutdown())
        .await
        .expect("shutdown")
        .stats;
    assert_eq!((stats.acked, stats.retried), (3, 3));
    assert!(b.snapshot(None).is_empty());
    assert_eq!(b.counters().acked, ids.len() as u64);
}

#[tokio::test(start_paused = true)]
async fn the_runtime_backs_off_on_fetch_errors_and_recovers() {
    let b = FakeBroker::new();
    publish(&b, 5).await;
    b.fail_next_fetches(3, Fault::ConnectionLost);
    let handler = |_d: Delivery| std::future::ready(Ok::<(), HandlerError>(()));
    let sub = Subscriber::new(b.clone(), SubscriberOptions::new(["q"]), handler)
        .expect("options")
        .spawn();
    let mut events = sub.events();
    let mut delays = Vec::new();
    while delays.len() < 3 {
        if let SubscriberEvent::BackoffStarted { delay, .. } =
            wait_for_event_within(&mut events, "backoff", HOUR, |e| {
                matches!(e, SubscriberEvent::BackoffStarted { .. })
            })
            .await
        {
            delays.push(delay);
        }
    }
    assert!(delays[2] > delays[0], "the backoff grows: {delays:?}");
    for _ in 0..5 {
        wait_for_event_within(&mut events, "ack", HOUR, |e| {
            matches!(
                e,
                SubscriberEvent::Handled {
                    outcome: Outcome::Acked,
                    ..
                }
            )
        })
        .await;
    }
    let stats = within("shutdown", sub.shutdown())
        .await
        .expect("shutdown")
        .stats;
    assert_eq!((stats.errors, stats.acked), (3, 5));
    assert!(b.snapshot(None).is_empty());
}

#[tokio::test(start_paused = true)]
async fn failed_ack_writes_are_retried_and_nothing_is_lost() {
    let b = FakeBroker::new();
    publish(&b, 4).await;
    b.fail_next_outcomes(2, Fault::ConnectionLost);
    let handler = |_d: Delivery| std::future::ready(Ok::<(), HandlerError>(()));
    let sub = Subscriber::new(b.clone(), SubscriberOptions::new(["q"]), handler)
        .expect("options")
        .spawn();
    let mut events = sub.events();
    for _ in 0..4 {
        wait_for_event_within(&mut events, "ack", HOUR, |e| {
            matches!(
                e,
                SubscriberEvent::Handled {
                    outcome: Outcome::Acked,
                    ..
                }
            )
        })
        .await;
    }
    let stats = within("shutdown", sub.shutdown())
        .await
        .expect("shutdown")
        .stats;
    assert_eq!(stats.acked, 4);
    assert!(stats.errors >= 1, "{stats:?}");
    assert!(b.snapshot(None).is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_same_paused_schedule_gives_the_same_history_twice() {
    async fn run() -> Vec<(i64, i32)> {
        let b = FakeBroker::new();
        publish(&b, 6).await;
        let handler = |d: Delivery| {
            std::future::ready(if d.id % 2 == 0 && d.attempts < 2 {
                Err(HandlerError::retry_after(
                    Duration::from_secs(5),
                    "even ids fail twice",
                ))
            } else {
                Ok(())
            })
        };
        let options = SubscriberOptions::new(["q"]).max_workers(1).prefetch(0);
        let sub = Subscriber::new(b.clone(), options, handler)
            .expect("options")
            .spawn();
        let mut events = sub.events();
        let mut history = Vec::new();
        while history.len() < 12 {
            if let SubscriberEvent::Handled { id, outcome } =
                wait_for_event_within(&mut events, "outcome", HOUR, |e| {
                    matches!(e, SubscriberEvent::Handled { .. })
                })
                .await
            {
                history.push((id, i32::from(outcome == Outcome::Acked)));
            }
        }
        within("shutdown", sub.shutdown()).await.expect("shutdown");
        history
    }
    let first = run().await;
    assert_eq!(first, run().await);
    assert_eq!(first.iter().filter(|(_, acked)| *acked == 1).count(), 6);
}

#[tokio::test(start_paused = true)]
async fn an_ack_delay_groups_acks_of_handlers_that_finish_one_by_one() {
    let b = FakeBroker::new();
    publish(&b, 20).await;
    let handler = |_d: Delivery| std::future::ready(Ok::<(), HandlerError>(()));
    let options = SubscriberOptions::new(["q"])
        .max_workers(1)
        .prefetch(19)
        .ack_delay(Duration::from_millis(50));
    let sub = Subscriber::new(b.clone(), options, handler)
        .expect("options")
        .spawn();
    let mut events = sub.events();
    for _ in 0..20 {
        wait_for_event_within(&mut events, "ack", HOUR, |e| {
            matches!(
                e,
                SubscriberEvent::Handled {
                    outcome: Outcome::Acked,
                    ..
                }
            )
        })
        .await;
    }
    let stats = within("shutdown", sub.shutdown())
        .await
        .expect("shutdown")
        .stats;
    assert_eq!(stats.acked, 20);
    assert!(
        stats.ack_statements <= 3,
        "one-by-one completions shared statements: {stats:?}"
    );
    assert!(b.snapshot(None).is_empty());
}

#[tokio::test(start_paused = true)]
async fn shutdown_writes_acks_still_waiting_for_their_delay() {
    let b = FakeBroker::new();
    publish(&b, 3).await;
    let handler = |_d: Delivery| std::future::ready(Ok::<(), HandlerError>(()));
    let options = SubscriberOptions::new(["q"]).ack_delay(Duration::from_secs(3600));
    let sub = Subscriber::new(b.clone(), options, handler)
        .expect("options")
        .spawn();
    // Wait until every handler ran (the acks wait for their hour).
    until_within("every handler to run", HOUR, || b.counters().fetched >= 3).await;
    tokio::task::yield_now().await;
    assert_eq!(
        sub.stats().acked,
        0,
        "the acks are still waiting for their delay"
    );
    let stats = within("shutdown", sub.shutdown())
        .await
        .expect("shutdown")
        .stats;
    assert_eq!(stats.acked, 3);
    assert!(
        b.snapshot(None).is_empty(),
        "nothing left leased or unacked"
    );
}

/// Fast handlers on a deep queue behind a fetch round trip: the handlers run out of work
/// during each fetch, so the prefetch window grows, and the queue drains in far fewer fetches
/// than the floor's `max_workers + prefetch` rows per fetch would take.
#[tokio::test(start_paused = true)]
async fn fast_handlers_on_a_deep_queue_drain_in_growing_batches() {
    let b = FakeBroker::new();
    b.set_fetch_latency(Duration::from_millis(1));
    publish(&b, 5_000).await;
    let handler = |_d: Delivery| std::future::ready(Ok::<(), HandlerError>(()));
    let sub = Subscriber::new(b.clone(), SubscriberOptions::new(["q"]), handler)
        .expect("options")
        .spawn();
    until_within("5,000 acks", HOUR, || sub.stats().acked >= 5_000).await;
    let stats = within("shutdown", sub.shutdown())
        .await
        .expect("shutdown")
        .stats;
    // At a fixed 16 + 16 rows per fetch this takes 157 fetches; growing to 16 + 512, the
    // ramp (32, 48, 80, ...) and about nine full ones.
    assert!(
        stats.fetches <= 30,
        "the window did not grow: {} fetches for 5,000 messages ({stats:?})",
        stats.fetches
    );
    assert!(b.snapshot(None).is_empty());
}

/// Slow handlers: fetches return to a busy subscriber, so the window stays near its floor
/// and the subscriber never holds more than `max_workers + 2 * prefetch` leases.
#[tokio::test(start_paused = true)]
async fn slow_handlers_keep_the_prefetch_buffer_near_its_floor() {
    let b = FakeBroker::new();
    b.set_fetch_latency(Duration::from_millis(1));
    publish(&b, 300).await;
    let most_leased = Arc::new(AtomicU32::new(0));
    let handler = {
        let (b, most_leased) = (b.clone(), Arc::clone(&most_leased));
        move |_d: Delivery| {
            let leased = b
                .snapshot(Some("q"))
                .iter()
                .filter(|m| m.state == MessageState::Leased)
                .count();
            most_leased.fetch_max(u32::try_from(leased).unwrap_or(u32::MAX), Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok::<(), HandlerError>(())
            }
        }
    };
    let options = SubscriberOptions::new(["q"]).max_workers(4).prefetch(4);
    let sub = Subscriber::new(b.clone(), options, handler)
        .expect("options")
        .spawn();
    until_within("300 acks", HOUR, || sub.stats().acked >= 300).await;
    within("shutdown", sub.shutdown()).await.expect("shutdown");
    let most = most_leased.load(Ordering::SeqCst);
    assert!(
        (8..=12).contains(&most),
        "4 workers, prefetch 4: at most 4 + 2 * 4 leased at once, got {most}"
    );
}
