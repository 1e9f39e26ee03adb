//! Dead-letter topics, client side (like Pulsar's `DeadLetterPolicy`): [`DeadLetterPolicy`] and
//! the consumer's dead-letter task.
//!
//! The broker only counts deliveries; the client moves messages. An entry delivered with a
//! redelivery count above `max_redeliveries` is not handed to the application (see
//! [`super::state`]): the task publishes its unacknowledged messages to the dead-letter topic
//! through an internal [`Producer`], created on first need with the client's usual lookup and
//! reconnection, waits for their receipts, and only then acknowledges the entry on the
//! subscription. If publishing fails the entry is not acknowledged: it is asked for again after
//! the nack delay and dead-lettered again then.
//!
//! Must never: acknowledge an entry before all of its dead letters are stored, or hold the
//! consumer's lock while waiting for the broker. At most [`MAX_DEAD_LETTER_ENTRIES_IN_FLIGHT`]
//! entries are published at a time.

use std::sync::Arc;
use std::time::Duration;

use magnetar_common::ids::Position;
use magnetar_common::topic::TopicName;
use tracing::{debug, warn};

use super::Shared;
use super::state::DeadLetter;
use crate::{Client, Error, OutgoingMessage, Producer, ReceivedMessage};

/// Property naming the topic a dead letter was consumed from (Pulsar's name).
pub const PROPERTY_REAL_TOPIC: &str = "REAL_TOPIC";
/// Property naming the subscription that dead-lettered a message.
pub const PROPERTY_ORIGIN_SUBSCRIPTION: &str = "ORIGIN_SUBSCRIPTION";
/// Property with the message id (`ledger:entry:index`) of a dead letter on its original topic
/// (Pulsar's name).
pub const PROPERTY_ORIGIN_MESSAGE_ID: &str = "ORIGIN_MESSAGE_ID";
/// Most entries a consumer publishes to its dead-letter topic at a time.
pub const MAX_DEAD_LETTER_ENTRIES_IN_FLIGHT: usize = 16;
/// Pause of the dead-letter task after a failed publication, so a dead-letter topic that keeps
/// refusing does not turn into a busy loop.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Where a consumer sends messages that were delivered too often; see
/// [`crate::ConsumerBuilder::dead_letter_policy`].
///
/// A message is handed to the application at most `max_redeliveries + 1` times (its first
/// delivery and `max_redeliveries` redeliveries, whatever caused them: [`crate::Consumer::nack`],
/// the ack timeout, a reconnection). When it is delivered once more, with a redelivery count
/// above `max_redeliveries`, the consumer publishes it to the dead-letter topic instead and then
/// acknowledges it. This is Pulsar's `maxRedeliverCount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterPolicy {
    /// Redeliveries allowed before a message is dead-lettered; at least 1.
    pub max_redeliveries: u32,
    /// The dead-letter topic. Default: `<topic>-<subscription>-DLQ` in the topic's tenant and
    /// namespace.
    pub dead_letter_topic: Option<String>,
}

impl DeadLetterPolicy {
    /// Dead-letters after `max_redeliveries` redeliveries, to the default topic.
    pub fn new(max_redeliveries: u32) -> Self {
        DeadLetterPolicy { max_redeliveries, dead_letter_topic: None }
    }

    /// Sets the dead-letter topic.
    pub fn with_dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// Checks the policy and returns the full name of the dead-letter topic of `subscription`
    /// on `topic` (both already valid).
    pub(crate) fn resolve(&self, topic: &str, subscription: &str) -> Result<String, Error> {
        if self.max_redeliveries == 0 {
            return Err(Error::InvalidArgument(
                "dead_letter_policy.max_redeliveries is 0; it must be at least 1".into(),
            ));
        }
        let name = match &self.dead_letter_topic {
            Some(t) => TopicName::parse(t)
                .map_err(|e| Error::InvalidArgument(format!("dead_letter_policy.dead_letter_topic: {e}")))?,
            None => {
                let origin = TopicName::parse(topic).map_err(|e| Error::InvalidArgument(e.to_string()))?;
                let path =
                    format!("{}/{}/{}-{subscription}-DLQ", origin.tenant(), origin.namespace(), origin.local_name());
                TopicName::parse(&path).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "the default dead-letter topic {path:?} is invalid ({e}); set dead_letter_policy.dead_letter_topic"
                    ))
                })?
            }
        };
        let name = name.to_string();
        if TopicName::parse(topic).is_ok_and(|t| t.to_string() == name) {
            return Err(Error::InvalidArgument(format!(
                "dead_letter_policy.dead_letter_topic is the consumed topic {name}; it must be another one"
            )));
        }
        Ok(name)
    }
}

/// The message published to the dead-letter topic for `m`: its payload, key, properties and
/// event time, plus where it came from.
pub(crate) fn dead_letter_message(m: &ReceivedMessage, subscription: &str) -> OutgoingMessage {
    let mut properties: Vec<(String, String)> = m
        .properties
        .iter()
        .filter(|(k, _)| {
            k != PROPERTY_REAL_TOPIC && k != PROPERTY_ORIGIN_SUBSCRIPTION && k != PROPERTY_ORIGIN_MESSAGE_ID
        })
        .cloned()
        .collect();
    properties.push((PROPERTY_REAL_TOPIC.into(), m.topic.to_string()));
    properties.push((PROPERTY_ORIGIN_SUBSCRIPTION.into(), subscription.into()));
    properties.push((PROPERTY_ORIGIN_MESSAGE_ID.into(), m.id.to_string()));
    OutgoingMessage { payload: m.payload.clone(), key: m.key.clone(), properties, event_time_ms: m.event_time_ms }
}

