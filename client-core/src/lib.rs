//! The Redline device core: what runs on a volunteer's phone.
//!
//! A [`Client`] owns a durable sled store of Automerge documents (one per team-day ledger,
//! per zone's households book, per roster), offers typed operations in the field's words
//! (add a task, check in for duty, add to a tally), and syncs everything with a relay
//! over QUIC when a network appears. Every write is on disk before the call returns;
//! a sync never blocks local writes.
//!
//! ```no_run
//! use redline_client::{Client, ClientConfig, NewTask, TaskKind};
//! use redline_proto::{Day, MemberId, TeamId};
//! # async fn run() -> Result<(), redline_client::Error> {
//! let client = Client::open("/data/redline", ClientConfig::new(MemberId::new("amira")?))?;
//! let (team, day) = (TeamId::new("team-3")?, Day::new("2026-11-29")?);
//! client.check_in(&team, &day)?;
//! client.add_task(&team, &day, NewTask {
//!     kind: TaskKind::Screening, title: "Sample block 7".into(), zone: None, place: None,
//! })?;
//! client.add_to_tally(&team, &day, "samples_taken", 12)?;
//! let report = client.sync().await?; // needs ClientConfig::relay
//! # Ok(()) }
//! ```

mod identity;
pub mod ledger;
mod store;
mod sync;
pub mod transport;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::sync::State as SyncState;
use automerge::transaction::{CommitOptions, Transaction};
use automerge::{Automerge, ChangeHash};
use redline_proto::codec::DEFAULT_MAX_FRAME;
use redline_proto::session::DocToSync;
use redline_proto::{Day, DocId, DocKind, MemberId, TeamId};

pub use identity::DeviceIdentity;
pub use ledger::{DutyAction, DutyEntry, LedgerView, NewTask, Task, TaskKind};
pub use sync::SyncReport;

/// Everything that can go wrong on the device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller passed something invalid; the message says what is expected.
    #[error("{0}")]
    Invalid(String),
    /// The local store failed.
    #[error("local store: {0}")]
    Store(String),
    /// A stored document is unreadable.
    #[error("document is damaged: {0}")]
    Corrupt(String),
    /// Automerge refused an operation.
    #[error("document operation failed: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// No relay is configured.
    #[error("no relay configured: set ClientConfig::relay (address and certificate fingerprint)")]
    NoRelay,
    /// The relay presented a certificate other than the pinned one.
    #[error(
        "the relay's certificate fingerprint is {seen}, but {expected} is pinned: \
         check the relay address, or re-pin if the relay's certificate was replaced"
    )]
    PinMismatch {
        /// The pinned fingerprint.
        expected: String,
        /// What the relay presented.
        seen: String,
    },
    /// The network or the QUIC connection failed; local data is intact, retry later.
    #[error("network: {0}")]
    Transport(String),
    /// The relay spoke the protocol wrongly or reported an error.
    #[error(transparent)]
    Protocol(#[from] redline_proto::Error),
}

/// Where the relay is and how to recognise it.
#[derive(Clone, Debug)]
pub struct RelayEndpoint {
    /// The relay's UDP address.
    pub addr: SocketAddr,
    /// SHA-256 fingerprint of its certificate (64 hex digits, `:` allowed).
    pub fingerprint: String,
    /// TLS server name to send (pinning does not depend on it).
    pub server_name: String,
}

impl RelayEndpoint {
    /// A relay at `addr` whose certificate has `fingerprint`.
    pub fn new(addr: SocketAddr, fingerprint: impl Into<String>) -> Self {
        Self {
            addr,
            fingerprint: fingerprint.into(),
            server_name: "redline-relay".into(),
        }
    }
}

/// How a client runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The member using this device; recorded on every entry.
    pub member: MemberId,
    /// The relay to sync with.
    pub relay: Option<RelayEndpoint>,
    /// The app's version, reported to the relay.
    pub app_version: String,
    /// Largest frame accepted from the relay.
    pub max_frame: usize,
}

impl ClientConfig {
    /// Defaults for `member`, with no relay.
    pub fn new(member: MemberId) -> Self {
        Self {
            member,
            relay: None,
            app_version: format!("redline-client/{}", env!("CARGO_PKG_VERSION")),
            max_frame: DEFAULT_MAX_FRAME,
        }
    }

    /// Sets the relay.
    pub fn with_relay(mut self, relay: RelayEndpoint) -> Self {
        self.relay = Some(relay);
        self
    }
}

/// A device's Redline store. Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    store: store::Store,
    identity: DeviceIdentity,
    config: ClientConfig,
    /// Parsed documents, loaded on first use. Local writes and sync merges go through it.
    docs: Mutex<HashMap<DocId, Automerge>>,
    /// One sync at a time per client; holds the QUIC endpoint, made on first sync.
    syncing: tokio::sync::Mutex<Option<quinn::Endpoint>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The document a fresh device starts from for `id`.
