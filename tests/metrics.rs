//! The `metrics` feature: every named metric, recorded by a debugging recorder, on the fake
//! and on Postgres.
//!
//! One test: the recorder is global to the process, and reading it resets what it read, so
//! scenarios run one after another and each reads only its own.

mod support;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::time::Duration;

use anyhow::Result;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};
use postbox::fake::FakeBroker;
use postbox::prelude::*;
use postbox::testkit::TimeControl;
use postbox::testkit::{until_within, within};
use postbox::{
    Backend, Delivery, FetchParams, HandlerError, Message, RetryPolicy, Subscriber,
    SubscriberOptions, Topics, metrics as names,
};
use tokio::sync::watch;

/// What one scenario recorded: counters summed, gauges as their net change, histograms as
/// their sample counts.
struct Recorded(HashMap<MetricId, DebugValue>);

/// A metric's kind, name and sorted labels.
type MetricId = (MetricKind, String, Vec<(String, String)>);

impl Recorded {
    fn take(snapshotter: &Snapshotter) -> Self {
        let values = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| (id(&key), value))
            .collect();
        Recorded(values)
    }

    fn get(&self, kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> Option<&DebugValue> {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        labels.sort();
        self.0.get(&(kind, name.to_owned(), labels))
    }

    /// A counter's value; 0 when never recorded.
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.get(MetricKind::Counter, name, labels) {
            Some(DebugValue::Counter(n)) => *n,
            _ => 0,
        }
    }

    /// A gauge's net change; `None` when never touched.
    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match self.get(MetricKind::Gauge, name, labels) {
            Some(DebugValue::Gauge(v)) => Some(v.into_inner()),
            _ => None,
        }
    }

    /// A histogram's samples.
    fn samples(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        match self.get(MetricKind::Histogram, name, labels) {
            Some(DebugValue::Histogram(v)) => v.iter().map(|f| f.into_inner()).collect(),
            _ => Vec::new(),
        }
    }
}

fn id(key: &CompositeKey) -> MetricId {
    let mut labels: Vec<(String, String)> = key
        .key()
        .labels()
        .map(|l| (l.key().to_owned(), l.value().to_owned()))
        .collect();
    labels.sort();
    (key.kind(), key.key().name().to_owned(), labels)
}

async fn publish<B: Backend>(backend: &B, queue: &str, payloads: &[&str]) {
    let mut tx = backend.begin().await.expect("begin");
    let messages = payloads.iter().map(|p| Message::new(queue, *p)).collect();
    backend
        .publish_batch(&mut tx, messages)
        .await
        .expect("publish");
    backend.commit(tx).await.expect("commit");
}

/// Handles `ok` with `Ok`, `flaky` with one retry then `Ok`, `bad` with a rejection, `slow`
/// once `gate` opens, and `stuck` never.
fn handler(
    gate: watch::Receiver<bool>,
) -> impl Fn(Delivery) -> postbox::runtime::HandlerFuture + Send + Sync {
    move |delivery: Delivery| -> postbox::runtime::HandlerFuture {
        let mut gate = gate.clone();
        Box::pin(async move {
            match &delivery.payload[..] {
                b"flaky" if delivery.attempts == 0 => Err(HandlerError::retry("once")),
                b"bad" => Err(HandlerError::reject("bad")),
                b"slow" => {
                    let _ = gate.wait_for(|open| *open).await;
                    Ok(())
                }
                b"stuck" => std::future::pending().await,
                _ => Ok(()),
            }
        })
    }
}

/// Runs the scenario on `backend`: `q.a` gets ok, flaky, bad and ok; `q.slow` one slow
/// message whose lease is stolen (expired, fetched by another consumer) before its handler
/// ends; `q.stuck` two stuck messages, one running and one waiting when the subscriber
/// shuts down (released), the running one aborted at the timeout.
async fn scenario<B: Backend + TimeControl + Topics + Clone>(backend: B) {
    publish(&backend, "q.a", &["ok", "flaky", "bad", "ok"]).await;
    let (open, gate) = watch::channel(false);
    let options = SubscriberOptions::new(["q.a", "q.slow", "q.stuck"])
        .max_workers(1)
        .prefetch(4)
        .retry_policy(RetryPolicy::constant(Duration::from_millis(1)))
        .min_fetch_interval(Duration::from_millis(10))
        .max_fetch_interval(Duration::from_millis(10))
        .lease_ttl(Duration::from_secs(3600))
        .shutdown_timeout(Duration::from_millis(50))
        .shutdown_grace(Duration::ZERO);
    let sub = Subscriber::new(backend.clone(), options, handler(gate)).expect("options");
    let sub = sub.spawn();
    let deadline = support::wait();
    until_within("q.a handled", deadline, || {
        let s = sub.stats();
        s.acked == 3 && s.dead_lettered == 1
    })
    .await;

    publish(&backend, "q.slow", &["slow"]).await;
    until_within("the slow message's fetch", deadline, || {
        sub.stats().fetched == 6
    })
    .await;
    backend
        .advance(Duration::from_secs(7200))
        .await
        .expect("advance");
    let stolen = backend
        .fetch(&FetchParams::new(["q.slow"], 10))
        .await
        .expect("steal");
    assert_eq!(stolen.len(), 1, "the slow lease expired and was taken");
    let _ = open.send(true);
    until_within("the lost lease", deadline, || sub.stats().lease_lost == 1).await;

    publish(&backend, "q.stuck", &["stuck", "stuck"]).await;
    until_within("the stuck messages' fetch", deadline, || {
        sub.stats().fetched == 8
    })
    .await;
    let report = within("shutdown", sub.shutdown()).await.expect("shutdown");
    assert_eq!((report.released, report.abandoned), (1, 1));
}

