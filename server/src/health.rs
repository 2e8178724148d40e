//! Per-device health, for leads and operators: when each device was last seen and last
//! finished a sync, what it runs, what it moved today, and how many commits in its
//! subscription it has not received. Kept in memory and persisted in the store
//! (`devices`), so it survives restarts: every change is written, except that a live
//! device's deliveries (one per commit in its subscription) are written at most every
//! [`SAVE_DELIVERIES_EVERY_MS`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use redline_proto::message::{DeviceHealth, Subscription};
use redline_proto::token::Claims;
use redline_proto::{DeviceId, TeamId};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::storage::RelayStorage;

/// What the relay keeps per device.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    health: DeviceHealth,
    /// Feed sequence it was last brought up to.
    delivered: u64,
    /// What it receives.
    subscription: Subscription,
    /// The UTC day `bytes_today` counts.
    day: i64,
    /// Open connections.
    connections: u32,
    /// Held in quarantine since returning after `offline_ms` offline (until a lead
    /// accepts its changes).
    quarantined: Option<i64>,
    /// When this record was last written to the store (memory only).
    #[serde(skip)]
    saved_ms: i64,
}

/// A connected device's deliveries reach the store at most this often.
pub const SAVE_DELIVERIES_EVERY_MS: i64 = 10_000;

/// Whether a change to a record must reach the store now.
#[derive(PartialEq, Eq)]
enum Save {
    Now,
    IfDue,
}

/// Every device the relay has seen.
pub struct Registry {
    storage: Arc<dyn RelayStorage>,
    devices: Mutex<HashMap<DeviceId, Record>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn day_of(ms: i64) -> i64 {
    ms.div_euclid(86_400_000)
}

impl Registry {
    /// Loads what `storage` remembers.
    pub fn load(storage: Arc<dyn RelayStorage>) -> Result<Self, Error> {
        let mut devices = HashMap::new();
        for bytes in storage.devices()? {
            if let Ok(mut r) = postcard::from_bytes::<Record>(&bytes) {
                r.connections = 0;
                devices.insert(r.health.device.clone(), r);
            }
        }
        Ok(Self {
            storage,
            devices: Mutex::new(devices),
        })
    }

    fn save(&self, r: &Record) {
        if let Ok(bytes) = postcard::to_stdvec(r)
            && let Err(e) = self.storage.save_device(&r.health.device, &bytes)
        {
            tracing::warn!(device = %r.health.device, "cannot store device health: {e}");
        }
    }

    /// Changes `device`'s record and writes it, unless `f` says it may wait.
    fn update(&self, device: &DeviceId, f: impl FnOnce(&mut Record) -> Save) {
        let mut all = self.devices.lock().expect("devices lock");
        if let Some(r) = all.get_mut(device) {
            let now = now_ms();
            if f(r) == Save::IfDue && now - r.saved_ms < SAVE_DELIVERIES_EVERY_MS {
                return;
            }
            r.saved_ms = now;
            let copy = r.clone();
            drop(all);
            self.save(&copy);
        }
    }

    /// The teams `device` belonged to at its last hello (empty if unknown).
    pub fn teams_of(&self, device: &DeviceId) -> Vec<TeamId> {
        self.devices
            .lock()
            .expect("devices lock")
            .get(device)
            .map(|r| r.health.teams.clone())
            .unwrap_or_default()
    }

    /// A device said hello.
    pub fn hello(
        &self,
        claims: &Claims,
        protocol_version: u16,
        app_version: &str,
        granted: &Subscription,
    ) {
        let now = now_ms();
        let mut all = self.devices.lock().expect("devices lock");
        let r = all.entry(claims.device.clone()).or_insert_with(|| Record {
            health: DeviceHealth {
                device: claims.device.clone(),
                member: claims.member.to_string(),
                teams: claims.teams.clone(),
                protocol_version,
                app_version: app_version.to_string(),
                last_seen_ms: now,
                last_sync_ms: None,
                pending_updates: 0,
                bytes_today: 0,
                connected: false,
            },
            delivered: 0,
            subscription: granted.clone(),
            day: day_of(now),
            connections: 0,
            quarantined: None,
            saved_ms: 0,
        });
        r.health.member = claims.member.to_string();
        r.health.teams = claims.teams.clone();
        r.health.protocol_version = protocol_version;
        r.health.app_version = app_version.to_string();
        r.health.last_seen_ms = now;
        r.subscription = granted.clone();
        r.connections += 1;
        r.saved_ms = now;
        let copy = r.clone();
        drop(all);
        self.save(&copy);
    }

