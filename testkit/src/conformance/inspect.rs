//! Inspection: stored messages and their states.

use std::time::Duration;

use postbox_core::{Message, MessageState};

use super::{Harness, fetch, publish};
use postbox_core::prelude::*;

/// Stored messages report ready, scheduled and leased by the backend's clock.
pub async fn inspect_reports_ready_scheduled_and_leased<H: Harness>(h: &H) {
    let b = h.backend();
    let p = publish(
        b,
        vec![
            Message::new("q", "leased"),
            Message::new("q", "ready"),
            Message::new("q", "scheduled").delay(Duration::from_secs(3600)),
        ],
    )
    .await;
    fetch(b, "q", 1).await;
    let states: Vec<_> = b
        .messages(None)
        .await
        .expect("messages")
        .iter()
        .map(|m| (m.id, m.state))
        .collect();
    assert_eq!(
        states,
        [
            (p[0], MessageState::Leased),
            (p[1], MessageState::Ready),
            (p[2], MessageState::Scheduled)
        ]
    );
}

/// Listing by queue returns only that queue, in id order; acked messages are gone.
pub async fn inspect_lists_by_queue_and_forgets_acked<H: Harness>(h: &H) {
    let b = h.backend();
    let p = publish(
        b,
        vec![
            Message::new("a", "1"),
            Message::new("b", "2"),
            Message::new("a", "3"),
        ],
    )
    .await;
    let a: Vec<_> = b
        .messages(Some("a"))
        .await
        .expect("messages")
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(a, [p[0], p[2]]);
    let d = fetch(b, "a", 1).await.remove(0);
    assert!(b.ack(d.lease()).await.expect("ack"));
    let a: Vec<_> = b
        .messages(Some("a"))
        .await
        .expect("messages")
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(a, [p[2]]);
}
