//! What the relay sends a device: updates (bundles, stored chunks, whole documents,
//! transfers announced and arrived) merged into the phone's documents, and the
//! fallback to Automerge's sync protocol when knowledge was stale.

use automerge::ChangeHash;
use automerge::sync::State as SyncState;
use redline_proto::DocId;
use redline_proto::message::{Payload, Update};
use redline_proto::session::{DeviceResync, DocToSync, hashes_from_wire};
use redline_proto::wire::union_heads;

use super::{DeviceSession, Documents};
use crate::Error;

/// Bundle updates that arrived together, by document, in order of arrival: each
/// document's bytes one after another (a payload of several chunks) and the union of
/// the heads its updates named.
#[derive(Default)]
pub(super) struct Batch {
    docs: Vec<(DocId, Vec<u8>, Vec<ChangeHash>)>,
}

impl Batch {
    /// Adds a bundle update.
    pub(super) fn add(&mut self, u: Update) {
        let Payload::Bundle(bytes) = u.payload else {
            return;
        };
        let heads = hashes_from_wire(&u.heads);
        match self.docs.iter_mut().find(|(d, _, _)| *d == u.doc) {
            Some((_, all, named)) => {
                all.extend_from_slice(&bytes);
                union_heads(named, &heads);
            }
            None => self.docs.push((u.doc, bytes, heads)),
        }
    }
}

impl DeviceSession {
    /// Merges a batch of bundle updates: one apply per document.
    pub(super) fn apply_batch(
        &mut self,
        batch: Batch,
        docs: &mut impl Documents,
    ) -> Result<(), Error> {
        for (id, bytes, heads) in batch.docs {
            self.apply_bytes(id, &bytes, false, &heads, docs)?;
        }
        Ok(())
    }

    pub(super) fn apply_update(
        &mut self,
        u: Update,
        docs: &mut impl Documents,
    ) -> Result<(), Error> {
        if let (Payload::Transfer { .. }, Some(why)) = (&u.payload, &self.defer_large) {
            // Held back by the budget: the relay did not send it; ask again later.
            self.downloads_deferred = true;
            if !self
                .report
                .deferred
                .iter()
                .any(|(d, _)| *d == u.doc.as_str())
            {
                self.report.deferred.push((u.doc.to_string(), why.clone()));
            }
            return Ok(());
        }
        let heads = hashes_from_wire(&u.heads);
        self.progress.docs_total += 1;
        if !matches!(u.payload, Payload::Transfer { .. }) {
            self.progress.docs_done += 1;
        }
        let (bytes, document) = match u.payload {
            Payload::Bundle(b) => (b, false),
            Payload::Document(b) => (b, true),
            Payload::Transfer { id, document, .. } => {
                self.announced.insert(id, (u.doc, heads, document));
                return self.apply_transfers(docs);
            }
        };
        self.apply_bytes(u.doc, &bytes, document, &heads, docs)
    }

    pub(super) fn apply_transfers(&mut self, docs: &mut impl Documents) -> Result<(), Error> {
        let ready: Vec<[u8; 16]> = self
            .announced
            .keys()
            .filter(|id| self.arrived.contains_key(*id))
            .copied()
            .collect();
        for id in ready {
            let Some((doc, heads, document)) = self.announced.remove(&id) else {
                continue;
            };
            let Some(bytes) = self.arrived.remove(&id) else {
                continue;
            };
            self.apply_bytes(doc, &bytes, document, &heads, docs)?;
            self.progress.docs_done += 1;
            // Applied in memory; the staging goes once the document itself is stored.
            self.applied_transfers.push(id);
        }
        Ok(())
    }

    /// Merges a bundle or a saved document into the phone's copy of `id`.
    fn apply_bytes(
        &mut self,
        id: DocId,
        bytes: &[u8],
        document: bool,
        relay_heads: &[ChangeHash],
        docs: &mut impl Documents,
    ) -> Result<(), Error> {
        let merged = docs.merge_bytes(&id, bytes, document)?;
        if merged.new_changes > 0 {
            self.report.changes_received += merged.new_changes;
            self.updated.insert(id.clone());
            self.dirty.insert(id.clone());
            if document && merged.covers {
                // It holds everything before it: it becomes the stored snapshot.
                self.received.remove(&id);
                self.whole.insert(id.clone(), bytes.to_vec());
            } else {
                // Stored as it came (a whole document is a chunk like any other: loading
                // the stored copy merges it).
                self.received
                    .entry(id.clone())
                    .or_default()
                    .extend_from_slice(bytes);
            }
        }
        if merged.missing_deps {
            // This device lacks what the relay assumed it had (a restored backup).
            self.start_resync(id, docs)
        } else {
            // A relay told of `HELLO_DERIVES_HEADS` names none: what was applied came from
            // it, so the relay holds it.
            let relay_heads = if relay_heads.is_empty() {
                &merged.heads
            } else {
                relay_heads
            };
            let has = self.relay_has.entry(id.clone()).or_default();
            union_heads(has, relay_heads);
            self.acked.push((id, has.clone()));
            Ok(())
        }
    }

    pub(super) fn start_resync(
        &mut self,
        id: DocId,
        docs: &mut impl Documents,
    ) -> Result<(), Error> {
        let doc = docs.copy(&id)?;
        self.resynced.insert(id.clone());
        let d = DocToSync {
            id,
            doc,
            state: SyncState::new(),
        };
        match self.resync.as_mut() {
            Some(r) => r.add(d)?,
            None => self.resync = Some(DeviceResync::new(vec![d])?),
        }
        Ok(())
    }

    pub(super) fn finish_resync(&mut self, docs: &mut impl Documents) -> Result<(), Error> {
        let Some(r) = self.resync.take() else {
            return Ok(());
        };
        for mut s in r.finish() {
            if let Some(e) = s.error {
                self.report
                    .refused
                    .push((s.id.to_string(), format!("{}: {}", e.code, e.text)));
                continue;
            }
            self.report.changes_sent += s.changes_sent;
            let new = docs.merge_doc(&s.id, &mut s.doc)?;
            if new > 0 {
                self.report.changes_received += new;
                self.dirty.insert(s.id.clone());
                self.merged.insert(s.id.clone());
                self.updated.insert(s.id.clone());
            }
            // Both sides now hold what the settled exchange ended with.
            let has = self.relay_has.entry(s.id.clone()).or_default();
            union_heads(has, &s.doc.get_heads());
            self.acked.push((s.id, has.clone()));
        }
        // Writes made during the exchange go out as an ordinary push.
        if !self.written_in_flight.is_empty() {
            self.written_in_flight.clear();
            self.repush = true;
        }
        Ok(())
    }
}
