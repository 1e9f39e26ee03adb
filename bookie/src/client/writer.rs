//! The write handle of a ledger: one actor task owns the ledger's write state.
//!
//! Entry `e` is sent to its write set (`Qw` bookies from `e mod E`); it is acknowledged once `Qa`
//! of them stored it and every lower entry is acknowledged, which advances the last-add-confirmed
//! (LAC) piggybacked on later entries. A bookie that fails an add is replaced: the writer picks a
//! live bookie outside the ensemble, starts a new fragment at the first unacknowledged entry by
//! compare-and-swap on the ledger metadata, and resends the unacknowledged entries it held. A
//! fenced answer, or metadata no longer open, ends the writer: it never writes past a fence.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use magnetar_common::bookie_proto::{ADD_FLAG_RECOVERY, Reply, Request, Status};
use magnetar_common::entry::encode_entry;
use magnetar_common::metadata::{MetadataError, Version};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::meta::{self, Fragment, LedgerMetadata, LedgerState};
use super::{LedgerError, Shared};

type Reply1 = oneshot::Sender<Result<u64, LedgerError>>;

/// An overloaded bookie is retried after this delay...
const OVERLOADED_RETRY_DELAY: Duration = Duration::from_millis(50);
/// ...this many times for one entry (about 5 s), then replaced like a failed bookie.
const MAX_OVERLOADED_RETRIES: u32 = 100;
/// Compare-and-swap attempts of a close that conflicts with auto-recovery's changes to earlier
/// fragments (each conflict is one fragment repaired meanwhile).
const MAX_CLOSE_ATTEMPTS: usize = 64;

enum Cmd {
    Append { payload: Bytes, reply: Reply1 },
    AppendRaw { entry_id: u64, raw: Bytes, reply: Reply1 },
    Close { reply: oneshot::Sender<Result<LedgerMetadata, LedgerError>> },
    Finish { reply: oneshot::Sender<Result<(LedgerMetadata, Version), LedgerError>> },
}

struct AddDone {
    entry_id: u64,
    bookie: String,
    result: Result<Reply, LedgerError>,
}

struct Pending {
    entry_id: u64,
    raw: Bytes,
    payload_len: u64,
    /// Bookies of the entry's current write set that stored it.
    acked: Vec<String>,
    /// "Overloaded" answers so far; past a bound the bookie is treated as failed.
    overloaded: u32,
    reply: Option<Reply1>,
}

/// Handle to a ledger open for writing. Dropping it stops the writer (pending adds fail);
/// call [`LedgerWriter::close`] to seal the ledger.
#[derive(Debug)]
pub struct LedgerWriter {
    ledger_id: u64,
    tx: mpsc::UnboundedSender<Cmd>,
    lac: Arc<AtomicI64>,
}

impl LedgerWriter {
    pub(crate) fn start(shared: Arc<Shared>, md: LedgerMetadata, version: Version, lac: i64, recovery: bool) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let lac_shared = Arc::new(AtomicI64::new(lac));
        let ledger_id = md.ledger_id;
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let actor = Actor {
            shared,
            md,
            version,
            next_entry: (lac + 1) as u64,
            lac,
            lac_shared: lac_shared.clone(),
            pending: VecDeque::new(),
            waiting: VecDeque::new(),
            pending_bytes: 0,
            length: 0,
            failed: None,
            recovery,
            ev_tx,
            closing: None,
        };
        tokio::spawn(actor.run(rx, ev_rx));
        Self { ledger_id, tx, lac: lac_shared }
    }

    pub fn ledger_id(&self) -> u64 {
        self.ledger_id
    }

    /// Last entry acknowledged to this writer (-1: none).
    pub fn last_add_confirmed(&self) -> i64 {
        self.lac.load(Ordering::Acquire)
    }

    /// Queues an entry now (entry ids follow call order) and returns a future of its entry id,
    /// resolved once the entry is acknowledged by the ack quorum.
    pub fn append(&self, payload: Bytes) -> impl Future<Output = Result<u64, LedgerError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(Cmd::Append { payload, reply }).is_ok();
        let ledger_id = self.ledger_id;
        async move {
            if !sent {
                return Err(LedgerError::Closed(ledger_id));
            }
            rx.await.unwrap_or(Err(LedgerError::Closed(ledger_id)))
        }
    }

    /// Recovery: rewrites an already encoded entry (ids strictly following each other).
    pub(crate) fn append_raw(
        &self,
        entry_id: u64,
        raw: Bytes,
    ) -> impl Future<Output = Result<u64, LedgerError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(Cmd::AppendRaw { entry_id, raw, reply }).is_ok();
        let ledger_id = self.ledger_id;
        async move {
            if !sent {
                return Err(LedgerError::Closed(ledger_id));
            }
            rx.await.unwrap_or(Err(LedgerError::Closed(ledger_id)))
        }
    }

    /// Waits for every queued entry, then closes the ledger at the LAC.
    pub async fn close(&self) -> Result<LedgerMetadata, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Cmd::Close { reply }).map_err(|_| LedgerError::Closed(self.ledger_id))?;
        rx.await.unwrap_or(Err(LedgerError::Closed(self.ledger_id)))
    }

    /// Recovery: waits for every queued entry and returns the metadata as it now stands.
    pub(crate) async fn finish(&self) -> Result<(LedgerMetadata, Version), LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Cmd::Finish { reply }).map_err(|_| LedgerError::Closed(self.ledger_id))?;
        rx.await.unwrap_or(Err(LedgerError::Closed(self.ledger_id)))
    }
}

