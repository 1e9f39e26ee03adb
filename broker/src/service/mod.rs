//! The broker's service layer: topics, managed ledgers, cursors, subscriptions and the entry
//! cache. It knows nothing of QUIC or any other wire: protocol front-ends call
//! [`BrokerService`] and translate its answers and [`ServiceError`]s to their own frames.

pub mod admin;
pub mod cache;
pub mod cursor;
pub mod managed_ledger;
pub mod offloader;
pub mod ownership;
pub mod policies;
pub mod subscription;
pub mod topic;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use magnetar_bookie::client::{LedgerClient, LedgerError};
use magnetar_bookie::offload::OffloadStore;
use magnetar_common::metadata::{LeaseState, MetadataError, SharedStore};
use magnetar_common::topic::{TopicName, validate_subscription_name};
use magnetar_common::wire::ErrorCode;
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore, watch};
use tracing::{info, warn};

use crate::config::BrokerConfig;
use crate::metrics::{Metrics, SubscriptionLabel, TopicLabel};
use cache::EntryCache;
use ownership::{BrokerInfo, Bundle, Ownership, Phase};
use policies::Policies;
pub use subscription::ConsumerEvent;
pub use topic::{ConsumerHandle, ProducerHandle, SubscribeParams, Topic};

/// What went wrong, in service terms. Front-ends map it to their wire codes with
/// [`ServiceError::code`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidTopic(String),
    #[error("topic {0} does not exist (automatic topic creation is off)")]
    TopicNotFound(String),
    #[error("message batch of {size} bytes exceeds the maximum of {max} bytes")]
    MessageTooLarge { size: usize, max: usize },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{0}")]
    ConsumerBusy(String),
    #[error("{0}")]
    ProducerBusy(String),
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error("storage failed: {0}")]
    Persistence(String),
    #[error("topic {0} is closed")]
    Closed(String),
    #[error("the broker is shutting down")]
    ShuttingDown,
    #[error("topic {topic} is not served by this broker{}", owner.as_ref().map(|o| format!(" (its owner is {o})")).unwrap_or_default())]
    NotOwner { topic: String, owner: Option<String> },
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    Conflict(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// The wire code telling the client what to do.
    pub fn code(&self) -> ErrorCode {
        match self {
            ServiceError::InvalidTopic(_) => ErrorCode::InvalidTopicName,
            ServiceError::TopicNotFound(_) => ErrorCode::TopicNotFound,
            ServiceError::MessageTooLarge { .. } => ErrorCode::MessageTooLarge,
            ServiceError::BadRequest(_) => ErrorCode::BadRequest,
            ServiceError::ConsumerBusy(_) => ErrorCode::ConsumerBusy,
            ServiceError::ProducerBusy(_) => ErrorCode::ProducerBusy,
            ServiceError::Unavailable(_) => ErrorCode::ServiceUnavailable,
            // A topic closes when it is unloaded: its next owner (maybe this broker again) serves it.
            ServiceError::Closed(_) | ServiceError::NotOwner { .. } => ErrorCode::NotOwner,
            ServiceError::NotFound(_) => ErrorCode::TopicNotFound,
            ServiceError::AlreadyExists(_) | ServiceError::Conflict(_) => ErrorCode::BadRequest,
            ServiceError::Persistence(_) => ErrorCode::PersistenceError,
            ServiceError::ShuttingDown => ErrorCode::ShuttingDown,
            ServiceError::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<LedgerError> for ServiceError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::Unavailable(_) | LedgerError::NotEnoughBookies { .. } | LedgerError::Metadata(_) => {
                ServiceError::Unavailable(e.to_string())
            }
            e => ServiceError::Persistence(e.to_string()),
        }
    }
}

impl From<MetadataError> for ServiceError {
    fn from(e: MetadataError) -> Self {
        ServiceError::Unavailable(e.to_string())
    }
}

/// What every topic shares.
#[derive(Debug)]
pub(crate) struct Context {
    pub config: BrokerConfig,
    pub store: SharedStore,
    pub ledgers: LedgerClient,
    pub cache: EntryCache,
    pub metrics: Arc<Metrics>,
    pub policies: Policies,
    pub offloader: Option<Arc<offloader::Offloader>>,
    publish_memory: Arc<Semaphore>,
}

impl Context {
    async fn reserve_publish_memory(&self, bytes: usize) -> Result<OwnedSemaphorePermit, ServiceError> {
        let n = u32::try_from(bytes.max(1)).map_err(|_| ServiceError::BadRequest("batch too large".into()))?;
        self.publish_memory.clone().acquire_many_owned(n).await.map_err(|_| ServiceError::ShuttingDown)
    }
}

type TopicCell = Arc<OnceCell<Arc<Topic>>>;

