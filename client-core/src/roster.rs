//! The roster of an organisation (`roster/<org>`): teams, zones, which teams cover which
//! zones, members and their roles and teams.
//!
//! Layout (schema 1): flat maps of scalars, so that two leads adding the same team
//! offline make a visible, resolvable conflict on one value rather than two competing
//! sub-maps one of which Automerge would hide.
//!
//! ```text
//! { schema: 1, kind: "roster", org,
//!   teams: { <team>: name }, zones: { <zone>: name },
//!   coverage: { "<team>|<zone>": true },
//!   members: { <member>: name }, roles: { <member>: role },
//!   membership: { "<member>|<team>": true } }
//! ```

use std::collections::{BTreeMap, BTreeSet};

use automerge::transaction::{Transactable, Transaction};
use automerge::{Automerge, ROOT, ReadDoc};
use redline_proto::{MemberId, TeamId, ZoneId};
use serde::Serialize;

use crate::Error;
use crate::schema::{container, get_str, required_text, schema_of};

/// What a member may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Works in the field.
    Volunteer,
    /// Leads a team: assigns, reconciles, resolves.
    Lead,
    /// Runs the command: relay, credentials, teams and zones.
    Operator,
}

impl Role {
    /// The name stored in the document.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Volunteer => "volunteer",
            Role::Lead => "lead",
            Role::Operator => "operator",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Result<Self, Error> {
        match s {
            "volunteer" => Ok(Role::Volunteer),
            "lead" => Ok(Role::Lead),
            "operator" => Ok(Role::Operator),
            _ => Err(Error::Invalid(format!(
                "unknown role {s:?}: use volunteer, lead or operator"
            ))),
        }
    }
}

/// A team as read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TeamEntry {
    /// Team id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Zones it covers, sorted.
    pub zones: Vec<String>,
    /// Its members, sorted.
    pub members: Vec<String>,
}

/// A member as read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemberEntry {
    /// Member id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Role (volunteer if unknown).
    pub role: Role,
    /// Teams, sorted.
    pub teams: Vec<String>,
}

/// The typed view of a roster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RosterView {
    /// The organisation.
    pub org: String,
    /// Schema version.
    pub schema: u64,
    /// Teams by id.
    pub teams: BTreeMap<String, TeamEntry>,
    /// Zones by id, with their display names.
    pub zones: BTreeMap<String, String>,
    /// Members by id.
    pub members: BTreeMap<String, MemberEntry>,
}

impl RosterView {
    /// Errors unless `member` is on the roster.
    pub fn check_member(&self, member: &MemberId) -> Result<(), Error> {
        if self.members.contains_key(member.as_str()) {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "unknown member {member}: add them to the roster first"
            )))
        }
    }

    /// Errors unless `zone` is on the roster.
    pub fn check_zone(&self, zone: &ZoneId) -> Result<(), Error> {
        if self.zones.contains_key(zone.as_str()) {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "unknown zone {zone}: add it to the roster first"
            )))
        }
    }

    /// Errors unless `team` is on the roster.
    pub fn check_team(&self, team: &TeamId) -> Result<(), Error> {
        if self.teams.contains_key(team.as_str()) {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "unknown team {team}: add it to the roster first"
            )))
        }
    }

    /// Zones covered by any of `teams`.
    pub fn zones_of(&self, teams: &[String]) -> BTreeSet<String> {
        teams
            .iter()
            .filter_map(|t| self.teams.get(t))
            .flat_map(|t| t.zones.iter().cloned())
            .collect()
    }
}

fn pair(a: &str, b: &str) -> String {
    format!("{a}|{b}")
}

pub(crate) fn add_team(tx: &mut Transaction<'_>, team: &TeamId, name: &str) -> Result<(), Error> {
    let teams = container(tx, "teams")?;
    tx.put(
        &teams,
        team.as_str(),
        required_text("a team name", name, 100)?,
    )?;
    Ok(())
}

pub(crate) fn add_zone(tx: &mut Transaction<'_>, zone: &ZoneId, name: &str) -> Result<(), Error> {
    let zones = container(tx, "zones")?;
    tx.put(
        &zones,
        zone.as_str(),
        required_text("a zone name", name, 100)?,
    )?;
    Ok(())
}

