//! Dead letters requeued or purged, under the state lock: all or nothing, as Postgres' one
//! statement.

use async_trait::async_trait;
use postbox_core::{DeadFilter, MessageId, Redrive, Result, validate_queue};

use crate::broker::FakeBroker;
use crate::state::{DeadRow, State};

impl FakeBroker {
    fn redrive_subscription(
        &self,
        subscription: &str,
        filter: &DeadFilter,
        requeue: bool,
    ) -> Result<Vec<MessageId>> {
        filter.validate()?;
        validate_queue(subscription)?;
        let now = self.now();
        let mut state = self.shared.state.lock();
        Ok(state
            .topics
            .redrive_dead(subscription, filter, now, requeue))
    }

    /// Removes the dead letters `filter` selects, in id order.
    fn take_dead(&self, state: &mut State, filter: &DeadFilter) -> Vec<DeadRow> {
        let now = self.now();
        let ids: Vec<MessageId> = state
            .dead
            .values()
            .filter(|d| filter.matches(&d.letter, now))
            .map(|d| d.letter.id)
            .collect();
        ids.iter().filter_map(|id| state.dead.remove(id)).collect()
    }
}

#[async_trait]
impl Redrive for FakeBroker {
    async fn requeue_dead(&self, filter: &DeadFilter) -> Result<Vec<MessageId>> {
        filter.validate()?;
        let now = self.now();
        let mut state = self.shared.state.lock();
        let taken = self.take_dead(&mut state, filter);
        let ids = taken.iter().map(|d| d.letter.id).collect();
        for dead in taken {
            state.insert(dead.requeued(now));
        }
        Ok(ids)
    }

    async fn purge_dead(&self, filter: &DeadFilter) -> Result<Vec<MessageId>> {
        filter.validate()?;
        let mut state = self.shared.state.lock();
        let taken = self.take_dead(&mut state, filter);
        Ok(taken.into_iter().map(|d| d.letter.id).collect())
    }

    async fn requeue_subscription_dead(
        &self,
        subscription: &str,
        filter: &DeadFilter,
    ) -> Result<Vec<MessageId>> {
        self.redrive_subscription(subscription, filter, true)
    }

    async fn purge_subscription_dead(
        &self,
        subscription: &str,
        filter: &DeadFilter,
    ) -> Result<Vec<MessageId>> {
        self.redrive_subscription(subscription, filter, false)
    }
}
