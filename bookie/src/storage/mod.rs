//! Ledger storage: ties the journal, the write cache, entry logs and the index together.
//!
//! Add: verify the entry, reserve write-cache bytes (bounded wait, then "bookie overloaded"),
//! journal it, and once the journal group is durable put it in the write cache and answer.
//! Flush (checkpoint): when the cache is half full or every `flush_interval`, the flusher thread
//! swaps the cache, writes its entries sorted by ledger to the current entry log, syncs it,
//! commits the index and the checkpoint (the journal position covered) in one transaction, and
//! deletes journal files before the checkpoint. A fence is ordered with adds through the journal
//! queue, so an add accepted before a fence is durable and visible before the fence is answered.
//! A delete is committed to the index (with a tombstone that journal replay honours) at once. Nothing here speaks the wire protocol.

mod gc;
mod replay;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use magnetar_common::bookie_proto::ADD_FLAG_RECOVERY;
use magnetar_common::entry::{Entry, peek_header};
use tokio::sync::{Semaphore, oneshot};
use tracing::{error, info, warn};

use crate::config::BookieConfig;
use crate::entry_log::{EntryLogger, Location, RECORD_PREFIX_BYTES};
use crate::error::StorageError;
use crate::index::{FlushBatch, Index};
use crate::journal::{Journal, JournalError, JournalPos, format};
use crate::metrics::Metrics;

type Key = (u64, u64);

#[derive(Debug, Default)]
struct CacheState {
    active: BTreeMap<Key, Bytes>,
    active_bytes: u64,
    flushing: Option<Arc<BTreeMap<Key, Bytes>>>,
    flushing_bytes: u64,
    flushing_checkpoint: JournalPos,
    /// Journal position of the last record whose effect is in the cache or the index.
    last_pos: JournalPos,
}

#[derive(Debug, Clone, Copy)]
struct LedgerState {
    fenced: bool,
    lac: i64,
    last_entry: i64,
    deleted: bool,
}

/// Why the bookie refuses writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOnlyReason {
    DiskFull(String),
    JournalFailure(String),
}

#[derive(Debug, Default)]
struct FlushSignal {
    requested: bool,
    stop: bool,
}

/// The storage engine of one bookie.
pub struct Storage {
    cfg: BookieConfig,
    journal: Journal,
    cache: Mutex<CacheState>,
    cache_permits: Semaphore,
    entry_log: EntryLogger,
    index: Index,
    ledgers: Mutex<HashMap<u64, LedgerState>>,
    /// Serializes index commits of flush/compaction with ledger deletion.
    flush_lock: Mutex<()>,
    /// Serializes whole flushes (flusher thread and `flush_now`).
    flush_serial: Mutex<()>,
    signal: Mutex<FlushSignal>,
    signal_cv: Condvar,
    read_only: Mutex<Option<ReadOnlyReason>>,
    read_only_flag: AtomicBool,
    shutting_down: AtomicBool,
    last_checkpoint: Mutex<JournalPos>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("journal_dir", &self.cfg.journal_dir).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Index cache size: small and fixed; entry data is cached by the OS page cache.
const INDEX_CACHE_BYTES: usize = 32 << 20;
/// Most entries one range read returns.
pub const MAX_RANGE_ENTRIES: u64 = 10_000;

impl Storage {
    /// Opens the directories, replays the journal from the last checkpoint into entry logs and
    /// the index, and starts the journal and flusher threads.
    pub fn open(cfg: BookieConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, StorageError> {
        std::fs::create_dir_all(&cfg.journal_dir)?;
        std::fs::create_dir_all(&cfg.ledger_dir)?;
        let index = Index::open(&cfg.ledger_dir.join("index.redb"), INDEX_CACHE_BYTES)?;
        let entry_log = EntryLogger::open(&cfg.ledger_dir.join("entrylogs"), cfg.storage.entry_log_max_bytes.as_u64())?;
        let next_file = replay::replay_journal(&cfg, &index, &entry_log)?;
        let journal = Journal::start(&cfg.journal_dir, next_file, cfg.journal.clone(), metrics.clone())?;
        journal.delete_before(next_file)?;
        let checkpoint = JournalPos { file_id: next_file, offset: 0 };
        let permits = cfg.storage.write_cache_bytes.as_u64() as usize;
        let storage = Arc::new(Self {
            journal,
            cache: Mutex::new(CacheState { last_pos: checkpoint, ..CacheState::default() }),
            cache_permits: Semaphore::new(permits),
            entry_log,
            index,
            ledgers: Mutex::new(HashMap::new()),
            flush_lock: Mutex::new(()),
            flush_serial: Mutex::new(()),
            signal: Mutex::new(FlushSignal::default()),
            signal_cv: Condvar::new(),
            read_only: Mutex::new(None),
            read_only_flag: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            last_checkpoint: Mutex::new(checkpoint),
            flusher: Mutex::new(None),
            metrics,
            cfg,
        });
        let s = storage.clone();
        let handle = std::thread::Builder::new().name("flusher".into()).spawn(move || s.flusher_loop())?;
        *lock(&storage.flusher) = Some(handle);
        Ok(storage)
    }

    pub fn config(&self) -> &BookieConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Ledgers stored here (with flushed entries or a fence record), ascending, without those
    /// being deleted. Entries still only in the journal and write cache are not seen.
    pub fn stored_ledgers(&self) -> Result<Vec<u64>, StorageError> {
        let mut ids = self.index.ledger_ids()?;
        let ledgers = lock(&self.ledgers);
        ids.retain(|l| !ledgers.get(l).is_some_and(|s| s.deleted));
        Ok(ids)
    }

    fn max_entry(&self) -> usize {
        self.cfg.max_entry_bytes.as_u64() as usize
    }

    /// Loads a ledger's state into the map (from the index the first time).
    fn state<'a>(
        &self,
        map: &'a mut HashMap<u64, LedgerState>,
        ledger: u64,
    ) -> Result<Option<&'a mut LedgerState>, StorageError> {
        if !map.contains_key(&ledger) {
            let Some(rec) = self.index.ledger(ledger)? else {
                if self.index.is_tombstoned(ledger)? {
                    map.insert(ledger, LedgerState { fenced: true, lac: -1, last_entry: -1, deleted: true });
                    return Ok(map.get_mut(&ledger));
                }
                return Ok(None);
            };
            map.insert(
                ledger,
                LedgerState { fenced: rec.fenced, lac: rec.lac, last_entry: rec.last_entry, deleted: false },
            );
        }
        Ok(map.get_mut(&ledger))
    }