/// The consumer's dead-letter task: publishes what the state hands it, one group at a time.
pub(super) struct DeadLetterTask {
    pub(super) shared: Arc<Shared>,
    pub(super) client: Client,
    pub(super) dead_letter_topic: String,
    pub(super) subscription: String,
    pub(super) producer: Option<Producer>,
}

impl DeadLetterTask {
    pub(super) async fn run(mut self) {
        loop {
            let letters = self.shared.apply(|s, _| s.take_dead_letters(MAX_DEAD_LETTER_ENTRIES_IN_FLIGHT));
            if letters.is_empty() {
                if self.shared.lock().state.has_ended() {
                    break;
                }
                self.shared.dead_letters.notified().await;
                continue;
            }
            let outcomes = self.publish(letters).await;
            let failed = outcomes.iter().any(|(_, ok)| !ok);
            self.shared.apply(|s, out| {
                let now = std::time::Instant::now();
                for (position, ok) in outcomes {
                    s.dead_lettered(position, ok, now, out);
                }
            });
            if failed {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
        if let Some(p) = self.producer.take() {
            let _ = p.close().await;
        }
    }

    /// Publishes the letters' messages and waits for their receipts; says, per entry, whether
    /// all of its messages are stored.
    async fn publish(&mut self, letters: Vec<DeadLetter>) -> Vec<(Position, bool)> {
        let producer = match &self.producer {
            Some(p) => p,
            None => match self.client.producer(&self.dead_letter_topic).create().await {
                Ok(p) => self.producer.insert(p),
                Err(e) => {
                    warn!(topic = %self.dead_letter_topic, error = %e, "create the dead-letter producer; will retry");
                    return letters.iter().map(|l| (l.position, false)).collect();
                }
            },
        };
        let mut receipts = Vec::with_capacity(letters.len());
        for letter in &letters {
            let mut entry = Vec::with_capacity(letter.messages.len());
            for m in &letter.messages {
                entry.push(producer.send_async(dead_letter_message(m, &self.subscription)).await);
            }
            receipts.push((letter.position, entry));
        }
        let mut outcomes = Vec::with_capacity(letters.len());
        let mut producer_failed = false;
        for (position, entry) in receipts {
            let mut ok = true;
            for receipt in entry {
                let result = match receipt {
                    Ok(r) => r.await.map(|_| ()),
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    if ok {
                        warn!(topic = %self.dead_letter_topic, %position, error = %e,
                            "publish a dead letter; the entry will be delivered again");
                    }
                    ok = false;
                    producer_failed = true;
                }
            }
            if ok {
                debug!(topic = %self.dead_letter_topic, %position, "entry dead-lettered");
            }
            outcomes.push((position, ok));
        }
        if producer_failed {
            // A stopped producer stays stopped: make a new one next time.
            self.producer = None;
        }
        outcomes
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use magnetar_common::ids::MessageId;

    use super::*;

    #[test]
    fn the_default_topic_is_next_to_the_consumed_one() {
        let p = DeadLetterPolicy::new(3);
        assert_eq!(p.resolve("orders", "billing").expect("valid"), "persistent://public/default/orders-billing-DLQ");
        assert_eq!(
            p.resolve("persistent://acme/prod/orders", "billing").expect("valid"),
            "persistent://acme/prod/orders-billing-DLQ"
        );
        let p = p.with_dead_letter_topic("acme/ops/dead");
        assert_eq!(p.resolve("orders", "billing").expect("valid"), "persistent://acme/ops/dead");
    }

    #[test]
    fn bad_policies_are_refused_with_the_field_named() {
        let err = DeadLetterPolicy::new(0).resolve("t", "s").expect_err("zero");
        assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("max_redeliveries is 0")), "{err:?}");
        let err = DeadLetterPolicy::new(1).with_dead_letter_topic("a b").resolve("t", "s").expect_err("space");
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("dead_letter_topic") && m.contains("' '")),
            "{err:?}"
        );
        let err =
            DeadLetterPolicy::new(1).with_dead_letter_topic("public/default/t").resolve("t", "s").expect_err("same");
        assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("consumed topic")), "{err:?}");
        let long = "x".repeat(250);
        let err = DeadLetterPolicy::new(1).resolve(&long, "sub").expect_err("too long");
        assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("default dead-letter topic")), "{err:?}");
    }

    #[test]
    fn dead_letters_keep_the_message_and_say_where_it_came_from() {
        let m = ReceivedMessage {
            id: MessageId::new(4, 5, 6),
            topic: Arc::from("persistent://public/default/t"),
            key: Some(Bytes::from_static(b"k")),
            properties: vec![("a".into(), "1".into()), (PROPERTY_REAL_TOPIC.into(), "stale".into())],
            event_time_ms: Some(9),
            publish_time_ms: 1,
            producer_name: Arc::from("p"),
            sequence_id: 0,
            redelivery_count: 3,
            payload: Bytes::from_static(b"poison"),
        };
        let out = dead_letter_message(&m, "sub");
        assert_eq!(out.payload, m.payload);
        assert_eq!(out.key, m.key);
        assert_eq!(out.event_time_ms, Some(9));
        assert_eq!(
            out.properties,
            vec![
                ("a".to_string(), "1".to_string()),
                (PROPERTY_REAL_TOPIC.to_string(), "persistent://public/default/t".to_string()),
                (PROPERTY_ORIGIN_SUBSCRIPTION.to_string(), "sub".to_string()),
                (PROPERTY_ORIGIN_MESSAGE_ID.to_string(), "4:5:6".to_string()),
            ]
        );
    }
}
