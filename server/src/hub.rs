//! The relay's documents and the merge path: the performance core.
//!
//! - **Cache.** Parsed documents live in a cache bounded by a memory budget (an estimate:
//!   stored bytes × [`MEMORY_FACTOR`]). Cold documents stay compressed on disk. Only idle
//!   documents are evicted, and a document is only ever changed inside a commit that
//!   persists before it lets go, so eviction never loses unpersisted state.
//! - **Group commit.** Pushes for one document queue up; whoever takes the document's lock
//!   drains the queue, checks dependencies, applies *all* the changes in one
//!   `apply_changes` call, appends one chunk, and waits for one flush, then answers every
//!   sender. While a commit waits for the disk, the next batch gathers.
//! - **Coalesced flush.** Flush requests from all documents are merged: one `fsync`
//!   covers every commit written before it.
//! - **Change feed.** Each commit takes the next sequence number. The *stable* sequence is
//!   the highest one below which every commit is durable; devices are only ever told
//!   about stable sequences, so a cursor never skips a commit still in flight.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use automerge::{ActorId, Automerge, Change, ChangeHash, ReadDoc};
use redline_proto::genesis::{GENESIS_ACTOR, genesis_hash};
use redline_proto::message::{Coverage, Payload};
use redline_proto::{DeviceId, DocId};
use tokio::sync::{Mutex as AsyncMutex, mpsc, oneshot, watch};
use tracing::{debug, warn};

use crate::Error;
use crate::authorship::{self, Author};
use crate::storage::{RelayStorage, StoredDoc};

/// In-memory size of a parsed document relative to its stored (compressed) size: an
/// estimate for the cache budget.
pub const MEMORY_FACTOR: usize = 8;

/// A catch-up window: the device holds every commit up to `after`; send those up to
/// `upto`, except the changes in `own` (the device pushed them).
#[derive(Clone, Copy)]
pub struct Window<'a> {
    /// Feed sequence the device is caught up to.
    pub after: u64,
    /// Stable sequence to catch up to.
    pub upto: u64,
    /// Changes the device pushed itself.
    pub own: &'a HashSet<ChangeHash>,
}

/// Chunks after which a document is compacted into a new snapshot.
const COMPACT_AFTER_CHUNKS: usize = 64;

/// A document in the cache.
pub struct DocSlot {
    state: AsyncMutex<SlotState>,
    pending: Mutex<Vec<PendingPush>>,
    last_used: AtomicU64,
    stored_bytes: AtomicUsize,
}

/// The parsed document and how it is stored.
pub struct SlotState {
    /// The document.
    pub doc: Automerge,
    chunks: usize,
    /// The last whole-document save and the heads it was made at: new devices and
    /// resumed transfers get the same bytes without saving again.
    saved: Option<(Vec<ChangeHash>, Arc<Vec<u8>>)>,
    /// Bundles made for catch-ups at the current heads, by what the device knew: every
    /// device of a team that was at the same heads gets the same bytes, built once.
    deliveries: Vec<(Vec<ChangeHash>, Arc<Vec<u8>>)>,
    deliveries_at: Vec<ChangeHash>,
    /// Recent commits of this document: feed sequence → the hashes it added. Every commit
    /// with a sequence of at least `log_floor` is here, so "what changed after seq S" needs
    /// no walk of the history.
    log: std::collections::VecDeque<(u64, Vec<ChangeHash>)>,
    log_floor: u64,
    /// What the document's genesis made (for the authorship check), made once.
    genesis: Option<Arc<authorship::Genesis>>,
}

/// Commits kept in a document's in-memory log.
const LOG_LEN: usize = 512;

impl SlotState {
    fn new(doc: Automerge, chunks: usize) -> Self {
        Self {
            doc,
            chunks,
            saved: None,
            deliveries: Vec::new(),
            deliveries_at: Vec::new(),
            log: std::collections::VecDeque::new(),
            log_floor: u64::MAX,
            genesis: None,
        }
    }

    /// `save()` of the document, reused while its heads have not moved.
    fn saved(&mut self) -> Arc<Vec<u8>> {
        let heads = self.doc.get_heads();
        match &self.saved {
            Some((h, bytes)) if *h == heads => bytes.clone(),
            _ => {
                let bytes = Arc::new(self.doc.save());
                self.saved = Some((heads, bytes.clone()));
                bytes
            }
        }
    }
}

