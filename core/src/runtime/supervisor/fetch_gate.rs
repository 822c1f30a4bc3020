//! When the loop may fetch: its polling and error backoff, and the fetch permit.

use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::super::escalation::Escalation;
use super::super::options::SubscriberOptions;
use crate::engine::{Engine, PermitWait};

/// The fetch gate: when the next fetch is due, and whether this loop holds the permit to send
/// it (where the backend caps concurrent fetches).
///
/// It decides, the loop acts: after each fetch the loop reports what came back
/// ([`fetched`](Self::fetched) or [`failed`](Self::failed)), and a wake-up reports
/// [`woken`](Self::woken).
pub(super) struct FetchGate {
    /// Polling: from `min_fetch_interval` up to `max_fetch_interval` while fetches find
    /// nothing.
    idle: Escalation,
    /// From `error_backoff_min` up to `error_backoff_max` while fetches fail.
    errors: Escalation,
    /// When the next fetch is due.
    next: Instant,
    /// No fetch before this, whatever wakes the loop (after a database error).
    backoff_until: Instant,
    /// Our place in the queue for a fetch permit when the backend caps concurrent fetches
    /// (`PgBackend::max_concurrent_fetches`). Kept across loop turns, so the loop goes on
    /// writing outcomes and starting handlers while it waits.
    permit_wait: Option<PermitWait>,
    /// The permit for the next fetch, once granted.
    permit: Option<OwnedSemaphorePermit>,
}

impl FetchGate {
    pub(super) fn new(options: &SubscriberOptions) -> Self {
        let now = Instant::now();
        FetchGate {
            idle: Escalation::new(options.min_fetch_interval, options.max_fetch_interval),
            errors: Escalation::new(options.error_backoff_min, options.error_backoff_max),
            next: now,
            backoff_until: now,
            permit_wait: None,
            permit: None,
        }
    }

    /// When the next fetch is due.
    pub(super) fn next_fetch(&self) -> Instant {
        self.next
    }

    /// Whether the next fetch is due at `now`.
    pub(super) fn is_due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// A wake-up (a commit on a subscribed queue): fetch at once, unless backing off after
    /// an error; polling starts again from its shortest interval.
    pub(super) fn woken(&mut self) {
        self.idle.reset();
        self.next = self.backoff_until.max(Instant::now());
    }

    /// A fetch for `capacity` rows returned `n`. A full batch suggests more are ready: the
    /// next fetch is due at once. A partial one drained the queue, and an empty one found
    /// nothing: wait for a wake-up or the next poll (which backs off while fetches stay empty).
    pub(super) fn fetched(&mut self, n: usize, capacity: usize) {
        self.errors.reset();
        let now = Instant::now();
        if n == 0 {
            self.next = now + self.idle.next();
            return;
        }
        self.idle.reset();
        self.next = if n == capacity {
            now
        } else {
            now + self.idle.next()
        };
    }

    /// A fetch failed: no fetch before the returned delay, which grows while fetches fail.
    pub(super) fn failed(&mut self) -> Duration {
        let delay = self.errors.next();
        self.backoff_until = Instant::now() + delay;
        self.next = self.backoff_until;
        delay
    }

    /// Whether a fetch may be sent now: always without a cap on concurrent fetches; with
    /// one, once this loop holds a permit. Joins the queue for one on the first call.
    pub(super) fn may_fetch(&mut self, engine: Option<&dyn Engine>) -> bool {
        if self.permit.is_some() {
            return true;
        }
        if self.permit_wait.is_none() {
            match engine.and_then(|engine| engine.permit_wait()) {
                Some(wait) => self.permit_wait = Some(wait),
                None => return true,
            }
        }
        // Granted at once when nobody queues ahead; otherwise the loop waits for it.
        match self
            .permit_wait
            .as_mut()
            .and_then(|wait| wait.now_or_never())
        {
            Some(permit) => {
                self.permit_wait = None;
                self.permit = permit;
                // `None` only if the permits were closed, which never happens: fetch uncapped.
                true
            }
            None => false,
        }
    }

    /// Whether the loop waits in the queue for a permit.
    pub(super) fn is_queued(&self) -> bool {
        self.permit_wait.is_some()
    }

    /// Waits for the permit the loop queues for; pending forever when it does not queue.
    ///
    /// Cancel safe: the place in the queue is kept until the permit is granted.
    pub(super) async fn granted(&mut self) {
        let permit = match &mut self.permit_wait {
            Some(wait) => wait.await,
            None => std::future::pending().await,
        };
        self.permit_wait = None;
        self.permit = permit;
    }

