//! The signal a running handler gets when its subscriber is shutting down.
//!
//! A [`Delivery`](crate::Delivery) carries it so that a handler needs no second argument:
//! `delivery.cancelled().await` in a `select!` beside the work. Deliveries made outside a
//! subscriber carry none and are never cancelled.

use std::fmt;

use tokio_util::sync::CancellationToken;

/// A delivery's cancellation signal: the subscriber's token, or none.
///
/// Equal to every other signal, so that comparing deliveries compares the messages.
#[derive(Clone, Default)]
pub(crate) struct Cancellation(Option<CancellationToken>);

impl Cancellation {
    /// The signal of `token`.
    pub(crate) fn of(token: &CancellationToken) -> Self {
        Cancellation(Some(token.clone()))
    }

    /// Whether the signal has gone out.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.0.as_ref().is_some_and(CancellationToken::is_cancelled)
    }

    /// Resolves once the signal goes out; never without a token.
    pub(crate) async fn cancelled(&self) {
        match &self.0 {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    }
}

impl PartialEq for Cancellation {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for Cancellation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_cancelled() {
            "cancelled"
        } else {
            "running"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_signal_follows_its_token_and_none_never_fires() {
        let token = CancellationToken::new();
        let signal = Cancellation::of(&token);
        assert!(!signal.is_cancelled());
        token.cancel();
        assert!(signal.is_cancelled());
        signal.cancelled().await;

        let none = Cancellation::default();
        assert!(!none.is_cancelled());
        let waited = tokio::time::timeout(std::time::Duration::from_millis(10), none.cancelled());
        assert!(
            waited.await.is_err(),
            "a delivery outside a subscriber is never cancelled"
        );
        assert_eq!(none, signal, "the signal does not take part in equality");
    }
}
