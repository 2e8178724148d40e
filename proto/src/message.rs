//! The messages devices and the relay exchange, and their stable error codes.
//!
//! Messages are encoded with postcard (a compact, schema-less serde format) inside
//! length-prefixed frames (see [`crate::codec`]).
//!
//! # How the protocol evolves
//!
//! Phones in the field run app versions months old, so a relay serves every version from
//! [`MIN_PROTOCOL_VERSION`] to [`PROTOCOL_VERSION`], and a phone talks to relays older
//! than itself:
//! - **Versions are negotiated.** A device names the newest version it speaks in
//!   [`Hello`]; the relay answers [`Welcome`] with the version both will speak (the
//!   lower of the two, [`negotiate`]). A device older than the relay's
//!   [`MIN_PROTOCOL_VERSION`] is refused with [`ErrorCode::UNSUPPORTED_VERSION`] and
//!   told to update the app. A relay from before negotiation (version 1) refuses any
//!   hello but its own version: the device then says hello again at the lowest version
//!   it speaks.
//! - **Nothing in a message struct ever changes.** Variants of [`Message`] and fields of
//!   its structs are never reordered, removed or added. New fields travel as
//!   *extensions*: tagged values after the message in the same frame
//!   ([`crate::codec::Extensions`]). A version 1 peer refuses trailing bytes, so
//!   extensions are sent only once the negotiated version is 2 or more; from version 2
//!   on, unknown tags are ignored and a missing tag means "the sender does not know it".
//! - **New message kinds are appended** as new variants and sent only when the
//!   negotiated version knows them, so a conforming peer never receives a kind it does
//!   not know: one is refused as [`crate::Error::UnknownMessage`] (`bad_message`).
//! - **Before the `Welcome`**, a device sends only what the oldest relay it supports
//!   understands (its first flight has no extensions).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{Day, DeviceId, DocId, DocKind, OrgId, TeamId, ZoneId};

/// The newest protocol version this crate speaks. Version 2: versions are negotiated and
/// frames may carry extensions.
pub const PROTOCOL_VERSION: u16 = 2;

