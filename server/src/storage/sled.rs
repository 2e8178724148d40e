//! The embedded default backend: sled trees in the relay's data directory.

use std::path::{Path, PathBuf};

use redline_proto::{DeviceId, DocId};

use super::{
    ActorBindings, DeviceRecords, Documents, KeyValue, QuarantineStore, StoredDoc, Uploads, flat,
    unflat,
};
use crate::Error;

/// Bytes sled may cache (its default is 1 GiB).
const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// sled-backed storage.
#[derive(Clone)]
pub struct SledStorage {
    db: sled::Db,
    snapshots: sled::Tree,
    chunks: sled::Tree,
    feed: sled::Tree,
    doc_seq: sled::Tree,
    uploads: sled::Tree,
    /// Upload key → when it was last worked on (Unix seconds, big-endian).
    upload_times: sled::Tree,
    actors: sled::Tree,
    devices: sled::Tree,
    quarantine: sled::Tree,
    epoch: u64,
    dir: PathBuf,
}

fn storage_err(e: sled::Error) -> Error {
    Error::Sled(e)
}

/// A failed multi-tree transaction: sled's own error keeps its source.
fn transaction_err(e: sled::transaction::TransactionError<()>) -> Error {
    match e {
        sled::transaction::TransactionError::Storage(e) => Error::Sled(e),
        sled::transaction::TransactionError::Abort(()) => {
            Error::Storage("transaction aborted".into())
        }
    }
}

/// `doc \0 seq` keys sort by document, then sequence.
fn doc_key(doc: &DocId, n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(doc.as_str().len() + 9);
    k.extend_from_slice(doc.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn doc_prefix(doc: &DocId) -> Vec<u8> {
    let mut k = doc.as_str().as_bytes().to_vec();
    k.push(0);
    k
}

/// The device an actor binding names.
fn bound_device(stored: &[u8]) -> Result<DeviceId, Error> {
    let owner =
        std::str::from_utf8(stored).map_err(|_| Error::Storage("corrupt actor binding".into()))?;
    DeviceId::new(owner).map_err(|e| Error::Storage(format!("corrupt actor binding: {e}")))
}

impl SledStorage {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        // sled caches up to 1 GiB of pages by default; the relay has its own document
        // cache, so sled's stays small.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
            .map_err(|e| {
                Error::Storage(format!(
                    "cannot open {}: {e}; is another relay using this data dir?",
                    dir.display()
                ))
            })?;
        let meta = db.open_tree("meta").map_err(storage_err)?;
        let epoch = match meta.get("epoch").map_err(storage_err)? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| Error::Storage("corrupt epoch".into()))?,
            ),
            None => {
                let e = rand_epoch();
                meta.insert("epoch", &e.to_be_bytes())
                    .map_err(storage_err)?;
                db.flush().map_err(storage_err)?;
                e
            }
        };
        Ok(Self {
            snapshots: db.open_tree("snapshots").map_err(storage_err)?,
            chunks: db.open_tree("chunks").map_err(storage_err)?,
            feed: db.open_tree("feed").map_err(storage_err)?,
            doc_seq: db.open_tree("doc_seq").map_err(storage_err)?,
            uploads: db.open_tree("uploads").map_err(storage_err)?,
            upload_times: db.open_tree("upload_times").map_err(storage_err)?,
            actors: db.open_tree("actors").map_err(storage_err)?,
            devices: db.open_tree("devices").map_err(storage_err)?,
            quarantine: db.open_tree("quarantine").map_err(storage_err)?,
            db,
            epoch,
            dir: dir.to_path_buf(),
        })
    }
}

impl SledStorage {
    /// The directory the store lives in.
    pub fn path(&self) -> PathBuf {
        self.dir.clone()
    }
}

fn rand_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; mixing in the time guards against a fixed seed.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() | 1
}

impl Documents for SledStorage {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn describe(&self) -> String {
        format!("sled {}", self.dir.display())
    }

