//! Catch-up queries: which documents of a subscription changed in a window of the feed,
//! and what a device lacks of one (from the commit log when the window is recent: its
//! stored chunks and shared block bundles, see `blocks`; else from the heads it knows,
//! shared between devices that knew the same heads).

use std::collections::HashSet;
use std::sync::Arc;

use automerge::ChangeHash;
use redline_proto::DocId;
use redline_proto::message::{Coverage, Payload};
use redline_proto::wire::{INLINE_MAX, union_heads};

use super::blocks::{BlockCounts, Shipped};
use super::slots::{DocSlot, LogEntry};
use super::{Hub, has, make_bundle};
use crate::Error;
use automerge::Change;

/// A catch-up window: the device holds every commit up to `after`; send those up to
/// `upto`, except the changes in `own` (the device pushed them).
#[derive(Clone, Copy)]
pub struct Window<'a> {
    /// Feed sequence the device is caught up to.
    pub after: u64,
    /// Stable sequence to catch up to.
    pub upto: u64,
    /// Changes the device pushed itself.
    pub own: &'a HashSet<ChangeHash>,
    /// The device reads several chunks in one payload: ship the stored ones.
    pub chunks: bool,
}

/// A window of at least this many changes may be answered with the whole document.
pub const WHOLE_MIN_CHANGES: usize = 256;

/// What a device lacks of a document: updates to send it in this order (none: it
/// lacks nothing), each with the heads the device holds once it has it.
pub type Found = Vec<(Payload, Vec<ChangeHash>)>;

/// A device's catch-up from the commit log: what was committed in the window `w`, less
/// the device's own: the whole document when it lacks most of it (as of the window's
/// end, or as of an earlier commit of the window that was saved, followed by the rest
/// of the window), else the window's stored chunks, else one bundle made for it.
fn from_log(
    state: &mut super::slots::SlotState,
    w: &Window<'_>,
    counts: &BlockCounts,
) -> Result<Found, Error> {
    let in_window = |e: &LogEntry| e.seq > w.after && e.seq <= w.upto;
    let Some(from) = state.log.iter().position(in_window) else {
        return Ok(Vec::new());
    };
    let to = from
        + state
            .log
            .iter()
            .skip(from)
            .take_while(|e| in_window(e))
            .count();
    // What the device holds once it has the window: the heads after its last
    // commit, not the document's now (it may hold commits past the window that
    // the device is not sent yet; claiming them would hide them from a later
    // catch-up that works from what the device holds).
    let heads = state.log[to - 1].heads.clone();
    if w.chunks
        && let Some((at, bytes)) = whole_at(state, from..to, w.own)
    {
        counts
            .whole
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut found = vec![(
            Payload::Document(bytes.to_vec()),
            state.log[at].heads.clone(),
        )];
        if let Some(rest) = pieces(state, at + 1..to, w, counts)? {
            found.push((rest, heads));
        }
        return Ok(found);
    }
    Ok(pieces(state, from..to, w, counts)?
        .map(|p| vec![(p, heads)])
        .unwrap_or_default())
}

/// The changes of the log's commits `range` (consecutive, in the window), less the
/// device's own: stored chunks and block bundles when the device reads several chunks
/// in one payload, else (or when that would cut too finely) one bundle made for it.
fn pieces(
    state: &mut super::slots::SlotState,
    range: std::ops::Range<usize>,
    w: &Window<'_>,
    counts: &BlockCounts,
) -> Result<Option<Payload>, Error> {
    if range.is_empty() {
        return Ok(None);
    }
    if w.chunks {
        match super::blocks::ship(state, range.clone(), w.own, counts)? {
            Shipped::Nothing => return Ok(None),
            Shipped::Pieces(bytes) => return Ok(Some(Payload::Bundle(bytes))),
            // Cut too finely: one bundle made for the device, as below.
            Shipped::TooFine => {}
        }
    }
    let mut seen = HashSet::new();
    let hashes: Vec<ChangeHash> = state
        .log
        .range(range)
        .flat_map(|e| e.hashes.iter())
        .filter(|h| !w.own.contains(h) && seen.insert(**h))
        .copied()
        .collect();
    if hashes.is_empty() {
        return Ok(None);
    }
    Ok(Some(Payload::Bundle(make_bundle(&state.doc, hashes)?)))
}