/// The broker's topics and the operations front-ends call.
#[derive(Debug)]
pub struct BrokerService {
    ctx: Arc<Context>,
    topics: Mutex<HashMap<TopicName, TopicCell>>,
    next_producer: std::sync::atomic::AtomicU64,
    instance: String,
    ownership: Arc<Ownership>,
    guard: Mutex<Option<tokio::task::JoinHandle<()>>>,
    rates: Mutex<admin::Rates>,
    /// Topics being deleted by this broker: not loaded again until the deletion ends (else a
    /// reconnecting client would reload a topic whose ledgers are being deleted under it).
    deleting: Mutex<HashSet<TopicName>>,
}

/// Marks a topic as being deleted for as long as it lives (see [`BrokerService::deleting`]).
struct DeletingTopic<'a> {
    set: &'a Mutex<HashSet<TopicName>>,
    name: TopicName,
}

impl Drop for DeletingTopic<'_> {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.name);
    }
}

impl BrokerService {
    /// A broker service; opens the `[offload]` object store if one is configured (no request is
    /// made until something is offloaded or read).
    pub fn new(
        config: BrokerConfig,
        store: SharedStore,
        ledgers: LedgerClient,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, ServiceError> {
        let cache = EntryCache::new(config.cache_bytes.as_u64());
        let publish_memory =
            Arc::new(Semaphore::new(config.limits.max_publish_memory.as_u64().min(u32::MAX as u64) as usize));
        let instance = format!("{:08x}", rand::random::<u32>());
        let ownership = Ownership::new(store.clone(), config.cluster.lease_ttl);
        let policies = Policies::new(store.clone());
        let offloader = match &config.offload {
            None => None,
            Some(c) => {
                let object_store = OffloadStore::open_with_metrics(c, metrics.offload_store.clone())
                    .map_err(|e| ServiceError::BadRequest(format!("offload store: {e}")))?;
                Some(Arc::new(offloader::Offloader::new(
                    object_store,
                    ledgers.clone(),
                    instance.clone(),
                    config.offload_policy.clone(),
                    metrics.offload.clone(),
                )))
            }
        };
        Ok(Arc::new(Self {
            ctx: Arc::new(Context { config, store, ledgers, cache, metrics, policies, offloader, publish_memory }),
            topics: Mutex::new(HashMap::new()),
            next_producer: 0.into(),
            instance,
            ownership,
            guard: Mutex::new(None),
            rates: Mutex::new(admin::Rates::default()),
            deleting: Mutex::new(HashSet::new()),
        }))
    }

    /// Joins the cluster: creates the default tenant and namespace if missing, registers this
    /// broker (advertised `host:port`s) under a lease, and starts the guard that stops serving
    /// when the lease is in doubt.
    pub async fn join_cluster(self: &Arc<Self>, quic: &str, http: &str) -> Result<(), ServiceError> {
        self.ctx.policies.ensure_defaults().await?;
        self.ownership.set_addresses(quic, http);
        let state = self.ownership.register().await?;
        let weak = Arc::downgrade(self);
        let guard = tokio::spawn(async move {
            tokio::join!(guard(weak.clone(), state), sample_rates(weak));
        });
        *self.guard.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard);
        Ok(())
    }

    pub fn ownership(&self) -> &Arc<Ownership> {
        &self.ownership
    }

    pub fn policies(&self) -> &Policies {
        &self.ctx.policies
    }

    pub fn store(&self) -> &SharedStore {
        &self.ctx.store
    }

    pub fn ledgers(&self) -> &LedgerClient {
        &self.ctx.ledgers
    }

    /// Which broker serves `topic` (assigning its bundle if nobody does).
    pub async fn lookup(&self, topic: &str) -> Result<(TopicName, BrokerInfo), ServiceError> {
        let name = TopicName::parse(topic).map_err(|e| ServiceError::InvalidTopic(e.to_string()))?;
        let policies = self.ctx.policies.for_topic(name.tenant(), name.namespace()).await?;
        let bundle = Bundle::of(&name, policies.bundles(&self.ctx.config));
        let owner = self.ownership.lookup(&bundle).await?;
        Ok((name, owner))
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.ctx.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.ctx.metrics
    }

    /// The loaded topic, loading (or creating, when allowed) it on first use. Loading checks
    /// that this broker owns the topic's bundle; the owner fences and recovers what a previous
    /// owner left open.
    pub async fn topic(&self, name: &str) -> Result<Arc<Topic>, ServiceError> {
        self.topic_with(name, self.ctx.config.allow_auto_topic_creation).await
    }

    /// Whether a topic is loaded on this broker.
    pub fn is_loaded(&self, name: &TopicName) -> bool {
        self.topics.lock().unwrap_or_else(|p| p.into_inner()).get(name).is_some_and(|c| c.get().is_some())
    }

