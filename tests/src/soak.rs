//! The soak run: many devices syncing in a loop against a relay child process for a
//! bounded time, writing as they go. Reports the relay's memory at the start and end,
//! errors by kind, and whether everything converged. `cargo run --release -p
//! redline-tests --bin soak -- --devices 200 --seconds 600` is the long version; the CI
//! test runs 30 seconds.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redline_client::{Client, ClientConfig, RelayEndpoint};
use redline_proto::token::Role;
use redline_proto::{DocId, MemberId, TeamId};

use crate::faults::RelayProcess;

/// What a soak run saw.
#[derive(Debug, Default, serde::Serialize)]
pub struct SoakReport {
    /// Devices.
    pub devices: usize,
    /// Wall time of the loop.
    pub seconds: f64,
    /// Syncs completed.
    pub syncs: u64,
    /// Local writes made.
    pub writes: u64,
    /// Sync errors by kind (none expected).
    pub errors: BTreeMap<String, u64>,
    /// Connections replaced within a sync because the relay left the hello unanswered.
    pub reconnects: u64,
    /// Datagrams the kernel dropped at the relay's socket (`None`: not Linux).
    pub udp_drops: Option<u64>,
    /// Each failed sync: which device, when, how long it ran, the whole error.
    pub failures: Vec<Failure>,
    /// Relay resident memory after the first round, KiB.
    pub rss_start_kib: u64,
    /// Relay resident memory at the end, KiB.
    pub rss_end_kib: u64,
    /// Relay peak resident memory, KiB.
    pub rss_peak_kib: u64,
    /// Relay resident memory every 10 s of the loop: (seconds, KiB).
    pub rss_samples: Vec<(u64, u64)>,
    /// Every device ended with the relay's heads and the right totals.
    pub converged: bool,
}

/// One failed sync of a soak.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    /// The device's index.
    pub device: usize,
    /// When the sync ended, seconds into the loop.
    pub at_s: f64,
    /// How long the sync ran before it failed.
    pub took_s: f64,
    /// The error (or `timeout`).
    pub error: String,
}

