//! Cooperative subconsumers: split, takeover, heartbeat, unregister, registration.

use std::collections::HashSet;
use std::time::Duration;

use postbox_core::coop::{CoopReceive, Registration, Unregister};
use postbox_core::{Delivery, Error, Lease, Member, Message, MessageState, RetryParams};

use super::{Harness, ids, publish};
use crate::time::TimeControl;
use postbox_core::prelude::*;

const DEAD: Duration = Duration::from_secs(60);

fn member(name: &str) -> Member {
    Member::new("billing", name).expect("valid member")
}

async fn receive<B: Coop>(b: &B, name: &str, max: u32) -> Vec<Delivery> {
    b.coop_receive(&CoopReceive::new(member(name), ["q"], max).dead_interval(DEAD))
        .await
        .expect("coop receive")
}

fn leases(ds: &[Delivery]) -> Vec<Lease> {
    ds.iter().map(Delivery::lease).collect()
}

/// Members receiving in turns split the messages: every member gets some, none twice.
pub async fn coop_members_split_the_work_without_duplicates<H: Harness>(h: &H) {
    let b = h.backend();
    let published = publish(
        b,
        (0..30).map(|i| Message::new("q", i.to_string())).collect(),
    )
    .await;
    let names = ["a", "b", "c"];
    let mut got: Vec<Vec<i64>> = vec![Vec::new(); 3];
    let mut batches = 0;
    for round in 0.. {
        // 30 messages in batches of up to 4: a backend that keeps handing rows out fails here
        // instead of looping forever.
        assert!(round < 40, "still receiving after {round} rounds: {got:?}");
        let mut any = false;
        for (i, name) in names.iter().enumerate() {
            let batch = receive(b, name, 4).await;
            assert!(
                batch
                    .iter()
                    .all(|d| d.acquired_by.as_deref() == Some(&*format!("billing/{name}")))
            );
            any |= !batch.is_empty();
            batches += usize::from(!batch.is_empty());
            got[i].extend(ids(&batch));
        }
        if !any {
            break;
        }
    }
    assert!(batches >= 8, "several batches: {batches}");
    assert!(
        got.iter().all(|g| !g.is_empty()),
        "every member got some: {got:?}"
    );
    let all: Vec<i64> = got.concat();
    let distinct: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "no id twice");
    assert_eq!(
        distinct,
        published.into_iter().collect::<HashSet<_>>(),
        "union = published"
    );
}

/// A member silent past the dead interval loses its rows to a sibling under a new token; its
/// late outcomes change nothing.
pub async fn coop_a_dead_member_is_taken_over_and_fenced<H: Harness>(h: &H) {
    let b = h.backend();
    publish(
        b,
        (0..3).map(|i| Message::new("q", i.to_string())).collect(),
    )
    .await;
    let a = receive(b, "a", 10).await;
    assert_eq!(a.len(), 3);
    b.advance(DEAD + Duration::from_secs(1))
        .await
        .expect("advance");
    let taken = receive(b, "b", 10).await;
    assert_eq!(ids(&taken), ids(&a), "b takes over a's batch");
    assert_ne!(taken[0].token, a[0].token, "under a new batch token");
    assert!(!b.ack(a[0].lease()).await.expect("ack"), "a's late ack");
    assert!(
        !b.retry(a[1].lease(), RetryParams::new(Duration::ZERO))
            .await
            .expect("retry")
    );
    assert_eq!(b.ack_batch(&leases(&taken)).await.expect("ack").len(), 3);
    assert!(b.messages(None).await.expect("messages").is_empty());
}

/// A touched member is alive: its rows are not taken, however old.
pub async fn coop_touch_keeps_a_slow_member_alive<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "x")]).await;
    let a = receive(b, "a", 1).await;
    b.advance(Duration::from_secs(40)).await.expect("advance");
    assert!(b.coop_touch(&member("a")).await.expect("touch"));
    b.advance(Duration::from_secs(40)).await.expect("advance");
    assert!(
        receive(b, "b", 10).await.is_empty(),
        "80 s since receive, 40 s since touch"
    );
    assert!(b.ack(a[0].lease()).await.expect("ack"));
    assert!(
        !b.coop_touch(&member("stranger")).await.expect("touch"),
        "unknown member"
    );
}

/// A receive rewrites the member's heartbeat only once it is older than
/// [`CoopReceive::get_heartbeat_refresh`] (a quarter of the dead interval, at most 500 ms), so a
/// busy member does not leave one dead registry row version per receive.
pub async fn coop_a_receive_refreshes_only_a_stale_heartbeat<H: Harness>(h: &H) {
    let b = h.backend();
    let params = CoopReceive::new(member("a"), ["q"], 1).dead_interval(DEAD);
    assert_eq!(params.get_heartbeat_refresh(), Duration::from_millis(500));
    let last_active = || async {
        let members = b.coop_members("billing").await.expect("members");
        assert_eq!(members.len(), 1, "one member: {members:?}");
        members[0].last_active
    };
    receive(b, "a", 1).await;
    let first = last_active().await;
    b.advance(Duration::from_millis(100))
        .await
        .expect("advance");
    receive(b, "a", 1).await;
    assert_eq!(last_active().await, first, "~100 ms old: not rewritten");
    b.advance(Duration::from_millis(400))
        .await
        .expect("advance");
    receive(b, "a", 1).await;
    let refreshed = last_active().await;
    assert!(
        refreshed - first >= chrono::Duration::milliseconds(500),
        "over 500 ms old: refreshed to now ({first} -> {refreshed})"
    );
    assert!(
        b.coop_touch(&member("a")).await.expect("touch"),
        "a touch always writes"
    );
}

