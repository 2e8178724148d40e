//! The day's tally totals per ledger, kept between reads and moved by the patches of
//! the changes that reach the document, so a screen of totals refreshing on every
//! change does not walk every counter of the day again.
//!
//! Automerge works a counter's value out from all its increments on every read: the
//! totals of a day cost more the more the day was counted (Criterion
//! `day_totals_of_5000_increment_day`). Kept totals are valid for the heads they were
//! taken at and only for those: a read first compares heads, so a change this cache
//! was not told about (an import, a whole document merged in, a reload) only means one
//! full read again, never a stale total. A local write or an applied update whose
//! document stood at the kept heads logs its patches and moves the totals by them; a
//! patch that is not a plain tally change (a counter replaced or deleted, a conflict,
//! a device's or member's map replaced) drops them.

use std::collections::HashMap;
use std::sync::Mutex;

use automerge::{Automerge, ChangeHash, Patch, PatchAction, Prop, Value};
use redline_proto::DocId;

use crate::Error;
use crate::ledger::Totals;
use crate::schema::{child_maps, container, numbers, scalar_i64};

/// A tally's counter: device, member, metric.
type CounterKey = (String, String, String);

/// Totals kept for one ledger.
struct Kept {
    heads: Vec<ChangeHash>,
    counters: HashMap<CounterKey, i64>,
    totals: Totals,
}

/// Kept totals per ledger (at most [`KEPT_MAX`] ledgers: the days on screen).
#[derive(Default)]
pub(crate) struct TallyCache {
    kept: Mutex<HashMap<DocId, Kept>>,
    /// Totals read whole so far (the tests count them).
    full_reads: std::sync::atomic::AtomicU64,
}

/// Ledgers whose totals are kept at once; past it, one kept ledger (any) is dropped
/// to make room (it is only read whole again when next asked for).
const KEPT_MAX: usize = 8;

impl TallyCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DocId, Kept>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The totals of `doc` (ledger `id`) as it is: kept ones if they were taken at its
    /// heads, otherwise read whole and kept.
    pub(crate) fn totals(&self, id: &DocId, doc: &Automerge) -> Result<Totals, Error> {
        let heads = doc.get_heads();
        if let Some(k) = self.lock().get(id).filter(|k| k.heads == heads) {
            return Ok(k.totals.clone());
        }
        self.full_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let counters = read_counters(doc)?;
        let mut totals = Totals::new();
        for ((_, _, metric), v) in &counters {
            *totals.entry(metric.clone()).or_insert(0) += v;
        }
        let mut kept = self.lock();
        if kept.len() >= KEPT_MAX && !kept.contains_key(id) {
            let any = kept.keys().next().cloned();
            if let Some(old) = any {
                kept.remove(&old);
            }
        }
        kept.insert(
            id.clone(),
            Kept {
                heads,
                counters,
                totals: totals.clone(),
            },
        );
        Ok(totals)
    }

    /// Whether changes to `id` made on top of `heads` should log their patches: its
    /// totals are kept at exactly those heads.
    pub(crate) fn wants(&self, id: &DocId, heads: &[ChangeHash]) -> bool {
        self.lock().get(id).is_some_and(|k| k.heads == heads)
    }

    /// After a change to `doc` (at `before` until then) made with `log` active (see
    /// [`wants`](Self::wants)): moves the totals kept for `id` by the log's patches.
    pub(crate) fn advance_by(
        &self,
        id: &DocId,
        before: &[ChangeHash],
        doc: &mut automerge::Automerge,
        log: &mut automerge::PatchLog,
    ) {
        let patches = doc.make_patches(log);
        self.advance(id, before, doc.get_heads(), &patches);
    }

    /// Moves the totals kept for `id` at `before` to `after` by `patches` (everything
    /// that changed between them); drops them if they were kept elsewhere or a patch is
    /// not a plain tally change.
    pub(crate) fn advance(
        &self,
        id: &DocId,
        before: &[ChangeHash],
        after: Vec<ChangeHash>,
        patches: &[Patch],
    ) {
        let mut kept = self.lock();
        let Some(k) = kept.get_mut(id).filter(|k| k.heads == before) else {
            return;
        };
        if patches.iter().all(|p| k.apply(p)) {
            k.heads = after;
        } else {
            kept.remove(id);
        }
    }

    /// Totals read whole so far.
    #[cfg(test)]
    pub(crate) fn full_reads(&self) -> u64 {
        self.full_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Ledgers whose totals are kept.
    #[cfg(test)]
    pub(crate) fn kept_len(&self) -> usize {
        self.lock().len()
    }
}

