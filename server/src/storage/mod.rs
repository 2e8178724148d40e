//! Durable relay storage behind traits, one per concern, so another engine can replace
//! sled (and the simulation can run on memory).
//!
//! Per document: a compressed snapshot (`save()`) plus appended chunks (Automerge bundles
//! of the changes each commit added), compacted into a new snapshot now and then. A commit
//! therefore writes only what it adds, not the whole document.
//!
//! The change feed lives beside the documents: every commit gets the next sequence
//! number; `feed` maps it to the document, `doc_seq` maps (document, seq) to the heads
//! after it, so the relay can tell what a device with cursor `seq` already has.
//!
//! Writes ([`Documents::commit`], [`Uploads::put_piece`]...) are atomic but not flushed;
//! [`Documents::flush`] makes everything before it durable, whatever the concern. The
//! relay acknowledges only after a flush. All methods block: the relay calls them off the
//! async worker threads.
//!
//! The concerns:
//! - [`Documents`]: snapshots, chunks, the feed and the heads after each commit, epoch.
//! - [`Uploads`]: resumable uploads staged piece by piece, with expiry.
//! - [`ActorBindings`]: which device each Automerge actor belongs to (first use wins).
//! - [`DeviceRecords`]: per-device health records.
//! - [`QuarantineStore`]: pushes held for a lead's review.
//!
//! [`RelayStorage`] is all of them together: what a relay needs. Every backend passes
//! the same [`conformance`] suite.
//!
//! Backends: [`SledStorage`] (embedded, the default), [`PgStorage`] (PostgreSQL, for a
//! database operators already run and for several relays over one database) and
//! [`MemoryStorage`] (the simulation and tests).

pub mod conformance;
mod memory;
pub mod postgres;
mod sled;

pub use self::memory::MemoryStorage;
pub use self::postgres::{PgOptions, PgStorage};
pub use self::sled::SledStorage;

use redline_proto::{DeviceId, DocId};

use crate::Error;

/// A document as stored: an optional snapshot and the chunks appended after it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoredDoc {
    /// `save()` bytes of the last compaction.
    pub snapshot: Option<Vec<u8>>,
    /// Bundles appended since, in order.
    pub chunks: Vec<Vec<u8>>,
    /// The feed sequence of the document's last commit, as stored (backends with a
    /// [shared](Documents::shared) feed; 0 elsewhere).
    pub last_seq: u64,
}

/// Heads as stored: 32 bytes each, one after the other.
pub(crate) fn flat(heads: &[[u8; 32]]) -> Vec<u8> {
    heads.iter().flatten().copied().collect()
}

/// Heads from their stored form.
pub(crate) fn unflat(v: &[u8]) -> Vec<[u8; 32]> {
    v.chunks_exact(32)
        .filter_map(|c| <[u8; 32]>::try_from(c).ok())
        .collect()
}

/// A stored key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// A commit's chunk as stored: its sequence, its bytes and the document's heads after it.
pub type SeqChunk = (u64, Vec<u8>, Vec<[u8; 32]>);

/// A commit's chunk and the document's heads after it.
pub type ChunkAndHeads = (Vec<u8>, Vec<[u8; 32]>);

/// A storage call's answer as a future (backends whose IO is asynchronous underneath).
pub type StorageFuture<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, Error>> + Send + 'static>>;

/// The shared feed as the follower reads it ([`Documents::committed_feed_chunks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedRead {
    /// The feed's head: every sequence up to it is committed.
    pub head: u64,
    /// The entries after the point read from, in order.
    pub entries: Vec<(u64, DocId)>,
    /// Each entry's chunk and the document's heads after it, in the entries' order;
    /// `None` when the window was too long or a chunk is no longer stored (folded into
    /// a snapshot): read them per document then ([`Documents::chunks_after`]).
    pub chunks: Option<Vec<ChunkAndHeads>>,
}

/// Documents and the change feed.
pub trait Documents {
    /// This database's epoch: random, fixed at creation. Device cursors carry it.
    fn epoch(&self) -> u64;

