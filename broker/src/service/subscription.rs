//! A subscription: its cursor, its consumers, and the dispatcher that hands entries to them.
//!
//! One task per subscription owns all of its state, so acknowledgements, flow permits,
//! redeliveries and new entries are applied in one order without locks. Delivery rules:
//! - exclusive: one consumer; failover: the consumer with the lowest (priority, name) is active,
//!   the others stand by and take over, in that order, when it leaves;
//! - shared: round robin over consumers that have permits;
//! - key_shared: each batch key maps to one consumer through a consistent-hash ring; a consumer
//!   that joins receives entries of its keys read after it joined only once everything before
//!   its join is acknowledged, so per-key order holds while keys move.
//!
//! Entries that cannot go out now (no permits, or held for ordering) wait in the replay set,
//! which is served first and in position order. Redeliveries (negative acks, disconnects, ack
//! timeouts) go there too, with their redelivery count raised. Permits count messages; a batch of
//! n uses n.
//!
//! Ack timeout: an entry delivered to a consumer that has one gets a deadline, kept in a set
//! ordered by deadline; one timer wakes the task for the earliest. An acknowledgement or a
//! redelivery removes the deadline. Deadlines are bounded like the pending entries: by permits.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use magnetar_common::batch;
use magnetar_common::ids::Position;
use magnetar_common::metadata::{MetadataError, PutOptions, SharedStore, Version};
use magnetar_common::wire::SubscriptionType;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::ServiceError;
use super::cursor::{Cursor, StoredCursor};
use super::managed_ledger::ManagedLedger;
use super::topic::TopicCounters;
use crate::config::{DispatchConfig, ManagedLedgerConfig};

pub type ConsumerId = u64;

/// What a consumer's front-end receives.
#[derive(Debug)]
pub enum ConsumerEvent {
    Message { position: Position, redelivery_count: u32, payload: Bytes },
    ActiveChange { active: bool },
}

/// A consumer asking to attach.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub name: String,
    pub priority: i32,
    pub subscription_type: SubscriptionType,
    /// Entries this consumer has not acknowledged this long after their delivery are redelivered
    /// (None: never).
    pub ack_timeout: Option<Duration>,
}

#[derive(Debug)]
pub(super) enum SubCmd {
    Attach {
        spec: ConsumerSpec,
        reply: oneshot::Sender<Result<(ConsumerId, mpsc::UnboundedReceiver<ConsumerEvent>), ServiceError>>,
    },
    Detach {
        id: ConsumerId,
        reply: oneshot::Sender<usize>,
    },
    Flow {
        id: ConsumerId,
        permits: u32,
    },
    Ack {
        positions: Vec<Position>,
        cumulative: bool,
    },
    Redeliver {
        id: ConsumerId,
        positions: Vec<Position>,
    },
    /// Ends the subscription's task; `persist`: write the cursor first (a clean unload). An
    /// abrupt close (ownership lost) writes nothing: the next owner continues from the cursor
    /// last persisted.
    Close {
        persist: bool,
        reply: oneshot::Sender<()>,
    },
    /// Moves the cursor (admin reset or skip): everything before `position` counts as
    /// acknowledged, nothing after it; consumers are detached (they reconnect and read from
    /// there). Answered once the new cursor is persisted.
    Reset {
        position: Position,
        reply: oneshot::Sender<()>,
    },
}

/// What the metrics endpoint reads about a subscription.
#[derive(Debug, Default)]
pub struct SubscriptionStats {
    /// (mark-delete position plus one, individually acknowledged entries beyond it).
    pub cursor: Mutex<(Position, usize)>,
    pub consumers: std::sync::atomic::AtomicUsize,
}

/// Metadata key of a durable subscription's cursor.
pub fn cursor_key(topic_path: &str, subscription: &str) -> String {
    format!("/cursors/{topic_path}/{subscription}")
}

struct ConsumerState {
    spec: ConsumerSpec,
    permits: i64,
    tx: mpsc::UnboundedSender<ConsumerEvent>,
    /// key_shared: entries from here on wait until everything before it is acknowledged.
    join_pos: Option<Position>,
}

