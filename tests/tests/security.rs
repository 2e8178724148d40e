//! The security suite: one table, each row an attack on a real relay (QUIC, TLS, sled)
//! and the outcome it must meet. After every row: the stored documents are unchanged, the
//! relay still serves an honest device, and the attacker saw nothing outside its scope.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use automerge::sync::SyncDoc;
use automerge::transaction::Transactable;
use automerge::{ActorId, ChangeHash, ROOT, ReadDoc};
use redline_client::{Client, ClientConfig, Error as ClientError};
use redline_proto::message::{Push, Subscription, SyncStep};
use redline_proto::token::Role;
use redline_proto::{Day, DocId, ErrorCode, MemberId, Message, OrgId, TeamId, ZoneId};
use redline_server::{Limits, RelayConfig, RelayHandle};
use redline_tests::{RawDevice, device_for, endpoint, start_relay_with, token_for};

const ORG: &str = "district-9";
/// The relay's connection cap in this suite (small, so one token could fill it).
const MAX_CONNECTIONS: usize = 40;

/// The tests of this file run one at a time: some measure the process's memory, and
/// each relay's limits are tight enough that neighbours' load would blur them.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const T3: &str = "team-3";
const T5: &str = "team-5";

struct Fixture {
    relay: RelayHandle,
    root: tempfile::TempDir,
    day: Day,
    /// A team-3 volunteer: the honest device that must keep being served.
    honest: Client,
}

fn client(dir: &Path, relay: &RelayHandle, member: &str, token: String, teams: &[&str]) -> Client {
    let config = ClientConfig::new(MemberId::new(member).unwrap())
        .with_relay(endpoint(relay))
        .with_token(token)
        .with_org(OrgId::new(ORG).unwrap())
        .with_teams(teams.iter().map(|t| TeamId::new(*t).unwrap()).collect())
        .with_zones(vec![ZoneId::new("z1").unwrap()])
        .with_keep_days(30);
    Client::open(dir, config).unwrap()
}

impl Fixture {
    async fn new() -> anyhow::Result<Self> {
        let root = tempfile::tempdir()?;
        let mut config = RelayConfig::new(root.path().join("relay"));
        let mut limits = Limits::default();
        limits.hello_timeout = Duration::from_secs(1);
        limits.stream_idle_timeout = Duration::from_secs(1);
        limits.streams_per_second = 20;
        limits.write_timeout = Duration::from_secs(1);
        config.limits = limits;
        config.max_connections = MAX_CONNECTIONS;
        config.quotas.connections_per_token = 4;
        config.quotas.connections_per_address = 32;
        config.quotas.retry_above_pending = 8;
        config.quotas.staged_bytes_per_device = 64 * 1024;
        config.quotas.held_bytes_per_device = 64 * 1024;
        let relay = start_relay_with(config).await?;
        let day = Day::new(time::OffsetDateTime::now_utc().date().to_string())?;
        let token = token_for(
            relay.data_dir(),
            &root.path().join("honest"),
            "honest",
            Role::Volunteer,
            &[T3],
            &["z1"],
        )?;
        let honest = client(&root.path().join("honest"), &relay, "honest", token, &[T3]);
        let f = Self {
            relay,
            root,
            day,
            honest,
        };
        // What there is to steal or spoil: each team's ledger and the roster.
        f.honest
            .add_to_tally(&team(T3), &f.day, "samples_taken", 3)?;
        f.honest.sync().await?;
        let five = f.device("five", Role::Volunteer, &[T5]);
        five.add_to_tally(&team(T5), &f.day, "samples_taken", 5)?;
        five.sync().await?;
        let lead = f.device("lead", Role::Lead, &[T3]);
        lead.add_team(&team(T3), "Team three")?;
        lead.sync().await?;
        Ok(f)
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn token(&self, name: &str, role: Role, teams: &[&str]) -> String {
        token_for(
            self.relay.data_dir(),
            &self.dir(name),
            name,
            role,
            teams,
            &["z1"],
        )
        .unwrap()
    }

    fn device(&self, name: &str, role: Role, teams: &[&str]) -> Client {
        let token = self.token(name, role, teams);
        client(&self.dir(name), &self.relay, name, token, teams)
    }

    fn ledger(&self, t: &str) -> DocId {
        DocId::ledger(&team(t), &self.day)
    }

    fn roster(&self) -> DocId {
        DocId::roster(&OrgId::new(ORG).unwrap())
    }

    /// A raw device with a valid volunteer token of team 3, past its hello.
    async fn raw_volunteer(&self, name: &str) -> anyhow::Result<RawDevice> {
        let mut raw = RawDevice::connect(&self.relay).await?;
        let token = self.token(name, Role::Volunteer, &[T3]);
        let answer = raw
            .hello(&device_for(&self.dir(name)), &token, subscription(&[T3]))
            .await?;
        anyhow::ensure!(
            matches!(answer, Message::Welcome(_)),
            "not welcomed: {answer:?}"
        );
        Ok(raw)
    }

    /// Every stored document and its heads.
    async fn stored(&self) -> BTreeMap<String, Vec<ChangeHash>> {
        let mut all = BTreeMap::new();
        for doc in self.relay.documents().await.unwrap() {
            all.insert(doc.to_string(), self.relay.heads(&doc).await.unwrap());
        }
        all
    }
}

fn team(t: &str) -> TeamId {
    TeamId::new(t).unwrap()
}

fn subscription(teams: &[&str]) -> Subscription {
    Subscription {
        org: Some(OrgId::new(ORG).unwrap()),
        teams: teams.iter().map(|t| team(t)).collect(),
        ledger_since: None,
        zones: vec![ZoneId::new("z1").unwrap()],
        docs: Vec::new(),
    }
}

/// What an attack observed.
#[derive(Debug, Default)]
struct Seen {
    /// Error codes the attacker was sent (session or per document).
    codes: Vec<ErrorCode>,
    /// The QUIC application code the relay closed the connection with.
    closed: Option<u16>,
    /// Documents the attacker received anything of.
    received: Vec<DocId>,
}

impl Seen {
    fn from_messages(messages: &[Message]) -> Self {
        let mut seen = Seen::default();
        for m in messages {
            match m {
                Message::Error(r) => seen.codes.push(r.code),
                Message::Update(u) => seen.received.push(u.doc.clone()),
                Message::Sync(SyncStep { doc, data: Some(_) }) => seen.received.push(doc.clone()),
                _ => {}
            }
        }
        seen
    }