pub(crate) fn set_coverage(
    tx: &mut Transaction<'_>,
    team: &TeamId,
    zone: &ZoneId,
    covers: bool,
) -> Result<(), Error> {
    let view = read(tx)?;
    view.check_team(team)?;
    view.check_zone(zone)?;
    let coverage = container(tx, "coverage")?;
    let key = pair(team.as_str(), zone.as_str());
    if covers {
        tx.put(&coverage, key.as_str(), true)?;
    } else if tx.get(&coverage, key.as_str())?.is_some() {
        tx.delete(&coverage, key.as_str())?;
    }
    Ok(())
}

pub(crate) fn add_member(
    tx: &mut Transaction<'_>,
    member: &MemberId,
    name: &str,
    role: Role,
    teams: &[TeamId],
) -> Result<(), Error> {
    let view = read(tx)?;
    for t in teams {
        view.check_team(t)?;
    }
    let members = container(tx, "members")?;
    tx.put(
        &members,
        member.as_str(),
        required_text("a member name", name, 100)?,
    )?;
    let roles = container(tx, "roles")?;
    tx.put(&roles, member.as_str(), role.as_str())?;
    let membership = container(tx, "membership")?;
    for t in teams {
        tx.put(
            &membership,
            pair(member.as_str(), t.as_str()).as_str(),
            true,
        )?;
    }
    Ok(())
}

pub(crate) fn set_role(
    tx: &mut Transaction<'_>,
    member: &MemberId,
    role: Role,
) -> Result<(), Error> {
    read(tx)?.check_member(member)?;
    let roles = container(tx, "roles")?;
    tx.put(&roles, member.as_str(), role.as_str())?;
    Ok(())
}

fn read<R: ReadDoc>(doc: &R) -> Result<RosterView, Error> {
    let map = |name: &str| -> Result<Vec<(String, String)>, Error> {
        let obj = container(doc, name)?;
        let mut out = Vec::new();
        for k in doc.keys(&obj) {
            let v = get_str(doc, &obj, &k)?.unwrap_or_default();
            out.push((k, v));
        }
        Ok(out)
    };
    let pairs = |name: &str| -> Result<Vec<(String, String)>, Error> {
        let obj = container(doc, name)?;
        Ok(doc
            .keys(&obj)
            .filter_map(|k| k.split_once('|').map(|(a, b)| (a.to_owned(), b.to_owned())))
            .collect())
    };
    let mut teams: BTreeMap<String, TeamEntry> = map("teams")?
        .into_iter()
        .map(|(id, name)| {
            (
                id.clone(),
                TeamEntry {
                    id,
                    name,
                    zones: Vec::new(),
                    members: Vec::new(),
                },
            )
        })
        .collect();
    let zones: BTreeMap<String, String> = map("zones")?.into_iter().collect();
    for (team, zone) in pairs("coverage")? {
        if let Some(t) = teams.get_mut(&team) {
            t.zones.push(zone);
        }
    }
    let roles: BTreeMap<String, String> = map("roles")?.into_iter().collect();
    let mut members: BTreeMap<String, MemberEntry> = map("members")?
        .into_iter()
        .map(|(id, name)| {
            let role = roles
                .get(&id)
                .and_then(|r| Role::parse(r).ok())
                .unwrap_or(Role::Volunteer);
            (
                id.clone(),
                MemberEntry {
                    id,
                    name,
                    role,
                    teams: Vec::new(),
                },
            )
        })
        .collect();
    for (member, team) in pairs("membership")? {
        if let Some(m) = members.get_mut(&member) {
            m.teams.push(team.clone());
        }
        if let Some(t) = teams.get_mut(&team) {
            t.members.push(member);
        }
    }
    for t in teams.values_mut() {
        t.zones.sort();
        t.members.sort();
    }
    for m in members.values_mut() {
        m.teams.sort();
    }
    Ok(RosterView {
        org: get_str(doc, &ROOT, "org")?.unwrap_or_default(),
        schema: schema_of(doc)?,
        teams,
        zones,
        members,
    })
}

/// Reads the typed view of a roster document.
pub fn view(doc: &Automerge) -> Result<RosterView, Error> {
    read(doc)
}
