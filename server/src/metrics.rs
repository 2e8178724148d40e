//! The relay's metrics in Prometheus text format, and the small HTTP endpoint that
//! serves them (`/metrics`) with a health check (`/health`). The endpoint listens on its
//! own TCP port, loopback by default: operators scrape it locally or through their own
//! proxy; devices never see it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::Error;
use crate::state::RelayState;

/// Counters, gauges and histograms the relay keeps.
pub struct Metrics {
    registry: Registry,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Connections accepted since start.
    pub connections: Counter,
    /// Connections closed by the relay for cause (credentials, limits, garbage).
    pub connections_refused: Counter,
    /// Frame bytes received from devices.
    pub bytes_received: Counter,
    /// Frame bytes sent to devices.
    pub bytes_sent: Counter,
    /// Time from a device's hello to its first `Caught` (its reconnect sync).
    pub sync_latency: Histogram,
    /// Time from a push's arrival to its acknowledgement (merge + durable write).
    pub commit_latency: Histogram,
    /// Pushes merged per commit.
    pub batch_size: Histogram,
    documents_cached: Gauge,
    devices_known: Gauge,
    devices_connected: Gauge,
    devices_seen_hour: Gauge,
    documents_stored: Gauge,
    changes_applied: Counter,
    commits: Counter,
    flushes: Counter,
    conflicts: Counter,
    taken_in: Counter,
    udp_drops: Counter,
    udp_inode: std::sync::OnceLock<u64>,
    quota_refusals: Family<Vec<(String, String)>, Counter>,
    udp_buffers: std::sync::OnceLock<crate::udp::UdpBuffers>,
    quota_limits: Family<Vec<(String, String)>, Gauge>,
}

fn quota_label(quota: &str) -> Vec<(String, String)> {
    vec![("quota".to_string(), quota.to_string())]
}

impl Metrics {
    /// Records the UDP buffers the kernel granted (once, at start).
    pub fn set_udp_buffers(&self, b: crate::udp::UdpBuffers) {
        let _ = self.udp_buffers.set(b);
    }

    /// The UDP buffers the kernel granted.
    pub fn udp_buffers(&self) -> crate::udp::UdpBuffers {
        self.udp_buffers.get().copied().unwrap_or_default()
    }

    /// Counts a refusal for `quota` (its configuration name).
    pub fn quota_refused(&self, quota: &str) {
        self.quota_refusals.get_or_create(&quota_label(quota)).inc();
    }

