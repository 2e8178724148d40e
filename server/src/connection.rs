//! One device connection.
//!
//! The first bidirectional stream is the *control* stream: `Hello`, pushes, `Pull`,
//! fallback `Sync` steps from the device; `Welcome`, acks, updates, `Caught` from the
//! relay. Every further bidirectional stream the device opens is one resumable upload.
//! Large updates go to the device on their own unidirectional streams, so one big
//! document never holds up the others.
//!
//! After the first `Pull` the connection is *live*: whenever the hub's stable feed
//! sequence moves, the relay runs the same catch-up again from where this device is, so
//! changes reach it without polling. A slow device only delays itself: the watch holds
//! just the latest sequence, and catch-up reads what it needs from the feed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use automerge::ChangeHash;
use quinn::{RecvStream, SendStream};
use redline_proto::codec::{self, HEADER_LEN};
use redline_proto::message::{
    Ack, Cursor, ErrorReport, Message, Payload, Piece, Pull, Subscription, Update, UploadOffset,
    Welcome,
};
use redline_proto::session::{RelayResync, check_hello, hashes_from_wire, hashes_to_wire};
use redline_proto::{DeviceId, DocId, ErrorCode, PROTOCOL_VERSION};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Error;
use crate::config::RelayConfig;
use crate::hub::{Committed, Hub, Window, bundle_changes};

/// Updates larger than this go as a transfer on their own stream.
pub(crate) const INLINE_MAX: usize = 512 * 1024;
/// How long live fan-out waits to coalesce commits that land together.
const LIVE_COALESCE: Duration = Duration::from_millis(8);
/// Piece size of relay-to-device transfers.
const PIECE: usize = 256 * 1024;

/// Serves one incoming connection until it closes.
pub(crate) async fn serve(incoming: quinn::Incoming, hub: Arc<Hub>, config: Arc<RelayConfig>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            debug!(%remote, "handshake failed: {e}");
            return;
        }
    };
    let span = info_span!("conn", conn = conn.stable_id(), %remote, device = tracing::field::Empty);
    let span2 = span.clone();
    async move {
        if let Err(e) = run(conn, hub, config, span2).await {
            debug!("connection ended: {e}");
        }
    }
    .instrument(span)
    .await
}

/// Reads one frame: `Ok(None)` at a clean end of stream (between frames).
pub(crate) async fn read_message(
    recv: &mut RecvStream,
    max_frame: usize,
) -> Result<Option<Message>, Error> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(redline_proto::Error::Truncated { have: n }.into());
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(Error::Connection(e.to_string())),
    }
    let len = codec::payload_len(header, max_frame)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(n) => {
            Error::Protocol(redline_proto::Error::Truncated {
                have: HEADER_LEN + n,
            })
        }
        quinn::ReadExactError::ReadError(e) => Error::Connection(e.to_string()),
    })?;
    Ok(Some(codec::decode_payload(&payload)?))
}

async fn write_message(
    send: &mut SendStream,
    msg: &Message,
    max_frame: usize,
) -> Result<(), Error> {
    let frame = codec::encode_frame(msg, max_frame)?;
    send.write_all(&frame)
        .await
        .map_err(|e| Error::Connection(e.to_string()))
}

fn error_msg(code: ErrorCode, text: impl Into<String>, doc: Option<DocId>) -> Message {
    Message::Error(ErrorReport {
        code,
        text: text.into(),
        doc,
    })
}

/// What a device holds, per document: heads (pushed, uploading or delivered here) and the
/// changes it pushed itself; shared between the control loop and uploads.
#[derive(Clone, Default)]
struct Known(Arc<std::sync::Mutex<KnownInner>>);

#[derive(Default)]
struct KnownInner {
    heads: HashMap<DocId, Vec<ChangeHash>>,
    own: HashMap<DocId, std::collections::HashSet<ChangeHash>>,
}

