//! The device store on phones: sled.
//!
//! Trees: `docs` (document id → snapshot: Automerge `save()` bytes), `chunks` (document
//! id, 0, sequence → changes appended after the snapshot), `chunk_stats` (document id →
//! how many chunks and bytes), `acked` (document id → heads the relay is known to hold
//! durably: what it acknowledged or sent), `follows` (documents followed by id),
//! `transfers` (staged download pieces), `meta` (device identity, feed cursor per relay,
//! acknowledgement times). Stores from before chunks have empty `chunks` trees.
//!
//! Writing a snapshot inserts it, then drops the chunks: a crash in between leaves
//! chunks whose changes the snapshot holds too, which loading applies again harmlessly.

use std::path::{Path, PathBuf};

use automerge::ChangeHash;
use redline_proto::DocId;

use super::{DeviceStore, DocWrite, SyncBatch};
use crate::Error;

/// The device's sled database.
pub struct SledStore {
    db: sled::Db,
    docs: sled::Tree,
    chunks: sled::Tree,
    chunk_stats: sled::Tree,
    acked: sled::Tree,
    follows: sled::Tree,
    transfers: sled::Tree,
    meta: sled::Tree,
    dir: PathBuf,
}

fn err(e: sled::Error) -> Error {
    Error::Sled(e)
}

/// The keys of `tree`, as document ids.
fn doc_id_keys(tree: &sled::Tree) -> Result<Vec<DocId>, Error> {
    tree.iter()
        .keys()
        .map(|k| {
            let k = k.map_err(err)?;
            let s = std::str::from_utf8(&k).map_err(|_| Error::Store("non-UTF-8 key".into()))?;
            Ok(DocId::parse(s)?)
        })
        .collect()
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let db = sled::Config::new().path(dir).open().map_err(|e| {
            Error::Store(format!(
                "cannot open the store in {} ({e}); is another Redline client using it?",
                dir.display()
            ))
        })?;
        Ok(Self {
            docs: db.open_tree("docs").map_err(err)?,
            chunks: db.open_tree("chunks").map_err(err)?,
            chunk_stats: db.open_tree("chunk_stats").map_err(err)?,
            acked: db.open_tree("acked").map_err(err)?,
            follows: db.open_tree("follows").map_err(err)?,
            transfers: db.open_tree("transfers").map_err(err)?,
            meta: db.open_tree("meta").map_err(err)?,
            db,
            dir: dir.to_path_buf(),
        })
    }
}

impl SledStore {
    /// The directory the store lives in.
    pub fn path(&self) -> PathBuf {
        self.dir.clone()
    }

    /// `(chunks, bytes)` appended to `id`.
    fn chunk_stats(&self, id: &DocId) -> Result<(u64, u64), Error> {
        Ok(match self.chunk_stats.get(id.as_str()).map_err(err)? {
            Some(v) if v.len() == 16 => (
                u64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
                u64::from_be_bytes(v[8..].try_into().expect("8 bytes")),
            ),
            _ => (0, 0),
        })
    }

    /// Writes a snapshot of `id` and drops its chunks (not flushed).
    fn put_snapshot(&self, id: &DocId, bytes: &[u8]) -> Result<(), Error> {
        self.docs.insert(id.as_str(), bytes).map_err(err)?;
        self.drop_chunks(id)
    }

    fn drop_chunks(&self, id: &DocId) -> Result<(), Error> {
        for k in self.chunks.scan_prefix(chunk_prefix(id)).keys() {
            self.chunks.remove(k.map_err(err)?).map_err(err)?;
        }
        self.chunk_stats.remove(id.as_str()).map_err(err)?;
        Ok(())
    }

    /// Appends a chunk to `id` (not flushed).
    fn put_chunk(&self, id: &DocId, chunk: &[u8]) -> Result<(), Error> {
        let prefix = chunk_prefix(id);
        let next = match self.chunks.scan_prefix(&prefix).keys().next_back() {
            Some(k) => {
                let k = k.map_err(err)?;
                let seq: [u8; 8] = k[prefix.len()..]
                    .try_into()
                    .map_err(|_| Error::Store(format!("corrupt chunk key for {id}")))?;
                u64::from_be_bytes(seq) + 1
            }
            None => 0,
        };
        let mut key = prefix;
        key.extend_from_slice(&next.to_be_bytes());
        self.chunks.insert(key, chunk).map_err(err)?;
        let (n, bytes) = self.chunk_stats(id)?;
        let mut stats = (n + 1).to_be_bytes().to_vec();
        stats.extend_from_slice(&(bytes + chunk.len() as u64).to_be_bytes());
        self.chunk_stats.insert(id.as_str(), stats).map_err(err)?;
        Ok(())
    }
}

/// Keys of `id`'s chunks start with this.
fn chunk_prefix(id: &DocId) -> Vec<u8> {
    let mut p = id.as_str().as_bytes().to_vec();
    p.push(0);
    p
}

impl DeviceStore for SledStore {
    fn flush(&self) -> Result<(), Error> {
        self.db.flush().map(|_| ()).map_err(err)
    }

    fn load_doc(&self, id: &DocId) -> Result<Option<Vec<u8>>, Error> {
        let Some(snapshot) = self.docs.get(id.as_str()).map_err(err)? else {
            return Ok(None);
        };
        let mut bytes = snapshot.to_vec();
        for chunk in self.chunks.scan_prefix(chunk_prefix(id)).values() {
            bytes.extend_from_slice(&chunk.map_err(err)?);
        }
        Ok(Some(bytes))
    }

    /// Stores a document durably.
    fn save_doc(&self, id: &DocId, bytes: &[u8]) -> Result<(), Error> {
        self.put_snapshot(id, bytes)?;
        self.flush()
    }

