//! Who a change claims to be, checked against the token that pushed it.
//!
//! The actor binding ([`Hub::check_actors`](crate::hub::Hub::check_actors)) proves which
//! device made a change. The change's *content* also names people: the commit message
//! is `member@device` (how conflicts name their authors), entries carry `member`,
//! `device`, `by` and `created_by` fields, and tallies live under
//! `tallies/<device>/<member>/<metric>` (one writer per counter). All of that comes from
//! the device, so the relay checks it on the change's own operations, before anything
//! is applied:
//!
//! - a commit message, if any, must be exactly the token's `member@device`;
//! - a `device` field may only name the token's device; `member`, `by` and
//!   `created_by` only its member (leads and operators may name other members: a lead
//!   checks volunteers in);
//! - a key put directly under `tallies` must be the token's device, and a counter may
//!   only be incremented inside a map made by one of the device's own actors;
//! - the root keys the genesis made (schema, kind, the containers) are nobody's to
//!   rewrite: a device replacing `tallies` would hide every counter.

use automerge::legacy::{Key, ObjectId, OpType};
use automerge::{ActorId, Change, ReadDoc, ScalarValue};
use redline_proto::token::Role;
use redline_proto::{DeviceId, DocId, DocKind, MemberId};

/// Who pushes a change: the token's member and device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Author {
    /// The token's device.
    pub device: DeviceId,
    /// The token's member.
    pub member: MemberId,
    /// The token's role (leads may name other members in entries).
    pub role: Role,
}

impl Author {
    /// The commit message every change of this author carries.
    pub fn message(&self) -> String {
        format!("{}@{}", self.member, self.device)
    }
}

/// What a document's genesis made that nobody else may touch: its root keys (schema,
/// kind, the containers...) and, in a ledger, the `tallies` map (`counter@actor`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Genesis {
    root_keys: Vec<String>,
    tallies: Option<String>,
}

impl Genesis {
    /// The genesis facts of `doc`.
    pub fn of(doc: &DocId) -> Self {
        let genesis = redline_proto::genesis::genesis(doc);
        let root_keys = genesis.keys(automerge::ROOT).collect();
        let tallies = match (doc.kind(), genesis.get(automerge::ROOT, "tallies")) {
            (DocKind::Ledger(..), Ok(Some((_, id)))) => Some(id.to_string()),
            _ => None,
        };
        Self { root_keys, tallies }
    }
}

