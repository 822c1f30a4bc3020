//! Versioned, idempotent migrations of an outbox table, and schema validation.
//!
//! `migrate()` runs in one transaction under an advisory lock keyed by the table name, so
//! concurrent migrators (several service instances starting together) apply each version
//! exactly once. Applied versions are recorded in `T_migrations`.
//!
//! Every statement here runs unnamed (`persistent(false)`) and inside a transaction (the
//! reads too): they run rarely, and so work unchanged behind a transaction pooler, which
//! keeps one server session for a client only from `BEGIN` to `COMMIT` (see `session`).

use sqlx::{PgPool, Row};

use super::statements::{Statements, render};
use crate::error::{Error, Result, SchemaProblems};
use crate::table::{OutcomeFunction, TableName};

/// One schema version.
pub(crate) struct Migration {
    pub(crate) version: i32,
    pub(crate) description: &'static str,
    pub(crate) sql: &'static str,
}

/// The migrations, in order. Append only: a released migration is never edited.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "outbox table, lease check, pending and lease indexes, dead-letter table",
        sql: V1,
    },
    Migration {
        version: 2,
        description: "cooperative members registry and holder index",
        sql: V2,
    },
    Migration {
        version: 3,
        description: "journal events table",
        sql: V3,
    },
    Migration {
        version: 4,
        description: "outbox table partitioned into three generations reclaimed by TRUNCATE",
        sql: V4,
    },
    Migration {
        version: 5,
        description: "single-row outcomes as functions planned without sequential scans",
        sql: V5,
    },
    Migration {
        version: 6,
        description: "topics: the topic log, subscriptions, batches and held messages",
        sql: super::topic::V6,
    },
    Migration {
        version: 7,
        description: "topics: a receive fills its limit across snapshot ranges",
        sql: super::topic::V7,
    },
    Migration {
        version: 8,
        description: "topics: batches in generations reclaimed by TRUNCATE, the cursor in the newest batch",
        sql: super::topic_batches::V8,
    },
    Migration {
        version: 9,
        description: "topics: the receive reads its range in index order, without sorting rows",
        sql: super::topic_receive::V9,
    },
    Migration {
        version: 10,
        description: "queue depths counted from the indexes; dead letters indexed by queue and time",
        sql: super::depth::V10,
    },
];

const V1: &str = r#"
CREATE TABLE IF NOT EXISTS {table} (
    id               bigserial   PRIMARY KEY,
    queue            text        NOT NULL,
    payload          bytea       NOT NULL,
    headers          jsonb,
    correlation_id   uuid        NOT NULL,
    attempts         integer     NOT NULL DEFAULT 0,
    deliveries       integer     NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    first_attempt_at timestamptz,
    last_attempt_at  timestamptz,
    acquired_at      timestamptz,
    acquired_token   uuid,
    acquired_by      text,
    last_error       text,
    CONSTRAINT {lease_check} CHECK ((acquired_token IS NULL) = (acquired_at IS NULL))
);

CREATE INDEX IF NOT EXISTS {pending_idx}
    ON {table} (queue, next_attempt_at, id)
    WHERE acquired_token IS NULL;

CREATE INDEX IF NOT EXISTS {lease_idx}
    ON {table} (queue, acquired_at)
    WHERE acquired_token IS NOT NULL;

CREATE TABLE IF NOT EXISTS {dead} (
    id               bigint      PRIMARY KEY,
    queue            text        NOT NULL,
    payload          bytea       NOT NULL,
    headers          jsonb,
    correlation_id   uuid        NOT NULL,
    attempts         integer     NOT NULL,
    deliveries       integer     NOT NULL,
    created_at       timestamptz NOT NULL,
    next_attempt_at  timestamptz NOT NULL,
    first_attempt_at timestamptz,
    last_attempt_at  timestamptz,
    acquired_by      text,
    last_error       text,
    dead_at          timestamptz NOT NULL DEFAULT now(),
    reason           text        NOT NULL
);
"#;

const V2: &str = r#"
CREATE TABLE IF NOT EXISTS {members} (
    grp           text        NOT NULL,
    member        text        NOT NULL,
    queues        text[]      NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    last_active   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (grp, member)
);

CREATE INDEX IF NOT EXISTS {member_idx}
    ON {table} (acquired_by)
    WHERE acquired_by IS NOT NULL;
"#;

