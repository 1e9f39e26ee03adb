//! The Magnetar client library: producers, consumers and readers for applications.
//!
//! A [`Client`] is built from a service URL listing one or more bootstrap brokers
//! (`quic://host:6650` or `quic://host1:6650,host2:6650`). Creating a [`Producer`], [`Consumer`]
//! or [`Reader`] first asks a bootstrap broker which broker owns the topic (a lookup), then
//! opens a stream on that broker. The client keeps at most one QUIC connection per broker, and
//! each producer, consumer and reader has its own stream, so a slow consumer never holds up
//! another one. TLS is required: pass the brokers' certificate (a standalone broker writes its
//! self-signed one to `data/tls/cert.pem`) with [`ClientBuilder::tls_trust_cert`].
//!
//! ```no_run
//! use magnetar_client::{Client, SubscriptionType};
//!
//! # async fn run() -> Result<(), magnetar_client::Error> {
//! let client = Client::builder("quic://127.0.0.1:6650").tls_trust_cert("data/tls/cert.pem").build().await?;
//!
//! let producer = client.producer("my-topic").create().await?;
//! let id = producer.send("hello").await?; // waits until the broker has stored it
//! println!("stored as {id}");
//! // High throughput: queue many, then collect the receipts.
//! let mut receipts = Vec::new();
//! for i in 0..1000 {
//!     receipts.push(producer.send_async(format!("message {i}")).await?);
//! }
//! for r in receipts {
//!     r.await?;
//! }
//! producer.close().await?;
//!
//! let consumer = client.subscribe("my-topic", "my-subscription")
//!     .subscription_type(SubscriptionType::Shared)
//!     .subscribe()
//!     .await?;
//! let message = consumer.receive().await?;
//! println!("{}: {:?}", message.id, message.payload);
//! consumer.ack(&message.id)?;
//! consumer.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Delivery is at least once: a message can come again after a reconnect, a negative
//! acknowledgement or [`Consumer::redeliver_unacknowledged`]. Producers batch messages (see
//! [`ProducerBuilder::batching`]); a batch only holds messages with the same key, because
//! key_shared subscriptions route whole batches by key. The broker acknowledges whole batches,
//! so a consumer acknowledges a batch on the broker once it has acknowledged all of its messages.
//!
//! Reconnection is automatic. When a broker dies, restarts or hands a topic to another broker,
//! producers and consumers look the topic up again and attach to its owner, retrying with
//! backoff for up to the operation timeout ([`ClientBuilder::operation_timeout`]). A producer
//! then sends again, in order, every batch that has no receipt yet, before any newer one:
//! receipts resolve once, per-producer order holds, and a batch may be stored twice. A consumer
//! subscribes again and continues from the subscription's stored cursor; a reader continues
//! after the last message it returned. Pending calls wait meanwhile and fail only if
//! reconnecting fails, with [`Error::ConnectionLost`] or the broker's last refusal. A broker
//! that dies without closing its connections is noticed after
//! [`ClientBuilder::connection_idle_timeout`]. `docs/protocol.md` has the details.
//! Reconnections are logged at INFO and counted ([`Producer::reconnects`],
//! [`Consumer::reconnects`]).
//!
//! Dead-letter topics are handled here, in the client, like Pulsar's: with a
//! [`DeadLetterPolicy`] ([`ConsumerBuilder::dead_letter_policy`]) a message is handed to the
//! application at most `max_redeliveries + 1` times; on its next delivery the consumer publishes
//! it to the dead-letter topic (`<topic>-<subscription>-DLQ` by default) with
//! [`PROPERTY_REAL_TOPIC`], [`PROPERTY_ORIGIN_SUBSCRIPTION`] and [`PROPERTY_ORIGIN_MESSAGE_ID`]
//! added, and acknowledges it only once the broker has stored it there.
//!
//! Not yet: send timeouts and platform trust roots.
//!
//! Layout: `transport` is the only module that touches QUIC and TLS; `pool` holds the
//! connections, one per broker; `lookup` finds a topic's broker and attaches to it, with retries;
//! `producer::batcher` and `consumer::state` are the state machines, which do no I/O and read no
//! clock.

mod client;
mod consumer;
mod error;
mod lookup;
mod message;
mod pool;
mod producer;
mod reader;
mod transport;
mod url;

pub use client::{
    Client, ClientBuilder, DEFAULT_CONNECT_TIMEOUT, DEFAULT_CONNECTION_IDLE_TIMEOUT, DEFAULT_OPERATION_TIMEOUT,
};
pub use consumer::{
    Consumer, ConsumerBuilder, DeadLetterPolicy, MAX_DEAD_LETTER_ENTRIES_IN_FLIGHT, MAX_RECEIVER_QUEUE_SIZE,
    PROPERTY_ORIGIN_MESSAGE_ID, PROPERTY_ORIGIN_SUBSCRIPTION, PROPERTY_REAL_TOPIC,
};
pub use error::Error;
pub use magnetar_common::batch::Compression;
pub use magnetar_common::ids::{MessageId, Position};
pub use magnetar_common::wire::{ErrorCode, InitialPosition, SubscriptionType};
pub use message::{OutgoingMessage, ReceivedMessage};
pub use producer::{Producer, ProducerBuilder, SendReceipt};
pub use reader::{Reader, ReaderBuilder, StartPosition};
pub use transport::{ALPN, MAX_FRAME_BYTES};
pub use url::DEFAULT_PORT;
