//! The [`Client`] handle: the document cache over the sled store, the one write path,
//! sync, and day rollover. The field operations are in `operations.rs`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::transaction::Transaction;
use automerge::{Automerge, ChangeHash, ReadDoc};
use redline_proto::{Day, DocId, DocKind, MemberId};

use crate::identity::{self, DeviceIdentity};
use crate::progress::Traffic;
use crate::schema::{self, Writer};
use crate::store::{DeviceStore, DocWrite, SledStore};
use crate::{ClientConfig, Error};

/// A device's Redline store. Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn DeviceStore>,
    pub(crate) identity: DeviceIdentity,
    pub(crate) config: ClientConfig,
    /// Parsed documents, loaded on first use. Local writes and sync merges go through it.
    docs: Mutex<HashMap<DocId, Automerge>>,
    /// Tally totals kept per ledger between reads (locked after `docs`, never before).
    pub(crate) tallies: crate::totals::TallyCache,
    /// The heads of what the store holds of each document loaded or written: a write
    /// appends the changes after them (locked after `docs`, never before).
    stored_heads: Mutex<HashMap<DocId, Vec<ChangeHash>>>,
    /// Per document merged from a whole document that held everything the phone's copy
    /// held: what the store held then (`None`: nothing). The save may become the stored
    /// snapshot only while the store still holds exactly that (a local write since is
    /// stored only as a chunk the snapshot would drop). Locked after `docs`.
    whole_bases: Mutex<HashMap<DocId, Option<Vec<ChangeHash>>>>,
    /// One sync at a time per client; holds the QUIC endpoint, made on first sync.
    pub(crate) syncing: tokio::sync::Mutex<Option<quinn::Endpoint>>,
    /// Bytes and frames over the client's lifetime.
    pub(crate) traffic: Arc<Traffic>,
    /// Signalled on every local write (a live session pushes it).
    pub(crate) local_change: tokio::sync::Notify,
    /// Documents changed, locally or by sync.
    pub(crate) changes: tokio::sync::broadcast::Sender<DocChange>,
    /// The last large push built, reused while it is still what needs sending: a resumed
    /// upload sends the very same bytes, and a 20 MB bundle is not rebuilt per attempt.
    pub(crate) upload_cache: Mutex<Option<crate::device_session::CachedUpload>>,
    /// The running (or last) sync's progress.
    pub(crate) progress: tokio::sync::watch::Sender<crate::progress::SyncProgress>,
    /// The phone's network and charger, as the app last said.
    pub(crate) conditions: Mutex<crate::progress::Conditions>,
    /// The newest protocol version to say hello with: the build's, or the oldest it
    /// speaks once a relay from before version negotiation refused it.
    pub(crate) speak: std::sync::atomic::AtomicU16,
    /// Which of the deployment's relays ([`Client::relays`]) answered last.
    pub(crate) relay_index: std::sync::atomic::AtomicUsize,
    /// The last connection's attempt number (see [`Inner::next_attempt`]).
    pub(crate) attempt: std::sync::atomic::AtomicU64,
}

impl Inner {
    /// The next connection's attempt number, told to the relay in the hello: larger than
    /// any earlier one of this phone, also across restarts of the app (the wall clock in
    /// milliseconds, or one more than the last number when the clock is behind it).
    pub(crate) fn next_attempt(&self) -> u64 {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self
            .attempt
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |last| Some(next_attempt(last, now_ms)),
            )
            .unwrap_or_else(|last| last);
        next_attempt(last, now_ms)
    }
}

/// The attempt number after `last` at wall clock `now_ms`.
pub(crate) fn next_attempt(last: u64, now_ms: u64) -> u64 {
    now_ms.max(last.saturating_add(1))
}

/// Where a document change came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeOrigin {
    /// A write on this device.
    Local,
    /// Changes from the relay (other devices' work).
    Sync,
}

/// A document changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocChange {
    /// Which document.
    pub doc: DocId,
    /// Where the change came from.
    pub origin: ChangeOrigin,
}

