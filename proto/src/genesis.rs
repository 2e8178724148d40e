//! The genesis change every Redline document starts from.
//!
//! Each document's root containers come from a first change that every device produces
//! byte for byte (fixed actor, timestamp 0, fixed content derived from the document id).
//! Two phones that start the same document offline therefore share its containers
//! instead of each creating its own `tasks` map, one of which Automerge would hide behind
//! a conflict. It lives in the protocol crate because the relay checks it too: the
//! genesis actor belongs to no device, so the relay accepts a change by it only if it is
//! exactly this change.

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ChangeHash, ObjType, ROOT};

use crate::{DocId, DocKind};

/// Schema version written by this build.
pub const SCHEMA_VERSION: u64 = 1;

/// Actor of genesis changes.
pub const GENESIS_ACTOR: [u8; 16] = *b"redline-genesis\0";

/// The first change of document `id`, identical on every device.
pub fn genesis(id: &DocId) -> Automerge {
    let mut doc = Automerge::new().with_actor(ActorId::from(GENESIS_ACTOR));
    let mut tx = doc.transaction();
    let (kind, fields, containers): (&str, Vec<(&str, String)>, &[&str]) = match id.kind() {
        DocKind::Ledger(team, day) => (
            "ledger",
            vec![("team", team.to_string()), ("day", day.to_string())],
            &["tasks", "duty", "tallies"],
        ),
        DocKind::Households(zone) => (
            "households",
            vec![("zone", zone.to_string())],
            &["households", "needs"],
        ),
        DocKind::Roster(org) => (
            "roster",
            vec![("org", org.to_string())],
            &[
                "teams",
                "zones",
                "coverage",
                "members",
                "roles",
                "membership",
            ],
        ),
    };
    // A fresh document with fixed, valid keys: these cannot fail.
    tx.put(ROOT, "schema", SCHEMA_VERSION).expect("fresh doc");
    tx.put(ROOT, "kind", kind).expect("fresh doc");
    for (k, v) in fields {
        tx.put(ROOT, k, v).expect("fresh doc");
    }
    for c in containers {
        tx.put_object(ROOT, *c, ObjType::Map).expect("fresh doc");
    }
    tx.commit();
    doc
}

/// The hash of document `id`'s genesis change.
pub fn genesis_hash(id: &DocId) -> ChangeHash {
    genesis(id).get_heads()[0]
}
