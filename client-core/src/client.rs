//! The [`Client`] handle: the document cache over the sled store, the one write path,
//! sync, and day rollover. The field operations are in `operations.rs`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::sync::State as SyncState;
use automerge::transaction::Transaction;
use automerge::{Automerge, ChangeHash};
use redline_proto::session::DocToSync;
use redline_proto::{Day, DocId, DocKind, MemberId};

use crate::identity::{self, DeviceIdentity};
use crate::schema::{self, Writer};
use crate::store::{self, Store};
use crate::sync::{self, SyncReport};
use crate::{ClientConfig, Error, transport};

/// A device's Redline store. Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    store: Store,
    identity: DeviceIdentity,
    pub(crate) config: ClientConfig,
    /// Parsed documents, loaded on first use. Local writes and sync merges go through it.
    docs: Mutex<HashMap<DocId, Automerge>>,
    /// One sync at a time per client; holds the QUIC endpoint, made on first sync.
    syncing: tokio::sync::Mutex<Option<quinn::Endpoint>>,
}

/// What [`Client::drop_old_days`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rollover {
    /// Ledger days removed from the device.
    pub dropped: Vec<DocId>,
    /// Old days kept because the relay has not acknowledged all their changes.
    pub kept_unsynced: Vec<DocId>,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Client {
    /// Opens (or creates) the store in `dir`. The device identity is created on first open
    /// and kept.
    pub fn open(dir: impl AsRef<Path>, config: ClientConfig) -> Result<Self, Error> {
        let store = Store::open(dir.as_ref())?;
        let identity = identity::load_or_create(&store)?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                identity,
                config,
                docs: Mutex::new(HashMap::new()),
                syncing: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// This install's identity.
    pub fn identity(&self) -> &DeviceIdentity {
        &self.inner.identity
    }

    /// The member using this device.
    pub fn member(&self) -> &MemberId {
        &self.inner.config.member
    }

    fn docs(&self) -> MutexGuard<'_, HashMap<DocId, Automerge>> {
        self.inner
            .docs
            .lock()
            .expect("document cache lock poisoned")
    }

    /// Loads `id` into the cache from the store, if it is stored and not yet loaded.
    fn load<'a>(
        &self,
        docs: &'a mut HashMap<DocId, Automerge>,
        id: &DocId,
    ) -> Result<Option<&'a mut Automerge>, Error> {
        if !docs.contains_key(id) {
            let Some(bytes) = self.inner.store.load_doc(id)? else {
                return Ok(None);
            };
            let mut doc =
                Automerge::load(&bytes).map_err(|e| Error::Corrupt(format!("{id}: {e}")))?;
            doc.set_actor(self.inner.identity.actor.clone());
            docs.insert(id.clone(), doc);
        }
        Ok(docs.get_mut(id))
    }

    /// Reads document `id` with `f`; `None` if the device does not hold it.
    pub(crate) fn read<R>(
        &self,
        id: &DocId,
        f: impl FnOnce(&Automerge) -> Result<R, Error>,
    ) -> Result<Option<R>, Error> {
        let mut docs = self.docs();
        match self.load(&mut docs, id)? {
            Some(doc) => f(doc).map(Some),
            None => Ok(None),
        }
    }

    /// Makes one local change to `id` (creating the document from its genesis if needed)
    /// and stores it durably before returning. If `change` fails, nothing is written.
    pub(crate) fn change<R>(
        &self,
        id: &DocId,
        change: impl FnOnce(&mut Transaction<'_>, &Writer<'_>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        self.change_after(id, |_| Ok(()), |tx, w, ()| change(tx, w))
    }

    /// Like [`change`](Self::change), with a read of the document before the transaction
    /// opens (for what a transaction cannot see, such as change metadata).
    pub(crate) fn change_after<P, R>(
        &self,
        id: &DocId,
        prepare: impl FnOnce(&Automerge) -> Result<P, Error>,
        change: impl FnOnce(&mut Transaction<'_>, &Writer<'_>, P) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let mut docs = self.docs();
        if self.load(&mut docs, id)?.is_none() {
            let mut doc = schema::genesis(id);
            doc.set_actor(self.inner.identity.actor.clone());
            docs.insert(id.clone(), doc);
        }
        let doc = docs.get_mut(id).expect("inserted above");
        let prepared = prepare(doc)?;
        let writer = Writer {
            member: &self.inner.config.member,
            device: &self.inner.identity.device,
            now_ms: self.inner.config.clock.now_ms(),
        };
        let mut tx = doc.transaction();
        let result = match change(&mut tx, &writer, prepared) {
            Ok(r) => r,
            Err(e) => {
                tx.rollback();
                return Err(e);
            }
        };
        schema::commit(tx, &writer);
        if let Err(e) = self.inner.store.save_doc(id, &doc.save()) {
            // Keep memory equal to disk: what was not stored did not happen.
            docs.remove(id);
            return Err(e);
        }
        Ok(result)
    }

    /// Makes sure the device holds `id` (starting from its genesis if needed), so the next
    /// sync fetches it from the relay.
    pub fn follow(&self, id: &DocId) -> Result<(), Error> {
        let mut docs = self.docs();
        if self.load(&mut docs, id)?.is_some() {
            return Ok(());
        }
        let mut doc = schema::genesis(id);
        doc.set_actor(self.inner.identity.actor.clone());
        self.inner.store.save_doc(id, &doc.save())?;
        docs.insert(id.clone(), doc);
        Ok(())
    }

    /// Every document this device holds.
    pub fn documents(&self) -> Result<Vec<DocId>, Error> {
        self.inner.store.doc_ids()
    }

    /// The current heads of `id` (empty if the device does not hold it).
    pub fn heads(&self, id: &DocId) -> Result<Vec<ChangeHash>, Error> {
        Ok(self.read(id, |d| Ok(d.get_heads()))?.unwrap_or_default())
    }

    /// A copy of the document `id`, for export and inspection.
    pub fn document(&self, id: &DocId) -> Result<Option<Automerge>, Error> {
        self.read(id, |d| Ok(d.clone()))
    }

    /// The relay's durable heads of `id` from its last acknowledgement.
    pub fn acked_heads(&self, id: &DocId) -> Result<Option<Vec<ChangeHash>>, Error> {
        self.inner.store.acked_heads(id)
    }

    /// Removes ledger days older than the configured [`ClientConfig::keep_days`] (counting
    /// back from `today`, which is kept) from this device only; the relay keeps them and a
    /// later [`follow`](Self::follow) fetches them again. A day with changes the relay has
    /// not acknowledged is kept and listed in [`Rollover::kept_unsynced`].
    pub fn drop_old_days(&self, today: &Day) -> Result<Rollover, Error> {
        let cutoff = day_minus(today, self.inner.config.keep_days.saturating_sub(1))?;
        let mut out = Rollover::default();
        let mut docs = self.docs();
        for id in self.inner.store.doc_ids()? {
            let DocKind::Ledger(_, day) = id.kind() else {
                continue;
            };
            // YYYY-MM-DD compares chronologically as text.
            if day.as_str() >= cutoff.as_str() {
                continue;
            }
            let heads = match self.load(&mut docs, &id)? {
                Some(d) => d.get_heads(),
                None => continue,
            };
            let acked = self.inner.store.acked_heads(&id)?.unwrap_or_default();
            if heads.iter().all(|h| acked.contains(h)) {
                self.inner.store.remove_doc(&id)?;
                docs.remove(&id);
                out.dropped.push(id);
            } else {
                out.kept_unsynced.push(id);
            }
        }
        Ok(out)
    }

    /// Syncs every document with the relay. Local writes may go on meanwhile; what the
    /// relay sends is merged in at the end, and all results are stored with one flush.
    pub async fn sync(&self) -> Result<SyncReport, Error> {
        let relay = self.inner.config.relay.clone().ok_or(Error::NoRelay)?;
        let mut endpoint_slot = self.inner.syncing.lock().await;
        let endpoint = match endpoint_slot.as_ref() {
            Some(e)
                if e.local_addr()
                    .is_ok_and(|a| a.is_ipv6() == relay.addr.is_ipv6()) =>
            {
                e.clone()
            }
            _ => {
                let e = transport::client_endpoint(&relay.addr)?;
                *endpoint_slot = Some(e.clone());
                e
            }
        };
        let mut to_sync = Vec::new();
        {
            let mut docs = self.docs();
            for id in self.inner.store.doc_ids()? {
                let Some(doc) = self.load(&mut docs, &id)? else {
                    continue;
                };
                let doc = doc.clone();
                let state = match self.inner.store.sync_state(&id)? {
                    // A state that does not decode only costs a longer exchange.
                    Some(bytes) => SyncState::decode(&bytes).unwrap_or_default(),
                    None => SyncState::new(),
                };
                to_sync.push(DocToSync { id, doc, state });
            }
        }
        let (synced, report) = sync::run(
            &endpoint,
            &relay,
            self.inner.identity.device.clone(),
            self.inner.config.app_version.clone(),
            to_sync,
            self.inner.config.max_frame,
        )
        .await?;

        let mut docs = self.docs();
        let mut merged = Vec::with_capacity(synced.len());
        for mut s in synced {
            let doc_bytes = if s.changes_received > 0 {
                let live = self
                    .load(&mut docs, &s.id)?
                    .ok_or_else(|| Error::Store(format!("{} vanished during sync", s.id)))?;
                live.merge(&mut s.doc)?;
                Some(live.save())
            } else {
                None
            };
            merged.push((s, doc_bytes));
        }
        let records: Vec<store::SyncRecord<'_>> = merged
            .iter()
            .map(|(s, bytes)| store::SyncRecord {
                id: &s.id,
                doc_bytes: bytes.clone(),
                sync_state: s.state.encode(),
                acked_heads: s.acked_heads.as_deref(),
            })
            .collect();
        if let Err(e) = self.inner.store.save_sync_results(&records) {
            // The merged copies were not stored: drop them so memory matches disk.
            for (s, bytes) in &merged {
                if bytes.is_some() {
                    docs.remove(&s.id);
                }
            }
            return Err(e);
        }
        Ok(report)
    }
}

