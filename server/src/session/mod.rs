//! The relay's side of one device connection, without IO.
//!
//! A [`Session`] is fed what happens, each with `now`: messages on the control stream,
//! admission verdicts, commits done, the stable feed sequence moving, answers to hub
//! queries, revocation, streams the device opens, uploads ending, timers. It is polled
//! for what to do ([`Action`]): send a message, admit or commit a push, hold it for
//! review, ask the hub something, start a transfer, serve a lead's request, close. It
//! reads no clock, touches no socket or disk and spawns nothing: the QUIC driver in
//! `connection` performs the actions and feeds their results back, and a test (or the
//! simulation) can drive it with a virtual clock.
//!
//! What it decides: the order of things (a `Pull` is answered only once every push
//! before it is committed; at most one live catch-up per [`LIVE_COALESCE`], the first
//! after a quiet window at once), the message and stream rate limits, token expiry and revocation,
//! and the catch-up itself (a cursor from another epoch or ahead of the relay means
//! resync; otherwise the documents changed in the window, each sent inline, announced
//! for later, or as a transfer, and the known heads that make the next window small).
//!
//! The admission rule ([`Admitting`]) and the steps of an upload stream
//! ([`UploadStream`]) are without IO here too; the driver answers their questions. The
//! Automerge-sync fallback's steps ([`Action::Resync`]) are `redline-proto`'s
//! `RelayResync`, fed by the driver.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::ChangeHash;
use redline_proto::message::{Coverage, Cursor, Message, Pull, SyncStep, Update};
use redline_proto::session::hashes_from_wire;
use redline_proto::{DeviceId, DocId, ErrorCode, TeamId};

use crate::Error;
use crate::authorship::Author;
use crate::hub::bundle_changes;

mod admission;
mod bucket;
mod catch_up;
mod peer;
mod upload;

pub use admission::{Admitting, Question, Step};
pub use bucket::Bucket;
pub(crate) use peer::error_msg;
pub use peer::{
    Admission, IN_FLIGHT, KNOWN_HEADS, Known, Outcome, Peer, PushWork, Verdict, forbidden,
    held_entry, refusal, refusal_code, reply,
};
pub use upload::{Staged, UploadAction, UploadInput, UploadLimits, UploadStream};

/// Live fan-out catches a device up at most once per this window: the first move of
/// the stable sequence after a quiet window at once, the moves that follow it within
/// the window together at its end. 4 ms: since only the sessions a commit concerns are
/// woken, the window matters in storms only (8 ms measured the same relay CPU against
/// the Automerge floor on the default field day, and a teammate waited up to 8 ms).
pub const LIVE_COALESCE: Duration = Duration::from_millis(4);

/// A device whose last catch-up carried at least this many bytes is catching up (a
/// storm: its teammates' day arriving as they push), not following a write or two; see
/// [`CATCHING_UP_COALESCE`].
pub const CATCHING_UP_BYTES: u64 = 4 * 1024;

/// A device catching up gets its live catch-ups at most once per this window. A phone
/// applies a day's changes in a few large pieces far faster than in many small ones
/// (Criterion `catch_up`: 4,500 changes in one bundle 138 ms, in pieces of 300 249 ms,
/// of 50 434 ms), and larger pieces compress better. On the default field day, in
/// alternating runs, a 50 ms window took the storm's convergence, relay CPU and
/// phones' CPU to 0.83x, 0.87x and 0.86x over five seeds, and 150 ms converged faster
/// than 50 ms on four seeds of four (ARCHITECTURE.md). A catch-up that carried little
/// (one write after a quiet spell, or the end of a storm) brings the short window back.
pub const CATCHING_UP_COALESCE: Duration = Duration::from_millis(150);

/// A request of a lead or operator, answered by the driver from the relay's records.
pub enum Request {
    /// The health of a team's devices.
    Devices(TeamId),
    /// What is held in quarantine for a team.
    Quarantine(TeamId),
    /// Merge a device's held pushes for a team.
    Accept(TeamId, DeviceId),
}

