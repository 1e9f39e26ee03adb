//! The bookie's index and ledger records, kept in one `redb` database in the ledger directory:
//! - `(ledger, entry) -> location` in an entry log, so a read or a range read is a B-tree lookup,
//!   never a scan of logs;
//! - per-ledger state (fenced flag, last-add-confirmed, last entry);
//! - live bytes per (entry log, ledger), for garbage collection;
//! - tombstones of deleted ledgers, so journal replay never brings them back;
//! - the checkpoint: the journal position up to which everything is in entry logs and here.
//!
//! Every write transaction is committed durably (fsync) before it returns.

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::entry_log::Location;
use crate::journal::JournalPos;

const INDEX: TableDefinition<(u64, u64), (u32, u64, u32)> = TableDefinition::new("index");
const LEDGERS: TableDefinition<u64, (bool, i64, i64)> = TableDefinition::new("ledgers");
const LOG_LEDGERS: TableDefinition<(u32, u64), u64> = TableDefinition::new("log_ledgers");
const TOMBSTONES: TableDefinition<u64, u64> = TableDefinition::new("tombstones");
const META: TableDefinition<&str, (u64, u64)> = TableDefinition::new("meta");
const CHECKPOINT_KEY: &str = "checkpoint";

#[derive(Debug, thiserror::Error)]
#[error("index: {0}")]
pub struct IndexError(String);

fn e<E: std::fmt::Display>(err: E) -> IndexError {
    IndexError(err.to_string())
}

pub type Result<T> = std::result::Result<T, IndexError>;

/// Persisted state of a ledger on this bookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerRecord {
    pub fenced: bool,
    pub lac: i64,
    pub last_entry: i64,
}

/// What a flush adds to the index in one transaction.
#[derive(Debug, Default)]
pub struct FlushBatch {
    pub locations: Vec<(u64, u64, Location)>,
    /// Per ledger: highest LAC and entry id flushed.
    pub ledgers: HashMap<u64, (i64, i64)>,
    /// Bytes added per (log, ledger).
    pub log_bytes: HashMap<(u32, u64), u64>,
}

#[derive(Debug)]
pub struct Index {
    db: Database,
}

fn loc((log_id, offset, len): (u32, u64, u32)) -> Location {
    Location { log_id, offset, len }
}

impl Index {
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self> {
        let db = Database::builder().set_cache_size(cache_bytes).create(path).map_err(e)?;
        let tx = db.begin_write().map_err(e)?;
        {
            tx.open_table(INDEX).map_err(e)?;
            tx.open_table(LEDGERS).map_err(e)?;
            tx.open_table(LOG_LEDGERS).map_err(e)?;
            tx.open_table(TOMBSTONES).map_err(e)?;
            tx.open_table(META).map_err(e)?;
        }
        tx.commit().map_err(e)?;
        Ok(Self { db })
    }