const V3: &str = r#"
CREATE TABLE IF NOT EXISTS {events} (
    stream_id  text        NOT NULL,
    seq        bigint      NOT NULL,
    event_type text        NOT NULL,
    payload    jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, seq)
);
"#;

/// The outbox table becomes `PARTITION BY LIST (gen)` with one partition per generation
/// (`T_p0`, `T_p1`, `T_p2`); publishes write to the generation named by `T_gen`, and rotation
/// reclaims drained generations with `TRUNCATE` (see `docs/design/storage.md`). The v3 rows
/// are copied, in this transaction, into generation 0 with their ids, leases and counters, so
/// leases taken before the upgrade stay valid and fenced. Ids keep coming from the same
/// sequence.
const V4: &str = r#"
CREATE SEQUENCE {gen_seq} AS bigint MINVALUE 0 START 0;
SELECT setval('{gen_seq}', 0, true);

ALTER TABLE {table} RENAME TO {legacy_name};

CREATE TABLE {table} (
    id               bigint      NOT NULL,
    gen              smallint    NOT NULL DEFAULT 0,
    queue            text        NOT NULL,
    payload          bytea       NOT NULL,
    headers          jsonb,
    correlation_id   uuid        NOT NULL,
    attempts         integer     NOT NULL DEFAULT 0,
    deliveries       integer     NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    first_attempt_at timestamptz,
    last_attempt_at  timestamptz,
    acquired_at      timestamptz,
    acquired_token   uuid,
    acquired_by      text,
    last_error       text,
    CONSTRAINT {lease_check} CHECK ((acquired_token IS NULL) = (acquired_at IS NULL))
) PARTITION BY LIST (gen);

CREATE TABLE {p0} PARTITION OF {table} FOR VALUES IN (0);
CREATE TABLE {p1} PARTITION OF {table} FOR VALUES IN (1);
CREATE TABLE {p2} PARTITION OF {table} FOR VALUES IN (2);

DO $postbox$
DECLARE
    seq text := pg_get_serial_sequence('{legacy}', 'id');
BEGIN
    EXECUTE format('ALTER SEQUENCE %s OWNED BY NONE', seq);
    EXECUTE format('ALTER TABLE {table} ALTER COLUMN id SET DEFAULT nextval(%L::regclass)', seq);
    EXECUTE format('ALTER SEQUENCE %s OWNED BY {table}.id', seq);
END
$postbox$;

INSERT INTO {table} (id, gen, queue, payload, headers, correlation_id, attempts, deliveries,
                     created_at, next_attempt_at, first_attempt_at, last_attempt_at,
                     acquired_at, acquired_token, acquired_by, last_error)
SELECT id, 0, queue, payload, headers, correlation_id, attempts, deliveries,
       created_at, next_attempt_at, first_attempt_at, last_attempt_at,
       acquired_at, acquired_token, acquired_by, last_error
FROM {legacy};

DROP TABLE {legacy};

ALTER TABLE {table} ADD PRIMARY KEY (id, gen);

CREATE INDEX {pending_idx}
    ON {table} (queue, next_attempt_at, id)
    WHERE acquired_token IS NULL;

CREATE INDEX {lease_idx}
    ON {table} (queue, acquired_at)
    WHERE acquired_token IS NOT NULL;

CREATE INDEX {member_idx}
    ON {table} (acquired_by)
    WHERE acquired_by IS NOT NULL;
"#;

/// The single-row outcomes (`ack`, `retry`, `dead_letter`, `renew`, `release`) become plpgsql
/// functions declared `SET enable_seqscan = off`, so their cached plans read the generations
/// through the primary key whatever the generations' sizes were when the plans were made. A
/// prepared statement's generic plan made while a generation was recorded as empty scans that
/// generation on every later call (see `docs/design/storage.md`, *Plans*); a function's
/// statements are planned with its settings, and kept per session like prepared statements.
/// Every function keeps the fence of the statement it replaces (`id AND acquired_token`) and
/// returns whether it changed a row.
const V5: &str = r#"
CREATE FUNCTION {ack_fn}(p_id bigint, p_token uuid) RETURNS boolean
LANGUAGE plpgsql SET enable_seqscan = off AS $postbox$
BEGIN
    DELETE FROM {table} WHERE id = p_id AND acquired_token = p_token;
    RETURN FOUND;
END
$postbox$;

CREATE FUNCTION {retry_fn}(p_id bigint, p_token uuid, p_delay_ms float8, p_error text,
                           p_now timestamptz) RETURNS boolean