/// Something for the hub to look up.
pub enum Query {
    /// Every stored document.
    List,
    /// Documents in the subscription changed after `after` up to `upto`, and those the
    /// old subscription did not cover.
    ChangedInScope {
        /// The subscription now.
        scope: Box<Coverage>,
        /// Feed sequence the device holds everything up to.
        after: u64,
        /// Stable sequence to catch up to.
        upto: u64,
        /// The subscription the cursor was earned under.
        old: Option<Box<Coverage>>,
    },
    /// What the device lacks of `doc`: it holds the heads as of `have_at` (if the
    /// document was covered then) and `known`; with a `window`, what was committed in
    /// it, less the device's own changes.
    Lacks {
        /// The document.
        doc: DocId,
        /// The feed sequence whose heads the device holds.
        have_at: Option<u64>,
        /// Heads the device is known to hold.
        known: Vec<ChangeHash>,
        /// `(after, upto, own changes)`: the commit-log window.
        window: Option<(u64, u64, HashSet<ChangeHash>)>,
        /// The device reads stored chunks one after another in one payload.
        chunks: bool,
    },
}

/// The hub's answer to a [`Query`].
pub enum Answer {
    /// Every stored document.
    Listed(Vec<DocId>),
    /// The documents to look at, in order.
    Changed(Vec<DocId>),
    /// What the device lacks of a document: updates to send in order (none: nothing),
    /// each with the heads the device holds after it.
    Lacks(crate::hub::Found),
    /// The lookup failed: the connection ends with this error.
    Failed(Error),
}

/// What happens to the session.
pub enum Input {
    /// A message arrived on the control stream.
    Message(Message),
    /// The control stream failed (bad frame, silence, the connection lost).
    StreamFailed(Error),
    /// The device finished the control stream.
    StreamEnded,
    /// The admission rule's verdict on a push.
    Admitted(PushWork, Verdict),
    /// The device's quarantine started (`mark_quarantined`): offline for this long (ms).
    QuarantineStarted(i64),
    /// A commit (or hold) of a push ended.
    Committed {
        /// The document.
        doc: DocId,
        /// The heads the device holds if it was committed.
        device_heads: Vec<ChangeHash>,
        /// The hashes of the changes pushed.
        pushed: Vec<ChangeHash>,
        /// Committed or held, or why not.
        result: Result<Outcome, Error>,
    },
    /// The stable feed sequence is now this.
    StableMoved(u64),
    /// The answer to the last [`Action::Query`].
    Answer(Answer),
    /// The token was revoked.
    Revoked,
    /// The device opened a stream (an upload).
    StreamOpened,
    /// An upload stream ended.
    UploadEnded(Result<(), Error>),
    /// A transfer could not be started: the connection ends.
    TransferFailed(Error),
}

/// What the session wants done.
pub enum Action {
    /// Send a message on the control stream.
    Send(Message),
    /// Run the admission rule on a push; answer [`Input::Admitted`].
    Admit(PushWork),
    /// Commit a push through the hub; answer [`Input::Committed`].
    Commit(PushWork, Author),
    /// Hold a push for review (first mark the device quarantined if `starts`, and
    /// answer [`Input::QuarantineStarted`]); answer [`Input::Committed`].
    Hold(PushWork, bool),
    /// Look something up in the hub; answer [`Input::Answer`] before anything else.
    Query(Query),
    /// Send `bytes` as a transfer on a new stream from `start`, then send `update` on
    /// the control stream; on failure answer [`Input::TransferFailed`].
    Transfer {
        /// The bytes.
        bytes: Vec<u8>,
        /// Where the device's durable copy ends.
        start: u64,
        /// The announcement to send once the stream is open.
        update: Update,
    },
    /// The device is caught up to this sequence (its health record).
    Delivered(u64),
    /// Answer a lead's or operator's request.
    Serve(Request),
    /// Run one step of the Automerge-sync fallback for the device.
    Resync(SyncStep),
    /// Serve the stream the device opened as an upload.
    AcceptUpload,
    /// End the connection with this error (the device was told why, where it could be).
    Close(Error),
    /// The device ended the connection; nothing more to do.
    End,
}

