//! What the adversary runs a handler against.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use postbox_core::{Backend, Handler};

use crate::time::TimeControl;

type Observe<S> = Box<dyn Fn() -> Pin<Box<dyn Future<Output = S> + Send>> + Send + Sync>;

/// What builds a fresh [`World`] for each run: any `Fn() -> impl Future<Output = World<..>>`
/// (an async closure, or a function returning one), through the blanket implementation.
///
/// It names the world's three types once, so [`Adversary::check`](super::Adversary::check),
/// [`Adversary::assert`](super::Adversary::assert) and
/// [`check_schedule`](super::check_schedule) take `impl MakeWorld` instead of repeating five
/// bounds each.
pub trait MakeWorld {
    /// The backend the world runs on.
    type Backend: Backend + TimeControl;
    /// The handler under test.
    type Handler: Handler;
    /// What the world's observer reads back (compared between runs).
    type State: PartialEq + fmt::Debug;

    /// Builds a fresh world.
    fn make(&self) -> impl Future<Output = World<Self::Backend, Self::Handler, Self::State>>;
}

impl<B, H, S, F, Fut> MakeWorld for F
where
    B: Backend + TimeControl,
    H: Handler,
    S: PartialEq + fmt::Debug,
    F: Fn() -> Fut,
    Fut: Future<Output = World<B, H, S>>,
{
    type Backend = B;
    type Handler = H;
    type State = S;

    fn make(&self) -> impl Future<Output = World<B, H, S>> {
        self()
    }
}

/// One fresh copy of the system under test: a backend, the handler, and a way to read the
/// state the handler changes (your tables, an in-memory store, calls recorded by a mock).
///
/// The adversary builds two per case, one delivering each message exactly once and one
/// under attack, and compares what `observe` returns. Both must start empty and alike.
///
/// ```
/// use std::sync::Arc;
/// use parking_lot::Mutex;
/// use postbox_core::{Delivery, HandlerError};
/// use postbox_fake::FakeBroker;
/// use postbox_testkit::adversary::World;
///
/// let total = Arc::new(Mutex::new(0_i64));
/// let sum = total.clone();
/// let handler = move |d: Delivery| {
///     let sum = sum.clone();
///     async move {
///         *sum.lock() += d.payload.len() as i64; // not idempotent: a redelivery adds twice
///         Ok::<(), HandlerError>(())
///     }
/// };
/// let world = World::new(FakeBroker::new(), handler, move || {
///     let total = total.clone();
///     async move { *total.lock() }
/// });
/// # let _ = world;
/// ```
pub struct World<B, H, S> {
    pub(super) backend: B,
    pub(super) handler: H,
    pub(super) observe: Observe<S>,
    /// Kept alive with the world: a fixture database, a container.
    _guard: Option<Box<dyn Any + Send + Sync>>,
}

impl<B, H, S> World<B, H, S>
where
    B: Backend + TimeControl,
    H: Handler,
{
    /// A world of `backend`, the `handler` under test and `observe`, which reads the state the
    /// handler changes (it is called once, after every message was handled).
    pub fn new<F, Fut>(backend: B, handler: H, observe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = S> + Send + 'static,
    {
        World {
            backend,
            handler,
            observe: Box::new(move || Box::pin(observe())),
            _guard: None,
        }
    }

    /// Keeps `guard` alive as long as the world: the [`PgFixture`](crate::PgFixture) the
    /// backend runs on, for instance.
    #[must_use]
    pub fn holding(mut self, guard: impl Any + Send + Sync) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }
}

impl<B: fmt::Debug, H, S> fmt::Debug for World<B, H, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("World")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}
