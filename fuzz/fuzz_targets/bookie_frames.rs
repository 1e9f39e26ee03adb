//! Feeds arbitrary bytes to the bookie frame decoders: they must return frames or errors, never
//! panic, and a decoded frame must re-encode to the bytes it came from.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use magnetar_common::bookie_proto::{decode_request, decode_response};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some((id, req))) = decode_request(&mut buf, 1 << 20) {
        let mut again = BytesMut::new();
        req.encode(id, &mut again);
        let back = decode_request(&mut again, 1 << 20).expect("re-encoded frame decodes");
        assert_eq!(back, Some((id, req)));
    }
    let mut buf = BytesMut::from(data);
    while let Ok(Some(resp)) = decode_response(&mut buf, 1 << 20) {
        let mut again = BytesMut::new();
        resp.encode(&mut again);
        assert_eq!(decode_response(&mut again, 1 << 20).expect("re-encoded frame decodes"), Some(resp));
    }
});
