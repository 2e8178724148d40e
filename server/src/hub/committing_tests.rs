//! The commit's steps driven with scripted facts: what is asked, in order, and how
//! every push is answered.

use super::*;

fn apply(pushes: &[usize], mark: bool) -> CommitStep {
    CommitStep::Do(Need::Apply {
        pushes: pushes.to_vec(),
        mark,
    })
}

fn applied() -> Fact {
    Fact::Applied {
        result: Ok(()),
        queued: false,
    }
}

fn refused() -> Fact {
    Fact::Applied {
        result: Err("bad op".into()),
        queued: false,
    }
}

fn persisted(seq: u64, chunks: usize) -> Fact {
    Fact::Persisted {
        result: Ok(Some(seq)),
        chunks,
    }
}

fn conflict() -> Fact {
    Fact::Persisted {
        result: Err(Error::Conflict("another relay".into())),
        chunks: 3,
    }
}

/// Asserts the step is `Do(need)`.
fn expect(step: CommitStep, need: CommitStep) {
    match (step, need) {
        (CommitStep::Do(a), CommitStep::Do(b)) => assert_eq!(a, b),
        (a, b) => panic!("expected {b:?}, got {a:?}"),
    }
}

fn outcome(step: CommitStep) -> Outcome {
    match step {
        CommitStep::Done(o) => o,
        other => panic!("expected the end, got {other:?}"),
    }
}

/// Each push's answer as text: a sequence, `none`, or the error's variant.
fn answers(o: &Outcome) -> Vec<String> {
    o.answers
        .iter()
        .map(|(i, a)| match a {
            Ok(Some(s)) => format!("{i}:seq {s}"),
            Ok(None) => format!("{i}:none"),
            Err(Error::Commit(cause)) => format!("{i}:commit({})", variant(cause)),
            Err(e) => format!("{i}:{}", variant(e)),
        })
        .collect()
}

fn variant(e: &Error) -> &'static str {
    match e {
        Error::BadChanges(_) => "bad",
        Error::MissingDependencies(_) => "missing",
        Error::Conflict(_) => "conflict",
        Error::Storage(_) => "storage",
        _ => "other",
    }
}

#[test]
fn a_good_batch_is_applied_once_persisted_once_and_answered() {
    let (mut c, step) = Committing::start("doc", 3);
    expect(step, apply(&[0, 1, 2], true));
    expect(c.on(applied()), CommitStep::Do(Need::Persist));
    let o = outcome(c.on(persisted(7, 5)));
    assert_eq!(answers(&o), ["0:seq 7", "1:seq 7", "2:seq 7"]);
    assert!(o.failure.is_none() && !o.compact && o.conflicts == 0);
}

#[test]
fn the_commit_that_reaches_the_chunk_limit_asks_for_compaction_after_answering() {
    let (mut c, _) = Committing::start("doc", 1);
    c.on(applied());
    let o = outcome(c.on(persisted(9, COMPACT_AFTER_CHUNKS)));
    assert!(o.compact);
    assert_eq!(answers(&o), ["0:seq 9"]);
    // Nothing written: nothing to compact.
    let (mut c, _) = Committing::start("doc", 1);
    c.on(applied());
    let o = outcome(c.on(Fact::Persisted {
        result: Ok(None),
        chunks: COMPACT_AFTER_CHUNKS,
    }));
    assert!(!o.compact);
    assert_eq!(answers(&o), ["0:none"]);
}

#[test]
fn a_refused_batch_is_retried_push_by_push_and_only_the_bad_sender_is_refused() {
    let (mut c, _) = Committing::start("doc", 3);
    expect(c.on(refused()), CommitStep::Do(Need::Reload));
    expect(c.on(Fact::Reloaded(Ok(()))), apply(&[0], false));
    expect(c.on(applied()), apply(&[1], false));
    // Push 1 is bad: reload, apply push 0 again, then try push 2.
    expect(c.on(refused()), CommitStep::Do(Need::Reload));
    expect(c.on(Fact::Reloaded(Ok(()))), apply(&[0], false));
    expect(c.on(applied()), apply(&[2], false));
    expect(c.on(applied()), CommitStep::Do(Need::Persist));
    let o = outcome(c.on(persisted(4, 1)));
    assert_eq!(answers(&o), ["0:seq 4", "1:bad", "2:seq 4"]);
}

#[test]
fn a_bad_first_push_needs_no_reapply() {
    let (mut c, _) = Committing::start("doc", 2);
    c.on(refused());
    expect(c.on(Fact::Reloaded(Ok(()))), apply(&[0], false));
    expect(c.on(refused()), CommitStep::Do(Need::Reload));
    // Nothing was taken yet: straight on to push 1.
    expect(c.on(Fact::Reloaded(Ok(()))), apply(&[1], false));
    expect(c.on(applied()), CommitStep::Do(Need::Persist));
    let o = outcome(c.on(persisted(2, 1)));
    assert_eq!(answers(&o), ["0:bad", "1:seq 2"]);
}

