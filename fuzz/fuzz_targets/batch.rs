//! Feeds arbitrary bytes to the batch decoder and header reader: they must return a batch or an
//! error, never panic, and a decoded batch rebuilt from its messages must decode to the same
//! messages.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use magnetar_common::batch::{BatchBuilder, Compression, decode, read_header};

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    let header = read_header(&bytes);
    let Ok((h, messages)) = decode(bytes) else {
        return;
    };
    assert_eq!(header.as_ref().ok(), Some(&h), "read_header agrees with decode");
    assert_eq!(messages.len(), h.num_messages as usize);

    let mut builder = BatchBuilder::new();
    for m in &messages {
        builder.push(m).expect("a decoded message fits in a batch");
    }
    let shared_key = builder.shared_key().cloned();
    let rebuilt = builder.finish(h.compression, &h.producer_name, h.sequence_id, h.publish_time_ms);
    let (h2, again) = decode(rebuilt.clone()).expect("a rebuilt batch decodes");
    assert_eq!(again, messages);
    assert_eq!(h2.num_messages, h.num_messages);
    assert_eq!(h2.uncompressed_bytes, h.uncompressed_bytes);
    assert_eq!((h2.sequence_id, h2.publish_time_ms), (h.sequence_id, h.publish_time_ms));
    assert_eq!(h2.producer_name, h.producer_name);
    assert_eq!(h2.key, shared_key);
    // Uncompressed, with the header's key being the one the builder computes, the batch is
    // rebuilt byte for byte.
    if h.compression == Compression::None && h.key == shared_key {
        assert_eq!(&rebuilt[..], data);
    }
});