/// Where a catch-up is.
enum CatchUp {
    Idle,
    /// Waiting for the list of documents (a cursor the relay cannot honour).
    Listing {
        upto: u64,
    },
    /// Waiting for the documents changed in the window.
    Changed {
        upto: u64,
        after: u64,
        old: Option<Coverage>,
    },
    /// Going through the documents, one lookup at a time.
    Docs {
        upto: u64,
        after: u64,
        old: Option<Coverage>,
        queue: VecDeque<DocId>,
        current: Option<DocId>,
    },
}

/// Limits a session enforces.
#[derive(Clone, Debug)]
pub struct SessionLimits {
    /// Messages per second on average.
    pub messages_per_second: u32,
    /// Message burst.
    pub message_burst: u32,
    /// New streams per second on average.
    pub streams_per_second: u32,
    /// Stream burst.
    pub stream_burst: u32,
}

/// The relay's side of one device connection (see the module docs).
pub struct Session {
    peer: Peer,
    epoch: u64,
    stable: u64,
    expires_at: Instant,
    rate: Arc<std::sync::Mutex<Bucket>>,
    streams: Bucket,
    pushes_in_flight: usize,
    pending_pull: Option<Pull>,
    catch_up: CatchUp,
    /// A catch-up asked for while one ran: its cursor.
    again: Option<Option<Cursor>>,
    due: Option<Instant>,
    /// When the last live catch-up started.
    last_live: Option<Instant>,
    /// Bytes the running catch-up delivered so far, and the last finished one.
    sending: u64,
    last_sent: u64,
    actions: VecDeque<Action>,
    closed: bool,
}

impl Session {
    /// A session for `peer`, welcomed at `now`, whose token expires at `expires_at`;
    /// the relay's epoch and its stable sequence now.
    pub fn new(
        peer: Peer,
        limits: SessionLimits,
        epoch: u64,
        stable: u64,
        now: Instant,
        expires_at: Instant,
    ) -> Self {
        Self {
            peer,
            epoch,
            stable,
            expires_at,
            rate: Arc::new(std::sync::Mutex::new(Bucket::new(
                limits.messages_per_second,
                limits.message_burst,
                now,
            ))),
            streams: Bucket::new(limits.streams_per_second, limits.stream_burst, now),
            pushes_in_flight: 0,
            pending_pull: None,
            catch_up: CatchUp::Idle,
            again: None,
            due: None,
            last_live: None,
            sending: 0,
            last_sent: 0,
            actions: VecDeque::new(),
            closed: false,
        }
    }

    /// What the session knows of its device (the driver's upload and fallback steps
    /// read and update it).
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// [`peer`](Self::peer), to change.
    pub fn peer_mut(&mut self) -> &mut Peer {
        &mut self.peer
    }

    /// The message budget, shared with upload streams.
    pub fn rate(&self) -> Arc<std::sync::Mutex<Bucket>> {
        self.rate.clone()
    }

