//! The team lead's commands: login, sync, ledger, needs, reconcile, export, status.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use redline_client::{Client, Priority};
use redline_proto::{Day, DocId, DocKind, TeamId};

use crate::Failure;
use crate::profile::{self, Profile};

/// Exit code: the relay refused the credentials.
pub const REFUSED: u8 = 4;
/// Exit code: the relay could not be reached.
pub const UNREACHABLE: u8 = 5;
/// Exit code: the document or day is not on this machine.
pub const NOT_FOUND: u8 = 6;

/// Turns a sync error into a failure with an exit code and what to do next.
fn sync_failure(e: redline_client::Error) -> anyhow::Error {
    use redline_client::Error as E;
    match e {
        E::Refused { code, text } => Failure::new(
            REFUSED,
            format!(
                "the relay refused this machine ({code}): {text}\nask an operator for a new token, then run `redline login` again"
            ),
        )
        .into(),
        E::PinMismatch { .. } => Failure::new(
            REFUSED,
            format!("{e}\ncheck the fingerprint the relay prints at start, then `redline login` again"),
        )
        .into(),
        E::Transport { .. } => Failure::new(
            UNREACHABLE,
            format!("{e}\nnothing was lost; check the network and the relay address, then retry"),
        )
        .into(),
        other => anyhow::Error::new(other),
    }
}

/// Syncs with a spinner on stderr; returns the report.
async fn sync_with_progress(client: &Client) -> anyhow::Result<redline_client::SyncReport> {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message("syncing with the relay");
    spinner.enable_steady_tick(Duration::from_millis(100));
    // Live figures from the client's progress watch.
    let mut watch = client.progress();
    let bar = spinner.clone();
    let shown = tokio::spawn(async move {
        while watch.changed().await.is_ok() {
            let p = watch.borrow().clone();
            let left = p
                .remaining
                .map(|d| format!(", about {:.0?} left", d))
                .unwrap_or_default();
            bar.set_message(format!(
                "{}/{} documents, {}/{} changes sent, {} KB{left}",
                p.docs_done,
                p.docs_total,
                p.changes_sent,
                p.changes_to_send,
                (p.bytes_sent + p.bytes_received) / 1024
            ));
        }
    });
    let result = client.sync().await;
    shown.abort();
    spinner.finish_and_clear();
    let report = result.map_err(sync_failure)?;
    Ok(report)
}

fn print_report(r: &redline_client::SyncReport) {
    println!(
        "synced {} documents in {:.2?}: sent {} changes, received {} ({} bytes)",
        r.docs,
        r.duration,
        r.changes_sent,
        r.changes_received,
        r.bytes_sent + r.bytes_received
    );
    for (doc, why) in &r.refused {
        println!("  refused {doc}: {why}");
    }
}

/// `redline login`.
pub async fn login(
    config: &Path,
    relay: String,
    pin: String,
    token: String,
    org: Option<String>,
    keep_days: u32,
    store: Option<PathBuf>,
) -> anyhow::Result<()> {
    let claims =
        redline_proto::token::peek(&token).map_err(|e| Failure::new(2, format!("--token: {e}")))?;
    redline_client::transport::parse_fingerprint(&pin)?;
    let profile = Profile {
        relay,
        pin,
        token: token.trim().to_string(),
        org,
        teams: claims.teams.iter().map(ToString::to_string).collect(),
        zones: claims.zones.iter().map(ToString::to_string).collect(),
        keep_days,
        store: store.unwrap_or_else(|| config.parent().unwrap_or(Path::new(".")).join("store")),
    };
    // Prove the credentials before keeping them.
    let client = profile.client()?;
    let report = sync_with_progress(&client).await?;
    profile.save(config)?;
    println!(
        "logged in as {} on device {} ({}); teams [{}], zones [{}]",
        claims.member,
        claims.device,
        claims.role,
        profile.teams.join(", "),
        profile.zones.join(", ")
    );
    print_report(&report);
    println!("profile saved in {}", config.display());
    Ok(())
}

