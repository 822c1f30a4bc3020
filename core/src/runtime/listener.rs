//! The LISTEN task: turns notifications for subscribed queues into wake-ups of the fetch loop.
//!
//! It owns the dedicated LISTEN connection ([`Engine::listener`]) and never runs a fetch. When
//! LISTEN cannot be set up it warns once, lets the loop poll, and retries every
//! `listen_retry_interval`. A connection that dies (or stops answering the periodic health
//! query) is replaced; after every (re)connect the loop is woken at once, because
//! notifications sent meanwhile are lost.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::{Notify, watch};
use tokio::time::MissedTickBehavior;

use super::events::SubscriberEvent;
use super::subscriber::Shared;
use crate::pg::Engine;

/// How long the health query may take before the connection is declared dead.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct ListenTask {
    pub(crate) engine: Engine,
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

impl ListenTask {
    pub(crate) async fn run(mut self) {
        // Whether LISTEN is currently known to be unavailable (reported once per loss).
        let mut lost = false;
        loop {
            if *self.stop.borrow() {
                return;
            }
            match self.engine.listener().await {
                Ok(mut listener) => {
                    listener.eager_reconnect(false);
                    self.shared.emit(SubscriberEvent::ListenerConnected);
                    if lost {
                        tracing::info!(target: "postbox", table = %self.engine.table(), "postbox.listen: LISTEN restored");
                        self.shared.emit(SubscriberEvent::ListenerRestored);
                    }
                    // Notifications sent while we were away are lost: fetch now.
                    self.wake.notify_one();
                    match self.listen(&mut listener).await {
                        Lost::Stop => return,
                        Lost::Error(error) => {
                            tracing::warn!(target: "postbox", table = %self.engine.table(), %error, "postbox.listen: LISTEN connection lost; polling until it is back");
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
                        tracing::warn!(target: "postbox", table = %self.engine.table(), %error, "postbox.listen: LISTEN unavailable; polling, retrying LISTEN every {:?}", self.retry_interval);
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

    /// Forwards notifications until the connection is lost or the subscriber stops.
    async fn listen(&mut self, listener: &mut PgListener) -> Lost {
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
                received = listener.try_recv() => match received {
                    Ok(Some(notification)) => {
                        if self.queues.contains(notification.payload()) {
                            self.wake.notify_one();
                        }
                    }
                    Ok(None) => return Lost::Error("connection closed".into()),
                    Err(e) => return Lost::Error(e.to_string()),
                },
                _ = check.tick() => {
                    let probe = sqlx::query("SELECT 1").execute(&mut *listener);
                    match tokio::time::timeout(HEALTH_TIMEOUT, probe).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Lost::Error(format!("health check failed: {e}")),
                        Err(_) => return Lost::Error(format!("health check got no answer in {HEALTH_TIMEOUT:?}")),
                    }
                }
            }
        }
    }
}
