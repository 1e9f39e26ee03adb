//! The entry cache: recently written entries of every topic, bounded in bytes, so tailing
//! consumers are served from memory. Keys are positions; ledger ids are unique across topics.
//! Only the append path inserts: reads of old entries bypass it, so a consumer catching up never
//! evicts the tail that live consumers need.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use magnetar_common::ids::Position;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

/// Per-entry bookkeeping counted against the budget besides the payload.
const ENTRY_OVERHEAD_BYTES: u32 = 96;

/// A byte-bounded cache shared by a broker's topics.
#[derive(Clone, Debug)]
pub struct EntryCache {
    inner: Cache<Position, Bytes>,
    hits: Arc<AtomicU64>,
    misses: Arc<AtomicU64>,
}

impl EntryCache {
    pub fn new(max_bytes: u64) -> Self {
        let inner = Cache::builder()
            .max_capacity(max_bytes)
            // LRU, not moka's default TinyLFU: a tail cache must admit every new entry.
            .eviction_policy(EvictionPolicy::lru())
            .weigher(|_k: &Position, v: &Bytes| (v.len() as u32).saturating_add(ENTRY_OVERHEAD_BYTES))
            .build();
        Self { inner, hits: Arc::default(), misses: Arc::default() }
    }

    pub fn insert(&self, pos: Position, payload: Bytes) {
        self.inner.insert(pos, payload);
    }

    /// Drops an entry (its ledger was deleted).
    pub fn invalidate(&self, pos: &Position) {
        self.inner.invalidate(pos);
    }

    pub fn get(&self, pos: &Position) -> Option<Bytes> {
        let v = self.inner.get(pos);
        match v {
            Some(_) => self.hits.fetch_add(1, Ordering::Relaxed),
            None => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        v
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Bytes held now (approximate: moka applies evictions lazily).
    pub fn weighted_bytes(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.weighted_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_stays_within_its_byte_budget() {
        let cache = EntryCache::new(1024 * 1024);
        for i in 0..1000 {
            cache.insert(Position::new(1, i), Bytes::from(vec![0u8; 10 * 1024]));
        }
        cache.inner.run_pending_tasks();
        assert!(cache.weighted_bytes() <= 1024 * 1024, "{}", cache.weighted_bytes());
        assert!(cache.get(&Position::new(1, 999)).is_some(), "the newest entry is cached");
        assert!(cache.get(&Position::new(1, 0)).is_none(), "the oldest entry was evicted");
    }
}
