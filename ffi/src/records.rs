//! Owned records crossing the boundary, and their conversions from the core's views.
//! Times are Unix milliseconds (device clock); categorical values (kinds, statuses,
//! priorities) are the core's lowercase names, so a form can pass what the user picked
//! and get a clear `InvalidInput` for anything else.

use std::collections::BTreeMap;

use redline_client as core;

/// How the client runs.
#[derive(Clone, Debug, uniffi::Record)]
pub struct ClientSettings {
    /// The member using this device (recorded on every entry).
    pub member: String,
    /// The organisation whose roster to receive and check names against.
    pub org: Option<String>,
    /// The relay to sync with.
    pub relay: Option<RelaySettings>,
    /// The device token from the relay's operator; the device takes its id from it.
    pub token: Option<String>,
    /// Teams whose recent ledger days this device receives.
    pub teams: Vec<String>,
    /// Zones whose households books this device receives.
    pub zones: Vec<String>,
    /// Ledger days kept on the device (today included); 7 is a good default.
    pub keep_days: u32,
    /// Further relays of the same deployment (one database, one certificate), tried in
    /// order when the relay cannot be reached; the cursor carries over.
    #[uniffi(default)]
    pub other_relays: Vec<RelaySettings>,
    /// `relay` and `other_relays` are the deployment's one list, the same on every
    /// phone: start at the team's home relay (picked by the first team, so a team's
    /// phones meet on one relay), then the next ones in turn.
    #[uniffi(default)]
    pub home_relay_by_team: bool,
}

/// Where the relay is and how to recognise it.
#[derive(Clone, Debug, uniffi::Record)]
pub struct RelaySettings {
    /// `host:port` or `ip:port` of the relay's UDP endpoint.
    pub address: String,
    /// SHA-256 fingerprint of its certificate (printed by the relay).
    pub fingerprint: String,
}

/// A task to create.
#[derive(Clone, Debug, uniffi::Record)]
pub struct NewTaskRecord {
    /// transfer, screening, supply, flow_tracing, inspection or other.
    pub kind: String,
    /// Short title.
    pub title: String,
    /// Where.
    pub place: Option<String>,
    /// What it needs (equipment, people).
    pub requirements: Option<String>,
    /// Zone it belongs to.
    pub zone: Option<String>,
    /// Members assigned from the start.
    pub assignees: Vec<String>,
    /// Due time.
    pub due_ms: Option<i64>,
}

/// A task as read.
#[derive(Clone, Debug, uniffi::Record)]
pub struct TaskRecord {
    /// Its id in the day's ledger.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Title.
    pub title: String,
    /// Where.
    pub place: Option<String>,
    /// What it needs.
    pub requirements: Option<String>,
    /// Zone.
    pub zone: Option<String>,
    /// Assigned members.
    pub assignees: Vec<String>,
    /// Due time.
    pub due_ms: Option<i64>,
    /// open, assigned, in_progress, done or cancelled (merged from every device).
    pub status: String,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_at_ms: i64,
}

/// A duty check-in or check-out.
#[derive(Clone, Debug, uniffi::Record)]
pub struct DutyRecord {
    /// Member.
    pub member: String,
    /// Device it was recorded on.
    pub device: String,
    /// check_in or check_out.
    pub action: String,
    /// When.
    pub at_ms: i64,
}

/// One tally's total.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct TallyRecord {
    /// The metric.
    pub metric: String,
    /// Sum over every device.
    pub total: i64,
}

/// A team's day.
#[derive(Clone, Debug, uniffi::Record)]
pub struct LedgerRecord {
    /// Team.
    pub team: String,
    /// Day (YYYY-MM-DD).
    pub day: String,
    /// Tasks.
    pub tasks: Vec<TaskRecord>,
    /// Duty entries, in time order.
    pub duty: Vec<DutyRecord>,
    /// Day totals.
    pub tallies: Vec<TallyRecord>,
}

/// A household to add.
#[derive(Clone, Debug, uniffi::Record)]
pub struct NewHouseholdRecord {
    /// Address or description of where.
    pub address: String,
    /// People living there.
    pub residents: u32,
    /// Phone or other contact.
    pub contact: Option<String>,
    /// Vulnerability flags: elderly, post_surgery, chronic_illness, disabled, pregnant,
    /// child, lives_alone.
    pub flags: Vec<String>,
}

/// A household as read.
#[derive(Clone, Debug, uniffi::Record)]
pub struct HouseholdRecord {
    /// Id in the zone's book.
    pub id: String,
    /// Zone.
    pub zone: String,
    /// Address.
    pub address: String,
    /// Residents.
    pub residents: u32,
    /// Contact.
    pub contact: Option<String>,
    /// Vulnerability flags.
    pub flags: Vec<String>,
}

/// A need to record.
#[derive(Clone, Debug, uniffi::Record)]
pub struct NewNeedRecord {
    /// The household's id.
    pub household: String,
    /// medicine, food, water, garbage, medical_transport, medical_care or other.
    pub category: String,
    /// Details.
    pub detail: String,
    /// routine, priority, urgent or emergency.
    pub priority: String,
}

