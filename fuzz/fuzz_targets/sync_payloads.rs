//! The relay's handling of sync payloads: push bundles applied to a stored document, and
//! Automerge sync messages taken apart by the relay's intake (the same guard as pushes).
//! Hostile bytes are refused; nothing panics the relay.
#![no_main]

use std::sync::OnceLock;

use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT};
use libfuzzer_sys::fuzz_target;
use redline_proto::DocId;
use redline_proto::message::SyncStep;
use redline_proto::session::RelayResync;
use redline_server::hub::apply_untrusted;

fn base() -> &'static Automerge {
    static BASE: OnceLock<Automerge> = OnceLock::new();
    BASE.get_or_init(|| {
        let id = DocId::parse("ledger/t1/2026-11-29").unwrap();
        let mut doc = redline_proto::genesis::genesis(&id);
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, "note", "seed")?;
            Ok(())
        })
        .unwrap();
        doc
    })
}

fuzz_target!(|data: &[u8]| {
    // The relay runs Automerge's parsing under `catch_unwind` (automerge 0.12 panics on
    // some malformed bundles; see server/tests/regressions). libfuzzer-sys's panic hook
    // would abort on those caught panics too; silence it, so only panics that escape the
    // relay's guards (and reach libfuzzer-sys's own catch) count as crashes.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let mut doc = base().clone();
    if mode % 2 == 0 {
        let _ = apply_untrusted(&mut doc, bytes);
    } else {
        let step = SyncStep {
            doc: DocId::parse("ledger/t1/2026-11-29").unwrap(),
            data: Some(bytes.to_vec()),
        };
        // The relay's sync path: the intake takes the step apart (its changes guarded
        // like a push's), and only what is left reaches Automerge's sync state.
        if let Ok((message, _changes)) = redline_server::intake::sync_step(&step) {
            let before = doc.get_heads();
            let mut session = RelayResync::new();
            let _ = session.apply(&step.doc, &mut doc, message);
            assert_eq!(doc.get_heads(), before, "a sync step changed the document");
        }
    }
});
