//! Dead-letter redrive: requeue and purge by a filter.

use std::collections::BTreeSet;
use std::time::Duration;

use postbox_core::topic::Settlement;
use postbox_core::{
    Backend, DeadFilter, Error, Message, MessageId, MessageState, Redrive, RetryParams, Topics,
};

use super::topics::{leases, publish_to, receive};
use super::{Harness, fetch, ids, publish};
use crate::time::TimeControl;
use postbox_core::prelude::*;

/// Publishes one message per `(queue, reason)` and dead-letters it with that reason; returns
/// the ids in the same order.
async fn bury<B: Backend>(b: &B, letters: &[(&str, &str)]) -> Vec<MessageId> {
    let mut out = Vec::new();
    for (queue, reason) in letters {
        let id = publish(b, vec![Message::new(*queue, format!("{queue}/{reason}"))]).await[0];
        let d = fetch(b, queue, 1).await.remove(0);
        assert_eq!(d.id, id, "the only ready message of {queue}");
        assert!(b.dead_letter(d.lease(), reason).await.expect("dead letter"));
        out.push(id);
    }
    out
}

async fn dead_ids<B: Backend>(b: &B) -> Vec<MessageId> {
    let dead = b.dead_letters(None).await.expect("dead letters");
    dead.iter().map(|d| d.id).collect()
}

/// A requeued dead letter is a ready message again: same id, queue, payload, headers and
/// correlation id, its attempts and deliveries cleared; it leaves the dead-letter table.
pub async fn redrive_requeue_puts_dead_letters_back_ready_and_fresh<H: Harness>(h: &H) {
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
    let first = fetch(b, "q", 1).await.remove(0);
    assert!(
        b.retry(
            first.lease(),
            RetryParams::new(Duration::ZERO).error("flaky")
        )
        .await
        .expect("retry")
    );
    let second = fetch(b, "q", 1).await.remove(0);
    assert!(
        b.dead_letter(second.lease(), "rejected")
            .await
            .expect("dead letter")
    );

    let requeued = b.requeue_dead(&DeadFilter::all()).await.expect("requeue");
    assert_eq!(requeued, vec![first.id]);
    assert!(
        dead_ids(b).await.is_empty(),
        "requeued letters leave the table"
    );
    let stored = b.messages(Some("q")).await.expect("messages");
    assert_eq!(stored.len(), 1);
    let m = &stored[0];
    assert_eq!(
        (
            m.id,
            m.state,
            m.attempts,
            m.deliveries,
            m.last_error.as_deref()
        ),
        (first.id, MessageState::Ready, 0, 0, None),
        "ready at once, its history cleared"
    );
    assert_eq!(m.created_at, first.created_at, "the publish time is kept");

    let again = fetch(b, "q", 1).await.remove(0);
    assert_eq!(
        (again.id, again.payload.as_slice(), again.correlation_id),
        (first.id, &b"body"[..], corr)
    );
    assert_eq!(
        again
            .headers
            .as_ref()
            .and_then(|h| h.get("k"))
            .and_then(|v| v.as_str()),
        Some("v")
    );
    assert_eq!((again.attempts, again.deliveries), (0, 1));
    assert!(
        !b.ack(second.lease()).await.expect("stale ack"),
        "the lease that dead-lettered it stays fenced"
    );
    assert!(b.ack(again.lease()).await.expect("ack"));
    assert!(b.messages(None).await.expect("messages").is_empty());
}