/// What [`Client::drop_old_days`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rollover {
    /// Ledger days removed from the device.
    pub dropped: Vec<DocId>,
    /// Old days kept because the relay has not acknowledged all their changes.
    pub kept_unsynced: Vec<DocId>,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Client {
    /// Opens (or creates) the store in `dir`. The device identity is created on first open
    /// and kept.
    pub fn open(dir: impl AsRef<Path>, config: ClientConfig) -> Result<Self, Error> {
        Self::with_store(Arc::new(SledStore::open(dir.as_ref())?), config)
    }

    /// A client over `store` (any [`DeviceStore`]: the simulation's is in memory). The
    /// device identity is created on first use of the store and kept.
    pub fn with_store(store: Arc<dyn DeviceStore>, config: ClientConfig) -> Result<Self, Error> {
        let token_device = match &config.token {
            Some(t) => Some(
                redline_proto::token::peek(t)
                    .map_err(|e| Error::Invalid(format!("device token: {e}")))?
                    .device,
            ),
            None => None,
        };
        let identity = identity::load_or_create(store.as_ref(), token_device)?;
        let speak = std::sync::atomic::AtomicU16::new(config.protocol_version);
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                identity,
                config,
                docs: Mutex::new(HashMap::new()),
                tallies: Default::default(),
                stored_heads: Mutex::new(HashMap::new()),
                whole_bases: Mutex::new(HashMap::new()),
                syncing: tokio::sync::Mutex::new(None),
                traffic: Arc::new(Traffic::default()),
                local_change: tokio::sync::Notify::new(),
                changes: tokio::sync::broadcast::channel(1024).0,
                upload_cache: Mutex::new(None),
                progress: tokio::sync::watch::channel(Default::default()).0,
                conditions: Mutex::new(Default::default()),
                speak,
                relay_index: std::sync::atomic::AtomicUsize::new(0),
                attempt: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// The device token this client uses, if any.
    pub fn config_token(&self) -> Option<&str> {
        self.inner.config.token.as_deref()
    }

    /// This install's identity.
    pub fn identity(&self) -> &DeviceIdentity {
        &self.inner.identity
    }

    /// The member using this device.
    pub fn member(&self) -> &MemberId {
        &self.inner.config.member
    }

    pub(crate) fn docs(&self) -> MutexGuard<'_, HashMap<DocId, Automerge>> {
        self.inner
            .docs
            .lock()
            .expect("document cache lock poisoned")
    }

    /// Loads `id` into the cache from the store, if it is stored and not yet loaded.
    pub(crate) fn load<'a>(
        &self,
        docs: &'a mut HashMap<DocId, Automerge>,
        id: &DocId,
    ) -> Result<Option<&'a mut Automerge>, Error> {
        if !docs.contains_key(id) {
            let Some(bytes) = self.inner.store.load_doc(id)? else {
                return Ok(None);
            };
            let mut doc =
                Automerge::load(&bytes).map_err(|e| Error::Corrupt(format!("{id}: {e}")))?;
            doc.set_actor(self.inner.identity.actor.clone());
            self.stored_as(id, doc.get_heads());
            docs.insert(id.clone(), doc);
        }
        Ok(docs.get_mut(id))
    }

    /// How to write `doc` to the store now: the changes after what the store holds of
    /// it, or a whole snapshot if it holds none. `before`: the heads before a local
    /// transaction; when the store holds exactly those, the transaction's change is all
    /// there is to append (no walk over the document's history).
    pub(crate) fn doc_write(
        &self,
        id: &DocId,
        doc: &Automerge,
        before: Option<&[ChangeHash]>,
    ) -> DocWrite {
        let stored = self.stored_heads().get(id).cloned();
        let Some(h) = stored else {
            return DocWrite::Snapshot(doc.save());
        };
        // The new changes, bundled (Automerge 0.12 encodes a bundle from its columns far
        // more cheaply than it rebuilds a single change, and `load` takes bundle chunks).
        let new: Vec<ChangeHash> = if before == Some(h.as_slice()) {
            doc.get_heads()
                .into_iter()
                .filter(|x| !h.contains(x))
                .collect()
        } else {
            doc.get_changes_meta(&h).iter().map(|m| m.hash).collect()
        };
        if new.is_empty() {
            return DocWrite::Append(Vec::new());
        }
        match doc.bundle(new) {
            Ok(b) => DocWrite::Append(b.bytes().to_vec()),
            Err(_) => DocWrite::Snapshot(doc.save()),
        }
    }

    /// Writes what the store lacks of `doc` (one flush), and folds its chunks into a
    /// new snapshot when they have grown heavy.
    fn store_doc(
        &self,
        id: &DocId,
        doc: &Automerge,
        before: Option<&[ChangeHash]>,
    ) -> Result<(), Error> {
        match self.doc_write(id, doc, before) {
            DocWrite::Snapshot(bytes) => self.inner.store.save_doc(id, &bytes)?,
            DocWrite::Append(chunk) if chunk.is_empty() => {}
            DocWrite::Append(chunk) => return self.append_chunk(id, doc, &chunk),
        }
        self.stored_as(id, doc.get_heads());
        Ok(())
    }

    /// Appends `chunk` (what the store lacks of `doc`) durably, then folds the chunks
    /// into a snapshot if they have grown heavy.
    fn append_chunk(&self, id: &DocId, doc: &Automerge, chunk: &[u8]) -> Result<(), Error> {
        let stored = self.inner.store.append_doc(id, chunk)?;
        // The chunk is durable already: a failed compaction only leaves the chunks for
        // the next write to fold.
        if crate::store::wants_compaction(&stored) {
            let _ = self.inner.store.save_doc(id, &doc.save());
        }
        self.stored_as(id, doc.get_heads());
        Ok(())
    }

    /// Records that the store now holds `id` up to `heads`.
    pub(crate) fn stored_as(&self, id: &DocId, heads: Vec<ChangeHash>) {
        self.stored_heads().insert(id.clone(), heads);
    }

    /// Whether the store holds `id` (as loaded or written by this client).
    pub(crate) fn is_stored(&self, id: &DocId) -> bool {
        self.stored_heads().contains_key(id)
    }

    /// Notes that `id` was just merged from a whole document holding everything its
    /// copy held (call with the documents locked).
    pub(crate) fn merged_whole(&self, id: &DocId) {
        let base = self.stored_heads().get(id).cloned();
        self.whole_bases().insert(id.clone(), base);
    }

    /// Whether the store still holds what it held when `id` was last merged from a
    /// whole document holding everything its copy held (call with the documents locked
    /// and keep them locked until the snapshot is written: it may then replace the
    /// stored copy). Forgets the note either way.
    pub(crate) fn whole_still_covers(&self, id: &DocId) -> bool {
        let Some(base) = self.whole_bases().remove(id) else {
            return false;
        };
        base.as_ref() == self.stored_heads().get(id)
    }

    fn whole_bases(&self) -> MutexGuard<'_, HashMap<DocId, Option<Vec<ChangeHash>>>> {
        self.inner
            .whole_bases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets what the store held of `id` (it was removed).
    pub(crate) fn stored_removed(&self, id: &DocId) {
        self.stored_heads().remove(id);
    }

    fn stored_heads(&self) -> MutexGuard<'_, HashMap<DocId, Vec<ChangeHash>>> {
        self.inner
            .stored_heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The cached document `id`, started from its genesis if the device does not hold it
    /// (stored only when the caller stores it).
    pub(crate) fn load_or_genesis<'a>(
        &self,
        docs: &'a mut HashMap<DocId, Automerge>,
        id: &DocId,
    ) -> Result<&'a mut Automerge, Error> {
        if self.load(docs, id)?.is_none() {
            let mut doc = schema::genesis(id);
            doc.set_actor(self.inner.identity.actor.clone());
            docs.insert(id.clone(), doc);
        }
        Ok(docs.get_mut(id).expect("inserted above"))
    }

    /// Reads document `id` with `f`; `None` if the device does not hold it.
    pub(crate) fn read<R>(
        &self,
        id: &DocId,
        f: impl FnOnce(&Automerge) -> Result<R, Error>,
    ) -> Result<Option<R>, Error> {
        let mut docs = self.docs();
        match self.load(&mut docs, id)? {
            Some(doc) => f(doc).map(Some),
            None => Ok(None),
        }
    }

    /// Makes one local change to `id` (creating the document from its genesis if needed)
    /// and stores it durably before returning. If `change` fails, nothing is written.
    pub(crate) fn change<R>(
        &self,
        id: &DocId,
        change: impl FnOnce(&mut Transaction<'_>, &Writer<'_>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        self.change_after(id, |_| Ok(()), |tx, w, ()| change(tx, w))
    }

    /// Like [`change`](Self::change), with a read of the document before the transaction
    /// opens (for what a transaction cannot see, such as change metadata).
    pub(crate) fn change_after<P, R>(
        &self,
        id: &DocId,
        prepare: impl FnOnce(&Automerge) -> Result<P, Error>,
        change: impl FnOnce(&mut Transaction<'_>, &Writer<'_>, P) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let mut docs = self.docs();
        let doc = self.load_or_genesis(&mut docs, id)?;
        let prepared = prepare(doc)?;
        let writer = Writer {
            member: &self.inner.config.member,
            device: &self.inner.identity.device,
            now_ms: self.inner.config.clock.now_ms(),
        };
        let before = doc.get_heads();
        // Kept tally totals follow the write by its patches.
        let follow = self.inner.tallies.wants(id, &before);
        let mut tx = if follow {
            doc.transaction_log_patches(automerge::PatchLog::active())
                .expect("a new patch log belongs to any document")
        } else {
            doc.transaction()
        };
        let result = match change(&mut tx, &writer, prepared) {
            Ok(r) => r,
            Err(e) => {
                tx.rollback();
                return Err(e);
            }
        };
        let mut log = schema::commit(tx, &writer);
        if follow {
            self.inner.tallies.advance_by(id, &before, doc, &mut log);
        }
        if !self.covered_by_patterns(id) {
            self.inner.store.follow(id)?;
        }
        if let Err(e) = self.store_doc(id, doc, Some(&before)) {
            // Keep memory equal to disk: what was not stored did not happen.
            docs.remove(id);
            return Err(e);
        }
        drop(docs);
        self.inner.local_change.notify_one();
        let _ = self.inner.changes.send(DocChange {
            doc: id.clone(),
            origin: ChangeOrigin::Local,
        });
        Ok(result)
    }

    /// Makes sure the device holds `id` (starting from its genesis if needed), so the next
    /// sync fetches it from the relay.
    pub fn follow(&self, id: &DocId) -> Result<(), Error> {
        let mut docs = self.docs();
        if self.load(&mut docs, id)?.is_some() {
            return Ok(());
        }
        let mut doc = schema::genesis(id);
        doc.set_actor(self.inner.identity.actor.clone());
        if !self.covered_by_patterns(id) {
            self.inner.store.follow(id)?;
        }
        self.store_doc(id, &doc, None)?;
        docs.insert(id.clone(), doc);
        Ok(())
    }

    /// Whether the subscription's org, teams and zones cover `id` (so it needs no
    /// explicit follow). Ledger days count whatever their date.
    fn covered_by_patterns(&self, id: &DocId) -> bool {
        let c = &self.inner.config;
        match id.kind() {
            DocKind::Roster(org) => c.org.as_ref() == Some(&org),
            DocKind::Households(zone) => c.zones.contains(&zone),
            DocKind::Ledger(team, _) => c.teams.contains(&team),
        }
    }

    /// Documents changed from now on, locally or by sync (for observers). A receiver that
    /// lags behind loses the oldest notices (`RecvError::Lagged`): re-read everything.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<DocChange> {
        self.inner.changes.subscribe()
    }

    /// Bytes sent and received by this client so far, on all streams.
    pub fn traffic(&self) -> (u64, u64) {
        (
            self.inner.traffic.bytes_sent.load(Ordering::Relaxed),
            self.inner.traffic.bytes_received.load(Ordering::Relaxed),
        )
    }

    /// Frames (messages and transfer pieces) sent and received by this client so far.
    pub fn frames(&self) -> (u64, u64) {
        (
            self.inner.traffic.frames_sent.load(Ordering::Relaxed),
            self.inner.traffic.frames_received.load(Ordering::Relaxed),
        )
    }

    /// Merges a saved Automerge document (an export, a backup) or a bundle of changes
    /// (what the relay sends) into `id` on this device, durably; it syncs like any local
    /// change. Returns how many changes were new.
    pub fn import(&self, id: &DocId, bytes: &[u8]) -> Result<usize, Error> {
        let changes = match automerge::Bundle::try_from(bytes) {
            Ok(bundle) => Some(
                bundle
                    .to_changes()
                    .map_err(|e| Error::Invalid(format!("not a valid bundle: {e}")))?,
            ),
            Err(_) => None,
        };
        let mut other = match changes {
            Some(_) => None,
            None => Some(
                Automerge::load(bytes)
                    .map_err(|e| Error::Invalid(format!("not an Automerge document: {e}")))?,
            ),
        };
        let mut docs = self.docs();
        let doc = self.load_or_genesis(&mut docs, id)?;
        let is_bundle = changes.is_some();
        // New changes: the history's size after less before (Automerge keeps it; a walk
        // of the history after the old heads costs about as much as the apply's
        // bookkeeping).
        let count = |doc: &Automerge| doc.stats().num_changes as usize;
        let held = count(doc);
        let merged = match (changes, other.as_mut()) {
            (Some(changes), _) => {
                let before = doc.get_heads();
                let follow = self.inner.tallies.wants(id, &before);
                let mut log = automerge::PatchLog::new(follow);
                let applied = doc.apply_changes_log_patches(changes, &mut log);
                if follow && applied.is_ok() {
                    self.inner.tallies.advance_by(id, &before, doc, &mut log);
                }
                applied.map(|()| count(doc) - held)
            }
            (None, Some(other)) => doc.merge(other).map(|_| count(doc) - held),
            (None, None) => Ok(0),
        };
        let new = match merged {
            Ok(n) => n,
            Err(e) => {
                // Memory never runs ahead of the store: reload on next use.
                docs.remove(id);
                return Err(e.into());
            }
        };
        if !self.covered_by_patterns(id) {
            self.inner.store.follow(id)?;
        }
        // A bundle is stored as it came when the store holds the rest of the document.
        let stored = if is_bundle && new > 0 && self.is_stored(id) {
            self.append_chunk(id, doc, bytes)
        } else {
            self.store_doc(id, doc, None)
        };
        if let Err(e) = stored {
            docs.remove(id);
            return Err(e);
        }
        drop(docs);
        self.inner.local_change.notify_one();
        let _ = self.inner.changes.send(DocChange {
            doc: id.clone(),
            origin: ChangeOrigin::Local,
        });
        Ok(new)
    }

    /// Every document this device holds.
    pub fn documents(&self) -> Result<Vec<DocId>, Error> {
        self.inner.store.doc_ids()
    }

    /// The current heads of `id` (empty if the device does not hold it).
    pub fn heads(&self, id: &DocId) -> Result<Vec<ChangeHash>, Error> {
        Ok(self.read(id, |d| Ok(d.get_heads()))?.unwrap_or_default())
    }

    /// A copy of the document `id`, for export and inspection.
    pub fn document(&self, id: &DocId) -> Result<Option<Automerge>, Error> {
        self.read(id, |d| Ok(d.clone()))
    }

    /// The relay's durable heads of `id` from its last acknowledgement.
    pub fn acked_heads(&self, id: &DocId) -> Result<Option<Vec<ChangeHash>>, Error> {
        self.inner.store.acked_heads(id)
    }

    /// Removes ledger days older than the configured [`ClientConfig::keep_days`] (counting
    /// back from `today`, which is kept) from this device only; the relay keeps them and a
    /// later [`follow`](Self::follow) fetches them again. A day with changes the relay has
    /// not acknowledged is kept and listed in [`Rollover::kept_unsynced`].
    pub fn drop_old_days(&self, today: &Day) -> Result<Rollover, Error> {
        let cutoff = day_minus(today, self.inner.config.keep_days.saturating_sub(1))?;
        let mut out = Rollover::default();
        let mut docs = self.docs();
        for id in self.inner.store.doc_ids()? {
            let DocKind::Ledger(_, day) = id.kind() else {
                continue;
            };
            // YYYY-MM-DD compares chronologically as text.
            if day.as_str() >= cutoff.as_str() {
                continue;
            }
            let heads = match self.load(&mut docs, &id)? {
                Some(d) => d.get_heads(),
                None => continue,
            };
            let acked = self.inner.store.acked_heads(&id)?.unwrap_or_default();
            if heads.iter().all(|h| acked.contains(h)) {
                self.inner.store.remove_doc(&id)?;
                self.stored_removed(&id);
                docs.remove(&id);
                out.dropped.push(id);
            } else {
                out.kept_unsynced.push(id);
            }
        }
        Ok(out)
    }

    /// Watches the progress of syncs (the current one, or the last).
    pub fn progress(&self) -> tokio::sync::watch::Receiver<crate::SyncProgress> {
        self.inner.progress.subscribe()
    }

    /// Tells the client the phone's network and charger state (for the sync policy).
    pub fn set_conditions(&self, conditions: crate::Conditions) {
        *self.inner.conditions.lock().expect("conditions lock") = conditions;
    }
}