impl Known {
    fn add(&self, doc: &DocId, heads: &[ChangeHash]) {
        let mut m = self.0.lock().expect("known lock");
        merge_heads(m.heads.entry(doc.clone()).or_default(), heads);
    }
    fn get(&self, doc: &DocId) -> Vec<ChangeHash> {
        self.0
            .lock()
            .expect("known lock")
            .heads
            .get(doc)
            .cloned()
            .unwrap_or_default()
    }
    fn add_own(&self, doc: &DocId, changes: &[automerge::Change]) {
        let mut m = self.0.lock().expect("known lock");
        m.own
            .entry(doc.clone())
            .or_default()
            .extend(changes.iter().map(|c| c.hash()));
    }
    fn own(&self, doc: &DocId) -> std::collections::HashSet<ChangeHash> {
        self.0
            .lock()
            .expect("known lock")
            .own
            .get(doc)
            .cloned()
            .unwrap_or_default()
    }
}

/// What the relay knows of one device on this connection.
struct Peer {
    device: DeviceId,
    subscription: Subscription,
    /// Heads the device is known to hold, per document (pushed, uploading or delivered
    /// here). Shared with upload tasks.
    known: Known,
    /// Transfers the device holds part of: id → bytes held.
    resume: HashMap<[u8; 16], u64>,
    /// Feed sequence the device has been brought up to (`None` before its first pull).
    delivered: Option<u64>,
    resync: RelayResync,
}

