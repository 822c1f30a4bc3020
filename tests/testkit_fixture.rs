//! `testkit::postgres()`: isolation and cleanup of fixture databases.

mod support;

use anyhow::Result;
use postbox::sqlx::{self, PgPool};
use postbox::{Backend, FetchParams, Message};

async fn database_exists(pool: &PgPool, name: &str) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(pool)
            .await?,
    )
}

#[tokio::test]
async fn two_fixtures_created_in_parallel_are_isolated() -> Result<()> {
    let (a, b) = tokio::try_join!(postbox::testkit::postgres(), postbox::testkit::postgres())?;
    assert_ne!(a.database(), b.database());
    assert!(a.database().starts_with("postbox_test_") && a.database().len() <= 63);

    let mut tx = a.backend().begin().await?;
    a.backend()
        .publish(&mut tx, Message::new("q", "only in a"))
        .await?;
    a.backend().commit(tx).await?;

    assert_eq!(
        a.backend().fetch(&FetchParams::new(["q"], 10)).await?.len(),
        1
    );
    assert!(
        b.backend()
            .fetch(&FetchParams::new(["q"], 10))
            .await?
            .is_empty()
    );
    // Both start from the migrated template.
    a.backend().validate_schema().await?;
    b.backend().validate_schema().await?;
    a.close().await?;
    b.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_dropped_or_closed_fixture_takes_its_database_with_it() -> Result<()> {
    let observer = postbox::testkit::postgres().await?;
    let dropped = postbox::testkit::postgres().await?;
    let closed = postbox::testkit::postgres().await?;
    let (dropped_name, closed_name) = (dropped.database().to_owned(), closed.database().to_owned());
    assert!(database_exists(observer.pool(), &dropped_name).await?);

    // A connection still checked out must not keep the database alive.
    let held = dropped.pool().acquire().await?;
    drop(dropped);
    drop(held);
    assert!(
        !database_exists(observer.pool(), &dropped_name).await?,
        "dropped"
    );

    let listener = sqlx::postgres::PgListener::connect_with(closed.pool()).await?;
    closed.close().await?;
    drop(listener);
    assert!(
        !database_exists(observer.pool(), &closed_name).await?,
        "closed"
    );
    observer.close().await?;
    Ok(())
}

#[tokio::test]
async fn the_fixture_url_reaches_the_same_database() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let pool = PgPool::connect(db.url()).await?;
    let name: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&pool)
        .await?;
    assert_eq!(name, db.database());
    assert!(!format!("{db:?}").contains("password"));
    pool.close().await;
    db.close().await?;
    Ok(())
}

/// Under the Docker provider (CI runs the suite once with `POSTBOX_TEST_PG=docker`), the
/// container publishes Postgres on 127.0.0.1 only. Other providers have no container to check.
#[tokio::test]
async fn a_docker_fixture_listens_on_loopback_only() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    if db.provider() != postbox::testkit::Provider::Docker {
        db.close().await?;
        return Ok(());
    }
    assert!(db.url().contains("@127.0.0.1:"), "{}", db.url());
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "--filter",
            &format!("label=postbox.testkit.pid={}", std::process::id()),
            "--format",
            "{{.Ports}}",
        ])
        .output()?;
    let ports = String::from_utf8(out.stdout)?;
    assert!(ports.contains("127.0.0.1:"), "published ports: {ports:?}");
    assert!(
        !ports.contains("0.0.0.0") && !ports.contains(":::"),
        "published ports: {ports:?}"
    );
    db.close().await?;
    Ok(())
}
