//! The `postbox` binary against a fresh testkit database per test.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use assert_cmd::Command;
use postbox_core::journal::JournalEvent;
use postbox_core::pg::SCHEMA_VERSION;
use postbox_core::prelude::*;
use postbox_core::{FetchParams, Message, MessageId, PgBackend};
use postbox_testkit::{PgFixture, postgres, within};
use predicates::prelude::*;
use serde_json::Value;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

const BIN: &str = env!("CARGO_BIN_EXE_postbox");

/// The binary, pointed at the fixture's database.
fn postbox(db: &PgFixture) -> Command {
    let mut command = Command::new(BIN);
    command
        .env("DATABASE_URL", db.url())
        .timeout(Duration::from_secs(60));
    command
}

fn stdout_of(command: &mut Command) -> String {
    let output = command.assert().success().get_output().stdout.clone();
    String::from_utf8(output).expect("UTF-8 output")
}

async fn publish(backend: &PgBackend, messages: Vec<Message>) -> Vec<MessageId> {
    let mut tx = backend.begin().await.expect("begin");
    let ids = backend
        .publish_batch(&mut tx, messages)
        .await
        .expect("publish");
    backend.commit(tx).await.expect("commit");
    ids
}

/// Dead-letters every ready message of `queue` with `reason`.
async fn dead_letter_all(backend: &PgBackend, queue: &str, reason: &str) {
    for delivery in backend
        .fetch(&FetchParams::new([queue], 100))
        .await
        .expect("fetch")
    {
        assert!(
            backend
                .dead_letter(delivery.lease(), reason)
                .await
                .expect("dead-letter")
        );
    }
}

