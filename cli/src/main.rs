//! `redline`: the command line for team leads and operators, and the demo.

mod demo;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Redline: offline-first sync for field teams.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a field day: a relay and simulated phones that work offline, reconnect all at
    /// once and converge.
    ///
    /// Starts a real relay (QUIC + TLS on 127.0.0.1) and real phone stores (sled) in a
    /// temporary directory, or in --data-dir to keep them.
    Demo(demo::DemoArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Demo(args) => demo::run(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Where the demo keeps its data when not told.
fn temp_data_dir() -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    let dir = tempfile::Builder::new().prefix("redline-demo-").tempdir()?;
    Ok((dir.path().to_path_buf(), Some(dir)))
}
