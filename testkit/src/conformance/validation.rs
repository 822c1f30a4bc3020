//! What Postgres cannot store is refused identically by every backend, before anything is
//! written or published.

use std::time::Duration;

use postbox_core::journal::{
    BatchedJournalWriter, EventPayload, JournalEvent, JournalLive, LiveEvent, WriterOptions,
};
use postbox_core::{
    Error, HandlerError, MAX_DELAY, Message, MessageState, RetryParams, RetryPolicy,
};

use super::{Harness, fetch, publish};
use crate::live::JournalLiveControl;
use crate::wait::deadline;
use postbox_core::prelude::*;

fn invalid(result: Result<impl std::fmt::Debug, Error>, field: &str) {
    match result {
        Err(Error::InvalidArgument(message)) => {
            assert!(message.contains(field), "{message:?} names {field:?}")
        }
        other => panic!("expected InvalidArgument naming {field:?}, got {other:?}"),
    }
}

fn text_payload(s: &str) -> EventPayload {
    let mut map = serde_json::Map::new();
    map.insert("text".into(), s.into());
    map
}

/// NUL in a header, a delay beyond `MAX_DELAY` or a `not_before` before 4713 BC is refused;
/// a batch with one such message writes none of them. The limits themselves are stored.
pub async fn validation_publish_refuses_what_postgres_cannot_store<H: Harness>(h: &H) {
    let b = h.backend();
    let start_of_time = chrono::NaiveDate::from_ymd_opt(-4712, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .expect("instant")
        .and_utc();
    let bad = [
        (Message::new("q", "x").header("k", "nul\u{0}"), "headers"),
        (Message::new("q", "x").header("k\u{0}", 1), "headers"),
        (
            Message::new("q", "x").header("k", serde_json::json!({"deep": ["\u{0}"]})),
            "headers",
        ),
        (
            Message::new("q", "x").delay(MAX_DELAY + Duration::from_secs(1)),
            "publish delay",
        ),
        (
            Message::new("q", "x").not_before(start_of_time - chrono::Duration::days(1)),
            "not_before",
        ),
    ];
    for (message, field) in bad {
        let mut tx = b.begin().await.expect("begin");
        invalid(b.publish(&mut tx, message.clone()).await, field);
        invalid(
            b.publish_batch(&mut tx, vec![Message::new("q", "good"), message])
                .await,
            field,
        );
        b.commit(tx).await.expect("commit");
    }
    assert!(
        b.messages(None).await.expect("messages").is_empty(),
        "nothing written"
    );

    publish(
        b,
        vec![
            Message::new("q", "far").delay(MAX_DELAY),
            Message::new("q", "early").not_before(start_of_time),
        ],
    )
    .await;
    let stored = b.messages(None).await.expect("messages");
    assert_eq!(stored.len(), 2, "the limits are storable: {stored:?}");
}

/// A retry with a delay beyond `MAX_DELAY` or a NUL in its error, and a dead letter with a
/// NUL in its reason, are refused and change nothing: the row stays leased, attempts 0.
pub async fn validation_outcomes_refuse_what_postgres_cannot_store<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let d = fetch(b, "q", 1).await.remove(0);
    invalid(
        b.retry(d.lease(), RetryParams::new(Duration::MAX)).await,
        "retry delay",
    );
    invalid(
        b.retry(
            d.lease(),
            RetryParams::new(Duration::ZERO).error("bad\u{0}error"),
        )
        .await,
        "retry error",
    );
    invalid(
        b.dead_letter(d.lease(), "bad\u{0}reason").await,
        "dead-letter reason",
    );
    let stored = b.messages(None).await.expect("messages");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].state, MessageState::Leased, "still leased");
    assert_eq!(stored[0].attempts, 0, "no attempt counted");
    assert!(b.dead_letters(None).await.expect("dead").is_empty());
    assert!(
        b.retry(d.lease(), RetryParams::new(MAX_DELAY))
            .await
            .expect("a retry at the limit"),
        "the lease still holds"
    );
}

