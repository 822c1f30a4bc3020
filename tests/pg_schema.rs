//! Migrations, schema validation and table names against real Postgres.

mod support;

use anyhow::Result;
use postbox::pg::SCHEMA_VERSION;
use postbox::prelude::*;
use postbox::{Error, FetchParams, Message, PgBackend, TableName};
use support::{count, exec};

#[tokio::test]
async fn migrate_is_versioned_idempotent_and_safe_to_run_concurrently() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let table = TableName::new("orders_outbox")?;
    let backends: Vec<PgBackend> = (0..4)
        .map(|_| PgBackend::with_table(db.pool().clone(), table.clone()))
        .collect();
    let results =
        futures_util::future::try_join_all(backends.iter().map(PgBackend::migrate)).await?;
    let mut applied: Vec<i32> = results.into_iter().flatten().collect();
    applied.sort();
    assert_eq!(
        applied,
        (1..=SCHEMA_VERSION).collect::<Vec<_>>(),
        "each version applied once"
    );
    assert_eq!(
        backends[0].migrate().await?,
        Vec::<i32>::new(),
        "a second run applies nothing"
    );
    backends[0].validate_schema().await?;
    assert_eq!(
        count(db.pool(), "orders_outbox_migrations", "true").await,
        i64::from(SCHEMA_VERSION)
    );
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn validate_schema_names_what_is_missing() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    backend.validate_schema().await?;

    exec(
        db.pool(),
        "DROP INDEX postbox_pending_idx; ALTER TABLE postbox DROP COLUMN last_error; \
         ALTER TABLE postbox DROP CONSTRAINT postbox_lease_check; DROP TABLE postbox_dead; \
         DROP FUNCTION postbox_retry",
    )
    .await;
    let err = backend.validate_schema().await.expect_err("broken schema");
    assert!(matches!(err, Error::Schema { .. }));
    insta::assert_snapshot!(err.to_string());

    let fresh = PgBackend::with_table(db.pool().clone(), TableName::new("never_migrated")?);
    insta::assert_snapshot!(
        "never_migrated",
        fresh
            .validate_schema()
            .await
            .expect_err("missing")
            .to_string()
    );
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn two_outbox_tables_in_one_database_are_independent() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let a = db.backend();
    let b = db.backend_for("billing_outbox").await?;

    let mut tx = db.pool().begin().await?;
    a.publish(&mut tx, Message::new("q", "for a")).await?;
    b.publish(&mut tx, Message::new("q", "for b")).await?;
    tx.commit().await?;

    let from_b = b.fetch(&FetchParams::new(["q"], 10)).await?;
    assert_eq!(from_b.len(), 1);
    assert_eq!(from_b[0].payload, b"for b");
    assert!(b.dead_letter(from_b[0].lease(), "test").await?);
    assert_eq!(count(db.pool(), "billing_outbox_dead", "true").await, 1);
    assert_eq!(count(db.pool(), "postbox_dead", "true").await, 0);
    assert_eq!(a.fetch(&FetchParams::new(["q"], 10)).await?.len(), 1);
    assert_eq!(
        Some(b.pg_engine().channel()).as_deref(),
        Some("postbox_billing_outbox")
    );
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn hostile_and_overlong_table_names_never_reach_the_database() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    for name in [
        "x\"; DROP TABLE postbox; --",
        "x; DROP TABLE postbox",
        "Outbox",
        "",
        "1table",
        "tab le",
    ] {
        let err = db.backend_for(name).await.expect_err(name);
        assert!(
            err.to_string().contains("invalid table name"),
            "{name}: {err}"
        );
    }
    let too_long = "t".repeat(52);
    let err = db.backend_for(&too_long).await.expect_err("too long");
    assert!(err.to_string().contains("Postgres allows 63"), "{err}");
    db.backend_for(&"t".repeat(51))
        .await?
        .validate_schema()
        .await?;
    // The default table survived every attempt.
    db.backend().validate_schema().await?;
    db.close().await?;
    Ok(())
}

/// `migrate()` at start-up under a role that may not create anything: when the schema is
/// current it only reads the recorded versions (it used to run its `CREATE ... IF NOT EXISTS`
/// statements and fail with `permission denied for schema public`).
#[tokio::test]
async fn migrate_under_a_role_that_may_not_create_is_a_no_op_when_current() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let (role, pool) = support::login_role(
        &db,
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC; GRANT SELECT ON postbox_migrations TO {role};",
        2,
    )
    .await?;
    let backend = PgBackend::new(pool.clone());
    assert_eq!(backend.migrate().await?, Vec::<i32>::new());
    // What it may not do is still refused: a missing table would need creating.
    let other = PgBackend::with_table(pool.clone(), TableName::new("not_yet")?);
    let err = other.migrate().await.expect_err("may not create");
    assert!(err.to_string().contains("permission denied"), "{err}");
    pool.close().await;
    exec(
        db.pool(),
        &format!("DROP OWNED BY {role}; DROP ROLE {role}"),
    )
    .await;
    db.close().await?;
    Ok(())
}

