//! The relay without QUIC: the same [`Session`], admission rule, hub and storage as a
//! connection over the network, driven in process by a caller that brings its own clock.
//!
//! The deterministic simulation (`redline-tests`, `sim`) runs a relay and hundreds of
//! phones in one thread through this: every device message goes into [`Loopback::handle`],
//! every relay reaction comes back as [`Out`], and the caller decides when each is
//! delivered, lost with its connection, or cut off by a crash. What differs from the QUIC
//! driver is only plumbing: commits run one at a time (no group commit across devices),
//! and transfers arrive whole with their `Update`. Upload streams are offered
//! ([`Loopback::open_upload`], [`Loopback::upload`]): the same `UploadStream` and the same
//! steps on the relay's state (staging, flush, take-over, commit) as over QUIC.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redline_proto::codec;
use redline_proto::message::{ErrorReport, Hello, Message, Update};

use redline_proto::session::check_hello;

use super::RateLimit;
use super::admission::{admit, hold, now_ms};
use super::hello::{Abilities, greeting, new_peer, session_limits};
use super::perform::{answer, serve_request};
use super::resync::resync_step;
use super::upload::{Performed, UploadCtx, UploadRun};
use crate::Error;
use crate::access::Scope;
use crate::auth::Authority;
use crate::config::RelayConfig;
use crate::hub::Hub;
use crate::session::{Action, Answer, Input, Outcome, PushWork, Session, UploadInput};
use crate::state::RelayState;
use crate::storage::RelayStorage;

/// A relay served in process (see the module docs).
pub struct Loopback {
    relay: Arc<RelayState>,
    config: Arc<RelayConfig>,
    authority: Arc<Authority>,
}

/// One device's connection to a [`Loopback`] relay.
pub struct Link {
    session: Session,
    /// Says when a commit in the device's subscription became stable.
    interest: crate::hub::fanout::Interest,
    /// An upload stream the session accepted, not yet handed to the caller.
    accepted: Option<UploadRun>,
}

/// One upload stream a device opened on a [`Link`].
pub struct UploadLink {
    run: UploadRun,
    /// The stream ended (answered, or cut).
    over: bool,
}

/// What the relay does on an upload stream, in order.
#[derive(Debug)]
pub enum UploadOut {
    /// A message on the stream.
    Message(Message),
    /// The last message: the stream is finished after it.
    Finished(Message),
    /// The relay cut the stream, for this reason.
    Failed(String),
}

/// What the relay does towards the device, in order.
#[derive(Debug)]
pub enum Out {
    /// A message on the control stream.
    Message(Message),
    /// A transfer's bytes from `start`, then its `Update` (a relay on the network sends
    /// the bytes on a stream of their own before the update).
    Transfer {
        /// The bytes from `start` on.
        bytes: Vec<u8>,
        /// Where the device's durable copy ended.
        start: u64,
        /// The announcement.
        update: Update,
    },
    /// The relay ended the connection (`Ok`: the device ended it).
    Closed(Result<(), Error>),
}

impl Loopback {
    /// A relay over `storage` (a hub is opened on it; call inside a tokio runtime, which
    /// runs the hub's flusher), admitting the tokens `authority` signed.
    pub fn new(
        storage: Arc<dyn RelayStorage>,
        config: RelayConfig,
        authority: Authority,
    ) -> Result<Self, Error> {
        let hub = Hub::new(storage, config.cache_budget_bytes)?;
        hub.set_max_document_bytes(config.max_document_bytes);
        Ok(Self {
            relay: RelayState::new(hub)?,
            config: Arc::new(config),
            authority: Arc::new(authority),
        })
    }

    /// The relay's state (its hub, devices and metrics).
    pub fn state(&self) -> &Arc<RelayState> {
        &self.relay
    }

    /// The hub's stable feed sequence now.
    pub fn stable(&self) -> u64 {
        *self.relay.hub.stable().borrow()
    }