/// A handler's error text is stored with its NUL characters replaced (U+FFFD), not refused:
/// the runtime has no one to hand the refusal to.
pub async fn validation_a_handler_error_with_nul_is_stored_replaced<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x"), Message::new("q", "y")]).await;
    let ds = fetch(b, "q", 2).await;
    let retried = b
        .fail(
            &ds[0],
            &HandlerError::retry("a\u{0}b"),
            &RetryPolicy::constant(Duration::ZERO),
        )
        .await
        .expect("fail");
    assert!(
        matches!(retried, postbox_core::Outcome::Retried { .. }),
        "{retried:?}"
    );
    b.fail(
        &ds[1],
        &HandlerError::reject("c\u{0}d"),
        &RetryPolicy::default(),
    )
    .await
    .expect("fail");
    let stored = b.messages(None).await.expect("messages");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].last_error.as_deref(), Some("a\u{FFFD}b"));
    let dead = b.dead_letters(None).await.expect("dead");
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.contains("c\u{FFFD}d"),
        "{:?}",
        dead[0].reason
    );
}

/// NUL in a stream id, an event type or anywhere in a payload is refused by appends (all or
/// nothing), live publishes and reads alike.
pub async fn validation_journal_refuses_nul<H: Harness>(h: &H) {
    let b = h.backend();
    let good = JournalEvent::new("s", 1, "delta", text_payload("fine"));
    let bad = [
        (
            JournalEvent::new("s", 2, "delta", text_payload("nul\u{0}")),
            "journal payload",
        ),
        (
            JournalEvent::new("s\u{0}", 2, "delta", text_payload("x")),
            "journal stream id",
        ),
        (
            JournalEvent::new("s", 2, "del\u{0}ta", text_payload("x")),
            "event type",
        ),
    ];
    for (event, field) in bad {
        invalid(
            b.journal_append(&[good.clone(), event.clone()]).await,
            field,
        );
        invalid(b.journal_publish(&event).await, field);
    }
    invalid(b.journal_latest_seq("s\u{0}").await, "journal stream id");
    invalid(
        b.journal_read_after("s\u{0}", 0, 10).await,
        "journal stream id",
    );
    invalid(
        b.journal_subscribe("s\u{0}").await.map(|_| ()),
        "journal stream id",
    );
    assert!(
        b.journal_read_after("s", 0, 10)
            .await
            .expect("read")
            .is_empty(),
        "nothing written"
    );
}

/// The batched writer refuses a bad event in `record` and never publishes it live; the good
/// events around it are published and stored. Run with [`JournalLive::Payloads`], where
/// `record` publishes at once (by default nothing is live before it is stored).
pub async fn validation_journal_writer_refuses_a_bad_event_and_keeps_the_rest<H: Harness>(h: &H) {
    let b = &h.backend().with_journal_live(JournalLive::Payloads);
    let mut live = b.journal_subscribe("s").await.expect("subscribe");
    let w = BatchedJournalWriter::new(
        b.clone(),
        "s",
        WriterOptions::default()
            .max_batch(16)
            .max_delay(Duration::from_secs(3600)),
    );
    for seq in 1..=15 {
        w.record(seq, "delta", text_payload("ok"))
            .await
            .expect("record");
    }
    invalid(
        w.record(16, "delta", text_payload("nul\u{0}")).await,
        "journal payload",
    );
    w.record(17, "done", text_payload("ok"))
        .await
        .expect("record");
    let stats = w.close().await.expect("close");
    assert_eq!((stats.recorded, stats.written, stats.dropped), (16, 16, 0));
    let stored: Vec<i64> = b
        .journal_read_after("s", 0, 100)
        .await
        .expect("read")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(stored, (1..=15).chain([17]).collect::<Vec<_>>());
    let mut seen = Vec::new();
    while seen.last() != Some(&17) {
        match tokio::time::timeout(deadline(), live.recv()).await {
            Ok(Some(LiveEvent::Event(e))) => seen.push(e.seq),
            Ok(Some(LiveEvent::Pointer { seq })) => seen.push(seq),
            Ok(Some(LiveEvent::Lagged)) => {}
            other => panic!("waiting for live seq 17 after {seen:?}: {other:?}"),
        }
    }
    assert_eq!(
        seen,
        (1..=15).chain([17]).collect::<Vec<_>>(),
        "the refused event is never live"
    );
}