impl DocSlot {
    /// Locks the document (the Automerge-sync fallback path); persist with
    /// [`Hub::persist_new`] before unlocking.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, SlotState> {
        self.state.lock().await
    }
}

struct PendingPush {
    author: Author,
    changes: Vec<Change>,
    reply: oneshot::Sender<Result<Committed, Error>>,
}

/// What a commit did for one sender.
#[derive(Clone, Debug)]
pub struct Committed {
    /// The document's heads after the commit (durable).
    pub heads: Vec<ChangeHash>,
    /// How many of the sender's changes were new to the relay.
    pub applied: u32,
}

/// Counters for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Commits written.
    pub commits: AtomicU64,
    /// Pushes merged into those commits.
    pub pushes: AtomicU64,
    /// Changes applied.
    pub changes: AtomicU64,
    /// Flushes performed.
    pub flushes: AtomicU64,
    /// Largest number of pushes in one commit.
    pub max_batch: AtomicU64,
    /// Documents evicted from the cache.
    pub evictions: AtomicU64,
}

struct SeqState {
    next: u64,
    in_flight: BTreeSet<u64>,
}

/// The relay's documents.
pub struct Hub {
    storage: Arc<dyn RelayStorage>,
    slots: Mutex<HashMap<DocId, Arc<DocSlot>>>,
    budget: usize,
    /// Largest stored size of one document; pushes beyond it are refused.
    max_document_bytes: AtomicU64,
    tick: AtomicU64,
    seq: Mutex<SeqState>,
    stable: watch::Sender<u64>,
    flusher: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
    /// Actor → the device it is bound to (a cache of the storage's table).
    actors: Mutex<HashMap<ActorId, DeviceId>>,
    /// Documents each device created today: (day since the epoch, count). In memory: a
    /// restart forgives the day's count.
    creations: Mutex<HashMap<DeviceId, (i64, u32)>>,
    /// Makes "check a device's staged bytes, then store a piece" one step.
    pub(crate) staging: Mutex<()>,
    /// Makes "check a device's held bytes, then hold a push" one step.
    pub(crate) holding: AsyncMutex<()>,
    /// Counters.
    pub stats: HubStats,
    /// Prometheus metrics (the connection layer records into them too).
    pub metrics: crate::metrics::Metrics,
    /// Per-device health.
    pub devices: crate::health::Registry,
}

/// Whether `doc` holds change `h` (metadata lookup, no copy of the change).
fn has(doc: &Automerge, h: &ChangeHash) -> bool {
    doc.get_change_meta_by_hash(h).is_some()
}

fn hash_set(heads: &[ChangeHash]) -> HashSet<ChangeHash> {
    heads.iter().copied().collect()
}

/// Decodes device bytes (a bundle, or change chunks) into changes, through the guard
/// every path shares ([`crate::intake`]).
pub fn bundle_changes(bytes: &[u8]) -> Result<Vec<Change>, String> {
    crate::intake::device_changes(bytes)
}

/// Bundles `changes` of `doc` (hashes must be in the document).
pub fn make_bundle(
    doc: &Automerge,
    hashes: impl IntoIterator<Item = ChangeHash>,
) -> Result<Vec<u8>, Error> {
    doc.bundle(hashes)
        .map(|b| b.bytes().to_vec())
        .map_err(|e| Error::Storage(format!("cannot bundle changes: {e}")))
}

