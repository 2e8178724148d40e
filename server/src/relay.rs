//! The relay as a running thing: [`Relay::start`] binds the QUIC endpoint and spawns the
//! accept loop; the returned [`RelayHandle`] tells the address and certificate
//! fingerprint, lets tests look at stored documents, and shuts down cleanly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use automerge::{Automerge, ChangeHash};
use redline_proto::{DocId, ErrorCode};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::auth::Authority;
use crate::config::{RelayConfig, StorageChoice, TlsMode};
use crate::connection::Shared;
use crate::hub::Hub;
use crate::state::RelayState;
use crate::storage::{Documents, PgStorage, RelayStorage, SledStorage};
use crate::tls::{self, Identity};
use crate::{Error, connection};

/// Starts relays.
pub struct Relay;

/// A running relay.
pub struct RelayHandle {
    local_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    data_dir: std::path::PathBuf,
    revoked_file: std::path::PathBuf,
    identity: Identity,
    hub: Arc<Hub>,
    state: Arc<RelayState>,
    stop: watch::Sender<bool>,
    accept_loop: tokio::task::JoinHandle<()>,
}

fn transport_config(config: &RelayConfig) -> Result<quinn::TransportConfig, Error> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .map_err(|e| Error::tls("idle timeout out of range", e))?;
    t.max_idle_timeout(Some(idle));
    t.max_concurrent_bidi_streams(config.max_streams_per_connection.into());
    t.max_concurrent_uni_streams(0u8.into());
    Ok(t)
}

impl Relay {
    /// Opens the data dir (creating the dev certificate on first start), binds the
    /// endpoint and starts serving.
    pub async fn start(config: RelayConfig) -> Result<RelayHandle, Error> {
        match config.storage.clone() {
            StorageChoice::Sled => Self::start_with_storage(config, |sled| Arc::new(sled)).await,
            StorageChoice::Postgres(options) => {
                let storage =
                    tokio::task::spawn_blocking(move || PgStorage::connect(&options)).await??;
                info!(storage = %storage.describe(), "connected to the database");
                Self::start_on(config, Arc::new(storage)).await
            }
        }
    }

    /// Like [`start`](Self::start), with the sled store wrapped by `wrap` (fault
    /// injection in tests, instrumentation).
    pub async fn start_with_storage(
        config: RelayConfig,
        wrap: impl FnOnce(SledStorage) -> Arc<dyn RelayStorage>,
    ) -> Result<RelayHandle, Error> {
        // Owner only: the data dir holds the token key and the district's households.
        crate::auth::create_private_dir(&config.data_dir)?;
        let db_dir = config.data_dir.join("db");
        let storage = tokio::task::spawn_blocking(move || SledStorage::open(&db_dir)).await??;
        Self::start_on(config, wrap(storage)).await
    }

    /// Starts a relay over `storage`, whatever its engine (the data dir still holds the
    /// certificate, the token key and the revocation list).
    pub async fn start_on(
        config: RelayConfig,
        storage: Arc<dyn RelayStorage>,
    ) -> Result<RelayHandle, Error> {
        let data_dir = config.data_dir.clone();
        crate::auth::create_private_dir(&data_dir)?;
        let identity = match &config.tls {
            TlsMode::Dev => tls::load_or_create_dev_identity(&data_dir.join("tls"))?,
            TlsMode::Files { cert, key } => tls::load_pem_identity(cert, key)?,
        };
        let revoked_file = config.revoked_file();
        let authority = Arc::new(Authority::open(&data_dir, &revoked_file)?);
        let hub = Hub::new(storage, config.cache_budget_bytes)?;
        hub.set_max_document_bytes(config.max_document_bytes);
        let state = RelayState::new(hub.clone())?;

        let (endpoint, local_addr) = quic_endpoint(&config, &identity, &state)?;

        let (stop, stopped) = watch::channel(false);
        tokio::spawn({
            let (authority, stopped) = (authority.clone(), stopped.clone());
            async move { authority.watch_file(stopped).await }
        });
        let http_addr = match config.http_listen {
            Some(addr) => Some(crate::endpoint::serve(addr, state.clone(), stopped.clone()).await?),
            None => None,
        };
        state.metrics.set_quotas(&config.quotas);
        tokio::spawn(crate::hub::expire_uploads(
            Arc::downgrade(&hub),
            config.quotas.upload_expiry,
            stopped.clone(),
        ));
        let shared = Shared {
            relay: state.clone(),
            door: crate::door::Door::new(config.quotas.clone()),
            config: Arc::new(config),
            authority,
        };
        let accept_loop = tokio::spawn(accept_loop(endpoint, shared, stopped));
        info!(%local_addr, fingerprint = %identity.fingerprint(), "relay listening");
        Ok(RelayHandle {
            local_addr,
            http_addr,
            data_dir,
            revoked_file,
            identity,
            hub,
            state,
            stop,
            accept_loop,
        })
    }
}

