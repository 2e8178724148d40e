//! Quarantine: a device that returns after longer than the relay's horizon
//! (`RelayConfig::quarantine_after`) may carry stale or surprising work. Its pushes are
//! kept (durably, never dropped silently) but not merged; a lead of the team (or an
//! operator) sees them in the reconcile view and accepts them, which merges them like
//! any push.
//!
//! - What one device may have held is bounded ([`Quotas::held_bytes_per_device`]).
//! - A lead reviews only devices of their own teams, and only documents they may write:
//!   a lead of team A never sees a team-B phone's held changes to a shared zone.
//! - Accepting merges each held push on its own: one that the relay refuses (a forged
//!   change, bad data) is reported with its reason and dropped, and the rest merge.
//!
//! [`Quotas::held_bytes_per_device`]: crate::config::Quotas::held_bytes_per_device

use std::sync::Arc;

use redline_proto::message::{ErrorReport, QuarantineEntry};
use redline_proto::token::Role;
use redline_proto::{DeviceId, DocKind, ErrorCode, TeamId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;
use crate::access::Scope;
use crate::hub::bundle_changes;
use crate::state::RelayState;

/// One held push.
#[derive(Serialize, Deserialize)]
struct Held {
    entry: QuarantineEntry,
    #[serde(with = "serde_bytes")]
    bundle: Vec<u8>,
}

/// Keys of one device's held pushes start with this.
fn device_prefix(device: &DeviceId) -> Vec<u8> {
    format!("{device}|").into_bytes()
}

fn key(entry: &QuarantineEntry, bundle: &[u8]) -> Vec<u8> {
    // The same push sent again lands on the same key: held once.
    let mut k = device_prefix(&entry.device);
    k.extend_from_slice(
        format!(
            "{}|{}",
            entry.doc,
            hex::encode(&Sha256::digest(bundle)[..16])
        )
        .as_bytes(),
    );
    k
}

async fn blocking<R: Send + 'static>(
    relay: &RelayState,
    f: impl FnOnce(&dyn crate::storage::RelayStorage) -> Result<R, Error> + Send + 'static,
) -> Result<R, Error> {
    let storage = relay.hub.storage();
    tokio::task::spawn_blocking(move || f(storage.as_ref())).await?
}

/// Holds a push durably for review, within the device's quota of held bytes.
pub async fn hold(
    relay: &Arc<RelayState>,
    entry: QuarantineEntry,
    bundle: Vec<u8>,
    quota: u64,
) -> Result<(), Error> {
    let k = key(&entry, &bundle);
    let prefix = device_prefix(&entry.device);
    let item = postcard::to_stdvec(&Held { entry, bundle })
        .map_err(|e| Error::Storage(format!("cannot encode a held push: {e}")))?;
    let len = item.len() as u64;
    // Checking and holding are one step: concurrent pushes cannot together pass the quota.
    let _one_at_a_time = relay.hub.holding.lock().await;
    let held = blocking(relay, move |s| s.held_bytes(&prefix)).await?;
    if held.saturating_add(len) > quota {
        relay.metrics.quota_refused("held_bytes_per_device");
        return Err(Error::QuotaExceeded(format!(
            "this phone already has {held} bytes held for review (the limit is {quota}); ask a lead to review them"
        )));
    }
    blocking(relay, move |s| s.put_quarantine(&k, &item)).await?;
    relay.hub.flush().await
}

/// Whether a reviewer with `scope` sees `entry` for `team`: the held device belongs to
/// `team`, and the reviewer may write the document.
fn concerns(relay: &RelayState, scope: &Scope, team: &TeamId, entry: &QuarantineEntry) -> bool {
    if !scope.can_write(&entry.doc) {
        return false;
    }
    if scope.claims().role != Role::Operator && !scope.claims().teams.contains(team) {
        return false;
    }
    match entry.doc.kind() {
        DocKind::Ledger(t, _) => t == *team,
        DocKind::Households(_) | DocKind::Roster(_) => {
            relay.devices.teams_of(&entry.device).contains(team)
        }
    }
}

/// What is held that `scope` reviews for `team`, read one held push at a time.
pub fn list(
    relay: &RelayState,
    scope: &Scope,
    team: &TeamId,
) -> Result<Vec<QuarantineEntry>, Error> {
    let mut out = Vec::new();
    relay.hub.storage().visit_quarantined(&mut |_, v| {
        if let Ok(h) = postcard::from_bytes::<Held>(v)
            && concerns(relay, scope, team, &h.entry)
        {
            out.push(h.entry);
        }
        true
    })?;
    Ok(out)
}

/// What accepting a device's held pushes did.
#[derive(Debug, Default)]
pub struct Accepted {
    /// What stays held for the team.
    pub remaining: Vec<QuarantineEntry>,
    /// Held pushes the relay refused to merge (dropped, with the reason).
    pub refused: Vec<ErrorReport>,
}

/// Merges what `device` has held for `team` (that `scope` reviews), each held push on
/// its own.
pub async fn accept(
    relay: &Arc<RelayState>,
    scope: &Scope,
    team: &TeamId,
    device: &DeviceId,
) -> Result<Accepted, Error> {
    let prefix = device_prefix(device);
    let mine = blocking(relay, move |s| s.quarantined_with(&prefix)).await?;
    let mut refused = Vec::new();
    for (k, v) in mine {
        let Ok(h) = postcard::from_bytes::<Held>(&v) else {
            continue;
        };
        if h.entry.device != *device || !concerns(relay, scope, team, &h.entry) {
            continue;
        }
        let doc = h.entry.doc.clone();
        let merged = match bundle_changes(&h.bundle) {
            Err(e) => Err(Error::BadChanges(e)),
            Ok(changes) => match redline_proto::MemberId::new(&h.entry.member) {
                Err(e) => Err(Error::BadChanges(e.to_string())),
                Ok(member) => {
                    let author = crate::authorship::Author {
                        device: device.clone(),
                        member,
                        role: Role::Volunteer,
                    };
                    relay.hub.push(&doc, &author, changes).await.map(|_| ())
                }
            },
        };
        match merged {
            // Depends on changes still held elsewhere: kept for later.
            Err(Error::MissingDependencies(_)) => continue,
            // The relay may not be able to write now: kept, and the lead is told.
            Err(e) if e.is_storage_failure() => return Err(e),
            Err(e) => {
                let code = match &e {
                    Error::ForgedActor { .. } | Error::ForgedAuthorship(_) => ErrorCode::FORBIDDEN,
                    Error::TooLarge(_) => ErrorCode::TOO_LARGE,
                    _ => ErrorCode::BAD_DOCUMENT_DATA,
                };
                refused.push(ErrorReport {
                    code,
                    text: format!("a held change of {device} was refused and dropped: {e}"),
                    doc: Some(doc),
                });
            }
            Ok(()) => {}
        }
        blocking(relay, move |s| s.drop_quarantine(&k)).await?;
    }
    relay.hub.flush().await?;
    let remaining = list(relay, scope, team)?;
    let prefix = device_prefix(device);
    let still_held = !blocking(relay, move |s| s.quarantined_with(&prefix))
        .await?
        .is_empty();
    if !still_held {
        relay.devices.release(device);
    }
    Ok(Accepted { remaining, refused })
}
