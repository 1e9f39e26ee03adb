//! The bookie protocol: pipelined, length-prefixed request/response frames over TCP.
//!
//! Frame: `[u32 length of the rest][u8 kind][u64 request id][body]`, big-endian. Request kinds
//! are [`Op`] values; a response has kind `op | 0x80` and a body `[u16 status][...]`: on success
//! (`status == 0`) the op's result, otherwise `[u16 message length][UTF-8 message]`.
//! Many requests may be in flight on one connection; responses carry the request id and may come
//! back in any order. This module is a codec only: bytes in, frames out, no I/O, no clock.
//! Status codes are append-only.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes before a frame's body: length, kind, request id.
pub const FRAME_HEADER_BYTES: usize = 4 + 1 + 8;
const RESPONSE_BIT: u8 = 0x80;

/// Request kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Add = 1,
    Read = 2,
    ReadRange = 3,
    ReadLac = 4,
    Fence = 5,
    Delete = 6,
    Health = 7,
}

impl Op {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Op::Add,
            2 => Op::Read,
            3 => Op::ReadRange,
            4 => Op::ReadLac,
            5 => Op::Fence,
            6 => Op::Delete,
            7 => Op::Health,
            _ => return None,
        })
    }
}

/// Error statuses (0 is success and never appears here). Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The entry or ledger does not exist on this bookie.
    NotFound,
    /// The ledger is fenced: adds from its previous writer are refused.
    Fenced,
    /// The bookie's disks are (nearly) full; it serves reads only. Write elsewhere.
    ReadOnly,
    /// The bookie's write cache is full; retry later.
    Overloaded,
    /// The entry or frame exceeds the configured maximum.
    TooLarge,
    /// The request is malformed.
    BadRequest,
    /// Stored data failed its checksum; it is not returned.
    Corrupt,
    /// An internal error (I/O); retry or use another replica.
    Internal,
    /// The bookie is shutting down.
    ShuttingDown,
    /// A status this build does not know.
    Unknown(u16),
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::NotFound => 1,
            Status::Fenced => 2,
            Status::ReadOnly => 3,
            Status::Overloaded => 4,
            Status::TooLarge => 5,
            Status::BadRequest => 6,
            Status::Corrupt => 7,
            Status::Internal => 8,
            Status::ShuttingDown => 9,
            Status::Unknown(c) => c,
        }
    }

    pub fn from_code(c: u16) -> Self {
        match c {
            1 => Status::NotFound,
            2 => Status::Fenced,
            3 => Status::ReadOnly,
            4 => Status::Overloaded,
            5 => Status::TooLarge,
            6 => Status::BadRequest,
            7 => Status::Corrupt,
            8 => Status::Internal,
            9 => Status::ShuttingDown,
            c => Status::Unknown(c),
        }
    }
}

/// Flags of an add.
pub const ADD_FLAG_RECOVERY: u8 = 1;

/// A request from a client to a bookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Store an encoded entry (see [`crate::entry`]). With [`ADD_FLAG_RECOVERY`] the add is
    /// accepted on a fenced ledger (recovery rewrites).
    Add {
        flags: u8,
        entry: Bytes,
    },
    Read {
        ledger_id: u64,
        entry_id: u64,
    },
    /// Entries `first..=last`, stopping early once `max_bytes` is exceeded (always at least one).
    ReadRange {
        ledger_id: u64,
        first: u64,
        last: u64,
        max_bytes: u32,
    },
    ReadLac {
        ledger_id: u64,
    },
    Fence {
        ledger_id: u64,
    },
    Delete {
        ledger_id: u64,
    },
    Health,
}

impl Request {
    pub fn op(&self) -> Op {
        match self {
            Request::Add { .. } => Op::Add,
            Request::Read { .. } => Op::Read,
            Request::ReadRange { .. } => Op::ReadRange,
            Request::ReadLac { .. } => Op::ReadLac,
            Request::Fence { .. } => Op::Fence,
            Request::Delete { .. } => Op::Delete,
            Request::Health => Op::Health,
        }
    }

