//! The sync driver: one QUIC connection to the relay, the first flight, and (in live
//! mode) everything after it.
//!
//! **First flight.** `Hello`, then a `Push` (an Automerge bundle) of every document with
//! changes the relay is not known to hold, then `Pull` with the device's feed cursor. The
//! relay acks the pushes after its flush and sends what the device lacks in its
//! subscription, then `Caught` with a new cursor. A device with nothing new spends one
//! round trip and a few hundred bytes, however many documents it holds.
//!
//! **Large payloads** (over [`INLINE_MAX`]) go as resumable uploads on their own streams,
//! in pieces of [`PIECE`] bytes with at most [`WINDOW`] bytes unacknowledged: a cut
//! connection costs at most one window, and the next attempt resumes where the relay's
//! durable copy ends. Large updates from the relay arrive on their own streams too.
//!
//! **Stale knowledge.** If the relay lacks what a push builds on (`Resync`), or an update
//! leaves dependencies missing here, that document falls back to Automerge's sync
//! protocol ([`DeviceResync`]).
//!
//! **Durability.** Updates are merged into the live documents as they arrive and written
//! with one flush per step; the cursor is stored only when nothing it covers is still
//! pending (a transfer, a resync), so a cursor never claims what the device lacks.
//!
//! Cancel-safe: dropping the future drops the connection; everything acknowledged or
//! applied so far is on disk, and the next sync picks up from there.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use automerge::sync::State as SyncState;
use automerge::{Automerge, ChangeHash, ReadDoc};
use quinn::{RecvStream, SendStream};
use redline_proto::codec::{self, HEADER_LEN};
use redline_proto::message::ext;
use redline_proto::message::{
    Cursor, ErrorReport, Hello, Message, Payload, Piece, Pull, Push, Subscription, Update, Upload,
};
use redline_proto::session::{DeviceResync, DocToSync, hashes_from_wire, hashes_to_wire};
use redline_proto::wire::{transfer_id, union_heads};
use redline_proto::{DocId, MIN_PROTOCOL_VERSION};
use tokio::sync::{mpsc, watch};
use tracing::debug;

use crate::client::Client;
use crate::store::{DocWrite, SyncBatch};
use crate::{Error, RelayEndpoint, transport};

pub use redline_proto::wire::INLINE_MAX;
/// Piece size of uploads.
pub const PIECE: usize = 64 * 1024;
/// Upload bytes sent but not yet acknowledged as durable by the relay, at most.
pub const WINDOW: u64 = 128 * 1024;
/// How long a handshake may take before a device with other relays of the deployment
/// turns to the next one.
/// Generous: under a reconnect storm on a busy relay a handshake can take seconds, and
/// moving every waiting phone elsewhere only spreads the storm.
pub const FAILOVER_WAIT: Duration = Duration::from_secs(10);
/// Connections one sync tries when the relay leaves the hello unanswered.
pub const HELLO_ATTEMPTS: u32 = 3;

/// How long the device waits for the relay's `Welcome` before it gives up on a
/// connection: a handshake whose last packet was lost can leave the relay deaf to the
/// device for 10 s or more (it drops 1-RTT packets until the handshake completes), while a
/// fresh connection usually completes at once. Generous on slow links: 10 round trips,
/// at least 5 s.
pub fn hello_wait(rtt: Duration) -> Duration {
    (rtt * 10).max(Duration::from_secs(5))
}

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

/// Byte and frame counters shared by a session's streams.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub frames_sent: AtomicU64,
    pub frames_received: AtomicU64,
}

async fn write(
    send: &mut SendStream,
    msg: &Message,
    traffic: &Traffic,
    totals: &Traffic,
) -> Result<(), Error> {
    let frame = codec::encode_frame(msg, codec::DEFAULT_MAX_FRAME)?;
    write_frame(send, &frame, traffic, totals).await
}

/// The changes of `bytes`: one Automerge bundle, or several bundles and change chunks
/// one after another (what a relay sends a device that says it reads them).
fn chunk_changes(bytes: &[u8]) -> Result<Vec<automerge::Change>, String> {
    let mut changes = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (chunk, _, after) = redline_proto::wire::split_chunk(rest)?;
        match automerge::Bundle::try_from(chunk) {
            Ok(b) => changes.extend(b.to_changes().map_err(|e| e.to_string())?),
            Err(_) => changes.push(automerge::Change::try_from(chunk).map_err(|e| e.to_string())?),
        }
        rest = after;
    }
    Ok(changes)
}

/// Writes one framed message (counted like [`write`]).
async fn write_frame(
    send: &mut SendStream,
    frame: &[u8],
    traffic: &Traffic,
    totals: &Traffic,
) -> Result<(), Error> {
    send.write_all(frame).await.map_err(Error::network)?;
    for t in [traffic, totals] {
        t.bytes_sent
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        t.frames_sent.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

async fn read(
    recv: &mut RecvStream,
    max_frame: usize,
    traffic: &Traffic,
    totals: &Traffic,
) -> Result<Option<Message>, Error> {
    Ok(read_with_extensions(recv, max_frame, traffic, totals)
        .await?
        .map(|(m, _)| m))
}

/// Reads the next message with its extensions.
async fn read_with_extensions(
    recv: &mut RecvStream,
    max_frame: usize,
    traffic: &Traffic,
    totals: &Traffic,
) -> Result<Option<(Message, codec::Extensions)>, Error> {
    match read_frame(recv, max_frame, traffic, totals).await? {
        None => Ok(None),
        Some(payload) => Ok(Some(codec::decode_with_extensions(&payload)?)),
    }
}

async fn read_frame(
    recv: &mut RecvStream,
    max_frame: usize,
    traffic: &Traffic,
    totals: &Traffic,
) -> Result<Option<Vec<u8>>, Error> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(redline_proto::Error::Truncated { have: n }.into());
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(Error::network(e)),
    }
    let len = codec::payload_len(header, max_frame)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(n) => {
            Error::Protocol(redline_proto::Error::Truncated {
                have: HEADER_LEN + n,
            })
        }
        quinn::ReadExactError::ReadError(e) => Error::network(e),
    })?;
    for t in [traffic, totals] {
        t.bytes_received
            .fetch_add((HEADER_LEN + len) as u64, Ordering::Relaxed);
        t.frames_received.fetch_add(1, Ordering::Relaxed);
    }
    Ok(Some(payload))
}

