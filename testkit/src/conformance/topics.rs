//! Topics and subscriptions: fan-out, isolation between subscriptions, receivers sharing one
//! subscription, leases, retries and dead letters per subscription.

use std::collections::BTreeSet;
use std::time::Duration;

use postbox_core::topic::{
    EXPIRED_BATCH_CHECK, Published, Receive, Settlement, Subscribed, Unsubscribe,
};
use postbox_core::{Delivery, Error, FetchParams, Lease, Message, MessageId, RetryParams, Topics};

use super::{Harness, ids};
use crate::time::TimeControl;
use postbox_core::prelude::*;

/// Publishes `messages` to their topics in one committed transaction; returns their ids.
pub(super) async fn publish_to<B: Topics>(b: &B, messages: Vec<Message>) -> Vec<MessageId> {
    let mut tx = b.begin().await.expect("begin");
    let ids = b
        .publish_to_topics(&mut tx, messages)
        .await
        .expect("publish");
    b.commit(tx).await.expect("commit");
    ids.into_iter().map(Published::id).collect()
}

/// `n` messages to `topic`, payloads `0..n`.
fn many(topic: &str, n: usize) -> Vec<Message> {
    (0..n).map(|i| Message::new(topic, i.to_string())).collect()
}

pub(super) async fn receive<B: Topics>(b: &B, subscription: &str, limit: u32) -> Vec<Delivery> {
    b.receive(&Receive::new(subscription, limit))
        .await
        .expect("receive")
}

pub(super) fn leases(deliveries: &[Delivery]) -> Vec<Lease> {
    deliveries.iter().map(Delivery::lease).collect()
}

async fn ack<B: Topics>(b: &B, deliveries: &[Delivery]) -> Vec<MessageId> {
    b.settle(&leases(deliveries), Settlement::Ack)
        .await
        .expect("ack")
}

/// Receives and acks until the subscription has nothing due; the ids in order of receipt.
pub(super) async fn drain<B: Topics>(b: &B, subscription: &str) -> Vec<MessageId> {
    let mut seen = Vec::new();
    loop {
        let got = receive(b, subscription, 5).await;
        if got.is_empty() {
            return seen;
        }
        assert_eq!(
            ack(b, &got).await.len(),
            got.len(),
            "every ack takes effect"
        );
        seen.extend(ids(&got));
    }
}

/// Every subscription of a topic receives every message, in publish order, once.
pub async fn topic_fan_out_delivers_every_message_to_every_subscription<H: Harness>(h: &H) {
    let b = h.backend();
    for s in ["mail", "stats", "audit"] {
        assert_eq!(
            b.subscribe("events", s).await.expect("subscribe"),
            Subscribed::New
        );
    }
    let published = publish_to(b, many("events", 12)).await;
    for s in ["mail", "stats", "audit"] {
        assert_eq!(drain(b, s).await, published, "subscription {s}");
    }
}

/// A subscription receives what commits after it was created, and nothing from before.
pub async fn topic_late_subscription_receives_only_later_commits<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("t", "early").await.expect("subscribe");
    let before = publish_to(b, many("t", 3)).await;
    b.subscribe("t", "late").await.expect("subscribe");
    let after = publish_to(b, many("t", 2)).await;
    assert_eq!(drain(b, "late").await, after);
    let all: Vec<MessageId> = before.iter().chain(&after).copied().collect();
    assert_eq!(drain(b, "early").await, all);
}

/// A rolled-back publish reaches no subscription; an uncommitted one is invisible.
pub async fn topic_rollback_drops_every_copy<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("t", "a").await.expect("subscribe");
    b.subscribe("t", "b").await.expect("subscribe");
    let mut tx = b.begin().await.expect("begin");
    b.publish_to_topics(&mut tx, many("t", 3))
        .await
        .expect("publish");
    assert!(receive(b, "a", 10).await.is_empty(), "not committed yet");
    b.rollback(tx).await.expect("rollback");
    let kept = publish_to(b, many("t", 1)).await;
    assert_eq!(drain(b, "a").await, kept);
    assert_eq!(drain(b, "b").await, kept);
}