    /// [`Self::topic`], creating the topic if missing only when `create`.
    pub async fn topic_with(&self, name: &str, create: bool) -> Result<Arc<Topic>, ServiceError> {
        let name = TopicName::parse(name).map_err(|e| ServiceError::InvalidTopic(e.to_string()))?;
        self.refuse_if_deleting(&name)?;
        let cell = {
            let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
            topics.entry(name.clone()).or_default().clone()
        };
        if let Some(t) = cell.get() {
            return Ok(t.clone());
        }
        let Phase::Serving { lease } = self.ownership.phase() else {
            return Err(match self.ownership.phase() {
                Phase::Draining => ServiceError::ShuttingDown,
                _ => ServiceError::Unavailable("this broker cannot renew its lease in the metadata store".into()),
            });
        };
        let ctx = self.ctx.clone();
        let ownership = self.ownership.clone();
        let topic = cell
            .get_or_try_init(|| async move {
                let policies = ctx.policies.for_topic(name.tenant(), name.namespace()).await?;
                let bundle = Bundle::of(&name, policies.bundles(&ctx.config));
                ownership.check_owned(&bundle, &name).await?;
                Topic::load(name, ctx, create, policies).await
            })
            .await?
            .clone();
        if self.ownership.phase() != (Phase::Serving { lease }) {
            // Ownership was lost while the topic loaded: the guard may have missed it.
            self.forget(topic.name(), &cell);
            topic.abandon().await;
            return Err(ServiceError::NotOwner { topic: topic.name().to_string(), owner: None });
        }
        if let Err(e) = self.refuse_if_deleting(topic.name()) {
            // Its deletion began while it loaded, after the deletion's unload had looked.
            self.forget(topic.name(), &cell);
            topic.close().await;
            return Err(e);
        }
        Ok(topic)
    }

    fn refuse_if_deleting(&self, name: &TopicName) -> Result<(), ServiceError> {
        if self.deleting.lock().unwrap_or_else(|p| p.into_inner()).contains(name) {
            return Err(ServiceError::Unavailable(format!("topic {name} is being deleted")));
        }
        Ok(())
    }

    /// Marks `name` as being deleted until the returned guard drops; refused if it already is.
    fn mark_deleting(&self, name: &TopicName) -> Result<DeletingTopic<'_>, ServiceError> {
        if !self.deleting.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone()) {
            return Err(ServiceError::Conflict(format!("topic {name} is already being deleted")));
        }
        Ok(DeletingTopic { set: &self.deleting, name: name.clone() })
    }

    /// Removes a topic's cell from the map if it is still `cell`.
    fn forget(&self, name: &TopicName, cell: &TopicCell) {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if topics.get(name).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            topics.remove(name);
        }
    }

    /// Unloads every loaded topic: cleanly (cursors persisted, ledgers closed) or, when the lease
    /// is in doubt, abruptly (nothing written; the next owner recovers).
    async fn unload_all(&self, clean: bool) {
        let topics: Vec<Arc<Topic>> = {
            let mut map = self.topics.lock().unwrap_or_else(|p| p.into_inner());
            map.drain().filter_map(|(_, c)| c.get().cloned()).collect()
        };
        if !topics.is_empty() {
            info!(topics = topics.len(), clean, "unloading topics");
        }
        if clean {
            let closes = topics.iter().map(|t| t.close());
            futures::future::join_all(closes).await;
        } else {
            for t in topics {
                t.abandon().await;
            }
        }
    }

    /// Unloads one topic cleanly (admin request or deletion).
    pub async fn unload(&self, name: &TopicName) -> bool {
        let cell = self.topics.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        match cell.and_then(|c| c.get().cloned()) {
            Some(t) => {
                t.close().await;
                true
            }
            None => false,
        }
    }

    /// Hands every topic over: stops taking new ones, closes the loaded ones (publishes in
    /// flight answered, cursors persisted, ledgers closed; their producers and consumers are told
    /// to look the topic up again), then revokes the lease so other brokers take the bundles at
    /// once.
    pub async fn shutdown(&self) {
        self.ownership.drain();
        if let Some(g) = self.guard.lock().unwrap_or_else(|p| p.into_inner()).take() {
            g.abort();
        }
        self.unload_all(true).await;
        self.ownership.release().await;
        self.ctx.publish_memory.close();
    }

    /// Attaches a producer to a topic.
    pub async fn create_producer(&self, topic: &str, name: &str) -> Result<ProducerHandle, ServiceError> {
        let topic = self.topic(topic).await?;
        let name = if name.is_empty() {
            let n = self.next_producer.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("producer-{}-{n}", self.instance)
        } else {
            validate_subscription_name(name).map_err(|e| ServiceError::BadRequest(format!("producer name: {e}")))?;
            name.to_string()
        };
        let name = topic.add_producer(name)?;
        Ok(ProducerHandle { topic, name })
    }

    /// Attaches a consumer to a subscription (created if new).
    pub async fn subscribe(
        &self,
        topic: &str,
        params: SubscribeParams,
    ) -> Result<(ConsumerHandle, tokio::sync::mpsc::UnboundedReceiver<ConsumerEvent>), ServiceError> {
        validate_subscription_name(&params.subscription).map_err(ServiceError::BadRequest)?;
        let topic = self.topic(topic).await?;
        topic.subscribe(params).await
    }

    /// Loaded topics.
    pub fn loaded_topics(&self) -> Vec<Arc<Topic>> {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.values().filter_map(|c| c.get().cloned()).collect()
    }

    /// Refreshes the gauges computed from state, then renders every metric.
    pub fn render_metrics(&self) -> String {
        let m = &self.ctx.metrics;
        for t in self.loaded_topics() {
            let topic = t.name().to_string();
            let label = TopicLabel { topic: topic.clone() };
            let ml = t.managed_ledger();
            m.storage_bytes.get_or_create(&label).set(ml.stored_bytes() as i64);
            m.storage_bookie_bytes.get_or_create(&label).set(ml.bookie_bytes() as i64);
            m.storage_offloaded_bytes.get_or_create(&label).set(ml.offloaded().0 as i64);
            m.retention_deleting_ledgers.get_or_create(&label).set(ml.deleting().len() as i64);
            for (sub, stats) in t.subscription_stats() {
                let l = SubscriptionLabel { topic: topic.clone(), subscription: sub };
                m.backlog.get_or_create(&l).set(t.backlog(&stats) as i64);
                m.consumers.get_or_create(&l).set(stats.consumers.load(std::sync::atomic::Ordering::Relaxed) as i64);
            }
        }
        let cache = &self.ctx.cache;
        m.cache_hits.inner().store(cache.hits(), std::sync::atomic::Ordering::Relaxed);
        m.cache_misses.inner().store(cache.misses(), std::sync::atomic::Ordering::Relaxed);
        m.cache_bytes.set(cache.weighted_bytes() as i64);
        let limit = self.ctx.config.limits.max_publish_memory.as_u64().min(u32::MAX as u64) as i64;
        m.publish_memory_bytes.set(limit - self.ctx.publish_memory.available_permits() as i64);
        m.owned_bundles.set(self.ownership.owned_bundles().len() as i64);
        m.render()
    }
}

