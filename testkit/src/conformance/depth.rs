//! Queue depths: messages counted by state per queue, and the oldest ready one's wait.

use std::time::Duration;

use postbox_core::{Depth, Error, Message, QueueDepth};

use super::{Harness, fetch, publish};
use crate::time::TimeControl;
use postbox_core::prelude::*;

fn counts(d: &QueueDepth) -> (&str, i64, i64, i64, i64) {
    (d.queue.as_str(), d.ready, d.scheduled, d.leased, d.dead)
}

/// Ready, scheduled, leased and dead are counted per queue by the backend's clock; the
/// oldest ready message's wait is the queue's lag; queues holding nothing are not listed.
pub async fn depth_counts_each_state_per_queue<H: Harness>(h: &H) {
    let b = h.backend();
    assert!(b.queue_depths(None).await.expect("depths").is_empty());
    publish(
        b,
        vec![
            Message::new("a", "1"),
            Message::new("a", "2"),
            Message::new("a", "3"),
            Message::new("a", "later").delay(Duration::from_secs(60)),
            Message::new("b", "x"),
            Message::new("c", "acked"),
        ],
    )
    .await;
    let leased = fetch(b, "a", 1).await;
    assert_eq!(leased.len(), 1);
    let d = fetch(b, "b", 1).await.remove(0);
    assert!(b.dead_letter(d.lease(), "no").await.expect("dead letter"));
    let c = fetch(b, "c", 1).await.remove(0);
    assert!(b.ack(c.lease()).await.expect("ack"));
    b.advance(Duration::from_secs(5)).await.expect("advance");
    // A message published now is ready too, but the lag is the oldest one's.
    publish(b, vec![Message::new("a", "fresh")]).await;

    let depths = b.queue_depths(None).await.expect("depths");
    assert_eq!(
        depths.iter().map(counts).collect::<Vec<_>>(),
        vec![("a", 3, 1, 1, 0), ("b", 0, 0, 0, 1)],
        "c holds nothing and is not listed"
    );
    let lag = depths[0].oldest_ready.expect("a has ready messages");
    assert!(
        lag >= Duration::from_secs(5) && lag < Duration::from_secs(35),
        "a's oldest ready message has waited the 5 s advanced (and the test's own time): {lag:?}"
    );
    assert_eq!(depths[1].oldest_ready, None, "nothing ready in b");
    assert_eq!(
        b.queue_depths(Some("b")).await.expect("depths"),
        vec![depths[1].clone()]
    );
    assert!(b.queue_depths(Some("c")).await.expect("depths").is_empty());

    // The delay and the lease both run out: the delayed message is ready, the expired lease
    // still counts as leased until a fetch takes it back.
    b.advance(Duration::from_secs(65)).await.expect("advance");
    let a = b.queue_depths(Some("a")).await.expect("depths");
    assert_eq!(
        a.iter().map(counts).collect::<Vec<_>>(),
        vec![("a", 4, 0, 1, 0)]
    );
    let all = fetch(b, "a", 10).await;
    assert_eq!(all.len(), 5, "the expired lease and the four ready");
    let a = b.queue_depths(Some("a")).await.expect("depths");
    assert_eq!(
        a.iter().map(counts).collect::<Vec<_>>(),
        vec![("a", 0, 0, 5, 0)]
    );
    assert_eq!(a[0].oldest_ready, None);
}

/// A bad queue name is refused, as everywhere else.
pub async fn depth_refuses_a_bad_queue_name<H: Harness>(h: &H) {
    let b = h.backend();
    assert!(matches!(
        b.queue_depths(Some("")).await,
        Err(Error::InvalidQueue { .. })
    ));
}
