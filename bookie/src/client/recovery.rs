//! Open-for-recovery (what makes a writer's replacement safe):
//! 1. mark the ledger IN_RECOVERY (compare-and-swap);
//! 2. fence every bookie of the last fragment and wait until, in every write quorum, at least
//!    `Qw - Qa + 1` bookies are fenced: no add of the old writer can reach its ack quorum now;
//! 3. take the highest LAC they report, read forward from it and rewrite each entry found to its
//!    full write quorum (recovery adds, accepted on fenced ledgers), until an entry is reported
//!    missing by `Qw - Qa + 1` bookies (so it cannot have been acknowledged);
//! 4. compare-and-swap the metadata to CLOSED with the last entry found.

use std::sync::Arc;

use futures::future::join_all;
use magnetar_common::bookie_proto::{Reply, Request, Status};
use magnetar_common::metadata::MetadataError;
use tracing::info;

use super::meta::{self, LedgerState};
use super::reader::LedgerReader;
use super::writer::LedgerWriter;
use super::{LedgerError, Shared};

pub(super) async fn recover(shared: Arc<Shared>, ledger_id: u64) -> Result<LedgerReader, LedgerError> {
    let (mut md, mut version) = meta::read(&shared.store, ledger_id).await?;
    loop {
        match md.state {
            LedgerState::Closed => return Ok(LedgerReader::new(shared, md)),
            LedgerState::InRecovery => break,
            LedgerState::Open => {
                let mut next = md.clone();
                next.state = LedgerState::InRecovery;
                match meta::cas(&shared.store, &next, version).await {
                    Ok(v) => {
                        md = next;
                        version = v;
                        break;
                    }
                    Err(MetadataError::Conflict { .. }) => (md, version) = meta::read(&shared.store, ledger_id).await?,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    let frag = md.last_fragment().clone();
    let (e, qw, qa) = (frag.bookies.len(), md.write_quorum, md.ack_quorum);
    let timeout = shared.config.read_timeout;
    let answers = join_all(frag.bookies.iter().map(|b| shared.call(b, Request::Fence { ledger_id }, timeout))).await;
    let mut fenced = vec![false; e];
    let mut lac = frag.first_entry as i64 - 1;
    let mut errors = Vec::new();
    for (i, a) in answers.into_iter().enumerate() {
        match a {
            Ok(Reply::Fence { lac: l, .. }) => {
                fenced[i] = true;
                lac = lac.max(l);
            }
            Ok(_) => errors.push(format!("{}: unexpected reply", frag.bookies[i])),
            Err(err) => errors.push(format!("{}: {err}", frag.bookies[i])),
        }
    }
    let need = qw - qa + 1;
    for start in 0..e {
        let n = meta::write_set(start as u64, e, qw).into_iter().filter(|&i| fenced[i]).count();
        if n < need {
            return Err(LedgerError::Unavailable(format!(
                "could not fence enough bookies of ledger {ledger_id} (need {need} per write quorum): {}",
                errors.join("; ")
            )));
        }
    }
    // Read forward from the LAC and rewrite what is found.
    let writer = LedgerWriter::start(shared.clone(), md.clone(), version, lac, true);
    let mut acks = Vec::new();
    let mut next = (lac + 1) as u64;
    loop {
        let ws = meta::write_set(next, e, qw);
        let reads =
            ws.iter().map(|&i| shared.call(&frag.bookies[i], Request::Read { ledger_id, entry_id: next }, timeout));
        let mut found = None;
        let mut missing = 0;
        let mut errs = Vec::new();
        for r in join_all(reads).await {
            match r {
                Ok(Reply::Read { entry }) => match magnetar_common::entry::Entry::parse(entry) {
                    Ok(en) if en.ledger_id == ledger_id && en.entry_id == next => found = Some(en.into_raw()),
                    Ok(_) | Err(_) => errs.push("corrupt copy".to_string()),
                },
                Err(LedgerError::Bookie { status: Status::NotFound, .. }) => missing += 1,
                Ok(_) => errs.push("unexpected reply".into()),
                Err(err) => errs.push(err.to_string()),
            }
        }
        if let Some(raw) = found {
            acks.push(writer.append_raw(next, raw));
            next += 1;
        } else if missing >= need {
            break;
        } else {
            return Err(LedgerError::Unavailable(format!(
                "recovery of ledger {ledger_id} cannot tell whether entry {next} exists: {}",
                errs.join("; ")
            )));
        }
    }
    for r in join_all(acks).await {
        r?;
    }
    let (mut md, version) = writer.finish().await?;
    md.state = LedgerState::Closed;
    md.last_entry_id = next as i64 - 1;
    match meta::cas(&shared.store, &md, version).await {
        Ok(_) => {
            info!(
                ledger_id,
                last_entry = md.last_entry_id,
                recovered = next as i64 - 1 - lac,
                "ledger recovered and closed"
            );
            Ok(LedgerReader::new(shared, md))
        }
        Err(MetadataError::Conflict { .. }) => {
            let (fresh, _) = meta::read(&shared.store, ledger_id).await?;
            if fresh.is_closed() {
                Ok(LedgerReader::new(shared, fresh))
            } else {
                Err(LedgerError::Unavailable(format!("ledger {ledger_id} changed during recovery; retry")))
            }
        }
        Err(err) => Err(err.into()),
    }
}
