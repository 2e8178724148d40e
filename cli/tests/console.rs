//! The lead's console in a real browser: a relay process, phones that work and sync, the
//! lead logged in with `redline login`, `redline console` serving the page, and Debian's
//! headless Chromium driven by playwright-core (`tests/browser/console.mjs`) clicking
//! through it. Screenshots of every page land in the test's target directory
//! (`console-screenshots/`). Installs Chromium (apt) and playwright-core (npm) when
//! missing; fails, never skips, when it cannot.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{issue, phone};
use redline_client::{NeedStatus, NewNeed, NewTask, TaskKind, TaskUpdate};
use redline_proto::{DocId, TeamId, ZoneId};

mod common;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Chromium and playwright-core, installed if missing (`tests/browser/tools.sh`).
fn browser_ready() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let ok = Command::new("bash")
        .arg(dir.join("tools.sh"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok && Path::new(CHROMIUM).exists() && dir.join("node_modules/playwright-core").exists(),
        "the console test needs Chromium (apt) and playwright-core (npm), and could not install them: run {}",
        dir.join("tools.sh").display()
    );
    dir
}

/// Kills a child process when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_runs_the_day_from_the_console_in_a_real_browser() {
    let browser_dir = browser_ready();
    let tmp = tempfile::tempdir().unwrap();
    let relay_dir = tmp.path().join("relay");
    let relay = common::init_and_start(&relay_dir);
    let day = redline_tests::today();
    let (team, zone) = (TeamId::new("team-1").unwrap(), ZoneId::new("z1").unwrap());
    let ledger = DocId::ledger(&team, &day);
    let token = |member: &str, device: &str| issue(&relay_dir, member, device, "volunteer");

    // Two phones: a task both retitle offline (a conflict), tallies, a check-in, an
    // urgent need.
    let ana = phone(
        &tmp.path().join("ana"),
        &relay,
        "ana",
        token("ana", "phone-ana"),
    );
    let bao = phone(
        &tmp.path().join("bao"),
        &relay,
        "bao",
        token("bao", "phone-bao"),
    );
    let task = ana
        .add_task(
            &team,
            &day,
            NewTask::new(TaskKind::Supply, "Deliver insulin"),
        )
        .unwrap();
    ana.add_to_tally(&team, &day, "samples_taken", 7).unwrap();
    ana.check_in(&team, &day).unwrap();
    ana.sync().await.unwrap();
    bao.sync().await.unwrap();
    for (phone, title) in [
        (&ana, "Deliver insulin to block 7"),
        (&bao, "Deliver insulin to block 9"),
    ] {
        let update = TaskUpdate {
            title: Some(title.into()),
            ..TaskUpdate::default()
        };
        phone.update_task(&team, &day, &task, update).unwrap();
    }
    bao.add_to_tally(&team, &day, "samples_taken", 5).unwrap();
    let house = common::block_7(&ana, &zone);
    ana.add_need(
        &zone,
        NewNeed {
            household: house,
            category: redline_client::NeedCategory::Medicine,
            detail: "insulin pens".into(),
            priority: redline_client::Priority::Urgent,
        },
    )
    .unwrap();
    ana.sync().await.unwrap();
    bao.sync().await.unwrap();
    // A third phone syncs, then comes back with a reset store (a new actor): what it
    // writes is held for the lead's review.
    let cy_token = token("cy", "phone-cy");
    let cy = phone(&tmp.path().join("cy"), &relay, "cy", cy_token.clone());
    // (A check-in: a tally would make its own `tallies/phone-cy` map, and the reset
    // store's map would then conflict with it.)
    cy.check_in(&team, &day).unwrap();
    cy.sync().await.unwrap();
    let cy_again = phone(&tmp.path().join("cy-reset"), &relay, "cy", cy_token);
    cy_again.add_to_tally(&team, &day, "deliveries", 3).unwrap();
    let held = cy_again.sync().await.unwrap();
    assert!(
        !held.refused.is_empty(),
        "the reset phone was not held: {held:?}"
    );

    // The lead logs in and starts the console.
    let config = common::lead_logged_in(tmp.path(), &relay_dir, &relay);
    let mut console = Reaped(
        Command::new(assert_cmd::cargo::cargo_bin("redline"))
            .env("REDLINE_CONFIG", &config)
            .args(["console", "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(console.0.stdout.take().unwrap()).lines();
    let url = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.trim().strip_prefix("open").map(|u| u.trim().to_string()))
        .expect("the console printed its URL");
    assert!(
        url.starts_with("http://127.0.0.1:") && url.contains("?key="),
        "{url}"
    );
    std::thread::spawn(move || for _ in lines {});

    // Without the key, nothing is served.
    let plain = url.split('?').next().unwrap().to_string() + "today";
    let refused = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &plain])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    assert!(
        refused.is_empty() || refused == "401",
        "without the key: {refused}"
    );

    // The browser, step by step.
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    let mut node = Reaped(
        Command::new("node")
            .arg(browser_dir.join("console.mjs"))
            .arg(&url)
            .arg(&shots)
            .env("CHROMIUM", CHROMIUM)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut to_node = node.0.stdin.take().unwrap();
    let out = BufReader::new(node.0.stdout.take().unwrap());
    let (mut kept, mut need, mut accepted, mut done) = (None, None, None, false);
    let handle = tokio::runtime::Handle::current();
    let steps = tokio::task::block_in_place(|| {
        let mut steps = Vec::new();
        for line in out.lines().map_while(Result::ok) {
            println!("browser: {line}");
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["KEPT", value @ ..] => kept = Some(value.join(" ")),
                ["NEED", id, status] => need = Some((id.to_string(), status.to_string())),
                ["WAITING", "need-change"] => {
                    // A phone moves the need on and syncs; the page must follow live.
                    let (id, _) = need.clone().expect("the need was named first");
                    handle.block_on(async {
                        ana.sync().await.unwrap();
                        ana.set_need_status(&zone, &id, NeedStatus::InProgress)
                            .unwrap();
                        ana.sync().await.unwrap();
                    });
                    writeln!(to_node, "GO").unwrap();
                }
                ["ACCEPTED", device] => accepted = Some(device.to_string()),
                ["STEP", rest @ ..] => steps.push(rest.join(" ")),
                ["FAIL", ..] => panic!("the browser test failed: {line}"),
                // Chromium's helpers may hold the pipe open after node is done.
                ["DONE"] => {
                    done = true;
                    break;
                }
                _ => {}
            }
        }
        steps
    });
    let status = node.0.wait().unwrap();
    assert!(
        done && status.success(),
        "the browser did not finish (steps done: {steps:?})"
    );
    for page in [
        "today",
        "conflicts",
        "needs",
        "needs-live",
        "devices",
        "export",
        "needs-tablet",
    ] {
        assert!(
            shots.join(format!("{page}.png")).exists(),
            "no screenshot of {page}"
        );
    }
    println!("screenshots in {}", shots.display());

    // What the clicks did reached the relay and the phones, through the client core.
    tokio::time::sleep(Duration::from_millis(500)).await;
    bao.sync().await.unwrap();
    assert!(
        bao.conflicts(&ledger).unwrap().is_empty(),
        "the conflict is resolved everywhere"
    );
    let title = bao.ledger(&team, &day).unwrap().unwrap().tasks[0]
        .title
        .clone();
    assert_eq!(Some(title), kept, "the value the lead kept is the title");
    let (id, _) = need.unwrap();
    let needs = bao.households(&zone).unwrap().unwrap().needs;
    let n = needs.iter().find(|n| n.id == id).unwrap();
    assert_eq!(
        n.assignee.as_deref(),
        Some("bao"),
        "the lead's assignment arrived"
    );
    assert_eq!(accepted.as_deref(), Some("phone-cy"));
    assert_eq!(
        bao.day_totals(&team, &day).unwrap().get("deliveries"),
        Some(&3),
        "the held tally merged once the lead accepted it"
    );
}
