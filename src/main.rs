//! The `t360-connector` binary: command-line parsing, logging and exit codes only.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use t360_connector::cli::{Cli, Command, LogFormat};
use t360_connector::commands;
use tracing_subscriber::EnvFilter;

/// Exit codes: 0 success, 1 a sync or command failed, 2 bad configuration or arguments.
const FAILED: u8 = 1;
const BAD_CONFIG: u8 = 2;
/// `reconcile` found the store and the broker different.
const DRIFT: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Demo(_)) {
        commands::demo_credentials();
    }
    // "Every log line of a sync carries broker, entity and run id": in JSON, the run span's
    // fields come with each line (`span`), as they do in text.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(FAILED);
        }
    };
    let config = cli.config.as_deref();
    let result: anyhow::Result<Option<String>> = runtime.block_on(async {
        match &cli.command {
            Command::Run => commands::run(config).await.map(|()| None),
            Command::Check => commands::check(config).map(Some),
            Command::Sync(args) => commands::sync(config, args).await.map(|()| None),
            Command::Backfill(args) => commands::backfill(config, args).await.map(|()| None),
            Command::Status => commands::status(config).map(Some),
            Command::Reconcile(args) => commands::reconcile(config, args).await.map(Some),
            Command::Quarantine(action) => commands::quarantine(config, action).await.map(Some),
            Command::SampleBroker(args) => commands::sample_broker(args).await.map(|()| None),
            Command::Demo(args) => commands::demo(config, args).await.map(Some),
        }
    });
    match result {
        Ok(output) => {
            if let Some(text) = output {
                println!("{}", text.trim_end());
            }
            ExitCode::SUCCESS
        }
        Err(e) if e.is::<commands::Drift>() => {
            println!("{}", e.to_string().trim_end());
            ExitCode::from(DRIFT)
        }
        Err(e) if e.is::<commands::ConfigProblems>() => {
            eprintln!("{e}");
            ExitCode::from(BAD_CONFIG)
        }
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(FAILED)
        }
    }
}

/// The error and its causes on one line: an operator's log or terminal wants one.
fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}