/// A large push kept for the next attempt.
pub(crate) struct CachedUpload {
    doc: DocId,
    base: Vec<ChangeHash>,
    heads: Vec<ChangeHash>,
    bytes: Arc<Vec<u8>>,
    /// Changes in the bundle.
    changes: u64,
}

/// How an upload ended.
enum UploadEnd {
    Acked { doc: DocId, applied: u32 },
    Resync(DocId),
    Refused(DocId, ErrorReport),
}

async fn upload(
    conn: quinn::Connection,
    doc: DocId,
    bytes: Arc<Vec<u8>>,
    pushed: Vec<ChangeHash>,
    traffic: Arc<Traffic>,
    totals: Arc<Traffic>,
    max_frame: usize,
) -> Result<UploadEnd, Error> {
    let id = transfer_id(&bytes);
    let len = bytes.len() as u64;
    let (mut send, mut recv) = conn.open_bi().await.map_err(Error::network)?;
    let start = Upload {
        id,
        doc: doc.clone(),
        len,
        document: false,
        heads: hashes_to_wire(&pushed),
    };
    write(&mut send, &Message::Upload(start), &traffic, &totals).await?;
    let mut acked = match read(&mut recv, max_frame, &traffic, &totals).await? {
        Some(Message::UploadOffset(o)) if o.id == id => o.have.min(len),
        Some(Message::Error(r)) => return Ok(UploadEnd::Refused(doc, r)),
        other => {
            return Err(Error::transport(format!(
                "unexpected answer to an upload: {other:?}"
            )));
        }
    };
    let mut next = acked;
    loop {
        while next < len && next - acked < WINDOW {
            let end = (next as usize + PIECE).min(bytes.len());
            let piece = Piece {
                id,
                offset: next,
                data: bytes[next as usize..end].to_vec(),
            };
            write(&mut send, &Message::Piece(piece), &traffic, &totals).await?;
            next = end as u64;
        }
        match read(&mut recv, max_frame, &traffic, &totals).await? {
            Some(Message::UploadOffset(o)) if o.id == id => {
                // The relay acknowledges only bytes it was sent on this stream.
                if o.have < acked || o.have > next {
                    return Err(Error::transport(format!(
                        "the relay acknowledged {} bytes of an upload after {acked}, with {next} sent",
                        o.have
                    )));
                }
                acked = o.have;
            }
            Some(Message::Ack(a)) => {
                return Ok(UploadEnd::Acked {
                    doc,
                    applied: a.applied,
                });
            }
            Some(Message::Resync(d)) => return Ok(UploadEnd::Resync(d)),
            Some(Message::Error(r)) => return Ok(UploadEnd::Refused(doc, r)),
            other => {
                return Err(Error::transport(format!(
                    "unexpected message during an upload: {other:?}"
                )));
            }
        }
    }
}

/// Reads the pieces of one relay-to-device transfer, storing each durably so a cut
/// connection resumes where it stopped.
async fn receive_transfer(
    client: std::sync::Weak<crate::client::Inner>,
    mut recv: RecvStream,
    traffic: Arc<Traffic>,
    totals: Arc<Traffic>,
) -> Result<([u8; 16], Vec<u8>), Error> {
    let mut id = None;
    while let Some(msg) = read(&mut recv, codec::DEFAULT_MAX_FRAME, &traffic, &totals).await? {
        let Message::Piece(p) = msg else {
            return Err(Error::transport("a transfer stream holds pieces only"));
        };
        if id.is_some_and(|i| i != p.id) {
            return Err(Error::transport("transfer piece out of place"));
        }
        id = Some(p.id);
        // Held weakly: a finished session must not keep the store open.
        let inner = client
            .upgrade()
            .ok_or_else(|| Error::transport("client closed"))?;
        tokio::task::spawn_blocking(move || {
            inner.store.put_transfer_piece(&p.id, p.offset, &p.data)
        })
        .await
        .map_err(|e| Error::Store(e.to_string()))??;
    }
    let id = id.ok_or_else(|| Error::transport("empty transfer"))?;
    let inner = client
        .upgrade()
        .ok_or_else(|| Error::transport("client closed"))?;
    let buf = inner.store.transfer_bytes(&id)?;
    if transfer_id(&buf) != id {
        inner.store.drop_transfer(&id)?;
        return Err(Error::transport("transfer bytes do not match their id"));
    }
    Ok((id, buf))
}

/// The state of one session.
#[derive(Default)]
struct Flight {
    welcomed: bool,
    caught: Option<Cursor>,
    /// Pushes (inline or uploads) awaiting an answer: document → (heads pushed, changes
    /// in the push).
    in_flight: HashMap<DocId, (Vec<ChangeHash>, u64)>,
    /// Heads the relay is known to hold, per document.
    relay_has: HashMap<DocId, Vec<ChangeHash>>,
    /// Announced transfers not yet applied: id → (doc, heads, whole document?).
    announced: HashMap<[u8; 16], (DocId, Vec<ChangeHash>, bool)>,
    /// Transfers received before their announcement.
    arrived: HashMap<[u8; 16], Vec<u8>>,
    resync: Option<DeviceResync>,
    /// Transfers applied, whose staged pieces go after the next persist.
    applied_transfers: Vec<[u8; 16]>,
    batch: SyncBatch,
    dirty: HashSet<DocId>,
    /// The bundles applied to each dirty document, in order: what the store lacks of it,
    /// appended as they came (no re-encoding) unless the document changed otherwise.
    received: HashMap<DocId, Vec<u8>>,
    /// Dirty documents changed by more than bundles (a whole document, a resync merge).
    merged: HashSet<DocId>,
    pushed: HashSet<DocId>,
    /// Documents written while their last push was still in flight (live mode): once
    /// that push is answered they go out again, or a write waits for the next one.
    written_in_flight: HashSet<DocId>,
    /// A push of a document in `written_in_flight` was answered: push again.
    repush: bool,
    updated: HashSet<DocId>,
    resynced: HashSet<DocId>,
    report: SyncReport,
    /// Why large downloads are held back this session (`None`: they are not).
    defer_large: Option<String>,
    /// Large downloads announced but held back: the cursor must not move past them.
    downloads_deferred: bool,
    /// Progress counters (published after every step).
    progress: crate::progress::SyncProgress,
}

