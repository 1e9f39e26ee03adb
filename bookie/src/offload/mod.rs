//! The object-store layer of the offload tier: segment objects on S3-compatible storage, a local
//! directory, or memory (tests). See `docs/object-storage.md`.
//!
//! **Owns:** opening the store from an [`OffloadConfig`] (this is the only module of any binary
//! that imports object_store backends), the segment object format ([`format`]), writing a segment
//! ([`SegmentWriter`]), verified range reads of one ([`SegmentReader`]) with read-ahead and a
//! byte-bounded cache shared by every reader of a store, and listing and deleting segments.
//!
//! **Never:** decides *what* to offload or *when* (the offloader's policy), touches ledger metadata
//! or the metadata store, overwrites an object (every segment gets a new random key), returns
//! bytes that failed their checksum, or makes a half-written segment visible (a multipart upload
//! becomes an object only when completed).
//!
//! # Use by the offloader (part 2 of issue 6)
//!
//! ```no_run
//! # use magnetar_bookie::offload::{OffloadConfig, OffloadStore, OffloadError, SegmentInfo};
//! # use magnetar_common::entry::Entry;
//! # async fn offload(config: &OffloadConfig, entries: Vec<Entry>) -> Result<(), OffloadError> {
//! let store = OffloadStore::open(config)?;          // once per process (per configured store)
//! let mut writer = store.segment_writer(42);          // ledger 42; key known: writer.key()
//! for entry in &entries {                             // consecutive entries from LedgerReader::read
//!     writer.append(entry).await?;                    // waits while upload_concurrency parts fly
//! }
//! let info: SegmentInfo = writer.finish().await?;     // durable object; store `info` in the
//!                                                     // ledger metadata (CAS), then delete
//!                                                     // the bookies' copies after a grace period
//! let reader = store.open_segment(&info).await?;      // one GET: footer + index
//! let batch: Vec<Entry> = reader.read(0, 99, 4 << 20).await?;  // verified, same type as bookies
//! # Ok(()) }
//! ```
//!
//! - Exactly-once upload is the caller's job, through the metadata store: take the ledger by
//!   compare-and-swap, optionally record `writer.key()` as the intended object, upload, then
//!   record the [`SegmentInfo`]. An upload that crashes before `finish` leaves no object (S3
//!   keeps its parts until a lifecycle rule for incomplete multipart uploads removes them). One
//!   that crashes after `finish` but before the metadata commit leaves an unreferenced object:
//!   [`OffloadStore::list_segments`] finds it and [`OffloadStore::delete_segment`] removes it.
//! - A ledger may be split into several segments (a `SegmentInfo` covers `first_entry..=last_entry`);
//!   a segment never has more than [`MAX_PARTS`] parts.
//! - Errors: [`OffloadError::is_retryable`] says whether to back off and retry (store down,
//!   timeouts, 5xx) or to give up (missing or corrupt object, refused credentials, bad request).
//! - Raw throughput of the same store (for benchmarks): [`OffloadStore::object_store`] and
//!   [`OffloadStore::prefix`] give the object_store client and the key prefix, configured with the
//!   same timeouts and retries.

mod config;
mod error;
pub mod format;
mod metrics;
mod reader;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path;

pub use config::{MAX_PART_BYTES, MIN_PART_BYTES, OffloadConfig};
pub use error::OffloadError;
pub use metrics::{OpLabel, StoreMetrics};
pub use reader::{BLOCK_BYTES, SegmentReader};
pub use writer::{MAX_PARTS, SegmentInfo, SegmentWriter};

/// An opened object store with its key prefix and the block cache of its readers. Cheap to clone.
#[derive(Clone)]
pub struct OffloadStore {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
    /// `file://` stores: the directory, fsync'd after each segment (object_store does not).
    local_dir: Option<PathBuf>,
    part_bytes: usize,
    upload_concurrency: usize,
    read_ahead_bytes: u64,
    cache: Option<moka::sync::Cache<reader::BlockKey, Bytes>>,
    metrics: StoreMetrics,
}

impl std::fmt::Debug for OffloadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffloadStore").field("url", &self.inner.url).field("store", &self.inner.store).finish()
    }
}

impl OffloadStore {
    /// Validates the configuration and builds the store client. Makes no request: a wrong
    /// bucket or bad credentials show up at the first operation. A `file://` directory is
    /// created if missing; each `memory://` open is a new, empty store.
    pub fn open(config: &OffloadConfig) -> Result<OffloadStore, OffloadError> {
        Self::open_with_metrics(config, StoreMetrics::default())
    }

    /// [`Self::open`], counting requests in `metrics` (registered by the caller).
    pub fn open_with_metrics(config: &OffloadConfig, metrics: StoreMetrics) -> Result<OffloadStore, OffloadError> {
        let (store, prefix, local_dir) = config.build().map_err(|e| OffloadError::Invalid(e.0))?;
        Ok(Self::from_parts_counted(store, prefix, local_dir, config, metrics))
    }

    /// A store over a given client (a wrapper that counts or fails requests, in tests).
    #[cfg(test)]
    pub(crate) fn from_parts(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        local_dir: Option<PathBuf>,
        config: &OffloadConfig,
    ) -> OffloadStore {
        Self::from_parts_counted(store, prefix, local_dir, config, StoreMetrics::default())
    }

