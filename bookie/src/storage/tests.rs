use bytesize::ByteSize;
use magnetar_common::entry::encode_entry;

use super::*;

fn cfg(dir: &std::path::Path) -> BookieConfig {
    let mut c =
        BookieConfig { journal_dir: dir.join("journal"), ledger_dir: dir.join("ledgers"), ..BookieConfig::default() };
    c.max_entry_bytes = ByteSize::kib(64);
    c.storage.write_cache_bytes = ByteSize::mib(1);
    c.storage.flush_interval = Duration::from_secs(3600);
    c.storage.gc_interval = Duration::from_secs(3600);
    c.storage.entry_log_max_bytes = ByteSize::kib(256);
    c.journal.preallocate_bytes = ByteSize::kib(64);
    c
}

fn payload(l: u64, e: u64, size: usize) -> Vec<u8> {
    (0..size).map(|i| (l as usize * 7 + e as usize * 13 + i) as u8).collect()
}

async fn add(s: &Arc<Storage>, l: u64, e: u64, size: usize) -> Result<(u64, u64), StorageError> {
    s.add(0, encode_entry(l, e, e as i64 - 1, &payload(l, e, size))).await
}

/// Copies the files of `from/sub` whose names end with `suffix` to `to/sub`, as a crashed
/// bookie would leave them.
fn copy_files(from: &std::path::Path, to: &std::path::Path, sub: &str, suffix: &str) {
    std::fs::create_dir_all(to.join(sub)).expect("mkdir");
    for f in std::fs::read_dir(from.join(sub)).expect("ls") {
        let f = f.expect("entry");
        if f.file_type().expect("type").is_file() && f.file_name().to_string_lossy().ends_with(suffix) {
            std::fs::copy(f.path(), to.join(sub).join(f.file_name())).expect("copy");
        }
    }
}

async fn check(s: &Arc<Storage>, l: u64, e: u64, size: usize) {
    let raw = s.read(l, e).await.unwrap_or_else(|err| panic!("read {l}:{e}: {err}"));
    let entry = Entry::parse(raw).expect("valid");
    assert_eq!(&entry.payload()[..], &payload(l, e, size)[..], "entry {l}:{e}");
}

#[tokio::test]
async fn add_read_across_flush_and_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Storage::open(cfg(dir.path()), Arc::new(Metrics::new())).expect("open");
    for l in 1..=3u64 {
        for e in 0..100u64 {
            add(&s, l, e, 1000).await.expect("add");
        }
    }
    // Served from the write cache, then from entry logs after a flush.
    check(&s, 2, 50, 1000).await;
    s.flush_now().expect("flush");
    for e in 0..100 {
        check(&s, 3, e, 1000).await;
    }
    let range = s.read_range(1, 10, 200, u32::MAX).await.expect("range");
    assert_eq!(range.len(), 90, "stops at the last stored entry");
    let limited = s.read_range(1, 0, 99, 5000).await.expect("range");
    assert_eq!(limited.len(), 4, "byte limit respected (at least one entry)");
    assert_eq!(s.read_lac(1).expect("lac"), (98, 99));
    assert!(matches!(s.read(1, 100).await, Err(StorageError::NotFound(_))));
    assert!(matches!(s.read(9, 0).await, Err(StorageError::NotFound(_))));
    // More adds after the flush stay in the journal only; a restart replays them.
    for e in 100..150u64 {
        add(&s, 1, e, 1000).await.expect("add");
    }
    s.shutdown();
    drop(s);
    let s = Storage::open(cfg(dir.path()), Arc::new(Metrics::new())).expect("reopen");
    for e in 0..150 {
        check(&s, 1, e, 1000).await;
    }
    assert_eq!(s.read_lac(1).expect("lac").1, 149);
    s.shutdown();
}

#[tokio::test]
async fn replay_without_clean_shutdown_restores_everything_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Storage::open(cfg(dir.path()), Arc::new(Metrics::new())).expect("open");
    for e in 0..500u64 {
        add(&s, 5, e, 3000).await.expect("add");
    }
    // Simulate a crash: no shutdown, no final flush. The journal alone must carry the entries.
    // (Threads keep running; we open a second engine on a copy of the directories.)
    let copy = tempfile::tempdir().expect("tempdir");
    copy_files(dir.path(), copy.path(), "journal", "");
    copy_files(dir.path(), copy.path(), "ledgers/entrylogs", "");
    s.shutdown();
    // The index file of a crashed process may be anywhere; start without it to prove the
    // journal and entry logs suffice when no checkpoint was taken.
    let s2 = Storage::open(cfg(copy.path()), Arc::new(Metrics::new())).expect("open copy");
    for e in 0..500 {
        check(&s2, 5, e, 3000).await;
    }
    s2.shutdown();
}

