//! Following a feed that other relays write too (PostgreSQL shared by several relays).
//!
//! Sequences are handed out by storage, in commit order across relays (a flushed
//! sequence has every lower one flushed). The relay's *stable* sequence therefore is
//! the head of the stored feed, with one condition: before devices are told about a
//! sequence, every cached document that another relay committed to at or below it is
//! marked stale, so that no catch-up serves its old heads as current. The follower does
//! that, in this order, whenever storage announces a move (NOTIFY), this relay flushed,
//! or [`REREAD`] passed (the safety net for announcements lost while reconnecting).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tracing::warn;

use super::Hub;
use crate::Error;

/// The feed's head is read at least this often.
pub const REREAD: Duration = Duration::from_millis(500);

/// Follows the shared feed until the hub is gone.
pub(super) async fn follow(
    hub: Weak<Hub>,
    mut signal: Option<watch::Receiver<u64>>,
    kick: Arc<Notify>,
) {
    loop {
        let announced = async {
            // No announcements (or they stopped): the re-read alone.
            match signal.as_mut() {
                Some(s) => {
                    if s.changed().await.is_err() {
                        std::future::pending::<()>().await
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = announced => {}
            _ = kick.notified() => {}
            _ = tokio::time::sleep(REREAD) => {}
        }
        let Some(hub) = hub.upgrade() else { return };
        if let Err(e) = hub.follow_feed().await {
            warn!("cannot read the shared feed: {e}");
        }
    }
}

impl Hub {
    /// Reads the feed's head and what was committed up to it; marks the cached
    /// documents other relays committed to as stale; then moves the stable sequence.
    async fn follow_feed(&self) -> Result<(), Error> {
        let known = self.followed.load(Ordering::Acquire);
        let (head, entries) = self.blocking(move |s| s.committed_feed(known)).await?;
        if head <= known {
            return Ok(());
        }
        {
            let slots = self.slots.lock().expect("hub lock");
            for (seq, doc) in &entries {
                if let Some(slot) = slots.get(doc)
                    && slot.included.load(Ordering::Acquire) < *seq
                {
                    slot.stale.store(true, Ordering::Release);
                }
            }
        }
        self.followed.store(head, Ordering::Release);
        self.stable.send_if_modified(|v| {
            let forward = head > *v;
            if forward {
                *v = head;
            }
            forward
        });
        Ok(())
    }
}
