//! [`Backend`]: every capability of a postbox store under one name.

use crate::consume::Consume;
use crate::coop::Coop;
use crate::inspect::Inspect;
use crate::journal::JournalStore;
use crate::publish::Publish;

/// A complete postbox store: [`Publish`], [`Consume`], [`Inspect`], [`Coop`] and
/// [`JournalStore`].
///
/// Implemented by [`PgBackend`](crate::PgBackend) (Postgres) and by `postbox_fake::FakeBroker`
/// (in memory, same semantics), through a blanket implementation: a type that implements the
/// five capability traits is a `Backend`. Code that needs one capability bounds on that trait
/// (the subscriber runtime on [`Consume`] and [`Coop`], the journal writer on
/// [`JournalStore`]); `Backend` is for code that uses them all, such as the conformance suite.
///
/// Methods of the capability traits need the trait in scope on a concrete type:
/// `use postbox::prelude::*;` brings them all.
pub trait Backend: Publish + Consume + Inspect + Coop + JournalStore {}

impl<T> Backend for T where T: Publish + Consume + Inspect + Coop + JournalStore + ?Sized {}