    fn refused(code: ErrorCode) -> impl Fn(&Seen) -> bool {
        move |s| s.codes.contains(&code)
    }
}

#[derive(Clone, Copy, Debug)]
enum Attack {
    ReadAnotherTeamsLedger,
    SyncAnotherTeamsLedger,
    WriteRosterAsVolunteer,
    NoToken,
    TokenOfAnotherDevice,
    TokenFromAnotherRelay,
    ExpiredToken,
    RevokedDuringLiveSession,
    ForgedActor,
    ForgedGenesis,
    OversizedFrame,
    TruncatedFrame,
    GarbageAfterHandshake,
    InvalidAutomergeBytes,
    TenThousandTinyStreams,
    SilentStreams,
    SilentConnection,
    // Round two (issue 15), in its order.
    SyncBomb,
    QueuedForgery,
    RevokedBeforeWelcome,
    QuotaFlood,
    ConnectionFlood,
    StalledReader,
    OversizedHello,
    ForgedAuthorship,
    QuarantineAcrossTeams,
    TokenFromTheFuture,
    // Round three.
    CountersIntoThePast,
    SkippedOwnChange,
}

impl Attack {
    /// Rows whose honest side effects are stored (an ordinary push of the attacker's
    /// own, a lead's accepted review); the row checks itself what must not be there.
    fn stores_something(self) -> bool {
        matches!(self, Attack::QueuedForgery | Attack::QuarantineAcrossTeams)
    }
}

async fn attack(f: &Fixture, which: Attack) -> anyhow::Result<Seen> {
    let short = Duration::from_millis(600);
    match which {
        Attack::ReadAnotherTeamsLedger => {
            // A team-3 volunteer asks for team 5's ledger by team and by id.
            let mut raw = RawDevice::connect(&f.relay).await?;
            let token = f.token("reader", Role::Volunteer, &[T3]);
            let mut wanted = subscription(&[T3, T5]);
            wanted.docs.push(f.ledger(T5));
            let answer = raw
                .hello(&device_for(&f.dir("reader")), &token, wanted)
                .await?;
            let Message::Welcome(w) = &answer else {
                anyhow::bail!("refused: {answer:?}")
            };
            anyhow::ensure!(w.granted.teams == vec![team(T3)] && w.granted.docs.is_empty());
            raw.send(&Message::Pull(redline_proto::message::Pull {
                cursor: None,
                resume: vec![],
                defer_large: false,
            }))
            .await?;
            Ok(Seen::from_messages(&raw.drain(short).await?))
        }
        Attack::SyncAnotherTeamsLedger => {
            let mut raw = f.raw_volunteer("syncer").await?;
            let mut state = automerge::sync::State::new();
            let msg = automerge::Automerge::new()
                .generate_sync_message(&mut state)
                .unwrap();
            raw.send(&Message::Sync(SyncStep {
                doc: f.ledger(T5),
                data: Some(msg.encode()),
            }))
            .await?;
            Ok(Seen::from_messages(&raw.drain(short).await?))
        }
        Attack::WriteRosterAsVolunteer => {
            let v = f.device("volunteer", Role::Volunteer, &[T3]);
            v.sync().await?; // receives the roster: readable by all
            v.add_team(&team("team-9"), "Made up")?;
            let report = v.sync().await?;
            let mut seen = Seen::default();
            for (doc, reason) in &report.refused {
                if *doc == f.roster().to_string() && reason.starts_with("forbidden") {
                    seen.codes.push(ErrorCode::FORBIDDEN);
                }
            }
            Ok(seen)
        }
        Attack::NoToken
        | Attack::TokenOfAnotherDevice
        | Attack::TokenFromAnotherRelay
        | Attack::ExpiredToken => {
            let mut raw = RawDevice::connect(&f.relay).await?;
            let device = device_for(&f.dir("intruder"));
            let token = match which {
                Attack::NoToken => String::new(),
                Attack::TokenOfAnotherDevice => f.token("someone-else", Role::Operator, &[]),
                Attack::TokenFromAnotherRelay => {
                    let elsewhere = tempfile::tempdir()?;
                    token_for(
                        elsewhere.path(),
                        &f.dir("intruder"),
                        "intruder",
                        Role::Operator,
                        &[],
                        &[],
                    )?
                }
                _ => {
                    let request = redline_server::auth::TokenRequest {
                        device: device.clone(),
                        member: MemberId::new("intruder")?,
                        role: Role::Operator,
                        teams: vec![],
                        zones: vec![],
                        ttl: Duration::ZERO,
                    };
                    redline_server::auth::issue(f.relay.data_dir(), request)?.1
                }
            };
            let answer = raw.hello(&device, &token, subscription(&[T3, T5])).await?;
            let mut seen = Seen::from_messages(&[answer]);
            seen.received
                .extend(Seen::from_messages(&raw.drain(short).await?).received);
            seen.closed = raw.closed_with(Duration::from_secs(3)).await;
            Ok(seen)
        }
        Attack::RevokedDuringLiveSession => {
            let name = "revokee";
            let token = f.token(name, Role::Volunteer, &[T3]);
            let id = redline_proto::token::peek(&token)?.id;
            let c = client(&f.dir(name), &f.relay, name, token, &[T3]);
            let mut live = c.go_live()?;
            let first = tokio::time::timeout(Duration::from_secs(5), live.reports.recv()).await?;
            anyhow::ensure!(
                matches!(first, Some(Ok(_))),
                "live session did not start: {first:?}"
            );
            redline_server::auth::revoke(f.relay.data_dir(), id)?;
            let mut seen = Seen::default();
            let ended = tokio::time::timeout(Duration::from_secs(3), live.reports.recv()).await?;
            if let Some(Err(ClientError::Refused { code, .. })) = ended {
                seen.codes.push(code);
            }
            live.stop().await;
            // And the next connection is turned away at the door.
            if let Err(ClientError::Refused { code, .. }) = c.sync().await {
                seen.codes.push(code);
            }
            Ok(seen)
        }
        Attack::ForgedActor | Attack::ForgedGenesis => {
            // Device B writes to team 3's ledger with the honest device's actor (or the
            // genesis actor), in its own valid session.
            let doc = f.ledger(T3);
            let base = f.relay.document(&doc).await?.expect("seeded");
            let actor = match which {
                Attack::ForgedActor => f.honest.identity().actor.clone(),
                _ => ActorId::from(redline_proto::genesis::GENESIS_ACTOR),
            };
            let mut forged = base.fork().with_actor(actor);
            forged
                .transact::<_, _, automerge::AutomergeError>(|tx| {
                    tx.put(ROOT, "approved_by", "the lead (not really)")?;
                    Ok(())
                })
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let change = forged.get_last_local_change().expect("made one").clone();
            let bundle = forged.bundle([change.hash()])?.bytes().to_vec();
            let mut raw = f.raw_volunteer("forger").await?;
            raw.send(&Message::Push(Push {
                doc,
                bundle,
                heads: vec![change.hash().0],
            }))
            .await?;
            Ok(Seen::from_messages(&raw.drain(short).await?))
        }
        Attack::OversizedFrame => {
            let mut raw = f.raw_volunteer("big").await?;
            raw.send_bytes(&(200u32 * 1024 * 1024).to_be_bytes())
                .await?;
            raw.send_bytes(&[0u8; 1024]).await?;
            let mut seen = Seen::from_messages(&raw.drain(short).await?);
            seen.closed = raw.closed_with(Duration::from_secs(3)).await;
            Ok(seen)
        }
        Attack::TruncatedFrame => {
            let mut raw = f.raw_volunteer("cut").await?;
            raw.send_bytes(&100u32.to_be_bytes()).await?;
            raw.send_bytes(&[1u8; 10]).await?;
            raw.send.finish()?;
            let mut seen = Seen::from_messages(&raw.drain(short).await?);
            seen.closed = raw.closed_with(Duration::from_secs(3)).await;
            Ok(seen)
        }
        Attack::GarbageAfterHandshake => {
            let mut raw = f.raw_volunteer("garbage").await?;
            let mut frame = 64u32.to_be_bytes().to_vec();
            frame.extend((0..64u8).map(|i| i.wrapping_mul(97).wrapping_add(200)));
            raw.send_bytes(&frame).await?;
            let mut seen = Seen::from_messages(&raw.drain(short).await?);
            seen.closed = raw.closed_with(Duration::from_secs(3)).await;
            Ok(seen)
        }
        Attack::InvalidAutomergeBytes => {
            let mut raw = f.raw_volunteer("bad-bytes").await?;
            let doc = f.ledger(T3);
            // Random bytes, and a real bundle with its tail cut off.
            let base = f.relay.document(&doc).await?.expect("seeded");
            let mut cut = base.bundle(base.get_heads())?.bytes().to_vec();
            cut.truncate(cut.len() / 2);
            for bundle in [vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3, 4, 5], cut] {
                raw.send(&Message::Push(Push {
                    doc: doc.clone(),
                    bundle,
                    heads: vec![[9; 32]],
                }))
                .await?;
            }
            let mut seen = Seen::from_messages(&raw.drain(short).await?);
            // The connection itself stays usable for valid work.
            raw.send(&Message::Pull(redline_proto::message::Pull {
                cursor: None,
                resume: vec![],
                defer_large: false,
            }))
            .await?;
            let after = raw.drain(short).await?;
            if !after.iter().any(|m| matches!(m, Message::Caught(_))) {
                seen.codes.push(ErrorCode::INTERNAL);
            }
            seen.received.extend(Seen::from_messages(&after).received);
            Ok(seen)
        }
        Attack::TenThousandTinyStreams => {
            // Each stream is a well-formed upload the relay must answer (forbidden: team
            // 5), so only the stream rate limit stops the flood.
            let raw = f.raw_volunteer("streams").await?;
            let upload = Message::Upload(redline_proto::message::Upload {
                id: [1; 16],
                doc: f.ledger(T5),
                len: 10,
                document: false,
                heads: vec![],
            });
            let frame = redline_proto::codec::encode_frame(&upload, 1 << 20)?;
            let mut opened = 0;
            for _ in 0..10_000 {
                match tokio::time::timeout(Duration::from_secs(2), raw.conn.open_bi()).await {
                    Ok(Ok((mut s, _r))) => {
                        opened += 1;
                        if s.write_all(&frame).await.is_err() {
                            break;
                        }
                        let _ = s.finish();
                    }
                    _ => break,
                }
            }
            let closed = raw.closed_with(Duration::from_secs(5)).await;
            anyhow::ensure!(opened < 10_000, "the relay let all 10,000 streams through");
            let mut raw = raw;
            let mut seen = Seen::from_messages(&raw.drain(short).await?);
            seen.closed = closed;
            Ok(seen)
        }
        Attack::SilentStreams => {
            // Streams opened and never written to: the relay lets go of them.
            let raw = f.raw_volunteer("silent").await?;
            let mut answers = Vec::new();
            for _ in 0..8 {
                let (mut s, r) = raw.conn.open_bi().await?;
                // A stream is only announced to the relay once something is sent: one
                // header byte, then silence (the send side is kept open).
                s.write_all(&[0]).await?;
                answers.push((s, r));
            }
            let mut seen = Seen::default();
            for (_s, mut r) in answers {
                let got =
                    tokio::time::timeout(Duration::from_secs(5), r.read_to_end(64 * 1024)).await;
                if let Ok(Ok(bytes)) = got {
                    let mut d = redline_proto::codec::FrameDecoder::new(1 << 20);
                    d.push(&bytes);
                    if let Ok(Some(Message::Error(e))) = d.next_message() {
                        seen.codes.push(e.code);
                    }
                }
            }
            Ok(seen)
        }
        Attack::SyncBomb => sync_bomb(f).await,
        Attack::QueuedForgery => queued_forgery(f).await,
        Attack::RevokedBeforeWelcome => revoked_before_welcome(f).await,
        Attack::QuotaFlood => quota_flood(f).await,
        Attack::ConnectionFlood => connection_flood(f).await,
        Attack::StalledReader => stalled_reader(f).await,
        Attack::OversizedHello => oversized_hello(f).await,
        Attack::ForgedAuthorship => forged_authorship(f).await,
        Attack::QuarantineAcrossTeams => quarantine_across_teams(f).await,
        Attack::CountersIntoThePast => counters_into_the_past(f).await,
        Attack::SkippedOwnChange => skipped_own_change(f).await,
        Attack::TokenFromTheFuture => {
            let name = "time-traveller";
            let device = device_for(&f.dir(name));
            let key = redline_server::auth::load_or_create_key(f.relay.data_dir())?;
            let issued = redline_server::auth::now_secs() + 86_400;
            let claims = redline_proto::token::Claims {
                id: redline_proto::token::TokenId::random(),
                device: device.clone(),
                member: MemberId::new(name)?,
                role: Role::Operator,
                teams: vec![team(T3), team(T5)],
                zones: vec![],
                issued,
                expires: issued + 86_400,
            };
            let token = redline_proto::token::sign(&claims, &key);
            let mut raw = RawDevice::connect(&f.relay).await?;
            let answer = raw.hello(&device, &token, subscription(&[T3, T5])).await?;
            let mut seen = Seen::from_messages(&[answer]);
            seen.closed = raw.closed_with(Duration::from_secs(3)).await;
            Ok(seen)
        }
        Attack::SilentConnection => {
            // Connects, opens nothing, says nothing.
            let (_endpoint, conn) =
                redline_client::transport::open_connection(&endpoint(&f.relay)).await?;
            let mut seen = Seen::default();
            if let Ok(quinn::ConnectionError::ApplicationClosed(c)) =
                tokio::time::timeout(Duration::from_secs(5), conn.closed()).await
            {
                seen.closed = u16::try_from(c.error_code.into_inner()).ok();
            }
            Ok(seen)
        }
    }
}

