//! UniFFI bindings of the Redline client for Kotlin (Android) and Swift (iOS).
//!
//! A thin, explicit layer over `redline-client`: owned records across the boundary
//! ([`records`]), one error enum ([`RedlineError`]), observers called on background
//! threads ([`observers`]), and [`RedlineClient`], which owns its tokio runtime. No
//! business logic lives here. Generate the bindings with `ffi/scripts/bindings.sh`.

mod client;
mod error;
pub mod observers;
pub mod records;

pub use client::RedlineClient;
pub use error::RedlineError;

uniffi::setup_scaffolding!();

/// The protocol version this library speaks.
#[uniffi::export]
pub fn protocol_version() -> u16 {
    redline_proto::PROTOCOL_VERSION
}

#[cfg(test)]
mod tests {
    use super::records::*;
    use super::*;

    fn settings(member: &str) -> ClientSettings {
        ClientSettings {
            member: member.into(),
            org: None,
            relay: None,
            token: None,
            teams: vec!["t1".into()],
            zones: vec!["z1".into()],
            keep_days: 7,
            other_relays: Vec::new(),
            home_relay_by_team: false,
        }
    }

    #[test]
    fn ledger_and_needs_round_trip_through_the_binding_layer() {
        let dir = tempfile::tempdir().unwrap();
        let c =
            RedlineClient::open(dir.path().to_string_lossy().into(), settings("amira")).unwrap();
        c.add_to_tally("t1".into(), "2026-11-29".into(), "samples_taken".into(), 3)
            .unwrap();
        let ledger = c.ledger("t1".into(), "2026-11-29".into()).unwrap().unwrap();
        assert_eq!(
            ledger.tallies,
            vec![TallyRecord {
                metric: "samples_taken".into(),
                total: 3
            }]
        );
        let err = c
            .add_to_tally("t1".into(), "2026-13-01".into(), "x".into(), 1)
            .unwrap_err();
        assert!(matches!(err, RedlineError::InvalidInput { .. }), "{err:?}");
        let h = c
            .add_household(
                "z1".into(),
                NewHouseholdRecord {
                    address: "Block 7".into(),
                    residents: 2,
                    contact: None,
                    flags: vec!["elderly".into()],
                },
            )
            .unwrap();
        let bad = c.add_need(
            "z1".into(),
            NewNeedRecord {
                household: h.clone(),
                category: "food".into(),
                detail: "rice".into(),
                priority: "whenever".into(),
            },
        );
        assert!(matches!(bad, Err(RedlineError::InvalidInput { .. })));
        c.add_need(
            "z1".into(),
            NewNeedRecord {
                household: h,
                category: "food".into(),
                detail: "rice".into(),
                priority: "urgent".into(),
            },
        )
        .unwrap();
        assert_eq!(c.open_needs().unwrap().len(), 1);
        c.shutdown().unwrap();
        assert!(matches!(c.open_needs(), Err(RedlineError::Closed { .. })));
    }
}