/// The oldest protocol version this crate still speaks (phones a release behind).
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The version a peer speaking `ours` (at most [`PROTOCOL_VERSION`], serving versions from
/// [`MIN_PROTOCOL_VERSION`]) and a device speaking up to `theirs` will use: the lower of
/// the two. A device older than [`MIN_PROTOCOL_VERSION`] must update.
pub fn negotiate(theirs: u16, ours: u16) -> Result<u16, crate::Error> {
    if theirs < MIN_PROTOCOL_VERSION {
        return Err(crate::Error::UnsupportedVersion {
            theirs,
            oldest: MIN_PROTOCOL_VERSION,
            newest: ours,
        });
    }
    Ok(theirs.min(ours))
}

/// Extension tags (see [`crate::codec::Extensions`]), per message kind.
pub mod ext {
    /// On [`super::Welcome`]: the oldest protocol version the relay serves (`u16`), so a
    /// device can warn before its app version stops being served.
    pub const WELCOME_OLDEST_VERSION: u16 = 1;
    /// On [`super::Welcome`]: the newest protocol version the relay speaks (`u16`).
    pub const WELCOME_NEWEST_VERSION: u16 = 2;
    /// On [`super::Hello`]: the device reads an [`super::Payload::Bundle`] that holds
    /// several Automerge chunks one after another (`bool`). The relay then ships the
    /// chunks it stored per commit as they are, instead of bundling anew per device.
    pub const HELLO_ACCEPTS_CHUNKS: u16 = 3;
    /// On [`super::Hello`]: the device works out what the relay holds from what it
    /// applies (`bool`), so the relay sends each [`super::Update`] without the
    /// document's heads (empty `heads`): a ledger in a storm has a head per phone of
    /// its team, 32 bytes each, on every update.
    pub const HELLO_DERIVES_HEADS: u16 = 4;
    /// On [`super::Hello`]: this connection's attempt number (`u64`), larger than any
    /// earlier connection's of the same device. A cut connection's frames can reach the
    /// relay after its successor's (lost packets resent late); an upload resumed on the
    /// later connection then keeps the upload, and a stream of the earlier one is told
    /// it is stale, instead of the newest stream to arrive taking the upload over.
    pub const HELLO_ATTEMPT: u16 = 5;
}

/// The QUIC ALPN token of protocol version 1. A peer offering anything else is refused
/// during the TLS handshake.
pub const ALPN: &[u8] = b"redline/1";

/// One protocol message.
///
/// A device's *first flight* on the control stream is `Hello`, one `Push` per document
/// with changes the relay has not acknowledged, then `Pull`. The relay answers `Welcome`,
/// an `Ack` per push (after the flush), `Update`s for what the device lacks in its
/// subscription, and `Caught` with the new cursor. A device that stays connected then gets
/// further `Update`/`Caught` pairs as others write (live fan-out) and may send more
/// `Push`es. `Sync` steps run Automerge's own protocol for a document when either side's
/// knowledge is stale (`Resync`). Large payloads travel as `Upload`/`Piece` on their own
/// streams.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message of a device on its control stream.
    Hello(Hello),
    /// The relay's answer to a [`Hello`] it accepts.
    Welcome(Welcome),
    /// One step of Automerge's sync protocol for one document (fallback path).
    Sync(SyncStep),
    /// The relay holds `heads` of `doc` durably on disk.
    Ack(Ack),
    /// Something went wrong; see the code.
    Error(ErrorReport),
    /// Changes of a document the relay has not acknowledged, as an Automerge bundle.
    Push(Push),
    /// End of the device's flight: send me what changed in my subscription since `cursor`.
    Pull(Pull),
    /// Changes (or a whole document) the device lacks.
    Update(Update),
    /// The device is up to date with everything in its subscription up to `cursor`.
    Caught(Cursor),
    /// Knowledge about `doc` is stale on one side: run [`Message::Sync`] for it.
    Resync(DocId),
    /// Start or resume a large transfer on this stream.
    Upload(Upload),
    /// How many bytes of a transfer the receiver holds durably.
    UploadOffset(UploadOffset),
    /// A piece of a large transfer (at most [`MAX_PIECE`] bytes).
    Piece(Piece),
    /// A lead or operator asks for the health of a team's devices.
    DevicesRequest(crate::TeamId),
    /// The relay's answer to [`Message::DevicesRequest`].
    Devices(Vec<DeviceHealth>),
    /// A lead or operator asks what the relay holds in quarantine for a team.
    QuarantineRequest(crate::TeamId),
    /// Changes held in quarantine (the answer to a request or an accept).
    Quarantine(Vec<QuarantineEntry>),
    /// A lead or operator merges a device's quarantined changes for a team.
    QuarantineAccept {
        /// The team whose documents they are.
        team: crate::TeamId,
        /// The device whose changes to merge.
        device: DeviceId,
    },
}

/// Changes a device pushed after too long offline, held for a lead's review.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    /// The device.
    pub device: DeviceId,
    /// Its member.
    pub member: String,
    /// The document.
    pub doc: DocId,
    /// Changes held.
    pub changes: u32,
    /// When the relay received them (unix ms).
    pub received_ms: i64,
    /// How long the device had been offline (ms).
    pub offline_ms: i64,
}

/// What the relay knows of one device: for leads and operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceHealth {
    /// The device.
    pub device: DeviceId,
    /// Its member.
    pub member: String,
    /// Its token's teams.
    pub teams: Vec<crate::TeamId>,
    /// Protocol version it spoke last.
    pub protocol_version: u16,
    /// App version it reported last.
    pub app_version: String,
    /// When it last connected (unix ms, relay clock).
    pub last_seen_ms: i64,
    /// When it last finished a sync (was caught up), if ever.
    pub last_sync_ms: Option<i64>,
    /// Commits in its subscription it has not received yet.
    pub pending_updates: u64,
    /// Bytes it moved today (UTC day of the relay), both ways.
    pub bytes_today: u64,
    /// Whether it is connected now.
    pub connected: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriptions_cover_their_team_days_zones_and_roster() {
        let s = Subscription {
            org: Some(OrgId::new("org").unwrap()),
            teams: vec![TeamId::new("t3").unwrap()],
            ledger_since: Some(Day::new("2026-11-23").unwrap()),
            zones: vec![ZoneId::new("z1").unwrap()],
            docs: vec![DocId::parse("households/z9").unwrap()],
        };
        let covers = |id: &str| s.covers(&DocId::parse(id).unwrap());
        assert!(covers("ledger/t3/2026-11-23") && covers("ledger/t3/2026-12-01"));
        assert!(!covers("ledger/t3/2026-11-22"), "older than ledger_since");
        assert!(!covers("ledger/t4/2026-11-29"), "another team");
        assert!(covers("households/z1") && covers("households/z9") && !covers("households/z2"));
        assert!(covers("roster/org") && !covers("roster/other"));
        // The prepared form answers the same, with the kind parsed beforehand.
        let c = Coverage::new(s.clone());
        for id in [
            "ledger/t3/2026-11-23",
            "ledger/t3/2026-11-22",
            "ledger/t4/2026-11-29",
            "households/z1",
            "households/z9",
            "households/z2",
            "roster/org",
            "roster/other",
        ] {
            let d = DocId::parse(id).unwrap();
            assert_eq!(c.covers_parsed(&d, &d.kind()), covers(id), "{id}");
            assert_eq!(c.covers(&d), covers(id), "{id}");
        }
    }
}

