//! The field operations a device offers, in the field's words: the API the FFI and the
//! CLI expose. Each write goes through [`Client::change`]: validated, applied in one
//! Automerge transaction, durable before it returns. Names of members, zones and teams
//! are checked against the roster when the device holds it.

use std::collections::BTreeMap;

use redline_proto::{Day, DocId, DocKind, MemberId, OrgId, TeamId, ZoneId};

use crate::Error;
use crate::client::Client;
use crate::conflicts::{self, Conflict};
use crate::households::{
    self, HouseholdUpdate, HouseholdsView, Need, NewHousehold, NewNeed, Priority,
};
use crate::ledger::{self, DutyAction, LedgerView, NewTask, Task, TaskUpdate};
use crate::reconcile::{self, ReconcileView};
use crate::roster::{self, Role, RosterView};
use crate::workflow::{NeedStatus, TaskStatus, Transition};

impl Client {
    // ----- roster -------------------------------------------------------------------

    fn org(&self) -> Result<&OrgId, Error> {
        self.inner.config.org.as_ref().ok_or_else(|| {
            Error::Invalid(
                "no organisation configured: set ClientConfig::org to use the roster".into(),
            )
        })
    }

    /// The roster, if an org is configured and the device holds its roster.
    pub fn roster(&self) -> Result<Option<RosterView>, Error> {
        let Some(org) = &self.inner.config.org else {
            return Ok(None);
        };
        self.read(&DocId::roster(org), roster::view)
    }

    fn check_member(&self, member: &MemberId) -> Result<(), Error> {
        match self.roster()? {
            Some(r) => r.check_member(member),
            None => Ok(()),
        }
    }

    fn check_zone(&self, zone: &ZoneId) -> Result<(), Error> {
        match self.roster()? {
            Some(r) => r.check_zone(zone),
            None => Ok(()),
        }
    }

    fn roster_change(
        &self,
        f: impl FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let id = DocId::roster(self.org()?);
        self.change(&id, |tx, _| f(tx))
    }

    /// Adds a team (or renames it).
    pub fn add_team(&self, team: &TeamId, name: &str) -> Result<(), Error> {
        self.roster_change(|tx| roster::add_team(tx, team, name))
    }

    /// Adds a zone (or renames it).
    pub fn add_zone(&self, zone: &ZoneId, name: &str) -> Result<(), Error> {
        self.roster_change(|tx| roster::add_zone(tx, zone, name))
    }

    /// Records that `team` covers `zone` (or no longer does).
    pub fn set_coverage(&self, team: &TeamId, zone: &ZoneId, covers: bool) -> Result<(), Error> {
        self.roster_change(|tx| roster::set_coverage(tx, team, zone, covers))
    }

    /// Adds a member with a role and teams (or updates them).
    pub fn add_member(
        &self,
        member: &MemberId,
        name: &str,
        role: Role,
        teams: &[TeamId],
    ) -> Result<(), Error> {
        self.roster_change(|tx| roster::add_member(tx, member, name, role, teams))
    }

    /// Changes a member's role.
    pub fn set_role(&self, member: &MemberId, role: Role) -> Result<(), Error> {
        self.roster_change(|tx| roster::set_role(tx, member, role))
    }

    // ----- ledger -------------------------------------------------------------------

    /// Adds a task to `team`'s ledger for `day`; returns its id.
    pub fn add_task(&self, team: &TeamId, day: &Day, task: NewTask) -> Result<String, Error> {
        if let Some(z) = &task.zone {
            self.check_zone(z)?;
        }
        for m in &task.assignees {
            self.check_member(m)?;
        }
        self.change(&DocId::ledger(team, day), |tx, w| {
            ledger::add_task(tx, w, &task)
        })
    }

    /// Edits a task's fields.
    pub fn update_task(
        &self,
        team: &TeamId,
        day: &Day,
        task: &str,
        update: TaskUpdate,
    ) -> Result<(), Error> {
        if let Some(Some(z)) = &update.zone {
            self.check_zone(z)?;
        }
        self.change(&DocId::ledger(team, day), |tx, _| {
            ledger::update_task(tx, task, &update)
        })
    }

    /// Adds `member` to a task's assignees (an open task becomes assigned).
    pub fn assign_task(
        &self,
        team: &TeamId,
        day: &Day,
        task: &str,
        member: &MemberId,
    ) -> Result<(), Error> {
        self.check_member(member)?;
        self.change(&DocId::ledger(team, day), |tx, w| {
            ledger::assign(tx, w, task, member)
        })
    }

