//! A topic's storage: an ordered list of ledgers kept in the metadata store, written through the
//! ledger client, with recently written entries in the shared entry cache.
//!
//! Appends go through one task per topic that keeps them in order: each is queued on the current
//! ledger's writer at once (many in flight), and completions are handled in queue order, so the
//! confirmed position only moves forward and producers are answered in order. The ledger rolls
//! over after a number of entries, bytes or an age; the new ledger is in the metadata list before
//! it receives an entry. Opening a topic fences and closes the ledgers its previous owner left
//! open, so a stale writer can add nothing more. This module never blocks a thread and owns no
//! network front-end.
//!
//! Retention trims the oldest closed ledgers: the appender, which owns the list's version, moves
//! them by compare-and-swap from the list to the list's `deleting` record first, and only then
//! are they deleted; a ledger leaves `deleting` once it is gone. So a failure or a crash in
//! between leaves a deletion to finish (retried at each retention check, by whichever broker owns
//! the topic), never a listed ledger that is gone nor a ledger nobody knows of. The current
//! ledger is never trimmed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use magnetar_bookie::client::{LedgerClient, LedgerError, LedgerOffload, LedgerReader, LedgerWriter};
use magnetar_common::ids::Position;
use magnetar_common::metadata::{MetadataError, PutOptions, SharedStore, Version};
use magnetar_common::topic::TopicName;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::ServiceError;
use super::cache::EntryCache;
use super::offloader::Offloader;
use super::policies::{EffectiveOffloadPolicy, RetentionPolicy};
use crate::config::ManagedLedgerConfig;

/// Metadata key of a topic's ledger list.
pub fn key(topic: &TopicName) -> String {
    format!("/managed-ledgers/{}", topic.path())
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StoredList {
    ledgers: Vec<u64>,
    /// Ledgers taken off the list whose deletion has not finished (retention; empty ledgers
    /// dropped on load): deleted again at each retention check until they are gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    deleting: Vec<u64>,
}

/// Reads a topic's stored list and its version (None: the topic does not exist).
async fn read_list(store: &SharedStore, topic: &TopicName) -> Result<Option<(StoredList, Version)>, ServiceError> {
    let Some(v) = store.get(&key(topic)).await? else { return Ok(None) };
    let list: StoredList = serde_json::from_slice(&v.value)
        .map_err(|e| ServiceError::Internal(format!("ledger list of {topic} is corrupt: {e}")))?;
    Ok(Some((list, v.version)))
}

/// Every ledger a topic's stored list names, listed or still to delete, with the list's version
/// (None: the topic does not exist).
pub async fn stored_ledgers(
    store: &SharedStore,
    topic: &TopicName,
) -> Result<Option<(Vec<u64>, Version)>, ServiceError> {
    Ok(read_list(store, topic).await?.map(|(list, version)| {
        let mut ids = list.deleting;
        ids.extend(list.ledgers);
        (ids, version)
    }))
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LedgerInfo {
    id: u64,
    /// Last confirmed entry (-1: none yet).
    last_entry: i64,
    /// Bytes of its confirmed entries' payloads.
    bytes: u64,
    /// When the ledger was created (ledger metadata `created_at_ms`; this broker's clock for
    /// ledgers it creates).
    created_at_ms: u64,
    /// Its state in object storage (ledger metadata `offload`).
    offload: Option<Arc<LedgerOffload>>,
}

impl LedgerInfo {
    fn new(id: u64, created_at_ms: u64) -> Self {
        LedgerInfo { id, last_entry: -1, bytes: 0, created_at_ms, offload: None }
    }

    fn is_offloaded(&self) -> bool {
        self.offload.as_deref().is_some_and(|o| o.segments().is_some())
    }

    /// Whether its entries are read from object storage (the bookies' copies are deleted).
    fn in_object_storage_only(&self) -> bool {
        self.offload.as_deref().is_some_and(LedgerOffload::bookie_copies_deleted)
    }
}

/// What an offload pass should do, by the topic's policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffloadPlan {
    /// Closed ledgers to upload, oldest first.
    pub upload: Vec<u64>,
    /// Their bytes (the offload backlog).
    pub upload_bytes: u64,
    /// Offloaded ledgers whose bookie copies may now be deleted.
    pub delete_copies: Vec<u64>,
}

/// Most ledgers one retention pass deletes (the next pass continues).
const MAX_LEDGERS_PER_TRIM: usize = 1000;

/// What a retention pass deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Ledgers taken off the topic's list, oldest first.
    pub ledgers: Vec<u64>,
    /// Bytes of their entries.
    pub bytes: u64,
    /// Ledgers off the list (in this pass or earlier) whose deletion has not finished: retried
    /// at the next check.
    pub deleting: Vec<u64>,
}

#[derive(Debug)]
struct State {
    ledgers: Vec<LedgerInfo>,
    /// The stored list's `deleting`.
    deleting: Vec<u64>,
    last_confirmed: Option<Position>,
}

impl State {
    /// The list as stored, with `add` appended to the ledgers.
    fn stored(&self, add: Option<u64>) -> StoredList {
        let ledgers = self.ledgers.iter().map(|l| l.id).chain(add).collect();
        StoredList { ledgers, deleting: self.deleting.clone() }
    }
}

/// One topic's managed ledger.
#[derive(Debug)]
pub struct ManagedLedger {
    topic: TopicName,
    client: LedgerClient,
    cache: EntryCache,
    state: Mutex<State>,
    readers: Mutex<HashMap<u64, Arc<LedgerReader>>>,
    appends: mpsc::Sender<AppendCmd>,
    confirmed: watch::Sender<Option<Position>>,
    /// Bytes stored (payloads written since load plus what closed ledgers report).
    stored_bytes: std::sync::atomic::AtomicU64,
    offloader: Option<Arc<Offloader>>,
    /// The last failed read of offloaded entries (cleared by a successful one).
    offload_read_error: Mutex<Option<String>>,
    /// The ledger whose deletion failed last: the next pass starts after it.
    last_failed_deletion: Mutex<Option<u64>>,
}

