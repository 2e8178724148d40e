//! `redline demo`: a relay and simulated teams of phones on loopback.
//!
//! Phases: each team's lead sets up the day (a briefing task, the zone's households and
//! their needs) and everyone syncs; then every phone works offline (check-in, tasks,
//! tally increments, check-out), and two phones of the first team retitle the briefing
//! differently (a conflict for the lead); all phones reconnect at once; a second round
//! brings each phone what the others sent. Every phone's ledger is compared with the
//! relay's (heads and typed view) and the tallies with what the phones counted. The demo
//! ends with the first team's reconciled day and the most urgent open needs, as the
//! `redline` commands show them, and (with --data-dir) a lead profile to explore with.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redline_client::{
    Client, ClientConfig, NeedCategory, NewHousehold, NewNeed, NewTask, Priority, RelayEndpoint,
    SyncReport, TaskKind, TaskUpdate,
};
use redline_proto::token::Role;
use redline_proto::{Day, DeviceId, DocId, MemberId, TeamId, ZoneId};
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

const NEEDS: [(NeedCategory, &str); 5] = [
    (NeedCategory::Medicine, "insulin, 2 pens"),
    (NeedCategory::Food, "rice and oil for a week"),
    (NeedCategory::Garbage, "bags piling up at the door"),
    (NeedCategory::MedicalTransport, "dialysis at 14:00"),
    (NeedCategory::Water, "drinking water, 20 l"),
];