#[tokio::test]
async fn fencing_refuses_writer_but_accepts_recovery_adds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Storage::open(cfg(dir.path()), Arc::new(Metrics::new())).expect("open");
    for e in 0..5u64 {
        add(&s, 1, e, 10).await.expect("add");
    }
    assert_eq!(s.fence(1).await.expect("fence"), (3, 4));
    assert!(matches!(add(&s, 1, 5, 10).await, Err(StorageError::Fenced(1))));
    s.add(ADD_FLAG_RECOVERY, encode_entry(1, 5, 4, &payload(1, 5, 10))).await.expect("recovery add");
    // Fencing a ledger this bookie never saw still refuses later adds.
    s.fence(2).await.expect("fence unknown");
    assert!(matches!(add(&s, 2, 0, 10).await, Err(StorageError::Fenced(2))));
    s.shutdown();
    drop(s);
    let s = Storage::open(cfg(dir.path()), Arc::new(Metrics::new())).expect("reopen");
    assert!(matches!(add(&s, 1, 6, 10).await, Err(StorageError::Fenced(1))), "fence survives restart");
    assert!(matches!(add(&s, 2, 0, 10).await, Err(StorageError::Fenced(2))));
    check(&s, 1, 5, 10).await;
    s.shutdown();
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Storage::open(cfg(dir.path()), Arc::new(Metrics::new())).expect("open");
    let big = encode_entry(1, 0, -1, &vec![0u8; 70 * 1024]);
    assert!(matches!(s.add(0, big).await, Err(StorageError::TooLarge { .. })));
    let mut bad = encode_entry(1, 0, -1, b"abc").to_vec();
    bad[30] ^= 1;
    assert!(matches!(s.add(0, Bytes::from(bad)).await, Err(StorageError::BadRequest(_))));
    assert!(matches!(s.add(0, Bytes::from_static(b"short")).await, Err(StorageError::BadRequest(_))));
    assert!(matches!(s.read_range(1, 5, 4, 100).await, Err(StorageError::BadRequest(_))));
    // A last-add-confirmed at or past the entry itself would let recovery claim missing entries.
    for lac in [3, 7, -2] {
        let err = s.add(0, encode_entry(1, 3, lac, b"x")).await.expect_err("bad lac");
        assert!(matches!(err, StorageError::BadRequest(_)), "lac {lac}: {err}");
    }
    s.shutdown();
}

#[tokio::test]
async fn corruption_on_disk_is_reported_not_returned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Storage::open(cfg(dir.path()), Arc::new(Metrics::new())).expect("open");
    for e in 0..3u64 {
        add(&s, 1, e, 100).await.expect("add");
    }
    s.flush_now().expect("flush");
    let loc = s.index.lookup(1, 1).expect("lookup").expect("indexed");
    let path = dir.path().join("ledgers/entrylogs").join(format!("{:08x}.log", loc.log_id));
    let mut bytes = std::fs::read(&path).expect("read log");
    bytes[loc.offset as usize + 40] ^= 0xff;
    std::fs::write(&path, &bytes).expect("write log");
    assert!(matches!(s.read(1, 1).await, Err(StorageError::Corrupt(_))));
    assert!(matches!(s.read_range(1, 0, 2, u32::MAX).await, Err(StorageError::Corrupt(_))));
    check(&s, 1, 0, 100).await;
    s.shutdown();
}

