//! The live bookies, as registered under `/bookies/available/`, kept current by a watch.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use magnetar_common::metadata::{SharedStore, WatchEvent};
use rand::seq::SliceRandom;
use tokio::sync::watch;
use tracing::warn;

use super::LedgerError;
use crate::server::{AVAILABLE_PREFIX, Registration};

#[derive(Debug, Default)]
struct State {
    live: HashMap<String, Registration>,
    /// Addresses of every bookie seen, so ledgers on a briefly absent bookie stay readable.
    known: HashMap<String, String>,
}

/// Live bookies. Cloning shares the same view.
#[derive(Debug, Clone)]
pub struct BookieRegistry {
    state: Arc<RwLock<State>>,
    /// Bumped after every change of the live set (auto-recovery scans on it).
    changes: Arc<watch::Sender<u64>>,
    _task: Arc<tokio_util::task::AbortOnDropHandle<()>>,
}

fn id_of(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

impl BookieRegistry {
    pub async fn start(store: SharedStore) -> Result<Self, LedgerError> {
        let state = Arc::new(RwLock::new(State::default()));
        let watch = store.watch(AVAILABLE_PREFIX).await?;
        apply_initial(&state, &watch.initial);
        let changes = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let st = state.clone();
        let tx = changes.clone();
        let task = tokio::spawn(async move {
            let mut events = watch.events;
            loop {
                while let Some(ev) = events.recv().await {
                    {
                        let mut s = st.write().unwrap_or_else(|p| p.into_inner());
                        match ev {
                            WatchEvent::Put(kv) => {
                                if let Ok(r) = serde_json::from_slice::<Registration>(&kv.value) {
                                    s.known.insert(r.bookie_id.clone(), r.address.clone());
                                    s.live.insert(r.bookie_id.clone(), r);
                                }
                            }
                            WatchEvent::Delete { key } => {
                                s.live.remove(id_of(&key));
                            }
                        }
                    }
                    tx.send_modify(|n| *n += 1);
                }
                // The watch ended (store connection lost): watch again from a fresh listing.
                loop {
                    match store.watch(AVAILABLE_PREFIX).await {
                        Ok(w) => {
                            apply_initial(&st, &w.initial);
                            tx.send_modify(|n| *n += 1);
                            events = w.events;
                            break;
                        }
                        Err(e) => {
                            warn!(error = %e, "watch bookie registrations; retrying");
                            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        }
                    }
                }
            }
        });
        Ok(Self { state, changes, _task: Arc::new(tokio_util::task::AbortOnDropHandle::new(task)) })
    }

    /// A receiver that sees a new value after every change of the live set (a registration
    /// added, updated or gone, or the watch restarted).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Live bookies.
    pub fn live(&self) -> Vec<Registration> {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<Registration> = s.live.values().cloned().collect();
        v.sort_by(|a, b| a.bookie_id.cmp(&b.bookie_id));
        v
    }

    /// Address of a bookie, live or last seen.
    pub fn address(&self, bookie_id: &str) -> Option<String> {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        s.live.get(bookie_id).map(|r| r.address.clone()).or_else(|| s.known.get(bookie_id).cloned())
    }

    /// Picks `n` live, writable bookies not in `exclude`, at random.
    pub fn choose_writable(&self, n: usize, exclude: &[String]) -> Result<Vec<String>, LedgerError> {
        let live: Vec<Registration> = self.live().into_iter().filter(|r| !exclude.contains(&r.bookie_id)).collect();
        let read_only = live.iter().filter(|r| r.read_only).count();
        let mut candidates: Vec<String> = live.into_iter().filter(|r| !r.read_only).map(|r| r.bookie_id).collect();
        if candidates.len() < n {
            return Err(LedgerError::NotEnoughBookies { need: n, found: candidates.len(), read_only });
        }
        candidates.shuffle(&mut rand::rng());
        candidates.truncate(n);
        Ok(candidates)
    }
}

fn apply_initial(state: &RwLock<State>, initial: &[magnetar_common::metadata::KeyValue]) {
    let mut s = state.write().unwrap_or_else(|p| p.into_inner());
    s.live.clear();
    for kv in initial {
        if let Ok(r) = serde_json::from_slice::<Registration>(&kv.value) {
            s.known.insert(r.bookie_id.clone(), r.address.clone());
            s.live.insert(r.bookie_id.clone(), r);
        }
    }
}
