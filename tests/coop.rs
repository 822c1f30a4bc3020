//! Cooperative subconsumers in the runtime, on the fake and on Postgres.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use postbox::coop::CoopReceive;
use postbox::fake::FakeBroker;
use postbox::prelude::*;
use postbox::runtime::SubscriberEvent;
use postbox::testkit::{wait_for_event, within};
use postbox::{Delivery, HandlerError, Member, Outcome, Subscriber, SubscriberOptions, Topics};
use support::publish_n;
use tokio::sync::{mpsc, watch};

fn member(name: &str) -> Member {
    Member::new("workers", name).expect("valid")
}

/// Publishes `n` messages and lets four members `a`-`d` (each with `options` plus its
/// subconsumer name) split them, each handler awaiting `work()` first. Asserts the split:
/// nothing twice, nothing missing, every member worked.
async fn four_members_split<B, W, F>(backend: &B, n: usize, options: SubscriberOptions, work: W)
where
    B: Backend + Topics + Clone,
    W: Fn() -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let ids = publish_n(backend, "q", n).await;
    let (tx, mut handled) = mpsc::unbounded_channel();
    let mut subs = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let (tx, work) = (tx.clone(), work.clone());
        let handler = move |d: Delivery| {
            let (tx, work) = (tx.clone(), work.clone());
            async move {
                work().await;
                let _ = tx.send((name, d.id));
                Ok::<(), HandlerError>(())
            }
        };
        let options = options.clone().subconsumer(member(name));
        subs.push(
            Subscriber::new(backend.clone(), options, handler)
                .expect("options")
                .spawn(),
        );
    }
    let got = support::recv_n(&mut handled, n).await;
    for sub in subs {
        within("shutdown", sub.shutdown()).await.expect("shutdown");
    }
    let seen: HashSet<i64> = got.iter().map(|(_, id)| *id).collect();
    assert_eq!(seen.len(), n, "no message twice");
    assert_eq!(seen, ids.into_iter().collect::<HashSet<_>>());
    let members: HashSet<&str> = got.iter().map(|(m, _)| *m).collect();
    assert_eq!(members.len(), 4, "every member worked: {members:?}");
}

/// Four members with 50 ms handlers and one worker each: the handlers must overlap (no shared
/// lock serialises siblings), and every message is handled once.
async fn siblings_run_in_parallel<B: Backend + Topics + Clone>(backend: B) {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let work = {
        let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
        move || {
            let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await; // the work
                running.fetch_sub(1, Ordering::SeqCst);
            }
        }
    };
    let options = SubscriberOptions::new(["q"])
        .max_workers(1)
        .prefetch(1)
        .min_fetch_interval(Duration::from_millis(10))
        .max_fetch_interval(Duration::from_millis(50));
    four_members_split(&backend, 40, options, work).await;
    assert_eq!(
        peak.load(Ordering::SeqCst),
        4,
        "the four siblings ran at the same time"
    );
}

#[tokio::test]
async fn siblings_run_in_parallel_on_the_fake() {
    siblings_run_in_parallel(FakeBroker::new()).await;
}

#[tokio::test]
async fn siblings_run_in_parallel_on_postgres() {
    let db = postbox::testkit::postgres().await.expect("fixture");
    siblings_run_in_parallel(db.backend()).await;
    db.close().await.expect("close");
}

/// A member whose handler runs past the dead interval keeps its rows: the runtime touches it.
async fn the_runtime_heartbeat_keeps_a_slow_member<B: Backend + Topics + Clone>(backend: B) {
    publish_n(&backend, "q", 1).await;
    let (open, gate) = watch::channel(false);
    let (tx, mut started) = mpsc::unbounded_channel();
    let handler = move |d: Delivery| {
        let _ = tx.send(d.id);
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            Ok::<(), HandlerError>(())
        }
    };
    let dead = Duration::from_millis(300);
    let options = SubscriberOptions::new(["q"])
        .subconsumer(member("slow"))
        .dead_interval(dead)
        .lease_ttl(Duration::from_millis(600));
    let sub = Subscriber::new(backend.clone(), options, handler)
        .expect("options")
        .spawn();
    let mut events = sub.events();
    support::recv_n(&mut started, 1).await;
    // Three renewals mean at least 600 ms since the fetch: twice the dead interval.
    for _ in 0..3 {
        wait_for_event(&mut events, "renewal", |e| {
            matches!(e, SubscriberEvent::LeasesRenewed { .. })
        })
        .await;
    }
    let thief = backend
        .coop_receive(&CoopReceive::new(member("thief"), ["q"], 10).dead_interval(dead))
        .await
        .expect("receive");
    assert!(thief.is_empty(), "a touched member is not robbed");
    let _ = open.send(true);
    wait_for_event(&mut events, "ack", |e| {
        matches!(
            e,
            SubscriberEvent::Handled {
                outcome: Outcome::Acked,
                ..
            }
        )
    })
    .await;
    within("shutdown", sub.shutdown()).await.expect("shutdown");
    let members = backend.coop_members("workers").await.expect("members");
    assert!(members.iter().any(|m| m.name == "slow" && m.held == 0));
}

#[tokio::test]
async fn the_runtime_heartbeat_keeps_a_slow_member_on_the_fake() {
    the_runtime_heartbeat_keeps_a_slow_member(FakeBroker::new()).await;
}

#[tokio::test]
async fn the_runtime_heartbeat_keeps_a_slow_member_on_postgres() {
    let db = postbox::testkit::postgres().await.expect("fixture");
    the_runtime_heartbeat_keeps_a_slow_member(db.backend()).await;
    db.close().await.expect("close");
}

#[test]
fn a_dead_interval_without_a_subconsumer_is_a_configuration_error() {
    let handler = |_d: Delivery| std::future::ready(Ok::<(), HandlerError>(()));
    let err = Subscriber::new(
        FakeBroker::new(),
        SubscriberOptions::new(["q"]).dead_interval(Duration::from_secs(30)),
        handler,
    )
    .expect_err("configuration error");
    assert!(
        err.to_string()
            .contains("dead_interval needs a subconsumer"),
        "{err}"
    );
}

/// Four members whose fetches share one permit (`max_concurrent_fetches(1)`) still split the
/// queue: each gets some, none starves or stalls, nothing is delivered twice.
#[tokio::test]
async fn members_sharing_one_fetch_permit_split_the_queue() {
    let db = postbox::testkit::postgres().await.expect("fixture");
    let backend = db
        .backend()
        .max_concurrent_fetches(std::num::NonZeroUsize::MIN);
    let options = SubscriberOptions::new(["q"])
        .max_workers(2)
        .prefetch(8)
        .min_fetch_interval(Duration::from_millis(10))
        .max_fetch_interval(Duration::from_millis(50));
    // 1 ms of work per message.
    let work = || tokio::time::sleep(Duration::from_millis(1));
    four_members_split(&backend, 400, options, work).await;
    assert_eq!(backend.fetches_waiting(), 0);
    db.close().await.expect("close");
}
