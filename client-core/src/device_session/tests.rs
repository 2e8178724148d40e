//! The device session driven directly: no QUIC, no store, no clock but the one fed in.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ChangeHash, ROOT};
use redline_proto::codec::{self, HEADER_LEN};
use redline_proto::message::{Ack, Cursor, Hello, Message, Payload, Subscription, Update, Welcome};
use redline_proto::session::hashes_to_wire;
use redline_proto::{DeviceId, DocId, PROTOCOL_VERSION};

use super::*;
use crate::{Error, Urgency};

/// A phone in memory: documents, what the relay is known to hold, every stored step.
#[derive(Default)]
struct Phone {
    docs: HashMap<DocId, Automerge>,
    relay_has: HashMap<DocId, Vec<ChangeHash>>,
    steps: Vec<Step>,
    hold: Option<String>,
    /// Calls of `merge_bytes`.
    merges: usize,
}

impl Phone {
    fn write(&mut self, id: &DocId, key: &str) {
        let doc = self
            .docs
            .entry(id.clone())
            .or_insert_with(|| Automerge::new().with_actor(ActorId::random()));
        let mut tx = doc.transaction();
        tx.put(ROOT, key, 1).expect("put");
        tx.commit();
    }

    fn cursors(&self) -> usize {
        self.steps.iter().filter(|s| s.cursor.is_some()).count()
    }
}

impl Documents for Phone {
    fn relay_held(&self) -> Result<HashMap<DocId, Vec<ChangeHash>>, Error> {
        Ok(self
            .docs
            .keys()
            .map(|id| {
                (
                    id.clone(),
                    self.relay_has.get(id).cloned().unwrap_or_default(),
                )
            })
            .collect())
    }

    fn ids(&self) -> Result<Vec<DocId>, Error> {
        Ok(self.docs.keys().cloned().collect())
    }

    fn heads(&mut self, id: &DocId) -> Result<Option<Vec<ChangeHash>>, Error> {
        Ok(self.docs.get(id).map(|d| d.get_heads()))
    }

    fn outgoing(
        &mut self,
        id: &DocId,
        relay_has: &[ChangeHash],
        _heads: &[ChangeHash],
    ) -> Result<Option<Outgoing>, Error> {
        let doc = &self.docs[id];
        let hashes: Vec<ChangeHash> = doc
            .get_changes(relay_has)
            .iter()
            .map(|c| c.hash())
            .collect();
        let changes = hashes.len() as u64;
        let bundle = doc.bundle(hashes).expect("bundle");
        Ok(Some(Outgoing {
            bytes: Arc::new(bundle.bytes().to_vec()),
            changes,
            urgency: Urgency::Normal,
        }))
    }

    fn held_back(&self, _: Urgency, _: usize, _: &str) -> Result<Option<String>, Error> {
        Ok(self.hold.clone())
    }

    fn merge_bytes(&mut self, id: &DocId, bytes: &[u8], document: bool) -> Result<Merged, Error> {
        self.merges += 1;
        let doc = self.docs.entry(id.clone()).or_default();
        // The client's own merge, over a document in memory.
        merge_received(id, doc, bytes, document)
    }

    fn copy(&mut self, id: &DocId) -> Result<Automerge, Error> {
        Ok(self.docs.get(id).cloned().unwrap_or_default())
    }

    fn merge_doc(&mut self, id: &DocId, doc: &mut Automerge) -> Result<u64, Error> {
        let live = self.docs.entry(id.clone()).or_default();
        let before = live.get_heads();
        live.merge(doc)?;
        Ok(live.get_changes_meta(&before).len() as u64)
    }

    fn store(&mut self, step: Step) -> Result<(), Error> {
        for (id, has) in &step.acked {
            self.relay_has.insert(id.clone(), has.clone());
        }
        self.steps.push(step);
        Ok(())
    }
}

fn ledger() -> DocId {
    DocId::parse("ledger/team-1/2026-12-02").expect("doc id")
}

