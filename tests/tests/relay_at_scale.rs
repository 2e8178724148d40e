//! Relay sync at scale, end to end over QUIC on loopback: no-op reconnects cost one
//! round trip, many devices reconnect at once and converge, changes arrive live,
//! subscriptions bring documents nobody named, large documents survive cut connections,
//! the document cache evicts without losing anything, and a relay restored from an
//! older copy gets repaired by the devices.

use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ObjType, ROOT, ReadDoc};
use redline_client::{NewHousehold, NewTask, TaskKind};
use redline_proto::{Day, DocId, TeamId, ZoneId};
use redline_tests::{copy_dir, start_relay, start_relay_with, team_phone};

fn team(t: &str) -> TeamId {
    TeamId::new(t).unwrap()
}

/// The `i`-th day from 2025-01-01.
fn nth_day(i: i64) -> Day {
    let d = time::Date::from_calendar_date(2025, time::Month::January, 1).unwrap()
        + time::Duration::days(i);
    Day::new(format!(
        "{:04}-{:02}-{:02}",
        d.year(),
        u8::from(d.month()),
        d.day()
    ))
    .unwrap()
}

/// Enough days back to cover every `nth_day` from any "today".
const ALL_DAYS: u32 = 20_000;

#[tokio::test]
async fn a_no_op_reconnect_of_500_documents_is_one_round_trip_under_2_kb() -> anyhow::Result<()> {
    let (rd, pd) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let relay = start_relay(rd.path()).await?;
    let phone = team_phone(pd.path(), "amira", &relay, &["team-1"], &[], ALL_DAYS)?;
    for i in 0..500 {
        phone.add_to_tally(&team("team-1"), &nth_day(i), "samples_taken", 1)?;
    }
    let first = phone.sync().await?;
    assert_eq!((first.docs, first.docs_pushed), (500, 500), "{first:?}");
    assert_eq!(relay.documents().await?.len(), 500);

    let again = phone.sync().await?;
    println!("no-op reconnect, 500 docs: {again:?}");
    assert_eq!(again.round_trips, 1, "{again:?}");
    assert_eq!(
        (again.frames_sent, again.frames_received),
        (2, 2),
        "hello + pull, welcome + caught"
    );
    assert!(again.bytes_sent + again.bytes_received < 2048, "{again:?}");
    assert_eq!(
        (
            again.changes_sent,
            again.changes_received,
            again.docs_pushed
        ),
        (0, 0, 0)
    );

    // One new change elsewhere costs only that document.
    let other = team_phone(
        tempfile::tempdir()?.path(),
        "bao",
        &relay,
        &["team-1"],
        &[],
        ALL_DAYS,
    )?;
    other.add_to_tally(&team("team-1"), &nth_day(7), "samples_taken", 2)?;
    other.sync().await?;
    let one = phone.sync().await?;
    assert_eq!((one.docs_updated, one.round_trips), (1, 1), "{one:?}");
    assert!(one.bytes_received < 2048, "{one:?}");
    assert_eq!(
        phone
            .day_totals(&team("team-1"), &nth_day(7))?
            .get("samples_taken"),
        Some(&3)
    );
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn fifty_devices_with_twenty_documents_each_reconnect_at_once_and_converge()
-> anyhow::Result<()> {
    let rd = tempfile::tempdir()?;
    let relay = start_relay(rd.path()).await?;
    let (teams, per_team, docs) = (5usize, 10usize, 20i64);
    let mut dirs = Vec::new();
    let mut phones = Vec::new();
    for t in 0..teams {
        for p in 0..per_team {
            let dir = tempfile::tempdir()?;
            let name = format!("team-{t}");
            let phone = team_phone(
                dir.path(),
                &format!("m{t}-{p}"),
                &relay,
                &[name.as_str()],
                &[],
                ALL_DAYS,
            )?;
            for d in 0..docs {
                phone.add_to_tally(
                    &team(&name),
                    &nth_day(d),
                    "households_visited",
                    (p + 1) as u32,
                )?;
                if d % 4 == p as i64 % 4 {
                    phone.add_task(
                        &team(&name),
                        &nth_day(d),
                        NewTask::new(TaskKind::Inspection, format!("patrol {p}")),
                    )?;
                }
            }
            phones.push((t, phone));
            dirs.push(dir);
        }
    }
    let started = Instant::now();
    for round in 0..2 {
        let mut all = tokio::task::JoinSet::new();
        for (_, phone) in &phones {
            let phone = phone.clone();
            all.spawn(async move { phone.sync().await });
        }
        while let Some(r) = all.join_next().await {
            r??;
        }
        println!("round {round} done after {:?}", started.elapsed());
    }
    let stats = relay.stats();
    println!(
        "50 devices x 20 docs: converged in {:?}; commits {}, pushes {}, largest batch {}, flushes {}",
        started.elapsed(),
        stats.commits.load(std::sync::atomic::Ordering::Relaxed),
        stats.pushes.load(std::sync::atomic::Ordering::Relaxed),
        stats.max_batch.load(std::sync::atomic::Ordering::Relaxed),
        stats.flushes.load(std::sync::atomic::Ordering::Relaxed),
    );
    let expected: i64 = (1..=per_team as i64).sum();
    for t in 0..teams {
        for d in 0..docs {
            let id = DocId::ledger(&team(&format!("team-{t}")), &nth_day(d));
            let relay_heads = relay.heads(&id).await?;
            for (_, phone) in phones.iter().filter(|(pt, _)| *pt == t) {
                assert_eq!(
                    phone.heads(&id)?,
                    relay_heads,
                    "{} differs on {id}",
                    phone.member()
                );
            }
            let (_, first) = phones.iter().find(|(pt, _)| *pt == t).unwrap();
            let totals = first.day_totals(&team(&format!("team-{t}")), &nth_day(d))?;
            assert_eq!(totals.get("households_visited"), Some(&expected), "{id}");
        }
    }
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_live_change_arrives_with_no_sync_call_by_the_receiver() -> anyhow::Result<()> {
    let (rd, ad, bd) = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    let relay = start_relay(rd.path()).await?;
    let a = team_phone(ad.path(), "amira", &relay, &["team-1"], &[], ALL_DAYS)?;
    let b = team_phone(bd.path(), "bao", &relay, &["team-1"], &[], ALL_DAYS)?;
    let mut live_b = b.go_live()?;
    let mut live_a = a.go_live()?;
    // Both have finished their first flight.
    live_b.reports.recv().await.expect("b connected")?;
    live_a.reports.recv().await.expect("a connected")?;
    let mut seen = b.changes();

    let (t, day) = (team("team-1"), nth_day(3));
    let id = DocId::ledger(&t, &day);
    let written = Instant::now();
    a.add_task(&t, &day, NewTask::new(TaskKind::Supply, "Deliver insulin"))?;
    let arrived = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let doc = seen.recv().await.expect("change feed open").doc;
            if doc == id
                && b.ledger(&t, &day)
                    .ok()
                    .flatten()
                    .is_some_and(|v| !v.tasks.is_empty())
            {
                return written.elapsed();
            }
        }
    })
    .await
    .expect("the change reached b without a sync call");
    println!("live propagation a -> relay -> b: {arrived:?}");
    assert_eq!(
        b.ledger(&t, &day)?.unwrap().tasks[0].title,
        "Deliver insulin"
    );

    // A document b never named: a new day, within b's subscription.
    let new_day = nth_day(4);
    a.add_to_tally(&t, &new_day, "deliveries", 5)?;
    let new_id = DocId::ledger(&t, &new_day);
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if seen.recv().await.expect("change feed open").doc == new_id {
                return;
            }
        }
    })
    .await
    .expect("the new document reached b");
    assert_eq!(b.day_totals(&t, &new_day)?.get("deliveries"), Some(&5));
    live_a.stop().await;
    live_b.stop().await;
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn subscriptions_bring_the_zones_a_device_covers_and_nothing_else() -> anyhow::Result<()> {
    let (rd, wd, zd) = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    let relay = start_relay(rd.path()).await?;
    let writer = team_phone(wd.path(), "olu", &relay, &[], &["zone-a", "zone-b"], 7)?;
    let reader = team_phone(zd.path(), "amira", &relay, &[], &["zone-a"], 7)?;
    let household = NewHousehold {
        address: "Block 7".into(),
        residents: 2,
        ..Default::default()
    };
    writer.add_household(&ZoneId::new("zone-a")?, household.clone())?;
    writer.add_household(&ZoneId::new("zone-b")?, household)?;
    writer.sync().await?;
    let report = reader.sync().await?;
    assert_eq!(report.docs_updated, 1, "{report:?}");
    assert_eq!(
        reader.documents()?,
        [DocId::households(&ZoneId::new("zone-a")?)]
    );
    assert_eq!(
        reader
            .households(&ZoneId::new("zone-a")?)?
            .unwrap()
            .households
            .len(),
        1
    );
    assert!(
        reader.households(&ZoneId::new("zone-b")?)?.is_none(),
        "zone-b is outside the subscription"
    );
    relay.shutdown().await?;
    Ok(())
}

