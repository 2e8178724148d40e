//! The field-day benchmark: `cargo run --release -p redline-tests --bin fieldday -- --help`.
//!
//! Runs the relay in a child process (this same binary with `--serve-relay DIR`), so its
//! CPU time and peak memory are its own. Prints a table; `--json PATH` writes the numbers.

use std::path::PathBuf;

use clap::Parser;
use redline_tests::fieldday::{self, FieldDayConfig};

/// A field day: teams of phones work offline, then reconnect at once to one relay.
#[derive(Parser)]
struct Args {
    /// Teams.
    #[arg(long, default_value_t = 13)]
    teams: usize,
    /// Devices per team.
    #[arg(long, default_value_t = 16)]
    devices_per_team: usize,
    /// Zones.
    #[arg(long, default_value_t = 20)]
    zones: usize,
    /// Households per zone.
    #[arg(long, default_value_t = 100)]
    households_per_zone: usize,
    /// Offline operations per device.
    #[arg(long, default_value_t = 300)]
    ops: usize,
    /// Seed of the simulated work.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs this many seeds in a row (seed, seed + 1, ...) and reports the worst of
    /// each figure; every run must converge.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// A small run that finishes in under a minute.
    #[arg(long)]
    quick: bool,
    /// Also time Automerge applying the storm's changes per document in batches of 16,
    /// 64, 256 and 1,024 (what a relay committing as changes come does), beside the
    /// floor's one batch: about ten seconds more at the default size.
    #[arg(long)]
    apply_batches: bool,
    /// Live probes after the storm (one phone writes, a teammate on another relay
    /// where there are several sees it). p99 over 100 is the second-worst probe, so one
    /// stall of a shared machine decides it; 500 take about five seconds more.
    #[arg(long, default_value_t = 500)]
    live_samples: usize,
    /// Write the numbers as one JSON object here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the data here (default: a temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Compare two results written by `--json` (before, after) and exit: every figure
    /// side by side with the ratio after/before.
    #[arg(long, num_args = 2, value_names = ["BEFORE", "AFTER"])]
    compare: Option<Vec<PathBuf>>,
    /// Steady load instead of the storm: --phones phones live, each writing every
    /// --every seconds, measured for --seconds.
    #[arg(long)]
    steady: bool,
    /// Steady load: phones live at once.
    #[arg(long, default_value_t = 500)]
    phones: usize,
    /// Steady load: the measured window in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Steady load: each phone writes once per this many seconds.
    #[arg(long, default_value_t = 10)]
    every: u64,
    /// Where the relay stores: sled (its data dir) or postgres.
    #[arg(long, default_value = "sled", value_parser = ["sled", "postgres"])]
    storage: String,
    /// With --storage postgres: the database (its schema is created). Without it, a
    /// PostgreSQL server is started in a temporary directory for the run (and its CPU
    /// reported as database time).
    #[arg(long, env = "REDLINE_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// Relays over one database (needs --storage postgres).
    #[arg(long, default_value_t = 1)]
    relays: usize,
    /// With several relays, where a device starts: `team` (its team's home relay, as
    /// a deployment configures phones) or `device` (device k at relay k mod N, each
    /// team on every relay: the worst case). Either way it fails over to the others.
    #[arg(long, default_value = "team", value_parser = ["team", "device"])]
    spread: String,
    /// Runtime threads of the phones' process; 0 (the default) is one per core. The
    /// phones share it and each blocks its thread while its store syncs to disk (as a
    /// phone's sync thread does), so with few threads one phone's `fsync` can hold up
    /// others queued behind it, which no real phone suffers; 8 against the default
    /// measured no clear difference on 2 cores (ARCHITECTURE.md).
    #[arg(long, default_value_t = 0)]
    phone_threads: usize,
    /// Internal: serve a relay on this data dir (the benchmark's child process).
    #[arg(long, hide = true)]
    serve_relay: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    // The relay child keeps tokio's default (a thread per core), as a deployed relay.
    if args.serve_relay.is_none() && args.phone_threads > 0 {
        runtime.worker_threads(args.phone_threads);
    }
    runtime.build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(dir) = &args.serve_relay {
        return fieldday::serve_relay_child(dir).await;
    }
    if let Some(files) = &args.compare {
        let read = |p: &PathBuf| -> anyhow::Result<serde_json::Value> {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
            serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{} is not a fieldday JSON result: {e}", p.display()))
        };
        print!(
            "{}",
            fieldday::compare(&read(&files[0])?, &read(&files[1])?)?
        );
        return Ok(());
    }
    let temp = tempfile::tempdir()?;
    if args.steady {
        let cfg = redline_tests::steady::SteadyConfig {
            phones: args.phones,
            devices_per_team: args.devices_per_team,
            seconds: args.seconds,
            every: std::time::Duration::from_secs(args.every.max(1)),
            seed: args.seed,
            relay_exe: std::env::current_exe()?,
            work_dir: args
                .data_dir
                .clone()
                .unwrap_or_else(|| temp.path().to_path_buf()),
        };
        println!(
            "steady load: {} phones ({} per team), a write each every {} s, for {} s",
            cfg.phones, cfg.devices_per_team, args.every, cfg.seconds
        );
        let result = redline_tests::steady::run(&cfg, |line| println!("  {line}")).await?;
        println!();
        print!("{}", redline_tests::steady::table(&result));
        if let Some(path) = args.json {
            std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
            println!("wrote {}", path.display());
        }
        return Ok(());
    }
    let base_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    // A database server for the run when PostgreSQL is asked for without a URL; each
    // seed gets a fresh database.
    let server = match (args.storage.as_str(), &args.postgres_url) {
        ("postgres", None) => Some(redline_tests::postgres::TestPostgres::start()?),
        _ => None,
    };
    let mut runs = Vec::new();
    for seed in args.seed..args.seed + args.seeds.max(1) {
        let work_dir = if args.seeds > 1 {
            base_dir.join(format!("seed-{seed}"))
        } else {
            base_dir.clone()
        };
        let mut cfg = FieldDayConfig {
            teams: args.teams,
            devices_per_team: args.devices_per_team,
            zones: args.zones,
            households_per_zone: args.households_per_zone,
            ops_per_device: args.ops,
            seed,
            live_samples: args.live_samples.max(1),
            noop_docs: 500,
            relay_exe: std::env::current_exe()?,
            work_dir,
            relays: args.relays.max(1),
            apply_batches: args.apply_batches,
            spread: if args.spread == "device" {
                fieldday::Spread::Device
            } else {
                fieldday::Spread::Team
            },
            postgres: match (&server, &args.postgres_url) {
                (Some(pg), _) => Some(fieldday::PostgresTarget {
                    url: pg.fresh_database()?,
                    server_pid: pg.server_pid(),
                }),
                (None, Some(url)) if args.storage == "postgres" => Some(fieldday::PostgresTarget {
                    url: url.clone(),
                    server_pid: None,
                }),
                _ => None,
            },
        };
        if args.quick {
            cfg.teams = cfg.teams.min(4);
            cfg.devices_per_team = cfg.devices_per_team.min(8);
            cfg.zones = cfg.zones.min(8);
            cfg.households_per_zone = cfg.households_per_zone.min(30);
            cfg.ops_per_device = cfg.ops_per_device.min(60);
            cfg.live_samples = cfg.live_samples.min(50);
        }
        println!(
            "field day: {} teams x {} devices, {} zones x {} households, {} ops per device (seed {}, {}, {} relay(s))",
            cfg.teams,
            cfg.devices_per_team,
            cfg.zones,
            cfg.households_per_zone,
            cfg.ops_per_device,
            cfg.seed,
            if cfg.postgres.is_some() {
                "PostgreSQL"
            } else {
                "sled"
            },
            cfg.relays
        );
        let result = fieldday::run(&cfg, |line| println!("  {line}")).await?;
        println!();
        print!("{}", fieldday::table(&result));
        println!();
        if args.seeds > 1 {
            // One run's data is not needed once measured (a default run keeps ~1 GB).
            let _ = std::fs::remove_dir_all(&cfg.work_dir);
        }
        runs.push(result);
    }
    let json = if runs.len() > 1 {
        let worst = fieldday::worst(&runs)?;
        println!("worst of {} seeds:", runs.len());
        for (k, v) in worst.as_object().into_iter().flatten() {
            println!("  {k:<30} {v}");
        }
        worst
    } else {
        serde_json::to_value(&runs[0])?
    };
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
        println!("wrote {}", path.display());
    }
    let failed: Vec<u64> = runs
        .iter()
        .filter(|r| !r.converged)
        .map(|r| r.seed)
        .collect();
    if !failed.is_empty() {
        anyhow::bail!("seeds {failed:?} did not converge");
    }
    Ok(())
}
