//! Errors of the object-store layer: retryable (the store is down, slow or failing) or fatal (the
//! object is missing or corrupt, the store refuses us, or the caller asked for something invalid).

/// An object-store operation failed. Every message names the object key.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    /// The store could not be reached, timed out, or kept failing (5xx, 503 SlowDown, I/O error)
    /// after object_store's own retries. Retrying later may succeed.
    #[error("object store unavailable: {op} {key}: {source}")]
    Unavailable {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    /// The object does not exist (never written, or deleted).
    #[error("object {key} not found ({op})")]
    NotFound { op: &'static str, key: String },
    /// The object's bytes are not what was written: never returned as data.
    #[error("segment {key} of ledger {ledger_id} is corrupt{}: {reason}", entry.map(|e| format!(" at entry {e}")).unwrap_or_default())]
    Corrupt { key: String, ledger_id: u64, entry: Option<u64>, reason: String },
    /// The store refused the request for good: permission denied, bad credentials, an unsupported
    /// operation or an invalid path. Fix the configuration.
    #[error("object store refused {op} {key}: {source}")]
    Refused {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    /// The caller's request is invalid (entries out of order, a range outside the segment,
    /// a configuration value out of bounds).
    #[error("{0}")]
    Invalid(String),
}

impl OffloadError {
    /// Whether the same operation may succeed later (the store is down or overloaded).
    pub fn is_retryable(&self) -> bool {
        matches!(self, OffloadError::Unavailable { .. })
    }

    /// Classifies an object_store error from operation `op` on `key`.
    pub(crate) fn from_store(op: &'static str, key: &str, source: object_store::Error) -> OffloadError {
        use object_store::Error as E;
        let key = key.to_owned();
        match source {
            E::NotFound { .. } => OffloadError::NotFound { op, key },
            // Transport errors, timeouts and HTTP 5xx after retries all arrive as Generic; so do
            // local I/O errors (a full disk can clear). A failed join is a runtime shutting down.
            E::Generic { .. } | E::JoinError { .. } => OffloadError::Unavailable { op, key, source },
            _ => OffloadError::Refused { op, key, source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_and_messages() {
        let generic = object_store::Error::Generic { store: "S3", source: "connection refused".into() };
        let e = OffloadError::from_store("get", "p/ledgers/1/x.seg", generic);
        assert!(e.is_retryable());
        assert!(e.to_string().contains("p/ledgers/1/x.seg"), "{e}");

        let missing = object_store::Error::NotFound { path: "x".into(), source: "404".into() };
        let e = OffloadError::from_store("get", "p/ledgers/1/x.seg", missing);
        assert!(!e.is_retryable());
        assert_eq!(e.to_string(), "object p/ledgers/1/x.seg not found (get)");

        let denied = object_store::Error::PermissionDenied { path: "x".into(), source: "403".into() };
        assert!(!OffloadError::from_store("put", "k", denied).is_retryable());

        let corrupt = OffloadError::Corrupt { key: "k".into(), ledger_id: 3, entry: Some(9), reason: "bad crc".into() };
        assert_eq!(corrupt.to_string(), "segment k of ledger 3 is corrupt at entry 9: bad crc");
        assert!(!corrupt.is_retryable());
    }
}