    /// Whether the session ended.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        Some(match self.due {
            Some(due) => due.min(self.expires_at),
            None => self.expires_at,
        })
    }

    /// Time passed: the token may have expired, a live catch-up may be due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if now >= self.expires_at {
            let text = "token expired during the session; ask your lead for a new one";
            return self.refuse(ErrorCode::TOKEN_EXPIRED, text.into());
        }
        if self.due.is_some_and(|due| now >= due) {
            self.due = None;
            self.last_live = Some(now);
            let cursor = Cursor {
                epoch: self.epoch,
                seq: self.peer.delivered.unwrap_or(0),
                subscription: self.peer.subscription.subscription().clone(),
            };
            self.start_catch_up(Some(cursor));
        }
    }

    /// Something happened at `now`.
    pub fn handle(&mut self, now: Instant, input: Input) {
        if self.closed {
            return;
        }
        match input {
            Input::Message(msg) => self.on_message(now, msg),
            Input::StreamFailed(e) => {
                let (code, text) = match &e {
                    Error::Protocol(p) => (p.code(), p.to_string()),
                    Error::Refused { code, text } => (*code, text.clone()),
                    other => (ErrorCode::BAD_FRAME, other.to_string()),
                };
                self.send(error_msg(code, text.clone(), None));
                self.close(match e {
                    Error::Connection { .. } => e,
                    _ => Error::Refused { code, text },
                });
            }
            Input::StreamEnded => {
                self.actions.push_back(Action::End);
                self.closed = true;
            }
            Input::Admitted(push, verdict) => self.on_verdict(push, verdict),
            Input::QuarantineStarted(offline_ms) => self.peer.quarantined = Some(offline_ms),
            Input::Committed {
                doc,
                device_heads,
                pushed,
                result,
            } => {
                self.pushes_in_flight = self.pushes_in_flight.saturating_sub(1);
                match &result {
                    Ok(Outcome::Committed(c)) => {
                        self.peer.known.add(&doc, &device_heads);
                        self.peer.known.settle_own(&doc, &pushed, Some(c.seq));
                    }
                    _ => self.peer.known.settle_own(&doc, &pushed, None),
                }
                self.send(reply(doc, result));
                self.answer_pending_pull();
            }
            Input::StableMoved(seq) => self.stable = self.stable.max(seq),
            Input::Answer(answer) => self.on_answer(answer),
            Input::Revoked => {
                let id = self.peer.scope.claims().id;
                let text = format!("token {id} was revoked; ask your lead for a new one");
                self.refuse(ErrorCode::TOKEN_REVOKED, text);
            }
            Input::StreamOpened => {
                if self.streams.take(now) {
                    self.actions.push_back(Action::AcceptUpload);
                } else {
                    let text = "too many streams; the connection was closed (reconnect later)";
                    self.refuse(ErrorCode::RATE_LIMITED, text.into());
                }
            }
            Input::UploadEnded(result) => {
                if let Err(Error::Refused { code, text }) = result
                    && code != ErrorCode::TIMED_OUT
                {
                    self.refuse(code, text);
                }
            }
            Input::TransferFailed(e) => self.close(e),
        }
        self.schedule_live(now);
    }

    /// A device caught up before and behind the stable sequence now, with no catch-up
    /// running or due, gets one: at once when it was not caught up in the last window
    /// (an idle relay adds no wait), otherwise at the window's end, so that commits
    /// landing together reach it as one update per document. The window is
    /// [`LIVE_COALESCE`], or [`CATCHING_UP_COALESCE`] while the device is catching up.
    /// Checked after every input, so commits that landed while a catch-up ran (the
    /// first one included) are not left waiting for the next commit.
    fn schedule_live(&mut self, now: Instant) {
        let behind = self.peer.delivered.is_some_and(|d| d < self.stable);
        let idle = matches!(self.catch_up, CatchUp::Idle) && self.again.is_none();
        if !self.closed && behind && idle && self.due.is_none() {
            let window = if self.last_sent >= CATCHING_UP_BYTES {
                CATCHING_UP_COALESCE
            } else {
                LIVE_COALESCE
            };
            let free = self.last_live.map_or(now, |t| t + window);
            self.due = Some(free.max(now));
        }
    }

    fn on_message(&mut self, now: Instant, msg: Message) {
        let allowed = self
            .rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(now);
        if !allowed {
            let text = "too many messages; the connection was closed (reconnect later)";
            return self.refuse(ErrorCode::RATE_LIMITED, text.into());
        }
        match msg {
            Message::Push(p) => match bundle_changes(&p.bundle) {
                Ok(changes) => {
                    self.pushes_in_flight += 1;
                    self.actions.push_back(Action::Admit(PushWork {
                        device_heads: hashes_from_wire(&p.heads),
                        doc: p.doc,
                        bundle: p.bundle,
                        changes,
                    }));
                }
                Err(e) => self.send(error_msg(ErrorCode::BAD_DOCUMENT_DATA, e, Some(p.doc))),
            },
            Message::DevicesRequest(team) => {
                if self.peer.reviews(&team) {
                    self.actions
                        .push_back(Action::Serve(Request::Devices(team)));
                } else {
                    let text = format!("only a lead of {team} or an operator may see its devices");
                    self.send(error_msg(ErrorCode::FORBIDDEN, text, None));
                }
            }
            Message::QuarantineRequest(team) | Message::QuarantineAccept { team, .. }
                if !self.peer.reviews(&team) =>
            {
                let text = format!("only a lead of {team} or an operator reviews its quarantine");
                self.send(error_msg(ErrorCode::FORBIDDEN, text, None));
            }
            Message::QuarantineRequest(team) => {
                self.actions
                    .push_back(Action::Serve(Request::Quarantine(team)));
            }
            Message::QuarantineAccept { team, device } => {
                self.actions
                    .push_back(Action::Serve(Request::Accept(team, device)));
            }
            Message::Pull(pull)
                if pull
                    .cursor
                    .as_ref()
                    .is_some_and(|c| c.subscription.check_size().is_err()) =>
            {
                let text = format!(
                    "a cursor's subscription may list at most {} documents",
                    redline_proto::message::MAX_SUBSCRIBED_DOCS
                );
                return self.refuse(ErrorCode::TOO_LARGE, text);
            }
            Message::Pull(pull) => {
                self.peer.resume = pull.resume.iter().map(|o| (o.id, o.have)).collect();
                self.peer.defer_large = pull.defer_large;
                self.pending_pull = Some(pull);
            }
            Message::Sync(step) => {
                if self.peer.scope.can_read(&step.doc) {
                    self.actions.push_back(Action::Resync(step));
                } else {
                    self.send(forbidden(&step.doc));
                }
            }
            other => {
                let text = format!("unexpected {} on the control stream", other.kind());
                return self.refuse(ErrorCode::PROTOCOL_VIOLATION, text);
            }
        }
        self.answer_pending_pull();
    }

    fn on_verdict(&mut self, push: PushWork, verdict: Verdict) {
        match verdict {
            Verdict::Refuse(code, text) => {
                self.pushes_in_flight = self.pushes_in_flight.saturating_sub(1);
                self.send(error_msg(code, text, Some(push.doc)));
                self.answer_pending_pull();
            }
            Verdict::Hold { starts } => self.actions.push_back(Action::Hold(push, starts)),
            Verdict::Accept => {
                self.peer.known.add_own(&push.doc, &push.changes);
                let author = self.peer.author.clone();
                self.actions.push_back(Action::Commit(push, author));
            }
        }
    }

    /// A `Pull` waits until every push before it is committed.
    fn answer_pending_pull(&mut self) {
        if self.pushes_in_flight == 0
            && !self.closed
            && let Some(pull) = self.pending_pull.take()
        {
            self.start_catch_up(pull.cursor);
        }
    }

    fn send(&mut self, msg: Message) {
        self.actions.push_back(Action::Send(msg));
    }

    /// Tells the device why, then ends the connection.
    fn refuse(&mut self, code: ErrorCode, text: String) {
        self.send(error_msg(code, text.clone(), None));
        self.close(Error::Refused { code, text });
    }

    fn close(&mut self, e: Error) {
        self.actions.push_back(Action::Close(e));
        self.closed = true;
    }
}

#[cfg(test)]
mod tests;
