//! The client's one error type. Every variant says what failed and, where the caller can do
//! something about it, what to do.

use magnetar_common::wire::ErrorCode;

/// What went wrong in a client call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The caller passed something invalid (URL, topic name, limit, message id...). Fix the input.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The broker could not be reached.
    #[error("connect to broker: {0}")]
    Connect(String),
    /// TLS setup or the TLS handshake failed (untrusted certificate, unreadable PEM file...).
    #[error("{0}")]
    Tls(String),
    /// The broker refused a request; `code` tells whether retrying can help.
    #[error("broker refused: {message} ({code:?})")]
    Broker { code: ErrorCode, message: String },
    /// A message does not fit in one batch of at most the broker's `max_message_bytes`.
    /// `size` counts the payload plus its key, properties and the batch header.
    #[error(
        "message of {size} bytes (with key, properties and batch header) exceeds the broker's limit of {max} bytes"
    )]
    MessageTooLarge { size: usize, max: usize },
    /// An operation did not finish within its timeout; names the operation.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The producer, consumer or client was closed by the application, or stopped after an
    /// error it reported before; says why.
    #[error("closed: {0}")]
    Closed(String),
    /// The connection or stream to the broker broke (the broker restarted, moved the topic or
    /// became unreachable). Producers and consumers reconnect on their own: this reaches the
    /// caller only when reconnecting failed within the operation timeout.
    #[error("disconnected: {0}")]
    ConnectionLost(String),
    /// The broker sent something this client does not understand or did not expect.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl Error {
    /// Whether the same request may succeed later without changes (possibly on a new
    /// connection): connect failures, lost connections, timeouts, and the broker's retryable
    /// codes (service unavailable, persistence error, shutting down, not the owner).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect(_) | Error::ConnectionLost(_) | Error::Timeout(_) => true,
            Error::Broker { code, .. } => code.is_retryable(),
            Error::InvalidArgument(_)
            | Error::Tls(_)
            | Error::MessageTooLarge { .. }
            | Error::Closed(_)
            | Error::Protocol(_) => false,
        }
    }

    /// The error for a broker's `Error`/`SendError` frame.
    pub(crate) fn broker(code: ErrorCode, message: impl Into<String>) -> Self {
        Error::Broker { code, message: message.into() }
    }

    /// The same error with `context` in front of its message (kept as is for variants without
    /// one).
    pub(crate) fn context(self, context: impl std::fmt::Display) -> Self {
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{context}: {m}")),
            Error::Connect(m) => Error::Connect(format!("{context}: {m}")),
            Error::Tls(m) => Error::Tls(format!("{context}: {m}")),
            Error::Broker { code, message } => Error::Broker { code, message: format!("{context}: {message}") },
            Error::Closed(m) => Error::Closed(format!("{context}: {m}")),
            Error::ConnectionLost(m) => Error::ConnectionLost(format!("{context}: {m}")),
            Error::Protocol(m) => Error::Protocol(format!("{context}: {m}")),
            e @ (Error::MessageTooLarge { .. } | Error::Timeout(_)) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_problem() {
        let e = Error::broker(ErrorCode::TopicNotFound, "topic public/default/x does not exist");
        assert_eq!(e.to_string(), "broker refused: topic public/default/x does not exist (TopicNotFound)");
        let e = Error::MessageTooLarge { size: 6_000_000, max: 5_242_880 };
        assert!(e.to_string().contains("6000000 bytes"), "{e}");
        assert!(e.to_string().contains("5242880"), "{e}");
        assert_eq!(Error::Timeout("create producer").to_string(), "timed out: create producer");
    }

    #[test]
    fn retryable_follows_the_broker_code() {
        assert!(Error::broker(ErrorCode::ServiceUnavailable, "x").is_retryable());
        assert!(Error::broker(ErrorCode::PersistenceError, "x").is_retryable());
        assert!(!Error::broker(ErrorCode::BadRequest, "x").is_retryable());
        assert!(!Error::InvalidArgument("x".into()).is_retryable());
        assert!(Error::Timeout("x").is_retryable());
        assert!(!Error::Tls("x".into()).is_retryable());
        assert!(Error::broker(ErrorCode::NotOwner, "x").is_retryable());
        assert!(Error::ConnectionLost("x".into()).is_retryable());
        assert!(!Error::Closed("x".into()).is_retryable());
    }

    #[test]
    fn context_goes_in_front_and_keeps_the_code() {
        let e = Error::broker(ErrorCode::ServiceUnavailable, "no bookies").context("create producer on t");
        assert_eq!(e, Error::broker(ErrorCode::ServiceUnavailable, "create producer on t: no bookies"));
        assert_eq!(Error::Timeout("x").context("y"), Error::Timeout("x"));
    }
}