pub(super) struct Subscription {
    pub name: String,
    pub topic_path: String,
    pub ml: Arc<ManagedLedger>,
    pub store: SharedStore,
    pub durable: bool,
    pub sub_type: SubscriptionType,
    pub cursor: Cursor,
    pub dispatch: DispatchConfig,
    pub ledger: ManagedLedgerConfig,
    pub stats: Arc<SubscriptionStats>,
    pub counters: Arc<TopicCounters>,
    /// Version of the stored cursor (None: not stored yet). Cursors are written by
    /// compare-and-swap on it, so a broker that lost the topic cannot overwrite its new owner's.
    pub cursor_version: Option<Version>,
    /// Set once a write found another version: this broker no longer owns the topic.
    pub fenced: bool,
}

struct Actor {
    s: Subscription,
    dirty: bool,
    read_pos: Position,
    replay: BTreeSet<Position>,
    pending: BTreeMap<Position, ConsumerId>,
    /// Ack timeout: deadlines of pending entries (earliest first) and each such entry's deadline.
    deadlines: BTreeSet<(Instant, Position)>,
    deadline_of: HashMap<Position, Instant>,
    /// key_shared: entries out with a consumer per key hash, and each pending entry's hash.
    pending_keys: HashMap<u32, (ConsumerId, u32)>,
    pending_hash: HashMap<Position, u32>,
    redeliveries: HashMap<Position, u32>,
    consumers: BTreeMap<ConsumerId, ConsumerState>,
    next_id: ConsumerId,
    rr: ConsumerId,
    active: Option<ConsumerId>,
    ring: BTreeMap<u32, ConsumerId>,
    /// Admin resets answered once the cursor is persisted.
    persist_waiters: Vec<oneshot::Sender<()>>,
}

impl Subscription {
    /// Starts the subscription's task.
    pub fn start(self) -> mpsc::UnboundedSender<SubCmd> {
        let (tx, rx) = mpsc::unbounded_channel();
        let read_pos = self.cursor.acked_before();
        let actor = Actor {
            s: self,
            dirty: false,
            read_pos,
            replay: BTreeSet::new(),
            pending: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            deadline_of: HashMap::new(),
            pending_keys: HashMap::new(),
            pending_hash: HashMap::new(),
            redeliveries: HashMap::new(),
            consumers: BTreeMap::new(),
            next_id: 1,
            rr: 0,
            active: None,
            ring: BTreeMap::new(),
            persist_waiters: Vec::new(),
        };
        tokio::spawn(actor.run(rx));
        tx
    }

    /// Persists the cursor by compare-and-swap on the version last written or read. A conflict
    /// means another broker owns the topic now: the subscription stops writing for good.
    pub async fn persist(&mut self) -> Result<(), ServiceError> {
        if !self.durable || self.fenced {
            return Ok(());
        }
        let stored: StoredCursor = self.cursor.to_stored(self.ledger.cursor_max_persisted_ranges);
        let value = serde_json::to_vec(&stored).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let options = match self.cursor_version {
            Some(v) => PutOptions::version(v),
            None => PutOptions::absent(),
        };
        match self.store.put(&cursor_key(&self.topic_path, &self.name), Bytes::from(value), options).await {
            Ok(v) => {
                self.cursor_version = Some(v);
                Ok(())
            }
            Err(MetadataError::Conflict { .. }) => {
                self.fenced = true;
                Err(ServiceError::NotOwner { topic: self.topic_path.clone(), owner: None })
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// First and longest delay before a failed read is tried again with nothing else happening.
const MIN_READ_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_READ_RETRY_DELAY: Duration = Duration::from_secs(2);

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<SubCmd>) {
        let mut confirmed = self.s.ml.subscribe_confirmed();
        let mut persist = tokio::time::interval(self.s.ledger.cursor_persist_interval);
        persist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One timer for the earliest ack-timeout deadline, reset when that changes.
        let ack_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(ack_timer);
        let mut armed: Option<Instant> = None;
        // After a failed read (bookies or object storage unavailable), dispatch again at this
        // time even if nothing else happens; the delay doubles up to MAX_READ_RETRY_DELAY.
        let mut retry: Option<(tokio::time::Instant, Duration)> = None;
        loop {
            let earliest = self.deadlines.first().map(|(t, _)| *t);
            if earliest != armed {
                if let Some(t) = earliest {
                    ack_timer.as_mut().reset(t);
                }
                armed = earliest;
            }
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    if let SubCmd::Close { persist, reply } = cmd {
                        if persist {
                            self.persist_now().await;
                        }
                        let _ = reply.send(());
                        return;
                    }
                    self.handle(cmd);
                    // Apply every queued command before dispatching (acks in bulk are cheap).
                    while let Ok(cmd) = rx.try_recv() {
                        if let SubCmd::Close { persist, reply } = cmd {
                            if persist {
                                self.persist_now().await;
                            }
                            let _ = reply.send(());
                            return;
                        }
                        self.handle(cmd);
                    }
                }
                changed = confirmed.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = persist.tick() => {
                    if self.dirty {
                        self.persist_now().await;
                    }
                    continue;
                }
                () = &mut ack_timer, if armed.is_some() => {
                    armed = None;
                    self.expire_ack_timeouts(Instant::now());
                }
                () = tokio::time::sleep_until(retry.map_or_else(tokio::time::Instant::now, |r| r.0)), if retry.is_some() => {}
            }
            if !self.persist_waiters.is_empty() {
                self.persist_now().await;
                for w in self.persist_waiters.drain(..) {
                    let _ = w.send(());
                }
            }
            self.publish_stats();
            match self.dispatch().await {
                Ok(()) => retry = None,
                Err(e) => {
                    // Storage trouble: try again on the next event, or after a delay.
                    let delay = retry.map_or(MIN_READ_RETRY_DELAY, |r| (r.1 * 2).min(MAX_READ_RETRY_DELAY));
                    warn!(topic = %self.s.topic_path, subscription = %self.s.name, error = %e, retry_in = ?delay, "dispatch");
                    retry = Some((tokio::time::Instant::now() + delay, delay));
                }
            }
        }
        self.persist_now().await;
    }

