//! Which relay a sync goes to: the deployment's relays in order, failover to the next
//! when one cannot be reached, one sync ([`Client::sync`], [`Client::sync_for`]) or a
//! live session that reconnects with backoff ([`Client::go_live`]).

use std::sync::atomic::Ordering;

use super::LiveHooks;
use crate::client::Client;
use crate::{Error, SyncReport, transport};

/// A live connection to the relay, started by [`Client::go_live`]: local writes are pushed
/// as they happen, and others' changes arrive without polling. Reconnects with backoff
/// after network failures.
pub struct LiveSync {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// One report per connection: after its first flight, or its error.
    pub reports: tokio::sync::mpsc::UnboundedReceiver<Result<SyncReport, Error>>,
}

impl LiveSync {
    /// Ends the live session and waits for it to close.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl Client {
    async fn endpoint(&self, relay: &crate::RelayEndpoint) -> Result<quinn::Endpoint, Error> {
        let mut slot = self.inner.syncing.lock().await;
        Ok(match slot.as_ref() {
            Some(e)
                if e.local_addr()
                    .is_ok_and(|a| a.is_ipv6() == relay.addr.is_ipv6()) =>
            {
                e.clone()
            }
            _ => {
                let e = transport::client_endpoint(&relay.addr)?;
                *slot = Some(e.clone());
                e
            }
        })
    }

    /// Every relay of the deployment, in the order this device tries them
    /// ([`ClientConfig::relays_in_order`]).
    fn relays(&self) -> Result<Vec<crate::RelayEndpoint>, Error> {
        let all = self.inner.config.relays_in_order();
        if all.is_empty() {
            return Err(Error::NoRelay);
        }
        Ok(all)
    }

    /// The relay this client syncs with now (the one that answered last).
    pub fn current_relay(&self) -> Result<crate::RelayEndpoint, Error> {
        let relays = self.relays()?;
        let i = self.inner.relay_index.load(Ordering::Relaxed) % relays.len();
        Ok(relays[i].clone())
    }

    /// One session with `relay` (a sync, or a live session with `hooks`).
    async fn session_with(
        &self,
        relay: &crate::RelayEndpoint,
        hooks: Option<LiveHooks>,
    ) -> Result<SyncReport, Error> {
        let endpoint = self.endpoint(relay).await?;
        self.session(&endpoint, relay, hooks).await
    }

    /// Syncs with the relay once: pushes what the relay lacks, fetches what changed in the
    /// subscription, stores it all. Local writes may go on meanwhile. Cancel-safe: what
    /// was acknowledged or applied before a cancellation is kept. If the relay cannot be
    /// reached and the deployment has others ([`ClientConfig::other_relays`]), they are
    /// tried in turn; the one that answers is used first from then on.
    pub async fn sync(&self) -> Result<SyncReport, Error> {
        let relays = self.relays()?;
        let start = self.inner.relay_index.load(Ordering::Relaxed) % relays.len();
        let mut failed = None;
        for k in (0..relays.len()).map(|i| (start + i) % relays.len()) {
            match self.session_with(&relays[k], None).await {
                Err(e) if fails_over(&e) && relays.len() > 1 => {
                    tracing::info!(relay = %relays[k].addr, "relay unreachable, trying the next: {e}");
                    failed = Some(e);
                }
                result => {
                    if result.is_ok() {
                        self.inner.relay_index.store(k, Ordering::Relaxed);
                    }
                    return result;
                }
            }
        }
        Err(failed.unwrap_or(Error::NoRelay))
    }

    /// Syncs for at most `budget` (iOS BGTaskScheduler, Android WorkManager): the most
    /// urgent documents go first; at the deadline the sync stops cleanly, keeping
    /// everything acknowledged or received so far, and a later call finishes the job.
    pub async fn sync_for(&self, budget: std::time::Duration) -> Result<crate::BoundedSync, Error> {
        let report = match tokio::time::timeout(budget, self.sync()).await {
            Ok(report) => Some(report?),
            Err(_) => None,
        };
        Ok(crate::BoundedSync {
            report,
            progress: self.inner.progress.borrow().clone(),
        })
    }

    /// Stays connected: after a first flight like [`sync`](Self::sync), local writes are
    /// pushed as they happen and others' changes arrive as the relay commits them.
    /// Network failures are retried with backoff (1 s doubling to 30 s).
    pub fn go_live(&self) -> Result<LiveSync, Error> {
        let relays = self.relays()?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (report_tx, reports) = tokio::sync::mpsc::unbounded_channel();
        let client = self.clone();
        let task = tokio::spawn(async move {
            let mut backoff = std::time::Duration::from_secs(1);
            // Failures in a row: the other relays are tried at once, then backoff.
            let mut failures = 0usize;
            loop {
                if *stopped.borrow() {
                    return;
                }
                let hooks = LiveHooks {
                    stop: stopped.clone(),
                    first_flight: report_tx.clone(),
                };
                let k = client.inner.relay_index.load(Ordering::Relaxed) % relays.len();
                let result = client.session_with(&relays[k], Some(hooks)).await;
                let failed = result.is_err();
                let moves = matches!(&result, Err(e) if fails_over(e)) && relays.len() > 1;
                if moves {
                    client
                        .inner
                        .relay_index
                        .store((k + 1) % relays.len(), Ordering::Relaxed);
                }
                // Without valid credentials retrying cannot help: report and stop.
                let hopeless =
                    matches!(&result, Err(Error::Refused { code, .. }) if code.is_credential());
                if let Err(e) = result {
                    let _ = report_tx.send(Err(e));
                }
                if hopeless {
                    return;
                }
                if *stopped.borrow() {
                    return;
                }
                failures = if failed { failures + 1 } else { 0 };
                // The next relay at once, until each was tried since the last success.
                let try_next_now = moves && !failures.is_multiple_of(relays.len());
                if failed && !try_next_now {
                    let mut s = stopped.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = s.changed() => return,
                    }
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
                } else if !failed {
                    backoff = std::time::Duration::from_secs(1);
                }
            }
        });
        Ok(LiveSync {
            stop,
            task,
            reports,
        })
    }
}

/// Whether `e` says the relay could not be reached or went away (another relay of the
/// deployment may serve), rather than refused what was sent.
fn fails_over(e: &Error) -> bool {
    match e {
        Error::Transport { .. } => true,
        Error::Refused { code, .. } => *code == redline_proto::ErrorCode::SHUTTING_DOWN,
        _ => false,
    }
}
