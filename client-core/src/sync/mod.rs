//! The sync driver: plumbing between one QUIC connection to the relay and the
//! [`DeviceSession`] state machine, which makes every decision of the first flight and
//! of live mode (see its docs for the protocol).
//!
//! The driver connects, spawns the tasks that read the control stream and the relay's
//! transfers (reads are not cancel-safe inside `select!`), and loops: perform the
//! session's actions (write a frame, run an upload on its own stream, report the first
//! flight), then wait for the next input (a message, a transfer, an upload's end, a local
//! write, the welcome's deadline, the stop signal) and feed it in. [`wire`] holds the
//! streams; [`phone_docs`] is the client behind the session's [`Documents`] door.
//!
//! Cancel-safe: dropping the future drops the connection; everything acknowledged or
//! applied so far is on disk, and the next sync picks up from there.
//!
//! [`Documents`]: crate::device_session::Documents

mod phone_docs;
mod relays;
mod wire;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redline_proto::MIN_PROTOCOL_VERSION;
use redline_proto::codec;
use redline_proto::message::{Cursor, Hello, Message, Subscription, UploadOffset};
use tokio::sync::{mpsc, watch};
use tracing::debug;

use crate::client::Client;
use crate::device_session::{self, Action, DeviceSession, Start, SyncReport, UploadEnd};
use crate::{Error, INLINE_MAX, RelayEndpoint, transport};

use crate::progress::Traffic;
pub(crate) use phone_docs::PhoneDocs;
pub use relays::LiveSync;
use wire::{Counters, FrameReader};

/// How long a handshake may take before a device with other relays of the deployment
/// turns to the next one.
/// Generous: under a reconnect storm on a busy relay a handshake can take seconds, and
/// moving every waiting phone elsewhere only spreads the storm.
pub const FAILOVER_WAIT: Duration = Duration::from_secs(10);
/// Connections one sync tries when the relay leaves the hello unanswered.
pub const HELLO_ATTEMPTS: u32 = 3;

/// What a live session needs: a stop signal, and where to report its first flight.
#[derive(Clone)]
pub(crate) struct LiveHooks {
    pub stop: watch::Receiver<bool>,
    pub first_flight: mpsc::UnboundedSender<Result<SyncReport, Error>>,
}

type Inbox = mpsc::Receiver<Result<(Message, codec::Extensions), Error>>;
/// A relay-to-device transfer that arrived whole: its id and bytes.
type Arrived = Result<([u8; 16], Vec<u8>), Error>;

/// One connection's streams, the tasks reading them, and the session's counters.
struct Link {
    conn: quinn::Connection,
    send: quinn::SendStream,
    inbox: Inbox,
    transfers: mpsc::Receiver<Arrived>,
    uploads: mpsc::Sender<Result<UploadEnd, Error>>,
    upload_ends: mpsc::Receiver<Result<UploadEnd, Error>>,
    /// Every task the session spawned (aborted when dropped).
    tasks: tokio::task::JoinSet<()>,
    counters: Counters,
    max_frame: usize,
    started: Instant,
}

impl Link {
    /// Does what the session asks, up to its next wait; whether the session is done.
    async fn perform(
        &mut self,
        session: &mut DeviceSession,
        first_flight: Option<&mpsc::UnboundedSender<Result<SyncReport, Error>>>,
    ) -> Result<bool, Error> {
        while let Some(action) = session.poll_action() {
            match action {
                Action::Send(frame) => {
                    wire::write_frame(&mut self.send, &frame, &self.counters).await?
                }
                Action::Upload(sender) => {
                    let (conn, tx, counters) = (
                        self.conn.clone(),
                        self.uploads.clone(),
                        self.counters.clone(),
                    );
                    let max_frame = self.max_frame;
                    self.tasks.spawn(async move {
                        let _ = tx
                            .send(wire::upload(conn, sender, counters, max_frame).await)
                            .await;
                    });
                }
                Action::FirstFlight => {
                    if let Some(tx) = first_flight {
                        let _ = tx.send(Ok(self.report(session)));
                    }
                }
                Action::Done => return Ok(true),
            }
        }
        Ok(false)
    }

