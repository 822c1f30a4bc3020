//! Least privilege: each kind of access from `PgBackend::grants`, given to a role of its own,
//! does its work (publish, a `Subscriber`, cooperative members, the journal, inspection) and
//! is refused everything else.

mod support;

use anyhow::Result;
use postbox::coop::CoopReceive;
use postbox::journal::{
    BatchedJournalWriter, JournalEvent, TailOptions, WriterOptions, snapshot_and_tail,
};
use postbox::pg::{Access, Rotation};
use postbox::prelude::*;
use postbox::sqlx::{self, AssertSqlSafe, PgPool};
use postbox::testkit::{PgFixture, within};
use postbox::{
    DeadFilter, Delivery, Depth, FetchParams, HandlerError, Member, Message, PgBackend, Redrive,
    Subscriber, SubscriberOptions,
};

/// A login role holding exactly `access` on the fixture's outbox, and a pool connected as it.
struct Role {
    name: String,
    pool: PgPool,
}

impl Role {
    async fn new(db: &PgFixture, access: &[Access]) -> Result<Role> {
        let (name, pool) = support::login_role(db, "", 4).await?;
        for a in access {
            let grants = db.backend().grants(*a, &name).await?;
            sqlx::raw_sql(AssertSqlSafe(grants))
                .execute(db.pool())
                .await?;
        }
        Ok(Role { name, pool })
    }

    fn backend(&self) -> PgBackend {
        PgBackend::new(self.pool.clone()).rotation(Rotation::new().automatic(false))
    }

    async fn drop_in(self, db: &PgFixture) -> Result<()> {
        support::drop_role(db, &self.name, self.pool).await
    }
}

/// `result` failed because the role lacks a privilege.
fn denied<T: std::fmt::Debug>(what: &str, result: postbox::Result<T>) {
    match result {
        Err(e) if e.to_string().contains("permission denied") => {}
        other => panic!("{what}: expected permission denied, got {other:?}"),
    }
}

fn payload(n: i64) -> postbox::journal::EventPayload {
    let mut map = serde_json::Map::new();
    map.insert("n".into(), n.into());
    map
}

