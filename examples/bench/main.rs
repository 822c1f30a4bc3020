//! Benchmarks that print JSON (and draw PNG charts), comparing alternatives within one run.
//!
//! ```text
//! cargo run --release --example bench -- [WORKLOAD...] [--database-url URL] [--json FILE]
//!     [--charts DIR] [--rounds N] [--reps N] [--coop-reps N] [--metrics] [--smoke] [--quiet]
//! ```
//!
//! `--metrics` installs a recorder (`metrics-util`'s debugging recorder, read and reset every
//! second as a scraper would), so that a run with it and one without compare the cost of the
//! `metrics` feature's recording.
//!
//! Workloads (all by default; each repeated `--reps` times, default 3, reporting median, min
//! and max):
//! - `xmin_hold`: 2,000 msg/s offered (`--rate`) in commits of 10, one default subscriber;
//!   120 s clean (`--clean-s`), 300 s while another session pins the xmin horizon
//!   (`--hold-s`), 120 s after it ended (`--after-s`); once with a `REPEATABLE READ` snapshot
//!   and once with an open write transaction. A 5 s series of consumed/s, backlog, dead
//!   tuples, relation size and fetch statement mean time (the last from `pg_stat_statements`,
//!   when the server preloads it). On a queue and on a topic subscription (`--storage`).
//! - `backlog`: 1,000,000 messages published, then drained by one default subscriber; the
//!   relations' size before, at its peak, right after the drain and 10 s later, and the
//!   autovacuum runs meanwhile.
//! - `publish_batch`: 20,000 messages, 1,000 per transaction; msg/s and WAL bytes per message.
//! - `publish_single`: 2,000 messages, one commit each; msg/s and WAL bytes per message.
//! - `drain`: 20,000 messages published beforehand, one subscriber with a no-op handler; msg/s
//!   with default settings, tuned settings, and per-row versus batched acks; WAL per message and
//!   the table's size after the drain. `--variants A,B` runs only the named variants (to
//!   profile one).
//! - `wakeup`: per round, a subscriber idle for 2 s, then one message published and committed;
//!   commit-to-handler latency in ms, with LISTEN (`--rounds`, default 50) and polling only
//!   (at most 10 rounds).
//! - `coop`: 20,000 events shared by N = 1, 2, 4, 8 cooperative members, with a no-op and a
//!   1 ms handler, each with fetches capped at 2 and a pool of 2 and again uncapped with a
//!   pool of 16; events/s, duplicates and losses (both must be 0). Repetitions go round the
//!   series and member counts; no-op runs repeat `--coop-reps` times (default 15), and N = 8
//!   is compared with N = 4 and with the best N below 8 (bootstrap 95 % interval).
//! - `journal`: 20 streams of 100 events, `BatchedJournalWriter` against `record_event` per
//!   row; events/s and commits per stream.
//! - `fixture`: a fresh test database from the migrated template against create + migrate;
//!   ms p50/p95 over `--rounds` of each.
//! - `fake`: `FakeBroker` publish (batches of 1,000) + fetch + `ack_batch`, 1,000,000 messages.
//! - `dispatch`: ns per call of an `#[async_trait]` method (generic and `dyn`) against a
//!   native `async fn` in a trait, beside one `FakeBroker::fetch`.
//!
//! Without `--database-url` the server is the testkit's (`POSTBOX_TEST_DATABASE_URL`, Docker,
//! or the local Postgres binaries, started and stopped by the bench). With it, every workload
//! runs in its own database created on that server (the user needs CREATEDB), so one server
//! can be shared with other systems' benchmarks. `--smoke` runs tiny sizes (CI uses it so the
//! harness cannot rot; its figures mean nothing). Progress goes to stderr unless `--quiet`.
//! `--render FILE --charts DIR` redraws the charts of an earlier run's JSON.

mod backlog;
mod charts;
mod coop;
mod dispatch;
mod drain;
mod fake;
mod fanout;
mod fixture;
mod journal;
mod publish;
mod server;
mod stats;
mod wakeup;
mod xmin_hold;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

const WORKLOADS: [&str; 12] = [
    "publish_batch",
    "publish_single",
    "drain",
    "wakeup",
    "coop",
    "journal",
    "fixture",
    "fake",
    "dispatch",
    "xmin_hold",
    "backlog",
    "fanout",
];