fn subscription() -> Subscription {
    Subscription {
        org: None,
        teams: vec![redline_proto::TeamId::new("team-1").expect("team")],
        ledger_since: None,
        zones: vec![],
        docs: vec![],
    }
}

fn start(phone: &mut Phone, live: bool, now: Instant) -> DeviceSession {
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        device: DeviceId::new("phone-1").expect("device"),
        app_version: "test".into(),
        subscription: subscription(),
        token: String::new(),
    };
    let start = Start {
        hello,
        cursor: None,
        cursor_key: "cursor:relay".into(),
        resume: vec![],
        defer_large: None,
        live,
        attempt: 1,
        now,
        rtt: Duration::from_millis(20),
    };
    DeviceSession::start(start, phone).expect("start")
}

/// The messages (and other actions) the session asks for now.
fn sent(s: &mut DeviceSession) -> Vec<String> {
    std::iter::from_fn(|| s.poll_action())
        .map(|a| match a {
            Action::Send(frame) => codec::decode_payload(&frame[HEADER_LEN..])
                .expect("a frame the relay can read")
                .kind()
                .to_string(),
            Action::Upload(_) => "upload".into(),
            Action::FirstFlight => "first flight".into(),
            Action::Done => "done".into(),
        })
        .collect()
}

fn feed(s: &mut DeviceSession, phone: &mut Phone, msg: Message) {
    s.handle_message(msg, codec::Extensions::new(), phone)
        .expect("handled");
}

fn welcome() -> Message {
    Message::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        relay: "relay".into(),
        epoch: 1,
        granted: subscription(),
        quarantined: None,
    })
}

fn caught(seq: u64) -> Message {
    Message::Caught(Cursor {
        epoch: 1,
        seq,
        subscription: subscription(),
    })
}

fn ack(phone: &Phone) -> Message {
    Message::Ack(Ack {
        doc: ledger(),
        heads: hashes_to_wire(&phone.docs[&ledger()].get_heads()),
        applied: 1,
    })
}

#[test]
fn a_phone_with_nothing_new_says_hello_and_pulls_and_stores_the_cursor() {
    let mut phone = Phone::default();
    let mut s = start(&mut phone, false, Instant::now());
    assert_eq!(sent(&mut s), ["hello", "pull"]);
    feed(&mut s, &mut phone, welcome());
    assert!(sent(&mut s).is_empty());
    feed(&mut s, &mut phone, caught(7));
    assert_eq!(sent(&mut s), ["done"]);
    assert_eq!(phone.cursors(), 1);
    assert_eq!(s.report().round_trips, 1);
}

#[test]
fn the_cursor_waits_for_the_push_to_be_acknowledged() {
    let mut phone = Phone::default();
    phone.write(&ledger(), "check-in");
    let mut s = start(&mut phone, false, Instant::now());
    assert_eq!(sent(&mut s), ["hello", "push", "pull"]);
    feed(&mut s, &mut phone, welcome());
    feed(&mut s, &mut phone, caught(3));
    // Caught up, but the push is unanswered: no cursor, not done.
    assert!(sent(&mut s).is_empty());
    assert_eq!(phone.cursors(), 0);
    let a = ack(&phone);
    feed(&mut s, &mut phone, a);
    assert_eq!(sent(&mut s), ["done"]);
    assert_eq!(phone.cursors(), 1);
    assert_eq!(
        phone.relay_has[&ledger()],
        phone.docs[&ledger()].get_heads()
    );
    assert_eq!(s.report().docs_pushed, 1);
}

#[test]
fn a_second_ack_of_a_push_that_reached_the_relay_twice_changes_nothing() {
    // Found by the simulation once its phones ran this session: a push duplicated on
    // the way is acknowledged twice, and the second ack used to end the session as a
    // protocol violation.
    let mut phone = Phone::default();
    phone.write(&ledger(), "check-in");
    let mut s = start(&mut phone, true, Instant::now());
    assert_eq!(sent(&mut s), ["hello", "push", "pull"]);
    feed(&mut s, &mut phone, welcome());
    let a = ack(&phone);
    feed(&mut s, &mut phone, a.clone());
    feed(&mut s, &mut phone, caught(3));
    assert_eq!(sent(&mut s), ["first flight"]);
    feed(&mut s, &mut phone, a);
    assert!(sent(&mut s).is_empty());
    assert_eq!(s.report().changes_sent, 1);
    // An ack for a document never pushed is still nothing to act on.
    let stray = Message::Ack(Ack {
        doc: DocId::parse("ledger/team-1/2026-12-01").expect("doc id"),
        heads: vec![],
        applied: 0,
    });
    feed(&mut s, &mut phone, stray);
    assert!(s.is_live());
}

