//! The device's side of one sync session, as a state machine without IO.
//!
//! A [`DeviceSession`] is fed what happens (a message from the relay, an upload's end,
//! a transfer that arrived, a local write, the clock passing its deadline) and polled
//! for what to do ([`Action`]: send a frame, run an upload, report the first flight,
//! end). It reaches the phone's documents and store only through [`Documents`], reads no
//! clock (deadlines come in as `now`) and touches no socket: the QUIC driver in
//! `sync.rs` is plumbing around it, and tests drive it directly.
//!
//! **First flight.** `Hello`, then a `Push` (an Automerge bundle) of every document with
//! changes the relay is not known to hold, then `Pull` with the device's feed cursor. The
//! relay acks the pushes after its flush and sends what the device lacks in its
//! subscription, then `Caught` with a new cursor. A device with nothing new spends one
//! round trip and a few hundred bytes, however many documents it holds.
//!
//! **Large pushes** (over [`INLINE_MAX`]) become [`UploadSender`]s on their own streams.
//! **Stale knowledge**: if the relay lacks what a push builds on (`Resync`), or an update
//! leaves dependencies missing here, the document falls back to Automerge's sync protocol
//! ([`DeviceResync`]).
//!
//! **Cursor rule.** Updates are merged as they arrive and stored with one flush per step;
//! the cursor is stored only when nothing it covers is pending (a push, a transfer, a
//! resync, a download held back by the data budget), so a cursor never claims what the
//! device lacks.
//!
//! **Live mode.** After the first flight a live session pushes each local write at once
//! (a document whose push is still unanswered goes again once it is answered), and
//! stores the cursor after every settled step.

mod documents;
mod report;
mod updates;
mod upload;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use automerge::ChangeHash;
use redline_proto::codec;
use redline_proto::message::{Cursor, Hello, Message, Payload, Pull, Push, UploadOffset, ext};
use redline_proto::session::{DeviceResync, hashes_to_wire};
use redline_proto::wire::union_heads;
use redline_proto::{DocId, ErrorCode};

pub use documents::{
    DirtyDoc, Documents, Merged, Outgoing, Step, bundle_after, chunk_changes, heads_of, known_held,
    merge_received, merge_received_logged,
};
pub use redline_proto::wire::INLINE_MAX;
pub use report::SyncReport;
pub use upload::{CachedUpload, PIECE, UploadEnd, UploadSender, WINDOW};

use crate::Error;
use crate::progress::SyncProgress;

/// How long the device waits for the relay's `Welcome` before it gives up on a
/// connection: a handshake whose last packet was lost can leave the relay deaf to the
/// device for 10 s or more (it drops 1-RTT packets until the handshake completes), while a
/// fresh connection usually completes at once. Generous on slow links: 10 round trips,
/// at least 5 s.
pub fn hello_wait(rtt: Duration) -> Duration {
    (rtt * 10).max(Duration::from_secs(5))
}

/// What the driver is asked to do.
#[derive(Debug)]
pub enum Action {
    /// Write this frame on the control stream.
    Send(Vec<u8>),
    /// Open a stream and run this upload on it; feed its end back.
    Upload(UploadSender),
    /// The first flight settled and is stored: report it (a live session goes on).
    FirstFlight,
    /// The session is over (not live): close the connection.
    Done,
}

/// How a session begins.
#[derive(Debug)]
pub struct Start {
    /// The hello to say (its protocol version is the one the frames speak).
    pub hello: Hello,
    /// The stored feed cursor for this relay, if any.
    pub cursor: Option<Cursor>,
    /// Where the cursor is stored.
    pub cursor_key: String,
    /// Downloads staged by an earlier session: where each stands.
    pub resume: Vec<UploadOffset>,
    /// Why large downloads are held back this session (`None`: they are not).
    pub defer_large: Option<String>,
    /// The session stays open after its first flight.
    pub live: bool,
    /// This connection's attempt number: larger than any earlier connection's of the
    /// phone ([`redline_proto::message::ext::HELLO_ATTEMPT`]).
    pub attempt: u64,
    /// Now, and the connection's round-trip estimate (the welcome's deadline).
    pub now: Instant,
    pub rtt: Duration,
}

