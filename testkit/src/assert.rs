//! Assertions on what was published, for any [`Backend`].
//!
//! Each `assert_*` panics with a message listing what was there; its `try_*` twin returns the
//! same failure as an [`AssertError`]. Unset fields of an [`Expect`] are not checked.

use std::fmt;
use std::time::Duration;

use postbox_core::{Inspect, MessageState, StoredMessage};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::context::TestBackend;
use crate::wait::deadline;

/// What a published message should look like. Unset fields match anything.
///
/// ```
/// use postbox_testkit::Expect;
///
/// let e = Expect::queue("emails").json(&serde_json::json!({"to": "ada"})).header("tenant", "acme");
/// # let _ = e;
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expect {
    queue: Option<String>,
    payload: Option<Payload>,
    headers: Vec<(String, Value)>,
    state: Option<MessageState>,
}

#[derive(Debug, Clone, PartialEq)]
enum Payload {
    Bytes(Vec<u8>),
    Json(Value),
}

impl Expect {
    /// Any message.
    pub fn any() -> Self {
        Expect::default()
    }

    /// A message on `queue`.
    pub fn queue(queue: impl Into<String>) -> Self {
        Expect {
            queue: Some(queue.into()),
            ..Expect::default()
        }
    }

    /// Whose payload is exactly these bytes.
    #[must_use]
    pub fn payload(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.payload = Some(Payload::Bytes(bytes.into()));
        self
    }

    /// Whose payload is JSON equal to `value` (whitespace and key order do not matter).
    ///
    /// # Panics
    ///
    /// If `value` cannot be serialized.
    #[must_use]
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        let value = serde_json::to_value(value).expect("expected payload serializes to JSON");
        self.payload = Some(Payload::Json(value));
        self
    }

    /// Which has header `key` equal to `value` (other headers are not checked).
    #[must_use]
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }

    /// Which is in `state` now.
    #[must_use]
    pub fn state(mut self, state: MessageState) -> Self {
        self.state = Some(state);
        self
    }

    /// Whether `message` matches.
    pub fn matches(&self, message: &StoredMessage) -> bool {
        self.queue.as_ref().is_none_or(|q| *q == message.queue)
            && self.state.is_none_or(|s| s == message.state)
            && match &self.payload {
                None => true,
                Some(Payload::Bytes(b)) => *b == message.payload,
                Some(Payload::Json(v)) => serde_json::from_slice::<Value>(&message.payload)
                    .is_ok_and(|actual| actual == *v),
            }
            && self.headers.iter().all(|(k, v)| {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(k))
                    .is_some_and(|actual| actual == v)
            })
    }
}

/// Why an assertion failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum AssertError {
    /// The number of matching messages is not what was expected.
    Count {
        /// What was expected.
        expected: Expect,
        /// How many were wanted.
        wanted: usize,
        /// How many matched.
        matched: usize,
        /// One line per stored message.
        seen: Vec<String>,
    },
    /// Reading the messages failed.
    Backend(postbox_core::Error),
    /// The one matching message's payload is not the JSON of the expected type.
    Decode {
        /// The message, described.
        message: String,
        /// What serde said.
        error: serde_json::Error,
    },
    /// Waiting for a matching message ran out of time.
    Timeout {
        /// How long it waited.
        waited: Duration,
        /// What the last check found.
        last: Box<AssertError>,
    },
}

impl fmt::Display for AssertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AssertError::Count {
                expected,
                wanted,
                matched,
                seen,
            } => {
                writeln!(
                    f,
                    "expected {wanted} message(s) matching {expected:?}, found {matched}"
                )?;
                if seen.is_empty() {
                    write!(f, "no messages are stored")
                } else {
                    write!(f, "stored messages:\n  {}", seen.join("\n  "))
                }
            }
            AssertError::Backend(e) => write!(f, "could not read messages: {e}"),
            AssertError::Decode { message, error } => {
                write!(
                    f,
                    "the payload does not decode as expected: {error}\n  {message}"
                )
            }
            AssertError::Timeout { waited, last } => {
                write!(f, "still not published after waiting {waited:?}: {last}")
            }
        }
    }
}

impl std::error::Error for AssertError {}

fn describe(m: &StoredMessage) -> String {
    format!(
        "#{} queue={:?} state={:?} payload={} headers={}",
        m.id,
        m.queue,
        m.state,
        String::from_utf8_lossy(&m.payload),
        m.headers.as_ref().map_or_else(
            || "none".to_owned(),
            |h| Value::Object(h.clone()).to_string()
        )
    )
}

/// The stored messages of `queue` (or of all queues), in id order.
///
/// # Panics
///
/// If the backend cannot be read.
///
/// # Cancel safety
///
/// Cancel safe: read-only; drop the call and make it again.
pub async fn published<B: Inspect>(backend: &B, queue: Option<&str>) -> Vec<StoredMessage> {
    backend
        .messages(queue)
        .await
        .unwrap_or_else(|e| panic!("could not read messages: {e}"))
}