/// Whether a device lacks most of a document as of one of the window's commits, whose
/// whole-document save it can then be sent: the window's last commit when the
/// document stands at it (saved now if not yet), else the latest of the window's
/// commits that one of the relay's kept saves was made at (a hot document nearly
/// always has a commit past the stable sequence in flight, and the relay saves a
/// growing document after its commits, see `slots::SAVE_GROWTH`). Returns the commit's
/// index in the log and the save.
///
/// Most means at least [`WHOLE_MIN_CHANGES`] changes and three quarters of the save's
/// changes, and the save no larger than the stored chunks up to that commit (less the
/// commits wholly the device's own). A phone loads it and merges its own copy in, about
/// 3.5 times faster than applying the changes (Criterion `catch_up`, a ledger day of
/// 4,800 changes, whose document is also smaller than the bundle); a document whose
/// base content the device already holds (a zone's households) is larger than what it
/// lacks, and gets the changes. An earlier
/// save is used only if small enough to go inline ([`INLINE_MAX`]): a transfer on its
/// own stream could reach the phone after the rest of the window, which needs it.
fn whole_at(
    state: &mut super::slots::SlotState,
    range: std::ops::Range<usize>,
    own: &HashSet<ChangeHash>,
) -> Option<(usize, Arc<Vec<u8>>)> {
    let last = range.end - 1;
    let at_end = state.doc.get_heads() == state.log[last].heads;
    let (at, total, earlier) = if at_end {
        (last, state.change_count(), None)
    } else {
        // The newest save at one of the window's commits, if small enough to go inline.
        let (at, save) = state.saves.iter().rev().find_map(|s| {
            let at = range
                .clone()
                .rev()
                .find(|&i| state.log[i].heads == s.heads)?;
            (s.bytes.len() <= INLINE_MAX).then_some((at, s))
        })?;
        (at, save.changes, Some(save.bytes.clone()))
    };
    let (mut lacking, mut window_bytes) = (0, Some(0));
    for e in state.log.range(range.start..=at) {
        let others = e.hashes.iter().filter(|h| !own.contains(h)).count();
        lacking += others;
        // Commits wholly the device's own are never shipped to it.
        if others > 0 {
            window_bytes = window_bytes.zip(e.chunk.as_ref()).map(|(n, c)| n + c.len());
        }
    }
    // The chunks of commits that mix the device's own changes with others' count
    // whole, so they are at least what it would be shipped; a pruned chunk (a window
    // of more than the log's bytes) counts as large.
    if lacking < WHOLE_MIN_CHANGES || lacking * 4 < total * 3 {
        return None;
    }
    let bytes = match earlier {
        Some(bytes) => bytes,
        None => state.saved(),
    };
    window_bytes
        .is_none_or(|n| bytes.len() <= n)
        .then_some((at, bytes))
}

fn hash_set(heads: &[ChangeHash]) -> HashSet<ChangeHash> {
    heads.iter().copied().collect()
}

impl Hub {
    /// What a device that knows `have` of `doc` lacks (nothing: empty).
    pub async fn missing(
        &self,
        id: &DocId,
        have: &[ChangeHash],
        window: Option<Window<'_>>,
    ) -> Result<Found, Error> {
        let slot = self.slot(id).await?;
        let result = Self::missing_in(&slot, have, window, &self.stats.blocks).await;
        self.release(slot);
        result
    }

