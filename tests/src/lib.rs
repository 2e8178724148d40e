//! Shared pieces for Redline's end-to-end tests: a real relay on loopback in a temp dir,
//! and phones (real clients on their own temp dirs) pointed at it.
//!
//! Nothing here is a mock: the relay is the same `redline_server::Relay` the binary runs,
//! the phones are `redline_client::Client`s over sled, talking QUIC with TLS.

pub mod faults;
pub mod fieldday;
pub mod postgres;
pub mod sim;
pub mod soak;
pub mod steady;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use redline_client::{Client, ClientConfig, RelayEndpoint};
use redline_proto::token::Role;
use redline_proto::{DeviceId, MemberId, OrgId, TeamId, ZoneId};
use redline_server::auth::TokenRequest;
use redline_server::{Relay, RelayConfig, RelayHandle};
use sha2::{Digest, Sha256};

/// Starts a relay with its data in `dir`, on 127.0.0.1 with free ports (QUIC and
/// metrics), configured by [`test_config`].
pub async fn start_relay(dir: &Path) -> anyhow::Result<RelayHandle> {
    start_relay_with(test_config(dir)).await
}

/// The defaults, except that any ledger day may be started and a device may start as
/// many documents as it likes: these suites write fixed dates (2025, November 2026)
/// and many days per phone. The security suite checks the default window and quotas.
pub fn test_config(dir: impl Into<std::path::PathBuf>) -> RelayConfig {
    let mut config = RelayConfig::new(dir);
    config.quotas.ledger_days_back = 36_500;
    config.quotas.ledger_days_ahead = 36_500;
    config.quotas.new_documents_per_device_per_day = 1_000_000;
    config
}

/// Today (UTC) as a ledger day.
pub fn today() -> redline_proto::Day {
    redline_proto::Day::new(time::OffsetDateTime::now_utc().date().to_string())
        .expect("today is a valid day")
}

/// Starts a relay with `config`, its QUIC and metrics addresses forced to 127.0.0.1 with
/// free ports.
pub async fn start_relay_with(mut config: RelayConfig) -> anyhow::Result<RelayHandle> {
    config.http_listen = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
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

/// Copies the directory `from` into `to`, recursively (a backup, a fixture).
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
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

/// A device that speaks the protocol by hand: for tests that send what a well-behaved
/// client never would (garbage, forged changes, oversized frames, silence).
pub struct RawDevice {
    _endpoint: quinn::Endpoint,
    /// The QUIC connection.
    pub conn: quinn::Connection,
    /// The control stream's send side.
    pub send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: redline_proto::codec::FrameDecoder,
}

impl RawDevice {
    /// Connects to `relay` (real TLS, pinned) and opens the control stream.
    pub async fn connect(relay: &RelayHandle) -> anyhow::Result<Self> {
        Self::connect_with(relay, &redline_client::transport::ConnectOptions::default()).await
    }

    /// [`connect`](Self::connect) from another address, or with a receive window so
    /// small that the relay's writes stall until this side reads.
    pub async fn connect_with(
        relay: &RelayHandle,
        options: &redline_client::transport::ConnectOptions,
    ) -> anyhow::Result<Self> {
        let (endpoint, conn) =
            redline_client::transport::open_connection_with(&endpoint(relay), options).await?;
        let (send, recv) = conn.open_bi().await?;
        Ok(Self {
            _endpoint: endpoint,
            conn,
            send,
            recv,
            decoder: redline_proto::codec::FrameDecoder::new(
                redline_proto::codec::DEFAULT_MAX_FRAME,
            ),
        })
    }

    /// Sends one message on the control stream.
    pub async fn send(&mut self, msg: &redline_proto::Message) -> anyhow::Result<()> {
        let frame =
            redline_proto::codec::encode_frame(msg, redline_proto::codec::DEFAULT_MAX_FRAME)?;
        self.send.write_all(&frame).await?;
        Ok(())
    }

    /// The control stream's receive side, for tests that read frames themselves.
    pub fn recv_mut(&mut self) -> &mut quinn::RecvStream {
        &mut self.recv
    }

    /// Sends raw bytes on the control stream.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.send.write_all(bytes).await?;
        Ok(())
    }

    /// Sends a `Hello` and returns the relay's answer (`Welcome` or `Error`).
    pub async fn hello(
        &mut self,
        device: &DeviceId,
        token: &str,
        subscription: redline_proto::message::Subscription,
    ) -> anyhow::Result<redline_proto::Message> {
        self.hello_at(redline_proto::PROTOCOL_VERSION, device, token, subscription)
            .await
    }

    /// [`hello`](Self::hello) naming protocol `version`.
    pub async fn hello_at(
        &mut self,
        version: u16,
        device: &DeviceId,
        token: &str,
        subscription: redline_proto::message::Subscription,
    ) -> anyhow::Result<redline_proto::Message> {
        self.send(&redline_proto::Message::Hello(
            redline_proto::message::Hello {
                protocol_version: version,
                device: device.clone(),
                app_version: "raw-test".into(),
                subscription,
                token: token.into(),
            },
        ))
        .await?;
        self.next(Duration::from_secs(5))
            .await?
            .ok_or_else(|| anyhow::anyhow!("no answer to hello"))
    }

    /// The next message from the relay, `None` if the stream ended or `within` passed.
    pub async fn next(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<Option<redline_proto::Message>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(m) = self.decoder.next_message()? {
                return Ok(Some(m));
            }
            match tokio::time::timeout_at(deadline, self.recv.read_chunk(64 * 1024, true)).await {
                Err(_) => return Ok(None),
                Ok(Ok(Some(chunk))) => self.decoder.push(&chunk.bytes),
                Ok(Ok(None)) | Ok(Err(_)) => return Ok(None),
            }
        }
    }

    /// Messages until one matches `last` (included), the stream ends or `within` passes.
    pub async fn until(
        &mut self,
        within: Duration,
        last: impl Fn(&redline_proto::Message) -> bool,
    ) -> anyhow::Result<Vec<redline_proto::Message>> {
        let deadline = tokio::time::Instant::now() + within;
        let mut all = Vec::new();
        while let Some(m) = self
            .next(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await?
        {
            let done = last(&m);
            all.push(m);
            if done {
                break;
            }
        }
        Ok(all)
    }

    /// Every message until the stream ends or `within` passes.
    pub async fn drain(&mut self, within: Duration) -> anyhow::Result<Vec<redline_proto::Message>> {
        let deadline = tokio::time::Instant::now() + within;
        let mut all = Vec::new();
        while let Some(m) = self
            .next(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await?
        {
            all.push(m);
        }
        Ok(all)
    }

    /// The application code the relay closed the connection with, if it did so within
    /// `within`.
    pub async fn closed_with(&self, within: Duration) -> Option<u16> {
        match tokio::time::timeout(within, self.conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
                u16::try_from(c.error_code.into_inner()).ok()
            }
            _ => None,
        }
    }
}
