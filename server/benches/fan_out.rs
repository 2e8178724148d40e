//! Live fan-out: one commit lands in a team's day and its 16 phones catch up on it
//! (`Hub::missing` over the commit-log window, as the connection does), for apps that
//! read stored chunks and for older ones. Real sled.
//! `cargo bench -p redline-server --bench fan_out`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ObjType, ROOT, ReadDoc};
use criterion::{Criterion, criterion_group, criterion_main};
use redline_proto::DocId;
use redline_server::authorship::Author;
use redline_server::hub::{Hub, Window};
use redline_server::storage::SledStorage;

fn author(i: usize) -> Author {
    Author {
        device: redline_proto::DeviceId::new(format!("phone-{i}")).unwrap(),
        member: redline_proto::MemberId::new(format!("m{i}")).unwrap(),
        role: redline_proto::token::Role::Volunteer,
    }
}

fn fan_out(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hub = rt.block_on(async {
        Hub::new(
            Arc::new(SledStorage::open(dir.path()).unwrap()),
            256 * 1024 * 1024,
        )
        .unwrap()
    });
    let id = DocId::parse("households/zone-1").unwrap();
    // A day with some history: 1,000 changes by the first phone.
    let mut doc = Automerge::new().with_actor(ActorId::from([1u8; 16]));
    let mut tx = doc.transaction();
    tx.put_object(ROOT, "notes", ObjType::Map).unwrap();
    tx.commit();
    for i in 0..1_000 {
        let mut tx = doc.transaction();
        let (_, notes) = tx.get(ROOT, "notes").unwrap().unwrap();
        tx.put(&notes, format!("n{i}"), i as i64).unwrap();
        tx.commit();
    }
    rt.block_on(hub.push(&id, &author(0), doc.get_changes(&[])))
        .unwrap();
    let none = HashSet::new();
    let mut group = c.benchmark_group("relay_fan_out");
    group.sample_size(20);
    // Devices that read stored chunks get the commit's chunk as stored; older apps get
    // a bundle made for them.
    for (name, chunks) in [
        ("one_commit_to_16_devices", false),
        ("one_commit_to_16_devices_stored_chunks", true),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    // One phone writes (not timed)...
                    let before = hub.last_seq();
                    let heads = doc.get_heads();
                    let mut tx = doc.transaction();
                    let (_, notes) = tx.get(ROOT, "notes").unwrap().unwrap();
                    tx.put(&notes, "latest", before as i64).unwrap();
                    tx.commit();
                    let new = doc.get_changes(&heads);
                    rt.block_on(hub.push(&id, &author(0), new)).unwrap();
                    let upto = hub.last_seq();
                    // ...and its 16 teammates catch up on it (timed).
                    let t = Instant::now();
                    for _ in 0..16 {
                        let w = Window {
                            after: before,
                            upto,
                            own: &none,
                            chunks,
                        };
                        let got = rt.block_on(hub.missing(&id, &heads, Some(w))).unwrap();
                        assert!(!got.is_empty());
                    }
                    spent += t.elapsed();
                }
                spent
            })
        });
    }
    group.finish();
}

criterion_group!(benches, fan_out);
criterion_main!(benches);
