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

use std::sync::Arc;
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use redline_proto::codec::{self, HEADER_LEN};
use redline_proto::message::ext;
use redline_proto::message::{ErrorReport, Hello, Message, Piece, Welcome};
use redline_proto::session::check_hello;
use redline_proto::wire::{TRANSFER_PIECE, transfer_id, union_heads};
use redline_proto::{DeviceId, DocId, ErrorCode, MIN_PROTOCOL_VERSION};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Error;
use crate::access::Scope;
use crate::auth::Authority;
use crate::config::RelayConfig;
use crate::door::Seat;
use crate::hub::Window;
use crate::session::{
    Action, Admission, Answer, Bucket, Input, Outcome, Peer, Query, Request, Session,
    SessionLimits, Verdict, refusal_code,
};
use crate::state::RelayState;

pub mod loopback;
mod upload;
use upload::{UploadCtx, upload};

/// What one connection shares with the rest of the relay.
#[derive(Clone)]
pub(crate) struct Shared {
    pub relay: Arc<RelayState>,
    pub config: Arc<RelayConfig>,
    pub authority: Arc<Authority>,
    pub door: Arc<crate::door::Door>,
}

/// Serves one incoming connection until it closes. A connection the relay ends for cause
/// (no valid token, revoked, limits, garbage) is closed with the error code as the QUIC
/// application code, after the device was told why on the control stream.
pub(crate) async fn serve(incoming: quinn::Incoming, shared: Shared, seats: Vec<Seat>) {
    let remote = incoming.remote_address();
    // Until its hello is admitted, the connection counts as pending (see `door`).
    let pending = shared.door.pending();
    // A handshake on a lossy mobile link can take a few retransmissions: twice the hello
    // deadline, then the place is given back.
    let handshake = tokio::time::timeout(2 * shared.config.limits.hello_timeout, incoming).await;
    let conn = match handshake {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(%remote, "handshake failed: {e}");
            return;
        }
        Err(_) => {
            debug!(%remote, "handshake did not finish in time");
            return;
        }
    };
    let _seats = seats;
    let span = info_span!("conn", conn = conn.stable_id(), %remote, device = tracing::field::Empty);
    let span2 = span.clone();
    let relay = shared.relay.clone();
    relay.metrics.connections.inc();
    relay.metrics.connections_open.inc();
    async move {
        let mut wire = Wire::default();
        let result = run(conn.clone(), shared, span2, &mut wire, pending).await;
        wire.account(&conn, &relay);
        relay.metrics.connections_open.dec();
        if let Some(device) = &wire.device {
            relay.devices.closed(device, wire.received + wire.sent);
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
                        relay.metrics.connections_refused.inc();
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
    match read_frame(recv, max_frame, first, rest).await? {
        None => Ok(None),
        Some(payload) => Ok(Some(codec::decode_payload(&payload)?)),
    }
}

/// Reads one frame's payload, with [`read_message`]'s deadlines.
async fn read_frame(
    recv: &mut RecvStream,
    max_frame: usize,
    first: Option<Duration>,
    rest: Duration,
) -> Result<Option<Vec<u8>>, Error> {
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
    Ok(Some(payload))
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
    fn account(&mut self, conn: &quinn::Connection, relay: &RelayState) {
        let stats = conn.stats();
        let (rx, tx) = (stats.udp_rx.bytes, stats.udp_tx.bytes);
        relay
            .metrics
            .bytes_received
            .inc_by(rx.saturating_sub(self.received));
        relay
            .metrics
            .bytes_sent
            .inc_by(tx.saturating_sub(self.sent));
        self.received = rx.max(self.received);
        self.sent = tx.max(self.sent);
    }
}

/// The per-connection message budget, shared by the control stream and uploads.
#[derive(Clone)]
struct RateLimit(Arc<std::sync::Mutex<Bucket>>);

impl RateLimit {
    fn check(&self) -> Result<(), Error> {
        let allowed = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(std::time::Instant::now());
        if allowed {
            Ok(())
        } else {
            Err(Error::Refused {
                code: ErrorCode::RATE_LIMITED,
                text: "too many messages; the connection was closed (reconnect later)".into(),
            })
        }
    }
}

/// Writes one frame; a device that does not take it within `within` (it stopped
/// reading) is refused with `timed_out`.
async fn write_message(
    send: &mut SendStream,
    msg: &Message,
    max_frame: usize,
    within: Duration,
) -> Result<(), Error> {
    let frame = codec::encode_frame(msg, max_frame)?;
    write_frame(send, &frame, within).await
}

async fn write_frame(send: &mut SendStream, frame: &[u8], within: Duration) -> Result<(), Error> {
    match tokio::time::timeout(within, send.write_all(frame)).await {
        Ok(written) => written.map_err(|e| Error::Connection(e.to_string())),
        Err(_) => Err(stopped_reading()),
    }
}

fn stopped_reading() -> Error {
    Error::Refused {
        code: ErrorCode::TIMED_OUT,
        text: "the device stopped reading".into(),
    }
}

fn error_msg(code: ErrorCode, text: impl Into<String>, doc: Option<DocId>) -> Message {
    Message::Error(ErrorReport {
        code,
        text: text.into(),
        doc,
    })
}

/// Whether a device's hello says it reads several chunks in one payload (an extension:
/// version 2 and later only; a malformed value counts as no).
fn accepts_chunks(ext: &codec::Extensions, version: u16) -> bool {
    version >= 2 && matches!(ext.get::<bool>(ext::HELLO_ACCEPTS_CHUNKS), Ok(Some(true)))
}

/// Reads the device's `Hello` and checks its version and token; also whether it reads
/// several chunks in one payload.
async fn greet(
    send: &mut SendStream,
    recv: &mut RecvStream,
    shared: &Shared,
) -> Result<(Hello, Scope, bool), Error> {
    let config = &shared.config;
    let limits = &config.limits;
    let refuse = |code: ErrorCode, text: String| Error::Refused { code, text };
    // Before the token is checked, a frame may be small: a hello, nothing more.
    let first = read_frame(
        recv,
        config.max_frame.min(codec::HELLO_MAX_FRAME),
        Some(limits.hello_timeout),
        limits.hello_timeout,
    )
    .await
    .and_then(|f| match f {
        Some(payload) => Ok(Some(codec::decode_with_extensions(&payload)?)),
        None => Ok(None),
    });
    let denial = match first {
        Ok(Some((Message::Hello(mut hello), ext))) => {
            match check_hello(&hello, config.protocol_version) {
                Err(e) => refuse(e.code(), e.to_string()),
                Ok(version) => match shared.authority.admit(&hello.token, &hello.device) {
                    Ok(claims) => {
                        // From here on, the version both speak.
                        hello.protocol_version = version;
                        let accepts = accepts_chunks(&ext, version);
                        return Ok((hello, Scope::new(claims), accepts));
                    }
                    Err(d) => refuse(d.code, d.text),
                },
            }
        }
        Ok(Some((other, _))) => refuse(
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
    match denial {
        Error::Refused { code, text } => Err(turn_away(send, config, code, text).await),
        other => Err(other),
    }
}

/// Tells a device at the door why it is turned away (within the write deadline), lets
/// the words reach it, and returns the refusal to close the connection with.
async fn turn_away(
    send: &mut SendStream,
    config: &RelayConfig,
    code: ErrorCode,
    text: String,
) -> Error {
    let _ = write_message(
        send,
        &error_msg(code, text.clone(), None),
        config.max_frame,
        config.limits.write_timeout,
    )
    .await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    Error::Refused { code, text }
}

async fn run(
    conn: quinn::Connection,
    shared: Shared,
    span: tracing::Span,
    wire: &mut Wire,
    pending: Seat,
) -> Result<(), Error> {
    let Shared {
        relay,
        config,
        authority,
        door,
    } = shared.clone();
    let limits = config.limits.clone();
    let (mut send, mut recv) = tokio::time::timeout(limits.hello_timeout, conn.accept_bi())
        .await
        .map_err(|_| Error::Refused {
            code: ErrorCode::TIMED_OUT,
            text: "no stream opened".into(),
        })?
        .map_err(|e| Error::Connection(e.to_string()))?;
    // Watch revocations before the token is admitted: one that lands in between is seen.
    let mut revocations = authority.watch();
    let watchdog_revocations = authority.watch();
    let (hello, scope, accepts_chunks) = greet(&mut send, &mut recv, &shared).await?;
    drop(pending);
    let token_id = scope.claims().id;
    let Some(_token_seat) = door.token(token_id) else {
        let text = format!(
            "too many connections with this token (at most {}); close the others or reconnect later",
            config.quotas.connections_per_token
        );
        relay.metrics.quota_refused("connections_per_token");
        return Err(turn_away(&mut send, &config, ErrorCode::RATE_LIMITED, text).await);
    };
    let expires = scope.claims().expires;
    let expires_in = Duration::from_secs(expires.saturating_sub(crate::auth::now_secs()));
    // Revocation and expiry are acted on even while this connection's loop waits on a
    // device that does not read: the watchdog closes the connection itself.
    let watchdog = tokio::spawn(watchdog(
        conn.clone(),
        authority.clone(),
        token_id,
        expires_in,
        watchdog_revocations,
    ));
    let _watchdog = AbortOnDrop(watchdog);
    let greeted = std::time::Instant::now();
    span.record("device", tracing::field::display(&hello.device));
    let (granted, synced_before, quarantined) =
        welcome(&relay, &config, &hello, &scope, &mut send).await?;
    wire.device = Some(hello.device.clone());
    // A revocation noticed while the welcome was on its way counts too.
    if authority.is_revoked(&token_id) {
        let text = format!("token {token_id} was revoked; ask your lead for a new one");
        return Err(turn_away(&mut send, &config, ErrorCode::TOKEN_REVOKED, text).await);
    }

    let (out, writer) = spawn_writer(send, &conn, &config);
    let (mut inbox, reader) = spawn_reader(recv, &config);

    let now = std::time::Instant::now();
    let mut peer = new_peer(&hello, scope, granted, synced_before, quarantined);
    peer.accepts_chunks = accepts_chunks;
    let session_limits = session_limits(&config);
    // Registered before the stable sequence is read: no commit falls between the two.
    let interest = relay.hub.interest(peer.subscription.clone());
    let mut stable = relay.hub.stable();
    let mut session = Session::new(
        peer,
        session_limits,
        relay.hub.epoch(),
        *stable.borrow_and_update(),
        now,
        now + expires_in,
    );
    let mut driver = Driver {
        relay: relay.clone(),
        config: config.clone(),
        conn: conn.clone(),
        out,
        rate: RateLimit(session.rate()),
        pushes: JoinSet::new(),
        uploads: JoinSet::new(),
        opened: None,
    };
    let result = drive(
        &mut session,
        &mut driver,
        Inputs {
            inbox: &mut inbox,
            stable: &mut stable,
            interest: &interest,
            revocations: &mut revocations,
        },
        &authority,
        token_id,
        wire,
        greeted,
    )
    .await;
    drop(driver.out);
    reader.abort();
    driver.uploads.abort_all();
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    result
}

/// What the session knows of a device it just welcomed.
fn new_peer(
    hello: &Hello,
    scope: Scope,
    granted: redline_proto::message::Subscription,
    synced_before: bool,
    quarantined: Option<i64>,
) -> Peer {
    Peer {
        quarantined,
        synced_before,
        ..Peer::new(hello.device.clone(), scope, granted)
    }
}

/// The limits a session enforces, from the relay's configuration.
fn session_limits(config: &RelayConfig) -> SessionLimits {
    let limits = &config.limits;
    SessionLimits {
        messages_per_second: limits.messages_per_second,
        message_burst: limits.message_burst,
        streams_per_second: limits.streams_per_second,
        stream_burst: config.max_streams_per_connection,
    }
}

/// What a relay says to a device it admitted.
struct Greeting {
    /// The `Welcome`, framed (with its extensions) for the device's protocol version.
    frame: Vec<u8>,
    /// The device's subscription, narrowed to its token.
    granted: redline_proto::message::Subscription,
    /// Whether the device had synced with this relay before.
    synced_before: bool,
    /// `Some(ms offline)` if the device is in quarantine.
    quarantined: Option<i64>,
}

/// Records the device's hello and makes its `Welcome`: what it receives (its
/// subscription narrowed to its token) and whether it is in quarantine.
fn greeting(
    relay: &RelayState,
    config: &RelayConfig,
    hello: &Hello,
    scope: &Scope,
) -> Result<Greeting, Error> {
    let granted = scope.grant(&hello.subscription);
    let synced_before = relay.devices.synced_before(&hello.device);
    let quarantined = relay
        .devices
        .quarantine_check(scope.claims(), config.quarantine_after);
    if let Some(offline) = quarantined {
        info!(
            offline_h = offline / 3_600_000,
            "device returns after its horizon: quarantined"
        );
    }
    relay.devices.hello(
        scope.claims(),
        hello.protocol_version,
        &hello.app_version,
        &granted,
    );
    info!(app_version = %hello.app_version, member = %scope.claims().member, role = %scope.claims().role, "device hello");
    let welcome = Message::Welcome(Welcome {
        protocol_version: hello.protocol_version,
        relay: config.name.clone(),
        epoch: relay.hub.epoch(),
        granted: granted.clone(),
        quarantined,
    });
    // Extensions go only to devices of version 2 or later (encode_frame_with drops them
    // for version 1, whose decoder refuses trailing bytes).
    let mut ext = codec::Extensions::new();
    ext.insert(ext::WELCOME_OLDEST_VERSION, &MIN_PROTOCOL_VERSION)?;
    ext.insert(ext::WELCOME_NEWEST_VERSION, &config.protocol_version)?;
    let frame = codec::encode_frame_with(&welcome, &ext, hello.protocol_version, config.max_frame)?;
    Ok(Greeting {
        frame,
        granted,
        synced_before,
        quarantined,
    })
}

/// Greets the device ([`greeting`]) on the control stream; returns what the session
/// needs: the granted subscription, whether it synced before, its quarantine.
async fn welcome(
    relay: &RelayState,
    config: &RelayConfig,
    hello: &Hello,
    scope: &Scope,
    send: &mut SendStream,
) -> Result<(redline_proto::message::Subscription, bool, Option<i64>), Error> {
    let g = greeting(relay, config, hello, scope)?;
    write_frame(send, &g.frame, config.limits.write_timeout).await?;
    Ok((g.granted, g.synced_before, g.quarantined))
}

/// The control stream's writer: one task owns its send side. A device that stops
/// reading is closed once a write has waited `write_timeout`, so nothing waits on it.
fn spawn_writer(
    mut send: SendStream,
    conn: &quinn::Connection,
    config: &RelayConfig,
) -> (mpsc::Sender<Message>, tokio::task::JoinHandle<()>) {
    let (out, mut outbox) = mpsc::channel::<Message>(256);
    let max_frame = config.max_frame;
    let write_timeout = config.limits.write_timeout;
    let writer_conn = conn.clone();
    let writer = tokio::spawn(async move {
        while let Some(m) = outbox.recv().await {
            match write_message(&mut send, &m, max_frame, write_timeout).await {
                Ok(()) => {}
                Err(Error::Refused { code, text }) => {
                    info!(%code, "closing connection: {text}");
                    writer_conn.close(u32::from(code.0).into(), code.name().as_bytes());
                    return;
                }
                Err(e) => {
                    debug!("control stream write failed: {e}");
                    return;
                }
            }
        }
        let _ = send.finish();
        // Let the last words (an error report) reach the device before any close.
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    });
    (out, writer)
}

/// The control stream's reader: frames into a channel, so the session's loop can also
/// wait on other things. A live device may be quiet between frames; a frame once begun
/// must arrive in time.
fn spawn_reader(
    mut recv: RecvStream,
    config: &RelayConfig,
) -> (
    mpsc::Receiver<Result<Message, Error>>,
    tokio::task::JoinHandle<()>,
) {
    let (inbox_tx, inbox) = mpsc::channel::<Result<Message, Error>>(64);
    let max_frame = config.max_frame;
    let stream_idle = config.limits.stream_idle_timeout;
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
    (inbox, reader)
}

/// What wakes a session besides its driver's own tasks.
struct Inputs<'a> {
    inbox: &'a mut mpsc::Receiver<Result<Message, Error>>,
    stable: &'a mut tokio::sync::watch::Receiver<u64>,
    /// Wakes the session when a commit in its subscription became stable.
    interest: &'a crate::hub::fanout::Interest,
    revocations: &'a mut tokio::sync::watch::Receiver<u64>,
}

/// Runs `session` until it ends: performs its actions, then waits for the next input
/// (a frame, a commit done, a commit in its subscription becoming stable, a timer, a
/// revocation, a stream or an upload ending) and feeds it in with `now`.
async fn drive(
    session: &mut Session,
    driver: &mut Driver,
    inputs: Inputs<'_>,
    authority: &Authority,
    token_id: redline_proto::token::TokenId,
    wire: &mut Wire,
    greeted: std::time::Instant,
) -> Result<(), Error> {
    let mut first_caught = true;
    'session: loop {
        while let Some(action) = session.poll_action() {
            if let Some(end) = driver.perform(session, action).await {
                break 'session end;
            }
        }
        if first_caught && session.peer().delivered.is_some() {
            first_caught = false;
            driver
                .relay
                .metrics
                .sync_latency
                .observe(greeted.elapsed().as_secs_f64());
        }
        wire.account(&driver.conn, &driver.relay);
        let timer = session.poll_timeout().map(tokio::time::Instant::from_std);
        let input = tokio::select! {
            item = inputs.inbox.recv() => match item {
                None => Input::StreamEnded,
                Some(Err(e)) => Input::StreamFailed(e),
                Some(Ok(m)) => Input::Message(m),
            },
            Some(done) = driver.pushes.join_next() => match done {
                Ok(input) => input,
                Err(e) => {
                    warn!("a commit task failed: {e}");
                    continue;
                }
            },
            _ = inputs.interest.changed() => {
                Input::StableMoved(*inputs.stable.borrow_and_update())
            }
            _ = tokio::time::sleep_until(timer.unwrap_or_else(tokio::time::Instant::now)), if timer.is_some() => {
                session.handle_timeout(std::time::Instant::now());
                continue;
            }
            changed = inputs.revocations.changed() => {
                if changed.is_ok() && authority.is_revoked(&token_id) {
                    Input::Revoked
                } else {
                    continue;
                }
            }
            accepted = driver.conn.accept_bi() => match accepted {
                Ok(stream) => {
                    driver.opened = Some(stream);
                    Input::StreamOpened
                }
                Err(e) => break Err(Error::Connection(e.to_string())),
            },
            Some(done) = driver.uploads.join_next() => match done {
                Ok(result) => {
                    if let Err(e) = &result {
                        debug!("upload ended: {e}");
                    }
                    Input::UploadEnded(result)
                }
                Err(_) => continue,
            },
        };
        let now = std::time::Instant::now();
        // Catch-ups read the newest stable sequence, whichever input woke the loop.
        let newest = *inputs.stable.borrow_and_update();
        session.handle(now, Input::StableMoved(newest));
        session.handle(now, input);
    }
}

/// Performs a [`Session`]'s actions over QUIC and the hub, and feeds their results back.
struct Driver {
    relay: Arc<RelayState>,
    config: Arc<RelayConfig>,
    conn: quinn::Connection,
    /// The control stream's writer.
    out: mpsc::Sender<Message>,
    /// The message budget, shared with upload streams.
    rate: RateLimit,
    /// Commits and holds in flight; each ends in an input.
    pushes: JoinSet<Input>,
    uploads: JoinSet<Result<(), Error>>,
    /// The stream the device opened last, until the session accepts it.
    opened: Option<(SendStream, RecvStream)>,
}

impl Driver {
    /// Performs `action`; `Some` ends the connection with that result.
    async fn perform(
        &mut self,
        session: &mut Session,
        action: Action,
    ) -> Option<Result<(), Error>> {
        let relay = self.relay.clone();
        match action {
            Action::Send(m) => {
                if self.out.send(m).await.is_err() {
                    return Some(Ok(()));
                }
            }
            Action::Admit(push) => {
                let who = session.peer().admission(&self.config);
                let verdict = admit(&relay, &who, &push.doc, &push.changes).await;
                session.handle(std::time::Instant::now(), Input::Admitted(push, verdict));
            }
            Action::Commit(push, author) => {
                let pushed = push.changes.iter().map(|c| c.hash()).collect();
                self.pushes.spawn(async move {
                    let arrived = std::time::Instant::now();
                    let result = relay
                        .hub
                        .push(&push.doc, &author, push.changes)
                        .await
                        .map(Outcome::Committed);
                    relay
                        .metrics
                        .commit_latency
                        .observe(arrived.elapsed().as_secs_f64());
                    Input::Committed {
                        doc: push.doc,
                        device_heads: push.device_heads,
                        pushed,
                        result,
                    }
                });
            }
            Action::Hold(push, starts) => {
                if starts {
                    let offline = relay.devices.mark_quarantined(&session.peer().device);
                    session.handle(std::time::Instant::now(), Input::QuarantineStarted(offline));
                }
                let entry = session
                    .peer()
                    .held_entry(&push.doc, push.changes.len(), now_ms());
                let quota = self.config.quotas.held_bytes_per_device;
                self.pushes.spawn(async move {
                    let result = hold(&relay, entry, push.bundle, quota).await;
                    Input::Committed {
                        doc: push.doc,
                        device_heads: push.device_heads,
                        pushed: Vec::new(),
                        result,
                    }
                });
            }
            Action::Query(q) => {
                let answer = match answer(&relay, q).await {
                    Ok(a) => a,
                    Err(e) => Answer::Failed(e),
                };
                session.handle(std::time::Instant::now(), Input::Answer(answer));
            }
            Action::Transfer {
                bytes,
                start,
                update,
            } => {
                let timeout = self.config.limits.write_timeout;
                match transfer(&self.conn, bytes, start, timeout).await {
                    Ok(()) => {
                        if self.out.send(Message::Update(update)).await.is_err() {
                            return Some(Ok(()));
                        }
                    }
                    Err(e) => session.handle(std::time::Instant::now(), Input::TransferFailed(e)),
                }
            }
            Action::Delivered(upto) => relay.devices.caught(&session.peer().device, upto),
            Action::Serve(request) => {
                for reply in serve_request(&relay, session.peer(), request).await {
                    if self.out.send(reply).await.is_err() {
                        return Some(Ok(()));
                    }
                }
            }
            Action::Resync(step) => {
                resync_step(&relay, session.peer_mut(), &self.config, step).await;
                while let Some(m) = session.peer_mut().resync.poll_transmit() {
                    if self.out.send(m).await.is_err() {
                        return Some(Ok(()));
                    }
                }
            }
            Action::AcceptUpload => {
                if let Some((s, r)) = self.opened.take() {
                    let up = UploadCtx {
                        relay,
                        config: self.config.clone(),
                        who: session.peer().admission(&self.config),
                        known: session.peer().known.clone(),
                        rate: self.rate.clone(),
                    };
                    self.uploads.spawn(upload(s, r, up).in_current_span());
                }
            }
            Action::Close(e) => return Some(Err(e)),
            Action::End => return Some(Ok(())),
        }
        None
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Answers a session's hub query.
async fn answer(relay: &RelayState, query: Query) -> Result<Answer, Error> {
    Ok(match query {
        Query::List => Answer::Listed(relay.hub.list().await?),
        Query::ChangedInScope {
            scope,
            after,
            upto,
            old,
        } => Answer::Changed(
            relay
                .hub
                .changed_in_scope(&scope, after, upto, old.as_deref())
                .await?,
        ),
        Query::Lacks {
            doc,
            have_at,
            known,
            window,
            chunks,
        } => {
            let mut have = match have_at {
                Some(seq) => relay.hub.heads_at(&doc, seq).await?,
                None => Vec::new(),
            };
            union_heads(&mut have, &known);
            let window = window.as_ref().map(|(after, upto, own)| Window {
                after: *after,
                upto: *upto,
                own,
                chunks,
            });
            Answer::Lacks(relay.hub.missing(&doc, &have, window).await?)
        }
    })
}

/// A lead's or operator's request, answered from the relay's records (the session
/// checked that the peer may ask).
async fn serve_request(relay: &Arc<RelayState>, peer: &Peer, request: Request) -> Vec<Message> {
    match request {
        Request::Devices(team) => vec![
            match relay.devices.team(&team, *relay.hub.stable().borrow()) {
                Ok(list) => Message::Devices(list),
                Err(e) => error_msg(ErrorCode::STORAGE_FAILURE, e.to_string(), None),
            },
        ],
        Request::Quarantine(team) => {
            vec![match crate::quarantine::list(relay, &peer.scope, &team) {
                Ok(list) => Message::Quarantine(list),
                Err(e) => error_msg(ErrorCode::STORAGE_FAILURE, e.to_string(), None),
            }]
        }
        // Refused held pushes first (per document), then what stays held.
        Request::Accept(team, device) => {
            match crate::quarantine::accept(relay, &peer.scope, &team, &device).await {
                Ok(review) => {
                    let mut out: Vec<Message> =
                        review.refused.into_iter().map(Message::Error).collect();
                    out.push(Message::Quarantine(review.remaining));
                    out
                }
                Err(e) => vec![error_msg(ErrorCode::STORAGE_FAILURE, e.to_string(), None)],
            }
        }
    }
}

/// Starts sending `bytes` from `start` on a new unidirectional stream (pieces written by
/// a task of their own; a device that stops reading gets the stream reset).
async fn transfer(
    conn: &quinn::Connection,
    bytes: Vec<u8>,
    start: u64,
    write_timeout: Duration,
) -> Result<(), Error> {
    let id = transfer_id(&bytes);
    // A device that allows no stream (or never reads one) must not hold the loop.
    let mut send = tokio::time::timeout(write_timeout, conn.open_uni())
        .await
        .map_err(|_| Error::Refused {
            code: ErrorCode::TIMED_OUT,
            text: "the device took no transfer stream".into(),
        })?
        .map_err(|e| Error::Connection(e.to_string()))?;
    let start = start as usize;
    tokio::spawn(async move {
        let mut offset = start;
        // At least one piece, even an empty one, so the device learns the id of a
        // transfer it already holds whole.
        let rest = &bytes[start..];
        let pieces: Vec<&[u8]> = if rest.is_empty() {
            vec![rest]
        } else {
            rest.chunks(TRANSFER_PIECE).collect()
        };
        for piece in pieces {
            let msg = Message::Piece(Piece {
                id,
                offset: offset as u64,
                data: piece.to_vec(),
            });
            if write_message(
                &mut send,
                &msg,
                redline_proto::codec::DEFAULT_MAX_FRAME,
                write_timeout,
            )
            .await
            .is_err()
            {
                // The device stopped reading: let go of the stream and its bytes.
                let _ = send.reset(u32::from(ErrorCode::TIMED_OUT.0).into());
                return;
            }
            offset += piece.len();
        }
        let _ = send.finish();
    });
    Ok(())
}

/// Closes `conn` when token `id` is revoked or expires, if the connection's own loop has
/// not done so (telling the device why) within a short grace: a loop waiting on a
/// device that does not read cannot keep a revoked token alive.
async fn watchdog(
    conn: quinn::Connection,
    authority: Arc<Authority>,
    id: redline_proto::token::TokenId,
    expires_in: Duration,
    mut revocations: tokio::sync::watch::Receiver<u64>,
) {
    const GRACE: Duration = Duration::from_millis(500);
    let revoked = async {
        loop {
            if authority.is_revoked(&id) {
                return;
            }
            if revocations.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    let code = tokio::select! {
        () = revoked => ErrorCode::TOKEN_REVOKED,
        () = tokio::time::sleep(expires_in) => ErrorCode::TOKEN_EXPIRED,
    };
    tokio::time::sleep(GRACE).await;
    info!(%code, "closing connection (watchdog)");
    conn.close(u32::from(code.0).into(), code.name().as_bytes());
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether `changes` carry an actor the relay has never bound, for a document it holds,
/// from a device that already wrote with another actor (its store was reset or
/// restored: one install keeps one actor for life).
async fn new_actor_on_existing(
    relay: &Arc<RelayState>,
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
    let storage = relay.hub.storage();
    // Bindings are only ever added: ask whether the device has any before asking about
    // the actors. The other order races with the device's own first push (in the same
    // flight, another document): its actor unbound at the first question, bound by
    // that push's commit at the second, and an honest phone held for review.
    if !matches!(storage.actors_of(device), Ok(n) if n > 0) {
        return false;
    }
    let unknown = actors
        .iter()
        .any(|a| matches!(storage.actor_owner(a.to_bytes()), Ok(None)));
    if !unknown {
        return false;
    }
    match relay.hub.slot(doc).await {
        Ok(slot) => {
            let exists = !slot.lock().await.doc.get_heads().is_empty();
            relay.hub.release(slot);
            exists
        }
        Err(_) => false,
    }
}

/// Holds a quarantined push: held (with the words for the device), or why not.
async fn hold(
    relay: &Arc<RelayState>,
    entry: redline_proto::message::QuarantineEntry,
    bundle: Vec<u8>,
    quota: u64,
) -> Result<Outcome, Error> {
    let offline_h = entry.offline_ms / 3_600_000;
    crate::quarantine::hold(relay, entry, bundle, quota).await?;
    Ok(Outcome::Held(format!(
        "this phone was offline for {offline_h} h: its changes are kept on the relay for a lead's review and merge once accepted"
    )))
}

/// Refuses creating `doc` when it would be a ledger day far from the relay's date, or
/// one document too many for the device today. Writing to existing documents is not
/// limited here.
async fn creation_refused(
    relay: &Arc<RelayState>,
    who: &Admission,
    doc: &DocId,
) -> Option<Verdict> {
    match relay.hub.exists(doc).await {
        Ok(true) => return None,
        Ok(false) => {}
        Err(e) => return Some(Verdict::Refuse(ErrorCode::STORAGE_FAILURE, e.to_string())),
    }
    let today = i64::try_from(crate::auth::now_secs() / 86_400).unwrap_or(i64::MAX);
    let q = &who.quotas;
    if let redline_proto::DocKind::Ledger(_, day) = doc.kind() {
        let d = day.days_since_epoch();
        if d < today - i64::from(q.ledger_days_back) || d > today + i64::from(q.ledger_days_ahead) {
            relay.metrics.quota_refused("ledger_days");
            return Some(Verdict::Refuse(
                ErrorCode::FORBIDDEN,
                format!(
                    "a ledger for {day} cannot be started here: new ledger days must lie within {} days before and {} after the relay's date",
                    q.ledger_days_back, q.ledger_days_ahead
                ),
            ));
        }
    }
    if !relay.hub.count_creation(
        &who.author.device,
        today,
        q.new_documents_per_device_per_day,
    ) {
        relay
            .metrics
            .quota_refused("new_documents_per_device_per_day");
        return Some(Verdict::Refuse(
            ErrorCode::QUOTA_EXCEEDED,
            format!(
                "this phone has started {} documents today, the most the relay allows",
                q.new_documents_per_device_per_day
            ),
        ));
    }
    None
}

/// The one admission rule for push, upload and sync: scope, size, quarantine.
async fn admit(
    relay: &Arc<RelayState>,
    who: &Admission,
    doc: &DocId,
    changes: &[automerge::Change],
) -> Verdict {
    if !who.scope.can_write(doc) {
        return Verdict::Refuse(
            ErrorCode::FORBIDDEN,
            "your token does not allow this document".into(),
        );
    }
    if changes.len() > who.max_changes {
        return Verdict::Refuse(
            ErrorCode::TOO_LARGE,
            format!(
                "{} changes in one message; the limit is {}",
                changes.len(),
                who.max_changes
            ),
        );
    }
    if let Some(refusal) = creation_refused(relay, who, doc).await {
        return refusal;
    }
    if who.quarantined.is_some() {
        return Verdict::Hold { starts: false };
    }
    if who.synced_before
        && who.scope.claims().role == redline_proto::token::Role::Volunteer
        && new_actor_on_existing(relay, &who.author.device, doc, changes).await
    {
        // A known phone writing as an actor never seen before into an existing
        // document: its store was reset or restored. Held for review from now on.
        warn!(%doc, "known device pushes with an unknown actor: quarantined");
        return Verdict::Hold { starts: true };
    }
    Verdict::Accept
}

/// One step of the Automerge-sync fallback.
///
/// The changes a step carries never reach Automerge's sync machinery: they go through
/// the same intake (guard, no documents) and the same admission and commit as a push.
/// Changes whose dependencies the relay lacks wait in this connection's session (never
/// in the document) and the relay's reply asks for the missing ones; only the rest of
/// the message (heads, needs, bloom filters) moves the sync state.
async fn resync_step(
    relay: &Arc<RelayState>,
    peer: &mut Peer,
    config: &RelayConfig,
    step: redline_proto::message::SyncStep,
) {
    let doc_id = step.doc.clone();
    let (message, carried) = match crate::intake::sync_step(&step) {
        Ok(taken) => taken,
        Err((code, text)) => return peer.resync.report(code, text, doc_id),
    };
    let mut need = Vec::new();
    let mut applied = 0;
    if !carried.is_empty() {
        let mut changes = peer.resync.take_parked(&doc_id);
        changes.extend(carried);
        match admit(relay, &peer.admission(config), &doc_id, &changes).await {
            Verdict::Refuse(code, text) => return peer.resync.report(code, text, doc_id),
            Verdict::Hold { starts } => {
                if starts {
                    peer.quarantined = Some(relay.devices.mark_quarantined(&peer.device));
                }
                // Only reviewed pushes merge: the device pushes these again, to be held.
                let text = "this phone is in quarantine: its changes go through a lead's review";
                return peer
                    .resync
                    .report(ErrorCode::QUARANTINED, text.into(), doc_id);
            }
            Verdict::Accept => {}
        }
        let missing = match relay.hub.missing_dependencies(&doc_id, &changes).await {
            Ok(m) => m,
            Err(e) => {
                return peer
                    .resync
                    .report(ErrorCode::STORAGE_FAILURE, e.to_string(), doc_id);
            }
        };
        if missing.is_empty() {
            match relay.hub.push(&doc_id, &peer.author, changes).await {
                Ok(c) => applied = c.applied,
                Err(e) => {
                    let (code, text) = refusal_code(e);
                    return peer.resync.report(code, text, doc_id);
                }
            }
        } else {
            peer.resync.park(&doc_id, changes);
            need = missing;
        }
    }
    // What is left of the message moves only the sync state: the document is read, and
    // a document that does not exist is not created by asking.
    let slot = match relay.hub.slot(&doc_id).await {
        Ok(s) => s,
        Err(e) => {
            return peer
                .resync
                .report(ErrorCode::STORAGE_FAILURE, e.to_string(), doc_id);
        }
    };
    {
        let mut state = slot.lock().await;
        let received = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            peer.resync.apply(&doc_id, &mut state.doc, message)
        }));
        match received {
            Ok(Ok(_)) => {
                // Automerge builds and encodes the reply: a panic in there must not take
                // the connection's task down with it.
                let applied = redline_proto::session::Applied {
                    new_changes: applied,
                };
                let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    peer.resync.respond_with(&doc_id, &state.doc, applied, need)
                }));
                if answered.is_err() {
                    peer.resync.report(
                        ErrorCode::INTERNAL,
                        "the relay could not answer this sync step".into(),
                        doc_id.clone(),
                    );
                }
            }
            Ok(Err(e)) => peer.resync.report(e.code(), e.to_string(), doc_id.clone()),
            Err(_) => peer.resync.report(
                ErrorCode::BAD_DOCUMENT_DATA,
                "Automerge could not read the sync message".into(),
                doc_id.clone(),
            ),
        }
    }
    relay.hub.release(slot);
}