/// `redline sync`.
pub async fn sync(client: &Client) -> anyhow::Result<()> {
    let report = sync_with_progress(client).await?;
    print_report(&report);
    Ok(())
}

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(header.to_vec());
    t
}

fn time_of(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .map(|t| format!("{:02}:{:02}", t.hour(), t.minute()))
        .unwrap_or_else(|_| "?".into())
}

fn day_or_today(date: Option<String>) -> anyhow::Result<Day> {
    match date {
        Some(d) => Ok(Day::new(d)?),
        None => today().map_err(anyhow::Error::msg),
    }
}

/// Today (UTC) as a ledger day.
pub fn today() -> Result<Day, String> {
    Day::new(time::OffsetDateTime::now_utc().date().to_string()).map_err(|e| e.to_string())
}

fn missing_day(team: &TeamId, day: &Day) -> anyhow::Error {
    Failure::new(
        NOT_FOUND,
        format!("no ledger of {team} for {day} on this machine: run `redline sync` first, or check the team and date"),
    )
    .into()
}

/// `redline ledger show`.
pub fn ledger_show(client: &Client, team: &str, date: Option<String>) -> anyhow::Result<()> {
    let (team, day) = (TeamId::new(team)?, day_or_today(date)?);
    let view = client
        .ledger(&team, &day)?
        .ok_or_else(|| missing_day(&team, &day))?;
    println!("{team}, {day}");
    let mut tasks = table(&["task", "kind", "title", "status", "assigned", "by"]);
    for t in &view.tasks {
        tasks.add_row(vec![
            t.id.clone(),
            t.kind.as_str().to_string(),
            t.title.clone(),
            t.status.status.to_string(),
            t.assignees.join(", "),
            t.created_by.clone(),
        ]);
    }
    println!("{tasks}");
    let mut duty = table(&["time", "member", "duty", "device"]);
    for d in &view.duty {
        duty.add_row(vec![
            time_of(d.at),
            d.member.clone(),
            match d.action {
                redline_client::DutyAction::CheckIn => "check in".to_string(),
                redline_client::DutyAction::CheckOut => "check out".to_string(),
            },
            d.device.clone(),
        ]);
    }
    println!("{duty}");
    let mut tallies = table(&["tally", "total"]);
    for (k, v) in &view.tallies {
        tallies.add_row(vec![k.clone(), v.to_string()]);
    }
    println!("{tallies}");
    Ok(())
}

/// `redline needs`.
pub fn needs(client: &Client, urgent: bool, zone: Option<String>) -> anyhow::Result<()> {
    let needs: Vec<_> = client
        .open_needs()?
        .into_iter()
        .filter(|n| !urgent || n.priority >= Priority::Urgent)
        .filter(|n| zone.as_ref().is_none_or(|z| &n.zone == z))
        .collect();
    if needs.is_empty() {
        println!(
            "no open needs{}",
            if urgent {
                " marked urgent or emergency"
            } else {
                ""
            }
        );
        return Ok(());
    }
    // Households by id, for their addresses.
    let mut addresses = std::collections::HashMap::new();
    for n in &needs {
        if !addresses.contains_key(&n.zone) {
            let book = client.households(&redline_proto::ZoneId::new(n.zone.as_str())?)?;
            let by_id: std::collections::HashMap<String, String> = book
                .map(|b| {
                    b.households
                        .into_iter()
                        .map(|h| (h.id, h.address))
                        .collect()
                })
                .unwrap_or_default();
            addresses.insert(n.zone.clone(), by_id);
        }
    }
    let mut t = table(&[
        "priority",
        "need",
        "zone",
        "household",
        "detail",
        "status",
        "assigned",
    ]);
    for n in &needs {
        t.add_row(vec![
            n.priority.as_str().to_string(),
            n.category.as_str().to_string(),
            n.zone.clone(),
            addresses
                .get(&n.zone)
                .and_then(|a| a.get(&n.household))
                .cloned()
                .unwrap_or_else(|| n.household.clone()),
            n.detail.clone(),
            n.status.status.to_string(),
            n.assignee.clone().unwrap_or_default(),
        ]);
    }
    println!("{t}");
    println!("{} open needs, most urgent first", needs.len());
    Ok(())
}

