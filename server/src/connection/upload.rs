//! One resumable upload on its own stream.
//!
//! The device names the upload (`Upload`: document, length, id = hash of the bytes,
//! heads), the relay answers the offset it already holds, the device sends pieces from
//! there and the relay acknowledges each once flushed. When every byte is held, the
//! bytes go through the same intake, admission and commit as a push, and the stream
//! ends with the push's answer.
//!
//! A cut connection leaves the staged pieces on the relay; the device resumes on a new
//! connection. The newest stream of an upload takes it over ([`Staging`]): the stream of
//! the cut connection stops at its next step instead of writing beside it.

use std::sync::Arc;
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use redline_proto::message::{Ack, Message, Upload, UploadOffset};
use redline_proto::session::{hashes_from_wire, hashes_to_wire};
use redline_proto::wire::transfer_id;
use redline_proto::{DocId, ErrorCode};

use super::RateLimit;
use super::admission::{admit, hold, now_ms};
use super::frames::{error_msg, read_message, write_message};
use crate::Error;
use crate::config::RelayConfig;
use crate::hub::bundle_changes;
#[cfg(doc)]
use crate::hub::staging::Staging;
use crate::session::{Admission, Known, Outcome, Verdict, forbidden, held_entry, reply};
use crate::state::RelayState;

/// What an upload stream needs from its connection.
pub(super) struct UploadCtx {
    pub relay: Arc<RelayState>,
    pub config: Arc<RelayConfig>,
    /// Who uploads, and what the admission rule needs to know of it.
    pub who: Admission,
    pub known: Known,
    pub rate: RateLimit,
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

    /// Writes the stream's last message and finishes it.
    async fn answer(mut self, msg: &Message) -> Result<(), Error> {
        self.write(msg).await?;
        let _ = self.send.finish();
        Ok(())
    }
}

/// Runs one upload stream to its end.
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
    let up = opening(&mut stream, &ctx).await?;
    if let Some(answer) = refusal(&ctx, &up).await? {
        return stream.answer(&answer).await;
    }
    let device = ctx.who.author.device.to_string();
    let key = format!("{device}|{}", hex::encode(up.id)).into_bytes();
    let ticket = Ticket::take(&ctx.relay, key).await?;
    let quota = ctx.config.quotas.staged_bytes_per_device;
    let staged = ticket.staged_bytes().await?;
    if staged.saturating_add(up.len.saturating_sub(ticket.have)) > quota {
        ctx.relay.metrics.quota_refused("staged_bytes_per_device");
        let text = format!(
            "this phone has {staged} bytes of unfinished uploads on the relay; with this one it would pass the limit of {quota} (unfinished uploads expire)"
        );
        let refused = error_msg(ErrorCode::QUOTA_EXCEEDED, text, Some(up.doc));
        return stream.answer(&refused).await;
    }
    let have = ticket.have;
    stream
        .write(&Message::UploadOffset(UploadOffset { id: up.id, have }))
        .await?;
    if let Some(answer) = receive(&mut stream, &ctx, &up, &ticket).await? {
        return stream.answer(&answer).await;
    }
    let Some(bytes) = ticket.bytes().await? else {
        return stream.answer(&superseded(&up.doc)).await;
    };
    let reply = commit(&ctx, &up, bytes).await;
    ticket.finish().await;
    stream.answer(&reply).await
}

/// Reads the stream's first message, which must be an `Upload`.
async fn opening(stream: &mut Stream, ctx: &UploadCtx) -> Result<Upload, Error> {
    let first = stream.read().await;
    if let Err(e @ (Error::Refused { .. } | Error::Protocol(_))) = &first {
        let (code, text) = match e {
            Error::Refused { code, text } => (*code, text.clone()),
            Error::Protocol(p) => (p.code(), p.to_string()),
            _ => unreachable!("matched above"),
        };
        let _ = stream.write(&error_msg(code, text.clone(), None)).await;
        let _ = stream.send.finish();
        return Err(Error::Refused { code, text });
    }
    ctx.rate.check()?;
    match first? {
        Some(Message::Upload(up)) => Ok(up),
        _ => {
            let text = "a stream must start with an upload";
            let _ = stream
                .write(&error_msg(ErrorCode::PROTOCOL_VIOLATION, text, None))
                .await;
            Err(Error::Refused {
                code: ErrorCode::PROTOCOL_VIOLATION,
                text: text.into(),
            })
        }
    }
}

