//! [`Store`]: what every capability trait of a backend builds on.

use crate::table::TableName;

/// A postbox store: the table it serves and whether it was shut down.
///
/// Every capability trait ([`Publish`](crate::Publish), [`Consume`](crate::Consume),
/// [`Inspect`](crate::Inspect), [`Coop`](crate::Coop), [`JournalStore`](crate::JournalStore),
/// [`Topics`](crate::Topics), [`Depth`](crate::Depth)) builds on it, so code that needs one
/// capability bounds on that trait alone, and a wrapper that changes one capability (a test
/// double, a metrics layer) implements only what it changes plus this.
pub trait Store: Send + Sync + 'static {
    /// The outbox table this store reads and writes.
    fn table(&self) -> &TableName;

    /// Whether the store was shut down for good (for Postgres: its pool was closed). A
    /// subscriber whose backend is closed stops instead of retrying forever.
    fn is_closed(&self) -> bool {
        false
    }
}
