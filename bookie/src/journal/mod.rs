//! The journal: the bookie's write-ahead log. An add is acknowledged only once its record is
//! on disk (fdatasync'd, unless `journal.fsync = false`).
//!
//! Two threads form a pipeline. The `journal` thread owns the file: it takes every record waiting
//! in its queue, up to `group_commit_max_bytes`, and writes them with one `write` (a group); with
//! `flush_when_idle` a group is written as soon as the queue is empty, otherwise it waits for more
//! records until its oldest record is `group_commit_max_wait` old. It then hands the group to the
//! `journal-sync` thread and goes straight back to the queue. The sync thread takes every group
//! written so far, issues one `fdatasync` for all of them (group commit), and then runs their
//! completions in journal order. Writing the next groups into the page cache thus overlaps the
//! current `fdatasync`, and one `fdatasync` covers however many groups were written meanwhile.
//!
//! Files are preallocated in chunks and rotated at `max_file_bytes`; the old file is synced before
//! the first record goes to the new one (unless `fsync` is off). After a write or fsync error the
//! file is no longer trusted: the groups written to it that were not yet durable fail, and the next
//! group goes to a new file. This module never deletes a file newer than the checkpoint it is given.

pub mod format;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use tracing::{error, info, warn};

use crate::config::JournalConfig;
use crate::metrics::Metrics;

/// A position in the journal: file id and byte offset (just after a record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct JournalPos {
    pub file_id: u64,
    pub offset: u64,
}

/// Why a record was not made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    #[error("journal write failed: {message}")]
    Io { message: String, no_space: bool },
    #[error("journal is shut down")]
    Closed,
}

/// Called once per record, on the journal's sync thread, in journal order.
pub type Completion = Box<dyn FnOnce(Result<JournalPos, JournalError>) + Send>;

enum Op {
    Append { kind: u8, body: Bytes, enqueued: Instant, done: Completion },
}

/// Each record's completion, outcome and the time it was queued.
type Batch = Vec<(Completion, Result<JournalPos, JournalError>, Instant)>;
/// Records of the group being built: completion, end offset in the buffer, time queued.
type Pending = Vec<(Completion, u64, Instant)>;

/// A group written to a journal file, waiting for the `fdatasync` that makes it durable.
struct Written {
    file: Arc<File>,
    file_id: u64,
    /// Whether the write succeeded (else every outcome is already an error).
    needs_sync: bool,
    outcomes: Batch,
    /// The writer's own `fdatasync` of this file failed (when rotating away from it): nothing
    /// written to it and not yet synced may be acknowledged.
    poisoned: Option<JournalError>,
}

/// Handle to the journal threads. Dropping it (or [`Journal::shutdown`]) drains the queue first.
#[derive(Debug)]
pub struct Journal {
    tx: Mutex<Option<Sender<Op>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    dir: PathBuf,
    /// Id of the file being written.
    current_file: Arc<AtomicU64>,
    /// Files smaller than this are not worth recycling.
    recycle_min_bytes: u64,
}

/// Checkpointed journal files kept for reuse.
pub const RECYCLE_POOL: usize = 4;