enum Closing {
    Close(oneshot::Sender<Result<LedgerMetadata, LedgerError>>),
    Finish(oneshot::Sender<Result<(LedgerMetadata, Version), LedgerError>>),
}

struct Actor {
    shared: Arc<Shared>,
    md: LedgerMetadata,
    version: Version,
    next_entry: u64,
    lac: i64,
    lac_shared: Arc<AtomicI64>,
    pending: VecDeque<Pending>,
    /// Appends held back while `pending_bytes` is at its limit.
    waiting: VecDeque<Pending>,
    pending_bytes: u64,
    length: u64,
    failed: Option<LedgerError>,
    recovery: bool,
    ev_tx: mpsc::UnboundedSender<AddDone>,
    closing: Option<Closing>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>, mut ev_rx: mpsc::UnboundedReceiver<AddDone>) {
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.on_cmd(cmd).await,
                    None => {
                        if self.pending.is_empty() && self.waiting.is_empty() {
                            return;
                        }
                        // Handle dropped: let the queued entries finish, then stop.
                        while let Some(ev) = ev_rx.recv().await {
                            self.on_done(ev).await;
                            if self.pending.is_empty() && self.waiting.is_empty() {
                                return;
                            }
                        }
                        return;
                    }
                },
                Some(ev) = ev_rx.recv() => self.on_done(ev).await,
            }
            if self.closing.is_some() && self.pending.is_empty() && self.waiting.is_empty() {
                self.complete_closing().await;
            }
        }
    }

    async fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Append { payload, reply } => {
                if let Some(err) = self.refusal() {
                    let _ = reply.send(Err(err));
                    return;
                }
                let entry_id = self.next_entry;
                self.next_entry += 1;
                // The LAC piggybacked is the one known when the entry is sent.
                let raw = encode_entry(self.md.ledger_id, entry_id, self.lac, &payload);
                self.enqueue(Pending {
                    entry_id,
                    raw,
                    payload_len: payload.len() as u64,
                    acked: Vec::new(),
                    overloaded: 0,
                    reply: Some(reply),
                });
            }
            Cmd::AppendRaw { entry_id, raw, reply } => {
                if let Some(err) = self.refusal() {
                    let _ = reply.send(Err(err));
                    return;
                }
                if entry_id != self.next_entry {
                    let _ = reply.send(Err(LedgerError::Invalid(format!(
                        "recovery add of entry {entry_id}, expected {}",
                        self.next_entry
                    ))));
                    return;
                }
                self.next_entry += 1;
                let payload_len = raw.len().saturating_sub(magnetar_common::entry::ENTRY_HEADER_BYTES) as u64;
                self.enqueue(Pending {
                    entry_id,
                    raw,
                    payload_len,
                    acked: Vec::new(),
                    overloaded: 0,
                    reply: Some(reply),
                });
            }
            Cmd::Close { reply } => self.closing = Some(Closing::Close(reply)),
            Cmd::Finish { reply } => self.closing = Some(Closing::Finish(reply)),
        }
    }

    fn refusal(&self) -> Option<LedgerError> {
        if let Some(e) = &self.failed {
            return Some(e.clone());
        }
        if self.closing.is_some() {
            return Some(LedgerError::Closed(self.md.ledger_id));
        }
        None
    }

    fn enqueue(&mut self, p: Pending) {
        let limit = self.shared.config.max_pending_add_bytes.as_u64();
        if self.pending_bytes >= limit || !self.waiting.is_empty() {
            self.waiting.push_back(p);
            return;
        }
        self.pending_bytes += p.raw.len() as u64;
        let (entry_id, raw) = (p.entry_id, p.raw.clone());
        self.pending.push_back(p);
        for bookie in self.write_set(entry_id) {
            self.send(entry_id, raw.clone(), bookie, Duration::ZERO);
        }
    }

    /// Pending entries all belong to the last fragment.
    fn write_set(&self, entry_id: u64) -> Vec<String> {
        self.md.last_fragment().write_set_ids(entry_id, self.md.write_quorum)
    }

    fn send(&self, entry_id: u64, raw: Bytes, bookie: String, delay: Duration) {
        let shared = self.shared.clone();
        let ev_tx = self.ev_tx.clone();
        let flags = if self.recovery { ADD_FLAG_RECOVERY } else { 0 };
        let timeout = shared.config.add_timeout;
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let result = shared.call(&bookie, Request::Add { flags, entry: raw }, timeout).await;
            let _ = ev_tx.send(AddDone { entry_id, bookie, result });
        });
    }

    async fn on_done(&mut self, ev: AddDone) {
        let Some(front) = self.pending.front() else { return };
        let Some(pos) = ev.entry_id.checked_sub(front.entry_id) else { return };
        let pos = pos as usize;
        if pos >= self.pending.len() || self.failed.is_some() {
            return;
        }
        // An answer from a bookie replaced since the add was sent does not count.
        if !self.write_set(ev.entry_id).contains(&ev.bookie) {
            return;
        }
        match ev.result {
            Ok(_) => {
                let acked = &mut self.pending[pos].acked;
                if !acked.contains(&ev.bookie) {
                    acked.push(ev.bookie);
                }
                self.advance();
            }
            Err(e) if e.status() == Some(Status::Fenced) => {
                warn!(ledger_id = self.md.ledger_id, bookie = %ev.bookie, "ledger fenced: another writer recovered it");
                self.fail(LedgerError::Fenced(self.md.ledger_id));
            }
            Err(e) if matches!(e.status(), Some(Status::TooLarge | Status::BadRequest)) => {
                // The entry itself is refused: another bookie would refuse it too.
                warn!(ledger_id = self.md.ledger_id, bookie = %ev.bookie, error = %e, "entry refused; the writer stops");
                self.fail(e);
            }
            Err(e)
                if e.status() == Some(Status::Overloaded) && self.pending[pos].overloaded < MAX_OVERLOADED_RETRIES =>
            {
                self.pending[pos].overloaded += 1;
                let raw = self.pending[pos].raw.clone();
                self.send(ev.entry_id, raw, ev.bookie, OVERLOADED_RETRY_DELAY);
            }
            Err(e) => {
                warn!(ledger_id = self.md.ledger_id, bookie = %ev.bookie, entry = ev.entry_id, error = %e, "add failed; replacing the bookie");
                if let Err(err) = self.replace_bookie(&ev.bookie).await {
                    self.fail(err);
                }
            }
        }
    }

    /// Acknowledges the longest prefix of pending entries that reached the ack quorum.
    fn advance(&mut self) {
        // Recovery rewrites each entry to its full write quorum before it counts.
        let need = if self.recovery { self.md.write_quorum } else { self.md.ack_quorum };
        while self.pending.front().is_some_and(|p| p.acked.len() >= need) {
            let Some(mut p) = self.pending.pop_front() else { break };
            self.lac = p.entry_id as i64;
            self.length += p.payload_len;
            self.pending_bytes -= p.raw.len() as u64;
            if let Some(r) = p.reply.take() {
                let _ = r.send(Ok(p.entry_id));
            }
        }
        self.lac_shared.store(self.lac, Ordering::Release);
        let limit = self.shared.config.max_pending_add_bytes.as_u64();
        while self.pending_bytes < limit {
            let Some(p) = self.waiting.pop_front() else { break };
            self.pending_bytes += p.raw.len() as u64;
            let (entry_id, raw) = (p.entry_id, p.raw.clone());
            self.pending.push_back(p);
            for bookie in self.write_set(entry_id) {
                self.send(entry_id, raw.clone(), bookie, Duration::ZERO);
            }
        }
    }

    fn fail(&mut self, err: LedgerError) {
        for mut p in self.pending.drain(..).chain(self.waiting.drain(..)) {
            if let Some(r) = p.reply.take() {
                let _ = r.send(Err(err.clone()));
            }
        }
        self.pending_bytes = 0;
        self.failed = Some(err);
    }

    /// Ensemble change: from the first unacknowledged entry on, `failed` is replaced by a live
    /// bookie outside the ensemble or, when none is left, dropped from the ensemble as long as
    /// it keeps `Qw` bookies. Pending entries are then sent to their new write sets.
    async fn replace_bookie(&mut self, failed: &str) -> Result<(), LedgerError> {
        let first_entry = (self.lac + 1) as u64;
        loop {
            let current = self.md.last_fragment().bookies.clone();
            // Already replaced (by an earlier failure of the same bookie): only re-check acks.
            let Some(pos) = current.iter().position(|b| b == failed) else { break };
            let mut bookies = current.clone();
            match self.shared.registry.choose_writable(1, &current) {
                Ok(mut r) => bookies[pos] = r.remove(0),
                Err(LedgerError::NotEnoughBookies { .. }) if current.len() > self.md.write_quorum => {
                    bookies.remove(pos);
                }
                Err(e) => return Err(e),
            }
            let mut md = self.md.clone();
            match md.fragments.last_mut() {
                Some(last) if last.first_entry == first_entry => last.bookies = bookies.clone(),
                Some(last) if last.first_entry > first_entry => {
                    return Err(LedgerError::Invalid(format!(
                        "ledger {} has a fragment from entry {} beyond this writer's first unacknowledged entry {first_entry}",
                        md.ledger_id, last.first_entry
                    )));
                }
                _ => md.fragments.push(Fragment { first_entry, bookies: bookies.clone() }),
            }
            if self.recovery {
                // Recovery keeps ensemble changes in memory and saves them only with the final
                // CLOSED update: a recovery that dies half way must leave the fragments as they
                // were, or the next recovery would look for acknowledged entries in the wrong
                // ensemble.
                info!(ledger_id = md.ledger_id, %failed, ensemble = ?bookies, first_entry, "ensemble changed during recovery");
                self.md = md;
                break;
            }
            match meta::cas(&self.shared.store, &md, self.version).await {
                Ok(v) => {
                    info!(ledger_id = md.ledger_id, %failed, ensemble = ?bookies, first_entry, "ensemble changed");
                    self.md = md;
                    self.version = v;
                    break;
                }
                Err(MetadataError::Conflict { .. }) => {
                    let (fresh, v) = meta::read(&self.shared.store, self.md.ledger_id).await?;
                    if fresh.state != LedgerState::Open {
                        return Err(LedgerError::Fenced(self.md.ledger_id));
                    }
                    self.md = fresh;
                    self.version = v;
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Every pending entry belongs to the new fragment: acks count only from bookies of its
        // new write set, and the others of that set are sent the entry.
        let mut resend = Vec::new();
        let frag = self.md.last_fragment().clone();
        for p in self.pending.iter_mut() {
            let ws = frag.write_set_ids(p.entry_id, self.md.write_quorum);
            p.acked.retain(|b| ws.contains(b));
            for b in ws {
                if !p.acked.contains(&b) {
                    resend.push((p.entry_id, p.raw.clone(), b));
                }
            }
        }
        for (entry_id, raw, bookie) in resend {
            self.send(entry_id, raw, bookie, Duration::ZERO);
        }
        self.advance();
        Ok(())
    }

    async fn complete_closing(&mut self) {
        let Some(closing) = self.closing.take() else { return };
        match closing {
            Closing::Finish(reply) => {
                let out = match &self.failed {
                    Some(e) => Err(e.clone()),
                    None => Ok((self.md.clone(), self.version)),
                };
                let _ = reply.send(out);
            }
            Closing::Close(reply) => {
                let out = self.close_metadata().await;
                if out.is_ok() {
                    self.failed = Some(LedgerError::Closed(self.md.ledger_id));
                }
                let _ = reply.send(out);
            }
        }
    }

    async fn close_metadata(&mut self) -> Result<LedgerMetadata, LedgerError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        for _ in 0..MAX_CLOSE_ATTEMPTS {
            let mut md = self.md.clone();
            md.state = LedgerState::Closed;
            md.last_entry_id = self.lac;
            md.length = self.length;
            match meta::cas(&self.shared.store, &md, self.version).await {
                Ok(v) => {
                    self.md = md.clone();
                    self.version = v;
                    return Ok(md);
                }
                Err(MetadataError::Conflict { .. }) => {
                    // Auto-recovery may have replaced a lost bookie in an earlier fragment; it
                    // never touches the last one while the ledger is open. Anything else means
                    // another client took the ledger over.
                    let (fresh, v) = meta::read(&self.shared.store, self.md.ledger_id).await?;
                    if fresh.state != LedgerState::Open
                        || fresh.fragments.len() != self.md.fragments.len()
                        || fresh.last_fragment() != self.md.last_fragment()
                    {
                        return Err(LedgerError::Fenced(self.md.ledger_id));
                    }
                    self.md = fresh;
                    self.version = v;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(LedgerError::Unavailable(format!(
            "ledger {} metadata kept changing while closing; retry",
            self.md.ledger_id
        )))
    }
}
