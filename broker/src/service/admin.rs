//! Administrative operations on topics and subscriptions, run on the broker that owns the topic
//! (the HTTP admin API forwards requests there). No wire protocol here: front-ends call these
//! and render the answers.

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use magnetar_common::ids::{MessageId, Position};
use magnetar_common::topic::TopicName;
use magnetar_common::wire::{InitialPosition, SubscriptionType};
use serde::Serialize;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::subscription::{SubCmd, cursor_key};
use super::topic::{OffloadView, Topic};
use super::{BrokerService, ServiceError, managed_ledger};

/// Where an admin reset moves a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTarget {
    /// The oldest stored message: everything is delivered again.
    Earliest,
    /// After the newest message: the backlog is skipped.
    Latest,
    /// This message and everything after it are unacknowledged, everything before acknowledged.
    At(Position),
}

impl FromStr for ResetTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "earliest" => Ok(ResetTarget::Earliest),
            "latest" => Ok(ResetTarget::Latest),
            _ => MessageId::from_str(s)
                .map(|id| ResetTarget::At(id.position))
                .map_err(|e| format!("reset target {s:?} is not earliest, latest or a message id: {e}")),
        }
    }
}

/// A subscription as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionView {
    pub name: String,
    pub durable: bool,
    /// Unacknowledged entries (batches).
    pub backlog: u64,
    pub consumers: usize,
    /// The first entry not acknowledged by the mark-delete position (`ledger:entry`).
    pub acked_before: String,
    /// Acknowledged entries beyond it.
    pub individually_acked: usize,
}

/// A topic as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TopicStats {
    pub topic: String,
    pub owner: String,
    /// Rates over the last ten seconds.
    pub msg_rate_in: f64,
    pub msg_rate_out: f64,
    pub bytes_rate_in: f64,
    pub bytes_rate_out: f64,
    /// Totals since the topic was loaded on this broker.
    pub msg_in: u64,
    pub msg_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub storage_bytes: u64,
    pub ledgers: usize,
    /// Ledgers taken off the list by retention whose deletion has not finished.
    pub deleting_ledgers: Vec<u64>,
    pub entries: u64,
    pub producers: Vec<String>,
    pub subscriptions: Vec<SubscriptionView>,
    /// Where the entries are: bookies, object storage, and what is on its way there.
    pub offload: OffloadView,
}

/// Counter samples of loaded topics, one a second, for rates.
#[derive(Debug, Default)]
pub(crate) struct Rates {
    samples: HashMap<TopicName, VecDeque<(Instant, [u64; 4])>>,
}

const RATE_SAMPLES: usize = 11;

fn counters(t: &Topic) -> [u64; 4] {
    let c = &t.counters;
    [c.messages_in.get(), c.messages_out.get(), c.bytes_in.get(), c.bytes_out.get()]
}

impl Rates {
    /// Records the counters of every loaded topic, forgetting unloaded ones.
    pub(crate) fn sample(&mut self, topics: &[Arc<Topic>]) {
        let now = Instant::now();
        let mut next = HashMap::with_capacity(topics.len());
        for t in topics {
            let mut q = self.samples.remove(t.name()).unwrap_or_default();
            q.push_back((now, counters(t)));
            while q.len() > RATE_SAMPLES {
                q.pop_front();
            }
            next.insert(t.name().clone(), q);
        }
        self.samples = next;
    }

    /// Per-second rates (messages in, out, bytes in, out) over the recorded window.
    fn rates(&self, t: &Topic) -> [f64; 4] {
        let Some(q) = self.samples.get(t.name()) else { return [0.0; 4] };
        let (Some(first), Some(last)) = (q.front(), q.back()) else { return [0.0; 4] };
        let secs = last.0.duration_since(first.0).as_secs_f64();
        if secs <= 0.0 {
            return [0.0; 4];
        }
        std::array::from_fn(|i| last.1[i].saturating_sub(first.1[i]) as f64 / secs)
    }
}

