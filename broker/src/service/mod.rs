//! The broker's service layer: topics, managed ledgers, cursors, subscriptions and the entry
//! cache. It knows nothing of QUIC or any other wire: protocol front-ends call
//! [`BrokerService`] and translate its answers and [`ServiceError`]s to their own frames.

pub mod cache;
pub mod cursor;
pub mod managed_ledger;
pub mod subscription;
pub mod topic;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use magnetar_bookie::client::{LedgerClient, LedgerError};
use magnetar_common::metadata::{MetadataError, SharedStore};
use magnetar_common::topic::{TopicName, validate_subscription_name};
use magnetar_common::wire::ErrorCode;
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};

use crate::config::BrokerConfig;
use crate::metrics::{Metrics, SubscriptionLabel, TopicLabel};
use cache::EntryCache;
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
            ServiceError::Unavailable(_) | ServiceError::Closed(_) => ErrorCode::ServiceUnavailable,
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
}

impl BrokerService {
    pub fn new(config: BrokerConfig, store: SharedStore, ledgers: LedgerClient, metrics: Arc<Metrics>) -> Arc<Self> {
        let cache = EntryCache::new(config.cache_bytes.as_u64());
        let publish_memory =
            Arc::new(Semaphore::new(config.limits.max_publish_memory.as_u64().min(u32::MAX as u64) as usize));
        let instance = format!("{:08x}", rand::random::<u32>());
        Arc::new(Self {
            ctx: Arc::new(Context { config, store, ledgers, cache, metrics, publish_memory }),
            topics: Mutex::new(HashMap::new()),
            next_producer: 0.into(),
            instance,
        })
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.ctx.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.ctx.metrics
    }

    /// The loaded topic, loading (or creating, when allowed) it on first use.
    pub async fn topic(&self, name: &str) -> Result<Arc<Topic>, ServiceError> {
        let name = TopicName::parse(name).map_err(|e| ServiceError::InvalidTopic(e.to_string()))?;
        let cell = {
            let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
            topics.entry(name.clone()).or_default().clone()
        };
        let ctx = self.ctx.clone();
        let create = ctx.config.allow_auto_topic_creation;
        cell.get_or_try_init(|| Topic::load(name, ctx, create)).await.cloned()
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
            m.storage_bytes
                .get_or_create(&TopicLabel { topic: topic.clone() })
                .set(t.managed_ledger().stored_bytes() as i64);
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
        m.render()
    }

    /// Closes every topic: cursors persisted, ledgers closed. Producers and consumers still
    /// attached get errors from then on.
    pub async fn shutdown(&self) {
        self.ctx.publish_memory.close();
        let topics: Vec<Arc<Topic>> = {
            let mut map = self.topics.lock().unwrap_or_else(|p| p.into_inner());
            map.drain().filter_map(|(_, c)| c.get().cloned()).collect()
        };
        for t in topics {
            t.close().await;
        }
    }
}