/// Returns the messages matching `expected` if there are exactly `n`.
///
/// # Errors
///
/// [`AssertError::Count`] listing every stored message, or [`AssertError::Backend`].
///
/// # Cancel safety
///
/// Cancel safe: read-only; drop the call and make it again.
pub async fn try_assert_published_many<B: Inspect>(
    backend: &B,
    expected: &Expect,
    n: usize,
) -> Result<Vec<StoredMessage>, AssertError> {
    let all = backend.messages(None).await.map_err(AssertError::Backend)?;
    exactly(all, expected, n)
}

/// The messages of `all` matching `expected`, if there are exactly `n`.
#[allow(
    clippy::result_large_err,
    reason = "builds the public AssertError as it is"
)]
fn exactly(
    all: Vec<StoredMessage>,
    expected: &Expect,
    n: usize,
) -> Result<Vec<StoredMessage>, AssertError> {
    let (matched, others): (Vec<StoredMessage>, Vec<StoredMessage>) =
        all.into_iter().partition(|m| expected.matches(m));
    if matched.len() == n {
        Ok(matched)
    } else {
        let mut seen: Vec<&StoredMessage> = matched.iter().chain(&others).collect();
        seen.sort_by_key(|m| m.id);
        Err(AssertError::Count {
            expected: expected.clone(),
            wanted: n,
            matched: matched.len(),
            seen: seen.into_iter().map(describe).collect(),
        })
    }
}

/// The one message of `all` matching `expected`.
#[allow(
    clippy::result_large_err,
    reason = "builds the public AssertError as it is"
)]
fn one(all: Vec<StoredMessage>, expected: &Expect) -> Result<StoredMessage, AssertError> {
    let mut one = exactly(all, expected, 1)?;
    one.pop().ok_or_else(|| AssertError::Count {
        expected: expected.clone(),
        wanted: 1,
        matched: 0,
        seen: Vec::new(),
    })
}

/// Returns the one message matching `expected`.
///
/// # Errors
///
/// [`AssertError::Count`] when none or several match (ambiguous), or [`AssertError::Backend`].
///
/// # Cancel safety
///
/// Cancel safe: read-only; drop the call and make it again.
pub async fn try_assert_published<B: Inspect>(
    backend: &B,
    expected: &Expect,
) -> Result<StoredMessage, AssertError> {
    let all = backend.messages(None).await.map_err(AssertError::Backend)?;
    one(all, expected)
}

/// Checks that no stored message matches `expected`.
///
/// # Errors
///
/// [`AssertError::Count`] listing every stored message, or [`AssertError::Backend`].
///
/// # Cancel safety
///
/// Cancel safe: read-only; drop the call and make it again.
pub async fn try_assert_not_published<B: Inspect>(
    backend: &B,
    expected: &Expect,
) -> Result<(), AssertError> {
    try_assert_published_many(backend, expected, 0)
        .await
        .map(drop)
}