async fn run(
    conn: quinn::Connection,
    hub: Arc<Hub>,
    config: Arc<RelayConfig>,
    span: tracing::Span,
) -> Result<(), Error> {
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| Error::Connection(e.to_string()))?;
    let hello = match tokio::time::timeout(
        Duration::from_secs(10),
        read_message(&mut recv, config.max_frame),
    )
    .await
    {
        Ok(Ok(Some(Message::Hello(h)))) => h,
        Ok(Ok(Some(other))) => {
            let _ = write_message(
                &mut send,
                &error_msg(
                    ErrorCode::PROTOCOL_VIOLATION,
                    format!("expected hello, got {}", other.kind()),
                    None,
                ),
                config.max_frame,
            )
            .await;
            return Err(Error::Connection("no hello".into()));
        }
        Ok(Ok(None)) | Err(_) => return Err(Error::Connection("no hello in time".into())),
        Ok(Err(e)) => return Err(e),
    };
    if let Err(e) = check_hello(&hello) {
        let _ = write_message(
            &mut send,
            &error_msg(e.code(), e.to_string(), None),
            config.max_frame,
        )
        .await;
        let _ = send.finish();
        return Err(e.into());
    }
    span.record("device", tracing::field::display(&hello.device));
    info!(app_version = %hello.app_version, "device hello");
    write_message(
        &mut send,
        &Message::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            relay: config.name.clone(),
            epoch: hub.epoch(),
        }),
        config.max_frame,
    )
    .await?;

    // Writer: one task owns the control stream's send side.
    let (out, mut outbox) = mpsc::channel::<Message>(256);
    let max_frame = config.max_frame;
    let writer = tokio::spawn(async move {
        while let Some(m) = outbox.recv().await {
            if let Err(e) = write_message(&mut send, &m, max_frame).await {
                debug!("control stream write failed: {e}");
                return;
            }
        }
        let _ = send.finish();
    });
    // Reader: frames into a channel, so the main loop can also wait on other things.
    let (inbox_tx, mut inbox) = mpsc::channel::<Result<Message, Error>>(64);
    let reader = tokio::spawn(async move {
        loop {
            let r = read_message(&mut recv, max_frame).await;
            let end = !matches!(r, Ok(Some(_)));
            let item = match r {
                Ok(Some(m)) => Ok(m),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            if inbox_tx.send(item).await.is_err() || end {
                break;
            }
        }
    });

    let mut peer = Peer {
        device: hello.device.clone(),
        subscription: hello.subscription.clone(),
        known: Known::default(),
        resume: HashMap::new(),
        delivered: None,
        resync: RelayResync::new(),
    };
    let mut pushes: JoinSet<(DocId, Vec<ChangeHash>, Result<Committed, Error>)> = JoinSet::new();
    let mut uploads: JoinSet<()> = JoinSet::new();
    let mut pending_pull: Option<Pull> = None;
    let mut stable = hub.stable();
    let mut due: Option<tokio::time::Instant> = None;
    let result = loop {
        let live = peer.delivered.is_some();
        tokio::select! {
            item = inbox.recv() => match item {
                None => break Ok(()),
                Some(Err(e)) => {
                    let (code, text) = match &e { Error::Protocol(p) => (p.code(), p.to_string()), other => (ErrorCode::BAD_FRAME, other.to_string()) };
                    let _ = out.send(error_msg(code, text, None)).await;
                    break Err(e);
                }
                Some(Ok(msg)) => {
                    match msg {
                        Message::Push(p) => match bundle_changes(&p.bundle) {
                            Ok(changes) => {
                                peer.known.add_own(&p.doc, &changes);
                                let hub = hub.clone();
                                let heads = hashes_from_wire(&p.heads);
                                pushes.spawn(async move { let r = hub.push(&p.doc, changes).await; (p.doc, heads, r) });
                            }
                            Err(e) => { let _ = out.send(error_msg(ErrorCode::BAD_DOCUMENT_DATA, e, Some(p.doc))).await; }
                        },
                        Message::Pull(pull) => {
                            peer.resume = pull.resume.iter().map(|o| (o.id, o.have)).collect();
                            pending_pull = Some(pull);
                        }
                        Message::Sync(step) => {
                            resync_step(&hub, &mut peer, step).await;
                            while let Some(m) = peer.resync.poll_transmit() {
                                if out.send(m).await.is_err() { break; }
                            }
                        }
                        other => {
                            let _ = out.send(error_msg(ErrorCode::PROTOCOL_VIOLATION, format!("unexpected {} on the control stream", other.kind()), None)).await;
                            break Err(Error::Connection(format!("unexpected {}", other.kind())));
                        }
                    }
                    if pushes.is_empty()
                        && let Some(pull) = pending_pull.take()
                        && let Err(e) = catch_up(&hub, &conn, &mut peer, &out, pull.cursor).await
                    {
                        break Err(e);
                    }
                }
            },
            Some(done) = pushes.join_next() => {
                if let Ok((doc, device_heads, r)) = done {
                    let reply = match r {
                        Ok(c) => {
                            peer.known.add(&doc, &device_heads);
                            Message::Ack(Ack { doc, heads: hashes_to_wire(&c.heads), applied: c.applied })
                        }
                        Err(Error::MissingDependencies(_)) => Message::Resync(doc),
                        Err(Error::BadChanges(text)) => error_msg(ErrorCode::BAD_DOCUMENT_DATA, text, Some(doc)),
                        Err(e) => error_msg(ErrorCode::STORAGE_FAILURE, format!("nothing was acknowledged: {e}"), Some(doc)),
                    };
                    if out.send(reply).await.is_err() { break Ok(()); }
                }
                if pushes.is_empty()
                    && let Some(pull) = pending_pull.take()
                    && let Err(e) = catch_up(&hub, &conn, &mut peer, &out, pull.cursor).await
                {
                    break Err(e);
                }
            }
            changed = stable.changed(), if live && due.is_none() => {
                if changed.is_err() { break Ok(()); }
                // Let commits that land together reach the device as one update per doc.
                due = Some(tokio::time::Instant::now() + LIVE_COALESCE);
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                due = None;
                let cursor = Cursor { epoch: hub.epoch(), seq: peer.delivered.unwrap_or(0), subscription: peer.subscription.clone() };
                if let Err(e) = catch_up(&hub, &conn, &mut peer, &out, Some(cursor)).await {
                    break Err(e);
                }
            }
            accepted = conn.accept_bi() => match accepted {
                Ok((s, r)) => {
                    let (hub, config, device, known) = (hub.clone(), config.clone(), peer.device.clone(), peer.known.clone());
                    uploads.spawn(async move {
                        if let Err(e) = upload(s, r, hub, config, device, known).await { debug!("upload ended: {e}"); }
                    }.in_current_span());
                }
                Err(e) => break Err(Error::Connection(e.to_string())),
            },
            Some(_) = uploads.join_next() => {}
        }
    };
    drop(out);
    reader.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    result
}

