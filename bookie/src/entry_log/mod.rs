//! Entry logs: files of entries of many ledgers, interleaved, written sequentially by the flusher
//! (sorted by ledger and entry, so a ledger's consecutive entries sit next to each other and a
//! range read is one `pread`). A record is `[u32 len][encoded entry]`; the entry carries its own
//! CRC32C digest, which readers verify.
//!
//! Only the flusher thread appends; readers use positional reads on shared file handles, so a log
//! deleted by compaction stays readable by a reader that already holds it. Nothing here decides
//! what is live: the index does.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use bytes::{Bytes, BytesMut};
use tracing::info;

const MAGIC: &[u8; 8] = b"MAGELOG1";
pub const HEADER_BYTES: u64 = 16;
/// Bytes before each entry in a log.
pub const RECORD_PREFIX_BYTES: u64 = 4;
/// A flush starts the disk write of every this many bytes as soon as they are appended, so the
/// log reaches the disk in small pieces that journal syncs can interleave with, instead of one
/// burst at the final `fdatasync` that stalls them.
const WRITEBACK_CHUNK_BYTES: u64 = 1 << 20;
/// How far the started writes may run ahead of the ones known to be finished. The flusher waits
/// for writes older than this, which bounds the data queued at the disk without making it wait
/// for each chunk in turn (a chunk's write overlaps the copying of the next ones).
const WRITEBACK_LAG_BYTES: u64 = 8 * WRITEBACK_CHUNK_BYTES;
/// Appends are buffered up to this size; a record at least this large goes to the file with
/// its prefix in one `writev`, without being copied into the buffer first.
const WRITE_BUFFER_BYTES: usize = 64 << 10;

/// Where an entry sits: log file, offset of the entry bytes, and their length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub log_id: u32,
    pub offset: u64,
    pub len: u32,
}

struct Current {
    id: u32,
    writer: BufWriter<File>,
    offset: u64,
    /// Set after a write or sync error: the file's contents past the last sync are unknown,
    /// so nothing more is appended to it and the next append starts a new log.
    broken: bool,
    /// Id the next log takes (never reused, even when creating a log failed half way).
    next_id: u32,
    /// Offset up to which the disk write has been started (by a chunk or a sync).
    started: u64,
    /// Offset up to which the disk write is known to be finished.
    finished: u64,
    /// Offset up to which the log is durable (its last `fdatasync`).
    synced: u64,
}

/// The set of entry log files of one ledger directory.
pub struct EntryLogger {
    dir: PathBuf,
    max_bytes: u64,
    current: Mutex<Current>,
    files: RwLock<HashMap<u32, Arc<File>>>,
}

impl std::fmt::Debug for EntryLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryLogger").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn file_name(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08x}.log"))
}

