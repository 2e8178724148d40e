//! Length-prefixed framing: a 4-byte big-endian payload length, then the payload: one
//! postcard-encoded [`Message`], and from protocol version 2 on, optionally its
//! [`Extensions`] (see the evolution rules in [`crate::message`]).
//!
//! The length is checked against the limit as soon as the 4 header bytes are known, before
//! any buffer for the payload is reserved, so a peer announcing a 4 GiB frame costs
//! nothing. Decoding never panics on any input; every failure is an [`Error`].

use std::collections::BTreeMap;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, Message};

/// How many kinds of [`Message`] this build knows (the variants, in wire order).
pub const KNOWN_MESSAGE_KINDS: u32 = 18;

/// Tagged values after a message in its frame: the fields added to a message after
/// version 1. Unknown tags are ignored by the receiver; a missing tag means the sender
/// does not know the field. Sent only when the negotiated version is 2 or more.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions(BTreeMap<u16, Vec<u8>>);

impl Extensions {
    /// No extensions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets `tag` to `value` (postcard-encoded).
    pub fn insert<T: Serialize>(&mut self, tag: u16, value: &T) -> Result<(), Error> {
        let bytes = postcard::to_allocvec(value).map_err(|e| Error::Encode(e.to_string()))?;
        self.0.insert(tag, bytes);
        Ok(())
    }

    /// The value of `tag`, if the sender set it.
    pub fn get<T: DeserializeOwned>(&self, tag: u16) -> Result<Option<T>, Error> {
        self.0
            .get(&tag)
            .map(|b| {
                postcard::from_bytes(b).map_err(|e| Error::Decode(format!("extension {tag}: {e}")))
            })
            .transpose()
    }

    fn encode_into(&self, out: Vec<u8>) -> Result<Vec<u8>, Error> {
        let list: Vec<(u16, &serde_bytes::Bytes)> = self
            .0
            .iter()
            .map(|(t, v)| (*t, serde_bytes::Bytes::new(v)))
            .collect();
        postcard::to_extend(&list, out).map_err(|e| Error::Encode(e.to_string()))
    }

    fn decode(bytes: &[u8]) -> Result<Self, Error> {
        // Anything after the list is for versions newer than this build: ignored.
        let (list, _newer) = postcard::take_from_bytes::<Vec<(u16, serde_bytes::ByteBuf)>>(bytes)
            .map_err(|e| Error::Decode(format!("extensions: {e}")))?;
        let mut map = BTreeMap::new();
        for (tag, value) in list {
            if map.insert(tag, value.into_vec()).is_some() {
                return Err(Error::Decode(format!("extension {tag} appears twice")));
            }
        }
        Ok(Self(map))
    }
}

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

/// Encodes `msg` as one frame (header and payload), without extensions: what every
/// version reads.
pub fn encode_frame(msg: &Message, max_frame: usize) -> Result<Vec<u8>, Error> {
    encode_frame_with(msg, &Extensions::new(), 1, max_frame)
}

