//! The `redline` and `redline-server` binaries, run for real against a relay process on
//! loopback: init, roster admin, tokens, login, sync, ledger, needs, reconcile with a
//! planted conflict and its resolution, export in every format, status, exit codes, and
//! the metrics endpoint moving under load.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{issue, log_in, phone, redline, server, stdout};
use redline_client::{Client, NewNeed, NewTask, TaskKind, TaskUpdate};
use redline_proto::{DocId, TeamId, ZoneId};
use redline_tests::faults::{RelayProcess, server_exe};

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_works_a_field_day_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let relay_dir = tmp.path().join("relay");
    let init = server()
        .args(["init", "--org", "district-9", "--data-dir"])
        .arg(&relay_dir)
        .assert()
        .success();
    assert!(stdout(&init).contains("operator token"));
    let relay = RelayProcess::start_with_http(&relay_dir).unwrap();
    assert!(relay.get("/health").unwrap().contains("ok"));
    let roster = redline(&tmp.path().join("operator.toml"))
        .args(["roster", "--relay", &relay.addr.to_string(), "--data-dir"])
        .arg(&relay_dir)
        .args(["add-team", "team-1", "--name", "Team One"])
        .assert()
        .success();
    assert!(stdout(&roster).contains("Team One"));
    // The relay binary points there instead of carrying a device core.
    let moved = server()
        .args(["roster", "--data-dir"])
        .arg(&relay_dir)
        .args(["show"])
        .assert()
        .failure();
    assert!(
        String::from_utf8_lossy(&moved.get_output().stderr).contains("redline roster"),
        "the old command says where roster administration went"
    );

    // Two phones work offline; both retitle the same task: a conflict.
    let day = redline_tests::today();
    let (team, zone) = (TeamId::new("team-1").unwrap(), ZoneId::new("z1").unwrap());
    let ana = phone(
        &tmp.path().join("ana"),
        &relay,
        "ana",
        issue(&relay_dir, "ana", "phone-ana", "volunteer"),
    );
    let bao = phone(
        &tmp.path().join("bao"),
        &relay,
        "bao",
        issue(&relay_dir, "bao", "phone-bao", "volunteer"),
    );
    let changes_before = relay.metric("redline_changes_applied_total").unwrap();
    let task = ana
        .add_task(
            &team,
            &day,
            NewTask::new(TaskKind::Supply, "Deliver insulin"),
        )
        .unwrap();
    ana.add_to_tally(&team, &day, "samples_taken", 7).unwrap();
    ana.sync().await.unwrap();
    bao.sync().await.unwrap();
    let retitle = |c: &Client, t: &str| {
        let update = TaskUpdate {
            title: Some(t.into()),
            ..TaskUpdate::default()
        };
        c.update_task(&team, &day, &task, update).unwrap();
    };
    retitle(&ana, "Deliver insulin to block 7");
    retitle(&bao, "Deliver insulin to block 9");
    let house = common::block_7(&ana, &zone);
    let need = |detail: &str, priority| NewNeed {
        household: house.clone(),
        category: redline_client::NeedCategory::Medicine,
        detail: detail.into(),
        priority,
    };
    ana.add_need(
        &zone,
        need("insulin pens", redline_client::Priority::Emergency),
    )
    .unwrap();
    ana.add_need(&zone, need("plasters", redline_client::Priority::Routine))
        .unwrap();
    ana.sync().await.unwrap();
    bao.sync().await.unwrap();
    ana.sync().await.unwrap();
    assert!(
        relay.metric("redline_changes_applied_total").unwrap() > changes_before,
        "metrics move under load"
    );
    assert!(relay.metric("redline_connections_total").unwrap() >= 4.0);
    // The kernel's drop count of the relay's socket is exported (Linux): a handful of
    // phones on loopback loses nothing.
    assert_eq!(
        relay.metric("redline_udp_receive_drops_total").unwrap(),
        0.0
    );
    assert!(
        relay
            .get("/metrics")
            .unwrap()
            .contains("redline_sync_latency_seconds_bucket")
    );

    // The lead logs in and looks at the day.
    let config = tmp.path().join("lead/config.toml");
    let lead_token = issue(&relay_dir, "lena", "lead-laptop", "lead");
    let login = log_in(&config, &relay, &lead_token).assert().success();
    assert!(
        stdout(&login).contains("logged in as lena"),
        "{}",
        stdout(&login)
    );
    redline(&config).arg("sync").assert().success();
    let ledger = stdout(
        &redline(&config)
            .args(["ledger", "show", "--team", "team-1", "--date", day.as_str()])
            .assert()
            .success(),
    );
    assert!(
        ledger.contains("samples_taken") && ledger.contains("Deliver insulin"),
        "{ledger}"
    );
    let needs = stdout(
        &redline(&config)
            .args(["needs", "--urgent"])
            .assert()
            .success(),
    );
    assert!(
        needs.contains("insulin pens") && !needs.contains("plasters"),
        "{needs}"
    );

    let doc = DocId::ledger(&team, &day);
    let conflict = ana
        .conflicts(&doc)
        .unwrap()
        .pop()
        .expect("the planted conflict");
    let recon = stdout(
        &redline(&config)
            .args(["reconcile", "--team", "team-1", "--date", day.as_str()])
            .assert()
            .success(),
    );
    assert!(
        recon.contains(&conflict.id) && recon.contains("block 9") && recon.contains("ana"),
        "{recon}"
    );
    assert!(recon.contains("nothing held in quarantine"), "{recon}");
    redline(&config)
        .args([
            "reconcile",
            "--team",
            "team-1",
            "--date",
            day.as_str(),
            "--resolve",
            &format!("{}=0", conflict.id),
        ])
        .assert()
        .success();
    ana.sync().await.unwrap();
    assert!(
        ana.conflicts(&doc).unwrap().is_empty(),
        "the resolution reached the phones"
    );

    // Exports: the Automerge binary loads back with the same content.
    let am = tmp.path().join("day.automerge");
    redline(&config)
        .args([
            "export",
            "--doc",
            &doc.to_string(),
            "--format",
            "automerge",
            "--out",
        ])
        .arg(&am)
        .assert()
        .success();
    let loaded = automerge::Automerge::load(&std::fs::read(&am).unwrap()).unwrap();
    assert_eq!(
        loaded.get_heads(),
        ana.heads(&doc).unwrap(),
        "the export is the relay's day"
    );
    let json = stdout(
        &redline(&config)
            .args(["export", "--doc", &doc.to_string(), "--format", "json"])
            .assert()
            .success(),
    );
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["totals"]["samples_taken"], 7, "{json}");
    let csv = stdout(
        &redline(&config)
            .args(["export", "--doc", "households/z1", "--format", "csv"])
            .assert()
            .success(),
    );
    assert!(
        csv.lines().count() == 3 && csv.contains("insulin pens"),
        "{csv}"
    );
    redline(&config)
        .args(["export", "--doc", "roster/none", "--format", "csv"])
        .assert()
        .code(2);

    let devices = stdout(
        &redline(&config)
            .args(["devices", "--team", "team-1"])
            .assert()
            .success(),
    );
    assert!(
        devices.contains("phone-ana") && devices.contains("phone-bao"),
        "{devices}"
    );
    let doctor = stdout(&redline(&config).arg("doctor").assert().success());
    assert!(doctor.contains("all checks passed"), "{doctor}");
    let status = stdout(&redline(&config).arg("status").assert().success());
    assert!(status.contains("all saved on the relay"), "{status}");

    // Exit codes that say what to do.
    let nobody = tmp.path().join("nobody/config.toml");
    redline(&nobody).arg("status").assert().code(3);
    redline(&config)
        .args(["ledger", "show", "--team", "team-1", "--date", "2020-01-01"])
        .assert()
        .code(6);
    let elsewhere = tmp.path().join("other-relay");
    let foreign = issue(&elsewhere, "mallory", "laptop-m", "lead");
    let refused = log_in(&tmp.path().join("m/config.toml"), &relay, &foreign)
        .assert()
        .code(4);
    assert!(String::from_utf8_lossy(&refused.get_output().stderr).contains("unauthorized"));
    assert!(
        !tmp.path().join("m/config.toml").exists(),
        "refused credentials are not kept"
    );
    assert!(relay.metric("redline_connections_refused_total").unwrap() >= 1.0);
}

