//! The admission rule's questions answered from the relay's state (the rule itself,
//! without IO, is `session::Admitting`), and holding a quarantined push.

use std::sync::Arc;

use redline_proto::{DocId, ErrorCode};
use tracing::warn;

use crate::Error;
use crate::session::{Admission, Admitting, Outcome, Question, Step, Verdict};
use crate::state::RelayState;

/// Holds a quarantined push: held (with the words for the device), or why not.
pub(super) async fn hold(
    relay: &Arc<RelayState>,
    entry: redline_proto::message::QuarantineEntry,
    bundle: Vec<u8>,
    quota: u64,
) -> Result<Outcome, Error> {
    let offline_h = entry.offline_ms / 3_600_000;
    crate::quarantine::hold(relay, entry, bundle, quota).await?;
    Ok(Outcome::Held(format!(
        "this phone was offline for {offline_h} h: its changes are kept on the relay for a lead's review and merge once accepted"
    )))
}

/// The one admission rule for push, upload and sync (`session::Admitting`), its
/// questions answered from the relay's state.
pub(super) async fn admit(
    relay: &Arc<RelayState>,
    who: &Admission,
    doc: &DocId,
    changes: &[automerge::Change],
) -> Verdict {
    let today = i64::try_from(crate::auth::now_secs() / 86_400).unwrap_or(i64::MAX);
    let mut rule = Admitting::new(who, doc, changes, today);
    let mut step = rule.start();
    let storage = relay.hub.storage();
    loop {
        let question = match step {
            Step::Done(verdict) => {
                if let Some(quota) = rule.quota_refused() {
                    relay.metrics.quota_refused(quota);
                }
                if matches!(verdict, Verdict::Hold { starts: true }) {
                    warn!(%doc, "known device pushes with an unknown actor: quarantined");
                }
                return verdict;
            }
            Step::Ask(q) => q,
        };
        let yes = match question {
            Question::Exists => match relay.hub.exists(doc).await {
                Ok(yes) => yes,
                Err(e) => return Verdict::Refuse(ErrorCode::STORAGE_FAILURE, e.to_string()),
            },
            Question::TakeCreationSlot { day, limit } => {
                relay.hub.count_creation(&who.author.device, day, limit)
            }
            // A failed read counts as "none" and "bound": the push is not held for it.
            Question::DeviceHasActors => {
                matches!(storage.actors_of(&who.author.device), Ok(n) if n > 0)
            }
            Question::AnyUnbound(actors) => actors
                .iter()
                .any(|a| matches!(storage.actor_owner(a.to_bytes()), Ok(None))),
        };
        step = rule.answer(yes);
    }
}

/// Unix milliseconds now (when a push is held).
pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
