//! The one admission rule for push, upload and the fallback sync, without IO.
//!
//! [`Admitting`] walks the rule (scope, size, document creation, quarantine, the actor
//! rule) and stops at each fact it needs from the relay's state as a [`Question`]; the
//! driver answers it (`connection::admission`) and the rule goes on, until a
//! [`Verdict`]. The relay's date comes in as an argument: nothing here reads a clock,
//! storage or the hub, so every branch is tested without a relay.
//!
//! The questions come in a fixed order that matters: whether the device has bound any
//! actor is asked before whether this push's actors are bound (bindings are only ever
//! added, so the other order races with the device's own first push in the same
//! flight: its actor unbound at the first question, bound by that push's commit at the
//! second, and an honest phone held for review).

use automerge::{ActorId, Change};
use redline_proto::token::Role;
use redline_proto::{DocId, DocKind, ErrorCode};

use super::peer::{Admission, Verdict};

/// A fact about the relay's state the rule needs; every answer is yes or no.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Question {
    /// Does the relay hold the document (any change of it)?
    Exists,
    /// Count one more document created by this device on `day` (days since the epoch),
    /// unless it already created `limit` that day: was it counted? Checking and
    /// counting are one step, so concurrent pushes cannot together pass the limit.
    TakeCreationSlot {
        /// Days since the epoch, the relay's date.
        day: i64,
        /// Most documents per device per day.
        limit: u32,
    },
    /// Has the relay bound any actor to this device?
    DeviceHasActors,
    /// Is any of these actors bound to no device yet?
    AnyUnbound(Vec<ActorId>),
}

/// Where the rule stands.
#[derive(Debug)]
pub enum Step {
    /// It needs this answered ([`Admitting::answer`]).
    Ask(Question),
    /// It decided.
    Done(Verdict),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Start,
    Exists,
    CreationSlot,
    DeviceActors,
    Unbound,
    Decided,
}

/// One push going through the admission rule.
pub struct Admitting<'a> {
    who: &'a Admission,
    doc: &'a DocId,
    changes: &'a [Change],
    /// The relay's date, days since the epoch.
    today: i64,
    stage: Stage,
    quota: Option<&'static str>,
}

impl<'a> Admitting<'a> {
    /// The rule for `changes` to `doc` from `who`, on the relay's date `today` (days
    /// since the epoch).
    pub fn new(who: &'a Admission, doc: &'a DocId, changes: &'a [Change], today: i64) -> Self {
        Self {
            who,
            doc,
            changes,
            today,
            stage: Stage::Start,
            quota: None,
        }
    }

    /// Starts the rule: the first question, or a verdict that needs none.
    pub fn start(&mut self) -> Step {
        assert_eq!(self.stage, Stage::Start, "the rule starts once");
        if !self.who.scope.can_write(self.doc) {
            return self.refuse(
                ErrorCode::FORBIDDEN,
                "your token does not allow this document".into(),
            );
        }
        if self.changes.len() > self.who.max_changes {
            let text = format!(
                "{} changes in one message; the limit is {}",
                self.changes.len(),
                self.who.max_changes
            );
            return self.refuse(ErrorCode::TOO_LARGE, text);
        }
        self.ask(Stage::Exists, Question::Exists)
    }

