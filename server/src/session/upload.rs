//! The steps of one resumable upload stream, without IO.
//!
//! The device names the upload (`Upload`: document, length, id = hash of the bytes,
//! heads), the relay answers the offset it already holds, the device sends pieces from
//! there and the relay acknowledges each once flushed. When every byte is held, the
//! bytes go through the same intake, admission and commit as a push, and the stream
//! ends with the push's answer.
//!
//! [`UploadStream`] decides every step: what to refuse before any piece (scope, size,
//! an upload already committed whose acknowledgement was lost, the device's quota of
//! staged bytes), which piece is in place, when to flush, when the bytes are whole and
//! theirs, and what ends the stream. It is fed [`UploadInput`]s (the device's messages
//! and the answers of the relay's state) and polled for [`UploadAction`]s; the QUIC
//! driver (`connection::upload`) reads, writes, stages and commits.

use std::collections::VecDeque;

use automerge::ChangeHash;
use redline_proto::message::{Ack, MAX_PIECE, Message, Piece, Upload, UploadOffset};
use redline_proto::session::hashes_from_wire;
use redline_proto::wire::transfer_id;
use redline_proto::{DocId, ErrorCode};

use super::peer::{error_msg, forbidden};
use crate::Error;
use crate::access::Scope;

/// The limits an upload stream keeps.
#[derive(Clone, Debug)]
pub struct UploadLimits {
    /// Largest document (bytes) a device may upload.
    pub max_document_bytes: u64,
    /// Bytes one device may have staged over all its unfinished uploads.
    pub staged_bytes_per_device: u64,
}

/// What happened, fed to [`UploadStream::handle`].
#[derive(Debug)]
pub enum UploadInput {
    /// The device's next message on the stream ([`UploadAction::Read`]).
    Message(Message),
    /// The stream ended, or its next frame could not be read (`Some`: the code and words
    /// to say why).
    Ended(Option<(ErrorCode, String)>),
    /// Whether the relay holds every change the upload names, and its heads of the
    /// document ([`UploadAction::CheckHeld`]).
    Held {
        /// Every named change is committed.
        all: bool,
        /// The relay's heads of the document.
        heads: Vec<ChangeHash>,
    },
    /// This stream took the upload over ([`UploadAction::Take`]).
    Taken {
        /// Bytes of this upload the relay holds.
        have: u64,
        /// Bytes the device has staged over all its uploads.
        staged: u64,
    },
    /// A later connection of the device owns the upload: this stream's connection is
    /// stale, its frames came late ([`UploadAction::Take`]).
    Stale,
    /// What storing a piece came to ([`UploadAction::Stage`]).
    Staged(Staged),
    /// The relay's storage flushed ([`UploadAction::Flush`]).
    Flushed,
    /// Every staged byte, or `None` when a newer stream took the upload over
    /// ([`UploadAction::ReadBytes`]).
    Bytes(Option<Vec<u8>>),
    /// The answer of the commit ([`UploadAction::Commit`]).
    Committed(Message),
}

/// What storing one piece came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Staged {
    /// Stored (not yet flushed).
    Stored,
    /// Not stored: the device's staged bytes would pass its quota.
    OverQuota,
    /// Not stored: a newer stream of the device took the upload over.
    Superseded,
}

