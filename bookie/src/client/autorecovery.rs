//! Auto-recovery: brings ledgers that lost copies on a dead bookie back to their full write
//! quorum, in the background.
//!
//! Any number of processes may run [`AutoRecovery`]; one of them at a time is the **auditor**.
//! It is elected through the metadata store: the holder of a create-if-absent key
//! ([`AUDITOR_KEY`]) attached to its lease is the auditor, and the others watch the key and run
//! again when it disappears (the holder stopped, or its lease expired). The auditor lists the
//! ledger metadata every `scan_interval` and whenever the set of live bookies changes. A bookie
//! that a ledger references and that has been absent from the registry for `lost_bookie_grace` is
//! **lost**. For each fragment with a lost bookie, the auditor copies every entry whose write set
//! contained the lost bookie from a surviving replica to a live, writable bookie outside the
//! fragment (recovery adds, so fenced and closed ledgers accept them), then swaps the lost bookie
//! for its replacement in that fragment's ensemble by compare-and-swap (`repair.rs`). With no
//! spare bookie it shrinks the fragment's ensemble, never below the write quorum, and copies
//! what the new striping needs.
//!
//! What this module must never do:
//! - invent an entry: an entry with no surviving copy is reported (ERROR log and the
//!   `unrecoverable_entries` gauge) and its fragment is left as it is;
//! - touch the fragment an open ledger's writer is still writing (the last fragment of a ledger
//!   that is not closed: the writer replaces failed bookies there itself), or any fragment of a
//!   ledger in recovery (the recoverer owns its fragments until it closes the ledger);
//! - write ledger metadata other than by compare-and-swap on the version it read.
//!
//! Two auditors at once (a partitioned holder whose lease the store already expired) are safe,
//! only wasteful: both copy, one compare-and-swap wins, the other sees the change and moves on.

mod repair;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use bytesize::ByteSize;
use futures::StreamExt;
use magnetar_common::metadata::{LeaseKeeper, LeaseState, MetadataError, PutOptions, WatchEvent};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::meta::{self, LEDGERS_PREFIX, LedgerMetadata};
use super::{LedgerClient, Shared};

/// The auditor's key in the metadata store, attached to the auditor's lease.
pub const AUDITOR_KEY: &str = "/autorecovery/auditor";

/// Pause after a failed election attempt or a failed watch.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// A change of the live bookies starts a scan this much later (changes come in bursts).
const REGISTRY_DEBOUNCE: Duration = Duration::from_millis(200);
/// While the auditor's lease cannot be confirmed, scans wait and check again this often.
const LEASE_RECHECK: Duration = Duration::from_millis(500);

/// Settings of auto-recovery (the broker's `[autorecovery]` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoRecoveryConfig {
    /// Run auto-recovery in this process. The caller reads it; [`AutoRecovery::start`] does not.
    pub enabled: bool,
    /// The auditor lists every ledger this often (and when the live bookies change).
    #[serde(with = "humantime_serde")]
    pub scan_interval: Duration,
    /// A bookie must be absent from the registry this long before its copies are rebuilt
    /// elsewhere (a restarting bookie comes back before).
    #[serde(with = "humantime_serde")]
    pub lost_bookie_grace: Duration,
    /// Time-to-live of the auditor's lease: how long the cluster may go without an auditor when
    /// the one holding it dies.
    #[serde(with = "humantime_serde")]
    pub auditor_lease_ttl: Duration,
    /// Ledgers repaired at once.
    pub max_concurrent_ledgers: usize,
    /// Bytes of entries being copied at once, across all ledgers (about: an entry larger than
    /// every one before it may overshoot once).
    pub max_inflight_bytes: ByteSize,
}

impl Default for AutoRecoveryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            scan_interval: Duration::from_secs(30),
            lost_bookie_grace: Duration::from_secs(10),
            auditor_lease_ttl: Duration::from_secs(10),
            max_concurrent_ledgers: 2,
            max_inflight_bytes: ByteSize::mib(16),
        }
    }
}

