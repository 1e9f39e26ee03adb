//! Identifiers shared by brokers and clients: where an entry sits in a topic, and which message
//! of a batch a message is.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An entry's place in a topic: its ledger and its id within the ledger. Entries of a topic are
/// ordered by (ledger, entry) because a topic's ledgers are created in increasing id order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    pub ledger_id: u64,
    pub entry_id: u64,
}

impl Position {
    pub const fn new(ledger_id: u64, entry_id: u64) -> Self {
        Position { ledger_id, entry_id }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ledger_id, self.entry_id)
    }
}

/// One message: the entry (batch) it was stored in and its index within the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId {
    pub position: Position,
    pub batch_index: u32,
}

impl MessageId {
    pub const fn new(ledger_id: u64, entry_id: u64, batch_index: u32) -> Self {
        MessageId { position: Position::new(ledger_id, entry_id), batch_index }
    }
}

/// `ledger:entry:index`, as `magnetar produce` prints it.
impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.position, self.batch_index)
    }
}

impl FromStr for MessageId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || format!("invalid message id {s:?}: expected LEDGER:ENTRY[:INDEX]");
        let num = |p: &str| p.parse::<u64>().map_err(|_| bad());
        match parts.as_slice() {
            [l, e] => Ok(MessageId::new(num(l)?, num(e)?, 0)),
            [l, e, i] => Ok(MessageId::new(num(l)?, num(e)?, i.parse::<u32>().map_err(|_| bad())?)),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_round_trips_through_text() {
        let id = MessageId::new(7, 42, 3);
        assert_eq!(id.to_string(), "7:42:3");
        assert_eq!("7:42:3".parse::<MessageId>(), Ok(id));
        assert_eq!("7:42".parse::<MessageId>(), Ok(MessageId::new(7, 42, 0)));
        assert!("7".parse::<MessageId>().is_err());
        assert!("a:b".parse::<MessageId>().is_err());
    }

    #[test]
    fn positions_order_by_ledger_then_entry() {
        assert!(Position::new(1, 99) < Position::new(2, 0));
        assert!(Position::new(2, 0) < Position::new(2, 1));
    }
}
