//! A team's work ledger for one day (`ledger/<team>/<day>`).
//!
//! Layout (schema 1):
//!
//! ```text
//! { schema: 1, kind: "ledger", team, day,
//!   tasks:   { <task>:  { kind, title, place?, requirements?, zone?, due?,
//!                         assignees: { <member>: true },
//!                         status_log: { <entry>: { to, epoch, by, device, at } },
//!                         created_by, device, created_at } },
//!   duty:    { <entry>: { member, device, action: "in" | "out", at } },
//!   tallies: { <device>: { <member>: { <metric>: Counter } } } }
//! ```
//!
//! Merge rules this layout buys:
//! - root containers come from the shared genesis (see [`crate::schema`]);
//! - every task, duty entry and status entry has a fresh random key, so concurrent
//!   additions never collide; a task's `assignees` and `status_log` are created with it;
//! - task status is derived from its entries (see [`crate::workflow`]);
//! - assignees are a set: concurrent reassignments keep every member anyone assigned;
//! - tallies are counters under the device's own key: one writer per counter, totals are
//!   sums, so increments from 16 phones add up and never overwrite;
//! - concurrent edits of one field (a title, a due time) stay as Automerge conflicts
//!   until a lead resolves them (see [`crate::conflicts`]).

use std::collections::BTreeMap;

use automerge::transaction::{Transactable, Transaction};
use automerge::{Automerge, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use redline_proto::{MemberId, ZoneId};
use serde::Serialize;

use crate::Error;
use crate::schema::{
    Writer, child_map, child_maps, container, get_i64, get_str, new_key, numbers, optional_text,
    required_text, schema_of, set_members,
};
use crate::workflow::{self, Derived, StatusEntry, TaskStatus, Transition};

/// The tallies every team keeps; other names are allowed (see [`validate_metric`]).
pub const STANDARD_TALLIES: [&str; 4] = [
    "samples_taken",
    "households_visited",
    "door_sensors_fitted",
    "deliveries",
];

/// What kind of work a task is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
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
    #[default]
    Other,
}

impl TaskKind {
    /// Every kind.
    pub const ALL: [TaskKind; 6] = [
        TaskKind::Transfer,
        TaskKind::Screening,
        TaskKind::Supply,
        TaskKind::FlowTracing,
        TaskKind::Inspection,
        TaskKind::Other,
    ];

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
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown task kind {s:?}: use transfer, screening, supply, flow_tracing, inspection or other"
            ))
        })
    }
}

/// A task to add to a ledger.
#[derive(Clone, Debug, Default)]
pub struct NewTask {
    /// What kind of work.
    pub kind: TaskKind,
    /// Short description; must not be empty.
    pub title: String,
    /// Target place (address, building).
    pub place: Option<String>,
    /// What it needs (people, equipment).
    pub requirements: Option<String>,
    /// The zone it happens in.
    pub zone: Option<ZoneId>,
    /// Members assigned from the start.
    pub assignees: Vec<MemberId>,
    /// When it is due (unix ms).
    pub due: Option<i64>,
}

impl NewTask {
    /// A task of `kind` titled `title`, nothing else set.
    pub fn new(kind: TaskKind, title: impl Into<String>) -> Self {
        Self {
            kind,
            title: title.into(),
            ..Self::default()
        }
    }
}

/// Changes to a task's fields; `None` leaves a field alone, `Some(None)` clears it.
#[derive(Clone, Debug, Default)]
pub struct TaskUpdate {
    /// New title.
    pub title: Option<String>,
    /// New or cleared place.
    pub place: Option<Option<String>>,
    /// New or cleared requirements.
    pub requirements: Option<Option<String>>,
    /// New or cleared zone.
    pub zone: Option<Option<ZoneId>>,
    /// New or cleared due time.
    pub due: Option<Option<i64>>,
}

/// A task as read from a ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Task {
    /// Its key in the ledger.
    pub id: String,
    /// What kind of work.
    pub kind: TaskKind,
    /// Short description.
    pub title: String,
    /// Target place.
    pub place: Option<String>,
    /// What it needs.
    pub requirements: Option<String>,
    /// Zone.
    pub zone: Option<String>,
    /// Assigned members, sorted.
    pub assignees: Vec<String>,
    /// Due time (unix ms).
    pub due: Option<i64>,
    /// Current status, derived from the entries.
    pub status: Derived<TaskStatus>,
    /// Every status entry, in (epoch, time) order.
    pub history: Vec<StatusEntry>,
    /// Who created it.
    pub created_by: String,
    /// On which device.
    pub device: String,
    /// When (unix ms, device clock).
    pub created_at: i64,
}

