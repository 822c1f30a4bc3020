//! What a subscriber runs for each delivery.

use std::future::Future;
use std::pin::Pin;

use crate::message::Delivery;
use crate::retry::HandlerError;

/// The future a [`Handler`] returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

/// Handles one delivery. `Ok(())` acks it; an `Err` goes through the retry policy; a panic is
/// caught and treated as a retryable error.
///
/// Any `Fn(Delivery) -> impl Future<Output = Result<(), HandlerError>>` that is `Send + Sync`
/// is a handler:
///
/// ```
/// use postbox_core::{Delivery, Handler, HandlerError};
///
/// fn assert_handler(_: impl Handler) {}
/// assert_handler(|delivery: Delivery| async move {
///     let order: serde_json::Value = delivery.json().map_err(HandlerError::reject)?;
///     println!("{order}");
///     Ok(())
/// });
/// ```
///
/// Delivery is at least once: the same message can reach a handler again (after a crash, a
/// lost lease, or an ack that failed to commit), so handlers must be idempotent.
pub trait Handler: Send + Sync + 'static {
    /// Handles `delivery`.
    fn call(&self, delivery: Delivery) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn call(&self, delivery: Delivery) -> HandlerFuture {
        Box::pin(self(delivery))
    }
}
