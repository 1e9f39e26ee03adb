//! The metadata store: the small, strongly consistent state a Magnetar cluster shares
//! (bookie registrations, cookies, ledger metadata, topic ledger lists, cursors, ownership leases).
//!
//! One trait, [`MetadataStore`], with two implementations:
//! - [`etcd::EtcdStore`] for clusters (etcd v3 API through the `etcd-client` crate);
//! - [`embedded::EmbeddedStore`] for one process (`magnetar standalone`, tests): durable on local
//!   disk through `redb`; a completed write survives `kill -9`.
//!
//! Keys are `/`-separated strings; values are opaque bytes (callers store JSON). Every key carries a
//! version that changes on each write, so callers update with compare-and-swap. This module never
//! interprets values and never retries on behalf of callers: a conflict is reported, not resolved.

pub mod embedded;
pub mod etcd;
mod lease;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

pub use lease::{LeaseKeeper, LeaseState};

/// Version of a key as seen by the store. `0` never names a stored key.
pub type Version = u64;

/// Identifier of a lease granted by the store.
pub type LeaseId = i64;

/// A key with its value and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    pub version: Version,
}

/// A value with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Bytes,
    pub version: Version,
}

/// When a put may happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutCondition {
    /// Unconditionally.
    Any,
    /// Only if the key does not exist (create-if-absent).
    Absent,
    /// Only if the key exists with exactly this version (compare-and-swap).
    Version(Version),
}

/// Options of a put.
#[derive(Debug, Clone, Copy)]
pub struct PutOptions {
    pub condition: PutCondition,
    /// Attach the key to a lease: it is deleted when the lease expires or is revoked.
    pub lease: Option<LeaseId>,
}

impl PutOptions {
    pub fn any() -> Self {
        Self { condition: PutCondition::Any, lease: None }
    }
    pub fn absent() -> Self {
        Self { condition: PutCondition::Absent, lease: None }
    }
    pub fn version(v: Version) -> Self {
        Self { condition: PutCondition::Version(v), lease: None }
    }
    pub fn with_lease(mut self, lease: LeaseId) -> Self {
        self.lease = Some(lease);
        self
    }
}

/// A change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String },
}

/// A watch on a prefix: the state when the watch started, then every change after it, in order.
///
/// When the channel closes (the store lost its connection, or was dropped) the watcher must
/// list and watch again; no event between `initial` and the first event is ever missed.
#[derive(Debug)]
pub struct Watch {
    pub initial: Vec<KeyValue>,
    pub events: mpsc::Receiver<WatchEvent>,
}

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// A conditional write or delete found another version (or found the key present when it had
    /// to be absent, or absent when a version was expected).
    #[error("conflict on key {key}: it changed since it was read")]
    Conflict { key: String },
    /// The lease does not exist (expired or revoked).
    #[error("lease {0} has expired or was revoked")]
    LeaseExpired(LeaseId),
    /// The store cannot be reached or did not answer in time; retrying later may succeed.
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    /// A bad argument (empty key, bad URL, ...).
    #[error("invalid metadata request: {0}")]
    Invalid(String),
    /// Local storage of the embedded store failed.
    #[error("metadata storage error: {0}")]
    Storage(String),
}

pub type Result<T, E = MetadataError> = std::result::Result<T, E>;

/// Longest key either store accepts, in bytes.
pub const MAX_KEY_BYTES: usize = 4 * 1024;
/// Largest value either store accepts, in bytes (etcd's default request limit is 1.5 MiB).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

/// Checks a key given to `get`, `put` or `delete`: non-empty and at most [`MAX_KEY_BYTES`].
pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(MetadataError::Invalid("key must not be empty".into()));
    }
    check_prefix(key)
}

/// Checks a prefix given to `list` or `watch`: at most [`MAX_KEY_BYTES`] (empty means all keys).
pub(crate) fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.len() > MAX_KEY_BYTES {
        return Err(MetadataError::Invalid(format!(
            "key of {} bytes exceeds the limit of {MAX_KEY_BYTES} bytes",
            prefix.len()
        )));
    }
    Ok(())
}

/// Longest lease either store grants.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Checks a lease time-to-live: more than zero and at most [`MAX_LEASE_TTL`].
pub(crate) fn check_lease_ttl(ttl: Duration) -> Result<()> {
    if ttl.is_zero() || ttl > MAX_LEASE_TTL {
        return Err(MetadataError::Invalid(format!(
            "lease ttl {ttl:?} must be more than zero and at most {MAX_LEASE_TTL:?}"
        )));
    }
    Ok(())
}

/// Checks a value given to `put`: at most [`MAX_VALUE_BYTES`].
pub(crate) fn check_value(value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(MetadataError::Invalid(format!(
            "value of {} bytes exceeds the limit of {MAX_VALUE_BYTES} bytes",
            value.len()
        )));
    }
    Ok(())
}

