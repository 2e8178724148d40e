//! What a window of a document's commit log is shipped as, to a device that reads
//! several chunks in one payload: no bundle encoded per device where a shared one does.
//!
//! The log's commits are numbered per document (`LogEntry::n`). A window is cut into
//! *aligned blocks* (commits `k·2^L .. (k+1)·2^L`, `L` at most [`MAX_LEVEL`]), the
//! largest that fit the window and hold none of the device's own changes; each block
//! is bundled once and kept ([`Blocks`]), so every device whose window covers it gets
//! the same bytes. A single commit goes as the chunk it stored; the others' changes in
//! commits that also hold the device's own go in one bundle made for the device (its
//! own changes are never sent back), except where the commit's chunk holds its pushes
//! as the phones sent them (`LogEntry::parts`): then the others' pushes go as they are.
//! One bundle of many commits compresses like the whole window would, where a chunk per
//! commit would not.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use automerge::ChangeHash;

use super::make_bundle;
use super::slots::{LogEntry, SlotState};
use crate::Error;

/// Largest block: 2^6 = 64 commits.
pub(super) const MAX_LEVEL: u32 = 6;

/// Most pieces shipped in one update; a window that needs more gets one bundle made
/// for the device (separate bundles compress worse than one).
pub(super) const MAX_PIECES: usize = 4;

/// Bytes of block bundles kept per document; the oldest blocks go first.
pub(super) const BLOCK_BYTES: usize = 1024 * 1024;

/// Block bundles made for a document, by (first commit's number, level).
#[derive(Default)]
pub(super) struct Blocks {
    made: BTreeMap<(u64, u32), Arc<Vec<u8>>>,
    bytes: usize,
}

impl Blocks {
    /// Drops blocks that start before commit `first` (no longer in the log), then the
    /// oldest ones until the bytes kept fit [`BLOCK_BYTES`].
    pub(super) fn prune(&mut self, first: u64) {
        while let Some(entry) = self.made.first_entry() {
            if entry.key().0 >= first && self.bytes <= BLOCK_BYTES {
                break;
            }
            self.bytes -= entry.remove().len();
        }
    }

    fn get_or_make(
        &mut self,
        key: (u64, u32),
        make: impl FnOnce() -> Result<Vec<u8>, Error>,
        counts: &BlockCounts,
    ) -> Result<Arc<Vec<u8>>, Error> {
        if let Some(b) = self.made.get(&key) {
            counts.reused.fetch_add(1, Ordering::Relaxed);
            return Ok(b.clone());
        }
        let bytes = Arc::new(make()?);
        counts.made.fetch_add(1, Ordering::Relaxed);
        self.bytes += bytes.len();
        self.made.insert(key, bytes.clone());
        Ok(bytes)
    }
}

/// How often block bundles were made and shipped again (the hub's statistics).
#[derive(Debug, Default)]
pub struct BlockCounts {
    /// Block bundles made.
    pub made: AtomicU64,
    /// Block bundles shipped as made before (for another device, or again).
    pub reused: AtomicU64,
    /// Catch-ups answered with the whole document instead (`hub::catchup`).
    pub whole: AtomicU64,
}

/// One piece of a window, in the order of the log.
#[derive(Debug, PartialEq)]
enum Piece {
    /// The block of `2^level` commits starting at window index `at`.
    Block { at: usize, level: u32 },
    /// The stored chunk of the commit at window index `at`.
    Chunk(usize),
    /// The others' changes of the commit at window index `at` go in the device's bundle.
    Others(usize),
}

/// Cuts a window of `owned.len()` consecutive commits, the first numbered `first`, into
/// pieces. `owned[i]`: commit `i` holds a change of the device's own; `whole[i]`: it
/// holds nothing else; `stored[i]`: its chunk is still kept.
fn cut(first: u64, owned: &[bool], whole: &[bool], stored: &[bool]) -> Vec<Piece> {
    let len = owned.len();
    // owned_before[i]: commits before index i that hold the device's own changes.
    let mut owned_before = Vec::with_capacity(len + 1);
    owned_before.push(0usize);
    for o in owned {
        owned_before.push(owned_before.last().unwrap() + usize::from(*o));
    }
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < len {
        let n = first + at as u64;
        let mut level = n.trailing_zeros().min(MAX_LEVEL);
        while level > 0 {
            let end = at + (1usize << level);
            if end <= len && owned_before[end] == owned_before[at] {
                break;
            }
            level -= 1;
        }
        if level > 0 {
            pieces.push(Piece::Block { at, level });
        } else if whole[at] {
            // Wholly the device's own: nothing to send.
        } else if owned[at] || !stored[at] {
            pieces.push(Piece::Others(at));
        } else {
            pieces.push(Piece::Chunk(at));
        }
        at += 1usize << level;
    }
    pieces
}

