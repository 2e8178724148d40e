//! Shared pieces for Redline's end-to-end tests: a real relay on loopback in a temp dir,
//! and phones (real clients on their own temp dirs) pointed at it.
//!
//! Nothing here is a mock: the relay is the same `redline_server::Relay` the binary runs,
//! the phones are `redline_client::Client`s over sled, talking QUIC with TLS.

pub mod fieldday;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use redline_client::{Client, ClientConfig, RelayEndpoint};
use redline_proto::MemberId;
use redline_server::{Relay, RelayConfig, RelayHandle};

/// Starts a relay with its data in `dir`, on 127.0.0.1 with a free port.
pub async fn start_relay(dir: &Path) -> anyhow::Result<RelayHandle> {
    let config = RelayConfig::new(dir).with_listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    Ok(Relay::start(config).await?)
}

/// Starts a relay with `config` (its listen address forced to 127.0.0.1 with a free port).
pub async fn start_relay_with(config: RelayConfig) -> anyhow::Result<RelayHandle> {
    Ok(Relay::start(config.with_listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))).await?)
}

/// A phone subscribed to `teams` and `zones`, keeping `keep_days` ledger days.
pub fn team_phone(
    dir: &Path,
    member: &str,
    relay: RelayEndpoint,
    teams: &[&str],
    zones: &[&str],
    keep_days: u32,
) -> anyhow::Result<Client> {
    let config = ClientConfig::new(MemberId::new(member)?)
        .with_relay(relay)
        .with_teams(
            teams
                .iter()
                .map(|t| redline_proto::TeamId::new(*t))
                .collect::<Result<_, _>>()?,
        )
        .with_zones(
            zones
                .iter()
                .map(|z| redline_proto::ZoneId::new(*z))
                .collect::<Result<_, _>>()?,
        )
        .with_keep_days(keep_days);
    Ok(Client::open(dir, config)?)
}

/// How a phone finds `relay`.
pub fn endpoint(relay: &RelayHandle) -> RelayEndpoint {
    RelayEndpoint::new(relay.local_addr(), relay.fingerprint())
}

/// Opens a phone for `member` with its store in `dir`, syncing with `relay`.
pub fn phone(dir: &Path, member: &str, relay: RelayEndpoint) -> anyhow::Result<Client> {
    let config = ClientConfig::new(MemberId::new(member)?).with_relay(relay);
    Ok(Client::open(dir, config)?)
}

/// Opens a phone of organisation `org` (its roster validates names once synced).
pub fn org_phone(
    dir: &Path,
    member: &str,
    org: &str,
    relay: RelayEndpoint,
) -> anyhow::Result<Client> {
    let config = ClientConfig::new(MemberId::new(member)?)
        .with_relay(relay)
        .with_org(redline_proto::OrgId::new(org)?);
    Ok(Client::open(dir, config)?)
}