/// `redline reconcile`.
pub async fn reconcile(
    client: &Client,
    team: &str,
    date: Option<String>,
    resolve: Vec<String>,
) -> anyhow::Result<()> {
    let (team, day) = (TeamId::new(team)?, day_or_today(date)?);
    let doc = DocId::ledger(&team, &day);
    if !resolve.is_empty() {
        for r in &resolve {
            let (id, choice) = r
                .rsplit_once('=')
                .and_then(|(id, c)| Some((id, c.parse::<usize>().ok()?)))
                .ok_or_else(|| {
                    Failure::new(
                        2,
                        format!("--resolve {r:?}: expected CONFLICT=CHOICE, like t1.title=0"),
                    )
                })?;
            client
                .resolve_conflict(&doc, id, choice)
                .with_context(|| format!("resolving {id}"))?;
            println!("resolved {id} with value {choice}");
        }
        let report = sync_with_progress(client).await?;
        print_report(&report);
    }
    let view = client
        .reconcile(&team, &day)?
        .ok_or_else(|| missing_day(&team, &day))?;
    println!(
        "{team}, {day}: reconciled from {} members",
        view.members.len()
    );
    let mut totals = table(&["tally", "total"]);
    for (k, v) in &view.totals {
        totals.add_row(vec![k.clone(), v.to_string()]);
    }
    println!("{totals}");
    let mut members = table(&[
        "member",
        "devices",
        "tasks",
        "status changes",
        "check-ins",
        "on duty",
        "tallies",
    ]);
    for m in &view.members {
        members.add_row(vec![
            m.member.clone(),
            m.devices.join(", "),
            m.tasks_created.to_string(),
            m.status_changes.to_string(),
            m.check_ins.to_string(),
            if m.on_duty { "yes" } else { "no" }.to_string(),
            m.tallies
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    println!("{members}");
    if view.conflicts.is_empty() {
        println!("no conflicts");
    } else {
        let mut t = table(&["conflict", "item", "field", "choice", "value", "by", "at"]);
        for c in &view.conflicts {
            for (i, v) in c.values.iter().enumerate() {
                t.add_row(vec![
                    c.id.clone(),
                    c.item.clone(),
                    c.field.clone(),
                    i.to_string(),
                    v.value.clone(),
                    format!("{}@{}", v.member, v.device),
                    time_of(v.at),
                ]);
            }
        }
        println!("{t}");
        println!(
            "{} conflicts: keep one value with `redline reconcile --team {team} --date {day} --resolve CONFLICT=CHOICE`",
            view.conflicts.len()
        );
    }
    Ok(())
}

/// Export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The standard Automerge binary (`save()`): any Automerge implementation loads it.
    Automerge,
    /// The typed view as JSON.
    Json,
    /// A table as CSV (ledgers: the reconciled day; households books: the needs).
    Csv,
}

/// `redline export`.
pub fn export(
    client: &Client,
    doc: &str,
    format: Format,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let bytes = export_bytes(client, &DocId::parse(doc)?, format)?;
    match out {
        Some(path) => {
            std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {} bytes to {}", bytes.len(), path.display());
        }
        None => {
            use std::io::Write;
            std::io::stdout().write_all(&bytes)?;
        }
    }
    Ok(())
}

/// Document `id` in `format` (what `redline export` writes and the console downloads).
pub fn export_bytes(client: &Client, id: &DocId, format: Format) -> anyhow::Result<Vec<u8>> {
    let id = id.clone();
    let missing = || -> anyhow::Error {
        Failure::new(
            NOT_FOUND,
            format!("{id} is not on this machine: run `redline sync`, or check the id"),
        )
        .into()
    };
    let bytes: Vec<u8> = match (format, id.kind()) {
        (Format::Automerge, _) => client.document(&id)?.ok_or_else(missing)?.save(),
        (Format::Json, DocKind::Ledger(team, day)) => client
            .reconcile(&team, &day)?
            .ok_or_else(missing)?
            .to_json()?
            .into_bytes(),
        (Format::Csv, DocKind::Ledger(team, day)) => client
            .reconcile(&team, &day)?
            .ok_or_else(missing)?
            .to_csv()?
            .into_bytes(),
        (Format::Json, DocKind::Households(zone)) => {
            serde_json::to_vec_pretty(&client.households(&zone)?.ok_or_else(missing)?)?
        }
        (Format::Csv, DocKind::Households(zone)) => {
            let view = client.households(&zone)?.ok_or_else(missing)?;
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_record([
                "need",
                "household",
                "category",
                "priority",
                "status",
                "assignee",
                "detail",
                "notes",
            ])?;
            for n in &view.needs {
                w.write_record([
                    n.id.as_str(),
                    &n.household,
                    n.category.as_str(),
                    n.priority.as_str(),
                    &n.status.status.to_string(),
                    n.assignee.as_deref().unwrap_or(""),
                    &n.detail,
                    &n.notes,
                ])?;
            }
            w.into_inner()?
        }
        (Format::Json, DocKind::Roster(_)) => {
            serde_json::to_vec_pretty(&client.roster()?.ok_or_else(missing)?)?
        }
        (Format::Csv, DocKind::Roster(_)) => {
            return Err(Failure::new(
                2,
                "CSV export is for ledgers and households books; use --format json for the roster"
                    .to_string(),
            )
            .into());
        }
    };
    Ok(bytes)
}

/// `redline status`.
pub fn status(config: &Path, profile: &Profile, client: &Client) -> anyhow::Result<()> {
    let claims = redline_proto::token::peek(&profile.token)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut t = table(&["", ""]);
    t.add_row(vec!["profile".to_string(), config.display().to_string()]);
    t.add_row(vec![
        "relay".to_string(),
        format!(
            "{} (pin {}…)",
            profile.relay,
            &profile.pin[..profile.pin.len().min(16)]
        ),
    ]);
    t.add_row(vec![
        "member".to_string(),
        format!("{} ({})", claims.member, claims.role),
    ]);
    t.add_row(vec![
        "device".to_string(),
        client.identity().device.to_string(),
    ]);
    t.add_row(vec![
        "token".to_string(),
        if now >= claims.expires {
            "EXPIRED: ask for a new one".to_string()
        } else {
            format!("valid for {} more days", (claims.expires - now) / 86_400)
        },
    ]);
    t.add_row(vec!["teams".to_string(), profile.teams.join(", ")]);
    t.add_row(vec!["zones".to_string(), profile.zones.join(", ")]);
    let docs = client.documents()?;
    let pending = client.pending()?;
    t.add_row(vec!["documents".to_string(), docs.len().to_string()]);
    t.add_row(vec![
        "not yet on the relay".to_string(),
        if pending.unacked == 0 {
            "nothing: all saved on the relay".to_string()
        } else {
            pending
                .docs
                .iter()
                .filter(|d| d.unacked > 0)
                .map(|d| format!("{} ({} changes)", d.doc, d.unacked))
                .collect::<Vec<_>>()
                .join(", ")
        },
    ]);
    t.add_row(vec![
        "last saved on the relay".to_string(),
        pending
            .last_ack_ms
            .map(|ms| {
                time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
                    .map(|t| format!("{} {:02}:{:02} UTC", t.date(), t.hour(), t.minute()))
                    .unwrap_or_default()
            })
            .unwrap_or_else(|| "never".into()),
    ]);
    println!("{t}");
    Ok(())
}

/// Loads the profile and opens the store.
pub fn open(config: &Path) -> anyhow::Result<(Profile, Client)> {
    let profile = Profile::load(config)?;
    let client = profile.client()?;
    Ok((profile, client))
}

/// The profile path from the flag or the environment.
pub fn config_path(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    profile::path(explicit)
}

/// `redline doctor`: every finding in plain words; the exit code of the worst.
pub async fn doctor(config: &Path) -> anyhow::Result<std::process::ExitCode> {
    use redline_client::Finding;
    let (_, client) = open(config)?;
    let findings = client.diagnose(Duration::from_secs(5)).await;
    let mut code = 0u8;
    for f in &findings {
        let (mark, c) = match f {
            Finding::Healthy => ("ok", 0),
            Finding::Unreachable(_) => ("!!", UNREACHABLE),
            Finding::PinMismatch { .. }
            | Finding::Refused { .. }
            | Finding::TokenExpired
            | Finding::NoToken => ("!!", REFUSED),
            Finding::NoRelay => ("!!", profile::NOT_LOGGED_IN),
            Finding::OutOfScope(_)
            | Finding::BudgetReached { .. }
            | Finding::Quarantined { .. } => ("! ", 1),
        };
        println!("[{mark}] {}", f.explain());
        code = code.max(c);
    }
    Ok(std::process::ExitCode::from(code))
}

fn ago(ms: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let s = (now - ms).max(0) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86_400),
    }
}

