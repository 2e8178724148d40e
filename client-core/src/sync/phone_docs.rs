//! The client's documents, store and data policy behind the session's [`Documents`]
//! door.

use std::collections::HashMap;

use automerge::{Automerge, ChangeHash};
use redline_proto::DocId;
use tracing::debug;

use crate::client::Client;
use crate::device_session::{
    CachedUpload, Documents, Merged, Outgoing, Step, bundle_after, known_held,
    merge_received_logged,
};
use crate::store::{DocWrite, SyncBatch};
use crate::{Error, INLINE_MAX, Urgency};

/// The client as a session's [`Documents`].
pub(crate) struct PhoneDocs<'a>(pub &'a Client);

impl Documents for PhoneDocs<'_> {
    fn relay_held(&self) -> Result<HashMap<DocId, Vec<ChangeHash>>, Error> {
        let store = &self.0.inner.store;
        let mut out = HashMap::new();
        for id in store.doc_ids()? {
            let has = store.acked_heads(&id)?.unwrap_or_default();
            out.insert(id, has);
        }
        Ok(out)
    }

    fn ids(&self) -> Result<Vec<DocId>, Error> {
        self.0.inner.store.doc_ids()
    }

    fn heads(&mut self, id: &DocId) -> Result<Option<Vec<ChangeHash>>, Error> {
        let mut docs = self.0.docs();
        Ok(self.0.load(&mut docs, id)?.map(|d| d.get_heads()))
    }

    fn outgoing(
        &mut self,
        id: &DocId,
        relay_has: &[ChangeHash],
        heads: &[ChangeHash],
    ) -> Result<Option<Outgoing>, Error> {
        let mut docs = self.0.docs();
        let Some(doc) = self.0.load(&mut docs, id)? else {
            return Ok(None);
        };
        let known = known_held(doc, relay_has);
        let mut cache = self.0.inner.upload_cache.lock().expect("upload cache lock");
        if let Some(c) = cache
            .as_ref()
            .filter(|c| c.doc == *id && c.base == known && c.heads == heads)
        {
            return Ok(Some(Outgoing {
                bytes: c.bytes.clone(),
                changes: c.changes,
                urgency: self.0.urgency(id, doc),
            }));
        }
        let Some(mut out) = bundle_after(id, doc, &known)? else {
            return Ok(None);
        };
        if out.bytes.len() > INLINE_MAX {
            *cache = Some(CachedUpload {
                doc: id.clone(),
                base: known,
                heads: heads.to_vec(),
                bytes: out.bytes.clone(),
                changes: out.changes,
            });
        }
        out.urgency = self.0.urgency(id, doc);
        Ok(Some(out))
    }

    fn held_back(
        &self,
        urgency: Urgency,
        len: usize,
        large: &str,
    ) -> Result<Option<String>, Error> {
        self.0.held_back(urgency, len, large)
    }

    fn merge_bytes(&mut self, id: &DocId, bytes: &[u8], document: bool) -> Result<Merged, Error> {
        let mut docs = self.0.docs();
        let doc = self.0.load_or_genesis(&mut docs, id)?;
        let before = doc.get_heads();
        // Kept tally totals follow applied changes by their patches (a whole document
        // replaces the copy: the next read of totals reads it whole).
        let tallies = &self.0.inner.tallies;
        let follow = !document && tallies.wants(id, &before);
        let mut log = automerge::PatchLog::new(follow);
        let merged = merge_received_logged(id, doc, bytes, document, &mut log)?;
        if follow {
            tallies.advance_by(id, &before, doc, &mut log);
        }
        if document && merged.covers {
            self.0.merged_whole(id);
        }
        Ok(merged)
    }

    fn copy(&mut self, id: &DocId) -> Result<Automerge, Error> {
        let mut docs = self.0.docs();
        Ok(match self.0.load(&mut docs, id)? {
            Some(d) => d.clone(),
            None => Automerge::new(),
        })
    }

    fn merge_doc(&mut self, id: &DocId, doc: &mut Automerge) -> Result<u64, Error> {
        let mut docs = self.0.docs();
        let live = self.0.load_or_genesis(&mut docs, id)?;
        let before = live.get_heads();
        live.merge(doc)?;
        Ok(if live.get_heads() == before {
            0
        } else {
            live.get_changes_meta(&before).len() as u64
        })
    }

    fn store(&mut self, step: Step) -> Result<(), Error> {
        let client = self.0;
        let mut batch = SyncBatch {
            acked: step.acked,
            cursor: step.cursor,
            acked_at_ms: client.inner.config.clock.now_ms(),
            ..SyncBatch::default()
        };
        let mut written = Vec::new();
        let mut snapshots = false;
        let docs = client.docs();
        for dirty in step.docs {
            let Some(d) = docs.get(&dirty.id) else {
                continue;
            };
            // Asked whenever a whole document came (merged or not): asking forgets the note.
            let covers = dirty.whole.is_some() && client.whole_still_covers(&dirty.id);
            let writes = match (dirty.whole, dirty.received) {
                // A whole document holding all the store held (and still does: no
                // local write since): the new snapshot (no compaction to come),
                // then what came after it. The documents stay locked until it is
                // written, so no local write lands in between and is dropped.
                (Some(whole), rest) if covers && !dirty.merged => {
                    snapshots = true;
                    let mut w = vec![DocWrite::Snapshot(whole)];
                    w.extend(rest.map(DocWrite::Append));
                    w
                }
                (None, Some(bundles)) if !dirty.merged && client.is_stored(&dirty.id) => {
                    vec![DocWrite::Append(bundles)]
                }
                _ => vec![client.doc_write(&dirty.id, d, None)],
            };
            for write in writes {
                match write {
                    DocWrite::Append(chunk) if chunk.is_empty() => {}
                    write => batch.docs.push((dirty.id.clone(), write)),
                }
            }
            written.push((dirty.id, d.get_heads()));
        }
        // Without a snapshot the documents need not stay locked through the flush:
        // appended chunks never drop what a local write stores meanwhile.
        let docs = snapshots.then_some(docs);
        let mut changed: Vec<DocId> = batch.docs.iter().map(|(id, _)| id.clone()).collect();
        changed.dedup();
        // What arrived is visible (the live copies hold it) before this device's flush:
        // the relay holds it durably, and a crash before the flush only means it arrives
        // again (the cursor moves with the flush, never before it).
        for id in &changed {
            let _ = client.inner.changes.send(crate::client::DocChange {
                doc: id.clone(),
                origin: crate::client::ChangeOrigin::Sync,
            });
        }
        if !batch.is_empty()
            && let Err(e) = client.inner.store.write_batch(&batch)
        {
            // Not stored: drop the cached copies so memory matches disk.
            let mut docs = docs.unwrap_or_else(|| client.docs());
            for id in &changed {
                docs.remove(id);
            }
            return Err(e);
        }
        for (id, heads) in written {
            client.stored_as(&id, heads);
        }
        drop(docs);
        client.compact_heavy(&changed);
        let store = &client.inner.store;
        for id in step.applied_transfers {
            store.drop_transfer(&id)?;
        }
        if let Some(announced) = step.settled_announced {
            // Partial transfers nobody announced this time are stale (the document moved on).
            for (id, _) in store.partial_transfers()? {
                if !announced.contains(&id) {
                    store.drop_transfer(&id)?;
                }
            }
        }
        debug!("sync step persisted");
        Ok(())
    }
}