    fn last_seq(&self) -> Result<u64, Error> {
        Ok(match self.feed.last().map_err(storage_err)? {
            Some((k, _)) => u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| Error::Storage("corrupt feed key".into()))?,
            ),
            None => 0,
        })
    }

    fn load(&self, doc: &DocId) -> Result<Option<StoredDoc>, Error> {
        let snapshot = self
            .snapshots
            .get(doc.as_str())
            .map_err(storage_err)?
            .map(|v| v.to_vec());
        let chunks: Vec<Vec<u8>> = self
            .chunks
            .scan_prefix(doc_prefix(doc))
            .values()
            .map(|v| v.map(|v| v.to_vec()).map_err(storage_err))
            .collect::<Result<_, _>>()?;
        if snapshot.is_none() && chunks.is_empty() {
            return Ok(None);
        }
        Ok(Some(StoredDoc {
            snapshot,
            chunks,
            last_seq: 0,
        }))
    }

    fn commit(&self, doc: &DocId, seq: u64, chunk: &[u8], heads: &[[u8; 32]]) -> Result<(), Error> {
        use sled::Transactional;
        let key = doc_key(doc, seq);
        let heads = flat(heads);
        (&self.chunks, &self.feed, &self.doc_seq)
            .transaction(|(chunks, feed, doc_seq)| {
                chunks.insert(key.as_slice(), chunk)?;
                feed.insert(&seq.to_be_bytes(), doc.as_str().as_bytes())?;
                doc_seq.insert(key.as_slice(), heads.as_slice())?;
                Ok(())
            })
            .map_err(transaction_err)
    }

    fn compact(&self, doc: &DocId, snapshot: &[u8], _covers: u64) -> Result<(), Error> {
        use sled::Transactional;
        let keys: Vec<sled::IVec> = self
            .chunks
            .scan_prefix(doc_prefix(doc))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(storage_err)?;
        (&self.snapshots, &self.chunks)
            .transaction(|(snapshots, chunks)| {
                snapshots.insert(doc.as_str(), snapshot)?;
                for k in &keys {
                    chunks.remove(k)?;
                }
                Ok(())
            })
            .map_err(transaction_err)
    }

    fn flush(&self) -> Result<(), Error> {
        self.db.flush().map(|_| ()).map_err(storage_err)
    }

    fn feed(&self, after: u64, upto: u64) -> Result<Vec<(u64, DocId)>, Error> {
        if upto <= after {
            return Ok(Vec::new());
        }
        let start = (after + 1).to_be_bytes();
        let end = upto.to_be_bytes();
        let mut out = Vec::new();
        for kv in self.feed.range(start..=end) {
            let (k, v) = kv.map_err(storage_err)?;
            let seq = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| Error::Storage("corrupt feed key".into()))?,
            );
            let doc =
                std::str::from_utf8(&v).map_err(|_| Error::Storage("corrupt feed entry".into()))?;
            out.push((seq, DocId::parse(doc)?));
        }
        Ok(out)
    }

    fn heads_at(&self, doc: &DocId, seq: u64) -> Result<Option<Vec<[u8; 32]>>, Error> {
        let lo = doc_key(doc, 0);
        let hi = doc_key(doc, seq);
        Ok(self
            .doc_seq
            .range(lo..=hi)
            .next_back()
            .transpose()
            .map_err(storage_err)?
            .map(|(_, v)| unflat(&v)))
    }

    fn list(&self) -> Result<Vec<DocId>, Error> {
        let parse = |k: &[u8]| -> Result<DocId, Error> {
            Ok(DocId::parse(
                std::str::from_utf8(k).map_err(|_| Error::Storage("non-UTF-8 key".into()))?,
            )?)
        };
        let mut out = std::collections::BTreeSet::new();
        for k in self.snapshots.iter().keys() {
            out.insert(parse(&k.map_err(storage_err)?)?);
        }
        // Documents not compacted yet exist only as chunks: jump from one document's
        // chunks to the next one's, rather than reading every chunk key.
        let mut from: Vec<u8> = Vec::new();
        while let Some(kv) = self.chunks.range(from.as_slice()..).next() {
            let (k, _) = kv.map_err(storage_err)?;
            let name = k.split(|b| *b == 0).next().unwrap_or_default().to_vec();
            out.insert(parse(&name)?);
            // The first key after every `name \0 ...` key.
            from = name;
            from.push(1);
        }
        Ok(out.into_iter().collect())
    }

    fn exists(&self, doc: &DocId) -> Result<bool, Error> {
        Ok(self
            .snapshots
            .contains_key(doc.as_str())
            .map_err(storage_err)?
            || self
                .chunks
                .scan_prefix(doc_prefix(doc))
                .keys()
                .next()
                .transpose()
                .map_err(storage_err)?
                .is_some())
    }
}

impl Uploads for SledStorage {
    fn upload_len(&self, key: &[u8]) -> Result<u64, Error> {
        let mut prefix = key.to_vec();
        prefix.push(0);
        self.uploads
            .scan_prefix(&prefix)
            .values()
            .map(|v| v.map(|v| v.len() as u64))
            .sum::<Result<u64, _>>()
            .map_err(storage_err)
    }

