//! Reliability: the relay killed (SIGKILL) during a reconnect storm, phones killed
//! mid-write and mid-sync, lossy and flapping networks through a UDP proxy, storage that
//! stops accepting writes, and graceful shutdown. The promise under test: what the app
//! said was saved is saved, and what the relay acknowledged is never lost.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use automerge::ChangeHash;
use rand::Rng;
use redline_client::{Client, ClientConfig, RelayEndpoint};
use redline_proto::token::Role;
use redline_proto::{Day, DocId, MemberId, TeamId};
use redline_server::RelayConfig;
use redline_tests::faults::{Faults, FaultyStorage, RelayProcess, UdpProxy};
use redline_tests::{endpoint, start_relay, token_for};

fn day() -> Day {
    redline_tests::today()
}

fn team(t: &str) -> TeamId {
    TeamId::new(t).unwrap()
}

fn device(relay_dir: &Path, dir: &Path, member: &str, at: RelayEndpoint, role: Role) -> Client {
    let token = token_for(relay_dir, dir, member, role, &["team-1"], &[]).unwrap();
    let config = ClientConfig::new(MemberId::new(member).unwrap())
        .with_relay(at)
        .with_token(token)
        .with_teams(vec![team("team-1")]);
    Client::open(dir, config).unwrap()
}

/// A relay, a UDP proxy in front of it, phone `a` (ana) behind the proxy and phone `b`
/// (bao) straight on the relay.
struct Proxied {
    relay: redline_server::RelayHandle,
    proxy: UdpProxy,
    a: Client,
    b: Client,
}

async fn proxied(root: &Path) -> anyhow::Result<Proxied> {
    let relay = start_relay(&root.join("relay")).await?;
    let proxy = UdpProxy::start(relay.local_addr()).await?;
    let mut through = endpoint(&relay);
    through.addr = proxy.addr();
    let a = device(
        relay.data_dir(),
        &root.join("a"),
        "ana",
        through,
        Role::Volunteer,
    );
    let b = device(
        relay.data_dir(),
        &root.join("b"),
        "bao",
        endpoint(&relay),
        Role::Volunteer,
    );
    Ok(Proxied { relay, proxy, a, b })
}

/// A relay in-process on `FaultyStorage`: writes fail while `failing` holds (counted in
/// `refused`) and take `slow` milliseconds longer.
async fn faulty_relay(
    root: &Path,
    failing: &Arc<AtomicBool>,
    refused: &Arc<AtomicU64>,
    slow: &Arc<AtomicU64>,
) -> anyhow::Result<redline_server::RelayHandle> {
    let mut config = RelayConfig::new(root.join("relay"));
    config.http_listen = None;
    let config = config.with_listen(SocketAddr::from(([127, 0, 0, 1], 0)));
    let (f, r, s) = (failing.clone(), refused.clone(), slow.clone());
    Ok(
        redline_server::Relay::start_with_storage(config, move |sled| {
            Arc::new(FaultyStorage::new(sled, f, r).with_commit_delay(s))
        })
        .await?,
    )
}

/// The team's `count` tally on phone `c` today.
fn count(c: &Client) -> Option<i64> {
    c.day_totals(&team("team-1"), &day())
        .expect("the day reads")
        .get("count")
        .copied()
}