struct Args {
    workloads: Vec<String>,
    database_url: Option<String>,
    json: Option<PathBuf>,
    charts: Option<PathBuf>,
    render: Option<PathBuf>,
    rounds: Option<usize>,
    reps: usize,
    coop_reps: usize,
    smoke: bool,
    quiet: bool,
    hold: xmin_hold::HoldSettings,
    variants: Option<Vec<String>>,
    metrics: bool,
}

const USAGE: &str = "usage: bench [publish_batch] [publish_single] [drain] [wakeup] [coop] \
[journal] [fixture] [fake] [dispatch] [xmin_hold] [backlog] [fanout] [--database-url URL] [--json FILE] [--charts DIR] [--rounds N] \
[--reps N] [--coop-reps N] [--clean-s S] [--hold-s S] [--after-s S] [--rate N] \
[--storage queue|topic|both] [--variants A,B] [--metrics] [--smoke] \
[--quiet]\n   or: bench --render FILE --charts DIR";

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        workloads: Vec::new(),
        database_url: None,
        json: None,
        charts: None,
        render: None,
        rounds: None,
        reps: 3,
        coop_reps: 15,
        smoke: false,
        quiet: false,
        hold: xmin_hold::HoldSettings::default(),
        variants: None,
        metrics: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |what: &str| it.next().with_context(|| format!("{arg} needs {what}"));
        match arg.as_str() {
            "--database-url" => args.database_url = Some(value("a URL")?),
            "--json" => args.json = Some(value("a file")?.into()),
            "--charts" => args.charts = Some(value("a directory")?.into()),
            "--render" => args.render = Some(value("a JSON file")?.into()),
            "--rounds" => args.rounds = Some(value("a number")?.parse()?),
            "--reps" => args.reps = value("a number")?.parse()?,
            "--coop-reps" => args.coop_reps = value("a number")?.parse()?,
            "--clean-s" => args.hold.clean_s = value("seconds")?.parse()?,
            "--hold-s" => args.hold.hold_s = value("seconds")?.parse()?,
            "--after-s" => args.hold.after_s = value("seconds")?.parse()?,
            "--rate" => args.hold.rate = value("messages per second")?.parse()?,
            "--storage" => match value("queue, topic or both")?.as_str() {
                "queue" => (args.hold.queue, args.hold.topic) = (true, false),
                "topic" => (args.hold.queue, args.hold.topic) = (false, true),
                "both" => (args.hold.queue, args.hold.topic) = (true, true),
                other => anyhow::bail!("--storage takes queue, topic or both, not {other}"),
            },
            "--variants" => {
                args.variants = Some(
                    value("a comma-separated list")?
                        .split(',')
                        .map(str::to_owned)
                        .collect(),
                )
            }
            "--smoke" => args.smoke = true,
            "--metrics" => args.metrics = true,
            "--quiet" => args.quiet = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            w if WORKLOADS.contains(&w) => args.workloads.push(w.to_owned()),
            other => anyhow::bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    anyhow::ensure!(args.reps > 0, "--reps must be at least 1");
    anyhow::ensure!(args.coop_reps > 0, "--coop-reps must be at least 1");
    if args.workloads.is_empty() {
        args.workloads = WORKLOADS.map(String::from).to_vec();
    }
    Ok(args)
}

/// What every workload needs: sizes, repetitions, and the progress line.
pub(crate) struct Ctx {
    /// Tiny sizes: the harness runs end to end, the figures mean nothing.
    pub(crate) smoke: bool,
    /// Repetitions of each measurement.
    pub(crate) reps: usize,
    /// Repetitions of the no-op coop runs (0.2 s each, so more are cheap and needed).
    pub(crate) coop_reps: usize,
    /// Rounds of the latency workloads (wakeup, fixture).
    pub(crate) rounds: usize,
    /// The drain variants to run (`--variants`); all when `None`.
    variants: Option<Vec<String>>,
    bar: ProgressBar,
}

impl Ctx {
    /// `full` in a real run, a fortieth of it (at least 1) in smoke mode.
    pub(crate) fn size(&self, full: usize) -> usize {
        if self.smoke { (full / 40).max(1) } else { full }
    }

    /// Whether the drain variant `name` was asked for (all are, without `--variants`).
    pub(crate) fn wants(&self, name: &str) -> bool {
        self.variants
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
    }

    /// Shows what is running now.
    pub(crate) fn progress(&self, message: String) {
        self.bar.set_message(message);
    }
}

