//! Garbage collection of entry logs: a log with no live bytes left (all its ledgers deleted) is
//! removed; a log whose live share fell below `compaction_threshold` has its live entries copied
//! to the current log, the index repointed, and is then removed. Runs on the flusher thread.

use magnetar_common::entry::Entry;
use tracing::{error, info};

use super::{Storage, lock};
use crate::entry_log::{HEADER_BYTES, RECORD_PREFIX_BYTES};
use crate::error::StorageError;
use crate::index::FlushBatch;

impl Storage {
    /// One garbage-collection pass; returns bytes reclaimed.
    pub fn collect_garbage(&self) -> Result<u64, StorageError> {
        let _serial = lock(&self.flush_serial);
        let live = self.index.live_bytes_per_log()?;
        let current = self.entry_log.current_id();
        let threshold = self.cfg.storage.compaction_threshold;
        let mut reclaimed = 0u64;
        for (log_id, size) in self.entry_log.sizes()? {
            if log_id == current {
                continue;
            }
            let total = size.saturating_sub(HEADER_BYTES).max(1);
            let live_bytes = live.get(&log_id).copied().unwrap_or(0);
            if live_bytes == 0 {
                self.entry_log.delete(log_id)?;
                info!(log_id, bytes = size, "deleted entry log with no live entries");
                reclaimed += size;
            } else if threshold > 0.0 && (live_bytes as f64) < threshold * total as f64 {
                match self.compact(log_id) {
                    Ok(moved) => {
                        info!(log_id, moved_bytes = moved, reclaimed = size - moved, "compacted entry log");
                        reclaimed += size.saturating_sub(moved);
                    }
                    Err(e) => error!(log_id, error = %e, "compact entry log; it is kept"),
                }
            }
        }
        self.metrics.gc_reclaimed_bytes.inc_by(reclaimed);
        Ok(reclaimed)
    }

    /// Copies a log's live entries to the current log, repoints the index, deletes the log.
    fn compact(&self, log_id: u32) -> Result<u64, StorageError> {
        let entries = self.index.entries_in_log(log_id)?;
        let mut moved = FlushBatch::default();
        let mut bytes = 0u64;
        for (l, e, loc) in entries {
            let raw = self.entry_log.read_at(loc.log_id, loc.offset, loc.len as usize)?;
            let entry = Entry::parse(raw)
                .map_err(|err| StorageError::Corrupt(format!("entry {l}:{e} in entry log {log_id}: {err}")))?;
            let new = self.entry_log.append(entry.raw())?;
            moved.locations.push((l, e, new));
            *moved.log_bytes.entry((new.log_id, l)).or_insert(0) += RECORD_PREFIX_BYTES + loc.len as u64;
            bytes += RECORD_PREFIX_BYTES + loc.len as u64;
        }
        self.entry_log.sync()?;
        {
            let _g = lock(&self.flush_lock);
            self.index.relocate(log_id, &moved)?;
        }
        self.entry_log.delete(log_id)?;
        Ok(bytes)
    }
}
