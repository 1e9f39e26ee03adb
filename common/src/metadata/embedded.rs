//! The embedded metadata store: one process, one `redb` database file on local disk.
//!
//! This module owns the database file `metadata.redb` in the directory given to
//! [`EmbeddedStore::open`], the in-memory lease table, and the watchers of this process.
//!
//! - Durability: every put and delete commits with `redb`'s immediate durability (the file is
//!   fsync'd) before it returns, so an acknowledged write survives `kill -9` and power loss.
//! - Versions: one persisted revision counter, bumped by every committing write (like etcd's
//!   `mod_revision`); the version of a key is the revision of its last write, so a deleted and
//!   re-created key never gets an old version back.
//! - Leases live in memory only. Keys attached to a lease are stored with the lease id, and
//!   [`EmbeddedStore::open`] deletes all of them: their holders were in the process that died.
//!   Lease ids come from a persisted counter and are never reused.
//! - Watchers are registered under the same lock under which writes commit and publish, so the
//!   initial snapshot and the events that follow neither miss nor repeat a change. A watcher whose
//!   bounded channel is full or closed is dropped (its channel closes); writers never wait for it.
//!
//! Every `redb` call runs on tokio's blocking pool. This module never retries and never blocks an
//! async worker thread on disk I/O or on its lock.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, Durability, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::{
    KeyValue, LeaseId, MetadataError, MetadataStore, PutCondition, PutOptions, Result, Version, Versioned, Watch,
    WatchEvent, check_key, check_lease_ttl, check_prefix, check_value,
};

/// Name of the database file inside the store's directory.
pub const DB_FILE_NAME: &str = "metadata.redb";
/// Events buffered per watcher; a watcher that falls this far behind is dropped.
const WATCH_CHANNEL_CAPACITY: usize = 1024;
/// Most watchers registered at once.
const MAX_WATCHERS: usize = 4096;
/// Most leases alive at once.
const MAX_LEASES: usize = 65_536;
/// Longest the expiry task sleeps without looking at the lease table.
const EXPIRY_IDLE_WAKE: Duration = Duration::from_secs(1);
/// Pause after a failed expiry before trying again.
const EXPIRY_RETRY_DELAY: Duration = Duration::from_millis(200);

/// key -> (version, lease id or 0, value).
const KV: TableDefinition<&str, (u64, i64, &[u8])> = TableDefinition::new("kv");
/// Counters: [`META_REVISION`] and [`META_NEXT_LEASE`].
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
const META_NEXT_LEASE: &str = "next_lease";

/// Turns any `redb` error into [`MetadataError::Storage`] with what was being done.
fn storage<E: std::fmt::Display>(context: &'static str) -> impl FnOnce(E) -> MetadataError {
    move |e| MetadataError::Storage(format!("{context}: {e}"))
}

/// The durable single-process metadata store. See the module docs.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    /// The lease-expiry task, started by the first lease grant (a runtime exists by then).
    expiry_task: OnceLock<JoinHandle<()>>,
}

struct Inner {
    dir: PathBuf,
    db: Database,
    /// Held by every write from before its transaction begins until its events are published,
    /// and by watcher registration while it reads the snapshot.
    state: Mutex<State>,
    /// Wakes the expiry task when the lease table changes.
    lease_changed: Arc<Notify>,
}

