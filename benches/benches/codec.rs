//! Encode and decode cost of the wire formats: client frames (`magnetar_common::wire`), the
//! bookie protocol's Add request (`magnetar_common::bookie_proto`) and the ledger entry format
//! with its CRC32C digest (`magnetar_common::entry`). Pure CPU: no I/O, no clock.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use magnetar_common::bookie_proto::{self, Request};
use magnetar_common::entry::{Entry, encode_entry};
use magnetar_common::ids::Position;
use magnetar_common::wire::{self, Frame};

/// Large enough for every frame below.
const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Decode benches copy their input outside the timed section, this many frames at a time: a
/// fixed count bounds the memory held (256 x 64 KiB = 16 MiB) however fast the decode is.
const DECODE_BATCH: BatchSize = BatchSize::NumIterations(256);

fn payload(len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>())
}

fn encoded(frame: &Frame) -> BytesMut {
    let mut b = BytesMut::new();
    frame.encode(&mut b);
    b
}

fn wire_frames(c: &mut Criterion) {
    let frames = [
        ("send_64k", Frame::Send { sequence_id: 7, num_messages: 64, payload: payload(64 * 1024) }),
        (
            "message_1k",
            Frame::Message { position: Position::new(12, 3456), redelivery_count: 0, payload: payload(1024) },
        ),
        ("ack_1000", Frame::Ack { cumulative: false, positions: (0..1000).map(|i| Position::new(12, i)).collect() }),
    ];
    let mut g = c.benchmark_group("wire");
    for (name, frame) in &frames {
        let bytes = encoded(frame);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        let mut dst = BytesMut::with_capacity(bytes.len());
        g.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| {
                dst.clear();
                black_box(frame).encode(&mut dst);
                black_box(dst.len())
            })
        });
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter_batched_ref(
                || bytes.clone(),
                |src| wire::decode(src, MAX_FRAME_BYTES).expect("valid frame").expect("whole frame"),
                DECODE_BATCH,
            )
        });
    }
    g.finish();
}

fn bookie_add(c: &mut Criterion) {
    let mut g = c.benchmark_group("bookie_proto");
    for (name, len) in [("add_1k", 1024), ("add_64k", 64 * 1024)] {
        let request = Request::Add { flags: 0, entry: encode_entry(5, 9, 8, &payload(len)) };
        let mut bytes = BytesMut::new();
        request.encode(42, &mut bytes);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        let mut dst = BytesMut::with_capacity(bytes.len());
        g.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| {
                dst.clear();
                black_box(&request).encode(42, &mut dst);
                black_box(dst.len())
            })
        });
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter_batched_ref(
                || bytes.clone(),
                |src| bookie_proto::decode_request(src, MAX_FRAME_BYTES).expect("valid request").expect("whole frame"),
                DECODE_BATCH,
            )
        });
    }
    g.finish();
}

fn entries(c: &mut Criterion) {
    let mut g = c.benchmark_group("entry");
    for (name, len) in [("1k", 1024), ("64k", 64 * 1024)] {
        let body = payload(len);
        let raw = encode_entry(5, 9, 8, &body);
        g.throughput(Throughput::Bytes(raw.len() as u64));
        g.bench_function(format!("encode/{name}"), |b| b.iter(|| encode_entry(5, 9, 8, black_box(&body))));
        // `Entry::parse` verifies the CRC32C digest over header and payload; cloning `Bytes` is a
        // reference-count increment, not a copy.
        g.bench_function(format!("parse_verify/{name}"), |b| {
            b.iter(|| Entry::parse(black_box(raw.clone())).expect("valid entry"))
        });
    }
    g.finish();
}

criterion_group!(benches, wire_frames, bookie_add, entries);
criterion_main!(benches);
