//! The relay's configuration. Every field has a default that works on a laptop: a first
//! start needs no flags at all.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use redline_proto::codec::DEFAULT_MAX_FRAME;

/// The relay's UDP port unless told otherwise.
pub const DEFAULT_PORT: u16 = 7447;

/// Where the relay listens unless told otherwise: loopback only, so a first start exposes
/// nothing to the network.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, DEFAULT_PORT));

/// Where the metrics and health endpoint listens unless told otherwise (TCP, loopback).
pub const DEFAULT_HTTP_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7448));

/// How a relay runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Holds the document store (`db/`) and the dev certificate (`tls/`).
    pub data_dir: PathBuf,
    /// UDP address of the QUIC endpoint. Port 0 picks a free one (tests).
    pub listen: SocketAddr,
    /// TCP address of the `/metrics` and `/health` endpoint (`None`: off). Loopback by
    /// default.
    pub http_listen: Option<SocketAddr>,
    /// Largest frame accepted from a device.
    pub max_frame: usize,
    /// Connections served at once; further handshakes are refused.
    pub max_connections: usize,
    /// Bidirectional streams a device may have open at once.
    pub max_streams_per_connection: u32,
    /// A connection silent for this long is closed (phones keep alive below it).
    pub idle_timeout: Duration,
    /// Receive and send buffer asked of the kernel for the UDP socket. Hundreds of phones
    /// reconnecting at once overflow the default (about 200 KB on Linux): datagrams are
    /// dropped before the relay sees them, and a handshake can stall for seconds. The
    /// kernel caps it at `net.core.rmem_max`/`wmem_max`; the relay logs what it got.
    pub udp_buffer_bytes: usize,
    /// Memory budget of the parsed-document cache (an estimate; cold documents stay
    /// compressed on disk).
    pub cache_budget_bytes: usize,
    /// Largest document or upload accepted.
    pub max_document_bytes: u64,
    /// The relay's name in [`Welcome`](redline_proto::message::Welcome) messages and logs.
    pub name: String,
    /// Where the TLS certificate comes from.
    pub tls: TlsMode,
    /// Limits that protect the relay from misbehaving devices.
    pub limits: Limits,
    /// A volunteer's device returning after longer than this since its last sync is
    /// quarantined: its changes are held for a lead's review (`None`: never).
    pub quarantine_after: Option<Duration>,
    /// Connections and per-device storage one token or address may take.
    pub quotas: Quotas,
    /// The revocation list (`None`: `<data_dir>/revoked`). Keep it outside what a backup
    /// restore rolls back.
    pub revoked_file: Option<PathBuf>,
    /// The newest protocol version this relay speaks (default: the build's
    /// [`PROTOCOL_VERSION`](redline_proto::PROTOCOL_VERSION)). During a staged rollout,
    /// pin every relay of a deployment to the version the oldest of them speaks, so a
    /// phone moving between relays meets one version.
    pub protocol_version: u16,
    /// Where documents and the feed are stored.
    pub storage: StorageChoice,
}

/// The storage backend of a relay.
#[derive(Clone, Debug, Default)]
pub enum StorageChoice {
    /// sled in `<data_dir>/db` (embedded; the default).
    #[default]
    Sled,
    /// A PostgreSQL database, which several relays may share.
    Postgres(crate::storage::PgOptions),
}

/// What one token, device or address may take of the relay, so that a hostile token
/// holder cannot crowd out the others. Refusals are counted in `/metrics`
/// (`redline_quota_refusals_total`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Quotas {
    /// Connections one token may hold at once (a phone replacing an unanswered
    /// connection needs a few).
    pub connections_per_token: usize,
    /// Connections from one source address at once, handshakes included. Phones behind
    /// one carrier NAT share an address: keep this generous.
    pub connections_per_address: usize,
    /// Above this many connections still in their handshake or without a hello, new
    /// ones must prove their address first (QUIC Retry).
    pub retry_above_pending: usize,
    /// Upload bytes one device may have staged (unfinished uploads).
    pub staged_bytes_per_device: u64,
    /// An unfinished upload untouched for this long is dropped.
    pub upload_expiry: Duration,
    /// Bytes of quarantined changes held for one device.
    pub held_bytes_per_device: u64,
    /// Documents one device may create per day (a document is created by its first
    /// change).
    pub new_documents_per_device_per_day: u32,
    /// A ledger day may be created only within this many days before the relay's date...
    pub ledger_days_back: u32,
    /// ...and this many after it.
    pub ledger_days_ahead: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            connections_per_token: 8,
            connections_per_address: 1_000,
            retry_above_pending: 256,
            staged_bytes_per_device: 256 * 1024 * 1024,
            upload_expiry: Duration::from_secs(24 * 3_600),
            held_bytes_per_device: 256 * 1024 * 1024,
            new_documents_per_device_per_day: 200,
            ledger_days_back: 60,
            ledger_days_ahead: 2,
        }
    }
}

/// Where the relay's certificate comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// A self-signed certificate kept in `<data_dir>/tls/`; devices pin its fingerprint.
    #[default]
    Dev,
    /// Certificate chain and key from PEM files.
    Files {
        /// The certificate chain (leaf first).
        cert: PathBuf,
        /// The private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
}

/// Per-connection limits. A connection that exceeds one is closed with an error code;
/// other devices carry on.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Limits {
    /// Changes one push or upload may carry.
    pub max_changes_per_message: usize,
    /// Messages per second a connection may send on average...
    pub messages_per_second: u32,
    /// ...with bursts up to this many.
    pub message_burst: u32,
    /// Streams a connection may open per second on average (bursts up to
    /// `max_streams_per_connection`).
    pub streams_per_second: u32,
    /// Time for a device to send its `Hello` after connecting.
    pub hello_timeout: Duration,
    /// A stream the relay waits on (an upload's next frame, a frame begun but not
    /// finished) is closed after this long without progress.
    pub stream_idle_timeout: Duration,
    /// Every write to a device and every stream the relay opens to it must complete
    /// within this long; a device that stops reading is closed (`timed_out`).
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_changes_per_message: 200_000,
            messages_per_second: 2_000,
            message_burst: 20_000,
            streams_per_second: 50,
            hello_timeout: Duration::from_secs(5),
            stream_idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(20),
        }
    }
}

impl RelayConfig {
    /// Defaults, with the data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: DEFAULT_LISTEN,
            http_listen: Some(DEFAULT_HTTP_LISTEN),
            max_frame: DEFAULT_MAX_FRAME,
            max_connections: 10_000,
            max_streams_per_connection: 64,
            idle_timeout: Duration::from_secs(60),
            udp_buffer_bytes: 8 * 1024 * 1024,
            cache_budget_bytes: 512 * 1024 * 1024,
            max_document_bytes: 256 * 1024 * 1024,
            name: "redline-relay".into(),
            tls: TlsMode::Dev,
            limits: Limits::default(),
            quarantine_after: Some(Duration::from_secs(14 * 86_400)),
            quotas: Quotas::default(),
            revoked_file: None,
            protocol_version: redline_proto::PROTOCOL_VERSION,
            storage: StorageChoice::Sled,
        }
    }

    /// The revocation list in use.
    pub fn revoked_file(&self) -> PathBuf {
        self.revoked_file
            .clone()
            .unwrap_or_else(|| crate::auth::default_revoked_file(&self.data_dir))
    }

    /// Sets the listen address.
    pub fn with_listen(mut self, listen: SocketAddr) -> Self {
        self.listen = listen;
        self
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self::new("./redline-data")
    }
}
