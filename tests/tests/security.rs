//! The security suite: one table, each row an attack on a real relay (QUIC, TLS, sled)
//! and the outcome it must meet. After every row: the stored documents are unchanged, the
//! relay still serves an honest device, and the attacker saw nothing outside its scope.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use automerge::sync::SyncDoc;
use automerge::transaction::Transactable;
use automerge::{ActorId, ChangeHash, ROOT};
use redline_client::{Client, ClientConfig, Error as ClientError};
use redline_proto::message::{Push, Subscription, SyncStep};
use redline_proto::token::Role;
use redline_proto::{Day, DocId, ErrorCode, MemberId, Message, OrgId, TeamId, ZoneId};
use redline_server::{Limits, RelayConfig, RelayHandle};
use redline_tests::{RawDevice, device_for, endpoint, start_relay_with, token_for};

const ORG: &str = "district-9";
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
        config.limits = limits;
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

fn closed_with(code: ErrorCode) -> Expect {
    Box::new(move |s: &Seen| s.closed == Some(code.0) && s.codes.contains(&code))
}

#[tokio::test]
async fn every_attack_is_refused_and_nothing_leaks() -> anyhow::Result<()> {
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
    ];
    let out_of_scope = |d: &DocId| *d == f.ledger(T5);
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
        if before != after {
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
    assert_eq!(totals.get("samples_taken"), Some(&(3 + 17)));
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
    let root = tempfile::tempdir()?;
    let (ca_der, cert, key) = production_certificates(root.path())?;
    let mut config = RelayConfig::new(root.path().join("relay"));
    config.tls = redline_server::TlsMode::Files { cert, key };
    let relay = start_relay_with(config).await?;
    assert!(
        !root.path().join("relay/tls/dev-cert.der").exists(),
        "no dev certificate in production"
    );
    let day = Day::new("2026-11-29")?;
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
        Err(ClientError::Transport(_))
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
    let root = tempfile::tempdir()?;
    let mut config = RelayConfig::new(root.path().join("relay"));
    config.max_document_bytes = 8 * 1024;
    let relay = start_relay_with(config).await?;
    let day = Day::new("2026-11-29")?;
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
