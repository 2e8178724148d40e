//! The households book of one zone (`households/<zone>`): households and their needs.
//!
//! Layout (schema 1):
//!
//! ```text
//! { schema: 1, kind: "households", zone,
//!   households: { <hh>: { address, residents, contact?, flags: { <flag>: true },
//!                         created_by, device, created_at } },
//!   needs:      { <need>: { household, category, detail, priority, assignee?,
//!                           requested_at, notes: Text,
//!                           status_log: { <entry>: { to, epoch, by, device, at } },
//!                           created_by, device } } }
//! ```
//!
//! Contact details and addresses are personal data: only teams covering the zone may
//! read this document, and nothing here is ever logged. Needs sit beside households
//! (not inside) so each stays a small object. A need's status follows the rule of
//! [`crate::workflow`]; its fulfilled time is the time of the deciding `fulfilled` entry.

use std::collections::BTreeSet;

use automerge::transaction::{Transactable, Transaction};
use automerge::{Automerge, ObjId, ObjType, ROOT, ReadDoc, ScalarValue};
use redline_proto::MemberId;
use serde::Serialize;

use crate::Error;
use crate::schema::{
    Writer, child_map, child_maps, container, get_i64, get_str, new_key, optional_text,
    required_text, schema_of, set_members,
};
use crate::workflow::{self, Derived, NeedStatus, Stage, StatusEntry, Transition};

macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl $name {
            /// Every value, in order.
            pub const ALL: &'static [$name] = &[$($name::$v),+];
            /// The name stored in documents.
            pub fn as_str(self) -> &'static str { match self { $($name::$v => $s),+ } }
            /// Parses a name, with an error listing the valid ones.
            pub fn parse(s: &str) -> Result<Self, Error> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s).ok_or_else(|| Error::Invalid(format!(
                    "unknown {} {s:?}: use one of {}", $what,
                    Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
                )))
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

named_enum!(
    /// How urgent a need is: `Routine < Priority < Urgent < Emergency`.
    Priority, "priority" {
        /// Can wait for the next round.
        Routine = "routine",
        /// Should be handled today.
        Priority = "priority",
        /// Vulnerable people: elderly after surgery, sick, disabled.
        Urgent = "urgent",
        /// Life or limb: an injured child needing transport.
        Emergency = "emergency",
    }
);

named_enum!(
    /// What a household needs.
    NeedCategory, "need category" {
        /// Medicine.
        Medicine = "medicine",
        /// Food.
        Food = "food",
        /// Drinking water.
        Water = "water",
        /// Garbage clearance.
        Garbage = "garbage",
        /// Transport to medical care.
        MedicalTransport = "medical_transport",
        /// Care at home.
        MedicalCare = "medical_care",
        /// Anything else.
        Other = "other",
    }
);

named_enum!(
    /// Why a household needs extra attention.
    Vulnerability, "vulnerability flag" {
        /// Elderly residents.
        Elderly = "elderly",
        /// Someone recovering from surgery.
        PostSurgery = "post_surgery",
        /// Chronic illness.
        ChronicIllness = "chronic_illness",
        /// Disability.
        Disabled = "disabled",
        /// Pregnancy.
        Pregnant = "pregnant",
        /// Children.
        Child = "child",
        /// Someone living alone.
        LivesAlone = "lives_alone",
    }
);

/// A household to add.
#[derive(Clone, Debug, Default)]
pub struct NewHousehold {
    /// Address; must not be empty.
    pub address: String,
    /// Number of residents (at least 1).
    pub residents: u32,
    /// How to reach them.
    pub contact: Option<String>,
    /// Vulnerability flags.
    pub flags: Vec<Vulnerability>,
}

/// A need to record.
#[derive(Clone, Debug)]
pub struct NewNeed {
    /// The household's id.
    pub household: String,
    /// What is needed.
    pub category: NeedCategory,
    /// Details (which medicine, how much food).
    pub detail: String,
    /// How urgent.
    pub priority: Priority,
}