/// The relay's QUIC endpoint on `config.listen` (UDP buffers as large as the kernel
/// grants, reported in the metrics), and the address it is bound to.
fn quic_endpoint(
    config: &RelayConfig,
    identity: &tls::Identity,
    state: &RelayState,
) -> Result<(quinn::Endpoint, std::net::SocketAddr), Error> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls::server_crypto(identity)?)
        .map_err(|e| Error::tls("QUIC server crypto", e))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server_config.transport_config(Arc::new(transport_config(config)?));
    let (socket, udp_buffers) = crate::udp::socket(config.listen, config.udp_buffer_bytes)
        .map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;
    // Said once, where operators look (the log at start, `serve`'s banner, /health).
    tracing::info!("UDP buffers: {}", udp_buffers.describe());
    state.metrics.set_udp_buffers(udp_buffers);
    if let Some(inode) = crate::udp::inode(&socket) {
        state.metrics.watch_udp_socket(inode);
    }
    let runtime = quinn::default_runtime()
        .ok_or_else(|| Error::tls_setup("no async runtime for the QUIC endpoint"))?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        runtime,
    )
    .map_err(|source| Error::Listen {
        addr: config.listen,
        source,
    })?;
    let local_addr = endpoint.local_addr().map_err(|source| Error::Listen {
        addr: config.listen,
        source,
    })?;
    Ok((endpoint, local_addr))
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Shared,
    mut stopped: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    // Connections accepted so far: which of a device's connections is later, when its
    // hellos come out of order (see `hub::staging::Arrival`).
    let mut accepted = 0u64;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                if connections.len() >= shared.config.max_connections {
                    warn!(remote = %incoming.remote_address(), "connection limit reached; refusing");
                    incoming.refuse();
                    continue;
                }
                // Under handshake load, a new peer proves its address before the relay
                // spends a TLS handshake on it (QUIC Retry: one round trip more).
                if shared.door.under_handshake_load()
                    && !incoming.remote_address_validated()
                    && incoming.may_retry()
                {
                    if let Err(e) = incoming.retry() {
                        debug!("retry not sent: {e}");
                    }
                    continue;
                }
                let Some(seat) = shared.door.address(incoming.remote_address().ip()) else {
                    debug!(remote = %incoming.remote_address(), "too many connections from this address; refusing");
                    shared.relay.metrics.quota_refused("connections_per_address");
                    incoming.refuse();
                    continue;
                };
                accepted += 1;
                connections.spawn(connection::serve(incoming, shared.clone(), vec![seat], accepted));
            }
            Some(_) = connections.join_next() => {}
            _ = stopped.changed() => break,
        }
    }
    endpoint.close(
        u32::from(ErrorCode::SHUTTING_DOWN.0).into(),
        b"relay shutting down",
    );
    // Connections end once the endpoint is closed; give in-flight writes time to finish.
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("connections did not finish in 10 s; aborting them");
        connections.shutdown().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

impl RelayHandle {
    /// The UDP address the relay listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The TCP address of the `/metrics` and `/health` endpoint, if enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Which storage the relay uses and where (no secrets).
    pub fn storage_description(&self) -> String {
        self.hub.storage().describe()
    }

    /// The relay's data dir (documents, certificate, token key, revocation list).
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// The UDP buffers the kernel granted the relay's socket.
    pub fn udp_buffers(&self) -> crate::udp::UdpBuffers {
        self.state.metrics.udp_buffers()
    }

    /// The revocation list this relay watches.
    pub fn revoked_file(&self) -> &std::path::Path {
        &self.revoked_file
    }

    /// SHA-256 fingerprint of the relay's certificate (lowercase hex): what devices pin.
    pub fn fingerprint(&self) -> String {
        self.identity.fingerprint()
    }

    /// True if this start created the dev certificate.
    pub fn created_certificate(&self) -> bool {
        self.identity.created
    }

    /// A copy of the relay's document `id`, or `None` if it holds no changes.
    pub async fn document(&self, id: &DocId) -> Result<Option<Automerge>, Error> {
        let slot = self.hub.slot(id).await?;
        let state = slot.lock().await;
        Ok(if state.doc.get_heads().is_empty() {
            None
        } else {
            Some(state.doc.clone())
        })
    }

    /// The heads of the relay's document `id` (empty if unknown).
    pub async fn heads(&self, id: &DocId) -> Result<Vec<ChangeHash>, Error> {
        let slot = self.hub.slot(id).await?;
        let heads = slot.lock().await.doc.get_heads();
        Ok(heads)
    }

    /// The hub's counters (commits, batch sizes, flushes, evictions).
    pub fn stats(&self) -> &crate::hub::HubStats {
        &self.hub.stats
    }

    /// Documents parsed in memory right now.
    pub fn cached_documents(&self) -> usize {
        self.hub.cached()
    }

    /// Bytes of unfinished uploads `device` has staged.
    pub async fn staged_bytes(&self, device: &redline_proto::DeviceId) -> Result<u64, Error> {
        let prefix = format!("{device}|").into_bytes();
        let storage = self.hub.storage();
        tokio::task::spawn_blocking(move || storage.staged_bytes(&prefix)).await?
    }

    /// Bytes `device` has held in quarantine.
    pub async fn held_bytes(&self, device: &redline_proto::DeviceId) -> Result<u64, Error> {
        let prefix = format!("{device}|").into_bytes();
        let storage = self.hub.storage();
        tokio::task::spawn_blocking(move || storage.held_bytes(&prefix)).await?
    }

    /// Every document id in storage.
    pub async fn documents(&self) -> Result<Vec<DocId>, Error> {
        self.hub.list().await
    }

    /// Stops accepting, closes connections, waits for in-flight writes and flushes.
    pub async fn shutdown(self) -> Result<(), Error> {
        let _ = self.stop.send(true);
        if let Err(e) = self.accept_loop.await {
            warn!("accept loop ended abnormally: {e}");
        }
        self.hub.flush().await
    }
}
