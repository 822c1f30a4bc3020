//! Every SQL statement of one outbox table, rendered once from its validated name.
//!
//! SQL templates live as constants beside the code that binds them (`schema.rs`, `publish.rs`,
//! `fetch.rs`, `outcome.rs`); they name objects with placeholders such as `{table}`. This is
//! the only place that turns a string into SQL sqlx will run: it substitutes identifiers
//! derived from a [`TableName`], which admits only `[a-z0-9_]`, and quotes them. Values, the
//! notification channel included, are always bound parameters.

use std::sync::Arc;

use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

use super::{coop, depth, fetch, inspect, journal, outcome, publish, redrive, schema, topic};
use crate::table::{OutcomeFunction, TableName};

/// Substitutes the identifier placeholders of `template` for `table`, after repeating each
/// per-generation block (see [`each_generation`]).
pub(crate) fn render(template: &str, table: &TableName) -> String {
    // Relations, sequences and functions are named with the schema when there is one; index
    // and constraint names are not (Postgres creates them in their table's schema), nor the
    // new name of a RENAME.
    let q = |name: String| table.qualified(&name);
    let bare = |name: String| TableName::quoted(&name);
    let function = |f| table.qualified(&table.outcome_function(f));
    each_generation(template)
        .replace("{table}", &q(table.as_str().to_owned()))
        .replace("{dead_idx}", &bare(table.dead_index()))
        .replace("{dead}", &q(table.dead_letter()))
        .replace("{migrations}", &q(table.migrations()))
        .replace("{pending_idx}", &bare(table.pending_index()))
        .replace("{lease_idx}", &bare(table.lease_index()))
        .replace("{lease_check}", &bare(table.lease_check()))
        .replace("{members}", &q(table.members()))
        .replace("{member_idx}", &bare(table.member_index()))
        .replace("{events}", &q(table.events()))
        .replace("{p0}", &q(table.partition(0)))
        .replace("{p1}", &q(table.partition(1)))
        .replace("{p2}", &q(table.partition(2)))
        .replace("{gen_seq}", &q(table.generation_sequence()))
        .replace("{legacy_name}", &bare(table.legacy()))
        .replace("{legacy}", &q(table.legacy()))
        .replace("{ack_fn}", &function(OutcomeFunction::Ack))
        .replace("{retry_fn}", &function(OutcomeFunction::Retry))
        .replace("{bury_fn}", &function(OutcomeFunction::Bury))
        .replace("{renew_fn}", &function(OutcomeFunction::Renew))
        .replace("{release_fn}", &function(OutcomeFunction::Release))
        .replace("{depths_fn}", &q(table.depths_function()))
        .replace("{log}", &q(table.log()))
        .replace("{log_p0}", &q(table.log_partition(0)))
        .replace("{log_p1}", &q(table.log_partition(1)))
        .replace("{log_p2}", &q(table.log_partition(2)))
        .replace("{log_idx}", &bare(table.log_index()))
        .replace("{log_id}", &q(table.log_ids()))
        .replace("{log_gen}", &q(table.log_generation_sequence()))
        .replace("{subs}", &q(table.subscriptions()))
        .replace("{batches_v7_name}", &bare(table.legacy_batches()))
        .replace("{batches_v7}", &q(table.legacy_batches()))
        .replace("{batches_p0}", &q(table.batch_partition(0)))
        .replace("{batches_p1}", &q(table.batch_partition(1)))
        .replace("{batches_p2}", &q(table.batch_partition(2)))
        .replace("{batches}", &q(table.batches()))
        .replace("{batch_idx}", &bare(table.batch_index()))
        .replace("{batch_token_idx}", &bare(table.batch_token_index()))
        .replace("{batch_seq}", &q(table.batch_sequence()))
        .replace(
            "{expiry_check_ms}",
            &crate::topic::EXPIRED_BATCH_CHECK.as_millis().to_string(),
        )
        .replace("{held}", &q(table.held()))
        .replace("{held_idx}", &bare(table.held_index()))
        .replace("{keys}", &q(table.keys()))
        .replace("{keys_idx}", &bare(table.keys_index()))
        .replace("{receive_fn}", &q(table.receive_function()))
        .replace("{settle_fn}", &q(table.settle_function()))
        .replace("{generations}", &crate::table::GENERATIONS.to_string())
}

