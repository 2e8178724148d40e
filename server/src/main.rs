//! `redline-server`: runs a Redline relay.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use redline_server::{DEFAULT_LISTEN, Relay, RelayConfig, TlsMode};

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
        /// Production TLS: certificate chain (PEM). Without it, the dev certificate.
        #[arg(long, env = "REDLINE_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// Production TLS: private key (PEM).
        #[arg(long, env = "REDLINE_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Issue, revoke and inspect device tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Issue a token for one device; prints the token (only) on stdout.
    ///
    /// Example: redline-server token issue --member ana --device phone-ana --role volunteer
    /// --team t3 --zones z1,z2 --ttl 30d
    Issue {
        /// The relay's data dir (holds the signing key).
        #[arg(long, env = "REDLINE_DATA_DIR", default_value = "./redline-data")]
        data_dir: PathBuf,
        /// The member the device belongs to.
        #[arg(long)]
        member: String,
        /// The device id the token is bound to (the app takes it from the token).
        #[arg(long)]
        device: String,
        /// volunteer, lead or operator.
        #[arg(long, default_value = "volunteer")]
        role: String,
        /// Teams whose ledgers it may read and write (repeat or separate with commas).
        #[arg(long = "team", value_delimiter = ',')]
        teams: Vec<String>,
        /// Zones whose households books it may read and write.
        #[arg(long, value_delimiter = ',')]
        zones: Vec<String>,
        /// How long it is valid: 30d, 12h, 90m or 45s.
        #[arg(long, default_value = "30d")]
        ttl: String,
    },
    /// Revoke a token by id; a running relay closes its connections within 100 ms.
    Revoke {
        /// The relay's data dir.
        #[arg(long, env = "REDLINE_DATA_DIR", default_value = "./redline-data")]
        data_dir: PathBuf,
        /// The token id (32 hex digits, printed at issue), or the token itself.
        id: String,
    },
    /// Show what a token claims (without checking its signature).
    Show {
        /// The token.
        token: String,
    },
}

/// Parses `30d`, `12h`, `90m`, `45s`.
fn parse_ttl(text: &str) -> anyhow::Result<std::time::Duration> {
    let text = text.trim();
    let split = text.len().saturating_sub(1);
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .with_context(|| format!("ttl {text:?}: expected a number and d, h, m or s, like 30d"))?;
    let secs = match unit {
        "d" => n * 86_400,
        "h" => n * 3_600,
        "m" => n * 60,
        "s" => n,
        _ => anyhow::bail!("ttl {text:?}: expected a number and d, h, m or s, like 30d"),
    };
    Ok(std::time::Duration::from_secs(secs))
}

fn token_command(command: TokenCommand) -> anyhow::Result<()> {
    use redline_proto::token::{self, TokenId};
    use redline_proto::{DeviceId, MemberId, TeamId, ZoneId};
    match command {
        TokenCommand::Issue {
            data_dir,
            member,
            device,
            role,
            teams,
            zones,
            ttl,
        } => {
            let request = redline_server::auth::TokenRequest {
                device: DeviceId::new(device)?,
                member: MemberId::new(member)?,
                role: role.parse()?,
                teams: teams
                    .into_iter()
                    .map(TeamId::new)
                    .collect::<Result<_, _>>()?,
                zones: zones
                    .into_iter()
                    .map(ZoneId::new)
                    .collect::<Result<_, _>>()?,
                ttl: parse_ttl(&ttl)?,
            };
            let (claims, token) = redline_server::auth::issue(&data_dir, request)
                .with_context(|| format!("issuing with data dir {}", data_dir.display()))?;
            eprintln!(
                "token {} for {} on {} ({}), teams [{}], zones [{}], expires in {ttl}",
                claims.id,
                claims.member,
                claims.device,
                claims.role,
                join(&claims.teams),
                join(&claims.zones)
            );
            println!("{token}");
        }
        TokenCommand::Revoke { data_dir, id } => {
            let id = match TokenId::parse(&id) {
                Ok(id) => id,
                Err(_) => {
                    token::peek(&id)
                        .context("expected a token id (32 hex digits) or a token")?
                        .id
                }
            };
            redline_server::auth::revoke(&data_dir, id)?;
            println!("revoked {id}");
        }
        TokenCommand::Show { token } => {
            let c = token::peek(&token)?;
            println!("id       {}", c.id);
            println!("device   {}", c.device);
            println!("member   {}", c.member);
            println!("role     {}", c.role);
            println!("teams    {}", join(&c.teams));
            println!("zones    {}", join(&c.zones));
            println!("issued   {} (Unix seconds)", c.issued);
            println!("expires  {} (Unix seconds)", c.expires);
        }
    }
    Ok(())
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
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
            tls_cert,
            tls_key,
        } => {
            let mut config = RelayConfig::new(&data_dir).with_listen(listen);
            config.cache_budget_bytes = cache_mb.saturating_mul(1024 * 1024);
            if let (Some(cert), Some(key)) = (tls_cert, tls_key) {
                config.tls = TlsMode::Files { cert, key };
            }
            serve(config).await
        }
        Command::Token(t) => token_command(t),
    }
}

async fn serve(config: RelayConfig) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let production = config.tls != TlsMode::Dev;
    let relay = Relay::start(config)
        .await
        .with_context(|| format!("starting the relay with data dir {}", data_dir.display()))?;
    println!("Redline relay {}", env!("CARGO_PKG_VERSION"));
    println!("  data dir     {}", data_dir.display());
    println!(
        "  listening    udp {} (QUIC, ALPN redline/1)",
        relay.local_addr()
    );
    if production {
        println!("  certificate  from PEM files (production)");
    } else {
        println!(
            "  certificate  self-signed dev certificate ({})",
            if relay.created_certificate() {
                "created now"
            } else {
                "loaded"
            }
        );
    }
    println!("  fingerprint  {}", relay.fingerprint());
    println!("Devices pin this fingerprint and need a token: redline-server token issue --help");
    println!("Stop with Ctrl-C.");
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
