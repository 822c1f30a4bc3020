//! Leases: expiry, renewal, release, crash loops.

use std::time::Duration;

use postbox_core::{FetchParams, Message};

use super::{Harness, fetch, ids, publish};
use crate::time::TimeControl;
use postbox_core::prelude::*;

/// An expired lease is taken again under a new token.
pub async fn lease_expired_is_reclaimed_with_a_new_token<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let first = fetch(b, "q", 1).await.remove(0);
    b.advance(Duration::from_secs(31)).await.expect("advance");
    let again = fetch(b, "q", 1).await.remove(0);
    assert_eq!(again.id, first.id);
    assert_ne!(again.token, first.token);
}

/// Only expired leases come back; fresh ones stay with their holder.
pub async fn lease_only_expired_ones_come_back<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "old")]).await;
    let old = fetch(b, "q", 1).await.remove(0);
    b.advance(Duration::from_secs(20)).await.expect("advance");
    publish(b, vec![Message::new("q", "new")]).await;
    let new = fetch(b, "q", 1).await.remove(0);
    b.advance(Duration::from_secs(15)).await.expect("advance");
    // 35 s after the first lease, 15 s after the second: only the first expired.
    assert_eq!(ids(&fetch(b, "q", 10).await), [old.id]);
    assert_ne!(old.id, new.id);
}

/// A renewed lease outlives its original TTL.
pub async fn lease_renewal_outlives_the_original_ttl<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let d = fetch(b, "q", 1).await.remove(0);
    b.advance(Duration::from_secs(25)).await.expect("advance");
    assert!(b.renew_lease(d.lease()).await.expect("renew"));
    b.advance(Duration::from_secs(25)).await.expect("advance");
    assert!(
        fetch(b, "q", 1).await.is_empty(),
        "50 s after fetch, 25 s after renewal"
    );
    assert!(b.ack(d.lease()).await.expect("ack"));
}

/// A released message is fetchable at once and the release does not count as a delivery.
pub async fn lease_release_gives_the_message_back_uncounted<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let d = fetch(b, "q", 1).await.remove(0);
    assert!(b.release(d.lease()).await.expect("release"));
    let again = fetch(b, "q", 1).await.remove(0);
    assert_eq!((again.id, again.deliveries, again.attempts), (d.id, 1, 0));
    assert!(
        !b.ack(d.lease()).await.expect("ack"),
        "the released lease is gone"
    );
}

/// A message leased `max_deliveries` times without an outcome is dead-lettered, not leased.
pub async fn lease_max_deliveries_dead_letters_a_crash_loop<H: Harness>(h: &H) {
    let b = h.backend();
    let p = publish(
        b,
        vec![Message::new("q", "poison"), Message::new("q", "fine")],
    )
    .await;
    let params = FetchParams::new(["q"], 1).max_deliveries(2);
    for _ in 0..2 {
        assert_eq!(ids(&b.fetch(&params).await.expect("fetch")), [p[0]]);
        b.advance(Duration::from_secs(31)).await.expect("advance");
    }
    // The fetch that finds it exhausted buries it (and hands out nothing in its place).
    assert!(b.fetch(&params).await.expect("fetch").is_empty());
    assert_eq!(
        ids(&b.fetch(&params).await.expect("fetch")),
        [p[1]],
        "the next one is served"
    );
    let dead = b.dead_letters(None).await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].id, dead[0].deliveries, dead[0].attempts),
        (p[0], 2, 0)
    );
    assert!(
        dead[0].reason.contains("max_deliveries"),
        "{}",
        dead[0].reason
    );
}
