//! Device bytes on their way to Automerge: the one door for every path.
//!
//! A push carries a bundle, an upload carries a bundle in pieces, a fallback sync step
//! carries change chunks (Automerge's sync messages). Whatever the path, the bytes are
//! split into chunks here, each chunk is pre-scanned by the [`bundle_guard`] (size
//! bombs) and parsed under `catch_unwind` (automerge 0.12 panics on some malformed
//! input). Whole-document chunks are refused: a device sends changes, never a document
//! (a document chunk would bring in whatever it holds, unchecked, and Automerge's
//! loader is the least guarded parser). What comes out is a list of [`Change`]s that the
//! relay then admits change by change (actors, scope, authorship, quarantine, size)
//! before anything is applied.
//!
//! [`bundle_guard`]: crate::bundle_guard

use automerge::Change;

use redline_proto::wire::split_chunk;

use crate::bundle_guard;

const DOCUMENT: u8 = 0;
const CHANGE: u8 = 1;
const COMPRESSED_CHANGE: u8 = 2;
const BUNDLE: u8 = 3;

/// Splits `bytes` (one or more concatenated Automerge chunks) into changes, refusing
/// documents, size bombs and anything Automerge cannot parse (empty input too).
pub fn device_changes(bytes: &[u8]) -> Result<Vec<Change>, String> {
    if bytes.is_empty() {
        return Err("no Automerge data".into());
    }
    let mut changes = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (chunk, kind, after) = split_chunk(rest)?;
        match kind {
            DOCUMENT => {
                return Err(
                    "a whole-document chunk: devices send changes, never a document".into(),
                );
            }
            BUNDLE => changes.extend(bundle(chunk)?),
            CHANGE => changes.push(change(chunk)?),
            COMPRESSED_CHANGE => {
                return Err(
                    "a compressed change chunk: send changes uncompressed or as a bundle".into(),
                );
            }
            other => return Err(format!("unknown Automerge chunk type {other}")),
        }
        rest = after;
    }
    Ok(changes)
}

/// Whether `bytes` (chunks [`device_changes`] accepted) may be stored and forwarded as
/// the device sent them: every chunk's checksum holds and its length is written in the
/// fewest bytes. Automerge's loader (a phone loading its store, which keeps received
/// chunks as they came) refuses a chunk whose checksum is wrong, where the decoders
/// the intake uses never look at it; such bytes are stored encoded again instead.
pub fn storable_as_sent(bytes: &[u8]) -> bool {
    let mut rest = bytes;
    while !rest.is_empty() {
        let Ok((chunk, kind, after)) = split_chunk(rest) else {
            return false;
        };
        let Some((_, used)) = redline_proto::wire::uleb(&chunk[9..]) else {
            return false;
        };
        if redline_proto::wire::seal_chunk(kind, &chunk[9 + used..]) != chunk {
            return false;
        }
        rest = after;
    }
    true
}

/// A device's sync step, as the relay takes it apart: the Automerge sync message with
/// its changes taken out (it only moves the sync state), and those changes through
/// [`device_changes`]. `Ok((None, []))` for a step that carries no message.
pub fn sync_step(
    step: &redline_proto::message::SyncStep,
) -> Result<(Option<automerge::sync::Message>, Vec<Change>), (redline_proto::ErrorCode, String)> {
    use redline_proto::session::RelayResync;
    let mut message = RelayResync::decode(step).map_err(|e| (e.code(), e.to_string()))?;
    let chunks = message
        .as_mut()
        .map(RelayResync::take_changes)
        .unwrap_or_default();
    let mut changes = Vec::new();
    for chunk in &chunks {
        changes.extend(
            device_changes(chunk).map_err(|e| (redline_proto::ErrorCode::BAD_DOCUMENT_DATA, e))?,
        );
    }
    Ok((message, changes))
}

fn bundle(chunk: &[u8]) -> Result<Vec<Change>, String> {
    // Size bombs first: Automerge would materialise whatever the columns announce.
    bundle_guard::check(chunk)?;
    std::panic::catch_unwind(|| {
        let bundle = automerge::Bundle::try_from(chunk)
            .map_err(|e| format!("not an Automerge bundle: {e}"))?;
        bundle
            .to_changes()
            .map_err(|e| format!("bundle does not decode: {e}"))
    })
    .unwrap_or_else(|_| Err("Automerge could not parse the bundle".into()))
}

