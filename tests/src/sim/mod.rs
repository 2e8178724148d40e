//! A deterministic simulation of a relay and many phones in one thread.
//!
//! The relay is the real one without its QUIC plumbing ([`Loopback`]: the same session
//! state machine, admission, authorship, hub and commit path) over in-memory storage
//! that keeps only what a flush covered when it crashes. The phones ([`phone`]) write
//! the field's operations into real Automerge documents and run the client core's own
//! device session (`DeviceSession`: the same pushes, update merging, fallback, store
//! steps and cursor rule as a phone over QUIC) over a store that keeps only what it
//! flushed when the phone crashes. A forger ([`Forger`]) crafts its own pushes (others'
//! names, actors and tallies; its own changes misnumbered so that no save of the
//! document would load). Between them, a seeded network: every message is framed and decoded as
//! on the wire, delayed (10% loss costs a retransmission timeout), kept in order within a
//! connection as QUIC streams are, duplicated now and then at the application level,
//! and cut; phones go out of signal and come back; the relay crashes and restarts at
//! seeded points. Time is virtual: a day of field work runs in seconds.
//!
//! At the end (every phone back in signal, nothing in flight) the world checks:
//! every acknowledged change is on the relay, every phone holds exactly the relay's
//! copy of its documents, tallies and task statuses equal what the phones wrote, no
//! forged change was ever stored, no honest phone was refused, cursors never moved back.
//! A failing seed is printed with the command that replays it.

pub mod phone;
mod uploads;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use automerge::{ActorId, ChangeHash, ReadDoc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redline_client::device_session::{Action, DeviceSession, INLINE_MAX, Start, UploadSender};
use redline_proto::codec::{self, HEADER_LEN};
use redline_proto::message::{Hello, Message, Payload, Update};
use redline_proto::token::Role;
use redline_proto::{DeviceId, DocId, MemberId, TeamId};
use redline_server::auth::{Authority, TokenRequest};
use redline_server::loopback::{Link, Loopback, Out, UploadLink, UploadOut};
use redline_server::session::Input;
use redline_server::storage::MemoryStorage;
use redline_server::{Error as RelayError, RelayConfig};
use sha2::Digest;

use crate::faults::FaultyStorage;
use phone::Phone;

/// The size and weather of one simulated day.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Honest phones.
    pub phones: usize,
    /// Phones per team (one ledger per team).
    pub team_size: usize,
    /// Operations each phone writes.
    pub ops: u32,
    /// Virtual length of the working day, in seconds (writes spread over it).
    pub day_secs: u64,
    /// Probability that a message needs a retransmission (each costs a timeout).
    pub loss: f64,
    /// Probability that a message's connection is cut as it is sent.
    pub cut: f64,
    /// Probability that a phone sends a push twice.
    pub duplicate: f64,
    /// Relay crashes during the day.
    pub relay_crashes: u32,
    /// Phone crashes during the day.
    pub phone_crashes: u32,
    /// Share of phones that speak protocol version 1 (apps months old).
    pub old_phones: f64,
    /// Photos attached to tasks during the day: each push passes the inline limit and
    /// goes up on an upload stream (resumed after cuts and crashes).
    pub photos: u32,
    /// A hostile token holder forging changes.
    pub hostile: bool,
    /// A bug to inject, to prove the checks catch it.
    pub bug: Option<Bug>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            phones: 200,
            team_size: 16,
            ops: 300,
            day_secs: 600,
            loss: 0.10,
            cut: 0.002,
            duplicate: 0.01,
            relay_crashes: 5,
            phone_crashes: 10,
            old_phones: 0.25,
            photos: 2,
            hostile: true,
            bug: None,
        }
    }
}

/// A deliberately injected bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// The relay's storage reports flushes it did not do: acks before durability.
    AckBeforeFlush,
    /// The phone's store writes the cursor but not the updates it applied: after a
    /// crash the phone lacks changes its cursor says it holds.
    CursorWithoutData,
}

impl Bug {
    /// The `sim --bug` name.
    pub fn name(self) -> &'static str {
        match self {
            Bug::AckBeforeFlush => "ack-before-flush",
            Bug::CursorWithoutData => "cursor-without-data",
        }
    }

    /// The bug called `name`, if there is one.
    pub fn named(name: &str) -> Option<Self> {
        [Bug::AckBeforeFlush, Bug::CursorWithoutData]
            .into_iter()
            .find(|b| b.name() == name)
    }
}

/// What one seed did.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    /// Virtual seconds until quiescent.
    pub virtual_secs: f64,
    pub messages: u64,
    pub changes_written: u64,
    pub changes_acked: u64,
    pub relay_crashes: u32,
    pub cuts: u64,
    pub forged_refused: u64,
    pub updates_applied: u64,
    /// Automerge-sync fallbacks the relay asked for.
    pub resyncs: u64,
    /// Upload streams the phones opened (a photo's push, or its resumption).
    pub uploads: u64,
    /// Photos whose upload the relay acknowledged.
    pub photos_acked: u64,
    /// A digest of the run (final heads and counts): equal for a replay of the seed.
    pub digest: String,
}

/// A seed whose run broke an invariant.
#[derive(Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub what: Vec<String>,
    /// The `sim` arguments that replay this run.
    pub replay: String,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {} failed:", self.seed)?;
        for w in self.what.iter().take(20) {
            writeln!(f, "  - {w}")?;
        }
        if self.what.len() > 20 {
            writeln!(f, "  ... and {} more", self.what.len() - 20)?;
        }
        write!(
            f,
            "replay: cargo run --release -p redline-tests --bin sim -- --seed {} {}",
            self.seed, self.replay
        )
    }
}

impl SimConfig {
    /// The `sim` flags that give this configuration.
    pub fn args(&self) -> String {
        let mut a = format!(
            "--phones {} --team-size {} --ops {} --day-secs {} --loss {} --cut {} --relay-crashes {} --phone-crashes {} --old-phones {} --photos {}",
            self.phones,
            self.team_size,
            self.ops,
            self.day_secs,
            self.loss,
            self.cut,
            self.relay_crashes,
            self.phone_crashes,
            self.old_phones,
            self.photos
        );
        if let Some(bug) = self.bug {
            a.push_str(" --bug ");
            a.push_str(bug.name());
        }
        a
    }
}

