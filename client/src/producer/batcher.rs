//! The producer's state machine: which messages go into which batch, the batches waiting for a
//! receipt, and which message ids the receipts give. No I/O and no clock: the caller passes
//! `now` and the wall-clock publish time, and sends the frames it gets back.
//!
//! Batching rules:
//! - A batch holds messages with the same key (or all without one). A message with another key
//!   sends the open batch first, because key_shared subscriptions route whole batches by key.
//! - The open batch is sent when it reaches `max_messages` or `max_bytes` (uncompressed body),
//!   when `max_delay` has passed since its first message, or on flush or close; with batching
//!   off, every message is its own batch.
//! - No batch exceeds the broker's `max_message_bytes` (the whole `Send` payload, header
//!   included): the open batch is sent before a message that would take it over, and a message
//!   that cannot fit even alone fails with [`Error::MessageTooLarge`]. A batch whose compressed
//!   size could exceed the limit in the worst case goes out uncompressed.
//!
//! Sequence ids count messages from 0 per producer; a batch's id is its first message's.
//! Receipts come in batch order; message `i` of a batch gets `MessageId(position, i)`.
//!
//! A batch keeps its payload until its outcome is known, so that after a reconnection every
//! unconfirmed batch can be sent again ([`ProducerState::resend`]), in order and with the same
//! sequence ids, before any newer one.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use magnetar_common::batch::{self, BatchBuilder, Compression};
use magnetar_common::ids::{MessageId, Position};
use magnetar_common::wire::{ErrorCode, Frame};

use crate::Error;

/// Longest key, property name or property value the batch format can carry.
const MAX_FIELD_BYTES: usize = u16::MAX as usize;

/// How a producer groups messages into batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BatchPolicy {
    pub enabled: bool,
    pub max_messages: u32,
    pub max_bytes: usize,
    pub max_delay: Duration,
    pub compression: Compression,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            enabled: true,
            max_messages: 1000,
            max_bytes: 128 * 1024,
            max_delay: Duration::from_millis(1),
            compression: Compression::None,
        }
    }
}

impl BatchPolicy {
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_messages == 0 || self.max_messages > batch::MAX_MESSAGES {
            return Err(Error::InvalidArgument(format!(
                "batching_max_messages is {}; it must be between 1 and {}",
                self.max_messages,
                batch::MAX_MESSAGES
            )));
        }
        if self.max_bytes == 0 || self.max_bytes > batch::MAX_UNCOMPRESSED_BYTES {
            return Err(Error::InvalidArgument(format!(
                "batching_max_bytes is {}; it must be between 1 and {}",
                self.max_bytes,
                batch::MAX_UNCOMPRESSED_BYTES
            )));
        }
        Ok(())
    }
}

/// Bytes of a batch header for this producer name and batch key.
fn header_bytes(producer_name: &str, key: Option<&Bytes>) -> usize {
    let name = producer_name.len().min(MAX_FIELD_BYTES);
    1 + 1 + 4 + 4 + 8 + 8 + 2 + name + 1 + key.map_or(0, |k| 2 + k.len())
}

/// Most bytes LZ4 or zstd may turn `n` bytes into (both stay under n + n/255 + 64).
fn compressed_bound(n: usize) -> usize {
    n + n / 255 + 64
}

/// Checks that `m` can be encoded and fits in a batch of its own under `max_message_bytes`;
/// returns its encoded length in a batch body.
pub(crate) fn check_message(m: &batch::Message, producer_name: &str, max_message_bytes: usize) -> Result<usize, Error> {
    if let Some(k) = &m.key
        && k.len() > MAX_FIELD_BYTES
    {
        return Err(Error::InvalidArgument(format!(
            "message key is {} bytes; the maximum is {MAX_FIELD_BYTES}",
            k.len()
        )));
    }
    if m.properties.len() > MAX_FIELD_BYTES {
        return Err(Error::InvalidArgument(format!(
            "message has {} properties; the maximum is {MAX_FIELD_BYTES}",
            m.properties.len()
        )));
    }
    if let Some((k, v)) = m.properties.iter().find(|(k, v)| k.len() > MAX_FIELD_BYTES || v.len() > MAX_FIELD_BYTES) {
        return Err(Error::InvalidArgument(format!(
            "message property {:?} has a {}-byte name and a {}-byte value; each may have at most {MAX_FIELD_BYTES}",
            k.chars().take(32).collect::<String>(),
            k.len(),
            v.len()
        )));
    }
    let len = m.encoded_len();
    let size = header_bytes(producer_name, m.key.as_ref()) + len;
    if size > max_message_bytes {
        return Err(Error::MessageTooLarge { size, max: max_message_bytes });
    }
    Ok(len)
}

