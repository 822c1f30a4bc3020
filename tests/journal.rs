//! Journal streams beyond the conformance suite: paused-time flush triggers on the fake,
//! failed flushes on both backends, and a property test of readers attaching mid-stream.

mod support;

use std::time::Duration;

use postbox::fake::{FakeBroker, Fault};
use postbox::{
    Backend, BatchedJournalWriter, EventPayload, TailOptions, WriterOptions, snapshot_and_tail,
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

async fn collect<B: Backend>(tail: postbox::JournalTail<B>) -> Vec<i64> {
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
