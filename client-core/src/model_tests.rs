//! Tests of the domain rules on bare Automerge replicas (no store, no network): each
//! merge rule on its own, then a property test that random operations on 3 to 5
//! replicas, merged in random orders and groupings, end identical.

use automerge::{ActorId, Automerge};
use proptest::prelude::*;
use redline_proto::{Day, DeviceId, DocId, MemberId, TeamId, ZoneId};

use crate::Error;
use crate::conflicts;
use crate::households::{self, NeedCategory, NewHousehold, NewNeed, Priority, Vulnerability};
use crate::ledger::{self, NewTask, TaskKind, TaskUpdate};
use crate::reconcile;
use crate::schema::{self, Writer};
use crate::workflow::{NeedStatus, TaskStatus, Transition};

fn ledger_id() -> DocId {
    DocId::ledger(
        &TeamId::new("team-1").unwrap(),
        &Day::new("2026-11-29").unwrap(),
    )
}

fn households_id() -> DocId {
    DocId::households(&ZoneId::new("zone-a").unwrap())
}

/// One device's copy of one document.
struct Replica {
    doc: Automerge,
    member: MemberId,
    device: DeviceId,
    clock: i64,
}

impl Replica {
    fn new(i: usize, id: &DocId) -> Self {
        let mut doc = schema::genesis(id);
        doc.set_actor(ActorId::from([i as u8 + 1; 16]));
        Self {
            doc,
            member: MemberId::new(format!("m{i}")).unwrap(),
            device: DeviceId::new(format!("d{i}")).unwrap(),
            clock: 1_764_000_000_000 + i as i64 * 7_000,
        }
    }

