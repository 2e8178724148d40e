//! The field-day scenario: teams of phones work offline, then reconnect all at once to
//! one relay running in a child process. Used by the `fieldday` benchmark binary and, at
//! small size, by an ordinary test.
//!
//! Phases: **setup** (each team's ledger and its zones' households created and synced to
//! every device), **offline work** (each device alone: task updates, check-ins, tally
//! increments, need updates; every write timed), **reconnect storm** (every device goes
//! live at once; converged when every team's devices hold identical documents),
//! **verification** (an auditor device fetches the relay's copies: every device's
//! documents must equal them, heads and typed views). Then live latency, a no-op
//! reconnect of a device holding 500 documents, and the Automerge floor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use automerge::{Automerge, ChangeHash, ReadDoc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redline_client::{
    Client, ClientConfig, NeedCategory, NeedStatus, NewHousehold, NewNeed, NewTask, Priority,
    RelayEndpoint, TaskKind, TaskStatus,
};
use redline_proto::token::Role;
use redline_proto::{Day, DocId, MemberId, TeamId, ZoneId};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Sizes of a field day.
#[derive(Clone, Debug)]
pub struct FieldDayConfig {
    /// Teams.
    pub teams: usize,
    /// Devices per team.
    pub devices_per_team: usize,
    /// Zones (each covered by one team, round robin).
    pub zones: usize,
    /// Households per zone.
    pub households_per_zone: usize,
    /// Offline operations per device.
    pub ops_per_device: usize,
    /// Seed of the simulated work.
    pub seed: u64,
    /// Live-latency samples.
    pub live_samples: usize,
    /// Documents held by the no-op reconnect device.
    pub noop_docs: usize,
    /// The executable that serves the relay with `--serve-relay DIR`.
    pub relay_exe: PathBuf,
    /// Where the relay's and devices' data go.
    pub work_dir: PathBuf,
    /// Store in PostgreSQL instead of sled.
    pub postgres: Option<PostgresTarget>,
    /// Relays over the one database (more than one needs `postgres`).
    pub relays: usize,
    /// Which relay a device starts at when there are several.
    pub spread: Spread,
    /// Also time Automerge applying the storm's changes to each document in batches of
    /// [`APPLY_BATCHES`] changes (what a relay committing changes as they come does),
    /// against the floor's one batch per document.
    pub apply_batches: bool,
}

/// The batch sizes `apply_batches` times.
pub const APPLY_BATCHES: [usize; 4] = [16, 64, 256, 1024];

/// How the devices of a field day with several relays are spread over them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spread {
    /// Every device starts at its team's home relay
    /// ([`ClientConfig::with_deployment`]): what a deployment configures.
    Team,
    /// Device `k` starts at relay `k mod relays`: a team's phones on every relay, each
    /// team document written through all of them (the worst case for the relays).
    Device,
}

impl Spread {
    /// Its name in the JSON and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Spread::Team => "team",
            Spread::Device => "device",
        }
    }
}

/// A PostgreSQL database for the relay of a benchmark.
#[derive(Clone, Debug)]
pub struct PostgresTarget {
    /// Its URL.
    pub url: String,
    /// The server's main process, when it runs on this machine: its CPU (with its
    /// backends') is the database time of the result.
    pub server_pid: Option<u32>,
}

impl PostgresTarget {
    /// CPU seconds of the server and every process it started (0 without a pid).
    pub fn cpu_seconds(&self) -> f64 {
        self.server_pid
            .map(crate::postgres::process_tree_cpu_seconds)
            .unwrap_or(0.0)
    }
}

/// The environment variable through which the benchmark tells its relay child to store
/// in PostgreSQL (never read by the relay itself).
pub const CHILD_POSTGRES_ENV: &str = "REDLINE_BENCH_RELAY_POSTGRES";

/// What a field day measured. Field names are the JSON keys.
#[derive(Clone, Debug, Serialize)]
pub struct FieldDayResult {
    /// The seed of the simulated work.
    pub seed: u64,
    pub devices: u64,
    pub docs: u64,
    pub changes: u64,
    /// Whether every team converged within the storm's deadline (600 s); if not, the
    /// storm figures are those at the deadline and nothing after the storm ran.
    pub converged: bool,
    pub convergence_s: f64,
    pub relay_cpu_s: f64,
    /// Live connections that failed in the storm (each phone reconnected by itself).
    pub storm_connection_errors: u64,
    /// Relay CPU in the storm per change made offline.
    pub relay_cpu_per_change_us: f64,
    /// CPU of all phones' sync in the storm (this process, less its own convergence
    /// checks).
    pub device_cpu_s: f64,
    /// Changes the phones applied in the storm (each phone, what it lacked).
    pub device_applied_changes: u64,
    /// Phones' sync CPU per change applied.
    pub device_apply_per_change_us: f64,
    /// Catch-ups the relays answered with the whole document (a device lacking most of
    /// it), over the run; with several seeds, the most of any.
    pub whole_documents: u64,
    pub floor_cpu_s: f64,
    pub cpu_ratio: f64,
    /// The phones' floor (estimated from one phone per team): every phone decoding and
    /// applying what it lacked of each document as one bundle.
    pub phone_floor_bundle_cpu_s: f64,
    /// The same, every phone loading each final document once instead.
    pub phone_floor_whole_cpu_s: f64,
    /// The same, each document the cheaper of the two ways.
    pub phone_floor_cpu_s: f64,
    /// The least the storm could take on this machine, its relay and phones sharing
    /// its cores: the relay's floor and the phones' floor over the cores. Convergence
    /// below it needs fewer phones per core, not faster code.
    pub convergence_floor_s: f64,
    pub wire_bytes: u64,
    /// Frames (messages and transfer pieces) the devices sent and received in the storm:
    /// with `wire_bytes`, where the overhead over the changes' own bytes comes from.
    pub wire_frames: u64,
    /// Per delivery: each device's own new changes once up and what it lacked once down,
    /// each as one Automerge bundle: the least any protocol must move.
    pub compressed_change_bytes: u64,
    pub wire_ratio: f64,
    /// All new changes once, as one bundle per document (not a JSON key of the issue).
    #[serde(skip)]
    pub compressed_once_bytes: u64,
    pub relay_peak_rss_bytes: u64,
    pub live_p50_ms: f64,
    pub live_p99_ms: f64,
    /// Probes the live figures are taken over.
    pub live_samples: u64,
    pub noop_reconnect_bytes: u64,
    pub noop_reconnect_round_trips: u64,
    pub local_write_p50_us: f64,
    pub local_write_p99_us: f64,
    /// `sled` or `postgres`.
    pub storage: String,
    /// Relays sharing the storage (relay CPU is their sum, peak RSS the largest).
    pub relays: u64,
    /// With several relays: `team` (a team's phones start at its home relay) or
    /// `device` (each team's phones spread over every relay).
    pub spread: String,
    /// CPU of the database server in the storm (PostgreSQL on this machine; 0 for
    /// sled, whose time is the relay's own).
    pub database_cpu_s: f64,
    /// With `apply_batches`: `apply_batch_<k>_s`, Automerge's CPU applying the storm's
    /// changes to each document in batches of `k` (the floor is one batch).
    #[serde(flatten)]
    pub apply_batches: std::collections::BTreeMap<String, f64>,
}

