//! The relay without QUIC: the same [`Session`], admission rule, hub and storage as a
//! connection over the network, driven in process by a caller that brings its own clock.
//!
//! The deterministic simulation (`redline-tests`, `sim`) runs a relay and hundreds of
//! phones in one thread through this: every device message goes into [`Loopback::handle`],
//! every relay reaction comes back as [`Out`], and the caller decides when each is
//! delivered, lost with its connection, or cut off by a crash. What differs from the QUIC
//! driver is only plumbing: commits run one at a time (no group commit across devices),
//! transfers arrive whole with their `Update`, and upload streams are not offered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redline_proto::codec;
use redline_proto::message::{ErrorReport, Hello, Message, Update};
use redline_proto::session::check_hello;

use super::admission::{admit, hold, now_ms};
use super::hello::{Abilities, greeting, new_peer, session_limits};
use super::perform::{answer, serve_request};
use super::resync::resync_step;
use crate::Error;
use crate::access::Scope;
use crate::auth::Authority;
use crate::config::RelayConfig;
use crate::hub::Hub;
use crate::session::{Action, Answer, Input, Outcome, Session};
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
    /// seconds for its token): the link and
    /// the `Welcome` framed as the network would carry it (extensions only for version 2
    /// and later), or why it is turned away.
    pub fn connect(
        &self,
        mut hello: Hello,
        ext: &codec::Extensions,
        now: Instant,
        unix_now: u64,
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
        Abilities::of(ext, version).grant(&mut peer);
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
        Ok((Link { session, interest }, g.frame))
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
            self.perform_one(&mut link.session, now, action, &mut out)
                .await;
        }
        out
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
                let result = relay.hub.push(&push.doc, &author, push.changes).await;
                let committed = Input::Committed {
                    doc: push.doc,
                    device_heads: push.device_heads,
                    pushed,
                    result: result.map(Outcome::Committed),
                };
                session.handle(now, committed);
            }
            Action::Hold(push, starts) => {
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
            Action::AcceptUpload => {
                let e = Error::connection_lost("a loopback link carries no upload streams");
                out.push(Out::Closed(Err(e)));
            }
            Action::Close(e) => out.push(Out::Closed(Err(e))),
            Action::End => out.push(Out::Closed(Ok(()))),
        }
    }
}
