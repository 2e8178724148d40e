//! The QUIC driver of one resumable upload stream: performs the steps
//! `session::UploadStream` decides (reads and writes on the stream, the staging of
//! pieces, the flush, the commit) and feeds their results back.
//!
//! A cut connection leaves the staged pieces on the relay; the device resumes on a new
//! connection. The newest stream of an upload takes it over ([`Staging`]): the stream of
//! the cut connection stops at its next step instead of writing beside it.

use std::sync::Arc;
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use redline_proto::message::Message;
use redline_proto::{DocId, ErrorCode};

use super::RateLimit;
use super::admission::{admit, hold, now_ms};
use super::frames::{read_message, write_message};
use crate::Error;
use crate::config::RelayConfig;
use crate::hub::bundle_changes;
use crate::hub::staging::Arrival;
#[cfg(doc)]
use crate::hub::staging::Staging;
use crate::session::error_msg;
use crate::session::{
    Admission, Known, Outcome, Staged, UploadAction, UploadInput, UploadLimits, UploadStream,
    Verdict, held_entry, reply,
};
use crate::state::RelayState;

/// What an upload stream needs from its connection.
pub(super) struct UploadCtx {
    pub relay: Arc<RelayState>,
    pub config: Arc<RelayConfig>,
    /// Who uploads, and what the admission rule needs to know of it.
    pub who: Admission,
    pub known: Known,
    pub rate: RateLimit,
    /// Which of the device's connections this is (see [`crate::hub::staging`]).
    pub arrival: Arrival,
}

/// The stream's two halves and their deadlines.
struct Stream {
    send: SendStream,
    recv: RecvStream,
    max_frame: usize,
    idle: Duration,
    write_timeout: Duration,
}

impl Stream {
    async fn read(&mut self) -> Result<Option<Message>, Error> {
        read_message(&mut self.recv, self.max_frame, Some(self.idle), self.idle).await
    }

    async fn write(&mut self, msg: &Message) -> Result<(), Error> {
        write_message(&mut self.send, msg, self.max_frame, self.write_timeout).await
    }

    /// The device's next message as the upload's input: a frame that cannot be read
    /// (too large, undecodable) ends the upload with the words for it; a lost stream or
    /// a message over the connection's rate is an error.
    async fn next_input(&mut self, rate: &RateLimit) -> Result<UploadInput, Error> {
        Ok(match self.read().await {
            Ok(Some(msg)) => {
                rate.check()?;
                UploadInput::Message(msg)
            }
            Ok(None) => UploadInput::Ended(None),
            Err(Error::Refused { code, text }) => UploadInput::Ended(Some((code, text))),
            Err(Error::Protocol(p)) => UploadInput::Ended(Some((p.code(), p.to_string()))),
            Err(e) => return Err(e),
        })
    }

    /// Writes the stream's last message and finishes it.
    async fn answer(mut self, msg: &Message) -> Result<(), Error> {
        self.write(msg).await?;
        let _ = self.send.finish();
        Ok(())
    }
}

/// Runs one upload stream to its end: performs `UploadStream`'s actions and feeds
/// their results back.
pub(super) async fn upload(
    send: SendStream,
    recv: RecvStream,
    ctx: UploadCtx,
) -> Result<(), Error> {
    let mut stream = Stream {
        send,
        recv,
        max_frame: ctx.config.max_frame,
        idle: ctx.config.limits.stream_idle_timeout,
        write_timeout: ctx.config.limits.write_timeout,
    };
    let mut up = UploadRun::new(ctx);
    while let Some(action) = up.machine.poll_action() {
        let input = match up.perform(action).await? {
            Performed::Input(input) => input,
            Performed::Nothing => continue,
            Performed::Read => stream.next_input(&up.ctx.rate).await?,
            Performed::Send(msg) => {
                stream.write(&msg).await?;
                continue;
            }
            Performed::Answer(msg) => return stream.answer(&msg).await,
            Performed::Fail(e) => {
                let _ = stream.send.finish();
                return Err(e);
            }
        };
        up.machine.handle(input);
    }
    Err(Error::Storage(
        "upload stream stopped without an answer".into(),
    ))
}

/// One upload stream's machine with what it holds on the relay: shared by the QUIC
/// driver above and the loopback's.
pub(super) struct UploadRun {
    pub machine: UploadStream,
    pub ctx: UploadCtx,
    ticket: Option<Ticket>,
}

/// What performing one [`UploadAction`] left to the stream's driver.
pub(super) enum Performed {
    /// Feed this to the machine.
    Input(UploadInput),
    /// Nothing to feed: poll the next action.
    Nothing,
    /// Read the device's next message and feed it.
    Read,
    /// Write this message on the stream.
    Send(Message),
    /// Write this last message and finish the stream.
    Answer(Message),
    /// Cut the stream with this error.
    Fail(Error),
}

