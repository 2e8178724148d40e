//! Who writes each unfinished upload.
//!
//! A device whose connection is cut opens a new one and resumes its upload from the
//! offset the relay holds. The old connection's upload task may still be between two
//! pieces when that happens; two writers of one upload would each believe a different
//! offset. So the newest stream for an upload key takes it over: the older one finds it
//! no longer owns the key at its next step and stops without writing.
//!
//! Callers hold the hub's staging lock around each step (take over, then read the held
//! length; check ownership, then store a piece), so "check, then write" is one step.

use std::collections::HashMap;

/// The current owner of each upload key in progress. Pure bookkeeping, no IO.
#[derive(Debug, Default)]
pub struct Staging {
    owners: HashMap<Vec<u8>, u64>,
    issued: u64,
}

impl Staging {
    /// Makes a new ticket the owner of `key`, superseding any earlier one.
    pub fn take_over(&mut self, key: &[u8]) -> u64 {
        self.issued += 1;
        self.owners.insert(key.to_vec(), self.issued);
        self.issued
    }

    /// Whether `ticket` still owns `key`.
    pub fn owns(&self, key: &[u8], ticket: u64) -> bool {
        self.owners.get(key) == Some(&ticket)
    }

    /// Gives `key` up, if `ticket` still owns it (a superseded ticket changes nothing).
    pub fn release(&mut self, key: &[u8], ticket: u64) {
        if self.owns(key, ticket) {
            self.owners.remove(key);
        }
    }

    /// Upload keys with an owner now.
    pub fn in_progress(&self) -> usize {
        self.owners.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_stream_owns_an_upload_and_the_older_one_changes_nothing() {
        let mut s = Staging::default();
        let old = s.take_over(b"phone|a");
        assert!(s.owns(b"phone|a", old));
        let new = s.take_over(b"phone|a");
        assert!(!s.owns(b"phone|a", old));
        assert!(s.owns(b"phone|a", new));
        // The superseded stream ending does not free the key under the new owner.
        s.release(b"phone|a", old);
        assert!(s.owns(b"phone|a", new));
        let other = s.take_over(b"phone|b");
        assert_eq!(s.in_progress(), 2);
        s.release(b"phone|a", new);
        s.release(b"phone|b", other);
        assert_eq!(s.in_progress(), 0);
    }
}
