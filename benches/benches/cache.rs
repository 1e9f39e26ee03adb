//! The broker's entry cache (`magnetar_broker::service::cache::EntryCache`, moka with LRU and a
//! byte budget): insert of 1 KiB entries at the tail, and get when the entry is cached (hit) or
//! not (miss). Single-threaded; the cache is shared by all topics of a broker.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use magnetar_broker::service::cache::EntryCache;
use magnetar_common::ids::Position;

const PAYLOAD_BYTES: usize = 1024;
/// The broker's default budget is 128 MiB; the benchmark uses a smaller one so that inserting
/// keeps evicting (the steady state of a busy broker) after a short warm-up.
const CACHE_BYTES: u64 = 32 * 1024 * 1024;
/// Entries looked up by the get benches, all cached.
const RESIDENT_ENTRIES: u64 = 16 * 1024;

fn cache(c: &mut Criterion) {
    let payload = Bytes::from(vec![7u8; PAYLOAD_BYTES]);
    let mut g = c.benchmark_group("entry_cache");

    let cache = EntryCache::new(CACHE_BYTES);
    let mut next = 0u64;
    g.bench_function("insert_1k", |b| {
        b.iter(|| {
            cache.insert(Position::new(1, next), payload.clone());
            next += 1;
        })
    });

    let cache = EntryCache::new(CACHE_BYTES);
    for i in 0..RESIDENT_ENTRIES {
        cache.insert(Position::new(2, i), payload.clone());
    }
    assert!(cache.weighted_bytes() < CACHE_BYTES, "the resident entries fit in the budget");
    let mut i = 0u64;
    g.bench_function("get_hit_1k", |b| {
        b.iter(|| {
            i = (i + 1) % RESIDENT_ENTRIES;
            cache.get(black_box(&Position::new(2, i))).expect("resident entry is cached")
        })
    });
    g.bench_function("get_miss", |b| {
        b.iter(|| {
            i = (i + 1) % RESIDENT_ENTRIES;
            assert!(cache.get(black_box(&Position::new(3, i))).is_none());
        })
    });
    g.finish();
}

criterion_group!(benches, cache);
criterion_main!(benches);
