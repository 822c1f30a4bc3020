//! Cooperative consumers: members of one group share a queue with no duplicate delivery.
//!
//! Run with: `cargo run --example coop_consumers` (three members as tasks), or
//! `cargo run --example coop_consumers -- --processes 3` (three members as OS processes on one
//! database). Both print how many messages each member handled and check that the union is
//! exactly what was published, with no message twice; they exit non-zero otherwise.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use postbox::prelude::*;
use postbox::{Delivery, HandlerError, Member, Message, PgBackend, Subscriber, SubscriberOptions};

const MESSAGES: usize = 1_000;

/// Runs one member until the outbox is empty; returns the ids it handled.
async fn run_member(backend: PgBackend, name: String) -> anyhow::Result<Vec<i64>> {
    let handled = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = Arc::clone(&handled);
    let handler = move |d: Delivery| {
        let sink = Arc::clone(&sink);
        async move {
            tokio::time::sleep(Duration::from_millis(1)).await; // a little work
            sink.lock().push(d.id);
            Ok::<(), HandlerError>(())
        }
    };
    let options = SubscriberOptions::new(["jobs"])
        .subconsumer(Member::new("example", name)?)
        .dead_interval(Duration::from_secs(30))
        .max_workers(4)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200));
    let sub = Subscriber::new(backend.clone(), options, handler)?.spawn();
    // Stop once every message has been acked by someone.
    while !backend.messages(Some("jobs")).await?.is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sub.shutdown().await?;
    let ids = handled.lock().clone();
    Ok(ids)
}

/// Checks the union of what members handled against what was published.
fn check(published: &[i64], per_member: &BTreeMap<String, Vec<i64>>) -> anyhow::Result<()> {
    let mut seen = HashSet::new();
    let mut twice = 0;
    for (name, ids) in per_member {
        println!("member {name}: {} message(s)", ids.len());
        for id in ids {
            if !seen.insert(*id) {
                twice += 1;
            }
        }
    }
    let missing = published.iter().filter(|id| !seen.contains(id)).count();
    println!(
        "published {}, handled {}, twice {twice}, missing {missing}",
        published.len(),
        seen.len()
    );
    if twice > 0 || missing > 0 || seen.len() != published.len() {
        bail!("the members did not split the messages exactly");
    }
    if per_member.values().any(Vec::is_empty) {
        println!("note: a member got nothing (the others were faster)");
    }
    Ok(())
}

async fn publish(backend: &PgBackend) -> anyhow::Result<Vec<i64>> {
    let mut tx = backend.begin().await?;
    let ids = backend
        .publish_batch(
            &mut tx,
            (0..MESSAGES)
                .map(|i| Message::new("jobs", i.to_string()))
                .collect(),
        )
        .await?;
    backend.commit(tx).await?;
    Ok(ids)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };

    // Child process: one member against the database the parent created.
    if let (Some(name), Some(url)) = (flag("--member"), flag("--url")) {
        let pool = postbox::sqlx::PgPool::connect(&url).await?;
        let ids = run_member(PgBackend::new(pool), name).await?;
        println!("{}", serde_json::to_string(&ids)?);
        return Ok(());
    }

    let processes: usize = flag("--processes")
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(0);
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let published = publish(&backend).await?;
    let names: Vec<String> = (1..=processes.max(3)).map(|i| format!("m{i}")).collect();
    let mut per_member = BTreeMap::new();

    if processes > 0 {
        println!("{processes} member processes on {}", db.database());
        let exe = std::env::current_exe()?;
        let children: Vec<_> = names
            .iter()
            .map(|name| {
                tokio::process::Command::new(&exe)
                    .args(["--member", name, "--url", db.url()])
                    .output()
            })
            .collect();
        for (name, child) in names.iter().zip(children) {
            let out = child.await?;
            if !out.status.success() {
                bail!(
                    "member {name} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let line = String::from_utf8(out.stdout)?;
            let ids: Vec<i64> = serde_json::from_str(line.trim()).context("member output")?;
            per_member.insert(name.clone(), ids);
        }
    } else {
        println!("{} member tasks on {}", names.len(), db.database());
        let tasks: Vec<_> = names
            .iter()
            .map(|name| tokio::spawn(run_member(backend.clone(), name.clone())))
            .collect();
        for (name, task) in names.iter().zip(tasks) {
            per_member.insert(name.clone(), task.await??);
        }
    }

    check(&published, &per_member)?;
    db.close().await?;
    Ok(())
}
