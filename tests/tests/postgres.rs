//! The relay on a real PostgreSQL, started by the test in a temporary directory.

use std::collections::HashMap;

use redline_client::{NewTask, TaskKind};
use redline_proto::{Day, DocId, TeamId};
use redline_server::config::StorageChoice;
use redline_server::storage::conformance::{self, Harness};
use redline_server::storage::{ActorBindings, Documents, PgOptions, PgStorage};
use redline_tests::postgres::TestPostgres;
use redline_tests::{phone, start_relay_with};

/// Every store gets a database of its own; a restart connects again to the same one.
struct Postgres<'a> {
    pg: &'a TestPostgres,
    urls: HashMap<u64, String>,
}

impl Harness for Postgres<'_> {
    type Store = PgStorage;
    fn fresh(&mut self) -> PgStorage {
        let url = self.pg.fresh_database().expect("a new database");
        let s = PgStorage::connect(&PgOptions::new(url.clone())).expect("connect");
        self.urls.insert(s.epoch(), url);
        s
    }
    fn restart(&mut self, store: PgStorage) -> PgStorage {
        let url = self.urls[&store.epoch()].clone();
        // Dropping the store closes its connections: the server rolls back whatever
        // was not flushed, as a relay process that died would leave it.
        drop(store);
        PgStorage::connect(&PgOptions::new(url)).expect("connect again")
    }
}

#[test]
fn postgres_keeps_the_storage_contract() {
    let Some(pg) = TestPostgres::start_or_skip("postgres_keeps_the_storage_contract") else {
        return;
    };
    let mut harness = Postgres {
        pg: &pg,
        urls: HashMap::new(),
    };
    conformance::run(&mut harness);
    // The two calls on the live path go the asynchronous way on PostgreSQL (the checks
    // above hold that way and the blocking way).
    use redline_server::storage::{Documents, conformance::Harness};
    let store = harness.fresh();
    assert!(store.committed_feed_chunks_async(0, 64).is_some());
    assert!(store.flush_async().is_some());
}

/// Relay logs on stderr when `RUST_LOG` is set (for a failing run).
fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

fn postgres_config(dir: &std::path::Path, url: &str) -> redline_server::RelayConfig {
    let mut config = redline_tests::test_config(dir);
    config.storage = StorageChoice::Postgres(PgOptions::new(url));
    config
}

/// `GET path` on the relay's HTTP endpoint: status line and body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: relay\r\n\r\n").as_bytes())
            .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        anyhow::Ok(body)
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), get).await?
}

#[tokio::test]
async fn phones_sync_through_a_relay_on_postgres_and_a_restart_keeps_everything()
-> anyhow::Result<()> {
    let Some(pg) = TestPostgres::start_or_skip("phones_sync_through_a_relay_on_postgres") else {
        return Ok(());
    };
    logs();
    let url = pg.fresh_database()?;
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let relay = start_relay_with(postgres_config(dirs[0].path(), &url)).await?;
    assert!(
        relay
            .storage_description()
            .starts_with("postgresql postgres://127.0.0.1:"),
        "{}",
        relay.storage_description()
    );
    let health = http_get(relay.http_addr().expect("http"), "/health").await?;
    assert!(
        health.contains("200 OK") && health.contains("database ok"),
        "{health}"
    );

    let (team, day) = (TeamId::new("team-3")?, Day::new("2026-11-29")?);
    let id = DocId::ledger(&team, &day);
    let a = phone(dirs[1].path(), "amira", &relay)?;
    let b = phone(dirs[2].path(), "bao", &relay)?;
    a.add_task(
        &team,
        &day,
        NewTask::new(TaskKind::Screening, "Sample block 7"),
    )?;
    a.add_to_tally(&team, &day, "samples_taken", 5)?;
    b.add_task(
        &team,
        &day,
        NewTask::new(TaskKind::Transfer, "Bus to site B"),
    )?;
    b.add_to_tally(&team, &day, "samples_taken", 4)?;
    a.sync().await?;
    b.sync().await?;
    a.sync().await?;
    assert_eq!(a.heads(&id)?, b.heads(&id)?);
    let acked = a.acked_heads(&id)?.expect("acknowledged");
    assert_eq!(relay.heads(&id).await?, acked);
    assert_eq!(
        a.ledger(&team, &day)?
            .expect("ledger")
            .tallies
            .get("samples_taken"),
        Some(&9)
    );
    // What the database holds, seen by PostgreSQL itself: one feed entry per commit,
    // no gap, and the head row agrees.
    let db = url.rsplit('/').next().expect("database name");
    let (count, max, head) = (
        pg.psql(db, "SELECT count(*) FROM redline_feed")?,
        pg.psql(db, "SELECT max(seq) FROM redline_feed")?,
        pg.psql(db, "SELECT seq FROM redline_feed_head")?,
    );
    assert_eq!((&count, &max), (&head, &head), "feed count, max and head");
    relay.shutdown().await?;

    // A new relay process state on the same database: everything acknowledged is there,
    // and a phone that never met the first relay gets it all.
    let relay = start_relay_with(postgres_config(dirs[0].path(), &url)).await?;
    assert_eq!(relay.heads(&id).await?, acked, "lost acknowledged changes");
    let c_dir = tempfile::tempdir()?;
    let c = phone(c_dir.path(), "chen", &relay)?;
    c.follow(&id)?;
    c.sync().await?;
    assert_eq!(c.heads(&id)?, acked);
    // The no-op reconnect stays a no-op: the cursor's epoch is the database's.
    drop(a);
    let a = phone(dirs[1].path(), "amira", &relay)?;
    let idle = a.sync().await?;
    assert_eq!(
        (idle.changes_sent, idle.changes_received),
        (0, 0),
        "{idle:?}"
    );
    relay.shutdown().await?;
    Ok(())
}

