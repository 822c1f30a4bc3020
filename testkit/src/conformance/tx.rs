//! Publishing and transactions.

use std::time::Duration;

use postbox_core::{Error, Message, MessageState};

use super::{Harness, fetch, ids, publish};
use crate::time::TimeControl;
use postbox_core::prelude::*;

/// A committed publish is fetchable.
pub async fn tx_committed_publish_is_fetchable<H: Harness>(h: &H) {
    let b = h.backend();
    let published = publish(b, vec![Message::new("q", "a")]).await;
    assert_eq!(ids(&fetch(b, "q", 10).await), published);
}

/// A rolled-back publish is never delivered.
pub async fn tx_rolled_back_publish_is_never_fetched<H: Harness>(h: &H) {
    let b = h.backend();
    let mut tx = b.begin().await.expect("begin");
    b.publish(&mut tx, Message::new("q", "a"))
        .await
        .expect("publish");
    b.publish_batch(&mut tx, vec![Message::new("q", "b")])
        .await
        .expect("publish");
    b.rollback(tx).await.expect("rollback");
    assert!(fetch(b, "q", 10).await.is_empty());
    assert!(b.messages(None).await.expect("messages").is_empty());
}

/// Dropping a transaction rolls it back.
pub async fn tx_dropped_transaction_rolls_back<H: Harness>(h: &H) {
    let b = h.backend();
    {
        let mut tx = b.begin().await.expect("begin");
        b.publish(&mut tx, Message::new("q", "a"))
            .await
            .expect("publish");
    }
    assert!(fetch(b, "q", 10).await.is_empty());
}

/// Until commit, a publish is invisible to fetch.
pub async fn tx_uncommitted_publish_is_invisible<H: Harness>(h: &H) {
    let b = h.backend();
    let mut tx = b.begin().await.expect("begin");
    let id = b
        .publish(&mut tx, Message::new("q", "a"))
        .await
        .expect("publish");
    assert!(fetch(b, "q", 10).await.is_empty(), "visible before commit");
    b.commit(tx).await.expect("commit");
    assert_eq!(ids(&fetch(b, "q", 10).await), [id]);
}

/// A batch returns one id per message, ascending in input order, and stores each payload.
pub async fn tx_batch_returns_ids_in_input_order<H: Harness>(h: &H) {
    let b = h.backend();
    let published = publish(
        b,
        (0..5).map(|i| Message::new("q", format!("m{i}"))).collect(),
    )
    .await;
    assert_eq!(published.len(), 5);
    assert!(published.windows(2).all(|w| w[0] < w[1]), "{published:?}");
    let stored = b.messages(Some("q")).await.expect("messages");
    for (i, m) in stored.iter().enumerate() {
        assert_eq!(
            (m.id, m.payload.as_slice()),
            (published[i], format!("m{i}").as_bytes())
        );
    }
}

/// An empty batch writes nothing.
pub async fn tx_empty_batch_is_a_no_op<H: Harness>(h: &H) {
    let b = h.backend();
    assert!(publish(b, Vec::new()).await.is_empty());
    assert!(b.messages(None).await.expect("messages").is_empty());
}

/// Empty, over-long and NUL-containing queue names are rejected and nothing is written.
pub async fn tx_invalid_queue_is_rejected_and_nothing_written<H: Harness>(h: &H) {
    let b = h.backend();
    let mut tx = b.begin().await.expect("begin");
    for bad in [String::new(), "q".repeat(256), "a\0b".to_owned()] {
        let err = b
            .publish(&mut tx, Message::new(bad.clone(), "x"))
            .await
            .expect_err("bad queue");
        assert!(matches!(err, Error::InvalidQueue { .. }), "{err}");
        let err = b
            .publish_batch(
                &mut tx,
                vec![Message::new("ok", "x"), Message::new(bad, "y")],
            )
            .await
            .expect_err("bad queue in batch");
        assert!(matches!(err, Error::InvalidQueue { .. }), "{err}");
    }
    b.commit(tx).await.expect("commit");
    assert!(b.messages(None).await.expect("messages").is_empty());
}

/// Headers round-trip; an explicit correlation id wins, a missing one is generated.
pub async fn tx_headers_and_correlation_ids_round_trip<H: Harness>(h: &H) {
    let b = h.backend();
    let explicit = uuid::Uuid::new_v4();
    publish(
        b,
        vec![
            Message::new("q", "a")
                .header("tenant", "acme")
                .header("n", 7)
                .correlation_id(explicit),
            Message::new("q", "b"),
            Message::new("q", "c"),
        ],
    )
    .await;
    let got = fetch(b, "q", 10).await;
    let headers = got[0].headers.clone().expect("headers");
    assert_eq!(
        (headers["tenant"].as_str(), headers["n"].as_i64()),
        (Some("acme"), Some(7))
    );
    assert_eq!(got[0].correlation_id, explicit);
    assert!(got[1].headers.is_none());
    assert!(!got[1].correlation_id.is_nil());
    assert_ne!(got[1].correlation_id, got[2].correlation_id);
}

/// A delayed message is scheduled, and becomes eligible once the delay has passed.
pub async fn tx_delayed_message_waits_for_its_delay<H: Harness>(h: &H) {
    let b = h.backend();
    publish(
        b,
        vec![Message::new("q", "later").delay(Duration::from_secs(60))],
    )
    .await;
    assert!(fetch(b, "q", 10).await.is_empty());
    assert_eq!(
        b.messages(None).await.expect("messages")[0].state,
        MessageState::Scheduled
    );
    b.advance(Duration::from_secs(59)).await.expect("advance");
    assert!(fetch(b, "q", 10).await.is_empty(), "59 s < 60 s");
    b.advance(Duration::from_secs(2)).await.expect("advance");
    assert_eq!(fetch(b, "q", 10).await.len(), 1);
}

/// `not_before` holds a message until that instant.
pub async fn tx_not_before_is_respected<H: Harness>(h: &H) {
    let b = h.backend();
    let at = b.now().await.expect("now") + chrono::Duration::minutes(10);
    publish(b, vec![Message::new("q", "x").not_before(at)]).await;
    b.advance(Duration::from_secs(9 * 60))
        .await
        .expect("advance");
    assert!(fetch(b, "q", 10).await.is_empty());
    b.advance(Duration::from_secs(61)).await.expect("advance");
    let got = fetch(b, "q", 10).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].next_attempt_at, at);
}