#[test]
fn an_unanswered_hello_ends_the_session_at_its_deadline_only() {
    let mut phone = Phone::default();
    let t0 = Instant::now();
    let mut s = start(&mut phone, false, t0);
    let due = s.poll_timeout().expect("a welcome deadline");
    assert_eq!(due, t0 + hello_wait(Duration::from_millis(20)));
    s.handle_timeout(due - Duration::from_millis(1))
        .expect("not yet due");
    assert!(!s.unanswered());
    assert!(s.handle_timeout(due).is_err());
    assert!(s.unanswered(), "the driver must try a fresh connection");
    // A welcome clears the deadline.
    let mut s = start(&mut phone, false, t0);
    feed(&mut s, &mut phone, welcome());
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn a_connection_lost_before_the_welcome_counts_as_unanswered() {
    let mut phone = Phone::default();
    let mut s = start(&mut phone, false, Instant::now());
    let e = s.handle_lost(Error::transport("lost"));
    assert!(matches!(e, Error::Transport { .. }));
    assert!(s.unanswered());
    let mut s = start(&mut phone, false, Instant::now());
    feed(&mut s, &mut phone, welcome());
    s.handle_lost(Error::transport("lost"));
    assert!(
        !s.unanswered(),
        "after a welcome a lost connection is a failure"
    );
}

#[test]
fn a_live_write_made_while_its_push_is_in_flight_goes_out_once_answered() {
    let mut phone = Phone::default();
    let mut s = start(&mut phone, true, Instant::now());
    sent(&mut s);
    feed(&mut s, &mut phone, welcome());
    feed(&mut s, &mut phone, caught(1));
    assert_eq!(sent(&mut s), ["first flight"]);
    assert!(s.is_live());
    phone.write(&ledger(), "a");
    s.handle_local_change(&mut phone).expect("write");
    assert_eq!(sent(&mut s), ["push"]);
    // A second write while the first push is unanswered waits for its answer...
    let first = ack(&phone);
    phone.write(&ledger(), "b");
    s.handle_local_change(&mut phone).expect("write");
    assert!(sent(&mut s).is_empty());
    // ...and goes out as soon as it comes.
    feed(&mut s, &mut phone, first);
    assert_eq!(sent(&mut s), ["push"]);
    let second = ack(&phone);
    feed(&mut s, &mut phone, second);
    assert!(sent(&mut s).is_empty());
    assert_eq!(
        phone.relay_has[&ledger()],
        phone.docs[&ledger()].get_heads()
    );
}

#[test]
fn an_update_is_merged_and_a_transfer_holds_the_cursor_until_it_arrives() {
    let mut relay_copy = Automerge::new().with_actor(ActorId::random());
    let mut tx = relay_copy.transaction();
    tx.put(ROOT, "screened", 12).expect("put");
    tx.commit();
    let hashes = relay_copy.get_heads();
    let bundle = relay_copy
        .bundle(hashes.clone())
        .expect("bundle")
        .bytes()
        .to_vec();
    let mut phone = Phone::default();
    let mut s = start(&mut phone, false, Instant::now());
    sent(&mut s);
    feed(&mut s, &mut phone, welcome());
    let id = [9u8; 16];
    let announce = Update {
        doc: ledger(),
        payload: Payload::Transfer {
            id,
            len: bundle.len() as u64,
            document: false,
        },
        heads: hashes_to_wire(&hashes),
    };
    feed(&mut s, &mut phone, Message::Update(announce));
    feed(&mut s, &mut phone, caught(5));
    assert!(sent(&mut s).is_empty(), "a transfer is still coming");
    assert_eq!(phone.cursors(), 0);
    s.handle_transfer(id, bundle, &mut phone).expect("transfer");
    assert_eq!(sent(&mut s), ["done"]);
    assert_eq!(phone.cursors(), 1);
    assert_eq!(phone.docs[&ledger()].get_heads(), hashes);
    let step = phone.steps.last().expect("stored");
    assert_eq!(step.applied_transfers, vec![id]);
    assert_eq!(s.report().changes_received, 1);
}

#[test]
fn a_large_push_becomes_an_upload_and_the_policy_can_hold_it_back() {
    let mut phone = Phone::default();
    let doc = phone
        .docs
        .entry(ledger())
        .or_insert_with(|| Automerge::new().with_actor(ActorId::random()));
    let mut tx = doc.transaction();
    // Incompressible text, larger than a message may carry.
    let mut x: u64 = 1;
    let text: String = (0..2 * INLINE_MAX)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            char::from(b'a' + (x >> 59) as u8)
        })
        .collect();
    tx.put(ROOT, "notes", text).expect("put");
    tx.commit();
    let mut s = start(&mut phone, false, Instant::now());
    assert_eq!(sent(&mut s), ["hello", "upload", "pull"]);
    phone.hold = Some("large document waits for a charger".into());
    let mut s = start(&mut phone, false, Instant::now());
    assert_eq!(sent(&mut s), ["hello", "pull"]);
    assert_eq!(s.report().deferred.len(), 1);
}

