//! The session driven with a virtual clock.
use super::*;
use crate::access::Scope;
use crate::hub::Committed;
use redline_proto::message::{Payload, Push, Subscription};
use redline_proto::session::hashes_to_wire;
use redline_proto::token::{Claims, Role, TokenId};
use redline_proto::wire::{INLINE_MAX, transfer_id};
use redline_proto::{Day, MemberId};

const EPOCH: u64 = 42;

fn peer(role: Role) -> Peer {
    let device = DeviceId::new("phone-1").unwrap();
    let team = TeamId::new("t1").unwrap();
    let claims = Claims {
        id: TokenId([7; 16]),
        device: device.clone(),
        member: MemberId::new("ana").unwrap(),
        role,
        teams: vec![team.clone()],
        zones: vec![],
        issued: 0,
        expires: u64::MAX,
    };
    let scope = Scope::new(claims);
    let granted = scope.grant(&Subscription {
        teams: vec![team],
        ..Default::default()
    });
    Peer::new(device, scope, granted)
}

fn limits() -> SessionLimits {
    SessionLimits {
        messages_per_second: 10,
        message_burst: 3,
        streams_per_second: 1,
        stream_burst: 1,
    }
}

fn session(now: Instant) -> Session {
    Session::new(
        peer(Role::Volunteer),
        limits(),
        EPOCH,
        5,
        now,
        now + Duration::from_secs(3600),
    )
}

fn actions(s: &mut Session) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

fn day() -> DocId {
    DocId::ledger(
        &TeamId::new("t1").unwrap(),
        &Day::new("2026-12-01").unwrap(),
    )
}

/// A push of one real change to the team's day.
fn push() -> Message {
    let mut doc = automerge::Automerge::new();
    let mut tx = doc.transaction();
    automerge::transaction::Transactable::put(&mut tx, automerge::ROOT, "k", 1).unwrap();
    tx.commit();
    let bundle = doc.bundle(doc.get_heads()).unwrap().bytes().to_vec();
    Message::Push(Push {
        doc: day(),
        bundle,
        heads: hashes_to_wire(&doc.get_heads()),
    })
}

fn pull(cursor: Option<Cursor>) -> Message {
    Message::Pull(Pull {
        cursor,
        resume: vec![],
        defer_large: false,
    })
}

fn sent(actions: &[Action]) -> Vec<&Message> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(m) => Some(m),
            _ => None,
        })
        .collect()
}

#[test]
fn a_pull_waits_for_the_pushes_before_it() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.handle(t0, Input::Message(push()));
    s.handle(t0, Input::Message(pull(None)));
    let a = actions(&mut s);
    assert!(
        matches!(a.as_slice(), [Action::Admit(_)]),
        "no catch-up yet"
    );
    let Action::Admit(work) = a.into_iter().next().unwrap() else {
        unreachable!()
    };
    s.handle(t0, Input::Admitted(work, Verdict::Accept));
    let a = actions(&mut s);
    let Some(Action::Commit(work, author)) = a.into_iter().next() else {
        panic!("accepted pushes are committed")
    };
    assert_eq!(author.device.as_str(), "phone-1");
    s.handle(
        t0,
        Input::Committed {
            doc: work.doc.clone(),
            device_heads: work.device_heads.clone(),
            pushed: work.changes.iter().map(|c| c.hash()).collect(),
            result: Ok(Outcome::Committed(Committed {
                heads: work.device_heads.clone(),
                applied: 1,
                seq: 6,
            })),
        },
    );
    let a = actions(&mut s);
    assert!(matches!(sent(&a)[..], [Message::Ack(_)]));
    assert!(
        matches!(
            a.last(),
            Some(Action::Query(Query::ChangedInScope {
                after: 0,
                upto: 5,
                ..
            }))
        ),
        "the pull is answered once the push is acknowledged"
    );
    // The own change (committed at 6) is kept while windows may still hold it...
    assert_eq!(s.peer().known.own_len(), 1);
    s.handle(t0, Input::Answer(Answer::Changed(vec![])));
    assert_eq!(s.peer().known.own_len(), 1, "delivered up to 5 only");
    actions(&mut s);
    // ...and dropped once the device is delivered past it.
    s.handle(t0, Input::StableMoved(6));
    s.handle_timeout(t0 + LIVE_COALESCE);
    actions(&mut s);
    s.handle(t0, Input::Answer(Answer::Changed(vec![])));
    assert_eq!(s.peer().known.own_len(), 0);
}