impl Journal {
    /// Starts writing a new journal file `file_id` in `dir`.
    pub fn start(dir: &Path, file_id: u64, config: JournalConfig, metrics: Arc<Metrics>) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = JournalFile::create(dir, file_id, config.preallocate_bytes.as_u64())?;
        let (tx, rx) = crossbeam_channel::unbounded::<Op>();
        let (sync_tx, sync_rx) = crossbeam_channel::unbounded::<Written>();
        let current_file = Arc::new(AtomicU64::new(file_id));
        let sync_failed = Arc::new(AtomicBool::new(false));
        let mut w = Writer {
            dir: dir.to_path_buf(),
            config: config.clone(),
            file,
            metrics,
            failed: false,
            current_file: current_file.clone(),
            next_file_id: file_id + 1,
            buf: BytesMut::new(),
            sync_failed: sync_failed.clone(),
            poisoned: None,
        };
        let syncer = Syncer { fsync: config.fsync, metrics: w.metrics.clone(), sync_failed, bad_file: None };
        let completer = std::thread::Builder::new().name("journal-sync".into()).spawn(move || syncer.run(sync_rx))?;
        let writer = std::thread::Builder::new().name("journal".into()).spawn(move || w.run(rx, sync_tx))?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(vec![writer, completer]),
            dir: dir.to_path_buf(),
            current_file,
            recycle_min_bytes: config.max_file_bytes.as_u64() / 2,
        })
    }

    /// Queues a record; `done` runs once it is durable (or failed).
    pub fn append(&self, kind: u8, body: Bytes, done: Completion) {
        let op = Op::Append { kind, body, enqueued: Instant::now(), done };
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match tx {
            Some(tx) => {
                if let Err(crossbeam_channel::SendError(Op::Append { done, .. })) = tx.send(op) {
                    done(Err(JournalError::Closed));
                }
            }
            None => {
                let Op::Append { done, .. } = op;
                done(Err(JournalError::Closed))
            }
        }
    }

    /// Retires journal files older than `file_id` (everything in them is checkpointed): up to
    /// [`RECYCLE_POOL`] full-size files are kept for reuse, the others deleted.
    pub fn delete_before(&self, file_id: u64) -> io::Result<usize> {
        let mut n = 0;
        let mut pooled = format::list_recycled(&self.dir)?.len();
        for id in format::list_files(&self.dir)? {
            if id >= file_id {
                continue;
            }
            let path = format::file_name(&self.dir, id);
            if pooled < RECYCLE_POOL && std::fs::metadata(&path)?.len() >= self.recycle_min_bytes {
                std::fs::rename(&path, format::recycle_name(&self.dir, id))?;
                pooled += 1;
            } else {
                std::fs::remove_file(&path)?;
            }
            n += 1;
        }
        if n > 0 {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(n)
    }

    /// Id of the journal file being written.
    pub fn current_file_id(&self) -> u64 {
        self.current_file.load(Ordering::Relaxed)
    }

    /// Completes every queued record, then stops the threads.
    pub fn shutdown(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct JournalFile {
    file: Arc<File>,
    id: u64,
    offset: u64,
    allocated: u64,
}

impl JournalFile {
    /// Starts file `id`, reusing a recycled file when there is one (its blocks are already
    /// written, so syncing overwrites needs no filesystem metadata update), else preallocating.
    fn create(dir: &Path, id: u64, prealloc: u64) -> io::Result<Self> {
        let path = format::file_name(dir, id);
        if let Some(old) = format::list_recycled(dir)?.into_iter().next() {
            std::fs::rename(&old, &path)?;
            let mut file = OpenOptions::new().write(true).open(&path)?;
            let allocated = file.metadata()?.len();
            file.write_all(&format::header(id))?;
            file.sync_data()?;
            File::open(dir)?.sync_all()?;
            return Ok(Self { file: Arc::new(file), id, offset: format::HEADER_BYTES, allocated });
        }
        let mut file = OpenOptions::new().create_new(true).write(true).open(&path)?;
        file.write_all(&format::header(id))?;
        let mut jf = Self { file: Arc::new(file), id, offset: format::HEADER_BYTES, allocated: format::HEADER_BYTES };
        jf.ensure_allocated(prealloc, prealloc)?;
        jf.file.sync_all()?;
        File::open(dir)?.sync_all()?;
        Ok(jf)
    }

    /// Makes sure `need` more bytes fit in the preallocated region.
    fn ensure_allocated(&mut self, need: u64, chunk: u64) -> io::Result<()> {
        if self.offset + need <= self.allocated {
            return Ok(());
        }
        let grow = (self.offset + need - self.allocated).max(chunk);
        rustix::fs::fallocate(&*self.file, rustix::fs::FallocateFlags::empty(), self.allocated, grow)?;
        self.allocated += grow;
        Ok(())
    }
}

struct Writer {
    dir: PathBuf,
    config: JournalConfig,
    file: JournalFile,
    metrics: Arc<Metrics>,
    /// Set after a write error until a new file has been opened successfully.
    failed: bool,
    current_file: Arc<AtomicU64>,
    next_file_id: u64,
    buf: BytesMut,
    /// Set by the sync thread when an `fdatasync` failed: the file must be abandoned.
    sync_failed: Arc<AtomicBool>,
    /// This thread's `fdatasync` of the current file failed; told to the sync thread with the
    /// group that fails because of it.
    poisoned: Option<JournalError>,
}

impl Writer {
    fn run(&mut self, rx: Receiver<Op>, written: Sender<Written>) {
        let max_bytes = self.config.group_commit_max_bytes.as_u64() as usize;
        let max_wait = self.config.group_commit_max_wait;
        while let Ok(first) = rx.recv() {
            // Records are salted with the file id, so the file is chosen before they are encoded.
            let ready = self.rotate_if_needed(max_bytes as u64);
            let mut pending = Vec::new();
            let Op::Append { enqueued: oldest, .. } = &first;
            let deadline = *oldest + max_wait;
            self.push(first, &mut pending);
            // Take everything already queued (up to max_bytes); `max_wait` only bounds how long
            // the group waits for records that have not arrived yet.
            while self.buf.len() < max_bytes {
                match rx.try_recv() {
                    Ok(op) => self.push(op, &mut pending),
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) if self.config.flush_when_idle => break,
                    Err(TryRecvError::Empty) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        match rx.recv_timeout(left) {
                            Ok(op) => self.push(op, &mut pending),
                            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                        }
                    }
                }
            }
            self.metrics.journal_queue_depth.set(rx.len() as i64);
            let group = match ready {
                Ok(()) => self.commit(pending),
                Err(e) => self.failed_group(pending, &e),
            };
            if written.send(group).is_err() {
                return;
            }
        }
    }

    fn push(&mut self, op: Op, pending: &mut Pending) {
        let Op::Append { kind, body, enqueued, done } = op;
        format::put_record(&mut self.buf, self.file.id, kind, &body);
        pending.push((done, self.buf.len() as u64, enqueued));
    }

    /// Writes the buffered group; returns it with each record's position, for the sync thread.
    fn commit(&mut self, pending: Pending) -> Written {
        let len = self.buf.len() as u64;
        let result = self.write_group(len);
        let base = self.file.offset - if result.is_ok() { len } else { 0 };
        let file_id = self.file.id;
        self.buf.clear();
        match result {
            Ok(()) => {
                self.metrics.journal_bytes.inc_by(len);
                let outcomes = pending
                    .into_iter()
                    .map(|(done, end, queued)| (done, Ok(JournalPos { file_id, offset: base + end }), queued))
                    .collect();
                Written { file: self.file.file.clone(), file_id, needs_sync: true, outcomes, poisoned: None }
            }
            Err(e) => self.failed_group(pending, &e),
        }
    }

    fn failed_group(&mut self, pending: Pending, e: &io::Error) -> Written {
        error!(error = %e, file_id = self.file.id, "write journal group; the file is abandoned and the group failed");
        self.buf.clear();
        self.failed = true;
        let err = io_error(e);
        let outcomes = pending.into_iter().map(|(done, _, queued)| (done, Err(err.clone()), queued)).collect();
        let poisoned = self.poisoned.take();
        Written { file: self.file.file.clone(), file_id: self.file.id, needs_sync: false, outcomes, poisoned }
    }

    /// Moves to a new file after a failure, or when the next group may not fit.
    fn rotate_if_needed(&mut self, group_bytes: u64) -> io::Result<()> {
        if self.sync_failed.swap(false, Ordering::AcqRel) {
            self.failed = true;
        }
        let max_file = self.config.max_file_bytes.as_u64();
        if self.failed || self.file.offset + group_bytes > max_file {
            self.rotate()?;
        }
        Ok(())
    }

    fn write_group(&mut self, len: u64) -> io::Result<()> {
        let prealloc = self.config.preallocate_bytes.as_u64();
        self.file.ensure_allocated(len, prealloc)?;
        let started = Instant::now();
        (&*self.file.file).write_all(&self.buf)?;
        self.metrics.journal_write_seconds.observe(started.elapsed().as_secs_f64());
        self.file.offset += len;
        self.metrics.journal_groups.inc();
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        // Never reuse an id, even one whose creation failed half way (the file may exist).
        let next = self.next_file_id;
        self.next_file_id += 1;
        // With `fsync = false` nothing is synced: a sync here would write back the whole file
        // at once (hundreds of MiB) while every add waits.
        if !self.failed
            && self.config.fsync
            && let Err(e) = timed_sync(&self.file.file, &self.metrics)
        {
            self.poisoned = Some(io_error(&e));
            return Err(e);
        }
        let file = JournalFile::create(&self.dir, next, self.config.preallocate_bytes.as_u64())?;
        if std::mem::take(&mut self.failed) {
            warn!(file_id = next, "journal resumed on a new file after a write failure");
        } else {
            info!(file_id = next, "journal rotated");
        }
        self.file = file;
        self.current_file.store(next, Ordering::Relaxed);
        Ok(())
    }
}

