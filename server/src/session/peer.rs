//! What the relay knows of one device on a connection, and the words of its answers:
//! the device's scope and subscription, the heads and own pushes it holds (`Known`),
//! the admission verdict, and the reply to a push.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use automerge::{Change, ChangeHash};
use redline_proto::message::{Ack, Coverage, ErrorReport, Message, QuarantineEntry, Subscription};
use redline_proto::session::{RelayResync, hashes_to_wire};
use redline_proto::wire::union_heads;
use redline_proto::{DeviceId, DocId, ErrorCode, TeamId};

use crate::Error;
use crate::access::Scope;
use crate::authorship::Author;
use crate::config::RelayConfig;
use crate::hub::Committed;

/// What a device holds, per document: heads (pushed, uploading or delivered here) and
/// the changes it pushed itself, so catch-ups never send them back; shared between the
/// session and its upload streams.
///
/// An own change matters only until the device is delivered past the commit that
/// stored it (later windows start after that): each is kept with that commit's
/// sequence ([`IN_FLIGHT`] until it is known) and pruned once delivered, so a live
/// connection pushing all day does not grow without bound.
#[derive(Clone, Default)]
pub struct Known(Arc<std::sync::Mutex<KnownInner>>);

/// Heads of one document remembered per device (see [`Known::add`]).
pub const KNOWN_HEADS: usize = 16;

/// The sequence of an own change whose commit has not answered yet.
pub const IN_FLIGHT: u64 = u64::MAX;

#[derive(Default)]
struct KnownInner {
    heads: HashMap<DocId, Vec<ChangeHash>>,
    own: HashMap<DocId, HashMap<ChangeHash, u64>>,
}

impl Known {
    fn lock(&self) -> std::sync::MutexGuard<'_, KnownInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// The device holds `heads` of `doc`. Only the latest [`KNOWN_HEADS`] are kept: heads
    /// grow forward, so older ones are almost always ancestors of newer ones, and a
    /// forgotten one can only make a later answer send changes the device already has
    /// (it ignores them), never fewer.
    pub fn add(&self, doc: &DocId, heads: &[ChangeHash]) {
        let mut k = self.lock();
        let known = k.heads.entry(doc.clone()).or_default();
        union_heads(known, heads);
        if known.len() > KNOWN_HEADS {
            let extra = known.len() - KNOWN_HEADS;
            known.drain(..extra);
        }
    }
    /// Heads of `doc` the device is known to hold.
    pub fn get(&self, doc: &DocId) -> Vec<ChangeHash> {
        self.lock().heads.get(doc).cloned().unwrap_or_default()
    }
    /// The device pushed `changes` of `doc` itself (never sent back to it).
    pub fn add_own(&self, doc: &DocId, changes: &[Change]) {
        let mut k = self.lock();
        let own = k.own.entry(doc.clone()).or_default();
        for c in changes {
            own.entry(c.hash()).or_insert(IN_FLIGHT);
        }
    }
    /// The commit of own changes `pushed` of `doc` answered: stored at or below `seq`
    /// (`None`: not stored at all, held or refused).
    pub fn settle_own(&self, doc: &DocId, pushed: &[ChangeHash], seq: Option<u64>) {
        let mut k = self.lock();
        let Some(own) = k.own.get_mut(doc) else {
            return;
        };
        for h in pushed {
            match seq {
                Some(seq) => {
                    if let Some(s) = own.get_mut(h) {
                        *s = (*s).min(seq);
                    }
                }
                None => {
                    if own.get(h) == Some(&IN_FLIGHT) {
                        own.remove(h);
                    }
                }
            }
        }
    }
    /// The device was delivered everything up to `seq`: own changes stored at or below
    /// it can never be in a later window.
    pub fn prune_own(&self, seq: u64) {
        let mut k = self.lock();
        k.own.retain(|_, own| {
            own.retain(|_, s| *s > seq);
            !own.is_empty()
        });
    }
    /// The changes of `doc` the device pushed itself (still needed).
    pub fn own(&self, doc: &DocId) -> HashSet<ChangeHash> {
        self.lock()
            .own
            .get(doc)
            .map(|own| own.keys().copied().collect())
            .unwrap_or_default()
    }
    /// Own changes kept, over all documents.
    pub fn own_len(&self) -> usize {
        self.lock().own.values().map(HashMap::len).sum()
    }
}