#[test]
fn a_catch_up_sends_what_is_lacking_then_caught_and_goes_live() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.handle(t0, Input::Message(pull(None)));
    assert!(matches!(
        actions(&mut s)[..],
        [Action::Query(Query::ChangedInScope { .. })]
    ));
    s.handle(t0, Input::Answer(Answer::Changed(vec![day()])));
    let a = actions(&mut s);
    let [
        Action::Query(Query::Lacks {
            doc,
            have_at: None,
            window: None,
            ..
        }),
    ] = &a[..]
    else {
        panic!("one lookup per document")
    };
    assert_eq!(*doc, day());
    let heads = vec![ChangeHash([3; 32])];
    s.handle(
        t0,
        Input::Answer(Answer::Lacks(vec![(
            Payload::Bundle(vec![1, 2, 3]),
            heads.clone(),
        )])),
    );
    let a = actions(&mut s);
    let m = sent(&a);
    assert!(matches!(m[0], Message::Update(u) if u.doc == day()));
    assert!(matches!(m[1], Message::Caught(c) if c.seq == 5 && c.epoch == EPOCH));
    assert!(matches!(a.last(), Some(Action::Delivered(5))));
    assert_eq!(s.peer().known.get(&day()), heads);
    // Live: the first move of the stable sequence after a quiet window is caught up at
    // once (no wait on an idle relay)...
    s.handle(t0, Input::StableMoved(6));
    assert!(actions(&mut s).is_empty());
    assert_eq!(s.poll_timeout(), Some(t0));
    s.handle_timeout(t0);
    let a = actions(&mut s);
    assert!(matches!(
        a[..],
        [Action::Query(Query::ChangedInScope {
            after: 5,
            upto: 6,
            ..
        })]
    ));
    s.handle(t0, Input::Answer(Answer::Changed(vec![])));
    actions(&mut s);
    // ...and the moves within the window after it together at the window's end.
    let t1 = t0 + LIVE_COALESCE / 4;
    s.handle(t1, Input::StableMoved(7));
    s.handle(t1, Input::StableMoved(8));
    assert!(actions(&mut s).is_empty());
    assert_eq!(s.poll_timeout(), Some(t0 + LIVE_COALESCE));
    s.handle_timeout(t1);
    assert!(actions(&mut s).is_empty(), "not before the window ends");
    s.handle_timeout(t0 + LIVE_COALESCE);
    let a = actions(&mut s);
    assert!(
        matches!(
            a[..],
            [Action::Query(Query::ChangedInScope {
                after: 6,
                upto: 8,
                ..
            })]
        ),
        "both moves in one catch-up, from where the device is"
    );
    // A move after a quiet window: at once again.
    s.handle(t0 + LIVE_COALESCE, Input::Answer(Answer::Changed(vec![])));
    actions(&mut s);
    let t2 = t0 + 3 * LIVE_COALESCE;
    s.handle(t2, Input::StableMoved(9));
    assert_eq!(s.poll_timeout(), Some(t2));
}