impl Flight {
    /// The relay answered the push of `doc` (an ack, a refusal or a resync): it is no
    /// longer in flight and counts as done. Returns what was pushed: heads, changes.
    fn answered(&mut self, doc: &DocId) -> Option<(Vec<ChangeHash>, u64)> {
        let pushed = self.in_flight.remove(doc)?;
        self.progress.docs_done += 1;
        if self.written_in_flight.remove(doc) {
            self.repush = true;
        }
        Some(pushed)
    }

    fn settled(&self) -> bool {
        self.welcomed
            && self.caught.is_some()
            && self.in_flight.is_empty()
            && self.announced.is_empty()
            && self.resync.as_ref().is_none_or(DeviceResync::is_finished)
    }
}

/// The session's streams and the tasks it owns (aborted when dropped).
struct Wire {
    send: SendStream,
    conn: quinn::Connection,
    uploads: mpsc::Sender<Result<UploadEnd, Error>>,
    tasks: tokio::task::JoinSet<()>,
    traffic: Arc<Traffic>,
    totals: Arc<Traffic>,
    max_frame: usize,
}

impl Wire {
    async fn send(&mut self, msg: &Message) -> Result<(), Error> {
        write(&mut self.send, msg, &self.traffic, &self.totals).await
    }
}

fn finish_report(f: &Flight, traffic: &Traffic, started: Instant) -> SyncReport {
    let mut report = f.report.clone();
    report.docs_pushed = f.pushed.len();
    report.docs_updated = f.updated.len();
    report.docs_resynced = f.resynced.len();
    report.bytes_sent = traffic.bytes_sent.load(Ordering::Relaxed);
    report.bytes_received = traffic.bytes_received.load(Ordering::Relaxed);
    report.frames_sent = traffic.frames_sent.load(Ordering::Relaxed);
    report.frames_received = traffic.frames_received.load(Ordering::Relaxed);
    report.duration = started.elapsed();
    report
}

/// What a live session needs: a stop signal, and where to report its first flight.
#[derive(Clone)]
pub(crate) struct LiveHooks {
    pub stop: watch::Receiver<bool>,
    pub first_flight: mpsc::UnboundedSender<Result<SyncReport, Error>>,
}

impl Client {
    /// Runs one session: the first flight, and if `live` is given, everything after it
    /// until the signal turns true or the connection fails. A connection whose hello goes
    /// unanswered is replaced, up to [`HELLO_ATTEMPTS`] connections.
    pub(crate) async fn session(
        &self,
        endpoint: &quinn::Endpoint,
        relay: &RelayEndpoint,
        live: Option<LiveHooks>,
    ) -> Result<SyncReport, Error> {
        let mut reconnects = 0;
        loop {
            let mut unanswered = false;
            let result = self
                .attempt(endpoint, relay, live.clone(), &mut unanswered)
                .await;
            // A relay from before version negotiation refuses any version but its own:
            // say hello again at the oldest version this build speaks, once.
            if let Err(Error::Refused { code, text }) = &result
                && *code == redline_proto::ErrorCode::UNSUPPORTED_VERSION
                && self.inner.speak.load(Ordering::Relaxed) > MIN_PROTOCOL_VERSION
            {
                debug!("the relay refused protocol version: {text}; trying the oldest");
                self.inner
                    .speak
                    .store(MIN_PROTOCOL_VERSION, Ordering::Relaxed);
                continue;
            }
            if unanswered && reconnects + 1 < HELLO_ATTEMPTS {
                reconnects += 1;
                debug!(
                    reconnects,
                    "the relay left the hello unanswered; reconnecting"
                );
                continue;
            }
            return result.map(|mut report| {
                report.reconnects = reconnects;
                report
            });
        }
    }