/// What the relay knows of one device on this connection.
pub struct Peer {
    /// The device.
    pub device: DeviceId,
    /// Who its changes must name: the token's member and device.
    pub author: Author,
    /// What its token allows.
    pub scope: Scope,
    /// In quarantine after this long offline (ms): pushes are held for review.
    pub quarantined: Option<i64>,
    /// The device had finished a sync before this connection (it is not new).
    pub synced_before: bool,
    /// What it receives: its subscription narrowed to its scope.
    pub subscription: Coverage,
    /// Heads the device is known to hold, per document. Shared with upload streams.
    pub known: Known,
    /// Transfers the device holds part of: id → bytes held.
    pub resume: HashMap<[u8; 16], u64>,
    /// The device asked for large downloads to be announced but not sent.
    pub defer_large: bool,
    /// Feed sequence the device has been brought up to (`None` before its first pull).
    pub delivered: Option<u64>,
    /// The Automerge-sync fallback's state for this device.
    pub resync: RelayResync,
    /// The device reads several stored chunks in one bundle payload
    /// ([`redline_proto::message::ext::HELLO_ACCEPTS_CHUNKS`]).
    pub accepts_chunks: bool,
    /// The device works out the relay's heads from what it applies: updates go without
    /// them ([`redline_proto::message::ext::HELLO_DERIVES_HEADS`]).
    pub derives_heads: bool,
    /// Which of the device's connections this is, for the ownership of its uploads.
    pub arrival: crate::hub::staging::Arrival,
}

impl Peer {
    /// A device just welcomed: its author comes from its token (`scope`), it receives
    /// `granted`; nothing is known of it yet.
    pub fn new(device: DeviceId, scope: Scope, granted: Subscription) -> Self {
        Self {
            author: Author {
                device: device.clone(),
                member: scope.claims().member.clone(),
                role: scope.claims().role,
            },
            device,
            scope,
            quarantined: None,
            synced_before: false,
            subscription: Coverage::new(granted),
            known: Known::default(),
            resume: HashMap::new(),
            defer_large: false,
            delivered: None,
            resync: RelayResync::new(),
            accepts_chunks: false,
            derives_heads: false,
            arrival: Default::default(),
        }
    }
}

/// What the admission rule knows of a connection's device.
#[derive(Clone)]
pub struct Admission {
    /// Who pushes.
    pub author: Author,
    /// What its token allows.
    pub scope: Scope,
    /// In quarantine after this long offline (ms).
    pub quarantined: Option<i64>,
    /// The device had finished a sync before this connection.
    pub synced_before: bool,
    /// Most changes in one message.
    pub max_changes: usize,
    /// The relay's quotas.
    pub quotas: crate::config::Quotas,
}

impl Peer {
    /// What the admission rule needs to know of this device.
    pub fn admission(&self, config: &RelayConfig) -> Admission {
        Admission {
            author: self.author.clone(),
            scope: self.scope.clone(),
            quarantined: self.quarantined,
            synced_before: self.synced_before,
            max_changes: config.limits.max_changes_per_message,
            quotas: config.quotas.clone(),
        }
    }

    /// Whether this device oversees `team`: its devices' health and its quarantine (a
    /// lead of the team, or an operator).
    pub fn reviews(&self, team: &TeamId) -> bool {
        let c = self.scope.claims();
        c.role == redline_proto::token::Role::Operator
            || (c.role == redline_proto::token::Role::Lead && c.teams.contains(team))
    }

    /// The quarantine entry for a push of `changes` changes to `doc`, received at
    /// `now_ms` (unix milliseconds).
    pub fn held_entry(&self, doc: &DocId, changes: usize, now_ms: i64) -> QuarantineEntry {
        held_entry(
            &self.device,
            &self.scope,
            self.quarantined,
            doc,
            changes,
            now_ms,
        )
    }
}