#[test]
fn a_refusal_of_the_whole_session_is_an_error_and_of_one_document_a_report() {
    let mut phone = Phone::default();
    phone.write(&ledger(), "x");
    let mut s = start(&mut phone, false, Instant::now());
    sent(&mut s);
    feed(&mut s, &mut phone, welcome());
    let refusal = |doc: Option<DocId>| {
        Message::Error(redline_proto::message::ErrorReport {
            code: redline_proto::ErrorCode::FORBIDDEN,
            text: "not your team".into(),
            doc,
        })
    };
    feed(&mut s, &mut phone, refusal(Some(ledger())));
    feed(&mut s, &mut phone, caught(2));
    assert_eq!(sent(&mut s), ["done"]);
    assert_eq!(s.report().refused.len(), 1);
    let err = s
        .handle_message(refusal(None), codec::Extensions::new(), &mut phone)
        .expect_err("refused");
    assert!(matches!(err, Error::Refused { .. }));
}

/// Updates that arrived together are merged with one apply per document and stored
/// once; a cursor between them waits for them, another message is handled where it
/// stands (the updates after it are a second apply), and the last cursor is stored
/// after they are all applied.
#[test]
fn updates_that_arrive_together_are_applied_and_stored_at_once() {
    let mut phone = Phone::default();
    let mut s = start(&mut phone, true, Instant::now());
    feed(&mut s, &mut phone, welcome());
    feed(&mut s, &mut phone, caught(1));
    assert_eq!(sent(&mut s), ["hello", "pull", "first flight"]);
    // Four changes a teammate made, one update each.
    let mut teammate = Automerge::new().with_actor(ActorId::random());
    let mut updates = Vec::new();
    for i in 0..4 {
        let before = teammate.get_heads();
        let mut tx = teammate.transaction();
        tx.put(ROOT, format!("k{i}"), i).expect("put");
        tx.commit();
        let new: Vec<ChangeHash> = teammate
            .get_changes(&before)
            .iter()
            .map(|c| c.hash())
            .collect();
        updates.push(Message::Update(Update {
            doc: ledger(),
            heads: hashes_to_wire(&teammate.get_heads()),
            payload: Payload::Bundle(teammate.bundle(new).expect("bundle").bytes().to_vec()),
        }));
    }
    let steps = phone.steps.len();
    let mut batch: Vec<_> = updates
        .into_iter()
        .map(|m| (m, codec::Extensions::new()))
        .collect();
    // A cursor between the first and the second update, another message (a welcome
    // again) between the third and the fourth, a cursor after the last.
    batch.insert(1, (caught(2), codec::Extensions::new()));
    batch.insert(4, (welcome(), codec::Extensions::new()));
    batch.push((caught(3), codec::Extensions::new()));
    s.handle_messages(batch, &mut phone).expect("handled");
    assert_eq!(phone.merges, 2, "one apply before the welcome, one after");
    assert_eq!(phone.docs[&ledger()].get_heads(), teammate.get_heads());
    assert_eq!(phone.steps.len(), steps + 1, "stored once");
    let last = phone.steps.last().expect("a step");
    let Message::Caught(third) = caught(3) else {
        unreachable!()
    };
    let want = postcard::to_stdvec(&third).expect("encode");
    assert_eq!(last.cursor.as_ref().map(|(_, c)| c), Some(&want));
    assert_eq!(
        phone.relay_has[&ledger()],
        teammate.get_heads(),
        "the relay holds what its last update named"
    );
    assert_eq!(s.report().changes_received, 4);
}

