//! Request counts of an object store: an [`ObjectStore`] wrapper that counts every request by
//! operation, its failures, and the bytes moved, for Prometheus.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions,
    PutPayload, PutResult, Result, UploadPart,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

/// Counters of one store's requests. Cheap to clone (the counters are shared).
#[derive(Debug, Clone, Default)]
pub struct StoreMetrics {
    /// Requests sent, by operation (`get`, `put`, `multipart_start`, `multipart_part`,
    /// `multipart_complete`, `multipart_abort`, `delete`, `list`, `head`, `copy`). object_store's
    /// own retries are not counted separately.
    pub requests: Family<OpLabel, Counter>,
    /// Requests that failed (after object_store's retries), by operation.
    pub errors: Family<OpLabel, Counter>,
    pub bytes_uploaded: Counter,
    pub bytes_downloaded: Counter,
}

impl StoreMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("offload_store_requests", "Object store requests by operation", self.requests.clone());
        registry.register(
            "offload_store_errors",
            "Object store requests that failed (after retries), by operation",
            self.errors.clone(),
        );
        registry.register(
            "offload_store_uploaded_bytes",
            "Bytes written to the object store",
            self.bytes_uploaded.clone(),
        );
        registry.register(
            "offload_store_downloaded_bytes",
            "Bytes read from the object store",
            self.bytes_downloaded.clone(),
        );
    }

    /// Requests of `op` so far.
    pub fn requests_of(&self, op: &'static str) -> u64 {
        self.requests.get_or_create(&OpLabel { op }).get()
    }

    /// Failed requests of `op` so far.
    pub fn errors_of(&self, op: &'static str) -> u64 {
        self.errors.get_or_create(&OpLabel { op }).get()
    }

    fn count<T>(&self, op: &'static str, result: &Result<T>) {
        self.requests.get_or_create(&OpLabel { op }).inc();
        if result.is_err() {
            self.errors.get_or_create(&OpLabel { op }).inc();
        }
    }
}

/// An object store that counts the requests it passes on.
#[derive(Debug)]
pub(crate) struct Counted {
    inner: Arc<dyn ObjectStore>,
    metrics: StoreMetrics,
}

impl Counted {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>, metrics: StoreMetrics) -> Self {
        Self { inner, metrics }
    }
}

impl fmt::Display for Counted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counted({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Counted {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        let len = payload.content_length() as u64;
        let r = self.inner.put_opts(location, payload, opts).await;
        self.metrics.count("put", &r);
        if r.is_ok() {
            self.metrics.bytes_uploaded.inc_by(len);
        }
        r
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        let r = self.inner.put_multipart_opts(location, opts).await;
        self.metrics.count("multipart_start", &r);
        r.map(|upload| Box::new(CountedUpload { inner: upload, metrics: self.metrics.clone() }) as _)
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let r = self.inner.get_opts(location, options).await;
        self.metrics.count("get", &r);
        if let Ok(g) = &r {
            // The body is streamed after this; count what the response promises.
            self.metrics.bytes_downloaded.inc_by(g.range.end - g.range.start);
        }
        r
    }

    async fn get_range(&self, location: &Path, range: Range<u64>) -> Result<Bytes> {
        let r = self.inner.get_range(location, range).await;
        self.metrics.count("get", &r);
        if let Ok(b) = &r {
            self.metrics.bytes_downloaded.inc_by(b.len() as u64);
        }
        r
    }

    async fn head(&self, location: &Path) -> Result<ObjectMeta> {
        let r = self.inner.head(location).await;
        self.metrics.count("head", &r);
        r
    }

    async fn delete(&self, location: &Path) -> Result<()> {
        let r = self.inner.delete(location).await;
        self.metrics.count("delete", &r);
        r
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        // One request per page; counted as one per listing, failures as they come.
        self.metrics.requests.get_or_create(&OpLabel { op: "list" }).inc();
        let metrics = self.metrics.clone();
        self.inner
            .list(prefix)
            .inspect(move |r| {
                if r.is_err() {
                    metrics.errors.get_or_create(&OpLabel { op: "list" }).inc();
                }
            })
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let r = self.inner.list_with_delimiter(prefix).await;
        self.metrics.count("list", &r);
        r
    }

    async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        let r = self.inner.copy(from, to).await;
        self.metrics.count("copy", &r);
        r
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> Result<()> {
        let r = self.inner.copy_if_not_exists(from, to).await;
        self.metrics.count("copy", &r);
        r
    }
}

#[derive(Debug)]
struct CountedUpload {
    inner: Box<dyn MultipartUpload>,
    metrics: StoreMetrics,
}

#[async_trait]
impl MultipartUpload for CountedUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let len = data.content_length() as u64;
        let part = self.inner.put_part(data);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let r = part.await;
            metrics.count("multipart_part", &r);
            if r.is_ok() {
                metrics.bytes_uploaded.inc_by(len);
            }
            r
        })
    }

    async fn complete(&mut self) -> Result<PutResult> {
        let r = self.inner.complete().await;
        self.metrics.count("multipart_complete", &r);
        r
    }

    async fn abort(&mut self) -> Result<()> {
        let r = self.inner.abort().await;
        self.metrics.count("multipart_abort", &r);
        r
    }
}