enum AppendCmd {
    Append {
        payload: Bytes,
        reply: oneshot::Sender<Result<Position, ServiceError>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
    /// Stop at once: fail what is in flight with NotOwner, leave the ledger open.
    Abandon,
    /// Move these closed ledgers from the list to `deleting` (never the current one); replies
    /// with those moved.
    Trim {
        ledger_ids: Vec<u64>,
        reply: oneshot::Sender<Result<Vec<LedgerInfo>, ServiceError>>,
    },
    /// These ledgers are deleted: take them out of `deleting`.
    Deleted {
        ledger_ids: Vec<u64>,
        reply: oneshot::Sender<Result<(), ServiceError>>,
    },
}

impl std::fmt::Debug for AppendCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppendCmd::Append { payload, .. } => write!(f, "Append({} bytes)", payload.len()),
            AppendCmd::Close { .. } => f.write_str("Close"),
            AppendCmd::Abandon => f.write_str("Abandon"),
            AppendCmd::Trim { ledger_ids, .. } => write!(f, "Trim({ledger_ids:?})"),
            AppendCmd::Deleted { ledger_ids, .. } => write!(f, "Deleted({ledger_ids:?})"),
        }
    }
}

impl ManagedLedger {
    /// Opens (or, with `create`, creates) a topic's managed ledger: recovers ledgers left open,
    /// drops empty ones (to `deleting`, for the first retention check), and starts a new ledger
    /// for appends.
    pub async fn open(
        topic: TopicName,
        client: LedgerClient,
        cache: EntryCache,
        config: ManagedLedgerConfig,
        create: bool,
        offloader: Option<Arc<Offloader>>,
    ) -> Result<Arc<Self>, ServiceError> {
        let store = client.store().clone();
        let key = key(&topic);
        let (list, version) = match read_list(&store, &topic).await? {
            Some((list, version)) => (list, Some(version)),
            None if create => (StoredList::default(), None),
            None => return Err(ServiceError::TopicNotFound(topic.to_string())),
        };
        let mut ledgers = Vec::with_capacity(list.ledgers.len() + 1);
        let mut stored_bytes = 0;
        let mut dropped = Vec::new();
        for &id in &list.ledgers {
            let md = match client.metadata(id).await {
                Ok(md) => md,
                Err(LedgerError::NoSuchLedger(_)) => {
                    warn!(%topic, ledger_id = id, "ledger listed for the topic does not exist; skipping it");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let md = if md.is_closed() {
                md
            } else {
                info!(%topic, ledger_id = id, "recovering ledger left open by the previous owner");
                client.open_for_recovery(id).await?.metadata().clone()
            };
            if md.last_entry_id < 0 {
                info!(%topic, ledger_id = id, "dropping empty ledger");
                dropped.push(id);
                continue;
            }
            stored_bytes += md.length;
            ledgers.push(LedgerInfo {
                id,
                last_entry: md.last_entry_id,
                bytes: md.length,
                created_at_ms: md.created_at_ms,
                offload: md.offload.map(Arc::new),
            });
        }
        let writer = create_ledger(&client, &config, &topic).await?;
        ledgers.push(LedgerInfo::new(writer.ledger_id(), now_ms()));
        let mut deleting = list.deleting;
        for id in dropped {
            if !deleting.contains(&id) {
                deleting.push(id);
            }
        }
        let new_list = StoredList { ledgers: ledgers.iter().map(|l| l.id).collect(), deleting: deleting.clone() };
        let version = match write_list(&store, &key, &new_list, version).await {
            Ok(v) => v,
            Err(e) => {
                delete_unlisted(&client, &topic, writer.ledger_id()).await;
                return Err(e);
            }
        };
        let last_confirmed =
            ledgers.iter().rev().find(|l| l.last_entry >= 0).map(|l| Position::new(l.id, l.last_entry as u64));
        let (tx, rx) = mpsc::channel(1024);
        let (confirmed, _) = watch::channel(last_confirmed);
        let ml = Arc::new(ManagedLedger {
            topic: topic.clone(),
            client: client.clone(),
            cache,
            state: Mutex::new(State { ledgers, deleting, last_confirmed }),
            readers: Mutex::new(HashMap::new()),
            appends: tx,
            confirmed,
            stored_bytes: stored_bytes.into(),
            offloader,
            offload_read_error: Mutex::new(None),
            last_failed_deletion: Mutex::new(None),
        });
        let actor = Appender {
            ml: Arc::downgrade(&ml),
            config,
            store,
            key,
            version,
            writer,
            created: Instant::now(),
            entries: 0,
            bytes: 0,
        };
        tokio::spawn(actor.run(rx));
        Ok(ml)
    }

    pub fn topic(&self) -> &TopicName {
        &self.topic
    }

    /// Queues one entry (waiting while the append queue is full) and returns a future that
    /// resolves once the entry is durable on the ack quorum, with its position. Entries are
    /// stored and confirmed in queue order.
    pub async fn append(
        &self,
        payload: Bytes,
    ) -> Result<impl Future<Output = Result<Position, ServiceError>> + Send + 'static, ServiceError> {
        let (reply, rx) = oneshot::channel();
        let topic = self.topic.to_string();
        self.appends
            .send(AppendCmd::Append { payload, reply })
            .await
            .map_err(|_| ServiceError::Closed(topic.clone()))?;
        Ok(async move { rx.await.unwrap_or(Err(ServiceError::Closed(topic))) })
    }

    /// Waits for in-flight appends and closes the current ledger.
    pub async fn close(&self) {
        let (reply, rx) = oneshot::channel();
        if self.appends.send(AppendCmd::Close { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Stops appending at once (ownership lost): appends in flight and queued fail with NotOwner
    /// (even those a bookie quorum may have stored: producers resend, at-least-once), and the
    /// current ledger is left open for the next owner to fence and recover.
    pub fn abandon(&self) {
        if self.appends.try_send(AppendCmd::Abandon).is_err() {
            // The queue is full or closed: the appender sees the sender count drop when the
            // topic is dropped; until then queued appends wait, unanswered.
            let appends = self.appends.clone();
            tokio::spawn(async move {
                let _ = appends.send(AppendCmd::Abandon).await;
            });
        }
    }

    /// Ids of the topic's ledgers, oldest first (the last one is being written).
    pub fn ledger_ids(&self) -> Vec<u64> {
        self.lock().ledgers.iter().map(|l| l.id).collect()
    }

    /// Watches the last confirmed position (None: the topic is empty).
    pub fn subscribe_confirmed(&self) -> watch::Receiver<Option<Position>> {
        self.confirmed.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The position after the last confirmed entry: where "latest" starts.
    pub fn end_position(&self) -> Position {
        end_of(&self.lock())
    }

    /// The first position of the topic (its oldest stored entry, or the end when empty).
    pub fn first_position(&self) -> Position {
        self.normalize(Position::new(0, 0))
    }

    /// The first stored (or future) position at or after `p`.
    pub fn normalize(&self, p: Position) -> Position {
        normalize_in(&self.lock(), p)
    }

    /// The position after `p`.
    pub fn next(&self, p: Position) -> Position {
        self.normalize(Position::new(p.ledger_id, p.entry_id + 1))
    }

    /// Number of stored entries in `[from, end)`.
    pub fn entries_from(&self, from: Position) -> u64 {
        let s = self.lock();
        let Some(last) = s.last_confirmed else { return 0 };
        s.ledgers
            .iter()
            .filter(|l| l.last_entry >= 0 && l.id >= from.ledger_id && l.id <= last.ledger_id)
            .map(|l| {
                let first = if l.id == from.ledger_id { from.entry_id } else { 0 };
                let end = l.last_entry as u64 + 1;
                end.saturating_sub(first)
            })
            .sum()
    }

    /// Bytes of entries stored for this topic.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads up to `max_entries` confirmed entries (and about `max_bytes`) from `from` on, within
    /// one ledger. Recent entries come from the cache; older ones from bookies in one range read,
    /// without filling the cache (a catching-up reader must not evict the tail).
    pub async fn read(
        &self,
        from: Position,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Position, Bytes)>, ServiceError> {
        let (from, last) = {
            let s = self.lock();
            let from = normalize_in(&s, from);
            let Some(info) = s.ledgers.iter().find(|l| l.id == from.ledger_id) else { return Ok(Vec::new()) };
            if info.last_entry < from.entry_id as i64 {
                return Ok(Vec::new());
            }
            let last = (info.last_entry as u64).min(from.entry_id + max_entries.max(1) as u64 - 1);
            (from, last)
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut e = from.entry_id;
        while e <= last && bytes < max_bytes {
            let pos = Position::new(from.ledger_id, e);
            match self.cache.get(&pos) {
                Some(b) => {
                    bytes += b.len();
                    out.push((pos, b));
                    e += 1;
                }
                None => break,
            }
        }
        if e <= last && bytes < max_bytes {
            // Not cached: read the rest of the range from the bookies or object storage.
            let remaining = (max_bytes - bytes) as u64;
            for entry in self.read_stored(from.ledger_id, e, last, remaining).await? {
                let pos = Position::new(from.ledger_id, entry.entry_id);
                let payload = entry.payload();
                bytes += payload.len();
                out.push((pos, payload));
                if bytes >= max_bytes {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Reads one stored entry (for redeliveries).
    pub async fn read_entry(&self, pos: Position) -> Result<Option<Bytes>, ServiceError> {
        let exists = {
            let s = self.lock();
            s.ledgers.iter().any(|l| l.id == pos.ledger_id && pos.entry_id as i64 <= l.last_entry)
        };
        if !exists {
            // Never stored, or trimmed by retention.
            return Ok(None);
        }
        if let Some(b) = self.cache.get(&pos) {
            return Ok(Some(b));
        }
        Ok(self.read_stored(pos.ledger_id, pos.entry_id, pos.entry_id, 1).await?.pop().map(|e| e.payload()))
    }

    /// Reads entries of a closed or current ledger from where they are stored: its bookies, or
    /// object storage once the bookies' copies are deleted (at most about `max_bytes` there,
    /// with large range reads and read-ahead; at least one entry).
    async fn read_stored(
        &self,
        ledger_id: u64,
        first: u64,
        last: u64,
        max_bytes: u64,
    ) -> Result<Vec<magnetar_common::entry::Entry>, ServiceError> {
        let offload = {
            let s = self.lock();
            let info = s.ledgers.iter().find(|l| l.id == ledger_id);
            info.filter(|l| l.in_object_storage_only()).and_then(|l| l.offload.clone())
        };
        let Some(offload) = offload else { return self.read_from_bookies(ledger_id, first, last).await };
        let Some(offloader) = &self.offloader else {
            return Err(ServiceError::Persistence(format!(
                "ledger {ledger_id} of {} is in object storage, but this broker has no [offload] store configured",
                self.topic
            )));
        };
        let result = offloader.read(ledger_id, &offload, first, last, max_bytes).await;
        let mut error = self.offload_read_error.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(_) => *error = None,
            Err(e) => *error = Some(e.to_string()),
        }
        result
    }

    /// The last failed read of offloaded entries, if the latest read failed.
    pub fn offload_read_error(&self) -> Option<String> {
        self.offload_read_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Bytes of entries whose copies are on bookies (offloaded ledgers within their deletion
    /// lag included).
    pub fn bookie_bytes(&self) -> u64 {
        self.lock().ledgers.iter().filter(|l| !l.in_object_storage_only()).map(|l| l.bytes).sum()
    }

    /// Bytes of entries in offloaded ledgers, and how many such ledgers.
    pub fn offloaded(&self) -> (u64, usize) {
        let s = self.lock();
        let off = s.ledgers.iter().filter(|l| l.is_offloaded());
        off.fold((0, 0), |(b, n), l| (b + l.bytes, n + 1))
    }

    /// What the topic's offload policy asks for now; `requested_through`: an admin request to
    /// offload every closed ledger up to this id.
    pub fn offload_plan(
        &self,
        policy: &EffectiveOffloadPolicy,
        requested_through: Option<u64>,
        now_ms: u64,
    ) -> OffloadPlan {
        offload_plan(&self.lock().ledgers, policy, requested_through, now_ms)
    }

    /// The newest closed, non-empty ledger.
    pub fn last_closed_ledger(&self) -> Option<u64> {
        let s = self.lock();
        let closed = &s.ledgers[..s.ledgers.len().saturating_sub(1)];
        closed.iter().rev().find(|l| l.last_entry >= 0).map(|l| l.id)
    }

    /// Records a ledger's new offload state (after the offloader wrote it to the metadata).
    pub fn set_offload(&self, ledger_id: u64, offload: LedgerOffload) {
        let moved = offload.bookie_copies_deleted();
        if let Some(l) = self.lock().ledgers.iter_mut().find(|l| l.id == ledger_id) {
            l.offload = Some(Arc::new(offload));
        }
        if moved {
            self.forget_reader(ledger_id);
        }
    }

    async fn read_from_bookies(
        &self,
        ledger_id: u64,
        first: u64,
        last: u64,
    ) -> Result<Vec<magnetar_common::entry::Entry>, ServiceError> {
        for attempt in 0..2 {
            let reader = {
                let cached = self.readers.lock().unwrap_or_else(|p| p.into_inner()).get(&ledger_id).cloned();
                match cached {
                    Some(r) if attempt == 0 => r,
                    _ => {
                        let r = Arc::new(self.client.open(ledger_id).await?);
                        self.readers.lock().unwrap_or_else(|p| p.into_inner()).insert(ledger_id, r.clone());
                        r
                    }
                }
            };
            match reader.read(first, last).await {
                Ok(entries) => return Ok(entries),
                // The ensemble may have changed since the reader was opened: an open ledger's
                // writer replaces failed bookies, and auto-recovery replaces lost bookies in
                // closed ledgers too.
                Err(e) if attempt == 0 => {
                    warn!(topic = %self.topic, ledger_id, error = %e, "read failed; reopening the ledger");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::Internal("unreachable read retry".into()))
    }

    fn confirm(&self, pos: Position, len: usize) {
        {
            let mut s = self.lock();
            if let Some(l) = s.ledgers.iter_mut().find(|l| l.id == pos.ledger_id) {
                l.last_entry = l.last_entry.max(pos.entry_id as i64);
                l.bytes += len as u64;
            }
            s.last_confirmed = Some(pos);
        }
        self.stored_bytes.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
        self.confirmed.send_replace(Some(pos));
    }

    /// Last confirmed entry of one of the topic's ledgers (-1: none).
    fn last_entry_of(&self, ledger_id: u64) -> i64 {
        self.lock().ledgers.iter().find(|l| l.id == ledger_id).map_or(-1, |l| l.last_entry)
    }

    fn add_ledger(&self, id: u64) {
        self.lock().ledgers.push(LedgerInfo::new(id, now_ms()));
    }

    /// The closed ledgers `policy` lets go of, given that every entry before `mark` is
    /// acknowledged by every durable subscription; oldest first, at most [`MAX_LEDGERS_PER_TRIM`].
    pub fn retention_candidates(&self, mark: Position, policy: &RetentionPolicy, now_ms: u64) -> Vec<u64> {
        retention_candidates(&self.lock().ledgers, mark, policy, now_ms)
    }

    /// Applies a retention policy: moves the ledgers it lets go of from the topic's list to its
    /// `deleting` record (compare-and-swap by the appender), then deletes every ledger in
    /// `deleting` from the bookies, object storage and the metadata store (see
    /// [`Self::delete_pending`]). Reads at their positions move on to the first remaining entry.
    /// `mark`: every entry before it is acknowledged by every durable subscription (the slowest
    /// mark-delete position plus one; the end position when there is none). The caller keeps
    /// `mark` valid (no subscription may start before it) until `off_list` is called or dropped:
    /// once the ledgers are off the list, before they are deleted.
    pub async fn apply_retention(
        &self,
        mark: Position,
        policy: &RetentionPolicy,
        now_ms: u64,
        off_list: impl FnOnce(),
    ) -> Result<Trimmed, ServiceError> {
        let ids = self.retention_candidates(mark, policy, now_ms);
        let removed = if ids.is_empty() { Vec::new() } else { self.remove_ledgers(ids).await? };
        off_list();
        let mut trimmed = Trimmed::default();
        for l in removed {
            for e in 0..=l.last_entry {
                self.cache.invalidate(&Position::new(l.id, e as u64));
            }
            self.forget_reader(l.id);
            info!(topic = %self.topic, ledger_id = l.id, entries = l.last_entry + 1, bytes = l.bytes, "retention: ledger taken off the list");
            trimmed.ledgers.push(l.id);
            trimmed.bytes += l.bytes;
        }
        trimmed.deleting = self.delete_pending().await;
        Ok(trimmed)
    }

    /// Moves ledgers from the list to `deleting` (never the current one); returns those moved.
    async fn remove_ledgers(&self, ledger_ids: Vec<u64>) -> Result<Vec<LedgerInfo>, ServiceError> {
        let (reply, rx) = oneshot::channel();
        let closed = || ServiceError::Closed(self.topic.to_string());
        self.appends.send(AppendCmd::Trim { ledger_ids, reply }).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    async fn forget_deleted(&self, ledger_ids: Vec<u64>) -> Result<(), ServiceError> {
        let (reply, rx) = oneshot::channel();
        let closed = || ServiceError::Closed(self.topic.to_string());
        self.appends.send(AppendCmd::Deleted { ledger_ids, reply }).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Ledgers taken off the list whose deletion has not finished.
    pub fn deleting(&self) -> Vec<u64> {
        self.lock().deleting.clone()
    }

    /// Deletes the ledgers in `deleting` (objects, bookie copies and metadata; one already gone
    /// counts as deleted) and takes those deleted out of the stored record. Returns the ledgers
    /// still to delete, retried at the next call, on this broker or on the topic's next owner.
    /// A pass stops at its first failure: that is most often the object store or the metadata
    /// store being down, and every other deletion would wait as long for the same answer. The
    /// next pass starts after the ledger that failed, so one that cannot be deleted does not
    /// hold up the others.
    pub async fn delete_pending(&self) -> Vec<u64> {
        let pending = self.deleting();
        if pending.is_empty() {
            return pending;
        }
        let last_failed = *self.last_failed_deletion.lock().unwrap_or_else(|p| p.into_inner());
        let mut deleted = Vec::new();
        let mut failed = None;
        for id in deletion_order(pending, last_failed) {
            match super::offloader::delete_ledger(&self.client, self.offloader.as_deref(), id).await {
                Ok(()) => {
                    info!(topic = %self.topic, ledger_id = id, "ledger deleted");
                    deleted.push(id);
                }
                Err(e) => {
                    warn!(topic = %self.topic, ledger_id = id, error = %e, "delete ledger taken off the list (this and the rest retried at the next retention check)");
                    failed = Some(id);
                    break;
                }
            }
        }
        *self.last_failed_deletion.lock().unwrap_or_else(|p| p.into_inner()) = failed;
        if !deleted.is_empty()
            && let Err(e) = self.forget_deleted(deleted).await
        {
            // They are gone: deleting them again at the next check finds nothing to do.
            warn!(topic = %self.topic, error = %e, "take deleted ledgers out of the topic's list");
        }
        self.deleting()
    }

    /// Moves ledgers from the list to `deleting` in memory (by the appender, after its
    /// compare-and-swap wrote the same).
    fn drop_ledgers(&self, ids: &[u64]) -> Vec<LedgerInfo> {
        let removed: Vec<LedgerInfo> = {
            let mut s = self.lock();
            let (gone, keep): (Vec<LedgerInfo>, _) =
                std::mem::take(&mut s.ledgers).into_iter().partition(|l| ids.contains(&l.id));
            s.ledgers = keep;
            s.deleting.extend(gone.iter().map(|l| l.id));
            gone
        };
        let bytes: u64 = removed.iter().map(|l| l.bytes).sum();
        let _ = self.stored_bytes.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |b| Some(b.saturating_sub(bytes)),
        );
        removed
    }

    fn forget_reader(&self, ledger_id: u64) {
        self.readers.lock().unwrap_or_else(|p| p.into_inner()).remove(&ledger_id);
    }
}

/// The order a deletion pass tries `pending` in: from the ledger after `last_failed` (the one
/// the previous pass stopped at) round to it, so that every ledger gets its turn.
fn deletion_order(mut pending: Vec<u64>, last_failed: Option<u64>) -> Vec<u64> {
    let start = pending.iter().position(|id| Some(*id) == last_failed).map_or(0, |i| i + 1);
    let len = pending.len().max(1);
    pending.rotate_left(start % len);
    pending
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// See [`ManagedLedger::retention_candidates`]. `ledgers` is the topic's list, in order; its last
/// ledger is the current one. A closed ledger counts as acknowledged once `mark` is in a later
/// ledger. Its age is counted from the creation of the ledger after it (the rollover or load that
/// ended it), so none of its entries is younger than that. Sizes are summed from the newest
/// acknowledged ledger backwards. A ledger goes when it is older than `policy.time` or when it
/// takes that sum beyond `policy.size`; the result is a prefix of the list.
fn retention_candidates(ledgers: &[LedgerInfo], mark: Position, policy: &RetentionPolicy, now_ms: u64) -> Vec<u64> {
    if policy.is_unlimited() || ledgers.len() < 2 {
        return Vec::new();
    }
    let closed = &ledgers[..ledgers.len() - 1];
    let acked = closed.iter().take_while(|l| l.id < mark.ledger_id).count();
    // Index of the newest acknowledged ledger that takes the size beyond the limit.
    let over_size = policy.size.and_then(|limit| {
        let mut sum = 0u64;
        (0..acked).rev().find(|&i| {
            sum = sum.saturating_add(closed[i].bytes);
            sum > limit.as_u64()
        })
    });
    let mut out = Vec::new();
    for i in 0..acked.min(MAX_LEDGERS_PER_TRIM) {
        let ended_ms = ledgers[i + 1].created_at_ms;
        let expired = policy.time.is_some_and(|t| now_ms.saturating_sub(ended_ms) as u128 > t.as_millis());
        if !(expired || over_size.is_some_and(|k| i <= k)) {
            break;
        }
        out.push(closed[i].id);
    }
    out
}

/// See [`ManagedLedger::offload_plan`]. Like Pulsar's threshold: sizes are summed from the
/// newest ledger (the current one included) backwards, and every closed ledger from the one that
/// takes the sum past `threshold` back to the oldest goes. A closed ledger also goes once its
/// newest entry (the creation of the next ledger) is older than `age`, or when an admin request
/// covers it.
fn offload_plan(
    ledgers: &[LedgerInfo],
    policy: &EffectiveOffloadPolicy,
    requested_through: Option<u64>,
    now_ms: u64,
) -> OffloadPlan {
    let mut plan = OffloadPlan::default();
    let Some(closed) = ledgers.len().checked_sub(1).map(|n| &ledgers[..n]) else { return plan };
    // Index of the newest closed ledger over the threshold.
    let over_size = policy.threshold.and_then(|limit| {
        let mut sum = ledgers.last().map_or(0, |l| l.bytes);
        (0..closed.len()).rev().find(|&i| {
            sum = sum.saturating_add(closed[i].bytes);
            sum > limit.as_u64()
        })
    });
    for (i, l) in closed.iter().enumerate() {
        if l.last_entry < 0 {
            continue;
        }
        if let Some(LedgerOffload::Offloaded { offloaded_at_ms, bookie_copies_deleted_at_ms: None, .. }) =
            l.offload.as_deref()
        {
            if now_ms.saturating_sub(*offloaded_at_ms) as u128 >= policy.deletion_lag.as_millis() {
                plan.delete_copies.push(l.id);
            }
            continue;
        }
        if l.is_offloaded() {
            continue;
        }
        let ended_ms = ledgers[i + 1].created_at_ms;
        let aged = policy.age.is_some_and(|a| now_ms.saturating_sub(ended_ms) as u128 > a.as_millis());
        let requested = requested_through.is_some_and(|r| l.id <= r);
        if over_size.is_some_and(|k| i <= k) || aged || requested {
            plan.upload.push(l.id);
            plan.upload_bytes += l.bytes;
        }
    }
    plan
}

fn end_of(s: &State) -> Position {
    match s.last_confirmed {
        Some(p) => Position::new(p.ledger_id, p.entry_id + 1),
        None => Position::new(s.ledgers.first().map_or(0, |l| l.id), 0),
    }
}

fn normalize_in(s: &State, p: Position) -> Position {
    let end = end_of(s);
    if p >= end {
        return end;
    }
    for l in &s.ledgers {
        if l.id < p.ledger_id || l.last_entry < 0 {
            continue;
        }
        if l.id == p.ledger_id {
            if p.entry_id as i64 <= l.last_entry {
                return p;
            }
            continue;
        }
        return Position::new(l.id, 0);
    }
    end
}

async fn create_ledger(
    client: &LedgerClient,
    config: &ManagedLedgerConfig,
    topic: &TopicName,
) -> Result<LedgerWriter, ServiceError> {
    let custom = BTreeMap::from([("topic".to_string(), topic.to_string())]);
    Ok(client.create(config.ensemble_size, config.write_quorum, config.ack_quorum, custom).await?)
}

/// Deletes a ledger just created whose listing failed (it holds no entry). If that fails too,
/// nothing records it: the WARN names it for an operator to delete.
async fn delete_unlisted(client: &LedgerClient, topic: &TopicName, ledger_id: u64) {
    if let Err(e) = client.delete(ledger_id).await {
        warn!(%topic, ledger_id, error = %e, "delete an empty ledger that could not be listed; it is left in the metadata store, listed by no topic");
    }
}

async fn write_list(
    store: &SharedStore,
    key: &str,
    list: &StoredList,
    version: Option<Version>,
) -> Result<Version, ServiceError> {
    let value = Bytes::from(serde_json::to_vec(list).map_err(|e| ServiceError::Internal(e.to_string()))?);
    let options = match version {
        Some(v) => PutOptions::version(v),
        None => PutOptions::absent(),
    };
    store.put(key, value, options).await.map_err(|e| match e {
        MetadataError::Conflict { .. } => {
            ServiceError::Unavailable(format!("ledger list {key} was changed by another broker (fenced)"))
        }
        e => e.into(),
    })
}

type Reply = oneshot::Sender<Result<Position, ServiceError>>;
type Pending = std::pin::Pin<Box<dyn Future<Output = (Result<u64, LedgerError>, u64, Bytes, Reply)> + Send>>;

/// The task that owns a topic's current ledger writer.
struct Appender {
    ml: std::sync::Weak<ManagedLedger>,
    config: ManagedLedgerConfig,
    store: SharedStore,
    key: String,
    version: Version,
    writer: LedgerWriter,
    created: Instant,
    entries: u64,
    bytes: u64,
}

impl Appender {
    async fn run(mut self, mut rx: mpsc::Receiver<AppendCmd>) {
        let mut inflight: FuturesOrdered<Pending> = FuturesOrdered::new();
        let mut failed = false;
        loop {
            tokio::select! {
                biased;
                Some((result, ledger_id, payload, reply)) = inflight.next() => {
                    let Some(ml) = self.ml.upgrade() else { return };
                    match result {
                        Ok(entry_id) => {
                            let pos = Position::new(ledger_id, entry_id);
                            ml.confirm(pos, payload.len());
                            let _ = reply.send(Ok(pos));
                        }
                        Err(e) if ledger_id == self.writer.ledger_id() => {
                            warn!(topic = %ml.topic, ledger_id, error = %e, "append failed; recovering the ledger and writing the rest to a new one");
                            failed = !self.recover_failed_writer(&ml, &mut inflight, payload, reply).await;
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e.into()));
                        }
                    }
                }
                cmd = rx.recv() => match cmd {
                    Some(AppendCmd::Append { payload, reply }) => {
                        if failed || self.should_roll_over() {
                            if let Err(e) = self.roll_over().await {
                                let _ = reply.send(Err(e));
                                continue;
                            }
                            failed = false;
                        }
                        self.push(&mut inflight, payload, reply);
                    }
                    Some(AppendCmd::Close { reply }) => {
                        while let Some((result, ledger_id, payload, r)) = inflight.next().await {
                            if let (Ok(entry_id), Some(ml)) = (&result, self.ml.upgrade()) {
                                ml.confirm(Position::new(ledger_id, *entry_id), payload.len());
                            }
                            let _ = r.send(result.map(|e| Position::new(ledger_id, e)).map_err(Into::into));
                        }
                        if let Err(e) = self.writer.close().await {
                            warn!(ledger_id = self.writer.ledger_id(), error = %e, "close ledger");
                        }
                        let _ = reply.send(());
                        return;
                    }
                    Some(AppendCmd::Abandon) => {
                        let topic = self.ml.upgrade().map(|ml| ml.topic.to_string()).unwrap_or_default();
                        let not_owner = || ServiceError::NotOwner { topic: topic.clone(), owner: None };
                        // Dropping the in-flight appends drops their reply senders: their
                        // producers see the topic closed (NotOwner on the wire) without waiting
                        // for bookies.
                        drop(std::mem::take(&mut inflight));
                        rx.close();
                        while let Some(cmd) = rx.recv().await {
                            match cmd {
                                AppendCmd::Append { reply, .. } => {
                                    let _ = reply.send(Err(not_owner()));
                                }
                                AppendCmd::Close { reply } => {
                                    let _ = reply.send(());
                                }
                                AppendCmd::Trim { reply, .. } => {
                                    let _ = reply.send(Err(not_owner()));
                                }
                                AppendCmd::Deleted { reply, .. } => {
                                    let _ = reply.send(Err(not_owner()));
                                }
                                AppendCmd::Abandon => {}
                            }
                        }
                        info!(%topic, ledger_id = self.writer.ledger_id(), "appends abandoned: ownership lost");
                        return;
                    }
                    Some(AppendCmd::Trim { ledger_ids, reply }) => {
                        let _ = reply.send(self.trim(&ledger_ids).await);
                    }
                    Some(AppendCmd::Deleted { ledger_ids, reply }) => {
                        let _ = reply.send(self.forget_deleted(&ledger_ids).await);
                    }
                    None => return,
                }
            }
        }
    }

    /// Queues an entry on the current writer.
    fn push(&mut self, inflight: &mut FuturesOrdered<Pending>, payload: Bytes, reply: Reply) {
        self.entries += 1;
        self.bytes += payload.len() as u64;
        let ledger_id = self.writer.ledger_id();
        let fut = self.writer.append(payload.clone());
        let ml = self.ml.clone();
        inflight.push_back(Box::pin(async move {
            let r = fut.await;
            if let (Ok(e), Some(ml)) = (&r, ml.upgrade()) {
                ml.cache.insert(Position::new(ledger_id, *e), payload.clone());
            }
            (r, ledger_id, payload, reply)
        }));
    }

    /// The current writer failed at an entry. Every later entry of that writer fails too (acks
    /// are in order). Like Pulsar's managed ledger, keep the producers' order and tell them the
    /// truth: fence and recover the ledger to learn which of those entries are stored, confirm
    /// those, and write the others, in order, to a new ledger before anything queued after them.
    /// Returns false if that was impossible (the entries then fail, and the ledger is recovered
    /// by the topic's next load).
    async fn recover_failed_writer(
        &mut self,
        ml: &Arc<ManagedLedger>,
        inflight: &mut FuturesOrdered<Pending>,
        payload: Bytes,
        reply: Reply,
    ) -> bool {
        let failed_id = self.writer.ledger_id();
        let mut failed = vec![(payload, reply)];
        while let Some((result, ledger_id, payload, reply)) = inflight.next().await {
            match result {
                Ok(entry_id) if ledger_id != failed_id => {
                    let pos = Position::new(ledger_id, entry_id);
                    ml.confirm(pos, payload.len());
                    let _ = reply.send(Ok(pos));
                }
                _ => failed.push((payload, reply)),
            }
        }
        let first = ml.last_entry_of(failed_id) + 1;
        let last = match ml.client.open_for_recovery(failed_id).await {
            Ok(reader) => reader.metadata().last_entry_id,
            Err(e) => {
                warn!(topic = %ml.topic, ledger_id = failed_id, error = %e, "recover failed ledger");
                for (_, reply) in failed {
                    let _ = reply.send(Err(ServiceError::Persistence(format!("ledger {failed_id} failed: {e}"))));
                }
                return false;
            }
        };
        let mut redo = Vec::new();
        for (k, (payload, reply)) in failed.into_iter().enumerate() {
            let entry_id = first + k as i64;
            if entry_id <= last {
                let pos = Position::new(failed_id, entry_id as u64);
                ml.cache.insert(pos, payload.clone());
                ml.confirm(pos, payload.len());
                let _ = reply.send(Ok(pos));
            } else {
                redo.push((payload, reply));
            }
        }
        info!(topic = %ml.topic, ledger_id = failed_id, last, rewritten = redo.len(), "failed ledger recovered");
        if let Err(e) = self.roll_over().await {
            for (_, reply) in redo {
                let _ = reply.send(Err(e.clone()));
            }
            return false;
        }
        for (payload, reply) in redo {
            self.push(inflight, payload, reply);
        }
        true
    }

    /// Moves closed ledgers from the list to `deleting` by compare-and-swap on the list's
    /// version, then in the in-memory state. The current ledger stays whatever is asked.
    async fn trim(&mut self, ledger_ids: &[u64]) -> Result<Vec<LedgerInfo>, ServiceError> {
        let Some(ml) = self.ml.upgrade() else { return Err(ServiceError::Closed(String::new())) };
        let current = self.writer.ledger_id();
        let mut list = ml.lock().stored(None);
        let (gone, keep): (Vec<u64>, Vec<u64>) =
            list.ledgers.into_iter().partition(|id| *id != current && ledger_ids.contains(id));
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        list.ledgers = keep;
        list.deleting.extend(&gone);
        self.version = write_list(&self.store, &self.key, &list, Some(self.version)).await?;
        Ok(ml.drop_ledgers(&gone))
    }

    /// Takes deleted ledgers out of `deleting`: stored by compare-and-swap, then in memory.
    async fn forget_deleted(&mut self, ledger_ids: &[u64]) -> Result<(), ServiceError> {
        let Some(ml) = self.ml.upgrade() else { return Err(ServiceError::Closed(String::new())) };
        let mut list = ml.lock().stored(None);
        let before = list.deleting.len();
        list.deleting.retain(|id| !ledger_ids.contains(id));
        if list.deleting.len() == before {
            return Ok(());
        }
        self.version = write_list(&self.store, &self.key, &list, Some(self.version)).await?;
        ml.lock().deleting.retain(|id| !ledger_ids.contains(id));
        Ok(())
    }

    fn should_roll_over(&self) -> bool {
        self.entries >= self.config.rollover_max_entries
            || self.bytes >= self.config.rollover_max_bytes.as_u64()
            || (self.entries > 0 && self.created.elapsed() >= self.config.rollover_max_age)
    }

    /// Starts a new ledger, lists it, and closes the old one once its appends are done.
    async fn roll_over(&mut self) -> Result<(), ServiceError> {
        let Some(ml) = self.ml.upgrade() else { return Err(ServiceError::Closed(String::new())) };
        let writer = create_ledger(&ml.client, &self.config, &ml.topic).await?;
        let list = ml.lock().stored(Some(writer.ledger_id()));
        match write_list(&self.store, &self.key, &list, Some(self.version)).await {
            Ok(v) => self.version = v,
            Err(e) => {
                delete_unlisted(&ml.client, &ml.topic, writer.ledger_id()).await;
                return Err(e);
            }
        }
        ml.add_ledger(writer.ledger_id());
        info!(topic = %ml.topic, old = self.writer.ledger_id(), new = writer.ledger_id(), entries = self.entries, "ledger rolled over");
        let old = std::mem::replace(&mut self.writer, writer);
        let old_id = old.ledger_id();
        let weak = self.ml.clone();
        tokio::spawn(async move {
            if let Err(e) = old.close().await {
                warn!(ledger_id = old_id, error = %e, "close rolled-over ledger (a later owner recovers it)");
            }
            if let Some(ml) = weak.upgrade() {
                ml.forget_reader(old_id);
            }
        });
        self.created = Instant::now();
        self.entries = 0;
        self.bytes = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytesize::ByteSize;

    use super::*;

    /// Ledgers 1, 2, 3 (closed, 100 bytes each, created at 0, 1000, 2000 ms) and 4 (current,
    /// created at 3000 ms).
    fn ledgers() -> Vec<LedgerInfo> {
        (1..=4)
            .map(|id| LedgerInfo {
                id,
                last_entry: if id == 4 { -1 } else { 9 },
                bytes: if id == 4 { 0 } else { 100 },
                created_at_ms: (id - 1) * 1000,
                offload: None,
            })
            .collect()
    }

    fn offloaded(at_ms: u64, deleted: bool) -> Option<Arc<LedgerOffload>> {
        Some(Arc::new(LedgerOffload::Offloaded {
            store: "memory://".into(),
            segments: Vec::new(),
            offloaded_at_ms: at_ms,
            bookie_copies_deleted_at_ms: deleted.then_some(at_ms),
        }))
    }

    fn offload_policy(threshold: Option<u64>, age_ms: Option<u64>, lag_ms: u64) -> EffectiveOffloadPolicy {
        EffectiveOffloadPolicy {
            threshold: threshold.map(ByteSize::b),
            age: age_ms.map(Duration::from_millis),
            deletion_lag: Duration::from_millis(lag_ms),
        }
    }

    #[test]
    fn offload_threshold_counts_back_from_the_newest_ledger() {
        let mut l = ledgers();
        l[3].bytes = 50; // the current ledger counts towards the threshold, is never offloaded
        // 3 + current = 150 <= 150: nothing; 2 takes it to 250.
        let plan = offload_plan(&l, &offload_policy(Some(150), None, 0), None, 0);
        assert_eq!(plan.upload, [1, 2]);
        assert_eq!(plan.upload_bytes, 200);
        assert_eq!(offload_plan(&l, &offload_policy(Some(1000), None, 0), None, 0).upload, Vec::<u64>::new());
        assert_eq!(offload_plan(&l, &offload_policy(Some(0), None, 0), None, 0).upload, [1, 2, 3]);
        assert_eq!(offload_plan(&l, &offload_policy(None, None, 0), None, 0), OffloadPlan::default());
    }

    #[test]
    fn offload_by_age_and_by_request_and_never_twice() {
        let mut l = ledgers();
        // Ledger 1 ended at 1000 ms, 2 at 2000 ms, 3 at 3000 ms.
        assert_eq!(offload_plan(&l, &offload_policy(None, Some(1500), 0), None, 3000).upload, [1]);
        assert_eq!(offload_plan(&l, &offload_policy(None, Some(1500), 0), None, 4600).upload, [1, 2, 3]);
        assert_eq!(offload_plan(&l, &offload_policy(None, None, 0), Some(2), 0).upload, [1, 2]);
        assert_eq!(offload_plan(&l, &offload_policy(None, None, 0), Some(4), 0).upload, [1, 2, 3], "not the current");
        l[0].offload = offloaded(0, false);
        l[1].last_entry = -1; // empty: nothing to offload
        let plan = offload_plan(&l, &offload_policy(Some(0), None, 0), None, 0);
        assert_eq!(plan.upload, [3]);
        // An unfinished claim (uploading) is offloaded again: the claimant stopped or failed.
        l[2].offload = Some(Arc::new(LedgerOffload::Uploading { owner: "x".into(), started_at_ms: 0 }));
        assert_eq!(offload_plan(&l, &offload_policy(Some(0), None, 0), None, 0).upload, [3]);
    }

    #[test]
    fn bookie_copies_go_after_the_deletion_lag_once() {
        let mut l = ledgers();
        l[0].offload = offloaded(1000, false);
        l[1].offload = offloaded(1000, true);
        let lag = offload_policy(None, None, 500);
        assert_eq!(offload_plan(&l, &lag, None, 1499).delete_copies, Vec::<u64>::new());
        assert_eq!(offload_plan(&l, &lag, None, 1500).delete_copies, [1]);
        assert!(l[1].in_object_storage_only() && !l[0].in_object_storage_only());
    }

    fn policy(time_ms: Option<u64>, size: Option<u64>) -> RetentionPolicy {
        RetentionPolicy { time: time_ms.map(Duration::from_millis), size: size.map(ByteSize::b) }
    }

    #[test]
    fn retention_takes_only_acknowledged_closed_ledgers_oldest_first() {
        let l = ledgers();
        let all_acked = Position::new(4, 0);
        let keep_nothing = policy(None, Some(0));
        assert_eq!(retention_candidates(&l, all_acked, &keep_nothing, 10_000), [1, 2, 3], "never the current one");
        assert_eq!(retention_candidates(&l, Position::new(3, 5), &keep_nothing, 10_000), [1, 2], "3 is not acked");
        assert_eq!(retention_candidates(&l, Position::new(1, 9), &keep_nothing, 10_000), Vec::<u64>::new());
        assert_eq!(retention_candidates(&l, all_acked, &policy(None, None), 10_000), Vec::<u64>::new());
    }

    #[test]
    fn retention_time_counts_from_the_next_ledgers_creation() {
        let l = ledgers();
        let acked = Position::new(4, 0);
        // Ledger 1 ended at 1000 ms, 2 at 2000 ms, 3 at 3000 ms.
        let keep_1500ms = policy(Some(1500), None);
        assert_eq!(retention_candidates(&l, acked, &keep_1500ms, 3000), [1]);
        assert_eq!(retention_candidates(&l, acked, &keep_1500ms, 3501), [1, 2]);
        assert_eq!(retention_candidates(&l, acked, &keep_1500ms, 100_000), [1, 2, 3]);
    }

    #[test]
    fn retention_size_counts_back_from_the_newest_acknowledged_ledger() {
        let l = ledgers();
        // 250 bytes keep ledgers 3 and 2 (200 bytes); 1 would make 300.
        assert_eq!(retention_candidates(&l, Position::new(4, 0), &policy(None, Some(250)), 0), [1]);
        // With 3 unacknowledged, the acknowledged ones are 1 and 2: both fit.
        assert_eq!(retention_candidates(&l, Position::new(3, 0), &policy(None, Some(250)), 0), Vec::<u64>::new());
        // Either rule is enough: time takes 1 and 2 although size would keep 2.
        assert_eq!(retention_candidates(&l, Position::new(4, 0), &policy(Some(1500), Some(250)), 3501), [1, 2]);
    }

    #[test]
    fn a_zero_size_policy_is_valid_and_keeps_nothing_acknowledged() {
        let p: super::super::policies::NamespacePolicies =
            serde_json::from_str(r#"{"retention":{"size":"0B"}}"#).expect("parses");
        p.validate(&crate::config::BrokerConfig::default()).expect("valid");
        assert_eq!(retention_candidates(&ledgers(), Position::new(4, 0), &p.retention, 0), [1, 2, 3]);
    }

    #[test]
    fn a_deletion_pass_starts_after_the_ledger_the_last_one_stopped_at() {
        assert_eq!(deletion_order(vec![3, 5, 7], None), [3, 5, 7]);
        assert_eq!(deletion_order(vec![3, 5, 7], Some(3)), [5, 7, 3]);
        assert_eq!(deletion_order(vec![3, 5, 7], Some(7)), [3, 5, 7]);
        // The ledger that failed was deleted since (by another broker): from the start.
        assert_eq!(deletion_order(vec![3, 5, 7], Some(4)), [3, 5, 7]);
        assert_eq!(deletion_order(vec![], Some(4)), Vec::<u64>::new());
    }

    #[test]
    fn a_stored_list_reads_lists_written_before_deleting_existed_and_writes_it_only_when_needed() {
        let old: StoredList = serde_json::from_str(r#"{"ledgers":[1,2]}"#).expect("parses");
        assert_eq!(old, StoredList { ledgers: vec![1, 2], deleting: vec![] });
        assert_eq!(serde_json::to_string(&old).expect("json"), r#"{"ledgers":[1,2]}"#);
        let trimming = StoredList { ledgers: vec![3], deleting: vec![1, 2] };
        let json = serde_json::to_string(&trimming).expect("json");
        assert_eq!(json, r#"{"ledgers":[3],"deleting":[1,2]}"#);
        assert_eq!(serde_json::from_str::<StoredList>(&json).expect("parses"), trimming);
    }
}