/// Topics and queues are apart: a queue's messages reach no subscription, a topic's no fetch.
pub async fn topic_and_queue_of_one_name_do_not_mix<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("orders", "s").await.expect("subscribe");
    super::publish(b, vec![Message::new("orders", "queued")]).await;
    let to_topic = publish_to(b, vec![Message::new("orders", "published")]).await;
    assert_eq!(drain(b, "s").await, to_topic);
    let fetched = b
        .fetch(&FetchParams::new(["orders"], 10))
        .await
        .expect("fetch");
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].payload, b"queued");
}

/// `subscribe` is idempotent, concurrent first calls create one subscription, and a name
/// belongs to one topic.
pub async fn topic_subscribe_is_idempotent_and_race_free<H: Harness>(h: &H) {
    let b = h.backend();
    let calls = (0..8).map(|_| {
        let b = b.clone();
        async move { b.subscribe("t", "s").await.expect("subscribe") }
    });
    let outcomes = futures_util::future::join_all(calls).await;
    assert_eq!(
        outcomes.iter().filter(|o| **o == Subscribed::New).count(),
        1,
        "{outcomes:?}"
    );
    match b.subscribe("other", "s").await {
        Err(Error::SubscriptionTopic { existing, .. }) => assert_eq!(existing, "t"),
        other => panic!("expected SubscriptionTopic, got {other:?}"),
    }
    let listed = b.subscriptions(None).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].name.as_str(), listed[0].topic.as_str()),
        ("s", "t")
    );
}

/// Unsubscribing drops what was pending for that subscription only; `IfDrained` refuses
/// while anything is unprocessed.
pub async fn topic_unsubscribe_with_pending_messages<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("t", "keep").await.expect("subscribe");
    b.subscribe("t", "drop").await.expect("subscribe");
    let published = publish_to(b, many("t", 4)).await;
    let held = receive(b, "drop", 1).await;
    assert_eq!(held.len(), 1);
    match b.unsubscribe("drop", Unsubscribe::IfDrained).await {
        Err(Error::SubscriptionNotDrained { backlog, .. }) => assert_eq!(backlog, 4),
        other => panic!("expected SubscriptionNotDrained, got {other:?}"),
    }
    assert!(
        b.unsubscribe("drop", Unsubscribe::Discard)
            .await
            .expect("unsubscribe")
    );
    assert!(
        !b.unsubscribe("drop", Unsubscribe::Discard)
            .await
            .expect("unsubscribe"),
        "gone already"
    );
    assert!(
        ack(b, &held).await.is_empty(),
        "a lease of a dropped subscription settles nothing"
    );
    assert!(matches!(
        b.receive(&Receive::new("drop", 1)).await,
        Err(Error::UnknownSubscription { .. })
    ));
    assert_eq!(drain(b, "keep").await, published);
    assert!(
        b.unsubscribe("keep", Unsubscribe::IfDrained)
            .await
            .expect("drained")
    );
}

/// A retry in one subscription is invisible to another, and comes back after its delay on
/// the backend's clock with the attempt and error recorded.
pub async fn topic_retry_is_isolated_per_subscription<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("t", "a").await.expect("subscribe");
    b.subscribe("t", "b").await.expect("subscribe");
    let published = publish_to(b, many("t", 3)).await;
    let got = receive(b, "a", 10).await;
    let retry = RetryParams::new(Duration::from_secs(60)).error("smtp down");
    assert_eq!(
        b.settle(&leases(&got[..1]), Settlement::Retry(retry))
            .await
            .expect("retry"),
        vec![got[0].id]
    );
    assert_eq!(ack(b, &got[1..]).await.len(), 2);
    assert_eq!(
        drain(b, "b").await,
        published,
        "b is untouched by a's retry"
    );
    assert!(receive(b, "a", 10).await.is_empty(), "not due yet");
    b.advance(Duration::from_secs(61)).await.expect("advance");
    let again = receive(b, "a", 10).await;
    assert_eq!(ids(&again), vec![published[0]]);
    assert_eq!((again[0].attempts, again[0].deliveries), (1, 2));
    assert_eq!(again[0].last_error.as_deref(), Some("smtp down"));
    assert_eq!(ack(b, &again).await, vec![published[0]]);
    assert_eq!(b.subscriptions(None).await.expect("list")[0].backlog, 0);
}

