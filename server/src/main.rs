//! `redline-server`: runs a Redline relay and administers it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use redline_server::settings::{self, FileConfig};
use redline_server::{Relay, RelayConfig, TlsMode};

/// The Redline relay: devices sync their team ledgers and household books through it
/// over QUIC.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, env = "REDLINE_LOG_FORMAT", value_enum, global = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create a data dir: configuration file, dev certificate, token key and an operator
    /// token for the admin commands.
    Init {
        /// Where to create it.
        #[arg(long, env = "REDLINE_DATA_DIR", default_value = "./redline-data")]
        data_dir: PathBuf,
        /// The organisation whose roster the admin commands edit.
        #[arg(long, default_value = "org")]
        org: String,
    },
    /// Run the relay until Ctrl-C or SIGTERM.
    ///
    /// Settings come from flags, then REDLINE_* environment variables, then the TOML file
    /// (--config, or redline.toml in the data dir), then built-in defaults. A first start
    /// needs nothing: it creates the data dir and a dev certificate and prints its
    /// fingerprint for devices to pin.
    Serve(ServeArgs),
    /// Create or upgrade the PostgreSQL schema to this relay's version, then exit.
    /// (`serve` does the same at start; run it alone before a rolling upgrade.)
    Migrate {
        /// TOML configuration file (default: redline.toml in the data dir, if present).
        #[arg(long, env = "REDLINE_CONFIG")]
        config: Option<PathBuf>,
        /// The data dir whose redline.toml names the database.
        #[arg(long, env = "REDLINE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// Issue, revoke and inspect device tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Moved: roster administration is `redline roster` (same arguments), so the relay
    /// binary carries no device core.
    #[command(hide = true, disable_help_flag = true)]
    Roster {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file (default: redline.toml in the data dir, if present).
    #[arg(long, env = "REDLINE_CONFIG")]
    config: Option<PathBuf>,
    /// Where documents, certificate and keys are kept [default: ./redline-data].
    #[arg(long, env = "REDLINE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// UDP address to listen on [default: 127.0.0.1:7447].
    #[arg(long, env = "REDLINE_LISTEN")]
    listen: Option<SocketAddr>,
    /// TCP address of /metrics and /health, or "off" [default: 127.0.0.1:7448].
    #[arg(long, env = "REDLINE_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// Parsed-document cache budget in MiB [default: 512].
    #[arg(long, env = "REDLINE_CACHE_MB")]
    cache_mb: Option<usize>,
    /// Largest document in MiB [default: 256].
    #[arg(long, env = "REDLINE_MAX_DOCUMENT_MB")]
    max_document_mb: Option<u64>,
    /// Kernel UDP receive/send buffers in KiB, capped by net.core.rmem_max [default: 8192].
    #[arg(long, env = "REDLINE_UDP_BUFFER_KB")]
    udp_buffer_kb: Option<usize>,
    /// Production TLS: certificate chain (PEM). Without it, the dev certificate.
    #[arg(long, env = "REDLINE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Production TLS: private key (PEM).
    #[arg(long, env = "REDLINE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The revocation list [default: <data dir>/revoked]. Keep it out of backups.
    #[arg(long, env = "REDLINE_REVOKED_FILE")]
    revoked_file: Option<PathBuf>,
    #[command(flatten)]
    storage: StorageArgs,
}

/// Where the relay stores documents.
#[derive(clap::Args)]
struct StorageArgs {
    /// sled (embedded, in <data dir>/db) or postgres [default: postgres when a URL is
    /// given, else sled].
    #[arg(long, env = "REDLINE_STORAGE")]
    storage: Option<String>,
    /// PostgreSQL database, e.g. postgres://redline@db.internal/redline. Several relays
    /// may share one.
    #[arg(long, env = "REDLINE_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// Certificate authority (PEM) of the PostgreSQL server: connect with TLS.
    #[arg(long, env = "REDLINE_POSTGRES_CA")]
    postgres_ca: Option<PathBuf>,
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
        /// The revocation list [default: revoked_file of the data dir's redline.toml,
        /// else <data dir>/revoked].
        #[arg(long, env = "REDLINE_REVOKED_FILE")]
        revoked_file: Option<PathBuf>,
        /// The token id (32 hex digits, printed at issue), or the token itself.
        id: String,
    },
    /// Show what a token claims. The claims are NOT verified: anyone can write a token
    /// that claims anything; only the relay's key can tell.
    Show {
        /// The token.
        token: String,
    },
}

