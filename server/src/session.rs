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
//! before it is committed; live catch-ups coalesce commits landing within
//! [`LIVE_COALESCE`]), the message and stream rate limits, token expiry and revocation,
//! and the catch-up itself (a cursor from another epoch or ahead of the relay means
//! resync; otherwise the documents changed in the window, each sent inline, announced
//! for later, or as a transfer, and the known heads that make the next window small).
//!
//! Still in the driver, to move here next: the steps of an upload stream and of the
//! Automerge-sync fallback ([`Action::Resync`], [`Action::AcceptUpload`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::{Change, ChangeHash};
use redline_proto::message::{
    Ack, Coverage, Cursor, ErrorReport, Message, Payload, Pull, QuarantineEntry, SyncStep, Update,
};
use redline_proto::session::{RelayResync, hashes_from_wire, hashes_to_wire};
use redline_proto::wire::{INLINE_MAX, transfer_id, union_heads};
use redline_proto::{DeviceId, DocId, ErrorCode, TeamId};

use crate::Error;
use crate::access::Scope;
use crate::authorship::Author;
use crate::config::RelayConfig;
use crate::hub::{Committed, bundle_changes};

/// How long live fan-out waits to coalesce commits that land together.
pub const LIVE_COALESCE: Duration = Duration::from_millis(8);

/// A token bucket: `rate` per second on average, bursts up to `burst`.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: now,
        }
    }

    /// Takes one token at `now`; false if the bucket is empty.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What a device holds, per document: heads (pushed, uploading or delivered here) and
/// the changes it pushed itself, so catch-ups never send them back; shared between the
/// session and its upload streams.
///
/// An own change matters only until the device is delivered past the commit that
/// stored it (later windows start after that): each is kept with that commit's
/// sequence ([`IN_FLIGHT`] until it is known) and pruned once delivered, so a live
/// connection pushing all day does not grow without bound.
#[derive(Clone, Default)]
pub struct Known(Arc<std::sync::Mutex<KnownInner>>);

/// The sequence of an own change whose commit has not answered yet.
pub const IN_FLIGHT: u64 = u64::MAX;

#[derive(Default)]
struct KnownInner {
    heads: HashMap<DocId, Vec<ChangeHash>>,
    own: HashMap<DocId, HashMap<ChangeHash, u64>>,
}

impl Known {
    fn lock(&self) -> std::sync::MutexGuard<'_, KnownInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// The device holds `heads` of `doc`.
    pub fn add(&self, doc: &DocId, heads: &[ChangeHash]) {
        union_heads(self.lock().heads.entry(doc.clone()).or_default(), heads);
    }
    /// Heads of `doc` the device is known to hold.
    pub fn get(&self, doc: &DocId) -> Vec<ChangeHash> {
        self.lock().heads.get(doc).cloned().unwrap_or_default()
    }
    /// The device pushed `changes` of `doc` itself (never sent back to it).
    pub fn add_own(&self, doc: &DocId, changes: &[Change]) {
        let mut k = self.lock();
        let own = k.own.entry(doc.clone()).or_default();
        for c in changes {
            own.entry(c.hash()).or_insert(IN_FLIGHT);
        }
    }
    /// The commit of own changes `pushed` of `doc` answered: stored at or below `seq`
    /// (`None`: not stored at all, held or refused).
    pub fn settle_own(&self, doc: &DocId, pushed: &[ChangeHash], seq: Option<u64>) {
        let mut k = self.lock();
        let Some(own) = k.own.get_mut(doc) else {
            return;
        };
        for h in pushed {
            match seq {
                Some(seq) => {
                    if let Some(s) = own.get_mut(h) {
                        *s = (*s).min(seq);
                    }
                }
                None => {
                    if own.get(h) == Some(&IN_FLIGHT) {
                        own.remove(h);
                    }
                }
            }
        }
    }
    /// The device was delivered everything up to `seq`: own changes stored at or below
    /// it can never be in a later window.
    pub fn prune_own(&self, seq: u64) {
        let mut k = self.lock();
        k.own.retain(|_, own| {
            own.retain(|_, s| *s > seq);
            !own.is_empty()
        });
    }
    /// The changes of `doc` the device pushed itself (still needed).
    pub fn own(&self, doc: &DocId) -> HashSet<ChangeHash> {
        self.lock()
            .own
            .get(doc)
            .map(|own| own.keys().copied().collect())
            .unwrap_or_default()
    }
    /// Own changes kept, over all documents.
    pub fn own_len(&self) -> usize {
        self.lock().own.values().map(HashMap::len).sum()
    }
}