/// `day` minus `n` days.
fn day_minus(day: &Day, n: u32) -> Result<Day, Error> {
    let s = day.as_str();
    let num = |r: std::ops::Range<usize>| {
        s[r].parse::<i32>()
            .map_err(|_| Error::Invalid(format!("bad day {s}")))
    };
    let month = u8::try_from(num(5..7)?)
        .ok()
        .and_then(|m| time::Month::try_from(m).ok());
    let date = month
        .and_then(|m| {
            time::Date::from_calendar_date(num(0..4).ok()?, m, u8::try_from(num(8..10).ok()?).ok()?)
                .ok()
        })
        .ok_or_else(|| Error::Invalid(format!("bad day {s}")))?;
    let earlier = date
        .checked_sub(time::Duration::days(i64::from(n)))
        .ok_or_else(|| Error::Invalid(format!("{s} minus {n} days is out of range")))?;
    let text = format!(
        "{:04}-{:02}-{:02}",
        earlier.year(),
        u8::from(earlier.month()),
        earlier.day()
    );
    Ok(Day::new(text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_arithmetic_crosses_months_and_years() {
        let d = |s: &str| Day::new(s).unwrap();
        assert_eq!(day_minus(&d("2026-03-01"), 1).unwrap(), d("2026-02-28"));
        assert_eq!(day_minus(&d("2024-03-01"), 1).unwrap(), d("2024-02-29"));
        assert_eq!(day_minus(&d("2026-01-03"), 6).unwrap(), d("2025-12-28"));
        assert_eq!(day_minus(&d("2026-01-03"), 0).unwrap(), d("2026-01-03"));
    }
}