/// Largest payload of one [`Piece`].
pub const MAX_PIECE: usize = 1024 * 1024;

impl Message {
    /// A short name of the message kind, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Sync(_) => "sync",
            Message::Ack(_) => "ack",
            Message::Error(_) => "error",
            Message::Push(_) => "push",
            Message::Pull(_) => "pull",
            Message::Update(_) => "update",
            Message::Caught(_) => "caught",
            Message::Resync(_) => "resync",
            Message::Upload(_) => "upload",
            Message::UploadOffset(_) => "upload_offset",
            Message::Piece(_) => "piece",
            Message::DevicesRequest(_) => "devices_request",
            Message::Devices(_) => "devices",
            Message::QuarantineRequest(_) => "quarantine_request",
            Message::Quarantine(_) => "quarantine",
            Message::QuarantineAccept { .. } => "quarantine_accept",
        }
    }
}

/// A device introduces itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The [`PROTOCOL_VERSION`] the device speaks.
    pub protocol_version: u16,
    /// Which install this is.
    pub device: DeviceId,
    /// The app's version, for the relay's device health view.
    pub app_version: String,
    /// What the device wants to receive.
    pub subscription: Subscription,
    /// The device's token from the relay's operator (see [`crate::token`]).
    pub token: String,
}

/// What a device wants: its team's recent ledger days, its zones' households books, the
/// roster, and any document named explicitly. New documents matching it reach the
/// device without it knowing their ids.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Subscription {
    /// The organisation whose roster to receive.
    pub org: Option<OrgId>,
    /// Teams whose ledgers to receive.
    pub teams: Vec<TeamId>,
    /// Oldest ledger day to receive (`None`: all days).
    pub ledger_since: Option<Day>,
    /// Zones whose households books to receive.
    pub zones: Vec<ZoneId>,
    /// Further documents, by id.
    pub docs: Vec<DocId>,
}

/// Documents a subscription may list by id (beyond its teams, zones and org).
pub const MAX_SUBSCRIBED_DOCS: usize = 512;

impl Subscription {
    /// Whether `doc` is in this subscription.
    pub fn covers(&self, doc: &DocId) -> bool {
        self.docs.contains(doc) || self.covers_by_kind(doc)
    }

    /// Checks the listed documents against [`MAX_SUBSCRIBED_DOCS`].
    pub fn check_size(&self) -> Result<(), crate::Error> {
        if self.docs.len() > MAX_SUBSCRIBED_DOCS {
            return Err(crate::Error::TooManyDocuments {
                listed: self.docs.len(),
                max: MAX_SUBSCRIBED_DOCS,
            });
        }
        Ok(())
    }

    fn covers_by_kind(&self, doc: &DocId) -> bool {
        self.covers_kind(&doc.kind())
    }

    fn covers_kind(&self, kind: &DocKind) -> bool {
        match kind {
            DocKind::Roster(org) => self.org.as_ref() == Some(org),
            DocKind::Households(zone) => self.zones.contains(zone),
            DocKind::Ledger(team, day) => {
                self.teams.contains(team) && self.ledger_since.as_ref().is_none_or(|s| day >= s)
            }
        }
    }
}