/// The answer that ends an upload before any piece: not this device's document, too
/// large, or already committed (the ack of an earlier attempt was lost).
async fn refusal(ctx: &UploadCtx, up: &Upload) -> Result<Option<Message>, Error> {
    if !ctx.who.scope.can_write(&up.doc) {
        return Ok(Some(forbidden(&up.doc)));
    }
    if up.len > ctx.config.max_document_bytes {
        let text = format!(
            "upload of {} bytes exceeds the limit of {}",
            up.len, ctx.config.max_document_bytes
        );
        return Ok(Some(error_msg(
            ErrorCode::TOO_LARGE,
            text,
            Some(up.doc.clone()),
        )));
    }
    // The device holds what it uploads: never send it back.
    let pushed = hashes_from_wire(&up.heads);
    ctx.known.add(&up.doc, &pushed);
    if pushed.is_empty() {
        return Ok(None);
    }
    let slot = ctx.relay.hub.slot(&up.doc).await?;
    let state = slot.lock().await;
    let committed = pushed
        .iter()
        .all(|h| state.doc.get_change_meta_by_hash(h).is_some());
    let heads = hashes_to_wire(&state.doc.get_heads());
    drop(state);
    ctx.relay.hub.release(slot);
    Ok(committed.then(|| {
        Message::Ack(Ack {
            doc: up.doc.clone(),
            heads,
            applied: 0,
        })
    }))
}

/// Receives pieces until every byte is staged. `Some` is the answer that ends the
/// stream early (quota reached, or a newer stream took the upload over).
async fn receive(
    stream: &mut Stream,
    ctx: &UploadCtx,
    up: &Upload,
    ticket: &Ticket,
) -> Result<Option<Message>, Error> {
    let quota = ctx.config.quotas.staged_bytes_per_device;
    let mut have = ticket.have;
    while have < up.len {
        let Some(Message::Piece(p)) = stream.read().await? else {
            return Err(Error::connection_lost("upload stream ended early"));
        };
        ctx.rate.check()?;
        if p.id != up.id
            || p.offset != have
            || p.data.len() > redline_proto::message::MAX_PIECE
            || have + p.data.len() as u64 > up.len
        {
            let text = "piece out of place";
            stream
                .write(&error_msg(
                    ErrorCode::BAD_TRANSFER,
                    text,
                    Some(up.doc.clone()),
                ))
                .await?;
            return Err(Error::connection_lost("bad piece"));
        }
        let n = p.data.len() as u64;
        match ticket.stage(p.offset, p.data, quota).await? {
            Staged::Stored => {}
            Staged::OverQuota => {
                ctx.relay.metrics.quota_refused("staged_bytes_per_device");
                let text = format!(
                    "this phone's unfinished uploads on the relay reached the limit of {quota} bytes (unfinished uploads expire)"
                );
                let doc = Some(up.doc.clone());
                return Ok(Some(error_msg(ErrorCode::QUOTA_EXCEEDED, text, doc)));
            }
            Staged::Superseded => return Ok(Some(superseded(&up.doc))),
        }
        ctx.relay.hub.flush().await?;
        have += n;
        stream
            .write(&Message::UploadOffset(UploadOffset { id: up.id, have }))
            .await?;
    }
    Ok(None)
}

/// Admits and commits (or holds) the uploaded bytes: the answer to the device.
async fn commit(ctx: &UploadCtx, up: &Upload, bytes: Vec<u8>) -> Message {
    let doc = up.doc.clone();
    if transfer_id(&bytes) != up.id {
        let text = "upload bytes do not match their id";
        return error_msg(ErrorCode::BAD_TRANSFER, text, Some(doc));
    }
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

/// The answer to a stream whose upload a newer stream took over.
fn superseded(doc: &DocId) -> Message {
    error_msg(
        ErrorCode::BAD_TRANSFER,
        "a newer connection of this phone took this upload over",
        Some(doc.clone()),
    )
}

/// What storing one piece came to.
enum Staged {
    Stored,
    OverQuota,
    Superseded,
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
    /// Takes `key` over from any older stream, and reads what is held of it, as one step.
    async fn take(relay: &Arc<RelayState>, key: Vec<u8>) -> Result<Self, Error> {
        let r = relay.clone();
        let k = key.clone();
        let (number, have) = tokio::task::spawn_blocking(move || {
            let mut staging = r.hub.staging.lock().expect("staging lock");
            let number = staging.take_over(&k);
            let have = r.hub.storage().upload_len(&k);
            (number, have)
        })
        .await?;
        // Built before the `?`: an error still releases the key.
        let mut ticket = Self {
            relay: relay.clone(),
            key,
            number,
            have: 0,
        };
        ticket.have = have?;
        Ok(ticket)
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
            s.put_piece(&k, offset, &data)?;
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