/// A live member's rows are not taken when their lease ages past the lease TTL.
pub async fn coop_a_live_members_rows_survive_lease_age<H: Harness>(h: &H) {
    let b = h.backend();
    // A dead sibling exists, so the takeover branch is active: it must still spare `a`.
    b.coop_register(&member("zombie"), &["q".to_owned()])
        .await
        .expect("register");
    b.advance(DEAD + Duration::from_secs(1))
        .await
        .expect("advance");
    publish(b, vec![Message::new("q", "x")]).await;
    let a = receive(b, "a", 1).await;
    b.advance(Duration::from_secs(45)).await.expect("advance");
    assert!(
        receive(b, "b", 10).await.is_empty(),
        "45 s > 30 s lease, < 60 s dead interval"
    );
    assert!(b.ack(a[0].lease()).await.expect("ack"));
}

/// Unregister with `Fail` refuses while rows are held; a second unregister reports `false`.
pub async fn coop_unregister_fail_refuses_while_holding<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "1"), Message::new("q", "2")]).await;
    let a = receive(b, "a", 10).await;
    let err = b
        .coop_unregister(&member("a"), Unregister::Fail)
        .await
        .expect_err("holds rows");
    assert!(
        matches!(err, Error::MemberHoldsMessages { held: 2, .. }),
        "{err}"
    );
    assert_eq!(b.ack_batch(&leases(&a)).await.expect("ack").len(), 2);
    assert!(
        b.coop_unregister(&member("a"), Unregister::Fail)
            .await
            .expect("unregister")
    );
    assert!(
        !b.coop_unregister(&member("a"), Unregister::Fail)
            .await
            .expect("again")
    );
    assert!(b.coop_members("billing").await.expect("members").is_empty());
}

/// Unregister with `Requeue` gives rows back for retry, dead-lettering those at max attempts.
pub async fn coop_unregister_requeue_returns_rows_or_dead_letters_them<H: Harness>(h: &H) {
    let b = h.backend();
    publish(b, vec![Message::new("q", "1"), Message::new("q", "2")]).await;
    let a = receive(b, "a", 1).await;
    let c = receive(b, "c", 1).await;
    assert!(
        b.coop_unregister(&member("a"), Unregister::Requeue { max_attempts: 5 })
            .await
            .expect("unregister")
    );
    let back = b.messages(None).await.expect("messages");
    let requeued = back
        .iter()
        .find(|m| m.id == a[0].id)
        .expect("a's row is back");
    assert_eq!(
        (requeued.state, requeued.attempts),
        (MessageState::Ready, 1)
    );
    assert_eq!(requeued.last_error.as_deref(), Some("member unregistered"));

    assert!(
        b.coop_unregister(&member("c"), Unregister::Requeue { max_attempts: 1 })
            .await
            .expect("unregister")
    );
    let dead = b.dead_letters(None).await.expect("dead");
    assert_eq!((dead.len(), dead[0].id, dead[0].attempts), (1, c[0].id, 1));
    assert!(
        dead[0].reason.contains("member unregistered"),
        "{}",
        dead[0].reason
    );
    assert!(
        !b.coop_unregister(&member("c"), Unregister::Requeue { max_attempts: 1 })
            .await
            .expect("again")
    );
}

/// Registration is idempotent; receiving registers too.
pub async fn coop_registration_is_idempotent_and_automatic<H: Harness>(h: &H) {
    let b = h.backend();
    let queues = vec!["q".to_owned()];
    assert_eq!(
        b.coop_register(&member("a"), &queues)
            .await
            .expect("register"),
        Registration::New
    );
    assert_eq!(
        b.coop_register(&member("a"), &queues)
            .await
            .expect("register"),
        Registration::Existing
    );
    publish(b, vec![Message::new("q", "1")]).await;
    receive(b, "auto", 5).await;
    let members = b.coop_members("billing").await.expect("members");
    let summary: Vec<(String, i64, Vec<String>)> = members
        .into_iter()
        .map(|m| (m.name, m.held, m.queues))
        .collect();
    assert_eq!(
        summary,
        [("a".into(), 0, queues.clone()), ("auto".into(), 1, queues)]
    );
    assert!(b.coop_members("other").await.expect("members").is_empty());
}

/// Of many concurrent first registrations of one member, exactly one is new.
pub async fn coop_concurrent_first_registrations_yield_one_new<H: Harness>(h: &H) {
    let b = h.backend();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move { b.coop_register(&member("racer"), &["q".to_owned()]).await })
        })
        .collect();
    let mut new = 0;
    for task in tasks {
        if task.await.expect("join").expect("register") == Registration::New {
            new += 1;
        }
    }
    assert_eq!(new, 1);
}

/// An ack covers exactly the rows delivered: the rest of the queue is untouched.
pub async fn coop_acks_cover_exactly_the_delivered_rows<H: Harness>(h: &H) {
    let b = h.backend();
    publish(
        b,
        (0..10).map(|i| Message::new("q", i.to_string())).collect(),
    )
    .await;
    let a = receive(b, "a", 3).await;
    assert_eq!(a.len(), 3);
    assert_eq!(b.ack_batch(&leases(&a)).await.expect("ack").len(), 3);
    let left = b.messages(None).await.expect("messages");
    assert_eq!(left.len(), 7);
    assert!(left.iter().all(|m| m.state == MessageState::Ready));
}