/// Checking in or out of duty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DutyAction {
    /// Starting duty.
    CheckIn,
    /// Ending duty.
    CheckOut,
}

impl DutyAction {
    /// The name stored in the document.
    pub fn as_str(self) -> &'static str {
        match self {
            DutyAction::CheckIn => "in",
            DutyAction::CheckOut => "out",
        }
    }
}

/// One duty check-in or check-out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DutyEntry {
    /// Entry key.
    pub id: String,
    /// Who.
    pub member: String,
    /// On which device.
    pub device: String,
    /// In or out.
    pub action: DutyAction,
    /// When (unix ms, device clock).
    pub at: i64,
}

/// The typed view of one day's ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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
    /// Totals per tally, summed over devices and members.
    pub tallies: BTreeMap<String, i64>,
    /// Totals per member and tally.
    pub tallies_by_member: BTreeMap<String, BTreeMap<String, i64>>,
}

impl LedgerView {
    /// Members whose latest duty entry is a check-in, sorted.
    pub fn on_duty(&self) -> Vec<String> {
        let mut latest: BTreeMap<&str, &DutyEntry> = BTreeMap::new();
        for e in &self.duty {
            // `duty` is sorted by (at, key): later entries replace earlier ones.
            latest.insert(&e.member, e);
        }
        latest
            .into_iter()
            .filter(|(_, e)| e.action == DutyAction::CheckIn)
            .map(|(m, _)| m.to_owned())
            .collect()
    }

    /// Tasks past their due time at `now_ms` and neither done nor cancelled.
    pub fn overdue(&self, now_ms: i64) -> Vec<&Task> {
        use crate::workflow::Stage;
        self.tasks
            .iter()
            .filter(|t| t.due.is_some_and(|d| d < now_ms) && !t.status.status.is_closed())
            .collect()
    }

    /// A task by id.
    pub fn task(&self, id: &str) -> Option<&Task> {
        self.tasks.iter().find(|t| t.id == id)
    }
}

fn task_obj<R: ReadDoc>(doc: &R, id: &str) -> Result<ObjId, Error> {
    child_map(doc, &container(doc, "tasks")?, id)?
        .ok_or_else(|| Error::NotFound(format!("task {id}")))
}

fn put_optional(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    key: &str,
    value: Option<ScalarValue>,
) -> Result<(), Error> {
    match value {
        Some(v) => tx.put(obj, key, v)?,
        None => {
            if tx.get(obj, key)?.is_some() {
                tx.delete(obj, key)?;
            }
        }
    }
    Ok(())
}

fn check_due(due: Option<i64>) -> Result<(), Error> {
    match due {
        Some(d) if d < 0 => Err(Error::Invalid(
            "a due time is unix milliseconds, not negative".into(),
        )),
        _ => Ok(()),
    }
}

pub(crate) fn add_task(
    tx: &mut Transaction<'_>,
    w: &Writer<'_>,
    task: &NewTask,
) -> Result<String, Error> {
    let title = required_text("a task title", &task.title, 500)?;
    let place = optional_text("a task place", task.place.as_deref().unwrap_or(""), 500)?;
    let requirements = optional_text(
        "task requirements",
        task.requirements.as_deref().unwrap_or(""),
        2000,
    )?;
    check_due(task.due)?;
    let tasks = container(tx, "tasks")?;
    let id = new_key();
    let t = tx.put_object(&tasks, id.as_str(), ObjType::Map)?;
    tx.put(&t, "kind", task.kind.as_str())?;
    tx.put(&t, "title", title)?;
    if let Some(p) = place {
        tx.put(&t, "place", p)?;
    }
    if let Some(r) = requirements {
        tx.put(&t, "requirements", r)?;
    }
    if let Some(z) = &task.zone {
        tx.put(&t, "zone", z.as_str())?;
    }
    if let Some(d) = task.due {
        tx.put(&t, "due", ScalarValue::Timestamp(d))?;
    }
    let assignees = tx.put_object(&t, "assignees", ObjType::Map)?;
    let log = tx.put_object(&t, "status_log", ObjType::Map)?;
    tx.put(&t, "created_by", w.member.as_str())?;
    tx.put(&t, "device", w.device.as_str())?;
    tx.put(&t, "created_at", ScalarValue::Timestamp(w.now_ms))?;
    if !task.assignees.is_empty() {
        for m in &task.assignees {
            tx.put(&assignees, m.as_str(), true)?;
        }
        workflow::record(
            tx,
            &log,
            w,
            "the task",
            Transition::To(TaskStatus::Assigned),
        )?;
    }
    Ok(id)
}

