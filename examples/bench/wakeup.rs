//! `wakeup`: commit-to-handler latency of an idle subscriber, with LISTEN and polling only,
//! timed from the `commit` call (so the commit's round trip is included).

use std::time::{Duration, Instant};

use anyhow::Context;
use postbox::runtime::SubscriberEvent;
use postbox::{Delivery, HandlerError, Message, Subscriber, SubscriberOptions};
use serde_json::{Value, json};

use crate::Ctx;
use crate::stats::latency;
use postbox::prelude::*;

/// Per round: the subscriber idles (2 s, long enough for polling to back off as on a quiet
/// production queue), then one message is published and committed.
pub(crate) async fn wakeup(ctx: &Ctx) -> anyhow::Result<Value> {
    let idle = if ctx.smoke {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(2)
    };
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let mut out = serde_json::Map::new();
    let variants = [
        ("listen", SubscriberOptions::new(["wake"]), ctx.rounds),
        (
            "polling_only",
            SubscriberOptions::new(["wake"]).wake_ups(false),
            ctx.rounds.min(10),
        ),
    ];
    for (name, options, rounds) in variants {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let handler = move |_d: Delivery| {
            let _ = tx.send(Instant::now());
            std::future::ready(Ok::<(), HandlerError>(()))
        };
        let settings = format!("{options:?}");
        let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();
        let mut events = sub.events();
        let mut samples = Vec::with_capacity(rounds);
        let mut after_return = Vec::with_capacity(rounds);
        let mut commit_rtt = Vec::with_capacity(rounds);
        for round in 0..rounds {
            ctx.progress(format!("wakeup {name}: round {}/{rounds}", round + 1));
            tokio::time::sleep(idle).await;
            let mut tx = backend.begin().await?;
            backend.publish(&mut tx, Message::new("wake", "x")).await?;
            // From the commit call, not its return: the notification can reach the
            // subscriber (and its handler run) before `commit` returns here, so timing from
            // the return would under-count. This includes the commit's own round trip.
            let committing = Instant::now();
            backend.commit(tx).await?;
            let committed = Instant::now();
            let handled = rx.recv().await.context("handler gone")?;
            samples.push(handled.saturating_duration_since(committing));
            after_return.push(handled.saturating_duration_since(committed));
            commit_rtt.push(committed - committing);
            // Let the ack land before the next round.
            while !matches!(events.recv().await?, SubscriberEvent::Handled { .. }) {}
        }
        sub.shutdown().await?;
        let mut summary = latency(&mut samples);
        summary["settings"] = Value::String(settings);
        summary["idle_before_publish_ms"] = (idle.as_millis() as u64).into();
        // The same latency timed from `commit` returning (it can be 0: the handler may run
        // before the commit's reply reaches us), and the commit round trip itself: the true
        // commit instant lies between the two.
        for (key, mut values) in [
            ("from_commit_return", after_return),
            ("commit_round_trip", commit_rtt),
        ] {
            let mut s = latency(&mut values);
            if let Some(map) = s.as_object_mut() {
                map.remove("samples_ms");
            }
            summary[key] = s;
        }
        out.insert(name.into(), summary);
    }
    db.close().await?;
    Ok(json!({ "workload": "wakeup", "commit_to_handler_ms": out }))
}
