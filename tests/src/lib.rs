//! Shared pieces for Redline's end-to-end tests: a real relay on loopback in a temp dir,
//! and phones (real clients on their own temp dirs) pointed at it.
//!
//! Nothing here is a mock: the relay is the same `redline_server::Relay` the binary runs,
//! the phones are `redline_client::Client`s over sled, talking QUIC with TLS.

pub mod fieldday;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use redline_client::{Client, ClientConfig, RelayEndpoint};
use redline_proto::token::Role;
use redline_proto::{DeviceId, MemberId, OrgId, TeamId, ZoneId};
use redline_server::auth::TokenRequest;
use redline_server::{Relay, RelayConfig, RelayHandle};
use sha2::{Digest, Sha256};

/// Starts a relay with its data in `dir`, on 127.0.0.1 with a free port.
pub async fn start_relay(dir: &Path) -> anyhow::Result<RelayHandle> {
    let config = RelayConfig::new(dir).with_listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    Ok(Relay::start(config).await?)
}

/// Starts a relay with `config` (its listen address forced to 127.0.0.1 with a free port).
pub async fn start_relay_with(config: RelayConfig) -> anyhow::Result<RelayHandle> {
    Ok(Relay::start(config.with_listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))).await?)
}

/// A stable device id for the phone whose store is `dir`: reopening the same store
/// gets the same id (and so the same actor binding on the relay).
pub fn device_for(dir: &Path) -> DeviceId {
    let digest = Sha256::digest(dir.to_string_lossy().as_bytes());
    DeviceId::new(format!("dev-{}", hex::encode(&digest[..8]))).expect("valid device id")
}

/// Issues a token from the relay whose data dir is `relay_dir` for the phone in `dir`.
pub fn token_for(
    relay_dir: &Path,
    dir: &Path,
    member: &str,
    role: Role,
    teams: &[&str],
    zones: &[&str],
) -> anyhow::Result<String> {
    let request = TokenRequest {
        device: device_for(dir),
        member: MemberId::new(member)?,
        role,
        teams: teams
            .iter()
            .map(|t| TeamId::new(*t))
            .collect::<Result<_, _>>()?,
        zones: zones
            .iter()
            .map(|z| ZoneId::new(*z))
            .collect::<Result<_, _>>()?,
        ttl: Duration::from_secs(86_400),
    };
    Ok(redline_server::auth::issue(relay_dir, request)?.1)
}

/// A volunteer's phone subscribed to `teams` and `zones` (its token allows exactly
/// those), keeping `keep_days` ledger days.
pub fn team_phone(
    dir: &Path,
    member: &str,
    relay: &RelayHandle,
    teams: &[&str],
    zones: &[&str],
    keep_days: u32,
) -> anyhow::Result<Client> {
    let token = token_for(relay.data_dir(), dir, member, Role::Volunteer, teams, zones)?;
    let config = ClientConfig::new(MemberId::new(member)?)
        .with_relay(endpoint(relay))
        .with_token(token)
        .with_teams(
            teams
                .iter()
                .map(|t| TeamId::new(*t))
                .collect::<Result<_, _>>()?,
        )
        .with_zones(
            zones
                .iter()
                .map(|z| ZoneId::new(*z))
                .collect::<Result<_, _>>()?,
        )
        .with_keep_days(keep_days);
    Ok(Client::open(dir, config)?)
}

/// How a phone finds `relay`.
pub fn endpoint(relay: &RelayHandle) -> RelayEndpoint {
    RelayEndpoint::new(relay.local_addr(), relay.fingerprint())
}

/// Opens a phone for `member` with its store in `dir`, syncing with `relay`. Its token
/// is an operator's: these phones test sync, not access control.
pub fn phone(dir: &Path, member: &str, relay: &RelayHandle) -> anyhow::Result<Client> {
    phone_at(dir, member, relay, endpoint(relay))
}

/// Like [`phone`], reaching the relay through `at` (another address or pin).
pub fn phone_at(
    dir: &Path,
    member: &str,
    relay: &RelayHandle,
    at: RelayEndpoint,
) -> anyhow::Result<Client> {
    let token = token_for(relay.data_dir(), dir, member, Role::Operator, &[], &[])?;
    let config = ClientConfig::new(MemberId::new(member)?)
        .with_relay(at)
        .with_token(token);
    Ok(Client::open(dir, config)?)
}

/// Opens a phone of organisation `org` (its roster validates names once synced), with an
/// operator's token.
pub fn org_phone(
    dir: &Path,
    member: &str,
    org: &str,
    relay: &RelayHandle,
) -> anyhow::Result<Client> {
    let token = token_for(relay.data_dir(), dir, member, Role::Operator, &[], &[])?;
    let config = ClientConfig::new(MemberId::new(member)?)
        .with_relay(endpoint(relay))
        .with_token(token)
        .with_org(OrgId::new(org)?);
    Ok(Client::open(dir, config)?)
}
