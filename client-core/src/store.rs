//! The device's durable store, in sled.
//!
//! Trees: `docs` (document id → Automerge `save()` bytes), `sync` (document id → encoded
//! Automerge sync state for the relay), `acked` (document id → the relay's durable heads),
//! `meta` (device identity). Every write that a caller is told succeeded has been flushed.

use std::path::Path;

use automerge::ChangeHash;
use redline_proto::DocId;

use crate::Error;

/// The device's sled database.
pub(crate) struct Store {
    db: sled::Db,
    docs: sled::Tree,
    sync: sled::Tree,
    acked: sled::Tree,
    meta: sled::Tree,
}

fn err(e: sled::Error) -> Error {
    Error::Store(e.to_string())
}

/// What a finished sync leaves to persist for one document.
pub(crate) struct SyncRecord<'a> {
    pub id: &'a DocId,
    pub doc_bytes: Option<Vec<u8>>,
    pub sync_state: Vec<u8>,
    pub acked_heads: Option<&'a [ChangeHash]>,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let db = sled::Config::new().path(dir).open().map_err(|e| {
            Error::Store(format!(
                "cannot open the store in {} ({e}); is another Redline client using it?",
                dir.display()
            ))
        })?;
        Ok(Self {
            docs: db.open_tree("docs").map_err(err)?,
            sync: db.open_tree("sync").map_err(err)?,
            acked: db.open_tree("acked").map_err(err)?,
            meta: db.open_tree("meta").map_err(err)?,
            db,
        })
    }

    fn flush(&self) -> Result<(), Error> {
        self.db.flush().map(|_| ()).map_err(err)
    }

    pub fn load_doc(&self, id: &DocId) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.docs.get(id.as_str()).map_err(err)?.map(|v| v.to_vec()))
    }

    /// Stores a document durably.
    pub fn save_doc(&self, id: &DocId, bytes: &[u8]) -> Result<(), Error> {
        self.docs.insert(id.as_str(), bytes).map_err(err)?;
        self.flush()
    }

    pub fn doc_ids(&self) -> Result<Vec<DocId>, Error> {
        self.docs
            .iter()
            .keys()
            .map(|k| {
                let k = k.map_err(err)?;
                let s =
                    std::str::from_utf8(&k).map_err(|_| Error::Store("non-UTF-8 key".into()))?;
                Ok(DocId::parse(s)?)
            })
            .collect()
    }

    pub fn sync_state(&self, id: &DocId) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.sync.get(id.as_str()).map_err(err)?.map(|v| v.to_vec()))
    }

    pub fn acked_heads(&self, id: &DocId) -> Result<Option<Vec<ChangeHash>>, Error> {
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

    /// Persists what a sync produced, with one flush for all documents.
    pub fn save_sync_results(&self, records: &[SyncRecord<'_>]) -> Result<(), Error> {
        for r in records {
            if let Some(bytes) = &r.doc_bytes {
                self.docs
                    .insert(r.id.as_str(), bytes.as_slice())
                    .map_err(err)?;
            }
            self.sync
                .insert(r.id.as_str(), r.sync_state.as_slice())
                .map_err(err)?;
            if let Some(heads) = r.acked_heads {
                let flat: Vec<u8> = heads.iter().flat_map(|h| h.0).collect();
                self.acked.insert(r.id.as_str(), flat).map_err(err)?;
            }
        }
        self.flush()
    }

    /// Removes a document and its sync metadata, durably.
    pub fn remove_doc(&self, id: &DocId) -> Result<(), Error> {
        self.docs.remove(id.as_str()).map_err(err)?;
        self.sync.remove(id.as_str()).map_err(err)?;
        self.acked.remove(id.as_str()).map_err(err)?;
        self.flush()
    }

    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.meta.get(key).map_err(err)?.map(|v| v.to_vec()))
    }

    pub fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        self.meta.insert(key, value).map_err(err)?;
        self.flush()
    }
}