/// A need as read.
#[derive(Clone, Debug, uniffi::Record)]
pub struct NeedRecord {
    /// Id in the zone's book.
    pub id: String,
    /// Zone.
    pub zone: String,
    /// Household.
    pub household: String,
    /// Category.
    pub category: String,
    /// Details.
    pub detail: String,
    /// Priority.
    pub priority: String,
    /// Who is on it.
    pub assignee: Option<String>,
    /// requested, assigned, in_progress, fulfilled or cancelled.
    pub status: String,
    /// When it was requested.
    pub requested_at_ms: i64,
    /// Notes.
    pub notes: String,
}

/// A zone's households book.
#[derive(Clone, Debug, uniffi::Record)]
pub struct HouseholdsRecord {
    /// Zone.
    pub zone: String,
    /// Households.
    pub households: Vec<HouseholdRecord>,
    /// Needs.
    pub needs: Vec<NeedRecord>,
}

/// One of the concurrent values of a conflict.
#[derive(Clone, Debug, uniffi::Record)]
pub struct ConflictValueRecord {
    /// The value, as text.
    pub value: String,
    /// Who wrote it.
    pub member: String,
    /// On which device.
    pub device: String,
    /// When.
    pub at_ms: i64,
}

/// A field edited concurrently on two devices.
#[derive(Clone, Debug, uniffi::Record)]
pub struct ConflictRecord {
    /// Id to resolve it by.
    pub id: String,
    /// The item (task, household, need).
    pub item: String,
    /// The field.
    pub field: String,
    /// The competing values (index = choice for `resolve_conflict`).
    pub values: Vec<ConflictValueRecord>,
}

/// One member's activity in a reconciled day.
#[derive(Clone, Debug, uniffi::Record)]
pub struct MemberActivityRecord {
    /// Member.
    pub member: String,
    /// Devices used.
    pub devices: Vec<String>,
    /// Tasks created.
    pub tasks_created: u32,
    /// Status changes made.
    pub status_changes: u32,
    /// Check-ins.
    pub check_ins: u32,
    /// Check-outs.
    pub check_outs: u32,
    /// On duty at the end of the record.
    pub on_duty: bool,
    /// Their tallies.
    pub tallies: Vec<TallyRecord>,
}

/// A lead's reconciled day.
#[derive(Clone, Debug, uniffi::Record)]
pub struct ReconcileRecord {
    /// The merged day.
    pub ledger: LedgerRecord,
    /// Per member.
    pub members: Vec<MemberActivityRecord>,
    /// Conflicts to resolve.
    pub conflicts: Vec<ConflictRecord>,
}

/// What one sync did.
#[derive(Clone, Debug, uniffi::Record)]
pub struct SyncReportRecord {
    /// Documents in the session.
    pub documents: u32,
    /// Documents pushed to the relay.
    pub pushed: u32,
    /// Documents updated from the relay.
    pub updated: u32,
    /// Documents the relay refused, with its reason.
    pub refused: Vec<String>,
    /// Changes sent.
    pub changes_sent: u64,
    /// Changes received.
    pub changes_received: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Round trips.
    pub round_trips: u32,
    /// Connections replaced because the relay left the hello unanswered.
    pub reconnects: u32,
    /// Wall time.
    pub duration_ms: u64,
}

/// How a running sync is going (counters only grow; `finished` at 100%).
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct SyncProgressRecord {
    /// Documents to push or receive.
    pub docs_total: u64,
    /// Of those, done.
    pub docs_done: u64,
    /// Local changes to push.
    pub changes_to_send: u64,
    /// Of those, acknowledged.
    pub changes_sent: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Estimated time left.
    pub remaining_ms: Option<u64>,
    /// The sync settled.
    pub finished: bool,
}

impl From<&redline_client::SyncProgress> for SyncProgressRecord {
    fn from(p: &redline_client::SyncProgress) -> Self {
        Self {
            docs_total: p.docs_total,
            docs_done: p.docs_done,
            changes_to_send: p.changes_to_send,
            changes_sent: p.changes_sent,
            bytes_sent: p.bytes_sent,
            bytes_received: p.bytes_received,
            remaining_ms: p.remaining.map(|d| d.as_millis() as u64),
            finished: p.finished,
        }
    }
}

/// What one document has on the phone only.
#[derive(Clone, Debug, uniffi::Record)]
pub struct DocPendingRecord {
    /// The document.
    pub doc: String,
    /// This phone's changes the relay has not acknowledged: 0 means "saved on the
    /// relay".
    pub unacked: u64,
    /// When the relay last acknowledged it.
    pub last_ack_ms: Option<i64>,
}

/// What is saved on the phone only, overall and per document.
#[derive(Clone, Debug, uniffi::Record)]
pub struct PendingRecord {
    /// Changes not on the relay yet.
    pub unacked: u64,
    /// The latest acknowledgement.
    pub last_ack_ms: Option<i64>,
    /// Per document.
    pub docs: Vec<DocPendingRecord>,
}