impl BrokerService {
    /// A loaded (owned) topic that must exist: admin requests never create topics implicitly.
    async fn existing_topic(&self, topic: &str) -> Result<Arc<Topic>, ServiceError> {
        let name = TopicName::parse(topic).map_err(|e| ServiceError::InvalidTopic(e.to_string()))?;
        if !self.is_loaded(&name) && self.store().get(&managed_ledger::key(&name)).await?.is_none() {
            return Err(ServiceError::NotFound(format!("topic {name}")));
        }
        self.topic_with(topic, false).await
    }

    /// Creates a topic (its managed ledger) unless it exists.
    pub async fn create_topic(&self, topic: &str) -> Result<TopicName, ServiceError> {
        let name = TopicName::parse(topic).map_err(|e| ServiceError::InvalidTopic(e.to_string()))?;
        if self.is_loaded(&name) || self.store().get(&managed_ledger::key(&name)).await?.is_some() {
            return Err(ServiceError::AlreadyExists(format!("topic {name}")));
        }
        self.topic_with(topic, true).await?;
        info!(topic = %name, "topic created");
        Ok(name)
    }

    /// Topics of a namespace (full names), from the metadata store.
    pub async fn list_topics(&self, tenant: &str, namespace: &str) -> Result<Vec<String>, ServiceError> {
        self.policies().namespace(tenant, namespace).await?;
        let prefix = format!("/managed-ledgers/{tenant}/{namespace}/");
        let kvs = self.store().list(&prefix).await?;
        Ok(kvs.into_iter().map(|kv| format!("persistent://{tenant}/{namespace}/{}", &kv.key[prefix.len()..])).collect())
    }

    pub async fn topic_stats(&self, topic: &str) -> Result<TopicStats, ServiceError> {
        let t = self.existing_topic(topic).await?;
        let rates = self.rates.lock().unwrap_or_else(|p| p.into_inner()).rates(&t);
        let totals = counters(&t);
        let mut producers: Vec<String> =
            t.producers.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        producers.sort();
        let mut subscriptions = Vec::new();
        for (name, h) in t.subs.lock().await.iter() {
            let (acked_before, individually_acked) = *h.stats.cursor.lock().unwrap_or_else(|p| p.into_inner());
            subscriptions.push(SubscriptionView {
                name: name.clone(),
                durable: h.durable,
                backlog: t.backlog(&h.stats),
                consumers: h.stats.consumers.load(std::sync::atomic::Ordering::Relaxed),
                acked_before: format!("{}:{}", acked_before.ledger_id, acked_before.entry_id),
                individually_acked,
            });
        }
        subscriptions.sort_by(|a, b| a.name.cmp(&b.name));
        let ml = t.managed_ledger();
        Ok(TopicStats {
            topic: t.name().to_string(),
            owner: self.ownership().broker_url().to_string(),
            msg_rate_in: rates[0],
            msg_rate_out: rates[1],
            bytes_rate_in: rates[2],
            bytes_rate_out: rates[3],
            msg_in: totals[0],
            msg_out: totals[1],
            bytes_in: totals[2],
            bytes_out: totals[3],
            storage_bytes: ml.stored_bytes(),
            ledgers: ml.ledger_ids().len(),
            deleting_ledgers: ml.deleting(),
            entries: ml.entries_from(ml.first_position()),
            producers,
            subscriptions,
            offload: t.offload_view(),
        })
    }

    /// Asks the owner to offload every closed ledger of a topic now; the upload runs in the
    /// background ([`Self::offload_status`] follows it).
    pub async fn offload(&self, topic: &str) -> Result<OffloadView, ServiceError> {
        self.existing_topic(topic).await?.request_offload()
    }

    pub async fn offload_status(&self, topic: &str) -> Result<OffloadView, ServiceError> {
        Ok(self.existing_topic(topic).await?.offload_view())
    }

