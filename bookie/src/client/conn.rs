//! Pipelined connections to bookies: one TCP connection per bookie, many requests in flight,
//! responses matched by request id. A broken connection fails its pending requests and is
//! replaced on the next request.
//!
//! A bookie in the same process (`magnetar standalone`) is reached through a [`LocalBookie`]
//! instead: requests go to its storage without a socket, so entries are handed over as they
//! are, with no encoding, copying or loopback traffic (BookKeeper's local transport).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use magnetar_common::bookie_proto::{self, ErrorReply, Reply, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::debug;

use super::LedgerError;
use crate::server::tcp::{self, MAX_IN_FLIGHT};
use crate::storage::Storage;

type ReplyTx = oneshot::Sender<Result<Reply, LedgerError>>;

#[derive(Debug)]
struct Conn {
    tx: mpsc::UnboundedSender<(Request, ReplyTx)>,
}

/// A bookie's client side. Cheap to clone through `Arc`.
#[derive(Debug)]
pub struct BookieConn {
    pub bookie_id: String,
    transport: Transport,
}

#[derive(Debug)]
enum Transport {
    Tcp(TcpConn),
    Local(LocalConn),
}

/// The TCP connection to a bookie, made on first use and again after it broke.
#[derive(Debug)]
struct TcpConn {
    address: Mutex<String>,
    conn: tokio::sync::Mutex<Option<Conn>>,
    connect_timeout: Duration,
    max_frame: usize,
}

/// The error a bookie's refusal becomes, whichever way it arrived.
fn refused(bookie: &str, e: ErrorReply) -> LedgerError {
    LedgerError::Bookie { bookie: bookie.to_string(), status: e.status, message: e.message }
}

/// A bookie running in this process, reached without a socket. Requests are executed by the
/// same code as the TCP server's, with the same in-flight bound per client, and fail the same
/// way (a storage error becomes [`LedgerError::Bookie`] with the status the bookie would send).
#[derive(Debug, Clone)]
pub struct LocalBookie {
    bookie_id: String,
    storage: Arc<Storage>,
}

impl LocalBookie {
    pub(crate) fn new(bookie_id: String, storage: Arc<Storage>) -> Self {
        Self { bookie_id, storage }
    }

    pub fn bookie_id(&self) -> &str {
        &self.bookie_id
    }
}

/// One client's handle on a local bookie.
#[derive(Debug)]
struct LocalConn {
    bookie: LocalBookie,
    in_flight: Arc<Semaphore>,
}

impl LocalConn {
    async fn call(&self, request: Request, timeout: Duration) -> Result<Reply, LedgerError> {
        let bookie = &self.bookie.bookie_id;
        let run = async {
            let permit = self
                .in_flight
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| LedgerError::Unavailable(format!("bookie {bookie}: client closed")))?;
            let storage = self.bookie.storage.clone();
            // Its own task, as on the TCP server: a caller that gives up does not cancel a
            // request half-way through.
            let task = tokio::spawn(async move {
                let _permit = permit;
                tcp::handle(&storage, request).await
            });
            task.await.map_err(|e| LedgerError::Unavailable(format!("bookie {bookie}: request failed: {e}")))
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(e))) => Err(refused(bookie, e.to_reply())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(LedgerError::Unavailable(format!("bookie {bookie}: no answer within {timeout:?}"))),
        }
    }
}

impl BookieConn {
    pub fn new(bookie_id: String, address: String, connect_timeout: Duration) -> Self {
        let tcp = TcpConn {
            address: Mutex::new(address),
            conn: tokio::sync::Mutex::new(None),
            connect_timeout,
            // Replies carry entries up to the largest max_entry_bytes a bookie may configure.
            max_frame: crate::config::MAX_ENTRY_BYTES_LIMIT as usize + (1 << 20),
        };
        Self { bookie_id, transport: Transport::Tcp(tcp) }
    }

