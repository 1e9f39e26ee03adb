//! A topic: its managed ledger, its subscriptions and its producers, and the periodic
//! application of its namespace's retention and offload policies.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use magnetar_common::batch;
use magnetar_common::ids::Position;
use magnetar_common::metadata::{MetadataError, PutOptions, Version};
use magnetar_common::topic::TopicName;
use magnetar_common::wire::{InitialPosition, SubscriptionType};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tracing::{info, warn};

use super::cursor::{Cursor, StoredCursor};
use super::managed_ledger::{ManagedLedger, Trimmed};
use super::policies::NamespacePolicies;
use super::subscription::{
    ConsumerEvent, ConsumerId, ConsumerSpec, SubCmd, Subscription, SubscriptionStats, cursor_key,
};
use super::{Context, ServiceError};
use crate::metrics::TopicLabel;

/// A topic's counters, shared with its subscriptions.
#[derive(Debug, Default)]
pub struct TopicCounters {
    pub messages_in: Counter,
    pub bytes_in: Counter,
    pub messages_out: Counter,
    pub bytes_out: Counter,
    pub publish_errors: Counter,
    pub retention_deleted_ledgers: Counter,
    pub retention_deleted_bytes: Counter,
}

#[derive(Debug)]
pub(super) struct SubHandle {
    pub(super) tx: mpsc::UnboundedSender<SubCmd>,
    pub(super) stats: Arc<SubscriptionStats>,
    pub(super) durable: bool,
}

#[derive(Debug)]
pub struct Topic {
    name: TopicName,
    ml: Arc<ManagedLedger>,
    ctx: Arc<Context>,
    pub(super) subs: tokio::sync::Mutex<HashMap<String, SubHandle>>,
    pub(super) producers: Mutex<HashSet<String>>,
    pub(super) counters: Arc<TopicCounters>,
    /// Cancelled when the topic is closed or abandoned: its producer streams end.
    unloaded: tokio_util::sync::CancellationToken,
    /// One retention pass at a time (periodic or asked for).
    retention: tokio::sync::Mutex<()>,
    offload: OffloadControl,
}

/// The topic's offloading: one pass at a time, woken by its timer or an admin request.
#[derive(Debug, Default)]
struct OffloadControl {
    wake: tokio::sync::Notify,
    status: Mutex<OffloadStatus>,
}

#[derive(Debug, Default)]
struct OffloadStatus {
    /// An admin request: offload every closed ledger up to this one.
    requested_through: Option<u64>,
    running: bool,
    pending_ledgers: usize,
    pending_bytes: u64,
    last_error: Option<String>,
    failures: u32,
    retry_at: Option<Instant>,
}

/// A topic's offload state as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct OffloadView {
    /// The broker's `[offload]` store (None: offloading is not configured).
    pub store: Option<String>,
    /// `idle`, `running`, `backoff` (waiting to retry after a failure) or `disabled`.
    pub state: &'static str,
    /// Bytes of entries on bookies and in object storage.
    pub bookie_bytes: u64,
    pub offloaded_bytes: u64,
    pub offloaded_ledgers: usize,
    /// Closed ledgers the policy (or a request) wants offloaded that are not yet: the offload lag.
    pub pending_ledgers: usize,
    pub pending_bytes: u64,
    /// An admin request being served: every closed ledger up to this id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_through: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
    /// The latest read of offloaded entries failed with this (consumers wait and retry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_error: Option<String>,
}

/// What a subscriber asks for.
#[derive(Debug, Clone)]
pub struct SubscribeParams {
    pub subscription: String,
    pub subscription_type: SubscriptionType,
    pub initial_position: InitialPosition,
    pub consumer_name: String,
    pub priority: i32,
    pub durable: bool,
    pub start: Option<Position>,
    /// Redeliver what this consumer has not acknowledged this long after delivery (None: never;
    /// at least [`MIN_ACK_TIMEOUT`]).
    pub ack_timeout: Option<Duration>,
}

/// The shortest ack timeout a consumer may ask for: shorter ones would redeliver in a loop
/// whatever the consumer does.
pub const MIN_ACK_TIMEOUT: Duration = Duration::from_secs(1);