/// Dead letters belong to their subscription: listed there, never received again, and the
/// other subscriptions still process the message.
pub async fn topic_dead_letter_is_isolated_per_subscription<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("t", "a").await.expect("subscribe");
    b.subscribe("t", "b").await.expect("subscribe");
    let published = publish_to(b, vec![Message::new("t", "body").header("k", "v")]).await;
    let got = receive(b, "a", 10).await;
    assert_eq!(
        b.settle(&leases(&got), Settlement::DeadLetter("malformed".into()))
            .await
            .expect("dead letter"),
        published
    );
    assert!(receive(b, "a", 10).await.is_empty());
    let dead = b.subscription_dead_letters("a").await.expect("dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].id, dead[0].queue.as_str(), dead[0].reason.as_str()),
        (published[0], "t", "malformed")
    );
    assert_eq!((dead[0].attempts, dead[0].deliveries), (1, 1));
    assert!(
        dead[0]
            .headers
            .as_ref()
            .is_some_and(|h| h.contains_key("k"))
    );
    assert!(
        b.subscription_dead_letters("b")
            .await
            .expect("dead")
            .is_empty()
    );
    assert_eq!(drain(b, "b").await, published);
    let a = b
        .subscriptions(Some("t"))
        .await
        .expect("list")
        .into_iter()
        .find(|s| s.name == "a")
        .expect("a listed");
    assert_eq!((a.backlog, a.dead_letters), (0, 1));
}

/// Receivers sharing one subscription split its messages: each message to one of them.
pub async fn topic_receivers_split_a_subscription_without_duplicates<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("t", "workers").await.expect("subscribe");
    let published: BTreeSet<MessageId> = publish_to(b, many("t", 60)).await.into_iter().collect();
    let receivers = (0..3).map(|r| {
        let b = b.clone();
        async move {
            let mut mine = Vec::new();
            loop {
                let got = b
                    .receive(&Receive::new("workers", 4).holder(format!("r{r}")))
                    .await
                    .expect("receive");
                if got.is_empty() {
                    return mine;
                }
                assert!(
                    got.iter()
                        .all(|d| d.acquired_by.as_deref() == Some(&*format!("r{r}")))
                );
                mine.extend(ack(&b, &got).await);
            }
        }
    });
    let all: Vec<MessageId> = futures_util::future::join_all(receivers)
        .await
        .into_iter()
        .flatten()
        .collect();
    let distinct: BTreeSet<MessageId> = all.iter().copied().collect();
    assert_eq!(all.len(), distinct.len(), "no message acked twice");
    assert_eq!(distinct, published);
}

/// A batch whose lease expired is taken back by the next receive; the late holder can settle
/// none of it, and what it had acked before stays acked.
pub async fn topic_expired_batch_is_taken_back_and_the_late_holder_fenced<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("t", "s").await.expect("subscribe");
    let published = publish_to(b, many("t", 4)).await;
    let ttl = Duration::from_secs(5);
    let first = b
        .receive(&Receive::new("s", 10).lease_ttl(ttl))
        .await
        .expect("receive");
    assert_eq!(ids(&first), published);
    assert_eq!(
        ack(b, &first[..1]).await,
        vec![published[0]],
        "a partial ack"
    );
    assert!(receive(b, "s", 10).await.is_empty(), "leased");
    b.advance(Duration::from_secs(6)).await.expect("advance");
    let second = receive(b, "s", 10).await;
    assert_eq!(ids(&second), published[1..].to_vec(), "only the unacked");
    assert!(
        second
            .iter()
            .all(|d| d.deliveries == 2 && d.token != first[0].token)
    );
    assert!(ack(b, &first).await.is_empty(), "the late holder is fenced");
    assert!(
        b.settle(&leases(&first), Settlement::DeadLetter("late".into()))
            .await
            .expect("late dead letter")
            .is_empty()
    );
    assert_eq!(ack(b, &second).await.len(), 3);
    assert!(receive(b, "s", 10).await.is_empty());
}