#[test]
fn when_every_push_is_bad_nothing_is_written() {
    let (mut c, _) = Committing::start("doc", 1);
    c.on(refused());
    c.on(Fact::Reloaded(Ok(())));
    expect(c.on(refused()), CommitStep::Do(Need::Reload));
    let o = outcome(c.on(Fact::Reloaded(Ok(()))));
    assert_eq!(answers(&o), ["0:bad"]);
    assert!(o.failure.is_none());
}

#[test]
fn a_failed_reload_answers_every_push_not_yet_answered() {
    let (mut c, _) = Committing::start("doc", 3);
    c.on(refused());
    c.on(Fact::Reloaded(Ok(())));
    c.on(applied()); // push 0 taken
    c.on(refused()); // push 1 bad
    let o = outcome(c.on(Fact::Reloaded(Err(Error::Storage("disk gone".into())))));
    assert_eq!(
        answers(&o),
        ["0:commit(storage)", "1:bad", "2:commit(storage)"]
    );
    assert!(o.failure.is_some());
}

#[test]
fn changes_left_queued_refuse_the_batch_and_reload() {
    let (mut c, _) = Committing::start("doc", 2);
    expect(
        c.on(Fact::Applied {
            result: Ok(()),
            queued: true,
        }),
        CommitStep::Do(Need::Reload),
    );
    let o = outcome(c.on(Fact::Reloaded(Ok(()))));
    assert_eq!(answers(&o), ["0:missing", "1:missing"]);
    assert!(o.failure.is_some());
}

#[test]
fn a_failed_write_reloads_and_answers_with_its_error() {
    let (mut c, _) = Committing::start("doc", 2);
    c.on(applied());
    expect(
        c.on(Fact::Persisted {
            result: Err(Error::Storage("no space".into())),
            chunks: 0,
        }),
        CommitStep::Do(Need::Reload),
    );
    let o = outcome(c.on(Fact::Reloaded(Ok(()))));
    assert_eq!(answers(&o), ["0:commit(storage)", "1:commit(storage)"]);
    assert_eq!(o.conflicts, 0);
}

#[test]
fn a_conflict_applies_the_batch_again_on_the_reloaded_document() {
    let (mut c, _) = Committing::start("doc", 2);
    c.on(applied());
    expect(c.on(conflict()), CommitStep::Do(Need::Reload));
    expect(c.on(Fact::Reloaded(Ok(()))), apply(&[0, 1], true));
    expect(c.on(applied()), CommitStep::Do(Need::Persist));
    let o = outcome(c.on(persisted(11, 2)));
    assert_eq!(answers(&o), ["0:seq 11", "1:seq 11"]);
    assert_eq!(o.conflicts, 1);
}

#[test]
fn conflicts_are_retried_a_bounded_number_of_times() {
    let (mut c, _) = Committing::start("doc", 1);
    c.on(applied());
    for _ in 0..MAX_CONFLICT_RETRIES {
        expect(c.on(conflict()), CommitStep::Do(Need::Reload));
        expect(c.on(Fact::Reloaded(Ok(()))), apply(&[0], true));
        c.on(applied());
    }
    expect(c.on(conflict()), CommitStep::Do(Need::Reload));
    let o = outcome(c.on(Fact::Reloaded(Ok(()))));
    assert_eq!(answers(&o), ["0:commit(conflict)"]);
    assert_eq!(o.conflicts, MAX_CONFLICT_RETRIES);
}

#[test]
fn a_batch_that_no_longer_applies_after_a_conflict_is_refused() {
    let (mut c, _) = Committing::start("doc", 2);
    c.on(applied());
    c.on(conflict());
    c.on(Fact::Reloaded(Ok(())));
    expect(
        c.on(Fact::Applied {
            result: Ok(()),
            queued: true,
        }),
        CommitStep::Do(Need::Reload),
    );
    let o = outcome(c.on(Fact::Reloaded(Ok(()))));
    assert_eq!(answers(&o), ["0:commit(bad)", "1:commit(bad)"]);
}

#[test]
fn a_failed_reapply_refuses_the_pushes_taken_and_those_not_tried() {
    let (mut c, _) = Committing::start("doc", 3);
    c.on(refused());
    c.on(Fact::Reloaded(Ok(())));
    c.on(applied()); // push 0 taken
    c.on(refused()); // push 1 bad
    c.on(Fact::Reloaded(Ok(())));
    expect(c.on(refused()), CommitStep::Do(Need::Reload)); // push 0 again: refused
    let o = outcome(c.on(Fact::Reloaded(Ok(()))));
    assert_eq!(answers(&o), ["0:bad", "1:bad", "2:bad"]);
}

#[test]
fn an_empty_batch_ends_at_once() {
    let (_, step) = Committing::start("doc", 0);
    let o = outcome(step);
    assert!(o.answers.is_empty() && o.failure.is_none());
}

#[test]
#[should_panic(expected = "commit driver fed")]
fn a_fact_out_of_turn_is_a_driver_bug() {
    let (mut c, _) = Committing::start("doc", 1);
    c.on(Fact::Reloaded(Ok(())));
}