/// A document of about `mb` MiB of incompressible text (photos attached to a ledger).
fn big_document(mb: usize) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let mut doc = Automerge::new().with_actor(ActorId::from([42u8; 16]));
    let mut tx = doc.transaction();
    let photos = tx.put_object(ROOT, "attachments", ObjType::Map).unwrap();
    for i in 0..mb {
        let blob: Vec<u8> = (0..1024 * 1024).map(|_| rng.random::<u8>()).collect();
        tx.put(
            &photos,
            format!("photo-{i}"),
            automerge::ScalarValue::Bytes(blob),
        )
        .unwrap();
    }
    tx.commit();
    doc.save()
}

/// Which way a cut counts bytes.
#[derive(Clone, Copy)]
enum Direction {
    Sent,
    Received,
}

/// Syncs `phone` until a sync completes, cutting the connection (dropping the sync)
/// whenever an attempt has moved more than `limit` bytes in `direction`. Returns the
/// number of cuts and the report of the attempt that completed.
async fn sync_with_cuts(
    phone: &redline_client::Client,
    limit: u64,
    direction: Direction,
) -> (usize, redline_client::SyncReport) {
    let moved = |p: &redline_client::Client| match direction {
        Direction::Sent => p.traffic().0,
        Direction::Received => p.traffic().1,
    };
    let mut cuts = 0;
    loop {
        assert!(cuts < 400, "no progress after {cuts} cuts");
        let start = moved(phone);
        let c = phone.clone();
        let attempt = tokio::spawn(async move { c.sync().await });
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        loop {
            tick.tick().await;
            if attempt.is_finished() {
                break;
            }
            if moved(phone) - start > limit {
                attempt.abort();
                cuts += 1;
                break;
            }
        }
        match attempt.await {
            Ok(Ok(report)) => return (cuts, report),
            Ok(Err(e)) => panic!("sync failed: {e}"),
            Err(_) => continue, // cut
        }
    }
}

