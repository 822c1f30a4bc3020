//! Validated outbox table names and every identifier derived from them.
//!
//! Postgres silently truncates identifiers longer than 63 bytes, so two long table names could
//! end up sharing an index or a notification channel. [`TableName::new`] therefore checks every
//! derived name up front, including those reserved for later migrations, so that a name accepted
//! today stays valid as the schema grows.

use std::fmt;

use crate::error::{Error, Result};

/// Postgres' identifier limit in bytes (`NAMEDATALEN - 1`).
pub const MAX_IDENTIFIER_LEN: usize = 63;

/// Suffixes appended to the table name for the objects postbox creates or reserves.
///
/// Postgres names primary keys and sequences itself, avoiding collisions, so only the names
/// postbox chooses are listed; `_events`, `_members` and `_member_idx` are reserved for the
/// journal and subconsumer tables.
const SUFFIXES: &[&str] = &[
    "_dead",
    "_pending_idx",
    "_lease_idx",
    "_lease_check",
    "_migrations",
    "_events",
    "_members",
    "_member_idx",
    "_p0",
    "_p1",
    "_p2",
    "_gen",
    "_v3",
    "_ack",
    "_retry",
    "_bury",
    "_renew",
    "_release",
    "_log",
    "_log_p0",
    "_log_p1",
    "_log_p2",
    "_log_idx",
    "_log_id",
    "_log_gen",
    "_subs",
    "_batches",
    "_batch_idx",
    "_held",
    "_held_idx",
    "_receive",
    "_settle",
    "_keys",
    "_keys_idx",
    "_depths",
    "_dead_idx",
];

/// The single-row outcomes, each run by a function of its own (see
/// [`TableName::outcome_function`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum OutcomeFunction {
    Ack,
    Retry,
    Bury,
    Renew,
    Release,
}

impl OutcomeFunction {
    /// The argument types, as `GRANT` and `ALTER FUNCTION` name the function.
    pub(crate) fn signature(self) -> &'static str {
        match self {
            OutcomeFunction::Ack | OutcomeFunction::Release => "(bigint, uuid)",
            OutcomeFunction::Retry => "(bigint, uuid, double precision, text, timestamptz)",
            OutcomeFunction::Bury => "(bigint, uuid, text, timestamptz)",
            OutcomeFunction::Renew => "(bigint, uuid, timestamptz)",
        }
    }

    /// Every outcome function, for schema checks.
    pub(crate) const ALL: [OutcomeFunction; 5] = [
        OutcomeFunction::Ack,
        OutcomeFunction::Retry,
        OutcomeFunction::Bury,
        OutcomeFunction::Renew,
        OutcomeFunction::Release,
    ];
}

/// How many partitions (generations) an outbox table has: one takes publishes, the others
/// drain and are reclaimed with `TRUNCATE`.
pub const GENERATIONS: usize = 3;

/// Prefix of the LISTEN/NOTIFY channel.
const CHANNEL_PREFIX: &str = "postbox_";

/// Prefix of the journal's live channel.
const JOURNAL_CHANNEL_PREFIX: &str = "postbox_ev_";

/// The longest table name whose derived identifiers all fit.
const MAX_TABLE_LEN: usize = MAX_IDENTIFIER_LEN - longest_suffix();

const fn longest_suffix() -> usize {
    let mut i = 0;
    let mut max = if CHANNEL_PREFIX.len() > JOURNAL_CHANNEL_PREFIX.len() {
        CHANNEL_PREFIX.len()
    } else {
        JOURNAL_CHANNEL_PREFIX.len()
    };
    while i < SUFFIXES.len() {
        if SUFFIXES[i].len() > max {
            max = SUFFIXES[i].len();
        }
        i += 1;
    }
    max
}