/// The UTC day of unix milliseconds `ms`.
pub(crate) fn day_of(ms: i64) -> Option<Day> {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).ok()?;
    let d = t.date();
    Day::new(format!(
        "{:04}-{:02}-{:02}",
        d.year(),
        u8::from(d.month()),
        d.day()
    ))
    .ok()
}

/// `day` minus `n` days.
pub(crate) fn day_minus(day: &Day, n: u32) -> Result<Day, Error> {
    let s = day.as_str();
    let num = |r: std::ops::Range<usize>| {
        s[r].parse::<i32>()
            .map_err(|_| Error::Invalid(format!("bad day {s}")))
    };
    let month = u8::try_from(num(5..7)?)
        .ok()
        .and_then(|m| time::Month::try_from(m).ok());
    let date = month
        .and_then(|m| {
            time::Date::from_calendar_date(num(0..4).ok()?, m, u8::try_from(num(8..10).ok()?).ok()?)
                .ok()
        })
        .ok_or_else(|| Error::Invalid(format!("bad day {s}")))?;
    let earlier = date
        .checked_sub(time::Duration::days(i64::from(n)))
        .ok_or_else(|| Error::Invalid(format!("{s} minus {n} days is out of range")))?;
    let text = format!(
        "{:04}-{:02}-{:02}",
        earlier.year(),
        u8::from(earlier.month()),
        earlier.day()
    );
    Ok(Day::new(text)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use redline_proto::TeamId;

    fn phone(store: &Arc<MemoryStore>) -> Client {
        let config = crate::ClientConfig::new(MemberId::new("amira").unwrap());
        Client::with_store(store.clone(), config).unwrap()
    }

    #[test]
    fn connection_attempt_numbers_grow_even_when_the_clock_goes_back() {
        assert_eq!(next_attempt(0, 1_000), 1_000);
        assert_eq!(next_attempt(1_000, 1_000), 1_001);
        assert_eq!(next_attempt(5_000, 1_000), 5_001);
        let client = phone(&Arc::new(MemoryStore::new()));
        let first = client.inner.next_attempt();
        let second = client.inner.next_attempt();
        assert!(
            second > first && first > 1_700_000_000_000,
            "{first} {second}"
        );
    }

    #[test]
    fn a_write_appends_its_change_and_a_reopen_loads_snapshot_and_chunks() {
        let store = Arc::new(MemoryStore::new());
        let (team, day) = (TeamId::new("t1").unwrap(), Day::new("2026-12-01").unwrap());
        let id = DocId::ledger(&team, &day);
        let client = phone(&store);
        for _ in 0..10 {
            client.add_to_tally(&team, &day, "screened", 2).unwrap();
        }
        // The first write stores the document whole; each later one only its change.
        let stored = store.stored(&id).unwrap();
        assert_eq!(stored.chunks, 9);
        assert!(stored.chunk_bytes < stored.snapshot_bytes * 9);
        let heads = client.heads(&id).unwrap();
        drop(client);
        store.crash();
        let client = phone(&store);
        assert_eq!(client.heads(&id).unwrap(), heads);
        assert_eq!(client.day_totals(&team, &day).unwrap()["screened"], 20);
        // Writes after a reopen append after what was loaded.
        client.add_to_tally(&team, &day, "screened", 1).unwrap();
        drop(client);
        store.crash();
        let client = phone(&store);
        assert_eq!(client.day_totals(&team, &day).unwrap()["screened"], 21);
        assert_eq!(store.stored(&id).unwrap().chunks, 10);
    }

    #[test]
    fn chunks_fold_into_a_snapshot_once_they_outweigh_it() {
        let store = Arc::new(MemoryStore::new());
        let (team, day) = (TeamId::new("t1").unwrap(), Day::new("2026-12-01").unwrap());
        let id = DocId::ledger(&team, &day);
        let client = phone(&store);
        let mut most = 0;
        for i in 0..2_000 {
            client.add_to_tally(&team, &day, "screened", 1).unwrap();
            let s = store.stored(&id).unwrap();
            assert!(!crate::store::wants_compaction(&s), "write {i} left {s:?}");
            most = most.max(s.chunks);
        }
        assert!(most > 100, "chunks were folded too eagerly ({most})");
        assert!(store.stored(&id).unwrap().chunks < most, "never folded");
        drop(client);
        store.crash();
        let client = phone(&store);
        assert_eq!(client.day_totals(&team, &day).unwrap()["screened"], 2_000);
    }

    #[test]
    fn day_arithmetic_crosses_months_and_years() {
        let d = |s: &str| Day::new(s).unwrap();
        assert_eq!(day_minus(&d("2026-03-01"), 1).unwrap(), d("2026-02-28"));
        assert_eq!(day_minus(&d("2024-03-01"), 1).unwrap(), d("2024-02-29"));
        assert_eq!(day_minus(&d("2026-01-03"), 6).unwrap(), d("2025-12-28"));
        assert_eq!(day_minus(&d("2026-01-03"), 0).unwrap(), d("2026-01-03"));
    }
}
