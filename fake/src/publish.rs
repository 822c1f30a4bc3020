//! Publishing on the fake: transactions begun, messages staged in them, committed.

use async_trait::async_trait;
use postbox_core::{Availability, Message, MessageId, Publish, Result, StoredMessage};
use uuid::Uuid;

use crate::broker::FakeBroker;
use crate::clock::{micros, plus};
use crate::faults;
use crate::state::{Row, State};
use crate::tx::{FakeConn, FakeTransaction};

impl FakeBroker {
    /// The messages of `queue` (or of all queues), in id order, as the transaction `conn` sees
    /// them: the committed ones plus what it published and has not committed yet. Like
    /// Postgres, states are judged at the transaction's start time (its `now()`).
    pub fn messages_in(&self, conn: &FakeConn, queue: Option<&str>) -> Vec<StoredMessage> {
        let now = conn.started_at;
        let state = self.shared.state.lock();
        let mut rows: Vec<StoredMessage> = state
            .rows
            .values()
            .chain(&conn.pending)
            .filter(|r| queue.is_none_or(|q| r.queue == q))
            .map(|r| r.stored(now))
            .collect();
        rows.sort_by_key(|m| m.id);
        rows
    }

    fn row(&self, conn: &FakeConn, state: &mut State, message: Message) -> Row {
        let at = conn.started_at;
        let next_attempt_at = match message.get_availability() {
            Availability::After(d) => plus(at, d),
            Availability::At(t) => micros(t),
            _ => at,
        };
        Row {
            id: state.allocate_id(),
            queue: message.get_queue().to_owned(),
            payload: message.get_payload().to_vec(),
            headers: message.get_headers().cloned(),
            correlation_id: message.get_correlation_id().unwrap_or_else(Uuid::new_v4),
            attempts: 0,
            deliveries: 0,
            created_at: at,
            next_attempt_at,
            first_attempt_at: None,
            last_attempt_at: None,
            lease: None,
            acquired_by: None,
            last_error: None,
        }
    }
}

#[async_trait]
impl Publish for FakeBroker {
    type Conn = FakeConn;
    type Tx = FakeTransaction;

    async fn begin(&self) -> Result<FakeTransaction> {
        Ok(FakeTransaction::new(self.clone(), self.now()))
    }

    async fn commit(&self, tx: FakeTransaction) -> Result<()> {
        tx.commit();
        Ok(())
    }

    async fn rollback(&self, tx: FakeTransaction) -> Result<()> {
        drop(tx);
        Ok(())
    }

    async fn publish(&self, conn: &mut FakeConn, mut message: Message) -> Result<MessageId> {
        message.validate_for_queue()?;
        postbox_core::trace::inject_current(&mut message);
        let mut state = self.shared.state.lock();
        if let Some(error) = faults::take(&mut state.faults.publish) {
            return Err(error);
        }
        let row = self.row(conn, &mut state, message);
        let id = row.id;
        postbox_core::metrics::published([row.queue.as_str()]);
        conn.pending.push(row);
        Ok(id)
    }

    async fn publish_batch(
        &self,
        conn: &mut FakeConn,
        messages: Vec<Message>,
    ) -> Result<Vec<MessageId>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        messages.iter().try_for_each(Message::validate_for_queue)?;
        let mut state = self.shared.state.lock();
        if let Some(error) = faults::take(&mut state.faults.publish) {
            return Err(error);
        }
        let mut ids = Vec::with_capacity(messages.len());
        for mut message in messages {
            postbox_core::trace::inject_current(&mut message);
            let row = self.row(conn, &mut state, message);
            ids.push(row.id);
            conn.pending.push(row);
        }
        let published = &conn.pending[conn.pending.len() - ids.len()..];
        postbox_core::metrics::published(published.iter().map(|row| row.queue.as_str()));
        Ok(ids)
    }
}
