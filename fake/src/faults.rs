//! Fault injection: make the next N calls of a kind fail.

use postbox_core::Error;

/// The error an injected fault produces.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// A lost connection: `Error::Database(sqlx::Error::Io(ConnectionReset))`, transient, as
    /// when Postgres goes away.
    ConnectionLost,
    /// `Error::Injected(message)`.
    Message(String),
}

impl Fault {
    pub(crate) fn error(&self) -> Error {
        match self {
            Fault::ConnectionLost => {
                Error::Database(postbox_core::sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "injected: connection lost",
                )))
            }
            Fault::Message(m) => Error::Injected(m.clone()),
        }
    }
}

/// Pending failures per kind of call.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    pub(crate) fetch: Option<(u32, Fault)>,
    pub(crate) outcome: Option<(u32, Fault)>,
    pub(crate) publish: Option<(u32, Fault)>,
    pub(crate) journal: Option<(u32, Fault)>,
}

/// Consumes one failure from `slot`, if any.
pub(crate) fn take(slot: &mut Option<(u32, Fault)>) -> Option<Error> {
    let (left, fault) = slot.as_mut()?;
    let error = fault.error();
    *left -= 1;
    if *left == 0 {
        *slot = None;
    }
    Some(error)
}
