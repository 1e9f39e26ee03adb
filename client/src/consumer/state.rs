//! The consumer's state machine: the queue of received messages, flow permits, grouped
//! acknowledgements and delayed redelivery of negatively acknowledged entries. No I/O and no
//! clock: the caller passes `now`, sends the frames it gets back, and calls [`ConsumerState::poll`]
//! at [`ConsumerState::next_deadline`].
//!
//! Flow control: the consumer grants `receiver_queue_size` permits after subscribing; once the
//! application has taken half that many messages since the last grant, it grants that many
//! again. Permits count messages, so a batch of n takes n; messages dropped without reaching the
//! application (already acknowledged, skipped by a reader, undecodable, cleared for redelivery)
//! count as taken, or the permits they used would be lost.
//!
//! Acknowledgements are grouped: completed entries are sent at most `ack_group_time` after the
//! first one, or at once when [`MAX_ACK_GROUP_POSITIONS`] have gathered, and on close.
//!
//! Reconnection ([`ConsumerState::disconnected`], [`ConsumerState::reconnected`]): the queue is
//! dropped, since the broker delivers every unacknowledged entry again to the new stream, and the
//! new stream gets the whole queue's permits. Entries the application has seen part of stay
//! tracked, so acknowledging their messages later still counts. Acknowledgements made while
//! disconnected wait and go out right after re-attaching; since a broker ignores acks of entries
//! it has not delivered to the subscription yet, those entries are also acknowledged again
//! instead of queued if they are delivered again. A reader resumes after the last message it
//! returned.
//!
//! Dead letters (with `max_redeliveries` set): an entry delivered with a redelivery count above
//! it is not queued; its unacknowledged messages wait in [`ConsumerState::take_dead_letters`] for
//! the consumer's dead-letter task, which publishes them and reports with
//! [`ConsumerState::dead_lettered`]. Only then is the entry acknowledged (on success) or asked
//! for again after the nack delay (on failure). Its permits count as taken only once it is
//! reported, so at most a receiver queue's worth of messages waits to be dead-lettered. An
//! entry delivered again while its dead-lettering is under way is skipped.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use magnetar_common::batch::{self, BatchError, BatchHeader};
use magnetar_common::ids::{MessageId, Position};
use magnetar_common::wire::{Frame, MAX_POSITIONS_PER_FRAME, SubscriptionType};
use tracing::error;

use super::acks::AckTracker;
use crate::{Error, ReceivedMessage};

/// Most completed entries gathered before an acknowledgement is sent regardless of time.
pub(crate) const MAX_ACK_GROUP_POSITIONS: usize = 1000;
/// Most entries remembered, after a reconnection, to acknowledge again if delivered again. One
/// beyond it is at worst delivered twice.
pub(crate) const MAX_REACK_POSITIONS: usize = 100_000;

/// What a consumer was configured with.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerConfig {
    pub subscription_type: SubscriptionType,
    pub receiver_queue_size: u32,
    pub nack_redelivery_delay: Duration,
    pub ack_group_time: Duration,
    /// A reader: acknowledges entries cumulatively itself once all their messages were returned.
    pub reader: bool,
    /// A reader starting at a message id skips the messages before it in its entry.
    pub skip_before: Option<MessageId>,
    /// Entries delivered with a redelivery count above this go to the dead-letter topic
    /// instead of the application (none: never).
    pub max_redeliveries: Option<u32>,
}

/// An entry to publish to the dead-letter topic: its messages not acknowledged yet.
#[derive(Debug)]
pub(crate) struct DeadLetter {
    pub position: Position,
    pub messages: Vec<ReceivedMessage>,
}

/// A decoded entry, or why it could not be decoded and how many messages its header claims.
pub(crate) type DecodedEntry = Result<(BatchHeader, Vec<batch::Message>), (u32, BatchError)>;

/// Decodes a delivered entry (done outside any lock: it may decompress).
pub(crate) fn decode_entry(payload: Bytes) -> DecodedEntry {
    let claimed = batch::read_header(&payload).map(|h| h.num_messages).unwrap_or(1);
    batch::decode(payload).map_err(|e| (claimed, e))
}

/// One consumer's client-side state.
#[derive(Debug)]
pub(crate) struct ConsumerState {
    cfg: ConsumerConfig,
    topic: Arc<str>,
    queue: VecDeque<ReceivedMessage>,
    /// Messages taken since the last permit grant.
    taken: u32,
    tracker: AckTracker,
    pending_acks: Vec<Position>,
    pending_cumulative: Option<Position>,
    ack_deadline: Option<Instant>,
    /// Negatively acknowledged entries and when to ask for their redelivery, in time order.
    nacks: VecDeque<(Instant, Position)>,
    active: bool,
    /// Why the consumer ended, once it has.
    end: Option<Error>,
    /// A stream is attached. While not, acknowledgements wait and nothing is sent.
    connected: bool,
    /// Entries acknowledged while disconnected (or not sent before): if delivered again, they
    /// are acknowledged again rather than queued.
    reack: BTreeSet<Position>,
    reack_cumulative: Option<Position>,
    /// A reader's last message returned to the application.
    last_returned: Option<MessageId>,
    /// Dead letters not yet taken by the dead-letter task.
    dead_letters: VecDeque<DeadLetter>,
    /// Entries being dead-lettered (waiting or taken), with the permits their delivery used
    /// (zeroed by a reconnection, which grants the whole queue again).
    dead_lettering: BTreeMap<Position, u32>,
}

