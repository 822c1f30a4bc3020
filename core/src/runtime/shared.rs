//! What a running subscriber and its handle share.

use std::sync::atomic::AtomicBool;

use tokio::sync::broadcast;

use super::events::{Counters, SubscriberEvent};
use crate::error::Error;

/// State shared by a running subscriber and its handle.
pub(crate) struct Shared {
    pub(crate) counters: Counters,
    pub(crate) events: broadcast::Sender<SubscriberEvent>,
    pub(crate) running: AtomicBool,
    pub(crate) last_error: parking_lot::Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn emit(&self, event: SubscriberEvent) {
        // No receiver is fine: events are optional.
        let _ = self.events.send(event);
    }

    pub(crate) fn record_error(&self, error: &Error) {
        Counters::add(&self.counters.errors, 1);
        *self.last_error.lock() = Some(error.to_string());
    }
}
