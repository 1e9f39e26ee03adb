//! Moving closed ledgers to object storage and reading them back: the upload of one ledger, the
//! deletion of the bookies' copies after the deletion lag, verified reads of offloaded entries,
//! and the deletion of a ledger's objects (retention).
//!
//! **Owns:** the offload state in ledger metadata (`LedgerMetadata::offload`), which it changes
//! only by compare-and-swap: `Uploading` (a claim naming this attempt), then `Offloaded` with the
//! segments, then the time the bookies' copies were deleted. One uploader per ledger: a claim is
//! taken by compare-and-swap and an upload is recorded only if its own claim is still there, so
//! two brokers (an old owner that has not noticed it lost a topic, and the new one) never both
//! record an upload. Objects are written under fresh keys and only become visible complete; a
//! new claim first deletes whatever an interrupted attempt left under the ledger's key prefix.
//!
//! **Never:** decides which ledgers go or when (the topic's policy, `topic.rs`), deletes a
//! bookie copy before the upload is recorded, or blocks appends (uploads run on their own tasks,
//! paced by a broker-wide semaphore and bandwidth limit).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use magnetar_bookie::client::{LedgerClient, LedgerError, LedgerMetadata, LedgerOffload, LedgerReader};
use magnetar_bookie::offload::{OffloadError, OffloadStore, SegmentInfo, SegmentReader};
use magnetar_common::entry::Entry;
use magnetar_common::metadata::{MetadataError, Version};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{info, warn};

use super::ServiceError;
use crate::config::OffloadPolicyConfig;

/// Bytes read from bookies per request while uploading.
const READ_BATCH_BYTES: u64 = 4 * 1024 * 1024;
/// A segment ends once it holds this many parts' worth of data (S3 allows 10,000 parts).
const MAX_PARTS_PER_SEGMENT: u64 = 9_000;
/// Opened segments (their indexes) kept for readers.
const MAX_OPEN_SEGMENTS: u64 = 512;