    /// The answer to the last question: the next one, or the verdict.
    pub fn answer(&mut self, yes: bool) -> Step {
        match self.stage {
            Stage::Exists if yes => self.quarantine(),
            Stage::Exists => self.creation(),
            Stage::CreationSlot if yes => self.quarantine(),
            Stage::CreationSlot => {
                self.quota = Some("new_documents_per_device_per_day");
                let text = format!(
                    "this phone has started {} documents today, the most the relay allows",
                    self.who.quotas.new_documents_per_device_per_day
                );
                self.refuse(ErrorCode::QUOTA_EXCEEDED, text)
            }
            // A device without bindings writes with its first actor: nothing to compare.
            Stage::DeviceActors if !yes => self.decide(Verdict::Accept),
            Stage::DeviceActors => match self.actors() {
                actors if actors.is_empty() => self.decide(Verdict::Accept),
                actors => self.ask(Stage::Unbound, Question::AnyUnbound(actors)),
            },
            // A known phone writing as an actor never seen before into an existing
            // document: its store was reset or restored (one install keeps one actor
            // for life). Held for review from now on.
            Stage::Unbound if yes => self.decide(Verdict::Hold { starts: true }),
            Stage::Unbound => self.decide(Verdict::Accept),
            Stage::Start | Stage::Decided => panic!("no question is open"),
        }
    }

