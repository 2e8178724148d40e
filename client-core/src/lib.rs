//! The Redline device core: what runs on a volunteer's phone.
//!
//! A [`Client`] owns a durable sled store of Automerge documents (one per team-day ledger,
//! per zone's households book, per organisation's roster), offers typed operations in the
//! field's words, and syncs everything with a relay over QUIC when a network appears.
//! Every write is on disk before the call returns; a sync never blocks local writes.
//!
//! - [`ledger`], [`households`], [`roster`]: the documents' layouts, typed views and rules;
//! - [`workflow`]: task and need status as entries with a derived current status;
//! - [`conflicts`], [`reconcile`]: the lead's view of a day and conflict resolution;
//! - [`schema`]: genesis changes, attribution, forward compatibility;
//! - [`transport`]: the pinned QUIC connection.
//!
//! ```no_run
//! use redline_client::{Client, ClientConfig, NewTask, TaskKind};
//! use redline_proto::{Day, MemberId, TeamId};
//! # async fn run() -> Result<(), redline_client::Error> {
//! let client = Client::open("/data/redline", ClientConfig::new(MemberId::new("amira")?))?;
//! let (team, day) = (TeamId::new("team-3")?, Day::new("2026-11-29")?);
//! client.check_in(&team, &day)?;
//! client.add_task(&team, &day, NewTask::new(TaskKind::Screening, "Sample block 7"))?;
//! client.add_to_tally(&team, &day, "samples_taken", 12)?;
//! let report = client.sync().await?; // needs ClientConfig::relay
//! # Ok(()) }
//! ```

mod client;
pub mod conflicts;
pub mod device_session;
pub mod doctor;
pub mod households;
mod identity;
pub mod ledger;
mod operations;
pub mod progress;
pub mod reconcile;
pub mod roster;
mod saved;
pub mod schema;
pub mod store;
mod sync;
mod totals;
pub mod transport;
pub mod workflow;

use std::net::SocketAddr;

use redline_proto::codec::DEFAULT_MAX_FRAME;
use redline_proto::{MemberId, OrgId, TeamId, ZoneId};

pub use client::{ChangeOrigin, Client, DocChange, Rollover};
pub use conflicts::{Conflict, ConflictValue};
pub use device_session::{INLINE_MAX, PIECE, SyncReport, WINDOW, hello_wait};
pub use doctor::{Finding, QuarantineReview};
pub use households::{
    Household, HouseholdUpdate, HouseholdsView, Need, NeedCategory, NewHousehold, NewNeed,
    Priority, Vulnerability,
};
pub use identity::DeviceIdentity;
pub use ledger::{DutyAction, DutyEntry, LedgerView, NewTask, Task, TaskKind, TaskUpdate};
pub use progress::{
    BoundedSync, Conditions, DocPending, Network, Pending, SyncPolicy, SyncProgress, Urgency,
};
pub use reconcile::{MemberActivity, ReconcileView};
pub use roster::{MemberEntry, Role, RosterView, TeamEntry};
pub use sync::{HELLO_ATTEMPTS, LiveSync};
pub use workflow::{Derived, NeedStatus, StatusEntry, TaskStatus};

