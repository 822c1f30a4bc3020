//! `postbox status`: what waits where, from the cheap counts of `Depth::queue_depths` and
//! `Topics::subscriptions`.

use std::process::ExitCode;
use std::time::Duration;

use postbox_core::topic::SubscriptionInfo;
use postbox_core::{Depth, PgBackend, QueueDepth, Topics};
use serde_json::{Value, json};

use crate::output;

/// `postbox status` options.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Only this queue (and the subscriptions of the topic of this name).
    #[arg(long)]
    queue: Option<String>,
    /// Print JSON (one object; one per line with `--watch`).
    #[arg(long)]
    json: bool,
    /// Repeat every INTERVAL (default 2s) until interrupted.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2s",
          value_parser = humantime::parse_duration)]
    watch: Option<Duration>,
}

pub(crate) async fn run(backend: &PgBackend, args: Args) -> anyhow::Result<ExitCode> {
    let Some(every) = args.watch else {
        print!("{}", render(backend, &args).await?);
        return Ok(ExitCode::SUCCESS);
    };
    anyhow::ensure!(!every.is_zero(), "--watch needs an interval above zero");
    let mut ticks = tokio::time::interval(every);
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
        }
        let text = render(backend, &args).await?;
        if args.json {
            print!("{text}");
        } else {
            // Clear the screen and start at the top, as `watch` does.
            print!(
                "\x1b[2J\x1b[H{}\n\n{text}",
                chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
            );
        }
    }
}

async fn render(backend: &PgBackend, args: &Args) -> anyhow::Result<String> {
    let queues = backend.queue_depths(args.queue.as_deref()).await?;
    let subscriptions = backend.subscriptions(args.queue.as_deref()).await?;
    if args.json {
        let doc = json!({
            "at": chrono::Utc::now(),
            "queues": queues.iter().map(queue_json).collect::<Vec<_>>(),
            "subscriptions": subscriptions.iter().map(subscription_json).collect::<Vec<_>>(),
        });
        let text = if args.watch.is_some() {
            serde_json::to_string(&doc)?
        } else {
            serde_json::to_string_pretty(&doc)?
        };
        return Ok(text + "\n");
    }
    let mut out = if queues.is_empty() {
        "no queue holds a message\n".to_owned()
    } else {
        let rows: Vec<Vec<String>> = queues
            .iter()
            .map(|q| {
                vec![
                    q.queue.clone(),
                    q.ready.to_string(),
                    q.scheduled.to_string(),
                    q.leased.to_string(),
                    q.dead.to_string(),
                    q.oldest_ready.map_or_else(|| "-".to_owned(), output::age),
                ]
            })
            .collect();
        output::table(
            &[
                "QUEUE",
                "READY",
                "SCHEDULED",
                "LEASED",
                "DEAD",
                "OLDEST READY",
            ],
            &rows,
        )
    };
    if !subscriptions.is_empty() {
        let now = backend.database_now().await?;
        let rows: Vec<Vec<String>> = subscriptions
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.topic.clone(),
                    s.backlog.to_string(),
                    s.dead_letters.to_string(),
                    s.oldest_unprocessed
                        .map_or_else(|| "-".to_owned(), |t| output::age(age(now, t))),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&output::table(
            &["SUBSCRIPTION", "TOPIC", "BACKLOG", "DEAD", "OLDEST"],
            &rows,
        ));
    }
    Ok(out)
}

fn age(now: chrono::DateTime<chrono::Utc>, then: chrono::DateTime<chrono::Utc>) -> Duration {
    (now - then).to_std().unwrap_or_default()
}

fn queue_json(q: &QueueDepth) -> Value {
    json!({
        "queue": q.queue,
        "ready": q.ready,
        "scheduled": q.scheduled,
        "leased": q.leased,
        "dead": q.dead,
        "oldest_ready_seconds": q.oldest_ready.map(|d| d.as_secs_f64()),
    })
}

fn subscription_json(s: &SubscriptionInfo) -> Value {
    json!({
        "subscription": s.name,
        "topic": s.topic,
        "backlog": s.backlog,
        "dead": s.dead_letters,
        "oldest_unprocessed_at": s.oldest_unprocessed,
    })
}
