//! `SegmentWriter`: streams one ledger's entries into one new segment object.

use bytes::{Bytes, BytesMut};
use magnetar_common::entry::Entry;
use object_store::path::Path;
use object_store::{MultipartUpload, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use super::format::{self, FOOTER_BYTES, Footer, IndexBuilder, LEN_PREFIX_BYTES};
use super::{OffloadError, OffloadStore};
use crate::config::MAX_ENTRY_BYTES_LIMIT;

/// S3's limit on the parts of one multipart upload.
pub const MAX_PARTS: usize = 10_000;

/// Where a completed segment is and what it holds. Small and serde: it goes into the ledger's
/// metadata, and it is all a [`super::SegmentReader`] needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentInfo {
    /// Full object key, prefix included: `<prefix>/ledgers/<ledger_id:020>/<uuid>.seg`.
    pub key: String,
    pub ledger_id: u64,
    pub first_entry: u64,
    pub last_entry: u64,
    /// Object size in bytes.
    pub size: u64,
    /// Where the index starts; also the number of data bytes (length prefixes plus entries).
    pub index_offset: u64,
}

impl SegmentInfo {
    /// Entries in the segment (they are consecutive).
    pub fn entries(&self) -> u64 {
        self.last_entry - self.first_entry + 1
    }
}

/// Writes consecutive entries of one ledger into a new, uniquely named object.
///
/// Data is buffered into parts of `part_bytes`; the first full part starts a multipart upload,
/// and up to `upload_concurrency` parts upload at once (`append` waits for room). A segment
/// smaller than one part is written by one PUT in [`finish`](Self::finish). Nothing is visible
/// under the key until `finish` returns: an incomplete multipart upload is not an object. On any
/// error, on [`abort`](Self::abort), and on drop without `finish`, the upload is aborted (on drop,
/// by a task spawned on the current tokio runtime). If `append` or `finish` fails or its future
/// is dropped, the writer is unusable: later calls fail with `Invalid`.
#[derive(Debug)]
pub struct SegmentWriter {
    store: OffloadStore,
    path: Path,
    ledger_id: u64,
    buf: BytesMut,
    /// Object offset of the end of `buf`.
    written: u64,
    index: IndexBuilder,
    first_entry: Option<u64>,
    last_entry: u64,
    upload: Option<Box<dyn MultipartUpload>>,
    tasks: JoinSet<object_store::Result<()>>,
    parts: usize,
    /// Set while an async call runs and left set if it fails or is cancelled.
    poisoned: bool,
}

impl SegmentWriter {
    pub(crate) fn new(store: OffloadStore, path: Path, ledger_id: u64) -> SegmentWriter {
        let part_bytes = store.inner.part_bytes;
        SegmentWriter {
            store,
            path,
            ledger_id,
            buf: BytesMut::with_capacity(part_bytes),
            written: 0,
            index: IndexBuilder::default(),
            first_entry: None,
            last_entry: 0,
            upload: None,
            tasks: JoinSet::new(),
            parts: 0,
            poisoned: false,
        }
    }

    /// The object key this writer creates (known before anything is uploaded, so the caller can
    /// record its intent and clean up after a crash).
    pub fn key(&self) -> &str {
        self.path.as_ref()
    }

    /// Bytes of the segment so far (without the index and footer that `finish` adds).
    pub fn bytes(&self) -> u64 {
        self.written
    }

    /// Appends the next entry. The first entry may have any id; each later one must be the next
    /// id of the same ledger. The entry is stored exactly as bookies store it (digest included).
    pub async fn append(&mut self, entry: &Entry) -> Result<(), OffloadError> {
        self.check_usable()?;
        let raw = entry.raw();
        if entry.ledger_id != self.ledger_id {
            return Err(OffloadError::Invalid(format!(
                "segment {} is for ledger {}, not entry {}:{}",
                self.key(),
                self.ledger_id,
                entry.ledger_id,
                entry.entry_id
            )));
        }
        if let Some(first) = self.first_entry
            && entry.entry_id != self.last_entry + 1
        {
            return Err(OffloadError::Invalid(format!(
                "segment {} of ledger {} holds entries {first}..={}; the next must be {}, not {}",
                self.key(),
                self.ledger_id,
                self.last_entry,
                self.last_entry + 1,
                entry.entry_id
            )));
        }
        if raw.len() as u64 > MAX_ENTRY_BYTES_LIMIT {
            return Err(OffloadError::Invalid(format!(
                "entry {}:{} is {} bytes, above the {MAX_ENTRY_BYTES_LIMIT}-byte limit",
                self.ledger_id,
                entry.entry_id,
                raw.len()
            )));
        }
        let part_bytes = self.store.inner.part_bytes;
        let adds_parts = (self.buf.len() + LEN_PREFIX_BYTES + raw.len()) / part_bytes;
        if self.parts + adds_parts >= MAX_PARTS {
            return Err(OffloadError::Invalid(format!(
                "segment {} would exceed {MAX_PARTS} parts of {part_bytes} bytes: finish it and start another",
                self.key()
            )));
        }
        self.poisoned = true;
        // Wait for room before taking the entry, so a cancelled wait changes nothing.
        self.wait_for_parts(self.store.inner.upload_concurrency).await?;
        self.index.add(entry.entry_id, self.written);
        format::put_entry(&mut self.buf, raw);
        self.written += (LEN_PREFIX_BYTES + raw.len()) as u64;
        self.first_entry.get_or_insert(entry.entry_id);
        self.last_entry = entry.entry_id;
        while self.buf.len() >= part_bytes {
            let part = self.buf.split_to(part_bytes).freeze();
            self.put_part(part).await?;
        }
        self.poisoned = false;
        Ok(())
    }

