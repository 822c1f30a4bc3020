//! Least privilege: the exact privileges each kind of postbox user needs on one outbox, as
//! `GRANT` statements a database owner runs (see [`PgBackend::grants`]).
//!
//! What each statement family touches, and so what each [`Access`] grants:
//!
//! | access | needs |
//! |---|---|
//! | every role | `USAGE` on the schema, `SELECT` on `T_migrations` (`migrate()` when current, `validate_schema()`) |
//! | [`Access::Publisher`] | `INSERT` on `T`, `SELECT (id)` on `T` (`RETURNING id`), `USAGE` on the id sequence, `SELECT` on `T_gen` (the generation publishes go to); the same on `T_log`, `T_log_id` and `T_log_gen` for topics, and `SELECT, INSERT, UPDATE` on `T_keys` (idempotency keys; a key past its retention is taken over) |
//! | [`Access::Consumer`] | `SELECT, INSERT, UPDATE, DELETE` on `T`; `SELECT, UPDATE, DELETE, TRUNCATE` on each generation (the fetch reads them by name, `FOR UPDATE`; rotation moves rows, takes their `ACCESS EXCLUSIVE` lock and truncates them); `SELECT, UPDATE` on `T_gen` (rotation advances it); `INSERT` on `T_dead`; `EXECUTE` on the outcome functions; for topics `SELECT` on `T_log`, `SELECT, INSERT, UPDATE, DELETE` on `T_subs`, `T_batches` and `T_held`, `EXECUTE` on `T_receive` and `T_settle`, `SELECT, DELETE` on `T_keys` (rotation forgets old keys); for the log's rotation `SELECT, TRUNCATE` on `T_log_p0..2`, `SELECT, UPDATE, DELETE, TRUNCATE` on `T_batches_p0..2`, `SELECT, UPDATE` on `T_log_gen`, `USAGE` on `T_batch_seq` |
//! | [`Access::CoopMember`] | a consumer's, and `SELECT, INSERT, UPDATE, DELETE` on `T_members` |
//! | [`Access::JournalWriter`] | `SELECT, INSERT` on `T_events` |
//! | [`Access::JournalReader`] | `SELECT` on `T_events` |
//! | [`Access::Inspector`] | `SELECT` on `T`, `T_dead`, `T_members`, `T_events`, `T_log`, `T_subs`, `T_batches`, `T_held`, `T_keys` |
//! | [`Access::Admin`] | ownership of every object (later migrations alter them) and `CREATE` on the schema; the only role that can redrive a queue's dead letters ([`Redrive`](crate::Redrive); a consumer can redrive a subscription's) |
//!
//! `NOTIFY` and `LISTEN` need no privilege (which is why the journal's live channel carries no
//! events by default: see [`JournalLive`](crate::journal::JournalLive)).

use sqlx::Row;

use super::PgBackend;
use crate::error::{Error, Result};
use crate::table::{GENERATIONS, MAX_IDENTIFIER_LEN, OutcomeFunction, TableName};

/// What a database role does with one outbox, for [`PgBackend::grants`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Access {
    /// Publishes messages in its own transactions (`publish`, `publish_batch`).
    Publisher,
    /// Fetches and settles messages: `fetch`, every outcome, a `Subscriber`, rotation.
    Consumer,
    /// A consumer that is also a cooperative member (`coop_*`, a subconsumer `Subscriber`).
    CoopMember,
    /// Writes journal streams (`BatchedJournalWriter`, `record_event`, `journal_append`).
    JournalWriter,
    /// Reads journal streams (`snapshot_and_tail`, `journal_read_after`).
    JournalReader,
    /// Reads messages, dead letters, members and journals (`messages`, `dead_letters`,
    /// `queue_depths`, `coop_members`), changes nothing.
    Inspector,
    /// Owns the outbox and runs its migrations; redrives a queue's dead letters
    /// ([`Redrive`](crate::Redrive)).
    Admin,
}

impl Access {
    /// Every kind of access, in the order above.
    pub const ALL: [Access; 7] = [
        Access::Publisher,
        Access::Consumer,
        Access::CoopMember,
        Access::JournalWriter,
        Access::JournalReader,
        Access::Inspector,
        Access::Admin,
    ];
}

// $1 table: its schema, and the sequence behind its id column.
const OBJECTS: &str = r#"
SELECT n.nspname::text AS schema,
       pg_get_serial_sequence($1, 'id') AS id_seq
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass($1)"#;

/// The argument types of `T_receive`, as `GRANT` and `ALTER FUNCTION` name it.
const RECEIVE_SIGNATURE: &str =
    "(text, integer, double precision, uuid, text, integer, timestamptz)";
/// The argument types of `T_depths`.
const DEPTHS_SIGNATURE: &str = "(text, timestamptz)";
/// The argument types of `T_settle`.
const SETTLE_SIGNATURE: &str = "(text, bigint[], uuid, double precision, text, timestamptz)";

