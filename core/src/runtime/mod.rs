//! The subscriber runtime: long-running consumers built on any [`Backend`](crate::Backend).
//!
//! - [`Subscriber`]: fetches, runs a [`Handler`] on up to `max_workers` tasks, records
//!   outcomes (acks batched), renews leases, backs off on errors, shuts down gracefully.
//! - [`SubscriberOptions`]: its settings, each with its default.
//! - [`SubscriberHandle`]: `shutdown()` or `shutdown_on(`[`shutdown_signal`]`()?)`, health (`is_running`, `last_error`), [`Stats`] and
//!   [`SubscriberEvent`]s.
//!
//! With Postgres the loop holds one persistent fetch connection and one LISTEN connection;
//! a notification for a subscribed queue wakes it at once, so pick-up latency is that of a
//! round trip rather than of the polling interval. Without LISTEN (refused by a pooler, or
//! the fake) it polls, backing off from `min_fetch_interval` to `max_fetch_interval`.

mod escalation;
mod events;
mod handler;
mod metrics;
mod options;
mod shared;
mod signal;
mod subscriber;
mod supervisor;
mod wake_ups;
mod window;
mod workers;

pub use events::{ShutdownReport, Stats, SubscriberEvent};
pub use handler::{Handler, HandlerFuture};
pub use options::SubscriberOptions;
pub use signal::shutdown_signal;
pub use subscriber::{Subscriber, SubscriberHandle};