    /// Appends the frame for this request to `dst`.
    pub fn encode(&self, request_id: u64, dst: &mut BytesMut) {
        let start = begin_frame(dst, self.op() as u8, request_id);
        match self {
            Request::Add { flags, entry } => {
                dst.put_u8(*flags);
                dst.put_slice(entry);
            }
            Request::Read { ledger_id, entry_id } => {
                dst.put_u64(*ledger_id);
                dst.put_u64(*entry_id);
            }
            Request::ReadRange { ledger_id, first, last, max_bytes } => {
                dst.put_u64(*ledger_id);
                dst.put_u64(*first);
                dst.put_u64(*last);
                dst.put_u32(*max_bytes);
            }
            Request::ReadLac { ledger_id } | Request::Fence { ledger_id } | Request::Delete { ledger_id } => {
                dst.put_u64(*ledger_id)
            }
            Request::Health => {}
        }
        end_frame(dst, start);
    }
}

/// A successful result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Add {
        ledger_id: u64,
        entry_id: u64,
    },
    Read {
        entry: Bytes,
    },
    ReadRange {
        entries: Vec<Bytes>,
    },
    /// Last-add-confirmed known to the bookie and the last entry it stores (-1: none).
    ReadLac {
        lac: i64,
        last_entry: i64,
    },
    Fence {
        lac: i64,
        last_entry: i64,
    },
    Delete,
    Health {
        read_only: bool,
    },
}

impl Reply {
    pub fn op(&self) -> Op {
        match self {
            Reply::Add { .. } => Op::Add,
            Reply::Read { .. } => Op::Read,
            Reply::ReadRange { .. } => Op::ReadRange,
            Reply::ReadLac { .. } => Op::ReadLac,
            Reply::Fence { .. } => Op::Fence,
            Reply::Delete => Op::Delete,
            Reply::Health { .. } => Op::Health,
        }
    }
}

/// A failed result: status plus a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub status: Status,
    pub message: String,
}

/// A response frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub request_id: u64,
    pub op: Op,
    pub result: Result<Reply, ErrorReply>,
}

impl Response {
    /// Appends the frame for this response to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        let start = begin_frame(dst, self.op as u8 | RESPONSE_BIT, self.request_id);
        match &self.result {
            Ok(reply) => {
                dst.put_u16(0);
                match reply {
                    Reply::Add { ledger_id, entry_id } => {
                        dst.put_u64(*ledger_id);
                        dst.put_u64(*entry_id);
                    }
                    Reply::Read { entry } => dst.put_slice(entry),
                    Reply::ReadRange { entries } => {
                        dst.put_u32(entries.len() as u32);
                        for e in entries {
                            dst.put_u32(e.len() as u32);
                            dst.put_slice(e);
                        }
                    }
                    Reply::ReadLac { lac, last_entry } | Reply::Fence { lac, last_entry } => {
                        dst.put_i64(*lac);
                        dst.put_i64(*last_entry);
                    }
                    Reply::Delete => {}
                    Reply::Health { read_only } => dst.put_u8(u8::from(*read_only)),
                }
            }
            Err(e) => {
                dst.put_u16(e.status.code());
                let msg = truncate_utf8(&e.message, u16::MAX as usize);
                dst.put_u16(msg.len() as u16);
                dst.put_slice(msg.as_bytes());
            }
        }
        end_frame(dst, start);
    }
}

/// Why bytes are not a valid frame. The connection that sent them is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame of {len} bytes is shorter than its header")]
    TooShort { len: usize },
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("malformed {op:?} frame (request {request_id}): {what}")]
    Malformed { op: Op, request_id: u64, what: &'static str },
}

impl FrameError {
    /// The request id the frame carried, when it could be read.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            FrameError::Malformed { request_id, .. } => Some(*request_id),
            _ => None,
        }
    }
}

/// Splits the next whole frame off `src`: `Ok(None)` if more bytes are needed.
/// Returns (kind, request id, body); the body shares `src`'s buffer.
fn split_frame(src: &mut BytesMut, max_frame_bytes: usize) -> Result<Option<(u8, u64, Bytes)>, FrameError> {
    if src.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if len > max_frame_bytes {
        return Err(FrameError::TooLarge { len, max: max_frame_bytes });
    }
    if len < FRAME_HEADER_BYTES - 4 {
        return Err(FrameError::TooShort { len });
    }
    if src.len() < 4 + len {
        src.reserve(4 + len - src.len());
        return Ok(None);
    }
    src.advance(4);
    let mut frame = src.split_to(len).freeze();
    let kind = frame.get_u8();
    let request_id = frame.get_u64();
    Ok(Some((kind, request_id, frame)))
}

