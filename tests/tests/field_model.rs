//! The field model through the device API, on real stores, synced through a real relay:
//! roster validation, queries, the lead's reconcile view with a conflict resolved across
//! phones, exports, and day rollover.

use redline_client::{
    Error, NeedCategory, NeedStatus, NewHousehold, NewNeed, NewTask, Priority, Role, TaskKind,
    TaskStatus, TaskUpdate, Vulnerability,
};
use redline_proto::{Day, DocId, MemberId, OrgId, TeamId, ZoneId};
use redline_tests::{endpoint, org_phone, start_relay};

fn day() -> Day {
    Day::new("2026-11-29").unwrap()
}
fn team() -> TeamId {
    TeamId::new("team-3").unwrap()
}
fn zone(z: &str) -> ZoneId {
    ZoneId::new(z).unwrap()
}
fn member(m: &str) -> MemberId {
    MemberId::new(m).unwrap()
}

/// An operator sets up the roster and syncs it; returns the relay and temp dirs.
async fn with_roster() -> anyhow::Result<(redline_server::RelayHandle, Vec<tempfile::TempDir>)> {
    let dirs: Vec<tempfile::TempDir> = (0..4)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let relay = start_relay(dirs[0].path()).await?;
    let op = org_phone(dirs[1].path(), "olu", "district-9", &relay)?;
    op.add_team(&team(), "Team 3, north")?;
    op.add_zone(&zone("zone-a"), "Village A")?;
    op.add_zone(&zone("zone-b"), "Village B")?;
    op.set_coverage(&team(), &zone("zone-a"), true)?;
    op.set_coverage(&team(), &zone("zone-b"), true)?;
    op.add_member(&member("amira"), "Amira", Role::Volunteer, &[team()])?;
    op.add_member(&member("bao"), "Bao", Role::Volunteer, &[team()])?;
    op.add_member(&member("lena"), "Lena", Role::Lead, &[team()])?;
    op.sync().await?;
    Ok((relay, dirs))
}

