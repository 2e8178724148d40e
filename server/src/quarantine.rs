//! Quarantine: a device that returns after longer than the relay's horizon
//! (`RelayConfig::quarantine_after`) may carry stale or surprising work. Its pushes are
//! kept (durably, never dropped) but not merged; a lead of the team (or an operator)
//! sees them in the reconcile view and accepts them, which merges them like any push.

use std::sync::Arc;

use redline_proto::message::QuarantineEntry;
use redline_proto::{DeviceId, DocKind, TeamId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;
use crate::access::Scope;
use crate::hub::{Hub, bundle_changes};

/// One held push.
#[derive(Serialize, Deserialize)]
struct Held {
    entry: QuarantineEntry,
    #[serde(with = "serde_bytes")]
    bundle: Vec<u8>,
}

fn key(entry: &QuarantineEntry, bundle: &[u8]) -> Vec<u8> {
    // The same push sent again lands on the same key: held once.
    format!(
        "{}|{}|{}",
        entry.device,
        entry.doc,
        hex::encode(&Sha256::digest(bundle)[..16])
    )
    .into_bytes()
}

/// Holds a push durably for review.
pub async fn hold(hub: &Arc<Hub>, entry: QuarantineEntry, bundle: Vec<u8>) -> Result<(), Error> {
    let k = key(&entry, &bundle);
    let item = postcard::to_stdvec(&Held { entry, bundle })
        .map_err(|e| Error::Storage(format!("cannot encode a held push: {e}")))?;
    let storage = hub.storage();
    tokio::task::spawn_blocking(move || storage.put_quarantine(&k, &item))
        .await
        .map_err(|e| Error::Storage(e.to_string()))??;
    hub.flush().await
}

/// Whether a lead with `scope` reviews `doc` for `team`.
fn concerns(scope: &Scope, team: &TeamId, doc: &redline_proto::DocId) -> bool {
    scope.can_write(doc)
        && match doc.kind() {
            DocKind::Ledger(t, _) => t == *team,
            DocKind::Households(_) | DocKind::Roster(_) => true,
        }
}

fn held(hub: &Hub) -> Result<Vec<(Vec<u8>, Held)>, Error> {
    Ok(hub
        .storage()
        .quarantined()?
        .into_iter()
        .filter_map(|(k, v)| Some((k, postcard::from_bytes::<Held>(&v).ok()?)))
        .collect())
}

/// What is held that `scope` reviews for `team`.
pub fn list(hub: &Hub, scope: &Scope, team: &TeamId) -> Result<Vec<QuarantineEntry>, Error> {
    Ok(held(hub)?
        .into_iter()
        .filter(|(_, h)| concerns(scope, team, &h.entry.doc))
        .map(|(_, h)| h.entry)
        .collect())
}

/// Merges what `device` has held for `team` (that `scope` reviews); returns what stays
/// held for the team.
pub async fn accept(
    hub: &Arc<Hub>,
    scope: &Scope,
    team: &TeamId,
    device: &DeviceId,
) -> Result<Vec<QuarantineEntry>, Error> {
    for (k, h) in held(hub)? {
        if h.entry.device != *device || !concerns(scope, team, &h.entry.doc) {
            continue;
        }
        let changes = bundle_changes(&h.bundle).map_err(Error::BadChanges)?;
        match hub.push(&h.entry.doc, device, changes).await {
            // Merged, or depends on changes still held elsewhere (kept for later).
            Ok(_) => {
                let storage = hub.storage();
                tokio::task::spawn_blocking(move || storage.drop_quarantine(&k))
                    .await
                    .map_err(|e| Error::Storage(e.to_string()))??;
            }
            Err(Error::MissingDependencies(_)) => {}
            Err(e) => return Err(e),
        }
    }
    hub.flush().await?;
    let remaining = list(hub, scope, team)?;
    if !held(hub)?.iter().any(|(_, h)| h.entry.device == *device) {
        hub.devices.release(device);
    }
    Ok(remaining)
}
