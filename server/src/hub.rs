//! The documents the relay holds: loaded from storage on first use, kept parsed in
//! memory, written back through the storage after every change.
//!
//! Each document has its own async lock, so devices syncing different documents never
//! wait on each other, and updates to one document are applied and persisted in order.
//! (A memory budget with eviction comes with the relay-at-scale work; for now every
//! document touched stays loaded.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use automerge::Automerge;
use redline_proto::DocId;
use tokio::sync::Mutex as AsyncMutex;

use crate::Error;
use crate::storage::DocStorage;

/// A loaded document, locked while a device's step is applied and persisted.
pub type DocHandle = Arc<AsyncMutex<Automerge>>;

/// The relay's documents.
pub struct Hub {
    storage: Arc<dyn DocStorage>,
    loaded: Mutex<HashMap<DocId, DocHandle>>,
}

impl Hub {
    /// A hub over `storage`.
    pub fn new(storage: Arc<dyn DocStorage>) -> Self {
        Self {
            storage,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// The document `id`, loaded from storage if needed; empty if it was never stored.
    pub async fn doc(&self, id: &DocId) -> Result<DocHandle, Error> {
        if let Some(h) = self.loaded.lock().expect("hub lock poisoned").get(id) {
            return Ok(h.clone());
        }
        let storage = self.storage.clone();
        let key = id.clone();
        let bytes = tokio::task::spawn_blocking(move || storage.load(&key))
            .await
            .map_err(|e| Error::Storage(format!("load task failed: {e}")))??;
        let doc = match bytes {
            Some(b) => Automerge::load(&b).map_err(|e| Error::CorruptDocument {
                doc: id.to_string(),
                reason: e.to_string(),
            })?,
            None => Automerge::new(),
        };
        // Another task may have loaded it meanwhile: keep the first.
        let mut loaded = self.loaded.lock().expect("hub lock poisoned");
        Ok(loaded
            .entry(id.clone())
            .or_insert_with(|| Arc::new(AsyncMutex::new(doc)))
            .clone())
    }

    /// Writes `doc` (already saved to bytes) durably.
    pub async fn persist(&self, id: &DocId, bytes: Vec<u8>) -> Result<(), Error> {
        let storage = self.storage.clone();
        let key = id.clone();
        tokio::task::spawn_blocking(move || storage.store(&key, &bytes))
            .await
            .map_err(|e| Error::Storage(format!("store task failed: {e}")))?
    }

    /// Every stored document id.
    pub async fn list(&self) -> Result<Vec<DocId>, Error> {
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || storage.list())
            .await
            .map_err(|e| Error::Storage(format!("list task failed: {e}")))?
    }

    /// Flushes the storage.
    pub async fn flush(&self) -> Result<(), Error> {
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || storage.flush())
            .await
            .map_err(|e| Error::Storage(format!("flush task failed: {e}")))?
    }
}
