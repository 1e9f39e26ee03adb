//! Reading a ledger: each entry from a bookie of its write set, falling back to the other
//! replicas when one is down, slow or returns corrupt data. Every entry's digest is verified.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::join_all;
use magnetar_common::bookie_proto::{Reply, Request};
use magnetar_common::entry::Entry;

use super::meta::{self, LedgerMetadata};
use super::{LedgerError, Shared};

/// Most single-entry reads in flight at once for a striped fragment.
const STRIPED_READ_CONCURRENCY: u64 = 128;

/// A ledger open for reading.
#[derive(Debug)]
pub struct LedgerReader {
    shared: Arc<Shared>,
    md: LedgerMetadata,
    rotate: AtomicUsize,
}

impl LedgerReader {
    pub(crate) fn new(shared: Arc<Shared>, md: LedgerMetadata) -> Self {
        Self { shared, md, rotate: AtomicUsize::new(0) }
    }

    pub fn metadata(&self) -> &LedgerMetadata {
        &self.md
    }

    pub fn ledger_id(&self) -> u64 {
        self.md.ledger_id
    }

    /// Last entry of a closed ledger; for an open one, ask [`LedgerReader::read_lac`].
    pub fn last_entry(&self) -> Option<i64> {
        self.md.is_closed().then_some(self.md.last_entry_id)
    }

    /// The highest LAC reported by the bookies of the last fragment.
    pub async fn read_lac(&self) -> Result<i64, LedgerError> {
        let frag = self.md.last_fragment();
        let timeout = self.shared.config.read_timeout;
        let answers = join_all(
            frag.bookies
                .iter()
                .map(|b| self.shared.call(b, Request::ReadLac { ledger_id: self.md.ledger_id }, timeout)),
        )
        .await;
        let mut lac = frag.first_entry as i64 - 1;
        let mut any = false;
        let mut last_err = None;
        for a in answers {
            match a {
                Ok(Reply::ReadLac { lac: l, .. }) => {
                    any = true;
                    lac = lac.max(l);
                }
                Ok(_) => {}
                Err(LedgerError::Bookie { status: magnetar_common::bookie_proto::Status::NotFound, .. }) => any = true,
                Err(e) => last_err = Some(e),
            }
        }
        match (any, last_err) {
            (false, Some(e)) => Err(e),
            _ => Ok(lac),
        }
    }

    /// Reads entries `first..=last`, in order. For a closed ledger, past its last entry is an
    /// error. For an open ledger the caller bounds `last` by a LAC it knows (its own writer's, or
    /// [`LedgerReader::read_lac`]): entries past the LAC may be dropped by a later recovery.
    pub async fn read(&self, first: u64, last: u64) -> Result<Vec<Entry>, LedgerError> {
        if first > last {
            return Ok(Vec::new());
        }
        if last >= i64::MAX as u64 {
            return Err(LedgerError::Invalid(format!("entry id {last} is out of range")));
        }
        if let Some(end) = self.last_entry()
            && (end < 0 || last > end as u64)
        {
            return Err(LedgerError::Invalid(format!(
                "ledger {} ends at entry {end}; {last} was asked for",
                self.md.ledger_id
            )));
        }
        let mut out = Vec::with_capacity(last.saturating_sub(first).saturating_add(1).min(10_000) as usize);
        let mut next = first;
        while next <= last {
            let frag_index = self.md.fragments.partition_point(|f| f.first_entry <= next).saturating_sub(1);
            let frag_end =
                self.md.fragments.get(frag_index + 1).map_or(last, |f| f.first_entry.saturating_sub(1).min(last));
            let bookies = &self.md.fragments[frag_index].bookies;
            if bookies.len() == self.md.write_quorum {
                self.read_striped_none(bookies, next, frag_end, &mut out).await?;
            } else {
                // Entries striped over the ensemble: single reads, a bounded number at a time.
                let mut e = next;
                while e <= frag_end {
                    let chunk_end = frag_end.min(e.saturating_add(STRIPED_READ_CONCURRENCY - 1));
                    for r in join_all((e..=chunk_end).map(|x| self.read_one(bookies, x))).await {
                        out.push(r?);
                    }
                    e = chunk_end + 1;
                }
            }
            next = frag_end + 1;
        }
        Ok(out)
    }