    /// Removes `member` from a task's assignees.
    pub fn unassign_task(
        &self,
        team: &TeamId,
        day: &Day,
        task: &str,
        member: &MemberId,
    ) -> Result<(), Error> {
        self.change(&DocId::ledger(team, day), |tx, _| {
            ledger::unassign(tx, task, member)
        })
    }

    /// Moves a task from `from` to `to` in one change.
    pub fn reassign_task(
        &self,
        team: &TeamId,
        day: &Day,
        task: &str,
        from: &MemberId,
        to: &MemberId,
    ) -> Result<(), Error> {
        self.check_member(to)?;
        self.change(&DocId::ledger(team, day), |tx, w| {
            ledger::unassign(tx, task, from)?;
            ledger::assign(tx, w, task, to)
        })
    }

    /// Records a new status for a task (see [`crate::workflow`] for the rule).
    pub fn set_task_status(
        &self,
        team: &TeamId,
        day: &Day,
        task: &str,
        status: TaskStatus,
    ) -> Result<(), Error> {
        self.change(&DocId::ledger(team, day), |tx, w| {
            ledger::set_status(tx, w, task, Transition::To(status))
        })
    }

    /// Reopens a done or cancelled task.
    pub fn reopen_task(&self, team: &TeamId, day: &Day, task: &str) -> Result<(), Error> {
        self.change(&DocId::ledger(team, day), |tx, w| {
            ledger::set_status(tx, w, task, Transition::Reopen)
        })
    }

    /// Records that this device's member starts duty now.
    pub fn check_in(&self, team: &TeamId, day: &Day) -> Result<(), Error> {
        self.change(&DocId::ledger(team, day), |tx, w| {
            ledger::record_duty(tx, w, DutyAction::CheckIn)
        })
    }

    /// Records that this device's member ends duty now.
    pub fn check_out(&self, team: &TeamId, day: &Day) -> Result<(), Error> {
        self.change(&DocId::ledger(team, day), |tx, w| {
            ledger::record_duty(tx, w, DutyAction::CheckOut)
        })
    }

    /// Adds `amount` (at least 1) to the day's tally `metric` (e.g. `samples_taken`).
    pub fn add_to_tally(
        &self,
        team: &TeamId,
        day: &Day,
        metric: &str,
        amount: u32,
    ) -> Result<(), Error> {
        self.change(&DocId::ledger(team, day), |tx, w| {
            ledger::add_to_tally(tx, w, metric, i64::from(amount))
        })
    }

    /// The typed view of `team`'s ledger for `day`, or `None` if this device has none.
    pub fn ledger(&self, team: &TeamId, day: &Day) -> Result<Option<LedgerView>, Error> {
        self.read(&DocId::ledger(team, day), ledger::view)
    }

    /// Tasks of the day past due at `now_ms` and not closed.
    pub fn overdue_tasks(&self, team: &TeamId, day: &Day, now_ms: i64) -> Result<Vec<Task>, Error> {
        let view = self.ledger(team, day)?;
        Ok(view
            .map(|v| v.overdue(now_ms).into_iter().cloned().collect())
            .unwrap_or_default())
    }

    /// Members of the team on duty now (latest entry of the day is a check-in).
    pub fn on_duty(&self, team: &TeamId, day: &Day) -> Result<Vec<String>, Error> {
        Ok(self
            .ledger(team, day)?
            .map(|v| v.on_duty())
            .unwrap_or_default())
    }

    /// The day's totals per tally.
    pub fn day_totals(&self, team: &TeamId, day: &Day) -> Result<BTreeMap<String, i64>, Error> {
        // The tallies alone, kept between reads and moved by the changes that reach
        // the day: a totals screen refreshing on every change neither rebuilds every
        // task and duty entry nor works out every counter again.
        let id = DocId::ledger(team, day);
        Ok(self
            .read(&id, |d| self.inner.tallies.totals(&id, d))?
            .unwrap_or_default())
    }

    /// The lead's reconcile view of a team-day.
    pub fn reconcile(&self, team: &TeamId, day: &Day) -> Result<Option<ReconcileView>, Error> {
        self.read(&DocId::ledger(team, day), reconcile::reconcile)
    }