#[test]
fn commits_landing_during_a_catch_up_are_caught_up_after_it() {
    // The first catch-up runs up to the stable sequence it started at; a commit landing
    // while it runs must reach the device after it, not wait for the next commit.
    let t0 = Instant::now();
    let mut s = session(t0);
    s.handle(t0, Input::Message(pull(None)));
    actions(&mut s);
    s.handle(t0, Input::StableMoved(6));
    assert!(actions(&mut s).is_empty(), "one catch-up at a time");
    s.handle(t0, Input::Answer(Answer::Changed(vec![])));
    let a = actions(&mut s);
    assert!(matches!(sent(&a)[..], [Message::Caught(c)] if c.seq == 5));
    assert_eq!(s.poll_timeout(), Some(t0), "the commit at 6 is due at once");
    s.handle_timeout(t0);
    assert!(matches!(
        actions(&mut s)[..],
        [Action::Query(Query::ChangedInScope {
            after: 5,
            upto: 6,
            ..
        })]
    ));
    // The same for a live catch-up: a move while it runs is due at its window's end.
    let t1 = t0 + LIVE_COALESCE / 2;
    s.handle(t1, Input::StableMoved(7));
    assert!(actions(&mut s).is_empty());
    s.handle(t1, Input::Answer(Answer::Changed(vec![])));
    actions(&mut s);
    assert_eq!(s.poll_timeout(), Some(t0 + LIVE_COALESCE));
}

/// A device catching up (its last catch-up carried a large piece of its team's day)
/// gets its next live catch-up at the longer window's end, so the day arrives in a few
/// large pieces; once its catch-ups are small again, the short window is back.
#[test]
fn a_device_catching_up_gets_fewer_larger_pieces() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.handle(t0, Input::Message(pull(None)));
    s.handle(t0, Input::Answer(Answer::Changed(vec![])));
    actions(&mut s);
    // A live catch-up at once (quiet before), delivering `bytes` of the day.
    let live = |s: &mut Session, at: Instant, stable: u64, bytes: usize| {
        s.handle(at, Input::StableMoved(stable));
        assert_eq!(s.poll_timeout(), Some(at), "at once after a quiet spell");
        s.handle_timeout(at);
        actions(s);
        s.handle(at, Input::Answer(Answer::Changed(vec![day()])));
        actions(s);
        let piece = Payload::Bundle(vec![7; bytes]);
        s.handle(at, Input::Answer(Answer::Lacks(vec![(piece, vec![])])));
        let a = actions(s);
        assert!(matches!(sent(&a).last(), Some(Message::Caught(c)) if c.seq == stable));
    };
    live(&mut s, t0, 6, CATCHING_UP_BYTES as usize);
    let t1 = t0 + LIVE_COALESCE / 2;
    s.handle(t1, Input::StableMoved(7));
    assert_eq!(
        s.poll_timeout(),
        Some(t0 + CATCHING_UP_COALESCE),
        "a device catching up waits for more"
    );
    // After the long window, a small piece: the short window again.
    let t2 = t0 + 2 * CATCHING_UP_COALESCE;
    s.handle_timeout(t2);
    actions(&mut s);
    s.handle(t2, Input::Answer(Answer::Changed(vec![])));
    actions(&mut s);
    let t3 = t2 + 2 * CATCHING_UP_COALESCE;
    live(&mut s, t3, 8, 100);
    s.handle(t3, Input::StableMoved(9));
    assert_eq!(
        s.poll_timeout(),
        Some(t3 + LIVE_COALESCE),
        "following writes"
    );
}

#[test]
fn a_cursor_the_relay_cannot_honour_means_resync() {
    let t0 = Instant::now();
    let mut s = session(t0);
    let other = Cursor {
        epoch: EPOCH + 1,
        seq: 3,
        subscription: s.peer().subscription.subscription().clone(),
    };
    s.handle(t0, Input::Message(pull(Some(other))));
    assert!(matches!(actions(&mut s)[..], [Action::Query(Query::List)]));
    let elsewhere = DocId::parse("households/z9").unwrap();
    s.handle(t0, Input::Answer(Answer::Listed(vec![day(), elsewhere])));
    let a = actions(&mut s);
    let m = sent(&a);
    assert_eq!(m.len(), 2, "only covered documents: {}", m.len());
    assert!(matches!(m[0], Message::Resync(d) if *d == day()));
    assert!(matches!(m[1], Message::Caught(_)));
}

