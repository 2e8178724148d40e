//! The Redline relay: devices connect over QUIC (TLS 1.3, ALPN `redline/1`), sync their
//! documents, and the relay keeps every document durably (sled embedded, or PostgreSQL
//! shared by several relays).
//!
//! - [`config`]: the relay's typed configuration, limits and defaults;
//! - [`auth`]: the token key, token issuance and the revocation list;
//! - [`access`]: what a token allows, per document kind;
//! - [`tls`]: the dev certificate and its fingerprint, or production PEM files;
//! - [`intake`]: the one door for device bytes (guard, no documents, `catch_unwind`);
//! - [`authorship`]: a change may name only the token that pushes it;
//! - [`door`]: connection seats per token and per address, QUIC Retry under load;
//! - [`storage`]: the storage traits and their sled, memory and PostgreSQL implementations;
//! - [`hub`]: the documents the relay holds, loaded on demand;
//! - [`session`]: the relay's side of one device connection without IO (its admission
//!   rule and upload streams included);
//! - [`relay`]: the QUIC endpoint, accept loop and shutdown;
//! - [`metrics`]: Prometheus metrics and the `/metrics` + `/health` HTTP endpoint;
//! - `connection`: one device connection over QUIC, driving a [`session::Session`] (and
//!   the in-process loopback the simulation drives).
//!
//! The invariant everything serves: an [`Ack`](redline_proto::message::Ack) goes out only
//! after the document it acknowledges is flushed to disk.
//!
//! ```no_run
//! # async fn run() -> Result<(), redline_server::Error> {
//! let config = redline_server::RelayConfig::new("./redline-data");
//! let relay = redline_server::Relay::start(config).await?;
//! println!("listening on {}, pin {}", relay.local_addr(), relay.fingerprint());
//! relay.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod access;
pub mod auth;
pub mod authorship;
pub mod bundle_guard;
pub mod config;
mod connection;
pub mod door;
mod endpoint;
pub mod health;
pub mod hub;
pub mod intake;
/// The relay without QUIC, for the deterministic simulation.
pub use connection::loopback;
pub mod metrics;
pub mod quarantine;
pub mod relay;
pub mod session;
pub mod settings;
pub mod state;
pub mod storage;
pub mod tls;
pub mod udp;

pub use config::{DEFAULT_LISTEN, Limits, Quotas, RelayConfig, TlsMode};
pub use relay::{Relay, RelayHandle};

use std::path::PathBuf;

/// Everything that can go wrong in the relay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or directory could not be used.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The document store failed.
    #[error("storage: {0}")]
    Storage(String),
    /// sled, the embedded store, failed.
    #[error("storage (sled): {0}")]
    Sled(#[from] sled::Error),
    /// PostgreSQL refused a statement or the connection to it failed.
    #[error("storage (PostgreSQL): {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection to PostgreSQL could be taken from the pool.
    #[error("storage (PostgreSQL pool): {0}")]
    PostgresPool(#[from] deadpool_postgres::PoolError),
    /// Another relay committed to the document since this relay loaded it: reload,
    /// apply again, retry.
    #[error("another relay committed to {0} meanwhile")]
    Conflict(String),
    /// A blocking storage task could not finish (it panicked or the runtime stopped).
    #[error("storage task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A commit failed for every push in its batch; the cause, shared by all of them.
    #[error("commit failed: {0}")]
    Commit(#[source] std::sync::Arc<Error>),
    /// A stored document could not be read back.
    #[error("stored document {doc} is unreadable: {reason}")]
    CorruptDocument {
        /// Which document.
        doc: String,
        /// Automerge's reason.
        reason: String,
    },
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// Certificate or TLS set-up failed.
    #[error("TLS: {what}")]
    Tls {
        /// What failed.
        what: String,
        /// The TLS library's error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The QUIC endpoint could not be created.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A push depends on changes the relay does not have: the device must resync.
    #[error("changes for {0} depend on changes the relay does not have")]
    MissingDependencies(String),
    /// Automerge refused the changes.
    #[error("invalid changes: {0}")]
    BadChanges(String),
    /// A document would grow beyond the relay's size limit; nothing was stored.
    #[error("too large: {0}")]
    TooLarge(String),
    /// Changes carry an Automerge actor bound to another device.
    #[error("changes by actor {actor} belong to {owner}: a device may only push its own changes")]
    ForgedActor {
        /// The actor (hex).
        actor: String,
        /// The device (or genesis) it belongs to.
        owner: String,
    },
    /// Changes name another member or device than the token that pushed them.
    #[error("forged authorship: {0}")]
    ForgedAuthorship(String),
    /// A per-device quota would be exceeded; nothing was stored.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// A protocol error on a stream.
    #[error(transparent)]
    Protocol(#[from] redline_proto::Error),
    /// The stream or connection failed.
    #[error("connection: {what}")]
    Connection {
        /// What failed.
        what: String,
        /// The transport's error (QUIC), when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The relay ends a connection for cause (credentials, limits, silence).
    #[error("{code}: {text}")]
    Refused {
        /// The code the device is told.
        code: redline_proto::ErrorCode,
        /// Why.
        text: String,
    },
}

impl Error {
    /// A connection failure caused by `e` (its text says what failed; it is kept as
    /// the source).
    pub fn connection<E: std::error::Error + Send + Sync + 'static>(e: E) -> Self {
        Error::Connection {
            what: e.to_string(),
            source: Some(Box::new(e)),
        }
    }

    /// A connection failure described by `what`, with no underlying error.
    pub fn connection_lost(what: impl Into<String>) -> Self {
        Error::Connection {
            what: what.into(),
            source: None,
        }
    }

    /// A TLS failure caused by `e`, described by `what` (what was being done).
    pub fn tls<E: std::error::Error + Send + Sync + 'static>(
        what: impl Into<String>,
        e: E,
    ) -> Self {
        Error::Tls {
            what: format!("{}: {e}", what.into()),
            source: Some(Box::new(e)),
        }
    }

    /// A TLS failure described by `what`, with no underlying error.
    pub fn tls_setup(what: impl Into<String>) -> Self {
        Error::Tls {
            what: what.into(),
            source: None,
        }
    }

    /// Whether this is a failure of the relay's own storage (the data sent is not at
    /// fault: kept, retried later), rather than a refusal of the data.
    pub fn is_storage_failure(&self) -> bool {
        match self {
            Error::Storage(_)
            | Error::Sled(_)
            | Error::Postgres(_)
            | Error::PostgresPool(_)
            | Error::Task(_)
            | Error::Io { .. } => true,
            Error::Commit(cause) => cause.is_storage_failure(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod error_tests {
    use std::error::Error as _;

    use super::Error;

    #[test]
    fn connection_and_tls_errors_keep_their_source() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "peer reset");
        let e = Error::connection(reset);
        assert_eq!(e.to_string(), "connection: peer reset");
        let source = e.source().expect("the transport's error is kept");
        assert_eq!(source.to_string(), "peer reset");
        assert!(
            Error::connection_lost("upload stream ended early")
                .source()
                .is_none()
        );

        let unreadable = std::io::Error::new(std::io::ErrorKind::InvalidData, "not PEM");
        let e = Error::tls("key file /etc/relay/key.pem", unreadable);
        assert_eq!(e.to_string(), "TLS: key file /etc/relay/key.pem: not PEM");
        assert!(e.source().is_some());
    }
}
