//! A streamed answer: a writer journals 200 events while a reader disconnects and reconnects
//! twice, resuming from the last seq it saw; every seq is seen once, in order.
//!
//! Run with: `cargo run --example journal_tail`
//!
//! Needs no database set-up (it uses the testkit's default server, like `quickstart`).

use std::time::Duration;

use anyhow::bail;
use postbox::journal::{
    BatchedJournalWriter, EventPayload, TailOptions, WriterOptions, snapshot_and_tail,
};

const EVENTS: i64 = 200;

fn token(seq: i64) -> EventPayload {
    let mut payload = serde_json::Map::new();
    payload.insert("token".into(), format!("t{seq} ").into());
    payload
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let stream = "answer-42";

    // The writer: 200 small events, a few milliseconds apart, the last one terminal.
    let writer_backend = backend.clone();
    let writer = tokio::spawn(async move {
        let writer = BatchedJournalWriter::new(writer_backend, stream, WriterOptions::default());
        for seq in 1..=EVENTS {
            let kind = if seq == EVENTS { "done" } else { "delta" };
            writer.record(seq, kind, token(seq)).await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        writer.close().await
    });

    // The reader: three connections, each dropped after a while, each resuming after the last
    // seq seen (a browser reconnecting with Last-Event-ID).
    let mut seen = Vec::new();
    for (round, take) in [(1, 50), (2, 70), (3, usize::MAX)] {
        let after = seen.last().copied().unwrap_or(0);
        let mut tail =
            snapshot_and_tail(backend.clone(), stream, after, TailOptions::default()).await?;
        let mut n = 0;
        while n < take {
            match tail.next().await {
                Some(event) => {
                    seen.push(event?.seq);
                    n += 1;
                }
                None => break,
            }
        }
        println!("connection {round}: read {n} events after seq {after}");
        drop(tail); // disconnect
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    let stats = writer.await??;
    let expected: Vec<i64> = (1..=EVENTS).collect();
    println!(
        "writer: {} events in {} commits ({} dropped)",
        stats.written, stats.commits, stats.dropped
    );
    if seen != expected {
        bail!(
            "the reader saw {} events, not 1..={EVENTS} once each in order",
            seen.len()
        );
    }
    println!("reader: every seq 1..={EVENTS} seen exactly once, in order, across 3 connections");
    db.close().await?;
    Ok(())
}