/// Opens a block repeated once per generation, its copies joined by `UNION ALL`.
const EACH_GENERATION: &str = "{each_generation}\n";
/// Closes it.
const END_EACH_GENERATION: &str = "\n{end_each_generation}";

/// Repeats every block between `{each_generation}` and `{end_each_generation}` (each marker on
/// a line of its own) once per generation, with `{part}` standing for that generation's
/// partition placeholder (`{p0}`, ...) and `{slot}` for its number, the copies joined by
/// `UNION ALL` lines at the block's indentation. A statement reads each generation by name
/// (see `fetch.rs`) without writing the same scan out once per partition.
fn each_generation(template: &str) -> String {
    let mut out = String::with_capacity(template.len() * 2);
    let mut rest = template;
    while let Some(start) = rest.find(EACH_GENERATION) {
        let body_start = start + EACH_GENERATION.len();
        let Some(len) = rest[body_start..].find(END_EACH_GENERATION) else {
            break;
        };
        let body = &rest[body_start..body_start + len];
        let indent: String = body.chars().take_while(|c| *c == ' ').collect();
        let copies: Vec<String> = (0..crate::table::GENERATIONS)
            .map(|slot| {
                body.replace("{part}", &format!("{{p{slot}}}"))
                    .replace("{slot}", &slot.to_string())
            })
            .collect();
        out.push_str(&rest[..start]);
        out.push_str(&copies.join(&format!("\n{indent}UNION ALL\n")));
        rest = &rest[body_start + len + END_EACH_GENERATION.len()..];
    }
    out.push_str(rest);
    out
}

/// Rendered statement text, cheap to clone (shared).
pub(crate) fn sql(template: &str, table: &TableName) -> SqlStr {
    AssertSqlSafe(Arc::<str>::from(render(template, table))).into_sql_str()
}

/// The statements of one outbox table.
#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) publish: SqlStr,
    pub(crate) publish_batch: SqlStr,
    pub(crate) fetch: SqlStr,
    pub(crate) ack: SqlStr,
    pub(crate) ack_batch: SqlStr,
    pub(crate) retry: SqlStr,
    pub(crate) dead_letter: SqlStr,
    pub(crate) renew: SqlStr,
    pub(crate) release: SqlStr,
    pub(crate) messages: SqlStr,
    pub(crate) dead_letters: SqlStr,
    pub(crate) requeue_dead: SqlStr,
    pub(crate) depths: SqlStr,
    pub(crate) purge_dead: SqlStr,
    pub(crate) requeue_subscription_dead: SqlStr,
    pub(crate) purge_subscription_dead: SqlStr,
    pub(crate) coop_receive: SqlStr,
    pub(crate) coop_register: SqlStr,
    pub(crate) coop_touch: SqlStr,
    pub(crate) coop_lock_member: SqlStr,
    pub(crate) coop_held: SqlStr,
    pub(crate) coop_requeue_exhausted: SqlStr,
    pub(crate) coop_requeue: SqlStr,
    pub(crate) coop_delete_member: SqlStr,
    pub(crate) coop_members: SqlStr,
    pub(crate) journal_append: SqlStr,
    pub(crate) journal_append_announce: SqlStr,
    pub(crate) journal_latest: SqlStr,
    pub(crate) journal_taken: SqlStr,
    pub(crate) journal_read_after: SqlStr,
    pub(crate) topic_publish: SqlStr,
    pub(crate) subscribe: SqlStr,
    pub(crate) topic_duplicates: SqlStr,
    pub(crate) subscription_topic: SqlStr,
    pub(crate) lock_subscription: SqlStr,
    pub(crate) unsubscribe: SqlStr,
    pub(crate) subscriptions: SqlStr,
    pub(crate) receive: SqlStr,
    pub(crate) settle: SqlStr,
    pub(crate) topic_dead_letters: SqlStr,
    pub(crate) create_migrations: SqlStr,
    pub(crate) applied_migrations: SqlStr,
    pub(crate) record_migration: SqlStr,
    pub(crate) migrations: Vec<(i32, &'static str, SqlStr)>,
}

