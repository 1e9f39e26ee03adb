//! The ledger client: what brokers use to create, write, read, recover and delete ledgers on an
//! ensemble of bookies, with ledger metadata in the metadata store.
//!
//! - [`LedgerClient::create`] picks `E` writable bookies and returns a [`LedgerWriter`]; an entry
//!   is acknowledged once `Qa` bookies of its write set stored it and every lower entry is
//!   acknowledged; a failing bookie is replaced (ensemble change by compare-and-swap).
//! - [`LedgerClient::open`] reads a ledger with fallback across replicas.
//! - [`LedgerClient::open_for_recovery`] fences the last ensemble, recovers the tail, and closes
//!   the ledger, so its previous writer can add nothing more.
//! - [`AutoRecovery`] re-replicates, in the background, the copies that ledgers lost with a dead
//!   bookie.

pub mod autorecovery;
pub mod conn;
pub mod meta;
mod reader;
mod recovery;
mod registry;
mod writer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use magnetar_common::bookie_proto::{Request, Status};
use magnetar_common::metadata::{MetadataError, PutOptions, SharedStore, Version};
use serde::{Deserialize, Serialize};

pub use autorecovery::{AutoRecovery, AutoRecoveryConfig, AutoRecoveryMetrics};
pub use meta::{Fragment, LedgerMetadata, LedgerOffload, LedgerState};
pub use reader::LedgerReader;
pub use registry::BookieRegistry;
pub use writer::LedgerWriter;

pub use conn::LocalBookie;

use conn::BookieConn;

#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    #[error("bookie {bookie} answered {status:?}: {message}")]
    Bookie { bookie: String, status: Status, message: String },
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("ledger {0} is fenced or closed by another writer")]
    Fenced(u64),
    #[error("ledger {0} is closed")]
    Closed(u64),
    #[error("ledger {0} does not exist")]
    NoSuchLedger(u64),
    #[error("entry {ledger}:{entry} could not be read: {reason}")]
    EntryUnavailable { ledger: u64, entry: u64, reason: String },
    #[error(
        "not enough bookies: need {need} writable, found {found} ({read_only} more are live but read-only, e.g. disk full)"
    )]
    NotEnoughBookies { need: usize, found: usize, read_only: usize },
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("metadata store: {0}")]
    Metadata(String),
}

impl From<MetadataError> for LedgerError {
    fn from(e: MetadataError) -> Self {
        LedgerError::Metadata(e.to_string())
    }
}

impl LedgerError {
    fn status(&self) -> Option<Status> {
        match self {
            LedgerError::Bookie { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Timeouts and limits of the ledger client.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerClientConfig {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A bookie that does not acknowledge an add within this is replaced in the ensemble.
    #[serde(with = "humantime_serde")]
    pub add_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Bytes of entries a writer may have unacknowledged; appends wait beyond it.
    pub max_pending_add_bytes: bytesize::ByteSize,
    /// Bytes a range read asks a bookie for at once.
    pub read_batch_bytes: bytesize::ByteSize,
}

impl Default for LedgerClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            add_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            max_pending_add_bytes: bytesize::ByteSize::mib(64),
            read_batch_bytes: bytesize::ByteSize::mib(4),
        }
    }
}

/// Shared state of a client: metadata store, bookie registry, connection pool.
#[derive(Debug)]
pub(crate) struct Shared {
    pub store: SharedStore,
    pub registry: BookieRegistry,
    pub conns: Mutex<HashMap<String, Arc<BookieConn>>>,
    pub config: LedgerClientConfig,
}

impl Shared {
    /// The connection to a bookie, by id.
    pub fn conn(&self, bookie_id: &str) -> Result<Arc<BookieConn>, LedgerError> {
        let address = self.registry.address(bookie_id);
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = conns.get(bookie_id) {
            if let Some(a) = &address {
                c.set_address(a);
            }
            return Ok(c.clone());
        }
        let address =
            address.ok_or_else(|| LedgerError::Unavailable(format!("bookie {bookie_id} is not registered (down?)")))?;
        let c = Arc::new(BookieConn::new(bookie_id.to_string(), address, self.config.connect_timeout));
        conns.insert(bookie_id.to_string(), c.clone());
        Ok(c)
    }

    pub async fn call(
        &self,
        bookie_id: &str,
        request: Request,
        timeout: Duration,
    ) -> Result<magnetar_common::bookie_proto::Reply, LedgerError> {
        self.conn(bookie_id)?.call(request, timeout).await
    }
}

/// Entry point of the ledger client.
#[derive(Debug, Clone)]
pub struct LedgerClient {
    shared: Arc<Shared>,
}

impl LedgerClient {
    /// Starts a client: watches the live bookies in `store`.
    pub async fn new(store: SharedStore, config: LedgerClientConfig) -> Result<Self, LedgerError> {
        Self::with_local_bookies(store, config, Vec::new()).await
    }

    /// Starts a client that reaches the given bookies of this process without a socket (see
    /// [`LocalBookie`]) and all others over TCP. Which bookies a ledger uses is still decided
    /// by the registrations in `store`.
    pub async fn with_local_bookies(
        store: SharedStore,
        config: LedgerClientConfig,
        local: Vec<LocalBookie>,
    ) -> Result<Self, LedgerError> {
        let registry = BookieRegistry::start(store.clone()).await?;
        let conns = local.into_iter().map(|b| (b.bookie_id().to_string(), Arc::new(BookieConn::local(b)))).collect();
        Ok(Self { shared: Arc::new(Shared { store, registry, conns: Mutex::new(conns), config }) })
    }

