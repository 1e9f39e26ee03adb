//! Keeping one lease alive: [`LeaseKeeper`] grants a lease, renews it in the background every
//! third of its time-to-live, and tells its holder, conservatively, until when it is valid.
//!
//! This module owns the renewal task and the holder's view of the lease. It never claims more
//! validity than the store can have granted: `valid_until` is the instant the last successful
//! renewal request was *sent*, plus the ttl, so the store's own deadline is never earlier. A
//! holder that acts under the lease (ownership, fencing) must check [`LeaseKeeper::is_valid`]
//! (or watch [`LeaseKeeper::state`]) before acting.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{LeaseId, MetadataError, Result, SharedStore};

/// Shortest pause between two renewal attempts.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(10);

/// What the holder knows about its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// The lease exists at least until `valid_until` (it may be renewed further).
    Valid { valid_until: Instant },
    /// The store said the lease is gone (expired or revoked). Terminal.
    Lost,
}

/// Holds one lease and renews it until dropped or revoked. See the module docs.
#[derive(Debug)]
pub struct LeaseKeeper {
    store: SharedStore,
    lease: LeaseId,
    ttl: Duration,
    state: Arc<watch::Sender<LeaseState>>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Grants a lease of `ttl` and starts renewing it every `ttl / 3`. Transient errors are
    /// retried every `ttl / 10`; the state stays `Valid` with the last `valid_until` meanwhile.
    pub async fn start(store: SharedStore, ttl: Duration) -> Result<LeaseKeeper> {
        let sent = Instant::now();
        let lease = store.grant_lease(ttl).await?;
        let state = Arc::new(watch::Sender::new(LeaseState::Valid { valid_until: sent + ttl }));
        let task = tokio::spawn(keep_alive(Arc::clone(&store), lease, ttl, Arc::clone(&state)));
        tracing::debug!(lease, ?ttl, "lease granted");
        Ok(LeaseKeeper { store, lease, ttl, state, task })
    }

    /// The id of the lease, to attach keys to it.
    pub fn lease_id(&self) -> LeaseId {
        self.lease
    }

    /// The time-to-live the lease was granted with.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The state of the lease; it changes on every renewal and once when the lease is lost.
    pub fn state(&self) -> watch::Receiver<LeaseState> {
        self.state.subscribe()
    }

    /// Whether the lease is certainly still alive now.
    pub fn is_valid(&self) -> bool {
        match *self.state.borrow() {
            LeaseState::Valid { valid_until } => Instant::now() < valid_until,
            LeaseState::Lost => false,
        }
    }

    /// Stops renewing and revokes the lease, deleting its keys. The state becomes `Lost`.
    pub async fn revoke(self) -> Result<()> {
        self.task.abort();
        self.state.send_replace(LeaseState::Lost);
        self.store.revoke_lease(self.lease).await
    }
}

impl Drop for LeaseKeeper {
    /// Stops renewing without revoking: the lease expires after its ttl.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Renews `lease` until the store says it is gone (or the task is aborted).
async fn keep_alive(store: SharedStore, lease: LeaseId, ttl: Duration, state: Arc<watch::Sender<LeaseState>>) {
    let renew_every = (ttl / 3).max(MIN_RETRY_DELAY);
    let retry_every = (ttl / 10).max(MIN_RETRY_DELAY);
    let mut next = Instant::now() + renew_every;
    let mut failures = 0u64;
    loop {
        tokio::time::sleep_until(next.into()).await;
        let sent = Instant::now();
        // A renewal slower than the renewal period is as good as failed: retry.
        let error = match tokio::time::timeout(renew_every, store.renew_lease(lease)).await {
            Ok(Ok(())) => {
                if failures > 0 {
                    tracing::info!(lease, failures, "lease renewed again");
                    failures = 0;
                }
                state.send_replace(LeaseState::Valid { valid_until: sent + ttl });
                next = sent + renew_every;
                continue;
            }
            Ok(Err(MetadataError::LeaseExpired(_))) => {
                tracing::warn!(lease, "lease lost: the store no longer has it");
                state.send_replace(LeaseState::Lost);
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {renew_every:?}"),
        };
        failures += 1;
        if failures == 1 {
            tracing::warn!(lease, error, "renew lease; retrying");
        } else {
            tracing::debug!(lease, error, failures, "renew lease; retrying");
        }
        next = Instant::now() + retry_every;
    }
}
