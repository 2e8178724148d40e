//! `redline roster`: edit the organisation's roster (teams, zones, members) through the
//! running relay, as its operator: a device store in `<data>/admin`, the relay's address
//! and certificate pin from its data dir, the operator token `redline-server init` wrote.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use redline_server::settings;

#[derive(clap::Args)]
pub struct RosterArgs {
    /// The relay's data dir (its config, certificate and operator token from `init`).
    #[arg(long, env = "REDLINE_DATA_DIR", default_value = "./redline-data")]
    data_dir: PathBuf,
    /// The relay's UDP address, if not the one in the data dir's config.
    #[arg(long, env = "REDLINE_RELAY")]
    relay: Option<SocketAddr>,
    #[command(subcommand)]
    change: RosterChange,
}

#[derive(Subcommand)]
enum RosterChange {
    /// Add (or rename) a team.
    AddTeam {
        /// Team id, e.g. team-3.
        team: String,
        /// Display name.
        #[arg(long)]
        name: String,
    },
    /// Add (or rename) a zone.
    AddZone {
        /// Zone id, e.g. z1.
        zone: String,
        /// Display name.
        #[arg(long)]
        name: String,
    },
    /// Record that a team covers a zone (--remove: no longer).
    Cover {
        /// Team id.
        team: String,
        /// Zone id.
        zone: String,
        /// Remove the coverage instead.
        #[arg(long)]
        remove: bool,
    },
    /// Add (or update) a member.
    AddMember {
        /// Member id, e.g. ana.
        member: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// volunteer, lead or operator.
        #[arg(long, default_value = "volunteer")]
        role: String,
        /// Teams (repeat or separate with commas).
        #[arg(long = "team", value_delimiter = ',')]
        teams: Vec<String>,
    },
    /// Print the roster as the relay holds it.
    Show,
}

/// The operator's client for roster commands: a store in `<data>/admin`, the relay from
/// the data dir's config (loopback when it listens on every address), the dev
/// certificate's pin, and the operator token from `init`.
fn admin_client(
    data_dir: &Path,
    relay: Option<SocketAddr>,
) -> anyhow::Result<(redline_client::Client, redline_proto::OrgId)> {
    let file_path = data_dir.join(settings::FILE_NAME);
    let file = if file_path.exists() {
        settings::FileConfig::load(&file_path)?
    } else {
        settings::FileConfig::default()
    };
    let config = file.apply(redline_server::config::RelayConfig::new(data_dir))?;
    let org = redline_proto::OrgId::new(file.org.clone().unwrap_or_else(|| "org".into()))?;
    let mut addr = relay.unwrap_or(config.listen);
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let fingerprint = match &config.tls {
        redline_server::config::TlsMode::Dev => {
            redline_server::tls::load_or_create_dev_identity(&data_dir.join("tls"))?.fingerprint()
        }
        redline_server::config::TlsMode::Files { cert, key } => {
            redline_server::tls::load_pem_identity(cert, key)?.fingerprint()
        }
    };
    let token =
        std::fs::read_to_string(data_dir.join(settings::OPERATOR_TOKEN)).with_context(|| {
            format!(
                "no operator token in {}: run `redline-server init --data-dir {}` first",
                data_dir.display(),
                data_dir.display()
            )
        })?;
    let client_config =
        redline_client::ClientConfig::new(redline_proto::MemberId::new("operator")?)
            .with_relay(redline_client::RelayEndpoint::new(addr, fingerprint))
            .with_token(token.trim())
            .with_org(org.clone());
    let client = redline_client::Client::open(data_dir.join("admin"), client_config)?;
    Ok((client, org))
}

pub async fn run(args: RosterArgs) -> anyhow::Result<()> {
    use redline_proto::{MemberId, TeamId, ZoneId};
    let (client, org) = admin_client(&args.data_dir, args.relay)?;
    let reach = |e: redline_client::Error| {
        anyhow::anyhow!(
            "{e}\n(is the relay running? start it with `redline-server serve --data-dir {}`)",
            args.data_dir.display()
        )
    };
    // Start from the relay's roster, change it, send it back.
    client.sync().await.map_err(reach)?;
    match args.change {
        RosterChange::AddTeam { team, name } => client.add_team(&TeamId::new(team)?, &name)?,
        RosterChange::AddZone { zone, name } => client.add_zone(&ZoneId::new(zone)?, &name)?,
        RosterChange::Cover { team, zone, remove } => {
            client.set_coverage(&TeamId::new(team)?, &ZoneId::new(zone)?, !remove)?
        }
        RosterChange::AddMember {
            member,
            name,
            role,
            teams,
        } => client.add_member(
            &MemberId::new(member)?,
            &name,
            redline_client::Role::parse(&role)?,
            &teams
                .into_iter()
                .map(TeamId::new)
                .collect::<Result<Vec<_>, _>>()?,
        )?,
        RosterChange::Show => {}
    }
    let report = client.sync().await.map_err(reach)?;
    if let Some((doc, why)) = report.refused.first() {
        anyhow::bail!("the relay refused {doc}: {why}");
    }
    let roster = client.roster()?;
    match roster {
        Some(r) => println!("{}", serde_json::to_string_pretty(&r)?),
        None => println!("roster/{org} is empty"),
    }
    Ok(())
}
