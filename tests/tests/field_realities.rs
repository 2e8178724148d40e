//! Field realities: progress and "saved on the relay" marks, data budgets with urgent
//! records first, bounded background sync, and the doctor naming each planted failure.

use std::time::{Duration, Instant};

use redline_client::{
    Client, ClientConfig, Conditions, Finding, NeedCategory, Network, NewHousehold, NewNeed,
    NewTask, Priority, RelayEndpoint, SyncPolicy, TaskKind,
};
use redline_proto::token::Role;
use redline_proto::{Day, DocId, ErrorCode, MemberId, TeamId, ZoneId};
use redline_tests::{endpoint, start_relay, token_for};

/// Text that does not compress (field notes are not all alike).
fn noise(len: usize) -> String {
    (0..len / 2)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Writes a bulk day on `a` (`tasks` inspections with long reports) and an emergency
/// need (`detail`) for a new household of the zone.
fn bulk_and_emergency(
    a: &redline_client::Client,
    (team, day, tasks): (&TeamId, &Day, usize),
    (zone, detail): (&ZoneId, &str),
) -> anyhow::Result<()> {
    for i in 0..tasks {
        let mut t = NewTask::new(TaskKind::Inspection, format!("inspection {i}"));
        t.requirements = Some(noise(1900));
        a.add_task(team, day, t)?;
    }
    let house = a.add_household(
        zone,
        NewHousehold {
            address: "Block 7".into(),
            residents: 1,
            contact: None,
            flags: vec![],
        },
    )?;
    a.add_need(
        zone,
        NewNeed {
            household: house,
            category: NeedCategory::MedicalTransport,
            detail: detail.into(),
            priority: Priority::Emergency,
        },
    )?;
    Ok(())
}

fn today() -> Day {
    Day::new(time::OffsetDateTime::now_utc().date().to_string()).unwrap()
}

fn phone(
    relay_dir: &std::path::Path,
    dir: &std::path::Path,
    at: RelayEndpoint,
    policy: SyncPolicy,
) -> Client {
    let token = token_for(relay_dir, dir, "ana", Role::Volunteer, &["team-1"], &["z1"]).unwrap();
    let config = ClientConfig::new(MemberId::new("ana").unwrap())
        .with_relay(at)
        .with_token(token)
        .with_teams(vec![TeamId::new("team-1").unwrap()])
        .with_zones(vec![ZoneId::new("z1").unwrap()])
        .with_keep_days(3650)
        .with_policy(policy);
    Client::open(dir, config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_grows_to_done_and_records_turn_from_phone_to_relay() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let relay = start_relay(&root.path().join("relay")).await?;
    let a = phone(
        relay.data_dir(),
        &root.path().join("a"),
        endpoint(&relay),
        SyncPolicy::default(),
    );
    let team = TeamId::new("team-1")?;
    let mut local = 0;
    for d in 1..=3 {
        let day = Day::new(format!("2026-11-2{d}"))?;
        for i in 0..20 {
            a.add_to_tally(&team, &day, "samples_taken", 1)?;
            if i % 5 == 0 {
                a.add_task(
                    &team,
                    &day,
                    NewTask::new(TaskKind::Supply, format!("parcel {i}")),
                )?;
                local += 1;
            }
            local += 1;
        }
    }
    let doc = DocId::ledger(&team, &Day::new("2026-11-21")?);
    // Before: everything is on the phone only.
    let before = a.pending()?;
    assert_eq!(before.unacked, local, "every local change is pending");
    assert!(
        before
            .docs
            .iter()
            .any(|d| d.doc == doc && d.unacked > 0 && d.last_ack_ms.is_none())
    );
    // During: counters never go back; the end is 100%.
    let mut watch = a.progress();
    let seen = tokio::spawn(async move {
        let mut all = vec![watch.borrow().clone()];
        while watch.changed().await.is_ok() {
            let p = watch.borrow().clone();
            let done = p.finished;
            all.push(p);
            if done {
                break;
            }
        }
        all
    });
    let report = a.sync().await?;
    let snapshots = tokio::time::timeout(Duration::from_secs(5), seen).await??;
    for w in snapshots.windows(2) {
        let (x, y) = (&w[0], &w[1]);
        assert!(
            y.docs_done >= x.docs_done
                && y.changes_sent >= x.changes_sent
                && y.bytes_sent >= x.bytes_sent
                && y.bytes_received >= x.bytes_received,
            "progress went back: {x:?} -> {y:?}"
        );
    }
    let last = snapshots.last().unwrap();
    assert!(last.finished && last.fraction() == 1.0, "{last:?}");
    assert_eq!(last.changes_sent, last.changes_to_send);
    assert_eq!(last.docs_total, 3);
    assert_eq!(
        report.changes_sent,
        local + 3,
        "plus each day's shared genesis"
    );
    // After: acknowledged equals local; each record's document is marked on the relay.
    let after = a.pending()?;
    assert_eq!(after.unacked, 0);
    assert!(
        after
            .docs
            .iter()
            .all(|d| d.unacked == 0 && d.last_ack_ms.is_some())
    );
    // A new offline write: "not on relay" until the next ack, for that record only.
    assert!(a.unsaved_records(&doc)?.is_empty());
    let synced_task = a.ledger(&team, &Day::new("2026-11-21")?)?.unwrap().tasks[0]
        .id
        .clone();
    let offline_task = a.add_task(
        &team,
        &Day::new("2026-11-21")?,
        NewTask::new(TaskKind::Transfer, "to the clinic"),
    )?;
    let p = a.pending()?;
    assert_eq!(p.docs.iter().find(|d| d.doc == doc).unwrap().unacked, 1);
    let unsaved = a.unsaved_records(&doc)?;
    assert!(
        unsaved.contains(&format!("tasks/{offline_task}")),
        "{unsaved:?}"
    );
    assert!(
        !unsaved.contains(&format!("tasks/{synced_task}")),
        "{unsaved:?}"
    );
    a.set_task_status(
        &team,
        &Day::new("2026-11-21")?,
        &synced_task,
        redline_client::TaskStatus::Done,
    )?;
    assert!(
        a.unsaved_records(&doc)?
            .contains(&format!("tasks/{synced_task}")),
        "an edit marks its record"
    );
    a.sync().await?;
    assert_eq!(a.pending()?.unacked, 0);
    assert!(a.unsaved_records(&doc)?.is_empty(), "all on the relay");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_data_cap_an_emergency_still_syncs_and_bulk_waits() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let relay = start_relay(&root.path().join("relay")).await?;
    let policy = SyncPolicy {
        bulk_unmetered_only: true,
        bulk_only_charging: false,
        metered_daily_cap: Some(1),
    };
    let a = phone(
        relay.data_dir(),
        &root.path().join("a"),
        endpoint(&relay),
        policy,
    );
    a.set_conditions(Conditions {
        network: Network::Metered,
        charging: false,
    });
    let (team, zone) = (TeamId::new("team-1")?, ZoneId::new("z1")?);
    // A first small sync spends the (tiny) budget.
    a.add_to_tally(&team, &Day::new("2026-11-01")?, "samples_taken", 1)?;
    a.sync().await?;
    // Then: a bulk document (an old day with a long report) and an emergency need.
    let old = Day::new("2026-11-02")?;
    bulk_and_emergency(&a, (&team, &old, 400), (&zone, "dialysis at 14:00"))?;
    let report = a.sync().await?;
    let bulk = DocId::ledger(&team, &old).to_string();
    assert!(
        report
            .deferred
            .iter()
            .any(|(d, why)| *d == bulk && why.contains("budget")),
        "{:?}",
        report.deferred
    );
    let pending = a.pending()?;
    let of = |doc: &str| {
        pending
            .docs
            .iter()
            .find(|d| d.doc.as_str() == doc)
            .map(|d| d.unacked)
    };
    assert_eq!(
        of("households/z1"),
        Some(0),
        "the emergency is on the relay"
    );
    assert!(of(&bulk).unwrap_or(0) > 0, "the bulk document waits");
    let doctor = a.diagnose(Duration::from_secs(5)).await;
    assert!(
        doctor
            .iter()
            .any(|f| matches!(f, Finding::BudgetReached { .. })),
        "{doctor:?}"
    );
    // On Wi-Fi the rest goes.
    a.set_conditions(Conditions::default());
    let report = a.sync().await?;
    assert!(report.deferred.is_empty());
    assert_eq!(a.pending()?.unacked, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_background_window_returns_in_time_and_a_later_one_finishes() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let relay = start_relay(&root.path().join("relay")).await?;
    let a = phone(
        relay.data_dir(),
        &root.path().join("a"),
        endpoint(&relay),
        SyncPolicy::default(),
    );
    let team = TeamId::new("team-1")?;
    let day = Day::new("2026-11-03")?;
    for i in 0..600 {
        let mut t = NewTask::new(TaskKind::Screening, format!("screening {i}"));
        t.requirements = Some(noise(1900));
        a.add_task(&team, &day, t)?;
    }
    let started = Instant::now();
    let short = a.sync_for(Duration::from_millis(5)).await?;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "returned in {:?}",
        started.elapsed()
    );
    assert!(!short.completed());
    assert!(a.pending()?.unacked > 0, "not everything fit in 5 ms");
    let long = a.sync_for(Duration::from_secs(60)).await?;
    assert!(
        long.completed() && long.progress.finished,
        "{:?}",
        long.progress
    );
    assert_eq!(a.pending()?.unacked, 0);
    let doc = DocId::ledger(&team, &day);
    assert_eq!(
        relay.heads(&doc).await?,
        a.heads(&doc)?,
        "the relay has it all"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doctor_names_each_planted_failure() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let relay = start_relay(&root.path().join("relay")).await?;
    let t = Duration::from_secs(3);
    // Healthy.
    let ok = phone(
        relay.data_dir(),
        &root.path().join("ok"),
        endpoint(&relay),
        SyncPolicy::default(),
    );
    assert_eq!(ok.diagnose(t).await, vec![Finding::Healthy]);
    // No relay at that address.
    let mut nowhere = endpoint(&relay);
    nowhere.addr = "127.0.0.1:9".parse()?;
    let lost = phone(
        relay.data_dir(),
        &root.path().join("lost"),
        nowhere,
        SyncPolicy::default(),
    );
    assert!(matches!(
        lost.diagnose(t).await.as_slice(),
        [Finding::Unreachable(_)]
    ));
    // Wrong pin.
    let mut wrong = endpoint(&relay);
    wrong.fingerprint = "ab".repeat(32);
    let pinned = phone(
        relay.data_dir(),
        &root.path().join("pinned"),
        wrong,
        SyncPolicy::default(),
    );
    assert!(matches!(
        pinned.diagnose(t).await.as_slice(),
        [Finding::PinMismatch { .. }]
    ));
    // Revoked token.
    let revoked_dir = root.path().join("revoked");
    let revoked = phone(
        relay.data_dir(),
        &revoked_dir,
        endpoint(&relay),
        SyncPolicy::default(),
    );
    let id = redline_proto::token::peek(revoked.config_token().unwrap())?.id;
    redline_server::auth::revoke(relay.data_dir(), id)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let found = revoked.diagnose(t).await;
    assert!(
        matches!(found.as_slice(), [Finding::Refused { code, .. }] if *code == ErrorCode::TOKEN_REVOKED),
        "{found:?}"
    );
    // Expired token (and the phone notices by itself).
    let dir = root.path().join("expired");
    let request = redline_server::auth::TokenRequest {
        device: redline_tests::device_for(&dir),
        member: MemberId::new("ana")?,
        role: Role::Volunteer,
        teams: vec![TeamId::new("team-1")?],
        zones: vec![],
        ttl: Duration::ZERO,
    };
    let token = redline_server::auth::issue(relay.data_dir(), request)?.1;
    let expired = Client::open(
        &dir,
        ClientConfig::new(MemberId::new("ana")?)
            .with_relay(endpoint(&relay))
            .with_token(token),
    )?;
    let found = expired.diagnose(t).await;
    assert!(found.contains(&Finding::TokenExpired), "{found:?}");
    assert!(
        found.iter().any(
            |f| matches!(f, Finding::Refused { code, .. } if *code == ErrorCode::TOKEN_EXPIRED)
        ),
        "{found:?}"
    );
    // Out of scope: the phone follows a team its token does not cover.
    let dir = root.path().join("scope");
    let token = token_for(
        relay.data_dir(),
        &dir,
        "ana",
        Role::Volunteer,
        &["team-1"],
        &[],
    )?;
    let config = ClientConfig::new(MemberId::new("ana")?)
        .with_relay(endpoint(&relay))
        .with_token(token)
        .with_teams(vec![TeamId::new("team-1")?, TeamId::new("team-9")?]);
    let wide = Client::open(&dir, config)?;
    let found = wide.diagnose(t).await;
    assert!(
        matches!(found.as_slice(), [Finding::OutOfScope(parts)] if parts == &["team team-9".to_string()]),
        "{found:?}"
    );
    for f in found {
        assert!(!f.explain().is_empty());
    }
    let _ = today();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leads_see_their_teams_devices_and_nobody_elses() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let relay = start_relay(&root.path().join("relay")).await?;
    let at = endpoint(&relay);
    let open = |name: &str, role: Role, team: &str| -> anyhow::Result<Client> {
        let dir = root.path().join(name);
        let token = token_for(relay.data_dir(), &dir, name, role, &[team], &[])?;
        let config = ClientConfig::new(MemberId::new(name)?)
            .with_relay(at.clone())
            .with_token(token)
            .with_teams(vec![TeamId::new(team)?]);
        Ok(Client::open(&dir, config)?)
    };
    let (ana, bao) = (
        open("ana", Role::Volunteer, "team-1")?,
        open("bao", Role::Volunteer, "team-1")?,
    );
    let lead = open("lena", Role::Lead, "team-1")?;
    let other_lead = open("otto", Role::Lead, "team-2")?;
    let team = TeamId::new("team-1")?;
    let day = Day::new("2026-11-29")?;
    ana.add_to_tally(&team, &day, "samples_taken", 1)?;
    ana.sync().await?;
    bao.sync().await?;
    // Ana keeps working; Bao is offline and falls behind.
    for _ in 0..3 {
        ana.add_to_tally(&team, &day, "samples_taken", 1)?;
        ana.sync().await?;
    }
    let devices = lead.device_health(&team).await?;
    let of = |m: &str| devices.iter().find(|d| d.member == m).cloned();
    let (a, b) = (
        of("ana").expect("ana listed"),
        of("bao").expect("bao listed"),
    );
    assert!(
        a.last_sync_ms.is_some()
            && a.bytes_today > 0
            && a.app_version.starts_with("redline-client/")
    );
    assert_eq!(a.pending_updates, 0, "{a:?}");
    assert_eq!(b.pending_updates, 3, "bao missed three commits: {b:?}");
    assert!(of("otto").is_none(), "another team's lead is not listed");
    // Volunteers and other teams' leads may not look.
    for (who, asking) in [(&ana, &team), (&other_lead, &team)] {
        match who.device_health(asking).await {
            Err(redline_client::Error::Refused { code, .. }) => {
                assert_eq!(code, ErrorCode::FORBIDDEN)
            }
            other => panic!("expected forbidden, got {other:?}"),
        }
    }
    // Operators see it in aggregate on the metrics endpoint.
    let http = relay.http_addr().expect("metrics on");
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(http).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    })
    .await?;
    assert!(body.contains("redline_devices_known 4"), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_back_after_the_horizon_is_held_until_a_lead_accepts() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut config = redline_tests::test_config(root.path().join("relay"));
    config.quarantine_after = Some(Duration::from_millis(800));
    let relay = redline_tests::start_relay_with(config).await?;
    let at = endpoint(&relay);
    let open = |name: &str, role: Role| -> anyhow::Result<Client> {
        let dir = root.path().join(name);
        let token = token_for(relay.data_dir(), &dir, name, role, &["team-1"], &[])?;
        let config = ClientConfig::new(MemberId::new(name)?)
            .with_relay(at.clone())
            .with_token(token)
            .with_teams(vec![TeamId::new("team-1")?]);
        Ok(Client::open(&dir, config)?)
    };
    let (ana, lead) = (open("ana", Role::Volunteer)?, open("lena", Role::Lead)?);
    let team = TeamId::new("team-1")?;
    let day = Day::new("2026-11-29")?;
    let doc = DocId::ledger(&team, &day);
    ana.add_to_tally(&team, &day, "samples_taken", 1)?;
    ana.sync().await?;
    // Ana goes quiet past the horizon, works, and comes back.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    ana.add_to_tally(&team, &day, "samples_taken", 5)?;
    let report = ana.sync().await?;
    assert!(
        report
            .refused
            .iter()
            .any(|(d, why)| *d == doc.to_string() && why.starts_with("quarantined")),
        "{report:?}"
    );
    assert!(ana.pending()?.unacked > 0, "not on the relay's ledger yet");
    let doctor_lead = lead.sync().await?;
    assert!(doctor_lead.refused.is_empty());
    assert_eq!(
        lead.day_totals(&team, &day)?.get("samples_taken"),
        Some(&1),
        "not merged silently"
    );
    let doctor = ana.diagnose(Duration::from_secs(3)).await;
    assert!(
        matches!(doctor.as_slice(), [Finding::Quarantined { .. }]),
        "{doctor:?}"
    );
    // Still held on the next sync (the quarantine sticks until review).
    let again = ana.sync().await?;
    assert!(
        again
            .refused
            .iter()
            .any(|(_, why)| why.starts_with("quarantined"))
    );
    // The lead reviews and accepts.
    let held = lead.quarantine(&team).await?;
    assert_eq!(
        held.len(),
        1,
        "held once however often it was pushed: {held:?}"
    );
    assert_eq!(
        (held[0].member.as_str(), held[0].doc.clone()),
        ("ana", doc.clone())
    );
    assert!(held[0].offline_ms >= 800);
    match ana.quarantine(&team).await {
        Err(redline_client::Error::Refused { code, .. }) => assert_eq!(code, ErrorCode::FORBIDDEN),
        other => panic!("a volunteer may not review: {other:?}"),
    }
    let review = lead.accept_quarantined(&team, &held[0].device).await?;
    assert!(review.remaining.is_empty() && review.refused.is_empty());
    lead.sync().await?;
    assert_eq!(
        lead.day_totals(&team, &day)?.get("samples_taken"),
        Some(&6),
        "merged after review"
    );
    let report = ana.sync().await?;
    assert!(report.refused.is_empty(), "out of quarantine: {report:?}");
    assert_eq!(ana.pending()?.unacked, 0);
    assert_eq!(ana.heads(&doc)?, lead.heads(&doc)?, "converged");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_writing_as_an_unknown_actor_into_a_known_document_is_held() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let relay = start_relay(&root.path().join("relay")).await?;
    let (team, day) = (TeamId::new("team-1")?, Day::new("2026-11-29")?);
    let doc = DocId::ledger(&team, &day);
    let dir = root.path().join("ana");
    let token = token_for(
        relay.data_dir(),
        &dir,
        "ana",
        Role::Volunteer,
        &["team-1"],
        &[],
    )?;
    let open = |store: &std::path::Path| -> anyhow::Result<Client> {
        Ok(Client::open(
            store,
            ClientConfig::new(MemberId::new("ana")?)
                .with_relay(endpoint(&relay))
                .with_token(token.clone())
                .with_teams(vec![team.clone()]),
        )?)
    };
    let ana = open(&dir)?;
    ana.add_to_tally(&team, &day, "samples_taken", 1)?;
    ana.sync().await?;
    drop(ana);
    // The phone's store is wiped (reinstall, restore); the same token, a new actor.
    let fresh_dir = root.path().join("ana-reinstalled");
    let again = open(&fresh_dir)?;
    again.sync().await?;
    again.add_to_tally(&team, &day, "samples_taken", 10)?;
    let report = again.sync().await?;
    assert!(
        report
            .refused
            .iter()
            .any(|(d, why)| *d == doc.to_string() && why.starts_with("quarantined")),
        "{report:?}"
    );
    assert_eq!(
        relay.document(&doc).await?.map(|d| d.get_heads()),
        Some(relay.heads(&doc).await?)
    );
    let lead_dir = root.path().join("lead");
    let lead_token = token_for(
        relay.data_dir(),
        &lead_dir,
        "lena",
        Role::Lead,
        &["team-1"],
        &[],
    )?;
    let lead = Client::open(
        &lead_dir,
        ClientConfig::new(MemberId::new("lena")?)
            .with_relay(endpoint(&relay))
            .with_token(lead_token)
            .with_teams(vec![team.clone()]),
    )?;
    lead.sync().await?;
    assert_eq!(
        lead.day_totals(&team, &day)?.get("samples_taken"),
        Some(&1),
        "held, not merged"
    );
    let held = lead.quarantine(&team).await?;
    assert_eq!(held.len(), 1);
    lead.accept_quarantined(&team, &held[0].device).await?;
    lead.sync().await?;
    assert_eq!(
        lead.day_totals(&team, &day)?.get("samples_taken"),
        Some(&11)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_metered_network_large_downloads_wait_and_urgent_ones_arrive() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let relay = start_relay(&root.path().join("relay")).await?;
    let a = phone(
        relay.data_dir(),
        &root.path().join("a"),
        endpoint(&relay),
        SyncPolicy::default(),
    );
    let policy = SyncPolicy {
        bulk_unmetered_only: true,
        bulk_only_charging: false,
        metered_daily_cap: None,
    };
    let b_dir = root.path().join("b");
    let b_token = token_for(
        relay.data_dir(),
        &b_dir,
        "bao",
        Role::Volunteer,
        &["team-1"],
        &["z1"],
    )?;
    let b = Client::open(
        &b_dir,
        ClientConfig::new(MemberId::new("bao")?)
            .with_relay(endpoint(&relay))
            .with_token(b_token)
            .with_teams(vec![TeamId::new("team-1")?])
            .with_zones(vec![ZoneId::new("z1")?])
            .with_keep_days(3650)
            .with_policy(policy),
    )?;
    b.sync().await?;
    b.set_conditions(Conditions {
        network: Network::Metered,
        charging: true,
    });
    // A (on Wi-Fi) writes a large report and records an emergency.
    let (team, zone) = (TeamId::new("team-1")?, ZoneId::new("z1")?);
    let old = Day::new("2026-11-04")?;
    bulk_and_emergency(&a, (&team, &old, 900), (&zone, "insulin"))?;
    a.sync().await?;
    let big = DocId::ledger(&team, &old);
    let big_len = relay
        .document(&big)
        .await?
        .expect("on the relay")
        .save()
        .len() as u64;
    // B on mobile data: the emergency arrives, the large day waits.
    let report = b.sync().await?;
    assert!(
        report.deferred.iter().any(|(d, _)| *d == big.to_string()),
        "{:?}",
        report.deferred
    );
    assert_eq!(b.open_needs()?.len(), 1, "the emergency need arrived");
    assert!(b.ledger(&team, &old)?.is_none(), "the large day waits");
    assert!(
        report.bytes_received < big_len / 4,
        "{} bytes received of a {big_len}-byte day",
        report.bytes_received
    );
    // On Wi-Fi it comes.
    b.set_conditions(Conditions::default());
    let report = b.sync().await?;
    assert!(report.deferred.is_empty());
    assert_eq!(b.heads(&big)?, a.heads(&big)?);
    Ok(())
}
