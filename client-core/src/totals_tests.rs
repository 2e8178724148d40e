//! Kept totals always equal totals read whole, and follow changes without reading whole.

use automerge::transaction::Transactable;
use automerge::{ActorId, ChangeHash, ReadDoc, ScalarValue};
use redline_proto::{Day, DocId, MemberId, TeamId};

use super::read_totals;
use crate::{Client, ClientConfig, NewTask, TaskKind};

fn team() -> TeamId {
    TeamId::new("team-1").unwrap()
}

fn day() -> Day {
    Day::new("2026-12-01").unwrap()
}

fn phone(dir: &std::path::Path, member: &str) -> Client {
    Client::open(dir, ClientConfig::new(MemberId::new(member).unwrap())).unwrap()
}

/// The client's totals, checked against a whole read of its copy.
fn checked_totals(c: &Client) -> crate::ledger::Totals {
    let kept = c.day_totals(&team(), &day()).unwrap();
    let id = DocId::ledger(&team(), &day());
    let whole = c.read(&id, |d| Ok(read_totals(d))).unwrap().unwrap();
    assert_eq!(kept, whole, "kept totals differ from a whole read");
    kept
}

/// The changes of `from` after `since`, as the relay would bundle them.
fn bundle_after(from: &Client, since: &[ChangeHash]) -> Vec<u8> {
    let id = DocId::ledger(&team(), &day());
    let doc = from.document(&id).unwrap().unwrap();
    let hashes: Vec<ChangeHash> = doc.get_changes(since).iter().map(|c| c.hash()).collect();
    doc.bundle(hashes).unwrap().bytes().to_vec()
}

#[test]
fn kept_totals_follow_local_writes_without_reading_whole() {
    let dir = tempfile::tempdir().unwrap();
    let c = phone(dir.path(), "ana");
    c.add_to_tally(&team(), &day(), "screened", 3).unwrap();
    assert_eq!(checked_totals(&c)["screened"], 3);
    let reads = c.inner.tallies.full_reads();
    for i in 0..30u32 {
        match i % 5 {
            0 => c.add_to_tally(&team(), &day(), "screened", 1).unwrap(),
            1 => c
                .add_to_tally(&team(), &day(), &format!("metric_{}", i % 3), i + 1)
                .unwrap(),
            2 => {
                c.add_task(&team(), &day(), NewTask::new(TaskKind::Supply, "water"))
                    .unwrap();
            }
            3 => c.check_in(&team(), &day()).unwrap(),
            _ => c.add_to_tally(&team(), &day(), "deliveries", 2).unwrap(),
        }
        checked_totals(&c);
    }
    assert_eq!(checked_totals(&c)["screened"], 3 + 6);
    // The whole reads above are the test's own (`read_totals`), not the cache's.
    assert_eq!(
        c.inner.tallies.full_reads(),
        reads,
        "every write followed by patches"
    );
}

#[test]
fn kept_totals_follow_a_teammates_updates_and_a_whole_document_reads_again() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (phone(a_dir.path(), "ana"), phone(b_dir.path(), "ben"));
    let id = DocId::ledger(&team(), &day());
    a.add_to_tally(&team(), &day(), "screened", 5).unwrap();
    b.import(&id, &bundle_after(&a, &[])).unwrap();
    b.add_to_tally(&team(), &day(), "screened", 1).unwrap();
    assert_eq!(checked_totals(&b)["screened"], 6);
    let reads = b.inner.tallies.full_reads();
    for round in 0..10u32 {
        let since = a.heads(&id).unwrap();
        a.add_to_tally(&team(), &day(), "screened", round + 1)
            .unwrap();
        a.add_to_tally(&team(), &day(), "samples_taken", 1).unwrap();
        assert_eq!(b.import(&id, &bundle_after(&a, &since)).unwrap(), 2);
        checked_totals(&b);
    }
    assert_eq!(checked_totals(&b)["screened"], 6 + 55);
    assert_eq!(
        b.inner.tallies.full_reads(),
        reads,
        "updates followed by patches"
    );
    // A whole document merged in is not followed: the next read reads whole.
    a.add_to_tally(&team(), &day(), "screened", 100).unwrap();
    a.add_to_tally(&team(), &day(), "samples_taken", 1).unwrap();
    let saved = a.document(&id).unwrap().unwrap().save();
    assert_eq!(b.import(&id, &saved).unwrap(), 2, "the changes new to b");
    assert_eq!(
        b.import(&id, &saved).unwrap(),
        0,
        "nothing new the second time"
    );
    assert_eq!(checked_totals(&b)["screened"], 161);
    assert_eq!(b.inner.tallies.full_reads(), reads + 1);
}

#[test]
fn a_counter_put_over_or_deleted_drops_the_kept_totals() {
    let dir = tempfile::tempdir().unwrap();
    let b = phone(dir.path(), "ben");
    let id = DocId::ledger(&team(), &day());
    b.add_to_tally(&team(), &day(), "screened", 4).unwrap();
    // Another install writes over b's counter and deletes one (not what Redline's own
    // writes do; a foreign or old client could).
    let mut other = b.document(&id).unwrap().unwrap();
    other.set_actor(ActorId::from(&b"other-install"[..]));
    let before = other.get_heads();
    {
        let tallies = crate::schema::container(&other, "tallies").unwrap();
        let (_, device) = other
            .map_range(&tallies, ..)
            .next()
            .map(|m| (m.key.to_string(), m.id()))
            .unwrap();
        let (_, member) = other
            .map_range(&device, ..)
            .next()
            .map(|m| (m.key.to_string(), m.id()))
            .unwrap();
        let mut tx = other.transaction();
        tx.put(&member, "screened", ScalarValue::counter(40))
            .unwrap();
        tx.put(&member, "other", 7).unwrap();
        tx.commit();
        let mut tx = other.transaction();
        tx.delete(&member, "other").unwrap();
        tx.commit();
    }
    let hashes: Vec<ChangeHash> = other
        .get_changes(&before)
        .iter()
        .map(|c| c.hash())
        .collect();
    let first: Vec<ChangeHash> = hashes[..1].to_vec();
    assert_eq!(checked_totals(&b)["screened"], 4);
    let reads = b.inner.tallies.full_reads();
    b.import(&id, other.bundle(first).unwrap().bytes()).unwrap();
    let t = checked_totals(&b);
    assert_eq!((t["screened"], t["other"]), (40, 7));
    assert_eq!(
        b.inner.tallies.full_reads(),
        reads + 1,
        "a counter put over is not followed"
    );
    b.import(&id, other.bundle(hashes[1..].to_vec()).unwrap().bytes())
        .unwrap();
    assert_eq!(checked_totals(&b).get("other"), None);
    assert_eq!(
        b.inner.tallies.full_reads(),
        reads + 2,
        "a deletion is not followed"
    );
}

#[test]
fn totals_are_kept_for_a_few_days_only() {
    let dir = tempfile::tempdir().unwrap();
    let c = phone(dir.path(), "ana");
    let days: Vec<Day> = (1..=12)
        .map(|d| Day::new(format!("2026-11-{d:02}")).unwrap())
        .collect();
    for d in &days {
        c.add_to_tally(&team(), d, "screened", 1).unwrap();
        assert_eq!(c.day_totals(&team(), d).unwrap()["screened"], 1);
    }
    assert!(c.inner.tallies.kept_len() <= super::KEPT_MAX);
}
