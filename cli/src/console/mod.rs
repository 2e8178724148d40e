//! `redline console`: the lead's web page over the lead's own local replica.
//!
//! - **Offline first.** Every page reads the local store through the same client core
//!   calls as the other `redline` commands; every write goes through them too (and the
//!   token's scope on the relay). A live sync runs in the background whenever the relay
//!   is reachable; the page shows whether it is.
//! - **Live.** `/events` is a server-sent event stream: one event whenever a document
//!   changes (a phone's change arriving, or a write here) or the sync state moves. The
//!   page's few lines of script then fetch the current page again and swap its main
//!   part; nothing polls.
//! - **Only for this user.** The server listens on loopback only. A random secret in the
//!   printed URL is exchanged for an `HttpOnly`, `SameSite=Strict` cookie; every request
//!   needs it, every write also needs an `Origin` of this very server, and the `Host`
//!   must be this server's (no DNS rebinding).
//! - **Plain HTML.** Pages are rendered on the server (maud); forms post and redirect,
//!   so everything works without script; the stylesheet and script are embedded.

mod pages;

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use redline_client::{Client, NeedStatus, Priority};
use redline_proto::{DeviceId, DocId, MemberId, TeamId, ZoneId};
use serde::Deserialize;
use tokio::sync::{broadcast, watch};

use crate::profile::Profile;

/// `redline console` options.
#[derive(clap::Args, Debug)]
pub struct ConsoleArgs {
    /// Port on 127.0.0.1 (0: any free one).
    #[arg(long, default_value_t = 7450)]
    port: u16,
    /// Do not sync with the relay (work on the local replica only).
    #[arg(long)]
    offline: bool,
}

/// The sync state shown on every page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SyncLine {
    /// Connected to the relay, live.
    pub online: bool,
    /// When the last sync finished (Unix ms).
    pub last_sync_ms: Option<i64>,
    /// Why the last attempt failed, if it did.
    pub problem: Option<String>,
    /// Whether syncing is off (`--offline`).
    pub off: bool,
}

pub(crate) struct Console {
    pub client: Client,
    pub teams: Vec<TeamId>,
    pub zones: Vec<ZoneId>,
    secret: String,
    origin: String,
    hosts: Vec<String>,
    pub sync: watch::Receiver<SyncLine>,
    events: broadcast::Sender<()>,
}

type Shared = Arc<Console>;

const COOKIE: &str = "redline_console";

