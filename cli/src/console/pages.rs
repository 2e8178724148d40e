//! The console's pages, rendered on the server. Each page is a full document; the
//! script swaps `<main>` when the data changes, and forms work without it.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};
use redline_client::workflow::Stage;
use redline_client::{NeedCategory, NeedStatus, Priority, TaskStatus};
use redline_proto::{Day, DocId, TeamId};
use serde::Deserialize;

use super::{Shared, SyncLine, now_ms};

/// Which page is shown (for the navigation).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Page {
    Today,
    Needs,
    Conflicts,
    Devices,
    Export,
}

const PAGES: [(Page, &str, &str); 5] = [
    (Page::Today, "/today", "Today"),
    (Page::Needs, "/needs", "Needs"),
    (Page::Conflicts, "/conflicts", "Conflicts"),
    (Page::Devices, "/devices", "Devices"),
    (Page::Export, "/export", "Export"),
];

fn time_of(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (h, m) = ((secs / 3600).rem_euclid(24), (secs / 60).rem_euclid(60));
    format!("{h:02}:{m:02} UTC")
}

fn ago(ms: i64) -> String {
    let s = (now_ms() - ms).max(0) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86_400),
    }
}

fn status_bar(c: &Shared) -> Markup {
    let line: SyncLine = c.sync.borrow().clone();
    let pending = c.client.pending().map(|p| p.unacked).unwrap_or(0);
    let (class, state) = if line.off {
        ("offline", "Sync off (--offline)".to_string())
    } else if line.online {
        ("online", "Online: live with the relay".to_string())
    } else {
        (
            "offline",
            "Offline: working on this machine's copy".to_string(),
        )
    };
    html! {
        div #sync .sync role="status" aria-live="polite" data-state=(class) {
            strong { (state) }
            span { " · " (pending) " change" @if pending != 1 { "s" } " not yet on the relay" }
            span { " · last sync: " @match line.last_sync_ms { Some(ms) => (ago(ms)), None => "not yet this session" } }
            @if let Some(p) = &line.problem { span .problem { " · " (p) } }
        }
    }
}

fn layout(c: &Shared, page: Page, title: &str, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Redline console" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                a .skip href="#main" { "Skip to content" }
                header {
                    span .brand { "Redline" }
                    nav aria-label="Pages" {
                        @for (p, href, name) in PAGES {
                            @if p == page { a href=(href) aria-current="page" { (name) } }
                            @else { a href=(href) { (name) } }
                        }
                    }
                }
                main #main tabindex="-1" {
                    (status_bar(c))
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    markup.into_response()
}

/// A page that says what went wrong, with a way back.
pub(super) fn problem(text: &str) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "Not done · Redline console" } link rel="stylesheet" href="/assets/console.css"; }
            body { main #main { h1 { "Not done" } p .problem role="alert" { (text) } p { a href="javascript:history.back()" { "Back" } " · " a href="/today" { "Today" } } } }
        }
    };
    (StatusCode::UNPROCESSABLE_ENTITY, markup).into_response()
}

/// The answer to a request without the session's key.
pub(super) fn refused(text: &str) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" { head { meta charset="utf-8"; title { "Redline console" } } body { main { h1 { "Not signed in" } p { (text) } } } }
    };
    (StatusCode::UNAUTHORIZED, markup).into_response()
}

#[derive(Deserialize, Default)]
pub(super) struct DayQuery {
    team: Option<String>,
    date: Option<String>,
}

fn team_and_day(c: &Shared, q: &DayQuery) -> Result<(TeamId, Day), String> {
    let team = match &q.team {
        Some(t) => TeamId::new(t).map_err(|e| e.to_string())?,
        None => c
            .teams
            .first()
            .cloned()
            .ok_or("this login has no team: log in with a lead's token")?,
    };
    let day = match &q.date {
        Some(d) if !d.is_empty() => Day::new(d.clone()).map_err(|e| e.to_string())?,
        _ => crate::lead::today()?,
    };
    Ok((team, day))
}

