//! Following a feed that other relays write too (PostgreSQL shared by several relays).
//!
//! Sequences are handed out by storage, in commit order across relays (a flushed
//! sequence has every lower one flushed). The relay's *stable* sequence therefore is
//! the head of the stored feed, with one condition: before devices are told about a
//! sequence, every cached document that another relay committed to at or below it is
//! marked stale, so that no catch-up serves its old heads as current. The follower does
//! that, in this order, whenever storage announces a move (NOTIFY), this relay flushed,
//! or [`REREAD`] passed (the safety net for announcements lost while reconnecting).
//! A relay's own commit right after what was followed needs no read: nothing of
//! another relay lies below it ([`Hub::own_commit_flushed`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tracing::warn;

use redline_proto::{DocId, DocKind};

use super::Hub;
use crate::Error;

/// The feed's head is read at least this often.
pub const REREAD: Duration = Duration::from_millis(500);

/// A follower's read of at most this many entries brings their chunks along, for the
/// cached documents they concern ([`super::slots::Others`]): a live commit or a few.
const CHUNKS_WITH_AT_MOST: u64 = 64;

/// Feed entries kept in memory for catch-ups ([`Recent`]).
const RECENT_ENTRIES: usize = 16_384;

/// The feed's last stable entries, with consecutive sequences: a catch-up over a
/// window inside them (every live catch-up, most others) is answered without a read
/// of storage. On a shared feed the follower adds what it reads (the feed has no
/// gaps); on a relay's own feed each commit is added as it becomes stable, and a failed
/// commit (a gap) starts the entries over after it. The entries from `first` on are
/// every commit, not a sample.
#[derive(Debug)]
pub(super) struct Recent {
    /// The sequence of `entries[0]`.
    first: u64,
    /// Each entry's document with its kind, parsed once for every catch-up that reads it.
    entries: VecDeque<(DocId, DocKind)>,
}

impl Recent {
    /// Nothing kept yet; the next entries read follow `after`.
    pub(super) fn new(after: u64) -> Self {
        Self {
            first: after + 1,
            entries: VecDeque::new(),
        }
    }

    /// Adds the entries read after `known` up to `head` (in order, consecutive).
    /// Anything else (a gap: a failed commit on a relay's own feed) starts over after
    /// them (windows before fall back to storage).
    pub(super) fn extend(&mut self, known: u64, read: &[(u64, DocId)], head: u64) {
        let mut next = self.first + self.entries.len() as u64;
        if known != next - 1 {
            *self = Self::new(known);
            next = known + 1;
        }
        for (seq, doc) in read {
            if *seq != next {
                *self = Self::new(head);
                return;
            }
            self.entries.push_back((doc.clone(), doc.kind()));
            next += 1;
        }
        if next - 1 != head {
            *self = Self::new(head);
            return;
        }
        while self.entries.len() > RECENT_ENTRIES {
            self.entries.pop_front();
            self.first += 1;
        }
    }

    /// The entries after `after` up to `upto`, if every one of them is kept.
    #[cfg(test)]
    pub(super) fn window(&self, after: u64, upto: u64) -> Option<Vec<(u64, DocId)>> {
        self.select(after, upto, |_, _| true)
    }

    /// The entries after `after` up to `upto` whose document `pick` wants (given its
    /// parsed kind), if every entry of the window is kept.
    pub(super) fn select(
        &self,
        after: u64,
        upto: u64,
        mut pick: impl FnMut(&DocId, &DocKind) -> bool,
    ) -> Option<Vec<(u64, DocId)>> {
        let end = self.first + self.entries.len() as u64;
        if after + 1 < self.first || upto >= end {
            return None;
        }
        if upto <= after {
            return Some(Vec::new());
        }
        let from = (after + 1 - self.first) as usize;
        let to = (upto + 1 - self.first) as usize;
        Some(
            (from..to)
                .filter(|&i| pick(&self.entries[i].0, &self.entries[i].1))
                .map(|i| (self.first + i as u64, self.entries[i].0.clone()))
                .collect(),
        )
    }
}