/// Everything that can go wrong on the device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller passed something invalid; the message says what is expected.
    #[error("{0}")]
    Invalid(String),
    /// The thing named does not exist on this device.
    #[error("not found: {0}")]
    NotFound(String),
    /// The local store failed.
    #[error("local store: {0}")]
    Store(String),
    /// sled, the local store on phones, failed.
    #[error("local store (sled): {0}")]
    Sled(#[from] sled::Error),
    /// A stored document is unreadable.
    #[error("document is damaged: {0}")]
    Corrupt(String),
    /// Automerge refused an operation.
    #[error("document operation failed: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// No relay is configured.
    #[error("no relay configured: set ClientConfig::relay (address and certificate fingerprint)")]
    NoRelay,
    /// The relay presented a certificate other than the pinned one.
    #[error(
        "the relay's certificate fingerprint is {seen}, but {expected} is pinned: \
         check the relay address, or re-pin if the relay's certificate was replaced"
    )]
    PinMismatch {
        /// The pinned fingerprint.
        expected: String,
        /// What the relay presented.
        seen: String,
    },
    /// The network or the QUIC connection failed; local data is intact, retry later.
    #[error("network: {what}")]
    Transport {
        /// What failed.
        what: String,
        /// The underlying error (QUIC, I/O), when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The relay spoke the protocol wrongly.
    #[error(transparent)]
    Protocol(#[from] redline_proto::Error),
    /// The relay refused this device's session: no valid token (`unauthorized`,
    /// `token_expired`, `token_revoked`), limits exceeded, or the relay is shutting down.
    /// Local data is intact.
    #[error("the relay refused the session: {code}: {text}")]
    Refused {
        /// The relay's error code.
        code: redline_proto::ErrorCode,
        /// The relay's explanation.
        text: String,
    },
}

impl Error {
    /// A network failure described by `what`, with no underlying error.
    pub fn transport(what: impl Into<String>) -> Self {
        Error::Transport {
            what: what.into(),
            source: None,
        }
    }

    /// A network failure caused by `e` (its text says what failed; it is kept as the
    /// source).
    pub fn network<E: std::error::Error + Send + Sync + 'static>(e: E) -> Self {
        Error::Transport {
            what: e.to_string(),
            source: Some(Box::new(e)),
        }
    }

    /// A network failure caused by `e`, described by `what` (which should say what was
    /// being done; `e` is kept as the source).
    pub fn network_in<E: std::error::Error + Send + Sync + 'static>(
        what: impl Into<String>,
        e: E,
    ) -> Self {
        Error::Transport {
            what: what.into(),
            source: Some(Box::new(e)),
        }
    }
}

/// Where the relay is and how to recognise it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayEndpoint {
    /// The relay's UDP address.
    pub addr: SocketAddr,
    /// SHA-256 fingerprint of its certificate (64 hex digits, `:` allowed).
    pub fingerprint: String,
    /// TLS server name to send (pinning does not depend on it; CA validation does).
    pub server_name: String,
    /// Production relays: trust certificates issued by this CA (DER) instead of pinning.
    /// When set, `fingerprint` may be empty.
    pub ca_der: Option<Vec<u8>>,
}

impl RelayEndpoint {
    /// A relay at `addr` whose certificate has `fingerprint`.
    pub fn new(addr: SocketAddr, fingerprint: impl Into<String>) -> Self {
        Self {
            addr,
            fingerprint: fingerprint.into(),
            server_name: "redline-relay".into(),
            ca_der: None,
        }
    }

    /// A production relay at `addr` named `server_name`, whose certificate is issued by
    /// the CA `ca_der` (DER).
    pub fn with_ca(addr: SocketAddr, server_name: impl Into<String>, ca_der: Vec<u8>) -> Self {
        Self {
            addr,
            fingerprint: String::new(),
            server_name: server_name.into(),
            ca_der: Some(ca_der),
        }
    }

    /// What identifies this relay for the device's stored cursor.
    pub(crate) fn identity_key(&self) -> String {
        if self.ca_der.is_some() && self.fingerprint.is_empty() {
            format!("ca:{}", self.server_name)
        } else {
            self.fingerprint.to_lowercase().replace(':', "")
        }
    }
}

