//! The document cache: parsed documents in slots, bounded by a memory budget (an
//! estimate: stored bytes × [`MEMORY_FACTOR`]); only idle documents are evicted, least
//! recently used first. A slot also keeps, per document, the recent commit log, the last
//! whole-document save and the bundles made for catch-ups.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use automerge::{Automerge, ChangeHash, ReadDoc};
use redline_proto::DocId;
use redline_proto::wire::INLINE_MAX;
use tokio::sync::Mutex as AsyncMutex;

use super::queue::PendingPush;
use super::{Hub, bundle_changes};
use crate::Error;
use crate::authorship;
use crate::storage::StoredDoc;

/// In-memory size of a parsed document relative to its stored (compressed) size: an
/// estimate for the cache budget.
pub const MEMORY_FACTOR: usize = 8;

/// A document in the cache.
pub struct DocSlot {
    pub(super) state: AsyncMutex<SlotState>,
    pub(super) pending: Mutex<Vec<PendingPush>>,
    pub(super) last_used: AtomicU64,
    pub(super) stored_bytes: AtomicUsize,
    /// Shared feed: the sequence of the last commit the parsed document holds (its
    /// last commit as loaded, or this relay's own since).
    pub(super) included: AtomicU64,
    /// Shared feed: another relay committed to the document after `included`; the next
    /// use reloads it.
    pub(super) stale: std::sync::atomic::AtomicBool,
    /// Shared feed: other relays' commits the follower read with their chunks.
    pub(super) others: Mutex<Others>,
}

/// Other relays' commits to a document, read by the feed's follower with their chunks
/// ahead of the catch-up that takes them in: a live catch-up across relays then needs
/// no read of its own.
///
/// Invariant: every other relay's commit to the document with a sequence after the
/// slot's `included` and up to `upto` is in `chunks`. `upto` moves only over windows
/// of the feed read whole (with every chunk) from `upto` on, or to a point a read of
/// storage covered; a window read without chunks leaves it behind, and the take-in
/// then reads storage as before.
#[derive(Debug, Default)]
pub(super) struct Others {
    pub(super) upto: u64,
    pub(super) chunks: Vec<HeldChunk>,
}

/// Another relay's commit held for a take-in: its sequence, chunk and the heads after it.
pub(super) type HeldChunk = (u64, Arc<Vec<u8>>, Vec<[u8; 32]>);

/// Bytes of other relays' chunks a slot keeps for its next take-in; past them it
/// forgets them all and reads storage then (a cached document nobody asks for).
const OTHERS_MAX_BYTES: usize = 1 << 20;

impl Others {
    /// Nothing kept; what storage held at `covered` is in the slot.
    pub(super) fn covered(upto: u64) -> Self {
        Self {
            upto,
            chunks: Vec::new(),
        }
    }

    /// Takes in the window of the feed after `from` up to `head`, read whole:
    /// `mine` holds this document's commits in it by other relays (sequence, chunk,
    /// heads); `None` if one of them came without its chunk.
    pub(super) fn extend(&mut self, from: u64, head: u64, mine: Option<Vec<HeldChunk>>) {
        if self.upto < from {
            return;
        }
        let Some(mine) = mine else { return };
        for c in mine {
            if c.0 > self.upto {
                self.chunks.push(c);
            }
        }
        self.upto = self.upto.max(head);
        if self.chunks.iter().map(|c| c.1.len()).sum::<usize>() > OTHERS_MAX_BYTES {
            *self = Self::covered(0);
        }
    }
}

/// The parsed document and how it is stored.
pub struct SlotState {
    /// The document.
    pub doc: Automerge,
    pub(super) chunks: usize,
    /// The last whole-document saves, newest last ([`SAVES_KEPT`]): new devices and
    /// resumed transfers get the same bytes without saving again, and while a save's
    /// heads are a logged commit's, a device lacking most of the document up to that
    /// commit gets it whole (see `catchup`).
    pub(super) saves: std::collections::VecDeque<Saved>,
    /// Bundles made for catch-ups at the current heads, by what the device knew: every
    /// device of a team that was at the same heads gets the same bytes, built once.
    pub(super) deliveries: Vec<(Vec<ChangeHash>, Arc<Vec<u8>>)>,
    pub(super) deliveries_at: Vec<ChangeHash>,
    /// Recent commits of this document. Every commit with a sequence of at least
    /// `log_floor` is here, so "what changed after seq S" needs no walk of the history.
    pub(super) log: std::collections::VecDeque<LogEntry>,
    pub(super) log_floor: u64,
    /// Bytes of the chunks the log holds (at most [`LOG_CHUNK_BYTES`]).
    pub(super) log_chunk_bytes: usize,
    /// What the document's genesis made (for the authorship check), made once.
    pub(super) genesis: Option<Arc<authorship::Genesis>>,
    /// Bundles of aligned blocks of the log's commits, shared by catch-ups.
    pub(super) blocks: super::blocks::Blocks,
}

