//! The narrow door through which a [`DeviceSession`](super::DeviceSession) reaches the
//! phone: its documents, what the store holds, and the data policy. The client
//! implements it over its document cache and store; tests implement it in memory.

use std::collections::HashMap;
use std::sync::Arc;

use automerge::{Automerge, ChangeHash, PatchLog, ReadDoc};
use redline_proto::DocId;

use crate::{Error, Urgency};

/// A push ready to go: the changes the relay is not known to hold, bundled.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// The Automerge bundle.
    pub bytes: Arc<Vec<u8>>,
    /// Changes in it.
    pub changes: u64,
    /// How much the document matters now (urgent ones go first and always go).
    pub urgency: Urgency,
}

/// What merging bytes from the relay did to a document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Changes new to this phone.
    pub new_changes: u64,
    /// The merge left dependencies missing here (the relay assumed more than the phone
    /// holds: a restored backup).
    pub missing_deps: bool,
    /// The heads of what was merged (a whole document's heads; for bundles, their
    /// changes that none of the others depends on): held by the relay, which sent them.
    pub heads: Vec<ChangeHash>,
    /// A whole document that held every change the phone's copy held before it: it can
    /// replace the stored copy as its snapshot (nothing of the phone's is lost).
    pub covers: bool,
}

/// The changes of `changes` that none of the others depends on (their heads).
pub fn heads_of(changes: &[automerge::Change]) -> Vec<ChangeHash> {
    let deps: std::collections::HashSet<ChangeHash> = changes
        .iter()
        .flat_map(|c| c.deps().iter().copied())
        .collect();
    let mut heads: Vec<ChangeHash> = changes
        .iter()
        .map(|c| c.hash())
        .filter(|h| !deps.contains(h))
        .collect();
    heads.sort();
    heads.dedup();
    heads
}

/// The changes of `bytes`: one Automerge bundle, or several bundles and change chunks
/// one after another (what a relay sends a device that says it reads them).
pub fn chunk_changes(bytes: &[u8]) -> Result<Vec<automerge::Change>, String> {
    let mut changes = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (chunk, _, after) = redline_proto::wire::split_chunk(rest)?;
        match automerge::Bundle::try_from(chunk) {
            Ok(b) => changes.extend(b.to_changes().map_err(|e| e.to_string())?),
            Err(_) => changes.push(automerge::Change::try_from(chunk).map_err(|e| e.to_string())?),
        }
        rest = after;
    }
    Ok(changes)
}

/// Of the heads the relay is known to hold, those `doc` knows of (sorted): what a push
/// builds on.
pub fn known_held(doc: &Automerge, relay_has: &[ChangeHash]) -> Vec<ChangeHash> {
    let mut known: Vec<ChangeHash> = relay_has
        .iter()
        .filter(|h| doc.get_change_meta_by_hash(h).is_some())
        .copied()
        .collect();
    known.sort();
    known
}

/// The changes of `doc` after `known`, bundled as a push of normal urgency (the caller
/// says how much the document matters); `None` when there are none.
pub fn bundle_after(
    id: &DocId,
    doc: &Automerge,
    known: &[ChangeHash],
) -> Result<Option<Outgoing>, Error> {
    let hashes: Vec<ChangeHash> = doc.get_changes(known).iter().map(|c| c.hash()).collect();
    if hashes.is_empty() {
        return Ok(None);
    }
    let changes = hashes.len() as u64;
    let bundle = doc
        .bundle(hashes)
        .map_err(|e| Error::Store(format!("cannot bundle {id}: {e}")))?;
    Ok(Some(Outgoing {
        bytes: Arc::new(bundle.bytes().to_vec()),
        changes,
        urgency: Urgency::Normal,
    }))
}

/// Merges `bytes` from the relay into the phone's copy `doc` of `id`: a whole saved
/// document when `document` (loaded, and the phone's copy merged into it: only what the
/// relay lacks is applied, far cheaper than applying the relay's changes when the phone
/// lacked most of them), otherwise one bundle or several stored chunks one after
/// another (every one decoded, then all applied at once). The way every
/// [`Documents::merge_bytes`] merges, the client's and the simulation's.
pub fn merge_received(
    id: &DocId,
    doc: &mut Automerge,
    bytes: &[u8],
    document: bool,
) -> Result<Merged, Error> {
    merge_received_logged(id, doc, bytes, document, &mut PatchLog::inactive())
}

/// [`merge_received`], logging the patches of applied changes to `log` (a whole
/// document is merged without: it replaces the copy, and `log` stays empty).
pub fn merge_received_logged(
    id: &DocId,
    doc: &mut Automerge,
    bytes: &[u8],
    document: bool,
    log: &mut PatchLog,
) -> Result<Merged, Error> {
    let corrupt = |e: String| {
        Error::Protocol(redline_proto::Error::BadSyncData {
            doc: id.clone(),
            reason: e,
        })
    };
    // Counted as the history's size before and after (Automerge keeps it): walking the
    // history after the old heads cost about a twentieth of a phone's CPU in a storm
    // (profile of 2026-12-04).
    let before = doc.stats().num_changes;
    let heads;
    let mut covers = false;
    if document {
        let mut loaded = Automerge::load(bytes).map_err(|e| corrupt(e.to_string()))?;
        heads = loaded.get_heads();
        covers = doc
            .get_heads()
            .iter()
            .all(|h| loaded.get_change_meta_by_hash(h).is_some());
        loaded.merge(doc)?;
        loaded.set_actor(doc.get_actor().clone());
        *doc = loaded;
    } else {
        let changes = chunk_changes(bytes).map_err(corrupt)?;
        heads = heads_of(&changes);
        doc.apply_changes_log_patches(changes, log)?;
    }
    let new_changes = doc.stats().num_changes.saturating_sub(before);
    Ok(Merged {
        new_changes,
        missing_deps: !doc.get_missing_deps(&[]).is_empty(),
        heads,
        covers,
    })
}

