//! `redline`: the command line for team leads, and the demo.
//!
//! Exit codes: 0 done; 1 an unexpected error; 2 a usage error; 3 not logged in; 4 the
//! relay refused this machine's credentials; 5 the relay could not be reached; 6 the
//! document or day is not on this machine. Messages say what to do next.

mod console;
mod demo;
mod lead;
mod profile;
mod roster;
mod write;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Redline: offline-first sync for field teams.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The login profile (default: ~/.config/redline/config.toml).
    #[arg(long, env = "REDLINE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a field day: a relay and simulated phones that work offline, reconnect all at
    /// once and converge; then one team's reconciled day and the most urgent needs.
    ///
    /// Starts a real relay (QUIC + TLS on 127.0.0.1) and real phone stores (sled) in a
    /// temporary directory, or in --data-dir to keep them for the other commands.
    Demo(demo::DemoArgs),
    /// Save the relay, its certificate pin and this machine's token; checks them with a
    /// first sync.
    Login {
        /// The relay's address, e.g. 192.0.2.10:7447.
        #[arg(long)]
        relay: String,
        /// The relay certificate's SHA-256 fingerprint (the relay prints it at start).
        #[arg(long)]
        pin: String,
        /// This machine's token (`redline-server token issue`).
        #[arg(long, env = "REDLINE_TOKEN")]
        token: String,
        /// The organisation whose roster to receive.
        #[arg(long)]
        org: Option<String>,
        /// Ledger days to keep locally.
        #[arg(long, default_value_t = 14)]
        keep_days: u32,
        /// Where the local store goes (default: next to the profile).
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Sync with the relay now.
    Sync,
    /// A team's ledger.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Open household needs, most urgent first.
    Needs {
        /// Only urgent and emergency needs.
        #[arg(long)]
        urgent: bool,
        /// Only this zone.
        #[arg(long)]
        zone: Option<String>,
    },
    /// A team's reconciled day: totals, per-member activity, conflicts.
    Reconcile {
        /// The team.
        #[arg(long)]
        team: String,
        /// The day, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        date: Option<String>,
        /// Resolve a conflict by keeping one value: CONFLICT=CHOICE (repeatable); then
        /// syncs.
        #[arg(long)]
        resolve: Vec<String>,
        /// Accept a quarantined device's held changes after review (repeatable).
        #[arg(long)]
        accept: Vec<String>,
    },
    /// Write a document in a standard form.
    Export {
        /// The document, e.g. ledger/team-3/2026-11-29 or households/z1.
        #[arg(long)]
        doc: String,
        /// automerge (binary any Automerge loads), json or csv.
        #[arg(long, value_enum)]
        format: lead::Format,
        /// Output file (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// What this machine holds and what is not yet on the relay.
    Status,
    /// The relay's view of a team's devices: last seen, last sync, versions, data today,
    /// updates not yet received (leads of the team and operators).
    Devices {
        /// The team.
        #[arg(long)]
        team: String,
    },
    /// Explain why syncing is not working: network, relay, certificate, token, scope,
    /// data budget.
    Doctor,
    /// The lead's console: a local web page over this machine's copy (Today, Needs,
    /// Conflicts, Devices, Export) that syncs in the background and updates live.
    Console(console::ConsoleArgs),
    /// Edit the roster (teams, zones, members) through the running relay, as its
    /// operator (on the relay's machine: reads its data dir).
    Roster(roster::RosterArgs),
    /// Tasks of a team's ledger: add, assign, set status.
    #[command(subcommand)]
    Task(write::TaskCommand),
    /// Household needs: add, assign, set status or priority.
    #[command(subcommand)]
    Need(write::NeedCommand),
    /// Check this member in or out for a team's day.
    #[command(subcommand)]
    Duty(write::DutyCommand),
    /// Tallies: add to one of this member's counters for a team's day.
    #[command(subcommand)]
    Tally(write::TallyCommand),
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Tasks, duty and tallies of a team's day.
    Show {
        /// The team.
        #[arg(long)]
        team: String,
        /// The day, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        date: Option<String>,
    },
}

/// A failure with its exit code and a message that says what to do.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// A failure exiting with `code`.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = e.downcast_ref::<Failure>().map_or(1, |f| f.code);
            ExitCode::from(code)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = || lead::config_path(cli.config.as_deref());
    match cli.command {
        Command::Demo(args) => return demo::run(args).await,
        Command::Login {
            relay,
            pin,
            token,
            org,
            keep_days,
            store,
        } => lead::login(&config()?, relay, pin, token, org, keep_days, store).await?,
        Command::Sync => lead::sync(&lead::open(&config()?)?.1).await?,
        Command::Ledger(LedgerCommand::Show { team, date }) => {
            lead::ledger_show(&lead::open(&config()?)?.1, &team, date)?
        }
        Command::Needs { urgent, zone } => lead::needs(&lead::open(&config()?)?.1, urgent, zone)?,
        Command::Reconcile {
            team,
            date,
            resolve,
            accept,
        } => {
            let client = lead::open(&config()?)?.1;
            lead::accept(&client, &team, accept).await?;
            lead::reconcile(&client, &team, date, resolve).await?;
            lead::quarantine(&client, &team).await?;
        }
        Command::Export { doc, format, out } => {
            lead::export(&lead::open(&config()?)?.1, &doc, format, out)?
        }
        Command::Doctor => return lead::doctor(&config()?).await,
        Command::Devices { team } => lead::devices(&lead::open(&config()?)?.1, &team).await?,
        Command::Roster(args) => roster::run(args).await?,
        Command::Console(args) => {
            let (profile, client) = lead::open(&config()?)?;
            console::run(profile, client, args).await?
        }
        Command::Task(c) => write::task(&lead::open(&config()?)?.1, c).await?,
        Command::Need(c) => write::need(&lead::open(&config()?)?.1, c).await?,
        Command::Duty(c) => write::duty(&lead::open(&config()?)?.1, c).await?,
        Command::Tally(c) => write::tally(&lead::open(&config()?)?.1, c).await?,
        Command::Status => {
            let path = config()?;
            let (profile, client) = lead::open(&path)?;
            lead::status(&path, &profile, &client)?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the demo keeps its data when not told.
fn temp_data_dir() -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    let dir = tempfile::Builder::new().prefix("redline-demo-").tempdir()?;
    Ok((dir.path().to_path_buf(), Some(dir)))
}