struct State {
    /// Revision of the last committed write.
    revision: u64,
    /// Next lease id to grant (persisted before it is handed out).
    next_lease: u64,
    leases: HashMap<LeaseId, Lease>,
    watchers: Vec<Watcher>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    events: mpsc::Sender<WatchEvent>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").field("dir", &self.inner.dir).finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (creating if missing) the store in `dir`, then deletes every key that was attached to
    /// a lease. Fails if another process has the database open. Blocks on disk I/O.
    pub fn open(dir: &Path) -> Result<EmbeddedStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| MetadataError::Storage(format!("create metadata directory {}: {e}", dir.display())))?;
        let path = dir.join(DB_FILE_NAME);
        let db =
            Database::create(&path).map_err(|e| MetadataError::Storage(format!("open {}: {e}", path.display())))?;

        let txn = begin_write(&db)?;
        let (revision, next_lease, removed) = {
            let mut kv = txn.open_table(KV).map_err(storage("open kv table"))?;
            let mut meta = txn.open_table(META).map_err(storage("open meta table"))?;
            let mut revision = read_counter(&meta, META_REVISION)?.unwrap_or(0);
            let next_lease = read_counter(&meta, META_NEXT_LEASE)?.unwrap_or(1);
            let mut leased = Vec::new();
            for entry in kv.iter().map_err(storage("scan kv table"))? {
                let (key, value) = entry.map_err(storage("scan kv table"))?;
                if value.value().1 != 0 {
                    leased.push(key.value().to_owned());
                }
            }
            if !leased.is_empty() {
                revision += 1;
                for key in &leased {
                    kv.remove(key.as_str()).map_err(storage("delete leased key"))?;
                }
                meta.insert(META_REVISION, revision).map_err(storage("write revision"))?;
            }
            (revision, next_lease, leased.len())
        };
        txn.commit().map_err(storage("commit recovery"))?;
        tracing::info!(dir = %dir.display(), revision, removed_leased_keys = removed,
            "opened embedded metadata store");

        let state = State { revision, next_lease, leases: HashMap::new(), watchers: Vec::new() };
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                db,
                state: Mutex::new(state),
                lease_changed: Arc::new(Notify::new()),
            }),
            expiry_task: OnceLock::new(),
        })
    }

    /// Runs `op` on the blocking pool.
    async fn blocking<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || op(&inner))
            .await
            .map_err(|e| MetadataError::Storage(format!("metadata store task failed: {e}")))?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        if let Some(task) = self.expiry_task.get() {
            task.abort();
        }
    }
}

fn begin_write(db: &Database) -> Result<WriteTransaction> {
    let mut txn = db.begin_write().map_err(storage("begin write transaction"))?;
    txn.set_durability(Durability::Immediate);
    Ok(txn)
}