    /// One connection's session; sets `unanswered` when it ended because the relay did
    /// not answer the hello in time, or the connection was lost before any welcome.
    async fn attempt(
        &self,
        endpoint: &quinn::Endpoint,
        relay: &RelayEndpoint,
        live: Option<LiveHooks>,
        unanswered: &mut bool,
    ) -> Result<SyncReport, Error> {
        let (mut live, first_flight) = match live {
            Some(h) => (Some(h.stop), Some(h.first_flight)),
            None => (None, None),
        };
        let started = Instant::now();
        let max_frame = self.inner.config.max_frame;
        let totals = self.inner.traffic.clone();
        let traffic = Arc::new(Traffic::default());
        // With other relays to turn to, a relay that does not complete the handshake
        // in [`FAILOVER_WAIT`] is given up (a dead one would take the idle timeout).
        let conn = if self.inner.config.other_relays.is_empty() {
            transport::connect(endpoint, relay).await?
        } else {
            tokio::time::timeout(FAILOVER_WAIT, transport::connect(endpoint, relay))
                .await
                .map_err(|_| {
                    Error::transport(format!(
                        "the relay at {} did not answer in {} s",
                        relay.addr,
                        FAILOVER_WAIT.as_secs()
                    ))
                })??
        };
        debug!(
            conn = conn.stable_id(),
            local = ?endpoint.local_addr().ok(),
            "connected to the relay"
        );
        // A relay that gave up on the handshake (a storm on a busy relay) closes the
        // connection while this side believes it is connected: lost before any welcome,
        // so replaced like an unanswered hello, not reported as a failed sync.
        let (send, recv) = conn.open_bi().await.map_err(|e| {
            *unanswered = true;
            Error::network_in(format!("cannot open a stream: {e}"), e)
        })?;

        // Reader, transfer and upload tasks feed the loop through channels (reads are not
        // cancel-safe inside select!). The session owns them all: dropping it aborts them.
        let mut tasks: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
        let (in_tx, mut inbox) = mpsc::channel::<Result<(Message, codec::Extensions), Error>>(64);
        {
            let (traffic, totals) = (traffic.clone(), totals.clone());
            let mut recv = recv;
            tasks.spawn(async move {
                loop {
                    let r = read_with_extensions(&mut recv, max_frame, &traffic, &totals).await;
                    let stop = !matches!(r, Ok(Some(_)));
                    let item = match r {
                        Ok(Some(m)) => Ok(m),
                        Ok(None) => Err(Error::transport("the relay closed the control stream")),
                        Err(e) => Err(e),
                    };
                    if in_tx.send(item).await.is_err() || stop {
                        break;
                    }
                }
            });
        }
        let (xfer_tx, mut xfers) = mpsc::channel::<Result<([u8; 16], Vec<u8>), Error>>(8);
        {
            let (conn, traffic, totals) = (conn.clone(), traffic.clone(), totals.clone());
            let client = Arc::downgrade(&self.inner);
            tasks.spawn(async move {
                let mut receivers = tokio::task::JoinSet::new();
                while let Ok(recv) = conn.accept_uni().await {
                    let (tx, traffic, totals, client) = (
                        xfer_tx.clone(),
                        traffic.clone(),
                        totals.clone(),
                        client.clone(),
                    );
                    receivers.spawn(async move {
                        let _ = tx
                            .send(receive_transfer(client, recv, traffic, totals).await)
                            .await;
                    });
                }
            });
        }
        let (up_tx, mut ups) = mpsc::channel::<Result<UploadEnd, Error>>(8);

        let mut f = Flight {
            relay_has: self.relay_has_all()?,
            ..Flight::default()
        };
        f.report.docs = f.relay_has.len();
        let subscription = self.subscription()?;
        let cursor_key = format!("cursor:{}", relay.identity_key());
        let cursor = self
            .inner
            .store
            .meta(&cursor_key)?
            .and_then(|b| postcard::from_bytes::<Cursor>(&b).ok());
        let hello = Hello {
            protocol_version: self.inner.speak.load(Ordering::Relaxed),
            device: self.inner.identity.device.clone(),
            app_version: self.inner.config.app_version.clone(),
            subscription: subscription.clone(),
            token: self.inner.config.token.clone().unwrap_or_default(),
        };
        let mut wire = Wire {
            send,
            conn: conn.clone(),
            uploads: up_tx,
            tasks,
            traffic: traffic.clone(),
            totals: totals.clone(),
            max_frame,
        };
        // This client reads several stored chunks in one update (version 2 and later
        // carry the extension; version 1 relays never see it).
        let version = hello.protocol_version;
        let mut ext = codec::Extensions::new();
        ext.insert(ext::HELLO_ACCEPTS_CHUNKS, &true)?;
        let frame = codec::encode_frame_with(
            &Message::Hello(hello),
            &ext,
            version,
            codec::DEFAULT_MAX_FRAME,
        )?;
        write_frame(&mut wire.send, &frame, &wire.traffic, &wire.totals).await?;
        self.push_dirty(&mut f, &mut wire).await?;
        let resume = self
            .inner
            .store
            .partial_transfers()?
            .into_iter()
            .map(|(id, have)| redline_proto::message::UploadOffset { id, have })
            .collect();
        let defer = self.download_held_back()?;
        f.defer_large = defer.clone();
        wire.send(&Message::Pull(Pull {
            cursor,
            resume,
            defer_large: defer.is_some(),
        }))
        .await?;
        f.report.round_trips = 1;
        let mut first_done = false;

        self.inner.progress.send_replace(Default::default());
        self.publish(&mut f, &traffic, started);
        let wait = hello_wait(conn.rtt());
        let welcome_by = tokio::time::Instant::now() + wait;
        let outcome: Result<(), Error> = async {
            loop {
                self.publish(&mut f, &traffic, started);
                if f.settled() && !first_done {
                    first_done = true;
                    self.persist(&mut f, &cursor_key)?;
                    match &first_flight {
                        None => return Ok(()),
                        Some(tx) => {
                            let _ = tx.send(Ok(finish_report(&f, &traffic, started)));
                        }
                    }
                }
                let is_live = live.is_some() && first_done;
                tokio::select! {
                    _ = tokio::time::sleep_until(welcome_by), if !f.welcomed => {
                        *unanswered = true;
                        return Err(Error::transport(format!(
                            "the relay did not answer within {} s",
                            wait.as_secs()
                        )));
                    }
                    item = inbox.recv() => {
                        let msg = match item.unwrap_or_else(|| Err(Error::transport("control stream ended"))) {
                            Ok(m) => m,
                            // Lost before any welcome (the relay gave up on a handshake it
                            // never completed): as good as unanswered, so replaced.
                            Err(e @ Error::Transport { .. }) if !f.welcomed => {
                                *unanswered = true;
                                return Err(e);
                            }
                            Err(e) => return Err(e),
                        };
                        self.handle(&mut f, msg.0, msg.1)?;
                    }
                    Some(done) = xfers.recv() => {
                        let (id, bytes) = done?;
                        f.arrived.insert(id, bytes);
                        self.apply_transfers(&mut f)?;
                    }
                    Some(done) = ups.recv() => {
                        match done? {
                            UploadEnd::Acked { doc, applied } => self.acked(&mut f, doc, applied),
                            UploadEnd::Resync(doc) => {
                                f.answered(&doc);
                                self.start_resync(&mut f, doc)?;
                            }
                            UploadEnd::Refused(doc, r) => {
                                f.answered(&doc);
                                f.report.refused.push((doc.to_string(), format!("{}: {}", r.code, r.text)));
                            }
                        }
                    }
                    _ = self.inner.local_change.notified(), if is_live => {
                        self.push_dirty(&mut f, &mut wire).await?;
                    }
                    stop = async { match live.as_mut() { Some(s) => s.changed().await, None => std::future::pending().await } }, if is_live => {
                        let stopped = stop.is_err() || live.as_ref().is_some_and(|s| *s.borrow());
                        if stopped {
                            return Ok(());
                        }
                    }
                }
                // Fallback steps the last message called for.
                let mut sent = false;
                if let Some(r) = f.resync.as_mut() {
                    while let Some(m) = r.poll_transmit() {
                        wire.send(&m).await?;
                        sent = true;
                    }
                }
                if sent {
                    f.report.round_trips += 1;
                }
                if f.resync.as_ref().is_some_and(DeviceResync::is_finished) {
                    self.finish_resync(&mut f)?;
                }
                if is_live && std::mem::take(&mut f.repush) {
                    self.push_dirty(&mut f, &mut wire).await?;
                }
                if is_live && f.settled() {
                    self.persist(&mut f, &cursor_key)?;
                }
            }
        }
        .await;
        if let Err(e) = &outcome {
            // Where the session stood, and what the transport saw, for diagnosing stalls.
            debug!(
                conn = conn.stable_id(),
                local = ?endpoint.local_addr().ok(),
                error = %e,
                welcomed = f.welcomed,
                caught = f.caught.is_some(),
                in_flight = f.in_flight.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                stats = ?conn.stats(),
                "sync session failed"
            );
        }
        let _ = wire.send.finish();
        conn.close(0u8.into(), b"done");
        wire.tasks.shutdown().await;
        self.publish(&mut f, &traffic, started);
        let _ = self.account_metered(&traffic);
        // What was applied is kept even if the session failed.
        if !f.batch.is_empty() || !f.dirty.is_empty() {
            let cursor_ok = outcome.is_ok() && f.settled();
            if !cursor_ok {
                f.caught = None;
            }
            let _ = self.persist(&mut f, &cursor_key);
        }
        outcome?;
        Ok(finish_report(&f, &traffic, started))
    }

