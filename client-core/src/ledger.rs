//! A team's work ledger for one day (`ledger/<team>/<day>`): tasks, duty check-ins and
//! tallies, as an Automerge document.
//!
//! Layout (schema 1):
//!
//! ```text
//! { schema: 1, kind: "ledger", team, day,
//!   tasks:   { <task id>:  { kind, title, zone?, place?, created_by, device, created_at } },
//!   duty:    { <entry id>: { member, device, action: "in" | "out", at } },
//!   tallies: { <device id>: { <metric>: Counter } } }
//! ```
//!
//! Merge rules this layout buys:
//! - The root containers come from a *genesis* change that every device produces
//!   identically (fixed actor, time 0), so two phones that start the same day's ledger
//!   offline share one `tasks` map instead of hiding one behind a conflict.
//! - Every task and duty entry has a fresh random key: concurrent additions never collide.
//! - Tallies are counters under the device's own key: a device is the only writer of its
//!   map, so no two devices ever create the same counter, and a total is the sum over
//!   devices (increments from 16 phones add up, never overwrite).

use std::collections::BTreeMap;

use automerge::transaction::{Transactable, Transaction};
use automerge::{ActorId, Automerge, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use redline_proto::{Day, DeviceId, MemberId, TeamId, ZoneId};

use crate::Error;

/// Schema version written by this build.
pub const SCHEMA_VERSION: u64 = 1;

/// Actor of genesis changes. Never used for anything else.
pub(crate) const GENESIS_ACTOR: [u8; 16] = *b"redline-genesis\0";

/// The first change of every ledger document, byte-identical on every device.
pub(crate) fn genesis(team: &TeamId, day: &Day) -> Automerge {
    let mut doc = Automerge::new().with_actor(ActorId::from(GENESIS_ACTOR));
    let mut tx = doc.transaction();
    // Infallible on a fresh document with valid keys; `expect` documents that.
    tx.put(ROOT, "schema", SCHEMA_VERSION).expect("fresh doc");
    tx.put(ROOT, "kind", "ledger").expect("fresh doc");
    tx.put(ROOT, "team", team.as_str()).expect("fresh doc");
    tx.put(ROOT, "day", day.as_str()).expect("fresh doc");
    for container in ["tasks", "duty", "tallies"] {
        tx.put_object(ROOT, container, ObjType::Map)
            .expect("fresh doc");
    }
    tx.commit();
    doc
}

/// What kind of work a task is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskKind {
    /// Transfer of people (to quarantine, to hospital).
    Transfer,
    /// Mass screening / sampling.
    Screening,
    /// Supply delivery.
    Supply,
    /// Tracing contacts and movements.
    FlowTracing,
    /// Inspection patrol.
    Inspection,
    /// Anything else.
    Other,
}

impl TaskKind {
    /// The name stored in the document.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Transfer => "transfer",
            TaskKind::Screening => "screening",
            TaskKind::Supply => "supply",
            TaskKind::FlowTracing => "flow_tracing",
            TaskKind::Inspection => "inspection",
            TaskKind::Other => "other",
        }
    }

    /// Parses a stored or user-given name.
    pub fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "transfer" => TaskKind::Transfer,
            "screening" => TaskKind::Screening,
            "supply" => TaskKind::Supply,
            "flow_tracing" => TaskKind::FlowTracing,
            "inspection" => TaskKind::Inspection,
            "other" => TaskKind::Other,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown task kind {s:?}: use transfer, screening, supply, flow_tracing, inspection or other"
                )));
            }
        })
    }
}

/// A task to add to a ledger.
#[derive(Clone, Debug)]
pub struct NewTask {
    /// What kind of work.
    pub kind: TaskKind,
    /// Short description; must not be empty.
    pub title: String,
    /// The zone it happens in, if any.
    pub zone: Option<ZoneId>,
    /// Target place (address, building), if any.
    pub place: Option<String>,
}

/// A task as read from a ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// Its key in the ledger.
    pub id: String,
    /// What kind of work.
    pub kind: TaskKind,
    /// Short description.
    pub title: String,
    /// Zone, if given.
    pub zone: Option<String>,
    /// Target place, if given.
    pub place: Option<String>,
    /// Who created it.
    pub created_by: String,
    /// On which device.
    pub device: String,
    /// When (unix milliseconds, device clock).
    pub created_at: i64,
}