/// A document a sync step changed, and how to store it.
#[derive(Clone, Debug)]
pub struct DirtyDoc {
    /// Which document.
    pub id: DocId,
    /// The bundles, stored chunks and whole documents applied to it, in order, when only
    /// updates changed it: appended to the stored copy as they came (no re-encoding; a
    /// whole document is a chunk that loading merges like any other).
    pub received: Option<Vec<u8>>,
    /// A whole document received that held everything the phone's copy held before it:
    /// stored as the new snapshot, with `received` (what came after it) appended. A
    /// stored copy grown by a whole document as a chunk would soon be compacted, which
    /// costs a save of the document.
    pub whole: Option<Vec<u8>>,
    /// Changed by more than bundles (a whole document, a resync merge): store what the
    /// store lacks of it.
    pub merged: bool,
}

/// What one sync step leaves to store, with one flush.
#[derive(Debug, Default)]
pub struct Step {
    /// Documents to write.
    pub docs: Vec<DirtyDoc>,
    /// Heads the relay holds, per document (sorted; collapsed to the document's heads once
    /// it holds all of them).
    pub acked: Vec<(DocId, Vec<ChangeHash>)>,
    /// The new feed cursor (encoded) under its key, when nothing it covers is pending.
    pub cursor: Option<(String, Vec<u8>)>,
    /// Transfers applied, whose staged pieces go once the documents are stored.
    pub applied_transfers: Vec<[u8; 16]>,
    /// When the session has settled: the transfers still announced (any other staged
    /// transfer is stale and goes).
    pub settled_announced: Option<Vec<[u8; 16]>>,
}

/// The phone as a sync session sees it.
pub trait Documents {
    /// Every document the phone holds, with the heads the relay is known to hold of it.
    fn relay_held(&self) -> Result<HashMap<DocId, Vec<ChangeHash>>, Error>;
    /// Every document the phone holds.
    fn ids(&self) -> Result<Vec<DocId>, Error>;
    /// The heads of `id`, `None` if the phone does not hold it.
    fn heads(&mut self, id: &DocId) -> Result<Option<Vec<ChangeHash>>, Error>;
    /// The changes of `id` after `relay_has` (a bundle ending at `heads`), `None` when
    /// there are none.
    fn outgoing(
        &mut self,
        id: &DocId,
        relay_has: &[ChangeHash],
        heads: &[ChangeHash],
    ) -> Result<Option<Outgoing>, Error>;
    /// Why the data and battery policy holds back `len` bytes of `urgency` now (`large`
    /// names it when held for its size), if it does.
    fn held_back(&self, urgency: Urgency, len: usize, large: &str)
    -> Result<Option<String>, Error>;
    /// Merges `bytes` from the relay (bundles and stored chunks, or a whole saved document
    /// when `document`) into `id`, started from its genesis if the phone lacks it.
    fn merge_bytes(&mut self, id: &DocId, bytes: &[u8], document: bool) -> Result<Merged, Error>;
    /// A copy of `id` for Automerge's sync protocol (empty if the phone lacks it).
    fn copy(&mut self, id: &DocId) -> Result<Automerge, Error>;
    /// Merges what a settled resync ended with into `id`; the changes new here.
    fn merge_doc(&mut self, id: &DocId, doc: &mut Automerge) -> Result<u64, Error>;
    /// Stores `step` with one flush, and makes the documents it changed visible.
    fn store(&mut self, step: Step) -> Result<(), Error>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ActorId, ROOT};

    fn write(doc: &mut Automerge, key: &str) -> ChangeHash {
        let mut tx = doc.transaction();
        tx.put(ROOT, key, 1).unwrap();
        tx.commit().0.unwrap()
    }

    /// What an update brought is what the copy did not hold before and holds after:
    /// a change the phone already held is not new; one that waits for a dependency the
    /// phone lacks counts once it lands.
    #[test]
    fn new_changes_count_only_what_the_apply_added() {
        let id = DocId::parse("households/zone-1").unwrap();
        let mut relay = Automerge::new().with_actor(ActorId::random());
        write(&mut relay, "base");
        let mut phone = relay.fork().with_actor(ActorId::random());
        let before = relay.get_heads();
        let a = write(&mut relay, "a");
        let b = write(&mut relay, "b");
        let c = write(&mut relay, "c");
        // The phone already holds `a` (it came in an earlier piece).
        phone
            .apply_changes(relay.get_changes(&before).into_iter().take(1))
            .unwrap();
        let bundle = relay.bundle([a, b, c]).unwrap().bytes().to_vec();
        let merged = merge_received(&id, &mut phone, &bundle, false).unwrap();
        assert_eq!(merged.new_changes, 2, "a was held already");
        assert!(!merged.missing_deps);
        assert_eq!(phone.get_heads(), vec![c]);

        // A piece whose first change the phone lacks: nothing of it is applied yet.
        let d = write(&mut relay, "d");
        let e = write(&mut relay, "e");
        let only_e = relay.bundle([e]).unwrap().bytes().to_vec();
        let merged = merge_received(&id, &mut phone, &only_e, false).unwrap();
        assert_eq!(merged.new_changes, 0, "e waits for d");
        assert!(merged.missing_deps);
        let only_d = relay.bundle([d]).unwrap().bytes().to_vec();
        let merged = merge_received(&id, &mut phone, &only_d, false).unwrap();
        // d, and e from Automerge's queue.
        assert_eq!(merged.new_changes, 2);
        assert!(!merged.missing_deps);
        assert_eq!(phone.get_heads(), vec![e]);
    }
}