/// Runs the console until Ctrl-C.
pub async fn run(profile: Profile, client: Client, args: ConsoleArgs) -> anyhow::Result<()> {
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, args.port)))
            .await
            .map_err(|e| {
                crate::Failure::new(
                    2,
                    format!(
                        "cannot listen on 127.0.0.1:{}: {e} (choose another with --port)",
                        args.port
                    ),
                )
            })?;
    let port = listener.local_addr()?.port();
    let secret = hex_secret();
    let (sync_tx, sync) = watch::channel(SyncLine {
        off: args.offline,
        ..SyncLine::default()
    });
    let (events, _) = broadcast::channel(64);
    let console = Arc::new(Console {
        client: client.clone(),
        teams: profile
            .teams
            .iter()
            .filter_map(|t| TeamId::new(t).ok())
            .collect(),
        zones: profile
            .zones
            .iter()
            .filter_map(|z| ZoneId::new(z).ok())
            .collect(),
        secret: secret.clone(),
        origin: format!("http://127.0.0.1:{port}"),
        hosts: vec![format!("127.0.0.1:{port}"), format!("localhost:{port}")],
        sync,
        events: events.clone(),
    });
    // Document changes and sync state both reach the page as one "changed" event.
    let mut changes = client.changes();
    let tx = events.clone();
    tokio::spawn(async move {
        loop {
            match changes.recv().await {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = tx.send(());
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    if !args.offline {
        tokio::spawn(keep_syncing(client.clone(), sync_tx, events.clone()));
    }
    let app = router(console);
    println!("Redline console for {}", profile.store.display());
    println!("  open  http://127.0.0.1:{port}/?key={secret}");
    println!("  (the key is this session's; only this machine can reach the page)");
    println!("Stop with Ctrl-C.");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

fn hex_secret() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Live sync for as long as the console runs; the sync line follows its reports.
async fn keep_syncing(
    client: Client,
    line: watch::Sender<SyncLine>,
    events: broadcast::Sender<()>,
) {
    let mut live = match client.go_live() {
        Ok(l) => l,
        Err(e) => {
            line.send_modify(|l| l.problem = Some(e.to_string()));
            return;
        }
    };
    while let Some(report) = live.reports.recv().await {
        line.send_modify(|l| match report {
            Ok(_) => {
                l.online = true;
                l.problem = None;
                l.last_sync_ms = Some(now_ms());
            }
            Err(e) => {
                l.online = false;
                l.problem = Some(e.to_string());
            }
        });
        let _ = events.send(());
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn router(console: Shared) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/today") }))
        .route("/today", get(pages::today))
        .route("/needs", get(pages::needs))
        .route("/needs/{zone}/{need}", post(need_action))
        .route("/conflicts", get(pages::conflicts))
        .route("/conflicts/resolve", post(resolve))
        .route("/devices", get(pages::devices))
        .route("/devices/accept", post(accept))
        .route("/export", get(pages::export))
        .route("/export/download", get(download))
        .route("/events", get(events))
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(js))
        .layer(middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console)
}

/// The secret, the host and (for writes) the origin, on every request.
async fn guard(State(c): State<Shared>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !c.hosts.iter().any(|h| h == host) {
        return (StatusCode::FORBIDDEN, "unknown host").into_response();
    }
    // First visit: the key from the printed URL becomes a cookie.
    let query = request.uri().query().unwrap_or("");
    if let Some(key) = query.split('&').find_map(|kv| kv.strip_prefix("key=")) {
        if key != c.secret {
            return pages::refused(
                "This link's key is not this console's. Use the URL `redline console` printed.",
            );
        }
        let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", c.secret);
        let mut r = Redirect::to(request.uri().path()).into_response();
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        return r;
    }
    if !has_cookie(headers, &c.secret) {
        return pages::refused(
            "Open the URL `redline console` printed (it carries this session's key).",
        );
    }
    if request.method() != axum::http::Method::GET {
        let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
        if origin != Some(c.origin.as_str()) {
            return (
                StatusCode::FORBIDDEN,
                "writes come only from the console's own pages",
            )
                .into_response();
        }
    }
    next.run(request).await
}

fn has_cookie(headers: &HeaderMap, secret: &str) -> bool {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .any(|kv| kv.trim() == format!("{COOKIE}={secret}"))
}

async fn events(
    State(c): State<Shared>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let rx = c.events.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => {
                // Changes landing together are one refresh.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while rx.try_recv().is_ok() {}
                Some((Ok(Event::default().event("changed").data("1")), rx))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("console.css"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("console.js"),
    )
}

/// A write that failed: the page says why (and nothing changed).
fn write_failed(e: impl std::fmt::Display) -> Response {
    pages::problem(&format!("Not saved: {e}"))
}

/// Where a form sends the browser back to (a page of this console only).
fn back(to: &str) -> Response {
    let to = if to.starts_with('/') && !to.starts_with("//") {
        to
    } else {
        "/today"
    };
    Redirect::to(to).into_response()
}

#[derive(Deserialize)]
struct NeedForm {
    action: String,
    value: String,
    #[serde(default)]
    back: String,
}

async fn need_action(
    State(c): State<Shared>,
    Path((zone, need)): Path<(String, String)>,
    Form(f): Form<NeedForm>,
) -> Response {
    let zone = match ZoneId::new(zone) {
        Ok(z) => z,
        Err(e) => return write_failed(e),
    };
    let done = match f.action.as_str() {
        "assign" => MemberId::new(f.value.trim())
            .map_err(|e| e.to_string())
            .and_then(|m| {
                c.client
                    .assign_need(&zone, &need, &m)
                    .map_err(|e| e.to_string())
            }),
        "status" => f
            .value
            .parse::<NeedStatus>()
            .map_err(|e| e.to_string())
            .and_then(|s| {
                c.client
                    .set_need_status(&zone, &need, s)
                    .map_err(|e| e.to_string())
            }),
        "priority" => Priority::parse(&f.value)
            .map_err(|e| e.to_string())
            .and_then(|p| {
                c.client
                    .set_need_priority(&zone, &need, p)
                    .map_err(|e| e.to_string())
            }),
        other => Err(format!("unknown action {other:?}")),
    };
    match done {
        Ok(()) => back(&f.back),
        Err(e) => write_failed(e),
    }
}

#[derive(Deserialize)]
struct ResolveForm {
    doc: String,
    conflict: String,
    choice: usize,
    #[serde(default)]
    back: String,
}

async fn resolve(State(c): State<Shared>, Form(f): Form<ResolveForm>) -> Response {
    let doc = match DocId::parse(&f.doc) {
        Ok(d) => d,
        Err(e) => return write_failed(e),
    };
    // The same core call as `redline reconcile --resolve`.
    match c.client.resolve_conflict(&doc, &f.conflict, f.choice) {
        Ok(()) => back(&f.back),
        Err(e) => write_failed(e),
    }
}

#[derive(Deserialize)]
struct AcceptForm {
    team: String,
    device: String,
}

async fn accept(State(c): State<Shared>, Form(f): Form<AcceptForm>) -> Response {
    let (team, device) = match (TeamId::new(&f.team), DeviceId::new(&f.device)) {
        (Ok(t), Ok(d)) => (t, d),
        _ => return write_failed("unknown team or device"),
    };
    match c.client.accept_quarantined(&team, &device).await {
        Ok(review) => {
            if review.refused.is_empty() {
                back(&format!("/devices?team={team}"))
            } else {
                let why: Vec<String> = review.refused.iter().map(|r| r.text.clone()).collect();
                pages::problem(&format!(
                    "Accepted, except what the relay refused: {}",
                    why.join("; ")
                ))
            }
        }
        Err(e) => write_failed(e),
    }
}

#[derive(Deserialize)]
struct DownloadQuery {
    doc: String,
    format: String,
}

async fn download(State(c): State<Shared>, Query(q): Query<DownloadQuery>) -> Response {
    let format = match q.format.as_str() {
        "automerge" => crate::lead::Format::Automerge,
        "json" => crate::lead::Format::Json,
        "csv" => crate::lead::Format::Csv,
        other => return pages::problem(&format!("unknown format {other:?}")),
    };
    let id = match DocId::parse(&q.doc) {
        Ok(id) => id,
        Err(e) => return pages::problem(&e.to_string()),
    };
    match crate::lead::export_bytes(&c.client, &id, format) {
        Ok(bytes) => {
            let ext = match format {
                crate::lead::Format::Automerge => "automerge",
                crate::lead::Format::Json => "json",
                crate::lead::Format::Csv => "csv",
            };
            let name = format!("{}.{ext}", id.as_str().replace('/', "_"));
            let disposition = format!("attachment; filename=\"{name}\"");
            let mut r = bytes.into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            if let Ok(v) = HeaderValue::from_str(&disposition) {
                r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
            }
            r
        }
        Err(e) => pages::problem(&format!("{e:#}")),
    }
}