    /// A device says hello (with the hello frame's extensions) at `now` (`unix_now` in
    /// seconds for its token) on the relay's `accepted`th connection (counted in the
    /// order the connections were opened, as the QUIC relay counts their first packets):
    /// the link and the `Welcome` framed as the network would carry it (extensions only
    /// for version 2 and later), or why it is turned away.
    pub fn connect(
        &self,
        mut hello: Hello,
        ext: &codec::Extensions,
        now: Instant,
        unix_now: u64,
        accepted: u64,
    ) -> Result<(Link, Vec<u8>), ErrorReport> {
        let refusal = |code, text: String| ErrorReport {
            code,
            text,
            doc: None,
        };
        let version = check_hello(&hello, self.config.protocol_version)
            .map_err(|e| refusal(e.code(), e.to_string()))?;
        hello.protocol_version = version;
        let claims = self
            .authority
            .admit_at(&hello.token, &hello.device, unix_now)
            .map_err(|d| refusal(d.code, d.text))?;
        let expires_in = Duration::from_secs(claims.expires.saturating_sub(unix_now));
        let scope = Scope::new(claims);
        let g = greeting(&self.relay, &self.config, &hello, &scope)
            .map_err(|e| refusal(redline_proto::ErrorCode::INTERNAL, e.to_string()))?;
        let mut peer = new_peer(&hello, scope, g.granted, g.synced_before, g.quarantined);
        Abilities::of(ext, version).grant(&mut peer, accepted);
        // Registered before the stable sequence is read, as the QUIC driver does.
        let interest = self.relay.hub.interest(peer.subscription.clone());
        let session = Session::new(
            peer,
            session_limits(&self.config),
            self.relay.hub.epoch(),
            self.stable(),
            now,
            now + expires_in,
        );
        let link = Link {
            session,
            interest,
            accepted: None,
        };
        Ok((link, g.frame))
    }

    /// Something happened on `link` at `now` (a message from the device, the device
    /// ending the stream, a revocation): what the relay does about it.
    pub async fn handle(&self, link: &mut Link, now: Instant, input: Input) -> Vec<Out> {
        link.session.handle(now, Input::StableMoved(self.stable()));
        link.session.handle(now, input);
        self.perform(link, now).await
    }

    /// Time passed and the feed may have moved: live catch-ups (when a commit in the
    /// device's subscription became stable, as over QUIC), token expiry.
    pub async fn tick(&self, link: &mut Link, now: Instant) -> Vec<Out> {
        if link.interest.take() {
            link.session.handle(now, Input::StableMoved(self.stable()));
        }
        if link.session.poll_timeout().is_some_and(|t| t <= now) {
            link.session.handle_timeout(now);
        }
        self.perform(link, now).await
    }

    /// When `link` wants [`tick`](Self::tick) next (`None`: it ended).
    pub fn poll_timeout(&self, link: &Link) -> Option<Instant> {
        link.session.poll_timeout()
    }

    /// Whether `link` ended.
    pub fn is_closed(&self, link: &Link) -> bool {
        link.session.is_closed()
    }

    /// Performs the session's actions until it wants nothing more.
    async fn perform(&self, link: &mut Link, now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        while let Some(action) = link.session.poll_action() {
            if let Action::AcceptUpload = action {
                link.accepted = Some(self.upload_run(&link.session));
                continue;
            }
            self.perform_one(&mut link.session, now, action, &mut out)
                .await;
        }
        out
    }

    /// Holds a push for review (starting the device's quarantine when `starts`).
    async fn hold(&self, session: &mut Session, now: Instant, push: PushWork, starts: bool) {
        let relay = &self.relay;
        if starts {
            let offline = relay.devices.mark_quarantined(&session.peer().device);
            session.handle(now, Input::QuarantineStarted(offline));
        }
        let entry = session
            .peer()
            .held_entry(&push.doc, push.changes.len(), now_ms());
        let quota = self.config.quotas.held_bytes_per_device;
        let result = hold(relay, entry, push.bundle, quota).await;
        let held = Input::Committed {
            doc: push.doc,
            device_heads: push.device_heads,
            pushed: Vec::new(),
            result,
        };
        session.handle(now, held);
    }

    /// An upload stream of `session`'s device, as the QUIC driver builds it.
    fn upload_run(&self, session: &Session) -> UploadRun {
        UploadRun::new(UploadCtx {
            relay: self.relay.clone(),
            config: self.config.clone(),
            who: session.peer().admission(&self.config),
            known: session.peer().known.clone(),
            rate: RateLimit(session.rate()),
            arrival: session.peer().arrival,
        })
    }

    /// The device opens an upload stream on `link` at `now`: the stream if the session
    /// accepts it (`None`: refused, the control stream's messages say why), and the
    /// relay's messages on the control stream.
    pub async fn open_upload(
        &self,
        link: &mut Link,
        now: Instant,
    ) -> (Option<UploadLink>, Vec<Out>) {
        link.session.handle(now, Input::StreamOpened);
        let outs = self.perform(link, now).await;
        let Some(run) = link.accepted.take() else {
            return (None, outs);
        };
        let mut up = UploadLink { run, over: false };
        // Up to the stream's first read: nothing is written before the device's `Upload`.
        let (early, ended) = Self::run_upload(&mut up).await;
        debug_assert!(
            early.is_empty() && ended.is_none(),
            "an upload stream spoke first"
        );
        (Some(up), outs)
    }