/// Validates `role` as a plain role name and quotes it.
fn quoted_role(role: &str) -> Result<String> {
    let mut bytes = role.bytes();
    let valid = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && role.len() <= MAX_IDENTIFIER_LEN;
    if valid {
        Ok(format!("\"{role}\""))
    } else {
        Err(Error::InvalidArgument(format!(
            "role name {role:?}: use 1 to {MAX_IDENTIFIER_LEN} bytes of lowercase ASCII letters, \
             digits and '_', starting with a letter or '_'"
        )))
    }
}

/// An identifier Postgres returned (a schema or sequence name), quoted for SQL.
fn quoted_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The statements granting `access` on `table` to `role`, given the table's schema and the
/// qualified name of its id sequence (as `pg_get_serial_sequence` returns it).
pub(crate) fn statements(
    table: &TableName,
    schema: &str,
    id_seq: &str,
    access: Access,
    role: &str,
) -> Result<Vec<String>> {
    let role = quoted_role(role)?;
    let schema = quoted_identifier(schema);
    let q = |name: String| format!("{schema}.{}", TableName::quoted(&name));
    let t = q(table.as_str().to_owned());
    let generations: Vec<String> = (0..GENERATIONS).map(|s| q(table.partition(s))).collect();
    let generations = generations.join(", ");
    let gen_seq = q(table.generation_sequence());
    let functions = || {
        OutcomeFunction::ALL
            .map(|f| format!("{}{}", q(table.outcome_function(f)), f.signature()))
            .join(", ")
    };
    let log = q(table.log());
    let log_gen = q(table.log_generation_sequence());
    let subscriptions = [table.subscriptions(), table.batches(), table.held()]
        .map(q)
        .join(", ");
    let batch_generations = (0..GENERATIONS)
        .map(|s| q(table.batch_partition(s)))
        .collect::<Vec<_>>()
        .join(", ");
    let log_generations = (0..GENERATIONS)
        .map(|s| q(table.log_partition(s)))
        .collect::<Vec<_>>()
        .join(", ");
    let keys = q(table.keys());
    let topic_functions = format!(
        "{}{}, {}{}",
        q(table.receive_function()),
        RECEIVE_SIGNATURE,
        q(table.settle_function()),
        SETTLE_SIGNATURE
    );
    let mut out = vec![
        format!("GRANT USAGE ON SCHEMA {schema} TO {role}"),
        format!("GRANT SELECT ON {} TO {role}", q(table.migrations())),
    ];
    let consumer = |out: &mut Vec<String>| {
        out.push(format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON {t} TO {role}"
        ));
        out.push(format!(
            "GRANT SELECT, UPDATE, DELETE, TRUNCATE ON {generations} TO {role}"
        ));
        out.push(format!(
            "GRANT SELECT, UPDATE ON SEQUENCE {gen_seq} TO {role}"
        ));
        out.push(format!(
            "GRANT INSERT ON {} TO {role}",
            q(table.dead_letter())
        ));
        out.push(format!(
            "GRANT EXECUTE ON FUNCTION {} TO {role}",
            functions()
        ));
        out.push(format!("GRANT SELECT ON {log} TO {role}"));
        out.push(format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON {subscriptions} TO {role}"
        ));
        out.push(format!(
            "GRANT EXECUTE ON FUNCTION {topic_functions} TO {role}"
        ));
        out.push(format!("GRANT SELECT, DELETE ON {keys} TO {role}"));
        // Rotation truncates the log's and the batches' generations and moves the log on.
        out.push(format!(
            "GRANT SELECT, UPDATE ON SEQUENCE {log_gen} TO {role}"
        ));
        out.push(format!(
            "GRANT SELECT, TRUNCATE ON {log_generations} TO {role}"
        ));
        out.push(format!(
            "GRANT SELECT, UPDATE, DELETE, TRUNCATE ON {batch_generations} TO {role}"
        ));
        out.push(format!(
            "GRANT USAGE ON SEQUENCE {} TO {role}",
            q(table.batch_sequence())
        ));
    };
    match access {
        Access::Publisher => {
            out.push(format!("GRANT INSERT, SELECT (id) ON {t} TO {role}"));
            out.push(format!("GRANT USAGE ON SEQUENCE {id_seq} TO {role}"));
            out.push(format!("GRANT SELECT ON SEQUENCE {gen_seq} TO {role}"));
            out.push(format!("GRANT INSERT, SELECT (id) ON {log} TO {role}"));
            out.push(format!(
                "GRANT USAGE ON SEQUENCE {} TO {role}",
                q(table.log_ids())
            ));
            out.push(format!("GRANT SELECT ON SEQUENCE {log_gen} TO {role}"));
            out.push(format!("GRANT SELECT, INSERT, UPDATE ON {keys} TO {role}"));
        }
        Access::Consumer => consumer(&mut out),
        Access::CoopMember => {
            consumer(&mut out);
            out.push(format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {role}",
                q(table.members())
            ));
        }
        Access::JournalWriter => {
            out.push(format!(
                "GRANT SELECT, INSERT ON {} TO {role}",
                q(table.events())
            ));
        }
        Access::JournalReader => {
            out.push(format!("GRANT SELECT ON {} TO {role}", q(table.events())));
        }
        Access::Inspector => {
            out.push(format!(
                "GRANT SELECT ON {t}, {}, {}, {}, {log}, {subscriptions}, {keys} TO {role}",
                q(table.dead_letter()),
                q(table.members()),
                q(table.events())
            ));
        }
        Access::Admin => {
            out.push(format!("GRANT CREATE ON SCHEMA {schema} TO {role}"));
            for relation in [
                table.as_str().to_owned(),
                table.dead_letter(),
                table.members(),
                table.events(),
                table.migrations(),
                table.log(),
                table.subscriptions(),
                table.batches(),
                table.held(),
                table.keys(),
            ]
            .into_iter()
            .chain((0..GENERATIONS).map(|s| table.partition(s)))
            .chain((0..GENERATIONS).map(|s| table.log_partition(s)))
            .chain((0..GENERATIONS).map(|s| table.batch_partition(s)))
            {
                out.push(format!("ALTER TABLE {} OWNER TO {role}", q(relation)));
            }
            out.push(format!("ALTER SEQUENCE {gen_seq} OWNER TO {role}"));
            out.push(format!("ALTER SEQUENCE {log_gen} OWNER TO {role}"));
            out.push(format!(
                "ALTER SEQUENCE {} OWNER TO {role}",
                q(table.batch_sequence())
            ));
            out.push(format!(
                "ALTER FUNCTION {}{RECEIVE_SIGNATURE} OWNER TO {role}",
                q(table.receive_function())
            ));
            out.push(format!(
                "ALTER FUNCTION {}{SETTLE_SIGNATURE} OWNER TO {role}",
                q(table.settle_function())
            ));
            out.push(format!(
                "ALTER FUNCTION {}{DEPTHS_SIGNATURE} OWNER TO {role}",
                q(table.depths_function())
            ));
            for f in OutcomeFunction::ALL {
                out.push(format!(
                    "ALTER FUNCTION {}{} OWNER TO {role}",
                    q(table.outcome_function(f)),
                    f.signature()
                ));
            }
        }
    }
    Ok(out)
}