/// A subscription prepared for many lookups (the relay asks it for every feed entry of
/// every catch-up): its listed documents in a set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    subscription: Subscription,
    docs: std::collections::HashSet<DocId>,
}

impl Coverage {
    /// Prepares `subscription`.
    pub fn new(subscription: Subscription) -> Self {
        let docs = subscription.docs.iter().cloned().collect();
        Self { subscription, docs }
    }

    /// Whether `doc` is in the subscription (a set lookup, then the kind rule).
    pub fn covers(&self, doc: &DocId) -> bool {
        self.docs.contains(doc) || self.subscription.covers_by_kind(doc)
    }

    /// [`covers`](Self::covers) for a document whose kind was parsed once already (the
    /// relay's fan-out asks every live session about the same few documents).
    pub fn covers_parsed(&self, doc: &DocId, kind: &DocKind) -> bool {
        self.docs.contains(doc) || self.subscription.covers_kind(kind)
    }

    /// The subscription itself.
    pub fn subscription(&self) -> &Subscription {
        &self.subscription
    }
}

/// Where a device is in a relay's change feed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The relay database's epoch: a cursor from another epoch means nothing.
    pub epoch: u64,
    /// The device holds every change in its subscription up to this feed sequence.
    pub seq: u64,
    /// The subscription the cursor was earned under (documents newly in scope are sent
    /// whole).
    pub subscription: Subscription,
}

/// The relay accepts a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version the relay will speak on this stream.
    pub protocol_version: u16,
    /// A name of the relay, for logs.
    pub relay: String,
    /// The relay database's epoch.
    pub epoch: u64,
    /// The part of the device's subscription its token allows: what it will receive.
    pub granted: Subscription,
    /// `Some(ms offline)` if the device is in quarantine: its pushes are held for a
    /// lead's review.
    pub quarantined: Option<i64>,
}

/// One step of the per-document exchange.
///
/// `data` is an encoded `automerge::sync::Message`, or `None` when the sender has nothing
/// new to say but gives the other side its turn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStep {
    /// The document.
    pub doc: DocId,
    /// The encoded Automerge sync message, if any.
    #[serde(with = "serde_bytes")]
    pub data: Option<Vec<u8>>,
}

/// The relay has flushed `heads` of `doc` to disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The document.
    pub doc: DocId,
    /// The relay's heads after the durable write.
    pub heads: Vec<[u8; 32]>,
    /// How many changes from this device's push or step were new to the relay.
    pub applied: u32,
}

/// A device's changes that the relay has not acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    /// The document.
    pub doc: DocId,
    /// An Automerge bundle of the changes (compressed, ≈12 bytes per change).
    #[serde(with = "serde_bytes")]
    pub bundle: Vec<u8>,
    /// The device's heads including these changes.
    pub heads: Vec<[u8; 32]>,
}

/// The end of a device's flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pull {
    /// Where the device is in this relay's feed (`None`: send everything in scope).
    pub cursor: Option<Cursor>,
    /// Transfers the device holds part of: the relay resumes them at these offsets
    /// (if it would send the very same bytes again; ids are content hashes).
    pub resume: Vec<UploadOffset>,
    /// The device's data budget holds large downloads back: announce them (as
    /// transfers) but do not send their bytes; the device keeps its old cursor and asks
    /// again when conditions allow.
    pub defer_large: bool,
}

/// What a device lacks of one document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// The document.
    pub doc: DocId,
    /// A bundle of changes, or a whole saved document.
    pub payload: Payload,
    /// The relay's heads of the document when this was made; empty for a device that
    /// said [`ext::HELLO_DERIVES_HEADS`] (it takes the heads of what it applied).
    pub heads: Vec<[u8; 32]>,
}

/// The bytes of an [`Update`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// An Automerge bundle of changes; for a device that said
    /// [`ext::HELLO_ACCEPTS_CHUNKS`], possibly several bundles one after another.
    Bundle(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A whole document, as Automerge `save()` bytes.
    Document(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Too large for one message: it follows as a transfer with this id on its own stream.
    Transfer {
        /// The transfer's id.
        id: [u8; 16],
        /// Total bytes.
        len: u64,
        /// Whether the bytes are a saved document (else a bundle).
        document: bool,
    },
}

/// Starts or resumes a large transfer of `len` bytes for `doc`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    /// Content-derived id: the same bytes always have the same id, so a resumed transfer is
    /// recognised.
    pub id: [u8; 16],
    /// The document.
    pub doc: DocId,
    /// Total bytes.
    pub len: u64,
    /// Whether the bytes are a saved document (else a bundle).
    pub document: bool,
    /// The sender's heads including this payload.
    pub heads: Vec<[u8; 32]>,
}

