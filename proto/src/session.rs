//! Sans-IO sync sessions: the per-document exchange on one stream, for both ends.
//!
//! Like `quinn-proto`, these types never touch a socket, a clock or a disk. The driver
//! (the QUIC client in `redline-client`, the relay in `redline-server`) feeds received
//! [`Message`]s in with `handle_message`, drains messages to send with `poll_transmit`
//! and events with `poll_event`, and does the I/O.
//!
//! The exchange per document is strictly alternating, device first:
//!
//! ```text
//! device                                  relay
//!   Hello ------------------------------->
//!        <------------------------------- Welcome
//!   Sync{doc, data?} -------------------> apply, flush to disk
//!        <------------------------------- Ack{doc, heads, applied}
//!        <------------------------------- Sync{doc, reply?}
//!   ... until a round where neither side had anything to say
//! ```
//!
//! Several documents are in flight at once on the same stream; each alternates on its
//! own. The relay acknowledges only what it has flushed: the driver calls
//! [`RelaySession::apply`], writes the document durably, and only then
//! [`RelaySession::respond`], which queues the [`Ack`].

use std::collections::{BTreeMap, HashMap, VecDeque};

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, ChangeHash};

use crate::Error;
use crate::ids::{DeviceId, DocId};
use crate::message::{
    Ack, ErrorCode, ErrorReport, Hello, Message, PROTOCOL_VERSION, SyncStep, Welcome,
};

/// Upper bound on rounds for one document in one session. Automerge's protocol settles in
/// two or three; more means the peers disagree about something they cannot fix.
pub const DEFAULT_MAX_ROUNDS: u32 = 32;

fn decode_sync(doc: &DocId, data: &[u8]) -> Result<sync::Message, Error> {
    sync::Message::decode(data).map_err(|e| Error::BadSyncData {
        doc: doc.clone(),
        reason: e.to_string(),
    })
}

fn hashes_to_wire(heads: &[ChangeHash]) -> Vec<[u8; 32]> {
    heads.iter().map(|h| h.0).collect()
}

/// A document handed to a [`ClientSession`]: the device's copy and what it knows of the
/// relay's copy.
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

/// What a [`ClientSession`] tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The relay accepted the device.
    Welcomed {
        /// The relay's name.
        relay: String,
    },
    /// The relay holds these heads of the document on disk.
    Acked {
        /// Which document.
        doc: DocId,
        /// The relay's durable heads.
        heads: Vec<ChangeHash>,
    },
    /// Changes from the relay were applied to the device's copy.
    Updated {
        /// Which document.
        doc: DocId,
    },
    /// The exchange for a document is complete.
    Settled {
        /// Which document.
        doc: DocId,
    },
    /// The relay refused a document; the others carry on.
    Refused {
        /// Which document.
        doc: DocId,
        /// The relay's reason.
        report: ErrorReport,
    },
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

#[derive(Debug, PartialEq, Eq)]
enum ClientPhase {
    AwaitingWelcome,
    Syncing,
}

/// The device's side of one sync session on one stream.
#[derive(Debug)]
pub struct ClientSession {
    phase: ClientPhase,
    docs: BTreeMap<DocId, Exchange>,
    outbox: VecDeque<Message>,
    events: VecDeque<ClientEvent>,
    max_rounds: u32,
}