/// The relay as a child process.
pub struct RelayChild {
    child: tokio::process::Child,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// Its certificate fingerprint.
    pub fingerprint: String,
    /// Its standard output after the address line (its counts at shutdown).
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

/// The line the relay child prints at shutdown: catch-ups it answered with the whole
/// document.
const WHOLE_DOCUMENTS_LINE: &str = "WHOLE_DOCUMENTS";

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

impl RelayChild {
    /// Starts `exe --serve-relay dir` (storing in the PostgreSQL database at `postgres`
    /// if given) and waits for its address line.
    pub async fn start(exe: &Path, dir: &Path, postgres: Option<&str>) -> anyhow::Result<Self> {
        let mut command = tokio::process::Command::new(exe);
        match postgres {
            Some(url) => command.env(CHILD_POSTGRES_ENV, url),
            None => command.env_remove(CHILD_POSTGRES_ENV),
        };
        let mut child = command
            .arg("--serve-relay")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the relay child {}", exe.display()))?;
        let stdout = child.stdout.take().context("relay stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("relay child did not start in 30 s")??
            .context("relay child exited")?;
        let mut parts = line.split_whitespace();
        let (Some("LISTEN"), Some(addr), Some(fp)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("unexpected line from the relay child: {line}");
        };
        Ok(Self {
            child,
            addr: addr.parse()?,
            fingerprint: fp.to_owned(),
            lines,
        })
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("relay child has exited")
    }

    /// CPU seconds (user + system) the child has used.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()?))?;
        // Fields after the parenthesised name: state is field 3; utime 14, stime 15.
        let rest = stat.rsplit_once(')').context("bad /proc stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11).context("utime")?.parse()?;
        let stime: f64 = fields.get(12).context("stime")?.parse()?;
        Ok((utime + stime) / clk_tck())
    }

    /// Peak resident memory of the child (VmHWM).
    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .context("VmHWM")?;
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .context("VmHWM value")?
            .parse()?;
        Ok(kb * 1024)
    }

    /// Stops the child (closing its stdin asks it to shut down cleanly); returns the
    /// catch-ups it answered with the whole document (0 if it did not say).
    pub async fn stop(mut self) -> anyhow::Result<u64> {
        drop(self.child.stdin.take());
        let mut whole = 0;
        let said = async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                if let Some(n) = line.strip_prefix(WHOLE_DOCUMENTS_LINE) {
                    whole = n.trim().parse().unwrap_or(0);
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(20), said).await;
        match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => self.child.kill().await?,
        }
        Ok(whole)
    }
}