fn day_picker(c: &Shared, action: &str, team: &TeamId, day: &Day) -> Markup {
    html! {
        form .filters method="get" action=(action) {
            label { "Team " select name="team" {
                @for t in &c.teams { option value=(t) selected[t == team] { (t) } }
            } }
            label { "Day " input type="date" name="date" value=(day.as_str()); }
            button type="submit" { "Show" }
        }
    }
}

/// Tallies added per hour of the day, from the document's own history (each change's
/// time and the counter increments it carries).
fn tallies_by_hour(doc: &automerge::Automerge) -> BTreeMap<String, [i64; 24]> {
    use automerge::legacy::OpType;
    let mut out: BTreeMap<String, [i64; 24]> = BTreeMap::new();
    for change in doc.get_changes(&[]) {
        let hour = (change.timestamp().div_euclid(3_600_000)).rem_euclid(24) as usize;
        for op in change.decode().operations {
            let amount = match &op.action {
                OpType::Increment(n) => *n,
                OpType::Put(automerge::ScalarValue::Counter(c)) => i64::from(c),
                _ => continue,
            };
            if let automerge::legacy::Key::Map(metric) = &op.key {
                out.entry(metric.to_string()).or_insert([0; 24])[hour] += amount;
            }
        }
    }
    out
}

fn chart(by_hour: &BTreeMap<String, [i64; 24]>) -> Markup {
    let mut totals = [0i64; 24];
    for hours in by_hour.values() {
        for (t, v) in totals.iter_mut().zip(hours) {
            *t += v;
        }
    }
    let max = totals.iter().copied().max().unwrap_or(0).max(1);
    let (w, h) = (24 * 22, 120);
    html! {
        figure .chart {
            svg viewBox=(format!("0 0 {w} {}", h + 18)) role="img" aria-labelledby="chart-title" {
                title #chart-title { "Tallies added per hour (UTC)" }
                @for (i, v) in totals.iter().enumerate() {
                    @let bar = *v * h / max;
                    rect x=(i * 22 + 3) y=(h - bar) width="16" height=(bar) {
                        title { (format!("{i:02}:00: {v}")) }
                    }
                    @if i % 3 == 0 { text x=(i * 22 + 11) y=(h + 14) text-anchor="middle" { (format!("{i:02}")) } }
                }
            }
            figcaption { "Tallies added per hour (UTC), all metrics; the busiest hour added " (max) "." }
        }
    }
}

pub(super) async fn today(State(c): State<Shared>, Query(q): Query<DayQuery>) -> Response {
    let (team, day) = match team_and_day(&c, &q) {
        Ok(td) => td,
        Err(e) => return problem(&e),
    };
    let view = match c.client.reconcile(&team, &day) {
        Ok(v) => v,
        Err(e) => return problem(&e.to_string()),
    };
    let body = html! {
        (day_picker(&c, "/today", &team, &day))
        @match &view {
            None => p { "No ledger for " (team) " on " (day.as_str()) " on this machine yet. It arrives with the next sync once a phone writes to it." }
            Some(v) => {
                section aria-labelledby="tasks-h" {
                    h2 #tasks-h { "Tasks by status" }
                    div .columns {
                        @for s in TaskStatus::all() {
                            @let tasks: Vec<_> = v.ledger.tasks.iter().filter(|t| t.status.status == *s).collect();
                            div .column {
                                h3 { (s.as_str().replace('_', " ")) " (" (tasks.len()) ")" }
                                ul { @for t in tasks {
                                    li { strong { (t.title) } br; small { (t.kind.as_str()) @if !t.assignees.is_empty() { " · " (t.assignees.join(", ")) } } }
                                } }
                            }
                        }
                    }
                }
                section aria-labelledby="duty-h" {
                    h2 #duty-h { "On duty" }
                    @let on = v.ledger.on_duty();
                    @if on.is_empty() { p { "Nobody is checked in." } }
                    @else { ul .chips { @for m in on { li { (m) } } } }
                }
                section aria-labelledby="tallies-h" {
                    h2 #tallies-h { "Tallies" }
                    table {
                        caption { "Per member, and the team's totals" }
                        thead { tr { th scope="col" { "member" } @for k in v.totals.keys() { th scope="col" { (k) } } } }
                        tbody {
                            @for m in &v.members {
                                tr { th scope="row" { (m.member) } @for k in v.totals.keys() { td { (m.tallies.get(k).copied().unwrap_or(0)) } } }
                            }
                        }
                        tfoot { tr { th scope="row" { "total" } @for t in v.totals.values() { td { strong { (t) } } } } }
                    }
                    @if let Ok(Some(doc)) = c.client.document(&DocId::ledger(&team, &day)) {
                        (chart(&tallies_by_hour(&doc)))
                    }
                }
                @if !v.conflicts.is_empty() {
                    p .notice { (v.conflicts.len()) " conflicting edits wait for a decision: " a href=(format!("/conflicts?team={team}&date={}", day.as_str())) { "resolve them" } }
                }
            }
        }
    };
    layout(&c, Page::Today, &format!("{team}, {}", day.as_str()), body)
}