/// `DocSlot::included` of a document whose memory may hold what storage does not (a
/// reload failed after a failed commit): reloaded whole on its next use.
pub(super) const UNKNOWN: u64 = u64::MAX;

/// Commits kept in a document's in-memory log.
pub(super) const LOG_LEN: usize = 512;

/// Chunk bytes kept in a document's log; older entries keep only their hashes.
pub(super) const LOG_CHUNK_BYTES: usize = 2 * 1024 * 1024;

/// One commit in a document's log.
pub(super) struct LogEntry {
    /// Its feed sequence.
    pub seq: u64,
    /// Its number among the commits this slot logged (consecutive, from 0).
    pub n: u64,
    /// The changes it added.
    pub hashes: Vec<ChangeHash>,
    /// The chunk it stored (a bundle of those changes), while the log's byte budget
    /// allows.
    pub chunk: Option<Arc<Vec<u8>>>,
    /// The document's heads right after it: what a device holds once it has every
    /// commit up to this one.
    pub heads: Vec<ChangeHash>,
    /// When the chunk is the pushes' bytes as sent, one after another: where each
    /// push ends (in the chunk's bytes, in `hashes`). A device's catch-up ships the
    /// others' pushes of a commit that also holds its own as they are.
    pub parts: Vec<Part>,
}

/// A whole-document save and what it holds.
pub(super) struct Saved {
    /// The document's heads when it was saved.
    pub heads: Vec<ChangeHash>,
    /// The bytes of `save()`.
    pub bytes: Arc<Vec<u8>>,
    /// How many changes it holds.
    pub changes: usize,
}

/// A document of at least [`super::catchup::WHOLE_MIN_CHANGES`] changes is saved after
/// a commit once it holds this many times the changes of its last save (numerator,
/// denominator): a hot document has a recent save to send whole to a device that lacks
/// most of it, at a cost of about eleven saves of its final size over a day that grows
/// it from nothing (Automerge saves a ledger day of 4,800 changes in about 4 ms here).
/// Growth by a quarter sent fewer documents whole in the field day (seeds 1 and 2,
/// 2026-12-04); saving after every commit fewer still, with one save kept: the newest
/// was nearly always past the stable sequence.
pub(super) const SAVE_GROWTH: (usize, usize) = (11, 10);

/// Saves kept per document: the newest may be past the stable sequence (a commit in
/// flight), the one before it is then what a catch-up can send. Only the newest may be
/// larger than [`INLINE_MAX`] (an older save is sent only inline).
pub(super) const SAVES_KEPT: usize = 2;

/// One push's bytes inside a commit's chunk stored as sent: where they end in the
/// chunk, and where its changes end in the commit's `hashes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Part {
    pub bytes_end: usize,
    pub hashes_end: usize,
}

impl SlotState {
    pub(super) fn new(doc: Automerge, chunks: usize) -> Self {
        Self {
            doc,
            chunks,
            saves: std::collections::VecDeque::new(),
            deliveries: Vec::new(),
            deliveries_at: Vec::new(),
            log: std::collections::VecDeque::new(),
            log_floor: u64::MAX,
            log_chunk_bytes: 0,
            genesis: None,
            blocks: Default::default(),
        }
    }

