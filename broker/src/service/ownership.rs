//! Which broker serves which topic: broker registrations, bundles and their owners, all held by
//! leases in the metadata store.
//!
//! - Each broker registers `/brokers/<id>` (its URLs) under its lease.
//! - A namespace's topics are grouped into bundles: equal hash ranges of the 32-bit CRC32C of the
//!   full topic name. A bundle is owned by one broker through `/bundles/<tenant>/<ns>/<range>`,
//!   attached to that broker's lease, so it vanishes when the broker stops renewing.
//! - Placement: a lookup of an unowned bundle assigns it to the live broker owning the fewest
//!   bundles (ties broken by a hash of the bundle, so equal brokers share the work), by writing
//!   the ownership key create-if-absent under the chosen broker's lease. The first writer wins;
//!   the others read the winner.
//! - A broker serves a topic only while its lease is certainly valid: [`Ownership::serving_until`]
//!   is checked by the service's guard, which drops every topic before the store can expire the
//!   lease; the next owner fences the ledgers (see the managed ledger), so even a paused broker
//!   that wakes up late cannot add to them.
//!
//! Must never: claim a bundle for a broker whose lease is gone, or serve a bundle whose key names
//! another broker or another lease.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use magnetar_common::metadata::{LeaseId, LeaseKeeper, LeaseState, MetadataError, PutOptions, SharedStore, Version};
use magnetar_common::topic::TopicName;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::ServiceError;

pub const BROKERS_PREFIX: &str = "/brokers/";
pub const BUNDLES_PREFIX: &str = "/bundles/";

/// What a broker registers, and what a bundle's ownership key names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerInfo {
    /// The advertised QUIC `host:port`: unique among live brokers.
    pub broker_id: String,
    /// `quic://host:port`
    pub broker_url: String,
    /// `http://host:port`
    pub http_url: String,
    /// The lease the registration (and the broker's bundles) live under.
    pub lease: LeaseId,
    #[serde(default)]
    pub started_at_ms: u64,
}

/// A hash range `[start, end]` of a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BundleRange {
    pub start: u32,
    pub end: u32,
}

impl BundleRange {
    /// The range of `hash` when the namespace has `bundles` equal ranges.
    pub fn of(hash: u32, bundles: u32) -> Self {
        let bundles = u64::from(bundles.max(1));
        let width = (1u64 << 32) / bundles;
        let i = (u64::from(hash) / width).min(bundles - 1);
        Self::nth(i as u32, bundles as u32)
    }

    /// The `i`-th of `bundles` equal ranges (the last one takes the remainder).
    pub fn nth(i: u32, bundles: u32) -> Self {
        let bundles = u64::from(bundles.max(1));
        let width = (1u64 << 32) / bundles;
        let start = u64::from(i) * width;
        let end = if u64::from(i) + 1 == bundles { u64::from(u32::MAX) } else { start + width - 1 };
        Self { start: start as u32, end: end as u32 }
    }
}

impl std::fmt::Display for BundleRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0x{:08x}_0x{:08x}", self.start, self.end)
    }
}

/// A bundle: a namespace and one of its ranges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bundle {
    pub tenant: String,
    pub namespace: String,
    pub range: BundleRange,
}

impl Bundle {
    pub fn of(topic: &TopicName, bundles: u32) -> Self {
        Self {
            tenant: topic.tenant().to_string(),
            namespace: topic.namespace().to_string(),
            range: BundleRange::of(topic_hash(topic), bundles),
        }
    }

    pub fn key(&self) -> String {
        format!("{BUNDLES_PREFIX}{}/{}/{}", self.tenant, self.namespace, self.range)
    }
}

impl std::fmt::Display for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.tenant, self.namespace, self.range)
    }
}

/// Where a topic falls in its namespace's hash space.
pub fn topic_hash(topic: &TopicName) -> u32 {
    crc32c::crc32c(topic.to_string().as_bytes())
}

