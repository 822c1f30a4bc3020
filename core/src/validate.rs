//! What Postgres cannot store, refused before anything is written or published.
//!
//! Every backend runs these checks first, so the fake refuses exactly what Postgres would
//! and a test that passes on the fake does not fail in production on the same input:
//!
//! - **NUL in text.** Postgres `text` cannot hold U+0000 (`invalid byte sequence for encoding
//!   "UTF8": 0x00`) and `jsonb` refuses `\u0000` in any string or key (22P05, "unsupported
//!   Unicode escape sequence"). Queue, group, member and stream names, event types, error
//!   texts, dead-letter reasons, header and journal payload strings are checked.
//! - **Delays and instants out of range.** A delay is added to the database clock as an
//!   `interval`, and `timestamptz` starts at 4713 BC; a delay above [`MAX_DELAY`] or an
//!   instant before that is refused (the fake's clock could not hold the first either).
//!
//! Each refusal is [`Error::InvalidArgument`] naming the field and the limit.

use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};

use crate::error::{Error, Result};

/// The longest delay a publish or a retry accepts: 10,000 years of 365.25 days.
pub const MAX_DELAY: Duration = Duration::from_secs(10_000 * 31_557_600);

/// The earliest year (astronomical numbering, so 4713 BC is -4712) Postgres' `timestamptz`
/// holds.
const MIN_YEAR: i32 = -4712;

/// Refuses a NUL character in `value`, which Postgres stores as `text`.
pub(crate) fn text(field: &str, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(nul(field));
    }
    Ok(())
}

/// Refuses `\u0000` in any string or key of `value`, which Postgres stores as `jsonb`.
pub(crate) fn json<'a>(
    field: &str,
    value: impl IntoIterator<Item = (&'a String, &'a serde_json::Value)>,
) -> Result<()> {
    fn walk(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(items) => items.iter().any(walk),
            serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || walk(v)),
            _ => false,
        }
    }
    if value.into_iter().any(|(k, v)| k.contains('\0') || walk(v)) {
        return Err(nul(field));
    }
    Ok(())
}

/// Refuses a delay above [`MAX_DELAY`].
pub(crate) fn delay(field: &str, delay: Duration) -> Result<()> {
    if delay > MAX_DELAY {
        return Err(Error::InvalidArgument(format!(
            "{field} of {delay:?} is longer than the 10,000 years postbox accepts (MAX_DELAY)"
        )));
    }
    Ok(())
}

/// Refuses an instant before 4713 BC, where Postgres' `timestamptz` starts.
pub(crate) fn instant(field: &str, at: DateTime<Utc>) -> Result<()> {
    if at.year() < MIN_YEAR {
        return Err(Error::InvalidArgument(format!(
            "{field} {at} is before 4713 BC, the earliest instant Postgres can store"
        )));
    }
    Ok(())
}

/// `value` with every NUL replaced by U+FFFD, for texts postbox stores on a user's behalf
/// without a way to refuse them (a handler's error message becoming `last_error`).
pub(crate) fn storable(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains('\0') {
        std::borrow::Cow::Owned(value.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(value)
    }
}

fn nul(field: &str) -> Error {
    Error::InvalidArgument(format!(
        "{field} contains a NUL character (U+0000), which Postgres cannot store in text or jsonb; remove or escape it"
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn max_delay_is_ten_thousand_julian_years() {
        assert_eq!(
            MAX_DELAY.as_secs(),
            10_000 * 365 * 86_400 + 10_000 * 86_400 / 4
        );
    }

    use super::*;

    #[test]
    fn nul_is_refused_in_text_and_anywhere_in_json() {
        assert!(text("queue", "orders").is_ok());
        let err = text("queue", "or\0ders").expect_err("NUL");
        assert!(err.to_string().contains("queue contains a NUL"), "{err}");

        let ok = serde_json::json!({"a": ["b", {"c": "d"}], "n": 1});
        assert!(json("headers", ok.as_object().expect("object")).is_ok());
        for bad in [
            serde_json::json!({"a": "x\u{0}"}),
            serde_json::json!({"a\u{0}": 1}),
            serde_json::json!({"a": [1, {"b": ["\u{0}"]}]}),
            serde_json::json!({"a": {"b\u{0}": null}}),
        ] {
            let err = json("headers", bad.as_object().expect("object")).expect_err("NUL");
            assert!(
                err.to_string().starts_with("invalid argument: headers"),
                "{err}"
            );
        }
    }

    #[test]
    fn delays_and_instants_out_of_range_are_refused() {
        assert!(delay("retry delay", MAX_DELAY).is_ok());
        let err = delay("retry delay", Duration::MAX).expect_err("too long");
        assert!(err.to_string().contains("MAX_DELAY"), "{err}");
        assert!(delay("retry delay", MAX_DELAY + Duration::from_secs(1)).is_err());

        let start = chrono::NaiveDate::from_ymd_opt(-4712, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .expect("instant")
            .and_utc();
        assert!(instant("not_before", start).is_ok());
        assert!(instant("not_before", start - chrono::Duration::days(1)).is_err());
        assert!(instant("not_before", DateTime::<Utc>::MIN_UTC).is_err());
    }

    #[test]
    fn storable_replaces_nul_only() {
        assert_eq!(storable("plain"), "plain");
        assert_eq!(storable("a\0b"), "a\u{FFFD}b");
    }
}