    fn put_piece(&self, key: &[u8], offset: u64, data: &[u8]) -> Result<(), Error> {
        let have = self.upload_len(key)?;
        if offset != have {
            return Err(Error::Storage(format!(
                "piece at {offset}, but {have} bytes are held"
            )));
        }
        let mut k = key.to_vec();
        k.push(0);
        k.extend_from_slice(&offset.to_be_bytes());
        self.uploads.insert(k, data).map_err(storage_err)?;
        Ok(())
    }

    fn upload_bytes(&self, key: &[u8]) -> Result<Vec<u8>, Error> {
        let mut prefix = key.to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for v in self.uploads.scan_prefix(&prefix).values() {
            out.extend_from_slice(&v.map_err(storage_err)?);
        }
        Ok(out)
    }

    fn drop_upload(&self, key: &[u8]) -> Result<(), Error> {
        let mut prefix = key.to_vec();
        prefix.push(0);
        for k in self.uploads.scan_prefix(&prefix).keys() {
            self.uploads
                .remove(k.map_err(storage_err)?)
                .map_err(storage_err)?;
        }
        self.upload_times.remove(key).map_err(storage_err)?;
        Ok(())
    }

    fn touch_upload(&self, key: &[u8], now: u64) -> Result<(), Error> {
        self.upload_times
            .insert(key, &now.to_be_bytes())
            .map_err(storage_err)?;
        Ok(())
    }

    fn staged_bytes(&self, prefix: &[u8]) -> Result<u64, Error> {
        self.uploads
            .scan_prefix(prefix)
            .values()
            .map(|v| v.map(|v| v.len() as u64))
            .sum::<Result<u64, _>>()
            .map_err(storage_err)
    }

    fn expire_uploads(&self, cutoff: u64) -> Result<usize, Error> {
        let mut stale = Vec::new();
        for kv in self.upload_times.iter() {
            let (k, v) = kv.map_err(storage_err)?;
            let at = <[u8; 8]>::try_from(v.as_ref())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if at < cutoff {
                stale.push(k);
            }
        }
        for k in &stale {
            self.drop_upload(k)?;
        }
        Ok(stale.len())
    }
}

impl ActorBindings for SledStorage {
    fn bind_actor(&self, actor: &[u8], device: &DeviceId) -> Result<DeviceId, Error> {
        let owner = match self
            .actors
            .compare_and_swap(
                actor,
                None as Option<&[u8]>,
                Some(device.as_str().as_bytes()),
            )
            .map_err(storage_err)?
        {
            Ok(()) => return Ok(device.clone()),
            Err(cas) => cas.current.unwrap_or_default(),
        };
        bound_device(&owner)
    }

    fn actors_of(&self, device: &DeviceId) -> Result<usize, Error> {
        let mut n = 0;
        for v in self.actors.iter().values() {
            if v.map_err(storage_err)?.as_ref() == device.as_str().as_bytes() {
                n += 1;
            }
        }
        Ok(n)
    }

    fn actor_owner(&self, actor: &[u8]) -> Result<Option<DeviceId>, Error> {
        self.actors
            .get(actor)
            .map_err(storage_err)?
            .map(|v| bound_device(&v))
            .transpose()
    }
}

impl DeviceRecords for SledStorage {
    fn save_device(&self, device: &DeviceId, record: &[u8]) -> Result<(), Error> {
        self.devices
            .insert(device.as_str(), record)
            .map_err(storage_err)?;
        Ok(())
    }

    fn devices(&self) -> Result<Vec<Vec<u8>>, Error> {
        self.devices
            .iter()
            .values()
            .map(|v| v.map(|v| v.to_vec()).map_err(storage_err))
            .collect()
    }
}

impl QuarantineStore for SledStorage {
    fn put_quarantine(&self, key: &[u8], item: &[u8]) -> Result<(), Error> {
        self.quarantine.insert(key, item).map_err(storage_err)?;
        Ok(())
    }

    fn visit_quarantined(&self, visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), Error> {
        for kv in self.quarantine.iter() {
            let (k, v) = kv.map_err(storage_err)?;
            if !visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn quarantined_with(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, Error> {
        self.quarantine
            .scan_prefix(prefix)
            .map(|kv| {
                kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(storage_err)
            })
            .collect()
    }

    fn held_bytes(&self, prefix: &[u8]) -> Result<u64, Error> {
        self.quarantine
            .scan_prefix(prefix)
            .values()
            .map(|v| v.map(|v| v.len() as u64))
            .sum::<Result<u64, _>>()
            .map_err(storage_err)
    }

    fn drop_quarantine(&self, key: &[u8]) -> Result<(), Error> {
        self.quarantine.remove(key).map_err(storage_err)?;
        Ok(())
    }
}