LANGUAGE plpgsql SET enable_seqscan = off AS $postbox$
BEGIN
    UPDATE {table}
    SET attempts        = attempts + 1,
        next_attempt_at = coalesce(p_now, now()) + p_delay_ms * interval '1 millisecond',
        acquired_token  = NULL,
        acquired_at     = NULL,
        acquired_by     = NULL,
        last_error      = p_error
    WHERE id = p_id AND acquired_token = p_token;
    RETURN FOUND;
END
$postbox$;

CREATE FUNCTION {bury_fn}(p_id bigint, p_token uuid, p_reason text, p_now timestamptz)
RETURNS boolean
LANGUAGE plpgsql SET enable_seqscan = off AS $postbox$
BEGIN
    WITH moved AS (
        DELETE FROM {table}
        WHERE id = p_id AND acquired_token = p_token
        RETURNING *
    )
    INSERT INTO {dead} (id, queue, payload, headers, correlation_id, attempts, deliveries,
                        created_at, next_attempt_at, first_attempt_at, last_attempt_at,
                        acquired_by, last_error, dead_at, reason)
    SELECT id, queue, payload, headers, correlation_id, attempts + 1, deliveries,
           created_at, next_attempt_at, first_attempt_at, last_attempt_at,
           acquired_by, last_error, coalesce(p_now, now()), p_reason
    FROM moved;
    RETURN FOUND;
END
$postbox$;

CREATE FUNCTION {renew_fn}(p_id bigint, p_token uuid, p_now timestamptz) RETURNS boolean
LANGUAGE plpgsql SET enable_seqscan = off AS $postbox$
BEGIN
    UPDATE {table} SET acquired_at = coalesce(p_now, now())
    WHERE id = p_id AND acquired_token = p_token;
    RETURN FOUND;
END
$postbox$;

CREATE FUNCTION {release_fn}(p_id bigint, p_token uuid) RETURNS boolean
LANGUAGE plpgsql SET enable_seqscan = off AS $postbox$
BEGIN
    UPDATE {table}
    SET acquired_token = NULL,
        acquired_at    = NULL,
        acquired_by    = NULL,
        deliveries     = greatest(deliveries - 1, 0)
    WHERE id = p_id AND acquired_token = p_token;
    RETURN FOUND;
END
$postbox$;
"#;

pub(crate) const CREATE_MIGRATIONS: &str = r#"
CREATE TABLE IF NOT EXISTS {migrations} (
    version     integer     PRIMARY KEY,
    description text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)"#;

pub(crate) const APPLIED_MIGRATIONS: &str = "SELECT version FROM {migrations} ORDER BY version";

// $1 version, $2 description
pub(crate) const RECORD_MIGRATION: &str =
    "INSERT INTO {migrations} (version, description) VALUES ($1, $2)";

// $1 lock key text
const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";

/// The latest schema version this build knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// The complete DDL of `table` at the latest version, as `migrate()` would run it on an empty
/// database. Useful to review schema changes and to run migrations with your own tool.
pub fn ddl(table: &TableName) -> String {
    let mut out = render(CREATE_MIGRATIONS, table).trim().to_owned();
    out.push_str(";\n");
    for m in MIGRATIONS {
        out.push('\n');
        out.push_str(&migration_sql(table, m));
    }
    out
}

/// The DDL of one schema `version` of `table` (1 to [`SCHEMA_VERSION`]), as `migrate()`
/// runs it on a database at the version before, followed by the row that records it: one
/// migration file each, for teams that run migrations with their own tool (sqlx-cli,
/// refinery). Version 1 expects the migrations table, which [`ddl`] creates first; `None`
/// for a version this build does not know.
pub fn ddl_of_version(table: &TableName, version: i32) -> Option<String> {
    let m = MIGRATIONS.iter().find(|m| m.version == version)?;
    let mut out = String::new();
    if version == 1 {
        out.push_str(render(CREATE_MIGRATIONS, table).trim());
        out.push_str(";\n\n");
    }
    out.push_str(&migration_sql(table, m));
    Some(out)
}

fn migration_sql(table: &TableName, m: &Migration) -> String {
    let mut out = format!("-- version {}: {}\n", m.version, m.description);
    out.push_str(render(m.sql, table).trim());
    out.push('\n');
    // Recorded as `migrate()` records it, so `migrate()` and `validate_schema()` know the
    // schema afterwards.
    out.push_str(&format!(
        "INSERT INTO {} (version, description) VALUES ({}, '{}') ON CONFLICT DO NOTHING;\n",
        table.qualified(&table.migrations()),
        m.version,
        m.description.replace('\'', "''")
    ));
    out
}

