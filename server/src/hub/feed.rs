//! Feed sequence numbers and the stable watermark, without IO.
//!
//! Every commit takes the next sequence number before it is written and finishes it
//! after its flush (or its failure). The *stable* sequence is the highest one below
//! which no commit is still in flight: devices are only ever told about stable
//! sequences, so a cursor never skips a commit that a slower writer finishes later.
//! A sequence whose write failed leaves a gap in the stored feed; a gap holds nothing,
//! so skipping it loses nothing.

use std::collections::BTreeMap;

use redline_proto::DocId;

/// Where a sequence handed out stands.
#[derive(Debug)]
enum Entry {
    /// Being written, for this document.
    InFlight(DocId),
    /// Durable, not yet stable (a lower sequence is still in flight).
    Written(DocId),
    /// Its write failed: a gap.
    Failed,
}

/// The stable sequence moved: from where, to where, and the documents committed in
/// between (in sequence order; a failed sequence lists nothing).
#[derive(Debug, PartialEq, Eq)]
pub struct Stabilized {
    /// The stable sequence before.
    pub from: u64,
    /// The stable sequence now.
    pub stable: u64,
    /// The commits that became stable: sequence and document.
    pub entries: Vec<(u64, DocId)>,
}

/// Sequence allocation and the stable watermark.
#[derive(Debug)]
pub struct Feed {
    next: u64,
    pending: BTreeMap<u64, Entry>,
    stable: u64,
}

impl Feed {
    /// A feed whose highest stored sequence is `last` (0: empty).
    pub fn new(last: u64) -> Self {
        Self {
            next: last + 1,
            pending: BTreeMap::new(),
            stable: last,
        }
    }

    /// Takes the next sequence number for a commit of `doc` about to be written.
    pub fn begin(&mut self, doc: DocId) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.pending.insert(seq, Entry::InFlight(doc));
        seq
    }

    /// The commit with `seq` is durable (`written`) or failed: what became stable, if
    /// the stable sequence moved.
    pub fn finish(&mut self, seq: u64, written: bool) -> Option<Stabilized> {
        if let Some(entry) = self.pending.get_mut(&seq) {
            let now = match std::mem::replace(entry, Entry::Failed) {
                Entry::InFlight(doc) if written => Entry::Written(doc),
                _ => Entry::Failed,
            };
            *entry = now;
        }
        let from = self.stable;
        let mut entries = Vec::new();
        while let Some(first) = self.pending.first_entry() {
            if matches!(first.get(), Entry::InFlight(_)) {
                break;
            }
            let (seq, entry) = first.remove_entry();
            if let Entry::Written(doc) = entry {
                entries.push((seq, doc));
            }
            self.stable = seq;
        }
        (self.stable > from).then_some(Stabilized {
            from,
            stable: self.stable,
            entries,
        })
    }

    /// The highest sequence below which every commit is finished.
    pub fn stable(&self) -> u64 {
        self.stable
    }

    /// The highest sequence handed out.
    pub fn last(&self) -> u64 {
        self.next - 1
    }

    /// The sequence the next commit will take.
    pub fn next(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn doc(i: u64) -> DocId {
        DocId::parse(&format!("households/zone-{i}")).unwrap()
    }

    #[test]
    fn the_watermark_waits_for_the_slowest_commit() {
        let mut f = Feed::new(10);
        let (a, b, c) = (f.begin(doc(1)), f.begin(doc(2)), f.begin(doc(3)));
        assert_eq!((a, b, c), (11, 12, 13));
        assert_eq!(f.finish(c, true), None, "11 and 12 are still in flight");
        assert_eq!(
            f.finish(a, true),
            Some(Stabilized {
                from: 10,
                stable: 11,
                entries: vec![(11, doc(1))]
            })
        );
        assert_eq!(
            f.finish(b, false),
            Some(Stabilized {
                from: 11,
                stable: 13,
                entries: vec![(13, doc(3))]
            }),
            "12 failed (a gap, no entry): 13 was done already"
        );
        assert_eq!(f.stable(), 13);
        assert_eq!(f.last(), 13);
    }

    proptest! {
        /// Whatever order commits finish in (some failing), the stable sequence never
        /// passes one still in flight, never goes back, and reaches the last one when
        /// all are done; every written commit becomes stable exactly once, in order, and
        /// no failed one does.
        #[test]
        fn stable_never_passes_a_commit_in_flight(
            order in Just((0..40u64).collect::<Vec<_>>()).prop_shuffle(),
            failing in proptest::collection::hash_set(0..40u64, 0..5),
        ) {
            let mut f = Feed::new(0);
            let seqs: Vec<u64> = (0..40).map(|i| f.begin(doc(i))).collect();
            let mut done = std::collections::BTreeSet::new();
            let mut last_stable = 0;
            let mut stabilized = Vec::new();
            for i in order {
                let seq = seqs[i as usize];
                let moved = f.finish(seq, !failing.contains(&i));
                done.insert(seq);
                let stable = f.stable();
                prop_assert!(stable >= last_stable);
                prop_assert_eq!(moved.is_some(), stable > last_stable);
                if let Some(m) = moved {
                    prop_assert_eq!((m.from, m.stable), (last_stable, stable));
                    stabilized.extend(m.entries);
                }
                prop_assert!((1..=stable).all(|s| done.contains(&s)));
                last_stable = stable;
            }
            prop_assert_eq!(f.stable(), 40);
            let written: Vec<(u64, DocId)> = (0..40)
                .filter(|i| !failing.contains(i))
                .map(|i| (seqs[i as usize], doc(i)))
                .collect();
            prop_assert_eq!(stabilized, written);
        }
    }
}