    /// Deletes a topic: its cursors, its ledgers, then its ledger list. Refused while producers
    /// or consumers are attached, unless `force` (they are disconnected; with automatic topic
    /// creation on, a reconnecting client creates the topic anew once the deletion has ended:
    /// until then this broker refuses to load it). When a ledger cannot be deleted (object store
    /// or metadata store unavailable) the list stays, naming what is left, and the request fails:
    /// deleting the topic again finishes the work.
    pub async fn delete_topic(&self, topic: &str, force: bool) -> Result<(), ServiceError> {
        let t = self.existing_topic(topic).await?;
        let name = t.name().clone();
        if !force {
            let producers = t.producers.lock().unwrap_or_else(|p| p.into_inner()).len();
            let consumers: usize = t
                .subs
                .lock()
                .await
                .values()
                .map(|h| h.stats.consumers.load(std::sync::atomic::Ordering::Relaxed))
                .sum();
            if producers + consumers > 0 {
                return Err(ServiceError::Conflict(format!(
                    "topic {name} has {producers} producers and {consumers} consumers attached; use force to delete it anyway"
                )));
            }
        }
        let _deleting = self.mark_deleting(&name)?;
        self.unload(&name).await;
        for kv in self.store().list(&format!("{}/", cursor_key(&name.path(), "").trim_end_matches('/'))).await? {
            self.store().delete(&kv.key, None).await?;
        }
        // The stored list, read after the unload: it names every ledger, including those whose
        // deletion an earlier retention pass left unfinished.
        let Some((ledgers, version)) = managed_ledger::stored_ledgers(self.store(), &name).await? else {
            info!(topic = %name, "topic deleted");
            return Ok(());
        };
        // Stop at the first failure: with a store down, every other deletion would wait as long
        // for the same answer. Those deleted already are found gone the next time.
        for (i, &id) in ledgers.iter().enumerate() {
            let offloader = self.ctx.offloader.as_deref();
            if let Err(e) = super::offloader::delete_ledger(self.ledgers(), offloader, id).await {
                warn!(topic = %name, ledger_id = id, error = %e, "delete ledger of deleted topic");
                return Err(ServiceError::Unavailable(format!(
                    "topic {name}: ledger {id} could not be deleted ({e}); {} of its {} ledgers are left and its ledger list is kept: delete the topic again to finish",
                    ledgers.len() - i,
                    ledgers.len(),
                )));
            }
        }
        match self.store().delete(&managed_ledger::key(&name), Some(version)).await {
            Ok(_) => {}
            Err(magnetar_common::metadata::MetadataError::Conflict { .. }) => {
                return Err(ServiceError::Conflict(format!(
                    "topic {name} was loaded again while it was being deleted; delete it again"
                )));
            }
            Err(e) => return Err(e.into()),
        }
        info!(topic = %name, ledgers = ledgers.len(), "topic deleted");
        Ok(())
    }

    /// Subscriptions of a topic.
    pub async fn list_subscriptions(&self, topic: &str) -> Result<Vec<SubscriptionView>, ServiceError> {
        Ok(self.topic_stats(topic).await?.subscriptions)
    }

    /// Creates a durable subscription at `position` (earliest or latest) with no consumer.
    pub async fn create_subscription(
        &self,
        topic: &str,
        subscription: &str,
        position: InitialPosition,
    ) -> Result<(), ServiceError> {
        magnetar_common::topic::validate_subscription_name(subscription).map_err(ServiceError::BadRequest)?;
        let t = self.existing_topic(topic).await?;
        let mut subs = t.subs.lock().await;
        if subs.contains_key(subscription)
            || self.store().get(&cursor_key(&t.name().path(), subscription)).await?.is_some()
        {
            return Err(ServiceError::AlreadyExists(format!("subscription {subscription} of {}", t.name())));
        }
        let params = super::SubscribeParams {
            subscription: subscription.to_string(),
            subscription_type: SubscriptionType::Exclusive,
            initial_position: position,
            consumer_name: String::new(),
            priority: 0,
            durable: true,
            start: None,
            ack_timeout: None,
        };
        t.ensure_subscription(&mut subs, &params).await
    }

