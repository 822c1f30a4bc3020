//! `postbox migrate`, `ddl` and `grants`: the schema and who may use it.

use std::process::ExitCode;

use anyhow::Context;
use postbox_core::pg::{Access, SCHEMA_VERSION, ddl as full_ddl, ddl_of_version};
use postbox_core::prelude::*;
use postbox_core::{PgBackend, TableName};

/// `postbox ddl` options.
#[derive(Debug, clap::Args)]
pub(crate) struct DdlArgs {
    /// Only this schema version's SQL (1 to the latest): one migration file per version.
    #[arg(value_name = "VERSION")]
    schema_version: Option<i32>,
}

/// `postbox grants` options.
#[derive(Debug, clap::Args)]
pub(crate) struct GrantsArgs {
    /// The role to grant to (a plain lowercase identifier).
    role: String,
    /// The kind of access.
    #[arg(long = "as", value_enum)]
    access: AccessArg,
}

/// The kinds of [`Access`], as the command line spells them.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AccessArg {
    Publisher,
    Consumer,
    CoopMember,
    JournalWriter,
    JournalReader,
    Inspector,
    Admin,
}

impl From<AccessArg> for Access {
    fn from(access: AccessArg) -> Self {
        match access {
            AccessArg::Publisher => Access::Publisher,
            AccessArg::Consumer => Access::Consumer,
            AccessArg::CoopMember => Access::CoopMember,
            AccessArg::JournalWriter => Access::JournalWriter,
            AccessArg::JournalReader => Access::JournalReader,
            AccessArg::Inspector => Access::Inspector,
            AccessArg::Admin => Access::Admin,
        }
    }
}

pub(crate) async fn migrate(backend: &PgBackend) -> anyhow::Result<ExitCode> {
    let applied = backend.migrate().await.context("migrating")?;
    match (applied.first(), applied.last()) {
        (Some(first), Some(last)) if first == last => {
            println!("{}: applied version {last}", backend.table());
        }
        (Some(first), Some(last)) => {
            println!("{}: applied versions {first} to {last}", backend.table());
        }
        _ => println!(
            "{}: up to date at version {SCHEMA_VERSION}",
            backend.table()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn ddl(table: &TableName, args: DdlArgs) -> anyhow::Result<ExitCode> {
    let sql = match args.schema_version {
        None => full_ddl(table),
        Some(version) => ddl_of_version(table, version).with_context(|| {
            format!("no schema version {version}: this build knows 1 to {SCHEMA_VERSION}")
        })?,
    };
    print!("{sql}");
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn grants(backend: &PgBackend, args: GrantsArgs) -> anyhow::Result<ExitCode> {
    let sql = backend.grants(args.access.into(), &args.role).await?;
    println!("{}", sql.trim_end());
    Ok(ExitCode::SUCCESS)
}
