//! `RedlineClient`: the app's handle on the device store and sync.
//!
//! **Quick calls** (local disk only, about a millisecond): opening, every write and
//! query. They never touch the network, but they do touch the disk: on Android call them
//! off the main thread (as with any database). **Async calls**: `sync_now` (a suspend
//! function in Kotlin, `async` in Swift) runs on the client's own tokio runtime and never
//! blocks the caller's thread. `go_live`/`stop_live` return at once; the live session
//! runs in the background and reports through the `SyncStatusObserver`.

use std::net::ToSocketAddrs;
use std::sync::{Arc, Mutex};

use redline_client::{
    Client, ClientConfig, LiveSync, NeedCategory, NewHousehold, NewNeed, NewTask, Priority,
    RelayEndpoint, TaskKind, Vulnerability,
};
use redline_proto::{Day, DocId, MemberId, OrgId, TeamId, ZoneId};

use crate::RedlineError;
use crate::error::guard;
use crate::observers::{ChangeObserver, SyncStatusObserver, forward_changes};
use crate::records::*;

/// Sends statuses to one observer, in order, from one background thread.
struct StatusSink(std::sync::mpsc::Sender<SyncStatus>);

impl StatusSink {
    fn new(observer: Arc<dyn SyncStatusObserver>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<SyncStatus>();
        std::thread::Builder::new()
            .name("redline-status".into())
            .spawn(move || {
                while let Ok(s) = rx.recv() {
                    observer.sync_status_changed(s);
                }
            })
            .expect("spawn the status thread");
        Self(tx)
    }

    fn send(&self, status: SyncStatus) {
        let _ = self.0.send(status);
    }
}

/// What a call needs from the open state: the core client, the runtime, the status sink.
type Parts = (
    Client,
    Arc<tokio::runtime::Runtime>,
    Option<Arc<StatusSink>>,
);

struct Open {
    client: Client,
    runtime: Arc<tokio::runtime::Runtime>,
    changes: Option<tokio::task::JoinHandle<()>>,
    status: Option<Arc<StatusSink>>,
    live: Option<(LiveSync, tokio::task::JoinHandle<()>)>,
}

/// A device's Redline store and its sync with the relay.
#[derive(uniffi::Object)]
pub struct RedlineClient {
    state: Mutex<Option<Open>>,
}

fn team(s: &str) -> Result<TeamId, RedlineError> {
    Ok(TeamId::new(s)?)
}
fn day(s: &str) -> Result<Day, RedlineError> {
    Ok(Day::new(s)?)
}
fn zone(s: &str) -> Result<ZoneId, RedlineError> {
    Ok(ZoneId::new(s)?)
}
fn member(s: &str) -> Result<MemberId, RedlineError> {
    Ok(MemberId::new(s)?)
}

fn config(settings: ClientSettings) -> Result<ClientConfig, RedlineError> {
    let mut config = ClientConfig::new(member(&settings.member)?)
        .with_teams(
            settings
                .teams
                .iter()
                .map(|t| team(t))
                .collect::<Result<_, _>>()?,
        )
        .with_zones(
            settings
                .zones
                .iter()
                .map(|z| zone(z))
                .collect::<Result<_, _>>()?,
        )
        .with_keep_days(settings.keep_days.max(1));
    if let Some(org) = settings.org {
        config = config.with_org(OrgId::new(org)?);
    }
    if let Some(relay) = settings.relay {
        config = config.with_relay(endpoint(relay)?);
    }
    let others = settings
        .other_relays
        .into_iter()
        .map(endpoint)
        .collect::<Result<Vec<_>, _>>()?;
    if !others.is_empty() {
        config = config.with_other_relays(others);
    }
    config.home_relay_by_team = settings.home_relay_by_team;
    if let Some(token) = settings.token {
        config = config.with_token(token);
    }
    Ok(config)
}

/// A relay's address and pin, checked.
fn endpoint(relay: RelaySettings) -> Result<RelayEndpoint, RedlineError> {
    let addr = relay
        .address
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| RedlineError::InvalidInput {
            reason: format!(
                "relay address {:?}: expected host:port, like 192.0.2.10:7447",
                relay.address
            ),
        })?;
    redline_client::transport::parse_fingerprint(&relay.fingerprint)?;
    Ok(RelayEndpoint::new(addr, relay.fingerprint))
}

