//! An in-memory backend that keeps the durability rule of a disk: writes are visible at
//! once, but only what a [`Documents::flush`] covered survives [`MemoryStorage::crash`].
//! The simulation runs the relay on it; the conformance suite holds it to the same
//! contract as sled.

use std::collections::BTreeMap;
use std::sync::Mutex;

use redline_proto::{DeviceId, DocId};

use super::{
    ActorBindings, DeviceRecords, Documents, KeyValue, QuarantineStore, StoredDoc, Uploads,
};
use crate::Error;

/// Every table of the store.
#[derive(Clone, Default)]
struct Tables {
    snapshots: BTreeMap<DocId, Vec<u8>>,
    chunks: BTreeMap<(DocId, u64), Vec<u8>>,
    feed: BTreeMap<u64, DocId>,
    doc_seq: BTreeMap<(DocId, u64), Vec<[u8; 32]>>,
    uploads: BTreeMap<Vec<u8>, Vec<u8>>,
    upload_times: BTreeMap<Vec<u8>, u64>,
    actors: BTreeMap<Vec<u8>, DeviceId>,
    devices: BTreeMap<DeviceId, Vec<u8>>,
    quarantine: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// One write, kept until a flush makes it durable.
enum Write {
    Commit {
        doc: DocId,
        seq: u64,
        chunk: Vec<u8>,
        heads: Vec<[u8; 32]>,
    },
    Compact {
        doc: DocId,
        snapshot: Vec<u8>,
    },
    Piece {
        key: Vec<u8>,
        data: Vec<u8>,
    },
    DropUpload(Vec<u8>),
    Touch(Vec<u8>, u64),
    Bind(Vec<u8>, DeviceId),
    Device(DeviceId, Vec<u8>),
    Hold(Vec<u8>, Vec<u8>),
    Release(Vec<u8>),
}

impl Tables {
    fn apply(&mut self, w: &Write) {
        match w {
            Write::Commit {
                doc,
                seq,
                chunk,
                heads,
            } => {
                self.chunks.insert((doc.clone(), *seq), chunk.clone());
                self.feed.insert(*seq, doc.clone());
                self.doc_seq.insert((doc.clone(), *seq), heads.clone());
            }
            Write::Compact { doc, snapshot } => {
                self.snapshots.insert(doc.clone(), snapshot.clone());
                let gone: Vec<_> = self.chunk_keys(doc).collect();
                for k in gone {
                    self.chunks.remove(&k);
                }
            }
            Write::Piece { key, data } => self
                .uploads
                .entry(key.clone())
                .or_default()
                .extend_from_slice(data),
            Write::DropUpload(key) => {
                self.uploads.remove(key);
                self.upload_times.remove(key);
            }
            Write::Touch(key, now) => {
                self.upload_times.insert(key.clone(), *now);
            }
            Write::Bind(actor, device) => {
                self.actors.entry(actor.clone()).or_insert(device.clone());
            }
            Write::Device(device, record) => {
                self.devices.insert(device.clone(), record.clone());
            }
            Write::Hold(key, item) => {
                self.quarantine.insert(key.clone(), item.clone());
            }
            Write::Release(key) => {
                self.quarantine.remove(key);
            }
        }
    }

    fn chunk_keys<'a>(&'a self, doc: &'a DocId) -> impl Iterator<Item = (DocId, u64)> + 'a {
        self.chunks
            .range((doc.clone(), 0)..=(doc.clone(), u64::MAX))
            .map(|(k, _)| k.clone())
    }
}

fn with_prefix<'a, V>(
    map: &'a BTreeMap<Vec<u8>, V>,
    prefix: &'a [u8],
) -> impl Iterator<Item = (&'a Vec<u8>, &'a V)> + 'a {
    map.range(prefix.to_vec()..)
        .take_while(move |(k, _)| k.starts_with(prefix))
}

struct State {
    live: Tables,
    durable: Tables,
    journal: Vec<Write>,
}

/// Relay storage in memory, with a disk's durability rule.
pub struct MemoryStorage {
    state: Mutex<State>,
    epoch: u64,
}