impl ConsumerState {
    pub fn new(cfg: ConsumerConfig, topic: Arc<str>) -> Self {
        // Failover consumers learn whether they are active from the broker.
        let active = cfg.subscription_type != SubscriptionType::Failover;
        ConsumerState {
            cfg,
            topic,
            queue: VecDeque::new(),
            taken: 0,
            tracker: AckTracker::default(),
            pending_acks: Vec::new(),
            pending_cumulative: None,
            ack_deadline: None,
            nacks: VecDeque::new(),
            active,
            end: None,
            connected: true,
            reack: BTreeSet::new(),
            reack_cumulative: None,
            last_returned: None,
            dead_letters: VecDeque::new(),
            dead_lettering: BTreeMap::new(),
        }
    }

    /// The permits granted right after subscribing.
    pub fn initial_flow(&self) -> Frame {
        Frame::Flow { permits: self.cfg.receiver_queue_size }
    }

    fn flow_threshold(&self) -> u32 {
        (self.cfg.receiver_queue_size / 2).max(1)
    }

    fn take(&mut self, n: u32, out: &mut Vec<Frame>) {
        self.taken = self.taken.saturating_add(n);
        if self.taken >= self.flow_threshold() {
            out.push(Frame::Flow { permits: self.taken });
            self.taken = 0;
        }
    }

    /// An entry arrived: queues its messages that are still to be seen.
    pub fn on_message(
        &mut self,
        position: Position,
        redelivery_count: u32,
        entry: DecodedEntry,
        now: Instant,
        out: &mut Vec<Frame>,
    ) {
        let cumulative = self.reack_cumulative.filter(|c| position <= *c);
        if cumulative.is_some() || self.reack.remove(&position) {
            // Acknowledged before the reconnection: acknowledge it again now that the broker has
            // delivered it, instead of handing it to the application twice.
            if cumulative.is_some() {
                self.pending_cumulative = self.pending_cumulative.max(Some(position));
                if cumulative == Some(position) {
                    self.reack_cumulative = None;
                }
            } else {
                self.pending_acks.push(position);
            }
            let n = match &entry {
                Ok((_, messages)) => messages.len() as u32,
                Err((claimed, _)) => *claimed,
            };
            self.take(n, out);
            self.arm_acks(now, out);
            return;
        }
        let (header, messages) = match entry {
            Ok(decoded) => decoded,
            Err((claimed, e)) => {
                // Not acknowledged, so it stays in the subscription; its permits are returned.
                error!(topic = %self.topic, %position, error = %e, "dropping an undecodable entry");
                self.take(claimed, out);
                return;
            }
        };
        if let Some(max) = self.cfg.max_redeliveries
            && redelivery_count > max
        {
            self.dead_letter(position, redelivery_count, header, messages, out);
            return;
        }
        self.tracker.on_delivered(position, messages.len() as u32);
        let producer_name: Arc<str> = Arc::from(header.producer_name.as_str());
        let mut dropped = 0;
        for (i, m) in messages.into_iter().enumerate() {
            let id = MessageId { position, batch_index: i as u32 };
            if let Some(start) = self.cfg.skip_before
                && start.position == position
                && id.batch_index < start.batch_index
            {
                dropped += 1;
                self.reader_ack(&id, now, out);
                continue;
            }
            if !self.tracker.is_unacked(&id) {
                dropped += 1;
                continue;
            }
            self.queue.push_back(ReceivedMessage {
                id,
                topic: self.topic.clone(),
                key: m.key,
                properties: m.properties,
                event_time_ms: m.event_time_ms,
                publish_time_ms: header.publish_time_ms,
                producer_name: producer_name.clone(),
                sequence_id: header.sequence_id + i as u64,
                redelivery_count,
                payload: m.payload,
            });
        }
        if self.cfg.skip_before.is_some_and(|s| s.position == position) {
            self.cfg.skip_before = None;
        }
        if dropped > 0 {
            self.take(dropped, out);
        }
    }

