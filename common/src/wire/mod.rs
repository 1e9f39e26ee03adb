//! The client protocol: what producers, consumers and readers exchange with a broker.
//!
//! Every producer and every consumer has its own bidirectional stream (QUIC today; any ordered
//! byte stream works), so a slow consumer never stalls another topic. A stream starts with one
//! [`Frame::Producer`] or [`Frame::Subscribe`], answered by [`Frame::ProducerReady`] /
//! [`Frame::SubscribeReady`] or a [`Frame::Error`] that ends the stream. Closing the send side of
//! a stream closes that producer or consumer.
//!
//! Frame: `[u32 length of the rest][u8 kind][body]`, big-endian. Strings are `[u16 length][UTF-8]`;
//! a frame's payload (a message batch, see [`crate::batch`]) is its last field and takes the rest
//! of the frame, so decoding shares the receive buffer instead of copying it.
//! Frame kinds and error codes are append-only. This module is a codec only: bytes in, frames out,
//! no I/O, no clock.

#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::ids::Position;

/// Bytes before a frame's body: length and kind.
pub const FRAME_HEADER_BYTES: usize = 4 + 1;
/// Protocol version a client announces in its first frame on a stream.
pub const PROTOCOL_VERSION: u16 = 1;
/// Most positions one ack or redeliver frame may carry.
pub const MAX_POSITIONS_PER_FRAME: usize = 65_536;
/// Longest string a frame carries, in bytes.
const MAX_STRING_BYTES: usize = u16::MAX as usize;

/// How consumers of one subscription share its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubscriptionType {
    /// One consumer; a second one is refused.
    Exclusive,
    /// Many consumers, one active; the others take over in order when it leaves.
    Failover,
    /// Round robin over all consumers with permits; no ordering.
    Shared,
    /// Each key goes to one consumer; per-key order is kept.
    KeyShared,
}

impl SubscriptionType {
    fn code(self) -> u8 {
        match self {
            SubscriptionType::Exclusive => 0,
            SubscriptionType::Failover => 1,
            SubscriptionType::Shared => 2,
            SubscriptionType::KeyShared => 3,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => SubscriptionType::Exclusive,
            1 => SubscriptionType::Failover,
            2 => SubscriptionType::Shared,
            3 => SubscriptionType::KeyShared,
            _ => return None,
        })
    }
    /// The name used on command lines and in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionType::Exclusive => "exclusive",
            SubscriptionType::Failover => "failover",
            SubscriptionType::Shared => "shared",
            SubscriptionType::KeyShared => "key_shared",
        }
    }
}

impl fmt::Display for SubscriptionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SubscriptionType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "exclusive" => Ok(SubscriptionType::Exclusive),
            "failover" => Ok(SubscriptionType::Failover),
            "shared" => Ok(SubscriptionType::Shared),
            "key_shared" | "keyshared" => Ok(SubscriptionType::KeyShared),
            _ => Err(format!("unknown subscription type {s:?}: expected exclusive, failover, shared or key_shared")),
        }
    }
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum InitialPosition {
    /// After the last message written before the subscription was created.
    #[default]
    Latest,
    /// At the oldest message still stored.
    Earliest,
}

impl InitialPosition {
    fn code(self) -> u8 {
        match self {
            InitialPosition::Latest => 0,
            InitialPosition::Earliest => 1,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(InitialPosition::Latest),
            1 => Some(InitialPosition::Earliest),
            _ => None,
        }
    }
}

impl FromStr for InitialPosition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "latest" => Ok(InitialPosition::Latest),
            "earliest" => Ok(InitialPosition::Earliest),
            _ => Err(format!("unknown initial position {s:?}: expected earliest or latest")),
        }
    }
}

