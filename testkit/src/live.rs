//! [`JournalLiveControl`]: the same backend with another [`JournalLive`] setting, so a
//! conformance case can run the journal's live channel in either mode.

use postbox_core::PgBackend;
use postbox_core::journal::JournalLive;
use postbox_fake::FakeBroker;

/// A backend whose journal live channel can be switched (see [`JournalLive`]).
pub trait JournalLiveControl: Sized {
    /// This backend, with its journal's live channel carrying `live`. On the fake the setting
    /// is shared by every clone of the broker.
    fn with_journal_live(&self, live: JournalLive) -> Self;
}

impl JournalLiveControl for PgBackend {
    fn with_journal_live(&self, live: JournalLive) -> Self {
        self.clone().journal_live(live)
    }
}

impl JournalLiveControl for FakeBroker {
    fn with_journal_live(&self, live: JournalLive) -> Self {
        self.clone().journal_live(live)
    }
}
