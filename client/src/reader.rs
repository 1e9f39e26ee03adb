//! [`Reader`]: reads a topic from a chosen position without a durable subscription.
//!
//! A reader is a consumer of a non-durable exclusive subscription named `reader-<random hex>`:
//! the broker keeps no cursor for it after it closes. It acknowledges entries cumulatively
//! itself, once it has returned all of their messages, so the broker can let go of them.
//! After a reconnection it subscribes again from the message after the last one it returned
//! (or from its start position, if it returned none).

use magnetar_common::ids::MessageId;
use magnetar_common::wire::InitialPosition;

use crate::client::random_hex;
use crate::{Client, Consumer, ConsumerBuilder, Error, ReceivedMessage};

/// Where a reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartPosition {
    /// The oldest message still stored.
    Earliest,
    /// Messages published after the reader is created.
    #[default]
    Latest,
    /// This message (inclusive) and everything after it.
    MessageId(MessageId),
}

/// Configures a [`Reader`]; see [`Client::reader`].
#[derive(Debug)]
pub struct ReaderBuilder {
    client: Client,
    topic: String,
    start: StartPosition,
    receiver_queue_size: u32,
}

impl ReaderBuilder {
    pub(crate) fn new(client: Client, topic: String) -> Self {
        ReaderBuilder { client, topic, start: StartPosition::Latest, receiver_queue_size: 1000 }
    }

    /// Where to start (default [`StartPosition::Latest`]).
    pub fn start_message_id(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// How many messages the broker may send ahead of [`Reader::next`] (default 1000).
    pub fn receiver_queue_size(mut self, size: u32) -> Self {
        self.receiver_queue_size = size;
        self
    }

    /// Opens the reader.
    pub async fn create(self) -> Result<Reader, Error> {
        let (initial, start) = match self.start {
            StartPosition::Earliest => (InitialPosition::Earliest, None),
            StartPosition::Latest => (InitialPosition::Latest, None),
            StartPosition::MessageId(id) => (InitialPosition::Earliest, Some(id)),
        };
        let consumer = ConsumerBuilder::new(self.client, self.topic, format!("reader-{}", random_hex()))
            .initial_position(initial)
            .receiver_queue_size(self.receiver_queue_size)
            .into_reader(start)
            .subscribe()
            .await?;
        Ok(Reader { consumer })
    }
}

/// Reads a topic in order from its start position.
#[derive(Debug)]
pub struct Reader {
    consumer: Consumer,
}

impl Reader {
    /// The next message. Errors once the stream has ended and every received message was
    /// returned. Cancel-safe.
    pub async fn next(&self) -> Result<ReceivedMessage, Error> {
        self.consumer.receive().await
    }

    /// Closes the reader; its subscription goes away with it.
    pub async fn close(self) -> Result<(), Error> {
        self.consumer.close().await
    }

    /// The full topic name.
    pub fn topic(&self) -> &str {
        self.consumer.topic()
    }

    /// How many times the reader has subscribed again after losing its stream.
    pub fn reconnects(&self) -> u64 {
        self.consumer.reconnects()
    }
}
