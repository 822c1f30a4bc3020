//! Retries: accounting, delays on the backend's clock, policies ending in dead letters.

use std::time::Duration;

use postbox_core::{HandlerError, Message, Outcome, RetryParams, RetryPolicy};

use super::{Harness, fetch, publish};
use crate::time::TimeControl;
use postbox_core::prelude::*;

/// A retry counts an attempt, records the error and clears the lease.
pub async fn retry_counts_an_attempt_and_records_the_error<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let d = fetch(b, "q", 1).await.remove(0);
    assert!(
        b.retry(
            d.lease(),
            RetryParams::new(Duration::ZERO).error("smtp down")
        )
        .await
        .expect("retry")
    );
    let again = fetch(b, "q", 1).await.remove(0);
    assert_eq!((again.attempts, again.deliveries), (1, 2));
    assert_eq!(again.last_error.as_deref(), Some("smtp down"));
    assert!(
        !b.ack(d.lease()).await.expect("ack"),
        "the retried lease is gone"
    );
}

/// A retry's delay runs on the backend's clock.
pub async fn retry_delay_runs_on_the_backend_clock<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let d = fetch(b, "q", 1).await.remove(0);
    let before = b.now().await.expect("now");
    assert!(
        b.retry(d.lease(), RetryParams::new(Duration::from_secs(30)))
            .await
            .expect("retry")
    );
    let stored = b.messages(None).await.expect("messages").remove(0);
    let delay = stored.next_attempt_at - before;
    assert!(
        delay >= chrono::Duration::seconds(30) && delay < chrono::Duration::seconds(31),
        "{delay}"
    );
    assert!(fetch(b, "q", 1).await.is_empty());
    b.advance(Duration::from_secs(31)).await.expect("advance");
    assert_eq!(fetch(b, "q", 1).await.len(), 1);
}

/// `fail` follows the policy: retries until the attempts run out, then dead-letters.
pub async fn retry_policy_exhaustion_dead_letters<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let policy = RetryPolicy::constant(Duration::ZERO).max_attempts(3);
    let error = HandlerError::retry("flaky");
    for _ in 0..2 {
        let d = fetch(b, "q", 1).await.remove(0);
        assert_eq!(
            b.fail(&d, &error, &policy).await.expect("fail"),
            Outcome::Retried {
                delay: Duration::ZERO
            }
        );
    }
    let d = fetch(b, "q", 1).await.remove(0);
    let outcome = b.fail(&d, &error, &policy).await.expect("fail");
    assert!(
        matches!(&outcome, Outcome::DeadLettered { reason } if reason.contains("exhausted after 3")),
        "{outcome:?}"
    );
    let dead = b.dead_letters(None).await.expect("dead");
    assert_eq!(
        (dead.len(), dead[0].attempts, dead[0].deliveries),
        (1, 3, 3)
    );
    assert!(b.messages(None).await.expect("messages").is_empty());
}

/// A rejection dead-letters at once, whatever attempts are left.
pub async fn retry_rejection_dead_letters_at_once<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let d = fetch(b, "q", 1).await.remove(0);
    let outcome = b
        .fail(
            &d,
            &HandlerError::reject("bad payload"),
            &RetryPolicy::default(),
        )
        .await
        .expect("fail");
    assert_eq!(
        outcome,
        Outcome::DeadLettered {
            reason: "rejected: bad payload".into()
        }
    );
    assert_eq!(
        b.dead_letters(None).await.expect("dead")[0].reason,
        "rejected: bad payload"
    );
}

/// A time budget, measured from the first attempt on the backend's clock, ends retries.
pub async fn retry_budget_measured_on_the_backend_clock<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let policy = RetryPolicy::constant(Duration::from_secs(10))
        .max_attempts(100)
        .budget(Duration::from_secs(25));
    let error = HandlerError::retry("down");
    // Attempt at 0 s, retry at 10 s, at 20 s: the next delay would end at 30 s > 25 s.
    for _ in 0..2 {
        let d = fetch(b, "q", 1).await.remove(0);
        assert!(matches!(
            b.fail(&d, &error, &policy).await.expect("fail"),
            Outcome::Retried { .. }
        ));
        b.advance(Duration::from_secs(10)).await.expect("advance");
    }
    let d = fetch(b, "q", 1).await.remove(0);
    let outcome = b.fail(&d, &error, &policy).await.expect("fail");
    assert!(
        matches!(&outcome, Outcome::DeadLettered { reason } if reason.contains("budget")),
        "{outcome:?}"
    );
}

/// `retry_after` overrides the backoff but still counts the attempt.
pub async fn retry_after_overrides_the_backoff<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let d = fetch(b, "q", 1).await.remove(0);
    let error = HandlerError::retry_after(Duration::from_secs(120), "rate limited");
    let outcome = b
        .fail(&d, &error, &RetryPolicy::constant(Duration::ZERO))
        .await
        .expect("fail");
    assert_eq!(
        outcome,
        Outcome::Retried {
            delay: Duration::from_secs(120)
        }
    );
    b.advance(Duration::from_secs(60)).await.expect("advance");
    assert!(fetch(b, "q", 1).await.is_empty());
    b.advance(Duration::from_secs(61)).await.expect("advance");
    assert_eq!(fetch(b, "q", 1).await.remove(0).attempts, 1);
}
