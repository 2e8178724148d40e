//! Sans-IO fallback sessions: Automerge's own sync protocol for documents whose
//! knowledge is stale on one side (a new device without a cursor is *not* stale; a
//! restored backup, or a relay restored from an older copy, is).
//!
//! Like `quinn-proto`, these types never touch a socket, a clock or a disk. The driver
//! feeds received [`Message`]s in with `handle_message`, drains messages to send with
//! `poll_transmit` and events with `poll_event`, and does the I/O.
//!
//! The exchange per document is strictly alternating, device first:
//!
//! ```text
//! device                                  relay
//!   Sync{doc, data?} -------------------> apply, flush to disk
//!        <------------------------------- Ack{doc, heads, applied}
//!        <------------------------------- Sync{doc, reply?}
//!   ... until a round where neither side had anything to say
//! ```
//!
//! Several documents are in flight at once; each alternates on its own. The relay
//! acknowledges only what it has flushed: the driver calls [`RelayResync::apply`], writes
//! the document durably, and only then [`RelayResync::respond`], which queues the [`Ack`].

use std::collections::{BTreeMap, HashMap, VecDeque};

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, ChangeHash};

use crate::Error;
use crate::ids::DocId;
use crate::message::{Ack, ErrorCode, ErrorReport, Hello, Message, SyncStep};

/// Upper bound on rounds for one document in one session. Automerge's protocol settles in
/// two or three; more means the peers disagree about something they cannot fix.
pub const DEFAULT_MAX_ROUNDS: u32 = 32;

/// Checks a device's [`Hello`] for a relay speaking up to `ours`: the version must be one
/// the relay serves, and the subscription may list at most
/// [`MAX_SUBSCRIBED_DOCS`](crate::message::MAX_SUBSCRIBED_DOCS) documents. Returns the
/// version both will speak.
pub fn check_hello(hello: &Hello, ours: u16) -> Result<u16, Error> {
    let version = crate::message::negotiate(hello.protocol_version, ours)?;
    hello.subscription.check_size()?;
    Ok(version)
}

fn decode_sync(doc: &DocId, data: &[u8]) -> Result<sync::Message, Error> {
    sync::Message::decode(data).map_err(|e| Error::BadSyncData {
        doc: doc.clone(),
        reason: e.to_string(),
    })
}

/// Change hashes in their wire form.
pub fn hashes_to_wire(heads: &[ChangeHash]) -> Vec<[u8; 32]> {
    heads.iter().map(|h| h.0).collect()
}

/// Change hashes from their wire form.
pub fn hashes_from_wire(heads: &[[u8; 32]]) -> Vec<ChangeHash> {
    heads.iter().map(|h| ChangeHash(*h)).collect()
}

/// A document handed to a [`DeviceResync`]: the device's copy and its sync state.
#[derive(Debug)]
pub struct DocToSync {
    /// Which document.
    pub id: DocId,
    /// The device's copy; the session applies what the relay sends to it.
    pub doc: Automerge,
    /// Automerge sync state for this document and this relay (may be fresh).
    pub state: sync::State,
}

/// A document after the session: the updated copy and what happened to it.
#[derive(Debug)]
pub struct SyncedDoc {
    /// Which document.
    pub id: DocId,
    /// The device's copy, now holding what the relay sent.
    pub doc: Automerge,
    /// Sync state to persist for the next session.
    pub state: sync::State,
    /// The relay's durable heads from its last acknowledgement, if one arrived.
    pub acked_heads: Option<Vec<ChangeHash>>,
    /// Changes the relay reported as new to it.
    pub changes_sent: u64,
    /// Changes received from the relay.
    pub changes_received: u64,
    /// Whether the exchange completed (both sides had nothing more to say).
    pub settled: bool,
    /// The relay's error for this document, if it refused it.
    pub error: Option<ErrorReport>,
}

#[derive(Debug)]
struct Exchange {
    doc: Automerge,
    state: sync::State,
    heads_before: Vec<ChangeHash>,
    rounds: u32,
    awaiting_reply: bool,
    settled: bool,
    acked: Option<Vec<ChangeHash>>,
    changes_sent: u64,
    error: Option<ErrorReport>,
}

impl Exchange {
    fn finished(&self) -> bool {
        self.settled || self.error.is_some()
    }
}

/// The device's side of Automerge-sync exchanges for some documents.
#[derive(Debug)]
pub struct DeviceResync {
    docs: BTreeMap<DocId, Exchange>,
    outbox: VecDeque<Message>,
    max_rounds: u32,
}