/// The hashes of every change an auditor sees on the relay for `doc`.
fn all_hashes(c: &Client, doc: &DocId) -> HashSet<ChangeHash> {
    c.document(doc)
        .unwrap()
        .map(|d| d.get_changes(&[]).iter().map(|c| c.hash()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_relay_mid_storm_loses_no_acknowledged_change() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let relay_dir = root.path().join("relay");
    let mut relay = RelayProcess::start(&relay_dir, SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let at = RelayEndpoint::new(relay.addr, &relay.fingerprint);
    let doc = DocId::ledger(&team("team-1"), &day());
    let devices: Vec<Client> = (0..12)
        .map(|i| {
            device(
                &relay_dir,
                &root.path().join(format!("d{i}")),
                &format!("m{i}"),
                at.clone(),
                Role::Volunteer,
            )
        })
        .collect();
    // Storm: every device writes and syncs in a loop; whatever a sync acknowledged is
    // recorded (the device's acked heads).
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(HashSet::<ChangeHash>::new()));
    let writes = Arc::new(AtomicU64::new(0));
    let mut storm = tokio::task::JoinSet::new();
    for c in devices.clone() {
        let (stop, acked, writes, doc) = (stop.clone(), acked.clone(), writes.clone(), doc.clone());
        storm.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                c.add_to_tally(&team("team-1"), &day(), "count", 1)
                    .expect("local write");
                writes.fetch_add(1, Ordering::Relaxed);
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(10), c.sync()).await
                    && let Some(heads) = c.acked_heads(&doc).expect("store")
                {
                    acked.lock().unwrap().extend(heads);
                }
                tokio::time::sleep(Duration::from_millis(rand::random_range(5..60))).await;
            }
        });
    }
    let mut crashes = 0;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(300..900))).await;
        relay.kill();
        crashes += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
        relay.restart()?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    while storm.join_next().await.is_some() {}
    // Everyone resends what was not acknowledged, and converges.
    for _ in 0..2 {
        for c in &devices {
            tokio::time::timeout(Duration::from_secs(30), c.sync()).await??;
        }
    }
    let auditor = device(
        &relay_dir,
        &root.path().join("auditor"),
        "auditor",
        at,
        Role::Operator,
    );
    auditor.sync().await?;
    let on_relay = all_hashes(&auditor, &doc);
    let acked = acked.lock().unwrap().clone();
    let lost: Vec<_> = acked.iter().filter(|h| !on_relay.contains(h)).collect();
    let total = count(&auditor).unwrap_or(0);
    println!(
        "crashes {crashes}, writes {}, acknowledged heads {}, changes on relay {}, lost {}",
        writes.load(Ordering::Relaxed),
        acked.len(),
        on_relay.len(),
        lost.len()
    );
    assert!(crashes >= 4 && !acked.is_empty());
    assert!(lost.is_empty(), "acknowledged changes lost: {lost:?}");
    assert_eq!(
        total as u64,
        writes.load(Ordering::Relaxed),
        "every write reached the relay"
    );
    for c in &devices {
        assert_eq!(c.heads(&doc)?, auditor.heads(&doc)?, "converged");
    }
    Ok(())
}

