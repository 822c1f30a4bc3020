//! The Postgres backend: [`PgBackend`] (also at the crate root), its [`PgEngine`], the roles
//! an outbox needs ([`Access`], [`PgBackend::grants`]), storage rotation ([`Rotation`]), and
//! its DDL ([`ddl`], [`SCHEMA_VERSION`]).
//!
//! | capability | |
//! |---|---|
//! | LISTEN/NOTIFY wake-ups | yes ([`PgEngine::listener`]) |
//! | publish in the caller's transaction | yes (`&mut PgConnection`) |
//! | persistent fetch connection | yes ([`PgEngine::connect`], [`PgEngine::fetch`]) |
//! | fault injection | no (kill connections with `pg_terminate_backend`) |
//! | time control | pin the statements' clock with the `test-util` feature |

mod coop;
mod depth;
mod engine;
mod fetch;
mod grants;
mod inspect;
mod journal;
mod limit;
mod outcome;
mod publish;
mod redrive;
mod rotate;
mod schema;
mod session;
mod statements;
mod topic;
mod topic_batches;
mod topic_receive;

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

pub use engine::{FETCH_APPLICATION_NAME, LISTEN_APPLICATION_NAME, PgEngine};
pub use grants::Access;
pub use rotate::{Rotation, RotationReport};
pub use schema::{SCHEMA_VERSION, ddl, ddl_of_version};
use statements::Statements;

use crate::consume::{Consume, RetryParams};
use crate::coop::{Coop, CoopReceive, Member, MemberInfo, Registration, Unregister};
use crate::error::Result;
use crate::fetch::FetchParams;
use crate::inspect::{DeadLetter, Inspect, StoredMessage};
use crate::journal::{JournalEvent, JournalLive, JournalStore, LiveEvents};
use crate::message::{Delivery, Lease, Message, MessageId};
use crate::publish::Publish;
use crate::store::Store;
use crate::table::TableName;

/// The Postgres backend: one outbox table in the database behind a [`PgPool`].
///
/// Cheap to clone (the statements and the pool are shared). Every statement is rendered once,
/// at construction, from the validated [`TableName`].
///
/// # Storage
///
/// The outbox table is partitioned into three *generations*. Publishes fill one at a time;
/// fetches and outcomes work on all of them; a background rotation (started by fetches, at
/// most once a second) closes the current generation when it reaches 1 MiB or 10 s and
/// reclaims drained ones with `TRUNCATE`, copying the few rows still in them forward with
/// their leases. Space therefore comes back without VACUUM, and a session that holds an old
/// snapshot open (which stops VACUUM) no longer makes fetches slower and the table bigger
/// with every message. [`rotation`](Self::rotation) tunes it; [`rotate`](Self::rotate) runs
/// one now. The design, with its guarantees and figures, is in `docs/design/storage.md`.
///
/// ```no_run
/// # async fn f() -> Result<(), postbox_core::Error> {
/// use postbox_core::prelude::*;
/// use postbox_core::{FetchParams, Message, PgBackend, TableName};
///
/// let pool = sqlx::PgPool::connect("postgres://localhost/app").await?;
/// let backend = PgBackend::with_table(pool.clone(), TableName::new("orders_outbox")?);
/// backend.migrate().await?;
///
/// let mut tx = pool.begin().await?;
/// backend.publish(&mut tx, Message::new("emails", "hello")).await?;
/// tx.commit().await?;
///
/// for delivery in backend.fetch(&FetchParams::new(["emails"], 10)).await? {
///     // ... handle it, idempotently ...
///     backend.ack(delivery.lease()).await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgBackend {
    engine: PgEngine,
    journal_live: JournalLive,
}

/// State shared by a backend, its clones and its engine.
pub(crate) struct Inner {
    pub(crate) pool: PgPool,
    pub(crate) table: TableName,
    pub(crate) sql: Statements,
    pub(crate) rotator: Arc<rotate::Rotator>,
    /// Whether statements are prepared and named (false behind a transaction pooler); shared
    /// with the rotator.
    pub(crate) persistent: Arc<std::sync::atomic::AtomicBool>,
    now: parking_lot::RwLock<Option<DateTime<Utc>>>,
    #[cfg(feature = "test-util")]
    listen_faults: std::sync::atomic::AtomicU32,
}