/// The name of an outbox table, validated as a plain SQL identifier.
///
/// Accepted: 1 to 51 bytes of lowercase ASCII letters, digits and `_`, not starting with a digit.
/// Upper case is refused rather than folded, so the name you pass is exactly the name in the
/// catalog. Every identifier postbox derives from it (`T_dead`, `T_pending_idx`, the channel
/// `postbox_T`, ...) fits in Postgres' 63-byte limit.
///
/// The default is `postbox`.
///
/// ```
/// use postbox_core::TableName;
///
/// let t = TableName::new("orders_outbox")?;
/// assert_eq!(t.dead_letter(), "orders_outbox_dead");
/// assert_eq!(t.channel(), "postbox_orders_outbox");
/// assert!(TableName::new("Orders; DROP TABLE x").is_err());
/// # Ok::<(), postbox_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    name: String,
    /// The Postgres schema (namespace) holding the outbox; `None`: the first schema of the
    /// connection's `search_path` (usually `public`).
    schema: Option<String>,
}

impl TableName {
    /// Validates `name` as an outbox table name.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidTableName`] if the name is empty or has a character outside
    ///   `[a-z0-9_]` or starts with a digit.
    /// - [`Error::IdentifierTooLong`] if a derived identifier would exceed 63 bytes.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let invalid = |reason| Error::InvalidTableName {
            name: name.clone(),
            reason,
        };
        let first = name.bytes().next().ok_or_else(|| invalid("it is empty"))?;
        if first.is_ascii_digit() {
            return Err(invalid("it starts with a digit"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(invalid("it contains a character other than [a-z0-9_]"));
        }
        TableName { name, schema: None }.fits()
    }

    /// An outbox table in the Postgres schema (namespace) `schema` rather than the first of
    /// the connection's `search_path`. The schema name follows the table name's rules (and may
    /// not start with `pg_`, which Postgres reserves); `migrate()` creates the schema when it
    /// does not exist. The notification channels name both, `postbox_<schema>.<table>`, so
    /// outboxes of one name in two schemas never share a channel.
    ///
    /// ```
    /// use postbox_core::TableName;
    ///
    /// let t = TableName::in_schema("billing", "outbox")?;
    /// assert_eq!(t.schema(), Some("billing"));
    /// assert_eq!(t.dead_letter(), "outbox_dead"); // in schema billing
    /// assert_eq!(t.channel(), "postbox_billing.outbox");
    /// assert_eq!(t.to_string(), "billing.outbox");
    /// assert!(TableName::in_schema("pg_catalog", "outbox").is_err());
    /// # Ok::<(), postbox_core::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new), for the table name and for the schema name;
    /// [`Error::InvalidTableName`] also for a schema starting with `pg_`.
    pub fn in_schema(schema: impl Into<String>, name: impl Into<String>) -> Result<Self> {
        let schema = schema.into();
        TableName::new(schema.clone()).map_err(|e| match e {
            Error::InvalidTableName { reason, .. } => Error::InvalidTableName {
                name: schema.clone(),
                reason: match reason {
                    "it is empty" => "the schema name is empty",
                    "it starts with a digit" => "the schema name starts with a digit",
                    _ => "the schema name contains a character other than [a-z0-9_]",
                },
            },
            other => other,
        })?;
        if schema.starts_with("pg_") {
            return Err(Error::InvalidTableName {
                name: schema,
                reason: "schema names starting with pg_ are reserved by Postgres",
            });
        }
        let mut table = TableName::new(name)?;
        table.schema = Some(schema);
        table.fits()
    }

    /// `self`, if every identifier derived from it fits in Postgres' limit.
    fn fits(self) -> Result<Self> {
        let Some(derived) = self
            .derived_names()
            .into_iter()
            .find(|d| d.len() > MAX_IDENTIFIER_LEN)
        else {
            return Ok(self);
        };
        // The longest table name that fits: the suffixes' limit, and with a schema the
        // journal channel's (`postbox_ev_<schema>.<table>`).
        let max_table = MAX_TABLE_LEN.min(
            MAX_IDENTIFIER_LEN
                .saturating_sub(JOURNAL_CHANNEL_PREFIX.len())
                .saturating_sub(self.schema.as_ref().map_or(0, |s| s.len() + 1)),
        );
        Err(Error::IdentifierTooLong {
            len: derived.len(),
            derived,
            name: self.to_string(),
            max: MAX_IDENTIFIER_LEN,
            max_table,
        })
    }

    /// The table name itself (without the schema).
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The schema given to [`in_schema`](Self::in_schema), if any.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// `object` (one of the derived names) as SQL: quoted, and qualified with the schema when
    /// there is one. Safe because both names admit only `[a-z0-9_]`.
    pub(crate) fn qualified(&self, object: &str) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", Self::quoted(schema), Self::quoted(object)),
            None => Self::quoted(object),
        }
    }

    /// `object` as text for `to_regclass` / `to_regproc` (`schema.object`, or `object`).
    pub(crate) fn regclass(&self, object: &str) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{object}"),
            None => object.to_owned(),
        }
    }

    /// `schema.` or nothing, for channel names.
    fn schema_prefix(&self) -> String {
        self.schema
            .as_ref()
            .map_or_else(String::new, |s| format!("{s}."))
    }

    /// The dead-letter table, `T_dead`.
    pub fn dead_letter(&self) -> String {
        format!("{}_dead", self.name)
    }

    /// The partial index serving the ready-rows fetch branch, `T_pending_idx`.
    pub fn pending_index(&self) -> String {
        format!("{}_pending_idx", self.name)
    }

    /// The partial index serving the expired-lease reclaim branch, `T_lease_idx`.
    pub fn lease_index(&self) -> String {
        format!("{}_lease_idx", self.name)
    }

    /// The CHECK constraint tying `acquired_token` and `acquired_at` together, `T_lease_check`.
    pub fn lease_check(&self) -> String {
        format!("{}_lease_check", self.name)
    }

    /// The cooperative members registry, `T_members`.
    pub fn members(&self) -> String {
        format!("{}_members", self.name)
    }

    /// The partial index of rows by holder, `T_member_idx`.
    pub fn member_index(&self) -> String {
        format!("{}_member_idx", self.name)
    }

    /// Partition `slot` of the outbox table, `T_p0`, `T_p1` or `T_p2`: the generations that
    /// rotation fills in turn and reclaims with `TRUNCATE` (see `docs/design/storage.md`).
    ///
    /// # Panics
    ///
    /// If `slot` is not below [`GENERATIONS`](crate::GENERATIONS).
    pub fn partition(&self, slot: usize) -> String {
        assert!(slot < GENERATIONS, "slot {slot} out of range");
        format!("{}_p{slot}", self.name)
    }

    /// The sequence whose value names the generation publishes write to, `T_gen`.
    pub fn generation_sequence(&self) -> String {
        format!("{}_gen", self.name)
    }

    /// The function behind a single-row outcome, `T_ack`, `T_retry`, `T_bury` (dead letter),
    /// `T_renew` or `T_release` (schema version 5).
    pub(crate) fn outcome_function(&self, outcome: OutcomeFunction) -> String {
        let suffix = match outcome {
            OutcomeFunction::Ack => "ack",
            OutcomeFunction::Retry => "retry",
            OutcomeFunction::Bury => "bury",
            OutcomeFunction::Renew => "renew",
            OutcomeFunction::Release => "release",
        };
        format!("{}_{suffix}", self.name)
    }

    /// The topic log, `T_log` (schema version 6): every message published to a topic, once,
    /// whatever the number of its subscriptions. Partitioned like the outbox table into
    /// generations reclaimed by `TRUNCATE` (see [`log_partition`](Self::log_partition)).
    pub fn log(&self) -> String {
        format!("{}_log", self.name)
    }

    /// Partition `slot` of the topic log, `T_log_p0`, `T_log_p1` or `T_log_p2`.
    ///
    /// # Panics
    ///
    /// If `slot` is not below [`GENERATIONS`](crate::GENERATIONS).
    pub fn log_partition(&self, slot: usize) -> String {
        assert!(slot < GENERATIONS, "slot {slot} out of range");
        format!("{}_log_p{slot}", self.name)
    }

    /// The index a subscription reads the log through, `T_log_idx` on `(topic, xid, id)`.
    pub fn log_index(&self) -> String {
        format!("{}_log_idx", self.name)
    }

    /// The sequence of topic message ids, `T_log_id`.
    pub fn log_ids(&self) -> String {
        format!("{}_log_id", self.name)
    }

    /// The sequence whose value names the log generation publishes write to, `T_log_gen`.
    pub fn log_generation_sequence(&self) -> String {
        format!("{}_log_gen", self.name)
    }

    /// The subscriptions and their cursors, `T_subs`.
    pub fn subscriptions(&self) -> String {
        format!("{}_subs", self.name)
    }

    /// The batches subscriptions have handed out, `T_batches`: each receive appends one, and
    /// a subscription's newest batch holds its cursor. Partitioned like the topic log into
    /// generations reclaimed by `TRUNCATE` (see [`batch_partition`](Self::batch_partition)).
    pub fn batches(&self) -> String {
        format!("{}_batches", self.name)
    }

    /// Partition `slot` of the batches, `T_batches_p0`, `T_batches_p1` or `T_batches_p2`.
    ///
    /// # Panics
    ///
    /// If `slot` is not below [`GENERATIONS`](crate::GENERATIONS).
    pub fn batch_partition(&self, slot: usize) -> String {
        assert!(slot < GENERATIONS, "slot {slot} out of range");
        format!("{}_batches_p{slot}", self.name)
    }

    /// The index of batches by subscription and receive order, `T_batch_idx` on
    /// `(sub, seq)`: a subscription's cursor is its last entry.
    pub fn batch_index(&self) -> String {
        format!("{}_batch_idx", self.name)
    }

    /// The index of batches by lease token, `T_batch_token_idx`.
    pub fn batch_token_index(&self) -> String {
        format!("{}_batch_token_idx", self.name)
    }

    /// The sequence ordering a subscription's batches, `T_batch_seq`.
    pub fn batch_sequence(&self) -> String {
        format!("{}_batch_seq", self.name)
    }

    /// The name the schema-v7 batches table takes while the v8 migration copies it.
    pub(crate) fn legacy_batches(&self) -> String {
        format!("{}_batches_v7", self.name)
    }

    /// A subscription's exceptions, `T_held`: messages retried, released, taken back from an
    /// expired batch, or dead-lettered, each a row of its own.
    pub fn held(&self) -> String {
        format!("{}_held", self.name)
    }

    /// The index of held messages by subscription and due time, `T_held_idx`.
    pub fn held_index(&self) -> String {
        format!("{}_held_idx", self.name)
    }

    /// The idempotency keys topics remember, `T_keys`.
    pub fn keys(&self) -> String {
        format!("{}_keys", self.name)
    }

    /// The index of idempotency keys by age (for forgetting them), `T_keys_idx`.
    pub fn keys_index(&self) -> String {
        format!("{}_keys_idx", self.name)
    }

    /// The function a subscription receives through, `T_receive`.
    pub(crate) fn receive_function(&self) -> String {
        format!("{}_receive", self.name)
    }

    /// The function that settles received messages, `T_settle`.
    pub(crate) fn settle_function(&self) -> String {
        format!("{}_settle", self.name)
    }

    /// The function that counts each queue's messages by state, `T_depths`.
    pub(crate) fn depths_function(&self) -> String {
        format!("{}_depths", self.name)
    }

    /// The index of dead letters by queue and time, `T_dead_idx`.
    pub fn dead_index(&self) -> String {
        format!("{}_dead_idx", self.name)
    }

    /// The name the schema-v3 table takes while the v4 migration copies it, `T_v3`.
    pub(crate) fn legacy(&self) -> String {
        format!("{}_v3", self.name)
    }

    /// The table recording applied migrations, `T_migrations`.
    pub fn migrations(&self) -> String {
        format!("{}_migrations", self.name)
    }

    /// The LISTEN/NOTIFY channel, `postbox_T` (`postbox_S.T` in schema `S`). Publishers
    /// notify it with the queue name as payload.
    pub fn channel(&self) -> String {
        format!("{CHANNEL_PREFIX}{}{}", self.schema_prefix(), self.name)
    }

    /// The journal table, `T_events`.
    pub fn events(&self) -> String {
        format!("{}_events", self.name)
    }

    /// The journal's live channel, `postbox_ev_T` (`postbox_ev_S.T` in schema `S`).
    pub fn journal_channel(&self) -> String {
        format!(
            "{JOURNAL_CHANNEL_PREFIX}{}{}",
            self.schema_prefix(),
            self.name
        )
    }

    /// `name` quoted as an SQL identifier. Safe because validation admits only `[a-z0-9_]`.
    pub(crate) fn quoted(name: &str) -> String {
        debug_assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        );
        format!("\"{name}\"")
    }

    fn derived_names(&self) -> Vec<String> {
        let mut names: Vec<String> = SUFFIXES
            .iter()
            .map(|s| format!("{}{s}", self.name))
            .collect();
        names.push(self.channel());
        names.push(self.journal_channel());
        names.push(self.name.clone());
        names
    }
}

