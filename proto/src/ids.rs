//! Identifiers that name documents, teams, zones and devices.
//!
//! A document id is also an access-control decision: `ledger/<team>/<day>` belongs to a
//! team, `households/<zone>` to a zone, `roster/<org>` to everyone in the org. So ids are
//! parsed and validated once, at the edge, and carried as types afterwards.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Longest accepted name segment (team, zone, org, device, member).
pub const MAX_SEGMENT_LEN: usize = 64;

fn check_segment(what: &'static str, s: &str) -> Result<(), Error> {
    let ok = s.len() <= MAX_SEGMENT_LEN
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidId {
            what,
            value: s.chars().take(80).collect(),
            rule: "1 to 64 characters from A-Z a-z 0-9 - _ ., starting with a letter or digit",
        })
    }
}

macro_rules! segment_id {
    ($(#[$meta:meta])* $name:ident, $what:literal) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `s` and wraps it.
            pub fn new(s: impl Into<String>) -> Result<Self, Error> {
                let s = s.into();
                check_segment($what, &s)?;
                Ok(Self(s))
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                Self::new(s)
            }
        }
        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::new(s)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

segment_id!(
    /// A working group of 10 to 50 members, e.g. `team-3`.
    TeamId,
    "team id"
);
segment_id!(
    /// An area a team covers: a village, a community, a building.
    ZoneId,
    "zone id"
);
segment_id!(
    /// The organisation (the temporary command) that owns a roster.
    OrgId,
    "org id"
);
segment_id!(
    /// One install of the app on one phone. Never shared between phones.
    DeviceId,
    "device id"
);
segment_id!(
    /// A person: a volunteer, a lead or an operator.
    MemberId,
    "member id"
);

/// A calendar day, `YYYY-MM-DD`, that partitions a team's ledger.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Day(String);

impl Day {
    /// Validates a `YYYY-MM-DD` date (month 1–12, day valid for the month).
    pub fn new(s: impl Into<String>) -> Result<Self, Error> {
        let s = s.into();
        let bad = || Error::InvalidId {
            what: "day",
            value: s.chars().take(80).collect(),
            rule: "a date written YYYY-MM-DD",
        };
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return Err(bad());
        }
        let num = |r: std::ops::Range<usize>| -> Option<u32> {
            let part = &s[r];
            if part.bytes().all(|c| c.is_ascii_digit()) {
                part.parse().ok()
            } else {
                None
            }
        };
        let (Some(y), Some(m), Some(d)) = (num(0..4), num(5..7), num(8..10)) else {
            return Err(bad());
        };
        let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let days_in_month = match m {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return Err(bad()),
        };
        if d == 0 || d > days_in_month {
            return Err(bad());
        }
        Ok(Self(s))
    }
    /// The day as `YYYY-MM-DD`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Days since 1970-01-01 (negative before).
    pub fn days_since_epoch(&self) -> i64 {
        let n = |r: std::ops::Range<usize>| self.0[r].parse::<i64>().unwrap_or(0);
        days_from_civil(n(0..4), n(5..7), n(8..10))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod day_tests {
    use super::Day;

    #[test]
    fn days_count_from_the_epoch() {
        assert_eq!(Day::new("1970-01-01").unwrap().days_since_epoch(), 0);
        assert_eq!(Day::new("2000-03-01").unwrap().days_since_epoch(), 11_017);
        assert_eq!(Day::new("2026-12-01").unwrap().days_since_epoch(), 20_788);
        assert_eq!(Day::new("0000-01-01").unwrap().days_since_epoch(), -719_528);
    }
}

impl TryFrom<String> for Day {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Self::new(s)
    }
}
impl From<Day> for String {
    fn from(d: Day) -> String {
        d.0
    }
}
impl FromStr for Day {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}
impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a document holds, parsed from its id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DocKind {
    /// `roster/<org>`: teams, members, zones, coverage.
    Roster(OrgId),
    /// `ledger/<team>/<day>`: one team's work ledger for one day.
    Ledger(TeamId, Day),
    /// `households/<zone>`: the households of one zone and their needs.
    Households(ZoneId),
}

/// A document id such as `ledger/team-3/2026-11-29`. Always one of the [`DocKind`]s.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DocId(String);

impl DocId {
    /// The ledger of `team` for `day`.
    pub fn ledger(team: &TeamId, day: &Day) -> Self {
        Self(format!("ledger/{team}/{day}"))
    }
    /// The households book of `zone`.
    pub fn households(zone: &ZoneId) -> Self {
        Self(format!("households/{zone}"))
    }
    /// The roster of `org`.
    pub fn roster(org: &OrgId) -> Self {
        Self(format!("roster/{org}"))
    }
    /// Parses and validates a document id.
    pub fn parse(s: &str) -> Result<Self, Error> {
        Self::kind_of(s)?;
        Ok(Self(s.to_owned()))
    }
    fn kind_of(s: &str) -> Result<DocKind, Error> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            ["ledger", team, day] => Ok(DocKind::Ledger(TeamId::new(*team)?, Day::new(*day)?)),
            ["households", zone] => Ok(DocKind::Households(ZoneId::new(*zone)?)),
            ["roster", org] => Ok(DocKind::Roster(OrgId::new(*org)?)),
            _ => Err(Error::InvalidId {
                what: "document id",
                value: s.chars().take(80).collect(),
                rule: "ledger/<team>/<YYYY-MM-DD>, households/<zone> or roster/<org>",
            }),
        }
    }
    /// What the document holds.
    pub fn kind(&self) -> DocKind {
        // Validated at construction, so parsing again cannot fail.
        Self::kind_of(&self.0).unwrap_or_else(|_| unreachable!("DocId validated at construction"))
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for DocId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Self::kind_of(&s)?;
        Ok(Self(s))
    }
}
impl From<DocId> for String {
    fn from(d: DocId) -> String {
        d.0
    }
}
impl FromStr for DocId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}
impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_ids_round_trip_through_their_kind() {
        let team = TeamId::new("team-3").unwrap();
        let day = Day::new("2026-11-29").unwrap();
        let id = DocId::ledger(&team, &day);
        assert_eq!(id.as_str(), "ledger/team-3/2026-11-29");
        assert_eq!(id.kind(), DocKind::Ledger(team, day));
        assert_eq!(
            DocId::parse("households/zone-a").unwrap().kind(),
            DocKind::Households(ZoneId::new("zone-a").unwrap())
        );
    }

    #[test]
    fn bad_ids_are_refused_with_the_rule() {
        for bad in [
            "",
            "ledger/a",
            "ledger/a/2026-13-01",
            "ledger/a/2026-02-30",
            "roster/",
            "x/y",
            "ledger/a b/2026-01-01",
            "households/../etc",
            "households/..",
        ] {
            assert!(DocId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Day::new("2024-02-29").is_ok());
        assert!(Day::new("2023-02-29").is_err());
        let err = TeamId::new("").unwrap_err().to_string();
        assert!(err.contains("team id"), "{err}");
    }
}
