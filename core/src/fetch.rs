//! What a fetch asks for: [`FetchParams`] and its limits.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::message::validate_queue;

/// The default lease time-to-live of a fetch: 30 seconds.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);

/// The largest `limit` a single fetch accepts.
pub const MAX_FETCH_LIMIT: u32 = 10_000;

/// Parameters of [`Consume::fetch`](crate::Consume::fetch).
///
/// ```
/// use std::time::Duration;
/// use postbox_core::FetchParams;
///
/// let p = FetchParams::new(["emails"], 10).lease_ttl(Duration::from_secs(60)).max_deliveries(5);
/// assert_eq!(p.get_limit(), 10);
/// assert_eq!(p.get_lease_ttl(), Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchParams {
    queues: Vec<String>,
    limit: u32,
    lease_ttl: Duration,
    max_deliveries: Option<u32>,
    acquired_by: Option<String>,
}

impl FetchParams {
    /// Fetch up to `limit` messages from `queues`.
    pub fn new<Q: Into<String>>(queues: impl IntoIterator<Item = Q>, limit: u32) -> Self {
        FetchParams {
            queues: queues.into_iter().map(Into::into).collect(),
            limit,
            lease_ttl: DEFAULT_LEASE_TTL,
            max_deliveries: None,
            acquired_by: None,
        }
    }

    /// How long a lease lasts before the message may be fetched again. Defaults to 30 s.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Dead-letters, instead of leasing, a message already leased this many times (a crash
    /// loop: its handler never reported an outcome). Defaults to no limit.
    #[must_use]
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = Some(n);
        self
    }

    /// Records the holder's name in `acquired_by`. Defaults to none.
    #[must_use]
    pub fn acquired_by(mut self, holder: impl Into<String>) -> Self {
        self.acquired_by = Some(holder.into());
        self
    }

    /// The queues to fetch from.
    pub fn get_queues(&self) -> &[String] {
        &self.queues
    }

    /// The maximum number of messages.
    pub fn get_limit(&self) -> u32 {
        self.limit
    }

    /// The lease time-to-live.
    pub fn get_lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// The delivery limit, if any.
    pub fn get_max_deliveries(&self) -> Option<u32> {
        self.max_deliveries
    }

    /// The holder name, if any.
    pub fn get_acquired_by(&self) -> Option<&str> {
        self.acquired_by.as_deref()
    }

    /// Checks the parameters; backends call this before touching storage.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an empty queue list or a limit of 0 or above
    /// [`MAX_FETCH_LIMIT`]; [`Error::InvalidQueue`] for a bad queue name.
    pub fn validate(&self) -> Result<()> {
        check_queues("fetch", &self.queues)?;
        check_limit("fetch limit", self.limit)?;
        check_max_deliveries(self.max_deliveries)
    }
}

// The checks every fetch-like parameter type shares (`FetchParams`, `CoopReceive`, `Receive`,
// `SubscriberOptions`), so they refuse the same input with the same words.

/// Refuses an empty list of queues, or a bad queue name in it; `who` names the caller
/// ("fetch", "a subscriber").
pub(crate) fn check_queues(who: &str, queues: &[String]) -> Result<()> {
    if queues.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{who} needs at least one queue"
        )));
    }
    queues.iter().try_for_each(|q| validate_queue(q))
}

/// Refuses a row limit outside `1..=MAX_FETCH_LIMIT`; `what` names it ("fetch limit").
pub(crate) fn check_limit(what: &str, limit: u32) -> Result<()> {
    if limit == 0 || limit > MAX_FETCH_LIMIT {
        return Err(Error::InvalidArgument(format!(
            "{what} must be between 1 and {MAX_FETCH_LIMIT}, got {limit}"
        )));
    }
    Ok(())
}

/// Refuses a delivery limit of 0 (a message could never be delivered).
pub(crate) fn check_max_deliveries(max: Option<u32>) -> Result<()> {
    if max == Some(0) {
        return Err(Error::InvalidArgument(
            "max_deliveries must be at least 1".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_params_validation() {
        assert!(FetchParams::new(["q"], 1).validate().is_ok());
        let none: [&str; 0] = [];
        for bad in [
            FetchParams::new(none, 1),
            FetchParams::new(["q"], 0),
            FetchParams::new(["q"], MAX_FETCH_LIMIT + 1),
            FetchParams::new([""], 1),
            FetchParams::new(["q"], 1).max_deliveries(0),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
