//! Steady load, the shape of most of a field day (not the reconnect storm): N phones live
//! on one relay, each writing a tally every few seconds. Reports the relay's CPU as a
//! share of one core, live latency under that load (one phone per team writes a probe, a
//! teammate sees it), relay peak memory and bytes per phone per minute.
//! `cargo run --release -p redline-tests --bin fieldday -- --steady --help`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redline_client::{Client, ClientConfig, RelayEndpoint};
use redline_proto::token::Role;
use redline_proto::{Day, DocId, MemberId, TeamId};
use serde::Serialize;

use crate::fieldday::RelayChild;

/// Sizes of a steady-load run.
#[derive(Clone, Debug)]
pub struct SteadyConfig {
    /// Phones live at once.
    pub phones: usize,
    /// Phones per team (each team shares one ledger day).
    pub devices_per_team: usize,
    /// How long the measured window lasts.
    pub seconds: u64,
    /// Each phone writes once per this interval.
    pub every: Duration,
    /// Seed of the write schedule.
    pub seed: u64,
    /// The executable that serves the relay with `--serve-relay DIR`.
    pub relay_exe: PathBuf,
    /// Where the relay's and phones' data go.
    pub work_dir: PathBuf,
}

/// What a steady-load run measured. Field names are the JSON keys.
#[derive(Clone, Debug, Serialize)]
pub struct SteadyResult {
    pub phones: u64,
    pub seconds: f64,
    pub writes: u64,
    /// Relay CPU over the window divided by its wall time (1.0 = one core busy).
    pub relay_cpu_share: f64,
    pub live_p50_ms: f64,
    pub live_p99_ms: f64,
    pub live_samples: u64,
    pub relay_peak_rss_bytes: u64,
    pub bytes_per_phone_per_minute: f64,
    /// Live connections that failed (each phone reconnects by itself).
    pub failed_live_connections: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Probe writes of one team: when each was made, and how many were seen.
#[derive(Default)]
struct Probes {
    made: Vec<Instant>,
    latencies_ms: Vec<f64>,
}

/// Runs the steady load (see the module docs).
pub async fn run(cfg: &SteadyConfig, progress: impl Fn(&str)) -> anyhow::Result<SteadyResult> {
    anyhow::ensure!(cfg.phones >= 2, "a steady run needs at least 2 phones");
    let relay_dir = cfg.work_dir.join("relay");
    let relay = RelayChild::start(&cfg.relay_exe, &relay_dir, None).await?;
    let endpoint = RelayEndpoint::new(relay.addr, relay.fingerprint.clone());
    let day = Day::new(time::OffsetDateTime::now_utc().date().to_string())?;
    let per_team = cfg.devices_per_team.max(2);
    let teams = cfg.phones.div_ceil(per_team);

    let started = Instant::now();
    let mut phones: Vec<(usize, Client)> = Vec::new();
    for i in 0..cfg.phones {
        let t = i / per_team;
        let team = TeamId::new(format!("team-{t}"))?;
        let member = format!("{team}-m{}", i % per_team);
        let dir = cfg.work_dir.join("phones").join(&member);
        let role = if i % per_team == 0 {
            Role::Lead
        } else {
            Role::Volunteer
        };
        let token = crate::token_for(&relay_dir, &dir, &member, role, &[team.as_str()], &[])?;
        let config = ClientConfig::new(MemberId::new(member)?)
            .with_relay(endpoint.clone())
            .with_token(token)
            .with_teams(vec![team]);
        phones.push((t, Client::open(dir, config)?));
    }
    // Each team's day exists before the window (its lead starts it).
    for (i, (t, c)) in phones.iter().enumerate() {
        if i % per_team == 0 {
            c.check_in(&TeamId::new(format!("team-{t}"))?, &day)?;
            c.sync().await?;
        }
    }
    let mut lives = Vec::new();
    for (_, c) in &phones {
        lives.push(c.go_live()?);
    }
    let mut failed = 0u64;
    for l in lives.iter_mut() {
        // Each phone's first flight, failures included (it reconnects by itself).
        loop {
            match tokio::time::timeout(Duration::from_secs(120), l.reports.recv()).await {
                Ok(Some(Ok(_))) => break,
                Ok(Some(Err(_))) => failed += 1,
                Ok(None) => anyhow::bail!("a live session ended before its first flight"),
                Err(_) => anyhow::bail!("a phone did not go live within 120 s"),
            }
        }
    }
    progress(&format!(
        "{} phones in {teams} teams live in {:.1?}",
        phones.len(),
        started.elapsed()
    ));

    // Observers: the second phone of each team watches for its lead's probes.
    let probes: Vec<Arc<Mutex<Probes>>> = (0..teams).map(|_| Default::default()).collect();
    let mut observers = tokio::task::JoinSet::new();
    for t in 0..teams {
        let Some((_, observer)) = phones.get(t * per_team + 1) else {
            continue;
        };
        let (observer, probes, day) = (observer.clone(), probes[t].clone(), day.clone());
        let team = TeamId::new(format!("team-{t}"))?;
        let ledger = DocId::ledger(&team, &day);
        let mut changes = observer.changes();
        observers.spawn(async move {
            let mut seen = 0usize;
            while let Ok(change) = changes.recv().await {
                if change.doc != ledger {
                    continue;
                }
                let total = observer
                    .day_totals(&team, &day)
                    .ok()
                    .and_then(|t| t.get("probe").copied())
                    .unwrap_or(0) as usize;
                let now = Instant::now();
                let mut p = probes.lock().expect("probes lock");
                while seen < total && seen < p.made.len() {
                    let ms = now.duration_since(p.made[seen]).as_secs_f64() * 1e3;
                    p.latencies_ms.push(ms);
                    seen += 1;
                }
            }
        });
    }

    // The window: every phone writes once per `every`, at a seeded offset.
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let every_ms = cfg.every.as_millis().max(1) as u64;
    let mut next: Vec<Duration> = (0..phones.len())
        .map(|_| Duration::from_millis(rng.random_range(0..every_ms)))
        .collect();
    let cpu_before = relay.cpu_seconds()?;
    let traffic = |phones: &[(usize, Client)]| -> u64 {
        phones
            .iter()
            .map(|(_, c)| {
                let (s, r) = c.traffic();
                s + r
            })
            .sum()
    };
    let bytes_before = traffic(&phones);
    let window = Duration::from_secs(cfg.seconds);
    let t0 = Instant::now();
    let mut writes = 0u64;
    let mut reports_failed = 0u64;
    let mut writing = tokio::task::JoinSet::new();
    while t0.elapsed() < window {
        let now = t0.elapsed();
        for (i, (t, c)) in phones.iter().enumerate() {
            if next[i] > now {
                continue;
            }
            next[i] += cfg.every;
            let team = TeamId::new(format!("team-{t}"))?;
            let (c, day) = (c.clone(), day.clone());
            // Writes block on the store's flush: off the async workers, as an app does.
            if i % per_team == 0 {
                let probes = probes[*t].clone();
                writing.spawn_blocking(move || {
                    probes
                        .lock()
                        .expect("probes lock")
                        .made
                        .push(Instant::now());
                    c.add_to_tally(&team, &day, "probe", 1)
                });
            } else {
                writing.spawn_blocking(move || c.add_to_tally(&team, &day, "deliveries", 1));
            }
            writes += 1;
        }
        while let Some(done) = writing.try_join_next() {
            done?.context("a phone's write failed")?;
        }
        for l in lives.iter_mut() {
            while let Ok(r) = l.reports.try_recv() {
                if r.is_err() {
                    reports_failed += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let wall = t0.elapsed();
    let relay_cpu = relay.cpu_seconds()? - cpu_before;
    while let Some(done) = writing.join_next().await {
        done?.context("a phone's write failed")?;
    }
    let bytes = traffic(&phones) - bytes_before;
    // The last probes may still be on their way.
    tokio::time::sleep(Duration::from_secs(2)).await;
    observers.abort_all();
    for l in lives {
        l.stop().await;
    }
    let relay_peak_rss_bytes = relay.peak_rss_bytes()?;
    relay.stop().await?;
    let mut live: Vec<f64> = probes
        .iter()
        .flat_map(|p| p.lock().expect("probes lock").latencies_ms.clone())
        .collect();
    live.sort_by(f64::total_cmp);
    let made: usize = probes
        .iter()
        .map(|p| p.lock().expect("probes lock").made.len())
        .sum();
    progress(&format!(
        "window: {writes} writes in {wall:.1?}; {} of {made} probes seen by a teammate",
        live.len()
    ));
    let minutes = wall.as_secs_f64() / 60.0;
    Ok(SteadyResult {
        phones: phones.len() as u64,
        seconds: wall.as_secs_f64(),
        writes,
        relay_cpu_share: relay_cpu / wall.as_secs_f64(),
        live_p50_ms: percentile(&live, 0.5),
        live_p99_ms: percentile(&live, 0.99),
        live_samples: live.len() as u64,
        relay_peak_rss_bytes,
        bytes_per_phone_per_minute: bytes as f64 / phones.len() as f64 / minutes.max(1e-9),
        failed_live_connections: failed + reports_failed,
    })
}

/// Prints a steady-load result as a table, with issue 17's targets.
pub fn table(r: &SteadyResult) -> String {
    let lines: [(&str, String, &str); 8] = [
        ("phones", r.phones.to_string(), ""),
        (
            "window",
            format!("{:.1} s, {} writes", r.seconds, r.writes),
            "",
        ),
        (
            "relay CPU (share of one core)",
            format!("{:.1} %", r.relay_cpu_share * 100.0),
            "target <= 10 % at 500 phones",
        ),
        (
            "live p50 / p99 under load",
            format!("{:.1} / {:.1} ms", r.live_p50_ms, r.live_p99_ms),
            "target p99 <= 20 ms at 500 phones",
        ),
        ("live samples", r.live_samples.to_string(), ""),
        (
            "relay peak RSS",
            format!("{:.1} MB", r.relay_peak_rss_bytes as f64 / 1e6),
            "",
        ),
        (
            "bytes per phone per minute",
            format!("{:.0}", r.bytes_per_phone_per_minute),
            "",
        ),
        (
            "failed live connections",
            r.failed_live_connections.to_string(),
            "each phone reconnects by itself",
        ),
    ];
    let mut out = String::new();
    for (k, v, t) in lines {
        out.push_str(&format!("{k:<32}{v:>24}   {t}\n"));
    }
    out
}