type Expect = Box<dyn Fn(&Seen) -> bool>;

/// Refused with `code`, and nothing the row checks itself went wrong (`internal`).
fn refused_and_clean(code: ErrorCode) -> Expect {
    Box::new(move |s: &Seen| s.codes.contains(&code) && !s.codes.contains(&ErrorCode::INTERNAL))
}

fn closed_with(code: ErrorCode) -> Expect {
    Box::new(move |s: &Seen| s.closed == Some(code.0) && s.codes.contains(&code))
}

#[tokio::test]
async fn every_attack_is_refused_and_nothing_leaks() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new().await?;
    let rows: Vec<(Attack, Expect)> = vec![
        (
            Attack::ReadAnotherTeamsLedger,
            Box::new(|s: &Seen| s.codes.is_empty()),
        ),
        (
            Attack::SyncAnotherTeamsLedger,
            Box::new(Seen::refused(ErrorCode::FORBIDDEN)),
        ),
        (
            Attack::WriteRosterAsVolunteer,
            Box::new(Seen::refused(ErrorCode::FORBIDDEN)),
        ),
        (Attack::NoToken, closed_with(ErrorCode::UNAUTHORIZED)),
        (
            Attack::TokenOfAnotherDevice,
            closed_with(ErrorCode::UNAUTHORIZED),
        ),
        (
            Attack::TokenFromAnotherRelay,
            closed_with(ErrorCode::UNAUTHORIZED),
        ),
        (Attack::ExpiredToken, closed_with(ErrorCode::TOKEN_EXPIRED)),
        (
            Attack::RevokedDuringLiveSession,
            Box::new(|s: &Seen| s.codes == [ErrorCode::TOKEN_REVOKED, ErrorCode::TOKEN_REVOKED]),
        ),
        (
            Attack::ForgedActor,
            Box::new(Seen::refused(ErrorCode::FORBIDDEN)),
        ),
        (
            Attack::ForgedGenesis,
            Box::new(Seen::refused(ErrorCode::FORBIDDEN)),
        ),
        (Attack::OversizedFrame, closed_with(ErrorCode::TOO_LARGE)),
        (Attack::TruncatedFrame, closed_with(ErrorCode::BAD_FRAME)),
        (
            Attack::GarbageAfterHandshake,
            closed_with(ErrorCode::BAD_MESSAGE),
        ),
        (
            Attack::InvalidAutomergeBytes,
            Box::new(|s: &Seen| {
                s.codes == [ErrorCode::BAD_DOCUMENT_DATA, ErrorCode::BAD_DOCUMENT_DATA]
            }),
        ),
        (
            Attack::TenThousandTinyStreams,
            closed_with(ErrorCode::RATE_LIMITED),
        ),
        (
            Attack::SilentStreams,
            Box::new(|s: &Seen| {
                s.codes.len() == 8 && s.codes.iter().all(|c| *c == ErrorCode::TIMED_OUT)
            }),
        ),
        (
            Attack::SilentConnection,
            Box::new(|s: &Seen| s.closed == Some(ErrorCode::TIMED_OUT.0)),
        ),
        // 1. A valid-checksum run-length bomb in a sync step, as a bundle, a document and
        //    a change chunk: refused by the same guard as pushes, memory stays flat.
        (
            Attack::SyncBomb,
            Box::new(|s: &Seen| s.codes == [ErrorCode::BAD_DOCUMENT_DATA; 3]),
        ),
        // 2. A change signed with the honest device's actor, parked through sync behind
        //    a missing dependency, then released by an ordinary push of that dependency.
        (
            Attack::QueuedForgery,
            refused_and_clean(ErrorCode::FORBIDDEN),
        ),
        // 3. A device stalls its welcome by not reading; its token is revoked meanwhile.
        (
            Attack::RevokedBeforeWelcome,
            Box::new(|s: &Seen| s.closed == Some(ErrorCode::TOKEN_REVOKED.0)),
        ),
        // 4. Syncs for 10,000 absent documents, a ledger day far from today, an upload
        //    beyond the staging quota.
        (
            Attack::QuotaFlood,
            Box::new(|s: &Seen| {
                s.codes.contains(&ErrorCode::FORBIDDEN)
                    && s.codes.contains(&ErrorCode::QUOTA_EXCEEDED)
                    && !s.codes.contains(&ErrorCode::INTERNAL)
            }),
        ),
        // 5. One token opens more connections than the relay's cap.
        (
            Attack::ConnectionFlood,
            refused_and_clean(ErrorCode::RATE_LIMITED),
        ),
        // 6. A device that stops reading.
        (
            Attack::StalledReader,
            Box::new(|s: &Seen| s.closed == Some(ErrorCode::TIMED_OUT.0)),
        ),
        // 7. A 100 KB hello, and one listing 600 documents.
        (
            Attack::OversizedHello,
            Box::new(|s: &Seen| {
                s.codes == [ErrorCode::TOO_LARGE, ErrorCode::TOO_LARGE]
                    && s.closed == Some(ErrorCode::TOO_LARGE.0)
            }),
        ),
        // 8. A commit message, a tally key and a duty entry naming someone else.
        (
            Attack::ForgedAuthorship,
            Box::new(|s: &Seen| s.codes == [ErrorCode::FORBIDDEN; 3]),
        ),
        // 9. A lead of team 5 reviews a team-3 phone's held changes to a shared zone;
        //    a forged held change does not block the rest.
        (
            Attack::QuarantineAcrossTeams,
            Box::new(|s: &Seen| s.codes == [ErrorCode::FORBIDDEN]),
        ),
        // 10. A token issued a day in the future (a relay clock set back).
        (
            Attack::TokenFromTheFuture,
            closed_with(ErrorCode::UNAUTHORIZED),
        ),
        // 11. A change whose operations are numbered into its dependencies' past: it
        //     applies, and every saved copy of the document would fail to load.
        (
            Attack::CountersIntoThePast,
            Box::new(|s: &Seen| s.codes == [ErrorCode::BAD_DOCUMENT_DATA]),
        ),
        // 12. An actor's second change built beside its first instead of on it: it
        //     applies, and every saved copy of the document would fail to load.
        (
            Attack::SkippedOwnChange,
            Box::new(|s: &Seen| s.codes == [ErrorCode::BAD_DOCUMENT_DATA]),
        ),
    ];
    let out_of_scope = |d: &DocId| *d == f.ledger(T5);
    let n_rows = rows.len() as i64;
    let mut failures = Vec::new();
    for (which, expect) in rows {
        let before = f.stored().await;
        let seen = Box::pin(attack(&f, which)).await;
        let after = f.stored().await;
        let row = format!("{which:?}");
        match &seen {
            Ok(seen) if expect(seen) => {}
            other => failures.push(format!("{row}: unexpected outcome {other:?}")),
        }
        if let Ok(seen) = &seen
            && let Some(doc) = seen.received.iter().find(|d| out_of_scope(d))
        {
            failures.push(format!("{row}: the attacker received {doc}"));
        }
        if before != after && !which.stores_something() {
            failures.push(format!("{row}: stored documents changed"));
        }
        // The relay still serves an honest device.
        f.honest
            .add_to_tally(&team(T3), &f.day, "samples_taken", 1)?;
        match f.honest.sync().await {
            Ok(r) if r.refused.is_empty() && r.changes_sent == 1 => {}
            other => failures.push(format!("{row}: honest device not served: {other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "security rows failed:\n{}",
        failures.join("\n")
    );
    // Nothing the attacks sent reached the stored team-3 ledger: only honest tallies.
    let totals = f.honest.day_totals(&team(T3), &f.day)?;
    assert_eq!(totals.get("samples_taken"), Some(&(3 + n_rows)));
    Ok(())
}

/// A CA and a relay certificate it issued for `relay.example` (and loopback), as PEM files.
fn production_certificates(dir: &Path) -> anyhow::Result<(Vec<u8>, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["relay.example".to_string(), "127.0.0.1".to_string()])?
        .signed_by(&leaf_key, &issuer)?;
    let (cert, key) = (dir.join("relay.pem"), dir.join("relay-key.pem"));
    std::fs::write(&cert, format!("{}{}", leaf.pem(), ca_cert.pem()))?;
    std::fs::write(&key, leaf_key.serialize_pem())?;
    Ok((ca_cert.der().to_vec(), cert, key))
}

#[tokio::test]
async fn production_tls_loads_pem_files_and_devices_trust_the_ca_or_a_pin() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir()?;
    let (ca_der, cert, key) = production_certificates(root.path())?;
    let mut config = RelayConfig::new(root.path().join("relay"));
    config.tls = redline_server::TlsMode::Files { cert, key };
    let relay = start_relay_with(config).await?;
    assert!(
        !root.path().join("relay/tls/dev-cert.der").exists(),
        "no dev certificate in production"
    );
    let day = redline_tests::today();
    let open = |name: &str, at: redline_client::RelayEndpoint| -> anyhow::Result<Client> {
        let dir = root.path().join(name);
        let token = token_for(relay.data_dir(), &dir, name, Role::Volunteer, &[T3], &[])?;
        let config = ClientConfig::new(MemberId::new(name)?)
            .with_relay(at)
            .with_token(token)
            .with_teams(vec![team(T3)]);
        Ok(Client::open(dir, config)?)
    };
    // Trusting the CA, by name.
    let by_ca = open(
        "by-ca",
        redline_client::RelayEndpoint::with_ca(relay.local_addr(), "relay.example", ca_der),
    )?;
    by_ca.add_to_tally(&team(T3), &day, "samples_taken", 2)?;
    let report = by_ca.sync().await?;
    assert!(
        report.refused.is_empty() && report.changes_sent >= 1,
        "{report:?}"
    );
    // Pinning the production leaf works too.
    let by_pin = open("by-pin", endpoint(&relay))?;
    by_pin.sync().await?;
    assert_eq!(
        by_pin.day_totals(&team(T3), &day)?.get("samples_taken"),
        Some(&2)
    );
    // Another CA, and a wrong pin: refused before any data moves.
    let elsewhere = tempfile::tempdir()?;
    let (other_ca, _, _) = production_certificates(elsewhere.path())?;
    let stranger = open(
        "stranger",
        redline_client::RelayEndpoint::with_ca(relay.local_addr(), "relay.example", other_ca),
    )?;
    assert!(matches!(
        stranger.sync().await,
        Err(ClientError::Transport { .. })
    ));
    let mut wrong = endpoint(&relay);
    wrong.fingerprint = "11".repeat(32);
    let pinned_wrong = open("wrong-pin", wrong)?;
    assert!(matches!(
        pinned_wrong.sync().await,
        Err(ClientError::PinMismatch { .. })
    ));
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_document_cannot_grow_past_the_relays_size_limit() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir()?;
    let mut config = RelayConfig::new(root.path().join("relay"));
    config.max_document_bytes = 8 * 1024;
    let relay = start_relay_with(config).await?;
    let day = redline_tests::today();
    let dir = root.path().join("phone");
    let token = token_for(relay.data_dir(), &dir, "ana", Role::Volunteer, &[T3], &[])?;
    let phone = client(&dir, &relay, "ana", token, &[T3]);
    phone.add_to_tally(&team(T3), &day, "samples_taken", 1)?;
    assert!(phone.sync().await?.refused.is_empty(), "a small day fits");
    let stored = relay.heads(&DocId::ledger(&team(T3), &day)).await?;
    for i in 0..40 {
        let task = redline_client::NewTask::new(
            redline_client::TaskKind::Supply,
            format!("deliver parcel {i}: {}", "x".repeat(400)),
        );
        phone.add_task(&team(T3), &day, task)?;
    }
    let report = phone.sync().await?;
    assert_eq!(report.refused.len(), 1, "{report:?}");
    assert!(report.refused[0].1.starts_with("too_large"), "{report:?}");
    assert_eq!(
        relay.heads(&DocId::ledger(&team(T3), &day)).await?,
        stored,
        "nothing stored"
    );
    // The device keeps its work; the relay keeps serving.
    assert_eq!(phone.ledger(&team(T3), &day)?.unwrap().tasks.len(), 40);
    relay.shutdown().await?;
    Ok(())
}

