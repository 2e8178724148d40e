//! Applying a planned batch to a document: one `apply_changes` for the whole batch,
//! and when Automerge refuses it, a reload from disk and each push alone, so only the
//! bad sender is refused.

use std::sync::Arc;

use automerge::{Change, ReadDoc};
use redline_proto::DocId;
use tracing::warn;

use super::Hub;
use super::guard::guarded_apply;
use super::queue::PendingPush;
use super::slots::{DocSlot, SlotState};
use crate::Error;

impl Hub {
    /// Applies the planned pushes to the document in one call. If Automerge refuses
    /// the batch (or panics on hostile data), the document may be half-changed: it is
    /// reloaded from disk and each push retried alone, so only the bad sender is
    /// refused. The pushes applied, with the changes each added; `None` when every push
    /// was answered already (a failed reload, changes left queued).
    pub(super) async fn apply_batch(
        &self,
        id: &DocId,
        slot: &DocSlot,
        state: &mut SlotState,
        ok: Vec<PendingPush>,
        news: Vec<u32>,
    ) -> Option<Vec<(PendingPush, u32)>> {
        let all: Vec<Change> = ok.iter().flat_map(|p| p.changes.iter().cloned()).collect();
        let accepted = if guarded_apply(&mut state.doc, all).is_ok() {
            ok.into_iter().zip(news).collect()
        } else {
            self.apply_one_by_one(id, slot, state, ok, news).await?
        };
        // Nothing may stay queued inside the document (see the dependency check above).
        if !state.doc.get_missing_deps(&[]).is_empty() {
            warn!(doc = %id, "a batch left changes queued in the document; refused, reloading");
            for (p, _) in accepted {
                let _ = p
                    .reply
                    .send(Err(Error::MissingDependencies(id.to_string())));
            }
            let _ = self.reload(id, slot, state).await;
            return None;
        }
        Some(accepted)
    }

    /// [`Hub::apply_batch`]'s fallback: reload, then each push alone.
    async fn apply_one_by_one(
        &self,
        id: &DocId,
        slot: &DocSlot,
        state: &mut SlotState,
        ok: Vec<PendingPush>,
        news: Vec<u32>,
    ) -> Option<Vec<(PendingPush, u32)>> {
        let mut accepted: Vec<(PendingPush, u32)> = Vec::new();
        if let Err(e) = self.reload(id, slot, state).await {
            let e = Arc::new(e);
            for p in ok {
                let _ = p.reply.send(Err(Error::Commit(e.clone())));
            }
            return None;
        }
        for (p, n) in ok.into_iter().zip(news) {
            match guarded_apply(&mut state.doc, p.changes.clone()) {
                Ok(()) => accepted.push((p, n)),
                Err(e) => {
                    let _ = p.reply.send(Err(Error::BadChanges(e)));
                    if let Err(e) = self.reload(id, slot, state).await {
                        let e = Arc::new(e);
                        for (p, _) in accepted {
                            let _ = p.reply.send(Err(Error::Commit(e.clone())));
                        }
                        return None;
                    }
                    // What the reload dropped must be applied again.
                    let again: Vec<Change> = accepted
                        .iter()
                        .flat_map(|(p, _)| p.changes.clone())
                        .collect();
                    if guarded_apply(&mut state.doc, again).is_err() {
                        for (p, _) in accepted {
                            let _ = p
                                .reply
                                .send(Err(Error::BadChanges("batch could not be applied".into())));
                        }
                        let _ = self.reload(id, slot, state).await;
                        return None;
                    }
                }
            }
        }
        Some(accepted)
    }
}
