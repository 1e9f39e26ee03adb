//! Repairing one ledger: for each fragment with a lost bookie, plan its new ensemble, copy the
//! entries the new ensemble is missing from surviving replicas (recovery adds), then swap the
//! ensemble in by compare-and-swap on the ledger metadata.
//!
//! The plan keeps the striping when it can: each lost bookie is replaced **in place** by a live,
//! writable bookie outside the fragment, so only the entries whose write set held the lost bookie
//! are copied. When there are fewer spares than lost bookies the remaining lost bookies are
//! **dropped** (as the writer does), as long as the fragment keeps `Qw` bookies; the write sets
//! then change for every entry, and each bookie of an entry's new write set that does not hold it
//! gets a copy.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::join_all;
use magnetar_common::bookie_proto::{ADD_FLAG_RECOVERY, Reply, Request, Status};
use magnetar_common::entry::Entry;
use magnetar_common::metadata::MetadataError;
use tracing::{error, info, warn};

use super::{Ctx, FragmentKey};
use crate::client::LedgerError;
use crate::client::meta::{self, LedgerMetadata, LedgerState, write_set};

/// Entries of one fragment being copied at once (under the shared byte budget too).
const MAX_ENTRIES_IN_FLIGHT: usize = 64;
/// Bytes reserved for an entry before its size is known, until a larger one is seen.
const INITIAL_ENTRY_ESTIMATE: u64 = 64 * 1024;
/// Tries per entry (read plus writes) before the fragment's repair fails for this scan.
const ENTRY_ATTEMPTS: u32 = 3;
const ENTRY_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Compare-and-swap attempts for one fragment whose range and ensemble stay the same.
const MAX_CAS_ATTEMPTS: usize = 16;
/// Lost entry ids named in a log line.
const LOGGED_ENTRIES: usize = 10;

/// What repairing a ledger came to.
#[derive(Debug, Default)]
pub(super) struct LedgerOutcome {
    /// The ledger references only live bookies now, or no longer exists.
    pub healthy: bool,
    /// Something failed; the next scan tries again.
    pub failed: bool,
    /// Fragments found holding entries with no surviving copy, with how many.
    pub unrecoverable: Vec<(FragmentKey, u64)>,
}

enum Step {
    /// The fragment has its new ensemble.
    Repaired,
    /// The ledger was deleted.
    Vanished,
    /// The fragment changed under us (another auditor, a writer, a recovery): plan again.
    Changed,
    /// Entries with no surviving copy: left as it is, reported.
    Unrecoverable(u64),
}

/// Repairs every fragment of `ledger_id` that references a lost bookie and that auto-recovery
/// may touch, one after the other.
pub(super) async fn repair_ledger(
    ctx: &Ctx,
    ledger_id: u64,
    lost: &HashSet<String>,
    known_unrecoverable: &HashMap<FragmentKey, u64>,
) -> LedgerOutcome {
    let mut out = LedgerOutcome::default();
    let mut skip: HashSet<FragmentKey> = known_unrecoverable.keys().cloned().collect();
    // Each step repairs a fragment, skips one, or re-reads after a concurrent change.
    let mut steps_left = 1024usize;
    loop {
        let (md, version) = match meta::read(&ctx.shared.store, ledger_id).await {
            Ok(v) => v,
            Err(LedgerError::NoSuchLedger(_)) => {
                out.healthy = true;
                return out;
            }
            Err(e) => {
                warn!(ledger_id, error = %e, "auto-recovery: read ledger metadata; retrying at the next scan");
                out.failed = true;
                return out;
            }
        };
        if md.bookie_copies_deleted() {
            out.healthy = true;
            return out;
        }
        let live: HashSet<String> = ctx.shared.registry.live().into_iter().map(|r| r.bookie_id).collect();
        let next = (0..md.fragments.len()).find(|&i| {
            let f = &md.fragments[i];
            repairable_range(&md, i).is_some()
                && f.bookies.iter().any(|b| lost.contains(b))
                // A bookie absent but still within its grace period may come back: wait for it.
                && f.bookies.iter().all(|b| live.contains(b) || lost.contains(b))
                && !skip.contains(&FragmentKey::of(&md, i))
        });
        let Some(index) = next else {
            out.healthy = md.fragments.iter().flat_map(|f| &f.bookies).all(|b| live.contains(b));
            return out;
        };
        steps_left = steps_left.saturating_sub(1);
        if steps_left == 0 {
            warn!(ledger_id, "auto-recovery: ledger keeps changing; retrying at the next scan");
            out.failed = true;
            return out;
        }
        match repair_fragment(ctx, &md, version, index, lost).await {
            Ok(Step::Repaired | Step::Changed) => {}
            Ok(Step::Vanished) => {
                out.healthy = true;
                return out;
            }
            Ok(Step::Unrecoverable(n)) => {
                let key = FragmentKey::of(&md, index);
                skip.insert(key.clone());
                out.unrecoverable.push((key, n));
            }
            Err(e) => {
                warn!(
                    ledger_id,
                    first_entry = md.fragments[index].first_entry,
                    error = %e,
                    "auto-recovery: repair fragment; retrying at the next scan"
                );
                out.failed = true;
                return out;
            }
        }
    }
}