#[derive(Deserialize, Default)]
pub(super) struct NeedsQuery {
    zone: Option<String>,
    category: Option<String>,
    priority: Option<String>,
}

fn selected(value: &Option<String>, option: &str) -> bool {
    value.as_deref() == Some(option)
}

pub(super) async fn needs(State(c): State<Shared>, Query(q): Query<NeedsQuery>) -> Response {
    let all = match c.client.open_needs() {
        Ok(n) => n,
        Err(e) => return problem(&e.to_string()),
    };
    let empty = |s: &Option<String>| s.as_deref().is_none_or(str::is_empty);
    let shown: Vec<_> = all
        .iter()
        .filter(|n| empty(&q.zone) || q.zone.as_deref() == Some(n.zone.as_str()))
        .filter(|n| empty(&q.category) || q.category.as_deref() == Some(n.category.as_str()))
        .filter(|n| empty(&q.priority) || q.priority.as_deref() == Some(n.priority.as_str()))
        .collect();
    let members: Vec<String> = c
        .client
        .roster()
        .ok()
        .flatten()
        .map(|r| r.members.into_keys().collect())
        .unwrap_or_default();
    // Households by id, for their addresses.
    let mut addresses = std::collections::HashMap::new();
    let mut zones: Vec<String> = all.iter().map(|n| n.zone.clone()).collect();
    for z in &zones {
        if let Ok(zone) = redline_proto::ZoneId::new(z)
            && let Ok(Some(book)) = c.client.households(&zone)
        {
            for h in book.households {
                addresses.insert(h.id, h.address);
            }
        }
    }
    zones.extend(c.zones.iter().map(|z| z.to_string()));
    zones.sort();
    zones.dedup();
    let back = "/needs";
    let body = html! {
        form .filters method="get" action="/needs" {
            label { "Zone " select name="zone" { option value="" { "all" } @for z in &zones { option value=(z) selected[selected(&q.zone, z)] { (z) } } } }
            label { "Category " select name="category" { option value="" { "all" } @for k in NeedCategory::ALL { option value=(k.as_str()) selected[selected(&q.category, k.as_str())] { (k.as_str().replace('_', " ")) } } } }
            label { "Priority " select name="priority" { option value="" { "all" } @for p in Priority::ALL { option value=(p.as_str()) selected[selected(&q.priority, p.as_str())] { (p.as_str()) } } } }
            button type="submit" { "Filter" }
        }
        p { (shown.len()) " open need" @if shown.len() != 1 { "s" } ", most urgent first." }
        datalist #members { @for m in &members { option value=(m) {} } }
        table .needs {
            thead { tr { th scope="col" { "priority" } th scope="col" { "zone" } th scope="col" { "household" } th scope="col" { "need" } th scope="col" { "status" } th scope="col" { "assigned" } th scope="col" { "change" } } }
            tbody {
                @for n in &shown {
                    @let action = format!("/needs/{}/{}", n.zone, n.id);
                    tr data-need=(n.id) data-status=(n.status.status.as_str()) {
                        td { span class=(format!("pri pri-{}", n.priority.as_str())) { (n.priority.as_str()) } }
                        td { (n.zone) }
                        td { (addresses.get(&n.household).map_or(n.household.as_str(), String::as_str)) }
                        td { strong { (n.category.as_str().replace('_', " ")) } br; (n.detail) }
                        td .status { (n.status.status.as_str().replace('_', " ")) }
                        td { (n.assignee.as_deref().unwrap_or("nobody")) }
                        td .actions {
                            form method="post" action=(action) {
                                input type="hidden" name="action" value="assign";
                                input type="hidden" name="back" value=(back);
                                label { span .sr { "Assign need " (n.id) " to" } input name="value" list="members" placeholder="member" required size="8"; }
                                button type="submit" { "Assign" }
                            }
                            form method="post" action=(action) {
                                input type="hidden" name="action" value="status";
                                input type="hidden" name="back" value=(back);
                                label { span .sr { "Status of need " (n.id) } select name="value" {
                                    @for s in NeedStatus::all() { option value=(s.as_str()) selected[*s == n.status.status] { (s.as_str().replace('_', " ")) } }
                                } }
                                button type="submit" { "Set status" }
                            }
                            form method="post" action=(action) {
                                input type="hidden" name="action" value="priority";
                                input type="hidden" name="back" value=(back);
                                label { span .sr { "Priority of need " (n.id) } select name="value" {
                                    @for p in Priority::ALL { option value=(p.as_str()) selected[*p == n.priority] { (p.as_str()) } }
                                } }
                                button type="submit" { "Set priority" }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(&c, Page::Needs, "Open needs", body)
}

pub(super) async fn conflicts(State(c): State<Shared>, Query(q): Query<DayQuery>) -> Response {
    let (team, day) = match team_and_day(&c, &q) {
        Ok(td) => td,
        Err(e) => return problem(&e),
    };
    let doc = DocId::ledger(&team, &day);
    let found = match c.client.conflicts(&doc) {
        Ok(f) => f,
        Err(redline_client::Error::NotFound(_)) => Vec::new(),
        Err(e) => return problem(&e.to_string()),
    };
    let back = format!("/conflicts?team={team}&date={}", day.as_str());
    let tasks = c
        .client
        .ledger(&team, &day)
        .ok()
        .flatten()
        .map(|l| l.tasks)
        .unwrap_or_default();
    let describe = |item: &str| match tasks.iter().find(|t| t.id == item) {
        Some(t) => format!(
            "A {} task by {}",
            t.kind.as_str().replace('_', " "),
            t.created_by
        ),
        None => format!("Entry {item}"),
    };
    let body = html! {
        (day_picker(&c, "/conflicts", &team, &day))
        @if found.is_empty() { p { "No conflicting edits in this day's ledger." } }
        @for conflict in &found {
            section .conflict aria-labelledby=(format!("c-{}", conflict.id)) {
                h2 id=(format!("c-{}", conflict.id)) { (describe(&conflict.item)) ": its " (conflict.field) }
                p { "Edited at the same time on different phones. Keep one value:" }
                ul .values {
                    @for (i, v) in conflict.values.iter().enumerate() {
                        li {
                            form method="post" action="/conflicts/resolve" {
                                input type="hidden" name="doc" value=(doc.as_str());
                                input type="hidden" name="conflict" value=(conflict.id);
                                input type="hidden" name="choice" value=(i);
                                input type="hidden" name="back" value=(back);
                                q { (v.value) }
                                " " small { "by " (v.member) " on " (v.device) ", " (time_of(v.at)) }
                                " " button type="submit" aria-label=(format!("Keep \"{}\"", v.value)) { "Keep this" }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(
        &c,
        Page::Conflicts,
        &format!("Conflicts, {team}, {}", day.as_str()),
        body,
    )
}

#[derive(Deserialize, Default)]
pub(super) struct TeamQuery {
    team: Option<String>,
}

pub(super) async fn devices(State(c): State<Shared>, Query(q): Query<TeamQuery>) -> Response {
    let team = match q.team.as_deref().map(TeamId::new).transpose() {
        Ok(Some(t)) => t,
        Ok(None) => match c.teams.first() {
            Some(t) => t.clone(),
            None => return problem("this login has no team"),
        },
        Err(e) => return problem(&e.to_string()),
    };
    let wait = std::time::Duration::from_secs(5);
    let health = tokio::time::timeout(wait, c.client.device_health(&team)).await;
    let held = tokio::time::timeout(wait, c.client.quarantine(&team)).await;
    let body = html! {
        form .filters method="get" action="/devices" {
            label { "Team " select name="team" { @for t in &c.teams { option value=(t) selected[*t == team] { (t) } } } }
            button type="submit" { "Show" }
        }
        @match &health {
            Ok(Ok(list)) => {
                table .devices {
                    caption { "The relay's view of " (team) "'s phones" }
                    thead { tr { th scope="col" { "device" } th scope="col" { "member" } th scope="col" { "last seen" } th scope="col" { "last sync" } th scope="col" { "updates pending" } th scope="col" { "app" } th scope="col" { "now" } } }
                    tbody { @for d in list {
                        tr data-device=(d.device) {
                            th scope="row" { (d.device) }
                            td { (d.member) }
                            td { (ago(d.last_seen_ms)) }
                            td { @match d.last_sync_ms { Some(ms) => (ago(ms)), None => "never" } }
                            td { (d.pending_updates) }
                            td { (d.app_version) }
                            td { @if d.connected { "connected" } @else { "—" } }
                        }
                    } }
                }
            }
            Ok(Err(e)) => p .problem { "The relay did not answer: " (e.to_string()) }
            Err(_) => p .problem { "The relay is not reachable now: device health needs it." }
        }
        h2 { "Held for review (quarantine)" }
        @match &held {
            Ok(Ok(list)) if list.is_empty() => p { "Nothing is held for " (team) "." }
            Ok(Ok(list)) => {
                p { "These phones came back after a long time offline (or with a reset store). Their changes are kept on the relay, not merged, until you accept them." }
                table .held {
                    thead { tr { th scope="col" { "device" } th scope="col" { "member" } th scope="col" { "document" } th scope="col" { "changes" } th scope="col" { "offline" } th scope="col" {} } }
                    tbody { @for h in list {
                        tr data-held=(h.device) {
                            th scope="row" { (h.device) }
                            td { (h.member) }
                            td { (h.doc) }
                            td { (h.changes) }
                            td { (h.offline_ms / 3_600_000) " h" }
                            td { form method="post" action="/devices/accept" {
                                input type="hidden" name="team" value=(team);
                                input type="hidden" name="device" value=(h.device);
                                button type="submit" { "Accept " (h.device) "'s changes" }
                            } }
                        }
                    } }
                }
            }
            Ok(Err(e)) => p .problem { "The relay did not answer: " (e.to_string()) }
            Err(_) => p .problem { "The relay is not reachable now." }
        }
    };
    layout(&c, Page::Devices, &format!("Devices, {team}"), body)
}

pub(super) async fn export(State(c): State<Shared>) -> Response {
    let docs = c.client.documents().unwrap_or_default();
    let body = html! {
        p { "Every document on this machine, in three forms: the standard Automerge file (any Automerge implementation opens it), JSON, and CSV for spreadsheets." }
        table .export {
            thead { tr { th scope="col" { "document" } th scope="col" { "download" } } }
            tbody { @for d in &docs {
                tr {
                    th scope="row" { (d) }
                    td {
                        @for (f, label) in [("automerge", "Automerge"), ("json", "JSON"), ("csv", "CSV")] {
                            a href=(format!("/export/download?doc={}&format={f}", d.as_str())) download { (label) } " "
                        }
                    }
                }
            } }
        }
    };
    layout(&c, Page::Export, "Export", body)
}