    /// Every bookie of the fragment holds every entry: range reads from one, falling back.
    async fn read_striped_none(
        &self,
        bookies: &[String],
        first: u64,
        last: u64,
        out: &mut Vec<Entry>,
    ) -> Result<(), LedgerError> {
        let timeout = self.shared.config.read_timeout;
        let max_bytes = self.shared.config.read_batch_bytes.as_u64() as u32;
        let start = self.rotate.fetch_add(1, Ordering::Relaxed);
        let mut next = first;
        'outer: while next <= last {
            let mut last_err = None;
            for k in 0..bookies.len() {
                let b = &bookies[(start + k) % bookies.len()];
                let req = Request::ReadRange { ledger_id: self.md.ledger_id, first: next, last, max_bytes };
                match self.shared.call(b, req, timeout).await {
                    Ok(Reply::ReadRange { entries }) if !entries.is_empty() => {
                        let mut got = Vec::with_capacity(entries.len());
                        let mut bad = None;
                        for (i, raw) in entries.into_iter().enumerate() {
                            match self.verify(raw, next + i as u64) {
                                Ok(e) => got.push(e),
                                Err(e) => {
                                    bad = Some(e);
                                    break;
                                }
                            }
                        }
                        let n = got.len() as u64;
                        out.extend(got);
                        next += n;
                        if let Some(e) = bad {
                            last_err = Some(e);
                            continue;
                        }
                        continue 'outer;
                    }
                    Ok(_) => last_err = Some(LedgerError::Invalid(format!("bookie {b} sent an empty range"))),
                    Err(e) => last_err = Some(e),
                }
            }
            return Err(LedgerError::EntryUnavailable {
                ledger: self.md.ledger_id,
                entry: next,
                reason: last_err.map_or_else(|| "no bookie".into(), |e| e.to_string()),
            });
        }
        Ok(())
    }

    /// Reads one entry from the bookies of its write set, falling back on failure.
    pub async fn read_one(&self, bookies: &[String], entry: u64) -> Result<Entry, LedgerError> {
        let timeout = self.shared.config.read_timeout;
        let mut last_err = None;
        for idx in meta::write_set(entry, bookies.len(), self.md.write_quorum) {
            let b = &bookies[idx];
            match self.shared.call(b, Request::Read { ledger_id: self.md.ledger_id, entry_id: entry }, timeout).await {
                Ok(Reply::Read { entry: raw }) => match self.verify(raw, entry) {
                    Ok(e) => return Ok(e),
                    Err(e) => last_err = Some(e),
                },
                Ok(_) => {
                    last_err = Some(LedgerError::Invalid(format!("bookie {b} answered a read with another reply")))
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(LedgerError::EntryUnavailable {
            ledger: self.md.ledger_id,
            entry,
            reason: last_err.map_or_else(|| "no bookie".into(), |e| e.to_string()),
        })
    }

    fn verify(&self, raw: bytes::Bytes, entry: u64) -> Result<Entry, LedgerError> {
        let e = Entry::parse(raw).map_err(|err| LedgerError::EntryUnavailable {
            ledger: self.md.ledger_id,
            entry,
            reason: err.to_string(),
        })?;
        if e.ledger_id != self.md.ledger_id || e.entry_id != entry {
            return Err(LedgerError::EntryUnavailable {
                ledger: self.md.ledger_id,
                entry,
                reason: format!("bookie returned entry {}:{}", e.ledger_id, e.entry_id),
            });
        }
        Ok(e)
    }
}
