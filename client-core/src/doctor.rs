//! `doctor`: why is this phone not syncing? Checks, in order, what can be checked on the
//! phone (relay configured, token present and unexpired, data budget) and then what the
//! relay says (reachable, certificate, token accepted, subscription in scope), and
//! explains each finding in plain words.

use std::time::Duration;

use redline_proto::codec;
use redline_proto::message::{ErrorReport, Hello, Message, QuarantineEntry};
use redline_proto::{ErrorCode, PROTOCOL_VERSION};

use crate::{Client, Error};

/// One thing the doctor found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// Everything checked is fine: syncing should work.
    Healthy,
    /// No relay is configured.
    NoRelay,
    /// No device token is configured.
    NoToken,
    /// The token's expiry has passed (checked on the phone).
    TokenExpired,
    /// The relay did not answer in time: no network, or the relay is down or elsewhere.
    Unreachable(String),
    /// The relay's certificate is not the pinned one.
    PinMismatch {
        /// Pinned.
        expected: String,
        /// Presented.
        seen: String,
    },
    /// The relay refused the token.
    Refused {
        /// The relay's code.
        code: ErrorCode,
        /// Its words.
        text: String,
    },
    /// Part of the subscription is outside the token's scope.
    OutOfScope(Vec<String>),
    /// The phone came back after too long offline: its changes wait for a lead's review.
    Quarantined {
        /// How long it had been offline (ms).
        offline_ms: i64,
    },
    /// Today's metered data budget is spent: only urgent documents go.
    BudgetReached {
        /// Bytes used today on metered networks.
        used: u64,
        /// The cap.
        cap: u64,
    },
}

impl Finding {
    /// The finding in plain words, with what to do.
    pub fn explain(&self) -> String {
        match self {
            Finding::Healthy => "all checks passed: this phone can sync".into(),
            Finding::NoRelay => {
                "no relay is configured: log in with the relay's address and fingerprint".into()
            }
            Finding::NoToken => "no device token: ask your lead or operator for one".into(),
            Finding::TokenExpired => {
                "the device token has expired: ask your lead for a new one".into()
            }
            Finding::Unreachable(detail) => format!(
                "the relay cannot be reached ({detail}): check the network (signal, Wi-Fi) and the relay address; your work is safe on the phone"
            ),
            Finding::PinMismatch { expected, seen } => format!(
                "the relay's certificate ({seen}) is not the pinned one ({expected}): you may be talking to the wrong relay; check the address, or re-pin if the relay's certificate was replaced"
            ),
            Finding::Refused { code, text } => match *code {
                ErrorCode::TOKEN_EXPIRED => format!(
                    "the relay says the token has expired ({text}): ask your lead for a new one"
                ),
                ErrorCode::TOKEN_REVOKED => {
                    format!("the token was revoked ({text}): ask your lead for a new one")
                }
                _ => format!(
                    "the relay refused this phone's token ({code}: {text}): ask your lead for a valid one"
                ),
            },
            Finding::OutOfScope(parts) => format!(
                "your token does not cover {}: those documents will not sync; ask your lead to widen the token or fix the phone's teams and zones",
                parts.join(", ")
            ),
            Finding::Quarantined { offline_ms } => format!(
                "this phone was offline for {} h, longer than the relay allows: its changes are kept on the relay but wait for your lead to review and accept them",
                offline_ms / 3_600_000
            ),
            Finding::BudgetReached { used, cap } => format!(
                "today's mobile data budget is spent ({used} of {cap} bytes): only urgent records sync until Wi-Fi or tomorrow"
            ),
        }
    }
}

impl Client {
    /// Diagnoses why syncing might not work. Talks to the relay (a hello, nothing
    /// written) within `timeout`.
    pub async fn diagnose(&self, timeout: Duration) -> Vec<Finding> {
        let mut findings = Vec::new();
        let config = &self.inner.config;
        let Ok(relay) = self.current_relay() else {
            return vec![Finding::NoRelay];
        };
        match &config.token {
            None => findings.push(Finding::NoToken),
            Some(t) => {
                let now = (config.clock.now_ms() / 1000).max(0) as u64;
                if redline_proto::token::peek(t).is_ok_and(|c| now >= c.expires) {
                    findings.push(Finding::TokenExpired);
                }
            }
        }
        if let (Some(cap), true) = (
            config.policy.metered_daily_cap,
            self.inner
                .conditions
                .lock()
                .expect("conditions lock")
                .network
                == crate::Network::Metered,
        ) && let Ok((_, used)) = self.metered_today()
            && used >= cap
        {
            findings.push(Finding::BudgetReached { used, cap });
        }
        match tokio::time::timeout(timeout, self.probe(&relay)).await {
            Err(_) => findings.push(Finding::Unreachable(format!(
                "no answer from {} in {timeout:?}",
                relay.addr
            ))),
            Ok(Err(Error::PinMismatch { expected, seen })) => {
                findings.push(Finding::PinMismatch { expected, seen })
            }
            Ok(Err(e)) => findings.push(Finding::Unreachable(e.to_string())),
            Ok(Ok(Some(f))) => findings.push(f),
            Ok(Ok(None)) => {}
        }
        if findings.is_empty() {
            findings.push(Finding::Healthy);
        }
        findings
    }