impl RedlineClient {
    /// The open state's parts, or `Closed`.
    fn parts(&self) -> Result<Parts, RedlineError> {
        let state = self.state.lock().expect("client lock");
        let open = state.as_ref().ok_or_else(|| RedlineError::Closed {
            reason: "this client was shut down; open a new one".into(),
        })?;
        Ok((
            open.client.clone(),
            open.runtime.clone(),
            open.status.clone(),
        ))
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&Client) -> Result<T, redline_client::Error>,
    ) -> Result<T, RedlineError> {
        guard(|| {
            let (client, _, _) = self.parts()?;
            Ok(f(&client)?)
        })
    }
}

#[uniffi::export]
impl RedlineClient {
    /// Opens (or creates) the store in `data_dir`. Quick: local disk only.
    #[uniffi::constructor]
    pub fn open(data_dir: String, settings: ClientSettings) -> Result<Arc<Self>, RedlineError> {
        guard(|| {
            let client = Client::open(&data_dir, config(settings)?)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("redline-sync")
                .enable_all()
                .build()
                .map_err(|e| RedlineError::Internal {
                    reason: format!("cannot start the sync runtime: {e}"),
                })?;
            Ok(Arc::new(Self {
                state: Mutex::new(Some(Open {
                    client,
                    runtime: Arc::new(runtime),
                    changes: None,
                    status: None,
                    live: None,
                })),
            }))
        })
    }

    /// This install's device id (from its token, if it has one).
    pub fn device_id(&self) -> Result<String, RedlineError> {
        self.with(|c| Ok(c.identity().device.to_string()))
    }

    /// Registers the observer told about changed documents (replacing any earlier one);
    /// `None` removes it.
    pub fn set_change_observer(
        &self,
        observer: Option<Arc<dyn ChangeObserver>>,
    ) -> Result<(), RedlineError> {
        guard(|| {
            let mut state = self.state.lock().expect("client lock");
            let open = state.as_mut().ok_or_else(|| RedlineError::Closed {
                reason: "this client was shut down".into(),
            })?;
            if let Some(old) = open.changes.take() {
                old.abort();
            }
            if let Some(o) = observer {
                open.changes = Some(forward_changes(&open.runtime, &open.client, o));
            }
            Ok(())
        })
    }

    /// Registers the observer told how syncing goes (replacing any earlier one).
    pub fn set_sync_status_observer(
        &self,
        observer: Option<Arc<dyn SyncStatusObserver>>,
    ) -> Result<(), RedlineError> {
        guard(|| {
            let mut state = self.state.lock().expect("client lock");
            let open = state.as_mut().ok_or_else(|| RedlineError::Closed {
                reason: "this client was shut down".into(),
            })?;
            open.status = observer.map(|o| Arc::new(StatusSink::new(o)));
            Ok(())
        })
    }

    // ----- ledger -------------------------------------------------------------------

    /// Checks the member in for duty on `team`'s ledger of `day` (`YYYY-MM-DD`).
    pub fn check_in(&self, team_id: String, day_id: String) -> Result<(), RedlineError> {
        let (t, d) = (team(&team_id)?, day(&day_id)?);
        self.with(|c| c.check_in(&t, &d))
    }

    /// Checks the member out.
    pub fn check_out(&self, team_id: String, day_id: String) -> Result<(), RedlineError> {
        let (t, d) = (team(&team_id)?, day(&day_id)?);
        self.with(|c| c.check_out(&t, &d))
    }

    /// Adds a task to the day; returns its id.
    pub fn add_task(
        &self,
        team_id: String,
        day_id: String,
        task: NewTaskRecord,
    ) -> Result<String, RedlineError> {
        let (t, d) = (team(&team_id)?, day(&day_id)?);
        let new = NewTask {
            kind: TaskKind::parse(&task.kind)?,
            title: task.title,
            place: task.place,
            requirements: task.requirements,
            zone: task.zone.as_deref().map(zone).transpose()?,
            assignees: task
                .assignees
                .iter()
                .map(|m| member(m))
                .collect::<Result<_, _>>()?,
            due: task.due_ms,
        };
        self.with(|c| c.add_task(&t, &d, new))
    }

