//! Keeping what the subscriber holds: lease renewal and the cooperative heartbeat.

use std::time::Duration;

use tokio::time::Instant;

use super::super::events::{Counters, SubscriberEvent};
use super::super::metrics::Counted;
use super::Supervisor;
use crate::consume::Consume;
use crate::coop::Coop;
use crate::topic::{Settlement, Topics};

impl<B: Consume + Coop + Topics> Supervisor<B> {
    /// Renews leases older than `every`. A lease found lost is dropped from the waiting
    /// queue (never started); a running handler finishes and its outcome reports the loss.
    pub(super) async fn renew(&mut self, every: Duration) {
        let now = Instant::now();
        let mut renewed = 0;
        for lease in self.leases.due(now, every) {
            match Self::settle_one(&self.backend, &self.options, lease, Settlement::Renew).await {
                Ok(true) => {
                    renewed += 1;
                    self.leases.renewed(lease.id, now);
                }
                Ok(false) => {
                    Counters::add(&self.shared.counters.lease_lost, 1);
                    if let Some(held) = self.leases.remove(lease.id) {
                        held.metrics.count(Counted::LeaseLost);
                    }
                    self.workers.waiting.retain(|d| d.id != lease.id);
                    tracing::warn!(target: "postbox", message_id = lease.id, "postbox.subscriber: lease lost before renewal");
                }
                Err(error) => {
                    self.shared.record_error(&error);
                    return;
                }
            }
        }
        if renewed > 0 {
            self.shared
                .emit(SubscriberEvent::LeasesRenewed { n: renewed });
        }
    }

    /// The cooperative heartbeat: keeps this member alive while its handlers run.
    pub(super) async fn touch(&mut self) {
        let Some(member) = &self.options.subconsumer else {
            return;
        };
        if let Err(error) = self.backend.coop_touch(member).await {
            self.shared.record_error(&error);
        }
    }
}