    /// Publishes the session's progress.
    fn publish(&self, f: &mut Flight, traffic: &Traffic, started: Instant) {
        let p = &mut f.progress;
        p.bytes_sent = traffic.bytes_sent.load(Ordering::Relaxed);
        p.bytes_received = traffic.bytes_received.load(Ordering::Relaxed);
        p.elapsed = started.elapsed();
        if f.caught.is_some() && f.in_flight.is_empty() && f.announced.is_empty() {
            p.finished = true;
        }
        p.estimate();
        self.inner.progress.send_replace(p.clone());
    }

    /// How much `id` matters now: open emergency or urgent needs, or today's ledger
    /// (where duty check-ins are), come first.
    fn urgency(&self, id: &DocId, doc: &automerge::Automerge) -> crate::Urgency {
        match id.kind() {
            redline_proto::DocKind::Households(_) => {
                let urgent = crate::households::view(doc).is_ok_and(|v| {
                    v.needs
                        .iter()
                        .any(|n| n.is_open() && n.priority >= crate::Priority::Urgent)
                });
                if urgent {
                    crate::Urgency::Urgent
                } else {
                    crate::Urgency::Normal
                }
            }
            redline_proto::DocKind::Ledger(_, day) => {
                let today = crate::client::day_of(self.inner.config.clock.now_ms());
                if today.as_ref() == Some(&day) {
                    crate::Urgency::Urgent
                } else {
                    crate::Urgency::Normal
                }
            }
            redline_proto::DocKind::Roster(_) => crate::Urgency::Normal,
        }
    }

    /// Bytes spent on metered networks today (kept in the store's meta).
    pub(crate) fn metered_today(&self) -> Result<(String, u64), Error> {
        let key = format!(
            "metered:{}",
            crate::client::day_of(self.inner.config.clock.now_ms())
                .map(|d| d.to_string())
                .unwrap_or_default()
        );
        let used = self
            .inner
            .store
            .meta(&key)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        Ok((key, used))
    }

    /// Adds a session's bytes to today's metered total, if the phone is on a metered
    /// network.
    fn account_metered(&self, traffic: &Traffic) -> Result<(), Error> {
        let conditions = *self.inner.conditions.lock().expect("conditions lock");
        if conditions.network != crate::Network::Metered {
            return Ok(());
        }
        let (key, used) = self.metered_today()?;
        let spent = traffic.bytes_sent.load(Ordering::Relaxed)
            + traffic.bytes_received.load(Ordering::Relaxed);
        self.inner
            .store
            .put_meta(&key, &(used + spent).to_be_bytes())
    }

    /// Why the policy holds back large downloads now, if it does.
    fn download_held_back(&self) -> Result<Option<String>, Error> {
        self.held_back(
            crate::Urgency::Normal,
            INLINE_MAX + 1,
            "large downloads wait",
        )
    }

    /// Why the policy holds back a transfer of `len` bytes of `urgency` (`large` names it
    /// when it is held for its size), if it does.
    fn held_back(
        &self,
        urgency: crate::Urgency,
        len: usize,
        large: &str,
    ) -> Result<Option<String>, Error> {
        if urgency == crate::Urgency::Urgent {
            return Ok(None);
        }
        let policy = self.inner.config.policy;
        let conditions = *self.inner.conditions.lock().expect("conditions lock");
        let metered = conditions.network == crate::Network::Metered;
        let bulk = len > INLINE_MAX;
        if bulk && metered && policy.bulk_unmetered_only {
            return Ok(Some(format!("{large} for an unmetered network")));
        }
        if bulk && policy.bulk_only_charging && !conditions.charging {
            return Ok(Some(format!("{large} for a charger")));
        }
        if metered && let Some(cap) = policy.metered_daily_cap {
            let (_, used) = self.metered_today()?;
            if used >= cap {
                return Ok(Some(format!(
                    "daily data budget reached ({used} of {cap} bytes on metered networks)"
                )));
            }
        }
        Ok(None)
    }