    /// Deletes a durable subscription and its cursor; refused while consumers are attached unless
    /// `force`.
    pub async fn delete_subscription(&self, topic: &str, subscription: &str, force: bool) -> Result<(), ServiceError> {
        let t = self.existing_topic(topic).await?;
        let mut subs = t.subs.lock().await;
        let key = cursor_key(&t.name().path(), subscription);
        let stored = self.store().get(&key).await?;
        let Some(h) = subs.get(subscription) else {
            if stored.is_none() {
                return Err(ServiceError::NotFound(format!("subscription {subscription} of {}", t.name())));
            }
            self.store().delete(&key, None).await?;
            return Ok(());
        };
        let consumers = h.stats.consumers.load(std::sync::atomic::Ordering::Relaxed);
        if consumers > 0 && !force {
            return Err(ServiceError::Conflict(format!(
                "subscription {subscription} has {consumers} consumers attached; use force to delete it anyway"
            )));
        }
        if let Some(h) = subs.remove(subscription) {
            let (reply, rx) = oneshot::channel();
            if h.tx.send(SubCmd::Close { persist: false, reply }).is_ok() {
                let _ = rx.await;
            }
        }
        self.store().delete(&key, None).await?;
        info!(topic = %t.name(), subscription, "subscription deleted");
        Ok(())
    }

    /// Moves a subscription's cursor; its consumers are disconnected and reattach from there.
    pub async fn reset_subscription(
        &self,
        topic: &str,
        subscription: &str,
        to: ResetTarget,
    ) -> Result<(), ServiceError> {
        let t = self.existing_topic(topic).await?;
        let ml = t.managed_ledger();
        let position = match to {
            ResetTarget::Earliest => ml.first_position(),
            ResetTarget::Latest => ml.end_position(),
            ResetTarget::At(p) => ml.normalize(p).min(ml.end_position()),
        };
        let mut subs = t.subs.lock().await;
        if !subs.contains_key(subscription) {
            // A stored subscription whose task is not running: start it so the reset goes
            // through its cursor (with its version).
            if self.store().get(&cursor_key(&t.name().path(), subscription)).await?.is_none() {
                return Err(ServiceError::NotFound(format!("subscription {subscription} of {}", t.name())));
            }
            let params = super::SubscribeParams {
                subscription: subscription.to_string(),
                subscription_type: SubscriptionType::Exclusive,
                initial_position: InitialPosition::Latest,
                consumer_name: String::new(),
                priority: 0,
                durable: true,
                start: None,
                ack_timeout: None,
            };
            t.ensure_subscription(&mut subs, &params).await?;
        }
        let h = subs.get(subscription).ok_or_else(|| ServiceError::Internal("subscription vanished".into()))?;
        let (reply, rx) = oneshot::channel();
        h.tx.send(SubCmd::Reset { position, reply }).map_err(|_| ServiceError::Closed(t.name().to_string()))?;
        drop(subs);
        rx.await.map_err(|_| ServiceError::Closed(t.name().to_string()))?;
        info!(topic = %t.name(), subscription, ledger_id = position.ledger_id, entry_id = position.entry_id, "subscription reset");
        Ok(())
    }

    /// Applies the namespace's retention policy to a topic now (it also runs periodically).
    pub async fn apply_retention(&self, topic: &str) -> Result<super::managed_ledger::Trimmed, ServiceError> {
        self.existing_topic(topic).await?.apply_retention().await
    }

    /// Names of the topics loaded on this broker, sorted.
    pub fn loaded_topic_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.loaded_topics().iter().map(|t| t.name().to_string()).collect();
        v.sort();
        v
    }
}