/// Renewing keeps a batch past its original lease; releasing hands messages back at once,
/// uncounted.
pub async fn topic_renew_and_release<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("t", "s").await.expect("subscribe");
    let published = publish_to(b, many("t", 2)).await;
    let ttl = Duration::from_secs(10);
    let got = b
        .receive(&Receive::new("s", 10).lease_ttl(ttl))
        .await
        .expect("receive");
    b.advance(Duration::from_secs(8)).await.expect("advance");
    assert_eq!(
        b.settle(&leases(&got), Settlement::Renew)
            .await
            .expect("renew")
            .len(),
        2
    );
    b.advance(Duration::from_secs(8)).await.expect("advance");
    assert!(receive(b, "s", 10).await.is_empty(), "renewed: still held");
    assert_eq!(
        b.settle(&leases(&got[1..]), Settlement::Release)
            .await
            .expect("release"),
        vec![published[1]]
    );
    let back = receive(b, "s", 10).await;
    assert_eq!(ids(&back), vec![published[1]]);
    assert_eq!(
        (back[0].attempts, back[0].deliveries),
        (0, 1),
        "release is uncounted"
    );
    assert_eq!(ack(b, &got[..1]).await, vec![published[0]]);
    assert_eq!(ack(b, &back).await, vec![published[1]]);
}

/// A message whose receivers keep crashing is dead-lettered once it was delivered
/// `max_deliveries` times.
pub async fn topic_max_deliveries_dead_letters_a_crash_loop<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("t", "s").await.expect("subscribe");
    let published = publish_to(b, many("t", 1)).await;
    let ttl = Duration::from_secs(1);
    for delivery in 1..=3 {
        let got = b
            .receive(&Receive::new("s", 10).lease_ttl(ttl).max_deliveries(3))
            .await
            .expect("receive");
        assert_eq!(ids(&got), published, "delivery {delivery}");
        assert_eq!(got[0].deliveries, delivery);
        b.advance(Duration::from_secs(2)).await.expect("advance");
    }
    let none = b
        .receive(&Receive::new("s", 10).lease_ttl(ttl).max_deliveries(3))
        .await
        .expect("receive");
    assert!(none.is_empty());
    let dead = b.subscription_dead_letters("s").await.expect("dead");
    assert_eq!(ids_of(&dead), published);
    assert!(
        dead[0].reason.starts_with("max_deliveries exceeded"),
        "{}",
        dead[0].reason
    );
}

fn ids_of(dead: &[postbox_core::DeadLetter]) -> Vec<MessageId> {
    dead.iter().map(|d| d.id).collect()
}

/// The listing counts unreceived, received-unsettled and waiting messages as backlog, with
/// the oldest one's publish time.
pub async fn topic_subscriptions_report_backlog_and_oldest<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("t", "s").await.expect("subscribe");
    b.subscribe("u", "other").await.expect("subscribe");
    let start = b.now().await.expect("now");
    publish_to(b, many("t", 5)).await;
    let got = receive(b, "s", 2).await;
    b.settle(
        &leases(&got[..1]),
        Settlement::Retry(RetryParams::new(Duration::from_secs(30))),
    )
    .await
    .expect("retry");
    let listed = b.subscriptions(Some("t")).await.expect("list");
    assert_eq!(listed.len(), 1, "filtered by topic");
    let s = &listed[0];
    assert_eq!(
        s.backlog, 5,
        "3 unreceived, 1 held, 1 waiting for its retry"
    );
    let oldest = s.oldest_unprocessed.expect("an oldest");
    assert!(
        oldest >= start - chrono::Duration::seconds(1),
        "{oldest} vs {start}"
    );
    ack(b, &got[1..]).await;
    assert_eq!(
        b.subscriptions(Some("t")).await.expect("list")[0].backlog,
        4
    );
    let other = &b.subscriptions(Some("u")).await.expect("list")[0];
    assert_eq!((other.backlog, other.oldest_unprocessed), (0, None));
}

