//! Subscriber settings.

use std::time::Duration;

use crate::coop::Member;
use crate::error::{Error, Result};
use crate::fetch::{DEFAULT_LEASE_TTL, MAX_FETCH_LIMIT};
use crate::message::validate_queue;
use crate::retry::RetryPolicy;

/// The default of [`SubscriberOptions::max_prefetch`].
const DEFAULT_MAX_PREFETCH: usize = 512;

/// Settings of a [`Subscriber`](crate::Subscriber). Setters consume and return `self`; every
/// setter names its default. Cross-field checks happen in
/// [`Subscriber::new`](crate::Subscriber::new).
///
/// ```
/// use std::time::Duration;
/// use postbox_core::{RetryPolicy, SubscriberOptions};
///
/// let options = SubscriberOptions::new(["emails", "sms"])
///     .max_workers(32)
///     .prefetch(32)
///     .lease_ttl(Duration::from_secs(60))
///     .retry_policy(RetryPolicy::exponential(Duration::from_secs(2), 2.0, Duration::from_secs(600)))
///     .max_deliveries(20);
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct SubscriberOptions {
    pub(crate) queues: Vec<String>,
    pub(crate) max_workers: usize,
    pub(crate) prefetch: usize,
    pub(crate) max_prefetch: usize,
    pub(crate) lease_ttl: Duration,
    pub(crate) min_fetch_interval: Duration,
    pub(crate) max_fetch_interval: Duration,
    pub(crate) retry_policy: RetryPolicy,
    pub(crate) max_deliveries: Option<u32>,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) shutdown_grace: Duration,
    pub(crate) batch_acks: bool,
    pub(crate) ack_delay: Duration,
    pub(crate) wake_ups: bool,
    pub(crate) wake_up_retry_interval: Duration,
    pub(crate) wake_up_check_interval: Duration,
    pub(crate) error_backoff_min: Duration,
    pub(crate) error_backoff_max: Duration,
    pub(crate) subconsumer: Option<Member>,
    pub(crate) dead_interval: Option<Duration>,
    pub(crate) subscription: Option<String>,
}

impl SubscriberOptions {
    /// Options for consuming `queues`, with every other setting at its default.
    pub fn new<Q: Into<String>>(queues: impl IntoIterator<Item = Q>) -> Self {
        SubscriberOptions {
            queues: queues.into_iter().map(Into::into).collect(),
            max_workers: 16,
            prefetch: 16,
            max_prefetch: DEFAULT_MAX_PREFETCH,
            lease_ttl: DEFAULT_LEASE_TTL,
            min_fetch_interval: Duration::from_secs(1),
            max_fetch_interval: Duration::from_secs(10),
            retry_policy: RetryPolicy::default(),
            max_deliveries: None,
            shutdown_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            batch_acks: true,
            ack_delay: Duration::ZERO,
            wake_ups: true,
            wake_up_retry_interval: Duration::from_secs(5),
            wake_up_check_interval: Duration::from_secs(30),
            error_backoff_min: Duration::from_millis(100),
            error_backoff_max: Duration::from_secs(30),
            subconsumer: None,
            subscription: None,
            dead_interval: None,
        }
    }

    /// How many handlers run at once. Defaults to 16.
    #[must_use]
    pub fn max_workers(mut self, n: usize) -> Self {
        self.max_workers = n;
        self
    }