#[test]
fn large_payloads_go_as_transfers_or_wait_for_the_budget() {
    let t0 = Instant::now();
    let big = vec![0u8; INLINE_MAX + 1];
    for defer in [false, true] {
        let mut s = session(t0);
        let id = transfer_id(&big);
        s.handle(
            t0,
            Input::Message(Message::Pull(Pull {
                cursor: None,
                resume: vec![redline_proto::message::UploadOffset { id, have: 1000 }],
                defer_large: defer,
            })),
        );
        actions(&mut s);
        s.handle(t0, Input::Answer(Answer::Changed(vec![day()])));
        actions(&mut s);
        s.handle(
            t0,
            Input::Answer(Answer::Lacks(vec![(
                Payload::Document(big.clone()),
                vec![],
            )])),
        );
        let a = actions(&mut s);
        if defer {
            assert!(matches!(
                sent(&a)[0],
                Message::Update(Update {
                    payload: Payload::Transfer { document: true, .. },
                    ..
                })
            ));
            assert!(!a.iter().any(|a| matches!(a, Action::Transfer { .. })));
        } else {
            assert!(
                matches!(a[0], Action::Transfer { start: 1000, .. }),
                "resumed"
            );
        }
    }
}

#[test]
fn limits_expiry_and_revocation_close_with_their_codes() {
    let t0 = Instant::now();
    let code_of = |a: &[Action]| {
        a.iter().find_map(|a| match a {
            Action::Close(Error::Refused { code, .. }) => Some(*code),
            _ => None,
        })
    };
    // Three messages of burst, the fourth within the same instant is one too many.
    let mut s = session(t0);
    for _ in 0..3 {
        s.handle(t0, Input::Message(pull(None)));
    }
    assert_eq!(code_of(&actions(&mut s)), None);
    s.handle(t0, Input::Message(pull(None)));
    assert_eq!(code_of(&actions(&mut s)), Some(ErrorCode::RATE_LIMITED));
    assert!(s.is_closed() && s.poll_timeout().is_none());
    // A second later the bucket has refilled.
    let mut s = session(t0);
    for i in 0..10 {
        s.handle(
            t0 + Duration::from_millis(200 * i),
            Input::Message(pull(None)),
        );
    }
    assert!(!s.is_closed());
    // One stream per second.
    let mut s = session(t0);
    s.handle(t0, Input::StreamOpened);
    assert!(matches!(actions(&mut s)[..], [Action::AcceptUpload]));
    s.handle(t0, Input::StreamOpened);
    assert_eq!(code_of(&actions(&mut s)), Some(ErrorCode::RATE_LIMITED));
    // Expiry is a timer; revocation an input.
    let mut s = session(t0);
    let expiry = s.poll_timeout().unwrap();
    s.handle_timeout(expiry);
    assert_eq!(code_of(&actions(&mut s)), Some(ErrorCode::TOKEN_EXPIRED));
    let mut s = session(t0);
    s.handle(t0, Input::Revoked);
    assert_eq!(code_of(&actions(&mut s)), Some(ErrorCode::TOKEN_REVOKED));
}