impl Kept {
    /// Applies one patch; `false` if it is not one these totals can follow.
    fn apply(&mut self, p: &Patch) -> bool {
        let path: Vec<&str> = p
            .path
            .iter()
            .map(|(_, prop)| match prop {
                Prop::Map(k) => k.as_str(),
                Prop::Seq(_) => "",
            })
            .collect();
        match (path.as_slice(), &p.action) {
            // Outside the tallies.
            ([first, ..], _) if *first != "tallies" => true,
            ([], PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key }) => {
                key != "tallies"
            }
            (
                [],
                PatchAction::Conflict {
                    prop: Prop::Map(key),
                },
            ) => key != "tallies",
            ([], _) => true,
            // A device's map (tallies/<device>) created.
            (
                ["tallies"],
                PatchAction::PutMap {
                    key,
                    value,
                    conflict,
                },
            ) => !conflict && is_map(&value.0) && !self.any(|(d, _, _)| d == key),
            // A member's map (tallies/<device>/<member>) created.
            (
                ["tallies", device],
                PatchAction::PutMap {
                    key,
                    value,
                    conflict,
                },
            ) => !conflict && is_map(&value.0) && !self.any(|(d, m, _)| d == device && m == key),
            // A counter incremented.
            (
                ["tallies", device, member],
                PatchAction::Increment {
                    prop: Prop::Map(metric),
                    value,
                },
            ) => {
                let key = (device.to_string(), member.to_string(), metric.clone());
                match self.counters.get_mut(&key) {
                    Some(c) => {
                        *c += value;
                        *self.totals.entry(metric.clone()).or_insert(0) += value;
                        true
                    }
                    None => false,
                }
            }
            // A counter (or number) put where there was none.
            (
                ["tallies", device, member],
                PatchAction::PutMap {
                    key,
                    value,
                    conflict,
                },
            ) => {
                let counter = (device.to_string(), member.to_string(), key.clone());
                if *conflict || self.counters.contains_key(&counter) {
                    return false;
                }
                let Value::Scalar(s) = &value.0 else {
                    return false;
                };
                if let Some(n) = scalar_i64(s) {
                    *self.totals.entry(key.clone()).or_insert(0) += n;
                    self.counters.insert(counter, n);
                }
                true
            }
            _ => false,
        }
    }

    fn any(&self, f: impl Fn(&(String, String, String)) -> bool) -> bool {
        self.counters.keys().any(f)
    }
}

fn is_map(v: &Value<'_>) -> bool {
    matches!(v, Value::Object(automerge::ObjType::Map))
}

/// Every tally counter of a ledger document (what [`crate::ledger::tally_totals`] sums).
fn read_counters(doc: &Automerge) -> Result<HashMap<CounterKey, i64>, Error> {
    let mut out = HashMap::new();
    for (device, per_device) in child_maps(doc, &container(doc, "tallies")?)? {
        for (member, counters) in child_maps(doc, &per_device)? {
            for (metric, v) in numbers(doc, &counters) {
                out.insert((device.clone(), member.clone(), metric), v);
            }
        }
    }
    Ok(out)
}

/// The totals of `doc` read whole (what kept totals must always equal).
#[cfg(test)]
fn read_totals(doc: &Automerge) -> Totals {
    crate::ledger::tally_totals(doc).expect("a ledger").0
}

#[cfg(test)]
#[path = "totals_tests.rs"]
mod tests;