fn read_counter(meta: &impl ReadableTable<&'static str, u64>, name: &str) -> Result<Option<u64>> {
    Ok(meta.get(name).map_err(storage("read counter"))?.map(|v| v.value()))
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock cannot leave the database half-written (redb aborts the
        // transaction), so the state is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let txn = self.db.begin_read().map_err(storage("begin read transaction"))?;
        let kv = txn.open_table(KV).map_err(storage("open kv table"))?;
        let found = kv.get(key).map_err(storage("read key"))?;
        Ok(found.map(|v| {
            let (version, _, value) = v.value();
            Versioned { value: Bytes::copy_from_slice(value), version }
        }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        let txn = self.db.begin_read().map_err(storage("begin read transaction"))?;
        let kv = txn.open_table(KV).map_err(storage("open kv table"))?;
        let mut out = Vec::new();
        for entry in kv.range::<&str>(prefix..).map_err(storage("scan keys"))? {
            let (key, value) = entry.map_err(storage("scan keys"))?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            let (version, _, value) = value.value();
            out.push(KeyValue { key: key.to_owned(), value: Bytes::copy_from_slice(value), version });
        }
        Ok(out)
    }

    fn put(&self, key: &str, value: Bytes, options: PutOptions) -> Result<Version> {
        let mut state = self.lock();
        if let Some(lease) = options.lease {
            match state.leases.get(&lease) {
                Some(l) if l.deadline > Instant::now() => {}
                _ => return Err(MetadataError::LeaseExpired(lease)),
            }
        }
        let revision = state.revision + 1;
        let txn = begin_write(&self.db)?;
        let old_lease = {
            let mut kv = txn.open_table(KV).map_err(storage("open kv table"))?;
            let current = kv.get(key).map_err(storage("read key"))?.map(|v| {
                let (version, lease, _) = v.value();
                (version, lease)
            });
            let holds = match options.condition {
                PutCondition::Any => true,
                PutCondition::Absent => current.is_none(),
                PutCondition::Version(v) => current.map(|c| c.0) == Some(v),
            };
            if !holds {
                return Err(MetadataError::Conflict { key: key.to_owned() });
            }
            let lease = options.lease.unwrap_or(0);
            kv.insert(key, (revision, lease, value.as_ref())).map_err(storage("write key"))?;
            let mut meta = txn.open_table(META).map_err(storage("open meta table"))?;
            meta.insert(META_REVISION, revision).map_err(storage("write revision"))?;
            current.map(|c| c.1).unwrap_or(0)
        };
        txn.commit().map_err(storage("commit put"))?;
        state.revision = revision;
        let new_lease = options.lease.unwrap_or(0);
        if old_lease != 0
            && old_lease != new_lease
            && let Some(l) = state.leases.get_mut(&old_lease)
        {
            l.keys.remove(key);
        }
        if let Some(l) = options.lease.and_then(|id| state.leases.get_mut(&id)) {
            l.keys.insert(key.to_owned());
        }
        let event = WatchEvent::Put(KeyValue { key: key.to_owned(), value, version: revision });
        state.publish(&[event]);
        Ok(revision)
    }

    fn delete(&self, key: &str, expected: Option<Version>) -> Result<bool> {
        let mut state = self.lock();
        let revision = state.revision + 1;
        let txn = begin_write(&self.db)?;
        let lease = {
            let mut kv = txn.open_table(KV).map_err(storage("open kv table"))?;
            let current = kv.get(key).map_err(storage("read key"))?.map(|v| {
                let (version, lease, _) = v.value();
                (version, lease)
            });
            match (current, expected) {
                (None, None) => return Ok(false),
                (Some((version, _)), Some(v)) if version != v => {
                    return Err(MetadataError::Conflict { key: key.to_owned() });
                }
                (None, Some(_)) => {
                    return Err(MetadataError::Conflict { key: key.to_owned() });
                }
                (Some((_, lease)), _) => {
                    kv.remove(key).map_err(storage("delete key"))?;
                    let mut meta = txn.open_table(META).map_err(storage("open meta table"))?;
                    meta.insert(META_REVISION, revision).map_err(storage("write revision"))?;
                    lease
                }
            }
        };
        txn.commit().map_err(storage("commit delete"))?;
        state.revision = revision;
        if let Some(l) = state.leases.get_mut(&lease) {
            l.keys.remove(key);
        }
        state.publish(&[WatchEvent::Delete { key: key.to_owned() }]);
        Ok(true)
    }

    fn watch(&self, prefix: &str) -> Result<Watch> {
        let mut state = self.lock();
        state.watchers.retain(|w| !w.events.is_closed());
        if state.watchers.len() >= MAX_WATCHERS {
            return Err(MetadataError::Unavailable(format!("too many watchers (limit {MAX_WATCHERS})")));
        }
        let initial = self.list(prefix)?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        state.watchers.push(Watcher { prefix: prefix.to_owned(), events: tx });
        Ok(Watch { initial, events: rx })
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let mut state = self.lock();
        if state.leases.len() >= MAX_LEASES {
            return Err(MetadataError::Unavailable(format!("too many leases (limit {MAX_LEASES})")));
        }
        let id = state.next_lease;
        let lease_id = LeaseId::try_from(id)
            .map_err(|_| MetadataError::Storage(format!("lease id counter overflowed at {id}")))?;
        let txn = begin_write(&self.db)?;
        {
            let mut meta = txn.open_table(META).map_err(storage("open meta table"))?;
            meta.insert(META_NEXT_LEASE, id + 1).map_err(storage("write lease counter"))?;
        }
        txn.commit().map_err(storage("commit lease grant"))?;
        state.next_lease = id + 1;
        let deadline = Instant::now() + ttl;
        state.leases.insert(lease_id, Lease { ttl, deadline, keys: BTreeSet::new() });
        drop(state);
        self.lease_changed.notify_one();
        Ok(lease_id)
    }

    fn renew_lease(&self, lease: LeaseId) -> Result<()> {
        let mut state = self.lock();
        let now = Instant::now();
        match state.leases.get_mut(&lease) {
            Some(l) if l.deadline > now => {
                l.deadline = now + l.ttl;
                Ok(())
            }
            _ => Err(MetadataError::LeaseExpired(lease)),
        }
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let mut state = self.lock();
        self.end_lease(&mut state, lease)
    }

    /// Ends every lease whose deadline has passed.
    fn expire_due(&self) -> Result<()> {
        let mut state = self.lock();
        let now = Instant::now();
        let due: Vec<LeaseId> = state.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        for lease in due {
            tracing::debug!(lease, "lease expired");
            self.end_lease(&mut state, lease)?;
        }
        Ok(())
    }

    fn earliest_deadline(&self) -> Option<Instant> {
        self.lock().leases.values().map(|l| l.deadline).min()
    }

    /// Removes a lease and deletes its keys in one transaction (one revision).
    fn end_lease(&self, state: &mut State, id: LeaseId) -> Result<()> {
        let lease = state.leases.remove(&id).ok_or(MetadataError::LeaseExpired(id))?;
        if lease.keys.is_empty() {
            return Ok(());
        }
        let revision = state.revision + 1;
        let deleted = match self.delete_lease_keys(id, &lease.keys, revision) {
            Ok(deleted) => deleted,
            Err(e) => {
                // Keep the lease (already past due) so that the next expiry pass retries.
                let retry = Lease { deadline: Instant::now(), ..lease };
                state.leases.insert(id, retry);
                return Err(e);
            }
        };
        state.revision = revision;
        let events: Vec<WatchEvent> = deleted.into_iter().map(|key| WatchEvent::Delete { key }).collect();
        state.publish(&events);
        Ok(())
    }

    fn delete_lease_keys(&self, id: LeaseId, keys: &BTreeSet<String>, revision: u64) -> Result<Vec<String>> {
        let txn = begin_write(&self.db)?;
        let mut deleted = Vec::new();
        {
            let mut kv = txn.open_table(KV).map_err(storage("open kv table"))?;
            for key in keys {
                let attached = kv.get(key.as_str()).map_err(storage("read key"))?.is_some_and(|v| v.value().1 == id);
                if attached {
                    kv.remove(key.as_str()).map_err(storage("delete leased key"))?;
                    deleted.push(key.clone());
                }
            }
            let mut meta = txn.open_table(META).map_err(storage("open meta table"))?;
            meta.insert(META_REVISION, revision).map_err(storage("write revision"))?;
        }
        txn.commit().map_err(storage("commit lease deletion"))?;
        Ok(deleted)
    }
}

impl State {
    /// Sends committed events to the watchers whose prefix matches; drops a watcher whose channel
    /// is full or closed, which closes its channel and tells it to watch again.
    fn publish(&mut self, events: &[WatchEvent]) {
        self.watchers.retain(|w| {
            let kept = events
                .iter()
                .filter(|e| match e {
                    WatchEvent::Put(kv) => kv.key.starts_with(&w.prefix),
                    WatchEvent::Delete { key } => key.starts_with(&w.prefix),
                })
                .all(|e| w.events.try_send(e.clone()).is_ok());
            if !kept && !w.events.is_closed() {
                tracing::warn!(prefix = %w.prefix, "dropping a watcher that fell behind");
            }
            kept
        });
    }
}

/// Deletes the keys of leases when their deadline passes. Holds the store only while it works,
/// so that dropping the store closes the database at once; ends when the store is gone.
async fn expire_leases(inner: Weak<Inner>, lease_changed: Arc<Notify>) {
    loop {
        let Some(store) = inner.upgrade() else { return };
        let now = Instant::now();
        match store.earliest_deadline() {
            Some(deadline) if deadline <= now => {
                let result = tokio::task::spawn_blocking(move || store.expire_due()).await;
                let error = match result {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::error!(error, "expire metadata leases");
                tokio::time::sleep(EXPIRY_RETRY_DELAY).await;
            }
            next => {
                drop(store);
                let wake = next.unwrap_or(now + EXPIRY_IDLE_WAKE).min(now + EXPIRY_IDLE_WAKE);
                tokio::select! {
                    _ = tokio::time::sleep_until(wake.into()) => {}
                    _ = lease_changed.notified() => {}
                }
            }
        }
    }
}

#[async_trait]
impl MetadataStore for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        check_key(key)?;
        let key = key.to_owned();
        self.blocking(move |inner| inner.get(&key)).await
    }

    async fn put(&self, key: &str, value: Bytes, options: PutOptions) -> Result<Version> {
        check_key(key)?;
        check_value(&value)?;
        let key = key.to_owned();
        self.blocking(move |inner| inner.put(&key, value, options)).await
    }

    async fn delete(&self, key: &str, expected: Option<Version>) -> Result<bool> {
        check_key(key)?;
        let key = key.to_owned();
        self.blocking(move |inner| inner.delete(&key, expected)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        check_prefix(prefix)?;
        let prefix = prefix.to_owned();
        self.blocking(move |inner| inner.list(&prefix)).await
    }

    async fn watch(&self, prefix: &str) -> Result<Watch> {
        check_prefix(prefix)?;
        let prefix = prefix.to_owned();
        self.blocking(move |inner| inner.watch(&prefix)).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        check_lease_ttl(ttl)?;
        self.expiry_task.get_or_init(|| {
            let inner = Arc::downgrade(&self.inner);
            tokio::spawn(expire_leases(inner, Arc::clone(&self.inner.lease_changed)))
        });
        self.blocking(move |inner| inner.grant_lease(ttl)).await
    }

    async fn renew_lease(&self, lease: LeaseId) -> Result<()> {
        self.blocking(move |inner| inner.renew_lease(lease)).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.blocking(move |inner| inner.revoke_lease(lease)).await
    }
}