impl Topic {
    pub(super) async fn load(
        name: TopicName,
        ctx: Arc<Context>,
        create: bool,
        policies: NamespacePolicies,
    ) -> Result<Arc<Self>, ServiceError> {
        let mut ledger = ctx.config.ledger.clone();
        let q = policies.quorums(&ctx.config);
        (ledger.ensemble_size, ledger.write_quorum, ledger.ack_quorum) =
            (q.ensemble_size, q.write_quorum, q.ack_quorum);
        let ml = ManagedLedger::open(
            name.clone(),
            ctx.ledgers.clone(),
            ctx.cache.clone(),
            ledger,
            create,
            ctx.offloader.clone(),
        )
        .await?;
        let label = TopicLabel { topic: name.to_string() };
        let m = &ctx.metrics;
        let counters = Arc::new(TopicCounters {
            messages_in: m.messages_in.get_or_create(&label).clone(),
            bytes_in: m.bytes_in.get_or_create(&label).clone(),
            messages_out: m.messages_out.get_or_create(&label).clone(),
            bytes_out: m.bytes_out.get_or_create(&label).clone(),
            publish_errors: m.publish_errors.get_or_create(&label).clone(),
            retention_deleted_ledgers: m.retention_deleted_ledgers.get_or_create(&label).clone(),
            retention_deleted_bytes: m.retention_deleted_bytes.get_or_create(&label).clone(),
        });
        let topic = Arc::new(Topic {
            name: name.clone(),
            ml,
            ctx: ctx.clone(),
            subs: tokio::sync::Mutex::new(HashMap::new()),
            producers: Mutex::new(HashSet::new()),
            counters,
            unloaded: tokio_util::sync::CancellationToken::new(),
            retention: tokio::sync::Mutex::new(()),
            offload: OffloadControl::default(),
        });
        // Durable subscriptions come back with their cursors.
        let prefix = format!("{}/", cursor_key(&name.path(), ""));
        let prefix = prefix.trim_end_matches('/').to_string() + "/";
        let stored = ctx.store.list(&prefix).await?;
        let mut subs = topic.subs.lock().await;
        for kv in stored {
            let sub_name = kv.key[prefix.len()..].to_string();
            let cursor: StoredCursor = match serde_json::from_slice(&kv.value) {
                Ok(c) => c,
                Err(e) => {
                    warn!(topic = %name, subscription = %sub_name, error = %e, "stored cursor is corrupt; skipping");
                    continue;
                }
            };
            let handle = topic.start_subscription(
                &sub_name,
                SubscriptionType::Exclusive,
                Cursor::from_stored(&cursor),
                Some(kv.version),
                true,
            );
            subs.insert(sub_name, handle);
        }
        let n = subs.len();
        drop(subs);
        tokio::spawn(retention_task(Arc::downgrade(&topic), ctx.config.ledger.retention_check_interval));
        if ctx.offloader.is_some() {
            tokio::spawn(offload_task(Arc::downgrade(&topic), ctx.config.offload_policy.check_interval));
        }
        info!(topic = %name, subscriptions = n, "topic loaded");
        Ok(topic)
    }