/// Decodes the next request frame from `src`, if whole.
pub fn decode_request(src: &mut BytesMut, max_frame_bytes: usize) -> Result<Option<(u64, Request)>, FrameError> {
    let Some((kind, request_id, mut body)) = split_frame(src, max_frame_bytes)? else {
        return Ok(None);
    };
    let op = Op::from_u8(kind).ok_or(FrameError::UnknownKind(kind))?;
    let bad = |what| FrameError::Malformed { op, request_id, what };
    let need = |body: &Bytes, n: usize| if body.remaining() < n { Err(bad("body too short")) } else { Ok(()) };
    let request = match op {
        Op::Add => {
            need(&body, 1)?;
            let flags = body.get_u8();
            Request::Add { flags, entry: body.split_off(0) }
        }
        Op::Read => {
            need(&body, 16)?;
            Request::Read { ledger_id: body.get_u64(), entry_id: body.get_u64() }
        }
        Op::ReadRange => {
            need(&body, 28)?;
            Request::ReadRange {
                ledger_id: body.get_u64(),
                first: body.get_u64(),
                last: body.get_u64(),
                max_bytes: body.get_u32(),
            }
        }
        Op::ReadLac | Op::Fence | Op::Delete => {
            need(&body, 8)?;
            let ledger_id = body.get_u64();
            match op {
                Op::ReadLac => Request::ReadLac { ledger_id },
                Op::Fence => Request::Fence { ledger_id },
                _ => Request::Delete { ledger_id },
            }
        }
        Op::Health => Request::Health,
    };
    if op != Op::Add && body.has_remaining() {
        return Err(bad("trailing bytes"));
    }
    Ok(Some((request_id, request)))
}

/// Decodes the next response frame from `src`, if whole.
pub fn decode_response(src: &mut BytesMut, max_frame_bytes: usize) -> Result<Option<Response>, FrameError> {
    let Some((kind, request_id, mut body)) = split_frame(src, max_frame_bytes)? else {
        return Ok(None);
    };
    if kind & RESPONSE_BIT == 0 {
        return Err(FrameError::UnknownKind(kind));
    }
    let op = Op::from_u8(kind & !RESPONSE_BIT).ok_or(FrameError::UnknownKind(kind))?;
    let bad = |what| FrameError::Malformed { op, request_id, what };
    let need = |body: &Bytes, n: usize| if body.remaining() < n { Err(bad("body too short")) } else { Ok(()) };
    need(&body, 2)?;
    let status = body.get_u16();
    let result = if status != 0 {
        need(&body, 2)?;
        let len = body.get_u16() as usize;
        need(&body, len)?;
        let message = String::from_utf8_lossy(&body.split_to(len)).into_owned();
        Err(ErrorReply { status: Status::from_code(status), message })
    } else {
        Ok(match op {
            Op::Add => {
                need(&body, 16)?;
                Reply::Add { ledger_id: body.get_u64(), entry_id: body.get_u64() }
            }
            Op::Read => Reply::Read { entry: body.split_off(0) },
            Op::ReadRange => {
                need(&body, 4)?;
                let count = body.get_u32() as usize;
                let mut entries = Vec::with_capacity(count.min(body.remaining() / 4));
                for _ in 0..count {
                    need(&body, 4)?;
                    let len = body.get_u32() as usize;
                    need(&body, len)?;
                    entries.push(body.split_to(len));
                }
                Reply::ReadRange { entries }
            }
            Op::ReadLac | Op::Fence => {
                need(&body, 16)?;
                let (lac, last_entry) = (body.get_i64(), body.get_i64());
                if op == Op::Fence { Reply::Fence { lac, last_entry } } else { Reply::ReadLac { lac, last_entry } }
            }
            Op::Delete => Reply::Delete,
            Op::Health => {
                need(&body, 1)?;
                Reply::Health { read_only: body.get_u8() != 0 }
            }
        })
    };
    if body.has_remaining() {
        return Err(bad("trailing bytes"));
    }
    Ok(Some(Response { request_id, op, result }))
}

fn begin_frame(dst: &mut BytesMut, kind: u8, request_id: u64) -> usize {
    let start = dst.len();
    dst.put_u32(0);
    dst.put_u8(kind);
    dst.put_u64(request_id);
    start
}