    pub fn registry(&self) -> &BookieRegistry {
        &self.shared.registry
    }

    pub fn store(&self) -> &SharedStore {
        &self.shared.store
    }

    /// Creates a ledger on `e` writable bookies with write quorum `qw` and ack quorum `qa`.
    pub async fn create(
        &self,
        e: usize,
        qw: usize,
        qa: usize,
        custom: std::collections::BTreeMap<String, String>,
    ) -> Result<LedgerWriter, LedgerError> {
        if !(e >= qw && qw >= qa && qa >= 1 && e <= 64) {
            return Err(LedgerError::Invalid(format!(
                "quorums must satisfy 64 >= E >= Qw >= Qa >= 1, got E={e} Qw={qw} Qa={qa}"
            )));
        }
        let bookies = self.shared.registry.choose_writable(e, &[])?;
        let ledger_id = meta::allocate_id(&self.shared.store).await?;
        let md = LedgerMetadata {
            ledger_id,
            ensemble_size: e,
            write_quorum: qw,
            ack_quorum: qa,
            state: LedgerState::Open,
            last_entry_id: -1,
            length: 0,
            fragments: vec![Fragment { first_entry: 0, bookies }],
            created_at_ms: now_ms(),
            custom,
            offload: None,
        };
        let version = self.shared.store.put(&meta::key(ledger_id), meta::encode(&md), PutOptions::absent()).await?;
        Ok(LedgerWriter::start(self.shared.clone(), md, version, -1, false))
    }

    /// Opens a ledger for reading (does not fence).
    pub async fn open(&self, ledger_id: u64) -> Result<LedgerReader, LedgerError> {
        let (md, _) = meta::read(&self.shared.store, ledger_id).await?;
        Ok(LedgerReader::new(self.shared.clone(), md))
    }

    /// Fences the ledger, recovers its last entries to full write quorum and closes it.
    /// The previous writer's adds fail from then on. Returns a reader of the closed ledger.
    pub async fn open_for_recovery(&self, ledger_id: u64) -> Result<LedgerReader, LedgerError> {
        recovery::recover(self.shared.clone(), ledger_id).await
    }

    /// Deletes a ledger from its bookies and its metadata.
    pub async fn delete(&self, ledger_id: u64) -> Result<(), LedgerError> {
        let (md, version) = match meta::read(&self.shared.store, ledger_id).await {
            Ok(v) => v,
            Err(LedgerError::NoSuchLedger(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut bookies: Vec<&String> = md.fragments.iter().flat_map(|f| f.bookies.iter()).collect();
        bookies.sort();
        bookies.dedup();
        for b in bookies {
            // A bookie that is down keeps the ledger's data until its orphan sweep finds the
            // metadata gone; the metadata is what makes the ledger gone for readers.
            if let Err(e) = self.shared.call(b, Request::Delete { ledger_id }, self.shared.config.read_timeout).await {
                tracing::warn!(ledger_id, bookie = %b, error = %e, "delete ledger on bookie");
            }
        }
        match self.shared.store.delete(&meta::key(ledger_id), Some(version)).await {
            Ok(_) => Ok(()),
            Err(MetadataError::Conflict { .. }) => {
                Err(LedgerError::Invalid(format!("ledger {ledger_id} changed while deleting")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a ledger's entries from its bookies, keeping its metadata: for a ledger whose
    /// metadata already says its copies are deleted (it lives in object storage). A bookie that
    /// is down keeps its copy until its orphan sweep (as with [`Self::delete`]); the metadata is
    /// what readers follow.
    /// Returns the bookies that did not confirm.
    pub async fn delete_bookie_copies(&self, md: &LedgerMetadata) -> Vec<String> {
        let ledger_id = md.ledger_id;
        let mut bookies: Vec<&String> = md.fragments.iter().flat_map(|f| f.bookies.iter()).collect();
        bookies.sort();
        bookies.dedup();
        let mut failed = Vec::new();
        for b in bookies {
            if let Err(e) = self.shared.call(b, Request::Delete { ledger_id }, self.shared.config.read_timeout).await {
                tracing::warn!(ledger_id, bookie = %b, error = %e, "delete offloaded ledger's copy on bookie");
                failed.push(b.clone());
            }
        }
        failed
    }

    /// Reads a ledger's metadata with its version.
    pub async fn metadata_versioned(&self, ledger_id: u64) -> Result<(LedgerMetadata, Version), LedgerError> {
        meta::read(&self.shared.store, ledger_id).await
    }

    /// Writes a ledger's metadata if it is still at `version` (compare-and-swap); the new version.
    pub async fn update_metadata(&self, md: &LedgerMetadata, version: Version) -> Result<Version, MetadataError> {
        meta::cas(&self.shared.store, md, version).await
    }

    /// Reads a ledger's metadata.
    pub async fn metadata(&self, ledger_id: u64) -> Result<LedgerMetadata, LedgerError> {
        Ok(meta::read(&self.shared.store, ledger_id).await?.0)
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
