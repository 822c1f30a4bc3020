//! A backend wrapper that hides the engine: the runtime must take its polling-only path.

use postbox::coop::{CoopReceive, MemberInfo, Registration, Unregister};
use postbox::engine::Engine;
use postbox::prelude::*;
use postbox::sqlx::{PgConnection, Postgres, Transaction};
use postbox::{
    Delivery, FetchParams, Lease, Member, Message, MessageId, PgBackend, RetryParams, TableName,
};

/// `PgBackend` without an engine: the capabilities the subscriber runtime bounds on
/// (`Consume`, `Coop`, `Topics`, and `Publish` under `Topics`), each call passed through but
/// [`Consume::engine`], which answers `None`.
pub struct NoEngine(pub PgBackend);

impl Store for NoEngine {
    fn table(&self) -> &TableName {
        self.0.table()
    }
}

#[async_trait::async_trait]
impl Publish for NoEngine {
    type Conn = PgConnection;
    type Tx = Transaction<'static, Postgres>;
    async fn begin(&self) -> postbox::Result<Self::Tx> {
        self.0.begin().await
    }
    async fn commit(&self, tx: Self::Tx) -> postbox::Result<()> {
        self.0.commit(tx).await
    }
    async fn rollback(&self, tx: Self::Tx) -> postbox::Result<()> {
        self.0.rollback(tx).await
    }
    async fn publish(&self, conn: &mut PgConnection, m: Message) -> postbox::Result<MessageId> {
        self.0.publish(conn, m).await
    }
    async fn publish_batch(
        &self,
        conn: &mut PgConnection,
        m: Vec<Message>,
    ) -> postbox::Result<Vec<MessageId>> {
        self.0.publish_batch(conn, m).await
    }
}

#[async_trait::async_trait]
impl Consume for NoEngine {
    fn engine(&self) -> Option<&dyn Engine> {
        None
    }
    async fn fetch(&self, p: &FetchParams) -> postbox::Result<Vec<Delivery>> {
        Consume::fetch(&self.0, p).await
    }
    async fn ack(&self, l: Lease) -> postbox::Result<bool> {
        self.0.ack(l).await
    }
    async fn ack_batch(&self, l: &[Lease]) -> postbox::Result<Vec<MessageId>> {
        self.0.ack_batch(l).await
    }
    async fn retry(&self, l: Lease, p: RetryParams) -> postbox::Result<bool> {
        self.0.retry(l, p).await
    }
    async fn dead_letter(&self, l: Lease, r: &str) -> postbox::Result<bool> {
        self.0.dead_letter(l, r).await
    }
    async fn renew_lease(&self, l: Lease) -> postbox::Result<bool> {
        self.0.renew_lease(l).await
    }
    async fn release(&self, l: Lease) -> postbox::Result<bool> {
        self.0.release(l).await
    }
}

#[async_trait::async_trait]
impl Coop for NoEngine {
    async fn coop_register(&self, m: &Member, q: &[String]) -> postbox::Result<Registration> {
        self.0.coop_register(m, q).await
    }
    async fn coop_receive(&self, p: &CoopReceive) -> postbox::Result<Vec<Delivery>> {
        self.0.coop_receive(p).await
    }
    async fn coop_touch(&self, m: &Member) -> postbox::Result<bool> {
        self.0.coop_touch(m).await
    }
    async fn coop_unregister(&self, m: &Member, h: Unregister) -> postbox::Result<bool> {
        self.0.coop_unregister(m, h).await
    }
    async fn coop_members(&self, g: &str) -> postbox::Result<Vec<MemberInfo>> {
        self.0.coop_members(g).await
    }
}

#[async_trait::async_trait]
impl postbox::Topics for NoEngine {
    async fn subscribe(
        &self,
        topic: &str,
        name: &str,
    ) -> postbox::Result<postbox::topic::Subscribed> {
        self.0.subscribe(topic, name).await
    }
    async fn unsubscribe(
        &self,
        name: &str,
        pending: postbox::topic::Unsubscribe,
    ) -> postbox::Result<bool> {
        self.0.unsubscribe(name, pending).await
    }
    async fn subscriptions(
        &self,
        topic: Option<&str>,
    ) -> postbox::Result<Vec<postbox::topic::SubscriptionInfo>> {
        self.0.subscriptions(topic).await
    }
    async fn publish_to_topics(
        &self,
        conn: &mut PgConnection,
        m: Vec<Message>,
    ) -> postbox::Result<Vec<postbox::topic::Published>> {
        self.0.publish_to_topics(conn, m).await
    }
    async fn receive(&self, params: &postbox::topic::Receive) -> postbox::Result<Vec<Delivery>> {
        self.0.receive(params).await
    }
    async fn settle(
        &self,
        leases: &[Lease],
        settlement: postbox::topic::Settlement,
    ) -> postbox::Result<Vec<MessageId>> {
        self.0.settle(leases, settlement).await
    }
    async fn subscription_dead_letters(
        &self,
        name: &str,
    ) -> postbox::Result<Vec<postbox::DeadLetter>> {
        self.0.subscription_dead_letters(name).await
    }
}