    /// Pushes every document with changes the relay is not known to hold and no push in
    /// flight.
    async fn push_dirty(&self, f: &mut Flight, wire: &mut Wire) -> Result<(), Error> {
        let mut pushes = Vec::new();
        {
            let mut docs = self.docs();
            for id in self.inner.store.doc_ids()? {
                if f.in_flight.contains_key(&id)
                    || f.resync.as_ref().is_some_and(|r| r.contains(&id))
                {
                    f.written_in_flight.insert(id);
                    continue;
                }
                let Some(doc) = self.load(&mut docs, &id)? else {
                    continue;
                };
                let heads = doc.get_heads();
                let has = f.relay_has.entry(id.clone()).or_default();
                if heads.iter().all(|h| has.contains(h)) {
                    continue;
                }
                let mut known: Vec<ChangeHash> = has
                    .iter()
                    .filter(|h| doc.get_change_meta_by_hash(h).is_some())
                    .copied()
                    .collect();
                known.sort();
                let mut cache = self.inner.upload_cache.lock().expect("upload cache lock");
                if let Some(c) = cache
                    .as_ref()
                    .filter(|c| c.doc == id && c.base == known && c.heads == heads)
                {
                    let urgency = self.urgency(&id, doc);
                    pushes.push((urgency, id, c.bytes.clone(), heads, c.changes));
                    continue;
                }
                let hashes: Vec<ChangeHash> =
                    doc.get_changes(&known).iter().map(|c| c.hash()).collect();
                if hashes.is_empty() {
                    continue;
                }
                let n = hashes.len() as u64;
                let bundle = doc
                    .bundle(hashes)
                    .map_err(|e| Error::Store(format!("cannot bundle {id}: {e}")))?;
                let bytes = Arc::new(bundle.bytes().to_vec());
                if bytes.len() > INLINE_MAX {
                    *cache = Some(CachedUpload {
                        doc: id.clone(),
                        base: known,
                        heads: heads.clone(),
                        bytes: bytes.clone(),
                        changes: n,
                    });
                }
                let urgency = self.urgency(&id, doc);
                pushes.push((urgency, id, bytes, heads, n));
            }
        }
        // Most valuable first; what the policy holds back waits for better conditions.
        pushes.sort_by_key(|p| p.0);
        for (urgency, doc, bundle, heads, n) in pushes {
            if let Some(why) = self.held_back(urgency, bundle.len(), "large document waits")? {
                if !f.report.deferred.iter().any(|(d, _)| *d == doc.as_str()) {
                    f.report.deferred.push((doc.to_string(), why));
                }
                continue;
            }
            f.progress.docs_total += 1;
            f.progress.changes_to_send += n;
            f.in_flight.insert(doc.clone(), (heads.clone(), n));
            f.pushed.insert(doc.clone());
            if bundle.len() > INLINE_MAX {
                let (conn, up_tx, traffic, totals) = (
                    wire.conn.clone(),
                    wire.uploads.clone(),
                    wire.traffic.clone(),
                    wire.totals.clone(),
                );
                let max_frame = wire.max_frame;
                wire.tasks.spawn(async move {
                    let r = upload(conn, doc, bundle, heads, traffic, totals, max_frame).await;
                    let _ = up_tx.send(r).await;
                });
            } else {
                let push = Push {
                    doc,
                    bundle: bundle.to_vec(),
                    heads: hashes_to_wire(&heads),
                };
                wire.send(&Message::Push(push)).await?;
            }
        }
        Ok(())
    }

    fn acked(&self, f: &mut Flight, doc: DocId, applied: u32) {
        let Some((pushed, changes)) = f.answered(&doc) else {
            return;
        };
        f.progress.changes_sent += changes;
        f.report.changes_sent += u64::from(applied);
        let has = f.relay_has.entry(doc.clone()).or_default();
        union_heads(has, &pushed);
        f.batch.acked.push((doc, has.clone()));
    }

    fn handle(&self, f: &mut Flight, msg: Message, ext: codec::Extensions) -> Result<(), Error> {
        match msg {
            Message::Welcome(w) => {
                f.welcomed = true;
                f.report.protocol_version = w.protocol_version;
                f.report.relay_versions = match (
                    ext.get::<u16>(ext::WELCOME_OLDEST_VERSION)?,
                    ext.get::<u16>(ext::WELCOME_NEWEST_VERSION)?,
                ) {
                    (Some(oldest), Some(newest)) => Some((oldest, newest)),
                    _ => None,
                };
            }
            Message::Ack(ack) if f.in_flight.contains_key(&ack.doc) => {
                self.acked(f, ack.doc, ack.applied);
            }
            Message::Resync(doc) => {
                f.answered(&doc);
                self.start_resync(f, doc)?;
            }
            Message::Update(u) => self.apply_update(f, u)?,
            Message::Caught(c) => f.caught = Some(c),
            Message::Error(r) => match &r.doc {
                Some(doc) if f.resync.as_ref().is_some_and(|s| s.contains(doc)) => {
                    f.resync
                        .as_mut()
                        .expect("checked")
                        .handle_message(Message::Error(r))?;
                }
                Some(doc) => {
                    f.answered(doc);
                    f.report
                        .refused
                        .push((doc.to_string(), format!("{}: {}", r.code, r.text)));
                }
                None => {
                    return Err(Error::Refused {
                        code: r.code,
                        text: r.text,
                    });
                }
            },
            m @ (Message::Sync(_) | Message::Ack(_)) => match f.resync.as_mut() {
                Some(r) => r.handle_message(m)?,
                None => {
                    return Err(redline_proto::Error::ProtocolViolation(format!(
                        "unexpected {}",
                        m.kind()
                    ))
                    .into());
                }
            },
            other => {
                return Err(redline_proto::Error::ProtocolViolation(format!(
                    "device got an unexpected {}",
                    other.kind()
                ))
                .into());
            }
        }
        Ok(())
    }