impl DeviceResync {
    /// Starts exchanges for `docs`; their first steps are queued at once.
    pub fn new(docs: Vec<DocToSync>) -> Result<Self, Error> {
        let mut this = Self {
            docs: BTreeMap::new(),
            outbox: VecDeque::new(),
            max_rounds: DEFAULT_MAX_ROUNDS,
        };
        for d in docs {
            this.add(d)?;
        }
        Ok(this)
    }

    /// Adds a document mid-session (a `Resync` from the relay, or missing dependencies
    /// found locally) and queues its first step. A document already in the session is
    /// left alone.
    pub fn add(&mut self, d: DocToSync) -> Result<(), Error> {
        if self.docs.contains_key(&d.id) {
            return Ok(());
        }
        let heads_before = d.doc.get_heads();
        let id = d.id.clone();
        self.docs.insert(
            d.id,
            Exchange {
                doc: d.doc,
                state: d.state,
                heads_before,
                rounds: 0,
                awaiting_reply: false,
                settled: false,
                acked: None,
                changes_sent: 0,
                error: None,
            },
        );
        self.step(&id, false)
    }

    /// Whether `doc` is part of this session.
    pub fn contains(&self, doc: &DocId) -> bool {
        self.docs.contains_key(doc)
    }

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.outbox.pop_front()
    }

    /// True once every document's exchange is complete and nothing is left to send.
    pub fn is_finished(&self) -> bool {
        self.outbox.is_empty() && self.docs.values().all(Exchange::finished)
    }

    /// Feeds a `Sync`, `Ack` or per-document `Error` for a document of this session.
    pub fn handle_message(&mut self, msg: Message) -> Result<(), Error> {
        match msg {
            Message::Error(report) => {
                let doc = report.doc.clone().ok_or_else(|| Error::Remote {
                    code: report.code,
                    text: report.text.clone(),
                })?;
                let ex = self.exchange(&doc)?;
                ex.error = Some(report);
                ex.awaiting_reply = false;
                Ok(())
            }
            Message::Ack(ack) => {
                let ex = self.exchange(&ack.doc)?;
                ex.acked = Some(hashes_from_wire(&ack.heads));
                ex.changes_sent += u64::from(ack.applied);
                Ok(())
            }
            Message::Sync(step) => self.receive_step(step),
            other => Err(Error::ProtocolViolation(format!(
                "resync got an unexpected {} message",
                other.kind()
            ))),
        }
    }

    fn exchange(&mut self, doc: &DocId) -> Result<&mut Exchange, Error> {
        self.docs.get_mut(doc).ok_or_else(|| {
            Error::ProtocolViolation(format!(
                "relay sent a message for {doc}, not in this session"
            ))
        })
    }

    fn receive_step(&mut self, step: SyncStep) -> Result<(), Error> {
        let ex = self.exchange(&step.doc)?;
        if !ex.awaiting_reply {
            return Err(Error::ProtocolViolation(format!(
                "relay sent a sync step for {} out of turn",
                step.doc
            )));
        }
        ex.awaiting_reply = false;
        let relay_said_something = step.data.is_some();
        if let Some(data) = step.data {
            let msg = decode_sync(&step.doc, &data)?;
            ex.doc
                .receive_sync_message(&mut ex.state, msg)
                .map_err(|e| Error::Automerge {
                    doc: step.doc.clone(),
                    reason: e.to_string(),
                })?;
        }
        self.step(&step.doc, relay_said_something)
    }

    /// Sends the next step for `id`, or marks it settled when neither side has more.
    fn step(&mut self, id: &DocId, relay_said_something: bool) -> Result<(), Error> {
        let max_rounds = self.max_rounds;
        let ex = self.docs.get_mut(id).expect("caller passes a known id");
        let next = ex.doc.generate_sync_message(&mut ex.state);
        // The first step always goes out (the relay may have news even if we have none).
        if next.is_none() && !relay_said_something && ex.rounds > 0 {
            ex.settled = true;
            return Ok(());
        }
        if ex.rounds >= max_rounds {
            return Err(Error::SyncDidNotSettle {
                doc: id.clone(),
                rounds: ex.rounds,
            });
        }
        ex.rounds += 1;
        ex.awaiting_reply = true;
        self.outbox.push_back(Message::Sync(SyncStep {
            doc: id.clone(),
            data: next.map(sync::Message::encode),
        }));
        Ok(())
    }

    /// Ends the session and hands the documents back.
    pub fn finish(self) -> Vec<SyncedDoc> {
        self.docs
            .into_iter()
            .map(|(id, ex)| {
                let changes_received = ex.doc.get_changes(&ex.heads_before).len() as u64;
                SyncedDoc {
                    id,
                    doc: ex.doc,
                    state: ex.state,
                    acked_heads: ex.acked,
                    changes_sent: ex.changes_sent,
                    changes_received,
                    settled: ex.settled,
                    error: ex.error,
                }
            })
            .collect()
    }
}

