//! Command-line definitions (clap): one struct per subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::model::Entity;

#[derive(Debug, Parser)]
#[command(
    name = "t360-connector",
    version,
    about = "Delta-syncs forex brokers' data into the Track360 entity model"
)]
pub struct Cli {
    /// The daemon's settings file; built-in defaults (./state, ./connectors) when absent.
    #[arg(long, short, global = true, env = "T360_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log lines as text (default) or JSON objects (one per line).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "T360_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: every connector's entities on their schedules, until SIGTERM.
    Run,
    /// Validate the settings and every connector file; report each problem with file and key.
    Check,
    /// Run one delta sync now, then exit (non-zero if any sync failed).
    Sync(SyncArgs),
    /// Re-pull a history range in resumable slices (never moves the live cursor).
    Backfill(BackfillArgs),
    /// Show each broker and entity: cursor, lag, last success, last error, counts.
    Status,
    /// Compare the store with the broker, day by day and key by key (exit 0 only when equal,
    /// 3 when they differ); `--repair` sends the drift through the pipeline and re-checks.
    Reconcile(ReconcileArgs),
    /// Quarantined records: list them, retry them after a fix, or purge them.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// Serve the bundled sample broker (the guide's API over a generated data set).
    SampleBroker(SampleBrokerArgs),
    /// The sample broker on a free port, the daemon against it on fast schedules for a while
    /// (or until Ctrl-C) with new records arriving, then the status.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the daemon runs.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Only this broker (its connector's `broker`, or file name).
    #[arg(long)]
    pub broker: Option<String>,
    /// Only this entity: customers, transactions or trading_activity.
    #[arg(long)]
    pub entity: Option<Entity>,
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    #[arg(long)]
    pub broker: String,
    /// One entity; every entity the connector pulls when absent.
    #[arg(long)]
    pub entity: Option<Entity>,
    /// First day compared (UTC), e.g. 2026-01-01.
    #[arg(long)]
    pub from: String,
    /// Last day compared, included.
    #[arg(long)]
    pub to: String,
    /// Re-send what is missing or different, delete what the broker no longer has (embedded
    /// store), then compare again.
    #[arg(long)]
    pub repair: bool,
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct BackfillArgs {
    #[arg(long)]
    pub broker: String,
    #[arg(long)]
    pub entity: Option<Entity>,
    /// Start: a date (2026-01-01, midnight UTC) or an RFC 3339 instant.
    #[arg(long)]
    pub since: String,
    /// End (default: now − settle).
    #[arg(long)]
    pub until: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// Each quarantined record with its reasons and raw payload.
    List(QuarantineArgs),
    /// Run quarantined records through mapping, validation and the sink again (after the
    /// connector file, the broker or the ingestion API was fixed); those that pass leave.
    Retry(QuarantineArgs),
    /// Delete quarantined records (all of them only with --all).
    Purge(PurgeArgs),
}

#[derive(Debug, Args)]
pub struct QuarantineArgs {
    #[arg(long)]
    pub broker: Option<String>,
    #[arg(long)]
    pub entity: Option<Entity>,
    /// One record, by natural key (as `list` shows it).
    #[arg(long)]
    pub key: Option<String>,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub filter: QuarantineArgs,
    /// Purge every quarantined record of every broker.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct SampleBrokerArgs {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:8700")]
    pub listen: SocketAddr,
    #[arg(long, default_value_t = 200)]
    pub customers: usize,
    #[arg(long, default_value_t = 600)]
    pub transactions: usize,
    #[arg(long, default_value_t = 800)]
    pub activity: usize,
    /// Make every Nth record invalid (0: none), to see quarantine at work.
    #[arg(long, default_value_t = 50)]
    pub invalid_every: usize,
    /// Serve page numbers only, without `next_cursor`.
    #[arg(long)]
    pub page_numbers: bool,
}
