//! The message batch: what a producer sends in one `Send` frame, what the broker stores as one
//! ledger entry, and what a consumer receives in one `Message` frame.
//!
//! ```text
//! header: [u8 version=1][u8 compression][u32 num_messages][u32 body bytes uncompressed]
//!         [u64 first sequence id][u64 publish time ms][u16+name producer][u8 has key][u16+key]
//! body (compressed as a whole): per message
//!         [u8 flags: 1 = has key][u16+key][u16 property count][(u16+k, u16+v)...]
//!         [u64 event time ms, 0 = none][u32 payload length][payload]
//! ```
//! The header's key is set when every message of the batch has the same key; key_shared
//! subscriptions route whole batches by it, so producers batch per key. The broker reads only the
//! header; clients decode bodies, bounded by [`MAX_UNCOMPRESSED_BYTES`] so a small compressed
//! batch cannot expand without limit. No I/O, no clock: publish times are passed in.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Current batch format version.
pub const VERSION: u8 = 1;
/// Upper bound on a batch body after decompression.
pub const MAX_UNCOMPRESSED_BYTES: usize = 64 * 1024 * 1024;
/// Most messages in one batch.
pub const MAX_MESSAGES: u32 = 1_000_000;

/// How a batch body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Zstd,
}

impl Compression {
    fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
            Compression::Zstd => 2,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => Compression::None,
            1 => Compression::Lz4,
            2 => Compression::Zstd,
            _ => return None,
        })
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(format!("unknown compression {s:?}: expected none, lz4 or zstd")),
        }
    }
}

/// Why bytes are not a valid batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("malformed batch: {0}")]
    Malformed(&'static str),
    #[error("unsupported batch version {0}")]
    Version(u8),
    #[error("unknown compression code {0}")]
    Compression(u8),
    #[error("batch body of {0} bytes exceeds the maximum of {MAX_UNCOMPRESSED_BYTES} bytes")]
    TooLarge(usize),
    #[error("batch body does not decompress: {0}")]
    Decompress(String),
}

/// What the broker needs from a batch without decoding its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchHeader {
    pub compression: Compression,
    pub num_messages: u32,
    pub uncompressed_bytes: u32,
    pub sequence_id: u64,
    pub publish_time_ms: u64,
    pub producer_name: String,
    /// The key every message of the batch has, if they share one.
    pub key: Option<Bytes>,
}

/// One message of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    pub key: Option<Bytes>,
    pub properties: Vec<(String, String)>,
    /// Application time of the event, if set.
    pub event_time_ms: Option<u64>,
    pub payload: Bytes,
}

impl Message {
    /// Bytes this message adds to a batch body.
    pub fn encoded_len(&self) -> usize {
        1 + self.key.as_ref().map_or(0, |k| 2 + k.len())
            + 2
            + self.properties.iter().map(|(k, v)| 4 + k.len() + v.len()).sum::<usize>()
            + 8
            + 4
            + self.payload.len()
    }
}

/// Accumulates messages into a batch body.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    body: BytesMut,
    num_messages: u32,
    key: Option<Option<Bytes>>,
}

