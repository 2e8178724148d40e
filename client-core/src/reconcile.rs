//! The team lead's view of one team-day: the merged ledger, what each member did, the
//! totals, and the conflicts left to resolve; exported as JSON or CSV.

use std::collections::BTreeMap;

use automerge::Automerge;
use serde::Serialize;

use crate::Error;
use crate::conflicts::{self, Conflict};
use crate::ledger::{self, DutyAction, LedgerView};

/// What one member did that day.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemberActivity {
    /// The member.
    pub member: String,
    /// Devices they used, sorted.
    pub devices: Vec<String>,
    /// Tasks they created.
    pub tasks_created: u32,
    /// Status entries they wrote.
    pub status_changes: u32,
    /// Tasks they are assigned to.
    pub tasks_assigned: u32,
    /// Check-ins.
    pub check_ins: u32,
    /// Check-outs.
    pub check_outs: u32,
    /// On duty at the end of the record.
    pub on_duty: bool,
    /// Their tally contributions.
    pub tallies: BTreeMap<String, i64>,
}

/// The reconcile view of one ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReconcileView {
    /// The team.
    pub team: String,
    /// The day.
    pub day: String,
    /// The merged ledger.
    pub ledger: LedgerView,
    /// Per-member activity, by member.
    pub members: Vec<MemberActivity>,
    /// Day totals per tally.
    pub totals: BTreeMap<String, i64>,
    /// Conflicts to resolve.
    pub conflicts: Vec<Conflict>,
}

/// Builds the reconcile view of a ledger document.
pub fn reconcile(doc: &Automerge) -> Result<ReconcileView, Error> {
    let ledger = ledger::view(doc)?;
    let mut members: BTreeMap<String, MemberActivity> = BTreeMap::new();
    fn touch<'a>(
        members: &'a mut BTreeMap<String, MemberActivity>,
        m: &str,
        device: &str,
    ) -> &'a mut MemberActivity {
        let a = members
            .entry(m.to_owned())
            .or_insert_with(|| MemberActivity {
                member: m.to_owned(),
                ..Default::default()
            });
        if !device.is_empty() && !a.devices.iter().any(|d| d == device) {
            a.devices.push(device.to_owned());
        }
        a
    }
    for t in &ledger.tasks {
        touch(&mut members, &t.created_by, &t.device).tasks_created += 1;
        for e in &t.history {
            touch(&mut members, &e.by, &e.device).status_changes += 1;
        }
        for m in &t.assignees {
            touch(&mut members, m, "").tasks_assigned += 1;
        }
    }
    for e in &ledger.duty {
        let a = touch(&mut members, &e.member, &e.device);
        match e.action {
            DutyAction::CheckIn => a.check_ins += 1,
            DutyAction::CheckOut => a.check_outs += 1,
        }
    }
    for (m, tallies) in &ledger.tallies_by_member {
        touch(&mut members, m, "").tallies = tallies.clone();
    }
    for m in ledger.on_duty() {
        touch(&mut members, &m, "").on_duty = true;
    }
    let mut members: Vec<MemberActivity> = members.into_values().collect();
    for m in &mut members {
        m.devices.sort();
    }
    Ok(ReconcileView {
        team: ledger.team.clone(),
        day: ledger.day.clone(),
        totals: ledger.tallies.clone(),
        conflicts: conflicts::find(doc, &["tasks"])?,
        members,
        ledger,
    })
}

impl ReconcileView {
    /// The whole view as pretty-printed JSON.
    pub fn to_json(&self) -> Result<String, Error> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::Invalid(format!("cannot write JSON: {e}")))
    }

    /// The day report as CSV: one row per task, duty entry, member tally, total and
    /// conflict value, with a `record` column saying which.
    pub fn to_csv(&self) -> Result<String, Error> {
        let mut w = csv::Writer::from_writer(Vec::new());
        let err = |e: csv::Error| Error::Invalid(format!("cannot write CSV: {e}"));
        w.write_record([
            "record",
            "team",
            "day",
            "id",
            "member",
            "device",
            "kind",
            "title",
            "status",
            "assignees",
            "zone",
            "place",
            "due",
            "at",
            "metric",
            "value",
        ])
        .map_err(err)?;
        let (team, day) = (self.team.as_str(), self.day.as_str());
        for t in &self.ledger.tasks {
            let due = t.due.map(|d| d.to_string()).unwrap_or_default();
            let at = t.created_at.to_string();
            w.write_record([
                "task",
                team,
                day,
                &t.id,
                &t.created_by,
                &t.device,
                t.kind.as_str(),
                &t.title,
                &t.status.status.to_string(),
                &t.assignees.join(" "),
                t.zone.as_deref().unwrap_or(""),
                t.place.as_deref().unwrap_or(""),
                &due,
                &at,
                "",
                "",
            ])
            .map_err(err)?;
        }
        for e in &self.ledger.duty {
            let at = e.at.to_string();
            w.write_record([
                "duty",
                team,
                day,
                &e.id,
                &e.member,
                &e.device,
                e.action.as_str(),
                "",
                "",
                "",
                "",
                "",
                "",
                &at,
                "",
                "",
            ])
            .map_err(err)?;
        }
        for m in &self.members {
            for (metric, v) in &m.tallies {
                let v = v.to_string();
                w.write_record([
                    "member_tally",
                    team,
                    day,
                    "",
                    &m.member,
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    metric,
                    &v,
                ])
                .map_err(err)?;
            }
        }
        for (metric, v) in &self.totals {
            let v = v.to_string();
            w.write_record([
                "total", team, day, "", "", "", "", "", "", "", "", "", "", "", metric, &v,
            ])
            .map_err(err)?;
        }
        for c in &self.conflicts {
            for v in &c.values {
                let at = v.at.to_string();
                w.write_record([
                    "conflict", team, day, &c.id, &v.member, &v.device, "", "", "", "", "", "", "",
                    &at, &c.field, &v.value,
                ])
                .map_err(err)?;
            }
        }
        let bytes = w
            .into_inner()
            .map_err(|e| Error::Invalid(format!("cannot write CSV: {e}")))?;
        String::from_utf8(bytes).map_err(|e| Error::Invalid(format!("CSV is not UTF-8: {e}")))
    }
}
