//! The Magnetar client library: producers, consumers and readers for applications.
//!
//! A [`Client`] holds one QUIC connection to a broker. Each [`Producer`], [`Consumer`] and
//! [`Reader`] opens its own stream on it, so a slow consumer never holds up another one. TLS is
//! required: pass the broker's certificate (a standalone broker writes its self-signed one to
//! `data/tls/cert.pem`) with [`ClientBuilder::tls_trust_cert`].
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
//! Not yet: reconnecting after a lost connection (every pending operation then fails with
//! [`Error::Closed`]), send timeouts, and platform trust roots.
//!
//! Layout: `transport` is the only module that touches QUIC and TLS; `producer::batcher` and
//! `consumer::state` are the state machines, which do no I/O and read no clock.

mod client;
mod consumer;
mod error;
mod message;
mod producer;
mod reader;
mod transport;
mod url;

pub use client::{Client, ClientBuilder, DEFAULT_CONNECT_TIMEOUT, DEFAULT_OPERATION_TIMEOUT};
pub use consumer::{Consumer, ConsumerBuilder, MAX_RECEIVER_QUEUE_SIZE};
pub use error::Error;
pub use magnetar_common::batch::Compression;
pub use magnetar_common::ids::{MessageId, Position};
pub use magnetar_common::wire::{ErrorCode, InitialPosition, SubscriptionType};
pub use message::{OutgoingMessage, ReceivedMessage};
pub use producer::{Producer, ProducerBuilder, SendReceipt};
pub use reader::{Reader, ReaderBuilder, StartPosition};
pub use transport::{ALPN, MAX_FRAME_BYTES};
pub use url::DEFAULT_PORT;