fn init_logs(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let (config, file) = resolve(args)?;
            let format = cli.log_format.unwrap_or(match file.log_format.as_deref() {
                Some("json") => LogFormat::Json,
                _ => LogFormat::Human,
            });
            init_logs(format);
            serve(config).await
        }
        other => {
            init_logs(cli.log_format.unwrap_or(LogFormat::Human));
            match other {
                Command::Init { data_dir, org } => init(&data_dir, &org),
                Command::Token(t) => token_command(t),
                Command::Migrate {
                    config,
                    data_dir,
                    storage,
                } => migrate(config, data_dir, storage).await,
                Command::Roster { .. } => anyhow::bail!(
                    "roster administration moved to the `redline` tool: `redline roster` takes the same arguments"
                ),
                Command::Serve(_) => unreachable!("handled above"),
            }
        }
    }
}

/// Flags and environment over the file over the defaults.
fn resolve(args: ServeArgs) -> anyhow::Result<(RelayConfig, FileConfig)> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| "./redline-data".into());
    let file_path = match &args.config {
        Some(p) => Some(p.clone()),
        None => Some(data_dir.join(settings::FILE_NAME)).filter(|p| p.exists()),
    };
    let file = match &file_path {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let mut config = file.apply(RelayConfig::new(&data_dir))?;
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(h) = args.http_listen {
        config.http_listen = settings::http_listen(&h)?;
    }
    if let Some(mb) = args.cache_mb {
        config.cache_budget_bytes = mb.saturating_mul(1 << 20);
    }
    if let Some(mb) = args.max_document_mb {
        config.max_document_bytes = mb.saturating_mul(1 << 20);
    }
    if let Some(kb) = args.udp_buffer_kb {
        config.udp_buffer_bytes = kb.saturating_mul(1 << 10);
    }
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = TlsMode::Files { cert, key };
    }
    if let Some(r) = args.revoked_file {
        config.revoked_file = Some(r);
    }
    apply_storage(&mut config, &file, args.storage)?;
    Ok((config, file))
}

/// Storage flags over the file's storage settings.
fn apply_storage(
    config: &mut RelayConfig,
    file: &FileConfig,
    args: StorageArgs,
) -> anyhow::Result<()> {
    if args.storage.is_some() || args.postgres_url.is_some() || args.postgres_ca.is_some() {
        config.storage = settings::storage_choice(
            args.storage.as_deref().or(file.storage.as_deref()),
            args.postgres_url
                .as_deref()
                .or(file.postgres_url.as_deref()),
            args.postgres_ca.as_deref().or(file.postgres_ca.as_deref()),
            file.postgres_pool,
        )?;
    }
    Ok(())
}

async fn migrate(
    config_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    storage: StorageArgs,
) -> anyhow::Result<()> {
    use redline_server::config::StorageChoice;
    let data_dir = data_dir.unwrap_or_else(|| "./redline-data".into());
    let file_path =
        config_file.or_else(|| Some(data_dir.join(settings::FILE_NAME)).filter(|p| p.exists()));
    let file = match &file_path {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let mut config = file.apply(RelayConfig::new(&data_dir))?;
    apply_storage(&mut config, &file, storage)?;
    let StorageChoice::Postgres(options) = config.storage else {
        anyhow::bail!(
            "nothing to migrate: this relay stores in sled (give --postgres-url, \
             REDLINE_POSTGRES_URL or postgres_url in redline.toml)"
        );
    };
    let (db, from) = tokio::task::spawn_blocking(move || {
        let db = redline_server::storage::PgStorage::connect(&options)?;
        Ok::<_, redline_server::Error>((db.target().to_string(), db.schema_found()))
    })
    .await??;
    let to = redline_server::storage::postgres::SCHEMA_VERSION;
    if from == to {
        println!("{db}: schema already at version {to}");
    } else {
        println!("{db}: schema migrated from version {from} to {to}");
    }
    Ok(())
}

async fn serve(config: RelayConfig) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let production = config.tls != TlsMode::Dev;
    let relay = Relay::start(config)
        .await
        .with_context(|| format!("starting the relay with data dir {}", data_dir.display()))?;
    println!("Redline relay {}", env!("CARGO_PKG_VERSION"));
    println!("  data dir     {}", data_dir.display());
    println!("  storage      {}", relay.storage_description());
    println!(
        "  listening    udp {} (QUIC, ALPN redline/1)",
        relay.local_addr()
    );
    match relay.http_addr() {
        Some(a) => println!("  metrics      http://{a}/metrics (health: /health)"),
        None => println!("  metrics      off"),
    }
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
    println!("  udp buffers  {}", relay.udp_buffers().describe());
    println!("Devices pin this fingerprint and need a token: redline-server token issue --help");
    println!("Stop with Ctrl-C.");
    wait_for_signal().await?;
    println!("shutting down: finishing in-flight writes");
    relay.shutdown().await?;
    Ok(())
}

