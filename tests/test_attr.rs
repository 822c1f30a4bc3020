//! `#[postbox::test]`: one body, two backends, options, and what happens to a failed test's
//! database.

use std::time::Duration;

use parking_lot::Mutex;
use postbox::testkit::{Expect, TestBackend, TestContext, assert_published};
use postbox::{Backend, FetchParams, Message};

async fn place_order<B: Backend>(outbox: &B, id: i64) -> postbox::Result<()> {
    let mut tx = outbox.begin().await?;
    outbox
        .publish(
            &mut tx,
            Message::json("emails", &serde_json::json!({ "order": id }))?,
        )
        .await?;
    outbox.commit(tx).await
}

#[postbox::test]
async fn one_body_runs_on_each_backend(outbox: impl TestBackend) -> postbox::Result<()> {
    place_order(&outbox, 42).await?;
    assert_published(
        &outbox,
        Expect::queue("emails").json(&serde_json::json!({ "order": 42 })),
    )
    .await;
    let deliveries = outbox.fetch(&FetchParams::new(["emails"], 10)).await?;
    assert_eq!(deliveries.len(), 1);
    assert!(outbox.ack(deliveries[0].lease()).await?);
    Ok(())
}

#[postbox::test]
async fn the_backend_can_be_borrowed<B: TestBackend>(outbox: &B) {
    place_order(outbox, 1).await.expect("publish");
    assert_published(outbox, Expect::queue("emails")).await;
}

#[postbox::test]
async fn the_context_says_where_it_runs(ctx: TestContext<impl TestBackend>) {
    match ctx.backend_name() {
        "fake" => {
            assert!(ctx.pool().is_none());
            assert!(ctx.database().is_none());
        }
        "postgres" => {
            let pool = ctx.pool().expect("a Postgres run has a pool");
            let current: String = sqlx::query_scalar("SELECT current_database()")
                .fetch_one(pool)
                .await
                .expect("query");
            assert_eq!(Some(current.as_str()), ctx.database());
        }
        other => panic!("unexpected backend {other}"),
    }
}

#[postbox::test]
async fn each_run_starts_empty(ctx: &TestContext<impl TestBackend>) {
    // Both generated tests publish here; neither sees the other's message.
    let outbox = ctx.backend();
    assert!(outbox.messages(None).await.expect("messages").is_empty());
    place_order(outbox, 7).await.expect("publish");
}

#[postbox::test(fake)]
async fn the_fake_runs_on_paused_time(outbox: impl TestBackend) {
    let before = outbox.now().await.expect("now");
    let started = std::time::Instant::now();
    // An hour passes at once: the runtime's clock is paused and jumps to the next timer.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(started.elapsed() < Duration::from_secs(600));
    let after = outbox.now().await.expect("now");
    assert!(after - before >= chrono::Duration::seconds(3600));
}

async fn seed_orders(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO orders (id, total_cents) VALUES (1, 990), (2, 1490)")
        .execute(pool)
        .await
        .map(drop)
}

#[postbox::test(postgres, sql = "tests/sql/orders.sql", setup = seed_orders, table = "orders_outbox")]
async fn postgres_runs_the_users_schema_and_table(ctx: TestContext<impl TestBackend>) {
    let pool = ctx.pool().expect("a Postgres run has a pool");
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(pool)
        .await
        .expect("the sql file created orders and the set-up filled it");
    assert_eq!(orders, 2);
    // The backend writes to the table the attribute named.
    place_order(ctx.backend(), 3).await.expect("publish");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders_outbox")
        .fetch_one(pool)
        .await
        .expect("orders_outbox exists");
    assert_eq!(rows, 1);
}

#[postbox::test]
#[should_panic(expected = "on purpose")]
async fn should_panic_applies_to_both(_outbox: impl TestBackend) {
    panic!("on purpose");
}

/// The databases the deliberately failing tests below ran on.
static RAN_ON: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn note_database(ctx: &TestContext<impl TestBackend>) {
    let name = ctx.database().expect("a Postgres run").to_owned();
    RAN_ON.lock().push(name);
}

#[postbox::test(postgres)]
#[ignore = "fails on purpose: called by a_failed_tests_database_is_kept"]
async fn returns_an_error(ctx: TestContext<impl TestBackend>) -> Result<(), String> {
    note_database(&ctx);
    Err("on purpose".into())
}

#[postbox::test(postgres)]
#[ignore = "fails on purpose: called by a_failed_tests_database_is_kept"]
async fn panics(ctx: TestContext<impl TestBackend>) {
    note_database(&ctx);
    panic!("on purpose");
}

#[postbox::test(postgres)]
#[ignore = "called by a_failed_tests_database_is_kept"]
async fn passes(ctx: TestContext<impl TestBackend>) {
    note_database(&ctx);
}

#[postbox::test(postgres)]
#[should_panic(expected = "on purpose")]
#[ignore = "called by a_failed_tests_database_is_kept"]
async fn panics_as_expected(ctx: TestContext<impl TestBackend>) {
    note_database(&ctx);
    panic!("on purpose");
}

/// Whether each database exists, read on a fresh fixture of the same server.
fn exists(databases: &[String]) -> Vec<bool> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let probe = postbox::testkit::postgres().await.expect("a server");
        let mut found = Vec::new();
        for name in databases {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
                .bind(name)
                .fetch_one(probe.pool())
                .await
                .expect("pg_database");
            found.push(n == 1);
        }
        for (name, kept) in databases.iter().zip(&found) {
            if *kept {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE \"{name}\" WITH (FORCE)"
                )))
                .execute(probe.pool())
                .await
                .expect("dropping a kept database");
            }
        }
        probe.close().await.expect("close");
        found
    })
}

#[test]
fn a_failed_tests_database_is_kept() {
    assert!(returns_an_error::postgres().is_err());
    assert!(std::panic::catch_unwind(panics::postgres).is_err());
    passes::postgres();
    // Under `#[should_panic]` the panic is the pass.
    assert!(std::panic::catch_unwind(panics_as_expected::postgres).is_err());
    let databases = std::mem::take(&mut *RAN_ON.lock());
    assert_eq!(databases.len(), 4, "each run recorded its database");
    assert_eq!(
        exists(&databases),
        [true, true, false, false],
        "kept after an Err and a panic, dropped after a pass and an expected panic: {databases:?}"
    );
}