/// The receiver holds `have` bytes of transfer `id` durably (uploads and downloads).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadOffset {
    /// The transfer.
    pub id: [u8; 16],
    /// Bytes held.
    pub have: u64,
}

/// Bytes `offset..offset + data.len()` of transfer `id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// The transfer.
    pub id: [u8; 16],
    /// Where the bytes go.
    pub offset: u64,
    /// The bytes (at most [`MAX_PIECE`]).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// An error a peer reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReport {
    /// Stable machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation (never contains household personal data).
    pub text: String,
    /// The document concerned, if the error is about one.
    pub doc: Option<DocId>,
}

/// A stable error code. Codes are never reused; unknown codes from a newer peer are kept
/// as numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// A frame could not be read (bad length, over the size limit).
    pub const BAD_FRAME: Self = Self(1);
    /// A frame held bytes that are not a valid message.
    pub const BAD_MESSAGE: Self = Self(2);
    /// The peer's protocol version is not supported.
    pub const UNSUPPORTED_VERSION: Self = Self(3);
    /// A valid message arrived at the wrong time (e.g. sync before hello).
    pub const PROTOCOL_VIOLATION: Self = Self(4);
    /// The Automerge data in a sync step is invalid; nothing was stored.
    pub const BAD_DOCUMENT_DATA: Self = Self(5);
    /// The relay could not write to its storage; nothing was acknowledged.
    pub const STORAGE_FAILURE: Self = Self(6);
    /// No valid credentials.
    pub const UNAUTHORIZED: Self = Self(7);
    /// The credentials do not allow this document.
    pub const FORBIDDEN: Self = Self(8);
    /// A size limit was exceeded.
    pub const TOO_LARGE: Self = Self(9);
    /// The exchange for a document did not settle within the round limit.
    pub const SYNC_DID_NOT_SETTLE: Self = Self(10);
    /// The relay is shutting down; reconnect later.
    pub const SHUTTING_DOWN: Self = Self(11);
    /// An unexpected relay failure.
    pub const INTERNAL: Self = Self(12);
    /// A transfer's bytes do not match its id.
    pub const BAD_TRANSFER: Self = Self(13);
    /// The token has expired: the device needs a new one.
    pub const TOKEN_EXPIRED: Self = Self(14);
    /// The token was revoked by an operator.
    pub const TOKEN_REVOKED: Self = Self(15);
    /// The connection sent faster than its limits allow; it was closed.
    pub const RATE_LIMITED: Self = Self(16);
    /// The peer was silent too long on a stream that needed an answer.
    pub const TIMED_OUT: Self = Self(17);
    /// The device was offline longer than the relay's horizon: its changes are held for
    /// a lead's review (kept, not merged yet).
    pub const QUARANTINED: Self = Self(18);
    /// A per-device quota of the relay (staged uploads, held changes, new documents per
    /// day) would be exceeded; nothing was stored.
    pub const QUOTA_EXCEEDED: Self = Self(19);

    /// Whether the code says the device's credentials are not valid (no token, expired,
    /// revoked): retrying without a new token cannot succeed.
    pub fn is_credential(self) -> bool {
        matches!(
            self,
            Self::UNAUTHORIZED | Self::TOKEN_EXPIRED | Self::TOKEN_REVOKED
        )
    }

    /// The code's name, or `unknown` for codes from a newer peer.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "bad_frame",
            2 => "bad_message",
            3 => "unsupported_version",
            4 => "protocol_violation",
            5 => "bad_document_data",
            6 => "storage_failure",
            7 => "unauthorized",
            8 => "forbidden",
            9 => "too_large",
            10 => "sync_did_not_settle",
            11 => "shutting_down",
            12 => "internal",
            13 => "bad_transfer",
            14 => "token_expired",
            15 => "token_revoked",
            16 => "rate_limited",
            17 => "timed_out",
            18 => "quarantined",
            19 => "quota_exceeded",
            _ => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}