/// Why an offload step failed.
#[derive(Debug, thiserror::Error)]
pub enum OffloadFailure {
    #[error(transparent)]
    Store(#[from] OffloadError),
    #[error("reading the ledger from bookies: {0}")]
    Ledger(#[from] LedgerError),
    #[error("metadata store: {0}")]
    Metadata(#[from] MetadataError),
    #[error("ledger {0} is not closed")]
    NotClosed(u64),
    #[error("ledger {0}: another uploader claimed it meanwhile; this attempt's objects were deleted")]
    Superseded(u64),
    #[error("ledger {0} is not offloaded")]
    NotOffloaded(u64),
}

impl OffloadFailure {
    /// Whether trying again later may succeed (everything but a store that refuses us).
    pub fn is_retryable(&self) -> bool {
        match self {
            OffloadFailure::Store(e) => e.is_retryable() || matches!(e, OffloadError::NotFound { .. }),
            _ => true,
        }
    }
}

/// Counters of offload work on this broker.
#[derive(Debug, Clone, Default)]
pub struct OffloadCounters {
    pub offloaded_ledgers: Counter,
    pub offloaded_bytes: Counter,
    pub failures: Counter,
    pub bookie_copies_deleted: Counter,
}

/// The broker's offloader: one object store, shared by every topic.
#[derive(Debug)]
pub struct Offloader {
    store: OffloadStore,
    client: LedgerClient,
    /// This broker instance, in claims.
    instance: String,
    config: OffloadPolicyConfig,
    uploads: Arc<Semaphore>,
    /// When the bandwidth limit lets the next byte go.
    next_send: Mutex<Instant>,
    readers: moka::sync::Cache<String, Arc<SegmentReader>>,
    pub counters: OffloadCounters,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Offloader {
    pub fn new(
        store: OffloadStore,
        client: LedgerClient,
        instance: String,
        config: OffloadPolicyConfig,
        counters: OffloadCounters,
    ) -> Self {
        Self {
            uploads: Arc::new(Semaphore::new(config.max_concurrent_uploads.max(1))),
            store,
            client,
            instance,
            config,
            next_send: Mutex::new(Instant::now()),
            readers: moka::sync::Cache::new(MAX_OPEN_SEGMENTS),
            counters,
        }
    }

    pub fn store(&self) -> &OffloadStore {
        &self.store
    }

    pub fn config(&self) -> &OffloadPolicyConfig {
        &self.config
    }

    /// Uploads a closed ledger unless it is offloaded already, and records it in the ledger's
    /// metadata. Returns the recorded state. Waits for an upload slot of this broker first.
    pub async fn offload_ledger(&self, ledger_id: u64) -> Result<LedgerOffload, OffloadFailure> {
        let _slot = self.uploads.acquire().await.map_err(|_| OffloadFailure::NotClosed(ledger_id))?;
        let attempt = format!("{}/{:08x}", self.instance, rand::random::<u32>());
        let md = match self.claim(ledger_id, &attempt).await? {
            Claimed::Done(offload) => return Ok(offload),
            Claimed::Mine(md) => md,
        };
        // Whatever an interrupted attempt left (an object completed but never recorded) goes.
        for key in self.store.list_segments(ledger_id).await? {
            warn!(ledger_id, key, "deleting an object left by an interrupted offload");
            self.store.delete_segment(&key).await?;
        }
        let started = Instant::now();
        let segments = self.upload(&md).await?;
        let offload = match self.commit(ledger_id, &attempt, &segments).await {
            Ok(o) => o,
            Err(e) => {
                self.delete_segments(&segments).await;
                return Err(e);
            }
        };
        let bytes: u64 = segments.iter().map(|s| s.size).sum();
        self.counters.offloaded_ledgers.inc();
        self.counters.offloaded_bytes.inc_by(bytes);
        let secs = started.elapsed().as_secs_f64();
        info!(
            ledger_id,
            bytes,
            segments = segments.len(),
            secs = format!("{secs:.2}"),
            mib_per_sec = format!("{:.1}", bytes as f64 / 1048576.0 / secs.max(1e-6)),
            "ledger offloaded"
        );
        Ok(offload)
    }

    /// Takes the ledger's upload by compare-and-swap, or finds it done.
    async fn claim(&self, ledger_id: u64, attempt: &str) -> Result<Claimed, OffloadFailure> {
        loop {
            let (mut md, version) = self.client.metadata_versioned(ledger_id).await?;
            if !md.is_closed() {
                return Err(OffloadFailure::NotClosed(ledger_id));
            }
            match &md.offload {
                Some(done @ LedgerOffload::Offloaded { .. }) => return Ok(Claimed::Done(done.clone())),
                Some(LedgerOffload::Uploading { owner, .. }) => {
                    info!(ledger_id, previous = %owner, "taking over an offload that did not finish")
                }
                None => {}
            }
            md.offload = Some(LedgerOffload::Uploading { owner: attempt.to_string(), started_at_ms: now_ms() });
            match self.client.update_metadata(&md, version).await {
                Ok(_) => return Ok(Claimed::Mine(md)),
                // Auto-recovery or another uploader changed it: look again.
                Err(MetadataError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Records the uploaded segments if this attempt's claim still stands.
    async fn commit(
        &self,
        ledger_id: u64,
        attempt: &str,
        segments: &[SegmentInfo],
    ) -> Result<LedgerOffload, OffloadFailure> {
        loop {
            let (mut md, version): (LedgerMetadata, Version) = self.client.metadata_versioned(ledger_id).await?;
            match &md.offload {
                Some(LedgerOffload::Uploading { owner, .. }) if owner == attempt => {}
                _ => return Err(OffloadFailure::Superseded(ledger_id)),
            }
            let offload = LedgerOffload::Offloaded {
                store: self.store.url().to_string(),
                segments: segments.to_vec(),
                offloaded_at_ms: now_ms(),
                bookie_copies_deleted_at_ms: None,
            };
            md.offload = Some(offload.clone());
            match self.client.update_metadata(&md, version).await {
                Ok(_) => return Ok(offload),
                Err(MetadataError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Copies the ledger's entries from bookies into one or more segments; on failure nothing
    /// stays in the store.
    async fn upload(&self, md: &LedgerMetadata) -> Result<Vec<SegmentInfo>, OffloadFailure> {
        let ledger_id = md.ledger_id;
        let reader = Arc::new(self.client.open(ledger_id).await?);
        let last = md.last_entry_id.max(0) as u64;
        let entries = last + 1;
        let average = (md.length / entries).max(1);
        let batch = (READ_BATCH_BYTES / average).clamp(1, 10_000);
        let max_segment_bytes = self.store_part_bytes() * MAX_PARTS_PER_SEGMENT;
        let mut done: Vec<SegmentInfo> = Vec::new();
        let result = async {
            let mut writer = self.store.segment_writer(ledger_id);
            let mut in_segment = 0u64;
            // One read ahead: the next batch comes from bookies while this one uploads.
            let mut next = Some(spawn_read(reader.clone(), 0, (batch - 1).min(last)));
            while let Some(pending) = next.take() {
                let (first, end, read) =
                    pending.await.map_err(|e| OffloadFailure::Ledger(LedgerError::Invalid(e.to_string())))?;
                let read = read?;
                if end < last {
                    next = Some(spawn_read(reader.clone(), end + 1, (end + batch).min(last)));
                }
                check_range(ledger_id, first, end, &read)?;
                for entry in &read {
                    if in_segment >= max_segment_bytes {
                        let full = std::mem::replace(&mut writer, self.store.segment_writer(ledger_id));
                        done.push(full.finish().await?);
                        in_segment = 0;
                    }
                    let len = entry.raw().len() as u64;
                    self.pace(len).await;
                    writer.append(entry).await?;
                    in_segment += len;
                }
            }
            done.push(writer.finish().await?);
            Ok::<(), OffloadFailure>(())
        }
        .await;
        match result {
            Ok(()) => Ok(done),
            Err(e) => {
                self.delete_segments(&done).await;
                Err(e)
            }
        }
    }

    fn store_part_bytes(&self) -> u64 {
        self.store.part_bytes()
    }

    /// Waits until the bandwidth limit lets `bytes` more go.
    async fn pace(&self, bytes: u64) {
        let rate = self.config.max_upload_rate.as_u64();
        if rate == 0 {
            return;
        }
        let start = {
            let mut next = self.next_send.lock().unwrap_or_else(|p| p.into_inner());
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
            start
        };
        tokio::time::sleep_until(start).await;
    }

    async fn delete_segments(&self, segments: &[SegmentInfo]) {
        for s in segments {
            self.readers.invalidate(&s.key);
            if let Err(e) = self.store.delete_segment(&s.key).await {
                warn!(key = %s.key, error = %e, "delete segment (left in the store unreferenced)");
            }
        }
    }

    /// Records that the bookies' copies of an offloaded ledger are gone, then deletes them.
    /// Readers follow the metadata: from the record on, they read from the store.
    pub async fn delete_bookie_copies(&self, ledger_id: u64) -> Result<LedgerOffload, OffloadFailure> {
        let md = loop {
            let (mut md, version) = self.client.metadata_versioned(ledger_id).await?;
            match &mut md.offload {
                Some(LedgerOffload::Offloaded { bookie_copies_deleted_at_ms: deleted @ None, .. }) => {
                    *deleted = Some(now_ms());
                }
                Some(done @ LedgerOffload::Offloaded { .. }) => return Ok(done.clone()),
                _ => return Err(OffloadFailure::NotOffloaded(ledger_id)),
            }
            match self.client.update_metadata(&md, version).await {
                Ok(_) => break md,
                Err(MetadataError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let failed = self.client.delete_bookie_copies(&md).await;
        if failed.is_empty() {
            info!(ledger_id, "offloaded ledger deleted from bookies");
        } else {
            warn!(ledger_id, bookies = ?failed, "offloaded ledger: these bookies keep a copy nobody reads");
        }
        self.counters.bookie_copies_deleted.inc();
        md.offload.ok_or(OffloadFailure::NotOffloaded(ledger_id))
    }

    /// Reads entries `first..=last` (at most about `max_bytes`, at least one) of an offloaded
    /// ledger, verified; they may stop at a segment's end.
    pub async fn read(
        &self,
        ledger_id: u64,
        offload: &LedgerOffload,
        first: u64,
        last: u64,
        max_bytes: u64,
    ) -> Result<Vec<Entry>, ServiceError> {
        let LedgerOffload::Offloaded { store, segments, .. } = offload else {
            return Err(ServiceError::Internal(format!("ledger {ledger_id} is not offloaded")));
        };
        if store != self.store.url() {
            return Err(ServiceError::Persistence(format!(
                "ledger {ledger_id} was offloaded to {store}, but this broker's [offload] store is {}",
                self.store.url()
            )));
        }
        let Some(segment) = segments.iter().find(|s| s.first_entry <= first && first <= s.last_entry) else {
            return Err(ServiceError::Persistence(format!(
                "ledger {ledger_id}: no offloaded segment holds entry {first}"
            )));
        };
        let reader = match self.readers.get(&segment.key) {
            Some(r) => r,
            None => {
                let r = Arc::new(self.store.open_segment(segment).await.map_err(read_error)?);
                self.readers.insert(segment.key.clone(), r.clone());
                r
            }
        };
        reader.read(first, last.min(segment.last_entry), max_bytes).await.map_err(read_error)
    }

    /// Deletes an offloaded ledger's objects (retention). Missing objects count as deleted.
    pub async fn delete_objects(&self, offload: &LedgerOffload) -> Result<(), OffloadError> {
        for s in offload.segments().unwrap_or_default() {
            self.readers.invalidate(&s.key);
            self.store.delete_segment(&s.key).await?;
        }
        Ok(())
    }
}

/// Deletes a ledger everywhere: its objects in the store first (if it was offloaded), then its
/// bookie copies and metadata. When the objects cannot be deleted the metadata stays, as the
/// record of what is left in the store. A ledger that does not exist is deleted already.
pub async fn delete_ledger(
    client: &LedgerClient,
    offloader: Option<&Offloader>,
    ledger_id: u64,
) -> Result<(), ServiceError> {
    let md = match client.metadata(ledger_id).await {
        Ok(md) => md,
        Err(LedgerError::NoSuchLedger(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if let Some(offload) = md.offload.as_ref().filter(|o| o.segments().is_some()) {
        let Some(offloader) = offloader else {
            return Err(ServiceError::Unavailable(format!(
                "ledger {ledger_id} has objects in {}, and this broker has no [offload] store configured to delete them",
                match offload {
                    LedgerOffload::Offloaded { store, .. } => store.as_str(),
                    LedgerOffload::Uploading { .. } => "object storage",
                }
            )));
        };
        offloader.delete_objects(offload).await.map_err(|e| {
            ServiceError::Unavailable(format!("delete the objects of offloaded ledger {ledger_id}: {e}"))
        })?;
    }
    match client.delete(ledger_id).await {
        Ok(()) | Err(LedgerError::NoSuchLedger(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

enum Claimed {
    Done(LedgerOffload),
    Mine(LedgerMetadata),
}

type ReadResult = (u64, u64, Result<Vec<Entry>, LedgerError>);

fn spawn_read(reader: Arc<LedgerReader>, first: u64, last: u64) -> tokio::task::JoinHandle<ReadResult> {
    tokio::spawn(async move { (first, last, reader.read(first, last).await) })
}

/// The bookies returned exactly `first..=last`, in order.
fn check_range(ledger_id: u64, first: u64, last: u64, read: &[Entry]) -> Result<(), OffloadFailure> {
    let ok = read.len() as u64 == last - first + 1
        && read.iter().enumerate().all(|(i, e)| e.entry_id == first + i as u64 && e.ledger_id == ledger_id);
    if ok {
        Ok(())
    } else {
        Err(OffloadFailure::Ledger(LedgerError::Invalid(format!(
            "ledger {ledger_id}: asked bookies for entries {first}..={last}, got {} entries",
            read.len()
        ))))
    }
}

/// An object-store read failure as the service reports it: retryable while the store is down.
fn read_error(e: OffloadError) -> ServiceError {
    if e.is_retryable() {
        ServiceError::Unavailable(format!("offloaded data cannot be read now (retrying): {e}"))
    } else {
        ServiceError::Persistence(format!("offloaded data cannot be read: {e}"))
    }
}
