//! Phones in the field run app versions months old, and relays are upgraded one at a
//! time: a relay serves phones a protocol version behind, a phone talks to a relay from
//! before version negotiation, and a phone too old is told to update. Real QUIC, real
//! relay, real phones; a "version 1 phone" decodes strictly, the way today's builds do.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redline_client::{Client, ClientConfig, RelayEndpoint};
use redline_proto::codec::{self, FrameDecoder, HEADER_LEN};
use redline_proto::message::{Cursor, ErrorReport, Hello, Message, Pull, Subscription, Welcome};
use redline_proto::token::Role;
use redline_proto::{DocId, ErrorCode, MIN_PROTOCOL_VERSION, MemberId, PROTOCOL_VERSION, TeamId};
use redline_tests::{
    RawDevice, device_for, endpoint, start_relay, start_relay_with, test_config, today, token_for,
};

fn team_phone_speaking(
    relay_dir: &std::path::Path,
    dir: &std::path::Path,
    member: &str,
    at: RelayEndpoint,
    version: u16,
) -> anyhow::Result<Client> {
    let token = token_for(relay_dir, dir, member, Role::Volunteer, &["team-1"], &[])?;
    let mut config = ClientConfig::new(MemberId::new(member)?)
        .with_relay(at)
        .with_token(token)
        .with_teams(vec![TeamId::new("team-1")?])
        .with_keep_days(3650);
    config.protocol_version = version;
    Ok(Client::open(dir, config)?)
}