    /// Whether calls may block on IO (disk, network): the hub then runs them on
    /// tokio's blocking threads. Storage in memory answers `false` and is called inline.
    fn blocks(&self) -> bool {
        true
    }
    /// Which backend this is and where (no secrets), for logs and `/health`.
    fn describe(&self) -> String {
        "memory".into()
    }
    /// Checks that the backend answers (for `/health`).
    fn ping(&self) -> Result<(), Error> {
        Ok(())
    }
    /// The highest feed sequence number stored (0 if none).
    fn last_seq(&self) -> Result<u64, Error>;
    /// The stored form of `doc`, if any.
    fn load(&self, doc: &DocId) -> Result<Option<StoredDoc>, Error>;
    /// Appends a chunk to `doc` and records feed entry `seq` with the heads after it, in
    /// one atomic write (not flushed).
    fn commit(&self, doc: &DocId, seq: u64, chunk: &[u8], heads: &[[u8; 32]]) -> Result<(), Error>;
    /// Replaces the snapshot of `doc` and drops its chunks, atomically (not flushed).
    /// `covers` is the feed sequence of the last commit the snapshot holds: a shared
    /// backend drops only the chunks up to it, and never replaces a snapshot that
    /// covers more (another relay's).
    fn compact(&self, doc: &DocId, snapshot: &[u8], covers: u64) -> Result<(), Error>;
    /// Whether several relays may write this storage at once. The feed's sequences are
    /// then handed out by [`append`](Self::append) inside the storage's transaction
    /// (the relay does not choose them), and [`feed_signal`](Self::feed_signal) tells
    /// when another relay committed.
    fn shared(&self) -> bool {
        false
    }
    /// Shared backends: appends a chunk to `doc` with the next feed sequence and the
    /// heads after it, if the document's last stored commit is still `expected` (0:
    /// none); returns the sequence. Another relay's commit since is
    /// [`Error::Conflict`]: reload, apply again, retry. Not flushed; sequences are
    /// taken in commit order across relays, so a flushed sequence has every lower one
    /// flushed too.
    fn append(
        &self,
        doc: &DocId,
        expected: u64,
        chunk: &[u8],
        heads: &[[u8; 32]],
    ) -> Result<u64, Error> {
        let _ = (doc, expected, chunk, heads);
        Err(Error::Storage(
            "append: this backend's feed is not shared".into(),
        ))
    }
    /// Shared backends: whether the append to `doc` that took `seq` was lost with its
    /// transaction (a statement of the relay failed, or its commit did), even if a later
    /// [`flush`](Self::flush) succeeded: flushes are shared, and one that reports the
    /// loss may have been another caller's (and a sequence freed by a rollback is taken
    /// again, so the sequence alone does not say). Asked once per append, after its
    /// flush.
    fn append_lost(&self, doc: &DocId, seq: u64) -> bool {
        let _ = (doc, seq);
        false
    }
    /// Shared backends: a number that moves (to a feed sequence) when any relay
    /// commits; a relay re-reads the feed's head on each move (and now and then
    /// without one).
    fn feed_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
    /// Makes every write before it durable, of every concern.
    fn flush(&self) -> Result<(), Error>;
    /// [`flush`](Self::flush) as a future, for backends whose IO is asynchronous
    /// underneath: the hub's flusher awaits it on the relay's runtime (no blocking
    /// thread between it and the database's answer, on the live path of every commit).
    /// `None`: call the blocking method (also when the backend cannot start one now).
    fn flush_async(&self) -> Option<StorageFuture<()>> {
        None
    }
    /// Feed entries with `after < seq <= upto`, in order.
    fn feed(&self, after: u64, upto: u64) -> Result<Vec<(u64, DocId)>, Error>;
    /// Shared backends: the chunks of `doc` committed after sequence `after`, in order,
    /// with their sequences and the heads after each; `None` if a snapshot now covers
    /// more than `after` (another relay compacted: load the whole document). Others:
    /// `None`.
    fn chunks_after(&self, doc: &DocId, after: u64) -> Result<Option<Vec<SeqChunk>>, Error> {
        let _ = (doc, after);
        Ok(None)
    }
    /// The feed's head and its entries after `after` as every relay sees them: only
    /// what is flushed (a shared backend must not count this relay's open transaction,
    /// which may still roll back and free its sequences for another relay).
    fn committed_feed(&self, after: u64) -> Result<(u64, Vec<(u64, DocId)>), Error> {
        let head = self.last_seq()?;
        Ok((head, self.feed(after, head)?))
    }
    /// [`committed_feed`](Self::committed_feed), with each entry's chunk when the
    /// window holds at most `most` entries: the follower hands other relays' commits
    /// to the documents it holds in memory, and a live catch-up across relays reads
    /// nothing more. Backends without a shared feed: no chunks.
    fn committed_feed_chunks(&self, after: u64, most: u64) -> Result<FeedRead, Error> {
        let _ = most;
        let (head, entries) = self.committed_feed(after)?;
        Ok(FeedRead {
            head,
            entries,
            chunks: None,
        })
    }
    /// [`committed_feed_chunks`](Self::committed_feed_chunks) as a future, for backends
    /// whose IO is asynchronous underneath (a network database): the follower awaits it
    /// on the relay's runtime, where the blocking call would hand it to a blocking
    /// thread that hands it on to the client's runtime (two thread wake-ups each way on
    /// the live path across relays). `None`: call the blocking method.
    fn committed_feed_chunks_async(
        &self,
        after: u64,
        most: u64,
    ) -> Option<StorageFuture<FeedRead>> {
        let _ = (after, most);
        None
    }
    /// The heads of `doc` after the last commit with sequence `<= seq` (`None`: the
    /// document did not exist yet).
    fn heads_at(&self, doc: &DocId, seq: u64) -> Result<Option<Vec<[u8; 32]>>, Error>;
    /// Every stored document id, in order.
    fn list(&self) -> Result<Vec<DocId>, Error>;
    /// Whether `doc` is stored.
    fn exists(&self, doc: &DocId) -> Result<bool, Error>;
}

