//! The relay on a real PostgreSQL, started by the test in a temporary directory.

use std::collections::HashMap;

use redline_client::{NewTask, TaskKind};
use redline_proto::{Day, DocId, TeamId};
use redline_server::config::StorageChoice;
use redline_server::storage::conformance::{self, Harness};
use redline_server::storage::{Documents, PgOptions, PgStorage};
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
    conformance::run(&mut Postgres {
        pg: &pg,
        urls: HashMap::new(),
    });
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
    let first = migrate()?;
    assert!(first.contains("migrated from version 0 to 1"), "{first}");
    let again = migrate()?;
    assert!(again.contains("already at version 1"), "{again}");
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

#[tokio::test]
async fn a_second_relay_on_the_same_database_is_refused_clearly() -> anyhow::Result<()> {
    let Some(pg) = TestPostgres::start_or_skip("a_second_relay_on_the_same_database") else {
        return Ok(());
    };
    let url = pg.fresh_database()?;
    let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
    let first = start_relay_with(postgres_config(dirs[0].path(), &url)).await?;
    let second = start_relay_with(postgres_config(dirs[1].path(), &url)).await;
    let e = second
        .err()
        .expect("two relays on one database would fork the feed");
    assert!(e.to_string().contains("another relay is serving"), "{e}");
    // Once the first one stops, the database is free again.
    first.shutdown().await?;
    let again = start_relay_with(postgres_config(dirs[1].path(), &url)).await?;
    again.shutdown().await?;
    Ok(())
}