impl Client {
    /// How much `id` matters now: open emergency or urgent needs, or today's ledger
    /// (where duty check-ins are), come first.
    fn urgency(&self, id: &DocId, doc: &Automerge) -> Urgency {
        match id.kind() {
            redline_proto::DocKind::Households(_) => {
                if crate::households::has_open_urgent_need(doc).unwrap_or(false) {
                    Urgency::Urgent
                } else {
                    Urgency::Normal
                }
            }
            redline_proto::DocKind::Ledger(_, day) => {
                let today = crate::client::day_of(self.inner.config.clock.now_ms());
                if today.as_ref() == Some(&day) {
                    Urgency::Urgent
                } else {
                    Urgency::Normal
                }
            }
            redline_proto::DocKind::Roster(_) => Urgency::Normal,
        }
    }

    /// Folds the chunks of `ids` into new snapshots where they have grown heavy. Best
    /// effort: what the chunks hold is durable already.
    fn compact_heavy(&self, ids: &[DocId]) {
        for id in ids {
            let heavy = self
                .inner
                .store
                .stored(id)
                .is_ok_and(|s| crate::store::wants_compaction(&s));
            if !heavy {
                continue;
            }
            let docs = self.docs();
            if let Some(d) = docs.get(id)
                && self.inner.store.save_doc(id, &d.save()).is_ok()
            {
                self.stored_as(id, d.get_heads());
            }
        }
    }
}

