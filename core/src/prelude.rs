//! The traits whose methods you call on a backend, to import at once:
//! `use postbox::prelude::*;`.
//!
//! A backend's methods live on its capability traits ([`Publish`], [`Consume`], ...), and a
//! trait's methods can be called on a concrete type (`PgBackend`, `FakeBroker`) only where the
//! trait is in scope. Generic code bounded by [`Backend`] does not need this.

pub use crate::{
    Backend, Consume, Coop, Depth, Handler, Inspect, JournalStore, Publish, Redrive, Store, Topics,
};
