//! Dead letters.

use postbox_core::Message;

use super::{Harness, fetch, publish};
use postbox_core::prelude::*;

/// Dead-lettering moves the message, payload and headers included, with its reason.
pub async fn dead_letter_moves_the_message_with_its_reason<H: Harness>(h: &H) {
    let b = h.backend();
    let corr = uuid::Uuid::new_v4();
    publish(
        b,
        vec![
            Message::new("q", "body")
                .header("k", "v")
                .correlation_id(corr),
        ],
    )
    .await;
    let d = fetch(b, "q", 1).await.remove(0);
    assert!(
        b.dead_letter(d.lease(), "malformed")
            .await
            .expect("dead letter")
    );
    let dead = b.dead_letters(Some("q")).await.expect("dead");
    assert_eq!(dead.len(), 1);
    let x = &dead[0];
    assert_eq!(
        (
            x.id,
            x.queue.as_str(),
            x.payload.as_slice(),
            x.reason.as_str()
        ),
        (d.id, "q", &b"body"[..], "malformed")
    );
    assert_eq!(x.correlation_id, corr);
    assert_eq!(
        x.headers
            .as_ref()
            .and_then(|h| h.get("k"))
            .and_then(|v| v.as_str()),
        Some("v")
    );
    assert_eq!(
        (x.attempts, x.deliveries),
        (1, 1),
        "the rejection counts as an attempt"
    );
    assert!(b.messages(None).await.expect("messages").is_empty());
}

/// Dead letters are never fetched again.
pub async fn dead_letters_are_never_fetched<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let d = fetch(b, "q", 1).await.remove(0);
    assert!(b.dead_letter(d.lease(), "no").await.expect("dead letter"));
    assert!(fetch(b, "q", 10).await.is_empty());
    assert!(
        !b.dead_letter(d.lease(), "twice")
            .await
            .expect("dead letter")
    );
    assert_eq!(b.dead_letters(None).await.expect("dead").len(), 1);
}

/// Dead letters are listed per queue.
pub async fn dead_letters_are_listed_per_queue<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("a", "1"), Message::new("b", "2")]).await;
    for q in ["a", "b"] {
        let d = fetch(b, q, 1).await.remove(0);
        assert!(b.dead_letter(d.lease(), q).await.expect("dead letter"));
    }
    let a = b.dead_letters(Some("a")).await.expect("dead");
    assert_eq!((a.len(), a[0].reason.as_str()), (1, "a"));
    assert_eq!(b.dead_letters(None).await.expect("dead").len(), 2);
}
