//! UniFFI bindings of the Redline client for Kotlin (Android) and Swift (iOS).
//!
//! A thin, explicit layer: owned records across the boundary, one error enum, no business
//! logic. This first cut exposes opening a store and the day-ledger basics; the mobile
//! FFI work grows it to the whole domain API, observers and async sync.

use std::sync::Arc;

use redline_client::{Client, ClientConfig};
use redline_proto::{Day, MemberId, TeamId};

uniffi::setup_scaffolding!();

/// Errors crossing the boundary: a code-like variant and a message.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
#[non_exhaustive]
pub enum RedlineError {
    /// The caller passed something invalid.
    #[error("{0}")]
    InvalidInput(String),
    /// The device store failed.
    #[error("{0}")]
    Storage(String),
    /// Anything else from the client core.
    #[error("{0}")]
    Internal(String),
}

impl From<redline_client::Error> for RedlineError {
    fn from(e: redline_client::Error) -> Self {
        match e {
            redline_client::Error::Invalid(_) | redline_client::Error::Protocol(_) => {
                RedlineError::InvalidInput(e.to_string())
            }
            redline_client::Error::Store(_) | redline_client::Error::Corrupt(_) => {
                RedlineError::Storage(e.to_string())
            }
            other => RedlineError::Internal(other.to_string()),
        }
    }
}

impl From<redline_proto::Error> for RedlineError {
    fn from(e: redline_proto::Error) -> Self {
        RedlineError::InvalidInput(e.to_string())
    }
}

/// The protocol version this library speaks.
#[uniffi::export]
pub fn protocol_version() -> u16 {
    redline_proto::PROTOCOL_VERSION
}

/// A device's Redline store.
#[derive(uniffi::Object)]
pub struct RedlineClient {
    client: Client,
}

#[uniffi::export]
impl RedlineClient {
    /// Opens (or creates) the store in `data_dir` for `member`. Quick: local disk only.
    #[uniffi::constructor]
    pub fn open(data_dir: String, member: String) -> Result<Arc<Self>, RedlineError> {
        let config = ClientConfig::new(MemberId::new(member)?);
        Ok(Arc::new(Self {
            client: Client::open(data_dir, config)?,
        }))
    }

    /// This install's device id.
    pub fn device_id(&self) -> String {
        self.client.identity().device.to_string()
    }

    /// Checks the member in for duty on `team`'s ledger of `day` (`YYYY-MM-DD`).
    pub fn check_in(&self, team: String, day: String) -> Result<(), RedlineError> {
        Ok(self.client.check_in(&TeamId::new(team)?, &Day::new(day)?)?)
    }

    /// Adds `amount` to the day's tally `metric`.
    pub fn add_to_tally(
        &self,
        team: String,
        day: String,
        metric: String,
        amount: u32,
    ) -> Result<(), RedlineError> {
        Ok(self
            .client
            .add_to_tally(&TeamId::new(team)?, &Day::new(day)?, &metric, amount)?)
    }

    /// The day's total of `metric` (0 if none).
    pub fn tally_total(
        &self,
        team: String,
        day: String,
        metric: String,
    ) -> Result<i64, RedlineError> {
        let view = self.client.ledger(&TeamId::new(team)?, &Day::new(day)?)?;
        Ok(view
            .and_then(|v| v.tallies.get(&metric).copied())
            .unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_round_trip_through_the_binding_layer() {
        let dir = tempfile::tempdir().unwrap();
        let c = RedlineClient::open(dir.path().to_string_lossy().into(), "amira".into()).unwrap();
        c.add_to_tally("t1".into(), "2026-11-29".into(), "samples_taken".into(), 3)
            .unwrap();
        assert_eq!(
            c.tally_total("t1".into(), "2026-11-29".into(), "samples_taken".into())
                .unwrap(),
            3
        );
        let err = c
            .add_to_tally("t1".into(), "2026-13-01".into(), "x".into(), 1)
            .unwrap_err();
        assert!(matches!(err, RedlineError::InvalidInput(_)), "{err:?}");
    }
}