/// The batch being filled.
#[derive(Debug)]
struct OpenBatch<W> {
    first_sequence_id: u64,
    key: Option<Bytes>,
    waiters: Vec<W>,
    opened_at: Instant,
}

/// A batch sent (or to be sent once reconnected) and waiting for its receipt.
#[derive(Debug)]
struct InFlight<W> {
    sequence_id: u64,
    num_messages: u32,
    payload: Bytes,
    waiters: Vec<W>,
}

/// One producer's batches. `W` is whatever waits for a message's outcome (a reply channel in
/// the client, a label in tests); message `i` of a batch is its `i`-th waiter.
#[derive(Debug)]
pub(crate) struct ProducerState<W> {
    name: String,
    policy: BatchPolicy,
    max_message_bytes: usize,
    next_sequence_id: u64,
    builder: BatchBuilder,
    open: Option<OpenBatch<W>>,
    in_flight: VecDeque<InFlight<W>>,
}

impl<W> ProducerState<W> {
    /// `name` is the producer name the broker confirmed; `max_message_bytes` its limit.
    pub fn new(name: String, policy: BatchPolicy, max_message_bytes: usize) -> Self {
        ProducerState {
            name,
            policy,
            max_message_bytes,
            next_sequence_id: 0,
            builder: BatchBuilder::new(),
            open: None,
            in_flight: VecDeque::new(),
        }
    }

    /// Adds a message, appending the `Send` frames this causes to `out`. On error the message
    /// is not queued and its waiter comes back with the reason.
    pub fn push(
        &mut self,
        m: batch::Message,
        waiter: W,
        now: Instant,
        publish_time_ms: u64,
        out: &mut Vec<Frame>,
    ) -> Result<(), (W, Error)> {
        let len = match check_message(&m, &self.name, self.max_message_bytes) {
            Ok(len) => len,
            Err(e) => return Err((waiter, e)),
        };
        if let Some(open) = &self.open {
            let body = self.builder.body_bytes();
            let key_changed = open.key != m.key;
            let over_limit = header_bytes(&self.name, open.key.as_ref()) + body + len > self.max_message_bytes;
            let over_batch_bytes = body + len > self.policy.max_bytes;
            if key_changed || over_limit || over_batch_bytes {
                self.flush(publish_time_ms, out);
            }
        }
        if let Err(e) = self.builder.push(&m) {
            // check_message covers what push checks; this is a safety net.
            return Err((waiter, Error::InvalidArgument(e.to_string())));
        }
        let open = self.open.get_or_insert_with(|| OpenBatch {
            first_sequence_id: self.next_sequence_id,
            key: m.key.clone(),
            waiters: Vec::new(),
            opened_at: now,
        });
        open.waiters.push(waiter);
        self.next_sequence_id += 1;
        if !self.policy.enabled
            || self.builder.len() >= self.policy.max_messages
            || self.builder.body_bytes() >= self.policy.max_bytes
        {
            self.flush(publish_time_ms, out);
        }
        Ok(())
    }

    /// Sends the open batch, if any.
    pub fn flush(&mut self, publish_time_ms: u64, out: &mut Vec<Frame>) {
        let Some(open) = self.open.take() else { return };
        let num_messages = self.builder.len();
        let header = header_bytes(&self.name, open.key.as_ref());
        let compression = match self.policy.compression {
            Compression::None => Compression::None,
            c if header + compressed_bound(self.builder.body_bytes()) <= self.max_message_bytes => c,
            _ => Compression::None,
        };
        let payload = self.builder.finish(compression, &self.name, open.first_sequence_id, publish_time_ms);
        out.push(Frame::Send { sequence_id: open.first_sequence_id, num_messages, payload: payload.clone() });
        self.in_flight.push_back(InFlight {
            sequence_id: open.first_sequence_id,
            num_messages,
            payload,
            waiters: open.waiters,
        });
    }

    /// The `Send` frames of every batch still waiting for its outcome, oldest first: what a new
    /// stream must carry before anything newer.
    pub fn resend(&self, out: &mut Vec<Frame>) {
        out.extend(self.in_flight.iter().map(|f| Frame::Send {
            sequence_id: f.sequence_id,
            num_messages: f.num_messages,
            payload: f.payload.clone(),
        }));
    }

    /// How many batches wait for their outcome.
    pub fn batches_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// When the open batch must be sent at the latest.
    pub fn deadline(&self) -> Option<Instant> {
        self.open.as_ref().map(|o| o.opened_at + self.policy.max_delay)
    }