/// What went wrong, as the wire carries it: a small code telling the client what to do, with a
/// human message beside it. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is malformed or names something invalid; fix the input.
    BadRequest,
    /// The topic name is not valid.
    InvalidTopicName,
    /// The topic does not exist and is not created on first use.
    TopicNotFound,
    /// The message or batch is above the broker's maximum size.
    MessageTooLarge,
    /// The exclusive subscription already has a consumer, or a subscription of another type exists.
    ConsumerBusy,
    /// The broker cannot serve the request now (storage unavailable, starting, overloaded); retry.
    ServiceUnavailable,
    /// Storing the message failed; it was not persisted. Retry.
    PersistenceError,
    /// The broker is shutting down; reconnect (to it or another broker) and retry.
    ShuttingDown,
    /// A bug or unexpected state in the broker.
    Internal,
    /// A producer with this name is already connected to the topic.
    ProducerBusy,
    /// This broker does not own the topic (any more): look the topic up again and connect to
    /// its owner.
    NotOwner,
    /// Code unknown to this version of the codec (sent by a newer broker).
    Unknown(u16),
}

impl ErrorCode {
    /// The code on the wire.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 1,
            ErrorCode::InvalidTopicName => 2,
            ErrorCode::TopicNotFound => 3,
            ErrorCode::MessageTooLarge => 4,
            ErrorCode::ConsumerBusy => 5,
            ErrorCode::ServiceUnavailable => 6,
            ErrorCode::PersistenceError => 7,
            ErrorCode::ShuttingDown => 8,
            ErrorCode::Internal => 9,
            ErrorCode::ProducerBusy => 10,
            ErrorCode::NotOwner => 11,
            ErrorCode::Unknown(c) => c,
        }
    }
    /// The code for a wire value.
    pub fn from_code(c: u16) -> Self {
        match c {
            1 => ErrorCode::BadRequest,
            2 => ErrorCode::InvalidTopicName,
            3 => ErrorCode::TopicNotFound,
            4 => ErrorCode::MessageTooLarge,
            5 => ErrorCode::ConsumerBusy,
            6 => ErrorCode::ServiceUnavailable,
            7 => ErrorCode::PersistenceError,
            8 => ErrorCode::ShuttingDown,
            9 => ErrorCode::Internal,
            10 => ErrorCode::ProducerBusy,
            11 => ErrorCode::NotOwner,
            c => ErrorCode::Unknown(c),
        }
    }
    /// Whether the same request may succeed later without changes.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::ServiceUnavailable | ErrorCode::PersistenceError | ErrorCode::ShuttingDown | ErrorCode::NotOwner
        )
    }
}

/// First frame of a producer stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerRequest {
    pub protocol_version: u16,
    /// Topic as the user wrote it (short or full name).
    pub topic: String,
    /// Producer name; empty asks the broker to choose one.
    pub producer_name: String,
}

/// First frame of a consumer stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeRequest {
    pub protocol_version: u16,
    pub topic: String,
    pub subscription: String,
    pub subscription_type: SubscriptionType,
    /// Where the subscription starts if it does not exist yet.
    pub initial_position: InitialPosition,
    pub consumer_name: String,
    /// Lower is preferred as the active consumer of a failover subscription.
    pub priority: i32,
    /// A durable subscription keeps its cursor in the metadata store; a non-durable one (a reader)
    /// lives as long as its consumer.
    pub durable: bool,
    /// For a non-durable subscription: the first position to deliver (overrides
    /// `initial_position`).
    pub start: Option<Position>,
    /// Messages this consumer has not acknowledged this long after delivery are redelivered,
    /// to it or another consumer of the subscription (0: never).
    pub ack_timeout_ms: u32,
}

