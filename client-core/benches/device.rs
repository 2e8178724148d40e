//! The phone's hot paths, on a real sled store: a local write into a day that already
//! holds 5,000 changes, and applying a 200-change update from the relay (decode, one
//! `apply_changes`, store, flush). `cargo bench -p redline-client --bench device`.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use redline_client::{Client, ClientConfig, NewTask, TaskKind, TaskStatus};
use redline_proto::{Day, DocId, MemberId, TeamId};

fn phone(dir: &std::path::Path, member: &str) -> Client {
    Client::open(dir, ClientConfig::new(MemberId::new(member).unwrap())).unwrap()
}

/// A phone whose day holds `n` changes of its own (tally increments).
fn busy_day(dir: &std::path::Path, n: usize) -> (Client, TeamId, Day) {
    let c = phone(dir, "ana");
    let (team, day) = (
        TeamId::new("team-1").unwrap(),
        Day::new("2026-12-01").unwrap(),
    );
    for i in 0..n {
        c.add_to_tally(&team, &day, ["samples_taken", "deliveries"][i % 2], 1)
            .unwrap();
    }
    (c, team, day)
}

fn device(c: &mut Criterion) {
    let mut group = c.benchmark_group("device");
    group.sample_size(20);

    let dir = tempfile::tempdir().unwrap();
    let (ana, team, day) = busy_day(dir.path(), 5_000);
    group.bench_function("write_into_5000_change_day", |b| {
        b.iter(|| ana.add_to_tally(&team, &day, "samples_taken", 1).unwrap())
    });

    // A day of mixed work: tasks opened and closed, check-ins, twenty tallies.
    let mixed_dir = tempfile::tempdir().unwrap();
    let mixed = phone(mixed_dir.path(), "cai");
    let mut tasks = Vec::new();
    for i in 0..5_000 {
        match i % 4 {
            0 => tasks.push(
                mixed
                    .add_task(
                        &team,
                        &day,
                        NewTask::new(TaskKind::Screening, format!("block {i}")),
                    )
                    .unwrap(),
            ),
            1 => mixed
                .set_task_status(&team, &day, &tasks[tasks.len() - 1], TaskStatus::InProgress)
                .unwrap(),
            2 => mixed
                .add_to_tally(&team, &day, &format!("metric_{}", i % 20), 1)
                .unwrap(),
            _ => mixed.check_in(&team, &day).unwrap(),
        }
    }
    let mut n = 0;
    group.bench_function("write_task_into_5000_change_mixed_day", |b| {
        b.iter(|| {
            n += 1;
            mixed
                .add_task(
                    &team,
                    &day,
                    NewTask::new(TaskKind::Supply, format!("run {n}")),
                )
                .unwrap()
        })
    });

    // What a lead's totals screen reads on every change of such days: read again
    // unchanged, and read after each write (kept totals move by the write's patches).
    group.bench_function("day_totals_of_5000_increment_day", |b| {
        b.iter(|| ana.day_totals(&team, &day).unwrap())
    });
    group.bench_function("write_then_day_totals_on_5000_increment_day", |b| {
        b.iter(|| {
            ana.add_to_tally(&team, &day, "samples_taken", 1).unwrap();
            ana.day_totals(&team, &day).unwrap()
        })
    });
    group.bench_function("day_totals_of_5000_change_mixed_day", |b| {
        b.iter(|| mixed.day_totals(&team, &day).unwrap())
    });

    // A teammate's 200 changes on the same day, as the relay would bundle them.
    let base_dir = tempfile::tempdir().unwrap();
    let (base, _, _) = busy_day(base_dir.path(), 50);
    let id = DocId::ledger(&team, &day);
    let base_doc = base.document(&id).unwrap().unwrap();
    let mate_dir = tempfile::tempdir().unwrap();
    let mate = phone(mate_dir.path(), "ben");
    mate.import(&id, &base_doc.save()).unwrap();
    let before = mate.heads(&id).unwrap();
    for _ in 0..200 {
        mate.add_to_tally(&team, &day, "deliveries", 1).unwrap();
    }
    let mate_doc = mate.document(&id).unwrap().unwrap();
    let hashes: Vec<_> = mate_doc
        .get_changes(&before)
        .iter()
        .map(|c| c.hash())
        .collect();
    assert_eq!(hashes.len(), 200);
    let update = mate_doc.bundle(hashes).unwrap().bytes().to_vec();
    let saved_base = base_doc.save();
    group.bench_function("apply_200_change_update", |b| {
        b.iter_batched(
            || {
                let d = tempfile::tempdir().unwrap();
                let c = phone(d.path(), "cai");
                c.import(&id, &saved_base).unwrap();
                (d, c)
            },
            |(d, c)| {
                assert_eq!(c.import(&id, &update).unwrap(), 200);
                (d, c)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
    catch_up(c);
}

/// A phone back from a day offline in a team of 16: it lacks 15 teammates' 300
/// changes each of one day. Applying them as one bundle (today's catch-up) against
/// loading the relay's whole document and merging the phone's own copy into it.
fn catch_up(c: &mut Criterion) {
    let (team, day) = (
        TeamId::new("team-1").unwrap(),
        Day::new("2026-12-01").unwrap(),
    );
    let id = DocId::ledger(&team, &day);
    let dirs: Vec<_> = (0..16).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut docs = Vec::new();
    for (m, dir) in dirs.iter().enumerate() {
        let p = phone(dir.path(), &format!("m{m}"));
        let mut task = None;
        for i in 0..300 {
            match i % 4 {
                0 => {
                    task = Some(
                        p.add_task(&team, &day, NewTask::new(TaskKind::Screening, "block"))
                            .unwrap(),
                    )
                }
                1 => p
                    .set_task_status(&team, &day, task.as_ref().unwrap(), TaskStatus::Done)
                    .unwrap(),
                2 => p
                    .add_to_tally(&team, &day, &format!("metric_{}", i % 20), 1)
                    .unwrap(),
                _ => p.check_in(&team, &day).unwrap(),
            }
        }
        docs.push(p.document(&id).unwrap().unwrap());
    }
    let mut relay = docs[0].clone();
    for d in docs.iter_mut().skip(1) {
        relay.merge(d).unwrap();
    }
    let own = docs[0].clone();
    let lacked: Vec<_> = relay
        .get_changes_meta(&own.get_heads())
        .iter()
        .map(|m| m.hash)
        .collect();
    let bundle = relay.bundle(lacked.clone()).unwrap().bytes().to_vec();
    let whole = relay.save();
    eprintln!(
        "catch-up of {} changes: bundle {} bytes, whole document {} bytes",
        lacked.len(),
        bundle.len(),
        whole.len()
    );
    let mut group = c.benchmark_group("catch_up");
    group.sample_size(10);
    group.bench_function("apply_bundle_of_4500_changes", |b| {
        b.iter_batched(
            || own.clone(),
            |mut d| {
                d.load_incremental(&bundle).unwrap();
                assert_eq!(d.get_heads(), relay.get_heads());
                d
            },
            BatchSize::PerIteration,
        )
    });
    // The same changes arriving in pieces (a storm delivers teammates' pushes as they
    // commit): what a piece costs beyond its changes.
    for piece in [300, 50] {
        let pieces: Vec<Vec<u8>> = lacked
            .chunks(piece)
            .map(|c| relay.bundle(c.to_vec()).unwrap().bytes().to_vec())
            .collect();
        group.bench_function(format!("apply_4500_changes_in_pieces_of_{piece}"), |b| {
            b.iter_batched(
                || own.clone(),
                |mut d| {
                    for p in &pieces {
                        d.load_incremental(p).unwrap();
                    }
                    assert_eq!(d.get_heads(), relay.get_heads());
                    d
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.bench_function("load_whole_document_and_merge_own", |b| {
        b.iter_batched(
            || own.clone(),
            |mut d| {
                let mut loaded = automerge::Automerge::load(&whole).unwrap();
                loaded.merge(&mut d).unwrap();
                assert_eq!(loaded.get_heads(), relay.get_heads());
                loaded
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, device);
criterion_main!(benches);
