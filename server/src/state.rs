//! What a running relay holds side by side: its documents ([`Hub`]), its metrics and its
//! devices' health. The hub knows neither: metrics read the hub's counters, and the hub
//! reports each commit's batch size to whoever listens ([`Hub::observe_batches`]).

use std::sync::Arc;

use crate::Error;
use crate::health::Registry;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// The relay's shared state.
pub struct RelayState {
    /// Documents, the merge path and the feed.
    pub hub: Arc<Hub>,
    /// Prometheus metrics (connections and the hub's counters).
    pub metrics: Metrics,
    /// Per-device health.
    pub devices: Registry,
}

impl RelayState {
    /// The state around `hub`: device records loaded from its storage, commit batch
    /// sizes recorded in the metrics.
    pub fn new(hub: Arc<Hub>) -> Result<Arc<Self>, Error> {
        let devices = Registry::load(hub.storage())?;
        let metrics = Metrics::default();
        let batch_size = metrics.batch_size.clone();
        hub.observe_batches(Box::new(move |n| batch_size.observe(n as f64)));
        Ok(Arc::new(Self {
            hub,
            metrics,
            devices,
        }))
    }
}