/// The metadata-store contract. Implementations are linearizable for single-key operations.
#[async_trait]
pub trait MetadataStore: Send + Sync + Debug + 'static {
    /// Reads a key.
    async fn get(&self, key: &str) -> Result<Option<Versioned>>;
    /// Writes a key if the condition holds; returns the new version. A failed condition is
    /// [`MetadataError::Conflict`]; an unknown lease is [`MetadataError::LeaseExpired`].
    async fn put(&self, key: &str, value: Bytes, options: PutOptions) -> Result<Version>;
    /// Deletes a key, only if it has `expected` version when given. Returns whether a key was
    /// deleted; a version mismatch (or a missing key when a version is expected) is a conflict.
    async fn delete(&self, key: &str, expected: Option<Version>) -> Result<bool>;
    /// Every key starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>>;
    /// Watches every key starting with `prefix`.
    async fn watch(&self, prefix: &str) -> Result<Watch>;
    /// Grants a lease that expires `ttl` after its last renewal.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;
    /// Renews a lease once. [`MetadataError::LeaseExpired`] if it no longer exists.
    async fn renew_lease(&self, lease: LeaseId) -> Result<()>;
    /// Revokes a lease at once, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;
}

/// Shared handle to a metadata store.
pub type SharedStore = Arc<dyn MetadataStore>;

/// Where a metadata URL points, parsed without connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// etcd endpoints (`http://host:port`) and the key root (`/magnetar` by default; empty for none).
    Etcd { endpoints: Vec<String>, root: String },
    /// The embedded store's directory.
    Embedded { dir: std::path::PathBuf },
}

/// Parses a metadata URL (see [`connect`]) and checks its form: every etcd endpoint must be
/// `host:port` with a port from 1 to 65535. [`MetadataError::Invalid`] names what is wrong.
pub fn parse_url(url: &str) -> Result<StoreUrl> {
    if let Some(rest) = url.strip_prefix("etcd://") {
        let (hosts, root) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/magnetar"),
        };
        let mut endpoints = Vec::new();
        for host in hosts.split(',').filter(|h| !h.is_empty()) {
            if let Err(why) = crate::addr::HostPort::parse(host, None) {
                return Err(MetadataError::Invalid(format!(
                    "metadata URL {url:?}: etcd endpoint {host:?} must be host:port (etcd listens on 2379 by default): {why}"
                )));
            }
            endpoints.push(format!("http://{host}"));
        }
        if endpoints.is_empty() {
            return Err(MetadataError::Invalid(format!(
                "metadata URL {url:?} names no etcd endpoint (expected etcd://host:port[,host:port]/root)"
            )));
        }
        let root = if root == "/" { "" } else { root.trim_end_matches('/') };
        Ok(StoreUrl::Etcd { endpoints, root: root.to_owned() })
    } else if let Some(rest) = url.strip_prefix("embedded:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if path.is_empty() {
            return Err(MetadataError::Invalid(format!("metadata URL {url:?} names no directory")));
        }
        Ok(StoreUrl::Embedded { dir: std::path::PathBuf::from(path) })
    } else {
        Err(MetadataError::Invalid(format!("metadata URL {url:?} must start with etcd:// or embedded:")))
    }
}

/// Opens a store from a URL:
/// - `etcd://host:port[,host:port...][/root]`: etcd, keys placed under `/root` (default `/magnetar`);
/// - `embedded:///absolute/dir` or `embedded:relative/dir`: the embedded durable store in `dir`.
pub async fn connect(url: &str) -> Result<SharedStore> {
    match parse_url(url)? {
        StoreUrl::Etcd { endpoints, root } => Ok(Arc::new(etcd::EtcdStore::connect(&endpoints, &root).await?)),
        StoreUrl::Embedded { dir } => {
            // Opening reads and may repair the database file: keep it off the async workers.
            let store = tokio::task::spawn_blocking(move || embedded::EmbeddedStore::open(&dir))
                .await
                .map_err(|e| MetadataError::Storage(format!("open embedded store: {e}")))??;
            Ok(Arc::new(store))
        }
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod conformance;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_urls_parse_and_bad_ones_say_why() {
        let etcd = |e: &[&str], root: &str| StoreUrl::Etcd {
            endpoints: e.iter().map(|h| format!("http://{h}")).collect(),
            root: root.into(),
        };
        assert_eq!(parse_url("etcd://127.0.0.1:2379").expect("ok"), etcd(&["127.0.0.1:2379"], "/magnetar"));
        assert_eq!(parse_url("etcd://a:1,[::1]:2379/m/").expect("ok"), etcd(&["a:1", "[::1]:2379"], "/m"));
        assert_eq!(parse_url("etcd://a:1/").expect("ok"), etcd(&["a:1"], ""));
        assert_eq!(
            parse_url("embedded:///tmp/m").expect("ok"),
            StoreUrl::Embedded { dir: std::path::PathBuf::from("/tmp/m") }
        );
        for (url, says) in [
            ("etcd:///magnetar", "names no etcd endpoint"),
            ("etcd://127.0.0.1:abc/m", "\"127.0.0.1:abc\" must be host:port"),
            ("etcd://127.0.0.1/m", "\"127.0.0.1\" must be host:port"),
            ("etcd://a:2379,b:0/m", "\"b:0\" must be host:port"),
            ("etcd://:2379/m", "\":2379\" must be host:port"),
            ("embedded:", "names no directory"),
            ("zk://127.0.0.1:2181", "must start with etcd:// or embedded:"),
        ] {
            let err = parse_url(url).expect_err(url).to_string();
            assert!(err.contains(says), "{url}: {err}");
        }
    }
}