    /// The broker stored the batch `sequence_id` at `position`: its messages' ids, in order.
    /// A receipt for any batch but the oldest unconfirmed one is a protocol error.
    pub fn on_receipt(&mut self, sequence_id: u64, position: Position) -> Result<Vec<(W, MessageId)>, Error> {
        match self.in_flight.front() {
            Some(f) if f.sequence_id == sequence_id => {}
            Some(f) => {
                return Err(Error::Protocol(format!(
                    "receipt for sequence id {sequence_id}, but the oldest unconfirmed batch is {}",
                    f.sequence_id
                )));
            }
            None => {
                return Err(Error::Protocol(format!(
                    "receipt for sequence id {sequence_id}, but no batch is waiting for one"
                )));
            }
        }
        let Some(batch) = self.in_flight.pop_front() else { return Ok(Vec::new()) };
        Ok(batch
            .waiters
            .into_iter()
            .enumerate()
            .map(|(i, w)| (w, MessageId { position, batch_index: i as u32 }))
            .collect())
    }

    /// The broker did not store the batch `sequence_id`: its waiters and the error for them.
    pub fn on_send_error(
        &mut self,
        sequence_id: u64,
        code: ErrorCode,
        message: &str,
    ) -> Result<(Vec<W>, Error), Error> {
        let Some(i) = self.in_flight.iter().position(|f| f.sequence_id == sequence_id) else {
            return Err(Error::Protocol(format!(
                "send error for sequence id {sequence_id}, which is not waiting for a receipt"
            )));
        };
        let batch = self.in_flight.remove(i).map(|b| b.waiters).unwrap_or_default();
        Ok((batch, Error::broker(code, message)))
    }

    /// Takes every waiter (open and in-flight batches), for failing them all.
    pub fn take_all(&mut self) -> Vec<W> {
        self.builder = BatchBuilder::new();
        let open = self.open.take().map(|o| o.waiters).unwrap_or_default();
        let in_flight = std::mem::take(&mut self.in_flight);
        in_flight.into_iter().flat_map(|b| b.waiters).chain(open).collect()
    }

    /// The sequence id the next message gets.
    pub fn next_sequence_id(&self) -> u64 {
        self.next_sequence_id
    }

    /// The lowest sequence id whose outcome is not known yet (`next_sequence_id` if none).
    pub fn unresolved_from(&self) -> u64 {
        self.in_flight
            .front()
            .map(|f| f.sequence_id)
            .or(self.open.as_ref().map(|o| o.first_sequence_id))
            .unwrap_or(self.next_sequence_id)
    }

