//! The door of a connection: the device's `Hello` (version, token, extensions), the
//! relay's `Welcome` (what it granted, quarantine), and what the session starts from.

use std::time::Duration;

use quinn::{RecvStream, SendStream};
use redline_proto::codec;
use redline_proto::message::ext;
use redline_proto::message::{Hello, Message, Welcome};
use redline_proto::session::check_hello;
use redline_proto::{ErrorCode, MIN_PROTOCOL_VERSION};
use tracing::info;

use super::Shared;
use super::frames::{read_frame, write_frame, write_message};
use crate::Error;
use crate::access::Scope;
use crate::config::RelayConfig;
use crate::hub::staging::Arrival;
use crate::session::error_msg;
use crate::session::{Peer, SessionLimits};
use crate::state::RelayState;

/// What a device's hello says beyond its version's base (extensions: version 2 and
/// later only; a malformed value counts as not said).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Abilities {
    /// It reads several chunks in one payload.
    pub chunks: bool,
    /// It works out the relay's heads from what it applies.
    pub derives_heads: bool,
    /// The connection's attempt number (0: not said).
    pub attempt: u64,
}

impl Abilities {
    pub(super) fn of(ext: &codec::Extensions, version: u16) -> Self {
        let says = |tag| version >= 2 && matches!(ext.get::<bool>(tag), Ok(Some(true)));
        let attempt = match ext.get::<u64>(ext::HELLO_ATTEMPT) {
            Ok(Some(n)) if version >= 2 => n,
            _ => 0,
        };
        Self {
            chunks: says(ext::HELLO_ACCEPTS_CHUNKS),
            derives_heads: says(ext::HELLO_DERIVES_HEADS),
            attempt,
        }
    }

    /// Records them on the session's peer, whose connection was the relay's
    /// `accepted`th.
    pub(super) fn grant(self, peer: &mut Peer, accepted: u64) {
        peer.accepts_chunks = self.chunks;
        peer.derives_heads = self.derives_heads;
        peer.arrival = Arrival {
            attempt: self.attempt,
            accepted,
        };
    }
}

/// Reads the device's `Hello` and checks its version and token; also what its
/// extensions say it can do.
pub(super) async fn greet(
    send: &mut SendStream,
    recv: &mut RecvStream,
    shared: &Shared,
) -> Result<(Hello, Scope, Abilities), Error> {
    let config = &shared.config;
    let limits = &config.limits;
    let refuse = |code: ErrorCode, text: String| Error::Refused { code, text };
    // Before the token is checked, a frame may be small: a hello, nothing more.
    let first = read_frame(
        recv,
        config.max_frame.min(codec::HELLO_MAX_FRAME),
        Some(limits.hello_timeout),
        limits.hello_timeout,
    )
    .await
    .and_then(|f| match f {
        Some(payload) => Ok(Some(codec::decode_with_extensions(&payload)?)),
        None => Ok(None),
    });
    let denial = match first {
        Ok(Some((Message::Hello(mut hello), ext))) => {
            match check_hello(&hello, config.protocol_version) {
                Err(e) => refuse(e.code(), e.to_string()),
                Ok(version) => match shared.authority.admit(&hello.token, &hello.device) {
                    Ok(claims) => {
                        // From here on, the version both speak.
                        hello.protocol_version = version;
                        let abilities = Abilities::of(&ext, version);
                        return Ok((hello, Scope::new(claims), abilities));
                    }
                    Err(d) => refuse(d.code, d.text),
                },
            }
        }
        Ok(Some((other, _))) => refuse(
            ErrorCode::PROTOCOL_VIOLATION,
            format!("expected hello, got {}", other.kind()),
        ),
        Ok(None) => refuse(
            ErrorCode::PROTOCOL_VIOLATION,
            "stream ended before hello".into(),
        ),
        Err(Error::Protocol(p)) => refuse(p.code(), p.to_string()),
        Err(e) => return Err(e),
    };
    match denial {
        Error::Refused { code, text } => Err(turn_away(send, config, code, text).await),
        other => Err(other),
    }
}