impl Inner {
    /// Consumes one injected LISTEN failure, if any are left.
    #[cfg(feature = "test-util")]
    pub(crate) fn take_listen_fault(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.listen_faults
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Whether to prepare statements (named, cached per connection): not behind a
    /// transaction pooler, where the next transaction may run on another server session.
    pub(crate) fn persistent(&self) -> bool {
        self.persistent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A pool connection for one statement outside a caller's transaction: in a transaction
    /// of its own behind a transaction pooler (see [`session`]).
    pub(crate) async fn session(&self) -> Result<session::Session, sqlx::Error> {
        session::Session::on(&self.pool, self.persistent()).await
    }

    /// The clock to bind: `None` means the database's `now()`.
    pub(crate) fn now(&self) -> Option<DateTime<Utc>> {
        *self.now.read()
    }
}

impl PgBackend {
    /// A backend for the default outbox table, `postbox`.
    pub fn new(pool: PgPool) -> Self {
        Self::with_table(pool, TableName::default())
    }

    /// A backend for the outbox table `table`.
    pub fn with_table(pool: PgPool, table: TableName) -> Self {
        let persistent = Arc::new(std::sync::atomic::AtomicBool::new(true));
        PgBackend {
            engine: PgEngine {
                inner: Arc::new(Inner {
                    sql: Statements::new(&table),
                    rotator: Arc::new(rotate::Rotator::new(
                        pool.clone(),
                        &table,
                        Arc::clone(&persistent),
                    )),
                    persistent,
                    pool,
                    table,
                    now: parking_lot::RwLock::new(None),
                    #[cfg(feature = "test-util")]
                    listen_faults: std::sync::atomic::AtomicU32::new(0),
                }),
                limit: None,
            },
            journal_live: JournalLive::default(),
        }
    }

    /// Runs behind a pooler in transaction mode (PgBouncer `pool_mode = transaction`), where
    /// consecutive transactions of one client connection may run on different server
    /// sessions, so nothing may rely on session state:
    ///
    /// - every statement is unnamed (`persistent(false)`): a prepared statement would be
    ///   created on one server session and looked for, or collide with another client's of
    ///   the same name, on the next;
    /// - every statement outside the caller's transaction runs in a transaction of its own:
    ///   sqlx parses and binds a statement in two exchanges, and between them the pooler may
    ///   hand the server session to another client, whose unnamed statement the bind would
    ///   then meet. Publish in a transaction ([`begin`](Publish::begin)) for the same reason;
    /// - [`engine`](Consume::engine) returns `None`, so a `Subscriber` keeps no dedicated
    ///   connection and no `LISTEN` (it polls, fetching through the pool in transactions that
    ///   set their plan settings with `SET LOCAL`);
    /// - a journal tail cannot `LISTEN` either: it reads the journal every 100 ms.
    ///
    /// The cost: each statement is planned on every call (the fetch plans in 1.5-3.6 ms, more
    /// than it runs), outcomes and reads take two more round trips (`BEGIN`, `COMMIT`), and
    /// wake-ups wait for the poll. Settings for PgBouncer:
    /// `pool_mode = transaction`, and `ignore_startup_parameters = extra_float_digits` (sqlx
    /// sends it). In session mode (`pool_mode = session`) the default settings work.
    /// Applies to this backend and every clone of it, earlier ones included: set it before
    /// use.
    pub fn transaction_pooler(self) -> Self {
        self.shared()
            .persistent
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// What the journal's live channel carries for this backend and its later clones: by
    /// default [`JournalLive::Stored`], announcements of stored events that readers resolve
    /// from the table, because any role that can connect can `LISTEN` and `NOTIFY` on the
    /// channel. [`JournalLive::Payloads`] sends each event whole when it is published (before
    /// it is stored): lower latency for streamed answers, for databases whose every role is
    /// trusted. Writers and readers may differ: a `Stored` reader treats whatever arrives as a
    /// reason to read the table, a `Payloads` reader resolves announcements from the table too.
    pub fn journal_live(mut self, live: JournalLive) -> Self {
        self.journal_live = live;
        self
    }

    /// Caps the fetch statements that run at once: those of every subscriber built from this
    /// backend or its later clones, and direct [`fetch`](Consume::fetch) and
    /// [`coop_receive`](Coop::coop_receive) calls. The rest wait in the process, in FIFO
    /// order, and then run on their own connections. Unlimited by default.
    ///
    /// Every subscriber sends its fetches on its own connection, outside the pool, so without
    /// a cap eight subscribers in one process (eight cooperative members, say) can run eight
    /// fetch statements at once. On a server with fewer cores than that, concurrent
    /// `SKIP LOCKED` scans of the same queue head cost more per row than queued ones (they
    /// lock and skip each other's freshly leased rows and contend for the same pages), and
    /// total throughput falls as subscribers are added. A cap near the server's core count,
    /// with a pool of about as many connections for the outcome writes, keeps it flat: see
    /// `BENCHMARKS.md` (coop) for the figures.
    ///
    /// Set it before cloning the backend for your subscribers: clones made earlier keep the
    /// cap they were made with. The cap holds within one process; separate processes each
    /// have their own.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), sqlx::Error> {
    /// use std::num::NonZeroUsize;
    /// use postbox_core::PgBackend;
    ///
    /// // A 2-core server: two fetches at a time, and a pool of two for the outcome writes.
    /// let pool = sqlx::postgres::PgPoolOptions::new()
    ///     .max_connections(2)
    ///     .connect_lazy("postgres://localhost/app")?;
    /// let backend = PgBackend::new(pool).max_concurrent_fetches(NonZeroUsize::new(2).unwrap());
    /// # Ok(()) }
    /// ```
    pub fn max_concurrent_fetches(mut self, max: NonZeroUsize) -> Self {
        self.engine.limit = Some(Arc::new(limit::FetchLimit::new(
            max.get(),
            &self.shared().table,
        )));
        self
    }

    /// How many fetches wait for a permit now (always 0 without
    /// [`max_concurrent_fetches`](Self::max_concurrent_fetches)). A value that stays above 0
    /// means the cap binds: subscribers spend time queued instead of in the database.
    pub fn fetches_waiting(&self) -> usize {
        self.engine
            .limit
            .as_ref()
            .map_or(0, |limit| limit.waiting())
    }

    /// A pool transaction that keeps generic plans, as the runtime's fetch connection does
    /// (see [`PgEngine::connect`]), for this transaction only: the pool connection is handed
    /// back as it was.
    async fn generic_plans_tx(&self) -> Result<Transaction<'static, Postgres>> {
        let mut tx = self.shared().pool.begin().await?;
        sqlx::raw_sql(engine::GENERIC_PLANS_LOCAL)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    fn shared(&self) -> &Inner {
        &self.engine.inner
    }

    /// The Postgres engine itself, for its connections ([`PgEngine::connect`],
    /// [`PgEngine::listener`]); [`Consume::engine`] gives the runtime's view of it, and `None`
    /// behind a transaction pooler.
    pub fn pg_engine(&self) -> &PgEngine {
        &self.engine
    }

    /// The pool statements run on (publishes run on the caller's connection instead).
    pub fn pool(&self) -> &PgPool {
        &self.shared().pool
    }

    /// Creates or upgrades the schema: the outbox table with its lease CHECK, partitioned into
    /// the generations `T_p0`, `T_p1` and `T_p2` (with the sequence `T_gen` naming the one
    /// publishes go to), the `T_pending_idx` and `T_lease_idx` partial indexes, the dead-letter
    /// table `T_dead`, the members and journal tables, and the functions the single-row
    /// outcomes call (`T_ack`, `T_retry`, `T_bury`, `T_renew`, `T_release`, schema version 5:
    /// their plans never read a generation sequentially).
    ///
    /// Upgrading a schema-v3 table to v4 copies its rows into generation 0 in the migration's
    /// transaction, keeping ids, counters and leases (a lease taken before the upgrade still
    /// settles). Publishes and fetches wait for that transaction; on a large table, run it at a
    /// quiet moment. See `docs/design/storage.md`.
    ///
    /// Idempotent and safe to run concurrently: versions are recorded in `T_migrations` and
    /// applied under an advisory lock, in one transaction. Returns the versions applied now.
    /// When the schema is current it only reads `T_migrations` (no lock, no DDL), so a service
    /// role without `CREATE` can call it at start-up once an owner has migrated. It refuses to
    /// adopt tables of the outbox's names that it did not create.
    ///
    /// # Errors
    ///
    /// [`Error::ForeignObjects`](crate::Error::ForeignObjects) when `T`, `T_dead`,
    /// `T_members` or `T_events` exist but no migration is recorded;
    /// [`Error::Migration`](crate::Error::Migration) naming the failing version, or
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: one transaction under a transaction-level advisory lock, so a dropped call
    /// applies every pending version or none, and holds no lock afterwards; call again.
    pub async fn migrate(&self) -> Result<Vec<i32>> {
        schema::migrate(
            &self.shared().pool,
            &self.shared().table,
            &self.shared().sql,
        )
        .await
    }

    /// Applies the migrations up to `version` only, to build an older schema (to test an
    /// upgrade from it). Production code calls [`migrate`](Self::migrate).
    ///
    /// **Feature:** `test-util`.
    ///
    /// # Errors
    ///
    /// As [`migrate`](Self::migrate).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: one transaction under a transaction-level advisory lock, so a dropped call
    /// applies every pending version or none, and holds no lock afterwards; call again.
    #[cfg(feature = "test-util")]
    pub async fn migrate_to(&self, version: i32) -> Result<Vec<i32>> {
        schema::migrate_to(
            &self.shared().pool,
            &self.shared().table,
            &self.shared().sql,
            version,
        )
        .await
    }

    /// Checks that the table, its columns, indexes, CHECK constraint, dead-letter table,
    /// outcome functions and schema version are all present.
    ///
    /// # Errors
    ///
    /// [`Error::Schema`](crate::Error::Schema) listing each missing item by name, or
    /// [`Error::Database`](crate::Error::Database).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only; drop the call and make it again.
    pub async fn validate_schema(&self) -> Result<()> {
        let problems = schema::problems(
            &self.shared().pool,
            &self.shared().table,
            &self.shared().sql,
        )
        .await?;
        schema::check(&self.shared().table, problems)
    }

    /// Pins the clock every statement reads (`now()`), or unpins it with `None`.
    ///
    /// Production code never calls this: statements bind `NULL` and read the database clock.
    /// Tests use it to expire leases or pass retry delays without waiting.
    ///
    /// **Feature:** `test-util`.
    #[cfg(feature = "test-util")]
    pub fn set_now(&self, now: Option<DateTime<Utc>>) {
        *self.engine.inner.now.write() = now;
    }

    /// Makes the next `n` calls of [`PgEngine::listener`] fail, as if the server (or a pooler)
    /// refused LISTEN.
    ///
    /// **Feature:** `test-util`.
    #[cfg(feature = "test-util")]
    pub fn fail_next_listens(&self, n: u32) {
        self.engine
            .inner
            .listen_faults
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }
}

impl fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgBackend")
            .field("table", &self.shared().table)
            .field("pool_size", &self.shared().pool.size())
            .field(
                "max_concurrent_fetches",
                &self.engine.limit.as_ref().map(|l| l.max()),
            )
            .finish_non_exhaustive()
    }
}

impl Store for PgBackend {
    fn table(&self) -> &TableName {
        &self.shared().table
    }

