//! Feeds arbitrary bytes to the client frame decoder: it must return frames, `None` or errors,
//! never panic, and every decoded frame must re-encode to the bytes it came from and decode back
//! to itself.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use magnetar_common::wire::{decode, decode_body};

const MAX_FRAME_BYTES: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut start = 0;
    while let Ok(Some(frame)) = decode(&mut buf, MAX_FRAME_BYTES) {
        let end = data.len() - buf.len();
        let encoded = frame.to_bytes();
        assert_eq!(&encoded[..], &data[start..end], "{frame:?} re-encodes to its bytes");
        let mut again = BytesMut::from(&encoded[..]);
        assert_eq!(decode(&mut again, MAX_FRAME_BYTES).expect("re-encoded frame decodes"), Some(frame));
        assert!(again.is_empty());
        start = end;
    }
    // The same bytes as one frame body without its length prefix.
    if let Ok(frame) = decode_body(Bytes::copy_from_slice(data)) {
        assert_eq!(&frame.to_bytes()[4..], data, "{frame:?} re-encodes to its body");
    }
});
