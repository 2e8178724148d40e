//! What every Redline document shares: the schema version, the genesis change, who wrote
//! a change, and typed reads of Automerge fields.
//!
//! **Genesis.** Each document's root containers come from a first change that every
//! device produces byte for byte ([`redline_proto::genesis`], shared with the relay,
//! which accepts the genesis actor for that one change only).
//!
//! **Forward compatibility.** Writers only ever put the keys they own and never rewrite
//! whole objects, so fields added by a newer schema survive edits by an older build.

use automerge::{ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use redline_proto::{DeviceId, MemberId};

use crate::Error;

pub use redline_proto::genesis::SCHEMA_VERSION;
pub(crate) use redline_proto::genesis::genesis;

/// Who makes a change, and when (device clock). Stored on every entry.
#[derive(Clone, Copy, Debug)]
pub struct Writer<'a> {
    /// The member.
    pub member: &'a MemberId,
    /// The device.
    pub device: &'a DeviceId,
    /// Unix milliseconds.
    pub now_ms: i64,
}

impl Writer<'_> {
    /// The commit message that attributes a change: `member@device`.
    pub fn commit_message(&self) -> String {
        format!("{}@{}", self.member, self.device)
    }
}

/// Commits `tx` attributed to `w`: its time (seconds) and `member@device` message. The
/// transaction's patch log (empty unless it was opened with an active one).
pub(crate) fn commit(
    tx: automerge::transaction::Transaction<'_>,
    w: &Writer<'_>,
) -> automerge::PatchLog {
    tx.commit_with(
        automerge::transaction::CommitOptions::default()
            .with_time(w.now_ms.div_euclid(1000))
            .with_message(w.commit_message()),
    )
    .1
}

/// Splits a commit message made by [`Writer::commit_message`].
pub(crate) fn parse_commit_message(msg: &str) -> (String, String) {
    match msg.split_once('@') {
        Some((m, d)) => (m.to_owned(), d.to_owned()),
        None => (msg.to_owned(), String::new()),
    }
}

/// A fresh random key for an entry (task, duty entry, need, status entry...).
pub(crate) fn new_key() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The root map named `name`.
pub(crate) fn container<R: ReadDoc>(doc: &R, name: &str) -> Result<ObjId, Error> {
    child_map(doc, &ROOT, name)?
        .ok_or_else(|| Error::Corrupt(format!("document has no {name} map")))
}

/// The map at `parent[key]`, if there is one.
pub(crate) fn child_map<R: ReadDoc>(
    doc: &R,
    parent: &ObjId,
    key: &str,
) -> Result<Option<ObjId>, Error> {
    Ok(match doc.get(parent, key)? {
        Some((Value::Object(ObjType::Map), id)) => Some(id),
        _ => None,
    })
}

/// `(key, map)` for every map under `parent`, in one pass over it (a `get` per key
/// seeks the map again each time: three times slower on a day's ledger).
pub(crate) fn child_maps<R: ReadDoc>(
    doc: &R,
    parent: &ObjId,
) -> Result<Vec<(String, ObjId)>, Error> {
    Ok(doc
        .map_range(parent, ..)
        .filter(|item| matches!(item.value, automerge::ValueRef::Object(ObjType::Map)))
        .map(|item| (item.key.clone().into_owned(), item.id()))
        .collect())
}

/// `(key, number)` for every number under `parent` (integers, counters, timestamps),
/// in one pass over it.
pub(crate) fn numbers<R: ReadDoc>(doc: &R, parent: &ObjId) -> Vec<(String, i64)> {
    doc.map_range(parent, ..)
        .filter_map(|item| match item.value.into_value() {
            Value::Scalar(s) => scalar_i64(&s).map(|n| (item.key.into_owned(), n)),
            Value::Object(_) => None,
        })
        .collect()
}

/// A string field.
pub(crate) fn get_str<R: ReadDoc>(
    doc: &R,
    obj: &ObjId,
    key: &str,
) -> Result<Option<String>, Error> {
    Ok(match doc.get(obj, key)? {
        Some((Value::Scalar(s), _)) => s.as_str().map(str::to_owned),
        Some((Value::Object(ObjType::Text), id)) => Some(doc.text(&id)?),
        _ => None,
    })
}