impl Hub {
    /// A hub over `storage`, keeping parsed documents within about `budget` bytes.
    pub fn new(storage: Arc<dyn RelayStorage>, budget: usize) -> Result<Arc<Self>, Error> {
        let last = storage.last_seq()?;
        let (stable, _) = watch::channel(last);
        let (flusher, mut requests) =
            mpsc::unbounded_channel::<oneshot::Sender<Result<(), String>>>();
        let devices = crate::health::Registry::load(storage.clone())?;
        let hub = Arc::new(Self {
            storage,
            slots: Mutex::new(HashMap::new()),
            budget,
            max_document_bytes: AtomicU64::new(u64::MAX),
            tick: AtomicU64::new(0),
            seq: Mutex::new(SeqState {
                next: last + 1,
                in_flight: BTreeSet::new(),
            }),
            stable,
            flusher,
            stats: HubStats::default(),
            metrics: crate::metrics::Metrics::default(),
            devices,
            actors: Mutex::new(HashMap::new()),
            creations: Mutex::new(HashMap::new()),
            staging: Mutex::new(()),
            holding: AsyncMutex::new(()),
        });
        // The flusher holds the hub weakly: when the relay shuts down, storage is released.
        let weak = Arc::downgrade(&hub);
        tokio::spawn(async move {
            while let Some(first) = requests.recv().await {
                let mut waiters = vec![first];
                while let Ok(w) = requests.try_recv() {
                    waiters.push(w);
                }
                let r = match weak.upgrade() {
                    Some(hub) => {
                        hub.stats.flushes.fetch_add(1, Ordering::Relaxed);
                        let s = hub.storage.clone();
                        drop(hub);
                        tokio::task::spawn_blocking(move || s.flush())
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|r| r.map_err(|e| e.to_string()))
                    }
                    None => Err("relay shut down".to_string()),
                };
                for w in waiters {
                    let _ = w.send(r.clone());
                }
            }
        });
        Ok(hub)
    }

    /// Refuses pushes that would grow a document's stored form beyond `bytes`.
    pub fn set_max_document_bytes(&self, bytes: u64) {
        self.max_document_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The database epoch.
    pub fn epoch(&self) -> u64 {
        self.storage.epoch()
    }

    /// Watches the stable feed sequence.
    pub fn stable(&self) -> watch::Receiver<u64> {
        self.stable.subscribe()
    }

    /// Makes every write so far durable (coalesced with other callers).
    pub async fn flush(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.flusher
            .send(tx)
            .map_err(|_| Error::Storage("flusher stopped".into()))?;
        rx.await
            .map_err(|_| Error::Storage("flusher stopped".into()))?
            .map_err(Error::Storage)
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn RelayStorage) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error> {
        let s = self.storage.clone();
        tokio::task::spawn_blocking(move || f(s.as_ref()))
            .await
            .map_err(|e| Error::Storage(format!("storage task failed: {e}")))?
    }

    /// The cached slot of `id`, loading it from storage if needed.
    pub async fn slot(&self, id: &DocId) -> Result<Arc<DocSlot>, Error> {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = self.slots.lock().expect("hub lock").get(id) {
            s.last_used.store(tick, Ordering::Relaxed);
            return Ok(s.clone());
        }
        let key = id.clone();
        let stored = self.blocking(move |s| s.load(&key)).await?;
        let (mut state, bytes) = load_state(id, stored)?;
        // Commits to this document need its slot, so every later one will be logged.
        state.log_floor = self.seq.lock().expect("seq lock").next;
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
                    })
                })
                .clone()
        };
        self.evict();
        Ok(slot)
    }

    /// Drops idle documents, least recently used first, until the cache fits its budget.
    /// Idle slots of documents that do not exist (a read of a missing document) are
    /// dropped at once: asking about a document creates nothing.
    fn evict(&self) {
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
        let slot = self.slot(id).await?;
        let (reply, rx) = oneshot::channel();
        slot.pending
            .lock()
            .expect("pending lock")
            .push(PendingPush {
                author: author.clone(),
                changes,
                reply,
            });
        let (hub, id) = (Arc::clone(self), id.clone());
        tokio::spawn(async move {
            {
                let mut state = slot.state.lock().await;
                let batch = std::mem::take(&mut *slot.pending.lock().expect("pending lock"));
                if !batch.is_empty() {
                    hub.commit_batch(&id, &slot, &mut state, batch).await;
                }
            }
            hub.release(slot);
        });
        rx.await
            .map_err(|_| Error::Storage("commit dropped".into()))?
    }

    /// Lets go of a slot and trims the cache (a document can only be evicted once
    /// nobody holds it).
    pub fn release(&self, slot: Arc<DocSlot>) {
        drop(slot);
        self.evict();
    }

    async fn commit_batch(
        &self,
        id: &DocId,
        slot: &DocSlot,
        state: &mut SlotState,
        batch: Vec<PendingPush>,
    ) {
        // What the document lacks, looked up once: the actor check, the size check, the
        // counts and the commit log all ask it of the same changes.
        let new_to_doc: HashSet<ChangeHash> = batch
            .iter()
            .flat_map(|p| p.changes.iter().map(|c| c.hash()))
            .filter(|h| !has(&state.doc, h))
            .collect();
        let is_new = |c: &Change| new_to_doc.contains(&c.hash());
        // Who may write what: every change new to the relay must be by an actor of the
        // pushing device (or be the document's genesis), and name nobody else.
        let genesis = state
            .genesis
            .get_or_insert_with(|| Arc::new(authorship::Genesis::of(id)))
            .clone();
        let mut ok = Vec::new();
        for p in batch {
            let mut new = p.changes.iter().filter(|c| is_new(c)).peekable();
            if new.peek().is_none() {
                ok.push(p);
                continue;
            }
            let verdict = self
                .check_actors(id, &p.author.device, new.clone())
                .and_then(|()| self.check_authorship(&p.author, new, &genesis));
            match verdict {
                Ok(()) => ok.push(p),
                Err(e) => {
                    let _ = p.reply.send(Err(e));
                }
            }
        }
        // Size: what the batch adds, estimated by the changes' raw bytes (the stored chunk
        // is smaller), must keep the document within its limit.
        let limit = self.max_document_bytes.load(Ordering::Relaxed);
        let mut size = slot.stored_bytes.load(Ordering::Relaxed) as u64;
        let (ok, oversized): (Vec<PendingPush>, Vec<PendingPush>) = ok.into_iter().partition(|p| {
            let adds: u64 = p
                .changes
                .iter()
                .filter(|c| is_new(c))
                .map(|c| c.raw_bytes().len() as u64)
                .sum();
            size = size.saturating_add(adds);
            size <= limit
        });
        for p in oversized {
            let _ = p.reply.send(Err(Error::TooLarge(format!(
                "{id} would grow beyond the relay's limit of {limit} bytes per document"
            ))));
        }
        // Dependencies: a push is accepted only if every dependency is in the document or
        // in a push still accepted. Otherwise Automerge would queue the changes inside the
        // document (heads unmoved, nothing honestly acknowledged, and a queued change
        // would be released unchecked by whoever later pushes its dependency). Refusing
        // one push can strand another that built on it: repeat until nothing changes.
        let mut ok = ok;
        loop {
            let available: HashSet<ChangeHash> = ok
                .iter()
                .flat_map(|p| p.changes.iter().map(|c| c.hash()))
                .collect();
            let (ready, missing): (Vec<PendingPush>, Vec<PendingPush>) =
                ok.into_iter().partition(|p| {
                    p.changes
                        .iter()
                        .flat_map(|c| c.deps().iter())
                        .all(|d| available.contains(d) || has(&state.doc, d))
                });
            ok = ready;
            if missing.is_empty() {
                break;
            }
            for p in missing {
                let _ = p
                    .reply
                    .send(Err(Error::MissingDependencies(id.to_string())));
            }
        }
        if ok.is_empty() {
            return;
        }
        let before = state.doc.get_heads();
        let news: Vec<u32> = ok
            .iter()
            .map(|p| p.changes.iter().filter(|c| is_new(c)).count() as u32)
            .collect();
        let all: Vec<Change> = ok.iter().flat_map(|p| p.changes.iter().cloned()).collect();
        // What the batch adds, known without walking the history afterwards.
        let mut seen = HashSet::new();
        let fresh: Vec<ChangeHash> = all
            .iter()
            .map(|c| c.hash())
            .filter(|h| new_to_doc.contains(h) && seen.insert(*h))
            .collect();
        let n_pushes = ok.len() as u64;
        // One call for the whole batch. If Automerge refuses it (or panics on hostile
        // data), the document may be half-changed: reload it from disk and retry each push
        // alone, so only the bad sender is refused.
        let mut accepted: Vec<(PendingPush, u32)> = Vec::new();
        if guarded_apply(&mut state.doc, all).is_ok() {
            accepted = ok.into_iter().zip(news).collect();
        } else {
            if let Err(e) = self.reload(id, slot, state).await {
                for p in ok {
                    let _ = p.reply.send(Err(Error::Storage(e.to_string())));
                }
                return;
            }
            for (p, n) in ok.into_iter().zip(news) {
                match guarded_apply(&mut state.doc, p.changes.clone()) {
                    Ok(()) => accepted.push((p, n)),
                    Err(e) => {
                        let _ = p.reply.send(Err(Error::BadChanges(e)));
                        if let Err(e) = self.reload(id, slot, state).await {
                            for (p, _) in accepted {
                                let _ = p.reply.send(Err(Error::Storage(e.to_string())));
                            }
                            return;
                        }
                        // What the reload dropped must be applied again.
                        let again: Vec<Change> = accepted
                            .iter()
                            .flat_map(|(p, _)| p.changes.clone())
                            .collect();
                        if guarded_apply(&mut state.doc, again).is_err() {
                            for (p, _) in accepted {
                                let _ = p.reply.send(Err(Error::BadChanges(
                                    "batch could not be applied".into(),
                                )));
                            }
                            let _ = self.reload(id, slot, state).await;
                            return;
                        }
                    }
                }
            }
        }
        // Nothing may stay queued inside the document (see the dependency check above).
        if !state.doc.get_missing_deps(&[]).is_empty() {
            warn!(doc = %id, "a batch left changes queued in the document; refused, reloading");
            for (p, _) in accepted {
                let _ = p
                    .reply
                    .send(Err(Error::MissingDependencies(id.to_string())));
            }
            let _ = self.reload(id, slot, state).await;
            return;
        }
        // Changes of refused pushes never entered the document: keep only what did.
        let fresh: Vec<ChangeHash> = fresh.into_iter().filter(|h| has(&state.doc, h)).collect();
        let result = self
            .persist_new(id, slot, state, &before, Some(fresh))
            .await;
        let heads = state.doc.get_heads();
        self.stats.pushes.fetch_add(n_pushes, Ordering::Relaxed);
        self.stats.max_batch.fetch_max(n_pushes, Ordering::Relaxed);
        self.metrics.batch_size.observe(n_pushes as f64);
        for (p, applied) in accepted {
            let r = match &result {
                Ok(()) => Ok(Committed {
                    heads: heads.clone(),
                    applied,
                }),
                Err(e) => Err(Error::Storage(e.to_string())),
            };
            let _ = p.reply.send(r);
        }
    }

    /// Writes what the document gained since `before` as one chunk with the next feed
    /// sequence, waits for the flush, then advances the stable sequence. On a storage
    /// failure the document is reloaded from disk, so memory never runs ahead of it.
    pub(crate) async fn persist_new(
        &self,
        id: &DocId,
        slot: &DocSlot,
        state: &mut SlotState,
        before: &[ChangeHash],
        new: Option<Vec<ChangeHash>>,
    ) -> Result<(), Error> {
        let heads = state.doc.get_heads();
        if heads == before {
            return Ok(());
        }
        let new: Vec<ChangeHash> = match new {
            Some(n) => n,
            None => state
                .doc
                .get_changes(before)
                .iter()
                .map(|c| c.hash())
                .collect(),
        };
        self.stats
            .changes
            .fetch_add(new.len() as u64, Ordering::Relaxed);
        let new_hashes = new.clone();
        let chunk = make_bundle(&state.doc, new)?;
        let seq = {
            let mut s = self.seq.lock().expect("seq lock");
            let seq = s.next;
            s.next += 1;
            s.in_flight.insert(seq);
            seq
        };
        let wire: Vec<[u8; 32]> = heads.iter().map(|h| h.0).collect();
        let key = id.clone();
        let chunk_len = chunk.len();
        let written = self
            .blocking(move |s| s.commit(&key, seq, &chunk, &wire))
            .await;
        let result = match written {
            Ok(()) => self.flush().await,
            Err(e) => Err(e),
        };
        self.finish_seq(seq);
        match result {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                state.log.push_back((seq, new_hashes));
                if state.log.len() > LOG_LEN
                    && let Some((oldest, _)) = state.log.pop_front()
                {
                    state.log_floor = oldest + 1;
                }
                state.chunks += 1;
                slot.stored_bytes.fetch_add(chunk_len, Ordering::Relaxed);
                if state.chunks >= COMPACT_AFTER_CHUNKS {
                    self.compact(id, slot, state).await;
                }
                Ok(())
            }
            Err(e) => {
                warn!(doc = %id, "commit failed, reloading from disk: {e}");
                let _ = self.reload(id, slot, state).await;
                Err(e)
            }
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
        let (mut fresh, bytes) = self
            .blocking(move |s| s.load(&key))
            .await
            .and_then(|d| load_state(id, d))?;
        fresh.log_floor = self.seq.lock().expect("seq lock").next;
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

    fn finish_seq(&self, seq: u64) {
        let stable = {
            let mut s = self.seq.lock().expect("seq lock");
            s.in_flight.remove(&seq);
            match s.in_flight.first() {
                Some(lowest) => lowest - 1,
                None => s.next - 1,
            }
        };
        self.stable.send_if_modified(|v| {
            if stable > *v {
                *v = stable;
                true
            } else {
                false
            }
        });
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
        let done = self
            .blocking(move |s| s.compact(&key, snapshot.as_slice()))
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

    /// What a device that knows `have` of `doc` lacks, or `None` if nothing.
    pub async fn missing(
        &self,
        id: &DocId,
        have: &[ChangeHash],
        window: Option<Window<'_>>,
    ) -> Result<Option<(Payload, Vec<ChangeHash>)>, Error> {
        let slot = self.slot(id).await?;
        let result = Self::missing_in(&slot, have, window).await;
        self.release(slot);
        result
    }

    async fn missing_in(
        slot: &DocSlot,
        have: &[ChangeHash],
        window: Option<Window<'_>>,
    ) -> Result<Option<(Payload, Vec<ChangeHash>)>, Error> {
        let mut state = slot.state.lock().await;
        let heads = state.doc.get_heads();
        if heads.is_empty() {
            return Ok(None);
        }
        // From the commit log: what was committed in the window, less the device's own.
        if let Some(w) = window
            && w.after.saturating_add(1) >= state.log_floor
        {
            let mut seen = HashSet::new();
            let hashes: Vec<ChangeHash> = state
                .log
                .iter()
                .filter(|(seq, _)| *seq > w.after && *seq <= w.upto)
                .flat_map(|(_, h)| h.iter())
                .filter(|h| !w.own.contains(h) && seen.insert(**h))
                .copied()
                .collect();
            if hashes.is_empty() {
                return Ok(None);
            }
            let bundle = make_bundle(&state.doc, hashes)?;
            return Ok(Some((Payload::Bundle(bundle), heads)));
        }
        let have_set = hash_set(have);
        if heads.iter().all(|h| have_set.contains(h)) {
            return Ok(None);
        }
        if have.is_empty() {
            return Ok(Some((Payload::Document(state.saved().to_vec()), heads)));
        }
        let mut known: Vec<ChangeHash> = have
            .iter()
            .filter(|h| has(&state.doc, h))
            .copied()
            .collect();
        known.sort();
        known.dedup();
        if state.deliveries_at != heads {
            state.deliveries.clear();
            state.deliveries_at = heads.clone();
        }
        if let Some((_, bytes)) = state.deliveries.iter().find(|(k, _)| *k == known) {
            return Ok(Some((Payload::Bundle(bytes.to_vec()), heads)));
        }
        let changes = state.doc.get_changes(&known);
        if changes.is_empty() {
            return Ok(None);
        }
        let bundle = make_bundle(&state.doc, changes.iter().map(|c| c.hash()))?;
        if state.deliveries.len() >= 16 {
            state.deliveries.remove(0);
        }
        state.deliveries.push((known, Arc::new(bundle.clone())));
        Ok(Some((Payload::Bundle(bundle), heads)))
    }

    /// Documents in `scope` changed after `after` up to `upto`, and documents in `scope`
    /// that the old subscription did not cover (all stored ones, if `old` is `None`).
    pub async fn changed_in_scope(
        &self,
        scope: &Coverage,
        after: u64,
        upto: u64,
        old: Option<&Coverage>,
    ) -> Result<Vec<DocId>, Error> {
        let mut out: Vec<DocId> = Vec::new();
        let mut seen = HashSet::new();
        let newly = match old {
            Some(old) if old == scope => Vec::new(),
            Some(old) => {
                let (scope, old) = (scope.clone(), old.clone());
                self.blocking(move |s| {
                    Ok(s.list()?
                        .into_iter()
                        .filter(|d| scope.covers(d) && !old.covers(d))
                        .collect())
                })
                .await?
            }
            None => {
                let scope = scope.clone();
                self.blocking(move |s| {
                    Ok(s.list()?.into_iter().filter(|d| scope.covers(d)).collect())
                })
                .await?
            }
        };
        for d in newly {
            if seen.insert(d.clone()) {
                out.push(d);
            }
        }
        if old.is_some() {
            let entries = self.blocking(move |s| s.feed(after, upto)).await?;
            for (_, d) in entries {
                if scope.covers(&d) && seen.insert(d.clone()) {
                    out.push(d);
                }
            }
        }
        Ok(out)
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

    /// Counts a document created by `device` on `day` (days since the epoch); `false`
    /// (and not counted) once `limit` documents were created that day.
    pub fn count_creation(&self, device: &DeviceId, day: i64, limit: u32) -> bool {
        let mut all = self.creations.lock().expect("creations lock");
        let entry = all.entry(device.clone()).or_insert((day, 0));
        if entry.0 != day {
            *entry = (day, 0);
        }
        if entry.1 >= limit {
            return false;
        }
        entry.1 += 1;
        true
    }

    /// Dependencies of `changes` that neither `doc` nor `changes` hold.
    pub async fn missing_dependencies(
        &self,
        id: &DocId,
        changes: &[Change],
    ) -> Result<Vec<ChangeHash>, Error> {
        let within: HashSet<ChangeHash> = changes.iter().map(|c| c.hash()).collect();
        let wanted: Vec<ChangeHash> = changes
            .iter()
            .flat_map(|c| c.deps().iter().copied())
            .filter(|d| !within.contains(d))
            .collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let slot = self.slot(id).await?;
        let mut missing: Vec<ChangeHash> = {
            let state = slot.state.lock().await;
            wanted.into_iter().filter(|d| !has(&state.doc, d)).collect()
        };
        self.release(slot);
        missing.sort();
        missing.dedup();
        Ok(missing)
    }

    /// Heads of `doc` as of feed sequence `seq`.
    pub async fn heads_at(&self, doc: &DocId, seq: u64) -> Result<Vec<ChangeHash>, Error> {
        let key = doc.clone();
        let h = self.blocking(move |s| s.heads_at(&key, seq)).await?;
        Ok(h.unwrap_or_default().into_iter().map(ChangeHash).collect())
    }

    /// The highest stored feed sequence.
    pub fn last_seq(&self) -> u64 {
        self.seq.lock().expect("seq lock").next - 1
    }

    /// Every stored document id.
    pub async fn list(&self) -> Result<Vec<DocId>, Error> {
        self.blocking(|s| s.list()).await
    }

    /// Storage access for uploads.
    pub(crate) fn storage(&self) -> Arc<dyn RelayStorage> {
        self.storage.clone()
    }
}

/// Drops unfinished uploads untouched for `expiry`, every quarter of it (at least every
/// second, at most every five minutes), until `stop` fires or the hub is gone.
pub async fn expire_uploads(
    hub: std::sync::Weak<Hub>,
    expiry: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    let every = (expiry / 4).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(300),
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let Some(hub) = hub.upgrade() else { return };
        let cutoff = crate::auth::now_secs().saturating_sub(expiry.as_secs());
        match hub.blocking(move |s| s.expire_uploads(cutoff)).await {
            Ok(0) => {}
            Ok(n) => debug!(uploads = n, "dropped abandoned uploads"),
            Err(e) => warn!("cannot expire abandoned uploads: {e}"),
        }
    }
}

/// What the relay does with a push's bytes before they can reach a stored document:
/// decode the bundle, apply it. On error `doc` may be half-changed (the relay reloads it
/// from disk); the fuzz targets and property tests drive this with hostile bytes.
pub fn apply_untrusted(doc: &mut Automerge, bytes: &[u8]) -> Result<usize, String> {
    let changes = bundle_changes(bytes)?;
    let n = changes.len();
    guarded_apply(doc, changes)?;
    Ok(n)
}

/// `apply_changes` that turns a panic inside Automerge (hostile data) into an error. The
/// document may be half-changed afterwards either way: callers reload it.
fn guarded_apply(doc: &mut Automerge, changes: Vec<Change>) -> Result<(), String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.apply_changes(changes))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("Automerge could not apply the changes".into()),
    }
}

fn load_state(id: &DocId, stored: Option<StoredDoc>) -> Result<(SlotState, usize), Error> {
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
