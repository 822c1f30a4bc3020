//! Journal streams beyond the conformance suite: paused-time flush triggers on the fake,
//! failed flushes on both backends, and a property test of readers attaching mid-stream.

mod support;

use std::time::Duration;

use postbox::Backend;
use postbox::fake::{FakeBroker, Fault};
use postbox::journal::{
    BatchedJournalWriter, EventPayload, TailOptions, WriterOptions, snapshot_and_tail,
};
use proptest::prelude::*;

fn payload(n: i64) -> EventPayload {
    let mut map = serde_json::Map::new();
    map.insert("n".into(), n.into());
    map
}

async fn seqs<B: Backend>(b: &B, stream: &str) -> Vec<i64> {
    b.journal_read_after(stream, 0, 10_000)
        .await
        .expect("read")
        .iter()
        .map(|e| e.seq)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn flush_triggers_in_paused_time_size_time_and_close() {
    let b = FakeBroker::new();
    let options = WriterOptions::default()
        .max_batch(3)
        .max_delay(Duration::from_millis(100));
    let w = BatchedJournalWriter::new(b.clone(), "s", options);
    // Size: the third event flushes.
    for seq in 1..=3 {
        w.record(seq, "delta", payload(seq)).await.expect("record");
    }
    assert_eq!(seqs(&b, "s").await, [1, 2, 3]);
    // Time: a quiet stream is flushed once 100 ms have passed since the last flush.
    w.record(4, "delta", payload(4)).await.expect("record");
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(seqs(&b, "s").await.len(), 3, "60 ms: not yet");
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(seqs(&b, "s").await.len(), 4, "140 ms: flushed by the timer");
    // Close: flushes what is left.
    w.record(5, "done", payload(5)).await.expect("record");
    let stats = w.close().await.expect("close");
    assert_eq!(seqs(&b, "s").await, [1, 2, 3, 4, 5]);
    assert_eq!((stats.commits, stats.written), (3, 5));
}

/// A failed batch insert falls back to one insert per row, so a failure of the batch alone
/// loses nothing; rows that fail on their own too are dropped and counted, and the writer
/// goes on.
#[tokio::test]
async fn a_failed_flush_falls_back_row_by_row_counts_drops_and_the_writer_goes_on_fake() {
    let b = FakeBroker::new();
    let w = BatchedJournalWriter::new(b.clone(), "s", WriterOptions::default().max_batch(4));
    b.fail_next_journal_writes(1, Fault::ConnectionLost);
    for seq in 1..=4 {
        w.record(seq, "delta", payload(seq))
            .await
            .expect("record never fails on a flush");
    }
    let stats = w.stats().await;
    assert_eq!(
        (stats.dropped, stats.written, stats.commits),
        (0, 4, 4),
        "the batch failed, its four rows were written one by one"
    );
    // The batch and all four rows fail: those four are dropped.
    b.fail_next_journal_writes(5, Fault::ConnectionLost);
    for seq in 5..=8 {
        w.record(seq, "delta", payload(seq)).await.expect("record");
    }
    for seq in 9..=12 {
        w.record(seq, "delta", payload(seq)).await.expect("record");
    }
    let stats = w.close().await.expect("close");
    assert_eq!((stats.dropped, stats.written, stats.recorded), (4, 8, 12));
    assert_eq!(seqs(&b, "s").await, [1, 2, 3, 4, 9, 10, 11, 12]);
}

#[tokio::test]
async fn a_failed_flush_clears_the_buffer_counts_drops_and_the_writer_goes_on_postgres() {
    let db = postbox::testkit::postgres().await.expect("fixture");
    let b = db.backend();
    let w = BatchedJournalWriter::new(b.clone(), "s", WriterOptions::default().max_batch(4));
    support::exec(
        db.pool(),
        "ALTER TABLE postbox_events RENAME TO postbox_events_away",
    )
    .await;
    for seq in 1..=4 {
        w.record(seq, "delta", payload(seq)).await.expect("record");
    }
    support::exec(
        db.pool(),
        "ALTER TABLE postbox_events_away RENAME TO postbox_events",
    )
    .await;
    for seq in 5..=8 {
        w.record(seq, "delta", payload(seq)).await.expect("record");
    }
    let stats = w.close().await.expect("close");
    assert_eq!((stats.dropped, stats.written), (4, 4));
    assert_eq!(seqs(&b, "s").await, [5, 6, 7, 8]);
    db.close().await.expect("close");
}

/// Writes `n` events (the last one terminal) with batches of `batch`, attaching a reader after
/// `attach` records that replays from `after`; returns what the reader saw.
async fn attach_and_read<B: Backend + Clone>(
    b: B,
    n: i64,
    batch: usize,
    delay_ms: u64,
    attach: i64,
    after: i64,
) -> Vec<i64> {
    let options = WriterOptions::default()
        .max_batch(batch)
        .max_delay(Duration::from_millis(delay_ms));
    let w = BatchedJournalWriter::new(b.clone(), "s", options);
    let mut reader = None;
    for seq in 1..=n {
        if seq - 1 == attach {
            let tail = snapshot_and_tail(b.clone(), "s", after, TailOptions::default())
                .await
                .expect("tail");
            reader = Some(tokio::spawn(collect(tail)));
        }
        let kind = if seq == n { "done" } else { "delta" };
        w.record(seq, kind, payload(seq)).await.expect("record");
        if seq % 7 == 0 {
            tokio::task::yield_now().await;
        }
    }
    w.close().await.expect("close");
    let reader = match reader {
        Some(r) => r,
        None => {
            let tail = snapshot_and_tail(b.clone(), "s", after, TailOptions::default())
                .await
                .expect("tail");
            tokio::spawn(collect(tail))
        }
    };
    tokio::time::timeout(postbox::testkit::deadline(), reader)
        .await
        .expect("the reader finished")
        .expect("join")
}

async fn collect<B: Backend>(tail: postbox::journal::JournalTail<B>) -> Vec<i64> {
    use futures_util::StreamExt;
    tail.into_stream()
        .map(|event| event.expect("event").seq)
        .collect()
        .await
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Readers attaching at any point, with any flush timing, see each event exactly once, in
    /// order, from their starting seq to the terminal event.
    #[test]
    fn readers_attaching_anywhere_see_each_event_once_in_order_fake(
        n in 2i64..60,
        batch in 1usize..20,
        delay_ms in 1u64..30,
        attach in 0i64..60,
        back in 0i64..10,
    ) {
        let attach = attach.min(n - 1);
        let after = (attach - back).max(0);
        let seen = runtime().block_on(attach_and_read(FakeBroker::new(), n, batch, delay_ms, attach, after));
        prop_assert_eq!(seen, ((after + 1)..=n).collect::<Vec<_>>());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// The same on Postgres (fewer cases: each gets a fresh database).
    #[test]
    fn readers_attaching_anywhere_see_each_event_once_in_order_postgres(
        n in 2i64..40,
        batch in 1usize..20,
        delay_ms in 1u64..30,
        attach in 0i64..40,
        back in 0i64..10,
    ) {
        let attach = attach.min(n - 1);
        let after = (attach - back).max(0);
        let seen = runtime().block_on(async {
            let db = postbox::testkit::postgres().await.expect("fixture");
            let seen = attach_and_read(db.backend(), n, batch, delay_ms, attach, after).await;
            db.close().await.expect("close");
            seen
        });
        prop_assert_eq!(seen, ((after + 1)..=n).collect::<Vec<_>>());
    }
}

/// `NOTIFY` has no privileges: a role that may only connect can `LISTEN` and `NOTIFY` on the
/// journal channel. By default that gives it nothing: a forged event (even a terminal one) is
/// never yielded by a tail, and what it hears carries no payload. The same forgery is yielded
/// by a tail that opted in to [`JournalLive::Payloads`], which is why that mode is opt-in.
#[tokio::test]
async fn a_connect_only_role_can_neither_inject_into_nor_read_a_tail_on_postgres()
-> anyhow::Result<()> {
    use postbox::journal::JournalLive;
    use postbox::sqlx;
    use postbox::sqlx::postgres::PgListener;

    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    // A role with nothing but what every role has (CONNECT, LISTEN, NOTIFY).
    let (role, intruder) = support::login_role(&db, "", 2).await?;
    let denied = sqlx::query("SELECT payload FROM postbox_events")
        .fetch_all(&intruder)
        .await
        .expect_err("the journal table is not the intruder's to read");
    assert!(denied.to_string().contains("permission denied"), "{denied}");
    let mut ears = PgListener::connect_with(&intruder).await?;
    ears.listen("postbox_ev_postbox").await?;
    let forge = |text: &'static str| {
        let intruder = intruder.clone();
        async move {
            sqlx::query("SELECT pg_notify('postbox_ev_postbox', $1)")
                .bind(text)
                .execute(&intruder)
                .await
        }
    };

    let mut secret = EventPayload::new();
    secret.insert("secret".into(), "hunter2".into());
    let w = BatchedJournalWriter::new(backend.clone(), "s", WriterOptions::default());
    let mut tail = snapshot_and_tail(backend.clone(), "s", 0, TailOptions::default()).await?;
    w.record(1, "delta", secret).await?;
    let first = postbox::testkit::within("seq 1", tail.next())
        .await
        .expect("seq 1")?;
    assert_eq!(first.payload.get("secret"), Some(&"hunter2".into()));

    // Forgeries: a whole terminal event, and an announcement of a seq that does not exist.
    forge(r#"{"s":"s","q":2,"t":"done","p":{"forged":true}}"#).await?;
    forge(r#"{"s":"s","q":99,"c":true}"#).await?;
    w.record(2, "delta", payload(2)).await?;
    w.record(3, "done", payload(3)).await?;
    w.close().await?;
    let mut rest = Vec::new();
    while let Some(event) = postbox::testkit::within("the real seqs 2 and 3", tail.next()).await {
        let event = event?;
        rest.push((event.seq, event.event_type.clone(), event.payload.clone()));
    }
    assert_eq!(
        rest,
        [
            (2, "delta".to_owned(), payload(2)),
            (3, "done".to_owned(), payload(3))
        ],
        "the tail yields what the table holds, nothing forged"
    );

    // What the intruder heard: announcements, never the payload.
    let mut heard = Vec::new();
    let seq_of = |n: &String| {
        serde_json::from_str::<serde_json::Value>(n)
            .ok()
            .and_then(|v| v.get("q").and_then(serde_json::Value::as_i64))
    };
    while !heard.iter().any(|n| seq_of(n) == Some(3)) {
        let n = postbox::testkit::within("the announcement of seq 3", ears.recv()).await?;
        heard.push(n.payload().to_owned());
    }
    assert!(
        heard.iter().all(|n| !n.contains("hunter2")),
        "a payload reached the intruder: {heard:?}"
    );

    // The opt-in mode trusts the channel: the same forgery ends its tail.
    let trusting = backend.clone().journal_live(JournalLive::Payloads);
    let mut gullible = snapshot_and_tail(trusting, "u", 0, TailOptions::default()).await?;
    forge(r#"{"s":"u","q":1,"t":"done","p":{"forged":true}}"#).await?;
    let forged = postbox::testkit::within("the forged event", gullible.next())
        .await
        .expect("an event")?;
    assert_eq!(forged.payload.get("forged"), Some(&true.into()));

    drop(ears);
    support::drop_role(&db, &role, intruder).await?;
    db.close().await?;
    Ok(())
}

/// A tail's live subscription holds one LISTEN connection of its own; dropping the tail (a
/// reader that went away) closes it, so readers that come and go leak no connections.
#[tokio::test]
async fn a_dropped_tail_closes_its_listen_connection_on_postgres() -> anyhow::Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let tails = futures_util::future::try_join_all(
        (0..3).map(|_| snapshot_and_tail(backend.clone(), "s", 0, TailOptions::default())),
    )
    .await?;
    support::eventually("three LISTEN connections", || {
        let pool = db.pool().clone();
        async move { support::pids_of(&pool, "postbox.journal").await.len() == 3 }
    })
    .await;
    drop(tails);
    support::eventually("no LISTEN connection left", || {
        let pool = db.pool().clone();
        async move { support::pids_of(&pool, "postbox.journal").await.is_empty() }
    })
    .await;
    db.close().await?;
    Ok(())
}

/// A `record` whose flush is cancelled (a caller's timeout) must not lose the batch it took:
/// the flush goes on without the caller, and `close` reports every event written.
#[tokio::test]
async fn a_cancelled_record_does_not_lose_the_batch_its_flush_took_on_postgres() {
    use postbox::sqlx::{self, Connection};

    let db = postbox::testkit::postgres().await.expect("fixture");
    let b = db.backend();
    let w = BatchedJournalWriter::new(b.clone(), "s", WriterOptions::default().max_batch(2));
    w.record(1, "delta", payload(1)).await.expect("record");

    // Another session holds the journal table: the flush's insert waits for it.
    let mut blocker = sqlx::PgConnection::connect(db.url())
        .await
        .expect("connect");
    let mut lock = blocker.begin().await.expect("begin");
    sqlx::query("LOCK TABLE postbox_events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    let cancelled =
        tokio::time::timeout(Duration::from_millis(200), w.record(2, "delta", payload(2))).await;
    assert!(
        cancelled.is_err(),
        "the flush waits for the lock, so the call times out"
    );
    lock.rollback().await.expect("release the lock");

    let stats = w.close().await.expect("close");
    assert_eq!(
        (stats.written, stats.dropped),
        (2, 0),
        "both events written, none silently lost: {stats:?}"
    );
    assert_eq!(seqs(&b, "s").await, [1, 2]);
    db.close().await.expect("close");
}
