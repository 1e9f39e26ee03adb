//! [`Consumer`]: receives a subscription's messages on its own stream.
//!
//! The consumer's state ([`state::ConsumerState`]: queue, permits, acknowledgements, nack
//! timers) sits behind a mutex shared by the handle and one task. The task reads the stream,
//! decodes entries (outside the lock) and queues their messages, and sends grouped
//! acknowledgements and redelivery requests when they are due. Handle calls change the state and
//! queue the frames it returns, under the lock, so frames leave in the order of the changes.
//!
//! Reconnection: when the stream or its connection ends abnormally (connection lost, the broker
//! ended the stream, an `Error` with a retryable code such as `NotOwner`), the task looks the
//! topic up again and subscribes again with the same subscription, name and type; a durable
//! subscription continues from its stored cursor, a reader from the message after the last one
//! it returned. See [`state`] for what happens to queued messages, permits and acknowledgements.
//! If it cannot attach within the operation timeout, the consumer ends with the last cause.
//!
//! Dead letters: with a [`DeadLetterPolicy`], entries delivered too often go to a second task
//! ([`dead_letter`]) that publishes them to the dead-letter topic and then acknowledges them.
//!
//! Must never: wait for the broker while holding the lock, or lose a permit (every delivered
//! message is eventually counted as taken).

mod acks;
pub(crate) mod dead_letter;
pub(crate) mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use magnetar_common::ids::{MessageId, Position};
use magnetar_common::topic::validate_subscription_name;
use magnetar_common::wire::{Frame, InitialPosition, PROTOCOL_VERSION, SubscribeRequest, SubscriptionType};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use self::dead_letter::DeadLetterTask;
pub use self::dead_letter::{
    DeadLetterPolicy, MAX_DEAD_LETTER_ENTRIES_IN_FLIGHT, PROPERTY_ORIGIN_MESSAGE_ID, PROPERTY_ORIGIN_SUBSCRIPTION,
    PROPERTY_REAL_TOPIC,
};
use self::state::{ConsumerConfig, ConsumerState, decode_entry};
use crate::client::{Channel, check_short_string, check_topic, random_hex, writer_stopped};
use crate::lookup::{self, AttachSpec, BACKOFF_MAX, Backoff};
use crate::transport::Outbox;
use crate::{Client, Error, ReceivedMessage};

/// Largest receiver queue a consumer may ask for.
pub const MAX_RECEIVER_QUEUE_SIZE: u32 = 1_000_000;

/// Configures a [`Consumer`]; see [`Client::subscribe`].
#[derive(Debug)]
pub struct ConsumerBuilder {
    client: Client,
    topic: String,
    subscription: String,
    subscription_type: SubscriptionType,
    initial_position: InitialPosition,
    consumer_name: Option<String>,
    priority: i32,
    receiver_queue_size: u32,
    nack_redelivery_delay: Duration,
    ack_group_time: Duration,
    ack_timeout: Duration,
    dead_letter: Option<DeadLetterPolicy>,
    // Set by readers only.
    durable: bool,
    start: Option<Position>,
    reader: bool,
    skip_before: Option<MessageId>,
}

impl ConsumerBuilder {
    pub(crate) fn new(client: Client, topic: String, subscription: String) -> Self {
        ConsumerBuilder {
            client,
            topic,
            subscription,
            subscription_type: SubscriptionType::Exclusive,
            initial_position: InitialPosition::Latest,
            consumer_name: None,
            priority: 0,
            receiver_queue_size: 1000,
            nack_redelivery_delay: Duration::from_secs(1),
            ack_group_time: Duration::from_millis(10),
            ack_timeout: Duration::ZERO,
            dead_letter: None,
            durable: true,
            start: None,
            reader: false,
            skip_before: None,
        }
    }

    /// How the subscription's consumers share messages (default exclusive).
    pub fn subscription_type(mut self, t: SubscriptionType) -> Self {
        self.subscription_type = t;
        self
    }

    /// Where a subscription that does not exist yet starts (default latest).
    pub fn initial_position(mut self, p: InitialPosition) -> Self {
        self.initial_position = p;
        self
    }