/// Checking in or out of duty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DutyAction {
    /// Starting duty.
    CheckIn,
    /// Ending duty.
    CheckOut,
}

impl DutyAction {
    fn as_str(self) -> &'static str {
        match self {
            DutyAction::CheckIn => "in",
            DutyAction::CheckOut => "out",
        }
    }
}

/// One duty check-in or check-out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DutyEntry {
    /// Who.
    pub member: String,
    /// On which device.
    pub device: String,
    /// In or out.
    pub action: DutyAction,
    /// When (unix milliseconds, device clock).
    pub at: i64,
}

/// The typed view of one day's ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerView {
    /// The team.
    pub team: String,
    /// The day.
    pub day: String,
    /// Schema version of the document.
    pub schema: u64,
    /// Tasks, oldest first.
    pub tasks: Vec<Task>,
    /// Duty entries, oldest first.
    pub duty: Vec<DutyEntry>,
    /// Totals per tally metric, summed over devices.
    pub tallies: BTreeMap<String, i64>,
}

/// Who makes a change: stored on every entry.
pub(crate) struct Author<'a> {
    pub member: &'a MemberId,
    pub device: &'a DeviceId,
    pub now_ms: i64,
}

fn container<R: ReadDoc>(doc: &R, name: &str) -> Result<ObjId, Error> {
    match doc.get(ROOT, name)? {
        Some((Value::Object(ObjType::Map), id)) => Ok(id),
        _ => Err(Error::Corrupt(format!("ledger has no {name} map"))),
    }
}

fn new_key() -> String {
    format!("{:016x}", rand::random::<u64>())
}

pub(crate) fn add_task(
    tx: &mut Transaction<'_>,
    by: &Author<'_>,
    task: &NewTask,
) -> Result<String, Error> {
    let title = task.title.trim();
    if title.is_empty() {
        return Err(Error::Invalid("a task needs a title".into()));
    }
    if title.chars().count() > 500 {
        return Err(Error::Invalid(
            "a task title has at most 500 characters".into(),
        ));
    }
    let tasks = container(tx, "tasks")?;
    let id = new_key();
    let t = tx.put_object(&tasks, id.as_str(), ObjType::Map)?;
    tx.put(&t, "kind", task.kind.as_str())?;
    tx.put(&t, "title", title)?;
    if let Some(zone) = &task.zone {
        tx.put(&t, "zone", zone.as_str())?;
    }
    if let Some(place) = task
        .place
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        tx.put(&t, "place", place)?;
    }
    tx.put(&t, "created_by", by.member.as_str())?;
    tx.put(&t, "device", by.device.as_str())?;
    tx.put(&t, "created_at", ScalarValue::Timestamp(by.now_ms))?;
    Ok(id)
}

pub(crate) fn record_duty(
    tx: &mut Transaction<'_>,
    by: &Author<'_>,
    action: DutyAction,
) -> Result<(), Error> {
    let duty = container(tx, "duty")?;
    let e = tx.put_object(&duty, new_key().as_str(), ObjType::Map)?;
    tx.put(&e, "member", by.member.as_str())?;
    tx.put(&e, "device", by.device.as_str())?;
    tx.put(&e, "action", action.as_str())?;
    tx.put(&e, "at", ScalarValue::Timestamp(by.now_ms))?;
    Ok(())
}

/// Checks a tally metric name: lowercase words joined by `_`.
pub fn validate_metric(metric: &str) -> Result<(), Error> {
    let ok = !metric.is_empty()
        && metric.len() <= 40
        && metric
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "tally name {metric:?}: use 1 to 40 characters from a-z, 0-9 and _"
        )))
    }
}