/// On a shared feed the stable sequence is moved by the follower, a task that reads the
/// database. A push is answered only once it has moved past the push's commit: a phone
/// told "stored" (and every phone syncing through this relay after it) finds the commit
/// in its catch-up. Without that wait, a phone syncing right after another one's push
/// could end its sync without it (seen after a database restart, when the follower was
/// slow, and in the test below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_commit_is_already_in_the_relays_stable_feed() -> anyhow::Result<()> {
    use automerge::transaction::Transactable;
    let Some(pg) = TestPostgres::start_or_skip("an_acknowledged_commit_is_already_stable") else {
        return Ok(());
    };
    let url = pg.fresh_database()?;
    let storage = PgStorage::connect(&PgOptions::new(url.clone()))?;
    let hub = redline_server::hub::Hub::new(std::sync::Arc::new(storage), 1 << 20)?;
    let author = redline_server::authorship::Author {
        device: redline_proto::DeviceId::new("phone-0")?,
        member: redline_proto::MemberId::new("m0")?,
        role: redline_proto::token::Role::Volunteer,
    };
    let id = DocId::parse("households/zone-1")?;
    let mut doc = automerge::Automerge::new().with_actor(automerge::ActorId::from([1u8; 16]));
    for i in 0..20i64 {
        let before = doc.get_heads();
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, format!("k{i}"), i)?;
        tx.commit();
        let committed = hub.push(&id, &author, doc.get_changes(&before)).await?;
        let stable = *hub.stable().borrow();
        assert!(
            stable >= committed.seq,
            "push {i} answered with sequence {} while the stable sequence was {stable}",
            committed.seq
        );
    }
    // Alone on the feed, each commit follows the one before: it becomes stable as it
    // flushes, without the follower's round trip to the database (unless the follower,
    // woken by the commit's announcement, got there first: 18 to 20 of 20 here).
    let at_once = hub
        .stats
        .stable_at_once
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(at_once >= 10, "{at_once} of 20 commits stable at once");
    // Another relay commits in between (to a document this relay holds in its cache):
    // this relay's next commit is answered once stable, and by then its copy of the
    // other document holds the other relay's commit (never served stale).
    let elsewhere = DocId::parse("households/zone-2")?;
    let mut d2 = automerge::Automerge::new().with_actor(automerge::ActorId::from([2u8; 16]));
    let mut tx = d2.transaction();
    tx.put(automerge::ROOT, "k", 1)?;
    tx.commit();
    hub.push(&elsewhere, &author, d2.get_changes(&[])).await?;
    let other = redline_server::hub::Hub::new(
        std::sync::Arc::new(PgStorage::connect(&PgOptions::new(url.clone()))?),
        1 << 20,
    )?;
    let before = d2.get_heads();
    let mut tx = d2.transaction();
    tx.put(automerge::ROOT, "k", 2)?;
    tx.commit();
    let theirs = other
        .push(&elsewhere, &author, d2.get_changes(&before))
        .await?;
    let before = doc.get_heads();
    let mut tx = doc.transaction();
    tx.put(automerge::ROOT, "after", 1)?;
    tx.commit();
    let mine = hub.push(&id, &author, doc.get_changes(&before)).await?;
    assert!(mine.seq > theirs.seq);
    assert!(*hub.stable().borrow() >= mine.seq);
    let slot = hub.slot(&elsewhere).await?;
    let held = slot.lock().await.doc.get_heads();
    hub.release(slot);
    assert_eq!(
        held,
        d2.get_heads(),
        "the other relay's commit is in this relay's copy"
    );
    // It came with the follower's read of the feed: no read of its own.
    let ahead = hub
        .stats
        .taken_ahead
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        ahead, 1,
        "the other relay's commit taken in from the feed's read"
    );
    Ok(())
}

