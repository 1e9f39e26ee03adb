use std::sync::mpsc;

use std::time::Duration;

use bytesize::ByteSize;

use super::*;

fn config() -> JournalConfig {
    JournalConfig { preallocate_bytes: ByteSize::kib(64), ..JournalConfig::default() }
}

/// Small files and groups: 100 records of 1000 bytes span several files.
fn rotating_config() -> JournalConfig {
    JournalConfig {
        max_file_bytes: ByteSize::kib(16),
        group_commit_max_bytes: ByteSize::kib(2),
        preallocate_bytes: ByteSize::kib(4),
        ..config()
    }
}

/// Appends `records` and waits for all completions; returns their outcomes in completion order.
fn append_all(j: &Journal, records: &[Vec<u8>]) -> Vec<(usize, Result<JournalPos, JournalError>)> {
    let (tx, rx) = mpsc::channel();
    for (i, r) in records.iter().enumerate() {
        let tx = tx.clone();
        j.append(format::KIND_ADD, Bytes::from(r.clone()), Box::new(move |res| tx.send((i, res)).expect("send")));
    }
    drop(tx);
    rx.iter().collect()
}

fn replay_all(dir: &Path) -> (Vec<Vec<u8>>, u64) {
    let mut out = Vec::new();
    let next = replay(dir, JournalPos::default(), 1 << 20, |_, b, _| out.push(b.to_vec())).expect("replay");
    (out, next)
}

fn records(n: usize, size: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| (0..size).map(|b| (i * 31 + b) as u8).collect()).collect()
}

#[test]
fn records_are_replayed_in_order_and_completed_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recs = records(200, 100);
    let j = Journal::start(dir.path(), 1, config(), Arc::new(Metrics::new())).expect("start");
    let done = append_all(&j, &recs);
    j.shutdown();
    let order: Vec<usize> = done.iter().map(|(i, _)| *i).collect();
    assert_eq!(order, (0..200).collect::<Vec<_>>());
    let positions: Vec<JournalPos> = done.into_iter().map(|(_, r)| r.expect("durable")).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    let (back, next) = replay_all(dir.path());
    assert_eq!(back, recs);
    assert_eq!(next, 2);
}

#[test]
fn torn_tail_keeps_everything_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recs = records(20, 1000);
    let j = Journal::start(dir.path(), 1, config(), Arc::new(Metrics::new())).expect("start");
    let done = append_all(&j, &recs);
    j.shutdown();
    let last_start = done[18].1.clone().expect("ok").offset;
    // Tear the last record: keep only part of it, as a crash mid-write would.
    let path = format::file_name(dir.path(), 1);
    let mut bytes = std::fs::read(&path).expect("read");
    for b in &mut bytes[last_start as usize + 500..] {
        *b = 0;
    }
    std::fs::write(&path, &bytes).expect("write");
    let (back, _) = replay_all(dir.path());
    assert_eq!(back, recs[..19].to_vec());
}

#[test]
fn bad_checksum_stops_replay_at_the_bad_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recs = records(10, 64);
    let j = Journal::start(dir.path(), 1, config(), Arc::new(Metrics::new())).expect("start");
    let done = append_all(&j, &recs);
    j.shutdown();
    let fifth_start = done[4].1.clone().expect("ok").offset;
    let path = format::file_name(dir.path(), 1);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[fifth_start as usize + 20] ^= 0x40; // inside record 6's body
    std::fs::write(&path, &bytes).expect("write");
    let (back, _) = replay_all(dir.path());
    assert_eq!(back, recs[..5].to_vec());
}

#[test]
fn group_commit_batches_records_by_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = Arc::new(Metrics::new());
    // Records of 100 bytes take 109 bytes in the journal; 10 of them fill a 1090-byte group.
    let cfg = JournalConfig {
        flush_when_idle: false,
        group_commit_max_wait: Duration::from_secs(600),
        group_commit_max_bytes: ByteSize::b(1090),
        ..config()
    };
    // Queue everything before the writer runs by holding the records until all are queued:
    // the writer cannot flush early because it neither sees an idle queue nor a deadline.
    let j = Journal::start(dir.path(), 1, cfg, metrics.clone()).expect("start");
    let done = append_all(&j, &records(100, 100));
    j.shutdown();
    assert!(done.iter().all(|(_, r)| r.is_ok()));
    assert_eq!(metrics.journal_groups.get(), 10, "100 records in groups of 10");
}

#[test]
fn group_commit_merges_waiting_records_into_one_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = Arc::new(Metrics::new());
    let j = Journal::start(dir.path(), 1, config(), metrics.clone()).expect("start");
    let done = append_all(&j, &records(2000, 50));
    j.shutdown();
    assert_eq!(done.len(), 2000);
    let groups = metrics.journal_groups.get();
    assert!(groups < 2000, "2000 records queued at once must share syncs, got {groups} groups");
}