impl BatchBuilder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn len(&self) -> u32 {
        self.num_messages
    }
    pub fn is_empty(&self) -> bool {
        self.num_messages == 0
    }
    /// Uncompressed body bytes so far.
    pub fn body_bytes(&self) -> usize {
        self.body.len()
    }
    /// The key shared by every message so far (`None` if empty or keys differ).
    pub fn shared_key(&self) -> Option<&Bytes> {
        self.key.as_ref().and_then(|k| k.as_ref())
    }

    /// Appends a message. Keys, property names and values longer than 65,535 bytes are refused.
    pub fn push(&mut self, m: &Message) -> Result<(), BatchError> {
        let too_long = |b: usize| b > u16::MAX as usize;
        if m.key.as_ref().is_some_and(|k| too_long(k.len())) {
            return Err(BatchError::Malformed("key longer than 65535 bytes"));
        }
        if m.properties.len() > u16::MAX as usize
            || m.properties.iter().any(|(k, v)| too_long(k.len()) || too_long(v.len()))
        {
            return Err(BatchError::Malformed("too many or too long properties"));
        }
        if self.body.len() + m.encoded_len() > MAX_UNCOMPRESSED_BYTES || self.num_messages >= MAX_MESSAGES {
            return Err(BatchError::TooLarge(self.body.len() + m.encoded_len()));
        }
        let b = &mut self.body;
        b.reserve(m.encoded_len());
        match &m.key {
            Some(k) => {
                b.put_u8(1);
                b.put_u16(k.len() as u16);
                b.put_slice(k);
            }
            None => b.put_u8(0),
        }
        b.put_u16(m.properties.len() as u16);
        for (k, v) in &m.properties {
            b.put_u16(k.len() as u16);
            b.put_slice(k.as_bytes());
            b.put_u16(v.len() as u16);
            b.put_slice(v.as_bytes());
        }
        b.put_u64(m.event_time_ms.unwrap_or(0));
        b.put_u32(m.payload.len() as u32);
        b.put_slice(&m.payload);
        self.num_messages += 1;
        self.key = Some(match self.key.take() {
            None => m.key.clone(),
            Some(prev) if prev == m.key => prev,
            Some(_) => None,
        });
        Ok(())
    }

    /// Encodes the batch and resets the builder. Call it only when the builder holds messages:
    /// a batch of none is not valid and does not decode.
    pub fn finish(
        &mut self,
        compression: Compression,
        producer_name: &str,
        sequence_id: u64,
        publish_time_ms: u64,
    ) -> Bytes {
        let body = std::mem::take(&mut self.body);
        let uncompressed = body.len();
        let key = self.key.take().flatten();
        let num_messages = std::mem::take(&mut self.num_messages);
        let compressed: Bytes = match compression {
            Compression::None => body.freeze(),
            Compression::Lz4 => Bytes::from(lz4_flex::block::compress(&body)),
            Compression::Zstd => match zstd::bulk::compress(&body, 1) {
                Ok(v) => Bytes::from(v),
                // zstd fails only on allocation failure; store uncompressed rather than lose data.
                Err(_) => {
                    return self.finish_uncompressed(
                        body,
                        num_messages,
                        key,
                        producer_name,
                        sequence_id,
                        publish_time_ms,
                    );
                }
            },
        };
        let header = BatchHeader {
            compression,
            num_messages,
            uncompressed_bytes: uncompressed as u32,
            sequence_id,
            publish_time_ms,
            producer_name: producer_name.to_string(),
            key,
        };
        encode(&header, &compressed)
    }

    fn finish_uncompressed(
        &mut self,
        body: BytesMut,
        num_messages: u32,
        key: Option<Bytes>,
        producer_name: &str,
        sequence_id: u64,
        publish_time_ms: u64,
    ) -> Bytes {
        let header = BatchHeader {
            compression: Compression::None,
            num_messages,
            uncompressed_bytes: body.len() as u32,
            sequence_id,
            publish_time_ms,
            producer_name: producer_name.to_string(),
            key,
        };
        encode(&header, &body)
    }
}

fn encode(h: &BatchHeader, body: &[u8]) -> Bytes {
    let mut end = h.producer_name.len().min(u16::MAX as usize);
    while !h.producer_name.is_char_boundary(end) {
        end -= 1;
    }
    let name = &h.producer_name.as_bytes()[..end];
    let mut out = BytesMut::with_capacity(32 + name.len() + h.key.as_ref().map_or(0, |k| k.len()) + body.len());
    out.put_u8(VERSION);
    out.put_u8(h.compression.code());
    out.put_u32(h.num_messages);
    out.put_u32(h.uncompressed_bytes);
    out.put_u64(h.sequence_id);
    out.put_u64(h.publish_time_ms);
    out.put_u16(name.len() as u16);
    out.put_slice(name);
    match &h.key {
        Some(k) => {
            out.put_u8(1);
            out.put_u16(k.len() as u16);
            out.put_slice(k);
        }
        None => out.put_u8(0),
    }
    out.put_slice(body);
    out.freeze()
}

struct Cursor(Bytes);

impl Cursor {
    fn need(&self, n: usize) -> Result<(), BatchError> {
        if self.0.remaining() < n { Err(BatchError::Malformed("truncated")) } else { Ok(()) }
    }
    fn u8(&mut self) -> Result<u8, BatchError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, BatchError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self) -> Result<u32, BatchError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self) -> Result<u64, BatchError> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, BatchError> {
        self.need(n)?;
        Ok(self.0.split_to(n))
    }
    fn short_bytes(&mut self) -> Result<Bytes, BatchError> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }
    fn string(&mut self) -> Result<String, BatchError> {
        let b = self.short_bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| BatchError::Malformed("string is not UTF-8"))
    }
    fn opt_key(&mut self) -> Result<Option<Bytes>, BatchError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.short_bytes()?)),
            _ => Err(BatchError::Malformed("bad key flag")),
        }
    }
}

fn parse_header(c: &mut Cursor) -> Result<BatchHeader, BatchError> {
    let version = c.u8()?;
    if version != VERSION {
        return Err(BatchError::Version(version));
    }
    let code = c.u8()?;
    let compression = Compression::from_code(code).ok_or(BatchError::Compression(code))?;
    let num_messages = c.u32()?;
    let uncompressed_bytes = c.u32()?;
    if num_messages == 0 || num_messages > MAX_MESSAGES {
        return Err(BatchError::Malformed("message count is 0 or above the maximum"));
    }
    if uncompressed_bytes as usize > MAX_UNCOMPRESSED_BYTES {
        return Err(BatchError::TooLarge(uncompressed_bytes as usize));
    }
    Ok(BatchHeader {
        compression,
        num_messages,
        uncompressed_bytes,
        sequence_id: c.u64()?,
        publish_time_ms: c.u64()?,
        producer_name: c.string()?,
        key: c.opt_key()?,
    })
}

