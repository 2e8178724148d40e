//! Device tokens: signed, expiring statements of who a device is and what it may touch.
//!
//! A token is `rl1.<claims>.<mac>`: the [`Claims`] encoded with postcard, then an
//! HMAC-SHA256 over the `rl1.<claims>` text made with the relay's secret key, both in
//! unpadded base64url. Only the relay (which holds the key) issues and verifies tokens; a
//! device treats its token as an opaque string, though [`peek`] lets tools show what a
//! token says without trusting it.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::ids::{DeviceId, MemberId, TeamId, ZoneId};

const PREFIX: &str = "rl1.";

/// Length of a relay's token key in bytes.
pub const KEY_LEN: usize = 32;

/// What a token's holder is allowed to do beyond its own scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Works in the field: reads and writes its teams' ledgers and its zones' households,
    /// reads the roster.
    Volunteer,
    /// Leads a team: a volunteer who may also write the roster.
    Lead,
    /// Runs the relay: every document.
    Operator,
}

impl Role {
    /// The role's name as the CLI spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Volunteer => "volunteer",
            Role::Lead => "lead",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, TokenError> {
        match s {
            "volunteer" => Ok(Role::Volunteer),
            "lead" => Ok(Role::Lead),
            "operator" => Ok(Role::Operator),
            other => Err(TokenError::Malformed(format!(
                "unknown role {other:?}: expected volunteer, lead or operator"
            ))),
        }
    }
}

/// A token's id: what a revocation names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TokenId(pub [u8; 16]);

impl TokenId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Parses 32 hex digits.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let bytes = hex::decode(text.trim())
            .map_err(|_| TokenError::Malformed(format!("token id {text:?} is not hex")))?;
        let id: [u8; 16] = bytes.try_into().map_err(|_| {
            TokenError::Malformed(format!("token id {text:?}: expected 32 hex digits"))
        })?;
        Ok(Self(id))
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// What a token says about its holder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The token's id (for revocation).
    pub id: TokenId,
    /// The one device allowed to use it.
    pub device: DeviceId,
    /// The member the device belongs to.
    pub member: MemberId,
    /// What the holder may do.
    pub role: Role,
    /// Teams whose ledgers the holder reads and writes.
    pub teams: Vec<TeamId>,
    /// Zones whose households books the holder reads and writes.
    pub zones: Vec<ZoneId>,
    /// When it was issued (Unix seconds).
    pub issued: u64,
    /// When it stops being valid (Unix seconds).
    pub expires: u64,
}

/// Why a token is not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a Redline token at all, or damaged.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The signature does not match (forged, altered, or from another relay).
    #[error("token signature does not match: it was not issued by this relay, or was altered")]
    BadSignature,
    /// Past its expiry.
    #[error("token expired at {expired} (Unix seconds); ask your lead for a new one")]
    Expired {
        /// The expiry claim.
        expired: u64,
    },
    /// Issued later than the verifier's clock allows (a clock set wrong on one side).
    #[error(
        "token issued at {issued} (Unix seconds), later than this clock allows: check the clocks"
    )]
    NotYetValid {
        /// The issue claim.
        issued: u64,
    },
}

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8; KEY_LEN], signed: &str) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(signed.as_bytes());
    m
}

/// Signs `claims` with the relay's `key`.
pub fn sign(claims: &Claims, key: &[u8; KEY_LEN]) -> String {
    let body = postcard::to_allocvec(claims).expect("claims always encode");
    let signed = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(body));
    let tag = mac(key, &signed).finalize().into_bytes();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag))
}

fn split(token: &str) -> Result<(&str, &str), TokenError> {
    let token = token.trim();
    if !token.starts_with(PREFIX) {
        return Err(TokenError::Malformed(
            "a Redline token starts with \"rl1.\"".into(),
        ));
    }
    token
        .rsplit_once('.')
        .filter(|(signed, _)| signed.len() > PREFIX.len())
        .ok_or_else(|| TokenError::Malformed("missing signature".into()))
}

fn decode_claims(signed: &str) -> Result<Claims, TokenError> {
    let body = URL_SAFE_NO_PAD
        .decode(&signed[PREFIX.len()..])
        .map_err(|_| TokenError::Malformed("claims are not base64url".into()))?;
    postcard::from_bytes(&body).map_err(|_| TokenError::Malformed("claims do not decode".into()))
}

/// Checks `token`'s signature with `key` and its expiry against `now` (Unix seconds).
pub fn verify(token: &str, key: &[u8; KEY_LEN], now: u64) -> Result<Claims, TokenError> {
    let (signed, tag) = split(token)?;
    let tag = URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| TokenError::Malformed("signature is not base64url".into()))?;
    mac(key, signed)
        .verify_slice(&tag)
        .map_err(|_| TokenError::BadSignature)?;
    let claims = decode_claims(signed)?;
    if claims.issued > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
        return Err(TokenError::NotYetValid {
            issued: claims.issued,
        });
    }
    if now >= claims.expires {
        return Err(TokenError::Expired {
            expired: claims.expires,
        });
    }
    Ok(claims)
}

/// How far a token's issue time may lie ahead of the verifier's clock (clocks differ).
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;

/// What `token` claims, *without* checking its signature: for display only.
pub fn peek(token: &str) -> Result<Claims, TokenError> {
    let (signed, _) = split(token)?;
    decode_claims(signed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn claims() -> Claims {
        Claims {
            id: TokenId::random(),
            device: DeviceId::new("phone-1").unwrap(),
            member: MemberId::new("ana").unwrap(),
            role: Role::Volunteer,
            teams: vec![TeamId::new("t3").unwrap()],
            zones: vec![ZoneId::new("z1").unwrap()],
            issued: 100,
            expires: 200,
        }
    }

    #[test]
    fn a_signed_token_verifies_until_it_expires() {
        let key = [7u8; KEY_LEN];
        let c = claims();
        let t = sign(&c, &key);
        assert_eq!(verify(&t, &key, 150).unwrap(), c);
        assert_eq!(peek(&t).unwrap(), c);
        assert_eq!(
            verify(&t, &key, 200),
            Err(TokenError::Expired { expired: 200 })
        );
        assert_eq!(
            verify(&t, &[8u8; KEY_LEN], 150),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn altered_claims_break_the_signature() {
        let key = [7u8; KEY_LEN];
        let t = sign(&claims(), &key);
        let mut other = claims();
        other.role = Role::Operator;
        let forged_body = sign(&other, &[0u8; KEY_LEN]);
        let (body, _) = forged_body.rsplit_once('.').unwrap();
        let (_, tag) = t.rsplit_once('.').unwrap();
        assert_eq!(
            verify(&format!("{body}.{tag}"), &key, 150),
            Err(TokenError::BadSignature)
        );
        assert!(matches!(
            verify("garbage", &key, 0),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            verify("rl1.", &key, 0),
            Err(TokenError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn random_text_never_verifies_or_panics(s in ".{0,200}") {
            let key = [1u8; KEY_LEN];
            prop_assert!(verify(&s, &key, 0).is_err());
            let _ = peek(&s);
        }
    }
}