/// `migrate()` refuses a table of the outbox's name that it did not create, naming it and
/// what to do, and changes nothing.
#[tokio::test]
async fn migrate_refuses_a_table_postbox_did_not_create() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    exec(
        db.pool(),
        "CREATE TABLE orders_box (id bigserial PRIMARY KEY, queue text, payload bytea)",
    )
    .await;
    let backend = PgBackend::with_table(db.pool().clone(), TableName::new("orders_box")?);
    let err = backend.migrate().await.expect_err("a foreign table");
    assert!(matches!(err, Error::ForeignObjects { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("orders_box") && text.contains("choose another TableName"),
        "{text}"
    );
    let migrations: bool =
        postbox::sqlx::query_scalar("SELECT to_regclass('orders_box_migrations') IS NOT NULL")
            .fetch_one(db.pool())
            .await?;
    assert!(!migrations, "nothing was created");
    db.close().await?;
    Ok(())
}

/// The DDL from `ddl()`, run by another migration tool, records its versions: `migrate()`
/// then has nothing to do and the schema validates.
#[tokio::test]
async fn the_ddl_run_by_hand_is_a_migrated_schema() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let table = TableName::new("by_hand")?;
    postbox::sqlx::raw_sql(postbox::sqlx::AssertSqlSafe(postbox::pg::ddl(&table)))
        .execute(db.pool())
        .await?;
    let backend = PgBackend::with_table(db.pool().clone(), table);
    backend.validate_schema().await?;
    assert_eq!(backend.migrate().await?, Vec::<i32>::new());
    db.close().await?;
    Ok(())
}

/// The DDL of each version, run in order by another migration tool as one file each, gives
/// the same schema: it validates, and `migrate()` has nothing to do. A version that does not
/// exist has none.
#[tokio::test]
async fn the_ddl_of_each_version_run_in_order_is_a_migrated_schema() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let table = TableName::new("by_version")?;
    for version in 1..=postbox::pg::SCHEMA_VERSION {
        let sql = postbox::pg::ddl_of_version(&table, version)
            .unwrap_or_else(|| panic!("no DDL for version {version}"));
        assert!(sql.starts_with("CREATE") == (version == 1), "{sql}");
        postbox::sqlx::raw_sql(postbox::sqlx::AssertSqlSafe(sql))
            .execute(db.pool())
            .await?;
    }
    let backend = PgBackend::with_table(db.pool().clone(), table.clone());
    backend.validate_schema().await?;
    assert_eq!(backend.migrate().await?, Vec::<i32>::new());
    assert!(postbox::pg::ddl_of_version(&table, 0).is_none());
    assert!(postbox::pg::ddl_of_version(&table, postbox::pg::SCHEMA_VERSION + 1).is_none());
    db.close().await?;
    Ok(())
}

