//! Journal streams: record, batched writer flush triggers and collisions, snapshot + tail.

use std::time::Duration;

use postbox_core::journal::{
    BatchedJournalWriter, EventPayload, JournalEvent, JournalLive, LiveEvent, TailOptions,
    WriterOptions, record_event, snapshot_and_tail,
};
use postbox_core::{Backend, Error};

use super::Harness;
use crate::live::JournalLiveControl;
use crate::wait::deadline;
use postbox_core::prelude::*;

fn payload(n: i64) -> EventPayload {
    let mut map = serde_json::Map::new();
    map.insert("n".into(), n.into());
    map
}

async fn seqs<B: JournalStore>(b: &B, stream: &str) -> Vec<i64> {
    b.journal_read_after(stream, 0, 1000)
        .await
        .expect("read")
        .iter()
        .map(|e| e.seq)
        .collect()
}

fn never() -> WriterOptions {
    WriterOptions::default().max_delay(Duration::from_secs(3600))
}

/// `record_event` commits the event and announces it live (by default, its seq only; with
/// [`JournalLive::Payloads`], the whole event).
pub async fn journal_record_event_writes_and_publishes<H: Harness>(h: &H) {
    let b = h.backend();
    let mut live = b.journal_subscribe("s").await.expect("subscribe");
    assert_eq!(
        record_event(b, "s", 1, "delta", payload(1))
            .await
            .expect("record"),
        1
    );
    let got = tokio::time::timeout(deadline(), live.recv())
        .await
        .expect("live in time");
    assert_eq!(got, Some(LiveEvent::Stored { seq: 1 }), "an announcement");

    let p = b.with_journal_live(JournalLive::Payloads);
    let mut live = p.journal_subscribe("s").await.expect("subscribe");
    assert_eq!(
        record_event(&p, "s", 2, "delta", payload(2))
            .await
            .expect("record"),
        2
    );
    let got = tokio::time::timeout(deadline(), live.recv())
        .await
        .expect("live in time");
    match got {
        Some(LiveEvent::Event(e)) => assert_eq!(
            (e.seq, e.event_type.as_str(), e.payload),
            (2, "delta", payload(2))
        ),
        other => panic!("expected the event, got {other:?}"),
    }
    let b = &p;
    let stored = b.journal_read_after("s", 0, 10).await.expect("read");
    assert_eq!(stored.len(), 2);
    assert!(stored[0].created_at.is_some());
    assert_eq!(b.journal_latest_seq("s").await.expect("latest"), Some(2));
    assert_eq!(b.journal_latest_seq("other").await.expect("latest"), None);
}

/// A taken seq is retried once at `latest + 1`, and the written seq is reported.
pub async fn journal_record_event_retries_a_taken_seq_at_latest_plus_one<H: Harness>(h: &H) {
    let b = h.backend();
    for seq in [1, 2] {
        record_event(b, "s", seq, "delta", payload(seq))
            .await
            .expect("record");
    }
    assert_eq!(
        record_event(b, "s", 1, "delta", payload(9))
            .await
            .expect("record"),
        3
    );
    assert_eq!(seqs(b, "s").await, [1, 2, 3]);
}

/// A batch insert is all or nothing: one taken seq rejects the whole batch.
pub async fn journal_append_is_all_or_nothing<H: Harness>(h: &H) {
    let b = h.backend();
    b.journal_append(&[JournalEvent::new("s", 2, "delta", payload(2))])
        .await
        .expect("append");
    let batch: Vec<_> = (1..=3)
        .map(|i| JournalEvent::new("s", i, "delta", payload(i)))
        .collect();
    let err = b.journal_append(&batch).await.expect_err("seq 2 is taken");
    assert!(matches!(err, Error::SeqConflict { .. }), "{err}");
    assert_eq!(seqs(b, "s").await, [2]);
}

/// The writer flushes when `max_batch` events are buffered, in one commit.
pub async fn journal_writer_flushes_on_size<H: Harness>(h: &H) {
    let b = h.backend();
    let w = BatchedJournalWriter::new(b.clone(), "s", never().max_batch(4));
    for seq in 1..=3 {
        w.record(seq, "delta", payload(seq)).await.expect("record");
    }
    assert!(seqs(b, "s").await.is_empty(), "3 < 4: still buffered");
    w.record(4, "delta", payload(4)).await.expect("record");
    assert_eq!(seqs(b, "s").await, [1, 2, 3, 4]);
    let stats = w.close().await.expect("close");
    assert_eq!((stats.commits, stats.written, stats.recorded), (1, 4, 4));
}