fn end_frame(dst: &mut BytesMut, start: usize) {
    let len = (dst.len() - start - 4) as u32;
    dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests() -> Vec<Request> {
        vec![
            Request::Add { flags: ADD_FLAG_RECOVERY, entry: Bytes::from_static(b"entry-bytes") },
            Request::Read { ledger_id: 1, entry_id: 2 },
            Request::ReadRange { ledger_id: 3, first: 4, last: 9, max_bytes: 1 << 20 },
            Request::ReadLac { ledger_id: 5 },
            Request::Fence { ledger_id: 6 },
            Request::Delete { ledger_id: 7 },
            Request::Health,
        ]
    }

    fn responses() -> Vec<Response> {
        let ok = |op, reply| Response { request_id: 77, op, result: Ok(reply) };
        vec![
            ok(Op::Add, Reply::Add { ledger_id: 1, entry_id: 2 }),
            ok(Op::Read, Reply::Read { entry: Bytes::from_static(b"abc") }),
            ok(Op::ReadRange, Reply::ReadRange { entries: vec![Bytes::from_static(b"a"), Bytes::new()] }),
            ok(Op::ReadLac, Reply::ReadLac { lac: -1, last_entry: 4 }),
            ok(Op::Fence, Reply::Fence { lac: 3, last_entry: 4 }),
            ok(Op::Delete, Reply::Delete),
            ok(Op::Health, Reply::Health { read_only: true }),
            Response {
                request_id: 9,
                op: Op::Add,
                result: Err(ErrorReply { status: Status::Fenced, message: "ledger 4 is fenced".into() }),
            },
        ]
    }

    #[test]
    fn requests_round_trip_and_truncate() {
        for (i, req) in requests().into_iter().enumerate() {
            let mut buf = BytesMut::new();
            req.encode(i as u64, &mut buf);
            let whole = buf.clone();
            assert_eq!(decode_request(&mut buf, 1 << 20).expect("ok"), Some((i as u64, req.clone())));
            assert!(buf.is_empty());
            for n in 0..whole.len() {
                let mut part = BytesMut::from(&whole[..n]);
                assert_eq!(decode_request(&mut part, 1 << 20).expect("prefix is not an error"), None);
            }
        }
    }

    #[test]
    fn responses_round_trip_and_truncate() {
        for resp in responses() {
            let mut buf = BytesMut::new();
            resp.encode(&mut buf);
            let whole = buf.clone();
            assert_eq!(decode_response(&mut buf, 1 << 20).expect("ok"), Some(resp.clone()));
            for n in 0..whole.len() {
                let mut part = BytesMut::from(&whole[..n]);
                assert_eq!(decode_response(&mut part, 1 << 20).expect("prefix"), None);
            }
        }
    }

    #[test]
    fn golden_bytes() {
        let mut buf = BytesMut::new();
        Request::Read { ledger_id: 1, entry_id: 2 }.encode(0x0102, &mut buf);
        assert_eq!(&buf[..], &[0, 0, 0, 25, 2, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2]);
        let mut buf = BytesMut::new();
        Response {
            request_id: 1,
            op: Op::Add,
            result: Err(ErrorReply { status: Status::ReadOnly, message: "ro".into() }),
        }
        .encode(&mut buf);
        assert_eq!(&buf[..], &[0, 0, 0, 15, 0x81, 0, 0, 0, 0, 0, 0, 0, 1, 0, 3, 0, 2, b'r', b'o']);
    }

    /// Deterministic pseudo-random inputs (the fuzz target in `fuzz/` explores further).
    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for round in 0..20_000 {
            let len = (round % 64) + 1;
            let mut data = Vec::with_capacity(len + 4);
            // Mostly plausible lengths, so decoding goes past the header.
            data.extend_from_slice(&(len as u32).to_be_bytes());
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.push(x as u8);
            }
            let mut a = BytesMut::from(&data[..]);
            let _ = decode_request(&mut a, 1 << 20);
            let mut b = BytesMut::from(&data[..]);
            let _ = decode_response(&mut b, 1 << 20);
        }
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let mut buf = BytesMut::from(&[0u8, 0x10, 0, 0][..]);
        assert!(matches!(decode_request(&mut buf, 1024), Err(FrameError::TooLarge { .. })));
        let mut buf = BytesMut::from(&[0u8, 0, 0, 9, 99, 0, 0, 0, 0, 0, 0, 0, 1][..]);
        assert_eq!(decode_request(&mut buf, 1024), Err(FrameError::UnknownKind(99)));
        let mut buf = BytesMut::from(&[0u8, 0, 0, 10, 2, 0, 0, 0, 0, 0, 0, 0, 1, 5][..]);
        assert!(matches!(decode_request(&mut buf, 1024), Err(FrameError::Malformed { request_id: 1, .. })));
        let mut buf = BytesMut::from(&[0u8, 0, 0, 2, 1, 1][..]);
        assert!(matches!(decode_request(&mut buf, 1024), Err(FrameError::TooShort { .. })));
    }
}
