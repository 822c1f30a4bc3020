//! [`Envelope`]: what every stored form of a message carries.

use uuid::Uuid;

/// The id of a message: the outbox table's `bigserial` primary key.
pub type MessageId = i64;

/// Header map of a message: always a JSON object, so "headers that are not an object" cannot be
/// expressed.
pub type Headers = serde_json::Map<String, serde_json::Value>;

/// A message as stored: what was published (id, queue, payload, headers, correlation id)
/// and what happened to it so far (attempts, deliveries, the last error).
///
/// The three row types ([`Delivery`](crate::Delivery), [`StoredMessage`](crate::StoredMessage)
/// and [`DeadLetter`](crate::DeadLetter)) each hold one and add what their own place adds (a
/// lease, a state, a reason). Each dereferences to it, so `delivery.id` or
/// `dead.payload` read the envelope's fields, and code that only needs the message takes
/// `&Envelope`: `handle(&delivery)` works for any of the three.
///
/// ```
/// use postbox_core::Envelope;
///
/// let mut envelope = Envelope::new(7, "emails", br#"{"to":"ada@example.com"}"#.to_vec());
/// envelope.attempts = 2;
/// let body: serde_json::Value = envelope.json()?;
/// assert_eq!(body["to"], "ada@example.com");
/// # Ok::<(), postbox_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Envelope {
    /// The message id.
    pub id: MessageId,
    /// The queue it was published to.
    pub queue: String,
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// The headers, if any.
    pub headers: Option<Headers>,
    /// The correlation id (generated at publish time when none was given).
    pub correlation_id: Uuid,
    /// Handler outcomes recorded so far (retries; for a dead letter, the final one included).
    pub attempts: i32,
    /// Times the message has been leased.
    pub deliveries: i32,
    /// The error recorded by the last retry.
    pub last_error: Option<String>,
}

impl Envelope {
    /// An envelope of `payload` on `queue` under `id`, never attempted nor delivered, with no
    /// headers and the nil correlation id. Set the other fields directly.
    ///
    /// For backends that build rows and for tests; publishing takes a
    /// [`Message`](crate::Message) and the backend assigns the id.
    pub fn new(id: MessageId, queue: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Envelope {
            id,
            queue: queue.into(),
            payload: payload.into(),
            headers: None,
            correlation_id: Uuid::nil(),
            attempts: 0,
            deliveries: 0,
            last_error: None,
        }
    }

    /// Deserializes the payload from JSON.
    ///
    /// # Errors
    ///
    /// [`Error::Json`](crate::Error::Json) if the payload is not valid JSON for `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> crate::Result<T> {
        Ok(serde_json::from_slice(&self.payload)?)
    }
}

/// `Deref` and `DerefMut` to the `envelope` field, for the row types built around one (each
/// invokes it beside its definition, so this module depends on none of them).
macro_rules! derefs_to_envelope {
    ($($row:ty),+) => {$(
        impl std::ops::Deref for $row {
            type Target = $crate::envelope::Envelope;

            fn deref(&self) -> &$crate::envelope::Envelope {
                &self.envelope
            }
        }

        impl std::ops::DerefMut for $row {
            fn deref_mut(&mut self) -> &mut $crate::envelope::Envelope {
                &mut self.envelope
            }
        }
    )+};
}

pub(crate) use derefs_to_envelope;
