//! Producer-side batch building (`BatchBuilder::push` + `finish`, which compresses) and
//! consumer-side `batch::decode` (decompress + split into messages) of 1000 messages of 100 B,
//! for each compression. Throughput is the batch's uncompressed body bytes.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use magnetar_common::batch::{self, BatchBuilder, Compression, Message};

const MESSAGES: usize = 1000;
const PAYLOAD_BYTES: usize = 100;

/// Text-like payloads (a counter and repeated words) so that the compressors have something to
/// find, as in typical JSON or log messages; random bytes would not compress at all.
fn messages() -> Vec<Message> {
    (0..MESSAGES)
        .map(|i| {
            let mut text = format!("{{\"seq\":{i},\"event\":\"page_view\",\"user\":\"user-{}\",\"pad\":\"", i % 97);
            while text.len() < PAYLOAD_BYTES - 2 {
                text.push('x');
            }
            text.push_str("\"}");
            Message { payload: Bytes::from(text), ..Message::default() }
        })
        .collect()
}

fn build(messages: &[Message], compression: Compression) -> Bytes {
    let mut builder = BatchBuilder::new();
    for m in messages {
        builder.push(m).expect("message fits in a batch");
    }
    builder.finish(compression, "bench-producer", 1, 1_700_000_000_000)
}

fn batches(c: &mut Criterion) {
    let messages = messages();
    let body_bytes = {
        let mut b = BatchBuilder::new();
        for m in &messages {
            b.push(m).expect("message fits in a batch");
        }
        b.body_bytes() as u64
    };
    let sizes: Vec<String> = [Compression::None, Compression::Lz4, Compression::Zstd]
        .into_iter()
        .map(|comp| format!("{comp:?} {} B", build(&messages, comp).len()))
        .collect();
    eprintln!("batch: {MESSAGES} x {PAYLOAD_BYTES} B messages, body {body_bytes} B; encoded: {}", sizes.join(", "));
    let mut g = c.benchmark_group("batch");
    g.throughput(Throughput::Bytes(body_bytes));
    for (name, compression) in [("none", Compression::None), ("lz4", Compression::Lz4), ("zstd", Compression::Zstd)] {
        g.bench_function(format!("build/{name}"), |b| b.iter(|| build(black_box(&messages), compression)));
        let encoded = build(&messages, compression);
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| {
                let (header, decoded) = batch::decode(black_box(encoded.clone())).expect("valid batch");
                assert_eq!(decoded.len(), MESSAGES);
                (header, decoded)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, batches);
criterion_main!(benches);
