//! `postbox journal tail`: a stream's recorded events, then its live ones, one JSON object
//! per line, through `snapshot_and_tail` (no event missed or repeated between the two).

use std::process::ExitCode;

use postbox_core::PgBackend;
use postbox_core::journal::{JournalEvent, TailOptions, snapshot_and_tail};
use serde_json::json;

/// `postbox journal` commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Print a stream's events after SEQ, then new ones as they come, until a terminal event
    /// (`done` or `error` by default) or Ctrl-C.
    Tail {
        /// The stream id.
        stream: String,
        /// Start after this sequence number (0: from the first event).
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Event types that end the tail (repeat, or separate with commas).
        #[arg(long, value_delimiter = ',', default_values_t = ["done".to_owned(), "error".to_owned()])]
        terminal: Vec<String>,
        /// Never end on an event type: follow until Ctrl-C.
        #[arg(long, conflicts_with = "terminal")]
        follow: bool,
    },
}

pub(crate) async fn run(backend: PgBackend, command: Command) -> anyhow::Result<ExitCode> {
    let Command::Tail {
        stream,
        after,
        terminal,
        follow,
    } = command;
    let terminal = if follow { Vec::new() } else { terminal };
    let mut tail = snapshot_and_tail(
        backend,
        stream,
        after,
        TailOptions::default().terminal(terminal),
    )
    .await?;
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        let event = tokio::select! {
            event = tail.next() => event,
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
        };
        match event {
            Some(event) => println!("{}", line(&event?)),
            None => return Ok(ExitCode::SUCCESS),
        }
    }
}

fn line(event: &JournalEvent) -> String {
    json!({
        "seq": event.seq,
        "type": event.event_type,
        "payload": event.payload,
        "created_at": event.created_at,
    })
    .to_string()
}