impl UploadRun {
    pub fn new(ctx: UploadCtx) -> Self {
        let limits = UploadLimits {
            max_document_bytes: ctx.config.max_document_bytes,
            staged_bytes_per_device: ctx.config.quotas.staged_bytes_per_device,
        };
        Self {
            machine: UploadStream::new(ctx.who.scope.clone(), limits),
            ctx,
            ticket: None,
        }
    }

    /// Performs one action on the relay's state; the stream's own steps (read, write,
    /// finish, cut) go back to the driver.
    pub async fn perform(&mut self, action: UploadAction) -> Result<Performed, Error> {
        let ctx = &self.ctx;
        Ok(Performed::Input(match action {
            UploadAction::Read => return Ok(Performed::Read),
            UploadAction::Send(msg) => return Ok(Performed::Send(msg)),
            UploadAction::Answer(msg) => return Ok(Performed::Answer(msg)),
            UploadAction::Fail(e) => return Ok(Performed::Fail(e)),
            UploadAction::DeviceHolds(doc, heads) => {
                ctx.known.add(&doc, &heads);
                return Ok(Performed::Nothing);
            }
            UploadAction::CheckHeld(doc, heads) => held(&ctx.relay, &doc, &heads).await?,
            UploadAction::Take(id) => {
                let device = ctx.who.author.device.to_string();
                let key = format!("{device}|{}", hex::encode(id)).into_bytes();
                match Ticket::take(&ctx.relay, key, ctx.arrival).await? {
                    Some(t) => {
                        let input = UploadInput::Taken {
                            have: t.have,
                            staged: t.staged_bytes().await?,
                        };
                        self.ticket = Some(t);
                        input
                    }
                    None => UploadInput::Stale,
                }
            }
            UploadAction::Stage { offset, data } => {
                let quota = ctx.config.quotas.staged_bytes_per_device;
                UploadInput::Staged(taken(&self.ticket)?.stage(offset, data, quota).await?)
            }
            UploadAction::Flush => {
                ctx.relay.hub.flush().await?;
                UploadInput::Flushed
            }
            UploadAction::ReadBytes => UploadInput::Bytes(taken(&self.ticket)?.bytes().await?),
            UploadAction::Commit(doc, bytes) => {
                UploadInput::Committed(commit(ctx, doc, bytes).await)
            }
            UploadAction::DropStaged => {
                if let Some(t) = self.ticket.take() {
                    t.finish().await;
                }
                return Ok(Performed::Nothing);
            }
            UploadAction::QuotaRefused(quota) => {
                ctx.relay.metrics.quota_refused(quota);
                return Ok(Performed::Nothing);
            }
        }))
    }
}

/// The ticket of a stream that took its upload over.
fn taken(ticket: &Option<Ticket>) -> Result<&Ticket, Error> {
    ticket
        .as_ref()
        .ok_or_else(|| Error::Storage("an upload step before the upload was taken over".into()))
}

/// Whether the relay holds every one of `heads` of `doc`, and its heads of it.
async fn held(
    relay: &Arc<RelayState>,
    doc: &DocId,
    heads: &[automerge::ChangeHash],
) -> Result<UploadInput, Error> {
    let slot = relay.hub.slot(doc).await?;
    let state = slot.lock().await;
    let all = heads
        .iter()
        .all(|h| state.doc.get_change_meta_by_hash(h).is_some());
    let now = state.doc.get_heads();
    drop(state);
    relay.hub.release(slot);
    Ok(UploadInput::Held { all, heads: now })
}

/// Admits and commits (or holds) the uploaded bytes: the answer to the device.
async fn commit(ctx: &UploadCtx, doc: DocId, bytes: Vec<u8>) -> Message {
    let changes = match bundle_changes(&bytes) {
        Ok(c) => c,
        Err(e) => return error_msg(ErrorCode::BAD_DOCUMENT_DATA, e, Some(doc)),
    };
    let (relay, who) = (&ctx.relay, &ctx.who);
    match admit(relay, who, &doc, &changes).await {
        Verdict::Refuse(code, text) => error_msg(code, text, Some(doc)),
        Verdict::Hold { starts } => {
            let device = &who.author.device;
            let quarantined = if starts {
                Some(relay.devices.mark_quarantined(device))
            } else {
                who.quarantined
            };
            let entry = held_entry(
                device,
                &who.scope,
                quarantined,
                &doc,
                changes.len(),
                now_ms(),
            );
            let quota = ctx.config.quotas.held_bytes_per_device;
            let held = hold(relay, entry, bytes, quota).await;
            reply(doc, held)
        }
        Verdict::Accept => {
            ctx.known.add_own(&doc, &changes);
            let pushed: Vec<_> = changes.iter().map(|c| c.hash()).collect();
            let committed = relay.hub.push(&doc, &who.author, changes).await;
            let seq = committed.as_ref().ok().map(|c| c.seq);
            ctx.known.settle_own(&doc, &pushed, seq);
            reply(doc, committed.map(Outcome::Committed))
        }
    }
}

