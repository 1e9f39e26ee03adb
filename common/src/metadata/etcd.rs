//! The etcd metadata store: the [`MetadataStore`] contract on etcd's v3 API (etcd 3.4 and later).
//!
//! This module owns the mapping from the contract to etcd requests and nothing else: etcd itself
//! keeps the data durable (a write is acknowledged once committed by a quorum of etcd members).
//!
//! - Keys live under a root (`/magnetar` by default): `root + key` in etcd, `key` for callers.
//! - The version of a key is its etcd `mod_revision`. Conditional writes and deletes are one
//!   transaction comparing `create_revision == 0` (absent) or `mod_revision == version`.
//! - A watch reads the prefix at some revision R, then asks etcd for every event from R + 1, so
//!   nothing between the snapshot and the events is missed or repeated. Its channel closes when
//!   the etcd watch stream ends or fails.
//! - Every request carries a timeout ([`REQUEST_TIMEOUT`]); a dead or paused etcd gives
//!   [`MetadataError::Unavailable`], never a hang. This module never retries.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, ResponseHeader, SortOrder, SortTarget, Txn,
    TxnOp, WatchOptions, WatchResponse, WatchStream,
};
use tokio::sync::mpsc;
use tonic::Code;

use super::{
    KeyValue, LeaseId, MAX_KEY_BYTES, MAX_VALUE_BYTES, MetadataError, MetadataStore, PutCondition, PutOptions, Result,
    Version, Versioned, Watch, WatchEvent, check_key, check_lease_ttl, check_prefix, check_value,
};

/// Longest wait for the answer to any one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a connection to an endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on open streams notice a dead or paused etcd under a watch. etcd sends GOAWAY to
/// clients pinging more often than its `--grpc-keepalive-min-time` (5 s by default), or pinging
/// with no stream open, hence the interval and no pings while idle.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Events buffered per watch before the forwarding task waits for the consumer.
const WATCH_CHANNEL_CAPACITY: usize = 1024;
/// Keys read per range request while listing.
const LIST_PAGE_KEYS: i64 = 128;
/// Largest response accepted: a full page of the largest keys and values, plus headroom.
const MAX_RESPONSE_BYTES: usize = LIST_PAGE_KEYS as usize * (MAX_KEY_BYTES + MAX_VALUE_BYTES) + 1024 * 1024;

/// A [`MetadataStore`] on an etcd cluster. See the module docs.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
    root: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`http://host:port`) and checks that it answers. Keys are
    /// stored under `root` (e.g. `/magnetar`; empty for none).
    pub async fn connect(endpoints: &[String], root: &str) -> Result<EtcdStore> {
        if endpoints.is_empty() {
            return Err(MetadataError::Invalid("no etcd endpoint given".into()));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
            .with_keep_alive_while_idle(false);
        // Name the endpoints: the transport's errors name at most the last address it tried.
        let at = |e: MetadataError| match e {
            MetadataError::Unavailable(m) => {
                MetadataError::Unavailable(format!("etcd at {}: {m}", endpoints.join(", ")))
            }
            MetadataError::Invalid(m) => MetadataError::Invalid(format!("etcd at {}: {m}", endpoints.join(", "))),
            other => other,
        };
        let client = request("connect to etcd", None, Client::connect(endpoints, Some(options))).await.map_err(at)?;
        let store = EtcdStore { client, endpoints: endpoints.to_vec(), root: root.to_owned() };
        let mut maintenance = store.client.maintenance_client();
        request("reach etcd", None, maintenance.status()).await.map_err(at)?;
        tracing::info!(endpoints = ?store.endpoints, root = %store.root, "connected to etcd");
        Ok(store)
    }

    fn full_key(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.root).into_bytes()
    }

    fn kv(&self) -> etcd_client::KvClient {
        self.client.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// The `[start, end)` range of every key under `prefix`.
    fn prefix_range(&self, prefix: &str) -> (Vec<u8>, Vec<u8>) {
        let start = self.full_key(prefix);
        if start.is_empty() {
            // Every key: etcd reads an end of "\0" as "to the last key".
            return (vec![0], vec![0]);
        }
        let end = prefix_end(&start);
        (start, end)
    }

    /// Every key under `prefix` as of one revision, which is returned too.
    async fn list_at_revision(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        let (mut from, end) = self.prefix_range(prefix);
        let mut kv = self.kv();
        let mut out = Vec::new();
        let mut revision = 0;
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE_KEYS)
                .with_sort(SortTarget::Key, SortOrder::Ascend);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let response = request("list keys", None, kv.get(from.clone(), Some(options))).await?;
            if revision == 0 {
                revision = response.header().map_or(0, |h| h.revision());
                if revision <= 0 {
                    return Err(MetadataError::Unavailable("etcd answered a range without a revision".into()));
                }
            }
            out.extend(response.kvs().iter().filter_map(|kv| to_key_value(&self.root, kv)));
            match response.kvs().last() {
                Some(last) if response.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok((out, revision))
    }
}

