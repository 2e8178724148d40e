//! A frame's payload decoded as a message: errors, never panics; what decodes
//! re-encodes to something that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redline_proto::codec;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = codec::decode_payload(data) {
        let frame = codec::encode_frame(&message, usize::MAX).expect("decoded messages encode");
        let again = codec::decode_payload(&frame[codec::HEADER_LEN..]).expect("and decode again");
        assert_eq!(again, message);
    }
});