/// Entries `first..=last` of fragment `index` that auto-recovery may repair: `None` when the
/// fragment is not its to touch (the last fragment of a ledger that is not closed, which its
/// writer owns, or any fragment of a ledger in recovery); `Some(None)` when it holds no entry.
pub(super) fn repairable_range(md: &LedgerMetadata, index: usize) -> Option<Option<(u64, u64)>> {
    if md.state == LedgerState::InRecovery {
        return None;
    }
    let first = md.fragments.get(index)?.first_entry;
    let last: i64 = match md.fragments.get(index + 1) {
        Some(next) => next.first_entry as i64 - 1,
        None if md.is_closed() => md.last_entry_id,
        None => return None,
    };
    Some((last >= first as i64).then_some((first, last as u64)))
}

/// The fragment's new ensemble: each lost bookie replaced in place by a spare while spares
/// last, the others dropped. `None` if fewer than `qw` bookies would remain.
pub(super) fn plan_ensemble(
    old: &[String],
    lost: &HashSet<String>,
    spares: &[String],
    qw: usize,
) -> Option<Vec<String>> {
    let mut spares = spares.iter();
    let new: Vec<String> =
        old.iter().filter_map(|b| if lost.contains(b) { spares.next().cloned() } else { Some(b.clone()) }).collect();
    (new.len() >= qw).then_some(new)
}

/// One entry to copy: bookies that should hold it (its old write set minus lost bookies) and
/// bookies of its new write set that do not.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct EntryCopy {
    pub entry: u64,
    pub holders: Vec<String>,
    pub targets: Vec<String>,
}

pub(super) fn entry_copy(
    old: &[String],
    new: &[String],
    lost: &HashSet<String>,
    qw: usize,
    entry: u64,
) -> Option<EntryCopy> {
    let holders: Vec<String> =
        write_set(entry, old.len(), qw).into_iter().map(|i| &old[i]).filter(|b| !lost.contains(*b)).cloned().collect();
    let targets: Vec<String> = write_set(entry, new.len(), qw)
        .into_iter()
        .map(|i| &new[i])
        .filter(|b| !holders.contains(b))
        .cloned()
        .collect();
    (!targets.is_empty()).then_some(EntryCopy { entry, holders, targets })
}

