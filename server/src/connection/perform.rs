//! The driver's side of the session's actions: sending, admitting and committing pushes,
//! holding quarantined ones, answering hub queries, starting transfers, serving a lead's
//! requests and accepting uploads.

use std::sync::Arc;
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use redline_proto::ErrorCode;
use redline_proto::message::{Message, Piece};
use redline_proto::wire::{TRANSFER_PIECE, transfer_id};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::RateLimit;
use super::admission::{admit, hold, now_ms};
use super::frames::write_message;
use super::resync::resync_step;
use super::upload::{UploadCtx, upload};
use crate::Error;
use crate::authorship::Author;
use crate::config::RelayConfig;
use crate::hub::Window;
use crate::session::error_msg;
use crate::session::{Action, Answer, Input, Outcome, Peer, PushWork, Query, Request, Session};
use crate::state::RelayState;

/// Performs a [`Session`]'s actions over QUIC and the hub, and feeds their results back.
pub(super) struct Driver {
    pub(super) relay: Arc<RelayState>,
    pub(super) config: Arc<RelayConfig>,
    pub(super) conn: quinn::Connection,
    /// The control stream's writer.
    pub(super) out: mpsc::Sender<Message>,
    /// The message budget, shared with upload streams.
    pub(super) rate: RateLimit,
    /// Commits and holds in flight; each ends in an input.
    pub(super) pushes: JoinSet<Input>,
    pub(super) uploads: JoinSet<Result<(), Error>>,
    /// The stream the device opened last, until the session accepts it.
    pub(super) opened: Option<(SendStream, RecvStream)>,
}

impl Driver {
    /// A driver for `session` on `conn`, writing the control stream through `out`.
    pub(super) fn new(
        relay: Arc<RelayState>,
        config: Arc<RelayConfig>,
        conn: quinn::Connection,
        out: mpsc::Sender<Message>,
        session: &Session,
    ) -> Self {
        Self {
            relay,
            config,
            conn,
            out,
            rate: RateLimit(session.rate()),
            pushes: JoinSet::new(),
            uploads: JoinSet::new(),
            opened: None,
        }
    }

    /// Performs `action`; `Some` ends the connection with that result.
    pub(super) async fn perform(
        &mut self,
        session: &mut Session,
        action: Action,
    ) -> Option<Result<(), Error>> {
        let relay = self.relay.clone();
        match action {
            Action::Send(m) => {
                if self.out.send(m).await.is_err() {
                    return Some(Ok(()));
                }
            }
            Action::Admit(push) => {
                let who = session.peer().admission(&self.config);
                let verdict = admit(&relay, &who, &push.doc, &push.changes).await;
                session.handle(std::time::Instant::now(), Input::Admitted(push, verdict));
            }
            Action::Commit(push, author) => self.commit(push, author),
            Action::Hold(push, starts) => self.hold(session, push, starts),
            Action::Query(q) => {
                let answer = match answer(&relay, q).await {
                    Ok(a) => a,
                    Err(e) => Answer::Failed(e),
                };
                session.handle(std::time::Instant::now(), Input::Answer(answer));
            }
            Action::Transfer {
                bytes,
                start,
                update,
            } => {
                let timeout = self.config.limits.write_timeout;
                match transfer(&self.conn, bytes, start, timeout).await {
                    Ok(()) => {
                        if self.out.send(Message::Update(update)).await.is_err() {
                            return Some(Ok(()));
                        }
                    }
                    Err(e) => session.handle(std::time::Instant::now(), Input::TransferFailed(e)),
                }
            }
            Action::Delivered(upto) => relay.devices.caught(&session.peer().device, upto),
            Action::Serve(request) => {
                for reply in serve_request(&relay, session.peer(), request).await {
                    if self.out.send(reply).await.is_err() {
                        return Some(Ok(()));
                    }
                }
            }
            Action::Resync(step) => {
                resync_step(&relay, session.peer_mut(), &self.config, step).await;
                while let Some(m) = session.peer_mut().resync.poll_transmit() {
                    if self.out.send(m).await.is_err() {
                        return Some(Ok(()));
                    }
                }
            }
            Action::AcceptUpload => {
                if let Some((s, r)) = self.opened.take() {
                    let up = UploadCtx {
                        relay,
                        config: self.config.clone(),
                        who: session.peer().admission(&self.config),
                        known: session.peer().known.clone(),
                        rate: self.rate.clone(),
                        arrival: session.peer().arrival,
                    };
                    self.uploads.spawn(upload(s, r, up).in_current_span());
                }
            }
            Action::Close(e) => return Some(Err(e)),
            Action::End => return Some(Ok(())),
        }
        None
    }