/// This stream's ownership of one upload key; released when dropped.
struct Ticket {
    relay: Arc<RelayState>,
    key: Vec<u8>,
    number: u64,
    /// Bytes the relay held when this stream took the upload over.
    have: u64,
}

impl Ticket {
    /// Takes `key` over from any older stream, and reads what is held of it, as one step;
    /// `None` when a stream of a later connection of the device than `arrival` owns it.
    async fn take(
        relay: &Arc<RelayState>,
        key: Vec<u8>,
        arrival: Arrival,
    ) -> Result<Option<Self>, Error> {
        let r = relay.clone();
        let k = key.clone();
        let taken = tokio::task::spawn_blocking(move || {
            let mut staging = r.hub.staging.lock().expect("staging lock");
            let number = staging.take_over(&k, arrival)?;
            Some((number, r.hub.storage().upload_len(&k)))
        })
        .await?;
        let Some((number, have)) = taken else {
            return Ok(None);
        };
        // Built before the `?`: an error still releases the key.
        let mut ticket = Self {
            relay: relay.clone(),
            key,
            number,
            have: 0,
        };
        ticket.have = have?;
        Ok(Some(ticket))
    }

    /// What this device has staged over all its uploads.
    async fn staged_bytes(&self) -> Result<u64, Error> {
        let storage = self.relay.hub.storage();
        let prefix = self.prefix();
        tokio::task::spawn_blocking(move || storage.staged_bytes(&prefix)).await?
    }

    /// The device's part of the key (`device|`), shared by all its uploads.
    fn prefix(&self) -> Vec<u8> {
        let end = self
            .key
            .iter()
            .position(|b| *b == b'|')
            .map_or(0, |i| i + 1);
        self.key[..end].to_vec()
    }

    /// Stores one piece if this stream still owns the upload and the device stays
    /// within `quota`; the checks and the write are one step, so a device's concurrent
    /// uploads cannot together pass the quota.
    async fn stage(&self, offset: u64, data: Vec<u8>, quota: u64) -> Result<Staged, Error> {
        let (r, k, prefix, number) = (
            self.relay.clone(),
            self.key.clone(),
            self.prefix(),
            self.number,
        );
        let now = crate::auth::now_secs();
        tokio::task::spawn_blocking(move || {
            let staging = r.hub.staging.lock().expect("staging lock");
            if !staging.owns(&k, number) {
                return Ok(Staged::Superseded);
            }
            let s = r.hub.storage();
            if s.staged_bytes(&prefix)?.saturating_add(data.len() as u64) > quota {
                return Ok(Staged::OverQuota);
            }
            if let Err(e) = s.put_piece(&k, offset, &data) {
                // Another relay's stream of this upload (the phone failed over while
                // the old stream still wrote) may have stored these bytes first: the
                // upload's id is their hash, so what is held is what this piece holds
                // (the commit checks the hash of the whole). Then the piece is stored.
                let held = s.upload_len(&k)?;
                let end = offset.saturating_add(data.len() as u64);
                if held < end {
                    return Err(e);
                }
            }
            s.touch_upload(&k, now)?;
            Ok(Staged::Stored)
        })
        .await?
    }

    /// Every staged byte, or `None` when a newer stream took the upload over.
    async fn bytes(&self) -> Result<Option<Vec<u8>>, Error> {
        let (r, k, number) = (self.relay.clone(), self.key.clone(), self.number);
        tokio::task::spawn_blocking(move || {
            let staging = r.hub.staging.lock().expect("staging lock");
            if !staging.owns(&k, number) {
                return Ok(None);
            }
            r.hub.storage().upload_bytes(&k).map(Some)
        })
        .await?
    }

    /// Drops the staged pieces (the upload is answered), unless a newer stream owns them.
    async fn finish(self) {
        let (r, k, number) = (self.relay.clone(), self.key.clone(), self.number);
        let _ = tokio::task::spawn_blocking(move || {
            let staging = r.hub.staging.lock().expect("staging lock");
            if staging.owns(&k, number) {
                let _ = r.hub.storage().drop_upload(&k);
            }
        })
        .await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.relay
            .hub
            .staging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(&self.key, self.number);
    }
}