    fn report(&self, session: &DeviceSession) -> SyncReport {
        let mut report = session.report();
        let t = &self.counters.session;
        report.bytes_sent = t.bytes_sent.load(Ordering::Relaxed);
        report.bytes_received = t.bytes_received.load(Ordering::Relaxed);
        report.frames_sent = t.frames_sent.load(Ordering::Relaxed);
        report.frames_received = t.frames_received.load(Ordering::Relaxed);
        report.duration = self.started.elapsed();
        report
    }
}

/// Most messages taken from the inbox in one step (see [`DeviceSession::handle_messages`]).
const MESSAGES_AT_ONCE: usize = 64;

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
            if let Err(e) = &result
                && device_session::refused_version(e)
                && self.inner.speak.load(Ordering::Relaxed) > MIN_PROTOCOL_VERSION
            {
                debug!("the relay refused protocol version: {e}; trying the oldest");
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
        let mut link = self.link(endpoint, relay, unanswered).await?;
        let (mut stop, first_flight) = match live {
            Some(h) => (Some(h.stop), Some(h.first_flight)),
            None => (None, None),
        };
        let start = self.start(relay, stop.is_some(), link.conn.rtt())?;
        let mut session = DeviceSession::start(start, &mut PhoneDocs(self))?;
        self.inner.progress.send_replace(Default::default());
        let outcome = self
            .drive(&mut session, &mut link, &mut stop, first_flight.as_ref())
            .await;
        *unanswered = session.unanswered();
        if let Err(e) = &outcome {
            let (welcomed, caught, in_flight) = session.standing();
            // Where the session stood, and what the transport saw, for diagnosing stalls.
            debug!(
                conn = link.conn.stable_id(),
                local = ?endpoint.local_addr().ok(),
                error = %e,
                welcomed,
                caught,
                in_flight,
                elapsed_ms = link.started.elapsed().as_millis() as u64,
                stats = ?link.conn.stats(),
                "sync session failed"
            );
        }
        let _ = link.send.finish();
        link.conn.close(0u8.into(), b"done");
        link.tasks.shutdown().await;
        self.publish(&mut session, &link);
        let _ = self.account_metered(&link.counters.session);
        // What was applied is kept even if the session failed.
        let _ = session.finish(outcome.is_ok(), &mut PhoneDocs(self));
        outcome?;
        Ok(link.report(&session))
    }

    /// Feeds the session until it is done, stopped or failed.
    async fn drive(
        &self,
        session: &mut DeviceSession,
        link: &mut Link,
        stop: &mut Option<watch::Receiver<bool>>,
        first_flight: Option<&mpsc::UnboundedSender<Result<SyncReport, Error>>>,
    ) -> Result<(), Error> {
        loop {
            self.publish(session, link);
            if link.perform(session, first_flight).await? {
                return Ok(());
            }
            self.publish(session, link);
            let deadline = session.poll_timeout();
            let live = session.is_live();
            let docs = &mut PhoneDocs(self);
            tokio::select! {
                _ = sleep_until(deadline), if deadline.is_some() => {
                    session.handle_timeout(Instant::now())?;
                }
                item = link.inbox.recv() => {
                    let item = item.unwrap_or_else(|| Err(Error::transport("control stream ended")));
                    // What else has arrived meanwhile is handled with it (one apply per
                    // document, one store); a failure after those messages comes after them.
                    let mut batch = Vec::new();
                    let mut lost = None;
                    let mut next = Some(item);
                    while let Some(item) = next.take() {
                        match item {
                            Ok(m) => batch.push(m),
                            Err(e) => {
                                lost = Some(e);
                                break;
                            }
                        }
                        if batch.len() < MESSAGES_AT_ONCE {
                            next = link.inbox.try_recv().ok();
                        }
                    }
                    if !batch.is_empty() {
                        session.handle_messages(batch, docs)?;
                    }
                    if let Some(e) = lost {
                        return Err(session.handle_lost(e));
                    }
                }
                Some(done) = link.transfers.recv() => {
                    let (id, bytes) = done?;
                    session.handle_transfer(id, bytes, docs)?;
                }
                Some(end) = link.upload_ends.recv() => session.handle_upload_end(end?, docs)?,
                _ = self.inner.local_change.notified(), if live => session.handle_local_change(docs)?,
                stopped = stopped(stop), if live => {
                    if stopped {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Connects and opens the control stream, with the tasks that read it and the
    /// relay's transfers.
    async fn link(
        &self,
        endpoint: &quinn::Endpoint,
        relay: &RelayEndpoint,
        unanswered: &mut bool,
    ) -> Result<Link, Error> {
        let started = Instant::now();
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
        let counters = Counters {
            session: Arc::new(Traffic::default()),
            totals: self.inner.traffic.clone(),
        };
        let max_frame = self.inner.config.max_frame;
        let mut tasks = tokio::task::JoinSet::new();
        let (in_tx, inbox) = mpsc::channel(64);
        tasks.spawn(wire::read_control(
            FrameReader::new(recv, max_frame, counters.clone()),
            in_tx,
        ));
        let (xfer_tx, transfers) = mpsc::channel(8);
        {
            let (conn, counters) = (conn.clone(), counters.clone());
            let client = Arc::downgrade(&self.inner);
            tasks.spawn(async move {
                let mut receivers = tokio::task::JoinSet::new();
                while let Ok(recv) = conn.accept_uni().await {
                    let (tx, counters, client) =
                        (xfer_tx.clone(), counters.clone(), client.clone());
                    receivers.spawn(async move {
                        let _ = tx
                            .send(wire::receive_transfer(client, recv, counters).await)
                            .await;
                    });
                }
            });
        }
        let (uploads, upload_ends) = mpsc::channel(8);
        Ok(Link {
            conn,
            send,
            inbox,
            transfers,
            uploads,
            upload_ends,
            tasks,
            counters,
            max_frame,
            started,
        })
    }

    /// How the next session begins: hello, stored cursor, staged downloads, budget.
    fn start(&self, relay: &RelayEndpoint, live: bool, rtt: Duration) -> Result<Start, Error> {
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
            subscription: self.subscription()?,
            token: self.inner.config.token.clone().unwrap_or_default(),
        };
        let resume = self
            .inner
            .store
            .partial_transfers()?
            .into_iter()
            .map(|(id, have)| UploadOffset { id, have })
            .collect();
        Ok(Start {
            hello,
            cursor,
            cursor_key,
            resume,
            defer_large: self.download_held_back()?,
            live,
            attempt: self.inner.next_attempt(),
            now: Instant::now(),
            rtt,
        })
    }

    /// Publishes the session's progress.
    fn publish(&self, session: &mut DeviceSession, link: &Link) {
        let p = session.progress();
        let t = &link.counters.session;
        p.bytes_sent = t.bytes_sent.load(Ordering::Relaxed);
        p.bytes_received = t.bytes_received.load(Ordering::Relaxed);
        p.elapsed = link.started.elapsed();
        p.estimate();
        self.inner.progress.send_replace(p.clone());
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

/// Sleeps until `deadline` (forever without one).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Waits for the stop signal to change; whether it now says stop (a dropped sender
/// does too). Without a signal, waits forever.
async fn stopped(stop: &mut Option<watch::Receiver<bool>>) -> bool {
    match stop.as_mut() {
        Some(s) => s.changed().await.is_err() || *s.borrow(),
        None => std::future::pending().await,
    }
}