    /// Whether `device` is in quarantine: it is already, or it (a volunteer) last synced
    /// longer than `horizon` ago. Returns how long it had been offline. Call before
    /// [`hello`](Self::hello).
    pub fn quarantine_check(
        &self,
        claims: &Claims,
        horizon: Option<std::time::Duration>,
    ) -> Option<i64> {
        let mut all = self.devices.lock().expect("devices lock");
        let r = all.get_mut(&claims.device)?;
        if r.quarantined.is_none()
            && claims.role == redline_proto::token::Role::Volunteer
            && let (Some(h), Some(last)) = (horizon, r.health.last_sync_ms)
        {
            let offline = now_ms() - last;
            if offline > h.as_millis() as i64 {
                r.quarantined = Some(offline);
                r.saved_ms = now_ms();
                let copy = r.clone();
                drop(all);
                self.save(&copy);
                return Some(offline);
            }
        }
        r.quarantined
    }

    /// Whether `device` finished a sync before (it is known, not new).
    pub fn synced_before(&self, device: &DeviceId) -> bool {
        self.devices
            .lock()
            .expect("devices lock")
            .get(device)
            .is_some_and(|r| r.health.last_sync_ms.is_some())
    }

    /// Puts `device` in quarantine now (it pushed with an actor never seen before for an
    /// existing document: its store was reset or restored). Returns the time since its
    /// last sync.
    pub fn mark_quarantined(&self, device: &DeviceId) -> i64 {
        let mut offline = 0;
        self.update(device, |r| {
            offline = r.health.last_sync_ms.map_or(0, |l| now_ms() - l);
            r.quarantined.get_or_insert(offline);
            Save::Now
        });
        offline
    }

    /// Ends `device`'s quarantine (a lead accepted all it held).
    pub fn release(&self, device: &DeviceId) {
        self.update(device, |r| {
            r.quarantined = None;
            Save::Now
        });
    }

    /// A device was brought up to feed sequence `seq` (on every live delivery: written
    /// at most every [`SAVE_DELIVERIES_EVERY_MS`], and when its connection closes).
    pub fn caught(&self, device: &DeviceId, seq: u64) {
        self.update(device, |r| {
            r.delivered = seq;
            r.health.last_sync_ms = Some(now_ms());
            Save::IfDue
        });
    }

    /// A device's connection ended after moving `bytes`.
    pub fn closed(&self, device: &DeviceId, bytes: u64) {
        self.update(device, |r| {
            let now = now_ms();
            if day_of(now) != r.day {
                r.day = day_of(now);
                r.health.bytes_today = 0;
            }
            r.health.bytes_today += bytes;
            r.health.last_seen_ms = now;
            r.connections = r.connections.saturating_sub(1);
            Save::Now
        });
    }

    /// Devices whose token names `team`, with what they lack up to `stable`.
    pub fn team(&self, team: &TeamId, stable: u64) -> Result<Vec<DeviceHealth>, Error> {
        let records: Vec<Record> = self
            .devices
            .lock()
            .expect("devices lock")
            .values()
            .filter(|r| r.health.teams.contains(team))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for r in records {
            let mut h = r.health;
            h.connected = r.connections > 0;
            h.pending_updates = self
                .storage
                .feed(r.delivered, stable)?
                .iter()
                .filter(|(_, doc)| r.subscription.covers(doc))
                .count() as u64;
            if day_of(now_ms()) != r.day {
                h.bytes_today = 0;
            }
            out.push(h);
        }
        out.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(out)
    }

    /// Devices known, connected now, and seen within the last hour (for metrics).
    pub fn counts(&self) -> (usize, usize, usize) {
        let hour_ago = now_ms() - 3_600_000;
        let all = self.devices.lock().expect("devices lock");
        (
            all.len(),
            all.values().filter(|r| r.connections > 0).count(),
            all.values()
                .filter(|r| r.health.last_seen_ms >= hour_ago)
                .count(),
        )
    }
}