/// A piece that goes out as it is: a block bundle, or a range of a commit's chunk
/// (all of it, or one push stored as sent).
enum Shipping {
    Block { at: usize, level: u32 },
    Bytes(usize, std::ops::Range<usize>),
}

/// The pieces that go out as they are, and the changes that go in one bundle made for
/// the device: the others' pushes of a mixed commit go as sent when `as_sent` and the
/// commit's chunk was stored so, else in the bundle.
fn plan_pieces(
    entries: &[&LogEntry],
    pieces: &[Piece],
    own: &HashSet<ChangeHash>,
    as_sent: bool,
) -> (Vec<Shipping>, Vec<ChangeHash>) {
    let mut shipped: Vec<Shipping> = Vec::new();
    let mut others: Vec<ChangeHash> = Vec::new();
    let not_own = |hashes: &[ChangeHash], others: &mut Vec<ChangeHash>| {
        others.extend(hashes.iter().filter(|h| !own.contains(h)).copied());
    };
    for piece in pieces {
        match *piece {
            Piece::Block { at, level } => shipped.push(Shipping::Block { at, level }),
            Piece::Chunk(at) => shipped.push(Shipping::Bytes(at, 0..usize::MAX)),
            Piece::Others(at) => {
                let e = entries[at];
                if !as_sent || e.chunk.is_none() || e.parts.is_empty() {
                    not_own(&e.hashes, &mut others);
                    continue;
                }
                let (mut bytes_from, mut hashes_from) = (0, 0);
                for part in &e.parts {
                    let hashes = &e.hashes[hashes_from..part.hashes_end];
                    let mine = hashes.iter().filter(|h| own.contains(h)).count();
                    if mine == 0 {
                        shipped.push(Shipping::Bytes(at, bytes_from..part.bytes_end));
                    } else if mine < hashes.len() {
                        not_own(hashes, &mut others);
                    }
                    (bytes_from, hashes_from) = (part.bytes_end, part.hashes_end);
                }
            }
        }
    }
    (shipped, others)
}

/// What a window's commits come to for one device.
#[derive(Debug)]
pub(super) enum Shipped {
    /// Every commit in the window is wholly the device's own.
    Nothing,
    /// The pieces, one after another.
    Pieces(Vec<u8>),
    /// More than [`MAX_PIECES`]: the caller makes one bundle for the device.
    TooFine,
}

