//! What is saved where: this phone's changes the relay has not acknowledged, per
//! document ([`Client::pending`]) and per record ([`Client::unsaved_records`]): "saved
//! on the phone" versus "saved on the relay".

use std::collections::HashMap;

use automerge::ChangeHash;
use redline_proto::DocId;

use crate::Error;
use crate::client::Client;

impl Client {
    /// Records of `id` with changes from this phone the relay has not acknowledged
    /// ("saved on the phone" only), as `container/key` (`tasks/<id>`, `needs/<id>`,
    /// `duty/<id>`...). Every other record of the document is saved on the relay.
    pub fn unsaved_records(&self, id: &DocId) -> Result<std::collections::BTreeSet<String>, Error> {
        use automerge::{ObjType, ReadDoc};
        let mut docs = self.docs();
        let Some(doc) = self.load(&mut docs, id)? else {
            return Ok(Default::default());
        };
        let mine = self.unacked_changes(id, doc)?;
        if mine.is_empty() {
            return Ok(Default::default());
        }
        // Every object inside a record, by (counter, actor): the record it belongs to.
        let key_of = |o: &automerge::ObjId| match o {
            automerge::ObjId::Id(counter, actor, _) => Some((*counter, actor.clone())),
            automerge::ObjId::Root => None,
        };
        let mut owner: HashMap<(u64, automerge::ActorId), String> = HashMap::new();
        let mut containers: HashMap<(u64, automerge::ActorId), String> = HashMap::new();
        for (container, cid) in doc
            .map_range(automerge::ROOT, ..)
            .map(|i| (i.key.to_string(), i.id()))
        {
            if !matches!(doc.object_type(&cid), Ok(ObjType::Map)) {
                continue;
            }
            if let Some(k) = key_of(&cid) {
                containers.insert(k, container.clone());
            }
            for item in doc.map_range(&cid, ..) {
                let record = format!("{container}/{}", item.key);
                let mut stack = vec![item.id()];
                while let Some(obj) = stack.pop() {
                    if doc.object_type(&obj).is_err() {
                        continue;
                    }
                    if let Some(k) = key_of(&obj) {
                        owner.insert(k, record.clone());
                    }
                    for child in doc.map_range(&obj, ..) {
                        stack.push(child.id());
                    }
                    for child in doc.list_range(&obj, ..) {
                        stack.push(child.id());
                    }
                }
            }
        }
        let mut out = std::collections::BTreeSet::new();
        for change in mine {
            for op in change.decode().operations {
                let automerge::legacy::ObjectId::Id(automerge::legacy::OpId(counter, actor)) =
                    &op.obj
                else {
                    continue;
                };
                let obj = (*counter, actor.clone());
                if let Some(r) = owner.get(&obj) {
                    out.insert(r.clone());
                } else if let (Some(c), automerge::legacy::Key::Map(k)) =
                    (containers.get(&obj), &op.key)
                {
                    out.insert(format!("{c}/{k}"));
                }
            }
        }
        Ok(out)
    }

    /// This device's changes to `doc` (document `id`) that the relay has not
    /// acknowledged.
    fn unacked_changes(
        &self,
        id: &DocId,
        doc: &automerge::Automerge,
    ) -> Result<Vec<automerge::Change>, Error> {
        let acked: Vec<ChangeHash> = self
            .inner
            .store
            .acked_heads(id)?
            .unwrap_or_default()
            .into_iter()
            .filter(|h| doc.get_change_meta_by_hash(h).is_some())
            .collect();
        let me = &self.inner.identity.actor;
        Ok(doc
            .get_changes(&acked)
            .into_iter()
            .filter(|c| c.actor_id() == me)
            .collect())
    }

    /// What is saved on this phone only: per document, this device's changes the relay
    /// has not acknowledged, and when it last acknowledged the document.
    pub fn pending(&self) -> Result<crate::Pending, Error> {
        let mut out = crate::Pending::default();
        let ids = self.inner.store.doc_ids()?;
        let mut docs = self.docs();
        for id in ids {
            let Some(doc) = self.load(&mut docs, &id)? else {
                continue;
            };
            let unacked = self.unacked_changes(&id, doc)?.len() as u64;
            let last_ack_ms = self.inner.store.acked_at(&id)?;
            out.unacked += unacked;
            out.last_ack_ms = out.last_ack_ms.max(last_ack_ms);
            if unacked > 0 || last_ack_ms.is_some() {
                out.docs.push(crate::DocPending {
                    doc: id,
                    unacked,
                    last_ack_ms,
                });
            }
        }
        Ok(out)
    }
}