impl EntryLogger {
    /// Opens the logs in `dir` and starts a new log after the newest (a log that was being
    /// written when the process died is never appended to again).
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut files = HashMap::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(hex) = name.strip_suffix(".log")
                && let Ok(id) = u32::from_str_radix(hex, 16)
            {
                files.insert(id, Arc::new(File::open(file_name(dir, id))?));
            }
        }
        let next = files.keys().max().map_or(1, |m| m + 1);
        let (current, read) = Self::create(dir, next, next + 1)?;
        files.insert(next, read);
        Ok(Self { dir: dir.to_path_buf(), max_bytes, current: Mutex::new(current), files: RwLock::new(files) })
    }

    fn create(dir: &Path, id: u32, next_id: u32) -> io::Result<(Current, Arc<File>)> {
        let path = file_name(dir, id);
        let mut file = OpenOptions::new().create_new(true).write(true).open(&path)?;
        let mut header = [0u8; HEADER_BYTES as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&id.to_be_bytes());
        file.write_all(&header)?;
        file.sync_all()?;
        File::open(dir)?.sync_all()?;
        let read = Arc::new(File::open(&path)?);
        Ok((
            Current {
                id,
                writer: BufWriter::with_capacity(WRITE_BUFFER_BYTES, file),
                offset: HEADER_BYTES,
                broken: false,
                next_id,
                started: HEADER_BYTES,
                finished: HEADER_BYTES,
                synced: HEADER_BYTES,
            },
            read,
        ))
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an entry; it is readable only after [`EntryLogger::sync`]. After an error the
    /// log is abandoned: locations handed out since the last successful sync must not be used.
    pub fn append(&self, entry: &[u8]) -> io::Result<Location> {
        let mut cur = self.lock_current();
        let need = RECORD_PREFIX_BYTES + entry.len() as u64;
        if cur.broken || (cur.offset + need > self.max_bytes && cur.offset > HEADER_BYTES) {
            self.rotate(&mut cur)?;
        }
        let prefix = (entry.len() as u32).to_be_bytes();
        if let Err(e) = write_all_vectored(&mut cur.writer, &mut [IoSlice::new(&prefix), IoSlice::new(entry)]) {
            cur.broken = true;
            return Err(e);
        }
        let loc = Location { log_id: cur.id, offset: cur.offset + RECORD_PREFIX_BYTES, len: entry.len() as u32 };
        cur.offset += need;
        if cur.offset - cur.started >= WRITEBACK_CHUNK_BYTES
            && let Err(e) = Self::write_back(&mut cur)
        {
            cur.broken = true;
            return Err(e);
        }
        Ok(loc)
    }

    fn rotate(&self, cur: &mut Current) -> io::Result<()> {
        if !cur.broken {
            let synced = cur.writer.flush().and_then(|()| cur.writer.get_ref().sync_data());
            if let Err(e) = synced {
                cur.broken = true;
                return Err(e);
            }
        }
        let id = cur.next_id;
        cur.next_id += 1;
        let (next, read) = Self::create(&self.dir, id, cur.next_id)?;
        info!(log_id = next.id, abandoned = cur.broken, "entry log rotated");
        self.files.write().unwrap_or_else(|p| p.into_inner()).insert(next.id, read);
        *cur = next;
        Ok(())
    }

    /// Makes every appended entry durable. Fails (and the log is abandoned) if any append or
    /// write since the last sync failed.
    pub fn sync(&self) -> io::Result<()> {
        let mut cur = self.lock_current();
        if cur.broken {
            return Err(io::Error::other(format!("entry log {} was abandoned after a write error", cur.id)));
        }
        Self::sync_current(&mut cur)
    }

    /// Syncs the log if at least a write-back chunk was appended since its last sync. A flusher
    /// with time to spare calls this, so that the disk's write cache holds little of the log
    /// when the journal's next `fdatasync` flushes it (on a virtual disk, that flush writes out
    /// everything the guest wrote before it, entry logs included).
    pub fn settle(&self) -> io::Result<()> {
        let mut cur = self.lock_current();
        if cur.broken || cur.offset - cur.synced < WRITEBACK_CHUNK_BYTES {
            return Ok(());
        }
        Self::sync_current(&mut cur)
    }

    fn sync_current(cur: &mut Current) -> io::Result<()> {
        let result = cur.writer.flush().and_then(|()| cur.writer.get_ref().sync_data());
        match result {
            Ok(()) => (cur.started, cur.finished, cur.synced) = (cur.offset, cur.offset, cur.offset),
            Err(_) => cur.broken = true,
        }
        result
    }

    /// Starts the disk write of everything appended since the last chunk, and waits for the
    /// writes started more than [`WRITEBACK_LAG_BYTES`] ago. Durability still comes from the
    /// `fdatasync` in [`EntryLogger::sync`].
    fn write_back(cur: &mut Current) -> io::Result<()> {
        cur.writer.flush()?;
        let (file, offset) = (cur.writer.get_ref(), cur.offset);
        start_write(file, cur.started, offset - cur.started)?;
        cur.started = offset;
        if offset - cur.finished > WRITEBACK_LAG_BYTES {
            let upto = offset - WRITEBACK_LAG_BYTES;
            wait_written(file, cur.finished, upto - cur.finished)?;
            cur.finished = upto;
        }
        Ok(())
    }

    fn file(&self, log_id: u32) -> io::Result<Arc<File>> {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&log_id)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("entry log {log_id} does not exist")))
    }

    /// Reads `len` bytes at `offset` of a log with one positional read.
    pub fn read_at(&self, log_id: u32, offset: u64, len: usize) -> io::Result<Bytes> {
        let file = self.file(log_id)?;
        let mut buf = BytesMut::zeroed(len);
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf.freeze())
    }

    pub fn current_id(&self) -> u32 {
        self.lock_current().id
    }

    /// Every log id with its size in bytes.
    pub fn sizes(&self) -> io::Result<Vec<(u32, u64)>> {
        let files = self.files.read().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(files.len());
        for (&id, f) in files.iter() {
            out.push((id, f.metadata()?.len()));
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Deletes a log; readers already holding it finish their reads.
    pub fn delete(&self, log_id: u32) -> io::Result<()> {
        if log_id == self.current_id() {
            return Err(io::Error::other("the current entry log cannot be deleted"));
        }
        self.files.write().unwrap_or_else(|p| p.into_inner()).remove(&log_id);
        std::fs::remove_file(file_name(&self.dir, log_id))?;
        File::open(&self.dir)?.sync_all()
    }
}

/// `Write::write_all_vectored`, which is not stable yet.
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Starts writing a dirty range of `file` to the disk without waiting for it.
#[cfg(target_os = "linux")]
fn start_write(file: &File, offset: u64, len: u64) -> io::Result<()> {
    sync_file_range(file, offset, len, libc::SYNC_FILE_RANGE_WRITE)
}

/// Waits until a range of `file` is written to the disk (starting what is not yet started).
/// Unlike `fdatasync` this neither commits file metadata nor flushes the disk's write cache.
#[cfg(target_os = "linux")]
fn wait_written(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use libc::{SYNC_FILE_RANGE_WAIT_AFTER, SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE};
    sync_file_range(file, offset, len, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER)
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // FFI: the call takes a descriptor this File owns and plain integers
fn sync_file_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (offset, len) = (offset as libc::off64_t, len as libc::off64_t);
    // SAFETY: no pointers are passed; the descriptor is open for as long as `file` is borrowed.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Elsewhere there is no range write-back: each chunk is synced.
#[cfg(not(target_os = "linux"))]
fn start_write(file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    file.sync_data()
}

#[cfg(not(target_os = "linux"))]
fn wait_written(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_sync_read_rotate_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EntryLogger::open(dir.path(), 1024).expect("open");
        let mut locs = Vec::new();
        for i in 0..20u8 {
            locs.push(log.append(&[i; 100]).expect("append"));
        }
        log.sync().expect("sync");
        for (i, loc) in locs.iter().enumerate() {
            let b = log.read_at(loc.log_id, loc.offset, loc.len as usize).expect("read");
            assert_eq!(&b[..], &[i as u8; 100][..]);
        }
        let first = locs[0].log_id;
        assert!(log.current_id() > first, "rotated at 1 KiB");
        log.delete(first).expect("delete");
        assert!(log.read_at(first, locs[0].offset, 100).is_err());
        drop(log);
        let reopened = EntryLogger::open(dir.path(), 1024).expect("reopen");
        let last = locs[19];
        assert_eq!(&reopened.read_at(last.log_id, last.offset, 100).expect("read")[..], &[19u8; 100][..]);
        assert!(reopened.current_id() > last.log_id, "never appends to an old log");
    }

    #[test]
    fn large_and_small_records_survive_chunked_write_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EntryLogger::open(dir.path(), 1 << 30).expect("open");
        // 14 MB in all: past many write-back chunks and the lag after which the flusher waits.
        let sizes = [100usize, 70_000, 3, 200_000, 65_532, 65_536, 1];
        let mut written = Vec::new();
        for i in 0..250usize {
            let len = sizes[i % sizes.len()];
            let entry: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
            written.push((log.append(&entry).expect("append"), entry));
        }
        log.sync().expect("sync");
        for (loc, entry) in &written {
            assert_eq!(&log.read_at(loc.log_id, loc.offset, loc.len as usize).expect("read")[..], &entry[..]);
        }
    }

    #[test]
    fn settle_syncs_only_after_a_chunk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EntryLogger::open(dir.path(), 1 << 30).expect("open");
        let synced = |log: &EntryLogger| {
            let cur = log.lock_current();
            (cur.synced, cur.offset)
        };
        log.append(&[7u8; 1000]).expect("append");
        log.settle().expect("settle");
        let (s, off) = synced(&log);
        assert!(s < off, "under a chunk appended: no sync ({s} of {off})");
        log.append(&vec![8u8; WRITEBACK_CHUNK_BYTES as usize]).expect("append");
        log.settle().expect("settle");
        let (s, off) = synced(&log);
        assert_eq!(s, off, "a chunk appended: synced");
    }
}