/// One frame of the client protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client: open a producer on this stream.
    Producer(ProducerRequest),
    /// Broker: the producer is ready. `max_message_bytes` bounds each `Send` payload.
    ProducerReady { producer_name: String, topic: String, max_message_bytes: u32 },
    /// Client: publish one batch of `num_messages` messages (see [`crate::batch`]).
    Send { sequence_id: u64, num_messages: u32, payload: Bytes },
    /// Broker: the batch with this sequence id is durable at `position`.
    SendReceipt { sequence_id: u64, position: Position },
    /// Broker: the batch was not stored.
    SendError { sequence_id: u64, code: ErrorCode, message: String },
    /// Client: attach a consumer on this stream.
    Subscribe(SubscribeRequest),
    /// Broker: the consumer is attached.
    SubscribeReady { topic: String },
    /// Client: the consumer can take `permits` more messages.
    Flow { permits: u32 },
    /// Broker: one stored batch, delivered for the `redelivery_count + 1`-th time.
    Message { position: Position, redelivery_count: u32, payload: Bytes },
    /// Client: acknowledge these entries (or, cumulative, everything up to and including the one).
    Ack { cumulative: bool, positions: Vec<Position> },
    /// Client: redeliver these unacknowledged entries (all of this consumer's when empty).
    Redeliver { positions: Vec<Position> },
    /// Broker: this consumer became the active (or a standby) consumer of a failover subscription.
    ActiveConsumerChange { active: bool },
    /// Broker: the request failed; the stream is closed after this frame.
    Error { code: ErrorCode, message: String },
    /// Client: which broker serves this topic? Sent to any broker, alone on its stream.
    Lookup { topic: String },
    /// Broker: the topic (full name) is served by the broker at `broker_url`
    /// (`quic://host:port`), whose admin API is at `http_url`.
    LookupResult { topic: String, broker_url: String, http_url: String },
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Producer(_) => 1,
            Frame::ProducerReady { .. } => 2,
            Frame::Send { .. } => 3,
            Frame::SendReceipt { .. } => 4,
            Frame::SendError { .. } => 5,
            Frame::Subscribe(_) => 6,
            Frame::SubscribeReady { .. } => 7,
            Frame::Flow { .. } => 8,
            Frame::Message { .. } => 9,
            Frame::Ack { .. } => 10,
            Frame::Redeliver { .. } => 11,
            Frame::ActiveConsumerChange { .. } => 12,
            Frame::Error { .. } => 13,
            Frame::Lookup { .. } => 14,
            Frame::LookupResult { .. } => 15,
        }
    }

    /// The frame's kind, as a name for messages and logs.
    pub fn name(&self) -> &'static str {
        Self::kind_name(self.kind())
    }

    fn kind_name(kind: u8) -> &'static str {
        match kind {
            1 => "Producer",
            2 => "ProducerReady",
            3 => "Send",
            4 => "SendReceipt",
            5 => "SendError",
            6 => "Subscribe",
            7 => "SubscribeReady",
            8 => "Flow",
            9 => "Message",
            10 => "Ack",
            11 => "Redeliver",
            12 => "ActiveConsumerChange",
            13 => "Error",
            14 => "Lookup",
            15 => "LookupResult",
            _ => "unknown",
        }
    }

    /// Appends the encoded frame to `dst`.
    ///
    /// Strings longer than 65,535 bytes and position lists longer than
    /// [`MAX_POSITIONS_PER_FRAME`] are truncated; callers validate names before encoding and
    /// split position lists.
    pub fn encode(&self, dst: &mut BytesMut) {
        let start = dst.len();
        dst.put_u32(0);
        dst.put_u8(self.kind());
        match self {
            Frame::Producer(p) => {
                dst.put_u16(p.protocol_version);
                put_str(dst, &p.topic);
                put_str(dst, &p.producer_name);
            }
            Frame::ProducerReady { producer_name, topic, max_message_bytes } => {
                put_str(dst, producer_name);
                put_str(dst, topic);
                dst.put_u32(*max_message_bytes);
            }
            Frame::Send { sequence_id, num_messages, payload } => {
                dst.put_u64(*sequence_id);
                dst.put_u32(*num_messages);
                dst.put_slice(payload);
            }
            Frame::SendReceipt { sequence_id, position } => {
                dst.put_u64(*sequence_id);
                put_position(dst, *position);
            }
            Frame::SendError { sequence_id, code, message } => {
                dst.put_u64(*sequence_id);
                dst.put_u16(code.code());
                put_str(dst, message);
            }
            Frame::Subscribe(s) => {
                dst.put_u16(s.protocol_version);
                put_str(dst, &s.topic);
                put_str(dst, &s.subscription);
                dst.put_u8(s.subscription_type.code());
                dst.put_u8(s.initial_position.code());
                put_str(dst, &s.consumer_name);
                dst.put_i32(s.priority);
                dst.put_u8(u8::from(s.durable));
                match s.start {
                    Some(p) => {
                        dst.put_u8(1);
                        put_position(dst, p);
                    }
                    None => dst.put_u8(0),
                }
                dst.put_u32(s.ack_timeout_ms);
            }
            Frame::SubscribeReady { topic } => put_str(dst, topic),
            Frame::Flow { permits } => dst.put_u32(*permits),
            Frame::Message { position, redelivery_count, payload } => {
                put_position(dst, *position);
                dst.put_u32(*redelivery_count);
                dst.put_slice(payload);
            }
            Frame::Ack { cumulative, positions } => {
                dst.put_u8(u8::from(*cumulative));
                put_positions(dst, positions);
            }
            Frame::Redeliver { positions } => put_positions(dst, positions),
            Frame::ActiveConsumerChange { active } => dst.put_u8(u8::from(*active)),
            Frame::Error { code, message } => {
                dst.put_u16(code.code());
                put_str(dst, message);
            }
            Frame::Lookup { topic } => put_str(dst, topic),
            Frame::LookupResult { topic, broker_url, http_url } => {
                put_str(dst, topic);
                put_str(dst, broker_url);
                put_str(dst, http_url);
            }
        }
        let len = (dst.len() - start - 4) as u32;
        dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// The encoded frame as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        self.encode(&mut b);
        b.freeze()
    }
}

