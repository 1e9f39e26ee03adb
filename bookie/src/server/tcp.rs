//! The bookie protocol server: one reader and one writer task per TCP connection, each request
//! handled in its own task so many are in flight at once. A malformed or oversized frame gets an
//! error response and closes only that connection.

use std::sync::Arc;

use bytes::BytesMut;
use magnetar_common::bookie_proto::{self, ErrorReply, FrameError, Op, Reply, Request, Response, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::error::StorageError;
use crate::storage::Storage;

/// Most requests one connection may have in flight; beyond it the connection is not read.
pub(crate) const MAX_IN_FLIGHT: usize = 4096;
/// Initial (and minimum) allocation for reading requests.
const READ_BUFFER_BYTES: usize = 16 * 1024;
/// Most bytes one range read returns (at least one entry is always returned).
const MAX_READ_RANGE_BYTES: u32 = 16 << 20;
/// Bytes a writer gathers from queued responses before one socket write.
const WRITE_BATCH_BYTES: usize = 1 << 20;

/// Accepts connections until cancelled.
pub async fn serve(listener: TcpListener, storage: Arc<Storage>, cancel: CancellationToken) {
    let mut conn_id = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                conn_id += 1;
                let _ = stream.set_nodelay(true);
                let span = info_span!("conn", id = conn_id, %peer);
                tokio::spawn(connection(stream, storage.clone(), cancel.clone()).instrument(span));
            }
            Err(e) => {
                warn!(error = %e, "accept bookie connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(stream: TcpStream, storage: Arc<Storage>, cancel: CancellationToken) {
    let (mut rd, mut wr) = stream.into_split();
    // Each response carries its request's in-flight permit until it is written, so a client
    // that does not read its responses stops being read itself: memory stays bounded.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Response, Option<OwnedSemaphorePermit>)>();
    let writer = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut permits = Vec::new();
        while let Some((resp, permit)) = rx.recv().await {
            resp.encode(&mut buf);
            permits.push(permit);
            while buf.len() < WRITE_BATCH_BYTES {
                match rx.try_recv() {
                    Ok((r, p)) => {
                        r.encode(&mut buf);
                        permits.push(p);
                    }
                    Err(_) => break,
                }
            }
            if let Err(e) = wr.write_all(&buf).await {
                debug!(error = %e, "write to client");
                return;
            }
            buf.clear();
            permits.clear();
        }
        let _ = wr.shutdown().await;
    });
    // Entries somewhat over the limit get a clean TooLarge answer; frames far over it close the
    // connection without being buffered.
    let max_frame = 2 * storage.config().max_entry_bytes.as_u64() as usize + 1024;
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // Entries stay in the write cache as slices of this buffer's allocations, so they are kept
    // small: a large frame then gets an allocation of its own size (the decoder reserves exactly
    // the missing bytes), and a cached entry pins little memory beyond itself.
    let mut buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
    'read: loop {
        loop {
            match bookie_proto::decode_request(&mut buf, max_frame) {
                Ok(Some((request_id, request))) => {
                    let Ok(permit) = in_flight.clone().acquire_owned().await else { break 'read };
                    let storage = storage.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let op = request.op();
                        let result = handle(&storage, request).await.map_err(|e| e.to_reply());
                        let _ = tx.send((Response { request_id, op, result }, Some(permit)));
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "malformed frame; closing the connection");
                    let status = match e {
                        FrameError::TooLarge { .. } => Status::TooLarge,
                        _ => Status::BadRequest,
                    };
                    let op = match &e {
                        FrameError::Malformed { op, .. } => *op,
                        _ => Op::Health,
                    };
                    let _ = tx.send((
                        Response {
                            request_id: e.request_id().unwrap_or(0),
                            op,
                            result: Err(ErrorReply { status, message: e.to_string() }),
                        },
                        None,
                    ));
                    break 'read;
                }
            }
        }
        let read = tokio::select! {
            _ = cancel.cancelled() => break,
            r = rd.read_buf(&mut buf) => r,
        };
        match read {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e, "read from client");
                break;
            }
        }
    }
    // Let in-flight requests answer before the writer closes (if the writer died, their
    // permits went with it).
    drop(tx);
    let _ = writer.await;
}

/// Executes one request against storage. Independent of the transport.
pub async fn handle(storage: &Arc<Storage>, request: Request) -> Result<Reply, StorageError> {
    match request {
        Request::Add { flags, entry } => {
            storage.add(flags, entry).await.map(|(ledger_id, entry_id)| Reply::Add { ledger_id, entry_id })
        }
        Request::Read { ledger_id, entry_id } => {
            storage.read(ledger_id, entry_id).await.map(|entry| Reply::Read { entry })
        }
        Request::ReadRange { ledger_id, first, last, max_bytes } => {
            let max_bytes = max_bytes.min(MAX_READ_RANGE_BYTES);
            storage.read_range(ledger_id, first, last, max_bytes).await.map(|entries| Reply::ReadRange { entries })
        }
        Request::ReadLac { ledger_id } => {
            storage.read_lac(ledger_id).map(|(lac, last_entry)| Reply::ReadLac { lac, last_entry })
        }
        Request::Fence { ledger_id } => {
            storage.fence(ledger_id).await.map(|(lac, last_entry)| Reply::Fence { lac, last_entry })
        }
        Request::Delete { ledger_id } => storage.delete(ledger_id).await.map(|()| Reply::Delete),
        Request::Health => Ok(Reply::Health { read_only: storage.is_read_only() }),
    }
}
