//! Knowing what is safe: sync progress while a sync runs, what is saved on the relay at
//! any time, and the data and battery budget that decides what a sync may send.
//!
//! - [`SyncProgress`] is published on a watch channel ([`Client::progress`]): documents
//!   and changes done and to do, bytes both ways, an estimate. Counters only grow during
//!   a sync and end with `finished` and done = total.
//! - [`Client::pending`] counts, per document, this device's changes the relay has not
//!   acknowledged and when it last acknowledged one: "saved on the phone" versus "saved
//!   on the relay".
//! - [`SyncPolicy`] (in the config) and [`Conditions`] (set by the app as the network and
//!   charger change) decide what a sync sends: urgent documents (open emergency or
//!   urgent needs, today's ledger with its duty check-ins) always go first and always
//!   go; large documents wait for Wi-Fi or a charger if the policy says so; on a metered
//!   network past the daily cap, only urgent documents go.
//!
//! [`Client::progress`]: crate::Client::progress
//! [`Client::pending`]: crate::Client::pending

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use redline_proto::DocId;

/// How a sync is going.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncProgress {
    /// Documents this sync has to push or receive (grows as updates are announced).
    pub docs_total: u64,
    /// Of those, done (acknowledged or applied).
    pub docs_done: u64,
    /// Local changes this sync pushes.
    pub changes_to_send: u64,
    /// Of those, acknowledged by the relay.
    pub changes_sent: u64,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Bytes received so far.
    pub bytes_received: u64,
    /// Time since the sync started.
    pub elapsed: Duration,
    /// A guess of the time left, from the pace so far.
    pub remaining: Option<Duration>,
    /// The sync has settled.
    pub finished: bool,
}

impl SyncProgress {
    /// Done as a fraction of the total (1.0 when there is nothing to do).
    pub fn fraction(&self) -> f64 {
        if self.docs_total == 0 {
            1.0
        } else {
            self.docs_done as f64 / self.docs_total as f64
        }
    }

    pub(crate) fn estimate(&mut self) {
        let f = self.fraction();
        self.remaining = (f > 0.0 && f < 1.0).then(|| self.elapsed.mul_f64((1.0 - f) / f));
    }
}

/// What the relay does not hold yet of one document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocPending {
    /// The document.
    pub doc: DocId,
    /// This device's changes not acknowledged by the relay.
    pub unacked: u64,
    /// When the relay last acknowledged this document (unix ms).
    pub last_ack_ms: Option<i64>,
}

/// What is saved on the phone only, per document and overall.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// Changes not on the relay yet, all documents.
    pub unacked: u64,
    /// The latest acknowledgement of any document (unix ms).
    pub last_ack_ms: Option<i64>,
    /// Per document (only those with something pending or ever acknowledged).
    pub docs: Vec<DocPending>,
}

/// The kind of network the phone is on, as the app knows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Network {
    /// Unmetered (Wi-Fi, Ethernet).
    #[default]
    Unmetered,
    /// Metered (mobile data, a hotspot): counted against the daily cap.
    Metered,
}

/// The phone's situation, set by the app ([`Client::set_conditions`]).
///
/// [`Client::set_conditions`]: crate::Client::set_conditions
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conditions {
    /// The network.
    pub network: Network,
    /// Whether it is charging.
    pub charging: bool,
}

impl Default for Conditions {
    fn default() -> Self {
        Self {
            network: Network::Unmetered,
            charging: true,
        }
    }
}

/// What a sync may spend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncPolicy {
    /// Large documents (pushes over the inline limit) wait for an unmetered network.
    pub bulk_unmetered_only: bool,
    /// Large documents wait for a charger.
    pub bulk_only_charging: bool,
    /// Bytes per day on metered networks; past it only urgent documents go.
    pub metered_daily_cap: Option<u64>,
}

/// How much a document matters right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Urgency {
    /// Open emergency or urgent needs; today's ledger (duty check-ins).
    Urgent,
    /// Everything else.
    Normal,
}

/// What a bounded sync managed ([`Client::sync_for`]).
///
/// [`Client::sync_for`]: crate::Client::sync_for
#[derive(Clone, Debug)]
pub struct BoundedSync {
    /// Its report, if it finished before the deadline.
    pub report: Option<crate::SyncReport>,
    /// How far it got.
    pub progress: SyncProgress,
}

impl BoundedSync {
    /// The sync finished before the deadline.
    pub fn completed(&self) -> bool {
        self.report.is_some()
    }
}

/// Byte and frame counters shared by a session's streams.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub frames_sent: AtomicU64,
    pub frames_received: AtomicU64,
}
