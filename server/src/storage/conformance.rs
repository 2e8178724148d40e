//! The contract every relay storage backend keeps, as one suite of checks.
//!
//! A backend's tests implement [`Harness`] (how to make an empty store and how to bring
//! one back after its process died) and call [`run`]. sled and memory run it in this
//! crate's unit tests; the test crate runs it on the fault-injecting wrapper, and every
//! later backend runs it too.

use std::panic::{AssertUnwindSafe, catch_unwind};

use redline_proto::{DeviceId, DocId};

use super::{ActorBindings, DeviceRecords, Documents, QuarantineStore, RelayStorage, Uploads};

/// How the suite gets stores of one backend.
pub trait Harness {
    /// The backend under test.
    type Store: RelayStorage;
    /// A new, empty store.
    fn fresh(&mut self) -> Self::Store;
    /// The same store after its process died: only what a flush covered must be back.
    fn restart(&mut self, store: Self::Store) -> Self::Store;
}

/// Opens again what was just dropped: sled lets go of its lock file once its own
/// background flush finishes, a moment after the handle is dropped.
pub fn reopen<S, E: std::fmt::Debug>(open: impl Fn() -> Result<S, E>) -> S {
    for _ in 0..200 {
        match open() {
            Ok(s) => return s,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    open().expect("the store opens again once its last handle is gone")
}

/// A check of the suite.
type Check<H> = fn(&mut H);

/// Runs every check; panics naming each one that failed.
pub fn run<H: Harness>(h: &mut H) {
    let checks: Vec<(&str, Check<H>)> = vec![
        ("an empty store", empty_store::<H>),
        (
            "flushed commits survive a restart",
            flushed_commits_survive::<H>,
        ),
        ("the feed and heads answer by sequence", feed_and_heads::<H>),
        ("compaction replaces the chunks", compaction::<H>),
        ("listing is one entry per document", listing::<H>),
        ("uploads accumulate and refuse gaps", uploads_in_order::<H>),
        ("abandoned uploads expire", uploads_expire::<H>),
        ("an actor binds to its first device", actor_binding::<H>),
        ("one device wins a binding race", binding_race::<H>),
        ("device records replace each other", device_records::<H>),
        ("quarantine holds, visits and drops", quarantine::<H>),
        (
            "a restart loses no flushed write of any kind",
            every_kind_survives::<H>,
        ),
        (
            "unflushed commits vanish whole or stay whole",
            torn_commits::<H>,
        ),
        (
            "a batch's commits may arrive out of sequence order",
            commits_out_of_order::<H>,
        ),
        (
            "shared feed: appends take consecutive sequences",
            appends_take_the_next_sequence::<H>,
        ),
        (
            "shared feed: a stale append is a conflict and writes nothing",
            stale_appends_conflict::<H>,
        ),
        (
            "shared feed: appends rolled back leave no gap",
            rolled_back_appends_leave_no_gap::<H>,
        ),
        (
            "shared feed: compaction keeps what its snapshot does not cover",
            compaction_covers_up_to_its_sequence::<H>,
        ),
        (
            "shared feed: the committed feed leaves out the open transaction",
            committed_feed_is_flushed_only::<H>,
        ),
        (
            "shared feed: a short window comes with its chunks, as stored",
            committed_feed_brings_short_windows_chunks::<H>,
        ),
        (
            "an asynchronous flush is a flush, and its writes read back meanwhile",
            asynchronous_flush::<H>,
        ),
    ];
    let mut failed = Vec::new();
    for (name, check) in checks {
        if catch_unwind(AssertUnwindSafe(|| check(h))).is_err() {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "storage conformance failed: {failed:?}");
}

fn doc(s: &str) -> DocId {
    DocId::parse(s).expect("test document id")
}

fn device(s: &str) -> DeviceId {
    DeviceId::new(s).expect("test device id")
}

fn empty_store<H: Harness>(h: &mut H) {
    let s = h.fresh();
    assert_eq!(s.last_seq().unwrap(), 0);
    assert!(s.list().unwrap().is_empty());
    assert!(s.feed(0, 10).unwrap().is_empty());
    let a = doc("ledger/t1/2026-11-29");
    assert!(s.load(&a).unwrap().is_none());
    assert!(!s.exists(&a).unwrap());
    assert_eq!(s.heads_at(&a, 5).unwrap(), None);
    assert_ne!(
        s.epoch(),
        0,
        "an epoch is never 0 (0 is a device without cursor)"
    );
}

fn flushed_commits_survive<H: Harness>(h: &mut H) {
    let a = doc("ledger/t1/2026-11-29");
    let b = doc("households/z1");
    let s = h.fresh();
    let epoch = s.epoch();
    s.commit(&a, 1, b"c1", &[[1; 32]]).unwrap();
    s.commit(&b, 2, b"x1", &[[2; 32]]).unwrap();
    s.commit(&a, 3, b"c2", &[[3; 32], [4; 32]]).unwrap();
    s.flush().unwrap();
    let s = h.restart(s);
    assert_eq!(s.epoch(), epoch, "the epoch is fixed at creation");
    assert_eq!(s.last_seq().unwrap(), 3);
    assert_eq!(
        s.load(&a).unwrap().unwrap().chunks,
        vec![b"c1".to_vec(), b"c2".to_vec()]
    );
    assert_eq!(s.load(&b).unwrap().unwrap().chunks, vec![b"x1".to_vec()]);
}

fn feed_and_heads<H: Harness>(h: &mut H) {
    let a = doc("ledger/t1/2026-11-29");
    let b = doc("households/z1");
    let s = h.fresh();
    s.commit(&a, 1, b"c1", &[[1; 32]]).unwrap();
    s.commit(&b, 2, b"x1", &[[2; 32]]).unwrap();
    s.commit(&a, 3, b"c2", &[[3; 32], [4; 32]]).unwrap();
    assert_eq!(s.feed(1, 3).unwrap(), vec![(2, b.clone()), (3, a.clone())]);
    assert_eq!(s.feed(0, 1).unwrap(), vec![(1, a.clone())]);
    assert!(s.feed(3, 3).unwrap().is_empty());
    assert!(
        s.feed(3, 1).unwrap().is_empty(),
        "an empty range, not an error"
    );
    assert_eq!(s.heads_at(&a, 1).unwrap(), Some(vec![[1; 32]]));
    assert_eq!(s.heads_at(&a, 2).unwrap(), Some(vec![[1; 32]]));
    assert_eq!(s.heads_at(&a, 3).unwrap(), Some(vec![[3; 32], [4; 32]]));
    assert_eq!(
        s.heads_at(&a, u64::MAX).unwrap(),
        Some(vec![[3; 32], [4; 32]])
    );
    assert_eq!(s.heads_at(&b, 1).unwrap(), None, "b did not exist at 1");
    assert_eq!(s.heads_at(&a, 0).unwrap(), None);
}

fn compaction<H: Harness>(h: &mut H) {
    let a = doc("ledger/t1/2026-11-29");
    let s = h.fresh();
    s.commit(&a, 1, b"c1", &[[1; 32]]).unwrap();
    s.commit(&a, 2, b"c2", &[[2; 32]]).unwrap();
    s.compact(&a, b"snapshot", 2).unwrap();
    let stored = s.load(&a).unwrap().unwrap();
    assert_eq!(stored.snapshot.as_deref(), Some(&b"snapshot"[..]));
    assert!(stored.chunks.is_empty());
    s.commit(&a, 3, b"c3", &[[3; 32]]).unwrap();
    s.flush().unwrap();
    let s = h.restart(s);
    let stored = s.load(&a).unwrap().unwrap();
    assert_eq!(stored.snapshot.as_deref(), Some(&b"snapshot"[..]));
    assert_eq!(stored.chunks, vec![b"c3".to_vec()]);
    assert_eq!(
        s.heads_at(&a, 2).unwrap(),
        Some(vec![[2; 32]]),
        "compaction keeps the feed's heads"
    );
    assert!(s.exists(&a).unwrap());
}

fn listing<H: Harness>(h: &mut H) {
    let s = h.fresh();
    let docs: Vec<DocId> = (0..50)
        .map(|i| doc(&format!("households/z{i:02}")))
        .collect();
    let mut seq = 0;
    for d in &docs {
        for _ in 0..5 {
            seq += 1;
            s.commit(d, seq, b"c", &[[1; 32]]).unwrap();
        }
    }
    let day = doc("ledger/t1/2026-11-29");
    seq += 1;
    s.commit(&day, seq, b"c", &[[1; 32]]).unwrap();
    s.compact(&docs[3], b"snap", seq).unwrap();
    s.compact(&day, b"snap", seq).unwrap();
    let mut all = docs.clone();
    all.push(day);
    assert_eq!(s.list().unwrap(), all, "each document once, in order");
    assert!(s.exists(&docs[3]).unwrap() && s.exists(&docs[4]).unwrap());
    assert!(!s.exists(&doc("households/none")).unwrap());
    assert!(
        !s.exists(&doc("households/z0")).unwrap(),
        "a prefix of a stored id is not stored"
    );
}

fn uploads_in_order<H: Harness>(h: &mut H) {
    let s = h.fresh();
    s.put_piece(b"dev|id", 0, b"hello ").unwrap();
    assert!(s.put_piece(b"dev|id", 3, b"x").is_err(), "a gap is refused");
    assert!(
        s.put_piece(b"dev|id", 0, b"x").is_err(),
        "an overlap is refused"
    );
    s.put_piece(b"dev|id", 6, b"world").unwrap();
    assert_eq!(s.upload_len(b"dev|id").unwrap(), 11);
    assert_eq!(s.upload_bytes(b"dev|id").unwrap(), b"hello world");
    assert_eq!(s.upload_len(b"dev|other").unwrap(), 0);
    s.drop_upload(b"dev|id").unwrap();
    assert_eq!(s.upload_len(b"dev|id").unwrap(), 0);
    assert!(s.upload_bytes(b"dev|id").unwrap().is_empty());
}

fn uploads_expire<H: Harness>(h: &mut H) {
    let s = h.fresh();
    s.put_piece(b"a|1", 0, b"12345").unwrap();
    s.touch_upload(b"a|1", 100).unwrap();
    s.put_piece(b"a|2", 0, b"123").unwrap();
    s.touch_upload(b"a|2", 200).unwrap();
    s.put_piece(b"b|1", 0, b"1").unwrap();
    s.touch_upload(b"b|1", 300).unwrap();
    assert_eq!(s.staged_bytes(b"a|").unwrap(), 8);
    assert_eq!(s.expire_uploads(150).unwrap(), 1);
    assert_eq!(s.staged_bytes(b"a|").unwrap(), 3);
    assert_eq!(s.staged_bytes(b"b|").unwrap(), 1);
    assert_eq!(s.upload_len(b"a|1").unwrap(), 0);
    s.touch_upload(b"a|2", 400).unwrap();
    assert_eq!(s.expire_uploads(350).unwrap(), 1, "only b|1 is stale now");
    assert_eq!(s.staged_bytes(b"").unwrap(), 3);
}

fn actor_binding<H: Harness>(h: &mut H) {
    let s = h.fresh();
    let (d1, d2) = (device("phone-1"), device("phone-2"));
    assert_eq!(s.actor_owner(b"actor-a").unwrap(), None);
    assert_eq!(s.bind_actor(b"actor-a", &d1).unwrap(), d1);
    assert_eq!(s.bind_actor(b"actor-a", &d2).unwrap(), d1, "first use wins");
    assert_eq!(s.bind_actor(b"actor-b", &d1).unwrap(), d1);
    assert_eq!(s.actor_owner(b"actor-a").unwrap(), Some(d1.clone()));
    assert_eq!(s.actors_of(&d1).unwrap(), 2);
    assert_eq!(s.actors_of(&d2).unwrap(), 0);
}

fn binding_race<H: Harness>(h: &mut H) {
    let s = h.fresh();
    let winners: Vec<DeviceId> = std::thread::scope(|scope| {
        let racers: Vec<_> = (0..8)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    s.bind_actor(b"contested", &device(&format!("phone-{i}")))
                        .unwrap()
                })
            })
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert!(
        winners.windows(2).all(|w| w[0] == w[1]),
        "every racer sees the same owner: {winners:?}"
    );
    let owners: usize = (0..8)
        .map(|i| s.actors_of(&device(&format!("phone-{i}"))).unwrap())
        .sum();
    assert_eq!(owners, 1, "the actor is bound exactly once");
}

fn device_records<H: Harness>(h: &mut H) {
    let s = h.fresh();
    s.save_device(&device("phone-1"), b"one").unwrap();
    s.save_device(&device("phone-2"), b"two").unwrap();
    s.save_device(&device("phone-1"), b"one again").unwrap();
    let mut all = s.devices().unwrap();
    all.sort();
    assert_eq!(all, vec![b"one again".to_vec(), b"two".to_vec()]);
}

fn quarantine<H: Harness>(h: &mut H) {
    let s = h.fresh();
    s.put_quarantine(b"a|doc|1", b"xx").unwrap();
    s.put_quarantine(b"a|doc|2", b"yyy").unwrap();
    s.put_quarantine(b"b|doc|1", b"z").unwrap();
    assert_eq!(s.held_bytes(b"a|").unwrap(), 5);
    assert_eq!(s.held_bytes(b"b|").unwrap(), 1);
    assert_eq!(
        s.quarantined_with(b"a|").unwrap(),
        vec![
            (b"a|doc|1".to_vec(), b"xx".to_vec()),
            (b"a|doc|2".to_vec(), b"yyy".to_vec())
        ]
    );
    let mut seen = Vec::new();
    s.visit_quarantined(&mut |k, _| {
        seen.push(k.to_vec());
        seen.len() < 2
    })
    .unwrap();
    assert_eq!(
        seen,
        vec![b"a|doc|1".to_vec(), b"a|doc|2".to_vec()],
        "in key order, stopping when told"
    );
    s.drop_quarantine(b"a|doc|1").unwrap();
    assert_eq!(s.held_bytes(b"a|").unwrap(), 3);
    let mut n = 0;
    s.visit_quarantined(&mut |_, _| {
        n += 1;
        true
    })
    .unwrap();
    assert_eq!(n, 2);
}

fn every_kind_survives<H: Harness>(h: &mut H) {
    let a = doc("households/z1");
    let s = h.fresh();
    s.commit(&a, 1, b"c1", &[[1; 32]]).unwrap();
    s.put_piece(b"d|u", 0, b"piece").unwrap();
    s.touch_upload(b"d|u", 7).unwrap();
    s.bind_actor(b"actor", &device("phone-1")).unwrap();
    s.save_device(&device("phone-1"), b"record").unwrap();
    s.put_quarantine(b"d|a|h", b"held").unwrap();
    s.flush().unwrap();
    let s = h.restart(s);
    assert_eq!(s.load(&a).unwrap().unwrap().chunks, vec![b"c1".to_vec()]);
    assert_eq!(s.upload_bytes(b"d|u").unwrap(), b"piece");
    assert_eq!(s.expire_uploads(8).unwrap(), 1, "the touch time survived");
    assert_eq!(s.actor_owner(b"actor").unwrap(), Some(device("phone-1")));
    assert_eq!(s.devices().unwrap(), vec![b"record".to_vec()]);
    assert_eq!(s.held_bytes(b"d|").unwrap(), 4);
}

/// The hub hands out sequences, then the documents' commits race to storage: within
/// one flush, a higher sequence may be written first.
fn commits_out_of_order<H: Harness>(h: &mut H) {
    let a = doc("ledger/t1/2026-11-29");
    let b = doc("households/z1");
    let s = h.fresh();
    s.commit(&b, 2, b"x1", &[[2; 32]]).unwrap();
    s.commit(&a, 1, b"c1", &[[1; 32]]).unwrap();
    s.commit(&a, 3, b"c2", &[[3; 32]]).unwrap();
    s.flush().unwrap();
    let s = h.restart(s);
    assert_eq!(s.last_seq().unwrap(), 3);
    assert_eq!(
        s.feed(0, 3).unwrap(),
        vec![(1, a.clone()), (2, b.clone()), (3, a.clone())]
    );
    assert_eq!(s.heads_at(&a, 2).unwrap(), Some(vec![[1; 32]]));
    assert_eq!(s.heads_at(&b, 3).unwrap(), Some(vec![[2; 32]]));
}

fn appends_take_the_next_sequence<H: Harness>(h: &mut H) {
    let s = h.fresh();
    if !s.shared() {
        return;
    }
    let (a, b) = (doc("ledger/t1/2026-11-29"), doc("households/z1"));
    assert_eq!(s.append(&a, 0, b"c1", &[[1; 32]]).unwrap(), 1);
    assert_eq!(s.append(&b, 0, b"x1", &[[2; 32]]).unwrap(), 2);
    assert_eq!(s.append(&a, 1, b"c2", &[[3; 32]]).unwrap(), 3);
    s.flush().unwrap();
    assert_eq!(s.append(&b, 2, b"x2", &[[4; 32]]).unwrap(), 4);
    s.flush().unwrap();
    let s = h.restart(s);
    assert_eq!(s.last_seq().unwrap(), 4);
    let stored = s.load(&a).unwrap().unwrap();
    assert_eq!(stored.chunks, vec![b"c1".to_vec(), b"c2".to_vec()]);
    assert_eq!(stored.last_seq, 3);
    assert_eq!(s.load(&b).unwrap().unwrap().last_seq, 4);
    assert_eq!(
        s.feed(0, 4).unwrap(),
        vec![
            (1, a.clone()),
            (2, b.clone()),
            (3, a.clone()),
            (4, b.clone())
        ]
    );
    assert_eq!(s.heads_at(&a, 2).unwrap(), Some(vec![[1; 32]]));
}

fn stale_appends_conflict<H: Harness>(h: &mut H) {
    let s = h.fresh();
    if !s.shared() {
        return;
    }
    let a = doc("households/z1");
    assert_eq!(s.append(&a, 0, b"c1", &[[1; 32]]).unwrap(), 1);
    s.flush().unwrap();
    // A relay that loaded the document before commit 1 expects nothing there.
    let stale = s.append(&a, 0, b"late", &[[9; 32]]);
    assert!(matches!(stale, Err(crate::Error::Conflict(_))), "{stale:?}");
    // The refusal touched nothing: the same transaction goes on.
    assert_eq!(s.append(&a, 1, b"c2", &[[2; 32]]).unwrap(), 2);
    s.flush().unwrap();
    let stored = s.load(&a).unwrap().unwrap();
    assert_eq!(stored.chunks, vec![b"c1".to_vec(), b"c2".to_vec()]);
    assert_eq!(s.last_seq().unwrap(), 2);
}

fn rolled_back_appends_leave_no_gap<H: Harness>(h: &mut H) {
    let s = h.fresh();
    if !s.shared() {
        return;
    }
    let a = doc("households/z1");
    assert_eq!(s.append(&a, 0, b"c1", &[[1; 32]]).unwrap(), 1);
    s.flush().unwrap();
    assert_eq!(s.append(&a, 1, b"lost", &[[2; 32]]).unwrap(), 2);
    let s = h.restart(s);
    assert_eq!(s.last_seq().unwrap(), 1, "the unflushed append is gone");
    assert_eq!(
        s.append(&a, 1, b"c2", &[[3; 32]]).unwrap(),
        2,
        "its sequence is taken again: the feed has no gap"
    );
    s.flush().unwrap();
    assert_eq!(s.feed(0, 10).unwrap().len(), 2);
}

fn compaction_covers_up_to_its_sequence<H: Harness>(h: &mut H) {
    let s = h.fresh();
    if !s.shared() {
        return;
    }
    let a = doc("households/z1");
    for (i, c) in [b"c1", b"c2", b"c3"].iter().enumerate() {
        s.append(&a, i as u64, *c, &[[i as u8; 32]]).unwrap();
    }
    s.flush().unwrap();
    // Relay 2 compacts what it holds (up to 3); relay 1, behind, compacts up to 2 later:
    // the older snapshot must not replace the newer one, nor drop chunk 3.
    s.compact(&a, b"snap-3", 3).unwrap();
    s.append(&a, 3, b"c4", &[[4; 32]]).unwrap();
    s.compact(&a, b"snap-2", 2).unwrap();
    s.flush().unwrap();
    let stored = s.load(&a).unwrap().unwrap();
    assert_eq!(stored.snapshot.as_deref(), Some(&b"snap-3"[..]));
    assert_eq!(stored.chunks, vec![b"c4".to_vec()]);
    assert_eq!(stored.last_seq, 4);
}

/// What relays are told comes from `committed_feed`: an append still in this relay's
/// open transaction may roll back and its sequence go to another relay's commit, so it
/// must not be counted before its flush.
fn committed_feed_is_flushed_only<H: Harness>(h: &mut H) {
    let s = h.fresh();
    let a = doc("households/z1");
    if !s.shared() {
        s.commit(&a, 1, b"c1", &[[1; 32]]).unwrap();
        s.flush().unwrap();
        assert_eq!(s.committed_feed(0).unwrap(), (1, vec![(1, a.clone())]));
        return;
    }
    assert_eq!(s.append(&a, 0, b"c1", &[[1; 32]]).unwrap(), 1);
    s.flush().unwrap();
    assert_eq!(s.append(&a, 1, b"c2", &[[2; 32]]).unwrap(), 2);
    assert_eq!(
        s.committed_feed(0).unwrap(),
        (1, vec![(1, a.clone())]),
        "sequence 2 is not flushed"
    );
    s.flush().unwrap();
    assert_eq!(s.committed_feed(1).unwrap(), (2, vec![(2, a.clone())]));
}

/// The follower's read with chunks: the same head and entries as `committed_feed`; on
/// a shared backend, each entry's chunk and heads as `chunks_after` has them when the
/// window holds at most `most` entries and all its chunks are stored, and none
/// otherwise (never a window with some chunks missing).
/// [`Documents::committed_feed_chunks`], checked against its asynchronous form where
/// the backend has one (both must answer alike).
fn feed_chunks<S: Documents>(s: &S, after: u64, most: u64) -> super::FeedRead {
    let read = s.committed_feed_chunks(after, most).unwrap();
    if let Some(future) = s.committed_feed_chunks_async(after, most) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the asynchronous read");
        let answer = runtime.block_on(future).unwrap();
        assert_eq!(
            answer, read,
            "the asynchronous read answers as the blocking one"
        );
    }
    read
}