/// The quarantine entry for a push of `changes` changes to `doc` by `device`, offline for
/// `offline_ms` before it came back, received at `now_ms` (unix milliseconds).
pub fn held_entry(
    device: &DeviceId,
    scope: &Scope,
    offline_ms: Option<i64>,
    doc: &DocId,
    changes: usize,
    now_ms: i64,
) -> QuarantineEntry {
    QuarantineEntry {
        device: device.clone(),
        member: scope.claims().member.to_string(),
        doc: doc.clone(),
        changes: u32::try_from(changes).unwrap_or(u32::MAX),
        received_ms: now_ms,
        offline_ms: offline_ms.unwrap_or(0),
    }
}

/// What becomes of changes a device sends for a document.
#[derive(Debug)]
pub enum Verdict {
    /// Commit them (the hub still checks actors, authorship, dependencies and size).
    Accept,
    /// Keep them for a lead's review; `starts`: this push puts the device in quarantine.
    Hold {
        /// The push starts the device's quarantine.
        starts: bool,
    },
    /// Refuse them with this code.
    Refuse(ErrorCode, String),
}

/// What became of a push the relay admitted.
#[derive(Debug)]
pub enum Outcome {
    /// Merged and durable.
    Committed(Committed),
    /// Held for a lead's review (the words for the device).
    Held(String),
}

/// The device's answer for a push or upload of `doc` that ended with `result`.
pub fn reply(doc: DocId, result: Result<Outcome, Error>) -> Message {
    match result {
        Ok(Outcome::Committed(c)) => Message::Ack(Ack {
            doc,
            heads: hashes_to_wire(&c.heads),
            applied: c.applied,
        }),
        Ok(Outcome::Held(text)) => error_msg(ErrorCode::QUARANTINED, text, Some(doc)),
        Err(e) => refusal(e, doc),
    }
}

/// A push on its way through admission and commit.
pub struct PushWork {
    /// The document.
    pub doc: DocId,
    /// The bytes as pushed (kept for a hold).
    pub bundle: Vec<u8>,
    /// The heads the device will hold once this is committed.
    pub device_heads: Vec<ChangeHash>,
    /// The changes, through the intake.
    pub changes: Vec<Change>,
}

pub(crate) fn error_msg(code: ErrorCode, text: impl Into<String>, doc: Option<DocId>) -> Message {
    Message::Error(ErrorReport {
        code,
        text: text.into(),
        doc,
    })
}

/// The refusal sent for anything outside the token's scope. The same words whether or
/// not the document exists.
pub fn forbidden(doc: &DocId) -> Message {
    error_msg(
        ErrorCode::FORBIDDEN,
        "your token does not allow this document",
        Some(doc.clone()),
    )
}

/// The answer to a push or upload the hub did not commit.
pub fn refusal(e: Error, doc: DocId) -> Message {
    if let Error::MissingDependencies(_) = e {
        return Message::Resync(doc);
    }
    let (code, text) = refusal_code(e);
    error_msg(code, text, Some(doc))
}

/// The code and words for a commit the hub refused.
pub fn refusal_code(e: Error) -> (ErrorCode, String) {
    match e {
        e @ Error::MissingDependencies(_) => (ErrorCode::BAD_DOCUMENT_DATA, e.to_string()),
        Error::BadChanges(text) => (ErrorCode::BAD_DOCUMENT_DATA, text),
        e @ (Error::ForgedActor { .. } | Error::ForgedAuthorship(_)) => {
            (ErrorCode::FORBIDDEN, e.to_string())
        }
        Error::TooLarge(text) => (ErrorCode::TOO_LARGE, text),
        Error::QuotaExceeded(text) => (ErrorCode::QUOTA_EXCEEDED, text),
        e => (
            ErrorCode::STORAGE_FAILURE,
            format!("nothing was acknowledged: {e}"),
        ),
    }
}