/// The device's side of one session.
#[derive(Debug)]
pub struct DeviceSession {
    live: bool,
    first_done: bool,
    cursor_key: String,
    /// When the relay's welcome is due; `None` once it came.
    welcome_by: Option<Instant>,
    wait: Duration,
    /// The session ended because the relay never answered the hello: the driver tries a
    /// fresh connection.
    unanswered: bool,
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
    /// Transfers applied, whose staged pieces go after the next store.
    applied_transfers: Vec<[u8; 16]>,
    /// Relay-held heads learnt since the last store.
    acked: Vec<(DocId, Vec<ChangeHash>)>,
    dirty: HashSet<DocId>,
    /// The bundles applied to each dirty document, in order (after its `whole`).
    received: HashMap<DocId, Vec<u8>>,
    /// The last whole document applied to a dirty document that held everything the
    /// phone's copy held (what came before it is in it).
    whole: HashMap<DocId, Vec<u8>>,
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
    defer_large: Option<String>,
    /// Large downloads announced but held back: the cursor must not move past them.
    downloads_deferred: bool,
    progress: SyncProgress,
    actions: VecDeque<Action>,
}

impl DeviceSession {
    /// Starts a session: queues the hello, the pushes of the first flight and the pull.
    pub fn start(start: Start, docs: &mut impl Documents) -> Result<Self, Error> {
        let relay_has = docs.relay_held()?;
        let wait = hello_wait(start.rtt);
        let mut s = Self {
            live: start.live,
            first_done: false,
            cursor_key: start.cursor_key,
            welcome_by: Some(start.now + wait),
            wait,
            unanswered: false,
            welcomed: false,
            caught: None,
            in_flight: HashMap::new(),
            report: SyncReport {
                docs: relay_has.len(),
                round_trips: 1,
                ..SyncReport::default()
            },
            relay_has,
            announced: HashMap::new(),
            arrived: HashMap::new(),
            resync: None,
            applied_transfers: Vec::new(),
            acked: Vec::new(),
            dirty: HashSet::new(),
            received: HashMap::new(),
            whole: HashMap::new(),
            merged: HashSet::new(),
            pushed: HashSet::new(),
            written_in_flight: HashSet::new(),
            repush: false,
            updated: HashSet::new(),
            resynced: HashSet::new(),
            defer_large: start.defer_large,
            downloads_deferred: false,
            progress: SyncProgress::default(),
            actions: VecDeque::new(),
        };
        // This client reads several stored chunks in one update, works out the relay's
        // heads from what it applies, and numbers its connections (version 2 and later
        // carry extensions; version 1 relays never see them).
        let version = start.hello.protocol_version;
        let mut hello_ext = codec::Extensions::new();
        hello_ext.insert(ext::HELLO_ACCEPTS_CHUNKS, &true)?;
        hello_ext.insert(ext::HELLO_DERIVES_HEADS, &true)?;
        hello_ext.insert(ext::HELLO_ATTEMPT, &start.attempt)?;
        s.actions.push_back(Action::Send(codec::encode_frame_with(
            &Message::Hello(start.hello),
            &hello_ext,
            version,
            codec::DEFAULT_MAX_FRAME,
        )?));
        s.push_dirty(docs)?;
        let pull = Pull {
            cursor: start.cursor,
            resume: start.resume,
            defer_large: s.defer_large.is_some(),
        };
        s.send(&Message::Pull(pull))?;
        Ok(s)
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`DeviceSession::handle_timeout`] is due, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.welcome_by
    }

    /// The clock reached `now`: a hello still unanswered at its deadline ends the session
    /// (marked unanswered, so the driver tries a fresh connection).
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), Error> {
        match self.welcome_by {
            Some(due) if now >= due => {
                self.unanswered = true;
                Err(Error::transport(format!(
                    "the relay did not answer within {} s",
                    self.wait.as_secs()
                )))
            }
            _ => Ok(()),
        }
    }

    /// The control stream failed with `e`. Lost before any welcome (the relay gave up on
    /// a handshake it never completed) counts as unanswered. Returns the error to end
    /// the session with.
    pub fn handle_lost(&mut self, e: Error) -> Error {
        if !self.welcomed && matches!(e, Error::Transport { .. }) {
            self.unanswered = true;
        }
        e
    }

    /// Whether the session ended because the relay never answered.
    pub fn unanswered(&self) -> bool {
        self.unanswered
    }

    /// A message from the relay on the control stream.
    pub fn handle_message(
        &mut self,
        msg: Message,
        ext: codec::Extensions,
        docs: &mut impl Documents,
    ) -> Result<(), Error> {
        self.handle_messages(vec![(msg, ext)], docs)
    }

    /// Several messages that arrived together, in order. Consecutive updates of one
    /// document (bundles and stored chunks) are merged with one apply, and the phone
    /// stores once for all of them: a device that fell behind a busy relay catches up in
    /// fewer, larger steps. A cursor (`Caught`) is noted and stored after the batch;
    /// anything else is handled where it stands, after the updates before it.
    pub fn handle_messages(
        &mut self,
        msgs: Vec<(Message, codec::Extensions)>,
        docs: &mut impl Documents,
    ) -> Result<(), Error> {
        let mut batch = updates::Batch::default();
        for (msg, ext) in msgs {
            match msg {
                Message::Update(u) if matches!(u.payload, Payload::Bundle(_)) => {
                    self.progress.docs_total += 1;
                    self.progress.docs_done += 1;
                    batch.add(u);
                }
                // A cursor is only noted here; it is stored after the batch is applied.
                Message::Caught(c) => self.caught = Some(c),
                other => {
                    self.apply_batch(std::mem::take(&mut batch), docs)?;
                    self.on_message(other, ext, docs)?;
                }
            }
        }
        self.apply_batch(batch, docs)?;
        self.after_input(docs)
    }

    /// A relay-to-device transfer finished arriving (staged durably by the driver).
    pub fn handle_transfer(
        &mut self,
        id: [u8; 16],
        bytes: Vec<u8>,
        docs: &mut impl Documents,
    ) -> Result<(), Error> {
        self.arrived.insert(id, bytes);
        self.apply_transfers(docs)?;
        self.after_input(docs)
    }

    /// An upload ended.
    pub fn handle_upload_end(
        &mut self,
        end: UploadEnd,
        docs: &mut impl Documents,
    ) -> Result<(), Error> {
        match end {
            UploadEnd::Acked { doc, applied } => self.on_ack(doc, applied),
            UploadEnd::Resync(doc) => {
                self.answered(&doc);
                self.start_resync(doc, docs)?;
            }
            UploadEnd::Refused(doc, r) => {
                self.answered(&doc);
                self.report
                    .refused
                    .push((doc.to_string(), format!("{}: {}", r.code, r.text)));
            }
        }
        self.after_input(docs)
    }

    /// The phone wrote locally: a live session pushes it at once.
    pub fn handle_local_change(&mut self, docs: &mut impl Documents) -> Result<(), Error> {
        if !self.is_live() {
            return Ok(());
        }
        self.push_dirty(docs)?;
        self.after_input(docs)
    }

    /// Whether the first flight is done and the session stays open.
    pub fn is_live(&self) -> bool {
        self.live && self.first_done
    }

    /// The session ends (`ok`: without error): stores what was applied, the cursor only
    /// if the session settled without error.
    pub fn finish(&mut self, ok: bool, docs: &mut impl Documents) -> Result<(), Error> {
        if self.acked.is_empty() && self.dirty.is_empty() {
            return Ok(());
        }
        if !(ok && self.settled()) {
            self.caught = None;
        }
        self.store(docs)
    }

    /// What the session did so far (the driver adds traffic and time).
    pub fn report(&self) -> SyncReport {
        let mut report = self.report.clone();
        report.docs_pushed = self.pushed.len();
        report.docs_updated = self.updated.len();
        report.docs_resynced = self.resynced.len();
        report
    }

    /// Progress so far; `finished` once caught up with nothing in flight. The driver
    /// adds bytes and time before publishing it.
    pub fn progress(&mut self) -> &mut SyncProgress {
        if self.caught.is_some() && self.in_flight.is_empty() && self.announced.is_empty() {
            self.progress.finished = true;
        }
        &mut self.progress
    }

    /// Where the session stands, for diagnosing stalls: welcomed, caught up, pushes in
    /// flight.
    pub fn standing(&self) -> (bool, bool, usize) {
        (self.welcomed, self.caught.is_some(), self.in_flight.len())
    }

    fn send(&mut self, msg: &Message) -> Result<(), Error> {
        let frame = codec::encode_frame(msg, codec::DEFAULT_MAX_FRAME)?;
        self.actions.push_back(Action::Send(frame));
        Ok(())
    }

    fn settled(&self) -> bool {
        self.welcomed
            && self.caught.is_some()
            && self.in_flight.is_empty()
            && self.announced.is_empty()
            && self.resync.as_ref().is_none_or(DeviceResync::is_finished)
    }

    /// The steps an input may call for: the fallback's next messages, pushes of writes
    /// made while their last push was in flight, storing a settled step, and the end of
    /// the first flight.
    fn after_input(&mut self, docs: &mut impl Documents) -> Result<(), Error> {
        let live = self.is_live();
        let mut sent = false;
        while let Some(m) = self.resync.as_mut().and_then(DeviceResync::poll_transmit) {
            self.send(&m)?;
            sent = true;
        }
        if sent {
            self.report.round_trips += 1;
        }
        if self.resync.as_ref().is_some_and(DeviceResync::is_finished) {
            self.finish_resync(docs)?;
        }
        if live && std::mem::take(&mut self.repush) {
            self.push_dirty(docs)?;
        }
        if live && self.settled() {
            self.store(docs)?;
        }
        if self.settled() && !self.first_done {
            self.first_done = true;
            self.store(docs)?;
            self.actions.push_back(if self.live {
                Action::FirstFlight
            } else {
                Action::Done
            });
        }
        Ok(())
    }

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

    fn on_ack(&mut self, doc: DocId, applied: u32) {
        let Some((pushed, changes)) = self.answered(&doc) else {
            return;
        };
        self.progress.changes_sent += changes;
        self.report.changes_sent += u64::from(applied);
        let has = self.relay_has.entry(doc.clone()).or_default();
        union_heads(has, &pushed);
        self.acked.push((doc, has.clone()));
    }

    /// Pushes every document with changes the relay is not known to hold and no push in
    /// flight, most valuable first; what the policy holds back waits for better
    /// conditions.
    fn push_dirty(&mut self, docs: &mut impl Documents) -> Result<(), Error> {
        let mut pushes = Vec::new();
        for id in docs.ids()? {
            if self.in_flight.contains_key(&id)
                || self.resync.as_ref().is_some_and(|r| r.contains(&id))
            {
                self.written_in_flight.insert(id);
                continue;
            }
            let Some(heads) = docs.heads(&id)? else {
                continue;
            };
            let has = self.relay_has.entry(id.clone()).or_default();
            if heads.iter().all(|h| has.contains(h)) {
                continue;
            }
            if let Some(out) = docs.outgoing(&id, has, &heads)? {
                pushes.push((id, heads, out));
            }
        }
        pushes.sort_by_key(|(_, _, out)| out.urgency);
        for (doc, heads, out) in pushes {
            let len = out.bytes.len();
            if let Some(why) = docs.held_back(out.urgency, len, "large document waits")? {
                if !self.report.deferred.iter().any(|(d, _)| *d == doc.as_str()) {
                    self.report.deferred.push((doc.to_string(), why));
                }
                continue;
            }
            self.progress.docs_total += 1;
            self.progress.changes_to_send += out.changes;
            self.in_flight
                .insert(doc.clone(), (heads.clone(), out.changes));
            self.pushed.insert(doc.clone());
            if len > INLINE_MAX {
                let upload = UploadSender::new(doc, out.bytes, &heads);
                self.actions.push_back(Action::Upload(upload));
            } else {
                let push = Push {
                    doc,
                    bundle: out.bytes.to_vec(),
                    heads: hashes_to_wire(&heads),
                };
                self.send(&Message::Push(push))?;
            }
        }
        Ok(())
    }

    fn on_message(
        &mut self,
        msg: Message,
        ext: codec::Extensions,
        docs: &mut impl Documents,
    ) -> Result<(), Error> {
        match msg {
            Message::Welcome(w) => {
                self.welcomed = true;
                self.welcome_by = None;
                self.report.protocol_version = w.protocol_version;
                self.report.relay_versions = match (
                    ext.get::<u16>(ext::WELCOME_OLDEST_VERSION)?,
                    ext.get::<u16>(ext::WELCOME_NEWEST_VERSION)?,
                ) {
                    (Some(oldest), Some(newest)) => Some((oldest, newest)),
                    _ => None,
                };
            }
            Message::Ack(ack) if self.in_flight.contains_key(&ack.doc) => {
                self.on_ack(ack.doc, ack.applied);
            }
            // A second answer to a push already answered (the push reached the relay
            // twice): the first one counted, this one changes nothing.
            Message::Ack(ack) if !self.resync.as_ref().is_some_and(|r| r.contains(&ack.doc)) => {}
            Message::Resync(doc) => {
                self.answered(&doc);
                self.start_resync(doc, docs)?;
            }
            Message::Update(u) => self.apply_update(u, docs)?,
            Message::Caught(c) => self.caught = Some(c),
            Message::Error(r) => match &r.doc {
                Some(doc) if self.resync.as_ref().is_some_and(|s| s.contains(doc)) => {
                    if let Some(resync) = self.resync.as_mut() {
                        resync.handle_message(Message::Error(r))?;
                    }
                }
                Some(doc) => {
                    self.answered(doc);
                    self.report
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
            m @ (Message::Sync(_) | Message::Ack(_)) => match self.resync.as_mut() {
                Some(r) => r.handle_message(m)?,
                None => return Err(unexpected("unexpected", &m)),
            },
            other => return Err(unexpected("device got an unexpected", &other)),
        }
        Ok(())
    }

    /// Stores applied documents, relay-held heads and (when nothing is pending) the
    /// cursor, with one flush.
    fn store(&mut self, docs: &mut impl Documents) -> Result<(), Error> {
        let mut step = Step {
            applied_transfers: std::mem::take(&mut self.applied_transfers),
            ..Step::default()
        };
        for id in self.dirty.drain() {
            step.docs.push(DirtyDoc {
                received: self.received.remove(&id),
                whole: self.whole.remove(&id),
                merged: self.merged.remove(&id),
                id,
            });
        }
        // A set of heads: sorted, and collapsed to the document's heads once the relay
        // holds all of them (so it does not grow with every push).
        let mut latest: HashMap<DocId, Vec<ChangeHash>> = HashMap::new();
        for (id, mut has) in std::mem::take(&mut self.acked) {
            if let Some(heads) = docs.heads(&id)?
                && heads.iter().all(|h| has.contains(h))
            {
                has = heads;
            }
            has.sort();
            if let Some(live) = self.relay_has.get_mut(&id) {
                live.clone_from(&has);
            }
            latest.insert(id, has);
        }
        step.acked = latest.into_iter().collect();
        let settled = self.settled();
        if settled
            && !self.downloads_deferred
            && let Some(c) = &self.caught
        {
            let bytes = postcard::to_stdvec(c).map_err(|e| Error::Store(e.to_string()))?;
            step.cursor = Some((self.cursor_key.clone(), bytes));
        }
        if settled {
            step.settled_announced = Some(self.announced.keys().copied().collect());
        }
        docs.store(step)
    }
}

fn unexpected(what: &str, m: &Message) -> Error {
    redline_proto::Error::ProtocolViolation(format!("{what} {}", m.kind())).into()
}

/// Whether `e` is the relay refusing this app's protocol version.
pub fn refused_version(e: &Error) -> bool {
    matches!(e, Error::Refused { code, .. } if *code == ErrorCode::UNSUPPORTED_VERSION)
}

#[cfg(test)]
mod tests;
