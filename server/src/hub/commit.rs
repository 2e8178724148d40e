//! The merge path: group commit per document (queue, one plan, one `apply_changes`, one
//! chunk, one shared flush, then every sender answered), actor bindings, compaction, and
//! recovery from a refused or failed batch by reloading from disk.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use automerge::{ActorId, Change, ChangeHash, ReadDoc};
use redline_proto::genesis::{GENESIS_ACTOR, genesis_hash};
use redline_proto::{DeviceId, DocId};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::committing::{CommitStep, Committing, Fact, Need};
use super::guard::guarded_apply;
use super::queue::{Committed, PendingPush};
use super::slots::{DocSlot, Part, SlotState, load_state};
use super::{Hub, has, make_bundle, plan};
use crate::Error;
use crate::authorship::{self, Author};

/// Longest wait for the follower to make a flushed commit of this relay readable
/// (several relays over one database; see [`Hub::until_stable`]).
const STABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The chunk a commit stores when its pushes' bytes, as sent, hold exactly the changes
/// that `entered` the document: the bytes of the pushes that brought only new changes,
/// one after another, and the changes' hashes in the same order. `None` when any change
/// that entered came in a push without its bytes or with changes the document already
/// had, when two pushes share a change, or when a push's bytes are larger than its
/// changes (a padded bundle is not stored as sent), or when a chunk's checksum is wrong
/// ([`crate::intake::storable_as_sent`]).
fn as_sent_chunk(
    ok: &[PendingPush],
    news: &[u32],
    entered: &[ChangeHash],
) -> Option<(Vec<ChangeHash>, SentChunk)> {
    let entered_set: std::collections::HashSet<&ChangeHash> = entered.iter().collect();
    let mut hashes = Vec::with_capacity(entered.len());
    let mut bytes = Vec::new();
    let mut parts = Vec::new();
    for (p, &n) in ok.iter().zip(news) {
        let mine: Vec<ChangeHash> = p.changes.iter().map(|c| c.hash()).collect();
        let inside = mine.iter().filter(|h| entered_set.contains(h)).count();
        if inside == 0 {
            continue;
        }
        let sent = p.as_sent.as_ref()?;
        let raw: usize = p.changes.iter().map(|c| c.raw_bytes().len()).sum();
        if inside != mine.len()
            || n as usize != mine.len()
            || sent.len() > raw
            || !crate::intake::storable_as_sent(sent)
        {
            return None;
        }
        hashes.extend(mine);
        bytes.extend_from_slice(sent);
        parts.push(Part {
            bytes_end: bytes.len(),
            hashes_end: hashes.len(),
        });
    }
    let unique: std::collections::HashSet<&ChangeHash> = hashes.iter().collect();
    (hashes.len() == entered.len() && unique.len() == hashes.len())
        .then_some((hashes, SentChunk { bytes, parts }))
}

/// A commit's chunk made of its pushes' bytes as sent, and where each push ends.
pub(crate) struct SentChunk {
    bytes: Vec<u8>,
    parts: Vec<Part>,
}

/// The pushes of a batch its plan accepted.
struct Planned {
    /// The pushes, in order.
    ok: Vec<PendingPush>,
    /// The changes each adds.
    news: Vec<u32>,
}

impl Hub {
    /// Commits `changes` to `doc` together with whatever else is queued for it.
    ///
    /// The commit runs in a task of its own: a caller that goes away (a phone hanging up
    /// mid-push) must not cancel a write that holds a sequence number and may carry other
    /// phones' pushes.
    pub async fn push(
        self: &Arc<Self>,
        id: &DocId,
        author: &Author,
        changes: Vec<Change>,
    ) -> Result<Committed, Error> {
        self.push_with(id, author, changes, None).await
    }

    /// [`push`](Self::push) of changes the device sent as `bytes` (a bundle, or change
    /// chunks, that the intake decoded into exactly `changes`): when every change is
    /// new, the commit stores these bytes instead of encoding a chunk of its own.
    pub async fn push_as_sent(
        self: &Arc<Self>,
        id: &DocId,
        author: &Author,
        changes: Vec<Change>,
        bytes: Vec<u8>,
    ) -> Result<Committed, Error> {
        self.push_with(id, author, changes, Some(bytes)).await
    }

