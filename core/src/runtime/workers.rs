//! The handler tasks of one subscriber: what runs, what waits, what finished.
//!
//! Kept apart from the fetch loop so the loop can keep workers busy while it awaits the
//! database: [`Workers::drive`] starts the next waiting message the moment a handler ends,
//! even in the middle of a fetch or an ack write. Without it, a subscriber whose workers are
//! all busy idles one of them for a round trip at every refill and every ack flush (measured:
//! 5-9 % of throughput with a 1 ms handler and one worker).

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::handler::Handler;
use super::metrics::{HandlerTimer, SubscriberMetrics};
use crate::message::Delivery;
use crate::retry::HandlerError;

/// A handler's result, or how its task ended (panic, cancellation).
pub(crate) type Finished = std::result::Result<std::result::Result<(), HandlerError>, JoinError>;

type Done = std::result::Result<(Id, std::result::Result<(), HandlerError>), JoinError>;

pub(crate) struct Workers {
    handler: Arc<dyn Handler>,
    max: usize,
    tasks: JoinSet<std::result::Result<(), HandlerError>>,
    /// Deliveries being handled, by task, with their timers.
    pub(crate) running: HashMap<Id, (Delivery, HandlerTimer)>,
    /// Fetched deliveries not started yet, in fetch order.
    pub(crate) waiting: VecDeque<Delivery>,
    /// Handled deliveries whose outcome the fetch loop has not recorded yet.
    finished: Vec<(Delivery, Finished)>,
    /// The signal every started delivery carries ([`Delivery::cancelled`]).
    cancel: CancellationToken,
    /// The subscriber's metric handles.
    pub(crate) metrics: SubscriberMetrics,
}

impl Workers {
    pub(crate) fn new(handler: Arc<dyn Handler>, max: usize, metrics: SubscriberMetrics) -> Self {
        Workers {
            handler,
            max,
            tasks: JoinSet::new(),
            running: HashMap::new(),
            waiting: VecDeque::new(),
            finished: Vec::new(),
            cancel: CancellationToken::new(),
            metrics,
        }
    }

    /// Whether no handler task is left (running or ended but not joined).
    pub(crate) fn is_idle(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Handler tasks not joined yet.
    pub(crate) fn busy(&self) -> usize {
        self.tasks.len()
    }

    /// Starts waiting deliveries while fewer than `max` run.
    pub(crate) fn dispatch(&mut self) {
        while self.running.len() < self.max {
            let Some(delivery) = self.waiting.pop_front() else {
                return;
            };
            let span = tracing::span!(
                crate::trace::HANDLE_LEVEL,
                "postbox.handle",
                queue = %delivery.queue,
                message_id = delivery.id,
                attempt = delivery.attempts + 1,
                correlation_id = %delivery.correlation_id,
            );
            crate::trace::continue_trace(&span, &delivery);
            let handler = Arc::clone(&self.handler);
            let input = delivery.clone().with_cancellation(&self.cancel);
            // A handler that panics while building its future is caught like one that panics
            // while running it.
            let future = async move {
                match std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(input))) {
                    Ok(future) => future.await,
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            };
            let timer = self.metrics.queue(&delivery.queue).handler_started();
            let task = self.tasks.spawn(future.instrument(span));
            self.running.insert(task.id(), (delivery, timer));
        }
    }

    /// Waits for the next handler task to end and moves it to the finished list, with every
    /// other one already ended. `None` when no task is left.
    pub(crate) async fn join_next(&mut self) -> Option<()> {
        let done = self.tasks.join_next_with_id().await?;
        self.reap(done);
        self.reap_ready();
        Some(())
    }

    /// Moves every task that has already ended to the finished list.
    pub(crate) fn reap_ready(&mut self) {
        while let Some(done) = self.tasks.try_join_next_with_id() {
            self.reap(done);
        }
    }

    fn reap(&mut self, done: Done) {
        let (id, result) = match done {
            Ok((id, result)) => (id, Ok(result)),
            Err(join) => (join.id(), Err(join)),
        };
        if let Some((delivery, timer)) = self.running.remove(&id) {
            timer.finish();
            self.finished.push((delivery, result));
        }
    }

    /// Whether handlers have finished whose outcomes are not recorded yet.
    pub(crate) fn has_finished(&self) -> bool {
        !self.finished.is_empty()
    }

    /// Takes the finished handlers for their outcomes to be recorded.
    pub(crate) fn take_finished(&mut self) -> Vec<(Delivery, Finished)> {
        std::mem::take(&mut self.finished)
    }

    /// Awaits `future` while keeping the workers busy: each handler that ends meanwhile is
    /// moved to the finished list and the next waiting delivery starts at once.
    pub(crate) async fn drive<F: Future>(&mut self, future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        loop {
            tokio::select! {
                biased;
                out = &mut future => return out,
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.reap(done);
                    self.dispatch();
                }
            }
        }
    }

    /// Asks every handler to stop ([`Delivery::cancelled`] resolves); how many are running.
    pub(crate) fn signal_stop(&self) -> usize {
        self.cancel.cancel();
        self.running.len()
    }

    /// Cancels every handler task still running (shutdown timeout).
    pub(crate) fn abort_all(&mut self) {
        self.tasks.abort_all();
    }
}
