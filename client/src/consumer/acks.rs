//! Acknowledgement tracking. The broker acknowledges whole entries (batches), so the client
//! remembers, per delivered entry, which of its messages the application has not acknowledged,
//! and acknowledges the entry once none is left.
//!
//! An entry is tracked from its delivery until it is complete, negatively acknowledged, or
//! dropped by `clear` (redeliver everything) or, if the application has seen none of its
//! messages, by `retain_handed` (reconnection). Acknowledging a message of an untracked entry is
//! a no-op: the entry was already acknowledged, or it will be delivered again.

use std::collections::BTreeMap;

use magnetar_common::ids::{MessageId, Position};

use crate::Error;

/// One delivered entry's unacknowledged messages.
#[derive(Debug)]
struct Entry {
    num_messages: u32,
    /// Bit i set: message i is not acknowledged.
    unacked: Vec<u64>,
    remaining: u32,
    /// The highest position delivered before this entry first arrived, if lower than it.
    prev_delivered: Option<Position>,
    /// Some message of it was returned to the application.
    handed: bool,
}

impl Entry {
    fn new(num_messages: u32, prev_delivered: Option<Position>) -> Self {
        let words = (num_messages as usize).div_ceil(64);
        let mut unacked = vec![u64::MAX; words];
        if let Some(last) = unacked.last_mut()
            && !num_messages.is_multiple_of(64)
        {
            *last = (1u64 << (num_messages % 64)) - 1;
        }
        Entry { num_messages, unacked, remaining: num_messages, prev_delivered, handed: false }
    }
    fn is_unacked(&self, i: u32) -> bool {
        i < self.num_messages && self.unacked[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    fn clear(&mut self, i: u32) {
        if self.is_unacked(i) {
            self.unacked[(i / 64) as usize] &= !(1 << (i % 64));
            self.remaining -= 1;
        }
    }
}

/// Per-entry acknowledgement state of one consumer.
#[derive(Debug, Default)]
pub(crate) struct AckTracker {
    entries: BTreeMap<Position, Entry>,
    highest_delivered: Option<Position>,
}

impl AckTracker {
    /// Records that `position`, holding `num_messages` messages, was delivered. An entry that is
    /// delivered again keeps what was already acknowledged of it.
    pub fn on_delivered(&mut self, position: Position, num_messages: u32) {
        if self.entries.get(&position).is_some_and(|e| e.num_messages == num_messages) {
            return;
        }
        let prev = match self.highest_delivered {
            Some(h) if h < position => Some(h),
            _ => self.entries.range(..position).next_back().map(|(p, _)| *p),
        };
        self.entries.insert(position, Entry::new(num_messages, prev));
        self.highest_delivered = self.highest_delivered.max(Some(position));
    }

    /// Whether `id` was delivered and is not acknowledged yet.
    pub fn is_unacked(&self, id: &MessageId) -> bool {
        self.entries.get(&id.position).is_some_and(|e| e.is_unacked(id.batch_index))
    }

    /// Acknowledges one message: true if this completed its entry (which is then forgotten).
    pub fn ack(&mut self, id: &MessageId) -> Result<bool, Error> {
        let Some(e) = self.entries.get_mut(&id.position) else { return Ok(false) };
        check_index(id, e)?;
        e.clear(id.batch_index);
        if e.remaining > 0 {
            return Ok(false);
        }
        self.entries.remove(&id.position);
        Ok(true)
    }

    /// Acknowledges every message up to and including `id`: entries before its entry are
    /// complete, and so are the messages of its entry up to its index. Returns the position to
    /// acknowledge cumulatively: `id`'s entry if it is now complete (or untracked), else the
    /// highest position delivered before it, if any.
    pub fn ack_cumulative(&mut self, id: &MessageId) -> Result<Option<Position>, Error> {
        if let Some(e) = self.entries.get(&id.position) {
            check_index(id, e)?;
        }
        let before = self.entries.range(..id.position).next_back().map(|(p, _)| *p);
        self.entries = self.entries.split_off(&id.position);
        let Some(e) = self.entries.get_mut(&id.position) else { return Ok(Some(id.position)) };
        for i in 0..=id.batch_index {
            e.clear(i);
        }
        if e.remaining == 0 {
            self.entries.remove(&id.position);
            return Ok(Some(id.position));
        }
        Ok(before.max(e.prev_delivered))
    }

    /// Forgets an entry that will be delivered again; true if it was tracked.
    pub fn forget(&mut self, position: &Position) -> bool {
        self.entries.remove(position).is_some()
    }

    /// Forgets every entry (all are to be delivered again).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Notes that a message of the entry at `position` was returned to the application.
    pub fn mark_handed(&mut self, position: &Position) {
        if let Some(e) = self.entries.get_mut(position) {
            e.handed = true;
        }
    }

    /// Forgets the entries the application has seen nothing of (they are delivered again from
    /// scratch); keeps the others, so that acknowledging their messages still counts.
    pub fn retain_handed(&mut self) {
        self.entries.retain(|_, e| e.handed);
    }

    /// How many entries are tracked.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

fn check_index(id: &MessageId, e: &Entry) -> Result<(), Error> {
    if id.batch_index >= e.num_messages {
        return Err(Error::InvalidArgument(format!(
            "message id {id} has batch index {}, but entry {} holds {} messages",
            id.batch_index, id.position, e.num_messages
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(entry: u64, index: u32) -> MessageId {
        MessageId::new(1, entry, index)
    }

    #[test]
    fn an_entry_is_complete_when_all_its_messages_are_acked() {
        let mut t = AckTracker::default();
        t.on_delivered(Position::new(1, 0), 3);
        t.on_delivered(Position::new(1, 1), 1);
        assert_eq!(t.ack(&id(0, 1)), Ok(false));
        assert_eq!(t.ack(&id(0, 1)), Ok(false), "acking twice changes nothing");
        assert_eq!(t.ack(&id(0, 0)), Ok(false));
        assert_eq!(t.ack(&id(1, 0)), Ok(true), "a single-message entry completes at once");
        assert_eq!(t.ack(&id(0, 2)), Ok(true));
        assert_eq!(t.len(), 0);
        assert_eq!(t.ack(&id(0, 2)), Ok(false), "untracked: already acknowledged");
    }

    #[test]
    fn indices_past_the_batch_are_refused() {
        let mut t = AckTracker::default();
        t.on_delivered(Position::new(1, 0), 2);
        let err = t.ack(&id(0, 2)).expect_err("index 2 of 2");
        assert!(err.to_string().contains("holds 2 messages"), "{err}");
        assert!(t.ack_cumulative(&id(0, 5)).is_err());
    }

    #[test]
    fn large_batches_use_every_bit() {
        let mut t = AckTracker::default();
        t.on_delivered(Position::new(1, 0), 130);
        for i in 0..129 {
            assert_eq!(t.ack(&id(0, i)), Ok(false), "index {i}");
        }
        assert!(t.is_unacked(&id(0, 129)));
        assert!(!t.is_unacked(&id(0, 130)));
        assert_eq!(t.ack(&id(0, 129)), Ok(true));
    }

    #[test]
    fn cumulative_ack_of_a_whole_entry() {
        let mut t = AckTracker::default();
        for e in 0..4 {
            t.on_delivered(Position::new(1, e), 2);
        }
        assert_eq!(t.ack_cumulative(&id(2, 1)), Ok(Some(Position::new(1, 2))));
        assert_eq!(t.len(), 1, "only entry 3 is left");
        assert!(t.is_unacked(&id(3, 0)));
    }

    #[test]
    fn cumulative_ack_inside_a_batch_acks_up_to_the_previous_entry() {
        let mut t = AckTracker::default();
        for e in 0..3 {
            t.on_delivered(Position::new(1, e), 3);
        }
        // Index 1 of entry 2: entries 0 and 1 are done, entry 2 is not.
        assert_eq!(t.ack_cumulative(&id(2, 1)), Ok(Some(Position::new(1, 1))));
        assert!(!t.is_unacked(&id(2, 0)));
        assert!(!t.is_unacked(&id(2, 1)));
        assert!(t.is_unacked(&id(2, 2)));
        // Entries 0 and 1 are forgotten now, but the position to send is still the highest
        // delivered before entry 2.
        assert_eq!(t.ack_cumulative(&id(2, 1)), Ok(Some(Position::new(1, 1))));
        // The last message completes it.
        assert_eq!(t.ack(&id(2, 2)), Ok(true));
    }

    #[test]
    fn cumulative_ack_inside_the_first_batch_has_nothing_to_send() {
        let mut t = AckTracker::default();
        t.on_delivered(Position::new(1, 0), 3);
        assert_eq!(t.ack_cumulative(&id(0, 0)), Ok(None));
        assert_eq!(t.ack_cumulative(&id(0, 2)), Ok(Some(Position::new(1, 0))));
    }

    #[test]
    fn cumulative_ack_of_an_untracked_id_sends_it() {
        let mut t = AckTracker::default();
        assert_eq!(t.ack_cumulative(&id(7, 0)), Ok(Some(Position::new(1, 7))));
    }

    #[test]
    fn redelivery_keeps_what_was_acked_and_forget_drops_it() {
        let mut t = AckTracker::default();
        t.on_delivered(Position::new(1, 0), 3);
        t.ack(&id(0, 0)).expect("ack");
        t.on_delivered(Position::new(1, 0), 3);
        assert!(!t.is_unacked(&id(0, 0)), "still acked after redelivery");
        assert!(t.forget(&Position::new(1, 0)));
        assert!(!t.forget(&Position::new(1, 0)));
        t.on_delivered(Position::new(1, 0), 3);
        assert!(t.is_unacked(&id(0, 0)), "a forgotten entry starts over");
        t.clear();
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn retain_handed_keeps_the_entries_the_application_saw() {
        let mut t = AckTracker::default();
        t.on_delivered(Position::new(1, 0), 2);
        t.on_delivered(Position::new(1, 1), 2);
        t.mark_handed(&Position::new(1, 0));
        t.ack(&id(0, 0)).expect("ack");
        t.retain_handed();
        assert_eq!(t.len(), 1);
        assert!(!t.is_unacked(&id(1, 0)), "never seen: forgotten");
        // Delivered again after a reconnection: what was acknowledged stays acknowledged.
        t.on_delivered(Position::new(1, 0), 2);
        assert!(!t.is_unacked(&id(0, 0)));
        assert_eq!(t.ack(&id(0, 1)), Ok(true));
    }
}
