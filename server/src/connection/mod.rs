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
use redline_proto::message::Message;
use redline_proto::{DeviceId, ErrorCode};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Error;
use crate::auth::Authority;
use crate::config::RelayConfig;
use crate::door::Seat;
use crate::session::{Bucket, Input, Session};
use crate::state::RelayState;

mod admission;
mod frames;
mod hello;
pub mod loopback;
mod perform;
mod resync;
mod upload;

pub(crate) use frames::read_message;
use frames::write_frame;
use hello::{greet, new_peer, session_limits, turn_away, welcome};
use perform::Driver;

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
/// application code, after the device was told why on the control stream. `accepted`
/// counts the relay's connections up to this one, in the order their first packets
/// came.
pub(crate) async fn serve(
    incoming: quinn::Incoming,
    shared: Shared,
    seats: Vec<Seat>,
    accepted: u64,
) {
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
        let result = run(conn.clone(), shared, span2, &mut wire, pending, accepted).await;
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
        self.check_at(std::time::Instant::now())
    }

    /// [`check`](Self::check) at `now` (the loopback's clock).
    fn check_at(&self, now: std::time::Instant) -> Result<(), Error> {
        let allowed = self.0.lock().unwrap_or_else(|p| p.into_inner()).take(now);
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

async fn run(
    conn: quinn::Connection,
    shared: Shared,
    span: tracing::Span,
    wire: &mut Wire,
    pending: Seat,
    accepted: u64,
) -> Result<(), Error> {
    let Shared {
        relay,
        config,
        authority,
        door,
    } = shared.clone();
    let (mut send, mut recv) = first_stream(&conn, config.limits.hello_timeout).await?;
    // Watch revocations before the token is admitted: one that lands in between is seen.
    let mut revocations = authority.watch();
    let watchdog_revocations = authority.watch();
    let (hello, scope, abilities) = greet(&mut send, &mut recv, &shared).await?;
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
    let _watchdog = AbortOnDrop(tokio::spawn(watchdog(
        conn.clone(),
        authority.clone(),
        token_id,
        expires_in,
        watchdog_revocations,
    )));
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

    let mut peer = new_peer(&hello, scope, granted, synced_before, quarantined);
    abilities.grant(&mut peer, accepted);
    let (mut session, interest, mut stable) = new_session(&relay, &config, peer, expires_in);
    let mut driver = Driver::new(relay.clone(), config.clone(), conn.clone(), out, &session);
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

/// The device's first stream (its hello comes on it), within `timeout`.
async fn first_stream(
    conn: &quinn::Connection,
    timeout: Duration,
) -> Result<(quinn::SendStream, quinn::RecvStream), Error> {
    tokio::time::timeout(timeout, conn.accept_bi())
        .await
        .map_err(|_| Error::Refused {
            code: ErrorCode::TIMED_OUT,
            text: "no stream opened".into(),
        })?
        .map_err(Error::connection)
}

/// The session of a welcomed device, with its interest in commits and the stable
/// sequence it starts from.
fn new_session(
    relay: &RelayState,
    config: &RelayConfig,
    peer: crate::session::Peer,
    expires_in: Duration,
) -> (
    Session,
    crate::hub::fanout::Interest,
    tokio::sync::watch::Receiver<u64>,
) {
    let now = std::time::Instant::now();
    // Registered before the stable sequence is read: no commit falls between the two.
    let interest = relay.hub.interest(peer.subscription.clone());
    let mut stable = relay.hub.stable();
    let session = Session::new(
        peer,
        session_limits(config),
        relay.hub.epoch(),
        *stable.borrow_and_update(),
        now,
        now + expires_in,
    );
    (session, interest, stable)
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
            // Messages queued together (an update and its `Caught`, a catch-up of
            // several documents) go in one write: fewer packets, fewer wake-ups.
            let (frames, unencodable) = gather(m, &mut outbox, max_frame);
            let written = match frames.is_empty() {
                true => Ok(()),
                false => write_frame(&mut send, &frames, write_timeout).await,
            };
            match written.and(unencodable.map_or(Ok(()), Err)) {
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

/// A write gathers queued messages up to this many bytes.
const WRITE_BATCH: usize = 64 * 1024;

/// Encodes `first` and the messages already queued behind it (up to [`WRITE_BATCH`]
/// bytes) into one buffer; a message that cannot be encoded ends the batch, with its
/// error after what came before it.
fn gather(
    first: Message,
    outbox: &mut mpsc::Receiver<Message>,
    max_frame: usize,
) -> (Vec<u8>, Option<Error>) {
    let mut frames = Vec::new();
    let mut next = Some(first);
    while let Some(m) = next.take() {
        match redline_proto::codec::encode_frame(&m, max_frame) {
            Ok(f) => frames.extend_from_slice(&f),
            Err(e) => return (frames, Some(e.into())),
        }
        if frames.len() < WRITE_BATCH {
            next = outbox.try_recv().ok();
        }
    }
    (frames, None)
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
    loop {
        if let Some(end) = perform_all(session, driver, wire, greeted, &mut first_caught).await {
            break end;
        }
        // A timer that is already due (a live catch-up with no window left to wait) is
        // fired here: through the runtime's timer wheel it would wait for the next
        // millisecond tick, and a teammate's update with it.
        let now = std::time::Instant::now();
        if session.poll_timeout().is_some_and(|t| t <= now) {
            session.handle_timeout(now);
            if session.poll_timeout().is_none_or(|t| t > now) {
                continue;
            }
        }
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
                Err(e) => break Err(Error::connection(e)),
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

/// Performs the session's actions (`Some`: the connection ends with it), then counts
/// the wire's bytes and, the first time the device is caught up, the sync's latency.
async fn perform_all(
    session: &mut Session,
    driver: &mut Driver,
    wire: &mut Wire,
    greeted: std::time::Instant,
    first_caught: &mut bool,
) -> Option<Result<(), Error>> {
    while let Some(action) = session.poll_action() {
        if let Some(end) = driver.perform(session, action).await {
            return Some(end);
        }
    }
    if *first_caught && session.peer().delivered.is_some() {
        *first_caught = false;
        driver
            .relay
            .metrics
            .sync_latency
            .observe(greeted.elapsed().as_secs_f64());
    }
    wire.account(&driver.conn, &driver.relay);
    None
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

#[cfg(test)]
mod tests {
    use super::*;
    use redline_proto::codec::FrameDecoder;
    use redline_proto::message::Payload;

    fn update(len: usize) -> Message {
        Message::Update(redline_proto::message::Update {
            doc: redline_proto::DocId::parse("households/zone-1").unwrap(),
            payload: Payload::Bundle(vec![7; len]),
            heads: Vec::new(),
        })
    }

    fn decoded(frames: &[u8]) -> Vec<Message> {
        let mut d = FrameDecoder::new(1 << 20);
        d.push(frames);
        std::iter::from_fn(|| d.next_message().unwrap()).collect()
    }

    /// Messages queued together are written at once, in order, up to the batch size;
    /// one that cannot be encoded ends the batch after those before it.
    #[test]
    fn queued_messages_are_written_together() {
        let (tx, mut rx) = mpsc::channel(16);
        for len in [10, 20, 30] {
            tx.try_send(update(len)).unwrap();
        }
        let first = rx.try_recv().unwrap();
        let (frames, failed) = gather(first, &mut rx, 1 << 20);
        assert!(failed.is_none());
        assert_eq!(decoded(&frames), vec![update(10), update(20), update(30)]);
        assert!(rx.try_recv().is_err(), "all taken");

        // Past the batch size the rest waits for the next write.
        for _ in 0..3 {
            tx.try_send(update(WRITE_BATCH / 2)).unwrap();
        }
        let first = rx.try_recv().unwrap();
        let (frames, _) = gather(first, &mut rx, 1 << 20);
        assert_eq!(decoded(&frames).len(), 2);
        assert!(rx.try_recv().is_ok(), "one left for the next write");

        tx.try_send(update(100)).unwrap();
        let (frames, failed) = gather(update(5), &mut rx, 50);
        assert_eq!(decoded(&frames), vec![update(5)]);
        assert!(failed.is_some(), "the frame over the limit is refused");
    }
}