/// An integer-like field (int, uint, timestamp, counter).
pub(crate) fn get_i64<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Result<Option<i64>, Error> {
    Ok(match doc.get(obj, key)? {
        Some((Value::Scalar(s), _)) => scalar_i64(&s),
        _ => None,
    })
}

pub(crate) fn scalar_i64(s: &ScalarValue) -> Option<i64> {
    match s {
        ScalarValue::Timestamp(t) | ScalarValue::Int(t) => Some(*t),
        ScalarValue::Uint(u) => Some(i64::try_from(*u).unwrap_or(i64::MAX)),
        ScalarValue::Counter(c) => Some(i64::from(c)),
        _ => None,
    }
}

/// The keys of a set (a map of key → true).
pub(crate) fn set_members<R: ReadDoc>(doc: &R, obj: &ObjId) -> Vec<String> {
    doc.keys(obj).collect()
}

/// The schema version a document says it has (0 if none).
pub(crate) fn schema_of<R: ReadDoc>(doc: &R) -> Result<u64, Error> {
    Ok(get_i64(doc, &ROOT, "schema")?
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(0))
}

/// Checks free text: trimmed, not empty, at most `max` characters.
pub(crate) fn required_text(what: &str, s: &str, max: usize) -> Result<String, Error> {
    let t = s.trim();
    if t.is_empty() {
        return Err(Error::Invalid(format!("{what} must not be empty")));
    }
    optional_text(what, t, max).map(|o| o.unwrap_or_default())
}

/// Checks optional free text: trimmed, empty means none, at most `max` characters.
pub(crate) fn optional_text(what: &str, s: &str, max: usize) -> Result<Option<String>, Error> {
    let t = s.trim();
    if t.chars().count() > max {
        return Err(Error::Invalid(format!(
            "{what} has at most {max} characters"
        )));
    }
    Ok((!t.is_empty()).then(|| t.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use redline_proto::DocId;

    /// The one-pass readers see what a `get` per key sees: the winning value of each
    /// key, maps only (or numbers only), concurrent writes resolved the same way.
    #[test]
    fn one_pass_readers_agree_with_a_get_per_key() {
        use automerge::transaction::Transactable;
        let mut a = automerge::AutoCommit::new();
        let m = a.put_object(ROOT, "m", ObjType::Map).unwrap();
        a.put_object(&m, "map", ObjType::Map).unwrap();
        a.put_object(&m, "list", ObjType::List).unwrap();
        a.put(&m, "text", "x").unwrap();
        a.put(&m, "count", ScalarValue::counter(3)).unwrap();
        a.put(&m, "int", 7i64).unwrap();
        a.put(&m, "both", 1i64).unwrap();
        let mut b = a.fork();
        a.put_object(&m, "both", ObjType::Map).unwrap();
        b.put(&m, "both", 2i64).unwrap();
        b.increment(&m, "count", 4).unwrap();
        a.merge(&mut b).unwrap();
        let doc = a.document();
        let by_get: Vec<(String, ObjId)> = doc
            .keys(&m)
            .filter_map(|k| child_map(doc, &m, &k).unwrap().map(|id| (k, id)))
            .collect();
        assert_eq!(child_maps(doc, &m).unwrap(), by_get);
        let by_get: Vec<(String, i64)> = doc
            .keys(&m)
            .filter_map(|k| get_i64(doc, &m, &k).unwrap().map(|n| (k, n)))
            .collect();
        assert_eq!(numbers(doc, &m), by_get);
        assert!(by_get.contains(&("count".into(), 7)), "{by_get:?}");
    }

    #[test]
    fn genesis_is_identical_on_every_device_and_distinct_per_document() {
        for id in ["ledger/t1/2026-11-29", "households/z1", "roster/org"] {
            let id = DocId::parse(id).unwrap();
            assert_eq!(genesis(&id).get_heads(), genesis(&id).get_heads());
        }
        let a = genesis(&DocId::parse("ledger/t1/2026-11-29").unwrap());
        let b = genesis(&DocId::parse("ledger/t1/2026-11-30").unwrap());
        assert_ne!(a.get_heads(), b.get_heads());
    }
}