/// Watches this broker's lease: stops serving (drops every topic, writes nothing) before the
/// store could expire it, serves again when it is renewed, registers anew when it is lost.
async fn guard(service: std::sync::Weak<BrokerService>, mut state: watch::Receiver<LeaseState>) {
    loop {
        let Some(me) = service.upgrade() else { return };
        if me.ownership.phase() == Phase::Draining {
            return;
        }
        let ttl = me.ownership.lease_ttl();
        // Stop serving this long before the store may expire the lease: clocks drift and
        // this process may be paused.
        let margin = ttl / 4;
        let current = *state.borrow_and_update();
        match current {
            LeaseState::Valid { valid_until } => {
                let stop_at = valid_until.checked_sub(margin).unwrap_or(valid_until);
                if std::time::Instant::now() >= stop_at {
                    if matches!(me.ownership.phase(), Phase::Serving { .. }) {
                        warn!("lease not renewed in time; stopping to serve every topic until it is");
                        me.ownership.suspend();
                        me.metrics().lease_suspensions.inc();
                        me.unload_all(false).await;
                    }
                } else if let Some(lease) = me.ownership.current_lease() {
                    me.ownership.resume(lease);
                }
                drop(me);
                // Past the stop point only a renewal (or the loss) changes anything.
                let before_stop = stop_at > std::time::Instant::now();
                tokio::select! {
                    _ = tokio::time::sleep_until(stop_at.into()), if before_stop => {}
                    r = state.changed() => if r.is_err() { return },
                }
            }
            LeaseState::Lost => {
                warn!("lease lost; dropping every topic and registering again");
                me.ownership.suspend();
                me.ownership.forget_lease();
                me.unload_all(false).await;
                let mut delay = std::time::Duration::from_millis(100);
                loop {
                    if me.ownership.phase() == Phase::Draining {
                        return;
                    }
                    match me.ownership.register().await {
                        Ok(s) => {
                            state = s;
                            break;
                        }
                        Err(e) => {
                            warn!(error = %e, "register again; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(ttl);
                        }
                    }
                }
            }
        }
    }
}

/// Samples every loaded topic's counters once a second, for the rates of the admin API.
async fn sample_rates(service: std::sync::Weak<BrokerService>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(me) = service.upgrade() else { return };
        let topics = me.loaded_topics();
        me.rates.lock().unwrap_or_else(|p| p.into_inner()).sample(&topics);
    }
}