#[tokio::test]
async fn a_20_mb_document_syncs_over_a_connection_cut_every_few_hundred_kb() -> anyhow::Result<()> {
    let (rd, pd) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let relay = start_relay(rd.path()).await?;
    let phone = team_phone(pd.path(), "amira", &relay, &["team-1"], &[], ALL_DAYS)?;
    let id = DocId::ledger(&team("team-1"), &nth_day(0));
    let bytes = big_document(20);
    let size = bytes.len() as u64;
    assert!(size >= 20 * 1024 * 1024, "document is {size} bytes");
    phone.import(&id, &bytes)?;

    let (sent_before, _) = phone.traffic();
    let (cuts, report) = sync_with_cuts(&phone, 300 * 1024, Direction::Sent).await;
    let sent = phone.traffic().0 - sent_before;
    println!(
        "20 MB doc ({size} bytes): {cuts} cuts, {sent} bytes sent ({:.2}x); last attempt {report:?}",
        sent as f64 / size as f64
    );
    assert!(cuts >= 20, "the connection was cut only {cuts} times");
    assert!(
        sent < 2 * size,
        "sent {sent} bytes for a {size}-byte document"
    );
    assert_eq!(relay.heads(&id).await?, phone.heads(&id)?);
    let stored = relay.document(&id).await?.expect("relay holds it");
    let (_, photos) = stored.get(ROOT, "attachments")?.expect("attachments");
    assert_eq!(stored.length(&photos), 20);
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_new_device_downloads_a_20_mb_document_over_cut_connections_and_resumes()
-> anyhow::Result<()> {
    let (rd, ad, bd) = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    let relay = start_relay(rd.path()).await?;
    let a = team_phone(ad.path(), "amira", &relay, &["team-1"], &[], ALL_DAYS)?;
    let id = DocId::ledger(&team("team-1"), &nth_day(0));
    let bytes = big_document(20);
    a.import(&id, &bytes)?;
    a.sync().await?;

    let b = team_phone(bd.path(), "bao", &relay, &["team-1"], &[], ALL_DAYS)?;
    let (_, received_before) = b.traffic();
    let (cuts, _) = sync_with_cuts(&b, 300 * 1024, Direction::Received).await;
    let received = b.traffic().1 - received_before;
    let size = bytes.len() as u64;
    println!(
        "20 MB download ({size} bytes): {cuts} cuts, {received} bytes received ({:.2}x)",
        received as f64 / size as f64
    );
    assert!(cuts >= 10, "the connection was cut only {cuts} times");
    assert!(
        received < 2 * size,
        "received {received} bytes for a {size}-byte document"
    );
    assert_eq!(b.heads(&id)?, relay.heads(&id).await?);
    let doc = b.document(&id)?.expect("b holds it");
    let (_, photos) = doc.get(ROOT, "attachments")?.expect("attachments");
    assert_eq!(doc.length(&photos), 20);
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_small_cache_evicts_documents_without_losing_anything() -> anyhow::Result<()> {
    let rd = tempfile::tempdir()?;
    let mut config = redline_tests::test_config(rd.path());
    config.cache_budget_bytes = 1;
    let relay = start_relay_with(config).await?;
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let phones: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            team_phone(
                d.path(),
                &format!("m{i}"),
                &relay,
                &["team-1"],
                &[],
                ALL_DAYS,
            )
        })
        .collect::<Result<_, _>>()?;
    for round in 0..2 {
        for (i, p) in phones.iter().enumerate() {
            for d in 0..10 {
                p.add_to_tally(
                    &team("team-1"),
                    &nth_day(d),
                    "samples_taken",
                    (i + 1) as u32,
                )?;
            }
            p.sync().await?;
        }
        let _ = round;
    }
    for p in &phones {
        p.sync().await?;
    }
    assert!(
        relay
            .stats()
            .evictions
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    assert!(
        relay.cached_documents() <= 2,
        "{} documents cached",
        relay.cached_documents()
    );
    for d in 0..10 {
        let id = DocId::ledger(&team("team-1"), &nth_day(d));
        let heads = relay.heads(&id).await?;
        for p in &phones {
            assert_eq!(p.heads(&id)?, heads);
            assert_eq!(
                p.day_totals(&team("team-1"), &nth_day(d))?
                    .get("samples_taken"),
                Some(&12)
            );
        }
    }
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn devices_repair_a_relay_restored_from_an_older_copy() -> anyhow::Result<()> {
    let (rd, backup, ad, bd) = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    let (t, day) = (team("team-1"), nth_day(9));
    let a_dir = ad.path();

    let relay = start_relay(rd.path()).await?;
    let fingerprint = relay.fingerprint();
    let a = team_phone(a_dir, "amira", &relay, &["team-1"], &[], ALL_DAYS)?;
    a.add_task(
        &t,
        &day,
        NewTask::new(TaskKind::Transfer, "before the backup"),
    )?;
    a.sync().await?;
    drop(a);
    relay.shutdown().await?;
    copy_dir(rd.path(), backup.path())?;

    let relay = start_relay(rd.path()).await?;
    let a = team_phone(a_dir, "amira", &relay, &["team-1"], &[], ALL_DAYS)?;
    a.add_task(
        &t,
        &day,
        NewTask::new(TaskKind::Transfer, "after the backup"),
    )?;
    a.add_to_tally(&t, &day, "samples_taken", 4)?;
    a.sync().await?;
    drop(a);
    relay.shutdown().await?;

    // The operator restores the older copy: it lacks what it acknowledged to `a` since.
    std::fs::remove_dir_all(rd.path())?;
    copy_dir(backup.path(), rd.path())?;
    let relay = start_relay(rd.path()).await?;
    assert_eq!(relay.fingerprint(), fingerprint);
    let a = team_phone(a_dir, "amira", &relay, &["team-1"], &[], ALL_DAYS)?;
    let report = a.sync().await?;
    assert_eq!(report.docs_resynced, 1, "{report:?}");
    assert_eq!(
        relay.heads(&DocId::ledger(&t, &day)).await?,
        a.heads(&DocId::ledger(&t, &day))?
    );

    let b = team_phone(bd.path(), "bao", &relay, &["team-1"], &[], ALL_DAYS)?;
    b.sync().await?;
    let view = b.ledger(&t, &day)?.expect("b got the day");
    let titles: Vec<&str> = view.tasks.iter().map(|t| t.title.as_str()).collect();
    assert_eq!(titles, ["before the backup", "after the backup"]);
    assert_eq!(view.tallies.get("samples_taken"), Some(&4));
    relay.shutdown().await?;
    Ok(())
}

/// Reads one message from an upload stream (`None` when it ended or stayed silent).
async fn upload_answer(
    recv: &mut quinn::RecvStream,
    decoder: &mut redline_proto::codec::FrameDecoder,
) -> anyhow::Result<Option<redline_proto::Message>> {
    loop {
        if let Some(m) = decoder.next_message()? {
            return Ok(Some(m));
        }
        match tokio::time::timeout(Duration::from_secs(5), recv.read_chunk(64 * 1024, true)).await {
            Ok(Ok(Some(chunk))) => decoder.push(&chunk.bytes),
            _ => return Ok(None),
        }
    }
}

/// A device of team-1 with a token, and a push of one 6 KB change (incompressible, so
/// it goes up in several 1 KB pieces) as an upload.
struct PhotoUpload {
    device: redline_proto::DeviceId,
    token: String,
    subscription: redline_proto::message::Subscription,
    id: DocId,
    head: automerge::ChangeHash,
    upload: redline_proto::message::Upload,
    bytes: Vec<u8>,
}

impl PhotoUpload {
    fn new(
        relay: &redline_server::RelayHandle,
        phone_dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let device = redline_tests::device_for(phone_dir);
        let token = redline_tests::token_for(
            relay.data_dir(),
            phone_dir,
            "amira",
            redline_proto::token::Role::Volunteer,
            &["team-1"],
            &[],
        )?;
        let id = DocId::ledger(&team("team-1"), &redline_tests::today());
        let mut doc = redline_proto::genesis::genesis(&id).with_actor(ActorId::random());
        let mut tx = doc.transaction();
        let noise: Vec<u8> = {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            (0..6 * 1024).map(|_| rng.random::<u8>()).collect()
        };
        tx.put(ROOT, "notes", automerge::ScalarValue::Bytes(noise))?;
        tx.commit_with(
            automerge::transaction::CommitOptions::default()
                .with_message(format!("amira@{device}")),
        );
        let head = doc.get_heads()[0];
        let all: Vec<_> = doc.get_changes(&[]).iter().map(|c| c.hash()).collect();
        let bytes = doc.bundle(all)?.bytes().to_vec();
        let upload = redline_proto::message::Upload {
            id: redline_proto::wire::transfer_id(&bytes),
            doc: id.clone(),
            len: bytes.len() as u64,
            document: false,
            heads: vec![head.0],
        };
        let subscription = redline_proto::message::Subscription {
            teams: vec![team("team-1")],
            ..Default::default()
        };
        Ok(Self {
            device,
            token,
            subscription,
            id,
            head,
            upload,
            bytes,
        })
    }

    /// Says hello on `raw` as the device (with the connection's attempt number, if
    /// any) and checks the welcome.
    async fn hello(
        &self,
        raw: &mut redline_tests::RawDevice,
        attempt: Option<u64>,
    ) -> anyhow::Result<()> {
        use redline_proto::codec;
        let hello = redline_proto::Message::Hello(redline_proto::message::Hello {
            protocol_version: redline_proto::PROTOCOL_VERSION,
            device: self.device.clone(),
            app_version: "raw-test".into(),
            subscription: self.subscription.clone(),
            token: self.token.clone(),
        });
        let mut ext = codec::Extensions::new();
        if let Some(n) = attempt {
            ext.insert(redline_proto::message::ext::HELLO_ATTEMPT, &n)?;
        }
        let frame = codec::encode_frame_with(
            &hello,
            &ext,
            redline_proto::PROTOCOL_VERSION,
            codec::DEFAULT_MAX_FRAME,
        )?;
        raw.send_bytes(&frame).await?;
        let welcome = raw.next(Duration::from_secs(5)).await?;
        anyhow::ensure!(
            matches!(welcome, Some(redline_proto::Message::Welcome(_))),
            "{welcome:?}"
        );
        Ok(())
    }

    /// Opens an upload stream on `raw` and names the upload: the stream and the relay's
    /// first answer.
    async fn open(&self, raw: &redline_tests::RawDevice) -> anyhow::Result<UploadStream> {
        let (send, recv) = raw.conn.open_bi().await?;
        let mut stream = UploadStream {
            send,
            recv,
            decoder: redline_proto::codec::FrameDecoder::new(1 << 20),
        };
        stream
            .send(&redline_proto::Message::Upload(self.upload.clone()))
            .await?;
        Ok(stream)
    }

    /// Bytes `from..to` as a piece.
    fn piece(&self, from: usize, to: usize) -> redline_proto::Message {
        redline_proto::Message::Piece(redline_proto::message::Piece {
            id: self.upload.id,
            offset: from as u64,
            data: self.bytes[from..to.min(self.bytes.len())].to_vec(),
        })
    }

    /// Sends the pieces from `at` on `stream`, 1 KB each, checking every answer, to the
    /// push's `Ack`.
    async fn finish(&self, stream: &mut UploadStream, mut at: usize) -> anyhow::Result<()> {
        use redline_proto::Message;
        while at < self.bytes.len() {
            stream.send(&self.piece(at, at + 1024)).await?;
            at = (at + 1024).min(self.bytes.len());
            match stream.answer().await? {
                Some(Message::UploadOffset(o)) => assert_eq!(o.have, at as u64),
                Some(Message::Ack(_)) if at == self.bytes.len() => return Ok(()),
                other => panic!("at {at}: {other:?}"),
            }
        }
        let last = stream.answer().await?;
        assert!(matches!(last, Some(Message::Ack(_)) | None), "{last:?}");
        Ok(())
    }
}

/// One upload stream of a raw device.
struct UploadStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: redline_proto::codec::FrameDecoder,
}

impl UploadStream {
    async fn send(&mut self, m: &redline_proto::Message) -> anyhow::Result<()> {
        let frame = redline_proto::codec::encode_frame(m, 1 << 20)?;
        self.send.write_all(&frame).await?;
        Ok(())
    }

    /// The relay's next message on the stream (`None` when it ended or stayed silent).
    async fn answer(&mut self) -> anyhow::Result<Option<redline_proto::Message>> {
        upload_answer(&mut self.recv, &mut self.decoder).await
    }

    /// The next answer is `UploadOffset` with `have` bytes held.
    async fn expect_offset(&mut self, have: u64) -> anyhow::Result<()> {
        let got = self.answer().await?;
        anyhow::ensure!(
            matches!(&got, Some(redline_proto::Message::UploadOffset(o)) if o.have == have),
            "expected offset {have}, got {got:?}"
        );
        Ok(())
    }

    /// The next answer is a `bad_transfer` error saying `why`.
    async fn expect_refusal(&mut self, why: &str) -> anyhow::Result<()> {
        let got = self.answer().await?;
        anyhow::ensure!(
            matches!(&got, Some(redline_proto::Message::Error(e)) if e.code == redline_proto::ErrorCode::BAD_TRANSFER && e.text.contains(why)),
            "expected bad_transfer ({why}), got {got:?}"
        );
        Ok(())
    }
}

#[tokio::test]
async fn an_upload_resumed_on_a_new_connection_takes_over_from_the_stream_of_the_cut_one()
-> anyhow::Result<()> {
    let (rd, pd) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let relay = start_relay(rd.path()).await?;
    let photo = PhotoUpload::new(&relay, pd.path())?;

    // The first connection stages 1 KB, then goes quiet (its phone lost the network).
    let mut first = redline_tests::RawDevice::connect(&relay).await?;
    photo.hello(&mut first, None).await?;
    let mut s1 = photo.open(&first).await?;
    s1.expect_offset(0).await?;
    s1.send(&photo.piece(0, 1024)).await?;
    s1.expect_offset(1024).await?;

    // The phone reconnects and resumes from what the relay holds.
    let mut second = redline_tests::RawDevice::connect(&relay).await?;
    photo.hello(&mut second, None).await?;
    let mut s2 = photo.open(&second).await?;
    s2.expect_offset(1024).await?;

    // The old stream wakes up and sends its next piece: it no longer owns the upload,
    // and writing it would shift the offset under the new stream.
    s1.send(&photo.piece(1024, 2048)).await?;
    s1.expect_refusal("newer connection").await?;

    // The new stream finishes the upload and gets the push's answer.
    photo.finish(&mut s2, 1024).await?;
    assert!(relay.heads(&photo.id).await?.contains(&photo.head));
    relay.shutdown().await?;
    Ok(())
}

/// Two relays on one PostgreSQL database (data dirs sharing certificate and token key,
/// as an operator deploys them). A phone stages part of an upload through the first,
/// loses it, and resumes through the second from the offset the first stored. A late
/// piece of the old stream reaches the first relay after that and stores the same
/// bytes the phone then sends on the new stream (the upload's id is their hash): the
/// second relay finds them held and answers as if it stored them, so the phone never
/// sees the race, finishes on the new stream, and the change is seen through both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_resumes_through_another_relay_on_the_same_database() -> anyhow::Result<()> {
    let Some(pg) = redline_tests::postgres::TestPostgres::start_or_skip(
        "an_upload_resumes_through_another_relay_on_the_same_database",
    ) else {
        return Ok(());
    };
    let url = pg.fresh_database()?;
    let on_postgres = |dir: &std::path::Path| {
        let mut config = redline_tests::test_config(dir);
        config.storage = redline_server::config::StorageChoice::Postgres(
            redline_server::storage::PgOptions::new(url.clone()),
        );
        config
    };
    let (da, db, pd) = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    let a = start_relay_with(on_postgres(da.path())).await?;
    // The token key exists once a token was issued; the second relay gets a copy.
    let photo = PhotoUpload::new(&a, pd.path())?;
    copy_dir(da.path(), db.path())?;
    let b = start_relay_with(on_postgres(db.path())).await?;

    // 1 KB staged through the first relay, then its connection goes quiet.
    let mut first = redline_tests::RawDevice::connect(&a).await?;
    photo.hello(&mut first, None).await?;
    let mut s1 = photo.open(&first).await?;
    s1.expect_offset(0).await?;
    s1.send(&photo.piece(0, 1024)).await?;
    s1.expect_offset(1024).await?;

    // The phone fails over: the second relay resumes from what the first stored.
    let mut second = redline_tests::RawDevice::connect(&b).await?;
    photo.hello(&mut second, None).await?;
    let mut s2 = photo.open(&second).await?;
    s2.expect_offset(1024).await?;

    // The old stream's next piece reaches the first relay late, then the new stream
    // sends the same piece: the second relay finds those bytes held already.
    s1.send(&photo.piece(1024, 2048)).await?;
    s1.expect_offset(2048).await?;
    s2.send(&photo.piece(1024, 2048)).await?;
    s2.expect_offset(2048).await?;

    // The phone finishes on the new stream.
    photo.finish(&mut s2, 2048).await?;
    assert!(b.heads(&photo.id).await?.contains(&photo.head));
    // The first relay serves the committed change too (the shared feed).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.heads(&photo.id).await?.contains(&photo.head) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the first relay never saw the commit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.shutdown().await?;
    b.shutdown().await?;
    Ok(())
}

