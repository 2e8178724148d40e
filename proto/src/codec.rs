//! Length-prefixed framing: a 4-byte big-endian payload length, then the payload (one
//! postcard-encoded [`Message`]).
//!
//! The length is checked against the limit as soon as the 4 header bytes are known, before
//! any buffer for the payload is reserved, so a peer announcing a 4 GiB frame costs
//! nothing. Decoding never panics on any input; every failure is an [`Error`].

use crate::{Error, Message};

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Default largest payload accepted in one frame (16 MiB).
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;
/// Largest `Hello` frame: it arrives before the device is authenticated.
pub const HELLO_MAX_FRAME: usize = 64 * 1024;

/// Reads a frame header and checks the announced length against `max_frame`.
pub fn payload_len(header: [u8; HEADER_LEN], max_frame: usize) -> Result<usize, Error> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max_frame {
        return Err(Error::FrameTooLarge {
            len,
            max: max_frame,
        });
    }
    if len == 0 {
        return Err(Error::EmptyFrame);
    }
    Ok(len)
}

/// Encodes `msg` as one frame (header and payload).
pub fn encode_frame(msg: &Message, max_frame: usize) -> Result<Vec<u8>, Error> {
    let mut out = vec![0u8; HEADER_LEN];
    out = postcard::to_extend(msg, out).map_err(|e| Error::Encode(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    if len > max_frame {
        return Err(Error::FrameTooLarge {
            len,
            max: max_frame,
        });
    }
    let len = u32::try_from(len).map_err(|_| Error::FrameTooLarge {
        len,
        max: max_frame,
    })?;
    out[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// Decodes one message from a frame's payload. Trailing bytes are an error.
pub fn decode_payload(payload: &[u8]) -> Result<Message, Error> {
    let (msg, rest) =
        postcard::take_from_bytes::<Message>(payload).map_err(|e| Error::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::Decode(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Incremental frame decoder for a byte stream: push what arrived, pop whole messages.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_frame: usize,
}

impl FrameDecoder {
    /// A decoder refusing payloads over `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_frame,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole message, `Ok(None)` if more bytes are needed, or the error that makes
    /// the rest of this stream unreadable.
    pub fn next_message(&mut self) -> Result<Option<Message>, Error> {
        let Some(header) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = payload_len(*header, self.max_frame)?;
        let Some(frame) = self.buf.get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        let msg = decode_payload(frame)?;
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(msg))
    }

    /// Call at end of stream: an error if a partial frame is left over.
    pub fn finish(&self) -> Result<(), Error> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::Truncated {
                have: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;
    use crate::{DeviceId, DocId};
    use proptest::prelude::*;

    fn subscription() -> Subscription {
        Subscription {
            org: Some(crate::OrgId::new("district-9").unwrap()),
            teams: vec![crate::TeamId::new("team-3").unwrap()],
            ledger_since: Some(crate::Day::new("2026-11-23").unwrap()),
            zones: vec![crate::ZoneId::new("zone-a").unwrap()],
            docs: vec![],
        }
    }

    fn samples() -> Vec<Message> {
        let doc = DocId::parse("ledger/team-1/2026-11-29").unwrap();
        vec![
            Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                device: DeviceId::new("phone-1").unwrap(),
                app_version: "1.2.3".into(),
                subscription: subscription(),
                token: "rl1.abc.def".into(),
            }),
            Message::Welcome(Welcome {
                protocol_version: 1,
                relay: "relay".into(),
                epoch: 77,
                granted: subscription(),
                quarantined: None,
            }),
            Message::Push(Push {
                doc: doc.clone(),
                bundle: vec![1, 2, 3],
                heads: vec![[3; 32]],
            }),
            Message::Pull(Pull {
                cursor: Some(Cursor {
                    epoch: 77,
                    seq: 123_456,
                    subscription: subscription(),
                }),
                resume: vec![UploadOffset {
                    id: [8; 16],
                    have: 262_144,
                }],
                defer_large: false,
            }),
            Message::Pull(Pull {
                cursor: None,
                resume: vec![],
                defer_large: false,
            }),
            Message::Update(Update {
                doc: doc.clone(),
                payload: Payload::Bundle(vec![9; 40]),
                heads: vec![[4; 32]],
            }),
            Message::Update(Update {
                doc: doc.clone(),
                payload: Payload::Transfer {
                    id: [5; 16],
                    len: 20_000_000,
                    document: true,
                },
                heads: vec![],
            }),
            Message::Caught(Cursor {
                epoch: 77,
                seq: 9,
                subscription: Subscription::default(),
            }),
            Message::Resync(doc.clone()),
            Message::Upload(Upload {
                id: [6; 16],
                doc: doc.clone(),
                len: 5,
                document: false,
                heads: vec![],
            }),
            Message::UploadOffset(UploadOffset {
                id: [6; 16],
                have: 3,
            }),
            Message::Piece(Piece {
                id: [6; 16],
                offset: 3,
                data: vec![1, 2],
            }),
            Message::Sync(SyncStep {
                doc: doc.clone(),
                data: Some(vec![0x42, 1, 2, 3]),
            }),
            Message::Sync(SyncStep {
                doc: doc.clone(),
                data: None,
            }),
            Message::Ack(Ack {
                doc: doc.clone(),
                heads: vec![[7; 32], [9; 32]],
                applied: 12,
            }),
            Message::Error(ErrorReport {
                code: ErrorCode::FORBIDDEN,
                text: "not your team".into(),
                doc: Some(doc),
            }),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for msg in samples() {
            let frame = encode_frame(&msg, DEFAULT_MAX_FRAME).unwrap();
            let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
            dec.push(&frame);
            assert_eq!(dec.next_message().unwrap(), Some(msg));
            assert_eq!(dec.next_message().unwrap(), None);
            dec.finish().unwrap();
        }
    }

    #[test]
    fn messages_split_at_every_byte_still_decode() {
        let stream: Vec<u8> = samples()
            .iter()
            .flat_map(|m| encode_frame(m, DEFAULT_MAX_FRAME).unwrap())
            .collect();
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut got = Vec::new();
        for b in &stream {
            dec.push(std::slice::from_ref(b));
            while let Some(m) = dec.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, samples());
    }

    #[test]
    fn oversized_frame_is_refused_from_the_header_alone() {
        let mut dec = FrameDecoder::new(1024);
        dec.push(&u32::MAX.to_be_bytes());
        match dec.next_message() {
            Err(Error::FrameTooLarge { len, max: 1024 }) => assert_eq!(len, u32::MAX as usize),
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        let big = Message::Sync(SyncStep {
            doc: DocId::parse("roster/org").unwrap(),
            data: Some(vec![0; 2000]),
        });
        assert!(matches!(
            encode_frame(&big, 1024),
            Err(Error::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn truncated_frame_is_reported_at_end_of_stream() {
        let frame = encode_frame(&samples()[0], DEFAULT_MAX_FRAME).unwrap();
        for cut in 1..frame.len() {
            let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
            dec.push(&frame[..cut]);
            assert_eq!(dec.next_message().unwrap(), None);
            assert!(matches!(dec.finish(), Err(Error::Truncated { .. })));
            // A truncated payload is also an error when decoded directly.
            if cut > HEADER_LEN {
                assert!(decode_payload(&frame[HEADER_LEN..cut]).is_err());
            }
        }
    }

    #[test]
    fn invalid_document_ids_inside_messages_are_refused() {
        let ok = Message::Sync(SyncStep {
            doc: DocId::parse("roster/abc").unwrap(),
            data: None,
        });
        let mut frame = encode_frame(&ok, DEFAULT_MAX_FRAME).unwrap();
        // Turn "roster/abc" into "roster/a/c": a well-formed string, an invalid id.
        let pos = frame.windows(3).position(|w| w == b"abc").unwrap();
        frame[pos + 1] = b'/';
        assert!(decode_payload(&frame[HEADER_LEN..]).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode_payload(&bytes);
            let mut dec = FrameDecoder::new(4096);
            dec.push(&bytes);
            while let Ok(Some(_)) = dec.next_message() {}
        }

        #[test]
        fn corrupted_frames_never_panic(idx in 0usize..17, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let all = samples();
            let mut frame = encode_frame(&all[idx % all.len()], DEFAULT_MAX_FRAME).unwrap();
            for (pos, val) in flips {
                let n = frame.len();
                frame[pos % n] = val;
            }
            let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
            dec.push(&frame);
            let _ = dec.next_message();
        }

        #[test]
        fn sync_steps_round_trip(data in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..2048)), applied in any::<u32>()) {
            let doc = DocId::parse("households/zone-9").unwrap();
            for msg in [Message::Sync(SyncStep { doc: doc.clone(), data: data.clone() }),
                        Message::Ack(Ack { doc: doc.clone(), heads: vec![[1; 32]], applied })] {
                let frame = encode_frame(&msg, DEFAULT_MAX_FRAME).unwrap();
                prop_assert_eq!(decode_payload(&frame[HEADER_LEN..]).unwrap(), msg);
            }
        }
    }
}