// Round two: the attacks of a hostile token holder (issue 15), one function a row.

/// An Automerge sync message (version 1) carrying `chunks` as its changes.
fn sync_data(heads: Vec<ChangeHash>, chunks: Vec<Vec<u8>>) -> Vec<u8> {
    automerge::sync::Message {
        heads,
        need: Vec::new(),
        have: Vec::new(),
        changes: automerge::sync::ChunkList::from(chunks),
        flags: None,
        version: automerge::sync::MessageVersion::V1,
    }
    .encode()
}

/// `chunk` (an Automerge chunk) made a chunk of type `kind` with a correct length and a
/// valid checksum (SHA-256 over type, length and body; its first four bytes).
fn rechunk(chunk: &[u8], kind: u8) -> Vec<u8> {
    let (_, used) = redline_proto::wire::uleb(&chunk[9..]).expect("a chunk's length");
    redline_proto::wire::seal_chunk(kind, &chunk[9 + used..])
}

/// The process's peak resident memory (KiB), from /proc.
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// One change on a copy of `base` by `actor`, with an optional commit `message`.
fn change_on(
    base: &automerge::Automerge,
    actor: ActorId,
    message: Option<&str>,
    edit: impl FnOnce(
        &mut automerge::transaction::Transaction<'_>,
    ) -> Result<(), automerge::AutomergeError>,
) -> anyhow::Result<(automerge::Automerge, automerge::Change)> {
    let mut doc = base.fork().with_actor(actor);
    let mut tx = doc.transaction();
    edit(&mut tx).map_err(|e| anyhow::anyhow!("{e}"))?;
    match message {
        Some(m) => tx.commit_with(automerge::transaction::CommitOptions::default().with_message(m)),
        None => tx.commit(),
    };
    let change = doc
        .get_last_local_change()
        .ok_or_else(|| anyhow::anyhow!("the edit made no change"))?
        .clone();
    Ok((doc, change))
}

