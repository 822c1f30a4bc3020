//! The error type shared by every backend.

use std::fmt;

/// A `Result` whose error defaults to postbox's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in postbox.
///
/// A lost lease is **not** an error: fenced outcomes ([`Consume::ack`](crate::Consume::ack) and
/// friends) return `Ok(false)` when the lease was lost and nothing changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A table name is not a plain lowercase SQL identifier.
    #[error(
        "invalid table name {name:?}: {reason}; use lowercase ASCII letters, digits and '_', starting with a letter or '_'"
    )]
    InvalidTableName {
        /// The name that was rejected.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A table name is valid, but one of the names derived from it would exceed Postgres'
    /// identifier limit (Postgres would silently truncate it, so two outboxes could collide).
    #[error(
        "table name {name:?} is too long: derived name {derived:?} is {len} bytes; Postgres allows {max}; shorten the table name to at most {max_table} bytes"
    )]
    IdentifierTooLong {
        /// The table name that was rejected.
        name: String,
        /// The longest derived identifier.
        derived: String,
        /// Its length in bytes.
        len: usize,
        /// Postgres' limit (63).
        max: usize,
        /// The longest table name that fits.
        max_table: usize,
    },

    /// A queue name is empty or too long.
    #[error("invalid queue name {queue:?}: {reason}")]
    InvalidQueue {
        /// The queue name that was rejected (truncated to 80 characters).
        queue: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A call was given arguments it cannot act on (an empty queue list, a zero limit, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The database schema does not match what this version of postbox expects.
    #[error(
        "schema of outbox table {table:?} is not usable: {problems}; run `PgBackend::migrate()`, or restore what was removed by hand"
    )]
    Schema {
        /// The outbox table that was checked.
        table: String,
        /// What is missing or wrong.
        problems: SchemaProblems,
    },

    /// `migrate()` found objects with the names of an outbox's tables that postbox did not
    /// create (there is no record of its migrations), and refuses to adopt them: it would run
    /// its `CREATE ... IF NOT EXISTS` statements past a table of another shape.
    #[error(
        "outbox table {table:?} cannot be created: {found} already exist(s) and postbox did not create them (no migrations recorded in {migrations}); rename or drop them, or choose another TableName"
    )]
    ForeignObjects {
        /// The outbox table being migrated.
        table: String,
        /// The relations found, comma-separated.
        found: String,
        /// The migrations table that was missing or empty.
        migrations: String,
    },

    /// A migration could not be applied.
    #[error("migration {version} ({description}) of outbox table {table:?} failed: {source}")]
    Migration {
        /// The outbox table being migrated.
        table: String,
        /// The migration's version number.
        version: i32,
        /// What the migration does.
        description: &'static str,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },

    /// The database returned an error, or the connection failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// A payload or header could not be encoded or decoded as JSON.
    #[error("json error: {0}")]
    Json(#[from] serde_json::Error),

    /// A member asked to unregister with [`Unregister::Fail`](crate::coop::Unregister::Fail) while it
    /// holds rows.
    #[error(
        "member {member} still holds {held} message(s); finish or requeue them (Unregister::Requeue) first"
    )]
    MemberHoldsMessages {
        /// The member (`group/name`).
        member: String,
        /// How many rows it holds.
        held: i64,
    },

    /// A journal event's seq is taken in its stream.
    #[error(
        "a seq of journal stream {stream:?} is taken (seq {seq:?}); read journal_latest_seq and write after it"
    )]
    SeqConflict {
        /// The stream of the first event of the append, in its order, whose seq was taken
        /// (stored already, or repeated within the append).
        stream: String,
        /// That event's seq (`None` only when a conflict reported by Postgres can no longer
        /// be found).
        seq: Option<i64>,
    },

    /// No subscription of this name exists (it was never created, or was unsubscribed).
    #[error("no subscription {subscription:?}; create it with subscribe(topic, subscription)")]
    UnknownSubscription {
        /// The subscription name.
        subscription: String,
    },

    /// A subscription of this name exists for another topic.
    #[error(
        "subscription {subscription:?} already subscribes topic {existing:?}, not {topic:?}; choose another name"
    )]
    SubscriptionTopic {
        /// The subscription name.
        subscription: String,
        /// The topic asked for.
        topic: String,
        /// The topic it subscribes.
        existing: String,
    },

    /// [`Unsubscribe::IfDrained`](crate::topic::Unsubscribe::IfDrained) found messages the
    /// subscription has not processed.
    #[error(
        "subscription {subscription:?} still has {backlog} unprocessed message(s); drain it, or unsubscribe with Unsubscribe::Discard"
    )]
    SubscriptionNotDrained {
        /// The subscription name.
        subscription: String,
        /// How many messages are unprocessed (not acked or dead-lettered).
        backlog: i64,
    },

    /// A journal writer was used after `close()`.
    #[error("journal writer of stream {stream:?} is closed; create a new writer")]
    WriterClosed {
        /// The stream.
        stream: String,
    },

    /// The subscriber runtime failed (its task panicked or was already shut down).
    #[error("subscriber runtime: {0}")]
    Runtime(String),

    /// A failure injected on purpose by a test double (for example `FakeBroker`'s fault
    /// injection).
    #[error("injected fault: {0}")]
    Injected(String),
}

impl Error {
    /// Whether retrying the same call later may succeed: connection problems, pool timeouts,
    /// serialization failures and deadlocks. Bad input and schema problems are not transient.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => matches!(
                    db.code().as_deref(),
                    // serialization_failure, deadlock_detected, admin_shutdown,
                    // crash_shutdown, cannot_connect_now, too_many_connections
                    Some("40001" | "40P01" | "57P01" | "57P02" | "57P03" | "53300")
                ),
                _ => false,
            },
            Error::Injected(_) => true,
            _ => false,
        }
    }
}

/// The list of problems [`PgBackend::validate_schema`](crate::PgBackend::validate_schema) found,
/// each naming the missing table, column or index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaProblems(pub Vec<String>);

impl fmt::Display for SchemaProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}