/// `close` flushes, is idempotent, and rejects later records; the terminal event is durable
/// once it returns.
pub async fn journal_writer_close_flushes_and_rejects_later_records<H: Harness>(h: &H) {
    let b = h.backend();
    let w = BatchedJournalWriter::new(b.clone(), "s", never());
    w.record(1, "delta", payload(1)).await.expect("record");
    w.record(2, "done", payload(2)).await.expect("record");
    assert!(seqs(b, "s").await.is_empty());
    let stats = w.close().await.expect("close");
    assert_eq!(seqs(b, "s").await, [1, 2], "durable once close returns");
    assert_eq!(w.close().await.expect("close twice"), stats);
    let err = w.record(3, "delta", payload(3)).await.expect_err("closed");
    assert!(matches!(err, Error::WriterClosed { .. }), "{err}");
    assert_eq!(seqs(b, "s").await, [1, 2]);
}

/// A quiet stream is flushed by the timer after `max_delay`.
pub async fn journal_writer_flushes_a_quiet_stream_on_time<H: Harness>(h: &H) {
    let b = h.backend();
    let w = BatchedJournalWriter::new(
        b.clone(),
        "s",
        WriterOptions::default().max_delay(Duration::from_millis(50)),
    );
    w.record(1, "delta", payload(1)).await.expect("record");
    let until = tokio::time::Instant::now() + deadline();
    while seqs(b, "s").await.is_empty() {
        assert!(tokio::time::Instant::now() < until, "never flushed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(w.stats().await.commits, 1);
    w.close().await.expect("close");
}

/// A batch that collides falls back to per-row inserts: the others keep their seqs, the
/// colliding event is written at `latest + 1`.
pub async fn journal_writer_collision_falls_back_per_row<H: Harness>(h: &H) {
    let b = h.backend();
    b.journal_append(&[JournalEvent::new("s", 5, "other", payload(0))])
        .await
        .expect("pre-insert");
    let w = BatchedJournalWriter::new(b.clone(), "s", never().max_batch(6));
    for seq in 3..=8 {
        w.record(seq, "delta", payload(seq)).await.expect("record");
    }
    let stats = w.close().await.expect("close");
    let stored = b.journal_read_after("s", 0, 100).await.expect("read");
    let by_seq: Vec<(i64, i64)> = stored
        .iter()
        .map(|e| {
            (
                e.seq,
                e.payload.get("n").and_then(|v| v.as_i64()).unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        by_seq,
        [(3, 3), (4, 4), (5, 0), (6, 6), (7, 7), (8, 8), (9, 5)]
    );
    assert_eq!((stats.written, stats.rewritten, stats.dropped), (6, 1, 0));
    assert_eq!(
        w.rewrites().await,
        [postbox_core::journal::Rewrite { from: 5, to: 9 }],
        "which seq moved where"
    );
}

/// The tail replays the committed events after a seq, then follows live ones, each once, in
/// order, and ends on a terminal event. By default events go live once stored, so the last
/// ones (buffered by the writer) arrive with the flush.
pub async fn journal_snapshot_then_tail_has_no_gap_and_no_duplicate<H: Harness>(h: &H) {
    snapshot_then_tail(h.backend(), true).await;
}

/// As above with [`JournalLive::Payloads`]: the buffered events arrive before any flush.
pub async fn journal_snapshot_then_tail_with_payloads_has_no_gap_and_no_duplicate<H: Harness>(
    h: &H,
) {
    snapshot_then_tail(&h.backend().with_journal_live(JournalLive::Payloads), false).await;
}

async fn snapshot_then_tail<B: Backend + Clone>(b: &B, flush_live_ones: bool) {
    let w = BatchedJournalWriter::new(b.clone(), "s", never().max_batch(4));
    for seq in 1..=10 {
        w.record(seq, "delta", payload(seq)).await.expect("record");
    }
    w.flush().await;
    let mut tail = snapshot_and_tail(b.clone(), "s", 3, TailOptions::default())
        .await
        .expect("tail");
    let mut got = Vec::new();
    for _ in 4..=10 {
        let event = tokio::time::timeout(deadline(), tail.next())
            .await
            .unwrap_or_else(|_| panic!("waiting for the snapshot after {got:?}"));
        got.push(event.expect("event").expect("ok").seq);
    }
    for seq in 11..=15 {
        w.record(seq, "delta", payload(seq)).await.expect("record");
    }
    w.record(16, "done", payload(16)).await.expect("record");
    if flush_live_ones {
        w.flush().await;
    }
    while let Some(event) = tokio::time::timeout(deadline(), tail.next())
        .await
        .expect("in time")
    {
        got.push(event.expect("ok").seq);
    }
    assert_eq!(got, (4..=16).collect::<Vec<_>>());
    w.close().await.expect("close");
    assert_eq!(seqs(b, "s").await, (1..=16).collect::<Vec<_>>());
}

/// With [`JournalLive::Payloads`] the writer publishes each event whole at once, before it is
/// stored; by default the only live thing is the announcement its flush makes.
pub async fn journal_payloads_go_live_before_they_are_stored<H: Harness>(h: &H) {
    let b = h.backend();
    let mut quiet = b.journal_subscribe("s").await.expect("subscribe");
    let w = BatchedJournalWriter::new(b.clone(), "s", never());
    w.record(1, "delta", payload(1)).await.expect("record");
    w.record(2, "delta", payload(2)).await.expect("record");
    w.close().await.expect("close");
    assert_eq!(
        next(&mut quiet).await,
        Some(LiveEvent::Stored { seq: 2 }),
        "by default: one announcement for the flush, after it"
    );

    let p = b.with_journal_live(JournalLive::Payloads);
    let mut live = p.journal_subscribe("t").await.expect("subscribe");
    let wp = BatchedJournalWriter::new(p.clone(), "t", never());
    wp.record(1, "delta", payload(1)).await.expect("record");
    match next(&mut live).await {
        Some(LiveEvent::Event(e)) => assert_eq!((e.stream.as_str(), e.seq), ("t", 1)),
        other => panic!("expected the whole event, got {other:?}"),
    }
    assert!(seqs(&p, "t").await.is_empty(), "live before it is stored");
    wp.close().await.expect("close");
    assert_eq!(seqs(&p, "t").await, [1]);
}

async fn next(live: &mut postbox_core::journal::LiveEvents) -> Option<LiveEvent> {
    tokio::time::timeout(deadline(), live.recv())
        .await
        .expect("a live event in time")
}

/// An append announces, per stream it wrote, the highest seq, once: a reader reads the rest
/// from the journal.
pub async fn journal_stored_events_are_announced_once_per_append_and_stream<H: Harness>(h: &H) {
    let b = h.backend();
    let mut a = b.journal_subscribe("a").await.expect("subscribe");
    let mut c = b.journal_subscribe("c").await.expect("subscribe");
    b.journal_append(&[
        JournalEvent::new("a", 1, "delta", payload(1)),
        JournalEvent::new("c", 7, "delta", payload(7)),
        JournalEvent::new("a", 3, "delta", payload(3)),
        JournalEvent::new("a", 2, "delta", payload(2)),
    ])
    .await
    .expect("append");
    assert_eq!(next(&mut a).await, Some(LiveEvent::Stored { seq: 3 }));
    assert_eq!(next(&mut c).await, Some(LiveEvent::Stored { seq: 7 }));
    b.journal_append(&[JournalEvent::new("a", 4, "done", payload(4))])
        .await
        .expect("append");
    assert_eq!(
        next(&mut a).await,
        Some(LiveEvent::Stored { seq: 4 }),
        "nothing else was announced to a in between"
    );
}

/// A payload that is not a JSON object is refused before anything is written or published.
pub async fn journal_non_object_payloads_are_refused<H: Harness>(h: &H) {
    let b = h.backend();
    for bad in [
        serde_json::json!([1, 2]),
        serde_json::json!("text"),
        serde_json::json!(3),
        serde_json::Value::Null,
    ] {
        let err = JournalEvent::from_value("s", 1, "delta", bad).expect_err("not an object");
        assert!(err.to_string().contains("must be a JSON object"), "{err}");
    }
    let err = record_event(b, "s", 1, "", payload(1))
        .await
        .expect_err("empty type");
    assert!(matches!(err, Error::InvalidArgument(_)));
    assert!(seqs(b, "s").await.is_empty());
}

/// A refused append names the first event, in its order, whose seq was taken: stored
/// already, or repeated within the append; nothing of it is stored.
pub async fn journal_seq_conflict_names_the_first_taken_event<H: Harness>(h: &H) {
    let b = h.backend();
    let event = |stream: &str, seq: i64| JournalEvent::new(stream, seq, "delta", payload(seq));
    b.journal_append(&[event("a", 5), event("b", 7)])
        .await
        .expect("seed");
    let conflict = |result: Result<(), Error>| match result {
        Err(Error::SeqConflict { stream, seq }) => (stream, seq),
        other => panic!("expected a seq conflict, got {other:?}"),
    };
    assert_eq!(
        conflict(b.journal_append(&[event("a", 5)]).await),
        ("a".to_owned(), Some(5))
    );
    assert_eq!(
        conflict(
            b.journal_append(&[event("a", 1), event("b", 7), event("a", 5)])
                .await
        ),
        ("b".to_owned(), Some(7)),
        "the first taken in batch order"
    );
    assert_eq!(
        conflict(
            b.journal_append(&[event("c", 1), event("c", 2), event("c", 1)])
                .await
        ),
        ("c".to_owned(), Some(1)),
        "a seq repeated within the batch"
    );
    assert_eq!(seqs(b, "a").await, [5]);
    assert!(seqs(b, "c").await.is_empty(), "all or nothing");
}