/// A relay told that the phone derives heads sends updates without them: the phone
/// takes what the relay holds from what it applied (the bundle's heads: two teammates'
/// concurrent changes), never from its own copy (its unpushed write stays unheld).
#[test]
fn an_update_without_heads_names_what_was_applied_as_held() {
    let mut phone = Phone::default();
    let mut s = start(&mut phone, true, Instant::now());
    feed(&mut s, &mut phone, welcome());
    feed(&mut s, &mut phone, caught(1));
    sent(&mut s);
    let mine = {
        let doc = phone.docs.entry(ledger()).or_default();
        let mut tx = doc.transaction();
        tx.put(ROOT, "mine", 1).expect("put");
        tx.commit().0.expect("a change")
    };
    let base = Automerge::new().with_actor(ActorId::random());
    let (mut a, mut b) = (base.fork(), base.fork());
    let write = |doc: &mut Automerge, key: &str| {
        let mut tx = doc.transaction();
        tx.put(ROOT, key, 1).expect("put");
        tx.commit();
    };
    write(&mut a, "a1");
    write(&mut a, "a2");
    write(&mut b, "b1");
    a.merge(&mut b).expect("merge");
    let all: Vec<ChangeHash> = a.get_changes(&[]).iter().map(|c| c.hash()).collect();
    let update = Message::Update(Update {
        doc: ledger(),
        heads: Vec::new(),
        payload: Payload::Bundle(a.bundle(all).expect("bundle").bytes().to_vec()),
    });
    s.handle_messages(vec![(update, codec::Extensions::new())], &mut phone)
        .expect("handled");
    let mut held = phone.relay_has[&ledger()].clone();
    held.sort();
    let mut want = a.get_heads();
    want.sort();
    assert_eq!(
        held, want,
        "the teammates' heads, as the relay would name them"
    );
    assert!(
        !held.contains(&mine),
        "the phone's own write is not the relay's"
    );
}