fn push_of(
    doc: &DocId,
    source: &automerge::Automerge,
    change: &automerge::Change,
) -> anyhow::Result<Message> {
    Ok(Message::Push(Push {
        doc: doc.clone(),
        bundle: source.bundle([change.hash()])?.bytes().to_vec(),
        heads: vec![change.hash().0],
    }))
}

/// A map under a root container of the document (the genesis made it).
fn container(
    tx: &automerge::transaction::Transaction<'_>,
    name: &str,
) -> Result<automerge::ObjId, automerge::AutomergeError> {
    Ok(tx.get(ROOT, name)?.expect("genesis container").1)
}

async fn sync_bomb(f: &Fixture) -> anyhow::Result<Seen> {
    // The fuzzer's run-length bomb (a mode byte, then the chunk), given a correct
    // length and checksum, as each kind of chunk a sync message can carry. The roster:
    // any token may read it, so any token reaches this path.
    let bomb = &include_bytes!("../../server/tests/regressions/bundle-rle-bomb.bin")[1..];
    let mut raw = f.raw_volunteer("bomber").await?;
    let before = peak_rss_kb();
    for kind in [3u8, 0, 1] {
        raw.send(&Message::Sync(SyncStep {
            doc: f.roster(),
            data: Some(sync_data(Vec::new(), vec![rechunk(bomb, kind)])),
        }))
        .await?;
    }
    let mut seen = Seen::from_messages(&raw.drain(Duration::from_millis(800)).await?);
    let grown_mb = peak_rss_kb().saturating_sub(before) / 1024;
    if grown_mb > 256 {
        eprintln!("sync bomb: peak memory grew by {grown_mb} MB");
        seen.codes.push(ErrorCode::INTERNAL);
    }
    Ok(seen)
}

async fn queued_forgery(f: &Fixture) -> anyhow::Result<Seen> {
    let doc = f.ledger(T3);
    let base = f.relay.document(&doc).await?.expect("seeded");
    // X: an ordinary change of the attacker's own. Y, on top of X: signed with the
    // honest phone's actor, at the sequence number that phone will use next.
    let (mine, x) = change_on(&base, ActorId::random(), None, |tx| {
        let tasks = container(tx, "tasks")?;
        tx.put_object(&tasks, "t-queued", automerge::ObjType::Map)?;
        Ok(())
    })?;
    let (_, y) = change_on(&mine, f.honest.identity().actor.clone(), None, |tx| {
        let tasks = container(tx, "tasks")?;
        let (_, task) = tx.get(&tasks, "t-queued")?.expect("made by x");
        tx.put(&task, "title", "approved by the lead (not really)")?;
        Ok(())
    })?;
    let mut raw = f.raw_volunteer("queuer").await?;
    let short = Duration::from_millis(500);
    // Y alone through the fallback path: its dependency is missing, so it waits.
    let step = |chunks| {
        Message::Sync(SyncStep {
            doc: doc.clone(),
            data: Some(sync_data(vec![y.hash()], chunks)),
        })
    };
    raw.send(&step(vec![y.raw_bytes().to_vec()])).await?;
    let mut messages = raw.drain(short).await?;
    // X through an ordinary push (acknowledged), then Y again: its dependency is there.
    raw.send(&push_of(&doc, &mine, &x)?).await?;
    messages.extend(
        raw.until(Duration::from_secs(10), |m| matches!(m, Message::Ack(_)))
            .await?,
    );
    raw.send(&step(vec![y.raw_bytes().to_vec()])).await?;
    messages.extend(
        raw.until(Duration::from_secs(10), |m| matches!(m, Message::Error(_)))
            .await?,
    );
    let mut seen = Seen::from_messages(&messages);
    let relay_copy = f.relay.document(&doc).await?.expect("seeded");
    if relay_copy.get_change_by_hash(&y.hash()).is_some() {
        eprintln!("queued forgery: the relay holds the forged change");
        seen.codes.push(ErrorCode::INTERNAL);
    }
    // A phone that downloads the day now gets no trace of it.
    let fresh = f.device("fresh-after-forgery", Role::Volunteer, &[T3]);
    fresh.sync().await?;
    if fresh
        .document(&doc)?
        .is_some_and(|d| d.get_change_by_hash(&y.hash()).is_some())
    {
        eprintln!("queued forgery: a fresh phone downloaded the forged change");
        seen.codes.push(ErrorCode::INTERNAL);
    }
    Ok(seen)
}

async fn revoked_before_welcome(f: &Fixture) -> anyhow::Result<Seen> {
    let name = "stalls-welcome";
    let token = f.token(name, Role::Volunteer, &[T3]);
    let id = redline_proto::token::peek(&token)?.id;
    // A receive window of 16 bytes: the relay's welcome cannot be written until this
    // side reads, and it does not read.
    let options = redline_client::transport::ConnectOptions {
        stream_receive_window: Some(16),
        ..Default::default()
    };
    let mut raw = RawDevice::connect_with(&f.relay, &options).await?;
    raw.send(&Message::Hello(redline_proto::message::Hello {
        protocol_version: redline_proto::PROTOCOL_VERSION,
        device: device_for(&f.dir(name)),
        app_version: "raw-test".into(),
        subscription: subscription(&[T3]),
        token,
    }))
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    redline_server::auth::revoke_in(f.relay.revoked_file(), id)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Reading again: the connection must be gone within a second.
    let read = tokio::spawn(async move {
        let _ = raw.drain(Duration::from_secs(1)).await;
        raw
    });
    let raw = read.await?;
    Ok(Seen {
        closed: raw.closed_with(Duration::from_millis(100)).await,
        ..Seen::default()
    })
}