/// The smallest key after every key that starts with `prefix` (etcd's prefix range end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Sends one request with [`REQUEST_TIMEOUT`] and maps its error.
async fn request<T>(
    what: &'static str,
    lease: Option<LeaseId>,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(map_error(what, lease, e)),
        Err(_) => Err(MetadataError::Unavailable(format!("{what}: etcd did not answer within {REQUEST_TIMEOUT:?}"))),
    }
}

/// Maps an etcd-client error. "lease not found" is [`MetadataError::LeaseExpired`] when the
/// request named a lease; a rejected argument is [`MetadataError::Invalid`]; anything else
/// (connection, timeout, no leader, compaction, ...) may pass and is `Unavailable`.
fn map_error(what: &str, lease: Option<LeaseId>, error: etcd_client::Error) -> MetadataError {
    use etcd_client::Error as E;
    let lease_gone = |message: &str| message.contains("lease not found");
    match (&error, lease) {
        (E::GRpcStatus(status), Some(id)) if status.code() == Code::NotFound && lease_gone(status.message()) => {
            MetadataError::LeaseExpired(id)
        }
        (E::LeaseKeepAliveError(message), Some(id)) if lease_gone(message) => MetadataError::LeaseExpired(id),
        (E::GRpcStatus(status), _) if status.code() == Code::InvalidArgument => {
            MetadataError::Invalid(format!("{what}: {}", status.message()))
        }
        (E::InvalidArgs(_) | E::InvalidUri(_), _) => MetadataError::Invalid(format!("{what}: {error}")),
        _ => MetadataError::Unavailable(format!("{what}: {error}")),
    }
}

fn header_revision(header: Option<&ResponseHeader>) -> Result<Version> {
    let header = header.ok_or_else(|| MetadataError::Unavailable("etcd answered without a header".into()))?;
    Version::try_from(header.revision())
        .map_err(|_| MetadataError::Unavailable(format!("etcd answered revision {}", header.revision())))
}

/// An etcd revision as a [`Version`]; etcd revisions of stored keys are always positive.
fn to_version(revision: i64) -> Version {
    Version::try_from(revision).unwrap_or_default()
}

/// A [`Version`] for comparing with `mod_revision`; `None` for versions no key can have.
fn to_revision(version: Version) -> Option<i64> {
    i64::try_from(version).ok().filter(|r| *r > 0)
}

/// The caller's name of an etcd key; `None` (logged) for keys outside the root or not UTF-8,
/// which this store never writes.
fn strip_root(root: &str, key: &[u8]) -> Option<String> {
    let stripped = std::str::from_utf8(key).ok().and_then(|k| k.strip_prefix(root));
    if stripped.is_none() {
        tracing::warn!(key = %String::from_utf8_lossy(key), root, "skipping a foreign etcd key");
    }
    stripped.map(str::to_owned)
}

fn to_key_value(root: &str, kv: &etcd_client::KeyValue) -> Option<KeyValue> {
    Some(KeyValue {
        key: strip_root(root, kv.key())?,
        value: Bytes::copy_from_slice(kv.value()),
        version: to_version(kv.mod_revision()),
    })
}

/// Forwards the events of one etcd watch to `events` until the watch ends or fails, or the
/// receiver is dropped. Returning drops the stream (cancelling the watch) and closes `events`.
async fn forward_watch(mut stream: WatchStream, first: WatchResponse, root: String, events: mpsc::Sender<WatchEvent>) {
    let mut next = Some(first);
    loop {
        let response = match next.take() {
            Some(response) => response,
            None => tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(response)) => response,
                    Ok(None) => {
                        tracing::debug!(root, "etcd watch stream ended");
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(%error, root, "etcd watch failed; closing the watch");
                        return;
                    }
                },
                () = events.closed() => return,
            },
        };
        if response.canceled() {
            tracing::warn!(reason = response.cancel_reason(), root, "etcd cancelled a watch");
            return;
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let Some(key) = strip_root(&root, kv.key()) else {
                continue;
            };
            let event = match event.event_type() {
                EventType::Put => WatchEvent::Put(KeyValue {
                    key,
                    value: Bytes::copy_from_slice(kv.value()),
                    version: to_version(kv.mod_revision()),
                }),
                EventType::Delete => WatchEvent::Delete { key },
            };
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}