#[tokio::test]
async fn status_counts_each_state_per_queue_as_text_and_json() -> Result {
    let db = postgres().await?;
    let backend = db.backend();
    publish(
        &backend,
        vec![
            Message::new("emails", "a"),
            Message::new("emails", "b"),
            Message::new("emails", "later").delay(Duration::from_secs(3600)),
            Message::new("sms", "x"),
        ],
    )
    .await;
    let leased = backend.fetch(&FetchParams::new(["emails"], 1)).await?;
    assert_eq!(leased.len(), 1);
    dead_letter_all(&backend, "sms", "no such number").await;

    let text = stdout_of(postbox(&db).arg("status"));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "QUEUE",
            "READY",
            "SCHEDULED",
            "LEASED",
            "DEAD",
            "OLDEST",
            "READY"
        ],
        "{text}"
    );
    let emails: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(emails[..5], ["emails", "1", "1", "1", "0"], "{text}");
    let sms: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(sms[..6], ["sms", "0", "0", "0", "1", "-"], "{text}");

    let json: Value = serde_json::from_str(&stdout_of(
        postbox(&db).args(["status", "--json", "--queue", "emails"]),
    ))?;
    let queues = json["queues"].as_array().ok_or("queues")?;
    assert_eq!(queues.len(), 1, "{json}");
    assert_eq!(
        (
            &queues[0]["queue"],
            &queues[0]["ready"],
            &queues[0]["scheduled"],
            &queues[0]["leased"],
            &queues[0]["dead"]
        ),
        (
            &Value::from("emails"),
            &Value::from(1),
            &Value::from(1),
            &Value::from(1),
            &Value::from(0)
        )
    );
    assert!(queues[0]["oldest_ready_seconds"].as_f64().is_some());
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn status_watch_prints_a_json_line_per_interval() -> Result {
    let db = postgres().await?;
    publish(&db.backend(), vec![Message::new("emails", "a")]).await;
    let mut child = std::process::Command::new(BIN)
        .env("DATABASE_URL", db.url())
        .args(["status", "--json", "--watch", "100ms"])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("stdout")?;
    let lines = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .take(3)
            .collect::<std::io::Result<Vec<String>>>()
    });
    let lines = within("three status lines", lines).await??;
    child.kill()?;
    child.wait()?;
    for line in &lines {
        let json: Value = serde_json::from_str(line)?;
        assert_eq!(json["queues"][0]["ready"], 1, "{line}");
    }
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn dead_letters_are_listed_shown_and_requeued_by_filter() -> Result {
    let db = postgres().await?;
    let backend = db.backend();
    let timeouts = publish(
        &backend,
        vec![
            Message::new("payments", r#"{"order":1}"#),
            Message::new("payments", r#"{"order":2}"#),
        ],
    )
    .await;
    dead_letter_all(&backend, "payments", "gateway timeout").await;
    let declined = publish(&backend, vec![Message::new("payments", "declined")]).await;
    dead_letter_all(&backend, "payments", "card declined").await;

    let list = stdout_of(postbox(&db).args(["dead", "list"]));
    let listed: Vec<String> = list
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    let all: Vec<String> = timeouts
        .iter()
        .chain(&declined)
        .map(i64::to_string)
        .collect();
    assert_eq!(listed, all, "{list}");
    let json: Value = serde_json::from_str(&stdout_of(
        postbox(&db).args(["dead", "list", "--reason", "timeout", "--json"]),
    ))?;
    let ids: Vec<i64> = json
        .as_array()
        .ok_or("list")?
        .iter()
        .filter_map(|d| d["id"].as_i64())
        .collect();
    assert_eq!(ids, timeouts);
    assert_eq!(json[0]["payload"]["order"], 1, "JSON payloads stay JSON");

    postbox(&db)
        .args(["dead", "show", &timeouts[1].to_string()])
        .assert()
        .success()
        .stdout(predicate::str::contains("reason:         gateway timeout"))
        .stdout(predicate::str::contains("\"order\": 2"));
    postbox(&db)
        .args(["dead", "show", "999999"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("no dead letter with id 999999"));

    postbox(&db)
        .args(["dead", "requeue", "--reason", "timeout", "--dry-run"])
        .assert()
        .success()
        .stdout(predicate::str::starts_with(
            "would requeue 2 dead letter(s)",
        ));
    assert_eq!(
        backend.dead_letters(None).await?.len(),
        3,
        "a dry run changes nothing"
    );

    postbox(&db)
        .args(["dead", "requeue", "--reason", "timeout"])
        .assert()
        .success()
        .stdout(format!("requeued 2: {}, {}\n", timeouts[0], timeouts[1]));
    let left: Vec<i64> = backend
        .dead_letters(None)
        .await?
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(left, declined);
    let ready: Vec<i64> = backend
        .fetch(&FetchParams::new(["payments"], 10))
        .await?
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ready, timeouts, "requeued and ready at once");
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn purge_needs_a_selection_and_a_confirmation() -> Result {
    let db = postgres().await?;
    let backend = db.backend();
    let ids = publish(
        &backend,
        vec![Message::new("jobs", "a"), Message::new("jobs", "b")],
    )
    .await;
    dead_letter_all(&backend, "jobs", "broken").await;

    postbox(&db)
        .args(["dead", "purge"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("purge which dead letters?"));
    postbox(&db)
        .args(["dead", "purge", "--all"])
        .write_stdin("n\n")
        .assert()
        .failure()
        .stderr(predicate::str::contains("purge 2 dead letter(s)"))
        .stderr(predicate::str::contains("not confirmed, nothing purged"));
    postbox(&db)
        .args(["dead", "purge", "--all"])
        .write_stdin("")
        .assert()
        .failure();
    assert_eq!(
        backend.dead_letters(None).await?.len(),
        2,
        "nothing purged yet"
    );

    postbox(&db)
        .args(["dead", "purge", "--id", &ids[0].to_string()])
        .write_stdin("y\n")
        .assert()
        .success()
        .stdout(format!("purged 1: {}\n", ids[0]));
    postbox(&db)
        .args(["dead", "purge", "--queue", "jobs", "--yes"])
        .assert()
        .success()
        .stdout(format!("purged 1: {}\n", ids[1]));
    assert!(backend.dead_letters(None).await?.is_empty());
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn journal_tail_prints_the_recorded_events_then_the_live_ones() -> Result {
    let db = postgres().await?;
    let backend = db.backend();
    let event = |seq: i64, kind: &str| {
        let mut payload = serde_json::Map::new();
        payload.insert("n".into(), seq.into());
        JournalEvent::new("chat-7", seq, kind, payload)
    };
    backend
        .journal_append(&[event(1, "delta"), event(2, "delta")])
        .await?;

    let mut child = std::process::Command::new(BIN)
        .env("DATABASE_URL", db.url())
        .args(["journal", "tail", "chat-7"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("stdout")?).lines();
    let (first_two, mut lines) = within(
        "the recorded events",
        tokio::task::spawn_blocking(move || {
            let two: Vec<String> = (&mut lines).take(2).collect::<std::io::Result<_>>()?;
            Ok::<_, std::io::Error>((two, lines))
        }),
    )
    .await??;
    // The tail is live now: events recorded and published from here on reach it too.
    for next in [event(3, "delta"), event(4, "done")] {
        backend.journal_append(std::slice::from_ref(&next)).await?;
        backend.journal_publish(&next).await?;
    }
    let rest = within(
        "the live events and the end",
        tokio::task::spawn_blocking(move || (&mut lines).collect::<std::io::Result<Vec<_>>>()),
    )
    .await??;
    let status = within(
        "the exit",
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await??;
    assert!(status.success());
    let events: Vec<Value> = first_two
        .iter()
        .chain(&rest)
        .map(|l| serde_json::from_str(l))
        .collect::<std::result::Result<_, _>>()?;
    let seqs: Vec<i64> = events.iter().filter_map(|e| e["seq"].as_i64()).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert_eq!(events[3]["type"], "done");
    assert_eq!(events[0]["payload"]["n"], 1);
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn migrate_ddl_and_grants() -> Result {
    let db = postgres().await?;
    postbox(&db)
        .args(["--table", "fresh", "migrate"])
        .assert()
        .success()
        .stdout(format!("fresh: applied versions 1 to {SCHEMA_VERSION}\n"));
    postbox(&db)
        .args(["--table", "fresh", "migrate"])
        .assert()
        .success()
        .stdout(format!("fresh: up to date at version {SCHEMA_VERSION}\n"));

    // The DDL needs no database.
    Command::new(BIN)
        .env_remove("DATABASE_URL")
        .args(["--table", "billing.outbox", "ddl", "1"])
        .assert()
        .success()
        .stdout(predicate::str::contains("-- version 1:"))
        .stdout(predicate::str::contains("\"billing\".\"outbox\""));
    let all = stdout_of(Command::new(BIN).env_remove("DATABASE_URL").arg("ddl"));
    assert_eq!(
        all.matches("\n-- version ").count(),
        SCHEMA_VERSION as usize
    );
    Command::new(BIN)
        .args(["ddl", "999"])
        .assert()
        .failure()
        .stderr(format!(
            "postbox: no schema version 999: this build knows 1 to {SCHEMA_VERSION}\n"
        ));

    postbox(&db)
        .args([
            "--table",
            "fresh",
            "grants",
            "reporting",
            "--as",
            "inspector",
        ])
        .assert()
        .success()
        .stdout(predicate::str::starts_with("GRANT"))
        .stdout(predicate::str::contains("TO \"reporting\";"));
    postbox(&db)
        .args(["grants", "Bad Role", "--as", "inspector"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("postbox: "));
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn errors_go_to_stderr_with_a_failing_exit_code() -> Result {
    Command::new(BIN)
        .env_remove("DATABASE_URL")
        .arg("status")
        .assert()
        .code(1)
        .stdout("")
        .stderr("postbox: no database: set DATABASE_URL or pass --database-url\n");
    Command::new(BIN)
        .args(["--table", "no such table", "ddl"])
        .assert()
        .code(1)
        .stderr(predicate::str::starts_with(
            "postbox: --table \"no such table\": ",
        ));
    Command::new(BIN)
        .args([
            "--database-url",
            "postgres://nobody@127.0.0.1:1/none",
            "status",
        ])
        .timeout(Duration::from_secs(60))
        .assert()
        .code(1)
        .stderr(predicate::str::starts_with(
            "postbox: connecting to the database: ",
        ));

    let db = postgres().await?;
    postbox(&db)
        .args(["status", "--queue", ""])
        .assert()
        .code(1)
        .stderr(predicate::str::starts_with("postbox: "))
        .stderr(predicate::str::contains("it is empty"));
    postbox(&db)
        .args(["dead", "requeue", "--older-than", "soon"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--older-than"));
    db.close().await?;
    Ok(())
}