impl MemoryStorage {
    /// An empty store with this epoch (the simulation derives it from its seed).
    pub fn new(epoch: u64) -> Self {
        Self {
            state: Mutex::new(State {
                live: Tables::default(),
                durable: Tables::default(),
                journal: Vec::new(),
            }),
            epoch,
        }
    }

    /// Loses every write no flush covered, as a process crash or power cut would.
    pub fn crash(&self) {
        let mut st = self.lock();
        st.journal.clear();
        st.live = st.durable.clone();
    }

    /// Writes not yet covered by a flush.
    pub fn unflushed(&self) -> usize {
        self.lock().journal.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the tables whole (every write is one
        // `apply`), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, w: Write) {
        let mut st = self.lock();
        st.live.apply(&w);
        st.journal.push(w);
    }

    fn read<R>(&self, f: impl FnOnce(&Tables) -> R) -> R {
        f(&self.lock().live)
    }
}

impl Documents for MemoryStorage {
    fn blocks(&self) -> bool {
        false
    }
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn last_seq(&self) -> Result<u64, Error> {
        Ok(self.read(|t| t.feed.keys().next_back().copied().unwrap_or(0)))
    }

    fn load(&self, doc: &DocId) -> Result<Option<StoredDoc>, Error> {
        Ok(self.read(|t| {
            let snapshot = t.snapshots.get(doc).cloned();
            let chunks: Vec<Vec<u8>> = t
                .chunks
                .range((doc.clone(), 0)..=(doc.clone(), u64::MAX))
                .map(|(_, v)| v.clone())
                .collect();
            (snapshot.is_some() || !chunks.is_empty()).then_some(StoredDoc {
                snapshot,
                chunks,
                last_seq: 0,
            })
        }))
    }

    fn commit(&self, doc: &DocId, seq: u64, chunk: &[u8], heads: &[[u8; 32]]) -> Result<(), Error> {
        self.write(Write::Commit {
            doc: doc.clone(),
            seq,
            chunk: chunk.to_vec(),
            heads: heads.to_vec(),
        });
        Ok(())
    }

    fn compact(&self, doc: &DocId, snapshot: &[u8], _covers: u64) -> Result<(), Error> {
        self.write(Write::Compact {
            doc: doc.clone(),
            snapshot: snapshot.to_vec(),
        });
        Ok(())
    }

    fn flush(&self) -> Result<(), Error> {
        let mut st = self.lock();
        let journal = std::mem::take(&mut st.journal);
        for w in &journal {
            st.durable.apply(w);
        }
        Ok(())
    }

    fn feed(&self, after: u64, upto: u64) -> Result<Vec<(u64, DocId)>, Error> {
        if upto <= after {
            return Ok(Vec::new());
        }
        Ok(self.read(|t| {
            t.feed
                .range(after + 1..=upto)
                .map(|(s, d)| (*s, d.clone()))
                .collect()
        }))
    }

    fn heads_at(&self, doc: &DocId, seq: u64) -> Result<Option<Vec<[u8; 32]>>, Error> {
        Ok(self.read(|t| {
            t.doc_seq
                .range((doc.clone(), 0)..=(doc.clone(), seq))
                .next_back()
                .map(|(_, h)| h.clone())
        }))
    }

    fn list(&self) -> Result<Vec<DocId>, Error> {
        Ok(self.read(|t| {
            let mut out: std::collections::BTreeSet<DocId> = t.snapshots.keys().cloned().collect();
            out.extend(t.chunks.keys().map(|(d, _)| d.clone()));
            out.into_iter().collect()
        }))
    }

    fn exists(&self, doc: &DocId) -> Result<bool, Error> {
        Ok(self.read(|t| t.snapshots.contains_key(doc) || t.chunk_keys(doc).next().is_some()))
    }
}

impl Uploads for MemoryStorage {
    fn upload_len(&self, key: &[u8]) -> Result<u64, Error> {
        Ok(self.read(|t| t.uploads.get(key).map_or(0, |v| v.len() as u64)))
    }

    fn put_piece(&self, key: &[u8], offset: u64, data: &[u8]) -> Result<(), Error> {
        let have = self.upload_len(key)?;
        if offset != have {
            return Err(Error::Storage(format!(
                "piece at {offset}, but {have} bytes are held"
            )));
        }
        self.write(Write::Piece {
            key: key.to_vec(),
            data: data.to_vec(),
        });
        Ok(())
    }