    fn is_closed(&self) -> bool {
        self.shared().pool.is_closed()
    }
}

#[async_trait]
impl Publish for PgBackend {
    type Conn = PgConnection;
    type Tx = Transaction<'static, Postgres>;

    async fn begin(&self) -> Result<Self::Tx> {
        Ok(self.shared().pool.begin().await?)
    }

    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        Ok(tx.commit().await?)
    }

    async fn rollback(&self, tx: Self::Tx) -> Result<()> {
        Ok(tx.rollback().await?)
    }

    async fn publish(&self, conn: &mut PgConnection, message: Message) -> Result<MessageId> {
        PgBackend::publish(self, conn, message).await
    }

    async fn publish_batch(
        &self,
        conn: &mut PgConnection,
        messages: Vec<Message>,
    ) -> Result<Vec<MessageId>> {
        PgBackend::publish_batch(self, conn, messages).await
    }
}

#[async_trait]
impl Consume for PgBackend {
    fn engine(&self) -> Option<&dyn crate::engine::Engine> {
        // Behind a transaction pooler (unnamed statements) there is no session to keep.
        self.shared()
            .persistent()
            .then_some(&self.engine as &dyn crate::engine::Engine)
    }

    async fn fetch(&self, params: &FetchParams) -> Result<Vec<Delivery>> {
        params.validate()?;
        // The permit first: a fetch waiting for one must not hold a pool connection.
        let _permit = self.engine.permit().await;
        let mut tx = self.generic_plans_tx().await?;
        let deliveries = self.shared().fetch_on(&mut tx, params).await?;
        tx.commit().await?;
        Ok(deliveries)
    }