/// Outboxes of one name in two Postgres schemas (neither on the search path): `migrate()`
/// creates the schemas, and publish, fetch, the outcomes, coop, the journal, rotation,
/// inspection and the grants all work on each, apart.
#[tokio::test]
async fn outboxes_in_their_own_schemas_work_on_every_path_and_stay_apart() -> Result<()> {
    use postbox::coop::{CoopReceive, Unregister};
    use postbox::journal::{
        BatchedJournalWriter, JournalEvent, TailOptions, WriterOptions, snapshot_and_tail,
    };
    use postbox::pg::{Access, Rotation};
    use postbox::{Member, RetryParams};

    let db = postbox::testkit::postgres().await?;
    let billing = PgBackend::with_table(
        db.pool().clone(),
        TableName::in_schema("billing", "outbox")?,
    )
    .rotation(
        Rotation::new()
            .automatic(false)
            .rotate_bytes(0)
            .max_age(std::time::Duration::ZERO),
    );
    let sales = PgBackend::with_table(db.pool().clone(), TableName::in_schema("sales", "outbox")?);
    assert_eq!(
        billing.migrate().await?,
        (1..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
    assert_eq!(
        sales.migrate().await?,
        (1..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
    assert_eq!(billing.migrate().await?, Vec::<i32>::new());
    billing.validate_schema().await?;
    sales.validate_schema().await?;
    let recorded: i64 =
        postbox::sqlx::query_scalar("SELECT count(*) FROM billing.outbox_migrations")
            .fetch_one(db.pool())
            .await?;
    assert_eq!(recorded, i64::from(SCHEMA_VERSION));
    let in_public: Option<String> =
        postbox::sqlx::query_scalar("SELECT to_regclass('public.outbox')::text")
            .fetch_one(db.pool())
            .await?;
    assert_eq!(in_public, None, "nothing in the search path's schema");
    assert_ne!(billing.pg_engine().channel(), sales.pg_engine().channel());

    let mut tx = db.pool().begin().await?;
    billing
        .publish_batch(
            &mut tx,
            (0..6).map(|i| Message::new("q", i.to_string())).collect(),
        )
        .await?;
    sales.publish(&mut tx, Message::new("q", "sales")).await?;
    tx.commit().await?;
    let got = billing.fetch(&FetchParams::new(["q"], 6)).await?;
    assert_eq!(got.len(), 6);
    assert!(billing.ack(got[0].lease()).await?);
    assert!(
        billing
            .retry(
                got[1].lease(),
                RetryParams::new(std::time::Duration::from_secs(60))
            )
            .await?
    );
    assert!(billing.dead_letter(got[2].lease(), "bad").await?);
    assert!(billing.renew_lease(got[3].lease()).await?);
    assert!(billing.release(got[3].lease()).await?);
    assert_eq!(
        billing
            .ack_batch(&[got[4].lease(), got[5].lease()])
            .await?
            .len(),
        2
    );
    assert_eq!(billing.dead_letters(Some("q")).await?.len(), 1);
    assert_eq!(
        billing.messages(Some("q")).await?.len(),
        2,
        "the retried and the released"
    );
    assert_eq!(sales.messages(Some("q")).await?.len(), 1, "apart");

    let me = Member::new("g", "m")?;
    sales.coop_register(&me, &["q".to_owned()]).await?;
    let held = sales
        .coop_receive(&CoopReceive::new(me.clone(), ["q"], 5))
        .await?;
    assert_eq!(held.len(), 1);
    assert!(sales.ack(held[0].lease()).await?);
    assert!(sales.coop_unregister(&me, Unregister::Fail).await?);

    let w = BatchedJournalWriter::new(billing.clone(), "s", WriterOptions::default());
    let mut tail = snapshot_and_tail(billing.clone(), "s", 0, TailOptions::default()).await?;
    w.record(1, "done", serde_json::Map::new()).await?;
    w.close().await?;
    let first = postbox::testkit::within("the billing tail", tail.next())
        .await
        .expect("an event")?;
    assert_eq!(first.seq, 1);
    assert!(
        sales.journal_read_after("s", 0, 10).await?.is_empty(),
        "apart"
    );
    sales
        .journal_append(&[JournalEvent::new("s", 1, "done", serde_json::Map::new())])
        .await?;

    let mut truncated = 0;
    for _ in 0..6 {
        truncated += billing.rotate().await?.truncated.len();
    }
    assert!(truncated > 0, "billing's generations rotate");
    assert_eq!(
        billing.messages(Some("q")).await?.len(),
        2,
        "moved, not lost"
    );

    // LISTEN on the schema's channel: with polling every 30 s, only a notification explains
    // a pick-up within the deadline.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |d: postbox::Delivery| {
        let _ = seen_tx.send(d.id);
        std::future::ready(Ok::<(), postbox::HandlerError>(()))
    };
    let slow = postbox::SubscriberOptions::new(["wake"])
        .min_fetch_interval(std::time::Duration::from_secs(30))
        .max_fetch_interval(std::time::Duration::from_secs(30));
    let sub = postbox::Subscriber::new(billing.clone(), slow, handler)?.spawn();
    let mut events = sub.events();
    support::until(&mut events, "LISTEN", |e| {
        *e == postbox::runtime::SubscriberEvent::ListenerConnected
    })
    .await;
    support::until(&mut events, "idle", |e| {
        *e == postbox::runtime::SubscriberEvent::Idle
    })
    .await;
    let mut tx = db.pool().begin().await?;
    let id = billing.publish(&mut tx, Message::new("wake", "up")).await?;
    tx.commit().await?;
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), seen.recv()).await?;
    assert_eq!(
        got,
        Some(id),
        "woken by the schema's channel, not by the 30 s poll"
    );
    postbox::testkit::within("shutdown", sub.shutdown()).await?;

    let grants = billing.grants(Access::Publisher, "someone").await?;
    assert!(grants.contains(r#""billing"."outbox""#), "{grants}");
    db.close().await?;
    Ok(())
}
