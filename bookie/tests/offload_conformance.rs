//! Conformance suite of the object-store layer (`bookie/src/offload/`): the same test functions
//! against memory, a local directory, and a real S3-compatible server (moto, started per test on
//! 127.0.0.1 from the binary `scripts/s3-server.sh install` puts in ~/.cache/magnetar; missing, the
//! S3 tests fail with a message saying so).
//!
//! `cargo test -p magnetar-bookie offload` runs them with the unit tests of the module.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytesize::ByteSize;
use magnetar_bookie::offload::{OffloadConfig, OffloadError, OffloadStore, SegmentInfo};
use magnetar_common::entry::{Entry, encode_entry};
use magnetar_common::testing::S3Server;
use object_store::path::Path;

const PART: u64 = 5 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Memory,
    Local,
    S3,
}

/// One backend under test, and whatever keeps it alive.
struct Backend {
    kind: Kind,
    store: OffloadStore,
    config: OffloadConfig,
    dir: Option<tempfile::TempDir>,
    s3: Option<S3Server>,
}

impl Backend {
    fn new(kind: Kind, cache_bytes: u64) -> Backend {
        let base = OffloadConfig {
            part_bytes: ByteSize::b(PART),
            read_ahead_bytes: ByteSize::mib(2),
            cache_bytes: ByteSize::b(cache_bytes),
            ..OffloadConfig::default()
        };
        let (config, dir, s3) = match kind {
            Kind::Memory => (OffloadConfig { url: "memory://conformance".into(), ..base }, None, None),
            Kind::Local => {
                let dir = tempfile::Builder::new().prefix("magnetar-offload-").tempdir().expect("tempdir");
                let url = format!("file://{}/store", dir.path().display());
                (OffloadConfig { url, ..base }, Some(dir), None)
            }
            Kind::S3 => {
                let server = S3Server::start().unwrap_or_else(|e| panic!("start the S3 server (moto): {e}"));
                let config = OffloadConfig {
                    url: format!("s3://{}/conformance", S3Server::BUCKET),
                    endpoint: Some(server.endpoint()),
                    region: Some("us-east-1".into()),
                    path_style: true,
                    allow_http: true,
                    access_key_id: Some("test".into()),
                    secret_access_key: Some("test".into()),
                    request_timeout: Duration::from_secs(2),
                    max_retries: 1,
                    retry_timeout: Duration::from_secs(5),
                    ..base
                };
                (config, None, Some(server))
            }
        };
        let store = OffloadStore::open(&config).expect("open store");
        Backend { kind, store, config, dir, s3 }
    }

    /// Another store on the same objects with `cache_bytes` of cache: opened again from the
    /// configuration (memory: the same store client, which holds the objects, with a new cache).
    fn reopen(&self, cache_bytes: u64) -> OffloadStore {
        if self.kind == Kind::Memory {
            return self.store.with_cache(cache_bytes);
        }
        OffloadStore::open(&OffloadConfig { cache_bytes: ByteSize::b(cache_bytes), ..self.config.clone() })
            .expect("reopen store")
    }

    /// Traces an abandoned upload may leave: S3 multipart uploads in progress, local staging files.
    fn leftovers(&self) -> usize {
        match self.kind {
            Kind::Memory => 0,
            Kind::Local => {
                let root = self.dir.as_ref().expect("dir").path().join("store");
                walk(&root).into_iter().filter(|p| p.contains('#')).count()
            }
            Kind::S3 => self.s3.as_ref().expect("server").incomplete_multipart_uploads().expect("list uploads"),
        }
    }