async fn repair_fragment(
    ctx: &Ctx,
    md: &LedgerMetadata,
    version: u64,
    index: usize,
    lost: &HashSet<String>,
) -> Result<Step, LedgerError> {
    let ledger_id = md.ledger_id;
    let frag = md.fragments[index].clone();
    let range = repairable_range(md, index).ok_or_else(|| LedgerError::Invalid("fragment not repairable".into()))?;
    let qw = md.write_quorum;
    let lost_here: Vec<&String> = frag.bookies.iter().filter(|b| lost.contains(*b)).collect();
    let spares = match ctx.shared.registry.choose_writable(lost_here.len(), &frag.bookies) {
        Ok(s) => s,
        Err(LedgerError::NotEnoughBookies { found, .. }) => {
            ctx.shared.registry.choose_writable(found, &frag.bookies)?
        }
        Err(e) => return Err(e),
    };
    // Not enough spares to keep Qw bookies: the survivors plus this many spares would be needed.
    let need = qw.saturating_sub(frag.bookies.len() - lost_here.len());
    let Some(new) = plan_ensemble(&frag.bookies, lost, &spares, qw) else {
        let read_only =
            ctx.shared.registry.live().iter().filter(|r| r.read_only && !frag.bookies.contains(&r.bookie_id)).count();
        return Err(LedgerError::NotEnoughBookies { need, found: spares.len(), read_only });
    };

    if let Some((first, last)) = range {
        // Entries whose every replica was on lost bookies: known without asking anyone.
        let hopeless: Vec<u64> = (first..=last)
            .filter(|&e| entry_copy(&frag.bookies, &new, lost, qw, e).is_some_and(|c| c.holders.is_empty()))
            .collect();
        if !hopeless.is_empty() {
            report_unrecoverable(ledger_id, &frag.bookies, &lost_here, &hopeless, hopeless.len() as u64);
            return Ok(Step::Unrecoverable(hopeless.len() as u64));
        }
        let copied =
            copy_entries(ctx, ledger_id, (first..=last).filter_map(|e| entry_copy(&frag.bookies, &new, lost, qw, e)))
                .await;
        if copied.failure.is_some() || copied.missing > 0 {
            // A deleted ledger answers NotFound too: that is not a loss.
            if let Err(LedgerError::NoSuchLedger(_)) = meta::read(&ctx.shared.store, ledger_id).await {
                forget_copies(ctx, ledger_id, &new, &frag.bookies).await;
                return Ok(Step::Vanished);
            }
        }
        if let Some(e) = copied.failure {
            return Err(LedgerError::Unavailable(e));
        }
        if copied.missing > 0 {
            report_unrecoverable(ledger_id, &frag.bookies, &lost_here, &copied.missing_ids, copied.missing);
            return Ok(Step::Unrecoverable(copied.missing));
        }
        info!(
            ledger_id,
            first_entry = first,
            last_entry = last,
            entries = copied.entries,
            bytes = copied.bytes,
            "auto-recovery: entries copied"
        );
    }

    // Swap the ensemble in, on fresh metadata if only unrelated parts changed.
    let mut base = md.clone();
    let mut base_version = version;
    for _ in 0..MAX_CAS_ATTEMPTS {
        let mut next = base.clone();
        next.fragments[index].bookies = new.clone();
        match meta::cas(&ctx.shared.store, &next, base_version).await {
            Ok(_) => {
                ctx.metrics.fragments_rereplicated.inc();
                info!(
                    ledger_id,
                    first_entry = frag.first_entry,
                    lost = ?lost_here,
                    old = ?frag.bookies,
                    new = ?new,
                    "auto-recovery: fragment re-replicated"
                );
                return Ok(Step::Repaired);
            }
            Err(MetadataError::Conflict { .. }) => match meta::read(&ctx.shared.store, ledger_id).await {
                Ok((fresh, v)) => {
                    if fresh.fragments.get(index) != Some(&frag) || repairable_range(&fresh, index) != Some(range) {
                        return Ok(Step::Changed);
                    }
                    base = fresh;
                    base_version = v;
                }
                Err(LedgerError::NoSuchLedger(_)) => {
                    forget_copies(ctx, ledger_id, &new, &frag.bookies).await;
                    return Ok(Step::Vanished);
                }
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Step::Changed)
}

fn report_unrecoverable(ledger_id: u64, bookies: &[String], lost: &[&String], ids: &[u64], count: u64) {
    error!(
        ledger_id,
        ensemble = ?bookies,
        lost = ?lost,
        entries = count,
        first_ids = ?&ids[..ids.len().min(LOGGED_ENTRIES)],
        "auto-recovery: entries have no surviving copy; the fragment is left as it is. Bring a lost bookie \
         back with its disks, or accept the loss and delete the ledger"
    );
}

/// A deleted ledger's copies on bookies outside its last known ensemble would never get the
/// ledger's `Delete`: send it to them (best effort).
async fn forget_copies(ctx: &Ctx, ledger_id: u64, new: &[String], old: &[String]) {
    let timeout = ctx.shared.config.read_timeout;
    for b in new.iter().filter(|b| !old.contains(b)) {
        let _ = ctx.shared.call(b, Request::Delete { ledger_id }, timeout).await;
    }
}

#[derive(Debug, Default)]
struct CopyTotals {
    entries: u64,
    bytes: u64,
    /// Entries no holder had.
    missing: u64,
    missing_ids: Vec<u64>,
    /// The first copy that failed (the rest were abandoned).
    failure: Option<String>,
}

enum Copied {
    Done { bytes: u64 },
    Missing,
    Failed(String),
}

async fn copy_entries(ctx: &Ctx, ledger_id: u64, copies: impl Iterator<Item = EntryCopy>) -> CopyTotals {
    let estimate = AtomicU64::new(INITIAL_ENTRY_ESTIMATE);
    let mut results = futures::stream::iter(copies)
        .map(|c| copy_one(ctx, ledger_id, c, &estimate))
        .buffer_unordered(MAX_ENTRIES_IN_FLIGHT);
    let mut totals = CopyTotals::default();
    while let Some((entry, r)) = results.next().await {
        match r {
            Copied::Done { bytes } => {
                totals.entries += 1;
                totals.bytes += bytes;
                ctx.metrics.entries_rereplicated.inc();
                ctx.metrics.bytes_rereplicated.inc_by(bytes);
            }
            Copied::Missing => {
                totals.missing += 1;
                if totals.missing_ids.len() < LOGGED_ENTRIES {
                    totals.missing_ids.push(entry);
                }
            }
            Copied::Failed(e) => {
                // Stop here: the rest would most likely fail the same way.
                totals.failure = Some(format!("copy entry {ledger_id}:{entry}: {e}"));
                break;
            }
        }
    }
    totals.missing_ids.sort_unstable();
    totals
}

async fn copy_one(ctx: &Ctx, ledger_id: u64, c: EntryCopy, estimate: &AtomicU64) -> (u64, Copied) {
    let budget = ctx.config.max_inflight_bytes.as_u64().clamp(1, u32::MAX as u64);
    let want = estimate.load(Ordering::Relaxed).clamp(1, budget) as u32;
    let Ok(_permit) = ctx.bytes.acquire_many(want).await else {
        return (c.entry, Copied::Failed("auto-recovery is stopping".into()));
    };
    let mut last_err = String::new();
    for attempt in 0..ENTRY_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(ENTRY_RETRY_DELAY * attempt).await;
        }
        let raw = match read_copy(ctx, ledger_id, c.entry, &c.holders).await {
            Ok(Some(raw)) => raw,
            Ok(None) => return (c.entry, Copied::Missing),
            Err(e) => {
                last_err = e;
                continue;
            }
        };
        estimate.fetch_max(raw.len() as u64, Ordering::Relaxed);
        match write_copies(ctx, &raw, &c.targets).await {
            Ok(()) => return (c.entry, Copied::Done { bytes: raw.len() as u64 * c.targets.len() as u64 }),
            Err(e) => last_err = e,
        }
    }
    (c.entry, Copied::Failed(last_err))
}