/// A relay may answer a catch-up with a document saved at a commit inside the window,
/// then the rest of the window as a bundle that depends on it, one after the other: the
/// phone applies them in that order (no resync), keeps its own unpushed write, and
/// takes the relay to hold what the bundle named.
#[test]
fn a_whole_document_then_the_rest_of_the_window_arrive_together() {
    let mut phone = Phone::default();
    let mut s = start(&mut phone, true, Instant::now());
    feed(&mut s, &mut phone, welcome());
    feed(&mut s, &mut phone, caught(1));
    sent(&mut s);
    phone.write(&ledger(), "mine");
    let mut team = Automerge::new().with_actor(ActorId::random());
    for i in 0..5 {
        let mut tx = team.transaction();
        tx.put(ROOT, format!("k{i}"), i).expect("put");
        tx.commit();
    }
    let saved_at = team.get_heads();
    let whole = team.save();
    let whole_len = whole.len();
    let mut tx = team.transaction();
    tx.put(ROOT, "after the save", 1).expect("put");
    tx.commit();
    let rest: Vec<ChangeHash> = team
        .get_changes(&saved_at)
        .iter()
        .map(|c| c.hash())
        .collect();
    let rest_bytes = team.bundle(rest).expect("bundle").bytes().to_vec();
    let rest_len = rest_bytes.len();
    let updates = [
        Update {
            doc: ledger(),
            heads: hashes_to_wire(&saved_at),
            payload: Payload::Document(whole),
        },
        Update {
            doc: ledger(),
            heads: hashes_to_wire(&team.get_heads()),
            payload: Payload::Bundle(rest_bytes),
        },
    ];
    let batch = updates
        .into_iter()
        .map(|u| (Message::Update(u), codec::Extensions::new()))
        .chain([(caught(2), codec::Extensions::new())])
        .collect();
    s.handle_messages(batch, &mut phone).expect("handled");
    let doc = &phone.docs[&ledger()];
    for key in ["k0", "k4", "after the save", "mine"] {
        use automerge::ReadDoc;
        assert!(
            doc.get(ROOT, key).expect("read").is_some(),
            "{key} is there"
        );
    }
    assert!(s.resync.is_none(), "nothing was missing");
    // The union of what both named (the save's heads are the bundle's past).
    let held = &phone.relay_has[&ledger()];
    assert!(team.get_heads().iter().all(|h| held.contains(h)));
    assert!(
        doc.get_changes(held).len() == 1,
        "only the phone's own write is unheld"
    );
    assert_eq!(s.report().changes_received, 6);
    // The phone's own write is not in the save: both are stored as they came.
    let dirty = stored_doc(&phone, &ledger());
    assert!(dirty.whole.is_none());
    assert_eq!(
        dirty.received.as_ref().map(Vec::len),
        Some(whole_len + rest_len)
    );
}

/// The stored form of `id` in the phone's last sync step.
fn stored_doc(phone: &Phone, id: &DocId) -> DirtyDoc {
    let step = phone.steps.last().expect("a step was stored");
    step.docs
        .iter()
        .find(|d| &d.id == id)
        .cloned()
        .expect("the document was stored")
}

/// A whole document holding everything the phone had (a piece that came before it in
/// the same step included) is handed to the store as the new snapshot, and only what
/// came after it as a chunk.
#[test]
fn a_whole_document_holding_all_the_phone_had_is_stored_as_the_snapshot() {
    let mut phone = Phone::default();
    let mut s = start(&mut phone, true, Instant::now());
    feed(&mut s, &mut phone, welcome());
    feed(&mut s, &mut phone, caught(1));
    sent(&mut s);
    let mut team = Automerge::new().with_actor(ActorId::random());
    let put = |doc: &mut Automerge, key: &str| {
        let before = doc.get_heads();
        let mut tx = doc.transaction();
        tx.put(ROOT, key, 1).expect("put");
        tx.commit();
        let new = doc
            .get_changes(&before)
            .iter()
            .map(|c| c.hash())
            .collect::<Vec<_>>();
        doc.bundle(new).expect("bundle").bytes().to_vec()
    };
    let first = put(&mut team, "first");
    let first_heads = team.get_heads();
    put(&mut team, "second");
    let whole = team.save();
    let saved_at = team.get_heads();
    let rest = put(&mut team, "after the save");
    let update = |heads: &[ChangeHash], payload| {
        (
            Message::Update(Update {
                doc: ledger(),
                heads: hashes_to_wire(heads),
                payload,
            }),
            codec::Extensions::new(),
        )
    };
    let batch = vec![
        update(&first_heads, Payload::Bundle(first)),
        update(&saved_at, Payload::Document(whole.clone())),
        update(&team.get_heads(), Payload::Bundle(rest.clone())),
        (caught(2), codec::Extensions::new()),
    ];
    s.handle_messages(batch, &mut phone).expect("handled");
    assert_eq!(phone.docs[&ledger()].get_heads(), team.get_heads());
    let dirty = stored_doc(&phone, &ledger());
    assert_eq!(dirty.whole, Some(whole), "the save is the snapshot");
    assert_eq!(dirty.received, Some(rest), "only what came after it");
    assert!(!dirty.merged);
}