/// Reads frames the way a version 1 build does: a payload with bytes after the message
/// is an error. Returns every message until `last` matches.
async fn read_strictly(
    recv: &mut quinn::RecvStream,
    last: impl Fn(&Message) -> bool,
) -> anyhow::Result<Vec<Message>> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        while buf.len() >= HEADER_LEN {
            let len = codec::payload_len(buf[..HEADER_LEN].try_into()?, codec::DEFAULT_MAX_FRAME)?;
            if buf.len() < HEADER_LEN + len {
                break;
            }
            let payload: Vec<u8> = buf.drain(..HEADER_LEN + len).skip(HEADER_LEN).collect();
            let (msg, rest) = postcard::take_from_bytes::<Message>(&payload)?;
            anyhow::ensure!(
                rest.is_empty(),
                "{} bytes after a {}: a version 1 phone fails here",
                rest.len(),
                msg.kind()
            );
            let done = last(&msg);
            out.push(msg);
            if done {
                return Ok(out);
            }
        }
        match tokio::time::timeout_at(deadline, recv.read_chunk(64 * 1024, true)).await {
            Ok(Ok(Some(chunk))) => buf.extend_from_slice(&chunk.bytes),
            other => anyhow::bail!("stream ended or timed out: {other:?} after {out:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phones_a_release_behind_and_current_phones_share_one_relay() -> anyhow::Result<()> {
    let relay_dir = tempfile::tempdir()?;
    let relay = start_relay(relay_dir.path()).await?;
    let (old_dir, new_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let old = team_phone_speaking(relay_dir.path(), old_dir.path(), "ana", endpoint(&relay), 1)?;
    let new = team_phone_speaking(
        relay_dir.path(),
        new_dir.path(),
        "ben",
        endpoint(&relay),
        PROTOCOL_VERSION,
    )?;
    let (team, day) = (TeamId::new("team-1")?, today());
    old.check_in(&team, &day)?;
    new.check_in(&team, &day)?;

    let r = old.sync().await?;
    assert_eq!(
        r.protocol_version, 1,
        "the relay speaks the old phone's version"
    );
    assert_eq!(
        r.relay_versions, None,
        "no extensions for a version 1 phone"
    );
    let r = new.sync().await?;
    assert_eq!(r.protocol_version, PROTOCOL_VERSION);
    assert_eq!(
        r.relay_versions,
        Some((MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)),
        "a version 2 phone learns what the relay serves"
    );
    old.sync().await?;
    for phone in [&old, &new] {
        let mut on = phone.on_duty(&team, &day)?;
        on.sort();
        assert_eq!(on, vec!["ana".to_string(), "ben".to_string()]);
    }

    // Byte for byte: a strict version 1 reader takes the relay's whole answer to a
    // version 1 hello (welcome, the day's update, caught) without a trailing byte.
    let raw_dir = tempfile::tempdir()?;
    let device = device_for(raw_dir.path());
    let token = token_for(
        relay_dir.path(),
        raw_dir.path(),
        "cai",
        Role::Volunteer,
        &["team-1"],
        &[],
    )?;
    let mut raw = RawDevice::connect(&relay).await?;
    let subscription = Subscription {
        teams: vec![team.clone()],
        ledger_since: Some(day.clone()),
        ..Default::default()
    };
    raw.send(&Message::Hello(Hello {
        protocol_version: 1,
        device,
        app_version: "redline-client/0.0.1".into(),
        subscription,
        token,
    }))
    .await?;
    raw.send(&Message::Pull(Pull {
        cursor: None,
        resume: Vec::new(),
        defer_large: false,
    }))
    .await?;
    let got = read_strictly(raw.recv_mut(), |m| matches!(m, Message::Caught(_))).await?;
    assert!(
        matches!(
            &got[0],
            Message::Welcome(Welcome {
                protocol_version: 1,
                ..
            })
        ),
        "{got:?}"
    );
    let ledger = DocId::ledger(&team, &day);
    assert!(
        got.iter()
            .any(|m| matches!(m, Message::Update(u) if u.doc == ledger)),
        "the day reached the version 1 reader: {got:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_pinned_to_version_1_serves_new_phones_at_version_1() -> anyhow::Result<()> {
    let relay_dir = tempfile::tempdir()?;
    let mut config = test_config(relay_dir.path());
    config.protocol_version = 1;
    let relay = start_relay_with(config).await?;
    let dir = tempfile::tempdir()?;
    let phone = team_phone_speaking(
        relay_dir.path(),
        dir.path(),
        "ana",
        endpoint(&relay),
        PROTOCOL_VERSION,
    )?;
    phone.check_in(&TeamId::new("team-1")?, &today())?;
    let r = phone.sync().await?;
    assert_eq!(r.protocol_version, 1);
    assert_eq!(r.relay_versions, None);
    assert_eq!(r.docs_pushed, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_too_old_is_told_to_update_the_app() -> anyhow::Result<()> {
    let relay_dir = tempfile::tempdir()?;
    let relay = start_relay(relay_dir.path()).await?;
    let dir = tempfile::tempdir()?;
    let token = token_for(
        relay_dir.path(),
        dir.path(),
        "ana",
        Role::Volunteer,
        &["team-1"],
        &[],
    )?;
    let mut raw = RawDevice::connect(&relay).await?;
    let answer = raw
        .hello_at(
            MIN_PROTOCOL_VERSION - 1,
            &device_for(dir.path()),
            &token,
            Subscription::default(),
        )
        .await?;
    match answer {
        Message::Error(ErrorReport { code, text, .. }) => {
            assert_eq!(code, ErrorCode::UNSUPPORTED_VERSION);
            assert!(text.contains("update the app"), "{text}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        raw.closed_with(Duration::from_secs(5)).await,
        Some(ErrorCode::UNSUPPORTED_VERSION.0)
    );
    Ok(())
}

/// A relay from before version negotiation: it refuses every hello but version 1 the
/// way those builds did, and answers a version 1 hello with a welcome and nothing new.
async fn relay_of_version_1(
    dir: &std::path::Path,
) -> anyhow::Result<(RelayEndpoint, Arc<Mutex<Vec<u16>>>)> {
    let identity = redline_server::tls::load_or_create_dev_identity(dir)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(
        redline_server::tls::server_crypto(&identity)?,
    )?;
    let server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let ep = quinn::Endpoint::server(server, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    let at = RelayEndpoint::new(ep.local_addr()?, identity.fingerprint());
    let hellos = Arc::new(Mutex::new(Vec::new()));
    let seen = hellos.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                let mut decoder = FrameDecoder::new(codec::DEFAULT_MAX_FRAME);
                let mut subscription = Subscription::default();
                loop {
                    let msg = match decoder.next_message() {
                        Ok(Some(m)) => m,
                        Ok(None) => match recv.read_chunk(64 * 1024, true).await {
                            Ok(Some(c)) => {
                                decoder.push(&c.bytes);
                                continue;
                            }
                            _ => return,
                        },
                        Err(_) => return,
                    };
                    let reply = match msg {
                        Message::Hello(h) => {
                            seen.lock().unwrap().push(h.protocol_version);
                            if h.protocol_version != 1 {
                                let text = format!(
                                    "peer speaks protocol version {}, this build speaks 1; update the older side",
                                    h.protocol_version
                                );
                                let e = Message::Error(ErrorReport {
                                    code: ErrorCode::UNSUPPORTED_VERSION,
                                    text,
                                    doc: None,
                                });
                                let _ = send
                                    .write_all(&codec::encode_frame(&e, 1 << 20).unwrap())
                                    .await;
                                let _ = send.finish();
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                conn.close(3u32.into(), b"unsupported_version");
                                return;
                            }
                            subscription = h.subscription.clone();
                            Message::Welcome(Welcome {
                                protocol_version: 1,
                                relay: "old".into(),
                                epoch: 7,
                                granted: h.subscription,
                                quarantined: None,
                            })
                        }
                        Message::Pull(_) => Message::Caught(Cursor {
                            epoch: 7,
                            seq: 0,
                            subscription: subscription.clone(),
                        }),
                        _ => continue,
                    };
                    if send
                        .write_all(&codec::encode_frame(&reply, 1 << 20).unwrap())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    Ok((at, hellos))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_phone_says_hello_again_to_a_relay_from_before_negotiation() -> anyhow::Result<()> {
    let relay_dir = tempfile::tempdir()?;
    let (at, hellos) = relay_of_version_1(relay_dir.path()).await?;
    let dir = tempfile::tempdir()?;
    let phone = team_phone_speaking(relay_dir.path(), dir.path(), "ana", at, PROTOCOL_VERSION)?;
    let r = phone.sync().await?;
    assert_eq!(r.protocol_version, 1);
    assert_eq!(*hellos.lock().unwrap(), vec![PROTOCOL_VERSION, 1]);
    // And it remembers: the next sync says hello at version 1 at once.
    phone.sync().await?;
    assert_eq!(*hellos.lock().unwrap(), vec![PROTOCOL_VERSION, 1, 1]);
    Ok(())
}

/// Says hello at the current version, with or without the extensions of today's app
/// (stored chunks read, heads derived), and pulls from `cursor`; returns every message
/// up to `Caught`.
async fn pull_as_raw(
    relay: &redline_server::RelayHandle,
    dir: &std::path::Path,
    token: &str,
    today: bool,
    cursor: Option<Cursor>,
) -> anyhow::Result<Vec<Message>> {
    let mut raw = RawDevice::connect(relay).await?;
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        device: device_for(dir),
        app_version: "raw-test".into(),
        subscription: Subscription {
            teams: vec![TeamId::new("team-1")?],
            ..Default::default()
        },
        token: token.into(),
    });
    let mut ext = codec::Extensions::new();
    if today {
        ext.insert(redline_proto::message::ext::HELLO_ACCEPTS_CHUNKS, &true)?;
        ext.insert(redline_proto::message::ext::HELLO_DERIVES_HEADS, &true)?;
    }
    let frame = codec::encode_frame_with(&hello, &ext, PROTOCOL_VERSION, codec::DEFAULT_MAX_FRAME)?;
    raw.send_bytes(&frame).await?;
    raw.send(&Message::Pull(Pull {
        cursor,
        resume: Vec::new(),
        defer_large: false,
    }))
    .await?;
    raw.until(Duration::from_secs(10), |m| matches!(m, Message::Caught(_)))
        .await
}

/// The Automerge chunks of an update's bundle payload.
fn chunks_of(msgs: &[Message]) -> Vec<usize> {
    msgs.iter()
        .filter_map(|m| match m {
            Message::Update(u) => match &u.payload {
                redline_proto::message::Payload::Bundle(b) => {
                    let mut n = 0;
                    let mut rest = b.as_slice();
                    while !rest.is_empty() {
                        rest = redline_proto::wire::split_chunk(rest)
                            .expect("whole chunks")
                            .2;
                        n += 1;
                    }
                    Some(n)
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_chunks_and_updates_without_heads_go_only_to_apps_that_say_they_read_them()
-> anyhow::Result<()> {
    let relay_dir = tempfile::tempdir()?;
    let relay = start_relay(relay_dir.path()).await?;
    let writer_dir = tempfile::tempdir()?;
    let writer = team_phone_speaking(
        relay_dir.path(),
        writer_dir.path(),
        "ana",
        endpoint(&relay),
        PROTOCOL_VERSION,
    )?;
    let (team, day) = (TeamId::new("team-1")?, today());
    writer.add_to_tally(&team, &day, "screened", 1)?;
    writer.sync().await?;
    // Two readers, caught up now: one app that reads stored chunks, one that does not.
    let (new_dir, old_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let token = |dir: &std::path::Path, who: &str| {
        token_for(
            relay_dir.path(),
            dir,
            who,
            Role::Volunteer,
            &["team-1"],
            &[],
        )
    };
    let (new_token, old_token) = (token(new_dir.path(), "bo")?, token(old_dir.path(), "cy")?);
    let cursor = |msgs: &[Message]| {
        msgs.iter().find_map(|m| match m {
            Message::Caught(c) => Some(c.clone()),
            _ => None,
        })
    };
    let first = pull_as_raw(&relay, new_dir.path(), &new_token, true, None).await?;
    let new_cursor = cursor(&first).expect("caught");
    let first = pull_as_raw(&relay, old_dir.path(), &old_token, false, None).await?;
    let old_cursor = cursor(&first).expect("caught");
    // The writer commits twice more.
    for n in 2..=3 {
        writer.add_to_tally(&team, &day, "screened", n)?;
        writer.sync().await?;
    }
    let id = DocId::ledger(&team, &day);
    let newer = pull_as_raw(&relay, new_dir.path(), &new_token, true, Some(new_cursor)).await?;
    assert_eq!(chunks_of(&newer), vec![2], "one stored chunk per commit");
    let older = pull_as_raw(&relay, old_dir.path(), &old_token, false, Some(old_cursor)).await?;
    assert_eq!(
        chunks_of(&older),
        vec![1],
        "one bundle, as today's apps read"
    );
    // Heads: none for the app that works them out, the relay's for the one that does not.
    let heads = |msgs: &[Message]| -> Vec<usize> {
        msgs.iter()
            .filter_map(|m| match m {
                Message::Update(u) => Some(u.heads.len()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(heads(&newer), vec![0]);
    assert_eq!(heads(&older), vec![1]);
    // Both payloads hold the same changes.
    let changes = |msgs: &[Message]| -> Vec<automerge::ChangeHash> {
        let mut doc = redline_proto::genesis::genesis(&id);
        for m in msgs {
            if let Message::Update(u) = m
                && let redline_proto::message::Payload::Bundle(b) = &u.payload
            {
                doc.load_incremental(b).expect("loads");
            }
        }
        let mut h = doc
            .get_changes(&[])
            .iter()
            .map(|c| c.hash())
            .collect::<Vec<_>>();
        h.sort();
        h
    };
    assert_eq!(changes(&newer), changes(&older));
    relay.shutdown().await?;
    Ok(())
}
