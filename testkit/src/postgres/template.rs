//! The migrated template database fixtures are cloned from, and the sweep of leftovers.
//!
//! The template's name carries a hash of the schema DDL, so a schema change builds a new
//! template instead of cloning a stale one. It is built under another name and renamed when
//! complete, under an advisory lock, so concurrent test processes sharing one server neither
//! race nor clone a half-migrated template.

use std::str::FromStr;

use postbox_core::pg::ddl;
use postbox_core::{PgBackend, TableName};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// Prefix of fixture databases.
pub(crate) const DB_PREFIX: &str = "postbox_test_";

/// Registry of fixture databases on shared (`url`) servers, for sweeping leftovers.
const CREATE_REGISTRY: &str = "CREATE SCHEMA IF NOT EXISTS postbox_testkit; \
     CREATE TABLE IF NOT EXISTS postbox_testkit.databases (\
         name text PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now())";

/// Fixture databases older than this on a shared server are leftovers of crashed or panicked
/// runs; one still in use cannot be dropped and is skipped.
const SWEEP_AGE: &str = "10 minutes";

/// Builds the template if needed and returns its name and the server's version number
/// (`server_version_num`). Runs on its own thread and runtime: the caller may be inside a
/// test's runtime.
pub(crate) fn prepare(url: &str, shared: bool) -> Result<(String, i32), String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot build a runtime: {e}"))?;
            runtime.block_on(prepare_async(url, shared)).map_err(|e| {
                format!(
                    "cannot prepare the template database at {}: {e}",
                    redact(url)
                )
            })
        })
        .join()
        .map_err(|_| "the template thread panicked".to_owned())?
    })
}

async fn prepare_async(url: &str, shared: bool) -> Result<(String, i32), postbox_core::Error> {
    let name = template_name();
    let mut admin = PgConnection::connect(url).await?;
    let version: String = sqlx::query_scalar("SHOW server_version_num")
        .fetch_one(&mut admin)
        .await?;
    let version = version.trim().parse().unwrap_or(0);
    sqlx::query("SELECT pg_advisory_lock(hashtextextended('postbox:testkit:template', 0))")
        .execute(&mut admin)
        .await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let building = format!("{name}_building");
        execute(
            &mut admin,
            format!("DROP DATABASE IF EXISTS \"{building}\" WITH (FORCE)"),
        )
        .await?;
        execute(&mut admin, format!("CREATE DATABASE \"{building}\"")).await?;
        let options = PgConnectOptions::from_str(url)?.database(&building);
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        let migrated = PgBackend::new(pool.clone()).migrate().await;
        pool.close().await;
        migrated?;
        execute(
            &mut admin,
            format!("ALTER DATABASE \"{building}\" RENAME TO \"{name}\""),
        )
        .await?;
    }
    if shared {
        sqlx::raw_sql(CREATE_REGISTRY).execute(&mut admin).await?;
        sweep(&mut admin).await?;
    }
    sqlx::query("SELECT pg_advisory_unlock(hashtextextended('postbox:testkit:template', 0))")
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    Ok((name, version))
}

/// Drops registered fixture databases older than [`SWEEP_AGE`] that nobody uses.
async fn sweep(admin: &mut PgConnection) -> Result<(), sqlx::Error> {
    let stale: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT name FROM postbox_testkit.databases WHERE created_at < now() - interval '{SWEEP_AGE}'"
    )))
    .fetch_all(&mut *admin)
    .await?;
    for name in stale.into_iter().filter(|n| is_fixture_name(n)) {
        // Without FORCE: a database still in use belongs to a live run and is kept.
        if execute(admin, format!("DROP DATABASE IF EXISTS \"{name}\""))
            .await
            .is_ok()
        {
            sqlx::query("DELETE FROM postbox_testkit.databases WHERE name = $1")
                .bind(&name)
                .execute(&mut *admin)
                .await?;
            tracing::info!(target: "postbox", database = %name, "postbox.testkit: swept a leftover test database");
        }
    }
    Ok(())
}

/// Runs a statement built from names this module generated (`[a-z0-9_]` only).
pub(crate) async fn execute(conn: &mut PgConnection, sql: String) -> Result<(), sqlx::Error> {
    debug_assert!(sql.split('"').skip(1).step_by(2).all(|ident| {
        ident
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }));
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(conn).await?;
    Ok(())
}

/// Whether `name` is a fixture database name this testkit generates.
pub(crate) fn is_fixture_name(name: &str) -> bool {
    name.strip_prefix(DB_PREFIX).is_some_and(|rest| {
        rest.len() == 32
            && rest
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

/// `postbox_tpl_<hash of the schema>`.
fn template_name() -> String {
    let schema = ddl(&TableName::default());
    // FNV-1a: stable across builds and processes, unlike `DefaultHasher`.
    let hash = schema.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("postbox_tpl_{hash:016x}")
}

/// `url` with its database replaced by `database`.
pub(crate) fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{database}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// `url` without its password, for messages.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    match (rest.find('@'), rest.find(':')) {
        (Some(at), Some(colon)) if colon < at => {
            format!(
                "{}{}:***{}",
                &url[..scheme_end],
                &rest[..colon],
                &rest[at..]
            )
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/app?sslmode=disable", "x"),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
        assert_eq!(
            with_database("postgres://u@h:1/", "x"),
            "postgres://u@h:1/x"
        );
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn names_fit_postgres_and_are_recognised() {
        let name = format!("{DB_PREFIX}{}", uuid::Uuid::new_v4().simple());
        assert!(name.len() <= 63);
        assert!(is_fixture_name(&name));
        assert!(!is_fixture_name("postbox_test_x"));
        assert!(!is_fixture_name("app_production"));
        let tpl = template_name();
        assert!(tpl.len() + "_building".len() <= 63);
        assert_eq!(tpl, template_name(), "stable");
    }
}
