//! `redline-server`: runs a Redline relay.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use redline_server::{DEFAULT_LISTEN, Relay, RelayConfig};

/// The Redline relay: devices sync their team ledgers and household books through it
/// over QUIC.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay until Ctrl-C or SIGTERM.
    ///
    /// On first start it creates the data dir and a self-signed development certificate,
    /// and prints the certificate's SHA-256 fingerprint: give it to devices to pin.
    Serve {
        /// Where documents and the certificate are kept.
        #[arg(long, env = "REDLINE_DATA_DIR", default_value = "./redline-data")]
        data_dir: PathBuf,
        /// UDP address to listen on.
        #[arg(long, env = "REDLINE_LISTEN", default_value_t = DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Memory budget of the parsed-document cache, in MiB (cold documents stay
        /// compressed on disk).
        #[arg(long, env = "REDLINE_CACHE_MB", default_value_t = 512)]
        cache_mb: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve {
            data_dir,
            listen,
            cache_mb,
        } => serve(data_dir, listen, cache_mb).await,
    }
}

async fn serve(data_dir: PathBuf, listen: SocketAddr, cache_mb: usize) -> anyhow::Result<()> {
    let mut config = RelayConfig::new(&data_dir).with_listen(listen);
    config.cache_budget_bytes = cache_mb.saturating_mul(1024 * 1024);
    let relay = Relay::start(config)
        .await
        .with_context(|| format!("starting the relay with data dir {}", data_dir.display()))?;
    println!("Redline relay {}", env!("CARGO_PKG_VERSION"));
    println!("  data dir     {}", data_dir.display());
    println!(
        "  listening    udp {} (QUIC, ALPN redline/1)",
        relay.local_addr()
    );
    println!(
        "  certificate  self-signed dev certificate ({})",
        if relay.created_certificate() {
            "created now"
        } else {
            "loaded"
        }
    );
    println!("  fingerprint  {}", relay.fingerprint());
    println!("Devices pin this fingerprint. Stop with Ctrl-C.");
    wait_for_signal().await?;
    println!("shutting down: finishing in-flight writes");
    relay.shutdown().await?;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}
