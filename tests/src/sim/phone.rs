//! A phone of the simulation: real Automerge documents, the field's operations, and the
//! client core's own device session ([`DeviceSession`]) deciding what to push, how to
//! apply what the relay sends, when to store and when the cursor moves.
//!
//! Its state is split the way a phone's is: what is durable ([`Durable`]: the chunks its
//! store flushed, the heads the relay is known to hold, the cursor) survives a crash;
//! the documents in memory and the session do not. A crash reloads the documents from
//! the stored chunks, as the phone's store does on open.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, ChangeHash, ObjType, ROOT, ReadDoc, ScalarValue};
use redline_client::Urgency;
use redline_client::device_session::{
    DeviceSession, Documents, Merged, Outgoing, Step, bundle_after, known_held, merge_received,
};
use redline_proto::message::{Cursor, Hello, Subscription};
use redline_proto::{DeviceId, DocId, MemberId, TeamId};

/// What a phone did to its team's ledger, to compare with the relay's copy at the end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reference {
    /// Sum of this phone's tally increments.
    pub screened: i64,
    /// This phone's tasks and their last status.
    pub tasks: BTreeMap<String, String>,
}

/// The phone's store as the device session reaches it: documents in memory over what was
/// flushed.
#[derive(Default)]
pub struct Store {
    /// The documents in memory (lost in a crash).
    pub docs: BTreeMap<DocId, Automerge>,
    /// Durable: each document's flushed chunks, in order (loading applies them all).
    pub chunks: BTreeMap<DocId, Vec<Vec<u8>>>,
    /// Durable: heads the relay is known to hold, per document.
    pub relay_held: BTreeMap<DocId, Vec<ChangeHash>>,
    /// Durable: where it is in the relay's feed.
    pub cursor: Option<Cursor>,
    /// Steps stored (one flush each).
    pub steps: u64,
    /// A stored cursor that went back within an epoch (never allowed).
    pub cursor_went_back: Vec<String>,
    /// The injected bug: store steps keep the cursor but drop the updates applied.
    pub loses_updates: bool,
    /// Documents merged from a whole document holding all their copy held: how many
    /// chunks were flushed then (the save replaces them only if none came since, as the
    /// client checks its store's heads).
    pub whole_bases: HashMap<DocId, usize>,
}

impl Store {
    /// The document, from its genesis (flushed at once) if the phone lacks it.
    fn doc_or_genesis(&mut self, id: &DocId) -> &mut Automerge {
        if !self.docs.contains_key(id) {
            let doc = redline_proto::genesis::genesis(id);
            self.chunks.entry(id.clone()).or_default().push(doc.save());
            self.docs.insert(id.clone(), doc);
        }
        self.docs.get_mut(id).expect("inserted above")
    }

    /// A crash: the documents in memory are gone; reopening loads the flushed chunks.
    fn reopen(&mut self) -> Result<(), String> {
        self.docs.clear();
        self.whole_bases.clear();
        for (id, chunks) in &self.chunks {
            let mut doc = Automerge::new();
            for c in chunks {
                doc.load_incremental(c)
                    .map_err(|e| format!("{id} does not reopen: {e}"))?;
            }
            self.docs.insert(id.clone(), doc);
        }
        Ok(())
    }
}

impl Documents for Store {
    fn relay_held(&self) -> Result<HashMap<DocId, Vec<ChangeHash>>, redline_client::Error> {
        Ok(self
            .docs
            .keys()
            .map(|id| {
                let held = self.relay_held.get(id).cloned().unwrap_or_default();
                (id.clone(), held)
            })
            .collect())
    }

    fn ids(&self) -> Result<Vec<DocId>, redline_client::Error> {
        Ok(self.docs.keys().cloned().collect())
    }

    fn heads(&mut self, id: &DocId) -> Result<Option<Vec<ChangeHash>>, redline_client::Error> {
        Ok(self.docs.get(id).map(Automerge::get_heads))
    }

    fn outgoing(
        &mut self,
        id: &DocId,
        relay_has: &[ChangeHash],
        _heads: &[ChangeHash],
    ) -> Result<Option<Outgoing>, redline_client::Error> {
        let Some(doc) = self.docs.get(id) else {
            return Ok(None);
        };
        // As the client builds a push: on what the relay holds, as far as this copy
        // knows of it.
        let known = known_held(doc, relay_has);
        bundle_after(id, doc, &known)
    }

    fn held_back(
        &self,
        _: Urgency,
        _: usize,
        _: &str,
    ) -> Result<Option<String>, redline_client::Error> {
        Ok(None)
    }