/// Ids, queue, reason text and age narrow the selection; every condition must hold.
pub async fn redrive_filters_by_ids_queue_reason_and_age<H: Harness>(h: &H) {
    let b = h.backend();
    let old = bury(b, &[("a", "timeout calling x"), ("b", "timeout calling x")]).await;
    b.advance(Duration::from_secs(600)).await.expect("advance");
    let new = bury(b, &[("a", "bad input"), ("a", "timeout calling y")]).await;
    let (a_old, b_old, a_bad, a_new) = (old[0], old[1], new[0], new[1]);

    let filter = DeadFilter::all().queue("a").reason_contains("timeout");
    assert_eq!(
        b.requeue_dead(&filter.clone().older_than(Duration::from_secs(3_600)))
            .await
            .expect("requeue"),
        Vec::<MessageId>::new(),
        "nothing is an hour old"
    );
    assert_eq!(
        b.requeue_dead(&filter.clone().older_than(Duration::from_secs(300)))
            .await
            .expect("requeue"),
        vec![a_old],
        "only the old timeout of a"
    );
    assert_eq!(
        b.requeue_dead(&DeadFilter::ids([b_old, a_bad, 999_999]).queue("a"))
            .await
            .expect("requeue"),
        vec![a_bad],
        "ids and queue both hold; an unknown id selects nothing"
    );
    assert_eq!(
        b.requeue_dead(&DeadFilter::all().reason_contains("Timeout"))
            .await
            .expect("requeue"),
        Vec::<MessageId>::new(),
        "the reason text is case-sensitive"
    );
    assert_eq!(
        b.requeue_dead(&DeadFilter::ids([])).await.expect("requeue"),
        Vec::<MessageId>::new(),
        "no ids select nothing"
    );
    let mut left = vec![b_old, a_new];
    left.sort_unstable();
    assert_eq!(dead_ids(b).await, left);
    let ready: BTreeSet<MessageId> = b
        .messages(None)
        .await
        .expect("messages")
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ready, BTreeSet::from([a_old, a_bad]));
}

/// A purge deletes exactly what the filter selects, for good.
pub async fn redrive_purge_deletes_only_what_the_filter_selects<H: Harness>(h: &H) {
    let b = h.backend();
    let buried = bury(b, &[("a", "x"), ("a", "y"), ("b", "x")]).await;
    assert_eq!(
        b.purge_dead(&DeadFilter::all().reason_contains("x"))
            .await
            .expect("purge"),
        vec![buried[0], buried[2]]
    );
    assert_eq!(dead_ids(b).await, vec![buried[1]]);
    assert!(b.messages(None).await.expect("messages").is_empty());
    assert!(fetch(b, "a", 10).await.is_empty(), "purged, not requeued");
    assert_eq!(
        b.purge_dead(&DeadFilter::all()).await.expect("purge"),
        vec![buried[1]]
    );
    assert!(dead_ids(b).await.is_empty());
}

/// Two requeues racing over the same letters split them: each is requeued once.
pub async fn redrive_racing_requeues_move_each_letter_once<H: Harness>(h: &H) {
    let b = h.backend();
    let buried = bury(b, &[("q", "r"), ("q", "r"), ("q", "r"), ("q", "r")]).await;
    let all = DeadFilter::all();
    let (one, two) = tokio::join!(b.requeue_dead(&all), b.requeue_dead(&all));
    let (one, two) = (one.expect("requeue"), two.expect("requeue"));
    let mut both: Vec<MessageId> = one.iter().chain(&two).copied().collect();
    both.sort_unstable();
    assert_eq!(
        both, buried,
        "each letter by exactly one call: {one:?} / {two:?}"
    );
    let got = ids(&fetch(b, "q", 10).await);
    assert_eq!(got, buried, "each requeued once");
}

/// A filter no backend could match is refused before anything moves.
pub async fn redrive_refuses_bad_filters_and_changes_nothing<H: Harness>(h: &H) {
    let b = h.backend();
    let buried = bury(b, &[("q", "r")]).await;
    let bad = [
        DeadFilter::all().queue(""),
        DeadFilter::all().reason_contains("a\0b"),
        DeadFilter::all().older_than(postbox_core::MAX_DELAY + Duration::from_secs(1)),
    ];
    for filter in bad {
        for requeue in [true, false] {
            let result = if requeue {
                b.requeue_dead(&filter).await
            } else {
                b.purge_dead(&filter).await
            };
            assert!(
                matches!(
                    result,
                    Err(Error::InvalidArgument(_) | Error::InvalidQueue { .. })
                ),
                "{filter:?} (requeue: {requeue}): {result:?}"
            );
        }
    }
    assert_eq!(dead_ids(b).await, buried);
}

