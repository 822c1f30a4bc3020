//! `journal`: 100-event streams written by the batched writer and one commit per event.

use std::time::Instant;

use postbox::journal::{BatchedJournalWriter, WriterOptions, record_event};
use serde_json::{Map, Value, json};

use crate::Ctx;
use crate::stats::{rate, round, spread};

const EVENTS: i64 = 100;

/// Streams written back to back, events recorded as fast as the writer takes them.
pub(crate) async fn journal(ctx: &Ctx) -> anyhow::Result<Value> {
    let streams = ctx.size(20).max(2);
    let db = postbox::testkit::postgres().await?;
    let backend = db.backend();
    let payload = |seq: i64| {
        let mut map = Map::new();
        map.insert("token".into(), format!("t{seq} ").into());
        map
    };
    let (mut batched, mut per_row, mut commits) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..ctx.reps {
        ctx.progress(format!("journal: repetition {}", rep + 1));
        let start = Instant::now();
        let mut rep_commits = 0;
        for s in 0..streams {
            let writer = BatchedJournalWriter::new(
                backend.clone(),
                format!("batched-{rep}-{s}"),
                WriterOptions::default(),
            );
            for seq in 1..=EVENTS {
                let kind = if seq == EVENTS { "done" } else { "delta" };
                writer.record(seq, kind, payload(seq)).await?;
            }
            rep_commits += writer.close().await?.commits;
        }
        batched.push(rate(streams * EVENTS as usize, start.elapsed()));
        commits.push(rep_commits as f64 / streams as f64);

        let start = Instant::now();
        for s in 0..streams {
            for seq in 1..=EVENTS {
                let kind = if seq == EVENTS { "done" } else { "delta" };
                record_event(
                    &backend,
                    &format!("per-row-{rep}-{s}"),
                    seq,
                    kind,
                    payload(seq),
                )
                .await?;
            }
        }
        per_row.push(rate(streams * EVENTS as usize, start.elapsed()));
    }
    db.close().await?;
    let (batched, per_row) = (spread(batched), spread(per_row));
    let speedup =
        batched["median"].as_f64().unwrap_or(0.0) / per_row["median"].as_f64().unwrap_or(1.0);
    commits.sort_by(f64::total_cmp);
    Ok(json!({
        "workload": "journal",
        "streams": streams,
        "events_per_stream": EVENTS,
        "settings": "WriterOptions::default() (16 events or 100 ms per commit); events recorded back to back",
        "batched_events_per_s": batched,
        "batched_commits_per_stream_max": commits.last().copied().unwrap_or(0.0),
        "per_row_events_per_s": per_row,
        "per_row_commits_per_stream": EVENTS,
        "speedup_median": round(speedup, 1),
    }))
}