/// Applies the migrations not yet recorded, in one transaction. Returns the versions applied.
pub(crate) async fn migrate(
    pool: &PgPool,
    table: &TableName,
    sql: &Statements,
) -> Result<Vec<i32>> {
    migrate_to(pool, table, sql, SCHEMA_VERSION).await
}

/// The versions recorded in `T_migrations`, or `None` when it does not exist. Read without
/// a lock and without DDL, so a role that may not create anything can check the schema.
async fn recorded_versions(
    conn: &mut sqlx::PgConnection,
    table: &TableName,
    sql: &Statements,
) -> Result<Option<Vec<i32>>> {
    let exists: bool = sqlx::query_scalar(RELATION_EXISTS)
        .persistent(false)
        .bind(table.regclass(&table.migrations()))
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(None);
    }
    Ok(Some(
        sqlx::query_scalar(sql.applied_migrations.clone())
            .persistent(false)
            .fetch_all(&mut *conn)
            .await?,
    ))
}

/// Refuses to migrate over relations named like the outbox's that postbox did not create:
/// called when no migration is recorded.
async fn refuse_foreign_objects(conn: &mut sqlx::PgConnection, table: &TableName) -> Result<()> {
    let mut found = Vec::new();
    for name in [
        table.to_string(),
        table.regclass(&table.dead_letter()),
        table.regclass(&table.members()),
        table.regclass(&table.events()),
    ] {
        let exists: bool = sqlx::query_scalar(RELATION_EXISTS)
            .persistent(false)
            .bind(&name)
            .fetch_one(&mut *conn)
            .await?;
        if exists {
            found.push(name);
        }
    }
    if found.is_empty() {
        Ok(())
    } else {
        Err(Error::ForeignObjects {
            table: table.to_string(),
            found: found.join(", "),
            migrations: table.regclass(&table.migrations()),
        })
    }
}

/// Applies the migrations not yet recorded up to `target`, in one transaction.
///
/// When every version up to `target` is recorded already, returns at once without a lock or
/// any DDL, so a service role that may not create objects can call it at start-up.
pub(crate) async fn migrate_to(
    pool: &PgPool,
    table: &TableName,
    sql: &Statements,
    target: i32,
) -> Result<Vec<i32>> {
    {
        let mut read = pool.begin().await?;
        let recorded = recorded_versions(&mut read, table, sql).await?;
        read.commit().await?;
        if let Some(recorded) = recorded {
            let wanted = sql.migrations.iter().map(|m| m.0).filter(|v| *v <= target);
            if wanted.clone().all(|v| recorded.contains(&v)) {
                return Ok(Vec::new());
            }
        }
    }
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK)
        .persistent(false)
        .bind(format!("postbox:migrate:{table}"))
        .execute(&mut *tx)
        .await?;
    if let Some(schema) = table.schema() {
        // Only when missing: CREATE SCHEMA IF NOT EXISTS checks the privilege to create one
        // even when it exists.
        let exists: bool = sqlx::query_scalar(SCHEMA_EXISTS)
            .persistent(false)
            .bind(schema)
            .fetch_one(&mut *tx)
            .await?;
        if !exists {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE SCHEMA {}",
                TableName::quoted(schema)
            )))
            .execute(&mut *tx)
            .await?;
        }
    }
    sqlx::raw_sql(sql.create_migrations.clone())
        .execute(&mut *tx)
        .await?;
    let applied: Vec<i32> = sqlx::query_scalar(sql.applied_migrations.clone())
        .persistent(false)
        .fetch_all(&mut *tx)
        .await?;
    if applied.is_empty() {
        refuse_foreign_objects(&mut tx, table).await?;
    }
    let mut done = Vec::new();
    for (version, description, ddl) in &sql.migrations {
        if applied.contains(version) || *version > target {
            continue;
        }
        let failed = |source| Error::Migration {
            table: table.to_string(),
            version: *version,
            description,
            source,
        };
        sqlx::raw_sql(ddl.clone())
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        sqlx::query(sql.record_migration.clone())
            .persistent(false)
            .bind(version)
            .bind(description)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        done.push(*version);
    }
    tx.commit().await?;
    if !done.is_empty() {
        tracing::info!(target: "postbox", table = %table, versions = ?done, "postbox.migrate: applied");
    }
    Ok(done)
}