impl Default for TableName {
    fn default() -> Self {
        TableName {
            name: "postbox".to_owned(),
            schema: None,
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.schema_prefix())?;
        f.write_str(&self.name)
    }
}

impl fmt::Debug for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

impl TryFrom<&str> for TableName {
    type Error = Error;

    fn try_from(value: &str) -> Result<Self> {
        TableName::new(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_identifiers() {
        for name in ["postbox", "orders_outbox", "_x", "t1"] {
            assert_eq!(TableName::new(name).expect(name).as_str(), name);
        }
    }

    #[test]
    fn rejects_bad_characters() {
        for name in [
            "",
            "1abc",
            "Orders",
            "a-b",
            "a b",
            "a\"b",
            "x;drop table y",
            "ü",
        ] {
            let err = TableName::new(name).expect_err(name);
            assert!(
                matches!(err, Error::InvalidTableName { .. }),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn longest_accepted_name_has_every_derived_name_within_63_bytes() {
        let name = "a".repeat(MAX_TABLE_LEN);
        let table = TableName::new(name.as_str()).expect("fits");
        for derived in table.derived_names() {
            assert!(derived.len() <= MAX_IDENTIFIER_LEN, "{derived}");
        }
        assert_eq!(
            table.derived_names().iter().map(String::len).max(),
            Some(MAX_IDENTIFIER_LEN),
            "the limit is tight: one byte more would overflow"
        );
    }

    #[test]
    fn one_byte_too_long_names_the_limit() {
        let name = "a".repeat(MAX_TABLE_LEN + 1);
        let err = TableName::new(name).expect_err("too long");
        let text = err.to_string();
        assert!(
            matches!(
                err,
                Error::IdentifierTooLong {
                    len: 64,
                    max: 63,
                    ..
                }
            ),
            "{text}"
        );
        assert!(text.contains("63"), "{text}");
        assert!(
            text.contains(&format!("at most {MAX_TABLE_LEN} bytes")),
            "{text}"
        );
    }

    #[test]
    fn a_schema_is_validated_and_counted_in_the_channel_limit() {
        let t = TableName::in_schema("billing", "jobs").expect("valid");
        assert_eq!(t.qualified(&t.dead_letter()), r#""billing"."jobs_dead""#);
        assert_eq!(t.regclass(&t.dead_letter()), "billing.jobs_dead");
        assert_eq!(t.journal_channel(), "postbox_ev_billing.jobs");
        assert_eq!(format!("{t:?}"), r#""billing.jobs""#);
        for bad in ["", "Billing", "1s", "a b", "pg_temp", "x\"; --"] {
            assert!(TableName::in_schema(bad, "jobs").is_err(), "{bad:?}");
        }
        // The journal channel, postbox_ev_<schema>.<table>, must fit in 63 bytes too.
        let schema = "s".repeat(40);
        let fits = "t".repeat(63 - "postbox_ev_".len() - 41);
        TableName::in_schema(schema.as_str(), fits.as_str()).expect("fits exactly");
        let err =
            TableName::in_schema(schema.as_str(), format!("{fits}t")).expect_err("one too long");
        assert!(
            matches!(err, Error::IdentifierTooLong { max_table, .. } if max_table == fits.len()),
            "{err}"
        );
        assert_eq!(
            TableName::new("jobs").expect("valid").qualified("jobs"),
            r#""jobs""#
        );
    }

    #[test]
    fn derived_names() {
        let t = TableName::new("jobs").expect("valid");
        assert_eq!(t.dead_letter(), "jobs_dead");
        assert_eq!(t.pending_index(), "jobs_pending_idx");
        assert_eq!(t.lease_index(), "jobs_lease_idx");
        assert_eq!(t.migrations(), "jobs_migrations");
        assert_eq!(t.channel(), "postbox_jobs");
        assert_eq!(TableName::quoted("jobs"), "\"jobs\"");
    }
}
