//! The sync driver: runs a [`ClientSession`] over a QUIC stream to the relay and reports
//! what moved.

use std::time::{Duration, Instant};

use redline_proto::DeviceId;
use redline_proto::session::{ClientEvent, ClientSession, DocToSync, SyncedDoc};
use tracing::debug;

use crate::transport::{self, FramedStream};
use crate::{Error, RelayEndpoint};

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Documents offered to the relay.
    pub docs: usize,
    /// Documents whose exchange completed.
    pub docs_settled: usize,
    /// Documents the relay refused, with its reason.
    pub refused: Vec<(String, String)>,
    /// Documents that changed on this device because of the sync.
    pub docs_updated: usize,
    /// Changes the relay reported as new to it (and stored before acknowledging).
    pub changes_sent: u64,
    /// Changes received from the relay.
    pub changes_received: u64,
    /// Bytes sent on the stream (frames, before QUIC and TLS overhead).
    pub bytes_sent: u64,
    /// Bytes received on the stream.
    pub bytes_received: u64,
    /// Wall time of the sync, connection set-up included.
    pub duration: Duration,
}

/// Connects, runs the session to completion and hands back the documents.
pub(crate) async fn run(
    endpoint: &quinn::Endpoint,
    relay: &RelayEndpoint,
    device: DeviceId,
    app_version: String,
    docs: Vec<DocToSync>,
    max_frame: usize,
) -> Result<(Vec<SyncedDoc>, SyncReport), Error> {
    let started = Instant::now();
    let connection = transport::connect(endpoint, relay).await?;
    let (send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| Error::Transport(format!("cannot open a stream: {e}")))?;
    let mut stream = FramedStream {
        send,
        recv,
        max_frame,
        bytes_sent: 0,
        bytes_received: 0,
    };
    let mut session = ClientSession::new(device, app_version, docs);
    let mut report = SyncReport {
        docs: session.docs_total(),
        ..SyncReport::default()
    };

    let outcome = async {
        loop {
            while let Some(msg) = session.poll_transmit() {
                stream.send(&msg).await?;
            }
            while let Some(event) = session.poll_event() {
                match event {
                    ClientEvent::Refused { doc, report: r } => {
                        report
                            .refused
                            .push((doc.to_string(), format!("{}: {}", r.code, r.text)));
                    }
                    other => debug!(?other, "sync event"),
                }
            }
            if session.is_finished() {
                return Ok(());
            }
            match stream.receive().await? {
                Some(msg) => session.handle_message(msg)?,
                None => {
                    return Err(Error::Transport(
                        "the relay ended the stream before the sync finished".into(),
                    ));
                }
            }
        }
    }
    .await;
    let _ = stream.send.finish();
    // The endpoint lives on in the client, so the close reaches the relay without waiting.
    connection.close(0u8.into(), b"done");
    outcome?;

    let synced = session.finish();
    report.docs_settled = synced.iter().filter(|d| d.settled).count();
    report.docs_updated = synced.iter().filter(|d| d.changes_received > 0).count();
    report.changes_sent = synced.iter().map(|d| d.changes_sent).sum();
    report.changes_received = synced.iter().map(|d| d.changes_received).sum();
    report.bytes_sent = stream.bytes_sent;
    report.bytes_received = stream.bytes_received;
    report.duration = started.elapsed();
    Ok((synced, report))
}