#[tokio::test]
async fn full_write_cache_fails_adds_with_overloaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cfg(dir.path());
    c.storage.write_cache_max_wait = Duration::from_millis(100);
    let s = Storage::open(c, Arc::new(Metrics::new())).expect("open");
    // Hold the flusher so the cache cannot drain: take the serial lock from another thread.
    let s2 = s.clone();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let _g = lock(&s2.flush_serial);
        locked_tx.send(()).expect("send");
        let _ = release_rx.recv();
    });
    locked_rx.recv().expect("locked");
    let mut overloaded = false;
    for e in 0..200u64 {
        match add(&s, 1, e, 32 * 1024).await {
            Ok(_) => {}
            Err(StorageError::Overloaded { .. }) => {
                overloaded = true;
                break;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(overloaded, "a full write cache must refuse adds instead of growing");
    let cache = {
        let c = lock(&s.cache);
        c.active_bytes + c.flushing_bytes
    };
    assert!(cache <= ByteSize::mib(1).as_u64(), "cache stayed within its bound: {cache}");
    release_tx.send(()).expect("release");
    holder.join().expect("join");
    s.flush_now().expect("flush");
    add(&s, 1, 1000, 1000).await.expect("accepts again after flushing");
    s.shutdown();
}

#[tokio::test]
async fn deleted_ledgers_are_reclaimed_and_stay_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Storage::open(cfg(dir.path()), Arc::new(Metrics::new())).expect("open");
    // Interleave two ledgers across several entry logs (256 KiB each).
    for e in 0..200u64 {
        add(&s, 1, e, 2000).await.expect("add");
        add(&s, 2, e, 2000).await.expect("add");
        if e % 50 == 49 {
            s.flush_now().expect("flush");
        }
    }
    let before: u64 = s.entry_log.sizes().expect("sizes").iter().map(|x| x.1).sum();
    s.delete(1).await.expect("delete");
    assert!(matches!(s.read(1, 0).await, Err(StorageError::NotFound(_))));
    assert!(matches!(add(&s, 1, 500, 10).await, Err(StorageError::NotFound(_))));
    let reclaimed = s.collect_garbage().expect("gc");
    let after: u64 = s.entry_log.sizes().expect("sizes").iter().map(|x| x.1).sum();
    assert!(reclaimed > 0 && after < before, "space reclaimed: {before} -> {after}");
    for e in 0..200 {
        check(&s, 2, e, 2000).await;
    }
    s.shutdown();
    drop(s);
    let s = Storage::open(cfg(dir.path()), Arc::new(Metrics::new())).expect("reopen");
    assert!(matches!(s.read(1, 3).await, Err(StorageError::NotFound(_))), "no resurrection by replay");
    check(&s, 2, 199, 2000).await;
    s.shutdown();
}

#[tokio::test]
async fn tiny_usage_threshold_turns_read_only_and_reads_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Storage::open(cfg(dir.path()), Arc::new(Metrics::new())).expect("open");
    add(&s, 1, 0, 100).await.expect("add");
    s.shutdown();
    drop(s);
    let mut c = cfg(dir.path());
    c.disk.usage_threshold = 0.000_001;
    c.disk.usage_low_water_mark = 0.000_001;
    let s = Storage::open(c, Arc::new(Metrics::new())).expect("open");
    s.check_disks();
    assert!(s.is_read_only());
    let err = add(&s, 1, 1, 100).await.expect_err("read-only");
    assert!(matches!(err, StorageError::ReadOnly(_)), "{err}");
    assert!(err.to_string().contains("threshold"), "{err}");
    check(&s, 1, 0, 100).await;
    s.shutdown();
}

#[tokio::test]
async fn a_journaled_delete_is_honoured_by_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Storage::open(cfg(dir.path()), Arc::new(Metrics::new())).expect("open");
    for e in 0..50u64 {
        add(&s, 1, e, 500).await.expect("add");
        add(&s, 2, e, 500).await.expect("add");
    }
    s.delete(1).await.expect("delete");
    // As after a crash: only the journal (no index, no checkpoint) is carried over.
    let copy = tempfile::tempdir().expect("tempdir");
    copy_files(dir.path(), copy.path(), "journal", ".jnl");
    s.shutdown();
    let s2 = Storage::open(cfg(copy.path()), Arc::new(Metrics::new())).expect("open copy");
    assert!(matches!(s2.read(1, 0).await, Err(StorageError::NotFound(_))), "deleted ledger stays deleted");
    assert!(matches!(add(&s2, 1, 50, 10).await, Err(StorageError::NotFound(_))));
    for e in 0..50 {
        check(&s2, 2, e, 500).await;
    }
    s2.shutdown();
}

static FLUSH_HOOK_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[tokio::test]
async fn a_flush_that_frees_entries_calls_the_after_flush_hook() {
    set_after_flush_hook(|| {
        FLUSH_HOOK_CALLS.fetch_add(1, Ordering::SeqCst);
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Storage::open(cfg(dir.path()), Arc::new(Metrics::new())).expect("open");
    for e in 0..10u64 {
        add(&s, 7, e, 1000).await.expect("add");
    }
    let before = FLUSH_HOOK_CALLS.load(Ordering::SeqCst);
    s.flush_now().expect("flush");
    assert!(FLUSH_HOOK_CALLS.load(Ordering::SeqCst) > before, "the hook runs after a flush of entries");
    check(&s, 7, 9, 1000).await;
}
