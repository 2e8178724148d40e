//! A phone of the simulation: real Automerge documents, the field's operations, and the
//! protocol's device rules (push what is unacknowledged, pull from the cursor, move the
//! cursor only on `Caught`, apply updates as they come).
//!
//! Its state is split the way a phone's is: what is durable (documents, unacknowledged
//! changes, the cursor) survives a crash; the connection does not.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, ChangeHash, ObjType, ROOT, ReadDoc, ScalarValue};
use redline_proto::message::{Cursor, Message, Payload, Pull, Push, Subscription, Update};
use redline_proto::session::{DeviceResync, DocToSync};
use redline_proto::{DeviceId, DocId, MemberId, TeamId};

/// What a phone did to its team's ledger, to compare with the relay's copy at the end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reference {
    /// Sum of this phone's tally increments.
    pub screened: i64,
    /// This phone's tasks and their last status.
    pub tasks: BTreeMap<String, String>,
}

/// One simulated phone.
pub struct Phone {
    /// Index in the world.
    pub index: usize,
    pub member: MemberId,
    pub device: DeviceId,
    pub team: TeamId,
    pub token: String,
    pub actor: ActorId,
    /// Protocol version it says hello with.
    pub version: u16,
    /// Durable: documents.
    pub docs: BTreeMap<DocId, Automerge>,
    /// Durable: changes the relay has not acknowledged, per document.
    pub unacked: BTreeMap<DocId, BTreeSet<ChangeHash>>,
    /// Durable: where it is in the relay's feed.
    pub cursor: Option<Cursor>,
    /// Durable: what it wrote.
    pub reference: Reference,
    /// Operations still to write.
    pub ops_left: u32,
    /// Whether the network reaches it now.
    pub online: bool,
    /// The connection it is using, if any.
    pub conn: Option<u64>,
    /// Welcomed on `conn`.
    pub welcomed: bool,
    /// Caught up on `conn` at least once (live from then on).
    pub live: bool,
    /// Pushes sent on `conn` and not answered, in order.
    pub in_flight: VecDeque<(DocId, Vec<ChangeHash>)>,
    /// Changes the relay acknowledged (every one must survive).
    pub acked: BTreeSet<ChangeHash>,
    /// Refusals an honest phone should never get.
    pub refusals: Vec<String>,
    /// The Automerge-sync fallback running on `conn`, if the relay asked for one.
    pub resync: Option<DeviceResync>,
}

