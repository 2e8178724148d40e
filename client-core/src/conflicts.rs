//! Fields written concurrently with different values, and how a lead resolves them.
//!
//! Automerge keeps every concurrent value of a map key (`get_all`); one of them wins
//! deterministically for ordinary reads. Redline surfaces them instead: each conflict
//! lists every value with who wrote it (from the change's `member@device` message) and
//! when. Resolving writes the chosen value once more; that write supersedes all the
//! values it saw, so after it syncs the conflict is gone on every replica.
//!
//! A conflict's id is its path: `tasks/<task>/title`, `needs/<need>/priority`,
//! `teams/<team>`.

use automerge::transaction::{Transactable, Transaction};
use automerge::{Automerge, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use serde::Serialize;

use crate::Error;
use crate::schema::{child_map, parse_commit_message};

/// One of the values of a conflicting field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConflictValue {
    /// The value, as text (`(map)`, `(text)`... for objects).
    pub value: String,
    /// Member who wrote it.
    pub member: String,
    /// Device it was written on.
    pub device: String,
    /// When (unix ms, from the change's timestamp; second precision).
    pub at: i64,
}

/// A field with concurrent, different values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conflict {
    /// Path of the field; pass it to resolve.
    pub id: String,
    /// The item (task, need, household...) it belongs to, or the container for flat maps.
    pub item: String,
    /// The field.
    pub field: String,
    /// The values, in a fixed order (time, member, device); choices index this list.
    pub values: Vec<ConflictValue>,
}

fn value_text(v: &Value<'_>) -> String {
    match v {
        Value::Scalar(s) => match s.as_str() {
            Some(t) => t.to_owned(),
            None => s.to_string(),
        },
        Value::Object(ObjType::Map) => "(map)".into(),
        Value::Object(ObjType::Text) => "(text)".into(),
        Value::Object(_) => "(object)".into(),
    }
}

/// The values at `obj[key]` with their authors, in the fixed order.
fn values_at(
    doc: &Automerge,
    meta: &Automerge,
    obj: &ObjId,
    key: &str,
) -> Result<Vec<(ConflictValue, Value<'static>)>, Error> {
    let mut out = Vec::new();
    for (value, op) in doc.get_all(obj, key)? {
        let (member, device, at) = match meta
            .hash_for_opid(&op)
            .and_then(|h| meta.get_change_meta_by_hash(&h))
        {
            Some(m) => {
                let (member, device) = parse_commit_message(m.message.as_deref().unwrap_or(""));
                (member, device, m.timestamp.saturating_mul(1000))
            }
            None => (String::new(), String::new(), 0),
        };
        let cv = ConflictValue {
            value: value_text(&value),
            member,
            device,
            at,
        };
        out.push((cv, value.into_owned()));
    }
    out.sort_by(|(a, _), (b, _)| {
        (a.at, &a.member, &a.device, &a.value).cmp(&(b.at, &b.member, &b.device, &b.value))
    });
    Ok(out)
}

fn differ(values: &[(ConflictValue, Value<'static>)]) -> bool {
    values
        .windows(2)
        .any(|w| w[0].1 != w[1].1 || matches!(w[0].1, Value::Object(_)))
}

/// Conflicts in the items under the root maps `containers` (and in the maps' own keys).
pub fn find(doc: &Automerge, containers: &[&str]) -> Result<Vec<Conflict>, Error> {
    let mut out = Vec::new();
    for &name in containers {
        let Some(c) = child_map(doc, &ROOT, name)? else {
            continue;
        };
        for key in doc.keys(&c).collect::<Vec<_>>() {
            let values = values_at(doc, doc, &c, &key)?;
            if values.len() > 1 && differ(&values) {
                out.push(Conflict {
                    id: format!("{name}/{key}"),
                    item: name.to_owned(),
                    field: key.clone(),
                    values: values.into_iter().map(|(v, _)| v).collect(),
                });
                continue;
            }
            let Some(item) = child_map(doc, &c, &key)? else {
                continue;
            };
            for field in doc.keys(&item).collect::<Vec<_>>() {
                let values = values_at(doc, doc, &item, &field)?;
                if values.len() > 1 && differ(&values) {
                    out.push(Conflict {
                        id: format!("{name}/{key}/{field}"),
                        item: key.clone(),
                        field,
                        values: values.into_iter().map(|(v, _)| v).collect(),
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Finds value number `choice` (an index into [`Conflict::values`]) of conflict `id`:
/// the object, the field and the value to write again.
pub(crate) fn choose(
    doc: &Automerge,
    id: &str,
    choice: usize,
) -> Result<(ObjId, String, ScalarValue), Error> {
    let parts: Vec<&str> = id.split('/').collect();
    let (field, path) = parts
        .split_last()
        .ok_or_else(|| Error::Invalid("empty conflict id".into()))?;
    let mut obj = ROOT;
    for seg in path {
        obj =
            child_map(doc, &obj, seg)?.ok_or_else(|| Error::NotFound(format!("conflict {id}")))?;
    }
    let values = values_at(doc, doc, &obj, field)?;
    if values.len() < 2 {
        return Err(Error::NotFound(format!(
            "conflict {id} (already resolved?)"
        )));
    }
    let n = values.len();
    let (_, chosen) = values.into_iter().nth(choice).ok_or_else(|| {
        Error::Invalid(format!(
            "conflict {id} has {n} values; choice {choice} is out of range"
        ))
    })?;
    match chosen {
        Value::Scalar(s) => Ok((obj, (*field).to_owned(), s.into_owned())),
        Value::Object(_) => Err(Error::Invalid(format!(
            "conflict {id} is between whole objects; edit the fields instead"
        ))),
    }
}

/// Writes the chosen value; it supersedes every value it saw.
pub(crate) fn resolve(
    tx: &mut Transaction<'_>,
    chosen: (ObjId, String, ScalarValue),
) -> Result<(), Error> {
    let (obj, field, value) = chosen;
    tx.put(&obj, field.as_str(), value)?;
    Ok(())
}