    /// What a device lacks of `doc` that holds every commit up to `have_at` (if
    /// covered before) and the heads in `known`. The heads at `have_at` are read from
    /// storage only when the commit log cannot answer the window by itself (a device
    /// far behind, or no window): a live catch-up needs no storage read.
    pub async fn lacks(
        &self,
        doc: &DocId,
        have_at: Option<u64>,
        known: &[ChangeHash],
        window: Option<Window<'_>>,
    ) -> Result<Found, Error> {
        let slot = self.slot(doc).await?;
        let from_log = match window {
            Some(w) => w.after.saturating_add(1) >= slot.state.lock().await.log_floor,
            None => false,
        };
        // If the log is pruned past the window in between, the answer works from
        // `known` alone: it may send more than needed, never less.
        let mut have = match have_at {
            Some(seq) if !from_log => match self.heads_at(doc, seq).await {
                Ok(h) => h,
                Err(e) => {
                    self.release(slot);
                    return Err(e);
                }
            },
            _ => Vec::new(),
        };
        union_heads(&mut have, known);
        let result = Self::missing_in(&slot, &have, window, &self.stats.blocks).await;
        self.release(slot);
        result
    }

    async fn missing_in(
        slot: &DocSlot,
        have: &[ChangeHash],
        window: Option<Window<'_>>,
        counts: &BlockCounts,
    ) -> Result<Found, Error> {
        let mut state = slot.state.lock().await;
        let heads = state.doc.get_heads();
        if heads.is_empty() {
            return Ok(Vec::new());
        }
        // From the commit log: what was committed in the window, less the device's own.
        if let Some(w) = window
            && w.after.saturating_add(1) >= state.log_floor
        {
            return from_log(&mut state, &w, counts);
        }
        let have_set = hash_set(have);
        if heads.iter().all(|h| have_set.contains(h)) {
            return Ok(Vec::new());
        }
        if have.is_empty() {
            return Ok(vec![(Payload::Document(state.saved().to_vec()), heads)]);
        }
        let mut known: Vec<ChangeHash> = have
            .iter()
            .filter(|h| has(&state.doc, h))
            .copied()
            .collect();
        known.sort();
        known.dedup();
        if state.deliveries_at != heads {
            state.deliveries.clear();
            state.deliveries_at = heads.clone();
        }
        if let Some((_, bytes)) = state.deliveries.iter().find(|(k, _)| *k == known) {
            return Ok(vec![(Payload::Bundle(bytes.to_vec()), heads)]);
        }
        let changes = state.doc.get_changes(&known);
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let bundle = make_bundle(&state.doc, changes.iter().map(|c| c.hash()))?;
        if state.deliveries.len() >= 16 {
            state.deliveries.remove(0);
        }
        state.deliveries.push((known, Arc::new(bundle.clone())));
        Ok(vec![(Payload::Bundle(bundle), heads)])
    }

