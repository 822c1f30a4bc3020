//! Handler errors and the retry policies that turn them into a delay or a dead letter.
//!
//! A policy is a pure function of the attempt number, the time spent since the first attempt
//! (database clock) and the error itself; the backends only apply its decision. Exhausted
//! retries always dead-letter: postbox never deletes a message that was not acked or rejected.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The error a handler returns. Its kind steers what happens to the message.
///
/// - [`HandlerError::retry`] (also what `?` on any error gives): retry per the policy.
/// - [`HandlerError::retry_after`]: retry after exactly this delay (still counts an attempt).
/// - [`HandlerError::reject`]: dead-letter at once, whatever the policy says.
pub struct HandlerError {
    kind: HandlerErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// What a [`HandlerError`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandlerErrorKind {
    /// Retry according to the policy.
    Retry,
    /// Retry after this delay, instead of the policy's backoff.
    RetryAfter(Duration),
    /// Do not retry: move to the dead-letter table.
    Reject,
}

impl HandlerError {
    /// A retryable failure described by `message`.
    pub fn retry(message: impl fmt::Display) -> Self {
        Self::with_kind(HandlerErrorKind::Retry, message)
    }

    /// A retryable failure that should be retried after `delay` (overrides the backoff; the
    /// attempt limit and the budget still apply).
    pub fn retry_after(delay: Duration, message: impl fmt::Display) -> Self {
        Self::with_kind(HandlerErrorKind::RetryAfter(delay), message)
    }

    /// A permanent failure: the message is dead-lettered with `reason`.
    pub fn reject(reason: impl fmt::Display) -> Self {
        Self::with_kind(HandlerErrorKind::Reject, reason)
    }

    fn with_kind(kind: HandlerErrorKind, message: impl fmt::Display) -> Self {
        HandlerError {
            kind,
            message: message.to_string(),
            source: None,
        }
    }

    /// What this error asks for.
    pub fn kind(&self) -> HandlerErrorKind {
        self.kind
    }

    /// The message recorded as `last_error` (or as the dead-letter reason).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError {
            kind: HandlerErrorKind::Retry,
            message: error.to_string(),
            source: Some(Box::new(error)),
        }
    }
}

impl HandlerError {
    /// The underlying error, when this was built from one with `?` or `From`.
    pub fn source(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

/// How the delay grows between attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Backoff {
    /// The same delay every time.
    Constant(Duration),
    /// `initial + step * (n - 1)` for the n-th retry, capped at `cap`.
    Linear {
        /// Delay of the first retry.
        initial: Duration,
        /// Added per further retry.
        step: Duration,
        /// Upper bound.
        cap: Duration,
    },
    /// `initial * multiplier^(n - 1)` for the n-th retry, capped at `cap`.
    Exponential {
        /// Delay of the first retry.
        initial: Duration,
        /// Growth factor per retry (at least 1).
        multiplier: f64,
        /// Upper bound.
        cap: Duration,
    },
}

impl Backoff {
    /// The delay before retry number `n` (1-based), before jitter. Never exceeds the cap.
    pub fn base_delay(&self, n: u32) -> Duration {
        let n = n.max(1);
        match *self {
            Backoff::Constant(d) => d,
            Backoff::Linear { initial, step, cap } => {
                initial.saturating_add(step.saturating_mul(n - 1)).min(cap)
            }
            Backoff::Exponential {
                initial,
                multiplier,
                cap,
            } => {
                let factor = multiplier
                    .max(1.0)
                    .powi(i32::try_from(n - 1).unwrap_or(i32::MAX));
                // Overflow, infinity and NaN all mean "beyond the cap".
                Duration::try_from_secs_f64(initial.as_secs_f64() * factor)
                    .map_or(cap, |d| d.min(cap))
            }
        }
    }
}

/// A predicate deciding whether an error is worth retrying at all.
pub type RetryPredicate = Arc<dyn Fn(&HandlerError) -> bool + Send + Sync>;

/// What to do with a message whose handler failed.
///
/// The default is exponential backoff: 1 s, doubling, capped at 300 s, 10 % jitter, at most 10
/// attempts, no total budget.
///
/// Jitter is applied *inside* the cap: a delay `d` becomes a random value in
/// `[d * (1 - jitter), d]`, so a capped delay never exceeds the cap.
///
/// ```
/// use std::time::Duration;
/// use postbox_core::{HandlerError, RetryDecision, RetryPolicy};
///
/// let policy = RetryPolicy::constant(Duration::from_secs(5)).max_attempts(3);
/// let err = HandlerError::retry("smtp timeout");
/// assert_eq!(policy.decide(0, Duration::ZERO, &err), RetryDecision::Retry { delay: Duration::from_secs(5) });
/// assert!(matches!(policy.decide(2, Duration::ZERO, &err), RetryDecision::DeadLetter { .. }));
/// ```
#[derive(Clone)]
pub struct RetryPolicy {
    backoff: Backoff,
    max_attempts: u32,
    jitter: f64,
    budget: Option<Duration>,
    retry_if: Option<RetryPredicate>,
}

/// The verdict of a [`RetryPolicy`] on one failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryDecision {
    /// Make the message eligible again after `delay`.
    Retry {
        /// How long to wait (database clock).
        delay: Duration,
    },
    /// Move the message to the dead-letter table.
    DeadLetter {
        /// Why, recorded in the `reason` column.
        reason: String,
    },
}