    /// Applies the namespace's retention policy now (read afresh from the metadata store):
    /// deletes the oldest closed ledgers whose every entry all durable subscriptions have
    /// acknowledged and that the policy no longer keeps. With no durable subscription, every
    /// closed ledger counts as acknowledged. Deletions left unfinished by an earlier pass (here or
    /// on a previous owner) are retried, whatever the policy. Runs every
    /// `ledger.retention_check_interval` (at once after a load that left deletions to finish);
    /// the admin API may call it too.
    pub async fn apply_retention(&self) -> Result<Trimmed, ServiceError> {
        let _one_at_a_time = self.retention.lock().await;
        if self.unloaded.is_cancelled() {
            return Err(ServiceError::Closed(self.name.to_string()));
        }
        let policy = self.ctx.policies.for_topic(self.name.tenant(), self.name.namespace()).await?.retention;
        if policy.is_unlimited() {
            return Ok(Trimmed { deleting: self.ml.delete_pending().await, ..Trimmed::default() });
        }
        // Held until the ledgers are off the list, so that no subscription starts in one of them.
        let subs = self.subs.lock().await;
        let slowest = subs
            .values()
            .filter(|h| h.durable)
            .map(|h| h.stats.cursor.lock().unwrap_or_else(|p| p.into_inner()).0)
            .min();
        let mark = slowest.unwrap_or_else(|| self.ml.end_position());
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let trimmed = self.ml.apply_retention(mark, &policy, now_ms, move || drop(subs)).await?;
        if !trimmed.ledgers.is_empty() {
            self.counters.retention_deleted_ledgers.inc_by(trimmed.ledgers.len() as u64);
            self.counters.retention_deleted_bytes.inc_by(trimmed.bytes);
            info!(topic = %self.name, ledgers = ?trimmed.ledgers, bytes = trimmed.bytes, deleting = ?trimmed.deleting, "retention applied");
        }
        Ok(trimmed)
    }

    /// Asks for every closed ledger to be offloaded now (a failed pass is retried at once).
    /// The upload runs in the background: [`Self::offload_view`] follows it.
    pub fn request_offload(&self) -> Result<OffloadView, ServiceError> {
        if self.ctx.offloader.is_none() {
            return Err(ServiceError::BadRequest("this broker has no [offload] object store configured".into()));
        }
        {
            let mut st = self.offload_status();
            if let Some(last) = self.ml.last_closed_ledger() {
                st.requested_through = Some(st.requested_through.map_or(last, |r| r.max(last)));
            }
            st.retry_at = None;
        }
        self.offload.wake.notify_one();
        Ok(self.offload_view())
    }

    fn offload_status(&self) -> std::sync::MutexGuard<'_, OffloadStatus> {
        self.offload.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn offload_view(&self) -> OffloadView {
        let (offloaded_bytes, offloaded_ledgers) = self.ml.offloaded();
        let st = self.offload_status();
        let now = Instant::now();
        let retry_in = st.retry_at.filter(|t| *t > now).map(|t| (t - now).as_millis() as u64);
        let state = match (&self.ctx.offloader, st.running, retry_in) {
            (None, _, _) => "disabled",
            (_, true, _) => "running",
            (_, _, Some(_)) => "backoff",
            _ => "idle",
        };
        OffloadView {
            store: self.ctx.offloader.as_ref().map(|o| o.store().url().to_string()),
            state,
            bookie_bytes: self.ml.bookie_bytes(),
            offloaded_bytes,
            offloaded_ledgers,
            pending_ledgers: st.pending_ledgers,
            pending_bytes: st.pending_bytes,
            requested_through: st.requested_through,
            last_error: st.last_error.clone(),
            retry_in_ms: retry_in,
            read_error: self.ml.offload_read_error(),
        }
    }