/// `redline devices`.
pub async fn devices(client: &Client, team: &str) -> anyhow::Result<()> {
    let team = TeamId::new(team)?;
    let list = client.device_health(&team).await.map_err(sync_failure)?;
    if list.is_empty() {
        println!("the relay has not seen any device of {team}");
        return Ok(());
    }
    let mut t = table(&[
        "device",
        "member",
        "last seen",
        "last sync",
        "behind",
        "today",
        "app",
        "online",
    ]);
    for d in &list {
        t.add_row(vec![
            d.device.to_string(),
            d.member.clone(),
            ago(d.last_seen_ms),
            d.last_sync_ms.map(ago).unwrap_or_else(|| "never".into()),
            format!("{} updates", d.pending_updates),
            format!("{} KB", d.bytes_today / 1024),
            format!("{} (protocol {})", d.app_version, d.protocol_version),
            if d.connected { "yes" } else { "no" }.to_string(),
        ]);
    }
    println!("{t}");
    Ok(())
}

/// Accepts the held changes of each of `devices` for `team`, then syncs.
pub async fn accept(client: &Client, team: &str, devices: Vec<String>) -> anyhow::Result<()> {
    if devices.is_empty() {
        return Ok(());
    }
    let team = TeamId::new(team)?;
    for d in devices {
        let device = redline_proto::DeviceId::new(d)?;
        let review = client
            .accept_quarantined(&team, &device)
            .await
            .map_err(sync_failure)?;
        println!("accepted the changes {device} held in quarantine");
        for r in &review.refused {
            let doc = r.doc.as_ref().map(|d| d.to_string()).unwrap_or_default();
            println!("  refused ({}) for {doc}: {}", r.code.name(), r.text);
        }
    }
    let report = sync_with_progress(client).await?;
    print_report(&report);
    Ok(())
}

/// Lists what the relay holds in quarantine for `team` (when reachable and allowed).
pub async fn quarantine(client: &Client, team: &str) -> anyhow::Result<()> {
    let team = TeamId::new(team)?;
    match tokio::time::timeout(Duration::from_secs(5), client.quarantine(&team)).await {
        Ok(Ok(held)) if held.is_empty() => println!("nothing held in quarantine for {team}"),
        Ok(Ok(held)) => {
            let mut t = table(&[
                "device", "member", "document", "changes", "offline", "received",
            ]);
            for h in &held {
                t.add_row(vec![
                    h.device.to_string(),
                    h.member.clone(),
                    h.doc.to_string(),
                    h.changes.to_string(),
                    format!("{} h", h.offline_ms / 3_600_000),
                    ago(h.received_ms),
                ]);
            }
            println!("{t}");
            println!(
                "held for review (devices back after a long time offline): merge with `redline reconcile --team {team} --accept DEVICE`"
            );
        }
        Ok(Err(redline_client::Error::Refused { .. })) => {}
        Ok(Err(e)) => println!("(quarantine not checked: {e})"),
        Err(_) => println!("(quarantine not checked: the relay did not answer in 5 s)"),
    }
    Ok(())
}