    /// How many fetched messages may wait for a free worker, at least: the prefetch buffer
    /// starts here and comes back here whenever a fetch finds the queue drained or the
    /// handlers busy. Their lease clock is ticking while they wait (the runtime renews it), so
    /// keep this small; see [`max_prefetch`](Self::max_prefetch) for the buffer growing on
    /// its own while it pays. Defaults to 16.
    #[must_use]
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n;
        self
    }

    /// How far the prefetch buffer may grow while the handlers outrun the fetches. After a
    /// full fetch during which the handlers used up the buffer and left a worker idle (the
    /// fetch round trip was the bottleneck), the buffer doubles, up to this; after a full one
    /// that returned to a busy subscriber it halves, and after one that found fewer rows than
    /// it asked for it returns to [`prefetch`](Self::prefetch). So a deep queue of fast handlers drains in
    /// batches of hundreds (a fetch costs less per row the more rows it leases), while slow
    /// handlers never park more than `prefetch` leased messages in one subscriber's buffer
    /// for long. Set it equal to `prefetch` for a fixed buffer. Each fetch still asks for at
    /// most [`MAX_FETCH_LIMIT`] rows. Defaults to 512.
    ///
    /// A [`subscription`](Self::subscription) drains fastest with a larger buffer: a receive
    /// writes one batch row however many messages it hands out, so its cost per message falls
    /// as the batch grows (queues write every leased row, so they gain little). With fast
    /// handlers, `max_prefetch(4096)` or a fixed buffer of a few thousand drains a deep
    /// subscription about 1.4× faster than the default (`bench drain`, *topic_big_batches*).
    #[must_use]
    pub fn max_prefetch(mut self, n: usize) -> Self {
        self.max_prefetch = n;
        self
    }

    /// How long a fetched message stays leased without an outcome or a renewal. The runtime
    /// renews leases of running and waiting messages every third of this. Defaults to 30 s.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// The first idle polling interval: after a fetch that found nothing, the next poll waits
    /// this long, then twice as long, up to [`max_fetch_interval`](Self::max_fetch_interval),
    /// with jitter. A fetched message resets it; a notification short-circuits the wait.
    /// Defaults to 1 s.
    #[must_use]
    pub fn min_fetch_interval(mut self, interval: Duration) -> Self {
        self.min_fetch_interval = interval;
        self
    }

    /// The longest idle polling interval (the pick-up latency without LISTEN). Defaults to
    /// 10 s.
    #[must_use]
    pub fn max_fetch_interval(mut self, interval: Duration) -> Self {
        self.max_fetch_interval = interval;
        self
    }

    /// What to do with failed messages. Defaults to [`RetryPolicy::default`] (exponential,
    /// 1 s doubling to 300 s, 10 attempts).
    #[must_use]
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry_policy = policy;
        self
    }

    /// Dead-letters a message leased this many times without an outcome (a handler that
    /// crashes its process every time). Defaults to no limit.
    #[must_use]
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = Some(n);
        self
    }

    /// How long [`shutdown`](crate::runtime::SubscriberHandle::shutdown) waits for running handlers
    /// before abandoning them (their messages stay leased and are redelivered after
    /// `lease_ttl`). Defaults to 30 s.
    #[must_use]
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// How long before the [`shutdown_timeout`](Self::shutdown_timeout) aborts them running
    /// handlers are asked to stop ([`Delivery::cancelled`](crate::Delivery::cancelled)
    /// resolves). Until then a shutdown lets them finish undisturbed; from then a handler
    /// that watches the signal has this long to end and have its outcome recorded. A grace
    /// at or above the timeout asks them at once. Defaults to 5 s.
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Acks successes together in one statement per group of completions (`true`), or one
    /// statement per message (`false`). Defaults to `true`.
    #[must_use]
    pub fn batch_acks(mut self, batch: bool) -> Self {
        self.batch_acks = batch;
        self
    }

    /// With batched acks, how long a success may wait for others to share its ack statement
    /// (64 pending acks flush at once). A few milliseconds cut the statements of a subscriber
    /// whose handlers finish one by one; the cost is that a crash in that window redelivers
    /// those messages (at least once, as always). Defaults to 0 (ack at once).
    #[must_use]
    pub fn ack_delay(mut self, delay: Duration) -> Self {
        self.ack_delay = delay;
        self
    }

    /// Whether to follow the engine's wake-ups (on Postgres, a LISTEN connection that hears
    /// each commit), so a published message is fetched at once instead of at the next poll.
    /// Off, the subscriber polls only and opens just its fetch connection. Defaults to `true`.
    ///
    /// This and the two settings below apply to backends with an
    /// [engine](crate::Consume::engine); without one (the fake, or Postgres behind a pooler in
    /// transaction mode, built with `PgBackend::transaction_pooler`) there are no wake-ups and
    /// the subscriber always polls.
    #[must_use]
    pub fn wake_ups(mut self, on: bool) -> Self {
        self.wake_ups = on;
        self
    }

    /// How long to wait before opening the wake-up source again after it failed. Defaults to
    /// 5 s. See [`wake_ups`](Self::wake_ups).
    #[must_use]
    pub fn wake_up_retry_interval(mut self, interval: Duration) -> Self {
        self.wake_up_retry_interval = interval;
        self
    }

    /// How often to check that an otherwise silent wake-up source is alive (a dead socket can
    /// look like a quiet one). Defaults to 30 s. See [`wake_ups`](Self::wake_ups).
    #[must_use]
    pub fn wake_up_check_interval(mut self, interval: Duration) -> Self {
        self.wake_up_check_interval = interval;
        self
    }

    /// The backoff after a database error: starts at `min`, doubles up to `max`, with jitter;
    /// reset by the next successful fetch. Defaults to 100 ms and 30 s.
    #[must_use]
    pub fn error_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.error_backoff_min = min;
        self.error_backoff_max = max;
        self
    }

    /// Consumes as `member` of a cooperative group: fetches with
    /// [`coop_receive`](crate::Coop::coop_receive), so siblings in this or other processes
    /// split the work with no duplicate delivery, and touches the member (its heartbeat) while
    /// it runs. Defaults to none (plain fetch).
    #[must_use]
    pub fn subconsumer(mut self, member: Member) -> Self {
        self.subconsumer = Some(member);
        self
    }

    /// Consumes the subscription `name` (see [`Topics`](crate::Topics)) instead of queues:
    /// receives with [`Topics::receive`](crate::Topics::receive) and settles with
    /// [`Topics::settle`](crate::Topics::settle). The queues given to [`new`](Self::new) are
    /// then the topics whose notifications wake the subscriber: give the subscription's
    /// topic. Several subscribers of one subscription, in this process or others, split its
    /// messages (each message to one of them), with no registration and no heartbeat: a
    /// receiver that dies leaves its leases to expire. Defaults to none (queues).
    #[must_use]
    pub fn subscription(mut self, name: impl Into<String>) -> Self {
        self.subscription = Some(name.into());
        self
    }

    /// With [`subconsumer`](Self::subconsumer): take over rows of siblings silent for longer
    /// than `interval`. The runtime touches its own member every third of it, so a slow but
    /// live member is never robbed. Defaults to never taking over; setting it without a
    /// subconsumer is a configuration error.
    #[must_use]
    pub fn dead_interval(mut self, interval: Duration) -> Self {
        self.dead_interval = Some(interval);
        self
    }

    /// How often the runtime touches its subconsumer: a third of the dead interval, or 10 s.
    pub(crate) fn touch_every(&self) -> Duration {
        self.dead_interval
            .map_or(Duration::from_secs(10), |d| d / 3)
            .max(Duration::from_millis(10))
    }

    /// The most messages one fetch asks for: every worker busy plus a full prefetch buffer.
    pub(crate) fn capacity(&self) -> usize {
        self.max_workers + self.prefetch
    }

    /// The largest the prefetch buffer grows: `max_prefetch`, at least `prefetch`, and small
    /// enough that one fetch never asks for more than [`MAX_FETCH_LIMIT`] rows.
    pub(crate) fn prefetch_ceiling(&self) -> usize {
        let room = (MAX_FETCH_LIMIT as usize).saturating_sub(self.max_workers);
        self.max_prefetch.min(room).max(self.prefetch)
    }

    /// Checks every field and the relations between them.
    pub(crate) fn validate(&self) -> Result<()> {
        let invalid = |msg: String| Err(Error::InvalidArgument(msg));
        crate::fetch::check_queues("a subscriber", &self.queues)?;
        if self.max_workers == 0 {
            return invalid("max_workers must be at least 1".into());
        }
        if self.capacity() > MAX_FETCH_LIMIT as usize {
            return invalid(format!(
                "max_workers + prefetch must be at most {MAX_FETCH_LIMIT}"
            ));
        }
        if self.lease_ttl < Duration::from_millis(100) {
            return invalid(format!(
                "lease_ttl must be at least 100 ms, got {:?}",
                self.lease_ttl
            ));
        }
        if self.min_fetch_interval.is_zero() || self.min_fetch_interval > self.max_fetch_interval {
            return invalid(format!(
                "need 0 < min_fetch_interval <= max_fetch_interval, got {:?} and {:?}",
                self.min_fetch_interval, self.max_fetch_interval
            ));
        }
        if self.error_backoff_min.is_zero() || self.error_backoff_min > self.error_backoff_max {
            return invalid("need 0 < error backoff min <= max".into());
        }
        crate::fetch::check_max_deliveries(self.max_deliveries)?;
        if self.dead_interval.is_some() && self.subconsumer.is_none() {
            return invalid(
                "dead_interval needs a subconsumer (SubscriberOptions::subconsumer)".into(),
            );
        }
        if let Some(name) = &self.subscription {
            validate_queue(name)?;
            if self.subconsumer.is_some() {
                return invalid(
                    "a subscriber consumes a subscription or is a subconsumer, not both (receivers of one subscription already split its messages)".into(),
                );
            }
        }
        if self.dead_interval.is_some_and(|d| d.is_zero()) {
            return invalid("dead_interval must be positive".into());
        }
        if self.wake_up_retry_interval.is_zero() || self.wake_up_check_interval.is_zero() {
            return invalid("wake-up intervals must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(SubscriberOptions::new(["q"]).validate().is_ok());
    }

    #[test]
    fn invalid_combinations_are_refused() {
        let none: [&str; 0] = [];
        let bad = [
            SubscriberOptions::new(none),
            SubscriberOptions::new([""]),
            SubscriberOptions::new(["q"]).max_workers(0),
            SubscriberOptions::new(["q"])
                .max_workers(9_000)
                .prefetch(2_000),
            SubscriberOptions::new(["q"]).lease_ttl(Duration::from_millis(10)),
            SubscriberOptions::new(["q"])
                .min_fetch_interval(Duration::from_secs(5))
                .max_fetch_interval(Duration::from_secs(1)),
            SubscriberOptions::new(["q"]).min_fetch_interval(Duration::ZERO),
            SubscriberOptions::new(["q"]).max_deliveries(0),
            SubscriberOptions::new(["q"])
                .error_backoff(Duration::from_secs(2), Duration::from_secs(1)),
        ];
        for options in bad {
            assert!(options.validate().is_err(), "{options:?}");
        }
    }
}