/// Dead-letters every message `subscription` has due; returns their ids.
async fn bury_in<B: Topics>(b: &B, subscription: &str, reason: &str) -> Vec<MessageId> {
    let got = receive(b, subscription, 100).await;
    b.settle(&leases(&got), Settlement::DeadLetter(reason.into()))
        .await
        .expect("dead letter")
}

async fn sub_dead_ids<B: Topics>(b: &B, subscription: &str) -> Vec<MessageId> {
    let mut dead: Vec<MessageId> = b
        .subscription_dead_letters(subscription)
        .await
        .expect("dead letters")
        .iter()
        .map(|d| d.id)
        .collect();
    dead.sort_unstable();
    dead
}

/// A subscription's dead letters are requeued in that subscription only: due at once, their
/// history cleared; the other subscriptions of the topic and the queues are untouched.
pub async fn redrive_requeues_a_subscriptions_dead_letters_in_it_alone<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("t", "a").await.expect("subscribe");
    b.subscribe("t", "b").await.expect("subscribe");
    let published = publish_to(b, vec![Message::new("t", "1"), Message::new("t", "2")]).await;
    assert_eq!(bury_in(b, "a", "a broke").await, published);
    assert_eq!(bury_in(b, "b", "b broke").await, published);
    let queue_letter = bury(b, &[("t", "a broke")]).await;

    let filter = DeadFilter::ids([published[1]])
        .reason_contains("broke")
        .queue("t");
    assert_eq!(
        b.requeue_subscription_dead("a", &filter)
            .await
            .expect("requeue"),
        vec![published[1]]
    );
    assert_eq!(sub_dead_ids(b, "a").await, vec![published[0]]);
    assert_eq!(sub_dead_ids(b, "b").await, published, "b untouched");
    assert_eq!(
        dead_ids(b).await,
        queue_letter,
        "the queue's letters untouched"
    );
    let again = receive(b, "a", 10).await;
    assert_eq!(ids(&again), vec![published[1]]);
    assert_eq!(
        (again[0].attempts, again[0].deliveries),
        (0, 1),
        "history cleared"
    );
    assert!(receive(b, "b", 10).await.is_empty());
    assert_eq!(
        b.settle(&leases(&again), Settlement::Ack)
            .await
            .expect("ack"),
        vec![published[1]]
    );
    assert!(
        b.requeue_subscription_dead("unknown", &DeadFilter::all())
            .await
            .expect("requeue")
            .is_empty(),
        "an unknown subscription selects nothing"
    );
    assert!(matches!(
        b.requeue_subscription_dead("", &DeadFilter::all()).await,
        Err(Error::InvalidQueue { .. })
    ));
}

/// A subscription's purge deletes what the filter selects there, by age too.
pub async fn redrive_purges_a_subscriptions_dead_letters<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("t", "a").await.expect("subscribe");
    let old = publish_to(b, vec![Message::new("t", "old")]).await;
    bury_in(b, "a", "x").await;
    b.advance(Duration::from_secs(600)).await.expect("advance");
    let new = publish_to(b, vec![Message::new("t", "new")]).await;
    bury_in(b, "a", "x").await;
    assert_eq!(
        b.purge_subscription_dead("a", &DeadFilter::all().older_than(Duration::from_secs(300)))
            .await
            .expect("purge"),
        old
    );
    assert_eq!(sub_dead_ids(b, "a").await, new);
    assert!(receive(b, "a", 10).await.is_empty(), "purged, not requeued");
    assert_eq!(
        b.purge_subscription_dead("a", &DeadFilter::all())
            .await
            .expect("purge"),
        new
    );
    assert!(sub_dead_ids(b, "a").await.is_empty());
    let info = b.subscriptions(Some("t")).await.expect("list");
    assert_eq!((info[0].backlog, info[0].dead_letters), (0, 0));
}