/// Refuses `change` if its content names anyone but `author`, or touches what the
/// document's `genesis` made; `own_actor` says whether an actor belongs to the author's
/// device.
pub fn check(
    author: &Author,
    change: &Change,
    genesis: &Genesis,
    own_actor: &dyn Fn(&ActorId) -> bool,
) -> Result<(), String> {
    let tallies = genesis.tallies.as_deref();
    if let Some(message) = change.message()
        && *message != author.message()
    {
        return Err(format!(
            "a change signed \"{message}\", but this token belongs to {}",
            author.message()
        ));
    }
    let may_name_others = matches!(author.role, Role::Lead | Role::Operator);
    for op in change.decode().operations {
        let key = match &op.key {
            Key::Map(k) => Some(k.as_str()),
            Key::Seq(_) => None,
        };
        let obj = match &op.obj {
            // Other root keys stay open (a newer schema may add some).
            ObjectId::Root => {
                if let Some(k) = key
                    && genesis.root_keys.iter().any(|g| g == k)
                {
                    return Err(format!(
                        "a change to the document's \"{k}\" (its genesis made it; nobody rewrites it)"
                    ));
                }
                continue;
            }
            ObjectId::Id(id) => id,
        };
        if let (Some(field), OpType::Put(ScalarValue::Str(value))) = (key, &op.action) {
            let named = value.as_str();
            match field {
                "device" if named != author.device.as_str() => {
                    return Err(format!(
                        "an entry names device {named}, but this token belongs to {}",
                        author.device
                    ));
                }
                "member" | "by" | "created_by"
                    if !may_name_others && named != author.member.as_str() =>
                {
                    return Err(format!(
                        "an entry names member {named}, but this token belongs to {}",
                        author.member
                    ));
                }
                _ => {}
            }
        }
        if let Some(tallies) = tallies
            && obj.to_string() == tallies
            && let Some(k) = key
            && k != author.device.as_str()
        {
            return Err(format!(
                "a tally under device {k}, but this token belongs to {}",
                author.device
            ));
        }
        if matches!(op.action, OpType::Increment(_)) && !own_actor(obj.actor()) {
            return Err("an increment of another device's counter".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ObjType, ROOT};

    fn author(role: Role) -> Author {
        Author {
            device: DeviceId::new("phone-a").unwrap(),
            member: MemberId::new("ana").unwrap(),
            role,
        }
    }

    fn ledger() -> DocId {
        DocId::parse("ledger/t1/2026-11-29").unwrap()
    }

    /// One change on the ledger's genesis by `actor`, with `message`.
    fn change(
        message: Option<&str>,
        f: impl FnOnce(&mut automerge::transaction::Transaction<'_>, &automerge::ObjId),
    ) -> Change {
        let mut doc = redline_proto::genesis::genesis(&ledger()).with_actor(ActorId::from([7; 16]));
        let mut tx = doc.transaction();
        let (_, tallies) = tx.get(ROOT, "tallies").unwrap().unwrap();
        f(&mut tx, &tallies);
        match message {
            Some(m) => {
                tx.commit_with(
                    automerge::transaction::CommitOptions::default().with_message(m.to_string()),
                );
            }
            None => {
                tx.commit();
            }
        }
        doc.get_last_local_change().unwrap().clone()
    }

    fn verdict(role: Role, c: &Change) -> Result<(), String> {
        check(&author(role), c, &Genesis::of(&ledger()), &|a| {
            *a == ActorId::from([7; 16])
        })
    }

    #[test]
    fn honest_changes_pass() {
        let c = change(Some("ana@phone-a"), |tx, tallies| {
            let d = tx.put_object(tallies, "phone-a", ObjType::Map).unwrap();
            let m = tx.put_object(&d, "ana", ObjType::Map).unwrap();
            tx.put(&m, "samples", ScalarValue::counter(0)).unwrap();
            tx.increment(&m, "samples", 3).unwrap();
        });
        assert_eq!(verdict(Role::Volunteer, &c), Ok(()));
    }

    #[test]
    fn forged_names_are_refused() {
        let wrong_message = change(Some("lead@phone-l"), |tx, _| {
            let (_, tasks) = tx.get(ROOT, "tasks").unwrap().unwrap();
            tx.put_object(&tasks, "t1", ObjType::Map).unwrap();
        });
        assert!(verdict(Role::Volunteer, &wrong_message).is_err());
        let other_counter = change(Some("ana@phone-a"), |tx, tallies| {
            tx.put_object(tallies, "phone-b", ObjType::Map).unwrap();
        });
        assert!(verdict(Role::Volunteer, &other_counter).is_err());
        let as_lead = change(Some("ana@phone-a"), |tx, _| {
            let (_, duty) = tx.get(ROOT, "duty").unwrap().unwrap();
            let e = tx.put_object(&duty, "e1", ObjType::Map).unwrap();
            tx.put(&e, "member", "lead").unwrap();
            tx.put(&e, "device", "phone-a").unwrap();
        });
        assert!(verdict(Role::Volunteer, &as_lead).is_err());
        assert_eq!(
            verdict(Role::Lead, &as_lead),
            Ok(()),
            "a lead checks others in"
        );
        let other_device = change(None, |tx, _| {
            let (_, duty) = tx.get(ROOT, "duty").unwrap().unwrap();
            let e = tx.put_object(&duty, "e1", ObjType::Map).unwrap();
            tx.put(&e, "device", "phone-b").unwrap();
        });
        assert!(verdict(Role::Lead, &other_device).is_err());
        let root = change(None, |tx, _| {
            tx.put(ROOT, "tallies", "gone").unwrap();
        });
        assert!(verdict(Role::Operator, &root).is_err());
        let new_root_key = change(None, |tx, _| {
            tx.put(ROOT, "added_by_a_newer_schema", 1).unwrap();
        });
        assert_eq!(verdict(Role::Volunteer, &new_root_key), Ok(()));
    }

    #[test]
    fn increments_need_a_map_of_ones_own() {
        let c = change(Some("ana@phone-a"), |tx, tallies| {
            let d = tx.put_object(tallies, "phone-a", ObjType::Map).unwrap();
            tx.put(&d, "samples", ScalarValue::counter(0)).unwrap();
            tx.increment(&d, "samples", 1).unwrap();
        });
        assert!(
            check(
                &author(Role::Volunteer),
                &c,
                &Genesis::of(&ledger()),
                &|_| false
            )
            .is_err()
        );
    }
}