/// Where a client reads the time (unix milliseconds) it stamps entries with. The system
/// clock by default; tests and simulations pass their own.
#[derive(Clone)]
pub struct Clock(std::sync::Arc<dyn Fn() -> i64 + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self(std::sync::Arc::new(client::now_ms))
    }
    /// A clock that asks `f`.
    pub fn from_fn(f: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(f))
    }
    /// The time now, unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// How a client runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The member using this device; recorded on every entry.
    pub member: MemberId,
    /// The organisation whose roster validates members, zones and teams. Without it (or
    /// before the roster reached the device) those names are not checked.
    pub org: Option<OrgId>,
    /// The relay to sync with.
    pub relay: Option<RelayEndpoint>,
    /// Further relays of the same deployment (one database, one certificate or CA),
    /// tried in order when the current one cannot be reached. A cursor is valid on
    /// every relay of a deployment, so moving costs nothing but the changes in flight.
    pub other_relays: Vec<RelayEndpoint>,
    /// Start at the team's home relay ([`with_deployment`](Self::with_deployment)):
    /// the relays (`relay`, then `other_relays`) are one list, the same on every phone
    /// of the deployment, and the device starts at the entry its first team picks.
    pub home_relay_by_team: bool,
    /// Teams whose recent ledger days this device receives.
    pub teams: Vec<TeamId>,
    /// Zones whose households books this device receives.
    pub zones: Vec<ZoneId>,
    /// Ledger days kept on the device by [`Client::drop_old_days`] (today included).
    pub keep_days: u32,
    /// The app's version, reported to the relay.
    pub app_version: String,
    /// Largest frame accepted from the relay.
    pub max_frame: usize,
    /// The clock entries are stamped with.
    pub clock: Clock,
    /// The device token from the relay's operator (`redline-server token issue`). The
    /// device takes its id from it.
    pub token: Option<String>,
    /// What a sync may spend on metered networks and batteries.
    pub policy: SyncPolicy,
    /// The newest protocol version to say hello with (default: this build's newest).
    /// Lower only to play an app a release behind (tests, the simulation).
    pub protocol_version: u16,
}

/// The index of `team`'s home relay among `relays` relays of a deployment: FNV-1a
/// (64 bits) of the team's name, modulo `relays`. Stable across versions and platforms:
/// every phone of the team, whatever app built it, picks the same relay.
pub fn home_relay(team: &TeamId, relays: usize) -> usize {
    (fnv1a(team.as_str().as_bytes()) % relays.max(1) as u64) as usize
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl ClientConfig {
    /// Defaults for `member`: no org, no relay, 7 days kept.
    pub fn new(member: MemberId) -> Self {
        Self {
            member,
            org: None,
            relay: None,
            other_relays: Vec::new(),
            home_relay_by_team: false,
            teams: Vec::new(),
            zones: Vec::new(),
            keep_days: 7,
            app_version: format!("redline-client/{}", env!("CARGO_PKG_VERSION")),
            max_frame: DEFAULT_MAX_FRAME,
            clock: Clock::system(),
            token: None,
            policy: SyncPolicy::default(),
            protocol_version: redline_proto::PROTOCOL_VERSION,
        }
    }

    /// Sets the data and battery policy.
    pub fn with_policy(mut self, policy: SyncPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the device token.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets the clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Sets the relay.
    pub fn with_relay(mut self, relay: RelayEndpoint) -> Self {
        self.relay = Some(relay);
        self
    }

    /// Sets the further relays of the deployment, tried in order when the current one
    /// cannot be reached.
    pub fn with_other_relays(mut self, relays: Vec<RelayEndpoint>) -> Self {
        self.other_relays = relays;
        self
    }

    /// Sets every relay of a deployment of several (one database), listed in the same
    /// order on every phone. The device starts at its team's *home relay*, the entry
    /// its first team picks by a stable hash ([`home_relay`]), and fails over to the
    /// next ones in turn. A team's phones thus meet on one relay: their writes to the
    /// team's ledger and zone books merge in that relay's cache, without a conflict
    /// between relays or a merge of another relay's commits. Without a team the list
    /// is used as given.
    pub fn with_deployment(mut self, relays: Vec<RelayEndpoint>) -> Self {
        let mut relays = relays.into_iter();
        self.relay = relays.next();
        self.other_relays = relays.collect();
        self.home_relay_by_team = true;
        self
    }

    /// The relays in the order this device tries them: the configured one, then the
    /// others; with [`with_deployment`](Self::with_deployment), starting at the team's
    /// home relay.
    pub fn relays_in_order(&self) -> Vec<RelayEndpoint> {
        let mut all: Vec<RelayEndpoint> = self.relay.iter().cloned().collect();
        all.extend(self.other_relays.iter().cloned());
        if self.home_relay_by_team
            && let Some(team) = self.teams.first()
            && !all.is_empty()
        {
            let home = home_relay(team, all.len());
            all.rotate_left(home);
        }
        all
    }

    /// Sets the organisation.
    pub fn with_org(mut self, org: OrgId) -> Self {
        self.org = Some(org);
        self
    }

    /// Sets the teams whose ledgers this device receives.
    pub fn with_teams(mut self, teams: Vec<TeamId>) -> Self {
        self.teams = teams;
        self
    }

    /// Sets the zones whose households books this device receives.
    pub fn with_zones(mut self, zones: Vec<ZoneId>) -> Self {
        self.zones = zones;
        self
    }

    /// Sets how many ledger days to keep.
    pub fn with_keep_days(mut self, days: u32) -> Self {
        self.keep_days = days;
        self
    }
}

#[cfg(test)]
mod model_tests;

#[cfg(test)]
mod error_tests {
    use super::*;

    /// A network failure keeps what caused it: an app can walk the chain (the text
    /// still says what failed for those who only print it).
    #[test]
    fn network_errors_keep_their_source() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "no such address");
        let e = Error::network_in("cannot open a UDP socket on 192.0.2.1:0", io);
        assert_eq!(
            e.to_string(),
            "network: cannot open a UDP socket on 192.0.2.1:0"
        );
        let source = std::error::Error::source(&e).expect("a source");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("the io error itself");
        assert_eq!(io.kind(), std::io::ErrorKind::AddrNotAvailable);
        assert!(std::error::Error::source(&Error::transport("the relay went away")).is_none());
    }
}