    /// Assigns `member` to a task.
    pub fn assign_task(
        &self,
        team_id: String,
        day_id: String,
        task: String,
        member_id: String,
    ) -> Result<(), RedlineError> {
        let (t, d, m) = (team(&team_id)?, day(&day_id)?, member(&member_id)?);
        self.with(|c| c.assign_task(&t, &d, &task, &m))
    }

    /// Sets a task's status: open, assigned, in_progress, done or cancelled.
    pub fn set_task_status(
        &self,
        team_id: String,
        day_id: String,
        task: String,
        status: String,
    ) -> Result<(), RedlineError> {
        let (t, d) = (team(&team_id)?, day(&day_id)?);
        self.with(|c| c.set_task_status(&t, &d, &task, status.parse()?))
    }

    /// Adds `amount` to the day's tally `metric` (concurrent additions on devices sum).
    pub fn add_to_tally(
        &self,
        team_id: String,
        day_id: String,
        metric: String,
        amount: u32,
    ) -> Result<(), RedlineError> {
        let (t, d) = (team(&team_id)?, day(&day_id)?);
        self.with(|c| c.add_to_tally(&t, &d, &metric, amount))
    }

    /// The merged day, or `None` if the device holds nothing of it.
    pub fn ledger(
        &self,
        team_id: String,
        day_id: String,
    ) -> Result<Option<LedgerRecord>, RedlineError> {
        let (t, d) = (team(&team_id)?, day(&day_id)?);
        self.with(|c| Ok(c.ledger(&t, &d)?.map(Into::into)))
    }

    /// The lead's reconciled day: totals, per-member activity, conflicts.
    pub fn reconcile(
        &self,
        team_id: String,
        day_id: String,
    ) -> Result<Option<ReconcileRecord>, RedlineError> {
        let (t, d) = (team(&team_id)?, day(&day_id)?);
        self.with(|c| Ok(c.reconcile(&t, &d)?.map(Into::into)))
    }

    /// Conflicting concurrent edits in document `doc`.
    pub fn conflicts(&self, doc: String) -> Result<Vec<ConflictRecord>, RedlineError> {
        let id = DocId::parse(&doc)?;
        self.with(|c| Ok(c.conflicts(&id)?.into_iter().map(Into::into).collect()))
    }

    /// Resolves a conflict by choosing value `choice` (its index).
    pub fn resolve_conflict(
        &self,
        doc: String,
        conflict: String,
        choice: u32,
    ) -> Result<(), RedlineError> {
        let id = DocId::parse(&doc)?;
        self.with(|c| c.resolve_conflict(&id, &conflict, choice as usize))
    }

    // ----- households ---------------------------------------------------------------

    /// Adds a household to `zone`'s book; returns its id.
    pub fn add_household(
        &self,
        zone_id: String,
        household: NewHouseholdRecord,
    ) -> Result<String, RedlineError> {
        let z = zone(&zone_id)?;
        let new = NewHousehold {
            address: household.address,
            residents: household.residents,
            contact: household.contact,
            flags: household
                .flags
                .iter()
                .map(|f| Vulnerability::parse(f))
                .collect::<Result<_, _>>()?,
        };
        self.with(|c| c.add_household(&z, new))
    }

    /// Records a household's need; returns its id.
    pub fn add_need(&self, zone_id: String, need: NewNeedRecord) -> Result<String, RedlineError> {
        let z = zone(&zone_id)?;
        let new = NewNeed {
            household: need.household,
            category: NeedCategory::parse(&need.category)?,
            detail: need.detail,
            priority: Priority::parse(&need.priority)?,
        };
        self.with(|c| c.add_need(&z, new))
    }

    /// Changes a need's priority: routine, priority, urgent or emergency.
    pub fn set_need_priority(
        &self,
        zone_id: String,
        need: String,
        priority: String,
    ) -> Result<(), RedlineError> {
        let z = zone(&zone_id)?;
        let p = Priority::parse(&priority)?;
        self.with(|c| c.set_need_priority(&z, &need, p))
    }