#[tokio::test]
async fn names_are_checked_against_the_roster_once_it_is_on_the_device() -> anyhow::Result<()> {
    let (relay, dirs) = with_roster().await?;
    let a = org_phone(dirs[2].path(), "amira", "district-9", &relay)?;
    a.follow(&DocId::roster(&OrgId::new("district-9")?))?;
    a.sync().await?;
    let roster = a.roster()?.expect("roster synced");
    assert_eq!(roster.teams["team-3"].zones, ["zone-a", "zone-b"]);
    assert_eq!(roster.members["lena"].role, Role::Lead);

    let mut task = NewTask::new(TaskKind::Supply, "Deliver water");
    task.zone = Some(zone("zone-z"));
    let err = a.add_task(&team(), &day(), task.clone()).unwrap_err();
    assert!(
        matches!(&err, Error::Invalid(m) if m.contains("unknown zone zone-z")),
        "{err}"
    );
    task.zone = Some(zone("zone-a"));
    task.assignees = vec![member("ghost")];
    let err = a.add_task(&team(), &day(), task.clone()).unwrap_err();
    assert!(
        matches!(&err, Error::Invalid(m) if m.contains("unknown member ghost")),
        "{err}"
    );
    task.assignees = vec![member("bao")];
    let id = a.add_task(&team(), &day(), task)?;
    assert!(
        a.assign_task(&team(), &day(), &id, &member("nobody"))
            .is_err()
    );
    let household = NewHousehold {
        address: "1 Main St".into(),
        residents: 1,
        ..Default::default()
    };
    assert!(a.add_household(&zone("zone-q"), household.clone()).is_err());
    assert!(
        a.add_task(&team(), &day(), NewTask::new(TaskKind::Other, "  "))
            .is_err(),
        "empty title"
    );
    assert!(
        a.add_to_tally(&team(), &day(), "samples_taken", 0).is_err(),
        "zero tally"
    );
    let view = a.ledger(&team(), &day())?.unwrap();
    assert_eq!(view.tasks.len(), 1, "refused writes leave nothing behind");
    assert_eq!(view.tasks[0].assignees, ["bao"]);
    assert_eq!(view.tasks[0].status.status, TaskStatus::Assigned);
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn queries_answer_across_zones_and_days() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A clock that ticks one second per reading: every entry has its own time.
    let ticks = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(1_764_000_000_000));
    let clock = redline_client::Clock::from_fn(move || {
        ticks.fetch_add(1_000, std::sync::atomic::Ordering::SeqCst)
    });
    let a = redline_client::Client::open(
        dir.path(),
        redline_client::ClientConfig::new(member("amira")).with_clock(clock.clone()),
    )?;
    let (za, zb) = (zone("zone-a"), zone("zone-b"));
    let h = NewHousehold {
        address: "Block 7".into(),
        residents: 3,
        contact: Some("555-0101".into()),
        flags: vec![Vulnerability::Elderly],
    };
    let ha = a.add_household(&za, h.clone())?;
    let hb = a.add_household(&zb, h)?;
    let need = |household: &str, category, priority| NewNeed {
        household: household.into(),
        category,
        detail: "see notes".into(),
        priority,
    };
    let food = a.add_need(&za, need(&ha, NeedCategory::Food, Priority::Routine))?;
    let ride = a.add_need(
        &zb,
        need(&hb, NeedCategory::MedicalTransport, Priority::Emergency),
    )?;
    let meds = a.add_need(&za, need(&ha, NeedCategory::Medicine, Priority::Urgent))?;
    let trash = a.add_need(&zb, need(&hb, NeedCategory::Garbage, Priority::Urgent))?;
    a.set_need_status(&zb, &trash, NeedStatus::Fulfilled)?;
    a.set_need_notes(&za, &meds, "insulin, 2 pens")?;
    let open: Vec<String> = a.open_needs()?.into_iter().map(|n| n.id).collect();
    assert_eq!(
        open,
        [ride.clone(), meds.clone(), food.clone()],
        "emergency, then urgent, then routine"
    );
    a.set_need_priority(&za, &food, Priority::Emergency)?;
    let open: Vec<String> = a.open_needs()?.into_iter().map(|n| n.id).collect();
    assert_eq!(
        open[..2],
        [food, ride],
        "same priority: the older request first"
    );

    let now = clock.now_ms();
    let mut late = NewTask::new(TaskKind::Inspection, "Checkpoint north");
    late.due = Some(now - 60_000);
    let late = a.add_task(&team(), &day(), late)?;
    let mut soon = NewTask::new(TaskKind::Inspection, "Checkpoint south");
    soon.due = Some(now + 3_600_000);
    a.add_task(&team(), &day(), soon)?;
    let mut done_late = NewTask::new(TaskKind::Transfer, "Transfer done late");
    done_late.due = Some(now - 60_000);
    let done_late = a.add_task(&team(), &day(), done_late)?;
    a.set_task_status(&team(), &day(), &done_late, TaskStatus::Done)?;
    let overdue: Vec<String> = a
        .overdue_tasks(&team(), &day(), now)?
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(overdue, [late]);

    a.check_in(&team(), &day())?;
    assert_eq!(a.on_duty(&team(), &day())?, ["amira"]);
    a.check_out(&team(), &day())?;
    assert!(a.on_duty(&team(), &day())?.is_empty());
    a.add_to_tally(&team(), &day(), "samples_taken", 4)?;
    a.add_to_tally(&team(), &day(), "samples_taken", 6)?;
    assert_eq!(
        a.day_totals(&team(), &day())?.get("samples_taken"),
        Some(&10)
    );
    Ok(())
}