#[cfg(test)]
mod relay_order_tests {
    use super::*;

    fn relay(port: u16) -> RelayEndpoint {
        RelayEndpoint::new(SocketAddr::from(([127, 0, 0, 1], port)), "00")
    }

    /// The published FNV-1a vectors: apps built elsewhere must pick the same relay.
    #[test]
    fn the_home_relay_hash_is_fnv1a() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn a_teams_phones_start_at_one_relay_and_fail_over_in_turn() {
        let all: Vec<RelayEndpoint> = (1..=3).map(relay).collect();
        let mut homes = std::collections::HashSet::new();
        for t in 0..13 {
            let team = TeamId::new(format!("team-{t}")).unwrap();
            let config = ClientConfig::new(MemberId::new("m").unwrap())
                .with_deployment(all.clone())
                .with_teams(vec![team.clone()]);
            let order = config.relays_in_order();
            let home = home_relay(&team, 3);
            assert_eq!(order[0], all[home], "{team} starts at its home relay");
            let ports: Vec<u16> = order.iter().map(|r| r.addr.port()).collect();
            let want: Vec<u16> = (0..3).map(|i| all[(home + i) % 3].addr.port()).collect();
            assert_eq!(ports, want, "then the next ones in turn");
            homes.insert(home);
        }
        assert_eq!(homes.len(), 3, "13 teams use every relay");
        // Without a team, or without `with_deployment`, the list is used as given.
        let plain = ClientConfig::new(MemberId::new("m").unwrap()).with_deployment(all.clone());
        assert_eq!(plain.relays_in_order(), all);
        let given = ClientConfig::new(MemberId::new("m").unwrap())
            .with_relay(all[2].clone())
            .with_other_relays(all[..2].to_vec())
            .with_teams(vec![TeamId::new("team-1").unwrap()]);
        assert_eq!(given.relays_in_order()[0], all[2]);
    }
}
