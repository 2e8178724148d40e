//! Applying changes that came from devices: a panic inside Automerge (hostile data)
//! becomes an error instead of taking the relay's task down.

use automerge::{Automerge, Change};

use super::bundle_changes;

/// What the relay does with a push's bytes before they can reach a stored document:
/// decode the bundle, apply it. On error `doc` may be half-changed (the relay reloads it
/// from disk); the fuzz targets and property tests drive this with hostile bytes.
pub fn apply_untrusted(doc: &mut Automerge, bytes: &[u8]) -> Result<usize, String> {
    let changes = bundle_changes(bytes)?;
    let n = changes.len();
    guarded_apply(doc, changes)?;
    Ok(n)
}

/// `apply_changes` that turns a panic inside Automerge (hostile data) into an error. The
/// document may be half-changed afterwards either way: callers reload it.
pub(super) fn guarded_apply(doc: &mut Automerge, changes: Vec<Change>) -> Result<(), String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.apply_changes(changes))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("Automerge could not apply the changes".into()),
    }
}