/// Tells a device at the door why it is turned away (within the write deadline), lets
/// the words reach it, and returns the refusal to close the connection with.
pub(super) async fn turn_away(
    send: &mut SendStream,
    config: &RelayConfig,
    code: ErrorCode,
    text: String,
) -> Error {
    let _ = write_message(
        send,
        &error_msg(code, text.clone(), None),
        config.max_frame,
        config.limits.write_timeout,
    )
    .await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    Error::Refused { code, text }
}

/// What the session knows of a device it just welcomed.
pub(super) fn new_peer(
    hello: &Hello,
    scope: Scope,
    granted: redline_proto::message::Subscription,
    synced_before: bool,
    quarantined: Option<i64>,
) -> Peer {
    Peer {
        quarantined,
        synced_before,
        ..Peer::new(hello.device.clone(), scope, granted)
    }
}

/// The limits a session enforces, from the relay's configuration.
pub(super) fn session_limits(config: &RelayConfig) -> SessionLimits {
    let limits = &config.limits;
    SessionLimits {
        messages_per_second: limits.messages_per_second,
        message_burst: limits.message_burst,
        streams_per_second: limits.streams_per_second,
        stream_burst: config.max_streams_per_connection,
    }
}

/// What a relay says to a device it admitted.
pub(super) struct Greeting {
    /// The `Welcome`, framed (with its extensions) for the device's protocol version.
    pub(super) frame: Vec<u8>,
    /// The device's subscription, narrowed to its token.
    pub(super) granted: redline_proto::message::Subscription,
    /// Whether the device had synced with this relay before.
    pub(super) synced_before: bool,
    /// `Some(ms offline)` if the device is in quarantine.
    pub(super) quarantined: Option<i64>,
}

/// Records the device's hello and makes its `Welcome`: what it receives (its
/// subscription narrowed to its token) and whether it is in quarantine.
pub(super) fn greeting(
    relay: &RelayState,
    config: &RelayConfig,
    hello: &Hello,
    scope: &Scope,
) -> Result<Greeting, Error> {
    let granted = scope.grant(&hello.subscription);
    let synced_before = relay.devices.synced_before(&hello.device);
    let quarantined = relay
        .devices
        .quarantine_check(scope.claims(), config.quarantine_after);
    if let Some(offline) = quarantined {
        info!(
            offline_h = offline / 3_600_000,
            "device returns after its horizon: quarantined"
        );
    }
    relay.devices.hello(
        scope.claims(),
        hello.protocol_version,
        &hello.app_version,
        &granted,
    );
    info!(app_version = %hello.app_version, member = %scope.claims().member, role = %scope.claims().role, "device hello");
    let welcome = Message::Welcome(Welcome {
        protocol_version: hello.protocol_version,
        relay: config.name.clone(),
        epoch: relay.hub.epoch(),
        granted: granted.clone(),
        quarantined,
    });
    // Extensions go only to devices of version 2 or later (encode_frame_with drops them
    // for version 1, whose decoder refuses trailing bytes).
    let mut ext = codec::Extensions::new();
    ext.insert(ext::WELCOME_OLDEST_VERSION, &MIN_PROTOCOL_VERSION)?;
    ext.insert(ext::WELCOME_NEWEST_VERSION, &config.protocol_version)?;
    let frame = codec::encode_frame_with(&welcome, &ext, hello.protocol_version, config.max_frame)?;
    Ok(Greeting {
        frame,
        granted,
        synced_before,
        quarantined,
    })
}

/// Greets the device ([`greeting`]) on the control stream; returns what the session
/// needs: the granted subscription, whether it synced before, its quarantine.
pub(super) async fn welcome(
    relay: &RelayState,
    config: &RelayConfig,
    hello: &Hello,
    scope: &Scope,
    send: &mut SendStream,
) -> Result<(redline_proto::message::Subscription, bool, Option<i64>), Error> {
    let g = greeting(relay, config, hello, scope)?;
    write_frame(send, &g.frame, config.limits.write_timeout).await?;
    Ok((g.granted, g.synced_before, g.quarantined))
}