/// A phone replaced a connection whose hello went unanswered; the old connection's
/// hello and upload, resent late, reach the relay after the new connection's (the
/// simulation's seed 1697). The late stream must not take the upload from the stream
/// the phone is using: the relay orders a device's connections by the phone's attempt
/// numbers when it says them, else by the order it accepted the connections in.
#[tokio::test]
async fn a_late_stream_of_a_replaced_connection_does_not_take_the_upload_over() -> anyhow::Result<()>
{
    let (rd, pd) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let relay = start_relay(rd.path()).await?;
    let photo = PhotoUpload::new(&relay, pd.path())?;

    // Phones that do not number their connections (version 1 apps): the relay accepted
    // the replaced connection first.
    let mut replaced = redline_tests::RawDevice::connect(&relay).await?;
    let mut current = redline_tests::RawDevice::connect(&relay).await?;
    // Phones that number them: the numbers decide, whatever the relay's order.
    let mut numbered_current = redline_tests::RawDevice::connect(&relay).await?;
    let mut numbered_replaced = redline_tests::RawDevice::connect(&relay).await?;

    photo.hello(&mut current, None).await?;
    let mut s = photo.open(&current).await?;
    s.expect_offset(0).await?;
    s.send(&photo.piece(0, 1024)).await?;
    s.expect_offset(1024).await?;
    // The replaced connection's hello and stream arrive now.
    photo.hello(&mut replaced, None).await?;
    let mut late = photo.open(&replaced).await?;
    late.expect_refusal("later connection").await?;

    // The current stream goes on from where it was, untouched, until a numbered
    // connection (a later one, by its number) takes the upload over.
    s.send(&photo.piece(1024, 2048)).await?;
    s.expect_offset(2048).await?;
    photo.hello(&mut numbered_current, Some(2_000)).await?;
    let mut n = photo.open(&numbered_current).await?;
    n.expect_offset(2048).await?;
    // Accepted by the relay after it, but numbered lower by the phone: stale.
    photo.hello(&mut numbered_replaced, Some(1_000)).await?;
    let mut late = photo.open(&numbered_replaced).await?;
    late.expect_refusal("later connection").await?;

    photo.finish(&mut n, 2048).await?;
    assert!(relay.heads(&photo.id).await?.contains(&photo.head));
    relay.shutdown().await?;
    Ok(())
}
