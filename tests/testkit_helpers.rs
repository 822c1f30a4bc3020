//! The testkit's assertion and drain helpers, on the fake and on Postgres.

use std::time::Duration;

use postbox::fake::FakeBroker;
use postbox::prelude::*;
use postbox::testkit::{
    AssertError, DrainOptions, DrainReport, Expect, TimeControl, assert_published,
    assert_published_many, drain, published, run_one, try_assert_not_published,
    try_assert_published,
};
use postbox::{Backend, Delivery, HandlerError, Message, MessageState, Outcome, RetryPolicy};

async fn publish<B: Backend>(b: &B, messages: Vec<Message>) {
    let mut tx = b.begin().await.expect("begin");
    b.publish_batch(&mut tx, messages).await.expect("publish");
    b.commit(tx).await.expect("commit");
}

async fn sample<B: Backend>(b: &B) {
    publish(
        b,
        vec![
            Message::json("orders", &serde_json::json!({"id": 1, "total": 10}))
                .expect("json")
                .header("tenant", "acme"),
            Message::json("orders", &serde_json::json!({"id": 2, "total": 20})).expect("json"),
            Message::new("emails", "hello"),
        ],
    )
    .await;
}

#[tokio::test]
async fn assert_published_returns_the_one_match() {
    let b = FakeBroker::new();
    sample(&b).await;
    // Key order and whitespace do not matter for JSON payloads.
    let m = assert_published(
        &b,
        Expect::queue("orders").json(&serde_json::json!({"total": 10, "id": 1})),
    )
    .await;
    assert_eq!(
        m.headers
            .as_ref()
            .and_then(|h| h.get("tenant"))
            .and_then(|v| v.as_str()),
        Some("acme")
    );
    let m = assert_published(&b, Expect::queue("orders").header("tenant", "acme")).await;
    assert_eq!(m.json::<serde_json::Value>().expect("json")["id"], 1);
    assert_published(
        &b,
        Expect::queue("emails")
            .payload("hello")
            .state(MessageState::Ready),
    )
    .await;
    assert_eq!(
        assert_published_many(&b, Expect::queue("orders"), 2)
            .await
            .len(),
        2
    );
    assert_eq!(published(&b, Some("orders")).await.len(), 2);
}

#[tokio::test]
async fn try_assert_published_reports_missing_and_ambiguous_matches_with_what_is_there() {
    let b = FakeBroker::new();
    sample(&b).await;
    let missing = try_assert_published(&b, &Expect::queue("sms"))
        .await
        .expect_err("none");
    assert!(matches!(
        missing,
        AssertError::Count {
            matched: 0,
            wanted: 1,
            ..
        }
    ));
    let text = missing.to_string();
    assert!(
        text.contains("queue=\"emails\"") && text.contains("hello"),
        "{text}"
    );

    let ambiguous = try_assert_published(&b, &Expect::queue("orders"))
        .await
        .expect_err("two");
    assert!(
        matches!(ambiguous, AssertError::Count { matched: 2, .. }),
        "{ambiguous}"
    );

    let wrong_header = try_assert_published(&b, &Expect::any().header("tenant", "other")).await;
    assert!(wrong_header.is_err());
    try_assert_not_published(&b, &Expect::queue("sms"))
        .await
        .expect("nothing on sms");
    assert!(
        try_assert_not_published(&b, &Expect::queue("emails"))
            .await
            .is_err()
    );
}

#[tokio::test]
#[should_panic(expected = "expected 1 message(s) matching")]
async fn assert_published_panics_with_a_listing() {
    let b = FakeBroker::new();
    assert_published(&b, Expect::queue("orders")).await;
}

