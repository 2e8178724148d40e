//! The small HTTP endpoint that serves the relay's metrics (`/metrics`) with a health
//! check (`/health`). It listens on its own TCP port, loopback by default: operators
//! scrape it locally or through their own proxy; devices never see it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use crate::Error;
use crate::metrics::Readings;
use crate::state::RelayState;

/// The metrics in Prometheus text format, gauges refreshed from the relay's state.
async fn render(relay: &RelayState) -> String {
    let hub = &relay.hub;
    let s = &hub.stats;
    let readings = Readings {
        changes: s.changes.load(Ordering::Relaxed),
        commits: s.commits.load(Ordering::Relaxed),
        flushes: s.flushes.load(Ordering::Relaxed),
        conflicts: s.conflicts.load(Ordering::Relaxed),
        taken_in: s.taken_in.load(Ordering::Relaxed),
        blocks: (
            s.blocks.made.load(Ordering::Relaxed),
            s.blocks.reused.load(Ordering::Relaxed),
        ),
        whole_documents: s.blocks.whole.load(Ordering::Relaxed),
        cached: hub.cached(),
        devices: relay.devices.counts(),
        stored: hub.list().await.ok().map(|all| all.len()),
    };
    relay.metrics.refresh(&readings);
    relay.metrics.encode()
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
                        render(&relay).await,
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
