//! The messages applications send and receive.

use std::sync::Arc;

use bytes::Bytes;
use magnetar_common::batch;
use magnetar_common::ids::MessageId;

/// A message to publish. Build one from bytes or text, then add a key or properties:
///
/// ```
/// use magnetar_client::OutgoingMessage;
/// let m = OutgoingMessage::from("hello").with_key("user-42").with_property("source", "docs");
/// assert_eq!(m.key.as_deref(), Some(&b"user-42"[..]));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutgoingMessage {
    pub payload: Bytes,
    /// Routing key: key_shared subscriptions send all messages of a key to one consumer, and a
    /// producer never mixes keys in one batch.
    pub key: Option<Bytes>,
    pub properties: Vec<(String, String)>,
    /// Application time of the event, in milliseconds since the Unix epoch.
    pub event_time_ms: Option<u64>,
}

impl OutgoingMessage {
    pub fn new(payload: impl Into<Bytes>) -> Self {
        OutgoingMessage { payload: payload.into(), ..Default::default() }
    }
    /// Sets the routing key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }
    /// Adds a property.
    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.push((name.into(), value.into()));
        self
    }
    /// Sets the event time (milliseconds since the Unix epoch).
    pub fn with_event_time_ms(mut self, event_time_ms: u64) -> Self {
        self.event_time_ms = Some(event_time_ms);
        self
    }

    pub(crate) fn into_batch_message(self) -> batch::Message {
        batch::Message {
            key: self.key,
            properties: self.properties,
            event_time_ms: self.event_time_ms,
            payload: self.payload,
        }
    }
}

impl From<Bytes> for OutgoingMessage {
    fn from(payload: Bytes) -> Self {
        OutgoingMessage::new(payload)
    }
}

impl From<Vec<u8>> for OutgoingMessage {
    fn from(payload: Vec<u8>) -> Self {
        OutgoingMessage::new(payload)
    }
}

impl From<&str> for OutgoingMessage {
    fn from(payload: &str) -> Self {
        OutgoingMessage::new(Bytes::copy_from_slice(payload.as_bytes()))
    }
}

impl From<String> for OutgoingMessage {
    fn from(payload: String) -> Self {
        OutgoingMessage::new(payload)
    }
}

/// A message delivered to a consumer or reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// Where it is stored: acknowledge it by this id.
    pub id: MessageId,
    /// Full topic name (`persistent://tenant/namespace/topic`).
    pub topic: Arc<str>,
    pub key: Option<Bytes>,
    pub properties: Vec<(String, String)>,
    pub event_time_ms: Option<u64>,
    /// When the producer sent its batch (producer's clock), in milliseconds since the Unix epoch.
    pub publish_time_ms: u64,
    pub producer_name: Arc<str>,
    /// The producer's sequence number of this message: its batch's sequence id plus its index.
    pub sequence_id: u64,
    /// How many times this message was delivered before (0 on first delivery).
    pub redelivery_count: u32,
    pub payload: Bytes,
}

impl ReceivedMessage {
    /// The property `name`, if set.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}