/// The zone team `t` covers.
fn zone_of(t: usize) -> anyhow::Result<ZoneId> {
    Ok(ZoneId::new(format!("zone-{}", t + 1))?)
}

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

    let mut relay_config = RelayConfig::new(root.join("relay"))
        .with_listen(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    relay_config.http_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let relay = Relay::start(relay_config)
        .await
        .context("starting the relay")?;
    println!(
        "relay on udp {} (certificate sha256 {}…), metrics on http://{}/metrics",
        relay.local_addr(),
        &relay.fingerprint()[..16],
        relay.http_addr().map(|a| a.to_string()).unwrap_or_default()
    );
    let endpoint = RelayEndpoint::new(relay.local_addr(), relay.fingerprint());
    let relay_pin = relay.fingerprint();

    let teams: Vec<TeamId> = (1..=args.teams)
        .map(|t| TeamId::new(format!("team-{t}")))
        .collect::<Result<_, _>>()?;
    let mut phones = Vec::with_capacity(devices);
    let mut lead_token = None;
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
                    zones: vec![zone_of(t)?],
                    ttl: std::time::Duration::from_secs(30 * 86_400),
                },
            )?;
            if p == 1 && t == 0 {
                lead_token = Some((name.clone(), token.clone()));
            }
            let config = ClientConfig::new(member)
                .with_relay(endpoint.clone())
                .with_token(token)
                .with_teams(vec![team.clone()])
                .with_zones(vec![zone_of(t)?]);
            let client = Client::open(root.join("phones").join(&name), config)
                .with_context(|| format!("opening {name}"))?;
            phones.push(Phone {
                name,
                team: t,
                client,
            });
        }
    }

    // The leads set up the day; everyone gets it.
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut briefing = None;
    for phone in phones.iter().filter(|p| p.name.ends_with("-phone-1")) {
        let team = &teams[phone.team];
        let id = phone.client.add_task(
            team,
            &day,
            NewTask::new(TaskKind::Other, "Morning briefing"),
        )?;
        if phone.team == 0 {
            briefing = Some(id);
        }
        let zone = zone_of(phone.team)?;
        for h in 1..=4 {
            let household = phone.client.add_household(
                &zone,
                NewHousehold {
                    address: format!("{zone}, block {h}"),
                    residents: rng.random_range(1..6),
                    contact: None,
                    flags: Vec::new(),
                },
            )?;
            let (category, detail) = NEEDS[rng.random_range(0..NEEDS.len())];
            let priority = Priority::ALL[rng.random_range(0..Priority::ALL.len())];
            phone.client.add_need(
                &zone,
                NewNeed {
                    household,
                    category,
                    detail: detail.into(),
                    priority,
                },
            )?;
        }
    }
    // Twice: phones syncing at the same moment as their lead get the set-up next round.
    sync_all(&phones, "set-up").await?;
    sync_all(&phones, "set-up").await?;

    // Offline work.
    print!("offline work ... ");
    let started = Instant::now();
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
    // Two phones of the first team retitle the briefing, each offline: a conflict.
    if let Some(task) = &briefing {
        for (phone, title) in phones.iter().filter(|p| p.team == 0).take(2).zip([
            "Morning briefing at the depot",
            "Morning briefing at block 4",
        ]) {
            let update = TaskUpdate {
                title: Some(title.into()),
                ..TaskUpdate::default()
            };
            phone.client.update_task(&teams[0], &day, task, update)?;
            local_changes += 1;
        }
    }
    println!(
        "{local_changes} changes on {devices} phones in {:.2?}",
        started.elapsed()
    );

    // Reconnect storm, then a second round to fetch what the others sent.
    let storm = Instant::now();
    let mut totals = Totals::default();
    for round in ["reconnect", "catch-up"] {
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

    // The first team's lead reconciles the day; the most urgent needs.
    let lead = &phones[0].client;
    println!();
    println!(
        "== what the lead of {} sees (`redline reconcile`) ==",
        teams[0]
    );
    crate::lead::reconcile(lead, teams[0].as_str(), Some(day.to_string()), Vec::new()).await?;
    println!();
    println!("== most urgent open needs (`redline needs --urgent`) ==");
    crate::lead::needs(lead, true, None)?;

    let documents = relay.documents().await?.len();
    println!();
    let rows = [
        ("devices", devices.to_string()),
        ("documents", documents.to_string()),
        ("changes made offline", local_changes.to_string()),
        ("changes sent to the relay", totals.changes.to_string()),
        ("syncs", totals.syncs.to_string()),
        ("reconnect wall time", format!("{:.2?}", wall)),
        ("bytes on the wire", totals.bytes.to_string()),
        (
            "converged",
            if converged { "yes".into() } else { "NO".into() },
        ),
    ];
    let mut summary = crate::lead::table(&["field day", ""]);
    for (k, v) in rows {
        summary.add_row(vec![k.to_string(), v]);
    }
    println!("{summary}");
    relay.shutdown().await?;
    if args.data_dir.is_some() {
        println!("data kept in {}", root.display());
        if let Some((name, token)) = lead_token {
            let profile = crate::profile::Profile {
                relay: "127.0.0.1:7447".into(),
                pin: relay_pin.clone(),
                token,
                org: None,
                teams: vec![teams[0].to_string()],
                zones: vec![zone_of(0)?.to_string()],
                keep_days: 14,
                store: root.join("phones").join(&name),
            };
            let path = root.join("lead.toml");
            profile.save(&path)?;
            println!("explore it as the lead of {}:", teams[0]);
            println!("  export REDLINE_CONFIG={}", path.display());
            println!("  redline ledger show --team {} --date {day}", teams[0]);
            println!("  redline reconcile --team {} --date {day}", teams[0]);
            println!("  redline console      # the lead's web page (works offline)");
            println!("  redline needs --urgent");
            println!(
                "  redline export --doc ledger/{}/{day} --format csv",
                teams[0]
            );
            println!(
                "to sync as well, start the relay: redline-server serve --data-dir {}",
                root.join("relay").display()
            );
        }
    }
    Ok(if converged {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Syncs every phone at once, printing each as it finishes.
async fn sync_all(phones: &[Phone], round: &str) -> anyhow::Result<Vec<SyncReport>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, phone) in phones.iter().enumerate() {
        let client = phone.client.clone();
        tasks.spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(60), client.sync()).await;
            (i, r)
        });
    }
    let mut reports = Vec::with_capacity(phones.len());
    let bar = indicatif::ProgressBar::new(phones.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} phones {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(round.to_string());
    let started = Instant::now();
    let (mut sent, mut received, mut bytes) = (0u64, 0u64, 0u64);
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined?;
        let report = result
            .map_err(|_| anyhow::anyhow!("{} did not finish syncing in 60 s", phones[i].name))?
            .with_context(|| format!("{} failed to sync", phones[i].name))?;
        sent += report.changes_sent;
        received += report.changes_received;
        bytes += report.bytes_sent + report.bytes_received;
        bar.inc(1);
        bar.set_message(format!("{} done", phones[i].name));
        reports.push(report);
    }
    bar.finish_and_clear();
    println!(
        "{round:>10}: {} phones synced in {:.2?}: {sent} changes up, {received} down, {bytes} bytes",
        phones.len(),
        started.elapsed()
    );
    Ok(reports)
}
