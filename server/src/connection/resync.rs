//! One step of the Automerge-sync fallback on the relay's side.

use std::sync::Arc;

use redline_proto::ErrorCode;

use super::admission::admit;
use crate::config::RelayConfig;
use crate::session::{Peer, Verdict, refusal_code};
use crate::state::RelayState;

/// One step of the Automerge-sync fallback.
///
/// The changes a step carries never reach Automerge's sync machinery: they go through
/// the same intake (guard, no documents) and the same admission and commit as a push.
/// Changes whose dependencies the relay lacks wait in this connection's session (never
/// in the document) and the relay's reply asks for the missing ones; only the rest of
/// the message (heads, needs, bloom filters) moves the sync state.
pub(super) async fn resync_step(
    relay: &Arc<RelayState>,
    peer: &mut Peer,
    config: &RelayConfig,
    step: redline_proto::message::SyncStep,
) {
    let doc_id = step.doc.clone();
    let (message, carried) = match crate::intake::sync_step(&step) {
        Ok(taken) => taken,
        Err((code, text)) => return peer.resync.report(code, text, doc_id),
    };
    let (applied, need) = if carried.is_empty() {
        (0, Vec::new())
    } else {
        match take_carried(relay, peer, config, &doc_id, carried).await {
            Some(taken) => taken,
            // Refused, held or failed: the device was told why.
            None => return,
        }
    };
    // What is left of the message moves only the sync state: the document is read, and
    // a document that does not exist is not created by asking.
    let slot = match relay.hub.slot(&doc_id).await {
        Ok(s) => s,
        Err(e) => {
            return peer
                .resync
                .report(ErrorCode::STORAGE_FAILURE, e.to_string(), doc_id);
        }
    };
    {
        let mut state = slot.lock().await;
        let received = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            peer.resync.apply(&doc_id, &mut state.doc, message)
        }));
        match received {
            Ok(Ok(_)) => {
                // Automerge builds and encodes the reply: a panic in there must not take
                // the connection's task down with it.
                let applied = redline_proto::session::Applied {
                    new_changes: applied,
                };
                let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    peer.resync.respond_with(&doc_id, &state.doc, applied, need)
                }));
                if answered.is_err() {
                    peer.resync.report(
                        ErrorCode::INTERNAL,
                        "the relay could not answer this sync step".into(),
                        doc_id.clone(),
                    );
                }
            }
            Ok(Err(e)) => peer.resync.report(e.code(), e.to_string(), doc_id.clone()),
            Err(_) => peer.resync.report(
                ErrorCode::BAD_DOCUMENT_DATA,
                "Automerge could not read the sync message".into(),
                doc_id.clone(),
            ),
        }
    }
    relay.hub.release(slot);
}

/// Admits and commits the changes a sync step carried, with those parked from earlier
/// steps: the changes new to the relay and the dependencies it still lacks (the
/// changes then wait, parked). `None` when they were refused or held: the device was
/// told why.
async fn take_carried(
    relay: &Arc<RelayState>,
    peer: &mut Peer,
    config: &RelayConfig,
    doc_id: &redline_proto::DocId,
    carried: Vec<automerge::Change>,
) -> Option<(u32, Vec<automerge::ChangeHash>)> {
    let mut changes = peer.resync.take_parked(doc_id);
    changes.extend(carried);
    let refusal = match admit(relay, &peer.admission(config), doc_id, &changes).await {
        Verdict::Refuse(code, text) => Some((code, text)),
        Verdict::Hold { starts } => {
            if starts {
                peer.quarantined = Some(relay.devices.mark_quarantined(&peer.device));
            }
            // Only reviewed pushes merge: the device pushes these again, to be held.
            let text = "this phone is in quarantine: its changes go through a lead's review";
            Some((ErrorCode::QUARANTINED, text.to_owned()))
        }
        Verdict::Accept => None,
    };
    let outcome = match refusal {
        Some(refused) => Err(refused),
        None => match relay.hub.missing_dependencies(doc_id, &changes).await {
            Err(e) => Err((ErrorCode::STORAGE_FAILURE, e.to_string())),
            Ok(missing) if missing.is_empty() => {
                match relay.hub.push(doc_id, &peer.author, changes).await {
                    Ok(c) => Ok((c.applied, Vec::new())),
                    Err(e) => Err(refusal_code(e)),
                }
            }
            Ok(missing) => {
                peer.resync.park(doc_id, changes);
                Ok((0, missing))
            }
        },
    };
    match outcome {
        Ok(taken) => Some(taken),
        Err((code, text)) => {
            peer.resync.report(code, text, doc_id.clone());
            None
        }
    }
}