/// Asserts exactly one stored message matches `expected` and returns it.
///
/// # Panics
///
/// When none or several match, listing what is stored.
///
/// # Cancel safety
///
/// Cancel safe: read-only; drop the call and make it again.
pub async fn assert_published<B: Inspect>(backend: &B, expected: Expect) -> StoredMessage {
    try_assert_published(backend, &expected)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts exactly `n` stored messages match `expected` and returns them.
///
/// # Panics
///
/// When another number match, listing what is stored.
///
/// # Cancel safety
///
/// Cancel safe: read-only; drop the call and make it again.
pub async fn assert_published_many<B: Inspect>(
    backend: &B,
    expected: Expect,
    n: usize,
) -> Vec<StoredMessage> {
    try_assert_published_many(backend, &expected, n)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts no stored message matches `expected`.
///
/// # Panics
///
/// When one does, listing what is stored.
///
/// # Cancel safety
///
/// Cancel safe: read-only; drop the call and make it again.
pub async fn assert_not_published<B: Inspect>(backend: &B, expected: Expect) {
    try_assert_not_published(backend, &expected)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Returns the one message matching `expected` among those the open transaction `conn` sees:
/// the committed ones and its own uncommitted publishes.
///
/// # Errors
///
/// [`AssertError::Count`] when none or several match, or [`AssertError::Backend`] (which on
/// Postgres aborts the transaction).
///
/// # Cancel safety
///
/// Cancel safe: read-only (on Postgres, the transaction stays usable).
pub async fn try_assert_published_in<B: TestBackend>(
    backend: &B,
    conn: &mut B::Conn,
    expected: &Expect,
) -> Result<StoredMessage, AssertError> {
    let all = backend
        .messages_in(conn, None)
        .await
        .map_err(AssertError::Backend)?;
    one(all, expected)
}

/// Asserts exactly one message matching `expected` is visible to the open transaction `conn`
/// (published in it, or committed before), and returns it: check what your code published
/// before deciding to commit.
///
/// ```no_run
/// # async fn t(outbox: impl postbox_testkit::TestBackend) -> postbox_core::Result<()> {
/// use postbox_core::prelude::*;
/// use postbox_core::Message;
/// use postbox_testkit::{Expect, assert_not_published, assert_published_in};
///
/// let mut tx = outbox.begin().await?;
/// outbox.publish(&mut tx, Message::new("emails", "receipt")).await?;
/// assert_published_in(&outbox, &mut tx, Expect::queue("emails")).await; // seen inside
/// assert_not_published(&outbox, Expect::queue("emails")).await; // not yet outside
/// outbox.commit(tx).await?;
/// # Ok(()) }
/// ```
///
/// # Panics
///
/// When none or several match, listing what the transaction sees.
///
/// # Cancel safety
///
/// Cancel safe: read-only (on Postgres, the transaction stays usable).
pub async fn assert_published_in<B: TestBackend>(
    backend: &B,
    conn: &mut B::Conn,
    expected: Expect,
) -> StoredMessage {
    try_assert_published_in(backend, conn, &expected)
        .await
        .unwrap_or_else(|e| panic!("in the open transaction: {e}"))
}

/// Asserts no message visible to the open transaction `conn` matches `expected`.
///
/// # Panics
///
/// When one does, listing what the transaction sees.
///
/// # Cancel safety
///
/// Cancel safe: read-only (on Postgres, the transaction stays usable).
pub async fn assert_not_published_in<B: TestBackend>(
    backend: &B,
    conn: &mut B::Conn,
    expected: Expect,
) {
    let all = backend
        .messages_in(conn, None)
        .await
        .unwrap_or_else(|e| panic!("could not read messages: {e}"));
    if let Err(e) = exactly(all, &expected, 0) {
        panic!("in the open transaction: {e}");
    }
}

/// Returns the payload of the one message matching `expected`, decoded from JSON as `T`.
///
/// # Errors
///
/// [`AssertError::Count`], [`AssertError::Decode`] (with the message and serde's reason), or
/// [`AssertError::Backend`].
///
/// # Cancel safety
///
/// Cancel safe: read-only; drop the call and make it again.
pub async fn try_assert_published_as<T: DeserializeOwned, B: Inspect>(
    backend: &B,
    expected: &Expect,
) -> Result<T, AssertError> {
    let message = try_assert_published(backend, expected).await?;
    serde_json::from_slice(&message.payload).map_err(|error| AssertError::Decode {
        message: describe(&message),
        error,
    })
}

/// Asserts exactly one stored message matches `expected` and returns its payload decoded as
/// `T`, for assertions on the typed value rather than on JSON.
///
/// ```no_run
/// # async fn t(outbox: impl postbox_core::Backend) {
/// #[derive(serde::Deserialize)]
/// struct Receipt { order: u64, total_cents: u64 }
///
/// let receipt: Receipt =
///     postbox_testkit::assert_published_as(&outbox, postbox_testkit::Expect::queue("emails")).await;
/// assert_eq!((receipt.order, receipt.total_cents), (42, 990));
/// # }
/// ```
///
/// # Panics
///
/// When none or several match (listing what is stored), or when the payload is not a `T`.
///
/// # Cancel safety
///
/// Cancel safe: read-only; drop the call and make it again.
pub async fn assert_published_as<T: DeserializeOwned, B: Inspect>(
    backend: &B,
    expected: Expect,
) -> T {
    try_assert_published_as(backend, &expected)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Waits up to `limit` until exactly one stored message matches `expected`, and returns it:
/// for messages published by work the test spawned (a subscriber's handler, a background
/// task). Checks every 5 ms; under paused tokio time the limit is virtual.
///
/// # Errors
///
/// [`AssertError::Timeout`] with what the last check found, or [`AssertError::Backend`].
///
/// # Cancel safety
///
/// Cancel safe: read-only; drop the call and make it again.
pub async fn try_wait_published_within<B: Inspect>(
    backend: &B,
    expected: &Expect,
    limit: Duration,
) -> Result<StoredMessage, AssertError> {
    let until = tokio::time::Instant::now() + limit;
    loop {
        match try_assert_published(backend, expected).await {
            Ok(message) => return Ok(message),
            Err(AssertError::Count { .. }) if tokio::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(last @ AssertError::Count { .. }) => {
                return Err(AssertError::Timeout {
                    waited: limit,
                    last: Box::new(last),
                });
            }
            Err(other) => return Err(other),
        }
    }
}

/// Waits up to [`deadline()`] until exactly one stored message matches `expected`, and
/// returns it.
///
/// # Panics
///
/// After the deadline, listing what is stored.
///
/// # Cancel safety
///
/// Cancel safe: read-only; drop the call and make it again.
pub async fn wait_published<B: Inspect>(backend: &B, expected: Expect) -> StoredMessage {
    wait_published_within(backend, expected, deadline()).await
}

/// [`wait_published`] with an explicit limit.
///
/// # Panics
///
/// After `limit`, listing what is stored.
///
/// # Cancel safety
///
/// Cancel safe: read-only; drop the call and make it again.
pub async fn wait_published_within<B: Inspect>(
    backend: &B,
    expected: Expect,
    limit: Duration,
) -> StoredMessage {
    try_wait_published_within(backend, &expected, limit)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}
