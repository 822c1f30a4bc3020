//! Fencing: outcomes take effect only for the current lease.

use std::time::Duration;

use postbox_core::{Lease, Message, RetryParams};

use super::{Harness, fetch, publish};
use crate::time::TimeControl;
use postbox_core::prelude::*;

fn forged(lease: Lease) -> Lease {
    Lease {
        token: uuid::Uuid::new_v4(),
        ..lease
    }
}

/// Ack with a wrong token: `false`, row kept.
pub async fn fence_ack_with_a_wrong_token_is_refused<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let d = fetch(b, "q", 1).await.remove(0);
    assert!(!b.ack(forged(d.lease())).await.expect("ack"));
    assert_eq!(b.messages(None).await.expect("messages").len(), 1);
    assert!(b.ack(d.lease()).await.expect("ack"));
}

/// Retry with a wrong token: `false`, attempts and schedule unchanged.
pub async fn fence_retry_with_a_wrong_token_is_refused<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let d = fetch(b, "q", 1).await.remove(0);
    let before = b.messages(None).await.expect("messages");
    assert!(
        !b.retry(
            forged(d.lease()),
            RetryParams::new(Duration::ZERO).error("e")
        )
        .await
        .expect("retry")
    );
    assert_eq!(b.messages(None).await.expect("messages"), before);
}

/// Dead-letter with a wrong token: `false`, nothing moved.
pub async fn fence_dead_letter_with_a_wrong_token_is_refused<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let d = fetch(b, "q", 1).await.remove(0);
    assert!(
        !b.dead_letter(forged(d.lease()), "nope")
            .await
            .expect("dead letter")
    );
    assert!(b.dead_letters(None).await.expect("dead").is_empty());
    assert_eq!(b.messages(None).await.expect("messages").len(), 1);
}

/// Renew and release with a wrong token: `false`.
pub async fn fence_renew_and_release_with_a_wrong_token_are_refused<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let d = fetch(b, "q", 1).await.remove(0);
    assert!(!b.renew_lease(forged(d.lease())).await.expect("renew"));
    assert!(!b.release(forged(d.lease())).await.expect("release"));
    b.advance(Duration::from_secs(31)).await.expect("advance");
    assert_eq!(
        fetch(b, "q", 1).await.len(),
        1,
        "the forged renewal did not extend the lease"
    );
}

/// After a reclaim, the stale holder can neither ack, retry nor dead-letter.
pub async fn fence_stale_holder_cannot_settle_after_a_reclaim<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let stale = fetch(b, "q", 1).await.remove(0);
    b.advance(Duration::from_secs(31)).await.expect("advance");
    let current = fetch(b, "q", 1).await.remove(0);
    assert!(!b.ack(stale.lease()).await.expect("ack"));
    assert!(
        !b.retry(stale.lease(), RetryParams::new(Duration::ZERO))
            .await
            .expect("retry")
    );
    assert!(
        !b.dead_letter(stale.lease(), "stale")
            .await
            .expect("dead letter")
    );
    assert!(!b.renew_lease(stale.lease()).await.expect("renew"));
    assert!(b.ack(current.lease()).await.expect("ack"));
    assert!(b.messages(None).await.expect("messages").is_empty());
}

/// A second ack of the same lease reports `false`.
pub async fn fence_a_second_ack_is_refused<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let d = fetch(b, "q", 1).await.remove(0);
    assert!(b.ack(d.lease()).await.expect("ack"));
    assert!(!b.ack(d.lease()).await.expect("ack"));
    assert!(
        b.ack_batch(&[d.lease()])
            .await
            .expect("ack batch")
            .is_empty()
    );
}

/// Outcomes on ids that never existed report `false`.
pub async fn fence_unknown_ids_are_refused<H: Harness>(h: &H) {
    let b = h.backend();
    let ghost = Lease {
        id: 987_654,
        token: uuid::Uuid::new_v4(),
    };
    assert!(!b.ack(ghost).await.expect("ack"));
    assert!(
        !b.retry(ghost, RetryParams::new(Duration::ZERO))
            .await
            .expect("retry")
    );
    assert!(!b.dead_letter(ghost, "x").await.expect("dead letter"));
    assert!(!b.renew_lease(ghost).await.expect("renew"));
    assert!(!b.release(ghost).await.expect("release"));
    assert!(b.ack_batch(&[ghost]).await.expect("ack batch").is_empty());
    assert!(b.dead_letters(None).await.expect("dead").is_empty());
}

/// A batch ack acks exactly the leases still held.
pub async fn fence_ack_batch_acks_exactly_the_held_leases<H: Harness>(h: &H) {
    let b = h.backend();
    publish(
        b,
        (0..4).map(|i| Message::new("q", i.to_string())).collect(),
    )
    .await;
    let ds = fetch(b, "q", 10).await;
    let leases = [
        ds[0].lease(),
        forged(ds[1].lease()),
        ds[2].lease(),
        ds[3].lease(),
    ];
    let mut acked = b.ack_batch(&leases).await.expect("ack batch");
    acked.sort();
    assert_eq!(acked, [ds[0].id, ds[2].id, ds[3].id]);
    let left: Vec<_> = b
        .messages(None)
        .await
        .expect("messages")
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(left, [ds[1].id]);
}
