//! Assertions on what was published, for any [`Backend`].
//!
//! Each `assert_*` panics with a message listing what was there; its `try_*` twin returns the
//! same failure as an [`AssertError`]. Unset fields of an [`Expect`] are not checked.

use std::fmt;

use postbox_core::{Backend, MessageState, StoredMessage};
use serde::Serialize;
use serde_json::Value;

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
pub async fn published<B: Backend>(backend: &B, queue: Option<&str>) -> Vec<StoredMessage> {
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
pub async fn try_assert_published_many<B: Backend>(
    backend: &B,
    expected: &Expect,
    n: usize,
) -> Result<Vec<StoredMessage>, AssertError> {
    let all = backend.messages(None).await.map_err(AssertError::Backend)?;
    let matched: Vec<StoredMessage> = all
        .iter()
        .filter(|m| expected.matches(m))
        .cloned()
        .collect();
    if matched.len() == n {
        Ok(matched)
    } else {
        Err(AssertError::Count {
            expected: expected.clone(),
            wanted: n,
            matched: matched.len(),
            seen: all.iter().map(describe).collect(),
        })
    }
}

/// Returns the one message matching `expected`.
///
/// # Errors
///
/// [`AssertError::Count`] when none or several match (ambiguous), or [`AssertError::Backend`].
pub async fn try_assert_published<B: Backend>(
    backend: &B,
    expected: &Expect,
) -> Result<StoredMessage, AssertError> {
    let mut one = try_assert_published_many(backend, expected, 1).await?;
    one.pop().ok_or_else(|| AssertError::Count {
        expected: expected.clone(),
        wanted: 1,
        matched: 0,
        seen: Vec::new(),
    })
}

/// Checks that no stored message matches `expected`.
///
/// # Errors
///
/// [`AssertError::Count`] listing every stored message, or [`AssertError::Backend`].
pub async fn try_assert_not_published<B: Backend>(
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
pub async fn assert_published<B: Backend>(backend: &B, expected: Expect) -> StoredMessage {
    try_assert_published(backend, &expected)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts exactly `n` stored messages match `expected` and returns them.
///
/// # Panics
///
/// When another number match, listing what is stored.
pub async fn assert_published_many<B: Backend>(
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
pub async fn assert_not_published<B: Backend>(backend: &B, expected: Expect) {
    try_assert_not_published(backend, &expected)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}