async fn quota_flood(f: &Fixture) -> anyhow::Result<Seen> {
    let mut raw = f.raw_volunteer("hoarder").await?;
    let cached = f.relay.cached_documents();
    let mut seen = Seen::default();
    // 10,000 syncs for documents that do not exist (every one in the token's scope),
    // read as they are answered.
    let days: Vec<DocId> = (0..10_000)
        .map(|i| {
            let day = Day::new(format!(
                "{:04}-{:02}-{:02}",
                3000 + i / 336,
                1 + (i / 28) % 12,
                1 + i % 28
            ))
            .expect("a valid day");
            DocId::ledger(&team(T3), &day)
        })
        .collect();
    for batch in days.chunks(500) {
        for doc in batch {
            raw.send(&Message::Sync(SyncStep {
                doc: doc.clone(),
                data: None,
            }))
            .await?;
        }
        let got = raw.drain(Duration::from_millis(150)).await?;
        seen.codes.extend(Seen::from_messages(&got).codes);
    }
    let grown = f.relay.cached_documents().saturating_sub(cached);
    if grown > 100 {
        eprintln!("quota flood: {grown} documents stayed in the cache");
        seen.codes.push(ErrorCode::INTERNAL);
    }
    // A ledger day far from the relay's date: not started.
    let far = DocId::ledger(&team(T3), &Day::new("2001-01-01")?);
    let genesis = redline_proto::genesis::genesis(&far);
    let (doc, change) = change_on(&genesis, ActorId::random(), None, |tx| {
        let tasks = container(tx, "tasks")?;
        tx.put_object(&tasks, "t-old", automerge::ObjType::Map)?;
        Ok(())
    })?;
    let all: Vec<ChangeHash> = doc.get_changes(&[]).iter().map(|c| c.hash()).collect();
    raw.send(&Message::Push(Push {
        doc: far,
        bundle: doc.bundle(all)?.bytes().to_vec(),
        heads: vec![change.hash().0],
    }))
    .await?;
    // An upload larger than what the device may stage.
    let (mut s, mut r) = raw.conn.open_bi().await?;
    let upload = Message::Upload(redline_proto::message::Upload {
        id: [7; 16],
        doc: f.ledger(T3),
        len: 100 * 1024,
        document: false,
        heads: vec![],
    });
    s.write_all(&redline_proto::codec::encode_frame(&upload, 1 << 20)?)
        .await?;
    let answer = tokio::time::timeout(Duration::from_secs(3), r.read_to_end(64 * 1024)).await;
    if let Ok(Ok(bytes)) = answer {
        let mut d = redline_proto::codec::FrameDecoder::new(1 << 20);
        d.push(&bytes);
        if let Ok(Some(Message::Error(e))) = d.next_message() {
            seen.codes.push(e.code);
        }
    }
    // The control stream is answered in order: the push's answer comes after those of
    // every sync before it, however far behind a loaded relay is (CI once read for
    // 500 ms and missed it), then whatever else the relay says.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.codes.contains(&ErrorCode::FORBIDDEN) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(m) = raw.next(left).await? else {
            break;
        };
        seen.codes.extend(Seen::from_messages(&[m]).codes);
    }
    seen.codes
        .extend(Seen::from_messages(&raw.drain(Duration::from_millis(500)).await?).codes);
    Ok(seen)
}

async fn connection_flood(f: &Fixture) -> anyhow::Result<Seen> {
    // From another loopback address, one token, more connections than the relay's cap,
    // each saying hello.
    let name = "flooder";
    let token = f.token(name, Role::Volunteer, &[T3]);
    let device = device_for(&f.dir(name));
    let options = redline_client::transport::ConnectOptions {
        bind: Some("127.0.0.2:0".parse()?),
        ..Default::default()
    };
    let mut held = Vec::new();
    let mut seen = Seen::default();
    for _ in 0..=MAX_CONNECTIONS {
        let Ok(Ok(mut raw)) = tokio::time::timeout(
            Duration::from_secs(3),
            RawDevice::connect_with(&f.relay, &options),
        )
        .await
        else {
            continue; // refused at the door
        };
        if let Ok(answer) = raw.hello(&device, &token, subscription(&[T3])).await {
            seen.codes.extend(Seen::from_messages(&[answer]).codes);
        }
        held.push(raw);
    }
    // While the flood holds what it got, an honest device is welcomed.
    if let Err(e) = f.raw_volunteer("after-the-flood").await {
        eprintln!("connection flood: an honest device was not welcomed: {e}");
        seen.codes.push(ErrorCode::INTERNAL);
    }
    drop(held);
    Ok(seen)
}

async fn stalled_reader(f: &Fixture) -> anyhow::Result<Seen> {
    // Reads its welcome, asks for everything, then never reads again (and takes no
    // streams): the relay must not wait on it.
    let options = redline_client::transport::ConnectOptions {
        stream_receive_window: Some(64),
        max_uni_streams: Some(0),
        ..Default::default()
    };
    let mut raw = RawDevice::connect_with(&f.relay, &options).await?;
    let name = "stops-reading";
    let token = f.token(name, Role::Volunteer, &[T3]);
    let answer = raw
        .hello(&device_for(&f.dir(name)), &token, subscription(&[T3]))
        .await?;
    anyhow::ensure!(
        matches!(answer, Message::Welcome(_)),
        "not welcomed: {answer:?}"
    );
    raw.send(&Message::Pull(redline_proto::message::Pull {
        cursor: None,
        resume: vec![],
        defer_large: false,
    }))
    .await?;
    Ok(Seen {
        closed: raw.closed_with(Duration::from_secs(5)).await,
        ..Seen::default()
    })
}

async fn oversized_hello(f: &Fixture) -> anyhow::Result<Seen> {
    let name = "chatty";
    let token = f.token(name, Role::Volunteer, &[T3]);
    let device = device_for(&f.dir(name));
    let mut seen = Seen::default();
    // A 100 KB hello (its app version), then a hello listing 600 documents.
    let mut big = subscription(&[T3]);
    big.docs = (0..600)
        .map(|i| DocId::parse(&format!("households/z{i}")))
        .collect::<Result<_, _>>()?;
    for (app_version, wanted) in [
        ("x".repeat(100_000), subscription(&[T3])),
        (String::new(), big),
    ] {
        let mut raw = RawDevice::connect(&f.relay).await?;
        raw.send(&Message::Hello(redline_proto::message::Hello {
            protocol_version: redline_proto::PROTOCOL_VERSION,
            device: device.clone(),
            app_version,
            subscription: wanted,
            token: token.clone(),
        }))
        .await?;
        seen.codes
            .extend(Seen::from_messages(&raw.drain(Duration::from_millis(800)).await?).codes);
        seen.closed = raw.closed_with(Duration::from_secs(3)).await;
    }
    Ok(seen)
}

async fn forged_authorship(f: &Fixture) -> anyhow::Result<Seen> {
    let doc = f.ledger(T3);
    let base = f.relay.document(&doc).await?.expect("seeded");
    let actor = ActorId::random();
    let honest_device = f.honest.identity().device.to_string();
    let name = "impostor";
    let own = format!("{name}@{}", device_for(&f.dir(name)));
    let as_lead = "lead@".to_string() + &device_for(&f.dir("lead")).to_string();
    let forgeries = [
        // Signed as the lead's phone.
        change_on(&base, actor.clone(), Some(&as_lead), |tx| {
            let tasks = container(tx, "tasks")?;
            tx.put_object(&tasks, "t-signed", automerge::ObjType::Map)?;
            Ok(())
        })?,
        // A tally under the honest phone's key ("one writer per counter").
        change_on(&base, actor.clone(), Some(&own), |tx| {
            let tallies = container(tx, "tallies")?;
            tx.put_object(&tallies, honest_device.as_str(), automerge::ObjType::Map)?;
            Ok(())
        })?,
        // A duty check-in as the lead.
        change_on(&base, actor.clone(), Some(&own), |tx| {
            let duty = container(tx, "duty")?;
            let e = tx.put_object(&duty, "e-forged", automerge::ObjType::Map)?;
            tx.put(&e, "member", "lead")?;
            tx.put(&e, "action", "in")?;
            Ok(())
        })?,
    ];
    let mut raw = f.raw_volunteer(name).await?;
    for (source, change) in &forgeries {
        raw.send(&push_of(&doc, source, change)?).await?;
    }
    Ok(Seen::from_messages(
        &raw.drain(Duration::from_millis(800)).await?,
    ))
}

async fn counters_into_the_past(f: &Fixture) -> anyhow::Result<Seen> {
    let doc = f.ledger(T3);
    let base = f.relay.document(&doc).await?.expect("seeded");
    let name = "numberer";
    let own = format!("{name}@{}", device_for(&f.dir(name)));
    let (_, honest) = change_on(&base, ActorId::random(), Some(&own), |tx| {
        let tasks = container(tx, "tasks")?;
        tx.put(&tasks, "t-numbered", "open")?;
        Ok(())
    })?;
    // The same change, its one operation numbered 1: below every counter the
    // document's history used.
    let mut expanded = automerge::ExpandedChange::from(&honest);
    expanded.start_op = std::num::NonZeroU64::MIN;
    expanded.hash = None;
    let poisoned = automerge::Change::from(expanded);
    let mut copy = base.clone();
    copy.apply_changes([poisoned.clone()])?;
    anyhow::ensure!(
        automerge::Automerge::load(&copy.save()).is_err(),
        "the renumbered change no longer breaks a saved document: the row tests nothing"
    );
    let mut raw = f.raw_volunteer(name).await?;
    raw.send(&Message::Push(Push {
        doc: doc.clone(),
        bundle: poisoned.raw_bytes().to_vec(),
        heads: vec![poisoned.hash().0],
    }))
    .await?;
    Ok(Seen::from_messages(
        &raw.drain(Duration::from_millis(800)).await?,
    ))
}

