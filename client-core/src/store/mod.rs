//! The device's durable store, behind [`DeviceStore`] so the client runs on sled on phones
//! and on memory in the simulation.
//!
//! What it keeps: documents, the heads the relay is known to hold durably per document
//! (what it acknowledged or sent) and when, documents followed by id, staged download
//! pieces, and small metadata (device identity, feed cursor per relay). Every write that
//! a caller is told succeeded has been flushed, except the two that say otherwise
//! ([`DeviceStore::follow`], [`DeviceStore::drop_transfer`]): the write that caused them
//! flushes.
//!
//! A document is stored as a snapshot (Automerge `save()` bytes) followed by appended
//! chunks (the raw bytes of the changes written or received since), the way the relay
//! stores its own: a write costs what it adds, not the document's size. Loading hands
//! back the snapshot and the chunks as one byte string, which `Automerge::load` takes
//! whole; saving a snapshot drops the chunks it covers ([`wants_compaction`] says when).
//! A store from before chunks simply has none.

mod memory;
mod sled;

pub use self::memory::MemoryStore;
pub use self::sled::SledStore;

use automerge::ChangeHash;
use redline_proto::DocId;

use crate::Error;

/// How a document's bytes are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DocWrite {
    /// A whole document (`save()` bytes): replaces the snapshot and drops every chunk.
    Snapshot(Vec<u8>),
    /// Changes' raw bytes, appended after what is stored.
    Append(Vec<u8>),
}

/// What is stored of one document.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    /// Bytes of the snapshot.
    pub snapshot_bytes: u64,
    /// Chunks appended after it.
    pub chunks: u64,
    /// Their bytes.
    pub chunk_bytes: u64,
}

/// Whether a document's chunks are worth folding into a new snapshot: once they weigh
/// more than the snapshot (and 64 KiB), or number over 1,024. A write then costs a
/// whole save about once per doubling of the document, so it stays off the p99.
pub fn wants_compaction(s: &Stored) -> bool {
    s.chunks > 1_024 || s.chunk_bytes > s.snapshot_bytes.max(64 * 1024)
}

/// What a sync step leaves to persist, written with one flush.
#[derive(Default)]
pub struct SyncBatch {
    /// Documents to write.
    pub docs: Vec<(DocId, DocWrite)>,
    /// New relay-held heads per document.
    pub acked: Vec<(DocId, Vec<ChangeHash>)>,
    /// The new feed cursor (encoded), per relay key.
    pub cursor: Option<(String, Vec<u8>)>,
    /// When the acknowledgements in `acked` arrived (unix ms).
    pub acked_at_ms: i64,
}

impl SyncBatch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty() && self.acked.is_empty() && self.cursor.is_none()
    }
}

/// Where a device keeps its documents and sync state.
pub trait DeviceStore: Send + Sync + 'static {
    /// Makes every write before it durable.
    fn flush(&self) -> Result<(), Error>;
    /// The stored bytes of document `id`: its snapshot, then its chunks in order.
    fn load_doc(&self, id: &DocId) -> Result<Option<Vec<u8>>, Error>;
    /// Stores a whole document durably (a new snapshot; its chunks are dropped).
    fn save_doc(&self, id: &DocId, bytes: &[u8]) -> Result<(), Error>;
    /// Appends changes' raw bytes to document `id` durably; what is stored after.
    fn append_doc(&self, id: &DocId, chunk: &[u8]) -> Result<Stored, Error>;
    /// What is stored of document `id`.
    fn stored(&self, id: &DocId) -> Result<Stored, Error>;
    /// Every stored document, in order.
    fn doc_ids(&self) -> Result<Vec<DocId>, Error>;
    /// When the relay last acknowledged `id` (unix ms).
    fn acked_at(&self, id: &DocId) -> Result<Option<i64>, Error>;
    /// Heads the relay is known to hold for `id`.
    fn acked_heads(&self, id: &DocId) -> Result<Option<Vec<ChangeHash>>, Error>;
    /// Persists what a sync step produced, with one flush.
    fn write_batch(&self, b: &SyncBatch) -> Result<(), Error>;
    /// Records that `id` is followed explicitly (not covered by the subscription's
    /// teams, zones or org). Not flushed on its own: the write that caused it flushes.
    fn follow(&self, id: &DocId) -> Result<(), Error>;
    /// Documents followed explicitly, in order.
    fn follows(&self) -> Result<Vec<DocId>, Error>;
    /// Removes a document and its sync metadata, durably.
    fn remove_doc(&self, id: &DocId) -> Result<(), Error>;
    /// Bytes of incoming transfer `id` held (contiguous from 0).
    fn transfer_len(&self, id: &[u8; 16]) -> Result<u64, Error>;
    /// Stores a piece of incoming transfer `id` durably. Ids are content hashes, so bytes
    /// already held (an earlier attempt's write finishing late) are simply skipped; a gap
    /// is an error.
    fn put_transfer_piece(&self, id: &[u8; 16], offset: u64, data: &[u8]) -> Result<(), Error>;
    /// The bytes of incoming transfer `id` held so far.
    fn transfer_bytes(&self, id: &[u8; 16]) -> Result<Vec<u8>, Error>;
    /// Incoming transfers held in part: id → bytes held, in id order.
    fn partial_transfers(&self) -> Result<Vec<([u8; 16], u64)>, Error>;
    /// Drops incoming transfer `id` (not flushed on its own).
    fn drop_transfer(&self, id: &[u8; 16]) -> Result<(), Error>;
    /// A metadata value.
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, Error>;
    /// Stores a metadata value durably.
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), Error>;
}

/// What of a transfer piece at `offset` to append when `have` bytes are held: ids are
/// content hashes, so bytes already held (an earlier attempt's write finishing late) are
/// skipped (`None`: nothing new); a gap is an error.
pub(crate) fn new_part_of_piece(
    have: u64,
    offset: u64,
    data: &[u8],
) -> Result<Option<&[u8]>, Error> {
    if offset > have {
        return Err(Error::Store(format!(
            "transfer piece at {offset}, but only {have} bytes are held"
        )));
    }
    let skip = (have - offset) as usize;
    Ok((skip < data.len()).then(|| &data[skip..]))
}

/// The key under which the acknowledgement time of `id` is kept.
pub(crate) fn acked_at_key(id: &DocId) -> String {
    format!("acked_at:{id}")
}

#[cfg(test)]
mod conformance;
