//! The relay's merge path: `Hub::push` of many changes in one batch (one dependency
//! check, one `apply_changes`, one chunk, one flush) against the same changes pushed one
//! at a time, and the batch pushed with the bundle a phone sends (`push_as_sent`: the
//! chunk stored is those bytes, no bundle encoded). Real sled on disk.

use std::sync::Arc;

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, Change, ObjType, ROOT};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redline_proto::DocId;
use redline_server::hub::Hub;
use redline_server::storage::SledStorage;

/// `n` changes, each adding a task map to a ledger-like document, and the bundle a
/// phone would push them in.
fn changes(n: usize) -> (Vec<Change>, Vec<u8>) {
    let mut doc = Automerge::new().with_actor(ActorId::from([1u8; 16]));
    let mut tx = doc.transaction();
    tx.put_object(ROOT, "tasks", ObjType::Map).unwrap();
    tx.commit();
    for i in 0..n {
        let mut tx = doc.transaction();
        let (_, tasks) = automerge::ReadDoc::get(&tx, ROOT, "tasks")
            .unwrap()
            .unwrap();
        let t = tx
            .put_object(&tasks, format!("task-{i}"), ObjType::Map)
            .unwrap();
        tx.put(&t, "title", format!("Sample block {i}")).unwrap();
        tx.put(&t, "status", "open").unwrap();
        tx.commit();
    }
    let all = doc.get_changes(&[]);
    let bundle = doc
        .bundle(all.iter().map(|c| c.hash()))
        .unwrap()
        .bytes()
        .to_vec();
    (all, bundle)
}

fn batch_apply(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hub = rt.block_on(async {
        let storage = SledStorage::open(dir.path()).unwrap();
        Hub::new(Arc::new(storage), 256 * 1024 * 1024).unwrap()
    });
    let device = redline_server::authorship::Author {
        device: redline_proto::DeviceId::new("bench-phone").unwrap(),
        member: redline_proto::MemberId::new("bench").unwrap(),
        role: redline_proto::token::Role::Volunteer,
    };
    let mut group = c.benchmark_group("relay_push");
    group.sample_size(10);
    for n in [100usize, 1000] {
        let (all, bundle) = changes(n);
        group.throughput(Throughput::Elements(all.len() as u64));
        let mut doc_no = 0u64;
        group.bench_with_input(BenchmarkId::new("one_batch", n), &all, |b, all| {
            b.iter(|| {
                doc_no += 1;
                let id = DocId::parse(&format!("households/batch-{n}-{doc_no}")).unwrap();
                rt.block_on(hub.push(&id, &device, all.clone())).unwrap()
            })
        });
        group.bench_with_input(BenchmarkId::new("one_batch_as_sent", n), &all, |b, all| {
            b.iter(|| {
                doc_no += 1;
                let id = DocId::parse(&format!("households/sent-{n}-{doc_no}")).unwrap();
                rt.block_on(hub.push_as_sent(&id, &device, all.clone(), bundle.clone()))
                    .unwrap()
            })
        });
        group.bench_with_input(BenchmarkId::new("one_at_a_time", n), &all, |b, all| {
            b.iter(|| {
                doc_no += 1;
                let id = DocId::parse(&format!("households/single-{n}-{doc_no}")).unwrap();
                for ch in all {
                    rt.block_on(hub.push(&id, &device, vec![ch.clone()]))
                        .unwrap();
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, batch_apply);
criterion_main!(benches);