/// What the relay knows of one device on this connection.
pub struct Peer {
    /// The device.
    pub device: DeviceId,
    /// Who its changes must name: the token's member and device.
    pub author: Author,
    /// What its token allows.
    pub scope: Scope,
    /// In quarantine after this long offline (ms): pushes are held for review.
    pub quarantined: Option<i64>,
    /// The device had finished a sync before this connection (it is not new).
    pub synced_before: bool,
    /// What it receives: its subscription narrowed to its scope.
    pub subscription: Coverage,
    /// Heads the device is known to hold, per document. Shared with upload streams.
    pub known: Known,
    /// Transfers the device holds part of: id → bytes held.
    pub resume: HashMap<[u8; 16], u64>,
    /// The device asked for large downloads to be announced but not sent.
    pub defer_large: bool,
    /// Feed sequence the device has been brought up to (`None` before its first pull).
    pub delivered: Option<u64>,
    /// The Automerge-sync fallback's state for this device.
    pub resync: RelayResync,
}

/// What the admission rule knows of a connection's device.
#[derive(Clone)]
pub struct Admission {
    /// Who pushes.
    pub author: Author,
    /// What its token allows.
    pub scope: Scope,
    /// In quarantine after this long offline (ms).
    pub quarantined: Option<i64>,
    /// The device had finished a sync before this connection.
    pub synced_before: bool,
    /// Most changes in one message.
    pub max_changes: usize,
    /// The relay's quotas.
    pub quotas: crate::config::Quotas,
}

impl Peer {
    /// What the admission rule needs to know of this device.
    pub fn admission(&self, config: &RelayConfig) -> Admission {
        Admission {
            author: self.author.clone(),
            scope: self.scope.clone(),
            quarantined: self.quarantined,
            synced_before: self.synced_before,
            max_changes: config.limits.max_changes_per_message,
            quotas: config.quotas.clone(),
        }
    }

    /// Whether this device oversees `team`: its devices' health and its quarantine (a
    /// lead of the team, or an operator).
    pub fn reviews(&self, team: &TeamId) -> bool {
        let c = self.scope.claims();
        c.role == redline_proto::token::Role::Operator
            || (c.role == redline_proto::token::Role::Lead && c.teams.contains(team))
    }

    /// The quarantine entry for a push of `changes` changes to `doc`, received at
    /// `now_ms` (unix milliseconds).
    pub fn held_entry(&self, doc: &DocId, changes: usize, now_ms: i64) -> QuarantineEntry {
        held_entry(
            &self.device,
            &self.scope,
            self.quarantined,
            doc,
            changes,
            now_ms,
        )
    }
}

/// The quarantine entry for a push of `changes` changes to `doc` by `device`, offline for
/// `offline_ms` before it came back, received at `now_ms` (unix milliseconds).
pub fn held_entry(
    device: &DeviceId,
    scope: &Scope,
    offline_ms: Option<i64>,
    doc: &DocId,
    changes: usize,
    now_ms: i64,
) -> QuarantineEntry {
    QuarantineEntry {
        device: device.clone(),
        member: scope.claims().member.to_string(),
        doc: doc.clone(),
        changes: u32::try_from(changes).unwrap_or(u32::MAX),
        received_ms: now_ms,
        offline_ms: offline_ms.unwrap_or(0),
    }
}

/// What becomes of changes a device sends for a document.
#[derive(Debug)]
pub enum Verdict {
    /// Commit them (the hub still checks actors, authorship, dependencies and size).
    Accept,
    /// Keep them for a lead's review; `starts`: this push puts the device in quarantine.
    Hold {
        /// The push starts the device's quarantine.
        starts: bool,
    },
    /// Refuse them with this code.
    Refuse(ErrorCode, String),
}

