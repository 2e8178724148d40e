//! Callbacks into the app. Both are called on a background thread owned by the client,
//! never on the caller's thread: post to the UI thread yourself.

use std::sync::Arc;
use std::time::Duration;

use redline_client::{ChangeOrigin, Client};

use crate::records::SyncStatus;

/// Told when documents change, locally or by sync.
#[uniffi::export(with_foreign)]
pub trait ChangeObserver: Send + Sync {
    /// `documents` (ids such as `ledger/team-3/2026-11-29`) changed; `by_sync` is true
    /// for changes that came from the relay. Notices within 50 ms are batched.
    fn documents_changed(&self, documents: Vec<String>, by_sync: bool);
}

/// Told how syncing goes.
#[uniffi::export(with_foreign)]
pub trait SyncStatusObserver: Send + Sync {
    /// The sync status changed.
    fn sync_status_changed(&self, status: SyncStatus);
}

/// How long change notices gather before one callback.
const BATCH: Duration = Duration::from_millis(50);

/// Forwards the client's change notices to `observer` until the client's runtime stops.
pub(crate) fn forward_changes(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    observer: Arc<dyn ChangeObserver>,
) -> tokio::task::JoinHandle<()> {
    let mut changes = client.changes();
    runtime.spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let first = match changes.recv().await {
                Ok(c) => c,
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            };
            let mut local = Vec::new();
            let mut synced = Vec::new();
            let mut add = |c: redline_client::DocChange| {
                let list = match c.origin {
                    ChangeOrigin::Local => &mut local,
                    ChangeOrigin::Sync => &mut synced,
                };
                let id = c.doc.to_string();
                if !list.contains(&id) {
                    list.push(id);
                }
            };
            add(first);
            let until = tokio::time::Instant::now() + BATCH;
            while let Ok(Ok(c)) = tokio::time::timeout_at(until, changes.recv()).await {
                add(c);
            }
            let observer = observer.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if !local.is_empty() {
                    observer.documents_changed(local, false);
                }
                if !synced.is_empty() {
                    observer.documents_changed(synced, true);
                }
            })
            .await;
        }
    })
}
