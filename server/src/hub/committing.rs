//! The steps of committing a planned batch, decided without IO.
//!
//! [`plan`](super::plan) decides which pushes a batch takes; [`Committing`] decides what
//! happens to them after that, given only the facts its driver reports:
//! 1. **Apply** every accepted push in one `apply_changes`. When Automerge refuses the
//!    batch (or panics on hostile data) the document may be half-changed: **reload** it
//!    from storage and apply each push alone, so only the bad sender is refused (after a
//!    refusal the document is reloaded again and the pushes taken so far reapplied).
//! 2. Nothing may stay **queued** inside the document waiting for a dependency (the
//!    plan's dependency rule makes that a bug, not an input): the batch is refused and
//!    the document reloaded.
//! 3. **Persist** what entered as one chunk and wait for the flush. A failed write
//!    reloads the document (memory never runs ahead of storage). On a shared feed a
//!    **conflict** (another relay committed to the document first; the reload took that
//!    commit in) applies the batch again and persists again, up to
//!    [`MAX_CONFLICT_RETRIES`] times.
//! 4. **Answer** every push: its commit's sequence, or the error that stopped it; and
//!    say whether the document is due for **compaction** (after the answers: a sender
//!    never waits for a snapshot).
//!
//! The hub (`hub::commit`) is the driver: it owns the document and storage, performs
//! each [`Need`] and feeds the [`Fact`] back.

use std::sync::Arc;

use crate::Error;

/// Times a batch is applied again after other relays' commits to its document.
pub const MAX_CONFLICT_RETRIES: u32 = 8;

/// Chunks after which a document is compacted into a new snapshot.
pub const COMPACT_AFTER_CHUNKS: usize = 64;

/// What the driver must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Need {
    /// Apply the changes of these pushes (indices into the batch, in order) to the
    /// document in one call. With `mark`, first note the document's heads and which of
    /// these changes it lacks: the next [`Need::Persist`] writes those that entered.
    Apply {
        /// The pushes whose changes to apply.
        pushes: Vec<usize>,
        /// Note the heads and the changes new to the document first.
        mark: bool,
    },
    /// Replace the document with what storage holds.
    Reload,
    /// Write what entered since the mark as one chunk with the next feed sequence and
    /// wait for the flush.
    Persist,
}

/// What the driver reports after a [`Need`].
#[derive(Debug)]
pub enum Fact {
    /// The apply's result (Automerge's refusal as text), and whether the document now
    /// holds changes queued for missing dependencies.
    Applied {
        /// Automerge applied the changes, or why not.
        result: Result<(), String>,
        /// Changes are left queued inside the document.
        queued: bool,
    },
    /// The reload's result.
    Reloaded(Result<(), Error>),
    /// The write's result: the commit's sequence (`None`: nothing was new), and the
    /// document's chunks since its last snapshot.
    Persisted {
        /// The sequence, or why the write failed ([`Error::Conflict`]: another relay
        /// committed to the document first).
        result: Result<Option<u64>, Error>,
        /// Chunks the document has since its snapshot, this one included.
        chunks: usize,
    },
}

/// How a commit ended.
#[derive(Debug)]
pub struct Outcome {
    /// Every push's answer, by index: stored at or below this sequence (`None`: nothing
    /// new was written, the relay's last sequence covers it), or refused.
    pub answers: Vec<(usize, Result<Option<u64>, Error>)>,
    /// Times the batch met another relay's commit and was applied again.
    pub conflicts: u32,
    /// What stopped the commit, for the log (`None`: it landed or had nothing to write).
    pub failure: Option<Arc<Error>>,
    /// The document is due for compaction (do it after answering).
    pub compact: bool,
}

/// A step: do something and report back, or the end.
#[derive(Debug)]
pub enum CommitStep {
    /// Perform this and feed its [`Fact`] to [`Committing::on`].
    Do(Need),
    /// The commit is over.
    Done(Outcome),
}

