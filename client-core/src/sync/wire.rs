//! The session's streams: framed reads and writes with byte counters, the tasks that
//! read the control stream and the relay's transfers, and the upload streams (each
//! driving an [`UploadSender`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use quinn::{RecvStream, SendStream};
use redline_proto::codec::{self, FrameDecoder};
use redline_proto::message::Message;
use redline_proto::wire::transfer_id;
use tokio::sync::mpsc;

use crate::Error;
use crate::device_session::{UploadEnd, UploadSender};
use crate::progress::Traffic;

/// This session's counters and the client's running totals.
#[derive(Clone)]
pub(crate) struct Counters {
    pub session: Arc<Traffic>,
    pub totals: Arc<Traffic>,
}

impl Counters {
    fn sent(&self, bytes: usize) {
        for t in [&self.session, &self.totals] {
            t.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
            t.frames_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn received(&self, bytes: usize) {
        for t in [&self.session, &self.totals] {
            t.bytes_received.fetch_add(bytes as u64, Ordering::Relaxed);
            t.frames_received.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Writes one encoded frame.
pub(crate) async fn write_frame(
    send: &mut SendStream,
    frame: &[u8],
    counters: &Counters,
) -> Result<(), Error> {
    send.write_all(frame).await.map_err(Error::network)?;
    counters.sent(frame.len());
    Ok(())
}

async fn write(send: &mut SendStream, msg: &Message, counters: &Counters) -> Result<(), Error> {
    let frame = codec::encode_frame(msg, codec::DEFAULT_MAX_FRAME)?;
    write_frame(send, &frame, counters).await
}

/// Reads the messages of one stream, frame by frame, through the protocol's one frame
/// decoder.
pub(crate) struct FrameReader {
    recv: RecvStream,
    decoder: FrameDecoder,
    counters: Counters,
    ended: bool,
}

impl FrameReader {
    pub fn new(recv: RecvStream, max_frame: usize, counters: Counters) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(max_frame),
            counters,
            ended: false,
        }
    }

    /// The next message with its extensions; `None` when the stream ended cleanly
    /// between frames.
    pub async fn next(&mut self) -> Result<Option<(Message, codec::Extensions)>, Error> {
        loop {
            if let Some((msg, ext, len)) = self.decoder.next_frame()? {
                self.counters.received(len);
                return Ok(Some((msg, ext)));
            }
            if self.ended {
                self.decoder.finish()?;
                return Ok(None);
            }
            match self.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes),
                Ok(None) => self.ended = true,
                Err(e) => return Err(Error::network(e)),
            }
        }
    }

    /// The next message, without extensions.
    pub async fn next_message(&mut self) -> Result<Option<Message>, Error> {
        Ok(self.next().await?.map(|(m, _)| m))
    }
}

/// Reads the control stream into `inbox` until it ends or fails (reads are not
/// cancel-safe inside `select!`, so they run in their own task).
pub(crate) async fn read_control(
    mut reader: FrameReader,
    inbox: mpsc::Sender<Result<(Message, codec::Extensions), Error>>,
) {
    loop {
        let r = reader.next().await;
        let stop = !matches!(r, Ok(Some(_)));
        let item = match r {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(Error::transport("the relay closed the control stream")),
            Err(e) => Err(e),
        };
        if inbox.send(item).await.is_err() || stop {
            break;
        }
    }
}

/// Runs one upload on a stream of its own.
pub(crate) async fn upload(
    conn: quinn::Connection,
    mut sender: UploadSender,
    counters: Counters,
    max_frame: usize,
) -> Result<UploadEnd, Error> {
    let (mut send, recv) = conn.open_bi().await.map_err(Error::network)?;
    let mut reader = FrameReader::new(recv, max_frame, counters.clone());
    loop {
        while let Some(msg) = sender.poll_transmit() {
            write(&mut send, &msg, &counters).await?;
        }
        if let Some(end) = sender.handle(reader.next_message().await?)? {
            return Ok(end);
        }
    }
}

/// Reads the pieces of one relay-to-device transfer, storing each durably so a cut
/// connection resumes where it stopped.
pub(crate) async fn receive_transfer(
    client: std::sync::Weak<crate::client::Inner>,
    recv: RecvStream,
    counters: Counters,
) -> Result<([u8; 16], Vec<u8>), Error> {
    let mut reader = FrameReader::new(recv, codec::DEFAULT_MAX_FRAME, counters);
    let mut id = None;
    while let Some(msg) = reader.next_message().await? {
        let Message::Piece(p) = msg else {
            return Err(Error::transport("a transfer stream holds pieces only"));
        };
        if id.is_some_and(|i| i != p.id) {
            return Err(Error::transport("transfer piece out of place"));
        }
        id = Some(p.id);
        // Held weakly: a finished session must not keep the store open.
        let inner = client
            .upgrade()
            .ok_or_else(|| Error::transport("client closed"))?;
        tokio::task::spawn_blocking(move || {
            inner.store.put_transfer_piece(&p.id, p.offset, &p.data)
        })
        .await
        .map_err(|e| Error::Store(e.to_string()))??;
    }
    let id = id.ok_or_else(|| Error::transport("empty transfer"))?;
    let inner = client
        .upgrade()
        .ok_or_else(|| Error::transport("client closed"))?;
    let buf = inner.store.transfer_bytes(&id)?;
    if transfer_id(&buf) != id {
        inner.store.drop_transfer(&id)?;
        return Err(Error::transport("transfer bytes do not match their id"));
    }
    Ok((id, buf))
}