    async fn ack(&self, lease: Lease) -> Result<bool> {
        self.ack_one(lease).await
    }

    async fn ack_batch(&self, leases: &[Lease]) -> Result<Vec<MessageId>> {
        self.ack_many(leases).await
    }

    async fn retry(&self, lease: Lease, params: RetryParams) -> Result<bool> {
        self.retry_one(lease, params).await
    }

    async fn dead_letter(&self, lease: Lease, reason: &str) -> Result<bool> {
        self.dead_letter_one(lease, reason).await
    }

    async fn renew_lease(&self, lease: Lease) -> Result<bool> {
        self.renew_one(lease).await
    }

    async fn release(&self, lease: Lease) -> Result<bool> {
        self.release_one(lease).await
    }
}

#[async_trait]
impl Inspect for PgBackend {
    async fn messages(&self, queue: Option<&str>) -> Result<Vec<StoredMessage>> {
        self.list_messages(queue).await
    }

    async fn dead_letters(&self, queue: Option<&str>) -> Result<Vec<DeadLetter>> {
        self.list_dead_letters(queue).await
    }
}

#[async_trait]
impl Coop for PgBackend {
    async fn coop_register(&self, member: &Member, queues: &[String]) -> Result<Registration> {
        self.coop_register_one(member, queues).await
    }