impl RetryPolicy {
    /// No retries: the first failure dead-letters.
    pub fn none() -> Self {
        RetryPolicy {
            backoff: Backoff::Constant(Duration::ZERO),
            max_attempts: 1,
            jitter: 0.0,
            budget: None,
            retry_if: None,
        }
    }

    /// The same `delay` before every retry; 10 attempts, no jitter.
    pub fn constant(delay: Duration) -> Self {
        RetryPolicy {
            backoff: Backoff::Constant(delay),
            ..RetryPolicy::none()
        }
        .max_attempts(10)
    }

    /// `initial`, then `initial + step`, `initial + 2 * step`, ..., capped at `cap`; 10 attempts,
    /// no jitter.
    pub fn linear(initial: Duration, step: Duration, cap: Duration) -> Self {
        RetryPolicy {
            backoff: Backoff::Linear { initial, step, cap },
            ..RetryPolicy::none()
        }
        .max_attempts(10)
    }

    /// `initial * multiplier^(n-1)`, capped at `cap`; 10 attempts, 10 % jitter.
    pub fn exponential(initial: Duration, multiplier: f64, cap: Duration) -> Self {
        RetryPolicy {
            backoff: Backoff::Exponential {
                initial,
                multiplier,
                cap,
            },
            ..RetryPolicy::none()
        }
        .max_attempts(10)
        .jitter(0.1)
    }