impl From<redline_client::Pending> for PendingRecord {
    fn from(p: redline_client::Pending) -> Self {
        Self {
            unacked: p.unacked,
            last_ack_ms: p.last_ack_ms,
            docs: p
                .docs
                .into_iter()
                .map(|d| DocPendingRecord {
                    doc: d.doc.to_string(),
                    unacked: d.unacked,
                    last_ack_ms: d.last_ack_ms,
                })
                .collect(),
        }
    }
}

/// What a bounded background sync managed.
#[derive(Clone, Debug, uniffi::Record)]
pub struct BoundedSyncRecord {
    /// It finished before the deadline.
    pub completed: bool,
    /// How far it got.
    pub progress: SyncProgressRecord,
}

/// Where syncing stands.
#[derive(Clone, Debug, uniffi::Enum)]
pub enum SyncStatus {
    /// A sync started.
    Syncing,
    /// A sync moved on.
    Progress {
        /// How far.
        progress: SyncProgressRecord,
    },
    /// A sync (or a live session's first flight) finished.
    Synced {
        /// What it did.
        report: SyncReportRecord,
    },
    /// A sync failed; local data is intact.
    Failed {
        /// Why, in plain words.
        reason: String,
    },
    /// The live session ended.
    Stopped,
}

pub(crate) fn tallies(map: BTreeMap<String, i64>) -> Vec<TallyRecord> {
    map.into_iter()
        .map(|(metric, total)| TallyRecord { metric, total })
        .collect()
}

impl From<core::Task> for TaskRecord {
    fn from(t: core::Task) -> Self {
        Self {
            id: t.id,
            kind: t.kind.as_str().into(),
            title: t.title,
            place: t.place,
            requirements: t.requirements,
            zone: t.zone,
            assignees: t.assignees,
            due_ms: t.due,
            status: t.status.status.to_string(),
            created_by: t.created_by,
            created_at_ms: t.created_at,
        }
    }
}

impl From<core::LedgerView> for LedgerRecord {
    fn from(v: core::LedgerView) -> Self {
        Self {
            team: v.team,
            day: v.day,
            tasks: v.tasks.into_iter().map(Into::into).collect(),
            duty: v
                .duty
                .into_iter()
                .map(|d| DutyRecord {
                    member: d.member,
                    device: d.device,
                    action: match d.action {
                        core::DutyAction::CheckIn => "check_in",
                        core::DutyAction::CheckOut => "check_out",
                    }
                    .into(),
                    at_ms: d.at,
                })
                .collect(),
            tallies: tallies(v.tallies),
        }
    }
}

impl From<core::Need> for NeedRecord {
    fn from(n: core::Need) -> Self {
        Self {
            id: n.id,
            zone: n.zone,
            household: n.household,
            category: n.category.as_str().into(),
            detail: n.detail,
            priority: n.priority.as_str().into(),
            assignee: n.assignee,
            status: n.status.status.to_string(),
            requested_at_ms: n.requested_at,
            notes: n.notes,
        }
    }
}

impl From<core::HouseholdsView> for HouseholdsRecord {
    fn from(v: core::HouseholdsView) -> Self {
        Self {
            zone: v.zone,
            households: v
                .households
                .into_iter()
                .map(|h| HouseholdRecord {
                    id: h.id,
                    zone: h.zone,
                    address: h.address,
                    residents: h.residents,
                    contact: h.contact,
                    flags: h.flags,
                })
                .collect(),
            needs: v.needs.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<core::Conflict> for ConflictRecord {
    fn from(c: core::Conflict) -> Self {
        Self {
            id: c.id,
            item: c.item,
            field: c.field,
            values: c
                .values
                .into_iter()
                .map(|v| ConflictValueRecord {
                    value: v.value,
                    member: v.member,
                    device: v.device,
                    at_ms: v.at,
                })
                .collect(),
        }
    }
}

impl From<core::ReconcileView> for ReconcileRecord {
    fn from(v: core::ReconcileView) -> Self {
        Self {
            ledger: v.ledger.into(),
            members: v
                .members
                .into_iter()
                .map(|m| MemberActivityRecord {
                    member: m.member,
                    devices: m.devices,
                    tasks_created: m.tasks_created,
                    status_changes: m.status_changes,
                    check_ins: m.check_ins,
                    check_outs: m.check_outs,
                    on_duty: m.on_duty,
                    tallies: tallies(m.tallies),
                })
                .collect(),
            conflicts: v.conflicts.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<&core::SyncReport> for SyncReportRecord {
    fn from(r: &core::SyncReport) -> Self {
        let n = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        Self {
            documents: n(r.docs),
            pushed: n(r.docs_pushed),
            updated: n(r.docs_updated),
            refused: r
                .refused
                .iter()
                .map(|(doc, why)| format!("{doc}: {why}"))
                .collect(),
            changes_sent: r.changes_sent,
            changes_received: r.changes_received,
            bytes_sent: r.bytes_sent,
            bytes_received: r.bytes_received,
            round_trips: r.round_trips,
            reconnects: r.reconnects,
            duration_ms: u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX),
        }
    }
}