/// Once flaky (a phone syncing right after the restart lacked the other phone's change):
/// the follower had not yet made that change's commit stable (test above).
#[tokio::test]
async fn a_database_crash_loses_no_acknowledged_change_and_health_says_so() -> anyhow::Result<()> {
    let Some(pg) = TestPostgres::start_or_skip("a_database_crash_loses_no_acknowledged_change")
    else {
        return Ok(());
    };
    logs();
    let url = pg.fresh_database()?;
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let relay = start_relay_with(postgres_config(dirs[0].path(), &url)).await?;
    let http = relay.http_addr().expect("http");
    let (team, day) = (TeamId::new("team-1")?, Day::new("2026-11-30")?);
    let id = DocId::ledger(&team, &day);
    let a = phone(dirs[1].path(), "amira", &relay)?;
    for i in 0..5 {
        a.add_to_tally(&team, &day, "doses", i + 1)?;
    }
    a.sync().await?;
    let acked = a.acked_heads(&id)?.expect("acknowledged");

    // PostgreSQL dies without a checkpoint, like a power cut of its server.
    pg.crash()?;
    let down = http_get(http, "/health").await?;
    assert!(
        down.contains("503") && down.contains("unavailable"),
        "{down}"
    );
    // A phone writing meanwhile gets an error, keeps its changes, and loses nothing.
    let b = phone(dirs[2].path(), "bao", &relay)?;
    b.add_to_tally(&team, &day, "doses", 100)?;
    assert!(
        b.sync().await.is_err(),
        "no database: nothing can be acknowledged"
    );
    assert!(b.acked_heads(&id)?.is_none());

    pg.start_server()?;
    // The relay's pool reconnects; the phone's retry goes through.
    let mut tries = 0;
    loop {
        tries += 1;
        match b.sync().await {
            Ok(_) => break,
            Err(e) if tries < 20 => {
                eprintln!("retry {tries}: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    a.sync().await?;
    let up = http_get(http, "/health").await?;
    assert!(up.contains("200 OK") && up.contains("database ok"), "{up}");
    let heads = relay.heads(&id).await?;
    assert_eq!(a.heads(&id)?, heads);
    assert_eq!(b.heads(&id)?, heads);
    let view = a.ledger(&team, &day)?.expect("ledger");
    assert_eq!(view.tallies.get("doses"), Some(&115), "1+2+3+4+5 and 100");
    // And what was acknowledged before the crash is part of it, in the database.
    let stored = relay.document(&id).await?.expect("stored");
    for h in &acked {
        assert!(
            stored.get_change_meta_by_hash(h).is_some(),
            "acknowledged change {h} lost"
        );
    }
    relay.shutdown().await?;
    Ok(())
}

#[test]
fn writes_cut_off_by_a_database_crash_fail_their_flush_and_later_writes_work() {
    let Some(pg) = TestPostgres::start_or_skip("writes_cut_off_by_a_database_crash") else {
        return;
    };
    let url = pg.fresh_database().expect("database");
    let s = PgStorage::connect(&PgOptions::new(url.clone())).expect("connect");
    let doc = DocId::parse("households/z1").expect("doc id");
    s.commit(&doc, 1, b"c1", &[[1; 32]]).expect("commit 1");
    s.flush().expect("flush 1");
    s.commit(&doc, 2, b"c2", &[[2; 32]])
        .expect("commit 2 (not flushed)");
    pg.crash().expect("crash");
    pg.start_server().expect("start again");
    // The transaction holding commit 2 died with the server: its flush must say so,
    // never pretend it is durable.
    let flushed = s.flush();
    assert!(
        flushed.is_err(),
        "a flush after the crash reported {flushed:?}"
    );
    // The store goes on: a new write opens a new transaction on a live connection.
    s.commit(&doc, 3, b"c3", &[[3; 32]])
        .expect("commit 3 after the crash");
    s.flush().expect("flush 3");
    drop(s);
    let s = PgStorage::connect(&PgOptions::new(url)).expect("connect again");
    let stored = s.load(&doc).expect("load").expect("stored");
    assert_eq!(stored.chunks, vec![b"c1".to_vec(), b"c3".to_vec()]);
    assert_eq!(s.last_seq().expect("last"), 3);
    assert!(
        s.heads_at(&doc, 2)
            .expect("heads")
            .is_some_and(|h| h == vec![[1; 32]])
    );
}

#[test]
fn the_relay_binary_migrates_and_serves_on_postgres() -> anyhow::Result<()> {
    let Some(pg) = TestPostgres::start_or_skip("the_relay_binary_migrates_and_serves_on_postgres")
    else {
        return Ok(());
    };
    let url = pg.fresh_database()?;
    let migrate = || -> anyhow::Result<String> {
        let out = std::process::Command::new(redline_tests::faults::server_exe())
            .args(["migrate", "--postgres-url", &url])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    let version = redline_server::storage::postgres::SCHEMA_VERSION;
    let first = migrate()?;
    assert!(
        first.contains(&format!("migrated from version 0 to {version}")),
        "{first}"
    );
    let again = migrate()?;
    assert!(
        again.contains(&format!("already at version {version}")),
        "{again}"
    );
    // Without a database, `migrate` says what is missing.
    let out = std::process::Command::new(redline_tests::faults::server_exe())
        .arg("migrate")
        .env_remove("REDLINE_POSTGRES_URL")
        .current_dir(tempfile::tempdir()?.path())
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("postgres-url"));

    let dir = tempfile::tempdir()?;
    let relay = redline_tests::faults::RelayProcess::start_on_postgres(
        dir.path(),
        "127.0.0.1:0".parse()?,
        &url,
    )?;
    let health = relay.get("/health")?;
    assert!(
        health.contains("storage postgresql postgres://127.0.0.1:")
            && health.contains("database ok"),
        "{health}"
    );
    Ok(())
}

/// Three relay processes over one database: data dirs that share the certificate and
/// the token key (what an operator copies to each relay), so every phone may reach any
/// relay.
fn three_relay_processes(
    url: &str,
    dirs: &[tempfile::TempDir; 3],
) -> anyhow::Result<Vec<redline_tests::faults::RelayProcess>> {
    use redline_tests::faults::RelayProcess;
    let any = "127.0.0.1:0".parse()?;
    let first = RelayProcess::start_on_postgres(dirs[0].path(), any, url)?;
    // The token key exists once a token was issued.
    redline_tests::token_for(
        dirs[0].path(),
        dirs[0].path(),
        "nobody",
        redline_proto::token::Role::Volunteer,
        &[],
        &[],
    )?;
    let mut relays = vec![first];
    for dir in &dirs[1..] {
        redline_tests::copy_dir(dirs[0].path(), dir.path())?;
        relays.push(RelayProcess::start_on_postgres(dir.path(), any, url)?);
    }
    assert!(
        relays
            .iter()
            .all(|r| r.fingerprint == relays[0].fingerprint),
        "one certificate for the deployment"
    );
    Ok(relays)
}

/// The heads of `id` a new phone gets through `relay` alone.
async fn heads_through(
    relay: &redline_tests::faults::RelayProcess,
    key_dir: &std::path::Path,
    id: &DocId,
) -> anyhow::Result<Vec<automerge::ChangeHash>> {
    let dir = tempfile::tempdir()?;
    let reader = failover_phone(dir.path(), "reader", key_dir, relay, &[])?;
    reader.sync().await?;
    Ok(reader.heads(id)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_on_one_database_serve_one_team() -> anyhow::Result<()> {
    let Some(pg) = TestPostgres::start_or_skip("three_relays_on_one_database_serve_one_team")
    else {
        return Ok(());
    };
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let url = pg.fresh_database()?;
    let relays = three_relay_processes(&url, &dirs)?;
    let key = dirs[0].path();
    let phones = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    // Each phone knows only its own relay: nothing reaches it but through the relays.
    let a = failover_phone(phones[0].path(), "amira", key, &relays[0], &[])?;
    let c = failover_phone(phones[1].path(), "chen", key, &relays[1], &[])?;
    let b = failover_phone(phones[2].path(), "bao", key, &relays[2], &[])?;
    let (t, day) = (TeamId::new("team-1")?, Day::new("2026-11-30")?);
    let id = DocId::ledger(&t, &day);

    // A push through relay 1 reaches a phone live on relay 3.
    let mut live_b = b.go_live()?;
    live_b.reports.recv().await.expect("b connected")?;
    let mut seen = b.changes();
    a.add_task(
        &t,
        &day,
        NewTask::new(TaskKind::Supply, "Insulin to block 4"),
    )?;
    let written = std::time::Instant::now();
    a.sync().await?;
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            let doc = seen.recv().await.expect("change feed open").doc;
            if doc == id
                && b.ledger(&t, &day)
                    .ok()
                    .flatten()
                    .is_some_and(|v| !v.tasks.is_empty())
            {
                return;
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("a push through relay 1 never reached the phone on relay 3"))?;
    eprintln!("relay 1 -> relay 3, live: {:?}", written.elapsed());

    // Phones on relays 1 and 2 write the same document at the same time.
    let rounds = 12;
    let write = |p: redline_client::Client, n: u32| {
        let (t, day) = (t.clone(), day.clone());
        async move {
            for _ in 0..n {
                p.add_to_tally(&t, &day, "doses", 1)?;
                p.sync().await?;
            }
            anyhow::Ok(())
        }
    };
    let (ra, rc) = tokio::join!(write(a.clone(), rounds), write(c.clone(), rounds));
    ra?;
    rc?;
    // Acknowledged through relay 2 means readable there; through relay 1 once its
    // follower saw it (eventually, bounded here).
    let want = Some(&(2 * rounds as i64));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        for p in [&a, &c] {
            p.sync().await?;
        }
        let tally = |p: &redline_client::Client| -> anyhow::Result<Option<i64>> {
            Ok(p.ledger(&t, &day)?
                .expect("ledger")
                .tallies
                .get("doses")
                .copied())
        };
        if (tally(&a)?.as_ref(), tally(&c)?.as_ref()) == (want, want) {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the writers did not converge: {:?} and {:?}",
            tally(&a)?,
            tally(&c)?
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Every relay serves the same document (relay 3 learned of the others' commits).
    let heads = a.heads(&id)?;
    assert_eq!(c.heads(&id)?, heads);
    for (k, r) in relays.iter().enumerate() {
        assert_eq!(
            heads_through(r, key, &id).await?,
            heads,
            "relay {} serves stale heads",
            k + 1
        );
    }
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while b.heads(&id).ok() != Some(heads.clone()) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("the live phone on relay 3 did not converge"))?;
    live_b.stop().await;

    // The feed has no gap, whatever relay committed what.
    let db = url.rsplit('/').next().expect("database name");
    let count = pg.psql(db, "SELECT count(*) FROM redline_feed")?;
    let max = pg.psql(db, "SELECT max(seq) FROM redline_feed")?;
    let head = pg.psql(db, "SELECT seq FROM redline_feed_head")?;
    assert_eq!((&count, &max), (&head, &head), "feed count, max and head");
    let mut sums = [0.0; 3];
    for r in &relays {
        sums[0] += r.metric("redline_commit_conflicts_total")?;
        sums[1] += r.metric("redline_commits_taken_in_total")?;
        sums[2] += r.metric("redline_changes_applied_total")?;
    }
    let [conflicts, taken_in, applied] = sums;
    eprintln!(
        "{count} commits, {conflicts} batches applied again after a conflict, \
         {taken_in} commits of other relays applied to cached documents, \
         {applied} changes committed"
    );
    assert!(taken_in > 0.0, "the relays took in each other's commits");
    // Every change of the document was committed through exactly one relay, once: a
    // batch applied again after a conflict is not counted twice.
    let stored = a
        .document(&id)?
        .expect("the document")
        .get_changes(&[])
        .len();
    assert_eq!(applied, stored as f64, "changes counted by the relays");
    Ok(())
}

#[test]
fn one_actor_claimed_through_two_relays_binds_once() {
    let Some(pg) = TestPostgres::start_or_skip("one_actor_claimed_through_two_relays_binds_once")
    else {
        return;
    };
    let url = pg.fresh_database().expect("database");
    for round in 0..20u8 {
        let stores: Vec<PgStorage> = (0..2)
            .map(|_| PgStorage::connect(&PgOptions::new(url.clone())).expect("connect"))
            .collect();
        let actor = [round; 16];
        let barrier = std::sync::Barrier::new(2);
        let owners: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = stores
                .iter()
                .enumerate()
                .map(|(i, store)| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        let device = redline_proto::DeviceId::new(format!("phone-{i}")).unwrap();
                        barrier.wait();
                        let owner = store.bind_actor(&actor, &device).expect("bind");
                        store.flush().expect("flush");
                        owner.to_string()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            owners[0], owners[1],
            "round {round}: both relays name one owner"
        );
    }
}

/// A phone of team-1 whose first relay is `first` and which fails over to `others`.
fn failover_phone(
    dir: &std::path::Path,
    member: &str,
    key_dir: &std::path::Path,
    first: &redline_tests::faults::RelayProcess,
    others: &[&redline_tests::faults::RelayProcess],
) -> anyhow::Result<redline_client::Client> {
    let endpoint = |r: &redline_tests::faults::RelayProcess| {
        redline_client::RelayEndpoint::new(r.addr, r.fingerprint.clone())
    };
    let token = redline_tests::token_for(
        key_dir,
        dir,
        member,
        redline_proto::token::Role::Volunteer,
        &["team-1"],
        &[],
    )?;
    let config = redline_client::ClientConfig::new(redline_proto::MemberId::new(member)?)
        .with_relay(endpoint(first))
        .with_other_relays(others.iter().map(|r| endpoint(r)).collect())
        .with_token(token)
        .with_teams(vec![TeamId::new("team-1")?])
        .with_keep_days(36_500);
    Ok(redline_client::Client::open(dir, config)?)
}

/// Three relay processes on one database; relay 2 is killed (SIGKILL) while its phones
/// write and sync: they finish on relay 1 or 3, and nothing they were told is stored
/// is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phones_of_a_killed_relay_finish_on_the_others_and_lose_nothing() -> anyhow::Result<()> {
    let Some(pg) = TestPostgres::start_or_skip("phones_of_a_killed_relay_finish_on_the_others")
    else {
        return Ok(());
    };
    use redline_tests::faults::RelayProcess;
    let url = pg.fresh_database()?;
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let any = "127.0.0.1:0".parse()?;
    let r1 = RelayProcess::start_on_postgres(dirs[0].path(), any, &url)?;
    // The token key, then the same certificate and key for relays 2 and 3.
    redline_tests::token_for(
        dirs[0].path(),
        dirs[0].path(),
        "nobody",
        redline_proto::token::Role::Volunteer,
        &[],
        &[],
    )?;
    for d in &dirs[1..] {
        redline_tests::copy_dir(dirs[0].path(), d.path())?;
    }
    let mut r2 = RelayProcess::start_on_postgres(dirs[1].path(), any, &url)?;
    let r3 = RelayProcess::start_on_postgres(dirs[2].path(), any, &url)?;
    let key = dirs[0].path();
    let phone_dirs: Vec<tempfile::TempDir> = (0..6)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let mut phones = Vec::new();
    for (i, d) in phone_dirs.iter().enumerate() {
        let p = match i % 3 {
            0 => failover_phone(d.path(), &format!("m{i}"), key, &r1, &[&r3, &r2])?,
            1 => failover_phone(d.path(), &format!("m{i}"), key, &r2, &[&r1, &r3])?,
            _ => failover_phone(d.path(), &format!("m{i}"), key, &r3, &[&r1, &r2])?,
        };
        phones.push(p);
    }
    let (t, day) = (TeamId::new("team-1")?, Day::new("2026-11-30")?);
    let id = DocId::ledger(&t, &day);
    let writes = 30u32;
    // Every phone writes and syncs; a sync that fails is retried on the next write. Each
    // phone counts what the relays acknowledged (its own writes up to its last sync).
    let run = |p: redline_client::Client| {
        let (t, day) = (t.clone(), day.clone());
        async move {
            let (mut acked, mut sent, mut failed) = (0u32, 0u64, 0u32);
            for w in 1..=writes {
                p.add_to_tally(&t, &day, "doses", 1)?;
                match p.sync().await {
                    Ok(report) => {
                        acked = w;
                        sent += report.changes_sent;
                    }
                    Err(_) => failed += 1,
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            anyhow::Ok((p, acked, sent, failed))
        }
    };
    let mut storm = tokio::task::JoinSet::new();
    for p in phones {
        storm.spawn(run(p));
    }
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    r2.kill();
    let mut phones = Vec::new();
    let mut acked_total = 0;
    let mut sent = Vec::new();
    while let Some(done) = storm.join_next().await {
        let (p, acked, s, failed) = done??;
        acked_total += acked;
        phones.push(p);
        sent.push((s, failed));
    }
    // Everyone finishes (on relay 1 or 3) and converges: through one relay at once,
    // across relays once each relay's follower saw the others' commits (bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut heads = Vec::new();
        for (p, s) in phones.iter().zip(sent.iter_mut()) {
            s.0 += p.sync().await?.changes_sent;
            heads.push(p.heads(&id)?);
        }
        if heads.iter().all(|h| *h == heads[0]) {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "phones differ after the failover"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Nothing acknowledged is sent again after moving: each of a phone's writes went up
    // in one successful sync (the genesis of the day's ledger at most once more, by the
    // phone that created it); what a failed sync had in flight is not counted.
    for (i, (s, failed)) in sent.iter().enumerate() {
        eprintln!("phone {i}: {s} changes sent in successful syncs, {failed} syncs failed");
        assert!(
            *s <= writes as u64 + 1,
            "phone {i} sent {s} changes for {writes} writes: acknowledged ones sent again"
        );
    }
    let heads = phones[0].heads(&id)?;
    for p in &phones {
        assert_eq!(p.heads(&id)?, heads, "phones differ after the failover");
        assert_ne!(
            p.current_relay()?.addr,
            r2.addr,
            "a phone still points at the dead relay"
        );
        assert_eq!(
            p.ledger(&t, &day)?.expect("ledger").tallies.get("doses"),
            Some(&(6 * writes as i64))
        );
    }
    // A phone that never wrote reads everything from relay 3.
    let reader_dir = tempfile::tempdir()?;
    let reader = failover_phone(reader_dir.path(), "reader", key, &r3, &[])?;
    reader.sync().await?;
    let total = reader.ledger(&t, &day)?.expect("ledger").tallies["doses"];
    assert!(
        total >= acked_total as i64,
        "acknowledged {acked_total}, stored {total}"
    );
    assert_eq!(total, 6 * writes as i64);
    let db = url.rsplit('/').next().expect("database name");
    let (count, max) = (
        pg.psql(db, "SELECT count(*) FROM redline_feed")?,
        pg.psql(db, "SELECT max(seq) FROM redline_feed")?,
    );
    assert_eq!(count, max, "the feed has no gap");
    drop(r1);
    drop(r3);
    Ok(())
}

#[test]
fn the_relay_reaches_postgres_over_tls_checked_against_its_ca() -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca = |name: &str| -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key)?;
        Ok((cert.pem(), Issuer::new(params, key)))
    };
    let (ca_pem, issuer) = ca("database CA")?;
    let (other_ca_pem, _) = ca("someone else's CA")?;
    let server_key = KeyPair::generate()?;
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?
        .signed_by(&server_key, &issuer)?;
    let started = TestPostgres::start_tls(&server.pem(), &server_key.serialize_pem(), &ca_pem);
    let (pg, ca_file) = match started {
        Ok(s) => s,
        Err(e)
            if std::env::var_os("CI").is_none()
                && redline_tests::postgres::find_bin().is_none() =>
        {
            eprintln!("\n*** SKIPPED: PostgreSQL cannot be started here: {e:#}\n");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let url = pg.fresh_database()?;
    // With the CA: TLS, and the server's certificate checked.
    let mut options = PgOptions::new(url.clone());
    options.ca_file = Some(ca_file.clone());
    let s = PgStorage::connect(&options)?;
    let doc = DocId::parse("households/z1")?;
    s.commit(&doc, 1, b"c1", &[[1; 32]])?;
    s.flush()?;
    assert_eq!(s.load(&doc)?.expect("stored").chunks, vec![b"c1".to_vec()]);
    drop(s);
    // Without TLS the server refuses (it takes TLS only): so the above went over TLS.
    let plain = PgStorage::connect(&PgOptions::new(url.clone()));
    assert!(plain.is_err(), "a plain connection must be refused");
    // Trusting another CA: the server's certificate is refused.
    let other = pg.dir_path().join("other-ca.pem");
    std::fs::write(&other, other_ca_pem)?;
    let mut wrong = PgOptions::new(url);
    wrong.ca_file = Some(other);
    let e = PgStorage::connect(&wrong)
        .err()
        .expect("an unknown CA must be refused");
    assert!(
        format!("{e:?}").to_lowercase().contains("certificate"),
        "{e:?}"
    );
    Ok(())
}

/// PostgreSQL dies without a checkpoint (`pg_ctl stop -m immediate`) while phones on
/// two relays write and sync, and comes back: no acknowledged change is lost, and
/// everyone converges once it is back.
///
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_crash_mid_storm_loses_no_acknowledged_change() -> anyhow::Result<()> {
    let Some(pg) = TestPostgres::start_or_skip("a_database_crash_mid_storm") else {
        return Ok(());
    };
    use redline_tests::faults::RelayProcess;
    let url = pg.fresh_database()?;
    let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
    let any = "127.0.0.1:0".parse()?;
    let r1 = RelayProcess::start_on_postgres(dirs[0].path(), any, &url)?;
    redline_tests::token_for(
        dirs[0].path(),
        dirs[0].path(),
        "nobody",
        redline_proto::token::Role::Volunteer,
        &[],
        &[],
    )?;
    redline_tests::copy_dir(dirs[0].path(), dirs[1].path())?;
    let r2 = RelayProcess::start_on_postgres(dirs[1].path(), any, &url)?;
    let key = dirs[0].path();
    let phone_dirs: Vec<tempfile::TempDir> = (0..4)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let mut phones = Vec::new();
    for (i, d) in phone_dirs.iter().enumerate() {
        let (first, other) = if i % 2 == 0 { (&r1, &r2) } else { (&r2, &r1) };
        phones.push(failover_phone(
            d.path(),
            &format!("m{i}"),
            key,
            first,
            &[other],
        )?);
    }
    let (t, day) = (TeamId::new("team-1")?, Day::new("2026-11-30")?);
    let writes = 40u32;
    let run = |p: redline_client::Client| {
        let (t, day) = (t.clone(), day.clone());
        async move {
            let mut acked = 0u32;
            for w in 1..=writes {
                p.add_to_tally(&t, &day, "doses", 1)?;
                if p.sync().await.is_ok() {
                    acked = w;
                }
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            anyhow::Ok((p, acked))
        }
    };
    let mut storm = tokio::task::JoinSet::new();
    for p in phones {
        storm.spawn(run(p));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    pg.crash()?;
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    pg.start_server()?;
    let mut phones = Vec::new();
    let mut acked_total = 0;
    while let Some(done) = storm.join_next().await {
        let (p, acked) = done??;
        acked_total += acked;
        phones.push(p);
    }
    // Once the database is back every phone gets through (the relays reconnect).
    for p in &phones {
        let mut tries = 0;
        while let Err(e) = p.sync().await {
            tries += 1;
            anyhow::ensure!(tries < 40, "a phone never got through after the crash: {e}");
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }
    for p in &phones {
        p.sync().await?;
    }
    let reader_dir = tempfile::tempdir()?;
    let reader = failover_phone(reader_dir.path(), "reader", key, &r2, &[&r1])?;
    // A commit acknowledged by one relay is readable through the other once that one's
    // follower has seen it (a NOTIFY, or its re-read within 500 ms): eventually, not at
    // once. Bounded: a relay whose cache stays behind fails the test.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut total;
    loop {
        reader.sync().await?;
        total = reader.ledger(&t, &day)?.expect("ledger").tallies["doses"];
        if total == 4 * writes as i64 || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    if total != 4 * writes as i64 {
        // Which copy lacks what: each phone's own view, and a reader through relay 1.
        let mut seen = Vec::new();
        for p in &phones {
            seen.push(p.ledger(&t, &day)?.expect("ledger").tallies["doses"]);
        }
        let other_dir = tempfile::tempdir()?;
        let other = failover_phone(other_dir.path(), "reader2", key, &r1, &[])?;
        other.sync().await?;
        let via_r1 = other.ledger(&t, &day)?.expect("ledger").tallies["doses"];
        panic!(
            "acknowledged {acked_total}, read through relay 2 {total}, through relay 1 \
             {via_r1}, phones {seen:?}"
        );
    }
    assert!(
        total >= acked_total as i64,
        "acknowledged {acked_total}, stored {total}"
    );
    assert_eq!(
        total,
        4 * writes as i64,
        "every write arrives once the database is back"
    );
    // And every phone, on either relay, catches up from its cursor to all of it: no
    // relay's cache stays behind.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut seen = Vec::new();
        for p in &phones {
            p.sync().await?;
            seen.push(p.ledger(&t, &day)?.expect("ledger").tallies["doses"]);
        }
        if seen.iter().all(|&n| n == total) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "phones stay behind: {seen:?} of {total}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let db = url.rsplit('/').next().expect("database name");
    let (count, max) = (
        pg.psql(db, "SELECT count(*) FROM redline_feed")?,
        pg.psql(db, "SELECT max(seq) FROM redline_feed")?,
    );
    assert_eq!(count, max, "the feed has no gap");
    Ok(())
}

/// Flushes are shared: after a crash, the flush that reports the loss may be another
/// caller's, and a later flush succeeds. The appender still learns its append was lost.
#[test]
fn an_append_lost_in_a_crash_is_reported_lost_after_a_later_good_flush() {
    let Some(pg) = TestPostgres::start_or_skip("an_append_lost_in_a_crash") else {
        return;
    };
    let url = pg.fresh_database().expect("database");
    let s = PgStorage::connect(&PgOptions::new(url)).expect("connect");
    let (a, b) = (
        DocId::parse("households/z1").unwrap(),
        DocId::parse("households/z2").unwrap(),
    );
    assert_eq!(s.append(&a, 0, b"a1", &[[1; 32]]).unwrap(), 1);
    s.flush().unwrap();
    assert!(!s.append_lost(&a, 1), "flushed");
    let lost = s.append(&a, 1, b"a2", &[[2; 32]]).unwrap();
    pg.crash().expect("crash");
    pg.start_server().expect("start again");
    // Someone else's flush meets the dead transaction and reports it...
    assert!(s.flush().is_err());
    // ...then later work flushes fine.
    let kept = s.append(&b, 0, b"b1", &[[3; 32]]).unwrap();
    s.flush().unwrap();
    assert_eq!(kept, lost, "the rolled-back sequence is taken again");
    assert!(
        s.append_lost(&a, lost),
        "a's append died with its transaction"
    );
    assert!(
        !s.append_lost(&b, kept),
        "b's, with the same sequence, is stored"
    );
    assert_eq!(s.load(&a).unwrap().unwrap().chunks, vec![b"a1".to_vec()]);
}