/// The entry from the first holder with a valid copy; `None` if every holder answered
/// `NotFound` (or there is no holder).
async fn read_copy(ctx: &Ctx, ledger_id: u64, entry: u64, holders: &[String]) -> Result<Option<Bytes>, String> {
    let timeout = ctx.shared.config.read_timeout;
    let mut errors = Vec::new();
    for h in holders {
        match ctx.shared.call(h, Request::Read { ledger_id, entry_id: entry }, timeout).await {
            Ok(Reply::Read { entry: raw }) => match Entry::parse(raw) {
                Ok(e) if e.ledger_id == ledger_id && e.entry_id == entry => return Ok(Some(e.into_raw())),
                Ok(e) => errors.push(format!("{h} returned entry {}:{}", e.ledger_id, e.entry_id)),
                Err(err) => errors.push(format!("{h} returned a corrupt copy: {err}")),
            },
            Ok(_) => errors.push(format!("{h} answered a read with another reply")),
            Err(LedgerError::Bookie { status: Status::NotFound, .. }) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    if errors.is_empty() { Ok(None) } else { Err(errors.join("; ")) }
}

async fn write_copies(ctx: &Ctx, raw: &Bytes, targets: &[String]) -> Result<(), String> {
    let timeout = ctx.shared.config.add_timeout;
    let adds = targets
        .iter()
        .map(|t| ctx.shared.call(t, Request::Add { flags: ADD_FLAG_RECOVERY, entry: raw.clone() }, timeout));
    let errors: Vec<String> = join_all(adds).await.into_iter().filter_map(|r| r.err().map(|e| e.to_string())).collect();
    if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::meta::Fragment;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn set(v: &[&str]) -> HashSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn ledger(state: LedgerState, last_entry_id: i64, fragments: &[(u64, &[&str])]) -> LedgerMetadata {
        LedgerMetadata {
            ledger_id: 7,
            ensemble_size: 3,
            write_quorum: 2,
            ack_quorum: 2,
            state,
            last_entry_id,
            length: 0,
            fragments: fragments.iter().map(|(f, b)| Fragment { first_entry: *f, bookies: ids(b) }).collect(),
            created_at_ms: 0,
            custom: Default::default(),
            offload: None,
        }
    }

    #[test]
    fn only_fragments_no_writer_or_recoverer_owns_are_repairable() {
        let frags: &[(u64, &[&str])] = &[(0, &["a", "b", "c"]), (10, &["a", "b", "d"]), (10, &["a", "b", "e"])];
        let open = ledger(LedgerState::Open, -1, &frags[..2]);
        assert_eq!(repairable_range(&open, 0), Some(Some((0, 9))));
        assert_eq!(repairable_range(&open, 1), None, "the open ledger's writer owns its last fragment");
        let closed = ledger(LedgerState::Closed, 25, &frags[..2]);
        assert_eq!(repairable_range(&closed, 1), Some(Some((10, 25))));
        let empty_tail = ledger(LedgerState::Closed, 9, &frags[..2]);
        assert_eq!(repairable_range(&empty_tail, 1), Some(None));
        let recovering = ledger(LedgerState::InRecovery, -1, &frags[..2]);
        assert_eq!(repairable_range(&recovering, 0), None);
        assert_eq!(repairable_range(&closed, 5), None);
    }

    #[test]
    fn lost_bookies_are_replaced_in_place_then_dropped_down_to_the_write_quorum() {
        let old = ids(&["a", "b", "c"]);
        assert_eq!(plan_ensemble(&old, &set(&["b"]), &ids(&["x"]), 2), Some(ids(&["a", "x", "c"])));
        assert_eq!(plan_ensemble(&old, &set(&["b"]), &[], 2), Some(ids(&["a", "c"])));
        assert_eq!(plan_ensemble(&old, &set(&["a", "c"]), &ids(&["x"]), 2), Some(ids(&["x", "b"])));
        assert_eq!(plan_ensemble(&old, &set(&["a", "c"]), &[], 2), None, "below the write quorum");
    }

    #[test]
    fn in_place_replacement_copies_only_entries_the_lost_bookie_held() {
        let (old, new, lost) = (ids(&["a", "b", "c"]), ids(&["a", "x", "c"]), set(&["b"]));
        // E=3, Qw=2: entry 0 -> a,b; 1 -> b,c; 2 -> c,a.
        let c0 = entry_copy(&old, &new, &lost, 2, 0).expect("entry 0 was on b");
        assert_eq!((c0.holders, c0.targets), (ids(&["a"]), ids(&["x"])));
        let c1 = entry_copy(&old, &new, &lost, 2, 1).expect("entry 1 was on b");
        assert_eq!((c1.holders, c1.targets), (ids(&["c"]), ids(&["x"])));
        assert_eq!(entry_copy(&old, &new, &lost, 2, 2), None, "entry 2 never was on b");
    }

    #[test]
    fn a_shrunk_ensemble_gets_every_entry_on_every_remaining_bookie() {
        let (old, new, lost) = (ids(&["a", "b", "c"]), ids(&["a", "c"]), set(&["b"]));
        // With two bookies left and Qw=2, both hold every entry.
        let c0 = entry_copy(&old, &new, &lost, 2, 0).expect("entry 0: a,b -> a,c");
        assert_eq!((c0.holders, c0.targets), (ids(&["a"]), ids(&["c"])));
        let c1 = entry_copy(&old, &new, &lost, 2, 1).expect("entry 1: b,c -> c,a");
        assert_eq!((c1.holders, c1.targets), (ids(&["c"]), ids(&["a"])));
        assert_eq!(entry_copy(&old, &new, &lost, 2, 2), None, "entry 2: c,a stays");
    }

    #[test]
    fn an_entry_whose_replicas_are_all_lost_has_no_holder() {
        let (old, new, lost) = (ids(&["a", "b", "c"]), ids(&["x", "y", "c"]), set(&["a", "b"]));
        let c0 = entry_copy(&old, &new, &lost, 2, 0).expect("entry 0 was on a,b");
        assert!(c0.holders.is_empty());
        assert_eq!(c0.targets, ids(&["x", "y"]));
    }
}