/// A household as read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Household {
    /// Its key in the book.
    pub id: String,
    /// The zone.
    pub zone: String,
    /// Address.
    pub address: String,
    /// Number of residents.
    pub residents: u32,
    /// Contact.
    pub contact: Option<String>,
    /// Vulnerability flags (unknown flags from newer builds included), sorted.
    pub flags: Vec<String>,
    /// Who recorded it.
    pub created_by: String,
    /// On which device.
    pub device: String,
    /// When.
    pub created_at: i64,
}

/// A need as read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Need {
    /// Its key in the book.
    pub id: String,
    /// The zone.
    pub zone: String,
    /// The household's id.
    pub household: String,
    /// What is needed.
    pub category: NeedCategory,
    /// Details.
    pub detail: String,
    /// How urgent.
    pub priority: Priority,
    /// Who is on it.
    pub assignee: Option<String>,
    /// Derived status.
    pub status: Derived<NeedStatus>,
    /// Every status entry.
    pub history: Vec<StatusEntry>,
    /// When it was requested (unix ms).
    pub requested_at: i64,
    /// When it was fulfilled, if it is.
    pub fulfilled_at: Option<i64>,
    /// Free-text notes.
    pub notes: String,
    /// Who recorded it.
    pub created_by: String,
    /// On which device.
    pub device: String,
}

impl Need {
    /// Neither fulfilled nor cancelled.
    pub fn is_open(&self) -> bool {
        !self.status.status.is_closed()
    }
}

/// The typed view of one zone's book.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HouseholdsView {
    /// The zone.
    pub zone: String,
    /// Schema version of the document.
    pub schema: u64,
    /// Households, by creation time.
    pub households: Vec<Household>,
    /// Needs, by request time.
    pub needs: Vec<Need>,
}

/// Changes to a household; `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct HouseholdUpdate {
    /// New address.
    pub address: Option<String>,
    /// New number of residents.
    pub residents: Option<u32>,
    /// New or cleared contact.
    pub contact: Option<Option<String>>,
    /// Flags to set.
    pub add_flags: Vec<Vulnerability>,
    /// Flags to clear.
    pub remove_flags: Vec<Vulnerability>,
}

fn household_obj<R: ReadDoc>(doc: &R, id: &str) -> Result<ObjId, Error> {
    child_map(doc, &container(doc, "households")?, id)?
        .ok_or_else(|| Error::NotFound(format!("household {id}")))
}

fn need_obj<R: ReadDoc>(doc: &R, id: &str) -> Result<ObjId, Error> {
    child_map(doc, &container(doc, "needs")?, id)?
        .ok_or_else(|| Error::NotFound(format!("need {id}")))
}

fn check_residents(n: u32) -> Result<(), Error> {
    if n == 0 || n > 500 {
        return Err(Error::Invalid(format!(
            "a household has 1 to 500 residents, not {n}"
        )));
    }
    Ok(())
}

pub(crate) fn add_household(
    tx: &mut Transaction<'_>,
    w: &Writer<'_>,
    h: &NewHousehold,
) -> Result<String, Error> {
    let address = required_text("an address", &h.address, 300)?;
    check_residents(h.residents)?;
    let contact = optional_text("a contact", h.contact.as_deref().unwrap_or(""), 300)?;
    let book = container(tx, "households")?;
    let id = new_key();
    let o = tx.put_object(&book, id.as_str(), ObjType::Map)?;
    tx.put(&o, "address", address)?;
    tx.put(&o, "residents", u64::from(h.residents))?;
    if let Some(c) = contact {
        tx.put(&o, "contact", c)?;
    }
    let flags = tx.put_object(&o, "flags", ObjType::Map)?;
    for f in &h.flags {
        tx.put(&flags, f.as_str(), true)?;
    }
    tx.put(&o, "created_by", w.member.as_str())?;
    tx.put(&o, "device", w.device.as_str())?;
    tx.put(&o, "created_at", ScalarValue::Timestamp(w.now_ms))?;
    Ok(id)
}

