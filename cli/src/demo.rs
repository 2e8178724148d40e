//! `redline demo`: a relay and simulated teams of phones on loopback.
//!
//! Phases: every phone starts its team's ledger for today and works offline (check-in,
//! tasks, tally increments, check-out); then all phones reconnect at once and sync; a
//! second round brings each phone what the others sent; finally every phone's ledger is
//! compared with the relay's, heads and typed view, and the tallies with what the phones
//! actually counted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redline_client::{Client, ClientConfig, NewTask, RelayEndpoint, SyncReport, TaskKind};
use redline_proto::token::Role;
use redline_proto::{Day, DeviceId, DocId, MemberId, TeamId};
use redline_server::{Relay, RelayConfig};

/// Options of `redline demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Keep the relay's and phones' data here (default: a temporary directory, removed
    /// at the end).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Number of teams.
    #[arg(long, default_value_t = 3)]
    teams: usize,
    /// Phones per team.
    #[arg(long, default_value_t = 4)]
    phones: usize,
    /// Offline operations per phone (tasks and tally increments).
    #[arg(long, default_value_t = 25)]
    ops: usize,
    /// Seed of the simulated work, to replay a run.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

const METRICS: [&str; 4] = [
    "samples_taken",
    "households_visited",
    "door_sensors_fitted",
    "deliveries",
];
const KINDS: [TaskKind; 5] = [
    TaskKind::Transfer,
    TaskKind::Screening,
    TaskKind::Supply,
    TaskKind::FlowTracing,
    TaskKind::Inspection,
];

struct Phone {
    name: String,
    team: usize,
    client: Client,
}

#[derive(Default)]
struct Totals {
    syncs: usize,
    changes: u64,
    bytes: u64,
}

impl Totals {
    fn add(&mut self, r: &SyncReport) {
        self.syncs += 1;
        self.changes += r.changes_sent;
        self.bytes += r.bytes_sent + r.bytes_received;
    }
}