    fn apply_update(&self, f: &mut Flight, u: Update) -> Result<(), Error> {
        if let (Payload::Transfer { .. }, Some(why)) = (&u.payload, &f.defer_large) {
            // Held back by the budget: the relay did not send it; ask again later.
            f.downloads_deferred = true;
            if !f.report.deferred.iter().any(|(d, _)| *d == u.doc.as_str()) {
                f.report.deferred.push((u.doc.to_string(), why.clone()));
            }
            return Ok(());
        }
        let heads = hashes_from_wire(&u.heads);
        f.progress.docs_total += 1;
        if !matches!(u.payload, Payload::Transfer { .. }) {
            f.progress.docs_done += 1;
        }
        let (bytes, document) = match u.payload {
            Payload::Bundle(b) => (b, false),
            Payload::Document(b) => (b, true),
            Payload::Transfer { id, document, .. } => {
                f.announced.insert(id, (u.doc, heads, document));
                return self.apply_transfers(f);
            }
        };
        self.apply_bytes(f, u.doc, &bytes, document, &heads)
    }

    fn apply_transfers(&self, f: &mut Flight) -> Result<(), Error> {
        let ready: Vec<[u8; 16]> = f
            .announced
            .keys()
            .filter(|id| f.arrived.contains_key(*id))
            .copied()
            .collect();
        for id in ready {
            let (doc, heads, document) = f.announced.remove(&id).expect("listed above");
            let bytes = f.arrived.remove(&id).expect("listed above");
            self.apply_bytes(f, doc, &bytes, document, &heads)?;
            f.progress.docs_done += 1;
            // Applied in memory; the staging goes once the document itself is stored.
            f.applied_transfers.push(id);
        }
        Ok(())
    }

    /// Merges a bundle or a saved document into the live copy of `id`.
    fn apply_bytes(
        &self,
        f: &mut Flight,
        id: DocId,
        bytes: &[u8],
        document: bool,
        relay_heads: &[ChangeHash],
    ) -> Result<(), Error> {
        let corrupt = |e: String| {
            Error::Protocol(redline_proto::Error::BadSyncData {
                doc: id.clone(),
                reason: e,
            })
        };
        let missing = {
            let mut docs = self.docs();
            let doc = self.load_or_genesis(&mut docs, &id)?;
            let before = doc.get_heads();
            if document {
                let mut other = Automerge::load(bytes).map_err(|e| corrupt(e.to_string()))?;
                doc.merge(&mut other)?;
            } else {
                // One bundle, or several stored chunks one after another: every one is
                // decoded, then all are applied at once.
                let changes = chunk_changes(bytes).map_err(corrupt)?;
                doc.apply_changes(changes)?;
            }
            if doc.get_heads() != before {
                // Metadata only: extracting the changes themselves costs like a save.
                f.report.changes_received += doc.get_changes_meta(&before).len() as u64;
                f.updated.insert(id.clone());
                f.dirty.insert(id.clone());
                if document {
                    f.merged.insert(id.clone());
                } else {
                    f.received
                        .entry(id.clone())
                        .or_default()
                        .extend_from_slice(bytes);
                }
            }
            !doc.get_missing_deps(&[]).is_empty()
        };
        if missing {
            // This device lacks what the relay assumed it had (a restored backup).
            self.start_resync(f, id)?;
        } else {
            let has = f.relay_has.entry(id.clone()).or_default();
            union_heads(has, relay_heads);
            f.batch.acked.push((id, has.clone()));
        }
        Ok(())
    }

    fn start_resync(&self, f: &mut Flight, id: DocId) -> Result<(), Error> {
        let doc = {
            let mut docs = self.docs();
            match self.load(&mut docs, &id)? {
                Some(d) => d.clone(),
                None => Automerge::new(),
            }
        };
        f.resynced.insert(id.clone());
        let d = DocToSync {
            id,
            doc,
            state: SyncState::new(),
        };
        match f.resync.as_mut() {
            Some(r) => r.add(d)?,
            None => f.resync = Some(DeviceResync::new(vec![d])?),
        }
        Ok(())
    }

    fn finish_resync(&self, f: &mut Flight) -> Result<(), Error> {
        let Some(r) = f.resync.take() else {
            return Ok(());
        };
        for mut s in r.finish() {
            if let Some(e) = s.error {
                f.report
                    .refused
                    .push((s.id.to_string(), format!("{}: {}", e.code, e.text)));
                continue;
            }
            f.report.changes_sent += s.changes_sent;
            let mut docs = self.docs();
            let live = self.load_or_genesis(&mut docs, &s.id)?;
            let before = live.get_heads();
            live.merge(&mut s.doc)?;
            if live.get_heads() != before {
                f.report.changes_received += live.get_changes(&before).len() as u64;
                f.dirty.insert(s.id.clone());
                f.merged.insert(s.id.clone());
                f.updated.insert(s.id.clone());
            }
            // Both sides now hold what the settled exchange ended with.
            let has = f.relay_has.entry(s.id.clone()).or_default();
            union_heads(has, &s.doc.get_heads());
            f.batch.acked.push((s.id, has.clone()));
        }
        // Writes made during the exchange go out as an ordinary push.
        if !f.written_in_flight.is_empty() && f.resync.is_none() {
            f.written_in_flight.clear();
            f.repush = true;
        }
        Ok(())
    }

