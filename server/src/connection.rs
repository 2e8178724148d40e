//! One device connection: accepts the device's streams and drives a
//! [`RelaySession`] on each, doing the I/O the session asks for.
//!
//! Per sync step: lock the document, apply, persist if anything is new, then let the
//! session queue the ack and reply. A bad document step gets an error report for that
//! document and the stream carries on; a broken stream (bad frame, protocol violation)
//! is answered with an error and finished; other streams and connections are untouched.

use std::sync::Arc;

use quinn::{RecvStream, SendStream};
use redline_proto::codec::{self, HEADER_LEN};
use redline_proto::message::Message;
use redline_proto::session::{RelayEvent, RelaySession};
use redline_proto::{DocId, ErrorCode};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Error;
use crate::config::RelayConfig;
use crate::hub::Hub;

/// Serves one incoming connection until it closes.
pub(crate) async fn serve(incoming: quinn::Incoming, hub: Arc<Hub>, config: Arc<RelayConfig>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            debug!(%remote, "handshake failed: {e}");
            return;
        }
    };
    let span = info_span!("conn", conn = conn.stable_id(), %remote);
    async move {
        debug!("connected");
        let mut streams = JoinSet::new();
        loop {
            tokio::select! {
                accepted = conn.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        let stream_span = info_span!("stream", id = %send.id());
                        streams.spawn(
                            serve_stream(send, recv, hub.clone(), config.clone()).instrument(stream_span),
                        );
                    }
                    Err(e) => {
                        debug!("connection ended: {e}");
                        break;
                    }
                },
                Some(done) = streams.join_next() => {
                    if let Ok(Err(e)) = done {
                        debug!("stream ended with error: {e}");
                    }
                }
            }
        }
        // The connection is gone; streams still writing will fail on their own.
        while streams.join_next().await.is_some() {}
    }
    .instrument(span)
    .await
}

/// Reads one frame: `Ok(None)` at a clean end of stream (between frames).
async fn read_message(recv: &mut RecvStream, max_frame: usize) -> Result<Option<Message>, Error> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(redline_proto::Error::Truncated { have: n }.into());
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(Error::Connection(e.to_string())),
    }
    let len = codec::payload_len(header, max_frame)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(n) => {
            Error::Protocol(redline_proto::Error::Truncated {
                have: HEADER_LEN + n,
            })
        }
        quinn::ReadExactError::ReadError(e) => Error::Connection(e.to_string()),
    })?;
    Ok(Some(codec::decode_payload(&payload)?))
}

async fn flush_outbox(
    session: &mut RelaySession,
    send: &mut SendStream,
    max_frame: usize,
) -> Result<(), Error> {
    while let Some(msg) = session.poll_transmit() {
        let frame = match codec::encode_frame(&msg, max_frame) {
            Ok(f) => f,
            Err(e) => {
                // Too large to send in one frame: tell the device instead of going silent.
                let doc = match &msg {
                    Message::Sync(s) => Some(s.doc.clone()),
                    _ => None,
                };
                warn!("cannot send {}: {e}", msg.kind());
                session.report(ErrorCode::TOO_LARGE, e.to_string(), doc);
                continue;
            }
        };
        send.write_all(&frame)
            .await
            .map_err(|e| Error::Connection(e.to_string()))?;
    }
    Ok(())
}

async fn serve_stream(
    mut send: SendStream,
    mut recv: RecvStream,
    hub: Arc<Hub>,
    config: Arc<RelayConfig>,
) -> Result<(), Error> {
    let mut session = RelaySession::new(config.name.clone());
    let result = drive(&mut session, &mut send, &mut recv, &hub, &config).await;
    if let Err(e) = &result
        && let Error::Protocol(p) = e
    {
        session.report(p.code(), p.to_string(), None);
    }
    // Best effort: the device may already be gone.
    let _ = flush_outbox(&mut session, &mut send, config.max_frame).await;
    let _ = send.finish();
    result
}

async fn drive(
    session: &mut RelaySession,
    send: &mut SendStream,
    recv: &mut RecvStream,
    hub: &Hub,
    config: &RelayConfig,
) -> Result<(), Error> {
    while let Some(msg) = read_message(recv, config.max_frame).await? {
        match session.handle_message(msg) {
            Ok(Some(RelayEvent::DeviceHello {
                device,
                app_version,
            })) => {
                info!(%device, %app_version, "device hello");
            }
            Ok(Some(RelayEvent::SyncStep { doc, message })) => {
                sync_step(session, hub, &doc, message).await;
            }
            Ok(None) => {}
            // A refused document: the session queued its report; the stream goes on.
            Err(e) if e.doc().is_some() => debug!("refused a step: {e}"),
            Err(e) => {
                flush_outbox(session, send, config.max_frame).await?;
                return Err(e.into());
            }
        }
        flush_outbox(session, send, config.max_frame).await?;
    }
    Ok(())
}

/// Applies one step to the relay's copy, persists, and queues ack and reply. Failures are
/// reported to the device for this document only.
async fn sync_step(
    session: &mut RelaySession,
    hub: &Hub,
    doc_id: &DocId,
    message: Option<automerge::sync::Message>,
) {
    let handle = match hub.doc(doc_id).await {
        Ok(h) => h,
        Err(e) => {
            warn!(doc = %doc_id, "cannot load: {e}");
            session.report(
                ErrorCode::STORAGE_FAILURE,
                e.to_string(),
                Some(doc_id.clone()),
            );
            return;
        }
    };
    let mut doc = handle.lock().await;
    let applied = match session.apply(doc_id, &mut doc, message) {
        Ok(a) => a,
        Err(e) => {
            debug!(doc = %doc_id, "refused: {e}");
            session.report(e.code(), e.to_string(), Some(doc_id.clone()));
            return;
        }
    };
    if applied.new_changes > 0 {
        let bytes = doc.save();
        if let Err(e) = hub.persist(doc_id, bytes).await {
            warn!(doc = %doc_id, "cannot persist: {e}");
            session.report(
                ErrorCode::STORAGE_FAILURE,
                "the relay could not store the document; nothing was acknowledged".into(),
                Some(doc_id.clone()),
            );
            return;
        }
        debug!(doc = %doc_id, new_changes = applied.new_changes, "persisted");
    }
    session.respond(doc_id, &doc, applied);
}