fn initial_doc(id: &DocId) -> Automerge {
    match id.kind() {
        DocKind::Ledger(team, day) => ledger::genesis(&team, &day),
        DocKind::Roster(_) | DocKind::Households(_) => Automerge::new(),
    }
}

impl Client {
    /// Opens (or creates) the store in `dir`. The device identity is created on first open
    /// and kept.
    pub fn open(dir: impl AsRef<Path>, config: ClientConfig) -> Result<Self, Error> {
        let store = store::Store::open(dir.as_ref())?;
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

    /// Makes one local change to `id` (creating the document if needed) and stores it
    /// durably before returning. If `change` fails, nothing is written.
    fn change<R>(
        &self,
        id: &DocId,
        change: impl FnOnce(&mut Transaction<'_>, &ledger::Author<'_>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let mut docs = self.docs();
        if self.load(&mut docs, id)?.is_none() {
            let mut doc = initial_doc(id);
            doc.set_actor(self.inner.identity.actor.clone());
            docs.insert(id.clone(), doc);
        }
        let doc = docs.get_mut(id).expect("inserted above");
        let now = now_ms();
        let author = ledger::Author {
            member: &self.inner.config.member,
            device: &self.inner.identity.device,
            now_ms: now,
        };
        let mut tx = doc.transaction();
        let result = match change(&mut tx, &author) {
            Ok(r) => r,
            Err(e) => {
                tx.rollback();
                return Err(e);
            }
        };
        tx.commit_with(CommitOptions::default().with_time(now / 1000));
        if let Err(e) = self.inner.store.save_doc(id, &doc.save()) {
            // Keep memory equal to disk: what was not stored did not happen.
            docs.remove(id);
            return Err(e);
        }
        Ok(result)
    }

    /// Adds a task to `team`'s ledger for `day`; returns the task's id.
    pub fn add_task(&self, team: &TeamId, day: &Day, task: NewTask) -> Result<String, Error> {
        self.change(&DocId::ledger(team, day), |tx, by| {
            ledger::add_task(tx, by, &task)
        })
    }

    /// Records that this device's member starts duty now.
    pub fn check_in(&self, team: &TeamId, day: &Day) -> Result<(), Error> {
        self.change(&DocId::ledger(team, day), |tx, by| {
            ledger::record_duty(tx, by, DutyAction::CheckIn)
        })
    }

    /// Records that this device's member ends duty now.
    pub fn check_out(&self, team: &TeamId, day: &Day) -> Result<(), Error> {
        self.change(&DocId::ledger(team, day), |tx, by| {
            ledger::record_duty(tx, by, DutyAction::CheckOut)
        })
    }

    /// Adds `amount` (at least 1) to the day's tally `metric` (e.g. `samples_taken`).
    pub fn add_to_tally(
        &self,
        team: &TeamId,
        day: &Day,
        metric: &str,
        amount: u32,
    ) -> Result<(), Error> {
        self.change(&DocId::ledger(team, day), |tx, by| {
            ledger::add_to_tally(tx, by, metric, i64::from(amount))
        })
    }

    /// The typed view of `team`'s ledger for `day`, or `None` if this device has none.
    pub fn ledger(&self, team: &TeamId, day: &Day) -> Result<Option<LedgerView>, Error> {
        let mut docs = self.docs();
        match self.load(&mut docs, &DocId::ledger(team, day))? {
            Some(doc) => Ok(Some(ledger::view(doc)?)),
            None => Ok(None),
        }
    }

    /// Makes sure the device holds `id` (starting it empty if needed), so the next sync
    /// fetches it from the relay.
    pub fn follow(&self, id: &DocId) -> Result<(), Error> {
        let mut docs = self.docs();
        if self.load(&mut docs, id)?.is_some() {
            return Ok(());
        }
        let mut doc = initial_doc(id);
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
        let mut docs = self.docs();
        Ok(self
            .load(&mut docs, id)?
            .map(|d| d.get_heads())
            .unwrap_or_default())
    }

    /// A copy of the document `id`, for export and inspection.
    pub fn document(&self, id: &DocId) -> Result<Option<Automerge>, Error> {
        let mut docs = self.docs();
        Ok(self.load(&mut docs, id)?.map(|d| d.clone()))
    }

    /// The relay's durable heads of `id` from its last acknowledgement.
    pub fn acked_heads(&self, id: &DocId) -> Result<Option<Vec<ChangeHash>>, Error> {
        self.inner.store.acked_heads(id)
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