/// Runs one seed to quiescence and checks the invariants. A panic inside the world (a
/// broken assumption of the simulation or of the code it runs) is that seed's failure.
pub fn run(seed: u64, config: &SimConfig) -> Result<SimReport, SimFailure> {
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_world(seed, config)))
        .unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "a panic".into());
            Err(SimFailure {
                seed,
                what: vec![format!("the world panicked: {why}")],
                replay: String::new(),
            })
        });
    ran.map_err(|mut f| {
        f.replay = config.args();
        f
    })
}

fn run_world(seed: u64, config: &SimConfig) -> Result<SimReport, SimFailure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let mut world = World::new(seed, config.clone()).map_err(|e| SimFailure {
            seed,
            what: vec![format!("could not set the world up: {e}")],
            replay: String::new(),
        })?;
        world.run().await;
        world.check().await
    })
}

/// Something that happens at a virtual time.
enum Event {
    Write(usize),
    /// A phone attaches a photo to a new task.
    Photo(usize),
    Online(usize),
    Offline(usize),
    Connect(usize),
    CrashPhone(usize),
    /// A phone's session deadline (its hello unanswered) on a connection.
    PhoneTimer(usize, u64),
    Forge,
    ToRelay {
        conn: u64,
        frame: Vec<u8>,
    },
    ToPhone {
        conn: u64,
        out: Delivery,
    },
    /// A phone's message on one of its upload streams.
    UploadToRelay {
        conn: u64,
        stream: u64,
        frame: Vec<u8>,
    },
    /// The relay's answer on an upload stream.
    UploadToPhone {
        conn: u64,
        stream: u64,
        out: UploadOut,
    },
    /// The relay notices a connection the device lost.
    Lost(u64),
    CrashRelay,
    RestartRelay,
    Tick,
}

/// What reaches a phone.
enum Delivery {
    Frame(Vec<u8>),
    Transfer(Vec<u8>, Update),
    Closed,
}

struct Scheduled {
    at: Duration,
    order: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.order) == (o.at, o.order)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(o.at, o.order))
    }
}

/// One connection between a phone and the relay.
struct Conn {
    phone: usize,
    link: Option<Link>,
    /// The relay's side of the upload streams the phone opened on it.
    uploads: BTreeMap<u64, UploadLink>,
    /// The relay ended it (or crashed).
    relay_done: bool,
    /// When the last message each way arrives (QUIC streams keep order).
    to_relay_at: Duration,
    to_phone_at: Duration,
}

struct World {
    /// Phone whose messages are printed (`REDLINE_SIM_TRACE`), to debug a seed.
    trace: Option<usize>,
    seed: u64,
    config: SimConfig,
    rng: StdRng,
    base: Instant,
    unix0: u64,
    now: Duration,
    order: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    memory: Arc<MemoryStorage>,
    lying: Arc<AtomicBool>,
    relay_config: RelayConfig,
    key_dir: tempfile::TempDir,
    relay: Option<Loopback>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    phones: Vec<Phone>,
    ledger: DocId,
    team_ledgers: Vec<DocId>,
    tick_at: Option<Duration>,
    last_stable: u64,
    /// The hostile phone's forged changes (none may ever be stored).
    forged: Vec<ChangeHash>,
    hostile: Option<Forger>,
    /// The phones' side of their upload streams: stream → (phone, connection, sender).
    uploads: BTreeMap<u64, (usize, u64, UploadSender)>,
    next_stream: u64,
    problems: Vec<String>,
    report: SimReport,
}

impl World {
    fn new(seed: u64, config: SimConfig) -> Result<Self, RelayError> {
        let key_dir = tempfile::tempdir().map_err(|e| RelayError::Storage(e.to_string()))?;
        let mut relay_config = RelayConfig::new(key_dir.path());
        // Phones of one carrier share addresses; the simulation does not model the door.
        relay_config.limits.messages_per_second = 10_000;
        relay_config.limits.message_burst = 10_000;
        // A fixed day and fixed change times: a seed's changes hash the same on every run.
        relay_config.quotas.ledger_days_back = 100_000;
        relay_config.quotas.ledger_days_ahead = 100_000;
        let memory = Arc::new(MemoryStorage::new(seed.wrapping_mul(0x9e37_79b9) | 1));
        let unix0 = redline_server::auth::now_secs();
        let today = redline_proto::Day::new("2026-01-01").expect("a day");
        let teams = config.phones.div_ceil(config.team_size.max(1)).max(1);
        let team_ledgers: Vec<DocId> = (0..teams)
            .map(|t| DocId::ledger(&TeamId::new(format!("team-{t}")).expect("id"), &today))
            .collect();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut phones = Vec::new();
        for i in 0..config.phones {
            let team = i % teams;
            let version = if rng.random_bool(config.old_phones.clamp(0.0, 1.0)) {
                1
            } else {
                redline_proto::PROTOCOL_VERSION
            };
            phones.push(new_phone(
                key_dir.path(),
                i,
                &format!("m{i}"),
                team,
                version,
                config.ops,
                &mut rng,
            )?);
        }
        if config.bug == Some(Bug::CursorWithoutData) {
            for p in &mut phones {
                p.store.loses_updates = true;
            }
        }
        let hostile = if config.hostile {
            let p = new_phone(
                key_dir.path(),
                config.phones,
                "mallory",
                0,
                redline_proto::PROTOCOL_VERSION,
                0,
                &mut rng,
            )?;
            Some(Forger {
                hello: p.hello(),
                member: p.member,
                device: p.device,
                actor: p.actor,
                conn: None,
                welcomed: false,
            })
        } else {
            None
        };
        let mut world = Self {
            trace: std::env::var("REDLINE_SIM_TRACE")
                .ok()
                .and_then(|v| v.parse().ok()),
            seed,
            rng,
            base: Instant::now(),
            unix0,
            now: Duration::ZERO,
            order: 0,
            queue: BinaryHeap::new(),
            memory,
            lying: Arc::new(AtomicBool::new(config.bug == Some(Bug::AckBeforeFlush))),
            relay_config,
            key_dir,
            relay: None,
            conns: BTreeMap::new(),
            next_conn: 1,
            phones,
            ledger: team_ledgers[0].clone(),
            team_ledgers,
            tick_at: None,
            last_stable: 0,
            forged: Vec::new(),
            hostile,
            uploads: BTreeMap::new(),
            next_stream: 0,
            problems: Vec::new(),
            report: SimReport {
                seed,
                ..Default::default()
            },
            config,
        };
        world.start_relay()?;
        world.plan_day();
        Ok(world)
    }