#[tokio::test]
async fn the_lead_reconciles_a_day_resolves_a_conflict_and_exports_it() -> anyhow::Result<()> {
    let (relay, dirs) = with_roster().await?;
    let org = "district-9";
    let a = org_phone(dirs[1].path(), "amira", org, &relay)?;
    let b = org_phone(dirs[2].path(), "bao", org, &relay)?;
    let lead = org_phone(dirs[3].path(), "lena", org, &relay)?;
    let (t, d) = (team(), day());

    let task = a.add_task(&t, &d, NewTask::new(TaskKind::Transfer, "Move patient"))?;
    a.check_in(&t, &d)?;
    a.add_to_tally(&t, &d, "households_visited", 3)?;
    a.sync().await?;
    b.follow(&DocId::ledger(&t, &d))?;
    b.sync().await?;
    // Offline, both rename the same task differently.
    let rename = |title: &str| TaskUpdate {
        title: Some(title.into()),
        ..TaskUpdate::default()
    };
    a.update_task(&t, &d, &task, rename("Move patient to site A"))?;
    b.update_task(&t, &d, &task, rename("Move patient to site B"))?;
    b.check_in(&t, &d)?;
    b.add_to_tally(&t, &d, "households_visited", 5)?;
    b.set_task_status(&t, &d, &task, TaskStatus::InProgress)?;
    a.sync().await?;
    b.sync().await?;
    lead.follow(&DocId::ledger(&t, &d))?;
    lead.sync().await?;

    let view = lead.reconcile(&t, &d)?.expect("lead holds the day");
    assert_eq!(view.totals.get("households_visited"), Some(&8));
    let amira = view.members.iter().find(|m| m.member == "amira").unwrap();
    assert_eq!(
        (amira.tasks_created, amira.check_ins, amira.on_duty),
        (1, 1, true)
    );
    assert_eq!(amira.tallies.get("households_visited"), Some(&3));
    let bao = view.members.iter().find(|m| m.member == "bao").unwrap();
    assert_eq!(
        (bao.status_changes, bao.tallies.get("households_visited")),
        (1, Some(&5))
    );
    assert_eq!(view.conflicts.len(), 1, "{:?}", view.conflicts);
    let conflict = &view.conflicts[0];
    let mut authors: Vec<&str> = conflict.values.iter().map(|v| v.member.as_str()).collect();
    authors.sort();
    assert_eq!(authors, ["amira", "bao"]);

    // Exports carry the same day.
    let json: serde_json::Value = serde_json::from_str(&view.to_json()?)?;
    assert_eq!(json["totals"]["households_visited"], 8);
    assert_eq!(
        json["conflicts"][0]["values"].as_array().map(Vec::len),
        Some(2)
    );
    let csv_text = view.to_csv()?;
    let mut rows = csv::Reader::from_reader(csv_text.as_bytes());
    let records: Vec<csv::StringRecord> = rows.records().collect::<Result<_, _>>()?;
    let kinds: Vec<&str> = records.iter().map(|r| &r[0]).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "task").count(), 1);
    assert_eq!(kinds.iter().filter(|k| **k == "duty").count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == "conflict").count(), 2);
    assert!(
        records
            .iter()
            .any(|r| &r[0] == "total" && &r[14] == "households_visited" && &r[15] == "8")
    );

    // The lead keeps bao's title; after syncing, nobody sees the conflict any more.
    let keep = conflict
        .values
        .iter()
        .position(|v| v.member == "bao")
        .unwrap();
    lead.resolve_conflict(&DocId::ledger(&t, &d), &conflict.id, keep)?;
    lead.sync().await?;
    a.sync().await?;
    b.sync().await?;
    for phone in [&a, &b, &lead] {
        let v = phone.reconcile(&t, &d)?.unwrap();
        assert!(
            v.conflicts.is_empty(),
            "conflict still visible to {}",
            phone.member()
        );
        assert_eq!(
            v.ledger.task(&task).unwrap().title,
            "Move patient to site B"
        );
        assert_eq!(
            v.ledger.task(&task).unwrap().status.status,
            TaskStatus::InProgress
        );
    }
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn old_days_leave_the_phone_but_not_the_relay() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let relay_dir = tempfile::tempdir()?;
    let relay = start_relay(relay_dir.path()).await?;
    let config = redline_client::ClientConfig::new(member("amira"))
        .with_relay(endpoint(&relay))
        .with_token(redline_tests::token_for(
            relay.data_dir(),
            dir.path(),
            "amira",
            redline_proto::token::Role::Operator,
            &[],
            &[],
        )?)
        .with_keep_days(2);
    let a = redline_client::Client::open(dir.path(), config)?;
    let days =
        ["2026-11-25", "2026-11-26", "2026-11-28", "2026-11-29"].map(|d| Day::new(d).unwrap());
    for d in &days {
        a.add_to_tally(&team(), d, "samples_taken", 1)?;
    }
    a.sync().await?;
    // A write to an old day that the relay has not seen yet keeps that day on the phone.
    a.add_to_tally(&team(), &days[1], "samples_taken", 1)?;
    let rollover = a.drop_old_days(&days[3])?;
    assert_eq!(rollover.dropped, [DocId::ledger(&team(), &days[0])]);
    assert_eq!(rollover.kept_unsynced, [DocId::ledger(&team(), &days[1])]);
    assert!(a.ledger(&team(), &days[0])?.is_none());
    assert!(
        a.ledger(&team(), &days[2])?.is_some(),
        "yesterday is within keep_days = 2"
    );
    assert!(
        !relay
            .heads(&DocId::ledger(&team(), &days[0]))
            .await?
            .is_empty(),
        "the relay keeps it"
    );
    a.sync().await?;
    assert_eq!(
        a.drop_old_days(&days[3])?.dropped,
        [DocId::ledger(&team(), &days[1])]
    );
    // Following it again brings it back.
    a.follow(&DocId::ledger(&team(), &days[0]))?;
    a.sync().await?;
    assert_eq!(
        a.day_totals(&team(), &days[0])?.get("samples_taken"),
        Some(&1)
    );
    relay.shutdown().await?;
    Ok(())
}