pub(crate) fn update_task(
    tx: &mut Transaction<'_>,
    id: &str,
    update: &TaskUpdate,
) -> Result<(), Error> {
    let t = task_obj(tx, id)?;
    if let Some(title) = &update.title {
        tx.put(&t, "title", required_text("a task title", title, 500)?)?;
    }
    if let Some(place) = &update.place {
        let v = optional_text("a task place", place.as_deref().unwrap_or(""), 500)?;
        put_optional(tx, &t, "place", v.map(ScalarValue::from))?;
    }
    if let Some(req) = &update.requirements {
        let v = optional_text("task requirements", req.as_deref().unwrap_or(""), 2000)?;
        put_optional(tx, &t, "requirements", v.map(ScalarValue::from))?;
    }
    if let Some(zone) = &update.zone {
        put_optional(
            tx,
            &t,
            "zone",
            zone.as_ref().map(|z| ScalarValue::from(z.as_str())),
        )?;
    }
    if let Some(due) = update.due {
        check_due(due)?;
        put_optional(tx, &t, "due", due.map(ScalarValue::Timestamp))?;
    }
    Ok(())
}

/// Adds `member` to the task's assignees; moves an open task to assigned.
pub(crate) fn assign(
    tx: &mut Transaction<'_>,
    w: &Writer<'_>,
    id: &str,
    member: &MemberId,
) -> Result<(), Error> {
    use crate::workflow::Stage;
    let t = task_obj(tx, id)?;
    let assignees = child_map(tx, &t, "assignees")?
        .ok_or_else(|| Error::Corrupt(format!("task {id} has no assignees set")))?;
    tx.put(&assignees, member.as_str(), true)?;
    let log = child_map(tx, &t, "status_log")?
        .ok_or_else(|| Error::Corrupt(format!("task {id} has no status log")))?;
    let current: Derived<TaskStatus> = workflow::derive(&workflow::entries(tx, &log)?);
    if current.status.rank() < TaskStatus::Assigned.rank() {
        workflow::record(
            tx,
            &log,
            w,
            "the task",
            Transition::To(TaskStatus::Assigned),
        )?;
    }
    Ok(())
}

/// Removes `member` from the task's assignees.
pub(crate) fn unassign(tx: &mut Transaction<'_>, id: &str, member: &MemberId) -> Result<(), Error> {
    let t = task_obj(tx, id)?;
    let assignees = child_map(tx, &t, "assignees")?
        .ok_or_else(|| Error::Corrupt(format!("task {id} has no assignees set")))?;
    if tx.get(&assignees, member.as_str())?.is_none() {
        return Err(Error::Invalid(format!(
            "{member} is not assigned to task {id}"
        )));
    }
    tx.delete(&assignees, member.as_str())?;
    Ok(())
}

/// Records a status transition of a task.
pub(crate) fn set_status(
    tx: &mut Transaction<'_>,
    w: &Writer<'_>,
    id: &str,
    transition: Transition<TaskStatus>,
) -> Result<(), Error> {
    let t = task_obj(tx, id)?;
    let log = child_map(tx, &t, "status_log")?
        .ok_or_else(|| Error::Corrupt(format!("task {id} has no status log")))?;
    workflow::record(tx, &log, w, &format!("task {id}"), transition)
}

pub(crate) fn record_duty(
    tx: &mut Transaction<'_>,
    w: &Writer<'_>,
    action: DutyAction,
) -> Result<(), Error> {
    let duty = container(tx, "duty")?;
    let e = tx.put_object(&duty, new_key().as_str(), ObjType::Map)?;
    tx.put(&e, "member", w.member.as_str())?;
    tx.put(&e, "device", w.device.as_str())?;
    tx.put(&e, "action", action.as_str())?;
    tx.put(&e, "at", ScalarValue::Timestamp(w.now_ms))?;
    Ok(())
}

/// Checks a tally name: 1 to 40 characters from `a-z`, `0-9` and `_`.
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

