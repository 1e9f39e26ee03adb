//! Pipelined connections to bookies: one TCP connection per bookie, many requests in flight,
//! responses matched by request id. A broken connection fails its pending requests and is
//! replaced on the next request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use magnetar_common::bookie_proto::{self, Reply, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::LedgerError;

type ReplyTx = oneshot::Sender<Result<Reply, LedgerError>>;

#[derive(Debug)]
struct Conn {
    tx: mpsc::UnboundedSender<(Request, ReplyTx)>,
}

/// A bookie's client side. Cheap to clone through `Arc`.
#[derive(Debug)]
pub struct BookieConn {
    pub bookie_id: String,
    address: Mutex<String>,
    conn: tokio::sync::Mutex<Option<Conn>>,
    connect_timeout: Duration,
    max_frame: usize,
}

impl BookieConn {
    pub fn new(bookie_id: String, address: String, connect_timeout: Duration) -> Self {
        Self {
            bookie_id,
            address: Mutex::new(address),
            conn: tokio::sync::Mutex::new(None),
            connect_timeout,
            // Replies carry entries up to the largest max_entry_bytes a bookie may configure.
            max_frame: crate::config::MAX_ENTRY_BYTES_LIMIT as usize + (1 << 20),
        }
    }

    pub fn set_address(&self, address: &str) {
        let mut a = self.address.lock().unwrap_or_else(|p| p.into_inner());
        if *a != address {
            *a = address.to_string();
        }
    }

    fn unavailable(&self, what: impl std::fmt::Display) -> LedgerError {
        LedgerError::Unavailable(format!("bookie {}: {what}", self.bookie_id))
    }

    /// Sends a request and waits for its response, at most `timeout`.
    pub async fn call(&self, request: Request, timeout: Duration) -> Result<Reply, LedgerError> {
        let rx = {
            let mut guard = self.conn.lock().await;
            let alive = guard.as_ref().is_some_and(|c| !c.tx.is_closed());
            if !alive {
                *guard = Some(self.connect().await?);
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

    async fn connect(&self) -> Result<Conn, LedgerError> {
        let address = self.address.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(&address)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(self.unavailable(format!("connect to {address}: {e}"))),
            Err(_) => return Err(self.unavailable(format!("connect to {address} timed out"))),
        };
        let _ = stream.set_nodelay(true);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(stream, rx, self.bookie_id.clone(), self.max_frame));
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
                            let result = resp.result.map_err(|e| LedgerError::Bookie {
                                bookie: bookie2.clone(),
                                status: e.status,
                                message: e.message,
                            });
                            let _ = tx.send(result);
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