    /// Logs a commit: its sequence, the changes it added and the chunk it stored. The
    /// log keeps [`LOG_LEN`] commits and [`LOG_CHUNK_BYTES`] of their chunks (the
    /// oldest chunks go first; their hashes stay).
    pub(super) fn remember(
        &mut self,
        seq: u64,
        hashes: Vec<ChangeHash>,
        chunk: Arc<Vec<u8>>,
        heads: Vec<ChangeHash>,
        parts: Vec<Part>,
    ) {
        self.log_chunk_bytes += chunk.len();
        let n = self.log.back().map_or(0, |e| e.n + 1);
        self.log.push_back(LogEntry {
            seq,
            n,
            hashes,
            chunk: Some(chunk),
            heads,
            parts,
        });
        if self.log.len() > LOG_LEN
            && let Some(oldest) = self.log.pop_front()
        {
            self.log_floor = oldest.seq + 1;
            self.log_chunk_bytes -= oldest.chunk.map_or(0, |c| c.len());
        }
        for e in self.log.iter_mut() {
            if self.log_chunk_bytes <= LOG_CHUNK_BYTES {
                break;
            }
            if let Some(c) = e.chunk.take() {
                self.log_chunk_bytes -= c.len();
            }
        }
        self.blocks.prune(self.log.front().map_or(n, |e| e.n));
    }

    /// `save()` of the document, reused while its heads have not moved.
    pub(super) fn saved(&mut self) -> Arc<Vec<u8>> {
        let heads = self.doc.get_heads();
        if let Some(s) = self.saves.back()
            && s.heads == heads
        {
            return s.bytes.clone();
        }
        let bytes = Arc::new(self.doc.save());
        self.saves.retain(|s| s.bytes.len() <= INLINE_MAX);
        while self.saves.len() + 1 > SAVES_KEPT {
            self.saves.pop_front();
        }
        self.saves.push_back(Saved {
            heads,
            bytes: bytes.clone(),
            changes: self.change_count(),
        });
        bytes
    }

    /// Whether the document has grown enough since its last save ([`SAVE_GROWTH`]) to
    /// be saved again after a commit. Never while Automerge holds changes queued for
    /// missing dependencies (`save()` would keep them).
    pub(super) fn save_due(&self) -> bool {
        let n = self.change_count();
        let (num, den) = SAVE_GROWTH;
        n >= super::catchup::WHOLE_MIN_CHANGES
            && self.saves.back().is_none_or(|s| n * den >= s.changes * num)
            && self.doc.get_missing_deps(&[]).is_empty()
    }

    /// How many changes the document holds (Automerge keeps the count).
    pub(super) fn change_count(&self) -> usize {
        self.doc.stats().num_changes as usize
    }
}

impl DocSlot {
    /// Locks the document (the Automerge-sync fallback path); persist with
    /// `Hub::persist_new` before unlocking.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, SlotState> {
        self.state.lock().await
    }
}

pub(super) fn load_state(
    id: &DocId,
    stored: Option<StoredDoc>,
) -> Result<(SlotState, usize), Error> {
    let Some(stored) = stored else {
        return Ok((SlotState::new(Automerge::new(), 0), 0));
    };
    let corrupt = |reason: String| Error::CorruptDocument {
        doc: id.to_string(),
        reason,
    };
    let mut bytes = 0;
    let mut doc = match &stored.snapshot {
        Some(s) => {
            bytes += s.len();
            Automerge::load(s).map_err(|e| corrupt(e.to_string()))?
        }
        None => Automerge::new(),
    };
    let mut changes = Vec::new();
    let mut chunk_bytes = 0;
    for c in &stored.chunks {
        chunk_bytes += c.len();
        changes.extend(bundle_changes(c).map_err(corrupt)?);
    }
    // All chunks in one call: loading is a batch apply, never one change at a time.
    doc.apply_changes(changes)
        .map_err(|e| corrupt(e.to_string()))?;
    Ok((
        SlotState::new(doc, stored.chunks.len()),
        bytes + chunk_bytes,
    ))
}