    /// The device's next message on the upload stream `up` of `link` at `now` (`None`:
    /// the device finished its side): what the relay writes on the stream, and, when the
    /// stream ended with it, the relay's messages on the control stream.
    pub async fn upload(
        &self,
        link: &mut Link,
        up: &mut UploadLink,
        now: Instant,
        msg: Option<Message>,
    ) -> (Vec<UploadOut>, Vec<Out>) {
        if up.over {
            return (Vec::new(), Vec::new());
        }
        let input = match msg {
            Some(m) => match up.run.ctx.rate.check_at(now) {
                Ok(()) => UploadInput::Message(m),
                Err(e) => {
                    up.over = true;
                    let outs = vec![UploadOut::Failed(e.to_string())];
                    return (outs, self.upload_ended(link, now, Err(e)).await);
                }
            },
            None => UploadInput::Ended(None),
        };
        up.run.machine.handle(input);
        let (outs, ended) = Self::run_upload(up).await;
        let control = match ended {
            Some(result) => self.upload_ended(link, now, result).await,
            None => Vec::new(),
        };
        (outs, control)
    }

    /// Performs the upload's actions until it reads again or ends (`Some`: how).
    async fn run_upload(up: &mut UploadLink) -> (Vec<UploadOut>, Option<Result<(), Error>>) {
        let mut outs = Vec::new();
        loop {
            let Some(action) = up.run.machine.poll_action() else {
                let e = Error::Storage("upload stream stopped without an answer".into());
                outs.push(UploadOut::Failed(e.to_string()));
                up.over = true;
                return (outs, Some(Err(e)));
            };
            match up.run.perform(action).await {
                Ok(Performed::Input(input)) => up.run.machine.handle(input),
                Ok(Performed::Nothing) => {}
                Ok(Performed::Read) => return (outs, None),
                Ok(Performed::Send(m)) => outs.push(UploadOut::Message(m)),
                Ok(Performed::Answer(m)) => {
                    outs.push(UploadOut::Finished(m));
                    up.over = true;
                    return (outs, Some(Ok(())));
                }
                Ok(Performed::Fail(e)) | Err(e) => {
                    outs.push(UploadOut::Failed(e.to_string()));
                    up.over = true;
                    return (outs, Some(Err(e)));
                }
            }
        }
    }

    /// An upload stream of `link` ended: the session hears it.
    async fn upload_ended(
        &self,
        link: &mut Link,
        now: Instant,
        result: Result<(), Error>,
    ) -> Vec<Out> {
        link.session.handle(now, Input::UploadEnded(result));
        self.perform(link, now).await
    }

    async fn perform_one(
        &self,
        session: &mut Session,
        now: Instant,
        action: Action,
        out: &mut Vec<Out>,
    ) {
        let relay = &self.relay;
        match action {
            Action::Send(m) => out.push(Out::Message(m)),
            Action::Admit(push) => {
                let who = session.peer().admission(&self.config);
                let verdict = admit(relay, &who, &push.doc, &push.changes).await;
                session.handle(now, Input::Admitted(push, verdict));
            }
            Action::Commit(push, author) => {
                let pushed = push.changes.iter().map(|c| c.hash()).collect();
                let result = relay
                    .hub
                    .push_as_sent(&push.doc, &author, push.changes, push.bundle)
                    .await;
                let committed = Input::Committed {
                    doc: push.doc,
                    device_heads: push.device_heads,
                    pushed,
                    result: result.map(Outcome::Committed),
                };
                session.handle(now, committed);
            }
            Action::Hold(push, starts) => self.hold(session, now, push, starts).await,
            Action::Query(q) => {
                let a = answer(relay, q).await.unwrap_or_else(Answer::Failed);
                session.handle(now, Input::Answer(a));
            }
            Action::Transfer {
                bytes,
                start,
                update,
            } => {
                let from = usize::try_from(start)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                out.push(Out::Transfer {
                    bytes: bytes[from..].to_vec(),
                    start,
                    update,
                });
            }
            Action::Delivered(upto) => relay.devices.caught(&session.peer().device, upto),
            Action::Serve(request) => {
                let replies = serve_request(relay, session.peer(), request).await;
                out.extend(replies.into_iter().map(Out::Message));
            }
            Action::Resync(step) => {
                resync_step(relay, session.peer_mut(), &self.config, step).await;
                while let Some(m) = session.peer_mut().resync.poll_transmit() {
                    out.push(Out::Message(m));
                }
            }
            // Taken by `perform` before it comes here.
            Action::AcceptUpload => {}
            Action::Close(e) => out.push(Out::Closed(Err(e))),
            Action::End => out.push(Out::Closed(Ok(()))),
        }
    }
}
