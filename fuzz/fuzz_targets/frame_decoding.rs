//! Frames arriving in arbitrary pieces: the decoder never panics and never allocates
//! past its limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redline_proto::codec::FrameDecoder;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut decoder = FrameDecoder::new(64 * 1024);
    for piece in rest.chunks(usize::from(split).max(1)) {
        decoder.push(piece);
        while let Ok(Some(_)) = decoder.next_message() {}
    }
});