#[test]
fn serve_reads_its_toml_file_and_flags_override_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("relay");
    server()
        .args(["init", "--data-dir"])
        .arg(&dir)
        .assert()
        .success();
    let text = std::fs::read_to_string(dir.join("redline.toml")).unwrap();
    std::fs::write(
        dir.join("redline.toml"),
        text.replace("http_listen = \"127.0.0.1:7448\"", "http_listen = \"off\"")
            .replace("listen = \"127.0.0.1:7447\"", "listen = \"127.0.0.1:0\""),
    )
    .unwrap();
    let mut child = Command::new(server_exe())
        .args(["serve", "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    for _ in 0..6 {
        out.read_line(&mut seen).unwrap();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.contains("metrics      off"),
        "the file turned metrics off:\n{seen}"
    );
    assert!(seen.contains("udp 127.0.0.1:"), "{seen}");
    let bad = server()
        .args(["serve", "--http-listen", "nowhere", "--data-dir"])
        .arg(&dir)
        .assert()
        .failure();
    assert!(String::from_utf8_lossy(&bad.get_output().stderr).contains("http_listen"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_writes_tasks_needs_duty_and_tallies_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let relay_dir = tmp.path().join("relay");
    let relay = common::init_and_start(&relay_dir);
    let (team, zone) = (TeamId::new("team-1").unwrap(), ZoneId::new("z1").unwrap());
    let day = redline_tests::today();
    let ana = phone(
        &tmp.path().join("ana"),
        &relay,
        "ana",
        issue(&relay_dir, "ana", "phone-ana", "volunteer"),
    );
    let house = common::block_7(&ana, &zone);
    ana.sync().await.unwrap();
    let config = common::lead_logged_in(tmp.path(), &relay_dir, &relay);
    let run = |args: &[&str]| -> String {
        let a = redline(&config).args(args).assert().success();
        stdout(&a)
    };
    let task = run(&[
        "task",
        "add",
        "--team",
        "team-1",
        "--kind",
        "supply",
        "--title",
        "Water to block 7",
    ]);
    let task = task.lines().next().unwrap().trim().to_string();
    assert!(run(&["task", "assign", "--team", "team-1", &task, "ana"]).contains("synced"));
    run(&["task", "status", "--team", "team-1", &task, "in_progress"]);
    let need = run(&[
        "need",
        "add",
        "--zone",
        "z1",
        "--household",
        &house,
        "--category",
        "water",
        "--detail",
        "20 litres",
    ]);
    let need = need.lines().next().unwrap().trim().to_string();
    run(&["need", "priority", "--zone", "z1", &need, "urgent"]);
    run(&["need", "assign", "--zone", "z1", &need, "ana"]);
    run(&["need", "status", "--zone", "z1", &need, "fulfilled"]);
    run(&["duty", "in", "--team", "team-1"]);
    run(&["tally", "add", "--team", "team-1", "deliveries", "4"]);
    // Bad input: a clear usage error, nothing written.
    let bad = redline(&config)
        .args(["need", "priority", "--zone", "z1", &need, "whenever"])
        .assert()
        .code(2);
    assert!(String::from_utf8_lossy(&bad.get_output().stderr).contains("urgent"));

    // A volunteer's phone sees all of it.
    ana.sync().await.unwrap();
    let ledger = ana.ledger(&team, &day).unwrap().unwrap();
    let t = ledger.tasks.iter().find(|t| t.id == task).unwrap();
    assert_eq!(t.title, "Water to block 7");
    assert_eq!(t.assignees, vec!["ana".to_string()]);
    assert_eq!(t.status.status, redline_client::TaskStatus::InProgress);
    assert_eq!(ledger.on_duty(), vec!["lena".to_string()]);
    assert_eq!(ledger.tallies.get("deliveries"), Some(&4));
    let needs = ana.households(&zone).unwrap().unwrap().needs;
    let n = needs.iter().find(|n| n.id == need).unwrap();
    assert_eq!(
        (n.priority, n.assignee.as_deref(), n.status.status),
        (
            redline_client::Priority::Urgent,
            Some("ana"),
            redline_client::NeedStatus::Fulfilled
        )
    );
}