    async fn push_with(
        self: &Arc<Self>,
        id: &DocId,
        author: &Author,
        changes: Vec<Change>,
        as_sent: Option<Vec<u8>>,
    ) -> Result<Committed, Error> {
        let slot = self.slot(id).await?;
        let (reply, rx) = oneshot::channel();
        slot.pending
            .lock()
            .expect("pending lock")
            .push(PendingPush {
                author: author.clone(),
                changes,
                as_sent,
                reply,
            });
        let (hub, doc) = (Arc::clone(self), id.clone());
        tokio::spawn(async move {
            {
                let mut state = slot.state.lock().await;
                let batch = std::mem::take(&mut *slot.pending.lock().expect("pending lock"));
                if !batch.is_empty() {
                    // Another relay may have committed since the slot was handed out.
                    if let Err(e) = hub.refresh(&doc, &slot, &mut state).await {
                        let e = Arc::new(e);
                        for p in batch {
                            let _ = p.reply.send(Err(Error::Commit(e.clone())));
                        }
                    } else {
                        hub.commit_batch(&doc, &slot, &mut state, batch).await;
                    }
                }
            }
            hub.release(slot);
        });
        let committed = rx
            .await
            .map_err(|_| Error::Storage("commit dropped".into()))??;
        if self.shared {
            self.until_stable(id, committed.seq).await;
        }
        Ok(committed)
    }

    /// Commits a batch: its plan (pure), then the steps [`Committing`] decides, each
    /// performed here (applying to the document, reloading it, writing its chunk), then
    /// every sender answered and, when due, the document compacted.
    async fn commit_batch(
        &self,
        id: &DocId,
        slot: &DocSlot,
        state: &mut SlotState,
        batch: Vec<PendingPush>,
    ) {
        let Some(Planned { ok, news }) = self.plan_commit(id, slot, state, batch) else {
            return;
        };
        let n_pushes = ok.len() as u64;
        let (mut run, mut step) = Committing::start(id, ok.len());
        // The heads before the batch and the changes it brings that the document
        // lacked: what a persist writes is those of them that entered.
        let mut mark: (Vec<ChangeHash>, Vec<ChangeHash>) = (Vec::new(), Vec::new());
        let outcome = loop {
            let need = match step {
                CommitStep::Done(outcome) => break outcome,
                CommitStep::Do(need) => need,
            };
            let fact = match need {
                Need::Apply { pushes, mark: note } => {
                    let changes: Vec<Change> = pushes
                        .iter()
                        .flat_map(|&i| ok[i].changes.iter().cloned())
                        .collect();
                    if note {
                        let lacked = changes
                            .iter()
                            .map(|c| c.hash())
                            .filter(|h| !has(&state.doc, h))
                            .collect();
                        mark = (state.doc.get_heads(), lacked);
                    }
                    let result = guarded_apply(&mut state.doc, changes);
                    Fact::Applied {
                        result,
                        queued: !state.doc.get_missing_deps(&[]).is_empty(),
                    }
                }
                Need::Reload => Fact::Reloaded(self.reload(id, slot, state).await),
                Need::Persist => {
                    // Changes of refused pushes never entered the document.
                    let entered: Vec<ChangeHash> = mark
                        .1
                        .iter()
                        .filter(|h| has(&state.doc, h))
                        .copied()
                        .collect();
                    let (new, chunk) = match as_sent_chunk(&ok, &news, &entered) {
                        Some((hashes, bytes)) => (hashes, Some(bytes)),
                        None => (entered, None),
                    };
                    let result = self.persist_new(id, slot, state, &mark.0, new, chunk).await;
                    Fact::Persisted {
                        result,
                        chunks: state.chunks,
                    }
                }
            };
            step = run.on(fact);
        };
        let merged = outcome.answers.iter().filter(|(_, a)| a.is_ok()).count();
        self.answer(id, state, ok, &news, outcome.answers);
        if let Some(e) = &outcome.failure {
            warn!(doc = %id, "a batch was not committed: {e}");
        }
        self.stats
            .pushes
            .fetch_add(merged as u64, Ordering::Relaxed);
        self.stats
            .conflicts
            .fetch_add(u64::from(outcome.conflicts), Ordering::Relaxed);
        self.stats.max_batch.fetch_max(n_pushes, Ordering::Relaxed);
        if let Some(observe) = self.batch_observer.get() {
            observe(n_pushes);
        }
        if outcome.compact {
            self.compact(id, slot, state).await;
        } else if merged > 0 && state.save_due() {
            // After the answers: a save a catch-up can send whole (see `catchup`).
            state.saved();
        }
    }

