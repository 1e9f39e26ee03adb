//! The orphan sweep: a bookie deletes its copies of ledgers that the cluster no longer keeps on
//! bookies (BookKeeper's scan-and-compare garbage collection). Two kinds exist:
//! - a ledger deleted while this bookie was down or unreachable: the deleter removed the
//!   metadata and could not reach this bookie, so nothing else will ever delete its copy;
//! - a ledger offloaded to object storage whose bookie copies were deleted while this bookie was
//!   away: its metadata says it lives in object storage only.
//!
//! Without the sweep such copies stay on disk forever.
//!
//! Safety: the bookie lists its own ledgers first, then the metadata. A ledger's metadata is
//! written before any of its entries (`LedgerClient::create`), so a ledger stored here that is
//! missing from a later listing has been deleted. Before deleting, the sweep reads that ledger's
//! key once more, so a listing that missed a key cannot make it delete live data. Metadata it
//! cannot decode keeps the copy. And it sweeps only a store that allocated every ledger it
//! holds (the store's ledger-id counter is at least the highest id stored here). A bookie
//! pointed at another cluster's store does not start (`cookie.rs`); this guard is for its own
//! store restored from an older backup, which knows the bookie but not its newer ledgers: the
//! sweep then deletes nothing and says why.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use magnetar_common::metadata::SharedStore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::meta::{self, LEDGERS_PREFIX};
use crate::storage::Storage;

/// Sweeps every `interval` (zero: never), the first time one interval after start, until
/// cancelled. Entries written without ledger metadata (`magnetar perf bookie`, tests that talk
/// the bookie protocol directly) are therefore kept for at least one interval.
pub(crate) async fn run(store: SharedStore, storage: Arc<Storage>, interval: Duration, cancel: CancellationToken) {
    if interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = sweep_once(&store, &storage).await {
            warn!(error = %e, "orphan ledger sweep; retrying at the next interval");
        }
    }
}

/// Why the copy of a ledger may go, if it may.
fn orphan_reason(md: Option<&[u8]>, ledger_id: u64) -> Option<&'static str> {
    match md {
        None => Some("its metadata is gone (deleted while this bookie was away)"),
        Some(v) => meta::decode(ledger_id, v)
            .is_ok_and(|m| m.bookie_copies_deleted())
            .then_some("its metadata says it lives in object storage only"),
    }
}

/// Whether the store allocated every ledger stored here: its counter is the highest id it gave.
fn check_counter(counter: Option<u64>, highest_stored: u64) -> Result<(), String> {
    match counter {
        Some(n) if n >= highest_stored => Ok(()),
        _ => Err(format!(
            "this bookie stores ledger {highest_stored} but the metadata store has allocated ledger ids only up to \
             {}: it is not the store that created these ledgers (wrong metadata_url, or a store restored from an \
             older backup); nothing deleted",
            counter.map_or("none".to_string(), |n| n.to_string())
        )),
    }
}

/// One sweep; returns how many ledger copies it deleted.
pub(crate) async fn sweep_once(store: &SharedStore, storage: &Arc<Storage>) -> Result<usize, String> {
    let s = storage.clone();
    let local = tokio::task::spawn_blocking(move || s.stored_ledgers())
        .await
        .map_err(|e| format!("list stored ledgers: {e}"))?
        .map_err(|e| format!("list stored ledgers: {e}"))?;
    let Some(&highest) = local.iter().max() else { return Ok(0) };
    let counter = meta::last_allocated_id(store).await.map_err(|e| format!("read the ledger-id counter: {e}"))?;
    check_counter(counter, highest)?;
    let listed = store.list(LEDGERS_PREFIX).await.map_err(|e| format!("list ledger metadata: {e}"))?;
    let known: HashMap<u64, &[u8]> = listed
        .iter()
        .filter_map(|kv| Some((kv.key.strip_prefix(LEDGERS_PREFIX)?.parse::<u64>().ok()?, &kv.value[..])))
        .collect();
    let mut deleted = 0;
    for ledger_id in local {
        let reason = match known.get(&ledger_id) {
            Some(v) => orphan_reason(Some(v), ledger_id),
            None => {
                // Not listed: confirm with a read of the ledger's own key.
                let current = store
                    .get(&meta::key(ledger_id))
                    .await
                    .map_err(|e| format!("read metadata of ledger {ledger_id}: {e}"))?;
                orphan_reason(current.as_ref().map(|v| &v.value[..]), ledger_id)
            }
        };
        let Some(reason) = reason else { continue };
        storage.delete(ledger_id).await.map_err(|e| format!("delete orphan ledger {ledger_id}: {e}"))?;
        storage.metrics().orphan_ledgers_deleted.inc();
        info!(ledger_id, reason, "deleted this bookie's copy of an orphan ledger");
        deleted += 1;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_missing_metadata_or_deleted_bookie_copies_make_an_orphan() {
        assert!(orphan_reason(None, 7).is_some());
        // Unreadable metadata (a newer format, damage) keeps the copy.
        assert_eq!(orphan_reason(Some(b"{not json"), 7), None);
    }

    #[test]
    fn a_store_that_did_not_allocate_the_stored_ledgers_is_not_swept() {
        assert!(check_counter(Some(9), 9).is_ok());
        assert!(check_counter(Some(100), 9).is_ok());
        let e = check_counter(Some(8), 9).expect_err("counter below a stored ledger");
        assert!(e.contains("stores ledger 9") && e.contains("up to 8") && e.contains("wrong metadata_url"), "{e}");
        let e = check_counter(None, 9).expect_err("an empty store");
        assert!(e.contains("up to none"), "{e}");
    }
}
