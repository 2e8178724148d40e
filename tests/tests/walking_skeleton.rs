//! The walking skeleton, end to end: phones write offline, sync through a real relay over
//! QUIC + TLS on loopback, and converge. Each test fails if the relay drops one side's
//! changes.

use redline_client::{NewTask, TaskKind};
use redline_proto::{Day, DocId, TeamId};
use redline_tests::{endpoint, phone, phone_at, start_relay};

fn team_day() -> (TeamId, Day) {
    (
        TeamId::new("team-3").unwrap(),
        Day::new("2026-11-29").unwrap(),
    )
}

fn task(title: &str) -> NewTask {
    NewTask::new(TaskKind::Screening, title)
}

#[tokio::test]
async fn two_phones_offline_converge_through_the_relay() -> anyhow::Result<()> {
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let relay = start_relay(dirs[0].path()).await?;
    let a = phone(dirs[1].path(), "amira", &relay)?;
    let b = phone(dirs[2].path(), "bao", &relay)?;
    let (team, day) = team_day();

    // Both work offline on the same day's ledger.
    a.check_in(&team, &day)?;
    a.add_task(&team, &day, task("Sample block 7"))?;
    a.add_to_tally(&team, &day, "samples_taken", 5)?;
    a.add_to_tally(&team, &day, "samples_taken", 2)?;
    b.check_in(&team, &day)?;
    b.add_task(&team, &day, task("Deliver insulin, building 4"))?;
    b.add_to_tally(&team, &day, "samples_taken", 4)?;
    b.add_to_tally(&team, &day, "households_visited", 9)?;

    let first = a.sync().await?;
    assert_eq!(first.docs, 1);
    assert!(
        first.changes_sent >= 4,
        "relay took {} of a's changes",
        first.changes_sent
    );
    assert_eq!(first.changes_received, 0);
    let second = b.sync().await?;
    assert!(
        second.changes_sent >= 4 && second.changes_received >= 4,
        "{second:?}"
    );
    let third = a.sync().await?;
    assert!(third.changes_received >= 4, "{third:?}");
    assert!(third.bytes_sent > 0 && third.bytes_received > 0);

    let id = DocId::ledger(&team, &day);
    assert_eq!(
        a.heads(&id)?,
        b.heads(&id)?,
        "phones ended with different heads"
    );
    assert_eq!(
        a.heads(&id)?,
        relay.heads(&id).await?,
        "relay differs from phones"
    );
    assert_eq!(
        a.acked_heads(&id)?.as_deref(),
        Some(relay.heads(&id).await?.as_slice())
    );

    let va = a.ledger(&team, &day)?.expect("a holds the ledger");
    let vb = b.ledger(&team, &day)?.expect("b holds the ledger");
    assert_eq!(va, vb, "typed views differ");
    let titles: Vec<&str> = va.tasks.iter().map(|t| t.title.as_str()).collect();
    assert!(
        titles.contains(&"Sample block 7") && titles.contains(&"Deliver insulin, building 4"),
        "{titles:?}"
    );
    assert_eq!(
        va.tallies.get("samples_taken"),
        Some(&11),
        "increments from both phones must sum"
    );
    assert_eq!(va.tallies.get("households_visited"), Some(&9));
    assert_eq!(va.duty.len(), 2);
    let mut members: Vec<&str> = va.duty.iter().map(|d| d.member.as_str()).collect();
    members.sort();
    assert_eq!(members, ["amira", "bao"]);

    // Nothing new: a sync moves no changes.
    let idle = b.sync().await?;
    assert_eq!(
        (idle.changes_sent, idle.changes_received),
        (0, 0),
        "{idle:?}"
    );
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_restarted_relay_still_has_what_it_acknowledged() -> anyhow::Result<()> {
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let (team, day) = team_day();
    let id = DocId::ledger(&team, &day);

    let relay = start_relay(dirs[0].path()).await?;
    let fingerprint = relay.fingerprint();
    let a = phone(dirs[1].path(), "amira", &relay)?;
    a.add_task(&team, &day, task("Transfer to quarantine site"))?;
    a.add_to_tally(&team, &day, "door_sensors_fitted", 3)?;
    let report = a.sync().await?;
    assert!(report.changes_sent >= 2);
    let acked = a.acked_heads(&id)?.expect("relay acknowledged");
    relay.shutdown().await?;

    // Same data dir, new process state, new port: same certificate, same documents.
    let relay = start_relay(dirs[0].path()).await?;
    assert_eq!(
        relay.fingerprint(),
        fingerprint,
        "certificate must survive a restart"
    );
    assert!(!relay.created_certificate());
    assert_eq!(
        relay.heads(&id).await?,
        acked,
        "relay lost acknowledged changes"
    );

    // A second phone that never met the first relay gets everything from the new one.
    let b = phone(dirs[2].path(), "bao", &relay)?;
    b.follow(&id)?;
    let got = b.sync().await?;
    assert!(got.changes_received >= 2, "{got:?}");
    let view = b.ledger(&team, &day)?.expect("b holds the ledger");
    assert_eq!(view.tasks.len(), 1);
    assert_eq!(view.tasks[0].title, "Transfer to quarantine site");
    assert_eq!(view.tallies.get("door_sensors_fitted"), Some(&3));
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_reopened_phone_keeps_unsynced_writes_and_syncs_them_later() -> anyhow::Result<()> {
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let (team, day) = team_day();
    let relay = start_relay(dirs[0].path()).await?;

    let device_id = {
        let a = phone(dirs[1].path(), "amira", &relay)?;
        a.check_in(&team, &day)?;
        a.add_task(&team, &day, task("Inspect checkpoint north"))?;
        a.add_to_tally(&team, &day, "deliveries", 6)?;
        a.identity().device.clone()
        // The phone is closed here without ever syncing.
    };

    let a = phone(dirs[1].path(), "amira", &relay)?;
    assert_eq!(
        a.identity().device,
        device_id,
        "device identity must survive reopening"
    );
    let view = a.ledger(&team, &day)?.expect("writes survived reopening");
    assert_eq!(view.tasks.len(), 1);
    assert_eq!(view.tallies.get("deliveries"), Some(&6));
    let report = a.sync().await?;
    assert!(report.changes_sent >= 3, "{report:?}");

    let b = phone(dirs[2].path(), "bao", &relay)?;
    b.follow(&DocId::ledger(&team, &day))?;
    b.sync().await?;
    assert_eq!(b.ledger(&team, &day)?, Some(view));
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_wrong_certificate_pin_is_refused_with_a_clear_error() -> anyhow::Result<()> {
    let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
    let relay = start_relay(dirs[0].path()).await?;
    let mut wrong = endpoint(&relay);
    wrong.fingerprint = "00".repeat(32);
    let a = phone_at(dirs[1].path(), "amira", &relay, wrong)?;
    let (team, day) = team_day();
    a.add_to_tally(&team, &day, "samples_taken", 1)?;
    let err = a
        .sync()
        .await
        .expect_err("sync must refuse an unpinned certificate");
    let text = err.to_string();
    assert!(
        text.contains(&relay.fingerprint()),
        "error should name the fingerprint seen: {text}"
    );
    assert!(
        relay.heads(&DocId::ledger(&team, &day)).await?.is_empty(),
        "nothing may reach the relay"
    );
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn bad_input_is_refused_and_loses_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let relay_dir = tempfile::tempdir()?;
    let relay = start_relay(relay_dir.path()).await?;
    let a = phone(dir.path(), "amira", &relay)?;
    let (team, day) = team_day();
    a.add_to_tally(&team, &day, "samples_taken", 2)?;
    assert!(
        a.add_task(&team, &day, task("   ")).is_err(),
        "empty title accepted"
    );
    assert!(
        a.add_to_tally(&team, &day, "Samples Taken!", 1).is_err(),
        "bad metric accepted"
    );
    assert!(
        a.add_to_tally(&team, &day, "samples_taken", 0).is_err(),
        "zero amount accepted"
    );
    let view = a.ledger(&team, &day)?.unwrap();
    assert!(view.tasks.is_empty());
    assert_eq!(view.tallies.get("samples_taken"), Some(&2));
    relay.shutdown().await?;
    Ok(())
}