impl AutoRecoveryConfig {
    /// Checks the values; the error names the key and its limit.
    pub fn validate(&self) -> Result<(), String> {
        if self.scan_interval < Duration::from_millis(100) {
            return Err(format!("autorecovery.scan_interval is {:?}; it must be at least 100ms", self.scan_interval));
        }
        if self.auditor_lease_ttl < Duration::from_secs(1) {
            return Err(format!(
                "autorecovery.auditor_lease_ttl is {:?}; it must be at least 1s",
                self.auditor_lease_ttl
            ));
        }
        if !(1..=64).contains(&self.max_concurrent_ledgers) {
            return Err(format!(
                "autorecovery.max_concurrent_ledgers is {}; it must be between 1 and 64",
                self.max_concurrent_ledgers
            ));
        }
        let b = self.max_inflight_bytes.as_u64();
        if !(64 * 1024..=u32::MAX as u64).contains(&b) {
            return Err(format!("autorecovery.max_inflight_bytes is {b}; it must be between 64 KiB and 4 GiB"));
        }
        Ok(())
    }
}

/// What auto-recovery counts. Clones share the same values; a process that embeds
/// auto-recovery registers them in its own Prometheus registry with
/// [`AutoRecoveryMetrics::register`].
#[derive(Debug, Clone, Default)]
pub struct AutoRecoveryMetrics {
    /// 1 while this process is the auditor.
    pub auditor: Gauge,
    /// Ledgers referencing a bookie that is not live, as of the auditor's last scan (after its
    /// repairs). 0 in processes that are not the auditor.
    pub under_replicated_ledgers: Gauge,
    /// Entries found with no surviving copy, in fragments still referencing a lost bookie.
    pub unrecoverable_entries: Gauge,
    /// Scans of the ledger metadata.
    pub scans: Counter,
    /// Fragments whose ensemble was repaired.
    pub fragments_rereplicated: Counter,
    /// Entries copied to a replacement bookie.
    pub entries_rereplicated: Counter,
    /// Bytes of entries written to replacement bookies.
    pub bytes_rereplicated: Counter,
    /// Failed attempts (a scan, a fragment): retried at the next scan.
    pub failures: Counter,
}

impl AutoRecoveryMetrics {
    /// Registers every metric: `under_replicated_ledgers`, then `autorecovery_*`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "under_replicated_ledgers",
            "Ledgers referencing a bookie that is not live (published by the auto-recovery auditor; 0 elsewhere)",
            self.under_replicated_ledgers.clone(),
        );
        registry.register(
            "autorecovery_auditor",
            "1 while this process is the auto-recovery auditor",
            self.auditor.clone(),
        );
        registry.register(
            "autorecovery_unrecoverable_entries",
            "Entries with no surviving copy on a live bookie (a human must act)",
            self.unrecoverable_entries.clone(),
        );
        registry.register("autorecovery_scans", "Scans of the ledger metadata by the auditor", self.scans.clone());
        registry.register(
            "autorecovery_fragments_rereplicated",
            "Fragments whose lost bookies were replaced",
            self.fragments_rereplicated.clone(),
        );
        registry.register(
            "autorecovery_entries_rereplicated",
            "Entries copied to replacement bookies",
            self.entries_rereplicated.clone(),
        );
        registry.register(
            "autorecovery_bytes_rereplicated",
            "Bytes of entries written to replacement bookies",
            self.bytes_rereplicated.clone(),
        );
        registry.register(
            "autorecovery_failures",
            "Failed auto-recovery attempts (retried at the next scan)",
            self.failures.clone(),
        );
    }
}

/// A fragment found to hold entries with no surviving copy; not retried while it is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FragmentKey {
    ledger_id: u64,
    first_entry: u64,
    bookies: Vec<String>,
}