pub(crate) fn update_household(
    tx: &mut Transaction<'_>,
    id: &str,
    u: &HouseholdUpdate,
) -> Result<(), Error> {
    let o = household_obj(tx, id)?;
    if let Some(a) = &u.address {
        tx.put(&o, "address", required_text("an address", a, 300)?)?;
    }
    if let Some(n) = u.residents {
        check_residents(n)?;
        tx.put(&o, "residents", u64::from(n))?;
    }
    if let Some(c) = &u.contact {
        match optional_text("a contact", c.as_deref().unwrap_or(""), 300)? {
            Some(c) => tx.put(&o, "contact", c)?,
            None if tx.get(&o, "contact")?.is_some() => tx.delete(&o, "contact")?,
            None => {}
        }
    }
    if !u.add_flags.is_empty() || !u.remove_flags.is_empty() {
        let flags = child_map(tx, &o, "flags")?
            .ok_or_else(|| Error::Corrupt(format!("household {id} has no flags set")))?;
        for f in &u.add_flags {
            tx.put(&flags, f.as_str(), true)?;
        }
        for f in &u.remove_flags {
            if tx.get(&flags, f.as_str())?.is_some() {
                tx.delete(&flags, f.as_str())?;
            }
        }
    }
    Ok(())
}

pub(crate) fn add_need(
    tx: &mut Transaction<'_>,
    w: &Writer<'_>,
    n: &NewNeed,
) -> Result<String, Error> {
    household_obj(tx, &n.household)?;
    let detail = required_text("a need's detail", &n.detail, 1000)?;
    let needs = container(tx, "needs")?;
    let id = new_key();
    let o = tx.put_object(&needs, id.as_str(), ObjType::Map)?;
    tx.put(&o, "household", n.household.as_str())?;
    tx.put(&o, "category", n.category.as_str())?;
    tx.put(&o, "detail", detail)?;
    tx.put(&o, "priority", n.priority.as_str())?;
    tx.put(&o, "requested_at", ScalarValue::Timestamp(w.now_ms))?;
    tx.put_object(&o, "notes", ObjType::Text)?;
    tx.put_object(&o, "status_log", ObjType::Map)?;
    tx.put(&o, "created_by", w.member.as_str())?;
    tx.put(&o, "device", w.device.as_str())?;
    Ok(id)
}

pub(crate) fn set_priority(tx: &mut Transaction<'_>, id: &str, p: Priority) -> Result<(), Error> {
    let o = need_obj(tx, id)?;
    tx.put(&o, "priority", p.as_str())?;
    Ok(())
}

fn need_log(tx: &Transaction<'_>, o: &ObjId, id: &str) -> Result<ObjId, Error> {
    child_map(tx, o, "status_log")?
        .ok_or_else(|| Error::Corrupt(format!("need {id} has no status log")))
}

/// Sets who is on the need; moves a requested need to assigned.
pub(crate) fn assign_need(
    tx: &mut Transaction<'_>,
    w: &Writer<'_>,
    id: &str,
    member: &MemberId,
) -> Result<(), Error> {
    let o = need_obj(tx, id)?;
    tx.put(&o, "assignee", member.as_str())?;
    let log = need_log(tx, &o, id)?;
    let current: Derived<NeedStatus> = workflow::derive(&workflow::entries(tx, &log)?);
    if current.status.rank() < NeedStatus::Assigned.rank() {
        workflow::record(
            tx,
            &log,
            w,
            "the need",
            Transition::To(NeedStatus::Assigned),
        )?;
    }
    Ok(())
}

pub(crate) fn set_need_status(
    tx: &mut Transaction<'_>,
    w: &Writer<'_>,
    id: &str,
    t: Transition<NeedStatus>,
) -> Result<(), Error> {
    let o = need_obj(tx, id)?;
    let log = need_log(tx, &o, id)?;
    workflow::record(tx, &log, w, &format!("need {id}"), t)
}

/// Replaces the need's notes; Automerge merges concurrent edits character-wise.
pub(crate) fn set_notes(tx: &mut Transaction<'_>, id: &str, notes: &str) -> Result<(), Error> {
    if notes.chars().count() > 2000 {
        return Err(Error::Invalid(
            "notes have at most 2000 characters; keep them short".into(),
        ));
    }
    let o = need_obj(tx, id)?;
    let text = match tx.get(&o, "notes")? {
        Some((automerge::Value::Object(ObjType::Text), t)) => t,
        _ => tx.put_object(&o, "notes", ObjType::Text)?,
    };
    tx.update_text(&text, notes)?;
    Ok(())
}