/// The relay child's main: serve `dir` on 127.0.0.1, print `LISTEN addr fingerprint`, and
/// shut down cleanly when stdin closes.
pub async fn serve_relay_child(dir: &Path) -> anyhow::Result<()> {
    // Logs on stderr when asked for (the benchmark's own output stays clean).
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    // The no-op reconnect holds hundreds of ledger days on one phone.
    let mut config =
        crate::test_config(dir).with_listen(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    config.http_listen = None;
    if let Ok(url) = std::env::var(CHILD_POSTGRES_ENV) {
        config.storage = redline_server::config::StorageChoice::Postgres(
            redline_server::storage::PgOptions::new(url),
        );
    }
    let relay = redline_server::Relay::start(config).await?;
    println!("LISTEN {} {}", relay.local_addr(), relay.fingerprint());
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    use tokio::io::AsyncReadExt;
    while stdin.read(&mut buf).await.unwrap_or(0) > 0 {}
    let whole = relay
        .stats()
        .blocks
        .whole
        .load(std::sync::atomic::Ordering::Relaxed);
    println!("{WHOLE_DOCUMENTS_LINE} {whole}");
    relay.shutdown().await?;
    Ok(())
}

struct Device {
    team: usize,
    /// Its place in the day's list: `index % devices_per_team` is its place in its team.
    index: usize,
    client: Client,
    docs: Vec<DocId>,
}

/// Automerge's CPU applying each document's storm changes (in causal order) to its copy
/// before the storm in batches of each of [`APPLY_BATCHES`], then saving it (as the
/// floor, which is one batch and a save), keyed `apply_batch_<k>_s`.
fn floor_in_batches(
    inputs: &[(Automerge, Vec<automerge::Change>)],
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let mut out = std::collections::BTreeMap::new();
    for k in APPLY_BATCHES {
        let mut docs: Vec<Automerge> = inputs.iter().map(|(d, _)| d.clone()).collect();
        let t = cpu_time::ThreadTime::now();
        for (doc, (_, changes)) in docs.iter_mut().zip(inputs) {
            for batch in changes.chunks(k) {
                doc.apply_changes(batch.to_vec())?;
            }
            // As the floor does: its figure is one batch and a save.
            std::hint::black_box(doc.save());
        }
        out.insert(format!("apply_batch_{k}_s"), t.elapsed().as_secs_f64());
    }
    Ok(out)
}

/// One sampled phone's document before the storm, for the phones' floor.
struct PhoneFloorInput {
    /// The phone's copy before the storm.
    copy: Automerge,
    /// What it lacks of the final document, as one bundle.
    lacked: Vec<u8>,
    /// The final document, saved.
    whole: std::sync::Arc<Vec<u8>>,
    /// How many phones this one stands for (its team's).
    stands_for: f64,
}

/// What the phones must spend at the least, by Automerge alone: every phone's lacked
/// changes of a document as one bundle decoded and applied, or the final document
/// loaded once and the phone's own copy merged into it (a whole-document catch-up).
#[derive(Clone, Copy, Debug, Default)]
struct PhoneFloor {
    /// All phones, each document as one bundle.
    bundle_s: f64,
    /// All phones, each document loaded whole.
    whole_s: f64,
    /// All phones, each document the cheaper way of the two.
    least_s: f64,
}

fn phone_floor(inputs: Vec<PhoneFloorInput>) -> anyhow::Result<PhoneFloor> {
    let mut floor = PhoneFloor::default();
    for input in inputs {
        let mut copy = input.copy.clone();
        let t = cpu_time::ThreadTime::now();
        copy.load_incremental(&input.lacked)?;
        let bundle = t.elapsed().as_secs_f64();
        std::hint::black_box(&copy);
        let mut own = input.copy;
        let t = cpu_time::ThreadTime::now();
        let mut loaded = Automerge::load(&input.whole)?;
        loaded.merge(&mut own)?;
        let whole = t.elapsed().as_secs_f64();
        std::hint::black_box(&loaded);
        if copy.get_heads() != loaded.get_heads() {
            bail!("the phones' floor: a bundle and the whole document disagree");
        }
        floor.bundle_s += bundle * input.stands_for;
        floor.whole_s += whole * input.stands_for;
        floor.least_s += bundle.min(whole) * input.stands_for;
    }
    Ok(floor)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn today() -> anyhow::Result<Day> {
    Ok(Day::new(
        time::OffsetDateTime::now_utc().date().to_string(),
    )?)
}

/// The relays of a run: one, or several over one PostgreSQL database (sharing the
/// first one's certificate and token key).
struct Relays(Vec<RelayChild>);

impl Relays {
    async fn start(cfg: &FieldDayConfig, relay_dir: &Path) -> anyhow::Result<Self> {
        let url = cfg.postgres.as_ref().map(|p| p.url.as_str());
        if cfg.relays > 1 && url.is_none() {
            bail!("several relays need PostgreSQL (--storage postgres)");
        }
        let mut all = vec![RelayChild::start(&cfg.relay_exe, relay_dir, url).await?];
        if cfg.relays > 1 {
            // The token key exists once a token was issued; then every relay gets it.
            crate::token_for(relay_dir, relay_dir, "key", Role::Volunteer, &[], &[])?;
            for i in 1..cfg.relays {
                let dir = cfg.work_dir.join(format!("relay-{i}"));
                crate::copy_dir(relay_dir, &dir)?;
                all.push(RelayChild::start(&cfg.relay_exe, &dir, url).await?);
            }
        }
        Ok(Self(all))
    }

    /// `config` with the relays of device `k`: its team's home relay first
    /// ([`Spread::Team`]), or relay `k mod n` ([`Spread::Device`]), then the others in
    /// turn.
    fn for_device(&self, config: ClientConfig, k: usize, spread: Spread) -> ClientConfig {
        let n = self.0.len();
        let at = |i: usize| {
            let r = &self.0[i % n];
            RelayEndpoint::new(r.addr, r.fingerprint.clone())
        };
        match spread {
            Spread::Team => config.with_deployment((0..n).map(at).collect()),
            Spread::Device => config
                .with_relay(at(k))
                .with_other_relays((1..n).map(|i| at(k + i)).collect()),
        }
    }

    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        self.0.iter().map(RelayChild::cpu_seconds).sum()
    }

    fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        let mut peak = 0;
        for r in &self.0 {
            peak = peak.max(r.peak_rss_bytes()?);
        }
        Ok(peak)
    }

    /// Stops every relay; returns the catch-ups they answered with the whole document.
    async fn stop(self) -> anyhow::Result<u64> {
        let mut whole = 0;
        for r in self.0 {
            whole += r.stop().await?;
        }
        Ok(whole)
    }
}