#[test]
fn files_rotate_and_replay_spans_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recs = records(100, 1000);
    let j = Journal::start(dir.path(), 5, rotating_config(), Arc::new(Metrics::new())).expect("start");
    let done = append_all(&j, &recs);
    j.shutdown();
    let last = done.last().expect("some").1.clone().expect("ok");
    assert!(last.file_id > 5, "rotated");
    assert!(format::list_files(dir.path()).expect("list").len() > 1);
    let (back, next) = replay_all(dir.path());
    assert_eq!(back, recs);
    assert_eq!(next, last.file_id + 1);
    // Replay from a mid-file position returns only what follows it.
    let mid = done[50].1.clone().expect("ok");
    let mut after = Vec::new();
    replay(dir.path(), mid, 1 << 20, |_, b, _| after.push(b.to_vec())).expect("replay");
    assert_eq!(after, recs[51..].to_vec());
    // Trimming below the checkpoint keeps replay correct from it.
    j.delete_before(mid.file_id).expect("trim");
    let mut after2 = Vec::new();
    replay(dir.path(), mid, 1 << 20, |_, b, _| after2.push(b.to_vec())).expect("replay");
    assert_eq!(after2, after);
}

#[test]
fn recycled_files_never_replay_records_of_their_previous_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = JournalConfig {
        max_file_bytes: ByteSize::kib(16),
        group_commit_max_bytes: ByteSize::kib(2),
        preallocate_bytes: ByteSize::kib(16),
        ..config()
    };
    let first = records(100, 1000);
    let j = Journal::start(dir.path(), 1, cfg.clone(), Arc::new(Metrics::new())).expect("start");
    let done1 = append_all(&j, &first);
    // Checkpoint at the current file: older files go to the recycle pool.
    let cp = JournalPos { file_id: j.current_file_id(), offset: 0 };
    j.delete_before(cp.file_id).expect("retire");
    assert!(!format::list_recycled(dir.path()).expect("ls").is_empty(), "full files are kept for reuse");
    // Same sizes as before: new records end exactly on a boundary of the old ones.
    let second: Vec<Vec<u8>> = records(60, 1000)
        .into_iter()
        .map(|mut r| {
            r[0] ^= 0xAA;
            r
        })
        .collect();
    let done2 = append_all(&j, &second);
    j.shutdown();
    // Expected after the checkpoint: the tail of the first batch in the checkpoint file, then the
    // whole second batch; nothing left over from the recycled files' previous contents.
    let mut expected: Vec<Vec<u8>> = done1
        .iter()
        .filter(|(_, r)| r.as_ref().expect("ok").file_id >= cp.file_id)
        .map(|(i, _)| first[*i].clone())
        .collect();
    expected.extend(second.iter().cloned());
    let mut back = Vec::new();
    replay(dir.path(), cp, 1 << 20, |_, b, _| back.push(b.to_vec())).expect("replay");
    assert_eq!(back.len(), expected.len());
    assert_eq!(back, expected);
    assert!(done2.iter().all(|(_, r)| r.is_ok()));
}

#[test]
fn rotation_syncs_the_old_file_only_when_fsync_is_on() {
    for fsync in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Arc::new(Metrics::new());
        // The only fdatasyncs are the sync thread's and the writer's when it rotates.
        let cfg = JournalConfig { fsync, ..rotating_config() };
        let j = Journal::start(dir.path(), 1, cfg, metrics.clone()).expect("start");
        let done = append_all(&j, &records(100, 1000));
        j.shutdown();
        let last = done.last().expect("some").1.clone().expect("ok");
        let rotations = last.file_id - 1;
        assert!(rotations >= 5, "rotated {rotations} times");
        let syncs = fsync_count(&metrics);
        if fsync {
            // One per group at most from the sync thread, plus one per rotation.
            assert!(syncs >= rotations, "fsync on: {syncs} fdatasyncs for {rotations} rotations");
        } else {
            assert_eq!(syncs, 0, "fsync off: no fdatasync at all, rotations included");
        }
    }
}

#[test]
fn every_durable_record_and_every_group_write_is_timed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = Arc::new(Metrics::new());
    let j = Journal::start(dir.path(), 1, rotating_config(), metrics.clone()).expect("start");
    let done = append_all(&j, &records(100, 1000));
    j.shutdown();
    assert!(done.iter().all(|(_, r)| r.is_ok()));
    assert_eq!(count(&metrics, "journal_record_seconds"), 100, "one observation per durable record");
    let groups = metrics.journal_groups.get();
    assert!(groups > 1, "records of 1000 bytes in groups of at most 2 KiB: {groups} groups");
    assert_eq!(count(&metrics, "journal_write_seconds"), groups, "one observation per group write");
}

/// The number of journal fdatasyncs the metrics recorded.
fn fsync_count(metrics: &Metrics) -> u64 {
    count(metrics, "journal_fsync_seconds")
}

/// How many observations a histogram holds, from the rendered metrics.
fn count(metrics: &Metrics, histogram: &str) -> u64 {
    let text = metrics.render();
    let prefix = format!("magnetar_bookie_{histogram}_count ");
    let line = text.lines().find(|l| l.starts_with(&prefix)).expect("metric");
    line.rsplit(' ').next().and_then(|n| n.parse().ok()).expect("a count")
}
