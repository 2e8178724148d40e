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
}