/// What became of a push the relay admitted.
#[derive(Debug)]
pub enum Outcome {
    /// Merged and durable.
    Committed(Committed),
    /// Held for a lead's review (the words for the device).
    Held(String),
}

/// The device's answer for a push or upload of `doc` that ended with `result`.
pub fn reply(doc: DocId, result: Result<Outcome, Error>) -> Message {
    match result {
        Ok(Outcome::Committed(c)) => Message::Ack(Ack {
            doc,
            heads: hashes_to_wire(&c.heads),
            applied: c.applied,
        }),
        Ok(Outcome::Held(text)) => error_msg(ErrorCode::QUARANTINED, text, Some(doc)),
        Err(e) => refusal(e, doc),
    }
}

/// A push on its way through admission and commit.
pub struct PushWork {
    /// The document.
    pub doc: DocId,
    /// The bytes as pushed (kept for a hold).
    pub bundle: Vec<u8>,
    /// The heads the device will hold once this is committed.
    pub device_heads: Vec<ChangeHash>,
    /// The changes, through the intake.
    pub changes: Vec<Change>,
}

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
    },
}

/// The hub's answer to a [`Query`].
pub enum Answer {
    /// Every stored document.
    Listed(Vec<DocId>),
    /// The documents to look at, in order.
    Changed(Vec<DocId>),
    /// What the device lacks of a document (`None`: nothing), with the heads after.
    Lacks(Option<(Payload, Vec<ChangeHash>)>),
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
    actions: VecDeque<Action>,
    closed: bool,
}

fn error_msg(code: ErrorCode, text: impl Into<String>, doc: Option<DocId>) -> Message {
    Message::Error(ErrorReport {
        code,
        text: text.into(),
        doc,
    })
}

/// The refusal sent for anything outside the token's scope. The same words whether or
/// not the document exists.
pub fn forbidden(doc: &DocId) -> Message {
    error_msg(
        ErrorCode::FORBIDDEN,
        "your token does not allow this document",
        Some(doc.clone()),
    )
}

/// The answer to a push or upload the hub did not commit.
pub fn refusal(e: Error, doc: DocId) -> Message {
    if let Error::MissingDependencies(_) = e {
        return Message::Resync(doc);
    }
    let (code, text) = refusal_code(e);
    error_msg(code, text, Some(doc))
}