impl Hub {
    /// The cached slot of `id`, loading it from storage if needed (and again if another
    /// relay committed to it since).
    pub async fn slot(&self, id: &DocId) -> Result<Arc<DocSlot>, Error> {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let cached = self.slots.lock().expect("hub lock").get(id).cloned();
        if let Some(s) = cached {
            s.last_used.store(tick, Ordering::Relaxed);
            if s.stale.load(Ordering::Acquire) {
                let mut state = s.state.lock().await;
                self.refresh(id, &s, &mut state).await?;
            }
            return Ok(s);
        }
        // One load per document at a time: sessions asking for a document that is
        // being loaded wait for that load instead of parsing it again (the sessions of
        // a reconnect storm all ask at once).
        let gate = self
            .loading
            .lock()
            .expect("loading lock")
            .entry(id.clone())
            .or_default()
            .clone();
        let loading = gate.lock().await;
        let done = self.slots.lock().expect("hub lock").contains_key(id);
        let loaded = if done {
            None
        } else {
            Some(self.load_slot(id, tick).await)
        };
        drop(loading);
        {
            let mut gates = self.loading.lock().expect("loading lock");
            // The last one through takes the gate away.
            if gates.get(id).is_some_and(|g| Arc::ptr_eq(g, &gate)) && Arc::strong_count(&gate) == 2
            {
                gates.remove(id);
            }
        }
        match loaded {
            Some(slot) => slot,
            // Another session loaded it meanwhile: take it as cached.
            None => Box::pin(self.slot(id)).await,
        }
    }

    /// Loads `id` from storage into a new slot (see [`slot`](Self::slot)).
    async fn load_slot(&self, id: &DocId, tick: u64) -> Result<Arc<DocSlot>, Error> {
        let followed = self.followed.load(Ordering::Acquire);
        let key = id.clone();
        let stored = self.blocking(move |s| s.load(&key)).await?;
        let included = stored.as_ref().map_or(0, |s| s.last_seq);
        let (mut state, bytes) = load_state(id, stored)?;
        self.stats.loads.fetch_add(1, Ordering::Relaxed);
        // Commits to this document need its slot, so every later one will be logged
        // (shared feed: every later one of this relay; another relay's makes it stale).
        state.log_floor = if self.shared {
            included + 1
        } else {
            self.seq.lock().expect("seq lock").next()
        };
        let slot = {
            let mut slots = self.slots.lock().expect("hub lock");
            slots
                .entry(id.clone())
                .or_insert_with(|| {
                    Arc::new(DocSlot {
                        state: AsyncMutex::new(state),
                        pending: Mutex::new(Vec::new()),
                        last_used: AtomicU64::new(tick),
                        stored_bytes: AtomicUsize::new(bytes),
                        included: AtomicU64::new(included),
                        stale: std::sync::atomic::AtomicBool::new(false),
                        others: Mutex::new(Others::covered(followed)),
                    })
                })
                .clone()
        };
        // The feed follower may have passed another relay's commit to this document
        // while it loaded, before the slot was in the cache to be marked: reload on
        // next use to be sure.
        if self.shared && self.followed.load(Ordering::Acquire) != followed {
            slot.stale.store(true, Ordering::Release);
        }
        self.evict();
        Ok(slot)
    }

