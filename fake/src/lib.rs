//! An in-memory postbox backend with Postgres semantics, for tests.
//!
//! `FakeBroker` is being built (it implements [`postbox_core::Backend`] with the same
//! eligibility, ordering, leases, fencing, retries and dead letters as Postgres, on tokio's
//! clock). Until it lands, use [`postbox_testkit`](https://docs.rs/postbox-testkit)'s
//! Postgres fixtures.