    /// Applies one change like `Client::change` does; a refused change writes nothing.
    fn change<R>(
        &mut self,
        f: impl FnOnce(&mut automerge::transaction::Transaction<'_>, &Writer<'_>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        self.clock += 1_000;
        let w = Writer {
            member: &self.member,
            device: &self.device,
            now_ms: self.clock,
        };
        let mut tx = self.doc.transaction();
        match f(&mut tx, &w) {
            Ok(r) => {
                schema::commit(tx, &w);
                Ok(r)
            }
            Err(e) => {
                tx.rollback();
                Err(e)
            }
        }
    }

    fn merge_from(&mut self, other: &Replica) {
        let mut o = other.doc.clone();
        self.doc.merge(&mut o).unwrap();
    }
}

fn pair(id: &DocId) -> (Replica, Replica) {
    (Replica::new(0, id), Replica::new(1, id))
}

fn sync_both(a: &mut Replica, b: &mut Replica) {
    a.merge_from(b);
    b.merge_from(a);
    assert_eq!(a.doc.get_heads(), b.doc.get_heads());
}

#[test]
fn concurrent_tally_increments_sum() {
    let (mut a, mut b) = pair(&ledger_id());
    a.change(|tx, w| ledger::add_to_tally(tx, w, "samples_taken", 5))
        .unwrap();
    b.change(|tx, w| ledger::add_to_tally(tx, w, "samples_taken", 3))
        .unwrap();
    b.change(|tx, w| ledger::add_to_tally(tx, w, "samples_taken", 1))
        .unwrap();
    a.change(|tx, w| ledger::add_to_tally(tx, w, "custom_metric", 2))
        .unwrap();
    sync_both(&mut a, &mut b);
    for r in [&a, &b] {
        let v = ledger::view(&r.doc).unwrap();
        assert_eq!(v.tallies.get("samples_taken"), Some(&9));
        assert_eq!(v.tallies.get("custom_metric"), Some(&2));
        assert_eq!(v.tallies_by_member["m1"]["samples_taken"], 4);
    }
    assert!(
        a.change(|tx, w| ledger::add_to_tally(tx, w, "samples_taken", -1))
            .is_err()
    );
}

fn shared_task(a: &mut Replica, b: &mut Replica) -> String {
    let id = a
        .change(|tx, w| ledger::add_task(tx, w, &NewTask::new(TaskKind::Transfer, "Move patient")))
        .unwrap();
    b.merge_from(a);
    id
}

#[test]
fn concurrent_done_and_cancelled_give_done_on_every_replica() {
    for order in [0, 1] {
        let (mut a, mut b) = pair(&ledger_id());
        let t = shared_task(&mut a, &mut b);
        a.change(|tx, w| ledger::set_status(tx, w, &t, Transition::To(TaskStatus::Done)))
            .unwrap();
        b.change(|tx, w| ledger::set_status(tx, w, &t, Transition::To(TaskStatus::Cancelled)))
            .unwrap();
        if order == 0 {
            sync_both(&mut a, &mut b);
        } else {
            sync_both(&mut b, &mut a);
        }
        for r in [&a, &b] {
            let v = ledger::view(&r.doc).unwrap();
            let task = v.task(&t).unwrap();
            assert_eq!(task.status.status, TaskStatus::Done);
            assert_eq!(task.history.len(), 2, "both entries stay in the history");
        }
    }
}

#[test]
fn reassigning_moves_the_task_and_concurrent_reassignments_keep_both() {
    let (mut a, mut b) = pair(&ledger_id());
    let t = shared_task(&mut a, &mut b);
    let m = |s: &str| MemberId::new(s).unwrap();
    a.change(|tx, w| ledger::assign(tx, w, &t, &m("ana")))
        .unwrap();
    b.merge_from(&a);
    let v = ledger::view(&b.doc).unwrap();
    assert_eq!(v.task(&t).unwrap().status.status, TaskStatus::Assigned);
    // Sequential reassignment: only the new member.
    a.change(|tx, w| {
        ledger::unassign(tx, &t, &m("ana"))?;
        ledger::assign(tx, w, &t, &m("bo"))
    })
    .unwrap();
    assert_eq!(
        ledger::view(&a.doc).unwrap().task(&t).unwrap().assignees,
        ["bo"]
    );
    // Concurrent reassignments from ana: both new members end up assigned, ana not.
    b.change(|tx, w| {
        ledger::unassign(tx, &t, &m("ana"))?;
        ledger::assign(tx, w, &t, &m("cy"))
    })
    .unwrap();
    sync_both(&mut a, &mut b);
    for r in [&a, &b] {
        assert_eq!(
            ledger::view(&r.doc).unwrap().task(&t).unwrap().assignees,
            ["bo", "cy"]
        );
    }
}

#[test]
fn reopening_starts_over_and_beats_concurrent_old_epoch_entries() {
    let (mut a, mut b) = pair(&ledger_id());
    let t = shared_task(&mut a, &mut b);
    a.change(|tx, w| ledger::set_status(tx, w, &t, Transition::To(TaskStatus::Done)))
        .unwrap();
    assert!(
        a.change(|tx, w| ledger::set_status(tx, w, &t, Transition::To(TaskStatus::InProgress)))
            .is_err(),
        "a done task must be reopened before it changes"
    );
    b.change(|tx, w| ledger::set_status(tx, w, &t, Transition::To(TaskStatus::InProgress)))
        .unwrap();
    a.change(|tx, w| ledger::set_status(tx, w, &t, Transition::Reopen))
        .unwrap();
    let v = ledger::view(&a.doc).unwrap();
    assert_eq!(
        (
            v.task(&t).unwrap().status.status,
            v.task(&t).unwrap().status.epoch
        ),
        (TaskStatus::Open, 1)
    );
    sync_both(&mut a, &mut b);
    for r in [&a, &b] {
        let s = ledger::view(&r.doc)
            .unwrap()
            .task(&t)
            .unwrap()
            .status
            .clone();
        assert_eq!(
            s.status,
            TaskStatus::Open,
            "b's in-progress belongs to the closed epoch"
        );
    }
    b.change(|tx, w| ledger::set_status(tx, w, &t, Transition::To(TaskStatus::InProgress)))
        .unwrap();
    sync_both(&mut a, &mut b);
    assert_eq!(
        ledger::view(&a.doc)
            .unwrap()
            .task(&t)
            .unwrap()
            .status
            .status,
        TaskStatus::InProgress
    );
    assert!(
        a.change(|tx, w| ledger::set_status(tx, w, &t, Transition::Reopen))
            .is_err(),
        "only closed tasks reopen"
    );
}

#[test]
fn a_conflict_shows_in_the_reconcile_view_and_resolving_clears_it_everywhere() {
    let (mut a, mut b) = pair(&ledger_id());
    let t = shared_task(&mut a, &mut b);
    let title = |s: &str| TaskUpdate {
        title: Some(s.into()),
        ..TaskUpdate::default()
    };
    a.change(|tx, _| ledger::update_task(tx, &t, &title("Move patient to site A")))
        .unwrap();
    b.change(|tx, _| ledger::update_task(tx, &t, &title("Move patient to site B")))
        .unwrap();
    sync_both(&mut a, &mut b);
    let view = reconcile::reconcile(&a.doc).unwrap();
    assert_eq!(view, reconcile::reconcile(&b.doc).unwrap());
    assert_eq!(view.conflicts.len(), 1);
    let c = &view.conflicts[0];
    assert_eq!(c.id, format!("tasks/{t}/title"));
    let mut who: Vec<&str> = c.values.iter().map(|v| v.member.as_str()).collect();
    who.sort();
    assert_eq!(who, ["m0", "m1"]);
    assert!(c.values.iter().all(|v| v.at > 0 && !v.device.is_empty()));
    let keep = c
        .values
        .iter()
        .position(|v| v.value == "Move patient to site B")
        .unwrap();
    let chosen = conflicts::choose(&b.doc, &c.id, keep).unwrap();
    b.change(|tx, _| conflicts::resolve(tx, chosen)).unwrap();
    sync_both(&mut a, &mut b);
    for r in [&a, &b] {
        let v = reconcile::reconcile(&r.doc).unwrap();
        assert!(v.conflicts.is_empty());
        assert_eq!(v.ledger.task(&t).unwrap().title, "Move patient to site B");
    }
    assert!(matches!(
        conflicts::choose(&a.doc, &c.id, 0),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn fields_from_a_newer_schema_survive_edits_by_this_build() {
    use automerge::transaction::Transactable;
    use automerge::{ROOT, ReadDoc};
    let (mut newer, mut older) = pair(&ledger_id());
    let t = shared_task(&mut newer, &mut older);
    newer
        .change(|tx, _| {
            let tasks = schema::container(tx, "tasks")?;
            let task = schema::child_map(tx, &tasks, &t)?.unwrap();
            tx.put(&task, "gps", "22.54,114.06")?;
            tx.put(ROOT, "weather", "rain")?;
            Ok(())
        })
        .unwrap();
    older.merge_from(&newer);
    older
        .change(|tx, _| {
            ledger::update_task(
                tx,
                &t,
                &TaskUpdate {
                    title: Some("Renamed".into()),
                    ..Default::default()
                },
            )
        })
        .unwrap();
    older
        .change(|tx, w| ledger::add_to_tally(tx, w, "deliveries", 1))
        .unwrap();
    newer.merge_from(&older);
    let tasks = schema::container(&newer.doc, "tasks").unwrap();
    let task = schema::child_map(&newer.doc, &tasks, &t).unwrap().unwrap();
    assert_eq!(
        schema::get_str(&newer.doc, &task, "gps")
            .unwrap()
            .as_deref(),
        Some("22.54,114.06")
    );
    assert!(newer.doc.get(ROOT, "weather").unwrap().is_some());
    assert_eq!(
        ledger::view(&newer.doc).unwrap().task(&t).unwrap().title,
        "Renamed"
    );
}

#[test]
fn needs_follow_the_same_rules_and_sort_by_urgency() {
    let (mut a, mut b) = pair(&households_id());
    let hh = a
        .change(|tx, w| {
            households::add_household(
                tx,
                w,
                &NewHousehold {
                    address: "Block 7, flat 3".into(),
                    residents: 2,
                    contact: Some("555-0101".into()),
                    flags: vec![Vulnerability::Elderly, Vulnerability::PostSurgery],
                },
            )
        })
        .unwrap();
    let need = |category, priority| NewNeed {
        household: hh.clone(),
        category,
        detail: "as discussed".into(),
        priority,
    };
    let food = a
        .change(|tx, w| households::add_need(tx, w, &need(NeedCategory::Food, Priority::Routine)))
        .unwrap();
    let meds = a
        .change(|tx, w| {
            households::add_need(tx, w, &need(NeedCategory::Medicine, Priority::Urgent))
        })
        .unwrap();
    let ride = a
        .change(|tx, w| {
            households::add_need(
                tx,
                w,
                &need(NeedCategory::MedicalTransport, Priority::Emergency),
            )
        })
        .unwrap();
    b.merge_from(&a);
    a.change(|tx, w| {
        households::set_need_status(tx, w, &meds, Transition::To(NeedStatus::Fulfilled))
    })
    .unwrap();
    b.change(|tx, w| {
        households::set_need_status(tx, w, &meds, Transition::To(NeedStatus::Cancelled))
    })
    .unwrap();
    b.change(|tx, _| households::set_notes(tx, &ride, "stairs; needs a stretcher"))
        .unwrap();
    sync_both(&mut a, &mut b);
    let v = households::view(&a.doc).unwrap();
    assert_eq!(v, households::view(&b.doc).unwrap());
    let m = v.needs.iter().find(|n| n.id == meds).unwrap();
    assert_eq!(m.status.status, NeedStatus::Fulfilled);
    assert!(m.fulfilled_at.is_some());
    let mut open: Vec<_> = v.needs.iter().filter(|n| n.is_open()).cloned().collect();
    households::sort_by_urgency(&mut open);
    assert_eq!(
        open.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        [ride.as_str(), food.as_str()]
    );
    assert_eq!(open[0].notes, "stairs; needs a stretcher");
    assert_eq!(v.households[0].flags, ["elderly", "post_surgery"]);
    let bad = NewNeed {
        household: "nope".into(),
        category: NeedCategory::Food,
        detail: "x".into(),
        priority: Priority::Routine,
    };
    assert!(matches!(
        a.change(|tx, w| households::add_need(tx, w, &bad)),
        Err(Error::NotFound(_))
    ));
}

// ----- property test: convergence --------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    AddTask {
        kind: usize,
    },
    Status {
        task: usize,
        status: usize,
    },
    Reopen {
        task: usize,
    },
    Assign {
        task: usize,
        member: usize,
    },
    Unassign {
        task: usize,
        member: usize,
    },
    Retitle {
        task: usize,
        title: usize,
    },
    Duty {
        check_in: bool,
    },
    Tally {
        metric: usize,
        amount: u8,
    },
    Resolve {
        conflict: usize,
        choice: usize,
    },
    AddHousehold,
    AddNeed {
        household: usize,
        priority: usize,
    },
    NeedStatus {
        need: usize,
        status: usize,
    },
    NeedPriority {
        need: usize,
        priority: usize,
    },
    /// Replica `from` pushes its state to the acting replica (a partial sync).
    Sync {
        from: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..6usize).prop_map(|kind| Op::AddTask { kind }),
        3 => (0..8usize, 1..5usize).prop_map(|(task, status)| Op::Status { task, status }),
        1 => (0..8usize).prop_map(|task| Op::Reopen { task }),
        2 => (0..8usize, 0..4usize).prop_map(|(task, member)| Op::Assign { task, member }),
        1 => (0..8usize, 0..4usize).prop_map(|(task, member)| Op::Unassign { task, member }),
        2 => (0..8usize, 0..3usize).prop_map(|(task, title)| Op::Retitle { task, title }),
        2 => any::<bool>().prop_map(|check_in| Op::Duty { check_in }),
        4 => (0..5usize, 1..10u8).prop_map(|(metric, amount)| Op::Tally { metric, amount }),
        1 => (0..4usize, 0..3usize).prop_map(|(conflict, choice)| Op::Resolve { conflict, choice }),
        1 => Just(Op::AddHousehold),
        2 => (0..4usize, 0..4usize).prop_map(|(household, priority)| Op::AddNeed { household, priority }),
        2 => (0..6usize, 1..5usize).prop_map(|(need, status)| Op::NeedStatus { need, status }),
        1 => (0..6usize, 0..4usize).prop_map(|(need, priority)| Op::NeedPriority { need, priority }),
        3 => (0..5usize).prop_map(|from| Op::Sync { from }),
    ]
}

fn pick(keys: &[String], i: usize) -> Option<String> {
    (!keys.is_empty()).then(|| keys[i % keys.len()].clone())
}

const TASK_STATUSES: [TaskStatus; 5] = [
    TaskStatus::Open,
    TaskStatus::Assigned,
    TaskStatus::InProgress,
    TaskStatus::Cancelled,
    TaskStatus::Done,
];
/// What a sync's push order asks of a book: an open need of urgent priority or above.
/// Routine needs and closed urgent ones do not count; a priority raised later does.
#[test]
fn a_book_is_urgent_while_an_urgent_need_is_open() {
    let mut a = Replica::new(0, &households_id());
    let urgent = |r: &Replica| households::has_open_urgent_need(&r.doc).unwrap();
    assert!(!urgent(&a), "an empty book");
    let hh = a
        .change(|tx, w| {
            households::add_household(
                tx,
                w,
                &NewHousehold {
                    address: "Block 2".into(),
                    residents: 1,
                    contact: None,
                    flags: vec![],
                },
            )
        })
        .unwrap();
    let need = |priority| NewNeed {
        household: hh.clone(),
        category: NeedCategory::Medicine,
        detail: "insulin".into(),
        priority,
    };
    let routine = a
        .change(|tx, w| households::add_need(tx, w, &need(Priority::Routine)))
        .unwrap();
    assert!(!urgent(&a), "a routine need");
    let meds = a
        .change(|tx, w| households::add_need(tx, w, &need(Priority::Urgent)))
        .unwrap();
    assert!(urgent(&a), "an open urgent need");
    a.change(|tx, w| {
        households::set_need_status(tx, w, &meds, Transition::To(NeedStatus::Fulfilled))
    })
    .unwrap();
    assert!(!urgent(&a), "the urgent need was fulfilled");
    a.change(|tx, _| households::set_priority(tx, &routine, Priority::Emergency))
        .unwrap();
    assert!(urgent(&a), "the routine need became an emergency");
}

const NEED_STATUSES: [NeedStatus; 5] = [
    NeedStatus::Requested,
    NeedStatus::Assigned,
    NeedStatus::InProgress,
    NeedStatus::Cancelled,
    NeedStatus::Fulfilled,
];
const PRIORITIES: [Priority; 4] = [
    Priority::Routine,
    Priority::Priority,
    Priority::Urgent,
    Priority::Emergency,
];

/// A device: its copy of the ledger and of the households book.
struct Device {
    ledger: Replica,
    book: Replica,
}

fn apply(devices: &mut [Device], actor: usize, op: &Op) {
    let members = ["ana", "bo", "cy", "dee"].map(|m| MemberId::new(m).unwrap());
    let n = devices.len();
    if let Op::Sync { from } = op {
        let from = from % n;
        if from != actor {
            let (l, b) = (
                devices[from].ledger.doc.clone(),
                devices[from].book.doc.clone(),
            );
            devices[actor].ledger.doc.merge(&mut l.clone()).unwrap();
            devices[actor].book.doc.merge(&mut b.clone()).unwrap();
        }
        return;
    }
    let d = &mut devices[actor];
    let tasks: Vec<String> = ledger::view(&d.ledger.doc)
        .unwrap()
        .tasks
        .into_iter()
        .map(|t| t.id)
        .collect();
    let book = households::view(&d.book.doc).unwrap();
    let hhs: Vec<String> = book.households.into_iter().map(|h| h.id).collect();
    let needs: Vec<String> = book.needs.into_iter().map(|n| n.id).collect();
    // Refused operations (a status going back, a reopen of an open task...) write
    // nothing; the property is about what was written.
    let _ = match op.clone() {
        Op::AddTask { kind } => d
            .ledger
            .change(|tx, w| {
                ledger::add_task(
                    tx,
                    w,
                    &NewTask::new(TaskKind::ALL[kind], format!("task {kind}")),
                )
            })
            .map(drop),
        Op::Status { task, status } => match pick(&tasks, task) {
            Some(t) => d.ledger.change(|tx, w| {
                ledger::set_status(tx, w, &t, Transition::To(TASK_STATUSES[status]))
            }),
            None => Ok(()),
        },
        Op::Reopen { task } => match pick(&tasks, task) {
            Some(t) => d
                .ledger
                .change(|tx, w| ledger::set_status(tx, w, &t, Transition::Reopen)),
            None => Ok(()),
        },
        Op::Assign { task, member } => match pick(&tasks, task) {
            Some(t) => d
                .ledger
                .change(|tx, w| ledger::assign(tx, w, &t, &members[member])),
            None => Ok(()),
        },
        Op::Unassign { task, member } => match pick(&tasks, task) {
            Some(t) => d
                .ledger
                .change(|tx, _| ledger::unassign(tx, &t, &members[member])),
            None => Ok(()),
        },
        Op::Retitle { task, title } => match pick(&tasks, task) {
            Some(t) => d.ledger.change(|tx, _| {
                ledger::update_task(
                    tx,
                    &t,
                    &TaskUpdate {
                        title: Some(format!("title {title}")),
                        ..Default::default()
                    },
                )
            }),
            None => Ok(()),
        },
        Op::Duty { check_in } => {
            let action = if check_in {
                ledger::DutyAction::CheckIn
            } else {
                ledger::DutyAction::CheckOut
            };
            d.ledger.change(|tx, w| ledger::record_duty(tx, w, action))
        }
        Op::Tally { metric, amount } => {
            let name = [
                "samples_taken",
                "households_visited",
                "door_sensors_fitted",
                "deliveries",
                "masks",
            ][metric];
            d.ledger
                .change(|tx, w| ledger::add_to_tally(tx, w, name, i64::from(amount)))
        }
        Op::Resolve { conflict, choice } => {
            let found = conflicts::find(&d.ledger.doc, &["tasks"]).unwrap();
            match found.get(conflict % found.len().max(1)) {
                Some(c) => {
                    let chosen =
                        conflicts::choose(&d.ledger.doc, &c.id, choice % c.values.len()).unwrap();
                    d.ledger.change(|tx, _| conflicts::resolve(tx, chosen))
                }
                None => Ok(()),
            }
        }
        Op::AddHousehold => d
            .book
            .change(|tx, w| {
                households::add_household(
                    tx,
                    w,
                    &NewHousehold {
                        address: "somewhere".into(),
                        residents: 3,
                        contact: None,
                        flags: vec![Vulnerability::Child],
                    },
                )
            })
            .map(drop),
        Op::AddNeed {
            household,
            priority,
        } => match pick(&hhs, household) {
            Some(h) => d
                .book
                .change(|tx, w| {
                    households::add_need(
                        tx,
                        w,
                        &NewNeed {
                            household: h,
                            category: NeedCategory::Water,
                            detail: "2 crates".into(),
                            priority: PRIORITIES[priority],
                        },
                    )
                })
                .map(drop),
            None => Ok(()),
        },
        Op::NeedStatus { need, status } => match pick(&needs, need) {
            Some(x) => d.book.change(|tx, w| {
                households::set_need_status(tx, w, &x, Transition::To(NEED_STATUSES[status]))
            }),
            None => Ok(()),
        },
        Op::NeedPriority { need, priority } => match pick(&needs, need) {
            Some(x) => d
                .book
                .change(|tx, _| households::set_priority(tx, &x, PRIORITIES[priority])),
            None => Ok(()),
        },
        Op::Sync { .. } => unreachable!("handled above"),
    };
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_whatever_the_merge_order(
        replicas in 3usize..=5,
        ops in proptest::collection::vec((0usize..5, op()), 1..60),
        final_order in Just(()).prop_perturb(|_, mut rng| {
            let mut order: Vec<usize> = (0..5).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.next_u32() as usize) % (i + 1));
            }
            order
        }),
    ) {
        let mut devices: Vec<Device> = (0..replicas)
            .map(|i| Device { ledger: Replica::new(i, &ledger_id()), book: Replica::new(i, &households_id()) })
            .collect();
        for (actor, op) in &ops {
            apply(&mut devices, actor % replicas, op);
        }
        // Final exchange: everyone pushes into a hub replica in a random order, then the hub
        // into everyone (again in that order).
        let order: Vec<usize> = final_order.into_iter().filter(|i| *i < replicas).collect();
        let hub = order[0];
        for &i in &order[1..] {
            apply(&mut devices, hub, &Op::Sync { from: i });
        }
        for &i in &order[1..] {
            apply(&mut devices, i, &Op::Sync { from: hub });
        }
        let first = &devices[0];
        let l0 = ledger::view(&first.ledger.doc).unwrap();
        let r0 = reconcile::reconcile(&first.ledger.doc).unwrap();
        let h0 = households::view(&first.book.doc).unwrap();
        for d in &devices[1..] {
            prop_assert_eq!(d.ledger.doc.get_heads(), first.ledger.doc.get_heads());
            prop_assert_eq!(d.book.doc.get_heads(), first.book.doc.get_heads());
            prop_assert_eq!(&ledger::view(&d.ledger.doc).unwrap(), &l0);
            prop_assert_eq!(&reconcile::reconcile(&d.ledger.doc).unwrap(), &r0);
            prop_assert_eq!(&households::view(&d.book.doc).unwrap(), &h0);
            // The sync's urgency answer equals the view's.
            prop_assert_eq!(
                households::has_open_urgent_need(&d.book.doc).unwrap(),
                h0.needs
                    .iter()
                    .any(|n| n.is_open() && n.priority >= Priority::Urgent)
            );
        }
        // Totals equal the sum of what every device added.
        let added: i64 = ops.iter().filter_map(|(_, op)| match op { Op::Tally { amount, .. } => Some(i64::from(*amount)), _ => None }).sum();
        prop_assert_eq!(l0.tallies.values().sum::<i64>(), added);
    }
}