async fn skipped_own_change(f: &Fixture) -> anyhow::Result<Seen> {
    let doc = f.ledger(T3);
    let base = f.relay.document(&doc).await?.expect("seeded");
    let name = "skipper";
    let own = format!("{name}@{}", device_for(&f.dir(name)));
    let actor = ActorId::random();
    let (after_first, first) = change_on(&base, actor.clone(), Some(&own), |tx| {
        let tasks = container(tx, "tasks")?;
        tx.put(&tasks, "t-first", "open")?;
        Ok(())
    })?;
    let (_, second) = change_on(&after_first, actor, Some(&own), |tx| {
        let tasks = container(tx, "tasks")?;
        tx.put(&tasks, "t-second", "open")?;
        Ok(())
    })?;
    // The second change, built on the document as the first found it.
    let mut expanded = automerge::ExpandedChange::from(&second);
    expanded.deps = base.get_heads();
    expanded.hash = None;
    let skipping = automerge::Change::from(expanded);
    let mut copy = base.clone();
    copy.apply_changes([first.clone(), skipping.clone()])?;
    anyhow::ensure!(
        automerge::Automerge::load(&copy.save()).is_err(),
        "the change skipping its actor's first no longer breaks a saved document: the row tests nothing"
    );
    let mut bytes = first.raw_bytes().to_vec();
    bytes.extend_from_slice(skipping.raw_bytes());
    let mut raw = f.raw_volunteer(name).await?;
    raw.send(&Message::Push(Push {
        doc: doc.clone(),
        bundle: bytes,
        heads: vec![first.hash().0, skipping.hash().0],
    }))
    .await?;
    Ok(Seen::from_messages(
        &raw.drain(Duration::from_millis(800)).await?,
    ))
}

async fn quarantine_across_teams(f: &Fixture) -> anyhow::Result<Seen> {
    let zone = ZoneId::new("z1")?;
    let doc = DocId::households(&zone);
    // The shared zone's book exists (both teams' tokens cover z1).
    let lead3 = f.device("lead", Role::Lead, &[T3]);
    lead3.sync().await?;
    lead3.add_zone(&zone, "Zone one")?;
    lead3.sync().await?;
    f.honest.sync().await?;
    f.honest.add_household(
        &zone,
        redline_client::households::NewHousehold {
            address: "12 Shared Street".into(),
            residents: 2,
            contact: None,
            flags: vec![],
        },
    )?;
    f.honest.sync().await?;
    let base = f.relay.document(&doc).await?.expect("just synced");
    // A team-3 phone syncs once with its actor, then comes back as a new actor (a reset
    // store): quarantined, its pushes held.
    let name = "returner";
    let token = f.token(name, Role::Volunteer, &[T3]);
    let device = device_for(&f.dir(name));
    let own = format!("{name}@{device}");
    let short = Duration::from_millis(500);
    {
        let mut raw = RawDevice::connect(&f.relay).await?;
        raw.hello(&device, &token, subscription(&[T3])).await?;
        let (d, c) = change_on(&base, ActorId::random(), Some(&own), |tx| {
            let h = container(tx, "households")?;
            tx.put_object(&h, "h-first", automerge::ObjType::Map)?;
            Ok(())
        })?;
        raw.send(&push_of(&doc, &d, &c)?).await?;
        raw.send(&Message::Pull(redline_proto::message::Pull {
            cursor: None,
            resume: vec![],
            defer_large: false,
        }))
        .await?;
        raw.drain(short).await?;
    }
    let base = f.relay.document(&doc).await?.expect("there");
    let (good, good_change) = change_on(&base, ActorId::random(), Some(&own), |tx| {
        let h = container(tx, "households")?;
        tx.put_object(&h, "h-held", automerge::ObjType::Map)?;
        Ok(())
    })?;
    let (forged, forged_change) =
        change_on(&base, ActorId::random(), Some("lead@someone"), |tx| {
            let h = container(tx, "households")?;
            tx.put_object(&h, "h-forged", automerge::ObjType::Map)?;
            Ok(())
        })?;
    {
        let mut raw = RawDevice::connect(&f.relay).await?;
        raw.hello(&device, &token, subscription(&[T3])).await?;
        raw.send(&push_of(&doc, &forged, &forged_change)?).await?;
        raw.send(&push_of(&doc, &good, &good_change)?).await?;
        let answers = Seen::from_messages(&raw.drain(short).await?);
        anyhow::ensure!(
            answers.codes == [ErrorCode::QUARANTINED; 2],
            "the returning phone was not held: {answers:?}"
        );
    }
    let mut seen = Seen::default();
    // A lead of team 5 shares the zone, not the phone's team: sees nothing, merges nothing.
    let lead5 = f.device("lead-five", Role::Lead, &[T5]);
    let five = team(T5);
    if lead5
        .quarantine(&five)
        .await?
        .iter()
        .any(|e| e.device == device)
    {
        eprintln!("quarantine: a lead of team 5 sees a team-3 phone's held changes");
        seen.codes.push(ErrorCode::INTERNAL);
    }
    lead5.accept_quarantined(&five, &device).await?;
    if f.relay
        .document(&doc)
        .await?
        .is_some_and(|d| d.get_change_by_hash(&good_change.hash()).is_some())
    {
        eprintln!("quarantine: a lead of team 5 merged a team-3 phone's held change");
        seen.codes.push(ErrorCode::INTERNAL);
    }
    // Team 3's lead accepts: the forged one is refused and reported, the good one merges.
    let review = lead3.accept_quarantined(&team(T3), &device).await?;
    seen.codes.extend(review.refused.iter().map(|r| r.code));
    let merged = f.relay.document(&doc).await?.expect("there");
    if merged.get_change_by_hash(&good_change.hash()).is_none()
        || merged.get_change_by_hash(&forged_change.hash()).is_some()
        || !review.remaining.is_empty()
    {
        eprintln!("quarantine: accepting did not merge exactly the good change: {review:?}");
        seen.codes.push(ErrorCode::INTERNAL);
    }
    Ok(seen)
}

