//! Errors of the bookie's storage and service layers, and their wire statuses.

use magnetar_common::bookie_proto::{ErrorReply, Status};

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("{0}")]
    NotFound(String),
    #[error("ledger {0} is fenced: adds from its previous writer are refused")]
    Fenced(u64),
    #[error("bookie is read-only: {0}")]
    ReadOnly(String),
    #[error("bookie overloaded: the write cache stayed full for {wait_ms} ms; retry later")]
    Overloaded { wait_ms: u64 },
    #[error("entry of {len} bytes exceeds max_entry_bytes ({max})")]
    TooLarge { len: usize, max: usize },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("corruption detected: {0}")]
    Corrupt(String),
    #[error("storage I/O error: {0}")]
    Io(String),
    #[error("bookie is shutting down")]
    ShuttingDown,
}

impl StorageError {
    pub fn status(&self) -> Status {
        match self {
            StorageError::NotFound(_) => Status::NotFound,
            StorageError::Fenced(_) => Status::Fenced,
            StorageError::ReadOnly(_) => Status::ReadOnly,
            StorageError::Overloaded { .. } => Status::Overloaded,
            StorageError::TooLarge { .. } => Status::TooLarge,
            StorageError::BadRequest(_) => Status::BadRequest,
            StorageError::Corrupt(_) => Status::Corrupt,
            StorageError::Io(_) => Status::Internal,
            StorageError::ShuttingDown => Status::ShuttingDown,
        }
    }

    pub fn to_reply(&self) -> ErrorReply {
        ErrorReply { status: self.status(), message: self.to_string() }
    }
}

impl From<crate::index::IndexError> for StorageError {
    fn from(e: crate::index::IndexError) -> Self {
        StorageError::Io(e.to_string())
    }
}

impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> Self {
        StorageError::Io(e.to_string())
    }
}