    fn append_doc(&self, id: &DocId, chunk: &[u8]) -> Result<super::Stored, Error> {
        self.put_chunk(id, chunk)?;
        self.flush()?;
        self.stored(id)
    }

    fn stored(&self, id: &DocId) -> Result<super::Stored, Error> {
        let snapshot_bytes = self
            .docs
            .get(id.as_str())
            .map_err(err)?
            .map_or(0, |v| v.len() as u64);
        let (chunks, chunk_bytes) = self.chunk_stats(id)?;
        Ok(super::Stored {
            snapshot_bytes,
            chunks,
            chunk_bytes,
        })
    }

    fn doc_ids(&self) -> Result<Vec<DocId>, Error> {
        doc_id_keys(&self.docs)
    }

    /// When the relay last acknowledged `id` (unix ms).
    fn acked_at(&self, id: &DocId) -> Result<Option<i64>, Error> {
        Ok(self
            .meta
            .get(super::acked_at_key(id))
            .map_err(err)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(i64::from_be_bytes))
    }

    /// Heads the relay is known to hold for `id`.
    fn acked_heads(&self, id: &DocId) -> Result<Option<Vec<ChangeHash>>, Error> {
        let Some(v) = self.acked.get(id.as_str()).map_err(err)? else {
            return Ok(None);
        };
        let heads = v
            .chunks(32)
            .map(|c| {
                <[u8; 32]>::try_from(c)
                    .map(ChangeHash)
                    .map_err(|_| Error::Store(format!("corrupt acked heads for {id}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(heads))
    }

    /// Persists what a sync step produced, with one flush.
    fn write_batch(&self, b: &SyncBatch) -> Result<(), Error> {
        for (id, write) in &b.docs {
            match write {
                DocWrite::Snapshot(bytes) => self.put_snapshot(id, bytes)?,
                DocWrite::Append(chunk) => self.put_chunk(id, chunk)?,
            }
        }
        for (id, heads) in &b.acked {
            let flat: Vec<u8> = heads.iter().flat_map(|h| h.0).collect();
            self.acked.insert(id.as_str(), flat).map_err(err)?;
            self.meta
                .insert(super::acked_at_key(id), &b.acked_at_ms.to_be_bytes())
                .map_err(err)?;
        }
        if let Some((key, cursor)) = &b.cursor {
            self.meta
                .insert(key.as_str(), cursor.as_slice())
                .map_err(err)?;
        }
        self.flush()
    }

    /// Records that `id` is followed explicitly (not covered by the subscription's
    /// teams, zones or org). Not flushed on its own: the write that caused it flushes.
    fn follow(&self, id: &DocId) -> Result<(), Error> {
        self.follows.insert(id.as_str(), &[]).map_err(err)?;
        Ok(())
    }

    /// Documents followed explicitly.
    fn follows(&self) -> Result<Vec<DocId>, Error> {
        doc_id_keys(&self.follows)
    }

    /// Removes a document and its sync metadata, durably.
    fn remove_doc(&self, id: &DocId) -> Result<(), Error> {
        self.docs.remove(id.as_str()).map_err(err)?;
        self.drop_chunks(id)?;
        self.acked.remove(id.as_str()).map_err(err)?;
        self.follows.remove(id.as_str()).map_err(err)?;
        self.flush()
    }

    /// Bytes of incoming transfer `id` held (contiguous from 0).
    fn transfer_len(&self, id: &[u8; 16]) -> Result<u64, Error> {
        self.transfers
            .scan_prefix(id)
            .values()
            .map(|v| v.map(|v| v.len() as u64))
            .sum::<Result<u64, _>>()
            .map_err(err)
    }

    /// Stores a piece of incoming transfer `id` durably. Ids are content hashes, so bytes
    /// already held (an earlier attempt's write finishing late) are simply skipped; a gap
    /// is an error.
    fn put_transfer_piece(&self, id: &[u8; 16], offset: u64, data: &[u8]) -> Result<(), Error> {
        let have = self.transfer_len(id)?;
        let Some(new) = super::new_part_of_piece(have, offset, data)? else {
            return Ok(());
        };
        let mut key = id.to_vec();
        key.extend_from_slice(&have.to_be_bytes());
        self.transfers.insert(key, new).map_err(err)?;
        self.flush()
    }

    /// The bytes of incoming transfer `id` held so far.
    fn transfer_bytes(&self, id: &[u8; 16]) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        for v in self.transfers.scan_prefix(id).values() {
            out.extend_from_slice(&v.map_err(err)?);
        }
        Ok(out)
    }

    /// Incoming transfers held in part: id → bytes held.
    fn partial_transfers(&self) -> Result<Vec<([u8; 16], u64)>, Error> {
        let mut out: Vec<([u8; 16], u64)> = Vec::new();
        for kv in self.transfers.iter() {
            let (k, v) = kv.map_err(err)?;
            let Ok(id) = <[u8; 16]>::try_from(&k[..16.min(k.len())]) else {
                continue;
            };
            match out.last_mut() {
                Some((last, n)) if *last == id => *n += v.len() as u64,
                _ => out.push((id, v.len() as u64)),
            }
        }
        Ok(out)
    }

    /// Drops incoming transfer `id`.
    fn drop_transfer(&self, id: &[u8; 16]) -> Result<(), Error> {
        for k in self.transfers.scan_prefix(id).keys() {
            self.transfers.remove(k.map_err(err)?).map_err(err)?;
        }
        Ok(())
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.meta.get(key).map_err(err)?.map(|v| v.to_vec()))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        self.meta.insert(key, value).map_err(err)?;
        self.flush()
    }
}
