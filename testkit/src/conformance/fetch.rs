//! Fetching: eligibility, limits, queues, order, tokens.

use std::time::Duration;

use postbox_core::{FetchParams, Message};

use super::{Harness, fetch, ids, publish};
use crate::time::TimeControl;
use postbox_core::prelude::*;

/// At most `limit` messages per fetch.
pub async fn fetch_respects_the_limit<H: Harness>(h: &H) {
    let b = h.backend();
    publish(
        b,
        (0..5).map(|i| Message::new("q", i.to_string())).collect(),
    )
    .await;
    assert_eq!(fetch(b, "q", 2).await.len(), 2);
    assert_eq!(fetch(b, "q", 2).await.len(), 2);
    assert_eq!(fetch(b, "q", 2).await.len(), 1);
    assert!(fetch(b, "q", 2).await.is_empty());
}

/// Messages of other queues are not fetched.
pub async fn fetch_skips_other_queues<H: Harness>(h: &H) {
    let b = h.backend();
    let published = publish(b, vec![Message::new("a", "1"), Message::new("b", "2")]).await;
    assert_eq!(ids(&fetch(b, "b", 10).await), [published[1]]);
    assert_eq!(ids(&fetch(b, "a", 10).await), [published[0]]);
}

/// One fetch can serve several queues, merged in `(next_attempt_at, id)` order.
pub async fn fetch_merges_several_queues_in_order<H: Harness>(h: &H) {
    let b = h.backend();
    let now = b.now().await.expect("now");
    let at = |s: i64| now - chrono::Duration::seconds(s);
    let p = publish(
        b,
        vec![
            Message::new("x", "").not_before(at(5)),
            Message::new("y", "").not_before(at(50)),
            Message::new("x", "").not_before(at(40)),
            Message::new("z", "").not_before(at(60)),
            Message::new("y", "").not_before(at(1)),
        ],
    )
    .await;
    let got = b
        .fetch(&FetchParams::new(["x", "y"], 3))
        .await
        .expect("fetch");
    assert_eq!(ids(&got), [p[1], p[2], p[0]]);
}

/// Order is `next_attempt_at` first, then id.
pub async fn fetch_orders_by_next_attempt_then_id<H: Harness>(h: &H) {
    let b = h.backend();
    let now = b.now().await.expect("now");
    let p = publish(
        b,
        vec![
            Message::new("q", "1").not_before(now - chrono::Duration::seconds(1)),
            Message::new("q", "2").not_before(now - chrono::Duration::seconds(9)),
            Message::new("q", "3").not_before(now - chrono::Duration::seconds(9)),
            Message::new("q", "4").not_before(now - chrono::Duration::seconds(5)),
        ],
    )
    .await;
    assert_eq!(ids(&fetch(b, "q", 10).await), [p[1], p[2], p[3], p[0]]);
}

/// A fetch leases its batch under one token; another fetch uses another token.
pub async fn fetch_uses_one_fresh_token_per_batch<H: Harness>(h: &H) {
    let b = h.backend();
    publish(
        b,
        (0..4).map(|i| Message::new("q", i.to_string())).collect(),
    )
    .await;
    let first = fetch(b, "q", 2).await;
    let second = fetch(b, "q", 2).await;
    assert_eq!(first[0].token, first[1].token);
    assert_eq!(second[0].token, second[1].token);
    assert_ne!(first[0].token, second[0].token);
}

/// A delivery counts itself and stamps the first attempt.
pub async fn fetch_counts_deliveries_and_stamps_the_first_attempt<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let first = fetch(b, "q", 1).await.remove(0);
    assert_eq!((first.deliveries, first.attempts), (1, 0));
    assert_eq!(first.first_attempt_at, first.acquired_at);
    b.advance(Duration::from_secs(31)).await.expect("advance");
    let second = fetch(b, "q", 1).await.remove(0);
    assert_eq!(second.deliveries, 2);
    assert_eq!(second.first_attempt_at, first.first_attempt_at);
    assert!(second.acquired_at > first.acquired_at);
}

/// An empty queue list, a zero limit and bad queue names are rejected.
pub async fn fetch_rejects_bad_parameters<H: Harness>(h: &H) {
    let b = h.backend();
    let none: [&str; 0] = [];
    for params in [
        FetchParams::new(none, 1),
        FetchParams::new(["q"], 0),
        FetchParams::new([""], 1),
        FetchParams::new(["q"], 1).max_deliveries(0),
    ] {
        assert!(b.fetch(&params).await.is_err(), "{params:?}");
    }
}

/// A leased message is not handed out again while its lease is fresh.
pub async fn fetch_does_not_repeat_a_fresh_lease<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    assert_eq!(fetch(b, "q", 10).await.len(), 1);
    b.advance(Duration::from_secs(29)).await.expect("advance");
    assert!(fetch(b, "q", 10).await.is_empty());
}