    fn start_relay(&mut self) -> Result<(), RelayError> {
        let storage = FaultyStorage::over(
            self.memory.clone(),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        )
        .with_lying_flush(self.lying.clone());
        let authority = Authority::open(
            self.key_dir.path(),
            &self.key_dir.path().join("revoked.txt"),
        )?;
        self.relay = Some(Loopback::new(
            Arc::new(storage),
            self.relay_config.clone(),
            authority,
        )?);
        self.last_stable = self.relay.as_ref().map_or(0, Loopback::stable);
        Ok(())
    }

    /// The day's schedule: each phone's writes and its hours in and out of signal,
    /// relay and phone crashes, the forger's attempts.
    fn plan_day(&mut self) {
        let day = Duration::from_secs(self.config.day_secs);
        for i in 0..self.phones.len() {
            let first = self.jitter(day / 20);
            self.at(first, Event::Write(i));
            if self.rng.random_bool(0.5) {
                let soon = self.jitter(Duration::from_secs(5));
                self.at(soon, Event::Online(i));
            } else {
                let back = self.jitter(day / 3);
                self.at(back, Event::Online(i));
            }
        }
        for _ in 0..self.config.relay_crashes {
            let t = self.jitter(day);
            self.at(t, Event::CrashRelay);
        }
        for _ in 0..self.config.phone_crashes {
            let t = self.jitter(day);
            let i = self.rng.random_range(0..self.phones.len().max(1));
            if !self.phones.is_empty() {
                self.at(t, Event::CrashPhone(i));
            }
        }
        for _ in 0..self.config.photos {
            let t = self.jitter(day);
            if !self.phones.is_empty() {
                let i = self.rng.random_range(0..self.phones.len());
                self.at(t, Event::Photo(i));
            }
        }
        if self.hostile.is_some() {
            let soon = self.jitter(Duration::from_secs(2));
            self.at(soon, Event::Connect(usize::MAX));
            for _ in 0..6 {
                let t = self.jitter(day);
                self.at(t, Event::Forge);
            }
        }
    }

    fn jitter(&mut self, upto: Duration) -> Duration {
        let ms = upto.as_millis().max(1) as u64;
        Duration::from_millis(self.rng.random_range(0..ms))
    }

    fn at(&mut self, delay: Duration, event: Event) {
        self.order += 1;
        self.queue.push(Reverse(Scheduled {
            at: self.now + delay,
            order: self.order,
            event,
        }));
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    /// The time a change records (milliseconds; from a fixed date, not the wall clock).
    fn change_time(&self) -> i64 {
        const DAY_START_MS: i64 = 1_767_225_600_000; // 2026-01-01
        DAY_START_MS + self.now.as_millis() as i64
    }

    fn unix_now(&self) -> u64 {
        self.unix0 + self.now.as_secs()
    }

    async fn run(&mut self) {
        let limit = Duration::from_secs(self.config.day_secs * 4 + 3_600);
        while let Some(Reverse(next)) = self.queue.pop() {
            if next.at > limit {
                self.problems.push(format!(
                    "not quiescent after {} virtual seconds",
                    limit.as_secs()
                ));
                break;
            }
            self.now = next.at;
            self.handle(next.event).await;
        }
        self.report.virtual_secs = self.now.as_secs_f64();
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Write(i) => self.write(i),
            Event::Photo(i) => self.photo(i),
            Event::Online(i) => {
                self.phones[i].online = true;
                self.connect(i);
                // Out of signal again later, unless the day is over.
                let day = Duration::from_secs(self.config.day_secs);
                if self.now < day {
                    let stay = self.jitter(day / 4) + Duration::from_secs(5);
                    self.at(stay, Event::Offline(i));
                }
            }
            Event::Offline(i) => {
                let day = Duration::from_secs(self.config.day_secs);
                if self.now >= day {
                    return;
                }
                self.phones[i].online = false;
                self.cut_phone(i, false);
                let away = self.jitter(day / 6) + Duration::from_secs(1);
                self.at(away, Event::Online(i));
            }
            Event::Connect(i) => self.connect(i),
            Event::CrashPhone(i) => {
                self.cut_phone(i, true);
                if let Err(e) = self.phones[i].crash() {
                    self.problems.push(e);
                }
                let back = Duration::from_millis(500);
                self.at(back, Event::Connect(i));
            }
            Event::PhoneTimer(i, conn) => self.phone_timer(i, conn),
            Event::Forge => self.forge(),
            Event::ToRelay { conn, frame } => self.relay_reads(conn, frame).await,
            Event::ToPhone { conn, out } => self.phone_reads(conn, out),
            Event::UploadToRelay {
                conn,
                stream,
                frame,
            } => self.relay_reads_upload(conn, stream, frame).await,
            Event::UploadToPhone { conn, stream, out } => {
                self.phone_reads_upload(conn, stream, out);
            }
            Event::Lost(conn) => self.lost(conn).await,
            Event::CrashRelay => self.crash_relay(),
            Event::RestartRelay => {
                if let Err(e) = self.start_relay() {
                    self.problems
                        .push(format!("the relay did not restart: {e}"));
                }
            }
            Event::Tick => self.tick().await,
        }
    }

    fn write(&mut self, i: usize) {
        if self.phones[i].ops_left == 0 {
            return;
        }
        let ledger = self.team_ledgers[i % self.team_ledgers.len()].clone();
        if !self.phones[i].sees_own_writes(&ledger) {
            // Reopened after a crash with its last write built on updates it had merged
            // but not yet stored: the write waits in the store until the next sync
            // brings them again. Its user waits for the app to show it.
            self.at(Duration::from_secs(1), Event::Write(i));
            return;
        }
        let roll = self.rng.random_range(0..100);
        let amount = self.rng.random_range(1..6);
        let ms = self.change_time();
        let phone = &mut self.phones[i];
        phone.ops_left -= 1;
        phone.write(&ledger, roll, amount, ms);
        self.report.changes_written += 1;
        // Live: the session pushes what was just written; offline, it waits for the next
        // first flight.
        self.local_change(i);
        let day = self.config.day_secs as f64 * 1000.0;
        let mean = day / f64::from(self.config.ops.max(1));
        let gap = self.rng.random_range(0.2 * mean..1.8 * mean) as u64;
        self.at(Duration::from_millis(gap.max(1)), Event::Write(i));
    }

