//! Publish in a transaction, fetch, ack: the transactional outbox in one screen.
//!
//! Run with: `cargo run --example quickstart`
//!
//! Needs no database set-up: it uses the testkit's default server (`POSTBOX_TEST_DATABASE_URL`
//! or `DATABASE_URL` if set, else Docker if an engine answers, else a throwaway cluster from the
//! local Postgres binaries) and a fresh database that is dropped at the end.

use postbox::prelude::*;
use postbox::sqlx;
use postbox::{FetchParams, Message};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("postbox=info")),
        )
        .init();

    let db = postbox::testkit::postgres().await?;
    println!("database {} (provider: {})", db.database(), db.provider());
    let pool = db.pool().clone();
    let outbox = db.backend();
    println!(
        "migrate: applied {:?} (the fixture's template is already migrated)",
        outbox.migrate().await?
    );

    sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY, total_cents bigint NOT NULL)")
        .execute(&pool)
        .await?;

    // 1. The business write and the message commit together...
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO orders VALUES (42, 1999)")
        .execute(&mut *tx)
        .await?;
    let id = outbox
        .publish(
            &mut tx,
            Message::json(
                "emails",
                &serde_json::json!({"order": 42, "kind": "receipt"}),
            )?
            .header("tenant", "acme"),
        )
        .await?;
    tx.commit().await?;
    println!("published message {id} with order 42 in one transaction");

    // 2. ...or not at all.
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO orders VALUES (43, 500)")
        .execute(&mut *tx)
        .await?;
    outbox
        .publish(&mut tx, Message::new("emails", "never sent"))
        .await?;
    tx.rollback().await?;
    println!("rolled back order 43: its message is gone too");

    // 3. Consume: lease, handle idempotently, ack.
    let deliveries = outbox.fetch(&FetchParams::new(["emails"], 10)).await?;
    println!("fetched {} message(s)", deliveries.len());
    for d in &deliveries {
        let body: serde_json::Value = d.json()?;
        println!(
            "  message {} on {:?}: {body} headers={:?} delivery #{}",
            d.id, d.queue, d.headers, d.deliveries
        );
        let acked = outbox.ack(d.lease()).await?;
        println!("  acked: {acked}");
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox")
        .fetch_one(&pool)
        .await?;
    println!("messages left in the outbox: {left}");

    db.close().await?;
    Ok(())
}