pub(crate) fn add_to_tally(
    tx: &mut Transaction<'_>,
    by: &Author<'_>,
    metric: &str,
    amount: i64,
) -> Result<(), Error> {
    validate_metric(metric)?;
    if amount <= 0 {
        return Err(Error::Invalid(format!(
            "a tally grows by a positive amount, not {amount}"
        )));
    }
    let tallies = container(tx, "tallies")?;
    let mine = match tx.get(&tallies, by.device.as_str())? {
        Some((Value::Object(ObjType::Map), id)) => id,
        _ => tx.put_object(&tallies, by.device.as_str(), ObjType::Map)?,
    };
    match tx.get(&mine, metric)? {
        Some((Value::Scalar(s), _)) if s.is_counter() => tx.increment(&mine, metric, amount)?,
        _ => tx.put(&mine, metric, ScalarValue::counter(amount))?,
    }
    Ok(())
}

fn get_str<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Result<Option<String>, Error> {
    Ok(doc
        .get(obj, key)?
        .and_then(|(v, _)| v.as_str().map(str::to_owned)))
}

fn get_i64<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Result<i64, Error> {
    Ok(match doc.get(obj, key)? {
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Timestamp(t) | ScalarValue::Int(t) => *t,
            ScalarValue::Uint(u) => i64::try_from(*u).unwrap_or(i64::MAX),
            ScalarValue::Counter(c) => i64::from(c),
            _ => 0,
        },
        _ => 0,
    })
}

fn maps<R: ReadDoc>(doc: &R, parent: &ObjId) -> Result<Vec<(String, ObjId)>, Error> {
    let mut out = Vec::new();
    for key in doc.keys(parent) {
        if let Some((Value::Object(ObjType::Map), id)) = doc.get(parent, key.as_str())? {
            out.push((key, id));
        }
    }
    Ok(out)
}

/// Reads the typed view of a ledger document.
pub(crate) fn view(doc: &Automerge) -> Result<LedgerView, Error> {
    let mut tasks = Vec::new();
    for (id, t) in maps(doc, &container(doc, "tasks")?)? {
        let kind = get_str(doc, &t, "kind")?.unwrap_or_default();
        tasks.push(Task {
            kind: TaskKind::parse(&kind).unwrap_or(TaskKind::Other),
            title: get_str(doc, &t, "title")?.unwrap_or_default(),
            zone: get_str(doc, &t, "zone")?,
            place: get_str(doc, &t, "place")?,
            created_by: get_str(doc, &t, "created_by")?.unwrap_or_default(),
            device: get_str(doc, &t, "device")?.unwrap_or_default(),
            created_at: get_i64(doc, &t, "created_at")?,
            id,
        });
    }
    tasks.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));

    let mut duty = Vec::new();
    for (_, e) in maps(doc, &container(doc, "duty")?)? {
        let action = match get_str(doc, &e, "action")?.as_deref() {
            Some("out") => DutyAction::CheckOut,
            _ => DutyAction::CheckIn,
        };
        duty.push(DutyEntry {
            member: get_str(doc, &e, "member")?.unwrap_or_default(),
            device: get_str(doc, &e, "device")?.unwrap_or_default(),
            action,
            at: get_i64(doc, &e, "at")?,
        });
    }
    duty.sort_by(|a, b| (a.at, &a.member, &a.device).cmp(&(b.at, &b.member, &b.device)));

    let mut tallies = BTreeMap::new();
    for (_, per_device) in maps(doc, &container(doc, "tallies")?)? {
        for metric in doc.keys(&per_device) {
            *tallies.entry(metric.clone()).or_insert(0) += get_i64(doc, &per_device, &metric)?;
        }
    }

    Ok(LedgerView {
        team: get_str(doc, &ROOT, "team")?.unwrap_or_default(),
        day: get_str(doc, &ROOT, "day")?.unwrap_or_default(),
        schema: u64::try_from(get_i64(doc, &ROOT, "schema")?).unwrap_or(0),
        tasks,
        duty,
        tallies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genesis_is_identical_on_every_device() {
        let team = TeamId::new("t1").unwrap();
        let day = Day::new("2026-11-29").unwrap();
        let a = genesis(&team, &day);
        let b = genesis(&team, &day);
        assert_eq!(a.get_heads(), b.get_heads());
        assert_ne!(
            a.get_heads(),
            genesis(&team, &Day::new("2026-11-30").unwrap()).get_heads()
        );
    }
}