/// "ok" succeeds, "flaky" fails with a retryable error, "bad" is rejected.
async fn handler(d: Delivery) -> Result<(), HandlerError> {
    match d.payload.as_slice() {
        b"flaky" => Err(HandlerError::retry("try later")),
        b"bad" => Err(HandlerError::reject("malformed")),
        _ => Ok(()),
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy::constant(Duration::from_secs(10)).max_attempts(3)
}

async fn drain_both_ways<B: Backend + TimeControl>(b: &B) -> (DrainReport, DrainReport) {
    publish(
        b,
        ["ok", "flaky", "bad"]
            .map(|p| Message::new("q", p))
            .to_vec(),
    )
    .await;
    let ready_only = drain(b, "q", handler, DrainOptions::default().policy(policy()))
        .await
        .expect("drain");
    let scheduled = published(b, Some("q")).await;
    assert_eq!(scheduled.len(), 1, "the flaky one waits for its retry");
    assert_eq!(scheduled[0].state, MessageState::Scheduled);
    let everything = drain(
        b,
        "q",
        handler,
        DrainOptions::default()
            .policy(policy())
            .include_scheduled(true),
    )
    .await
    .expect("drain");
    assert!(
        published(b, Some("q")).await.is_empty(),
        "every message settled"
    );
    (ready_only, everything)
}

#[tokio::test]
async fn drain_counts_outcomes_and_can_run_scheduled_messages_on_the_fake() {
    let b = FakeBroker::new();
    let (ready_only, everything) = drain_both_ways(&b).await;
    assert_eq!(
        (
            ready_only.succeeded,
            ready_only.retried,
            ready_only.dead_lettered
        ),
        (1, 1, 1)
    );
    assert_eq!(
        (
            everything.succeeded,
            everything.retried,
            everything.dead_lettered
        ),
        (0, 1, 1)
    );
    assert_eq!(b.dead(None).len(), 2);
}

#[tokio::test]
async fn drain_counts_outcomes_and_can_run_scheduled_messages_on_postgres() {
    let db = postbox::testkit::postgres().await.expect("fixture");
    let b = db.backend();
    let (ready_only, everything) = drain_both_ways(&b).await;
    assert_eq!(
        (
            ready_only.succeeded,
            ready_only.retried,
            ready_only.dead_lettered
        ),
        (1, 1, 1)
    );
    assert_eq!(
        (
            everything.succeeded,
            everything.retried,
            everything.dead_lettered
        ),
        (0, 1, 1)
    );
    assert_eq!(b.dead_letters(None).await.expect("dead").len(), 2);
    db.close().await.expect("close");
}

#[tokio::test]
async fn run_one_runs_exactly_one_delivery() {
    let b = FakeBroker::new();
    assert_eq!(
        run_one(&b, "q", &handler, &policy()).await.expect("run"),
        None
    );
    publish(&b, ["flaky", "ok"].map(|p| Message::new("q", p)).to_vec()).await;
    assert_eq!(
        run_one(&b, "q", &handler, &policy()).await.expect("run"),
        Some(Outcome::Retried {
            delay: Duration::from_secs(10)
        })
    );
    assert_eq!(
        run_one(&b, "q", &handler, &policy()).await.expect("run"),
        Some(Outcome::Acked)
    );
    assert_eq!(
        run_one(&b, "q", &handler, &policy()).await.expect("run"),
        None,
        "the retry is not due"
    );
    b.advance(Duration::from_secs(10));
    assert_eq!(
        run_one(&b, "q", &handler, &policy()).await.expect("run"),
        Some(Outcome::Retried {
            delay: Duration::from_secs(10)
        })
    );
}

#[tokio::test]
async fn a_panicking_handler_counts_as_a_failure_in_run_one() {
    let b = FakeBroker::new();
    publish(&b, vec![Message::new("q", "x")]).await;
    let panicking =
        |_d: Delivery| -> postbox::runtime::HandlerFuture { Box::pin(async { panic!("oops") }) };
    let outcome = run_one(&b, "q", &panicking, &RetryPolicy::none())
        .await
        .expect("run");
    assert!(
        matches!(&outcome, Some(Outcome::DeadLettered { reason }) if reason.contains("panicked")),
        "{outcome:?}"
    );
}

mod in_transaction {
    use std::time::Duration;

    use postbox::Message;
    use postbox::testkit::{
        AssertError, Expect, TestBackend, assert_not_published, assert_not_published_in,
        assert_published_as, assert_published_in, try_assert_published_as,
        try_wait_published_within, wait_published,
    };

    #[postbox::test]
    async fn uncommitted_messages_are_seen_inside_their_transaction_only(
        outbox: impl TestBackend,
    ) -> postbox::Result<()> {
        let mut tx = outbox.begin().await?;
        outbox
            .publish(&mut tx, Message::new("emails", "receipt"))
            .await?;
        let inside = assert_published_in(&outbox, &mut tx, Expect::queue("emails")).await;
        assert_eq!(inside.payload, b"receipt");
        assert_not_published_in(&outbox, &mut tx, Expect::queue("sms")).await;
        assert_not_published(&outbox, Expect::queue("emails")).await;
        drop(tx); // rolled back

        let mut tx = outbox.begin().await?;
        assert_not_published_in(&outbox, &mut tx, Expect::queue("emails")).await;
        outbox
            .publish(&mut tx, Message::new("emails", "second"))
            .await?;
        outbox.commit(tx).await?;

        // Committed messages are seen from a later transaction too.
        let mut tx = outbox.begin().await?;
        assert_published_in(&outbox, &mut tx, Expect::queue("emails").payload("second")).await;
        Ok(())
    }

    #[postbox::test]
    #[should_panic(expected = "in the open transaction: expected 1 message(s)")]
    async fn a_missing_message_in_a_transaction_fails_the_assertion(outbox: impl TestBackend) {
        let mut tx = outbox.begin().await.expect("begin");
        outbox
            .publish(&mut tx, Message::new("emails", "receipt"))
            .await
            .expect("publish");
        assert_published_in(&outbox, &mut tx, Expect::queue("sms")).await;
    }

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Receipt {
        order: u64,
        total_cents: u64,
    }

    #[postbox::test]
    async fn typed_assertions_return_the_decoded_payload(
        outbox: impl TestBackend,
    ) -> postbox::Result<()> {
        let mut tx = outbox.begin().await?;
        let receipt = serde_json::json!({"order": 42, "total_cents": 990});
        outbox
            .publish(&mut tx, Message::json("emails", &receipt)?)
            .await?;
        outbox
            .publish(&mut tx, Message::new("sms", "not json"))
            .await?;
        outbox.commit(tx).await?;

        let got: Receipt = assert_published_as(&outbox, Expect::queue("emails")).await;
        assert_eq!(
            got,
            Receipt {
                order: 42,
                total_cents: 990
            }
        );
        let refused = try_assert_published_as::<Receipt, _>(&outbox, &Expect::queue("sms")).await;
        match refused {
            Err(AssertError::Decode { message, .. }) => assert!(message.contains("not json")),
            other => panic!("expected a decode failure, got {other:?}"),
        }
        Ok(())
    }

    #[postbox::test]
    async fn waiting_assertions_see_what_spawned_work_publishes(
        outbox: impl TestBackend,
    ) -> postbox::Result<()> {
        let publisher = outbox.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut tx = publisher.begin().await?;
            publisher
                .publish(&mut tx, Message::new("emails", "later"))
                .await?;
            publisher.commit(tx).await
        });
        let message = wait_published(&outbox, Expect::queue("emails")).await;
        assert_eq!(message.payload, b"later");
        task.await.expect("publisher task")?;

        let timeout =
            try_wait_published_within(&outbox, &Expect::queue("sms"), Duration::from_millis(30))
                .await;
        match timeout {
            Err(AssertError::Timeout { waited, last }) => {
                assert_eq!(waited, Duration::from_millis(30));
                assert!(
                    last.to_string().contains("later"),
                    "lists what is stored: {last}"
                );
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        Ok(())
    }
}