    /// Takes the permit for the fetch about to be sent; it is held through the statement.
    pub(super) fn take_permit(&mut self) -> Option<OwnedSemaphorePermit> {
        self.permit.take()
    }

    /// Gives up a fetch permit or a place in its queue. A permit is only held while a fetch
    /// is due: an idle, busy or stopping loop must not keep other subscribers waiting.
    pub(super) fn leave_queue(&mut self) {
        self.permit = None;
        self.permit_wait = None;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use async_trait::async_trait;
    use tokio::sync::Semaphore;

    use super::*;
    use crate::engine::{FetchSession, WakeUps};
    use crate::error::Result;
    use crate::table::TableName;

    /// An engine whose only part in use is its fetch permits.
    #[derive(Debug)]
    struct Capped {
        permits: Arc<Semaphore>,
        table: TableName,
    }

    #[async_trait]
    impl Engine for Capped {
        fn table(&self) -> &TableName {
            &self.table
        }
        async fn open_session(&self) -> Result<Box<dyn FetchSession>> {
            unreachable!("the gate never opens sessions")
        }
        async fn open_wake_ups(&self) -> Result<Box<dyn WakeUps>> {
            unreachable!("the gate never listens")
        }
        fn permit_wait(&self) -> Option<PermitWait> {
            Some(Box::pin(
                Arc::clone(&self.permits)
                    .acquire_owned()
                    .map(std::result::Result::ok),
            ))
        }
    }

    fn capped(n: usize) -> Capped {
        Capped {
            permits: Arc::new(Semaphore::new(n)),
            table: TableName::default(),
        }
    }

    fn options() -> SubscriberOptions {
        SubscriberOptions::new(["q"])
            .min_fetch_interval(Duration::from_millis(100))
            .max_fetch_interval(Duration::from_secs(1))
            .error_backoff(Duration::from_secs(2), Duration::from_secs(8))
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_fetches_again_at_once_and_an_empty_one_backs_off() {
        let mut gate = FetchGate::new(&options());
        assert!(gate.is_due(Instant::now()));
        gate.fetched(10, 10);
        assert!(gate.is_due(Instant::now()), "a full batch: more are ready");
        gate.fetched(0, 10);
        let first = gate.next_fetch() - Instant::now();
        assert!(!gate.is_due(Instant::now()));
        gate.fetched(0, 10);
        gate.fetched(0, 10);
        let third = gate.next_fetch() - Instant::now();
        assert!(
            first <= Duration::from_millis(100) && third > first,
            "empty fetches back off: {first:?} then {third:?}"
        );
        gate.fetched(3, 10);
        assert!(
            gate.next_fetch() - Instant::now() <= Duration::from_millis(100),
            "rows found: polling starts again from its shortest interval"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_up_does_not_cut_an_error_backoff_short() {
        let mut gate = FetchGate::new(&options());
        let delay = gate.failed();
        assert!(delay >= Duration::from_secs(1) && delay <= Duration::from_secs(2));
        gate.woken();
        assert!(!gate.is_due(Instant::now()), "woken while backing off");
        tokio::time::advance(delay).await;
        assert!(gate.is_due(Instant::now()));
        gate.fetched(1, 10);
        gate.woken();
        assert!(
            gate.is_due(Instant::now()),
            "woken after a success: at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_cap_every_fetch_may_go() {
        let mut gate = FetchGate::new(&options());
        assert!(gate.may_fetch(None));
        assert!(!gate.is_queued());
        assert!(gate.take_permit().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_cap_the_loop_queues_and_is_granted_the_freed_permit() {
        let engine = capped(1);
        let mut first = FetchGate::new(&options());
        let mut second = FetchGate::new(&options());
        assert!(first.may_fetch(Some(&engine)));
        let held = first.take_permit().expect("the only permit");
        assert!(!second.may_fetch(Some(&engine)), "no permit left");
        assert!(second.is_queued());
        // Asked again, it keeps its place and is still refused.
        assert!(!second.may_fetch(Some(&engine)));
        drop(held);
        second.granted().await;
        assert!(!second.is_queued());
        assert!(second.may_fetch(Some(&engine)), "granted while queued");
        assert!(second.take_permit().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn leaving_the_queue_frees_the_permit_for_others() {
        let engine = capped(1);
        let mut first = FetchGate::new(&options());
        let mut second = FetchGate::new(&options());
        assert!(first.may_fetch(Some(&engine)));
        assert!(!second.may_fetch(Some(&engine)));
        first.leave_queue();
        assert!(second.may_fetch(Some(&engine)), "the permit went back");
        second.leave_queue();
        assert_eq!(engine.permits.available_permits(), 1);
    }
}
