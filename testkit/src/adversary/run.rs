//! One run of a world: publish, apply a schedule's faults, deliver the rest, observe.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use postbox_core::{
    Backend, Delivery, FetchParams, Handler, HandlerError, Message, MessageId, MessageState,
    Outcome, RetryParams, RetryPolicy,
};

use super::AdversaryError;
use super::schedule::{Fault, Schedule};
use super::world::World;
use crate::time::TimeControl;

/// The lease every fetch takes.
const LEASE: Duration = Duration::from_secs(30);
/// How far the clock moves to expire a lease.
const EXPIRE: Duration = Duration::from_secs(31);
/// Deliveries per message after which a run is declared stuck.
const MAX_DELIVERIES_PER_MESSAGE: usize = 64;

/// A run in progress, and its log.
pub(super) struct Run<'w, B, H, S> {
    world: &'w World<B, H, S>,
    queues: Vec<String>,
    names: HashMap<MessageId, usize>,
    policy: RetryPolicy,
    pub(super) log: Vec<String>,
    deliveries: usize,
    budget: usize,
}

impl<'w, B, H, S> Run<'w, B, H, S>
where
    B: Backend + TimeControl,
    H: Handler,
{
    /// Publishes `messages` in one committed transaction.
    pub(super) async fn start(
        world: &'w World<B, H, S>,
        messages: &[Message],
        policy: RetryPolicy,
    ) -> Result<Self, AdversaryError> {
        let backend = &world.backend;
        let mut tx = backend.begin().await?;
        let ids = backend.publish_batch(&mut tx, messages.to_vec()).await?;
        backend.commit(tx).await?;
        let mut queues: Vec<String> = messages.iter().map(|m| m.get_queue().to_owned()).collect();
        queues.sort();
        queues.dedup();
        Ok(Run {
            world,
            queues,
            names: ids.into_iter().enumerate().map(|(i, id)| (id, i)).collect(),
            policy,
            log: Vec::new(),
            deliveries: 0,
            budget: messages.len().max(1) * MAX_DELIVERIES_PER_MESSAGE,
        })
    }

    /// Applies each fault of `schedule` to the next delivery, then delivers normally until no
    /// message is left.
    pub(super) async fn play(&mut self, schedule: &Schedule) -> Result<(), AdversaryError> {
        for &fault in &schedule.faults {
            if !self.apply(fault).await? {
                self.log
                    .push(format!("no message left for the fault \"{fault}\""));
                break;
            }
        }
        while self.apply(Fault::Deliver).await? {}
        Ok(())
    }

    /// Applies `fault` to the next delivery; `false` when every message is settled.
    async fn apply(&mut self, fault: Fault) -> Result<bool, AdversaryError> {
        let Some(delivery) = self.next().await? else {
            return Ok(false);
        };
        let what = self.describe(&delivery);
        let line = match fault {
            Fault::Deliver => {
                let result = self.handle(&delivery).await;
                let settled = self.settle(&delivery, &result).await?;
                format!("{what}: {}, {settled}", outcome(&result))
            }
            Fault::CrashBeforeAck => {
                let result = self.handle(&delivery).await;
                format!(
                    "{what}: {}, then the consumer crashed before settling",
                    outcome(&result)
                )
            }
            Fault::RetryAfterEffect => {
                let result = self.handle(&delivery).await;
                let params = RetryParams::new(Duration::ZERO)
                    .error("adversary: a failure after the handler returned");
                let retried = self.world.backend.retry(delivery.lease(), params).await?;
                format!(
                    "{what}: {}, then failed and {}",
                    outcome(&result),
                    if retried {
                        "was retried"
                    } else {
                        "lost its lease"
                    }
                )
            }
            Fault::ConcurrentRedelivery => self.concurrently(delivery, what).await?,
            Fault::CrashBeforeHandle => {
                format!("{what}: received, then the consumer crashed before handling")
            }
        };
        self.log.push(format!("[{fault}] {line}"));
        Ok(true)
    }

    /// The lease of `first` expires while its handler runs; a second consumer receives the
    /// message, and both handlers run at once.
    async fn concurrently(
        &mut self,
        first: Delivery,
        what: String,
    ) -> Result<String, AdversaryError> {
        self.advance(EXPIRE).await?;
        let mut second = None;
        for delivery in self.fetch(u32::MAX).await? {
            if delivery.id == first.id && second.is_none() {
                second = Some(delivery);
            } else {
                self.world.backend.release(delivery.lease()).await?;
            }
        }
        let Some(second) = second else {
            // Not reclaimable (a backend that does not expire leases would be a bug of its
            // own): the first consumer goes on alone.
            let result = self.handle(&first).await;
            let settled = self.settle(&first, &result).await?;
            return Ok(format!(
                "{what}: {}, {settled} (no second delivery)",
                outcome(&result)
            ));
        };
        self.deliveries += 1;
        let (r1, r2) = tokio::join!(self.handle(&first), self.handle(&second));
        let s1 = self.settle(&first, &r1).await?;
        let s2 = self.settle(&second, &r2).await?;
        Ok(format!(
            "{what} and, after its lease expired, delivery {} to a second consumer; both \
             handlers ran at once: first {}, {s1}; second {}, {s2}",
            second.deliveries,
            outcome(&r1),
            outcome(&r2),
        ))
    }

    /// The next delivery, moving the clock when leases must expire or retries come due;
    /// `None` when every message is settled.
    async fn next(&mut self) -> Result<Option<Delivery>, AdversaryError> {
        loop {
            if self.deliveries >= self.budget {
                return Err(AdversaryError::Stuck {
                    deliveries: self.deliveries,
                    steps: std::mem::take(&mut self.log),
                });
            }
            if let Some(delivery) = self.fetch(1).await?.pop() {
                self.deliveries += 1;
                return Ok(Some(delivery));
            }
            let now = self.world.backend.now().await?;
            let mut wait: Option<Duration> = None;
            for queue in &self.queues {
                for m in self.world.backend.messages(Some(queue)).await? {
                    let needed = match m.state {
                        MessageState::Leased => EXPIRE,
                        _ => until(now, m.next_attempt_at),
                    };
                    wait = Some(wait.map_or(needed, |w| w.min(needed)));
                }
            }
            let Some(wait) = wait else {
                return Ok(None);
            };
            self.advance(wait.max(Duration::from_millis(1))).await?;
        }
    }

    async fn fetch(&self, limit: u32) -> Result<Vec<Delivery>, AdversaryError> {
        let params =
            FetchParams::new(self.queues.iter().cloned(), limit.min(1000)).lease_ttl(LEASE);
        Ok(self.world.backend.fetch(&params).await?)
    }

    async fn advance(&mut self, by: Duration) -> Result<(), AdversaryError> {
        self.world.backend.advance(by).await?;
        Ok(())
    }

    /// Runs the handler as the subscriber does: on its own task, a panic counted as a failure.
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        match tokio::spawn(self.world.handler.call(delivery.clone())).await {
            Ok(result) => result,
            Err(join) => Err(HandlerError::retry(format!("handler panicked: {join}"))),
        }
    }

    /// Settles as the subscriber does: ack on `Ok`, the retry policy on `Err`.
    async fn settle(
        &self,
        delivery: &Delivery,
        result: &Result<(), HandlerError>,
    ) -> Result<String, AdversaryError> {
        let backend = &self.world.backend;
        Ok(match result {
            Ok(()) if backend.ack(delivery.lease()).await? => "acked".to_owned(),
            Ok(()) => "its ack refused (lease lost)".to_owned(),
            Err(error) => match backend.fail(delivery, error, &self.policy).await? {
                Outcome::Retried { delay } => format!("retried in {delay:?}"),
                Outcome::DeadLettered { reason } => format!("dead-lettered ({reason})"),
                Outcome::LeaseLost => "its failure refused (lease lost)".to_owned(),
                other => format!("{other:?}"),
            },
        })
    }

    fn describe(&self, delivery: &Delivery) -> String {
        let name = self
            .names
            .get(&delivery.id)
            .map_or_else(|| format!("#{}", delivery.id), |i| format!("message {i}"));
        format!(
            "{name} ({:?}, {}) delivery {}",
            delivery.queue,
            preview(&delivery.payload),
            delivery.deliveries
        )
    }

    /// What the handler changed, read by the world's `observe`.
    pub(super) async fn observe(&self) -> S {
        (self.world.observe)().await
    }
}

fn outcome(result: &Result<(), HandlerError>) -> String {
    match result {
        Ok(()) => "handled (Ok)".to_owned(),
        Err(e) => format!("handler failed ({e})"),
    }
}

fn until(now: DateTime<Utc>, at: DateTime<Utc>) -> Duration {
    (at - now).to_std().unwrap_or(Duration::ZERO)
}

/// The payload, short: text as text, anything else by size.
fn preview(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(text) if text.chars().count() <= 60 => text.to_owned(),
        Ok(text) => format!("{}…", text.chars().take(57).collect::<String>()),
        Err(_) => format!("{} bytes", payload.len()),
    }
}