    /// The consumer's name (default `consumer-` and random hex).
    pub fn consumer_name(mut self, name: impl Into<String>) -> Self {
        self.consumer_name = Some(name.into());
        self
    }

    /// Failover priority: lower is preferred as the active consumer (default 0).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// How many messages the broker may send ahead of the application (default 1000).
    pub fn receiver_queue_size(mut self, size: u32) -> Self {
        self.receiver_queue_size = size;
        self
    }

    /// How long after [`Consumer::nack`] the entry is redelivered (default 1 s).
    pub fn nack_redelivery_delay(mut self, delay: Duration) -> Self {
        self.nack_redelivery_delay = delay;
        self
    }

    /// Longest an acknowledgement waits to be sent with others (default 10 ms; zero sends each
    /// at once).
    pub fn ack_group_time(mut self, time: Duration) -> Self {
        self.ack_group_time = time;
        self
    }

    /// Messages not acknowledged this long after delivery are redelivered, to this or another
    /// consumer of the subscription (default zero: never). At most about 49 days.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Sends messages delivered more than `policy.max_redeliveries` times again to a
    /// dead-letter topic instead of the application, then acknowledges them (default: none).
    /// A message thus reaches the application at most `max_redeliveries + 1` times. Done by the
    /// client, like Pulsar's `DeadLetterPolicy`: see [`DeadLetterPolicy`].
    pub fn dead_letter_policy(mut self, policy: DeadLetterPolicy) -> Self {
        self.dead_letter = Some(policy);
        self
    }

    pub(crate) fn into_reader(mut self, start: Option<MessageId>) -> Self {
        self.durable = false;
        self.reader = true;
        self.subscription_type = SubscriptionType::Exclusive;
        self.start = start.map(|id| id.position);
        self.skip_before = start.filter(|id| id.batch_index > 0);
        self.dead_letter = None;
        self
    }

    /// Looks the topic up and attaches the consumer to the subscription on the broker that owns
    /// it (creating the subscription if needed), retrying what can pass (see
    /// [`crate::ClientBuilder::operation_timeout`]).
    pub async fn subscribe(self) -> Result<Consumer, Error> {
        check_topic(&self.topic)?;
        validate_subscription_name(&self.subscription)
            .map_err(|e| Error::InvalidArgument(format!("invalid subscription name {:?}: {e}", self.subscription)))?;
        if let Some(name) = &self.consumer_name {
            check_short_string("consumer name", name)?;
        }
        if self.receiver_queue_size == 0 || self.receiver_queue_size > MAX_RECEIVER_QUEUE_SIZE {
            return Err(Error::InvalidArgument(format!(
                "receiver_queue_size is {}; it must be between 1 and {MAX_RECEIVER_QUEUE_SIZE}",
                self.receiver_queue_size
            )));
        }
        let ack_timeout_ms = u32::try_from(self.ack_timeout.as_millis()).map_err(|_| {
            Error::InvalidArgument(format!(
                "ack_timeout {:?} is above the maximum of {} ms",
                self.ack_timeout,
                u32::MAX
            ))
        })?;
        let dead_letter_topic =
            self.dead_letter.as_ref().map(|p| p.resolve(&self.topic, &self.subscription)).transpose()?;
        let consumer_name = self.consumer_name.clone().unwrap_or_else(|| format!("consumer-{}", random_hex()));
        let request = SubscribeRequest {
            protocol_version: PROTOCOL_VERSION,
            topic: self.topic.clone(),
            subscription: self.subscription.clone(),
            subscription_type: self.subscription_type,
            initial_position: self.initial_position,
            consumer_name: consumer_name.clone(),
            priority: self.priority,
            durable: self.durable,
            start: self.start,
            ack_timeout_ms,
        };
        let spec = AttachSpec {
            topic: self.topic.clone(),
            request: Frame::Subscribe(request.clone()),
            what: "subscribe",
            reconnect: false,
        };
        let attached = lookup::attach(&self.client, &spec, Instant::now() + self.client.operation_timeout()).await?;
        let topic = match attached.answer {
            Frame::SubscribeReady { topic } => topic,
            other => return Err(Error::Protocol(format!("expected SubscribeReady, got {}", other.name()))),
        };
        debug!(%topic, subscription = %self.subscription, consumer = %consumer_name, broker = %attached.broker, "consumer ready");
        let cfg = ConsumerConfig {
            subscription_type: self.subscription_type,
            receiver_queue_size: self.receiver_queue_size,
            nack_redelivery_delay: self.nack_redelivery_delay,
            ack_group_time: self.ack_group_time,
            reader: self.reader,
            skip_before: self.skip_before,
            max_redeliveries: self.dead_letter.as_ref().map(|p| p.max_redeliveries),
        };
        let state = ConsumerState::new(cfg, Arc::from(topic.as_str()));
        let Channel { outbox, writer_task, reader } = attached.channel;
        outbox.send_all([state.initial_flow()]);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner { state, outbox: Some(outbox) }),
            messages: Notify::new(),
            timers: Notify::new(),
            dead_letters: Notify::new(),
            reconnects: AtomicU64::new(0),
        });
        let dead_letter_task = dead_letter_topic.map(|dead_letter_topic| {
            tokio::spawn(
                DeadLetterTask {
                    shared: shared.clone(),
                    client: self.client.clone(),
                    dead_letter_topic,
                    subscription: self.subscription.clone(),
                    producer: None,
                }
                .run(),
            )
        });
        let task = Task {
            shared: shared.clone(),
            client: self.client.clone(),
            // Attaching again names the full topic the broker confirmed.
            request: SubscribeRequest { topic: topic.clone(), ..request },
            topic: topic.clone(),
            name: consumer_name.clone(),
            operation_timeout: self.client.operation_timeout(),
            up_since: Instant::now(),
            backoff: Backoff::default(),
        };
        let task = tokio::spawn(task.run(reader, writer_task));
        Ok(Consumer {
            shared,
            task,
            dead_letter_task,
            topic,
            subscription: self.subscription,
            consumer_name,
            subscription_type: self.subscription_type,
            closed: false,
            _client: self.client,
        })
    }
}

