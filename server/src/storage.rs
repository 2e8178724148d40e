//! Durable document storage behind a trait, so another engine can replace sled.
//!
//! Documents are stored as Automerge's compressed `save()` form. [`DocStorage::store`]
//! returns only once the bytes are flushed to disk: the relay acknowledges after it.
//! All methods block; the relay calls them off the async worker threads.

use std::path::Path;

use redline_proto::DocId;

use crate::Error;

/// Where the relay keeps documents.
pub trait DocStorage: Send + Sync + 'static {
    /// The stored bytes of `doc`, if any.
    fn load(&self, doc: &DocId) -> Result<Option<Vec<u8>>, Error>;
    /// Replaces the stored bytes of `doc`; durable when this returns `Ok`.
    fn store(&self, doc: &DocId, bytes: &[u8]) -> Result<(), Error>;
    /// Every stored document id.
    fn list(&self) -> Result<Vec<DocId>, Error>;
    /// Flushes anything buffered.
    fn flush(&self) -> Result<(), Error>;
}

/// sled-backed storage: one tree of documents keyed by id.
#[derive(Clone)]
pub struct SledStorage {
    db: sled::Db,
    docs: sled::Tree,
}

fn storage_err(e: sled::Error) -> Error {
    Error::Storage(e.to_string())
}

impl SledStorage {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|e| Error::Storage(format!("cannot open {}: {e}", dir.display())))?;
        let docs = db.open_tree("docs").map_err(storage_err)?;
        Ok(Self { db, docs })
    }
}

impl DocStorage for SledStorage {
    fn load(&self, doc: &DocId) -> Result<Option<Vec<u8>>, Error> {
        Ok(self
            .docs
            .get(doc.as_str())
            .map_err(storage_err)?
            .map(|v| v.to_vec()))
    }

    fn store(&self, doc: &DocId, bytes: &[u8]) -> Result<(), Error> {
        self.docs.insert(doc.as_str(), bytes).map_err(storage_err)?;
        self.db.flush().map_err(storage_err)?;
        Ok(())
    }

    fn list(&self) -> Result<Vec<DocId>, Error> {
        self.docs
            .iter()
            .keys()
            .map(|k| {
                let k = k.map_err(storage_err)?;
                let s = std::str::from_utf8(&k)
                    .map_err(|_| Error::Storage("non-UTF-8 document key".into()))?;
                DocId::parse(s).map_err(Error::from)
            })
            .collect()
    }

    fn flush(&self) -> Result<(), Error> {
        self.db.flush().map(|_| ()).map_err(storage_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_documents_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let id = DocId::parse("ledger/t1/2026-11-29").unwrap();
        {
            let s = SledStorage::open(dir.path()).unwrap();
            assert_eq!(s.load(&id).unwrap(), None);
            s.store(&id, b"first").unwrap();
            s.store(&id, b"second").unwrap();
        }
        let s = SledStorage::open(dir.path()).unwrap();
        assert_eq!(s.load(&id).unwrap().as_deref(), Some(&b"second"[..]));
        assert_eq!(s.list().unwrap(), vec![id]);
    }
}