/// What the driver does next.
#[derive(Debug)]
pub enum UploadAction {
    /// Read the device's next message (answer: `Message` or `Ended`).
    Read,
    /// The device holds these heads of `doc` (never send them back to it).
    DeviceHolds(DocId, Vec<ChangeHash>),
    /// Ask whether the relay holds these changes of `doc` (answer: `Held`).
    CheckHeld(DocId, Vec<ChangeHash>),
    /// Take the upload with this id over from any older stream of the device and read
    /// what is held of it (answer: `Taken`, or `Stale` when a later connection of the
    /// device owns it).
    Take([u8; 16]),
    /// Send this message on the stream.
    Send(Message),
    /// Store a piece, within the device's quota, if this stream still owns the upload
    /// (answer: `Staged`).
    Stage {
        /// Where the bytes go.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Flush the relay's storage (answer: `Flushed`).
    Flush,
    /// Read every staged byte (answer: `Bytes`).
    ReadBytes,
    /// Admit and commit (or hold) these bytes of `doc` like a push (answer:
    /// `Committed`).
    Commit(DocId, Vec<u8>),
    /// Drop the staged pieces (the upload is answered), unless a newer stream owns them.
    DropStaged,
    /// Count a refusal by this quota.
    QuotaRefused(&'static str),
    /// Send this last message and finish the stream: the upload is over.
    Answer(Message),
    /// Stop: the stream is cut with this error.
    Fail(Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Opening,
    Checking,
    Taking,
    Receiving,
    Staging(u64),
    Flushing(u64),
    Reading,
    Committing,
    Over,
}

/// One upload stream, from its first message to its answer.
pub struct UploadStream {
    scope: Scope,
    limits: UploadLimits,
    up: Option<Upload>,
    /// Bytes held and flushed, in order from 0.
    have: u64,
    stage: Stage,
    actions: VecDeque<UploadAction>,
}

impl UploadStream {
    /// A stream opened by a device with `scope`: it first reads the opening message.
    pub fn new(scope: Scope, limits: UploadLimits) -> Self {
        Self {
            scope,
            limits,
            up: None,
            have: 0,
            stage: Stage::Opening,
            actions: VecDeque::from([UploadAction::Read]),
        }
    }

    /// The next thing to do, if any (none once the stream is over, or while an answer is
    /// awaited).
    pub fn poll_action(&mut self) -> Option<UploadAction> {
        self.actions.pop_front()
    }

    /// Feeds what happened.
    pub fn handle(&mut self, input: UploadInput) {
        match (self.stage, input) {
            (Stage::Opening, UploadInput::Message(Message::Upload(up))) => self.opened(up),
            (Stage::Opening, UploadInput::Ended(Some((code, text)))) => {
                self.send(error_msg(code, text.clone(), None));
                self.fail(Error::Refused { code, text });
            }
            (Stage::Opening, _) => {
                let text = "a stream must start with an upload";
                self.send(error_msg(ErrorCode::PROTOCOL_VIOLATION, text, None));
                self.fail(Error::Refused {
                    code: ErrorCode::PROTOCOL_VIOLATION,
                    text: text.into(),
                });
            }
            (Stage::Checking, UploadInput::Held { all: true, heads }) => {
                let doc = self.doc();
                self.answer(Message::Ack(Ack {
                    doc,
                    heads: redline_proto::session::hashes_to_wire(&heads),
                    applied: 0,
                }));
            }
            (Stage::Checking, UploadInput::Held { all: false, .. }) => self.take(),
            (Stage::Taking, UploadInput::Taken { have, staged }) => self.taken(have, staged),
            (Stage::Taking, UploadInput::Stale) => {
                let doc = Some(self.doc());
                self.answer(error_msg(
                    ErrorCode::BAD_TRANSFER,
                    "a later connection of this phone is uploading this",
                    doc,
                ));
            }
            (Stage::Receiving, UploadInput::Message(Message::Piece(p))) => self.piece(p),
            (Stage::Receiving, UploadInput::Ended(Some((code, text)))) => {
                self.fail(Error::Refused { code, text });
            }
            (Stage::Receiving, _) => {
                self.fail(Error::connection_lost("upload stream ended early"));
            }
            (Stage::Staging(n), UploadInput::Staged(staged)) => self.staged(n, staged),
            (Stage::Flushing(n), UploadInput::Flushed) => {
                self.have += n;
                self.offset();
                self.next_piece_or_bytes();
            }
            (Stage::Reading, UploadInput::Bytes(None)) => self.superseded(),
            (Stage::Reading, UploadInput::Bytes(Some(bytes))) => self.bytes(bytes),
            (Stage::Committing, UploadInput::Committed(reply)) => {
                self.actions.push_back(UploadAction::DropStaged);
                self.answer(reply);
            }
            (stage, input) => panic!("upload stream: {input:?} does not answer {stage:?}"),
        }
    }

    /// The opening message: refused before any piece, already committed, or taken over.
    fn opened(&mut self, up: Upload) {
        let doc = up.doc.clone();
        let heads = hashes_from_wire(&up.heads);
        let len = up.len;
        self.up = Some(up);
        if !self.scope.can_write(&doc) {
            return self.answer(forbidden(&doc));
        }
        if len > self.limits.max_document_bytes {
            let text = format!(
                "upload of {len} bytes exceeds the limit of {}",
                self.limits.max_document_bytes
            );
            return self.answer(error_msg(ErrorCode::TOO_LARGE, text, Some(doc)));
        }
        // The device holds what it uploads: never send it back.
        self.actions
            .push_back(UploadAction::DeviceHolds(doc.clone(), heads.clone()));
        if heads.is_empty() {
            return self.take();
        }
        // An earlier attempt may have been committed and its acknowledgement lost.
        self.stage = Stage::Checking;
        self.actions.push_back(UploadAction::CheckHeld(doc, heads));
    }

    fn take(&mut self) {
        self.stage = Stage::Taking;
        let id = self.up.as_ref().expect("opened").id;
        self.actions.push_back(UploadAction::Take(id));
    }

    /// The upload is this stream's: refuse it over the quota, or ask for the rest.
    fn taken(&mut self, have: u64, staged: u64) {
        let (len, doc) = (self.len(), self.doc());
        let quota = self.limits.staged_bytes_per_device;
        if staged.saturating_add(len.saturating_sub(have)) > quota {
            let text = format!(
                "this phone has {staged} bytes of unfinished uploads on the relay; with this one it would pass the limit of {quota} (unfinished uploads expire)"
            );
            return self.over_quota(error_msg(ErrorCode::QUOTA_EXCEEDED, text, Some(doc)));
        }
        self.have = have;
        self.offset();
        self.next_piece_or_bytes();
    }

    /// One piece: stored if it is the next one, else the stream is cut.
    fn piece(&mut self, p: Piece) {
        let up = self.up.as_ref().expect("opened");
        if p.id != up.id
            || p.offset != self.have
            || p.data.len() > MAX_PIECE
            || self.have + p.data.len() as u64 > up.len
        {
            let doc = Some(up.doc.clone());
            self.send(error_msg(
                ErrorCode::BAD_TRANSFER,
                "piece out of place",
                doc,
            ));
            return self.fail(Error::connection_lost("bad piece"));
        }
        self.stage = Stage::Staging(p.data.len() as u64);
        self.actions.push_back(UploadAction::Stage {
            offset: p.offset,
            data: p.data,
        });
    }

    fn staged(&mut self, n: u64, staged: Staged) {
        match staged {
            Staged::Stored => {
                self.stage = Stage::Flushing(n);
                self.actions.push_back(UploadAction::Flush);
            }
            Staged::OverQuota => {
                let quota = self.limits.staged_bytes_per_device;
                let text = format!(
                    "this phone's unfinished uploads on the relay reached the limit of {quota} bytes (unfinished uploads expire)"
                );
                let doc = Some(self.doc());
                self.over_quota(error_msg(ErrorCode::QUOTA_EXCEEDED, text, doc));
            }
            Staged::Superseded => self.superseded(),
        }
    }

    /// Every byte is held: commit them if they are what the upload named.
    fn bytes(&mut self, bytes: Vec<u8>) {
        let up = self.up.as_ref().expect("opened");
        let doc = up.doc.clone();
        if transfer_id(&bytes) != up.id {
            self.actions.push_back(UploadAction::DropStaged);
            let text = "upload bytes do not match their id";
            return self.answer(error_msg(ErrorCode::BAD_TRANSFER, text, Some(doc)));
        }
        self.stage = Stage::Committing;
        self.actions.push_back(UploadAction::Commit(doc, bytes));
    }

    fn next_piece_or_bytes(&mut self) {
        if self.have < self.len() {
            self.stage = Stage::Receiving;
            self.actions.push_back(UploadAction::Read);
        } else {
            self.stage = Stage::Reading;
            self.actions.push_back(UploadAction::ReadBytes);
        }
    }

    /// Tells the device how many bytes the relay holds.
    fn offset(&mut self) {
        let id = self.up.as_ref().expect("opened").id;
        let have = self.have;
        self.send(Message::UploadOffset(UploadOffset { id, have }));
    }

    fn over_quota(&mut self, refusal: Message) {
        self.actions
            .push_back(UploadAction::QuotaRefused("staged_bytes_per_device"));
        self.answer(refusal);
    }

    /// A newer connection of this phone took the upload over.
    fn superseded(&mut self) {
        let doc = Some(self.doc());
        self.answer(error_msg(
            ErrorCode::BAD_TRANSFER,
            "a newer connection of this phone took this upload over",
            doc,
        ));
    }

    fn send(&mut self, msg: Message) {
        self.actions.push_back(UploadAction::Send(msg));
    }

    fn answer(&mut self, msg: Message) {
        self.stage = Stage::Over;
        self.actions.push_back(UploadAction::Answer(msg));
    }

    fn fail(&mut self, e: Error) {
        self.stage = Stage::Over;
        self.actions.push_back(UploadAction::Fail(e));
    }

    fn doc(&self) -> DocId {
        self.up.as_ref().expect("opened").doc.clone()
    }

    fn len(&self) -> u64 {
        self.up.as_ref().expect("opened").len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redline_proto::token::{Claims, Role, TokenId};
    use redline_proto::{Day, DeviceId, MemberId, TeamId};

    fn scope() -> Scope {
        Scope::new(Claims {
            id: TokenId([7; 16]),
            device: DeviceId::new("phone-1").unwrap(),
            member: MemberId::new("ana").unwrap(),
            role: Role::Volunteer,
            teams: vec![TeamId::new("t1").unwrap()],
            zones: vec![],
            issued: 0,
            expires: u64::MAX,
        })
    }

    fn limits() -> UploadLimits {
        UploadLimits {
            max_document_bytes: 1_000_000,
            staged_bytes_per_device: 100_000,
        }
    }

    fn doc(team: &str) -> DocId {
        DocId::ledger(
            &TeamId::new(team).unwrap(),
            &Day::new("2026-12-01").unwrap(),
        )
    }

    /// An upload of `bytes` to `team`'s day, naming `heads`.
    fn upload(team: &str, bytes: &[u8], heads: Vec<[u8; 32]>) -> Upload {
        Upload {
            id: transfer_id(bytes),
            doc: doc(team),
            len: bytes.len() as u64,
            document: false,
            heads,
        }
    }

    fn piece(bytes: &[u8], offset: usize, n: usize) -> UploadInput {
        UploadInput::Message(Message::Piece(Piece {
            id: transfer_id(bytes),
            offset: offset as u64,
            data: bytes[offset..offset + n].to_vec(),
        }))
    }

    fn actions(s: &mut UploadStream) -> Vec<UploadAction> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    /// The last action, which must end the stream with a message: the message.
    fn answered(actions: &[UploadAction]) -> &Message {
        match actions.last() {
            Some(UploadAction::Answer(m)) => m,
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    fn code(m: &Message) -> Option<ErrorCode> {
        match m {
            Message::Error(e) => Some(e.code),
            _ => None,
        }
    }

    fn offsets(actions: &[UploadAction]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                UploadAction::Send(Message::UploadOffset(o)) => Some(o.have),
                _ => None,
            })
            .collect()
    }

    /// A stream fed `opening` as its first message, and what it does then.
    fn started(opening: UploadInput) -> (UploadStream, Vec<UploadAction>) {
        let mut s = UploadStream::new(scope(), limits());
        assert!(matches!(s.poll_action(), Some(UploadAction::Read)));
        s.handle(opening);
        let first = actions(&mut s);
        (s, first)
    }

    fn named(up: Upload) -> UploadInput {
        UploadInput::Message(Message::Upload(up))
    }

    /// An opened stream whose upload was taken over with `have` and `staged` bytes.
    fn opened(up: Upload, have: u64, staged: u64) -> (UploadStream, Vec<UploadAction>) {
        let (mut s, first) = started(named(up));
        assert!(
            matches!(first.last(), Some(UploadAction::Take(_))),
            "{first:?}"
        );
        s.handle(UploadInput::Taken { have, staged });
        let after = actions(&mut s);
        (s, after)
    }

    #[test]
    fn an_upload_is_staged_piece_by_piece_each_flushed_before_its_offset() {
        let bytes = vec![5u8; 2_500];
        let (mut s, a) = opened(upload("t1", &bytes, vec![]), 0, 0);
        assert_eq!(offsets(&a), vec![0]);
        assert!(matches!(a.last(), Some(UploadAction::Read)));
        for at in [0, 1_000, 2_000] {
            let n = (bytes.len() - at).min(1_000);
            s.handle(piece(&bytes, at, n));
            let a = actions(&mut s);
            assert!(matches!(&a[..], [UploadAction::Stage { offset, .. }] if *offset == at as u64));
            s.handle(UploadInput::Staged(Staged::Stored));
            let a = actions(&mut s);
            assert!(
                matches!(&a[..], [UploadAction::Flush]),
                "no offset before the flush"
            );
            s.handle(UploadInput::Flushed);
            let a = actions(&mut s);
            assert_eq!(offsets(&a), vec![(at + n) as u64]);
        }
        s.handle(UploadInput::Bytes(Some(bytes.clone())));
        let a = actions(&mut s);
        assert!(matches!(&a[..], [UploadAction::Commit(_, b)] if *b == bytes));
        let ack = Message::Ack(Ack {
            doc: doc("t1"),
            heads: vec![],
            applied: 3,
        });
        s.handle(UploadInput::Committed(ack.clone()));
        let a = actions(&mut s);
        assert!(matches!(a[0], UploadAction::DropStaged));
        assert_eq!(answered(&a), &ack);
        assert!(s.poll_action().is_none());
    }

    #[test]
    fn a_resumed_upload_starts_at_what_the_relay_holds_and_a_whole_one_is_not_read() {
        let bytes = vec![1u8; 3_000];
        let (mut s, a) = opened(upload("t1", &bytes, vec![]), 2_000, 2_000);
        assert_eq!(offsets(&a), vec![2_000]);
        // A piece from before the offset is out of place: the stream is cut.
        s.handle(piece(&bytes, 1_000, 1_000));
        let a = actions(&mut s);
        assert!(matches!(&a[0], UploadAction::Send(m) if code(m) == Some(ErrorCode::BAD_TRANSFER)));
        assert!(matches!(a.last(), Some(UploadAction::Fail(_))));
        // Everything held already: straight to the bytes.
        let (_, a) = opened(upload("t1", &bytes, vec![]), 3_000, 3_000);
        assert_eq!(offsets(&a), vec![3_000]);
        assert!(matches!(a.last(), Some(UploadAction::ReadBytes)));
    }

    #[test]
    fn refusals_before_any_piece() {
        let bytes = vec![1u8; 10];
        // Another team's document.
        let (_, a) = started(named(upload("t2", &bytes, vec![])));
        assert_eq!(code(answered(&a)), Some(ErrorCode::FORBIDDEN));
        assert_eq!(a.len(), 1, "nothing remembered, nothing taken: {a:?}");
        // Too large.
        let mut big = upload("t1", &bytes, vec![]);
        big.len = 1_000_001;
        let (_, a) = started(named(big));
        assert_eq!(code(answered(&a)), Some(ErrorCode::TOO_LARGE));
        // Not an upload first.
        let (_, a) = started(piece(&bytes, 0, 10));
        assert!(
            matches!(&a[0], UploadAction::Send(m) if code(m) == Some(ErrorCode::PROTOCOL_VIOLATION))
        );
        assert!(matches!(a.last(), Some(UploadAction::Fail(_))));
        // Over the device's quota with what it has staged already.
        let (_, a) = opened(upload("t1", &vec![1u8; 60_000], vec![]), 0, 50_000);
        assert!(matches!(
            a[0],
            UploadAction::QuotaRefused("staged_bytes_per_device")
        ));
        assert_eq!(code(answered(&a)), Some(ErrorCode::QUOTA_EXCEEDED));
    }

    #[test]
    fn an_upload_committed_before_is_acknowledged_without_pieces() {
        let bytes = vec![1u8; 10];
        let hash = [9u8; 32];
        let (mut s, a) = started(named(upload("t1", &bytes, vec![hash])));
        let heads = vec![ChangeHash(hash)];
        assert!(matches!(&a[0], UploadAction::DeviceHolds(_, h) if *h == heads));
        assert!(matches!(&a[1], UploadAction::CheckHeld(_, h) if *h == heads));
        s.handle(UploadInput::Held {
            all: true,
            heads: heads.clone(),
        });
        match answered(&actions(&mut s)) {
            Message::Ack(ack) => assert_eq!(ack.heads, vec![hash]),
            other => panic!("expected an ack, got {other:?}"),
        }
        // Not all of it held: the upload goes on.
        let (mut s, _) = started(named(upload("t1", &bytes, vec![hash])));
        s.handle(UploadInput::Held { all: false, heads });
        assert!(matches!(&actions(&mut s)[..], [UploadAction::Take(_)]));
    }

    #[test]
    fn a_newer_stream_or_the_quota_ends_the_upload_mid_way() {
        let bytes = vec![1u8; 2_000];
        for (staged, quota) in [(Staged::Superseded, false), (Staged::OverQuota, true)] {
            let (mut s, _) = opened(upload("t1", &bytes, vec![]), 0, 0);
            s.handle(piece(&bytes, 0, 1_000));
            actions(&mut s);
            s.handle(UploadInput::Staged(staged));
            let a = actions(&mut s);
            assert_eq!(
                matches!(a[0], UploadAction::QuotaRefused(_)),
                quota,
                "{a:?}"
            );
            let want = if quota {
                ErrorCode::QUOTA_EXCEEDED
            } else {
                ErrorCode::BAD_TRANSFER
            };
            assert_eq!(code(answered(&a)), Some(want));
        }
        // Taken over between the last piece and reading the bytes.
        let (mut s, _) = opened(upload("t1", &bytes, vec![]), 2_000, 2_000);
        s.handle(UploadInput::Bytes(None));
        assert_eq!(
            code(answered(&actions(&mut s))),
            Some(ErrorCode::BAD_TRANSFER)
        );
    }

    #[test]
    fn a_stream_of_a_stale_connection_takes_nothing_and_is_answered_why() {
        let bytes = vec![1u8; 2_000];
        let (mut s, _) = started(named(upload("t1", &bytes, vec![])));
        s.handle(UploadInput::Stale);
        let a = actions(&mut s);
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(code(answered(&a)), Some(ErrorCode::BAD_TRANSFER));
    }

    #[test]
    fn bytes_that_are_not_what_the_upload_named_are_refused_and_dropped() {
        let bytes = vec![1u8; 100];
        let (mut s, _) = opened(upload("t1", &bytes, vec![]), 100, 100);
        s.handle(UploadInput::Bytes(Some(vec![2u8; 100])));
        let a = actions(&mut s);
        assert!(matches!(a[0], UploadAction::DropStaged));
        assert_eq!(code(answered(&a)), Some(ErrorCode::BAD_TRANSFER));
    }

    #[test]
    fn a_stream_that_ends_mid_upload_is_cut() {
        let bytes = vec![1u8; 2_000];
        let (mut s, _) = opened(upload("t1", &bytes, vec![]), 0, 0);
        s.handle(UploadInput::Ended(None));
        assert!(matches!(&actions(&mut s)[..], [UploadAction::Fail(_)]));
        // An opening frame that cannot be read is answered with why.
        let (_, a) = started(UploadInput::Ended(Some((
            ErrorCode::TOO_LARGE,
            "frame".into(),
        ))));
        assert!(matches!(&a[0], UploadAction::Send(m) if code(m) == Some(ErrorCode::TOO_LARGE)));
        assert!(matches!(a.last(), Some(UploadAction::Fail(_))));
    }
}