/// Runs the demo; the exit code says whether everything converged.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.teams >= 1 && args.phones >= 1,
        "--teams and --phones must be at least 1"
    );
    let (root, _temp) = match &args.data_dir {
        Some(d) => (d.clone(), None),
        None => crate::temp_data_dir()?,
    };
    let day = Day::new(time::OffsetDateTime::now_utc().date().to_string())?;
    let devices = args.teams * args.phones;
    println!(
        "Redline demo: {} teams x {} phones, {} offline operations each, day {day}",
        args.teams, args.phones, args.ops
    );
    println!("data in {}", root.display());

    let relay_config = RelayConfig::new(root.join("relay"))
        .with_listen(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let relay = Relay::start(relay_config)
        .await
        .context("starting the relay")?;
    println!(
        "relay on udp {} (certificate sha256 {})",
        relay.local_addr(),
        &relay.fingerprint()[..16]
    );
    let endpoint = RelayEndpoint::new(relay.local_addr(), relay.fingerprint());

    let teams: Vec<TeamId> = (1..=args.teams)
        .map(|t| TeamId::new(format!("team-{t}")))
        .collect::<Result<_, _>>()?;
    let mut phones = Vec::with_capacity(devices);
    for (t, team) in teams.iter().enumerate() {
        for p in 1..=args.phones {
            let name = format!("{team}-phone-{p}");
            let member = MemberId::new(format!("{team}-member-{p}"))?;
            // Each phone gets a token from the relay's operator, scoped to its team.
            let (_, token) = redline_server::auth::issue(
                relay.data_dir(),
                redline_server::auth::TokenRequest {
                    device: DeviceId::new(&name)?,
                    member: member.clone(),
                    role: if p == 1 { Role::Lead } else { Role::Volunteer },
                    teams: vec![team.clone()],
                    zones: Vec::new(),
                    ttl: std::time::Duration::from_secs(30 * 86_400),
                },
            )?;
            let config = ClientConfig::new(member)
                .with_relay(endpoint.clone())
                .with_token(token)
                .with_teams(vec![team.clone()]);
            let client = Client::open(root.join("phones").join(&name), config)
                .with_context(|| format!("opening {name}"))?;
            phones.push(Phone {
                name,
                team: t,
                client,
            });
        }
    }

    // Offline work.
    print!("offline work ... ");
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut expected: Vec<BTreeMap<&str, i64>> = vec![BTreeMap::new(); teams.len()];
    let mut local_changes = 0u64;
    for phone in &phones {
        let team = &teams[phone.team];
        phone.client.check_in(team, &day)?;
        for i in 0..args.ops {
            if rng.random_range(0..4) == 0 {
                let kind = KINDS[rng.random_range(0..KINDS.len())];
                let title = format!("{} #{i} by {}", kind.as_str(), phone.name);
                phone
                    .client
                    .add_task(team, &day, NewTask::new(kind, title))?;
            } else {
                let metric = METRICS[rng.random_range(0..METRICS.len())];
                let amount = rng.random_range(1..=5u32);
                phone.client.add_to_tally(team, &day, metric, amount)?;
                *expected[phone.team].entry(metric).or_default() += i64::from(amount);
            }
        }
        phone.client.check_out(team, &day)?;
        local_changes += args.ops as u64 + 2;
    }
    println!(
        "{local_changes} changes on {devices} phones in {:.2?}",
        started.elapsed()
    );

    // Reconnect storm, then a second round to fetch what the others sent.
    let storm = Instant::now();
    let mut totals = Totals::default();
    for round in 1..=2 {
        let reports = sync_all(&phones, round).await?;
        for r in &reports {
            totals.add(r);
        }
    }
    let wall = storm.elapsed();

    // Verification.
    let mut converged = true;
    for (t, team) in teams.iter().enumerate() {
        let id = DocId::ledger(team, &day);
        let relay_heads = relay.heads(&id).await?;
        let mut views = Vec::new();
        for phone in phones.iter().filter(|p| p.team == t) {
            if phone.client.heads(&id)? != relay_heads {
                println!("  {} differs from the relay", phone.name);
                converged = false;
            }
            views.push(
                phone
                    .client
                    .ledger(team, &day)?
                    .context("ledger missing on a phone")?,
            );
        }
        if views.windows(2).any(|w| w[0] != w[1]) {
            println!("  {team}: typed views differ between phones");
            converged = false;
        }
        let totals_seen: BTreeMap<&str, i64> = views[0]
            .tallies
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        let want: BTreeMap<&str, i64> = expected[t].clone();
        if totals_seen != want {
            println!("  {team}: tallies {totals_seen:?}, phones counted {want:?}");
            converged = false;
        }
    }

    // One team's day.
    let team = &teams[0];
    if let Some(view) = phones[0].client.ledger(team, &day)? {
        println!();
        println!(
            "{team}, {day}: {} tasks, {} duty entries",
            view.tasks.len(),
            view.duty.len()
        );
        for (metric, total) in &view.tallies {
            println!("  {metric:<22}{total:>6}");
        }
    }

    println!();
    let rows = [
        ("devices", devices.to_string()),
        ("documents", teams.len().to_string()),
        ("changes made offline", local_changes.to_string()),
        ("changes stored by relay", totals.changes.to_string()),
        ("syncs", totals.syncs.to_string()),
        ("reconnect wall time", format!("{:.2?}", wall)),
        ("bytes on the wire", totals.bytes.to_string()),
        (
            "converged",
            if converged { "yes".into() } else { "NO".into() },
        ),
    ];
    println!("+--------------------------+--------------+");
    for (k, v) in rows {
        println!("| {k:<24} | {v:>12} |");
    }
    println!("+--------------------------+--------------+");
    println!("(the relay also stores each ledger's one shared first change)");
    relay.shutdown().await?;
    if args.data_dir.is_some() {
        println!("data kept in {}", root.display());
    }
    Ok(if converged {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Syncs every phone at once, printing each as it finishes.
async fn sync_all(phones: &[Phone], round: usize) -> anyhow::Result<Vec<SyncReport>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, phone) in phones.iter().enumerate() {
        let client = phone.client.clone();
        tasks.spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(60), client.sync()).await;
            (i, r)
        });
    }
    let mut reports = Vec::with_capacity(phones.len());
    let mut done = 0;
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined?;
        let report = result
            .map_err(|_| anyhow::anyhow!("{} did not finish syncing in 60 s", phones[i].name))?
            .with_context(|| format!("{} failed to sync", phones[i].name))?;
        done += 1;
        println!(
            "round {round} [{done:>3}/{}] {:<22} sent {:>4} changes, received {:>4}, {:>7} bytes, {:.1?}",
            phones.len(),
            phones[i].name,
            report.changes_sent,
            report.changes_received,
            report.bytes_sent + report.bytes_received,
            report.duration
        );
        reports.push(report);
    }
    Ok(reports)
}