/// Columns of the topic log.
const LOG_COLUMNS: &[&str] = &[
    "slot",
    "id",
    "topic",
    "xid",
    "payload",
    "headers",
    "correlation_id",
    "created_at",
];
/// Columns of the subscriptions table.
const SUBSCRIPTION_COLUMNS: &[&str] = &[
    "name",
    "topic",
    "created_at",
    "lo",
    "hi",
    "pos_xid",
    "pos_id",
    "checked_at",
];
/// Columns of the batches table.
const BATCH_COLUMNS: &[&str] = &[
    "slot",
    "seq",
    "token",
    "sub",
    "topic",
    "lo",
    "hi",
    "pos_xid",
    "pos_id",
    "checked_at",
    "done",
    "ids",
    "xids",
    "settled",
    "holder",
    "leased_at",
    "ttl_ms",
    "expires_at",
];
/// Columns of the idempotency keys table.
const KEY_COLUMNS: &[&str] = &["topic", "key", "id", "created_at"];
/// Columns of the held-messages table.
const HELD_COLUMNS: &[&str] = &[
    "id",
    "sub",
    "topic",
    "payload",
    "headers",
    "correlation_id",
    "created_at",
    "attempts",
    "deliveries",
    "next_attempt_at",
    "first_attempt_at",
    "last_error",
    "acquired_token",
    "acquired_at",
    "acquired_by",
    "ttl_ms",
    "dead_at",
    "reason",
];

/// Columns of the outbox table and of the dead-letter table.
const COLUMNS: &[&str] = &[
    "id",
    "gen",
    "queue",
    "payload",
    "headers",
    "correlation_id",
    "attempts",
    "deliveries",
    "created_at",
    "next_attempt_at",
    "first_attempt_at",
    "last_attempt_at",
    "acquired_at",
    "acquired_token",
    "acquired_by",
    "last_error",
];
const DEAD_COLUMNS: &[&str] = &[
    "id",
    "queue",
    "payload",
    "headers",
    "correlation_id",
    "attempts",
    "deliveries",
    "created_at",
    "next_attempt_at",
    "first_attempt_at",
    "last_attempt_at",
    "acquired_by",
    "last_error",
    "dead_at",
    "reason",
];

const EVENT_COLUMNS: &[&str] = &["stream_id", "seq", "event_type", "payload", "created_at"];
const MEMBER_COLUMNS: &[&str] = &["grp", "member", "queues", "registered_at", "last_active"];

// $1 relation name
const RELATION_EXISTS: &str = "SELECT to_regclass($1) IS NOT NULL";
// $1 relation name
const COLUMNS_OF: &str = "SELECT attname::text FROM pg_attribute \
     WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped";
// $1 schema name
const SCHEMA_EXISTS: &str = "SELECT to_regnamespace($1) IS NOT NULL";
// $1 function name
const FUNCTION_EXISTS: &str = "SELECT to_regproc($1) IS NOT NULL";
// $1 constraint name, $2 relation name
const CONSTRAINT_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pg_constraint \
     WHERE conname = $1 AND conrelid = to_regclass($2))";