fn committed_feed_brings_short_windows_chunks<H: Harness>(h: &mut H) {
    let s = h.fresh();
    let (a, b) = (doc("households/z1"), doc("households/z2"));
    if !s.shared() {
        s.commit(&a, 1, b"c1", &[[1; 32]]).unwrap();
        s.flush().unwrap();
        let read = feed_chunks(&s, 0, 64);
        assert_eq!((read.head, read.entries), s.committed_feed(0).unwrap());
        return;
    }
    s.append(&a, 0, b"a1", &[[1; 32]]).unwrap();
    s.append(&b, 0, b"b2", &[[2; 32]]).unwrap();
    s.append(&a, 1, b"a3", &[[3; 32]]).unwrap();
    s.flush().unwrap();
    let read = feed_chunks(&s, 0, 3);
    assert_eq!(
        (read.head, read.entries.clone()),
        s.committed_feed(0).unwrap()
    );
    let chunks = read.chunks.expect("a window of 3 with at most 3: chunks");
    assert_eq!(
        chunks,
        vec![
            (b"a1".to_vec(), vec![[1; 32]]),
            (b"b2".to_vec(), vec![[2; 32]]),
            (b"a3".to_vec(), vec![[3; 32]]),
        ]
    );
    let stored = s.chunks_after(&a, 0).unwrap().unwrap();
    assert_eq!(stored[1], (3, b"a3".to_vec(), vec![[3; 32]]));
    let read = feed_chunks(&s, 1, 2);
    assert_eq!(read.entries, vec![(2, b.clone()), (3, a.clone())]);
    assert!(read.chunks.is_some());
    // Longer than asked for: the entries alone.
    let read = feed_chunks(&s, 0, 2);
    assert_eq!(read.entries.len(), 3);
    assert_eq!(read.chunks, None);
    // A chunk folded into a snapshot is gone: the window comes without chunks.
    s.compact(&a, b"snap", 3).unwrap();
    s.flush().unwrap();
    assert_eq!(feed_chunks(&s, 0, 64).chunks, None);
    let read = feed_chunks(&s, 3, 64);
    assert_eq!(
        (read.head, read.entries, read.chunks),
        (3, vec![], Some(vec![]))
    );
}

