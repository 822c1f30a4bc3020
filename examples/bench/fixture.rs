//! `fixture`: a fresh test database from the migrated template, against create + migrate,
//! and the `CREATE DATABASE` statement alone (the floor both pay).

use std::time::Instant;

use anyhow::Context;
use postbox::PgBackend;
use postbox::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use postbox::sqlx::{self, AssertSqlSafe, Connection, PgConnection};
use serde_json::{Value, json};

use crate::Ctx;
use crate::stats::{latency, round};

/// `ctx.rounds` databases of each kind, one after the other.
pub(crate) async fn fixture(ctx: &Ctx) -> anyhow::Result<Value> {
    // Warm-up: starts the server and builds the template, which is not what we measure.
    let first = postbox::testkit::postgres().await?;
    // The server's options with another database (the URL may name a unix socket directory
    // in its query, so no string surgery).
    let server: PgConnectOptions = first.url().parse().context("fixture url")?;
    let on = |database: &str| server.clone().database(database);

    let mut template = Vec::with_capacity(ctx.rounds);
    for i in 0..ctx.rounds {
        ctx.progress(format!("fixture: template {}/{}", i + 1, ctx.rounds));
        let start = Instant::now();
        let db = postbox::testkit::postgres().await?;
        template.push(start.elapsed());
        db.close().await?;
    }

    // The floor both approaches share: CREATE DATABASE alone (default template, no migrations).
    let mut create_only = Vec::with_capacity(ctx.rounds);
    for i in 0..ctx.rounds {
        ctx.progress(format!("fixture: create only {}/{}", i + 1, ctx.rounds));
        let name = format!("postbox_bench_empty_{}_{i}", std::process::id());
        let mut admin = PgConnection::connect_with(&on("postgres")).await?;
        let start = Instant::now();
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await?;
        create_only.push(start.elapsed());
        sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
    }

    let mut migrate = Vec::with_capacity(ctx.rounds);
    for i in 0..ctx.rounds {
        ctx.progress(format!(
            "fixture: create + migrate {}/{}",
            i + 1,
            ctx.rounds
        ));
        let name = format!("postbox_bench_{}_{i}", std::process::id());
        let start = Instant::now();
        let mut admin = PgConnection::connect_with(&on("postgres")).await?;
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await?;
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .connect_with(on(&name))
            .await?;
        PgBackend::new(pool.clone()).migrate().await?;
        migrate.push(start.elapsed());
        pool.close().await;
        sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
    }
    first.close().await?;

    let mut template = latency(&mut template);
    let mut migrate = latency(&mut migrate);
    let mut create_only = latency(&mut create_only);
    let ratio = migrate["p50"].as_f64().unwrap_or(0.0) / template["p50"].as_f64().unwrap_or(1.0);
    for summary in [&mut template, &mut migrate, &mut create_only] {
        if let Some(map) = summary.as_object_mut() {
            map.remove("samples_ms");
        }
    }
    Ok(json!({
        "workload": "fixture",
        "rounds": ctx.rounds,
        "fresh_fixture_from_template_ms": template,
        "create_empty_db_and_migrate_ms": migrate,
        "create_database_statement_only_ms": create_only,
        "p50_ratio_migrate_over_template": round(ratio, 2),
    }))
}