/// The outcome of [`RelayResync::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Changes new to the relay's copy. Zero means nothing needs writing.
    pub new_changes: u32,
}

/// The relay's side of Automerge-sync exchanges on one connection.
///
/// The relay never lets Automerge apply the changes a device's sync message carries:
/// the driver takes them out ([`take_changes`](Self::take_changes)), admits and commits
/// them like a push, and feeds the rest of the message to [`apply`](Self::apply).
/// Changes whose dependencies the relay lacks are parked here, per document and per
/// connection (never in the document), and the reply asks for what they need.
#[derive(Debug, Default)]
pub struct RelayResync {
    peers: HashMap<DocId, sync::State>,
    parked: HashMap<DocId, Vec<automerge::Change>>,
    outbox: VecDeque<Message>,
}

impl RelayResync {
    /// No exchanges yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.outbox.pop_front()
    }

    /// Decodes a device's sync step.
    pub fn decode(step: &SyncStep) -> Result<Option<sync::Message>, Error> {
        step.data
            .as_deref()
            .map(|d| decode_sync(&step.doc, d))
            .transpose()
    }

    /// Applies a device's sync message to the relay's copy of `doc_id`. Nothing is
    /// acknowledged yet: persist the document if [`Applied::new_changes`] is not zero,
    /// then call [`respond`](Self::respond).
    pub fn apply(
        &mut self,
        doc_id: &DocId,
        doc: &mut Automerge,
        message: Option<sync::Message>,
    ) -> Result<Applied, Error> {
        let state = self.peers.entry(doc_id.clone()).or_default();
        let Some(message) = message else {
            return Ok(Applied { new_changes: 0 });
        };
        let before = doc.get_heads();
        doc.receive_sync_message(state, message)
            .map_err(|e| Error::Automerge {
                doc: doc_id.clone(),
                reason: e.to_string(),
            })?;
        let new_changes = if doc.get_heads() == before {
            0
        } else {
            u32::try_from(doc.get_changes(&before).len()).unwrap_or(u32::MAX)
        };
        Ok(Applied { new_changes })
    }

    /// Queues the [`Ack`] (the caller has made `doc` durable) and the relay's next step.
    pub fn respond(&mut self, doc_id: &DocId, doc: &Automerge, applied: Applied) {
        self.respond_with(doc_id, doc, applied, Vec::new());
    }

    /// Like [`respond`](Self::respond), asking the device for `need` as well (the
    /// dependencies of changes parked in this session).
    ///
    /// The relay's messages carry no capability flags: a device then keeps to version 1
    /// messages, which carry changes one by one and never a whole document.
    pub fn respond_with(
        &mut self,
        doc_id: &DocId,
        doc: &Automerge,
        applied: Applied,
        need: Vec<ChangeHash>,
    ) {
        let state = self.peers.entry(doc_id.clone()).or_default();
        self.outbox.push_back(Message::Ack(Ack {
            doc: doc_id.clone(),
            heads: hashes_to_wire(&doc.get_heads()),
            applied: applied.new_changes,
        }));
        let mut reply = doc.generate_sync_message(state);
        if !need.is_empty() {
            let r = reply.get_or_insert_with(|| sync::Message {
                heads: doc.get_heads(),
                need: Vec::new(),
                have: Vec::new(),
                changes: sync::ChunkList::empty(),
                flags: None,
                version: sync::MessageVersion::V1,
            });
            r.need.extend(need);
            // The encoding requires them sorted (Automerge asserts it: an unsorted list
            // would panic the relay on a device's input).
            r.need.sort();
            r.need.dedup();
        }
        if let Some(r) = reply.as_mut() {
            r.flags = None;
        }
        self.outbox.push_back(Message::Sync(SyncStep {
            doc: doc_id.clone(),
            data: reply.map(sync::Message::encode),
        }));
    }

    /// Takes the changes out of a device's sync message, leaving the rest (heads,
    /// needs, bloom filters) for [`apply`](Self::apply). Each item is one or more
    /// concatenated Automerge chunks.
    pub fn take_changes(message: &mut sync::Message) -> Vec<Vec<u8>> {
        let chunks = message.changes.iter().map(<[u8]>::to_vec).collect();
        message.changes = sync::ChunkList::empty();
        chunks
    }

    /// Changes of `doc` parked earlier in this session (waiting for dependencies).
    pub fn take_parked(&mut self, doc: &DocId) -> Vec<automerge::Change> {
        self.parked.remove(doc).unwrap_or_default()
    }

    /// Parks changes of `doc` whose dependencies the relay lacks, until the device sends
    /// them. The caller bounds how many (they count against the per-message limit).
    pub fn park(&mut self, doc: &DocId, changes: Vec<automerge::Change>) {
        self.parked.insert(doc.clone(), changes);
    }

    /// Queues an error report for the device about `doc`; its exchange starts afresh.
    pub fn report(&mut self, code: ErrorCode, text: String, doc: DocId) {
        self.peers.remove(&doc);
        self.parked.remove(&doc);
        self.outbox.push_back(Message::Error(ErrorReport {
            code,
            text,
            doc: Some(doc),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::DeviceId;
    use automerge::transaction::Transactable;
    use automerge::{ActorId, ObjType, ROOT, ReadDoc};

    fn doc_with(actor: u8, key: &str, value: i64) -> Automerge {
        let mut doc = Automerge::new().with_actor(ActorId::from([actor; 16]));
        let mut tx = doc.transaction();
        tx.put(ROOT, key, value).unwrap();
        tx.commit();
        doc
    }

    /// Runs a device resync against a relay resync until quiet.
    fn run(
        docs: Vec<(DocId, Automerge)>,
        relay_docs: &mut HashMap<DocId, Automerge>,
    ) -> (Vec<SyncedDoc>, usize) {
        let docs = docs
            .into_iter()
            .map(|(id, doc)| DocToSync {
                id,
                doc,
                state: sync::State::new(),
            })
            .collect();
        let mut device = DeviceResync::new(docs).unwrap();
        let mut relay = RelayResync::new();
        let mut messages = 0;
        loop {
            let mut progressed = false;
            while let Some(m) = device.poll_transmit() {
                progressed = true;
                messages += 1;
                let Message::Sync(step) = m else {
                    panic!("device sent {m:?}")
                };
                let msg = RelayResync::decode(&step).unwrap();
                let d = relay_docs.entry(step.doc.clone()).or_default();
                let applied = relay.apply(&step.doc, d, msg).unwrap();
                relay.respond(&step.doc, d, applied);
            }
            while let Some(m) = relay.poll_transmit() {
                progressed = true;
                messages += 1;
                device.handle_message(m).unwrap();
            }
            if !progressed {
                break;
            }
        }
        assert!(
            device.is_finished(),
            "session stopped before every document settled"
        );
        (device.finish(), messages)
    }

    #[test]
    fn two_devices_converge_through_a_relay() {
        let id = DocId::parse("ledger/t1/2026-11-29").unwrap();
        let mut relay = HashMap::new();
        let (a, _) = run(vec![(id.clone(), doc_with(1, "a", 1))], &mut relay);
        assert_eq!(a[0].changes_sent, 1);
        assert_eq!(
            a[0].acked_heads.as_deref(),
            Some(relay[&id].get_heads().as_slice())
        );
        let (b, _) = run(vec![(id.clone(), doc_with(2, "b", 2))], &mut relay);
        assert_eq!((b[0].changes_sent, b[0].changes_received), (1, 1));
        let (a2, _) = run(
            vec![(id.clone(), a.into_iter().next().unwrap().doc)],
            &mut relay,
        );
        assert_eq!(a2[0].changes_received, 1);
        assert_eq!(a2[0].doc.get_heads(), b[0].doc.get_heads());
        assert_eq!(a2[0].doc.get_heads(), relay[&id].get_heads());
        for d in [&a2[0].doc, &b[0].doc] {
            assert!(d.get(ROOT, "a").unwrap().is_some() && d.get(ROOT, "b").unwrap().is_some());
        }
    }

    #[test]
    fn many_documents_share_one_session() {
        let ids: Vec<DocId> = (0..20)
            .map(|i| DocId::parse(&format!("households/z{i}")).unwrap())
            .collect();
        let mut relay = HashMap::new();
        let (out, _) = run(
            ids.iter()
                .map(|id| (id.clone(), doc_with(3, "x", 1)))
                .collect(),
            &mut relay,
        );
        assert_eq!(out.len(), 20);
        assert!(out.iter().all(|d| d.settled && d.changes_sent == 1));
        assert_eq!(relay.len(), 20);
    }

    #[test]
    fn in_sync_documents_settle_quickly() {
        let id = DocId::parse("roster/org").unwrap();
        let mut relay = HashMap::new();
        let doc = doc_with(4, "k", 1);
        relay.insert(id.clone(), doc.clone());
        let (out, messages) = run(vec![(id.clone(), doc)], &mut relay);
        assert!(out[0].settled);
        assert_eq!((out[0].changes_sent, out[0].changes_received), (0, 0));
        assert!(
            messages <= 8,
            "{messages} messages for a document already in sync"
        );
    }

    #[test]
    fn a_reply_asking_for_many_missing_changes_encodes() {
        let id = DocId::parse("ledger/t/2026-01-01").unwrap();
        let doc = doc_with(5, "k", 1);
        let mut relay = RelayResync::new();
        // Hashes in no particular order, one twice: the reply must still encode.
        let need: Vec<ChangeHash> = [9u8, 3, 7, 3, 1]
            .iter()
            .map(|b| ChangeHash([*b; 32]))
            .collect();
        relay.respond_with(&id, &doc, Applied { new_changes: 0 }, need);
        let _ack = relay.poll_transmit().unwrap();
        let Some(Message::Sync(SyncStep {
            data: Some(data), ..
        })) = relay.poll_transmit()
        else {
            panic!("no sync reply")
        };
        let reply = sync::Message::decode(&data).unwrap();
        assert_eq!(reply.need.len(), 4);
        assert!(reply.need.windows(2).all(|w| w[0] < w[1]));
        assert!(reply.flags.is_none(), "no capability flags from the relay");
    }

    #[test]
    fn garbage_sync_data_is_refused() {
        let step = SyncStep {
            doc: DocId::parse("roster/o").unwrap(),
            data: Some(vec![0x42, 0xff, 0xff]),
        };
        assert!(matches!(
            RelayResync::decode(&step),
            Err(Error::BadSyncData { .. })
        ));
    }

    #[test]
    fn versions_are_negotiated_down_and_too_old_devices_refused() {
        let hello = |v| Hello {
            protocol_version: v,
            device: DeviceId::new("f").unwrap(),
            app_version: String::new(),
            subscription: Default::default(),
            token: String::new(),
        };
        use crate::message::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
        assert_eq!(
            check_hello(&hello(99), PROTOCOL_VERSION).unwrap(),
            PROTOCOL_VERSION
        );
        assert_eq!(check_hello(&hello(1), PROTOCOL_VERSION).unwrap(), 1);
        assert_eq!(check_hello(&hello(2), 1).unwrap(), 1, "a relay pinned to 1");
        let e = check_hello(&hello(MIN_PROTOCOL_VERSION - 1), PROTOCOL_VERSION).unwrap_err();
        assert!(matches!(e, Error::UnsupportedVersion { theirs: 0, .. }));
        assert!(e.to_string().contains("update the app"), "{e}");
    }

    #[test]
    fn counters_from_two_devices_sum() {
        let id = DocId::parse("ledger/t/2026-01-01").unwrap();
        let mut genesis = Automerge::new().with_actor(ActorId::from([0u8; 16]));
        let mut tx = genesis.transaction();
        let t = tx.put_object(ROOT, "tallies", ObjType::Map).unwrap();
        tx.put(&t, "samples", automerge::ScalarValue::counter(0))
            .unwrap();
        tx.commit();
        let bump = |actor: u8, by: i64| {
            let mut d = genesis.fork().with_actor(ActorId::from([actor; 16]));
            let mut tx = d.transaction();
            let (_, t) = tx.get(ROOT, "tallies").unwrap().unwrap();
            tx.increment(&t, "samples", by).unwrap();
            tx.commit();
            d
        };
        let mut relay = HashMap::new();
        run(vec![(id.clone(), bump(1, 3))], &mut relay);
        let (b, _) = run(vec![(id.clone(), bump(2, 4))], &mut relay);
        let (_, t) = b[0].doc.get(ROOT, "tallies").unwrap().unwrap();
        assert_eq!(
            b[0].doc.get(&t, "samples").unwrap().unwrap().0.as_i64(),
            Some(7)
        );
    }
}