    /// Conflicts in any document this device holds.
    pub fn conflicts(&self, doc: &DocId) -> Result<Vec<Conflict>, Error> {
        let containers: &[&str] = match doc.kind() {
            DocKind::Ledger(..) => &["tasks"],
            DocKind::Households(_) => &["households", "needs"],
            DocKind::Roster(_) => &["teams", "zones", "members", "roles"],
        };
        Ok(self
            .read(doc, |d| conflicts::find(d, containers))?
            .unwrap_or_default())
    }

    /// Resolves conflict `conflict` of `doc` by keeping value number `choice` of
    /// [`Conflict::values`].
    pub fn resolve_conflict(
        &self,
        doc: &DocId,
        conflict: &str,
        choice: usize,
    ) -> Result<(), Error> {
        if self.read(doc, |_| Ok(()))?.is_none() {
            return Err(Error::NotFound(format!("document {doc}")));
        }
        self.change_after(
            doc,
            |d| conflicts::choose(d, conflict, choice),
            |tx, _, chosen| conflicts::resolve(tx, chosen),
        )
    }

    // ----- households ----------------------------------------------------------------

    /// Records a household in `zone`; returns its id.
    pub fn add_household(&self, zone: &ZoneId, household: NewHousehold) -> Result<String, Error> {
        self.check_zone(zone)?;
        self.change(&DocId::households(zone), |tx, w| {
            households::add_household(tx, w, &household)
        })
    }

    /// Edits a household.
    pub fn update_household(
        &self,
        zone: &ZoneId,
        household: &str,
        update: HouseholdUpdate,
    ) -> Result<(), Error> {
        self.change(&DocId::households(zone), |tx, _| {
            households::update_household(tx, household, &update)
        })
    }

    /// Records a need of a household in `zone`; returns its id.
    pub fn add_need(&self, zone: &ZoneId, need: NewNeed) -> Result<String, Error> {
        self.check_zone(zone)?;
        self.change(&DocId::households(zone), |tx, w| {
            households::add_need(tx, w, &need)
        })
    }

    /// Changes a need's priority.
    pub fn set_need_priority(
        &self,
        zone: &ZoneId,
        need: &str,
        priority: Priority,
    ) -> Result<(), Error> {
        self.change(&DocId::households(zone), |tx, _| {
            households::set_priority(tx, need, priority)
        })
    }

    /// Puts `member` on a need (a requested need becomes assigned).
    pub fn assign_need(&self, zone: &ZoneId, need: &str, member: &MemberId) -> Result<(), Error> {
        self.check_member(member)?;
        self.change(&DocId::households(zone), |tx, w| {
            households::assign_need(tx, w, need, member)
        })
    }

    /// Records a new status for a need.
    pub fn set_need_status(
        &self,
        zone: &ZoneId,
        need: &str,
        status: NeedStatus,
    ) -> Result<(), Error> {
        self.change(&DocId::households(zone), |tx, w| {
            households::set_need_status(tx, w, need, Transition::To(status))
        })
    }

    /// Reopens a fulfilled or cancelled need.
    pub fn reopen_need(&self, zone: &ZoneId, need: &str) -> Result<(), Error> {
        self.change(&DocId::households(zone), |tx, w| {
            households::set_need_status(tx, w, need, Transition::Reopen)
        })
    }

    /// Replaces a need's notes (concurrent edits merge character-wise).
    pub fn set_need_notes(&self, zone: &ZoneId, need: &str, notes: &str) -> Result<(), Error> {
        self.change(&DocId::households(zone), |tx, _| {
            households::set_notes(tx, need, notes)
        })
    }

    /// The typed view of a zone's households book, or `None` if this device has none.
    pub fn households(&self, zone: &ZoneId) -> Result<Option<HouseholdsView>, Error> {
        self.read(&DocId::households(zone), households::view)
    }

    /// Open needs across every zone this device holds, emergency first, then oldest.
    pub fn open_needs(&self) -> Result<Vec<Need>, Error> {
        let mut out = Vec::new();
        for id in self.documents()? {
            if let DocKind::Households(_) = id.kind()
                && let Some(view) = self.read(&id, households::view)?
            {
                out.extend(view.needs.into_iter().filter(Need::is_open));
            }
        }
        households::sort_by_urgency(&mut out);
        Ok(out)
    }
}