/// Machine and server facts printed with the figures.
async fn machine() -> anyhow::Result<Value> {
    let db = postbox::testkit::postgres().await?;
    let settings = server::settings(db.pool()).await?;
    let provider = db.provider().to_string();
    db.close().await?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        });
    Ok(json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "os": std::env::consts::OS,
        "postgres_provider": provider,
        "postgres": settings,
    }))
}

/// CPU time the hypervisor gave to other guests (`steal` in `/proc/stat`), in seconds since
/// boot, summed over the cores; `None` off Linux. A workload during which this grows ran on a
/// disturbed machine: its figures are reported with the amount, so a reader can tell.
fn cpu_steal_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let steal: f64 = stat
        .lines()
        .next()?
        .split_whitespace()
        .nth(8)?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks_per_s > 0).then(|| steal / ticks_per_s as f64)
}

/// Installs a recorder for every postbox metric, read and reset every second.
fn install_metrics_recorder() -> anyhow::Result<()> {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install()?;
    postbox::metrics::describe();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            drop(snapshotter.snapshot());
        }
    });
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.metrics {
        install_metrics_recorder()?;
    }
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new_spinner();
        bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")?);
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    };
    let ctx = Ctx {
        smoke: args.smoke,
        reps: args.reps,
        coop_reps: args.coop_reps,
        rounds: args.rounds.unwrap_or(if args.smoke { 3 } else { 50 }),
        variants: args.variants.clone(),
        bar,
    };
    ctx.progress("starting the server".into());
    let machine = machine().await?;
    let mut results = Vec::new();
    for workload in &args.workloads {
        ctx.progress(format!("{workload}..."));
        let (started, steal_before) = (std::time::Instant::now(), cpu_steal_s());
        let mut result = match workload.as_str() {
            "xmin_hold" => xmin_hold::xmin_hold(&ctx, args.hold).await,
            "backlog" => backlog::backlog(&ctx).await,
            "fanout" => fanout::fanout(&ctx).await,
            "publish_batch" => publish::publish_batch(&ctx).await,
            "publish_single" => publish::publish_single(&ctx).await,
            "drain" => drain::drain(&ctx).await,
            "wakeup" => wakeup::wakeup(&ctx).await,
            "coop" => coop::coop(&ctx).await,
            "journal" => journal::journal(&ctx).await,
            "fixture" => fixture::fixture(&ctx).await,
            "fake" => fake::fake(&ctx).await,
            "dispatch" => dispatch::dispatch(&ctx).await,
            other => unreachable!("parse_args accepts only known workloads, not {other}"),
        }
        .with_context(|| format!("workload {workload}"))?;
        result["wall_s"] = json!(stats::round(started.elapsed().as_secs_f64(), 1));
        if let (Some(before), Some(after)) = (steal_before, cpu_steal_s()) {
            result["cpu_steal_s"] = json!(stats::round(after - before, 2));
        }
        if !args.quiet {
            ctx.bar.println(format!("bench: {workload} done"));
        }
        results.push(result);
    }
    ctx.bar.finish_and_clear();
    let mut doc = json!({
        "smoke": args.smoke,
        "metrics_recorder": args.metrics,
        "machine": machine,
        "results": results,
    });
    if let Some(dir) = &args.charts {
        let files = charts::render(&results_of(&doc), dir)?;
        doc["charts"] = json!(files);
    }
    let text = serde_json::to_string_pretty(&doc)?;
    match &args.json {
        Some(path) => {
            std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?
        }
        None => println!("{text}"),
    }
    Ok(())
}

fn results_of(doc: &Value) -> Vec<Value> {
    doc["results"].as_array().cloned().unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if let Some(file) = &args.render {
        // Redraw the charts of an earlier run without measuring anything.
        let dir = args
            .charts
            .as_deref()
            .context("--render needs --charts DIR")?;
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let doc: Value = serde_json::from_str(&text)?;
        for chart in charts::render(&results_of(&doc), dir)? {
            println!("{chart}");
        }
        return Ok(());
    }
    if let Some(url) = &args.database_url {
        // SAFETY: no other thread exists yet (the runtime is built below), so nothing reads
        // the environment concurrently.
        unsafe {
            std::env::set_var("POSTBOX_TEST_PG", "url");
            std::env::set_var("POSTBOX_TEST_DATABASE_URL", url);
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}
