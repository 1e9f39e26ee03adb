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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use magnetar_bookie::client::{LedgerClient, LedgerError, LedgerReader, LedgerWriter};
use magnetar_common::ids::Position;
use magnetar_common::metadata::{MetadataError, PutOptions, SharedStore, Version};
use magnetar_common::topic::TopicName;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::ServiceError;
use super::cache::EntryCache;
use crate::config::ManagedLedgerConfig;

/// Metadata key of a topic's ledger list.
pub fn key(topic: &TopicName) -> String {
    format!("/managed-ledgers/{}", topic.path())
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StoredList {
    ledgers: Vec<u64>,
}

#[derive(Debug, Clone, Copy)]
struct LedgerInfo {
    id: u64,
    /// Last confirmed entry (-1: none yet).
    last_entry: i64,
}

#[derive(Debug)]
struct State {
    ledgers: Vec<LedgerInfo>,
    last_confirmed: Option<Position>,
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
}

impl std::fmt::Debug for AppendCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppendCmd::Append { payload, .. } => write!(f, "Append({} bytes)", payload.len()),
            AppendCmd::Close { .. } => f.write_str("Close"),
            AppendCmd::Abandon => f.write_str("Abandon"),
        }
    }
}

impl ManagedLedger {
    /// Opens (or, with `create`, creates) a topic's managed ledger: recovers ledgers left open,
    /// drops empty ones, and starts a new ledger for appends.
    pub async fn open(
        topic: TopicName,
        client: LedgerClient,
        cache: EntryCache,
        config: ManagedLedgerConfig,
        create: bool,
    ) -> Result<Arc<Self>, ServiceError> {
        let store = client.store().clone();
        let key = key(&topic);
        let (list, version) = match store.get(&key).await? {
            Some(v) => {
                let list: StoredList = serde_json::from_slice(&v.value)
                    .map_err(|e| ServiceError::Internal(format!("ledger list of {topic} is corrupt: {e}")))?;
                (list, Some(v.version))
            }
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
                dropped.push(id);
                continue;
            }
            stored_bytes += md.length;
            ledgers.push(LedgerInfo { id, last_entry: md.last_entry_id });
        }
        let writer = create_ledger(&client, &config, &topic).await?;
        ledgers.push(LedgerInfo { id: writer.ledger_id(), last_entry: -1 });
        let new_list = StoredList { ledgers: ledgers.iter().map(|l| l.id).collect() };
        let version = match write_list(&store, &key, &new_list, version).await {
            Ok(v) => v,
            Err(e) => {
                let _ = client.delete(writer.ledger_id()).await;
                return Err(e);
            }
        };
        for id in dropped {
            if let Err(e) = client.delete(id).await {
                warn!(%topic, ledger_id = id, error = %e, "delete empty ledger");
            }
        }
        let last_confirmed =
            ledgers.iter().rev().find(|l| l.last_entry >= 0).map(|l| Position::new(l.id, l.last_entry as u64));
        let (tx, rx) = mpsc::channel(1024);
        let (confirmed, _) = watch::channel(last_confirmed);
        let ml = Arc::new(ManagedLedger {
            topic: topic.clone(),
            client: client.clone(),
            cache,
            state: Mutex::new(State { ledgers, last_confirmed }),
            readers: Mutex::new(HashMap::new()),
            appends: tx,
            confirmed,
            stored_bytes: stored_bytes.into(),
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
            // Not cached: read the rest of the range from the bookies.
            for entry in self.read_from_bookies(from.ledger_id, e, last).await? {
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
        if let Some(b) = self.cache.get(&pos) {
            return Ok(Some(b));
        }
        let exists = {
            let s = self.lock();
            s.ledgers.iter().any(|l| l.id == pos.ledger_id && pos.entry_id as i64 <= l.last_entry)
        };
        if !exists {
            return Ok(None);
        }
        Ok(self.read_from_bookies(pos.ledger_id, pos.entry_id, pos.entry_id).await?.pop().map(|e| e.payload()))
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
                // The ensemble of an open ledger may have changed since the reader was opened.
                Err(e) if attempt == 0 && !reader.metadata().is_closed() => {
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
        self.lock().ledgers.push(LedgerInfo { id, last_entry: -1 });
    }

    fn forget_reader(&self, ledger_id: u64) {
        self.readers.lock().unwrap_or_else(|p| p.into_inner()).remove(&ledger_id);
    }
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
                                AppendCmd::Abandon => {}
                            }
                        }
                        info!(%topic, ledger_id = self.writer.ledger_id(), "appends abandoned: ownership lost");
                        return;
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

    fn should_roll_over(&self) -> bool {
        self.entries >= self.config.rollover_max_entries
            || self.bytes >= self.config.rollover_max_bytes.as_u64()
            || (self.entries > 0 && self.created.elapsed() >= self.config.rollover_max_age)
    }

    /// Starts a new ledger, lists it, and closes the old one once its appends are done.
    async fn roll_over(&mut self) -> Result<(), ServiceError> {
        let Some(ml) = self.ml.upgrade() else { return Err(ServiceError::Closed(String::new())) };
        let writer = create_ledger(&ml.client, &self.config, &ml.topic).await?;
        let mut ids: Vec<u64> = ml.lock().ledgers.iter().map(|l| l.id).collect();
        ids.push(writer.ledger_id());
        match write_list(&self.store, &self.key, &StoredList { ledgers: ids }, Some(self.version)).await {
            Ok(v) => self.version = v,
            Err(e) => {
                let _ = ml.client.delete(writer.ledger_id()).await;
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