#[async_trait]
impl MetadataStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        check_key(key)?;
        let response = request("get key", None, self.kv().get(self.full_key(key), None)).await?;
        Ok(response
            .kvs()
            .first()
            .map(|kv| Versioned { value: Bytes::copy_from_slice(kv.value()), version: to_version(kv.mod_revision()) }))
    }

    async fn put(&self, key: &str, value: Bytes, options: PutOptions) -> Result<Version> {
        check_key(key)?;
        check_value(&value)?;
        let full = self.full_key(key);
        let compare = match options.condition {
            PutCondition::Any => vec![],
            PutCondition::Absent => {
                vec![Compare::create_revision(full.clone(), CompareOp::Equal, 0)]
            }
            PutCondition::Version(version) => match to_revision(version) {
                Some(r) => vec![Compare::mod_revision(full.clone(), CompareOp::Equal, r)],
                None => {
                    return Err(MetadataError::Conflict { key: key.to_owned() });
                }
            },
        };
        let mut put = etcd_client::PutOptions::new();
        if let Some(lease) = options.lease {
            put = put.with_lease(lease);
        }
        let txn = Txn::new().when(compare).and_then(vec![TxnOp::put(full, value.to_vec(), Some(put))]);
        let response = request("put key", options.lease, self.kv().txn(txn)).await?;
        if !response.succeeded() {
            return Err(MetadataError::Conflict { key: key.to_owned() });
        }
        header_revision(response.header())
    }

    async fn delete(&self, key: &str, expected: Option<Version>) -> Result<bool> {
        check_key(key)?;
        let full = self.full_key(key);
        let Some(expected) = expected else {
            let response = request("delete key", None, self.kv().delete(full, None)).await?;
            return Ok(response.deleted() > 0);
        };
        let Some(revision) = to_revision(expected) else {
            return Err(MetadataError::Conflict { key: key.to_owned() });
        };
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(full.clone(), CompareOp::Equal, revision)])
            .and_then(vec![TxnOp::delete(full, None)]);
        let response = request("delete key", None, self.kv().txn(txn)).await?;
        if !response.succeeded() {
            return Err(MetadataError::Conflict { key: key.to_owned() });
        }
        Ok(true)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        check_prefix(prefix)?;
        Ok(self.list_at_revision(prefix).await?.0)
    }

    async fn watch(&self, prefix: &str) -> Result<Watch> {
        check_prefix(prefix)?;
        let (initial, revision) = self.list_at_revision(prefix).await?;
        let (start, end) = self.prefix_range(prefix);
        let options = WatchOptions::new().with_range(end).with_start_revision(revision + 1);
        let mut client = self.client.watch_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
        let mut stream = request("start watch", None, client.watch(start, Some(options))).await?;
        let first = request("start watch", None, stream.message())
            .await?
            .ok_or_else(|| MetadataError::Unavailable("etcd closed a new watch".into()))?;
        if first.canceled() {
            return Err(MetadataError::Unavailable(format!(
                "etcd refused a watch from revision {}: {}",
                revision + 1,
                first.cancel_reason()
            )));
        }
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        tokio::spawn(forward_watch(stream, first, self.root.clone(), tx));
        Ok(Watch { initial, events: rx })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        check_lease_ttl(ttl)?;
        // etcd counts whole seconds: round up so the lease lives at least `ttl`.
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let seconds = i64::try_from(seconds.max(1))
            .map_err(|_| MetadataError::Invalid(format!("lease ttl {ttl:?} is too long")))?;
        let mut lease = self.client.lease_client();
        let response = request("grant lease", None, lease.grant(seconds, None)).await?;
        if !response.error().is_empty() {
            return Err(MetadataError::Unavailable(format!("grant lease: {}", response.error())));
        }
        Ok(response.id())
    }

    async fn renew_lease(&self, id: LeaseId) -> Result<()> {
        // One round trip on a fresh keep-alive stream; etcd-client reports a TTL <= 0 (the lease
        // is gone) as "lease not found".
        let mut lease = self.client.lease_client();
        request("renew lease", Some(id), lease.keep_alive(id)).await?;
        Ok(())
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<()> {
        let mut lease = self.client.lease_client();
        request("revoke lease", Some(id), lease.revoke(id)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
    }

    #[test]
    fn versions_that_no_key_can_have_are_not_revisions() {
        assert_eq!(to_revision(0), None);
        assert_eq!(to_revision(u64::MAX), None);
        assert_eq!(to_revision(7), Some(7));
    }
}