/// Encodes `msg` with `ext` for a peer speaking `version`: the extensions go only to a
/// peer of version 2 or later (version 1 refuses trailing bytes).
pub fn encode_frame_with(
    msg: &Message,
    ext: &Extensions,
    version: u16,
    max_frame: usize,
) -> Result<Vec<u8>, Error> {
    let mut out = vec![0u8; HEADER_LEN];
    out = postcard::to_extend(msg, out).map_err(|e| Error::Encode(e.to_string()))?;
    if version >= 2 && !ext.is_empty() {
        out = ext.encode_into(out)?;
    }
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

/// Decodes one message from a frame's payload, checking and dropping its extensions. A
/// message of a kind this build does not know is [`Error::UnknownMessage`]: a peer
/// sends only kinds of the negotiated version, so it is garbage or a broken peer.
pub fn decode_payload(payload: &[u8]) -> Result<Message, Error> {
    decode_with_extensions(payload).map(|(m, _)| m)
}

/// Decodes one message and its extensions from a frame's payload.
pub fn decode_with_extensions(payload: &[u8]) -> Result<(Message, Extensions), Error> {
    let (msg, rest) = match postcard::take_from_bytes::<Message>(payload) {
        Ok(ok) => ok,
        Err(e) => {
            return Err(match message_kind(payload) {
                Some(index) if index >= KNOWN_MESSAGE_KINDS => Error::UnknownMessage { index },
                _ => Error::Decode(e.to_string()),
            });
        }
    };
    let ext = if rest.is_empty() {
        Extensions::new()
    } else {
        Extensions::decode(rest)?
    };
    Ok((msg, ext))
}

/// The kind index a payload starts with (postcard's varint enum tag).
fn message_kind(payload: &[u8]) -> Option<u32> {
    postcard::take_from_bytes::<u32>(payload)
        .ok()
        .map(|(i, _)| i)
}

/// Incremental frame decoder for a byte stream: push what arrived, pop whole messages.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already decoded (dropped on the next push, not per frame: a read
    /// holding many small frames is not shifted once per frame).
    start: usize,
    max_frame: usize,
}

impl FrameDecoder {
    /// A decoder refusing payloads over `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max_frame,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole frame's payload, if it has arrived (consumed).
    fn next_payload(&mut self) -> Result<Option<&[u8]>, Error> {
        let rest = &self.buf[self.start..];
        let Some(header) = rest.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = payload_len(*header, self.max_frame)?;
        if rest.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let from = self.start + HEADER_LEN;
        self.start = from + len;
        Ok(Some(&self.buf[from..from + len]))
    }

    /// The next whole message, `Ok(None)` if more bytes are needed, or the error that makes
    /// the rest of this stream unreadable.
    pub fn next_message(&mut self) -> Result<Option<Message>, Error> {
        let before = self.start;
        let decoded = match self.next_payload()? {
            Some(payload) => decode_payload(payload).map(Some),
            None => return Ok(None),
        };
        if decoded.is_err() {
            self.start = before;
        }
        decoded
    }

    /// The next whole message with its extensions and the frame's length on the wire,
    /// `Ok(None)` if more bytes are needed, or the error that makes the rest of this
    /// stream unreadable.
    pub fn next_frame(&mut self) -> Result<Option<(Message, Extensions, usize)>, Error> {
        let before = self.start;
        let decoded = match self.next_payload()? {
            Some(payload) => decode_with_extensions(payload),
            None => return Ok(None),
        };
        match decoded {
            Ok((msg, ext)) => Ok(Some((msg, ext, self.start - before))),
            Err(e) => {
                self.start = before;
                Err(e)
            }
        }
    }

