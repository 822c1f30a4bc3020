//! `postbox`: operate a postbox outbox from the shell.
//!
//! ```text
//! postbox status [--queue Q] [--json] [--watch [INTERVAL]]
//! postbox dead list|show|requeue|purge ...
//! postbox journal tail STREAM [--after SEQ]
//! postbox migrate
//! postbox ddl [VERSION]
//! postbox grants ROLE --as publisher|consumer|coop-member|journal-writer|journal-reader|inspector|admin
//! ```
//!
//! The database is `--database-url` or `DATABASE_URL`; the outbox `--table` (`name` or
//! `schema.name`, default `postbox`). Errors go to standard error, with exit code 1.

mod connect;
mod dead;
mod journal;
mod output;
mod schema;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Operate a postbox outbox: queue status, dead letters, journal tails, schema and grants.
#[derive(Debug, Parser)]
#[command(name = "postbox", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    target: connect::Target,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Per queue: ready, scheduled, leased and dead messages and the oldest ready one's age;
    /// per topic subscription: backlog, oldest and dead letters.
    Status(status::Args),
    /// List, show, requeue or purge dead letters.
    #[command(subcommand)]
    Dead(dead::Command),
    /// Read journal streams.
    #[command(subcommand)]
    Journal(journal::Command),
    /// Create or upgrade the outbox's schema to this build's version.
    Migrate,
    /// Print the SQL of the schema (every version, or one), for your own migration tool.
    Ddl(schema::DdlArgs),
    /// Print the GRANT statements a role needs for one kind of access.
    Grants(schema::GrantsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(&anyhow::Error::new(error).context("starting the runtime")),
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => fail(&error),
    }
}

fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("postbox: {error:#}");
    ExitCode::FAILURE
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let target = cli.target;
    match cli.command {
        Command::Status(args) => status::run(&target.backend().await?, args).await,
        Command::Dead(command) => dead::run(&target.backend().await?, command).await,
        Command::Journal(command) => journal::run(target.backend().await?, command).await,
        Command::Migrate => schema::migrate(&target.backend().await?).await,
        Command::Ddl(args) => schema::ddl(&target.table()?, args),
        Command::Grants(args) => schema::grants(&target.backend().await?, args).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
