//! A device store in memory with a disk's durability rule: writes are visible at once,
//! but only what a flush covered survives [`MemoryStore::crash`]. Used by the simulation;
//! held to the same contract as sled by the store tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use automerge::ChangeHash;
use redline_proto::DocId;

use super::{DeviceStore, DocWrite, Stored, SyncBatch};
use crate::Error;

/// Large values sit behind `Arc`, so taking a durable copy costs per entry, not per byte.
#[derive(Clone, Default)]
struct Tables {
    docs: BTreeMap<DocId, Arc<Vec<u8>>>,
    /// Chunks appended after each snapshot.
    chunks: BTreeMap<DocId, Vec<Arc<Vec<u8>>>>,
    acked: BTreeMap<DocId, Vec<ChangeHash>>,
    follows: BTreeMap<DocId, ()>,
    /// Transfer id → bytes held (contiguous from 0).
    transfers: BTreeMap<[u8; 16], Arc<Vec<u8>>>,
    meta: BTreeMap<String, Vec<u8>>,
}

impl Tables {
    fn snapshot(&mut self, id: &DocId, bytes: Vec<u8>) {
        self.docs.insert(id.clone(), Arc::new(bytes));
        self.chunks.remove(id);
    }

    fn append(&mut self, id: &DocId, chunk: Vec<u8>) {
        self.chunks
            .entry(id.clone())
            .or_default()
            .push(Arc::new(chunk));
    }
}

#[derive(Default)]
struct State {
    live: Tables,
    durable: Tables,
}

/// A device store in memory.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loses every write no flush covered, as the phone's battery running out would.
    pub fn crash(&self) {
        let mut st = self.lock();
        st.live = st.durable.clone();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every write is one step on the tables: a poisoned lock still holds whole ones.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, flush: bool, f: impl FnOnce(&mut Tables)) {
        let mut st = self.lock();
        f(&mut st.live);
        if flush {
            st.durable = st.live.clone();
        }
    }

    fn read<R>(&self, f: impl FnOnce(&Tables) -> R) -> R {
        f(&self.lock().live)
    }
}

impl DeviceStore for MemoryStore {
    fn flush(&self) -> Result<(), Error> {
        self.write(true, |_| ());
        Ok(())
    }

    fn load_doc(&self, id: &DocId) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.read(|t| {
            let mut bytes = t.docs.get(id)?.to_vec();
            for c in t.chunks.get(id).into_iter().flatten() {
                bytes.extend_from_slice(c);
            }
            Some(bytes)
        }))
    }

    fn save_doc(&self, id: &DocId, bytes: &[u8]) -> Result<(), Error> {
        self.write(true, |t| t.snapshot(id, bytes.to_vec()));
        Ok(())
    }

    fn append_doc(&self, id: &DocId, chunk: &[u8]) -> Result<Stored, Error> {
        self.write(true, |t| t.append(id, chunk.to_vec()));
        self.stored(id)
    }

    fn stored(&self, id: &DocId) -> Result<Stored, Error> {
        Ok(self.read(|t| Stored {
            snapshot_bytes: t.docs.get(id).map_or(0, |d| d.len() as u64),
            chunks: t.chunks.get(id).map_or(0, |c| c.len() as u64),
            chunk_bytes: t
                .chunks
                .get(id)
                .map_or(0, |c| c.iter().map(|b| b.len() as u64).sum()),
        }))
    }

    fn doc_ids(&self) -> Result<Vec<DocId>, Error> {
        Ok(self.read(|t| t.docs.keys().cloned().collect()))
    }

    fn acked_at(&self, id: &DocId) -> Result<Option<i64>, Error> {
        Ok(self.read(|t| {
            t.meta
                .get(&super::acked_at_key(id))
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map(i64::from_be_bytes)
        }))
    }

    fn acked_heads(&self, id: &DocId) -> Result<Option<Vec<ChangeHash>>, Error> {
        Ok(self.read(|t| t.acked.get(id).cloned()))
    }

    fn write_batch(&self, b: &SyncBatch) -> Result<(), Error> {
        self.write(true, |t| {
            for (id, write) in &b.docs {
                match write {
                    DocWrite::Snapshot(bytes) => t.snapshot(id, bytes.clone()),
                    DocWrite::Append(chunk) => t.append(id, chunk.clone()),
                }
            }
            for (id, heads) in &b.acked {
                t.acked.insert(id.clone(), heads.clone());
                t.meta.insert(
                    super::acked_at_key(id),
                    b.acked_at_ms.to_be_bytes().to_vec(),
                );
            }
            if let Some((key, cursor)) = &b.cursor {
                t.meta.insert(key.clone(), cursor.clone());
            }
        });
        Ok(())
    }

    fn follow(&self, id: &DocId) -> Result<(), Error> {
        self.write(false, |t| {
            t.follows.insert(id.clone(), ());
        });
        Ok(())
    }

    fn follows(&self) -> Result<Vec<DocId>, Error> {
        Ok(self.read(|t| t.follows.keys().cloned().collect()))
    }

    fn remove_doc(&self, id: &DocId) -> Result<(), Error> {
        self.write(true, |t| {
            t.docs.remove(id);
            t.chunks.remove(id);
            t.acked.remove(id);
            t.follows.remove(id);
        });
        Ok(())
    }

    fn transfer_len(&self, id: &[u8; 16]) -> Result<u64, Error> {
        Ok(self.read(|t| t.transfers.get(id).map_or(0, |v| v.len() as u64)))
    }

    fn put_transfer_piece(&self, id: &[u8; 16], offset: u64, data: &[u8]) -> Result<(), Error> {
        let have = self.transfer_len(id)?;
        let Some(new) = super::new_part_of_piece(have, offset, data)? else {
            return Ok(());
        };
        self.write(true, |t| {
            Arc::make_mut(t.transfers.entry(*id).or_default()).extend_from_slice(new);
        });
        Ok(())
    }

    fn transfer_bytes(&self, id: &[u8; 16]) -> Result<Vec<u8>, Error> {
        Ok(self.read(|t| t.transfers.get(id).map(|v| v.to_vec()).unwrap_or_default()))
    }

    fn partial_transfers(&self) -> Result<Vec<([u8; 16], u64)>, Error> {
        Ok(self.read(|t| {
            t.transfers
                .iter()
                .map(|(id, v)| (*id, v.len() as u64))
                .collect()
        }))
    }

    fn drop_transfer(&self, id: &[u8; 16]) -> Result<(), Error> {
        self.write(false, |t| {
            t.transfers.remove(id);
        });
        Ok(())
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.read(|t| t.meta.get(key).cloned()))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        self.write(true, |t| {
            t.meta.insert(key.to_string(), value.to_vec());
        });
        Ok(())
    }
}
