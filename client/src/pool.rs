//! The client's connections: at most one per broker address, made on first use, reused by
//! every lookup, producer and consumer that goes to that broker, and made again once it has
//! died. It also knows the bootstrap brokers of the service URL and the order to ask them in.
//!
//! A broker whose connection just died or whose last connect failed may be down for good (a
//! crashed owner stays named by lookups until its lease expires): connecting to it again is
//! given [`PROBE_TIMEOUT_START`], doubling per consecutive failure up to the connect timeout,
//! so that retries keep going instead of each waiting the full connect timeout.
//!
//! Must never: hold a lock while connecting (a dead broker must not delay connections to
//! others), or hand out a connection known to be dead.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;

use crate::Error;
use crate::transport::{Connection, Connector};
use crate::url::BrokerUrl;

/// How long connecting may take right after a broker failed once; it doubles per further
/// consecutive failure, up to the connect timeout.
pub(crate) const PROBE_TIMEOUT_START: Duration = Duration::from_millis(500);

/// Connections by broker.
#[derive(Debug)]
pub(crate) struct Pool {
    connector: Connector,
    bootstrap: Vec<BrokerUrl>,
    slots: Mutex<HashMap<BrokerUrl, Arc<Slot>>>,
    closed: AtomicBool,
}

/// One broker's connection.
#[derive(Debug, Default)]
struct Slot {
    state: Mutex<SlotState>,
    /// Held while connecting, so that concurrent users wait for one attempt.
    connecting: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct SlotState {
    conn: Option<Arc<Connection>>,
    /// When connecting last failed or the connection was last found dead, if that is more
    /// recent than the last success.
    failed_at: Option<Instant>,
    /// When a connection was last made.
    connected_at: Option<Instant>,
    /// Connect failures and deaths since the last connection was made.
    failures: u32,
}

impl SlotState {
    /// The connection if it is alive; a dead one is dropped and remembered as a failure.
    fn live(&mut self) -> Option<Arc<Connection>> {
        match &self.conn {
            Some(c) if c.is_alive() => Some(c.clone()),
            Some(_) => {
                self.conn = None;
                self.failed_at = Some(Instant::now());
                self.failures += 1;
                None
            }
            None => None,
        }
    }
}

/// The most a connect may take after `failures` consecutive failures (the connect timeout
/// applies too).
fn connect_limit(failures: u32) -> Duration {
    match failures {
        0 => Duration::MAX,
        n => PROBE_TIMEOUT_START.saturating_mul(1 << (n - 1).min(16)),
    }
}

/// The name the broker at `url` must prove with its certificate (unless the client names one):
/// its host, except for an IP address that a lookup named (not one of the service URL's
/// brokers) while the service URL names its brokers by DNS name; then it is the first such
/// name. Brokers advertise addresses (a pod's IP) and share a certificate for the service's
/// name, and the lookups that named the address were answered over connections verified the
/// same way.
fn server_name_for(bootstrap: &[BrokerUrl], url: &BrokerUrl) -> String {
    if url.is_ip()
        && !bootstrap.contains(url)
        && let Some(named) = bootstrap.iter().find(|b| !b.is_ip())
    {
        return named.default_server_name();
    }
    url.default_server_name()
}

impl Pool {
    pub fn new(connector: Connector, bootstrap: Vec<BrokerUrl>) -> Self {
        Pool { connector, bootstrap, slots: Mutex::new(HashMap::new()), closed: AtomicBool::new(false) }
    }