    /// No open batch and nothing waiting for a receipt.
    pub fn is_idle(&self) -> bool {
        self.open.is_none() && self.in_flight.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 5 * 1024 * 1024;

    fn msg(key: Option<&str>, payload_len: usize) -> batch::Message {
        batch::Message {
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            payload: Bytes::from(vec![7u8; payload_len]),
            ..Default::default()
        }
    }

    fn state(policy: BatchPolicy, max: usize) -> ProducerState<u32> {
        ProducerState::new("p".to_string(), policy, max)
    }

    /// (sequence id, message count, decoded header key) of each Send frame.
    fn sends(frames: &[Frame]) -> Vec<(u64, u32, Option<Bytes>)> {
        frames
            .iter()
            .map(|f| match f {
                Frame::Send { sequence_id, num_messages, payload } => {
                    let (h, msgs) = batch::decode(payload.clone()).expect("decode batch");
                    assert_eq!(h.sequence_id, *sequence_id);
                    assert_eq!(h.num_messages, *num_messages);
                    assert_eq!(msgs.len(), *num_messages as usize);
                    (*sequence_id, *num_messages, h.key)
                }
                other => panic!("expected Send, got {other:?}"),
            })
            .collect()
    }

    fn push(s: &mut ProducerState<u32>, m: batch::Message, w: u32, out: &mut Vec<Frame>) {
        s.push(m, w, Instant::now(), 1, out).map_err(|(_, e)| e).expect("push");
    }

    #[test]
    fn a_new_key_sends_the_open_batch_first() {
        let mut s = state(BatchPolicy::default(), MAX);
        let mut out = Vec::new();
        push(&mut s, msg(Some("a"), 10), 0, &mut out);
        push(&mut s, msg(Some("a"), 10), 1, &mut out);
        assert!(out.is_empty());
        push(&mut s, msg(Some("b"), 10), 2, &mut out);
        push(&mut s, msg(None, 10), 3, &mut out);
        push(&mut s, msg(None, 10), 4, &mut out);
        s.flush(1, &mut out);
        assert_eq!(
            sends(&out),
            vec![(0, 2, Some(Bytes::from_static(b"a"))), (2, 1, Some(Bytes::from_static(b"b"))), (3, 2, None)]
        );
    }

    #[test]
    fn batches_close_at_max_messages_and_max_bytes() {
        let policy = BatchPolicy { max_messages: 3, max_bytes: 1000, ..Default::default() };
        let mut s = state(policy, MAX);
        let mut out = Vec::new();
        for i in 0..7 {
            push(&mut s, msg(None, 1), i, &mut out);
        }
        assert_eq!(sends(&out).iter().map(|b| (b.0, b.1)).collect::<Vec<_>>(), vec![(0, 3), (3, 3)]);
        assert!(s.deadline().is_some(), "message 6 waits in an open batch");
        s.flush(1, &mut out);
        assert!(s.deadline().is_none());

        // 400-byte payloads: two fit under max_bytes = 1000, a third would not.
        out.clear();
        for i in 0..5 {
            push(&mut s, msg(None, 400), i, &mut out);
        }
        s.flush(1, &mut out);
        assert_eq!(sends(&out).iter().map(|b| b.1).collect::<Vec<_>>(), vec![2, 2, 1]);
    }

    #[test]
    fn without_batching_every_message_is_a_batch() {
        let mut s = state(BatchPolicy { enabled: false, ..Default::default() }, MAX);
        let mut out = Vec::new();
        for i in 0..3 {
            push(&mut s, msg(None, 5), i, &mut out);
        }
        assert_eq!(sends(&out).iter().map(|b| (b.0, b.1)).collect::<Vec<_>>(), vec![(0, 1), (1, 1), (2, 1)]);
        assert!(s.deadline().is_none());
    }

    #[test]
    fn a_message_too_large_for_the_broker_is_refused_and_nothing_is_queued() {
        let mut s = state(BatchPolicy::default(), 1000);
        let mut out = Vec::new();
        let overhead = header_bytes("p", None) + msg(None, 0).encoded_len();
        // Exactly at the limit: accepted.
        push(&mut s, msg(None, 1000 - overhead), 0, &mut out);
        s.flush(1, &mut out);
        let Frame::Send { payload, .. } = &out[0] else { panic!("send") };
        assert_eq!(payload.len(), 1000);
        // One byte more: refused with its size.
        let (w, e) = s.push(msg(None, 1001 - overhead), 1, Instant::now(), 1, &mut out).expect_err("too large");
        assert_eq!(w, 1);
        assert_eq!(e, Error::MessageTooLarge { size: 1001, max: 1000 });
        assert_eq!(s.next_sequence_id(), 1, "a refused message takes no sequence id");
        let long_key = "k".repeat(70_000);
        let (_, e) = s.push(msg(Some(&long_key), 1), 2, Instant::now(), 1, &mut out).expect_err("long key");
        assert!(matches!(e, Error::InvalidArgument(m) if m.contains("key is 70000 bytes")));
    }

    #[test]
    fn batches_are_sent_early_so_none_exceeds_the_broker_limit() {
        // The batching limit (128 KiB) is above the broker's (10 KiB): the broker's wins.
        let mut s = state(BatchPolicy::default(), 10 * 1024);
        let mut out = Vec::new();
        for i in 0..100 {
            push(&mut s, msg(None, 1000), i, &mut out);
        }
        s.flush(1, &mut out);
        let mut total = 0;
        for f in &out {
            let Frame::Send { payload, num_messages, .. } = f else { panic!("send") };
            assert!(payload.len() <= 10 * 1024, "batch of {} bytes", payload.len());
            total += num_messages;
        }
        assert_eq!(total, 100);
        assert!(out.len() >= 10, "{} batches", out.len());
    }

    #[test]
    fn compression_is_dropped_when_it_could_exceed_the_limit() {
        let policy = BatchPolicy { compression: Compression::Lz4, ..Default::default() };
        let overhead = header_bytes("p", None) + msg(None, 0).encoded_len();
        let mut s = state(policy, 2000);
        let mut out = Vec::new();
        push(&mut s, msg(None, 2000 - overhead), 0, &mut out);
        push(&mut s, msg(None, 100), 1, &mut out);
        s.flush(1, &mut out);
        let headers: Vec<_> = out
            .iter()
            .map(|f| match f {
                Frame::Send { payload, .. } => batch::read_header(payload).expect("header").compression,
                _ => panic!("send"),
            })
            .collect();
        assert_eq!(headers, vec![Compression::None, Compression::Lz4]);
    }

    #[test]
    fn receipts_map_to_message_ids_in_order() {
        let mut s = state(BatchPolicy { max_messages: 3, ..Default::default() }, MAX);
        let mut out = Vec::new();
        for i in 0..5 {
            push(&mut s, msg(None, 1), i, &mut out);
        }
        s.flush(1, &mut out);
        assert_eq!(s.unresolved_from(), 0);
        let err = s.on_receipt(3, Position::new(9, 1)).expect_err("out of order");
        assert!(matches!(err, Error::Protocol(m) if m.contains("oldest unconfirmed batch is 0")));
        let ids = s.on_receipt(0, Position::new(9, 0)).expect("receipt");
        assert_eq!(ids, vec![(0, MessageId::new(9, 0, 0)), (1, MessageId::new(9, 0, 1)), (2, MessageId::new(9, 0, 2))]);
        assert_eq!(s.unresolved_from(), 3);
        let ids = s.on_receipt(3, Position::new(9, 1)).expect("receipt");
        assert_eq!(ids, vec![(3, MessageId::new(9, 1, 0)), (4, MessageId::new(9, 1, 1))]);
        assert!(s.is_idle());
        assert_eq!(s.unresolved_from(), 5);
        assert!(s.on_receipt(5, Position::new(9, 2)).is_err(), "nothing is waiting");
    }

    #[test]
    fn a_send_error_fails_only_that_batch() {
        let mut s = state(BatchPolicy { enabled: false, ..Default::default() }, MAX);
        let mut out = Vec::new();
        for i in 0..3 {
            push(&mut s, msg(None, 1), i, &mut out);
        }
        let (waiters, err) = s.on_send_error(1, ErrorCode::PersistenceError, "bookies unavailable").expect("known");
        assert_eq!(waiters, vec![1]);
        assert_eq!(err, Error::broker(ErrorCode::PersistenceError, "bookies unavailable"));
        assert!(err.is_retryable());
        assert_eq!(s.on_receipt(0, Position::new(1, 0)).expect("receipt").len(), 1);
        assert_eq!(s.on_receipt(2, Position::new(1, 1)).expect("receipt"), vec![(2, MessageId::new(1, 1, 0))]);
        assert!(s.on_send_error(7, ErrorCode::Internal, "x").is_err());
    }

    #[test]
    fn resend_repeats_the_unconfirmed_batches_in_order() {
        let mut s = state(BatchPolicy { enabled: false, ..Default::default() }, MAX);
        let mut sent = Vec::new();
        for i in 0..4 {
            push(&mut s, msg(None, 3), i, &mut sent);
        }
        assert_eq!(s.on_receipt(0, Position::new(1, 0)).expect("receipt").len(), 1);
        let mut again = Vec::new();
        s.resend(&mut again);
        assert_eq!(again, sent[1..].to_vec(), "the same frames: sequence ids and payloads");
        assert_eq!(s.batches_in_flight(), 3);
        // Receipts for the resent batches resolve each waiter once.
        for (seq, w) in [(1, 1), (2, 2), (3, 3)] {
            assert_eq!(
                s.on_receipt(seq, Position::new(2, seq)).expect("receipt"),
                vec![(w, MessageId::new(2, seq, 0))]
            );
        }
        again.clear();
        s.resend(&mut again);
        assert!(again.is_empty());
    }

    #[test]
    fn take_all_returns_every_unresolved_waiter() {
        let mut s = state(BatchPolicy { max_messages: 2, ..Default::default() }, MAX);
        let mut out = Vec::new();
        for i in 0..5 {
            push(&mut s, msg(None, 1), i, &mut out);
        }
        let mut all = s.take_all();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
        assert!(s.is_idle());
    }

    #[test]
    fn the_deadline_is_the_first_message_plus_the_delay() {
        let policy = BatchPolicy { max_delay: Duration::from_millis(5), ..Default::default() };
        let mut s = state(policy, MAX);
        let t0 = Instant::now();
        let mut out = Vec::new();
        s.push(msg(None, 1), 0, t0, 1, &mut out).map_err(|(_, e)| e).expect("push");
        s.push(msg(None, 1), 1, t0 + Duration::from_millis(3), 1, &mut out).map_err(|(_, e)| e).expect("push");
        assert_eq!(s.deadline(), Some(t0 + Duration::from_millis(5)));
    }

    #[test]
    fn policy_limits_are_checked() {
        assert!(BatchPolicy::default().validate().is_ok());
        let e = BatchPolicy { max_messages: 0, ..Default::default() }.validate().expect_err("zero");
        assert!(e.to_string().contains("batching_max_messages"));
        assert!(BatchPolicy { max_bytes: 0, ..Default::default() }.validate().is_err());
    }
}
