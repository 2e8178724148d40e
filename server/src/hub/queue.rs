//! A push waiting for its document's group commit, and what the commit did for its
//! sender.

use automerge::{Change, ChangeHash};
use tokio::sync::oneshot;

use crate::Error;
use crate::authorship::Author;

/// A push queued on its document's slot, answered when the commit that takes it lands.
pub(super) struct PendingPush {
    pub(super) author: Author,
    pub(super) changes: Vec<Change>,
    /// The bytes the changes came in, as the device sent them (through the intake,
    /// which decoded exactly `changes` from them): stored as the commit's chunk when
    /// the push brings only new changes, instead of encoding them again.
    pub(super) as_sent: Option<Vec<u8>>,
    pub(super) reply: oneshot::Sender<Result<Committed, Error>>,
}

/// What a commit did for one sender.
#[derive(Clone, Debug)]
pub struct Committed {
    /// The document's heads after the commit (durable).
    pub heads: Vec<ChangeHash>,
    /// How many of the sender's changes were new to the relay.
    pub applied: u32,
    /// The feed sequence at or below which the sender's changes are stored: the
    /// commit's own, or (nothing new) the last one when it was answered.
    pub seq: u64,
}