fn merge_heads(into: &mut Vec<ChangeHash>, more: &[ChangeHash]) {
    for h in more {
        if !into.contains(h) {
            into.push(*h);
        }
    }
}

/// Sends the device what it lacks in its subscription since `cursor`, then `Caught`.
async fn catch_up(
    hub: &Hub,
    conn: &quinn::Connection,
    peer: &mut Peer,
    out: &mpsc::Sender<Message>,
    cursor: Option<Cursor>,
) -> Result<(), Error> {
    let upto = *hub.stable().borrow();
    // A cursor from another epoch or from a sequence this relay never reached means the
    // relay was replaced or restored from an older copy: what the device believes the
    // relay holds may be gone. Automerge's own protocol finds and repairs the difference.
    if cursor
        .as_ref()
        .is_some_and(|c| c.epoch != hub.epoch() || c.seq > upto)
    {
        warn!(
            "device cursor is ahead of this relay (restored from an older copy?); resyncing its documents"
        );
        let scope = peer.subscription.clone();
        for doc in hub.list().await?.into_iter().filter(|d| scope.covers(d)) {
            out.send(Message::Resync(doc))
                .await
                .map_err(|_| Error::Connection("control stream closed".into()))?;
        }
        out.send(Message::Caught(Cursor {
            epoch: hub.epoch(),
            seq: upto,
            subscription: scope,
        }))
        .await
        .map_err(|_| Error::Connection("control stream closed".into()))?;
        peer.delivered = Some(upto);
        return Ok(());
    }
    let usable = cursor;
    let (after, old) = match &usable {
        Some(c) => (c.seq, Some(c.subscription.clone())),
        None => (0, None),
    };
    let docs = hub
        .changed_in_scope(&peer.subscription, after, upto, old.as_ref())
        .await?;
    for doc in docs {
        let mut have = match &old {
            Some(o) if o.covers(&doc) => hub.heads_at(&doc, after).await?,
            _ => Vec::new(),
        };
        merge_heads(&mut have, &peer.known.get(&doc));
        // Covered before: the commit log says what came since, without a history walk.
        let own = peer.known.own(&doc);
        let window = match &old {
            Some(o) if o.covers(&doc) => Some(Window {
                after,
                upto,
                own: &own,
            }),
            _ => None,
        };
        let Some((payload, heads)) = hub.missing(&doc, &have, window).await? else {
            continue;
        };
        let update = match payload {
            Payload::Bundle(b) if b.len() > INLINE_MAX => {
                transfer(conn, peer, doc.clone(), b, false, &heads).await?
            }
            Payload::Document(b) if b.len() > INLINE_MAX => {
                transfer(conn, peer, doc.clone(), b, true, &heads).await?
            }
            small => Update {
                doc: doc.clone(),
                payload: small,
                heads: hashes_to_wire(&heads),
            },
        };
        out.send(Message::Update(update))
            .await
            .map_err(|_| Error::Connection("control stream closed".into()))?;
        peer.known.add(&doc, &heads);
    }
    out.send(Message::Caught(Cursor {
        epoch: hub.epoch(),
        seq: upto,
        subscription: peer.subscription.clone(),
    }))
    .await
    .map_err(|_| Error::Connection("control stream closed".into()))?;
    peer.delivered = Some(upto);
    Ok(())
}