    fn upload_bytes(&self, key: &[u8]) -> Result<Vec<u8>, Error> {
        Ok(self.read(|t| t.uploads.get(key).cloned().unwrap_or_default()))
    }

    fn drop_upload(&self, key: &[u8]) -> Result<(), Error> {
        self.write(Write::DropUpload(key.to_vec()));
        Ok(())
    }

    fn touch_upload(&self, key: &[u8], now: u64) -> Result<(), Error> {
        self.write(Write::Touch(key.to_vec(), now));
        Ok(())
    }

    fn staged_bytes(&self, prefix: &[u8]) -> Result<u64, Error> {
        Ok(self.read(|t| {
            with_prefix(&t.uploads, prefix)
                .map(|(_, v)| v.len() as u64)
                .sum()
        }))
    }

    fn expire_uploads(&self, cutoff: u64) -> Result<usize, Error> {
        let stale: Vec<Vec<u8>> = self.read(|t| {
            t.upload_times
                .iter()
                .filter(|(_, at)| **at < cutoff)
                .map(|(k, _)| k.clone())
                .collect()
        });
        for k in &stale {
            self.drop_upload(k)?;
        }
        Ok(stale.len())
    }
}

impl ActorBindings for MemoryStorage {
    fn bind_actor(&self, actor: &[u8], device: &DeviceId) -> Result<DeviceId, Error> {
        // Check and bind under one lock: exactly one device wins a race.
        let mut st = self.lock();
        if let Some(owner) = st.live.actors.get(actor) {
            return Ok(owner.clone());
        }
        let w = Write::Bind(actor.to_vec(), device.clone());
        st.live.apply(&w);
        st.journal.push(w);
        Ok(device.clone())
    }

    fn actor_owner(&self, actor: &[u8]) -> Result<Option<DeviceId>, Error> {
        Ok(self.read(|t| t.actors.get(actor).cloned()))
    }

    fn actors_of(&self, device: &DeviceId) -> Result<usize, Error> {
        Ok(self.read(|t| t.actors.values().filter(|d| *d == device).count()))
    }
}

impl DeviceRecords for MemoryStorage {
    fn save_device(&self, device: &DeviceId, record: &[u8]) -> Result<(), Error> {
        self.write(Write::Device(device.clone(), record.to_vec()));
        Ok(())
    }

    fn devices(&self) -> Result<Vec<Vec<u8>>, Error> {
        Ok(self.read(|t| t.devices.values().cloned().collect()))
    }
}

impl QuarantineStore for MemoryStorage {
    fn put_quarantine(&self, key: &[u8], item: &[u8]) -> Result<(), Error> {
        self.write(Write::Hold(key.to_vec(), item.to_vec()));
        Ok(())
    }

    fn visit_quarantined(&self, visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), Error> {
        // One item at a time, the lock released in between (the visitor may write).
        let mut from: Option<Vec<u8>> = None;
        loop {
            let next = self.read(|t| {
                let mut range = match &from {
                    None => t.quarantine.range::<Vec<u8>, _>(..),
                    Some(k) => t.quarantine.range::<Vec<u8>, _>((
                        std::ops::Bound::Excluded(k.clone()),
                        std::ops::Bound::Unbounded,
                    )),
                };
                range.next().map(|(k, v)| (k.clone(), v.clone()))
            });
            let Some((k, v)) = next else { return Ok(()) };
            if !visit(&k, &v) {
                return Ok(());
            }
            from = Some(k);
        }
    }

    fn quarantined_with(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, Error> {
        Ok(self.read(|t| {
            with_prefix(&t.quarantine, prefix)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }))
    }

    fn held_bytes(&self, prefix: &[u8]) -> Result<u64, Error> {
        Ok(self.read(|t| {
            with_prefix(&t.quarantine, prefix)
                .map(|(_, v)| v.len() as u64)
                .sum()
        }))
    }

    fn drop_quarantine(&self, key: &[u8]) -> Result<(), Error> {
        self.write(Write::Release(key.to_vec()));
        Ok(())
    }
}