#[cfg(test)]
mod chunk_tests {
    use automerge::transaction::Transactable;
    use automerge::{ActorId, Automerge, ROOT};

    use crate::device_session::chunk_changes;

    #[test]
    fn an_update_of_several_chunks_gives_every_change_and_a_cut_one_is_refused() {
        let mut doc = Automerge::new().with_actor(ActorId::random());
        let mut bundles = Vec::new();
        for i in 0..3 {
            let before = doc.get_heads();
            for j in 0..2 {
                let mut tx = doc.transaction();
                tx.put(ROOT, format!("k{i}-{j}"), i * 10 + j).unwrap();
                tx.commit();
            }
            let new: Vec<_> = doc.get_changes(&before).iter().map(|c| c.hash()).collect();
            bundles.push(doc.bundle(new).unwrap().bytes().to_vec());
        }
        // One change as a plain change chunk between the bundles.
        let mut tx = doc.transaction();
        tx.put(ROOT, "single", 1).unwrap();
        tx.commit();
        let single = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
        let mut all = bundles[0].clone();
        all.extend_from_slice(&single);
        all.extend_from_slice(&bundles[1]);
        all.extend_from_slice(&bundles[2]);
        assert_eq!(chunk_changes(&bundles[0]).unwrap().len(), 2);
        let changes = chunk_changes(&all).unwrap();
        assert_eq!(changes.len(), 7);
        let mut copy = Automerge::new();
        copy.apply_changes(changes).unwrap();
        assert_eq!(copy.get_heads(), doc.get_heads());
        assert!(chunk_changes(&all[..all.len() - 1]).is_err());
        assert!(chunk_changes(&[0x85, 0x6f, 0x4a]).is_err());
    }
}

#[cfg(test)]
mod whole_document_tests {
    use automerge::transaction::Transactable;
    use automerge::{ActorId, Automerge, ROOT, ReadDoc};
    use redline_proto::{Day, DocId, MemberId, TeamId};

    use super::PhoneDocs;
    use crate::device_session::{DirtyDoc, Documents, Step};
    use crate::{Client, ClientConfig};

    /// A phone on a sled store in a temporary directory, with one ledger day.
    struct Day1 {
        dir: tempfile::TempDir,
        team: TeamId,
        day: Day,
        id: DocId,
        phone: Client,
    }

    impl Day1 {
        /// The phone, after `writes` deliveries of its own.
        fn with_writes(writes: usize) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let phone = Client::open(dir.path(), Self::config()).unwrap();
            let (team, day) = (
                TeamId::new("team-1").unwrap(),
                Day::new("2026-12-01").unwrap(),
            );
            let id = DocId::ledger(&team, &day);
            let d = Self {
                dir,
                team,
                day,
                id,
                phone,
            };
            for _ in 0..writes {
                d.deliver();
            }
            d
        }

        fn config() -> ClientConfig {
            ClientConfig::new(MemberId::new("ana").unwrap())
        }

        /// One more delivery, written locally.
        fn deliver(&self) {
            let (team, day) = (&self.team, &self.day);
            self.phone.add_to_tally(team, day, "deliveries", 1).unwrap();
        }

        /// The relay's copy: the phone's as it is now and `mates` changes of a teammate.
        fn relay_with(&self, mates: usize) -> Automerge {
            let mut relay = self.doc().with_actor(ActorId::random());
            for i in 0..mates {
                let mut tx = relay.transaction();
                tx.put(ROOT, format!("mate-{i}"), i as i64).unwrap();
                tx.commit();
            }
            relay
        }

        fn doc(&self) -> Automerge {
            self.phone.document(&self.id).unwrap().unwrap()
        }

        /// The session's store of one step that received `received` (after `whole`).
        fn store(&self, received: Option<Vec<u8>>, whole: Option<Vec<u8>>) {
            let dirty = DirtyDoc {
                id: self.id.clone(),
                received,
                whole,
                merged: false,
            };
            let step = Step {
                docs: vec![dirty],
                ..Step::default()
            };
            PhoneDocs(&self.phone).store(step).unwrap();
        }

