//! The conformance suite: behavioural cases every backend must pass, written once.
//!
//! Each case is a `pub async fn <case>(h: &impl Harness)` that panics when the behaviour is
//! broken. [`conformance_tests!`](crate::conformance_tests) turns the whole list into one
//! `#[tokio::test]` per case for a harness of your choice; postbox runs it for [`FakeHarness`]
//! and [`PgHarness`], so a test written against the fake means the same on Postgres.
//!
//! ```ignore
//! // tests/conformance_fake.rs
//! postbox_testkit::conformance_tests!(postbox_testkit::conformance::FakeHarness::new());
//! ```
//!
//! Areas: `tx` (publish and transactions), `fetch`, `lease`, `fence`, `retry`, `dead`,
//! `redrive` (dead letters requeued or purged), `depth` (counts by state),
//! `inspect`, `runtime` (the subscriber on the backend), `coop` (cooperative subconsumers),
//! `journal`, `topic` (topics and subscriptions), `validation` (what Postgres cannot store,
//! refused alike). Time moves through
//! [`TimeControl`](crate::TimeControl), never by sleeping.

mod coop;
mod dead;
mod depth;
mod fencing;
mod fetch;
mod inspect;
mod journal;
mod leases;
mod redrive;
mod retries;
mod runtime;
mod topics;
mod tx;
mod validation;

use async_trait::async_trait;
use postbox_core::{Consume, Delivery, FetchParams, Message, MessageId, PgBackend, Publish};
use postbox_fake::FakeBroker;

pub use coop::*;
pub use dead::*;
pub use depth::*;
pub use fencing::*;
pub use fetch::*;
pub use inspect::*;
pub use journal::*;
pub use leases::*;
pub use redrive::*;
pub use retries::*;
pub use runtime::*;
pub use topics::*;
pub use tx::*;
pub use validation::*;

use crate::context::TestBackend;
use crate::postgres::PgFixture;

/// A fresh backend for one case.
#[async_trait]
pub trait Harness: Send + Sync + Sized + 'static {
    /// The backend under test.
    type Backend: TestBackend;

    /// The backend, empty at the start of the case.
    fn backend(&self) -> &Self::Backend;

    /// Releases what the harness holds (a fixture database, for instance).
    async fn finish(self);
}

/// A fresh [`FakeBroker`] per case.
#[derive(Debug, Clone, Default)]
pub struct FakeHarness {
    broker: FakeBroker,
}

impl FakeHarness {
    /// A harness over a new, empty broker.
    pub async fn new() -> Self {
        FakeHarness::default()
    }
}

#[async_trait]
impl Harness for FakeHarness {
    type Backend = FakeBroker;

    fn backend(&self) -> &FakeBroker {
        &self.broker
    }

    async fn finish(self) {}
}

/// A fresh Postgres database (from [`postgres()`](crate::postgres())) per case.
#[derive(Debug)]
pub struct PgHarness {
    fixture: PgFixture,
    backend: PgBackend,
}

impl PgHarness {
    /// A harness over a new fixture database.
    ///
    /// # Panics
    ///
    /// If no Postgres server is available (the message lists the ways to get one).
    pub async fn new() -> Self {
        let fixture = crate::postgres()
            .await
            .unwrap_or_else(|e| panic!("conformance on Postgres needs a server: {e}"));
        let backend = fixture.backend();
        PgHarness { fixture, backend }
    }
}

#[async_trait]
impl Harness for PgHarness {
    type Backend = PgBackend;

    fn backend(&self) -> &PgBackend {
        &self.backend
    }

    async fn finish(self) {
        if let Err(e) = self.fixture.close().await {
            eprintln!("postbox-testkit: closing the fixture failed: {e}");
        }
    }
}

/// Publishes `messages` in one committed transaction; returns their ids.
pub(crate) async fn publish<B: Publish>(b: &B, messages: Vec<Message>) -> Vec<MessageId> {
    let mut tx = b.begin().await.expect("begin");
    let ids = b.publish_batch(&mut tx, messages).await.expect("publish");
    b.commit(tx).await.expect("commit");
    ids
}

/// Fetches up to `limit` messages of `queue` with the default 30 s lease.
pub(crate) async fn fetch<B: Consume>(b: &B, queue: &str, limit: u32) -> Vec<Delivery> {
    b.fetch(&FetchParams::new([queue], limit))
        .await
        .expect("fetch")
}

pub(crate) fn ids(deliveries: &[Delivery]) -> Vec<MessageId> {
    deliveries.iter().map(|d| d.id).collect()
}