#[tokio::test]
async fn every_metric_is_recorded_on_both_backends() -> Result<()> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install()?;
    names::describe();
    let _ = Recorded::take(&snapshotter);

    // The fake.
    scenario(FakeBroker::new()).await;
    check(&Recorded::take(&snapshotter), "the fake");

    // Postgres, with capped fetches for the permit gauge.
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend().max_concurrent_fetches(NonZeroUsize::MIN);
    scenario(backend.clone()).await;
    let recorded = Recorded::take(&snapshotter);
    check(&recorded, "Postgres");
    let waiters = recorded.gauge(names::FETCH_PERMIT_WAITERS, &[("table", "postbox")]);
    assert_eq!(
        waiters,
        Some(0.0),
        "the permit gauge is touched and balanced"
    );

    // A topic subscription adds its label.
    backend.subscribe("t.orders", "email").await?;
    let mut tx = backend.begin().await?;
    backend
        .publish_to_topics(&mut tx, vec![Message::new("t.orders", "ok")])
        .await?;
    backend.commit(tx).await?;
    let options = SubscriberOptions::new(["t.orders"]).subscription("email");
    let (_open, gate) = watch::channel(false);
    let sub = Subscriber::new(backend.clone(), options, handler(gate))?.spawn();
    until_within("the topic message", support::wait(), || {
        sub.stats().acked == 1
    })
    .await;
    within("shutdown", sub.shutdown()).await?;
    let recorded = Recorded::take(&snapshotter);
    let labels = [("queue", "t.orders"), ("subscription", "email")];
    assert_eq!(
        recorded.counter(names::PUBLISHED, &[("queue", "t.orders")]),
        1
    );
    assert_eq!(recorded.counter(names::FETCHED, &labels), 1);
    assert_eq!(recorded.counter(names::ACKED, &labels), 1);
    assert_eq!(recorded.samples(names::HANDLER_DURATION, &labels).len(), 1);
    assert!(!recorded.samples(names::FETCH_DURATION, &labels).is_empty());
    db.close().await?;
    Ok(())
}

/// What [`scenario`] must have recorded.
fn check(recorded: &Recorded, backend: &str) {
    let a = [("queue", "q.a")];
    let slow = [("queue", "q.slow")];
    let stuck = [("queue", "q.stuck")];
    let counters = [
        (names::PUBLISHED, &a, 4),
        (names::PUBLISHED, &slow, 1),
        (names::PUBLISHED, &stuck, 2),
        // flaky twice
        (names::FETCHED, &a, 5),
        (names::FETCHED, &slow, 1),
        (names::FETCHED, &stuck, 2),
        (names::ACKED, &a, 3),
        (names::RETRIED, &a, 1),
        (names::DEAD_LETTERED, &a, 1),
        (names::LEASE_LOST, &slow, 1),
        (names::RELEASED, &stuck, 1),
        (names::ACKED, &slow, 0),
        (names::LEASE_LOST, &a, 0),
    ];
    for (name, labels, want) in counters {
        assert_eq!(
            recorded.counter(name, labels),
            want,
            "{backend}: {name} {labels:?}"
        );
    }
    // Every handler that ran was timed (the aborted one too), and the in-flight gauges went
    // back to where they were.
    for (labels, runs) in [(&a, 5), (&slow, 1), (&stuck, 1)] {
        let samples = recorded.samples(names::HANDLER_DURATION, labels);
        assert_eq!(
            samples.len(),
            runs,
            "{backend}: handler durations {labels:?}"
        );
        let gauge = recorded.gauge(names::HANDLERS_IN_FLIGHT, labels);
        assert_eq!(gauge, Some(0.0), "{backend}: in flight {labels:?}");
    }
    let fetches = recorded.samples(names::FETCH_DURATION, &[("queue", "q.a,q.slow,q.stuck")]);
    assert!(fetches.len() >= 3, "{backend}: fetch durations {fetches:?}");
    assert!(
        fetches.iter().all(|s| (0.0..60.0).contains(s)),
        "{backend}: {fetches:?}"
    );
}