    /// An entry past the maximum redelivery count: its unacknowledged messages wait for the
    /// dead-letter task instead of the application.
    fn dead_letter(
        &mut self,
        position: Position,
        redelivery_count: u32,
        header: BatchHeader,
        messages: Vec<batch::Message>,
        out: &mut Vec<Frame>,
    ) {
        let n = messages.len() as u32;
        if self.dead_lettering.contains_key(&position) {
            // Delivered again while its dead-lettering is under way (after a reconnection, an
            // ack timeout): that one decides.
            self.take(n, out);
            return;
        }
        self.tracker.on_delivered(position, n);
        let producer_name: Arc<str> = Arc::from(header.producer_name.as_str());
        let messages: Vec<ReceivedMessage> = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| ReceivedMessage {
                id: MessageId { position, batch_index: i as u32 },
                topic: self.topic.clone(),
                key: m.key,
                properties: m.properties,
                event_time_ms: m.event_time_ms,
                publish_time_ms: header.publish_time_ms,
                producer_name: producer_name.clone(),
                sequence_id: header.sequence_id + i as u64,
                redelivery_count,
                payload: m.payload,
            })
            .filter(|m| self.tracker.is_unacked(&m.id))
            .collect();
        if messages.is_empty() {
            self.take(n, out);
            return;
        }
        self.dead_lettering.insert(position, n);
        self.dead_letters.push_back(DeadLetter { position, messages });
    }

    /// Up to `max` entries for the dead-letter task to publish.
    pub fn take_dead_letters(&mut self, max: usize) -> Vec<DeadLetter> {
        let n = self.dead_letters.len().min(max);
        self.dead_letters.drain(..n).collect()
    }

    /// The dead-letter task is done with `position`: once `published` (durably stored on the
    /// dead-letter topic) the entry is acknowledged; otherwise it is asked for again after the
    /// nack delay, so that it is dead-lettered again later.
    pub fn dead_lettered(&mut self, position: Position, published: bool, now: Instant, out: &mut Vec<Frame>) {
        let Some(permits) = self.dead_lettering.remove(&position) else { return };
        if self.end.is_some() {
            return;
        }
        self.take(permits, out);
        if published {
            // Every message of the entry not acknowledged before is on the dead-letter topic.
            self.tracker.forget(&position);
            self.pending_acks.push(position);
            self.arm_acks(now, out);
        } else if self.tracker.forget(&position) && self.connected {
            if self.cfg.nack_redelivery_delay.is_zero() {
                out.push(Frame::Redeliver { positions: vec![position] });
            } else {
                self.nacks.push_back((now + self.cfg.nack_redelivery_delay, position));
            }
        }
    }

    /// The next message for the application: `None` to wait, an error once the stream has
    /// ended and the queue is empty.
    pub fn receive(&mut self, now: Instant, out: &mut Vec<Frame>) -> Option<Result<ReceivedMessage, Error>> {
        let Some(m) = self.queue.pop_front() else { return self.end.clone().map(Err) };
        self.take(1, out);
        if self.cfg.reader {
            self.last_returned = Some(m.id);
            self.reader_ack(&m.id, now, out);
        } else {
            self.tracker.mark_handed(&m.id.position);
        }
        Some(Ok(m))
    }

    /// A reader acknowledges each message it returns (or skips); a complete entry is
    /// acknowledged cumulatively.
    fn reader_ack(&mut self, id: &MessageId, now: Instant, out: &mut Vec<Frame>) {
        if let Ok(true) = self.tracker.ack(id) {
            self.pending_cumulative = self.pending_cumulative.max(Some(id.position));
            self.arm_acks(now, out);
        }
    }

    /// Acknowledges one message.
    pub fn ack(&mut self, id: &MessageId, now: Instant, out: &mut Vec<Frame>) -> Result<(), Error> {
        self.check_open()?;
        if self.tracker.ack(id)? {
            self.pending_acks.push(id.position);
            self.arm_acks(now, out);
        }
        Ok(())
    }

    /// Acknowledges every message up to and including `id` (exclusive and failover only).
    pub fn ack_cumulative(&mut self, id: &MessageId, now: Instant, out: &mut Vec<Frame>) -> Result<(), Error> {
        self.check_open()?;
        match self.cfg.subscription_type {
            SubscriptionType::Exclusive | SubscriptionType::Failover => {}
            t => {
                return Err(Error::InvalidArgument(format!(
                    "ack_cumulative is not allowed on a {t} subscription (only exclusive and failover); use ack"
                )));
            }
        }
        if let Some(p) = self.tracker.ack_cumulative(id)? {
            self.pending_cumulative = self.pending_cumulative.max(Some(p));
            self.nacks.retain(|(_, n)| *n > p);
            self.arm_acks(now, out);
        }
        Ok(())
    }

    /// Negatively acknowledges the entry of `id`: all its messages are delivered again after
    /// the redelivery delay. Its messages still queued are dropped (they will come again).
    pub fn nack(&mut self, id: &MessageId, now: Instant, out: &mut Vec<Frame>) -> Result<(), Error> {
        self.check_open()?;
        if !self.tracker.forget(&id.position) {
            return Ok(());
        }
        let before = self.queue.len();
        self.queue.retain(|m| m.id.position != id.position);
        let dropped = (before - self.queue.len()) as u32;
        if dropped > 0 {
            self.take(dropped, out);
        }
        if !self.connected {
            // The new stream gets every unacknowledged entry anyway.
            return Ok(());
        }
        if self.cfg.nack_redelivery_delay.is_zero() {
            out.push(Frame::Redeliver { positions: vec![id.position] });
        } else {
            self.nacks.push_back((now + self.cfg.nack_redelivery_delay, id.position));
        }
        Ok(())
    }

    /// Asks the broker to redeliver every unacknowledged message of this consumer. Pending
    /// acknowledgements go first; queued messages are dropped (they come again).
    pub fn redeliver_unacknowledged(&mut self, out: &mut Vec<Frame>) -> Result<(), Error> {
        self.check_open()?;
        self.flush_acks(out);
        let dropped = self.queue.len() as u32;
        self.queue.clear();
        self.tracker.clear();
        self.nacks.clear();
        out.push(Frame::Redeliver { positions: Vec::new() });
        if dropped > 0 {
            self.take(dropped, out);
        }
        Ok(())
    }

    fn check_open(&self) -> Result<(), Error> {
        match &self.end {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn arm_acks(&mut self, now: Instant, out: &mut Vec<Frame>) {
        if !self.connected {
            return;
        }
        if self.pending_acks.len() >= MAX_ACK_GROUP_POSITIONS || self.cfg.ack_group_time.is_zero() {
            self.flush_acks(out);
        } else if self.ack_deadline.is_none() {
            self.ack_deadline = Some(now + self.cfg.ack_group_time);
        }
    }

    /// Sends the gathered acknowledgements: the cumulative one first, then the entries it does
    /// not cover.
    pub fn flush_acks(&mut self, out: &mut Vec<Frame>) {
        self.ack_deadline = None;
        if !self.connected {
            return;
        }
        if let Some(p) = self.pending_cumulative.take() {
            out.push(Frame::Ack { cumulative: true, positions: vec![p] });
            self.pending_acks.retain(|q| *q > p);
        }
        if self.pending_acks.is_empty() {
            return;
        }
        let mut positions = std::mem::take(&mut self.pending_acks);
        positions.sort_unstable();
        positions.dedup();
        for chunk in positions.chunks(MAX_POSITIONS_PER_FRAME) {
            out.push(Frame::Ack { cumulative: false, positions: chunk.to_vec() });
        }
    }

    /// When [`ConsumerState::poll`] has something to do next.
    pub fn next_deadline(&self) -> Option<Instant> {
        let nack = self.nacks.front().map(|(t, _)| *t);
        match (self.ack_deadline, nack) {
            (Some(a), Some(n)) => Some(a.min(n)),
            (a, n) => a.or(n),
        }
    }

    /// Sends grouped acknowledgements and redelivery requests that are due.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Frame>) {
        if self.ack_deadline.is_some_and(|d| d <= now) {
            self.flush_acks(out);
        }
        let mut due = Vec::new();
        while let Some((t, p)) = self.nacks.front().copied() {
            if t > now {
                break;
            }
            self.nacks.pop_front();
            due.push(p);
        }
        for chunk in due.chunks(MAX_POSITIONS_PER_FRAME) {
            out.push(Frame::Redeliver { positions: chunk.to_vec() });
        }
    }

    /// The broker says whether this (failover) consumer is the active one.
    pub fn set_active(&mut self, active: bool) {
        self.active = active;
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The stream has ended: queued messages can still be received, then `error` is returned.
    pub fn end(&mut self, error: Error) {
        self.end.get_or_insert(error);
    }

    /// Whether the stream has ended or the consumer was closed.
    pub fn has_ended(&self) -> bool {
        self.end.is_some()
    }

    /// The stream is gone. Queued messages are dropped: the broker delivers every unacknowledged
    /// entry again to the next stream. Acknowledgements made from now on wait for it.
    pub fn disconnected(&mut self) {
        self.connected = false;
        self.queue.clear();
        self.taken = 0;
        self.nacks.clear();
        self.ack_deadline = None;
        // The next stream gets the whole queue's permits.
        self.dead_lettering.values_mut().for_each(|p| *p = 0);
        self.active = self.cfg.subscription_type != SubscriptionType::Failover;
        if self.cfg.reader {
            // The next stream is a new non-durable subscription, starting at the entry of the
            // last message returned: nothing of the old one needs acknowledging.
            self.tracker.clear();
            self.pending_acks.clear();
            self.pending_cumulative = None;
            if let Some(last) = self.last_returned {
                let next = MessageId { position: last.position, batch_index: last.batch_index.saturating_add(1) };
                self.cfg.skip_before = Some(next);
            }
        } else {
            self.tracker.retain_handed();
        }
    }

    /// Where a reader's next stream starts: the entry of the last message it returned (the
    /// messages up to that one are skipped), if any.
    pub fn resume_position(&self) -> Option<Position> {
        self.last_returned.map(|m| m.position)
    }

    /// Attached again: grants the whole queue and sends the acknowledgements that waited,
    /// remembering them in case their entries are delivered again.
    pub fn reconnected(&mut self, out: &mut Vec<Frame>) {
        self.connected = true;
        out.push(self.initial_flow());
        self.reack = self.pending_acks.iter().copied().take(MAX_REACK_POSITIONS).collect();
        self.reack_cumulative = self.pending_cumulative;
        self.flush_acks(out);
    }

    /// Closing: sends what is gathered and refuses everything after.
    pub fn close(&mut self, out: &mut Vec<Frame>) {
        self.flush_acks(out);
        self.nacks.clear();
        self.dead_letters.clear();
        self.end.get_or_insert(Error::Closed("the consumer is closed".into()));
    }
}

#[cfg(test)]
mod tests {
    use magnetar_common::batch::{BatchBuilder, Compression};

    use super::*;

    fn cfg(t: SubscriptionType) -> ConsumerConfig {
        ConsumerConfig {
            subscription_type: t,
            receiver_queue_size: 10,
            nack_redelivery_delay: Duration::from_secs(1),
            ack_group_time: Duration::from_millis(10),
            reader: false,
            skip_before: None,
            max_redeliveries: None,
        }
    }

    fn entry(n: u32, first_seq: u64) -> DecodedEntry {
        let mut b = BatchBuilder::new();
        for i in 0..n {
            b.push(&batch::Message { payload: Bytes::from(format!("m{i}")), ..Default::default() }).expect("push");
        }
        decode_entry(b.finish(Compression::None, "prod", first_seq, 77))
    }

    fn state(t: SubscriptionType) -> ConsumerState {
        ConsumerState::new(cfg(t), Arc::from("persistent://public/default/t"))
    }

    fn deliver(s: &mut ConsumerState, entry_id: u64, n: u32, now: Instant, out: &mut Vec<Frame>) {
        s.on_message(Position::new(1, entry_id), 0, entry(n, entry_id * 100), now, out);
    }

    fn receive_all(s: &mut ConsumerState, now: Instant, out: &mut Vec<Frame>) -> Vec<ReceivedMessage> {
        std::iter::from_fn(|| s.receive(now, out).map(|r| r.expect("message"))).collect()
    }

    #[test]
    fn messages_carry_their_batch_fields() {
        let mut s = state(SubscriptionType::Exclusive);
        let (now, mut out) = (Instant::now(), Vec::new());
        s.on_message(Position::new(3, 4), 2, entry(2, 10), now, &mut out);
        let got = receive_all(&mut s, now, &mut out);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].id, MessageId::new(3, 4, 1));
        assert_eq!(got[1].sequence_id, 11);
        assert_eq!(got[1].redelivery_count, 2);
        assert_eq!(got[1].publish_time_ms, 77);
        assert_eq!(&*got[1].producer_name, "prod");
        assert_eq!(&*got[1].topic, "persistent://public/default/t");
        assert_eq!(got[1].payload, Bytes::from_static(b"m1"));
    }

    #[test]
    fn permits_are_granted_again_after_half_the_queue() {
        let mut s = state(SubscriptionType::Shared);
        assert_eq!(s.initial_flow(), Frame::Flow { permits: 10 });
        let (now, mut out) = (Instant::now(), Vec::new());
        deliver(&mut s, 0, 3, now, &mut out);
        deliver(&mut s, 1, 4, now, &mut out);
        assert!(out.is_empty(), "delivery alone grants nothing");
        for _ in 0..4 {
            s.receive(now, &mut out).expect("queued").expect("message");
        }
        assert!(out.is_empty(), "4 of 10 taken: below half");
        s.receive(now, &mut out).expect("queued").expect("message");
        assert_eq!(out, vec![Frame::Flow { permits: 5 }]);
        out.clear();
        receive_all(&mut s, now, &mut out);
        assert!(out.is_empty(), "2 more taken: below half");
        assert!(s.receive(now, &mut out).is_none(), "empty queue: wait");
    }

    #[test]
    fn individual_acks_are_grouped_per_entry() {
        let mut s = state(SubscriptionType::Shared);
        let (t0, mut out) = (Instant::now(), Vec::new());
        deliver(&mut s, 0, 2, t0, &mut out);
        deliver(&mut s, 1, 1, t0, &mut out);
        let got = receive_all(&mut s, t0, &mut out);
        out.clear();
        s.ack(&got[0].id, t0, &mut out).expect("ack");
        assert_eq!(s.next_deadline(), None, "half an entry: nothing to send");
        s.ack(&got[2].id, t0, &mut out).expect("ack");
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_millis(10)));
        s.ack(&got[1].id, t0 + Duration::from_millis(2), &mut out).expect("ack");
        assert!(out.is_empty(), "grouped until the deadline");
        s.poll(t0 + Duration::from_millis(9), &mut out);
        assert!(out.is_empty());
        s.poll(t0 + Duration::from_millis(10), &mut out);
        assert_eq!(
            out,
            vec![Frame::Ack { cumulative: false, positions: vec![Position::new(1, 0), Position::new(1, 1)] }]
        );
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn a_full_group_is_sent_at_once() {
        let mut s = state(SubscriptionType::Shared);
        let (now, mut out) = (Instant::now(), Vec::new());
        for e in 0..MAX_ACK_GROUP_POSITIONS as u64 {
            deliver(&mut s, e, 1, now, &mut out);
            let m = s.receive(now, &mut out).expect("queued").expect("message");
            s.ack(&m.id, now, &mut out).expect("ack");
        }
        let acks: Vec<_> = out.iter().filter(|f| matches!(f, Frame::Ack { .. })).collect();
        assert_eq!(acks.len(), 1);
        let Frame::Ack { positions, .. } = acks[0] else { panic!("ack") };
        assert_eq!(positions.len(), MAX_ACK_GROUP_POSITIONS);
    }

    #[test]
    fn cumulative_acks_follow_the_subscription_type() {
        let mut s = state(SubscriptionType::KeyShared);
        let (now, mut out) = (Instant::now(), Vec::new());
        deliver(&mut s, 0, 1, now, &mut out);
        let m = s.receive(now, &mut out).expect("queued").expect("message");
        let err = s.ack_cumulative(&m.id, now, &mut out).expect_err("key_shared");
        assert!(err.to_string().contains("key_shared subscription"), "{err}");

        let mut s = state(SubscriptionType::Failover);
        out.clear();
        for e in 0..3 {
            deliver(&mut s, e, 2, now, &mut out);
        }
        let got = receive_all(&mut s, now, &mut out);
        out.clear();
        s.ack(&got[5].id, now, &mut out).expect("ack"); // entry 2, index 1: not complete alone
        s.ack_cumulative(&got[3].id, now, &mut out).expect("cumulative"); // entry 1, complete
        s.flush_acks(&mut out);
        assert_eq!(out, vec![Frame::Ack { cumulative: true, positions: vec![Position::new(1, 1)] }]);
        out.clear();
        s.ack(&got[4].id, now, &mut out).expect("ack"); // completes entry 2
        s.flush_acks(&mut out);
        assert_eq!(out, vec![Frame::Ack { cumulative: false, positions: vec![Position::new(1, 2)] }]);
    }

    #[test]
    fn cumulative_ack_inside_a_batch_sends_the_previous_entry() {
        let mut s = state(SubscriptionType::Exclusive);
        let (now, mut out) = (Instant::now(), Vec::new());
        deliver(&mut s, 0, 2, now, &mut out);
        deliver(&mut s, 1, 3, now, &mut out);
        let got = receive_all(&mut s, now, &mut out);
        out.clear();
        s.ack_cumulative(&got[3].id, now, &mut out).expect("cumulative"); // entry 1, index 1 of 3
        s.flush_acks(&mut out);
        assert_eq!(out, vec![Frame::Ack { cumulative: true, positions: vec![Position::new(1, 0)] }]);
    }

    #[test]
    fn nack_redelivers_the_entry_after_the_delay_and_drops_its_queued_messages() {
        let mut s = state(SubscriptionType::Shared);
        let (t0, mut out) = (Instant::now(), Vec::new());
        deliver(&mut s, 0, 3, t0, &mut out);
        deliver(&mut s, 1, 1, t0, &mut out);
        let first = s.receive(t0, &mut out).expect("queued").expect("message");
        s.nack(&first.id, t0, &mut out).expect("nack");
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(1)));
        let rest = receive_all(&mut s, t0, &mut out);
        assert_eq!(rest.iter().map(|m| m.id).collect::<Vec<_>>(), vec![MessageId::new(1, 1, 0)]);
        // Acks of the nacked entry's other messages do nothing: it will come again.
        s.ack(&MessageId::new(1, 0, 1), t0, &mut out).expect("ack");
        s.ack(&MessageId::new(1, 0, 2), t0, &mut out).expect("ack");
        s.flush_acks(&mut out);
        assert!(!out.iter().any(|f| matches!(f, Frame::Ack { .. })), "{out:?}");
        out.clear();
        s.poll(t0 + Duration::from_millis(999), &mut out);
        assert!(out.is_empty());
        s.poll(t0 + Duration::from_secs(1), &mut out);
        assert_eq!(out, vec![Frame::Redeliver { positions: vec![Position::new(1, 0)] }]);
        // It comes again, whole.
        out.clear();
        s.on_message(Position::new(1, 0), 1, entry(3, 0), t0, &mut out);
        let again = receive_all(&mut s, t0, &mut out);
        assert_eq!(again.len(), 3);
        assert!(again.iter().all(|m| m.redelivery_count == 1));
    }

    #[test]
    fn dropped_messages_still_count_as_taken_permits() {
        let mut s = state(SubscriptionType::Shared);
        let (now, mut out) = (Instant::now(), Vec::new());
        deliver(&mut s, 0, 6, now, &mut out);
        let m = s.receive(now, &mut out).expect("queued").expect("message");
        s.nack(&m.id, now, &mut out).expect("nack");
        // 1 received + 5 dropped = 6 >= 5.
        assert_eq!(out, vec![Frame::Flow { permits: 6 }]);
        out.clear();
        s.on_message(Position::new(1, 9), 0, Err((7, BatchError::Malformed("x"))), now, &mut out);
        assert_eq!(out, vec![Frame::Flow { permits: 7 }]);
    }

    #[test]
    fn redeliver_unacknowledged_sends_acks_first_and_clears_the_queue() {
        let mut s = state(SubscriptionType::Shared);
        let (now, mut out) = (Instant::now(), Vec::new());
        deliver(&mut s, 0, 1, now, &mut out);
        deliver(&mut s, 1, 1, now, &mut out);
        deliver(&mut s, 2, 1, now, &mut out);
        let m = s.receive(now, &mut out).expect("queued").expect("message");
        s.ack(&m.id, now, &mut out).expect("ack");
        s.redeliver_unacknowledged(&mut out).expect("redeliver");
        assert_eq!(
            out,
            vec![
                Frame::Ack { cumulative: false, positions: vec![Position::new(1, 0)] },
                Frame::Redeliver { positions: vec![] },
            ]
        );
        assert!(s.receive(now, &mut out).is_none(), "queue cleared");
        out.clear();
        deliver(&mut s, 3, 2, now, &mut out);
        receive_all(&mut s, now, &mut out);
        // 1 received + 2 cleared + 2 received = 5.
        assert_eq!(out, vec![Frame::Flow { permits: 5 }]);
    }

    #[test]
    fn already_acked_messages_of_a_redelivered_entry_are_not_delivered_again() {
        let mut s = state(SubscriptionType::Shared);
        let (now, mut out) = (Instant::now(), Vec::new());
        deliver(&mut s, 0, 3, now, &mut out);
        let got = receive_all(&mut s, now, &mut out);
        s.ack(&got[1].id, now, &mut out).expect("ack");
        deliver(&mut s, 0, 3, now, &mut out);
        let again = receive_all(&mut s, now, &mut out);
        assert_eq!(again.iter().map(|m| m.id.batch_index).collect::<Vec<_>>(), vec![0, 2]);
    }

    #[test]
    fn a_reader_skips_to_its_start_and_acks_cumulatively() {
        let mut c = cfg(SubscriptionType::Exclusive);
        c.reader = true;
        c.skip_before = Some(MessageId::new(1, 5, 2));
        let mut s = ConsumerState::new(c, Arc::from("t"));
        let (t0, mut out) = (Instant::now(), Vec::new());
        deliver(&mut s, 5, 4, t0, &mut out);
        deliver(&mut s, 6, 2, t0, &mut out);
        let got = receive_all(&mut s, t0, &mut out);
        assert_eq!(
            got.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![MessageId::new(1, 5, 2), MessageId::new(1, 5, 3), MessageId::new(1, 6, 0), MessageId::new(1, 6, 1)]
        );
        assert_eq!(out, vec![Frame::Flow { permits: 5 }], "2 skipped + 3 returned reach half the queue");
        out.clear();
        s.poll(t0 + Duration::from_millis(10), &mut out);
        assert_eq!(out, vec![Frame::Ack { cumulative: true, positions: vec![Position::new(1, 6)] }]);
        // Later arrivals of the start entry's position are not filtered again.
        out.clear();
        deliver(&mut s, 5, 4, t0, &mut out);
        assert_eq!(receive_all(&mut s, t0, &mut out).len(), 4);
    }

    #[test]
    fn after_the_end_queued_messages_come_first_then_the_error() {
        let mut s = state(SubscriptionType::Exclusive);
        let (now, mut out) = (Instant::now(), Vec::new());
        deliver(&mut s, 0, 1, now, &mut out);
        s.end(Error::Closed("the broker closed the consumer".into()));
        assert!(s.receive(now, &mut out).expect("queued").is_ok());
        let err = s.receive(now, &mut out).expect("ended").expect_err("end");
        assert_eq!(err, Error::Closed("the broker closed the consumer".into()));
        assert!(s.ack(&MessageId::new(1, 0, 0), now, &mut out).is_err());
    }

    #[test]
    fn failover_consumers_start_inactive() {
        let mut s = state(SubscriptionType::Failover);
        assert!(!s.is_active());
        s.set_active(true);
        assert!(s.is_active());
        assert!(state(SubscriptionType::Exclusive).is_active());
    }

    #[test]
    fn close_flushes_acks_and_refuses_more() {
        let mut s = state(SubscriptionType::Shared);
        let (now, mut out) = (Instant::now(), Vec::new());
        deliver(&mut s, 0, 1, now, &mut out);
        let m = s.receive(now, &mut out).expect("queued").expect("message");
        s.ack(&m.id, now, &mut out).expect("ack");
        s.close(&mut out);
        assert_eq!(out, vec![Frame::Ack { cumulative: false, positions: vec![Position::new(1, 0)] }]);
        assert!(matches!(s.ack(&m.id, now, &mut out), Err(Error::Closed(_))));
    }

    fn dlq_state(max: u32) -> ConsumerState {
        let mut c = cfg(SubscriptionType::Shared);
        c.max_redeliveries = Some(max);
        ConsumerState::new(c, Arc::from("persistent://public/default/t"))
    }

    #[test]
    fn entries_delivered_too_often_wait_for_the_dead_letter_task() {
        let mut s = dlq_state(2);
        let (now, mut out) = (Instant::now(), Vec::new());
        // Redelivery counts 0..=2 reach the application: max_redeliveries + 1 deliveries.
        for count in 0..=2 {
            s.on_message(Position::new(1, 0), count, entry(1, 0), now, &mut out);
            let m = s.receive(now, &mut out).expect("queued").expect("message");
            assert_eq!(m.redelivery_count, count);
            s.nack(&m.id, now, &mut out).expect("nack");
        }
        assert!(s.take_dead_letters(10).is_empty());
        out.clear();
        s.on_message(Position::new(1, 0), 3, entry(1, 0), now, &mut out);
        assert!(s.receive(now, &mut out).is_none(), "not handed to the application");
        let letters = s.take_dead_letters(10);
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].position, Position::new(1, 0));
        assert_eq!(letters[0].messages[0].payload, Bytes::from_static(b"m0"));
        assert_eq!(letters[0].messages[0].redelivery_count, 3);
        // Delivered again meanwhile: skipped.
        s.on_message(Position::new(1, 0), 4, entry(1, 0), now, &mut out);
        assert!(s.receive(now, &mut out).is_none());
        assert!(s.take_dead_letters(10).is_empty());
        s.flush_acks(&mut out);
        assert!(!out.iter().any(|f| matches!(f, Frame::Ack { .. })), "no ack before it is published: {out:?}");
        s.dead_lettered(Position::new(1, 0), true, now, &mut out);
        s.flush_acks(&mut out);
        assert!(out.contains(&Frame::Ack { cumulative: false, positions: vec![Position::new(1, 0)] }), "{out:?}");
    }

    #[test]
    fn only_unacknowledged_messages_of_a_batch_are_dead_lettered() {
        let mut s = dlq_state(1);
        let (now, mut out) = (Instant::now(), Vec::new());
        s.on_message(Position::new(1, 0), 0, entry(3, 0), now, &mut out);
        let got = receive_all(&mut s, now, &mut out);
        s.ack(&got[0].id, now, &mut out).expect("ack");
        s.ack(&got[2].id, now, &mut out).expect("ack");
        // The ack timeout redelivers the entry twice.
        s.on_message(Position::new(1, 0), 1, entry(3, 0), now, &mut out);
        let again = receive_all(&mut s, now, &mut out);
        assert_eq!(again.iter().map(|m| m.id.batch_index).collect::<Vec<_>>(), vec![1]);
        s.on_message(Position::new(1, 0), 2, entry(3, 0), now, &mut out);
        let letters = s.take_dead_letters(10);
        assert_eq!(letters[0].messages.iter().map(|m| m.id.batch_index).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn a_failed_dead_letter_is_asked_for_again_and_its_permits_return() {
        let mut s = dlq_state(1);
        let (t0, mut out) = (Instant::now(), Vec::new());
        for e in 0..3 {
            s.on_message(Position::new(1, e), 5, entry(2, e * 10), t0, &mut out);
        }
        assert!(out.is_empty(), "permits are held while dead-lettering");
        assert_eq!(s.take_dead_letters(2).len(), 2, "bounded by the caller");
        assert_eq!(s.take_dead_letters(2).len(), 1);
        s.dead_lettered(Position::new(1, 0), false, t0, &mut out);
        s.dead_lettered(Position::new(1, 1), true, t0, &mut out);
        s.dead_lettered(Position::new(1, 2), true, t0, &mut out);
        assert!(out.contains(&Frame::Flow { permits: 6 }), "{out:?}");
        out.clear();
        s.poll(t0 + Duration::from_secs(1), &mut out);
        assert_eq!(
            out,
            vec![
                Frame::Ack { cumulative: false, positions: vec![Position::new(1, 1), Position::new(1, 2)] },
                Frame::Redeliver { positions: vec![Position::new(1, 0)] },
            ]
        );
    }

    #[test]
    fn a_dead_letter_finished_while_disconnected_is_acked_after_reconnecting() {
        let mut s = dlq_state(1);
        let (now, mut out) = (Instant::now(), Vec::new());
        s.on_message(Position::new(1, 0), 2, entry(1, 0), now, &mut out);
        assert_eq!(s.take_dead_letters(10).len(), 1);
        s.disconnected();
        s.dead_lettered(Position::new(1, 0), true, now, &mut out);
        assert!(out.is_empty(), "{out:?}");
        s.reconnected(&mut out);
        assert_eq!(
            out,
            vec![Frame::Flow { permits: 10 }, Frame::Ack { cumulative: false, positions: vec![Position::new(1, 0)] }]
        );
        // The broker delivers it again before it sees the ack: acknowledged again, not queued.
        out.clear();
        s.on_message(Position::new(1, 0), 3, entry(1, 0), now, &mut out);
        assert!(s.take_dead_letters(10).is_empty());
        s.flush_acks(&mut out);
        assert_eq!(out, vec![Frame::Ack { cumulative: false, positions: vec![Position::new(1, 0)] }]);
    }
}