/// Generates one `#[tokio::test]` per conformance case, each on a fresh harness from
/// `$harness` (an expression evaluating to a future of a [`Harness`]).
///
/// ```ignore
/// postbox_testkit::conformance_tests!(postbox_testkit::conformance::PgHarness::new());
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::__conformance_cases! { $harness;
            tx_committed_publish_is_fetchable,
            tx_rolled_back_publish_is_never_fetched,
            tx_dropped_transaction_rolls_back,
            tx_uncommitted_publish_is_invisible,
            tx_batch_returns_ids_in_input_order,
            tx_empty_batch_is_a_no_op,
            tx_invalid_queue_is_rejected_and_nothing_written,
            tx_headers_and_correlation_ids_round_trip,
            tx_delayed_message_waits_for_its_delay,
            tx_not_before_is_respected,
            fetch_respects_the_limit,
            fetch_skips_other_queues,
            fetch_merges_several_queues_in_order,
            fetch_orders_by_next_attempt_then_id,
            fetch_uses_one_fresh_token_per_batch,
            fetch_counts_deliveries_and_stamps_the_first_attempt,
            fetch_rejects_bad_parameters,
            fetch_does_not_repeat_a_fresh_lease,
            lease_expired_is_reclaimed_with_a_new_token,
            lease_only_expired_ones_come_back,
            lease_renewal_outlives_the_original_ttl,
            lease_release_gives_the_message_back_uncounted,
            lease_max_deliveries_dead_letters_a_crash_loop,
            fence_ack_with_a_wrong_token_is_refused,
            fence_retry_with_a_wrong_token_is_refused,
            fence_dead_letter_with_a_wrong_token_is_refused,
            fence_renew_and_release_with_a_wrong_token_are_refused,
            fence_stale_holder_cannot_settle_after_a_reclaim,
            fence_a_second_ack_is_refused,
            fence_unknown_ids_are_refused,
            fence_ack_batch_acks_exactly_the_held_leases,
            retry_counts_an_attempt_and_records_the_error,
            retry_delay_runs_on_the_backend_clock,
            retry_policy_exhaustion_dead_letters,
            retry_rejection_dead_letters_at_once,
            retry_budget_measured_on_the_backend_clock,
            retry_after_overrides_the_backoff,
            dead_letter_moves_the_message_with_its_reason,
            dead_letters_are_never_fetched,
            dead_letters_are_listed_per_queue,
            redrive_requeue_puts_dead_letters_back_ready_and_fresh,
            redrive_filters_by_ids_queue_reason_and_age,
            redrive_purge_deletes_only_what_the_filter_selects,
            redrive_racing_requeues_move_each_letter_once,
            redrive_refuses_bad_filters_and_changes_nothing,
            redrive_requeues_a_subscriptions_dead_letters_in_it_alone,
            redrive_purges_a_subscriptions_dead_letters,
            inspect_reports_ready_scheduled_and_leased,
            depth_counts_each_state_per_queue,
            depth_refuses_a_bad_queue_name,
            inspect_lists_by_queue_and_forgets_acked,
            runtime_delivers_every_message_and_acks_it,
            runtime_retries_then_dead_letters,
            runtime_treats_a_panic_as_a_failure,
            runtime_shutdown_releases_unstarted_messages,
            coop_members_split_the_work_without_duplicates,
            coop_a_dead_member_is_taken_over_and_fenced,
            coop_touch_keeps_a_slow_member_alive,
            coop_a_receive_refreshes_only_a_stale_heartbeat,
            coop_a_live_members_rows_survive_lease_age,
            coop_unregister_fail_refuses_while_holding,
            coop_unregister_requeue_returns_rows_or_dead_letters_them,
            coop_registration_is_idempotent_and_automatic,
            coop_concurrent_first_registrations_yield_one_new,
            coop_acks_cover_exactly_the_delivered_rows,
            journal_record_event_writes_and_publishes,
            journal_record_event_retries_a_taken_seq_at_latest_plus_one,
            journal_append_is_all_or_nothing,
            journal_writer_flushes_on_size,
            journal_writer_close_flushes_and_rejects_later_records,
            journal_writer_flushes_a_quiet_stream_on_time,
            journal_writer_collision_falls_back_per_row,
            journal_snapshot_then_tail_has_no_gap_and_no_duplicate,
            journal_snapshot_then_tail_with_payloads_has_no_gap_and_no_duplicate,
            journal_payloads_go_live_before_they_are_stored,
            journal_stored_events_are_announced_once_per_append_and_stream,
            journal_non_object_payloads_are_refused,
            journal_seq_conflict_names_the_first_taken_event,
            topic_fan_out_delivers_every_message_to_every_subscription,
            topic_late_subscription_receives_only_later_commits,
            topic_rollback_drops_every_copy,
            topic_and_queue_of_one_name_do_not_mix,
            topic_subscribe_is_idempotent_and_race_free,
            topic_unsubscribe_with_pending_messages,
            topic_retry_is_isolated_per_subscription,
            topic_dead_letter_is_isolated_per_subscription,
            topic_receivers_split_a_subscription_without_duplicates,
            topic_expired_batch_is_taken_back_and_the_late_holder_fenced,
            topic_renew_and_release,
            topic_max_deliveries_dead_letters_a_crash_loop,
            topic_subscriptions_report_backlog_and_oldest,
            topic_refuses_bad_input,
            topic_subscribers_fan_out_and_share,
            topic_idempotency_keys_write_a_message_once,
            topic_idempotency_key_is_free_again_after_its_retention,
            topic_a_publish_in_flight_while_subscriptions_change,
            topic_expired_batches_are_looked_for_once_per_check_interval,
            topic_subscriber_retries_then_dead_letters_in_its_subscription,
            validation_publish_refuses_what_postgres_cannot_store,
            validation_outcomes_refuse_what_postgres_cannot_store,
            validation_a_handler_error_with_nul_is_stored_replaced,
            validation_journal_refuses_nul,
            validation_journal_writer_refuses_a_bad_event_and_keeps_the_rest,
        }
    };
}

/// Plumbing of [`conformance_tests!`]; not a stable API.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($harness:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let harness = $harness.await;
                $crate::conformance::$case(&harness).await;
                $crate::conformance::Harness::finish(harness).await;
            }
        )*

        /// The number of cases this file instantiates.
        #[allow(dead_code)]
        const CONFORMANCE_CASES: &[&str] = &[$(stringify!($case)),*];
    };
}
