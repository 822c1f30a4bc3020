//! The `opentelemetry` feature: one trace from the publishing span to the handler's span,
//! across the fake and across Postgres, recorded by an in-memory exporter.
//!
//! One test: the tracing subscriber and the exporter are global to the process.

mod support;

use std::time::Duration;

use anyhow::Result;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use parking_lot::Mutex;
use postbox::fake::FakeBroker;
use postbox::testkit::{until_within, within};
use postbox::{
    Backend, Delivery, HandlerError, Message, RetryPolicy, Subscriber, SubscriberOptions, Topics,
};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// Publishes one message to `queue` inside a span named `checkout`, and one outside any
/// span; returns the `checkout` span's context.
async fn publish_in_a_request<B: Backend>(backend: &B, queue: &str) -> SpanContext {
    let span = tracing::info_span!("checkout");
    let context = span.context().span().span_context().clone();
    async {
        let mut tx = backend.begin().await.expect("begin");
        backend
            .publish(&mut tx, Message::new(queue, "traced"))
            .await
            .expect("publish");
        backend.commit(tx).await.expect("commit");
    }
    .instrument(span)
    .await;
    let mut tx = backend.begin().await.expect("begin");
    backend
        .publish(&mut tx, Message::new(queue, "untraced"))
        .await
        .expect("publish");
    backend.commit(tx).await.expect("commit");
    context
}

/// What the handler saw of each delivery: payload, attempt, headers.
type Seen = std::sync::Arc<Mutex<Vec<(String, i32, Option<postbox::Headers>)>>>;

/// Runs a subscriber on `queue` whose handler fails each message's first attempt, until both
/// messages are acked.
async fn consume<B: Backend + Topics>(backend: B, queue: &str) -> Seen {
    let seen: Seen = Default::default();
    let log = seen.clone();
    let handler = move |d: Delivery| {
        let payload = String::from_utf8_lossy(&d.payload).into_owned();
        log.lock().push((payload, d.attempts, d.headers.clone()));
        std::future::ready(if d.attempts == 0 {
            Err(HandlerError::retry("first attempt"))
        } else {
            Ok(())
        })
    };
    let options = SubscriberOptions::new([queue])
        .retry_policy(RetryPolicy::constant(Duration::from_millis(10)))
        .min_fetch_interval(Duration::from_millis(10))
        .max_fetch_interval(Duration::from_millis(20));
    let sub = Subscriber::new(backend, options, handler)
        .expect("options")
        .spawn();
    until_within("both messages acked", support::wait(), || {
        sub.stats().acked == 2
    })
    .await;
    within("shutdown", sub.shutdown()).await.expect("shutdown");
    seen
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// The handler spans of the message with `correlation`, by attempt.
fn handler_spans(spans: &[SpanData], message_id: i64) -> Vec<SpanData> {
    let mut found: Vec<SpanData> = spans
        .iter()
        .filter(|s| s.name == "postbox.handle")
        .filter(|s| attribute(s, "message_id") == Some(message_id.to_string()))
        .cloned()
        .collect();
    found.sort_by_key(|s| attribute(s, "attempt"));
    found
}

fn check(
    backend: &str,
    exporter: &InMemorySpanExporter,
    checkout: &SpanContext,
    seen: &Seen,
    ids: (i64, i64),
) {
    let spans = exporter.get_finished_spans().expect("spans");
    let seen = seen.lock().clone();

    // The published headers carry the request's trace context, W3C-encoded.
    let traced_headers = seen
        .iter()
        .find(|(p, _, _)| p == "traced")
        .and_then(|(_, _, h)| h.clone())
        .expect("the traced message has headers");
    let traceparent = traced_headers["traceparent"].as_str().expect("traceparent");
    assert_eq!(
        traceparent,
        format!("00-{}-{}-01", checkout.trace_id(), checkout.span_id()),
        "{backend}"
    );
    let untraced = seen.iter().find(|(p, _, _)| p == "untraced").expect("seen");
    assert_eq!(
        untraced.2, None,
        "{backend}: nothing injected outside a span"
    );

    // First delivery: a child of the request's span, in its trace.
    let traced = handler_spans(&spans, ids.0);
    assert_eq!(traced.len(), 2, "{backend}: {traced:#?}");
    assert_eq!(
        traced[0].span_context.trace_id(),
        checkout.trace_id(),
        "{backend}"
    );
    assert_eq!(traced[0].parent_span_id, checkout.span_id(), "{backend}");
    assert!(traced[0].links.is_empty(), "{backend}");
    // Redelivery: its own trace, linked to the request's span.
    assert_ne!(
        traced[1].span_context.trace_id(),
        checkout.trace_id(),
        "{backend}"
    );
    assert_eq!(traced[1].parent_span_id, SpanId::INVALID, "{backend}");
    let links: Vec<(TraceId, SpanId)> = traced[1]
        .links
        .iter()
        .map(|l| (l.span_context.trace_id(), l.span_context.span_id()))
        .collect();
    assert_eq!(
        links,
        [(checkout.trace_id(), checkout.span_id())],
        "{backend}"
    );
    assert!(
        attribute(&traced[0], "correlation_id").is_some_and(|c| c.len() == 36),
        "{backend}: the correlation id is recorded"
    );

    // A message published outside any span: each handler span starts its own trace.
    let untraced = handler_spans(&spans, ids.1);
    assert_eq!(untraced.len(), 2, "{backend}");
    for span in &untraced {
        assert_eq!(span.parent_span_id, SpanId::INVALID, "{backend}");
        assert!(span.links.is_empty(), "{backend}");
    }
    exporter.reset();
}

#[tokio::test]
async fn the_handler_span_continues_the_publishing_trace_on_both_backends() -> Result<()> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("postbox-tests"));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))?;

    let broker = FakeBroker::new();
    let checkout = publish_in_a_request(&broker, "emails").await;
    let ids = message_ids(&broker).await;
    let seen = consume(broker, "emails").await;
    provider.force_flush()?;
    check("the fake", &exporter, &checkout, &seen, ids);

    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let checkout = publish_in_a_request(&backend, "emails").await;
    let ids = message_ids(&backend).await;
    let seen = consume(backend, "emails").await;
    provider.force_flush()?;
    check("Postgres", &exporter, &checkout, &seen, ids);
    db.close().await?;
    Ok(())
}

/// The ids of the traced and the untraced message, published in that order.
async fn message_ids<B: Backend>(backend: &B) -> (i64, i64) {
    let stored = backend.messages(Some("emails")).await.expect("messages");
    let mut ids: Vec<i64> = stored.iter().map(|m| m.id).collect();
    ids.sort_unstable();
    (ids[0], ids[1])
}