#[test]
fn requests_outside_the_token_are_refused_without_asking_the_hub() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.handle(
        t0,
        Input::Message(Message::DevicesRequest(TeamId::new("t1").unwrap())),
    );
    let a = actions(&mut s);
    assert!(matches!(sent(&a)[..], [Message::Error(e)] if e.code == ErrorCode::FORBIDDEN));
    let mut lead = Session::new(
        peer(Role::Lead),
        limits(),
        EPOCH,
        5,
        t0,
        t0 + Duration::from_secs(60),
    );
    lead.handle(
        t0,
        Input::Message(Message::DevicesRequest(TeamId::new("t1").unwrap())),
    );
    assert!(matches!(
        actions(&mut lead)[..],
        [Action::Serve(Request::Devices(_))]
    ));
    lead.handle(
        t0,
        Input::Message(Message::QuarantineRequest(TeamId::new("t2").unwrap())),
    );
    let a = actions(&mut lead);
    assert!(matches!(sent(&a)[..], [Message::Error(e)] if e.code == ErrorCode::FORBIDDEN));
    let other = redline_proto::message::SyncStep {
        doc: DocId::parse("households/z9").unwrap(),
        data: None,
    };
    lead.handle(t0, Input::Message(Message::Sync(other)));
    let a = actions(&mut lead);
    assert!(matches!(sent(&a)[..], [Message::Error(e)] if e.code == ErrorCode::FORBIDDEN));
}

/// A device live all day keeps a bounded set of known heads per document: the newest.
#[test]
fn known_heads_keep_the_newest_only() {
    let known = Known::default();
    let hash = |i: u8| ChangeHash([i; 32]);
    for i in 0..40u8 {
        known.add(&day(), &[hash(i)]);
    }
    known.add(&day(), &[hash(39)]);
    let kept = known.get(&day());
    let newest: Vec<ChangeHash> = (40 - KNOWN_HEADS as u8..40).map(hash).collect();
    assert_eq!(kept, newest);
}

/// A device that derives heads gets updates without them; any other device gets the
/// document's heads, as before.
#[test]
fn updates_name_heads_only_for_a_device_that_does_not_derive_them() {
    let t0 = Instant::now();
    let heads = vec![ChangeHash([3; 32]), ChangeHash([4; 32])];
    for derives in [false, true] {
        let mut p = peer(Role::Volunteer);
        p.derives_heads = derives;
        let mut s = Session::new(p, limits(), EPOCH, 5, t0, t0 + Duration::from_secs(3600));
        s.handle(t0, Input::Message(pull(None)));
        actions(&mut s);
        s.handle(t0, Input::Answer(Answer::Changed(vec![day()])));
        actions(&mut s);
        let piece = Payload::Bundle(vec![7; 100]);
        s.handle(
            t0,
            Input::Answer(Answer::Lacks(vec![(piece, heads.clone())])),
        );
        let a = actions(&mut s);
        let Some(Message::Update(u)) = sent(&a).first().cloned() else {
            panic!("an update first");
        };
        let want = if derives {
            Vec::new()
        } else {
            hashes_to_wire(&heads)
        };
        assert_eq!(u.heads, want, "derives heads: {derives}");
    }
}

/// A hub answer of several updates for one document (a save, then the rest of the
/// window) goes out as updates in that order, each naming its heads, before `Caught`.
#[test]
fn an_answer_of_several_updates_goes_out_in_order() {
    let t0 = Instant::now();
    let mut s = Session::new(
        peer(Role::Volunteer),
        limits(),
        EPOCH,
        5,
        t0,
        t0 + Duration::from_secs(3600),
    );
    s.handle(t0, Input::Message(pull(None)));
    actions(&mut s);
    s.handle(t0, Input::Answer(Answer::Changed(vec![day()])));
    actions(&mut s);
    let (saved_at, end) = (vec![ChangeHash([1; 32])], vec![ChangeHash([2; 32])]);
    s.handle(
        t0,
        Input::Answer(Answer::Lacks(vec![
            (Payload::Document(vec![1; 100]), saved_at.clone()),
            (Payload::Bundle(vec![2; 50]), end.clone()),
        ])),
    );
    let a = actions(&mut s);
    let got: Vec<_> = sent(&a)
        .iter()
        .filter_map(|m| match m {
            Message::Update(u) => {
                Some((matches!(u.payload, Payload::Document(_)), u.heads.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        got,
        [
            (true, hashes_to_wire(&saved_at)),
            (false, hashes_to_wire(&end))
        ]
    );
    assert!(
        matches!(sent(&a).last(), Some(Message::Caught(_))),
        "then the cursor"
    );
}