    fn from_parts_counted(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        local_dir: Option<PathBuf>,
        config: &OffloadConfig,
        metrics: StoreMetrics,
    ) -> OffloadStore {
        let store: Arc<dyn ObjectStore> = Arc::new(metrics::Counted::new(store, metrics.clone()));
        OffloadStore {
            inner: Arc::new(Inner {
                store,
                metrics,
                prefix,
                url: config.url.clone(),
                local_dir,
                part_bytes: config.part_bytes.as_u64() as usize,
                upload_concurrency: config.upload_concurrency,
                read_ahead_bytes: config.read_ahead_bytes.as_u64(),
                cache: block_cache(config.cache_bytes.as_u64()),
            }),
        }
    }

    /// A handle on the same store client and objects with a block cache of its own of
    /// `cache_bytes` (0: none), e.g. to measure cold reads.
    pub fn with_cache(&self, cache_bytes: u64) -> OffloadStore {
        let i = &self.inner;
        OffloadStore {
            inner: Arc::new(Inner {
                store: i.store.clone(),
                prefix: i.prefix.clone(),
                url: i.url.clone(),
                local_dir: i.local_dir.clone(),
                part_bytes: i.part_bytes,
                upload_concurrency: i.upload_concurrency,
                read_ahead_bytes: i.read_ahead_bytes,
                cache: block_cache(cache_bytes),
                metrics: i.metrics.clone(),
            }),
        }
    }

    /// Request counters of this store (shared by handles made with [`Self::with_cache`]).
    pub fn metrics(&self) -> &StoreMetrics {
        &self.inner.metrics
    }

    /// The object_store client (for raw GET/PUT measurements and tests); its requests are
    /// counted in [`Self::metrics`] too.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner.store
    }

    /// The key prefix every object of this store goes under (empty for `file://`).
    pub fn prefix(&self) -> &Path {
        &self.inner.prefix
    }

    /// The configured `url`.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The configured `part_bytes`: size of multipart upload parts.
    pub fn part_bytes(&self) -> u64 {
        self.inner.part_bytes as u64
    }

    /// Starts a new segment of `ledger_id` under a fresh key
    /// `<prefix>/ledgers/<ledger_id:020>/<uuid v4>.seg`. Makes no request until data fills a part
    /// or `finish` is called.
    pub fn segment_writer(&self, ledger_id: u64) -> SegmentWriter {
        let name = format!("{}.seg", uuid::Uuid::new_v4());
        SegmentWriter::new(self.clone(), self.ledger_dir(ledger_id).child(name), ledger_id)
    }

    /// Opens a segment for reading: one range GET of its index and footer, checked against `info`.
    pub async fn open_segment(&self, info: &SegmentInfo) -> Result<SegmentReader, OffloadError> {
        SegmentReader::open(self.clone(), info).await
    }

    /// Keys of every segment object of `ledger_id`, in key order (completed uploads only).
    pub async fn list_segments(&self, ledger_id: u64) -> Result<Vec<String>, OffloadError> {
        let dir = self.ledger_dir(ledger_id);
        let mut keys: Vec<String> = self
            .inner
            .store
            .list(Some(&dir))
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .map_err(|e| OffloadError::from_store("list", dir.as_ref(), e))?;
        keys.retain(|k| k.ends_with(".seg"));
        keys.sort();
        Ok(keys)
    }

    /// Deletes a segment object. Deleting a missing one succeeds (retention may run twice).
    pub async fn delete_segment(&self, key: &str) -> Result<(), OffloadError> {
        match self.inner.store.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(OffloadError::from_store("delete", key, e)),
        }
    }

    fn ledger_dir(&self, ledger_id: u64) -> Path {
        self.inner.prefix.child("ledgers").child(format!("{ledger_id:020}"))
    }

    /// For `file://` stores: fsync the object's file and the directories above it up to the
    /// store's root, which object_store's local backend does not do.
    async fn sync_local(&self, path: &Path) -> Result<(), OffloadError> {
        let Some(root) = self.inner.local_dir.clone() else { return Ok(()) };
        let key = path.to_string();
        let file = path.parts().fold(root.clone(), |dir, part| dir.join(part.as_ref()));
        let sync = move || -> std::io::Result<()> {
            std::fs::File::open(&file)?.sync_all()?;
            let mut dir = file.parent();
            while let Some(d) = dir {
                std::fs::File::open(d)?.sync_all()?;
                if d == root {
                    break;
                }
                dir = d.parent();
            }
            Ok(())
        };
        tokio::task::spawn_blocking(sync)
            .await
            .map_err(|e| OffloadError::from_store("fsync", &key, object_store::Error::JoinError { source: e }))?
            .map_err(|e| {
                OffloadError::from_store(
                    "fsync",
                    &key,
                    object_store::Error::Generic { store: "LocalFileSystem", source: Box::new(e) },
                )
            })
    }
}

fn block_cache(cache_bytes: u64) -> Option<moka::sync::Cache<reader::BlockKey, Bytes>> {
    (cache_bytes > 0).then(|| {
        // LRU, not moka's default TinyLFU: read-ahead blocks are new by nature, and a frequency
        // filter would turn them away once the cache is full, leaving readers to fetch again.
        moka::sync::Cache::builder()
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .max_capacity(cache_bytes)
            .weigher(|_: &reader::BlockKey, block: &Bytes| u32::try_from(block.len()).unwrap_or(u32::MAX))
            .build()
    })
}