    /// The quota the verdict refused by, if one did (for the relay's metrics).
    pub fn quota_refused(&self) -> Option<&'static str> {
        self.quota
    }

    /// The document does not exist: this push creates it.
    fn creation(&mut self) -> Step {
        let q = &self.who.quotas;
        if let DocKind::Ledger(_, day) = self.doc.kind() {
            let d = day.days_since_epoch();
            if d < self.today - i64::from(q.ledger_days_back)
                || d > self.today + i64::from(q.ledger_days_ahead)
            {
                self.quota = Some("ledger_days");
                let text = format!(
                    "a ledger for {day} cannot be started here: new ledger days must lie within {} days before and {} after the relay's date",
                    q.ledger_days_back, q.ledger_days_ahead
                );
                return self.refuse(ErrorCode::FORBIDDEN, text);
            }
        }
        let ask = Question::TakeCreationSlot {
            day: self.today,
            limit: q.new_documents_per_device_per_day,
        };
        self.ask(Stage::CreationSlot, ask)
    }

    /// Past scope, size and creation: quarantine, then the actor rule. The actor rule
    /// concerns documents the relay already holds (a creation carries the device's
    /// actor as it is).
    fn quarantine(&mut self) -> Step {
        if self.who.quarantined.is_some() {
            return self.decide(Verdict::Hold { starts: false });
        }
        let existing = self.stage == Stage::Exists;
        if existing && self.who.synced_before && self.who.scope.claims().role == Role::Volunteer {
            return self.ask(Stage::DeviceActors, Question::DeviceHasActors);
        }
        self.decide(Verdict::Accept)
    }

    /// The actors the push writes as (the genesis change's shared actor left out).
    fn actors(&self) -> Vec<ActorId> {
        let genesis = ActorId::from(redline_proto::genesis::GENESIS_ACTOR);
        let mut actors: Vec<ActorId> = Vec::new();
        for a in self.changes.iter().map(|c| c.actor_id()) {
            if *a != genesis && !actors.contains(a) {
                actors.push(a.clone());
            }
        }
        actors
    }

    fn ask(&mut self, stage: Stage, question: Question) -> Step {
        self.stage = stage;
        Step::Ask(question)
    }

    fn refuse(&mut self, code: ErrorCode, text: String) -> Step {
        self.decide(Verdict::Refuse(code, text))
    }

    fn decide(&mut self, verdict: Verdict) -> Step {
        self.stage = Stage::Decided;
        Step::Done(verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Scope;
    use crate::authorship::Author;
    use automerge::transaction::Transactable;
    use redline_proto::token::{Claims, TokenId};
    use redline_proto::{Day, DeviceId, MemberId, TeamId};

    /// The relay's date in these tests: 2026-12-01.
    const TODAY: &str = "2026-12-01";

    fn today() -> i64 {
        Day::new(TODAY).unwrap().days_since_epoch()
    }

    fn who(role: Role) -> Admission {
        let device = DeviceId::new("phone-1").unwrap();
        let claims = Claims {
            id: TokenId([7; 16]),
            device: device.clone(),
            member: MemberId::new("ana").unwrap(),
            role,
            teams: vec![TeamId::new("t1").unwrap()],
            zones: vec![],
            issued: 0,
            expires: u64::MAX,
        };
        Admission {
            author: Author {
                device,
                member: MemberId::new("ana").unwrap(),
                role,
            },
            scope: Scope::new(claims),
            quarantined: None,
            synced_before: true,
            max_changes: 10,
            quotas: crate::config::Quotas::default(),
        }
    }

    fn ledger(team: &str, day: &str) -> DocId {
        DocId::ledger(&TeamId::new(team).unwrap(), &Day::new(day).unwrap())
    }

    fn doc_day(doc: &DocId) -> i64 {
        match doc.kind() {
            DocKind::Ledger(_, day) => day.days_since_epoch(),
            _ => unreachable!("a ledger"),
        }
    }

    /// `n` changes by `actor`.
    fn changes(actor: &[u8], n: usize) -> Vec<Change> {
        let mut doc = automerge::Automerge::new().with_actor(ActorId::from(actor));
        for i in 0..n {
            let mut tx = doc.transaction();
            tx.put(automerge::ROOT, "k", i as i64).unwrap();
            tx.commit();
        }
        doc.get_changes(&[])
    }

    /// Runs the rule, answering from `answers` in order; the questions asked and the
    /// verdict.
    fn run(
        who: &Admission,
        doc: &DocId,
        changes: &[Change],
        answers: &[bool],
    ) -> (Vec<Question>, Verdict, Option<&'static str>) {
        let mut rule = Admitting::new(who, doc, changes, today());
        let mut asked = Vec::new();
        let mut step = rule.start();
        let mut answers = answers.iter();
        loop {
            match step {
                Step::Done(v) => return (asked, v, rule.quota_refused()),
                Step::Ask(q) => {
                    asked.push(q);
                    let yes = *answers.next().expect("an answer for every question");
                    step = rule.answer(yes);
                }
            }
        }
    }

    fn refused(v: &Verdict) -> Option<ErrorCode> {
        match v {
            Verdict::Refuse(code, _) => Some(*code),
            _ => None,
        }
    }

    #[test]
    fn another_teams_document_is_refused_before_any_question() {
        let (asked, v, quota) = run(
            &who(Role::Volunteer),
            &ledger("t2", TODAY),
            &changes(b"a", 1),
            &[],
        );
        assert!(asked.is_empty());
        assert_eq!(refused(&v), Some(ErrorCode::FORBIDDEN));
        assert_eq!(quota, None);
    }

    #[test]
    fn too_many_changes_in_one_message_are_refused() {
        let (asked, v, _) = run(
            &who(Role::Volunteer),
            &ledger("t1", TODAY),
            &changes(b"a", 11),
            &[],
        );
        assert!(asked.is_empty());
        assert_eq!(refused(&v), Some(ErrorCode::TOO_LARGE));
    }

    #[test]
    fn a_new_day_far_from_the_relays_date_is_refused_without_counting() {
        // Sixty days back is the default's furthest; this is sixty-one.
        assert_eq!(crate::config::Quotas::default().ledger_days_back, 60);
        let doc = ledger("t1", "2026-10-01");
        assert_eq!(today() - doc_day(&doc), 61);
        let (asked, v, quota) = run(&who(Role::Volunteer), &doc, &changes(b"a", 1), &[false]);
        assert_eq!(asked, vec![Question::Exists]);
        assert_eq!(refused(&v), Some(ErrorCode::FORBIDDEN));
        assert_eq!(quota, Some("ledger_days"));
        // The same day, already held by the relay, is written to as any document.
        let (_, v, _) = run(
            &who(Role::Volunteer),
            &doc,
            &changes(b"a", 1),
            &[true, true, false],
        );
        assert!(matches!(v, Verdict::Accept));
    }

    #[test]
    fn creating_a_document_takes_a_slot_and_refuses_without_one() {
        let doc = ledger("t1", TODAY);
        let limit = crate::config::Quotas::default().new_documents_per_device_per_day;
        let slot = Question::TakeCreationSlot {
            day: today(),
            limit,
        };
        let (asked, v, _) = run(
            &who(Role::Volunteer),
            &doc,
            &changes(b"a", 1),
            &[false, true],
        );
        assert_eq!(asked, vec![Question::Exists, slot.clone()]);
        assert!(
            matches!(v, Verdict::Accept),
            "a creation skips the actor rule"
        );
        let (asked, v, quota) = run(
            &who(Role::Volunteer),
            &doc,
            &changes(b"a", 1),
            &[false, false],
        );
        assert_eq!(asked, vec![Question::Exists, slot]);
        assert_eq!(refused(&v), Some(ErrorCode::QUOTA_EXCEEDED));
        assert_eq!(quota, Some("new_documents_per_device_per_day"));
    }

    #[test]
    fn a_quarantined_device_is_held_after_scope_and_creation() {
        let mut w = who(Role::Volunteer);
        w.quarantined = Some(3_600_000);
        let (asked, v, _) = run(&w, &ledger("t1", TODAY), &changes(b"a", 1), &[true]);
        assert_eq!(asked, vec![Question::Exists]);
        assert!(matches!(v, Verdict::Hold { starts: false }));
        // Still refused outside its scope, and still counted against creation.
        let (_, v, _) = run(&w, &ledger("t2", TODAY), &changes(b"a", 1), &[]);
        assert_eq!(refused(&v), Some(ErrorCode::FORBIDDEN));
        let (_, v, _) = run(&w, &ledger("t1", TODAY), &changes(b"a", 1), &[false, false]);
        assert_eq!(refused(&v), Some(ErrorCode::QUOTA_EXCEEDED));
    }

    #[test]
    fn a_known_volunteer_with_a_new_actor_on_an_existing_document_is_held() {
        let w = who(Role::Volunteer);
        let doc = ledger("t1", TODAY);
        let c = changes(b"new-actor", 2);
        let (asked, v, _) = run(&w, &doc, &c, &[true, true, true]);
        assert_eq!(
            asked,
            vec![
                Question::Exists,
                Question::DeviceHasActors,
                Question::AnyUnbound(vec![ActorId::from(&b"new-actor"[..])]),
            ]
        );
        assert!(matches!(v, Verdict::Hold { starts: true }));
        // Its actor bound already: accepted.
        let (_, v, _) = run(&w, &doc, &c, &[true, true, false]);
        assert!(matches!(v, Verdict::Accept));
        // No actor bound to the device yet: its first actor, nothing to compare.
        let (asked, v, _) = run(&w, &doc, &c, &[true, false]);
        assert_eq!(asked.len(), 2);
        assert!(matches!(v, Verdict::Accept));
    }

    #[test]
    fn the_actor_rule_spares_first_syncs_leads_and_the_genesis_change() {
        let doc = ledger("t1", TODAY);
        let c = changes(b"new-actor", 1);
        let mut first = who(Role::Volunteer);
        first.synced_before = false;
        let (asked, v, _) = run(&first, &doc, &c, &[true]);
        assert_eq!(asked, vec![Question::Exists]);
        assert!(matches!(v, Verdict::Accept));
        let (asked, v, _) = run(&who(Role::Lead), &doc, &c, &[true]);
        assert_eq!(asked, vec![Question::Exists]);
        assert!(matches!(v, Verdict::Accept));
        // Only the genesis actor: no actor to ask about.
        let genesis = changes(&redline_proto::genesis::GENESIS_ACTOR, 1);
        let (asked, v, _) = run(&who(Role::Volunteer), &doc, &genesis, &[true, true]);
        assert_eq!(asked, vec![Question::Exists, Question::DeviceHasActors]);
        assert!(matches!(v, Verdict::Accept));
    }
}
