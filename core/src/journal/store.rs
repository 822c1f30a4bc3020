//! [`JournalStore`]: the storage and live channel behind journal streams.

use async_trait::async_trait;

use super::{JournalEvent, LiveEvents};
use crate::error::Result;
use crate::store::Store;

/// Stores journal events and carries their live channel.
///
/// [`record_event`](super::record_event), [`BatchedJournalWriter`](super::BatchedJournalWriter)
/// and [`snapshot_and_tail`](super::snapshot_and_tail) are written against it.
#[async_trait]
pub trait JournalStore: Store {
    /// Writes `events` durably in one transaction (one multi-row insert).
    ///
    /// # Errors
    ///
    /// [`Error::SeqConflict`](crate::Error::SeqConflict) if a `(stream, seq)` is taken (nothing is written);
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// One statement, all of the events or none: dropped, they may or may not be stored.
    /// Appending the same seqs again then reports `Error::SeqConflict` if they were.
    async fn journal_append(&self, events: &[JournalEvent]) -> Result<()>;

    /// The highest seq written in `stream`, if any.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only; drop the call and make it again.
    async fn journal_latest_seq(&self, stream: &str) -> Result<Option<i64>>;

    /// Up to `limit` committed events of `stream` with `seq > after`, in seq order.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only; drop the call and make it again.
    async fn journal_read_after(
        &self,
        stream: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<JournalEvent>>;

    /// Publishes `event` on the stream's live channel (not durable), if the backend's
    /// [`JournalLive`](super::JournalLive) sends payloads; under the default,
    /// `JournalLive::Stored`, it only validates the event: events go live when
    /// [`journal_append`](Self::journal_append) stores them.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Dropped, the live notification may or may not have been sent; readers catch up from the
    /// stored journal.
    async fn journal_publish(&self, event: &JournalEvent) -> Result<()>;

    /// Publishes several events live, in order; backends may send them in one round trip.
    /// Defaults to one [`journal_publish`](Self::journal_publish) per event.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Dropped, the live notifications may or may not have been sent; readers catch up from the
    /// stored journal.
    async fn journal_publish_batch(&self, events: &[JournalEvent]) -> Result<()> {
        for event in events {
            self.journal_publish(event).await?;
        }
        Ok(())
    }

    /// Subscribes to `stream`'s live channel.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the channel cannot be listened to.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call leaves no subscription behind (its connection is closed).
    async fn journal_subscribe(&self, stream: &str) -> Result<LiveEvents>;
}
