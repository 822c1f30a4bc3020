//! Migrations, schema validation and table names against real Postgres.

mod support;

use anyhow::Result;
use postbox::{Backend, Error, FetchParams, Message, PgBackend, SCHEMA_VERSION, TableName};
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
        b.engine().map(|e| e.channel()).as_deref(),
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

/// A pool on the fixture's database as `role` (created here with `grants`), password `pw`.
async fn pool_as(
    db: &postbox::testkit::PgFixture,
    role: &str,
    grants: &str,
) -> Result<postbox::sqlx::PgPool> {
    use postbox::sqlx::{self, AssertSqlSafe};
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'pw'; {grants}"
    )))
    .execute(db.pool())
    .await?;
    let options: sqlx::postgres::PgConnectOptions = db.url().parse()?;
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.username(role).password("pw"))
        .await?)
}

/// `migrate()` at start-up under a role that may not create anything: when the schema is
/// current it only reads the recorded versions (it used to run its `CREATE ... IF NOT EXISTS`
/// statements and fail with `permission denied for schema public`).
#[tokio::test]
async fn migrate_under_a_role_that_may_not_create_is_a_no_op_when_current() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let role = format!("svc_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let pool = pool_as(
        &db,
        &role,
        &format!("REVOKE CREATE ON SCHEMA public FROM PUBLIC; GRANT SELECT ON postbox_migrations TO {role};"),
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
    postbox::sqlx::raw_sql(postbox::sqlx::AssertSqlSafe(postbox::ddl(&table)))
        .execute(db.pool())
        .await?;
    let backend = PgBackend::with_table(db.pool().clone(), table);
    backend.validate_schema().await?;
    assert_eq!(backend.migrate().await?, Vec::<i32>::new());
    db.close().await?;
    Ok(())
}
