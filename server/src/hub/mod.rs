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
//! - **Live fan-out.** When the stable sequence moves, only the sessions whose
//!   subscription covers a document that became stable are woken ([`fanout`]); the
//!   last entries of the feed stay in memory (`follow::Recent`), so a live catch-up
//!   lists its window without a storage read.

mod blocks;
mod catchup;
mod commit;
pub mod committing;
pub mod fanout;
pub mod feed;
mod follow;
mod guard;
pub mod plan;
mod queue;
mod slots;
pub mod staging;

pub use blocks::BlockCounts;
pub use catchup::{Found, Window};
pub use guard::apply_untrusted;
pub use queue::Committed;
pub use slots::{DocSlot, MEMORY_FACTOR, SlotState};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use automerge::{ActorId, Automerge, Change, ChangeHash};
use redline_proto::message::Coverage;
use redline_proto::{DeviceId, DocId};
use tokio::sync::{Mutex as AsyncMutex, mpsc, oneshot, watch};
use tracing::{debug, warn};

use crate::Error;
use crate::storage::RelayStorage;

/// Counters for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Commits written.
    pub commits: AtomicU64,
    /// Pushes merged into those commits (a refused push is not counted).
    pub pushes: AtomicU64,
    /// Changes in durable commits (a batch applied again after a conflict counts once).
    pub changes: AtomicU64,
    /// Flushes performed.
    pub flushes: AtomicU64,
    /// Largest number of pushes in one commit.
    pub max_batch: AtomicU64,
    /// Documents evicted from the cache.
    pub evictions: AtomicU64,
    /// Documents loaded into the cache (parsed from storage).
    pub loads: AtomicU64,
    /// Batches applied again because another relay committed to their document.
    pub conflicts: AtomicU64,
    /// Other relays' commits applied to cached documents (instead of reloading them).
    pub taken_in: AtomicU64,
    /// Of those, commits taken in from the follower's read (with their chunks),
    /// without a read of their own.
    pub taken_ahead: AtomicU64,
    /// Shared feed: this relay's commits made stable as they flushed (every lower
    /// sequence already followed), without waiting for the follower's read.
    pub stable_at_once: AtomicU64,
    /// Block bundles made for catch-ups, and shipped again.
    pub blocks: blocks::BlockCounts,
}

/// Listens to the number of pushes of each commit.
pub type BatchObserver = Box<dyn Fn(u64) + Send + Sync>;

/// The relay's documents.
pub struct Hub {
    storage: Arc<dyn RelayStorage>,
    slots: Mutex<HashMap<DocId, Arc<DocSlot>>>,
    budget: usize,
    /// Largest stored size of one document; pushes beyond it are refused.
    max_document_bytes: AtomicU64,
    tick: AtomicU64,
    seq: Mutex<feed::Feed>,
    stable: watch::Sender<u64>,
    flusher: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
    /// Actor → the device it is bound to (a cache of the storage's table).
    actors: Mutex<HashMap<ActorId, DeviceId>>,
    /// Documents each device created today: (day since the epoch, count). In memory: a
    /// restart forgives the day's count.
    creations: Mutex<HashMap<DeviceId, (i64, u32)>>,
    /// Who writes each unfinished upload; its lock makes "check a device's staged bytes
    /// and that this stream still owns the upload, then store a piece" one step.
    pub(crate) staging: Mutex<staging::Staging>,
    /// Makes "check a device's held bytes, then hold a push" one step.
    pub(crate) holding: AsyncMutex<()>,
    /// Counters.
    pub stats: HubStats,
    /// Told the number of pushes of every commit (the relay's metrics listen).
    batch_observer: std::sync::OnceLock<BatchObserver>,
    /// Other relays write the same storage: sequences come from storage and the
    /// stable sequence from following the shared feed ([`follow`]).
    shared: bool,
    /// Shared feed: the head up to which other relays' commits were taken into
    /// account (their documents marked stale).
    followed: AtomicU64,
    /// Shared feed: wakes the follower (this relay flushed a commit).
    kick: Arc<tokio::sync::Notify>,
    /// The feed's last stable entries (read by the follower on a shared feed, taken
    /// from this relay's commits otherwise), for catch-ups.
    recent: Mutex<follow::Recent>,
    /// Live sessions' subscriptions: whom a commit wakes.
    fanout: Arc<fanout::Fanout>,
    /// Documents being loaded into the cache: one load each at a time.
    loading: Mutex<HashMap<DocId, Arc<AsyncMutex<()>>>>,
}

/// Whether `doc` holds change `h` (metadata lookup, no copy of the change).
fn has(doc: &Automerge, h: &ChangeHash) -> bool {
    doc.get_change_meta_by_hash(h).is_some()
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
        let shared = storage.shared();
        let signal = storage.feed_signal();
        let (stable, _) = watch::channel(last);
        let (flusher, mut requests) =
            mpsc::unbounded_channel::<oneshot::Sender<Result<(), String>>>();
        let hub = Arc::new(Self {
            storage,
            slots: Mutex::new(HashMap::new()),
            budget,
            max_document_bytes: AtomicU64::new(u64::MAX),
            tick: AtomicU64::new(0),
            seq: Mutex::new(feed::Feed::new(last)),
            stable,
            flusher,
            stats: HubStats::default(),
            batch_observer: std::sync::OnceLock::new(),
            actors: Mutex::new(HashMap::new()),
            creations: Mutex::new(HashMap::new()),
            staging: Mutex::new(staging::Staging::default()),
            holding: AsyncMutex::new(()),
            shared,
            followed: AtomicU64::new(last),
            kick: Arc::new(tokio::sync::Notify::new()),
            recent: Mutex::new(follow::Recent::new(last)),
            fanout: Arc::default(),
            loading: Mutex::new(HashMap::new()),
        });
        if shared {
            tokio::spawn(follow::follow(
                Arc::downgrade(&hub),
                signal,
                hub.kick.clone(),
            ));
        }
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
                        if let Some(flushed) = s.flush_async() {
                            flushed.await.map_err(|e| e.to_string())
                        } else if s.blocks() {
                            tokio::task::spawn_blocking(move || s.flush())
                                .await
                                .map_err(|e| e.to_string())
                                .and_then(|r| r.map_err(|e| e.to_string()))
                        } else {
                            s.flush().map_err(|e| e.to_string())
                        }
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

    /// Tells `observer` the number of pushes of every commit from now on (once; later
    /// calls are ignored).
    pub fn observe_batches(&self, observer: BatchObserver) {
        let _ = self.batch_observer.set(observer);
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

    /// Registers a live session whose subscription is `coverage`: it is woken when a
    /// commit it covers becomes stable (register before reading the stable sequence,
    /// so that no commit falls between the two).
    pub fn interest(&self, coverage: Coverage) -> fanout::Interest {
        self.fanout.register(coverage)
    }

    /// Sessions registered for live fan-out now.
    pub fn live_sessions(&self) -> usize {
        self.fanout.len()
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
        if !s.blocks() {
            return f(s.as_ref());
        }
        tokio::task::spawn_blocking(move || f(s.as_ref())).await?
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

    /// The highest stored feed sequence (shared feed: the highest known stable).
    pub fn last_seq(&self) -> u64 {
        if self.shared {
            return *self.stable.borrow();
        }
        self.seq.lock().expect("seq lock").last()
    }

    /// Every stored document id.
    pub async fn list(&self) -> Result<Vec<DocId>, Error> {
        self.blocking(|s| s.list()).await
    }

    /// Storage access for uploads.
    pub fn storage(&self) -> Arc<dyn RelayStorage> {
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
