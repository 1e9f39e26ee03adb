//! Ledger metadata as kept in the metadata store (`/ledgers/<id>`, JSON), updated only by
//! compare-and-swap on its version.

use std::collections::BTreeMap;

use bytes::Bytes;
use magnetar_common::metadata::{MetadataError, PutOptions, SharedStore, Version};
use serde::{Deserialize, Serialize};

use super::LedgerError;
use crate::offload::SegmentInfo;

pub const LEDGERS_PREFIX: &str = "/ledgers/";
const ID_COUNTER_KEY: &str = "/ledger-id-counter";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerState {
    Open,
    InRecovery,
    Closed,
}

/// A run of entries written to one ensemble, from `first_entry` until the next fragment.
/// A fragment's ensemble normally has the ledger's `ensemble_size` bookies; after a bookie
/// failure with no spare bookie live it may have fewer, never fewer than the write quorum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fragment {
    pub first_entry: u64,
    pub bookies: Vec<String>,
}

impl Fragment {
    /// Bookies of `entry`'s write set in this fragment.
    pub fn write_set_ids(&self, entry: u64, qw: usize) -> Vec<String> {
        write_set(entry, self.bookies.len(), qw).into_iter().map(|i| self.bookies[i].clone()).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerMetadata {
    pub ledger_id: u64,
    pub ensemble_size: usize,
    pub write_quorum: usize,
    pub ack_quorum: usize,
    pub state: LedgerState,
    /// Last entry of a closed ledger (-1: empty).
    pub last_entry_id: i64,
    /// Bytes of payload in a closed ledger.
    pub length: u64,
    pub fragments: Vec<Fragment>,
    pub created_at_ms: u64,
    #[serde(default)]
    pub custom: BTreeMap<String, String>,
    /// The ledger's copy in object storage, once an offloader has claimed it (closed ledgers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<LedgerOffload>,
}

/// A closed ledger's life in object storage, recorded in its metadata by compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LedgerOffload {
    /// `owner` (a broker instance) claimed the upload at `started_at_ms`. Only the claimant
    /// uploads; whoever finds a claim that is not its own and still wants the ledger offloaded
    /// takes it over by compare-and-swap and removes objects the interrupted upload may have
    /// left under the ledger's key prefix.
    Uploading { owner: String, started_at_ms: u64 },
    /// Every entry of the ledger is in `segments` (consecutive, from entry 0 to the last), in the
    /// store whose configured URL is `store`. The bookies' copies are deleted once
    /// `bookie_copies_deleted_at_ms` is set; reads then go to the store.
    Offloaded {
        store: String,
        segments: Vec<SegmentInfo>,
        offloaded_at_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bookie_copies_deleted_at_ms: Option<u64>,
    },
}

impl LedgerOffload {
    /// The segments, once the upload is complete.
    pub fn segments(&self) -> Option<&[SegmentInfo]> {
        match self {
            LedgerOffload::Offloaded { segments, .. } => Some(segments),
            LedgerOffload::Uploading { .. } => None,
        }
    }

    /// Whether the bookies no longer hold the ledger (reads must use object storage).
    pub fn bookie_copies_deleted(&self) -> bool {
        matches!(self, LedgerOffload::Offloaded { bookie_copies_deleted_at_ms: Some(_), .. })
    }
}

impl LedgerMetadata {
    /// The fragment holding `entry`.
    pub fn fragment_for(&self, entry: u64) -> &Fragment {
        let i = self.fragments.partition_point(|f| f.first_entry <= entry);
        &self.fragments[i.saturating_sub(1)]
    }

    /// Bookies of `entry`'s write set, in the fragment holding it.
    pub fn write_set_ids(&self, entry: u64) -> Vec<String> {
        self.fragment_for(entry).write_set_ids(entry, self.write_quorum)
    }

    pub fn last_fragment(&self) -> &Fragment {
        // Metadata always has at least one fragment (checked on decode).
        &self.fragments[self.fragments.len() - 1]
    }

    pub fn is_closed(&self) -> bool {
        self.state == LedgerState::Closed
    }

    /// Whether the ledger lives only in object storage (its bookies' copies are deleted).
    pub fn bookie_copies_deleted(&self) -> bool {
        self.offload.as_ref().is_some_and(LedgerOffload::bookie_copies_deleted)
    }
}

/// Entry `e` goes to `qw` consecutive bookies starting at `e mod E`.
pub fn write_set(entry: u64, ensemble: usize, qw: usize) -> Vec<usize> {
    let start = (entry % ensemble as u64) as usize;
    (0..qw).map(|i| (start + i) % ensemble).collect()
}

pub fn key(ledger_id: u64) -> String {
    format!("{LEDGERS_PREFIX}{ledger_id:020}")
}

pub fn encode(m: &LedgerMetadata) -> Bytes {
    Bytes::from(serde_json::to_vec(m).unwrap_or_default())
}

pub fn decode(ledger_id: u64, b: &[u8]) -> Result<LedgerMetadata, LedgerError> {
    let m: LedgerMetadata = serde_json::from_slice(b)
        .map_err(|e| LedgerError::Invalid(format!("metadata of ledger {ledger_id} is unreadable: {e}")))?;
    if m.fragments.is_empty()
        || m.fragments.iter().any(|f| f.bookies.len() > m.ensemble_size || f.bookies.len() < m.write_quorum)
    {
        return Err(LedgerError::Invalid(format!("metadata of ledger {ledger_id} has a bad ensemble")));
    }
    Ok(m)
}

/// Writes `md` if the stored metadata is still at `version` (compare-and-swap).
pub async fn cas(store: &SharedStore, md: &LedgerMetadata, version: Version) -> Result<Version, MetadataError> {
    store.put(&key(md.ledger_id), encode(md), PutOptions::version(version)).await
}

pub async fn read(store: &SharedStore, ledger_id: u64) -> Result<(LedgerMetadata, Version), LedgerError> {
    match store.get(&key(ledger_id)).await? {
        Some(v) => Ok((decode(ledger_id, &v.value)?, v.version)),
        None => Err(LedgerError::NoSuchLedger(ledger_id)),
    }
}

fn parse_counter(value: &[u8]) -> Result<u64, LedgerError> {
    std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()).ok_or_else(|| {
        LedgerError::Invalid(format!("{ID_COUNTER_KEY} holds {:?}, not a number", String::from_utf8_lossy(value)))
    })
}

/// The highest ledger id this store has allocated (`None`: none yet).
pub async fn last_allocated_id(store: &SharedStore) -> Result<Option<u64>, LedgerError> {
    store.get(ID_COUNTER_KEY).await?.map(|v| parse_counter(&v.value)).transpose()
}

/// Allocates a new, never used ledger id.
pub async fn allocate_id(store: &SharedStore) -> Result<u64, LedgerError> {
    loop {
        let cur = store.get(ID_COUNTER_KEY).await?;
        let (next, opts) = match &cur {
            Some(v) => (parse_counter(&v.value)? + 1, PutOptions::version(v.version)),
            None => (1, PutOptions::absent()),
        };
        match store.put(ID_COUNTER_KEY, Bytes::from(next.to_string()), opts).await {
            Ok(_) => return Ok(next),
            Err(MetadataError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