/// A commit in a follower's window: its sequence and, when read, its chunk and the
/// document's heads after it.
type Commit = (u64, Option<(Arc<Vec<u8>>, Vec<[u8; 32]>)>);

/// Follows the shared feed until the hub is gone.
pub(super) async fn follow(
    hub: Weak<Hub>,
    mut signal: Option<watch::Receiver<u64>>,
    kick: Arc<Notify>,
) {
    loop {
        let announced = async {
            // No announcements (or they stopped): the re-read alone.
            match signal.as_mut() {
                Some(s) => {
                    if s.changed().await.is_err() {
                        std::future::pending::<()>().await
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = announced => {}
            _ = kick.notified() => {}
            _ = tokio::time::sleep(REREAD) => {}
        }
        let Some(hub) = hub.upgrade() else { return };
        if let Err(e) = hub.follow_feed().await {
            warn!("cannot read the shared feed: {e}");
        }
    }
}

impl Hub {
    /// Reads the feed's head and what was committed up to it; marks the cached
    /// documents other relays committed to as stale; then moves the stable sequence.
    async fn follow_feed(&self) -> Result<(), Error> {
        let known = self.followed.load(Ordering::Acquire);
        let read = match self
            .storage
            .committed_feed_chunks_async(known, CHUNKS_WITH_AT_MOST)
        {
            Some(read) => read.await?,
            None => {
                self.blocking(move |s| s.committed_feed_chunks(known, CHUNKS_WITH_AT_MOST))
                    .await?
            }
        };
        self.advance_followed(known, &read.entries, read.head, read.chunks);
        Ok(())
    }

    /// This relay's own commit `seq` of `doc` is flushed. When the follower already
    /// took every lower sequence into account, nothing another relay committed lies
    /// below it: the stable sequence moves at once, without the follower's read of the
    /// feed (a round trip to the database on the live path). Otherwise the follower,
    /// woken by the flush, reads what lies between.
    pub(super) fn own_commit_flushed(&self, seq: u64, doc: &DocId) {
        // The one entry is this relay's own (its document's slot includes it): no
        // chunk of another relay is missing from the window.
        if self.followed.load(Ordering::Acquire) + 1 == seq
            && self.advance_followed(seq - 1, &[(seq, doc.clone())], seq, Some(Vec::new()))
        {
            self.stats.stable_at_once.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes the feed's entries after `known` up to `head` into account: marks the
    /// cached documents other relays committed to as stale (handing them the chunks
    /// read with the entries, `chunks` in the entries' order, where every one needed
    /// came), keeps the entries for catch-ups, then moves the stable sequence and wakes
    /// the sessions concerned. One step at a time (under the recent entries' lock):
    /// the follower's read and a relay's own flushed commit may both bring the same
    /// entries. Returns whether it moved.
    fn advance_followed(
        &self,
        known: u64,
        entries: &[(u64, DocId)],
        head: u64,
        chunks: Option<Vec<crate::storage::ChunkAndHeads>>,
    ) -> bool {
        let mut recent = self.recent.lock().expect("recent lock");
        let now = self.followed.load(Ordering::Acquire);
        if head <= now || known > now {
            // Already taken (the other path was first), or entries are missing below.
            return false;
        }
        let mut chunks: Option<Vec<Option<_>>> = chunks.map(|c| c.into_iter().map(Some).collect());
        let mut by_doc: HashMap<&DocId, Vec<Commit>> = HashMap::new();
        for (i, (seq, doc)) in entries.iter().enumerate() {
            if *seq > now {
                let chunk = chunks
                    .as_mut()
                    .and_then(|c| c.get_mut(i))
                    .and_then(Option::take)
                    .map(|(bytes, heads)| (Arc::new(bytes), heads));
                by_doc.entry(doc).or_default().push((*seq, chunk));
            }
        }
        {
            let slots = self.slots.lock().expect("hub lock");
            for (id, slot) in slots.iter() {
                let included = slot.included.load(Ordering::Acquire);
                let others: Vec<Commit> = by_doc
                    .get_mut(id)
                    .map(|all| {
                        std::mem::take(all)
                            .into_iter()
                            .filter(|(seq, _)| *seq > included)
                            .collect()
                    })
                    .unwrap_or_default();
                let mine = others
                    .iter()
                    .map(|(seq, c)| c.as_ref().map(|(b, h)| (*seq, b.clone(), h.clone())))
                    .collect::<Option<Vec<_>>>();
                slot.others
                    .lock()
                    .expect("others lock")
                    .extend(now, head, mine);
                if !others.is_empty() {
                    slot.stale.store(true, Ordering::Release);
                }
            }
        }
        let fresh: Vec<(u64, DocId)> = entries.iter().filter(|(s, _)| *s > now).cloned().collect();
        recent.extend(now, &fresh, head);
        self.followed.store(head, Ordering::Release);
        drop(recent);
        self.stable.send_if_modified(|v| {
            let forward = head > *v;
            if forward {
                *v = head;
            }
            forward
        });
        self.fanout.committed(fresh.iter().map(|(_, d)| d));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(i: u64) -> DocId {
        DocId::parse(&format!("households/zone-{i}")).unwrap()
    }

    fn read(from: u64, to: u64) -> Vec<(u64, DocId)> {
        (from..=to).map(|s| (s, doc(s))).collect()
    }

    #[test]
    fn recent_entries_answer_windows_inside_them_only() {
        let mut r = Recent::new(10);
        assert_eq!(r.window(10, 11), None, "nothing kept yet");
        r.extend(10, &read(11, 14), 14);
        r.extend(14, &read(15, 15), 15);
        assert_eq!(r.window(10, 15), Some(read(11, 15)));
        assert_eq!(r.window(12, 14), Some(read(13, 14)));
        assert_eq!(r.window(15, 15), Some(Vec::new()));
        assert_eq!(r.window(9, 15), None, "starts before what is kept");
        assert_eq!(r.window(12, 16), None, "ends after what is kept");
    }

    /// A catch-up picks the entries of its window by document and parsed kind.
    #[test]
    fn a_window_is_selected_by_document_kind() {
        let mut r = Recent::new(0);
        let mut read: Vec<(u64, DocId)> = (1..=4).map(|s| (s, doc(s))).collect();
        read.push((5, DocId::parse("ledger/team-1/2026-12-01").unwrap()));
        r.extend(0, &read, 5);
        let ledgers = r.select(0, 5, |_, kind| matches!(kind, DocKind::Ledger(..)));
        assert_eq!(ledgers, Some(read[4..].to_vec()));
        let zone_two = r.select(1, 4, |d, _| *d == doc(2));
        assert_eq!(zone_two, Some(vec![(2, doc(2))]));
        assert_eq!(r.select(0, 6, |_, _| true), None, "past what is kept");
    }

    #[test]
    fn a_gap_or_a_jump_starts_over_after_the_head() {
        let mut r = Recent::new(0);
        r.extend(0, &read(1, 3), 3);
        // Read from another point than where the entries end: start over.
        r.extend(5, &read(6, 7), 7);
        assert_eq!(r.window(0, 3), None);
        assert_eq!(r.window(5, 7), Some(read(6, 7)));
        // A read with a hole in it (never on a gap-free feed): keep nothing of it.
        let mut holed = read(8, 8);
        holed.push((10, doc(10)));
        r.extend(7, &holed, 10);
        assert_eq!(r.window(7, 8), None);
        assert_eq!(r.window(10, 10), Some(Vec::new()));
        r.extend(10, &read(11, 11), 11);
        assert_eq!(r.window(10, 11), Some(read(11, 11)));
    }

    #[test]
    fn recent_entries_are_bounded() {
        let mut r = Recent::new(0);
        let n = RECENT_ENTRIES as u64 + 10;
        r.extend(0, &read(1, n), n);
        assert_eq!(r.entries.len(), RECENT_ENTRIES);
        assert_eq!(r.window(0, n), None);
        assert_eq!(r.window(10, n).map(|w| w.len()), Some(RECENT_ENTRIES));
    }
}
