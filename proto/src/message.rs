//! The messages devices and the relay exchange, and their stable error codes.
//!
//! Messages are encoded with postcard (a compact, schema-less serde format) inside
//! length-prefixed frames (see [`crate::codec`]). Compatibility rules: variants and fields
//! are only ever appended, never reordered or removed; a peer announces its
//! [`PROTOCOL_VERSION`] in [`Hello`] and the relay refuses versions it cannot speak with
//! [`ErrorCode::UNSUPPORTED_VERSION`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, DocId};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// The QUIC ALPN token of protocol version 1. A peer offering anything else is refused
/// during the TLS handshake.
pub const ALPN: &[u8] = b"redline/1";

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message of a device on a stream.
    Hello(Hello),
    /// The relay's answer to a [`Hello`] it accepts.
    Welcome(Welcome),
    /// One step of Automerge's sync protocol for one document, either way.
    Sync(SyncStep),
    /// The relay holds `heads` of `doc` durably on disk.
    Ack(Ack),
    /// Something went wrong; see the code.
    Error(ErrorReport),
}

impl Message {
    /// A short name of the message kind, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Sync(_) => "sync",
            Message::Ack(_) => "ack",
            Message::Error(_) => "error",
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
}

/// The relay accepts a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version the relay will speak on this stream.
    pub protocol_version: u16,
    /// A name of the relay, for logs.
    pub relay: String,
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
    /// How many changes from this device's last step were new to the relay.
    pub applied: u32,
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
            _ => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}