/// Starts sending `bytes` on a new unidirectional stream; returns the `Update` that
/// announces it.
async fn transfer(
    conn: &quinn::Connection,
    peer: &mut Peer,
    doc: DocId,
    bytes: Vec<u8>,
    document: bool,
    heads: &[ChangeHash],
) -> Result<Update, Error> {
    let id = transfer_id(&bytes);
    let mut send = conn
        .open_uni()
        .await
        .map_err(|e| Error::Connection(e.to_string()))?;
    let len = bytes.len() as u64;
    // Resume where the device's durable copy ends (same id: the very same bytes).
    let start = peer.resume.remove(&id).unwrap_or(0).min(len) as usize;
    tokio::spawn(async move {
        let mut offset = start;
        // At least one piece, even an empty one, so the device learns the id of a
        // transfer it already holds whole.
        let rest = &bytes[start..];
        let pieces: Vec<&[u8]> = if rest.is_empty() {
            vec![rest]
        } else {
            rest.chunks(PIECE).collect()
        };
        for piece in pieces {
            let msg = Message::Piece(Piece {
                id,
                offset: offset as u64,
                data: piece.to_vec(),
            });
            if write_message(&mut send, &msg, redline_proto::codec::DEFAULT_MAX_FRAME)
                .await
                .is_err()
            {
                return;
            }
            offset += piece.len();
        }
        let _ = send.finish();
    });
    Ok(Update {
        doc,
        payload: Payload::Transfer { id, len, document },
        heads: hashes_to_wire(heads),
    })
}