impl Phone {
    /// A phone of `team` writing `ops` operations.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: usize,
        member: MemberId,
        device: DeviceId,
        team: TeamId,
        token: String,
        actor: ActorId,
        version: u16,
        ops: u32,
    ) -> Self {
        Self {
            index,
            member,
            device,
            team,
            token,
            actor,
            version,
            docs: BTreeMap::new(),
            unacked: BTreeMap::new(),
            cursor: None,
            reference: Reference::default(),
            ops_left: ops,
            online: false,
            conn: None,
            welcomed: false,
            live: false,
            in_flight: VecDeque::new(),
            acked: BTreeSet::new(),
            refusals: Vec::new(),
            resync: None,
        }
    }

    /// What it asks to receive: its team's ledgers.
    pub fn subscription(&self) -> Subscription {
        Subscription {
            teams: vec![self.team.clone()],
            ..Default::default()
        }
    }

    /// The document, from the genesis if new (the genesis counts as unacknowledged).
    fn doc_mut(&mut self, id: &DocId) -> &mut Automerge {
        if !self.docs.contains_key(id) {
            let doc = redline_proto::genesis::genesis(id);
            let genesis = doc.get_heads();
            self.unacked
                .entry(id.clone())
                .or_default()
                .extend(genesis.iter().copied());
            self.docs.insert(id.clone(), doc);
        }
        self.docs.get_mut(id).expect("inserted above")
    }

    /// One field operation on `ledger` at virtual time `ms`, chosen by `roll` in 0..100.
    /// Returns the new change's hash.
    pub fn write(&mut self, ledger: &DocId, roll: u32, amount: i64, ms: i64) -> ChangeHash {
        let (device, member, actor) = (
            self.device.to_string(),
            self.member.to_string(),
            self.actor.clone(),
        );
        let n = self.reference.tasks.len();
        let done_task = self
            .reference
            .tasks
            .iter()
            .rev()
            .find(|(_, status)| *status == "open")
            .map(|(k, _)| k.clone());
        let doc = self.doc_mut(ledger);
        doc.set_actor(actor);
        let mut tx = doc.transaction();
        let (_, tallies) = tx.get(ROOT, "tallies").ok().flatten().expect("genesis");
        let mut task_change: Option<(String, String)> = None;
        let mut screened = 0;
        let mine = tx.get(&tallies, &device).ok().flatten().map(|(_, m)| m);
        match mine {
            None => {
                let mine = tx.put_object(&tallies, &device, ObjType::Map).expect("map");
                let by = tx.put_object(&mine, &member, ObjType::Map).expect("map");
                tx.put(&by, "screened", ScalarValue::counter(amount))
                    .expect("counter");
                screened = amount;
            }
            Some(mine) if roll < 60 => {
                let (_, by) = tx.get(&mine, &member).ok().flatten().expect("member map");
                tx.increment(&by, "screened", amount).expect("increment");
                screened = amount;
            }
            Some(_) if roll < 90 || done_task.is_none() => {
                let (_, tasks) = tx.get(ROOT, "tasks").ok().flatten().expect("genesis");
                let key = format!("{device}-{n}");
                let task = tx.put_object(&tasks, &key, ObjType::Map).expect("map");
                tx.put(&task, "kind", "screening").expect("put");
                tx.put(&task, "device", device.as_str()).expect("put");
                tx.put(&task, "member", member.as_str()).expect("put");
                tx.put(&task, "status", "open").expect("put");
                task_change = Some((key, "open".into()));
            }
            Some(_) => {
                let key = done_task.expect("checked above");
                let (_, tasks) = tx.get(ROOT, "tasks").ok().flatten().expect("genesis");
                let (_, task) = tx.get(&tasks, &key).ok().flatten().expect("own task");
                tx.put(&task, "status", "done").expect("put");
                task_change = Some((key, "done".into()));
            }
        }
        let options = CommitOptions::default()
            .with_message(format!("{member}@{device}"))
            .with_time(ms);
        let (hash, _) = tx.commit_with(options);
        let hash = hash.expect("the operation changed something");
        self.reference.screened += screened;
        if let Some((key, status)) = task_change {
            self.reference.tasks.insert(key, status);
        }
        self.unacked.entry(ledger.clone()).or_default().insert(hash);
        hash
    }

    /// The push of everything `doc` holds that the relay has not acknowledged.
    pub fn push_of(&self, id: &DocId) -> Option<(Push, Vec<ChangeHash>)> {
        let hashes: Vec<ChangeHash> = self.unacked.get(id)?.iter().copied().collect();
        if hashes.is_empty() {
            return None;
        }
        let doc = self.docs.get(id)?;
        let bundle = doc.bundle(hashes.iter().copied()).ok()?.bytes().to_vec();
        let push = Push {
            doc: id.clone(),
            bundle,
            heads: doc.get_heads().iter().map(|h| h.0).collect(),
        };
        Some((push, hashes))
    }

    /// The push of one new change (live: only what was just written).
    pub fn push_one(&self, id: &DocId, hash: ChangeHash) -> Option<Push> {
        let doc = self.docs.get(id)?;
        let bundle = doc.bundle([hash]).ok()?.bytes().to_vec();
        Some(Push {
            doc: id.clone(),
            bundle,
            heads: doc.get_heads().iter().map(|h| h.0).collect(),
        })
    }

    /// The `Pull` that ends its first flight.
    pub fn pull(&self) -> Pull {
        Pull {
            cursor: self.cursor.clone(),
            resume: Vec::new(),
            defer_large: false,
        }
    }

    /// Whether the relay acknowledged a change by this phone's actor: from then on the
    /// actor is public (teammates receive its changes), so a forger can copy it. An
    /// acknowledged genesis alone publishes nothing.
    pub fn actor_published(&self) -> bool {
        self.docs.values().any(|d| {
            self.acked.iter().any(|h| {
                d.get_change_meta_by_hash(h)
                    .is_some_and(|c| *c.actor == self.actor)
            })
        })
    }

    /// The relay acknowledged the oldest push in flight for `doc`.
    pub fn acked(&mut self, doc: &DocId) {
        if let Some(i) = self.in_flight.iter().position(|(d, _)| d == doc) {
            let (_, hashes) = self.in_flight.remove(i).expect("found");
            if let Some(set) = self.unacked.get_mut(doc) {
                for h in &hashes {
                    set.remove(h);
                }
            }
            self.acked.extend(hashes);
        }
    }

    /// Applies an update's bytes (a bundle or a saved document).
    pub fn apply(&mut self, update: &Update, bytes: Option<&[u8]>) -> Result<(), String> {
        let (data, document) = match (&update.payload, bytes) {
            (Payload::Bundle(b), _) => (b.as_slice(), false),
            (Payload::Document(b), _) => (b.as_slice(), true),
            (Payload::Transfer { document, .. }, Some(b)) => (b, *document),
            (Payload::Transfer { .. }, None) => return Ok(()),
        };
        let doc = self.doc_mut(&update.doc);
        if document {
            let mut other = Automerge::load(data).map_err(|e| e.to_string())?;
            doc.merge(&mut other).map_err(|e| e.to_string())?;
        } else {
            // One bundle, or (for a phone that said it reads them) several stored
            // chunks one after another.
            doc.load_incremental(data).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The connection ended (cut, refused, or the relay went away).
    pub fn disconnected(&mut self) {
        self.conn = None;
        self.welcomed = false;
        self.live = false;
        self.in_flight.clear();
        self.resync = None;
    }

    /// The relay asked to run the Automerge-sync fallback for `doc`: the first step.
    pub fn start_resync(&mut self, doc: &DocId) -> Result<Vec<Message>, String> {
        // A push answered with a resync is over; its changes stay unacknowledged.
        if let Some(k) = self.in_flight.iter().position(|(d, _)| d == doc) {
            self.in_flight.remove(k);
        }
        let copy = self.doc_mut(doc).clone();
        let d = DocToSync {
            id: doc.clone(),
            doc: copy,
            state: automerge::sync::State::new(),
        };
        match self.resync.as_mut() {
            Some(r) => r.add(d).map_err(|e| e.to_string())?,
            None => self.resync = Some(DeviceResync::new(vec![d]).map_err(|e| e.to_string())?),
        }
        Ok(self.resync_out())
    }

    /// Whether a message for `doc` belongs to the fallback (not to a push in flight).
    pub fn in_resync(&self, doc: &DocId) -> bool {
        self.resync.as_ref().is_some_and(|r| r.contains(doc))
            && !self.in_flight.iter().any(|(d, _)| d == doc)
    }

    /// Feeds the fallback a relay message; returns what to send. When every exchange is
    /// done, the documents take what the relay sent, and what the relay still lacks is
    /// pushed.
    pub fn resync_message(&mut self, msg: Message) -> Result<Vec<Message>, String> {
        let Some(r) = self.resync.as_mut() else {
            return Ok(Vec::new());
        };
        r.handle_message(msg).map_err(|e| e.to_string())?;
        let mut out = self.resync_out();
        if self.resync.as_ref().is_some_and(DeviceResync::is_finished) {
            let done = self.resync.take().expect("checked").finish();
            for synced in done {
                if let Some(e) = &synced.error {
                    return Err(format!(
                        "the fallback for {} was refused: {}",
                        synced.id, e.text
                    ));
                }
                let doc = self.doc_mut(&synced.id);
                let mut theirs = synced.doc;
                doc.merge(&mut theirs).map_err(|e| e.to_string())?;
                out.extend(self.push_of(&synced.id).map(|(p, _)| Message::Push(p)));
            }
        }
        Ok(out)
    }

    fn resync_out(&mut self) -> Vec<Message> {
        let mut out = Vec::new();
        if let Some(r) = self.resync.as_mut() {
            while let Some(m) = r.poll_transmit() {
                out.push(m);
            }
        }
        out
    }

    /// A crash: everything not durable is gone.
    pub fn crash(&mut self) {
        self.disconnected();
    }
}

/// The tallies and tasks of `device` in a ledger, as the document says.
pub fn read_reference(doc: &Automerge, device: &DeviceId, member: &MemberId) -> Reference {
    let mut r = Reference::default();
    let dev = device.to_string();
    if let Ok(Some((_, tallies))) = doc.get(ROOT, "tallies")
        && let Ok(Some((_, mine))) = doc.get(&tallies, &dev)
        && let Ok(Some((_, by))) = doc.get(&mine, member.as_str())
        && let Ok(Some((automerge::Value::Scalar(v), _))) = doc.get(&by, "screened")
        && let ScalarValue::Counter(c) = v.as_ref()
    {
        r.screened = i64::from(c);
    }
    if let Ok(Some((_, tasks))) = doc.get(ROOT, "tasks") {
        for key in doc.keys(&tasks) {
            if !key.starts_with(&format!("{dev}-")) {
                continue;
            }
            let status = doc
                .get(&tasks, &key)
                .ok()
                .flatten()
                .and_then(|(_, task)| doc.get(&task, "status").ok().flatten())
                .and_then(|(v, _)| v.as_str().map(str::to_string))
                .unwrap_or_default();
            r.tasks.insert(key, status);
        }
    }
    r
}
