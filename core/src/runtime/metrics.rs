//! A subscriber's metric handles (feature `metrics`; see [`crate::metrics`] for the names).
//!
//! Each queue's handles are registered with the recorder the first time the subscriber sees
//! a message of that queue and kept, so recording is an update of a handle, not a registry
//! look-up. Without the feature every type here is empty and every call compiles to nothing.

use std::time::Duration;

#[cfg(feature = "metrics")]
pub(crate) use enabled::{HandlerTimer, QueueMetrics, SubscriberMetrics};

#[cfg(not(feature = "metrics"))]
pub(crate) use disabled::{HandlerTimer, QueueMetrics, SubscriberMetrics};

/// What a recorded outcome counts as.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counted {
    Acked,
    Retried,
    DeadLettered,
    Released,
    LeaseLost,
}

#[cfg(feature = "metrics")]
mod enabled {
    use std::collections::HashMap;
    use std::sync::Arc;

    use metrics::{Counter, Gauge, Histogram, Label};
    use tokio::time::Instant;

    use super::{Counted, Duration};
    use crate::metrics as names;

    /// The handles of one subscriber, by queue.
    pub(crate) struct SubscriberMetrics {
        subscription: Option<String>,
        queues: HashMap<String, QueueMetrics>,
        fetch_duration: Histogram,
    }

    /// The handles of one queue (or topic) of a subscriber. Cloned for every message
    /// fetched, so it is one reference count, not one per handle.
    #[derive(Clone)]
    pub(crate) struct QueueMetrics(Arc<Handles>);

    struct Handles {
        fetched: Counter,
        acked: Counter,
        retried: Counter,
        dead_lettered: Counter,
        released: Counter,
        lease_lost: Counter,
        handler_duration: Histogram,
        in_flight: Gauge,
    }

    /// A running handler: its start, and the gauge it holds up.
    pub(crate) struct HandlerTimer {
        started: Instant,
        metrics: QueueMetrics,
    }

    impl SubscriberMetrics {
        pub(crate) fn new(queues: &[String], subscription: Option<&str>) -> Self {
            let mut labels = vec![Label::new("queue", queues.join(","))];
            labels.extend(subscription.map(|s| Label::new("subscription", s.to_owned())));
            SubscriberMetrics {
                subscription: subscription.map(str::to_owned),
                queues: HashMap::new(),
                fetch_duration: metrics::histogram!(names::FETCH_DURATION, labels),
            }
        }

        /// The handles of `queue`, registered on first use.
        pub(crate) fn queue(&mut self, queue: &str) -> &QueueMetrics {
            if !self.queues.contains_key(queue) {
                let mut labels = vec![Label::new("queue", queue.to_owned())];
                labels.extend(
                    self.subscription
                        .as_ref()
                        .map(|s| Label::new("subscription", s.clone())),
                );
                let metrics = QueueMetrics(Arc::new(Handles {
                    fetched: metrics::counter!(names::FETCHED, labels.clone()),
                    acked: metrics::counter!(names::ACKED, labels.clone()),
                    retried: metrics::counter!(names::RETRIED, labels.clone()),
                    dead_lettered: metrics::counter!(names::DEAD_LETTERED, labels.clone()),
                    released: metrics::counter!(names::RELEASED, labels.clone()),
                    lease_lost: metrics::counter!(names::LEASE_LOST, labels.clone()),
                    handler_duration: metrics::histogram!(names::HANDLER_DURATION, labels.clone()),
                    in_flight: metrics::gauge!(names::HANDLERS_IN_FLIGHT, labels),
                }));
                self.queues.insert(queue.to_owned(), metrics);
            }
            &self.queues[queue]
        }

        pub(crate) fn fetch_took(&self, elapsed: Duration) {
            self.fetch_duration.record(elapsed.as_secs_f64());
        }
    }

    impl QueueMetrics {
        pub(crate) fn fetched(&self) {
            self.0.fetched.increment(1);
        }

        pub(crate) fn count(&self, outcome: Counted) {
            let handles = &self.0;
            match outcome {
                Counted::Acked => &handles.acked,
                Counted::Retried => &handles.retried,
                Counted::DeadLettered => &handles.dead_lettered,
                Counted::Released => &handles.released,
                Counted::LeaseLost => &handles.lease_lost,
            }
            .increment(1);
        }

        /// A handler of this queue starts now.
        pub(crate) fn handler_started(&self) -> HandlerTimer {
            self.0.in_flight.increment(1.0);
            HandlerTimer {
                started: Instant::now(),
                metrics: self.clone(),
            }
        }
    }

    impl HandlerTimer {
        /// The handler ended (or was aborted).
        pub(crate) fn finish(self) {
            let handles = &self.metrics.0;
            handles.in_flight.decrement(1.0);
            handles
                .handler_duration
                .record(self.started.elapsed().as_secs_f64());
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod disabled {
    use super::{Counted, Duration};

    pub(crate) struct SubscriberMetrics;

    #[derive(Clone)]
    pub(crate) struct QueueMetrics;

    pub(crate) struct HandlerTimer;

    impl SubscriberMetrics {
        pub(crate) fn new(_: &[String], _: Option<&str>) -> Self {
            SubscriberMetrics
        }

        #[inline]
        pub(crate) fn queue(&mut self, _: &str) -> &QueueMetrics {
            &QueueMetrics
        }

        #[inline]
        pub(crate) fn fetch_took(&self, _: Duration) {}
    }

    impl QueueMetrics {
        #[inline]
        pub(crate) fn fetched(&self) {}

        #[inline]
        pub(crate) fn count(&self, _: Counted) {}

        #[inline]
        pub(crate) fn handler_started(&self) -> HandlerTimer {
            HandlerTimer
        }
    }

    impl HandlerTimer {
        #[inline]
        pub(crate) fn finish(self) {}
    }
}