    /// Total handler attempts allowed, the first one included (at least 1). The failure of the
    /// last one dead-letters. Defaults to 10.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Randomizes each delay down by up to this fraction (clamped to `0.0..=1.0`), so that
    /// consumers failing together do not retry together. Jitter never pushes a delay above
    /// the cap. Defaults to 0.1 for exponential and 0 otherwise.
    #[must_use]
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        self
    }

    /// Gives up (dead-letters) once the time since the first attempt plus the next delay would
    /// exceed `budget`. Times come from the database clock. Defaults to no budget.
    #[must_use]
    pub fn budget(mut self, budget: Duration) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Retries only errors for which `predicate` returns `true`; others dead-letter at once.
    /// Defaults to retrying every error that is not a [`HandlerError::reject`].
    #[must_use]
    pub fn retry_if(
        mut self,
        predicate: impl Fn(&HandlerError) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.retry_if = Some(Arc::new(predicate));
        self
    }

    /// The backoff shape.
    pub fn get_backoff(&self) -> Backoff {
        self.backoff
    }

    /// The attempt limit.
    pub fn get_max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Decides what to do after a failure.
    ///
    /// `attempts` is the number of failures recorded before this one ([`Delivery::attempts`]),
    /// `elapsed` the time from the first attempt to this delivery's lease, both from the
    /// database.
    ///
    /// [`Delivery::attempts`]: crate::Envelope::attempts
    pub fn decide(&self, attempts: i32, elapsed: Duration, error: &HandlerError) -> RetryDecision {
        self.decide_with(attempts, elapsed, error, fastrand::f64())
    }

    /// [`decide`](Self::decide) with the jitter's random draw (in `0.0..1.0`) given, for
    /// deterministic tests.
    pub fn decide_with(
        &self,
        attempts: i32,
        elapsed: Duration,
        error: &HandlerError,
        draw: f64,
    ) -> RetryDecision {
        let attempt = u32::try_from(attempts.max(0))
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        let dead = |reason: String| RetryDecision::DeadLetter { reason };
        let delay = match error.kind() {
            HandlerErrorKind::Reject => return dead(format!("rejected: {error}")),
            _ if self.retry_if.as_ref().is_some_and(|p| !p(error)) => {
                return dead(format!("not retryable: {error}"));
            }
            _ if attempt >= self.max_attempts => {
                return dead(format!(
                    "retries exhausted after {attempt} attempts: {error}"
                ));
            }
            HandlerErrorKind::RetryAfter(delay) => delay,
            HandlerErrorKind::Retry => self.jittered(self.backoff.base_delay(attempt), draw),
        };
        if let Some(budget) = self.budget
            && elapsed.saturating_add(delay) > budget
        {
            return dead(format!(
                "retry budget of {budget:?} exhausted after {attempt} attempts: {error}"
            ));
        }
        RetryDecision::Retry { delay }
    }

    fn jittered(&self, delay: Duration, draw: f64) -> Duration {
        let cut = self.jitter * draw.clamp(0.0, 1.0);
        delay.mul_f64(1.0 - cut)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::exponential(Duration::from_secs(1), 2.0, Duration::from_secs(300))
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("backoff", &self.backoff)
            .field("max_attempts", &self.max_attempts)
            .field("jitter", &self.jitter)
            .field("budget", &self.budget)
            .field("retry_if", &self.retry_if.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_shows_the_policy_and_the_error_without_the_predicate() {
        let policy = RetryPolicy::constant(Duration::from_secs(2))
            .max_attempts(3)
            .retry_if(|_| true);
        let shown = format!("{policy:?}");
        assert!(
            shown.starts_with("RetryPolicy { backoff: Constant(2s), max_attempts: 3, jitter: "),
            "{shown}"
        );
        assert!(shown.ends_with(r#"retry_if: Some("<fn>") }"#), "{shown}");
        let error = HandlerError::reject("bad input");
        assert_eq!(
            format!("{error:?}"),
            r#"HandlerError { kind: Reject, message: "bad input" }"#
        );
    }

    #[test]
    fn exponential_backoff_reaches_the_cap_exactly_and_stays_there() {
        let b = Backoff::Exponential {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            cap: Duration::from_secs(8),
        };
        let delays: Vec<u64> = (1..=6).map(|n| b.base_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 8, 8]);
        assert_eq!(
            b.base_delay(u32::MAX),
            Duration::from_secs(8),
            "overflow is the cap"
        );
    }

    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn delay(d: RetryDecision) -> Duration {
        match d {
            RetryDecision::Retry { delay } => delay,
            RetryDecision::DeadLetter { reason } => panic!("dead-lettered: {reason}"),
        }
    }

    fn err() -> HandlerError {
        HandlerError::retry("boom")
    }

    #[test]
    fn none_dead_letters_the_first_failure() {
        let d = RetryPolicy::none().decide(0, Duration::ZERO, &err());
        assert!(
            matches!(d, RetryDecision::DeadLetter { reason } if reason.contains("exhausted after 1"))
        );
    }

    #[test]
    fn constant_delays_and_limit() {
        let p = RetryPolicy::constant(5 * S).max_attempts(3);
        assert_eq!(delay(p.decide(0, Duration::ZERO, &err())), 5 * S);
        assert_eq!(delay(p.decide(1, Duration::ZERO, &err())), 5 * S);
        assert!(matches!(
            p.decide(2, Duration::ZERO, &err()),
            RetryDecision::DeadLetter { .. }
        ));
    }

    #[test]
    fn linear_grows_by_step_and_caps() {
        let p = RetryPolicy::linear(S, 2 * S, 6 * S);
        let delays: Vec<_> = (0..5)
            .map(|a| delay(p.decide(a, Duration::ZERO, &err())))
            .collect();
        assert_eq!(delays, [S, 3 * S, 5 * S, 6 * S, 6 * S]);
    }

    #[test]
    fn exponential_doubles_and_caps_without_jitter() {
        let p = RetryPolicy::exponential(S, 2.0, 10 * S).jitter(0.0);
        let delays: Vec<_> = (0..6)
            .map(|a| delay(p.decide(a, Duration::ZERO, &err())))
            .collect();
        assert_eq!(delays, [S, 2 * S, 4 * S, 8 * S, 10 * S, 10 * S]);
    }

    #[test]
    fn default_is_exponential_1s_x2_cap_300s_10_attempts() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.get_backoff(),
            Backoff::Exponential {
                initial: S,
                multiplier: 2.0,
                cap: 300 * S
            }
        );
        assert_eq!(p.get_max_attempts(), 10);
        assert!(matches!(
            p.decide(9, Duration::ZERO, &err()),
            RetryDecision::DeadLetter { .. }
        ));
        assert!(matches!(
            p.decide(8, Duration::ZERO, &err()),
            RetryDecision::Retry { .. }
        ));
    }

    #[test]
    fn jitter_stays_within_the_cap_and_the_band() {
        let cap = 30 * S;
        let p = RetryPolicy::exponential(S, 3.0, cap)
            .jitter(0.5)
            .max_attempts(100);
        for attempts in 0..40 {
            let base = p
                .get_backoff()
                .base_delay(u32::try_from(attempts).expect("small") + 1);
            for draw in [0.0, 0.25, 0.5, 0.999_999] {
                let d = delay(p.decide_with(attempts, Duration::ZERO, &err(), draw));
                assert!(d <= cap, "attempt {attempts}: {d:?} > cap");
                assert!(
                    d <= base && d >= base.mul_f64(0.5),
                    "{d:?} outside band of {base:?}"
                );
            }
        }
        // And with real randomness, many draws never exceed the cap.
        for _ in 0..10_000 {
            assert!(delay(p.decide(20, Duration::ZERO, &err())) <= cap);
        }
    }

    #[test]
    fn huge_attempt_counts_saturate_at_the_cap() {
        let p = RetryPolicy::exponential(S, 2.0, 300 * S)
            .max_attempts(u32::MAX)
            .jitter(0.0);
        assert_eq!(
            delay(p.decide(i32::MAX - 1, Duration::ZERO, &err())),
            300 * S
        );
    }

    #[test]
    fn budget_dead_letters_when_the_next_delay_would_exceed_it() {
        let p = RetryPolicy::constant(10 * S).budget(60 * S);
        assert_eq!(delay(p.decide(1, 50 * S, &err())), 10 * S);
        let d = p.decide(1, 51 * S, &err());
        assert!(matches!(d, RetryDecision::DeadLetter { reason } if reason.contains("budget")));
    }

    #[test]
    fn the_policy_sees_the_error() {
        let p = RetryPolicy::constant(S).retry_if(|e| !e.message().contains("permanent"));
        assert_eq!(
            delay(p.decide(0, Duration::ZERO, &HandlerError::retry("flaky"))),
            S
        );
        assert!(matches!(
            p.decide(0, Duration::ZERO, &HandlerError::retry("permanent failure")),
            RetryDecision::DeadLetter { reason } if reason.starts_with("not retryable")
        ));
        let d = p.decide(
            0,
            Duration::ZERO,
            &HandlerError::retry_after(7 * S, "rate limited"),
        );
        assert_eq!(delay(d), 7 * S);
        let d = p.decide(0, Duration::ZERO, &HandlerError::reject("bad payload"));
        assert_eq!(
            d,
            RetryDecision::DeadLetter {
                reason: "rejected: bad payload".into()
            }
        );
    }

    #[test]
    fn errors_convert_with_question_mark() {
        fn handler() -> Result<(), HandlerError> {
            let _n: i32 = "x".parse()?;
            Ok(())
        }
        let e = handler().expect_err("parse fails");
        assert_eq!(e.kind(), HandlerErrorKind::Retry);
        assert!(e.source().is_some());
    }
}