/// What this broker is doing with its bundles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Registered under a lease; serves the bundles it owns.
    Serving { lease: LeaseId },
    /// The lease is in doubt or lost: serves nothing until it is renewed or replaced.
    Suspended,
    /// Shutting down: serves nothing new and is assigned nothing.
    Draining,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T, ServiceError> {
    serde_json::from_slice(value).map_err(|e| ServiceError::Internal(format!("{key} is unreadable: {e}")))
}

/// This broker's registration and the bundles it owns.
#[derive(Debug)]
pub struct Ownership {
    store: SharedStore,
    lease_ttl: Duration,
    /// Set once, by [`Self::register`]: (broker id, broker URL, HTTP URL).
    addresses: std::sync::OnceLock<(String, String, String)>,
    keeper: Mutex<Option<LeaseKeeper>>,
    phase: watch::Sender<Phase>,
    /// Bundles this broker checked it owns, under the lease of the current phase.
    owned: Mutex<HashMap<Bundle, LeaseId>>,
}

impl Ownership {
    pub fn new(store: SharedStore, lease_ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            store,
            lease_ttl,
            addresses: std::sync::OnceLock::new(),
            keeper: Mutex::new(None),
            phase: watch::Sender::new(Phase::Suspended),
            owned: Mutex::new(HashMap::new()),
        })
    }

    /// This broker's id (its advertised QUIC `host:port`); empty before it registered.
    pub fn broker_id(&self) -> &str {
        self.addresses.get().map_or("", |a| a.0.as_str())
    }

    pub fn broker_url(&self) -> &str {
        self.addresses.get().map_or("", |a| a.1.as_str())
    }

    pub fn http_url(&self) -> &str {
        self.addresses.get().map_or("", |a| a.2.as_str())
    }

    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn watch_phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    fn info(&self, lease: LeaseId) -> BrokerInfo {
        BrokerInfo {
            broker_id: self.broker_id().to_string(),
            broker_url: self.broker_url().to_string(),
            http_url: self.http_url().to_string(),
            lease,
            started_at_ms: now_ms(),
        }
    }

    /// Sets the advertised addresses (`host:port`, QUIC and HTTP) once, before registering.
    pub fn set_addresses(&self, quic: &str, http: &str) {
        let _ = self.addresses.set((quic.to_string(), format!("quic://{quic}"), format!("http://{http}")));
    }

    /// Grants a lease and registers this broker under it. A registration of the same id left by
    /// a previous run (its lease not yet expired) is waited out, up to twice the lease ttl;
    /// another live broker with the same id is an error.
    pub async fn register(&self) -> Result<watch::Receiver<LeaseState>, ServiceError> {
        let key = format!("{BROKERS_PREFIX}{}", self.broker_id());
        let deadline = Instant::now() + self.lease_ttl * 2 + Duration::from_secs(1);
        let keeper = LeaseKeeper::start(self.store.clone(), self.lease_ttl).await?;
        let lease = keeper.lease_id();
        let value =
            Bytes::from(serde_json::to_vec(&self.info(lease)).map_err(|e| ServiceError::Internal(e.to_string()))?);
        loop {
            match self.store.put(&key, value.clone(), PutOptions::absent().with_lease(lease)).await {
                Ok(_) => break,
                Err(MetadataError::Conflict { .. }) if Instant::now() < deadline => {
                    info!(broker = %self.broker_id(), "a registration of this broker id is still alive; waiting for it to expire");
                    tokio::time::sleep(self.lease_ttl / 4).await;
                }
                Err(MetadataError::Conflict { .. }) => {
                    let _ = keeper.revoke().await;
                    return Err(ServiceError::Conflict(format!(
                        "another live broker is registered as {} (advertised_addr must be unique)",
                        self.broker_id()
                    )));
                }
                Err(e) => {
                    let _ = keeper.revoke().await;
                    return Err(e.into());
                }
            }
        }
        let state = keeper.state();
        self.owned.lock().unwrap_or_else(|p| p.into_inner()).clear();
        *self.keeper.lock().unwrap_or_else(|p| p.into_inner()) = Some(keeper);
        self.phase.send_replace(Phase::Serving { lease });
        info!(broker = %self.broker_id(), lease, "broker registered");
        Ok(state)
    }

    /// Stops serving (lease in doubt or lost): forgets every owned bundle. The lease keeper keeps
    /// trying to renew; [`Self::resume`] serves again if it succeeds.
    pub fn suspend(&self) {
        if matches!(self.phase(), Phase::Serving { .. }) {
            self.phase.send_replace(Phase::Suspended);
        }
        self.owned.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Serves again under the same lease, renewed after a suspension: bundles whose keys survived
    /// are owned again (checked against the store on first use).
    pub fn resume(&self, lease: LeaseId) {
        if self.phase() == Phase::Suspended {
            self.phase.send_replace(Phase::Serving { lease });
            info!(broker = %self.broker_id(), lease, "lease renewed again; serving");
        }
    }

    /// The lease this broker holds, if any.
    pub fn current_lease(&self) -> Option<LeaseId> {
        self.keeper.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|k| k.lease_id())
    }

    /// Drops the lease keeper of a lost lease (its keys are gone).
    pub fn forget_lease(&self) {
        self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Clean shutdown, first step: serve nothing new, and be assigned nothing.
    pub fn drain(&self) {
        self.phase.send_replace(Phase::Draining);
        self.owned.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Clean shutdown, last step: revokes the lease, deleting the registration and every bundle
    /// key at once, so other brokers take the bundles without waiting for expiry.
    pub async fn release(&self) {
        let keeper = self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(k) = keeper {
            let lease = k.lease_id();
            match k.revoke().await {
                Ok(()) => info!(broker = %self.broker_id(), lease, "lease revoked: bundles released"),
                Err(e) => {
                    warn!(broker = %self.broker_id(), lease, error = %e, "revoke lease; the bundles move when it expires")
                }
            }
        }
    }

    /// Live brokers, by id.
    pub async fn brokers(&self) -> Result<Vec<BrokerInfo>, ServiceError> {
        let mut out = Vec::new();
        for kv in self.store.list(BROKERS_PREFIX).await? {
            match decode::<BrokerInfo>(&kv.key, &kv.value) {
                Ok(b) => out.push(b),
                Err(e) => warn!(error = %e, "skipping unreadable broker registration"),
            }
        }
        Ok(out)
    }

    /// Owned bundles under `prefix` (all of them, a tenant's or a namespace's), with owners.
    pub async fn bundle_owners(&self, prefix: &str) -> Result<Vec<(String, BrokerInfo)>, ServiceError> {
        let mut out = Vec::new();
        for kv in self.store.list(&format!("{BUNDLES_PREFIX}{prefix}")).await? {
            match decode::<BrokerInfo>(&kv.key, &kv.value) {
                Ok(b) => out.push((kv.key[BUNDLES_PREFIX.len()..].to_string(), b)),
                Err(e) => warn!(error = %e, "skipping unreadable bundle ownership"),
            }
        }
        Ok(out)
    }

    /// The owner of `bundle`, assigning it to the least-loaded live broker if it has none.
    pub async fn lookup(&self, bundle: &Bundle) -> Result<BrokerInfo, ServiceError> {
        let key = bundle.key();
        for _ in 0..8 {
            if let Some(v) = self.store.get(&key).await? {
                return decode(&key, &v.value);
            }
            let draining = self.phase() == Phase::Draining;
            let brokers: Vec<BrokerInfo> =
                self.brokers().await?.into_iter().filter(|b| !(draining && b.broker_id == self.broker_id())).collect();
            if brokers.is_empty() {
                return Err(ServiceError::Unavailable("no live broker can take the topic".into()));
            }
            let mut load: HashMap<&str, usize> = brokers.iter().map(|b| (b.broker_id.as_str(), 0)).collect();
            for (_, owner) in self.bundle_owners("").await? {
                if let Some(n) = load.get_mut(owner.broker_id.as_str()) {
                    *n += 1;
                }
            }
            let spread = crc32c::crc32c(key.as_bytes());
            let chosen = brokers
                .iter()
                .min_by_key(|b| (load[b.broker_id.as_str()], crc32c::crc32c_append(spread, b.broker_id.as_bytes())))
                .cloned()
                .ok_or_else(|| ServiceError::Unavailable("no live broker".into()))?;
            let value = Bytes::from(serde_json::to_vec(&chosen).map_err(|e| ServiceError::Internal(e.to_string()))?);
            match self.store.put(&key, value, PutOptions::absent().with_lease(chosen.lease)).await {
                Ok(_) => {
                    info!(%bundle, owner = %chosen.broker_id, "bundle assigned");
                    return Ok(chosen);
                }
                // Someone else assigned it, or the chosen broker just died: look again.
                Err(MetadataError::Conflict { .. } | MetadataError::LeaseExpired(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::Unavailable(format!("bundle {bundle} could not be assigned; retry")))
    }

    /// Ok if this broker serves `bundle` now: its key names this broker under the current lease.
    /// Otherwise NotOwner, naming the owner when there is one.
    pub async fn check_owned(&self, bundle: &Bundle, topic: &TopicName) -> Result<(), ServiceError> {
        let lease = match self.phase() {
            Phase::Serving { lease } => lease,
            Phase::Suspended => {
                return Err(ServiceError::Unavailable(
                    "this broker cannot reach the metadata store to renew its lease".into(),
                ));
            }
            Phase::Draining => return Err(ServiceError::ShuttingDown),
        };
        if self.owned.lock().unwrap_or_else(|p| p.into_inner()).get(bundle) == Some(&lease) {
            return Ok(());
        }
        let owner = self.lookup(bundle).await?;
        if owner.broker_id == self.broker_id() && owner.lease == lease && self.phase() == (Phase::Serving { lease }) {
            self.owned.lock().unwrap_or_else(|p| p.into_inner()).insert(bundle.clone(), lease);
            info!(%bundle, "bundle owned");
            return Ok(());
        }
        Err(ServiceError::NotOwner { topic: topic.to_string(), owner: Some(owner.broker_url) })
    }

    /// Bundles this broker knows it owns.
    pub fn owned_bundles(&self) -> Vec<Bundle> {
        let mut v: Vec<Bundle> = self.owned.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        v.sort();
        v
    }

    /// Gives up one bundle (admin unload): deletes its key if it is still this broker's.
    pub async fn release_bundle(&self, bundle: &Bundle) -> Result<(), ServiceError> {
        self.owned.lock().unwrap_or_else(|p| p.into_inner()).remove(bundle);
        let key = bundle.key();
        if let Some(v) = self.store.get(&key).await?
            && decode::<BrokerInfo>(&key, &v.value)?.broker_id == self.broker_id()
        {
            let version: Version = v.version;
            match self.store.delete(&key, Some(version)).await {
                Ok(_) | Err(MetadataError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_ranges_cover_the_hash_space_without_overlap() {
        for n in [1u32, 2, 3, 4, 7, 16, 1024] {
            let ranges: Vec<BundleRange> = (0..n).map(|i| BundleRange::nth(i, n)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[n as usize - 1].end, u32::MAX);
            for w in ranges.windows(2) {
                assert_eq!(w[0].end.wrapping_add(1), w[1].start, "{n} bundles");
            }
            for h in [0u32, 1, u32::MAX / 3, u32::MAX / 2, u32::MAX - 1, u32::MAX] {
                let r = BundleRange::of(h, n);
                assert!(r.start <= h && h <= r.end, "{h} in {r} of {n}");
                assert!(ranges.contains(&r));
            }
        }
        assert_eq!(BundleRange::nth(1, 4).to_string(), "0x40000000_0x7fffffff");
    }

    #[test]
    fn a_topic_always_falls_in_the_same_bundle() {
        let t = TopicName::parse("persistent://public/default/orders").expect("valid");
        let b = Bundle::of(&t, 4);
        assert_eq!(b, Bundle::of(&TopicName::parse("orders").expect("valid"), 4));
        assert!(b.key().starts_with("/bundles/public/default/0x"));
    }
}
