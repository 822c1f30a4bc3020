//! The core of [postbox](https://docs.rs/postbox): the [`Backend`] trait, messages and leases,
//! retry policies, and the Postgres backend [`PgBackend`].
//!
//! Most users depend on the `postbox` facade crate, which re-exports everything here.
//!
//! The everyday names sit at the root; the rest are grouped by concern in [`coop`],
//! [`journal`], [`runtime`], [`pg`] (Postgres-only), [`topic`], [`metrics`] and [`trace`].
//!
//! - [`Message`]: what you publish (queue, payload, headers, correlation id, delay).
//! - [`Delivery`] and [`Lease`]: what a fetch hands out, and the proof of holding it.
//! - [`Backend`]: every capability of a store, one trait each: [`Publish`] (in the caller's
//!   transaction), [`Consume`] (fetch, and fenced outcomes: ack, retry, dead-letter, renew,
//!   release), [`Inspect`], [`Coop`], [`JournalStore`]; [`prelude`] imports them all.
//! - [`PgBackend`]: the Postgres implementation; [`pg::PgEngine`]: its dedicated connections, the
//!   [`engine::Engine`] the subscriber runtime drives.
//! - [`RetryPolicy`] and [`HandlerError`]: how failures become delays or dead letters.
//! - [`Redrive`] and [`DeadFilter`]: dead letters requeued or purged, by ids or by a filter.
//! - [`Depth`]: each queue's messages counted by state, and its lag.
//! - [`coop`]: cooperative subconsumers sharing queues ([`Member`], [`coop::CoopReceive`]).
//! - [`journal`]: journal streams ([`journal::BatchedJournalWriter`], [`journal::record_event`],
//!   [`journal::snapshot_and_tail`]).
//! - [`runtime`]: [`Subscriber`], the runtime that consumes queues with a [`Handler`], and its
//!   events, statistics and shutdown report.
//! - [`TableName`]: a validated outbox table name and every identifier derived from it.
//! - [`Error`]: everything that can go wrong.
//!
//! # Delivery guarantees
//!
//! Delivery is **at least once**: a message stays in the table until it is acked, and a lease
//! that expires is handed out again. Handlers must therefore be idempotent. Outcomes are
//! **fenced** by the lease token: a consumer that lost its lease can no longer ack, retry or
//! dead-letter the message (the call returns `Ok(false)`).

// docs.rs builds with `--cfg docsrs`: mark what a feature or platform enables.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod cancel;
mod consume;
pub mod coop;
#[cfg(feature = "test-util")]
mod delivery_builder;
mod depth;
pub mod engine;
mod envelope;
mod error;
mod fetch;
mod inspect;
pub mod journal;
mod message;
pub mod metrics;
mod outcome;
pub mod pg;
pub mod prelude;
mod publish;
mod redrive;
mod retry;
pub mod runtime;
mod store;
mod table;
pub mod topic;
pub mod trace;
mod validate;

pub use backend::Backend;
pub use consume::{Consume, RetryParams, validate_reason};
pub use coop::{Coop, Member};
#[cfg(feature = "test-util")]
pub use delivery_builder::DeliveryBuilder;
pub use depth::{Depth, QueueDepth};
pub use envelope::Envelope;
pub use error::{Error, Result, SchemaProblems};
pub use fetch::{DEFAULT_LEASE_TTL, FetchParams, MAX_FETCH_LIMIT};
pub use inspect::{DeadLetter, Inspect, MessageState, StoredMessage};
pub use journal::JournalStore;
pub use message::{
    Availability, Delivery, Headers, Lease, MAX_QUEUE_LEN, Message, MessageId, validate_queue,
};
pub use outcome::Outcome;
/// The everyday name of [`pg`]; the rest of the Postgres-only API (roles and their grants,
/// rotation, DDL, the engine's connections) is under [`pg`].
pub use pg::PgBackend;
pub use publish::Publish;
pub use redrive::{DeadFilter, Redrive};
pub use retry::{
    Backoff, HandlerError, HandlerErrorKind, RetryDecision, RetryPolicy, RetryPredicate,
};
pub use runtime::{Handler, Subscriber, SubscriberOptions};
pub use store::Store;
pub use table::{GENERATIONS, MAX_IDENTIFIER_LEN, TableName};
pub use topic::Topics;
pub use validate::MAX_DELAY;

/// Re-export of the sqlx version postbox is built on, so that connection types match.
pub use sqlx;