    async fn persist_now(&mut self) {
        match self.s.persist().await {
            Ok(()) => self.dirty = false,
            Err(e) => warn!(topic = %self.s.topic_path, subscription = %self.s.name, error = %e, "persist cursor"),
        }
    }

    fn publish_stats(&self) {
        *self.s.stats.cursor.lock().unwrap_or_else(|p| p.into_inner()) =
            (self.s.cursor.acked_before(), self.s.cursor.individually_acked());
        self.s.stats.consumers.store(self.consumers.len(), std::sync::atomic::Ordering::Relaxed);
    }

    fn handle(&mut self, cmd: SubCmd) {
        match cmd {
            SubCmd::Attach { spec, reply } => {
                let _ = reply.send(self.attach(spec));
            }
            SubCmd::Detach { id, reply } => {
                self.detach(id);
                let _ = reply.send(self.consumers.len());
            }
            SubCmd::Flow { id, permits } => {
                if let Some(c) = self.consumers.get_mut(&id) {
                    c.permits = (c.permits + i64::from(permits)).min(i64::from(self.s.dispatch.max_consumer_permits));
                }
            }
            SubCmd::Ack { positions, cumulative } => self.ack(positions, cumulative),
            SubCmd::Redeliver { id, positions } => {
                let mine: Vec<Position> = if positions.is_empty() {
                    self.pending.iter().filter(|(_, c)| **c == id).map(|(p, _)| *p).collect()
                } else {
                    positions.into_iter().filter(|p| self.pending.get(p) == Some(&id)).collect()
                };
                self.requeue(mine);
            }
            SubCmd::Close { .. } => {}
            SubCmd::Reset { position, reply } => {
                self.reset(position);
                self.persist_waiters.push(reply);
            }
        }
    }

    fn attach(
        &mut self,
        spec: ConsumerSpec,
    ) -> Result<(ConsumerId, mpsc::UnboundedReceiver<ConsumerEvent>), ServiceError> {
        if !self.consumers.is_empty() && spec.subscription_type != self.s.sub_type {
            return Err(ServiceError::ConsumerBusy(format!(
                "subscription {} is {} with consumers attached; a {} consumer cannot join",
                self.s.name, self.s.sub_type, spec.subscription_type
            )));
        }
        if spec.subscription_type == SubscriptionType::Exclusive && !self.consumers.is_empty() {
            return Err(ServiceError::ConsumerBusy(format!(
                "exclusive subscription {} already has a consumer",
                self.s.name
            )));
        }
        self.s.sub_type = spec.subscription_type;
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let join_pos = (self.s.sub_type == SubscriptionType::KeyShared
            && !self.consumers.is_empty()
            && self.s.cursor.acked_before() < self.read_pos)
            .then_some(self.read_pos);
        debug!(topic = %self.s.topic_path, subscription = %self.s.name, consumer = %spec.name, id, "consumer attached");
        self.consumers.insert(id, ConsumerState { spec, permits: 0, tx, join_pos });
        self.membership_changed();
        Ok((id, rx))
    }