/// The process's resident memory now (KiB), from /proc.
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Messages until `n` of them were counted by `count`, or nothing came for `quiet`.
async fn answers(
    raw: &mut RawDevice,
    n: usize,
    quiet: Duration,
    count: impl Fn(&Message) -> bool,
) -> anyhow::Result<Vec<Message>> {
    let mut all = Vec::new();
    let mut counted = 0;
    while counted < n {
        let Some(m) = raw.next(quiet).await? else {
            break;
        };
        if count(&m) {
            counted += 1;
        }
        all.push(m);
    }
    Ok(all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_cannot_fill_the_relays_disk_or_memory() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    const N: usize = 10_000;
    const QUOTA: u64 = 64 * 1024;
    let root = tempfile::tempdir()?;
    let mut config = RelayConfig::new(root.path().join("relay"));
    // Streams and messages as fast as the attacker can send them: only the quotas hold.
    config.limits.streams_per_second = 1_000_000;
    config.limits.messages_per_second = 1_000_000;
    config.limits.message_burst = 1_000_000;
    config.max_streams_per_connection = 256;
    config.quotas.staged_bytes_per_device = QUOTA;
    config.quotas.held_bytes_per_device = QUOTA;
    config.quotas.upload_expiry = Duration::from_secs(3);
    let relay = start_relay_with(config).await?;
    let day = redline_tests::today();
    let honest_token = token_for(
        relay.data_dir(),
        &root.path().join("honest"),
        "honest",
        Role::Volunteer,
        &[T3],
        &["z1"],
    )?;
    let honest = client(
        &root.path().join("honest"),
        &relay,
        "honest",
        honest_token,
        &[T3],
    );
    let served = async |what: &str| -> anyhow::Result<()> {
        honest.add_to_tally(&team(T3), &day, "samples_taken", 1)?;
        let r = honest.sync().await?;
        anyhow::ensure!(
            r.refused.is_empty() && r.changes_sent >= 1,
            "honest device not served after {what}: {r:?}"
        );
        Ok(())
    };
    served("nothing").await?;
    let doc = DocId::ledger(&team(T3), &day);
    let name = "hoarder";
    let dir = root.path().join(name);
    let token = token_for(
        relay.data_dir(),
        &dir,
        name,
        Role::Volunteer,
        &[T3],
        &["z1"],
    )?;
    let device = device_for(&dir);
    let rss_before = rss_kb();

    // 1. 10,000 uploads, each abandoned after its first piece (16 at a time).
    let mut raw = RawDevice::connect(&relay).await?;
    anyhow::ensure!(matches!(
        raw.hello(&device, &token, subscription(&[T3])).await?,
        Message::Welcome(_)
    ));
    let conn = raw.conn.clone();
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..16usize {
        let (conn, doc, refused) = (conn.clone(), doc.clone(), refused.clone());
        workers.spawn(async move {
            for i in (w..N).step_by(16) {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                let (mut s, mut r) = conn.open_bi().await?;
                let upload = Message::Upload(redline_proto::message::Upload {
                    id,
                    doc: doc.clone(),
                    len: 4096,
                    document: false,
                    heads: vec![],
                });
                let piece = Message::Piece(redline_proto::message::Piece {
                    id,
                    offset: 0,
                    data: vec![i as u8; 1024],
                });
                for m in [upload, piece] {
                    let frame = redline_proto::codec::encode_frame(&m, 1 << 20)?;
                    // A relay that refuses the upload at once may stop the stream
                    // before the piece is written: its answer is still there to read.
                    if s.write_all(&frame).await.is_err() {
                        break;
                    }
                }
                let _ = s.finish();
                let answer = r.read_to_end(64 * 1024).await.unwrap_or_default();
                let mut d = redline_proto::codec::FrameDecoder::new(1 << 20);
                d.push(&answer);
                while let Ok(Some(m)) = d.next_message() {
                    if matches!(m, Message::Error(ref e) if e.code == ErrorCode::QUOTA_EXCEEDED) {
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    let staged = relay.staged_bytes(&device).await?;
    let refused = refused.load(std::sync::atomic::Ordering::Relaxed);
    println!("abandoned uploads: {N} sent, {refused} refused for the quota, {staged} bytes staged");
    assert!(
        staged <= QUOTA,
        "{staged} bytes staged past the quota of {QUOTA}"
    );
    assert!(
        refused >= N - (QUOTA as usize / 1024),
        "only {refused} refused"
    );
    served("10,000 abandoned uploads").await?;
    drop(raw);

    // 2. 10,000 syncs for documents that do not exist.
    let mut raw = RawDevice::connect(&relay).await?;
    raw.hello(&device, &token, subscription(&[T3])).await?;
    let stored = relay.documents().await?;
    for batch in (0..N).collect::<Vec<_>>().chunks(500) {
        for i in batch {
            let absent = Day::new(format!(
                "{:04}-{:02}-{:02}",
                3000 + i / 336,
                1 + (i / 28) % 12,
                1 + i % 28
            ))?;
            raw.send(&Message::Sync(SyncStep {
                doc: DocId::ledger(&team(T3), &absent),
                data: None,
            }))
            .await?;
        }
        answers(&mut raw, batch.len(), Duration::from_secs(5), |m| {
            matches!(m, Message::Sync(_))
        })
        .await?;
    }
    assert_eq!(relay.documents().await?, stored, "asking created documents");
    assert!(
        relay.cached_documents() <= stored.len() + 1,
        "{} documents cached",
        relay.cached_documents()
    );
    served("10,000 syncs for absent documents").await?;
    drop(raw);

    // 3. 10,000 pushes held in quarantine: the phone synced once as one actor, then
    //    writes as another (a reset store), so everything it sends is held.
    let base = relay
        .document(&doc)
        .await?
        .expect("the honest phone wrote it");
    {
        let mut raw = RawDevice::connect(&relay).await?;
        raw.hello(&device, &token, subscription(&[T3])).await?;
        let own = format!("{name}@{device}");
        let (d, c) = change_on(&base, ActorId::random(), Some(&own), |tx| {
            let tasks = container(tx, "tasks")?;
            tx.put_object(&tasks, "t-first", automerge::ObjType::Map)?;
            Ok(())
        })?;
        raw.send(&push_of(&doc, &d, &c)?).await?;
        raw.until(Duration::from_secs(10), |m| matches!(m, Message::Ack(_)))
            .await?;
        raw.send(&Message::Pull(redline_proto::message::Pull {
            cursor: None,
            resume: vec![],
            defer_large: false,
        }))
        .await?;
        raw.until(Duration::from_secs(10), |m| matches!(m, Message::Caught(_)))
            .await?;
    }
    let base = relay.document(&doc).await?.expect("there");
    let mut chain = base.fork().with_actor(ActorId::random());
    let mut bundles = Vec::with_capacity(N);
    for i in 0..N {
        chain
            .transact::<_, _, automerge::AutomergeError>(|tx| {
                let tasks = container(tx, "tasks")?;
                tx.put(&tasks, "t-held", i as i64)?;
                Ok(())
            })
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let c = chain.get_last_local_change().expect("made").clone();
        bundles.push(Message::Push(Push {
            doc: doc.clone(),
            bundle: chain.bundle([c.hash()])?.bytes().to_vec(),
            heads: vec![c.hash().0],
        }));
    }
    let mut raw = RawDevice::connect(&relay).await?;
    raw.hello(&device, &token, subscription(&[T3])).await?;
    let mut codes = std::collections::BTreeMap::<u16, usize>::new();
    for batch in bundles.chunks(500) {
        for m in batch {
            raw.send(m).await?;
        }
        for m in answers(&mut raw, batch.len(), Duration::from_secs(10), |m| {
            matches!(m, Message::Error(_))
        })
        .await?
        {
            if let Message::Error(e) = m {
                *codes.entry(e.code.0).or_default() += 1;
            }
        }
    }
    let held = relay.held_bytes(&device).await?;
    println!("held pushes: {N} sent, answers by code {codes:?}, {held} bytes held");
    assert!(held <= QUOTA, "{held} bytes held past the quota of {QUOTA}");
    assert!(
        codes.get(&ErrorCode::QUARANTINED.0).copied().unwrap_or(0) > 0,
        "nothing was held: {codes:?}"
    );
    assert!(
        codes
            .get(&ErrorCode::QUOTA_EXCEEDED.0)
            .copied()
            .unwrap_or(0)
            > N / 2,
        "{codes:?}"
    );
    served("10,000 pushes to hold").await?;

    // Abandoned uploads expire; memory stayed bounded throughout.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        relay.staged_bytes(&device).await?,
        0,
        "abandoned uploads did not expire"
    );
    let grown_mb = rss_kb().saturating_sub(rss_before) / 1024;
    println!("resident memory grew by {grown_mb} MB");
    assert!(grown_mb < 200, "resident memory grew by {grown_mb} MB");
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn under_handshake_load_every_new_peer_proves_its_address_first() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    // With the threshold at zero, every connection goes through QUIC Retry: phones and
    // raw devices still get in (one round trip more), and the relay counts nothing odd.
    let root = tempfile::tempdir()?;
    let mut config = RelayConfig::new(root.path().join("relay"));
    config.quotas.retry_above_pending = 0;
    let relay = start_relay_with(config).await?;
    let day = redline_tests::today();
    let dir = root.path().join("phone");
    let token = token_for(relay.data_dir(), &dir, "ana", Role::Volunteer, &[T3], &[])?;
    let phone = client(&dir, &relay, "ana", token, &[T3]);
    phone.add_to_tally(&team(T3), &day, "samples_taken", 4)?;
    let report = phone.sync().await?;
    assert!(
        report.refused.is_empty() && report.changes_sent >= 1,
        "{report:?}"
    );
    let other = root.path().join("other");
    let token = token_for(relay.data_dir(), &other, "bo", Role::Volunteer, &[T3], &[])?;
    let mut raw = RawDevice::connect(&relay).await?;
    let answer = raw
        .hello(&device_for(&other), &token, subscription(&[T3]))
        .await?;
    assert!(matches!(answer, Message::Welcome(_)), "{answer:?}");
    relay.shutdown().await?;
    Ok(())
}