impl FragmentKey {
    fn of(md: &LedgerMetadata, index: usize) -> Self {
        let f = &md.fragments[index];
        Self { ledger_id: md.ledger_id, first_entry: f.first_entry, bookies: f.bookies.clone() }
    }

    fn still_in(&self, md: &LedgerMetadata) -> bool {
        md.ledger_id == self.ledger_id
            && md.fragments.iter().any(|f| f.first_entry == self.first_entry && f.bookies == self.bookies)
    }
}

/// What the service's task works with.
#[derive(Debug)]
struct Ctx {
    shared: Arc<Shared>,
    config: AutoRecoveryConfig,
    metrics: AutoRecoveryMetrics,
    holder: String,
    /// Bytes of entries being copied (`max_inflight_bytes` permits).
    bytes: Arc<Semaphore>,
}

/// A running auto-recovery service. Dropping it stops the service too; [`AutoRecovery::shutdown`]
/// also waits until the auditor key is released, so another process takes over at once.
#[derive(Debug)]
pub struct AutoRecovery {
    holder: String,
    metrics: AutoRecoveryMetrics,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl AutoRecovery {
    /// Starts the service on `client`'s metadata store and bookies. It runs for auditor, and
    /// audits while elected, until shut down. `config.enabled` is not looked at.
    pub fn start(client: &LedgerClient, config: AutoRecoveryConfig, metrics: AutoRecoveryMetrics) -> Self {
        let holder = format!("pid {} ({})", std::process::id(), uuid::Uuid::new_v4());
        let bytes = Arc::new(Semaphore::new(config.max_inflight_bytes.as_u64().clamp(1, u32::MAX as u64) as usize));
        let ctx = Arc::new(Ctx {
            shared: client.shared.clone(),
            config,
            metrics: metrics.clone(),
            holder: holder.clone(),
            bytes,
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(ctx, cancel.clone()));
        Self { holder, metrics, cancel, task: Some(task) }
    }

    pub fn metrics(&self) -> &AutoRecoveryMetrics {
        &self.metrics
    }

    /// This process's name in the auditor key.
    pub fn holder_id(&self) -> &str {
        &self.holder
    }

    /// Whether this process is the auditor now.
    pub fn is_auditor(&self) -> bool {
        self.metrics.auditor.get() == 1
    }

    /// Stops the service: a repair in progress is abandoned (its copies are harmless; its
    /// metadata change was not made), and the auditor key is released.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for AutoRecovery {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Sleeps `d` unless cancelled first; returns whether it was cancelled.
async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

async fn run(ctx: Arc<Ctx>, cancel: CancellationToken) {
    while !cancel.is_cancelled() {
        match campaign(&ctx).await {
            Ok(Some(lease)) => {
                info!(holder = %ctx.holder, "auto-recovery: this process is the auditor");
                ctx.metrics.auditor.set(1);
                Auditor::new(ctx.clone()).run(&lease, &cancel).await;
                ctx.metrics.auditor.set(0);
                ctx.metrics.under_replicated_ledgers.set(0);
                ctx.metrics.unrecoverable_entries.set(0);
                if let Err(e) = lease.revoke().await {
                    debug!(error = %e, "auto-recovery: revoke the auditor lease");
                }
                info!(holder = %ctx.holder, "auto-recovery: no longer the auditor");
            }
            Ok(None) => wait_for_vacancy(&ctx, &cancel).await,
            Err(e) => {
                warn!(error = %e, "auto-recovery: run for auditor; retrying");
                if sleep_or_cancel(RETRY_DELAY, &cancel).await {
                    return;
                }
            }
        }
    }
}

/// Tries to become the auditor: `Some(lease)` if this process now holds the auditor key.
async fn campaign(ctx: &Ctx) -> Result<Option<LeaseKeeper>, MetadataError> {
    let store = &ctx.shared.store;
    let lease = LeaseKeeper::start(store.clone(), ctx.config.auditor_lease_ttl).await?;
    let body = serde_json::json!({ "holder": ctx.holder, "since_ms": super::now_ms() });
    let body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    match store.put(AUDITOR_KEY, body, PutOptions::absent().with_lease(lease.lease_id())).await {
        Ok(_) => Ok(Some(lease)),
        Err(e) => {
            let _ = lease.revoke().await;
            match e {
                MetadataError::Conflict { .. } => Ok(None),
                e => Err(e),
            }
        }
    }
}

/// Returns once the auditor key is absent (or the watch ended, or on cancel).
async fn wait_for_vacancy(ctx: &Ctx, cancel: &CancellationToken) {
    let watch = match ctx.shared.store.watch(AUDITOR_KEY).await {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "auto-recovery: watch the auditor key; retrying");
            sleep_or_cancel(RETRY_DELAY, cancel).await;
            return;
        }
    };
    if !watch.initial.iter().any(|kv| kv.key == AUDITOR_KEY) {
        return;
    }
    let mut events = watch.events;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            ev = events.recv() => match ev {
                Some(WatchEvent::Delete { key }) if key == AUDITOR_KEY => return,
                Some(_) => {}
                None => return,
            },
        }
    }
}

