//! Which pushes of a batch a commit takes, decided without IO.
//!
//! Given the document as it is and the pushes queued for it, [`plan_batch`] decides each
//! push's fate, in this order:
//! 1. **Admission** of the changes new to the relay (the caller's `admit`: actor
//!    bindings, authorship). Pushes that bring nothing new are accepted as they are.
//! 2. **Size**: what the accepted pushes add (their changes' raw bytes, an upper bound
//!    of the stored chunk) keeps the document within its limit, first come first served.
//! 3. **Numbering**: each new change's operations are numbered after every operation
//!    of its dependencies, and change `n` of an actor builds on change `n - 1` of the
//!    same actor. Automerge applies a change that breaks either without complaint, but
//!    a document holding one saves into bytes nobody can load again ("max_op is lower
//!    than start_op", "missing ops"): one such push would brick the relay's copy at its
//!    next compaction, and every phone's at its own.
//! 4. **Dependencies**: every dependency is in the document or in an accepted push.
//!    Refusing one push can strand another that built on it, so this repeats until
//!    nothing changes. Otherwise Automerge would queue the changes inside the document:
//!    heads unmoved, nothing honestly acknowledged, and a queued change released
//!    unchecked by whoever later pushes its dependency.

use std::collections::{HashMap, HashSet};

use automerge::{Automerge, Change, ChangeHash};
use redline_proto::DocId;

use crate::Error;
use crate::authorship::Author;

/// The caller's admission of a push's changes new to the relay (actor bindings,
/// authorship).
pub type Admit<'f> = dyn FnMut(&Author, &[&Change]) -> Result<(), Error> + 'f;

/// One queued push, as the planner sees it.
pub struct Proposal<'a> {
    /// Who pushed it.
    pub author: &'a Author,
    /// Its changes (some may be in the document already).
    pub changes: &'a [Change],
}

/// What a commit will do with a batch.
#[derive(Debug)]
pub struct BatchPlan {
    /// Per proposal, in order: accepted with this many changes new to the relay, or
    /// refused with why.
    pub verdicts: Vec<Result<u32, Error>>,
    /// The changes the accepted proposals add, each once, in order.
    pub fresh: Vec<ChangeHash>,
}

/// Decides the fate of every proposal of a batch for document `id` (see the module
/// docs). `stored_bytes` is the document's stored size, `limit` the largest allowed.
pub fn plan_batch(
    id: &DocId,
    doc: &Automerge,
    stored_bytes: u64,
    limit: u64,
    proposals: &[Proposal<'_>],
    admit: &mut Admit<'_>,
) -> BatchPlan {
    let has = |h: &ChangeHash| doc.get_change_meta_by_hash(h).is_some();
    // What the document lacks, looked up once for every later question.
    let new_to_doc: HashSet<ChangeHash> = proposals
        .iter()
        .flat_map(|p| p.changes.iter().map(|c| c.hash()))
        .filter(|h| !has(h))
        .collect();
    let is_new = |c: &Change| new_to_doc.contains(&c.hash());
    let in_batch: HashMap<ChangeHash, &Change> = proposals
        .iter()
        .flat_map(|p| p.changes.iter().map(|c| (c.hash(), c)))
        .collect();
    let mut verdicts: Vec<Result<u32, Error>> = Vec::with_capacity(proposals.len());
    let mut size = stored_bytes;
    for p in proposals {
        let new: Vec<&Change> = p.changes.iter().filter(|c| is_new(c)).collect();
        if new.is_empty() {
            verdicts.push(Ok(0));
            continue;
        }
        if let Err(e) = admit(p.author, &new) {
            verdicts.push(Err(e));
            continue;
        }
        if let Err(e) = counters_follow_deps(doc, &in_batch, &new)
            .and_then(|()| actors_chain(doc, &in_batch, &new))
        {
            verdicts.push(Err(e));
            continue;
        }
        let adds: u64 = new.iter().map(|c| c.raw_bytes().len() as u64).sum();
        if size.saturating_add(adds) > limit {
            verdicts.push(Err(Error::TooLarge(format!(
                "{id} would grow beyond the relay's limit of {limit} bytes per document"
            ))));
            continue;
        }
        size = size.saturating_add(adds);
        verdicts.push(Ok(new.len() as u32));
    }
    loop {
        let available: HashSet<ChangeHash> = proposals
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| v.is_ok())
            .flat_map(|(p, _)| p.changes.iter().map(|c| c.hash()))
            .collect();
        let mut stranded = false;
        for (p, v) in proposals.iter().zip(verdicts.iter_mut()) {
            let complete = p
                .changes
                .iter()
                .flat_map(|c| c.deps().iter())
                .all(|d| available.contains(d) || has(d));
            if v.is_ok() && !complete {
                *v = Err(Error::MissingDependencies(id.to_string()));
                stranded = true;
            }
        }
        if !stranded {
            break;
        }
    }
    let mut seen = HashSet::new();
    let fresh = proposals
        .iter()
        .zip(&verdicts)
        .filter(|(_, v)| v.is_ok())
        .flat_map(|(p, _)| p.changes.iter().map(|c| c.hash()))
        .filter(|h| new_to_doc.contains(h) && seen.insert(*h))
        .collect();
    BatchPlan { verdicts, fresh }
}