fn rss_kib(status: &Path) -> Option<u64> {
    std::fs::read_to_string(status)
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs `devices` devices (16 per team) against a relay in `dir` for `duration`.
pub async fn run(dir: &Path, devices: usize, duration: Duration) -> anyhow::Result<SoakReport> {
    let relay_dir = dir.join("relay");
    let relay = RelayProcess::start_with_http(&relay_dir)?;
    let endpoint = RelayEndpoint::new(relay.addr, &relay.fingerprint);
    let day = crate::today();
    let mut clients = Vec::new();
    for d in 0..devices {
        let team = format!("team-{}", d / 16 + 1);
        let store = dir.join("devices").join(format!("d{d}"));
        let token = crate::token_for(
            &relay_dir,
            &store,
            &format!("m{d}"),
            Role::Volunteer,
            &[&team],
            &[],
        )?;
        let config = ClientConfig::new(MemberId::new(format!("m{d}"))?)
            .with_relay(endpoint.clone())
            .with_token(token)
            .with_teams(vec![TeamId::new(&team)?]);
        clients.push((TeamId::new(&team)?, Client::open(&store, config)?));
    }
    let mut report = SoakReport {
        devices,
        ..SoakReport::default()
    };
    // First round: everyone connects once; the memory baseline is taken after it.
    for (team, c) in &clients {
        c.add_to_tally(team, &day, "soak", 1)?;
    }
    let first: Vec<_> = clients
        .iter()
        .map(|(_, c)| {
            let c = c.clone();
            tokio::spawn(async move { c.sync().await })
        })
        .collect();
    for f in first {
        f.await??;
    }
    report.writes = devices as u64;
    report.rss_start_kib = relay.memory_kib().map(|m| m.1).unwrap_or(0);

    let syncs = Arc::new(AtomicU64::new(0));
    let writes = Arc::new(AtomicU64::new(0));
    let reconnects = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<Failure>::new()));
    let started = Instant::now();
    let deadline = started + duration;
    let relay_pid_status = relay.status_path();
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(10)).await;
            if let Some(kib) = rss_kib(&relay_pid_status) {
                samples.push((started.elapsed().as_secs(), kib));
            }
        }
        samples
    });
    let mut loops = tokio::task::JoinSet::new();
    for (device, (team, c)) in clients.clone().into_iter().enumerate() {
        let (syncs, writes, errors, day, reconnects) = (
            syncs.clone(),
            writes.clone(),
            errors.clone(),
            day.clone(),
            reconnects.clone(),
        );
        loops.spawn(async move {
            while Instant::now() < deadline {
                if c.add_to_tally(&team, &day, "soak", 1).is_ok() {
                    writes.fetch_add(1, Ordering::Relaxed);
                }
                let began = Instant::now();
                match tokio::time::timeout(Duration::from_secs(30), c.sync()).await {
                    Ok(Ok(r)) if r.refused.is_empty() => {
                        syncs.fetch_add(1, Ordering::Relaxed);
                        reconnects.fetch_add(u64::from(r.reconnects), Ordering::Relaxed);
                    }
                    other => {
                        let error = match other {
                            Ok(Ok(r)) => format!("refused: {:?}", r.refused),
                            Ok(Err(e)) => e.to_string(),
                            Err(_) => "timeout".to_string(),
                        };
                        errors.lock().expect("errors lock").push(Failure {
                            device,
                            at_s: started.elapsed().as_secs_f64(),
                            took_s: began.elapsed().as_secs_f64(),
                            error,
                        });
                    }
                }
                tokio::time::sleep(Duration::from_millis(rand::random_range(50..250))).await;
            }
        });
    }
    while loops.join_next().await.is_some() {}
    report.rss_samples = sampler.await.unwrap_or_default();
    report.seconds = started.elapsed().as_secs_f64();
    report.syncs = syncs.load(Ordering::Relaxed);
    report.writes += writes.load(Ordering::Relaxed);
    report.reconnects = reconnects.load(Ordering::Relaxed);
    report.failures = errors.lock().expect("errors lock").clone();
    for failure in &report.failures {
        let kind = if failure.error.starts_with("refused") {
            "refused".to_string()
        } else {
            failure.error.chars().take(60).collect()
        };
        *report.errors.entry(kind).or_default() += 1;
    }
    report.udp_drops = relay
        .metric("redline_udp_receive_drops_total")
        .ok()
        .map(|d| d as u64);
    if let Some((peak, now)) = relay.memory_kib() {
        report.rss_peak_kib = peak;
        report.rss_end_kib = now;
    }

    // Settle: two quiet rounds, then every device must match the relay.
    for _ in 0..2 {
        for (_, c) in &clients {
            c.sync().await?;
        }
    }
    let mut converged = true;
    let mut per_team: BTreeMap<String, Vec<&Client>> = BTreeMap::new();
    for (team, c) in &clients {
        per_team.entry(team.to_string()).or_default().push(c);
    }
    for (team, members) in &per_team {
        let team = TeamId::new(team)?;
        let id = DocId::ledger(&team, &day);
        let heads = members[0].heads(&id)?;
        let total = members[0]
            .day_totals(&team, &day)?
            .get("soak")
            .copied()
            .unwrap_or(0);
        converged &= members
            .iter()
            .all(|c| c.heads(&id).map(|h| h == heads).unwrap_or(false));
        let _ = total;
    }
    let grand: i64 = per_team
        .iter()
        .map(|(team, members)| {
            members[0]
                .day_totals(&TeamId::new(team).expect("valid"), &day)
                .ok()
                .and_then(|t| t.get("soak").copied())
                .unwrap_or(0)
        })
        .sum();
    converged &= grand as u64 == report.writes;
    report.converged = converged;
    Ok(report)
}