    /// Sets a need's status: requested, assigned, in_progress, fulfilled or cancelled.
    pub fn set_need_status(
        &self,
        zone_id: String,
        need: String,
        status: String,
    ) -> Result<(), RedlineError> {
        let z = zone(&zone_id)?;
        self.with(|c| c.set_need_status(&z, &need, status.parse()?))
    }

    /// Assigns `member` to a need.
    pub fn assign_need(
        &self,
        zone_id: String,
        need: String,
        member_id: String,
    ) -> Result<(), RedlineError> {
        let (z, m) = (zone(&zone_id)?, member(&member_id)?);
        self.with(|c| c.assign_need(&z, &need, &m))
    }

    /// Replaces a need's notes.
    pub fn set_need_notes(
        &self,
        zone_id: String,
        need: String,
        notes: String,
    ) -> Result<(), RedlineError> {
        let z = zone(&zone_id)?;
        self.with(|c| c.set_need_notes(&z, &need, &notes))
    }

    /// A zone's book, or `None` if the device holds nothing of it.
    pub fn households(&self, zone_id: String) -> Result<Option<HouseholdsRecord>, RedlineError> {
        let z = zone(&zone_id)?;
        self.with(|c| Ok(c.households(&z)?.map(Into::into)))
    }

    /// Open needs across the device's zones, most urgent first.
    pub fn open_needs(&self) -> Result<Vec<NeedRecord>, RedlineError> {
        self.with(|c| Ok(c.open_needs()?.into_iter().map(Into::into).collect()))
    }

    /// What is saved on the phone only: per document, changes the relay has not
    /// acknowledged (0: "saved on the relay") and the last acknowledgement.
    pub fn pending(&self) -> Result<PendingRecord, RedlineError> {
        self.with(|c| Ok(c.pending()?.into()))
    }

    /// Records of document `doc` with changes not yet on the relay ("saved on the phone"
    /// only), as `tasks/<id>`, `needs/<id>`...; every other record is saved on the relay.
    pub fn unsaved_records(&self, doc: String) -> Result<Vec<String>, RedlineError> {
        let id = DocId::parse(&doc)?;
        self.with(|c| Ok(c.unsaved_records(&id)?.into_iter().collect()))
    }

    /// Tells the client the network and charger state: on a metered network or without
    /// a charger the sync policy may hold back large documents; urgent ones always go.
    pub fn set_conditions(&self, metered: bool, charging: bool) -> Result<(), RedlineError> {
        self.with(|c| {
            c.set_conditions(redline_client::Conditions {
                network: if metered {
                    redline_client::Network::Metered
                } else {
                    redline_client::Network::Unmetered
                },
                charging,
            });
            Ok(())
        })
    }

    /// Every document id on the device.
    pub fn documents(&self) -> Result<Vec<String>, RedlineError> {
        self.with(|c| Ok(c.documents()?.iter().map(ToString::to_string).collect()))
    }

    // ----- sync ---------------------------------------------------------------------

    /// Starts a live session in the background: local writes are pushed as they happen
    /// and others' changes arrive without polling; reconnects with backoff. Reports go to
    /// the status observer. Returns at once.
    pub fn go_live(&self) -> Result<(), RedlineError> {
        guard(|| {
            let mut state = self.state.lock().expect("client lock");
            let open = state.as_mut().ok_or_else(|| RedlineError::Closed {
                reason: "this client was shut down".into(),
            })?;
            if open.live.is_some() {
                return Ok(());
            }
            let mut live = {
                let _in_runtime = open.runtime.enter();
                open.client.go_live()?
            };
            let mut reports =
                std::mem::replace(&mut live.reports, tokio::sync::mpsc::unbounded_channel().1);
            let status = open.status.clone();
            let forward = open.runtime.spawn(async move {
                while let Some(r) = reports.recv().await {
                    if let Some(s) = &status {
                        s.send(match r {
                            Ok(report) => SyncStatus::Synced {
                                report: (&report).into(),
                            },
                            Err(e) => SyncStatus::Failed {
                                reason: RedlineError::from(e).to_string(),
                            },
                        });
                    }
                }
                if let Some(s) = &status {
                    s.send(SyncStatus::Stopped);
                }
            });
            open.live = Some((live, forward));
            Ok(())
        })
    }