    async fn wait_no_leftovers(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.leftovers() > 0 {
            assert!(Instant::now() < deadline, "{:?}: abandoned upload still present after 10s", self.kind);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}

/// The payload of entry `id` of `ledger`: `len` bytes of a pattern unique to the entry.
fn payload(ledger: u64, id: u64, len: usize) -> Vec<u8> {
    let seed = ledger.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ id.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    (0..len).map(|i| (seed.wrapping_add(i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8).collect()
}

fn entry(ledger: u64, id: u64, len: usize) -> Entry {
    let lac = id as i64 - 1;
    Entry::parse(encode_entry(ledger, id, lac, &payload(ledger, id, len))).expect("valid entry")
}

/// Entries `first..first + n` with sizes from `size(id)`.
fn entries(ledger: u64, first: u64, n: u64, size: impl Fn(u64) -> usize) -> Vec<Entry> {
    (first..first + n).map(|id| entry(ledger, id, size(id))).collect()
}

/// Varied sizes from 0 B to ~190 KiB, and every 40th entry 1.5 MiB (spanning cache blocks).
fn mixed_size(id: u64) -> usize {
    if id % 40 == 39 { 1536 * 1024 } else { ((id * 7919) % 190_000) as usize }
}

async fn write(store: &OffloadStore, ledger: u64, entries: &[Entry]) -> SegmentInfo {
    let mut writer = store.segment_writer(ledger);
    for e in entries {
        writer.append(e).await.expect("append");
    }
    writer.finish().await.expect("finish")
}

fn assert_same(got: &[Entry], want: &[Entry], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: entry count");
    for (g, w) in got.iter().zip(want) {
        assert_eq!((g.ledger_id, g.entry_id), (w.ledger_id, w.entry_id), "{what}");
        assert!(g.raw() == w.raw(), "{what}: entry {} differs", w.entry_id);
    }
}

/// Reads `first..=last` in pieces of at most `max_bytes`, as a catch-up reader does.
async fn read_all(
    reader: &magnetar_bookie::offload::SegmentReader,
    first: u64,
    last: u64,
    max_bytes: u64,
) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut next = first;
    while next <= last {
        let batch = reader.read(next, last, max_bytes).await.expect("read");
        assert!(!batch.is_empty(), "a read returns at least one entry");
        next = batch.last().expect("non-empty").entry_id + 1;
        out.extend(batch);
    }
    out
}

// ---- The suite -------------------------------------------------------------------------------

/// A segment of several multipart parts: its description, its key, every byte read back whole,
/// in pieces, and across every part and cache-block boundary; with and without a cache.
async fn multipart_segment_reads_back(b: Backend) {
    let want = entries(9, 100, 160, mixed_size);
    let info = write(&b.store, 9, &want).await;
    assert_eq!((info.ledger_id, info.first_entry, info.last_entry, info.entries()), (9, 100, 259, 160));
    assert!(info.size > 2 * PART, "the segment spans at least three parts: {} bytes", info.size);
    let prefix = "conformance/ledgers/00000000000000000009/";
    let key = info.key.strip_prefix(if b.kind == Kind::Local { "ledgers/00000000000000000009/" } else { prefix });
    assert!(key.is_some_and(|k| k.ends_with(".seg") && k.len() == 36 + 4), "key {}", info.key);
    let head = b.store.object_store().head(&Path::from(info.key.as_str())).await.expect("head");
    assert_eq!(head.size, info.size);
    let json = serde_json::to_string(&info).expect("serialize");
    assert!(json.len() < 256, "SegmentInfo stays small: {json}");
    assert_eq!(serde_json::from_str::<SegmentInfo>(&json).expect("deserialize"), info);

    // Entry offsets in the object, to aim at boundaries.
    let mut offsets = BTreeMap::new();
    let mut pos = 0u64;
    for e in &want {
        offsets.insert(e.entry_id, pos);
        pos += 4 + e.raw().len() as u64;
    }
    assert_eq!(pos, info.index_offset);
    let straddling = |boundary: u64| -> Vec<u64> {
        offsets.iter().filter(|&(_, &o)| o < boundary).map(|(&id, _)| id).next_back().into_iter().collect()
    };

    for cache in [64 << 20, 0] {
        let store = b.reopen(cache);
        let reader = store.open_segment(&info).await.expect("open");
        assert_same(&reader.read(100, 259, u64::MAX).await.expect("read all"), &want, "whole segment");
        assert_same(&read_all(&reader, 100, 259, 1 << 20).await, &want, "1 MiB reads");
        assert_same(&read_all(&reader, 100, 259, 1).await, &want, "one entry per read");
        let mut boundaries: Vec<u64> = (1..=info.size / PART).map(|k| k * PART).collect();
        boundaries.extend((1..=info.index_offset >> 20).map(|k| k << 20));
        for boundary in boundaries {
            for id in straddling(boundary) {
                let (first, last) = (id.saturating_sub(1).max(100), (id + 1).min(259));
                let got = reader.read(first, last, u64::MAX).await.expect("read across a boundary");
                let from = (first - 100) as usize;
                assert_same(&got, &want[from..=(last - 100) as usize], &format!("entries {first}..={last}"));
            }
        }
    }
}

/// Every range `first..=last` of a small segment, on a fresh reader without cache and on a cached one.
async fn every_range_reads_back(b: Backend) {
    let want = entries(3, 0, 24, |id| (id as usize * 37) % 300);
    let info = write(&b.store, 3, &want).await;
    assert_eq!(info.entries(), 24);
    for store in [b.reopen(0), b.reopen(16 << 20)] {
        let reader = store.open_segment(&info).await.expect("open");
        for first in 0..24u64 {
            for last in first..24 {
                let got = reader.read(first, last, u64::MAX).await.expect("read");
                assert_same(&got, &want[first as usize..=last as usize], &format!("{first}..={last}"));
            }
        }
        let outside = reader.read(20, 24, u64::MAX).await.expect_err("past the end");
        assert!(matches!(outside, OffloadError::Invalid(_)) && outside.to_string().contains("0..=23"), "{outside}");
        assert!(reader.read(5, 4, u64::MAX).await.is_err(), "first > last");
    }
}

/// A flipped byte anywhere (payload, entry header, length prefix, index, footer) is an error
/// naming the ledger (and the entry when it is in one), never data; other entries still read.
async fn corrupted_byte_is_detected(b: Backend) {
    let want = entries(11, 0, 40, |id| 1000 + id as usize * 100);
    let info = write(&b.store, 11, &want).await;
    let path = Path::from(info.key.as_str());
    let original = b.store.object_store().get(&path).await.expect("get").bytes().await.expect("bytes");
    let offset_of = |id: u64| -> u64 { want[..id as usize].iter().map(|e| 4 + e.raw().len() as u64).sum() };

    let cases: Vec<(&str, u64, Option<u64>)> = vec![
        ("payload", offset_of(17) + 4 + 28 + 500, Some(17)),
        ("entry header", offset_of(5) + 4 + 3, Some(5)),
        ("digest", offset_of(30) + 4 + 25, Some(30)),
        ("length prefix", offset_of(20) + 3, Some(20)),
        ("index", info.index_offset + 9, None),
        ("footer", info.size - 30, None),
    ];
    for (what, at, bad_entry) in cases {
        let mut bytes = original.to_vec();
        bytes[at as usize] ^= 0x40;
        b.store.object_store().put(&path, Bytes::from(bytes).into()).await.expect("tamper");
        // A fresh store: no cached copy of the good bytes.
        let store = b.reopen(16 << 20);
        let result = match store.open_segment(&info).await {
            Ok(reader) => reader.read(0, 39, u64::MAX).await.map(|_| ()),
            Err(e) => Err(e),
        };
        let err = result.expect_err(what);
        assert!(matches!(err, OffloadError::Corrupt { .. }), "{what}: {err}");
        assert!(!err.is_retryable(), "{what}");
        let msg = err.to_string();
        assert!(msg.contains(&info.key) && msg.contains("ledger 11"), "{what}: {msg}");
        if let Some(id) = bad_entry {
            assert!(msg.contains(&format!("entry {id}")), "{what}: {msg}");
            // The entries before the damage still read back.
            let reader = store.open_segment(&info).await.expect("open");
            let good = reader.read(0, id - 1, u64::MAX).await.expect("entries before the damage");
            assert_same(&good, &want[..id as usize], what);
        }
    }
}

/// An upload of several parts that is aborted, or dropped, leaves nothing listed and nothing
/// pending; a small segment dropped before `finish` leaves nothing either.
async fn aborted_upload_leaves_nothing(b: Backend) {
    let many = entries(21, 0, 14, |_| 1 << 20);
    let mut writer = b.store.segment_writer(21);
    for e in &many {
        writer.append(e).await.expect("append");
    }
    assert!(writer.bytes() > 2 * PART);
    if b.kind == Kind::S3 {
        assert_eq!(b.leftovers(), 1, "one multipart upload in progress");
    }
    writer.abort().await.expect("abort");
    assert_eq!(b.leftovers(), 0);
    assert_eq!(b.store.list_segments(21).await.expect("list"), Vec::<String>::new());

    let mut writer = b.store.segment_writer(21);
    for e in &many {
        writer.append(e).await.expect("append");
    }
    drop(writer);
    b.wait_no_leftovers().await;

    let mut writer = b.store.segment_writer(21);
    writer.append(&many[0]).await.expect("append");
    drop(writer);
    let mut listed = b.store.object_store().list(Some(b.store.prefix()));
    use futures::StreamExt;
    assert!(listed.next().await.is_none(), "nothing at all under the prefix");
    assert_eq!(b.store.list_segments(21).await.expect("list"), Vec::<String>::new());

    // Refused appends change nothing, and the writer still works after them.
    let mut writer = b.store.segment_writer(21);
    writer.append(&many[0]).await.expect("append");
    assert!(matches!(writer.append(&many[2]).await, Err(OffloadError::Invalid(_))), "gap");
    assert!(matches!(writer.append(&entry(22, 1, 10)).await, Err(OffloadError::Invalid(_))), "other ledger");
    writer.append(&many[1]).await.expect("append after refusals");
    assert_eq!(writer.finish().await.expect("finish").entries(), 2);
    assert!(matches!(b.store.segment_writer(21).finish().await, Err(OffloadError::Invalid(_))), "empty");
}

/// A missing object is `NotFound`, not retryable, naming the key; deleting twice is fine.
async fn missing_object_is_not_found(b: Backend) {
    let info = write(&b.store, 5, &entries(5, 0, 3, |_| 100)).await;
    let other = write(&b.store, 5, &entries(5, 3, 2, |_| 100)).await;
    write(&b.store, 6, &entries(6, 0, 1, |_| 100)).await;
    let mut both = vec![info.key.clone(), other.key.clone()];
    both.sort();
    assert_eq!(b.store.list_segments(5).await.expect("list"), both);

    b.store.delete_segment(&info.key).await.expect("delete");
    b.store.delete_segment(&info.key).await.expect("delete again");
    assert_eq!(b.store.list_segments(5).await.expect("list"), vec![other.key.clone()]);
    let err = b.reopen(0).open_segment(&info).await.expect_err("deleted");
    assert!(matches!(err, OffloadError::NotFound { .. }), "{err}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains(&info.key), "{err}");

    // A reader opened before the delete fails its next uncached read the same way.
    let reader = b.reopen(0).open_segment(&other).await.expect("open");
    b.store.delete_segment(&other.key).await.expect("delete");
    let err = reader.read(3, 4, u64::MAX).await.expect_err("deleted under the reader");
    assert!(matches!(err, OffloadError::NotFound { .. }), "{err}");

    // A description that does not match the object is corrupt, not data.
    let live = write(&b.store, 7, &entries(7, 0, 4, |_| 100)).await;
    let wrong = SegmentInfo { last_entry: 4, ..live.clone() };
    assert!(matches!(b.store.open_segment(&wrong).await, Err(OffloadError::Corrupt { .. })));
    let wrong = SegmentInfo { size: live.size + 1, ..live };
    assert!(matches!(b.store.open_segment(&wrong).await, Err(OffloadError::Corrupt { .. })));
}

/// Many readers at once, on one shared reader and on their own, over one shared cache.
async fn concurrent_readers(b: Backend) {
    let want = Arc::new(entries(13, 0, 120, mixed_size));
    let info = write(&b.store, 13, &want).await;
    let shared = Arc::new(b.store.open_segment(&info).await.expect("open"));
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let (store, info, want, shared) = (b.store.clone(), info.clone(), want.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            let own = store.open_segment(&info).await.expect("open");
            for round in 0..6u64 {
                let first = (t * 13 + round * 29) % 120;
                let last = (first + 1 + (t * 7 + round * 11) % 40).min(119);
                let reader = if round % 2 == 0 { &own } else { &*shared };
                let got = read_all(reader, first, last, 512 * 1024).await;
                assert_same(&got, &want[first as usize..=last as usize], &format!("task {t} {first}..={last}"));
            }
        }));
    }
    for task in tasks {
        task.await.expect("reader task");
    }
}

/// A store that does not answer gives a retryable error naming the key, and reads work again
/// once it is back (S3 only: memory and a local directory cannot be down).
async fn unavailable_store_is_retryable(b: Backend) {
    let want = entries(15, 0, 30, |_| 200_000);
    let info = write(&b.store, 15, &want).await;
    let store = b.reopen(0);
    let reader = store.open_segment(&info).await.expect("open");
    let server = b.s3.as_ref().expect("S3 backend");
    server.pause().expect("pause");
    let started = Instant::now();
    let read = reader.read(0, 29, u64::MAX).await;
    let open = store.open_segment(&info).await;
    let down = started.elapsed();
    server.resume().expect("resume");
    // Not `expect_err`: its message would print every entry read.
    let read = read.err().unwrap_or_else(|| panic!("a read succeeded while the server was paused ({down:?})"));
    let open = open.err().unwrap_or_else(|| panic!("an open succeeded while the server was paused ({down:?})"));
    for err in [read, open] {
        assert!(err.is_retryable(), "{err}");
        assert!(err.to_string().contains(&info.key), "{err}");
    }
    assert!(started.elapsed() < Duration::from_secs(30), "failed within the timeouts: {:?}", started.elapsed());
    assert_same(&reader.read(0, 29, u64::MAX).await.expect("read after resume"), &want, "after resume");
}

macro_rules! conformance {
    ($module:ident, $kind:expr, $($test:ident),* $(,)?) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::new($kind, 16 << 20)).await
                }
            )*
        }
    };
}

conformance!(
    offload_memory,
    super::Kind::Memory,
    multipart_segment_reads_back,
    every_range_reads_back,
    corrupted_byte_is_detected,
    aborted_upload_leaves_nothing,
    missing_object_is_not_found,
    concurrent_readers,
);
conformance!(
    offload_local,
    super::Kind::Local,
    multipart_segment_reads_back,
    every_range_reads_back,
    corrupted_byte_is_detected,
    aborted_upload_leaves_nothing,
    missing_object_is_not_found,
    concurrent_readers,
);
conformance!(
    offload_s3,
    super::Kind::S3,
    multipart_segment_reads_back,
    every_range_reads_back,
    corrupted_byte_is_detected,
    aborted_upload_leaves_nothing,
    missing_object_is_not_found,
    concurrent_readers,
    unavailable_store_is_retryable,
);