    pub fn checkpoint(&self) -> Result<JournalPos> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(META).map_err(e)?;
        Ok(t.get(CHECKPOINT_KEY)
            .map_err(e)?
            .map(|v| {
                let (file_id, offset) = v.value();
                JournalPos { file_id, offset }
            })
            .unwrap_or_default())
    }

    /// Records a flush and moves the checkpoint, atomically.
    pub fn commit_flush(&self, batch: &FlushBatch, checkpoint: JournalPos) -> Result<()> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut index = tx.open_table(INDEX).map_err(e)?;
            for (l, en, lo) in &batch.locations {
                index.insert((*l, *en), (lo.log_id, lo.offset, lo.len)).map_err(e)?;
            }
            let mut ledgers = tx.open_table(LEDGERS).map_err(e)?;
            for (&l, &(lac, last)) in &batch.ledgers {
                let old = ledgers.get(l).map_err(e)?.map(|v| v.value());
                let (fenced, olac, olast) = old.unwrap_or((false, -1, -1));
                ledgers.insert(l, (fenced, olac.max(lac), olast.max(last))).map_err(e)?;
            }
            let mut lb = tx.open_table(LOG_LEDGERS).map_err(e)?;
            for (&k, &bytes) in &batch.log_bytes {
                let old = lb.get(k).map_err(e)?.map_or(0, |v| v.value());
                lb.insert(k, old + bytes).map_err(e)?;
            }
            let mut meta = tx.open_table(META).map_err(e)?;
            meta.insert(CHECKPOINT_KEY, (checkpoint.file_id, checkpoint.offset)).map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    pub fn lookup(&self, ledger: u64, entry: u64) -> Result<Option<Location>> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(INDEX).map_err(e)?;
        Ok(t.get((ledger, entry)).map_err(e)?.map(|v| loc(v.value())))
    }

    /// Locations of the stored entries of `first..=last`, ascending (gaps are absent).
    pub fn lookup_range(&self, ledger: u64, first: u64, last: u64, limit: usize) -> Result<Vec<(u64, Location)>> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(INDEX).map_err(e)?;
        let mut out = Vec::new();
        for item in t.range((ledger, first)..=(ledger, last)).map_err(e)? {
            let (k, v) = item.map_err(e)?;
            out.push((k.value().1, loc(v.value())));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    pub fn ledger(&self, ledger: u64) -> Result<Option<LedgerRecord>> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(LEDGERS).map_err(e)?;
        Ok(t.get(ledger).map_err(e)?.map(|v| {
            let (fenced, lac, last_entry) = v.value();
            LedgerRecord { fenced, lac, last_entry }
        }))
    }

    /// Every ledger with a record here (flushed entries or a fence), ascending.
    pub fn ledger_ids(&self) -> Result<Vec<u64>> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(LEDGERS).map_err(e)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(e)? {
            out.push(item.map_err(e)?.0.value());
        }
        Ok(out)
    }

    pub fn set_fenced(&self, ledger: u64) -> Result<()> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(LEDGERS).map_err(e)?;
            let old = t.get(ledger).map_err(e)?.map(|v| v.value());
            let (_, lac, last) = old.unwrap_or((false, -1, -1));
            t.insert(ledger, (true, lac, last)).map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    /// Removes a ledger's index, record and log accounting, and tombstones it (with the journal
    /// file current at deletion: replay from before that file must skip the ledger).
    pub fn delete_ledger(&self, ledger: u64, journal_file: u64) -> Result<()> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut index = tx.open_table(INDEX).map_err(e)?;
            index.retain_in((ledger, 0)..=(ledger, u64::MAX), |_, _| false).map_err(e)?;
            tx.open_table(LEDGERS).map_err(e)?.remove(ledger).map_err(e)?;
            let mut lb = tx.open_table(LOG_LEDGERS).map_err(e)?;
            lb.retain(|(_, l), _| l != ledger).map_err(e)?;
            tx.open_table(TOMBSTONES).map_err(e)?.insert(ledger, journal_file).map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    pub fn is_tombstoned(&self, ledger: u64) -> Result<bool> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(TOMBSTONES).map_err(e)?;
        Ok(t.get(ledger).map_err(e)?.is_some())
    }

    pub fn tombstones(&self) -> Result<HashMap<u64, u64>> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(TOMBSTONES).map_err(e)?;
        let mut out = HashMap::new();
        for item in t.iter().map_err(e)? {
            let (k, v) = item.map_err(e)?;
            out.insert(k.value(), v.value());
        }
        Ok(out)
    }

    /// Drops tombstones recorded before journal file `file_id` (already trimmed from the journal).
    pub fn prune_tombstones(&self, file_id: u64) -> Result<usize> {
        let tx = self.db.begin_write().map_err(e)?;
        let before;
        let after;
        {
            let mut t = tx.open_table(TOMBSTONES).map_err(e)?;
            before = t.len().map_err(e)?;
            t.retain(|_, f| f >= file_id).map_err(e)?;
            after = t.len().map_err(e)?;
        }
        tx.commit().map_err(e)?;
        Ok((before - after) as usize)
    }

    /// Live bytes per entry log.
    pub fn live_bytes_per_log(&self) -> Result<HashMap<u32, u64>> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(LOG_LEDGERS).map_err(e)?;
        let mut out = HashMap::new();
        for item in t.iter().map_err(e)? {
            let (k, v) = item.map_err(e)?;
            *out.entry(k.value().0).or_insert(0) += v.value();
        }
        Ok(out)
    }

    /// Entries of every ledger that has bytes in `log_id`, located in that log.
    pub fn entries_in_log(&self, log_id: u32) -> Result<Vec<(u64, u64, Location)>> {
        let tx = self.db.begin_read().map_err(e)?;
        let lb = tx.open_table(LOG_LEDGERS).map_err(e)?;
        let index = tx.open_table(INDEX).map_err(e)?;
        let mut out = Vec::new();
        for item in lb.range((log_id, 0)..=(log_id, u64::MAX)).map_err(e)? {
            let ledger = item.map_err(e)?.0.value().1;
            for it in index.range((ledger, 0)..=(ledger, u64::MAX)).map_err(e)? {
                let (k, v) = it.map_err(e)?;
                let l = loc(v.value());
                if l.log_id == log_id {
                    out.push((ledger, k.value().1, l));
                }
            }
        }
        Ok(out)
    }

    /// After compaction copied `log_id`'s live entries: point them at their new locations (only
    /// those still pointing into `log_id`) and move the log's accounting.
    pub fn relocate(&self, log_id: u32, moved: &FlushBatch) -> Result<()> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut index = tx.open_table(INDEX).map_err(e)?;
            for (l, en, lo) in &moved.locations {
                let still_there = index.get((*l, *en)).map_err(e)?.is_some_and(|v| v.value().0 == log_id);
                if still_there {
                    index.insert((*l, *en), (lo.log_id, lo.offset, lo.len)).map_err(e)?;
                }
            }
            let mut lb = tx.open_table(LOG_LEDGERS).map_err(e)?;
            lb.retain_in((log_id, 0)..=(log_id, u64::MAX), |_, _| false).map_err(e)?;
            let ledgers = tx.open_table(LEDGERS).map_err(e)?;
            for (&(log, ledger), &bytes) in &moved.log_bytes {
                if ledgers.get(ledger).map_err(e)?.is_some() {
                    let old = lb.get((log, ledger)).map_err(e)?.map_or(0, |v| v.value());
                    lb.insert((log, ledger), old + bytes).map_err(e)?;
                }
            }
        }
        tx.commit().map_err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_lookup_delete_tombstone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let idx = Index::open(&dir.path().join("i.redb"), 1 << 20).expect("open");
        assert_eq!(idx.checkpoint().expect("cp"), JournalPos::default());
        let mut b = FlushBatch::default();
        for en in 0..10u64 {
            b.locations.push((7, en, Location { log_id: 1, offset: 16 + en * 10, len: 6 }));
        }
        b.ledgers.insert(7, (8, 9));
        b.log_bytes.insert((1, 7), 100);
        idx.commit_flush(&b, JournalPos { file_id: 3, offset: 99 }).expect("commit");
        assert_eq!(idx.checkpoint().expect("cp"), JournalPos { file_id: 3, offset: 99 });
        assert_eq!(idx.lookup(7, 4).expect("l"), Some(Location { log_id: 1, offset: 56, len: 6 }));
        assert_eq!(idx.lookup_range(7, 2, 5, 100).expect("r").len(), 4);
        assert_eq!(idx.lookup_range(7, 2, 5, 2).expect("r").len(), 2);
        idx.set_fenced(7).expect("fence");
        assert_eq!(idx.ledger(7).expect("l"), Some(LedgerRecord { fenced: true, lac: 8, last_entry: 9 }));
        assert_eq!(idx.live_bytes_per_log().expect("live").get(&1), Some(&100));
        assert_eq!(idx.entries_in_log(1).expect("in log").len(), 10);
        idx.delete_ledger(7, 4).expect("delete");
        assert_eq!(idx.lookup(7, 4).expect("l"), None);
        assert_eq!(idx.ledger(7).expect("l"), None);
        assert!(idx.live_bytes_per_log().expect("live").is_empty());
        assert_eq!(idx.tombstones().expect("t").get(&7), Some(&4));
        assert_eq!(idx.prune_tombstones(4).expect("prune"), 0);
        assert_eq!(idx.prune_tombstones(5).expect("prune"), 1);
    }
}
