//! Feed sequence numbers and the stable watermark, without IO.
//!
//! Every commit takes the next sequence number before it is written and finishes it
//! after its flush (or its failure). The *stable* sequence is the highest one below
//! which no commit is still in flight: devices are only ever told about stable
//! sequences, so a cursor never skips a commit that a slower writer finishes later.
//! A sequence whose write failed leaves a gap in the stored feed; a gap holds nothing,
//! so skipping it loses nothing.

use std::collections::BTreeSet;

/// Sequence allocation and the stable watermark.
#[derive(Debug)]
pub struct Feed {
    next: u64,
    in_flight: BTreeSet<u64>,
    stable: u64,
}

impl Feed {
    /// A feed whose highest stored sequence is `last` (0: empty).
    pub fn new(last: u64) -> Self {
        Self {
            next: last + 1,
            in_flight: BTreeSet::new(),
            stable: last,
        }
    }

    /// Takes the next sequence number for a commit about to be written.
    pub fn begin(&mut self) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.in_flight.insert(seq);
        seq
    }

    /// The commit with `seq` is durable (or failed): returns the new stable sequence if
    /// it moved.
    pub fn finish(&mut self, seq: u64) -> Option<u64> {
        self.in_flight.remove(&seq);
        let stable = match self.in_flight.first() {
            Some(lowest) => lowest - 1,
            None => self.next - 1,
        };
        (stable > self.stable).then(|| {
            self.stable = stable;
            stable
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

    #[test]
    fn the_watermark_waits_for_the_slowest_commit() {
        let mut f = Feed::new(10);
        let (a, b, c) = (f.begin(), f.begin(), f.begin());
        assert_eq!((a, b, c), (11, 12, 13));
        assert_eq!(f.finish(c), None, "11 and 12 are still in flight");
        assert_eq!(f.finish(a), Some(11));
        assert_eq!(f.finish(b), Some(13), "12 done: 13 was done already");
        assert_eq!(f.stable(), 13);
        assert_eq!(f.last(), 13);
    }

    proptest! {
        /// Whatever order commits finish in, the stable sequence never passes one still
        /// in flight, never goes back, and reaches the last one when all are done.
        #[test]
        fn stable_never_passes_a_commit_in_flight(order in Just((0..40u64).collect::<Vec<_>>()).prop_shuffle()) {
            let mut f = Feed::new(0);
            let seqs: Vec<u64> = (0..40).map(|_| f.begin()).collect();
            let mut done = std::collections::BTreeSet::new();
            let mut last_stable = 0;
            for i in order {
                let seq = seqs[i as usize];
                let moved = f.finish(seq);
                done.insert(seq);
                let stable = f.stable();
                prop_assert!(stable >= last_stable);
                prop_assert_eq!(moved.is_some(), stable > last_stable);
                prop_assert!((1..=stable).all(|s| done.contains(&s)));
                last_stable = stable;
            }
            prop_assert_eq!(f.stable(), 40);
        }
    }
}
