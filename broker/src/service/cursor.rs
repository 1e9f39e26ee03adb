//! A subscription's cursor: which entries are acknowledged. Everything before `acked_before`
//! (the mark-delete position plus one) is acknowledged, and so is every position in `acked`
//! (individual acknowledgements beyond it). Pure state; the subscription persists it.

use std::collections::BTreeSet;

use magnetar_common::ids::Position;
use serde::{Deserialize, Serialize};

/// A cursor as stored in the metadata store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCursor {
    pub acked_before: Position,
    /// Individually acknowledged runs beyond `acked_before`: `[ledger, first entry, last entry]`.
    pub acked_ranges: Vec<[u64; 3]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    acked_before: Position,
    acked: BTreeSet<Position>,
}

impl Cursor {
    /// A cursor with nothing acknowledged at or after `start`.
    pub fn new(start: Position) -> Self {
        Self { acked_before: start, acked: BTreeSet::new() }
    }

    /// First position not covered by the mark-delete position.
    pub fn acked_before(&self) -> Position {
        self.acked_before
    }

    /// Individually acknowledged positions beyond the mark-delete position.
    pub fn individually_acked(&self) -> usize {
        self.acked.len()
    }

    pub fn is_acked(&self, p: Position) -> bool {
        p < self.acked_before || self.acked.contains(&p)
    }

    /// Acknowledges one entry. `normalize` maps a position to the first stored (or future)
    /// position at or after it, so the mark-delete position moves over ledger boundaries.
    pub fn ack(&mut self, p: Position, normalize: impl Fn(Position) -> Position) {
        if p < self.acked_before {
            return;
        }
        self.acked.insert(p);
        self.advance(normalize);
    }

    /// Acknowledges every entry up to and including `p`.
    pub fn ack_cumulative(&mut self, p: Position, normalize: impl Fn(Position) -> Position) {
        let after = Position::new(p.ledger_id, p.entry_id.saturating_add(1));
        if after > self.acked_before {
            self.acked_before = after;
            self.acked = self.acked.split_off(&after);
        }
        self.advance(normalize);
    }

    fn advance(&mut self, normalize: impl Fn(Position) -> Position) {
        loop {
            let n = normalize(self.acked_before).max(self.acked_before);
            self.acked_before = n;
            if self.acked.first() == Some(&n) {
                self.acked.pop_first();
                self.acked_before = Position::new(n.ledger_id, n.entry_id.saturating_add(1));
            } else {
                break;
            }
        }
        // Positions that vanished below the mark (for example in dropped empty ledgers).
        while self.acked.first().is_some_and(|p| *p < self.acked_before) {
            self.acked.pop_first();
        }
    }

    /// The stored form, keeping at most `max_ranges` runs (the oldest; later individual
    /// acknowledgements are then redelivered after a restart).
    pub fn to_stored(&self, max_ranges: usize) -> StoredCursor {
        let mut ranges: Vec<[u64; 3]> = Vec::new();
        for p in &self.acked {
            match ranges.last_mut() {
                Some(r) if r[0] == p.ledger_id && r[2] + 1 == p.entry_id => r[2] = p.entry_id,
                _ => {
                    if ranges.len() == max_ranges {
                        break;
                    }
                    ranges.push([p.ledger_id, p.entry_id, p.entry_id]);
                }
            }
        }
        StoredCursor { acked_before: self.acked_before, acked_ranges: ranges }
    }

    pub fn from_stored(s: &StoredCursor) -> Self {
        let mut acked = BTreeSet::new();
        for [l, first, last] in &s.acked_ranges {
            // Bounded by what `to_stored` wrote; a corrupt huge range is cut at a million.
            for e in *first..=(*last).min(first.saturating_add(1_000_000)) {
                let p = Position::new(*l, e);
                if p >= s.acked_before {
                    acked.insert(p);
                }
            }
        }
        Self { acked_before: s.acked_before, acked }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ledger 1 holds entries 0..=4, ledger 3 holds 0..=9 (ledger 2 was empty and dropped).
    fn normalize(p: Position) -> Position {
        match p.ledger_id {
            0 => Position::new(1, 0),
            1 if p.entry_id <= 4 => p,
            1 | 2 => Position::new(3, 0),
            _ => p.min(Position::new(3, 10)),
        }
    }

    #[test]
    fn individual_acks_move_the_mark_when_contiguous() {
        let mut c = Cursor::new(Position::new(0, 0));
        c.ack(Position::new(1, 1), normalize);
        assert_eq!(c.acked_before(), Position::new(1, 0));
        assert!(c.is_acked(Position::new(1, 1)));
        assert!(!c.is_acked(Position::new(1, 0)));
        c.ack(Position::new(1, 0), normalize);
        assert_eq!(c.acked_before(), Position::new(1, 2));
        assert_eq!(c.individually_acked(), 0);
        for e in 2..=4 {
            c.ack(Position::new(1, e), normalize);
        }
        // Over the ledger boundary and the dropped empty ledger.
        assert_eq!(c.acked_before(), Position::new(3, 0));
        c.ack(Position::new(3, 0), normalize);
        assert_eq!(c.acked_before(), Position::new(3, 1));
    }

    #[test]
    fn cumulative_ack_covers_everything_before() {
        let mut c = Cursor::new(Position::new(1, 0));
        c.ack(Position::new(3, 5), normalize);
        c.ack(Position::new(3, 3), normalize);
        c.ack_cumulative(Position::new(1, 4), normalize);
        assert_eq!(c.acked_before(), Position::new(3, 0));
        c.ack_cumulative(Position::new(3, 3), normalize);
        assert_eq!(c.acked_before(), Position::new(3, 4));
        assert!(c.is_acked(Position::new(3, 5)));
        c.ack(Position::new(3, 4), normalize);
        assert_eq!(c.acked_before(), Position::new(3, 6));
        // An older cumulative ack changes nothing.
        c.ack_cumulative(Position::new(1, 2), normalize);
        assert_eq!(c.acked_before(), Position::new(3, 6));
    }

    #[test]
    fn stored_form_round_trips_and_is_bounded() {
        let mut c = Cursor::new(Position::new(3, 0));
        for e in [2, 3, 4, 6, 8, 9] {
            c.ack(Position::new(3, e), normalize);
        }
        let s = c.to_stored(100);
        assert_eq!(s.acked_ranges, vec![[3, 2, 4], [3, 6, 6], [3, 8, 9]]);
        assert_eq!(Cursor::from_stored(&s), c);
        let bounded = c.to_stored(2);
        assert_eq!(bounded.acked_ranges, vec![[3, 2, 4], [3, 6, 6]]);
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(serde_json::from_str::<StoredCursor>(&json).expect("parse"), s);
    }
}