use redline_server::settings::OPERATOR_TOKEN;
const ADMIN_DEVICE: &str = "relay-admin";

fn init(data_dir: &Path, org: &str) -> anyhow::Result<()> {
    redline_proto::OrgId::new(org)?;
    redline_server::auth::create_private_dir(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let config_path = data_dir.join(settings::FILE_NAME);
    if config_path.exists() {
        println!("kept      {} (already there)", config_path.display());
    } else {
        // Top-level keys before the file's tables ([quotas], [tls]).
        let text = format!(
            "# The organisation whose roster `redline roster` edits.\norg = {org:?}\n{}",
            FileConfig::starter(data_dir)
        );
        std::fs::write(&config_path, text)
            .with_context(|| format!("writing {}", config_path.display()))?;
        println!("wrote     {}", config_path.display());
    }
    let identity = redline_server::tls::load_or_create_dev_identity(&data_dir.join("tls"))?;
    println!(
        "{}  dev certificate, fingerprint {}",
        if identity.created {
            "created"
        } else {
            "kept   "
        },
        identity.fingerprint()
    );
    redline_server::auth::load_or_create_key(data_dir)?;
    let token_path = data_dir.join(OPERATOR_TOKEN);
    if token_path.exists() {
        println!("kept      {}", token_path.display());
    } else {
        let (claims, token) = redline_server::auth::issue(
            data_dir,
            redline_server::auth::TokenRequest {
                device: redline_proto::DeviceId::new(ADMIN_DEVICE)?,
                member: redline_proto::MemberId::new("operator")?,
                role: redline_proto::token::Role::Operator,
                teams: Vec::new(),
                zones: Vec::new(),
                ttl: std::time::Duration::from_secs(365 * 86_400),
            },
        )?;
        write_private(&token_path, token.as_bytes())?;
        println!(
            "issued    operator token {} -> {}",
            claims.id,
            token_path.display()
        );
    }
    println!();
    println!(
        "Next: redline-server serve --data-dir {}",
        data_dir.display()
    );
    println!(
        "      redline roster --data-dir {} add-team team-1 --name \"Team 1\"",
        data_dir.display()
    );
    println!(
        "      redline-server token issue --data-dir {} --member ana --device phone-ana --team team-1",
        data_dir.display()
    );
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
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
        TokenCommand::Revoke {
            data_dir,
            revoked_file,
            id,
        } => {
            let id = match TokenId::parse(&id) {
                Ok(id) => id,
                Err(_) => {
                    token::peek(&id)
                        .context("expected a token id (32 hex digits) or a token")?
                        .id
                }
            };
            let file = match revoked_file {
                Some(f) => f,
                None => {
                    let toml = data_dir.join(settings::FILE_NAME);
                    let from_file = if toml.exists() {
                        FileConfig::load(&toml)?.revoked_file
                    } else {
                        None
                    };
                    from_file
                        .unwrap_or_else(|| redline_server::auth::default_revoked_file(&data_dir))
                }
            };
            redline_server::auth::revoke_in(&file, id)?;
            println!("revoked {id} (in {})", file.display());
        }
        TokenCommand::Show { token } => {
            let c = token::peek(&token)?;
            println!(
                "UNVERIFIED: these are the token's claims; its signature is not checked here."
            );
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