    /// A connection to a bookie in this process.
    pub(crate) fn local(bookie: LocalBookie) -> Self {
        let bookie_id = bookie.bookie_id.clone();
        let local = LocalConn { bookie, in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)) };
        Self { bookie_id, transport: Transport::Local(local) }
    }

    /// Where the next TCP connection goes (a local bookie has no address).
    pub fn set_address(&self, address: &str) {
        if let Transport::Tcp(tcp) = &self.transport {
            let mut a = tcp.address.lock().unwrap_or_else(|p| p.into_inner());
            if *a != address {
                *a = address.to_string();
            }
        }
    }

    fn unavailable(&self, what: impl std::fmt::Display) -> LedgerError {
        LedgerError::Unavailable(format!("bookie {}: {what}", self.bookie_id))
    }

    /// Sends a request and waits for its response, at most `timeout`.
    pub async fn call(&self, request: Request, timeout: Duration) -> Result<Reply, LedgerError> {
        let tcp = match &self.transport {
            Transport::Tcp(tcp) => tcp,
            Transport::Local(local) => return local.call(request, timeout).await,
        };
        let rx = {
            let mut guard = tcp.conn.lock().await;
            let alive = guard.as_ref().is_some_and(|c| !c.tx.is_closed());
            if !alive {
                *guard = Some(self.connect(tcp).await?);
            }
            let (tx, rx) = oneshot::channel();
            let conn = guard.as_ref().ok_or_else(|| self.unavailable("not connected"))?;
            if conn.tx.send((request, tx)).is_err() {
                *guard = None;
                return Err(self.unavailable("connection closed"));
            }
            rx
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.unavailable("connection closed")),
            Err(_) => Err(self.unavailable(format!("no answer within {timeout:?}"))),
        }
    }

    async fn connect(&self, tcp: &TcpConn) -> Result<Conn, LedgerError> {
        let address = tcp.address.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let stream = match tokio::time::timeout(tcp.connect_timeout, TcpStream::connect(&address)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(self.unavailable(format!("connect to {address}: {e}"))),
            Err(_) => return Err(self.unavailable(format!("connect to {address} timed out"))),
        };
        let _ = stream.set_nodelay(true);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(stream, rx, self.bookie_id.clone(), tcp.max_frame));
        Ok(Conn { tx })
    }
}

async fn run(stream: TcpStream, mut rx: mpsc::UnboundedReceiver<(Request, ReplyTx)>, bookie: String, max_frame: usize) {
    let (mut rd, mut wr) = stream.into_split();
    let pending: Arc<Mutex<HashMap<u64, ReplyTx>>> = Arc::new(Mutex::new(HashMap::new()));
    let p2 = pending.clone();
    let bookie2 = bookie.clone();
    let mut reader = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(256 * 1024);
        loop {
            loop {
                match bookie_proto::decode_response(&mut buf, max_frame) {
                    Ok(Some(resp)) => {
                        let tx = p2.lock().unwrap_or_else(|p| p.into_inner()).remove(&resp.request_id);
                        if let Some(tx) = tx {
                            let _ = tx.send(resp.result.map_err(|e| refused(&bookie2, e)));
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        debug!(bookie = %bookie2, error = %e, "malformed response; dropping connection");
                        return;
                    }
                }
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    let mut next_id = 1u64;
    let mut buf = BytesMut::with_capacity(256 * 1024);
    loop {
        let first = tokio::select! {
            _ = &mut reader => break,
            m = rx.recv() => m,
        };
        let Some((req, tx)) = first else { break };
        let mut batch = vec![(req, tx)];
        while buf.len() < (1 << 20) {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
            if batch.len() >= 256 {
                break;
            }
        }
        {
            let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
            for (req, tx) in batch {
                req.encode(next_id, &mut buf);
                p.insert(next_id, tx);
                next_id += 1;
            }
        }
        if wr.write_all(&buf).await.is_err() {
            break;
        }
        buf.clear();
    }
    reader.abort();
    rx.close();
    let err = || LedgerError::Unavailable(format!("bookie {bookie}: connection lost"));
    for (_, tx) in pending.lock().unwrap_or_else(|p| p.into_inner()).drain() {
        let _ = tx.send(Err(err()));
    }
    while let Ok((_, tx)) = rx.try_recv() {
        let _ = tx.send(Err(err()));
    }
}
