//! Constants and helpers both ends of the wire must agree on: where large payloads move
//! to their own streams, how transfers are named and cut, how known heads are merged.

use automerge::ChangeHash;
use sha2::{Digest, Sha256};

/// Payloads larger than this travel as transfers (uploads, relay-to-device transfers)
/// on their own streams instead of inline on the control stream.
pub const INLINE_MAX: usize = 512 * 1024;

/// Bytes per transfer piece sent by the relay.
pub const TRANSFER_PIECE: usize = 256 * 1024;

/// The content-derived id of a transfer: the first 16 bytes of the SHA-256 of its bytes,
/// so a resumed transfer (same id) carries the very same bytes.
pub fn transfer_id(bytes: &[u8]) -> [u8; 16] {
    let digest = Sha256::digest(bytes);
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

/// Adds `more` to `into`, skipping hashes already there (order kept: a union of heads).
pub fn union_heads(into: &mut Vec<ChangeHash>, more: &[ChangeHash]) {
    for h in more {
        if !into.contains(h) {
            into.push(*h);
        }
    }
}

/// The first four bytes of every Automerge chunk.
pub const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// The first Automerge chunk of `bytes` (magic, checksum, type, LEB128 length, that many
/// bytes), its type byte, and what follows it. Payloads and stored documents may hold
/// several chunks one after another; this is how both ends take them apart.
pub fn split_chunk(bytes: &[u8]) -> Result<(&[u8], u8, &[u8]), String> {
    let truncated = || "not an Automerge chunk (truncated header)".to_string();
    if bytes.len() < 9 {
        return Err(truncated());
    }
    if bytes[..4] != CHUNK_MAGIC {
        return Err("not an Automerge chunk (bad magic bytes)".into());
    }
    let kind = bytes[8];
    let (len, used) = uleb(&bytes[9..]).ok_or_else(truncated)?;
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(9 + used))
        .filter(|end| *end <= bytes.len())
        .ok_or_else(|| "an Automerge chunk is cut short".to_string())?;
    Ok((&bytes[..end], kind, &bytes[end..]))
}

/// An Automerge chunk of type `kind` holding `body`, as Automerge writes it: magic,
/// checksum (the first four bytes of SHA-256 over type, length and body), type, length
/// in the fewest LEB128 bytes, body. A chunk equals this form of its own type and body
/// exactly when Automerge's loader would take its header.
pub fn seal_chunk(kind: u8, body: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut head = vec![kind];
    put_uleb(&mut head, body.len() as u64);
    let hash = Sha256::new()
        .chain_update(&head)
        .chain_update(body)
        .finalize();
    let mut out = Vec::with_capacity(8 + head.len() + body.len());
    out.extend_from_slice(&CHUNK_MAGIC);
    out.extend_from_slice(&hash[..4]);
    out.extend_from_slice(&head);
    out.extend_from_slice(body);
    out
}

/// Appends `v` to `out` as unsigned LEB128 in the fewest bytes (how Automerge writes a
/// chunk's length, and hashes it for the checksum).
pub fn put_uleb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// An unsigned LEB128 value at the start of `b` and the bytes it took (at most 10).
pub fn uleb(b: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f).checked_shl(7 * i as u32)?;
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_ids_follow_the_bytes_and_unions_keep_each_head_once() {
        assert_eq!(transfer_id(b"abc"), transfer_id(b"abc"));
        assert_ne!(transfer_id(b"abc"), transfer_id(b"abd"));
        let (a, b, c) = (
            ChangeHash([1; 32]),
            ChangeHash([2; 32]),
            ChangeHash([3; 32]),
        );
        let mut heads = vec![a, b];
        union_heads(&mut heads, &[b, c, a]);
        assert_eq!(heads, vec![a, b, c]);
    }

    #[test]
    fn leb128_written_in_the_fewest_bytes_reads_back() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_uleb(&mut out, v);
            assert_eq!(uleb(&out), Some((v, out.len())));
            let fewest = (64 - v.leading_zeros()).div_ceil(7).max(1) as usize;
            assert_eq!(out.len(), fewest, "{v}");
        }
    }
}