    /// Starts over at `position`: a fresh cursor, nothing pending or held back, no consumers
    /// (dropping their event senders ends their streams; they attach again).
    fn reset(&mut self, position: Position) {
        self.s.cursor = Cursor::new(position);
        self.read_pos = position;
        self.replay.clear();
        self.pending.clear();
        self.deadlines.clear();
        self.deadline_of.clear();
        self.pending_keys.clear();
        self.pending_hash.clear();
        self.redeliveries.clear();
        self.consumers.clear();
        self.active = None;
        self.ring.clear();
        self.dirty = true;
    }

    fn detach(&mut self, id: ConsumerId) {
        if self.consumers.remove(&id).is_none() {
            return;
        }
        let theirs: Vec<Position> = self.pending.iter().filter(|(_, c)| **c == id).map(|(p, _)| *p).collect();
        self.requeue(theirs);
        self.membership_changed();
    }

    /// Puts delivered entries back for redelivery, counting the redelivery.
    fn requeue(&mut self, positions: Vec<Position>) {
        self.release_keys(positions.clone());
        for p in positions {
            if self.unpend(p).is_some() {
                *self.redeliveries.entry(p).or_insert(0) += 1;
                self.replay.insert(p);
            }
        }
    }

    /// Takes an entry off its consumer's pending set (and its ack-timeout deadline).
    fn unpend(&mut self, p: Position) -> Option<ConsumerId> {
        if let Some(t) = self.deadline_of.remove(&p) {
            self.deadlines.remove(&(t, p));
        }
        self.pending.remove(&p)
    }

    /// Redelivers every entry whose ack-timeout deadline is at or before `now`, like a negative
    /// acknowledgement: to its consumer again or to another, as the subscription type allows.
    fn expire_ack_timeouts(&mut self, now: Instant) {
        let mut expired = Vec::new();
        while let Some(&(t, p)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            self.deadline_of.remove(&p);
            expired.push(p);
        }
        if !expired.is_empty() {
            debug!(topic = %self.s.topic_path, subscription = %self.s.name, entries = expired.len(), "ack timeout: redelivering");
            self.requeue(expired);
        }
    }

    /// key_shared: these entries are no longer out with a consumer.
    fn release_keys(&mut self, positions: Vec<Position>) {
        for p in positions {
            if let Some(hash) = self.pending_hash.remove(&p)
                && let Some((_, n)) = self.pending_keys.get_mut(&hash)
            {
                *n -= 1;
                if *n == 0 {
                    self.pending_keys.remove(&hash);
                }
            }
        }
    }

    fn membership_changed(&mut self) {
        match self.s.sub_type {
            SubscriptionType::Exclusive | SubscriptionType::Failover => {
                let best = self
                    .consumers
                    .iter()
                    .min_by(|a, b| {
                        (a.1.spec.priority, &a.1.spec.name, a.0).cmp(&(b.1.spec.priority, &b.1.spec.name, b.0))
                    })
                    .map(|(id, _)| *id);
                if best != self.active {
                    // The previous active consumer's unacknowledged entries go to the new one.
                    if let Some(old) = self.active {
                        let theirs: Vec<Position> =
                            self.pending.iter().filter(|(_, c)| **c == old).map(|(p, _)| *p).collect();
                        for p in theirs {
                            self.unpend(p);
                            self.replay.insert(p);
                        }
                    }
                    self.active = best;
                }
                if self.s.sub_type == SubscriptionType::Failover {
                    for (id, c) in &self.consumers {
                        let _ = c.tx.send(ConsumerEvent::ActiveChange { active: Some(*id) == self.active });
                    }
                }
            }
            SubscriptionType::KeyShared => {
                self.ring.clear();
                for (id, c) in &self.consumers {
                    for i in 0..RING_POINTS_PER_CONSUMER {
                        let point = crc32c::crc32c(format!("{}#{id}#{i}", c.spec.name).as_bytes());
                        self.ring.insert(point, *id);
                    }
                }
            }
            SubscriptionType::Shared => {}
        }
    }