/// Resumable uploads, staged durably piece by piece.
pub trait Uploads {
    /// Bytes of upload `key` held (contiguous from 0).
    fn upload_len(&self, key: &[u8]) -> Result<u64, Error>;
    /// Stores a piece of upload `key` at `offset` (must equal the length held).
    fn put_piece(&self, key: &[u8], offset: u64, data: &[u8]) -> Result<(), Error>;
    /// The whole upload `key`.
    fn upload_bytes(&self, key: &[u8]) -> Result<Vec<u8>, Error>;
    /// Drops upload `key`.
    fn drop_upload(&self, key: &[u8]) -> Result<(), Error>;
    /// Records that upload `key` was worked on at `now` (Unix seconds), for expiry.
    fn touch_upload(&self, key: &[u8], now: u64) -> Result<(), Error>;
    /// Bytes staged by unfinished uploads whose keys start with `prefix` (one device's).
    fn staged_bytes(&self, prefix: &[u8]) -> Result<u64, Error>;
    /// Drops every upload last worked on before `cutoff` (Unix seconds); returns how
    /// many were dropped.
    fn expire_uploads(&self, cutoff: u64) -> Result<usize, Error>;
}

/// Which device each Automerge actor belongs to.
pub trait ActorBindings {
    /// Binds `actor` to `device` unless it is bound already; returns the device it is
    /// bound to (not flushed: the commit that first uses it flushes).
    fn bind_actor(&self, actor: &[u8], device: &DeviceId) -> Result<DeviceId, Error>;
    /// The device `actor` is bound to, if any (without binding it).
    fn actor_owner(&self, actor: &[u8]) -> Result<Option<DeviceId>, Error>;
    /// How many actors are bound to `device`.
    fn actors_of(&self, device: &DeviceId) -> Result<usize, Error>;
}

/// Per-device health records.
pub trait DeviceRecords {
    /// Stores a device's health record, replacing the last one (not flushed).
    fn save_device(&self, device: &DeviceId, record: &[u8]) -> Result<(), Error>;
    /// Every stored device health record.
    fn devices(&self) -> Result<Vec<Vec<u8>>, Error>;
}

/// Pushes held for a lead's review.
pub trait QuarantineStore {
    /// Holds a quarantined push under `key` (not flushed).
    fn put_quarantine(&self, key: &[u8], item: &[u8]) -> Result<(), Error>;
    /// Visits every quarantined push in key order, one at a time (never all in memory
    /// at once), until `visit` returns `false`.
    fn visit_quarantined(&self, visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), Error>;
    /// The quarantined pushes whose keys start with `prefix` (one device's: bounded by
    /// its quota).
    fn quarantined_with(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, Error>;
    /// Bytes held in quarantine under keys starting with `prefix`.
    fn held_bytes(&self, prefix: &[u8]) -> Result<u64, Error>;
    /// Drops a quarantined push (after it was merged).
    fn drop_quarantine(&self, key: &[u8]) -> Result<(), Error>;
}

/// Everything a relay stores: every concern of this module in one backend.
pub trait RelayStorage:
    Documents + Uploads + ActorBindings + DeviceRecords + QuarantineStore + Send + Sync + 'static
{
}

impl<T> RelayStorage for T where
    T: Documents
        + Uploads
        + ActorBindings
        + DeviceRecords
        + QuarantineStore
        + Send
        + Sync
        + 'static
{
}
