//! Metrics through the [`metrics`](https://docs.rs/metrics) facade, with the `metrics`
//! feature: install any recorder (Prometheus, StatsD, OpenTelemetry, ...) and postbox reports
//! into it. Without the feature nothing is recorded and nothing is compiled in.
//!
//! | name | kind | unit | labels | what |
//! |---|---|---|---|---|
//! | `postbox_published_total` | counter | messages | `queue` | written by a publish call (a topic's keyed duplicates excluded; a rolled-back transaction's included) |
//! | `postbox_fetched_total` | counter | messages | `queue` (+ `subscription`) | leased by a subscriber's fetches or receives |
//! | `postbox_acked_total` | counter | messages | `queue` (+ `subscription`) | acked by a subscriber |
//! | `postbox_retried_total` | counter | messages | `queue` (+ `subscription`) | scheduled for another attempt by a subscriber |
//! | `postbox_dead_lettered_total` | counter | messages | `queue` (+ `subscription`) | dead-lettered by a subscriber |
//! | `postbox_released_total` | counter | messages | `queue` (+ `subscription`) | given back unstarted at shutdown |
//! | `postbox_lease_lost_total` | counter | messages | `queue` (+ `subscription`) | outcomes refused because the lease was lost |
//! | `postbox_handler_duration_seconds` | histogram | seconds | `queue` (+ `subscription`) | from a handler's start to its end (or abort) |
//! | `postbox_fetch_duration_seconds` | histogram | seconds | `queue` (+ `subscription`) | one fetch or receive round trip of a subscriber |
//! | `postbox_handlers_in_flight` | gauge | handlers | `queue` (+ `subscription`) | handlers running now |
//! | `postbox_fetch_permit_waiters` | gauge | fetches | `table` | fetches waiting for a permit of [`PgBackend::max_concurrent_fetches`](crate::PgBackend::max_concurrent_fetches) |
//!
//! `queue` is the message's queue (its topic, for a subscription); a subscription's
//! subscribers add `subscription`. A fetch covers all the subscriber's queues, so
//! `postbox_fetch_duration_seconds` carries them joined with `,`. Call [`describe`] once
//! after installing the recorder to register units and descriptions.
//!
//! The subscriber registers each queue's handles once and then only updates them, so the cost
//! per message is a few atomic operations in the recorder, not a registry look-up.

/// Counter: messages written by publish calls, by `queue`.
pub const PUBLISHED: &str = "postbox_published_total";
/// Counter: messages leased by a subscriber, by `queue` (and `subscription`).
pub const FETCHED: &str = "postbox_fetched_total";
/// Counter: messages a subscriber acked.
pub const ACKED: &str = "postbox_acked_total";
/// Counter: messages a subscriber scheduled for another attempt.
pub const RETRIED: &str = "postbox_retried_total";
/// Counter: messages a subscriber dead-lettered.
pub const DEAD_LETTERED: &str = "postbox_dead_lettered_total";
/// Counter: messages a subscriber gave back unstarted at shutdown.
pub const RELEASED: &str = "postbox_released_total";
/// Counter: outcomes a subscriber could not record because the lease was lost.
pub const LEASE_LOST: &str = "postbox_lease_lost_total";
/// Histogram, seconds: how long handlers ran.
pub const HANDLER_DURATION: &str = "postbox_handler_duration_seconds";
/// Histogram, seconds: how long a subscriber's fetch or receive took.
pub const FETCH_DURATION: &str = "postbox_fetch_duration_seconds";
/// Gauge: handlers running now.
pub const HANDLERS_IN_FLIGHT: &str = "postbox_handlers_in_flight";
/// Gauge: fetches waiting for a fetch permit, by `table`.
pub const FETCH_PERMIT_WAITERS: &str = "postbox_fetch_permit_waiters";

/// Registers the unit and description of every postbox metric with the installed recorder.
/// Without the `metrics` feature, does nothing.
pub fn describe() {
    #[cfg(feature = "metrics")]
    {
        use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
        describe_counter!(PUBLISHED, Unit::Count, "Messages written by publish calls.");
        describe_counter!(FETCHED, Unit::Count, "Messages leased by subscribers.");
        describe_counter!(ACKED, Unit::Count, "Messages acked by subscribers.");
        describe_counter!(
            RETRIED,
            Unit::Count,
            "Messages scheduled for another attempt."
        );
        describe_counter!(
            DEAD_LETTERED,
            Unit::Count,
            "Messages dead-lettered by subscribers."
        );
        describe_counter!(
            RELEASED,
            Unit::Count,
            "Messages given back unstarted at shutdown."
        );
        describe_counter!(
            LEASE_LOST,
            Unit::Count,
            "Outcomes refused: the lease was lost."
        );
        describe_histogram!(HANDLER_DURATION, Unit::Seconds, "How long handlers ran.");
        describe_histogram!(
            FETCH_DURATION,
            Unit::Seconds,
            "Fetch and receive round trips."
        );
        describe_gauge!(HANDLERS_IN_FLIGHT, Unit::Count, "Handlers running now.");
        describe_gauge!(
            FETCH_PERMIT_WAITERS,
            Unit::Count,
            "Fetches waiting for a permit."
        );
    }
}

/// Counts each message of `queues` (one item per message, in any order) as published. The
/// built-in backends call it after each successful publish; a backend of your own calls it
/// likewise. Without the `metrics` feature, does nothing.
pub fn published<'a>(queues: impl IntoIterator<Item = &'a str>) {
    #[cfg(feature = "metrics")]
    {
        let mut counts = std::collections::BTreeMap::<&str, u64>::new();
        for queue in queues {
            *counts.entry(queue).or_default() += 1;
        }
        for (queue, n) in counts {
            metrics::counter!(PUBLISHED, "queue" => queue.to_owned()).increment(n);
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = queues;
}
