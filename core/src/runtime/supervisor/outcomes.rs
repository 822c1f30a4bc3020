//! Handler outcomes: recorded as handlers finish, written in batches, counted and reported.

use std::collections::HashSet;

use tokio::task::JoinError;

use super::super::events::{Counters, SubscriberEvent};
use super::super::metrics::Counted;
use super::super::options::SubscriberOptions;
use super::super::workers::Finished;
use super::Supervisor;
use crate::consume::Consume;
use crate::coop::Coop;
use crate::error::{Error, Result};
use crate::message::{Delivery, Lease, MessageId};
use crate::outcome::Outcome;
use crate::retry::HandlerError;
use crate::topic::{Settlement, Topics};

impl<B: Consume + Coop + Topics> Supervisor<B> {
    /// Records the outcomes of every handler that has finished.
    pub(super) fn record_finished(&mut self) {
        self.workers.reap_ready();
        for (delivery, finished) in self.workers.take_finished() {
            self.take_done(delivery, finished);
        }
    }

    fn take_done(&mut self, delivery: Delivery, finished: Finished) {
        match finished {
            Ok(Ok(())) => self.pending.ack(delivery.lease()),
            Ok(Err(error)) => self.pending.fail(delivery, error),
            Err(join) if join.is_panic() => {
                Counters::add(&self.shared.counters.panics, 1);
                let message = panic_message(join);
                tracing::warn!(target: "postbox", message_id = delivery.id, %message, "postbox.handle: handler panicked");
                let error = HandlerError::retry(format!("handler panicked: {message}"));
                self.pending.fail(delivery, error);
            }
            Err(_) => {
                // Cancelled (abandoned at shutdown): the lease stays and expires.
                self.leases.remove(delivery.id);
            }
        }
    }

    /// Writes the outcomes collected so far. On a database error they stay pending and are
    /// retried at the next turn; if that never succeeds, their leases expire and the messages
    /// are delivered again (at least once).
    pub(super) async fn flush_outcomes(&mut self, force: bool) {
        if self.pending.acks_due(force) {
            let leases = self.pending.take_acks();
            if let Err((error, unwritten)) = self.write_acks(leases).await {
                self.shared.record_error(&error);
                self.pending.unwritten_acks(unwritten);
            }
        }
        while let Some((delivery, error)) = self.pending.next_failure() {
            let failed = if self.options.subscription.is_some() {
                self.backend
                    .fail_received(&delivery, &error, &self.options.retry_policy)
                    .await
            } else {
                self.backend
                    .fail(&delivery, &error, &self.options.retry_policy)
                    .await
            };
            match failed {
                Ok(outcome) => {
                    self.leases.remove(delivery.id);
                    let metrics = self.workers.metrics.queue(&delivery.queue);
                    let (counter, counted) = match &outcome {
                        Outcome::Retried { .. } => {
                            (&self.shared.counters.retried, Counted::Retried)
                        }
                        Outcome::DeadLettered { .. } => {
                            (&self.shared.counters.dead_lettered, Counted::DeadLettered)
                        }
                        Outcome::LeaseLost => {
                            (&self.shared.counters.lease_lost, Counted::LeaseLost)
                        }
                        // Not from `fail`, which never acks; counted as what it says.
                        Outcome::Acked => (&self.shared.counters.acked, Counted::Acked),
                    };
                    Counters::add(counter, 1);
                    metrics.count(counted);
                    tracing::debug!(target: "postbox", message_id = delivery.id, ?outcome, "postbox.outcome");
                    self.shared.emit(SubscriberEvent::Handled {
                        id: delivery.id,
                        outcome,
                    });
                }
                Err(db) => {
                    self.shared.record_error(&db);
                    self.pending.unsettled_failure(delivery, error);
                    return;
                }
            }
        }
    }

    /// Acks `leases`, in one statement or one per message. On error, returns the leases not
    /// yet written.
    async fn write_acks(
        &mut self,
        leases: Vec<Lease>,
    ) -> std::result::Result<(), (Error, Vec<Lease>)> {
        let acked: HashSet<MessageId> = if self.options.batch_acks {
            Counters::add(&self.shared.counters.ack_statements, 1);
            // Handlers that end during the round trip are replaced at once.
            let (backend, subscription) = (&self.backend, self.options.subscription.is_some());
            let acking = async {
                if subscription {
                    backend.settle(&leases, Settlement::Ack).await
                } else {
                    backend.ack_batch(&leases).await
                }
            };
            match self.workers.drive(acking).await {
                Ok(ids) => ids.into_iter().collect(),
                Err(e) => return Err((e, leases)),
            }
        } else {
            let mut acked = HashSet::new();
            for (i, lease) in leases.iter().enumerate() {
                Counters::add(&self.shared.counters.ack_statements, 1);
                match Self::settle_one(&self.backend, &self.options, *lease, Settlement::Ack).await
                {
                    Ok(true) => {
                        acked.insert(lease.id);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        self.settled_acks(&leases[..i], &acked);
                        return Err((e, leases[i..].to_vec()));
                    }
                }
            }
            acked
        };
        self.settled_acks(&leases, &acked);
        Ok(())
    }

    fn settled_acks(&mut self, leases: &[Lease], acked: &HashSet<MessageId>) {
        for lease in leases {
            let metrics = self.leases.remove(lease.id).map(|held| held.metrics);
            let (outcome, counted) = if acked.contains(&lease.id) {
                Counters::add(&self.shared.counters.acked, 1);
                (Outcome::Acked, Counted::Acked)
            } else {
                Counters::add(&self.shared.counters.lease_lost, 1);
                (Outcome::LeaseLost, Counted::LeaseLost)
            };
            if let Some(metrics) = metrics {
                metrics.count(counted);
            }
            self.shared.emit(SubscriberEvent::Handled {
                id: lease.id,
                outcome,
            });
        }
    }

    /// Applies `settlement` (ack, renew or release) to one lease, fetched or received;
    /// whether it took effect.
    pub(super) async fn settle_one(
        backend: &B,
        options: &SubscriberOptions,
        lease: Lease,
        settlement: Settlement,
    ) -> Result<bool> {
        if options.subscription.is_some() {
            return Ok(!backend.settle(&[lease], settlement).await?.is_empty());
        }
        match settlement {
            Settlement::Renew => backend.renew_lease(lease).await,
            Settlement::Release => backend.release(lease).await,
            _ => backend.ack(lease).await,
        }
    }
}

fn panic_message(join: JoinError) -> String {
    match join.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into()),
        Err(e) => e.to_string(),
    }
}