/// `fdatasync`, timed into the journal's fsync histogram.
fn timed_sync(file: &File, metrics: &Metrics) -> io::Result<()> {
    let start = Instant::now();
    file.sync_data()?;
    metrics.fsync_seconds.observe(start.elapsed().as_secs_f64());
    Ok(())
}

fn io_error(e: &io::Error) -> JournalError {
    JournalError::Io { message: e.to_string(), no_space: e.kind() == io::ErrorKind::StorageFull }
}

/// The sync thread: one `fdatasync` for every group written so far, then their completions.
struct Syncer {
    fsync: bool,
    metrics: Arc<Metrics>,
    sync_failed: Arc<AtomicBool>,
    /// A file whose `fdatasync` failed: nothing written to it since is trusted.
    bad_file: Option<(u64, JournalError)>,
}

impl Syncer {
    fn run(mut self, rx: Receiver<Written>) {
        let mut groups = Vec::new();
        while let Ok(first) = rx.recv() {
            groups.push(first);
            groups.extend(rx.try_iter());
            for g in &groups {
                if let Some(e) = &g.poisoned {
                    self.bad_file = Some((g.file_id, e.clone()));
                }
            }
            // With fsync on, the writer syncs a file before it writes to the next, so syncing each
            // file named here once, after the last group written to it, covers every group.
            let mut synced: Vec<(u64, Result<(), JournalError>)> = Vec::new();
            for g in groups.iter().rev() {
                if g.needs_sync && !synced.iter().any(|(id, _)| *id == g.file_id) {
                    let r = self.sync(g);
                    synced.push((g.file_id, r));
                }
            }
            let now = Instant::now();
            for g in groups.drain(..) {
                let synced = synced.iter().find(|(id, _)| *id == g.file_id).map(|(_, r)| r);
                for (done, result, queued) in g.outcomes {
                    let result = match (result, synced) {
                        (Ok(_), Some(Err(e))) => Err(e.clone()),
                        (result, _) => result,
                    };
                    if result.is_ok() {
                        self.metrics.journal_record_seconds.observe(now.duration_since(queued).as_secs_f64());
                    }
                    done(result);
                }
            }
        }
    }

