//! The relay's metrics in Prometheus text format (served by `endpoint`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
    blocks_made: Counter,
    blocks_reused: Counter,
    whole_documents: Counter,
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
            blocks_made: Counter::default(),
            blocks_reused: Counter::default(),
            whole_documents: Counter::default(),
            udp_drops: Counter::default(),
            udp_inode: std::sync::OnceLock::new(),
            quota_refusals: Family::default(),
            udp_buffers: std::sync::OnceLock::new(),
            quota_limits: Family::default(),
        };
        m.register_door(&mut registry);
        m.register_merges(&mut registry);
        m.register_holdings(&mut registry);
        m.registry = registry;
        m
    }
}

impl Metrics {
    /// Registers the metrics of connections, bytes, quotas and the UDP socket.
    fn register_door(&self, registry: &mut Registry) {
        registry.register(
            "quota_refusals",
            "Requests refused because a per-token, per-device or per-address quota was reached",
            self.quota_refusals.clone(),
        );
        registry.register(
            "quota_limit",
            "The relay's quotas as configured (connections, bytes, documents per day)",
            self.quota_limits.clone(),
        );
        registry.register(
            "connections_open",
            "Device connections open now",
            self.connections_open.clone(),
        );
        registry.register(
            "connections",
            "Device connections accepted",
            self.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed by the relay for cause (credentials, limits, bad input)",
            self.connections_refused.clone(),
        );
        registry.register(
            "received_bytes",
            "Frame bytes received from devices",
            self.bytes_received.clone(),
        );
        registry.register(
            "sent_bytes",
            "Frame bytes sent to devices",
            self.bytes_sent.clone(),
        );
        registry.register(
            "udp_receive_drops",
            "Datagrams the kernel dropped before the relay read them (raise the UDP buffers)",
            self.udp_drops.clone(),
        );
    }

    /// Registers the metrics of syncs, commits and merges.
    fn register_merges(&self, registry: &mut Registry) {
        registry.register(
            "sync_latency_seconds",
            "Time from a device's hello to its first caught-up answer",
            self.sync_latency.clone(),
        );
        registry.register(
            "commit_latency_seconds",
            "Time from a push's arrival to its durable acknowledgement",
            self.commit_latency.clone(),
        );
        registry.register(
            "commit_batch_pushes",
            "Pushes merged per commit",
            self.batch_size.clone(),
        );
        registry.register(
            "changes_applied",
            "Automerge changes applied",
            self.changes_applied.clone(),
        );
        registry.register("commits", "Commits written", self.commits.clone());
        registry.register("flushes", "Storage flushes", self.flushes.clone());
        registry.register(
            "commit_conflicts",
            "Batches applied again because another relay committed to their document first",
            self.conflicts.clone(),
        );
        registry.register(
            "commits_taken_in",
            "Other relays' commits applied to documents cached here",
            self.taken_in.clone(),
        );
        registry.register(
            "catchup_blocks_made",
            "Bundles of aligned blocks of commits made for catch-ups (shared by devices)",
            self.blocks_made.clone(),
        );
        registry.register(
            "catchup_blocks_reused",
            "Catch-ups that shipped a block bundle made before",
            self.blocks_reused.clone(),
        );
        registry.register(
            "catchup_whole_documents",
            "Catch-ups answered with the whole document (a device lacking most of it)",
            self.whole_documents.clone(),
        );
    }

    /// Registers the metrics of what the relay holds: documents and devices.
    fn register_holdings(&self, registry: &mut Registry) {
        registry.register(
            "documents_cached",
            "Documents parsed in memory",
            self.documents_cached.clone(),
        );
        registry.register(
            "documents_stored",
            "Documents in storage",
            self.documents_stored.clone(),
        );
        registry.register(
            "devices_known",
            "Devices the relay has seen",
            self.devices_known.clone(),
        );
        registry.register(
            "devices_connected",
            "Devices connected now",
            self.devices_connected.clone(),
        );
        registry.register(
            "devices_seen_last_hour",
            "Devices seen in the last hour",
            self.devices_seen_hour.clone(),
        );
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

    /// Mirrors the hub's counters, the cache and the device counts into the registry.
    pub fn refresh(&self, r: &Readings) {
        mirror(&self.changes_applied, r.changes);
        mirror(&self.commits, r.commits);
        mirror(&self.flushes, r.flushes);
        mirror(&self.conflicts, r.conflicts);
        mirror(&self.taken_in, r.taken_in);
        mirror(&self.blocks_made, r.blocks.0);
        mirror(&self.blocks_reused, r.blocks.1);
        mirror(&self.whole_documents, r.whole_documents);
        if let Some(dropped) = self.udp_inode.get().and_then(|i| crate::udp::drops(*i)) {
            mirror(&self.udp_drops, dropped);
        }
        self.documents_cached.set(r.cached as i64);
        let (known, connected, hour) = r.devices;
        self.devices_known.set(known as i64);
        self.devices_connected.set(connected as i64);
        self.devices_seen_hour.set(hour as i64);
        if let Some(stored) = r.stored {
            self.documents_stored.set(stored as i64);
        }
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// What the relay's parts report, read at a scrape.
#[derive(Clone, Copy, Debug, Default)]
pub struct Readings {
    /// The hub's counters: changes applied, commits, flushes, conflicts, commits of
    /// other relays taken in.
    pub changes: u64,
    pub commits: u64,
    pub flushes: u64,
    pub conflicts: u64,
    pub taken_in: u64,
    /// Block bundles made for catch-ups, and shipped again.
    pub blocks: (u64, u64),
    /// Catch-ups answered with the whole document.
    pub whole_documents: u64,
    /// Documents parsed in memory.
    pub cached: usize,
    /// Devices known, connected, seen in the last hour.
    pub devices: (usize, usize, usize),
    /// Documents stored, when the storage could list them.
    pub stored: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scrape shows the hub's counters as they are, counted once however often the
    /// registry is refreshed.
    #[test]
    fn a_scrape_shows_the_hubs_counters() {
        let m = Metrics::default();
        let mut r = Readings {
            commits: 2,
            blocks: (3, 5),
            ..Readings::default()
        };
        m.refresh(&r);
        r.blocks = (4, 9);
        r.whole_documents = 6;
        m.refresh(&r);
        m.refresh(&r);
        let text = m.encode();
        for line in [
            "redline_commits_total 2",
            "redline_catchup_blocks_made_total 4",
            "redline_catchup_blocks_reused_total 9",
            "redline_catchup_whole_documents_total 6",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
    }
}