    fn ack(&mut self, positions: Vec<Position>, cumulative: bool) {
        let ml = self.s.ml.clone();
        let normalize = |p| ml.normalize(p);
        for p in positions {
            // Only entries that exist and were read for this subscription can be acknowledged: a
            // made-up position must not move the cursor past messages nobody received.
            if p >= self.read_pos || ml.normalize(p) != p {
                debug!(topic = %self.s.topic_path, subscription = %self.s.name, position = %p, "ignoring an ack of an entry not delivered");
                continue;
            }
            if cumulative {
                self.s.cursor.ack_cumulative(p, normalize);
                let after = Position::new(p.ledger_id, p.entry_id.saturating_add(1));
                let done: Vec<Position> = self.pending.range(..after).map(|(q, _)| *q).collect();
                self.release_keys(done.clone());
                for q in done {
                    self.unpend(q);
                }
                self.replay = self.replay.split_off(&after);
                self.redeliveries.retain(|q, _| *q >= after);
            } else {
                self.s.cursor.ack(p, normalize);
                self.release_keys(vec![p]);
                self.unpend(p);
                self.replay.remove(&p);
                self.redeliveries.remove(&p);
            }
        }
        self.dirty = true;
        let mark = self.s.cursor.acked_before();
        for c in self.consumers.values_mut() {
            if c.join_pos.is_some_and(|j| mark >= j) {
                c.join_pos = None;
            }
        }
    }

    fn has_permits(&self) -> bool {
        match self.s.sub_type {
            SubscriptionType::Exclusive | SubscriptionType::Failover => {
                self.active.and_then(|a| self.consumers.get(&a)).is_some_and(|c| c.permits > 0)
            }
            _ => self.consumers.values().any(|c| c.permits > 0),
        }
    }

    /// Sends what can be sent now: redeliveries first, then new entries.
    async fn dispatch(&mut self) -> Result<(), ServiceError> {
        loop {
            if !self.has_permits() {
                return Ok(());
            }
            let mut blocked = HashSet::new();
            let mut progressed = false;
            if !self.replay.is_empty() {
                progressed |= self.dispatch_replay(&mut blocked).await?;
            }
            if !self.has_permits() {
                return Ok(());
            }
            let end = self.s.ml.end_position();
            let room = self.replay.len() < self.s.dispatch.max_replay_entries;
            if self.read_pos < end
                && room
                && (self.replay.is_empty()
                    || self.s.sub_type != SubscriptionType::Exclusive && self.s.sub_type != SubscriptionType::Failover)
            {
                let n = self.s.dispatch.read_batch_entries.min(self.total_permits().max(1) as usize);
                let entries =
                    self.s.ml.read(self.read_pos, n, self.s.dispatch.read_batch_bytes.as_u64() as usize).await?;
                match entries.last() {
                    Some((p, _)) => {
                        self.read_pos = Position::new(p.ledger_id, p.entry_id + 1);
                        // The read position moved (even if every entry read was acknowledged
                        // already): go round again.
                        progressed = true;
                    }
                    None => {
                        // Nothing stored at the read position: move it over ledger boundaries.
                        let next = self.s.ml.normalize(self.read_pos);
                        if next == self.read_pos {
                            return Ok(());
                        }
                        self.read_pos = next;
                        continue;
                    }
                }
                for (p, payload) in entries {
                    if self.s.cursor.is_acked(p) {
                        continue;
                    }
                    if !self.deliver(p, payload, &mut blocked) {
                        self.replay.insert(p);
                    } else {
                        progressed = true;
                    }
                }
            }
            if !progressed {
                return Ok(());
            }
        }
    }

    fn total_permits(&self) -> i64 {
        self.consumers.values().map(|c| c.permits.max(0)).sum()
    }

