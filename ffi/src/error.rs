//! The one error type crossing the boundary. Kotlin sees `RedlineException` with one
//! subclass per variant, Swift a `RedlineError` enum; the variant is the code, `reason`
//! the message (plain words, no household data).

/// Everything a call can fail with.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[non_exhaustive]
pub enum RedlineError {
    /// A parameter is invalid (a bad day, an unknown priority...): fix the call.
    #[error("{reason}")]
    InvalidInput {
        /// What was expected.
        reason: String,
    },
    /// The task, need or document named does not exist on this device.
    #[error("{reason}")]
    NotFound {
        /// What was missing.
        reason: String,
    },
    /// The device's store failed (disk full, damaged): local data may need attention.
    #[error("{reason}")]
    Storage {
        /// What failed.
        reason: String,
    },
    /// The relay could not be reached or the connection broke; local data is intact:
    /// retry later.
    #[error("{reason}")]
    Network {
        /// What failed.
        reason: String,
    },
    /// The relay presented a certificate other than the pinned one.
    #[error("{reason}")]
    CertificateMismatch {
        /// Expected and seen fingerprints.
        reason: String,
    },
    /// The relay refused the session: `code` is the relay's error code (7 unauthorized,
    /// 14 token expired, 15 token revoked, 16 rate limited, ...), `name` its name.
    #[error("{name}: {reason}")]
    Refused {
        /// The relay's numeric code.
        code: u16,
        /// The code's name (`unauthorized`, `token_expired`, `token_revoked`...).
        name: String,
        /// The relay's explanation.
        reason: String,
    },
    /// The client was shut down; open a new one.
    #[error("{reason}")]
    Closed {
        /// What was attempted.
        reason: String,
    },
    /// A bug: the core failed unexpectedly (a panic is caught and reported here).
    #[error("{reason}")]
    Internal {
        /// What happened.
        reason: String,
    },
}

impl From<redline_client::Error> for RedlineError {
    fn from(e: redline_client::Error) -> Self {
        use redline_client::Error as E;
        let reason = e.to_string();
        match e {
            E::Invalid(_) | E::NoRelay => RedlineError::InvalidInput { reason },
            E::NotFound(_) => RedlineError::NotFound { reason },
            E::Store(_) | E::Sled(_) | E::Corrupt(_) => RedlineError::Storage { reason },
            E::Transport { .. } => RedlineError::Network { reason },
            E::PinMismatch { .. } => RedlineError::CertificateMismatch { reason },
            E::Refused { code, text } => RedlineError::Refused {
                code: code.0,
                name: code.name().to_string(),
                reason: text,
            },
            E::Automerge(_) | E::Protocol(_) => RedlineError::Internal { reason },
            _ => RedlineError::Internal { reason },
        }
    }
}

impl From<redline_proto::Error> for RedlineError {
    fn from(e: redline_proto::Error) -> Self {
        RedlineError::InvalidInput {
            reason: e.to_string(),
        }
    }
}

/// Runs `f`, turning a panic into [`RedlineError::Internal`]: no panic crosses the
/// boundary.
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T, RedlineError>) -> Result<T, RedlineError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(RedlineError::Internal {
            reason: format!("internal failure (please report): {what}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error() {
        let r: Result<(), _> = guard(|| panic!("boom"));
        match r {
            Err(RedlineError::Internal { reason }) => assert!(reason.contains("boom")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn relay_refusals_keep_their_code() {
        let e = RedlineError::from(redline_client::Error::Refused {
            code: redline_proto::ErrorCode::TOKEN_REVOKED,
            text: "revoked".into(),
        });
        assert!(
            matches!(e, RedlineError::Refused { code: 15, ref name, .. } if name == "token_revoked")
        );
    }
}