/// Lists what is missing from the schema of `table`; empty when it is usable.
pub(crate) async fn problems(
    pool: &PgPool,
    table: &TableName,
    sql: &Statements,
) -> Result<Vec<String>> {
    let mut conn = pool.begin().await?;
    let mut problems = Vec::new();
    let relations = [
        ("table", table.to_string(), COLUMNS),
        (
            "dead-letter table",
            table.regclass(&table.dead_letter()),
            DEAD_COLUMNS,
        ),
        (
            "members table",
            table.regclass(&table.members()),
            MEMBER_COLUMNS,
        ),
        (
            "journal table",
            table.regclass(&table.events()),
            EVENT_COLUMNS,
        ),
        ("topic log", table.regclass(&table.log()), LOG_COLUMNS),
        (
            "subscriptions table",
            table.regclass(&table.subscriptions()),
            SUBSCRIPTION_COLUMNS,
        ),
        (
            "batches table",
            table.regclass(&table.batches()),
            BATCH_COLUMNS,
        ),
        ("held table", table.regclass(&table.held()), HELD_COLUMNS),
        ("keys table", table.regclass(&table.keys()), KEY_COLUMNS),
    ];
    for (kind, name, expected) in relations {
        let exists: bool = sqlx::query_scalar(RELATION_EXISTS)
            .persistent(false)
            .bind(&name)
            .fetch_one(&mut *conn)
            .await?;
        if !exists {
            problems.push(format!("{kind} {name} is missing"));
            continue;
        }
        let present: Vec<String> = sqlx::query_scalar(COLUMNS_OF)
            .persistent(false)
            .bind(&name)
            .fetch_all(&mut *conn)
            .await?;
        for column in expected.iter().filter(|c| !present.iter().any(|p| p == *c)) {
            problems.push(format!("column {name}.{column} is missing"));
        }
    }
    let generations = (0..crate::table::GENERATIONS)
        .map(|slot| ("partition", table.regclass(&table.partition(slot))));
    let log_generations = (0..crate::table::GENERATIONS)
        .map(|slot| ("log partition", table.regclass(&table.log_partition(slot))));
    let batch_generations = (0..crate::table::GENERATIONS).map(|slot| {
        (
            "batch partition",
            table.regclass(&table.batch_partition(slot)),
        )
    });
    let indexes = [
        table.pending_index(),
        table.lease_index(),
        table.member_index(),
        table.log_index(),
        table.batch_index(),
        table.batch_token_index(),
        table.held_index(),
        table.keys_index(),
        table.dead_index(),
    ]
    .map(|index| ("index", table.regclass(&index)));
    let sequences = [
        (
            "generation sequence",
            table.regclass(&table.generation_sequence()),
        ),
        (
            "log generation sequence",
            table.regclass(&table.log_generation_sequence()),
        ),
        ("log id sequence", table.regclass(&table.log_ids())),
        ("batch sequence", table.regclass(&table.batch_sequence())),
    ];
    for (kind, name) in generations
        .chain(log_generations)
        .chain(batch_generations)
        .chain(indexes)
        .chain(sequences)
    {
        let exists: bool = sqlx::query_scalar(RELATION_EXISTS)
            .persistent(false)
            .bind(&name)
            .fetch_one(&mut *conn)
            .await?;
        if !exists {
            problems.push(format!("{kind} {name} is missing"));
        }
    }
    let topic_functions = [
        table.receive_function(),
        table.settle_function(),
        table.depths_function(),
    ];
    for function in OutcomeFunction::ALL
        .map(|f| table.regclass(&table.outcome_function(f)))
        .into_iter()
        .chain(topic_functions.map(|f| table.regclass(&f)))
    {
        let exists: bool = sqlx::query_scalar(FUNCTION_EXISTS)
            .persistent(false)
            .bind(&function)
            .fetch_one(&mut *conn)
            .await?;
        if !exists {
            problems.push(format!("function {function} is missing"));
        }
    }
    let check: bool = sqlx::query_scalar(CONSTRAINT_EXISTS)
        .persistent(false)
        .bind(table.lease_check())
        .bind(table.to_string())
        .fetch_one(&mut *conn)
        .await?;
    if !check && !problems.iter().any(|p| p.starts_with("table ")) {
        problems.push(format!(
            "check constraint {} is missing",
            table.lease_check()
        ));
    }
    let migrations_exist: bool = sqlx::query_scalar(RELATION_EXISTS)
        .persistent(false)
        .bind(table.regclass(&table.migrations()))
        .fetch_one(&mut *conn)
        .await?;
    let latest = if migrations_exist {
        sqlx::query(sql.applied_migrations.clone())
            .persistent(false)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| r.try_get::<i32, _>(0))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .max()
    } else {
        None
    };
    match latest {
        None => problems.push(format!(
            "migrations table {} is missing or empty",
            table.migrations()
        )),
        Some(v) if v < SCHEMA_VERSION => problems.push(format!(
            "schema version is {v}, this build needs {SCHEMA_VERSION}"
        )),
        Some(_) => {}
    }
    conn.commit().await?;
    Ok(problems)
}

/// Turns a problem list into the schema error.
pub(crate) fn check(table: &TableName, problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Schema {
            table: table.to_string(),
            problems: SchemaProblems(problems),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_increasing_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i32::try_from(i).expect("few") + 1);
        }
    }

    #[test]
    fn ddl_snapshot_default_table() {
        insta::assert_snapshot!(ddl(&TableName::default()));
    }

    #[test]
    fn ddl_snapshot_custom_table() {
        insta::assert_snapshot!(ddl(&TableName::new("orders_outbox").expect("valid")));
    }
}