    async fn dispatch_replay(&mut self, blocked: &mut HashSet<ConsumerId>) -> Result<bool, ServiceError> {
        let mut progressed = false;
        let batch: Vec<Position> = self.replay.iter().take(self.s.dispatch.read_batch_entries).copied().collect();
        let mut i = 0;
        while i < batch.len() {
            // A run of consecutive entries of one ledger is one read.
            let start = batch[i];
            let mut j = i + 1;
            while j < batch.len()
                && batch[j].ledger_id == start.ledger_id
                && batch[j].entry_id == batch[j - 1].entry_id + 1
            {
                j += 1;
            }
            let entries = self.s.ml.read(start, j - i, self.s.dispatch.read_batch_bytes.as_u64() as usize).await?;
            let got: HashMap<Position, Bytes> = entries.into_iter().collect();
            for p in &batch[i..j] {
                if self.s.cursor.is_acked(*p) {
                    self.replay.remove(p);
                    continue;
                }
                let Some(payload) = got.get(p) else {
                    if self.s.ml.read_entry(*p).await?.is_none() {
                        // Gone from storage (should not happen while unacknowledged).
                        warn!(topic = %self.s.topic_path, position = %p, "entry to redeliver no longer exists");
                        self.replay.remove(p);
                    }
                    continue;
                };
                if self.deliver(*p, payload.clone(), blocked) {
                    self.replay.remove(p);
                    progressed = true;
                }
            }
            i = j;
        }
        Ok(progressed)
    }

    /// Chooses the consumer for an entry and sends it; false if it must wait.
    fn deliver(&mut self, p: Position, payload: Bytes, blocked: &mut HashSet<ConsumerId>) -> bool {
        let header = batch::read_header(&payload).ok();
        let num_messages = header.as_ref().map_or(1, |h| i64::from(h.num_messages));
        let key_hash = match self.s.sub_type {
            SubscriptionType::KeyShared => header.as_ref().and_then(|h| h.key.as_ref()).map(|k| crc32c::crc32c(k)),
            _ => None,
        };
        let target = match (self.s.sub_type, key_hash) {
            (SubscriptionType::Exclusive | SubscriptionType::Failover, _) => self.active,
            (SubscriptionType::KeyShared, Some(hash)) => self.ring_lookup(hash),
            _ => self.next_round_robin(),
        };
        let Some(target) = target else { return false };
        if blocked.contains(&target) {
            return false;
        }
        // A key whose earlier entries are still out with another consumer (the key moved when
        // consumers came or went) waits until they are acknowledged or redelivered.
        if let Some(hash) = key_hash
            && self.pending_keys.get(&hash).is_some_and(|(owner, _)| *owner != target)
        {
            return false;
        }
        let Some(c) = self.consumers.get_mut(&target) else { return false };
        let held = c.join_pos.is_some_and(|j| p >= j);
        if c.permits <= 0 || held {
            blocked.insert(target);
            return false;
        }
        let redelivery_count = self.redeliveries.get(&p).copied().unwrap_or(0);
        let len = payload.len();
        if c.tx.send(ConsumerEvent::Message { position: p, redelivery_count, payload }).is_err() {
            // The consumer's front-end is gone; its detach is on the way.
            blocked.insert(target);
            return false;
        }
        c.permits -= num_messages;
        if let Some(timeout) = c.spec.ack_timeout {
            let deadline = Instant::now() + timeout;
            self.deadlines.insert((deadline, p));
            if let Some(old) = self.deadline_of.insert(p, deadline) {
                self.deadlines.remove(&(old, p));
            }
        }
        self.pending.insert(p, target);
        if let Some(hash) = key_hash {
            self.pending_keys.entry(hash).or_insert((target, 0)).1 += 1;
            self.pending_hash.insert(p, hash);
        }
        self.s.counters.messages_out.inc_by(num_messages as u64);
        self.s.counters.bytes_out.inc_by(len as u64);
        true
    }

    fn next_round_robin(&mut self) -> Option<ConsumerId> {
        let after = self.consumers.range(self.rr + 1..).chain(self.consumers.range(..=self.rr));
        let found = after.filter(|(_, c)| c.permits > 0).map(|(id, _)| *id).next();
        if let Some(id) = found {
            self.rr = id;
        }
        found
    }

    fn ring_lookup(&self, hash: u32) -> Option<ConsumerId> {
        self.ring.range(hash..).next().or_else(|| self.ring.iter().next()).map(|(_, id)| *id)
    }
}

/// Points each key_shared consumer has on the hash ring (more points spread keys more evenly).
const RING_POINTS_PER_CONSUMER: u32 = 64;
