//! `postbox dead`: list, show, requeue and purge dead letters, of queues or of one topic
//! subscription, selected like [`DeadFilter`] selects them.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use postbox_core::{DeadFilter, DeadLetter, MessageId, PgBackend, Redrive, Topics};
use serde_json::{Value, json};

use crate::output;
use postbox_core::prelude::*;

/// `postbox dead` commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// List dead letters (oldest first).
    List {
        #[command(flatten)]
        select: Select,
        /// Print at most N.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter whole: payload, headers, errors.
    Show {
        /// Its id.
        id: MessageId,
        /// A dead letter of this topic subscription.
        #[arg(long)]
        subscription: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back on their queue, ready at once, attempts cleared.
    Requeue {
        #[command(flatten)]
        select: Select,
        /// Every dead letter, when no other condition is given.
        #[arg(long)]
        all: bool,
        /// Print what would be requeued, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters for good (asks first unless --yes).
    Purge {
        #[command(flatten)]
        select: Select,
        /// Every dead letter, when no other condition is given.
        #[arg(long)]
        all: bool,
        /// Print what would be purged, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
}

/// Which dead letters: every condition given must hold.
#[derive(Debug, clap::Args)]
pub(crate) struct Select {
    /// These ids (repeat, or separate with commas).
    #[arg(long = "id", value_delimiter = ',')]
    ids: Vec<MessageId>,
    /// Of this queue (of this topic, with --subscription).
    #[arg(long)]
    queue: Option<String>,
    /// Whose reason contains this text.
    #[arg(long)]
    reason: Option<String>,
    /// Dead for longer than this (`90s`, `10m`, `2h`), by the database's clock.
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
    /// The dead letters of this topic subscription instead of the queues'.
    #[arg(long)]
    subscription: Option<String>,
}

impl Select {
    fn filter(&self) -> anyhow::Result<DeadFilter> {
        let mut filter = if self.ids.is_empty() {
            DeadFilter::all()
        } else {
            DeadFilter::ids(self.ids.iter().copied())
        };
        if let Some(queue) = &self.queue {
            filter = filter.queue(queue.as_str());
        }
        if let Some(text) = &self.reason {
            filter = filter.reason_contains(text.as_str());
        }
        if let Some(age) = self.older_than {
            filter = filter.older_than(age);
        }
        filter.validate()?;
        Ok(filter)
    }

    fn narrows(&self) -> bool {
        !self.ids.is_empty()
            || self.queue.is_some()
            || self.reason.is_some()
            || self.older_than.is_some()
    }

    /// The dead letters the filter selects now, oldest first.
    async fn matching(&self, backend: &PgBackend) -> anyhow::Result<Vec<DeadLetter>> {
        let filter = self.filter()?;
        let mut dead = match &self.subscription {
            Some(name) => backend.subscription_dead_letters(name).await?,
            None => backend.dead_letters(self.queue.as_deref()).await?,
        };
        let now = backend.database_now().await?;
        dead.retain(|d| filter.matches(d, now));
        dead.sort_by_key(|d| (d.dead_at, d.id));
        Ok(dead)
    }
}

pub(crate) async fn run(backend: &PgBackend, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::List {
            select,
            limit,
            json,
        } => {
            let dead = select.matching(backend).await?;
            let shown = &dead[..dead.len().min(limit)];
            if json {
                let list: Vec<Value> = shown.iter().map(letter_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", list(shown));
                if dead.len() > shown.len() {
                    println!("... {} more (--limit)", dead.len() - shown.len());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Show {
            id,
            subscription,
            json,
        } => {
            let dead = match &subscription {
                Some(name) => backend.subscription_dead_letters(name).await?,
                None => backend.dead_letters(None).await?,
            };
            let letter = dead
                .into_iter()
                .find(|d| d.id == id)
                .with_context(|| format!("no dead letter with id {id}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letter_json(&letter))?);
            } else {
                print!("{}", show(&letter));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Requeue {
            select,
            all,
            dry_run,
        } => {
            require_selection(&select, all, "requeue")?;
            if dry_run {
                return dry(backend, &select, "requeue").await;
            }
            let filter = select.filter()?;
            let ids = match &select.subscription {
                Some(name) => backend.requeue_subscription_dead(name, &filter).await?,
                None => backend.requeue_dead(&filter).await?,
            };
            println!("requeued {}{}", ids.len(), id_list(&ids));
            Ok(ExitCode::SUCCESS)
        }
        Command::Purge {
            select,
            all,
            dry_run,
            yes,
        } => {
            require_selection(&select, all, "purge")?;
            if dry_run {
                return dry(backend, &select, "purge").await;
            }
            if !yes {
                let dead = select.matching(backend).await?;
                if dead.is_empty() {
                    println!("no dead letter matches");
                    return Ok(ExitCode::SUCCESS);
                }
                let ids: Vec<MessageId> = dead.iter().map(|d| d.id).collect();
                let question = format!(
                    "purge {} dead letter(s){} for good? [y/N] ",
                    ids.len(),
                    id_list(&ids)
                );
                if !confirm(&question)? {
                    anyhow::bail!(
                        "not confirmed, nothing purged (pass --yes to skip the question)"
                    );
                }
            }
            let filter = select.filter()?;
            let ids = match &select.subscription {
                Some(name) => backend.purge_subscription_dead(name, &filter).await?,
                None => backend.purge_dead(&filter).await?,
            };
            println!("purged {}{}", ids.len(), id_list(&ids));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Refuses a requeue or purge of everything unless `--all` says so.
fn require_selection(select: &Select, all: bool, verb: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        all || select.narrows(),
        "{verb} which dead letters? Give --id, --queue, --reason or --older-than, or --all"
    );
    Ok(())
}

async fn dry(backend: &PgBackend, select: &Select, verb: &str) -> anyhow::Result<ExitCode> {
    let dead = select.matching(backend).await?;
    println!("would {verb} {} dead letter(s)", dead.len());
    if !dead.is_empty() {
        print!("{}", list(&dead));
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks `question` on standard error and reads the answer; only `y` or `yes` confirm.
fn confirm(question: &str) -> anyhow::Result<bool> {
    let stdin = std::io::stdin();
    let mut stderr = std::io::stderr();
    write!(stderr, "{question}")?;
    stderr.flush()?;
    let mut answer = String::new();
    let read = stdin.lock().read_line(&mut answer)?;
    if read == 0 && !stdin.is_terminal() {
        writeln!(stderr)?;
    }
    Ok(matches!(answer.trim().to_lowercase().as_str(), "y" | "yes"))
}

fn id_list(ids: &[MessageId]) -> String {
    match ids {
        [] => String::new(),
        ids if ids.len() <= 20 => {
            let list: Vec<String> = ids.iter().map(ToString::to_string).collect();
            format!(": {}", list.join(", "))
        }
        ids => format!(": {} ... {}", ids[0], ids[ids.len() - 1]),
    }
}

fn list(dead: &[DeadLetter]) -> String {
    if dead.is_empty() {
        return "no dead letter matches\n".to_owned();
    }
    let rows: Vec<Vec<String>> = dead
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                d.queue.clone(),
                d.attempts.to_string(),
                d.dead_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                output::cut(&d.reason, 60),
            ]
        })
        .collect();
    output::table(
        &["ID", "QUEUE", "ATTEMPTS", "DEAD AT (UTC)", "REASON"],
        &rows,
    )
}

fn show(d: &DeadLetter) -> String {
    let headers = d
        .headers
        .as_ref()
        .map_or_else(|| "-".to_owned(), |h| Value::Object(h.clone()).to_string());
    format!(
        "id:             {}\nqueue:          {}\ndead at:        {}\nreason:         {}\nlast error:     {}\nattempts:       {}\ndeliveries:     {}\ncorrelation id: {}\nheaders:        {}\npayload:\n{}\n",
        d.id,
        d.queue,
        d.dead_at.to_rfc3339(),
        d.reason,
        d.last_error.as_deref().unwrap_or("-"),
        d.attempts,
        d.deliveries,
        d.correlation_id,
        headers,
        payload_text(&d.payload),
    )
}

/// The payload as pretty JSON, as text, or as hex when it is neither.
fn payload_text(payload: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<Value>(payload)
        && let Ok(pretty) = serde_json::to_string_pretty(&value)
    {
        return pretty;
    }
    match std::str::from_utf8(payload) {
        Ok(text) => text.to_owned(),
        Err(_) => payload.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

fn letter_json(d: &DeadLetter) -> Value {
    let payload = serde_json::from_slice::<Value>(&d.payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&d.payload).into_owned()));
    json!({
        "id": d.id,
        "queue": d.queue,
        "reason": d.reason,
        "last_error": d.last_error,
        "attempts": d.attempts,
        "deliveries": d.deliveries,
        "dead_at": d.dead_at,
        "correlation_id": d.correlation_id,
        "headers": d.headers,
        "payload": payload,
    })
}
