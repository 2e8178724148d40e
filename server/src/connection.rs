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
    Ack, Cursor, ErrorReport, Hello, Message, Payload, Piece, Pull, Subscription, Update,
    UploadOffset, Welcome,
};
use redline_proto::session::{RelayResync, check_hello, hashes_from_wire, hashes_to_wire};
use redline_proto::{DeviceId, DocId, ErrorCode, PROTOCOL_VERSION};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Error;
use crate::access::Scope;
use crate::auth::Authority;
use crate::config::RelayConfig;
use crate::hub::{Committed, Hub, Window, bundle_changes};

/// Updates larger than this go as a transfer on their own stream.
pub(crate) const INLINE_MAX: usize = 512 * 1024;
/// How long live fan-out waits to coalesce commits that land together.
const LIVE_COALESCE: Duration = Duration::from_millis(8);
/// Piece size of relay-to-device transfers.
const PIECE: usize = 256 * 1024;

/// What one connection shares with the rest of the relay.
#[derive(Clone)]
pub(crate) struct Shared {
    pub hub: Arc<Hub>,
    pub config: Arc<RelayConfig>,
    pub authority: Arc<Authority>,
}

/// Serves one incoming connection until it closes. A connection the relay ends for cause
/// (no valid token, revoked, limits, garbage) is closed with the error code as the QUIC
/// application code, after the device was told why on the control stream.
pub(crate) async fn serve(incoming: quinn::Incoming, shared: Shared) {
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
    let hub = shared.hub.clone();
    hub.metrics.connections.inc();
    hub.metrics.connections_open.inc();
    async move {
        let mut wire = Wire::default();
        let result = run(conn.clone(), shared, span2, &mut wire).await;
        wire.account(&conn, &hub);
        hub.metrics.connections_open.dec();
        if let Some(device) = &wire.device {
            hub.devices.closed(device, wire.received + wire.sent);
        }
        debug!(
            ok = result.is_ok(),
            stats = ?conn.stats(),
            "connection ended"
        );
        match result {
            Ok(()) => {}
            Err(e) => {
                let code = match &e {
                    Error::Refused { code, .. } => Some(*code),
                    Error::Protocol(p) => Some(p.code()),
                    _ => None,
                };
                match code {
                    Some(code) => {
                        hub.metrics.connections_refused.inc();
                        info!(%code, "closing connection: {e}");
                        conn.close(u32::from(code.0).into(), code.name().as_bytes());
                    }
                    None => debug!("connection ended: {e}"),
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Reads one frame: `Ok(None)` at a clean end of stream (between frames). Waiting for a
/// frame to begin is bounded by `first`; once begun, the frame must arrive within
/// `rest` (a sender that trickles bytes is cut off).
pub(crate) async fn read_message(
    recv: &mut RecvStream,
    max_frame: usize,
    first: Option<Duration>,
    rest: Duration,
) -> Result<Option<Message>, Error> {
    let timed_out = || Error::Refused {
        code: ErrorCode::TIMED_OUT,
        text: "the stream was silent too long".into(),
    };
    let mut header = [0u8; HEADER_LEN];
    let begin = recv.read_exact(&mut header);
    let begun = match first {
        Some(limit) => tokio::time::timeout(limit, begin)
            .await
            .map_err(|_| timed_out())?,
        None => begin.await,
    };
    match begun {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(redline_proto::Error::Truncated { have: n }.into());
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(Error::Connection(e.to_string())),
    }
    let len = codec::payload_len(header, max_frame)?;
    let mut payload = vec![0u8; len];
    tokio::time::timeout(rest, recv.read_exact(&mut payload))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| match e {
            quinn::ReadExactError::FinishedEarly(n) => {
                Error::Protocol(redline_proto::Error::Truncated {
                    have: HEADER_LEN + n,
                })
            }
            quinn::ReadExactError::ReadError(e) => Error::Connection(e.to_string()),
        })?;
    Ok(Some(codec::decode_payload(&payload)?))
}

/// Bytes of one connection already added to the relay's counters.
#[derive(Default)]
struct Wire {
    received: u64,
    sent: u64,
    /// The device, once it said hello.
    device: Option<DeviceId>,
}

impl Wire {
    /// Adds what the connection moved since the last call (UDP payload bytes, QUIC
    /// overhead included) to the relay's counters.
    fn account(&mut self, conn: &quinn::Connection, hub: &Hub) {
        let stats = conn.stats();
        let (rx, tx) = (stats.udp_rx.bytes, stats.udp_tx.bytes);
        hub.metrics
            .bytes_received
            .inc_by(rx.saturating_sub(self.received));
        hub.metrics.bytes_sent.inc_by(tx.saturating_sub(self.sent));
        self.received = rx.max(self.received);
        self.sent = tx.max(self.sent);
    }
}

/// A token bucket: `rate` per second on average, bursts up to `burst`.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: std::time::Instant::now(),
        }
    }

    /// Takes one token; false if the bucket is empty.
    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The per-connection message budget, shared by the control stream and uploads.
#[derive(Clone)]
struct RateLimit(Arc<std::sync::Mutex<Bucket>>);

impl RateLimit {
    fn check(&self) -> Result<(), Error> {
        if self.0.lock().expect("rate lock").take() {
            Ok(())
        } else {
            Err(Error::Refused {
                code: ErrorCode::RATE_LIMITED,
                text: "too many messages; the connection was closed (reconnect later)".into(),
            })
        }
    }
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
    /// What its token allows.
    scope: Scope,
    /// In quarantine after this long offline (ms): pushes are held for review.
    quarantined: Option<i64>,
    /// The device had finished a sync before this connection (it is not new).
    synced_before: bool,
    /// What it receives: its subscription narrowed to its scope.
    subscription: Subscription,
    /// Heads the device is known to hold, per document (pushed, uploading or delivered
    /// here). Shared with upload tasks.
    known: Known,
    /// Transfers the device holds part of: id → bytes held.
    resume: HashMap<[u8; 16], u64>,
    /// The device asked for large downloads to be announced but not sent.
    defer_large: bool,
    /// Feed sequence the device has been brought up to (`None` before its first pull).
    delivered: Option<u64>,
    resync: RelayResync,
}

/// The refusal sent for anything outside the token's scope. The same words whether or not
/// the document exists.
fn forbidden(doc: &DocId) -> Message {
    error_msg(
        ErrorCode::FORBIDDEN,
        "your token does not allow this document",
        Some(doc.clone()),
    )
}

/// Reads the device's `Hello` and checks its version and token.
async fn greet(
    send: &mut SendStream,
    recv: &mut RecvStream,
    shared: &Shared,
) -> Result<(Hello, Scope), Error> {
    let config = &shared.config;
    let limits = &config.limits;
    let refuse = |code: ErrorCode, text: String| Error::Refused { code, text };
    let first = read_message(
        recv,
        config.max_frame,
        Some(limits.hello_timeout),
        limits.hello_timeout,
    )
    .await;
    let denial = match first {
        Ok(Some(Message::Hello(hello))) => match check_hello(&hello) {
            Err(e) => refuse(e.code(), e.to_string()),
            Ok(()) => match shared.authority.admit(&hello.token, &hello.device) {
                Ok(claims) => return Ok((hello, Scope::new(claims))),
                Err(d) => refuse(d.code, d.text),
            },
        },
        Ok(Some(other)) => refuse(
            ErrorCode::PROTOCOL_VIOLATION,
            format!("expected hello, got {}", other.kind()),
        ),
        Ok(None) => refuse(
            ErrorCode::PROTOCOL_VIOLATION,
            "stream ended before hello".into(),
        ),
        Err(Error::Protocol(p)) => refuse(p.code(), p.to_string()),
        Err(e) => return Err(e),
    };
    if let Error::Refused { code, text } = &denial {
        let _ = write_message(
            send,
            &error_msg(*code, text.clone(), None),
            config.max_frame,
        )
        .await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    }
    Err(denial)
}

async fn run(
    conn: quinn::Connection,
    shared: Shared,
    span: tracing::Span,
    wire: &mut Wire,
) -> Result<(), Error> {
    let Shared {
        hub,
        config,
        authority,
    } = shared.clone();
    let limits = config.limits.clone();
    let (mut send, mut recv) = tokio::time::timeout(limits.hello_timeout, conn.accept_bi())
        .await
        .map_err(|_| Error::Refused {
            code: ErrorCode::TIMED_OUT,
            text: "no stream opened".into(),
        })?
        .map_err(|e| Error::Connection(e.to_string()))?;
    let (hello, scope) = greet(&mut send, &mut recv, &shared).await?;
    let greeted = std::time::Instant::now();
    span.record("device", tracing::field::display(&hello.device));
    let granted = scope.grant(&hello.subscription);
    let synced_before = hub.devices.synced_before(&hello.device);
    let quarantined = hub
        .devices
        .quarantine_check(scope.claims(), config.quarantine_after);
    if let Some(offline) = quarantined {
        info!(
            offline_h = offline / 3_600_000,
            "device returns after its horizon: quarantined"
        );
    }
    hub.devices.hello(
        scope.claims(),
        hello.protocol_version,
        &hello.app_version,
        &granted,
    );
    wire.device = Some(hello.device.clone());
    info!(app_version = %hello.app_version, member = %scope.claims().member, role = %scope.claims().role, "device hello");
    write_message(
        &mut send,
        &Message::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            relay: config.name.clone(),
            epoch: hub.epoch(),
            granted: granted.clone(),
            quarantined,
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
        // Let the last words (an error report) reach the device before any close.
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    });
    // Reader: frames into a channel, so the main loop can also wait on other things. A
    // live device may be quiet between frames; a frame once begun must arrive in time.
    let (inbox_tx, mut inbox) = mpsc::channel::<Result<Message, Error>>(64);
    let stream_idle = limits.stream_idle_timeout;
    let reader = tokio::spawn(async move {
        loop {
            let r = read_message(&mut recv, max_frame, None, stream_idle).await;
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

    let rate = RateLimit(Arc::new(std::sync::Mutex::new(Bucket::new(
        limits.messages_per_second,
        limits.message_burst,
    ))));
    let mut streams = Bucket::new(limits.streams_per_second, config.max_streams_per_connection);
    let token_id = scope.claims().id;
    let expires = scope.claims().expires;
    let mut revocations = authority.watch();
    let expiry = tokio::time::Instant::now()
        + Duration::from_secs(expires.saturating_sub(crate::auth::now_secs()));
    let mut peer = Peer {
        device: hello.device.clone(),
        scope,
        quarantined,
        synced_before,
        subscription: granted,
        known: Known::default(),
        resume: HashMap::new(),
        defer_large: false,
        delivered: None,
        resync: RelayResync::new(),
    };
    let mut pushes: JoinSet<(DocId, Vec<ChangeHash>, Result<Committed, Error>)> = JoinSet::new();
    let mut uploads: JoinSet<Result<(), Error>> = JoinSet::new();
    let mut pending_pull: Option<Pull> = None;
    let mut stable = hub.stable();
    let mut due: Option<tokio::time::Instant> = None;
    let mut first_caught = true;
    let result = loop {
        let live = peer.delivered.is_some();
        if first_caught && live {
            first_caught = false;
            hub.metrics
                .sync_latency
                .observe(greeted.elapsed().as_secs_f64());
        }
        wire.account(&conn, &hub);
        tokio::select! {
            item = inbox.recv() => match item {
                None => break Ok(()),
                Some(Err(e)) => {
                    let (code, text) = match &e {
                        Error::Protocol(p) => (p.code(), p.to_string()),
                        Error::Refused { code, text } => (*code, text.clone()),
                        other => (ErrorCode::BAD_FRAME, other.to_string()),
                    };
                    let _ = out.send(error_msg(code, text.clone(), None)).await;
                    break Err(match e { Error::Connection(_) => e, _ => Error::Refused { code, text } });
                }
                Some(Ok(msg)) => {
                    if let Err(e) = rate.check() {
                        break Err(tell(&out, e).await);
                    }
                    match msg {
                        Message::Push(p) => {
                            if !peer.scope.can_write(&p.doc) {
                                let _ = out.send(forbidden(&p.doc)).await;
                            } else {
                                match bundle_changes(&p.bundle) {
                                    Ok(changes) if changes.len() > limits.max_changes_per_message => {
                                        let text = format!("{} changes in one push; the limit is {}", changes.len(), limits.max_changes_per_message);
                                        let _ = out.send(error_msg(ErrorCode::TOO_LARGE, text, Some(p.doc))).await;
                                    }
                                    Ok(changes) if peer.quarantined.is_some()
                                        || (peer.synced_before
                                            && peer.scope.claims().role == redline_proto::token::Role::Volunteer
                                            && new_actor_on_existing(&hub, &peer.device, &p.doc, &changes).await) =>
                                    {
                                        if peer.quarantined.is_none() {
                                            // A known phone writing as an actor never seen
                                            // before into an existing document: its store
                                            // was reset or restored. Held for review from
                                            // now on.
                                            warn!(doc = %p.doc, "known device pushes with an unknown actor: quarantined");
                                            peer.quarantined = Some(hub.devices.mark_quarantined(&peer.device));
                                        }
                                        let entry = held_entry(&peer.device, &peer.scope, peer.quarantined, &p.doc, changes.len());
                                        let hub = hub.clone();
                                        let heads = hashes_from_wire(&p.heads);
                                        pushes.spawn(async move {
                                            let r = hold(&hub, entry, p.bundle).await;
                                            (p.doc, heads, r)
                                        });
                                    }
                                    Ok(changes) => {
                                        peer.known.add_own(&p.doc, &changes);
                                        let hub = hub.clone();
                                        let heads = hashes_from_wire(&p.heads);
                                        let device = peer.device.clone();
                                        pushes.spawn(async move {
                                            let arrived = std::time::Instant::now();
                                            let r = hub.push(&p.doc, &device, changes).await;
                                            hub.metrics.commit_latency.observe(arrived.elapsed().as_secs_f64());
                                            (p.doc, heads, r)
                                        });
                                    }
                                    Err(e) => { let _ = out.send(error_msg(ErrorCode::BAD_DOCUMENT_DATA, e, Some(p.doc))).await; }
                                }
                            }
                        }
                        Message::DevicesRequest(team) => {
                            let reply = if reviews(&peer, &team) {
                                match hub.devices.team(&team, *hub.stable().borrow()) {
                                    Ok(list) => Message::Devices(list),
                                    Err(e) => error_msg(ErrorCode::STORAGE_FAILURE, e.to_string(), None),
                                }
                            } else {
                                error_msg(ErrorCode::FORBIDDEN, format!("only a lead of {team} or an operator may see its devices"), None)
                            };
                            let _ = out.send(reply).await;
                        }
                        Message::QuarantineRequest(team) | Message::QuarantineAccept { team, .. }
                            if !reviews(&peer, &team) =>
                        {
                            let _ = out.send(error_msg(ErrorCode::FORBIDDEN, format!("only a lead of {team} or an operator reviews its quarantine"), None)).await;
                        }
                        Message::QuarantineRequest(team) => {
                            let reply = match crate::quarantine::list(&hub, &peer.scope, &team) {
                                Ok(list) => Message::Quarantine(list),
                                Err(e) => error_msg(ErrorCode::STORAGE_FAILURE, e.to_string(), None),
                            };
                            let _ = out.send(reply).await;
                        }
                        Message::QuarantineAccept { team, device } => {
                            let reply = match crate::quarantine::accept(&hub, &peer.scope, &team, &device).await {
                                Ok(list) => Message::Quarantine(list),
                                Err(e) => error_msg(ErrorCode::STORAGE_FAILURE, e.to_string(), None),
                            };
                            let _ = out.send(reply).await;
                        }
                        Message::Pull(pull) => {
                            peer.resume = pull.resume.iter().map(|o| (o.id, o.have)).collect();
                            peer.defer_large = pull.defer_large;
                            pending_pull = Some(pull);
                        }
                        Message::Sync(step) => {
                            if peer.scope.can_read(&step.doc) {
                                resync_step(&hub, &mut peer, step).await;
                                while let Some(m) = peer.resync.poll_transmit() {
                                    if out.send(m).await.is_err() { break; }
                                }
                            } else {
                                let _ = out.send(forbidden(&step.doc)).await;
                            }
                        }
                        other => {
                            let text = format!("unexpected {} on the control stream", other.kind());
                            break Err(tell(&out, Error::Refused { code: ErrorCode::PROTOCOL_VIOLATION, text }).await);
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
                        Err(e) => refusal(e, doc),
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
            changed = revocations.changed() => {
                if changed.is_ok() && authority.is_revoked(&token_id) {
                    let text = format!("token {token_id} was revoked; ask your lead for a new one");
                    break Err(tell(&out, Error::Refused { code: ErrorCode::TOKEN_REVOKED, text }).await);
                }
            }
            _ = tokio::time::sleep_until(expiry) => {
                let text = "token expired during the session; ask your lead for a new one".to_string();
                break Err(tell(&out, Error::Refused { code: ErrorCode::TOKEN_EXPIRED, text }).await);
            }
            accepted = conn.accept_bi() => match accepted {
                Ok((s, r)) => {
                    if !streams.take() {
                        let text = "too many streams; the connection was closed (reconnect later)".to_string();
                        break Err(tell(&out, Error::Refused { code: ErrorCode::RATE_LIMITED, text }).await);
                    }
                    let up = UploadCtx { hub: hub.clone(), config: config.clone(), device: peer.device.clone(), scope: peer.scope.clone(), known: peer.known.clone(), rate: rate.clone(), quarantined: peer.quarantined };
                    uploads.spawn(upload(s, r, up).in_current_span());
                }
                Err(e) => break Err(Error::Connection(e.to_string())),
            },
            Some(done) = uploads.join_next() => {
                match done {
                    Ok(Err(e @ Error::Refused { code, .. })) if code != ErrorCode::TIMED_OUT => {
                        break Err(tell(&out, e).await);
                    }
                    Ok(Err(e)) => debug!("upload ended: {e}"),
                    _ => {}
                }
            }
        }
    };
    drop(out);
    reader.abort();
    uploads.abort_all();
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    result
}

/// Whether `changes` carry an actor the relay has never bound, for a document it holds,
/// from a device that already wrote with another actor (its store was reset or
/// restored: one install keeps one actor for life).
async fn new_actor_on_existing(
    hub: &Arc<Hub>,
    device: &DeviceId,
    doc: &DocId,
    changes: &[automerge::Change],
) -> bool {
    let genesis = automerge::ActorId::from(redline_proto::genesis::GENESIS_ACTOR);
    let mut actors: Vec<&automerge::ActorId> = changes
        .iter()
        .map(|c| c.actor_id())
        .filter(|a| **a != genesis)
        .collect();
    actors.dedup();
    let storage = hub.storage();
    let unknown = actors
        .iter()
        .any(|a| matches!(storage.actor_owner(a.to_bytes()), Ok(None)));
    if !unknown || !matches!(storage.actors_of(device), Ok(n) if n > 0) {
        return false;
    }
    match hub.slot(doc).await {
        Ok(slot) => {
            let exists = !slot.lock().await.doc.get_heads().is_empty();
            hub.release(slot);
            exists
        }
        Err(_) => false,
    }
}

/// Whether this peer oversees `team`: its devices' health and its quarantine (a lead of
/// the team, or an operator).
fn reviews(peer: &Peer, team: &redline_proto::TeamId) -> bool {
    let c = peer.scope.claims();
    c.role == redline_proto::token::Role::Operator
        || (c.role == redline_proto::token::Role::Lead && c.teams.contains(team))
}

/// The quarantine entry for a push of `changes` changes to `doc` by `device`, offline
/// for `offline_ms` before it came back.
fn held_entry(
    device: &DeviceId,
    scope: &Scope,
    offline_ms: Option<i64>,
    doc: &DocId,
    changes: usize,
) -> redline_proto::message::QuarantineEntry {
    redline_proto::message::QuarantineEntry {
        device: device.clone(),
        member: scope.claims().member.to_string(),
        doc: doc.clone(),
        changes: u32::try_from(changes).unwrap_or(u32::MAX),
        received_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        offline_ms: offline_ms.unwrap_or(0),
    }
}

/// Holds a quarantined push; the answer is always "held" (or a storage failure).
async fn hold(
    hub: &Arc<Hub>,
    entry: redline_proto::message::QuarantineEntry,
    bundle: Vec<u8>,
) -> Result<Committed, Error> {
    let offline_h = entry.offline_ms / 3_600_000;
    crate::quarantine::hold(hub, entry, bundle).await?;
    Err(Error::Quarantined(format!(
        "this phone was offline for {offline_h} h: its changes are kept on the relay for a lead's review and merge once accepted"
    )))
}

/// Reports `e` to the device on the control stream and hands it back (to end the
/// connection with).
async fn tell(out: &mpsc::Sender<Message>, e: Error) -> Error {
    if let Error::Refused { code, text } = &e {
        let _ = out.send(error_msg(*code, text.clone(), None)).await;
    }
    e
}

/// The answer to a push or upload the hub did not commit.
fn refusal(e: Error, doc: DocId) -> Message {
    match e {
        Error::MissingDependencies(_) => Message::Resync(doc),
        Error::BadChanges(text) => error_msg(ErrorCode::BAD_DOCUMENT_DATA, text, Some(doc)),
        e @ Error::ForgedActor { .. } => error_msg(ErrorCode::FORBIDDEN, e.to_string(), Some(doc)),
        Error::TooLarge(text) => error_msg(ErrorCode::TOO_LARGE, text, Some(doc)),
        Error::Quarantined(text) => error_msg(ErrorCode::QUARANTINED, text, Some(doc)),
        e => error_msg(
            ErrorCode::STORAGE_FAILURE,
            format!("nothing was acknowledged: {e}"),
            Some(doc),
        ),
    }
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
        hub.devices.caught(&peer.device, upto);
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
        if peer.defer_large
            && let Payload::Bundle(bytes) | Payload::Document(bytes) = &payload
            && bytes.len() > INLINE_MAX
        {
            // Announced, not sent: the device's budget holds it back, and its cursor
            // stays where it was until it asks again.
            let document = matches!(payload, Payload::Document(_));
            let announce = Update {
                doc: doc.clone(),
                payload: Payload::Transfer {
                    id: transfer_id(bytes),
                    len: bytes.len() as u64,
                    document,
                },
                heads: hashes_to_wire(&heads),
            };
            out.send(Message::Update(announce))
                .await
                .map_err(|_| Error::Connection("control stream closed".into()))?;
            continue;
        }
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
    hub.devices.caught(&peer.device, upto);
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
    let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        peer.resync.apply(&doc_id, &mut state.doc, message)
    }));
    let applied = match applied {
        Ok(Ok(a)) => a,
        failed => {
            // The document may be half-changed: back to what the disk holds.
            let _ = hub.reload(&doc_id, &slot, &mut state).await;
            let (code, text) = match failed {
                Ok(Err(e)) => (e.code(), e.to_string()),
                _ => (
                    ErrorCode::BAD_DOCUMENT_DATA,
                    "Automerge could not apply the sync message".to_string(),
                ),
            };
            return peer.resync.report(code, text, doc_id);
        }
    };
    // What the step added must be the device's own, in a document it may write.
    if state.doc.get_heads() != before {
        let added = state.doc.get_changes(&before);
        let refused = if !peer.scope.can_write(&doc_id) {
            Some((
                ErrorCode::FORBIDDEN,
                "your token does not allow this document".to_string(),
            ))
        } else if peer.quarantined.is_some() {
            // Only reviewed pushes merge: the device pushes these again, to be held.
            Some((
                ErrorCode::QUARANTINED,
                "this phone is in quarantine: its changes go through a lead's review".to_string(),
            ))
        } else {
            hub.check_actors(&doc_id, &peer.device, added.iter())
                .err()
                .map(|e| (ErrorCode::FORBIDDEN, e.to_string()))
        };
        if let Some((code, text)) = refused {
            let _ = hub.reload(&doc_id, &slot, &mut state).await;
            return peer.resync.report(code, text, doc_id);
        }
    }
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

/// What an upload stream needs from its connection.
struct UploadCtx {
    hub: Arc<Hub>,
    config: Arc<RelayConfig>,
    device: DeviceId,
    scope: Scope,
    known: Known,
    rate: RateLimit,
    /// In quarantine after this long offline (ms): uploads are held like pushes.
    quarantined: Option<i64>,
}

/// One resumable upload on its own stream.
async fn upload(mut send: SendStream, mut recv: RecvStream, ctx: UploadCtx) -> Result<(), Error> {
    let UploadCtx {
        hub,
        config,
        device,
        scope,
        known,
        rate,
        quarantined,
    } = ctx;
    let max_frame = config.max_frame;
    let idle = config.limits.stream_idle_timeout;
    let first = read_message(&mut recv, max_frame, Some(idle), idle).await;
    if let Err(e @ (Error::Refused { .. } | Error::Protocol(_))) = &first {
        let (code, text) = match e {
            Error::Refused { code, text } => (*code, text.clone()),
            Error::Protocol(p) => (p.code(), p.to_string()),
            _ => unreachable!("matched above"),
        };
        let _ = write_message(&mut send, &error_msg(code, text.clone(), None), max_frame).await;
        let _ = send.finish();
        return Err(Error::Refused { code, text });
    }
    rate.check()?;
    let Some(Message::Upload(up)) = first? else {
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
        return Err(Error::Refused {
            code: ErrorCode::PROTOCOL_VIOLATION,
            text: "a stream must start with an upload".into(),
        });
    };
    if !scope.can_write(&up.doc) {
        write_message(&mut send, &forbidden(&up.doc), max_frame).await?;
        let _ = send.finish();
        return Ok(());
    }
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
        let Some(Message::Piece(p)) = read_message(&mut recv, max_frame, Some(idle), idle).await?
        else {
            return Err(Error::Connection("upload stream ended early".into()));
        };
        rate.check()?;
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
            Ok(changes) if changes.len() > config.limits.max_changes_per_message => error_msg(
                ErrorCode::TOO_LARGE,
                format!(
                    "{} changes in one upload; the limit is {}",
                    changes.len(),
                    config.limits.max_changes_per_message
                ),
                Some(up.doc.clone()),
            ),
            Ok(changes) if quarantined.is_some() => {
                let entry = held_entry(&device, &scope, quarantined, &up.doc, changes.len());
                match hold(&hub, entry, bytes.clone()).await {
                    Ok(_) => unreachable!("hold always answers held"),
                    Err(e) => refusal(e, up.doc.clone()),
                }
            }
            Ok(changes) => {
                known.add_own(&up.doc, &changes);
                match hub.push(&up.doc, &device, changes).await {
                    Ok(c) => Message::Ack(Ack {
                        doc: up.doc.clone(),
                        heads: hashes_to_wire(&c.heads),
                        applied: c.applied,
                    }),
                    Err(e) => refusal(e, up.doc.clone()),
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
