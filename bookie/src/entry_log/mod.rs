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
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use bytes::{Bytes, BytesMut};
use tracing::info;

const MAGIC: &[u8; 8] = b"MAGELOG1";
pub const HEADER_BYTES: u64 = 16;
/// Bytes before each entry in a log.
pub const RECORD_PREFIX_BYTES: u64 = 4;
/// A flush syncs the log every this many bytes, so its writes reach the disk in small pieces
/// that journal syncs can interleave with, instead of one burst that stalls them.
const WRITEBACK_CHUNK_BYTES: u64 = 1 << 20;

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
    /// Bytes appended since the last sync.
    unsynced: u64,
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
                writer: BufWriter::with_capacity(4 << 20, file),
                offset: HEADER_BYTES,
                broken: false,
                next_id,
                unsynced: 0,
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
        let result =
            cur.writer.write_all(&(entry.len() as u32).to_be_bytes()).and_then(|()| cur.writer.write_all(entry));
        if let Err(e) = result {
            cur.broken = true;
            return Err(e);
        }
        let loc = Location { log_id: cur.id, offset: cur.offset + RECORD_PREFIX_BYTES, len: entry.len() as u32 };
        cur.offset += need;
        cur.unsynced += need;
        if cur.unsynced >= WRITEBACK_CHUNK_BYTES {
            Self::sync_current(&mut cur)?;
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

    fn sync_current(cur: &mut Current) -> io::Result<()> {
        let result = cur.writer.flush().and_then(|()| cur.writer.get_ref().sync_data());
        match result {
            Ok(()) => cur.unsynced = 0,
            Err(_) => cur.broken = true,
        }
        result
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
}
