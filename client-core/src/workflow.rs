//! Workflow status of tasks and needs, as entries with a derived current status.
//!
//! Devices never overwrite a status field: each change of status is an entry
//! `{to, epoch, by, device, at}` under a fresh key in the item's `status_log`. The current
//! status is a pure function of the *set* of entries, so every replica that holds the same
//! entries derives the same status, whatever order they merged in.
//!
//! **The rule.** Statuses are ranked
//! `open/requested (0) < assigned (1) < in_progress (2) < cancelled (3) < done/fulfilled (4)`.
//! A `reopen` entry starts a new *epoch* (one more than the highest epoch its writer saw).
//! The current status is the highest-ranked entry of the highest epoch; if that epoch has
//! only the reopen, the status is back to open. Consequences:
//! - status never regresses by merge order: an in-progress entry that arrives late does not
//!   undo `done`;
//! - done and cancelled written concurrently give **done** on every replica (work that was
//!   actually done is a fact; cancel it afterwards by reopening and cancelling);
//! - a reopen wins over anything written concurrently in the epoch it closes;
//! - the deciding entry (who, when) is the earliest of the highest rank, ties broken by key.

use automerge::transaction::{Transactable, Transaction};
use automerge::{ObjId, ObjType, ReadDoc, ScalarValue};

use crate::Error;
use crate::schema::{Writer, child_maps, get_i64, get_str, new_key};

/// A workflow's statuses.
pub trait Stage: Copy + Eq + Ord + std::fmt::Debug + 'static {
    /// The status a new or reopened item has.
    const INITIAL: Self;
    /// Name in documents and APIs.
    fn as_str(self) -> &'static str;
    /// Parses a name.
    fn parse(s: &str) -> Option<Self>;
    /// Position in the lattice.
    fn rank(self) -> u8;
    /// True for the terminal statuses (done/fulfilled, cancelled).
    fn is_closed(self) -> bool {
        self.rank() >= 3
    }
    /// Every status, in rank order.
    fn all() -> &'static [Self];
}

macro_rules! stage_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = ($s:literal, $r:literal)),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl Stage for $name {
            const INITIAL: Self = stage_enum!(@first $($v),+);
            fn as_str(self) -> &'static str { match self { $(Self::$v => $s),+ } }
            fn parse(s: &str) -> Option<Self> { match s { $($s => Some(Self::$v),)+ _ => None } }
            fn rank(self) -> u8 { match self { $(Self::$v => $r),+ } }
            fn all() -> &'static [Self] { &[$(Self::$v),+] }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }
        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::parse(s).ok_or_else(|| Error::Invalid(format!(
                    "unknown status {s:?}: use one of {}",
                    Self::all().iter().map(|x| x.as_str()).collect::<Vec<_>>().join(", ")
                )))
            }
        }
    };
    (@first $first:ident $(, $rest:ident)*) => { Self::$first };
}

stage_enum!(
    /// Status of a task in a team's ledger.
    TaskStatus {
        /// Created, nobody on it yet.
        Open = ("open", 0),
        /// Someone is assigned.
        Assigned = ("assigned", 1),
        /// Work has started.
        InProgress = ("in_progress", 2),
        /// Called off.
        Cancelled = ("cancelled", 3),
        /// Finished.
        Done = ("done", 4),
    }
);

stage_enum!(
    /// Status of a household's need.
    NeedStatus {
        /// Recorded, nobody on it yet.
        Requested = ("requested", 0),
        /// Someone is assigned.
        Assigned = ("assigned", 1),
        /// Being handled.
        InProgress = ("in_progress", 2),
        /// No longer needed or not possible.
        Cancelled = ("cancelled", 3),
        /// Delivered / done.
        Fulfilled = ("fulfilled", 4),
    }
);

/// What a status entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition<S> {
    /// Move to a status.
    To(S),
    /// Reopen a closed item (new epoch).
    Reopen,
}

/// One recorded status change.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StatusEntry {
    /// The status written, or `reopen`.
    pub to: String,
    /// Epoch of the entry.
    pub epoch: u64,
    /// Member who wrote it.
    pub by: String,
    /// Device it was written on.
    pub device: String,
    /// When (unix ms, device clock).
    pub at: i64,
    /// Entry key (tie-breaker).
    pub key: String,
}

/// The derived status and the entry that decided it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Derived<S> {
    /// Current status.
    pub status: S,
    /// Current epoch (number of reopens seen, at least).
    pub epoch: u64,
    /// The deciding entry, if any (none for a never-touched item).
    pub decided_by: Option<StatusEntry>,
}

/// Reads every entry of a status log, sorted by (epoch, at, key).
pub(crate) fn entries<R: ReadDoc>(doc: &R, log: &ObjId) -> Result<Vec<StatusEntry>, Error> {
    let mut out = Vec::new();
    for (key, e) in child_maps(doc, log)? {
        out.push(StatusEntry {
            to: get_str(doc, &e, "to")?.unwrap_or_default(),
            epoch: get_i64(doc, &e, "epoch")?
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(0),
            by: get_str(doc, &e, "by")?.unwrap_or_default(),
            device: get_str(doc, &e, "device")?.unwrap_or_default(),
            at: get_i64(doc, &e, "at")?.unwrap_or(0),
            key,
        });
    }
    out.sort_by(|a, b| (a.epoch, a.at, &a.key).cmp(&(b.epoch, b.at, &b.key)));
    Ok(out)
}

