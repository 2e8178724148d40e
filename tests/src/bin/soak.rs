//! The long soak: `cargo run --release -p redline-tests --bin soak -- --devices 200
//! --seconds 600 [--json soak.json]`. Prints relay memory at start and end, syncs, errors
//! and convergence; exits non-zero if anything went wrong.

use std::time::Duration;

use clap::Parser;

/// Many devices syncing in a loop against a relay process.
#[derive(Parser)]
struct Args {
    /// Devices (16 per team).
    #[arg(long, default_value_t = 200)]
    devices: usize,
    /// How long to run.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write the devices' logs here (filter from `RUST_LOG`, default
    /// `redline_client=debug`); set `REDLINE_RELAY_LOG` for the relay's.
    #[arg(long)]
    log: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    if let Some(path) = &args.log {
        let file = std::fs::File::create(path)?;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| "redline_client=debug".into());
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .init();
    }
    let dir = tempfile::tempdir()?;
    println!("soak: {} devices for {} s", args.devices, args.seconds);
    let r = redline_tests::soak::run(dir.path(), args.devices, Duration::from_secs(args.seconds))
        .await?;
    println!("syncs            {}", r.syncs);
    println!("writes           {}", r.writes);
    println!("errors           {:?}", r.errors);
    println!("reconnects       {}", r.reconnects);
    if let Some(drops) = r.udp_drops {
        println!("relay UDP drops  {drops}");
    }
    for failure in &r.failures {
        println!(
            "  device {} at {:.1} s after {:.1} s: {}",
            failure.device, failure.at_s, failure.took_s, failure.error
        );
    }
    println!("relay RSS start  {} KiB", r.rss_start_kib);
    println!("relay RSS end    {} KiB", r.rss_end_kib);
    println!("relay RSS peak   {} KiB", r.rss_peak_kib);
    println!("converged        {}", r.converged);
    println!("relay RSS every 10 s (s, KiB): {:?}", r.rss_samples);
    if let Some(path) = args.json {
        std::fs::write(path, serde_json::to_string_pretty(&r)?)?;
    }
    Ok(if r.converged && r.errors.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
