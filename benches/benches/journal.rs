//! The bookie journal's append path with group commit (`magnetar_bookie::journal::Journal`):
//! one iteration queues 256 add records of 1 KiB and waits until every one is completed, as a
//! bookie's connections do under load. With fsync off this measures queueing, encoding, the
//! `write` and the completion hand-off; with fsync on it adds the `fdatasync` of each group, so
//! it depends on the disk under the temporary directory (set `TMPDIR` to choose it).

use std::hint::black_box;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytesize::ByteSize;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use magnetar_bookie::config::JournalConfig;
use magnetar_bookie::journal::{Journal, format};
use magnetar_bookie::metrics::Metrics;
use magnetar_common::entry::encode_entry;

const RECORDS_PER_ITER: usize = 256;
const PAYLOAD_BYTES: usize = 1024;

/// Appends one batch of records and waits for all their completions.
fn append_batch(journal: &Journal, records: &[Bytes]) {
    let (tx, rx) = mpsc::channel();
    for r in records {
        let tx = tx.clone();
        journal.append(
            format::KIND_ADD,
            r.clone(),
            Box::new(move |res| {
                // The receiver outlives every completion: it waits for all of them below.
                let _ = tx.send(res.is_ok());
            }),
        );
    }
    drop(tx);
    let durable = rx.iter().filter(|ok| *ok).count();
    assert_eq!(durable, records.len(), "every journal append completes successfully");
}

fn journal(c: &mut Criterion) {
    let records: Vec<Bytes> =
        (0..RECORDS_PER_ITER as u64).map(|i| encode_entry(1, i, i as i64 - 1, &[i as u8; PAYLOAD_BYTES])).collect();
    let bytes_per_iter: u64 = records.iter().map(|r| r.len() as u64).sum();

    let mut g = c.benchmark_group("journal");
    g.throughput(Throughput::Bytes(bytes_per_iter));
    for fsync in [false, true] {
        if fsync {
            // Each iteration waits for real fdatasyncs: keep the run short.
            g.sample_size(10);
        }
        let dir = tempfile::tempdir().expect("create a temporary journal directory");
        let config = JournalConfig {
            fsync,
            // Small files, recycled as a checkpointing bookie would, bound the disk space used.
            max_file_bytes: ByteSize::mib(16),
            preallocate_bytes: ByteSize::mib(4),
            ..JournalConfig::default()
        };
        let journal = Journal::start(dir.path(), 1, config, Arc::new(Metrics::new())).expect("start the journal");
        let name = if fsync { "append_256x1k/fsync_on" } else { "append_256x1k/fsync_off" };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut measured = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    append_batch(&journal, black_box(&records));
                    measured += start.elapsed();
                    // Retire the files already written (outside the measurement), so that long
                    // runs reuse a few recycled files instead of filling the disk.
                    journal.delete_before(journal.current_file_id()).expect("retire old journal files");
                }
                measured
            })
        });
        journal.shutdown();
    }
    g.finish();
}

criterion_group!(benches, journal);
criterion_main!(benches);
