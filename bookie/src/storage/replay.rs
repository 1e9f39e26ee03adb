//! Start-up recovery: replays the journal from the last checkpoint straight into entry logs and
//! the index, so the bookie starts with an empty write cache and a fresh journal file.

use std::collections::BTreeMap;

use bytes::Bytes;
use magnetar_common::entry::peek_header;
use tracing::{info, warn};

use super::{Key, write_entries};
use crate::config::BookieConfig;
use crate::entry_log::EntryLogger;
use crate::error::StorageError;
use crate::index::{FlushBatch, Index};
use crate::journal::{self, JournalPos, format};

fn ledger_of(body: &[u8]) -> u64 {
    let mut id = [0u8; 8];
    id.copy_from_slice(&body[..8]);
    u64::from_be_bytes(id)
}

/// Replays and checkpoints; returns the id the new journal file must take.
pub(super) fn replay_journal(cfg: &BookieConfig, index: &Index, log: &EntryLogger) -> Result<u64, StorageError> {
    let from = index.checkpoint()?;
    let mut tombstones = index.tombstones()?;
    let chunk_bytes = cfg.storage.write_cache_bytes.as_u64() / 2;
    let mut pending: BTreeMap<Key, Bytes> = BTreeMap::new();
    let mut pending_bytes = 0u64;
    let mut last = from;
    let mut failure: Option<StorageError> = None;
    let mut entries = 0u64;
    let flush = |pending: &mut BTreeMap<Key, Bytes>, upto: JournalPos| -> Result<(), StorageError> {
        let mut batch = FlushBatch::default();
        write_entries(log, pending.iter(), &mut batch, |_| Ok(()))?;
        log.sync()?;
        index.commit_flush(&batch, upto)?;
        pending.clear();
        Ok(())
    };
    // The largest entry any configuration allows, not the current one: lowering max_entry_bytes
    // must not make acknowledged records look corrupt.
    let max_record = crate::config::MAX_ENTRY_BYTES_LIMIT as usize + 64;
    let next_file = journal::replay(&cfg.journal_dir, from, max_record, |kind, body, pos| {
        if failure.is_some() {
            return;
        }
        match kind {
            format::KIND_ADD => match peek_header(&body) {
                Ok((l, e, _)) if !tombstones.contains_key(&l) => {
                    pending_bytes += body.len() as u64;
                    pending.insert((l, e), body);
                    entries += 1;
                }
                Ok(_) => {}
                Err(err) => warn!(error = %err, "skipping an unreadable journal record"),
            },
            format::KIND_FENCE if body.len() == 8 => {
                let l = ledger_of(&body);
                if !tombstones.contains_key(&l)
                    && let Err(err) = index.set_fenced(l)
                {
                    failure = Some(err.into());
                }
            }
            format::KIND_DELETE if body.len() == 8 => {
                // Every add of the ledger precedes its delete in the journal.
                let l = ledger_of(&body);
                pending.retain(|(pl, _), _| *pl != l);
                if let Err(err) = index.delete_ledger(l, pos.file_id) {
                    failure = Some(err.into());
                }
                tombstones.insert(l, pos.file_id);
            }
            other => warn!(kind = other, "skipping a journal record of unknown kind"),
        }
        last = pos;
        if pending_bytes >= chunk_bytes {
            if let Err(err) = flush(&mut pending, pos) {
                failure = Some(err);
            }
            pending_bytes = 0;
        }
    })?;
    if let Some(err) = failure {
        return Err(err);
    }
    // Everything replayed is now in entry logs; the next journal file starts clean.
    flush(&mut pending, JournalPos { file_id: next_file, offset: 0 })?;
    info!(entries, from = ?from, to = ?last, next_file, "recovered journal into entry logs");
    Ok(next_file)
}