/// Receives the messages of one subscription. Methods take `&self`, so one consumer can be
/// shared between tasks. Dropping it without [`Consumer::close`] still sends the gathered
/// acknowledgements, in the background.
#[derive(Debug)]
pub struct Consumer {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    /// Publishes dead letters, with a [`DeadLetterPolicy`].
    dead_letter_task: Option<JoinHandle<()>>,
    topic: String,
    subscription: String,
    consumer_name: String,
    subscription_type: SubscriptionType,
    closed: bool,
    _client: Client,
}

impl Consumer {
    /// The next message. Once the stream has ended, the messages already received are returned
    /// first, then the reason ([`Error::Closed`], or the broker's [`Error::Broker`]).
    /// Cancel-safe: a message is taken only when this returns it.
    pub async fn receive(&self) -> Result<ReceivedMessage, Error> {
        loop {
            let notified = self.shared.messages.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(result) = self.shared.apply(|s, out| s.receive(std::time::Instant::now(), out)) {
                return result;
            }
            notified.await;
        }
    }

    /// Acknowledges one message. Its entry (batch) is acknowledged on the broker once every
    /// message of it is; acknowledgements are sent in groups (see
    /// [`ConsumerBuilder::ack_group_time`]).
    pub fn ack(&self, id: &MessageId) -> Result<(), Error> {
        self.shared.apply(|s, out| s.ack(id, std::time::Instant::now(), out))
    }

    /// Acknowledges every message up to and including `id`. Only on exclusive and failover
    /// subscriptions.
    pub fn ack_cumulative(&self, id: &MessageId) -> Result<(), Error> {
        self.shared.apply(|s, out| s.ack_cumulative(id, std::time::Instant::now(), out))
    }

    /// Negatively acknowledges a message: its whole entry (batch) is delivered again after the
    /// nack redelivery delay. A no-op for an entry already acknowledged or nacked.
    pub fn nack(&self, id: &MessageId) -> Result<(), Error> {
        self.shared.apply(|s, out| s.nack(id, std::time::Instant::now(), out))
    }