    /// Sends every push of a commit its answer (`answers` by index, one each).
    fn answer(
        &self,
        id: &DocId,
        state: &SlotState,
        ok: Vec<PendingPush>,
        news: &[u32],
        answers: Vec<(usize, Result<Option<u64>, Error>)>,
    ) {
        debug_assert_eq!(answers.len(), ok.len(), "every push answered once");
        let heads = state.doc.get_heads();
        let mut pushes: Vec<Option<PendingPush>> = ok.into_iter().map(Some).collect();
        for (i, answer) in answers {
            let Some(p) = pushes.get_mut(i).and_then(Option::take) else {
                warn!(doc = %id, push = i, "a commit answered a push twice");
                continue;
            };
            let r = answer.map(|seq| Committed {
                heads: heads.clone(),
                applied: news[i],
                seq: seq.unwrap_or_else(|| self.last_seq()),
            });
            let _ = p.reply.send(r);
        }
    }

    /// The commit plan of a batch (dependencies, actors, size: a pure function of the
    /// document and the pushes): refused pushes are answered here; the rest come back
    /// with the changes each adds and the hashes the batch adds. `None` when nothing
    /// is left to commit.
    fn plan_commit(
        &self,
        id: &DocId,
        slot: &DocSlot,
        state: &mut SlotState,
        batch: Vec<PendingPush>,
    ) -> Option<Planned> {
        let genesis = state
            .genesis
            .get_or_insert_with(|| Arc::new(authorship::Genesis::of(id)))
            .clone();
        let proposals: Vec<plan::Proposal<'_>> = batch
            .iter()
            .map(|p| plan::Proposal {
                author: &p.author,
                changes: &p.changes,
            })
            .collect();
        // Who may write what: every change new to the relay must be by an actor of the
        // pushing device (or be the document's genesis), and name nobody else.
        let mut admit = |author: &Author, new: &[&Change]| {
            self.check_actors(id, &author.device, new.iter().copied())
                .and_then(|()| self.check_authorship(author, new.iter().copied(), &genesis))
        };
        let plan = plan::plan_batch(
            id,
            &state.doc,
            slot.stored_bytes.load(Ordering::Relaxed) as u64,
            self.max_document_bytes.load(Ordering::Relaxed),
            &proposals,
            &mut admit,
        );
        drop(proposals);
        let mut ok = Vec::new();
        let mut news = Vec::new();
        for (p, verdict) in batch.into_iter().zip(plan.verdicts) {
            match verdict {
                Ok(n) => {
                    ok.push(p);
                    news.push(n);
                }
                Err(e) => {
                    let _ = p.reply.send(Err(e));
                }
            }
        }
        (!ok.is_empty()).then_some(Planned { ok, news })
    }

    /// Writes the changes `new` (those the document gained since `before`) as one chunk
    /// (`chunk` when the caller has their bytes, else a bundle made here) with the next
    /// feed sequence, waits for the flush, then advances the stable sequence; returns
    /// the sequence (`None`: nothing was new). On a failure the document in memory may
    /// be ahead of storage: the caller reloads it ([`Committing`] does).
    pub(crate) async fn persist_new(
        &self,
        id: &DocId,
        slot: &DocSlot,
        state: &mut SlotState,
        before: &[ChangeHash],
        new: Vec<ChangeHash>,
        chunk: Option<SentChunk>,
    ) -> Result<Option<u64>, Error> {
        let heads = state.doc.get_heads();
        if heads == before {
            return Ok(None);
        }
        let new_hashes = new.clone();
        let (chunk, parts) = match chunk {
            Some(sent) => (Arc::new(sent.bytes), sent.parts),
            None => (Arc::new(make_bundle(&state.doc, new)?), Vec::new()),
        };
        if self.shared {
            return self
                .persist_shared(id, slot, state, new_hashes, (chunk, parts))
                .await;
        }
        let seq = self.seq.lock().expect("seq lock").begin(id.clone());
        let wire: Vec<[u8; 32]> = heads.iter().map(|h| h.0).collect();
        let key = id.clone();
        let chunk_len = chunk.len();
        let stored = chunk.clone();
        let written = self
            .blocking(move |s| s.commit(&key, seq, &stored, &wire))
            .await;
        let result = match written {
            Ok(()) => self.flush().await,
            Err(e) => Err(e),
        };
        self.finish_seq(seq, result.is_ok());
        match result {
            Ok(()) => {
                self.count_commit(new_hashes.len());
                state.remember(seq, new_hashes, chunk, state.doc.get_heads(), parts);
                state.chunks += 1;
                slot.stored_bytes.fetch_add(chunk_len, Ordering::Relaxed);
                Ok(Some(seq))
            }
            Err(e) => {
                warn!(doc = %id, "commit failed, reloading from disk: {e}");
                Err(e)
            }
        }
    }

