//! The Redline protocol: what devices and the relay say to each other.
//!
//! - [`ids`]: validated document, team, zone, day and device identifiers;
//! - [`message`]: the versioned messages and stable [`ErrorCode`]s;
//! - [`genesis`]: the first change of every document, identical on every device;
//! - [`codec`]: length-prefixed frames with a size limit checked before allocating;
//! - [`session`]: sans-IO state machines driving the per-document exchange on both ends;
//! - [`token`]: the signed device tokens the relay issues and checks.
//!
//! No sockets, no clock, no disk: the drivers in `redline-client` and `redline-server` move
//! the bytes.
//!
//! ```
//! use redline_proto::{codec, message::*, DeviceId};
//! let hello = Message::Hello(Hello {
//!     protocol_version: PROTOCOL_VERSION,
//!     device: DeviceId::new("phone-7").unwrap(),
//!     app_version: "1.0".into(),
//!     subscription: Subscription::default(),
//!     token: "rl1.…".into(),
//! });
//! let frame = codec::encode_frame(&hello, codec::DEFAULT_MAX_FRAME).unwrap();
//! let mut decoder = codec::FrameDecoder::new(codec::DEFAULT_MAX_FRAME);
//! decoder.push(&frame);
//! assert_eq!(decoder.next_message().unwrap(), Some(hello));
//! ```

pub mod codec;
pub mod genesis;
pub mod ids;
pub mod message;
pub mod session;
pub mod token;
pub mod wire;

pub use ids::{Day, DeviceId, DocId, DocKind, MemberId, OrgId, TeamId, ZoneId};
pub use message::{ALPN, ErrorCode, MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION};

/// Everything that can go wrong in the protocol layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An identifier broke its rule.
    #[error("invalid {what} {value:?}: expected {rule}")]
    InvalidId {
        /// What kind of identifier.
        what: &'static str,
        /// The offending text (cut to 80 characters).
        value: String,
        /// The rule it broke.
        rule: &'static str,
    },
    /// A frame announced more bytes than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced or actual payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame announced zero bytes.
    #[error("empty frame")]
    EmptyFrame,
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({have} bytes left over)")]
    Truncated {
        /// Bytes of the partial frame.
        have: usize,
    },
    /// A message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// A frame's payload is not a valid message.
    #[error("malformed message: {0}")]
    Decode(String),
    /// The peer speaks a protocol version this build no longer serves.
    #[error(
        "the device speaks protocol version {theirs}, this relay serves versions {oldest} to {newest}: update the app"
    )]
    UnsupportedVersion {
        /// The peer's version.
        theirs: u16,
        /// The oldest version served.
        oldest: u16,
        /// The newest version spoken.
        newest: u16,
    },
    /// A message of a kind this build does not know (a peer sends only kinds of the
    /// negotiated version: this is garbage or a broken peer).
    #[error("message kind {index} is unknown to this build")]
    UnknownMessage {
        /// The kind's index on the wire.
        index: u32,
    },
    /// A valid message arrived when it makes no sense.
    #[error("protocol violation: {0}")]
    ProtocolViolation(String),
    /// The Automerge sync data for a document could not be decoded.
    #[error("invalid sync data for {doc}: {reason}")]
    BadSyncData {
        /// The document.
        doc: DocId,
        /// Why.
        reason: String,
    },
    /// Automerge refused the changes for a document.
    #[error("document {doc} refused the changes: {reason}")]
    Automerge {
        /// The document.
        doc: DocId,
        /// Automerge's reason.
        reason: String,
    },
    /// A document's exchange went on too long.
    #[error("sync of {doc} did not settle after {rounds} rounds")]
    SyncDidNotSettle {
        /// The document.
        doc: DocId,
        /// Rounds done.
        rounds: u32,
    },
    /// A subscription lists more documents by id than allowed.
    #[error("a subscription lists {listed} documents by id; the limit is {max}")]
    TooManyDocuments {
        /// Documents listed.
        listed: usize,
        /// The limit.
        max: usize,
    },
    /// The peer reported an error.
    #[error("peer reported {code}: {text}")]
    Remote {
        /// Its code.
        code: ErrorCode,
        /// Its text.
        text: String,
    },
}

impl Error {
    /// The code to report to the peer for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::FrameTooLarge { .. } | Error::TooManyDocuments { .. } => ErrorCode::TOO_LARGE,
            Error::EmptyFrame | Error::Truncated { .. } => ErrorCode::BAD_FRAME,
            Error::Decode(_) | Error::InvalidId { .. } | Error::UnknownMessage { .. } => {
                ErrorCode::BAD_MESSAGE
            }
            Error::UnsupportedVersion { .. } => ErrorCode::UNSUPPORTED_VERSION,
            Error::ProtocolViolation(_) => ErrorCode::PROTOCOL_VIOLATION,
            Error::BadSyncData { .. } | Error::Automerge { .. } => ErrorCode::BAD_DOCUMENT_DATA,
            Error::SyncDidNotSettle { .. } => ErrorCode::SYNC_DID_NOT_SETTLE,
            Error::Remote { code, .. } => *code,
            Error::Encode(_) => ErrorCode::INTERNAL,
        }
    }

    /// The document the error concerns, if any.
    pub fn doc(&self) -> Option<&DocId> {
        match self {
            Error::BadSyncData { doc, .. }
            | Error::Automerge { doc, .. }
            | Error::SyncDidNotSettle { doc, .. } => Some(doc),
            _ => None,
        }
    }
}