    /// Call at end of stream: an error if a partial frame is left over.
    pub fn finish(&self) -> Result<(), Error> {
        match self.buffered() {
            0 => Ok(()),
            have => Err(Error::Truncated { have }),
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
            Message::QuarantineAccept {
                team: crate::TeamId::new("team-3").unwrap(),
                device: DeviceId::new("phone-1").unwrap(),
            },
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
    fn many_frames_in_one_read_then_one_split_across_reads() {
        let frames: Vec<Vec<u8>> = samples()
            .iter()
            .map(|m| encode_frame(m, DEFAULT_MAX_FRAME).unwrap())
            .collect();
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&frames.concat());
        // One frame more, its first half with the read.
        let last = &frames[0];
        dec.push(&last[..last.len() / 2]);
        let mut got = Vec::new();
        while let Some((m, _, len)) = dec.next_frame().unwrap() {
            got.push((m, len));
        }
        assert_eq!(got.len(), frames.len());
        for ((m, len), (want, frame)) in got.iter().zip(samples().iter().zip(&frames)) {
            assert_eq!(m, want);
            assert_eq!(*len, frame.len());
        }
        assert_eq!(dec.buffered(), last.len() / 2);
        assert!(dec.finish().is_err(), "half a frame left");
        dec.push(&last[last.len() / 2..]);
        assert_eq!(dec.next_message().unwrap().as_ref(), samples().first());
        assert_eq!(dec.buffered(), 0);
        dec.finish().unwrap();
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

    /// How a version 1 peer (today's phones in the field) decodes: trailing bytes are an
    /// error.
    fn decode_v1(payload: &[u8]) -> Result<Message, String> {
        let (m, rest) = postcard::take_from_bytes::<Message>(payload).map_err(|e| e.to_string())?;
        if rest.is_empty() {
            Ok(m)
        } else {
            Err(format!("{} trailing bytes", rest.len()))
        }
    }

    fn welcome_ext() -> Extensions {
        let mut ext = Extensions::new();
        ext.insert(ext::WELCOME_OLDEST_VERSION, &1u16).unwrap();
        ext.insert(999, &"from a newer build").unwrap();
        ext
    }

    #[test]
    fn a_version_1_peer_reads_every_frame_meant_for_it() {
        for msg in samples() {
            let frame = encode_frame_with(&msg, &welcome_ext(), 1, DEFAULT_MAX_FRAME).unwrap();
            assert_eq!(decode_v1(&frame[HEADER_LEN..]).unwrap(), msg);
            let frame = encode_frame(&msg, DEFAULT_MAX_FRAME).unwrap();
            assert_eq!(decode_v1(&frame[HEADER_LEN..]).unwrap(), msg);
        }
    }

    #[test]
    fn extensions_travel_to_version_2_and_unknown_tags_are_ignored() {
        let msg = samples().remove(0);
        let frame = encode_frame_with(&msg, &welcome_ext(), 2, DEFAULT_MAX_FRAME).unwrap();
        assert!(
            decode_v1(&frame[HEADER_LEN..]).is_err(),
            "why v1 never gets them"
        );
        let (back, ext) = decode_with_extensions(&frame[HEADER_LEN..]).unwrap();
        assert_eq!(back, msg);
        assert_eq!(
            ext.get::<u16>(ext::WELCOME_OLDEST_VERSION).unwrap(),
            Some(1)
        );
        assert_eq!(
            ext.get::<u16>(77).unwrap(),
            None,
            "a tag the sender did not set"
        );
        // A newer build may append more after the list: still read.
        let mut longer = frame[HEADER_LEN..].to_vec();
        longer.extend_from_slice(b"future");
        assert_eq!(decode_payload(&longer).unwrap(), msg);
        // A list that does not decode is an error, not silently dropped.
        let mut broken = encode_frame(&msg, DEFAULT_MAX_FRAME).unwrap()[HEADER_LEN..].to_vec();
        broken.extend_from_slice(&[5, 1]);
        assert!(decode_payload(&broken).is_err());
    }

    #[test]
    fn unknown_message_kinds_are_named_as_such() {
        let last = samples()
            .into_iter()
            .map(|m| encode_frame(&m, DEFAULT_MAX_FRAME).unwrap()[HEADER_LEN])
            .max()
            .unwrap();
        assert_eq!(
            u32::from(last) + 1,
            KNOWN_MESSAGE_KINDS,
            "samples cover the last kind, and KNOWN_MESSAGE_KINDS counts every kind"
        );
        let unknown = [40u8, 3, 1, 2, 3];
        assert!(matches!(
            decode_payload(&unknown),
            Err(Error::UnknownMessage { index: 40 })
        ));
        assert_eq!(
            Error::UnknownMessage { index: 40 }.code(),
            ErrorCode::BAD_MESSAGE,
            "a peer sends only kinds of the negotiated version: anything else is refused"
        );
        // A known kind with a broken body is a decode error.
        assert!(matches!(
            decode_payload(&[0u8, 0xff]),
            Err(Error::Decode(_))
        ));
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
