//! Prometheus metrics of a bookie, served at `/metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub adds: Counter,
    pub add_bytes: Counter,
    pub add_errors: Counter,
    pub reads: Counter,
    pub read_bytes: Counter,
    pub read_errors: Counter,
    pub add_seconds: Histogram,
    pub fsync_seconds: Histogram,
    pub journal_write_seconds: Histogram,
    pub journal_record_seconds: Histogram,
    pub journal_queue_depth: Gauge,
    pub journal_bytes: Counter,
    pub journal_groups: Counter,
    pub write_cache_bytes: Gauge,
    pub flush_seconds: Histogram,
    pub disk_usage_ratio: Gauge<f64, AtomicU64>,
    pub read_only: Gauge,
    pub entry_log_bytes: Gauge,
    pub gc_reclaimed_bytes: Counter,
    pub orphan_ledgers_deleted: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("magnetar_bookie");
        let m = Self {
            adds: Counter::default(),
            add_bytes: Counter::default(),
            add_errors: Counter::default(),
            reads: Counter::default(),
            read_bytes: Counter::default(),
            read_errors: Counter::default(),
            add_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            journal_write_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            journal_record_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            journal_queue_depth: Gauge::default(),
            journal_bytes: Counter::default(),
            journal_groups: Counter::default(),
            write_cache_bytes: Gauge::default(),
            flush_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            disk_usage_ratio: Gauge::default(),
            read_only: Gauge::default(),
            entry_log_bytes: Gauge::default(),
            gc_reclaimed_bytes: Counter::default(),
            orphan_ledgers_deleted: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("adds", "Entries added and acknowledged", m.adds.clone());
        registry.register("add_bytes", "Bytes of entries added", m.add_bytes.clone());
        registry.register("add_errors", "Adds accepted for journaling that then failed (I/O)", m.add_errors.clone());
        registry.register("reads", "Entries read", m.reads.clone());
        registry.register("read_bytes", "Bytes of entries read", m.read_bytes.clone());
        registry.register("read_errors", "Reads that found corrupt data", m.read_errors.clone());
        registry.register(
            "add_seconds",
            "Add latency inside the bookie: from the request to its durability (write-cache wait, journal)",
            m.add_seconds.clone(),
        );
        registry.register("journal_fsync_seconds", "Journal group-commit fdatasync latency", m.fsync_seconds.clone());
        registry.register(
            "journal_write_seconds",
            "Journal group write latency (into the page cache, before its fdatasync)",
            m.journal_write_seconds.clone(),
        );
        registry.register(
            "journal_record_seconds",
            "Time a record spends in the journal: queued, grouped, written and fdatasync'd",
            m.journal_record_seconds.clone(),
        );
        registry.register("journal_queue_depth", "Records waiting for the journal", m.journal_queue_depth.clone());
        registry.register("journal_written_bytes", "Bytes written to the journal", m.journal_bytes.clone());
        registry.register("journal_groups", "Group commits written to the journal", m.journal_groups.clone());
        registry.register("write_cache_bytes", "Bytes held in the write cache", m.write_cache_bytes.clone());
        registry.register("flush_seconds", "Write-cache flush (checkpoint) duration", m.flush_seconds.clone());
        registry.register("disk_usage_ratio", "Used share of the fullest bookie disk", m.disk_usage_ratio.clone());
        registry.register("read_only", "1 when the bookie refuses writes", m.read_only.clone());
        registry.register("entry_log_bytes", "Bytes in entry log files", m.entry_log_bytes.clone());
        registry.register("gc_reclaimed_bytes", "Bytes reclaimed from entry logs", m.gc_reclaimed_bytes.clone());
        registry.register(
            "orphan_ledgers_deleted",
            "Ledgers deleted from this bookie because their metadata was gone or said object storage only",
            m.orphan_ledgers_deleted.clone(),
        );
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
