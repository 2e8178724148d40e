//! What a token allows, per document kind:
//!
//! | document | read | write |
//! |---|---|---|
//! | `ledger/<team>/<day>` | the team's tokens, operators | same |
//! | `households/<zone>` | tokens covering the zone, operators | same |
//! | `roster/<org>` | every token | leads, operators |
//!
//! The relay answers a request outside the scope with `forbidden`, whether or not the
//! document exists, so the answer reveals nothing.

use redline_proto::message::Subscription;
use redline_proto::token::{Claims, Role};
use redline_proto::{DocId, DocKind};

/// The documents one connection may touch.
#[derive(Clone, Debug)]
pub struct Scope {
    claims: Claims,
}

impl Scope {
    /// The scope of a verified token.
    pub fn new(claims: Claims) -> Self {
        Self { claims }
    }

    /// The token's claims.
    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    fn operator(&self) -> bool {
        self.claims.role == Role::Operator
    }

    /// Whether the holder may receive `doc`.
    pub fn can_read(&self, doc: &DocId) -> bool {
        if self.operator() {
            return true;
        }
        match doc.kind() {
            DocKind::Ledger(team, _) => self.claims.teams.contains(&team),
            DocKind::Households(zone) => self.claims.zones.contains(&zone),
            DocKind::Roster(_) => true,
        }
    }

    /// Whether the holder may change `doc`.
    pub fn can_write(&self, doc: &DocId) -> bool {
        match doc.kind() {
            DocKind::Roster(_) => self.claims.role >= Role::Lead,
            _ => self.can_read(doc),
        }
    }

    /// The part of `wanted` this scope allows: what the device will receive.
    pub fn grant(&self, wanted: &Subscription) -> Subscription {
        if self.operator() {
            return wanted.clone();
        }
        Subscription {
            org: wanted.org.clone(),
            teams: wanted
                .teams
                .iter()
                .filter(|t| self.claims.teams.contains(t))
                .cloned()
                .collect(),
            ledger_since: wanted.ledger_since.clone(),
            zones: wanted
                .zones
                .iter()
                .filter(|z| self.claims.zones.contains(z))
                .cloned()
                .collect(),
            docs: wanted
                .docs
                .iter()
                .filter(|d| self.can_read(d))
                .cloned()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redline_proto::token::TokenId;
    use redline_proto::{DeviceId, MemberId, OrgId, TeamId, ZoneId};

    fn scope(role: Role) -> Scope {
        Scope::new(Claims {
            id: TokenId([0; 16]),
            device: DeviceId::new("p").unwrap(),
            member: MemberId::new("m").unwrap(),
            role,
            teams: vec![TeamId::new("t3").unwrap()],
            zones: vec![ZoneId::new("z1").unwrap()],
            issued: 0,
            expires: u64::MAX,
        })
    }

    fn doc(s: &str) -> DocId {
        DocId::parse(s).unwrap()
    }

    #[test]
    fn the_table_holds() {
        let v = scope(Role::Volunteer);
        assert!(
            v.can_read(&doc("ledger/t3/2026-11-29")) && v.can_write(&doc("ledger/t3/2026-11-29"))
        );
        assert!(!v.can_read(&doc("ledger/t5/2026-11-29")));
        assert!(v.can_read(&doc("households/z1")) && !v.can_read(&doc("households/z2")));
        assert!(v.can_read(&doc("roster/org")) && !v.can_write(&doc("roster/org")));
        assert!(scope(Role::Lead).can_write(&doc("roster/org")));
        assert!(!scope(Role::Lead).can_read(&doc("ledger/t5/2026-11-29")));
        let o = scope(Role::Operator);
        assert!(o.can_write(&doc("ledger/t5/2026-11-29")) && o.can_write(&doc("households/z9")));
    }

    #[test]
    fn subscriptions_are_narrowed_to_the_scope() {
        let wanted = Subscription {
            org: Some(OrgId::new("org").unwrap()),
            teams: vec![TeamId::new("t3").unwrap(), TeamId::new("t5").unwrap()],
            ledger_since: None,
            zones: vec![ZoneId::new("z1").unwrap(), ZoneId::new("z2").unwrap()],
            docs: vec![doc("ledger/t5/2026-11-01"), doc("ledger/t3/2026-11-01")],
        };
        let g = scope(Role::Volunteer).grant(&wanted);
        assert_eq!(g.teams, vec![TeamId::new("t3").unwrap()]);
        assert_eq!(g.zones, vec![ZoneId::new("z1").unwrap()]);
        assert_eq!(g.docs, vec![doc("ledger/t3/2026-11-01")]);
        assert_eq!(scope(Role::Operator).grant(&wanted), wanted);
    }
}