    /// Asks the broker to deliver again every message this consumer has not acknowledged.
    /// Messages received but not yet taken by [`Consumer::receive`] are dropped: they come again.
    pub fn redeliver_unacknowledged(&self) -> Result<(), Error> {
        self.shared.apply(|s, out| s.redeliver_unacknowledged(out))
    }

    /// Whether this consumer receives messages: false for a failover consumer on standby
    /// (until the broker makes it active), true for the other subscription types.
    pub fn is_active(&self) -> bool {
        self.shared.lock().state.is_active()
    }

    /// How many times the consumer has subscribed again after losing its stream.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Sends the gathered acknowledgements and closes the consumer on the broker; what was not
    /// acknowledged goes to the subscription's other consumers, or waits for the next one.
    /// While reconnecting there is no stream: acknowledgements not sent yet are dropped, and
    /// their messages are delivered again to the subscription. So are entries whose
    /// dead-lettering is not finished.
    pub async fn close(mut self) -> Result<(), Error> {
        self.closed = true;
        self.shared.apply(|s, out| s.close(out));
        self.shared.messages.notify_waiters();
        if let Some(t) = &self.dead_letter_task {
            t.abort();
        }
        let outbox = self.shared.lock().outbox.clone();
        match outbox {
            Some(outbox) => outbox.finish().await,
            None => Ok(()),
        }
    }

    /// The full topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn subscription(&self) -> &str {
        &self.subscription
    }

    pub fn consumer_name(&self) -> &str {
        &self.consumer_name
    }

    pub fn subscription_type(&self) -> SubscriptionType {
        self.subscription_type
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if !self.closed {
            self.shared.apply(|s, out| s.close(out));
            if let Some(outbox) = &self.shared.lock().outbox {
                outbox.finish_later();
            }
        }
        self.task.abort();
        if let Some(t) = &self.dead_letter_task {
            t.abort();
        }
    }
}

/// What the handle and the task share.
#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    /// Woken when messages arrive or the consumer ends.
    messages: Notify,
    /// Woken when the state's next deadline may have moved earlier.
    timers: Notify,
    /// Woken when entries wait to be dead-lettered.
    dead_letters: Notify,
    /// Successful re-subscriptions.
    reconnects: AtomicU64,
}

/// The state and the current stream's writer queue (none while reconnecting), changed together.
#[derive(Debug)]
struct Inner {
    state: ConsumerState,
    outbox: Option<Outbox>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the state and queues the frames it produced, under the lock. While
    /// reconnecting they are dropped: the state keeps what the next stream needs.
    fn apply<R>(&self, f: impl FnOnce(&mut ConsumerState, &mut Vec<Frame>) -> R) -> R {
        let mut out = Vec::new();
        let mut inner = self.lock();
        let before = inner.state.next_deadline();
        let result = f(&mut inner.state, &mut out);
        let after = inner.state.next_deadline();
        if !out.is_empty()
            && let Some(outbox) = &inner.outbox
        {
            // A stopped writer ends the stream; the task then records why.
            outbox.send_all(out);
        }
        drop(inner);
        if after.is_some() && (before.is_none() || after < before) {
            self.timers.notify_one();
        }
        result
    }
}

/// The consumer's task: reads the stream, sends what timers make due, and reconnects.
struct Task {
    shared: Arc<Shared>,
    client: Client,
    /// What to subscribe with again.
    request: SubscribeRequest,
    topic: String,
    name: String,
    operation_timeout: Duration,
    /// When the current stream was attached.
    up_since: Instant,
    /// Delays before reconnecting when streams keep failing soon after attaching.
    backoff: Backoff,
}

impl Task {
    async fn run(mut self, mut reader: crate::transport::FrameReader, mut writer_task: JoinHandle<Result<(), Error>>) {
        loop {
            let end = self.serve(&mut reader, &mut writer_task).await;
            if self.shared.lock().state.has_ended() {
                debug!(topic = %self.topic, consumer = %self.name, error = %end, "consumer stream ended after close");
                return;
            }
            if !lookup::should_retry(&end, false) || self.client.pool().is_closed() {
                warn!(topic = %self.topic, consumer = %self.name, error = %end, "consumer stream ended");
                self.shared.lock().state.end(end);
                self.shared.messages.notify_waiters();
                return;
            }
            match self.reconnect(end).await {
                Ok(channel) => (reader, writer_task) = channel,
                Err(e) => {
                    warn!(topic = %self.topic, consumer = %self.name, error = %e, "consumer stopped");
                    self.shared.lock().state.end(e);
                    self.shared.messages.notify_waiters();
                    return;
                }
            }
        }
    }

