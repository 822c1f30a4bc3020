//! The wake-up task: turns the engine's wake-ups for subscribed queues into wake-ups of the
//! fetch loop.
//!
//! It owns the engine's wake-up source ([`Engine::open_wake_ups`](crate::engine::Engine::open_wake_ups); on Postgres the dedicated
//! LISTEN connection) and never runs a fetch. When the source cannot be opened it warns once,
//! lets the loop poll, and retries every `wake_up_retry_interval`. A source that fails (or
//! stops answering the periodic health check) is replaced; after every (re)open the loop is
//! woken at once, because wake-ups sent meanwhile are lost.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::MissedTickBehavior;

use super::events::SubscriberEvent;
use super::shared::Shared;
use crate::consume::Consume;
use crate::engine::WakeUps;

/// How long the health query may take before the connection is declared dead.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct WakeUpTask<B> {
    /// The backend whose [`Engine`] this task listens through.
    pub(crate) backend: Arc<B>,
    pub(crate) queues: HashSet<String>,
    pub(crate) wake: Arc<Notify>,
    pub(crate) reset: Arc<Notify>,
    pub(crate) stop: watch::Receiver<bool>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) retry_interval: Duration,
    pub(crate) check_interval: Duration,
}

/// Why the current listener was given up.
enum Lost {
    Stop,
    Error(String),
}

impl<B: Consume> WakeUpTask<B> {
    pub(crate) async fn run(mut self) {
        let Some(engine) = self.backend.engine() else {
            return;
        };
        let table = engine.table().clone();
        // Whether LISTEN is currently known to be unavailable (reported once per loss).
        let mut lost = false;
        loop {
            if *self.stop.borrow() {
                return;
            }
            let opened = match self.backend.engine() {
                Some(engine) => engine.open_wake_ups().await,
                None => return,
            };
            match opened {
                Ok(mut wake_ups) => {
                    self.shared.emit(SubscriberEvent::ListenerConnected);
                    if lost {
                        tracing::info!(target: "postbox", %table, "postbox.listen: LISTEN restored");
                        self.shared.emit(SubscriberEvent::ListenerRestored);
                    }
                    // Notifications sent while we were away are lost: fetch now.
                    self.wake.notify_one();
                    match self.listen(wake_ups.as_mut()).await {
                        Lost::Stop => return,
                        Lost::Error(error) => {
                            tracing::warn!(target: "postbox", %table, %error, "postbox.listen: LISTEN connection lost; polling until it is back");
                            self.shared.emit(SubscriberEvent::ListenerLost { error });
                            lost = true;
                            // Reconnect at once; only repeated failures wait.
                            continue;
                        }
                    }
                }
                Err(e) => {
                    let error = e.to_string();
                    if !lost {
                        tracing::warn!(target: "postbox", %table, %error, "postbox.listen: LISTEN unavailable; polling, retrying LISTEN every {:?}", self.retry_interval);
                        self.shared.emit(SubscriberEvent::ListenerLost { error });
                        lost = true;
                    }
                    tokio::select! {
                        changed = self.stop.changed() => {
                            if changed.is_err() {
                                return;
                            }
                        }
                        _ = tokio::time::sleep(self.retry_interval) => {}
                    }
                }
            }
        }
    }

    /// Forwards wake-ups until the source is lost or the subscriber stops.
    async fn listen(&mut self, wake_ups: &mut dyn WakeUps) -> Lost {
        let mut check = tokio::time::interval(self.check_interval);
        check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        check.tick().await;
        loop {
            tokio::select! {
                changed = self.stop.changed() => {
                    if changed.is_err() || *self.stop.borrow() {
                        return Lost::Stop;
                    }
                }
                _ = self.reset.notified() => {
                    return Lost::Error("reset after a database error".into());
                }
                received = wake_ups.next() => match received {
                    Ok(Some(queue)) => {
                        if self.queues.contains(&queue) {
                            self.wake.notify_one();
                        }
                    }
                    Ok(None) => return Lost::Error("connection closed".into()),
                    Err(e) => return Lost::Error(e.to_string()),
                },
                _ = check.tick() => {
                    match tokio::time::timeout(HEALTH_TIMEOUT, wake_ups.check()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Lost::Error(format!("health check failed: {e}")),
                        Err(_) => return Lost::Error(format!("health check got no answer in {HEALTH_TIMEOUT:?}")),
                    }
                }
            }
        }
    }
}
