//! Framed messages on the connection's streams: reads bounded in time (a frame must
//! begin within one deadline and, once begun, arrive within another) and writes a
//! device must take within the write deadline.

use std::time::Duration;

use quinn::{RecvStream, SendStream};
use redline_proto::ErrorCode;
use redline_proto::codec::{self, HEADER_LEN};
use redline_proto::message::Message;

use crate::Error;

/// Reads one frame: `Ok(None)` at a clean end of stream (between frames). Waiting for a
/// frame to begin is bounded by `first`; once begun, the frame must arrive within
/// `rest` (a sender that trickles bytes is cut off).
pub(crate) async fn read_message(
    recv: &mut RecvStream,
    max_frame: usize,
    first: Option<Duration>,
    rest: Duration,
) -> Result<Option<Message>, Error> {
    match read_frame(recv, max_frame, first, rest).await? {
        None => Ok(None),
        Some(payload) => Ok(Some(codec::decode_payload(&payload)?)),
    }
}

/// Reads one frame's payload, with [`read_message`]'s deadlines.
pub(super) async fn read_frame(
    recv: &mut RecvStream,
    max_frame: usize,
    first: Option<Duration>,
    rest: Duration,
) -> Result<Option<Vec<u8>>, Error> {
    let timed_out = || Error::Refused {
        code: ErrorCode::TIMED_OUT,
        text: "the stream was silent too long".into(),
    };
    let mut header = [0u8; HEADER_LEN];
    let begin = recv.read_exact(&mut header);
    let begun = match first {
        Some(limit) => tokio::time::timeout(limit, begin)
            .await
            .map_err(|_| timed_out())?,
        None => begin.await,
    };
    match begun {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(redline_proto::Error::Truncated { have: n }.into());
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(Error::connection(e)),
    }
    let len = codec::payload_len(header, max_frame)?;
    let mut payload = vec![0u8; len];
    tokio::time::timeout(rest, recv.read_exact(&mut payload))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| match e {
            quinn::ReadExactError::FinishedEarly(n) => {
                Error::Protocol(redline_proto::Error::Truncated {
                    have: HEADER_LEN + n,
                })
            }
            quinn::ReadExactError::ReadError(e) => Error::connection(e),
        })?;
    Ok(Some(payload))
}

/// Writes one frame; a device that does not take it within `within` (it stopped
/// reading) is refused with `timed_out`.
pub(super) async fn write_message(
    send: &mut SendStream,
    msg: &Message,
    max_frame: usize,
    within: Duration,
) -> Result<(), Error> {
    let frame = codec::encode_frame(msg, max_frame)?;
    write_frame(send, &frame, within).await
}

pub(super) async fn write_frame(
    send: &mut SendStream,
    frame: &[u8],
    within: Duration,
) -> Result<(), Error> {
    match tokio::time::timeout(within, send.write_all(frame)).await {
        Ok(written) => written.map_err(Error::connection),
        Err(_) => Err(stopped_reading()),
    }
}

pub(super) fn stopped_reading() -> Error {
    Error::Refused {
        code: ErrorCode::TIMED_OUT,
        text: "the device stopped reading".into(),
    }
}