/// The code and words for a commit the hub refused.
pub fn refusal_code(e: Error) -> (ErrorCode, String) {
    match e {
        e @ Error::MissingDependencies(_) => (ErrorCode::BAD_DOCUMENT_DATA, e.to_string()),
        Error::BadChanges(text) => (ErrorCode::BAD_DOCUMENT_DATA, text),
        e @ (Error::ForgedActor { .. } | Error::ForgedAuthorship(_)) => {
            (ErrorCode::FORBIDDEN, e.to_string())
        }
        Error::TooLarge(text) => (ErrorCode::TOO_LARGE, text),
        Error::QuotaExceeded(text) => (ErrorCode::QUOTA_EXCEEDED, text),
        e => (
            ErrorCode::STORAGE_FAILURE,
            format!("nothing was acknowledged: {e}"),
        ),
    }
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
                    Error::Connection(_) => e,
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
            Input::StableMoved(seq) => {
                if seq > self.stable {
                    self.stable = seq;
                    // Let commits that land together reach the device as one update
                    // per document.
                    if self.peer.delivered.is_some() && self.due.is_none() {
                        self.due = Some(now + LIVE_COALESCE);
                    }
                }
            }
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

    fn start_catch_up(&mut self, cursor: Option<Cursor>) {
        if !matches!(self.catch_up, CatchUp::Idle) {
            self.again = Some(cursor);
            return;
        }
        let upto = self.stable;
        // A cursor from another epoch or from a sequence this relay never reached means
        // the relay was replaced or restored from an older copy: what the device
        // believes the relay holds may be gone. Automerge's own protocol finds and
        // repairs the difference.
        if cursor
            .as_ref()
            .is_some_and(|c| c.epoch != self.epoch || c.seq > upto)
        {
            self.catch_up = CatchUp::Listing { upto };
            self.actions.push_back(Action::Query(Query::List));
            return;
        }
        let (after, old) = match cursor {
            Some(c) => (c.seq, Some(Coverage::new(c.subscription))),
            None => (0, None),
        };
        self.actions.push_back(Action::Query(Query::ChangedInScope {
            scope: Box::new(self.peer.subscription.clone()),
            after,
            upto,
            old: old.clone().map(Box::new),
        }));
        self.catch_up = CatchUp::Changed { upto, after, old };
    }

    fn on_answer(&mut self, answer: Answer) {
        let state = std::mem::replace(&mut self.catch_up, CatchUp::Idle);
        match (state, answer) {
            (_, Answer::Failed(e)) => self.close(e),
            (CatchUp::Listing { upto }, Answer::Listed(docs)) => {
                let covered: Vec<DocId> = docs
                    .into_iter()
                    .filter(|d| self.peer.subscription.covers(d))
                    .collect();
                for doc in covered {
                    self.send(Message::Resync(doc));
                }
                self.caught(upto);
            }
            (CatchUp::Changed { upto, after, old }, Answer::Changed(docs)) => {
                self.catch_up = CatchUp::Docs {
                    upto,
                    after,
                    old,
                    queue: docs.into(),
                    current: None,
                };
                self.next_doc();
            }
            (
                CatchUp::Docs {
                    upto,
                    after,
                    old,
                    queue,
                    current: Some(doc),
                },
                Answer::Lacks(found),
            ) => {
                if let Some((payload, heads)) = found {
                    self.deliver(doc, payload, heads);
                }
                self.catch_up = CatchUp::Docs {
                    upto,
                    after,
                    old,
                    queue,
                    current: None,
                };
                self.next_doc();
            }
            (state, _) => {
                // An answer to nothing asked: the driver broke the protocol with its core.
                self.catch_up = state;
                self.close(Error::Connection(
                    "internal: a hub answer arrived for no question".into(),
                ));
            }
        }
    }

    /// Asks for the next document of the catch-up, or ends it with `Caught`.
    fn next_doc(&mut self) {
        let CatchUp::Docs {
            upto,
            after,
            old,
            queue,
            current,
        } = &mut self.catch_up
        else {
            return;
        };
        match queue.pop_front() {
            Some(doc) => {
                let covered = old.as_ref().is_some_and(|o| o.covers(&doc));
                let query = Query::Lacks {
                    doc: doc.clone(),
                    have_at: covered.then_some(*after),
                    known: self.peer.known.get(&doc),
                    // Covered before: the commit log says what came since.
                    window: covered.then(|| (*after, *upto, self.peer.known.own(&doc))),
                };
                *current = Some(doc);
                self.actions.push_back(Action::Query(query));
            }
            None => {
                let upto = *upto;
                self.catch_up = CatchUp::Idle;
                self.caught(upto);
            }
        }
    }

    /// Sends what the device lacks of `doc`: inline, announced (its budget holds large
    /// downloads back), or as a transfer on its own stream.
    fn deliver(&mut self, doc: DocId, payload: Payload, heads: Vec<ChangeHash>) {
        let document = matches!(payload, Payload::Document(_));
        let large = match &payload {
            Payload::Bundle(b) | Payload::Document(b) => b.len() > INLINE_MAX,
            Payload::Transfer { .. } => false,
        };
        let wire_heads = hashes_to_wire(&heads);
        match payload {
            Payload::Bundle(bytes) | Payload::Document(bytes) if large => {
                let id = transfer_id(&bytes);
                let update = Update {
                    doc: doc.clone(),
                    payload: Payload::Transfer {
                        id,
                        len: bytes.len() as u64,
                        document,
                    },
                    heads: wire_heads,
                };
                if self.peer.defer_large {
                    // Announced, not sent: the device's cursor stays where it was until
                    // it asks again.
                    self.send(Message::Update(update));
                    return;
                }
                // Resume where the device's durable copy ends (same id: the same bytes).
                let start = self
                    .peer
                    .resume
                    .remove(&id)
                    .unwrap_or(0)
                    .min(bytes.len() as u64);
                self.actions.push_back(Action::Transfer {
                    bytes,
                    start,
                    update,
                });
            }
            small => self.send(Message::Update(Update {
                doc: doc.clone(),
                payload: small,
                heads: wire_heads,
            })),
        }
        self.peer.known.add(&doc, &heads);
    }

    fn caught(&mut self, upto: u64) {
        self.send(Message::Caught(Cursor {
            epoch: self.epoch,
            seq: upto,
            subscription: self.peer.subscription.subscription().clone(),
        }));
        self.peer.delivered = Some(upto);
        self.peer.known.prune_own(upto);
        self.actions.push_back(Action::Delivered(upto));
        if let Some(cursor) = self.again.take() {
            self.start_catch_up(cursor);
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
mod tests {
    use super::*;
    use redline_proto::message::{Push, Subscription};
    use redline_proto::token::{Claims, Role, TokenId};
    use redline_proto::{Day, MemberId};

    const EPOCH: u64 = 42;

    fn peer(role: Role) -> Peer {
        let device = DeviceId::new("phone-1").unwrap();
        let team = TeamId::new("t1").unwrap();
        let claims = Claims {
            id: TokenId([7; 16]),
            device: device.clone(),
            member: MemberId::new("ana").unwrap(),
            role,
            teams: vec![team.clone()],
            zones: vec![],
            issued: 0,
            expires: u64::MAX,
        };
        let scope = Scope::new(claims);
        let granted = scope.grant(&Subscription {
            teams: vec![team],
            ..Default::default()
        });
        Peer {
            author: Author {
                device: device.clone(),
                member: MemberId::new("ana").unwrap(),
                role,
            },
            device,
            scope,
            quarantined: None,
            synced_before: false,
            subscription: Coverage::new(granted),
            known: Known::default(),
            resume: HashMap::new(),
            defer_large: false,
            delivered: None,
            resync: RelayResync::new(),
        }
    }

    fn limits() -> SessionLimits {
        SessionLimits {
            messages_per_second: 10,
            message_burst: 3,
            streams_per_second: 1,
            stream_burst: 1,
        }
    }

    fn session(now: Instant) -> Session {
        Session::new(
            peer(Role::Volunteer),
            limits(),
            EPOCH,
            5,
            now,
            now + Duration::from_secs(3600),
        )
    }

    fn actions(s: &mut Session) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn day() -> DocId {
        DocId::ledger(
            &TeamId::new("t1").unwrap(),
            &Day::new("2026-12-01").unwrap(),
        )
    }

    /// A push of one real change to the team's day.
    fn push() -> Message {
        let mut doc = automerge::Automerge::new();
        let mut tx = doc.transaction();
        automerge::transaction::Transactable::put(&mut tx, automerge::ROOT, "k", 1).unwrap();
        tx.commit();
        let bundle = doc.bundle(doc.get_heads()).unwrap().bytes().to_vec();
        Message::Push(Push {
            doc: day(),
            bundle,
            heads: hashes_to_wire(&doc.get_heads()),
        })
    }

    fn pull(cursor: Option<Cursor>) -> Message {
        Message::Pull(Pull {
            cursor,
            resume: vec![],
            defer_large: false,
        })
    }

    fn sent(actions: &[Action]) -> Vec<&Message> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_pull_waits_for_the_pushes_before_it() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.handle(t0, Input::Message(push()));
        s.handle(t0, Input::Message(pull(None)));
        let a = actions(&mut s);
        assert!(
            matches!(a.as_slice(), [Action::Admit(_)]),
            "no catch-up yet"
        );
        let Action::Admit(work) = a.into_iter().next().unwrap() else {
            unreachable!()
        };
        s.handle(t0, Input::Admitted(work, Verdict::Accept));
        let a = actions(&mut s);
        let Some(Action::Commit(work, author)) = a.into_iter().next() else {
            panic!("accepted pushes are committed")
        };
        assert_eq!(author.device.as_str(), "phone-1");
        s.handle(
            t0,
            Input::Committed {
                doc: work.doc.clone(),
                device_heads: work.device_heads.clone(),
                pushed: work.changes.iter().map(|c| c.hash()).collect(),
                result: Ok(Outcome::Committed(Committed {
                    heads: work.device_heads.clone(),
                    applied: 1,
                    seq: 6,
                })),
            },
        );
        let a = actions(&mut s);
        assert!(matches!(sent(&a)[..], [Message::Ack(_)]));
        assert!(
            matches!(
                a.last(),
                Some(Action::Query(Query::ChangedInScope {
                    after: 0,
                    upto: 5,
                    ..
                }))
            ),
            "the pull is answered once the push is acknowledged"
        );
        // The own change (committed at 6) is kept while windows may still hold it...
        assert_eq!(s.peer().known.own_len(), 1);
        s.handle(t0, Input::Answer(Answer::Changed(vec![])));
        assert_eq!(s.peer().known.own_len(), 1, "delivered up to 5 only");
        actions(&mut s);
        // ...and dropped once the device is delivered past it.
        s.handle(t0, Input::StableMoved(6));
        s.handle_timeout(t0 + LIVE_COALESCE);
        actions(&mut s);
        s.handle(t0, Input::Answer(Answer::Changed(vec![])));
        assert_eq!(s.peer().known.own_len(), 0);
    }

    #[test]
    fn a_catch_up_sends_what_is_lacking_then_caught_and_goes_live() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.handle(t0, Input::Message(pull(None)));
        assert!(matches!(
            actions(&mut s)[..],
            [Action::Query(Query::ChangedInScope { .. })]
        ));
        s.handle(t0, Input::Answer(Answer::Changed(vec![day()])));
        let a = actions(&mut s);
        let [
            Action::Query(Query::Lacks {
                doc,
                have_at: None,
                window: None,
                ..
            }),
        ] = &a[..]
        else {
            panic!("one lookup per document")
        };
        assert_eq!(*doc, day());
        let heads = vec![ChangeHash([3; 32])];
        s.handle(
            t0,
            Input::Answer(Answer::Lacks(Some((
                Payload::Bundle(vec![1, 2, 3]),
                heads.clone(),
            )))),
        );
        let a = actions(&mut s);
        let m = sent(&a);
        assert!(matches!(m[0], Message::Update(u) if u.doc == day()));
        assert!(matches!(m[1], Message::Caught(c) if c.seq == 5 && c.epoch == EPOCH));
        assert!(matches!(a.last(), Some(Action::Delivered(5))));
        assert_eq!(s.peer().known.get(&day()), heads);
        // Live: a move of the stable sequence is caught up after the coalescing window.
        s.handle(t0, Input::StableMoved(6));
        assert!(actions(&mut s).is_empty());
        assert_eq!(s.poll_timeout(), Some(t0 + LIVE_COALESCE));
        s.handle(t0, Input::StableMoved(7));
        s.handle_timeout(t0 + LIVE_COALESCE);
        let a = actions(&mut s);
        assert!(
            matches!(
                a[..],
                [Action::Query(Query::ChangedInScope {
                    after: 5,
                    upto: 7,
                    ..
                })]
            ),
            "both moves in one catch-up, from where the device is"
        );
    }

    #[test]
    fn a_cursor_the_relay_cannot_honour_means_resync() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let other = Cursor {
            epoch: EPOCH + 1,
            seq: 3,
            subscription: s.peer().subscription.subscription().clone(),
        };
        s.handle(t0, Input::Message(pull(Some(other))));
        assert!(matches!(actions(&mut s)[..], [Action::Query(Query::List)]));
        let elsewhere = DocId::parse("households/z9").unwrap();
        s.handle(t0, Input::Answer(Answer::Listed(vec![day(), elsewhere])));
        let a = actions(&mut s);
        let m = sent(&a);
        assert_eq!(m.len(), 2, "only covered documents: {}", m.len());
        assert!(matches!(m[0], Message::Resync(d) if *d == day()));
        assert!(matches!(m[1], Message::Caught(_)));
    }

    #[test]
    fn large_payloads_go_as_transfers_or_wait_for_the_budget() {
        let t0 = Instant::now();
        let big = vec![0u8; INLINE_MAX + 1];
        for defer in [false, true] {
            let mut s = session(t0);
            let id = transfer_id(&big);
            s.handle(
                t0,
                Input::Message(Message::Pull(Pull {
                    cursor: None,
                    resume: vec![redline_proto::message::UploadOffset { id, have: 1000 }],
                    defer_large: defer,
                })),
            );
            actions(&mut s);
            s.handle(t0, Input::Answer(Answer::Changed(vec![day()])));
            actions(&mut s);
            s.handle(
                t0,
                Input::Answer(Answer::Lacks(Some((
                    Payload::Document(big.clone()),
                    vec![],
                )))),
            );
            let a = actions(&mut s);
            if defer {
                assert!(matches!(
                    sent(&a)[0],
                    Message::Update(Update {
                        payload: Payload::Transfer { document: true, .. },
                        ..
                    })
                ));
                assert!(!a.iter().any(|a| matches!(a, Action::Transfer { .. })));
            } else {
                assert!(
                    matches!(a[0], Action::Transfer { start: 1000, .. }),
                    "resumed"
                );
            }
        }
    }

    #[test]
    fn limits_expiry_and_revocation_close_with_their_codes() {
        let t0 = Instant::now();
        let code_of = |a: &[Action]| {
            a.iter().find_map(|a| match a {
                Action::Close(Error::Refused { code, .. }) => Some(*code),
                _ => None,
            })
        };
        // Three messages of burst, the fourth within the same instant is one too many.
        let mut s = session(t0);
        for _ in 0..3 {
            s.handle(t0, Input::Message(pull(None)));
        }
        assert_eq!(code_of(&actions(&mut s)), None);
        s.handle(t0, Input::Message(pull(None)));
        assert_eq!(code_of(&actions(&mut s)), Some(ErrorCode::RATE_LIMITED));
        assert!(s.is_closed() && s.poll_timeout().is_none());
        // A second later the bucket has refilled.
        let mut s = session(t0);
        for i in 0..10 {
            s.handle(
                t0 + Duration::from_millis(200 * i),
                Input::Message(pull(None)),
            );
        }
        assert!(!s.is_closed());
        // One stream per second.
        let mut s = session(t0);
        s.handle(t0, Input::StreamOpened);
        assert!(matches!(actions(&mut s)[..], [Action::AcceptUpload]));
        s.handle(t0, Input::StreamOpened);
        assert_eq!(code_of(&actions(&mut s)), Some(ErrorCode::RATE_LIMITED));
        // Expiry is a timer; revocation an input.
        let mut s = session(t0);
        let expiry = s.poll_timeout().unwrap();
        s.handle_timeout(expiry);
        assert_eq!(code_of(&actions(&mut s)), Some(ErrorCode::TOKEN_EXPIRED));
        let mut s = session(t0);
        s.handle(t0, Input::Revoked);
        assert_eq!(code_of(&actions(&mut s)), Some(ErrorCode::TOKEN_REVOKED));
    }

    #[test]
    fn requests_outside_the_token_are_refused_without_asking_the_hub() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.handle(
            t0,
            Input::Message(Message::DevicesRequest(TeamId::new("t1").unwrap())),
        );
        let a = actions(&mut s);
        assert!(matches!(sent(&a)[..], [Message::Error(e)] if e.code == ErrorCode::FORBIDDEN));
        let mut lead = Session::new(
            peer(Role::Lead),
            limits(),
            EPOCH,
            5,
            t0,
            t0 + Duration::from_secs(60),
        );
        lead.handle(
            t0,
            Input::Message(Message::DevicesRequest(TeamId::new("t1").unwrap())),
        );
        assert!(matches!(
            actions(&mut lead)[..],
            [Action::Serve(Request::Devices(_))]
        ));
        lead.handle(
            t0,
            Input::Message(Message::QuarantineRequest(TeamId::new("t2").unwrap())),
        );
        let a = actions(&mut lead);
        assert!(matches!(sent(&a)[..], [Message::Error(e)] if e.code == ErrorCode::FORBIDDEN));
        let other = redline_proto::message::SyncStep {
            doc: DocId::parse("households/z9").unwrap(),
            data: None,
        };
        lead.handle(t0, Input::Message(Message::Sync(other)));
        let a = actions(&mut lead);
        assert!(matches!(sent(&a)[..], [Message::Error(e)] if e.code == ErrorCode::FORBIDDEN));
    }
}