    /// Phone `i` attaches a photo (incompressible bytes past the inline limit) to a new
    /// task: its push goes up on an upload stream.
    fn photo(&mut self, i: usize) {
        let ledger = self.team_ledgers[i % self.team_ledgers.len()].clone();
        if !self.phones[i].sees_own_writes(&ledger) {
            self.at(Duration::from_secs(1), Event::Photo(i));
            return;
        }
        let mut photo = vec![0u8; INLINE_MAX + 64 * 1024];
        self.rng.fill(&mut photo[..]);
        let ms = self.change_time();
        self.phones[i].attach(&ledger, photo, ms);
        self.report.changes_written += 1;
        self.local_change(i);
    }

    /// A write waits for a live session, as the client's notification does.
    fn local_change(&mut self, i: usize) {
        let phone = &mut self.phones[i];
        let Some(session) = phone.session.as_mut() else {
            return;
        };
        if !(phone.wrote && session.is_live()) {
            return;
        }
        phone.wrote = false;
        let result = session.handle_local_change(&mut phone.store);
        self.after_session_input(i, result);
    }

    /// A phone in signal opens a connection and says hello (its session's first flight).
    fn connect(&mut self, i: usize) {
        if i == usize::MAX {
            return self.forger_connects();
        }
        if !self.phones[i].online || self.phones[i].conn.is_some() {
            return;
        }
        if self.relay.is_none() {
            let retry = self.jitter(Duration::from_secs(2)) + Duration::from_millis(500);
            self.at(retry, Event::Connect(i));
            return;
        }
        let conn = self.open_conn(i);
        let now = self.instant();
        let now_ms = self.now.as_millis() as u64;
        let phone = &mut self.phones[i];
        phone.conn = Some(conn);
        phone.attempt = now_ms.max(phone.attempt + 1);
        let start = Start {
            hello: phone.hello(),
            cursor: phone.store.cursor.clone(),
            cursor_key: "relay".into(),
            resume: Vec::new(),
            defer_large: None,
            live: true,
            attempt: phone.attempt,
            now,
            rtt: Duration::from_millis(50),
        };
        match DeviceSession::start(start, &mut phone.store) {
            Ok(session) => {
                phone.session = Some(session);
                self.drive(i);
            }
            Err(e) => {
                let what = format!("{} could not start a session: {e}", phone.device);
                self.problems.push(what);
            }
        }
    }