    async fn coop_receive(&self, params: &CoopReceive) -> Result<Vec<Delivery>> {
        params.validate()?;
        let _permit = self.engine.permit().await;
        let mut tx = self.generic_plans_tx().await?;
        let deliveries = self.shared().coop_receive_on(&mut tx, params).await?;
        tx.commit().await?;
        Ok(deliveries)
    }

    async fn coop_touch(&self, member: &Member) -> Result<bool> {
        self.coop_touch_one(member).await
    }

    async fn coop_unregister(&self, member: &Member, handling: Unregister) -> Result<bool> {
        self.coop_unregister_one(member, handling).await
    }

    async fn coop_members(&self, group: &str) -> Result<Vec<MemberInfo>> {
        self.coop_members_of(group).await
    }
}

#[async_trait]
impl JournalStore for PgBackend {
    async fn journal_append(&self, events: &[JournalEvent]) -> Result<()> {
        events.iter().try_for_each(JournalEvent::validate)?;
        self.journal_append_rows(events).await
    }

    async fn journal_latest_seq(&self, stream: &str) -> Result<Option<i64>> {
        JournalEvent::validate_stream(stream)?;
        self.journal_latest(stream).await
    }

    async fn journal_read_after(
        &self,
        stream: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<JournalEvent>> {
        JournalEvent::validate_stream(stream)?;
        self.journal_read(stream, after, limit).await
    }

    async fn journal_publish(&self, event: &JournalEvent) -> Result<()> {
        event.validate()?;
        self.journal_notify(event).await
    }

    async fn journal_publish_batch(&self, events: &[JournalEvent]) -> Result<()> {
        events.iter().try_for_each(JournalEvent::validate)?;
        self.journal_notify_many(events).await
    }

    async fn journal_subscribe(&self, stream: &str) -> Result<LiveEvents> {
        JournalEvent::validate_stream(stream)?;
        self.journal_listen(stream).await
    }
}