    /// Documents in `scope` changed after `after` up to `upto`, and documents in `scope`
    /// that the old subscription did not cover (all stored ones, if `old` is `None`).
    pub async fn changed_in_scope(
        &self,
        scope: &Coverage,
        after: u64,
        upto: u64,
        old: Option<&Coverage>,
    ) -> Result<Vec<DocId>, Error> {
        let mut out: Vec<DocId> = Vec::new();
        let mut seen = HashSet::new();
        let newly = match old {
            Some(old) if old == scope => Vec::new(),
            Some(old) => {
                let (scope, old) = (scope.clone(), old.clone());
                self.blocking(move |s| {
                    Ok(s.list()?
                        .into_iter()
                        .filter(|d| scope.covers(d) && !old.covers(d))
                        .collect())
                })
                .await?
            }
            None => {
                let scope = scope.clone();
                self.blocking(move |s| {
                    Ok(s.list()?.into_iter().filter(|d| scope.covers(d)).collect())
                })
                .await?
            }
        };
        for d in newly {
            if seen.insert(d.clone()) {
                out.push(d);
            }
        }
        if old.is_some() {
            // The feed's last entries are kept in memory: no round trip.
            let kept = self
                .recent
                .lock()
                .expect("recent lock")
                .select(after, upto, |d, kind| scope.covers_parsed(d, kind));
            let entries = match kept {
                Some(entries) => entries,
                None => {
                    let mut read = self.blocking(move |s| s.feed(after, upto)).await?;
                    read.retain(|(_, d)| scope.covers(d));
                    read
                }
            };
            for (_, d) in entries {
                if seen.insert(d.clone()) {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    /// Dependencies of `changes` that neither `doc` nor `changes` hold.
    pub async fn missing_dependencies(
        &self,
        id: &DocId,
        changes: &[Change],
    ) -> Result<Vec<ChangeHash>, Error> {
        let within: HashSet<ChangeHash> = changes.iter().map(|c| c.hash()).collect();
        let wanted: Vec<ChangeHash> = changes
            .iter()
            .flat_map(|c| c.deps().iter().copied())
            .filter(|d| !within.contains(d))
            .collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let slot = self.slot(id).await?;
        let mut missing: Vec<ChangeHash> = {
            let state = slot.state.lock().await;
            wanted.into_iter().filter(|d| !has(&state.doc, d)).collect()
        };
        self.release(slot);
        missing.sort();
        missing.dedup();
        Ok(missing)
    }

    /// Heads of `doc` as of feed sequence `seq`.
    pub async fn heads_at(&self, doc: &DocId, seq: u64) -> Result<Vec<ChangeHash>, Error> {
        let key = doc.clone();
        let h = self.blocking(move |s| s.heads_at(&key, seq)).await?;
        Ok(h.unwrap_or_default().into_iter().map(ChangeHash).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authorship::Author;
    use crate::storage::MemoryStorage;
    use automerge::transaction::Transactable;
    use automerge::{ActorId, Automerge, ROOT};

    /// The one update of an answer that sends at most one.
    trait One {
        fn one(self) -> Option<(Payload, Vec<ChangeHash>)>;
    }

    impl One for Found {
        fn one(self) -> Option<(Payload, Vec<ChangeHash>)> {
            assert!(self.len() <= 1, "at most one update, got {}", self.len());
            self.into_iter().next()
        }
    }

    fn author() -> Author {
        Author {
            device: redline_proto::DeviceId::new("phone-0").unwrap(),
            member: redline_proto::MemberId::new("m0").unwrap(),
            role: redline_proto::token::Role::Volunteer,
        }
    }

    /// Sessions asking at once for a document that is not cached (a reconnect storm)
    /// share one load instead of each parsing it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_asking_at_once_share_one_load() {
        // On disk: loads go to the blocking pool, so the sessions really overlap.
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(crate::storage::SledStorage::open(dir.path()).unwrap());
        let id = DocId::parse("households/zone-1").unwrap();
        {
            let hub = Hub::new(storage.clone(), 1 << 20).unwrap();
            let mut doc = Automerge::new().with_actor(ActorId::from([1u8; 16]));
            let mut tx = doc.transaction();
            tx.put(ROOT, "k", 1).unwrap();
            tx.commit();
            hub.push(&id, &author(), doc.get_changes(&[]))
                .await
                .unwrap();
        }
        let hub = Hub::new(storage, 1 << 20).unwrap();
        let asks: Vec<_> = (0..32)
            .map(|_| {
                let (hub, id) = (hub.clone(), id.clone());
                tokio::spawn(async move {
                    let slot = hub.slot(&id).await.unwrap();
                    hub.release(slot);
                })
            })
            .collect();
        for a in asks {
            a.await.unwrap();
        }
        assert_eq!(
            hub.stats.loads.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert!(
            hub.loading.lock().unwrap().is_empty(),
            "no gate left behind"
        );
    }

    /// A hub holding `n` commits to one document, one change each: the document, and
    /// each commit's sequence with the heads right after it.
    async fn committed(n: i64) -> (Arc<Hub>, DocId, Automerge, Vec<(u64, Vec<ChangeHash>)>) {
        let hub = Hub::new(Arc::new(MemoryStorage::new(7)), 1 << 20).unwrap();
        let id = DocId::parse("households/zone-1").unwrap();
        let mut doc = Automerge::new().with_actor(ActorId::from([1u8; 16]));
        let mut commits = Vec::new();
        for i in 0..n {
            let before = doc.get_heads();
            let mut tx = doc.transaction();
            tx.put(ROOT, format!("k{i}"), i).unwrap();
            tx.commit();
            let c = hub
                .push(&id, &author(), doc.get_changes(&before))
                .await
                .unwrap();
            commits.push((c.seq, doc.get_heads()));
        }
        (hub, id, doc, commits)
    }

    /// A catch-up over a window of the commit log tells the heads the device holds once
    /// it has the window, not the document's newest: a commit past the window must not
    /// be counted as held (a later catch-up from those heads would never send it).
    #[tokio::test]
    async fn a_window_answers_the_heads_at_its_end() {
        let (hub, id, _, after_each) = committed(3).await;
        let none = HashSet::new();
        let (first, second, third) = (&after_each[0], &after_each[1], &after_each[2]);
        for chunks in [false, true] {
            let w = Window {
                after: first.0,
                upto: second.0,
                own: &none,
                chunks,
            };
            let (_, heads) = hub
                .missing(&id, &first.1, Some(w))
                .await
                .unwrap()
                .one()
                .expect("the second commit is missing");
            assert_eq!(heads, second.1, "the heads after the window's last commit");
            assert_ne!(heads, third.1);
        }
    }

    /// A catch-up from a device's cursor: inside the commit log it is answered from the
    /// log; a device further behind than the log (here: a restarted relay, whose log
    /// starts empty) is answered from the heads storage recorded at its cursor, and is
    /// sent only what came after them.
    #[tokio::test]
    async fn lacks_works_from_the_log_or_from_the_heads_at_the_cursor() {
        let (hub, id, doc, commits) = committed(3).await;
        let none = HashSet::new();
        let all: Vec<_> = doc.get_changes(&[]).into_iter().collect();
        let holds_one = || {
            let mut d = Automerge::new();
            d.apply_changes(all[..1].to_vec()).unwrap();
            d
        };
        let w = Window {
            after: commits[0].0,
            upto: commits[2].0,
            own: &none,
            chunks: false,
        };
        for hub in [hub.clone(), Hub::new(hub.storage(), 1 << 20).unwrap()] {
            let (Payload::Bundle(bytes), heads) = hub
                .lacks(&id, Some(commits[0].0), &[], Some(w))
                .await
                .unwrap()
                .one()
                .expect("two commits are missing")
            else {
                panic!("a bundle");
            };
            assert_eq!(heads, commits[2].1);
            let mut device = holds_one();
            device.load_incremental(&bytes).unwrap();
            assert_eq!(device.get_heads(), commits[2].1, "caught up");
            let sent = Automerge::load(&{
                let mut only = Automerge::new();
                only.load_incremental(&bytes).unwrap();
                only.save()
            });
            // Changes whose dependencies are missing stay queued: what was sent, alone,
            // applies nothing if the first commit is not in it.
            assert!(
                sent.unwrap().get_heads().is_empty(),
                "the first commit, which the device holds, was not sent"
            );
        }
    }

    /// A device that lacks most of a document over a window ending at its heads gets the
    /// whole document (if it reads several chunks); a small window, an older device, or
    /// commits past the window get the changes.
    #[tokio::test]
    async fn a_device_lacking_most_of_a_document_gets_it_whole() {
        let hub = Hub::new(Arc::new(MemoryStorage::new(7)), 1 << 20).unwrap();
        let id = DocId::parse("households/zone-1").unwrap();
        let mut doc = Automerge::new().with_actor(ActorId::from([1u8; 16]));
        let push = |doc: &mut Automerge, n: usize| {
            let before = doc.get_heads();
            for i in 0..n {
                let mut tx = doc.transaction();
                // Keys differ between pushes (a put of an equal value makes no change).
                tx.put(ROOT, format!("k{n}-{i}"), i as i64).unwrap();
                tx.commit();
            }
            let changes = doc.get_changes(&before);
            let hub = hub.clone();
            let id = id.clone();
            async move { hub.push(&id, &author(), changes).await.unwrap().seq }
        };
        let first = push(&mut doc, 20).await;
        let holds_first = doc.clone();
        let small = push(&mut doc, 10).await;
        let big = push(&mut doc, WHOLE_MIN_CHANGES).await;
        let none = HashSet::new();
        let ask = |after, upto, chunks| {
            let w = Window {
                after,
                upto,
                own: &none,
                chunks,
            };
            let hub = hub.clone();
            let id = id.clone();
            async move {
                hub.lacks(&id, None, &[], Some(w))
                    .await
                    .unwrap()
                    .one()
                    .unwrap()
            }
        };
        let (payload, heads) = ask(first, big, true).await;
        let Payload::Document(bytes) = payload else {
            panic!("the whole document");
        };
        assert_eq!(heads, doc.get_heads());
        let whole = || {
            hub.stats
                .blocks
                .whole
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        assert_eq!(whole(), 1, "counted for the metrics");
        let mut device = holds_first.clone();
        device.merge(&mut Automerge::load(&bytes).unwrap()).unwrap();
        assert_eq!(device.get_heads(), doc.get_heads());
        assert!(
            matches!(ask(first, small, true).await.0, Payload::Bundle(_)),
            "a small window"
        );
        assert!(
            matches!(ask(first, big, false).await.0, Payload::Bundle(_)),
            "an older device"
        );
        // A commit past the window (in flight: not stable yet) and one past that: the
        // relay saved the document at the end of `big` (it grew past
        // `WHOLE_MIN_CHANGES`), so a window ending there or later still gets it whole,
        // then the rest of the window as pieces.
        let at_big = doc.get_heads();
        let past = push(&mut doc, 1).await;
        let at_past = doc.get_heads();
        let later = push(&mut doc, 2).await;
        let (payload, heads) = ask(first, big, true).await;
        assert!(
            matches!(payload, Payload::Document(_)),
            "saved at the window's end"
        );
        assert_eq!(heads, at_big);
        // Every update of the answer for the window from `first` up to `past`.
        let upto_past = async || {
            let w = Window {
                after: first,
                upto: past,
                own: &none,
                chunks: true,
            };
            hub.lacks(&id, None, &[], Some(w)).await.unwrap()
        };
        let found = upto_past().await;
        let [
            (Payload::Document(bytes), saved_at),
            (Payload::Bundle(rest), end),
        ] = &found[..]
        else {
            panic!("the save, then the rest of the window");
        };
        assert_eq!((saved_at, end), (&at_big, &at_past));
        let mut device = holds_first.clone();
        device.merge(&mut Automerge::load(bytes).unwrap()).unwrap();
        device.load_incremental(rest).unwrap();
        assert_eq!(
            device.get_heads(),
            at_past,
            "caught up to the window's end, no further"
        );
        assert_eq!(whole(), 3);
        // Saves past the window (devices asked up to the last commits; the relay keeps
        // `SAVES_KEPT`, 2): not the device's yet, so a window that ends before them
        // gets the changes.
        assert!(matches!(
            ask(first, later, true).await.0,
            Payload::Document(_)
        ));
        let last = push(&mut doc, 3).await;
        assert!(matches!(
            ask(first, last, true).await.0,
            Payload::Document(_)
        ));
        assert_eq!(whole(), 5);
        let found = upto_past().await;
        let [(Payload::Bundle(_), end)] = &found[..] else {
            panic!("the window's changes");
        };
        assert_eq!(end, &at_past);
        assert_eq!(whole(), 5);
    }

    /// A device that lacks most of a document's changes but little of its bytes (a
    /// zone's households, set up in a few large changes it holds) gets the changes: the
    /// whole document would be larger than the window's chunks.
    #[tokio::test]
    async fn a_document_whose_base_content_the_device_holds_is_not_sent_whole() {
        let hub = Hub::new(Arc::new(MemoryStorage::new(7)), 1 << 20).unwrap();
        let id = DocId::parse("households/zone-1").unwrap();
        let mut doc = Automerge::new().with_actor(ActorId::from([1u8; 16]));
        let push = async |doc: &mut Automerge, n: usize, text: usize| {
            let before = doc.get_heads();
            for i in 0..n {
                let mut tx = doc.transaction();
                // Random text: Automerge's compression cannot shrink it.
                let t: String = (0..text)
                    .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
                    .collect();
                tx.put(ROOT, format!("k{text}-{i}"), t).unwrap();
                tx.commit();
            }
            let changes = doc.get_changes(&before);
            hub.push(&id, &author(), changes).await.unwrap().seq
        };
        let base = push(&mut doc, 20, 4096).await;
        let base_hashes: HashSet<ChangeHash> =
            doc.get_changes(&[]).iter().map(|c| c.hash()).collect();
        let later = push(&mut doc, WHOLE_MIN_CHANGES, 1).await;
        let none = HashSet::new();
        let ask = async |after, own| {
            let w = Window {
                after,
                upto: later,
                own,
                chunks: true,
            };
            hub.lacks(&id, None, &[], Some(w))
                .await
                .unwrap()
                .one()
                .unwrap()
        };
        let (payload, heads) = ask(base, &none).await;
        assert_eq!(heads, doc.get_heads());
        let Payload::Bundle(bytes) = payload else {
            panic!("the changes, not the whole document");
        };
        assert!(bytes.len() < 80 * 1024, "{} bytes", bytes.len());
        // The same when the device wrote the base content itself, in the window: its
        // own commit is never shipped to it, so its chunk does not count toward the
        // bytes the save is measured against.
        let (payload, _) = ask(base - 1, &base_hashes).await;
        assert!(
            matches!(payload, Payload::Bundle(b) if b.len() < 80 * 1024),
            "the others' changes"
        );
    }

    /// A commit wakes the live sessions whose subscription covers its document and no
    /// other, and a catch-up over the commit's window lists it from memory (the feed's
    /// recent entries), the same documents storage lists.
    #[tokio::test]
    async fn a_commit_wakes_only_the_sessions_it_concerns() {
        use crate::storage::Documents;
        use redline_proto::message::Subscription;
        let storage = Arc::new(MemoryStorage::new(7));
        let hub = Hub::new(storage.clone(), 1 << 20).unwrap();
        let zone = |z: &str| redline_proto::ZoneId::new(z).unwrap();
        let watching = |z: &str| {
            Coverage::new(Subscription {
                zones: vec![zone(z)],
                ..Default::default()
            })
        };
        let (one, two) = (
            hub.interest(watching("zone-1")),
            hub.interest(watching("zone-2")),
        );
        assert_eq!(hub.live_sessions(), 2);
        let id = DocId::parse("households/zone-1").unwrap();
        let mut doc = Automerge::new().with_actor(ActorId::from([1u8; 16]));
        let mut tx = doc.transaction();
        tx.put(ROOT, "k", 1).unwrap();
        tx.commit();
        let c = hub
            .push(&id, &author(), doc.get_changes(&[]))
            .await
            .unwrap();
        assert!(one.take(), "zone-1's session is woken");
        assert!(!two.take(), "zone-2's session is not");
        assert_eq!(*hub.stable().borrow(), c.seq, "woken after the move");
        let scope = watching("zone-1");
        let listed = hub
            .changed_in_scope(&scope, 0, c.seq, Some(&scope))
            .await
            .unwrap();
        assert_eq!(listed, vec![id.clone()]);
        let stored: Vec<DocId> = storage
            .feed(0, c.seq)
            .unwrap()
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        assert_eq!(listed, stored);
        drop(one);
        assert_eq!(hub.live_sessions(), 1);
    }

    /// Two devices catching up over the same window get one block bundle, made once;
    /// a device's own commit is never in what it is sent, and what it is sent brings
    /// it to the relay's heads.
    #[tokio::test]
    async fn devices_share_block_bundles_and_never_get_their_own_back() {
        let (hub, id, doc, commits) = committed(8).await;
        let window = |after: u64, own| Window {
            after,
            upto: commits[7].0,
            own,
            chunks: true,
        };
        let none = HashSet::new();
        let blocks = &hub.stats.blocks;
        let ask = |w| hub.missing(&id, &[], Some(w));
        let (first, _) = ask(window(0, &none)).await.unwrap().one().unwrap();
        let (second, _) = ask(window(0, &none)).await.unwrap().one().unwrap();
        assert_eq!(first, second);
        assert_eq!(blocks.made.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(blocks.reused.load(std::sync::atomic::Ordering::Relaxed), 1);
        // A device that pushed the fourth commit and holds the first four.
        let own: HashSet<ChangeHash> = commits[3].1.iter().copied().collect();
        let (Payload::Bundle(bytes), heads) = ask(window(commits[1].0, &own))
            .await
            .unwrap()
            .one()
            .unwrap()
        else {
            panic!("a bundle");
        };
        assert_eq!(heads, commits[7].1);
        let fork = |upto: usize| {
            let mut f = Automerge::new();
            let changes: Vec<_> = doc.get_changes(&[]).into_iter().take(upto).collect();
            f.apply_changes(changes).unwrap();
            f
        };
        let mut holds_four = fork(4);
        holds_four.load_incremental(&bytes).unwrap();
        assert_eq!(holds_four.get_heads(), commits[7].1, "caught up");
        let mut holds_three = fork(3);
        holds_three.load_incremental(&bytes).unwrap();
        assert_eq!(
            holds_three.get_heads(),
            commits[2].1,
            "its own fourth commit was not sent back (the rest waits for it)"
        );
    }

    /// A window cut into more than `MAX_PIECES` pieces (the device's own commits in
    /// between others') gets one bundle made for it instead: no block is made, its own
    /// commits are still left out, and it reaches the relay's heads.
    #[tokio::test]
    async fn a_finely_cut_window_gets_one_bundle() {
        let (hub, id, doc, commits) = committed(12).await;
        // The device pushed every other commit: pieces 0, 2, 4, 6, 8 and 10-11.
        let own: HashSet<ChangeHash> = [1, 3, 5, 7, 9]
            .iter()
            .flat_map(|i: &usize| commits[*i].1.iter().copied())
            .collect();
        let w = Window {
            after: 0,
            upto: commits[11].0,
            own: &own,
            chunks: true,
        };
        let (Payload::Bundle(bytes), _) =
            hub.missing(&id, &[], Some(w)).await.unwrap().one().unwrap()
        else {
            panic!("a bundle");
        };
        let blocks = &hub.stats.blocks;
        assert_eq!(blocks.made.load(std::sync::atomic::Ordering::Relaxed), 0);
        let all: Vec<_> = doc.get_changes(&[]).into_iter().collect();
        let mut holds_ten = Automerge::new();
        holds_ten.apply_changes(all[..10].to_vec()).unwrap();
        holds_ten.load_incremental(&bytes).unwrap();
        assert_eq!(holds_ten.get_heads(), commits[11].1, "caught up");
        let mut holds_one = Automerge::new();
        holds_one.apply_changes(all[..1].to_vec()).unwrap();
        holds_one.load_incremental(&bytes).unwrap();
        assert_eq!(holds_one.get_heads(), commits[0].1, "its own were not sent");
    }
}