    /// Writes applied documents, relay-held heads and (when nothing is pending) the
    /// cursor, with one flush.
    fn persist(&self, f: &mut Flight, cursor_key: &str) -> Result<(), Error> {
        let mut batch = std::mem::take(&mut f.batch);
        batch.acked_at_ms = self.inner.config.clock.now_ms();
        let mut written = Vec::new();
        {
            let docs = self.docs();
            for id in f.dirty.drain() {
                let received = f.received.remove(&id);
                let merged = f.merged.remove(&id);
                if let Some(d) = docs.get(&id) {
                    let write = match received {
                        Some(bundles) if !merged && self.is_stored(&id) => {
                            DocWrite::Append(bundles)
                        }
                        _ => self.doc_write(&id, d, None),
                    };
                    match write {
                        DocWrite::Append(chunk) if chunk.is_empty() => {}
                        write => batch.docs.push((id.clone(), write)),
                    }
                    written.push((id, d.get_heads()));
                }
            }
            // A set of heads: sorted, and collapsed to the document's heads once the relay
            // holds all of them (so it does not grow with every push).
            let mut latest: HashMap<DocId, Vec<ChangeHash>> = HashMap::new();
            for (id, mut has) in batch.acked.drain(..) {
                if let Some(d) = docs.get(&id) {
                    let heads = d.get_heads();
                    if heads.iter().all(|h| has.contains(h)) {
                        has = heads;
                    }
                }
                has.sort();
                if let Some(live) = f.relay_has.get_mut(&id) {
                    live.clone_from(&has);
                }
                latest.insert(id, has);
            }
            batch.acked = latest.into_iter().collect();
        }
        if f.settled()
            && !f.downloads_deferred
            && let Some(c) = &f.caught
        {
            let bytes = postcard::to_stdvec(c).map_err(|e| Error::Store(e.to_string()))?;
            batch.cursor = Some((cursor_key.to_owned(), bytes));
        }
        let changed: Vec<DocId> = batch.docs.iter().map(|(id, _)| id.clone()).collect();
        // What arrived is visible (the live copies hold it) before this device's flush:
        // the relay holds it durably, and a crash before the flush only means it arrives
        // again (the cursor moves with the flush, never before it).
        for id in &changed {
            let _ = self.inner.changes.send(crate::client::DocChange {
                doc: id.clone(),
                origin: crate::client::ChangeOrigin::Sync,
            });
        }
        if !batch.is_empty()
            && let Err(e) = self.inner.store.write_batch(&batch)
        {
            {
                // Not stored: drop the cached copies so memory matches disk.
                let mut docs = self.docs();
                for id in &changed {
                    docs.remove(id);
                }
                return Err(e);
            }
        }
        for (id, heads) in written {
            self.stored_as(&id, heads);
        }
        self.compact_heavy(&changed);
        for id in f.applied_transfers.drain(..) {
            self.inner.store.drop_transfer(&id)?;
        }
        if f.settled() {
            // Partial transfers nobody announced this time are stale (the document moved on).
            for (id, _) in self.inner.store.partial_transfers()? {
                if !f.announced.contains_key(&id) {
                    self.inner.store.drop_transfer(&id)?;
                }
            }
        }
        debug!("sync step persisted");
        Ok(())
    }

    /// Folds the chunks of `ids` into new snapshots where they have grown heavy. Best
    /// effort: what the chunks hold is durable already.
    fn compact_heavy(&self, ids: &[DocId]) {
        for id in ids {
            let heavy = self
                .inner
                .store
                .stored(id)
                .is_ok_and(|s| crate::store::wants_compaction(&s));
            if !heavy {
                continue;
            }
            let docs = self.docs();
            if let Some(d) = docs.get(id)
                && self.inner.store.save_doc(id, &d.save()).is_ok()
            {
                self.stored_as(id, d.get_heads());
            }
        }
    }

    /// Relay-held heads of every held document.
    fn relay_has_all(&self) -> Result<HashMap<DocId, Vec<ChangeHash>>, Error> {
        let mut out = HashMap::new();
        for id in self.inner.store.doc_ids()? {
            let has = self.inner.store.acked_heads(&id)?.unwrap_or_default();
            out.insert(id, has);
        }
        Ok(out)
    }

    /// What this device subscribes to.
    pub fn subscription(&self) -> Result<Subscription, Error> {
        let c = &self.inner.config;
        let today = crate::client::day_of(c.clock.now_ms());
        let ledger_since = match today {
            Some(t) => Some(crate::client::day_minus(&t, c.keep_days.saturating_sub(1))?),
            None => None,
        };
        Ok(Subscription {
            org: c.org.clone(),
            teams: c.teams.clone(),
            ledger_since,
            zones: c.zones.clone(),
            docs: self.inner.store.follows()?,
        })
    }
}

#[cfg(test)]
mod chunk_tests {
    use automerge::transaction::Transactable;
    use automerge::{ActorId, Automerge, ROOT};

    use super::chunk_changes;

    #[test]
    fn an_update_of_several_chunks_gives_every_change_and_a_cut_one_is_refused() {
        let mut doc = Automerge::new().with_actor(ActorId::random());
        let mut bundles = Vec::new();
        for i in 0..3 {
            let before = doc.get_heads();
            for j in 0..2 {
                let mut tx = doc.transaction();
                tx.put(ROOT, format!("k{i}-{j}"), i * 10 + j).unwrap();
                tx.commit();
            }
            let new: Vec<_> = doc.get_changes(&before).iter().map(|c| c.hash()).collect();
            bundles.push(doc.bundle(new).unwrap().bytes().to_vec());
        }
        // One change as a plain change chunk between the bundles.
        let mut tx = doc.transaction();
        tx.put(ROOT, "single", 1).unwrap();
        tx.commit();
        let single = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
        let mut all = bundles[0].clone();
        all.extend_from_slice(&single);
        all.extend_from_slice(&bundles[1]);
        all.extend_from_slice(&bundles[2]);
        assert_eq!(chunk_changes(&bundles[0]).unwrap().len(), 2);
        let changes = chunk_changes(&all).unwrap();
        assert_eq!(changes.len(), 7);
        let mut copy = Automerge::new();
        copy.apply_changes(changes).unwrap();
        assert_eq!(copy.get_heads(), doc.get_heads());
        assert!(chunk_changes(&all[..all.len() - 1]).is_err());
        assert!(chunk_changes(&[0x85, 0x6f, 0x4a]).is_err());
    }
}