    /// Reloads the document if another relay committed to it since it was loaded.
    pub(super) async fn refresh(
        &self,
        id: &DocId,
        slot: &DocSlot,
        state: &mut SlotState,
    ) -> Result<(), Error> {
        if slot.stale.swap(false, Ordering::AcqRel)
            && let Err(e) = self.take_in_others(id, slot, state).await
        {
            slot.stale.store(true, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }

    /// Applies the chunks other relays committed to the document since the slot's last
    /// one, and logs them as commits (so catch-ups can ship them as they are): those
    /// the follower read with the feed when it has them all ([`Others`]), else read
    /// from storage; reloads the whole document when that cannot be done (another
    /// relay compacted past it, or the chunks do not apply).
    async fn take_in_others(
        &self,
        id: &DocId,
        slot: &DocSlot,
        state: &mut SlotState,
    ) -> Result<(), Error> {
        let after = slot.included.load(Ordering::Acquire);
        if after == UNKNOWN {
            return self.reload(id, slot, state).await;
        }
        let followed = self.followed.load(Ordering::Acquire);
        let ahead = {
            let mut others = slot.others.lock().expect("others lock");
            (others.upto >= followed).then(|| {
                let mut taken = std::mem::take(&mut others.chunks);
                taken.retain(|(seq, _, _)| *seq > after);
                taken
            })
        };
        let from_feed = ahead.is_some();
        let chunks = match ahead {
            Some(chunks) => chunks,
            None => {
                let key = id.clone();
                let Some(read) = self.blocking(move |s| s.chunks_after(&key, after)).await? else {
                    return self.reload(id, slot, state).await;
                };
                read.into_iter()
                    .map(|(seq, bytes, heads)| (seq, Arc::new(bytes), heads))
                    .collect()
            }
        };
        if chunks.is_empty() {
            if !from_feed {
                let mut others = slot.others.lock().expect("others lock");
                others.upto = others.upto.max(followed);
            }
            return Ok(());
        }
        let mut changes = Vec::new();
        let mut entries = Vec::with_capacity(chunks.len());
        for (seq, bytes, heads) in chunks {
            let Ok(decoded) = bundle_changes(&bytes) else {
                return self.reload(id, slot, state).await;
            };
            let hashes: Vec<ChangeHash> = decoded.iter().map(|c| c.hash()).collect();
            let heads: Vec<ChangeHash> = heads.into_iter().map(ChangeHash).collect();
            entries.push((seq, hashes, bytes, heads));
            changes.extend(decoded);
        }
        if super::guard::guarded_apply(&mut state.doc, changes).is_err()
            || !state.doc.get_missing_deps(&[]).is_empty()
        {
            return self.reload(id, slot, state).await;
        }
        self.stats
            .taken_in
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        if from_feed {
            self.stats
                .taken_ahead
                .fetch_add(entries.len() as u64, Ordering::Relaxed);
        }
        for (seq, hashes, bytes, heads) in entries {
            slot.stored_bytes.fetch_add(bytes.len(), Ordering::Relaxed);
            slot.included.store(seq, Ordering::Release);
            state.chunks += 1;
            state.remember(seq, hashes, bytes, heads, Vec::new());
        }
        let included = slot.included.load(Ordering::Acquire);
        let mut others = slot.others.lock().expect("others lock");
        others.chunks.retain(|(seq, _, _)| *seq > included);
        if !from_feed {
            // Storage held every commit up to what was followed before the read.
            others.upto = others.upto.max(followed);
        }
        Ok(())
    }

    /// Drops idle documents, least recently used first, until the cache fits its budget.
    /// Idle slots of documents that do not exist (a read of a missing document) are
    /// dropped at once: asking about a document creates nothing.
    pub(super) fn evict(&self) {
        let mut slots = self.slots.lock().expect("hub lock");
        slots.retain(|_, slot| {
            let absent = slot.stored_bytes.load(Ordering::Relaxed) == 0
                && Arc::strong_count(slot) == 1
                && slot.pending.lock().expect("pending lock").is_empty()
                && slot
                    .state
                    .try_lock()
                    .is_ok_and(|s| s.doc.get_heads().is_empty());
            !absent
        });
        let mut total: usize = slots
            .values()
            .map(|s| s.stored_bytes.load(Ordering::Relaxed) * MEMORY_FACTOR)
            .sum();
        if total <= self.budget {
            return;
        }
        let mut by_age: Vec<(u64, DocId)> = slots
            .iter()
            .map(|(k, s)| (s.last_used.load(Ordering::Relaxed), k.clone()))
            .collect();
        by_age.sort();
        for (_, id) in by_age {
            if total <= self.budget {
                break;
            }
            let Some(slot) = slots.get(&id) else { continue };
            // In use (a handle outside the cache, a commit, queued pushes): keep.
            let idle = Arc::strong_count(slot) == 1
                && slot.state.try_lock().is_ok()
                && slot.pending.lock().expect("pending lock").is_empty();
            if idle {
                total -= slot.stored_bytes.load(Ordering::Relaxed) * MEMORY_FACTOR;
                slots.remove(&id);
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Documents currently parsed in memory.
    pub fn cached(&self) -> usize {
        self.slots.lock().expect("hub lock").len()
    }

    /// Lets go of a slot and trims the cache (a document can only be evicted once
    /// nobody holds it).
    pub fn release(&self, slot: Arc<DocSlot>) {
        drop(slot);
        self.evict();
    }

    /// Whether `doc` holds anything (the cache first, then storage). Creates nothing.
    pub async fn exists(&self, id: &DocId) -> Result<bool, Error> {
        let cached = self.slots.lock().expect("hub lock").get(id).cloned();
        if let Some(slot) = cached {
            let held = slot.stored_bytes.load(Ordering::Relaxed) > 0
                || !slot.state.lock().await.doc.get_heads().is_empty();
            self.release(slot);
            if held {
                return Ok(true);
            }
        }
        let key = id.clone();
        self.blocking(move |s| s.exists(&key)).await
    }
}

#[cfg(test)]
mod others_tests {
    use super::*;

    fn held(seq: u64) -> HeldChunk {
        (seq, Arc::new(vec![seq as u8; 4]), vec![[seq as u8; 32]])
    }

    /// Windows read whole, one after the other, keep every other relay's commit; a
    /// window read without chunks, or one that does not start where the last ended,
    /// leaves `upto` behind (the take-in reads storage then).
    #[test]
    fn only_windows_read_whole_and_in_turn_move_what_is_held() {
        let mut o = Others::covered(10);
        o.extend(10, 12, Some(vec![held(12)]));
        o.extend(12, 13, Some(Vec::new()));
        assert_eq!((o.upto, o.chunks.len()), (13, 1));
        o.extend(13, 15, None);
        assert_eq!(o.upto, 13, "a commit came without its chunk");
        o.extend(15, 16, Some(vec![held(16)]));
        assert_eq!((o.upto, o.chunks.len()), (13, 1), "a gap before the window");
        // A window that overlaps what is held: only what lies after it is new.
        let mut o = Others::covered(10);
        o.extend(8, 12, Some(vec![held(9), held(11)]));
        assert_eq!(o.upto, 12);
        assert_eq!(o.chunks.iter().map(|c| c.0).collect::<Vec<_>>(), vec![11]);
    }

    #[test]
    fn a_slot_nobody_reads_forgets_what_it_held_past_its_budget() {
        let mut o = Others::covered(0);
        let big = (1, Arc::new(vec![0u8; OTHERS_MAX_BYTES + 1]), Vec::new());
        o.extend(0, 1, Some(vec![big]));
        assert_eq!((o.upto, o.chunks.len()), (0, 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::catchup::WHOLE_MIN_CHANGES;
    use automerge::ROOT;
    use automerge::transaction::Transactable;

    /// `n` changes, each a new key holding `value`.
    fn write(doc: &mut Automerge, n: usize, value: &str) {
        for _ in 0..n {
            let key = format!("k{}", doc.stats().num_changes);
            let mut tx = doc.transaction();
            tx.put(ROOT, key, value).unwrap();
            tx.commit();
        }
    }

    /// A document that grows is saved again after a commit once it holds
    /// `WHOLE_MIN_CHANGES` and has grown by `SAVE_GROWTH` since its last save; the two
    /// newest saves are kept, an older one only while it could go inline.
    #[test]
    fn saves_follow_growth_and_keep_the_two_newest() {
        let mut state = SlotState::new(Automerge::new(), 0);
        write(&mut state.doc, WHOLE_MIN_CHANGES - 1, "x");
        assert!(!state.save_due(), "too small to be sent whole");
        write(&mut state.doc, 1, "x");
        assert!(state.save_due());
        state.saved();
        assert!(!state.save_due(), "saved at these heads");
        let (num, den) = SAVE_GROWTH;
        let next = (WHOLE_MIN_CHANGES * num).div_ceil(den);
        write(&mut state.doc, next - WHOLE_MIN_CHANGES - 1, "x");
        assert!(!state.save_due(), "grown too little");
        write(&mut state.doc, 1, "x");
        assert!(state.save_due());
        state.saved();
        write(&mut state.doc, 100, "x");
        let newest = state.saved();
        let counts: Vec<usize> = state.saves.iter().map(|s| s.changes).collect();
        assert_eq!(counts, [next, next + 100], "the two newest, oldest first");
        assert_eq!(state.saves.back().map(|s| s.bytes.clone()), Some(newest));
        assert_eq!(state.saves.back().unwrap().heads, state.doc.get_heads());
        // A save too large to go inline is not kept behind a newer one.
        let mut noise = String::new();
        let mut x: u64 = 1;
        // Hex digits: deflate halves them at best.
        while noise.len() <= 3 * INLINE_MAX {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            noise.push_str(&format!("{:016x}", x));
        }
        write(&mut state.doc, 1, &noise);
        assert!(state.saved().len() > INLINE_MAX);
        write(&mut state.doc, 1, "x");
        state.saved();
        let counts: Vec<usize> = state.saves.iter().map(|s| s.changes).collect();
        assert_eq!(counts, [next + 100, next + 102], "the large save went");
    }
}