    /// Ends the live session (in the background). Returns at once.
    pub fn stop_live(&self) -> Result<(), RedlineError> {
        guard(|| {
            let mut state = self.state.lock().expect("client lock");
            let open = state.as_mut().ok_or_else(|| RedlineError::Closed {
                reason: "this client was shut down".into(),
            })?;
            if let Some((live, _forward)) = open.live.take() {
                open.runtime.spawn(live.stop());
            }
            Ok(())
        })
    }

    /// Stops live sync and observers and releases the store. Every later call fails with
    /// `Closed`. (Named `shutdown`: Kotlin's `close()` is the generated destructor.)
    pub fn shutdown(&self) -> Result<(), RedlineError> {
        let taken = self.state.lock().expect("client lock").take();
        if let Some(mut open) = taken {
            if let Some(c) = open.changes.take() {
                c.abort();
            }
            if let Some((live, _)) = open.live.take() {
                let runtime = open.runtime.clone();
                // Blocking here is fine: the caller is not on the runtime.
                std::thread::spawn(move || runtime.block_on(live.stop()))
                    .join()
                    .map_err(|_| RedlineError::Internal {
                        reason: "stopping live sync failed".into(),
                    })?;
            }
            drop(open.client);
            if let Ok(rt) = Arc::try_unwrap(open.runtime) {
                rt.shutdown_timeout(std::time::Duration::from_secs(2));
            }
        }
        Ok(())
    }
}

#[uniffi::export]
impl RedlineClient {
    /// Syncs with the relay now: pushes what the relay lacks, fetches what the device
    /// lacks. Runs on the client's runtime; the caller's thread is never blocked.
    pub async fn sync_now(&self) -> Result<SyncReportRecord, RedlineError> {
        let (client, runtime, status) = self.parts()?;
        if let Some(s) = &status {
            s.send(SyncStatus::Syncing);
        }
        // Forward progress to the observer while the sync runs.
        let forward = status.clone().map(|s| {
            let mut watch = client.progress();
            runtime.spawn(async move {
                while watch.changed().await.is_ok() {
                    let p = SyncProgressRecord::from(&*watch.borrow());
                    s.send(SyncStatus::Progress { progress: p });
                }
            })
        });
        let result = match runtime.spawn(async move { client.sync().await }).await {
            Ok(Ok(report)) => Ok(SyncReportRecord::from(&report)),
            Ok(Err(e)) => Err(RedlineError::from(e)),
            Err(e) => Err(RedlineError::Internal {
                reason: format!("sync task failed (please report): {e}"),
            }),
        };
        if let Some(f) = forward {
            f.abort();
        }
        if let Some(s) = &status {
            s.send(match &result {
                Ok(r) => SyncStatus::Synced { report: r.clone() },
                Err(e) => SyncStatus::Failed {
                    reason: e.to_string(),
                },
            });
        }
        result
    }

    /// Syncs for at most `seconds` (iOS BGTaskScheduler, Android WorkManager): urgent
    /// records first; stops cleanly at the deadline; a later call finishes the job.
    pub async fn sync_for(&self, seconds: f64) -> Result<BoundedSyncRecord, RedlineError> {
        let (client, runtime, _) = self.parts()?;
        let budget = std::time::Duration::from_secs_f64(seconds.clamp(0.0, 86_400.0));
        match runtime
            .spawn(async move { client.sync_for(budget).await })
            .await
        {
            Ok(Ok(b)) => Ok(BoundedSyncRecord {
                completed: b.completed(),
                progress: (&b.progress).into(),
            }),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(RedlineError::Internal {
                reason: format!("sync task failed (please report): {e}"),
            }),
        }
    }

    /// Why syncing might not work, in plain words (one line per finding; "all checks
    /// passed" when healthy).
    pub async fn diagnose(&self) -> Result<Vec<String>, RedlineError> {
        let (client, runtime, _) = self.parts()?;
        let findings = runtime
            .spawn(async move { client.diagnose(std::time::Duration::from_secs(5)).await })
            .await
            .map_err(|e| RedlineError::Internal {
                reason: format!("doctor failed (please report): {e}"),
            })?;
        Ok(findings.iter().map(|f| f.explain()).collect())
    }
}
