//! The one admission rule for push, upload and sync (scope, size, document creation,
//! quarantine, actor rules), and holding a quarantined push.

use std::sync::Arc;

use redline_proto::{DeviceId, DocId, ErrorCode};
use tracing::warn;

use crate::Error;
use crate::session::{Admission, Outcome, Verdict};
use crate::state::RelayState;

/// Whether `changes` carry an actor the relay has never bound, for a document it holds,
/// from a device that already wrote with another actor (its store was reset or
/// restored: one install keeps one actor for life).
pub(super) async fn new_actor_on_existing(
    relay: &Arc<RelayState>,
    device: &DeviceId,
    doc: &DocId,
    changes: &[automerge::Change],
) -> bool {
    let genesis = automerge::ActorId::from(redline_proto::genesis::GENESIS_ACTOR);
    let mut actors: Vec<&automerge::ActorId> = changes
        .iter()
        .map(|c| c.actor_id())
        .filter(|a| **a != genesis)
        .collect();
    actors.dedup();
    let storage = relay.hub.storage();
    // Bindings are only ever added: ask whether the device has any before asking about
    // the actors. The other order races with the device's own first push (in the same
    // flight, another document): its actor unbound at the first question, bound by
    // that push's commit at the second, and an honest phone held for review.
    if !matches!(storage.actors_of(device), Ok(n) if n > 0) {
        return false;
    }
    let unknown = actors
        .iter()
        .any(|a| matches!(storage.actor_owner(a.to_bytes()), Ok(None)));
    if !unknown {
        return false;
    }
    match relay.hub.slot(doc).await {
        Ok(slot) => {
            let exists = !slot.lock().await.doc.get_heads().is_empty();
            relay.hub.release(slot);
            exists
        }
        Err(_) => false,
    }
}

/// Holds a quarantined push: held (with the words for the device), or why not.
pub(super) async fn hold(
    relay: &Arc<RelayState>,
    entry: redline_proto::message::QuarantineEntry,
    bundle: Vec<u8>,
    quota: u64,
) -> Result<Outcome, Error> {
    let offline_h = entry.offline_ms / 3_600_000;
    crate::quarantine::hold(relay, entry, bundle, quota).await?;
    Ok(Outcome::Held(format!(
        "this phone was offline for {offline_h} h: its changes are kept on the relay for a lead's review and merge once accepted"
    )))
}

/// Refuses creating `doc` when it would be a ledger day far from the relay's date, or
/// one document too many for the device today. Writing to existing documents is not
/// limited here.
pub(super) async fn creation_refused(
    relay: &Arc<RelayState>,
    who: &Admission,
    doc: &DocId,
) -> Option<Verdict> {
    match relay.hub.exists(doc).await {
        Ok(true) => return None,
        Ok(false) => {}
        Err(e) => return Some(Verdict::Refuse(ErrorCode::STORAGE_FAILURE, e.to_string())),
    }
    let today = i64::try_from(crate::auth::now_secs() / 86_400).unwrap_or(i64::MAX);
    let q = &who.quotas;
    if let redline_proto::DocKind::Ledger(_, day) = doc.kind() {
        let d = day.days_since_epoch();
        if d < today - i64::from(q.ledger_days_back) || d > today + i64::from(q.ledger_days_ahead) {
            relay.metrics.quota_refused("ledger_days");
            return Some(Verdict::Refuse(
                ErrorCode::FORBIDDEN,
                format!(
                    "a ledger for {day} cannot be started here: new ledger days must lie within {} days before and {} after the relay's date",
                    q.ledger_days_back, q.ledger_days_ahead
                ),
            ));
        }
    }
    if !relay.hub.count_creation(
        &who.author.device,
        today,
        q.new_documents_per_device_per_day,
    ) {
        relay
            .metrics
            .quota_refused("new_documents_per_device_per_day");
        return Some(Verdict::Refuse(
            ErrorCode::QUOTA_EXCEEDED,
            format!(
                "this phone has started {} documents today, the most the relay allows",
                q.new_documents_per_device_per_day
            ),
        ));
    }
    None
}

/// The one admission rule for push, upload and sync: scope, size, quarantine.
pub(super) async fn admit(
    relay: &Arc<RelayState>,
    who: &Admission,
    doc: &DocId,
    changes: &[automerge::Change],
) -> Verdict {
    if !who.scope.can_write(doc) {
        return Verdict::Refuse(
            ErrorCode::FORBIDDEN,
            "your token does not allow this document".into(),
        );
    }
    if changes.len() > who.max_changes {
        return Verdict::Refuse(
            ErrorCode::TOO_LARGE,
            format!(
                "{} changes in one message; the limit is {}",
                changes.len(),
                who.max_changes
            ),
        );
    }
    if let Some(refusal) = creation_refused(relay, who, doc).await {
        return refusal;
    }
    if who.quarantined.is_some() {
        return Verdict::Hold { starts: false };
    }
    if who.synced_before
        && who.scope.claims().role == redline_proto::token::Role::Volunteer
        && new_actor_on_existing(relay, &who.author.device, doc, changes).await
    {
        // A known phone writing as an actor never seen before into an existing
        // document: its store was reset or restored. Held for review from now on.
        warn!(%doc, "known device pushes with an unknown actor: quarantined");
        return Verdict::Hold { starts: true };
    }
    Verdict::Accept
}

/// Unix milliseconds now (when a push is held).
pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