    /// Stores an encoded entry; resolves once it is durable in the journal.
    pub async fn add(self: &Arc<Self>, flags: u8, raw: Bytes) -> Result<(u64, u64), StorageError> {
        let started = Instant::now();
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(StorageError::ShuttingDown);
        }
        if raw.len() > self.max_entry() {
            return Err(StorageError::TooLarge { len: raw.len(), max: self.max_entry() });
        }
        if let Some(reason) = self.read_only_reason() {
            return Err(StorageError::ReadOnly(reason));
        }
        let entry = Entry::parse(raw).map_err(|e| StorageError::BadRequest(e.to_string()))?;
        let (ledger, entry_id, lac) = (entry.ledger_id, entry.entry_id, entry.lac);
        if entry_id >= i64::MAX as u64 {
            return Err(StorageError::BadRequest(format!("entry id {entry_id} is out of range")));
        }
        if !(-1..entry_id as i64).contains(&lac) {
            return Err(StorageError::BadRequest(format!(
                "entry {ledger}:{entry_id} carries last-add-confirmed {lac}; it must be in -1..{entry_id}"
            )));
        }
        let raw = entry.into_raw();
        let len = raw.len() as u64;
        let wait = self.cfg.storage.write_cache_max_wait;
        match tokio::time::timeout(wait, self.cache_permits.acquire_many(len as u32)).await {
            Ok(Ok(p)) => p.forget(),
            Ok(Err(_)) => return Err(StorageError::ShuttingDown),
            Err(_) => return Err(StorageError::Overloaded { wait_ms: wait.as_millis() as u64 }),
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut ledgers = lock(&self.ledgers);
            let refused = match self.state(&mut ledgers, ledger) {
                Err(e) => Some(e),
                Ok(Some(st)) if st.deleted => Some(StorageError::NotFound(format!("ledger {ledger} was deleted"))),
                Ok(Some(st)) if st.fenced && flags & ADD_FLAG_RECOVERY == 0 => Some(StorageError::Fenced(ledger)),
                Ok(Some(_)) => None,
                Ok(None) => {
                    ledgers.insert(ledger, LedgerState { fenced: false, lac: -1, last_entry: -1, deleted: false });
                    None
                }
            };
            if let Some(err) = refused {
                drop(ledgers);
                self.cache_permits.add_permits(len as usize);
                return Err(err);
            }
            let this = self.clone();
            let body = raw.clone();
            self.journal.append(
                format::KIND_ADD,
                body,
                Box::new(move |res| {
                    let out = this.on_add_durable(ledger, entry_id, lac, raw, res);
                    let _ = tx.send(out);
                }),
            );
        }
        let out = rx.await.map_err(|_| StorageError::ShuttingDown)?;
        if out.is_ok() {
            self.metrics.add_seconds.observe(started.elapsed().as_secs_f64());
            self.metrics.adds.inc();
            self.metrics.add_bytes.inc_by(len);
        } else {
            self.metrics.add_errors.inc();
        }
        out.map(|()| (ledger, entry_id))
    }

    fn on_add_durable(
        &self,
        ledger: u64,
        entry_id: u64,
        lac: i64,
        raw: Bytes,
        res: Result<JournalPos, JournalError>,
    ) -> Result<(), StorageError> {
        let len = raw.len() as u64;
        let pos = match res {
            Ok(pos) => pos,
            Err(e) => {
                self.cache_permits.add_permits(len as usize);
                self.on_journal_error(&e);
                return Err(StorageError::Io(e.to_string()));
            }
        };
        let need_flush = {
            let mut c = lock(&self.cache);
            if let Some(old) = c.active.insert((ledger, entry_id), raw) {
                c.active_bytes -= old.len() as u64;
                self.cache_permits.add_permits(old.len());
            }
            c.active_bytes += len;
            c.last_pos = pos;
            self.metrics.write_cache_bytes.set((c.active_bytes + c.flushing_bytes) as i64);
            c.active_bytes >= self.cfg.storage.write_cache_bytes.as_u64() / 2
        };
        if let Some(st) = lock(&self.ledgers).get_mut(&ledger) {
            st.lac = st.lac.max(lac);
            st.last_entry = st.last_entry.max(entry_id as i64);
        }
        if need_flush {
            self.request_flush();
        }
        Ok(())
    }

    fn on_journal_error(&self, e: &JournalError) {
        if let JournalError::Io { message, no_space } = e {
            let reason = if *no_space {
                ReadOnlyReason::DiskFull(format!("journal disk is full: {message}"))
            } else {
                ReadOnlyReason::JournalFailure(format!("journal write failed: {message}"))
            };
            self.set_read_only(Some(reason));
        }
    }

    /// Fences a ledger: adds without the recovery flag are refused from now on. Resolves once
    /// the fence is durable, after every add accepted before it; returns (LAC, last entry).
    pub async fn fence(self: &Arc<Self>, ledger: u64) -> Result<(i64, i64), StorageError> {
        let rx = {
            let mut ledgers = lock(&self.ledgers);
            match self.state(&mut ledgers, ledger)? {
                Some(st) if st.deleted => return Err(StorageError::NotFound(format!("ledger {ledger} was deleted"))),
                Some(st) => st.fenced = true,
                None => {
                    ledgers.insert(ledger, LedgerState { fenced: true, lac: -1, last_entry: -1, deleted: false });
                }
            }
            self.journal_ledger_record(format::KIND_FENCE, ledger, move |this, pos| {
                // A delete that overtook the fence must not be undone by it.
                if lock(&this.ledgers).get(&ledger).is_some_and(|s| s.deleted) {
                    return Err(StorageError::NotFound(format!("ledger {ledger} was deleted")));
                }
                this.index.set_fenced(ledger)?;
                let mut c = lock(&this.cache);
                c.last_pos = c.last_pos.max(pos);
                drop(c);
                let st = lock(&this.ledgers).get(&ledger).copied();
                Ok(st.map_or((-1, -1), |s| (s.lac, s.last_entry)))
            })
        };
        rx.await.map_err(|_| StorageError::ShuttingDown)?
    }

    /// Queues a ledger-level record (fence, delete) in the journal; `apply` runs on the
    /// journal's sync thread once it is durable. Called with the ledgers lock held, so the record is
    /// ordered after every add that passed the same state check.
    fn journal_ledger_record<T: Send + 'static>(
        self: &Arc<Self>,
        kind: u8,
        ledger: u64,
        apply: impl FnOnce(&Storage, JournalPos) -> Result<T, StorageError> + Send + 'static,
    ) -> oneshot::Receiver<Result<T, StorageError>> {
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        self.journal.append(
            kind,
            Bytes::copy_from_slice(&ledger.to_be_bytes()),
            Box::new(move |res| {
                let out = match res {
                    Err(e) => {
                        this.on_journal_error(&e);
                        Err(StorageError::Io(e.to_string()))
                    }
                    Ok(pos) => apply(&this, pos),
                };
                let _ = tx.send(out);
            }),
        );
        rx
    }

    /// (LAC, last entry) of a ledger this bookie knows.
    pub fn read_lac(&self, ledger: u64) -> Result<(i64, i64), StorageError> {
        let mut ledgers = lock(&self.ledgers);
        match self.state(&mut ledgers, ledger)? {
            Some(st) if !st.deleted => Ok((st.lac, st.last_entry)),
            _ => Err(StorageError::NotFound(format!("ledger {ledger} is not on this bookie"))),
        }
    }

    fn check_not_deleted(&self, ledger: u64) -> Result<(), StorageError> {
        let mut ledgers = lock(&self.ledgers);
        match self.state(&mut ledgers, ledger)? {
            Some(st) if st.deleted => Err(StorageError::NotFound(format!("ledger {ledger} was deleted"))),
            _ => Ok(()),
        }
    }

    /// Reads one entry, verified.
    pub async fn read(self: &Arc<Self>, ledger: u64, entry_id: u64) -> Result<Bytes, StorageError> {
        let mut v = self.read_range(ledger, entry_id, entry_id, u32::MAX).await?;
        v.pop().ok_or_else(|| StorageError::NotFound(format!("entry {ledger}:{entry_id} not found")))
    }

    /// Reads consecutive entries from `first`, up to `last`, stopping at the first missing entry
    /// or once `max_bytes` are exceeded (at least one entry). Every entry is verified.
    pub async fn read_range(
        self: &Arc<Self>,
        ledger: u64,
        first: u64,
        last: u64,
        max_bytes: u32,
    ) -> Result<Vec<Bytes>, StorageError> {
        if first > last {
            return Err(StorageError::BadRequest(format!("read range {first}..={last} is empty")));
        }
        self.check_not_deleted(ledger)?;
        let last = last.min(first.saturating_add(MAX_RANGE_ENTRIES - 1));
        let cached = self.cached_range(ledger, first, last);
        // Entirely served by the write cache: no blocking work.
        if cached.len() as u64 == last - first + 1 {
            return self.finish_read(ledger, first, cached.into_iter().map(|(_, b)| b).collect(), max_bytes);
        }
        let this = self.clone();
        let out = tokio::task::spawn_blocking(move || this.read_range_blocking(ledger, first, last, max_bytes, cached))
            .await
            .map_err(|e| StorageError::Io(format!("read task failed: {e}")))??;
        self.finish_read(ledger, first, out, max_bytes)
    }

    fn finish_read(
        &self,
        ledger: u64,
        first: u64,
        mut out: Vec<Bytes>,
        max_bytes: u32,
    ) -> Result<Vec<Bytes>, StorageError> {
        let mut total = 0usize;
        let mut keep = 0;
        for b in &out {
            if keep > 0 && total + b.len() > max_bytes as usize {
                break;
            }
            total += b.len();
            keep += 1;
        }
        out.truncate(keep);
        if out.is_empty() {
            return Err(StorageError::NotFound(format!("entry {ledger}:{first} not found")));
        }
        self.metrics.reads.inc_by(out.len() as u64);
        self.metrics.read_bytes.inc_by(total as u64);
        Ok(out)
    }

    fn cached_range(&self, ledger: u64, first: u64, last: u64) -> Vec<(u64, Bytes)> {
        let c = lock(&self.cache);
        let range = (Bound::Included((ledger, first)), Bound::Included((ledger, last)));
        let mut out: BTreeMap<u64, Bytes> = BTreeMap::new();
        if let Some(f) = &c.flushing {
            out.extend(f.range(range).map(|((_, e), b)| (*e, b.clone())));
        }
        out.extend(c.active.range(range).map(|((_, e), b)| (*e, b.clone())));
        out.into_iter().collect()
    }

    fn read_range_blocking(
        &self,
        ledger: u64,
        first: u64,
        last: u64,
        max_bytes: u32,
        cached: Vec<(u64, Bytes)>,
    ) -> Result<Vec<Bytes>, StorageError> {
        let limit = (last - first + 1) as usize;
        let mut indexed = self.index.lookup_range(ledger, first, last, limit)?;
        let cached: HashMap<u64, Bytes> = cached.into_iter().collect();
        let mut out = Vec::new();
        let mut total = 0u64;
        let mut i = 0;
        let mut next = first;
        let mut retried = false;
        while next <= last && (out.is_empty() || total <= max_bytes as u64) {
            if let Some(b) = cached.get(&next) {
                total += b.len() as u64;
                out.push(b.clone());
                next += 1;
                continue;
            }
            while i < indexed.len() && indexed[i].0 < next {
                i += 1;
            }
            if i >= indexed.len() || indexed[i].0 != next {
                break;
            }
            // A run of entries stored back to back in one log: one positional read.
            let start = i;
            let mut end = i + 1;
            let mut run_bytes = indexed[i].1.len as u64;
            while end < indexed.len()
                && indexed[end].0 == indexed[end - 1].0 + 1
                && !cached.contains_key(&indexed[end].0)
                && adjacent(&indexed[end - 1].1, &indexed[end].1)
                && total + run_bytes <= max_bytes as u64
            {
                run_bytes += RECORD_PREFIX_BYTES + indexed[end].1.len as u64;
                end += 1;
            }
            let l0 = indexed[start].1;
            let span = indexed[end - 1].1.offset + indexed[end - 1].1.len as u64 - l0.offset;
            let buf = match self.entry_log.read_at(l0.log_id, l0.offset, span as usize) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !retried => {
                    // Compaction moved the entries since the lookup: look them up again.
                    retried = true;
                    indexed = self.index.lookup_range(ledger, next, last, limit)?;
                    i = 0;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            for (e_id, l) in &indexed[start..end] {
                let rel = (l.offset - l0.offset) as usize;
                let raw = buf.slice(rel..rel + l.len as usize);
                let entry = Entry::parse(raw).map_err(|err| {
                    self.metrics.read_errors.inc();
                    error!(ledger, entry = e_id, log_id = l.log_id, error = %err, "stored entry is corrupt; refusing to return it");
                    StorageError::Corrupt(format!("entry {ledger}:{e_id} in entry log {}: {err}", l.log_id))
                })?;
                if entry.ledger_id != ledger || entry.entry_id != *e_id {
                    return Err(StorageError::Corrupt(format!(
                        "index points {ledger}:{e_id} at an entry of {}:{}",
                        entry.ledger_id, entry.entry_id
                    )));
                }
                total += l.len as u64;
                out.push(entry.into_raw());
            }
            next = indexed[end - 1].0 + 1;
            i = end;
        }
        Ok(out)
    }

    /// Deletes a ledger; its space is reclaimed by garbage collection. The delete is journaled
    /// after every add accepted before it, and its tombstone names the journal file holding
    /// the delete record: replay skips the ledger's adds until that file has been checkpointed.
    pub async fn delete(self: &Arc<Self>, ledger: u64) -> Result<(), StorageError> {
        let rx = {
            let mut ledgers = lock(&self.ledgers);
            if self.state(&mut ledgers, ledger)?.is_some_and(|s| s.deleted) {
                return Ok(());
            }
            ledgers.insert(ledger, LedgerState { fenced: true, lac: -1, last_entry: -1, deleted: true });
            self.journal_ledger_record(format::KIND_DELETE, ledger, move |this, pos| this.apply_delete(ledger, pos))
        };
        rx.await.map_err(|_| StorageError::ShuttingDown)??;
        info!(ledger, "ledger deleted");
        Ok(())
    }

    /// Runs on the journal's sync thread once the delete record is durable.
    fn apply_delete(&self, ledger: u64, pos: JournalPos) -> Result<(), StorageError> {
        {
            // Serialized with flush commits, which skip ledgers marked deleted.
            let _g = lock(&self.flush_lock);
            self.index.delete_ledger(ledger, pos.file_id)?;
        }
        let mut c = lock(&self.cache);
        let keys: Vec<Key> = c.active.range((ledger, 0)..=(ledger, u64::MAX)).map(|(k, _)| *k).collect();
        let mut freed = 0usize;
        for k in keys {
            if let Some(b) = c.active.remove(&k) {
                freed += b.len();
            }
        }
        c.active_bytes -= freed as u64;
        c.last_pos = c.last_pos.max(pos);
        drop(c);
        self.cache_permits.add_permits(freed);
        Ok(())
    }

    pub fn read_only_reason(&self) -> Option<String> {
        if !self.read_only_flag.load(Ordering::Relaxed) {
            return None;
        }
        lock(&self.read_only).as_ref().map(|r| match r {
            ReadOnlyReason::DiskFull(s) | ReadOnlyReason::JournalFailure(s) => s.clone(),
        })
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only_flag.load(Ordering::Relaxed)
    }

    fn set_read_only(&self, reason: Option<ReadOnlyReason>) {
        let mut cur = lock(&self.read_only);
        if *cur == reason {
            return;
        }
        match &reason {
            Some(ReadOnlyReason::DiskFull(s)) => {
                warn!(reason = %s, "bookie is now read-only: disk usage above the threshold; reads continue")
            }
            Some(ReadOnlyReason::JournalFailure(s)) => {
                error!(reason = %s, "bookie is now read-only after a journal failure; reads continue; check the disk")
            }
            None => info!("bookie accepts writes again"),
        }
        self.read_only_flag.store(reason.is_some(), Ordering::Relaxed);
        self.metrics.read_only.set(i64::from(reason.is_some()));
        *cur = reason;
    }

    /// Checks disk usage of the journal and ledger directories and turns read-only (or back)
    /// according to the thresholds. Returns the usage share of the fullest disk.
    pub fn check_disks(&self) -> f64 {
        let mut worst = 0.0f64;
        let mut worst_dir = PathBuf::new();
        for dir in [&self.cfg.journal_dir, &self.cfg.ledger_dir] {
            match rustix::fs::statvfs(dir.as_path()) {
                // As `df` counts it: space reserved for root or by the filesystem is neither used
                // nor available to the bookie, and is left out.
                Ok(s) if s.f_blocks.saturating_sub(s.f_bfree) + s.f_bavail > 0 => {
                    let used_blocks = s.f_blocks.saturating_sub(s.f_bfree) as f64;
                    let used = used_blocks / (used_blocks + s.f_bavail as f64);
                    if used > worst {
                        worst = used;
                        worst_dir = dir.clone();
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(dir = %dir.display(), error = %e, "check disk usage"),
            }
        }
        self.metrics.disk_usage_ratio.set(worst);
        let d = &self.cfg.disk;
        let current = lock(&self.read_only).clone();
        if worst > d.usage_threshold {
            if !matches!(current, Some(ReadOnlyReason::JournalFailure(_))) {
                self.set_read_only(Some(ReadOnlyReason::DiskFull(format!(
                    "disk of {} is {:.1}% full, above the {:.1}% threshold",
                    worst_dir.display(),
                    worst * 100.0,
                    d.usage_threshold * 100.0
                ))));
            }
        } else if worst < d.usage_low_water_mark && matches!(current, Some(ReadOnlyReason::DiskFull(_))) {
            self.set_read_only(None);
        }
        worst
    }

    fn request_flush(&self) {
        lock(&self.signal).requested = true;
        self.signal_cv.notify_one();
    }

    /// Flushes the write cache now and waits for it (tests, shutdown).
    pub fn flush_now(&self) -> Result<(), StorageError> {
        self.flush_once()
    }

    fn flusher_loop(self: Arc<Self>) {
        let interval = self.cfg.storage.flush_interval;
        let gc_interval = self.cfg.storage.gc_interval;
        let mut last_gc = Instant::now();
        let mut last_flush = Instant::now();
        loop {
            let stop = {
                let mut s = lock(&self.signal);
                if !s.requested && !s.stop {
                    s = self.signal_cv.wait_timeout(s, interval).unwrap_or_else(|p| p.into_inner()).0;
                }
                s.requested = false;
                s.stop
            };
            // Spread this flush over half the time the cache took to fill (not when stopping).
            let since_last = std::mem::replace(&mut last_flush, Instant::now()).elapsed();
            let pace = (!stop).then_some(since_last);
            if let Err(e) = self.flush_once_paced(pace) {
                error!(error = %e, "flush write cache to entry logs; will retry");
                std::thread::sleep(Duration::from_millis(100));
            }
            if stop {
                break;
            }
            if last_gc.elapsed() >= gc_interval {
                last_gc = Instant::now();
                if let Err(e) = self.collect_garbage() {
                    error!(error = %e, "garbage-collect entry logs");
                }
            }
        }
    }

    fn flush_once(&self) -> Result<(), StorageError> {
        self.flush_once_paced(None)
    }

    /// The cache's other half is three quarters full: a paced flush must hurry.
    fn cache_pressure(&self) -> bool {
        lock(&self.cache).active_bytes >= self.cfg.storage.write_cache_bytes.as_u64() * 3 / 8
    }

    /// One flush. With `fill_time` (how long the cache took to fill), the entry-log writes are
    /// paced to finish in about half that time instead of in one burst at full disk speed: the
    /// journal's syncs then wait behind less queued data (lower add latency), and the flush still
    /// ends well before the other half of the cache fills.
    fn flush_once_paced(&self, fill_time: Option<Duration>) -> Result<(), StorageError> {
        let _serial = lock(&self.flush_serial);
        let (snapshot, bytes, checkpoint) = {
            let mut c = lock(&self.cache);
            if let Some(f) = &c.flushing {
                (Some(f.clone()), c.flushing_bytes, c.flushing_checkpoint)
            } else if c.active.is_empty() {
                (None, 0, c.last_pos)
            } else {
                let snap = Arc::new(std::mem::take(&mut c.active));
                c.flushing = Some(snap.clone());
                c.flushing_bytes = std::mem::take(&mut c.active_bytes);
                c.flushing_checkpoint = c.last_pos;
                (Some(snap), c.flushing_bytes, c.last_pos)
            }
        };
        if snapshot.is_none() && checkpoint <= *lock(&self.last_checkpoint) {
            return Ok(());
        }
        let start = Instant::now();
        let mut written = Duration::ZERO;
        let mut batch = FlushBatch::default();
        if let Some(snap) = &snapshot {
            let deleted = self.deleted_among(snap.keys().map(|k| k.0));
            let mut pacer = fill_time.map(|t| Pacer::new(bytes, t));
            let entries = snap.iter().filter(|((l, _), _)| !deleted.contains(l));
            write_entries(&self.entry_log, entries, &mut batch, |len| match pacer.as_mut() {
                Some(p) => p.wrote(len, || self.cache_pressure(), || self.entry_log.settle()),
                None => Ok(()),
            })?;
            written = start.elapsed();
            self.entry_log.sync()?;
        }
        let synced = start.elapsed();
        {
            let _g = lock(&self.flush_lock);
            let deleted = self.deleted_among(batch.ledgers.keys().copied());
            if !deleted.is_empty() {
                batch.locations.retain(|(l, _, _)| !deleted.contains(l));
                batch.ledgers.retain(|l, _| !deleted.contains(l));
                batch.log_bytes.retain(|(_, l), _| !deleted.contains(l));
            }
            self.index.commit_flush(&batch, checkpoint)?;
        }
        let committed = start.elapsed();
        {
            let mut c = lock(&self.cache);
            c.flushing = None;
            c.flushing_bytes = 0;
            self.metrics.write_cache_bytes.set(c.active_bytes as i64);
        }
        self.cache_permits.add_permits(bytes as usize);
        *lock(&self.last_checkpoint) = checkpoint;
        let trimmed = self.journal.delete_before(checkpoint.file_id)?;
        self.index.prune_tombstones(checkpoint.file_id)?;
        self.metrics.flush_seconds.observe(start.elapsed().as_secs_f64());
        if let Ok(sizes) = self.entry_log.sizes() {
            self.metrics.entry_log_bytes.set(sizes.iter().map(|(_, s)| *s as i64).sum());
        }
        let trimmed_at = start.elapsed();
        if snapshot.is_some() {
            drop(snapshot); // the last reference: the flushed entries are freed here
            if let Some(hook) = AFTER_FLUSH.get() {
                hook();
            }
        }
        // Where the flush's time went, each phase ending at the given time since its start.
        tracing::debug!(
            entries = batch.locations.len(),
            bytes,
            trimmed,
            ?checkpoint,
            ?written,
            ?synced,
            ?committed,
            ?trimmed_at,
            freed = ?start.elapsed(),
            "flushed write cache"
        );
        Ok(())
    }

    fn deleted_among(&self, ledgers: impl Iterator<Item = u64>) -> HashSet<u64> {
        let map = lock(&self.ledgers);
        let mut out = HashSet::new();
        for l in ledgers {
            if map.get(&l).is_some_and(|s| s.deleted) {
                out.insert(l);
            }
        }
        out
    }

    /// Stops accepting requests, completes queued adds, flushes, and stops the threads.
    pub fn shutdown(&self) {
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        self.journal.shutdown();
        {
            let mut s = lock(&self.signal);
            s.stop = true;
            s.requested = true;
        }
        self.signal_cv.notify_one();
        if let Some(h) = lock(&self.flusher).take() {
            let _ = h.join();
        }
        self.cache_permits.close();
        info!("storage shut down cleanly");
    }
}

static AFTER_FLUSH: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Registers a function that every write-cache flush calls once it has freed the flushed entries
/// (the first registration wins). The `magnetar` binary hands the freed pages back to the OS
/// there: a flush frees half the write cache at once, and an allocator that keeps freed pages
/// for a while would otherwise hold them while new adds refill the cache, so the bookie's memory
/// would exceed its configured cache.
pub fn set_after_flush_hook(hook: fn()) {
    let _ = AFTER_FLUSH.set(hook);
}

fn adjacent(a: &Location, b: &Location) -> bool {
    a.log_id == b.log_id && a.offset + a.len as u64 + RECORD_PREFIX_BYTES == b.offset
}

/// Appends entries to the entry log and records where they went.
/// Paces a flush's writes to a byte rate.
struct Pacer {
    start: Instant,
    bytes_per_sec: f64,
    written: u64,
}

/// A paced flush never writes slower than this.
const MIN_FLUSH_BYTES_PER_SEC: f64 = 64.0 * 1024.0 * 1024.0;

impl Pacer {
    fn new(bytes: u64, fill_time: Duration) -> Self {
        let rate = (2.0 * bytes as f64 / fill_time.as_secs_f64().max(1e-3)).max(MIN_FLUSH_BYTES_PER_SEC);
        Self { start: Instant::now(), bytes_per_sec: rate, written: 0 }
    }

    /// Accounts `n` bytes written. When ahead of the rate, and unless `pressure()` says the cache
    /// is filling up (then the flush runs at full speed), spends the lead on `settle()` (making
    /// what was written durable) and sleeps for the rest of it.
    fn wrote(
        &mut self,
        n: u64,
        pressure: impl FnOnce() -> bool,
        settle: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        self.written += n;
        let due = Duration::from_secs_f64(self.written as f64 / self.bytes_per_sec);
        if due > self.start.elapsed() + Duration::from_millis(2) && !pressure() {
            settle()?;
            if let Some(lead) = due.checked_sub(self.start.elapsed()) {
                std::thread::sleep(lead);
            }
        }
        Ok(())
    }
}

fn write_entries<'a>(
    log: &EntryLogger,
    entries: impl Iterator<Item = (&'a Key, &'a Bytes)>,
    batch: &mut FlushBatch,
    mut before_each: impl FnMut(u64) -> std::io::Result<()>,
) -> Result<(), StorageError> {
    for (&(l, e), raw) in entries {
        before_each(raw.len() as u64)?;
        let loc = log.append(raw)?;
        let lac = peek_header(raw).map(|h| h.2).unwrap_or(-1);
        batch.locations.push((l, e, loc));
        let m = batch.ledgers.entry(l).or_insert((-1, -1));
        m.0 = m.0.max(lac);
        m.1 = m.1.max(e as i64);
        *batch.log_bytes.entry((loc.log_id, l)).or_insert(0) += RECORD_PREFIX_BYTES + raw.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod pacer_tests {
    use super::*;

    #[test]
    fn a_pacer_ahead_of_its_rate_settles_then_sleeps_unless_under_pressure() {
        // 64 MiB to flush over a 2 s fill: paced at 64 MiB/s, so 16 MiB is due after 250 ms.
        let mut p = Pacer::new(64 << 20, Duration::from_secs(2));
        let settled = std::cell::Cell::new(0);
        let settle = || {
            settled.set(settled.get() + 1);
            Ok(())
        };
        let start = Instant::now();
        p.wrote(16 << 20, || false, settle).expect("wrote");
        assert_eq!(settled.get(), 1, "ahead of the rate: settled");
        assert!(start.elapsed() >= Duration::from_millis(200), "and slept: {:?}", start.elapsed());
        p.wrote(16 << 20, || true, settle).expect("wrote");
        assert_eq!(settled.get(), 1, "under pressure: no settling (nor sleeping, in the same branch)");
        let e = p.wrote(16 << 20, || false, || Err(std::io::Error::other("disk"))).expect_err("settle failed");
        assert_eq!(e.to_string(), "disk");
    }
}

#[cfg(test)]
mod tests;