/// What a topic cannot take is refused before anything is written: delayed messages, bad
/// names, unknown subscriptions, bad receive parameters.
pub async fn topic_refuses_bad_input<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("t", "s").await.expect("subscribe");
    let mut tx = b.begin().await.expect("begin");
    let delayed = Message::new("t", "later").delay(Duration::from_secs(5));
    assert!(matches!(
        b.publish_to_topics(&mut tx, vec![Message::new("t", "ok"), delayed])
            .await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        b.publish_to_topics(&mut tx, vec![Message::new("", "x")])
            .await,
        Err(Error::InvalidQueue { .. })
    ));
    b.commit(tx).await.expect("commit");
    assert!(receive(b, "s", 10).await.is_empty(), "nothing was written");
    assert!(matches!(
        b.subscribe("", "s2").await,
        Err(Error::InvalidQueue { .. })
    ));
    assert!(matches!(
        b.receive(&Receive::new("missing", 1)).await,
        Err(Error::UnknownSubscription { .. })
    ));
    assert!(matches!(
        b.receive(&Receive::new("s", 0)).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        b.settle(&[], Settlement::DeadLetter("nul \0".into())).await,
        Err(Error::InvalidArgument(_))
    ));
}

fn subscriber_options(topic: &str, subscription: &str) -> postbox_core::SubscriberOptions {
    postbox_core::SubscriberOptions::new([topic])
        .subscription(subscription)
        .min_fetch_interval(Duration::from_millis(10))
        .max_fetch_interval(Duration::from_millis(50))
}

/// Subscribers of two subscriptions each handle every message once, and two subscribers
/// sharing one subscription split it: the fan-out, through the runtime.
pub async fn topic_subscribers_fan_out_and_share<H: Harness>(h: &H) {
    use postbox_core::{HandlerError, Subscriber};

    let b = h.backend();
    b.subscribe("t", "mail").await.expect("subscribe");
    b.subscribe("t", "stats").await.expect("subscribe");
    let published: BTreeSet<MessageId> = publish_to(b, many("t", 40)).await.into_iter().collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(&'static str, MessageId)>();
    let mut subs = Vec::new();
    for (subscription, copies) in [("mail", 1), ("stats", 2)] {
        for _ in 0..copies {
            let tx = tx.clone();
            let handler = move |d: Delivery| {
                let _ = tx.send((subscription, d.id));
                std::future::ready(Ok::<(), HandlerError>(()))
            };
            subs.push(
                Subscriber::new(b.clone(), subscriber_options("t", subscription), handler)
                    .expect("options")
                    .spawn(),
            );
        }
    }
    let until = tokio::time::Instant::now() + crate::wait::deadline();
    let (mut mail, mut stats) = (Vec::new(), Vec::new());
    while mail.len() < 40 || stats.len() < 40 {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(("mail", id))) => mail.push(id),
            Ok(Some((_, id))) => stats.push(id),
            _ => panic!(
                "handled {} for mail, {} for stats, of 40 each",
                mail.len(),
                stats.len()
            ),
        }
    }
    for sub in subs {
        crate::wait::within("shutdown", sub.shutdown())
            .await
            .expect("shutdown");
    }
    for (name, seen) in [("mail", mail), ("stats", stats)] {
        let distinct: BTreeSet<MessageId> = seen.iter().copied().collect();
        assert_eq!(distinct, published, "{name} handled every message");
        assert_eq!(seen.len(), 40, "{name} handled each once");
    }
    for s in b.subscriptions(Some("t")).await.expect("list") {
        assert_eq!(s.backlog, 0, "{} acked everything", s.name);
    }
}