/// Applies the rule to a set of entries. Entries naming unknown statuses (from a newer
/// schema) are ignored.
pub fn derive<S: Stage>(entries: &[StatusEntry]) -> Derived<S> {
    let epoch = entries.iter().map(|e| e.epoch).max().unwrap_or(0);
    let mut best: Option<(S, &StatusEntry)> = None;
    for e in entries.iter().filter(|e| e.epoch == epoch) {
        let Some(s) = S::parse(&e.to) else { continue };
        let better = match &best {
            None => true,
            Some((b, be)) => {
                s.rank() > b.rank() || (s.rank() == b.rank() && (e.at, &e.key) < (be.at, &be.key))
            }
        };
        if better {
            best = Some((s, e));
        }
    }
    match best {
        Some((status, e)) => Derived {
            status,
            epoch,
            decided_by: Some(e.clone()),
        },
        None => Derived {
            status: S::INITIAL,
            epoch,
            decided_by: entries.iter().rev().find(|e| e.epoch == epoch).cloned(),
        },
    }
}

/// Records a transition in `log`, after checking it makes sense from the current status.
pub(crate) fn record<S: Stage>(
    tx: &mut Transaction<'_>,
    log: &ObjId,
    w: &Writer<'_>,
    what: &str,
    transition: Transition<S>,
) -> Result<(), Error> {
    let current: Derived<S> = derive(&entries(tx, log)?);
    let (to, epoch) = match transition {
        Transition::Reopen => {
            if !current.status.is_closed() {
                return Err(Error::Invalid(format!(
                    "{what} is {}, not closed: only done or cancelled items can be reopened",
                    current.status.as_str()
                )));
            }
            ("reopen", current.epoch + 1)
        }
        Transition::To(s) => {
            if s == S::INITIAL {
                return Err(Error::Invalid(format!(
                    "{what} cannot be set back to {}; reopen it instead",
                    s.as_str()
                )));
            }
            if current.status.is_closed() {
                return Err(Error::Invalid(format!(
                    "{what} is {}; reopen it before changing its status",
                    current.status.as_str()
                )));
            }
            if s.rank() < current.status.rank() {
                return Err(Error::Invalid(format!(
                    "{what} is {}; its status does not go back to {}",
                    current.status.as_str(),
                    s.as_str()
                )));
            }
            (s.as_str(), current.epoch)
        }
    };
    let e = tx.put_object(log, new_key().as_str(), ObjType::Map)?;
    tx.put(&e, "to", to)?;
    tx.put(&e, "epoch", epoch)?;
    tx.put(&e, "by", w.member.as_str())?;
    tx.put(&e, "device", w.device.as_str())?;
    tx.put(&e, "at", ScalarValue::Timestamp(w.now_ms))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(to: &str, epoch: u64, at: i64, key: &str) -> StatusEntry {
        StatusEntry {
            to: to.into(),
            epoch,
            by: "m".into(),
            device: "d".into(),
            at,
            key: key.into(),
        }
    }

    #[test]
    fn done_beats_a_concurrent_cancel_in_any_order() {
        let mut entries = vec![
            e("assigned", 0, 1, "a"),
            e("done", 0, 5, "b"),
            e("cancelled", 0, 4, "c"),
        ];
        for _ in 0..3 {
            entries.rotate_left(1);
            assert_eq!(derive::<TaskStatus>(&entries).status, TaskStatus::Done);
        }
    }

    #[test]
    fn a_late_in_progress_does_not_undo_done() {
        let entries = vec![e("done", 0, 5, "a"), e("in_progress", 0, 9, "b")];
        assert_eq!(derive::<TaskStatus>(&entries).status, TaskStatus::Done);
    }

    #[test]
    fn reopen_starts_a_new_epoch() {
        let mut entries = vec![e("done", 0, 5, "a"), e("reopen", 1, 6, "b")];
        assert_eq!(derive::<NeedStatus>(&entries).status, NeedStatus::Requested);
        entries.push(e("assigned", 1, 7, "c"));
        let d = derive::<NeedStatus>(&entries);
        assert_eq!((d.status, d.epoch), (NeedStatus::Assigned, 1));
        // A done written concurrently with the reopen stays in the old epoch.
        entries.push(e("fulfilled", 0, 8, "d"));
        assert_eq!(derive::<NeedStatus>(&entries).status, NeedStatus::Assigned);
    }

    #[test]
    fn unknown_statuses_from_newer_builds_are_ignored() {
        let entries = vec![e("assigned", 0, 1, "a"), e("escalated", 0, 2, "b")];
        assert_eq!(derive::<TaskStatus>(&entries).status, TaskStatus::Assigned);
    }
}
