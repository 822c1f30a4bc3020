//! The adversary's moves, and the proptest strategies that choose them.

use std::fmt;

use proptest::prelude::*;

/// What happens to the next delivery.
///
/// Each is something at-least-once delivery does in production; an idempotent handler ends
/// in the same state whichever happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Handled and acked: a normal delivery.
    Deliver,
    /// Handled, then the consumer crashes before its ack: the lease expires and the message
    /// is delivered again. The side effect happened once already.
    CrashBeforeAck,
    /// Handled, then the worker fails after the side effect (a timeout on the ack, a later
    /// step of the handler) and schedules a retry: delivered again, one attempt counted.
    RetryAfterEffect,
    /// The lease expires while the handler runs: a second consumer receives the same message
    /// and both handle it at once; the first one's ack is refused (fenced).
    ConcurrentRedelivery,
    /// Received, then the consumer crashes before handling: delivered again later, after
    /// other messages (a reordering).
    CrashBeforeHandle,
}

impl Fault {
    /// Every fault, `Deliver` first (what proptest shrinks towards).
    pub const ALL: [Fault; 5] = [
        Fault::Deliver,
        Fault::CrashBeforeAck,
        Fault::RetryAfterEffect,
        Fault::ConcurrentRedelivery,
        Fault::CrashBeforeHandle,
    ];
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::Deliver => "deliver",
            Fault::CrashBeforeAck => "crash after handling, before the ack",
            Fault::RetryAfterEffect => "retry after handling",
            Fault::ConcurrentRedelivery => "lease expires mid-handler: two consumers at once",
            Fault::CrashBeforeHandle => "crash before handling",
        })
    }
}

/// The faults applied to the first deliveries, one each, in order; every delivery after them
/// is normal, until all messages are handled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// One fault per delivery, in delivery order.
    pub faults: Vec<Fault>,
}

impl Schedule {
    /// A schedule of these faults.
    pub fn new(faults: impl IntoIterator<Item = Fault>) -> Self {
        Schedule {
            faults: faults.into_iter().collect(),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.faults.is_empty() {
            return f.write_str("(no faults)");
        }
        for (i, fault) in self.faults.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{fault}")?;
        }
        Ok(())
    }
}

/// Any one [`Fault`], normal deliveries as likely as all faults together.
pub fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        4 => Just(Fault::Deliver),
        1 => Just(Fault::CrashBeforeAck),
        1 => Just(Fault::RetryAfterEffect),
        1 => Just(Fault::ConcurrentRedelivery),
        1 => Just(Fault::CrashBeforeHandle),
    ]
}

/// Schedules of up to `max_faults` faults. Shrinking removes faults and turns the rest into
/// normal deliveries, so a failure is reported with the fewest faults that still break the
/// handler.
pub fn schedules(max_faults: usize) -> impl Strategy<Value = Schedule> {
    proptest::collection::vec(fault(), 0..=max_faults).prop_map(|faults| Schedule { faults })
}