/// A failing handler retries and dead-letters within its own subscription only.
pub async fn topic_subscriber_retries_then_dead_letters_in_its_subscription<H: Harness>(h: &H) {
    use postbox_core::{HandlerError, RetryPolicy, Subscriber};

    let b = h.backend();
    b.subscribe("t", "flaky").await.expect("subscribe");
    b.subscribe("t", "fine").await.expect("subscribe");
    let published = publish_to(b, many("t", 1)).await;
    let handler = |_d: Delivery| std::future::ready(Err::<(), _>(HandlerError::retry("always")));
    let options = subscriber_options("t", "flaky")
        .retry_policy(RetryPolicy::constant(Duration::ZERO).max_attempts(3));
    let sub = Subscriber::new(b.clone(), options, handler)
        .expect("options")
        .spawn();
    let mut events = sub.events();
    crate::wait::wait_for_event(&mut events, "the dead letter in 'flaky'", |e| {
        matches!(
            e,
            postbox_core::runtime::SubscriberEvent::Handled {
                outcome: postbox_core::Outcome::DeadLettered { .. },
                ..
            }
        )
    })
    .await;
    crate::wait::within("shutdown", sub.shutdown())
        .await
        .expect("shutdown");
    let dead = b.subscription_dead_letters("flaky").await.expect("dead");
    assert_eq!(ids_of(&dead), published);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(drain(b, "fine").await, published, "'fine' is untouched");
}

/// A key the topic remembers is not written twice: later and concurrent publishes of it get
/// the first message's id, a rolled-back one frees it, another topic's key is another key.
pub async fn topic_idempotency_keys_write_a_message_once<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("t", "s").await.expect("subscribe");
    let mut tx = b.begin().await.expect("begin");
    let first = b
        .publish_to_topics(
            &mut tx,
            vec![
                Message::new("t", "a").idempotency_key("k1"),
                Message::new("t", "again").idempotency_key("k1"),
                Message::new("u", "other topic").idempotency_key("k1"),
            ],
        )
        .await
        .expect("publish");
    b.commit(tx).await.expect("commit");
    assert!(first[0].is_new() && first[2].is_new(), "{first:?}");
    assert_eq!(first[1], Published::Duplicate(first[0].id()));

    // A rolled-back publish does not keep its key.
    let mut tx = b.begin().await.expect("begin");
    b.publish_to_topics(&mut tx, vec![Message::new("t", "x").idempotency_key("k2")])
        .await
        .expect("publish");
    b.rollback(tx).await.expect("rollback");

    // 16 concurrent transactions publishing one key write it once.
    let racers = (0..16).map(|_| {
        let b = b.clone();
        async move {
            let mut tx = b.begin().await.expect("begin");
            let p = b
                .publish_to_topics(
                    &mut tx,
                    vec![Message::new("t", "race").idempotency_key("k2")],
                )
                .await
                .expect("publish");
            b.commit(tx).await.expect("commit");
            p[0]
        }
    });
    let outcomes = futures_util::future::join_all(racers).await;
    let new: Vec<Published> = outcomes.iter().copied().filter(|p| p.is_new()).collect();
    assert_eq!(new.len(), 1, "{outcomes:?}");
    assert!(
        outcomes.iter().all(|p| p.id() == new[0].id()),
        "{outcomes:?}"
    );
    let got = drain(b, "s").await;
    assert_eq!(got, vec![first[0].id(), new[0].id()], "one message per key");
    assert!(matches!(
        b.publish_to_topics(
            &mut b.begin().await.expect("begin"),
            vec![Message::new("t", "x").idempotency_key("")]
        )
        .await,
        Err(Error::InvalidArgument(_))
    ));
    let mut tx = b.begin().await.expect("begin");
    assert!(matches!(
        b.publish(&mut tx, Message::new("q", "x").idempotency_key("k"))
            .await,
        Err(Error::InvalidArgument(_))
    ));
}