    fn open_conn(&mut self, i: usize) -> u64 {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            conn,
            Conn {
                phone: i,
                link: None,
                uploads: BTreeMap::new(),
                relay_done: false,
                to_relay_at: self.now,
                to_phone_at: self.now,
            },
        );
        conn
    }

    /// After the phone's session took an input: an error ends the session (the phone
    /// reconnects, as the client's sync loop does); otherwise it acts.
    fn after_session_input(&mut self, i: usize, result: Result<(), redline_client::Error>) {
        match result {
            Ok(()) => self.drive(i),
            Err(e) => {
                let phone = &mut self.phones[i];
                let unanswered = phone.session.as_ref().is_some_and(|s| s.unanswered());
                if !unanswered {
                    let what = format!("{}'s session failed: {e}", phone.device);
                    self.problems.push(what);
                }
                self.cut_phone(i, false);
            }
        }
    }

    /// Performs what phone `i`'s session asks for, and keeps its deadline.
    fn drive(&mut self, i: usize) {
        let Some(conn) = self.phones[i].conn else {
            return;
        };
        loop {
            let Some(session) = self.phones[i].session.as_mut() else {
                return;
            };
            let Some(action) = session.poll_action() else {
                break;
            };
            match action {
                Action::Send(frame) => self.send_frame(i, conn, frame),
                Action::Upload(sender) => self.open_upload(i, conn, sender),
                // A live session goes on: writes made meanwhile go out now.
                Action::FirstFlight => {}
                Action::Done => {
                    self.problems.push("a live session ended by itself".into());
                }
            }
            // Sending may cut the connection.
            if self.phones[i].conn != Some(conn) {
                return;
            }
        }
        if self.phones[i].wrote
            && self.phones[i]
                .session
                .as_ref()
                .is_some_and(DeviceSession::is_live)
        {
            return self.local_change(i);
        }
        if let Some(due) = self.phones[i]
            .session
            .as_ref()
            .and_then(DeviceSession::poll_timeout)
        {
            let after = due.saturating_duration_since(self.instant());
            self.at(after, Event::PhoneTimer(i, conn));
        }
    }

    /// A phone's session deadline passed: a hello still unanswered ends the session.
    fn phone_timer(&mut self, i: usize, conn: u64) {
        let now = self.instant();
        let phone = &mut self.phones[i];
        if phone.conn != Some(conn) {
            return;
        }
        let Some(session) = phone.session.as_mut() else {
            return;
        };
        if session.poll_timeout().is_some_and(|t| t <= now) {
            let result = session.handle_timeout(now);
            self.after_session_input(i, result);
        }
    }

    /// Sends a frame of phone `i`'s session; now and then a push goes twice.
    fn send_frame(&mut self, i: usize, conn: u64, frame: Vec<u8>) {
        let push = matches!(
            codec::decode_payload(&frame[HEADER_LEN..]),
            Ok(Message::Push(_))
        );
        if push && self.rng.random_bool(self.config.duplicate) {
            self.send_to_relay(conn, frame.clone());
            if self.phones[i].conn != Some(conn) {
                return;
            }
        }
        self.send_to_relay(conn, frame);
    }

    /// The forger connects and says hello.
    fn forger_connects(&mut self) {
        if self.hostile.as_ref().is_none_or(|h| h.conn.is_some()) {
            return;
        }
        if self.relay.is_none() {
            let retry = self.jitter(Duration::from_secs(2)) + Duration::from_millis(500);
            self.at(retry, Event::Connect(usize::MAX));
            return;
        }
        let conn = self.open_conn(usize::MAX);
        let h = self.hostile.as_mut().expect("checked");
        h.conn = Some(conn);
        h.welcomed = false;
        let hello = Message::Hello(h.hello.clone());
        match codec::encode_frame_with(
            &hello,
            &codec::Extensions::new(),
            redline_proto::PROTOCOL_VERSION,
            codec::DEFAULT_MAX_FRAME,
        ) {
            Ok(f) => self.send_to_relay(conn, f),
            Err(e) => self
                .problems
                .push(format!("the forger could not frame: {e}")),
        }
    }

    /// A phone loses its connection (out of signal, cut, crashed); the relay notices
    /// later. The session ends as a failed one (it stores what it applied), unless the
    /// phone `crashed` (then nothing more is stored).
    fn cut_phone(&mut self, i: usize, crashed: bool) {
        let conn = if i == usize::MAX {
            self.hostile.as_mut().and_then(|h| {
                h.welcomed = false;
                h.conn.take()
            })
        } else {
            let phone = &mut self.phones[i];
            let conn = phone.conn;
            if crashed {
                phone.conn = None;
                phone.session = None;
            } else if let Err(e) = phone.disconnected() {
                self.problems.push(e);
            }
            conn
        };
        let Some(conn) = conn else {
            return;
        };
        self.report.cuts += 1;
        if let Some(c) = self.conns.get_mut(&conn) {
            let noticed = c.to_relay_at.max(self.now) + Duration::from_secs(3);
            let after = noticed - self.now;
            self.at(after, Event::Lost(conn));
        }
        // In signal, it opens a new connection after a moment.
        let back = self.jitter(Duration::from_secs(2)) + Duration::from_millis(200);
        self.at(back, Event::Connect(i));
    }

    /// One way's delay: latency, plus a retransmission timeout per loss.
    fn delay(&mut self) -> Duration {
        let mut d = Duration::from_millis(self.rng.random_range(5..40));
        let mut rto = Duration::from_millis(200);
        while self.rng.random_bool(self.config.loss) {
            d += rto;
            rto = (rto * 2).min(Duration::from_secs(4));
        }
        d
    }

    fn traced(&self, conn: u64) -> bool {
        self.trace.is_some() && self.conns.get(&conn).map(|c| c.phone) == self.trace
    }

    fn send_to_relay(&mut self, conn: u64, frame: Vec<u8>) {
        if self.traced(conn) {
            let kind = codec::decode_payload(&frame[HEADER_LEN..]).map(|m| m.kind());
            println!("{:?} phone -> relay on {conn}: {kind:?}", self.now);
        }
        self.schedule_to_relay(conn, Event::ToRelay { conn, frame });
    }

    fn send_to_phone(&mut self, conn: u64, out: Delivery) {
        self.schedule_to_phone(conn, Event::ToPhone { conn, out });
    }

    /// Schedules `event`, a message on `conn` towards the relay, after the network's
    /// delay and in the connection's order; sending it may cut the connection.
    fn schedule_to_relay(&mut self, conn: u64, event: Event) {
        self.report.messages += 1;
        let delay = self.delay();
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let at = (self.now + delay).max(c.to_relay_at);
        c.to_relay_at = at;
        let phone = c.phone;
        self.push_event(at, event);
        if self.rng.random_bool(self.config.cut) {
            self.cut_phone(phone, false);
        }
    }

    /// Schedules `event`, a message on `conn` towards its phone, after the network's
    /// delay and in the connection's order.
    fn schedule_to_phone(&mut self, conn: u64, event: Event) {
        self.report.messages += 1;
        let delay = self.delay();
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let at = (self.now + delay).max(c.to_phone_at);
        c.to_phone_at = at;
        self.push_event(at, event);
    }

    fn push_event(&mut self, at: Duration, event: Event) {
        self.order += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            order: self.order,
            event,
        }));
    }

    async fn relay_reads(&mut self, conn: u64, frame: Vec<u8>) {
        if self.traced(conn) {
            let kind = codec::decode_payload(&frame[HEADER_LEN..]).map(|m| m.kind());
            let state = self
                .conns
                .get(&conn)
                .map(|c| (c.link.is_some(), c.relay_done));
            println!(
                "{:?} relay reads on {conn} {kind:?}; link, done: {state:?}; relay up: {}",
                self.now,
                self.relay.is_some()
            );
        }
        let (now, unix) = (self.instant(), self.unix_now());
        let Some(relay) = self.relay.as_ref() else {
            return;
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.relay_done {
            return;
        }
        let (msg, ext) = match codec::decode_with_extensions(&frame[HEADER_LEN..]) {
            Ok(m) => m,
            Err(e) => return self.problems.push(format!("the relay could not read: {e}")),
        };
        let outs = match (&mut c.link, msg) {
            // Connections are numbered as the phones open them: the QUIC relay counts
            // first packets, which come in that order (a phone opens its next connection
            // once the last one's handshake finished or failed).
            (None, Message::Hello(hello)) => match relay.connect(hello, &ext, now, unix, conn) {
                Ok((link, welcome)) => {
                    c.link = Some(link);
                    self.send_to_phone(conn, Delivery::Frame(welcome));
                    return;
                }
                Err(refusal) => vec![
                    Out::Message(Message::Error(refusal)),
                    Out::Closed(Err(RelayError::connection_lost("refused"))),
                ],
            },
            (None, other) => {
                let kind = other.kind();
                return self.problems.push(format!("{kind} before hello"));
            }
            (Some(link), msg) => relay.handle(link, now, Input::Message(msg)).await,
        };
        self.deliver(conn, outs);
        self.after_relay_step();
    }

    /// Sends the relay's reactions on `conn` to its phone.
    fn deliver(&mut self, conn: u64, outs: Vec<Out>) {
        for out in outs {
            match out {
                Out::Message(m) => match codec::encode_frame(&m, codec::DEFAULT_MAX_FRAME) {
                    Ok(f) => self.send_to_phone(conn, Delivery::Frame(f)),
                    Err(e) => self
                        .problems
                        .push(format!("the relay could not frame: {e}")),
                },
                Out::Transfer {
                    bytes,
                    start,
                    update,
                } => {
                    if start != 0 {
                        self.problems
                            .push("a transfer resumed that no phone started".into());
                    }
                    self.send_to_phone(conn, Delivery::Transfer(bytes, update));
                }
                Out::Closed(_) => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.relay_done = true;
                        c.link = None;
                    }
                    self.send_to_phone(conn, Delivery::Closed);
                }
            }
        }
    }

    /// After the relay did something: if its feed moved, live connections catch up.
    fn after_relay_step(&mut self) {
        let stable = self.relay.as_ref().map_or(0, Loopback::stable);
        if stable != self.last_stable {
            self.last_stable = stable;
            self.schedule_tick(Duration::from_millis(1));
        }
    }

    fn schedule_tick(&mut self, after: Duration) {
        let at = self.now + after;
        if self.tick_at.is_some_and(|t| t <= at && t >= self.now) {
            return;
        }
        self.tick_at = Some(at);
        self.at(after, Event::Tick);
    }

    async fn tick(&mut self) {
        if self.tick_at != Some(self.now) {
            return;
        }
        self.tick_at = None;
        let now = self.instant();
        let Some(relay) = self.relay.as_ref() else {
            return;
        };
        let mut all = Vec::new();
        let mut next: Option<Instant> = None;
        for (id, c) in self.conns.iter_mut() {
            if let Some(link) = c.link.as_mut() {
                let outs = relay.tick(link, now).await;
                if !outs.is_empty() {
                    all.push((*id, outs));
                }
                if let Some(t) = relay.poll_timeout(link) {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
            }
        }
        for (id, outs) in all {
            self.deliver(id, outs);
        }
        self.after_relay_step();
        if let Some(t) = next {
            let after = t.saturating_duration_since(now);
            if after < Duration::from_secs(60) {
                self.schedule_tick(after.max(Duration::from_millis(1)));
            }
        }
    }

    async fn lost(&mut self, conn: u64) {
        let now = self.instant();
        let Some(mut c) = self.conns.remove(&conn) else {
            return;
        };
        if let (Some(relay), Some(link)) = (self.relay.as_ref(), c.link.as_mut()) {
            let lost = RelayError::connection_lost("the device went away");
            let _ = relay.handle(link, now, Input::StreamFailed(lost)).await;
        }
    }

    fn crash_relay(&mut self) {
        if self.relay.is_none() {
            // Down already: this crash comes a little later, once it is back.
            self.at(Duration::from_secs(5), Event::CrashRelay);
            return;
        }
        self.relay = None;
        self.memory.crash();
        self.report.relay_crashes += 1;
        let conns: Vec<(u64, usize)> = self.conns.iter().map(|(id, c)| (*id, c.phone)).collect();
        self.conns.clear();
        for (conn, i) in conns {
            let gone = if i == usize::MAX {
                self.hostile.as_mut().is_some_and(|h| {
                    let gone = h.conn == Some(conn);
                    if gone {
                        h.conn = None;
                    }
                    gone
                })
            } else if self.phones[i].conn == Some(conn) {
                if let Err(e) = self.phones[i].disconnected() {
                    self.problems.push(e);
                }
                true
            } else {
                false
            };
            if gone {
                let back = self.jitter(Duration::from_secs(3)) + Duration::from_secs(1);
                self.at(back, Event::Connect(i));
            }
        }
        let down = self.jitter(Duration::from_secs(3)) + Duration::from_millis(500);
        self.at(down, Event::RestartRelay);
    }

    fn phone_reads(&mut self, conn: u64, out: Delivery) {
        if self.traced(conn) {
            let what: String = match &out {
                Delivery::Frame(f) => codec::decode_payload(&f[HEADER_LEN..])
                    .map(|m| format!("{m:?}").chars().take(120).collect())
                    .unwrap_or_default(),
                Delivery::Transfer(..) => "transfer".into(),
                Delivery::Closed => "closed".into(),
            };
            println!("{:?} relay -> phone on {conn}: {what}", self.now);
        }
        let Some(i) = self.conns.get(&conn).map(|c| c.phone) else {
            return;
        };
        if i == usize::MAX {
            return self.forger_reads(conn, out);
        }
        if self.phones[i].conn != Some(conn) {
            return; // the phone moved on from this connection
        }
        match out {
            Delivery::Closed => {
                // The control stream ended: the session fails, the phone reconnects.
                self.conns.remove(&conn);
                let lost = redline_client::Error::transport("control stream ended");
                let result = match self.phones[i].session.as_mut() {
                    Some(s) => Err(s.handle_lost(lost)),
                    None => Ok(()),
                };
                if let Err(e) = self.phones[i].disconnected() {
                    self.problems.push(e);
                }
                let _ = result;
                let back = self.jitter(Duration::from_secs(2)) + Duration::from_millis(500);
                self.at(back, Event::Connect(i));
            }
            Delivery::Transfer(bytes, update) => {
                self.report.updates_applied += 1;
                let Payload::Transfer { id, .. } = update.payload else {
                    return self
                        .problems
                        .push("a transfer came with an update of another kind".into());
                };
                let phone = &mut self.phones[i];
                let Some(session) = phone.session.as_mut() else {
                    return;
                };
                // The announcement, then the bytes (either order is fine for the session).
                let result = session
                    .handle_message(
                        Message::Update(update),
                        codec::Extensions::new(),
                        &mut phone.store,
                    )
                    .and_then(|()| session.handle_transfer(id, bytes, &mut phone.store));
                self.after_session_input(i, result);
            }
            Delivery::Frame(frame) => match self.decode_for(i, &frame) {
                Ok((msg, ext)) => self.on_message(i, msg, ext),
                Err(e) => {
                    let v = self.phones[i].version;
                    self.problems
                        .push(format!("a version-{v} phone could not read a frame: {e}"));
                }
            },
        }
    }

    /// Decodes as the phone's app would: a version-1 app refuses trailing bytes.
    fn decode_for(&self, i: usize, frame: &[u8]) -> Result<(Message, codec::Extensions), String> {
        let payload = &frame[HEADER_LEN..];
        if self.phones[i].version == 1 {
            postcard::from_bytes::<Message>(payload)
                .map(|m| (m, codec::Extensions::new()))
                .map_err(|e| e.to_string())
        } else {
            codec::decode_with_extensions(payload).map_err(|e| e.to_string())
        }
    }

    /// A relay message reaches an honest phone's session.
    fn on_message(&mut self, i: usize, msg: Message, ext: codec::Extensions) {
        match &msg {
            Message::Ack(a) => self.report.changes_acked += u64::from(a.applied),
            Message::Update(_) => self.report.updates_applied += 1,
            Message::Resync(_) => self.report.resyncs += 1,
            _ => {}
        }
        let phone = &mut self.phones[i];
        let Some(session) = phone.session.as_mut() else {
            return;
        };
        let result = session.handle_message(msg, ext, &mut phone.store);
        self.after_session_input(i, result);
    }

    /// What reaches the forger: a welcome lets it forge; refusals are counted.
    fn forger_reads(&mut self, conn: u64, out: Delivery) {
        let Some(h) = self.hostile.as_mut() else {
            return;
        };
        if h.conn != Some(conn) {
            return;
        }
        match out {
            Delivery::Closed => {
                h.conn = None;
                h.welcomed = false;
                self.conns.remove(&conn);
                let back = self.jitter(Duration::from_secs(2)) + Duration::from_millis(500);
                self.at(back, Event::Connect(usize::MAX));
            }
            Delivery::Transfer(..) => {}
            Delivery::Frame(frame) => match codec::decode_payload(&frame[HEADER_LEN..]) {
                Ok(Message::Welcome(_)) => h.welcomed = true,
                Ok(Message::Error(_)) => self.report.forged_refused += 1,
                Ok(_) => {}
                Err(e) => self
                    .problems
                    .push(format!("the forger could not read: {e}")),
            },
        }
    }

    /// The forger sends a change that claims someone else.
    fn forge(&mut self) {
        let Some(conn) = self.hostile.as_ref().and_then(|h| h.conn) else {
            return;
        };
        if !self.hostile.as_ref().is_some_and(|h| h.welcomed) {
            return;
        }
        let kind = self.rng.random_range(0..5);
        if kind >= 3 {
            return self.misnumber(conn, kind == 3);
        }
        let victim = self.rng.random_range(0..self.phones.len().max(1));
        let Some(v) = self.phones.get(victim) else {
            return;
        };
        let (v_device, v_member, v_actor, v_acked) = (
            v.device.clone(),
            v.member.clone(),
            v.actor.clone(),
            v.actor_published(),
        );
        let h = self.hostile.as_ref().expect("checked");
        let (actor, message) = match kind {
            // Another member's name on the change.
            0 => (h.actor.clone(), format!("{v_member}@{v_device}")),
            // Another phone's actor (once bound to it and public).
            1 if v_acked => (v_actor, format!("{}@{}", h.member, h.device)),
            // A tally under another device.
            _ => (h.actor.clone(), format!("{}@{}", h.member, h.device)),
        };
        let ms = self.change_time();
        let ledger = self.ledger.clone();
        let mut doc = redline_proto::genesis::genesis(&ledger).with_actor(actor);
        let mut tx = doc.transaction();
        use automerge::transaction::Transactable;
        let (_, tallies) = tx
            .get(automerge::ROOT, "tallies")
            .ok()
            .flatten()
            .expect("genesis");
        let key = if kind == 2 {
            v_device.to_string()
        } else {
            format!("forged-{}", self.forged.len())
        };
        let _ = tx.put(&tallies, &key, automerge::ScalarValue::Int(1));
        let opts = automerge::transaction::CommitOptions::default()
            .with_message(message)
            .with_time(ms);
        let (Some(hash), _) = tx.commit_with(opts) else {
            return;
        };
        self.forged.push(hash);
        let Ok(bundle) = doc.bundle([hash]) else {
            return;
        };
        let push = redline_proto::message::Push {
            doc: ledger,
            bundle: bundle.bytes().to_vec(),
            heads: vec![hash.0],
        };
        match codec::encode_frame(&Message::Push(push), codec::DEFAULT_MAX_FRAME) {
            Ok(f) => self.send_to_relay(conn, f),
            Err(e) => self
                .problems
                .push(format!("the forger could not frame: {e}")),
        }
    }

    /// The forger sends a change of its own, signed as itself, whose numbering
    /// Automerge applies but no save of the document survives: operations numbered
    /// from 1 (`into_past`), or its actor's second change built beside its first (both
    /// in one push).
    fn misnumber(&mut self, conn: u64, into_past: bool) {
        use automerge::transaction::Transactable;
        let Some(h) = self.hostile.as_ref() else {
            return;
        };
        let (actor, message) = (h.actor.clone(), format!("{}@{}", h.member, h.device));
        let ms = self.change_time();
        let ledger = self.ledger.clone();
        let genesis = redline_proto::genesis::genesis(&ledger);
        let mut doc = genesis.fork().with_actor(actor);
        let n = self.forged.len();
        let mut changes = Vec::new();
        for i in 0..if into_past { 1 } else { 2 } {
            let mut tx = doc.transaction();
            let Some((_, tasks)) = tx.get(automerge::ROOT, "tasks").ok().flatten() else {
                return;
            };
            let _ = tx.put(&tasks, format!("misnumbered-{n}-{i}"), "open");
            let opts = automerge::transaction::CommitOptions::default()
                .with_message(message.clone())
                .with_time(ms);
            tx.commit_with(opts);
            let Some(c) = doc.get_last_local_change() else {
                return;
            };
            changes.push(c);
        }
        let last = changes.pop().expect("one change at least");
        let mut e = automerge::ExpandedChange::from(&last);
        if into_past {
            e.start_op = std::num::NonZeroU64::MIN;
        } else {
            e.deps = genesis.get_heads();
        }
        e.hash = None;
        changes.push(automerge::Change::from(e));
        self.forged.extend(changes.iter().map(|c| c.hash()));
        let push = redline_proto::message::Push {
            doc: ledger,
            bundle: changes
                .iter()
                .flat_map(|c| c.raw_bytes().to_vec())
                .collect(),
            heads: changes.iter().map(|c| c.hash().0).collect(),
        };
        match codec::encode_frame(&Message::Push(push), codec::DEFAULT_MAX_FRAME) {
            Ok(f) => self.send_to_relay(conn, f),
            Err(e) => self
                .problems
                .push(format!("the forger could not frame: {e}")),
        }
    }

    /// The invariants, once quiescent.
    async fn check(mut self) -> Result<SimReport, SimFailure> {
        let mut problems = std::mem::take(&mut self.problems);
        let Some(relay) = self.relay.as_ref() else {
            problems.push("the relay was down at the end".into());
            return Err(SimFailure {
                seed: self.seed,
                what: problems,
                replay: String::new(),
            });
        };
        let hub = relay.state().hub.clone();
        let mut digest = sha2::Sha256::new();
        let mut relay_docs = BTreeMap::new();
        for id in &self.team_ledgers {
            match load(&hub, id).await {
                Ok(Some(doc)) => {
                    relay_docs.insert(id.clone(), doc);
                }
                Ok(None) => {}
                Err(e) => problems.push(format!("the relay could not load {id}: {e}")),
            }
        }
        for p in &mut self.phones {
            if let Some(session) = p.session.take() {
                p.collect_refusals(&session);
                p.session = Some(session);
            }
        }
        // Quiescent: every push a live session made (inline or on an upload stream)
        // was answered.
        for p in &self.phones {
            let waiting = p.session.as_ref().map_or(0, |s| s.standing().2);
            if p.conn.is_some() && waiting > 0 {
                let device = &p.device;
                problems.push(format!(
                    "{device} still waits for {waiting} pushes' answers"
                ));
            }
        }
        for (stream, (i, conn, _)) in &self.uploads {
            let p = &self.phones[*i];
            if p.conn == Some(*conn) {
                let device = &p.device;
                problems.push(format!(
                    "{device}'s upload stream {stream} was never answered"
                ));
            }
        }
        for p in &self.phones {
            let ledger = &self.team_ledgers[p.index % self.team_ledgers.len()];
            let acknowledged = p.acknowledged(ledger);
            let Some(doc) = relay_docs.get(ledger) else {
                if p.reference != Default::default() {
                    problems.push(format!("the relay lacks {ledger}"));
                }
                for h in &acknowledged {
                    problems.push(format!(
                        "{}: acknowledged change {h} is not on the relay",
                        p.device
                    ));
                }
                continue;
            };
            for h in &acknowledged {
                if doc.get_change_by_hash(h).is_none() {
                    problems.push(format!(
                        "{}: acknowledged change {h} is not on the relay",
                        p.device
                    ));
                }
            }
            for h in p.store.relay_held.get(ledger).into_iter().flatten() {
                if doc.get_change_by_hash(h).is_none() {
                    problems.push(format!(
                        "{}: the relay was known to hold {h}, and it is not on the relay",
                        p.device
                    ));
                }
            }
            let unacked = p.written.len() - acknowledged.len();
            if unacked > 0 {
                let standing = p.session.as_ref().map(DeviceSession::standing);
                problems.push(format!(
                    "{}: {unacked} changes never acknowledged (connection {:?}, session (welcomed, caught up, pushes in flight) {standing:?}, online {})",
                    p.device, p.conn, p.online
                ));
            }
            let mine = p.store.docs.get(ledger);
            if mine.map(|d| d.get_heads()) != Some(doc.get_heads()) {
                problems.push(format!(
                    "{} does not hold the relay's copy of {ledger}",
                    p.device
                ));
            }
            match p.stored_heads(ledger) {
                Ok(stored) if Some(&stored) == mine.map(|d| d.get_heads()).as_ref() => {}
                Ok(_) => problems.push(format!(
                    "{}'s stored copy of {ledger} is not what it shows",
                    p.device
                )),
                Err(e) => problems.push(format!("{}: {e}", p.device)),
            }
            for w in &p.store.cursor_went_back {
                problems.push(format!("{}: {w}", p.device));
            }
            let seen = phone::read_reference(doc, &p.device, &p.member);
            if seen != p.reference {
                problems.push(format!(
                    "{}: the relay's tallies and tasks {:?} differ from what it wrote {:?}",
                    p.device, seen, p.reference
                ));
            }
            for r in &p.refusals {
                problems.push(format!("an honest phone was refused: {r}"));
            }
        }
        for h in &self.forged {
            if relay_docs
                .values()
                .any(|d| d.get_change_by_hash(h).is_some())
            {
                problems.push(format!("forged change {h} was stored"));
            }
        }
        for (id, doc) in &relay_docs {
            digest.update(id.to_string().as_bytes());
            for h in doc.get_heads() {
                digest.update(h.0);
            }
        }
        for n in [
            self.report.changes_acked,
            self.report.messages,
            self.report.updates_applied,
            self.report.resyncs,
            self.report.cuts,
        ] {
            digest.update(n.to_le_bytes());
        }
        self.report.digest = hex::encode(&digest.finalize()[..8]);
        if problems.is_empty() {
            Ok(self.report)
        } else {
            Err(SimFailure {
                seed: self.seed,
                what: problems,
                replay: String::new(),
            })
        }
    }
}

