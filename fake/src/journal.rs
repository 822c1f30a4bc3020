//! Journal streams in memory, mirroring `postbox_core`'s `pg/journal.rs`: a table keyed by
//! `(stream, seq)` and an in-process broadcast as the live channel, which carries what the
//! Postgres channel would under the broker's [`JournalLive`]: announcements of stored events
//! (the highest seq per stream of each append), or whole events at publish time.

use std::collections::BTreeMap;

use postbox_core::journal::{JournalEvent, JournalLive, LiveEvents};
use postbox_core::{Error, Result};

use crate::broker::FakeBroker;
use crate::faults;

impl FakeBroker {
    pub(crate) fn journal_append_now(&self, events: &[JournalEvent]) -> Result<()> {
        let now = self.now();
        let mut state = self.shared.state.lock();
        if let Some(error) = faults::take(&mut state.faults.journal) {
            return Err(error);
        }
        // All or nothing, like one INSERT: check every key first.
        let mut seen = std::collections::HashSet::new();
        if let Some(taken) = events.iter().find(|e| {
            state.journal.contains_key(&(e.stream.clone(), e.seq))
                || !seen.insert((e.stream.clone(), e.seq))
        }) {
            return Err(Error::SeqConflict {
                stream: taken.stream.clone(),
                seq: Some(taken.seq),
            });
        }
        // The highest seq stored per stream: what the Postgres statement announces.
        let mut highest: BTreeMap<&str, i64> = BTreeMap::new();
        for event in events {
            let mut stored = event.clone();
            stored.created_at = Some(now);
            state
                .journal
                .insert((event.stream.clone(), event.seq), stored);
            let top = highest.entry(event.stream.as_str()).or_insert(event.seq);
            *top = (*top).max(event.seq);
        }
        drop(state);
        if self.journal_live_mode() == JournalLive::Stored {
            let announced = events
                .iter()
                .filter(|e| highest.get(e.stream.as_str()) == Some(&e.seq));
            for event in announced {
                // No subscriber is fine: announcements are not durable.
                let _ = self.shared.live.send(event.clone());
            }
        }
        Ok(())
    }

    pub(crate) fn journal_latest_now(&self, stream: &str) -> Option<i64> {
        let state = self.shared.state.lock();
        state
            .journal
            .range((stream.to_owned(), i64::MIN)..=(stream.to_owned(), i64::MAX))
            .next_back()
            .map(|((_, seq), _)| *seq)
    }

    pub(crate) fn journal_read_now(
        &self,
        stream: &str,
        after: i64,
        limit: u32,
    ) -> Vec<JournalEvent> {
        let state = self.shared.state.lock();
        state
            .journal
            .range((stream.to_owned(), after.saturating_add(1))..=(stream.to_owned(), i64::MAX))
            .take(limit as usize)
            .map(|(_, e)| e.clone())
            .collect()
    }

    pub(crate) fn journal_publish_now(&self, event: &JournalEvent) {
        if self.journal_live_mode() == JournalLive::Payloads {
            // No subscriber is fine: live events are not durable.
            let _ = self.shared.live.send(event.clone());
        }
    }

    pub(crate) fn journal_subscribe_now(&self, stream: &str) -> LiveEvents {
        LiveEvents::from_broadcast(
            self.shared.live.subscribe(),
            stream,
            self.journal_live_mode(),
        )
    }

    fn journal_live_mode(&self) -> JournalLive {
        *self.shared.journal_live.lock()
    }

    /// What the journal's live channel carries, as `PgBackend::journal_live` sets it on
    /// Postgres: [`JournalLive::Stored`] (the default) announces events once they are stored
    /// and readers read them from the journal; [`JournalLive::Payloads`] sends each event
    /// whole when it is published. Applies to this broker and every clone of it.
    #[must_use]
    pub fn journal_live(self, live: JournalLive) -> Self {
        *self.shared.journal_live.lock() = live;
        self
    }

    /// Makes the next `n` journal writes fail with `fault`.
    pub fn fail_next_journal_writes(&self, n: u32, fault: crate::Fault) {
        self.shared.state.lock().faults.journal = (n > 0).then_some((n, fault));
    }
}
