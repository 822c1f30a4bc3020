//! Waiting on observable conditions with one deadline, instead of sleeping.

use std::time::Duration;

use postbox_core::runtime::SubscriberEvent;
use tokio::sync::broadcast::{Receiver, error::RecvError};

/// The deadline for waiting on a condition in tests: 20 s, or 60 s when `CI` is set (shared
/// machines are slower). Generous on purpose: a correct test never gets near it.
pub fn deadline() -> Duration {
    if std::env::var_os("CI").is_some() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(20)
    }
}

/// Waits for the first subscriber event matching `pred` and returns it.
///
/// # Panics
///
/// After [`deadline()`], or if the subscriber is gone, listing the events seen meanwhile.
///
/// # Cancel safety
///
/// Cancel safe: it only waits.
pub async fn wait_for_event(
    events: &mut Receiver<SubscriberEvent>,
    what: &str,
    pred: impl Fn(&SubscriberEvent) -> bool,
) -> SubscriberEvent {
    wait_for_event_within(events, what, deadline(), pred).await
}

/// [`wait_for_event`] with an explicit deadline. With paused tokio time the deadline is
/// virtual too, and the clock jumps over the subscriber's own waits (polling, retry delays):
/// give it more virtual time than the schedule needs, e.g. an hour.
///
/// # Panics
///
/// After `within`, or if the subscriber is gone, listing the events seen meanwhile.
///
/// # Cancel safety
///
/// Cancel safe: it only waits.
pub async fn wait_for_event_within(
    events: &mut Receiver<SubscriberEvent>,
    what: &str,
    within: Duration,
    pred: impl Fn(&SubscriberEvent) -> bool,
) -> SubscriberEvent {
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, events.recv()).await {
            Ok(Ok(event)) if pred(&event) => return event,
            Ok(Ok(event)) => seen.push(format!("{event:?}")),
            Ok(Err(RecvError::Lagged(n))) => seen.push(format!("(missed {n})")),
            Ok(Err(RecvError::Closed)) => {
                panic!("waiting for {what}: subscriber gone; saw {seen:?}")
            }
            Err(_) => panic!("waiting for {what}: no such event within {within:?}; saw {seen:?}"),
        }
    }
}

/// Awaits `future`, failing after [`deadline()`] with what it waited for, so a broken
/// backend makes a test fail instead of hang (a subscriber's `shutdown()`, a spawned task).
///
/// # Panics
///
/// After [`deadline()`] (virtual under paused tokio time).
///
/// # Cancel safety
///
/// Cancel safe: it only waits.
pub async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(deadline(), future).await {
        Ok(output) => output,
        Err(_) => panic!("waiting for {what}: not done within {:?}", deadline()),
    }
}

/// Checks `condition` every millisecond until it holds, failing after `limit` with what it
/// waited for. Under paused tokio time each check advances the clock by a millisecond, so
/// give it the virtual time the schedule needs (an hour costs a few seconds of real time).
///
/// # Panics
///
/// After `limit`.
///
/// # Cancel safety
///
/// Cancel safe: it only waits.
pub async fn until_within(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + limit;
    while !condition() {
        if tokio::time::Instant::now() >= until {
            panic!("waiting for {what}: not true within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