/// The relay's document, read through its hub (`None`: it holds nothing of it).
async fn load(
    hub: &Arc<redline_server::hub::Hub>,
    id: &DocId,
) -> Result<Option<automerge::Automerge>, RelayError> {
    let slot = hub.slot(id).await?;
    let doc = slot.lock().await.doc.clone();
    hub.release(slot);
    Ok((!doc.get_heads().is_empty()).then_some(doc))
}

/// The forger: a token holder that crafts its own pushes.
struct Forger {
    hello: Hello,
    member: MemberId,
    device: DeviceId,
    actor: ActorId,
    conn: Option<u64>,
    welcomed: bool,
}

/// A phone with its own token and actor.
fn new_phone(
    key_dir: &std::path::Path,
    index: usize,
    member: &str,
    team: usize,
    version: u16,
    ops: u32,
    rng: &mut StdRng,
) -> Result<Phone, RelayError> {
    let bad = |e: redline_proto::Error| RelayError::Storage(e.to_string());
    let member = MemberId::new(member).map_err(bad)?;
    let device = DeviceId::new(format!("sim-{index}")).map_err(bad)?;
    let team = TeamId::new(format!("team-{team}")).map_err(bad)?;
    let (_, token) = redline_server::auth::issue(
        key_dir,
        TokenRequest {
            device: device.clone(),
            member: member.clone(),
            role: Role::Volunteer,
            teams: vec![team.clone()],
            zones: Vec::new(),
            ttl: Duration::from_secs(7 * 86_400),
        },
    )?;
    let actor = ActorId::from(rng.random::<[u8; 16]>());
    Ok(Phone::new(
        index, member, device, team, token, actor, version, ops,
    ))
}