    /// A commit of `changes` changes is durable: counted once (a batch that failed, or
    /// met another relay's commit and was applied again, counts only when it lands).
    fn count_commit(&self, changes: usize) {
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .changes
            .fetch_add(changes as u64, Ordering::Relaxed);
    }

    /// [`persist_new`](Self::persist_new) on a shared feed: storage hands out the
    /// sequence (or refuses with a conflict if another relay committed to the document
    /// since it was loaded); after the flush the follower moves the stable sequence.
    async fn persist_shared(
        &self,
        id: &DocId,
        slot: &DocSlot,
        state: &mut SlotState,
        new_hashes: Vec<ChangeHash>,
        (chunk, parts): (Arc<Vec<u8>>, Vec<Part>),
    ) -> Result<Option<u64>, Error> {
        let heads: Vec<[u8; 32]> = state.doc.get_heads().iter().map(|h| h.0).collect();
        let expected = slot.included.load(Ordering::Acquire);
        let (key, stored) = (id.clone(), chunk.clone());
        let appended = self
            .blocking(move |s| s.append(&key, expected, &stored, &heads))
            .await;
        let result = match appended {
            Ok(seq) => {
                // Before the flush: the follower must never take this relay's own
                // commit for another relay's.
                slot.included.store(seq, Ordering::Release);
                match self.flush().await {
                    // Flushes are shared: the one that succeeded may not have held this
                    // append (its transaction rolled back before, and another caller's
                    // flush reported that).
                    Ok(()) if self.storage.append_lost(id, seq) => Err(Error::Storage(format!(
                        "the commit with sequence {seq} was rolled back"
                    ))),
                    Ok(()) => {
                        self.own_commit_flushed(seq, id);
                        Ok(seq)
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(seq) => {
                self.count_commit(new_hashes.len());
                slot.stored_bytes.fetch_add(chunk.len(), Ordering::Relaxed);
                state.remember(seq, new_hashes, chunk, state.doc.get_heads(), parts);
                state.chunks += 1;
                self.kick.notify_one();
                Ok(Some(seq))
            }
            Err(e) => {
                if !matches!(e, Error::Conflict(_)) {
                    warn!(doc = %id, "commit failed, reloading from storage: {e}");
                }
                Err(e)
            }
        }
    }

    /// Waits (bounded by [`STABLE_WAIT`]) until the follower has moved the stable
    /// sequence to `seq`, this relay's own flushed commit. A device told "stored", and
    /// any device syncing through this relay after it, then finds the commit in its
    /// catch-up: acknowledged means readable here, as on a relay of its own. The
    /// follower may lag when the database is slow or was just restarted (its
    /// announcements reconnect); the commit is durable either way, so a wait that times
    /// out is logged and the answer goes out.
    async fn until_stable(&self, id: &DocId, seq: u64) {
        let mut stable = self.stable.subscribe();
        let reached = tokio::time::timeout(STABLE_WAIT, stable.wait_for(|v| *v >= seq)).await;
        if !matches!(reached, Ok(Ok(_))) {
            warn!(doc = %id, seq, "the stable sequence did not reach a flushed commit in time");
        }
    }

    /// Replaces the in-memory document with what storage holds: after a failed write
    /// or a refused apply, memory never runs ahead of the disk.
    pub(crate) async fn reload(
        &self,
        id: &DocId,
        slot: &DocSlot,
        state: &mut SlotState,
    ) -> Result<(), Error> {
        let key = id.clone();
        let followed = self.followed.load(Ordering::Acquire);
        let loaded = self
            .blocking(move |s| s.load(&key))
            .await
            .and_then(|stored| {
                let included = stored.as_ref().map_or(0, |s| s.last_seq);
                load_state(id, stored).map(|(fresh, bytes)| (fresh, bytes, included))
            });
        let (mut fresh, bytes, included) = match loaded {
            Ok(l) => l,
            Err(e) => {
                // The document in memory may hold what storage refused (a failed
                // commit): on a shared feed, never let it pass for current. The next
                // user reloads it whole; until then its own commits conflict.
                if self.shared {
                    slot.included
                        .store(super::slots::UNKNOWN, Ordering::Release);
                    *slot.others.lock().expect("others lock") = super::slots::Others::covered(0);
                    slot.stale.store(true, Ordering::Release);
                }
                return Err(e);
            }
        };
        fresh.log_floor = if self.shared {
            included + 1
        } else {
            self.seq.lock().expect("seq lock").next()
        };
        slot.included.store(included, Ordering::Release);
        // What storage held covers every commit up to what was followed before.
        *slot.others.lock().expect("others lock") = super::slots::Others::covered(followed);
        *state = fresh;
        slot.stored_bytes.store(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Checks that every change in `new` (changes new to the relay) is by an actor bound
    /// to `device`, binding actors seen for the first time. The genesis actor belongs to
    /// nobody: only the document's genesis change may carry it.
    pub fn check_actors<'c>(
        &self,
        id: &DocId,
        device: &DeviceId,
        new: impl IntoIterator<Item = &'c Change>,
    ) -> Result<(), Error> {
        let mut genesis = None;
        for change in new {
            let actor = change.actor_id();
            if actor.to_bytes() == GENESIS_ACTOR {
                let expected = *genesis.get_or_insert_with(|| genesis_hash(id));
                if change.hash() != expected {
                    return Err(Error::ForgedActor {
                        actor: actor.to_hex_string(),
                        owner: "the document's genesis".into(),
                    });
                }
                continue;
            }
            let known = self.actors.lock().expect("actors lock").get(actor).cloned();
            let owner = match known {
                Some(owner) => owner,
                None => {
                    let owner = self.storage.bind_actor(actor.to_bytes(), device)?;
                    self.actors
                        .lock()
                        .expect("actors lock")
                        .insert(actor.clone(), owner.clone());
                    owner
                }
            };
            if owner != *device {
                return Err(Error::ForgedActor {
                    actor: actor.to_hex_string(),
                    owner: owner.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Checks that every change in `new` names only `author` (see [`authorship`]).
    fn check_authorship<'c>(
        &self,
        author: &Author,
        new: impl IntoIterator<Item = &'c Change>,
        genesis: &authorship::Genesis,
    ) -> Result<(), Error> {
        // Looked up only for increments: decoding the changes does not hold the lock.
        let own =
            |a: &ActorId| self.actors.lock().expect("actors lock").get(a) == Some(&author.device);
        for change in new {
            // The genesis was checked byte for byte by the actor check.
            if change.actor_id().to_bytes() == GENESIS_ACTOR {
                continue;
            }
            authorship::check(author, change, genesis, &own).map_err(Error::ForgedAuthorship)?;
        }
        Ok(())
    }

    /// The commit with `seq` is durable (`written`) or failed. When the stable sequence
    /// moves: the feed's recent entries learn the commits (in order: under the feed's
    /// lock), the stable sequence is published, then the sessions they concern are woken
    /// (after, so that a woken session reads a stable sequence that covers them).
    fn finish_seq(&self, seq: u64, written: bool) {
        let moved = {
            let mut feed = self.seq.lock().expect("seq lock");
            let moved = feed.finish(seq, written);
            if let Some(m) = &moved {
                self.recent
                    .lock()
                    .expect("recent lock")
                    .extend(m.from, &m.entries, m.stable);
            }
            moved
        };
        if let Some(m) = moved {
            self.stable.send_if_modified(|v| {
                let forward = m.stable > *v;
                if forward {
                    *v = m.stable;
                }
                forward
            });
            self.fanout.committed(m.entries.iter().map(|(_, d)| d));
        }
    }

    async fn compact(&self, id: &DocId, slot: &DocSlot, state: &mut SlotState) {
        // `save()` keeps changes queued for missing dependencies: never write those.
        if !state.doc.get_missing_deps(&[]).is_empty() {
            warn!(doc = %id, "not compacting: the document holds queued changes");
            return;
        }
        let snapshot = state.saved();
        let len = snapshot.len();
        let key = id.clone();
        let covers = if self.shared {
            slot.included.load(Ordering::Acquire)
        } else {
            u64::MAX
        };
        let done = self
            .blocking(move |s| s.compact(&key, snapshot.as_slice(), covers))
            .await;
        match done {
            Ok(()) => {
                state.chunks = 0;
                slot.stored_bytes.store(len, Ordering::Relaxed);
                debug!(doc = %id, bytes = len, "compacted");
            }
            // The chunks are still there: nothing is lost, compaction is retried later.
            Err(e) => warn!(doc = %id, "compaction failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Documents, MemoryStorage};
    use automerge::transaction::Transactable;
    use automerge::{ActorId, Automerge, ROOT};
    use redline_proto::token::Role;

    fn author() -> Author {
        Author {
            device: DeviceId::new("phone-0").unwrap(),
            member: redline_proto::MemberId::new("m0").unwrap(),
            role: Role::Volunteer,
        }
    }

    /// `n` more changes on `doc`, and the bundle a phone would push them in.
    fn write(doc: &mut Automerge, n: usize) -> (Vec<Change>, Vec<u8>) {
        let before = doc.get_heads();
        let written = doc.get_changes(&[]).len();
        for i in 0..n {
            let mut tx = doc.transaction();
            tx.put(ROOT, format!("k{}", written + i), i as i64).unwrap();
            tx.commit();
        }
        let changes = doc.get_changes(&before);
        let bundle = doc
            .bundle(changes.iter().map(|c| c.hash()))
            .unwrap()
            .bytes()
            .to_vec();
        (changes, bundle)
    }

    /// A push of only new changes is stored as the phone sent it (no bundle encoded
    /// again); a push whose bytes Automerge's loader would refuse (a wrong checksum),
    /// or that repeats a stored change, is stored as a bundle the relay makes. Every
    /// stored form loads into the same document.
    #[tokio::test]
    async fn pushes_of_new_changes_are_stored_as_sent() {
        let storage = Arc::new(MemoryStorage::new(7));
        let hub = Hub::new(storage.clone(), 1 << 20).unwrap();
        let id = DocId::parse("households/zone-1").unwrap();
        let mut doc = Automerge::new().with_actor(ActorId::from([1u8; 16]));
        let stored_last = || {
            storage
                .load(&id)
                .unwrap()
                .unwrap()
                .chunks
                .last()
                .cloned()
                .unwrap()
        };

        let (changes, bundle) = write(&mut doc, 3);
        hub.push_as_sent(&id, &author(), changes, bundle.clone())
            .await
            .unwrap();
        assert_eq!(stored_last(), bundle, "stored as sent");

        let (changes, bundle) = write(&mut doc, 2);
        let mut bad = bundle.clone();
        bad[5] ^= 0xff;
        hub.push_as_sent(&id, &author(), changes, bad.clone())
            .await
            .unwrap();
        let made = stored_last();
        assert_ne!(made, bad, "a wrong checksum is not stored");
        assert!(crate::intake::storable_as_sent(&made));

        // One change the relay has, one new: the new one is bundled by the relay.
        let known = doc.get_changes(&[])[0].clone();
        let (mut changes, mut bundle) = write(&mut doc, 1);
        changes.insert(0, known.clone());
        let mut sent = known.raw_bytes().to_vec();
        sent.append(&mut bundle);
        let c = hub
            .push_as_sent(&id, &author(), changes, sent.clone())
            .await
            .unwrap();
        assert_eq!(c.applied, 1);
        assert_ne!(stored_last(), sent);

        // Every stored form loads (Automerge's own loader, as a phone's store does).
        let stored = storage.load(&id).unwrap().unwrap();
        let mut all = stored.snapshot.clone().unwrap_or_default();
        for chunk in &stored.chunks {
            all.extend_from_slice(chunk);
        }
        let loaded = Automerge::load(&all).unwrap();
        assert_eq!(loaded.get_heads(), doc.get_heads());
    }
}