    /// Serves the stream until it ends; returns why.
    async fn serve(
        &self,
        reader: &mut crate::transport::FrameReader,
        writer_task: &mut JoinHandle<Result<(), Error>>,
    ) -> Error {
        let shared = &self.shared;
        loop {
            let deadline = shared.lock().state.next_deadline().map(Instant::from_std);
            tokio::select! {
                frame = reader.next() => match frame {
                    Ok(Some(Frame::Message { position, redelivery_count, payload })) => {
                        let entry = decode_entry(payload);
                        shared.apply(|s, out| s.on_message(position, redelivery_count, entry, std::time::Instant::now(), out));
                        shared.messages.notify_waiters();
                        shared.dead_letters.notify_one();
                    }
                    Ok(Some(Frame::ActiveConsumerChange { active })) => {
                        debug!(topic = %self.topic, consumer = %self.name, active, "active consumer change");
                        shared.lock().state.set_active(active);
                    }
                    Ok(Some(Frame::Error { code, message })) => return Error::broker(code, message),
                    Ok(Some(other)) => {
                        return Error::Protocol(format!("unexpected {} frame on a consumer stream", other.name()));
                    }
                    Ok(None) => return Error::ConnectionLost("the broker closed the consumer".into()),
                    Err(e) => return e,
                },
                _ = sleep_until(deadline), if deadline.is_some() => {
                    shared.apply(|s, out| s.poll(std::time::Instant::now(), out));
                }
                _ = shared.timers.notified() => {}
                joined = &mut *writer_task => return writer_stopped(joined),
            }
        }
    }

    /// Subscribes again after the stream ended because of `cause`; returns the new stream's
    /// reader and writer task.
    async fn reconnect(
        &mut self,
        cause: Error,
    ) -> Result<(crate::transport::FrameReader, JoinHandle<Result<(), Error>>), Error> {
        let mut request = self.request.clone();
        {
            let mut inner = self.shared.lock();
            // Dropping the outbox lets the old writer finish the stream, if it still can.
            inner.outbox = None;
            inner.state.disconnected();
            if let Some(resume) = inner.state.resume_position() {
                request.start = Some(resume);
            }
        }
        info!(topic = %self.topic, consumer = %self.name, %cause, "consumer lost its stream; reconnecting");
        // A stream that failed soon after attaching waits before the next attempt.
        if self.up_since.elapsed() >= BACKOFF_MAX {
            self.backoff = Backoff::default();
        } else {
            tokio::time::sleep(self.backoff.next_delay()).await;
        }
        let spec = AttachSpec {
            topic: self.topic.clone(),
            request: Frame::Subscribe(request),
            what: "reconnect consumer",
            reconnect: true,
        };
        let attached = lookup::attach(&self.client, &spec, Instant::now() + self.operation_timeout).await?;
        if !matches!(attached.answer, Frame::SubscribeReady { .. }) {
            return Err(Error::Protocol(format!("expected SubscribeReady, got {}", attached.answer.name())));
        }
        let Channel { outbox, writer_task, reader } = attached.channel;
        let mut out = Vec::new();
        {
            let mut inner = self.shared.lock();
            if inner.state.has_ended() {
                // Closed while reconnecting: end the new stream at once.
                outbox.finish_later();
            } else {
                inner.state.reconnected(&mut out);
                outbox.send_all(out);
                inner.outbox = Some(outbox);
            }
        }
        self.up_since = Instant::now();
        let reconnects = self.shared.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
        info!(
            topic = %self.topic,
            consumer = %self.name,
            broker = %attached.broker,
            attempts = attached.attempts,
            reconnects,
            "consumer reconnected"
        );
        self.shared.timers.notify_one();
        Ok((reader, writer_task))
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
