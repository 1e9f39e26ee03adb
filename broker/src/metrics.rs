//! Prometheus metrics of a broker, served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use magnetar_bookie::client::AutoRecoveryMetrics;
use magnetar_bookie::offload::StoreMetrics;

use crate::service::offloader::OffloadCounters;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabel {
    pub topic: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubscriptionLabel {
    pub topic: String,
    pub subscription: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Auto-recovery's gauges and counters (`under_replicated_ledgers`, `autorecovery_*`).
    pub autorecovery: AutoRecoveryMetrics,
    pub messages_in: Family<TopicLabel, Counter>,
    pub bytes_in: Family<TopicLabel, Counter>,
    pub messages_out: Family<TopicLabel, Counter>,
    pub bytes_out: Family<TopicLabel, Counter>,
    pub publish_errors: Family<TopicLabel, Counter>,
    pub publish_latency: Histogram,
    pub backlog: Family<SubscriptionLabel, Gauge>,
    pub consumers: Family<SubscriptionLabel, Gauge>,
    pub storage_bytes: Family<TopicLabel, Gauge>,
    pub storage_bookie_bytes: Family<TopicLabel, Gauge>,
    pub storage_offloaded_bytes: Family<TopicLabel, Gauge>,
    pub offload_backlog_bytes: Family<TopicLabel, Gauge>,
    pub offload: OffloadCounters,
    pub offload_store: StoreMetrics,
    pub retention_deleted_ledgers: Family<TopicLabel, Counter>,
    pub retention_deleted_bytes: Family<TopicLabel, Counter>,
    pub retention_deleting_ledgers: Family<TopicLabel, Gauge>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_bytes: Gauge,
    pub connections: Gauge,
    pub publish_memory_bytes: Gauge,
    pub lease_suspensions: Counter,
    pub owned_bundles: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("magnetar_broker");
        let m = Self {
            messages_in: Family::default(),
            bytes_in: Family::default(),
            messages_out: Family::default(),
            bytes_out: Family::default(),
            publish_errors: Family::default(),
            publish_latency: Histogram::new(exponential_buckets(0.000_1, 2.0, 18)),
            backlog: Family::default(),
            consumers: Family::default(),
            storage_bytes: Family::default(),
            storage_bookie_bytes: Family::default(),
            storage_offloaded_bytes: Family::default(),
            offload_backlog_bytes: Family::default(),
            offload: OffloadCounters::default(),
            offload_store: StoreMetrics::default(),
            retention_deleted_ledgers: Family::default(),
            retention_deleted_bytes: Family::default(),
            retention_deleting_ledgers: Family::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_bytes: Gauge::default(),
            connections: Gauge::default(),
            publish_memory_bytes: Gauge::default(),
            lease_suspensions: Counter::default(),
            owned_bundles: Gauge::default(),
            autorecovery: AutoRecoveryMetrics::default(),
            registry: Registry::default(),
        };
        registry.register("messages_in", "Messages published and stored", m.messages_in.clone());
        registry.register("bytes_in", "Bytes of batches published and stored", m.bytes_in.clone());
        registry.register("messages_out", "Messages delivered to consumers", m.messages_out.clone());
        registry.register("bytes_out", "Bytes of batches delivered to consumers", m.bytes_out.clone());
        registry.register("publish_errors", "Batches that could not be stored", m.publish_errors.clone());
        registry.register(
            "publish_latency_seconds",
            "From receiving a batch to its durable acknowledgement",
            m.publish_latency.clone(),
        );
        registry.register("subscription_backlog_entries", "Unacknowledged entries (batches)", m.backlog.clone());
        registry.register("subscription_consumers", "Consumers attached", m.consumers.clone());
        registry.register("topic_storage_bytes", "Bytes of entries stored", m.storage_bytes.clone());
        registry.register("cache_hits", "Entry reads served from the cache", m.cache_hits.clone());
        registry.register("cache_misses", "Entry reads that went to bookies", m.cache_misses.clone());
        registry.register(
            "retention_deleted_ledgers",
            "Acknowledged ledgers deleted by the retention policy",
            m.retention_deleted_ledgers.clone(),
        );
        registry.register(
            "retention_deleted_bytes",
            "Bytes of acknowledged ledgers deleted by the retention policy",
            m.retention_deleted_bytes.clone(),
        );
        registry.register(
            "retention_deleting_ledgers",
            "Ledgers taken off a topic's list whose deletion has not finished (retried at each retention check)",
            m.retention_deleting_ledgers.clone(),
        );
        registry.register("cache_bytes", "Bytes held by the entry cache", m.cache_bytes.clone());
        registry.register("connections", "Client connections open", m.connections.clone());
        registry.register("publish_memory_bytes", "Bytes of publishes in flight", m.publish_memory_bytes.clone());
        registry.register(
            "lease_suspensions",
            "Times this broker stopped serving because its lease was not renewed in time",
            m.lease_suspensions.clone(),
        );
        registry.register("owned_bundles", "Bundles this broker serves", m.owned_bundles.clone());
        registry.register(
            "topic_storage_bookie_bytes",
            "Bytes of entries whose copies are on bookies",
            m.storage_bookie_bytes.clone(),
        );
        registry.register(
            "topic_storage_offloaded_bytes",
            "Bytes of entries in ledgers offloaded to object storage",
            m.storage_offloaded_bytes.clone(),
        );
        registry.register(
            "offload_backlog_bytes",
            "Bytes of closed ledgers the offload policy wants in object storage that are not there yet",
            m.offload_backlog_bytes.clone(),
        );
        registry.register(
            "offloaded_ledgers",
            "Ledgers uploaded to object storage",
            m.offload.offloaded_ledgers.clone(),
        );
        registry.register(
            "offloaded_bytes",
            "Bytes of objects uploaded for offloaded ledgers",
            m.offload.offloaded_bytes.clone(),
        );
        registry.register(
            "offload_failures",
            "Offload passes that failed (retried after a backoff)",
            m.offload.failures.clone(),
        );
        registry.register(
            "offload_bookie_copies_deleted",
            "Offloaded ledgers whose bookie copies were deleted",
            m.offload.bookie_copies_deleted.clone(),
        );
        m.offload_store.register(&mut registry);
        m.autorecovery.register(&mut registry);
        Self { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