/// Checks that each of `new` starts its operation counters after the last operation of
/// every dependency (found in `doc`, or in the batch: `in_batch`, each change's last
/// counter by hash). Checking the
/// direct dependencies is enough: every stored change passed the same check, so a
/// dependency's last counter is the largest of its whole history.
fn counters_follow_deps(
    doc: &Automerge,
    in_batch: &HashMap<ChangeHash, &Change>,
    new: &[&Change],
) -> Result<(), Error> {
    for c in new {
        let start = c.start_op().get();
        for d in c.deps() {
            let last = match in_batch.get(d) {
                Some(b) => Some(b.max_op()),
                None => doc.get_change_meta_by_hash(d).map(|m| m.max_op),
            };
            if let Some(last) = last
                && last >= start
            {
                return Err(Error::BadChanges(format!(
                    "change {} numbers its operations from {start}, but its dependency {d} \
                     already reached {last}: no document holding it could be loaded again",
                    c.hash()
                )));
            }
        }
    }
    Ok(())
}

/// Checks that each of `new` builds on its actor's previous change: change `n` of an
/// actor has change `n - 1` of the same actor in its history. Automerge applies a
/// change that skips it, but a saved document holding one does not load again
/// ("missing ops"). The walk goes back from the change's dependencies and stops at
/// each change of the same actor (whose own history already holds that actor's earlier
/// changes), breadth first; Automerge names an actor's previous change among a new
/// change's dependencies, so an honest walk ends among the direct ones.
fn actors_chain(
    doc: &Automerge,
    in_batch: &HashMap<ChangeHash, &Change>,
    new: &[&Change],
) -> Result<(), Error> {
    for c in new {
        let (actor, seq) = (c.actor_id(), c.seq());
        if seq <= 1 {
            continue;
        }
        let mut seen: HashSet<ChangeHash> = HashSet::new();
        // Breadth first: the direct dependencies (where an honest change names it)
        // before anything older.
        let mut queue: std::collections::VecDeque<ChangeHash> = c.deps().iter().copied().collect();
        let (mut found, mut unknown) = (false, false);
        while let Some(h) = queue.pop_front() {
            if !seen.insert(h) {
                continue;
            }
            let (a, s, deps) = match in_batch.get(&h) {
                Some(b) => (b.actor_id() == actor, b.seq(), b.deps().to_vec()),
                None => match doc.get_change_meta_by_hash(&h) {
                    Some(m) => (*m.actor == *actor, m.seq, m.deps),
                    // Missing: the dependency check refuses the push.
                    None => {
                        unknown = true;
                        continue;
                    }
                },
            };
            if a {
                if s + 1 == seq {
                    found = true;
                    break;
                }
                continue;
            }
            queue.extend(deps);
        }
        if !found && !unknown {
            return Err(Error::BadChanges(format!(
                "change {} is number {seq} of its actor but does not build on number {}: \
                 no document holding it could be loaded again",
                c.hash(),
                seq - 1
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ActorId, ROOT, ReadDoc};
    use redline_proto::token::Role;
    use redline_proto::{DeviceId, MemberId};

    fn author(device: &str) -> Author {
        Author {
            device: DeviceId::new(device).unwrap(),
            member: MemberId::new("ana").unwrap(),
            role: Role::Volunteer,
        }
    }

    /// A base document and `n` changes on top of it, each depending on the one before.
    fn chain(base: &mut Automerge, actor: u8, n: usize) -> Vec<Change> {
        let mut fork = base.fork().with_actor(ActorId::from([actor; 16]));
        let start = fork.get_heads();
        for i in 0..n {
            let mut tx = fork.transaction();
            tx.put(ROOT, format!("k{actor}-{i}"), i as i64).unwrap();
            tx.commit();
        }
        fork.get_changes(&start).into_iter().collect()
    }

    fn base() -> Automerge {
        let mut d = Automerge::new().with_actor(ActorId::from([9u8; 16]));
        let mut tx = d.transaction();
        tx.put(ROOT, "genesis", 1).unwrap();
        tx.commit();
        d
    }

    fn id() -> DocId {
        DocId::parse("households/z1").unwrap()
    }

    #[test]
    fn a_push_built_on_a_refused_push_is_refused_too() {
        let mut doc = base();
        let ch = chain(&mut doc, 1, 2);
        let (a, b) = (author("forger"), author("honest"));
        let first = [ch[0].clone()];
        let second = [ch[1].clone()];
        let proposals = [
            Proposal {
                author: &a,
                changes: &first,
            },
            Proposal {
                author: &b,
                changes: &second,
            },
        ];
        let plan = plan_batch(&id(), &doc, 0, u64::MAX, &proposals, &mut |who, _| {
            if who.device.as_str() == "forger" {
                Err(Error::ForgedAuthorship("no".into()))
            } else {
                Ok(())
            }
        });
        assert!(matches!(plan.verdicts[0], Err(Error::ForgedAuthorship(_))));
        assert!(matches!(
            plan.verdicts[1],
            Err(Error::MissingDependencies(_))
        ));
        assert!(plan.fresh.is_empty());
    }

    #[test]
    fn dependencies_inside_the_batch_count_and_duplicates_add_once() {
        let mut doc = base();
        let ch = chain(&mut doc, 1, 3);
        let a = author("phone-1");
        let all = ch.clone();
        let again = ch[1..].to_vec();
        let known = [doc.get_change_by_hash(&doc.get_heads()[0]).unwrap().clone()];
        let proposals = [
            Proposal {
                author: &a,
                changes: &all,
            },
            Proposal {
                author: &a,
                changes: &again,
            },
            Proposal {
                author: &a,
                changes: &known,
            },
        ];
        let mut admitted = 0;
        let plan = plan_batch(&id(), &doc, 0, u64::MAX, &proposals, &mut |_, new| {
            admitted += new.len();
            Ok(())
        });
        assert_eq!(
            plan.verdicts
                .iter()
                .map(|v| *v.as_ref().unwrap())
                .collect::<Vec<_>>(),
            vec![3, 2, 0]
        );
        assert_eq!(
            admitted, 5,
            "nothing already in the document is asked about"
        );
        assert_eq!(plan.fresh, ch.iter().map(|c| c.hash()).collect::<Vec<_>>());
    }

    #[test]
    fn the_size_limit_is_first_come_first_served() {
        let mut doc = base();
        let (x, y) = (chain(&mut doc, 1, 1), chain(&mut doc, 2, 1));
        let a = author("phone-1");
        let limit = 100 + x[0].raw_bytes().len() as u64;
        let proposals = [
            Proposal {
                author: &a,
                changes: &x,
            },
            Proposal {
                author: &a,
                changes: &y,
            },
        ];
        let plan = plan_batch(&id(), &doc, 100, limit, &proposals, &mut |_, _| Ok(()));
        assert!(plan.verdicts[0].is_ok());
        assert!(matches!(plan.verdicts[1], Err(Error::TooLarge(_))));
        assert_eq!(plan.fresh, vec![x[0].hash()]);
    }

    /// `change` with its operations numbered from `start` (what a hostile device can
    /// send: Automerge checks nothing of it).
    fn renumbered(change: &Change, start: u64) -> Change {
        let mut e = automerge::ExpandedChange::from(change);
        e.start_op = std::num::NonZeroU64::new(start).unwrap();
        e.hash = None;
        Change::from(e)
    }

    #[test]
    fn a_change_numbered_into_its_dependencies_past_is_refused() {
        let mut doc = base();
        let ch = chain(&mut doc, 1, 2);
        let a = author("phone-1");
        // Its dependency (the base's one operation) is number 1: it must start at 2.
        let low = [renumbered(&ch[0], 1)];
        // Within the batch: the second change must start after the first one's last.
        let second_low = [ch[0].clone(), renumbered(&ch[1], ch[0].max_op())];
        let honest = [ch[0].clone(), ch[1].clone()];
        for (changes, ok) in [
            (&low[..], false),
            (&second_low[..], false),
            (&honest[..], true),
        ] {
            let proposals = [Proposal {
                author: &a,
                changes,
            }];
            let plan = plan_batch(&id(), &doc, 0, u64::MAX, &proposals, &mut |_, _| Ok(()));
            match (&plan.verdicts[0], ok) {
                (Ok(_), true) => {}
                (Err(Error::BadChanges(why)), false) => {
                    assert!(why.contains("could be loaded"), "{why}")
                }
                (v, _) => panic!("unexpected verdict {v:?} (expected ok: {ok})"),
            }
        }
        // Why it matters: Automerge applies such a change, and the saved document no
        // longer loads.
        let mut poisoned = doc.clone();
        poisoned.apply_changes(low.to_vec()).unwrap();
        assert!(Automerge::load(&poisoned.save()).is_err());
    }

    #[test]
    fn a_change_that_skips_its_actors_previous_change_is_refused() {
        let mut doc = base();
        let ch = chain(&mut doc, 1, 2);
        let a = author("phone-1");
        // Number 2 of actor 1, built on the base instead of on number 1.
        let mut e = automerge::ExpandedChange::from(&ch[1]);
        e.deps = doc.get_heads();
        e.hash = None;
        let skipping = Change::from(e);
        // Number 2 built on a teammate's change that is built on number 1: honest.
        let mut mine = doc.fork().with_actor(ActorId::from([1u8; 16]));
        mine.apply_changes([ch[0].clone()]).unwrap();
        let mut theirs = mine.fork().with_actor(ActorId::from([2u8; 16]));
        let mut tx = theirs.transaction();
        tx.put(ROOT, "t", 1).unwrap();
        tx.commit();
        mine.merge(&mut theirs).unwrap();
        let before = mine.get_heads();
        let mut tx = mine.transaction();
        tx.put(ROOT, "after", 1).unwrap();
        tx.commit();
        // Automerge names its actor's previous change itself: take it out.
        let mut e = automerge::ExpandedChange::from(&mine.get_changes(&before)[0]);
        e.deps.retain(|d| *d != ch[0].hash());
        e.hash = None;
        let indirect = [Change::from(e)];
        let teammate = theirs.get_last_local_change().unwrap();
        let mut loads = doc.clone();
        loads
            .apply_changes([ch[0].clone(), teammate.clone(), indirect[0].clone()])
            .unwrap();
        assert!(
            Automerge::load(&loads.save()).is_ok(),
            "a change built on its actor's previous one only through another loads"
        );
        let cases: [(Vec<Change>, bool); 3] = [
            (vec![ch[0].clone(), skipping.clone()], false),
            (
                vec![ch[0].clone(), teammate.clone(), indirect[0].clone()],
                true,
            ),
            (ch.clone(), true),
        ];
        for (changes, ok) in cases {
            let proposals = [Proposal {
                author: &a,
                changes: &changes,
            }];
            let plan = plan_batch(&id(), &doc, 0, u64::MAX, &proposals, &mut |_, _| Ok(()));
            match (&plan.verdicts[0], ok) {
                (Ok(_), true) => {}
                (Err(Error::BadChanges(why)), false) => {
                    assert!(why.contains("does not build on"), "{why}")
                }
                (v, _) => panic!("unexpected verdict {v:?} (expected ok: {ok})"),
            }
        }
        // The first change already stored: the walk goes into the document.
        let mut stored = doc.clone();
        stored.apply_changes([ch[0].clone()]).unwrap();
        let only = [skipping.clone()];
        let proposals = [Proposal {
            author: &a,
            changes: &only,
        }];
        let plan = plan_batch(&id(), &stored, 0, u64::MAX, &proposals, &mut |_, _| Ok(()));
        assert!(matches!(plan.verdicts[0], Err(Error::BadChanges(_))));
        // Why it matters: Automerge applies it, and the saved document no longer loads.
        stored.apply_changes([skipping]).unwrap();
        assert!(Automerge::load(&stored.save()).is_err());
    }

    /// Two actors' changes on top of `base`, each a few writes, merged midway: what
    /// honest phones send.
    fn honest_day(base: &Automerge) -> Vec<Change> {
        let mut a = base.fork().with_actor(ActorId::from([1u8; 16]));
        let mut b = base.fork().with_actor(ActorId::from([2u8; 16]));
        for round in 0..3 {
            for (doc, who) in [(&mut a, "a"), (&mut b, "b")] {
                let mut tx = doc.transaction();
                tx.put(ROOT, format!("{who}{round}"), round).unwrap();
                tx.put(ROOT, "shared", format!("{who}{round}")).unwrap();
                tx.commit();
            }
            if round == 1 {
                a.merge(&mut b).unwrap();
            }
        }
        a.merge(&mut b).unwrap();
        a.get_changes(&base.get_heads())
    }

    proptest::proptest! {
        /// Whatever a hostile device does to a change's numbering or dependencies: if
        /// the plan takes it and Automerge applies it, the saved document loads again
        /// with the same heads. (The plan's numbering checks are what makes this hold:
        /// without them, start numbers and dependencies below break it.)
        #[test]
        fn what_the_plan_takes_always_saves_and_loads(
            victim in 0usize..12,
            kind in 0u8..4,
            value in 0u64..16,
            pick in proptest::collection::vec(proptest::bool::ANY, 12),
        ) {
            let doc = base();
            let day = honest_day(&doc);
            let victim = victim % day.len();
            let mut e = automerge::ExpandedChange::from(&day[victim]);
            match kind {
                0 => e.start_op = std::num::NonZeroU64::new(value.max(1)).unwrap(),
                1 => e.seq = value.max(1),
                2 => {
                    // Dependencies: any subset of the base and the changes before it.
                    let mut known = doc.get_heads();
                    known.extend(day[..victim].iter().map(|c| c.hash()));
                    e.deps = known
                        .into_iter()
                        .zip(pick.iter().cycle())
                        .filter(|(_, p)| **p)
                        .map(|(h, _)| h)
                        .collect();
                    e.deps.sort();
                }
                _ => {
                    e.start_op = std::num::NonZeroU64::new(value.max(1)).unwrap();
                    e.deps.truncate(1);
                }
            }
            e.hash = None;
            let mutated = Change::from(e);
            // The changes before the victim, then the mutated one: a push.
            let mut changes: Vec<Change> = day[..victim].to_vec();
            changes.push(mutated);
            let a = author("phone-1");
            let proposals = [Proposal { author: &a, changes: &changes }];
            let plan = plan_batch(&id(), &doc, 0, u64::MAX, &proposals, &mut |_, _| Ok(()));
            if plan.verdicts[0].is_ok() {
                let mut applied = doc.clone();
                let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    applied.apply_changes(changes.clone())
                }));
                if matches!(ok, Ok(Ok(()))) && applied.get_missing_deps(&[]).is_empty() {
                    let loaded = Automerge::load(&applied.save());
                    proptest::prop_assert!(loaded.is_ok(), "taken, applied, and the save does not load: {:?}", loaded.err());
                    proptest::prop_assert_eq!(loaded.unwrap().get_heads(), applied.get_heads());
                }
            }
        }
    }

    #[test]
    fn a_missing_dependency_outside_the_batch_is_refused() {
        let mut doc = base();
        let ch = chain(&mut doc, 1, 2);
        let a = author("phone-1");
        let only_second = [ch[1].clone()];
        let proposals = [Proposal {
            author: &a,
            changes: &only_second,
        }];
        let plan = plan_batch(&id(), &doc, 0, u64::MAX, &proposals, &mut |_, _| Ok(()));
        assert!(matches!(
            plan.verdicts[0],
            Err(Error::MissingDependencies(_))
        ));
    }
}
