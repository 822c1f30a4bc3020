//! A fetch: what it runs on, and what its rows and errors become.

use tokio::time::Instant;

use super::super::events::{Counters, SubscriberEvent};
use super::super::options::SubscriberOptions;
use super::super::shared::Shared;
use super::Supervisor;
use crate::consume::Consume;
use crate::coop::{Coop, CoopReceive};
use crate::engine::FetchSession;
use crate::error::{Error, Result};
use crate::fetch::FetchParams;
use crate::message::Delivery;
use crate::topic::{Receive, Topics};

impl<B: Consume + Coop + Topics> Supervisor<B> {
    /// Fetches up to `capacity` rows and queues them for the workers.
    pub(super) async fn fetch(&mut self, capacity: usize) {
        // Held through the statement, released when this returns.
        let _permit = self.gate.take_permit();
        let mut params = FetchParams::new(
            self.options.queues.iter().cloned(),
            u32::try_from(capacity).unwrap_or(u32::MAX),
        )
        .lease_ttl(self.options.lease_ttl);
        if let Some(n) = self.options.max_deliveries {
            params = params.max_deliveries(n);
        }
        let started = std::time::Instant::now();
        // Handlers that end during the round trip are replaced at once (see `Workers::drive`).
        let fetching = Self::fetch_once(
            &self.backend,
            &self.options,
            &mut self.session,
            &self.shared,
            &params,
        );
        let result = self.workers.drive(fetching).await;
        self.workers.metrics.fetch_took(started.elapsed());
        Counters::add(&self.shared.counters.fetches, 1);
        let deliveries = match result {
            Ok(deliveries) => deliveries,
            Err(error) => return self.database_error(&error),
        };
        let n = deliveries.len();
        // Handlers ran on during the round trip: if they used up the buffer and a worker is
        // idle, the fetch was the bottleneck.
        let starved = self.workers.waiting.is_empty()
            && self.workers.running.len() < self.options.max_workers;
        self.window.after_fetch(capacity, n, starved);
        self.gate.fetched(n, capacity);
        if n == 0 {
            self.shared.emit(SubscriberEvent::Idle);
            return;
        }
        tracing::debug!(target: "postbox", rows = n, elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "postbox.fetch");
        Counters::add(&self.shared.counters.fetched, n as u64);
        self.shared.emit(SubscriberEvent::Fetched { n });
        let now = Instant::now();
        for d in deliveries {
            let metrics = self.workers.metrics.queue(&d.queue).clone();
            metrics.fetched();
            self.leases.insert(d.lease(), now, metrics);
            self.workers.waiting.push_back(d);
        }
    }

    /// Runs one fetch: a subscription's receive, or a queue fetch (as a cooperative member or
    /// not) on the engine's kept session, opened here if needed, or through the backend
    /// without an engine.
    async fn fetch_once(
        backend: &B,
        options: &SubscriberOptions,
        session_slot: &mut Option<Box<dyn FetchSession>>,
        shared: &Shared,
        params: &FetchParams,
    ) -> Result<Vec<Delivery>> {
        let coop = options.subconsumer.clone().map(|member| {
            let mut receive = CoopReceive::new(
                member,
                params.get_queues().iter().cloned(),
                params.get_limit(),
            );
            if let Some(d) = options.dead_interval {
                receive = receive.dead_interval(d);
            }
            if let Some(n) = params.get_max_deliveries() {
                receive = receive.max_deliveries(n);
            }
            receive
        });
        if let Some(subscription) = &options.subscription {
            // Receives run on the pool: the statement is short and locks the subscription.
            let mut receive = Receive::new(subscription.clone(), params.get_limit())
                .lease_ttl(params.get_lease_ttl());
            if let Some(n) = params.get_max_deliveries() {
                receive = receive.max_deliveries(n);
            }
            if let Some(holder) = params.get_acquired_by() {
                receive = receive.holder(holder);
            }
            return backend.receive(&receive).await;
        }
        let Some(engine) = backend.engine() else {
            return match &coop {
                Some(receive) => backend.coop_receive(receive).await,
                None => backend.fetch(params).await,
            };
        };
        if session_slot.is_none() {
            let session = engine.open_session().await?;
            let session_id = session.id();
            tracing::debug!(target: "postbox", session_id, "postbox.fetch: connected");
            shared.emit(SubscriberEvent::FetchConnected { session_id });
            *session_slot = Some(session);
        }
        // The loop already holds the permit, if fetches are capped (`FetchGate::may_fetch`).
        match (session_slot.as_mut(), &coop) {
            (Some(session), Some(receive)) => session.coop_receive(receive).await,
            (Some(session), None) => session.fetch(params).await,
            (None, _) => Err(Error::Runtime("fetch session missing".into())),
        }
    }

    /// Drops the fetch session, has the wake-up source reopened, and backs off.
    pub(super) fn database_error(&mut self, error: &Error) {
        self.shared.record_error(error);
        self.session = None;
        self.reset_listener.notify_one();
        let delay = self.gate.failed();
        tracing::warn!(target: "postbox", %error, delay_ms = delay.as_millis() as u64, "postbox.subscriber: database error, backing off");
        self.shared.emit(SubscriberEvent::BackoffStarted {
            delay,
            error: error.to_string(),
        });
    }
}