/// The auditor's state for one term.
struct Auditor {
    ctx: Arc<Ctx>,
    /// When each bookie referenced by a ledger was first seen absent from the registry.
    absent_since: HashMap<String, Instant>,
    /// Fragments known to hold entries with no surviving copy, with how many.
    unrecoverable: HashMap<FragmentKey, u64>,
}

impl Auditor {
    fn new(ctx: Arc<Ctx>) -> Self {
        Self { ctx, absent_since: HashMap::new(), unrecoverable: HashMap::new() }
    }

    /// Scans until cancelled or the lease is lost.
    async fn run(&mut self, lease: &LeaseKeeper, cancel: &CancellationToken) {
        let mut lease_state = lease.state();
        let mut changes = self.ctx.shared.registry.changes();
        let mut next = Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = lease_state.wait_for(|s| *s == LeaseState::Lost) => {
                    warn!("auto-recovery: the auditor lease was lost; stepping down");
                    return;
                }
                _ = tokio::time::sleep_until(next) => {}
                r = changes.changed() => {
                    if r.is_err() {
                        // The registry is gone: only the interval is left.
                        changes = tokio::sync::watch::channel(0).1;
                    }
                    next = next.min(Instant::now() + REGISTRY_DEBOUNCE);
                    continue;
                }
            }
            if !lease.is_valid() {
                next = Instant::now() + LEASE_RECHECK;
                continue;
            }
            let wake = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = lease_state.wait_for(|s| *s == LeaseState::Lost) => {
                    warn!("auto-recovery: the auditor lease was lost during a scan; stepping down");
                    return;
                }
                w = self.scan() => w,
            };
            let interval = Instant::now() + self.ctx.config.scan_interval;
            next = wake.map_or(interval, |w| w.min(interval));
        }
    }

    /// One scan: lists every ledger, updates the gauges, repairs fragments with lost bookies.
    /// Returns when the next bookie's grace period ends, if one is pending.
    async fn scan(&mut self) -> Option<Instant> {
        let ctx = self.ctx.clone();
        ctx.metrics.scans.inc();
        let now = Instant::now();
        let live: HashSet<String> = ctx.shared.registry.live().into_iter().map(|r| r.bookie_id).collect();
        let listing = match ctx.shared.store.list(LEDGERS_PREFIX).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "auto-recovery: list ledgers; retrying at the next scan");
                ctx.metrics.failures.inc();
                return None;
            }
        };
        let mut damaged = Vec::new();
        let mut absent = HashSet::new();
        for kv in &listing {
            let Some(id) = kv.key.strip_prefix(LEDGERS_PREFIX).and_then(|s| s.parse::<u64>().ok()) else { continue };
            let md = match meta::decode(id, &kv.value) {
                Ok(md) => md,
                Err(e) => {
                    warn!(ledger_id = id, error = %e, "auto-recovery: skipping unreadable ledger metadata");
                    continue;
                }
            };
            if md.bookie_copies_deleted() {
                // It lives in object storage now: nothing on bookies to re-replicate.
                continue;
            }
            let missing: Vec<&String> =
                md.fragments.iter().flat_map(|f| &f.bookies).filter(|b| !live.contains(*b)).collect();
            if !missing.is_empty() {
                absent.extend(missing.into_iter().cloned());
                damaged.push(md);
            }
        }
        self.absent_since.retain(|b, _| absent.contains(b));
        for b in &absent {
            self.absent_since.entry(b.clone()).or_insert(now);
        }
        let grace = ctx.config.lost_bookie_grace;
        let lost: HashSet<String> = self
            .absent_since
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= grace)
            .map(|(b, _)| b.clone())
            .collect();
        let wake = self.absent_since.values().map(|t| *t + grace).filter(|w| *w > now).min();
        self.unrecoverable.retain(|k, _| damaged.iter().any(|md| k.still_in(md)));
        ctx.metrics.under_replicated_ledgers.set(damaged.len() as i64);
        self.publish_unrecoverable();
        if !damaged.is_empty() {
            debug!(
                under_replicated = damaged.len(),
                absent = ?self.absent_since.keys().collect::<Vec<_>>(),
                lost = ?lost,
                "auto-recovery scan"
            );
        }
        let work: Vec<u64> = damaged
            .iter()
            .filter(|md| md.fragments.iter().flat_map(|f| &f.bookies).any(|b| lost.contains(b)))
            .map(|md| md.ledger_id)
            .collect();
        if work.is_empty() {
            return wake;
        }
        let known = &self.unrecoverable;
        let outcomes: Vec<repair::LedgerOutcome> = futures::stream::iter(work)
            .map(|id| repair::repair_ledger(&ctx, id, &lost, known))
            .buffer_unordered(ctx.config.max_concurrent_ledgers.max(1))
            .collect()
            .await;
        let mut still_damaged = damaged.len() as i64;
        for o in outcomes {
            if o.healthy {
                still_damaged -= 1;
            }
            if o.failed {
                ctx.metrics.failures.inc();
            }
            self.unrecoverable.extend(o.unrecoverable);
        }
        ctx.metrics.under_replicated_ledgers.set(still_damaged.max(0));
        self.publish_unrecoverable();
        wake
    }

    fn publish_unrecoverable(&self) {
        let n: u64 = self.unrecoverable.values().sum();
        self.ctx.metrics.unrecoverable_entries.set(n as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        AutoRecoveryConfig::default().validate().expect("defaults");
        let bad = |c: AutoRecoveryConfig, key: &str| {
            let err = c.validate().expect_err(key);
            assert!(err.contains(key), "{err}");
        };
        let d = AutoRecoveryConfig::default;
        bad(AutoRecoveryConfig { scan_interval: Duration::from_millis(10), ..d() }, "autorecovery.scan_interval");
        bad(AutoRecoveryConfig { auditor_lease_ttl: Duration::from_millis(500), ..d() }, "auditor_lease_ttl");
        bad(AutoRecoveryConfig { max_concurrent_ledgers: 0, ..d() }, "max_concurrent_ledgers");
        bad(AutoRecoveryConfig { max_inflight_bytes: ByteSize::kib(1), ..d() }, "max_inflight_bytes");
        let parsed: AutoRecoveryConfig =
            serde_json::from_str(r#"{"scan_interval": "1s", "lost_bookie_grace": "250ms"}"#).expect("parse");
        assert_eq!(parsed.scan_interval, Duration::from_secs(1));
        assert_eq!(parsed.lost_bookie_grace, Duration::from_millis(250));
        assert!(parsed.enabled);
    }
}
