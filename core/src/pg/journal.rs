//! Journal streams on Postgres: the events table and the live channel (`NOTIFY`).
//!
//! `NOTIFY` has no privileges, so by default ([`JournalLive::Stored`]) the channel carries no
//! event: the statement that stores events also announces, per stream, the highest seq it
//! wrote (`{"s": stream, "q": seq, "c": true}`, delivered when it commits), and readers read
//! the events from the table. Whatever else arrives on the channel is, for such a reader, only
//! a reason to read the table again. With [`JournalLive::Payloads`] (opt-in) publishes carry
//! the whole event as JSON when it fits well under the 8000-byte NOTIFY limit, and a pointer
//! (stream and seq) otherwise; the reader then fetches the row.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;

use super::PgBackend;
use crate::error::{Error, Result};
use crate::journal::{JournalEvent, JournalLive, LiveEvent, LiveEvents};

// $1 streams, $2 seqs, $3 types, $4 payloads, $5 pinned now
pub(crate) const APPEND: &str = r#"
INSERT INTO {events} (stream_id, seq, event_type, payload, created_at)
SELECT e.stream_id, e.seq, e.event_type, e.payload, coalesce($5::timestamptz, now())
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::jsonb[])
     AS e(stream_id, seq, event_type, payload)"#;

// As APPEND, and announces per stream the highest seq written, to channel $6, on commit.
pub(crate) const APPEND_ANNOUNCE: &str = r#"
WITH stored AS (
    INSERT INTO {events} (stream_id, seq, event_type, payload, created_at)
    SELECT e.stream_id, e.seq, e.event_type, e.payload, coalesce($5::timestamptz, now())
    FROM unnest($1::text[], $2::bigint[], $3::text[], $4::jsonb[])
         AS e(stream_id, seq, event_type, payload)
    RETURNING stream_id, seq
)
SELECT count(pg_notify($6, json_build_object('s', stream_id, 'q', seq, 'c', true)::text))
FROM (SELECT stream_id, max(seq) AS seq FROM stored GROUP BY stream_id) AS announced"#;

// $1 streams, $2 seqs (pairwise): which of them are stored
pub(crate) const TAKEN: &str = r#"
SELECT e.stream_id, e.seq
FROM {events} AS e
JOIN unnest($1::text[], $2::bigint[]) AS k(stream_id, seq)
  ON e.stream_id = k.stream_id AND e.seq = k.seq"#;

pub(crate) const LATEST: &str = "SELECT max(seq) FROM {events} WHERE stream_id = $1";

// $1 stream, $2 after seq, $3 limit
pub(crate) const READ_AFTER: &str = r#"
SELECT stream_id, seq, event_type, payload, created_at
FROM {events}
WHERE stream_id = $1 AND seq > $2
ORDER BY seq
LIMIT $3"#;

// $1 channel, $2 payloads (in order)
const NOTIFY_MANY: &str =
    "SELECT count(pg_notify($1, p)) FROM unnest($2::text[]) WITH ORDINALITY AS n(p, i)";

/// The notification text of `event`: the whole event, or a pointer when too large.
fn wire_text(event: &JournalEvent) -> Result<String> {
    let mut wire = Wire {
        s: event.stream.clone(),
        q: event.seq,
        c: false,
        t: Some(event.event_type.clone()),
        p: Some(event.payload.clone()),
    };
    let mut text = serde_json::to_string(&wire)?;
    if text.len() > MAX_INLINE {
        wire.t = None;
        wire.p = None;
        text = serde_json::to_string(&wire)?;
    }
    Ok(text)
}

/// How often a journal tail reads the journal behind a transaction pooler, where it cannot
/// `LISTEN` ([`PgBackend::transaction_pooler`]).
const POOLER_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Notifications above this size travel as a pointer (Postgres refuses 8000 bytes and more).
const MAX_INLINE: usize = 7_900;

/// The NOTIFY payload.
#[derive(Serialize, Deserialize)]
struct Wire {
    s: String,
    q: i64,
    /// Set by the storing transaction's announcement: events up to `q` are committed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    c: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    t: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p: Option<serde_json::Map<String, serde_json::Value>>,
}