/// Appends the header of a [`Frame::Message`] (length, kind, position, redelivery count) for a
/// payload of `payload_len` bytes. The header followed by the payload is exactly the frame's
/// encoding, so a sender can hand the payload to the transport without copying it.
pub fn encode_message_header(position: Position, redelivery_count: u32, payload_len: usize, dst: &mut BytesMut) {
    dst.put_u32((1 + 16 + 4 + payload_len) as u32);
    dst.put_u8(9);
    put_position(dst, position);
    dst.put_u32(redelivery_count);
}

/// Appends the header of a [`Frame::Send`] (length, kind, sequence id, message count) for a
/// payload of `payload_len` bytes; see [`encode_message_header`].
pub fn encode_send_header(sequence_id: u64, num_messages: u32, payload_len: usize, dst: &mut BytesMut) {
    dst.put_u32((1 + 8 + 4 + payload_len) as u32);
    dst.put_u8(3);
    dst.put_u64(sequence_id);
    dst.put_u32(num_messages);
}

/// Why bytes are not a valid frame. The stream (or connection) that sent them is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame (no kind byte)")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed {kind} frame: {what}")]
    Malformed { kind: &'static str, what: &'static str },
}

/// Decodes the next whole frame from `src`: `Ok(None)` if more bytes are needed. Consumes the
/// frame's bytes; payloads share `src`'s buffer.
pub fn decode(src: &mut BytesMut, max_frame_bytes: usize) -> Result<Option<Frame>, FrameError> {
    if src.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if len > max_frame_bytes {
        return Err(FrameError::TooLarge { len, max: max_frame_bytes });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if src.len() < 4 + len {
        src.reserve(4 + len - src.len());
        return Ok(None);
    }
    src.advance(4);
    let body = src.split_to(len).freeze();
    decode_body(body).map(Some)
}

/// Decodes one frame whose length prefix has been removed: `[u8 kind][body]`.
pub fn decode_body(mut body: Bytes) -> Result<Frame, FrameError> {
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    let kind = body.get_u8();
    let mut r = Reader { buf: body, kind: Frame::kind_name(kind) };
    let frame = match kind {
        1 => Frame::Producer(ProducerRequest {
            protocol_version: r.u16()?,
            topic: r.string()?,
            producer_name: r.string()?,
        }),
        2 => Frame::ProducerReady { producer_name: r.string()?, topic: r.string()?, max_message_bytes: r.u32()? },
        3 => Frame::Send { sequence_id: r.u64()?, num_messages: r.u32()?, payload: r.rest() },
        4 => Frame::SendReceipt { sequence_id: r.u64()?, position: r.position()? },
        5 => Frame::SendError { sequence_id: r.u64()?, code: ErrorCode::from_code(r.u16()?), message: r.string()? },
        6 => {
            let protocol_version = r.u16()?;
            let topic = r.string()?;
            let subscription = r.string()?;
            let subscription_type = SubscriptionType::from_code(r.u8()?).ok_or(r.bad("unknown subscription type"))?;
            let initial_position = InitialPosition::from_code(r.u8()?).ok_or(r.bad("unknown initial position"))?;
            let consumer_name = r.string()?;
            let priority = r.u32()? as i32;
            let durable = r.bool()?;
            let start = if r.bool()? { Some(r.position()?) } else { None };
            let ack_timeout_ms = r.u32()?;
            Frame::Subscribe(SubscribeRequest {
                protocol_version,
                topic,
                subscription,
                subscription_type,
                initial_position,
                consumer_name,
                priority,
                durable,
                start,
                ack_timeout_ms,
            })
        }
        7 => Frame::SubscribeReady { topic: r.string()? },
        8 => Frame::Flow { permits: r.u32()? },
        9 => Frame::Message { position: r.position()?, redelivery_count: r.u32()?, payload: r.rest() },
        10 => Frame::Ack { cumulative: r.bool()?, positions: r.positions()? },
        11 => Frame::Redeliver { positions: r.positions()? },
        12 => Frame::ActiveConsumerChange { active: r.bool()? },
        13 => Frame::Error { code: ErrorCode::from_code(r.u16()?), message: r.string()? },
        14 => Frame::Lookup { topic: r.string()? },
        15 => Frame::LookupResult { topic: r.string()?, broker_url: r.string()?, http_url: r.string()? },
        k => return Err(FrameError::UnknownKind(k)),
    };
    if r.buf.has_remaining() {
        return Err(r.bad("trailing bytes"));
    }
    Ok(frame)
}

fn put_str(dst: &mut BytesMut, s: &str) {
    let mut end = s.len().min(MAX_STRING_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    dst.put_u16(end as u16);
    dst.put_slice(&s.as_bytes()[..end]);
}

fn put_position(dst: &mut BytesMut, p: Position) {
    dst.put_u64(p.ledger_id);
    dst.put_u64(p.entry_id);
}

fn put_positions(dst: &mut BytesMut, ps: &[Position]) {
    let n = ps.len().min(MAX_POSITIONS_PER_FRAME);
    dst.put_u32(n as u32);
    for p in &ps[..n] {
        put_position(dst, *p);
    }
}

struct Reader {
    buf: Bytes,
    kind: &'static str,
}

impl Reader {
    fn bad(&self, what: &'static str) -> FrameError {
        FrameError::Malformed { kind: self.kind, what }
    }
    fn need(&self, n: usize) -> Result<(), FrameError> {
        if self.buf.remaining() < n { Err(self.bad("body too short")) } else { Ok(()) }
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn bool(&mut self) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.bad("boolean is neither 0 nor 1")),
        }
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    fn string(&mut self) -> Result<String, FrameError> {
        let n = self.u16()? as usize;
        self.need(n)?;
        let b = self.buf.split_to(n);
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("string is not UTF-8"))
    }
    fn position(&mut self) -> Result<Position, FrameError> {
        Ok(Position { ledger_id: self.u64()?, entry_id: self.u64()? })
    }
    fn positions(&mut self) -> Result<Vec<Position>, FrameError> {
        let n = self.u32()? as usize;
        if n > MAX_POSITIONS_PER_FRAME {
            return Err(self.bad("too many positions"));
        }
        self.need(n * 16)?;
        (0..n).map(|_| self.position()).collect()
    }
    fn rest(&mut self) -> Bytes {
        self.buf.split_off(0)
    }
}