/// Runs a field day; `progress` gets a line per phase.
pub async fn run(cfg: &FieldDayConfig, progress: impl Fn(&str)) -> anyhow::Result<FieldDayResult> {
    let relay_dir = cfg.work_dir.join("relay");
    let relay = Relays::start(cfg, &relay_dir).await?;
    let day = today()?;
    let teams: Vec<TeamId> = (0..cfg.teams)
        .map(|t| TeamId::new(format!("team-{t}")))
        .collect::<Result<_, _>>()?;
    let zones: Vec<ZoneId> = (0..cfg.zones)
        .map(|z| ZoneId::new(format!("zone-{z}")))
        .collect::<Result<_, _>>()?;
    let zones_of = |t: usize| -> Vec<ZoneId> {
        zones
            .iter()
            .enumerate()
            .filter(|(z, _)| z % cfg.teams == t)
            .map(|(_, z)| z.clone())
            .collect()
    };

    // ----- setup ---------------------------------------------------------------------
    let started = Instant::now();
    let mut devices = Vec::new();
    for (t, team) in teams.iter().enumerate() {
        for d in 0..cfg.devices_per_team {
            let member = format!("{team}-m{d}");
            let dir = cfg.work_dir.join("devices").join(format!("{team}-{d}"));
            let zone_names: Vec<String> = zones_of(t).iter().map(|z| z.to_string()).collect();
            let zone_refs: Vec<&str> = zone_names.iter().map(String::as_str).collect();
            let role = if d == 0 { Role::Lead } else { Role::Volunteer };
            let token = crate::token_for(
                &relay_dir,
                &dir,
                &member,
                role,
                &[team.as_str()],
                &zone_refs,
            )?;
            let config = relay
                .for_device(
                    ClientConfig::new(MemberId::new(member)?),
                    devices.len(),
                    cfg.spread,
                )
                .with_token(token)
                .with_teams(vec![team.clone()])
                .with_zones(zones_of(t));
            let client = Client::open(dir, config)?;
            let mut docs = vec![DocId::ledger(team, &day)];
            docs.extend(zones_of(t).iter().map(DocId::households));
            devices.push(Device {
                team: t,
                index: devices.len(),
                client,
                docs,
            });
        }
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    for (t, team) in teams.iter().enumerate() {
        let lead = &devices[t * cfg.devices_per_team].client;
        for i in 0..10 {
            lead.add_task(
                team,
                &day,
                NewTask::new(TaskKind::ALL[i % 5], format!("setup task {i}")),
            )?;
        }
        for z in zones_of(t) {
            for h in 0..cfg.households_per_zone {
                lead.add_household(
                    &z,
                    NewHousehold {
                        address: format!("{z} household {h}"),
                        residents: 1 + (h % 5) as u32,
                        ..Default::default()
                    },
                )?;
            }
        }
        lead.sync().await?;
    }
    sync_all(&devices).await?;
    progress(&format!(
        "setup: {} devices, {} docs synced in {:.1?}",
        devices.len(),
        teams.len() + zones.len(),
        started.elapsed()
    ));
    // The documents as set up: the floor starts from these.
    let mut base: HashMap<DocId, Automerge> = HashMap::new();
    for d in &devices {
        for id in &d.docs {
            if !base.contains_key(id) {
                base.insert(
                    id.clone(),
                    d.client.document(id)?.context("setup document missing")?,
                );
            }
        }
    }

    // ----- offline work --------------------------------------------------------------
    let started = Instant::now();
    let mut write_us: Vec<f64> = Vec::new();
    let mut plans = Vec::new();
    for d in &devices {
        plans.push((d.client.clone(), d.team, rng.random::<u64>()));
    }
    // One writer per core: a phone writes on its own CPU, and more writers than cores
    // would time the wait for a core (8 writers on 2 cores quadrupled the p50).
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut work = tokio::task::JoinSet::new();
    let per_worker = plans.len().div_ceil(cores).max(1);
    for chunk in plans.chunks(per_worker) {
        let chunk: Vec<_> = chunk.to_vec();
        let (teams, day, ops) = (teams.clone(), day.clone(), cfg.ops_per_device);
        let zones_all: Vec<Vec<ZoneId>> = (0..cfg.teams).map(&zones_of).collect();
        work.spawn_blocking(move || -> anyhow::Result<Vec<f64>> {
            let mut samples = Vec::new();
            for (client, t, seed) in chunk {
                samples.extend(offline_work(
                    &client,
                    &teams[t],
                    &zones_all[t],
                    &day,
                    ops,
                    seed,
                )?);
            }
            Ok(samples)
        });
    }
    while let Some(r) = work.join_next().await {
        write_us.extend(r??);
    }
    write_us.sort_by(f64::total_cmp);
    let changes = write_us.len() as u64;
    progress(&format!(
        "offline work: {changes} changes in {:.1?}",
        started.elapsed()
    ));

    // ----- floor: the same changes with Automerge directly -------------------------
    let mut floor_inputs: Vec<(Automerge, Vec<automerge::Change>)> = Vec::new();
    let mut compressed_change_bytes = 0u64;
    let mut compressed_once_bytes = 0u64;
    let mut device_applied_changes = 0u64;
    let bundle_len = |doc: &Automerge, hashes: Vec<ChangeHash>| -> anyhow::Result<u64> {
        Ok(if hashes.is_empty() {
            0
        } else {
            doc.bundle(hashes)?.bytes().len() as u64
        })
    };
    // The phones' floor, from one phone of each team (the team's other phones hold
    // documents of the same shape): its copy before the storm, what it lacks as one
    // bundle, and the final document.
    let mut phone_floor_inputs: Vec<PhoneFloorInput> = Vec::new();
    for (id, doc) in &base {
        let base_heads = doc.get_heads();
        let mut all = doc.clone();
        let mut own: Vec<(Vec<ChangeHash>, Option<Automerge>)> = Vec::new();
        for d in devices.iter().filter(|d| d.docs.contains(id)) {
            let mut copy = d.client.document(id)?.context("document missing")?;
            let mine = copy
                .get_changes(&base_heads)
                .iter()
                .map(|c| c.hash())
                .collect();
            all.merge(&mut copy)?;
            let sampled = (d.index % cfg.devices_per_team == 1).then_some(copy);
            own.push((mine, sampled));
        }
        let new = all.get_changes(&base_heads);
        let every: Vec<ChangeHash> = new.iter().map(|c| c.hash()).collect();
        compressed_once_bytes += bundle_len(&all, every.clone())?;
        let whole = std::sync::Arc::new(all.save());
        for (mine, sampled) in own {
            let lacked: Vec<ChangeHash> = every
                .iter()
                .filter(|h| !mine.contains(h))
                .copied()
                .collect();
            device_applied_changes += lacked.len() as u64;
            if let Some(copy) = sampled
                && !lacked.is_empty()
            {
                phone_floor_inputs.push(PhoneFloorInput {
                    copy,
                    lacked: all.bundle(lacked.iter().copied())?.bytes().to_vec(),
                    whole: whole.clone(),
                    stands_for: cfg.devices_per_team as f64,
                });
            }
            compressed_change_bytes += bundle_len(&all, mine)? + bundle_len(&all, lacked)?;
        }
        floor_inputs.push((doc.clone(), new));
    }
    let apply_batches = if cfg.apply_batches {
        let inputs = floor_inputs.clone();
        tokio::task::spawn_blocking(move || floor_in_batches(&inputs)).await??
    } else {
        Default::default()
    };
    let floor_cpu_s = tokio::task::spawn_blocking(move || {
        let t = cpu_time::ThreadTime::now();
        for (mut doc, changes) in floor_inputs {
            doc.apply_changes(changes).expect("floor apply");
            std::hint::black_box(doc.save());
        }
        t.elapsed().as_secs_f64()
    })
    .await?;

    let phone_floor =
        tokio::task::spawn_blocking(move || phone_floor(phone_floor_inputs)).await??;

    // ----- reconnect storm -----------------------------------------------------------
    progress("reconnect storm: every device reconnects at once");
    let cpu_before = relay.cpu_seconds()?;
    let db_cpu_before = cfg
        .postgres
        .as_ref()
        .map_or(0.0, PostgresTarget::cpu_seconds);
    let traffic_before: u64 = devices
        .iter()
        .map(|d| {
            let (s, r) = d.client.traffic();
            s + r
        })
        .sum();
    let frames_before = frames_of(&devices);
    let started = Instant::now();
    let process_cpu = cpu_time::ProcessTime::now();
    let mut checking = Duration::ZERO;
    let mut storm_errors = 0u64;
    let mut lives = Vec::new();
    for d in &devices {
        lives.push(d.client.go_live()?);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut next_report = Duration::from_secs(60);
    let all_converged = loop {
        let check = cpu_time::ThreadTime::now();
        let done = converged(&devices, cfg.teams)?;
        checking += check.elapsed();
        if done {
            break true;
        }
        if Instant::now() > deadline {
            progress("the devices did not converge within 600 s");
            break false;
        }
        if started.elapsed() > next_report {
            next_report += Duration::from_secs(60);
            progress(&format!(
                "not converged after {:.0?}: {}",
                started.elapsed(),
                divergence(&devices, cfg.teams)?
            ));
        }
        // A live session reconnects by itself after a failed connection (as a phone
        // does): failures are counted, and only a storm that never converges fails.
        for l in lives.iter_mut() {
            while let Ok(r) = l.reports.try_recv() {
                if let Err(e) = r {
                    if storm_errors == 0 {
                        progress(&format!("a live connection failed (it reconnects): {e}"));
                    }
                    storm_errors += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let convergence_s = started.elapsed().as_secs_f64();
    let relay_cpu_s = relay.cpu_seconds()? - cpu_before;
    let database_cpu_s = cfg
        .postgres
        .as_ref()
        .map_or(0.0, PostgresTarget::cpu_seconds)
        - db_cpu_before;
    let device_cpu_s = process_cpu.elapsed().saturating_sub(checking).as_secs_f64();
    for l in lives {
        l.stop().await;
    }
    let wire_bytes: u64 = devices
        .iter()
        .map(|d| {
            let (s, r) = d.client.traffic();
            s + r
        })
        .sum::<u64>()
        - traffic_before;
    let wire_frames = frames_of(&devices) - frames_before;
    progress(&format!(
        "reconnect storm: {} in {convergence_s:.2} s, relay CPU {relay_cpu_s:.2} s, phones' CPU {device_cpu_s:.2} s",
        if all_converged {
            "converged"
        } else {
            "NOT converged"
        }
    ));
    let per = |cpu_s: f64, n: u64| if n > 0 { cpu_s * 1e6 / n as f64 } else { 0.0 };
    let mut result = FieldDayResult {
        seed: cfg.seed,
        devices: devices.len() as u64,
        docs: (teams.len() + zones.len()) as u64,
        changes,
        converged: all_converged,
        storm_connection_errors: storm_errors,
        convergence_s,
        relay_cpu_s,
        storage: if cfg.postgres.is_some() {
            "postgres"
        } else {
            "sled"
        }
        .into(),
        relays: relay.0.len() as u64,
        spread: if relay.0.len() > 1 {
            cfg.spread.name().into()
        } else {
            String::new()
        },
        database_cpu_s,
        relay_cpu_per_change_us: per(relay_cpu_s, changes),
        device_cpu_s,
        device_applied_changes,
        device_apply_per_change_us: per(device_cpu_s, device_applied_changes),
        whole_documents: 0,
        floor_cpu_s,
        phone_floor_bundle_cpu_s: phone_floor.bundle_s,
        phone_floor_whole_cpu_s: phone_floor.whole_s,
        phone_floor_cpu_s: phone_floor.least_s,
        convergence_floor_s: (floor_cpu_s + phone_floor.least_s)
            / std::thread::available_parallelism().map_or(2, |n| n.get()) as f64,
        cpu_ratio: if floor_cpu_s > 0.0 {
            relay_cpu_s / floor_cpu_s
        } else {
            0.0
        },
        wire_bytes,
        wire_frames,
        compressed_change_bytes,
        compressed_once_bytes,
        wire_ratio: if compressed_change_bytes > 0 {
            wire_bytes as f64 / compressed_change_bytes as f64
        } else {
            0.0
        },
        relay_peak_rss_bytes: 0,
        live_p50_ms: 0.0,
        live_p99_ms: 0.0,
        live_samples: 0,
        noop_reconnect_bytes: 0,
        noop_reconnect_round_trips: 0,
        local_write_p50_us: percentile(&write_us, 0.5),
        local_write_p99_us: percentile(&write_us, 0.99),
        apply_batches,
    };
    if !all_converged {
        // What did not converge is the finding: report it as measured, without the
        // checks that assume a converged day.
        result.relay_peak_rss_bytes = relay.peak_rss_bytes()?;
        result.whole_documents = relay.stop().await?;
        return Ok(result);
    }

    // ----- verification against the relay's copies ----------------------------------
    let auditor_dir = cfg.work_dir.join("auditor");
    let auditor_config = relay
        .for_device(ClientConfig::new(MemberId::new("auditor")?), 0, cfg.spread)
        .with_token(crate::token_for(
            &relay_dir,
            &auditor_dir,
            "auditor",
            Role::Operator,
            &[],
            &[],
        )?)
        .with_teams(teams.clone())
        .with_zones(zones.clone());
    let auditor = Client::open(auditor_dir, auditor_config)?;
    auditor.sync().await?;
    for d in &devices {
        for id in &d.docs {
            let (mine, relays) = (d.client.heads(id)?, auditor.heads(id)?);
            if mine != relays {
                bail!("{} differs from the relay on {id}", d.client.member());
            }
        }
        let team = &teams[d.team];
        if d.client.ledger(team, &day)? != auditor.ledger(team, &day)? {
            bail!("typed ledger views differ for {}", d.client.member());
        }
        for z in zones_of(d.team) {
            if d.client.households(&z)? != auditor.households(&z)? {
                bail!("typed households views differ for {}", d.client.member());
            }
        }
    }
    progress("verification: every device equals the relay");

    // ----- live latency --------------------------------------------------------------
    let (a, b) = (
        &devices[0].client,
        &devices[1.min(devices.len() - 1)].client,
    );
    let live_a = a.go_live()?;
    let mut live_b = b.go_live()?;
    let mut la = live_a;
    la.reports.recv().await.context("a live")??;
    live_b.reports.recv().await.context("b live")??;
    let mut seen = b.changes();
    let mut live_ms = Vec::new();
    let ledger = DocId::ledger(&teams[0], &day);
    for i in 0..cfg.live_samples {
        let want = b
            .day_totals(&teams[0], &day)?
            .get("live_probe")
            .copied()
            .unwrap_or(0)
            + 1;
        let t0 = Instant::now();
        a.add_to_tally(&teams[0], &day, "live_probe", 1)?;
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let doc = seen.recv().await?.doc;
                if doc == ledger
                    && b.day_totals(&teams[0], &day)
                        .ok()
                        .and_then(|t| t.get("live_probe").copied())
                        == Some(want)
                {
                    return anyhow::Ok(());
                }
            }
        })
        .await
        .with_context(|| format!("live sample {i} did not arrive"))??;
        live_ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    la.stop().await;
    live_b.stop().await;
    live_ms.sort_by(f64::total_cmp);

    // ----- no-op reconnect -----------------------------------------------------------
    let noop_dir = cfg.work_dir.join("noop");
    let noop_config = relay
        .for_device(ClientConfig::new(MemberId::new("noop")?), 0, cfg.spread)
        .with_token(crate::token_for(
            &relay_dir,
            &noop_dir,
            "noop",
            Role::Volunteer,
            &["noop-team"],
            &[],
        )?)
        .with_teams(vec![TeamId::new("noop-team")?])
        .with_keep_days(20_000);
    let noop = Client::open(noop_dir, noop_config)?;
    let first = time::Date::from_calendar_date(2025, time::Month::January, 1)?;
    for i in 0..cfg.noop_docs {
        let d = first + time::Duration::days(i as i64);
        noop.add_to_tally(
            &TeamId::new("noop-team")?,
            &Day::new(d.to_string())?,
            "samples_taken",
            1,
        )?;
    }
    noop.sync().await?;
    let again = noop.sync().await?;

    result.relay_peak_rss_bytes = relay.peak_rss_bytes()?;
    result.whole_documents = relay.stop().await?;
    result.live_p50_ms = percentile(&live_ms, 0.5);
    result.live_p99_ms = percentile(&live_ms, 0.99);
    result.live_samples = live_ms.len() as u64;
    result.noop_reconnect_bytes = again.bytes_sent + again.bytes_received;
    result.noop_reconnect_round_trips = u64::from(again.round_trips);
    Ok(result)
}

async fn sync_all(devices: &[Device]) -> anyhow::Result<()> {
    let mut all = tokio::task::JoinSet::new();
    for d in devices {
        let c = d.client.clone();
        all.spawn(async move { c.sync().await });
    }
    while let Some(r) = all.join_next().await {
        r??;
    }
    Ok(())
}

/// Whether every team's devices hold identical heads for every document they share.
/// Which documents of which teams still differ between phones, and where the phones
/// that differ sync (for a storm that does not converge).
fn divergence(devices: &[Device], teams: usize) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for t in 0..teams {
        let members: Vec<&Device> = devices.iter().filter(|d| d.team == t).collect();
        for id in &members[0].docs {
            let mut groups: Vec<(Vec<automerge::ChangeHash>, Vec<String>)> = Vec::new();
            for m in &members {
                let heads = m.client.heads(id)?;
                let relay = m
                    .client
                    .current_relay()
                    .map(|r| r.addr.port().to_string())
                    .unwrap_or_default();
                let who = format!("{}@{relay}", m.client.member());
                match groups.iter_mut().find(|(h, _)| *h == heads) {
                    Some((_, names)) => names.push(who),
                    None => groups.push((heads, vec![who])),
                }
            }
            if groups.len() > 1 {
                let parts: Vec<String> = groups
                    .iter()
                    .map(|(h, names)| format!("{} heads: {}", h.len(), names.join(" ")))
                    .collect();
                out.push(format!("{id}: {}", parts.join(" | ")));
                // What the phones outside the largest group lack or hold extra.
                let (biggest, _) = groups.iter().max_by_key(|(_, n)| n.len()).expect("groups");
                let holder = members
                    .iter()
                    .find(|m| m.client.heads(id).ok().as_ref() == Some(biggest))
                    .expect("a member holds them");
                let full = holder.client.document(id)?.context("held")?;
                for m in &members {
                    let heads = m.client.heads(id)?;
                    if &heads == biggest {
                        continue;
                    }
                    let mine = m.client.document(id)?.context("held")?;
                    let lacks = full.get_changes(&heads).len();
                    let extra = mine.get_changes(biggest).len();
                    let queued = mine.get_missing_deps(&[]).len();
                    out.push(format!(
                        "  {} lacks {lacks}, holds {extra} more, {queued} missing deps",
                        m.client.member()
                    ));
                }
            }
        }
    }
    Ok(out.join("; "))
}

/// Frames all devices sent and received so far.
fn frames_of(devices: &[Device]) -> u64 {
    devices
        .iter()
        .map(|d| {
            let (s, r) = d.client.frames();
            s + r
        })
        .sum()
}

fn converged(devices: &[Device], teams: usize) -> anyhow::Result<bool> {
    for t in 0..teams {
        let members: Vec<&Device> = devices.iter().filter(|d| d.team == t).collect();
        for id in &members[0].docs {
            let first = members[0].client.heads(id)?;
            for m in &members[1..] {
                if m.client.heads(id)? != first {
                    return Ok(false);
                }
            }
        }
    }
    Ok(true)
}

/// One offline write, chosen before its clock starts (choosing may read a view, as a
/// volunteer looks at a screen before tapping).
enum Write {
    Tally(&'static str, u32),
    Task(String, TaskStatus),
    Duty(bool),
    AddNeed(ZoneId, NewNeed),
    Need(ZoneId, String, NeedStatus),
}

/// One device's offline operations; returns each write's latency in microseconds: the
/// write call alone, from the tap to the change flushed on the device's disk.
fn offline_work(
    client: &Client,
    team: &TeamId,
    zones: &[ZoneId],
    day: &Day,
    ops: usize,
    seed: u64,
) -> anyhow::Result<Vec<f64>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut samples = Vec::with_capacity(ops);
    let tasks: Vec<String> = client
        .ledger(team, day)?
        .map(|v| v.tasks.into_iter().map(|t| t.id).collect())
        .unwrap_or_default();
    let metrics = [
        "samples_taken",
        "households_visited",
        "door_sensors_fitted",
        "deliveries",
    ];
    let mut on_duty = false;
    for _ in 0..ops {
        let roll = rng.random_range(0..100);
        let write = if roll < 40 {
            Write::Tally(metrics[rng.random_range(0..4)], rng.random_range(1..4))
        } else if roll < 60 && !tasks.is_empty() {
            let task = tasks[rng.random_range(0..tasks.len())].clone();
            let to = [
                TaskStatus::Assigned,
                TaskStatus::InProgress,
                TaskStatus::Done,
            ][rng.random_range(0..3)];
            Write::Task(task, to)
        } else if roll < 70 {
            on_duty = !on_duty;
            Write::Duty(on_duty)
        } else if !zones.is_empty() {
            let zone = zones[rng.random_range(0..zones.len())].clone();
            let book = client.households(&zone)?.context("zone book missing")?;
            let open: Vec<_> = book.needs.iter().filter(|n| n.is_open()).collect();
            if open.is_empty() || rng.random_range(0..3) == 0 {
                let h = &book.households[rng.random_range(0..book.households.len())];
                let priority = [
                    Priority::Routine,
                    Priority::Priority,
                    Priority::Urgent,
                    Priority::Emergency,
                ][rng.random_range(0..4)];
                let need = NewNeed {
                    household: h.id.clone(),
                    category: NeedCategory::Food,
                    detail: "rice and oil".into(),
                    priority,
                };
                Write::AddNeed(zone, need)
            } else {
                let n = open[rng.random_range(0..open.len())].id.clone();
                let to = [
                    NeedStatus::Assigned,
                    NeedStatus::InProgress,
                    NeedStatus::Fulfilled,
                ][rng.random_range(0..3)];
                Write::Need(zone, n, to)
            }
        } else {
            Write::Tally("deliveries", 1)
        };
        let t0 = Instant::now();
        match write {
            Write::Tally(metric, amount) => client.add_to_tally(team, day, metric, amount),
            Write::Task(task, to) => client
                .set_task_status(team, day, &task, to)
                .or_else(|_| client.add_to_tally(team, day, "samples_taken", 1)),
            Write::Duty(true) => client.check_in(team, day),
            Write::Duty(false) => client.check_out(team, day),
            Write::AddNeed(zone, need) => client.add_need(&zone, need).map(drop),
            Write::Need(zone, n, to) => client
                .set_need_status(&zone, &n, to)
                .or_else(|_| client.set_need_priority(&zone, &n, Priority::Urgent)),
        }?;
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok(samples)
}

/// Prints the result as a table, with the targets of issue 17 beside the figures.
pub fn table(r: &FieldDayResult) -> String {
    let mut lines = vec![
        ("seed", r.seed.to_string(), String::new()),
        ("devices", r.devices.to_string(), String::new()),
        ("documents", r.docs.to_string(), String::new()),
        ("changes", r.changes.to_string(), String::new()),
        (
            "converged",
            if r.converged { "yes" } else { "NO" }.to_string(),
            "every seed must".into(),
        ),
        (
            "convergence",
            format!("{:.2} s", r.convergence_s),
            "target < 10 s".into(),
        ),
        (
            "failed live connections",
            r.storm_connection_errors.to_string(),
            "each phone reconnects by itself".into(),
        ),
        (
            "relay CPU",
            format!("{:.2} s", r.relay_cpu_s),
            String::new(),
        ),
        (
            "storage",
            format!(
                "{} ({} relay{}{})",
                r.storage,
                r.relays,
                if r.relays == 1 { "" } else { "s" },
                if r.spread.is_empty() {
                    String::new()
                } else {
                    format!(", spread by {}", r.spread)
                }
            ),
            "relay CPU: all relays".into(),
        ),
        (
            "database CPU",
            format!("{:.2} s", r.database_cpu_s),
            "PostgreSQL's processes in the storm".into(),
        ),
        (
            "relay CPU per change",
            format!("{:.1} µs", r.relay_cpu_per_change_us),
            "target <= 30 µs".into(),
        ),
        (
            "floor CPU (Automerge, batched)",
            format!("{:.2} s", r.floor_cpu_s),
            String::new(),
        ),
        (
            "relay / floor",
            format!("{:.2}x", r.cpu_ratio),
            "target <= 1.5x".into(),
        ),
    ];
    for k in APPLY_BATCHES {
        if let Some(s) = r.apply_batches.get(&format!("apply_batch_{k}_s")) {
            lines.push((
                "floor in batches of",
                format!("{k}: {s:.2} s"),
                format!("{:.2}x the floor", s / r.floor_cpu_s.max(1e-9)),
            ));
        }
    }
    lines.extend([
        (
            "phones' sync CPU",
            format!("{:.2} s", r.device_cpu_s),
            format!("{} changes applied", r.device_applied_changes),
        ),
        (
            "phones' CPU per applied change",
            format!("{:.1} µs", r.device_apply_per_change_us),
            String::new(),
        ),
        (
            "phones' floor (Automerge)",
            format!("{:.2} s", r.phone_floor_cpu_s),
            format!(
                "one bundle each {:.2} s, whole documents {:.2} s",
                r.phone_floor_bundle_cpu_s, r.phone_floor_whole_cpu_s
            ),
        ),
        (
            "convergence floor",
            format!("{:.2} s", r.convergence_floor_s),
            "both floors over this machine's cores".into(),
        ),
        (
            "documents sent whole",
            r.whole_documents.to_string(),
            "catch-ups of a device lacking most of one".into(),
        ),
        ("bytes on the wire", r.wire_bytes.to_string(), String::new()),
        (
            "frames on the wire",
            r.wire_frames.to_string(),
            format!(
                "{:.0} B each",
                r.wire_bytes as f64 / r.wire_frames.max(1) as f64
            ),
        ),
        (
            "compressed changes, once",
            r.compressed_once_bytes.to_string(),
            String::new(),
        ),
        (
            "compressed, per delivery",
            r.compressed_change_bytes.to_string(),
            "each device: own up + lacked down".into(),
        ),
        (
            "wire / compressed",
            format!("{:.2}x", r.wire_ratio),
            "keep <= 1.2x".into(),
        ),
        (
            "relay peak RSS",
            format!("{:.1} MB", r.relay_peak_rss_bytes as f64 / 1e6),
            "keep <= 150 MB".into(),
        ),
        (
            "live p50 / p99",
            format!(
                "{:.1} / {:.1} ms ({} probes)",
                r.live_p50_ms, r.live_p99_ms, r.live_samples
            ),
            "target p99 <= 10 ms".into(),
        ),
        (
            "no-op reconnect",
            format!(
                "{} B, {} RT",
                r.noop_reconnect_bytes, r.noop_reconnect_round_trips
            ),
            "keep 1 RT".into(),
        ),
        (
            "local write p50 / p99",
            format!(
                "{:.0} / {:.0} µs",
                r.local_write_p50_us, r.local_write_p99_us
            ),
            "target <= 500 / 5,000 µs".into(),
        ),
    ]);
    let mut out = String::new();
    for (k, v, t) in lines {
        out.push_str(&format!("{k:<32}{v:>22}   {t}\n"));
    }
    out
}

/// The worst of several runs, figure by figure: the highest cost (time, CPU, bytes,
/// memory, latency, ratios), `converged` only if every run converged, the counts of the
/// first run. A JSON object with the same keys as one run, plus `seeds`.
pub fn worst(runs: &[FieldDayResult]) -> anyhow::Result<serde_json::Value> {
    let Some(first) = runs.first() else {
        bail!("no runs");
    };
    let mut out = serde_json::to_value(first)?;
    let obj = out.as_object_mut().context("a result is an object")?;
    let counts = [
        "seed",
        "devices",
        "docs",
        "changes",
        "device_applied_changes",
        "live_samples",
    ];
    for r in &runs[1..] {
        let v = serde_json::to_value(r)?;
        for (k, x) in v.as_object().context("a result is an object")? {
            if counts.contains(&k.as_str()) {
                continue;
            }
            let cur = obj.get(k).cloned();
            let worse = match (cur.as_ref(), x) {
                (Some(serde_json::Value::Bool(a)), serde_json::Value::Bool(b)) => {
                    serde_json::Value::Bool(*a && *b)
                }
                (Some(a), b) if a.as_f64().zip(b.as_f64()).is_some_and(|(a, b)| b > a) => b.clone(),
                (Some(a), _) => a.clone(),
                (None, b) => b.clone(),
            };
            obj.insert(k.clone(), worse);
        }
    }
    obj.remove("seed");
    obj.insert(
        "seeds".into(),
        serde_json::Value::Array(runs.iter().map(|r| r.seed.into()).collect()),
    );
    Ok(out)
}

/// Before and after, side by side: every number in either JSON result (written by
/// `fieldday --json`), with the ratio after/before, so a regression shows at a glance.
/// Keys only one side has are listed with a dash on the other.
pub fn compare(before: &serde_json::Value, after: &serde_json::Value) -> anyhow::Result<String> {
    use std::fmt::Write;
    let (Some(b), Some(a)) = (before.as_object(), after.as_object()) else {
        bail!("both files must hold one JSON object, as `fieldday --json` writes");
    };
    let mut keys: Vec<&String> = b.keys().chain(a.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&serde_json::Value>| match v {
        Some(serde_json::Value::Array(a)) => format!("[{} items]", a.len()),
        Some(serde_json::Value::Number(n)) => n
            .as_f64()
            .map_or_else(|| n.to_string(), |f| format!("{f:.3}")),
        Some(other) => other.to_string(),
        None => "-".into(),
    };
    let mut out = String::new();
    writeln!(
        out,
        "{:<28} {:>16} {:>16} {:>9}",
        "figure", "before", "after", "after/before"
    )?;
    for k in keys {
        let (x, y) = (b.get(k), a.get(k));
        let ratio = match (x.and_then(|v| v.as_f64()), y.and_then(|v| v.as_f64())) {
            (Some(x), Some(y)) if x != 0.0 => format!("{:.2}x", y / x),
            _ => String::new(),
        };
        writeln!(out, "{k:<28} {:>16} {:>16} {ratio:>9}", show(x), show(y))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn compare_lines_up_both_runs_and_their_ratio() {
        let before = serde_json::json!({"relay_cpu_s": 18.0, "converged": true, "devices": 208});
        let after = serde_json::json!({"relay_cpu_s": 4.5, "converged": true, "live_p99_ms": 9.0});
        let t = super::compare(&before, &after).unwrap();
        let line = |k: &str| t.lines().find(|l| l.starts_with(k)).unwrap().to_string();
        assert!(line("relay_cpu_s").ends_with("0.25x"), "{t}");
        assert!(line("devices").contains('-'), "{t}");
        assert!(line("live_p99_ms").contains("9.000"), "{t}");
        assert!(line("converged").contains("true"), "{t}");
        assert!(super::compare(&serde_json::json!([1]), &after).is_err());
    }

    #[test]
    fn the_worst_of_several_runs_takes_each_figure_at_its_worst() {
        let run = |seed: u64, s: f64, ok: bool, p99: f64| super::FieldDayResult {
            seed,
            devices: 208,
            docs: 33,
            changes: 62_400,
            converged: ok,
            storm_connection_errors: 0,
            convergence_s: s,
            relay_cpu_s: s / 2.0,
            relay_cpu_per_change_us: 1.0,
            device_cpu_s: 3.0,
            device_applied_changes: 900_000,
            device_apply_per_change_us: 3.3,
            whole_documents: 0,
            floor_cpu_s: 1.0,
            phone_floor_bundle_cpu_s: 3.0,
            phone_floor_whole_cpu_s: 2.0,
            phone_floor_cpu_s: 2.0,
            convergence_floor_s: 1.5,
            cpu_ratio: s / 2.0,
            wire_bytes: 10,
            wire_frames: 2,
            compressed_change_bytes: 9,
            compressed_once_bytes: 5,
            wire_ratio: 1.1,
            relay_peak_rss_bytes: 100,
            live_p50_ms: 5.0,
            live_p99_ms: p99,
            live_samples: 100,
            noop_reconnect_bytes: 354,
            noop_reconnect_round_trips: 1,
            local_write_p50_us: 400.0,
            local_write_p99_us: 4_000.0,
            storage: "sled".into(),
            relays: 1,
            spread: String::new(),
            database_cpu_s: 0.0,
            apply_batches: Default::default(),
        };
        let w = super::worst(&[run(1, 8.0, true, 9.0), run(2, 12.0, false, 7.0)]).unwrap();
        assert_eq!(w["convergence_s"], 12.0);
        assert_eq!(w["live_p99_ms"], 9.0);
        assert_eq!(w["converged"], false);
        assert_eq!(w["changes"], 62_400);
        assert_eq!(w["seeds"], serde_json::json!([1, 2]));
    }
}