    /// Writes the index and footer, completes the upload and returns the segment's description.
    /// When it returns, the object is durable in the store (S3: the upload is complete; a local
    /// directory: the file and its directories are fsync'd). Fails with `Invalid` if no entry was
    /// appended.
    pub async fn finish(mut self) -> Result<SegmentInfo, OffloadError> {
        self.check_usable()?;
        let Some(first_entry) = self.first_entry else {
            return Err(OffloadError::Invalid(format!("segment {} has no entries", self.key())));
        };
        self.poisoned = true;
        let index = std::mem::take(&mut self.index).finish();
        let footer = Footer {
            ledger_id: self.ledger_id,
            first_entry,
            last_entry: self.last_entry,
            entries: self.last_entry - first_entry + 1,
            index_offset: self.written,
            index_len: index.len() as u64,
            index_crc: crc32c::crc32c(&index),
        };
        self.buf.extend_from_slice(&index);
        footer.encode(&mut self.buf);
        let size = self.written + index.len() as u64 + FOOTER_BYTES as u64;
        let tail = std::mem::take(&mut self.buf).freeze();
        if self.upload.is_none() {
            let store = &self.store.inner.store;
            store.put(&self.path, tail.into()).await.map_err(|e| OffloadError::from_store("put", self.key(), e))?;
        } else {
            if !tail.is_empty() {
                self.put_part(tail).await?;
            }
            self.wait_for_parts(1).await?;
            let Some(mut upload) = self.upload.take() else { return unreachable_state() };
            if let Err(e) = upload.complete().await {
                let error = OffloadError::from_store("complete multipart upload", self.key(), e);
                self.upload = Some(upload);
                self.abort_upload().await;
                return Err(error);
            }
        }
        self.store.sync_local(&self.path).await?;
        self.poisoned = false;
        Ok(SegmentInfo {
            key: self.key().to_owned(),
            ledger_id: self.ledger_id,
            first_entry,
            last_entry: self.last_entry,
            size,
            index_offset: footer.index_offset,
        })
    }

    /// Abandons the segment: stops part uploads and aborts the multipart upload.
    pub async fn abort(mut self) -> Result<(), OffloadError> {
        self.tasks.shutdown().await;
        if let Some(mut upload) = self.upload.take() {
            upload.abort().await.map_err(|e| OffloadError::from_store("abort multipart upload", self.key(), e))?;
        }
        Ok(())
    }

    fn check_usable(&self) -> Result<(), OffloadError> {
        if self.poisoned {
            return Err(OffloadError::Invalid(format!(
                "segment writer for {} failed or was cancelled earlier; abandon it and start again",
                self.key()
            )));
        }
        Ok(())
    }

    /// Starts the upload if needed and starts uploading one part.
    async fn put_part(&mut self, part: Bytes) -> Result<(), OffloadError> {
        if self.upload.is_none() {
            let store = &self.store.inner.store;
            let upload = store
                .put_multipart(&self.path)
                .await
                .map_err(|e| OffloadError::from_store("start multipart upload", self.key(), e))?;
            self.upload = Some(upload);
        }
        let Some(upload) = self.upload.as_mut() else { return unreachable_state() };
        self.tasks.spawn(upload.put_part(PutPayload::from(part)));
        self.parts += 1;
        Ok(())
    }

    /// Waits until fewer than `max_in_flight` parts are uploading; aborts the upload on error.
    async fn wait_for_parts(&mut self, max_in_flight: usize) -> Result<(), OffloadError> {
        while self.tasks.len() >= max_in_flight.max(1) {
            let result = match self.tasks.join_next().await {
                Some(Ok(result)) => result,
                Some(Err(join)) => Err(object_store::Error::JoinError { source: join }),
                None => break,
            };
            if let Err(e) = result {
                let error = OffloadError::from_store("upload part", self.key(), e);
                self.abort_upload().await;
                return Err(error);
            }
        }
        Ok(())
    }

    async fn abort_upload(&mut self) {
        self.tasks.shutdown().await;
        if let Some(mut upload) = self.upload.take()
            && let Err(e) = upload.abort().await
        {
            tracing::warn!(key = self.key(), error = %e, "abort multipart upload (its parts stay until the bucket's lifecycle rule removes them)");
        }
    }
}

impl Drop for SegmentWriter {
    fn drop(&mut self) {
        self.tasks.abort_all();
        let Some(mut upload) = self.upload.take() else { return };
        let key = self.key().to_owned();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(e) = upload.abort().await {
                        tracing::warn!(key, error = %e, "abort dropped multipart upload (its parts stay until the bucket's lifecycle rule removes them)");
                    }
                });
            }
            Err(_) => {
                tracing::warn!(key, "segment writer dropped outside a tokio runtime: multipart upload not aborted")
            }
        }
    }
}

fn unreachable_state<T>() -> Result<T, OffloadError> {
    Err(OffloadError::Invalid("segment writer has no upload after starting one".into()))
}