fn map_under(tx: &mut Transaction<'_>, parent: &ObjId, key: &str) -> Result<ObjId, Error> {
    Ok(match child_map(tx, parent, key)? {
        Some(id) => id,
        None => tx.put_object(parent, key, ObjType::Map)?,
    })
}

/// Adds a positive `amount` to the writer's counter for `metric`.
pub(crate) fn add_to_tally(
    tx: &mut Transaction<'_>,
    w: &Writer<'_>,
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
    // Only this device ever writes under its own key: no concurrent creation anywhere below.
    let device = map_under(tx, &tallies, w.device.as_str())?;
    let mine = map_under(tx, &device, w.member.as_str())?;
    match tx.get(&mine, metric)? {
        Some((Value::Scalar(s), _)) if s.is_counter() => tx.increment(&mine, metric, amount)?,
        _ => tx.put(&mine, metric, ScalarValue::counter(amount))?,
    }
    Ok(())
}

/// The day's tally totals (per metric, and per member and metric), read from the
/// `tallies` map alone: what a screen of totals refreshes on every change, without
/// the tasks and duty entries of [`view`].
pub fn tally_totals(doc: &Automerge) -> Result<(Totals, BTreeMap<String, Totals>), Error> {
    let mut tallies = BTreeMap::new();
    let mut by_member: BTreeMap<String, Totals> = BTreeMap::new();
    for (_device, per_device) in child_maps(doc, &container(doc, "tallies")?)? {
        for (member, counters) in child_maps(doc, &per_device)? {
            for (metric, v) in numbers(doc, &counters) {
                *tallies.entry(metric.clone()).or_insert(0) += v;
                *by_member
                    .entry(member.clone())
                    .or_default()
                    .entry(metric)
                    .or_insert(0) += v;
            }
        }
    }
    Ok((tallies, by_member))
}

/// Totals per metric.
pub type Totals = BTreeMap<String, i64>;

/// Reads the typed view of a ledger document.
pub fn view(doc: &Automerge) -> Result<LedgerView, Error> {
    let mut tasks = Vec::new();
    for (id, t) in child_maps(doc, &container(doc, "tasks")?)? {
        let history = match child_map(doc, &t, "status_log")? {
            Some(log) => workflow::entries(doc, &log)?,
            None => Vec::new(),
        };
        let mut assignees = match child_map(doc, &t, "assignees")? {
            Some(a) => set_members(doc, &a),
            None => Vec::new(),
        };
        assignees.sort();
        let kind = get_str(doc, &t, "kind")?.unwrap_or_default();
        tasks.push(Task {
            kind: TaskKind::parse(&kind).unwrap_or(TaskKind::Other),
            title: get_str(doc, &t, "title")?.unwrap_or_default(),
            place: get_str(doc, &t, "place")?,
            requirements: get_str(doc, &t, "requirements")?,
            zone: get_str(doc, &t, "zone")?,
            due: get_i64(doc, &t, "due")?,
            status: workflow::derive(&history),
            history,
            assignees,
            created_by: get_str(doc, &t, "created_by")?.unwrap_or_default(),
            device: get_str(doc, &t, "device")?.unwrap_or_default(),
            created_at: get_i64(doc, &t, "created_at")?.unwrap_or(0),
            id,
        });
    }
    tasks.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));

    let mut duty = Vec::new();
    for (id, e) in child_maps(doc, &container(doc, "duty")?)? {
        let action = match get_str(doc, &e, "action")?.as_deref() {
            Some("out") => DutyAction::CheckOut,
            _ => DutyAction::CheckIn,
        };
        duty.push(DutyEntry {
            member: get_str(doc, &e, "member")?.unwrap_or_default(),
            device: get_str(doc, &e, "device")?.unwrap_or_default(),
            action,
            at: get_i64(doc, &e, "at")?.unwrap_or(0),
            id,
        });
    }
    duty.sort_by(|a, b| (a.at, &a.id).cmp(&(b.at, &b.id)));

    let (tallies, tallies_by_member) = tally_totals(doc)?;

    Ok(LedgerView {
        team: get_str(doc, &ROOT, "team")?.unwrap_or_default(),
        day: get_str(doc, &ROOT, "day")?.unwrap_or_default(),
        schema: schema_of(doc)?,
        tasks,
        duty,
        tallies,
        tallies_by_member,
    })
}
