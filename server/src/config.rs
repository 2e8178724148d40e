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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_changes_per_message: 200_000,
            messages_per_second: 2_000,
            message_burst: 20_000,
            streams_per_second: 50,
            hello_timeout: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(30),
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
        }
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