    /// Says hello to the relay; what it answers, as a finding (`None`: welcomed with the
    /// whole subscription).
    async fn probe(&self, relay: &crate::RelayEndpoint) -> Result<Option<Finding>, Error> {
        let wanted = self.subscription()?;
        let (answer, _, _) = self.exchange(relay, None).await?;
        Ok(match answer {
            Message::Error(r) => Some(Finding::Refused {
                code: r.code,
                text: r.text,
            }),
            Message::Welcome(w) if w.quarantined.is_some() => Some(Finding::Quarantined {
                offline_ms: w.quarantined.unwrap_or(0),
            }),
            Message::Welcome(w) => {
                let g = w.granted;
                let mut missing = lacking(&wanted.teams, &g.teams, "team ");
                missing.extend(lacking(&wanted.zones, &g.zones, "zone "));
                missing.extend(lacking(&wanted.docs, &g.docs, ""));
                (!missing.is_empty()).then_some(Finding::OutOfScope(missing))
            }
            other => Some(Finding::Unreachable(format!(
                "unexpected answer: {}",
                other.kind()
            ))),
        })
    }

    /// The relay's health view of `team`'s devices (for its leads and operators): last
    /// seen, last sync, versions, bytes today, updates not yet received.
    pub async fn device_health(
        &self,
        team: &redline_proto::TeamId,
    ) -> Result<Vec<redline_proto::message::DeviceHealth>, Error> {
        let relay = self.current_relay()?;
        let (answer, reply, _) = self
            .exchange(&relay, Some(Message::DevicesRequest(team.clone())))
            .await?;
        let refused = |r: ErrorReport| Error::Refused {
            code: r.code,
            text: r.text,
        };
        match (answer, reply) {
            (Message::Error(r), _) | (_, Some(Message::Error(r))) => Err(refused(r)),
            (Message::Welcome(_), Some(Message::Devices(list))) => Ok(list),
            _ => Err(Error::transport("the relay did not answer the request")),
        }
    }

    /// Changes the relay holds in quarantine for `team` (for its leads and operators).
    pub async fn quarantine(
        &self,
        team: &redline_proto::TeamId,
    ) -> Result<Vec<redline_proto::message::QuarantineEntry>, Error> {
        self.quarantine_exchange(Message::QuarantineRequest(team.clone()))
            .await
            .map(|r| r.remaining)
    }

    /// Merges what `device` has held in quarantine for `team` after review. Each held
    /// push merges on its own: the review says what stays held and which held pushes
    /// the relay refused (and dropped), with why.
    pub async fn accept_quarantined(
        &self,
        team: &redline_proto::TeamId,
        device: &redline_proto::DeviceId,
    ) -> Result<QuarantineReview, Error> {
        self.quarantine_exchange(Message::QuarantineAccept {
            team: team.clone(),
            device: device.clone(),
        })
        .await
    }

    async fn quarantine_exchange(&self, request: Message) -> Result<QuarantineReview, Error> {
        let relay = self.current_relay()?;
        let (answer, reply, refused) = self.exchange(&relay, Some(request)).await?;
        match (answer, reply) {
            (Message::Error(r), _) | (_, Some(Message::Error(r))) => Err(Error::Refused {
                code: r.code,
                text: r.text,
            }),
            (Message::Welcome(_), Some(Message::Quarantine(remaining))) => {
                Ok(QuarantineReview { remaining, refused })
            }
            _ => Err(Error::transport("the relay did not answer the request")),
        }
    }

    /// Opens a connection, says hello, optionally sends `then`, and returns the relay's
    /// answer to the hello and its answer to `then` (if sent), with the per-document
    /// error reports that came before that answer. Writes nothing.
    async fn exchange(
        &self,
        relay: &crate::RelayEndpoint,
        then: Option<Message>,
    ) -> Result<(Message, Option<Message>, Vec<ErrorReport>), Error> {
        let (_endpoint, conn) = crate::transport::open_connection(relay).await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(Error::network)?;
        let hello = Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            device: self.inner.identity.device.clone(),
            app_version: self.inner.config.app_version.clone(),
            subscription: self.subscription()?,
            token: self.inner.config.token.clone().unwrap_or_default(),
        });
        let send_one = |m: &Message| codec::encode_frame(m, codec::DEFAULT_MAX_FRAME);
        send.write_all(&send_one(&hello)?)
            .await
            .map_err(Error::network)?;
        let mut decoder = codec::FrameDecoder::new(codec::DEFAULT_MAX_FRAME);
        let mut next = async || -> Result<Message, Error> {
            loop {
                if let Some(m) = decoder.next_message()? {
                    return Ok(m);
                }
                match recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => decoder.push(&chunk.bytes),
                    Ok(None) => return Err(Error::transport("the relay closed the stream")),
                    Err(e) => return Err(Error::network(e)),
                }
            }
        };
        let answer = next().await?;
        let mut notes = Vec::new();
        let reply = match then {
            Some(m) if matches!(answer, Message::Welcome(_)) => {
                send.write_all(&send_one(&m)?)
                    .await
                    .map_err(Error::network)?;
                loop {
                    match next().await? {
                        Message::Error(r) if r.doc.is_some() => notes.push(r),
                        other => break Some(other),
                    }
                }
            }
            _ => None,
        };
        let _ = send.finish();
        conn.close(0u8.into(), b"done");
        Ok((answer, reply, notes))
    }
}

/// The outcome of a lead's quarantine review.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuarantineReview {
    /// What stays held for the team.
    pub remaining: Vec<QuarantineEntry>,
    /// Held pushes the relay refused to merge (and dropped), each with its document,
    /// code and reason.
    pub refused: Vec<ErrorReport>,
}

/// What of `wanted` is not in `granted`, each named with `prefix`.
fn lacking<T: PartialEq + std::fmt::Display>(
    wanted: &[T],
    granted: &[T],
    prefix: &str,
) -> Vec<String> {
    wanted
        .iter()
        .filter(|w| !granted.contains(w))
        .map(|w| format!("{prefix}{w}"))
        .collect()
}