/// Where the commit stands (see the module docs).
#[derive(Debug)]
enum Phase {
    /// The whole batch is being applied.
    Whole,
    /// Reloading before push `next` is tried alone (the whole batch was refused, or a
    /// push was refused and the pushes taken so far must be applied again).
    Reloading { next: usize, reapply: bool },
    /// Push `at` is being applied alone.
    Alone { at: usize },
    /// The pushes taken so far are being applied again before push `next`.
    Reapplying { next: usize },
    /// The batch is being written.
    Persisting,
    /// A reload after which the commit ends with `error` or, for a conflict with
    /// retries left, the batch is applied again.
    Recovering { error: Error },
    /// The batch is being applied again after another relay's commit.
    Again,
    /// Over.
    Over,
}

/// The commit of one planned batch, as a state machine (see the module docs).
#[derive(Debug)]
pub struct Committing {
    /// The document's name, for errors.
    doc: String,
    /// The planned pushes, by index `0..pushes`.
    pushes: usize,
    /// Pushes whose changes are in the document.
    taken: Vec<usize>,
    /// Answers decided so far.
    answers: Vec<(usize, Result<Option<u64>, Error>)>,
    conflicts: u32,
    phase: Phase,
}

impl Committing {
    /// Starts the commit of `pushes` planned pushes to document `doc`; returns the
    /// first step.
    pub fn start(doc: impl ToString, pushes: usize) -> (Self, CommitStep) {
        let mut c = Committing {
            doc: doc.to_string(),
            pushes,
            taken: Vec::new(),
            answers: Vec::new(),
            conflicts: 0,
            phase: Phase::Whole,
        };
        let step = if pushes == 0 {
            c.done(None, false)
        } else {
            CommitStep::Do(Need::Apply {
                pushes: (0..pushes).collect(),
                mark: true,
            })
        };
        (c, step)
    }

    /// Feeds the fact of the last [`Need`]; returns the next step.
    ///
    /// # Panics
    /// On a fact out of turn (a driver bug): a fact the last step did not ask for.
    pub fn on(&mut self, fact: Fact) -> CommitStep {
        let phase = std::mem::replace(&mut self.phase, Phase::Over);
        match fact {
            Fact::Applied { result, queued } => self.applied(phase, result, queued),
            Fact::Reloaded(result) => self.reloaded(phase, result),
            Fact::Persisted { result, chunks } => match (phase, result) {
                (Phase::Persisting, Ok(seq)) => {
                    for &i in &self.taken {
                        self.answers.push((i, Ok(seq)));
                    }
                    self.taken.clear();
                    self.done(None, seq.is_some() && chunks >= COMPACT_AFTER_CHUNKS)
                }
                (Phase::Persisting, Err(e)) => self.recover(e),
                (phase, result) => out_of_turn(&phase, &result),
            },
        }
    }

    /// An apply's result, `queued` the document's state after it.
    fn applied(&mut self, phase: Phase, result: Result<(), String>, queued: bool) -> CommitStep {
        match (phase, result) {
            (Phase::Whole, Ok(())) => {
                self.taken = (0..self.pushes).collect();
                self.after_applying(queued)
            }
            (Phase::Whole, Err(_)) => self.reload_before(0, false),
            (Phase::Alone { at }, Ok(())) => {
                self.taken.push(at);
                self.try_alone(at + 1, queued)
            }
            (Phase::Alone { at }, Err(e)) => {
                self.answers.push((at, Err(Error::BadChanges(e))));
                self.reload_before(at + 1, true)
            }
            (Phase::Reapplying { next }, Ok(())) => self.try_alone(next, queued),
            (Phase::Reapplying { next }, Err(_)) => {
                let refused = "batch could not be applied";
                for i in self.stranded(next) {
                    self.answers
                        .push((i, Err(Error::BadChanges(refused.into()))));
                }
                self.recover(Error::BadChanges(refused.into()))
            }
            (Phase::Again, result) if result.is_err() || queued => self.recover(Error::BadChanges(
                "the batch no longer applies after another relay's commit".into(),
            )),
            (Phase::Again, _) => {
                self.phase = Phase::Persisting;
                CommitStep::Do(Need::Persist)
            }
            (phase, result) => out_of_turn(&phase, &result),
        }
    }