/// What a device gets for the commits in `window` (consecutive, in the log's order).
pub(super) fn ship(
    state: &mut SlotState,
    window: std::ops::Range<usize>,
    own: &HashSet<ChangeHash>,
    counts: &BlockCounts,
) -> Result<Shipped, Error> {
    let entries: Vec<&LogEntry> = state.log.range(window).collect();
    let Some(first) = entries.first().map(|e| e.n) else {
        return Ok(Shipped::Nothing);
    };
    let owned: Vec<bool> = entries
        .iter()
        .map(|e| e.hashes.iter().any(|h| own.contains(h)))
        .collect();
    let whole: Vec<bool> = entries
        .iter()
        .map(|e| e.hashes.iter().all(|h| own.contains(h)))
        .collect();
    let stored: Vec<bool> = entries.iter().map(|e| e.chunk.is_some()).collect();
    let pieces = cut(first, &owned, &whole, &stored);
    if pieces.is_empty() {
        return Ok(Shipped::Nothing);
    }
    // What goes out as it is: blocks, chunks, and the others' pushes of a mixed commit
    // whose chunk was stored as sent; the rest of the mixed commits' changes (the
    // others' changes in a chunk the relay made) go in one bundle: one piece.
    // Pushes as sent add pieces: where they would make too many, their changes go in
    // the bundle as before.
    let (mut shipped, mut others) = plan_pieces(&entries, &pieces, own, true);
    if shipped.len() + usize::from(!others.is_empty()) > MAX_PIECES {
        (shipped, others) = plan_pieces(&entries, &pieces, own, false);
    }
    if shipped.len() + usize::from(!others.is_empty()) > MAX_PIECES {
        return Ok(Shipped::TooFine);
    }
    let mut bytes = Vec::new();
    for s in shipped {
        match s {
            Shipping::Block { at, level } => {
                let block = &entries[at..at + (1usize << level)];
                let make = || {
                    make_bundle(
                        &state.doc,
                        block.iter().flat_map(|e| e.hashes.iter().copied()),
                    )
                };
                let b = state
                    .blocks
                    .get_or_make((first + at as u64, level), make, counts)?;
                bytes.extend_from_slice(&b);
            }
            Shipping::Bytes(at, range) => {
                if let Some(c) = &entries[at].chunk {
                    let end = range.end.min(c.len());
                    bytes.extend_from_slice(&c[range.start..end]);
                }
            }
        }
    }
    if !others.is_empty() {
        bytes.extend_from_slice(&make_bundle(&state.doc, others)?);
    }
    Ok(Shipped::Pieces(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::slots::Part;
    use automerge::transaction::Transactable;
    use automerge::{ActorId, Automerge, ROOT};

    /// A push's change hashes and its bytes as sent.
    type TestPush = (Vec<ChangeHash>, Vec<u8>);

    /// One commit of `n` phones' pushes (two changes each), stored as sent: the slot,
    /// and each push's hashes and bytes.
    fn commit_of_pushes(n: u8) -> (SlotState, Vec<TestPush>) {
        let mut doc = Automerge::new();
        let mut pushes = Vec::new();
        for actor in 1..=n {
            let mut fork = doc.fork().with_actor(ActorId::from([actor; 16]));
            let before = fork.get_heads();
            for i in 0..2 {
                let mut tx = fork.transaction();
                tx.put(ROOT, format!("{actor}-{i}"), i).unwrap();
                tx.commit();
            }
            let hashes: Vec<ChangeHash> =
                fork.get_changes(&before).iter().map(|c| c.hash()).collect();
            let bytes = fork.bundle(hashes.clone()).unwrap().bytes().to_vec();
            doc.merge(&mut fork).unwrap();
            pushes.push((hashes, bytes));
        }
        let (mut chunk, mut hashes, mut parts) = (Vec::new(), Vec::new(), Vec::new());
        for (h, b) in &pushes {
            chunk.extend_from_slice(b);
            hashes.extend_from_slice(h);
            parts.push(Part {
                bytes_end: chunk.len(),
                hashes_end: hashes.len(),
            });
        }
        let heads = doc.get_heads();
        let mut state = SlotState::new(doc, 1);
        state.remember(1, hashes, Arc::new(chunk), heads, parts);
        (state, pushes)
    }

    /// A commit of more pushes than a payload may hold pieces: the others' pushes go
    /// in one bundle made for the device, not as sent (nor the whole window bundled).
    #[test]
    fn too_many_pushes_as_sent_go_in_one_bundle() {
        let (mut state, pushes) = commit_of_pushes(6);
        let own: HashSet<ChangeHash> = pushes[0].0.iter().copied().collect();
        let counts = BlockCounts::default();
        let Shipped::Pieces(bytes) = ship(&mut state, 0..1, &own, &counts).unwrap() else {
            panic!("expected pieces");
        };
        let got = crate::intake::device_changes(&bytes).unwrap();
        assert_eq!(got.len(), 10, "the five others' pushes");
        let mut chunks = 0;
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            rest = redline_proto::wire::split_chunk(rest).unwrap().2;
            chunks += 1;
        }
        assert_eq!(chunks, 1, "one bundle");
    }

    /// Two phones' pushes in one commit, stored as sent: a phone's catch-up gets the
    /// other's push as it was sent, with no bundle made; a push that is partly the
    /// device's own goes in a bundle made for it.
    #[test]
    fn the_others_pushes_of_a_mixed_commit_go_as_sent() {
        let (mut state, pushes) = commit_of_pushes(2);
        let ((a, a_bytes), (b, b_bytes)) = (pushes[0].clone(), pushes[1].clone());
        let chunk = [a_bytes.clone(), b_bytes.clone()].concat();
        let counts = BlockCounts::default();
        let ship_for = |state: &mut SlotState, own: &[ChangeHash]| {
            let own: HashSet<ChangeHash> = own.iter().copied().collect();
            match ship(state, 0..1, &own, &counts).unwrap() {
                Shipped::Pieces(bytes) => bytes,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            ship_for(&mut state, &a),
            b_bytes,
            "phone 1 gets phone 2's push as sent"
        );
        assert_eq!(ship_for(&mut state, &b), a_bytes);
        assert_eq!(
            ship_for(&mut state, &[]),
            chunk,
            "a third phone gets the chunk"
        );
        // Phone 2 pushed one of its changes again through a teammate: the rest of
        // that push is bundled for it.
        let odd = ship_for(&mut state, &[a[0], a[1], b[0]]);
        let got = crate::intake::device_changes(&odd).unwrap();
        assert_eq!(got.iter().map(|c| c.hash()).collect::<Vec<_>>(), vec![b[1]]);
    }

    fn plain(len: usize) -> (Vec<bool>, Vec<bool>, Vec<bool>) {
        (vec![false; len], vec![false; len], vec![true; len])
    }

    #[test]
    fn a_window_is_cut_into_the_largest_aligned_blocks() {
        let (o, w, s) = plain(11);
        // Commits 5..16: 5 alone, 6-7, 8-15.
        assert_eq!(
            cut(5, &o, &w, &s),
            vec![
                Piece::Chunk(0),
                Piece::Block { at: 1, level: 1 },
                Piece::Block { at: 3, level: 3 },
            ]
        );
        // The same commits seen by a device whose window starts at 0 share those blocks.
        let (o, w, s) = plain(16);
        assert_eq!(cut(0, &o, &w, &s), vec![Piece::Block { at: 0, level: 4 }]);
    }

    #[test]
    fn blocks_never_hold_the_devices_own_changes() {
        let (mut o, mut w, s) = plain(8);
        // Commit 2 is wholly the device's own; commit 5 holds its own and others'.
        o[2] = true;
        w[2] = true;
        o[5] = true;
        let pieces = cut(0, &o, &w, &s);
        assert_eq!(
            pieces,
            vec![
                Piece::Block { at: 0, level: 1 },
                Piece::Chunk(3),
                Piece::Chunk(4),
                Piece::Others(5),
                Piece::Block { at: 6, level: 1 },
            ]
        );
    }

    #[test]
    fn a_commit_whose_chunk_is_gone_goes_in_the_devices_bundle() {
        let (o, w, mut s) = plain(3);
        s[0] = false;
        assert_eq!(
            cut(1, &o, &w, &s),
            vec![Piece::Others(0), Piece::Block { at: 1, level: 1 }]
        );
    }

    #[test]
    fn blocks_are_at_most_max_level() {
        let (o, w, s) = plain(200);
        let pieces = cut(0, &o, &w, &s);
        // 0-63, 64-127, 128-191, then 192-199.
        assert_eq!(pieces.len(), 4);
        assert!(pieces.iter().all(|p| match p {
            Piece::Block { level, .. } => *level <= MAX_LEVEL,
            _ => true,
        }));
        // Every commit covered once, in order.
        let mut next = 0;
        for p in &pieces {
            let (at, len) = match p {
                Piece::Block { at, level } => (*at, 1usize << level),
                Piece::Chunk(at) | Piece::Others(at) => (*at, 1),
            };
            assert_eq!(at, next);
            next += len;
        }
        assert_eq!(next, 200);
    }

    #[test]
    fn the_oldest_blocks_go_first() {
        let counts = BlockCounts::default();
        let mut blocks = Blocks::default();
        let half = BLOCK_BYTES / 2 + 1;
        for start in [0u64, 2, 4] {
            blocks
                .get_or_make((start, 1), || Ok(vec![0u8; half]), &counts)
                .unwrap();
            blocks.prune(0);
        }
        assert_eq!(blocks.made.keys().map(|k| k.0).collect::<Vec<_>>(), vec![4]);
        blocks.prune(6);
        assert!(blocks.made.is_empty());
        assert_eq!(blocks.bytes, 0);
        assert_eq!(counts.made.load(Ordering::Relaxed), 3);
    }
}