impl Statements {
    pub(crate) fn new(table: &TableName) -> Self {
        Statements {
            publish: sql(publish::PUBLISH, table),
            publish_batch: sql(publish::PUBLISH_BATCH, table),
            fetch: sql(fetch::FETCH, table),
            ack: sql(outcome::ACK, table),
            ack_batch: sql(outcome::ACK_BATCH, table),
            retry: sql(outcome::RETRY, table),
            dead_letter: sql(outcome::DEAD_LETTER, table),
            renew: sql(outcome::RENEW, table),
            release: sql(outcome::RELEASE, table),
            messages: sql(inspect::MESSAGES, table),
            dead_letters: sql(inspect::DEAD_LETTERS, table),
            requeue_dead: sql(redrive::REQUEUE_DEAD, table),
            depths: sql(depth::DEPTHS, table),
            purge_dead: sql(redrive::PURGE_DEAD, table),
            requeue_subscription_dead: sql(redrive::REQUEUE_SUBSCRIPTION_DEAD, table),
            purge_subscription_dead: sql(redrive::PURGE_SUBSCRIPTION_DEAD, table),
            coop_receive: sql(coop::COOP_RECEIVE, table),
            coop_register: sql(coop::COOP_REGISTER, table),
            coop_touch: sql(coop::COOP_TOUCH, table),
            coop_lock_member: sql(coop::LOCK_MEMBER, table),
            coop_held: sql(coop::HELD, table),
            coop_requeue_exhausted: sql(coop::REQUEUE_EXHAUSTED, table),
            coop_requeue: sql(coop::REQUEUE, table),
            coop_delete_member: sql(coop::DELETE_MEMBER, table),
            coop_members: sql(coop::MEMBERS, table),
            journal_append: sql(journal::APPEND, table),
            journal_append_announce: sql(journal::APPEND_ANNOUNCE, table),
            journal_latest: sql(journal::LATEST, table),
            journal_taken: sql(journal::TAKEN, table),
            journal_read_after: sql(journal::READ_AFTER, table),
            topic_publish: sql(topic::PUBLISH, table),
            subscribe: sql(topic::SUBSCRIBE, table),
            topic_duplicates: sql(topic::DUPLICATES, table),
            subscription_topic: sql(topic::SUBSCRIPTION_TOPIC, table),
            lock_subscription: sql(topic::LOCK_SUBSCRIPTION, table),
            unsubscribe: sql(topic::UNSUBSCRIBE, table),
            subscriptions: sql(topic::SUBSCRIPTIONS, table),
            receive: sql(topic::RECEIVE, table),
            settle: sql(topic::SETTLE, table),
            topic_dead_letters: sql(topic::DEAD_LETTERS, table),
            create_migrations: sql(schema::CREATE_MIGRATIONS, table),
            applied_migrations: sql(schema::APPLIED_MIGRATIONS, table),
            record_migration: sql(schema::RECORD_MIGRATION, table),
            migrations: schema::MIGRATIONS
                .iter()
                .map(|m| (m.version, m.description, sql(m.sql, table)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_generation_repeats_a_block_per_partition() {
        let t = "(\n{each_generation}\n  SELECT * FROM {part} AS g{slot}\n{end_each_generation}\n)";
        assert_eq!(
            each_generation(t),
            "(\n  SELECT * FROM {p0} AS g0\n  UNION ALL\n  SELECT * FROM {p1} AS g1\n  \
             UNION ALL\n  SELECT * FROM {p2} AS g2\n)"
        );
        assert_eq!(each_generation("no block"), "no block");
    }

    #[test]
    fn render_quotes_every_identifier() {
        let t = TableName::new("jobs").expect("valid");
        assert_eq!(
            render(
                "{table} {dead} {migrations} {pending_idx} {lease_idx} {lease_check}",
                &t
            ),
            r#""jobs" "jobs_dead" "jobs_migrations" "jobs_pending_idx" "jobs_lease_idx" "jobs_lease_check""#
        );
    }

    #[test]
    fn no_placeholder_survives_rendering() {
        let t = TableName::new("jobs").expect("valid");
        let s = Statements::new(&t);
        let all = [
            &s.publish,
            &s.publish_batch,
            &s.fetch,
            &s.ack,
            &s.ack_batch,
            &s.retry,
            &s.dead_letter,
            &s.renew,
            &s.release,
            &s.create_migrations,
            &s.applied_migrations,
            &s.record_migration,
        ];
        for stmt in all.into_iter().chain(s.migrations.iter().map(|m| &m.2)) {
            assert!(!stmt.as_str().contains('{'), "{}", stmt.as_str());
        }
    }
}