#[tokio::test]
async fn each_access_does_its_work_and_nothing_else() -> Result<()> {
    let db = postbox::testkit::postgres().await?;

    // Publisher: publishes, and checks the schema at start-up; nothing else.
    let publisher = Role::new(&db, &[Access::Publisher]).await?;
    let p = publisher.backend();
    assert_eq!(
        p.migrate().await?,
        Vec::<i32>::new(),
        "migrate() when current"
    );
    let mut tx = publisher.pool.begin().await?;
    p.publish_batch(
        &mut tx,
        (0..40).map(|i| Message::new("q", i.to_string())).collect(),
    )
    .await?;
    p.publish(&mut tx, Message::new("coop", "for the member"))
        .await?;
    tx.commit().await?;
    denied(
        "publisher fetch",
        p.fetch(&FetchParams::new(["q"], 1)).await,
    );
    denied("publisher inspect", p.messages(Some("q")).await);
    denied(
        "publisher journal",
        p.journal_append(&[JournalEvent::new("s", 1, "delta", payload(1))])
            .await,
    );

    // Consumer: a Subscriber drains the queue; a rotation by hand works; no publishing.
    let consumer = Role::new(&db, &[Access::Consumer]).await?;
    let c = consumer.backend();
    let (tx_ids, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |d: Delivery| {
        let _ = tx_ids.send(d.id);
        std::future::ready(Ok::<(), HandlerError>(()))
    };
    let sub = Subscriber::new(c.clone(), SubscriberOptions::new(["q"]), handler)?.spawn();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 40 {
        let id = within(
            "the consumer's subscriber to handle 40 messages",
            handled.recv(),
        )
        .await
        .expect("handler channel open");
        seen.insert(id);
    }
    within("shutdown", sub.shutdown()).await?;
    // Rotation under the consumer's grants: advance past the drained generation, then
    // reclaim it (lock, count, move, TRUNCATE).
    let rotating = PgBackend::new(consumer.pool.clone()).rotation(
        Rotation::new()
            .automatic(false)
            .rotate_bytes(0)
            .max_age(std::time::Duration::ZERO),
    );
    let mut truncated = 0;
    for _ in 0..6 {
        let report = rotating.rotate().await?;
        assert!(report.busy.is_empty(), "{report:?}");
        truncated += report.truncated.len();
    }
    assert!(truncated > 0, "a generation was reclaimed");
    let mut tx = consumer.pool.begin().await?;
    denied(
        "consumer publish",
        c.publish(&mut tx, Message::new("q", "x")).await,
    );
    drop(tx);
    denied(
        "consumer coop",
        c.coop_register(&Member::new("g", "m")?, &["coop".to_owned()])
            .await,
    );
    denied("consumer journal", c.journal_read_after("s", 0, 10).await);

    // Topics: the consumer subscribes, the publisher publishes, the consumer receives and
    // settles; neither can do the other's part.
    use postbox::Topics;
    use postbox::topic::{Receive, Settlement};
    c.subscribe("events", "svc").await?;
    let mut tx = publisher.pool.begin().await?;
    let published = p
        .publish_to_topics(
            &mut tx,
            vec![Message::new("events", "a"), Message::new("events", "b")],
        )
        .await?;
    tx.commit().await?;
    let got = c.receive(&Receive::new("svc", 10)).await?;
    assert_eq!(
        got.iter().map(|d| d.id).collect::<Vec<_>>(),
        published.iter().map(|p| p.id()).collect::<Vec<_>>()
    );
    let leases: Vec<_> = got.iter().map(Delivery::lease).collect();
    assert_eq!(c.settle(&leases, Settlement::Ack).await?.len(), 2);
    // The topic log's rotation under the consumer's grants: it moves on, then truncates the
    // passed generation of the log and the settled one of the batches, carrying the cursor.
    let (mut log_truncated, mut batches_truncated) = (0, 0);
    for _ in 0..6 {
        let report = rotating.rotate_topics().await?;
        assert!(report.busy.is_empty(), "{report:?}");
        log_truncated += report.truncated.len();
        batches_truncated += report.batches_truncated.len();
    }
    assert!(
        log_truncated > 0 && batches_truncated > 0,
        "the log and the batches were reclaimed"
    );
    denied(
        "publisher receive",
        p.receive(&Receive::new("svc", 1)).await,
    );
    denied("publisher subscribe", p.subscribe("events", "mine").await);
    let mut tx = consumer.pool.begin().await?;
    denied(
        "consumer publish to a topic",
        c.publish_to_topics(&mut tx, vec![Message::new("events", "x")])
            .await,
    );
    drop(tx);

    // Coop member: registers, receives and acks.
    let member = Role::new(&db, &[Access::CoopMember]).await?;
    let m = member.backend();
    let me = Member::new("g", "m")?;
    m.coop_register(&me, &["coop".to_owned()]).await?;
    let got = m
        .coop_receive(&CoopReceive::new(me.clone(), ["coop"], 10))
        .await?;
    assert_eq!(got.len(), 1);
    assert!(m.ack(got[0].lease()).await?);
    m.coop_unregister(&me, postbox::coop::Unregister::Fail)
        .await?;

    // Journal writer and reader.
    let writer = Role::new(&db, &[Access::JournalWriter]).await?;
    let reader = Role::new(&db, &[Access::JournalReader]).await?;
    let w = BatchedJournalWriter::new(writer.backend(), "s", WriterOptions::default());
    let mut tail = snapshot_and_tail(reader.backend(), "s", 0, TailOptions::default()).await?;
    w.record(1, "delta", payload(1)).await?;
    w.record(2, "done", payload(2)).await?;
    let stats = w.close().await?;
    assert_eq!((stats.written, stats.dropped), (2, 0));
    let mut read = Vec::new();
    while let Some(event) = within("the reader's tail", tail.next()).await {
        read.push(event?.seq);
    }
    assert_eq!(read, [1, 2]);
    denied(
        "reader append",
        reader
            .backend()
            .journal_append(&[JournalEvent::new("s", 3, "delta", payload(3))])
            .await,
    );
    denied(
        "writer fetch",
        writer.backend().fetch(&FetchParams::new(["q"], 1)).await,
    );

    // Inspector: reads everything, changes nothing.
    let inspector = Role::new(&db, &[Access::Inspector]).await?;
    let i = inspector.backend();
    assert!(i.messages(Some("q")).await?.is_empty(), "all drained");
    assert!(i.dead_letters(None).await?.is_empty());
    assert!(
        i.queue_depths(None).await?.is_empty(),
        "the depths function runs as the caller"
    );
    assert_eq!(i.journal_read_after("s", 0, 10).await?.len(), 2);
    assert_eq!(i.subscriptions(None).await?[0].backlog, 0);
    denied(
        "inspector receive",
        i.receive(&postbox::topic::Receive::new("svc", 1)).await,
    );
    denied(
        "inspector fetch",
        i.fetch(&FetchParams::new(["q"], 1)).await,
    );
    // A queue's redrive is the owner's (it deletes dead letters and writes messages); a
    // subscription's needs what settling does, so a consumer has it.
    assert!(
        c.requeue_subscription_dead("svc", &DeadFilter::all())
            .await?
            .is_empty()
    );
    assert!(
        c.purge_subscription_dead("svc", &DeadFilter::all())
            .await?
            .is_empty()
    );
    denied(
        "inspector subscription requeue",
        i.requeue_subscription_dead("svc", &DeadFilter::all()).await,
    );
    for (who, backend) in [("inspector", &i), ("consumer", &c)] {
        denied(
            &format!("{who} requeue"),
            backend.requeue_dead(&DeadFilter::all()).await,
        );
        denied(
            &format!("{who} purge"),
            backend.purge_dead(&DeadFilter::all()).await,
        );
    }

    // Admin: owns the outbox (so later migrations can alter it) and may create another.
    let admin = Role::new(&db, &[Access::Admin]).await?;
    admin.backend().migrate().await?;
    admin.backend().validate_schema().await?;
    assert!(
        admin
            .backend()
            .requeue_dead(&DeadFilter::all())
            .await?
            .is_empty()
    );
    assert!(
        admin
            .backend()
            .purge_dead(&DeadFilter::all())
            .await?
            .is_empty()
    );
    let owner: String =
        sqlx::query_scalar("SELECT tableowner::text FROM pg_tables WHERE tablename = 'postbox_p1'")
            .fetch_one(db.pool())
            .await?;
    assert_eq!(owner, admin.name);
    let second = PgBackend::with_table(admin.pool.clone(), postbox::TableName::new("admin_box")?);
    assert_eq!(
        second.migrate().await?.len(),
        postbox::pg::SCHEMA_VERSION as usize
    );

    for role in [
        publisher, consumer, member, writer, reader, inspector, admin,
    ] {
        role.drop_in(&db).await?;
    }
    db.close().await?;
    Ok(())
}

/// Role names reach the SQL only validated and quoted.
#[tokio::test]
async fn a_hostile_role_name_is_refused() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    for bad in ["x\"; DROP TABLE postbox; --", "Admin", "", "a b"] {
        let err = db
            .backend()
            .grants(Access::Consumer, bad)
            .await
            .expect_err(bad);
        assert!(err.to_string().contains("role name"), "{bad}: {err}");
    }
    db.close().await?;
    Ok(())
}
