//! Journal streams: per-stream, append-only event logs with a live channel.
//!
//! - [`record_event`]: one committed insert plus a live publish, for occasional events.
//! - [`BatchedJournalWriter`]: for streams of many small events (a streamed answer): events
//!   are written in batches (16 events or 100 ms), so ~100 single-row commits become ~7, and
//!   go live when stored (or, with [`JournalLive::Payloads`], at once).
//! - [`snapshot_and_tail`]: replay the committed events after a seq, then follow the live
//!   channel, with no gap and no duplicate at the boundary.
//!
//! Live delivery is Postgres `NOTIFY` on the real backend, an in-process broadcast on the
//! fake. By default the channel only announces stored events and readers read them from the
//! table, because anyone who can connect can `NOTIFY`: see [`JournalLive`].

mod live;
mod store;
mod tail;
mod writer;

use chrono::{DateTime, Utc};

pub use live::{JournalLive, LiveEvent, LiveEvents};
pub use store::JournalStore;
pub use tail::{JournalTail, TailOptions, snapshot_and_tail};
pub use writer::{BatchedJournalWriter, MAX_REWRITES_KEPT, Rewrite, WriterOptions, WriterStats};

use crate::error::{Error, Result};
use crate::message::Headers;

/// A JSON object: the only payload shape a journal event accepts (so the live and replay paths
/// produce identical envelopes).
pub type EventPayload = Headers;

/// One event of a journal stream.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct JournalEvent {
    /// The stream.
    pub stream: String,
    /// Its position in the stream (unique per stream).
    pub seq: i64,
    /// The event type (e.g. `"delta"`, `"done"`).
    pub event_type: String,
    /// The payload.
    pub payload: EventPayload,
    /// When it was written (`None` for a live event not read from the journal).
    pub created_at: Option<DateTime<Utc>>,
}

impl JournalEvent {
    /// An event to record.
    pub fn new(
        stream: impl Into<String>,
        seq: i64,
        event_type: impl Into<String>,
        payload: EventPayload,
    ) -> Self {
        JournalEvent {
            stream: stream.into(),
            seq,
            event_type: event_type.into(),
            payload,
            created_at: None,
        }
    }

    /// Builds an event from any JSON value, refusing anything but an object.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `payload` is not a JSON object.
    pub fn from_value(
        stream: impl Into<String>,
        seq: i64,
        event_type: impl Into<String>,
        payload: serde_json::Value,
    ) -> Result<Self> {
        match payload {
            serde_json::Value::Object(map) => Ok(JournalEvent::new(stream, seq, event_type, map)),
            other => Err(Error::InvalidArgument(format!(
                "a journal payload must be a JSON object, got {}",
                json_kind(&other)
            ))),
        }
    }

    /// Checks what an append stores: a stream id of 1 to 255 bytes, a non-empty event type,
    /// no NUL character in either or anywhere in the payload. Every backend runs it before
    /// writing or publishing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.stream.is_empty() || self.stream.len() > 255 {
            return Err(Error::InvalidArgument(
                "a journal stream id must be 1 to 255 bytes".into(),
            ));
        }
        if self.event_type.is_empty() {
            return Err(Error::InvalidArgument(
                "an event type must not be empty".into(),
            ));
        }
        crate::validate::text("journal stream id", &self.stream)?;
        crate::validate::text("event type", &self.event_type)?;
        crate::validate::json("journal payload", &self.payload)
    }

    /// Checks a stream id given to a read or a subscription (no NUL character).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`].
    pub fn validate_stream(stream: &str) -> Result<()> {
        crate::validate::text("journal stream id", stream)
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Writes one event durably (its own transaction) and publishes it live; returns the seq
/// written. If `seq` is taken, retries once at `latest_seq + 1` read from the journal.
///
/// # Errors
///
/// [`Error::InvalidArgument`] for a bad stream or type, [`Error::SeqConflict`] if the retry
/// collides too, [`Error::Database`].
///
/// # Cancel safety
///
/// Not cancel safe: dropped, the event may be stored (its insert is one statement) without its
/// live announcement (readers still find it in the journal), or not stored. Calling again
/// with the same seq after it was stored writes it a second time at `latest_seq + 1`: read
/// [`JournalStore::journal_latest_seq`] first when a call was dropped.
pub async fn record_event<B: JournalStore + ?Sized>(
    backend: &B,
    stream: &str,
    seq: i64,
    event_type: &str,
    payload: EventPayload,
) -> Result<i64> {
    let mut event = JournalEvent::new(stream, seq, event_type, payload);
    event.validate()?;
    let written = append_one_with_retry(backend, &mut event).await?;
    backend.journal_publish(&event).await?;
    Ok(written)
}

/// Inserts `event`; on a seq collision, moves it to `latest + 1` and tries once more.
pub(crate) async fn append_one_with_retry<B: JournalStore + ?Sized>(
    backend: &B,
    event: &mut JournalEvent,
) -> Result<i64> {
    match backend.journal_append(std::slice::from_ref(event)).await {
        Ok(()) => Ok(event.seq),
        Err(Error::SeqConflict { .. }) => {
            let latest = backend
                .journal_latest_seq(&event.stream)
                .await?
                .unwrap_or(0);
            let original = event.seq;
            event.seq = latest + 1;
            backend.journal_append(std::slice::from_ref(event)).await?;
            tracing::info!(target: "postbox", stream = %event.stream, seq = original, written = event.seq, "postbox.journal: seq taken, written at latest + 1");
            Ok(event.seq)
        }
        Err(e) => Err(e),
    }
}