    fn slot(&self, url: &BrokerUrl) -> Arc<Slot> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).entry(url.clone()).or_default().clone()
    }

    /// A live connection to `url`: the pooled one, or a new one.
    pub async fn get(&self, url: &BrokerUrl) -> Result<Arc<Connection>, Error> {
        self.check_open()?;
        let slot = self.slot(url);
        if let Some(c) = slot.state.lock().unwrap_or_else(|p| p.into_inner()).live() {
            return Ok(c);
        }
        let _connecting = slot.connecting.lock().await;
        // Someone else may have connected while this one waited.
        if let Some(c) = slot.state.lock().unwrap_or_else(|p| p.into_inner()).live() {
            return Ok(c);
        }
        let failures = slot.state.lock().unwrap_or_else(|p| p.into_inner()).failures;
        let name = server_name_for(&self.bootstrap, url);
        let result = self.connector.connect(url, &name, connect_limit(failures)).await;
        let mut state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(conn) => {
                // Closed while connecting: do not keep what close() did not see.
                self.check_open()?;
                let conn = Arc::new(conn);
                state.conn = Some(conn.clone());
                state.failed_at = None;
                state.connected_at = Some(Instant::now());
                state.failures = 0;
                debug!(broker = %url, "connection pooled");
                Ok(conn)
            }
            Err(e) => {
                state.failed_at = Some(Instant::now());
                state.failures += 1;
                Err(e)
            }
        }
    }

    /// The bootstrap brokers in the order to ask them: those with a live connection first, then
    /// those not known to fail, then those whose last attempt failed, the one that last worked
    /// most recently first (a restarted broker before one that never answered). Connecting to a
    /// dead broker costs the connect timeout, so they come last; otherwise the given order holds.
    pub fn bootstrap_order(&self) -> Vec<BrokerUrl> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut ranked: Vec<(u8, Reverse<Option<Instant>>, usize, &BrokerUrl)> = self
            .bootstrap
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let Some(slot) = slots.get(url) else { return (1, Reverse(None), i, url) };
                let mut state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
                if state.live().is_some() {
                    return (0, Reverse(None), i, url);
                }
                match state.failed_at {
                    Some(_) => (2, Reverse(state.connected_at), i, url),
                    None => (1, Reverse(None), i, url),
                }
            })
            .collect();
        ranked.sort_by_key(|(rank, worked_at, i, _)| (*rank, *worked_at, *i));
        ranked.into_iter().map(|(_, _, _, url)| url.clone()).collect()
    }

    pub fn bootstrap(&self) -> &[BrokerUrl] {
        &self.bootstrap
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("the client is closed".into()));
        }
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes every connection now; later `get`s fail.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let conns: Vec<Arc<Connection>> = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.values().filter_map(|s| s.state.lock().unwrap_or_else(|p| p.into_inner()).conn.take()).collect()
        };
        futures::future::join_all(conns.iter().map(|c| c.close())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::MemoryNet;

    fn url(s: &str) -> BrokerUrl {
        BrokerUrl::parse(s).expect("url")
    }

    #[test]
    fn a_looked_up_address_is_checked_against_the_service_name() {
        let service = [url("quic://magnetar-broker.magnetar.svc:6650")];
        // A pod IP named by a lookup: the service's name.
        assert_eq!(server_name_for(&service, &url("quic://10.0.0.7:6650")), "magnetar-broker.magnetar.svc");
        // A DNS name named by a lookup: that name.
        assert_eq!(server_name_for(&service, &url("quic://broker-1.example:6650")), "broker-1.example");
        assert_eq!(server_name_for(&service, &service[0]), "magnetar-broker.magnetar.svc");
        // Brokers listed by address are checked as that address, looked up or not.
        let by_ip = [url("quic://127.0.0.1:6650"), url("quic://[::1]:6651")];
        assert_eq!(server_name_for(&by_ip, &by_ip[0]), "127.0.0.1");
        assert_eq!(server_name_for(&by_ip, &url("quic://127.0.0.1:7000")), "127.0.0.1");
        assert_eq!(server_name_for(&by_ip, &by_ip[1]), "::1");
        // An address listed in the service URL is its own name even beside a DNS name.
        let mixed = [url("quic://brokers.example:6650"), url("quic://10.0.0.9:6650")];
        assert_eq!(server_name_for(&mixed, &mixed[1]), "10.0.0.9");
    }

    #[tokio::test]
    async fn connections_are_reused_and_made_again_once_dead() {
        let net = MemoryNet::default();
        let a = net.add("quic://a:1");
        let pool = Pool::new(Connector::Memory(net.clone()), vec![url("quic://a:1")]);
        let c1 = pool.get(&url("quic://a:1")).await.expect("connect");
        let c2 = pool.get(&url("quic://A:1")).await.expect("reuse");
        assert!(Arc::ptr_eq(&c1, &c2));
        drop(a);
        assert!(!c1.is_alive());
        let err = pool.get(&url("quic://a:1")).await.expect_err("gone");
        assert!(matches!(err, Error::Connect(_)), "{err:?}");
        let _a = net.add("quic://a:1");
        let c3 = pool.get(&url("quic://a:1")).await.expect("reconnect");
        assert!(c3.is_alive() && !Arc::ptr_eq(&c1, &c3));
        pool.close().await;
        assert_eq!(
            pool.get(&url("quic://a:1")).await.expect_err("closed"),
            Error::Closed("the client is closed".into())
        );
    }

    #[test]
    fn connecting_to_a_broker_that_just_failed_gets_less_time_at_first() {
        assert_eq!(connect_limit(0), Duration::MAX, "the connect timeout alone");
        let limits: Vec<u64> = (1..6).map(|n| connect_limit(n).as_millis() as u64).collect();
        assert_eq!(limits, vec![500, 1000, 2000, 4000, 8000]);
        assert!(connect_limit(1000) >= Duration::from_secs(3600), "no overflow");
    }

    #[tokio::test]
    async fn bootstrap_brokers_that_failed_are_asked_last() {
        let net = MemoryNet::default();
        let _b = net.add("quic://b:1");
        let _c = net.add("quic://c:1");
        let list = vec![url("quic://a:1"), url("quic://b:1"), url("quic://c:1")];
        let pool = Pool::new(Connector::Memory(net.clone()), list.clone());
        assert_eq!(pool.bootstrap_order(), list, "nothing known: the given order");
        pool.get(&url("quic://a:1")).await.expect_err("no broker a");
        let c = pool.get(&url("quic://c:1")).await.expect("c");
        assert_eq!(pool.bootstrap_order(), vec![url("quic://c:1"), url("quic://b:1"), url("quic://a:1")]);
        // c dies: b, not known to fail, comes first; c, which worked, before a, which never did.
        drop((c, _c));
        assert_eq!(pool.bootstrap_order(), vec![url("quic://b:1"), url("quic://c:1"), url("quic://a:1")]);
        // b works, then dies; c comes back, works and dies after it: c worked last.
        pool.get(&url("quic://b:1")).await.expect("b");
        drop(_b);
        let c_again = net.add("quic://c:1");
        pool.get(&url("quic://c:1")).await.expect("c again");
        drop(c_again);
        assert_eq!(pool.bootstrap_order(), vec![url("quic://c:1"), url("quic://b:1"), url("quic://a:1")]);
    }
}