impl ClientSession {
    /// Starts a session: queues the [`Hello`]; the documents' first steps follow the
    /// relay's [`Welcome`].
    pub fn new(device: DeviceId, app_version: String, docs: Vec<DocToSync>) -> Self {
        let mut outbox = VecDeque::new();
        outbox.push_back(Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            device,
            app_version,
        }));
        let docs = docs
            .into_iter()
            .map(|d| {
                let heads_before = d.doc.get_heads();
                let ex = Exchange {
                    doc: d.doc,
                    state: d.state,
                    heads_before,
                    rounds: 0,
                    awaiting_reply: false,
                    settled: false,
                    acked: None,
                    changes_sent: 0,
                    error: None,
                };
                (d.id, ex)
            })
            .collect();
        Self {
            phase: ClientPhase::AwaitingWelcome,
            docs,
            outbox,
            events: VecDeque::new(),
            max_rounds: DEFAULT_MAX_ROUNDS,
        }
    }

    /// Overrides the per-document round limit.
    pub fn with_max_rounds(mut self, max_rounds: u32) -> Self {
        self.max_rounds = max_rounds;
        self
    }

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.outbox.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Documents in this session.
    pub fn docs_total(&self) -> usize {
        self.docs.len()
    }

    /// Documents whose exchange is complete (settled or refused).
    pub fn docs_finished(&self) -> usize {
        self.docs.values().filter(|e| e.finished()).count()
    }

    /// True once every document's exchange is complete and nothing is left to send.
    pub fn is_finished(&self) -> bool {
        self.phase == ClientPhase::Syncing
            && self.outbox.is_empty()
            && self.docs.values().all(Exchange::finished)
    }

    /// Feeds one message from the relay.
    pub fn handle_message(&mut self, msg: Message) -> Result<(), Error> {
        match (&self.phase, msg) {
            (ClientPhase::AwaitingWelcome, Message::Welcome(w)) => {
                if w.protocol_version != PROTOCOL_VERSION {
                    return Err(Error::UnsupportedVersion {
                        theirs: w.protocol_version,
                        ours: PROTOCOL_VERSION,
                    });
                }
                self.phase = ClientPhase::Syncing;
                self.events
                    .push_back(ClientEvent::Welcomed { relay: w.relay });
                let ids: Vec<DocId> = self.docs.keys().cloned().collect();
                for id in ids {
                    self.step(&id, false)?;
                }
                Ok(())
            }
            (_, Message::Error(report)) => match report.doc.clone() {
                Some(doc) if self.docs.contains_key(&doc) => {
                    let ex = self.docs.get_mut(&doc).expect("checked above");
                    ex.error = Some(report.clone());
                    ex.awaiting_reply = false;
                    self.events.push_back(ClientEvent::Refused { doc, report });
                    Ok(())
                }
                _ => Err(Error::Remote {
                    code: report.code,
                    text: report.text,
                }),
            },
            (ClientPhase::Syncing, Message::Ack(ack)) => {
                let ex = self.exchange(&ack.doc)?;
                let heads: Vec<ChangeHash> = ack.heads.iter().map(|h| ChangeHash(*h)).collect();
                ex.acked = Some(heads.clone());
                ex.changes_sent += u64::from(ack.applied);
                self.events.push_back(ClientEvent::Acked {
                    doc: ack.doc,
                    heads,
                });
                Ok(())
            }
            (ClientPhase::Syncing, Message::Sync(step)) => self.receive_step(step),
            (_, other) => Err(Error::ProtocolViolation(format!(
                "device received an unexpected {} message",
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
            let before = ex.doc.get_heads();
            ex.doc
                .receive_sync_message(&mut ex.state, msg)
                .map_err(|e| Error::Automerge {
                    doc: step.doc.clone(),
                    reason: e.to_string(),
                })?;
            if ex.doc.get_heads() != before {
                self.events.push_back(ClientEvent::Updated {
                    doc: step.doc.clone(),
                });
            }
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
            self.events
                .push_back(ClientEvent::Settled { doc: id.clone() });
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

/// What a [`RelaySession`] asks its driver to do.
#[derive(Debug)]
pub enum RelayEvent {
    /// A device introduced itself; the [`Welcome`] is queued.
    DeviceHello {
        /// Which device.
        device: DeviceId,
        /// Its app version.
        app_version: String,
    },
    /// A sync step for a document: load it, [`RelaySession::apply`], persist, then
    /// [`RelaySession::respond`].
    SyncStep {
        /// Which document.
        doc: DocId,
        /// The decoded Automerge sync message, if the device sent one.
        message: Option<sync::Message>,
    },
}

/// The outcome of [`RelaySession::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Changes new to the relay's copy. Zero means nothing needs writing.
    pub new_changes: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum RelayPhase {
    AwaitingHello,
    Ready,
}

/// The relay's side of one sync session on one stream.
#[derive(Debug)]
pub struct RelaySession {
    relay: String,
    phase: RelayPhase,
    device: Option<DeviceId>,
    peers: HashMap<DocId, sync::State>,
    outbox: VecDeque<Message>,
}

impl RelaySession {
    /// A session for a stream just opened by a device; `relay` names this relay.
    pub fn new(relay: impl Into<String>) -> Self {
        Self {
            relay: relay.into(),
            phase: RelayPhase::AwaitingHello,
            device: None,
            peers: HashMap::new(),
            outbox: VecDeque::new(),
        }
    }

    /// The device, once it has said hello.
    pub fn device(&self) -> Option<&DeviceId> {
        self.device.as_ref()
    }

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.outbox.pop_front()
    }

    /// Feeds one message from the device. An `Err` means the stream must end; an
    /// [`ErrorReport`] for the device has been queued where one makes sense.
    pub fn handle_message(&mut self, msg: Message) -> Result<Option<RelayEvent>, Error> {
        let result = self.dispatch(msg);
        if let Err(e) = &result {
            self.report(e.code(), e.to_string(), e.doc().cloned());
        }
        result
    }

    fn dispatch(&mut self, msg: Message) -> Result<Option<RelayEvent>, Error> {
        match (&self.phase, msg) {
            (RelayPhase::AwaitingHello, Message::Hello(hello)) => {
                if hello.protocol_version != PROTOCOL_VERSION {
                    return Err(Error::UnsupportedVersion {
                        theirs: hello.protocol_version,
                        ours: PROTOCOL_VERSION,
                    });
                }
                self.phase = RelayPhase::Ready;
                self.device = Some(hello.device.clone());
                self.outbox.push_back(Message::Welcome(Welcome {
                    protocol_version: PROTOCOL_VERSION,
                    relay: self.relay.clone(),
                }));
                Ok(Some(RelayEvent::DeviceHello {
                    device: hello.device,
                    app_version: hello.app_version,
                }))
            }
            (RelayPhase::Ready, Message::Sync(step)) => {
                let message = match step.data {
                    Some(data) => Some(decode_sync(&step.doc, &data)?),
                    None => None,
                };
                Ok(Some(RelayEvent::SyncStep {
                    doc: step.doc,
                    message,
                }))
            }
            (_, Message::Error(report)) => Err(Error::Remote {
                code: report.code,
                text: report.text,
            }),
            (phase, other) => Err(Error::ProtocolViolation(format!(
                "relay received an unexpected {} message {}",
                other.kind(),
                if *phase == RelayPhase::AwaitingHello {
                    "before hello"
                } else {
                    "after hello"
                }
            ))),
        }
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
        let state = self.peers.entry(doc_id.clone()).or_default();
        self.outbox.push_back(Message::Ack(Ack {
            doc: doc_id.clone(),
            heads: hashes_to_wire(&doc.get_heads()),
            applied: applied.new_changes,
        }));
        let reply = doc.generate_sync_message(state);
        self.outbox.push_back(Message::Sync(SyncStep {
            doc: doc_id.clone(),
            data: reply.map(sync::Message::encode),
        }));
    }

    /// Queues an error report for the device.
    pub fn report(&mut self, code: ErrorCode, text: String, doc: Option<DocId>) {
        if let Some(d) = &doc {
            // The device will start this document afresh next time.
            self.peers.remove(d);
        }
        self.outbox
            .push_back(Message::Error(ErrorReport { code, text, doc }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ActorId, ObjType, ROOT, ReadDoc};

    fn doc_with(actor: u8, key: &str, value: i64) -> Automerge {
        let mut doc = Automerge::new().with_actor(ActorId::from([actor; 16]));
        let mut tx = doc.transaction();
        tx.put(ROOT, key, value).unwrap();
        tx.commit();
        doc
    }

    /// Runs a device session against a relay session until quiet, the relay's documents
    /// in `relay_docs`. Returns the finished device docs and the number of messages.
    fn run(
        mut device: ClientSession,
        relay: &mut RelaySession,
        relay_docs: &mut HashMap<DocId, Automerge>,
    ) -> (Vec<SyncedDoc>, usize) {
        let mut messages = 0;
        loop {
            let mut progressed = false;
            while let Some(m) = device.poll_transmit() {
                progressed = true;
                messages += 1;
                if let Some(RelayEvent::SyncStep { doc, message }) =
                    relay.handle_message(m).unwrap()
                {
                    let d = relay_docs.entry(doc.clone()).or_default();
                    let applied = relay.apply(&doc, d, message).unwrap();
                    relay.respond(&doc, d, applied);
                }
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

    fn device(id: &str, docs: Vec<(DocId, Automerge)>) -> ClientSession {
        let docs = docs
            .into_iter()
            .map(|(id, doc)| DocToSync {
                id,
                doc,
                state: sync::State::new(),
            })
            .collect();
        ClientSession::new(DeviceId::new(id).unwrap(), "test".into(), docs)
    }

    #[test]
    fn two_devices_converge_through_a_relay() {
        let id = DocId::parse("ledger/t1/2026-11-29").unwrap();
        let mut relay = HashMap::new();
        let (a, _) = run(
            device("a", vec![(id.clone(), doc_with(1, "a", 1))]),
            &mut RelaySession::new("r"),
            &mut relay,
        );
        assert_eq!(a[0].changes_sent, 1);
        assert_eq!(
            a[0].acked_heads.as_deref(),
            Some(relay[&id].get_heads().as_slice())
        );
        let (b, _) = run(
            device("b", vec![(id.clone(), doc_with(2, "b", 2))]),
            &mut RelaySession::new("r"),
            &mut relay,
        );
        assert_eq!((b[0].changes_sent, b[0].changes_received), (1, 1));
        let (a2, _) = run(
            device("a", vec![(id.clone(), a.into_iter().next().unwrap().doc)]),
            &mut RelaySession::new("r"),
            &mut relay,
        );
        assert_eq!(a2[0].changes_received, 1);
        let (a_doc, b_doc) = (&a2[0].doc, &b[0].doc);
        assert_eq!(a_doc.get_heads(), b_doc.get_heads());
        assert_eq!(a_doc.get_heads(), relay[&id].get_heads());
        for d in [a_doc, b_doc] {
            assert!(d.get(ROOT, "a").unwrap().is_some() && d.get(ROOT, "b").unwrap().is_some());
        }
    }

    #[test]
    fn many_documents_share_one_session() {
        let ids: Vec<DocId> = (0..20)
            .map(|i| DocId::parse(&format!("households/z{i}")).unwrap())
            .collect();
        let mut relay = HashMap::new();
        let docs = ids
            .iter()
            .map(|id| (id.clone(), doc_with(3, "x", 1)))
            .collect();
        let (out, _) = run(device("c", docs), &mut RelaySession::new("r"), &mut relay);
        assert_eq!(out.len(), 20);
        assert!(out.iter().all(|d| d.settled && d.changes_sent == 1));
        assert_eq!(relay.len(), 20);
    }

    #[test]
    fn in_sync_documents_settle_in_one_round() {
        let id = DocId::parse("roster/org").unwrap();
        let mut relay = HashMap::new();
        let doc = doc_with(4, "k", 1);
        relay.insert(id.clone(), doc.clone());
        let (out, messages) = run(
            device("d", vec![(id.clone(), doc)]),
            &mut RelaySession::new("r"),
            &mut relay,
        );
        assert!(out[0].settled);
        assert_eq!((out[0].changes_sent, out[0].changes_received), (0, 0));
        assert!(
            messages <= 8,
            "{messages} messages for a document already in sync"
        );
    }

    #[test]
    fn sync_before_hello_is_refused_with_a_code() {
        let mut relay = RelaySession::new("r");
        let step = Message::Sync(SyncStep {
            doc: DocId::parse("roster/o").unwrap(),
            data: None,
        });
        assert!(matches!(
            relay.handle_message(step),
            Err(Error::ProtocolViolation(_))
        ));
        match relay.poll_transmit() {
            Some(Message::Error(r)) => assert_eq!(r.code, ErrorCode::PROTOCOL_VIOLATION),
            other => panic!("expected an error report, got {other:?}"),
        }
    }

    #[test]
    fn garbage_sync_data_is_refused_and_leaves_the_document_alone() {
        let mut relay = RelaySession::new("r");
        relay
            .handle_message(Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                device: DeviceId::new("e").unwrap(),
                app_version: String::new(),
            }))
            .unwrap();
        let id = DocId::parse("roster/o").unwrap();
        let step = Message::Sync(SyncStep {
            doc: id.clone(),
            data: Some(vec![0x42, 0xff, 0xff]),
        });
        assert!(matches!(
            relay.handle_message(step),
            Err(Error::BadSyncData { .. })
        ));
        let _welcome = relay.poll_transmit();
        match relay.poll_transmit() {
            Some(Message::Error(r)) => {
                assert_eq!(r.code, ErrorCode::BAD_DOCUMENT_DATA);
                assert_eq!(r.doc, Some(id));
            }
            other => panic!("expected an error report, got {other:?}"),
        }
    }

    #[test]
    fn wrong_protocol_version_is_refused() {
        let mut relay = RelaySession::new("r");
        let hello = Message::Hello(Hello {
            protocol_version: 99,
            device: DeviceId::new("f").unwrap(),
            app_version: String::new(),
        });
        assert!(matches!(
            relay.handle_message(hello),
            Err(Error::UnsupportedVersion { theirs: 99, .. })
        ));
        assert!(
            matches!(relay.poll_transmit(), Some(Message::Error(r)) if r.code == ErrorCode::UNSUPPORTED_VERSION)
        );
    }

    #[test]
    fn counters_from_two_devices_sum() {
        let id = DocId::parse("ledger/t/2026-01-01").unwrap();
        // Shared genesis: the same first change on both devices.
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
        run(
            device("a", vec![(id.clone(), bump(1, 3))]),
            &mut RelaySession::new("r"),
            &mut relay,
        );
        let (b, _) = run(
            device("b", vec![(id.clone(), bump(2, 4))]),
            &mut RelaySession::new("r"),
            &mut relay,
        );
        let (_, t) = b[0].doc.get(ROOT, "tallies").unwrap().unwrap();
        let v = b[0].doc.get(&t, "samples").unwrap().unwrap().0;
        assert_eq!(v.as_i64(), Some(7));
    }
}
