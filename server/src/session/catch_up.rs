//! The catch-up: what a device lacks in its subscription since its cursor, document by
//! document, one hub lookup at a time, then `Caught`.

use automerge::ChangeHash;
use redline_proto::DocId;
use redline_proto::message::{Coverage, Cursor, Message, Payload, Update};
use redline_proto::session::hashes_to_wire;
use redline_proto::wire::{INLINE_MAX, transfer_id};

use super::{Action, Answer, CatchUp, Query, Session};
use crate::Error;

impl Session {
    pub(super) fn start_catch_up(&mut self, cursor: Option<Cursor>) {
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

    pub(super) fn on_answer(&mut self, answer: Answer) {
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
                for (payload, heads) in found {
                    self.deliver(doc.clone(), payload, heads);
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
                self.close(Error::connection_lost(
                    "internal: a hub answer arrived for no question",
                ));
            }
        }
    }

    /// Asks for the next document of the catch-up, or ends it with `Caught`.
    pub(super) fn next_doc(&mut self) {
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
                    chunks: self.peer.accepts_chunks,
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
    pub(super) fn deliver(&mut self, doc: DocId, payload: Payload, heads: Vec<ChangeHash>) {
        let document = matches!(payload, Payload::Document(_));
        let large = match &payload {
            Payload::Bundle(b) | Payload::Document(b) => b.len() > INLINE_MAX,
            Payload::Transfer { .. } => false,
        };
        if let Payload::Bundle(b) | Payload::Document(b) = &payload {
            self.sending += b.len() as u64;
        }
        let wire_heads = if self.peer.derives_heads {
            Vec::new()
        } else {
            hashes_to_wire(&heads)
        };
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

    pub(super) fn caught(&mut self, upto: u64) {
        self.send(Message::Caught(Cursor {
            epoch: self.epoch,
            seq: upto,
            subscription: self.peer.subscription.subscription().clone(),
        }));
        self.peer.delivered = Some(upto);
        self.last_sent = std::mem::take(&mut self.sending);
        self.peer.known.prune_own(upto);
        self.actions.push_back(Action::Delivered(upto));
        if let Some(cursor) = self.again.take() {
            self.start_catch_up(cursor);
        }
    }
}