fn asynchronous_flush<H: Harness>(h: &mut H) {
    let (a, b) = (doc("households/z1"), doc("households/z2"));
    let s = h.fresh();
    let write = |d: &DocId, expected: u64, seq: u64, chunk: &[u8]| {
        if s.shared() {
            s.append(d, expected, chunk, &[[seq as u8; 32]]).unwrap()
        } else {
            s.commit(d, seq, chunk, &[[seq as u8; 32]]).unwrap();
            seq
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the asynchronous flush");
    write(&a, 0, 1, b"a1");
    let Some(flushing) = s.flush_async() else {
        // Only backends with asynchronous IO have one; the rest flush the blocking way.
        s.flush().unwrap();
        return;
    };
    // The commit runs whether or not its answer is awaited yet: what it holds reads
    // back at once, the next write joins a new transaction, a blocking flush covers
    // both.
    assert_eq!(s.load(&a).unwrap().unwrap().chunks, vec![b"a1".to_vec()]);
    let seq = write(&b, 0, 2, b"b2");
    assert_eq!(seq, 2, "the next write takes the next sequence");
    s.flush().unwrap();
    runtime.block_on(flushing).unwrap();
    // Nothing written since: an asynchronous flush answers at once.
    if let Some(nothing) = s.flush_async() {
        runtime.block_on(nothing).unwrap();
    }
    let s = h.restart(s);
    assert_eq!(s.last_seq().unwrap(), 2);
    assert_eq!(s.load(&b).unwrap().unwrap().chunks, vec![b"b2".to_vec()]);
    assert!(!s.append_lost(&a, 1) && !s.append_lost(&b, 2));
}

fn torn_commits<H: Harness>(h: &mut H) {
    let a = doc("households/z1");
    let s = h.fresh();
    s.commit(&a, 1, b"c1", &[[1; 32]]).unwrap();
    s.flush().unwrap();
    s.commit(&a, 2, b"c2", &[[2; 32]]).unwrap();
    s.commit(&a, 3, b"c3", &[[3; 32]]).unwrap();
    let s = h.restart(s);
    // Whatever survived of the unflushed commits, each is whole: a feed entry has its
    // heads and its chunk, and the chunks are a prefix of what was written.
    let last = s.last_seq().unwrap();
    assert!((1..=3).contains(&last), "the flushed commit is there");
    let chunks = s.load(&a).unwrap().unwrap().chunks;
    let written: Vec<Vec<u8>> = vec![b"c1".to_vec(), b"c2".to_vec(), b"c3".to_vec()];
    assert_eq!(chunks, written[..last as usize].to_vec());
    for seq in 1..=last {
        assert!(s.heads_at(&a, seq).unwrap().is_some());
    }
    // And the store takes new commits after the last one it kept.
    s.commit(&a, last + 1, b"again", &[[9; 32]]).unwrap();
    assert_eq!(s.last_seq().unwrap(), last + 1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemoryStorage, SledStorage};

    /// sled in a temporary directory, reopened from disk on restart.
    struct Sled {
        dirs: Vec<tempfile::TempDir>,
    }

    impl Harness for Sled {
        type Store = SledStorage;
        fn fresh(&mut self) -> SledStorage {
            let dir = tempfile::tempdir().unwrap();
            let s = SledStorage::open(dir.path()).unwrap();
            self.dirs.push(dir);
            s
        }
        fn restart(&mut self, store: SledStorage) -> SledStorage {
            let path = store.path();
            drop(store);
            reopen(|| SledStorage::open(&path))
        }
    }

    /// Memory that forgets what was not flushed on restart.
    struct Memory {
        epoch: u64,
    }

    impl Harness for Memory {
        type Store = MemoryStorage;
        fn fresh(&mut self) -> MemoryStorage {
            self.epoch += 1;
            MemoryStorage::new(self.epoch)
        }
        fn restart(&mut self, store: MemoryStorage) -> MemoryStorage {
            store.crash();
            store
        }
    }

    #[test]
    fn sled_keeps_the_storage_contract() {
        run(&mut Sled { dirs: Vec::new() });
    }

    #[test]
    fn memory_keeps_the_storage_contract() {
        run(&mut Memory { epoch: 0 });
    }

    /// A backend that forgets everything on restart, flushed or not.
    struct Amnesiac;

    impl Harness for Amnesiac {
        type Store = MemoryStorage;
        fn fresh(&mut self) -> MemoryStorage {
            MemoryStorage::new(1)
        }
        fn restart(&mut self, _store: MemoryStorage) -> MemoryStorage {
            MemoryStorage::new(1)
        }
    }

    #[test]
    #[should_panic(expected = "flushed commits survive a restart")]
    fn the_suite_fails_a_backend_that_loses_flushed_writes() {
        run(&mut Amnesiac);
    }

    #[test]
    fn memory_forgets_what_was_not_flushed() {
        let s = MemoryStorage::new(7);
        let a = doc("households/z1");
        s.commit(&a, 1, b"c1", &[[1; 32]]).unwrap();
        s.flush().unwrap();
        s.commit(&a, 2, b"c2", &[[2; 32]]).unwrap();
        s.bind_actor(b"actor", &device("phone-1")).unwrap();
        assert_eq!(s.unflushed(), 2);
        s.crash();
        assert_eq!(s.last_seq().unwrap(), 1);
        assert_eq!(s.actor_owner(b"actor").unwrap(), None);
        assert_eq!(s.unflushed(), 0);
    }
}
