//! Trace context across the outbox, with the `opentelemetry` feature.
//!
//! A request that publishes a message and the handler that later runs it are one trace:
//!
//! - **Publish** writes the current span's W3C trace context into the message's headers, as
//!   `traceparent` (and `tracestate` when there is one), through `tracing-opentelemetry`: the
//!   current span is the `tracing` span of the publishing code, exported by an
//!   `OpenTelemetryLayer`. Nothing is written outside a sampled, exported span, and a
//!   `traceparent` the message already carries is kept.
//! - **The handler's span** (`postbox.handle`, at `INFO` with this feature) continues it: a
//!   child of the publishing span on the first delivery, and on a redelivery a new trace with
//!   a span link to it (a retry hours later does not stretch the publisher's trace). It
//!   records `queue`, `message_id`, `attempt` and `correlation_id`. A message without trace
//!   context gets a handler span that starts its own trace.
//!
//! Without the feature, headers are left alone and the handler's span is a `DEBUG` span of
//! the subscriber's.

#[cfg(feature = "opentelemetry")]
use crate::message::Headers;
use crate::message::Message;

/// The W3C header that carries the trace and parent span ids.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header that carries vendor trace state.
pub const TRACESTATE: &str = "tracestate";

/// The level of the handler's span: `INFO` when it is exported as a trace, `DEBUG` otherwise.
#[cfg(feature = "opentelemetry")]
pub(crate) const HANDLE_LEVEL: tracing::Level = tracing::Level::INFO;
#[cfg(not(feature = "opentelemetry"))]
pub(crate) const HANDLE_LEVEL: tracing::Level = tracing::Level::DEBUG;

/// Writes the current span's trace context into `message`'s headers (creating them if
/// needed), unless they carry a `traceparent` already or there is no valid span context. The
/// built-in backends call it for each message they publish; a backend of your own calls it
/// likewise. Without the `opentelemetry` feature, does nothing.
pub fn inject_current(message: &mut Message) {
    #[cfg(feature = "opentelemetry")]
    otel::inject_current(&mut message.headers);
    #[cfg(not(feature = "opentelemetry"))]
    let _ = message;
}

/// Makes `span` continue the trace in `delivery`'s headers (see the module documentation).
pub(crate) fn continue_trace(span: &tracing::Span, delivery: &crate::Delivery) {
    #[cfg(feature = "opentelemetry")]
    otel::continue_trace(span, delivery);
    #[cfg(not(feature = "opentelemetry"))]
    let _ = (span, delivery);
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use std::collections::HashMap;

    use opentelemetry::Context;
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use serde_json::Value;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{Headers, TRACEPARENT, TRACESTATE};
    use crate::Delivery;

    pub(super) fn inject_current(headers: &mut Option<Headers>) {
        if headers
            .as_ref()
            .is_some_and(|h| h.contains_key(TRACEPARENT))
        {
            return;
        }
        let cx = tracing::Span::current().context();
        if !cx.span().span_context().is_valid() {
            return;
        }
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        let headers = headers.get_or_insert_with(Headers::new);
        for (key, value) in carrier {
            headers.insert(key, Value::String(value));
        }
    }

    pub(super) fn continue_trace(span: &tracing::Span, delivery: &Delivery) {
        if span.is_disabled() {
            return;
        }
        let carrier: HashMap<String, String> = delivery
            .headers
            .iter()
            .flatten()
            .filter(|(key, _)| *key == TRACEPARENT || *key == TRACESTATE)
            .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_owned())))
            .collect();
        // Against an empty context: `extract` falls back to the current one (the
        // subscriber's span) when the headers carry nothing.
        let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), &carrier);
        let published = cx.span().span_context().clone();
        // A span that has no trace to continue, or is a redelivery, starts its own trace
        // rather than joining the subscriber's (which lives as long as the process).
        let parent = if published.is_valid() && delivery.deliveries <= 1 {
            cx
        } else {
            Context::new()
        };
        // Fails only without an OpenTelemetry layer, when there is nothing to export.
        let _ = span.set_parent(parent);
        if published.is_valid() && delivery.deliveries > 1 {
            span.add_link(published);
        }
    }
}