fn change(chunk: &[u8]) -> Result<Change, String> {
    bundle_guard::check_change(chunk)?;
    std::panic::catch_unwind(|| {
        Change::try_from(chunk).map_err(|e| format!("not an Automerge change: {e}"))
    })
    .unwrap_or_else(|_| Err("Automerge could not parse the change".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ROOT};

    fn doc_with_changes(n: usize) -> Automerge {
        let mut doc = Automerge::new();
        for i in 0..n {
            doc.transact::<_, _, automerge::AutomergeError>(|tx| {
                tx.put(ROOT, format!("k{i}"), i as i64)?;
                Ok(())
            })
            .unwrap();
        }
        doc
    }

    #[test]
    fn bundles_and_change_chunks_decode_alike() {
        let doc = doc_with_changes(3);
        let hashes: Vec<_> = doc.get_changes(&[]).iter().map(|c| c.hash()).collect();
        let bundle = doc.bundle(hashes.clone()).unwrap().bytes().to_vec();
        let from_bundle: Vec<_> = device_changes(&bundle)
            .unwrap()
            .iter()
            .map(|c| c.hash())
            .collect();
        assert_eq!(from_bundle, hashes);
        // Concatenated raw change chunks, as an Automerge sync message carries them.
        let raw: Vec<u8> = doc
            .get_changes(&[])
            .iter()
            .flat_map(|c| c.raw_bytes().to_vec())
            .collect();
        let from_raw: Vec<_> = device_changes(&raw)
            .unwrap()
            .iter()
            .map(|c| c.hash())
            .collect();
        assert_eq!(from_raw, hashes);
        assert!(device_changes(&[]).is_err());
    }

    #[test]
    fn documents_and_cut_chunks_are_refused() {
        let doc = doc_with_changes(2);
        let saved = doc.save();
        assert!(
            device_changes(&saved)
                .unwrap_err()
                .contains("whole-document")
        );
        let raw = doc.get_changes(&[])[0].raw_bytes().to_vec();
        for keep in 0..raw.len() {
            assert!(device_changes(&raw[..keep]).is_err(), "cut at {keep}");
        }
    }

    #[test]
    fn only_chunks_automerge_would_load_are_stored_as_sent() {
        let doc = doc_with_changes(3);
        let hashes: Vec<_> = doc.get_changes(&[]).iter().map(|c| c.hash()).collect();
        let bundle = doc.bundle(hashes).unwrap().bytes().to_vec();
        let raw: Vec<u8> = doc
            .get_changes(&[])
            .iter()
            .flat_map(|c| c.raw_bytes().to_vec())
            .collect();
        assert!(storable_as_sent(&bundle));
        assert!(storable_as_sent(&raw));
        let mut both = bundle.clone();
        both.extend_from_slice(&raw);
        assert!(storable_as_sent(&both));
        // A wrong checksum: the intake decodes it, Automerge's loader refuses it.
        for bytes in [&bundle, &raw] {
            let mut bad = bytes.clone();
            bad[5] ^= 0xff;
            assert!(device_changes(&bad).is_ok(), "the intake never looks at it");
            assert!(Automerge::load(&bad).is_err(), "the loader does");
            assert!(!storable_as_sent(&bad));
        }
        // A length written in more bytes than it needs.
        let (len, used) = redline_proto::wire::uleb(&bundle[9..]).unwrap();
        let mut padded = bundle[..9].to_vec();
        let mut v = len;
        for _ in 0..used {
            padded.push((v & 0x7f) as u8 | 0x80);
            v >>= 7;
        }
        padded.push(0);
        padded.extend_from_slice(&bundle[9 + used..]);
        assert!(!storable_as_sent(&padded));
    }

    fn body_of(chunk: &[u8]) -> (u8, Vec<u8>) {
        let (len, used) = redline_proto::wire::uleb(&chunk[9..]).unwrap();
        let start = 9 + used;
        (chunk[8], chunk[start..start + len as usize].to_vec())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]
        /// Bytes the relay stores and forwards as sent are loaded by phones with
        /// Automerge's own loader, not with the intake's decoders. Whatever a device
        /// does to a bundle's or a change's body (then sealing it with a checksum that
        /// holds): if the intake decodes it, the bytes are storable as sent, and the
        /// decoded changes apply into a document that saves and loads (what the relay
        /// takes), then Automerge's loader takes the same bytes, without a panic, to the
        /// same heads.
        #[test]
        fn what_the_intake_takes_as_sent_the_loader_reads_alike(
            n in 1usize..6,
            raw in proptest::bool::ANY,
            edits in proptest::collection::vec((proptest::num::usize::ANY, 1u8..=255), 0..4),
        ) {
            let doc = doc_with_changes(n);
            let hashes: Vec<_> = doc.get_changes(&[]).iter().map(|c| c.hash()).collect();
            let original = if raw {
                doc.get_changes(&[])[0].raw_bytes().to_vec()
            } else {
                doc.bundle(hashes).unwrap().bytes().to_vec()
            };
            let (kind, mut body) = body_of(&original);
            for (at, x) in edits {
                let i = at % body.len();
                body[i] ^= x;
            }
            // Sealed: a hostile device can give any body a header that holds.
            let bytes = redline_proto::wire::seal_chunk(kind, &body);
            let Ok(decoded) = device_changes(&bytes) else {
                return Ok(());
            };
            proptest::prop_assert!(storable_as_sent(&bytes));
            let applied = std::panic::catch_unwind(|| {
                let mut d = Automerge::new();
                d.apply_changes(decoded.clone()).ok()?;
                let again = Automerge::load(&d.save()).ok()?;
                (again.get_heads() == d.get_heads()).then_some(d)
            });
            let Ok(Some(relay)) = applied else {
                // The relay refuses it (its apply is guarded), or the plan would.
                return Ok(());
            };
            let loaded = std::panic::catch_unwind(|| Automerge::load(&bytes));
            let Ok(Ok(phone)) = loaded else {
                return Err(proptest::test_runner::TestCaseError::fail(format!(
                    "the relay takes these bytes and a phone cannot load them: {loaded:?}"
                )));
            };
            proptest::prop_assert_eq!(phone.get_heads(), relay.get_heads());
        }
    }
}