impl PgBackend {
    pub(crate) async fn journal_append_rows(&self, events: &[JournalEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let streams: Vec<&str> = events.iter().map(|e| e.stream.as_str()).collect();
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let payloads: Vec<serde_json::Value> = events
            .iter()
            .map(|e| serde_json::Value::Object(e.payload.clone()))
            .collect();
        let announce = self.journal_live == JournalLive::Stored;
        let statement = if announce {
            self.shared().sql.journal_append_announce.clone()
        } else {
            self.shared().sql.journal_append.clone()
        };
        let mut query = sqlx::query(statement)
            .persistent(self.shared().persistent())
            .bind(&streams)
            .bind(&seqs)
            .bind(&types)
            .bind(&payloads)
            .bind(self.shared().now());
        if announce {
            query = query.bind(self.shared().table.journal_channel());
        }
        let mut session = self.shared().session().await?;
        let result = query.execute(&mut *session).await;
        match result {
            Ok(_) => Ok(session.done().await?),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                drop(session);
                Err(self.first_taken(events, &streams, &seqs).await?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The conflict a refused append reports, as the fake does: the first event, in batch
    /// order, whose `(stream, seq)` is stored already or repeats an earlier one of the batch.
    async fn first_taken(
        &self,
        events: &[JournalEvent],
        streams: &[&str],
        seqs: &[i64],
    ) -> Result<Error> {
        let mut session = self.shared().session().await?;
        let stored: Vec<(String, i64)> = sqlx::query_as(self.shared().sql.journal_taken.clone())
            .persistent(self.shared().persistent())
            .bind(streams)
            .bind(seqs)
            .fetch_all(&mut *session)
            .await?;
        session.done().await?;
        let stored: std::collections::HashSet<(String, i64)> = stored.into_iter().collect();
        let mut seen = std::collections::HashSet::new();
        let taken = events.iter().find(|e| {
            stored.contains(&(e.stream.clone(), e.seq)) || !seen.insert((&e.stream, e.seq))
        });
        Ok(match taken {
            Some(e) => Error::SeqConflict {
                stream: e.stream.clone(),
                seq: Some(e.seq),
            },
            // Unique violation, yet nothing collides now: not knowable after the fact.
            None => Error::SeqConflict {
                stream: events[0].stream.clone(),
                seq: None,
            },
        })
    }

    pub(crate) async fn journal_latest(&self, stream: &str) -> Result<Option<i64>> {
        let mut session = self.shared().session().await?;
        let latest = sqlx::query_scalar(self.shared().sql.journal_latest.clone())
            .persistent(self.shared().persistent())
            .bind(stream)
            .fetch_one(&mut *session)
            .await?;
        session.done().await?;
        Ok(latest)
    }

    pub(crate) async fn journal_read(
        &self,
        stream: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<JournalEvent>> {
        let mut session = self.shared().session().await?;
        let rows = sqlx::query(self.shared().sql.journal_read_after.clone())
            .persistent(self.shared().persistent())
            .bind(stream)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(&mut *session)
            .await?;
        session.done().await?;
        rows.iter()
            .map(|r| {
                let payload = match r.try_get::<serde_json::Value, _>("payload")? {
                    serde_json::Value::Object(map) => map,
                    _ => serde_json::Map::new(),
                };
                let mut event = JournalEvent::new(
                    r.try_get::<String, _>("stream_id")?,
                    r.try_get("seq")?,
                    r.try_get::<String, _>("event_type")?,
                    payload,
                );
                event.created_at = Some(r.try_get("created_at")?);
                Ok(event)
            })
            .collect()
    }

    pub(crate) async fn journal_notify(&self, event: &JournalEvent) -> Result<()> {
        self.journal_notify_many(std::slice::from_ref(event)).await
    }

    /// One statement for all of `events`, notified in order; nothing unless the backend
    /// sends payloads ([`JournalLive::Stored`] announces events when they are stored).
    pub(crate) async fn journal_notify_many(&self, events: &[JournalEvent]) -> Result<()> {
        if events.is_empty() || self.journal_live == JournalLive::Stored {
            return Ok(());
        }
        let texts = events.iter().map(wire_text).collect::<Result<Vec<_>>>()?;
        let mut session = self.shared().session().await?;
        sqlx::query(NOTIFY_MANY)
            .persistent(self.shared().persistent())
            .bind(self.shared().table.journal_channel())
            .bind(&texts)
            .execute(&mut *session)
            .await?;
        Ok(session.done().await?)
    }

    pub(crate) async fn journal_listen(&self, stream: &str) -> Result<LiveEvents> {
        if !self.shared().persistent() {
            // No LISTEN through a transaction pooler: tell the reader to read the journal
            // every POOLER_POLL instead.
            let (tx, rx) = mpsc::channel(1);
            let task = tokio::spawn(async move {
                let mut tick = tokio::time::interval(POOLER_POLL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if tx.send(LiveEvent::Lagged).await.is_err() {
                        return;
                    }
                }
            });
            return Ok(LiveEvents::from_channel(rx, task));
        }
        // A private one-connection pool: a reader never holds one of the application's.
        let options = (*self.shared().pool.connect_options())
            .clone()
            .application_name("postbox.journal");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(options);
        let mut listener = PgListener::connect_with(&pool).await?;
        listener
            .listen(&self.shared().table.journal_channel())
            .await?;
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(forward(listener, stream.to_owned(), self.journal_live, tx));
        Ok(LiveEvents::from_channel(rx, task))
    }
}

/// What a notification means to a reader of `stream` under `live`: under
/// [`JournalLive::Stored`] never an event, only a reason to read the journal (so a forged
/// notification cannot inject anything); under [`JournalLive::Payloads`] the event it carries.
fn live_event(wire: Wire, stream: &str, live: JournalLive) -> Option<LiveEvent> {
    if wire.s != stream {
        return None;
    }
    Some(match (live, wire.c, wire.t, wire.p) {
        (JournalLive::Stored, ..) | (_, true, ..) => LiveEvent::Stored { seq: wire.q },
        (JournalLive::Payloads, false, Some(t), Some(p)) => {
            LiveEvent::Event(JournalEvent::new(wire.s, wire.q, t, p))
        }
        (JournalLive::Payloads, false, ..) => LiveEvent::Pointer { seq: wire.q },
    })
}

/// Forwards the stream's notifications; reports a lost connection or a full buffer as
/// [`LiveEvent::Lagged`] so the reader re-reads the journal.
async fn forward(
    mut listener: PgListener,
    stream: String,
    live: JournalLive,
    tx: mpsc::Sender<LiveEvent>,
) {
    let mut lagged = false;
    loop {
        let event = match listener.try_recv().await {
            Ok(Some(n)) => match serde_json::from_str::<Wire>(n.payload()) {
                Ok(wire) => match live_event(wire, &stream, live) {
                    Some(event) => event,
                    None => continue,
                },
                Err(_) => continue,
            },
            // The connection dropped (and was re-established): notifications may be lost.
            Ok(None) => LiveEvent::Lagged,
            Err(_) => return,
        };
        if lagged {
            if tx.send(LiveEvent::Lagged).await.is_err() {
                return;
            }
            lagged = false;
        }
        match tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => lagged = true,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}