/// The content-derived id of a transfer.
pub(crate) fn transfer_id(bytes: &[u8]) -> [u8; 16] {
    let digest = Sha256::digest(bytes);
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

/// One step of the Automerge-sync fallback.
async fn resync_step(hub: &Hub, peer: &mut Peer, step: redline_proto::message::SyncStep) {
    let doc_id = step.doc.clone();
    let message = match RelayResync::decode(&step) {
        Ok(m) => m,
        Err(e) => return peer.resync.report(e.code(), e.to_string(), doc_id),
    };
    let slot = match hub.slot(&doc_id).await {
        Ok(s) => s,
        Err(e) => {
            return peer
                .resync
                .report(ErrorCode::STORAGE_FAILURE, e.to_string(), doc_id);
        }
    };
    let mut state = slot.lock().await;
    let before = state.doc.get_heads();
    let applied = match peer.resync.apply(&doc_id, &mut state.doc, message) {
        Ok(a) => a,
        Err(e) => return peer.resync.report(e.code(), e.to_string(), doc_id),
    };
    if let Err(e) = hub
        .persist_new(&doc_id, &slot, &mut state, &before, None)
        .await
    {
        warn!(doc = %doc_id, "cannot persist: {e}");
        return peer.resync.report(
            ErrorCode::STORAGE_FAILURE,
            "nothing was acknowledged".into(),
            doc_id,
        );
    }
    peer.resync.respond(&doc_id, &state.doc, applied);
}

/// One resumable upload on its own stream.
async fn upload(
    mut send: SendStream,
    mut recv: RecvStream,
    hub: Arc<Hub>,
    config: Arc<RelayConfig>,
    device: DeviceId,
    known: Known,
) -> Result<(), Error> {
    let max_frame = config.max_frame;
    let Some(Message::Upload(up)) = read_message(&mut recv, max_frame).await? else {
        write_message(
            &mut send,
            &error_msg(
                ErrorCode::PROTOCOL_VIOLATION,
                "a stream must start with an upload",
                None,
            ),
            max_frame,
        )
        .await?;
        return Err(Error::Connection("stream without upload".into()));
    };
    if up.len > config.max_document_bytes {
        let text = format!(
            "upload of {} bytes exceeds the limit of {}",
            up.len, config.max_document_bytes
        );
        write_message(
            &mut send,
            &error_msg(ErrorCode::TOO_LARGE, text, Some(up.doc)),
            max_frame,
        )
        .await?;
        return Ok(());
    }
    // The device holds what it uploads: never send it back.
    let pushed = hashes_from_wire(&up.heads);
    known.add(&up.doc, &pushed);
    // Already committed (the ack of an earlier attempt was lost): answer at once.
    if !pushed.is_empty() {
        let slot = hub.slot(&up.doc).await?;
        let state = slot.lock().await;
        if pushed
            .iter()
            .all(|h| state.doc.get_change_meta_by_hash(h).is_some())
        {
            let ack = Ack {
                doc: up.doc.clone(),
                heads: hashes_to_wire(&state.doc.get_heads()),
                applied: 0,
            };
            drop(state);
            write_message(&mut send, &Message::Ack(ack), max_frame).await?;
            let _ = send.finish();
            return Ok(());
        }
    }
    let key: Vec<u8> = format!("{device}|{}", hex::encode(up.id)).into_bytes();
    let storage = hub.storage();
    let k = key.clone();
    let mut have = tokio::task::spawn_blocking({
        let s = storage.clone();
        move || s.upload_len(&k)
    })
    .await
    .map_err(|e| Error::Storage(e.to_string()))??;
    write_message(
        &mut send,
        &Message::UploadOffset(UploadOffset { id: up.id, have }),
        max_frame,
    )
    .await?;
    while have < up.len {
        let Some(Message::Piece(p)) = read_message(&mut recv, max_frame).await? else {
            return Err(Error::Connection("upload stream ended early".into()));
        };
        if p.id != up.id
            || p.offset != have
            || p.data.len() > redline_proto::message::MAX_PIECE
            || have + p.data.len() as u64 > up.len
        {
            write_message(
                &mut send,
                &error_msg(
                    ErrorCode::BAD_TRANSFER,
                    "piece out of place",
                    Some(up.doc.clone()),
                ),
                max_frame,
            )
            .await?;
            return Err(Error::Connection("bad piece".into()));
        }
        let (s, k, data, offset) = (storage.clone(), key.clone(), p.data, p.offset);
        let n = data.len() as u64;
        tokio::task::spawn_blocking(move || s.put_piece(&k, offset, &data))
            .await
            .map_err(|e| Error::Storage(e.to_string()))??;
        hub.flush().await?;
        have += n;
        write_message(
            &mut send,
            &Message::UploadOffset(UploadOffset { id: up.id, have }),
            max_frame,
        )
        .await?;
    }
    let (s, k) = (storage.clone(), key.clone());
    let bytes = tokio::task::spawn_blocking(move || s.upload_bytes(&k))
        .await
        .map_err(|e| Error::Storage(e.to_string()))??;
    let reply = if transfer_id(&bytes) != up.id {
        error_msg(
            ErrorCode::BAD_TRANSFER,
            "upload bytes do not match their id",
            Some(up.doc.clone()),
        )
    } else {
        match bundle_changes(&bytes) {
            Err(e) => error_msg(ErrorCode::BAD_DOCUMENT_DATA, e, Some(up.doc.clone())),
            Ok(changes) => {
                known.add_own(&up.doc, &changes);
                match hub.push(&up.doc, changes).await {
                    Ok(c) => Message::Ack(Ack {
                        doc: up.doc.clone(),
                        heads: hashes_to_wire(&c.heads),
                        applied: c.applied,
                    }),
                    Err(Error::MissingDependencies(_)) => Message::Resync(up.doc.clone()),
                    Err(e) => error_msg(
                        ErrorCode::STORAGE_FAILURE,
                        e.to_string(),
                        Some(up.doc.clone()),
                    ),
                }
            }
        }
    };
    let (s, k) = (storage, key);
    let _ = tokio::task::spawn_blocking(move || s.drop_upload(&k)).await;
    write_message(&mut send, &reply, max_frame).await?;
    let _ = send.finish();
    Ok(())
}
