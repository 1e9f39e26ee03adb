//! A running bookie: identity check, storage, the TCP protocol server, the HTTP endpoint, the
//! disk monitor, and registration in the metadata store under a lease so writers see it.

mod http;
mod sweep;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use magnetar_common::metadata::{self, LeaseKeeper, LeaseState, MetadataError, PutOptions, SharedStore};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::BookieConfig;
use crate::cookie;
use crate::metrics::Metrics;
use crate::storage::Storage;

/// Metadata-store prefix of live bookie registrations.
pub const AVAILABLE_PREFIX: &str = "/bookies/available/";

/// What a bookie publishes about itself while alive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub bookie_id: String,
    pub address: String,
    pub http_address: String,
    pub instance_id: String,
    pub read_only: bool,
}

/// A started bookie.
#[derive(Debug)]
pub struct BookieServer {
    pub bookie_id: String,
    pub instance_id: String,
    pub address: SocketAddr,
    pub http_address: SocketAddr,
    storage: Arc<Storage>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("connect to the metadata store at {url}: {error}")]
    Metadata { url: String, error: MetadataError },
    #[error("bookie identity check failed: {0}")]
    Cookie(#[from] cookie::CookieError),
    #[error("open storage: {0}")]
    Storage(#[from] crate::error::StorageError),
    #[error("bind {what} on {addr}: {error}")]
    Bind { what: &'static str, addr: SocketAddr, error: std::io::Error },
    #[error("bookie id {bookie_id} is already registered by a live bookie at {address} (instance {instance_id})")]
    DuplicateId { bookie_id: String, address: String, instance_id: String },
    #[error("register in the metadata store: {0}")]
    Register(MetadataError),
}

impl BookieServer {
    /// Starts a bookie with its own metadata-store connection.
    pub async fn start(cfg: BookieConfig) -> Result<Self, StartError> {
        let store = metadata::connect(&cfg.metadata_url)
            .await
            .map_err(|error| StartError::Metadata { url: cfg.metadata_url.clone(), error })?;
        Self::start_with_store(cfg, store).await
    }

    /// Starts a bookie on a given metadata store (standalone shares one).
    pub async fn start_with_store(cfg: BookieConfig, store: SharedStore) -> Result<Self, StartError> {
        let listener = TcpListener::bind(cfg.listen_addr).await.map_err(|error| StartError::Bind {
            what: "bookie protocol",
            addr: cfg.listen_addr,
            error,
        })?;
        let address = listener.local_addr().map_err(|error| StartError::Bind {
            what: "bookie protocol",
            addr: cfg.listen_addr,
            error,
        })?;
        let advertised = if cfg.advertised_addr.is_empty() { address.to_string() } else { cfg.advertised_addr.clone() };
        let bookie_id = if cfg.bookie_id.is_empty() { advertised.clone() } else { cfg.bookie_id.clone() };
        let instance_id =
            cookie::verify_or_create(&store, &bookie_id, &[cfg.journal_dir.clone(), cfg.ledger_dir.clone()]).await?;
        let metrics = Arc::new(Metrics::new());
        let storage = {
            let cfg = cfg.clone();
            let metrics = metrics.clone();
            tokio::task::spawn_blocking(move || Storage::open(cfg, metrics))
                .await
                .map_err(|e| crate::error::StorageError::Io(e.to_string()))??
        };
        storage.check_disks();
        let http_listener = TcpListener::bind(cfg.http_addr).await.map_err(|error| StartError::Bind {
            what: "HTTP",
            addr: cfg.http_addr,
            error,
        })?;
        let http_address = http_listener.local_addr().map_err(|error| StartError::Bind {
            what: "HTTP",
            addr: cfg.http_addr,
            error,
        })?;
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();
        let reg = Registration {
            bookie_id: bookie_id.clone(),
            address: advertised.clone(),
            http_address: http_address.to_string(),
            instance_id: instance_id.clone(),
            read_only: storage.is_read_only(),
        };
        let lease = register(&store, &reg, cfg.registration_ttl).await?;
        tasks.push(tokio::spawn(tcp::serve(listener, storage.clone(), cancel.clone())));
        let state = http::HttpState {
            storage: storage.clone(),
            bookie_id: bookie_id.clone(),
            instance_id: instance_id.clone(),
        };
        let http_cancel = cancel.clone();
        tasks.push(tokio::spawn(async move {
            let app = http::router(state);
            if let Err(e) = axum::serve(http_listener, app).with_graceful_shutdown(http_cancel.cancelled_owned()).await
            {
                error!(error = %e, "HTTP server stopped");
            }
        }));
        tasks.push(tokio::spawn(sweep::run(
            store.clone(),
            storage.clone(),
            cfg.storage.orphan_sweep_interval,
            cancel.clone(),
        )));
        tasks.push(tokio::spawn(keep_registered(
            store,
            reg,
            lease,
            storage.clone(),
            cfg.registration_ttl,
            cfg.disk.check_interval,
            cancel.clone(),
        )));
        info!(%bookie_id, %address, %http_address, %instance_id, "bookie started");
        Ok(Self { bookie_id, instance_id, address, http_address, storage, cancel, tasks })
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// This bookie as seen by a ledger client in the same process: requests reach its storage
    /// without going through the TCP server.
    pub fn local(&self) -> crate::client::LocalBookie {
        crate::client::LocalBookie::new(self.bookie_id.clone(), self.storage.clone())
    }

    /// Stops serving, deregisters, drains the journal and flushes.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for t in self.tasks {
            // An HTTP client holding a keep-alive connection must not hold shutdown forever.
            let abort = t.abort_handle();
            if tokio::time::timeout(std::time::Duration::from_secs(5), t).await.is_err() {
                abort.abort();
            }
        }
        let storage = self.storage.clone();
        let _ = tokio::task::spawn_blocking(move || storage.shutdown()).await;
        info!(bookie_id = %self.bookie_id, "bookie stopped");
    }
}

async fn register(store: &SharedStore, reg: &Registration, ttl: Duration) -> Result<LeaseKeeper, StartError> {
    let key = format!("{AVAILABLE_PREFIX}{}", reg.bookie_id);
    if let Some(existing) = store.get(&key).await.map_err(StartError::Register)? {
        let other: Option<Registration> = serde_json::from_slice(&existing.value).ok();
        match other {
            // Our own registration from before a crash: we hold the disks, so it is stale.
            Some(o) if o.instance_id == reg.instance_id => {
                let _ = store.delete(&key, Some(existing.version)).await;
            }
            Some(o) => {
                return Err(StartError::DuplicateId {
                    bookie_id: reg.bookie_id.clone(),
                    address: o.address,
                    instance_id: o.instance_id,
                });
            }
            None => {
                let _ = store.delete(&key, Some(existing.version)).await;
            }
        }
    }
    let lease = LeaseKeeper::start(store.clone(), ttl).await.map_err(StartError::Register)?;
    let body = Bytes::from(serde_json::to_vec(reg).unwrap_or_default());
    store.put(&key, body, PutOptions::absent().with_lease(lease.lease_id())).await.map_err(StartError::Register)?;
    Ok(lease)
}

/// Keeps the registration alive and current (read-only state), re-registering after the lease
/// was lost; checks the disks every `check_interval`.
async fn keep_registered(
    store: SharedStore,
    mut reg: Registration,
    mut lease: LeaseKeeper,
    storage: Arc<Storage>,
    ttl: Duration,
    check_interval: Duration,
    cancel: CancellationToken,
) {
    let key = format!("{AVAILABLE_PREFIX}{}", reg.bookie_id);
    let mut tick = tokio::time::interval(check_interval.min(ttl / 2));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let s = storage.clone();
        let _ = tokio::task::spawn_blocking(move || s.check_disks()).await;
        let read_only = storage.is_read_only();
        let lost = matches!(*lease.state().borrow(), LeaseState::Lost);
        if lost {
            warn!("bookie registration lease lost; registering again");
            match register(&store, &reg, ttl).await {
                Ok(l) => lease = l,
                Err(e) => warn!(error = %e, "re-register bookie"),
            }
        } else if read_only != reg.read_only {
            reg.read_only = read_only;
            let body = Bytes::from(serde_json::to_vec(&reg).unwrap_or_default());
            if let Err(e) = store.put(&key, body, PutOptions::any().with_lease(lease.lease_id())).await {
                warn!(error = %e, "update bookie registration");
                reg.read_only = !read_only;
            }
        }
    }
    if let Err(e) = lease.revoke().await {
        warn!(error = %e, "revoke bookie registration lease");
    }
}