/// A key is remembered for the key retention (24 hours by default) after its publish, then
/// free again: the next publish of it writes a new message.
pub async fn topic_idempotency_key_is_free_again_after_its_retention<H: Harness>(h: &H) {
    const DAY: Duration = Duration::from_secs(24 * 3600);
    let b = h.backend();
    b.subscribe("t", "s").await.expect("subscribe");
    let publish = |payload: &'static str| async move {
        let mut tx = b.begin().await.expect("begin");
        let p = b
            .publish_to_topics(
                &mut tx,
                vec![Message::new("t", payload).idempotency_key("k")],
            )
            .await
            .expect("publish");
        b.commit(tx).await.expect("commit");
        p[0]
    };
    let first = publish("first").await;
    assert!(first.is_new(), "{first:?}");
    b.advance(DAY - Duration::from_secs(1))
        .await
        .expect("advance");
    assert_eq!(
        publish("within the retention").await,
        Published::Duplicate(first.id())
    );
    b.advance(Duration::from_secs(1)).await.expect("advance");
    let second = publish("after it").await;
    assert!(
        second.is_new(),
        "a key past its retention is free: {second:?}"
    );
    assert_ne!(second.id(), first.id());
    assert_eq!(
        publish("remembered again").await,
        Published::Duplicate(second.id())
    );
    assert_eq!(drain(b, "s").await, vec![first.id(), second.id()]);
}

/// A transaction in flight while subscriptions change: one created meanwhile receives its
/// message once it commits; one dropped meanwhile does not (nor does a subscription of the
/// same name created after the commit), and the others still do.
pub async fn topic_a_publish_in_flight_while_subscriptions_change<H: Harness>(h: &H) {
    let b = h.backend();
    for s in ["stays", "dropped"] {
        b.subscribe("t", s).await.expect("subscribe");
    }
    let mut in_flight = b.begin().await.expect("begin");
    let flying = b
        .publish_to_topics(&mut in_flight, vec![Message::new("t", "flying")])
        .await
        .expect("publish")[0]
        .id();
    b.subscribe("t", "created").await.expect("subscribe");
    assert!(
        b.unsubscribe("dropped", Unsubscribe::Discard)
            .await
            .expect("unsubscribe while a publish is in flight")
    );
    b.commit(in_flight).await.expect("commit");
    b.subscribe("t", "dropped").await.expect("subscribe again");
    assert_eq!(drain(b, "stays").await, vec![flying]);
    assert_eq!(drain(b, "created").await, vec![flying]);
    assert_eq!(
        drain(b, "dropped").await,
        Vec::<MessageId>::new(),
        "a subscription created after the commit receives nothing from before it"
    );
}

/// Expired batches are looked for once per [`EXPIRED_BATCH_CHECK`]: a receive within that
/// interval of the last look (by a receive that handed out new messages) leaves an expired
/// batch alone; the first one after it takes the batch back.
pub async fn topic_expired_batches_are_looked_for_once_per_check_interval<H: Harness>(h: &H) {
    let b = h.backend();
    b.subscribe("t", "s").await.expect("subscribe");
    let ttl = Duration::from_millis(200);
    let tenth = EXPIRED_BATCH_CHECK / 10;
    let first = publish_to(b, many("t", 1)).await;
    let lost = b
        .receive(&Receive::new("s", 10).lease_ttl(ttl))
        .await
        .expect("receive");
    assert_eq!(ids(&lost), first);
    b.advance(ttl + tenth).await.expect("advance");
    let second = publish_to(b, many("t", 1)).await;
    assert_eq!(
        ids(&receive(b, "s", 10).await),
        second,
        "expired, but looked for less than EXPIRED_BATCH_CHECK ago"
    );
    b.advance(EXPIRED_BATCH_CHECK - ttl - tenth)
        .await
        .expect("advance");
    let back = receive(b, "s", 10).await;
    assert_eq!(ids(&back), first, "taken back at the next look");
    assert_eq!(back[0].deliveries, 2);
    assert!(ack(b, &lost).await.is_empty(), "the late holder is fenced");
}