    /// Commits a push through the hub in a task of its own; its end comes back as an
    /// input.
    fn commit(&mut self, push: PushWork, author: Author) {
        let relay = self.relay.clone();
        let pushed = push.changes.iter().map(|c| c.hash()).collect();
        self.pushes.spawn(async move {
            let arrived = std::time::Instant::now();
            let result = relay
                .hub
                .push_as_sent(&push.doc, &author, push.changes, push.bundle)
                .await
                .map(Outcome::Committed);
            relay
                .metrics
                .commit_latency
                .observe(arrived.elapsed().as_secs_f64());
            Input::Committed {
                doc: push.doc,
                device_heads: push.device_heads,
                pushed,
                result,
            }
        });
    }

    /// Holds a push for a lead's review (first marking the device quarantined when this
    /// push starts it).
    fn hold(&mut self, session: &mut Session, push: PushWork, starts: bool) {
        let relay = self.relay.clone();
        if starts {
            let offline = relay.devices.mark_quarantined(&session.peer().device);
            session.handle(std::time::Instant::now(), Input::QuarantineStarted(offline));
        }
        let entry = session
            .peer()
            .held_entry(&push.doc, push.changes.len(), now_ms());
        let quota = self.config.quotas.held_bytes_per_device;
        self.pushes.spawn(async move {
            let result = hold(&relay, entry, push.bundle, quota).await;
            Input::Committed {
                doc: push.doc,
                device_heads: push.device_heads,
                pushed: Vec::new(),
                result,
            }
        });
    }
}

/// Answers a session's hub query.
pub(super) async fn answer(relay: &RelayState, query: Query) -> Result<Answer, Error> {
    Ok(match query {
        Query::List => Answer::Listed(relay.hub.list().await?),
        Query::ChangedInScope {
            scope,
            after,
            upto,
            old,
        } => Answer::Changed(
            relay
                .hub
                .changed_in_scope(&scope, after, upto, old.as_deref())
                .await?,
        ),
        Query::Lacks {
            doc,
            have_at,
            known,
            window,
            chunks,
        } => {
            let window = window.as_ref().map(|(after, upto, own)| Window {
                after: *after,
                upto: *upto,
                own,
                chunks,
            });
            Answer::Lacks(relay.hub.lacks(&doc, have_at, &known, window).await?)
        }
    })
}

/// A lead's or operator's request, answered from the relay's records (the session
/// checked that the peer may ask).
pub(super) async fn serve_request(
    relay: &Arc<RelayState>,
    peer: &Peer,
    request: Request,
) -> Vec<Message> {
    match request {
        Request::Devices(team) => vec![
            match relay.devices.team(&team, *relay.hub.stable().borrow()) {
                Ok(list) => Message::Devices(list),
                Err(e) => error_msg(ErrorCode::STORAGE_FAILURE, e.to_string(), None),
            },
        ],
        Request::Quarantine(team) => {
            vec![match crate::quarantine::list(relay, &peer.scope, &team) {
                Ok(list) => Message::Quarantine(list),
                Err(e) => error_msg(ErrorCode::STORAGE_FAILURE, e.to_string(), None),
            }]
        }
        // Refused held pushes first (per document), then what stays held.
        Request::Accept(team, device) => {
            match crate::quarantine::accept(relay, &peer.scope, &team, &device).await {
                Ok(review) => {
                    let mut out: Vec<Message> =
                        review.refused.into_iter().map(Message::Error).collect();
                    out.push(Message::Quarantine(review.remaining));
                    out
                }
                Err(e) => vec![error_msg(ErrorCode::STORAGE_FAILURE, e.to_string(), None)],
            }
        }
    }
}

/// Starts sending `bytes` from `start` on a new unidirectional stream (pieces written by
/// a task of their own; a device that stops reading gets the stream reset).
pub(super) async fn transfer(
    conn: &quinn::Connection,
    bytes: Vec<u8>,
    start: u64,
    write_timeout: Duration,
) -> Result<(), Error> {
    let id = transfer_id(&bytes);
    // A device that allows no stream (or never reads one) must not hold the loop.
    let mut send = tokio::time::timeout(write_timeout, conn.open_uni())
        .await
        .map_err(|_| Error::Refused {
            code: ErrorCode::TIMED_OUT,
            text: "the device took no transfer stream".into(),
        })?
        .map_err(Error::connection)?;
    let start = start as usize;
    tokio::spawn(async move {
        let mut offset = start;
        // At least one piece, even an empty one, so the device learns the id of a
        // transfer it already holds whole.
        let rest = &bytes[start..];
        let pieces: Vec<&[u8]> = if rest.is_empty() {
            vec![rest]
        } else {
            rest.chunks(TRANSFER_PIECE).collect()
        };
        for piece in pieces {
            let msg = Message::Piece(Piece {
                id,
                offset: offset as u64,
                data: piece.to_vec(),
            });
            if write_message(
                &mut send,
                &msg,
                redline_proto::codec::DEFAULT_MAX_FRAME,
                write_timeout,
            )
            .await
            .is_err()
            {
                // The device stopped reading: let go of the stream and its bytes.
                let _ = send.reset(u32::from(ErrorCode::TIMED_OUT.0).into());
                return;
            }
            offset += piece.len();
        }
        let _ = send.finish();
    });
    Ok(())
}
