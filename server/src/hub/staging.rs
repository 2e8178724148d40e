//! Who writes each unfinished upload.
//!
//! A device whose connection is cut opens a new one and resumes its upload from the
//! offset the relay holds. The old connection's upload task may still be between two
//! pieces when that happens; two writers of one upload would each believe a different
//! offset. So one stream owns an upload key at a time: the one of the device's latest
//! connection ([`Arrival`]). A stream of a later connection takes the upload over, and
//! the older one finds it no longer owns the key at its next step and stops without
//! writing. A stream of an *earlier* connection than the owner's is stale (the cut
//! connection's frames came late: lost packets resent after the next connection's) and
//! takes nothing. Among streams of one connection, the newest takes the upload over.
//!
//! Callers hold the hub's staging lock around each step (take over, then read the held
//! length; check ownership, then store a piece), so "check, then write" is one step.

use std::collections::HashMap;

/// Which of a device's connections is later: the device's own attempt number when it
/// says one (the hello's `HELLO_ATTEMPT`; 0 when it does not), then the order in which
/// the relay accepted the connections. A device opens its next connection only once the
/// last one's handshake finished or failed, so the relay saw the first packet of every
/// connection that can carry a hello in the device's order; the hello itself may come
/// late. Compared field by field, in this order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Arrival {
    /// The device's attempt number.
    pub attempt: u64,
    /// The relay's count of connections accepted when this one came in.
    pub accepted: u64,
}

/// The current owner of each upload key in progress. Pure bookkeeping, no IO.
#[derive(Debug, Default)]
pub struct Staging {
    /// Key → (ticket, its stream's connection).
    owners: HashMap<Vec<u8>, (u64, Arrival)>,
    issued: u64,
}

impl Staging {
    /// Makes a new ticket the owner of `key` for a stream of the connection `arrival`,
    /// superseding any earlier owner; `None` when the owner's connection is a later one
    /// (this stream is stale).
    pub fn take_over(&mut self, key: &[u8], arrival: Arrival) -> Option<u64> {
        if self.owners.get(key).is_some_and(|(_, a)| *a > arrival) {
            return None;
        }
        self.issued += 1;
        self.owners.insert(key.to_vec(), (self.issued, arrival));
        Some(self.issued)
    }

    /// Whether `ticket` still owns `key`.
    pub fn owns(&self, key: &[u8], ticket: u64) -> bool {
        self.owners.get(key).is_some_and(|(t, _)| *t == ticket)
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

    fn conn(attempt: u64, accepted: u64) -> Arrival {
        Arrival { attempt, accepted }
    }

    #[test]
    fn the_newest_stream_owns_an_upload_and_the_older_one_changes_nothing() {
        let mut s = Staging::default();
        let old = s.take_over(b"phone|a", conn(0, 1)).unwrap();
        assert!(s.owns(b"phone|a", old));
        let new = s.take_over(b"phone|a", conn(0, 1)).unwrap();
        assert!(!s.owns(b"phone|a", old));
        assert!(s.owns(b"phone|a", new));
        // The superseded stream ending does not free the key under the new owner.
        s.release(b"phone|a", old);
        assert!(s.owns(b"phone|a", new));
        let other = s.take_over(b"phone|b", conn(0, 1)).unwrap();
        assert_eq!(s.in_progress(), 2);
        s.release(b"phone|a", new);
        s.release(b"phone|b", other);
        assert_eq!(s.in_progress(), 0);
    }

    #[test]
    fn a_stream_of_an_earlier_connection_arriving_late_takes_nothing() {
        for (first, second, third) in [
            // Phones that number their connections: the relay's order does not matter.
            (conn(10, 7), conn(20, 5), conn(30, 1)),
            // Phones that do not: the order the relay accepted the connections in.
            (conn(0, 5), conn(0, 6), conn(0, 7)),
        ] {
            let mut s = Staging::default();
            // The phone's second connection resumes the upload first...
            let current = s.take_over(b"phone|a", second).unwrap();
            // ...then the cut first connection's delayed stream arrives: it is stale.
            assert_eq!(s.take_over(b"phone|a", first), None);
            assert!(s.owns(b"phone|a", current));
            // A third connection takes over as usual.
            let later = s.take_over(b"phone|a", third).unwrap();
            assert!(!s.owns(b"phone|a", current));
            s.release(b"phone|a", current);
            assert!(s.owns(b"phone|a", later));
            // Once the upload is answered and released, a late stream finds no owner
            // (and, the upload being committed, is answered at once by the relay's
            // check of the heads it holds).
            s.release(b"phone|a", later);
            assert!(s.take_over(b"phone|a", first).is_some());
        }
    }
}