    fn sync(&mut self, g: &Written) -> Result<(), JournalError> {
        if let Some((id, e)) = &self.bad_file
            && *id == g.file_id
        {
            return Err(e.clone());
        }
        if !self.fsync {
            return Ok(());
        }
        timed_sync(&g.file, &self.metrics).map_err(|e| {
            error!(error = %e, file_id = g.file_id, "fdatasync journal; the file is abandoned and its unsynced groups failed");
            let err = io_error(&e);
            self.bad_file = Some((g.file_id, err.clone()));
            self.sync_failed.store(true, Ordering::Release);
            err
        })
    }
}

/// Replays every record from `from` onward across the files in `dir`, in order, calling
/// `f(kind, body, pos_after)`. Returns the id the next journal file must take.
pub fn replay(
    dir: &Path,
    from: JournalPos,
    max_record_bytes: usize,
    mut f: impl FnMut(u8, Bytes, JournalPos),
) -> io::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let files = format::list_files(dir)?;
    let mut replayed = 0u64;
    for &id in files.iter().filter(|&&id| id >= from.file_id) {
        let start = if id == from.file_id { from.offset } else { 0 };
        let path = format::file_name(dir, id);
        let (end, pos) = format::scan_file(&path, id, start, max_record_bytes, |kind, body, end| {
            replayed += 1;
            f(kind, body, JournalPos { file_id: id, offset: end });
        })?;
        match end {
            format::ScanEnd::Clean => {}
            other => {
                warn!(file_id = id, offset = pos, end = ?other, "journal replay stopped before the end of the file: a torn tail, data left from the file's previous use, or corruption")
            }
        }
    }
    info!(records = replayed, from_file = from.file_id, "journal replayed");
    Ok(files.last().map_or(from.file_id.max(1), |&last| last + 1))
}

#[cfg(test)]
mod tests;