    /// One offload pass: uploads what the namespace's policy (or an admin request) asks for,
    /// oldest first, stopping at the first failure (retried after a backoff), then deletes the
    /// bookies' copies of ledgers offloaded longer ago than the deletion lag.
    async fn run_offload(&self) {
        let Some(offloader) = self.ctx.offloader.clone() else { return };
        let policy = match self.ctx.policies.for_topic(self.name.tenant(), self.name.namespace()).await {
            Ok(p) => p.offload_policy(&self.ctx.config),
            Err(e) => {
                warn!(topic = %self.name, error = %e, "offload: read the namespace policy (retrying at the next check)");
                return;
            }
        };
        let requested = self.offload_status().requested_through;
        let plan = self.ml.offload_plan(&policy, requested, now_ms());
        {
            let mut st = self.offload_status();
            st.pending_ledgers = plan.upload.len();
            st.pending_bytes = plan.upload_bytes;
            st.running = !plan.upload.is_empty();
        }
        let label = TopicLabel { topic: self.name.to_string() };
        let backlog = self.ctx.metrics.offload_backlog_bytes.get_or_create(&label).clone();
        backlog.set(plan.upload_bytes as i64);
        let mut failure = None;
        // Up to max_concurrent_uploads ledgers at once (the broker-wide limit still holds),
        // recorded oldest first; the first failure stops the pass (uploads still running are
        // dropped: aborted, and taken over by the next pass).
        let mut uploads = futures::stream::iter(plan.upload.iter().copied())
            .map(|id| {
                let offloader = offloader.clone();
                async move { (id, offloader.offload_ledger(id).await) }
            })
            .buffered(offloader.config().max_concurrent_uploads.max(1));
        while let Some((id, result)) = uploads.next().await {
            match result {
                Ok(state) => {
                    self.ml.set_offload(id, state);
                    let mut st = self.offload_status();
                    st.pending_ledgers = st.pending_ledgers.saturating_sub(1);
                    let left = self.ml.offload_plan(&policy, st.requested_through, now_ms()).upload_bytes;
                    st.pending_bytes = left;
                    backlog.set(left as i64);
                }
                Err(e) => {
                    failure = Some(format!("ledger {id}: {e}"));
                    break;
                }
            }
        }
        let mut copies_failed = None;
        for id in self.ml.offload_plan(&policy, None, now_ms()).delete_copies {
            match offloader.delete_bookie_copies(id).await {
                Ok(state) => self.ml.set_offload(id, state),
                Err(e) => {
                    copies_failed = Some(format!("delete bookie copies of ledger {id}: {e}"));
                    break;
                }
            }
        }
        let mut st = self.offload_status();
        st.running = false;
        match failure.or(copies_failed) {
            None => {
                if requested.is_some() && st.requested_through == requested {
                    st.requested_through = None;
                }
                st.failures = 0;
                st.last_error = None;
                st.retry_at = None;
            }
            Some(e) => {
                offloader.counters.failures.inc();
                st.failures += 1;
                let c = offloader.config();
                let backoff =
                    c.retry_initial_backoff.saturating_mul(1 << (st.failures - 1).min(16)).min(c.retry_max_backoff);
                warn!(topic = %self.name, error = %e, retry_in = ?backoff, "offload failed; data stays on bookies");
                st.last_error = Some(e);
                st.retry_at = Some(Instant::now() + backoff);
            }
        }
    }

    fn start_subscription(
        &self,
        sub: &str,
        sub_type: SubscriptionType,
        cursor: Cursor,
        cursor_version: Option<Version>,
        durable: bool,
    ) -> SubHandle {
        let stats = Arc::new(SubscriptionStats::default());
        *stats.cursor.lock().unwrap_or_else(|p| p.into_inner()) = (cursor.acked_before(), cursor.individually_acked());
        let tx = Subscription {
            name: sub.to_string(),
            topic_path: self.name.path(),
            ml: self.ml.clone(),
            store: self.ctx.store.clone(),
            durable,
            sub_type,
            cursor,
            dispatch: self.ctx.config.dispatch.clone(),
            ledger: self.ctx.config.ledger.clone(),
            stats: stats.clone(),
            counters: self.counters.clone(),
            cursor_version,
            fenced: false,
        }
        .start();
        SubHandle { tx, stats, durable }
    }

    pub fn name(&self) -> &TopicName {
        &self.name
    }

    pub fn managed_ledger(&self) -> &Arc<ManagedLedger> {
        &self.ml
    }

    /// Registers a producer; an empty name gets a generated one.
    pub(super) fn add_producer(self: &Arc<Self>, name: String) -> Result<String, ServiceError> {
        let mut producers = self.producers.lock().unwrap_or_else(|p| p.into_inner());
        if producers.contains(&name) {
            return Err(ServiceError::ProducerBusy(format!("producer {name:?} is already connected to {}", self.name)));
        }
        producers.insert(name.clone());
        Ok(name)
    }

    pub(super) fn remove_producer(&self, name: &str) {
        self.producers.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }

    /// Validates and queues a batch; the returned future resolves when it is durable.
    pub(super) async fn publish(
        self: &Arc<Self>,
        payload: Bytes,
        num_messages: u32,
        permit: OwnedSemaphorePermit,
    ) -> Result<impl Future<Output = Result<Position, ServiceError>> + Send + 'static, ServiceError> {
        let max = self.ctx.config.max_message_bytes.as_u64() as usize;
        if payload.len() > max {
            return Err(ServiceError::MessageTooLarge { size: payload.len(), max });
        }
        let header = batch::read_header(&payload).map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        if header.num_messages != num_messages {
            return Err(ServiceError::BadRequest(format!(
                "Send says {num_messages} messages but its batch holds {}",
                header.num_messages
            )));
        }
        let len = payload.len() as u64;
        let started = Instant::now();
        let done = self.ml.append(payload).await?;
        let topic = self.clone();
        Ok(async move {
            let result = done.await;
            drop(permit);
            match &result {
                Ok(_) => {
                    topic.counters.messages_in.inc_by(u64::from(num_messages));
                    topic.counters.bytes_in.inc_by(len);
                    topic.ctx.metrics.publish_latency.observe(started.elapsed().as_secs_f64());
                }
                Err(_) => {
                    topic.counters.publish_errors.inc();
                }
            }
            result
        })
    }

    /// Attaches a consumer, creating the subscription if needed.
    pub(super) async fn subscribe(
        self: &Arc<Self>,
        p: SubscribeParams,
    ) -> Result<(ConsumerHandle, mpsc::UnboundedReceiver<ConsumerEvent>), ServiceError> {
        if let Some(t) = p.ack_timeout
            && t < MIN_ACK_TIMEOUT
        {
            return Err(ServiceError::BadRequest(format!(
                "ack_timeout_ms is {}; it must be 0 (off) or at least {}",
                t.as_millis(),
                MIN_ACK_TIMEOUT.as_millis()
            )));
        }
        let mut subs = self.subs.lock().await;
        self.ensure_subscription(&mut subs, &p).await?;
        let handle = subs.get(&p.subscription).ok_or_else(|| ServiceError::Internal("subscription vanished".into()))?;
        let (reply, rx) = oneshot::channel();
        let spec = ConsumerSpec {
            name: p.consumer_name.clone(),
            priority: p.priority,
            subscription_type: p.subscription_type,
            ack_timeout: p.ack_timeout,
        };
        handle.tx.send(SubCmd::Attach { spec, reply }).map_err(|_| ServiceError::Closed(self.name.to_string()))?;
        let tx = handle.tx.clone();
        let durable = handle.durable;
        drop(subs);
        let (id, events) = rx.await.map_err(|_| ServiceError::Closed(self.name.to_string()))??;
        Ok((
            ConsumerHandle {
                topic: self.clone(),
                subscription: p.subscription,
                subscription_type: p.subscription_type,
                durable,
                id,
                tx,
            },
            events,
        ))
    }

    /// Starts the subscription `p` names unless it runs: from its stored cursor if it is durable
    /// and stored, else at `p`'s start (and, durable, stores that cursor at once).
    pub(super) async fn ensure_subscription(
        &self,
        subs: &mut HashMap<String, SubHandle>,
        p: &SubscribeParams,
    ) -> Result<(), ServiceError> {
        if let Some(existing) = subs.get(&p.subscription)
            && existing.tx.is_closed()
        {
            subs.remove(&p.subscription);
        }
        if subs.contains_key(&p.subscription) {
            return Ok(());
        }

        let key = cursor_key(&self.name.path(), &p.subscription);
        // A durable subscription that exists in the store (its task ended, or another
        // broker created it) continues from its stored cursor.
        let stored = match p.durable {
            true => self.ctx.store.get(&key).await?,
            false => None,
        };
        let mut cursor_version = stored.as_ref().map(|v| v.version);
        let stored = stored.and_then(|v| serde_json::from_slice::<StoredCursor>(&v.value).ok());
        let start = match (p.start, p.initial_position) {
            (Some(pos), _) => pos,
            (None, InitialPosition::Earliest) => self.ml.first_position(),
            (None, InitialPosition::Latest) => self.ml.end_position(),
        };
        let cursor = stored.as_ref().map_or_else(|| Cursor::new(start), Cursor::from_stored);
        if p.durable && stored.is_none() {
            // The subscription exists (and "latest" is fixed) from now on, even after a crash.
            let stored = cursor.to_stored(0);
            let value = serde_json::to_vec(&stored).map_err(|e| ServiceError::Internal(e.to_string()))?;
            let put = match cursor_version {
                Some(v) => PutOptions::version(v),
                None => PutOptions::absent(),
            };
            cursor_version = Some(self.ctx.store.put(&key, Bytes::from(value), put).await.map_err(|e| match e {
                MetadataError::Conflict { .. } => ServiceError::NotOwner { topic: self.name.to_string(), owner: None },
                e => e.into(),
            })?);
        }
        let handle = self.start_subscription(&p.subscription, p.subscription_type, cursor, cursor_version, p.durable);
        subs.insert(p.subscription.clone(), handle);
        Ok(())
    }

    /// Each subscription with its cursor stats.
    pub fn subscription_stats(&self) -> Vec<(String, Arc<SubscriptionStats>)> {
        match self.subs.try_lock() {
            Ok(subs) => subs.iter().map(|(n, h)| (n.clone(), h.stats.clone())).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Unacknowledged entries of a subscription.
    pub fn backlog(&self, stats: &SubscriptionStats) -> u64 {
        let (acked_before, individually) = *stats.cursor.lock().unwrap_or_else(|p| p.into_inner());
        self.ml.entries_from(acked_before).saturating_sub(individually as u64)
    }

    /// Persists every cursor and closes the ledger (clean shutdown or unload).
    pub(super) async fn close(&self) {
        self.unloaded.cancel();
        let subs: Vec<mpsc::UnboundedSender<SubCmd>> = self.subs.lock().await.drain().map(|(_, h)| h.tx).collect();
        for tx in subs {
            let (reply, rx) = oneshot::channel();
            if tx.send(SubCmd::Close { persist: true, reply }).is_ok() {
                let _ = rx.await;
            }
        }
        self.ml.close().await;
    }

    /// Stops serving at once, writing nothing (ownership lost): publishes in flight fail with
    /// NotOwner, consumers are detached, cursors and the ledger are left for the next owner, who
    /// continues from the last persisted cursors and fences and recovers the ledger.
    pub(super) async fn abandon(&self) {
        self.unloaded.cancel();
        let subs: Vec<mpsc::UnboundedSender<SubCmd>> = self.subs.lock().await.drain().map(|(_, h)| h.tx).collect();
        for tx in subs {
            let (reply, _rx) = oneshot::channel();
            let _ = tx.send(SubCmd::Close { persist: false, reply });
        }
        self.ml.abandon();
    }

    /// Ends a non-durable subscription (a reader's) once its consumer left.
    async fn drop_non_durable(&self, name: &str) {
        let mut subs = self.subs.lock().await;
        if subs.get(name).is_some_and(|h| !h.durable)
            && let Some(h) = subs.remove(name)
        {
            let (reply, _rx) = oneshot::channel();
            let _ = h.tx.send(SubCmd::Close { persist: true, reply });
        }
    }
}

/// Applies retention every `every` until the topic is unloaded or dropped, the first time at once
/// when the topic has deletions to finish. A pass that has begun runs to its end (what it leaves
/// unfinished is recorded in the ledger list and retried by the next).
async fn retention_task(topic: std::sync::Weak<Topic>, every: Duration) {
    let Some((unloaded, pending)) = topic.upgrade().map(|t| (t.unloaded.clone(), !t.ml.deleting().is_empty())) else {
        return;
    };
    let first = if pending { tokio::time::Instant::now() } else { tokio::time::Instant::now() + every };
    let mut tick = tokio::time::interval_at(first, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = unloaded.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(t) = topic.upgrade() else { return };
        if let Err(e) = t.apply_retention().await {
            warn!(topic = %t.name, error = %e, "apply retention (retrying at the next check)");
        }
    }
}

/// Runs the topic's offload passes: every `every`, when an admin request wakes it, and after a
/// failure once its backoff ends. A pass in progress is dropped when the topic unloads: the
/// upload is aborted (nothing becomes visible) and the ledger's next owner takes it over.
async fn offload_task(topic: std::sync::Weak<Topic>, every: Duration) {
    let Some(unloaded) = topic.upgrade().map(|t| t.unloaded.clone()) else { return };
    let mut next = tokio::time::Instant::now() + every;
    loop {
        let Some(t) = topic.upgrade() else { return };
        // After a failure the next pass waits for the end of the backoff instead.
        let at = t.offload_status().retry_at.map_or(next, tokio::time::Instant::from_std);
        tokio::select! {
            _ = unloaded.cancelled() => return,
            _ = t.offload.wake.notified() => {}
            _ = tokio::time::sleep_until(at) => {}
        }
        next = tokio::time::Instant::now() + every;
        tokio::select! {
            _ = unloaded.cancelled() => return,
            _ = t.run_offload() => {}
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A producer attached to a topic. Dropping it frees its name.
#[derive(Debug)]
pub struct ProducerHandle {
    pub(super) topic: Arc<Topic>,
    pub(super) name: String,
}

impl ProducerHandle {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn topic(&self) -> &TopicName {
        &self.topic.name
    }
    pub fn max_message_bytes(&self) -> u32 {
        self.topic.ctx.config.max_message_bytes.as_u64() as u32
    }

    /// Resolves when the topic is unloaded from this broker (the producer must reconnect).
    pub fn unloaded(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.topic.unloaded.clone().cancelled_owned()
    }

    /// Waits for room in the broker's publish memory, validates and queues the batch, and
    /// returns the future of its durable position. Queue order is storage order.
    pub async fn publish(
        &self,
        payload: Bytes,
        num_messages: u32,
    ) -> Result<impl Future<Output = Result<Position, ServiceError>> + Send + 'static, ServiceError> {
        let max = self.max_message_bytes() as usize;
        if payload.len() > max {
            return Err(ServiceError::MessageTooLarge { size: payload.len(), max });
        }
        let permit = self.topic.ctx.reserve_publish_memory(payload.len()).await?;
        self.topic.publish(payload, num_messages, permit).await
    }
}

impl Drop for ProducerHandle {
    fn drop(&mut self) {
        self.topic.remove_producer(&self.name);
    }
}

/// A consumer attached to a subscription. Call [`ConsumerHandle::close`] when its client goes
/// away: what it had not acknowledged is redelivered to the others.
#[derive(Debug)]
pub struct ConsumerHandle {
    topic: Arc<Topic>,
    subscription: String,
    subscription_type: SubscriptionType,
    durable: bool,
    id: ConsumerId,
    tx: mpsc::UnboundedSender<SubCmd>,
}

impl ConsumerHandle {
    pub fn topic(&self) -> &TopicName {
        &self.topic.name
    }

    pub fn flow(&self, permits: u32) {
        let _ = self.tx.send(SubCmd::Flow { id: self.id, permits });
    }

    /// Acknowledges entries; cumulative acknowledgement is refused on shared subscriptions.
    pub fn ack(&self, positions: Vec<Position>, cumulative: bool) -> Result<(), ServiceError> {
        if cumulative && matches!(self.subscription_type, SubscriptionType::Shared | SubscriptionType::KeyShared) {
            return Err(ServiceError::BadRequest(format!(
                "cumulative acknowledgement is not allowed on {} subscription {}",
                self.subscription_type, self.subscription
            )));
        }
        let _ = self.tx.send(SubCmd::Ack { positions, cumulative });
        Ok(())
    }

    /// Asks for redelivery of these unacknowledged entries (all of this consumer's when empty).
    pub fn redeliver(&self, positions: Vec<Position>) {
        let _ = self.tx.send(SubCmd::Redeliver { id: self.id, positions });
    }

    /// Detaches the consumer.
    pub async fn close(self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(SubCmd::Detach { id: self.id, reply }).is_ok() {
            let remaining = rx.await.unwrap_or(0);
            if remaining == 0 && !self.durable {
                self.topic.drop_non_durable(&self.subscription).await;
            }
        }
    }
}