    /// A reload's result.
    fn reloaded(&mut self, phase: Phase, result: Result<(), Error>) -> CommitStep {
        match (phase, result) {
            (Phase::Reloading { next, .. }, Err(e)) => {
                let e = Arc::new(e);
                for i in self.stranded(next) {
                    self.answers.push((i, Err(Error::Commit(e.clone()))));
                }
                self.done(Some(e), false)
            }
            (Phase::Reloading { next, reapply }, Ok(())) => {
                if reapply && !self.taken.is_empty() {
                    self.phase = Phase::Reapplying { next };
                    CommitStep::Do(Need::Apply {
                        pushes: self.taken.clone(),
                        mark: false,
                    })
                } else {
                    self.try_alone(next, false)
                }
            }
            // After a recovery's reload its outcome does not matter: the commit ends,
            // or a conflict is retried on whatever storage now holds.
            (Phase::Recovering { error }, _) => {
                if matches!(error, Error::Conflict(_))
                    && self.conflicts < MAX_CONFLICT_RETRIES
                    && !self.taken.is_empty()
                {
                    self.conflicts += 1;
                    self.phase = Phase::Again;
                    return CommitStep::Do(Need::Apply {
                        pushes: self.taken.clone(),
                        mark: true,
                    });
                }
                let e = Arc::new(error);
                for i in std::mem::take(&mut self.taken) {
                    self.answers.push((i, Err(Error::Commit(e.clone()))));
                }
                self.done(Some(e), false)
            }
            (phase, result) => out_of_turn(&phase, &result),
        }
    }

    /// Reloads, then tries push `next` alone (after reapplying the pushes taken so
    /// far when `reapply`).
    fn reload_before(&mut self, next: usize, reapply: bool) -> CommitStep {
        self.phase = Phase::Reloading { next, reapply };
        CommitStep::Do(Need::Reload)
    }

    /// The pushes that are neither answered nor will be tried: those taken so far and
    /// those from `next` on.
    fn stranded(&mut self, next: usize) -> Vec<usize> {
        self.taken.drain(..).chain(next..self.pushes).collect()
    }

    /// After push `next - 1` (or the reapplied pushes): the next push alone, or the end
    /// of the pushes (`queued` is the document's state after the last apply).
    fn try_alone(&mut self, next: usize, queued: bool) -> CommitStep {
        if next < self.pushes {
            self.phase = Phase::Alone { at: next };
            return CommitStep::Do(Need::Apply {
                pushes: vec![next],
                mark: false,
            });
        }
        self.after_applying(queued)
    }

    /// Every push was applied or refused: refuse the batch if changes stay queued,
    /// else persist what was taken.
    fn after_applying(&mut self, queued: bool) -> CommitStep {
        if self.taken.is_empty() {
            return self.done(None, false);
        }
        if queued {
            for i in std::mem::take(&mut self.taken) {
                self.answers
                    .push((i, Err(Error::MissingDependencies(self.doc.clone()))));
            }
            return self.recover(Error::MissingDependencies(format!(
                "{}: a batch left changes queued in the document",
                self.doc
            )));
        }
        self.phase = Phase::Persisting;
        CommitStep::Do(Need::Persist)
    }

    /// Reloads the document, then ends with `error` (or retries a conflict).
    fn recover(&mut self, error: Error) -> CommitStep {
        self.phase = Phase::Recovering { error };
        CommitStep::Do(Need::Reload)
    }

    fn done(&mut self, failure: Option<Arc<Error>>, compact: bool) -> CommitStep {
        self.phase = Phase::Over;
        let mut answers = std::mem::take(&mut self.answers);
        answers.sort_by_key(|(i, _)| *i);
        CommitStep::Done(Outcome {
            answers,
            conflicts: self.conflicts,
            failure,
            compact,
        })
    }
}

/// A fact the last step did not ask for: the driver is broken.
fn out_of_turn(phase: &Phase, fact: &dyn std::fmt::Debug) -> ! {
    panic!("commit driver fed {fact:?} while {phase:?}")
}

#[cfg(test)]
#[path = "committing_tests.rs"]
mod tests;