        /// Closes the phone and opens its store again: it holds the heads it had, and
        /// the day's deliveries. Returns the reopened copy of the day.
        fn reopen(self, deliveries: i64) -> Automerge {
            let now = self.phone.heads(&self.id).unwrap();
            drop(self.phone);
            let reopened = Client::open(self.dir.path(), Self::config()).unwrap();
            assert_eq!(reopened.heads(&self.id).unwrap(), now);
            let totals = reopened.day_totals(&self.team, &self.day).unwrap();
            assert_eq!(totals.get("deliveries").copied(), Some(deliveries));
            reopened.document(&self.id).unwrap().unwrap()
        }
    }

    fn value(doc: &Automerge, key: &str) -> Option<i64> {
        doc.get(ROOT, key).unwrap().and_then(|(v, _)| v.as_i64())
    }

    /// The relay's whole document merged into a phone that wrote meanwhile: the phone
    /// keeps its own writes and its actor, and the document stored as it came (a chunk
    /// after the phone's own) loads back as the same document.
    #[test]
    fn a_whole_document_keeps_the_phones_own_writes_and_stores_as_it_came() {
        let d = Day1::with_writes(1);
        // The relay holds the phone's first write and a teammate's 300 changes.
        let relay = d.relay_with(300);
        // The phone wrote twice more meanwhile.
        d.deliver();
        d.deliver();
        let own = d.doc();
        let whole = relay.save();

        let merged = PhoneDocs(&d.phone)
            .merge_bytes(&d.id, &whole, true)
            .unwrap();
        assert_eq!(merged.new_changes, 300);
        assert!(!merged.missing_deps);
        assert!(!merged.covers, "the phone's two later writes are not in it");
        let doc = d.doc();
        assert_eq!(doc.get_actor(), own.get_actor(), "still the phone's actor");
        let mut expected = relay.clone();
        expected.merge(&mut own.clone()).unwrap();
        assert_eq!(doc.get_heads(), expected.get_heads(), "both sides' changes");

        d.store(Some(whole), None);
        // Written after the merge: the stored copy holds it too.
        d.deliver();
        let doc = d.reopen(4);
        assert_eq!(value(&doc, "mate-299"), Some(299));
    }

    /// A whole document holding everything the phone held replaces the stored copy: it
    /// is stored as the snapshot (nothing left for a compaction to fold), what came
    /// after it as a chunk, and the copy loads back as the same document.
    #[test]
    fn a_whole_document_holding_all_the_phone_had_becomes_its_snapshot() {
        let d = Day1::with_writes(20);
        assert!(d.phone.inner.store.stored(&d.id).unwrap().chunks > 0);
        let mut relay = d.relay_with(300);
        let whole = relay.save();
        let saved_at = relay.get_heads();
        let mut tx = relay.transaction();
        tx.put(ROOT, "after the save", 1).unwrap();
        tx.commit();
        let after: Vec<_> = relay
            .get_changes(&saved_at)
            .iter()
            .map(|c| c.hash())
            .collect();
        let rest = relay.bundle(after).unwrap().bytes().to_vec();

        let merged = PhoneDocs(&d.phone)
            .merge_bytes(&d.id, &whole, true)
            .unwrap();
        assert!(merged.covers, "it holds every change the phone had");
        assert_eq!(merged.new_changes, 300);
        PhoneDocs(&d.phone)
            .merge_bytes(&d.id, &rest, false)
            .unwrap();
        d.store(Some(rest.clone()), Some(whole.clone()));
        let stored = d.phone.inner.store.stored(&d.id).unwrap();
        assert_eq!(stored.snapshot_bytes, whole.len() as u64, "{stored:?}");
        assert_eq!(stored.chunks, 1);
        assert_eq!(stored.chunk_bytes, rest.len() as u64);
        assert_eq!(d.phone.heads(&d.id).unwrap(), relay.get_heads());
        let doc = d.reopen(20);
        assert_eq!(value(&doc, "after the save"), Some(1));
    }

    /// A local write between the merge of a whole document and the session's store is
    /// stored as a chunk; the save must not replace the stored copy then (it would drop
    /// that chunk): the write survives a reopen. (The simulation found this, seed 44.)
    #[test]
    fn a_local_write_after_a_whole_document_survives_its_store() {
        let d = Day1::with_writes(1);
        let whole = d.relay_with(50).save();
        let merged = PhoneDocs(&d.phone)
            .merge_bytes(&d.id, &whole, true)
            .unwrap();
        assert!(merged.covers);
        d.deliver();
        d.store(None, Some(whole.clone()));
        assert_ne!(
            d.phone.inner.store.stored(&d.id).unwrap().snapshot_bytes,
            whole.len() as u64,
            "the save did not replace the stored copy"
        );
        let doc = d.reopen(2);
        assert_eq!(value(&doc, "mate-49"), Some(49));
    }
}
