//! One contract for every device store: sled on phones, memory in the simulation.

use automerge::ChangeHash;
use redline_proto::DocId;

use super::{DeviceStore, DocWrite, MemoryStore, SledStore, Stored, SyncBatch};

fn doc(s: &str) -> DocId {
    DocId::parse(s).unwrap()
}

/// Runs every check on stores `fresh` makes; `restart` brings a store back after its
/// process died (only flushed writes must be there).
fn contract<S: DeviceStore>(mut fresh: impl FnMut() -> S, mut restart: impl FnMut(S) -> S) {
    let a = doc("ledger/t1/2026-11-29");
    let b = doc("households/z1");

    // Documents, acknowledgements and the cursor, written as one batch.
    let s = fresh();
    assert!(s.doc_ids().unwrap().is_empty());
    assert_eq!(s.load_doc(&a).unwrap(), None);
    s.save_doc(&a, b"one").unwrap();
    s.write_batch(&SyncBatch {
        docs: vec![
            (b.clone(), DocWrite::Snapshot(b"two".to_vec())),
            (a.clone(), DocWrite::Snapshot(b"one'".to_vec())),
        ],
        acked: vec![(a.clone(), vec![ChangeHash([7; 32])])],
        cursor: Some(("cursor:relay".into(), b"c".to_vec())),
        acked_at_ms: 42,
    })
    .unwrap();
    s.follow(&b).unwrap();
    s.put_meta("device_id", b"phone-1").unwrap();
    let s = restart(s);
    assert_eq!(s.doc_ids().unwrap(), vec![b.clone(), a.clone()]);
    assert_eq!(s.load_doc(&a).unwrap().as_deref(), Some(&b"one'"[..]));
    assert_eq!(s.acked_heads(&a).unwrap(), Some(vec![ChangeHash([7; 32])]));
    assert_eq!(s.acked_heads(&b).unwrap(), None);
    assert_eq!(s.acked_at(&a).unwrap(), Some(42));
    assert_eq!(s.meta("cursor:relay").unwrap().as_deref(), Some(&b"c"[..]));
    assert_eq!(
        s.follows().unwrap(),
        vec![b.clone()],
        "flushed by the write after"
    );
    assert_eq!(
        s.meta("device_id").unwrap().as_deref(),
        Some(&b"phone-1"[..])
    );

    // Chunks follow the snapshot in order, by themselves and in a batch; a snapshot
    // drops them.
    let st = s.append_doc(&a, b"+1").unwrap();
    assert_eq!((st.snapshot_bytes, st.chunks, st.chunk_bytes), (4, 1, 2));
    s.write_batch(&SyncBatch {
        docs: vec![(a.clone(), DocWrite::Append(b"+22".to_vec()))],
        ..Default::default()
    })
    .unwrap();
    let s = restart(s);
    assert_eq!(s.load_doc(&a).unwrap().as_deref(), Some(&b"one'+1+22"[..]));
    assert_eq!(s.stored(&a).unwrap().chunks, 2);
    assert_eq!(s.doc_ids().unwrap(), vec![b.clone(), a.clone()]);
    s.save_doc(&a, b"one'+1+22").unwrap();
    let s = restart(s);
    assert_eq!(s.stored(&a).unwrap().chunks, 0);
    assert_eq!(s.load_doc(&a).unwrap().as_deref(), Some(&b"one'+1+22"[..]));
    s.append_doc(&b, b"!").unwrap();

    // Removing a document removes its chunks and sync state with it.
    s.remove_doc(&b).unwrap();
    let s = restart(s);
    assert_eq!(s.doc_ids().unwrap(), vec![a.clone()]);
    assert!(s.follows().unwrap().is_empty());
    assert_eq!(s.stored(&b).unwrap(), Stored::default());
    assert_eq!(s.load_doc(&b).unwrap(), None);

    // Transfers: pieces in order, late duplicates skipped, gaps refused.
    let s = fresh();
    let t = [3u8; 16];
    s.put_transfer_piece(&t, 0, b"hello ").unwrap();
    s.put_transfer_piece(&t, 3, b"lo wor").unwrap();
    assert!(
        s.put_transfer_piece(&t, 20, b"x").is_err(),
        "a gap is refused"
    );
    assert_eq!(s.transfer_bytes(&t).unwrap(), b"hello wor");
    s.put_transfer_piece(&[1; 16], 0, b"ab").unwrap();
    let s = restart(s);
    assert_eq!(s.partial_transfers().unwrap(), vec![([1; 16], 2), (t, 9)]);
    s.drop_transfer(&t).unwrap();
    assert_eq!(s.transfer_len(&t).unwrap(), 0);
    assert!(s.transfer_bytes(&t).unwrap().is_empty());
}

/// Opens again what was just dropped: sled lets go of its lock file once its own
/// background flush finishes, a moment after the handle is dropped.
fn reopen<S, E: std::fmt::Debug>(open: impl Fn() -> Result<S, E>) -> S {
    for _ in 0..200 {
        match open() {
            Ok(s) => return s,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    open().expect("the store opens again once its last handle is gone")
}

#[test]
fn sled_keeps_the_device_store_contract() {
    let mut dirs = Vec::new();
    contract(
        || {
            let dir = tempfile::tempdir().unwrap();
            let s = SledStore::open(dir.path()).unwrap();
            dirs.push(dir);
            s
        },
        |s| {
            let path = s.path();
            drop(s);
            reopen(|| SledStore::open(&path))
        },
    );
}

#[test]
fn memory_keeps_the_device_store_contract() {
    contract(MemoryStore::new, |s| {
        s.crash();
        s
    });
}

#[test]
fn memory_forgets_what_was_not_flushed() {
    let s = MemoryStore::new();
    let a = doc("households/z1");
    s.save_doc(&a, b"kept").unwrap();
    s.follow(&a).unwrap();
    s.crash();
    assert_eq!(s.load_doc(&a).unwrap().as_deref(), Some(&b"kept"[..]));
    assert!(s.follows().unwrap().is_empty(), "never flushed");
}