/// Reads a batch's header (what the broker validates and routes by).
pub fn read_header(batch: &Bytes) -> Result<BatchHeader, BatchError> {
    parse_header(&mut Cursor(batch.clone()))
}

/// Decodes a whole batch. Uncompressed payloads share `batch`'s buffer.
pub fn decode(batch: Bytes) -> Result<(BatchHeader, Vec<Message>), BatchError> {
    let mut c = Cursor(batch);
    let header = parse_header(&mut c)?;
    let expected = header.uncompressed_bytes as usize;
    let body = match header.compression {
        Compression::None => c.0,
        Compression::Lz4 => {
            Bytes::from(lz4_flex::block::decompress(&c.0, expected).map_err(|e| BatchError::Decompress(e.to_string()))?)
        }
        Compression::Zstd => {
            Bytes::from(zstd::bulk::decompress(&c.0, expected).map_err(|e| BatchError::Decompress(e.to_string()))?)
        }
    };
    if body.len() != expected {
        return Err(BatchError::Malformed("body length differs from the header"));
    }
    let mut c = Cursor(body);
    let mut messages = Vec::with_capacity(header.num_messages.min(4096) as usize);
    for _ in 0..header.num_messages {
        let key = c.opt_key()?;
        let n = c.u16()? as usize;
        let mut properties = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            properties.push((c.string()?, c.string()?));
        }
        let event_time_ms = Some(c.u64()?).filter(|t| *t != 0);
        let len = c.u32()? as usize;
        let payload = c.bytes(len)?;
        messages.push(Message { key, properties, event_time_ms, payload });
    }
    if c.0.has_remaining() {
        return Err(BatchError::Malformed("trailing bytes after the last message"));
    }
    Ok((header, messages))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(key: Option<&str>, payload: &str) -> Message {
        Message {
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            properties: vec![("p".to_string(), payload.to_uppercase())],
            event_time_ms: Some(5),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        }
    }

    #[test]
    fn batches_round_trip_with_every_compression() {
        for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let mut b = BatchBuilder::new();
            let msgs: Vec<Message> = (0..100).map(|i| msg(Some("k"), &format!("payload {i}"))).collect();
            for m in &msgs {
                b.push(m).expect("push");
            }
            let bytes = b.finish(compression, "prod", 10, 1234);
            assert!(b.is_empty());
            let (h, decoded) = decode(bytes.clone()).expect("decode");
            assert_eq!(h.compression, compression);
            assert_eq!(h.num_messages, 100);
            assert_eq!(h.sequence_id, 10);
            assert_eq!(h.publish_time_ms, 1234);
            assert_eq!(h.producer_name, "prod");
            assert_eq!(h.key.as_deref(), Some(&b"k"[..]));
            assert_eq!(decoded, msgs);
            assert_eq!(read_header(&bytes).expect("header"), h);
        }
    }

    #[test]
    fn shared_key_is_dropped_when_keys_differ() {
        let mut b = BatchBuilder::new();
        b.push(&msg(Some("a"), "1")).expect("push");
        assert_eq!(b.shared_key().map(|k| &k[..]), Some(&b"a"[..]));
        b.push(&msg(Some("b"), "2")).expect("push");
        assert_eq!(b.shared_key(), None);
        b.push(&msg(Some("a"), "3")).expect("push");
        let (h, _) = decode(b.finish(Compression::None, "p", 0, 0)).expect("decode");
        assert_eq!(h.key, None);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let mut b = BatchBuilder::new();
        b.push(&msg(Some("key"), "hello")).expect("push");
        b.push(&msg(None, "world")).expect("push");
        for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let mut b2 = BatchBuilder::new();
            b2.push(&msg(Some("key"), "hello")).expect("push");
            let bytes = b2.finish(compression, "p", 1, 2);
            for cut in 0..bytes.len() {
                assert!(decode(bytes.slice(..cut)).is_err(), "{compression:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn decompression_bombs_are_refused() {
        let mut bytes = BytesMut::from(&b"\x01\x02\x00\x00\x00\x01"[..]);
        bytes.put_u32(u32::MAX);
        bytes.put_slice(&[0; 20]);
        assert!(matches!(decode(bytes.freeze()), Err(BatchError::TooLarge(_))));
    }

    #[test]
    fn golden_bytes() {
        let mut b = BatchBuilder::new();
        b.push(&Message {
            key: Some(Bytes::from_static(b"k")),
            payload: Bytes::from_static(b"hi"),
            ..Default::default()
        })
        .expect("push");
        let bytes = b.finish(Compression::None, "p", 7, 9);
        let expected: &[u8] = &[
            1, 0, 0, 0, 0, 1, 0, 0, 0, 20, // version, compression, count, body bytes
            0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 9, // sequence id, publish time
            0, 1, b'p', 1, 0, 1, b'k', // producer name, shared key
            1, 0, 1, b'k', 0, 0, // message: key, no properties
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, b'h', b'i', // no event time, payload
        ];
        assert_eq!(&bytes[..], expected);
    }
}