impl PgBackend {
    /// The statements that give `role` what `access` needs on this outbox and nothing more,
    /// one per line, each ending in `;`: run them as the owner after
    /// [`migrate`](Self::migrate) (they name the objects it created). Roles may hold several
    /// kinds of access; a role that holds none of them can still connect, `LISTEN` and
    /// `NOTIFY`, which is all Postgres allows every role.
    ///
    /// See the module table in `core/src/pg/grants.rs` for what each kind holds and why; the
    /// tests in `tests/pg_grants.rs` run publish, a `Subscriber`, cooperative members, the
    /// journal and inspection under exactly these grants, and check that everything outside
    /// them is refused.
    ///
    /// ```no_run
    /// # async fn f(backend: postbox_core::PgBackend) -> postbox_core::Result<()> {
    /// use postbox_core::pg::Access;
    ///
    /// // Printed for a DBA, or run by a deployment job connected as the owner.
    /// println!("{}", backend.grants(Access::Publisher, "orders_api").await?);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a role name that is not a plain lowercase identifier;
    /// [`Error::Schema`] if the outbox table does not exist yet; [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only; drop the call and make it again.
    pub async fn grants(&self, access: Access, role: &str) -> Result<String> {
        quoted_role(role)?;
        let table = &self.shared().table;
        let mut session = self.shared().session().await?;
        let row = sqlx::query(OBJECTS)
            .persistent(false)
            .bind(table.to_string())
            .fetch_optional(&mut *session)
            .await?;
        session.done().await?;
        let Some(row) = row else {
            return Err(Error::Schema {
                table: table.to_string(),
                problems: crate::error::SchemaProblems(vec![format!("table {table} is missing")]),
            });
        };
        let schema: String = row.try_get("schema")?;
        let id_seq: Option<String> = row.try_get("id_seq")?;
        let id_seq = id_seq.ok_or_else(|| Error::Schema {
            table: table.to_string(),
            problems: crate::error::SchemaProblems(vec![format!(
                "column {table}.id has no sequence"
            )]),
        })?;
        let lines = statements(table, &schema, &id_seq, access, role)?;
        Ok(lines.iter().map(|l| format!("{l};\n")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_are_validated() {
        for bad in ["", "Admin", "a-b", "x\"; DROP ROLE y; --", "1a", "ü"] {
            assert!(quoted_role(bad).is_err(), "{bad}");
        }
        assert_eq!(quoted_role("svc_1").expect("valid"), "\"svc_1\"");
        assert!(quoted_role(&"a".repeat(64)).is_err());
    }

    #[test]
    fn grants_snapshot() {
        let table = TableName::default();
        let all: Vec<String> = Access::ALL
            .iter()
            .map(|a| {
                let lines = statements(&table, "public", "public.postbox_id_seq", *a, "svc")
                    .expect("valid");
                format!("-- {a:?}\n{}", lines.join(";\n"))
            })
            .collect();
        insta::assert_snapshot!(all.join("\n\n"));
    }
}