/// Reads the typed view of a households document.
pub fn view(doc: &Automerge) -> Result<HouseholdsView, Error> {
    let zone = get_str(doc, &ROOT, "zone")?.unwrap_or_default();
    let mut households = Vec::new();
    for (id, o) in child_maps(doc, &container(doc, "households")?)? {
        let mut flags = match child_map(doc, &o, "flags")? {
            Some(f) => set_members(doc, &f),
            None => Vec::new(),
        };
        flags.sort();
        households.push(Household {
            zone: zone.clone(),
            address: get_str(doc, &o, "address")?.unwrap_or_default(),
            residents: get_i64(doc, &o, "residents")?
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0),
            contact: get_str(doc, &o, "contact")?,
            flags,
            created_by: get_str(doc, &o, "created_by")?.unwrap_or_default(),
            device: get_str(doc, &o, "device")?.unwrap_or_default(),
            created_at: get_i64(doc, &o, "created_at")?.unwrap_or(0),
            id,
        });
    }
    households.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));

    let mut needs = Vec::new();
    for (id, o) in child_maps(doc, &container(doc, "needs")?)? {
        let (history, status) = need_status(doc, &o)?;
        let fulfilled_at = (status.status == NeedStatus::Fulfilled)
            .then(|| status.decided_by.as_ref().map(|e| e.at))
            .flatten();
        needs.push(Need {
            zone: zone.clone(),
            household: get_str(doc, &o, "household")?.unwrap_or_default(),
            category: get_str(doc, &o, "category")?
                .and_then(|c| NeedCategory::parse(&c).ok())
                .unwrap_or(NeedCategory::Other),
            detail: get_str(doc, &o, "detail")?.unwrap_or_default(),
            priority: need_priority(doc, &o)?,
            assignee: get_str(doc, &o, "assignee")?,
            status,
            history,
            requested_at: get_i64(doc, &o, "requested_at")?.unwrap_or(0),
            fulfilled_at,
            notes: get_str(doc, &o, "notes")?.unwrap_or_default(),
            created_by: get_str(doc, &o, "created_by")?.unwrap_or_default(),
            device: get_str(doc, &o, "device")?.unwrap_or_default(),
            id,
        });
    }
    needs.sort_by(|a, b| (a.requested_at, &a.id).cmp(&(b.requested_at, &b.id)));
    Ok(HouseholdsView {
        zone,
        schema: schema_of(doc)?,
        households,
        needs,
    })
}

/// Whether the book holds an open need of urgent priority or above: the same answer
/// as [`view`]'s needs, reading only each need's priority and, for the urgent ones,
/// its status (a sync orders its pushes by this; the whole view costs far more).
pub fn has_open_urgent_need(doc: &Automerge) -> Result<bool, Error> {
    for (_, o) in child_maps(doc, &container(doc, "needs")?)? {
        if need_priority(doc, &o)? >= Priority::Urgent
            && !need_status(doc, &o)?.1.status.is_closed()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A need's priority; an unknown one from a newer build is treated as urgent, never
/// dropped.
fn need_priority(doc: &Automerge, need: &ObjId) -> Result<Priority, Error> {
    Ok(get_str(doc, need, "priority")?
        .map(|p| Priority::parse(&p).unwrap_or(Priority::Urgent))
        .unwrap_or(Priority::Routine))
}

/// A need's status entries and the status they come to.
fn need_status(
    doc: &Automerge,
    need: &ObjId,
) -> Result<(Vec<StatusEntry>, Derived<NeedStatus>), Error> {
    let history = match child_map(doc, need, "status_log")? {
        Some(log) => workflow::entries(doc, &log)?,
        None => Vec::new(),
    };
    let status = workflow::derive(&history);
    Ok((history, status))
}

/// Sorts needs most pressing first: by priority (emergency first), then oldest request.
pub fn sort_by_urgency(needs: &mut [Need]) {
    needs.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.requested_at.cmp(&b.requested_at))
            .then(a.id.cmp(&b.id))
    });
}

/// The distinct vulnerability flags, parsed (unknown ones skipped).
pub fn known_flags(h: &Household) -> BTreeSet<Vulnerability> {
    h.flags
        .iter()
        .filter_map(|f| Vulnerability::parse(f).ok())
        .collect()
}