    /// Publishes the configured quotas.
    pub fn set_quotas(&self, quotas: &crate::config::Quotas) {
        let set = |name: &str, v: u64| {
            self.quota_limits
                .get_or_create(&quota_label(name))
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set("connections_per_token", quotas.connections_per_token as u64);
        set(
            "connections_per_address",
            quotas.connections_per_address as u64,
        );
        set("retry_above_pending", quotas.retry_above_pending as u64);
        set("staged_bytes_per_device", quotas.staged_bytes_per_device);
        set("upload_expiry_seconds", quotas.upload_expiry.as_secs());
        set("held_bytes_per_device", quotas.held_bytes_per_device);
        set(
            "new_documents_per_device_per_day",
            quotas.new_documents_per_device_per_day.into(),
        );
        set("ledger_days_back", quotas.ledger_days_back.into());
        set("ledger_days_ahead", quotas.ledger_days_ahead.into());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("redline");
        let mut m = Self {
            registry: Registry::default(),
            connections_open: Gauge::default(),
            connections: Counter::default(),
            connections_refused: Counter::default(),
            bytes_received: Counter::default(),
            bytes_sent: Counter::default(),
            sync_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            commit_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            documents_cached: Gauge::default(),
            devices_known: Gauge::default(),
            devices_connected: Gauge::default(),
            devices_seen_hour: Gauge::default(),
            documents_stored: Gauge::default(),
            changes_applied: Counter::default(),
            commits: Counter::default(),
            flushes: Counter::default(),
            conflicts: Counter::default(),
            taken_in: Counter::default(),
            udp_drops: Counter::default(),
            udp_inode: std::sync::OnceLock::new(),
            quota_refusals: Family::default(),
            udp_buffers: std::sync::OnceLock::new(),
            quota_limits: Family::default(),
        };
        registry.register(
            "quota_refusals",
            "Requests refused because a per-token, per-device or per-address quota was reached",
            m.quota_refusals.clone(),
        );
        registry.register(
            "quota_limit",
            "The relay's quotas as configured (connections, bytes, documents per day)",
            m.quota_limits.clone(),
        );
        registry.register(
            "connections_open",
            "Device connections open now",
            m.connections_open.clone(),
        );
        registry.register(
            "connections",
            "Device connections accepted",
            m.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed by the relay for cause (credentials, limits, bad input)",
            m.connections_refused.clone(),
        );
        registry.register(
            "received_bytes",
            "Frame bytes received from devices",
            m.bytes_received.clone(),
        );
        registry.register(
            "sent_bytes",
            "Frame bytes sent to devices",
            m.bytes_sent.clone(),
        );
        registry.register(
            "sync_latency_seconds",
            "Time from a device's hello to its first caught-up answer",
            m.sync_latency.clone(),
        );
        registry.register(
            "commit_latency_seconds",
            "Time from a push's arrival to its durable acknowledgement",
            m.commit_latency.clone(),
        );
        registry.register(
            "commit_batch_pushes",
            "Pushes merged per commit",
            m.batch_size.clone(),
        );
        registry.register(
            "documents_cached",
            "Documents parsed in memory",
            m.documents_cached.clone(),
        );
        registry.register(
            "documents_stored",
            "Documents in storage",
            m.documents_stored.clone(),
        );
        registry.register(
            "devices_known",
            "Devices the relay has seen",
            m.devices_known.clone(),
        );
        registry.register(
            "devices_connected",
            "Devices connected now",
            m.devices_connected.clone(),
        );
        registry.register(
            "devices_seen_last_hour",
            "Devices seen in the last hour",
            m.devices_seen_hour.clone(),
        );
        registry.register(
            "changes_applied",
            "Automerge changes applied",
            m.changes_applied.clone(),
        );
        registry.register("commits", "Commits written", m.commits.clone());
        registry.register("flushes", "Storage flushes", m.flushes.clone());
        registry.register(
            "commit_conflicts",
            "Batches applied again because another relay committed to their document first",
            m.conflicts.clone(),
        );
        registry.register(
            "commits_taken_in",
            "Other relays' commits applied to documents cached here",
            m.taken_in.clone(),
        );
        registry.register(
            "udp_receive_drops",
            "Datagrams the kernel dropped before the relay read them (raise the UDP buffers)",
            m.udp_drops.clone(),
        );
        m.registry = registry;
        m
    }
}

/// Sets a counter that mirrors an atomic total.
fn mirror(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

impl Metrics {
    /// Reports the kernel's drop count of the relay's UDP socket (its inode).
    pub fn watch_udp_socket(&self, inode: u64) {
        let _ = self.udp_inode.set(inode);
    }

    /// The metrics in Prometheus text format, gauges refreshed from the relay's state.
    pub async fn render(&self, relay: &RelayState) -> String {
        let hub = &relay.hub;
        let s = &hub.stats;
        mirror(&self.changes_applied, s.changes.load(Ordering::Relaxed));
        mirror(&self.commits, s.commits.load(Ordering::Relaxed));
        mirror(&self.flushes, s.flushes.load(Ordering::Relaxed));
        mirror(&self.conflicts, s.conflicts.load(Ordering::Relaxed));
        mirror(&self.taken_in, s.taken_in.load(Ordering::Relaxed));
        if let Some(dropped) = self.udp_inode.get().and_then(|i| crate::udp::drops(*i)) {
            mirror(&self.udp_drops, dropped);
        }
        self.documents_cached.set(hub.cached() as i64);
        let (known, connected, hour) = relay.devices.counts();
        self.devices_known.set(known as i64);
        self.devices_connected.set(connected as i64);
        self.devices_seen_hour.set(hour as i64);
        if let Ok(all) = hub.list().await {
            self.documents_stored.set(all.len() as i64);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Serves `/metrics` and `/health` on `addr` until `stop` fires; returns the bound
/// address.
pub(crate) async fn serve(
    addr: SocketAddr,
    relay: Arc<RelayState>,
    mut stop: watch::Receiver<bool>,
) -> Result<SocketAddr, Error> {
    use axum::http::header;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Listen { addr, source })?;
    let for_metrics = relay.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let relay = for_metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        relay.metrics.render(&relay).await,
                    )
                }
            }),
        )
        .route(
            "/health",
            get(move || {
                let relay = relay.clone();
                async move {
                    use axum::http::StatusCode;
                    let stable = *relay.hub.stable().borrow();
                    let storage = relay.hub.storage();
                    let started = std::time::Instant::now();
                    let ping = {
                        let storage = storage.clone();
                        tokio::task::spawn_blocking(move || storage.ping()).await
                    };
                    let (status, first, database) = match ping {
                        Ok(Ok(())) => (
                            StatusCode::OK,
                            "ok",
                            format!("ok ({:.1} ms)", started.elapsed().as_secs_f64() * 1e3),
                        ),
                        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
                        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
                    };
                    (
                        status,
                        format!(
                            "{first}\nepoch {}\nstable_seq {stable}\nudp_buffers {}\nstorage {}\ndatabase {database}\n",
                            relay.hub.epoch(),
                            relay.metrics.udp_buffers().describe(),
                            storage.describe(),
                        ),
                    )
                }
            }),
        );
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.changed().await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!("metrics endpoint stopped: {e}");
        }
    });
    Ok(bound)
}
