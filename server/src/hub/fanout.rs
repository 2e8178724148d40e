//! Live fan-out: which sessions a commit concerns.
//!
//! A session registers its subscription once ([`Interest`]). When the stable sequence
//! moves, the hub names the documents that became stable and only the sessions whose
//! subscription covers one of them are woken. Before this, every move woke every live
//! session on the relay, and each caught its device up over a window that mostly held
//! other teams' commits: under steady load (500 phones writing every 10 s) that was
//! 500 wake-ups, catch-ups and `Caught` messages per commit where 16 concern anyone.
//!
//! Each stable move checks every registered session's subscription (a few set lookups
//! each): cheap for hundreds of sessions; tens of thousands on one relay would want an
//! index by team and zone.
//!
//! Nothing is lost by not waking a session: its delivered sequence stays where it was,
//! and its next catch-up (an in-scope commit, any input, a new connection) covers the
//! whole window since, out-of-scope commits included.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redline_proto::message::Coverage;
use redline_proto::{DocId, DocKind};
use tokio::sync::Notify;

/// One session's wake-up: a flag (for drivers that poll) and a notification (for
/// drivers that wait).
#[derive(Debug, Default)]
struct Signal {
    pending: AtomicBool,
    notify: Notify,
}

impl Signal {
    fn raise(&self) {
        self.pending.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

#[derive(Debug)]
struct Watcher {
    coverage: Coverage,
    signal: Arc<Signal>,
}

/// The live sessions' subscriptions.
#[derive(Debug, Default)]
pub struct Fanout {
    next: AtomicU64,
    watchers: Mutex<HashMap<u64, Watcher>>,
}

impl Fanout {
    /// Registers a session that covers `coverage`; it is woken until the returned
    /// [`Interest`] is dropped.
    pub fn register(self: &Arc<Self>, coverage: Coverage) -> Interest {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let signal = Arc::new(Signal::default());
        self.watchers.lock().expect("fanout lock").insert(
            id,
            Watcher {
                coverage,
                signal: signal.clone(),
            },
        );
        Interest {
            fanout: self.clone(),
            id,
            signal,
        }
    }

    /// `docs` were committed (and are stable): wakes every session covering one. Each
    /// document's kind is parsed once, not once per session.
    pub fn committed<'a>(&self, docs: impl Iterator<Item = &'a DocId>) {
        // A follower's read can hold thousands of entries over many documents.
        let mut seen = std::collections::HashSet::new();
        let parsed: Vec<(&DocId, DocKind)> = docs
            .filter(|d| seen.insert(*d))
            .map(|d| (d, d.kind()))
            .collect();
        if parsed.is_empty() {
            return;
        }
        let watchers = self.watchers.lock().expect("fanout lock");
        for w in watchers.values() {
            if parsed.iter().any(|(d, k)| w.coverage.covers_parsed(d, k)) {
                w.signal.raise();
            }
        }
    }

    /// Sessions registered now.
    pub fn len(&self) -> usize {
        self.watchers.lock().expect("fanout lock").len()
    }

    /// Whether no session is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A session's registration with the [`Fanout`]: says when a commit in its
/// subscription became stable. Deregisters when dropped.
#[derive(Debug)]
pub struct Interest {
    fanout: Arc<Fanout>,
    id: u64,
    signal: Arc<Signal>,
}

impl Interest {
    /// Waits until a commit in the subscription became stable since the last call (at
    /// once if one did). Cancel-safe: a wake-up missed by a dropped wait stays pending.
    pub async fn changed(&self) {
        loop {
            if self.take() {
                return;
            }
            self.signal.notify.notified().await;
        }
    }

    /// Whether a commit in the subscription became stable since the last call (clears
    /// it): for drivers that poll.
    pub fn take(&self) -> bool {
        self.signal.pending.swap(false, Ordering::AcqRel)
    }
}

impl Drop for Interest {
    fn drop(&mut self) {
        self.fanout
            .watchers
            .lock()
            .expect("fanout lock")
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redline_proto::message::Subscription;
    use redline_proto::{Day, TeamId};

    fn team_day(team: &str) -> DocId {
        DocId::ledger(
            &TeamId::new(team).unwrap(),
            &Day::new("2026-12-01").unwrap(),
        )
    }

    fn coverage(team: &str) -> Coverage {
        Coverage::new(Subscription {
            teams: vec![TeamId::new(team).unwrap()],
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn only_sessions_covering_a_commit_are_woken() {
        let fanout = Arc::new(Fanout::default());
        let t1 = fanout.register(coverage("t1"));
        let t2 = fanout.register(coverage("t2"));
        let docs = [team_day("t2")];
        fanout.committed(docs.iter());
        assert!(!t1.take(), "another team's commit does not wake t1");
        // The wait returns at once for a wake-up that came before it.
        tokio::time::timeout(std::time::Duration::from_secs(1), t2.changed())
            .await
            .expect("t2 was woken");
        assert!(!t2.take(), "a wake-up is taken once");
        assert_eq!(fanout.len(), 2);
        drop(t1);
        assert_eq!(fanout.len(), 1, "dropping the interest deregisters");
    }

    #[tokio::test]
    async fn a_wait_cancelled_mid_way_keeps_the_wake_up() {
        let fanout = Arc::new(Fanout::default());
        let t1 = fanout.register(coverage("t1"));
        let cancelled =
            tokio::time::timeout(std::time::Duration::from_millis(10), t1.changed()).await;
        assert!(cancelled.is_err(), "nothing committed yet");
        let docs = [team_day("t1")];
        fanout.committed(docs.iter());
        tokio::time::timeout(std::time::Duration::from_secs(1), t1.changed())
            .await
            .expect("the wake-up is still there");
    }
}