fn device_child(
    store: &Path,
    relay: &RelayProcess,
    token: &str,
    mode: &str,
) -> std::process::Child {
    let exe = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("device_child");
    Command::new(exe)
        .arg(store)
        .arg(relay.addr.to_string())
        .arg(&relay.fingerprint)
        .arg(token)
        .arg(mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("device_child is built with the tests")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_killed_mid_write_or_mid_sync_keeps_every_saved_write() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let relay_dir = root.path().join("relay");
    let relay = RelayProcess::start(&relay_dir, SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let at = RelayEndpoint::new(relay.addr, &relay.fingerprint);
    let store = root.path().join("phone");
    let token = token_for(&relay_dir, &store, "ana", Role::Volunteer, &["team-1"], &[])?;
    let mut kills = 0;
    let mut last_wrote = 0i64;
    for round in 0..8 {
        let mode = if round % 2 == 0 { "write" } else { "sync" };
        let mut child = device_child(&store, &relay, &token, mode);
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("child output").expect("readable");
        let start: i64 = first
            .split_whitespace()
            .nth(1)
            .expect("start N")
            .parse()
            .expect("a count");
        assert!(
            start >= last_wrote,
            "round {round}: the store has {start}, but {last_wrote} writes returned"
        );
        // Let it run a random while, then SIGKILL, mid-whatever it is doing.
        let budget = Duration::from_millis(rand::rng().random_range(100..600));
        let began = Instant::now();
        while began.elapsed() < budget {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("wrote ") => {
                    last_wrote = l[6..].parse().expect("a count")
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        child.kill().expect("kill");
        child.wait().expect("reap");
        kills += 1;
    }
    // The store reopens consistent, with every write that returned; a sync settles it.
    let phone = device(&relay_dir, &store, "ana", at.clone(), Role::Volunteer);
    let mine = count(&phone).unwrap_or(0);
    assert!(
        mine >= last_wrote && mine <= last_wrote + 1,
        "store holds {mine}, {last_wrote} writes returned"
    );
    phone.sync().await?;
    let auditor = device(
        &relay_dir,
        &root.path().join("auditor"),
        "auditor",
        at,
        Role::Operator,
    );
    auditor.sync().await?;
    let doc = DocId::ledger(&team("team-1"), &day());
    assert_eq!(auditor.heads(&doc)?, phone.heads(&doc)?);
    println!("phone processes killed {kills}, writes returned {last_wrote}, held {mine}, lost 0");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_completes_through_lossy_slow_duplicating_reordering_and_dead_networks()
-> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let Proxied {
        relay: _relay,
        proxy,
        a,
        b,
    } = proxied(root.path()).await?;
    let ms = Duration::from_millis;
    let rows: Vec<(&str, Faults, Option<Duration>)> = vec![
        (
            "drop 15%",
            Faults {
                drop: 0.15,
                ..Faults::default()
            },
            None,
        ),
        (
            "delay 80 ms",
            Faults {
                delay: ms(80),
                ..Faults::default()
            },
            None,
        ),
        (
            "duplicate 30%",
            Faults {
                duplicate: 0.3,
                ..Faults::default()
            },
            None,
        ),
        (
            "reorder (jitter 40 ms)",
            Faults {
                jitter: ms(40),
                ..Faults::default()
            },
            None,
        ),
        (
            "all at once",
            Faults {
                drop: 0.1,
                duplicate: 0.1,
                delay: ms(20),
                jitter: ms(20),
                ..Faults::default()
            },
            None,
        ),
        (
            "dead zone 3 s",
            Faults {
                blackhole: true,
                ..Faults::default()
            },
            Some(Duration::from_secs(3)),
        ),
    ];
    let mut expected = 0;
    for (name, faults, lift_after) in rows {
        proxy.set(faults);
        for _ in 0..5 {
            a.add_to_tally(&team("team-1"), &day(), "count", 1)?;
            expected += 1;
        }
        let started = Instant::now();
        let sync = tokio::spawn({
            let a = a.clone();
            async move { tokio::time::timeout(Duration::from_secs(60), a.sync()).await }
        });
        if let Some(after) = lift_after {
            tokio::time::sleep(after).await;
            proxy.set(Faults::default());
        }
        let report = sync.await?;
        assert!(
            matches!(report, Ok(Ok(_))),
            "{name}: sync failed: {report:?}"
        );
        b.sync().await?;
        let total = count(&b);
        assert_eq!(
            total,
            Some(expected),
            "{name}: the other phone has everything"
        );
        println!("{name}: synced in {:.2?}", started.elapsed());
    }
    println!(
        "proxy: {} forwarded, {} dropped, {} duplicated",
        proxy.counts.forwarded.load(Ordering::Relaxed),
        proxy.counts.dropped.load(Ordering::Relaxed),
        proxy.counts.duplicated.load(Ordering::Relaxed)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_the_relay_never_completes_is_replaced_by_a_fresh_connection()
-> anyhow::Result<()> {
    // The phone's handshake completes on its side; the relay never receives the phone's
    // last handshake packet, so it drops everything else the phone sends. Without the
    // hello deadline the sync would hang until QUIC's idle timeout (30 s) and fail.
    let root = tempfile::tempdir()?;
    let Proxied {
        relay: _relay,
        proxy,
        a,
        b,
    } = proxied(root.path()).await?;
    a.add_to_tally(&team("team-1"), &day(), "count", 3)?;
    proxy.set(Faults {
        stall_handshakes: 1,
        ..Faults::default()
    });
    let report = tokio::time::timeout(Duration::from_secs(60), a.sync()).await??;
    assert_eq!(
        report.reconnects, 1,
        "the stalled connection was abandoned once"
    );
    assert!(
        proxy.counts.dropped.load(Ordering::Relaxed) >= 1,
        "the proxy withheld the handshake"
    );
    b.sync().await?;
    assert_eq!(
        count(&b),
        Some(3),
        "the write went through on the fresh connection"
    );
    // Healthy networks never reconnect.
    let again = a.sync().await?;
    assert_eq!(again.reconnects, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_switching_networks_keeps_its_live_connection() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let Proxied {
        relay: _relay,
        proxy,
        a,
        b,
    } = proxied(root.path()).await?;
    let mut live = a.go_live()?;
    tokio::time::timeout(Duration::from_secs(10), live.reports.recv())
        .await?
        .expect("first flight")?;
    for round in 1..=3 {
        proxy.change_address();
        a.add_to_tally(&team("team-1"), &day(), "count", 1)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            b.sync().await?;
            if count(&b) == Some(round) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the change did not arrive"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Migrated, not restarted: the live session never reported a second connection.
    assert!(
        live.reports.try_recv().is_err(),
        "the live session reconnected instead of migrating"
    );
    assert!(proxy.counts.rebinds.load(Ordering::Relaxed) >= 3);
    live.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_storage_refuses_writes_keeps_serving_reads_and_recovers() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let failing = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let slow = Arc::new(AtomicU64::new(0));
    let relay = faulty_relay(root.path(), &failing, &refused, &slow).await?;
    let a = device(
        relay.data_dir(),
        &root.path().join("a"),
        "ana",
        endpoint(&relay),
        Role::Volunteer,
    );
    let doc = DocId::ledger(&team("team-1"), &day());
    a.add_to_tally(&team("team-1"), &day(), "count", 1)?;
    a.sync().await?;
    let acked = relay.heads(&doc).await?;

    // The disk fills up: writes are refused with a clear error, nothing acknowledged.
    failing.store(true, Ordering::SeqCst);
    a.add_to_tally(&team("team-1"), &day(), "count", 1)?;
    let report = a.sync().await?;
    assert_eq!(report.refused.len(), 1, "{report:?}");
    assert!(
        report.refused[0].1.starts_with("storage_failure"),
        "{report:?}"
    );
    assert_eq!(
        a.acked_heads(&doc)?,
        Some(acked.clone()),
        "nothing new acknowledged"
    );
    // Reads still work: a new phone gets what was acknowledged.
    let b = device(
        relay.data_dir(),
        &root.path().join("b"),
        "bao",
        endpoint(&relay),
        Role::Volunteer,
    );
    b.sync().await?;
    assert_eq!(count(&b), Some(1));
    assert!(refused.load(Ordering::Relaxed) > 0);

    // The disk recovers: the pending write goes through; nothing was lost.
    failing.store(false, Ordering::SeqCst);
    let report = a.sync().await?;
    assert!(report.refused.is_empty(), "{report:?}");
    b.sync().await?;
    assert_eq!(count(&b), Some(2));
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_hanging_up_while_the_relay_writes_its_push_stalls_nobody() -> anyhow::Result<()> {
    // A background sync cut off by its deadline (iOS BGTask, WorkManager) closes the
    // connection while the relay is still writing the phone's push. The write holds a
    // sequence number (and may carry other phones' pushes in its batch): it must finish,
    // or deliveries to every phone stop at that sequence.
    let root = tempfile::tempdir()?;
    let slow = Arc::new(AtomicU64::new(0));
    let relay = faulty_relay(root.path(), &Arc::default(), &Arc::default(), &slow).await?;
    let phone = |name: &str| {
        device(
            relay.data_dir(),
            &root.path().join(name),
            name,
            endpoint(&relay),
            Role::Volunteer,
        )
    };
    let (a, b, c) = (phone("ana"), phone("bao"), phone("chi"));
    a.add_to_tally(&team("team-1"), &day(), "count", 1)?;
    a.sync().await?;

    slow.store(1_500, Ordering::SeqCst);
    a.add_to_tally(&team("team-1"), &day(), "count", 10)?;
    let cut = tokio::time::timeout(Duration::from_millis(300), a.sync()).await;
    assert!(cut.is_err(), "the sync was cut off mid-write");
    tokio::time::sleep(Duration::from_secs(2)).await;
    slow.store(0, Ordering::SeqCst);

    b.add_to_tally(&team("team-1"), &day(), "count", 100)?;
    b.sync().await?;
    c.sync().await?;
    assert_eq!(
        count(&c),
        Some(111),
        "a new phone gets everything written, the cut-off push included"
    );
    a.sync().await?;
    assert_eq!(count(&a), Some(111));
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_made_while_the_last_push_is_in_flight_still_goes_out_live() -> anyhow::Result<()> {
    // A live phone writes again before the relay acknowledged its last push of the same
    // document (the relay's writes are slow here). The second write must follow once
    // the first is answered, not wait for a third write.
    let root = tempfile::tempdir()?;
    let slow = Arc::new(AtomicU64::new(0));
    let relay = faulty_relay(root.path(), &Arc::default(), &Arc::default(), &slow).await?;
    let phone = |name: &str| {
        device(
            relay.data_dir(),
            &root.path().join(name),
            name,
            endpoint(&relay),
            Role::Volunteer,
        )
    };
    let (a, b) = (phone("ana"), phone("bao"));
    let mut live = a.go_live()?;
    tokio::time::timeout(Duration::from_secs(10), live.reports.recv())
        .await?
        .expect("first flight")?;
    slow.store(400, Ordering::SeqCst);
    a.add_to_tally(&team("team-1"), &day(), "count", 1)?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.add_to_tally(&team("team-1"), &day(), "count", 1)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        b.sync().await?;
        if count(&b) == Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second write never left the live phone: {:?}",
            count(&b)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    live.stop().await;
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_cleanly_and_phones_reconnect_later() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let relay_dir = root.path().join("relay");
    let mut relay = RelayProcess::start(&relay_dir, SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let at = RelayEndpoint::new(relay.addr, &relay.fingerprint);
    let a = device(
        &relay_dir,
        &root.path().join("a"),
        "ana",
        at.clone(),
        Role::Volunteer,
    );
    let b = device(
        &relay_dir,
        &root.path().join("b"),
        "bao",
        at.clone(),
        Role::Volunteer,
    );
    let mut live = a.go_live()?;
    tokio::time::timeout(Duration::from_secs(10), live.reports.recv())
        .await?
        .expect("first flight")?;
    a.add_to_tally(&team("team-1"), &day(), "count", 1)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = relay.terminate(Duration::from_secs(20))?;
    assert!(status.success(), "the relay exits 0 on SIGTERM: {status}");
    // The phone sees the connection end.
    let ended = tokio::time::timeout(Duration::from_secs(10), live.reports.recv()).await?;
    assert!(matches!(ended, Some(Err(_))), "{ended:?}");
    // Later the relay is back; the live phone reconnects by itself.
    relay.restart()?;
    a.add_to_tally(&team("team-1"), &day(), "count", 1)?;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        b.sync().await?;
        if count(&b) == Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the live phone did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    live.stop().await;
    Ok(())
}
