//! What a sync session reports when it ends.

use std::time::Duration;

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Documents the device holds.
    pub docs: usize,
    /// Documents with changes pushed to the relay.
    pub docs_pushed: usize,
    /// Documents that received changes from the relay.
    pub docs_updated: usize,
    /// Documents that needed Automerge's sync protocol (stale knowledge).
    pub docs_resynced: usize,
    /// Documents the relay refused, with its reason.
    pub refused: Vec<(String, String)>,
    /// Documents this sync did not send because of the data or battery policy, with the
    /// reason; they go when conditions allow.
    pub deferred: Vec<(String, String)>,
    /// Changes the relay reported as new to it (stored before acknowledging).
    pub changes_sent: u64,
    /// Changes received from the relay.
    pub changes_received: u64,
    /// Bytes sent on all streams (frames, before QUIC and TLS overhead).
    pub bytes_sent: u64,
    /// Bytes received on all streams.
    pub bytes_received: u64,
    /// Frames sent.
    pub frames_sent: u64,
    /// Frames received.
    pub frames_received: u64,
    /// Times the device sent and then had to wait for the relay.
    pub round_trips: u32,
    /// Connections abandoned because the relay did not answer the device's hello in time
    /// (a handshake stalled by lost datagrams); each was replaced by a fresh one.
    pub reconnects: u32,
    /// Wall time, connection set-up included.
    pub duration: Duration,
    /// The protocol version spoken with the relay (its `Welcome`; 0 before one).
    pub protocol_version: u16,
    /// The oldest and newest protocol versions the relay serves, when it says (version
    /// 2 relays do). An app whose newest version is the relay's oldest is the last one
    /// the relay still serves: time to update.
    pub relay_versions: Option<(u16, u16)>,
}