    fn merge_bytes(
        &mut self,
        id: &DocId,
        bytes: &[u8],
        document: bool,
    ) -> Result<Merged, redline_client::Error> {
        // The client's own merge (the heads of what was applied are held by the relay).
        let merged = merge_received(id, self.doc_or_genesis(id), bytes, document)?;
        if document && merged.covers {
            let flushed = self.chunks.get(id).map_or(0, Vec::len);
            self.whole_bases.insert(id.clone(), flushed);
        }
        Ok(merged)
    }

    fn copy(&mut self, id: &DocId) -> Result<Automerge, redline_client::Error> {
        Ok(self.docs.get(id).cloned().unwrap_or_default())
    }

    fn merge_doc(&mut self, id: &DocId, doc: &mut Automerge) -> Result<u64, redline_client::Error> {
        let live = self.doc_or_genesis(id);
        let before = live.get_heads();
        live.merge(doc)?;
        Ok(live.get_changes_meta(&before).len() as u64)
    }

    fn store(&mut self, step: Step) -> Result<(), redline_client::Error> {
        self.steps += 1;
        for dirty in step.docs {
            let Some(doc) = self.docs.get_mut(&dirty.id) else {
                continue;
            };
            let chunks = self.chunks.entry(dirty.id.clone()).or_default();
            let covers = self.whole_bases.remove(&dirty.id) == Some(chunks.len());
            match (dirty.whole, dirty.received) {
                // Only updates changed it: what came, appended as it came.
                (w, r) if (w.is_some() || r.is_some()) && !dirty.merged && self.loses_updates => {}
                // A whole document holding all it held: the new snapshot, then the rest.
                (Some(whole), rest) if !dirty.merged && covers => {
                    *chunks = vec![whole];
                    chunks.extend(rest);
                }
                (None, Some(bytes)) if !dirty.merged => chunks.push(bytes),
                // Changed by more (a fallback's merge): the whole copy.
                _ => *chunks = vec![doc.save()],
            }
        }
        for (id, held) in step.acked {
            self.relay_held.insert(id, held);
        }
        if let Some((_, bytes)) = step.cursor {
            let new: Cursor = postcard::from_bytes(&bytes)
                .map_err(|e| redline_client::Error::Store(e.to_string()))?;
            if let Some(old) = &self.cursor
                && old.epoch == new.epoch
                && new.seq < old.seq
            {
                self.cursor_went_back.push(format!(
                    "the cursor moved back from {} to {}",
                    old.seq, new.seq
                ));
            }
            self.cursor = Some(new);
        }
        Ok(())
    }
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
    /// Its store (documents in memory over what is durable).
    pub store: Store,
    /// Durable: what it wrote.
    pub reference: Reference,
    /// Durable: the changes it wrote.
    pub written: BTreeSet<ChangeHash>,
    /// Durable: its last write, per document.
    pub last_write: BTreeMap<DocId, ChangeHash>,
    /// Operations still to write.
    pub ops_left: u32,
    /// Whether the network reaches it now.
    pub online: bool,
    /// The connection it is using, if any.
    pub conn: Option<u64>,
    /// The sync session on `conn`.
    pub session: Option<DeviceSession>,
    /// A local write not yet handed to a live session (the client's `notify_one`).
    pub wrote: bool,
    /// Refusals an honest phone should never get.
    pub refusals: Vec<String>,
    /// The last connection's attempt number (the client takes the wall clock, so it
    /// grows over a restart too; here the virtual clock).
    pub attempt: u64,
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
            store: Store::default(),
            reference: Reference::default(),
            written: BTreeSet::new(),
            last_write: BTreeMap::new(),
            ops_left: ops,
            online: false,
            conn: None,
            session: None,
            wrote: false,
            refusals: Vec::new(),
            attempt: 0,
        }
    }

    /// What it asks to receive: its team's ledgers.
    pub fn subscription(&self) -> Subscription {
        Subscription {
            teams: vec![self.team.clone()],
            ..Default::default()
        }
    }

    /// The hello it says on a new connection.
    pub fn hello(&self) -> Hello {
        Hello {
            protocol_version: self.version,
            device: self.device.clone(),
            app_version: "sim".into(),
            subscription: self.subscription(),
            token: self.token.clone(),
        }
    }

    /// One field operation on `ledger` at virtual time `ms`, chosen by `roll` in 0..100,
    /// flushed at once as the phone's store does. Returns the new change's hash.
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
        let doc = self.store.doc_or_genesis(ledger);
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
        self.flush_write(ledger, hash)
    }

    /// Opens a task with a photo attached (`photo`: bytes that do not compress, so the
    /// push passes the inline limit and goes up on an upload stream), at `ms`.
    pub fn attach(&mut self, ledger: &DocId, photo: Vec<u8>, ms: i64) -> ChangeHash {
        let (device, member, actor) = (
            self.device.to_string(),
            self.member.to_string(),
            self.actor.clone(),
        );
        let key = format!("{device}-{}", self.reference.tasks.len());
        let doc = self.store.doc_or_genesis(ledger);
        doc.set_actor(actor);
        let mut tx = doc.transaction();
        let (_, tasks) = tx.get(ROOT, "tasks").ok().flatten().expect("genesis");
        let task = tx.put_object(&tasks, &key, ObjType::Map).expect("map");
        tx.put(&task, "kind", "inspection").expect("put");
        tx.put(&task, "device", device.as_str()).expect("put");
        tx.put(&task, "member", member.as_str()).expect("put");
        tx.put(&task, "status", "open").expect("put");
        tx.put(&task, "photo", ScalarValue::Bytes(photo))
            .expect("put");
        let options = CommitOptions::default()
            .with_message(format!("{member}@{device}"))
            .with_time(ms);
        let (hash, _) = tx.commit_with(options);
        let hash = hash.expect("the operation changed something");
        self.reference.tasks.insert(key, "open".into());
        self.flush_write(ledger, hash)
    }

    /// A write just committed to `ledger` is flushed as the client does: a bundle of the
    /// one change (Automerge 0.12 encodes a bundle from its columns far more cheaply
    /// than it rebuilds a change).
    fn flush_write(&mut self, ledger: &DocId, hash: ChangeHash) -> ChangeHash {
        let doc = self.store.doc_or_genesis(ledger);
        let bytes = doc
            .bundle([hash])
            .expect("a change just committed bundles")
            .bytes()
            .to_vec();
        self.store
            .chunks
            .entry(ledger.clone())
            .or_default()
            .push(bytes);
        self.written.insert(hash);
        self.last_write.insert(ledger.clone(), hash);
        self.wrote = true;
        hash
    }

    /// Whether the relay acknowledged a change by this phone's actor: from then on the
    /// actor is public (teammates receive its changes), so a forger can copy it. An
    /// acknowledged genesis alone publishes nothing.
    pub fn actor_published(&self) -> bool {
        self.store
            .relay_held
            .keys()
            .any(|id| !self.acknowledged(id).is_empty())
    }

    /// Whether `id` shows every change this phone wrote (the last one, on top of all the
    /// others).
    pub fn sees_own_writes(&self, id: &DocId) -> bool {
        let Some(last) = self.last_write.get(id) else {
            return true;
        };
        self.store
            .docs
            .get(id)
            .is_some_and(|d| d.get_change_meta_by_hash(last).is_some())
    }

    /// The changes it wrote into `id` that the relay is durably known to hold.
    pub fn acknowledged(&self, id: &DocId) -> Vec<ChangeHash> {
        let (Some(doc), Some(held)) = (self.store.docs.get(id), self.store.relay_held.get(id))
        else {
            return Vec::new();
        };
        let after: HashSet<ChangeHash> =
            doc.get_changes_meta(held).iter().map(|c| c.hash).collect();
        self.written
            .iter()
            .filter(|h| doc.get_change_meta_by_hash(h).is_some() && !after.contains(h))
            .copied()
            .collect()
    }

    /// The heads of `id` as the store would reopen it.
    pub fn stored_heads(&self, id: &DocId) -> Result<Vec<ChangeHash>, String> {
        let mut doc = Automerge::new();
        for c in self.store.chunks.get(id).into_iter().flatten() {
            doc.load_incremental(c)
                .map_err(|e| format!("{id} does not reopen: {e}"))?;
        }
        Ok(doc.get_heads())
    }

    /// The session ended (the connection was cut, refused, or the relay went away): it
    /// stores what it applied, as the client does when a session fails.
    pub fn disconnected(&mut self) -> Result<(), String> {
        self.conn = None;
        let Some(mut session) = self.session.take() else {
            return Ok(());
        };
        self.collect_refusals(&session);
        session.finish(false, &mut self.store).map_err(|e| {
            format!(
                "{} could not store at the end of a session: {e}",
                self.device
            )
        })
    }

    /// Notes what the session's report says was refused.
    pub fn collect_refusals(&mut self, session: &DeviceSession) {
        for (doc, why) in session.report().refused {
            let what = format!("{} refused on {doc}: {why}", self.device);
            if !self.refusals.contains(&what) {
                self.refusals.push(what);
            }
        }
    }

    /// A crash: the session and the documents in memory are gone.
    pub fn crash(&mut self) -> Result<(), String> {
        self.conn = None;
        self.session = None;
        self.wrote = false;
        self.store.reopen()
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
